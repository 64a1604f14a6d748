//! Batch ceremonies: a directory of CSRs (with a manifest, one profile for all, or kubeadm's
//! `generate-csr` layout), planned without the token, reviewed, then signed in one sitting.
//!
//! Planning parses, verifies and decides every CSR in parallel and writes a plan with a
//! content hash. Signing refuses a plan whose inputs changed and logs the plan's hash (or, for
//! `sign-dir INPUT`, decides each chunk as it goes and logs the hash at the end). Then a
//! pipeline, in chunks: while the token sessions sign one chunk, the next is decided and its
//! TBSs built on every core; one append (one fsync) commits the finished chunk's results with
//! the next chunk's intents, one checkpoint follows, and only then are the finished chunk's
//! files written. Sessions only sign; verifier threads check each certificate before its
//! result is logged. A refused CSR never stops the rest, and a rerun writes out what the log
//! already holds instead of issuing it again.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, rfc3339};
use crate::error::Error;
use crate::files;
use crate::home::{self, Home};
use crate::issue::{self, IssuerCert};
use crate::keys;
use crate::log::Body;
use crate::policy::{self, Context, Refusal};
use crate::profile::{Duration, Profile};
use crate::signer::CaSigner;
use crate::token::Token;

/// How many CSRs are committed together (one fsync for the intents, one for the results, one
/// checkpoint). Bounds memory: only one chunk's certificates are held at a time.
pub const CHUNK: usize = 512;

/// How many certificates a token session takes from its queue at a time.
const JOB: usize = 16;

/// kubeadm `certs generate-csr` file names (relative to the input root) and their profiles.
pub const KUBEADM: [(&str, &str); 12] = [
    ("pki/apiserver.csr", "apiserver"),
    (
        "pki/apiserver-kubelet-client.csr",
        "apiserver-kubelet-client",
    ),
    ("pki/front-proxy-client.csr", "front-proxy-client"),
    ("pki/apiserver-etcd-client.csr", "apiserver-etcd-client"),
    ("pki/etcd/server.csr", "etcd-server"),
    ("pki/etcd/peer.csr", "etcd-peer"),
    ("pki/etcd/healthcheck-client.csr", "etcd-healthcheck-client"),
    ("admin.conf.csr", "admin"),
    ("super-admin.conf.csr", "super-admin"),
    ("kubelet.conf.csr", "kubelet-client"),
    ("controller-manager.conf.csr", "controller-manager"),
    ("scheduler.conf.csr", "scheduler"),
];

/// Where kubeadm expects each CA certificate when the CA key is kept outside (external CA).
const KUBEADM_CAS: [(&str, &str); 3] = [
    ("kubernetes-ca", "pki/ca.crt"),
    ("etcd-ca", "pki/etcd/ca.crt"),
    ("front-proxy-ca", "pki/front-proxy-ca.crt"),
];

/// A manifest entry: which profile (and validity) a file is signed under.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, untagged)]
pub enum ManifestEntry {
    /// Just the profile name.
    Profile(String),
    /// Profile and validity.
    Full {
        /// Profile name.
        profile: String,
        /// Validity, e.g. `90d`.
        #[serde(default)]
        validity: Option<String>,
    },
}

/// One CSR of a batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Item {
    /// Path relative to the input root.
    pub file: String,
    /// SHA-256 of the file when planned.
    pub sha256: String,
    /// Profile.
    pub profile: String,
    /// Validity asked for by the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_validity: Option<String>,
    /// Output path relative to the output directory.
    pub out: String,
    /// What would happen.
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// The planned outcome of one CSR.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// Would be issued as described.
    Issue {
        /// Subject.
        subject: String,
        /// SANs.
        sans: Vec<String>,
        /// Usages (keyUsage then extKeyUsage).
        usages: Vec<String>,
        /// Validity.
        validity: String,
        /// Issuing CA.
        issuer: String,
    },
    /// Refused by the profile.
    Refuse {
        /// Every violated rule.
        refusals: Vec<Refusal>,
    },
    /// Not to be signed (a Kubernetes object not approved, denied, failed or already issued).
    Skip {
        /// Why.
        reason: String,
    },
    /// Not a usable CSR.
    Fail {
        /// Rule id.
        rule: String,
        /// What is wrong.
        error: String,
    },
}

/// A reviewed plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Format version.
    pub version: u32,
    /// The input root, as given.
    pub input: PathBuf,
    /// Whether kubeadm's layout was recognised.
    pub kubeadm: bool,
    /// Whether the input is `kubectl get csr -o json` output.
    #[serde(default)]
    pub kubernetes: bool,
    /// When it was made.
    pub created: String,
    /// Every CSR.
    pub items: Vec<Item>,
    /// SHA-256 of the JSON of `items`: what the operators reviewed.
    pub hash: String,
    /// Made by this process moments ago, not read from a file: nothing to check up front
    /// (each CSR is still checked against its digest as it is read for signing).
    #[serde(skip)]
    planned_here: bool,
}

