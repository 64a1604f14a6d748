//! The reference sections `--help` and the man pages share: examples per command, the
//! environment, the files of a CA home and the exit status. Written once here; [`command`]
//! puts them into clap's long help, and [`write_pages`] renders clap's definition plus these
//! sections as one man page per command.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use super::Args;
use hsmca::Error;

/// Examples by command path (`""` for `hsmca` itself): a comment, then the command line.
const EXAMPLES: &[(&str, &[(&str, &str)])] = &[
    (
        "",
        &[
            (
                "Root key ceremony, an intermediate, and the first signatures",
                "hsmca init --home /srv/ca --token prod-hsm --key-type ecdsa-p384 --subject \"CN=Example Root CA,O=Example\"",
            ),
            (
                "",
                "hsmca ca create kubernetes-ca --home /srv/ca --profile kubernetes-ca --subject CN=kubernetes-ca",
            ),
            (
                "",
                "hsmca sign --home /srv/ca --profile kubelet-client node7.csr --out certs/",
            ),
            (
                "Minutes, the checkpoint to keep, and an export an auditor checks alone",
                "hsmca minutes --home /srv/ca > minutes.md",
            ),
            ("", "cp /srv/ca/log/checkpoint minutes.checkpoint"),
            (
                "",
                "hsmca log export --home /srv/ca --out export/ && (cd export && python3 verify.py)",
            ),
        ],
    ),
    (
        "init",
        &[(
            "A P-384 root valid for 20 years, with the cluster's site parameters",
            "hsmca init --home /srv/ca --token prod-hsm --key-type ecdsa-p384 --subject \"CN=Example Root CA,O=Example\" --site site.json",
        )],
    ),
    (
        "sign",
        &[
            (
                "Sign a kubelet's client CSR; the certificate lands in certs/",
                "hsmca sign --home /srv/ca --profile kubelet-client node7.csr --out certs/",
            ),
            (
                "With the intermediate(s) and the root appended",
                "hsmca sign --home /srv/ca --profile apiserver apiserver.csr --out apiserver.crt --chain",
            ),
        ],
    ),
    (
        "site show",
        &[(
            "Every site parameter in force, and whether site.json sets it or it is the default",
            "hsmca site show --home /srv/ca",
        )],
    ),
    (
        "check",
        &[
            (
                "What would be issued, or every violated rule; no token, no PIN",
                "hsmca check --home /srv/ca --profile kubelet-client node7.csr",
            ),
            (
                "Which profiles would take these CSRs, and why the closest others refuse them",
                "hsmca check --home /srv/ca --profile auto admin.csr node7.csr",
            ),
        ],
    ),
    (
        "plan",
        &[(
            "Decide a stick's CSRs without the token and write the plan to review",
            "hsmca plan --home /srv/ca usb/csrs --manifest usb/manifest.json --out plan.json",
        )],
    ),
    (
        "sign-dir",
        &[
            (
                "Sign exactly the reviewed plan",
                "hsmca sign-dir --home /srv/ca --plan plan.json --out usb/certs",
            ),
            (
                "kubeadm's certs generate-csr output, written back in kubeadm's layout",
                "hsmca sign-dir --home /srv/ca usb/kubeadm-out --out usb/kubeadm-back",
            ),
        ],
    ),
    (
        "revoke",
        &[(
            "Revoke by serial, then publish the CRL of the certificate's issuer",
            "hsmca revoke --home /srv/ca 4f1c... --reason key-compromise && hsmca crl --home /srv/ca --issuer kubernetes-ca --out kubernetes-ca.crl",
        )],
    ),
    (
        "crl",
        &[(
            "The next CRL of an intermediate, valid 30 days",
            "hsmca crl --home /srv/ca --issuer kubernetes-ca --next-update 30d --out kubernetes-ca.crl",
        )],
    ),
    (
        "expiring",
        &[
            (
                "Cron: exit 1 when something expires within 30 days",
                "hsmca expiring --home /srv/ca --within 30d",
            ),
            (
                "node_exporter's textfile collector",
                "hsmca expiring --home /srv/ca --format prometheus > /var/lib/node_exporter/hsmca.prom.$$ && mv /var/lib/node_exporter/hsmca.prom.$$ /var/lib/node_exporter/hsmca.prom",
            ),
        ],
    ),
    (
        "renew",
        &[(
            "Re-issue two certificates under today's profiles",
            "hsmca renew --home /srv/ca 4f1c... 7a02... --out renewed/",
        )],
    ),
    (
        "minutes",
        &[
            (
                "At the end of a ceremony: print, sign, and keep the checkpoint",
                "hsmca minutes --home /srv/ca > minutes-2026-12.md",
            ),
            (
                "Only what happened since the previous ceremony",
                "hsmca minutes --home /srv/ca --since minutes-2026-11.checkpoint",
            ),
        ],
    ),
    (
        "ca create",
        &[(
            "The Kubernetes intermediate, in the same token",
            "hsmca ca create kubernetes-ca --home /srv/ca --profile kubernetes-ca --subject CN=kubernetes-ca",
        )],
    ),
    (
        "log export",
        &[(
            "An export with its own verifier; the auditor runs it anywhere",
            "hsmca log export --home /srv/ca --out export/ && (cd export && python3 verify.py)",
        )],
    ),
    (
        "log verify",
        &[
            (
                "Recompute the whole log; the log must extend the checkpoint kept in the minutes",
                "hsmca log verify --home /srv/ca --checkpoint minutes-2026-11.checkpoint",
            ),
            ("An export", "hsmca log verify --export export/"),
        ],
    ),
];

