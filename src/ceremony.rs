//! Key ceremonies: `init` (the root key and the CA home with its log) and `ca create` (an
//! offline intermediate whose key is generated in the same token and whose certificate is
//! issued through the engine, like any other).

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;

use crate::clock::{Clock, rfc3339};
use crate::csr::{AttrType, VerifiedCsr};
use crate::engine::{self, CaSession, CertSummary, EngineError, Ready};
use crate::error::Error;
use crate::files;
use crate::home::{CaEntry, Config, Home, HomeError, KeyRef, SHIPPED_PROFILES, io_at};
use crate::issue::{self, RootSpec};
use crate::keys::{self, KeyType};
use crate::log::translog::{self, NoteKey};
use crate::log::{Body, Log};
use crate::pin::Pin;
use crate::pinned::{self, ModuleFile};
use crate::policy::{self, Context, Purpose};
use crate::profile::{Duration, Profile, Site};
use crate::signer::Keystore;
use crate::token::{Token, TokenRef};

/// What `init` needs.
#[derive(Debug, Clone)]
pub struct InitRequest {
    /// The new CA home.
    pub home: PathBuf,
    /// The PKCS#11 module, hashed before it was loaded; pinned in the log.
    pub module: ModuleFile,
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
fn serial(token: &dyn Keystore) -> Result<Vec<u8>, Error> {
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
    let token = Token::open(&req.module.path, &req.token, pin)?;
    let log_type = match req.log_key_type {
        Some(t) => t,
        None if token.supports(cryptoki::mechanism::MechanismType::EDDSA) => KeyType::Ed25519,
        None => KeyType::EcdsaP256,
    };
    let place = Place {
        parent,
        name,
        token: token.label().to_owned(),
        log_type,
    };
    init_with(req, &place, &profiles, &token, clock)
}

/// Where `init` builds the home, and what it learnt from the token before making keys.
pub struct Place {
    /// The directory the home is made in.
    pub parent: PathBuf,
    /// The home's own name.
    pub name: String,
    /// The token's label.
    pub token: String,
    /// The log key's type.
    pub log_type: KeyType,
}

/// The root key ceremony on any [`Keystore`] (tests use software keys): keys, self-signed root,
/// the CA home with its log, made beside it and renamed into place.
pub fn init_with(
    req: &InitRequest,
    place: &Place,
    profiles: &[(String, String)],
    token: &dyn Keystore,
    clock: &dyn Clock,
) -> Result<InitReport, Error> {
    let (parent, name, log_type) = (&place.parent, &place.name, place.log_type);
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
    // The token keeps the log head under this label (see `engine::head_label`).
    let head_label = format!("{log_label}-head");
    if !token.log_head(&head_label)?.is_empty() {
        return Err(crate::token::TokenError::KeyExists {
            token: place.token.clone(),
            key: head_label,
        }
        .into());
    }
    let root_key = token.key_matching(&req.key_label, &root_public)?;
    let log_key = token.key_matching(&log_label, &log_public)?;
    let (root_key, log_key) = (&*root_key, &*log_key);

    let now = clock.now();
    let spec = RootSpec {
        subject: req.subject.clone(),
        serial: serial(token)?,
        not_before: now - policy::BACKDATE,
        not_after: now.checked_add(req.validity.to_time()).ok_or_else(|| {
            Error::Usage(format!(
                "--validity {} is past the end of time",
                req.validity
            ))
        })?,
    };
    let root_der = issue::self_signed_root(&spec, root_key)?;
    let origin = match &req.origin {
        Some(o) => o.clone(),
        None => format!("hsmca/{}", &root_public.fingerprint()[..16]),
    };
    let vkey = translog::vkey(&origin, &log_public).map_err(Error::Usage)?;
    let note_key = NoteKey::new(&origin, log_key).map_err(Error::Usage)?;

    let tmp = parent.join(format!(".{name}.init-{}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(io_at(&tmp))?;
    let config = Config {
        version: 1,
        module: req.record_module.then(|| req.module.path.clone()),
        token: place.token.clone(),
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
    write("root.pem", engine::pem("CERTIFICATE", &root_der).as_bytes())?;
    let site_json =
        serde_json::to_vec_pretty(&req.site).map_err(|e| Error::Internal(e.to_string()))?;
    write("site.json", &site_json)?;
    for (n, text) in profiles {
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
    let mut log = Log::create(&tmp, root_entry, now, &note_key)?;
    // The policy in force and the module, pinned from the first signed checkpoint on; the
    // token keeps that checkpoint as the log head.
    log.append(vec![pinned::policy_entry(&tmp)?, req.module.entry()], now)?;
    log.checkpoint(&note_key)?;
    token.store_log_head(&head_label, &log.latest_checkpoint()?)?;
    drop(log);
    std::fs::rename(&tmp, &req.home).map_err(io_at(&req.home))?;
    files::sync_dir(parent)?;
    Ok(InitReport {
        home: req.home.clone(),
        subject: req.subject.clone(),
        serial: keys::hex(&spec.serial),
        not_after: rfc3339(spec.not_after),
        key_type: req.key_type,
        cert_sha256: keys::sha256_hex(&root_der),
        log_key_type: log_type,
        log_vkey: vkey,
        profiles: profiles.iter().map(|(n, _)| n.clone()).collect(),
    })
}

pub(crate) fn collect_profiles(
    from: Option<&Path>,
    site: &Site,
) -> Result<Vec<(String, String)>, Error> {
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
    keys: &dyn Keystore,
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
    home.profile(&req.profile)?;
    let subject = issue::subject_pairs(&req.subject)?;
    refuse_taken_subject(home, &subject)?;
    let mut session = CaSession::open(home, keys, clock)?;
    let profile = session.profile(&req.profile)?;
    let issuer = session.issuer(&profile.issuer)?;
    let (issuer_cert, issuer_subject) = (issuer.cert.clone(), issuer.subject.clone());

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
        purpose: Purpose::Intermediate,
        kubernetes: None,
        now: clock.now(),
        serial: vec![0; 16],
        requested_validity: req.validity,
        issuer_not_after: issuer_cert.not_after,
        allow_profiles: None,
        compromised: std::sync::Arc::default(),
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
    let id = keys.random(8)?;
    let public = keys.generate_key_pair(req.key_type, &label, &id)?;
    proposal.sha256 = public.fingerprint();
    proposal.public_key = public;
    ctx.serial = session.serial()?;
    let decision =
        policy::decide(&profile, &proposal, &ctx).map_err(|r| Error::Internal(format!("{r:?}")))?;
    let cert = CertSummary::of(&decision, &issuer_subject);
    let ready = Ready::new(decision, &issuer_cert, proposal.sha256.clone(), None)?;
    let issued = session.issue(vec![ready])?;
    if let Some(halt) = issued.halt {
        return Err(EngineError::Halt(halt).into());
    }
    let (seq, der) = match issued.certificates.into_iter().next() {
        Some(engine::Made {
            result: Ok(done), ..
        }) => done,
        Some(engine::Made { result: Err(w), .. }) => return Err(EngineError::Withheld(w).into()),
        None => return Err(Error::Internal("no certificate from the engine".into())),
    };

    let rel = format!("cas/{}.pem", req.name);
    let file = home.dir.join(&rel);
    files::write_new(&file, engine::pem("CERTIFICATE", &der).as_bytes())?;
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

/// Two CAs may not share a subject: certificates would chain to either, and path building
/// (and `log verify`) could pick the wrong one.
fn refuse_taken_subject(home: &Home, subject: &[(AttrType, String)]) -> Result<(), Error> {
    let mut wanted = subject.to_vec();
    wanted.sort();
    let names =
        std::iter::once("root".to_owned()).chain(home.config.cas.iter().map(|c| c.name.clone()));
    for name in names {
        let (cert, _) = home.issuer(&name)?;
        let Ok(facts) = crate::verify::describe(&cert.der) else {
            continue;
        };
        let mut theirs = facts.subject.clone();
        theirs.sort();
        if theirs == wanted {
            return Err(Error::Usage(format!(
                "CA {name:?} already has the subject {:?}; give the new CA a subject of its own",
                engine::subject_of(&cert)
            )));
        }
    }
    Ok(())
}

/// What `hsmca profiles apply` did.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    /// The policy in force before (none in a CA home made before policies were logged).
    pub previous: Option<String>,
    /// The policy in force now.
    pub policy_sha256: String,
    /// Files changed, added or removed since the previous policy.
    pub changes: Vec<String>,
    /// The new `policy` entry; `None` when nothing changed and nothing was logged.
    pub log_entry: Option<u64>,
}

/// `hsmca profiles apply`: the only way to change what is signed. Checks that every profile
/// loads, logs the CA home's profiles and site parameters as the policy in force, and signs a
/// checkpoint; from then on signing commands accept exactly these files.
pub fn apply(home: &Home, keys: &dyn Keystore, clock: &dyn Clock) -> Result<Applied, Error> {
    let mut session = CaSession::open_unpinned(home, keys, clock)?;
    let entry = pinned::policy_entry(&home.dir)?;
    let Body::Policy {
        policy_sha256,
        files,
        ..
    } = &entry
    else {
        return Err(Error::Internal("policy_entry made another entry".into()));
    };
    let previous = session.log().policy().cloned();
    let changes = match session.log().policy_entry()? {
        Some(before) => pinned::detailed_changes(&before, &entry),
        None => files.keys().map(|f| format!("{f} added")).collect(),
    };
    let mut applied = Applied {
        previous: previous.map(|p| p.sha256),
        policy_sha256: policy_sha256.clone(),
        changes,
        log_entry: None,
    };
    if applied.previous.as_ref() != Some(&applied.policy_sha256) {
        applied.log_entry = session.append(vec![entry])?.first().copied();
        session.checkpoint()?;
    }
    Ok(applied)
}
