//! Certificate lifecycle from the log: revoke, CRLs, expiry report, renewal, listings and the
//! export an online verifier needs. Each job reads or appends to the log like `sign` does:
//! intent before the token signs, result after, checkpoint, and only then any file.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::clock::{Clock, rfc3339};
use crate::csr::VerifiedCsr;
use crate::engine::{self, CaSession, CertSummary, Outcome, Ready, Withheld};
use crate::error::Error;
use crate::files;
use crate::home::Home;
use crate::keys;
use crate::log::{self, Body, Record};
use crate::policy::{self, Context, Purpose};
use crate::profile::Duration;
use crate::signer::Keystore;
use crate::verify;

fn parse_time(s: &str) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| Error::Usage(format!("{s:?} is not an RFC 3339 time: {e}")))
}

/// Normalises a serial given by an operator (hex, any case, optional colons or `0x`) to the
/// log's form: lowercase hex of whole bytes, so `14F9...` and `014f9...` name the same serial.
pub fn normalise_serial(s: &str) -> String {
    let s = s
        .trim()
        .trim_start_matches("0x")
        .trim_start_matches("0X")
        .replace(':', "")
        .to_ascii_lowercase();
    if s.len() % 2 == 1 { format!("0{s}") } else { s }
}

#[cfg(test)]
mod tests {
    #[test]
    fn serials_normalise_to_whole_bytes() {
        use super::normalise_serial as n;
        assert_eq!(n("014F9C"), "014f9c");
        assert_eq!(n("14f9c"), "014f9c");
        assert_eq!(n("0x01:4F:9C"), "014f9c");
    }
}

/// What `revoke` did.
#[derive(Debug, Clone, Serialize)]
pub struct Revoked {
    /// Serial, hex.
    pub serial: String,
    /// Subject of the revoked certificate.
    pub subject: String,
    /// Reason.
    pub reason: String,
    /// Log entry.
    pub log_entry: u64,
    /// The CA that issued it (`root` or an intermediate's name): whose CRL must list it.
    pub issuer: String,
    /// The command that publishes that CRL, complete, to paste.
    pub crl_command: String,
}

/// `hsmca revoke`: records a revocation in the log. The next `hsmca crl` for the certificate's
/// issuer lists it. An unknown or already revoked serial is an error.
pub fn revoke(
    home: &Home,
    serial: &str,
    reason: &str,
    invalidity_date: Option<&str>,
    keys: &dyn Keystore,
    clock: &dyn Clock,
) -> Result<Revoked, Error> {
    // Recorded under hsmca's name whatever the spelling given (`keyCompromise`, ...).
    let Some(reason) = crate::crl::canonical_reason(reason) else {
        let names: Vec<&str> = crate::crl::REASONS.iter().map(|(n, _)| *n).collect();
        return Err(Error::Usage(format!(
            "unknown reason {reason:?}; use one of {} (or their RFC 5280 / OpenSSL spellings such as keyCompromise)",
            names.join(", ")
        )));
    };
    let invalidity = invalidity_date.map(parse_time).transpose()?;
    let serial = normalise_serial(serial);
    let mut session = CaSession::open(home, keys, clock)?;
    let log = session.log();
    if !log.has_cert(&serial)? {
        return Err(Error::Usage(format!(
            "serial {serial} was never issued by this CA (see `hsmca log list`)"
        )));
    }
    if log.is_revoked(&serial) {
        return Err(Error::Usage(format!("serial {serial} is already revoked")));
    }
    let record = log
        .records(&log::Query {
            serial: Some(serial.clone()),
            ..log::Query::default()
        })?
        .into_iter()
        .next();
    let facts = record.and_then(|r| verify::describe(&r.der).ok());
    let subject = facts
        .as_ref()
        .map(|f| f.subject_string.clone())
        .unwrap_or_default();
    let issuer = match &facts {
        Some(f) => issuer_name_of(home, &f.issuer_der)?,
        None => "root".to_owned(),
    };
    let crl_command = format!(
        "hsmca crl --home {} --issuer {issuer} --out {issuer}-crl-{}.pem",
        shell_word(&home.dir.display().to_string()),
        log.last_crl_number(&issuer) + 1
    );
    let body = Body::Revocation {
        serial: serial.clone(),
        reason: reason.to_owned(),
        revocation_time: rfc3339(clock.now()),
        invalidity_date: invalidity.map(rfc3339),
    };
    let seq = session.append(vec![body])?[0];
    session.checkpoint()?;
    Ok(Revoked {
        serial,
        subject,
        reason: reason.to_owned(),
        log_entry: seq,
        issuer,
        crl_command,
    })
}

