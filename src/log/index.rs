//! The log's query index: `HOME/log/index.sqlite`, derived from `entries.jsonl` and rebuilt
//! from it at will (`hsmca log reindex`).
//!
//! Why SQLite: commands ask the log questions ("was this CSR already signed under this
//! profile?", "what expires within 30 days?", "which certificates are revoked?") that a
//! million-entry log must answer without reading every line; an auditor can open the same file
//! with the standard `sqlite3` tool; and a crash leaves it consistent (WAL), at worst a few
//! transactions behind the log, which opening makes good by reading the lines past it.
//!
//! The index is never trusted over the log: it records the log size, byte length and Merkle
//! root it reflects, and the log checks these against its own tree and the signed checkpoint
//! before using it (see `super::Log::open`). Answers that decide what gets signed or revoked
//! come from entries read back from `entries.jsonl` and proven against the checkpoint, or from
//! the critical entries whose chain the checkpoint signs; the index only says where to look.
//!
//! Every row the index returns is proven against the entry it points at (serial, profile,
//! CSR hash); the lists that make hsmca sign something (open intents to abandon, intents that
//! vouch for a key) are re-read from the log; "no such certificate" is checked against the
//! log before `revoke` believes it, and against the revoked certificates before a request is
//! signed anew. What an edited index can still do, because proving an absence would mean
//! reading the whole log: hide a certificate from `expiring` or `log list` (their filters run
//! on its columns), and make a rerun sign a second certificate for a request whose row it
//! dropped (same CSR and profile, not revoked; both certificates are in the log).

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{Body, Entry, LogError};

/// Bump when the schema changes: an index of another version is rebuilt.
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE meta(k TEXT PRIMARY KEY, v ANY) STRICT, WITHOUT ROWID;
CREATE TABLE certs(
  seq INTEGER PRIMARY KEY, serial TEXT NOT NULL, profile TEXT NOT NULL,
  csr_sha256 TEXT NOT NULL, subject TEXT NOT NULL,
  not_after INTEGER NOT NULL, is_ca INTEGER NOT NULL, time TEXT NOT NULL, time_unix INTEGER NOT NULL,
  offset INTEGER NOT NULL, len INTEGER NOT NULL, renews TEXT, policy_sha256 TEXT,
  renewed_by TEXT, rev_seq INTEGER, serial_key INTEGER NOT NULL, csr_key INTEGER NOT NULL) STRICT;
CREATE INDEX certs_serial ON certs(serial_key);
CREATE INDEX certs_csr ON certs(csr_key);
CREATE INDEX certs_not_after ON certs(not_after);
CREATE TABLE intents(
  seq INTEGER PRIMARY KEY, serial TEXT, csr_sha256 TEXT, renews TEXT, policy_sha256 TEXT,
  open INTEGER NOT NULL, serial_key INTEGER, csr_key INTEGER) STRICT;
CREATE INDEX intents_serial ON intents(serial_key);
CREATE INDEX intents_csr ON intents(csr_key);
CREATE INDEX intents_open ON intents(open) WHERE open = 1;
CREATE TABLE critical(seq INTEGER PRIMARY KEY, offset INTEGER NOT NULL, len INTEGER NOT NULL) STRICT;
";

/// What the index reflects: the first `size` entries, `bytes` bytes of `entries.jsonl`, whose
/// Merkle root is `root`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub size: u64,
    pub bytes: u64,
    pub root: [u8; 32],
}

/// A certificate row.
#[derive(Debug, Clone)]
pub(crate) struct CertRow {
    pub seq: u64,
    pub serial: String,
    pub profile: String,
    pub csr_sha256: String,
    pub offset: u64,
    pub len: usize,
    pub renews: Option<String>,
    pub policy_sha256: Option<String>,
    pub renewed_by: Option<String>,
}