impl Plan {
    /// The hash of the items, recomputed.
    pub fn content_hash(items: &[Item]) -> String {
        // Streamed into the digest: a plan of 100,000 CSRs is tens of megabytes of JSON.
        struct Digest(ring::digest::Context);
        impl Write for Digest {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.update(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut d = Digest(ring::digest::Context::new(&ring::digest::SHA256));
        let _ = serde_json::to_writer(&mut d, items);
        keys::hex(d.0.finish().as_ref())
    }
}

/// A CSR found in the input. Held for every CSR of a batch, so kept small: the profile name
/// is shared, and the output name is stored only where it is not the input's with `.crt`.
#[derive(Debug)]
struct Found {
    /// Path relative to the input root.
    file: String,
    /// Profile.
    profile: std::sync::Arc<str>,
    /// Validity asked for by the manifest.
    validity: Option<String>,
    /// Output path relative to the output directory, if not [`crt`] of `file`.
    out: Option<String>,
}

impl Found {
    /// The plan item for this CSR, with the verdict `decide` gives over the file's bytes (or a
    /// `csr.read` failure).
    fn item<R>(
        &self,
        root: &Path,
        decide: impl FnOnce(&Item, &[u8]) -> (Verdict, Option<R>),
    ) -> (Item, Option<R>) {
        let mut item = Item {
            file: self.file.clone(),
            sha256: String::new(),
            profile: self.profile.to_string(),
            requested_validity: self.validity.clone(),
            out: self.out.clone().unwrap_or_else(|| crt(&self.file)),
            verdict: Verdict::Skip {
                reason: String::new(),
            },
        };
        let (verdict, r) = match std::fs::read(root.join(&self.file)) {
            Ok(bytes) => {
                item.sha256 = keys::sha256_hex(&bytes);
                decide(&item, &bytes)
            }
            Err(e) => {
                let (rule, error) = ("csr.read".into(), e.to_string());
                (Verdict::Fail { rule, error }, None)
            }
        };
        item.verdict = verdict;
        (item, r)
    }
}

/// The default output name: the input's with `.crt` for `.csr`/`.req`.
fn crt(rel: &str) -> String {
    let stem = rel
        .strip_suffix(".csr")
        .or_else(|| rel.strip_suffix(".req"))
        .unwrap_or(rel);
    format!("{stem}.crt")
}

/// Finds the CSRs under `root`: from the manifest, kubeadm's layout, or every `*.csr`/`*.req`
/// with one `profile`. Returns (relative file, profile, validity, relative output).
fn discover(
    root: &Path,
    profile: Option<&str>,
    manifest: Option<&Path>,
) -> Result<(Vec<Found>, bool), Error> {
    if let Some(path) = manifest {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
        let map: BTreeMap<String, ManifestEntry> = serde_json::from_str(&text)
            .map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
        let items = map
            .into_iter()
            .map(|(file, e)| {
                let (p, validity) = match e {
                    ManifestEntry::Profile(p) => (p, None),
                    ManifestEntry::Full { profile, validity } => (profile, validity),
                };
                Found {
                    file,
                    profile: p.into(),
                    validity,
                    out: None,
                }
            })
            .collect();
        return Ok((items, false));
    }
    let kubeadm: Vec<_> = KUBEADM
        .iter()
        .filter(|(f, _)| root.join(f).is_file())
        .collect();
    if profile.is_none() && !kubeadm.is_empty() {
        let items = kubeadm
            .iter()
            .map(|(f, p)| Found {
                file: (*f).to_owned(),
                profile: (*p).into(),
                validity: None,
                out: f
                    .strip_suffix(".conf.csr")
                    .map(|base| format!("{base}.conf")),
            })
            .collect();
        return Ok((items, true));
    }
    let Some(profile) = profile else {
        return Err(Error::Usage(format!(
            "{}: not kubeadm's generate-csr layout; give --profile for all CSRs or --manifest FILE",
            root.display()
        )));
    };
    let mut files = Vec::new();
    walk(root, root, &mut files)?;
    files.sort();
    let profile: std::sync::Arc<str> = profile.into();
    Ok((
        files
            .into_iter()
            .map(|file| Found {
                file,
                profile: profile.clone(),
                validity: None,
                out: None,
            })
            .collect(),
        false,
    ))
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), Error> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::Usage(format!("{}: {e}", dir.display())))?;
    for e in entries {
        let path = e?.path();
        if path.is_dir() {
            walk(root, &path, out)?;
        } else if path.extension().is_some_and(|x| x == "csr" || x == "req") {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            out.push(rel);
        }
    }
    Ok(())
}

/// Where a plan's CSRs come from: files under a directory, or Kubernetes objects in one JSON
/// file (read once).
enum Inputs {
    Dir(PathBuf),
    Objects(BTreeMap<String, crate::k8s::CsrObject>),
}

impl Inputs {
    fn load(plan: &Plan) -> Result<Self, Error> {
        if !plan.kubernetes {
            return Ok(Self::Dir(plan.input.clone()));
        }
        let text = std::fs::read_to_string(&plan.input)?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Usage(format!("{}: {e}", plan.input.display())))?;
        let objects = crate::k8s::objects(&json)
            .map_err(|e| Error::Usage(format!("{}: {e}", plan.input.display())))?;
        Ok(Self::Objects(
            objects.into_iter().map(|o| (o.name.clone(), o)).collect(),
        ))
    }

    /// The CSR of `item` and the digest the plan's `sha256` covers: the file's, or the whole
    /// object's.
    fn read(&self, item: &Item) -> std::io::Result<(Vec<u8>, String)> {
        match self {
            Self::Dir(root) => std::fs::read(root.join(&item.file)).map(|b| {
                let digest = keys::sha256_hex(&b);
                (b, digest)
            }),
            Self::Objects(map) => map
                .get(&item.file)
                .map(|o| (o.request.clone(), object_digest(o)))
                .ok_or_else(|| std::io::Error::other(format!("no object {:?}", item.file))),
        }
    }
}

fn object_digest(o: &crate::k8s::CsrObject) -> String {
    keys::sha256_hex(&serde_json::to_vec(&o.raw).unwrap_or_default())
}

/// `plan` for `kubectl get csr -o json` output: only approved, unissued objects; the profile
/// from the signer (or the manifest, signerName → profile); the signer's own rules first.
fn plan_objects(
    home: &Home,
    input: &Path,
    manifest: Option<&Path>,
    clock: &dyn Clock,
) -> Result<Plan, Error> {
    let inputs = Inputs::load(&Plan {
        version: 1,
        input: input.to_path_buf(),
        kubeadm: false,
        kubernetes: true,
        created: String::new(),
        items: Vec::new(),
        hash: String::new(),
        planned_here: true,
    })?;
    let Inputs::Objects(objects) = &inputs else {
        return Err(Error::Internal("not objects".into()));
    };
    let map: BTreeMap<String, String> = match manifest {
        Some(path) => {
            let text = std::fs::read_to_string(path)?;
            serde_json::from_str(&text).map_err(|e| {
                Error::Usage(format!("{}: signerName → profile map: {e}", path.display()))
            })?
        }
        None => BTreeMap::new(),
    };
    let now = clock.now();
    let mut items = Vec::new();
    for obj in objects.values() {
        let mut item = Item {
            file: obj.name.clone(),
            sha256: object_digest(obj),
            profile: String::new(),
            requested_validity: None,
            out: format!("{}.status.json", obj.name),
            verdict: Verdict::Skip {
                reason: String::new(),
            },
        };
        if let Some(reason) = &obj.skip {
            item.verdict = Verdict::Skip {
                reason: reason.clone(),
            };
            items.push(item);
            continue;
        }
        let cn = crate::csr::parse(&obj.request).ok().and_then(|c| {
            c.subject
                .iter()
                .find(|(a, _)| *a == crate::csr::AttrType::Cn)
                .map(|(_, v)| v.clone())
        });
        let profile_name = match crate::k8s::profile_for(obj, cn.as_deref(), &map) {
            Ok(p) => p,
            Err(r) => {
                item.verdict = Verdict::Refuse { refusals: vec![r] };
                items.push(item);
                continue;
            }
        };
        item.profile = profile_name.clone();
        let loaded = home
            .profile(&profile_name)
            .and_then(|p| Ok((home.issuer(&p.issuer)?.0, p)));
        let (issuer, profile) = match loaded {
            Ok(x) => x,
            Err(e) => {
                item.verdict = Verdict::Fail {
                    rule: "profile".into(),
                    error: e.to_string(),
                };
                items.push(item);
                continue;
            }
        };
        let (mut refusals, validity) =
            crate::k8s::signer_rules(obj, cn.as_deref(), profile.validity.max.0);
        item.requested_validity = validity.map(|s| format!("{s}s"));
        let (verdict, _) = judge(
            &profile,
            &issuer,
            &obj.request,
            item.requested_validity.as_deref(),
            now,
            vec![0; 16],
            true,
        );
        item.verdict = match verdict {
            Verdict::Refuse { refusals: more } => {
                refusals.extend(more);
                Verdict::Refuse { refusals }
            }
            other if refusals.is_empty() => other,
            _ => Verdict::Refuse { refusals },
        };
        items.push(item);
    }
    let hash = Plan::content_hash(&items);
    Ok(Plan {
        version: 1,
        input: input.to_path_buf(),
        kubeadm: false,
        kubernetes: true,
        created: rfc3339(now),
        items,
        hash,
        planned_here: true,
    })
}

