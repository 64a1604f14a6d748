//! The one issuance engine. Every certificate hsmca makes (`sign`, both forms of `sign-dir`,
//! kubectl objects, kubeadm trees, `renew`, `ca create`) passes through here, in one order:
//!
//! ```text
//! policy::decide (pure, by purpose) --> issue::prepare (TBS) --> Ready
//!   --> intent entry (durable) --> token signature --> issue::finish (post-signing check)
//!   --> settle: cert entry, or abandon entry + withheld (durable) --> checkpoint --> release
//! ```
//!
//! The engine owns each kind of log entry an issuance writes ([`Ready::intent`], [`settle`]),
//! the rules for what stops a run ([`Health`]: a signed certificate that fails its check stops
//! it with exit 5, a run of token failures with exit 3), the rule for a CSR the log already
//! holds ([`CaSession::prior`]: its certificate is written again, never issued twice) and the
//! rule for an output that cannot be written ([`release`]). Callers differ only in where their
//! requests come from and where the certificates go; `batch::pipeline` runs the same steps on
//! several token sessions at once.
//!
//! The engine reaches the token only through [`Keystore`], so its refusals and stop rules can
//! be tested in-process with software keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;

use crate::clock::{Clock, rfc3339};
use crate::error::Error;
use crate::files::{self, Written};
use crate::home::{Home, HomeError};
use crate::issue::{self, IssueError, IssuerCert, Prepared};
use crate::keys::{self, KeyType};
use crate::log::translog::{self, NoteKey};
use crate::log::{Body, Log, PolicyPin};
use crate::pinned::{self, PinnedError};
use crate::policy::{Decision, Refusal};
use crate::profile::Profile;
use crate::signer::{CaSigner, Keystore};

/// How many signatures in a row may fail before a run stops as a token fault (exit 3). One
/// failure is reported and the run goes on (a transient error); three in a row is a token that
/// has gone away or broken, and every further CSR would only add an intent and an abandon.
pub const TOKEN_FAILURES_IN_A_ROW: usize = 3;

/// How many rounds of random bytes a run draws for unique serials before it calls the token's
/// generator broken. With 127 random bits a collision is never expected; needing more than a
/// second round means the token repeats itself.
const SERIAL_ROUNDS: usize = 4;

/// Why a run stopped before its end. The work logged before the stop is released (or
/// reported) as usual; a rerun of the same command finishes the rest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Halt {
    /// A certificate the token signed failed the post-signing check (bad signature, or not
    /// what was decided). It was withheld; a token that signs wrongly is not used further.
    #[error(
        "serial {serial}: the signed certificate failed verification and was withheld: {cause}"
    )]
    BadCertificate {
        /// Serial of the withheld certificate.
        serial: String,
        /// What the check found.
        cause: String,
    },
    /// Several signatures in a row failed in the token.
    #[error("the token failed {count} signatures in a row; the last: {cause}")]
    TokenFailing {
        /// Failures in a row.
        count: usize,
        /// The last failure.
        cause: String,
    },
}

/// What the engine itself can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The token's random generator kept returning serials the log already holds.
    #[error(
        "the token's random generator returned used or repeated serials in {rounds} rounds in a row"
    )]
    Serials {
        /// Rounds drawn.
        rounds: usize,
    },
    /// A run stopped early.
    #[error(transparent)]
    Halt(#[from] Halt),
    /// The one certificate a ceremony asked for was withheld.
    #[error("{}: {}", .0.rule, .0.error)]
    Withheld(Withheld),
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

impl CertSummary {
    /// The summary of a decided certificate.
    pub fn of(d: &Decision, issuer: &str) -> Self {
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

    /// A summary read back from a logged certificate (for CSRs issued by an earlier run).
    pub fn read_back(der: &[u8], profile: &str, issuer: &str) -> Self {
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
}

/// A CA home opened for issuing: the log (its root and log key checked against the token), and
/// the issuers' keys as they are needed. Opened once per command.
pub struct CaSession<'t> {
    home: &'t Home,
    keys: &'t dyn Keystore,
    clock: &'t dyn Clock,
    log: Log,
    log_key: Box<dyn CaSigner + 't>,
    issuers: BTreeMap<String, Issuer<'t>>,
    policy: Option<PolicyPin>,
    compromised: Arc<BTreeMap<String, String>>,
}

impl Issuer<'_> {
    /// Its key in the token.
    pub fn signer(&self) -> &dyn CaSigner {
        &*self.key
    }
}

/// An issuing CA: its certificate, its subject for reports, and its key in the token.
pub struct Issuer<'t> {
    /// `root` or the intermediate's name.
    pub name: String,
    /// The certificate.
    pub cert: IssuerCert,
    /// Its subject, for reports.
    pub subject: String,
    /// Its key's label in the token.
    pub label: String,
    key: Box<dyn CaSigner + 't>,
}

