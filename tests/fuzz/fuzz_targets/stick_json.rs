//! Fuzzes the readers of JSON from the stick: any bytes as a manifest, a plan and `kubectl get
//! csr -o json` output. None may panic; every manifest key and plan output name goes through
//! the path check (`input::components`), and one bad kubectl object never fails the List.
#![no_main]

use std::collections::BTreeMap;

use hsmca::batch::{ManifestEntry, Plan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = serde_json::from_slice::<BTreeMap<String, ManifestEntry>>(data) {
        for key in manifest.keys() {
            let _ = hsmca::input::components(key);
        }
    }
    if let Ok(plan) = serde_json::from_slice::<Plan>(data) {
        let _ = Plan::content_hash(&plan.items);
        for item in &plan.items {
            let _ = hsmca::input::components(&item.file);
            let _ = hsmca::input::components(&item.out);
        }
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data)
        && let Ok(objects) = hsmca::k8s::objects(&value)
    {
        // Names are unique and usable as file names, or the object is refused.
        let mut names = std::collections::BTreeSet::new();
        for o in &objects {
            assert!(names.insert(o.name.clone()), "duplicate name {:?}", o.name);
            assert!(o.invalid.is_some() || hsmca::input::components(&o.name).is_ok());
        }
    }
});
