//! Everything hsmca prints on stdout: human lines or `--json`. Writes to any `impl Write` so
//! tests can capture it.

use std::io::{self, Write};

use std::path::Path;

use hsmca::batch::{self, Plan, Verdict};
use hsmca::ceremony::{CaReport, InitReport};
use hsmca::cfssl::Imported;
use hsmca::engine::Outcome;
use hsmca::lifecycle::{CrlReport, Expiring, Exported, Listed, Revoked};
use hsmca::log::{Recovered, Report};
use hsmca::profile::Duration;
use hsmca::profile::Profile;

fn json(out: &mut impl Write, value: &impl serde::Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    writeln!(out)
}

/// `init`.
pub(crate) fn init(out: &mut impl Write, r: &InitReport, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, r);
    }
    writeln!(out, "created CA home {}", r.home.display())?;
    writeln!(
        out,
        "  root        {} ({}, serial {}, until {})",
        r.subject, r.key_type, r.serial, r.not_after
    )?;
    writeln!(out, "  root sha256 {}", r.cert_sha256)?;
    writeln!(out, "  log key     {} ; verifier key:", r.log_key_type)?;
    writeln!(out, "  {}", r.log_vkey)?;
    writeln!(out, "  profiles    {}", r.profiles.join(", "))?;
    writeln!(
        out,
        "Record the root SHA-256 and the verifier key in the ceremony minutes."
    )
}

/// `sign` and `check`: one block per CSR, then a count.
pub(crate) fn outcomes(
    out: &mut impl Write,
    outcomes: &[Outcome],
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        for o in outcomes {
            json(out, o)?;
        }
        return Ok(());
    }
    for o in outcomes {
        match o {
            Outcome::Issued {
                csr,
                cert,
                file,
                log_entry,
                already_issued,
            } => {
                let how = if *already_issued {
                    "already issued; written again"
                } else {
                    "issued"
                };
                writeln!(
                    out,
                    "{}: {how} serial {} -> {} (log entry {log_entry})",
                    csr.display(),
                    cert.serial,
                    file.display()
                )?;
                writeln!(
                    out,
                    "    subject {} ; until {}",
                    cert.subject, cert.not_after
                )?;
            }
            Outcome::WouldIssue { csr, cert } => {
                writeln!(
                    out,
                    "{}: would issue under profile {:?}",
                    csr.display(),
                    cert.profile
                )?;
                writeln!(out, "    subject   {}", cert.subject)?;
                writeln!(out, "    issuer    {}", cert.issuer)?;
                writeln!(out, "    key       {}", cert.key_type)?;
                writeln!(
                    out,
                    "    SANs      {}",
                    if cert.sans.is_empty() {
                        "(none)".into()
                    } else {
                        cert.sans.join(", ")
                    }
                )?;
                writeln!(
                    out,
                    "    usage     {} ; {}",
                    cert.key_usage.join(", "),
                    cert.extended_key_usage.join(", ")
                )?;
                writeln!(
                    out,
                    "    validity  {} .. {}",
                    cert.not_before, cert.not_after
                )?;
            }
            Outcome::Refused { csr, refusals } => {
                writeln!(out, "{}: refused", csr.display())?;
                for r in refusals {
                    writeln!(out, "    {r}")?;
                }
            }
            Outcome::Failed { csr, rule, error } => {
                writeln!(out, "{}: failed: {error} (rule {rule})", csr.display())?;
            }
        }
    }
    let ok = outcomes.iter().filter(|o| o.ok()).count();
    writeln!(out, "{ok} of {} CSRs ok", outcomes.len())
}

