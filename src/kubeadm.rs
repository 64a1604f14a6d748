//! kubeadm's external-CA layout: the files `kubeadm certs generate-csr` writes, the profile each
//! is signed under, where kubeadm expects the CA certificates, and its kubeconfigs completed.
//!
//! A kubeconfig from `kubeadm certs generate-csr` is partial: kubeadm builds it with
//! `CreateWithCerts(server, cluster, user, nil CA, key PEM, nil cert)` and writes it with
//! client-go's `clientcmd.Write`, whose `certificate-authority-data` and
//! `client-certificate-data` are `[]byte` fields with `omitempty`. So those lines are *absent*,
//! not empty: only `client-key-data` is there. [`fill_kubeconfig`] therefore reads the file as
//! YAML (JSON is YAML too), finds the current context's cluster and user, and sets both fields
//! whether they are absent, empty or present. Before anything is returned it checks what it
//! wrote: the certificate's public key is the one of `client-key-data`'s private key, and the
//! CA certificate verifies the client certificate. A template it cannot complete is an error
//! with a rule id, never a kubeconfig returned unchanged.
//!
//! YAML library: `yaml_serde`, the YAML organization's maintained continuation of the archived
//! `serde_yaml` (same API and output; `serde_yaml_ng` and `serde_norway` have had no release for
//! over a year, and `saphyr`'s serde layer has no `Value` type to edit a document in place). Its
//! `Mapping` keeps insertion order, so every key the template had stays where it was.
//!
//! Pure: the templates are read from the stick by `input` (regular files only, no symlinks,
//! size-capped). [`check_template`] runs when the batch is planned, before anything is issued;
//! [`fill_kubeconfig`] when the certificate is released.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{self as sig, KeyPair};
use yaml_serde::{Mapping, Value};

use crate::keys::{KeyType, PublicKey};

/// kubeadm `certs generate-csr` file names (relative to the input root) and their profiles.
pub const KUBEADM: [(&str, &str); 12] = [
    ("pki/apiserver.csr", "apiserver"),
    (
        "pki/apiserver-kubelet-client.csr",
        "apiserver-kubelet-client",
    ),
    ("pki/front-proxy-client.csr", "front-proxy-client"),
    ("pki/apiserver-etcd-client.csr", "apiserver-etcd-client"),
    ("pki/etcd/server.csr", "etcd-server"),
    ("pki/etcd/peer.csr", "etcd-peer"),
    ("pki/etcd/healthcheck-client.csr", "etcd-healthcheck-client"),
    ("admin.conf.csr", "admin"),
    ("super-admin.conf.csr", "super-admin"),
    ("kubelet.conf.csr", "kubelet-client"),
    ("controller-manager.conf.csr", "controller-manager"),
    ("scheduler.conf.csr", "scheduler"),
];

/// Where kubeadm expects each CA certificate when the CA key is kept outside (external CA),
/// by a profile that CA issues: the CA is that profile's `issuer`, so a site's `cluster_name`
/// (`prod-eu-kubernetes-ca`) picks the cluster's own intermediates. The CA's plain name is
/// used when the home has no such profile.
pub(crate) const KUBEADM_CAS: [(&str, &str, &str); 3] = [
    ("apiserver", "kubernetes-ca", "pki/ca.crt"),
    ("etcd-server", "etcd-ca", "pki/etcd/ca.crt"),
    (
        "front-proxy-client",
        "front-proxy-ca",
        "pki/front-proxy-ca.crt",
    ),
];

