//! The PKCS#11 token: the only module that talks to cryptoki.
//!
//! Finds the module and the token (by label, never by slot index: SoftHSM2 moves tokens to
//! random slot ids), logs in once, generates non-extractable sign-only key pairs, reads public
//! keys back, and signs. Errors keep the PKCS#11 function and return value (named as the
//! standard spells them, `C_Sign` and `CKR_DEVICE_ERROR`, which is what an HSM manual indexes),
//! say whose fault they are ([`FaultKind`]) and what the operator can do next; none of them
//! ever contains the PIN. Random bytes pass [`rng::check`] and are mixed with the OS's before
//! anyone sees them.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as Pkcs11Error, RvError};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType as P11KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use crate::asn1;
use crate::keys::{self, KeyType, PublicKey};
use crate::pin::Pin;
use crate::rng::{self, HealthFailure, SerialError};
pub use crate::signer::FaultKind;
use crate::signer::{CaSigner, SignError};

/// Environment variable naming the PKCS#11 module.
pub const MODULE_ENV: &str = "HSMCA_PKCS11_MODULE";

/// Where SoftHSM2 is usually installed; tried in order when no module is named.
pub const DEFAULT_MODULES: [&str; 5] = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
];

/// A token problem, each with a clear next step (see [`TokenError::hint`]).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No module given and none at the standard paths.
    #[error("no PKCS#11 module found (tried {})", .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    ModuleNotFound {
        /// Paths tried.
        tried: Vec<PathBuf>,
    },
    /// The module exists but could not be loaded or initialised.
    #[error("{}: cannot load PKCS#11 module", .path.display())]
    ModuleLoad {
        /// The module path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Pkcs11Error,
    },
    /// No token with that label.
    #[error("no token labelled {label:?}; tokens seen: {}", if .seen.is_empty() { "none".to_string() } else { .seen.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ") })]
    TokenNotFound {
        /// The label asked for.
        label: String,
        /// Labels of the tokens that are present.
        seen: Vec<String>,
    },
    /// C_Login said CKR_PIN_INCORRECT.
    #[error("wrong PIN for token {label:?}: C_Login returned CKR_PIN_INCORRECT{}", if *.final_try { " (the token says the next wrong PIN locks it)" } else { "" })]
    WrongPin {
        /// Token label.
        label: String,
        /// CKF_USER_PIN_FINAL_TRY was set after the failure.
        final_try: bool,
    },
    /// The user PIN is locked.
    #[error("the user PIN of token {label:?} is locked")]
    PinLocked {
        /// Token label.
        label: String,
    },
    /// The key is not in the token.
    #[error("no private key labelled {key:?} in token {token:?}")]
    KeyMissing {
        /// Token label.
        token: String,
        /// Key label.
        key: String,
    },
    /// `init` would reuse a label.
    #[error(
        "token {token:?} already holds an object labelled {key:?}; refusing to create a second key with that label"
    )]
    KeyExists {
        /// Token label.
        token: String,
        /// Key label.
        key: String,
    },
    /// The token's key is not the one in the CA certificate.
    #[error(
        "key {key:?} in token {token:?} (SPKI SHA-256 {key_fingerprint}) does not match the CA certificate (SPKI SHA-256 {cert_fingerprint}); refusing to sign"
    )]
    KeyMismatch {
        /// Token label.
        token: String,
        /// Key label.
        key: String,
        /// Fingerprint of the key in the token.
        key_fingerprint: String,
        /// Fingerprint of the key in the certificate.
        cert_fingerprint: String,
    },
    /// The token lacks a mechanism hsmca needs.
    #[error("token {token:?} does not support {mechanism}")]
    MechanismMissing {
        /// Token label.
        token: String,
        /// The mechanism.
        mechanism: String,
    },
    /// A generated key did not come out as asked (e.g. extractable): never use it.
    #[error("token {token:?} generated key {key:?} without the protection asked for: {problem}")]
    KeyNotProtected {
        /// Token label.
        token: String,
        /// Key label.
        key: String,
        /// What was wrong.
        problem: String,
    },
    /// A new key's self-test signature did not verify with its own public key: the token
    /// signs wrongly, so the key must not be used.
    #[error(
        "token {token:?}: the self-test signature of new key {key:?} does not verify with its public key"
    )]
    SelfTest {
        /// Token label.
        token: String,
        /// Key label.
        key: String,
    },
    /// The token returned a signature that cannot be right (e.g. of the wrong length).
    #[error("key {key:?}: {problem}")]
    BadSignature {
        /// Key label.
        key: String,
        /// What was wrong.
        problem: String,
    },
    /// Bytes from `C_GenerateRandom` failed a health test ([`rng::check`]); they were not used.
    #[error(
        "token {token:?}: {len} random bytes from C_GenerateRandom failed the RNG health check; none were used"
    )]
    RngHealth {
        /// Token label.
        token: String,
        /// Bytes drawn.
        len: usize,
        /// The test that failed.
        #[source]
        failure: HealthFailure,
    },
    /// Unique serials could not be drawn within the bound ([`rng::unique_serials`]).
    #[error("cannot draw unique serials from the token's RNG")]
    Serials(#[from] SerialError),
    /// The operating system's RNG failed (getrandom); nothing is drawn without it.
    #[error("the operating system's random number generator failed")]
    OsRandom,
    /// The key's public half is in a form hsmca cannot read.
    #[error("cannot read the public key of {key:?}: {problem}")]
    PublicKey {
        /// Key label.
        key: String,
        /// What was wrong.
        problem: String,
    },
    /// Any other PKCS#11 failure, with what hsmca was doing and the function and `CKR_` code.
    #[error("PKCS#11 error while {action}{}", describe(.source))]
    Pkcs11 {
        /// What hsmca was doing.
        action: String,
        /// The cryptoki error (function and CKR_ value).
        #[source]
        source: Pkcs11Error,
    },
}

