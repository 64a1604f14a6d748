//! Command-line definitions (clap derive) and dispatch. Checks only what the user typed; the
//! library does the work, and `report` does all the printing.

mod man;
pub(crate) mod report;

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use hsmca::ceremony::{self, InitRequest};
use hsmca::clock::SystemClock;
use hsmca::engine::{EngineError, Outcome};
use hsmca::home::Home;
use hsmca::keys::KeyType;
use hsmca::profile::{Duration, Profile, Site};
use hsmca::sign::{self, SignRequest};
use hsmca::token::{self, Token, TokenRef};
use hsmca::{Error, batch, lifecycle, log, pin};

/// hsmca: an offline root CA whose keys never leave a PKCS#11 token.
///
/// Signs Kubernetes certificate requests under strict per-profile policy and records every
/// issuance in an append-only, tamper-evident log.
#[derive(Debug, Parser)]
#[command(name = "hsmca", version, about, long_about, after_help = EXIT_CODES)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 done; 1 some CSRs refused or failed (the rest signed); 2 usage, profile or \
CA-home error; 3 token or PIN problem; 4 issuance log error or failed verification; 5 certificate failed \
post-signing verification (withheld) or internal error.\n\nThe PIN comes from HSMCA_PIN, --pin-file FILE or a \
prompt without echo, never from the command line.";