/// Runs `f` over `items` on every core, keeping order.
fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Result<Vec<R>, Error> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(items.len().max(1));
    let size = items.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles = items
            .chunks(size)
            .map(|chunk| {
                std::thread::Builder::new()
                    .name("hsmca-decide".into())
                    .spawn_scoped(scope, || chunk.iter().map(&f).collect::<Vec<R>>())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            out.extend(
                h.join()
                    .map_err(|_| Error::Internal("a worker thread panicked".into()))?,
            );
        }
        Ok(out)
    })
}

/// `hsmca plan`: decides every CSR under `input` without the token, keeping what the review
/// table shows (subject, SANs, usages, validity, issuer) in each `issue` verdict.
pub fn plan(
    home: &Home,
    input: &Path,
    profile: Option<&str>,
    manifest: Option<&Path>,
    clock: &dyn Clock,
) -> Result<Plan, Error> {
    if input.is_file() {
        return plan_objects(home, input, manifest, clock);
    }
    let (found, kubeadm) = discover(input, profile, manifest)?;
    let mut profiles: BTreeMap<String, Result<(Profile, IssuerCert), String>> = BTreeMap::new();
    for f in &found {
        let p = &*f.profile;
        if !profiles.contains_key(p) {
            let loaded = home
                .profile(p)
                .and_then(|prof| Ok((home.issuer(&prof.issuer)?.0, prof)));
            profiles.insert(
                p.to_owned(),
                loaded.map(|(i, p)| (p, i)).map_err(|e| e.to_string()),
            );
        }
    }
    let now = clock.now();
    let items = parallel(&found, |f| {
        let decide = |item: &Item, bytes: &[u8]| {
            let verdict = match profiles.get(&item.profile) {
                Some(Err(e)) => Verdict::Fail {
                    rule: "profile".into(),
                    error: e.clone(),
                },
                None => Verdict::Fail {
                    rule: "profile".into(),
                    error: format!("no profile {:?}", item.profile),
                },
                Some(Ok((profile, issuer))) => {
                    let validity = item.requested_validity.as_deref();
                    judge(profile, issuer, bytes, validity, now, vec![0; 16], true).0
                }
            };
            (verdict, None::<()>)
        };
        f.item(input, decide).0
    })?;
    let hash = Plan::content_hash(&items);
    Ok(Plan {
        version: 1,
        input: input.to_path_buf(),
        kubeadm,
        kubernetes: false,
        created: rfc3339(now),
        items,
        hash,
        planned_here: true,
    })
}

/// Parses, verifies and decides one CSR. Returns the verdict and, if issued, the decision.
fn judge(
    profile: &Profile,
    issuer: &IssuerCert,
    bytes: &[u8],
    validity: Option<&str>,
    now: time::OffsetDateTime,
    serial: Vec<u8>,
    detail: bool,
) -> (Verdict, Option<(policy::Decision, String)>) {
    let requested = match validity.map(|v| Duration::parse(v).ok_or(v)) {
        Some(Err(v)) => {
            return (
                Verdict::Fail {
                    rule: "validity".into(),
                    error: format!("{v:?} is not a duration"),
                },
                None,
            );
        }
        Some(Ok(d)) => Some(d),
        None => None,
    };
    let csr = match crate::csr::parse(bytes) {
        Ok(c) => c,
        Err(e) => {
            return (
                Verdict::Fail {
                    rule: e.rule().into(),
                    error: e.to_string(),
                },
                None,
            );
        }
    };
    let ctx = Context {
        now,
        serial,
        requested_validity: requested,
        issuer_not_after: issuer.not_after,
    };
    match policy::decide(profile, &csr, &ctx) {
        Err(refusals) => (Verdict::Refuse { refusals }, None),
        Ok(d) => {
            if !detail {
                let verdict = Verdict::Issue {
                    subject: String::new(),
                    sans: Vec::new(),
                    usages: Vec::new(),
                    validity: String::new(),
                    issuer: String::new(),
                };
                return (verdict, Some((d, csr.sha256)));
            }
            let usages = d
                .key_usage
                .iter()
                .map(|u| u.name().to_owned())
                .chain(d.extended_key_usage.iter().map(|e| e.name().to_owned()))
                .collect();
            let verdict = Verdict::Issue {
                subject: d.subject_string(),
                sans: d.san_strings(),
                usages,
                validity: Duration(u64::try_from((d.not_after - now).whole_seconds()).unwrap_or(0))
                    .to_string(),
                issuer: profile.issuer.clone(),
            };
            (verdict, Some((d, csr.sha256)))
        }
    }
}

/// What happened to one CSR in `sign-dir`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Done {
    /// Issued now, or written again from the log.
    Issued {
        /// Input file.
        file: String,
        /// Serial, hex.
        serial: String,
        /// Output file.
        out: PathBuf,
        /// Issued by an earlier run.
        already_issued: bool,
    },
    /// Refused (rule and value).
    Refused {
        /// Input file.
        file: String,
        /// Every violated rule.
        refusals: Vec<Refusal>,
    },
    /// Not to be signed.
    Skipped {
        /// Input (object name).
        file: String,
        /// Why.
        reason: String,
    },
    /// Unusable CSR, or a signing failure.
    Failed {
        /// Input file.
        file: String,
        /// Rule id.
        rule: String,
        /// What went wrong.
        error: String,
    },
}

/// The `sign-dir` report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The plan's hash (also in the log).
    pub plan: String,
    /// CSRs handled (each was passed to the caller as it was done).
    pub handled: usize,
    /// Issued now.
    pub issued: usize,
    /// Written again from the log.
    pub reissued_files: usize,
    /// Refused or failed.
    pub refused: usize,
    /// Wall time of signing, seconds.
    pub seconds: f64,
    /// For Kubernetes objects: the commands that upload each signed object's status.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
}

