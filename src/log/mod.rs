//! The issuance log: append-only, tamper-evident, crash-safe.
//!
//! Files under `HOME/log/`: `entries.jsonl` (one entry per line, each a Merkle leaf),
//! `checkpoint` (latest signed checkpoint), `checkpoints/<size>` (every checkpoint ever signed,
//! write-once) and `log.vkey` (the verifier key). `HOME/LOCK` is held exclusively by the one
//! writer. Appends are one `write` plus `fsync`; a failed write is cut back before returning,
//! a failed fsync poisons the writer (Linux may have dropped the pages; retrying would lie).
//!
//! Normal commands never repair anything: a torn last line stops them with a pointer to
//! `hsmca log recover`, which quarantines the bytes and logs that it did.

pub mod entry;
pub mod translog;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use time::OffsetDateTime;

use crate::clock::rfc3339;
use crate::files;
use crate::keys::{self, PublicKey};
use crate::signer::{FaultKind, SignError};
pub use entry::{Body, Entry};
use translog::{NoteKey, Tree};

/// Longest accepted line (tlog-tiles entry bundles hold at most 65 535 bytes per entry).
pub const MAX_LINE: usize = 65_535;

/// Paths of a log directory.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `HOME/log`.
    pub dir: PathBuf,
}

impl Paths {
    /// The log of a CA home.
    pub fn of_home(home: &Path) -> Self {
        Self {
            dir: home.join("log"),
        }
    }
    /// `entries.jsonl`.
    pub fn entries(&self) -> PathBuf {
        self.dir.join("entries.jsonl")
    }
    /// Latest checkpoint.
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }
    /// Directory of all checkpoints.
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }
    /// Verifier key file.
    pub fn vkey(&self) -> PathBuf {
        self.dir.join("log.vkey")
    }
    /// Where torn tails are kept.
    pub fn quarantine(&self) -> PathBuf {
        self.dir.join("quarantine")
    }
}

/// A log failure. Anything here stops the command before more is signed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// File-system failure.
    #[error("{}: I/O error on the issuance log", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// fsync failed: the log may not be durable; nothing more is released.
    #[error("{}: fsync failed; the last entries may not be on disk and nothing was released", .path.display())]
    Sync {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process holds the lock.
    #[error("{}: another hsmca process is writing to this CA home", .0.display())]
    Locked(PathBuf),
    /// The last line is incomplete.
    #[error(
        "entry {entry}: incomplete last line ({} after the last newline): a write was interrupted or the file was truncated",
        crate::names::count(*bytes, "byte", "bytes")
    )]
    TornTail {
        /// The entry number the torn line would have had.
        entry: u64,
        /// Bytes after the last newline.
        bytes: u64,
    },
    /// The log fails verification.
    #[error("the issuance log fails verification: {0}")]
    Corrupt(Problem),
    /// A checkpoint could not be made or read.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The token failed to sign a checkpoint, or signed it wrongly: a token fault, not a log
    /// problem (its [`SignError::kind`] decides the exit code).
    #[error("checkpoint: {0}")]
    CheckpointSign(SignError),
    /// The writer hit an fsync failure earlier.
    #[error("the log writer stopped after an earlier fsync failure")]
    Poisoned,
    /// An entry would be longer than [`MAX_LINE`].
    #[error("a log entry of {0} bytes exceeds the {MAX_LINE}-byte limit")]
    TooLong(usize),
}

impl LogError {
    /// What to do next.
    pub fn hint(&self) -> Option<&'static str> {
        Some(match self {
            Self::Locked(_) => {
                "wait for the other hsmca command to finish; the lock is released when it exits"
            }
            Self::TornTail { .. } => {
                "run `hsmca log recover --home DIR`: it sets the torn bytes aside and logs the recovery"
            }
            Self::Corrupt(_) => {
                "run `hsmca log verify --home DIR` for the full report and restore the log from a ceremony backup"
            }
            Self::Sync { .. } | Self::Poisoned => {
                "check the disk (space, errors); rerun the command: it finishes the work without issuing twice"
            }
            _ => return None,
        })
    }
}

/// One verification finding, pinned to an entry where possible.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// The entry it concerns.
    pub entry: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.entry {
            Some(n) => write!(f, "entry {n}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens a file of the CA home's log without following a symlink (`O_NOFOLLOW`) and refuses
/// anything but a regular file (checked on the opened descriptor): a symlink planted in the
/// home must not turn an append or a truncation into a write elsewhere.
fn open_regular(opts: &mut OpenOptions, path: &Path) -> Result<File, LogError> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let file = opts.custom_flags(flags.bits()).open(path).map_err(|e| {
        let source = if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
            io::Error::other("is a symlink; the log is never opened through one")
        } else {
            e
        };
        io_at(path)(source)
    })?;
    let meta = file.metadata().map_err(io_at(path))?;
    if !meta.is_file() {
        return Err(io_at(path)(io::Error::other("not a regular file")));
    }
    Ok(file)
}

/// The whole of a small CA-home file (a checkpoint, the verifier key), read without following a
/// symlink and only if it is a regular file.
fn read_regular(path: &Path) -> Result<Vec<u8>, LogError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_regular(OpenOptions::new().read(true), path)?
        .read_to_end(&mut bytes)
        .map_err(io_at(path))?;
    Ok(bytes)
}

/// The root entry's facts the rest of the log is checked against.
#[derive(Debug, Clone)]
pub struct RootInfo {
    /// Log origin.
    pub origin: String,
    /// Verifier key.
    pub vkey: String,
    /// Root certificate DER.
    pub cert_der: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Intent {
    serial: String,
    tbs_sha256: String,
    csr_sha256: String,
    profile: String,
}

/// The policy in force, as the last `policy` entry recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPin {
    /// Its entry.
    pub seq: u64,
    /// Its hash (see [`policy_sha256`]).
    pub sha256: String,
    /// SHA-256 of each file, by path relative to the CA home.
    pub files: std::collections::BTreeMap<String, String>,
    /// Where its line is in `entries.jsonl`: (offset, length).
    at: (u64, usize),
}

/// The PKCS#11 module, as the last `module` entry recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModulePin {
    /// Its entry.
    pub seq: u64,
    /// Canonical path.
    pub path: String,
    /// SHA-256 of the file.
    pub sha256: String,
}

