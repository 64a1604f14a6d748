//! Everything hsmca prints on stdout: human lines or `--json`. Writes to any `impl Write` so
//! tests can capture it.
//!
//! Terminal safety: file names, subjects, SANs, object names and errors quoting them come from
//! the stick, and a control sequence in one (`ESC[1A ESC[2K`, `ESC[8m`, U+202E) could hide or
//! rewrite a review row. [`escape`] is the one function that decides how such a character is
//! shown; [`safe`] applies it to one string (newlines included), and [`Terminal`] applies it
//! to everything written to stdout and stderr (newlines kept), so nothing raw gets through even
//! where a string was not escaped by hand. JSON output stays valid JSON: serde already escapes
//! C0 controls inside strings, and every other escaped character is written as a JSON `\uXXXX`
//! escape, which can only occur inside a string.

use std::borrow::Cow;
use std::io::{self, Write};

use std::path::Path;

use hsmca::batch::{self, Plan, Verdict};
use hsmca::ceremony::{CaReport, InitReport, Resumed};
use hsmca::cfssl::Imported;
use hsmca::engine::Outcome;
use hsmca::lifecycle::{CrlReport, Expiring, Exported, Listed, Revoked};
use hsmca::log::{Recovered, Report};
use hsmca::minutes::Minutes;
use hsmca::names::count;
use hsmca::profile::Profile;
use hsmca::profile::{Duration, SiteOrigin, SiteSetting};
use hsmca::sign::{AutoCheck, Fit};

/// Whether `c` must not reach a terminal raw: C0 and C1 controls, DEL, and the invisible or
/// reordering format characters (bidi embeddings, overrides and isolates, zero-width
/// characters, the BOM, soft hyphen, tag characters, variation selectors, line and paragraph
/// separators, non-characters).
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            u32::from(c),
            0xAD | 0x34F
                | 0x600..=0x605
                | 0x61C
                | 0x6DD
                | 0x70F
                | 0x8E2
                | 0x115F..=0x1160
                | 0x17B4..=0x17B5
                | 0x180B..=0x180F
                | 0x200B..=0x200F
                | 0x2028..=0x202E
                | 0x2060..=0x206F
                | 0x3164
                | 0xFE00..=0xFE0F
                | 0xFEFF
                | 0xFFA0
                | 0xFFF0..=0xFFFB
                | 0xFFFE..=0xFFFF
                | 0x110BD
                | 0x110CD
                | 0x1BCA0..=0x1BCA3
                | 0x1D173..=0x1D17A
                | 0xE0000..=0xE0FFF
        )
}

/// The one escaping rule: appends `c` to `out` as itself, or escaped if it [`is_unsafe`] (or
/// is a newline and `newline` is false). C0 controls become `\x1b`-style escapes; everything
/// else becomes a JSON-style `\u202e` escape (a surrogate pair above U+FFFF), so that the
/// same text is also valid inside a JSON string.
pub(crate) fn escape(c: char, newline: bool, out: &mut String) {
    use std::fmt::Write as _;
    let plain = if c == '\n' { newline } else { !is_unsafe(c) };
    if plain {
        out.push(c);
    } else if u32::from(c) < 0x20 {
        let _ = write!(out, "\\x{:02x}", u32::from(c));
    } else {
        let mut units = [0u16; 2];
        for u in c.encode_utf16(&mut units) {
            let _ = write!(out, "\\u{u:04x}");
        }
    }
}

/// `s` with every character a terminal would act on (newlines included) escaped: for one
/// value from the input inside a line.
pub(crate) fn safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| is_unsafe(c) || c == '\n') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        escape(c, false, &mut out);
    }
    Cow::Owned(out)
}

/// A writer for stdout or stderr that escapes (see [`escape`]) every unsafe character but the
/// newline, whatever was written: the net under [`safe`]. Bytes that are not UTF-8 are shown
/// as `\xNN`; a character split across writes is kept until it is whole.
pub(crate) struct Terminal<W: Write> {
    inner: W,
    pending: Vec<u8>,
}

