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
use crate::policy::{self, Context, Purpose, Refusal};
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
    /// The keys the operator's site file set (the others are defaults), for the report.
    pub site_given: std::collections::BTreeSet<String>,
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
    /// The site parameters in force (all written to HOME/site.json, so a later hsmca with
    /// other defaults cannot change this CA's policy unlogged), each with its origin: `set` in
    /// the `--site` file, or the `default`.
    pub site: Vec<crate::profile::SiteSetting>,
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
    // The module is loaded from a sealed copy of the bytes whose hash init pins.
    let sealed = req.module.seal()?;
    let token = Token::open(&sealed.path(), &req.token, pin)?;
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
        site: req.site.settings(&req.site_given),
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
    /// Requested validity; `None` takes the profile's default, cut to the issuer's notAfter.
    pub validity: Option<Duration>,
    /// Label of the CA key in the token; `None` makes it `ROOTLABEL-NAME`.
    pub key_label: Option<String>,
}

/// What `hsmca ca create` made.
#[derive(Debug, Clone, Serialize)]
pub struct CaReport {
    /// CA name.
    pub name: String,
    /// The certificate.
    pub cert: CertSummary,
    /// SHA-256 of the certificate (record it in the ceremony minutes).
    pub cert_sha256: String,
    /// Where it was written.
    pub file: PathBuf,
    /// Log entry of the certificate.
    pub log_entry: u64,
    /// Label of its key in the token.
    pub key_label: String,
    /// Set when the profile's default validity would have outlived the issuer: notAfter was
    /// cut to the issuer's, this one (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clamped_to_issuer: Option<String>,
    /// Set when this run finished what an earlier, failed run of the same command started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed: Option<Resumed>,
}

/// How a rerun of `ca create` finished an earlier run's work instead of starting afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resumed {
    /// The log already held the certificate, which the earlier run never installed: this run
    /// installed it from the log and signed nothing.
    InstalledFromLog,
    /// The earlier run left its key in the token without a certificate: this run signed one
    /// for that key instead of making another.
    KeyReused,
}

/// Why `ca create` refuses, each with the complete command that gets past it
/// ([`CeremonyError::hint`]). Nothing was signed; a key is made only after every check but
/// the token's own has passed.
#[derive(Debug, thiserror::Error)]
pub enum CeremonyError {
    /// The CA name cannot be a profile's `issuer`.
    #[error("CA name {:?}: use letters, digits, '-' or '_' (not \"root\")", .cmd.name)]
    BadName {
        /// The command as given.
        cmd: CreateCommand,
    },
    /// The home has a CA of that name.
    #[error("this CA home already has a CA named {:?}", .cmd.name)]
    NameTaken {
        /// The command as given.
        cmd: CreateCommand,
    },
    /// Another CA of the home, or a CA certificate in the log, has the subject: certificates
    /// would chain to either, and path building (and `log verify`) could pick the wrong one.
    #[error("{holder} already has the subject {subject:?}; give the new CA a subject of its own")]
    SubjectTaken {
        /// `CA "NAME"`, or the logged certificate's serial.
        holder: String,
        /// The subject.
        subject: String,
        /// The holder is a certificate in the log that the home never installed.
        logged: bool,
        /// The command as given.
        cmd: CreateCommand,
    },
    /// The key label is the root's, the log key's or another CA's.
    #[error("key label {label:?} is the key of {owner} in this CA home")]
    LabelTaken {
        /// The label.
        label: String,
        /// Whose key it is.
        owner: String,
        /// The command as given.
        cmd: CreateCommand,
    },
    /// The profile refuses the proposed certificate.
    #[error("refused by profile {profile:?}: {}", .refusals.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Refused {
        /// The profile.
        profile: String,
        /// Every violated rule.
        refusals: Vec<Refusal>,
        /// The issuer's notAfter.
        issuer_not_after: time::OffsetDateTime,
        /// When the check ran.
        now: time::OffsetDateTime,
        /// The command as given.
        cmd: CreateCommand,
    },
    /// A key pair under the label that neither the log knows nor the token vouches for.
    #[error(
        "the token already holds a key pair labelled {:?} that the issuance log has never seen, and the token does not vouch that it was generated there and never left it (CKA_LOCAL {}, CKA_SENSITIVE {}, CKA_ALWAYS_SENSITIVE {}, CKA_EXTRACTABLE {}, CKA_NEVER_EXTRACTABLE {}); refusing to make it a CA key",
        .cmd.label, .protection.local, .protection.sensitive, .protection.always_sensitive, .protection.extractable, .protection.never_extractable
    )]
    ForeignKey {
        /// What the token says of the key.
        protection: crate::token::KeyProtection,
        /// The command as given.
        cmd: CreateCommand,
    },
    /// The key an earlier run left is of another type than asked for now.
    #[error("key {:?}, left in the token by an earlier `ca create`, is {found}, not {}", .cmd.label, .cmd.key_type)]
    KeyTypeDiffers {
        /// The key's type.
        found: KeyType,
        /// The command as given.
        cmd: CreateCommand,
    },
    /// The log holds a certificate for the key that this command would not install.
    #[error(
        "the log already holds certificate serial {serial} (entry {seq}) for key {:?}, issued under profile {profile:?} with the subject {subject:?}{}",
        .cmd.label, if *.revoked { ", and it is revoked" } else { "" }
    )]
    LoggedDiffers {
        /// Its serial.
        serial: String,
        /// Its log entry.
        seq: u64,
        /// Its profile.
        profile: String,
        /// Its subject.
        subject: String,
        /// Whether it was revoked.
        revoked: bool,
        /// The command as given.
        cmd: CreateCommand,
    },
}