/// The one hash of a policy: SHA-256 of the JSON of its per-file hashes (sorted by path), so
/// anyone can recompute it from a `policy` entry or from the files of a CA home.
pub fn policy_sha256(files: &std::collections::BTreeMap<String, String>) -> String {
    keys::sha256_hex(&serde_json::to_vec(files).unwrap_or_default())
}

/// A certificate already in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// Entry number of the `cert` entry.
    pub seq: u64,
    /// Serial, hex.
    pub serial: String,
    /// DER.
    pub cert_der: Vec<u8>,
}

/// A 128-bit digest of a serial or lookup key: the log's indexes hold these instead of strings,
/// which keeps a CA with hundreds of thousands of certificates in modest memory.
fn key(s: &str) -> u128 {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    u128::from_be_bytes(b)
}

/// The log's index key for a (CSR, profile) pair.
pub(crate) fn issued_key(csr_sha256: &str, profile: &str) -> u128 {
    key(&format!("{csr_sha256}\n{profile}"))
}

/// Everything learnt by reading the log once.
#[derive(Debug, Default)]
struct Scan {
    tree: Tree,
    valid_len: u64,
    root: Option<RootInfo>,
    serials: HashSet<u128>,
    intents: HashMap<u64, Intent>,
    resolved: HashSet<u64>,
    issued: HashMap<u128, (u64, u64, usize)>,
    counts: HashMap<&'static str, u64>,
    problems: Vec<Problem>,
    torn: Option<(u64, u64)>,
    /// Where each serial's certificate entry is: (seq, offset, length).
    cert_at: HashMap<u128, (u64, u64, usize)>,
    /// Revoked serials and the entry that revoked them.
    revoked: HashMap<u128, u64>,
    /// Open or resolved CRL intents: issuer, number, TBS hash.
    crl_intents: HashMap<u64, (String, u64, String)>,
    /// Highest cRLNumber used per issuer.
    crl_numbers: HashMap<String, u64>,
    /// Subject DER and key of the root and of every CA certificate seen so far.
    ca_keys: Vec<(Vec<u8>, PublicKey)>,
    /// Entries `0..chain_verified` are proven intact by a later entry's `prev`.
    chain_verified: u64,
    /// The last `policy` entry.
    policy: Option<PolicyPin>,
    /// The last `module` entry.
    module: Option<ModulePin>,
    /// The last `recovery` entry.
    last_recovery: Option<u64>,
    /// Certificates revoked for key compromise: (serial, where the cert entry is).
    compromised: Vec<(String, (u64, u64, usize))>,
}

impl Scan {
    fn problem(&mut self, entry: Option<u64>, message: impl Into<String>) {
        self.problems.push(Problem {
            entry,
            message: message.into(),
        });
    }

