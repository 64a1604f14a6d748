//! `sign-dir`: the signing pipeline. While the token sessions sign one chunk, the next is
//! decided and built on every core; one append commits a finished chunk's results with the
//! next chunk's intents; one checkpoint; then the finished chunk's files.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use super::plan::{Found, Inputs, discover, judge, parallel, plan_objects};
use super::{Done, Item, JOB, Plan, Report, Verdict, chunk_ranges};
use crate::clock::{Clock, rfc3339};
use crate::error::Error;
use crate::files;
use crate::home::{self, Home};
use crate::issue::{self, IssuerCert};
use crate::keys;
use crate::kubeadm::{self, KUBEADM_CAS, KubeconfigError};
use crate::log::Body;
use crate::profile::Profile;
use crate::signer::CaSigner;
use crate::token::Token;

/// Counts and rate on stderr: a bar on a terminal, a plain line per chunk otherwise.
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
    on_done: &mut dyn FnMut(&Done) -> Result<(), Error>,
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
    on_done: &mut dyn FnMut(&Done) -> Result<(), Error>,
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
    on_done: &mut dyn FnMut(&Done) -> Result<(), Error>,
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
    let writer = Writer::spawn()?;
    let ranges = chunk_ranges(batch.source.len());
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
        for k in 0..=ranges.len() {
            // Stage the next chunk while the sessions sign what is in flight.
            let staged = match (&batch.source, ranges.get(k).cloned()) {
                (_, None) => None,
                (Source::Plan(plan), Some(range)) => Some(stage(
                    &ctx,
                    &log,
                    range.start,
                    &plan.items[range],
                    &mut seen,
                )?),
                (Source::Found(found), Some(range)) => Some(stage_found(
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
            for mut chunk in finished {
                let mut outputs = Vec::with_capacity(chunk.release.len());
                for (path, der, file, profile) in &chunk.release {
                    let issuer = issuers
                        .get(profile)
                        .map_or("root", |(p, _)| p.issuer.as_str());
                    match output_bytes(home, batch, file, issuer, path, der) {
                        Ok(bytes) => outputs.push((path.clone(), bytes)),
                        // Logged but not releasable (a kubeconfig template that cannot be
                        // completed): this item fails with the rule; nothing is written.
                        Err(e) => withhold(&mut chunk.done, path, &e),
                    }
                }
                writer.send(outputs)?;
                for d in chunk.done.into_values() {
                    if matches!(d, Done::Refused { .. } | Done::Failed { .. }) {
                        tally.refused += 1;
                    }
                    if let (true, Done::Issued { file, out, .. }) = (batch.kubernetes, &d) {
                        commands.push((file.clone(), out.clone()));
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
    let failed = writer.finish()?;
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
        files::replace(
            &out.join("apply-status.sh"),
            crate::k8s::apply_status_script(out, &commands).as_bytes(),
        )?;
    }
    let commands = commands
        .iter()
        .map(|(name, file)| {
            let file = crate::k8s::shell_quote(&file.display().to_string());
            crate::k8s::replace_command(name, &file)
        })
        .collect();
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

/// Files to write: destination and bytes.
type Outputs = Vec<(PathBuf, Vec<u8>)>;

/// The thread that writes released files, a chunk at a time. Every file it is handed is
/// already durable in the log. Dropping it waits for what it was handed: a run that stops on
/// an error (a full disk, say) must not exit while a file is half-written, or its temporary
/// would be left behind.
struct Writer {
    queue: Option<std::sync::mpsc::SyncSender<Outputs>>,
    thread: Option<std::thread::JoinHandle<Vec<(PathBuf, String)>>>,
}

impl Writer {
    fn spawn() -> Result<Self, Error> {
        // Bounded: if files are written slower than certificates are signed, signing waits
        // instead of holding ever more certificates in memory.
        let (queue, outputs) = std::sync::mpsc::sync_channel::<Outputs>(2);
        let thread = std::thread::Builder::new()
            .name("hsmca-write".into())
            .spawn(move || {
                let mut failed = Vec::new();
                for outputs in outputs {
                    for ((path, _), written) in outputs.iter().zip(files::write_new_all(&outputs)) {
                        if let Err(e) = written {
                            failed.push((path.clone(), e.to_string()));
                        }
                    }
                }
                failed
            })?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    fn send(&self, outputs: Outputs) -> Result<(), Error> {
        match &self.queue {
            Some(q) if q.send(outputs).is_ok() => Ok(()),
            _ => Err(Error::Internal("the output writer stopped".into())),
        }
    }

    /// Waits for every file; returns those that could not be written, and why.
    fn finish(mut self) -> Result<Vec<(PathBuf, String)>, Error> {
        self.queue.take();
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(failed)) => Ok(failed),
            Some(Err(_)) => Err(Error::Internal("the output writer panicked".into())),
            None => Ok(Vec::new()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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

/// The next item of a queue shared by several threads; `None` once every sender is gone. The
/// lock is held only while waiting.
fn next<T>(queue: &std::sync::Mutex<std::sync::mpsc::Receiver<T>>) -> Option<T> {
    queue.lock().ok()?.recv().ok()
}

/// One token session's thread: signs jobs until the queue closes. It only drives the token;
/// certificates are assembled and verified elsewhere, so a session is never idle while its
/// last signature is checked.
fn sign_worker(
    key: &dyn CaSigner,
    jobs: &std::sync::Mutex<std::sync::mpsc::Receiver<Job>>,
    signed: &std::sync::mpsc::Sender<Signed>,
) {
    while let Some((chunk, positions, ready)) = next(jobs) {
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
    while let Some((chunk, signatures, ready)) = next(signed) {
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
/// input with the certificate and the CA embedded (and checked against each other and the key).
fn output_bytes(
    home: &Home,
    batch: &Batch<'_>,
    item: &str,
    issuer: &str,
    path: &Path,
    der: &[u8],
) -> Result<Vec<u8>, KubeconfigError> {
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
        return Ok(serde_json::to_vec_pretty(&status).unwrap_or_default());
    }
    if path.extension().is_none_or(|e| e != "conf") {
        return Ok(pem.into_bytes());
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let template = kubeadm::read_template(&batch.input.join(&*name))?;
    let (ca, _) = home.issuer(issuer).map_err(|e| KubeconfigError::Ca {
        file: name.to_string(),
        reason: crate::error::chain(&e),
    })?;
    kubeadm::fill_kubeconfig(&name, &template, der, &ca.der).map(String::into_bytes)
}

/// Turns the outcome of an issued item whose file cannot be released into a failure with the
/// rule that stopped it. Its certificate is in the log; a rerun after fixing the input writes it.
fn withhold(done: &mut BTreeMap<usize, Done>, path: &Path, e: &KubeconfigError) {
    for d in done.values_mut() {
        if let Done::Issued { file, out, .. } = d
            && out == path
        {
            *d = Done::Failed {
                file: std::mem::take(file),
                rule: e.rule().into(),
                error: format!(
                    "issued and logged, but not released: {}",
                    crate::error::chain(e)
                ),
            };
        }
    }
}
