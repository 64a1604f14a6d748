//! What a batch signs and what it would issue: CSRs found under an input directory (a manifest,
//! kubeadm's layout, or one profile for all) or Kubernetes objects from `kubectl get csr -o
//! json`, each decided without the token into a reviewable plan.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::{Clock, rfc3339};
use crate::error::Error;
use crate::home::Home;
use crate::input::{self, InputError, Root};
use crate::issue::IssuerCert;
use crate::keys;
use crate::kubeadm::KUBEADM;
use crate::policy::{self, Context, Purpose, Refusal, SignerRequest};
use crate::profile::{Duration, Profile};

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
    pub(super) planned_here: bool,
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
pub(super) struct Found {
    /// Path relative to the input root.
    pub(super) file: String,
    /// Profile.
    pub(super) profile: std::sync::Arc<str>,
    /// Validity asked for by the manifest.
    pub(super) validity: Option<String>,
    /// Output path relative to the output directory, if not [`crt`] of `file`.
    pub(super) out: Option<String>,
    /// Why the input refused this entry before it was read (rule id, message), if it did: a
    /// symlink, FIFO or too deep a directory found by the walk, or a missing kubeconfig
    /// template.
    /// Boxed: held for every CSR of a batch, and almost always `None`.
    pub(super) refused: Option<Box<(&'static str, String)>>,
}

impl Found {
    /// The plan item for this CSR, with the verdict `decide` gives over the file's bytes (or
    /// the input's refusal, rule `input.*`).
    pub(super) fn item<R>(
        &self,
        root: &Root,
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
        let read = match &self.refused {
            Some(refused) => Err((refused.0.to_owned(), refused.1.clone())),
            None => root
                .read(&self.file, input::CSR_CAP)
                .map_err(|e| (e.rule().to_owned(), crate::error::chain(&e))),
        };
        let (verdict, r) = match read {
            Ok(bytes) => {
                item.sha256 = keys::sha256_hex(&bytes);
                decide(&item, &bytes)
            }
            Err((rule, error)) => (Verdict::Fail { rule, error }, None),
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
pub(super) fn discover(
    root: &Root,
    profile: Option<&str>,
    manifest: Option<&Path>,
) -> Result<(Vec<Found>, bool), Error> {
    if let Some(path) = manifest {
        // Each key is checked (relative, beneath the input) when its file is read.
        let map = read_manifest(path)?;
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
                    refused: None,
                }
            })
            .collect();
        return Ok((items, false));
    }
    // Anything at a kubeadm name counts (a symlink there is refused as that item, not skipped).
    let kubeadm: Vec<_> = KUBEADM.iter().filter(|(f, _)| root.exists(f)).collect();
    if profile.is_none() && !kubeadm.is_empty() {
        let items = kubeadm
            .iter()
            .map(|(f, p)| {
                let template = f.strip_suffix(".csr").filter(|t| t.ends_with(".conf"));
                // A kubeconfig's template must be readable before its certificate is issued:
                // an unreadable one fails the item, it never becomes an empty file.
                // The same for one that cannot be completed (no such user, no key, ...).
                let refused = template.and_then(|t| {
                    root.read(t, input::KUBECONFIG_CAP)
                        .map_err(crate::kubeadm::KubeconfigError::from)
                        .and_then(|bytes| crate::kubeadm::check_template(t, &bytes))
                        .err()
                        .map(|e| Box::new((e.rule(), crate::error::chain(&e))))
                });
                Found {
                    file: (*f).to_owned(),
                    profile: (*p).into(),
                    validity: None,
                    out: template.map(str::to_owned),
                    refused,
                }
            })
            .collect();
        return Ok((items, true));
    }
    let Some(profile) = profile else {
        return Err(Error::Usage(format!(
            "{}: not kubeadm's generate-csr layout; give --profile for all CSRs or --manifest FILE",
            root.path().display()
        )));
    };
    let (files, problems) = root.walk(|name| name.ends_with(".csr") || name.ends_with(".req"));
    let profile: std::sync::Arc<str> = profile.into();
    // What the walk refused (symlinks, FIFOs, too deep) is reported as failed items in order.
    let refused = problems
        .into_iter()
        .map(|(file, e)| (file, Some(Box::new((e.rule(), crate::error::chain(&e))))));
    let mut all: Vec<_> = files
        .into_iter()
        .map(|f| (f, None))
        .chain(refused)
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((
        all.into_iter()
            .map(|(file, refused)| Found {
                file,
                profile: profile.clone(),
                validity: None,
                out: None,
                refused,
            })
            .collect(),
        false,
    ))
}

/// Reads a manifest (`{"file.csr": "profile"}` or `{"file.csr": {"profile": P, "validity":
/// V}}`) through [`input::read_file`].
pub(super) fn read_manifest(path: &Path) -> Result<BTreeMap<String, ManifestEntry>, Error> {
    let bytes = input::read_file(path, input::MANIFEST_CAP)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Usage(format!("{}: not a manifest: {e}", path.display())))
}