/// Why a kubeconfig template could not be completed. Each variant has a stable rule id
/// ([`KubeconfigError::rule`]); the item fails with it and no kubeconfig is written.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    /// The template could not be read from the input (missing, a symlink, not a regular file,
    /// too large); the rule is the input's (`input.symlink`, ...).
    #[error(transparent)]
    Input(#[from] crate::input::InputError),
    /// Not YAML or JSON, or not a mapping at the top.
    #[error("{file}: not a kubeconfig: rule kubeconfig.syntax: {reason}")]
    Syntax {
        /// The template's name.
        file: String,
        /// What the parser said.
        reason: String,
    },
    /// `current-context` is missing or names no context.
    #[error(
        "{file}: rule kubeconfig.context expects current-context to name an entry of contexts with a cluster and a user, got {value:?}"
    )]
    Context {
        /// The template's name.
        file: String,
        /// The current-context value.
        value: String,
    },
    /// The current context's cluster is not among `clusters`.
    #[error(
        "{file}: rule kubeconfig.cluster expects the current context's cluster in clusters, got {name:?}"
    )]
    Cluster {
        /// The template's name.
        file: String,
        /// The cluster the context names.
        name: String,
    },
    /// The current context's user is not among `users`.
    #[error(
        "{file}: rule kubeconfig.user expects the current context's user in users, got {name:?}"
    )]
    User {
        /// The template's name.
        file: String,
        /// The user the context names.
        name: String,
    },
    /// `client-key-data` is missing or not a private key hsmca can read.
    #[error("{file}: rule kubeconfig.key expects client-key-data with a PEM private key: {reason}")]
    Key {
        /// The template's name.
        file: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate is not for the template's private key.
    #[error(
        "{file}: rule kubeconfig.key_mismatch: the certificate's public key (SHA-256 {cert}) is not the one of client-key-data's private key"
    )]
    KeyMismatch {
        /// The template's name.
        file: String,
        /// Fingerprint of the certificate's SPKI.
        cert: String,
    },
    /// The CA certificate put in `certificate-authority-data` does not verify the certificate.
    #[error(
        "{file}: rule kubeconfig.ca: the CA certificate for certificate-authority-data does not verify the client certificate: {reason}"
    )]
    Ca {
        /// The template's name.
        file: String,
        /// Why.
        reason: String,
    },
}

impl KubeconfigError {
    /// The stable rule id, as in the message and the report.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::Input(e) => e.rule(),
            Self::Syntax { .. } => "kubeconfig.syntax",
            Self::Context { .. } => "kubeconfig.context",
            Self::Cluster { .. } => "kubeconfig.cluster",
            Self::User { .. } => "kubeconfig.user",
            Self::Key { .. } => "kubeconfig.key",
            Self::KeyMismatch { .. } => "kubeconfig.key_mismatch",
            Self::Ca { .. } => "kubeconfig.ca",
        }
    }
}

/// Completes kubeadm's partial kubeconfig `template` (YAML or JSON) named `file`: sets
/// `client-certificate-data` of the current context's user to the PEM of `cert_der` and
/// `certificate-authority-data` of its cluster to the PEM of `ca_der`, present, empty or
/// absent. Everything else stays as it was, in its order; a file reference that the data
/// would contradict (`client-certificate`, `certificate-authority`) is dropped, since kubectl
/// refuses a user or cluster with both. Returns YAML.
pub fn fill_kubeconfig(
    file: &str,
    template: &[u8],
    cert_der: &[u8],
    ca_der: &[u8],
) -> Result<String, KubeconfigError> {
    let mut doc = parse(file, template)?;
    let root = top(file, &mut doc)?;
    let (cluster_name, user_name) = targets(file, root)?;
    let user =
        named_mut(root, "users", "user", &user_name).ok_or_else(|| KubeconfigError::User {
            file: file.to_owned(),
            name: user_name.clone(),
        })?;
    check_key(file, user.get("client-key-data"), cert_der)?;
    put(user, "client-certificate-data", &pem_b64(cert_der));
    user.shift_remove("client-certificate");

    check_ca(file, cert_der, ca_der)?;
    let cluster = named_mut(root, "clusters", "cluster", &cluster_name).ok_or_else(|| {
        KubeconfigError::Cluster {
            file: file.to_owned(),
            name: cluster_name.clone(),
        }
    })?;
    put(cluster, "certificate-authority-data", &pem_b64(ca_der));
    cluster.shift_remove("certificate-authority");

    yaml_serde::to_string(&doc).map_err(|e| KubeconfigError::Syntax {
        file: file.to_owned(),
        reason: e.to_string(),
    })
}

