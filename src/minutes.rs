//! Ceremony minutes: a Markdown record of what a ceremony did, drawn from the log (verified
//! first) and from the token's own description of itself, with blank lines for the people in
//! the room to sign. Reads only; needs no PIN (`C_GetTokenInfo` needs no login).
//!
//! The minutes repeat what an auditor later checks an export against: the root's and the
//! intermediates' fingerprints, the log's verifier key, and the last checkpoint, which the
//! operators keep outside the CA so that `hsmca log verify --checkpoint FILE` can prove the log
//! only grew since.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;

use crate::clock::{Clock, rfc3339};
use crate::error::Error;
use crate::home::{Home, io_at};
use crate::keys;
use crate::log::{self, Body, Entry};
use crate::token;
use crate::verify;

/// A CA certificate as the minutes name it.
#[derive(Debug, Clone, Serialize)]
pub struct CaLine {
    /// `root` or the intermediate's name.
    pub name: String,
    /// Subject, RFC 4514.
    pub subject: String,
    /// Serial, hex.
    pub serial: String,
    /// SHA-256 of the certificate (DER), hex: its fingerprint.
    pub sha256: String,
    /// notAfter.
    pub not_after: String,
}

/// A checkpoint as the minutes name it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointLine {
    /// Where it came from (`--since FILE`, `log/checkpoints/SIZE`, `log/checkpoint`).
    pub source: String,
    /// Tree size.
    pub size: u64,
    /// Root, base64.
    pub root: String,
}

/// Everything the minutes print.
#[derive(Debug, Clone, Serialize)]
pub struct Minutes {
    /// The CA home.
    pub home: PathBuf,
    /// When the minutes were made.
    pub made: String,
    /// The token, or why it could not be read.
    pub token: Result<token::TokenInfo, String>,
    /// The token label the CA home names.
    pub token_label: String,
    /// The PKCS#11 module path, as configured (or found).
    pub module: PathBuf,
    /// SHA-256 of the module file, or why it could not be read.
    pub module_sha256: Result<String, String>,
    /// The policy in force: its log entry and hash (`hsmca profiles apply` logs a new one).
    pub policy: Option<(u64, String)>,
    /// The module the log pins: its log entry, path and SHA-256.
    pub pinned_module: Option<(u64, String, String)>,
    /// The root and every intermediate.
    pub cas: Vec<CaLine>,
    /// Log origin.
    pub origin: String,
    /// The checkpoint verifier key.
    pub vkey: String,
    /// The checkpoint the minutes start from (`--since`, else the log's first).
    pub first: Option<CheckpointLine>,
    /// The latest checkpoint.
    pub last: CheckpointLine,
    /// The latest checkpoint's note, to paste or keep.
    pub last_note: String,
    /// Entries covered: `from..to`.
    pub from: u64,
    /// One past the last entry.
    pub to: u64,
    /// Certificates issued in the range, by profile.
    pub issued: BTreeMap<String, u64>,
    /// Intermediates created in the range: (name or subject, serial).
    pub intermediates: Vec<String>,
    /// Plans signed in the range: (hash, CSRs it would issue, entry).
    pub plans: Vec<(String, u64, u64)>,
    /// Revocations in the range: (serial, reason, time).
    pub revocations: Vec<(String, String, String)>,
    /// CRLs in the range: (issuer, number, serials listed, SHA-256).
    pub crls: Vec<(String, u64, usize, String)>,
    /// Intents abandoned in the range (nothing released for them).
    pub abandoned: u64,
}