/// Return values that mean the session, the login or the token itself is gone.
const SESSION_LOST: [RvError; 7] = [
    RvError::SessionHandleInvalid,
    RvError::SessionClosed,
    RvError::DeviceRemoved,
    RvError::TokenNotPresent,
    RvError::UserNotLoggedIn,
    RvError::CryptokiNotInitialized,
    RvError::ObjectHandleInvalid,
];

/// The PKCS#11 function and return value of a cryptoki error, as the standard names them
/// (`C_Sign`, `CKR_DEVICE_ERROR`); `None` for errors that did not come from the module.
pub fn pkcs11_call(e: &Pkcs11Error) -> Option<(String, String)> {
    match e {
        Pkcs11Error::Pkcs11(rv, function) => Some((function_name(*function), ckr_name(*rv))),
        _ => None,
    }
}

/// `Function::GenerateRandom` → `C_GenerateRandom`.
fn function_name(f: Function) -> String {
    format!("C_{f:?}")
}

/// `RvError::DeviceError` → `CKR_DEVICE_ERROR`; vendor and unknown codes in hex.
fn ckr_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(v) => format!("CKR_VENDOR_DEFINED ({v:#x})"),
        RvError::UnknownErrorCode(v) => format!("unknown return value {v:#x}"),
        _ => {
            let camel = format!("{rv:?}");
            let mut out = String::from("CKR");
            for c in camel.chars() {
                if c.is_ascii_uppercase() {
                    out.push('_');
                }
                out.push(c.to_ascii_uppercase());
            }
            out
        }
    }
}

/// `": C_Sign returned CKR_DEVICE_ERROR"` for the message, or nothing.
fn describe(e: &Pkcs11Error) -> String {
    pkcs11_call(e)
        .map(|(f, rv)| format!(": {f} returned {rv}"))
        .unwrap_or_default()
}

impl TokenError {
    /// Whose fault this is; see [`FaultKind`].
    pub fn kind(&self) -> FaultKind {
        match self {
            Self::Pkcs11 {
                source: Pkcs11Error::Pkcs11(rv, _),
                ..
            } if SESSION_LOST.contains(rv) => FaultKind::SessionLost,
            Self::Pkcs11 { .. } | Self::RngHealth { .. } | Self::Serials(_) | Self::OsRandom => {
                FaultKind::Token
            }
            Self::SelfTest { .. } | Self::BadSignature { .. } => FaultKind::BadSignature,
            _ => FaultKind::Setup,
        }
    }

    /// What the operator can do next.
    pub fn hint(&self) -> Option<&'static str> {
        Some(match self {
            Self::RngHealth { .. } | Self::Serials(_) => {
                "the token's random number generator is failing: stop, have the token checked or replaced; nothing was signed with these bytes"
            }
            Self::SelfTest { .. } | Self::BadSignature { .. } | Self::Pkcs11 { .. } => {
                return self.kind().hint();
            }
            Self::ModuleNotFound { .. } => {
                "install SoftHSM2 (softhsm/install.sh) or name the module with --module or HSMCA_PKCS11_MODULE"
            }
            Self::ModuleLoad { .. } => {
                "check that the file is a PKCS#11 module for this architecture and that its configuration (e.g. SOFTHSM2_CONF) is readable"
            }
            Self::TokenNotFound { .. } => {
                "check --token (a label or pkcs11:token=... URI) and, for SoftHSM2, SOFTHSM2_CONF"
            }
            Self::WrongPin { .. } => {
                "check HSMCA_PIN or --pin-file; do not retry blindly, tokens lock after a few wrong PINs"
            }
            Self::PinLocked { .. } => "the Security Officer must unlock or reset the user PIN",
            Self::KeyMissing { .. } => {
                "check the token and the key label in the CA home's hsmca.json; a private key is only visible after a successful login"
            }
            Self::KeyExists { .. } => {
                "choose another --key-label, or remove the old key deliberately with the token's own tools"
            }
            Self::KeyMismatch { .. } => {
                "this CA home belongs to another token or key; check --home and --token"
            }
            _ => return None,
        })
    }
}