/// `log verify`.
pub(crate) fn log_verify(out: &mut impl Write, r: &Report, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, r);
    }
    writeln!(out, "entries     {}", r.entries)?;
    writeln!(out, "root        {}", r.root)?;
    writeln!(
        out,
        "checkpoint  {}",
        r.checkpoint_size
            .map_or("none".into(), |s| format!("size {s}"))
    )?;
    let counts: Vec<String> = r.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    writeln!(out, "counts      {}", counts.join(", "))?;
    writeln!(out, "vkey        {}", r.vkey)?;
    if r.unsigned_tail > 0 {
        writeln!(
            out,
            "warning: {} entries after the latest checkpoint",
            r.unsigned_tail
        )?;
    }
    if let Some(note) = &r.checkpoint {
        // Verbatim: saved to a file, it is what `log verify --checkpoint FILE` takes.
        writeln!(
            out,
            "checkpoint for the minutes (verbatim, up to the blank line):"
        )?;
        write!(out, "{note}")?;
        writeln!(out)?;
    }
    if r.problems.is_empty() {
        writeln!(out, "log OK")
    } else {
        for p in &r.problems {
            writeln!(out, "problem: {p}")?;
        }
        writeln!(
            out,
            "log FAILED verification ({} problems)",
            r.problems.len()
        )
    }
}

/// `profiles apply`.
pub(crate) fn applied(
    out: &mut impl Write,
    a: &hsmca::ceremony::Applied,
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        return json(out, a);
    }
    for c in &a.changes {
        writeln!(out, "  {c}")?;
    }
    match a.log_entry {
        Some(seq) => writeln!(
            out,
            "policy {} logged at entry {seq} (was {}); record it in the minutes",
            a.policy_sha256,
            a.previous.as_deref().unwrap_or("none")
        ),
        None => writeln!(out, "policy {} unchanged; nothing logged", a.policy_sha256),
    }
}

/// `log recover`.
pub(crate) fn recovered(out: &mut impl Write, r: &Recovered, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, r);
    }
    match &r.quarantine {
        Some(q) => writeln!(
            out,
            "removed {} torn bytes from the end of the log; kept in {q}",
            r.bytes_removed
        )?,
        None => writeln!(out, "no torn tail")?,
    }
    writeln!(
        out,
        "abandoned intents: {}",
        if r.abandoned.is_empty() {
            "none".into()
        } else {
            format!("{:?}", r.abandoned)
        }
    )?;
    if r.signed_tail > 0 {
        writeln!(
            out,
            "{} entries past the previous checkpoint are now signed",
            r.signed_tail
        )?;
    }
    writeln!(out, "recovery logged and checkpoint signed")
}

/// `ca create`.
pub(crate) fn ca_created(out: &mut impl Write, r: &CaReport, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, r);
    }
    writeln!(
        out,
        "created CA {:?}: {} (serial {}, until {})",
        r.name, r.cert.subject, r.cert.serial, r.cert.not_after
    )?;
    writeln!(out, "  issuer   {}", r.cert.issuer)?;
    writeln!(
        out,
        "  key      {} in the token as {:?}",
        r.cert.key_type, r.key_label
    )?;
    writeln!(
        out,
        "  file     {} (log entry {})",
        r.file.display(),
        r.log_entry
    )
}

/// `profiles list`.
pub(crate) fn profile_list(
    out: &mut impl Write,
    profiles: &[Profile],
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        for p in profiles {
            json(out, p)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<26} {:<16} {:<22} {:<8} DESCRIPTION",
        "PROFILE", "ISSUER", "USAGE", "MAX"
    )?;
    for p in profiles {
        let usage = if p.ca.is_some() {
            "CA".to_owned()
        } else {
            p.extended_key_usage
                .iter()
                .map(|e| e.name())
                .collect::<Vec<_>>()
                .join("+")
        };
        writeln!(
            out,
            "{:<26} {:<16} {:<22} {:<8} {}",
            p.name,
            p.issuer,
            usage,
            p.validity.max.to_string(),
            p.description
        )?;
    }
    Ok(())
}

/// `profiles lint`.
pub(crate) fn lint(
    out: &mut impl Write,
    results: &[(String, Option<String>)],
    as_json: bool,
) -> io::Result<()> {
    for (file, err) in results {
        if as_json {
            json(
                out,
                &serde_json::json!({"file": file, "ok": err.is_none(), "error": err}),
            )?;
        } else {
            match err {
                None => writeln!(out, "{file}: ok")?,
                Some(e) => writeln!(out, "{e}")?,
            }
        }
    }
    Ok(())
}

