//! The CA home and the three jobs on it: `init` (the root key ceremony), `sign` and `check`.
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

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, rfc3339};
use crate::csr::{self, VerifiedCsr};
use crate::error::Error;
use crate::files::{self, Written};
use crate::issue::{self, IssuerCert, RootSpec};
use crate::keys::{self, KeyType};
use crate::log::translog::{self, NoteKey};
use crate::log::{Body, Log};
use crate::pin::Pin;
use crate::policy::{self, Context, Decision, Refusal};
use crate::profile::{Duration, Profile, Site};
use crate::signer::CaSigner;
use crate::token::{Token, TokenKey, TokenRef};

/// The shipped profiles, compiled in so `init` needs nothing beside the binary.
pub const SHIPPED_PROFILES: [(&str, &str); 20] = [
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
    (
        "test-any-key",
        include_str!("../profiles/test-any-key.json"),
    ),
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

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
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

    /// The issuing CA named by a profile: its certificate and the label of its token key.
    pub fn issuer(&self, name: &str) -> Result<(IssuerCert, String), Error> {
        if name == "root" {
            return Ok((self.root()?, self.config.root_key.label.clone()));
        }
        let ca = self.config.cas.iter().find(|c| c.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.config.cas.iter().map(|c| c.name.as_str()).collect();
            Error::Usage(format!(
                "the profile's issuer {name:?} does not exist in this CA home (known: root{}{}); create it with `hsmca ca create {name}`",
                if known.is_empty() { "" } else { ", " },
                known.join(", ")
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

/// What `init` needs.
#[derive(Debug, Clone)]
pub struct InitRequest {
    /// The new CA home.
    pub home: PathBuf,
    /// The PKCS#11 module.
    pub module: PathBuf,
    /// Whether the module was named explicitly (then it is recorded in the config).
    pub record_module: bool,
    /// Which token.
    pub token: TokenRef,
    /// Root key type.
    pub key_type: KeyType,
    /// Root subject, `CN=...,O=...`.
    pub subject: String,
    /// Root lifetime.
    pub validity: Duration,
    /// Root key label.
    pub key_label: String,
    /// Log key type; `None` picks Ed25519 where the token has CKM_EDDSA, else ECDSA P-256.
    pub log_key_type: Option<KeyType>,
    /// Log origin; `None` derives one from the root key.
    pub origin: Option<String>,
    /// Profiles to install instead of the shipped ones.
    pub profiles_from: Option<PathBuf>,
    /// Site parameters the profiles refer to.
    pub site: Site,
}

/// What `init` made.
#[derive(Debug, Clone, Serialize)]
pub struct InitReport {
    /// The CA home.
    pub home: PathBuf,
    /// Root subject.
    pub subject: String,
    /// Root serial, hex.
    pub serial: String,
    /// Root notAfter.
    pub not_after: String,
    /// Root key type.
    pub key_type: KeyType,
    /// SHA-256 of the root certificate (record it in the ceremony minutes).
    pub cert_sha256: String,
    /// Log key type.
    pub log_key_type: KeyType,
    /// Checkpoint verifier key (record it in the ceremony minutes).
    pub log_vkey: String,
    /// Installed profiles.
    pub profiles: Vec<String>,
}

/// Random positive serial from the token: 16 bytes (127 bits of entropy), top bit clear and
/// first byte non-zero so the DER INTEGER is exactly 16 bytes.
fn serial(token: &Token) -> Result<Vec<u8>, Error> {
    let mut s = token.random(16)?;
    s[0] = (s[0] & 0x7f) | 0x01;
    Ok(s)
}

/// The root key ceremony: keys in the token, self-signed root, the CA home with its log.
/// The home is built in a temporary directory beside it and renamed into place at the end,
/// so a crash never leaves a half-made home.
pub fn init(req: &InitRequest, pin: &Pin, clock: &dyn Clock) -> Result<InitReport, Error> {
    if req.home.exists() {
        return Err(HomeError::Exists(req.home.clone()).into());
    }
    let name = req
        .home
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "ca".into());
    let parent = match req.home.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_at(&parent))?;
    // Profiles are read before the token is touched: a bad one must not cost a key.
    let profiles = collect_profiles(req.profiles_from.as_deref(), &req.site)?;
    let token = Token::open(&req.module, &req.token, pin)?;
    let log_type = match req.log_key_type {
        Some(t) => t,
        None if token.supports(cryptoki::mechanism::MechanismType::EDDSA) => KeyType::Ed25519,
        None => KeyType::EcdsaP256,
    };
    if !matches!(log_type, KeyType::Ed25519 | KeyType::EcdsaP256) {
        return Err(Error::Usage(format!(
            "--log-key-type {log_type} cannot sign checkpoints; use ed25519 or ecdsa-p256"
        )));
    }
    let log_label = format!("{}-log", req.key_label);
    let root_id = token.random(8)?;
    let log_id = token.random(8)?;
    let root_public = token.generate_key_pair(req.key_type, &req.key_label, &root_id)?;
    let log_public = token.generate_key_pair(log_type, &log_label, &log_id)?;
    let root_key = token.key_matching(&req.key_label, &root_public)?;
    let log_key = token.key_matching(&log_label, &log_public)?;

    let now = clock.now();
    let spec = RootSpec {
        subject: req.subject.clone(),
        serial: serial(&token)?,
        not_before: now - policy::BACKDATE,
        not_after: now + req.validity.to_time(),
    };
    let root_der = issue::self_signed_root(&spec, &root_key)?;
    let origin = match &req.origin {
        Some(o) => o.clone(),
        None => format!("hsmca/{}", &root_public.fingerprint()[..16]),
    };
    let vkey = translog::vkey(&origin, &log_public).map_err(Error::Usage)?;
    let note_key = NoteKey::new(&origin, &log_key).map_err(Error::Usage)?;

    let tmp = parent.join(format!(".{name}.init-{}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(io_at(&tmp))?;
    let config = Config {
        version: 1,
        module: req.record_module.then(|| req.module.clone()),
        token: token.label().to_owned(),
        root_key: KeyRef {
            label: req.key_label.clone(),
            id: keys::hex(&root_id),
            key_type: req.key_type,
        },
        log_key: KeyRef {
            label: log_label,
            id: keys::hex(&log_id),
            key_type: log_type,
        },
        origin: origin.clone(),
        cas: Vec::new(),
    };
    let write = |rel: &str, bytes: &[u8]| -> Result<(), Error> {
        files::write_new(&tmp.join(rel), bytes)?;
        Ok(())
    };
    let config_json =
        serde_json::to_vec_pretty(&config).map_err(|e| Error::Internal(e.to_string()))?;
    write("hsmca.json", &config_json)?;
    write("root.pem", pem("CERTIFICATE", &root_der).as_bytes())?;
    let site_json =
        serde_json::to_vec_pretty(&req.site).map_err(|e| Error::Internal(e.to_string()))?;
    write("site.json", &site_json)?;
    for (n, text) in &profiles {
        write(&format!("profiles/{n}.json"), text.as_bytes())?;
    }
    let root_entry = Body::Root {
        subject: req.subject.clone(),
        serial: keys::hex(&spec.serial),
        key_type: req.key_type.name().into(),
        key_label: req.key_label.clone(),
        spki_sha256: root_public.fingerprint(),
        cert_sha256: keys::sha256_hex(&root_der),
        cert: B64.encode(&root_der),
        origin,
        log_vkey: vkey.clone(),
        tool: format!("hsmca {}", env!("CARGO_PKG_VERSION")),
    };
    drop(Log::create(&tmp, root_entry, now, &note_key)?);
    std::fs::rename(&tmp, &req.home).map_err(io_at(&req.home))?;
    files::sync_dir(&parent)?;
    Ok(InitReport {
        home: req.home.clone(),
        subject: req.subject.clone(),
        serial: keys::hex(&spec.serial),
        not_after: rfc3339(spec.not_after),
        key_type: req.key_type,
        cert_sha256: keys::sha256_hex(&root_der),
        log_key_type: log_type,
        log_vkey: vkey,
        profiles: profiles.into_iter().map(|(n, _)| n).collect(),
    })
}

fn collect_profiles(from: Option<&Path>, site: &Site) -> Result<Vec<(String, String)>, Error> {
    let list: Vec<(String, String)> = match from {
        None => SHIPPED_PROFILES
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect(),
        Some(dir) => crate::profile::list(dir)
            .into_iter()
            .map(|n| {
                let path = dir.join(format!("{n}.json"));
                std::fs::read_to_string(&path)
                    .map(|t| (n, t))
                    .map_err(|e| HomeError::Io { path, source: e })
            })
            .collect::<Result<_, _>>()?,
    };
    // Check every profile loads before anything is created.
    for (n, t) in &list {
        Profile::parse(t, Path::new(&format!("{n}.json")), n, site)?;
    }
    Ok(list)
}

/// PEM-encodes DER.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// What `sign` and `check` are asked to do.
#[derive(Debug, Clone)]
pub struct SignRequest {
    /// Profile name.
    pub profile: String,
    /// CSR files.
    pub csrs: Vec<PathBuf>,
    /// Output file (one CSR) or directory (several); default: beside each CSR.
    pub out: Option<PathBuf>,
    /// Append the root to each certificate file.
    pub chain: bool,
    /// Requested validity.
    pub validity: Option<Duration>,
}

/// The certificate that was (or would be) issued, for reports.
#[derive(Debug, Clone, Serialize)]
pub struct CertSummary {
    /// Profile.
    pub profile: String,
    /// Serial, hex (all zeros in `check`).
    pub serial: String,
    /// Subject.
    pub subject: String,
    /// SANs.
    pub sans: Vec<String>,
    /// keyUsage.
    pub key_usage: Vec<String>,
    /// extKeyUsage.
    pub extended_key_usage: Vec<String>,
    /// notBefore.
    pub not_before: String,
    /// notAfter.
    pub not_after: String,
    /// Subject key type.
    pub key_type: KeyType,
    /// Issuer subject.
    pub issuer: String,
}

/// What happened to one CSR.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// Issued now (or earlier, and written out again).
    Issued {
        /// The CSR file.
        csr: PathBuf,
        /// The certificate.
        cert: CertSummary,
        /// Where it was written.
        file: PathBuf,
        /// Log entry of the certificate.
        log_entry: u64,
        /// Issued by an earlier run; this run only wrote the file.
        already_issued: bool,
    },
    /// `check`: would be issued.
    WouldIssue {
        /// The CSR file.
        csr: PathBuf,
        /// The certificate.
        cert: CertSummary,
    },
    /// Refused by the profile.
    Refused {
        /// The CSR file.
        csr: PathBuf,
        /// Every violated rule.
        refusals: Vec<Refusal>,
    },
    /// Unreadable, malformed or failed proof of possession, or failed to sign.
    Failed {
        /// The CSR file.
        csr: PathBuf,
        /// Stable rule id (`csr.signature`, `key.rsa_size`, ...).
        rule: String,
        /// What went wrong.
        error: String,
    },
}

impl Outcome {
    /// Whether this CSR got (or would get) a certificate.
    pub fn ok(&self) -> bool {
        matches!(self, Self::Issued { .. } | Self::WouldIssue { .. })
    }
}

pub(crate) fn summary(d: &Decision, issuer: &str) -> CertSummary {
    CertSummary {
        profile: d.profile.clone(),
        serial: keys::hex(&d.serial),
        subject: d.subject_string(),
        sans: d.san_strings(),
        key_usage: d.key_usage.iter().map(|u| u.name().to_owned()).collect(),
        extended_key_usage: d
            .extended_key_usage
            .iter()
            .map(|e| e.name().to_owned())
            .collect(),
        not_before: rfc3339(d.not_before),
        not_after: rfc3339(d.not_after),
        key_type: d.public_key.key_type,
        issuer: issuer.to_owned(),
    }
}

pub(crate) fn issuer_name(root: &IssuerCert) -> String {
    use x509_cert::der::Decode;
    x509_cert::Certificate::from_der(&root.der)
        .map(|c| c.tbs_certificate().subject().to_string())
        .unwrap_or_default()
}

fn load_csr(path: &Path) -> Result<VerifiedCsr, (String, String)> {
    csr::load(path).map_err(|e| match e {
        csr::CsrLoadError::Read(e) => (e.rule().to_owned(), crate::error::chain(&e)),
        csr::CsrLoadError::Csr(c) => (c.rule().to_owned(), c.to_string()),
    })
}

/// `hsmca check`: the decision for each CSR, without the token, the PIN or the lock.
pub fn check(home: &Home, req: &SignRequest, clock: &dyn Clock) -> Result<Vec<Outcome>, Error> {
    let profile = home.profile(&req.profile)?;
    let root = home.root()?;
    let issuer = issuer_name(&root);
    let ctx = Context {
        now: clock.now(),
        serial: vec![0; 16],
        requested_validity: req.validity,
        issuer_not_after: root.not_after,
    };
    Ok(req
        .csrs
        .iter()
        .map(|path| match load_csr(path) {
            Err((rule, error)) => Outcome::Failed {
                csr: path.clone(),
                rule,
                error,
            },
            Ok(c) => match policy::decide(&profile, &c, &ctx) {
                Ok(d) => Outcome::WouldIssue {
                    csr: path.clone(),
                    cert: summary(&d, &issuer),
                },
                Err(refusals) => Outcome::Refused {
                    csr: path.clone(),
                    refusals,
                },
            },
        })
        .collect())
}

fn out_path(req: &SignRequest, csr: &Path) -> PathBuf {
    let stem = csr
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cert".into());
    match &req.out {
        Some(out) if req.csrs.len() == 1 && !out.is_dir() => out.clone(),
        Some(dir) => dir.join(format!("{stem}.crt")),
        None => csr.with_file_name(format!("{stem}.crt")),
    }
}

/// `hsmca sign`: decide, log the intent, sign in the token, verify, log the result, checkpoint,
/// and only then write the certificates. A refused or broken CSR is reported and the rest are
/// signed. A CSR already issued under this profile gets its logged certificate written again.
pub fn sign(
    home: &Home,
    req: &SignRequest,
    token: &Token,
    clock: &dyn Clock,
) -> Result<Vec<Outcome>, Error> {
    let profile = home.profile(&req.profile)?;
    if profile.ca.is_some() {
        return Err(Error::Usage(format!(
            "profile {:?} makes CA certificates; use `hsmca ca create` so the CA key is generated in the token",
            profile.name
        )));
    }
    let (issuer_cert, issuer_label) = home.issuer(&profile.issuer)?;
    let issuer = issuer_name(&issuer_cert);
    let log_key = token.key(&home.config.log_key.label)?;
    let (mut log, note_key) = open_log(home, &log_key, clock)?;
    let ca_key = token.key_matching(&issuer_label, &issuer_cert.public_key)?;

    let mut outcomes = Vec::new();
    let mut release: Vec<(usize, Vec<u8>)> = Vec::new();
    for path in &req.csrs {
        let csr = match load_csr(path) {
            Ok(c) => c,
            Err((rule, error)) => {
                outcomes.push(Outcome::Failed {
                    csr: path.clone(),
                    rule,
                    error,
                });
                continue;
            }
        };
        if let Some(done) = log.issued(&csr.sha256, &profile.name)? {
            let summary = CertSummary {
                serial: done.serial.clone(),
                ..reissued_summary(&done.cert_der, &profile.name, &issuer)
            };
            release.push((outcomes.len(), done.cert_der));
            outcomes.push(Outcome::Issued {
                csr: path.clone(),
                cert: summary,
                file: out_path(req, path),
                log_entry: done.seq,
                already_issued: true,
            });
            continue;
        }
        let ctx = Context {
            now: clock.now(),
            serial: fresh_serial(token, &log)?,
            requested_validity: req.validity,
            issuer_not_after: issuer_cert.not_after,
        };
        let decision = match policy::decide(&profile, &csr, &ctx) {
            Ok(d) => d,
            Err(refusals) => {
                outcomes.push(Outcome::Refused {
                    csr: path.clone(),
                    refusals,
                });
                continue;
            }
        };
        let cert = summary(&decision, &issuer);
        match issue_logged(
            &mut log,
            decision,
            &issuer_cert,
            &ca_key,
            &csr.sha256,
            None,
            clock,
        )? {
            Ok((seq, der)) => {
                release.push((outcomes.len(), der));
                outcomes.push(Outcome::Issued {
                    csr: path.clone(),
                    cert,
                    file: out_path(req, path),
                    log_entry: seq,
                    already_issued: false,
                });
            }
            Err(e) => {
                if matches!(e, issue::IssueError::Verify(_)) {
                    log.checkpoint(&note_key)?;
                    return Err(e.into());
                }
                outcomes.push(Outcome::Failed {
                    csr: path.clone(),
                    rule: "token.sign".into(),
                    error: crate::error::chain(&e),
                });
            }
        }
    }
    log.checkpoint(&note_key)?;
    danger_crash_point("after-checkpoint");

    // Every certificate below is durable in the log and covered by a signed checkpoint.
    let chain = home.chain_pem(&profile.issuer)?;
    for (i, der) in release {
        let Outcome::Issued { file, .. } = &outcomes[i] else {
            continue;
        };
        let mut text = pem("CERTIFICATE", &der);
        if req.chain {
            text.push_str(&chain);
        }
        let file = file.clone();
        match files::write_new(&file, text.as_bytes()) {
            Ok(Written::Created | Written::AlreadyPresent) => {}
            Err(e) => {
                let csr = match &outcomes[i] {
                    Outcome::Issued { csr, .. } => csr.clone(),
                    _ => PathBuf::new(),
                };
                outcomes[i] = Outcome::Failed {
                    csr,
                    rule: "output.write".into(),
                    error: format!(
                        "issued and logged, but {e}; rerun to write it elsewhere with --out"
                    ),
                };
            }
        }
    }
    Ok(outcomes)
}

/// A summary read back from a logged certificate (for CSRs issued by an earlier run).
fn reissued_summary(der: &[u8], profile: &str, issuer: &str) -> CertSummary {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok();
    let tbs = cert.as_ref().map(|c| c.tbs_certificate());
    let key_type = tbs
        .and_then(|t| keys::PublicKey::from_spki(t.subject_public_key_info()).ok())
        .map_or(KeyType::EcdsaP256, |k| k.key_type);
    let time = |t: Option<&x509_cert::time::Time>| {
        t.and_then(|t| {
            time::OffsetDateTime::from_unix_timestamp(
                i64::try_from(t.to_unix_duration().as_secs()).ok()?,
            )
            .ok()
        })
        .map(rfc3339)
        .unwrap_or_default()
    };
    CertSummary {
        profile: profile.to_owned(),
        serial: String::new(),
        subject: tbs.map(|t| t.subject().to_string()).unwrap_or_default(),
        sans: Vec::new(),
        key_usage: Vec::new(),
        extended_key_usage: Vec::new(),
        not_before: time(tbs.map(|t| &t.validity().not_before)),
        not_after: time(tbs.map(|t| &t.validity().not_after)),
        key_type,
        issuer: issuer.to_owned(),
    }
}

/// Opens the log for appending with the token's log key, after checking that both the root
/// and the log key are the ones recorded in the log, and closes intents a crashed run left
/// open (nothing was released for them).
pub(crate) fn open_log<'k>(
    home: &Home,
    log_key: &'k TokenKey<'_>,
    clock: &dyn Clock,
) -> Result<(Log, NoteKey<'k>), Error> {
    let root = home.root()?;
    let mut log = Log::open(&home.dir)?;
    let mismatch = |file: &str, message: &str| {
        Error::Home(HomeError::Config {
            path: home.dir.join(file),
            message: message.into(),
        })
    };
    if log.root().cert_der != root.der {
        return Err(mismatch("root.pem", "is not the root recorded in the log"));
    }
    let vkey = translog::vkey(&home.config.origin, log_key.public_key()).map_err(Error::Usage)?;
    if vkey != log.root().vkey {
        return Err(mismatch(
            "hsmca.json",
            "the token's log key is not the one recorded in the log",
        ));
    }
    let note_key = NoteKey::new(&home.config.origin, log_key).map_err(Error::Usage)?;
    let open = log.open_intents();
    if !open.is_empty() {
        let reason = "a previous run stopped before logging the result; nothing was released";
        let bodies = open
            .into_iter()
            .map(|intent_seq| Body::Abandon {
                intent_seq,
                reason: reason.into(),
            })
            .collect();
        log.append(bodies, clock.now())?;
    }
    Ok((log, note_key))
}

/// A serial from the token that the log has never used.
pub(crate) fn fresh_serial(token: &Token, log: &Log) -> Result<Vec<u8>, Error> {
    loop {
        let s = serial(token)?;
        if !log.serial_used(&keys::hex(&s)) {
            return Ok(s);
        }
    }
}

/// `n` serials from one call to the token's RNG, unique in the log and among themselves.
pub(crate) fn fresh_serials(token: &Token, log: &Log, n: usize) -> Result<Vec<Vec<u8>>, Error> {
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::new();
    while out.len() < n {
        let bytes = token.random(16 * (n - out.len()))?;
        for chunk in bytes.chunks(16) {
            let mut s = chunk.to_vec();
            s[0] = (s[0] & 0x7f) | 0x01;
            if !log.serial_used(&keys::hex(&s)) && seen.insert(s.clone()) {
                out.push(s);
            }
        }
    }
    Ok(out)
}

/// Intent (durable) → token signs → verify → certificate entry (durable). A signing or
/// verification failure is logged as an abandoned intent and returned in the inner result.
pub(crate) fn issue_logged(
    log: &mut Log,
    decision: Decision,
    issuer: &IssuerCert,
    key: &dyn CaSigner,
    csr_sha256: &str,
    renews: Option<&str>,
    clock: &dyn Clock,
) -> Result<Result<(u64, Vec<u8>), issue::IssueError>, Error> {
    let prepared = issue::prepare(decision, issuer)?;
    let d = &prepared.decision;
    let serial_hex = keys::hex(&d.serial);
    let intent = Body::IssueIntent {
        serial: serial_hex.clone(),
        profile: d.profile.clone(),
        subject: d.subject_string(),
        sans: d.san_strings(),
        not_before: rfc3339(d.not_before),
        not_after: rfc3339(d.not_after),
        csr_sha256: csr_sha256.to_owned(),
        tbs_sha256: prepared.tbs_sha256.clone(),
        renews: renews.map(str::to_owned),
    };
    let intent_seq = log.append(vec![intent], clock.now())?[0];
    danger_crash_point("after-intent");
    match issue::sign(&prepared, issuer, key) {
        Ok(der) => {
            let cert = Body::Cert {
                intent_seq,
                serial: serial_hex,
                profile: d.profile.clone(),
                csr_sha256: csr_sha256.to_owned(),
                cert_sha256: keys::sha256_hex(&der),
                cert: B64.encode(&der),
            };
            let seq = log.append(vec![cert], clock.now())?[0];
            danger_crash_point("after-cert");
            Ok(Ok((seq, der)))
        }
        Err(e) => {
            let reason = format!("not released: {e}");
            log.append(vec![Body::Abandon { intent_seq, reason }], clock.now())?;
            Ok(Err(e))
        }
    }
}

/// Test hook for crash tests: `HSMCA_DANGER_CRASH_AT=after-intent|after-cert|after-checkpoint`
/// aborts the process at that point, as a kill -9 or power cut would. Never set it in
/// production; it exists so the suite can prove that a rerun finishes without issuing twice.
pub(crate) fn danger_crash_point(name: &str) {
    if std::env::var("HSMCA_DANGER_CRASH_AT").is_ok_and(|v| v == name) {
        std::process::abort();
    }
}

/// What `hsmca ca create` needs.
#[derive(Debug, Clone)]
pub struct CaRequest {
    /// Name profiles use in `issuer` (e.g. `kubernetes-ca`).
    pub name: String,
    /// A CA profile (one with `"ca"`).
    pub profile: String,
    /// Subject, `CN=...,O=...`.
    pub subject: String,
    /// Key type of the new CA key.
    pub key_type: KeyType,
    /// Requested validity.
    pub validity: Option<Duration>,
}

/// What `hsmca ca create` made.
#[derive(Debug, Clone, Serialize)]
pub struct CaReport {
    /// CA name.
    pub name: String,
    /// The certificate.
    pub cert: CertSummary,
    /// Where it was written.
    pub file: PathBuf,
    /// Log entry of the certificate.
    pub log_entry: u64,
    /// Label of its key in the token.
    pub key_label: String,
}

/// `hsmca ca create`: an offline intermediate whose key is generated in the same token, signed
/// by the profile's issuer (the root) under the CA profile, logged like any issuance, and added
/// to the CA home so profiles can name it as their `issuer`.
pub fn create_ca(
    home: &Home,
    req: &CaRequest,
    token: &Token,
    clock: &dyn Clock,
) -> Result<CaReport, Error> {
    let valid = !req.name.is_empty()
        && req.name != "root"
        && req
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(Error::Usage(format!(
            "CA name {:?}: use letters, digits, '-' or '_' (not \"root\")",
            req.name
        )));
    }
    if home.config.cas.iter().any(|c| c.name == req.name) {
        return Err(Error::Usage(format!(
            "this CA home already has a CA named {:?}",
            req.name
        )));
    }
    let profile = home.profile(&req.profile)?;
    if profile.ca.is_none() {
        return Err(Error::Usage(format!(
            "profile {:?} is not a CA profile (it has no \"ca\" section)",
            profile.name
        )));
    }
    let subject = issue::subject_pairs(&req.subject)?;
    let (issuer_cert, issuer_label) = home.issuer(&profile.issuer)?;
    let issuer = issuer_name(&issuer_cert);
    let log_key = token.key(&home.config.log_key.label)?;
    let (mut log, note_key) = open_log(home, &log_key, clock)?;
    let issuer_key = token.key_matching(&issuer_label, &issuer_cert.public_key)?;

    // The proposed certificate is judged by the profile exactly like a CSR would be, before
    // a key is made.
    let mut proposal = VerifiedCsr {
        sha256: String::new(),
        public_key: keys::PublicKey {
            key_type: req.key_type,
            spki_der: Vec::new(),
            raw: Vec::new(),
        },
        subject,
        sans: Vec::new(),
        extensions: Vec::new(),
        other_attributes: Vec::new(),
        signature_algorithm: "key generated in the token",
        der: Vec::new(),
    };
    let mut ctx = Context {
        now: clock.now(),
        serial: vec![0; 16],
        requested_validity: req.validity,
        issuer_not_after: issuer_cert.not_after,
    };
    if let Err(refusals) = policy::decide(&profile, &proposal, &ctx) {
        let list: Vec<String> = refusals.iter().map(ToString::to_string).collect();
        return Err(Error::Usage(format!(
            "refused by profile {:?}: {}",
            profile.name,
            list.join("; ")
        )));
    }
    let label = format!("{}-{}", home.config.root_key.label, req.name);
    let id = token.random(8)?;
    let public = token.generate_key_pair(req.key_type, &label, &id)?;
    proposal.sha256 = public.fingerprint();
    proposal.public_key = public;
    ctx.serial = fresh_serial(token, &log)?;
    let decision =
        policy::decide(&profile, &proposal, &ctx).map_err(|r| Error::Internal(format!("{r:?}")))?;
    let cert = summary(&decision, &issuer);
    let (seq, der) = issue_logged(
        &mut log,
        decision,
        &issuer_cert,
        &issuer_key,
        &proposal.sha256,
        None,
        clock,
    )??;
    log.checkpoint(&note_key)?;

    let rel = format!("cas/{}.pem", req.name);
    let file = home.dir.join(&rel);
    files::write_new(&file, pem("CERTIFICATE", &der).as_bytes())?;
    let mut config = home.config.clone();
    config.cas.push(CaEntry {
        name: req.name.clone(),
        key: KeyRef {
            label: label.clone(),
            id: keys::hex(&id),
            key_type: req.key_type,
        },
        cert: rel,
        issuer: profile.issuer.clone(),
    });
    let json = serde_json::to_vec_pretty(&config).map_err(|e| Error::Internal(e.to_string()))?;
    files::replace(&home.dir.join("hsmca.json"), &json)?;
    Ok(CaReport {
        name: req.name.clone(),
        cert,
        file,
        log_entry: seq,
        key_label: label,
    })
}