impl<W: Write> Terminal<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            pending: Vec::new(),
        }
    }

    /// The writer underneath, for output that is not text for a terminal (shell completions).
    pub(crate) fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    fn drain(&mut self, at_end: bool) -> io::Result<()> {
        use std::fmt::Write as _;
        let mut text = String::with_capacity(self.pending.len());
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    s.chars().for_each(|c| escape(c, true, &mut text));
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    std::str::from_utf8(good)
                        .unwrap_or_default()
                        .chars()
                        .for_each(|c| escape(c, true, &mut text));
                    match e.error_len() {
                        Some(n) => {
                            for b in &bad[..n] {
                                let _ = write!(text, "\\x{b:02x}");
                            }
                            rest = &bad[n..];
                        }
                        // An incomplete character at the end: wait for the rest of it.
                        None if !at_end => {
                            rest = bad;
                            break;
                        }
                        None => {
                            for b in bad {
                                let _ = write!(text, "\\x{b:02x}");
                            }
                            rest = &[];
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.to_vec();
        self.pending = keep;
        self.inner.write_all(text.as_bytes())
    }
}

impl<W: Write> Write for Terminal<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        self.drain(false)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Drop for Terminal<W> {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let _ = self.drain(true);
        }
        let _ = self.inner.flush();
    }
}

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
    writeln!(out, "site settings (HOME/site.json):")?;
    site_table(out, &r.site)?;
    writeln!(
        out,
        "Record the root SHA-256 and the verifier key in the ceremony minutes. Check the site \
         settings: change one by editing HOME/site.json, then run hsmca profiles apply."
    )
}

/// `check --profile auto`: per CSR, the profiles that accept it (with the command that signs
/// it), else the closest that refuse it and every rule each violates.
pub(crate) fn auto_checks(
    out: &mut impl Write,
    checks: &[AutoCheck],
    home: &Path,
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        for c in checks {
            json(out, c)?;
        }
        return Ok(());
    }
    let danger = |f: &Fit| {
        if f.danger {
            format!(
                "; dangerous: plan and sign-dir need --allow-profile {}",
                f.profile
            )
        } else {
            String::new()
        }
    };
    for c in checks {
        let csr = c.csr.display().to_string();
        if let Some(failed) = &c.failed {
            single_outcome(out, failed)?;
            continue;
        }
        for f in &c.accepted {
            let subject = f.cert.as_ref().map_or("", |cert| cert.subject.as_str());
            writeln!(
                out,
                "{}: accepted by profile {} (subject {}{})",
                safe(&csr),
                f.profile,
                safe(subject),
                danger(f)
            )?;
            writeln!(
                out,
                "    hsmca sign --home {} --profile {} {}",
                safe(&home.display().to_string()),
                f.profile,
                safe(&csr)
            )?;
        }
        if c.accepted.is_empty() {
            writeln!(out, "{}: no profile accepts it; the closest:", safe(&csr))?;
            for f in &c.closest {
                writeln!(
                    out,
                    "  {} ({}{}):",
                    f.profile,
                    count(f.refusals.len(), "violation", "violations"),
                    danger(f)
                )?;
                for r in &f.refusals {
                    writeln!(out, "    {}", safe(&r.to_string()))?;
                }
            }
        }
    }
    let ok = checks.iter().filter(|c| c.ok()).count();
    writeln!(
        out,
        "{ok} of {} accepted by some profile",
        count(checks.len(), "CSR", "CSRs")
    )
}

/// `site show`: every parameter, its value in force and where it comes from.
pub(crate) fn site(
    out: &mut impl Write,
    settings: &[SiteSetting],
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        return json(out, &settings);
    }
    site_table(out, settings)?;
    writeln!(
        out,
        "Change a value by editing HOME/site.json, then run hsmca profiles apply (logged); \
         man hsmca-site-show says what each key is for."
    )
}