struct Progress {
    start: Instant,
    total: usize,
    terminal: bool,
}

impl Progress {
    fn show(&self, done: usize, issued: usize, refused: usize) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let line = format!(
            "{done}/{} CSRs, {issued} issued, {refused} refused, {:.0}/s",
            self.total,
            done as f64 / secs
        );
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let width = 30;
            let filled = (done * width).checked_div(self.total).unwrap_or(width);
            let _ = write!(
                err,
                "\r[{}{}] {line}",
                "#".repeat(filled),
                " ".repeat(width - filled)
            );
            if done == self.total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
    }
}

/// `hsmca sign-dir --plan`: signs exactly `plan` (refusing if any input changed since
/// planning) into `out`, on `sessions` token sessions.
pub fn sign(
    home: &Home,
    plan: &Plan,
    out: &Path,
    token: &Token,
    sessions: usize,
    clock: &dyn Clock,
    on_done: &mut dyn FnMut(&Done) -> std::io::Result<()>,
) -> Result<Report, Error> {
    if Plan::content_hash(&plan.items) != plan.hash {
        return Err(Error::Usage(
            "the plan was edited after it was made (its hash does not match its items)".into(),
        ));
    }
    let inputs = Inputs::load(plan)?;
    // A reviewed plan is refused as a whole if any input changed since the review, before
    // anything is signed. (Each CSR is checked again as it is read for signing.)
    if !plan.planned_here {
        for item in &plan.items {
            if matches!(item.verdict, Verdict::Issue { .. })
                && inputs.read(item).map(|(_, d)| d).unwrap_or_default() != item.sha256
            {
                return Err(Error::Usage(format!(
                    "{}: changed since planning; plan again and review",
                    item.file
                )));
            }
        }
    }
    let profiles = plan
        .items
        .iter()
        .filter(|i| matches!(i.verdict, Verdict::Issue { .. }))
        .map(|i| i.profile.as_str());
    let batch = Batch {
        input: &plan.input,
        kubeadm: plan.kubeadm,
        kubernetes: plan.kubernetes,
        inputs: &inputs,
        source: Source::Plan(plan),
    };
    run(home, &batch, profiles, out, token, sessions, clock, on_done)
}

/// `hsmca sign-dir INPUT`: decides and signs in one go, chunk by chunk, for scripts. Nobody
/// reviews this plan, so it is never held whole: each chunk's CSRs are read, verified and
/// decided once, while the previous chunk is being signed, and the plan's hash (over the same
/// items a plan file would hold, without the review columns) is logged after the last
/// certificate.
#[allow(
    clippy::too_many_arguments,
    reason = "the sign-dir command line, passed through"
)]
pub fn sign_input(
    home: &Home,
    input: &Path,
    profile: Option<&str>,
    manifest: Option<&Path>,
    out: &Path,
    token: &Token,
    sessions: usize,
    clock: &dyn Clock,
    on_done: &mut dyn FnMut(&Done) -> std::io::Result<()>,
) -> Result<Report, Error> {
    if input.is_file() {
        // Kubernetes objects: one small JSON file, planned whole.
        let plan = plan_objects(home, input, manifest, clock)?;
        return sign(home, &plan, out, token, sessions, clock, on_done);
    }
    let (found, kubeadm) = discover(input, profile, manifest)?;
    let inputs = Inputs::Dir(input.to_path_buf());
    let batch = Batch {
        input,
        kubeadm,
        kubernetes: false,
        inputs: &inputs,
        source: Source::Found(&found),
    };
    let profiles = found.iter().map(|f| &*f.profile);
    run(home, &batch, profiles, out, token, sessions, clock, on_done)
}

/// What a `sign-dir` run signs.
struct Batch<'a> {
    input: &'a Path,
    kubeadm: bool,
    kubernetes: bool,
    inputs: &'a Inputs,
    source: Source<'a>,
}

/// Where a run's chunks come from.
enum Source<'a> {
    /// A plan decided before signing: its hash is logged before the first certificate.
    Plan(&'a Plan),
    /// Files found under the input, decided chunk by chunk as they are signed.
    Found(&'a [Found]),
}

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Plan(p) => p.items.len(),
            Self::Found(f) => f.len(),
        }
    }
}

/// The plan hash of [`Plan::content_hash`], computed one item at a time.
struct PlanHasher {
    digest: ring::digest::Context,
    items: usize,
    to_issue: u64,
}

impl PlanHasher {
    fn new() -> Self {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        digest.update(b"[");
        Self {
            digest,
            items: 0,
            to_issue: 0,
        }
    }

    fn push(&mut self, item: &Item) {
        if self.items > 0 {
            self.digest.update(b",");
        }
        self.items += 1;
        if matches!(item.verdict, Verdict::Issue { .. }) {
            self.to_issue += 1;
        }
        if let Ok(json) = serde_json::to_vec(item) {
            self.digest.update(&json);
        }
    }

    fn finish(mut self) -> (String, u64) {
        self.digest.update(b"]");
        (keys::hex(self.digest.finish().as_ref()), self.to_issue)
    }
}