impl CeremonyError {
    /// The next step, as a complete command.
    pub fn hint(&self) -> String {
        match self {
            Self::BadName { cmd } => format!(
                "name the CA as profiles name their issuer, e.g. `{}`",
                cmd.with_name("kubernetes-ca")
            ),
            Self::NameTaken { cmd } => format!(
                "nothing to do if it is the CA you meant (`hsmca profiles list --home {}` shows who uses it); else pick another name: `{}`",
                quote(&cmd.home.display().to_string()),
                cmd.with_name(&format!("{}-2", cmd.name))
            ),
            Self::SubjectTaken { cmd, logged, .. } => {
                let mut other = format!("CN={}", cmd.name);
                if other == cmd.subject {
                    other.push_str("-2");
                }
                let other = cmd.with_subject(&other);
                if *logged {
                    format!(
                        "an earlier `ca create` logged that certificate and stopped before installing it: run it again with the key label it used (`{}` for the default one) to install it, or choose a subject of its own: `{other}`",
                        cmd.with_default_label()
                    )
                } else {
                    format!("choose a subject no CA of this home has, e.g. `{other}`")
                }
            }
            Self::LabelTaken { cmd, .. } => format!(
                "give the new CA's key a label of its own: `{}`",
                cmd.with_label(&format!("{}-{}", cmd.root_label, cmd.name))
            ),
            Self::Refused {
                refusals,
                issuer_not_after,
                now,
                cmd,
                ..
            } => {
                if refusals.iter().any(|r| r.rule == "validity.issuer") {
                    let days = (*issuer_not_after - *now).whole_days();
                    if days < 1 {
                        return "the issuer expires within a day: renew the root (a new `hsmca init`) before making intermediates under it".into();
                    }
                    format!(
                        "a CA cannot outlive its issuer (notAfter {}); ask for at most that: `{}`, or leave --validity out to get the profile's default cut to the issuer's notAfter",
                        rfc3339(*issuer_not_after),
                        cmd.with_validity(&format!("{days}d"))
                    )
                } else {
                    format!(
                        "`hsmca profiles show {} --home {}` lists what the profile allows; change what the rules above name and run `{cmd}`",
                        quote(&cmd.profile),
                        quote(&cmd.home.display().to_string())
                    )
                }
            }
            Self::ForeignKey { cmd, .. } => format!(
                "if you know where that key came from, remove it from the token yourself; or leave it and give the new CA's key another label: `{}`",
                cmd.with_label(&format!("{}-2", cmd.label))
            ),
            Self::KeyTypeDiffers { found, cmd } => format!(
                "finish the earlier run with its key type: `{}`, or make a new key under another label: `{}`",
                cmd.with_key_type(*found),
                cmd.with_label(&format!("{}-2", cmd.label))
            ),
            Self::LoggedDiffers { cmd, .. } => format!(
                "run it as it was first run (profile and subject above) to install that certificate, or make a new key under another label: `{}`",
                cmd.with_label(&format!("{}-2", cmd.label))
            ),
        }
    }
}

