//! The log as commands use it: the one writer (holding `HOME/LOCK`) and read-only views, both
//! opened in time independent of the log's length.
//!
//! Opening reads the latest checkpoint and the right edge of the Merkle tree from
//! `log/hashes`, catches the index (`log/index.sqlite`) up with any lines past what it
//! reflects, and loads the critical entries (root, policies, modules, revocations, CRLs,
//! recoveries, CA certificates) from `entries.jsonl` through the index, checking their chain
//! against the one the checkpoint signs. Anything that does not match (a stale or edited index,
//! a hashes file that lags or was altered, a checkpoint from before this format) is rebuilt
//! from `entries.jsonl`, the log's only source of truth, and checked again; what still does
//! not match is a log problem.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;

use base64::Engine;
use time::OffsetDateTime;

use super::index::{self, CertRow, Index, Meta, Query};
use super::translog::{self, NoteKey, Tree, VerifiedCheckpoint};
use super::{
    B64, Body, Entry, Issued, LogError, MAX_LINE, ModulePin, Paths, PolicyPin, Problem, Record,
    Revoked, RootInfo, entry, io_at, open_regular, read_line, read_regular,
};
use crate::clock::rfc3339;
use crate::files;
use crate::keys;
use crate::signer::{FaultKind, SignError};

/// Prefix of the checkpoint extension line that signs the chain of critical entries.
const CRITICAL_LINE: &str = "hsmca-critical";

/// Lines applied to the index per transaction while catching up (bounds memory in a rebuild).
const CATCH_UP_BATCH: u64 = 20_000;

/// The chain over the critical entries: `H(chain || seq || leaf hash)` per entry, in log
/// order. The checkpoint signs its value and length, so the index cannot drop, add or swap a
/// critical entry without the next open noticing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Chain {
    count: u64,
    hash: [u8; 32],
}

impl Chain {
    fn push(&mut self, seq: u64, leaf: &[u8; 32]) {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&self.hash);
        ctx.update(&seq.to_be_bytes());
        ctx.update(leaf);
        self.hash.copy_from_slice(ctx.finish().as_ref());
        self.count += 1;
    }

    fn line(&self) -> String {
        format!(
            "{CRITICAL_LINE} {} {}\n",
            self.count,
            translog::b64(&self.hash)
        )
    }

    /// The chain a checkpoint signs, if it carries one.
    fn of(cp: &VerifiedCheckpoint) -> Option<Self> {
        cp.extension.lines().find_map(|l| {
            let mut parts = l.split(' ');
            if parts.next() != Some(CRITICAL_LINE) {
                return None;
            }
            let count = parts.next()?.parse().ok()?;
            let hash = B64.decode(parts.next()?).ok()?.try_into().ok()?;
            Some(Self { count, hash })
        })
    }
}

/// What the critical entries say, read back from `entries.jsonl`.
#[derive(Debug, Default)]
struct Critical {
    chain: Chain,
    root: Option<RootInfo>,
    policy: Option<PolicyPin>,
    module: Option<ModulePin>,
    last_recovery: Option<u64>,
    /// Revoked serials.
    revoked: HashMap<String, Revoked>,
    /// Highest cRLNumber per issuer.
    crl_numbers: HashMap<String, u64>,
    /// CA certificate entries: (seq, offset, length), so they are read back from the log
    /// without asking the index which certificates are CAs.
    ca: Vec<(u64, u64, usize)>,
}

impl Critical {
    fn note(&mut self, seq: u64, offset: u64, len: usize, leaf: &[u8; 32], entry: &Entry) {
        self.chain.push(seq, leaf);
        match &entry.body {
            Body::Root {
                origin,
                log_vkey,
                cert,
                ..
            } => {
                self.root = Some(RootInfo {
                    origin: origin.clone(),
                    vkey: log_vkey.clone(),
                    cert_der: B64.decode(cert).unwrap_or_default(),
                });
            }
            Body::Policy {
                policy_sha256: recorded,
                files,
                ..
            } => {
                self.policy = Some(PolicyPin {
                    seq,
                    sha256: recorded.clone(),
                    files: files.clone(),
                    at: (offset, len),
                });
            }
            Body::Module { path, sha256 } => {
                self.module = Some(ModulePin {
                    seq,
                    path: path.clone(),
                    sha256: sha256.clone(),
                });
            }
            Body::Recovery { .. } => self.last_recovery = Some(seq),
            Body::Revocation {
                serial,
                reason,
                revocation_time,
                invalidity_date,
            } => {
                self.revoked.entry(serial.clone()).or_insert(Revoked {
                    seq,
                    reason: reason.clone(),
                    revocation_time: revocation_time.clone(),
                    invalidity_date: invalidity_date.clone(),
                });
            }
            Body::CrlIntent {
                issuer, crl_number, ..
            } => {
                let n = self.crl_numbers.entry(issuer.clone()).or_default();
                *n = (*n).max(*crl_number);
            }
            Body::Cert { .. } => self.ca.push((seq, offset, len)),
            _ => {}
        }
    }
}

/// How a log is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The writer: a torn last line is refused.
    Write,
    /// For `log recover` and the pins check before it: a torn last line is left alone (and
    /// reported by [`Log::torn`]); nothing in it is read.
    Tolerant,
}

/// The single writer of a log. Holds `HOME/LOCK` until dropped.
pub struct Log {
    paths: Paths,
    _lock: File,
    file: File,
    tree: Tree,
    index: Index,
    /// Bytes of `entries.jsonl` holding whole lines.
    bytes: u64,
    torn: Option<(u64, u64)>,
    root: RootInfo,
    checkpoint: VerifiedCheckpoint,
    critical: Critical,
    rebuilt: Option<String>,
    poisoned: bool,
    /// Why the derived files failed to follow an append, once they did: no more appends,
    /// and no more answers from an index that lacks those entries.
    behind: std::cell::RefCell<Option<(String, Option<std::io::ErrorKind>)>>,
    /// (CSR hash, profile) of every revoked certificate: its serial. Filled on first use.
    revoked_requests: std::sync::OnceLock<HashMap<(String, String), String>>,
    /// Entries durable in the log but not yet in the index, with the meta the index reaches
    /// once they are: applied by the next lookup (see [`Log::index`]) or when the writer
    /// closes, so a batch's next chunk is signed while its index rows are written.
    pending: std::cell::RefCell<(Vec<PendingRow>, Option<Meta>)>,
}

pub(crate) fn take_lock(home: &Path) -> Result<File, LogError> {
    let path = home.join("LOCK");
    let f = open_regular(
        OpenOptions::new().create(true).truncate(false).write(true),
        &path,
    )?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(LogError::Locked(home.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(io_at(&path)(e)),
    }
}

/// Derived data that does not match the log: rebuilt, never trusted.
struct Stale(String);

/// The derived files of a log, caught up with `entries.jsonl`.
struct Derived {
    tree: Tree,
    index: Index,
    bytes: u64,
    torn: Option<(u64, u64)>,
}

/// Opens the hashes file and the index and checks they agree with each other.
fn open_derived(paths: &Paths) -> Result<Result<(Tree, Index, Meta), Stale>, LogError> {
    if std::fs::symlink_metadata(paths.index()).is_err() {
        return Ok(Err(Stale("log/index.sqlite is missing".into())));
    }
    let index = match Index::open(&paths.index(), false) {
        Ok(i) => i,
        Err(e) => return Ok(Err(Stale(e.to_string()))),
    };
    let meta = match index.meta() {
        Ok(m) => m,
        Err(e) => return Ok(Err(Stale(e.to_string()))),
    };
    let file = match open_regular(OpenOptions::new().read(true).write(true), &paths.hashes()) {
        Ok(f) => f,
        Err(e) => return Ok(Err(Stale(e.to_string()))),
    };
    let tree = match Tree::on_file(file, meta.size) {
        Ok(t) => t,
        Err(e) => return Ok(Err(Stale(format!("log/hashes {e}")))),
    };
    if tree.root_at(meta.size) != Some(meta.root) {
        return Ok(Err(Stale(format!(
            "log/hashes and the index disagree on the root at size {}",
            meta.size
        ))));
    }
    Ok(Ok((tree, index, meta)))
}

/// Makes empty derived files (a rebuild, or a new log).
fn new_derived(paths: &Paths) -> Result<(Tree, Index), LogError> {
    for stale in [
        paths.index(),
        paths.dir.join("index.sqlite-wal"),
        paths.dir.join("index.sqlite-shm"),
    ] {
        match std::fs::symlink_metadata(&stale) {
            Ok(_) => std::fs::remove_file(&stale).map_err(io_at(&stale))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&stale)(e)),
        }
    }
    let index = Index::open(&paths.index(), true)?;
    let hashes = paths.hashes();
    let file = open_regular(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
        &hashes,
    )?;
    let tree = Tree::new_on_file(file).map_err(io_at(&hashes))?;
    Ok((tree, index))
}