impl<'t> CaSession<'t> {
    /// Opens the log for appending with the token's log key, after checking that both the root
    /// and the log key are the ones recorded in the log, and closes intents a crashed run left
    /// open (nothing was released for them).
    ///
    /// Refuses (before anything is signed) a log that does not extend the head the token
    /// keeps (exit 4), and a CA home whose profiles or site parameters differ from the policy
    /// last logged (exit 2).
    pub fn open(
        home: &'t Home,
        keys: &'t dyn Keystore,
        clock: &'t dyn Clock,
    ) -> Result<Self, Error> {
        let mut session = Self::open_unpinned(home, keys, clock)?;
        pinned::check_policy(&home.dir, session.log.policy())?;
        session.policy = session.log.policy().cloned();
        session.close_open_intents()?;
        Ok(session)
    }

    /// [`CaSession::open`] without the policy check, for `hsmca profiles apply` (which logs
    /// the policy) and for logging a module change. Still checks root, log key and log head.
    pub fn open_unpinned(
        home: &'t Home,
        keys: &'t dyn Keystore,
        clock: &'t dyn Clock,
    ) -> Result<Self, Error> {
        let log_key = keys.key(&home.config.log_key.label)?;
        let root = home.root()?;
        let log = Log::open(&home.dir)?;
        let mismatch = |file: &str, message: &str| {
            Error::Home(HomeError::Config {
                path: home.dir.join(file),
                message: message.into(),
            })
        };
        if log.root().cert_der != root.der {
            return Err(mismatch("root.pem", "is not the root recorded in the log"));
        }
        let vkey =
            translog::vkey(&home.config.origin, log_key.public_key()).map_err(Error::Usage)?;
        if vkey != log.root().vkey {
            return Err(mismatch(
                "hsmca.json",
                "the token's log key is not the one recorded in the log",
            ));
        }
        // Entries past the last checkpoint were signed by no one: a process that died before its
        // checkpoint, or entries written by hand (a fabricated revocation would land in the
        // next CRL). An operator looks at them and signs them with `hsmca log recover`.
        if log.unsigned() > 0 {
            return Err(PinnedError::UnsignedTail {
                from: log.size() - log.unsigned(),
                to: log.size() - 1,
            }
            .into());
        }
        let mut compromised = BTreeMap::new();
        for (serial, der) in log.compromised()? {
            if let Ok((key, _)) = crate::verify::key_and_expiry(&der) {
                compromised.insert(key.fingerprint(), serial);
            }
        }
        let head_label = head_label(home);
        for note in keys.log_head(&head_label)? {
            check_head(&log, &note)?;
        }
        Ok(Self {
            home,
            keys,
            clock,
            log,
            log_key,
            issuers: BTreeMap::new(),
            policy: None,
            compromised: Arc::new(compromised),
        })
    }

    /// Closes intents a crashed run left open (nothing was released for them).
    fn close_open_intents(&mut self) -> Result<(), Error> {
        let open = self.log.open_intents();
        if !open.is_empty() {
            let reason = "a previous run stopped before logging the result; nothing was released";
            let bodies = open
                .into_iter()
                .map(|intent_seq| abandon(intent_seq, reason))
                .collect();
            self.append(bodies)?;
        }
        Ok(())
    }

