//! Fuzzes CSR parsing plus the policy: any bytes go through `csr::parse` (PEM or DER, proof of
//! possession), and every CSR that parses is judged by every shipped profile. Neither may panic.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use hsmca::home::SHIPPED_PROFILES;
use hsmca::policy::{self, Context};
use hsmca::profile::{Profile, Site};
use libfuzzer_sys::fuzz_target;

fn profiles() -> &'static [Profile] {
    static P: OnceLock<Vec<Profile>> = OnceLock::new();
    P.get_or_init(|| {
        let site = Site::default();
        SHIPPED_PROFILES
            .iter()
            .map(|(name, text)| Profile::parse(text, Path::new(name), name, &site).expect("shipped profile loads"))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(csr) = hsmca::csr::parse(data) else { return };
    let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("valid time");
    let ctx = Context { now, serial: vec![1; 16], requested_validity: None, issuer_not_after: now + time::Duration::days(3650) };
    for profile in profiles() {
        let _ = policy::decide(profile, &csr, &ctx);
    }
});