fn p11(action: impl Into<String>) -> impl FnOnce(Pkcs11Error) -> TokenError {
    let action = action.into();
    move |source| TokenError::Pkcs11 { action, source }
}

/// [`p11`] for a closure called more than once.
fn p11_each(action: String) -> impl Fn(Pkcs11Error) -> TokenError {
    move |source| TokenError::Pkcs11 {
        action: action.clone(),
        source,
    }
}

/// Which token: a label, or an RFC 7512 `pkcs11:` URI with `token=` (and optionally `object=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRef {
    /// The token label.
    pub token: String,
    /// An object (key) label from the URI.
    pub object: Option<String>,
    /// An object id from the URI.
    pub id: Option<Vec<u8>>,
}

impl TokenRef {
    /// Parses a bare label or a `pkcs11:` URI. URIs carrying `pin-value` are refused: a PIN
    /// never travels on the command line.
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some(rest) = s.strip_prefix("pkcs11:") else {
            return if s.is_empty() {
                Err("empty token label".into())
            } else {
                Ok(Self {
                    token: s.into(),
                    object: None,
                    id: None,
                })
            };
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if query.split('&').any(|q| q.starts_with("pin-value=")) {
            return Err(
                "the URI carries pin-value; pass the PIN by HSMCA_PIN, --pin-file or the prompt"
                    .into(),
            );
        }
        let (mut token, mut object, mut id) = (None, None, None);
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| format!("URI attribute {attr:?} has no '='"))?;
            let v = percent_decode(v).ok_or_else(|| format!("bad percent-encoding in {attr:?}"))?;
            match k {
                "token" => {
                    token = Some(
                        String::from_utf8(v).map_err(|_| "token label is not UTF-8".to_string())?,
                    );
                }
                "object" => {
                    object = Some(
                        String::from_utf8(v)
                            .map_err(|_| "object label is not UTF-8".to_string())?,
                    );
                }
                "id" => id = Some(v),
                _ => {}
            }
        }
        let token = token.ok_or("the pkcs11: URI has no token= attribute")?;
        Ok(Self { token, object, id })
    }
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Picks the module: explicit path, then `HSMCA_PKCS11_MODULE`, then the configured one, then
/// the standard SoftHSM2 paths.
pub fn resolve_module(
    explicit: Option<&Path>,
    configured: Option<&Path>,
) -> Result<PathBuf, TokenError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(MODULE_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = configured {
        return Ok(p.to_path_buf());
    }
    let tried: Vec<PathBuf> = DEFAULT_MODULES.iter().map(PathBuf::from).collect();
    tried
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or(TokenError::ModuleNotFound { tried })
}

/// What a token says about itself (`C_GetTokenInfo`), for the ceremony minutes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenInfo {
    /// CK_TOKEN_INFO.label.
    pub label: String,
    /// CK_TOKEN_INFO.serialNumber.
    pub serial: String,
    /// CK_TOKEN_INFO.manufacturerID.
    pub manufacturer: String,
    /// CK_TOKEN_INFO.model.
    pub model: String,
}

/// Reads the token labelled `label` from `module` without a session or a login: `C_GetTokenInfo`
/// needs neither, so the minutes can name the token without asking for the PIN.
pub fn info(module: &Path, label: &str) -> Result<TokenInfo, TokenError> {
    let ctx = load_module(module)?;
    let mut seen = Vec::new();
    for slot in ctx.get_slots_with_token().map_err(p11("listing slots"))? {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        if info.label() == label {
            return Ok(TokenInfo {
                label: info.label().trim_end().to_owned(),
                serial: info.serial_number().trim_end().to_owned(),
                manufacturer: info.manufacturer_id().trim_end().to_owned(),
                model: info.model().trim_end().to_owned(),
            });
        }
        seen.push(info.label().to_owned());
    }
    Err(TokenError::TokenNotFound {
        label: label.to_owned(),
        seen,
    })
}

/// Loads a PKCS#11 module and initialises it (`C_Initialize`; already initialised is fine).
fn load_module(module: &Path) -> Result<Pkcs11, TokenError> {
    let load = |source| TokenError::ModuleLoad {
        path: module.to_path_buf(),
        source,
    };
    let ctx = Pkcs11::new(module).map_err(load)?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(ctx),
        Err(e) => Err(load(e)),
    }
}

/// Protection attributes of a private key, as the token reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KeyProtection {
    /// CKA_SENSITIVE
    pub sensitive: bool,
    /// CKA_EXTRACTABLE
    pub extractable: bool,
    /// CKA_ALWAYS_SENSITIVE
    pub always_sensitive: bool,
    /// CKA_NEVER_EXTRACTABLE
    pub never_extractable: bool,
    /// CKA_PRIVATE_EXPONENT (RSA) or CKA_VALUE (EC) is refused as sensitive.
    pub value_hidden: bool,
    /// CKA_LOCAL: the token generated the key itself (it was not imported or unwrapped).
    pub local: bool,
}

