//! The CA home: its files and config. Nothing here issues; see `ceremony`, `sign` and `engine`.
//!
//! Layout of a CA home (`--home DIR`):
//!
//! ```text
//! hsmca.json      config: module, token, key labels and ids, log origin; never a secret
//! root.pem        the root certificate
//! profiles/       one JSON file per profile
//! log/            the issuance log (see crate::log)
//! LOCK            held by the one process writing to the log
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::pem;
use crate::error::Error;
use crate::issue::IssuerCert;
use crate::keys::KeyType;
use crate::profile::{Profile, Site};

/// The shipped profiles, compiled in so `init` needs nothing beside the binary. The test suite's
/// `test-any-key` (any key, any DNS name, issued by the root) is not among them: tests install
/// it with `hsmca profiles apply`, the way any site adds a profile.
pub const SHIPPED_PROFILES: [(&str, &str); 19] = [
    ("admin", include_str!("../profiles/admin.json")),
    ("apiserver", include_str!("../profiles/apiserver.json")),
    (
        "apiserver-etcd-client",
        include_str!("../profiles/apiserver-etcd-client.json"),
    ),
    (
        "apiserver-kubelet-client",
        include_str!("../profiles/apiserver-kubelet-client.json"),
    ),
    (
        "controller-manager",
        include_str!("../profiles/controller-manager.json"),
    ),
    ("etcd-ca", include_str!("../profiles/etcd-ca.json")),
    ("etcd-client", include_str!("../profiles/etcd-client.json")),
    (
        "etcd-healthcheck-client",
        include_str!("../profiles/etcd-healthcheck-client.json"),
    ),
    ("etcd-peer", include_str!("../profiles/etcd-peer.json")),
    ("etcd-server", include_str!("../profiles/etcd-server.json")),
    ("flanneld", include_str!("../profiles/flanneld.json")),
    (
        "front-proxy-ca",
        include_str!("../profiles/front-proxy-ca.json"),
    ),
    (
        "front-proxy-client",
        include_str!("../profiles/front-proxy-client.json"),
    ),
    ("kube-proxy", include_str!("../profiles/kube-proxy.json")),
    (
        "kubelet-client",
        include_str!("../profiles/kubelet-client.json"),
    ),
    (
        "kubelet-serving",
        include_str!("../profiles/kubelet-serving.json"),
    ),
    (
        "kubernetes-ca",
        include_str!("../profiles/kubernetes-ca.json"),
    ),
    ("scheduler", include_str!("../profiles/scheduler.json")),
    ("super-admin", include_str!("../profiles/super-admin.json")),
];

/// A key in the token, as recorded in the config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyRef {
    /// CKA_LABEL.
    pub label: String,
    /// CKA_ID, hex.
    pub id: String,
    /// Algorithm.
    pub key_type: KeyType,
}

/// `hsmca.json`. Holds no secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Format version.
    pub version: u32,
    /// PKCS#11 module used at init (overridden by `--module` or `HSMCA_PKCS11_MODULE`).
    pub module: Option<PathBuf>,
    /// Token label.
    pub token: String,
    /// The root CA key.
    pub root_key: KeyRef,
    /// The checkpoint-signing key.
    pub log_key: KeyRef,
    /// Log origin (checkpoint name).
    pub origin: String,
    /// Offline intermediates made by `hsmca ca create`, keys in the same token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cas: Vec<CaEntry>,
}

/// An intermediate CA of this home.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CaEntry {
    /// Name used by profiles' `issuer`.
    pub name: String,
    /// The CA's key in the token.
    pub key: KeyRef,
    /// Its certificate, relative to the home.
    pub cert: String,
    /// Who signed it (`root`).
    pub issuer: String,
}

/// Why a CA home cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// `init` on an existing home.
    #[error("{}: already exists; init never overwrites a CA home", .0.display())]
    Exists(PathBuf),
    /// Not a CA home.
    #[error("{}: not an hsmca CA home (no hsmca.json)", .0.display())]
    Missing(PathBuf),
    /// Bad config.
    #[error("{}: {message}", .path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// File-system failure.
    #[error("{}: I/O error", .path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An opened CA home.
#[derive(Debug, Clone)]
pub struct Home {
    /// The directory.
    pub dir: PathBuf,
    /// Its config.
    pub config: Config,
}