/// A `hsmca ca create` command line, for hints: the request as given, with one value changed.
#[derive(Debug, Clone)]
pub struct CreateCommand {
    name: String,
    home: PathBuf,
    profile: String,
    subject: String,
    key_type: KeyType,
    validity: Option<Duration>,
    label: String,
    root_label: String,
    label_given: bool,
}

impl CreateCommand {
    fn of(home: &Home, req: &CaRequest) -> Self {
        let root_label = home.config.root_key.label.clone();
        Self {
            name: req.name.clone(),
            home: home.dir.clone(),
            profile: req.profile.clone(),
            subject: req.subject.clone(),
            key_type: req.key_type,
            validity: req.validity,
            label: req
                .key_label
                .clone()
                .unwrap_or_else(|| format!("{root_label}-{}", req.name)),
            root_label,
            label_given: req.key_label.is_some(),
        }
    }

    fn with_name(&self, name: &str) -> Self {
        let mut c = self.clone();
        c.name = name.into();
        if !c.label_given {
            c.label = format!("{}-{name}", c.root_label);
        }
        c
    }

    fn with_subject(&self, subject: &str) -> Self {
        Self {
            subject: subject.into(),
            ..self.clone()
        }
    }

    fn with_label(&self, label: &str) -> Self {
        Self {
            label: label.into(),
            label_given: true,
            ..self.clone()
        }
    }

    fn with_default_label(&self) -> Self {
        Self {
            label: format!("{}-{}", self.root_label, self.name),
            label_given: false,
            ..self.clone()
        }
    }

    fn with_validity(&self, validity: &str) -> Self {
        Self {
            validity: Duration::parse(validity),
            ..self.clone()
        }
    }

    fn with_key_type(&self, key_type: KeyType) -> Self {
        Self {
            key_type,
            ..self.clone()
        }
    }
}

impl std::fmt::Display for CreateCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "hsmca ca create {} --home {} --profile {} --subject {}",
            quote(&self.name),
            quote(&self.home.display().to_string()),
            quote(&self.profile),
            quote(&self.subject)
        )?;
        if self.key_type != KeyType::EcdsaP256 {
            write!(f, " --key-type {}", self.key_type)?;
        }
        if let Some(v) = self.validity {
            write!(f, " --validity {v}")?;
        }
        if self.label_given {
            write!(f, " --key-label {}", quote(&self.label))?;
        }
        Ok(())
    }
}