/// Gathers the minutes of `home`, from `since` (a checkpoint file kept from an earlier
/// ceremony: only what came after it) or from the start. The log is verified first, and the
/// `since` checkpoint must verify and be extended by the log: minutes of a log that fails
/// verification are refused. The module is found as signing commands find it (`module`, then
/// `HSMCA_PKCS11_MODULE`, the CA home's, SoftHSM2's paths).
pub fn gather(
    home: &Home,
    since: Option<&Path>,
    module: Option<&Path>,
    clock: &dyn Clock,
) -> Result<Minutes, Error> {
    let paths = log::Paths::of_home(&home.dir);
    let root = home.root()?;
    let external = match since {
        Some(p) => vec![(p.display().to_string(), std::fs::read(p).map_err(io_at(p))?)],
        None => Vec::new(),
    };
    let report = log::verify_with(&paths, None, Some(&root.der), &external)?;
    if let Some(p) = report.problems.first() {
        return Err(Error::Log(log::LogError::Corrupt(p.clone())));
    }
    let first = match report.extends.first() {
        Some(e) => Some(CheckpointLine {
            source: e.name.clone(),
            size: e.size,
            root: e.root.clone(),
        }),
        None => first_checkpoint(&paths, &report.vkey)?,
    };
    let from = since.and(first.as_ref()).map_or(0, |c| c.size);
    let note_path = paths.checkpoint();
    let note = std::fs::read(&note_path).map_err(io_at(&note_path))?;
    let cp = log::translog::open_checkpoint(&note, &report.vkey)
        .map_err(|e| Error::Log(log::LogError::Checkpoint(e)))?;
    let last = CheckpointLine {
        source: "log/checkpoint".into(),
        size: cp.size,
        root: log::translog::b64(&cp.root),
    };

    let mut cas = vec![ca_line("root", &root.der)?];
    for ca in &home.config.cas {
        let (cert, _) = home.issuer(&ca.name)?;
        cas.push(ca_line(&ca.name, &cert.der)?);
    }
    let module = token::resolve_module(module, home.config.module.as_deref())?;
    let module_sha256 = std::fs::read(&module)
        .map(|b| keys::sha256_hex(&b))
        .map_err(|e| e.to_string());
    // The module is code: it is loaded (to read the token's description, no login) only if it
    // is the one the log pins.
    let root = home.root()?;
    let (policy, pinned_module) = log::verified_pins(&home.dir, Some(&root.der))?;
    let token = crate::pinned::ModuleFile::hash(&module)
        .and_then(|file| file.check(pinned_module.as_ref(), false).map(|_| file))
        .and_then(|file| file.seal())
        .map_err(|e| format!("module not loaded: {e}"))
        .and_then(|sealed| {
            token::info(&sealed.path(), &home.config.token).map_err(|e| crate::error::chain(&e))
        });

    let mut m = Minutes {
        home: home.dir.clone(),
        made: rfc3339(clock.now()),
        token,
        token_label: home.config.token.clone(),
        module,
        module_sha256,
        policy: policy.map(|p| (p.seq, p.sha256)),
        pinned_module: pinned_module.map(|m| (m.seq, m.path, m.sha256)),
        cas,
        origin: home.config.origin.clone(),
        vkey: report.vkey.clone(),
        first,
        last,
        last_note: String::from_utf8_lossy(&note).into_owned(),
        from,
        to: report.entries,
        issued: BTreeMap::new(),
        intermediates: Vec::new(),
        plans: Vec::new(),
        revocations: Vec::new(),
        crls: Vec::new(),
        abandoned: 0,
    };
    m.read_entries(&paths)?;
    Ok(m)
}

fn ca_line(name: &str, der: &[u8]) -> Result<CaLine, Error> {
    let facts = verify::describe(der).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(CaLine {
        name: name.to_owned(),
        subject: facts.subject_string,
        serial: facts.serial,
        sha256: keys::sha256_hex(der),
        not_after: rfc3339(facts.not_after),
    })
}