/// What a query selects (all given conditions must hold).
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// This serial (hex, lower case).
    pub serial: Option<String>,
    /// This profile.
    pub profile: Option<String>,
    /// Subject (RFC 4514) contains this text.
    pub subject_contains: Option<String>,
    /// Logged at or after (Unix seconds).
    pub since: Option<i64>,
    /// Logged before (Unix seconds).
    pub until: Option<i64>,
    /// Only revoked certificates.
    pub revoked: bool,
    /// Only certificates neither revoked nor renewed.
    pub current: bool,
    /// notAfter before (Unix seconds).
    pub not_after_before: Option<i64>,
    /// Only CA certificates.
    pub ca: bool,
}

fn db_error(path: &Path, e: rusqlite::Error) -> LogError {
    // A full disk is a full disk, whichever file hit it first: same message, same hint.
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && f.code == rusqlite::ErrorCode::DiskFull
    {
        return LogError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32),
        };
    }
    LogError::Index {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The open index.
pub(crate) struct Index {
    conn: Connection,
    path: std::path::PathBuf,
}

impl Index {
    /// Opens (or, with `create`, makes) the index. A file whose schema is not exactly the one
    /// hsmca writes (a table swapped for a view, a trigger added, another version) is refused
    /// here, and the caller rebuilds it.
    pub(crate) fn open(path: &Path, create: bool) -> Result<Self, LogError> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NOFOLLOW
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let conn = Connection::open_with_flags(path, flags).map_err(|e| db_error(path, e))?;
        // Every statement hsmca runs stays prepared: more than rusqlite's default 16 of them,
        // and re-parsing SQL per certificate was a visible part of a batch's time.
        conn.set_prepared_statement_cache_capacity(64);
        let index = Self {
            conn,
            path: path.to_path_buf(),
        };
        index.harden()?;
        if create {
            index.create()?;
        } else {
            index.check_schema()?;
        }
        Ok(index)
    }

    /// A file in the CA home is hostile: no schema code runs (`trusted_schema=OFF`, defensive
    /// mode), and the journal is WAL so a crash never leaves a half-applied transaction.
    fn harden(&self) -> Result<(), LogError> {
        let c = &self.conn;
        c.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)
            .map_err(|e| db_error(&self.path, e))?;
        c.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA,
            false,
        )
        .map_err(|e| db_error(&self.path, e))?;
        c.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cell_size_check=ON; PRAGMA cache_size=-8192;",
        )
        .map_err(|e| db_error(&self.path, e))
    }

    fn create(&self) -> Result<(), LogError> {
        let tx = format!(
            "BEGIN; {SCHEMA} INSERT INTO meta VALUES('version', {SCHEMA_VERSION}), ('size', 0), ('bytes', 0), ('root', x'{}'); COMMIT;",
            crate::keys::hex(&tlog_tiles::tlog::EMPTY_HASH.0)
        );
        self.conn
            .execute_batch(&tx)
            .map_err(|e| db_error(&self.path, e))
    }

    /// The schema must be exactly ours, object for object.
    fn check_schema(&self) -> Result<(), LogError> {
        let expected: std::collections::BTreeSet<String> = {
            let probe = Connection::open_in_memory().map_err(|e| db_error(&self.path, e))?;
            probe
                .execute_batch(SCHEMA)
                .map_err(|e| db_error(&self.path, e))?;
            schema_of(&probe).map_err(|e| db_error(&self.path, e))?
        };
        let found = schema_of(&self.conn).map_err(|e| db_error(&self.path, e))?;
        if found != expected {
            return Err(LogError::Index {
                path: self.path.clone(),
                message: "its tables are not the ones hsmca writes".into(),
            });
        }
        let version: i64 = self
            .conn
            .query_row("SELECT v FROM meta WHERE k='version'", [], |r| r.get(0))
            .map_err(|e| db_error(&self.path, e))?;
        if version != SCHEMA_VERSION {
            return Err(LogError::Index {
                path: self.path.clone(),
                message: format!("schema version {version}, this hsmca writes {SCHEMA_VERSION}"),
            });
        }
        Ok(())
    }

    /// What the index reflects.
    pub(crate) fn meta(&self) -> Result<Meta, LogError> {
        let get = |k: &str| -> Result<rusqlite::types::Value, LogError> {
            self.conn
                .query_row("SELECT v FROM meta WHERE k=?1", [k], |r| r.get(0))
                .map_err(|e| db_error(&self.path, e))
        };
        use rusqlite::types::Value;
        let int = |v: Value| match v {
            Value::Integer(i) => u64::try_from(i).ok(),
            _ => None,
        };
        let bad = |what: &str| LogError::Index {
            path: self.path.clone(),
            message: format!("meta {what} is malformed"),
        };
        let size = int(get("size")?).ok_or_else(|| bad("size"))?;
        let bytes = int(get("bytes")?).ok_or_else(|| bad("bytes"))?;
        let root = match get("root")? {
            Value::Blob(b) => <[u8; 32]>::try_from(b.as_slice()).map_err(|_| bad("root"))?,
            _ => return Err(bad("root")),
        };
        Ok(Meta { size, bytes, root })
    }

    /// Starts a batch of rows; [`Batch::commit`] records `meta` with them atomically.
    pub(crate) fn batch(&self) -> Result<Batch<'_>, LogError> {
        // One connection, one thread, no transaction open elsewhere: the unchecked form only
        // lets a `&self` caller (a lookup that first applies what is pending) start it.
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(|e| db_error(&self.path, e))?;
        Ok(Batch {
            tx,
            path: &self.path,
        })
    }

    /// Certificates matching `q`, in log order.
    pub(crate) fn certs(&self, q: &Query) -> Result<Vec<CertRow>, LogError> {
        let mut sql = String::from(
            "SELECT seq, serial, profile, csr_sha256, offset, len, renews, policy_sha256, renewed_by FROM certs WHERE 1",
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        use rusqlite::types::Value;
        if let Some(s) = &q.serial {
            sql.push_str(" AND serial_key = ? AND serial = ?");
            args.push(Value::Integer(key(s)));
            args.push(Value::Text(s.clone()));
        }
        if let Some(p) = &q.profile {
            sql.push_str(" AND profile = ?");
            args.push(Value::Text(p.clone()));
        }
        if let Some(s) = &q.subject_contains {
            sql.push_str(" AND instr(subject, ?) > 0");
            args.push(Value::Text(s.clone()));
        }
        if let Some(t) = q.since {
            sql.push_str(" AND time_unix >= ?");
            args.push(Value::Integer(t));
        }
        if let Some(t) = q.until {
            sql.push_str(" AND time_unix < ?");
            args.push(Value::Integer(t));
        }
        if let Some(t) = q.not_after_before {
            sql.push_str(" AND not_after < ?");
            args.push(Value::Integer(t));
        }
        if q.revoked {
            sql.push_str(" AND rev_seq IS NOT NULL");
        }
        if q.current {
            sql.push_str(" AND rev_seq IS NULL AND renewed_by IS NULL");
        }
        if q.ca {
            sql.push_str(" AND is_ca = 1");
        }
        sql.push_str(" ORDER BY seq");
        let mut stmt = self
            .conn
            .prepare(&sql)
            .map_err(|e| db_error(&self.path, e))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), cert_row)
            .map_err(|e| db_error(&self.path, e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| db_error(&self.path, e))
    }

    /// The certificate issued for this CSR under this profile, if any (the first).
    pub(crate) fn issued(
        &self,
        csr_sha256: &str,
        profile: &str,
    ) -> Result<Option<CertRow>, LogError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT seq, serial, profile, csr_sha256, offset, len, renews, policy_sha256, renewed_by FROM certs WHERE csr_key = ?3 AND csr_sha256 = ?1 AND profile = ?2 ORDER BY seq LIMIT 1",
            )
            .and_then(|mut s| s.query_row(params![csr_sha256, profile, request_key(csr_sha256, profile)], cert_row).optional())
            .map_err(|e| db_error(&self.path, e))?;
        self.answers(row, |r| r.csr_sha256 == csr_sha256 && r.profile == profile)
    }

    /// The certificate with this serial, if any.
    pub(crate) fn cert(&self, serial: &str) -> Result<Option<CertRow>, LogError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT seq, serial, profile, csr_sha256, offset, len, renews, policy_sha256, renewed_by FROM certs WHERE serial_key = ?2 AND serial = ?1 ORDER BY seq LIMIT 1",
            )
            .and_then(|mut s| s.query_row(params![serial, key(serial)], cert_row).optional())
            .map_err(|e| db_error(&self.path, e))?;
        self.answers(row, |r| r.serial == serial)
    }

    /// A row a lookup returned, refused if it does not hold what was looked up: a b-tree
    /// rebuilt over another column under the same schema text answers with any row.
    fn answers(
        &self,
        row: Option<CertRow>,
        matches: impl FnOnce(&CertRow) -> bool,
    ) -> Result<Option<CertRow>, LogError> {
        match row {
            Some(r) if !matches(&r) => Err(LogError::Index {
                path: self.path.clone(),
                message: format!(
                    "a lookup returned the row of serial {} (entry {}), which is not what was asked; run `hsmca log reindex --home DIR`",
                    r.serial, r.seq
                ),
            }),
            other => Ok(other),
        }
    }

    /// Whether any intent used this serial.
    pub(crate) fn serial_used(&self, serial: &str) -> Result<bool, LogError> {
        self.conn
            .prepare_cached("SELECT 1 FROM intents WHERE serial_key = ?2 AND serial = ?1 LIMIT 1")
            .and_then(|mut s| s.exists(params![serial, key(serial)]))
            .map_err(|e| db_error(&self.path, e))
    }

    /// How many intents use this serial.
    pub(crate) fn serial_uses(&self, serial: &str) -> Result<u64, LogError> {
        self.conn
            .prepare_cached("SELECT count(*) FROM intents WHERE serial_key = ?2 AND serial = ?1")
            .and_then(|mut s| s.query_row(params![serial, key(serial)], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
            .map_err(|e| db_error(&self.path, e))
    }

    /// The nearest entry at or before `seq` whose place the index knows: (seq, offset). Entry
    /// 0 is always known (it is critical), so this always finds one.
    pub(crate) fn place_at_or_before(&self, seq: u64) -> Result<(u64, u64), LogError> {
        self.conn
            .prepare_cached(
                "SELECT seq, offset FROM (SELECT seq, offset FROM certs WHERE seq <= ?1 ORDER BY seq DESC LIMIT 1) \
                 UNION ALL SELECT seq, offset FROM (SELECT seq, offset FROM critical WHERE seq <= ?1 ORDER BY seq DESC LIMIT 1) \
                 ORDER BY seq DESC LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![seq as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })
            })
            .map_err(|e| db_error(&self.path, e))
    }

    /// Entry numbers of intents naming this CSR (or SPKI) hash.
    pub(crate) fn intents_naming(&self, csr_sha256: &str) -> Result<Vec<u64>, LogError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq FROM intents WHERE csr_key = ?2 AND csr_sha256 = ?1 ORDER BY seq",
            )
            .map_err(|e| db_error(&self.path, e))?;
        let rows = stmt
            .query_map(params![csr_sha256, key(csr_sha256)], |r| r.get::<_, i64>(0))
            .map_err(|e| db_error(&self.path, e))?;
        rows.map(|r| r.map(|v| v as u64))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| db_error(&self.path, e))
    }

    /// Intents (issue and CRL) with no result yet.
    pub(crate) fn open_intents(&self) -> Result<Vec<u64>, LogError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq FROM intents WHERE open = 1 ORDER BY seq")
            .map_err(|e| db_error(&self.path, e))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, i64>(0))
            .map_err(|e| db_error(&self.path, e))?;
        rows.map(|r| r.map(|v| v as u64))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| db_error(&self.path, e))
    }

    /// Where each critical entry is, in log order: (seq, offset, length).
    pub(crate) fn critical(&self) -> Result<Vec<(u64, u64, usize)>, LogError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, offset, len FROM critical ORDER BY seq")
            .map_err(|e| db_error(&self.path, e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as usize,
                ))
            })
            .map_err(|e| db_error(&self.path, e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| db_error(&self.path, e))
    }
}