/// A word for a POSIX shell: as it is when it has nothing the shell would change, else in
/// single quotes. For hints that are commands to paste.
pub(crate) fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "=,._/:@%+-".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `hsmca ca create`: an offline intermediate whose key is generated in the same token, signed
/// by the profile's issuer (the root) under the CA profile, logged like any issuance, and added
/// to the CA home so profiles can name it as their `issuer`.
///
/// It can be run again after any failure, and finishes the work (the log decides):
/// - a key under the CA's label whose certificate the log holds (the earlier run stopped after
///   logging it): the certificate is installed from the log, nothing is signed;
/// - a key the log has an intent for (the earlier run stopped between the key and the
///   certificate): a certificate is signed for that key;
/// - a key the log has never seen (stopped between generating it and logging the intent): used
///   only if the token vouches it was generated there and never left it
///   ([`crate::token::KeyProtection::generated_here`]); otherwise refused, and `--key-label`
///   picks another label.
pub fn create_ca(
    home: &Home,
    req: &CaRequest,
    keys: &dyn Keystore,
    clock: &dyn Clock,
) -> Result<CaReport, Error> {
    let cmd = CreateCommand::of(home, req);
    let valid = !req.name.is_empty()
        && req.name != "root"
        && req
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(CeremonyError::BadName { cmd }.into());
    }
    if home.config.cas.iter().any(|c| c.name == req.name) {
        return Err(CeremonyError::NameTaken { cmd }.into());
    }
    home.profile(&req.profile)?;
    let subject = issue::subject_pairs(&req.subject)?;
    refuse_taken_subject(home, &subject, &cmd)?;
    refuse_taken_label(home, &cmd)?;
    let label = cmd.label.clone();
    let mut session = CaSession::open(home, keys, clock)?;
    let profile = session.profile(&req.profile)?;
    let issuer = session.issuer(&profile.issuer)?;
    let (issuer_cert, issuer_subject) = (issuer.cert.clone(), issuer.subject.clone());

    // The proposed certificate is judged by the profile exactly like a CSR would be, before
    // a key is made. The profile's default validity is cut to the issuer's notAfter (and the
    // report says so); a validity asked for explicitly is refused if the issuer ends sooner.
    let now = clock.now();
    let mut requested = req.validity;
    let mut clamped_to_issuer = None;
    if req.validity.is_none() && now + profile.validity.default.to_time() > issuer_cert.not_after {
        let left = (issuer_cert.not_after - now).whole_seconds();
        if left > 0 {
            requested = Some(Duration(left.unsigned_abs()));
            clamped_to_issuer = Some(rfc3339(issuer_cert.not_after));
        }
    }
    let mut proposal = VerifiedCsr {
        sha256: String::new(),
        public_key: keys::PublicKey {
            key_type: req.key_type,
            spki_der: Vec::new(),
            raw: Vec::new(),
        },
        subject: subject.clone(),
        sans: Vec::new(),
        extensions: Vec::new(),
        other_attributes: Vec::new(),
        signature_algorithm: "key generated in the token",
        der: Vec::new(),
    };
    let mut ctx = Context {
        purpose: Purpose::Intermediate,
        kubernetes: None,
        now,
        serial: vec![0; 16],
        requested_validity: requested,
        issuer_not_after: issuer_cert.not_after,
        allow_profiles: None,
        compromised: std::sync::Arc::default(),
    };
    if let Err(refusals) = policy::decide(&profile, &proposal, &ctx) {
        return Err(CeremonyError::Refused {
            profile: profile.name.clone(),
            refusals,
            issuer_not_after: issuer_cert.not_after,
            now,
            cmd,
        }
        .into());
    }

    // The key: the one an earlier run of this command left in the token, or a new one.
    // Only CA certificates: a CA key's certificate, and the subjects two CAs may not share.
    let logged = session.log().ca_records()?;
    let (public, id, resumed) = match keys.existing(&label)? {
        None => {
            refuse_logged_subject(&logged, &subject, None, &cmd)?;
            let id = keys.random(8)?;
            (keys.generate_key_pair(req.key_type, &label, &id)?, id, None)
        }
        Some(found) => {
            if found.public.key_type != req.key_type {
                return Err(CeremonyError::KeyTypeDiffers {
                    found: found.public.key_type,
                    cmd,
                }
                .into());
            }
            let fingerprint = found.public.fingerprint();
            if let Some(record) = logged.iter().rev().find(|r| r.csr_sha256 == fingerprint) {
                return install_from_log(
                    &mut session,
                    req,
                    &cmd,
                    Installed {
                        profile: &profile,
                        subject: &subject,
                        issuer_subject: &issuer_subject,
                        id: &found.id,
                    },
                    record,
                );
            }
            refuse_logged_subject(&logged, &subject, Some(&fingerprint), &cmd)?;
            let seen = !session.log().intents_naming(&fingerprint)?.is_empty();
            if !seen && !found.protection.generated_here() {
                return Err(CeremonyError::ForeignKey {
                    protection: found.protection,
                    cmd,
                }
                .into());
            }
            (found.public, found.id, Some(Resumed::KeyReused))
        }
    };
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
    let file = install(home, req, &profile.issuer, &label, &id, &der)?;
    Ok(CaReport {
        name: req.name.clone(),
        cert,
        cert_sha256: keys::sha256_hex(&der),
        file,
        log_entry: seq,
        key_label: label,
        clamped_to_issuer,
        resumed,
    })
}