fn site_table(out: &mut impl Write, settings: &[SiteSetting]) -> io::Result<()> {
    let width = settings.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in settings {
        let origin = match s.origin {
            SiteOrigin::Set => "set",
            SiteOrigin::Default => "default",
        };
        writeln!(
            out,
            "  {:width$}  {:7}  {}",
            s.name,
            origin,
            safe(&s.value.to_string())
        )?;
    }
    Ok(())
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
        single_outcome(out, o)?;
    }
    let ok = outcomes.iter().filter(|o| o.ok()).count();
    writeln!(
        out,
        "{ok} of {} ok{}",
        count(outcomes.len(), "CSR", "CSRs"),
        tally(outcomes)
    )
}

/// ` (2 issued, 1 written again, 1 refused)`: the outcomes counted apart, so a rerun that only
/// wrote files again does not read as issuance.
fn tally(outcomes: &[Outcome]) -> String {
    let mut n = [0usize; 5];
    for o in outcomes {
        let i = match o {
            Outcome::Issued {
                already_issued: false,
                ..
            } => 0,
            Outcome::Issued { .. } => 1,
            Outcome::WouldIssue { .. } => 2,
            Outcome::Refused { .. } => 3,
            Outcome::Failed { .. } => 4,
        };
        n[i] += 1;
    }
    let words = [
        "issued",
        "written again",
        "would issue",
        "refused",
        "failed",
    ];
    let parts: Vec<String> = n
        .iter()
        .zip(words)
        .filter(|(k, _)| **k > 0)
        .map(|(k, w)| format!("{k} {w}"))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// One CSR's outcome, as `sign`, `check` and `check --profile auto` print it.
fn single_outcome(out: &mut impl Write, o: &Outcome) -> io::Result<()> {
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
                safe(&csr.display().to_string()),
                cert.serial,
                safe(&file.display().to_string())
            )?;
            writeln!(
                out,
                "    subject {} ; until {}",
                safe(&cert.subject),
                cert.not_after
            )?;
        }
        Outcome::WouldIssue { csr, cert } => {
            writeln!(
                out,
                "{}: would issue under profile {:?}",
                safe(&csr.display().to_string()),
                cert.profile
            )?;
            writeln!(out, "    subject   {}", safe(&cert.subject))?;
            writeln!(out, "    issuer    {}", cert.issuer)?;
            writeln!(out, "    key       {}", cert.key_type)?;
            writeln!(
                out,
                "    SANs      {}",
                if cert.sans.is_empty() {
                    "(none)".into()
                } else {
                    safe(&cert.sans.join(", ")).into_owned()
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
            writeln!(out, "{}: refused", safe(&csr.display().to_string()))?;
            for r in refusals {
                writeln!(out, "    {}", safe(&r.to_string()))?;
            }
        }
        Outcome::Failed { csr, rule, error } => {
            writeln!(
                out,
                "{}: failed: {} (rule {rule})",
                safe(&csr.display().to_string()),
                safe(error)
            )?;
        }
    }
    Ok(())
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
    if r.from > 0 {
        writeln!(
            out,
            "checked     entries {}..{} (after the given checkpoint; entries before it as that checkpoint signed them)",
            r.from,
            r.entries.saturating_sub(1)
        )?;
    }
    if r.unsigned_tail > 0 {
        writeln!(
            out,
            "warning: {} after the latest checkpoint (`hsmca log recover` signs them after a look)",
            count(r.unsigned_tail, "entry", "entries")
        )?;
    }
    for e in &r.extends {
        writeln!(
            out,
            "checked     {} (size {}, root {}): the log extends it",
            safe(&e.name),
            e.size,
            e.root
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
            "log FAILED verification ({})",
            count(r.problems.len(), "problem", "problems")
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
    let how = match r.resumed {
        None => "created",
        Some(Resumed::KeyReused) => "created (with the key an earlier, failed run left)",
        Some(Resumed::InstalledFromLog) => {
            "installed (the certificate an earlier, failed run logged; nothing signed now)"
        }
    };
    writeln!(
        out,
        "{how} CA {:?}: {} (serial {}, until {})",
        r.name, r.cert.subject, r.cert.serial, r.cert.not_after
    )?;
    if let Some(until) = &r.clamped_to_issuer {
        writeln!(
            out,
            "  validity cut to the issuer's notAfter {until}: the profile's default would outlive it"
        )?;
    }
    writeln!(out, "  issuer   {}", r.cert.issuer)?;
    writeln!(
        out,
        "  key      {} in the token as {:?}",
        r.cert.key_type, r.key_label
    )?;
    writeln!(out, "  sha256   {}", r.cert_sha256)?;
    writeln!(
        out,
        "  file     {} (log entry {})",
        r.file.display(),
        r.log_entry
    )?;
    writeln!(out, "Record the CA's SHA-256 in the ceremony minutes.")
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
    writeln!(
        out,
        "Publish a new CRL of its issuer {:?}:\n  {}",
        r.issuer,
        safe(&r.crl_command)
    )
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

/// How `expiring` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ExpiringFormat {
    /// A table for people.
    Text,
    /// One JSON document: an array of certificates.
    Json,
    /// One JSON object per line (what `--json` gives).
    JsonLines,
    /// node_exporter's textfile-collector format.
    Prometheus,
}

/// `expiring`.
pub(crate) fn expiring(
    out: &mut impl Write,
    list: &[Expiring],
    within: Duration,
    format: ExpiringFormat,
) -> io::Result<()> {
    match format {
        ExpiringFormat::JsonLines => {
            for e in list {
                json(out, e)?;
            }
            return Ok(());
        }
        ExpiringFormat::Json => return json(out, &list),
        ExpiringFormat::Text | ExpiringFormat::Prometheus => {}
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

/// The metric `expiring --format prometheus` writes, one sample per certificate.
const NOT_AFTER_METRIC: &str = "hsmca_certificate_not_after_seconds";

/// `expiring --format prometheus`: the Prometheus text exposition format (version 0.0.4) that
/// node_exporter's textfile collector reads. One gauge sample per certificate, its notAfter in
/// Unix seconds, labelled with serial, profile, subject, issuer and whether it is a CA; plus
/// the time the file was made, so a stale file can be alerted on too.
pub(crate) fn expiring_prometheus(
    out: &mut impl Write,
    list: &[Expiring],
    now: i64,
) -> io::Result<()> {
    writeln!(
        out,
        "# HELP {NOT_AFTER_METRIC} notAfter of each unrevoked, unrenewed certificate of this CA          (and of the CAs themselves), in Unix seconds."
    )?;
    writeln!(out, "# TYPE {NOT_AFTER_METRIC} gauge")?;
    for e in list {
        writeln!(
            out,
            "{NOT_AFTER_METRIC}{{serial=\"{}\",profile=\"{}\",subject=\"{}\",issuer=\"{}\",ca=\"{}\"}} {}",
            label_value(&e.serial),
            label_value(&e.profile),
            label_value(&e.subject),
            label_value(&e.issuer),
            e.ca,
            e.not_after_seconds
        )?;
    }
    writeln!(
        out,
        "# HELP hsmca_expiring_generated_seconds When hsmca wrote these samples, in Unix seconds."
    )?;
    writeln!(out, "# TYPE hsmca_expiring_generated_seconds gauge")?;
    writeln!(out, "hsmca_expiring_generated_seconds {now}")
}

/// A label value as the exposition format requires: backslash, double quote and line feed
/// escaped as `\\`, `\"` and `\n`. Characters a terminal would act on are first written as
/// [`safe`] writes them (`\x1b`), and that backslash escaped in turn, so the value stays one
/// valid label whatever a subject holds.
fn label_value(v: &str) -> Cow<'_, str> {
    let v = safe(v);
    if !v.contains(['\\', '"', '\n']) {
        return v;
    }
    let mut s = String::with_capacity(v.len() + 4);
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    Cow::Owned(s)
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
        "exported {}, {} and {} (against size {}), a verifier (verify.py) and its README to {}",
        count(r.entries, "entry", "entries"),
        count(r.checkpoints, "checkpoint", "checkpoints"),
        count(r.proofs, "inclusion proof", "inclusion proofs"),
        r.checkpoint_size,
        r.dir.display()
    )
}

/// `minutes`.
pub(crate) fn minutes(out: &mut impl Write, m: &Minutes, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, m);
    }
    out.write_all(m.to_markdown().as_bytes())
}