/// The 64-bit key a text is indexed under (the first 8 bytes of its SHA-256): integer
/// B-trees are a fraction of the size of ones over 64-character hex strings, and a batch
/// inserts into them for every certificate. Every query also compares the text itself.
fn key(text: &str) -> i64 {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    i64::from_be_bytes(b)
}

/// The key of a (CSR, profile) request.
fn request_key(csr_sha256: &str, profile: &str) -> i64 {
    key(&format!("{csr_sha256}\n{profile}"))
}

fn cert_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CertRow> {
    Ok(CertRow {
        seq: r.get::<_, i64>(0)? as u64,
        serial: r.get(1)?,
        profile: r.get(2)?,
        csr_sha256: r.get(3)?,
        offset: r.get::<_, i64>(4)? as u64,
        len: r.get::<_, i64>(5)? as usize,
        renews: r.get(6)?,
        policy_sha256: r.get(7)?,
        renewed_by: r.get(8)?,
    })
}

fn schema_of(c: &Connection) -> rusqlite::Result<std::collections::BTreeSet<String>> {
    let mut stmt =
        c.prepare("SELECT type || ' ' || name || ' ' || coalesce(sql, '') FROM sqlite_schema")?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// What the index keeps of a logged certificate (see [`crate::verify::index_facts`]).
#[derive(Debug, Clone)]
pub(crate) struct CertFacts {
    pub(crate) subject: String,
    pub(crate) not_after: i64,
    pub(crate) is_ca: bool,
}

impl CertFacts {
    /// The facts of a DER certificate, if it parses.
    pub(crate) fn of(der: &[u8]) -> Option<Self> {
        let (subject, not_after, is_ca) = crate::verify::index_facts(der).ok()?;
        Some(Self {
            subject,
            not_after,
            is_ca,
        })
    }
}

/// Rows being added, committed with the meta they bring the index to.
pub(crate) struct Batch<'a> {
    tx: rusqlite::Transaction<'a>,
    path: &'a Path,
}