    /// Public keys (SPKI SHA-256) whose certificate was revoked for key compromise, with its
    /// serial: for `policy::Context::compromised`, so no profile issues for them again.
    pub fn compromised(&self) -> Arc<BTreeMap<String, String>> {
        self.compromised.clone()
    }

    /// The hash of the policy every intent of this session is decided under.
    pub fn policy_sha256(&self) -> Option<&str> {
        self.policy.as_ref().map(|p| p.sha256.as_str())
    }

    /// The intent entry for `ready`, under this session's policy.
    pub fn intent(&self, ready: &Ready) -> Body {
        ready.intent(self.policy_sha256())
    }

    /// The CA home.
    pub fn home(&self) -> &'t Home {
        self.home
    }

    /// The token.
    pub fn keys(&self) -> &'t dyn Keystore {
        self.keys
    }

    /// The clock.
    pub fn clock(&self) -> &'t dyn Clock {
        self.clock
    }

    /// The log, for lookups.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// A profile of the CA home, parsed from exactly the bytes the logged policy pinned.
    pub fn profile(&self, name: &str) -> Result<Profile, Error> {
        match &self.policy {
            Some(pin) => pinned::load_profile(self.home, pin, name),
            None => Err(pinned::PinnedError::NoPolicy(self.home.dir.clone()).into()),
        }
    }

    /// The issuer `name` (`root` or an intermediate), its key found in the token and checked
    /// against its certificate the first time it is asked for.
    pub fn issuer(&mut self, name: &str) -> Result<&Issuer<'t>, Error> {
        if !self.issuers.contains_key(name) {
            let (cert, label) = self.home.issuer(name)?;
            let key = self.keys.key_matching(&label, &cert.public_key)?;
            let issuer = Issuer {
                name: name.to_owned(),
                subject: subject_of(&cert),
                cert,
                label,
                key,
            };
            self.issuers.insert(name.to_owned(), issuer);
        }
        self.issuers
            .get(name)
            .ok_or_else(|| Error::Internal(format!("issuer {name:?} vanished")))
    }

    /// `n` serials the log has never used and that differ from each other: 16 random bytes
    /// each (127 bits of entropy), top bit clear and first byte non-zero so the DER INTEGER is
    /// exactly 16 bytes. A generator that keeps repeating itself is a token fault, not a loop.
    pub fn serials(&self, n: usize) -> Result<Vec<Vec<u8>>, Error> {
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(n);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..SERIAL_ROUNDS {
            if out.len() == n {
                return Ok(out);
            }
            let bytes = self.keys.random(16 * (n - out.len()))?;
            for chunk in bytes.chunks(16) {
                let mut s = chunk.to_vec();
                s[0] = (s[0] & 0x7f) | 0x01;
                if !self.log.serial_used(&keys::hex(&s)) && seen.insert(s.clone()) {
                    out.push(s);
                }
            }
        }
        if out.len() == n {
            return Ok(out);
        }
        Err(EngineError::Serials {
            rounds: SERIAL_ROUNDS,
        }
        .into())
    }

    /// One serial; see [`CaSession::serials`].
    pub fn serial(&self) -> Result<Vec<u8>, Error> {
        self.serials(1)?
            .pop()
            .ok_or_else(|| Error::Internal("no serial drawn".into()))
    }

    /// What the log already holds for this CSR under this profile: its certificate is written
    /// again, never issued a second time (the rule for every rerun, whatever the profile says
    /// today: the certificate exists either way).
    pub fn prior(&self, csr_sha256: &str, profile: &str) -> Result<Option<Prior>, Error> {
        Ok(self.log.issued(csr_sha256, profile)?.map(|done| Prior {
            revoked: self.log.is_revoked(&done.serial),
            serial: done.serial,
            log_entry: done.seq,
            der: done.cert_der,
        }))
    }

    /// Appends entries durably (one write, one fsync).
    pub fn append(&mut self, bodies: Vec<Body>) -> Result<Vec<u64>, Error> {
        Ok(self.log.append(bodies, self.clock.now())?)
    }

    /// Signs a checkpoint over the log as it stands, with the token's log key, and keeps a
    /// copy in the token as the log head later commands compare the CA home with.
    pub fn checkpoint(&mut self) -> Result<(), Error> {
        let note_key =
            NoteKey::new(&self.home.config.origin, &*self.log_key).map_err(Error::Usage)?;
        self.log.checkpoint(&note_key)?;
        let note = self.log.latest_checkpoint()?;
        self.keys.store_log_head(&head_label(self.home), &note)?;
        Ok(())
    }

    /// The one-chunk case of issuance, for `sign`, `renew` and `ca create`: every intent in one
    /// durable append, then for each certificate the token's signature and the post-signing
    /// check, then every result in one durable append and a checkpoint. A run that must stop
    /// (see [`Health`]) abandons the intents it did not sign and says why in `halt`; what was
    /// issued before is returned for release as usual.
    pub fn issue(&mut self, ready: Vec<Ready>) -> Result<Issued, Error> {
        let intents = ready.iter().map(|r| self.intent(r)).collect();
        let seqs = self.append(intents)?;
        danger_crash_point("after-intent");
        let mut health = Health::default();
        let mut bodies = Vec::with_capacity(ready.len());
        let mut results = Vec::with_capacity(ready.len());
        for (r, intent_seq) in ready.into_iter().zip(seqs) {
            let result = match health.halt() {
                Some(halt) => Err(Withheld::stopped(halt)),
                None => {
                    let issuer = self.issuer(&r.prepared.decision.issuer)?;
                    let signed = sign_and_check(&r, &issuer.cert, &*issuer.key);
                    health.note(&r, &signed);
                    signed.map_err(|e| Withheld::from_error(&e))
                }
            };
            let (body, result) = settle(&r, intent_seq, result);
            bodies.push(body);
            results.push((r, result));
        }
        let seqs = self.append(bodies)?;
        danger_crash_point("after-cert");
        self.checkpoint()?;
        danger_crash_point("after-checkpoint");
        let certificates = results
            .into_iter()
            .zip(seqs)
            .map(|((ready, result), seq)| Made {
                ready,
                result: result.map(|der| (seq, der)),
            })
            .collect();
        Ok(Issued {
            certificates,
            halt: health.halt().cloned(),
        })
    }
}

