//! Kubernetes CertificateSigningRequest objects (`kubectl get csr -o json`): which to sign,
//! under which profile, the built-in signers' own rules, and the `/status` object to upload.
//! Pure: JSON in, values out.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

use crate::policy::{Refusal, SignerRequest};

/// One CertificateSigningRequest object.
#[derive(Debug, Clone)]
pub struct CsrObject {
    /// metadata.name.
    pub name: String,
    /// spec.signerName.
    pub signer: String,
    /// spec.usages.
    pub usages: Vec<String>,
    /// spec.username (set by the API server: who asked).
    pub username: String,
    /// spec.expirationSeconds.
    pub expiration_seconds: Option<u64>,
    /// The PKCS#10 request (PEM), decoded from spec.request.
    pub request: Vec<u8>,
    /// Why it is not to be signed (not approved, denied, failed, already issued), if so.
    pub skip: Option<String>,
    /// Why the object itself is malformed (rules `k8s.name`, `k8s.request`, `k8s.expiration`),
    /// if so: refused as one item, the rest of the List goes on.
    pub invalid: Option<Refusal>,
    /// The object as read, for the `/status` upload.
    pub raw: Value,
}

impl CsrObject {
    /// What the object asks for besides its PKCS#10 request, as the policy judges it.
    pub fn signer_request(&self) -> SignerRequest {
        SignerRequest {
            signer: self.signer.clone(),
            usages: self.usages.clone(),
            username: self.username.clone(),
            groups: strings(&self.raw, "/spec/groups"),
            expiration_seconds: self.expiration_seconds,
        }
    }
}

/// The strings of the array at `pointer` (none if absent or not an array).
fn strings(v: &Value, pointer: &str) -> Vec<String> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Why `kubectl get csr -o json` output could not be read at all (one bad object is not this:
/// it becomes one refused object, see [`CsrObject::invalid`]).
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    /// Not a List of CertificateSigningRequest objects nor one such object.
    #[error("expected a List of CertificateSigningRequest objects, found kind {0:?}")]
    Kind(Option<String>),
}

/// Reads a `List` of objects, or one object. A malformed object (bad name, request that is not
/// base64, bad `expirationSeconds`) does not stop the List: it comes back with
/// [`CsrObject::invalid`] set, named `items[N]` if its own name is unusable.
pub fn objects(json: &Value) -> Result<Vec<CsrObject>, ObjectsError> {
    let items: Vec<&Value> = match json.get("kind").and_then(Value::as_str) {
        Some("List" | "CertificateSigningRequestList") => json
            .get("items")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some("CertificateSigningRequest") => vec![json],
        other => return Err(ObjectsError::Kind(other.map(str::to_owned))),
    };
    let mut seen = BTreeSet::new();
    let mut out: Vec<CsrObject> = items
        .into_iter()
        .enumerate()
        .map(|(i, v)| object(i, v))
        .collect();
    // Objects are keyed by name (and their status files named after it): a second object of
    // the same name is refused rather than silently replacing the first.
    for (i, o) in out.iter_mut().enumerate() {
        if !seen.insert(o.name.clone()) {
            let value = std::mem::replace(&mut o.name, format!("items[{i}]"));
            o.invalid
                .get_or_insert_with(|| refusal("k8s.name", "a name used once in the List", value));
        }
    }
    Ok(out)
}

/// Whether `name` can be an object name here (and so a file name in the output).
fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn object(index: usize, v: &Value) -> CsrObject {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let mut invalid = None;
    let mut name = s("/metadata/name");
    if !is_object_name(&name) {
        let bad = std::mem::replace(&mut name, format!("items[{index}]"));
        invalid = Some(refusal(
            "k8s.name",
            "a Kubernetes object name (letters, digits, '-', '.', '_'; at most 253)",
            bad,
        ));
    }
    let request = match B64.decode(s("/spec/request")) {
        Ok(r) => r,
        Err(e) => {
            invalid.get_or_insert_with(|| {
                refusal("k8s.request", "spec.request in base64", e.to_string())
            });
            Vec::new()
        }
    };
    // Absent means the signer's default; anything but a whole, non-negative number is refused,
    // never silently replaced by the default.
    let expiration_seconds = match v.pointer("/spec/expirationSeconds") {
        None | Some(Value::Null) => None,
        Some(x) => match x.as_u64() {
            Some(n) => Some(n),
            None => {
                invalid.get_or_insert_with(|| {
                    refusal(
                        "k8s.expiration",
                        "spec.expirationSeconds as a whole number of seconds >= 0",
                        x.to_string(),
                    )
                });
                None
            }
        },
    };
    let conditions = v
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let has = |t: &str| {
        conditions.iter().any(|c| {
            c.get("type").and_then(Value::as_str) == Some(t)
                && c.get("status")
                    .and_then(Value::as_str)
                    .is_none_or(|st| st == "True")
        })
    };
    let issued = v
        .pointer("/status/certificate")
        .and_then(Value::as_str)
        .is_some_and(|c| !c.is_empty());
    let skip = if has("Denied") {
        Some("denied".to_owned())
    } else if has("Failed") {
        Some("failed".to_owned())
    } else if issued {
        Some("already has a certificate".to_owned())
    } else if !has("Approved") {
        Some("not approved".to_owned())
    } else {
        None
    };
    CsrObject {
        signer: s("/spec/signerName"),
        usages: strings(v, "/spec/usages"),
        username: s("/spec/username"),
        expiration_seconds,
        request,
        skip,
        invalid,
        raw: v.clone(),
        name,
    }
}