impl Home {
    /// Opens `dir`, reading `hsmca.json` strictly.
    pub fn open(dir: &Path) -> Result<Self, HomeError> {
        let path = dir.join("hsmca.json");
        if !path.is_file() {
            return Err(HomeError::Missing(dir.to_path_buf()));
        }
        let text = std::fs::read_to_string(&path).map_err(io_at(&path))?;
        let config = serde_json::from_str(&text).map_err(|e| HomeError::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
        })
    }

    /// The profiles directory.
    pub fn profiles_dir(&self) -> PathBuf {
        self.dir.join("profiles")
    }

    /// The root certificate.
    pub fn root(&self) -> Result<IssuerCert, Error> {
        let path = self.dir.join("root.pem");
        let bytes = std::fs::read(&path).map_err(io_at(&path))?;
        IssuerCert::from_pem_or_der(&bytes).map_err(|e| {
            Error::Home(HomeError::Config {
                path,
                message: e.to_string(),
            })
        })
    }

    /// The site parameters (`site.json`; the built-in defaults if the home has none).
    pub fn site(&self) -> Result<Site, Error> {
        let path = self.dir.join("site.json");
        if path.exists() {
            Ok(Site::load(&path)?)
        } else {
            Ok(Site::default())
        }
    }

    /// The site parameters and the keys `site.json` sets (none without the file).
    pub fn site_with_origins(&self) -> Result<(Site, std::collections::BTreeSet<String>), Error> {
        let path = self.dir.join("site.json");
        if path.exists() {
            Ok(Site::load_with_origins(&path)?)
        } else {
            Ok((Site::default(), std::collections::BTreeSet::new()))
        }
    }

    /// The issuing CA named by a profile: its certificate and the label of its token key.
    pub fn issuer(&self, name: &str) -> Result<(IssuerCert, String), Error> {
        if name == "root" {
            return Ok((self.root()?, self.config.root_key.label.clone()));
        }
        let ca = self.config.cas.iter().find(|c| c.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.config.cas.iter().map(|c| c.name.as_str()).collect();
            // A complete command: the shipped CA profiles are named after their CA, which a
            // site's cluster_name prefixes (`prod-eu-kubernetes-ca`, CN "prod-eu kubernetes-ca").
            let is_profile = |p: &str| self.profiles_dir().join(format!("{p}.json")).is_file();
            let (profile, cn) = if is_profile(name) {
                (crate::ceremony::quote(name), name.to_owned())
            } else if let Some((cluster, p)) = name
                .match_indices('-')
                .map(|(i, _)| (&name[..i], &name[i + 1..]))
                .find(|(_, p)| is_profile(p))
            {
                (crate::ceremony::quote(p), format!("{cluster} {p}"))
            } else {
                ("CA-PROFILE".to_owned(), name.to_owned())
            };
            Error::Usage(format!(
                "the profile's issuer {name:?} does not exist in this CA home (known: root{}{}); create it with `hsmca ca create {n} --home {home} --profile {profile} --subject {subject}`",
                if known.is_empty() { "" } else { ", " },
                known.join(", "),
                n = crate::ceremony::quote(name),
                home = crate::ceremony::quote(&self.dir.display().to_string()),
                subject = crate::ceremony::quote(&format!("CN={cn}")),
            ))
        })?;
        let path = self.dir.join(&ca.cert);
        let bytes = std::fs::read(&path).map_err(io_at(&path))?;
        let cert = IssuerCert::from_pem_or_der(&bytes).map_err(|e| {
            Error::Home(HomeError::Config {
                path,
                message: e.to_string(),
            })
        })?;
        Ok((cert, ca.key.label.clone()))
    }

    /// PEM of the issuing CA and every CA above it up to the root, for `--chain`.
    pub fn chain_pem(&self, name: &str) -> Result<String, Error> {
        let mut out = String::new();
        let mut current = name.to_owned();
        for _ in 0..8 {
            let (cert, _) = self.issuer(&current)?;
            out.push_str(&pem("CERTIFICATE", &cert.der));
            if current == "root" {
                return Ok(out);
            }
            current = self
                .config
                .cas
                .iter()
                .find(|c| c.name == current)
                .map_or_else(|| "root".into(), |c| c.issuer.clone());
        }
        Err(Error::Internal("CA chain longer than 8".into()))
    }

    /// Loads a profile by name.
    pub fn profile(&self, name: &str) -> Result<Profile, Error> {
        Ok(Profile::load_named(
            &self.profiles_dir(),
            name,
            &self.site()?,
        )?)
    }
}