/// ENVIRONMENT: variable and meaning.
const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "HSMCA_PIN",
        "The token's user PIN (else --pin-file FILE, else a prompt without echo). Removed from \
         the environment before anything else runs; never on a command line.",
    ),
    (
        "HSMCA_PKCS11_MODULE",
        "The PKCS#11 module to load when --module is not given (before the CA home's and \
         SoftHSM2's standard paths).",
    ),
    (
        "SOFTHSM2_CONF",
        "SoftHSM2's configuration file: where its tokens live.",
    ),
    (
        "HSMCA_DANGER_CRASH_AT",
        "Test hook: aborts after-intent, after-cert or after-checkpoint. Never set it in \
         production.",
    ),
];

/// FILES: path in a CA home and meaning.
const FILES: &[(&str, &str)] = &[
    (
        "HOME/hsmca.json",
        "Module, token label, key labels and ids, log origin; no secret.",
    ),
    ("HOME/root.pem", "The root certificate."),
    (
        "HOME/cas/NAME.pem",
        "Intermediates made by hsmca ca create.",
    ),
    (
        "HOME/profiles/NAME.json",
        "The profiles this CA signs with.",
    ),
    (
        "HOME/site.json",
        "Site parameters the profiles use (cluster domain, service IP, node ranges, ...).",
    ),
    (
        "HOME/log/entries.jsonl",
        "The issuance log: one JSON entry per line, each a Merkle leaf.",
    ),
    (
        "HOME/log/checkpoint",
        "The latest signed checkpoint; keep a copy with the ceremony minutes.",
    ),
    (
        "HOME/log/checkpoints/SIZE",
        "Every checkpoint ever signed, write-once.",
    ),
    ("HOME/log/log.vkey", "The checkpoint verifier key."),
    (
        "HOME/log/quarantine/",
        "Torn tails set aside by hsmca log recover.",
    ),
    ("HOME/LOCK", "Held by the one process writing to the log."),
];

