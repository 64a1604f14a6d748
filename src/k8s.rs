//! Kubernetes CertificateSigningRequest objects (`kubectl get csr -o json`): which to sign,
//! under which profile, the built-in signers' own rules, and the `/status` object to upload.
//! Pure: JSON in, values out.

use std::collections::BTreeMap;

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
        usages: strings(v, "/spec/usages"),
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

/// The command that uploads one status object.
pub fn replace_command(name: &str, file: &str) -> String {
    format!(
        "kubectl replace --raw /apis/certificates.k8s.io/v1/certificatesigningrequests/{name}/status -f {file}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::signer_rules;

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