/// The signing pipeline shared by both forms of `sign-dir`.
#[allow(
    clippy::too_many_arguments,
    reason = "one private function behind the two entry points"
)]
fn run<'a>(
    home: &Home,
    batch: &Batch<'_>,
    profile_names: impl Iterator<Item = &'a str>,
    out: &Path,
    token: &Token,
    sessions: usize,
    clock: &dyn Clock,
    on_done: &mut dyn FnMut(&Done) -> std::io::Result<()>,
) -> Result<Report, Error> {
    let start = Instant::now();
    let log_key = token.key(&home.config.log_key.label)?;
    let (mut log, note_key) = home::open_log(home, &log_key, clock)?;
    if let Source::Plan(plan) = batch.source {
        let to_issue = plan
            .items
            .iter()
            .filter(|i| matches!(i.verdict, Verdict::Issue { .. }))
            .count() as u64;
        log.append(
            vec![Body::Plan {
                plan_sha256: plan.hash.clone(),
                to_issue,
            }],
            clock.now(),
        )?;
    }

    // Every profile and issuer of the batch, and one set of token sessions per issuer, up
    // front. A profile that cannot be loaded fails its CSRs, not the batch.
    let mut issuers: BTreeMap<String, (Profile, IssuerCert)> = BTreeMap::new();
    let mut unusable: BTreeMap<String, String> = BTreeMap::new();
    let mut workers: BTreeMap<String, Vec<crate::token::WorkerKey>> = BTreeMap::new();
    for name in profile_names {
        if issuers.contains_key(name) || unusable.contains_key(name) {
            continue;
        }
        let loaded = home
            .profile(name)
            .and_then(|p| Ok((home.issuer(&p.issuer)?, p)));
        let ((cert, label), profile) = match (loaded, &batch.source) {
            (Ok(x), _) => x,
            (Err(e), Source::Found(_)) => {
                unusable.insert(name.to_owned(), e.to_string());
                continue;
            }
            (Err(e), Source::Plan(_)) => return Err(e),
        };
        if !workers.contains_key(&profile.issuer) {
            token.key_matching(&label, &cert.public_key)?;
            workers.insert(
                profile.issuer.clone(),
                token.workers(&label, &cert.public_key, sessions.max(1))?,
            );
        }
        issuers.insert(name.to_owned(), (profile, cert));
    }
    // Outcomes go to the caller as each chunk completes, not into a list: a batch of any size
    // holds at most three chunks at a time.
    let mut commands = Vec::new();
    let progress = Progress {
        start,
        total: batch.source.len(),
        terminal: std::io::stderr().is_terminal(),
    };
    let mut tally = Tally::default();
    // Bounded: if files are written slower than certificates are signed, signing waits
    // instead of holding ever more certificates in memory.
    let (writer, queue) = std::sync::mpsc::sync_channel::<Vec<(PathBuf, Vec<u8>)>>(2);
    let write_thread = std::thread::Builder::new()
        .name("hsmca-write".into())
        .spawn(move || {
            let mut failed = Vec::new();
            for outputs in queue {
                for ((path, _), written) in outputs.iter().zip(files::write_new_all(&outputs)) {
                    if let Err(e) = written {
                        failed.push((path.clone(), e.to_string()));
                    }
                }
            }
            failed
        })?;
    let chunks = batch.source.len().div_ceil(CHUNK);
    let mut seen = std::collections::HashSet::new();
    let mut hasher = PlanHasher::new();
    let ctx = StageCtx {
        inputs: batch.inputs,
        token,
        issuers: &issuers,
        unusable: &unusable,
        out,
        clock,
    };
    std::thread::scope(|scope| -> Result<(), Error> {
        // One long-lived thread per token session, fed from one queue per issuer: a session
        // never waits for a chunk boundary, only for work.
        let (results_tx, results) = std::sync::mpsc::channel::<SignResult>();
        let (signed_tx, signed) = std::sync::mpsc::channel::<Signed>();
        let signed = std::sync::Arc::new(std::sync::Mutex::new(signed));
        for _ in 0..std::thread::available_parallelism().map_or(2, |n| n.get()) {
            let (signed, results_tx, issuers) = (signed.clone(), results_tx.clone(), &issuers);
            std::thread::Builder::new()
                .name("hsmca-verify".into())
                .spawn_scoped(scope, move || verify_worker(&signed, &results_tx, issuers))?;
        }
        drop(results_tx);
        let mut queues = BTreeMap::new();
        for (issuer_name, keys) in &mut workers {
            let (jobs_tx, jobs) = std::sync::mpsc::channel::<Job>();
            let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
            for key in keys.iter_mut() {
                let (jobs, signed_tx) = (jobs.clone(), signed_tx.clone());
                // Each session moves to its own thread (sessions are Send, not Sync).
                std::thread::Builder::new()
                    .name("hsmca-sign".into())
                    .spawn_scoped(scope, move || {
                        sign_worker(&*key, &jobs, &signed_tx);
                    })?;
            }
            queues.insert(issuer_name.clone(), jobs_tx);
        }
        drop(signed_tx);
        let mut in_flight: std::collections::VecDeque<InFlight> = Default::default();
        for k in 0..=chunks {
            // Stage the next chunk while the sessions sign what is in flight.
            let range = k * CHUNK..((k + 1) * CHUNK).min(batch.source.len());
            let staged = match (&batch.source, k < chunks) {
                (_, false) => None,
                (Source::Plan(plan), true) => Some(stage(
                    &ctx,
                    &log,
                    range.start,
                    &plan.items[range],
                    &mut seen,
                )?),
                (Source::Found(found), true) => Some(stage_found(
                    &ctx,
                    &log,
                    batch.input,
                    range.start,
                    &found[range],
                    &mut seen,
                    &mut hasher,
                )?),
            };
            // Collect every chunk in flight but the newest, which keeps the token busy while
            // these results are committed (at the end, collect all).
            let keep = usize::from(staged.is_some());
            while let Ok(r) = results.try_recv() {
                InFlight::place(&mut in_flight, r);
            }
            let must_finish = in_flight.len().saturating_sub(keep);
            while in_flight.iter().take(must_finish).any(|c| c.remaining > 0) {
                let r = results
                    .recv()
                    .map_err(|_| Error::Internal("every token session stopped".into()))?;
                InFlight::place(&mut in_flight, r);
            }
            let mut finished = Vec::new();
            while in_flight.front().is_some_and(|c| c.remaining == 0) {
                finished.extend(in_flight.pop_front());
            }
            // One append (one fsync) for the finished chunks' results and the next chunk's
            // intents; one checkpoint; only then may the finished chunks' files appear.
            let mut bodies = Vec::new();
            for chunk in &mut finished {
                bodies.extend(chunk.results(out, &mut tally));
            }
            let results_len = bodies.len();
            if let Some(s) = &staged {
                bodies.extend(s.ready.iter().map(Ready::intent));
            }
            let seqs = if bodies.is_empty() {
                Vec::new()
            } else {
                log.append(bodies, clock.now())?
            };
            if results_len > 0 {
                home::danger_crash_point("after-cert");
            }
            if seqs.len() > results_len {
                home::danger_crash_point("after-intent");
            }
            if results_len > 0 {
                log.checkpoint(&note_key)?;
                home::danger_crash_point("after-checkpoint");
            }
            for chunk in finished {
                let outputs = chunk
                    .release
                    .iter()
                    .map(|(path, der, file, profile)| {
                        let issuer = issuers
                            .get(profile)
                            .map_or("root", |(p, _)| p.issuer.as_str());
                        let bytes = output_bytes(home, batch, file, issuer, path, der);
                        (path.clone(), bytes)
                    })
                    .collect();
                if writer.send(outputs).is_err() {
                    return Err(Error::Internal("the output writer stopped".into()));
                }
                for d in chunk.done.into_values() {
                    if matches!(d, Done::Refused { .. } | Done::Failed { .. }) {
                        tally.refused += 1;
                    }
                    if let (true, Done::Issued { file, out, .. }) = (batch.kubernetes, &d) {
                        commands.push(crate::k8s::replace_command(
                            file,
                            &out.display().to_string(),
                        ));
                    }
                    tally.handled += 1;
                    on_done(&d)?;
                }
                progress.show(tally.handled, tally.issued + tally.reissued, tally.refused);
            }
            // The staged chunk's intents are durable: the sessions may sign it.
            if let Some(s) = staged {
                tally.reissued += s.reissued;
                let ready = std::sync::Arc::new(s.ready);
                // Handed out a few at a time: one queue operation per certificate was a
                // measurable share of the host's work.
                let mut by_issuer: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
                for (pos, r) in ready.iter().enumerate() {
                    let issuer = issuers
                        .get(&r.item.profile)
                        .map_or("", |(p, _)| p.issuer.as_str());
                    by_issuer.entry(issuer).or_default().push(pos);
                }
                for (issuer, positions) in by_issuer {
                    let queue = queues.get(issuer).ok_or_else(|| {
                        Error::Internal(format!("no token session for issuer {issuer:?}"))
                    })?;
                    for run in positions.chunks(JOB) {
                        if queue.send((k, run.to_vec(), ready.clone())).is_err() {
                            return Err(Error::Internal("every token session stopped".into()));
                        }
                    }
                }
                in_flight.push_back(InFlight {
                    id: k,
                    remaining: ready.len(),
                    signed: (0..ready.len()).map(|_| None).collect(),
                    intent_seqs: seqs[results_len..].to_vec(),
                    ready,
                    done: s.done,
                    release: s.release,
                });
            }
        }
        Ok(())
    })?;
    let Tally {
        handled,
        issued,
        reissued,
        mut refused,
    } = tally;
    // A plan decided while signing is logged once it is complete.
    let hash = match batch.source {
        Source::Plan(plan) => plan.hash.clone(),
        Source::Found(_) => {
            let (plan_sha256, to_issue) = hasher.finish();
            log.append(
                vec![Body::Plan {
                    plan_sha256: plan_sha256.clone(),
                    to_issue,
                }],
                clock.now(),
            )?;
            log.checkpoint(&note_key)?;
            plan_sha256
        }
    };
    drop(writer);
    let failed = write_thread
        .join()
        .map_err(|_| Error::Internal("the output writer panicked".into()))?;
    // A file that could not be written is reported again, as failed: its certificate is in
    // the log, and a rerun with another --out writes it.
    for (path, error) in failed {
        on_done(&Done::Failed {
            file: path.display().to_string(),
            rule: "output.write".into(),
            error: format!("issued and logged, but {error}"),
        })?;
        refused += 1;
    }
    if batch.kubeadm {
        for (ca, rel) in KUBEADM_CAS {
            if let Ok((cert, _)) = home.issuer(ca) {
                files::write_new(
                    &out.join(rel),
                    home::pem("CERTIFICATE", &cert.der).as_bytes(),
                )?;
            }
        }
    }
    if batch.kubernetes && !commands.is_empty() {
        let script = format!(
            "#!/bin/sh\n# Uploads each signed CertificateSigningRequest's status.\nset -e\n{}\n",
            commands.join("\n")
        );
        files::replace(&out.join("apply-status.sh"), script.as_bytes())?;
    }
    Ok(Report {
        plan: hash,
        handled,
        issued,
        reissued_files: reissued,
        refused,
        seconds: start.elapsed().as_secs_f64(),
        commands,
    })
}