/// EXIT STATUS: code and meaning.
const EXIT_STATUS: &[(&str, &str)] = &[
    ("0", "Done."),
    (
        "1",
        "Some CSRs refused or failed (every other CSR was signed and logged); expiring: \
         something expires in the window.",
    ),
    ("2", "Usage, profile or CA-home error; nothing signed."),
    (
        "3",
        "Token or PIN problem (module, token, login, key, a failing C_ function, a lost \
         session, a failed RNG health check, a PIN file others can read).",
    ),
    (
        "4",
        "Issuance log unwritable, locked by another process, or failing verification.",
    ),
    (
        "5",
        "A signed certificate failed verification (withheld), a wrongly signed checkpoint, or \
         an internal error.",
    ),
    (
        "130, 143",
        "Stopped by SIGINT or SIGTERM; what was issued before is written and logged.",
    ),
];

/// SITE PARAMETERS: every key of `HOME/site.json`, from the one table the defaults and `hsmca
/// site show` use.
fn site_parameters() -> Vec<(String, String)> {
    hsmca::profile::SITE_KEYS
        .iter()
        .map(|k| {
            (
                format!(
                    "{} ({}, default {})",
                    k.name,
                    k.kind.name(),
                    k.default_value()
                ),
                k.meaning.to_owned(),
            )
        })
        .collect()
}

/// Commands whose help and man page list the site parameters.
fn shows_site(path: &str) -> bool {
    matches!(path, "" | "init" | "site" | "site show" | "profiles apply")
}

const SITE_NOTE: &str = "Change them by editing HOME/site.json, then run hsmca profiles apply \
(the logged policy change); hsmca site show prints the values in force and where each comes from.";

fn examples(path: &str) -> &'static [(&'static str, &'static str)] {
    EXAMPLES
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(&[], |(_, e)| e)
}

/// The plain-text sections for `--help` (long form) of the command at `path`.
fn help_text(path: &str) -> String {
    let mut s = String::new();
    let ex = examples(path);
    if !ex.is_empty() {
        s.push_str("Examples:\n");
        for (comment, line) in ex {
            if !comment.is_empty() {
                let _ = writeln!(s, "  # {comment}");
            }
            let _ = writeln!(s, "  {line}");
        }
    }
    if path.is_empty() {
        for (title, items) in [
            ("Environment", ENVIRONMENT),
            ("Files", FILES),
            ("Exit status", EXIT_STATUS),
        ] {
            let _ = writeln!(s, "\n{title}:");
            for (k, v) in items {
                let _ = writeln!(s, "  {k}\n      {v}");
            }
        }
    } else {
        s.push_str("\nEnvironment, files and exit status: hsmca --help, or man hsmca.");
    }
    if shows_site(path) {
        let _ = writeln!(s, "\n\nSite parameters (HOME/site.json):");
        for (k, v) in site_parameters() {
            let _ = writeln!(s, "  {k}\n      {v}");
        }
        let _ = write!(s, "\n{SITE_NOTE}");
    }
    s.trim_end().to_owned()
}

/// The CLI definition with the shared sections as each command's long help.
pub(crate) fn command() -> clap::Command {
    fn add(cmd: clap::Command, path: &str) -> clap::Command {
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|c| c.get_name().to_owned())
            .collect();
        let mut cmd = cmd.after_long_help(help_text(path));
        for name in names {
            let sub = if path.is_empty() {
                name.clone()
            } else {
                format!("{path} {name}")
            };
            cmd = cmd.mut_subcommand(&name, |c| add(c, &sub));
        }
        cmd
    }
    add(Args::command(), "")
}

/// Escapes text for roff: backslashes, and a leading `.` or `'` that would read as a request.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e").replace('-', "\\-");
    if t.starts_with('.') || t.starts_with('\'') {
        format!("\\&{t}")
    } else {
        t
    }
}

fn section(out: &mut String, title: &str, items: &[(&str, &str)]) {
    if title.contains(' ') {
        let _ = writeln!(out, ".SH \"{title}\"");
    } else {
        let _ = writeln!(out, ".SH {title}");
    }
    for (k, v) in items {
        let _ = writeln!(out, ".TP\n.B {}\n{}", roff(k), roff(v));
    }
}