    /// Reads `entries.jsonl`. With `deep`, also checks every certificate's hash and signature.
    fn read(path: &Path, deep: bool) -> Result<Self, LogError> {
        let file = open_regular(OpenOptions::new().read(true), path)?;
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let mut scan = Self::default();
        let mut line = Vec::new();
        let mut offset = 0u64;
        let (mut order_reported, mut chain_reported) = (false, false);
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(io_at(path))?;
            if n == 0 {
                break;
            }
            let seq = scan.tree.size();
            if line.last() != Some(&b'\n') {
                scan.torn = Some((seq, n as u64));
                break;
            }
            let leaf = &line[..line.len() - 1];
            let prev = translog::b64(&scan.tree.root());
            match serde_json::from_slice::<Entry>(leaf) {
                Err(e) => scan.problem(Some(seq), format!("not a valid log entry ({e})")),
                Ok(entry) => {
                    if entry.seq != seq && !order_reported {
                        order_reported = true;
                        scan.problem(
                            Some(seq),
                            format!(
                                "has seq {}: an entry is missing, inserted or out of order here",
                                entry.seq
                            ),
                        );
                    } else if entry.prev == prev && !chain_reported && !order_reported {
                        scan.chain_verified = seq;
                    } else if entry.prev != prev && !chain_reported && !order_reported {
                        chain_reported = true;
                        let altered = seq.saturating_sub(1);
                        scan.problem(Some(altered), format!("was altered: entry {seq}'s chain hash no longer matches the entries before it"));
                    }
                    scan.note(seq, offset, leaf.len(), entry, deep);
                }
            }
            scan.tree.push(leaf);
            offset += n as u64;
            scan.valid_len = offset;
        }
        Ok(scan)
    }

    fn note(&mut self, seq: u64, offset: u64, len: usize, entry: Entry, deep: bool) {
        *self.counts.entry(entry.body.kind()).or_default() += 1;
        match entry.body {
            Body::Root {
                origin,
                log_vkey,
                cert,
                cert_sha256,
                ..
            } => {
                if seq != 0 || self.root.is_some() {
                    self.problem(Some(seq), "a second root entry");
                    return;
                }
                let der = B64.decode(cert).unwrap_or_default();
                if keys::sha256_hex(&der) != cert_sha256 {
                    self.problem(
                        Some(seq),
                        "root certificate does not match its recorded SHA-256",
                    );
                }
                self.root = Some(RootInfo {
                    origin,
                    vkey: log_vkey,
                    cert_der: der,
                });
            }
            Body::IssueIntent {
                serial,
                tbs_sha256,
                csr_sha256,
                profile,
                policy_sha256,
                ..
            } => {
                if let Some(used) = policy_sha256 {
                    let in_force = self.policy.as_ref().map(|p| p.sha256.as_str());
                    if in_force != Some(used.as_str()) {
                        self.problem(
                            Some(seq),
                            format!(
                                "was decided under policy {used}, but the policy in force was {}",
                                in_force.unwrap_or("none")
                            ),
                        );
                    }
                }
                if !self.serials.insert(key(&serial)) {
                    self.problem(Some(seq), format!("serial {serial} is used twice"));
                }
                self.intents.insert(
                    seq,
                    Intent {
                        serial,
                        tbs_sha256,
                        csr_sha256,
                        profile,
                    },
                );
            }
            Body::Cert {
                intent_seq,
                serial,
                cert,
                cert_sha256,
                csr_sha256,
                profile,
            } => {
                // A resolved intent is no longer needed: dropping it keeps memory flat.
                let Some(intent) = self.intents.remove(&intent_seq) else {
                    self.problem(
                        Some(seq),
                        format!("certificate for intent {intent_seq}, which is not an intent"),
                    );
                    return;
                };
                if !self.resolved.insert(intent_seq) {
                    self.problem(Some(seq), format!("intent {intent_seq} is resolved twice"));
                }
                if intent.serial != serial
                    || intent.csr_sha256 != csr_sha256
                    || intent.profile != profile
                {
                    self.problem(
                        Some(seq),
                        format!(
                            "does not match its intent {intent_seq} (serial, CSR or profile differ)"
                        ),
                    );
                }
                if deep {
                    self.check_cert(seq, &cert, &cert_sha256, &intent);
                }
                self.cert_at.insert(key(&serial), (seq, offset, len));
                self.issued
                    .insert(issued_key(&csr_sha256, &profile), (seq, offset, len));
            }
            Body::Revocation { serial, reason, .. } => {
                if reason == "key-compromise"
                    && let Some(at) = self.cert_at.get(&key(&serial))
                {
                    self.compromised.push((serial.clone(), *at));
                }
                if !self.cert_at.contains_key(&key(&serial)) {
                    self.problem(
                        Some(seq),
                        format!("revokes serial {serial}, which this log never issued"),
                    );
                } else if self.revoked.insert(key(&serial), seq).is_some() {
                    self.problem(Some(seq), format!("revokes serial {serial} a second time"));
                }
            }
            Body::CrlIntent {
                issuer,
                crl_number,
                tbs_sha256,
                ..
            } => {
                let last = self.crl_numbers.get(&issuer).copied().unwrap_or(0);
                if crl_number <= last {
                    self.problem(Some(seq), format!("CRL number {crl_number} for {issuer:?} does not increase (last was {last})"));
                }
                self.crl_numbers
                    .insert(issuer.clone(), crl_number.max(last));
                self.crl_intents
                    .insert(seq, (issuer, crl_number, tbs_sha256));
            }
            Body::Crl {
                intent_seq,
                issuer,
                crl_number,
                crl_sha256,
                crl,
            } => {
                let Some((i_issuer, i_number, tbs_sha256)) =
                    self.crl_intents.get(&intent_seq).cloned()
                else {
                    self.problem(
                        Some(seq),
                        format!("CRL for intent {intent_seq}, which is not a CRL intent"),
                    );
                    return;
                };
                if !self.resolved.insert(intent_seq) {
                    self.problem(Some(seq), format!("intent {intent_seq} is resolved twice"));
                }
                if i_issuer != issuer || i_number != crl_number {
                    self.problem(
                        Some(seq),
                        format!("does not match its intent {intent_seq} (issuer or number differ)"),
                    );
                }
                if deep {
                    self.check_crl(seq, &crl, &crl_sha256, &tbs_sha256);
                }
            }
            Body::Abandon { intent_seq, .. } => {
                let known = self.intents.contains_key(&intent_seq)
                    || self.crl_intents.contains_key(&intent_seq);
                if !known || !self.resolved.insert(intent_seq) {
                    self.problem(
                        Some(seq),
                        format!("abandons {intent_seq}, which is not an open intent"),
                    );
                }
            }
            Body::Policy {
                policy_sha256: recorded,
                files,
                ..
            } => {
                if policy_sha256(&files) != recorded {
                    self.problem(
                        Some(seq),
                        "the policy's hash does not match the file hashes it lists",
                    );
                }
                self.policy = Some(PolicyPin {
                    seq,
                    sha256: recorded,
                    files,
                    at: (offset, len),
                });
            }
            Body::Module { path, sha256 } => {
                self.module = Some(ModulePin { seq, path, sha256 });
            }
            Body::Recovery { .. } => self.last_recovery = Some(seq),
            Body::Plan { .. } => {}
        }
    }

    fn check_cert(&mut self, seq: u64, cert_b64: &str, cert_sha256: &str, intent: &Intent) {
        let der = B64.decode(cert_b64).unwrap_or_default();
        if keys::sha256_hex(&der) != cert_sha256 {
            self.problem(Some(seq), "certificate does not match its recorded SHA-256");
            return;
        }
        let tbs = crate::asn1::first_inner_element(&der).unwrap_or_default();
        if keys::sha256_hex(tbs) != intent.tbs_sha256 {
            self.problem(
                Some(seq),
                "certificate's TBS differs from the one its intent recorded",
            );
        }
        self.ensure_root_key();
        let Ok((issuer, subject, is_ca, key)) = crate::verify::names(&der) else {
            self.problem(Some(seq), "certificate does not parse");
            return;
        };
        match self.ca_keys.iter().find(|(name, _)| *name == issuer) {
            Some((_, k)) if crate::verify::signature(&der, k).is_ok() => {}
            Some(_) => self.problem(
                Some(seq),
                "certificate signature does not verify under its issuer's key",
            ),
            None => self.problem(
                Some(seq),
                "certificate's issuer is neither the root nor a CA in this log",
            ),
        }
        if is_ca {
            self.ca_keys.push((subject, key));
        }
    }

    /// The root's key is the first CA key; added when the first artefact is checked.
    fn ensure_root_key(&mut self) {
        if self.ca_keys.is_empty()
            && let Some(root) = &self.root
            && let Ok((issuer, _, _, key)) = crate::verify::names(&root.cert_der)
        {
            self.ca_keys.push((issuer, key));
        }
    }

    fn check_crl(&mut self, seq: u64, crl_b64: &str, crl_sha256: &str, tbs_sha256: &str) {
        self.ensure_root_key();
        let der = B64.decode(crl_b64).unwrap_or_default();
        if keys::sha256_hex(&der) != crl_sha256 {
            self.problem(Some(seq), "CRL does not match its recorded SHA-256");
            return;
        }
        let tbs = crate::asn1::first_inner_element(&der).unwrap_or_default();
        if keys::sha256_hex(tbs) != tbs_sha256 {
            self.problem(
                Some(seq),
                "CRL's TBS differs from the one its intent recorded",
            );
        }
        let verified = crate::verify::crl_issuer(&der)
            .ok()
            .is_some_and(|(issuer, sig)| {
                self.ca_keys
                    .iter()
                    .any(|(name, key)| *name == issuer && key.verify(tbs, &sig))
            });
        if !verified {
            self.problem(
                Some(seq),
                "CRL signature does not verify under its issuer's key",
            );
        }
    }

    fn issued(
        &self,
        path: &Path,
        csr_sha256: &str,
        profile: &str,
    ) -> Result<Option<Issued>, LogError> {
        let Some(&(seq, offset, len)) = self.issued.get(&issued_key(csr_sha256, profile)) else {
            return Ok(None);
        };
        let mut f = open_regular(OpenOptions::new().read(true), path)?;
        f.seek(SeekFrom::Start(offset)).map_err(io_at(path))?;
        let mut buf = vec![0; len];
        f.read_exact(&mut buf).map_err(io_at(path))?;
        let entry: Entry = serde_json::from_slice(&buf).map_err(|e| {
            LogError::Corrupt(Problem {
                entry: Some(seq),
                message: e.to_string(),
            })
        })?;
        match entry.body {
            Body::Cert { serial, cert, .. } => Ok(Some(Issued {
                seq,
                serial,
                cert_der: B64.decode(cert).unwrap_or_default(),
            })),
            _ => Err(LogError::Corrupt(Problem {
                entry: Some(seq),
                message: "expected a cert entry".into(),
            })),
        }
    }
}