/// The label of the token's data object holding the log head of this CA home.
pub fn head_label(home: &Home) -> String {
    format!("{}-head", home.config.log_key.label)
}

/// Refuses a log that does not extend `note`, the checkpoint the token keeps: shorter (a
/// rollback or truncation) or with other entries under it (a rewrite, even one re-chained and
/// re-checkpointed from an older checkpoint).
pub fn check_head(log: &Log, note: &[u8]) -> Result<(), Error> {
    let cp = translog::open_checkpoint(note, &log.root().vkey).map_err(|e| {
        PinnedError::LogHead(format!(
            "the token's log head does not verify with the log key: {e}"
        ))
    })?;
    if cp.size > log.size() {
        return Err(PinnedError::LogHead(format!(
            "the token's head covers {} entries but the log has {}: entries were removed or an older copy was restored",
            cp.size,
            log.size()
        ))
        .into());
    }
    if log.root_at(cp.size) != Some(cp.root) {
        return Err(PinnedError::LogHead(format!(
            "the first {} entries differ from those the token's head signed: history was rewritten",
            cp.size
        ))
        .into());
    }
    Ok(())
}

/// A session that appended entries it did not checkpoint (a plan entry after the last
/// certificate, abandons of a crashed run, a run that stopped on an error) signs them as it
/// ends, so an unsigned tail means a process that died, which `log verify` reports. Best
/// effort: a token that cannot sign now leaves the tail for `hsmca log recover`.
impl Drop for CaSession<'_> {
    fn drop(&mut self) {
        if self.log.unsigned() > 0 {
            let _ = self.checkpoint();
        }
    }
}