/// `plan`: the review table.
pub(crate) fn plan(out: &mut impl Write, p: &Plan, file: &Path, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(out, p);
    }
    writeln!(out, "{:<40} {:<24} {:<7} WHAT", "CSR", "PROFILE", "VERDICT")?;
    for i in &p.items {
        let (file, profile) = (safe(&i.file), safe(&i.profile));
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
                    "{file:<40} {profile:<24} {:<7} {} [{}] {} {validity} by {issuer}",
                    "issue",
                    safe(subject),
                    safe(&sans.join(",")),
                    usages.join("+")
                )?;
            }
            Verdict::Refuse { refusals } => {
                for r in refusals {
                    let r = safe(&r.to_string()).into_owned();
                    writeln!(out, "{file:<40} {profile:<24} {:<7} {r}", "REFUSE")?;
                }
            }
            Verdict::Skip { reason } => writeln!(
                out,
                "{file:<40} {profile:<24} {:<7} {}",
                "skip",
                safe(reason)
            )?,
            Verdict::Fail { rule, error } => writeln!(
                out,
                "{file:<40} {profile:<24} {:<7} {} (rule {rule})",
                "FAIL",
                safe(error)
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
        "{issue} of {} would be issued{}",
        count(p.items.len(), "CSR", "CSRs"),
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
            let (file, path) = (safe(file), path.display().to_string());
            writeln!(out, "{file:<40} {how:<30} {serial} -> {}", safe(&path))
        }
        batch::Done::Refused { file, refusals } => {
            let file = safe(file);
            for x in refusals {
                let x = safe(&x.to_string()).into_owned();
                writeln!(out, "{file:<40} {:<30} {x}", "REFUSED")?;
            }
            Ok(())
        }
        batch::Done::Skipped { file, reason } => {
            let (file, reason) = (safe(file), safe(reason));
            writeln!(out, "{file:<40} {:<30} {reason}", "skipped")
        }
        batch::Done::Failed { file, rule, error } => {
            let (file, error) = (safe(file), safe(error));
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
        "plan {}: {} issued, {} written again, {} refused, {} failed, in {:.2} s ({rate:.0}/s)",
        r.plan, r.issued, r.reissued_files, r.refused, r.failed, r.seconds
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_invisible_characters_never_reach_the_terminal_raw() {
        assert_eq!(safe("node7.csr"), "node7.csr");
        assert_eq!(
            safe("a\u{1b}[1A\u{1b}[2K\nb\u{202e}c\u{7f}\u{85}"),
            "a\\x1b[1A\\x1b[2K\\x0ab\\u202ec\\u007f\\u0085"
        );
        assert_eq!(safe("\u{e0041}"), "\\udb40\\udc41");
        // The writer keeps newlines, escapes the rest, and copes with a character split
        // across writes and with bytes that are not UTF-8.
        let mut t = Terminal::new(Vec::new());
        t.write_all(b"ok\n\x1b[8m \xe2\x80").unwrap();
        t.write_all(b"\xae \xff\n").unwrap();
        drop(t.flush());
        let Terminal { ref inner, .. } = t;
        assert_eq!(
            String::from_utf8_lossy(inner),
            "ok\n\\x1b[8m \\u202e \\xff\n"
        );
    }

    #[test]
    fn prometheus_label_values_are_escaped() {
        assert_eq!(label_value("CN=a"), "CN=a");
        assert_eq!(label_value("CN=a\\,b\"c"), "CN=a\\\\,b\\\"c");
        assert_eq!(label_value("CN=a\u{1b}\nb"), "CN=a\\\\x1b\\\\x0ab");
    }

    #[test]
    fn escaped_json_stays_valid_json_with_the_same_value() {
        let value = serde_json::json!({"file": "a\u{1b}[2K\u{202e}\u{7f}\u{85}\u{e0041}.csr"});
        let mut t = Terminal::new(Vec::new());
        json(&mut t, &value).unwrap();
        let written = t.inner.clone();
        let text = String::from_utf8(written).unwrap();
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{202e}'),
            "{text}"
        );
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value);
    }
}
