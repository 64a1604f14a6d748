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
pub mod index;
pub mod translog;
mod writer;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::keys::{self, PublicKey};
use crate::signer::SignError;
pub use entry::{Body, Entry};
pub use index::Query;
use translog::Tree;
pub(crate) use writer::Mode;
pub use writer::{Log, Recovered, recover, reindex, verify_since};

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
    /// The Merkle tree's stored hashes (derived; see [`translog::Tree`]).
    pub fn hashes(&self) -> PathBuf {
        self.dir.join("hashes")
    }
    /// The query index (derived; see [`index`]).
    pub fn index(&self) -> PathBuf {
        self.dir.join("index.sqlite")
    }
    /// Space kept free for a last checkpoint on a full disk.
    pub fn reserve(&self) -> PathBuf {
        self.dir.join("reserve")
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
    /// The index or the hashes file failed to follow an earlier append (its cause inside):
    /// the entries are durable; this command appends nothing more.
    #[error(
        "the log's index could not follow the entries just logged ({why}); nothing more is appended by this command"
    )]
    Behind {
        /// The cause, as text.
        why: String,
        /// Its kind, when it was an I/O error (a full disk keeps its hint).
        #[source]
        kind: Option<io::Error>,
    },
    /// The writer hit an fsync failure earlier.
    #[error("the log writer stopped after an earlier fsync failure")]
    Poisoned,
    /// The index (or the hashes file) cannot be used: it is rebuilt from the log when opened
    /// for writing; this error is what remains when it cannot be.
    #[error("{}: the log's index: {message}", .path.display())]
    Index {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
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
            Self::Sync { .. } | Self::Poisoned | Self::Behind { .. } => {
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

/// Reads one line of the log (with its newline) into `buf`, at most `MAX_LINE + 1` bytes: no
/// entry is longer, and the file is hostile data (a sparse tail of zeros, gigabytes without
/// a newline, must not be read into memory whole). Returns the bytes read; a line that does
/// not end in a newline within the limit is a torn or overlong one, for the caller to judge.
fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<usize> {
    io::Read::take(reader, MAX_LINE as u64 + 1).read_until(b'\n', buf)
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
    /// The whole tree (for proofs), or, for a verification, only its compact range.
    tree: Tree,
    stream: Option<translog::Streaming>,
    valid_len: u64,
    root: Option<RootInfo>,
    serials: HashSet<u128>,
    intents: HashMap<u64, Intent>,
    resolved: HashSet<u64>,
    counts: HashMap<&'static str, u64>,
    problems: Vec<Problem>,
    torn: Option<(u64, u64)>,
    /// Serials of the certificates seen so far.
    cert_at: HashSet<u128>,
    /// Revoked serials and the entry that revoked them.
    revoked: HashMap<u128, u64>,
    /// Open or resolved CRL intents: issuer, number, TBS hash.
    crl_intents: HashMap<u64, (String, u64, String)>,
    /// Highest cRLNumber used per issuer.
    crl_numbers: HashMap<String, u64>,
    /// Subject DER, key and entry of the root and of every CA certificate seen so far
    /// (shared with the threads that check certificates).
    ca_keys: CaKeys,
    /// Where certificates go to be checked off this thread (a deep scan only).
    sink: Option<Sink>,
    /// Whether the root's key is in `ca_keys`.
    root_key_added: bool,
    /// CRLs to check once every CA key is known: (seq, CRL base64, SHA-256, TBS hash).
    crls: Vec<(u64, String, String, String)>,
    /// Entries `0..chain_verified` are proven intact by a later entry's `prev`.
    chain_verified: u64,
    /// The last `policy` entry.
    policy: Option<PolicyPin>,
    /// The last `module` entry.
    module: Option<ModulePin>,
    /// The last `recovery` entry.
    last_recovery: Option<u64>,
}

impl Scan {
    fn size(&self) -> u64 {
        self.stream
            .as_ref()
            .map_or_else(|| self.tree.size(), translog::Streaming::size)
    }

    fn root(&self) -> [u8; 32] {
        self.stream
            .as_ref()
            .map_or_else(|| self.tree.root(), translog::Streaming::root)
    }

    fn root_at(&self, size: u64) -> Option<[u8; 32]> {
        match &self.stream {
            Some(s) => s.root_at(size),
            None => self.tree.root_at(size),
        }
    }

    fn problem(&mut self, entry: Option<u64>, message: impl Into<String>) {
        self.problems.push(Problem {
            entry,
            message: message.into(),
        });
    }

    /// Reads `entries.jsonl`. With `deep`, also checks every certificate's hash and signature,
    /// on every core: this thread reads, parses and chains the lines while worker threads check
    /// certificates (the costly part: a signature verification each), so a full verification
    /// of a million entries takes what the machine's cores can give, not one core's time.
    fn read(path: &Path, deep: bool) -> Result<Self, LogError> {
        if !deep {
            return Self::read_lines(path, None);
        }
        Self::read_deep(path, Vec::new())
    }

    /// [`Scan::read`] with every check, keeping the tree only as its compact range plus the
    /// roots at `sizes` (the checkpoints to check): memory does not grow with the log.
    fn read_deep(path: &Path, sizes: Vec<u64>) -> Result<Self, LogError> {
        let threads = std::thread::available_parallelism()
            .map_or(2, std::num::NonZero::get)
            .clamp(1, 16);
        let ca_keys = CaKeys::default();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<CertJob>>(threads * 4);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (rx, ca_keys) = (rx.clone(), ca_keys.clone());
                std::thread::spawn(move || check_worker(&rx, &ca_keys))
            })
            .collect();
        let sink = Sink {
            tx,
            batch: Vec::with_capacity(SINK_BATCH),
        };
        let mut scan = Self {
            ca_keys: ca_keys.clone(),
            stream: Some(translog::Streaming::remembering(sizes)),
            ..Self::default()
        };
        let read = scan.read_into(path, Some(sink));
        let mut deferred = Vec::new();
        for w in workers {
            match w.join() {
                Ok((problems, later)) => {
                    scan.problems.extend(problems);
                    deferred.extend(later);
                }
                Err(_) => scan.problem(None, "a certificate check thread failed"),
            }
        }
        read?;
        // Certificates whose issuer was not yet known when they were checked (its entry was
        // being checked on another thread), then CRLs, with every CA key now known.
        for (seq, der) in deferred {
            if let Some(p) = ca_keys.verify_cert(seq, &der) {
                scan.problem(Some(seq), p);
            }
        }
        for (seq, crl, sha, tbs) in std::mem::take(&mut scan.crls) {
            scan.check_crl(seq, &crl, &sha, &tbs);
        }
        scan.problems.sort_by_key(|p| (p.entry.is_none(), p.entry));
        Ok(scan)
    }

    fn read_lines(path: &Path, sink: Option<Sink>) -> Result<Self, LogError> {
        let mut scan = Self::default();
        scan.read_into(path, sink)?;
        Ok(scan)
    }

    fn read_into(&mut self, path: &Path, sink: Option<Sink>) -> Result<(), LogError> {
        let deep = sink.is_some();
        self.sink = sink;
        let file = open_regular(OpenOptions::new().read(true), path)?;
        let len = file.metadata().map_err(io_at(path))?.len();
        let mut reader = BufReader::with_capacity(1 << 16, file);
        let scan = self;
        let mut line = Vec::new();
        let mut offset = 0u64;
        let (mut order_reported, mut chain_reported) = (false, false);
        loop {
            line.clear();
            let n = read_line(&mut reader, &mut line).map_err(io_at(path))?;
            if n == 0 {
                break;
            }
            let seq = scan.size();
            if line.last() != Some(&b'\n') {
                // What follows the last newline, however long: no line is read past
                // `MAX_LINE`.
                scan.torn = Some((seq, len.saturating_sub(offset)));
                break;
            }
            let leaf = &line[..line.len() - 1];
            let prev = translog::b64(&scan.root());
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
            match &mut scan.stream {
                Some(stream) => stream.push(leaf),
                None => scan.tree.push(leaf),
            }
            offset += n as u64;
            scan.valid_len = offset;
        }
        // Sends the last batch and closes the channel, so the workers finish.
        if let Some(mut sink) = scan.sink.take() {
            sink.flush();
        }
        Ok(())
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
                    self.check_cert(seq, cert, cert_sha256, &intent);
                }
                self.cert_at.insert(key(&serial));
            }
            Body::Revocation { serial, .. } => {
                if !self.cert_at.contains(&key(&serial)) {
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
                    self.crls.push((seq, crl, crl_sha256, tbs_sha256));
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

    fn check_cert(&mut self, seq: u64, cert_b64: String, cert_sha256: String, intent: &Intent) {
        self.ensure_root_key();
        if let Some(sink) = &mut self.sink {
            sink.send(CertJob {
                seq,
                cert_b64,
                cert_sha256,
                tbs_sha256: intent.tbs_sha256.clone(),
            });
        }
    }

    /// The root's key is the first CA key; added when the first artefact is checked (once:
    /// parsing the root for every certificate was most of this thread's time).
    fn ensure_root_key(&mut self) {
        if self.root_key_added {
            return;
        }
        if let Some(root) = &self.root
            && let Ok((issuer, _, _, key)) = crate::verify::names(&root.cert_der)
        {
            self.ca_keys.add_root(issuer, key);
            self.root_key_added = true;
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
            .is_some_and(|(issuer, sig)| self.ca_keys.verify_crl(seq, &issuer, tbs, &sig));
        if !verified {
            self.problem(
                Some(seq),
                "CRL signature does not verify under its issuer's key",
            );
        }
    }
}

/// Checks the stored checkpoints against the recomputed tree; returns the latest one's size.
fn check_checkpoints(paths: &Paths, scan: &mut Scan, vkey: &str) -> Result<Option<u64>, LogError> {
    let size = scan.size();
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
            Ok(cp) if scan.root_at(cp.size) != Some(cp.root) => {
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
            } else if scan.root_at(cp.size).is_some_and(|r| r != cp.root) && !reported {
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
    /// The first entry checked: 0 for a full verification, the given checkpoint's size for
    /// `--from-checkpoint`.
    pub from: u64,
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
    home: &Path,
    root_pem_der: Option<&[u8]>,
) -> Result<(Option<PolicyPin>, Option<ModulePin>), LogError> {
    // An unsigned tail and a torn last line are allowed (a crash leaves them, and `log recover`
    // needs the module to sign or set them aside), but nothing in them is trusted. Opening
    // checks the checkpoint's signature, the tree under it and the chain of critical entries
    // (policies and modules among them) it signs, in time independent of the log's length.
    let log = Log::open_mode(home, Mode::Tolerant)?;
    if let Some(der) = root_pem_der
        && der != log.root().cert_der.as_slice()
    {
        return Err(LogError::Corrupt(Problem {
            entry: Some(0),
            message: "root.pem is not the root certificate recorded in entry 0".into(),
        }));
    }
    let signed = log.checkpoint_size();
    let (policy, module) = (log.policy().cloned(), log.module().cloned());
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
    let mut scan = Scan::read_deep(&paths.entries(), checkpoint_sizes(paths, external))?;
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
    let size = scan.size();
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
            Ok(c) if scan.root_at(c.size) != Some(c.root) => scan.problem(
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

/// The sizes of every checkpoint a verification compares with the tree: stored, latest and
/// given. Read (not yet verified) before the stream, so it keeps their roots as it passes.
fn checkpoint_sizes(paths: &Paths, external: &[(String, Vec<u8>)]) -> Vec<u64> {
    let size_of = |note: &[u8]| {
        signed_note::Note::from_bytes(note)
            .ok()
            .and_then(|n| tlog_tiles::Checkpoint::from_bytes(n.text()).ok())
            .map(|c| c.size())
    };
    let mut sizes = Vec::new();
    for e in fs::read_dir(paths.checkpoints())
        .into_iter()
        .flatten()
        .flatten()
    {
        sizes.extend(e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()));
        sizes.extend(read_regular(&e.path()).ok().and_then(|b| size_of(&b)));
    }
    sizes.extend(
        read_regular(&paths.checkpoint())
            .ok()
            .and_then(|b| size_of(&b)),
    );
    sizes.extend(external.iter().filter_map(|(_, note)| size_of(note)));
    sizes
}

fn report(scan: Scan, checkpoint_size: Option<u64>, vkey: String) -> Report {
    let entries = scan.size();
    Report {
        entries,
        root: translog::b64(&scan.root()),
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
        from: 0,
    }
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

/// The certificates `q` selects, in log order, each read back and proven against the
/// checkpoint. Takes the lock for the moment it reads (and catches the index up); while
/// another hsmca command holds it, fails with [`LogError::Locked`].
pub fn records(home: &Path, q: &Query) -> Result<Vec<Record>, LogError> {
    Log::open_mode(home, Mode::Tolerant)?.records(q)
}

/// The policy and module the log pins, trusted only as far as the checkpoint signs them (see
/// [`verified_pins`]). For `check` and `plan`, which sign nothing.
pub fn pins(home: &Path) -> Result<(Option<PolicyPin>, Option<ModulePin>), LogError> {
    let log = Log::open_mode(home, Mode::Tolerant)?;
    Ok((log.policy().cloned(), log.module().cloned()))
}

/// The Merkle tree over the log's lines, for proofs (computed in memory from the lines).
pub fn tree(paths: &Paths) -> Result<Tree, LogError> {
    Ok(Scan::read(&paths.entries(), false)?.tree)
}

/// Certificates sent to a checking thread at a time.
const SINK_BATCH: usize = 256;

/// A certificate to check: its entry, base64 DER, recorded SHA-256 and its intent's TBS hash.
struct CertJob {
    seq: u64,
    cert_b64: String,
    cert_sha256: String,
    tbs_sha256: String,
}

/// The reading thread's end of the channel to the checking threads.
#[derive(Debug)]
struct Sink {
    tx: std::sync::mpsc::SyncSender<Vec<CertJob>>,
    batch: Vec<CertJob>,
}

impl std::fmt::Debug for CertJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertJob({})", self.seq)
    }
}

impl Sink {
    fn send(&mut self, job: CertJob) {
        self.batch.push(job);
        if self.batch.len() == SINK_BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(SINK_BATCH));
        // A closed channel means every worker died; the join reports it.
        let _ = self.tx.send(batch);
    }
}

/// The CA keys a log has shown so far, shared by the checking threads: subject DER, key, and
/// the entry that introduced it (a certificate is checked only against CAs logged before it).
#[derive(Debug, Clone, Default)]
struct CaKeys(std::sync::Arc<std::sync::RwLock<Vec<CaKey>>>);

/// A CA's subject DER, key, and the entry that introduced it.
type CaKey = (Vec<u8>, PublicKey, u64);

impl CaKeys {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<CaKey>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self, subject: Vec<u8>, key: PublicKey, seq: u64) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((subject, key, seq));
    }

    fn add_root(&self, subject: Vec<u8>, key: PublicKey) {
        if self.read().is_empty() {
            self.add(subject, key, 0);
        }
    }

    /// Checks a certificate's signature under the CA logged before `seq` whose subject is
    /// its issuer, once every CA is known. `None` if it verifies.
    fn verify_cert(&self, seq: u64, der: &[u8]) -> Option<&'static str> {
        let Ok(parts) = crate::verify::parts(der) else {
            return Some("certificate does not parse");
        };
        let tbs = crate::asn1::first_inner_element(der).unwrap_or_default();
        self.check(seq, &parts, tbs).unwrap_or(Some(
            "certificate's issuer is neither the root nor a CA in this log",
        ))
    }

    /// The signature check of a parsed certificate: `None` if no CA logged before `seq` has
    /// its issuer's name (not known yet), else `Some(None)` if it verifies or `Some(problem)`.
    fn check(
        &self,
        seq: u64,
        parts: &crate::verify::Parts,
        tbs: &[u8],
    ) -> Option<Option<&'static str>> {
        let keys = self.read();
        let (_, key, _) = keys
            .iter()
            .find(|(name, _, at)| *name == parts.issuer && *at < seq)?;
        Some(if key.verify(tbs, &parts.signature) {
            None
        } else {
            Some("certificate signature does not verify under its issuer's key")
        })
    }

    fn verify_crl(&self, seq: u64, issuer: &[u8], tbs: &[u8], sig: &[u8]) -> bool {
        self.read()
            .iter()
            .any(|(name, key, at)| name == issuer && *at < seq && key.verify(tbs, sig))
    }
}