/// Whether an entry is critical: one whose absence from the index would change what hsmca
/// signs, revokes or trusts (the root, policies, modules, revocations, CRLs, recoveries, CA
/// certificates). Their chain is signed in every checkpoint, so the index cannot drop one
/// unseen.
pub(crate) fn is_critical(body: &Body, is_ca: bool) -> bool {
    matches!(
        body,
        Body::Root { .. }
            | Body::Policy { .. }
            | Body::Module { .. }
            | Body::Revocation { .. }
            | Body::CrlIntent { .. }
            | Body::Crl { .. }
            | Body::Recovery { .. }
    ) || (is_ca && matches!(body, Body::Cert { .. }))
}

impl Batch<'_> {
    fn err(&self, e: rusqlite::Error) -> LogError {
        db_error(self.path, e)
    }

    /// Adds the rows of one entry. `facts` are the certificate's, for a `cert` entry.
    pub(crate) fn add(
        &mut self,
        offset: u64,
        len: usize,
        entry: &Entry,
        facts: Option<&CertFacts>,
    ) -> Result<(), LogError> {
        let seq = entry.seq as i64;
        let is_ca = facts.is_some_and(|f| f.is_ca);
        if is_critical(&entry.body, is_ca) {
            self.tx
                .prepare_cached("INSERT INTO critical VALUES(?1, ?2, ?3)")
                .and_then(|mut s| s.execute(params![seq, offset as i64, len as i64]))
                .map_err(|e| self.err(e))?;
        }
        match &entry.body {
            Body::IssueIntent {
                serial,
                csr_sha256,
                renews,
                policy_sha256,
                ..
            } => {
                self.tx
                    .prepare_cached("INSERT INTO intents VALUES(?1, ?2, ?3, ?4, ?5, 1, ?6, ?7)")
                    .and_then(|mut s| {
                        s.execute(params![
                            seq,
                            serial,
                            csr_sha256,
                            renews,
                            policy_sha256,
                            key(serial),
                            key(csr_sha256)
                        ])
                    })
                    .map_err(|e| self.err(e))?;
            }
            Body::CrlIntent { .. } => {
                self.tx
                    .prepare_cached(
                        "INSERT INTO intents VALUES(?1, NULL, NULL, NULL, NULL, 1, NULL, NULL)",
                    )
                    .and_then(|mut s| s.execute(params![seq]))
                    .map_err(|e| self.err(e))?;
            }
            Body::Abandon { intent_seq, .. } | Body::Crl { intent_seq, .. } => {
                self.close(*intent_seq)?;
            }
            Body::Cert {
                intent_seq,
                serial,
                profile,
                csr_sha256,
                ..
            } => {
                self.close(*intent_seq)?;
                let (renews, policy): (Option<String>, Option<String>) = self
                    .tx
                    .prepare_cached("SELECT renews, policy_sha256 FROM intents WHERE seq = ?1")
                    .and_then(|mut s| {
                        s.query_row(params![*intent_seq as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()
                    })
                    .map_err(|e| self.err(e))?
                    .unwrap_or_default();
                let (subject, not_after) = facts
                    .map(|f| (f.subject.clone(), f.not_after))
                    .unwrap_or_default();
                let time_unix = time::OffsetDateTime::parse(
                    &entry.time,
                    &time::format_description::well_known::Rfc3339,
                )
                .map(|t| t.unix_timestamp())
                .unwrap_or(0);
                self.tx
                    .prepare_cached(
                        "INSERT INTO certs VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,NULL,NULL,?14,?15)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            seq,
                            serial,
                            profile,
                            csr_sha256,
                            subject,
                            not_after,
                            is_ca,
                            entry.time,
                            time_unix,
                            offset as i64,
                            len as i64,
                            renews,
                            policy,
                            key(serial),
                            request_key(csr_sha256, profile)
                        ])
                    })
                    .map_err(|e| self.err(e))?;
                if let Some(old) = renews {
                    self.tx
                        .prepare_cached(
                            "UPDATE certs SET renewed_by = ?1 WHERE serial_key = ?3 AND serial = ?2 AND renewed_by IS NULL",
                        )
                        .and_then(|mut s| s.execute(params![serial, old, key(&old)]))
                        .map_err(|e| self.err(e))?;
                }
            }
            Body::Revocation { serial, .. } => {
                self.tx
                    .prepare_cached(
                        "UPDATE certs SET rev_seq = ?1 WHERE serial_key = ?3 AND serial = ?2 AND rev_seq IS NULL",
                    )
                    .and_then(|mut s| s.execute(params![seq, serial, key(serial)]))
                    .map_err(|e| self.err(e))?;
            }
            _ => {}
        }
        Ok(())
    }

    fn close(&mut self, intent_seq: u64) -> Result<(), LogError> {
        self.tx
            .prepare_cached("UPDATE intents SET open = 0 WHERE seq = ?1")
            .and_then(|mut s| s.execute(params![intent_seq as i64]))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Commits the rows with the meta they bring the index to.
    pub(crate) fn commit(self, meta: Meta) -> Result<(), LogError> {
        let set = |k: &str, v: rusqlite::types::Value| {
            self.tx
                .prepare_cached("UPDATE meta SET v = ?2 WHERE k = ?1")
                .and_then(|mut s| s.execute(params![k, v]))
                .map_err(|e| db_error(self.path, e))
        };
        use rusqlite::types::Value;
        set("size", Value::Integer(meta.size as i64))?;
        set("bytes", Value::Integer(meta.bytes as i64))?;
        set("root", Value::Blob(meta.root.to_vec()))?;
        let path = self.path;
        self.tx.commit().map_err(|e| db_error(path, e))
    }
}