impl KeyProtection {
    /// Whether the token vouches that the key was generated inside it and no copy of it can
    /// exist outside: CKA_LOCAL, CKA_SENSITIVE and CKA_ALWAYS_SENSITIVE true, CKA_EXTRACTABLE
    /// false and CKA_NEVER_EXTRACTABLE true. A key that is not all of these may have been
    /// imported, or read out before it was locked down.
    pub fn generated_here(&self) -> bool {
        self.local
            && self.sensitive
            && self.always_sensitive
            && !self.extractable
            && self.never_extractable
            && self.value_hidden
    }
}

/// A key pair already in the token under a label: what `ca create` finds when it is run again
/// after a failure left the key behind.
#[derive(Debug, Clone)]
pub struct ExistingKey {
    /// Its public key.
    pub public: PublicKey,
    /// Its CKA_ID.
    pub id: Vec<u8>,
    /// How the token says it was made and is protected.
    pub protection: KeyProtection,
}

/// An open, logged-in token.
pub struct Token {
    label: String,
    _ctx: Pkcs11,
    slot: Slot,
    session: Session,
    /// The health of the token's RNG over this session's draws.
    rng: RefCell<rng::Monitor>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// Loads the module, finds the token by label, opens a read-write session and logs in.
    pub fn open(module: &Path, token: &TokenRef, pin: &Pin) -> Result<Self, TokenError> {
        let ctx = load_module(module)?;
        let mut seen = Vec::new();
        let mut found = None;
        for slot in ctx.get_slots_with_token().map_err(p11("listing slots"))? {
            let Ok(info) = ctx.get_token_info(slot) else {
                continue;
            };
            if !info.token_initialized() {
                continue;
            }
            if info.label() == token.token {
                found = Some((slot, info));
                break;
            }
            seen.push(info.label().to_owned());
        }
        let Some((slot, info)) = found else {
            return Err(TokenError::TokenNotFound {
                label: token.token.clone(),
                seen,
            });
        };
        let label = token.token.clone();
        if info.user_pin_locked() {
            return Err(TokenError::PinLocked { label });
        }
        let session = ctx
            .open_rw_session(slot)
            .map_err(p11("opening a session"))?;
        let auth = AuthPin::from(pin.expose());
        match session.login(UserType::User, Some(&auth)) {
            Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(Pkcs11Error::Pkcs11(RvError::PinIncorrect, _)) => {
                let final_try = ctx
                    .get_token_info(slot)
                    .map(|i| i.user_pin_final_try())
                    .unwrap_or(false);
                return Err(TokenError::WrongPin { label, final_try });
            }
            Err(Pkcs11Error::Pkcs11(RvError::PinLocked, _)) => {
                return Err(TokenError::PinLocked { label });
            }
            Err(e) => return Err(p11(format!("logging in to token {label:?}"))(e)),
        }
        let token = Self {
            label,
            _ctx: ctx,
            slot,
            session,
            rng: RefCell::new(rng::Monitor::default()),
        };
        // Start-up test (SP 800-90B §4.3): two draws before any is used, so a generator stuck on
        // one output is caught even by a command that then draws only once.
        for _ in 0..2 {
            token.random(32)?;
        }
        Ok(token)
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// `len` random bytes: drawn from the token (`C_GenerateRandom`), checked by
    /// [`rng::check`] (a failure is [`TokenError::RngHealth`] and nothing is returned), then
    /// mixed with 32 bytes from the operating system by [`rng::mix`], so neither RNG alone
    /// decides serials or key ids.
    pub fn random(&self, len: usize) -> Result<Vec<u8>, TokenError> {
        let mut raw = zeroize::Zeroizing::new(vec![0u8; len]);
        self.session
            .generate_random_slice(&mut raw)
            .map_err(p11("drawing random bytes"))?;
        self.rng
            .borrow_mut()
            .check(&raw)
            .map_err(|failure| TokenError::RngHealth {
                token: self.label.clone(),
                len,
                failure,
            })?;
        let mut os = zeroize::Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), os.as_mut())
            .map_err(|_| TokenError::OsRandom)?;
        Ok(rng::mix(&raw, &os, len))
    }

    /// Whether the token offers a mechanism (C_GetMechanismList).
    pub fn supports(&self, mechanism: MechanismType) -> bool {
        self._ctx
            .get_mechanism_list(self.slot)
            .is_ok_and(|l| l.contains(&mechanism))
    }

    fn find(&self, class: ObjectClass, label: &str) -> Result<Vec<ObjectHandle>, TokenError> {
        self.session
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(p11(format!("looking up key {label:?}")))
    }

    /// Generates a sign-only key pair that never leaves the token: CKA_TOKEN, CKA_PRIVATE,
    /// CKA_SENSITIVE true; CKA_EXTRACTABLE, CKA_DECRYPT, CKA_DERIVE, CKA_UNWRAP false. Refuses a
    /// label already in use, then checks the protection attributes and signs a self-test
    /// message before returning the public key.
    pub fn generate_key_pair(
        &self,
        key_type: KeyType,
        label: &str,
        id: &[u8],
    ) -> Result<PublicKey, TokenError> {
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            if !self.find(class, label)?.is_empty() {
                return Err(TokenError::KeyExists {
                    token: self.label.clone(),
                    key: label.into(),
                });
            }
        }
        let (mechanism, shape) = match key_type {
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => (
                Mechanism::RsaPkcsKeyPairGen,
                vec![
                    Attribute::ModulusBits(key_type.rsa_bits().unwrap_or(3072).into()),
                    Attribute::PublicExponent(vec![1, 0, 1]),
                ],
            ),
            KeyType::EcdsaP256 => (
                Mechanism::EccKeyPairGen,
                vec![Attribute::EcParams(oid_der(keys::OID_P256))],
            ),
            KeyType::EcdsaP384 => (
                Mechanism::EccKeyPairGen,
                vec![Attribute::EcParams(oid_der(keys::OID_P384))],
            ),
            KeyType::Ed25519 => (
                Mechanism::EccEdwardsKeyPairGen,
                vec![Attribute::EcParams(oid_der(keys::OID_ED25519))],
            ),
        };
        if !self.supports(mechanism.mechanism_type()) {
            return Err(TokenError::MechanismMissing {
                token: self.label.clone(),
                mechanism: mechanism.mechanism_type().to_string(),
            });
        }
        let common = [
            Attribute::Token(true),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ];
        let mut public = common.to_vec();
        public.extend(shape);
        public.extend([
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Private(false),
        ]);
        let mut private = common.to_vec();
        private.extend([
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Derive(false),
            Attribute::Unwrap(false),
        ]);
        self.session
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(p11(format!("generating key {label:?}")))?;
        let protection = self.key_protection(label)?;
        if protection.extractable || !protection.sensitive || !protection.value_hidden {
            return Err(TokenError::KeyNotProtected {
                token: self.label.clone(),
                key: label.into(),
                problem: format!("{protection:?}"),
            });
        }
        let key = self.key(label)?;
        let probe = b"hsmca key self-test";
        let sig = sign_on(&self.session, key.handle, &key.public, probe, label)?;
        if !key.public_key().verify(probe, &sig) {
            return Err(TokenError::SelfTest {
                token: self.label.clone(),
                key: label.into(),
            });
        }
        Ok(key.public.clone())
    }

    /// Reads the protection attributes of the private key `label`.
    pub fn key_protection(&self, label: &str) -> Result<KeyProtection, TokenError> {
        let handle = self.private_handle(label)?;
        let attrs = self
            .session
            .get_attributes(
                handle,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::AlwaysSensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Local,
                    AttributeType::KeyType,
                ],
            )
            .map_err(p11(format!("reading attributes of {label:?}")))?;
        let mut p = KeyProtection {
            sensitive: false,
            extractable: true,
            always_sensitive: false,
            never_extractable: false,
            value_hidden: false,
            local: false,
        };
        let mut secret = AttributeType::Value;
        for a in attrs {
            match a {
                Attribute::Sensitive(v) => p.sensitive = v,
                Attribute::Extractable(v) => p.extractable = v,
                Attribute::AlwaysSensitive(v) => p.always_sensitive = v,
                Attribute::NeverExtractable(v) => p.never_extractable = v,
                Attribute::Local(v) => p.local = v,
                Attribute::KeyType(t) if t == P11KeyType::RSA => {
                    secret = AttributeType::PrivateExponent;
                }
                _ => {}
            }
        }
        let info = self
            .session
            .get_attribute_info(handle, &[secret])
            .map_err(p11(format!("reading attribute info of {label:?}")))?;
        p.value_hidden = matches!(info.first(), Some(AttributeInfo::Sensitive));
        Ok(p)
    }

    /// The key pair labelled `label`, if the token holds anything under that label: its public
    /// key, CKA_ID and protection attributes. A label with only half a pair, or with several
    /// keys, is an error (hsmca never makes either).
    pub fn existing_key(&self, label: &str) -> Result<Option<ExistingKey>, TokenError> {
        let private = self.find(ObjectClass::PRIVATE_KEY, label)?;
        let public = self.find(ObjectClass::PUBLIC_KEY, label)?;
        if private.is_empty() && public.is_empty() {
            return Ok(None);
        }
        let key = self.key(label)?;
        let id = self
            .session
            .get_attributes(key.handle, &[AttributeType::Id])
            .map_err(p11(format!("reading the CKA_ID of {label:?}")))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::Id(id) => Some(id),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Some(ExistingKey {
            protection: self.key_protection(label)?,
            public: key.public,
            id,
        }))
    }

    fn private_handle(&self, label: &str) -> Result<ObjectHandle, TokenError> {
        match self.find(ObjectClass::PRIVATE_KEY, label)?.as_slice() {
            [h] => Ok(*h),
            [] => Err(TokenError::KeyMissing {
                token: self.label.clone(),
                key: label.into(),
            }),
            _ => Err(TokenError::KeyExists {
                token: self.label.clone(),
                key: label.into(),
            }),
        }
    }

    /// Opens the key pair `label` for signing.
    pub fn key(&self, label: &str) -> Result<TokenKey<'_>, TokenError> {
        let handle = self.private_handle(label)?;
        let public = match self.find(ObjectClass::PUBLIC_KEY, label)?.as_slice() {
            [h] => self.read_public(*h, label)?,
            _ => {
                return Err(TokenError::PublicKey {
                    key: label.into(),
                    problem: "no single public key object with that label".into(),
                });
            }
        };
        Ok(TokenKey {
            token: self,
            handle,
            public,
            label: label.into(),
        })
    }

    /// Opens `label` and checks that it is the key in `expected` (the CA certificate's key).
    pub fn key_matching(
        &self,
        label: &str,
        expected: &PublicKey,
    ) -> Result<TokenKey<'_>, TokenError> {
        let key = self.key(label)?;
        if key.public.spki_der != expected.spki_der {
            return Err(TokenError::KeyMismatch {
                token: self.label.clone(),
                key: label.into(),
                key_fingerprint: key.public.fingerprint(),
                cert_fingerprint: expected.fingerprint(),
            });
        }
        Ok(key)
    }

    fn read_public(&self, handle: ObjectHandle, label: &str) -> Result<PublicKey, TokenError> {
        let bad = |problem: &str| TokenError::PublicKey {
            key: label.into(),
            problem: problem.into(),
        };
        let attrs = self
            .session
            .get_attributes(
                handle,
                &[
                    AttributeType::KeyType,
                    AttributeType::Modulus,
                    AttributeType::PublicExponent,
                    AttributeType::EcParams,
                    AttributeType::EcPoint,
                ],
            )
            .map_err(p11(format!("reading public key {label:?}")))?;
        let (mut kt, mut n, mut e, mut params, mut point) = (None, None, None, None, None);
        for a in attrs {
            match a {
                Attribute::KeyType(t) => kt = Some(t),
                Attribute::Modulus(v) => n = Some(v),
                Attribute::PublicExponent(v) => e = Some(v),
                Attribute::EcParams(v) => params = Some(v),
                Attribute::EcPoint(v) => point = Some(v),
                _ => {}
            }
        }
        let spki = match kt {
            Some(t) if t == P11KeyType::RSA => {
                let (n, e) = n
                    .zip(e)
                    .ok_or_else(|| bad("RSA key without modulus or exponent"))?;
                let mut body = asn1::der_uint(&n);
                body.extend(asn1::der_uint(&e));
                keys::spki_der(keys::OID_RSA, None, &asn1::der_tlv(0x30, &body))
            }
            Some(t) if t == P11KeyType::EC => {
                let params = params.ok_or_else(|| bad("EC key without CKA_EC_PARAMS"))?;
                let curve = x509_cert::der::Decode::from_der(&params)
                    .map_err(|_| bad("CKA_EC_PARAMS is not a named curve"))?;
                let point = point.ok_or_else(|| bad("EC key without CKA_EC_POINT"))?;
                keys::spki_der(keys::OID_EC, Some(curve), asn1::unwrap_octet_string(&point))
            }
            Some(t) if t == P11KeyType::EC_EDWARDS => {
                let point = point.ok_or_else(|| bad("Edwards key without CKA_EC_POINT"))?;
                keys::spki_der(keys::OID_ED25519, None, asn1::unwrap_octet_string(&point))
            }
            _ => return Err(bad("unsupported key type")),
        }
        .ok_or_else(|| bad("cannot encode SubjectPublicKeyInfo"))?;
        PublicKey::from_spki_der(&spki).map_err(|e| bad(&e.to_string()))
    }
}