/// Reads a plan file through [`input::read_file`].
pub fn read_plan(path: &Path) -> Result<Plan, Error> {
    let bytes = input::read_file(path, input::PLAN_CAP)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Usage(format!("{}: not a plan: {e}", path.display())))
}

/// Reads `kubectl get csr -o json` output through [`input::read_file`]; one malformed object
/// is one refused item, not an error.
pub(super) fn read_objects(path: &Path) -> Result<Vec<crate::k8s::CsrObject>, Error> {
    let bytes = input::read_file(path, input::OBJECTS_CAP)?;
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Usage(format!("{}: not JSON: {e}", path.display())))?;
    crate::k8s::objects(&json).map_err(|e| Error::Usage(format!("{}: {e}", path.display())))
}

/// Where a plan's CSRs come from: files under a directory, or Kubernetes objects in one JSON
/// file (read once).
pub(super) enum Inputs {
    Dir(Root),
    Objects(BTreeMap<String, crate::k8s::CsrObject>),
}

impl Inputs {
    pub(super) fn load(plan: &Plan) -> Result<Self, Error> {
        if !plan.kubernetes {
            return Ok(Self::Dir(Root::open(&plan.input)?));
        }
        let objects = read_objects(&plan.input)?;
        Ok(Self::Objects(
            objects.into_iter().map(|o| (o.name.clone(), o)).collect(),
        ))
    }

    /// The CSR of `item` and the digest the plan's `sha256` covers: the file's, or the whole
    /// object's.
    pub(super) fn read(&self, item: &Item) -> Result<(Vec<u8>, String), InputError> {
        match self {
            Self::Dir(root) => root.read(&item.file, input::CSR_CAP).map(|b| {
                let digest = keys::sha256_hex(&b);
                (b, digest)
            }),
            Self::Objects(map) => map
                .get(&item.file)
                .map(|o| (o.request.clone(), object_digest(o)))
                .ok_or_else(|| InputError::Read {
                    path: item.file.clone(),
                    source: std::io::Error::other("no such object in the kubectl output"),
                }),
        }
    }
}

impl Inputs {
    /// The Kubernetes object's own request for `item`, when the input is kubectl objects.
    pub(super) fn signer_request(&self, item: &Item) -> Option<SignerRequest> {
        match self {
            Self::Dir(_) => None,
            Self::Objects(map) => map
                .get(&item.file)
                .map(crate::k8s::CsrObject::signer_request),
        }
    }
}

fn object_digest(o: &crate::k8s::CsrObject) -> String {
    keys::sha256_hex(&serde_json::to_vec(&o.raw).unwrap_or_default())
}

/// `plan` for `kubectl get csr -o json` output: only approved, unissued objects; the profile
/// from the signer (or the manifest, signerName → profile); the signer's own rules first.
pub(super) fn plan_objects(
    home: &Home,
    input: &Path,
    manifest: Option<&Path>,
    allow: &Allowed,
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
            let bytes = input::read_file(path, input::MANIFEST_CAP)?;
            serde_json::from_slice(&bytes).map_err(|e| {
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
        if let Some(bad) = &obj.invalid {
            item.verdict = Verdict::Refuse {
                refusals: vec![bad.clone()],
            };
            items.push(item);
            continue;
        }
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
        // The signer's own rules are part of the decision (policy::decide), so signing this
        // plan later re-decides it by exactly the rules that made it.
        let judged = judge(
            &profile,
            &issuer,
            &obj.request,
            &Request {
                validity: None,
                kubernetes: Some(obj.signer_request()),
                allow_profiles: Some(allow.clone()),
                compromised: Arc::default(),
            },
            now,
            vec![0; 16],
            true,
        );
        item.verdict = judged.verdict;
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
pub(super) fn parallel<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
) -> Result<Vec<R>, Error> {
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
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Thread)?;
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
    allow: &Allowed,
    clock: &dyn Clock,
) -> Result<Plan, Error> {
    if input.is_file() {
        return plan_objects(home, input, manifest, allow, clock);
    }
    let root = Root::open(input)?;
    let (found, kubeadm) = discover(&root, profile, manifest)?;
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
                    let request = Request {
                        validity: item.requested_validity.as_deref(),
                        kubernetes: None,
                        allow_profiles: Some(allow.clone()),
                        compromised: Arc::default(),
                    };
                    judge(profile, issuer, bytes, &request, now, vec![0; 16], true).verdict
                }
            };
            (verdict, None::<()>)
        };
        f.item(&root, decide).0
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