/// The name (`root` or an intermediate's) of the CA of this home whose subject is `issuer_der`.
fn issuer_name_of(home: &Home, issuer_der: &[u8]) -> Result<String, Error> {
    let subject_of = |der: &[u8]| verify::names(der).ok().map(|(_, subject, _, _)| subject);
    for ca in &home.config.cas {
        let (cert, _) = home.issuer(&ca.name)?;
        if subject_of(&cert.der).as_deref() == Some(issuer_der) {
            return Ok(ca.name.clone());
        }
    }
    Ok("root".to_owned())
}

/// `s` as one POSIX shell word: as it is when it holds only safe characters, else in single
/// quotes, so a pasted hint means what it shows.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,=@%".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The serial of a certificate file, for `revoke --cert`.
pub fn serial_of_file(path: &Path) -> Result<String, Error> {
    // The certificate may come from the stick: a regular file of a certificate's size only.
    let bytes = crate::input::read_file(path, crate::input::CERT_CAP)?;
    let cert = crate::issue::IssuerCert::from_pem_or_der(&bytes)
        .map_err(|e| Error::Usage(format!("{}: not a certificate: {e}", path.display())))?;
    Ok(verify::describe(&cert.der)
        .map_err(|e| Error::Usage(e.to_string()))?
        .serial)
}

/// What `crl` made.
#[derive(Debug, Clone, Serialize)]
pub struct CrlReport {
    /// Issuing CA.
    pub issuer: String,
    /// cRLNumber.
    pub number: u64,
    /// thisUpdate.
    pub this_update: String,
    /// nextUpdate.
    pub next_update: String,
    /// Serials listed.
    pub revoked: Vec<String>,
    /// Where it was written.
    pub file: PathBuf,
    /// Log entry of the CRL.
    pub log_entry: u64,
}