/// Reads the lines past what the index reflects and applies them to the tree and the index.
/// A line that does not continue the tree (wrong number, wrong `prev`) means the derived files
/// point at the wrong place: stale. A torn last line is left for the caller.
fn catch_up(
    paths: &Paths,
    tree: &mut Tree,
    index: &mut Index,
    meta: Meta,
) -> Result<Result<CaughtUp, Stale>, LogError> {
    let path = paths.entries();
    let file = open_regular(OpenOptions::new().read(true), &path)?;
    let len = file.metadata().map_err(io_at(&path))?.len();
    if meta.bytes > len {
        return Ok(Err(Stale(format!(
            "the index covers {} bytes of entries.jsonl, which has {len}",
            meta.bytes
        ))));
    }
    let mut reader = BufReader::with_capacity(1 << 16, file);
    reader
        .seek(SeekFrom::Start(meta.bytes))
        .map_err(io_at(&path))?;
    let mut offset = meta.bytes;
    let mut line = Vec::new();
    let mut torn = None;
    let mut batch = index.batch()?;
    let mut in_batch = 0u64;
    loop {
        line.clear();
        let n = read_line(&mut reader, &mut line).map_err(io_at(&path))?;
        if n == 0 {
            break;
        }
        let seq = tree.size();
        if line.last() != Some(&b'\n') {
            torn = Some((seq, len - offset));
            break;
        }
        let leaf = &line[..n - 1];
        let entry: Entry = match serde_json::from_slice(leaf) {
            Ok(e) => e,
            Err(e) => {
                return Ok(Err(Stale(format!(
                    "entry {seq} is not a valid log entry ({e})"
                ))));
            }
        };
        if entry.seq != seq || entry.prev != translog::b64(&tree.root()) {
            return Ok(Err(Stale(format!(
                "the line at byte {offset} does not continue the tree as entry {seq}"
            ))));
        }
        let facts = cert_facts(&entry.body);
        batch.add(offset, leaf.len(), &entry, facts.as_ref())?;
        tree.push(leaf);
        offset += n as u64;
        in_batch += 1;
        if in_batch == CATCH_UP_BATCH {
            tree.flush().map_err(io_at(&paths.hashes()))?;
            batch.commit(Meta {
                size: tree.size(),
                bytes: offset,
                root: tree.root(),
            })?;
            batch = index.batch()?;
            in_batch = 0;
        }
    }
    tree.flush().map_err(io_at(&paths.hashes()))?;
    batch.commit(Meta {
        size: tree.size(),
        bytes: offset,
        root: tree.root(),
    })?;
    Ok(Ok(CaughtUp {
        bytes: offset,
        torn,
    }))
}

/// An entry durable in the log and not yet in the index: its place, and its certificate's
/// facts for a `cert` entry.
type PendingRow = (u64, usize, Entry, Option<index::CertFacts>);

/// Where catching up ended: bytes of whole lines, and a torn last line if one was found.
struct CaughtUp {
    bytes: u64,
    torn: Option<(u64, u64)>,
}

/// The facts of a `cert` entry's certificate, for the index.
fn cert_facts(body: &Body) -> Option<index::CertFacts> {
    match body {
        Body::Cert { cert, .. } => index::CertFacts::of(&B64.decode(cert).ok()?),
        _ => None,
    }
}

/// Opens and catches up the derived files, rebuilding them from the log if they do not match.
/// Returns why they were rebuilt, if they were.
fn derived(paths: &Paths) -> Result<(Derived, Option<String>), LogError> {
    let why = match open_derived(paths)? {
        Ok((mut tree, mut index, meta)) => match catch_up(paths, &mut tree, &mut index, meta)? {
            Ok(CaughtUp { bytes, torn }) => {
                let d = Derived {
                    tree,
                    index,
                    bytes,
                    torn,
                };
                return Ok((d, None));
            }
            Err(Stale(why)) => why,
        },
        Err(Stale(why)) => why,
    };
    say_rebuilding(&why);
    Ok((rebuild(paths)?, Some(why)))
}

/// Tells the operator why a command that should be quick reads the whole log: the index is
/// derived data, and one that does not match is rebuilt, never used.
fn say_rebuilding(why: &str) {
    eprintln!(
        "note: the log's index does not match entries.jsonl ({why}); rebuilding it from the log"
    );
}

/// Rebuilds the hashes file and the index from `entries.jsonl`.
fn rebuild(paths: &Paths) -> Result<Derived, LogError> {
    let (mut tree, mut index) = new_derived(paths)?;
    let meta = index.meta()?;
    match catch_up(paths, &mut tree, &mut index, meta)? {
        Ok(CaughtUp { bytes, torn }) => Ok(Derived {
            tree,
            index,
            bytes,
            torn,
        }),
        Err(Stale(why)) => Err(LogError::Corrupt(Problem {
            entry: None,
            message: why,
        })),
    }
}

/// Reads one line of `entries.jsonl` by its place, as the index gives it. `Ok(None)` if no
/// line can be there (longer than [`MAX_LINE`], or past the end of the file): the index is
/// hostile data, and its numbers are checked before a buffer is sized by them.
fn read_at(path: &Path, offset: u64, len: usize) -> Result<Option<Vec<u8>>, LogError> {
    use std::os::unix::fs::FileExt;
    let f = open_regular(OpenOptions::new().read(true), path)?;
    let size = f.metadata().map_err(io_at(path))?.len();
    let fits = len <= MAX_LINE
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size);
    if !fits {
        return Ok(None);
    }
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, offset).map_err(io_at(path))?;
    Ok(Some(buf))
}

/// Loads the critical entries through the index and checks their chain against the one `cp`
/// signs. `Err(Stale)` if the index's list does not give exactly that chain. A checkpoint
/// without a chain (written before hsmca signed one) proves nothing about the list: the
/// caller trusts it only from an index it has just rebuilt from the log.
fn load_critical(
    paths: &Paths,
    tree: &Tree,
    index: &Index,
    cp: &VerifiedCheckpoint,
) -> Result<Result<Critical, Stale>, LogError> {
    let mut critical = Critical::default();
    let mut at_checkpoint = None;
    let entries = paths.entries();
    // A row of the wrong type (a table made loose and back with `writable_schema`) is an
    // index to rebuild like any other that does not match.
    let rows = match index.critical() {
        Ok(rows) => rows,
        Err(e) => return Ok(Err(Stale(e.to_string()))),
    };
    for (seq, offset, len) in rows {
        if seq >= cp.size && at_checkpoint.is_none() {
            at_checkpoint = Some(critical.chain);
        }
        let Some(line) = read_at(&entries, offset, len)? else {
            return Ok(Err(Stale(format!(
                "the index places entry {seq} at bytes {offset}..+{len}, outside entries.jsonl"
            ))));
        };
        let leaf = translog::leaf_hash(&line);
        if tree.leaf(seq) != Some(leaf) {
            return Ok(Err(Stale(format!(
                "the index places entry {seq} at bytes {offset}..{} of entries.jsonl, which hold another line",
                offset + len as u64
            ))));
        }
        let Ok(entry) = serde_json::from_slice::<Entry>(&line) else {
            return Ok(Err(Stale(format!("entry {seq} does not parse"))));
        };
        critical.note(seq, offset, len, &leaf, &entry);
    }
    let at_checkpoint = at_checkpoint.unwrap_or(critical.chain);
    match Chain::of(cp) {
        Some(signed) if signed != at_checkpoint => Ok(Err(Stale(format!(
            "the index lists {} critical entries up to the checkpoint, but the checkpoint signs a chain of {}",
            at_checkpoint.count, signed.count
        )))),
        _ => Ok(Ok(critical)),
    }
}