/// What a logged certificate must match to be installed by a rerun.
struct Installed<'a> {
    profile: &'a Profile,
    subject: &'a [(AttrType, String)],
    issuer_subject: &'a str,
    id: &'a [u8],
}

/// The rerun after a run that logged the certificate but stopped before installing it: the
/// certificate is released from the log (under a checkpoint, like every release), if it is
/// what this command asks for and not revoked.
fn install_from_log(
    session: &mut CaSession<'_>,
    req: &CaRequest,
    cmd: &CreateCommand,
    want: Installed<'_>,
    record: &crate::log::Record,
) -> Result<CaReport, Error> {
    let facts = crate::verify::describe(&record.der).map_err(|e| {
        Error::Internal(format!(
            "log entry {}: cannot read the certificate: {e}",
            record.seq
        ))
    })?;
    let (mut theirs, mut wanted) = (facts.subject.clone(), want.subject.to_vec());
    theirs.sort();
    wanted.sort();
    if record.profile != want.profile.name || theirs != wanted || record.revoked.is_some() {
        return Err(CeremonyError::LoggedDiffers {
            serial: record.serial.clone(),
            seq: record.seq,
            profile: record.profile.clone(),
            subject: facts.subject_string,
            revoked: record.revoked.is_some(),
            cmd: cmd.clone(),
        }
        .into());
    }
    session.checkpoint()?;
    let home = session.home();
    let file = install(
        home,
        req,
        &want.profile.issuer,
        &cmd.label,
        want.id,
        &record.der,
    )?;
    let mut cert = CertSummary::read_back(&record.der, &record.profile, want.issuer_subject);
    cert.serial.clone_from(&record.serial);
    Ok(CaReport {
        name: req.name.clone(),
        cert,
        cert_sha256: keys::sha256_hex(&record.der),
        file,
        log_entry: record.seq,
        key_label: cmd.label.clone(),
        clamped_to_issuer: None,
        resumed: Some(Resumed::InstalledFromLog),
    })
}

/// Adds a logged CA certificate to the home: `cas/NAME.pem` (an identical file left by an
/// earlier run counts as written), then the entry in `hsmca.json`, replaced atomically.
fn install(
    home: &Home,
    req: &CaRequest,
    issuer: &str,
    label: &str,
    id: &[u8],
    der: &[u8],
) -> Result<PathBuf, Error> {
    let rel = format!("cas/{}.pem", req.name);
    let file = home.dir.join(&rel);
    files::write_new(&file, engine::pem("CERTIFICATE", der).as_bytes())?;
    let mut config = home.config.clone();
    config.cas.push(CaEntry {
        name: req.name.clone(),
        key: KeyRef {
            label: label.to_owned(),
            id: keys::hex(id),
            key_type: req.key_type,
        },
        cert: rel,
        issuer: issuer.to_owned(),
    });
    let json = serde_json::to_vec_pretty(&config).map_err(|e| Error::Internal(e.to_string()))?;
    files::replace(&home.dir.join("hsmca.json"), &json)?;
    Ok(file)
}

