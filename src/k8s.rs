//! Kubernetes CertificateSigningRequest objects (`kubectl get csr -o json`): which to sign,
//! under which profile, the built-in signers' own rules, and the `/status` object to upload.
//! Pure: JSON in, values out.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

use crate::policy::Refusal;

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
    /// The object as read, for the `/status` upload.
    pub raw: Value,
}

/// Reads a `List` of objects, or one object.
pub fn objects(json: &Value) -> Result<Vec<CsrObject>, String> {
    let items: Vec<&Value> = match json.get("kind").and_then(Value::as_str) {
        Some("List" | "CertificateSigningRequestList") => json
            .get("items")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        Some("CertificateSigningRequest") => vec![json],
        other => {
            return Err(format!(
                "expected a List of CertificateSigningRequest objects, found kind {other:?}"
            ));
        }
    };
    items.into_iter().map(object).collect()
}

fn object(v: &Value) -> Result<CsrObject, String> {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let name = s("/metadata/name");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err(format!(
            "object name {name:?} is not a Kubernetes object name"
        ));
    }
    let request = B64
        .decode(s("/spec/request"))
        .map_err(|e| format!("{name}: spec.request is not base64: {e}"))?;
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
    Ok(CsrObject {
        signer: s("/spec/signerName"),
        usages: v
            .pointer("/spec/usages")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        username: s("/spec/username"),
        expiration_seconds: v.pointer("/spec/expirationSeconds").and_then(Value::as_u64),
        request,
        skip,
        raw: v.clone(),
        name,
    })
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

/// The built-in signers' own rules (usages compared as sets; the requester's name), and the
/// validity: `expirationSeconds` honoured up to `max_seconds`, at least 600.
pub fn signer_rules(
    obj: &CsrObject,
    cn: Option<&str>,
    max_seconds: u64,
) -> (Vec<Refusal>, Option<u64>) {
    let mut out = Vec::new();
    let usages: BTreeSet<&str> = obj.usages.iter().map(String::as_str).collect();
    let set = |u: &[&'static str]| u.iter().copied().collect::<BTreeSet<&str>>();
    let node_signer = |purpose: &'static str| {
        [
            set(&["digital signature", "key encipherment", purpose]),
            set(&["digital signature", purpose]),
        ]
    };
    let allowed: Option<Vec<BTreeSet<&str>>> = match obj.signer.as_str() {
        "kubernetes.io/kube-apiserver-client-kubelet" => Some(node_signer("client auth").to_vec()),
        "kubernetes.io/kubelet-serving" => Some(node_signer("server auth").to_vec()),
        _ => None,
    };
    match allowed {
        Some(sets) if !sets.contains(&usages) => {
            out.push(refusal(
                "k8s.usages",
                "{digital signature, [key encipherment,] client/server auth}",
                obj.usages.join(", "),
            ));
        }
        None if obj.signer == "kubernetes.io/kube-apiserver-client" => {
            let ok = set(&["digital signature", "key encipherment", "client auth"]);
            if !usages.contains("client auth") || !usages.is_subset(&ok) {
                out.push(refusal(
                    "k8s.usages",
                    "client auth, with only digital signature and key encipherment besides",
                    obj.usages.join(", "),
                ));
            }
        }
        _ => {}
    }
    // A node may only ask for its own name; the kubelet's first client certificate comes
    // from a bootstrap token (system:bootstrap:...), as Kubernetes' own approver allows.
    let node_cn = cn.is_some_and(|c| c.starts_with("system:node:"));
    let bootstrap = obj.signer == "kubernetes.io/kube-apiserver-client-kubelet"
        && obj.username.starts_with("system:bootstrap:");
    if node_cn && !bootstrap && Some(obj.username.as_str()) != cn {
        out.push(refusal(
            "k8s.username",
            format!("the requester to be {:?}", cn.unwrap_or_default()),
            obj.username.clone(),
        ));
    }
    let validity = match obj.expiration_seconds {
        Some(s) if s < 600 => {
            out.push(refusal(
                "k8s.expiration",
                "expirationSeconds of at least 600",
                s.to_string(),
            ));
            None
        }
        Some(s) => Some(s.min(max_seconds)),
        None => None,
    };
    (out, validity)
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
        object(&v).unwrap()
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
        assert!(signer_rules(&ok, cn, 86_400).0.is_empty());
        let wrong_user = obj(
            "kubernetes.io/kubelet-serving",
            &["digital signature", "server auth"],
            "system:node:n2",
            "Approved",
        );
        assert_eq!(
            signer_rules(&wrong_user, cn, 86_400).0[0].rule,
            "k8s.username"
        );
        let bootstrap = obj(
            "kubernetes.io/kube-apiserver-client-kubelet",
            &["digital signature", "client auth"],
            "system:bootstrap:abc",
            "Approved",
        );
        assert!(signer_rules(&bootstrap, cn, 86_400).0.is_empty());
        let usages = obj(
            "kubernetes.io/kube-apiserver-client-kubelet",
            &["digital signature", "server auth"],
            "system:node:n1",
            "Approved",
        );
        assert_eq!(signer_rules(&usages, cn, 86_400).0[0].rule, "k8s.usages");
        let mut long = ok.clone();
        long.expiration_seconds = Some(10 * 86_400);
        assert_eq!(signer_rules(&long, cn, 86_400).1, Some(86_400));
    }
}