/// Checks the stored checkpoints against the recomputed tree; returns the latest one's size.
fn check_checkpoints(paths: &Paths, scan: &mut Scan, vkey: &str) -> Result<Option<u64>, LogError> {
    let size = scan.tree.size();
    let mut sizes: Vec<(u64, PathBuf)> = fs::read_dir(paths.checkpoints())
        .map_err(io_at(&paths.checkpoints()))?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .collect();
    sizes.sort();
    let mut last_good = 0u64;
    let mut reported = false;
    for (n, path) in &sizes {
        let bytes = read_regular(path)?;
        let origin = scan
            .root
            .as_ref()
            .map(|r| r.origin.clone())
            .unwrap_or_default();
        match translog::open_checkpoint(&bytes, vkey) {
            Err(e) => scan.problem(None, format!("checkpoint {}: {e}", path.display())),
            Ok(cp) if cp.size != *n || cp.origin != origin => {
                scan.problem(
                    None,
                    format!(
                        "checkpoint {} is for size {} of {:?}",
                        path.display(),
                        cp.size,
                        cp.origin
                    ),
                );
            }
            Ok(cp) if cp.size > size => {
                if !reported {
                    reported = true;
                    scan.problem(Some(size), format!("the log has {} but a checkpoint covers {}: entries {size}..{} were removed", crate::names::count(size, "entry", "entries"), cp.size, cp.size - 1));
                }
            }
            Ok(cp) if scan.tree.root_at(cp.size) != Some(cp.root) => {
                if !reported {
                    reported = true;
                    let (from, to) = (
                        last_good.max(scan.chain_verified.min(cp.size - 1)),
                        cp.size - 1,
                    );
                    let which = if from == to {
                        format!("entry {from} was altered")
                    } else {
                        format!("one of entries {from}..{to} was altered")
                    };
                    scan.problem(
                        Some(from),
                        format!(
                            "{which}: the checkpoint at size {} no longer matches",
                            cp.size
                        ),
                    );
                }
            }
            Ok(cp) => last_good = cp.size,
        }
    }
    let latest = paths.checkpoint();
    let bytes = read_regular(&latest)?;
    match translog::open_checkpoint(&bytes, vkey) {
        Err(e) => {
            scan.problem(None, format!("latest checkpoint: {e}"));
            Ok(None)
        }
        Ok(cp) => {
            if sizes.last().map(|(n, _)| *n) != Some(cp.size) {
                scan.problem(
                    None,
                    format!(
                        "latest checkpoint (size {}) is not the newest in checkpoints/",
                        cp.size
                    ),
                );
            }
            if cp.size > size && !reported {
                scan.problem(
                    Some(size),
                    format!(
                        "the log has {} but the checkpoint covers {}: entries were removed",
                        crate::names::count(size, "entry", "entries"),
                        cp.size
                    ),
                );
            } else if scan.tree.root_at(cp.size).is_some_and(|r| r != cp.root) && !reported {
                scan.problem(
                    None,
                    format!(
                        "the latest checkpoint (size {}) no longer matches the entries",
                        cp.size
                    ),
                );
            }
            Ok(Some(cp.size))
        }
    }
}

/// Result of [`verify`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Entries read.
    pub entries: u64,
    /// Base64 root of the whole log.
    pub root: String,
    /// Size covered by the latest valid checkpoint.
    pub checkpoint_size: Option<u64>,
    /// Entries after the latest checkpoint (a crash between append and checkpoint).
    pub unsigned_tail: u64,
    /// Count per entry type.
    pub counts: std::collections::BTreeMap<String, u64>,
    /// The verifier key used.
    pub vkey: String,
    /// Everything wrong; empty means the log verifies.
    pub problems: Vec<Problem>,
    /// The latest signed checkpoint, as stored: the text to copy into the ceremony minutes
    /// (and give back later with `--checkpoint FILE`).
    pub checkpoint: Option<String>,
    /// Checkpoints held outside (`--checkpoint FILE`) that verified and that the log extends.
    pub extends: Vec<Extended>,
}

/// A checkpoint held outside the log that verified with the log key and that the log extends:
/// the log at its size has exactly its root, so nothing before it was changed since.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Extended {
    /// Where it came from (the file as given).
    pub name: String,
    /// Its tree size.
    pub size: u64,
    /// Its root, base64.
    pub root: String,
}

/// Recomputes the whole log and checks it: structure, chain, every checkpoint, and the CA rules
/// (serials unique, every certificate matching its intent and verifying under the root).
/// `vkey` overrides the key recorded in the log (use the one from the ceremony minutes).
pub fn verify(
    paths: &Paths,
    vkey: Option<&str>,
    root_pem_der: Option<&[u8]>,
) -> Result<Report, LogError> {
    verify_with(paths, vkey, root_pem_der, &[])
}