/// What a batch item asks for besides its CSR.
pub(super) struct Request<'a> {
    /// Validity from the manifest, e.g. `90d`.
    pub(super) validity: Option<&'a str>,
    /// The Kubernetes object's own request, for CSRs from `kubectl get csr -o json`.
    pub(super) kubernetes: Option<SignerRequest>,
    /// Dangerous profiles named with `--allow-profile` (see `policy::Context`).
    pub(super) allow_profiles: Option<Allowed>,
    /// Keys revoked for key compromise (see `policy::Context`); empty where no log is open.
    pub(super) compromised: Arc<BTreeMap<String, String>>,
}

/// Profiles named with `--allow-profile`.
pub type Allowed = Arc<std::collections::BTreeSet<String>>;

/// One CSR judged: the verdict, the CSR's digest once it parsed (the key of "already issued"),
/// and the decision if it is to be issued.
pub(super) struct Judged {
    pub(super) verdict: Verdict,
    pub(super) csr_sha256: Option<String>,
    pub(super) decision: Option<policy::Decision>,
}

/// Parses, verifies and decides one CSR as a leaf (a CA profile is refused by the policy).
pub(super) fn judge(
    profile: &Profile,
    issuer: &IssuerCert,
    bytes: &[u8],
    request: &Request<'_>,
    now: time::OffsetDateTime,
    serial: Vec<u8>,
    detail: bool,
) -> Judged {
    let fail = |rule: &str, error: String| Judged {
        verdict: Verdict::Fail {
            rule: rule.into(),
            error,
        },
        csr_sha256: None,
        decision: None,
    };
    let requested = match request.validity.map(|v| Duration::parse(v).ok_or(v)) {
        Some(Err(v)) => return fail("validity", format!("{v:?} is not a duration")),
        Some(Ok(d)) => Some(d),
        None => None,
    };
    let csr = match crate::csr::parse(bytes) {
        Ok(c) => c,
        Err(e) => return fail(e.rule(), e.to_string()),
    };
    let ctx = Context {
        purpose: Purpose::Leaf,
        kubernetes: request.kubernetes.clone(),
        now,
        serial,
        requested_validity: requested,
        issuer_not_after: issuer.not_after,
        allow_profiles: request.allow_profiles.clone(),
        compromised: request.compromised.clone(),
    };
    let csr_sha256 = Some(csr.sha256.clone());
    let d = match policy::decide(profile, &csr, &ctx) {
        Err(refusals) => {
            return Judged {
                verdict: Verdict::Refuse { refusals },
                csr_sha256,
                decision: None,
            };
        }
        Ok(d) => d,
    };
    let verdict = if detail {
        let usages = d
            .key_usage
            .iter()
            .map(|u| u.name().to_owned())
            .chain(d.extended_key_usage.iter().map(|e| e.name().to_owned()))
            .collect();
        Verdict::Issue {
            subject: d.subject_string(),
            sans: d.san_strings(),
            usages,
            validity: Duration(u64::try_from((d.not_after - now).whole_seconds()).unwrap_or(0))
                .to_string(),
            issuer: profile.issuer.clone(),
        }
    } else {
        Verdict::Issue {
            subject: String::new(),
            sans: Vec::new(),
            usages: Vec::new(),
            validity: String::new(),
            issuer: String::new(),
        }
    };
    Judged {
        verdict,
        csr_sha256,
        decision: Some(d),
    }
}