/// `profiles import-cfssl`.
pub(crate) fn imported(
    out: &mut impl Write,
    dir: &Path,
    list: &[Imported],
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        for p in list {
            json(out, p)?;
        }
        return Ok(());
    }
    for p in list {
        writeln!(
            out,
            "{}: wrote {}",
            p.name,
            dir.join(format!("{}.json", p.name)).display()
        )?;
        for t in &p.todo {
            writeln!(out, "    TODO {t}: fill in before the profile loads")?;
        }
        for n in &p.notes {
            writeln!(out, "    note: {n}")?;
        }
    }
    writeln!(
        out,
        "The profiles refuse to load until every TODO is replaced; check with `hsmca profiles lint`."
    )
}

/// `revoke`.
pub(crate) fn revoked(out: &mut impl Write, r: &Revoked, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, r);
    }
    writeln!(
        out,
        "revoked serial {} ({}) for {} (log entry {})",
        r.serial, r.subject, r.reason, r.log_entry
    )?;
    writeln!(out, "Publish a new CRL for its issuer with `hsmca crl`.")
}

/// `crl`.
pub(crate) fn crl(out: &mut impl Write, r: &CrlReport, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, r);
    }
    writeln!(
        out,
        "CRL {} of {:?}: {} revoked, valid {} .. {}",
        r.number,
        r.issuer,
        r.revoked.len(),
        r.this_update,
        r.next_update
    )?;
    writeln!(
        out,
        "  written to {} (log entry {})",
        r.file.display(),
        r.log_entry
    )
}

/// `expiring`.
pub(crate) fn expiring(
    out: &mut impl Write,
    list: &[Expiring],
    within: Duration,
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        for e in list {
            json(out, e)?;
        }
        return Ok(());
    }
    if list.is_empty() {
        return writeln!(out, "nothing expires within {within}");
    }
    writeln!(
        out,
        "{:<22} {:>5} {:<24} {:<34} {:<44} SANS",
        "NOT AFTER", "DAYS", "PROFILE", "SERIAL", "SUBJECT"
    )?;
    for e in list {
        let profile = if e.ca {
            format!("{} (CA)", e.profile)
        } else {
            e.profile.clone()
        };
        writeln!(
            out,
            "{:<22} {:>5} {:<24} {:<34} {:<44} {}",
            e.not_after,
            e.days_left,
            profile,
            e.serial,
            e.subject,
            e.sans.join(",")
        )?;
    }
    writeln!(out, "{} expiring within {within}", list.len())
}

/// `log list`.
pub(crate) fn listed(out: &mut impl Write, list: &[Listed], as_json: bool) -> io::Result<()> {
    if as_json {
        for l in list {
            json(out, l)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:>6} {:<34} {:<24} {:<8} {:<22} SUBJECT",
        "ENTRY", "SERIAL", "PROFILE", "STATUS", "NOT AFTER"
    )?;
    for l in list {
        writeln!(
            out,
            "{:>6} {:<34} {:<24} {:<8} {:<22} {}",
            l.record.seq, l.record.serial, l.record.profile, l.status, l.not_after, l.subject
        )?;
    }
    Ok(())
}

/// `log show`.
pub(crate) fn shown(out: &mut impl Write, l: &Listed, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, l);
    }
    writeln!(out, "serial      {}", l.record.serial)?;
    writeln!(out, "profile     {}", l.record.profile)?;
    writeln!(out, "subject     {}", l.subject)?;
    writeln!(
        out,
        "SANs        {}",
        if l.sans.is_empty() {
            "(none)".into()
        } else {
            l.sans.join(", ")
        }
    )?;
    writeln!(out, "not after   {}", l.not_after)?;
    writeln!(out, "status      {}", l.status)?;
    writeln!(
        out,
        "policy      {}",
        l.record
            .policy_sha256
            .as_deref()
            .unwrap_or("(not recorded)")
    )?;
    writeln!(
        out,
        "logged      entry {} at {}",
        l.record.seq, l.record.time
    )?;
    if let Some(r) = &l.record.revoked {
        writeln!(
            out,
            "revoked     {} ({}) at entry {}",
            r.revocation_time, r.reason, r.seq
        )?;
    }
    if let Some(old) = &l.record.renews {
        writeln!(out, "renews      {old}")?;
    }
    if let Some(new) = &l.record.renewed_by {
        writeln!(out, "renewed by  {new}")?;
    }
    write!(out, "{}", l.pem)
}