/// Options for reaching the token.
#[derive(Debug, clap::Args)]
struct TokenOpts {
    /// PKCS#11 module (default: HSMCA_PKCS11_MODULE, the CA home's, or SoftHSM2's standard paths).
    #[arg(long, value_name = "PATH")]
    module: Option<PathBuf>,
    /// File holding the token PIN (else HSMCA_PIN, else a prompt).
    #[arg(long, value_name = "FILE")]
    pin_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Root key ceremony: generate the root and log keys in the token, self-sign the root and
    /// create the CA home.
    Init {
        /// The new CA home (must not exist).
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// Token label or RFC 7512 URI (`pkcs11:token=LABEL`).
        #[arg(long, value_name = "LABEL|URI")]
        token: String,
        /// Root key algorithm.
        #[arg(long, value_parser = ["ecdsa-p384", "ecdsa-p256", "rsa-3072", "rsa-4096"])]
        key_type: String,
        /// Root subject, e.g. "CN=Example Root CA,O=Example".
        #[arg(long)]
        subject: String,
        /// Root lifetime (e.g. 20y, 3650d).
        #[arg(long, default_value = "20y", value_parser = parse_duration)]
        validity: Duration,
        /// Label of the root key in the token (the log key gets LABEL-log).
        #[arg(long, default_value = "hsmca-root")]
        key_label: String,
        /// Checkpoint key algorithm (default: ed25519 if the token has CKM_EDDSA, else ecdsa-p256).
        #[arg(long, value_parser = ["ed25519", "ecdsa-p256"])]
        log_key_type: Option<String>,
        /// Log origin for checkpoints (default: hsmca/<root key fingerprint>).
        #[arg(long)]
        log_origin: Option<String>,
        /// Install the profiles from this directory instead of the shipped ones.
        #[arg(long, value_name = "DIR")]
        profiles: Option<PathBuf>,
        /// Site parameters (JSON object: cluster_name, cluster_domain, service_ip, node_names,
        /// node_ip_ranges, ...; see SITE PARAMETERS); keys left out take the built-in default.
        /// Every value in force is written to HOME/site.json and printed.
        #[arg(long, value_name = "FILE")]
        site: Option<PathBuf>,
        #[command(flatten)]
        token_opts: TokenOpts,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Sign CSRs under a profile: verify, decide, log, sign in the token, verify, write.
    Sign {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// Profile name (a file in HOME/profiles).
        #[arg(long)]
        profile: String,
        /// CSR files, PEM or DER.
        #[arg(required = true, value_name = "CSR")]
        csrs: Vec<PathBuf>,
        /// Output file (one CSR) or directory (several). Default: NAME.crt beside each CSR.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// After each certificate, append its issuing intermediate(s) and the root, in order
        /// up the chain.
        #[arg(long)]
        chain: bool,
        /// Validity, at most the profile's maximum (default: the profile's default).
        #[arg(long, value_parser = parse_duration)]
        validity: Option<Duration>,
        /// Token label or URI (default: the CA home's).
        #[arg(long, value_name = "LABEL|URI")]
        token: Option<String>,
        #[command(flatten)]
        token_opts: TokenOpts,
        /// Machine-readable output (one JSON object per CSR).
        #[arg(long)]
        json: bool,
    },
    /// Show what `sign` would issue, or every violation, without the token or a PIN.
    /// `--profile auto` judges each CSR under every leaf profile instead: which accept it, and
    /// for the closest that refuse it, why.
    Check {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// Profile name, or `auto`: every leaf profile of the home (CA profiles are never
        /// offered; dangerous ones are marked, since a batch needs --allow-profile for them).
        #[arg(long)]
        profile: String,
        /// CSR files, PEM or DER.
        #[arg(required = true, value_name = "CSR")]
        csrs: Vec<PathBuf>,
        /// Validity to check against the profile.
        #[arg(long, value_parser = parse_duration)]
        validity: Option<Duration>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a certificate (logged; listed by the next `hsmca crl` of its issuer).
    Revoke {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// Serial in hex (as `hsmca log list` shows it).
        #[arg(required_unless_present = "cert", conflicts_with = "cert")]
        serial: Option<String>,
        /// The certificate file instead of its serial.
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
        /// RFC 5280 reason: unspecified, key-compromise, ca-compromise, affiliation-changed,
        /// superseded, cessation-of-operation, certificate-hold, privilege-withdrawn, aa-compromise;
        /// RFC 5280 / OpenSSL spellings (keyCompromise, cACompromise, CACompromise, ...) too.
        #[arg(long)]
        reason: String,
        /// When the key was (or may have been) compromised, RFC 3339 (CRL invalidityDate).
        #[arg(long, value_name = "TIME")]
        invalidity_date: Option<String>,
        #[command(flatten)]
        token_opts: TokenOpts,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Sign a CRL v2 for one issuer with the next CRL number; logged before it is written.
    Crl {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// `root` or an intermediate's name.
        #[arg(long, default_value = "root")]
        issuer: String,
        /// nextUpdate, from now.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        next_update: Duration,
        /// Output file (PEM; never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        token_opts: TokenOpts,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Unrevoked certificates and CAs expiring within a window, soonest first. Exit 1 if any
    /// (for cron), 0 if none. `--format prometheus` writes every certificate for node_exporter's
    /// textfile collector instead, and exits 0.
    Expiring {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// Window from now (default 30d; with --format prometheus, default: every certificate).
        #[arg(long, value_parser = parse_duration)]
        within: Option<Duration>,
        /// Output: text (the table), json (one document), json-lines (one object per
        /// certificate, as --json), or prometheus (node_exporter textfile collector: one gauge
        /// hsmca_certificate_not_after_seconds per certificate, labelled with serial, profile,
        /// subject and issuer).
        #[arg(long, value_enum, default_value = "text", conflicts_with = "json")]
        format: report::ExpiringFormat,
        /// Machine-readable output: JSON lines, one object per certificate.
        #[arg(long)]
        json: bool,
    },
    /// Re-issue certificates for the same subject and key under today's profile.
    Renew {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// Serials in hex.
        #[arg(required = true)]
        serials: Vec<String>,
        /// Validity (default: the profile's).
        #[arg(long, value_parser = parse_duration)]
        validity: Option<Duration>,
        /// Directory for the new certificates (SERIAL.crt).
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        #[command(flatten)]
        token_opts: TokenOpts,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Decide every CSR of a directory (or kubeadm's generate-csr output) without the token,
    /// print a review table and write the plan with its content hash.
    Plan {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// Directory of CSRs (searched recursively for *.csr and *.req), kubeadm's generate-csr
        /// output, or a JSON file from `kubectl get csr -o json`.
        input: PathBuf,
        /// One profile for every CSR.
        #[arg(long, conflicts_with = "manifest")]
        profile: Option<String>,
        /// JSON manifest: {"file.csr": "profile"} or {"file.csr": {"profile": P, "validity": "90d"}};
        /// for Kubernetes objects, {"signerName": "profile"} for custom signers.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Where to write the plan (never overwritten).
        #[arg(long, value_name = "PLAN.json")]
        out: PathBuf,
        /// A dangerous profile (one that can issue system:masters, or that site.json lists in
        /// danger_profiles) this batch may use. Repeatable; without it such items are refused
        /// (rule profile.danger).
        #[arg(long, value_name = "NAME")]
        allow_profile: Vec<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Sign a reviewed plan (or plan and sign INPUT in one go) into OUTDIR.
    SignDir {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// A plan made by `hsmca plan`; signing refuses if any input changed since.
        #[arg(long, value_name = "PLAN.json", conflicts_with_all = ["input", "profile", "manifest"])]
        plan: Option<PathBuf>,
        /// The plan hash the reviewers wrote down from `hsmca plan`'s output. Without it, the
        /// hash is asked for on the terminal; with no terminal, nothing is signed.
        #[arg(long, value_name = "HASH", requires = "plan")]
        approve: Option<String>,
        /// A dangerous profile this batch may use (see `hsmca plan --allow-profile`).
        /// Repeatable; without it such items are refused (rule profile.danger).
        #[arg(long, value_name = "NAME")]
        allow_profile: Vec<String>,
        /// Directory of CSRs, planned and signed at once (for scripts).
        #[arg(required_unless_present = "plan")]
        input: Option<PathBuf>,
        /// One profile for every CSR (with INPUT).
        #[arg(long)]
        profile: Option<String>,
        /// Manifest (with INPUT).
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Output directory (mirrors the input layout; kubeadm's names for kubeadm input).
        #[arg(long, value_name = "OUTDIR")]
        out: PathBuf,
        /// Token sessions to sign on in parallel (SoftHSM on 2 cores: 2 for RSA keys; 1 is as
        /// fast for ECDSA. A network HSM may want more.)
        #[arg(long, default_value_t = 2)]
        sessions: usize,
        #[command(flatten)]
        token_opts: TokenOpts,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the ceremony minutes (Markdown) from the verified log and the token: token,
    /// module and its SHA-256, CA fingerprints, verifier key, what was issued, revoked and
    /// signed, the first and last checkpoint, and lines for the operators' and witnesses'
    /// signatures. Needs no PIN.
    Minutes {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// Only what came after this checkpoint (the one kept from the previous ceremony); the
        /// log must extend it.
        #[arg(long, value_name = "CHECKPOINT")]
        since: Option<PathBuf>,
        #[command(flatten)]
        token_opts: TokenOpts,
        /// Machine-readable output (the same facts as JSON).
        #[arg(long)]
        json: bool,
    },
    /// Offline intermediate CAs whose keys live in the same token.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// List, show, lint and import profiles.
    Profiles {
        #[command(subcommand)]
        command: ProfilesCommand,
    },
    /// The site parameters the profiles use (HOME/site.json).
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Work with the issuance log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Print shell completions.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (hsmca.1 and one per subcommand, with EXAMPLES, ENVIRONMENT, FILES
    /// and EXIT STATUS) to a directory.
    Man {
        /// Output directory.
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Generate an intermediate CA key in the token, sign it with the profile's issuer (the
    /// root) under a CA profile, log it, and add it to the CA home.
    Create {
        /// Name profiles use as `issuer` (e.g. kubernetes-ca, etcd-ca, front-proxy-ca).
        name: String,
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// A CA profile.
        #[arg(long)]
        profile: String,
        /// Subject, e.g. "CN=kubernetes-ca".
        #[arg(long)]
        subject: String,
        /// Key algorithm of the intermediate.
        #[arg(long, default_value = "ecdsa-p256", value_parser = ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"])]
        key_type: String,
        /// Validity (default: the profile's, cut to the issuer's notAfter if that is sooner).
        #[arg(long, value_parser = parse_duration)]
        validity: Option<Duration>,
        /// Label of the CA key in the token (default: ROOTLABEL-NAME). A rerun after a failure
        /// finds the key an earlier run left under the label; another label starts afresh.
        #[arg(long)]
        key_label: Option<String>,
        #[command(flatten)]
        token_opts: TokenOpts,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ProfilesCommand {
    /// The profiles of a CA home (or the shipped ones without --home).
    List {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One profile with site parameters filled in.
    Show {
        /// Profile name.
        name: String,
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: Option<PathBuf>,
    },
    /// Check profile files (default: all of the CA home's, or the shipped ones).
    Lint {
        /// Profile files.
        files: Vec<PathBuf>,
        /// The CA home whose site parameters apply.
        #[arg(long, value_name = "DIR")]
        home: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Log the CA home's profiles and site.json as the policy in force (needs the token): the
    /// only way to change what is signed. Shows which files changed since the last policy.
    Apply {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        #[command(flatten)]
        token_opts: TokenOpts,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Turn a cfssl ca-config.json into hsmca profiles (with TODOs for the strict rules).
    ImportCfssl {
        /// The cfssl signing configuration.
        config: PathBuf,
        /// Where to write the profiles.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SiteCommand {
    /// Every site parameter with its value in force and its origin: `set` in HOME/site.json,
    /// or the built-in `default`. Needs no token.
    Show {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// Machine-readable output (one JSON document).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// Certificates in the log, with filters.
    List {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        #[command(flatten)]
        filter: FilterOpts,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One certificate from the log, with its PEM.
    Show {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// Serial in hex.
        serial: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Entries, checkpoints, verifier key, artefacts and a C2SP tlog-proof per certificate
    /// and CRL, for verification without hsmca.
    Export {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// New directory to write.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Recompute the whole log and check entries, chain, checkpoints and CA rules.
    Verify {
        /// The CA home.
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "export",
            conflicts_with = "export"
        )]
        home: Option<PathBuf>,
        /// An export made by `hsmca log export` instead of a CA home: also checks its proofs
        /// and files (the export's own `python3 verify.py` checks the same without hsmca).
        #[arg(long, value_name = "DIR")]
        export: Option<PathBuf>,
        /// Verifier key to trust instead of the one recorded in the log (from the ceremony
        /// minutes).
        #[arg(long)]
        vkey: Option<String>,
        /// A checkpoint kept outside (minutes, auditor): the log must extend it. Repeatable.
        #[arg(long, value_name = "FILE")]
        checkpoint: Vec<PathBuf>,
        /// Check only what was appended after this checkpoint (kept from an earlier
        /// verification or the minutes): the latest checkpoint must extend it, and every entry
        /// after it is re-hashed and checked. Time grows with what was appended, not with the
        /// log.
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with_all = ["export", "checkpoint", "token", "vkey"]
        )]
        from_checkpoint: Option<PathBuf>,
        /// Also log in to the token and check the log against the head it keeps.
        #[arg(long)]
        token: bool,
        #[command(flatten)]
        token_opts: TokenOpts,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the log's index (`log/index.sqlite`) and tree hashes (`log/hashes`) from
    /// `entries.jsonl`, then check them against the latest checkpoint. Both are derived: an
    /// index that does not match the log is rebuilt on its own when a command opens the log;
    /// this does it on demand (after a restore, or to time it).
    Reindex {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Set a torn last line aside, close open intents, log the recovery and sign a checkpoint.
    Recover {
        /// The CA home.
        #[arg(long, value_name = "DIR")]
        home: PathBuf,
        #[command(flatten)]
        token_opts: TokenOpts,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Filters for `log list`.
#[derive(Debug, clap::Args)]
struct FilterOpts {
    /// Only this profile.
    #[arg(long)]
    profile: Option<String>,
    /// Subject contains this text.
    #[arg(long)]
    subject: Option<String>,
    /// Only this serial.
    #[arg(long)]
    serial: Option<String>,
    /// Logged at or after this RFC 3339 time.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Logged before this RFC 3339 time.
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Only revoked certificates.
    #[arg(long)]
    revoked: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    Duration::parse(s).ok_or_else(|| format!("{s:?} is not a duration like 90d, 12h or 20y"))
}

fn token_ref(s: &str) -> Result<TokenRef, Error> {
    TokenRef::parse(s).map_err(|e| Error::Usage(format!("--token: {e}")))
}

/// Parses the command line with the shared reference sections (examples, environment, files,
/// exit status) in the long help, as the man pages show them.
pub(crate) fn parse() -> Args {
    let matches = man::command().get_matches();
    Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Runs one command; returns the exit code for a finished run.
pub(crate) fn run(args: Args) -> Result<u8, Error> {
    let clock = SystemClock;
    // Everything printed passes the terminal-safety net (see `report::Terminal`).
    let mut out = report::Terminal::new(std::io::stdout().lock());
    match args.command {
        Command::Init {
            home,
            token,
            key_type,
            subject,
            validity,
            key_label,
            log_key_type,
            log_origin,
            profiles,
            site,
            token_opts,
            json,
        } => {
            let tref = token_ref(&token)?;
            let (site, site_given) = match &site {
                Some(path) => Site::load_with_origins(path)?,
                None => (Site::default(), std::collections::BTreeSet::new()),
            };
            let key_type = KeyType::from_name(&key_type)
                .ok_or_else(|| Error::Usage(format!("unknown key type {key_type}")))?;
            let log_key_type = log_key_type.as_deref().and_then(KeyType::from_name);
            let module = hash_module(&token::resolve_module(token_opts.module.as_deref(), None)?)?;
            let req = InitRequest {
                home,
                record_module: token_opts.module.is_some(),
                module,
                key_label: tref.object.clone().unwrap_or(key_label),
                token: tref,
                key_type,
                subject,
                validity,
                log_key_type,
                origin: log_origin,
                profiles_from: profiles,
                site,
                site_given,
            };
            hsmca::issue::parse_subject(&req.subject)?;
            let pin = pin::read(token_opts.pin_file.as_deref(), &req.token.token)?;
            let report = ceremony::init(&req, &pin, &clock)?;
            report::init(&mut out, &report, json)?;
            Ok(0)
        }
        Command::Sign {
            home,
            profile,
            csrs,
            out: out_path,
            chain,
            validity,
            token,
            token_opts,
            json,
        } => {
            let home = Home::open(&home)?;
            let req = SignRequest {
                profile,
                csrs,
                out: out_path,
                chain,
                validity,
            };
            // Fail on a bad or changed profile before asking for the PIN.
            hsmca::pinned::check_home(&home)?;
            home.profile(&req.profile)?;
            let tref = match token {
                Some(t) => token_ref(&t)?,
                None => home_token_ref(&home),
            };
            let token = open_pinned_token(&home, &token_opts, &tref)?;
            // From here on SIGINT/SIGTERM stop the run between certificates, cleanly.
            hsmca::signals::install().map_err(|e| Error::Internal(e.to_string()))?;
            let signed = sign::sign(&home, &req, &token, &clock)?;
            finish_outcomes(&mut out, signed, json)
        }
        Command::Check {
            home,
            profile,
            csrs,
            validity,
            json,
        } => {
            let home = Home::open(&home)?;
            hsmca::pinned::check_home(&home)?;
            if profile == "auto" {
                let checks = sign::check_auto(&home, &csrs, validity, &clock)?;
                report::auto_checks(&mut out, &checks, &home.dir, json)?;
                return Ok(if checks.iter().all(sign::AutoCheck::ok) {
                    0
                } else {
                    1
                });
            }
            let req = SignRequest {
                profile,
                csrs,
                out: None,
                chain: false,
                validity,
            };
            let outcomes = sign::check(&home, &req, &clock)?;
            report::outcomes(&mut out, &outcomes, json)?;
            Ok(if outcomes.iter().all(Outcome::ok) {
                0
            } else {
                1
            })
        }
        Command::Log {
            command:
                LogCommand::Verify {
                    home,
                    export,
                    vkey,
                    checkpoint,
                    from_checkpoint,
                    token,
                    token_opts,
                    json,
                },
        } => {
            if let (Some(file), Some(home)) = (&from_checkpoint, &home) {
                let note = std::fs::read(file).map_err(hsmca::error::at(file))?;
                let report = log::verify_since(home, &file.display().to_string(), &note)?;
                report::log_verify(&mut out, &report, json)?;
                return Ok(if report.problems.is_empty() { 0 } else { 4 });
            }
            let mut external = checkpoint
                .iter()
                .map(|p| {
                    Ok((
                        p.display().to_string(),
                        std::fs::read(p).map_err(hsmca::error::at(p))?,
                    ))
                })
                .collect::<Result<Vec<_>, Error>>()?;
            let report = match (home, export) {
                (_, Some(dir)) => lifecycle::verify_export(&dir, vkey.as_deref(), &external)?,
                (Some(home), None) => {
                    if token {
                        let home = Home::open(&home)?;
                        let token = open_home_token(&home, &token_opts)?;
                        let label = hsmca::engine::head_label(&home);
                        let heads = token.read_data(&label)?;
                        if heads.is_empty() {
                            return Err(Error::Pinned(hsmca::pinned::PinnedError::LogHead(
                                format!(
                                    "token {:?} keeps no log head under {label:?}",
                                    token.label()
                                ),
                            )));
                        }
                        external.extend(
                            heads
                                .into_iter()
                                .map(|h| ("the token's log head".to_owned(), h)),
                        );
                    }
                    let root_der = std::fs::read(home.join("root.pem"))
                        .ok()
                        .and_then(|b| hsmca::issue::IssuerCert::from_pem_or_der(&b).ok())
                        .map(|c| c.der);
                    log::verify_with(
                        &log::Paths::of_home(&home),
                        vkey.as_deref(),
                        root_der.as_deref(),
                        &external,
                    )?
                }
                (None, None) => {
                    return Err(Error::Usage("give --home DIR or --export DIR".into()));
                }
            };
            report::log_verify(&mut out, &report, json)?;
            Ok(if report.problems.is_empty() { 0 } else { 4 })
        }
        Command::Log {
            command: LogCommand::Reindex { home, json },
        } => {
            let log = log::reindex(&home)?;
            let summary = serde_json::json!({
                "entries": log.size(),
                "checkpoint_size": log.checkpoint_size(),
                "index": log.paths().index(),
                "hashes": log.paths().hashes(),
            });
            if json {
                writeln!(out, "{summary}")?;
            } else {
                writeln!(
                    out,
                    "reindexed {} from {}: the index and tree hashes match the latest checkpoint (size {})",
                    hsmca::names::count(log.size(), "entry", "entries"),
                    log.paths().entries().display(),
                    log.checkpoint_size()
                )?;
            }
            Ok(0)
        }
        Command::Log {
            command:
                LogCommand::Recover {
                    home,
                    token_opts,
                    json,
                },
        } => {
            let home = Home::open(&home)?;
            let token = open_pinned_token(&home, &token_opts, &home_token_ref(&home))?;
            let key = token.key(&home.config.log_key.label)?;
            let note_key =
                log::translog::NoteKey::new(&home.config.origin, &key).map_err(Error::Usage)?;
            let (recovered_log, recovered) =
                log::recover(&home.dir, hsmca::clock::Clock::now(&clock), &note_key)?;
            token.write_data(
                &hsmca::engine::head_label(&home),
                &recovered_log.latest_checkpoint()?,
            )?;
            report::recovered(&mut out, &recovered, json)?;
            Ok(0)
        }
        Command::Ca {
            command:
                CaCommand::Create {
                    name,
                    home,
                    profile,
                    subject,
                    key_type,
                    validity,
                    key_label,
                    token_opts,
                    json,
                },
        } => {
            let home = Home::open(&home)?;
            let key_type = KeyType::from_name(&key_type)
                .ok_or_else(|| Error::Usage(format!("unknown key type {key_type}")))?;
            let req = ceremony::CaRequest {
                name,
                profile,
                subject,
                key_type,
                validity,
                key_label,
            };
            let token = open_home_token(&home, &token_opts)?;
            let report = ceremony::create_ca(&home, &req, &token, &clock)?;
            report::ca_created(&mut out, &report, json)?;
            Ok(0)
        }
        Command::Minutes {
            home,
            since,
            token_opts,
            json,
        } => {
            let home = Home::open(&home)?;
            let minutes = hsmca::minutes::gather(
                &home,
                since.as_deref(),
                token_opts.module.as_deref(),
                &clock,
            )?;
            report::minutes(&mut out, &minutes, json)?;
            Ok(0)
        }
        Command::Profiles { command } => profiles(&mut out, command),
        Command::Plan {
            home,
            input,
            profile,
            manifest,
            out: file,
            allow_profile,
            json,
        } => {
            let home = Home::open(&home)?;
            hsmca::pinned::check_home(&home)?;
            let plan = batch::plan(
                &home,
                &input,
                profile.as_deref(),
                manifest.as_deref(),
                &allowed(allow_profile),
                &clock,
            )?;
            let bytes =
                serde_json::to_vec_pretty(&plan).map_err(|e| Error::Internal(e.to_string()))?;
            hsmca::files::write_new(&file, &bytes)?;
            report::plan(&mut out, &plan, &file, json)?;
            Ok(
                if plan
                    .items
                    .iter()
                    .all(|i| matches!(i.verdict, batch::Verdict::Issue { .. }))
                {
                    0
                } else {
                    1
                },
            )
        }
        Command::SignDir {
            home,
            plan,
            input,
            profile,
            manifest,
            out: dir,
            sessions,
            approve,
            allow_profile,
            token_opts,
            json,
        } => {
            let allow = allowed(allow_profile);
            let home = Home::open(&home)?;
            let plan = match (plan, &input) {
                (Some(path), _) => {
                    let plan = batch::read_plan(&path)?;
                    approved(&path, &plan, approve.as_deref())?;
                    Some(plan)
                }
                (None, Some(_)) => None,
                (None, None) => {
                    return Err(Error::Usage(
                        "give --plan PLAN.json or an INPUT directory".into(),
                    ));
                }
            };
            let token = open_home_token(&home, &token_opts)?;
            // From here on SIGINT/SIGTERM stop the run between certificates, cleanly.
            hsmca::signals::install().map_err(|e| Error::Internal(e.to_string()))?;
            // The report streams: one JSON line per CSR into OUTDIR, and one line each on stdout.
            let mut file = batch::ReportFile::create(&dir)?;
            // A line per CSR: at once on a terminal, in blocks into a pipe or file (10,000
            // CSRs were 10,000 writes).
            let mut lines: Box<dyn Write> = if std::io::IsTerminal::is_terminal(&std::io::stdout())
            {
                Box::new(&mut out)
            } else {
                Box::new(std::io::BufWriter::with_capacity(1 << 16, &mut out))
            };
            let mut done = |d: &batch::Done| -> Result<(), Error> {
                let line = serde_json::to_vec(d).map_err(|e| Error::Internal(e.to_string()))?;
                file.line(&line)?;
                if json {
                    lines.write_all(&line)?;
                    writeln!(lines)?;
                } else {
                    report::done(&mut lines, d, false)?;
                }
                Ok(())
            };
            let r = match (&plan, &input) {
                (Some(plan), _) => batch::sign(
                    &home, plan, &allow, &dir, &token, sessions, &clock, &mut done,
                )?,
                (None, Some(input)) => batch::sign_input(
                    &home,
                    input,
                    profile.as_deref(),
                    manifest.as_deref(),
                    &allow,
                    &dir,
                    &token,
                    sessions,
                    &clock,
                    &mut done,
                )?,
                (None, None) => return Err(Error::Internal("no plan and no input".into())),
            };
            lines.flush()?;
            drop(lines);
            let report_file = file.finish(&r)?;
            report::sign_dir(&mut out, &r, &report_file, json)?;
            if let Some(halt) = r.halt {
                return Err(EngineError::Halt(halt).into());
            }
            Ok(if r.refused + r.failed == 0 { 0 } else { 1 })
        }
        Command::Revoke {
            home,
            serial,
            cert,
            reason,
            invalidity_date,
            token_opts,
            json,
        } => {
            let home = Home::open(&home)?;
            let serial = match (serial, cert) {
                (Some(s), _) => s,
                (None, Some(path)) => lifecycle::serial_of_file(&path)?,
                (None, None) => return Err(Error::Usage("give a SERIAL or --cert FILE".into())),
            };
            let token = open_home_token(&home, &token_opts)?;
            let r = lifecycle::revoke(
                &home,
                &serial,
                &reason,
                invalidity_date.as_deref(),
                &token,
                &clock,
            )?;
            report::revoked(&mut out, &r, json)?;
            Ok(0)
        }
        Command::Crl {
            home,
            issuer,
            next_update,
            out: file,
            token_opts,
            json,
        } => {
            let home = Home::open(&home)?;
            let token = open_home_token(&home, &token_opts)?;
            let r = lifecycle::crl(&home, &issuer, next_update, &file, &token, &clock)?;
            report::crl(&mut out, &r, json)?;
            Ok(0)
        }
        Command::Expiring {
            home,
            within,
            format,
            json,
        } => {
            let home = Home::open(&home)?;
            let format = if json {
                report::ExpiringFormat::JsonLines
            } else {
                format
            };
            if format == report::ExpiringFormat::Prometheus {
                // Every certificate, and exit 0: a collector job runs `... > F.$$ && mv F.$$ F`.
                let list = lifecycle::expiring(&home, within, &clock)?;
                let now = hsmca::clock::Clock::now(&clock).unix_timestamp();
                report::expiring_prometheus(&mut out, &list, now)?;
                return Ok(0);
            }
            let within = within.unwrap_or(Duration(30 * 86_400));
            let list = lifecycle::expiring(&home, Some(within), &clock)?;
            report::expiring(&mut out, &list, within, format)?;
            Ok(u8::from(!list.is_empty()))
        }
        Command::Renew {
            home,
            serials,
            validity,
            out: dir,
            token_opts,
            json,
        } => {
            let home = Home::open(&home)?;
            let token = open_home_token(&home, &token_opts)?;
            // From here on SIGINT/SIGTERM stop the run between certificates, cleanly.
            hsmca::signals::install().map_err(|e| Error::Internal(e.to_string()))?;
            let renewed = lifecycle::renew(&home, &serials, validity, &dir, &token, &clock)?;
            finish_outcomes(&mut out, renewed, json)
        }
        Command::Log {
            command: LogCommand::List { home, filter, json },
        } => {
            let home = Home::open(&home)?;
            let f = lifecycle::Filter {
                profile: filter.profile,
                subject: filter.subject,
                serial: filter.serial,
                since: filter.since,
                until: filter.until,
                revoked: filter.revoked,
            };
            let list = lifecycle::list(&home, &f, &clock)?;
            report::listed(&mut out, &list, json)?;
            Ok(0)
        }
        Command::Log {
            command: LogCommand::Show { home, serial, json },
        } => {
            let home = Home::open(&home)?;
            let f = lifecycle::Filter {
                serial: Some(serial.clone()),
                ..lifecycle::Filter::default()
            };
            let list = lifecycle::list(&home, &f, &clock)?;
            let Some(one) = list.first() else {
                return Err(Error::Usage(format!("serial {serial} is not in the log")));
            };
            report::shown(&mut out, one, json)?;
            Ok(0)
        }
        Command::Log {
            command:
                LogCommand::Export {
                    home,
                    out: dir,
                    json,
                },
        } => {
            let home = Home::open(&home)?;
            let r = lifecycle::export(&home, &dir)?;
            report::exported(&mut out, &r, json)?;
            Ok(0)
        }
        Command::Site {
            command: SiteCommand::Show { home, json },
        } => {
            let home = Home::open(&home)?;
            let (site, given) = home.site_with_origins()?;
            report::site(&mut out, &site.settings(&given), json)?;
            Ok(0)
        }
        Command::Completions { shell } => {
            // A shell script, not text from the input: written as it is.
            clap_complete::generate(shell, &mut Args::command(), "hsmca", out.get_mut());
            Ok(0)
        }
        Command::Man { out: dir } => {
            let pages = man::write_pages(&dir)?;
            writeln!(
                out,
                "{} written to {}",
                hsmca::names::count(pages.len(), "man page", "man pages"),
                dir.display()
            )?;
            Ok(0)
        }
    }
}

/// The profiles named with `--allow-profile`.
fn allowed(names: Vec<String>) -> batch::Allowed {
    std::sync::Arc::new(names.into_iter().collect())
}

/// A reviewed plan is signed only under the hash its reviewers approved: the hash of its
/// items as they are now must be the one given with `--approve` (or typed at the terminal).
/// A plan edited after review, even with its own `hash` field recomputed, signs nothing.
fn approved(path: &Path, plan: &batch::Plan, approve: Option<&str>) -> Result<(), Error> {
    use hsmca::pinned::PinnedError::NotApproved;
    let actual = batch::Plan::content_hash(&plan.items);
    let given = match approve {
        Some(h) => h.trim().to_ascii_lowercase(),
        None if std::io::IsTerminal::is_terminal(&std::io::stdin()) => {
            eprint!(
                "{}: type the plan hash the reviewers approved: ",
                path.display()
            );
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim().to_ascii_lowercase()
        }
        None => {
            return Err(NotApproved(format!(
                "{}: no --approve HASH and no terminal to confirm on; nothing signed",
                path.display()
            ))
            .into());
        }
    };
    if given == actual {
        Ok(())
    } else {
        Err(NotApproved(format!(
            "{}: the plan's items hash to {actual}, not the approved {given:?}; it changed since review, or the wrong hash was given; nothing signed",
            path.display()
        ))
        .into())
    }
}

/// Opens the CA home's token with the PIN from the usual sources.
/// Reports a run's outcomes, then its stop if it stopped early (the stop's exit code), else 0
/// when every item got its certificate and 1 when some did not.
fn finish_outcomes(out: &mut impl Write, signed: sign::Signed, json: bool) -> Result<u8, Error> {
    report::outcomes(out, &signed.outcomes, json)?;
    if let Some(halt) = signed.halt {
        return Err(EngineError::Halt(halt).into());
    }
    Ok(if signed.outcomes.iter().all(Outcome::ok) {
        0
    } else {
        1
    })
}

fn open_home_token(home: &Home, opts: &TokenOpts) -> Result<Token, Error> {
    open_pinned_token(home, opts, &home_token_ref(home))
}

/// The CA home's own token.
fn home_token_ref(home: &Home) -> TokenRef {
    TokenRef {
        token: home.config.token.clone(),
        object: None,
        id: None,
    }
}

/// Hashes the module before anything loads it, and prints path and hash for the minutes.
fn hash_module(path: &Path) -> Result<hsmca::pinned::ModuleFile, Error> {
    let module = hsmca::pinned::ModuleFile::hash(path)?;
    eprintln!("module {} sha256 {}", module.path.display(), module.sha256);
    Ok(module)
}

/// Opens the token through the module the log pins. The module (from --module,
/// HSMCA_PKCS11_MODULE, hsmca.json or the defaults) is hashed first and refused, unloaded,
/// unless it is the pinned one or was named with --module; a module named that way is pinned
/// in the log once the login succeeded.
fn open_pinned_token(home: &Home, opts: &TokenOpts, tref: &TokenRef) -> Result<Token, Error> {
    let resolved = token::resolve_module(opts.module.as_deref(), home.config.module.as_deref())?;
    let module = hash_module(&resolved)?;
    let root = home.root()?;
    let (_, pinned) = log::verified_pins(&home.dir, Some(&root.der))?;
    let changed = module.check(pinned.as_ref(), opts.module.is_some())?;
    // The bytes just checked, copied and sealed before the PIN is asked for: what is loaded.
    let sealed = module.seal()?;
    let pin = pin::read(opts.pin_file.as_deref(), &tref.token)?;
    let token = Token::open(&sealed.path(), tref, &pin)?;
    drop(pin);
    if changed {
        let clock = SystemClock;
        let mut session = hsmca::engine::CaSession::open_unpinned(home, &token, &clock)?;
        session.append(vec![module.entry()])?;
        session.checkpoint()?;
        eprintln!("module change logged");
    }
    Ok(token)
}

/// Profiles to list or lint: the home's, or the shipped ones with the default site.
fn profile_set(home: Option<&Path>) -> Result<(Vec<(String, String)>, Site), Error> {
    match home {
        Some(dir) => {
            let home = Home::open(dir)?;
            let site = home.site()?;
            let names = hsmca::profile::list(&home.profiles_dir());
            let texts = names
                .into_iter()
                .map(|n| {
                    let path = home.profiles_dir().join(format!("{n}.json"));
                    std::fs::read_to_string(&path)
                        .map(|t| (n, t))
                        .map_err(hsmca::error::at(&path))
                })
                .collect::<Result<_, _>>()?;
            Ok((texts, site))
        }
        None => Ok((
            hsmca::home::SHIPPED_PROFILES
                .iter()
                .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
                .collect(),
            Site::default(),
        )),
    }
}

fn profiles(out: &mut impl Write, command: ProfilesCommand) -> Result<u8, Error> {
    match command {
        ProfilesCommand::List { home, json } => {
            let (set, site) = profile_set(home.as_deref())?;
            let mut loaded = Vec::new();
            for (name, text) in &set {
                loaded.push(Profile::parse(
                    text,
                    Path::new(&format!("{name}.json")),
                    name,
                    &site,
                )?);
            }
            report::profile_list(out, &loaded, json)?;
            Ok(0)
        }
        ProfilesCommand::Show { name, home } => {
            let (set, site) = profile_set(home.as_deref())?;
            let Some((_, text)) = set.iter().find(|(n, _)| *n == name) else {
                return Err(Error::Usage(format!(
                    "no profile named {name:?}; see `hsmca profiles list`"
                )));
            };
            let profile = Profile::parse(text, Path::new(&format!("{name}.json")), &name, &site)?;
            serde_json::to_writer_pretty(&mut *out, &profile)
                .map_err(|e| Error::Internal(e.to_string()))?;
            writeln!(out)?;
            Ok(0)
        }
        ProfilesCommand::Lint { files, home, json } => {
            let site = match &home {
                Some(dir) => Home::open(dir)?.site()?,
                None => Site::default(),
            };
            let mut results = Vec::new();
            if files.is_empty() {
                let (set, site) = profile_set(home.as_deref())?;
                for (name, text) in set {
                    let r = Profile::parse(&text, Path::new(&format!("{name}.json")), &name, &site);
                    results.push((format!("{name}.json"), r.err().map(|e| e.to_string())));
                }
            } else {
                for f in files {
                    results.push((
                        f.display().to_string(),
                        Profile::load(&f, &site).err().map(|e| e.to_string()),
                    ));
                }
            }
            report::lint(out, &results, json)?;
            Ok(if results.iter().all(|(_, e)| e.is_none()) {
                0
            } else {
                2
            })
        }
        ProfilesCommand::Apply {
            home,
            token_opts,
            json,
        } => {
            let home = Home::open(&home)?;
            // Every profile must load before the PIN is asked for.
            hsmca::pinned::policy_entry(&home.dir)?;
            let token = open_home_token(&home, &token_opts)?;
            // The change is shown before it is logged; on a terminal the operator confirms it.
            let mut confirm = |a: &ceremony::Applied| -> Result<bool, Error> {
                let mut err = std::io::stderr().lock();
                writeln!(err, "the new policy (SHA-256 {}) changes:", a.policy_sha256)?;
                for c in &a.changes {
                    writeln!(err, "  {}", report::safe(c))?;
                }
                if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                    return Ok(true);
                }
                write!(err, "log this policy? [y/N] ")?;
                err.flush()?;
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
            };
            let applied = ceremony::apply(&home, &token, &SystemClock, &mut confirm)?;
            report::applied(out, &applied, json)?;
            Ok(0)
        }
        ProfilesCommand::ImportCfssl {
            config,
            out: dir,
            json,
        } => {
            let text = std::fs::read_to_string(&config)?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Usage(format!("{}: not JSON: {e}", config.display())))?;
            let imported = hsmca::cfssl::import(&value)
                .map_err(|e| Error::Usage(format!("{}: {e}", config.display())))?;
            for p in &imported {
                let bytes = serde_json::to_vec_pretty(&p.profile)
                    .map_err(|e| Error::Internal(e.to_string()))?;
                hsmca::files::write_new(&dir.join(format!("{}.json", p.name)), &bytes)?;
            }
            report::imported(out, &dir, &imported, json)?;
            Ok(0)
        }
    }
}