/// What every stage of a `sign-dir` run shares.
struct StageCtx<'a> {
    inputs: &'a Inputs,
    token: &'a Token,
    issuers: &'a BTreeMap<String, (Profile, IssuerCert)>,
    /// Profiles that could not be loaded, and why.
    unusable: &'a BTreeMap<String, String>,
    out: &'a Path,
    clock: &'a dyn Clock,
}

/// A certificate decided and built, waiting for the token.
struct Ready {
    index: usize,
    item: Item,
    prepared: issue::Prepared,
    csr_sha256: String,
}

impl Ready {
    /// The intent entry, logged (durably) before the token is asked to sign.
    fn intent(&self) -> Body {
        let d = &self.prepared.decision;
        Body::IssueIntent {
            serial: keys::hex(&d.serial),
            profile: d.profile.clone(),
            subject: d.subject_string(),
            sans: d.san_strings(),
            not_before: rfc3339(d.not_before),
            not_after: rfc3339(d.not_after),
            csr_sha256: self.csr_sha256.clone(),
            tbs_sha256: self.prepared.tbs_sha256.clone(),
            renews: None,
        }
    }
}

/// Certificates for a session to sign: chunk number, positions in it, the chunk.
type Job = (usize, Vec<usize>, std::sync::Arc<Vec<Ready>>);

/// A session's answers: chunk number, per position the token's signature or why not, the chunk.
type Signed = (
    usize,
    Vec<(usize, Result<Vec<u8>, issue::IssueError>)>,
    std::sync::Arc<Vec<Ready>>,
);

/// A verifier's answers: chunk number, and per position the verified certificate or why not.
type SignResult = (usize, Vec<(usize, Result<Vec<u8>, issue::IssueError>)>);

/// Counts for the report.
#[derive(Default)]
struct Tally {
    handled: usize,
    issued: usize,
    reissued: usize,
    refused: usize,
}

/// The verified certificate for a position of a chunk, from the token's signature.
fn finish_one(
    r: &Ready,
    signature: &[u8],
    issuers: &BTreeMap<String, (Profile, IssuerCert)>,
) -> Result<Vec<u8>, issue::IssueError> {
    match issuers.get(&r.item.profile) {
        // A panic must not lose a certificate's outcome: it becomes a failure of this
        // certificate, logged as abandoned.
        Some((_, issuer)) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            issue::finish(&r.prepared, issuer, signature)
        }))
        .unwrap_or_else(|_| {
            Err(issue::IssueError::Build(
                "internal error while verifying".into(),
            ))
        }),
        None => Err(issue::IssueError::Build(format!(
            "no issuer for profile {}",
            r.item.profile
        ))),
    }
}

/// One token session's thread: signs jobs until the queue closes. It only drives the token;
/// certificates are assembled and verified elsewhere, so a session is never idle while its
/// last signature is checked.
fn sign_worker(
    key: &dyn CaSigner,
    jobs: &std::sync::Mutex<std::sync::mpsc::Receiver<Job>>,
    signed: &std::sync::mpsc::Sender<Signed>,
) {
    loop {
        // The lock is held only while waiting for the next job.
        let job = match jobs.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok((chunk, positions, ready)) = job else {
            return;
        };
        let signatures = positions
            .into_iter()
            .map(|pos| {
                let tbs = &ready[pos].prepared.tbs;
                (pos, key.sign(tbs).map_err(issue::IssueError::Sign))
            })
            .collect();
        if signed.send((chunk, signatures, ready)).is_err() {
            return;
        }
    }
}