/// `log export`.
pub(crate) fn exported(out: &mut impl Write, r: &Exported, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, r);
    }
    writeln!(
        out,
        "exported {} entries, {} checkpoints and {} inclusion proofs (against size {}) to {}",
        r.entries,
        r.checkpoints,
        r.proofs,
        r.checkpoint_size,
        r.dir.display()
    )
}

/// `plan`: the review table.
pub(crate) fn plan(out: &mut impl Write, p: &Plan, file: &Path, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, p);
    }
    writeln!(out, "{:<40} {:<24} {:<7} WHAT", "CSR", "PROFILE", "VERDICT")?;
    for i in &p.items {
        match &i.verdict {
            Verdict::Issue {
                subject,
                sans,
                usages,
                validity,
                issuer,
            } => {
                writeln!(
                    out,
                    "{:<40} {:<24} {:<7} {subject} [{}] {} {validity} by {issuer}",
                    i.file,
                    i.profile,
                    "issue",
                    sans.join(","),
                    usages.join("+")
                )?;
            }
            Verdict::Refuse { refusals } => {
                for r in refusals {
                    writeln!(out, "{:<40} {:<24} {:<7} {r}", i.file, i.profile, "REFUSE")?;
                }
            }
            Verdict::Skip { reason } => writeln!(
                out,
                "{:<40} {:<24} {:<7} {reason}",
                i.file, i.profile, "skip"
            )?,
            Verdict::Fail { rule, error } => writeln!(
                out,
                "{:<40} {:<24} {:<7} {error} (rule {rule})",
                i.file, i.profile, "FAIL"
            )?,
        }
    }
    let issue = p
        .items
        .iter()
        .filter(|i| matches!(i.verdict, Verdict::Issue { .. }))
        .count();
    writeln!(
        out,
        "{issue} of {} CSRs would be issued{}",
        p.items.len(),
        if p.kubeadm { " (kubeadm layout)" } else { "" }
    )?;
    writeln!(out, "plan {} written to {}", p.hash, file.display())
}

/// `sign-dir`: one line per CSR as it is done.
pub(crate) fn done(out: &mut impl Write, d: &batch::Done, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, d);
    }
    match d {
        batch::Done::Issued {
            file,
            serial,
            out: path,
            already_issued,
        } => {
            let how = if *already_issued {
                "written again (already issued)"
            } else {
                "issued"
            };
            writeln!(out, "{file:<40} {how:<30} {serial} -> {}", path.display())
        }
        batch::Done::Refused { file, refusals } => {
            for x in refusals {
                writeln!(out, "{file:<40} {:<30} {x}", "REFUSED")?;
            }
            Ok(())
        }
        batch::Done::Skipped { file, reason } => {
            writeln!(out, "{file:<40} {:<30} {reason}", "skipped")
        }
        batch::Done::Failed { file, rule, error } => {
            writeln!(out, "{file:<40} {:<30} {error} (rule {rule})", "FAILED")
        }
    }
}

/// `sign-dir`: the summary after the per-CSR lines.
pub(crate) fn sign_dir(
    out: &mut impl Write,
    r: &batch::Report,
    file: &Path,
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        return json(out, r);
    }
    let rate = r.issued as f64 / r.seconds.max(1e-3);
    writeln!(
        out,
        "plan {}: {} issued, {} written again, {} refused or failed, in {:.2} s ({rate:.0}/s)",
        r.plan, r.issued, r.reissued_files, r.refused, r.seconds
    )?;
    if !r.commands.is_empty() {
        writeln!(
            out,
            "upload the signed objects (also in apply-status.sh beside the report):"
        )?;
        for c in &r.commands {
            writeln!(out, "  {c}")?;
        }
    }
    writeln!(out, "report: {}", file.display())
}