/// Checks, before its certificate is issued, that a template can be completed: it parses, its
/// current context names a cluster and a user that are there, and the user's
/// `client-key-data` is a PEM private key. (Whether that key is the certificate's is known
/// only once the certificate exists: [`fill_kubeconfig`] checks it.)
pub fn check_template(file: &str, template: &[u8]) -> Result<(), KubeconfigError> {
    let mut doc = parse(file, template)?;
    let root = top(file, &mut doc)?;
    let (cluster, user) = targets(file, root)?;
    if named(root, "clusters", "cluster", &cluster).is_none() {
        return Err(KubeconfigError::Cluster {
            file: file.to_owned(),
            name: cluster,
        });
    }
    let Some(user_map) = named(root, "users", "user", &user) else {
        return Err(KubeconfigError::User {
            file: file.to_owned(),
            name: user,
        });
    };
    private_key(file, user_map.get("client-key-data")).map(|_| ())
}

/// The template as a YAML value (JSON is YAML too).
fn parse(file: &str, template: &[u8]) -> Result<Value, KubeconfigError> {
    let syntax = |reason: String| KubeconfigError::Syntax {
        file: file.to_owned(),
        reason,
    };
    let text = std::str::from_utf8(template).map_err(|e| syntax(e.to_string()))?;
    yaml_serde::from_str(text).map_err(|e| syntax(e.to_string()))
}

/// The top-level mapping.
fn top<'a>(file: &str, doc: &'a mut Value) -> Result<&'a mut Mapping, KubeconfigError> {
    doc.as_mapping_mut().ok_or_else(|| KubeconfigError::Syntax {
        file: file.to_owned(),
        reason: "the top level is not a mapping".into(),
    })
}

/// The cluster and user names of the current context.
fn targets(file: &str, root: &Mapping) -> Result<(String, String), KubeconfigError> {
    let current = root
        .get("current-context")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let context = named(root, "contexts", "context", current);
    let field = |k: &str| {
        context
            .and_then(|c| c.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    match (field("cluster"), field("user")) {
        (Some(cluster), Some(user)) => Ok((cluster, user)),
        _ => Err(KubeconfigError::Context {
            file: file.to_owned(),
            value: current.to_owned(),
        }),
    }
}

/// The `inner` mapping of the entry of list `list` whose `name` is `name`
/// (`contexts: [{name: N, context: {...}}]`).
fn named<'a>(root: &'a Mapping, list: &str, inner: &str, name: &str) -> Option<&'a Mapping> {
    root.get(list)?
        .as_sequence()?
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))?
        .get(inner)?
        .as_mapping()
}

/// [`named`], mutable.
fn named_mut<'a>(
    root: &'a mut Mapping,
    list: &str,
    inner: &str,
    name: &str,
) -> Option<&'a mut Mapping> {
    root.get_mut(list)?
        .as_sequence_mut()?
        .iter_mut()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))?
        .get_mut(inner)?
        .as_mapping_mut()
}

/// Sets `key` to the string `value`: in place when the key is there, else before the first key
/// that sorts after it, where `clientcmd.Write` (which sorts keys) would have put it.
fn put(map: &mut Mapping, key: &str, value: &str) {
    let value = Value::String(value.to_owned());
    if let Some(slot) = map.get_mut(key) {
        *slot = value;
        return;
    }
    let old = std::mem::take(map);
    let mut placed = false;
    for (k, v) in old {
        if !placed && k.as_str().is_some_and(|k| k > key) {
            map.insert(Value::String(key.to_owned()), value.clone());
            placed = true;
        }
        map.insert(k, v);
    }
    if !placed {
        map.insert(Value::String(key.to_owned()), value);
    }
}

/// Base64 of the PEM `CERTIFICATE` block, as kubeconfig `*-data` fields hold it.
fn pem_b64(der: &[u8]) -> String {
    B64.encode(crate::engine::pem("CERTIFICATE", der))
}