fn oid_der(oid: x509_cert::spki::ObjectIdentifier) -> Vec<u8> {
    asn1::der_tlv(0x06, oid.as_bytes())
}

/// A key pair in the token, ready to sign.
pub struct TokenKey<'t> {
    token: &'t Token,
    handle: ObjectHandle,
    public: PublicKey,
    label: String,
}

impl TokenKey<'_> {
    /// The key's label.
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl CaSigner for TokenKey<'_> {
    fn public_key(&self) -> &PublicKey {
        &self.public
    }

    fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, SignError> {
        sign_on(
            &self.token.session,
            self.handle,
            &self.public,
            tbs,
            &self.label,
        )
        .map_err(|e| sign_error(&self.token.label, &e))
    }
}

/// A token error as a [`SignError`]: the token's label, the message (with the `C_` function
/// and `CKR_` code; cryptoki's prose for the code is left out), and its [`FaultKind`].
fn sign_error(token: &str, e: &TokenError) -> SignError {
    SignError::new(e.kind(), format!("token {token:?}: {e}"))
}

/// RSA uses CKM_SHA256_RSA_PKCS (the token hashes). ECDSA hashes here (SHA-256 for P-256,
/// SHA-384 for P-384; SoftHSM2 has no combined mechanism) and signs the digest with CKM_ECDSA,
/// then re-encodes r‖s as DER. Ed25519 uses pure CKM_EDDSA.
fn sign_on(
    session: &Session,
    handle: ObjectHandle,
    public: &PublicKey,
    tbs: &[u8],
    label: &str,
) -> Result<Vec<u8>, TokenError> {
    let fail = p11_each(format!("signing with key {label:?}"));
    match public.key_type {
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => session
            .sign(&Mechanism::Sha256RsaPkcs, handle, tbs)
            .map_err(fail),
        KeyType::EcdsaP256 | KeyType::EcdsaP384 => {
            let alg = if public.key_type == KeyType::EcdsaP256 {
                &ring::digest::SHA256
            } else {
                &ring::digest::SHA384
            };
            let digest = ring::digest::digest(alg, tbs);
            let raw = session
                .sign(&Mechanism::Ecdsa, handle, digest.as_ref())
                .map_err(fail)?;
            asn1::ecdsa_raw_to_der(&raw).ok_or_else(|| TokenError::BadSignature {
                key: label.into(),
                problem: format!("C_Sign returned a {}-byte ECDSA signature", raw.len()),
            })
        }
        KeyType::Ed25519 => session
            .sign(
                &Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                handle,
                tbs,
            )
            .map_err(fail),
    }
}