/// Profiles for `kube-apiserver-client` requests, by the CSR's CN.
const CLIENT_BY_CN: [(&str, &str); 6] = [
    ("kube-apiserver-kubelet-client", "apiserver-kubelet-client"),
    ("kubernetes-admin", "admin"),
    ("kubernetes-super-admin", "super-admin"),
    ("system:kube-controller-manager", "controller-manager"),
    ("system:kube-scheduler", "scheduler"),
    ("system:kube-proxy", "kube-proxy"),
];

fn refusal(rule: &str, expected: impl Into<String>, value: impl Into<String>) -> Refusal {
    Refusal {
        rule: rule.into(),
        expected: expected.into(),
        value: value.into(),
    }
}

/// The profile for an object: the built-in signers by name (`kube-apiserver-client` by the
/// CSR's CN), custom signers through the manifest (signerName → profile).
pub fn profile_for(
    obj: &CsrObject,
    cn: Option<&str>,
    manifest: &BTreeMap<String, String>,
) -> Result<String, Refusal> {
    if let Some(p) = manifest.get(&obj.signer) {
        return Ok(p.clone());
    }
    match obj.signer.as_str() {
        "kubernetes.io/kube-apiserver-client-kubelet" => Ok("kubelet-client".into()),
        "kubernetes.io/kubelet-serving" => Ok("kubelet-serving".into()),
        "kubernetes.io/kube-apiserver-client" => CLIENT_BY_CN
            .iter()
            .find(|(c, _)| Some(*c) == cn)
            .map(|(_, p)| (*p).to_owned())
            .ok_or_else(|| {
                refusal(
                    "k8s.signer",
                    "a CN with a client profile (kubernetes-admin, system:kube-scheduler, ...)",
                    cn.unwrap_or_default(),
                )
            }),
        other => Err(refusal(
            "k8s.signer",
            "a built-in signer or one mapped in the manifest",
            other,
        )),
    }
}

/// The object to PUT to `/status`: as read, with `status.certificate` set to the base64 of the
/// PEM chain (leaf first, then intermediates) and its conditions untouched.
pub fn status_object(obj: &CsrObject, chain_pem: &str) -> Value {
    let mut v = obj.raw.clone();
    if !v.get("status").is_some_and(Value::is_object) {
        v["status"] = Value::Object(serde_json::Map::new());
    }
    v["status"]["certificate"] = Value::String(B64.encode(chain_pem));
    v
}

/// The command that uploads one status object. `file` is a shell word, already quoted (so a
/// script can put its own directory in front of it); the URL is quoted here.
pub fn replace_command(name: &str, file: &str) -> String {
    let url = format!("/apis/certificates.k8s.io/v1/certificatesigningrequests/{name}/status");
    format!("kubectl replace --raw {} -f {file}", shell_quote(&url))
}

/// `apply-status.sh` for the status files `uploads` (object name, status file under `out`):
/// it finds them beside itself, so it runs from any directory and after the stick is mounted
/// somewhere else. Every path is quoted: object names and paths come from the stick.
pub fn apply_status_script(
    out: &std::path::Path,
    uploads: &[(String, std::path::PathBuf)],
) -> String {
    let mut script = String::from(
        "#!/bin/sh\n# Uploads each signed CertificateSigningRequest's status. The status files are\n\
         # found beside this script, wherever it is run from.\nset -e\nhere=$(dirname \"$0\")\n",
    );
    for (name, file) in uploads {
        let word = match file.strip_prefix(out) {
            Ok(rel) => format!("\"$here\"/{}", shell_quote(&rel.display().to_string())),
            Err(_) => shell_quote(&file.display().to_string()),
        };
        script.push_str(&replace_command(name, &word));
        script.push('\n');
    }
    script
}