/// One checking thread: hashes, TBS and signature of each certificate it is sent. A
/// certificate whose issuer is not known yet is handed back for a check after all threads
/// finish (its CA may be on another thread right now). Returns its problems and those.
fn check_worker(
    rx: &std::sync::Mutex<std::sync::mpsc::Receiver<Vec<CertJob>>>,
    ca_keys: &CaKeys,
) -> (Vec<Problem>, Vec<(u64, Vec<u8>)>) {
    let mut problems = Vec::new();
    let mut deferred = Vec::new();
    loop {
        let Ok(batch) = rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv()
        else {
            break;
        };
        for job in batch {
            let mut problem = |m: &str| {
                problems.push(Problem {
                    entry: Some(job.seq),
                    message: m.into(),
                });
            };
            let der = B64.decode(&job.cert_b64).unwrap_or_default();
            if keys::sha256_hex(&der) != job.cert_sha256 {
                problem("certificate does not match its recorded SHA-256");
                continue;
            }
            let tbs = crate::asn1::first_inner_element(&der).unwrap_or_default();
            if keys::sha256_hex(tbs) != job.tbs_sha256 {
                problem("certificate's TBS differs from the one its intent recorded");
            }
            let Ok(parts) = crate::verify::parts(&der) else {
                problem("certificate does not parse");
                continue;
            };
            if let Some(key) = &parts.ca_key {
                ca_keys.add(parts.subject.clone(), key.clone(), job.seq);
            }
            match ca_keys.check(job.seq, &parts, tbs) {
                None => deferred.push((job.seq, der)),
                Some(Some(m)) => problem(m),
                Some(None) => {}
            }
        }
    }
    (problems, deferred)
}