/// A key on a session of its own, for one worker thread. PKCS#11 sessions are not shared
/// between threads (cryptoki's `Session` is `Send` but not `Sync`); the login is shared by all
/// sessions of the application, so a worker session needs no PIN.
pub struct WorkerKey {
    token: String,
    session: Session,
    handle: ObjectHandle,
    public: PublicKey,
    label: String,
}

impl Token {
    /// Opens `count` extra sessions, each with its own handle to key `label`, which the caller
    /// has already matched against the CA certificate (`key_matching`); `expected` is that key.
    /// Handles are found afresh per session (handles do not survive a re-login).
    pub fn workers(
        &self,
        label: &str,
        expected: &PublicKey,
        count: usize,
    ) -> Result<Vec<WorkerKey>, TokenError> {
        (0..count)
            .map(|_| {
                let session = self
                    ._ctx
                    .open_ro_session(self.slot)
                    .map_err(p11("opening a worker session"))?;
                let handles = session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Label(label.as_bytes().to_vec()),
                    ])
                    .map_err(p11(format!("looking up key {label:?}")))?;
                let [handle] = handles.as_slice() else {
                    return Err(TokenError::KeyMissing {
                        token: self.label.clone(),
                        key: label.into(),
                    });
                };
                Ok(WorkerKey {
                    token: self.label.clone(),
                    session,
                    handle: *handle,
                    public: expected.clone(),
                    label: label.into(),
                })
            })
            .collect()
    }
}