/// [`verify`], plus checkpoints held outside (ceremony minutes, an auditor, a witness): each
/// must verify with the log key and match the recomputed root at its size, which proves the log
/// only grew since; a checkpoint larger than the log means it was truncated or rolled back.
pub fn verify_with(
    paths: &Paths,
    vkey: Option<&str>,
    root_pem_der: Option<&[u8]>,
    external: &[(String, Vec<u8>)],
) -> Result<Report, LogError> {
    verify_inner(paths, vkey, root_pem_der, external, true)
}

/// The policy and module the log pins, trusted only as far as the log verifies: every entry's
/// chain, every checkpoint under the log key the root entry records, and the pins themselves
/// inside the part a checkpoint signs. Called before any module is loaded: a `module` or
/// `policy` entry appended by hand past the last checkpoint, or a log that does not verify, is
/// refused here (exit 4), so a forged pin never gets a module loaded or a PIN typed.
pub fn verified_pins(
    paths: &Paths,
    root_pem_der: Option<&[u8]>,
) -> Result<(Option<PolicyPin>, Option<ModulePin>), LogError> {
    // An unsigned tail and a torn last line are allowed (a crash leaves them, and `log recover`
    // needs the module to sign or set them aside), but nothing in them is trusted.
    let report = verify_inner(paths, None, root_pem_der, &[], false)?;
    if let Some(p) = report.problems.first() {
        return Err(LogError::Corrupt(p.clone()));
    }
    let signed = report.checkpoint_size.unwrap_or(0);
    let (policy, module) = pins(paths)?;
    let unsigned = policy
        .as_ref()
        .map(|p| ("policy", p.seq))
        .into_iter()
        .chain(module.as_ref().map(|m| ("module", m.seq)))
        .find(|(_, seq)| *seq >= signed);
    if let Some((kind, seq)) = unsigned {
        return Err(LogError::Corrupt(Problem {
            entry: Some(seq),
            message: format!(
                "a {kind} entry past the latest checkpoint is not trusted: only `hsmca profiles \
                 apply` and `--module` write one, and they sign it at once; remove what was \
                 appended by hand (the checkpoint in the ceremony minutes says where the log \
                 ended)"
            ),
        }));
    }
    Ok((policy, module))
}

fn verify_inner(
    paths: &Paths,
    vkey: Option<&str>,
    root_pem_der: Option<&[u8]>,
    external: &[(String, Vec<u8>)],
    flag_unsigned_tail: bool,
) -> Result<Report, LogError> {
    // `flag_unsigned_tail` false: a crash's leftovers (a torn line, entries past the last
    // checkpoint) are not problems here; callers trust nothing in them.
    let mut scan = Scan::read(&paths.entries(), true)?;
    if let (true, Some((entry, bytes))) = (flag_unsigned_tail, scan.torn) {
        scan.problem(Some(entry), format!("incomplete last line ({} after the last newline): interrupted write or truncation; run `hsmca log recover`", crate::names::count(bytes, "byte", "bytes")));
    }
    let recorded = scan.root.as_ref().map(|r| r.vkey.clone());
    let Some(recorded) = recorded else {
        scan.problem(Some(0), "the first entry is not the root entry");
        return Ok(report(scan, None, String::new()));
    };
    if let Ok(file_vkey) = read_regular(&paths.vkey())
        && String::from_utf8_lossy(&file_vkey).trim() != recorded
    {
        scan.problem(
            None,
            "log.vkey differs from the verifier key recorded in entry 0",
        );
    }
    if let (Some(pem_der), Some(root)) = (root_pem_der, scan.root.as_ref())
        && pem_der != root.cert_der.as_slice()
    {
        scan.problem(
            Some(0),
            "root.pem is not the root certificate recorded in entry 0",
        );
    }
    let vkey = vkey.map_or(recorded, str::to_owned);
    let cp = check_checkpoints(paths, &mut scan, &vkey)?;
    let size = scan.tree.size();
    let mut extends = Vec::new();
    for (name, note) in external {
        match translog::open_checkpoint(note, &vkey) {
            Err(e) => scan.problem(None, format!("{name}: {e}")),
            Ok(c) if c.size > size => scan.problem(
                Some(size),
                format!(
                    "{name} covers {} but the log has {size}: the log was truncated or rolled back",
                    crate::names::count(c.size, "entry", "entries")
                ),
            ),
            Ok(c) if scan.tree.root_at(c.size) != Some(c.root) => scan.problem(
                None,
                format!(
                    "{name} (size {}) does not match the log: history before it was rewritten",
                    c.size
                ),
            ),
            Ok(c) => extends.push(Extended {
                name: name.clone(),
                size: c.size,
                root: translog::b64(&c.root),
            }),
        }
    }
    // Entries past the latest checkpoint were never signed: a crash between append and
    // checkpoint leaves them, but so does an edit that appends entries and leaves the old
    // checkpoint in place. `log recover` signs them (after a look at what they are).
    let signed = cp.unwrap_or(0);
    let recovered = scan.last_recovery.is_some_and(|r| r >= signed);
    if flag_unsigned_tail && size > signed && !recovered && scan.torn.is_none() {
        scan.problem(
            Some(signed),
            format!(
                "entries {signed}..{} are past the latest checkpoint and no checkpoint signs them (an unsigned tail); run `hsmca log recover` to sign them after checking them",
                size - 1
            ),
        );
    }
    let mut r = report(scan, cp, vkey);
    r.checkpoint = read_regular(&paths.checkpoint())
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    r.extends = extends;
    Ok(r)
}

fn report(scan: Scan, checkpoint_size: Option<u64>, vkey: String) -> Report {
    let entries = scan.tree.size();
    Report {
        entries,
        root: translog::b64(&scan.tree.root()),
        checkpoint_size,
        unsigned_tail: entries.saturating_sub(checkpoint_size.unwrap_or(0)),
        counts: scan
            .counts
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect(),
        vkey,
        problems: scan.problems,
        checkpoint: None,
        extends: Vec::new(),
    }
}

/// The single writer of a log. Holds `HOME/LOCK` until dropped.
pub struct Log {
    paths: Paths,
    _lock: File,
    file: File,
    scan: Scan,
    root: RootInfo,
    checkpoint_size: u64,
    poisoned: bool,
}