/// `s` as one POSIX shell word: single quotes, each `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::signer_rules;

    #[test]
    fn apply_status_finds_its_files_beside_itself_and_quotes_every_word() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let out = std::path::Path::new("/media/stick one/status");
        let script = apply_status_script(out, &[("csr-a".into(), out.join("csr-a.status.json"))]);
        assert!(script.contains("here=$(dirname \"$0\")\n"), "{script}");
        assert!(
            script.contains(
                "kubectl replace --raw '/apis/certificates.k8s.io/v1/certificatesigningrequests/csr-a/status' -f \"$here\"/'csr-a.status.json'\n"
            ),
            "{script}"
        );
        assert!(!script.contains("/media"), "no absolute path: {script}");
    }

    fn obj(signer: &str, usages: &[&str], username: &str, cond: &str) -> CsrObject {
        let v = serde_json::json!({"kind": "CertificateSigningRequest", "metadata": {"name": "csr-1"},
            "spec": {"request": "", "signerName": signer, "usages": usages, "username": username},
            "status": {"conditions": [{"type": cond, "status": "True"}]}});
        object(0, &v)
    }

    #[test]
    fn one_malformed_object_is_one_refusal_not_a_stopped_list() {
        let good = |name: &str| {
            serde_json::json!({"metadata": {"name": name},
                "spec": {"request": "", "signerName": "s", "expirationSeconds": 600}})
        };
        let mut bad_b64 = good("b64");
        bad_b64["spec"]["request"] = "***".into();
        let mut negative = good("neg");
        negative["spec"]["expirationSeconds"] = (-5).into();
        let mut fraction = good("frac");
        fraction["spec"]["expirationSeconds"] = 601.5.into();
        let mut text = good("text");
        text["spec"]["expirationSeconds"] = "600".into();
        let list = serde_json::json!({"kind": "List", "items": [
            good("ok"), good("../../etc/x"), good("\u{1b}[2K"), bad_b64, negative, fraction,
            text, good("ok")]});
        let objs = objects(&list).unwrap();
        let got: Vec<(&str, Option<&str>)> = objs
            .iter()
            .map(|o| (o.name.as_str(), o.invalid.as_ref().map(|r| r.rule.as_str())))
            .collect();
        assert_eq!(
            got,
            [
                ("ok", None),
                ("items[1]", Some("k8s.name")),
                ("items[2]", Some("k8s.name")),
                ("b64", Some("k8s.request")),
                ("neg", Some("k8s.expiration")),
                ("frac", Some("k8s.expiration")),
                ("text", Some("k8s.expiration")),
                ("items[7]", Some("k8s.name")),
            ]
        );
        assert_eq!(objs[0].expiration_seconds, Some(600));
        assert!(objects(&serde_json::json!({"kind": "Pod"})).is_err());
    }

    #[test]
    fn only_approved_unissued_objects_are_signed() {
        assert_eq!(
            obj("kubernetes.io/kubelet-serving", &[], "u", "Approved").skip,
            None
        );
        assert_eq!(
            obj("kubernetes.io/kubelet-serving", &[], "u", "Denied")
                .skip
                .as_deref(),
            Some("denied")
        );
        assert_eq!(
            obj("kubernetes.io/kubelet-serving", &[], "u", "Pending")
                .skip
                .as_deref(),
            Some("not approved")
        );
    }

    #[test]
    fn signer_rules_check_usages_requester_and_expiration() {
        let cn = Some("system:node:n1");
        let ok = obj(
            "kubernetes.io/kubelet-serving",
            &["digital signature", "server auth"],
            "system:node:n1",
            "Approved",
        );
        assert!(signer_rules(&ok.signer_request(), cn, 86_400).0.is_empty());
        let wrong_user = obj(
            "kubernetes.io/kubelet-serving",
            &["digital signature", "server auth"],
            "system:node:n2",
            "Approved",
        );
        assert_eq!(
            signer_rules(&wrong_user.signer_request(), cn, 86_400).0[0].rule,
            "k8s.username"
        );
        let bootstrap = obj(
            "kubernetes.io/kube-apiserver-client-kubelet",
            &["digital signature", "client auth"],
            "system:bootstrap:abc",
            "Approved",
        );
        assert!(
            signer_rules(&bootstrap.signer_request(), cn, 86_400)
                .0
                .is_empty()
        );
        let usages = obj(
            "kubernetes.io/kube-apiserver-client-kubelet",
            &["digital signature", "server auth"],
            "system:node:n1",
            "Approved",
        );
        assert_eq!(
            signer_rules(&usages.signer_request(), cn, 86_400).0[0].rule,
            "k8s.usages"
        );
        let mut long = ok.clone();
        long.expiration_seconds = Some(10 * 86_400);
        assert_eq!(
            signer_rules(&long.signer_request(), cn, 86_400).1,
            Some(86_400)
        );
    }
}