impl CaSigner for WorkerKey {
    fn public_key(&self) -> &PublicKey {
        &self.public
    }

    fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, SignError> {
        sign_on(&self.session, self.handle, &self.public, tbs, &self.label)
            .map_err(|e| sign_error(&self.token, &e))
    }
}

// Data objects: the log head kept in the token (issue 13). Kept apart from the key code.

impl Token {
    /// The values of the private data objects (CKO_DATA) labelled `label`: normally one, two
    /// if a process stopped between writing the new one and destroying the old. Private
    /// objects are visible only in a logged-in session.
    pub fn read_data(&self, label: &str) -> Result<Vec<Vec<u8>>, TokenError> {
        let mut out = Vec::new();
        for handle in self.find(ObjectClass::DATA, label)? {
            let attrs = self
                .session
                .get_attributes(handle, &[AttributeType::Value])
                .map_err(p11(format!(
                    "reading data object {label:?} (C_GetAttributeValue)"
                )))?;
            out.extend(attrs.into_iter().find_map(|a| match a {
                Attribute::Value(v) => Some(v),
                _ => None,
            }));
        }
        Ok(out)
    }

    /// Replaces the data objects labelled `label` with one holding `value`: a token object
    /// that is private (readable, creatable and destroyable only after C_Login). The new
    /// object is created before the old ones are destroyed, so a crash leaves one or both,
    /// never none. (SoftHSM2 refuses C_SetAttributeValue on CKA_VALUE.)
    pub fn write_data(&self, label: &str, value: &[u8]) -> Result<(), TokenError> {
        let old = self.find(ObjectClass::DATA, label)?;
        self.session
            .create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Application(b"hsmca".to_vec()),
                Attribute::Value(value.to_vec()),
            ])
            .map_err(p11(format!(
                "creating data object {label:?} (C_CreateObject)"
            )))?;
        for handle in old {
            self.session.destroy_object(handle).map_err(p11(format!(
                "replacing data object {label:?} (C_DestroyObject)"
            )))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_uri_and_label() {
        assert_eq!(TokenRef::parse("dev").unwrap().token, "dev");
        let r = TokenRef::parse("pkcs11:token=my%20ca;object=root;id=%01%02").unwrap();
        assert_eq!(
            r,
            TokenRef {
                token: "my ca".into(),
                object: Some("root".into()),
                id: Some(vec![1, 2])
            }
        );
        assert!(
            TokenRef::parse("pkcs11:token=x?pin-value=1234")
                .unwrap_err()
                .contains("pin-value")
        );
        assert!(TokenRef::parse("pkcs11:object=root").is_err());
    }

    #[test]
    fn messages_never_carry_more_than_labels() {
        let e = TokenError::WrongPin {
            label: "dev".into(),
            final_try: true,
        };
        assert_eq!(
            e.to_string(),
            "wrong PIN for token \"dev\": C_Login returned CKR_PIN_INCORRECT (the token says the next wrong PIN locks it)"
        );
    }

    #[test]
    fn return_values_are_named_as_the_standard_spells_them() {
        for (rv, name) in [
            (RvError::DeviceError, "CKR_DEVICE_ERROR"),
            (RvError::SessionHandleInvalid, "CKR_SESSION_HANDLE_INVALID"),
            (RvError::PinIncorrect, "CKR_PIN_INCORRECT"),
            (
                RvError::CryptokiAlreadyInitialized,
                "CKR_CRYPTOKI_ALREADY_INITIALIZED",
            ),
            (RvError::RandomNoRng, "CKR_RANDOM_NO_RNG"),
            (
                RvError::VendorDefined(0x8000_0001),
                "CKR_VENDOR_DEFINED (0x80000001)",
            ),
        ] {
            assert_eq!(ckr_name(rv), name);
        }
        assert_eq!(function_name(Function::GenerateRandom), "C_GenerateRandom");
        let e = p11("signing with key \"root\"")(Pkcs11Error::Pkcs11(
            RvError::DeviceError,
            Function::Sign,
        ));
        assert_eq!(
            e.to_string(),
            "PKCS#11 error while signing with key \"root\": C_Sign returned CKR_DEVICE_ERROR"
        );
        // The cause chain is kept: cryptoki's own error is the source.
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn errors_say_whose_fault_they_are() {
        let call = |rv, f| p11("x")(Pkcs11Error::Pkcs11(rv, f));
        let cases = [
            (call(RvError::DeviceError, Function::Sign), FaultKind::Token),
            (
                call(RvError::GeneralError, Function::GenerateRandom),
                FaultKind::Token,
            ),
            (
                call(RvError::SessionHandleInvalid, Function::Sign),
                FaultKind::SessionLost,
            ),
            (
                call(RvError::DeviceRemoved, Function::SignInit),
                FaultKind::SessionLost,
            ),
            (
                call(RvError::UserNotLoggedIn, Function::Sign),
                FaultKind::SessionLost,
            ),
            (
                TokenError::RngHealth {
                    token: "t".into(),
                    len: 16,
                    failure: HealthFailure::AllZero { len: 16 },
                },
                FaultKind::Token,
            ),
            (
                TokenError::BadSignature {
                    key: "k".into(),
                    problem: "short".into(),
                },
                FaultKind::BadSignature,
            ),
            (
                TokenError::SelfTest {
                    token: "t".into(),
                    key: "k".into(),
                },
                FaultKind::BadSignature,
            ),
            (
                TokenError::WrongPin {
                    label: "t".into(),
                    final_try: false,
                },
                FaultKind::Setup,
            ),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e}");
        }
        let s = sign_error("dev", &call(RvError::SessionHandleInvalid, Function::Sign));
        assert_eq!(s.kind(), FaultKind::SessionLost);
        assert!(
            s.to_string()
                .contains("C_Sign returned CKR_SESSION_HANDLE_INVALID"),
            "{s}"
        );
    }

    #[test]
    fn an_rng_health_failure_names_the_test() {
        let e = TokenError::RngHealth {
            token: "dev".into(),
            len: 8,
            failure: rng::check(&[0; 8], []).unwrap_err(),
        };
        let text = crate::error::chain(&e);
        assert!(text.contains("RNG health check"), "{text}");
        assert!(text.contains("all-zero test"), "{text}");
    }
}