fn take_lock(home: &Path) -> Result<File, LogError> {
    let path = home.join("LOCK");
    let f = open_regular(
        OpenOptions::new().create(true).truncate(false).write(true),
        &path,
    )?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(fs::TryLockError::WouldBlock) => Err(LogError::Locked(home.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(io_at(&path)(e)),
    }
}

impl Log {
    /// Creates a new log in `home` whose entry 0 records the root, and signs its first
    /// checkpoint. `home` must not have a log yet.
    pub fn create(
        home: &Path,
        root: Body,
        now: OffsetDateTime,
        key: &NoteKey<'_>,
    ) -> Result<Self, LogError> {
        let Body::Root {
            origin,
            log_vkey,
            cert,
            ..
        } = &root
        else {
            return Err(LogError::Checkpoint(
                "the first entry must be the root".into(),
            ));
        };
        let info = RootInfo {
            origin: origin.clone(),
            vkey: log_vkey.clone(),
            cert_der: B64.decode(cert).unwrap_or_default(),
        };
        let paths = Paths::of_home(home);
        fs::create_dir_all(paths.checkpoints()).map_err(io_at(&paths.dir))?;
        let lock = take_lock(home)?;
        let path = paths.entries();
        let file = open_regular(OpenOptions::new().append(true).create_new(true), &path)?;
        files::sync_dir(&paths.dir).map_err(|e| LogError::Checkpoint(e.to_string()))?;
        files::write_new(&paths.vkey(), format!("{log_vkey}\n").as_bytes())
            .map_err(|e| LogError::Checkpoint(e.to_string()))?;
        let mut log = Self {
            paths,
            _lock: lock,
            file,
            scan: Scan::default(),
            root: info,
            checkpoint_size: 0,
            poisoned: false,
        };
        log.append(vec![root], now)?;
        log.checkpoint(key)?;
        Ok(log)
    }

    /// Opens the log of `home` for appending: takes the lock, reads and checks every entry
    /// and the latest checkpoint. Refuses a torn tail or any integrity problem.
    pub fn open(home: &Path) -> Result<Self, LogError> {
        let lock = take_lock(home)?;
        let paths = Paths::of_home(home);
        let mut scan = Scan::read(&paths.entries(), false)?;
        if let Some((entry, bytes)) = scan.torn {
            return Err(LogError::TornTail { entry, bytes });
        }
        let root = scan.root.clone().ok_or_else(|| {
            LogError::Corrupt(Problem {
                entry: Some(0),
                message: "not the root entry".into(),
            })
        })?;
        let checkpoint_size = check_checkpoints(&paths, &mut scan, &root.vkey)?.unwrap_or(0);
        if let Some(p) = scan.problems.first() {
            return Err(LogError::Corrupt(p.clone()));
        }
        let path = paths.entries();
        let file = open_regular(OpenOptions::new().append(true), &path)?;
        Ok(Self {
            paths,
            _lock: lock,
            file,
            scan,
            root,
            checkpoint_size,
            poisoned: false,
        })
    }

    /// The root entry's facts.
    pub fn root(&self) -> &RootInfo {
        &self.root
    }

    /// Number of entries.
    pub fn size(&self) -> u64 {
        self.scan.tree.size()
    }

    /// Whether a serial (hex) was ever used.
    pub fn serial_used(&self, serial: &str) -> bool {
        self.scan.serials.contains(&key(serial))
    }

    /// Whether this log issued a certificate with this serial (hex).
    pub fn has_cert(&self, serial: &str) -> bool {
        self.scan.cert_at.contains_key(&key(serial))
    }

    /// Whether the serial (hex) has been revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.scan.revoked.contains_key(&key(serial))
    }

    /// The policy in force (the last `policy` entry), if the log has one.
    pub fn policy(&self) -> Option<&PolicyPin> {
        self.scan.policy.as_ref()
    }

    /// The pinned PKCS#11 module (the last `module` entry), if the log has one.
    pub fn module(&self) -> Option<&ModulePin> {
        self.scan.module.as_ref()
    }

    /// The tree root over the first `size` entries, to compare with a checkpoint kept
    /// elsewhere (the token's copy of the log head).
    pub fn root_at(&self, size: u64) -> Option<[u8; 32]> {
        self.scan.tree.root_at(size)
    }

    /// Entries appended since the latest checkpoint.
    pub fn unsigned(&self) -> u64 {
        self.size().saturating_sub(self.checkpoint_size)
    }

    /// The latest signed checkpoint, as stored.
    pub fn latest_checkpoint(&self) -> Result<Vec<u8>, LogError> {
        read_regular(&self.paths.checkpoint())
    }

    /// The last `policy` entry in full (expanded profiles and site), read back from the file.
    pub fn policy_entry(&self) -> Result<Option<Body>, LogError> {
        let Some(pin) = &self.scan.policy else {
            return Ok(None);
        };
        let path = self.paths.entries();
        let mut f = open_regular(OpenOptions::new().read(true), &path)?;
        f.seek(SeekFrom::Start(pin.at.0)).map_err(io_at(&path))?;
        let mut buf = vec![0; pin.at.1];
        f.read_exact(&mut buf).map_err(io_at(&path))?;
        let entry: Entry = serde_json::from_slice(&buf).map_err(|e| {
            LogError::Corrupt(Problem {
                entry: Some(pin.seq),
                message: e.to_string(),
            })
        })?;
        Ok(Some(entry.body))
    }

    /// Every certificate revoked for key compromise: its serial and DER. Few in any CA, so
    /// they are read back from the file when asked for.
    pub fn compromised(&self) -> Result<Vec<(String, Vec<u8>)>, LogError> {
        let path = self.paths.entries();
        let mut f = open_regular(OpenOptions::new().read(true), &path)?;
        let mut out = Vec::new();
        for (serial, (seq, offset, len)) in &self.scan.compromised {
            f.seek(SeekFrom::Start(*offset)).map_err(io_at(&path))?;
            let mut buf = vec![0; *len];
            f.read_exact(&mut buf).map_err(io_at(&path))?;
            let entry: Entry = serde_json::from_slice(&buf).map_err(|e| {
                LogError::Corrupt(Problem {
                    entry: Some(*seq),
                    message: e.to_string(),
                })
            })?;
            if let Body::Cert { cert, .. } = entry.body {
                out.push((serial.clone(), B64.decode(cert).unwrap_or_default()));
            }
        }
        Ok(out)
    }

    /// The highest cRLNumber used for `issuer` (0 if none).
    pub fn last_crl_number(&self, issuer: &str) -> u64 {
        self.scan.crl_numbers.get(issuer).copied().unwrap_or(0)
    }

    /// Path of `entries.jsonl`.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Intents with no result: the previous run stopped between intent and result.
    pub fn open_intents(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .scan
            .intents
            .keys()
            .chain(self.scan.crl_intents.keys())
            .filter(|s| !self.scan.resolved.contains(s))
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// The certificate already issued for this CSR under this profile, if any.
    pub fn issued(&self, csr_sha256: &str, profile: &str) -> Result<Option<Issued>, LogError> {
        self.scan.issued(&self.paths.entries(), csr_sha256, profile)
    }

    /// Appends entries with one write and one fsync; returns their numbers. On a failed write
    /// the file is cut back to its previous length, so no partial line stays behind.
    pub fn append(&mut self, bodies: Vec<Body>, now: OffsetDateTime) -> Result<Vec<u64>, LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        let mark = self.scan.tree.mark();
        let result = self.append_at(bodies, now);
        if result.is_err() {
            self.scan.tree.rewind(mark);
        }
        result
    }

    fn append_at(&mut self, bodies: Vec<Body>, now: OffsetDateTime) -> Result<Vec<u64>, LogError> {
        let tree = &mut self.scan.tree;
        let mut buf = Vec::new();
        let mut written = Vec::with_capacity(bodies.len());
        let time = rfc3339(now);
        for body in bodies {
            let seq = tree.size();
            let entry = Entry {
                v: entry::VERSION,
                seq,
                time: time.clone(),
                prev: translog::b64(&tree.root()),
                body,
            };
            let line =
                serde_json::to_vec(&entry).map_err(|e| LogError::Checkpoint(e.to_string()))?;
            if line.len() > MAX_LINE {
                return Err(LogError::TooLong(line.len()));
            }
            tree.push(&line);
            written.push((self.scan.valid_len + buf.len() as u64, line.len(), entry));
            buf.extend_from_slice(&line);
            buf.push(b'\n');
        }
        let path = self.paths.entries();
        if let Err(e) = self.file.write_all(&buf) {
            // Cut back a partial write (e.g. ENOSPC) so the file ends on a whole line.
            let cut = self
                .file
                .set_len(self.scan.valid_len)
                .and_then(|()| self.file.sync_all());
            if cut.is_err() {
                self.poisoned = true;
            }
            return Err(io_at(&path)(e));
        }
        if let Err(source) = self.file.sync_data() {
            self.poisoned = true;
            return Err(LogError::Sync { path, source });
        }
        let seqs = written.iter().map(|(_, _, e)| e.seq).collect();
        for (offset, len, entry) in written {
            self.scan.note(entry.seq, offset, len, entry, false);
        }
        self.scan.valid_len += buf.len() as u64;
        Ok(seqs)
    }

    /// Signs a checkpoint for the current size with the log key and writes it durably
    /// (`checkpoints/<size>` write-once, then `checkpoint` replaced atomically).
    pub fn checkpoint(&mut self, key: &NoteKey<'_>) -> Result<(), LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        let size = self.size();
        if size == self.checkpoint_size && size > 0 && self.paths.checkpoint().exists() {
            return Ok(());
        }
        let note = translog::sign_checkpoint(&self.root.origin, size, self.scan.tree.root(), key)
            .map_err(|e| match key.take_error() {
            Some(sign) => LogError::CheckpointSign(sign),
            None => LogError::Checkpoint(e),
        })?;
        translog::open_checkpoint(&note, &self.root.vkey).map_err(|e| {
            LogError::CheckpointSign(SignError::new(
                FaultKind::BadSignature,
                format!("the token's checkpoint does not verify: {e}"),
            ))
        })?;
        let numbered = self.paths.checkpoints().join(format!("{size:012}"));
        match files::write_new(&numbered, &note) {
            Ok(_) | Err(files::FileError::Exists(_)) => {}
            Err(e) => return Err(LogError::Checkpoint(e.to_string())),
        }
        files::replace(&self.paths.checkpoint(), &note)
            .map_err(|e| LogError::Checkpoint(e.to_string()))?;
        self.checkpoint_size = size;
        Ok(())
    }
}