/// The smallest checkpoint the log keeps (the end of `init`).
fn first_checkpoint(paths: &log::Paths, vkey: &str) -> Result<Option<CheckpointLine>, Error> {
    let dir = paths.checkpoints();
    let mut sizes: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map_err(io_at(&dir))?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .collect();
    sizes.sort();
    let Some((_, path)) = sizes.first() else {
        return Ok(None);
    };
    let cp = log::translog::open_checkpoint(&std::fs::read(path).map_err(io_at(path))?, vkey)
        .map_err(|e| Error::Log(log::LogError::Checkpoint(e)))?;
    Ok(Some(CheckpointLine {
        source: format!(
            "log/checkpoints/{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ),
        size: cp.size,
        root: log::translog::b64(&cp.root),
    }))
}

impl Minutes {
    /// Reads the entries `from..to` into the minutes' lists.
    fn read_entries(&mut self, paths: &log::Paths) -> Result<(), Error> {
        let path = paths.entries();
        let file = File::open(&path).map_err(io_at(&path))?;
        let mut crl_counts: BTreeMap<u64, usize> = BTreeMap::new();
        for line in BufReader::new(file).split(b'\n') {
            let line = line.map_err(io_at(&path))?;
            let Ok(entry) = serde_json::from_slice::<Entry>(&line) else {
                continue;
            };
            if entry.seq < self.from {
                continue;
            }
            match entry.body {
                Body::Cert {
                    profile,
                    cert,
                    serial,
                    ..
                } => {
                    let is_ca = B64
                        .decode(cert)
                        .ok()
                        .and_then(|der| verify::describe(&der).ok())
                        .filter(|f| f.is_ca);
                    match is_ca {
                        Some(facts) => self
                            .intermediates
                            .push(format!("{} (serial {serial})", facts.subject_string)),
                        None => *self.issued.entry(profile).or_default() += 1,
                    }
                }
                Body::Plan {
                    plan_sha256,
                    to_issue,
                } => self.plans.push((plan_sha256, to_issue, entry.seq)),
                Body::Revocation {
                    serial,
                    reason,
                    revocation_time,
                    ..
                } => self.revocations.push((serial, reason, revocation_time)),
                Body::CrlIntent { revoked, .. } => {
                    crl_counts.insert(entry.seq, revoked.len());
                }
                Body::Crl {
                    intent_seq,
                    issuer,
                    crl_number,
                    crl_sha256,
                    ..
                } => self.crls.push((
                    issuer,
                    crl_number,
                    crl_counts.get(&intent_seq).copied().unwrap_or(0),
                    crl_sha256,
                )),
                Body::Abandon { .. } => self.abandoned += 1,
                _ => {}
            }
        }
        Ok(())
    }

    /// The minutes as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_markdown(&mut s);
        s
    }

    fn write_markdown(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s, "# Ceremony minutes: {}\n", self.home.display())?;
        writeln!(
            s,
            "Made by hsmca {} at {} from the issuance log (verified) and the token. Check each \
             value against the screen and the token before signing.\n",
            env!("CARGO_PKG_VERSION"),
            self.made
        )?;
        writeln!(s, "## Token and module\n")?;
        writeln!(s, "| | |\n|---|---|")?;
        match &self.token {
            Ok(t) => {
                writeln!(s, "| token label | `{}` |", t.label)?;
                writeln!(s, "| token serial | `{}` |", t.serial)?;
                writeln!(s, "| manufacturer | {} |", t.manufacturer)?;
                writeln!(s, "| model | {} |", t.model)?;
            }
            Err(e) => {
                writeln!(s, "| token label | `{}` |", self.token_label)?;
                writeln!(s, "| token | not read: {e} |")?;
            }
        }
        writeln!(s, "| PKCS#11 module | `{}` |", self.module.display())?;
        match &self.module_sha256 {
            Ok(h) => writeln!(s, "| module SHA-256 | `{h}` |")?,
            Err(e) => writeln!(s, "| module SHA-256 | not read: {e} |")?,
        }
        writeln!(s, "\n## Certificate authorities\n")?;
        writeln!(
            s,
            "| CA | subject | serial | SHA-256 fingerprint | not after |"
        )?;
        writeln!(s, "|---|---|---|---|---|")?;
        for c in &self.cas {
            writeln!(
                s,
                "| {} | {} | `{}` | `{}` | {} |",
                c.name, c.subject, c.serial, c.sha256, c.not_after
            )?;
        }
        writeln!(
            s,
            "\nLog origin `{}`; checkpoint verifier key:\n",
            self.origin
        )?;
        writeln!(s, "```\n{}\n```\n", self.vkey)?;
        writeln!(s, "## Policy\n")?;
        match &self.policy {
            Some((seq, hash)) => writeln!(
                s,
                "Policy in force: log entry {seq}, SHA-256 `{hash}` (every issuance's intent names \
                 the policy it was decided under; the plans below were approved by their hash).\n"
            )?,
            None => writeln!(
                s,
                "No policy is logged in this CA home (run `hsmca profiles apply`).\n"
            )?,
        }
        if let Some((seq, path, hash)) = &self.pinned_module {
            writeln!(
                s,
                "Pinned PKCS#11 module: log entry {seq}, `{path}`, SHA-256 `{hash}`.\n"
            )?;
        }
        writeln!(
            s,
            "## What the log records (entries {}..{})\n",
            self.from, self.to
        )?;
        if self.from == self.to {
            writeln!(s, "Nothing since the first checkpoint.\n")?;
        }
        let issued: u64 = self.issued.values().sum();
        writeln!(s, "- certificates issued: {issued}")?;
        for (profile, n) in &self.issued {
            writeln!(s, "  - {profile}: {n}")?;
        }
        writeln!(s, "- intermediates created: {}", self.intermediates.len())?;
        for i in &self.intermediates {
            writeln!(s, "  - {i}")?;
        }
        writeln!(s, "- plans signed: {}", self.plans.len())?;
        for (hash, n, seq) in &self.plans {
            writeln!(s, "  - `{hash}`: {n} to issue (entry {seq})")?;
        }
        writeln!(s, "- revocations: {}", self.revocations.len())?;
        for (serial, reason, time) in &self.revocations {
            writeln!(s, "  - `{serial}`: {reason} at {time}")?;
        }
        writeln!(s, "- CRLs signed: {}", self.crls.len())?;
        for (issuer, number, n, sha) in &self.crls {
            writeln!(s, "  - {issuer} CRL {number}: {n} revoked, SHA-256 `{sha}`")?;
        }
        if self.abandoned > 0 {
            writeln!(
                s,
                "- intents abandoned (nothing released): {}",
                self.abandoned
            )?;
        }
        writeln!(s, "\n## Checkpoints\n")?;
        if let Some(f) = &self.first {
            writeln!(
                s,
                "- first: size {}, root `{}` ({})",
                f.size, f.root, f.source
            )?;
        }
        writeln!(
            s,
            "- last: size {}, root `{}` ({})\n",
            self.last.size, self.last.root, self.last.source
        )?;
        writeln!(
            s,
            "Keep the last checkpoint outside the CA (with these minutes): \
             `cp {}/log/checkpoint minutes-{}.checkpoint`. `hsmca log verify --checkpoint FILE` \
             later proves the log still extends it.\n",
            self.home.display(),
            self.made.get(..10).unwrap_or(&self.made)
        )?;
        writeln!(s, "```\n{}```\n", self.last_note)?;
        writeln!(s, "## Signatures\n")?;
        writeln!(s, "| role | name | signature | date |\n|---|---|---|---|")?;
        for role in ["operator", "operator", "witness", "witness"] {
            writeln!(s, "| {role} | | | |")?;
        }
        Ok(())
    }
}