/// A verifier thread: turns the sessions' signatures into verified certificates until the
/// sessions stop, alongside everything else the host does.
fn verify_worker(
    signed: &std::sync::Mutex<std::sync::mpsc::Receiver<Signed>>,
    results: &std::sync::mpsc::Sender<SignResult>,
    issuers: &BTreeMap<String, (Profile, IssuerCert)>,
) {
    loop {
        let next = match signed.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok((chunk, signatures, ready)) = next else {
            return;
        };
        let checked = signatures
            .into_iter()
            .map(|(pos, sig)| {
                let r = sig.and_then(|sig| finish_one(&ready[pos], &sig, issuers));
                (pos, r)
            })
            .collect();
        if results.send((chunk, checked)).is_err() {
            return;
        }
    }
}

/// A chunk whose intents are durable and whose certificates the sessions are signing.
struct InFlight {
    id: usize,
    ready: std::sync::Arc<Vec<Ready>>,
    intent_seqs: Vec<u64>,
    signed: Vec<Option<Result<Vec<u8>, issue::IssueError>>>,
    remaining: usize,
    done: BTreeMap<usize, Done>,
    release: Vec<(PathBuf, Vec<u8>, String, String)>,
}

impl InFlight {
    /// Files a session's results under their chunk.
    fn place(in_flight: &mut std::collections::VecDeque<Self>, (id, signed): SignResult) {
        let Some(chunk) = in_flight.iter_mut().find(|c| c.id == id) else {
            return;
        };
        for (pos, r) in signed {
            if let Some(slot) = chunk.signed.get_mut(pos)
                && slot.is_none()
            {
                *slot = Some(r);
                chunk.remaining -= 1;
            }
        }
    }

    /// The log entries for a finished chunk (certificate or abandonment per intent), and its
    /// outcomes and files to release once they are durable.
    fn results(&mut self, out: &Path, tally: &mut Tally) -> Vec<Body> {
        let mut bodies = Vec::with_capacity(self.ready.len());
        let signed = std::mem::take(&mut self.signed);
        for ((r, intent_seq), result) in self.ready.iter().zip(&self.intent_seqs).zip(signed) {
            let serial = keys::hex(&r.prepared.decision.serial);
            let result = result.unwrap_or_else(|| {
                Err(issue::IssueError::Build(
                    "no result from the token session".into(),
                ))
            });
            match result {
                Ok(der) => {
                    bodies.push(Body::Cert {
                        intent_seq: *intent_seq,
                        serial: serial.clone(),
                        profile: r.prepared.decision.profile.clone(),
                        csr_sha256: r.csr_sha256.clone(),
                        cert_sha256: keys::sha256_hex(&der),
                        cert: B64.encode(&der),
                    });
                    let path = out.join(&r.item.out);
                    self.release.push((
                        path.clone(),
                        der,
                        r.item.file.clone(),
                        r.item.profile.clone(),
                    ));
                    self.done.insert(
                        r.index,
                        Done::Issued {
                            file: r.item.file.clone(),
                            serial,
                            out: path,
                            already_issued: false,
                        },
                    );
                    tally.issued += 1;
                }
                Err(e) => {
                    bodies.push(Body::Abandon {
                        intent_seq: *intent_seq,
                        reason: format!("not released: {e}"),
                    });
                    self.done.insert(
                        r.index,
                        Done::Failed {
                            file: r.item.file.clone(),
                            rule: "token.sign".into(),
                            error: crate::error::chain(&e),
                        },
                    );
                }
            }
        }
        bodies
    }
}

/// One chunk made ready for signing: outcomes already known, files to release, TBSs to sign.
struct Staged {
    done: BTreeMap<usize, Done>,
    release: Vec<(PathBuf, Vec<u8>, String, String)>,
    ready: Vec<Ready>,
    reissued: usize,
}

impl Staged {
    fn new() -> Self {
        Self {
            done: BTreeMap::new(),
            release: Vec::new(),
            ready: Vec::new(),
            reissued: 0,
        }
    }

    /// A CSR decided `issue` that needs no new certificate: the same CSR under the same
    /// profile earlier in this batch (skipped), or already in the log (its certificate written
    /// again, never issued twice). Returns whether it was one of those.
    fn settle(
        &mut self,
        ctx: &StageCtx<'_>,
        log: &crate::log::Log,
        index: usize,
        item: &Item,
        csr_sha256: &str,
        seen: &mut std::collections::HashSet<u128>,
    ) -> Result<bool, Error> {
        let file = item.file.clone();
        if !seen.insert(crate::log::issued_key(csr_sha256, &item.profile)) {
            let reason = "the same CSR appears earlier in this batch".to_owned();
            self.done.insert(index, Done::Skipped { file, reason });
            return Ok(true);
        }
        let Some(prior) = log.issued(csr_sha256, &item.profile)? else {
            return Ok(false);
        };
        let path = ctx.out.join(&item.out);
        self.release.push((
            path.clone(),
            prior.cert_der,
            file.clone(),
            item.profile.clone(),
        ));
        self.done.insert(
            index,
            Done::Issued {
                file,
                serial: prior.serial,
                out: path,
                already_issued: true,
            },
        );
        self.reissued += 1;
        Ok(true)
    }

    /// Files a decided CSR: ready for the token, or its refusal or failure.
    fn file(&mut self, index: usize, item: Item, verdict: Verdict, prepared: Option<Built>) {
        let file = item.file.clone();
        let done = match (verdict, prepared) {
            (_, Some(Ok((prepared, csr_sha256)))) => {
                self.ready.push(Ready {
                    index,
                    item,
                    prepared,
                    csr_sha256,
                });
                return;
            }
            (_, Some(Err(error))) => Done::Failed {
                file,
                rule: "build".into(),
                error,
            },
            (Verdict::Refuse { refusals }, None) => Done::Refused { file, refusals },
            (Verdict::Fail { rule, error }, None) => Done::Failed { file, rule, error },
            (Verdict::Skip { reason }, None) => Done::Skipped { file, reason },
            (Verdict::Issue { .. }, None) => Done::Failed {
                file,
                rule: "internal".into(),
                error: "decided to issue without a decision (bug)".into(),
            },
        };
        self.done.insert(index, done);
    }
}

/// The profiles of a batch that loaded (with their issuers), and why the others did not.
type Profiles<'a> = (
    &'a BTreeMap<String, (Profile, IssuerCert)>,
    &'a BTreeMap<String, String>,
);

/// A TBS built for a decided CSR, with the CSR's SHA-256; or why it could not be built.
type Built = Result<(issue::Prepared, String), String>;