/// What [`CaSession::issue`] made: per request, the log entry and DER of its certificate, or
/// why it was withheld; and why the run stopped early, if it did.
pub struct Issued {
    /// In request order.
    pub certificates: Vec<Made>,
    /// Set when the run stopped: the command reports what it has, then exits with its code.
    pub halt: Option<Halt>,
}

/// One request's result: its certificate's log entry and DER, or why it was withheld.
pub struct Made {
    /// The request.
    pub ready: Ready,
    /// `(log entry, DER)`, or why not.
    pub result: Result<(u64, Vec<u8>), Withheld>,
}

/// A certificate the log already holds for a CSR.
#[derive(Debug, Clone)]
pub struct Prior {
    /// Serial, hex.
    pub serial: String,
    /// Its log entry.
    pub log_entry: u64,
    /// The certificate.
    pub der: Vec<u8>,
    /// Revoked since: reported as revoked, never released again as issued.
    pub revoked: bool,
}

/// A decided certificate with its TBS built, waiting for the token.
#[derive(Debug)]
pub struct Ready {
    /// The decision and the exact TBS the token signs.
    pub prepared: Prepared,
    /// SHA-256 of the CSR (or of the proposal, for `ca create`): the key of "already issued".
    pub csr_sha256: String,
    /// The serial this one renews (`renew`).
    pub renews: Option<String>,
}

impl Ready {
    /// Builds the TBS for a decision under its issuer.
    pub fn new(
        decision: Decision,
        issuer: &IssuerCert,
        csr_sha256: String,
        renews: Option<String>,
    ) -> Result<Self, IssueError> {
        Ok(Self {
            prepared: issue::prepare(decision, issuer)?,
            csr_sha256,
            renews,
        })
    }

    /// The serial, hex.
    pub fn serial(&self) -> String {
        keys::hex(&self.prepared.decision.serial)
    }

    /// The intent entry, logged (durably) before the token is asked to sign, naming the policy
    /// it was decided under. The only place an issuance intent is built (sessions call it
    /// through [`CaSession::intent`]).
    pub fn intent(&self, policy_sha256: Option<&str>) -> Body {
        let d = &self.prepared.decision;
        Body::IssueIntent {
            serial: keys::hex(&d.serial),
            profile: d.profile.clone(),
            subject: d.subject_string(),
            sans: d.san_strings(),
            not_before: rfc3339(d.not_before),
            not_after: rfc3339(d.not_after),
            csr_sha256: self.csr_sha256.clone(),
            tbs_sha256: self.prepared.tbs_sha256.clone(),
            renews: self.renews.clone(),
            policy_sha256: policy_sha256.map(str::to_owned),
        }
    }
}

/// Why a certificate was not released: a stable rule id and the cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Withheld {
    /// `token.sign` (the token failed), `verify.issued` (the signed certificate failed its
    /// check), `build` (the certificate could not be assembled), or `run.stopped` (not signed
    /// because the run stopped).
    pub rule: &'static str,
    /// What went wrong.
    pub error: String,
}

impl Withheld {
    /// Why the engine withholds a certificate whose signing or check failed.
    pub fn from_error(e: &IssueError) -> Self {
        let rule = match e {
            IssueError::Sign(_) => "token.sign",
            IssueError::Verify(_) => "verify.issued",
            IssueError::Build(_) | IssueError::Subject(..) => "build",
        };
        Self {
            rule,
            error: crate::error::chain(e),
        }
    }

    /// A certificate not signed because the run stopped before it.
    pub fn stopped(halt: &Halt) -> Self {
        Self {
            rule: "run.stopped",
            error: format!("not signed: the run stopped ({halt})"),
        }
    }
}

/// The token's signature over a prepared TBS and the post-signing check of the result.
pub fn sign_and_check(
    ready: &Ready,
    issuer: &IssuerCert,
    key: &dyn CaSigner,
) -> Result<Vec<u8>, IssueError> {
    let signature = key.sign(&ready.prepared.tbs).map_err(IssueError::Sign)?;
    check(ready, issuer, &signature)
}