/// Two CAs may not share a subject: certificates would chain to either, and path building
/// (and `log verify`) could pick the wrong one.
fn refuse_taken_subject(
    home: &Home,
    subject: &[(AttrType, String)],
    cmd: &CreateCommand,
) -> Result<(), Error> {
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
            return Err(CeremonyError::SubjectTaken {
                holder: format!("CA {name:?}"),
                subject: engine::subject_of(&cert),
                logged: false,
                cmd: cmd.clone(),
            }
            .into());
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
/// `confirm` sees what would be logged (the changed files and values) before anything is, and
/// says whether to go on: the operator reviews the very change that gets logged, not a list
/// printed afterwards.
pub fn apply(
    home: &Home,
    keys: &dyn Keystore,
    clock: &dyn Clock,
    confirm: &mut dyn FnMut(&Applied) -> Result<bool, Error>,
) -> Result<Applied, Error> {
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
        if !confirm(&applied)? {
            return Err(Error::Usage(
                "not applied: the policy in force is unchanged".into(),
            ));
        }
        applied.log_entry = session.append(vec![entry])?.first().copied();
        session.checkpoint()?;
    }
    Ok(applied)
}

/// The same rule for CA certificates the log holds but the home never installed (an earlier
/// `ca create` under another key label): `log verify` knows them as CAs all the same. `ours`
/// is the key whose certificate may be installed.
fn refuse_logged_subject(
    logged: &[crate::log::Record],
    subject: &[(AttrType, String)],
    ours: Option<&str>,
    cmd: &CreateCommand,
) -> Result<(), Error> {
    let mut wanted = subject.to_vec();
    wanted.sort();
    for record in logged {
        if Some(record.csr_sha256.as_str()) == ours {
            continue;
        }
        let Ok(facts) = crate::verify::describe(&record.der) else {
            continue;
        };
        let mut theirs = facts.subject.clone();
        theirs.sort();
        if facts.is_ca && theirs == wanted {
            return Err(CeremonyError::SubjectTaken {
                holder: format!(
                    "the CA certificate serial {} in the log (entry {}, never installed in this home)",
                    record.serial, record.seq
                ),
                subject: facts.subject_string,
                logged: true,
                cmd: cmd.clone(),
            }
            .into());
        }
    }
    Ok(())
}

/// A CA key label must not be one of the home's keys: `ca create` would find that key in the
/// token and sign a second certificate for it.
fn refuse_taken_label(home: &Home, cmd: &CreateCommand) -> Result<(), Error> {
    let c = &home.config;
    let owner = if cmd.label == c.root_key.label {
        Some("the root".to_owned())
    } else if cmd.label == c.log_key.label {
        Some("the issuance log".to_owned())
    } else {
        c.cas
            .iter()
            .find(|ca| ca.key.label == cmd.label)
            .map(|ca| format!("CA {:?}", ca.name))
    };
    match owner {
        Some(owner) => Err(CeremonyError::LabelTaken {
            label: cmd.label.clone(),
            owner,
            cmd: cmd.clone(),
        }
        .into()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_commands_a_shell_runs_as_written() {
        assert_eq!(quote("CN=kubernetes-ca"), "CN=kubernetes-ca");
        assert_eq!(quote("/srv/ca"), "/srv/ca");
        assert_eq!(quote("CN=Example CA,O=Ex"), "'CN=Example CA,O=Ex'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("$(rm -rf /)"), "'$(rm -rf /)'");
        let cmd = CreateCommand {
            name: "kubernetes-ca".into(),
            home: PathBuf::from("/srv/my ca"),
            profile: "kubernetes-ca".into(),
            subject: "CN=kubernetes-ca".into(),
            key_type: KeyType::EcdsaP256,
            validity: None,
            label: "root-kubernetes-ca".into(),
            root_label: "root".into(),
            label_given: false,
        };
        assert_eq!(
            cmd.to_string(),
            "hsmca ca create kubernetes-ca --home '/srv/my ca' --profile kubernetes-ca --subject CN=kubernetes-ca"
        );
        assert_eq!(
            cmd.with_validity("30d").with_label("root-k-2").to_string(),
            "hsmca ca create kubernetes-ca --home '/srv/my ca' --profile kubernetes-ca --subject CN=kubernetes-ca --validity 30d --key-label root-k-2"
        );
        // Another name keeps the profile (profiles are not renamed) and moves the default label.
        let renamed = cmd.with_name("kubernetes-ca-2");
        assert_eq!(renamed.profile, "kubernetes-ca");
        assert_eq!(renamed.label, "root-kubernetes-ca-2");
    }
}