/// What `recover` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recovered {
    /// Bytes cut from the end.
    pub bytes_removed: u64,
    /// Where they were kept.
    pub quarantine: Option<String>,
    /// Intents closed as abandoned.
    pub abandoned: Vec<u64>,
    /// Entries that were past the latest checkpoint, now signed by the recovery's checkpoint.
    pub signed_tail: u64,
}

/// `hsmca log recover`: sets a torn tail aside in `quarantine/`, cuts the file back to its last
/// whole line, and records both the recovery and every open intent as abandoned, then
/// checkpoints. Complete lines are never touched: a damaged complete line is tampering.
pub fn recover(
    home: &Path,
    now: OffsetDateTime,
    key: &NoteKey<'_>,
) -> Result<(Log, Recovered), LogError> {
    let lock = take_lock(home)?;
    let paths = Paths::of_home(home);
    let path = paths.entries();
    let scan = Scan::read(&path, false)?;
    let mut removed = None;
    if scan.torn.is_some() {
        let mut f = open_regular(OpenOptions::new().read(true).write(true), &path)?;
        let mut tail = Vec::new();
        f.seek(SeekFrom::Start(scan.valid_len))
            .map_err(io_at(&path))?;
        f.read_to_end(&mut tail).map_err(io_at(&path))?;
        let sha = keys::sha256_hex(&tail);
        let name = format!("{}-{}.bin", rfc3339(now).replace(':', ""), &sha[..16]);
        let q = paths.quarantine().join(&name);
        files::write_new(&q, &tail).map_err(|e| LogError::Checkpoint(e.to_string()))?;
        f.set_len(scan.valid_len).map_err(io_at(&path))?;
        f.sync_all().map_err(|source| LogError::Sync {
            path: path.clone(),
            source,
        })?;
        removed = Some((tail.len() as u64, sha, format!("quarantine/{name}")));
    }
    drop(lock);
    let mut log = Log::open(home)?;
    let mut bodies = Vec::new();
    let mut result = Recovered {
        bytes_removed: 0,
        quarantine: None,
        abandoned: Vec::new(),
        signed_tail: log.unsigned(),
    };
    if let Some((bytes_removed, removed_sha256, quarantine)) = removed {
        result.bytes_removed = bytes_removed;
        result.quarantine = Some(quarantine.clone());
        bodies.push(Body::Recovery {
            bytes_removed,
            removed_sha256,
            quarantine,
        });
    }
    for intent_seq in log.open_intents() {
        result.abandoned.push(intent_seq);
        bodies.push(Body::Abandon {
            intent_seq,
            reason: "recovery: no result was logged; nothing was released".into(),
        });
    }
    if !bodies.is_empty() {
        log.append(bodies, now)?;
    }
    log.checkpoint(key)?;
    Ok((log, result))
}