/// Whether the whole line that ends where the derived files say the log ends (`d.bytes`) is
/// the tree's last entry, proven against the checkpoint when it signs that entry. The index
/// says how many bytes it has read; one that claims more than it read (a line appended by
/// hand and never hashed) would leave that line out of every tree while the next writer
/// appends after it, so the log on disk would no longer be the one checkpoints sign.
fn last_line_is_last_entry(
    paths: &Paths,
    d: &Derived,
    cp: &VerifiedCheckpoint,
) -> Result<bool, LogError> {
    use std::os::unix::fs::FileExt;
    let size = d.tree.size();
    let Some(last) = size.checked_sub(1) else {
        return Ok(d.bytes == 0);
    };
    let path = paths.entries();
    let file = open_regular(OpenOptions::new().read(true), &path)?;
    let window = d.bytes.min(MAX_LINE as u64 + 1);
    let mut buf = vec![0; usize::try_from(window).unwrap_or(MAX_LINE + 1)];
    if file.read_exact_at(&mut buf, d.bytes - window).is_err() {
        return Ok(false);
    }
    let Some(body) = buf.strip_suffix(b"\n") else {
        return Ok(false);
    };
    let line = match body.iter().rposition(|&b| b == b'\n') {
        Some(nl) => &body[nl + 1..],
        None if window == d.bytes => body,
        None => return Ok(false),
    };
    let leaf = translog::leaf_hash(line);
    if d.tree.leaf(last) != Some(leaf) {
        return Ok(false);
    }
    if last >= cp.size {
        // An unsigned tail: nothing signs it, and writers refuse it anyway.
        return Ok(true);
    }
    Ok(d.tree
        .prove(last, cp.size)
        .is_some_and(|p| translog::check_inclusion(&p, cp.size, cp.root, last, leaf)))
}

/// Entry 0's facts, read from the first line (needed to check the checkpoint's signature
/// before anything else is believed; the line itself is then checked like every critical
/// entry).
fn first_root(paths: &Paths) -> Result<RootInfo, LogError> {
    let path = paths.entries();
    let file = open_regular(OpenOptions::new().read(true), &path)?;
    let mut line = Vec::new();
    BufReader::new(std::io::Read::take(file, MAX_LINE as u64 + 1))
        .read_until(b'\n', &mut line)
        .map_err(io_at(&path))?;
    let not_root = || {
        LogError::Corrupt(Problem {
            entry: Some(0),
            message: "not the root entry".into(),
        })
    };
    let entry: Entry = serde_json::from_slice(line.strip_suffix(b"\n").ok_or_else(not_root)?)
        .map_err(|_| not_root())?;
    match entry.body {
        Body::Root {
            origin,
            log_vkey,
            cert,
            ..
        } if entry.seq == 0 => Ok(RootInfo {
            origin,
            vkey: log_vkey,
            cert_der: B64.decode(cert).unwrap_or_default(),
        }),
        _ => Err(not_root()),
    }
}

