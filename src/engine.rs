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
use crate::signer::{CaSigner, FaultKind, FaultStreak, Keystore};

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
    /// SIGINT or SIGTERM asked the run to stop: the certificates in flight were finished or
    /// abandoned as on a crash, and nothing more was signed.
    #[error("stopped by {}", .signal.name())]
    Interrupted {
        /// The signal.
        signal: crate::signals::Signal,
    },
    /// Signatures failed in the token: several in a row, or one that leaves it unusable (a
    /// lost session, a setup problem).
    #[error("the token is failing ({count} failed signature(s) in a row); the last: {cause}")]
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
        let open = self.log.open_intents()?;
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
        crate::rng::unique_serials(
            |len| self.keys.random(len),
            |s| self.log.serial_used(&keys::hex(s)),
            n,
        )
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
        if ready.is_empty() {
            return Ok(Issued {
                certificates: Vec::new(),
                halt: None,
            });
        }
        let intents = ready.iter().map(|r| self.intent(r)).collect();
        let seqs = self.append(intents)?;
        danger_crash_point("after-intent");
        let mut health = Health::default();
        let mut bodies = Vec::with_capacity(ready.len());
        let mut results = Vec::with_capacity(ready.len());
        for (r, intent_seq) in ready.into_iter().zip(seqs) {
            let result = match health.halt().cloned() {
                Some(halt) => Err(Withheld::stopped(&halt)),
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

/// The entry that records a batch's plan: the hash reviewers saw (or, for `sign-dir INPUT`, of
/// the items it decided) and how many certificates it was to issue.
pub fn plan(hash: &str, to_issue: u64) -> Body {
    Body::Plan {
        plan_sha256: hash.to_owned(),
        to_issue,
    }
}

/// The entry that closes an intent with nothing released.
pub fn abandon(intent_seq: u64, reason: &str) -> Body {
    Body::Abandon {
        intent_seq,
        reason: reason.to_owned(),
    }
}

/// Watches a run's signatures and says when it must stop: at the first certificate that fails
/// its post-signing check, or a signature the token got wrong (exit 5); when the token fails
/// [`crate::signer::MAX_CONSECUTIVE_FAULTS`] signatures in a row, or once in a way that leaves
/// it unusable (exit 3). [`crate::signer::FaultStreak`] decides which token faults stop it.
#[derive(Debug, Default)]
pub struct Health {
    streak: FaultStreak,
    failures_in_a_row: usize,
    halt: Option<Halt>,
}

impl Health {
    /// Records one certificate's outcome.
    pub fn note(&mut self, ready: &Ready, result: &Result<Vec<u8>, IssueError>) {
        let stop = match result {
            Ok(_) => {
                self.failures_in_a_row = 0;
                self.streak.record(Ok(()))
            }
            Err(IssueError::Sign(e)) => {
                self.failures_in_a_row += 1;
                self.streak.record(Err(e))
            }
            Err(e) => {
                self.halt = Some(Halt::BadCertificate {
                    serial: ready.serial(),
                    cause: crate::error::chain(e),
                });
                return;
            }
        };
        if self.halt.is_some() {
            return;
        }
        self.halt = match (stop, result) {
            (Some(FaultKind::BadSignature), Err(e)) => Some(Halt::BadCertificate {
                serial: ready.serial(),
                cause: crate::error::chain(e),
            }),
            (Some(_), Err(e)) => Some(Halt::TokenFailing {
                count: self.failures_in_a_row,
                cause: crate::error::chain(e),
            }),
            _ => None,
        };
    }

    /// Why the run must stop, if it must. A stop signal (SIGINT, SIGTERM) received since the
    /// handlers were installed stops it too, unless it is already stopping for a worse reason.
    pub fn halt(&mut self) -> Option<&Halt> {
        if self.halt.is_none()
            && let Some(signal) = crate::signals::requested()
        {
            self.halt = Some(Halt::Interrupted { signal });
        }
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
    //! The engine in-process, on software keys: no SoftHSM, no binary. The end-to-end tests on
    //! SoftHSM (tests/) prove the same rules against the real token.
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    use super::*;
    use crate::ceremony::{self, CaRequest, InitRequest, Place};
    use crate::clock::SystemClock;
    use crate::keys::PublicKey;
    use crate::profile::{Duration, Site};
    use crate::sign::{self, SignRequest};
    use crate::signer::SignError;
    use crate::token::TokenRef;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Fault {
        Healthy,
        Fail,
        Corrupt,
    }

    /// A key in memory that can be told to fail or to sign wrongly.
    struct SoftKey {
        pair: rcgen::KeyPair,
        public: PublicKey,
        fault: Fault,
    }

    impl CaSigner for SoftKey {
        fn public_key(&self) -> &PublicKey {
            &self.public
        }

        fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, SignError> {
            use rcgen::SigningKey;
            let token = |m: String| SignError::new(FaultKind::Token, m);
            if self.fault == Fault::Fail {
                return Err(token("C_Sign returned CKR_DEVICE_ERROR".into()));
            }
            let mut sig = self.pair.sign(tbs).map_err(|e| token(e.to_string()))?;
            if self.fault == Fault::Corrupt
                && let Some(last) = sig.last_mut()
            {
                *last ^= 1;
            }
            Ok(sig)
        }
    }

    /// A token in memory: P-256 keys by label; faults apply to every key but the log's.
    #[derive(Default)]
    struct SoftToken {
        keys: RefCell<HashMap<String, Vec<u8>>>,
        fault: Cell<Option<Fault>>,
    }

    impl SoftToken {
        fn load(&self, label: &str) -> Result<Box<dyn CaSigner + Send>, crate::Error> {
            let der = self.keys.borrow().get(label).cloned().ok_or_else(|| {
                crate::Error::Usage(format!("no key {label:?} in the soft token"))
            })?;
            let pair = rcgen::KeyPair::try_from(der.as_slice())
                .map_err(|e| crate::Error::Internal(e.to_string()))?;
            let public =
                PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&pair))
                    .map_err(|e| crate::Error::Internal(e.to_string()))?;
            let fault = match self.fault.get() {
                Some(f) if !label.ends_with("-log") => f,
                _ => Fault::Healthy,
            };
            Ok(Box::new(SoftKey {
                pair,
                public,
                fault,
            }))
        }
    }

    impl Keystore for SoftToken {
        fn random(&self, len: usize) -> Result<Vec<u8>, crate::Error> {
            let mut out = vec![0; len];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out)
                .map_err(|_| crate::Error::Internal("no OS randomness".into()))?;
            Ok(out)
        }

        fn key(&self, label: &str) -> Result<Box<dyn CaSigner + '_>, crate::Error> {
            Ok(self.load(label)?)
        }

        fn key_matching(
            &self,
            label: &str,
            expected: &PublicKey,
        ) -> Result<Box<dyn CaSigner + '_>, crate::Error> {
            let key = self.load(label)?;
            assert_eq!(key.public_key(), expected, "{label}");
            Ok(key)
        }

        fn generate_key_pair(
            &self,
            key_type: KeyType,
            label: &str,
            _id: &[u8],
        ) -> Result<PublicKey, crate::Error> {
            assert_eq!(
                key_type,
                KeyType::EcdsaP256,
                "the soft token makes P-256 keys"
            );
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| crate::Error::Internal(e.to_string()))?;
            let public =
                PublicKey::from_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&pair))
                    .map_err(|e| crate::Error::Internal(e.to_string()))?;
            self.keys
                .borrow_mut()
                .insert(label.to_owned(), pair.serialize_der());
            Ok(public)
        }

        fn existing(
            &self,
            _label: &str,
        ) -> Result<Option<crate::token::ExistingKey>, crate::Error> {
            // The soft token never keeps a half-made key across runs.
            Ok(None)
        }

        fn workers(
            &self,
            label: &str,
            _expected: &PublicKey,
            count: usize,
        ) -> Result<Vec<Box<dyn CaSigner + Send>>, crate::Error> {
            (0..count).map(|_| self.load(label)).collect()
        }
    }

    /// A CA home with a kubernetes-ca intermediate, made by the ceremonies on the soft token.
    fn ca(dir: &Path, token: &SoftToken) -> Home {
        let req = InitRequest {
            home: dir.join("ca"),
            module: crate::pinned::ModuleFile {
                path: PathBuf::from("/nonexistent/soft-token.so"),
                sha256: keys::sha256_hex(b"a software token"),
            },
            record_module: false,
            token: TokenRef {
                token: "soft".into(),
                object: None,
                id: None,
            },
            key_type: KeyType::EcdsaP256,
            subject: "CN=Soft Root".into(),
            validity: Duration::parse("3650d").unwrap(),
            key_label: "root".into(),
            log_key_type: Some(KeyType::EcdsaP256),
            origin: None,
            profiles_from: None,
            site: Site::default(),
            site_given: std::collections::BTreeSet::new(),
        };
        let profiles = ceremony::collect_profiles(None, &req.site).unwrap();
        let place = Place {
            parent: dir.to_path_buf(),
            name: "ca".into(),
            token: "soft".into(),
            log_type: KeyType::EcdsaP256,
        };
        ceremony::init_with(&req, &place, &profiles, token, &SystemClock).unwrap();
        let home = Home::open(&dir.join("ca")).unwrap();
        let create = CaRequest {
            name: "kubernetes-ca".into(),
            profile: "kubernetes-ca".into(),
            subject: "CN=kubernetes-ca".into(),
            key_type: KeyType::EcdsaP256,
            // Inside the root's ten years, whatever second this runs in.
            validity: Some(Duration::parse("3000d").unwrap()),
            key_label: None,
        };
        ceremony::create_ca(&home, &create, token, &SystemClock).unwrap();
        Home::open(&dir.join("ca")).unwrap()
    }

    fn csr(dir: &Path, name: &str, cn: &str) -> PathBuf {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let path = dir.join(format!("{name}.csr"));
        std::fs::write(&path, p.serialize_request(&key).unwrap().pem().unwrap()).unwrap();
        path
    }

    fn request(dir: &Path, profile: &str, csrs: Vec<PathBuf>) -> SignRequest {
        SignRequest {
            profile: profile.into(),
            csrs,
            out: Some(dir.join("out")),
            chain: false,
            validity: None,
        }
    }

    fn rules(outcomes: &[Outcome]) -> Vec<String> {
        outcomes
            .iter()
            .map(|o| match o {
                Outcome::Issued { .. } => "issued".to_owned(),
                Outcome::WouldIssue { .. } => "would-issue".to_owned(),
                Outcome::Refused { refusals, .. } => refusals[0].rule.clone(),
                Outcome::Failed { rule, .. } => rule.clone(),
            })
            .collect()
    }

    fn log_verifies(home: &Home) {
        let report =
            crate::log::verify(&crate::log::Paths::of_home(&home.dir), None, None).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.unsigned_tail, 0);
    }

    #[test]
    fn issues_refuses_and_stops_by_one_rule_without_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let token = SoftToken::default();
        let home = ca(dir.path(), &token);
        std::fs::create_dir(dir.path().join("out")).unwrap();

        // A leaf under its profile is issued, logged and released.
        let a = csr(dir.path(), "a", "system:kube-proxy");
        let signed = sign::sign(
            &home,
            &request(dir.path(), "kube-proxy", vec![a.clone()]),
            &token,
            &SystemClock,
        )
        .unwrap();
        assert_eq!(rules(&signed.outcomes), ["issued"]);
        assert!(signed.halt.is_none());
        assert!(dir.path().join("out/a.crt").exists());
        // The same CSR again is written again, never issued twice.
        let again = sign::sign(
            &home,
            &request(dir.path(), "kube-proxy", vec![a]),
            &token,
            &SystemClock,
        )
        .unwrap();
        assert!(matches!(
            again.outcomes[0],
            Outcome::Issued {
                already_issued: true,
                ..
            }
        ));

        // A CA profile is refused by the policy before the token is asked.
        let rogue = csr(dir.path(), "rogue", "kubernetes-ca");
        let refused = sign::sign(
            &home,
            &request(dir.path(), "kubernetes-ca", vec![rogue]),
            &token,
            &SystemClock,
        )
        .unwrap();
        assert_eq!(rules(&refused.outcomes), ["profile.ca"]);

        // A token that signs wrongly: withheld, and the run stops at once (exit 5).
        token.fault.set(Some(Fault::Corrupt));
        let b = csr(dir.path(), "b", "system:kube-proxy");
        let c = csr(dir.path(), "c", "system:kube-proxy");
        let bad = sign::sign(
            &home,
            &request(dir.path(), "kube-proxy", vec![b.clone(), c.clone()]),
            &token,
            &SystemClock,
        )
        .unwrap();
        assert_eq!(rules(&bad.outcomes), ["verify.issued", "run.stopped"]);
        assert!(matches!(bad.halt, Some(Halt::BadCertificate { .. })));
        let code = crate::Error::from(EngineError::Halt(bad.halt.unwrap())).exit_code();
        assert_eq!(code, 5);
        assert!(!dir.path().join("out/b.crt").exists());

        // A failing token: three failures in a row stop the run (exit 3); the rest is not signed.
        token.fault.set(Some(Fault::Fail));
        let more: Vec<PathBuf> = (0..5)
            .map(|i| csr(dir.path(), &format!("d{i}"), "system:kube-proxy"))
            .collect();
        let failing = sign::sign(
            &home,
            &request(dir.path(), "kube-proxy", more.clone()),
            &token,
            &SystemClock,
        )
        .unwrap();
        assert_eq!(
            rules(&failing.outcomes),
            [
                "token.sign",
                "token.sign",
                "token.sign",
                "run.stopped",
                "run.stopped"
            ]
        );
        let code = crate::Error::from(EngineError::Halt(failing.halt.unwrap())).exit_code();
        assert_eq!(code, 3);
        log_verifies(&home);

        // The healthy token finishes the work; each CSR gets one certificate.
        token.fault.set(None);
        let mut all = vec![b, c];
        all.extend(more);
        let done = sign::sign(
            &home,
            &request(dir.path(), "kube-proxy", all),
            &token,
            &SystemClock,
        )
        .unwrap();
        assert!(done.outcomes.iter().all(Outcome::ok), "{:?}", done.outcomes);
        log_verifies(&home);
        let log = crate::log::records(&home.dir, &crate::log::Query::default()).unwrap();
        let leaves = log.iter().filter(|r| r.profile == "kube-proxy").count();
        assert_eq!(leaves, 8, "a, b, c and d0-d4, once each");
    }

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