/// The public key of the root recorded in a log, for checks without the token.
pub fn root_public_key(info: &RootInfo) -> Option<PublicKey> {
    crate::verify::key_and_expiry(&info.cert_der)
        .ok()
        .map(|(k, _)| k)
}

/// A revocation as logged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Revoked {
    /// The revocation entry.
    pub seq: u64,
    /// RFC 5280 reason, kebab-case.
    pub reason: String,
    /// When.
    pub revocation_time: String,
    /// Known or suspected compromise time.
    pub invalidity_date: Option<String>,
}

/// A certificate in the log, with what later entries say about it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    /// The `cert` entry.
    pub seq: u64,
    /// When it was logged.
    pub time: String,
    /// Serial, hex.
    pub serial: String,
    /// Profile it was issued under.
    pub profile: String,
    /// SHA-256 of the CSR (or of the SPKI for intermediates).
    pub csr_sha256: String,
    /// The certificate, DER.
    #[serde(skip)]
    pub der: Vec<u8>,
    /// Serial this certificate renews.
    pub renews: Option<String>,
    /// The policy it was decided under (`None` in logs from before policies were logged).
    pub policy_sha256: Option<String>,
    /// Serial of the certificate that renewed this one.
    pub renewed_by: Option<String>,
    /// Set once revoked.
    pub revoked: Option<Revoked>,
}

/// Every certificate in the log, in log order. Reads the file without taking the lock.
pub fn records(paths: &Paths) -> Result<Vec<Record>, LogError> {
    records_where(paths, |_| true)
}

/// Every CA certificate in the log (basicConstraints CA: what `ca create` made), in log order,
/// with its revocation. Holds only those in memory, however many leaves the log has.
pub fn ca_records(paths: &Paths) -> Result<Vec<Record>, LogError> {
    records_where(paths, |der| {
        crate::verify::names(der).is_ok_and(|(_, _, is_ca, _)| is_ca)
    })
}

/// The certificates whose DER `keep` accepts, in log order, with what later entries say.
fn records_where(paths: &Paths, keep: impl Fn(&[u8]) -> bool) -> Result<Vec<Record>, LogError> {
    let path = paths.entries();
    let file = open_regular(OpenOptions::new().read(true), &path)?;
    let mut out: Vec<Record> = Vec::new();
    let mut renews_of_intent: HashMap<u64, (Option<String>, Option<String>)> = HashMap::new();
    let mut by_serial: HashMap<String, usize> = HashMap::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(io_at(&path))?;
        let Ok(entry) = serde_json::from_slice::<Entry>(&line) else {
            continue;
        };
        match entry.body {
            Body::IssueIntent {
                renews,
                policy_sha256,
                ..
            } => {
                renews_of_intent.insert(entry.seq, (renews, policy_sha256));
            }
            Body::Cert {
                intent_seq,
                serial,
                profile,
                csr_sha256,
                cert,
                ..
            } => {
                let (renews, policy_sha256) =
                    renews_of_intent.remove(&intent_seq).unwrap_or_default();
                let der = B64.decode(cert).unwrap_or_default();
                if !keep(&der) {
                    continue;
                }
                if let Some(old) = renews.as_ref().and_then(|o| by_serial.get(o)) {
                    out[*old].renewed_by = Some(serial.clone());
                }
                by_serial.insert(serial.clone(), out.len());
                out.push(Record {
                    seq: entry.seq,
                    time: entry.time,
                    serial,
                    profile,
                    csr_sha256,
                    der,
                    renews,
                    policy_sha256,
                    renewed_by: None,
                    revoked: None,
                });
            }
            Body::Revocation {
                serial,
                reason,
                revocation_time,
                invalidity_date,
            } => {
                if let Some(i) = by_serial.get(&serial) {
                    out[*i].revoked = Some(Revoked {
                        seq: entry.seq,
                        reason,
                        revocation_time,
                        invalidity_date,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The policy and module the log pins, read without the lock (for `check`, `plan`, and
/// before a module is loaded).
pub fn pins(paths: &Paths) -> Result<(Option<PolicyPin>, Option<ModulePin>), LogError> {
    let scan = Scan::read(&paths.entries(), false)?;
    Ok((scan.policy, scan.module))
}

/// The entry numbers of every issuance intent naming `csr_sha256` (for `ca create`, the SHA-256
/// of the new key's SPKI), whatever became of it. Reads the whole file without taking the lock:
/// for a ceremony deciding whether a key left in the token is one hsmca made, not for the
/// issuance path.
pub fn intents_naming(paths: &Paths, csr_sha256: &str) -> Result<Vec<u64>, LogError> {
    let path = paths.entries();
    let file = open_regular(OpenOptions::new().read(true), &path)?;
    let mut out = Vec::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(io_at(&path))?;
        if let Ok(Entry {
            seq,
            body: Body::IssueIntent { csr_sha256: c, .. },
            ..
        }) = serde_json::from_slice::<Entry>(&line)
            && c == csr_sha256
        {
            out.push(seq);
        }
    }
    Ok(out)
}

/// The Merkle tree over the log's lines, for proofs.
pub fn tree(paths: &Paths) -> Result<Tree, LogError> {
    Ok(Scan::read(&paths.entries(), false)?.tree)
}