/// Renders one page: clap's NAME, SYNOPSIS, DESCRIPTION, OPTIONS and SUBCOMMANDS, then
/// EXAMPLES, ENVIRONMENT, FILES and EXIT STATUS from this module, then VERSION.
fn page(cmd: &clap::Command, path: &str) -> Result<Vec<u8>, std::io::Error> {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut out)?;
    }
    let mut extra = String::new();
    let ex = examples(path);
    if !ex.is_empty() {
        extra.push_str(".SH EXAMPLES\n");
        for (comment, line) in ex {
            if !comment.is_empty() {
                let _ = writeln!(extra, ".PP\n{}", roff(comment));
            }
            let _ = writeln!(extra, ".RS\n.nf\n{}\n.fi\n.RE", roff(line));
        }
    }
    section(&mut extra, "ENVIRONMENT", ENVIRONMENT);
    section(&mut extra, "FILES", FILES);
    section(&mut extra, "EXIT STATUS", EXIT_STATUS);
    if shows_site(path) {
        let keys = site_parameters();
        let items: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        section(&mut extra, "SITE PARAMETERS", &items);
        let _ = writeln!(extra, ".PP\n{}", roff(SITE_NOTE));
    }
    out.extend_from_slice(extra.as_bytes());
    if cmd.get_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    Ok(out)
}

/// `hsmca man --out DIR`: `hsmca.1` and one page per command (`hsmca-log-verify.1`, ...),
/// each replacing an older page of that name. Returns the files written.
pub(crate) fn write_pages(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    fn walk(
        cmd: &clap::Command,
        path: &str,
        dir: &Path,
        written: &mut Vec<PathBuf>,
    ) -> Result<(), Error> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let p = if path.is_empty() {
                sub.get_name().to_owned()
            } else {
                format!("{path} {}", sub.get_name())
            };
            walk(sub, &p, dir, written)?;
        }
        let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
        let file = dir.join(format!("{name}.1"));
        let bytes = page(cmd, path)?;
        hsmca::files::replace(&file, &bytes)?;
        written.push(file);
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut cmd = command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    walk(&cmd, "", dir, &mut written)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_names_a_real_command_and_parses() {
        let cmd = command();
        for (path, examples) in EXAMPLES {
            let mut c = &cmd;
            for part in path.split_whitespace() {
                c = c
                    .find_subcommand(part)
                    .unwrap_or_else(|| panic!("no command {path:?}"));
            }
            for (_, line) in *examples {
                // Each `hsmca ...` in the line parses with the real definition.
                for one in line.split("&&").map(str::trim) {
                    let Some(rest) = one.strip_prefix("hsmca ") else {
                        continue;
                    };
                    let words: Vec<String> = rest
                        .split_whitespace()
                        .take_while(|w| *w != ">")
                        .map(|w| w.trim_matches('"').to_owned())
                        .collect();
                    // Quoted subjects with spaces are joined back.
                    let mut args = vec!["hsmca".to_owned()];
                    let mut quoted: Option<String> = None;
                    for (w, raw) in words.iter().zip(rest.split_whitespace()) {
                        match (&mut quoted, raw.starts_with('"'), raw.ends_with('"')) {
                            (None, true, false) => quoted = Some(w.clone()),
                            (Some(q), _, true) => {
                                q.push(' ');
                                q.push_str(w);
                                args.push(q.clone());
                                quoted = None;
                            }
                            (Some(q), _, _) => {
                                q.push(' ');
                                q.push_str(w);
                            }
                            (None, _, _) => args.push(w.clone()),
                        }
                    }
                    command()
                        .try_get_matches_from(&args)
                        .unwrap_or_else(|e| panic!("{one}: {e}"));
                }
            }
        }
    }

    #[test]
    fn roff_escapes_what_roff_would_act_on() {
        assert_eq!(roff(".x a\\b-c"), "\\&.x a\\eb\\-c");
    }
}