/// Checks that `client-key-data` holds the private key of the certificate's public key. The
/// key is whatever kubeadm wrote (`RSA PRIVATE KEY`, `EC PRIVATE KEY`) or PKCS#8; ring checks
/// the private key's consistency as it loads it, and its public half is compared with the
/// certificate's.
fn check_key(file: &str, data: Option<&Value>, cert_der: &[u8]) -> Result<(), KubeconfigError> {
    let bad = |reason: &str| KubeconfigError::Key {
        file: file.to_owned(),
        reason: reason.to_owned(),
    };
    let (label, der) = private_key(file, data)?;
    let label = label.as_str();
    let (cert_key, _) = crate::verify::key_and_expiry(cert_der).map_err(|e| bad(&e.to_string()))?;
    let unreadable = |_| {
        bad(&format!(
            "cannot load the {label} for a {} certificate",
            cert_key.key_type
        ))
    };
    let rng = ring::rand::SystemRandom::new();
    let private_public: Vec<u8> = match (cert_key.key_type, label) {
        (KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096, "RSA PRIVATE KEY") => {
            sig::RsaKeyPair::from_der(&der)
                .map_err(unreadable)?
                .public_key()
                .as_ref()
                .to_vec()
        }
        (KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096, "PRIVATE KEY") => {
            sig::RsaKeyPair::from_pkcs8(&der)
                .map_err(unreadable)?
                .public_key()
                .as_ref()
                .to_vec()
        }
        (KeyType::EcdsaP256 | KeyType::EcdsaP384, "EC PRIVATE KEY") => {
            // SEC1 `ECPrivateKey`: ring takes the bare scalar together with the public point it
            // must belong to, and refuses the pair unless they match.
            let scalar =
                sec1_private_scalar(&der).ok_or_else(|| bad("malformed EC PRIVATE KEY"))?;
            sig::EcdsaKeyPair::from_private_key_and_public_key(
                ecdsa_algorithm(cert_key.key_type),
                scalar,
                &cert_key.raw,
                &rng,
            )
            .map_err(|_| mismatch(file, &cert_key))?;
            return Ok(());
        }
        (KeyType::EcdsaP256 | KeyType::EcdsaP384, "PRIVATE KEY") => {
            sig::EcdsaKeyPair::from_pkcs8(ecdsa_algorithm(cert_key.key_type), &der, &rng)
                .map_err(unreadable)?
                .public_key()
                .as_ref()
                .to_vec()
        }
        (KeyType::Ed25519, "PRIVATE KEY") => sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(unreadable)?
            .public_key()
            .as_ref()
            .to_vec(),
        (key_type, label) => {
            return Err(bad(&format!(
                "a {label} cannot hold the key of a {key_type} certificate"
            )));
        }
    };
    if private_public == cert_key.raw {
        Ok(())
    } else {
        Err(mismatch(file, &cert_key))
    }
}

/// The PEM label and DER of `client-key-data` (base64 of a PEM private key block).
fn private_key(file: &str, data: Option<&Value>) -> Result<(String, Vec<u8>), KubeconfigError> {
    let bad = |reason: &str| KubeconfigError::Key {
        file: file.to_owned(),
        reason: reason.to_owned(),
    };
    let b64 = data
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| bad("client-key-data is missing or empty"))?;
    let pem = B64
        .decode(b64.trim())
        .map_err(|_| bad("client-key-data is not base64"))?;
    let (label, der) = x509_cert::der::pem::decode_vec(&pem)
        .map_err(|_| bad("client-key-data is not a PEM block"))?;
    if !label.ends_with("PRIVATE KEY") {
        return Err(bad(&format!(
            "client-key-data holds a {label}, not a private key"
        )));
    }
    Ok((label.to_owned(), der))
}

fn mismatch(file: &str, cert_key: &PublicKey) -> KubeconfigError {
    KubeconfigError::KeyMismatch {
        file: file.to_owned(),
        cert: cert_key.fingerprint(),
    }
}