/// The latest checkpoint, verified with the log key entry 0 records.
fn latest_checkpoint(paths: &Paths, root: &RootInfo) -> Result<VerifiedCheckpoint, LogError> {
    let cp = translog::open_checkpoint(&read_regular(&paths.checkpoint())?, &root.vkey).map_err(
        |e| {
            LogError::Corrupt(Problem {
                entry: None,
                message: format!("the latest checkpoint: {e}"),
            })
        },
    )?;
    if cp.origin != root.origin {
        return Err(LogError::Corrupt(Problem {
            entry: None,
            message: format!(
                "the latest checkpoint is for log {:?}, not {:?}",
                cp.origin, root.origin
            ),
        }));
    }
    Ok(cp)
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
        std::fs::create_dir_all(paths.checkpoints()).map_err(io_at(&paths.dir))?;
        let lock = take_lock(home)?;
        let path = paths.entries();
        let file = open_regular(OpenOptions::new().append(true).create_new(true), &path)?;
        files::sync_dir(&paths.dir).map_err(|e| LogError::Checkpoint(e.to_string()))?;
        files::write_new(&paths.vkey(), format!("{log_vkey}\n").as_bytes())
            .map_err(|e| LogError::Checkpoint(e.to_string()))?;
        let (tree, index) = new_derived(&paths)?;
        ensure_reserve(&paths);
        let mut log = Self {
            paths,
            _lock: lock,
            file,
            tree,
            index,
            bytes: 0,
            torn: None,
            root: info.clone(),
            checkpoint: VerifiedCheckpoint {
                origin: info.origin,
                size: 0,
                root: [0; 32],
                extension: String::new(),
            },
            critical: Critical::default(),
            rebuilt: None,
            poisoned: false,
            behind: std::cell::RefCell::new(None),
            revoked_requests: std::sync::OnceLock::new(),
            pending: std::cell::RefCell::default(),
        };
        log.append(vec![root], now)?;
        log.checkpoint(key)?;
        Ok(log)
    }

    /// Opens the log of `home` for appending: takes the lock, checks the latest checkpoint
    /// against the tree and the critical entries against the chain it signs, and catches the
    /// index up. Refuses a torn tail or any integrity problem. Reads only what was appended
    /// since the index was last brought up to date, however long the log.
    pub fn open(home: &Path) -> Result<Self, LogError> {
        Self::open_mode(home, Mode::Write)
    }

    pub(crate) fn open_mode(home: &Path, mode: Mode) -> Result<Self, LogError> {
        let lock = take_lock(home)?;
        let paths = Paths::of_home(home);
        let root = first_root(&paths)?;
        let cp = latest_checkpoint(&paths, &root)?;
        let (mut d, mut rebuilt) = derived(&paths)?;
        let critical = loop {
            match Self::check(&paths, &d, &cp, rebuilt.is_some())? {
                Ok(c) => break c,
                Err(Stale(why)) if rebuilt.is_none() => {
                    say_rebuilding(&why);
                    d = rebuild(&paths)?;
                    rebuilt = Some(why);
                }
                Err(Stale(why)) => {
                    return Err(LogError::Corrupt(Problem {
                        entry: None,
                        message: why,
                    }));
                }
            }
        };
        if let (Mode::Write, Some((entry, bytes))) = (mode, d.torn) {
            return Err(LogError::TornTail { entry, bytes });
        }
        let path = paths.entries();
        let file = open_regular(OpenOptions::new().append(true), &path)?;
        if mode == Mode::Write {
            ensure_reserve(&paths);
        }
        Ok(Self {
            paths,
            _lock: lock,
            file,
            tree: d.tree,
            index: d.index,
            bytes: d.bytes,
            torn: d.torn,
            root,
            checkpoint: cp,
            critical,
            rebuilt,
            poisoned: false,
            behind: std::cell::RefCell::new(None),
            revoked_requests: std::sync::OnceLock::new(),
            pending: std::cell::RefCell::default(),
        })
    }

    /// The checks of [`Log::open`] on derived files caught up with the log.
    fn check(
        paths: &Paths,
        d: &Derived,
        cp: &VerifiedCheckpoint,
        fresh: bool,
    ) -> Result<Result<Critical, Stale>, LogError> {
        let size = d.tree.size();
        if cp.size > size {
            return Err(LogError::Corrupt(Problem {
                entry: Some(size),
                message: format!(
                    "the log has {} but the checkpoint covers {}: entries were removed",
                    crate::names::count(size, "entry", "entries"),
                    cp.size
                ),
            }));
        }
        if d.tree.root_at(cp.size) != Some(cp.root) {
            if !fresh {
                return Ok(Err(Stale(format!(
                    "log/hashes does not give the checkpoint's root at size {}",
                    cp.size
                ))));
            }
            return Err(LogError::Corrupt(Problem {
                entry: None,
                message: format!(
                    "the latest checkpoint (size {}) no longer matches the entries: one of them was altered (`hsmca log verify` says which)",
                    cp.size
                ),
            }));
        }
        if !fresh && !last_line_is_last_entry(paths, d, cp)? {
            return Ok(Err(Stale(format!(
                "the line of entries.jsonl ending at byte {} is not entry {}",
                d.bytes,
                size.saturating_sub(1)
            ))));
        }
        match load_critical(paths, &d.tree, &d.index, cp)? {
            Ok(_) if Chain::of(cp).is_none() && !fresh => Ok(Err(Stale(
                "the checkpoint signs no chain of critical entries (written by an older hsmca)"
                    .into(),
            ))),
            other => Ok(other),
        }
    }

    /// Why the index was rebuilt while opening, if it was.
    pub fn rebuilt(&self) -> Option<&str> {
        self.rebuilt.as_deref()
    }

    /// The root entry's facts.
    pub fn root(&self) -> &RootInfo {
        &self.root
    }

    /// Number of entries.
    pub fn size(&self) -> u64 {
        self.tree.size()
    }

    /// The size the latest checkpoint signs.
    pub fn checkpoint_size(&self) -> u64 {
        self.checkpoint.size
    }

    /// Whether a serial (hex) was ever used. An index that cannot answer counts as "used", so
    /// the caller draws another serial.
    pub fn serial_used(&self, serial: &str) -> bool {
        self.index()
            .and_then(|i| i.serial_used(serial))
            .unwrap_or(true)
    }

    /// Whether this log issued a certificate with this serial (hex). A serial the index does
    /// not know is looked for in the whole log (read back and proven, so seconds for a
    /// million entries): "never issued" makes `revoke` refuse, and an index that lost a row
    /// must not keep a certificate from being revoked.
    pub fn has_cert(&self, serial: &str) -> Result<bool, LogError> {
        if self.index()?.cert(serial)?.is_some() {
            return Ok(true);
        }
        let needle = format!("\"serial\":\"{serial}\"");
        let mut found = None;
        self.scan_proven(0, |seq, leaf| {
            if found.is_none()
                && leaf.windows(needle.len()).any(|w| w == needle.as_bytes())
                && let Ok(Entry {
                    body: Body::Cert { serial: s, .. },
                    ..
                }) = serde_json::from_slice::<Entry>(leaf)
                && s == serial
            {
                found = Some(seq);
            }
        })?;
        match found {
            None => Ok(false),
            Some(seq) => Err(LogError::Index {
                path: self.paths.index(),
                message: format!(
                    "has no row for serial {serial}, which the log issued (entry {seq}); run `hsmca log reindex --home DIR`"
                ),
            }),
        }
    }

    /// Whether the serial (hex) has been revoked (from the critical entries the checkpoint
    /// signs, never from the index alone).
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.critical.revoked.contains_key(serial)
    }

    /// The policy in force (the last `policy` entry), if the log has one.
    pub fn policy(&self) -> Option<&PolicyPin> {
        self.critical.policy.as_ref()
    }

    /// The pinned PKCS#11 module (the last `module` entry), if the log has one.
    pub fn module(&self) -> Option<&ModulePin> {
        self.critical.module.as_ref()
    }

    /// The tree root over the first `size` entries, to compare with a checkpoint kept
    /// elsewhere (the token's copy of the log head).
    pub fn root_at(&self, size: u64) -> Option<[u8; 32]> {
        self.tree.root_at(size)
    }

    /// Entries appended since the latest checkpoint.
    pub fn unsigned(&self) -> u64 {
        self.size().saturating_sub(self.checkpoint.size)
    }

    /// The latest signed checkpoint, as stored.
    pub fn latest_checkpoint(&self) -> Result<Vec<u8>, LogError> {
        read_regular(&self.paths.checkpoint())
    }

    /// Entry `seq`, read back from `entries.jsonl` at the place the index gives and proven to
    /// be that entry: its hash is the tree's leaf, and (for a signed entry) the tree's path
    /// from it leads to the root the checkpoint signs.
    fn read_proven(&self, seq: u64, offset: u64, len: usize) -> Result<Entry, LogError> {
        let bad = |why: &str| LogError::Index {
            path: self.paths.index(),
            message: format!(
                "entry {seq}: {why}; run `hsmca log reindex --home DIR`, then `hsmca log verify`"
            ),
        };
        let line = read_at(&self.paths.entries(), offset, len)?.ok_or_else(|| {
            bad(&format!(
                "the index places it at bytes {offset}..+{len}, outside entries.jsonl"
            ))
        })?;
        let leaf = translog::leaf_hash(&line);
        if self.tree.leaf(seq) != Some(leaf) {
            return Err(bad("the index points at another line"));
        }
        let cp = &self.checkpoint;
        if seq < cp.size {
            let proven = self
                .tree
                .prove(seq, cp.size)
                .is_some_and(|p| translog::check_inclusion(&p, cp.size, cp.root, seq, leaf));
            if !proven {
                return Err(bad(
                    "log/hashes has no valid path from it to the checkpoint",
                ));
            }
        }
        serde_json::from_slice(&line).map_err(|e| {
            LogError::Corrupt(Problem {
                entry: Some(seq),
                message: e.to_string(),
            })
        })
    }

    /// The last `policy` entry in full (expanded profiles and site), read back from the file.
    pub fn policy_entry(&self) -> Result<Option<Body>, LogError> {
        let Some(pin) = &self.critical.policy else {
            return Ok(None);
        };
        Ok(Some(self.read_proven(pin.seq, pin.at.0, pin.at.1)?.body))
    }

    /// The certificate of an index row as logged, proven against the checkpoint: the entry
    /// the row points at must be a `cert` entry with the row's serial, profile and CSR hash,
    /// so an edited row can neither hand out another certificate nor file one under another
    /// CSR. Returns the certificate's DER and the time it was logged.
    fn proven_cert(&self, row: &CertRow) -> Result<(Vec<u8>, String), LogError> {
        let entry = self.read_proven(row.seq, row.offset, row.len)?;
        match entry.body {
            Body::Cert {
                serial,
                cert,
                profile,
                csr_sha256,
                ..
            } if serial == row.serial && profile == row.profile && csr_sha256 == row.csr_sha256 => {
                // The line is proven, so undecodable base64 is a log the checkpoint signed that
                // way: refused, never released as an empty certificate.
                let der = B64.decode(cert).map_err(|e| {
                    LogError::Corrupt(Problem {
                        entry: Some(row.seq),
                        message: format!("the certificate is not valid base64 ({e})"),
                    })
                })?;
                Ok((der, entry.time))
            }
            _ => Err(LogError::Index {
                path: self.paths.index(),
                message: format!(
                    "entry {} is not the certificate of serial {} (profile {}, CSR sha256 {}) the index says; run `hsmca log reindex --home DIR`",
                    row.seq, row.serial, row.profile, row.csr_sha256
                ),
            }),
        }
    }

    /// Every certificate revoked for key compromise: its serial and DER. Few in any CA.
    pub fn compromised(&self) -> Result<Vec<(String, Vec<u8>)>, LogError> {
        let mut out = Vec::new();
        let mut serials: Vec<&String> = self
            .critical
            .revoked
            .iter()
            .filter(|(_, r)| r.reason == "key-compromise")
            .map(|(s, _)| s)
            .collect();
        serials.sort();
        for serial in serials {
            // A revoked serial always has its certificate in the log (`revoke` checks); an
            // index without it was edited, and skipping it would unblock the key.
            let row = self.index()?.cert(serial)?.ok_or_else(|| LogError::Index {
                path: self.paths.index(),
                message: format!(
                    "serial {serial} is revoked for key compromise but the index has no certificate for it; run `hsmca log reindex --home DIR`"
                ),
            })?;
            out.push((serial.clone(), self.proven_cert(&row)?.0));
        }
        Ok(out)
    }

    /// (CSR hash, profile) of every revoked certificate, proven: see [`Log::issued`].
    fn revoked_requests(&self) -> Result<&HashMap<(String, String), String>, LogError> {
        if let Some(map) = self.revoked_requests.get() {
            return Ok(map);
        }
        let map = self
            .revocations()?
            .into_iter()
            .map(|r| ((r.csr_sha256, r.profile), r.serial))
            .collect();
        Ok(self.revoked_requests.get_or_init(|| map))
    }

    /// Every revoked certificate: its record (DER proven against the checkpoint), in the
    /// order of revocation. From the critical entries, so a CRL never misses one the index
    /// lost.
    pub fn revocations(&self) -> Result<Vec<Record>, LogError> {
        let mut revoked: Vec<(&String, &Revoked)> = self.critical.revoked.iter().collect();
        revoked.sort_by_key(|(_, r)| r.seq);
        let mut out = Vec::with_capacity(revoked.len());
        for (serial, rev) in revoked {
            let row = self.index()?.cert(serial)?.ok_or_else(|| LogError::Index {
                path: self.paths.index(),
                message: format!(
                    "serial {serial} is revoked (entry {}) but the index has no certificate for it; run `hsmca log reindex --home DIR`",
                    rev.seq
                ),
            })?;
            let mut record = self.record(row)?;
            record.revoked = Some(rev.clone());
            out.push(record);
        }
        Ok(out)
    }

    fn record(&self, row: CertRow) -> Result<Record, LogError> {
        let (der, time) = self.proven_cert(&row)?;
        Ok(Record {
            seq: row.seq,
            time,
            revoked: self.critical.revoked.get(&row.serial).cloned(),
            serial: row.serial,
            profile: row.profile,
            csr_sha256: row.csr_sha256,
            der,
            renews: row.renews,
            policy_sha256: row.policy_sha256,
            renewed_by: row.renewed_by,
        })
    }

    /// The certificates the query selects, in log order, each read back and proven.
    pub fn records(&self, q: &Query) -> Result<Vec<Record>, LogError> {
        self.index()?
            .certs(q)?
            .into_iter()
            .map(|row| match &q.serial {
                Some(s) if *s != row.serial => Err(LogError::Index {
                    path: self.paths.index(),
                    message: format!(
                        "asked for serial {s}, it returned serial {} (entry {}); run `hsmca log reindex --home DIR`",
                        row.serial, row.seq
                    ),
                }),
                _ => self.record(row),
            })
            .collect()
    }

    /// Every CA certificate in the log (what `ca create` made), in log order, with its
    /// revocation: from the critical entries.
    pub fn ca_records(&self) -> Result<Vec<Record>, LogError> {
        let mut out = Vec::new();
        for &(seq, offset, len) in &self.critical.ca {
            // Read from the log at the place the signed chain vouches for, then matched with
            // its index row: a row edited to hide a CA (not a CA, another serial) is refused,
            // never skipped, or `ca create` would give a logged CA's subject to another key.
            let Body::Cert { serial, .. } = self.read_proven(seq, offset, len)?.body else {
                continue;
            };
            let row = self
                .index()?
                .cert(&serial)?
                .filter(|r| r.seq == seq)
                .ok_or_else(|| LogError::Index {
                    path: self.paths.index(),
                    message: format!(
                        "the CA certificate serial {serial} (entry {seq}) is not in the index; run `hsmca log reindex --home DIR`"
                    ),
                })?;
            out.push(self.record(row)?);
        }
        Ok(out)
    }

    /// The entry numbers of every issuance intent naming `csr_sha256` (for `ca create`, the
    /// SHA-256 of the new key's SPKI), whatever became of it.
    ///
    /// An intent vouches for a key (`ca create` takes a key the token did not generate only
    /// if an earlier run of its own logged one), so what the index lists is read back from
    /// the log from the first one on and proven; a row made up in the index is refused.
    /// Costs the lines after that intent: a ceremony command, seconds at most.
    pub fn intents_naming(&self, csr_sha256: &str) -> Result<Vec<u64>, LogError> {
        let claimed = self.index()?.intents_naming(csr_sha256)?;
        let needle = csr_sha256.as_bytes();
        self.confirm(claimed, &format!("naming {csr_sha256}"), |first| {
            let mut found = Vec::new();
            self.scan_proven(first, |seq, leaf| {
                if leaf.windows(needle.len()).any(|w| w == needle)
                    && let Ok(Entry {
                        body: Body::IssueIntent { csr_sha256: c, .. },
                        ..
                    }) = serde_json::from_slice::<Entry>(leaf)
                    && c == csr_sha256
                {
                    found.push(seq);
                }
            })?;
            Ok(found)
        })
    }

    /// The entry numbers the index `claimed` (in log order), confirmed by `prove`, which
    /// reads them back from the log from the first one on: refused if the log says otherwise.
    fn confirm(
        &self,
        claimed: Vec<u64>,
        what: &str,
        prove: impl FnOnce(u64) -> Result<Vec<u64>, LogError>,
    ) -> Result<Vec<u64>, LogError> {
        let Some(&first) = claimed.first() else {
            return Ok(claimed);
        };
        let found = prove(first)?;
        if found != claimed {
            return Err(LogError::Index {
                path: self.paths.index(),
                message: format!(
                    "lists intents {claimed:?} {what}, but the log has {found:?} from entry {first}; run `hsmca log reindex --home DIR`"
                ),
            });
        }
        Ok(found)
    }

    /// The highest cRLNumber used for `issuer` (0 if none).
    pub fn last_crl_number(&self, issuer: &str) -> u64 {
        self.critical.crl_numbers.get(issuer).copied().unwrap_or(0)
    }

    /// Paths of the log's files.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// The tree, for proofs.
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Intents with no result: the previous run stopped between intent and result.
    ///
    /// The index says which; the caller signs an `abandon` ("nothing was released") for
    /// each, so its answer is checked against the log before it is believed: the lines from
    /// the first intent it names to the end are read back and re-hashed into the tree (which
    /// must give the checkpoint's root and the log's), and the intents still open in them
    /// must be exactly the ones named. Costs what was appended since that intent, and
    /// nothing when there is none.
    pub fn open_intents(&self) -> Result<Vec<u64>, LogError> {
        self.confirm(self.index()?.open_intents()?, "as open", |first| {
            self.intents_open_since(first)
        })
    }

    /// The intents at or after entry `from` with no result, read back and proven (see
    /// [`Log::scan_proven`]).
    fn intents_open_since(&self, from: u64) -> Result<Vec<u64>, LogError> {
        let mut open = std::collections::BTreeSet::new();
        self.scan_proven(from, |seq, leaf| {
            let Ok(entry) = serde_json::from_slice::<Entry>(leaf) else {
                return;
            };
            match entry.body {
                Body::IssueIntent { .. } | Body::CrlIntent { .. } => {
                    open.insert(seq);
                }
                Body::Cert { intent_seq, .. }
                | Body::Crl { intent_seq, .. }
                | Body::Abandon { intent_seq, .. } => {
                    open.remove(&intent_seq);
                }
                _ => {}
            }
        })?;
        Ok(open.into_iter().collect())
    }

    /// Hands `each` every line of `entries.jsonl` from entry `from` to the last whole line,
    /// then proves they were the log's: they are hashed onto the tree's left part (from
    /// `log/hashes`) and must give both the checkpoint's root and the log's, so no line was
    /// changed or left out. For answers the index gives that decide what is signed; what
    /// `each` saw counts only once this returns `Ok`.
    fn scan_proven(&self, from: u64, mut each: impl FnMut(u64, &[u8])) -> Result<(), LogError> {
        let bad = |why: String| LogError::Index {
            path: self.paths.index(),
            message: format!("{why}; run `hsmca log reindex --home DIR`"),
        };
        let (start, offset) = self.index()?.place_at_or_before(from)?;
        if start > from || offset > self.bytes {
            return Err(bad(format!("places entry {start} at byte {offset}")));
        }
        let hashes = open_regular(OpenOptions::new().read(true), &self.paths.hashes())?;
        let mut tree = Tree::overlay(hashes, start).map_err(io_at(&self.paths.hashes()))?;
        let path = self.paths.entries();
        let mut file = open_regular(OpenOptions::new().read(true), &path)?;
        file.seek(SeekFrom::Start(offset)).map_err(io_at(&path))?;
        let mut reader =
            BufReader::with_capacity(1 << 16, std::io::Read::take(file, self.bytes - offset));
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = read_line(&mut reader, &mut line).map_err(io_at(&path))?;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            let leaf = &line[..n - 1];
            if tree.size() >= from {
                each(tree.size(), leaf);
            }
            tree.push(leaf);
        }
        let cp = &self.checkpoint;
        if tree.size() != self.size()
            || tree.root() != self.tree.root()
            || tree.root_at(cp.size) != Some(cp.root)
        {
            return Err(bad(format!(
                "the lines of entries.jsonl from entry {start} (byte {offset}) do not give the log's tree"
            )));
        }
        Ok(())
    }

    /// The certificate already issued for this CSR under this profile, if any.
    pub fn issued(&self, csr_sha256: &str, profile: &str) -> Result<Option<Issued>, LogError> {
        let Some(row) = self.index()?.issued(csr_sha256, profile)? else {
            // "Not issued" signs the request (again): an index that lost the row of a revoked
            // certificate must not get its request signed anew. Revoked certificates are few
            // and their serials come from the entries the checkpoint signs.
            let key = (csr_sha256.to_owned(), profile.to_owned());
            if let Some(serial) = self.revoked_requests()?.get(&key) {
                return Err(LogError::Index {
                    path: self.paths.index(),
                    message: format!(
                        "has no certificate for CSR sha256 {csr_sha256} under profile {profile}, but the log issued serial {serial} for it and revoked it; run `hsmca log reindex --home DIR`"
                    ),
                });
            }
            return Ok(None);
        };
        let (cert_der, _) = self.proven_cert(&row)?;
        Ok(Some(Issued {
            seq: row.seq,
            serial: row.serial,
            cert_der,
        }))
    }

    /// Appends entries with one write and one fsync; returns their numbers. On a failed write
    /// the file is cut back to its previous length, so no partial line stays behind. The
    /// hashes file and the index follow only once the lines are durable; if updating them
    /// fails, the writer stops (the next open catches them up from the log).
    pub fn append(&mut self, bodies: Vec<Body>, now: OffsetDateTime) -> Result<Vec<u64>, LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        if let Some(e) = self.behind_error() {
            return Err(e);
        }
        let mark = self.tree.mark();
        let result = self.append_at(bodies, now);
        if result.is_err() {
            self.tree.rewind(mark);
        }
        result
    }

    fn append_at(&mut self, bodies: Vec<Body>, now: OffsetDateTime) -> Result<Vec<u64>, LogError> {
        let mut buf = Vec::new();
        let mut written = Vec::with_capacity(bodies.len());
        let time = rfc3339(now);
        for body in bodies {
            let seq = self.tree.size();
            let entry = Entry {
                v: entry::VERSION,
                seq,
                time: time.clone(),
                prev: translog::b64(&self.tree.root()),
                body,
            };
            let line =
                serde_json::to_vec(&entry).map_err(|e| LogError::Checkpoint(e.to_string()))?;
            if line.len() > MAX_LINE {
                return Err(LogError::TooLong(line.len()));
            }
            self.tree.push(&line);
            written.push((
                self.bytes + buf.len() as u64,
                line.len(),
                translog::leaf_hash(&line),
                entry,
            ));
            buf.extend_from_slice(&line);
            buf.push(b'\n');
        }
        let path = self.paths.entries();
        if let Err(e) = self.file.write_all(&buf) {
            // Cut back a partial write (e.g. ENOSPC) so the file ends on a whole line.
            let cut = self
                .file
                .set_len(self.bytes)
                .and_then(|()| self.file.sync_all());
            if cut.is_err() {
                self.poisoned = true;
            }
            self.release_reserve();
            return Err(io_at(&path)(e));
        }
        if let Err(source) = self.file.sync_data() {
            self.poisoned = true;
            return Err(LogError::Sync { path, source });
        }
        self.bytes += buf.len() as u64;
        // The lines are durable. What the checkpoint will sign about them (the chain of
        // critical entries) follows them now, whatever becomes of the derived files.
        let facts: Vec<_> = written.iter().map(|w| cert_facts(&w.3.body)).collect();
        for ((offset, len, leaf, entry), facts) in written.iter().zip(&facts) {
            if index::is_critical(&entry.body, facts.as_ref().is_some_and(|f| f.is_ca)) {
                self.critical.note(entry.seq, *offset, *len, leaf, entry);
            }
            if matches!(entry.body, Body::Revocation { .. }) {
                self.revoked_requests = std::sync::OnceLock::new();
            }
        }
        crate::engine::danger_crash_point("before-index");
        let seqs = written.iter().map(|(_, _, _, e)| e.seq).collect();
        if let Err(e) = self.tree.flush() {
            let e = io_at(&self.paths.hashes())(e);
            self.fall_behind(&e);
            return Err(e);
        }
        let meta = Meta {
            size: self.tree.size(),
            bytes: self.bytes,
            root: self.tree.root(),
        };
        let mut pending = self.pending.borrow_mut();
        pending.0.extend(
            written
                .into_iter()
                .zip(facts)
                .map(|((o, l, _, e), f)| (o, l, e, f)),
        );
        pending.1 = Some(meta);
        Ok(seqs)
    }

    /// The index, with every pending entry applied first. If applying fails (a full disk,
    /// say), the derived files are behind the log: this writer appends nothing more, whose
    /// lookups would miss those entries; it may still sign a checkpoint over them, and the
    /// next open catches the files up.
    fn index(&self) -> Result<&Index, LogError> {
        if let Some(e) = self.behind_error() {
            return Err(e);
        }
        let (rows, meta) = std::mem::take(&mut *self.pending.borrow_mut());
        if let Some(meta) = meta {
            let applied = self.index.batch().and_then(|mut batch| {
                for (offset, len, entry, facts) in &rows {
                    batch.add(*offset, *len, entry, facts.as_ref())?;
                }
                batch.commit(meta)
            });
            if let Err(e) = applied {
                self.fall_behind(&e);
                return Err(e);
            }
        }
        Ok(&self.index)
    }

    fn fall_behind(&self, cause: &LogError) {
        let mut kind = None;
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(cause);
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                kind = Some(io.kind());
            }
            next = e.source();
        }
        *self.behind.borrow_mut() = Some((crate::error::chain(cause), kind));
        self.release_reserve();
    }

    /// The error every later append and lookup gets once the derived files fell behind.
    fn behind_error(&self) -> Option<LogError> {
        let (why, kind) = self.behind.borrow().clone()?;
        Some(LogError::Behind {
            why,
            kind: kind.map(std::io::Error::from),
        })
    }

    /// Frees the space kept for a last checkpoint (see [`ensure_reserve`]): a write just
    /// failed, perhaps on a full disk, and the checkpoint over what is durable must still fit.
    fn release_reserve(&self) {
        let _ = std::fs::remove_file(self.paths.reserve());
    }

    /// Signs a checkpoint for the current size with the log key and writes it durably
    /// (`checkpoints/<size>` write-once, then `checkpoint` replaced atomically). The
    /// checkpoint also signs the chain of critical entries (see [`Chain`]); the hashes file
    /// and the index follow the log and are not synced with it (see the body).
    pub fn checkpoint(&mut self, key: &NoteKey<'_>) -> Result<(), LogError> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        let size = self.size();
        if size == self.checkpoint.size && size > 0 && self.paths.checkpoint().exists() {
            return Ok(());
        }
        // The derived files are not synced here: the checkpoint is over the log, which is
        // durable; the hashes file and the index may lag it after a power loss, and the next
        // open catches them up (or rebuilds them) and checks them. Syncing them at every
        // checkpoint cost a batch a third of its rate.
        let root = self.tree.root();
        let extension = self.critical.chain.line();
        let note = translog::sign_checkpoint(&self.root.origin, size, root, &extension, key)
            .map_err(|e| match key.take_error() {
                Some(sign) => LogError::CheckpointSign(sign),
                None => LogError::Checkpoint(e),
            })?;
        let cp = translog::open_checkpoint(&note, &self.root.vkey).map_err(|e| {
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
        self.checkpoint = cp;
        Ok(())
    }
}

/// A writer that closes applies what is pending to the index (best effort: if it cannot,
/// the next open catches the index up from the log).
impl Drop for Log {
    fn drop(&mut self) {
        let _ = self.index();
    }
}

/// Bytes kept free for the checkpoint that ends a run stopped by a full disk.
const RESERVE: usize = 256 << 10;

/// Keeps `log/reserve` (a file of zeros) in place: the hashes file and the index grow with the
/// log, and when one of them fills the disk after the lines are durable, deleting this frees
/// room for the checkpoint that signs them, so the run stops with a log that verifies as it
/// is. Best effort: on a disk already full there is nothing to keep.
fn ensure_reserve(paths: &Paths) {
    let path = paths.reserve();
    let present =
        std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() >= RESERVE as u64);
    if !present {
        let _ = std::fs::remove_file(&path);
        if files::write_new(&path, &vec![0u8; RESERVE]).is_err() {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// `hsmca log reindex`: rebuilds the hashes file and the index from `entries.jsonl` (under
/// the lock), then opens the log as usual, which checks them against the checkpoint.
pub fn reindex(home: &Path) -> Result<Log, LogError> {
    let lock = take_lock(home)?;
    let paths = Paths::of_home(home);
    rebuild(&paths)?;
    drop(lock);
    Log::open_mode(home, Mode::Tolerant)
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

/// Copies the bytes of `f` from `from` on into `quarantine/<time>-<sha256 prefix>.bin`,
/// durably, and returns their length, SHA-256 and the file's name. Streamed, twice (once to
/// name the file by its hash, once to copy): a write cut short leaves less than a line, but
/// a tail someone else put there (a sparse file of gigabytes) must not be read into memory.
fn quarantine_tail(
    f: &mut File,
    paths: &Paths,
    from: u64,
    now: OffsetDateTime,
) -> Result<(u64, String, String), LogError> {
    use std::io::Read;
    let path = paths.entries();
    f.seek(SeekFrom::Start(from)).map_err(io_at(&path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_at(&path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        len += n as u64;
    }
    let sha = keys::hex(ctx.finish().as_ref());
    let name = format!("{}-{}.bin", rfc3339(now).replace(':', ""), &sha[..16]);
    let dir = paths.quarantine();
    std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    let q = dir.join(&name);
    let mut out = open_regular(OpenOptions::new().write(true).create_new(true), &q)?;
    f.seek(SeekFrom::Start(from)).map_err(io_at(&path))?;
    let copied = std::io::copy(&mut Read::take(&mut *f, len), &mut out).map_err(io_at(&q))?;
    if copied != len {
        return Err(io_at(&q)(std::io::Error::other(format!(
            "copied {copied} of the {len} bytes to set aside"
        ))));
    }
    out.sync_all().map_err(|source| LogError::Sync {
        path: q.clone(),
        source,
    })?;
    files::sync_dir(&dir).map_err(|e| LogError::Checkpoint(e.to_string()))?;
    Ok((len, sha, name))
}

/// `hsmca log recover`: sets a torn tail aside in `quarantine/`, cuts the file back to its last
/// whole line, and records both the recovery and every open intent as abandoned, then
/// checkpoints. Complete lines are never touched: a damaged complete line is tampering.
pub fn recover(
    home: &Path,
    now: OffsetDateTime,
    key: &NoteKey<'_>,
) -> Result<(Log, Recovered), LogError> {
    let mut log = Log::open_mode(home, Mode::Tolerant)?;
    let path = log.paths.entries();
    let mut removed = None;
    if log.torn.is_some() {
        let mut f = open_regular(OpenOptions::new().read(true).write(true), &path)?;
        let (len, sha, name) = quarantine_tail(&mut f, &log.paths, log.bytes, now)?;
        f.set_len(log.bytes).map_err(io_at(&path))?;
        f.sync_all().map_err(|source| LogError::Sync {
            path: path.clone(),
            source,
        })?;
        log.torn = None;
        removed = Some((len, sha, format!("quarantine/{name}")));
    }
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
    for intent_seq in log.open_intents()? {
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

/// `hsmca log verify --from-checkpoint FILE`: checks what was appended after a checkpoint
/// kept outside (the minutes, an auditor's copy, the token's head), in time proportional to
/// that, not to the log:
/// - the checkpoint verifies with the log key, and the latest checkpoint extends it (an RFC
///   6962 consistency proof between the two signed roots);
/// - every line after it is re-hashed into the tree from the checkpoint's right edge: entry
///   numbers, `prev` chain, every stored checkpoint past it and the latest root;
/// - every new certificate and CRL matches its recorded hash and verifies under a CA the log
///   holds; a new intent's serial is used once in the whole log (through the index); a new
///   certificate matches its intent;
/// - as in a full verification, an unsigned tail (no `recovery` in it), a torn last line, or
///   a stored checkpoint past the log's end is a problem.
///
/// Entries before the checkpoint are taken as that checkpoint signed them: a full `log
/// verify` checks them.
pub fn verify_since(home: &Path, name: &str, note: &[u8]) -> Result<super::Report, LogError> {
    let log = Log::open_mode(home, Mode::Tolerant)?;
    let vkey = log.root.vkey.clone();
    let latest = log.checkpoint.clone();
    let mut problems: Vec<Problem> = Vec::new();
    let mut problem = |entry: Option<u64>, message: String| {
        problems.push(Problem { entry, message });
    };
    let report = |problems: Vec<Problem>, counts, extends| super::Report {
        entries: log.size(),
        root: translog::b64(&log.tree.root()),
        checkpoint_size: Some(latest.size),
        unsigned_tail: log.unsigned(),
        counts,
        vkey: vkey.clone(),
        problems,
        checkpoint: log
            .latest_checkpoint()
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned()),
        extends,
        from: 0,
    };
    let given = match translog::open_checkpoint(note, &vkey) {
        Ok(c) if c.origin == log.root.origin => c,
        Ok(c) => {
            problem(None, format!("{name} is for log {:?}", c.origin));
            return Ok(report(problems, Default::default(), Vec::new()));
        }
        Err(e) => {
            problem(None, format!("{name}: {e}"));
            return Ok(report(problems, Default::default(), Vec::new()));
        }
    };
    if given.size > latest.size {
        problem(
            Some(latest.size),
            format!(
                "{name} covers {} but the latest checkpoint {}: the log was truncated or rolled back",
                crate::names::count(given.size, "entry", "entries"),
                latest.size
            ),
        );
        return Ok(report(problems, Default::default(), Vec::new()));
    }
    if !log
        .tree
        .consistent(given.size, given.root, latest.size, latest.root)
    {
        problem(
            None,
            format!(
                "the latest checkpoint (size {}) does not extend {name} (size {}): history before it was rewritten",
                latest.size, given.size
            ),
        );
        return Ok(report(problems, Default::default(), Vec::new()));
    }
    // The tree as the given checkpoint signed it (its right edge is proven by its root),
    // grown in memory from the lines after it.
    let hashes = open_regular(OpenOptions::new().read(true), &log.paths.hashes())?;
    let mut tree = Tree::overlay(hashes, given.size).map_err(io_at(&log.paths.hashes()))?;
    if tree.root_at(given.size) != Some(given.root) {
        return Err(LogError::Index {
            path: log.paths.hashes(),
            message: "does not give the checkpoint's root; run `hsmca log reindex --home DIR`"
                .into(),
        });
    }
    let (start_seq, start_offset) = log.index()?.place_at_or_before(given.size)?;
    let path = log.paths.entries();
    let file = open_regular(OpenOptions::new().read(true), &path)?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    reader
        .seek(SeekFrom::Start(start_offset))
        .map_err(io_at(&path))?;
    let ca_keys = super::CaKeys::default();
    if let Ok((subject, _, _, key)) = crate::verify::names(&log.root.cert_der) {
        ca_keys.add(subject, key, 0);
    }
    for r in log.ca_records()? {
        if let Ok((_, subject, _, key)) = crate::verify::names(&r.der) {
            ca_keys.add(subject, key, r.seq);
        }
    }
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    let mut intents: HashMap<u64, (String, String, String, String)> = HashMap::new();
    let checkpoints = stored_checkpoint_sizes(&log.paths, given.size)?;
    // A `recovery` entry past the latest checkpoint vouches for the tail (as in a full
    // verification); anything else there was never signed.
    let mut recovered = false;
    let mut line = Vec::new();
    let mut seq = start_seq;
    loop {
        line.clear();
        let n = read_line(&mut reader, &mut line).map_err(io_at(&path))?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        let leaf = &line[..n - 1];
        if seq < given.size {
            seq += 1;
            continue;
        }
        let entry: Entry = match serde_json::from_slice(leaf) {
            Ok(e) => e,
            Err(e) => {
                problem(Some(seq), format!("not a valid log entry ({e})"));
                break;
            }
        };
        if entry.seq != seq || entry.prev != translog::b64(&tree.root()) {
            problem(
                Some(seq),
                "does not continue the log: its number or chain hash is wrong".into(),
            );
            break;
        }
        *counts.entry(entry.body.kind().to_owned()).or_default() += 1;
        recovered |= seq >= latest.size && matches!(entry.body, Body::Recovery { .. });
        match &entry.body {
            Body::IssueIntent {
                serial,
                tbs_sha256,
                csr_sha256,
                profile,
                ..
            } => {
                if log.index()?.serial_uses(serial)? != 1 {
                    problem(Some(seq), format!("serial {serial} is used twice"));
                }
                intents.insert(
                    seq,
                    (
                        serial.clone(),
                        csr_sha256.clone(),
                        profile.clone(),
                        tbs_sha256.clone(),
                    ),
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
                let der = B64.decode(cert).unwrap_or_default();
                if keys::sha256_hex(&der) != *cert_sha256 {
                    problem(
                        Some(seq),
                        "certificate does not match its recorded SHA-256".into(),
                    );
                } else {
                    if let Some((i_serial, i_csr, i_profile, tbs)) = intents.get(intent_seq) {
                        let got = crate::asn1::first_inner_element(&der).unwrap_or_default();
                        if (i_serial, i_csr, i_profile) != (serial, csr_sha256, profile)
                            || keys::sha256_hex(got) != *tbs
                        {
                            problem(Some(seq), format!("does not match its intent {intent_seq}"));
                        }
                    }
                    if let Some(m) = ca_keys.verify_cert(seq, &der) {
                        problem(Some(seq), m.into());
                    }
                    if let Ok((_, subject, true, key)) = crate::verify::names(&der) {
                        ca_keys.add(subject, key, seq);
                    }
                }
            }
            Body::Crl {
                crl, crl_sha256, ..
            } => {
                let der = B64.decode(crl).unwrap_or_default();
                let tbs = crate::asn1::first_inner_element(&der).unwrap_or_default();
                let ok = keys::sha256_hex(&der) == *crl_sha256
                    && crate::verify::crl_issuer(&der)
                        .is_ok_and(|(issuer, sig)| ca_keys.verify_crl(seq, &issuer, tbs, &sig));
                if !ok {
                    problem(
                        Some(seq),
                        "CRL does not match its hash or its issuer's signature".into(),
                    );
                }
            }
            Body::Policy {
                policy_sha256: recorded,
                files,
                ..
            } if super::policy_sha256(files) != *recorded => {
                problem(
                    Some(seq),
                    "the policy's hash does not match the file hashes it lists".into(),
                );
            }
            _ => {}
        }
        tree.push(leaf);
        seq += 1;
        if let Some(at) = checkpoints.get(&tree.size())
            && *at != tree.root()
        {
            problem(
                None,
                format!(
                    "the stored checkpoint at size {} no longer matches the entries",
                    tree.size()
                ),
            );
        }
    }
    // What no checkpoint signs fails this check as it fails a full `log verify`: a crash
    // leaves such a tail, but so does a line appended by hand (it chains like any other),
    // and "log OK" here would have `log recover` sign it.
    if let Some((entry, bytes)) = log.torn {
        problem(
            Some(entry),
            format!(
                "incomplete last line ({} after the last newline): interrupted write or truncation; run `hsmca log recover`",
                crate::names::count(bytes, "byte", "bytes")
            ),
        );
    } else if log.size() > latest.size && !recovered {
        problem(
            Some(latest.size),
            format!(
                "entries {}..{} are past the latest checkpoint and no checkpoint signs them (an unsigned tail); run `hsmca log recover` to sign them after checking them",
                latest.size,
                log.size() - 1
            ),
        );
    }
    // A stored checkpoint past the log's end is history cut off behind it (a rollback that
    // put an older `checkpoint` back): the walk above never reaches its size, so it is
    // looked for here, as a full `log verify` does.
    if let Some(&past) = checkpoints.range(log.size() + 1..).next().map(|(s, _)| s) {
        problem(
            Some(log.size()),
            format!(
                "the log has {} but the stored checkpoint checkpoints/{past} covers {past}: entries {}..{} were removed",
                crate::names::count(log.size(), "entry", "entries"),
                log.size(),
                past - 1
            ),
        );
    }
    if tree.size() != log.size() || tree.root() != log.tree.root() {
        problem(
            None,
            "the entries after the checkpoint do not give the log's tree".into(),
        );
    }
    if tree.root_at(latest.size) != Some(latest.root) {
        problem(
            None,
            format!(
                "the latest checkpoint (size {}) no longer matches the entries",
                latest.size
            ),
        );
    }
    let extends = vec![super::Extended {
        name: name.to_owned(),
        size: given.size,
        root: translog::b64(&given.root),
    }];
    let mut r = report(problems, counts, extends);
    r.from = given.size;
    Ok(r)
}

/// The roots of the stored checkpoints (`checkpoints/<size>`) past `from`, by size. Their
/// signatures are checked by a full `log verify`; here they must match the re-hashed tree.
fn stored_checkpoint_sizes(
    paths: &Paths,
    from: u64,
) -> Result<std::collections::BTreeMap<u64, [u8; 32]>, LogError> {
    let dir = paths.checkpoints();
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(&dir).map_err(io_at(&dir))?.flatten() {
        let Some(size) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        if size <= from {
            continue;
        }
        let bytes = read_regular(&e.path())?;
        if let Ok(note) = signed_note::Note::from_bytes(&bytes)
            && let Ok(cp) = tlog_tiles::Checkpoint::from_bytes(note.text())
        {
            out.insert(size, cp.hash().0);
        }
    }
    Ok(out)
}