/// The certificate around a prepared TBS and the token's signature, checked: signature under
/// the issuer's key, and every field what was decided. A panic in the check is a failed check
/// of this certificate, never a lost outcome.
pub fn check(ready: &Ready, issuer: &IssuerCert, signature: &[u8]) -> Result<Vec<u8>, IssueError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        issue::finish(&ready.prepared, issuer, signature)
    }))
    .unwrap_or_else(|_| {
        Err(IssueError::Build(
            "internal error while checking the signed certificate".into(),
        ))
    })
}

/// The result entry for an intent: the certificate, or an abandonment saying why nothing was
/// released. The only place certificate and issuance-abandon entries are built.
pub fn settle(
    ready: &Ready,
    intent_seq: u64,
    result: Result<Vec<u8>, Withheld>,
) -> (Body, Result<Vec<u8>, Withheld>) {
    let body = match &result {
        Ok(der) => Body::Cert {
            intent_seq,
            serial: ready.serial(),
            profile: ready.prepared.decision.profile.clone(),
            csr_sha256: ready.csr_sha256.clone(),
            cert_sha256: keys::sha256_hex(der),
            cert: B64.encode(der),
        },
        Err(w) => abandon(intent_seq, &format!("not released: {}", w.error)),
    };
    (body, result)
}

/// The entry that closes an intent with nothing released.
pub fn abandon(intent_seq: u64, reason: &str) -> Body {
    Body::Abandon {
        intent_seq,
        reason: reason.to_owned(),
    }
}

/// Watches a run's signatures and says when it must stop: at the first certificate that fails
/// its post-signing check (exit 5), or after [`TOKEN_FAILURES_IN_A_ROW`] token failures in a
/// row (exit 3).
#[derive(Debug, Default)]
pub struct Health {
    failures_in_a_row: usize,
    halt: Option<Halt>,
}

impl Health {
    /// Records one certificate's outcome.
    pub fn note(&mut self, ready: &Ready, result: &Result<Vec<u8>, IssueError>) {
        match result {
            Ok(_) => self.failures_in_a_row = 0,
            Err(IssueError::Sign(e)) => {
                self.failures_in_a_row += 1;
                if self.failures_in_a_row >= TOKEN_FAILURES_IN_A_ROW && self.halt.is_none() {
                    self.halt = Some(Halt::TokenFailing {
                        count: self.failures_in_a_row,
                        cause: e.to_string(),
                    });
                }
            }
            Err(e) => {
                if self.halt.is_none() || matches!(self.halt, Some(Halt::TokenFailing { .. })) {
                    self.halt = Some(Halt::BadCertificate {
                        serial: ready.serial(),
                        cause: crate::error::chain(e),
                    });
                }
            }
        }
    }

    /// Why the run must stop, if it must.
    pub fn halt(&self) -> Option<&Halt> {
        self.halt.as_ref()
    }
}

/// Writes a released certificate (or kubeconfig, or status object): the one rule for an output
/// that cannot be written. The certificate is already durable in the log, so the failure is
/// this item's alone; the rest of the run goes on, and the same command run again writes it.
pub fn release(path: &Path, bytes: &[u8], serial: &str) -> Result<(), Withheld> {
    match files::write_new(path, bytes) {
        Ok(Written::Created | Written::AlreadyPresent) => Ok(()),
        Err(e) => Err(Withheld {
            rule: "output.write",
            error: format!(
                "serial {serial} is issued and logged, but {}; run the same command again (it \
                 writes it and issues nothing twice), or give another --out",
                crate::error::chain(&e)
            ),
        }),
    }
}

/// The issuer's subject, for reports.
pub fn subject_of(cert: &IssuerCert) -> String {
    use x509_cert::der::Decode;
    x509_cert::Certificate::from_der(&cert.der)
        .map(|c| c.tbs_certificate().subject().to_string())
        .unwrap_or_default()
}