/// Judges one CSR under its profile and builds its TBS: what staging does per CSR, on every
/// core.
fn decide_and_prepare(
    profiles: Profiles<'_>,
    item: &Item,
    bytes: &[u8],
    now: time::OffsetDateTime,
    serial: &[u8],
) -> (Verdict, Option<Built>) {
    let (issuers, unusable) = profiles;
    let Some((profile, issuer)) = issuers.get(&item.profile) else {
        let error = unusable
            .get(&item.profile)
            .cloned()
            .unwrap_or_else(|| format!("no profile {:?}", item.profile));
        let rule = "profile".into();
        return (Verdict::Fail { rule, error }, None);
    };
    let (verdict, decision) = judge(
        profile,
        issuer,
        bytes,
        item.requested_validity.as_deref(),
        now,
        serial.to_vec(),
        false,
    );
    let prepared = decision.map(|(d, sha)| {
        issue::prepare(d, issuer)
            .map(|p| (p, sha))
            .map_err(|e| e.to_string())
    });
    (verdict, prepared)
}

/// Prepares a chunk of a plan without touching the log: what the plan already refused, what
/// the log already holds (written again), and for the rest serials, decisions and TBSs, in
/// parallel. Each CSR is read, checked against the plan's digest and verified again.
fn stage(
    ctx: &StageCtx<'_>,
    log: &crate::log::Log,
    base: usize,
    chunk: &[Item],
    seen: &mut std::collections::HashSet<u128>,
) -> Result<Staged, Error> {
    let mut staged = Staged::new();
    let mut fresh = Vec::new();
    for (offset, item) in chunk.iter().enumerate() {
        let index = base + offset;
        if !matches!(item.verdict, Verdict::Issue { .. }) {
            staged.file(index, item.clone(), item.verdict.clone(), None);
            continue;
        }
        let (bytes, digest) = ctx.inputs.read(item)?;
        if digest != item.sha256 {
            let error = "changed since planning; not signed (plan again and review)".into();
            let rule = "input.changed".into();
            staged.file(index, item.clone(), Verdict::Fail { rule, error }, None);
            continue;
        }
        let csr_sha = keys::sha256_hex(&crate::csr::der_of(&bytes).unwrap_or_default());
        if !staged.settle(ctx, log, index, item, &csr_sha, seen)? {
            fresh.push((index, item, bytes));
        }
    }
    let serials = home::fresh_serials(ctx.token, log, fresh.len())?;
    let now = ctx.clock.now();
    let jobs: Vec<_> = fresh.into_iter().zip(serials).collect();
    let profiles = (ctx.issuers, ctx.unusable);
    let judged = parallel(&jobs, |((_, item, bytes), serial)| {
        decide_and_prepare(profiles, item, bytes, now, serial)
    })?;
    for (((index, item, _), _), (verdict, prepared)) in jobs.into_iter().zip(judged) {
        staged.file(index, item.clone(), verdict, prepared);
    }
    Ok(staged)
}

/// [`stage`] for `sign-dir INPUT`: reads, hashes, verifies and decides each found CSR once, in
/// parallel, feeding the plan hash in order.
#[allow(
    clippy::too_many_arguments,
    reason = "one private helper of the pipeline"
)]
fn stage_found(
    ctx: &StageCtx<'_>,
    log: &crate::log::Log,
    root: &Path,
    base: usize,
    chunk: &[Found],
    seen: &mut std::collections::HashSet<u128>,
    hasher: &mut PlanHasher,
) -> Result<Staged, Error> {
    // A serial for every CSR: the few a refusal or a rerun leaves unused are random and never
    // appear anywhere.
    let serials = home::fresh_serials(ctx.token, log, chunk.len())?;
    let now = ctx.clock.now();
    let jobs: Vec<_> = chunk.iter().zip(serials).collect();
    let profiles = (ctx.issuers, ctx.unusable);
    let judged = parallel(&jobs, |(found, serial)| {
        found.item(root, |item, bytes| {
            decide_and_prepare(profiles, item, bytes, now, serial)
        })
    })?;
    let mut staged = Staged::new();
    for (offset, (item, prepared)) in judged.into_iter().enumerate() {
        hasher.push(&item);
        let index = base + offset;
        if let Some(Ok((_, csr_sha))) = &prepared
            && staged.settle(ctx, log, index, &item, csr_sha, seen)?
        {
            continue;
        }
        let verdict = item.verdict.clone();
        staged.file(index, item, verdict, prepared);
    }
    Ok(staged)
}

/// The bytes of an output file: PEM, or for kubeadm's `X.conf` outputs the kubeconfig from the
/// input with the certificate and the CA embedded.
fn output_bytes(
    home: &Home,
    batch: &Batch<'_>,
    item: &str,
    issuer: &str,
    path: &Path,
    der: &[u8],
) -> Vec<u8> {
    let pem = home::pem("CERTIFICATE", der);
    if let Inputs::Objects(objects) = batch.inputs {
        // Leaf first, then the intermediates; the cluster already trusts the root.
        let root = home
            .root()
            .map(|r| home::pem("CERTIFICATE", &r.der))
            .unwrap_or_default();
        let chain = home
            .chain_pem(issuer)
            .unwrap_or_default()
            .replace(&root, "");
        let status = objects
            .get(item)
            .map(|o| crate::k8s::status_object(o, &format!("{pem}{chain}")));
        return serde_json::to_vec_pretty(&status).unwrap_or_default();
    }
    if path.extension().is_none_or(|e| e != "conf") {
        return pem.into_bytes();
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let template = std::fs::read_to_string(batch.input.join(&name)).unwrap_or_default();
    let ca = home
        .issuer("kubernetes-ca")
        .map(|(c, _)| home::pem("CERTIFICATE", &c.der))
        .unwrap_or_default();
    fill_kubeconfig(&template, &B64.encode(pem), &B64.encode(ca)).into_bytes()
}

/// Fills `client-certificate-data` and an empty `certificate-authority-data` in kubeadm's
/// partial kubeconfig (plain line edits: the file is kubeadm's own YAML, one key per line).
pub fn fill_kubeconfig(template: &str, cert_b64: &str, ca_b64: &str) -> String {
    template
        .lines()
        .map(|line| {
            let indent = &line[..line.len() - line.trim_start().len()];
            let key = line.trim_start();
            if key.starts_with("client-certificate-data:") {
                format!("{indent}client-certificate-data: {cert_b64}")
            } else if key.starts_with("certificate-authority-data:")
                && key.trim_end().ends_with(':')
                || key.trim_end() == "certificate-authority-data: \"\""
            {
                format!("{indent}certificate-authority-data: {ca_b64}")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}