/// `hsmca crl`: a CRL v2 for one issuer (the root or an intermediate), signed in the token
/// with the next cRLNumber, listing every revoked certificate that issuer signed.
pub fn crl(
    home: &Home,
    issuer_name: &str,
    next_update: Duration,
    out: &Path,
    keys: &dyn Keystore,
    clock: &dyn Clock,
) -> Result<CrlReport, Error> {
    if out.exists() {
        return Err(Error::File(files::FileError::Exists(out.to_path_buf())));
    }
    let mut session = CaSession::open(home, keys, clock)?;
    let issuer = session.issuer(issuer_name)?.cert.clone();
    let (_, issuer_subject, _, _) =
        verify::names(&issuer.der).map_err(|e| Error::Internal(e.to_string()))?;
    let now = clock.now();
    let mut entries = Vec::new();
    // From the critical entries the checkpoint signs: a CRL never misses a revocation.
    for r in session.log().revocations()? {
        let Some(rev) = &r.revoked else { continue };
        let facts = verify::describe(&r.der).map_err(|e| Error::Internal(e.to_string()))?;
        if facts.issuer_der != issuer_subject {
            continue;
        }
        entries.push(crate::crl::Entry {
            serial: hex_bytes(&r.serial),
            revocation_time: parse_time(&rev.revocation_time)?,
            reason: rev.reason.clone(),
            invalidity_date: rev.invalidity_date.as_deref().map(parse_time).transpose()?,
        });
    }
    let spec = crate::crl::Spec {
        number: session.log().last_crl_number(issuer_name) + 1,
        this_update: now,
        next_update: now.checked_add(next_update.to_time()).ok_or_else(|| {
            Error::Usage(format!(
                "--next-update {next_update} is past the end of time"
            ))
        })?,
        revoked: entries,
    };
    let prepared = crate::crl::prepare(&spec, &issuer)?;
    let revoked: Vec<String> = spec.revoked.iter().map(|e| keys::hex(&e.serial)).collect();
    let intent = Body::CrlIntent {
        issuer: issuer_name.to_owned(),
        crl_number: spec.number,
        this_update: rfc3339(spec.this_update),
        next_update: rfc3339(spec.next_update),
        revoked: revoked.clone(),
        tbs_sha256: prepared.tbs_sha256.clone(),
    };
    let intent_seq = session.append(vec![intent])?[0];
    let signed = {
        let key = session.issuer(issuer_name)?;
        crate::crl::sign(&prepared, &issuer, key.signer())
    };
    let der = match signed {
        Ok(der) => der,
        Err(e) => {
            let reason = format!("not released: {}", crate::error::chain(&e));
            session.append(vec![engine::abandon(intent_seq, &reason)])?;
            session.checkpoint()?;
            return Err(e.into());
        }
    };
    let body = Body::Crl {
        intent_seq,
        issuer: issuer_name.to_owned(),
        crl_number: spec.number,
        crl_sha256: keys::sha256_hex(&der),
        crl: B64.encode(&der),
    };
    let seq = session.append(vec![body])?[0];
    session.checkpoint()?;
    files::write_new(out, engine::pem("X509 CRL", &der).as_bytes())?;
    Ok(CrlReport {
        issuer: issuer_name.to_owned(),
        number: spec.number,
        this_update: rfc3339(spec.this_update),
        next_update: rfc3339(spec.next_update),
        revoked,
        file: out.to_path_buf(),
        log_entry: seq,
    })
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    let padded = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex.to_owned()
    };
    (0..padded.len() / 2)
        .filter_map(|i| u8::from_str_radix(&padded[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// One line of the expiry report.
#[derive(Debug, Clone, Serialize)]
pub struct Expiring {
    /// Serial, hex.
    pub serial: String,
    /// Profile (`root` for the root).
    pub profile: String,
    /// Subject, RFC 4514.
    pub subject: String,
    /// Issuer, RFC 4514.
    pub issuer: String,
    /// SANs: where the certificate is used.
    pub sans: Vec<String>,
    /// notAfter.
    pub not_after: String,
    /// notAfter in Unix seconds (what monitoring compares with `time()`).
    pub not_after_seconds: i64,
    /// Days left (negative once expired).
    pub days_left: i64,
    /// Whether it is a CA (root or intermediate).
    pub ca: bool,
}

/// `hsmca expiring`: unrevoked certificates and the CAs themselves whose notAfter falls within
/// `within` from now (already expired ones included; `None`: all of them, for monitoring),
/// soonest first. Needs no token. A certificate already renewed is left out: its successor is
/// what matters.
pub fn expiring(
    home: &Home,
    within: Option<Duration>,
    clock: &dyn Clock,
) -> Result<Vec<Expiring>, Error> {
    let now = clock.now();
    let horizon = within
        .map(|w| {
            now.checked_add(w.to_time())
                .ok_or_else(|| Error::Usage(format!("--within {w} is past the end of time")))
        })
        .transpose()?;
    let root = home.root()?;
    let mut out = Vec::new();
    let mut push = |serial: String, profile: String, facts: &verify::CertFacts, ca: bool| {
        if horizon.is_none_or(|h| facts.not_after <= h) {
            out.push(Expiring {
                serial,
                profile,
                subject: facts.subject_string.clone(),
                issuer: facts.issuer_string.clone(),
                sans: facts.sans.clone(),
                not_after: rfc3339(facts.not_after),
                not_after_seconds: facts.not_after.unix_timestamp(),
                // Rounded up: a 10-day certificate issued a second ago has 10 days left.
                days_left: -(-(facts.not_after - now).whole_seconds()).div_euclid(86_400),
                ca,
            });
        }
    };
    let root_facts = verify::describe(&root.der).map_err(|e| Error::Internal(e.to_string()))?;
    push(root_facts.serial.clone(), "root".into(), &root_facts, true);
    let query = log::Query {
        current: true,
        not_after_before: horizon.map(|h| h.unix_timestamp() + 1),
        ..log::Query::default()
    };
    for r in log::records(&home.dir, &query)? {
        if r.revoked.is_some() || r.renewed_by.is_some() {
            continue;
        }
        let facts = verify::describe(&r.der).map_err(|e| Error::Internal(e.to_string()))?;
        push(r.serial.clone(), r.profile.clone(), &facts, facts.is_ca);
    }
    out.sort_by(|a, b| a.not_after.cmp(&b.not_after).then(a.serial.cmp(&b.serial)));
    Ok(out)
}

/// `hsmca renew`: re-issues each certificate for the same subject, SANs and public key under
/// its profile as it stands today (refused if the profile no longer allows it, and always for a
/// CA profile), linking the new serial to the old one in the log. Certificates go to
/// `out/<new serial>.crt`. A run that stops early still writes what it issued before the stop.
pub fn renew(
    home: &Home,
    serials: &[String],
    validity: Option<Duration>,
    out: &Path,
    keys: &dyn Keystore,
    clock: &dyn Clock,
) -> Result<crate::sign::Signed, Error> {
    let mut session = CaSession::open(home, keys, clock)?;
    let records: Vec<log::Record> = serials
        .iter()
        .map(|s| {
            session.log().records(&log::Query {
                serial: Some(normalise_serial(s)),
                ..log::Query::default()
            })
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let mut outcomes: Vec<Option<Outcome>> = Vec::new();
    let mut ready = Vec::new();
    let mut ready_at = Vec::new();
    for given in serials {
        let serial = normalise_serial(given);
        let csr_label = PathBuf::from(format!("serial:{serial}"));
        let failed = |rule: &str, error: String| {
            Some(Outcome::Failed {
                csr: csr_label.clone(),
                rule: rule.into(),
                error,
            })
        };
        let Some(old) = records.iter().find(|r| r.serial == serial) else {
            outcomes.push(failed(
                "renew.serial",
                format!("serial {serial} was never issued by this CA"),
            ));
            continue;
        };
        if old.revoked.is_some() {
            outcomes.push(failed(
                "renew.revoked",
                format!("serial {serial} is revoked; a revoked certificate is not renewed"),
            ));
            continue;
        }
        let profile = session.profile(&old.profile)?;
        let facts = verify::describe(&old.der).map_err(|e| Error::Internal(e.to_string()))?;
        let request = request_from(&facts, old);
        let issuer = session.issuer(&profile.issuer)?.cert.clone();
        let ctx = Context {
            purpose: Purpose::Renewal,
            kubernetes: None,
            now: clock.now(),
            serial: session.serial()?,
            requested_validity: validity,
            issuer_not_after: issuer.not_after,
            allow_profiles: None,
            compromised: session.compromised(),
        };
        match policy::decide(&profile, &request, &ctx) {
            Err(refusals) => outcomes.push(Some(Outcome::Refused {
                csr: csr_label,
                refusals,
            })),
            Ok(d) => match Ready::new(d, &issuer, old.csr_sha256.clone(), Some(serial.clone())) {
                Ok(r) => {
                    ready_at.push((outcomes.len(), csr_label));
                    outcomes.push(None);
                    ready.push(r);
                }
                Err(e) => outcomes.push(failed("build", crate::error::chain(&e))),
            },
        }
    }
    let issued = session.issue(ready)?;
    for ((r, result), (index, csr)) in issued
        .certificates
        .into_iter()
        .map(|m| (m.ready, m.result))
        .zip(ready_at)
    {
        let issuer = session.issuer(&r.prepared.decision.issuer)?.subject.clone();
        outcomes[index] = Some(match result {
            Ok((seq, der)) => {
                let cert = CertSummary::of(&r.prepared.decision, &issuer);
                let file = out.join(format!("{}.crt", cert.serial));
                let text = engine::pem("CERTIFICATE", &der);
                match engine::release(&file, text.as_bytes(), &cert.serial) {
                    Ok(()) => Outcome::Issued {
                        csr,
                        cert,
                        file,
                        log_entry: seq,
                        already_issued: false,
                    },
                    Err(Withheld { rule, error }) => Outcome::Failed {
                        csr,
                        rule: rule.into(),
                        error,
                    },
                }
            }
            Err(Withheld { rule, error }) => Outcome::Failed {
                csr,
                rule: rule.into(),
                error,
            },
        });
    }
    Ok(crate::sign::Signed {
        outcomes: outcomes.into_iter().flatten().collect(),
        halt: issued.halt,
    })
}

/// The request a renewal is judged as: the old certificate's subject, SANs and key, asking for
/// no extensions. The profile decides everything else afresh.
fn request_from(facts: &verify::CertFacts, old: &Record) -> VerifiedCsr {
    let sans = facts
        .sans
        .iter()
        .map(|s| match s.split_once(':') {
            Some(("DNS", d)) => crate::csr::San::Dns(d.to_owned()),
            Some(("IP", ip)) => ip
                .parse()
                .map_or_else(|_| crate::csr::San::Other(s.clone()), crate::csr::San::Ip),
            Some(("email", e)) => crate::csr::San::Email(e.to_owned()),
            Some(("URI", u)) => crate::csr::San::Uri(u.to_owned()),
            _ => crate::csr::San::Other(s.clone()),
        })
        .collect();
    VerifiedCsr {
        sha256: old.csr_sha256.clone(),
        public_key: facts.public_key.clone(),
        subject: facts.subject.clone(),
        sans,
        extensions: Vec::new(),
        other_attributes: Vec::new(),
        signature_algorithm: "renewal of a logged certificate",
        der: Vec::new(),
    }
}

/// Filters for `log list`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this profile.
    pub profile: Option<String>,
    /// Subject contains this text.
    pub subject: Option<String>,
    /// Only this serial.
    pub serial: Option<String>,
    /// Logged at or after.
    pub since: Option<String>,
    /// Logged before.
    pub until: Option<String>,
    /// Only revoked ones.
    pub revoked: bool,
}

/// A certificate as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// The log record.
    #[serde(flatten)]
    pub record: Record,
    /// Subject.
    pub subject: String,
    /// SANs.
    pub sans: Vec<String>,
    /// notAfter.
    pub not_after: String,
    /// `valid`, `revoked` or `expired`.
    pub status: &'static str,
    /// The certificate, PEM.
    pub pem: String,
}

/// `hsmca log list` / `show`: the certificates in the log that pass `filter`. Needs no token.
pub fn list(home: &Home, filter: &Filter, clock: &dyn Clock) -> Result<Vec<Listed>, Error> {
    let since = filter.since.as_deref().map(parse_time).transpose()?;
    let until = filter.until.as_deref().map(parse_time).transpose()?;
    let serial = filter.serial.as_deref().map(normalise_serial);
    let now = clock.now();
    let mut out = Vec::new();
    // The index narrows the search; the checks below still apply to every record it gives.
    let query = log::Query {
        serial: serial.clone(),
        profile: filter.profile.clone(),
        subject_contains: filter.subject.clone(),
        since: since.map(|t| t.unix_timestamp()),
        until: until.map(|t| t.unix_timestamp()),
        revoked: filter.revoked,
        ..log::Query::default()
    };
    for r in log::records(&home.dir, &query)? {
        let facts = verify::describe(&r.der).map_err(|e| Error::Internal(e.to_string()))?;
        let logged = parse_time(&r.time)?;
        let keep = filter.profile.as_ref().is_none_or(|p| *p == r.profile)
            && filter
                .subject
                .as_ref()
                .is_none_or(|s| facts.subject_string.contains(s.as_str()))
            && serial.as_ref().is_none_or(|s| *s == r.serial)
            && since.is_none_or(|t| logged >= t)
            && until.is_none_or(|t| logged < t)
            && (!filter.revoked || r.revoked.is_some());
        if !keep {
            continue;
        }
        let status = if r.revoked.is_some() {
            "revoked"
        } else if facts.not_after < now {
            "expired"
        } else {
            "valid"
        };
        out.push(Listed {
            subject: facts.subject_string.clone(),
            sans: facts.sans.clone(),
            not_after: rfc3339(facts.not_after),
            status,
            pem: engine::pem("CERTIFICATE", &r.der),
            record: r,
        });
    }
    Ok(out)
}

/// What `log export` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    /// The directory.
    pub dir: PathBuf,
    /// Entries copied.
    pub entries: u64,
    /// Checkpoints copied.
    pub checkpoints: usize,
    /// Inclusion proofs written (one per certificate and CRL).
    pub proofs: usize,
    /// Size of the checkpoint the proofs are against.
    pub checkpoint_size: u64,
}

/// The entries `0..size` of `entries.jsonl`'s bytes (those a checkpoint signs), with their
/// numbers; lines that do not parse are left out (verification reports them).
fn signed_entries(entries: &[u8], size: u64) -> impl Iterator<Item = (u64, log::Entry)> + '_ {
    (0u64..)
        .zip(entries.split(|b| *b == b'\n'))
        .take_while(move |(seq, _)| *seq < size)
        .filter_map(|(seq, line)| Some((seq, serde_json::from_slice::<log::Entry>(line).ok()?)))
}

/// What an export holds for an entry, if anything: the file (`certs/SERIAL.pem`,
/// `crls/ISSUER-NUMBER.pem`), the base64 DER and the PEM label.
fn artefact(body: &Body) -> Option<(String, &str, &'static str)> {
    match body {
        Body::Cert { serial, cert, .. } => {
            Some((format!("certs/{serial}.pem"), cert.as_str(), "CERTIFICATE"))
        }
        Body::Crl {
            issuer,
            crl_number,
            crl,
            ..
        } => Some((
            format!("crls/{issuer}-{crl_number}.pem"),
            crl.as_str(),
            "X509 CRL",
        )),
        _ => None,
    }
}

/// An entry's inclusion proof in an export.
fn proof_name(seq: u64) -> String {
    format!("proofs/{seq:012}.tlog-proof")
}

/// The standalone verifier written into every export (Python 3, standard library plus
/// pyca/cryptography). Compiled in, so an export never depends on the source tree.
pub const EXPORT_VERIFIER: &str = include_str!("export/verify.py");

/// The README written into every export: what the files are and the one command that checks
/// them.
pub const EXPORT_README: &str = include_str!("export/README.md");

/// `hsmca log export`: the entries, every checkpoint, the verifier key, and for each
/// certificate and CRL its C2SP tlog-proof against the latest checkpoint, the artefacts
/// themselves (`root.pem`, `certs/`, `crls/`), and a verifier with its README
/// ([`EXPORT_VERIFIER`], [`EXPORT_README`]), so an auditor needs nothing from hsmca or the CA's
/// machine. Writes into a new directory.
pub fn export(home: &Home, out: &Path) -> Result<Exported, Error> {
    if out.exists() {
        return Err(Error::File(files::FileError::Exists(out.to_path_buf())));
    }
    let paths = log::Paths::of_home(&home.dir);
    let report = log::verify(&paths, None, None)?;
    if let Some(p) = report.problems.first() {
        return Err(Error::Log(log::LogError::Corrupt(p.clone())));
    }
    let read = |path: &Path| std::fs::read(path).map_err(crate::error::at(path));
    let checkpoint = read(&paths.checkpoint())?;
    let size = report.checkpoint_size.unwrap_or(0);
    let tree = log::tree(&paths)?;
    let entries = read(&paths.entries())?;
    files::write_new(&out.join("entries.jsonl"), &entries)?;
    files::write_new(&out.join("checkpoint"), &checkpoint)?;
    files::write_new(&out.join("log.vkey"), read(&paths.vkey())?.as_slice())?;
    let mut checkpoints = 0;
    let checkpoints_dir = paths.checkpoints();
    let listing =
        std::fs::read_dir(&checkpoints_dir).map_err(crate::error::at(&checkpoints_dir))?;
    for e in listing.flatten() {
        files::write_new(
            &out.join("checkpoints").join(e.file_name()),
            &read(&e.path())?,
        )?;
        checkpoints += 1;
    }
    let mut proofs = 0;
    let mut root_written = false;
    for (seq, entry) in signed_entries(&entries, size) {
        if let (0, Body::Root { cert, .. }) = (seq, &entry.body) {
            let der = B64
                .decode(cert)
                .map_err(|e| Error::Internal(e.to_string()))?;
            files::write_new(
                &out.join("root.pem"),
                engine::pem("CERTIFICATE", &der).as_bytes(),
            )?;
            root_written = true;
            continue;
        }
        let Some((name, der, label)) = artefact(&entry.body) else {
            continue;
        };
        let path = tree
            .prove(seq, size)
            .ok_or_else(|| Error::Internal(format!("no proof for entry {seq}")))?;
        let proof = log::translog::tlog_proof(seq, &path, &checkpoint);
        files::write_new(&out.join(proof_name(seq)), &proof)?;
        let der = B64
            .decode(der)
            .map_err(|e| Error::Internal(e.to_string()))?;
        files::write_new(&out.join(name), engine::pem(label, &der).as_bytes())?;
        proofs += 1;
    }
    if !root_written {
        return Err(Error::Log(log::LogError::Corrupt(log::Problem {
            entry: Some(0),
            message: "not the root entry".into(),
        })));
    }
    // The auditor's tools travel with the data: the same bytes whichever machine exported.
    files::write_new(&out.join("verify.py"), EXPORT_VERIFIER.as_bytes())?;
    files::write_new(&out.join("README.md"), EXPORT_README.as_bytes())?;
    Ok(Exported {
        dir: out.to_path_buf(),
        entries: report.entries,
        checkpoints,
        proofs,
        checkpoint_size: size,
    })
}

/// `hsmca log verify --export DIR`: everything `log verify` checks, run on an export's files
/// (the export holds the log's files at its top level), plus what only an export has: each
/// inclusion proof must be exactly the proof the entries give against the export's checkpoint,
/// every certificate and CRL up to that checkpoint must have one, and `root.pem`, `certs/` and
/// `crls/` must hold the logged bytes. Findings go into the report's problems.
pub fn verify_export(
    dir: &Path,
    vkey: Option<&str>,
    external: &[(String, Vec<u8>)],
) -> Result<log::Report, Error> {
    let paths = log::Paths {
        dir: dir.to_path_buf(),
    };
    let root_der = std::fs::read(dir.join("root.pem"))
        .ok()
        .and_then(|b| crate::issue::IssuerCert::from_pem_or_der(&b).ok())
        .map(|c| c.der);
    let mut report = log::verify_with(&paths, vkey, root_der.as_deref(), external)?;
    if root_der.is_none() {
        report.problems.push(log::Problem {
            entry: Some(0),
            message: "root.pem is missing or not a certificate".into(),
        });
    }
    let Some(size) = report.checkpoint_size else {
        return Ok(report);
    };
    let mut problem = |entry: Option<u64>, message: String| {
        report.problems.push(log::Problem { entry, message });
    };
    let checkpoint = std::fs::read(paths.checkpoint())?;
    let tree = log::tree(&paths)?;
    let entries = std::fs::read(paths.entries())?;
    let mut expected = std::collections::BTreeSet::new();
    for (seq, entry) in signed_entries(&entries, size) {
        let Some((name, der, label)) = artefact(&entry.body) else {
            continue;
        };
        let file = proof_name(seq);
        expected.insert(file.clone());
        let want = tree
            .prove(seq, size)
            .map(|path| log::translog::tlog_proof(seq, &path, &checkpoint));
        match std::fs::read(dir.join(&file)) {
            Ok(got) if Some(&got) == want.as_ref() => {}
            Ok(_) => problem(
                Some(seq),
                format!("{file} is not the inclusion proof of this entry"),
            ),
            Err(e) => problem(Some(seq), format!("{file}: {e}")),
        }
        let pem = B64.decode(der).map(|der| engine::pem(label, &der));
        let file = name;
        expected.insert(file.clone());
        match (std::fs::read(dir.join(&file)), pem) {
            (Ok(got), Ok(pem)) if got == pem.as_bytes() => {}
            (Ok(_), _) => problem(Some(seq), format!("{file} differs from the logged bytes")),
            (Err(e), _) => problem(Some(seq), format!("{file}: {e}")),
        }
    }
    for sub in ["proofs", "certs", "crls"] {
        let Ok(list) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in list.flatten() {
            let name = format!("{sub}/{}", e.file_name().to_string_lossy());
            if !expected.contains(&name) {
                problem(None, format!("{name} is not in the log"));
            }
        }
    }
    Ok(report)
}