/// PEM-encodes DER.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Test hook for crash tests: `HSMCA_DANGER_CRASH_AT=after-intent|after-cert|after-checkpoint`
/// aborts the process at that point, as a kill -9 or power cut would. Never set it in
/// production; it exists so the suite can prove that a rerun finishes without issuing twice.
pub(crate) fn danger_crash_point(name: &str) {
    if std::env::var("HSMCA_DANGER_CRASH_AT").is_ok_and(|v| v == name) {
        std::process::abort();
    }
}

/// The default output path of a CSR's certificate: beside it, or in `out`.
pub fn out_path(out: Option<&Path>, single: bool, csr: &Path) -> PathBuf {
    let stem = csr
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cert".into());
    match out {
        Some(out) if single && !out.is_dir() => out.to_path_buf(),
        Some(dir) => dir.join(format!("{stem}.crt")),
        None => csr.with_file_name(format!("{stem}.crt")),
    }
}

#[cfg(test)]
mod tests {
    use ring::signature::{Ed25519KeyPair, KeyPair};

    use super::*;
    use crate::keys::PublicKey;
    use crate::signer::SignError;

    /// A software Ed25519 log key, so the head rule is tested without a token.
    struct Ed(Ed25519KeyPair, PublicKey);

    impl CaSigner for Ed {
        fn public_key(&self) -> &PublicKey {
            &self.1
        }
        fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, SignError> {
            Ok(self.0.sign(msg).as_ref().to_vec())
        }
    }

    fn ed() -> Ed {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let mut spki = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        spki.extend_from_slice(pair.public_key().as_ref());
        let public = PublicKey::from_spki_der(&spki).unwrap();
        Ed(pair, public)
    }

    /// A log in `dir` with the root entry and one plan entry per hash, checkpointed.
    fn log(dir: &Path, key: &Ed, plans: &[&str]) -> Log {
        let origin = "test/head";
        let now = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let root = Body::Root {
            subject: "CN=Root".into(),
            serial: "01".into(),
            key_type: "ed25519".into(),
            key_label: "root".into(),
            spki_sha256: String::new(),
            cert_sha256: keys::sha256_hex(&[]),
            cert: String::new(),
            origin: origin.into(),
            log_vkey: translog::vkey(origin, &key.1).unwrap(),
            tool: "test".into(),
        };
        let note_key = NoteKey::new(origin, key).unwrap();
        let mut log = Log::create(dir, root, now, &note_key).unwrap();
        let bodies = plans
            .iter()
            .map(|h| Body::Plan {
                plan_sha256: (*h).into(),
                to_issue: 1,
            })
            .collect();
        log.append(bodies, now).unwrap();
        log.checkpoint(&note_key).unwrap();
        log
    }

    #[test]
    fn a_log_must_extend_the_head_the_token_keeps() {
        let key = ed();
        let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let head = log(dirs[0].path(), &key, &["a", "b"])
            .latest_checkpoint()
            .unwrap();
        // The same history, and a longer one: accepted.
        assert!(check_head(&log(dirs[1].path(), &key, &["a", "b"]), &head).is_ok());
        assert!(check_head(&log(dirs[2].path(), &key, &["a", "b", "c"]), &head).is_ok());
        // Rolled back (shorter) or rewritten (same size, other entries): refused.
        let shorter = check_head(&log(dirs[3].path(), &key, &["a"]), &head).unwrap_err();
        assert!(
            shorter
                .to_string()
                .contains("covers 3 entries but the log has 2"),
            "{shorter}"
        );
        assert_eq!(shorter.exit_code(), 4);
        let other = tempfile::tempdir().unwrap();
        let rewritten = check_head(&log(other.path(), &key, &["a", "x"]), &head).unwrap_err();
        assert!(
            rewritten.to_string().contains("history was rewritten"),
            "{rewritten}"
        );
        // A head signed by another key is not trusted.
        let stranger = tempfile::tempdir().unwrap();
        let foreign = log(stranger.path(), &ed(), &["a", "b"])
            .latest_checkpoint()
            .unwrap();
        let err = check_head(
            &log(tempfile::tempdir().unwrap().path(), &key, &["a", "b"]),
            &foreign,
        );
        assert!(err.unwrap_err().to_string().contains("does not verify"));
    }
}