/// ring's signing algorithm for an ECDSA key type (only its curve matters here).
fn ecdsa_algorithm(key_type: KeyType) -> &'static ring::signature::EcdsaSigningAlgorithm {
    if key_type == KeyType::EcdsaP384 {
        &ring::signature::ECDSA_P384_SHA384_ASN1_SIGNING
    } else {
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING
    }
}

/// The `privateKey` OCTET STRING of a SEC1 `ECPrivateKey ::= SEQUENCE { version INTEGER (1),
/// privateKey OCTET STRING, [0] parameters OPTIONAL, [1] publicKey OPTIONAL }` (RFC 5915).
fn sec1_private_scalar(der: &[u8]) -> Option<&[u8]> {
    let seq = crate::asn1::element(der, 0)?;
    if seq.tag != 0x30 || seq.end() != der.len() {
        return None;
    }
    let version = crate::asn1::element(der, seq.content_start())?;
    if version.tag != 0x02 || der.get(version.content_start()..version.end())? != [1] {
        return None;
    }
    let scalar = crate::asn1::element(der, version.end())?;
    if scalar.tag != 0x04 {
        return None;
    }
    der.get(scalar.content_start()..scalar.end())
}

/// Checks that the CA certificate's key verifies the client certificate's signature.
fn check_ca(file: &str, cert_der: &[u8], ca_der: &[u8]) -> Result<(), KubeconfigError> {
    let bad = |e: crate::verify::VerifyError| KubeconfigError::Ca {
        file: file.to_owned(),
        reason: e.to_string(),
    };
    let (ca_key, _) = crate::verify::key_and_expiry(ca_der).map_err(bad)?;
    crate::verify::signature(cert_der, &ca_key).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a leaf it signed, the leaf's key as PKCS#8 PEM.
    struct Pki {
        ca: Vec<u8>,
        leaf: Vec<u8>,
        key_pem: String,
    }

    fn pki() -> Pki {
        let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
        let ca_key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap().der().to_vec();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate_for(alg).unwrap();
        let leaf = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap()
            .der()
            .to_vec();
        Pki {
            ca,
            leaf,
            key_pem: leaf_key.serialize_pem(),
        }
    }

    /// What `kubeadm certs generate-csr` writes (client-go `clientcmd.Write`: keys sorted, no
    /// `certificate-authority-data` or `client-certificate-data` line at all).
    fn kubeadm_template(key_pem: &str) -> String {
        format!(
            "apiVersion: v1
clusters:
- cluster:
    server: https://10.0.0.11:6443
  name: kubernetes
contexts:
- context:
    cluster: kubernetes
    user: kubernetes-admin
  name: kubernetes-admin@kubernetes
current-context: kubernetes-admin@kubernetes
kind: Config
preferences: {{}}
users:
- name: kubernetes-admin
  user:
    client-key-data: {}
",
            B64.encode(key_pem)
        )
    }

    fn user_and_cluster(yaml: &str) -> (Mapping, Mapping) {
        let doc: Value = yaml_serde::from_str(yaml).unwrap();
        let root = doc.as_mapping().unwrap();
        let user = named(root, "users", "user", "kubernetes-admin").unwrap();
        let cluster = named(root, "clusters", "cluster", "kubernetes").unwrap();
        (user.clone(), cluster.clone())
    }

    fn keys(m: &Mapping) -> Vec<&str> {
        m.keys().filter_map(Value::as_str).collect()
    }

    #[test]
    fn absent_empty_or_present_data_lines_are_all_filled_in_kubeadm_order() {
        let p = pki();
        let plain = kubeadm_template(&p.key_pem);
        let empty = plain
            .replace(
                "    server:",
                "    certificate-authority-data: \"\"\n    server:",
            )
            .replace(
                "    client-key-data:",
                "    client-certificate-data: \"\"\n    client-key-data:",
            );
        let stale = empty.replace("\"\"", "T0xE");
        for template in [&plain, &empty, &stale] {
            let out = fill_kubeconfig("admin.conf", template.as_bytes(), &p.leaf, &p.ca).unwrap();
            let (user, cluster) = user_and_cluster(&out);
            assert_eq!(keys(&user), ["client-certificate-data", "client-key-data"]);
            assert_eq!(keys(&cluster), ["certificate-authority-data", "server"]);
            let cert = B64
                .decode(user["client-certificate-data"].as_str().unwrap())
                .unwrap();
            assert_eq!(
                cert,
                crate::engine::pem("CERTIFICATE", &p.leaf).into_bytes()
            );
            let ca = B64
                .decode(cluster["certificate-authority-data"].as_str().unwrap())
                .unwrap();
            assert_eq!(ca, crate::engine::pem("CERTIFICATE", &p.ca).into_bytes());
            assert_eq!(
                user["client-key-data"].as_str(),
                Some(B64.encode(&p.key_pem).as_str()),
                "the key stays as kubeadm wrote it"
            );
            // Everything else is kept, in order.
            let doc: Value = yaml_serde::from_str(&out).unwrap();
            let top: Vec<&str> = keys(doc.as_mapping().unwrap());
            assert_eq!(
                top,
                [
                    "apiVersion",
                    "clusters",
                    "contexts",
                    "current-context",
                    "kind",
                    "preferences",
                    "users"
                ]
            );
        }
    }

    #[test]
    fn json_templates_are_read_too() {
        let p = pki();
        let doc: Value = yaml_serde::from_str(&kubeadm_template(&p.key_pem)).unwrap();
        let json = serde_json::to_string(&doc).unwrap();
        let out = fill_kubeconfig("admin.conf", json.as_bytes(), &p.leaf, &p.ca).unwrap();
        let (user, cluster) = user_and_cluster(&out);
        assert!(user.contains_key("client-certificate-data"));
        assert!(cluster.contains_key("certificate-authority-data"));
    }

    #[test]
    fn unusable_templates_fail_with_their_rule() {
        let p = pki();
        let other = pki();
        let good = kubeadm_template(&p.key_pem);
        let cases: [(String, &[u8], &[u8], &str); 9] = [
            (
                good.replace("name: kubernetes-admin\n", "name: someone-else\n"),
                &p.leaf,
                &p.ca,
                "kubeconfig.user",
            ),
            (
                good.replace("  name: kubernetes\n", "  name: elsewhere\n"),
                &p.leaf,
                &p.ca,
                "kubeconfig.cluster",
            ),
            (
                good.replace("current-context: kubernetes-admin@kubernetes\n", ""),
                &p.leaf,
                &p.ca,
                "kubeconfig.context",
            ),
            (
                good.replace("current-context: kubernetes-admin@", "current-context: x@"),
                &p.leaf,
                &p.ca,
                "kubeconfig.context",
            ),
            (
                "- just\n- a list\n".into(),
                &p.leaf,
                &p.ca,
                "kubeconfig.syntax",
            ),
            (
                "users: [unclosed\n".into(),
                &p.leaf,
                &p.ca,
                "kubeconfig.syntax",
            ),
            (
                good.replace("client-key-data:", "token:"),
                &p.leaf,
                &p.ca,
                "kubeconfig.key",
            ),
            (good.clone(), &other.leaf, &p.ca, "kubeconfig.key_mismatch"),
            (good.clone(), &p.leaf, &other.ca, "kubeconfig.ca"),
        ];
        for (template, leaf, ca, rule) in cases {
            let e = fill_kubeconfig("admin.conf", template.as_bytes(), leaf, ca).unwrap_err();
            assert_eq!(e.rule(), rule, "{e}");
            assert!(e.to_string().starts_with("admin.conf: "), "{e}");
            // Before issuance, everything but the pairing with the certificate is checked.
            let early = check_template("admin.conf", template.as_bytes());
            if rule == "kubeconfig.key_mismatch" || rule == "kubeconfig.ca" {
                assert!(early.is_ok(), "{rule}: {early:?}");
            } else {
                assert_eq!(early.unwrap_err().rule(), rule);
            }
        }
    }
}
