//! `sign-dir`: the signing pipeline. While the token sessions sign one chunk, the next is
//! decided and built on every core; one append commits a finished chunk's results with the
//! next chunk's intents; one checkpoint; then the finished chunk's files.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::plan::{Allowed, Found, Inputs, Request, discover, judge, parallel, plan_objects};
use super::{Done, Item, JOB, Plan, Report, Verdict, chunk_ranges};
use crate::clock::Clock;
use crate::engine::{self, CaSession, Health, Ready, Withheld};
use crate::error::Error;
use crate::files;
use crate::home::Home;
use crate::issue::{self, IssuerCert};
use crate::keys;
use crate::kubeadm::{self, KUBEADM_CAS, KubeconfigError};
use crate::log::Body;
use crate::profile::Profile;
use crate::signer::{CaSigner, Keystore};

/// The live counts of a run and their line on stderr. The signing threads count each signature
/// as it comes back (one relaxed atomic add per certificate: no lock on the hot path); the
/// staging counts refusals, failures and certificates written again as each chunk is decided;
/// a thread of its own draws the line. On a terminal the bar lives on its own line below the
/// per-CSR lines: it is cleared while they are printed and drawn again under them. Elsewhere a
/// plain line is printed when the counts changed, at most once a second.
struct Progress {
    start: Instant,
    total: usize,
    terminal: bool,
    issued: AtomicUsize,
    written_again: AtomicUsize,
    refused: AtomicUsize,
    failed: AtomicUsize,
    skipped: AtomicUsize,
    /// Held while the line is drawn, and while per-CSR lines are printed above the bar.
    screen: std::sync::Mutex<()>,
    /// Set when the run is over, with the drawing thread woken at once (a sleeping thread would
    /// hold every run's exit up by its sleep).
    over: (std::sync::Mutex<bool>, std::sync::Condvar),
}

/// The counts a progress line shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Counts {
    done: usize,
    issued: usize,
    written_again: usize,
    refused: usize,
    failed: usize,
}

impl Progress {
    fn new(total: usize, start: Instant) -> Self {
        Self {
            start,
            total,
            terminal: std::io::stderr().is_terminal(),
            issued: AtomicUsize::new(0),
            written_again: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            skipped: AtomicUsize::new(0),
            screen: std::sync::Mutex::new(()),
            over: (std::sync::Mutex::new(false), std::sync::Condvar::new()),
        }
    }

    /// One signature came back from the token: good, or a failure.
    fn signed(&self, ok: bool) {
        let counter = if ok { &self.issued } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A chunk was decided: its outcomes known before signing.
    fn staged(&self, done: &BTreeMap<usize, Done>) {
        for d in done.values() {
            let counter = match d {
                Done::Issued { .. } => &self.written_again,
                Done::Refused { .. } => &self.refused,
                Done::Failed { .. } => &self.failed,
                Done::Skipped { .. } => &self.skipped,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn counts(&self) -> Counts {
        let c = Counts {
            done: 0,
            issued: self.issued.load(Ordering::Relaxed),
            written_again: self.written_again.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        };
        Counts {
            done: (c.issued
                + c.written_again
                + c.refused
                + c.failed
                + self.skipped.load(Ordering::Relaxed))
            .min(self.total),
            ..c
        }
    }

    fn line(&self, c: Counts) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        format!(
            "{}/{} CSRs: {} issued, {} written again, {} refused, {} failed, {:.0}/s",
            c.done,
            self.total,
            c.issued,
            c.written_again,
            c.refused,
            c.failed,
            c.done as f64 / secs
        )
    }

    /// Draws the counts: the bar in place on a terminal, a line elsewhere.
    fn draw(&self, c: Counts) {
        let line = self.line(c);
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let width = 30;
            let filled = (c.done * width).checked_div(self.total).unwrap_or(width);
            let _ = write!(
                err,
                "\r\x1b[2K[{}{}] {line}",
                "#".repeat(filled),
                " ".repeat(width - filled)
            );
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Runs `print` (which writes per-CSR lines) with the bar cleared, then draws it below.
    fn above<R>(&self, print: impl FnOnce() -> R) -> R {
        let _screen = self.screen.lock();
        if self.terminal {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
        }
        let r = print();
        if self.terminal {
            self.draw(self.counts());
        }
        r
    }

    /// The drawing thread: redraws when the counts change (every 100 ms on a terminal, at most
    /// once a second elsewhere) until the run is over.
    fn ticker(&self) {
        let every = if self.terminal {
            std::time::Duration::from_millis(100)
        } else {
            std::time::Duration::from_secs(1)
        };
        let mut last = Counts::default();
        let (lock, wake) = &self.over;
        let Ok(mut over) = lock.lock() else {
            return;
        };
        while !*over {
            over = match wake.wait_timeout(over, every) {
                Ok((guard, _)) => guard,
                Err(_) => return,
            };
            if *over {
                break;
            }
            let now = self.counts();
            if now != last {
                let _screen = self.screen.lock();
                self.draw(now);
                last = now;
            }
        }
    }

    /// The final line, with the run's exact counts (a certificate that failed its check, or a
    /// file that could not be written, moves from issued to failed here).
    /// Ends the drawing thread now.
    fn stop(&self) {
        let (lock, wake) = &self.over;
        if let Ok(mut over) = lock.lock() {
            *over = true;
        }
        wake.notify_all();
    }

    fn finish(&self, done: usize, tally: &Tally) {
        self.stop();
        let _screen = self.screen.lock();
        self.draw(Counts {
            done,
            issued: tally.issued,
            written_again: tally.reissued,
            refused: tally.refused,
            failed: tally.failed,
        });
        if self.terminal {
            let _ = writeln!(std::io::stderr().lock());
        }
    }
}

/// `hsmca sign-dir --plan`: signs exactly `plan` (refusing if any input changed since
/// planning) into `out`, on `sessions` token sessions. `allow` lists the dangerous profiles
/// the command line named (`--allow-profile`).
#[allow(
    clippy::too_many_arguments,
    reason = "the sign-dir command line, passed through"
)]
pub fn sign(
    home: &Home,
    plan: &Plan,
    allow: &Allowed,
    out: &Path,
    keys: &dyn Keystore,
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
        kubeadm: plan.kubeadm,
        kubernetes: plan.kubernetes,
        inputs: &inputs,
        source: Source::Plan(plan),
        allow,
    };
    run(home, &batch, profiles, out, keys, sessions, clock, on_done)
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
    allow: &Allowed,
    out: &Path,
    keys: &dyn Keystore,
    sessions: usize,
    clock: &dyn Clock,
    on_done: &mut dyn FnMut(&Done) -> Result<(), Error>,
) -> Result<Report, Error> {
    if input.is_file() {
        // Kubernetes objects: one small JSON file, planned whole.
        let plan = plan_objects(home, input, manifest, allow, clock)?;
        return sign(home, &plan, allow, out, keys, sessions, clock, on_done);
    }
    let root = crate::input::Root::open(input)?;
    let (found, kubeadm) = discover(&root, profile, manifest)?;
    let inputs = Inputs::Dir(root);
    let batch = Batch {
        kubeadm,
        kubernetes: false,
        inputs: &inputs,
        source: Source::Found(&found),
        allow,
    };
    let profiles = found.iter().map(|f| &*f.profile);
    run(home, &batch, profiles, out, keys, sessions, clock, on_done)
}

/// What a `sign-dir` run signs.
struct Batch<'a> {
    kubeadm: bool,
    kubernetes: bool,
    inputs: &'a Inputs,
    source: Source<'a>,
    /// Dangerous profiles named with `--allow-profile`.
    allow: &'a Allowed,
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
    keys: &dyn Keystore,
    sessions: usize,
    clock: &dyn Clock,
    on_done: &mut dyn FnMut(&Done) -> Result<(), Error>,
) -> Result<Report, Error> {
    let start = Instant::now();
    let mut session = CaSession::open(home, keys, clock)?;
    if let Source::Plan(plan) = batch.source {
        let to_issue = plan
            .items
            .iter()
            .filter(|i| matches!(i.verdict, Verdict::Issue { .. }))
            .count() as u64;
        session.append(vec![engine::plan(&plan.hash, to_issue)])?;
    }

    // Every profile and issuer of the batch, and one set of token sessions per issuer, up
    // front. A profile that cannot be loaded fails its CSRs, not the batch.
    let mut issuers: BTreeMap<String, (Profile, IssuerCert)> = BTreeMap::new();
    let mut unusable: BTreeMap<String, String> = BTreeMap::new();
    let mut workers: BTreeMap<String, Vec<Box<dyn CaSigner + Send>>> = BTreeMap::new();
    for name in profile_names {
        if issuers.contains_key(name) || unusable.contains_key(name) {
            continue;
        }
        let loaded = session.profile(name).and_then(|p| {
            let issuer = session.issuer(&p.issuer)?;
            Ok(((issuer.cert.clone(), issuer.label.clone()), p))
        });
        let ((cert, label), profile) = match (loaded, &batch.source) {
            (Ok(x), _) => x,
            (Err(e), Source::Found(_)) => {
                unusable.insert(name.to_owned(), e.to_string());
                continue;
            }
            (Err(e), Source::Plan(_)) => return Err(e),
        };
        if !workers.contains_key(&profile.issuer) {
            workers.insert(
                profile.issuer.clone(),
                keys.workers(&label, &cert.public_key, sessions.max(1))?,
            );
        }
        issuers.insert(name.to_owned(), (profile, cert));
    }
    // Outcomes go to the caller as each chunk completes, not into a list: a batch of any size
    // holds at most three chunks at a time.
    let mut commands = Vec::new();
    let progress = Progress::new(batch.source.len(), start);
    let mut tally = Tally::default();
    let writer = Writer::spawn(files::OutDir::open(out)?)?;
    let ranges = chunk_ranges(batch.source.len());
    let mut seen = std::collections::HashSet::new();
    let mut hasher = PlanHasher::new();
    let mut health = Health::default();
    // Set when the run must stop: the sessions sign nothing more, and what is in flight is
    // abandoned in the log.
    let stop = AtomicBool::new(false);
    let compromised = session.compromised();
    let ctx = StageCtx {
        allow: batch.allow,
        compromised: &compromised,
        inputs: batch.inputs,
        issuers: &issuers,
        unusable: &unusable,
        out,
    };
    std::thread::scope(|scope| -> Result<(), Error> {
        let progress = &progress;
        // Ends when the run is over (`Progress::finish`, below, or this scope failing).
        std::thread::Builder::new()
            .name("hsmca-progress".into())
            .spawn_scoped(scope, move || progress.ticker())
            .map_err(Error::Thread)?;
        let _over = Over(progress);
        // One long-lived thread per token session, fed from one queue per issuer: a session
        // never waits for a chunk boundary, only for work.
        let (results_tx, results) = std::sync::mpsc::channel::<SignResult>();
        let (signed_tx, signed) = std::sync::mpsc::channel::<Signed>();
        let signed = std::sync::Arc::new(std::sync::Mutex::new(signed));
        for _ in 0..std::thread::available_parallelism().map_or(2, |n| n.get()) {
            let (signed, results_tx, issuers) = (signed.clone(), results_tx.clone(), &issuers);
            std::thread::Builder::new()
                .name("hsmca-verify".into())
                .spawn_scoped(scope, move || verify_worker(&signed, &results_tx, issuers))
                .map_err(Error::Thread)?;
        }
        drop(results_tx);
        let mut queues = BTreeMap::new();
        for (issuer_name, keys) in &mut workers {
            let (jobs_tx, jobs) = std::sync::mpsc::channel::<Job>();
            let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
            for key in keys.iter_mut() {
                let (jobs, signed_tx) = (jobs.clone(), signed_tx.clone());
                // Each session moves to its own thread (sessions are Send, not Sync).
                let stop = &stop;
                std::thread::Builder::new()
                    .name("hsmca-sign".into())
                    .spawn_scoped(scope, move || {
                        sign_worker(&**key, &jobs, &signed_tx, stop, progress);
                    })
                    .map_err(Error::Thread)?;
            }
            queues.insert(issuer_name.clone(), jobs_tx);
        }
        drop(signed_tx);
        let mut in_flight: std::collections::VecDeque<InFlight> = Default::default();
        for k in 0..=ranges.len() {
            // Stage the next chunk while the sessions sign what is in flight; after a stop,
            // only collect what is in flight.
            let halted = health.halt().is_some();
            if halted {
                stop.store(true, Ordering::SeqCst);
            }
            let next = if halted { None } else { ranges.get(k).cloned() };
            let staged = match (&batch.source, next) {
                (_, None) => None,
                (Source::Plan(plan), Some(range)) => Some(stage(
                    &ctx,
                    &session,
                    range.start,
                    &plan.items[range],
                    &mut seen,
                )?),
                (Source::Found(found), Some(range)) => Some(stage_found(
                    &ctx,
                    &session,
                    range.start,
                    &found[range],
                    &mut seen,
                    &mut hasher,
                )?),
            };
            if let Some(s) = &staged {
                progress.staged(&s.done);
            }
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
                bodies.extend(chunk.results(out, &mut tally, &mut health));
            }
            if health.halt().is_some() {
                stop.store(true, Ordering::SeqCst);
            }
            let results_len = bodies.len();
            if let Some(s) = &staged {
                bodies.extend(s.ready.iter().map(|p| session.intent(&p.ready)));
            }
            let seqs = if bodies.is_empty() {
                Vec::new()
            } else {
                session.append(bodies)?
            };
            if results_len > 0 {
                engine::danger_crash_point("after-cert");
            }
            if seqs.len() > results_len {
                engine::danger_crash_point("after-intent");
            }
            if results_len > 0 {
                session.checkpoint()?;
                engine::danger_crash_point("after-checkpoint");
            }
            for mut chunk in finished {
                let mut outputs = Vec::with_capacity(chunk.release.len());
                for r in &chunk.release {
                    let issuer = issuers
                        .get(&r.profile)
                        .map_or("root", |(p, _)| p.issuer.as_str());
                    match output_bytes(home, batch, &r.file, issuer, &r.path, &r.der) {
                        Ok(bytes) => outputs.push((r.path.clone(), bytes)),
                        // Logged but not releasable (a kubeconfig template refused or that
                        // cannot be completed): this item fails with the rule; nothing is
                        // written. A rerun after fixing the input writes it from the log.
                        Err(e) => withhold(&mut chunk.done, &r.path, &e),
                    }
                }
                writer.send(outputs)?;
                progress.above(|| -> Result<(), Error> {
                    for d in chunk.done.into_values() {
                        match d {
                            Done::Refused { .. } => tally.refused += 1,
                            Done::Failed { .. } => tally.failed += 1,
                            Done::Issued { .. } | Done::Skipped { .. } => {}
                        }
                        if let (true, Done::Issued { file, out, .. }) = (batch.kubernetes, &d) {
                            commands.push((file.clone(), out.clone()));
                        }
                        tally.handled += 1;
                        on_done(&d)?;
                    }
                    Ok(())
                })?;
            }
            if halted && in_flight.is_empty() {
                break;
            }
            // The staged chunk's intents are durable: the sessions may sign it.
            if let Some(s) = staged {
                tally.reissued += s.reissued;
                let ready = std::sync::Arc::new(s.ready);
                // Handed out a few at a time: one queue operation per certificate was a
                // measurable share of the host's work.
                let mut by_issuer: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
                for (pos, r) in ready.iter().enumerate() {
                    let issuer = r.ready.prepared.decision.issuer.as_str();
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
        refused,
        mut failed,
    } = tally;
    // A plan decided while signing is logged once it is complete.
    let hash = match batch.source {
        Source::Plan(plan) => plan.hash.clone(),
        // A run that stopped early has not seen the whole input: no plan hash is logged.
        Source::Found(_) if health.halt().is_some() => String::new(),
        Source::Found(_) => {
            let (plan_sha256, to_issue) = hasher.finish();
            session.append(vec![engine::plan(&plan_sha256, to_issue)])?;
            session.checkpoint()?;
            plan_sha256
        }
    };
    let unwritten = writer.finish()?;
    // A file that could not be written is reported again, as failed, above the bar: its
    // certificate is in the log, and a rerun with another --out writes it.
    if !unwritten.is_empty() {
        progress.above(|| -> Result<(), Error> {
            for (path, error) in unwritten {
                on_done(&Done::Failed {
                    file: path.display().to_string(),
                    rule: error.rule().into(),
                    error: format!("issued and logged, but {}", crate::error::chain(&error)),
                })?;
                failed += 1;
            }
            Ok(())
        })?;
    }
    progress.finish(
        handled,
        &Tally {
            handled,
            issued,
            reissued,
            refused,
            failed,
        },
    );
    let out_dir = files::OutDir::open(out)?;
    if batch.kubeadm {
        for (profile, plain, rel) in KUBEADM_CAS {
            let ca = home
                .profile(profile)
                .map_or_else(|_| plain.to_owned(), |p| p.issuer);
            if let Ok((cert, _)) = home.issuer(&ca) {
                // Something planted at a CA file's name fails that file, not the batch: every
                // certificate is already issued and written.
                let pem = engine::pem("CERTIFICATE", &cert.der);
                if let Err(e) = out_dir.write_new(rel, pem.as_bytes()) {
                    on_done(&Done::Failed {
                        file: rel.to_owned(),
                        rule: e.rule().into(),
                        error: crate::error::chain(&e),
                    })?;
                    failed += 1;
                }
            }
        }
    }
    if batch.kubernetes && !commands.is_empty() {
        let script = crate::k8s::apply_status_script(out, &commands);
        if let Err(e) = out_dir.replace("apply-status.sh", script.as_bytes()) {
            on_done(&Done::Failed {
                file: "apply-status.sh".into(),
                rule: e.rule().into(),
                error: crate::error::chain(&e),
            })?;
            failed += 1;
        }
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
        failed,
        seconds: start.elapsed().as_secs_f64(),
        commands,
        halt: health.halt().cloned(),
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
    thread: Option<std::thread::JoinHandle<Vec<(PathBuf, files::FileError)>>>,
}

impl Writer {
    /// Starts the writer for files beneath `out`: each path handed to it must be beneath
    /// `out` by a plain relative name (checked again here), never through a symlink.
    fn spawn(out: files::OutDir) -> Result<Self, Error> {
        // Bounded: if files are written slower than certificates are signed, signing waits
        // instead of holding ever more certificates in memory.
        let (queue, outputs) = std::sync::mpsc::sync_channel::<Outputs>(2);
        let thread = std::thread::Builder::new()
            .name("hsmca-write".into())
            .spawn(move || {
                let mut failed = Vec::new();
                for outputs in outputs {
                    // The relative name beneath OUT; an output path outside it (an absolute
                    // or `..` name from a plan) gets a name the writer refuses.
                    let rel: Vec<(String, Vec<u8>)> = outputs
                        .into_iter()
                        .map(|(path, bytes)| {
                            let rel = path
                                .strip_prefix(out.path())
                                .ok()
                                .and_then(Path::to_str)
                                .map_or_else(|| path.display().to_string(), str::to_owned);
                            (rel, bytes)
                        })
                        .collect();
                    for ((rel, _), written) in rel.iter().zip(out.write_new_all(&rel)) {
                        if let Err(e) = written {
                            failed.push((out.path().join(rel), e));
                        }
                    }
                }
                failed
            })
            .map_err(Error::Thread)?;
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
    fn finish(mut self) -> Result<Vec<(PathBuf, files::FileError)>, Error> {
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
    /// Dangerous profiles named with `--allow-profile`.
    allow: &'a Allowed,
    /// Keys revoked for key compromise.
    compromised: &'a Arc<BTreeMap<String, String>>,
    inputs: &'a Inputs,
    issuers: &'a BTreeMap<String, (Profile, IssuerCert)>,
    /// Profiles that could not be loaded, and why.
    unusable: &'a BTreeMap<String, String>,
    out: &'a Path,
}

/// A certificate of the batch decided and built, waiting for the token.
struct Pending {
    index: usize,
    item: Item,
    ready: Ready,
}

/// Certificates for a session to sign: chunk number, positions in it, the chunk.
type Job = (usize, Vec<usize>, std::sync::Arc<Vec<Pending>>);

/// What a session did with one certificate: its signature, why the token failed, or nothing
/// because the run is stopping.
type Signature = Option<Result<Vec<u8>, issue::IssueError>>;

/// A session's answers: chunk number, per position the token's signature or why not, the chunk.
type Signed = (usize, Vec<(usize, Signature)>, std::sync::Arc<Vec<Pending>>);

/// A verifier's answers: chunk number, and per position the checked certificate or why not
/// (`None`: not signed, the run is stopping).
type SignResult = (usize, Vec<(usize, Signature)>);

/// Counts for the report.
#[derive(Default)]
struct Tally {
    handled: usize,
    issued: usize,
    reissued: usize,
    refused: usize,
    failed: usize,
}

/// Tells the progress thread the run is over when dropped, so a run that fails still ends it.
struct Over<'a>(&'a Progress);

impl Drop for Over<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The checked certificate for a position of a chunk, from the token's signature.
fn finish_one(
    p: &Pending,
    signature: &[u8],
    issuers: &BTreeMap<String, (Profile, IssuerCert)>,
) -> Result<Vec<u8>, issue::IssueError> {
    match issuers.get(&p.item.profile) {
        Some((_, issuer)) => engine::check(&p.ready, issuer, signature),
        None => Err(issue::IssueError::Build(format!(
            "no issuer for profile {}",
            p.item.profile
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
    stop: &AtomicBool,
    progress: &Progress,
) {
    // A session whose token faults must stop the run stops the others at once: a token that
    // has gone away can take seconds per failed call.
    let mut streak = crate::signer::FaultStreak::default();
    while let Some((chunk, positions, ready)) = next(jobs) {
        let signatures = positions
            .into_iter()
            .map(|pos| {
                if stop.load(Ordering::SeqCst) || crate::signals::requested().is_some() {
                    return (pos, None);
                }
                let tbs = &ready[pos].ready.prepared.tbs;
                let signed = key.sign(tbs);
                progress.signed(signed.is_ok());
                if streak.record(signed.as_ref().map(|_| ())).is_some() {
                    stop.store(true, Ordering::SeqCst);
                }
                (pos, Some(signed.map_err(issue::IssueError::Sign)))
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
                let r = sig.map(|sig| sig.and_then(|sig| finish_one(&ready[pos], &sig, issuers)));
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
    ready: std::sync::Arc<Vec<Pending>>,
    intent_seqs: Vec<u64>,
    signed: Vec<Option<Signature>>,
    remaining: usize,
    done: BTreeMap<usize, Done>,
    release: Vec<Release>,
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

    /// The log entries for a finished chunk (certificate or abandonment per intent, built by
    /// the engine), and its outcomes and files to release once they are durable.
    fn results(&mut self, out: &Path, tally: &mut Tally, health: &mut Health) -> Vec<Body> {
        let mut bodies = Vec::with_capacity(self.ready.len());
        let signed = std::mem::take(&mut self.signed);
        for ((p, intent_seq), result) in self.ready.iter().zip(&self.intent_seqs).zip(signed) {
            let result = match (result.flatten(), health.halt().cloned()) {
                (Some(r), _) => {
                    health.note(&p.ready, &r);
                    r.map_err(|e| Withheld::from_error(&e))
                }
                (None, Some(halt)) => Err(Withheld::stopped(&halt)),
                (None, None) => Err(Withheld {
                    rule: "token.sign",
                    error: "no result from the token session".into(),
                }),
            };
            let (body, result) = engine::settle(&p.ready, *intent_seq, result);
            bodies.push(body);
            let file = p.item.file.clone();
            let done = match result {
                Ok(der) => {
                    let path = out.join(&p.item.out);
                    self.release.push(Release {
                        path: path.clone(),
                        der,
                        file: file.clone(),
                        profile: p.item.profile.clone(),
                    });
                    tally.issued += 1;
                    Done::Issued {
                        file,
                        serial: p.ready.serial(),
                        out: path,
                        already_issued: false,
                    }
                }
                Err(Withheld { rule, error }) => Done::Failed {
                    file,
                    rule: rule.into(),
                    error,
                },
            };
            self.done.insert(p.index, done);
        }
        bodies
    }
}

/// A certificate to write once its log entry is durable.
struct Release {
    /// Where it goes.
    path: PathBuf,
    /// The certificate.
    der: Vec<u8>,
    /// The input it answers (a file or a Kubernetes object's name).
    file: String,
    /// Its profile.
    profile: String,
}

/// One chunk made ready for signing: outcomes already known, files to release, TBSs to sign.
struct Staged {
    done: BTreeMap<usize, Done>,
    release: Vec<Release>,
    ready: Vec<Pending>,
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
        session: &CaSession<'_>,
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
        let Some(prior) = session.prior(csr_sha256, &item.profile)? else {
            return Ok(false);
        };
        if prior.revoked {
            let error = format!(
                "this CSR's certificate (serial {}) was revoked; it is not issued again",
                prior.serial
            );
            let rule = "revoked".into();
            self.done.insert(index, Done::Failed { file, rule, error });
            return Ok(true);
        }
        let path = ctx.out.join(&item.out);
        self.release.push(Release {
            path: path.clone(),
            der: prior.der,
            file: file.clone(),
            profile: item.profile.clone(),
        });
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
            (_, Some(Ok(ready))) => {
                self.ready.push(Pending { index, item, ready });
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

/// A TBS built for a decided CSR; or why it could not be built.
type Built = Result<Ready, String>;

/// Judges one CSR under its profile and builds its TBS: what staging does per CSR, on every
/// core. Returns the verdict, the CSR's digest once it parsed, and the built certificate.
fn decide_and_prepare(
    ctx: &StageCtx<'_>,
    item: &Item,
    bytes: &[u8],
    now: time::OffsetDateTime,
    serial: &[u8],
) -> (Verdict, Option<String>, Option<Built>) {
    let Some((profile, issuer)) = ctx.issuers.get(&item.profile) else {
        let error = ctx
            .unusable
            .get(&item.profile)
            .cloned()
            .unwrap_or_else(|| format!("no profile {:?}", item.profile));
        let rule = "profile".into();
        return (Verdict::Fail { rule, error }, None, None);
    };
    let request = Request {
        validity: item.requested_validity.as_deref(),
        kubernetes: ctx.inputs.signer_request(item),
        allow_profiles: Some(ctx.allow.clone()),
        compromised: ctx.compromised.clone(),
    };
    let judged = judge(
        profile,
        issuer,
        bytes,
        &request,
        now,
        serial.to_vec(),
        false,
    );
    let built = match (judged.decision, &judged.csr_sha256) {
        (Some(d), Some(sha)) => {
            Some(Ready::new(d, issuer, sha.clone(), None).map_err(|e| e.to_string()))
        }
        _ => None,
    };
    (judged.verdict, judged.csr_sha256, built)
}

/// Prepares a chunk of a plan without touching the log: what the plan already refused, what
/// the log already holds (written again), and for the rest serials, decisions and TBSs, in
/// parallel. Each CSR is read, checked against the plan's digest and judged again by the
/// same rules that made the plan.
fn stage(
    ctx: &StageCtx<'_>,
    session: &CaSession<'_>,
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
        // A plan's output name is data from the stick too: beneath OUT, or the item fails
        // before anything is issued for it.
        if let Err(e) = crate::input::components(&item.out) {
            let (rule, error) = ("output.path".to_owned(), e.to_string());
            staged.file(index, item.clone(), Verdict::Fail { rule, error }, None);
            continue;
        }
        // A file that became a symlink, FIFO or something too large since planning fails its
        // item; the rest of the batch goes on.
        let (bytes, digest) = match ctx.inputs.read(item) {
            Ok(read) => read,
            Err(e) => {
                let (rule, error) = (e.rule().to_owned(), crate::error::chain(&e));
                staged.file(index, item.clone(), Verdict::Fail { rule, error }, None);
                continue;
            }
        };
        if digest != item.sha256 {
            let error = "changed since planning; not signed (plan again and review)".into();
            let rule = "input.changed".into();
            staged.file(index, item.clone(), Verdict::Fail { rule, error }, None);
            continue;
        }
        fresh.push((index, item, bytes));
    }
    let serials = session.serials(fresh.len())?;
    let now = session.clock().now();
    let jobs: Vec<_> = fresh.into_iter().zip(serials).collect();
    let judged = parallel(&jobs, |((_, item, bytes), serial)| {
        decide_and_prepare(ctx, item, bytes, now, serial)
    })?;
    for (((index, item, _), _), (verdict, csr_sha, built)) in jobs.into_iter().zip(judged) {
        if let Some(csr_sha) = &csr_sha
            && staged.settle(ctx, session, index, item, csr_sha, seen)?
        {
            continue;
        }
        staged.file(index, item.clone(), verdict, built);
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
    session: &CaSession<'_>,
    base: usize,
    chunk: &[Found],
    seen: &mut std::collections::HashSet<u128>,
    hasher: &mut PlanHasher,
) -> Result<Staged, Error> {
    let Inputs::Dir(root) = ctx.inputs else {
        return Err(Error::Internal(
            "files found without an input directory".into(),
        ));
    };
    // A serial for every CSR: the few a refusal or a rerun leaves unused are random and never
    // appear anywhere.
    let serials = session.serials(chunk.len())?;
    let now = session.clock().now();
    let jobs: Vec<_> = chunk.iter().zip(serials).collect();
    let judged = parallel(&jobs, |(found, serial)| {
        found.item(root, |item, bytes| {
            let (verdict, csr_sha, built) = decide_and_prepare(ctx, item, bytes, now, serial);
            (verdict, Some((csr_sha, built)))
        })
    })?;
    let mut staged = Staged::new();
    for (offset, (item, judged)) in judged.into_iter().enumerate() {
        hasher.push(&item);
        let index = base + offset;
        let (csr_sha, built) = judged.unwrap_or((None, None));
        // The rule for every rerun: what the log holds is written again, whatever today's
        // verdict (the certificate exists either way).
        if let Some(csr_sha) = &csr_sha
            && staged.settle(ctx, session, index, &item, csr_sha, seen)?
        {
            continue;
        }
        let verdict = item.verdict.clone();
        staged.file(index, item, verdict, built);
    }
    Ok(staged)
}

/// The bytes of an output file: PEM, or for kubeadm's `X.conf` outputs the kubeconfig from the
/// input with the certificate and the CA embedded (and checked against each other and the key).
/// The template is read again through `input` (it was checked when the batch was planned, but
/// the stick is live): if it is now refused, the item fails with that rule; it never becomes
/// an empty or unchanged kubeconfig.
fn output_bytes(
    home: &Home,
    batch: &Batch<'_>,
    item: &str,
    issuer: &str,
    path: &Path,
    der: &[u8],
) -> Result<Vec<u8>, KubeconfigError> {
    let pem = engine::pem("CERTIFICATE", der);
    let root = match batch.inputs {
        Inputs::Objects(objects) => {
            // Leaf first, then the intermediates; the cluster already trusts the root.
            let root = home
                .root()
                .map(|r| engine::pem("CERTIFICATE", &r.der))
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
        Inputs::Dir(root) => root,
    };
    if path.extension().is_none_or(|e| e != "conf") {
        return Ok(pem.into_bytes());
    }
    // The template is the CSR's own name without `.csr` (`kubelet.conf.csr` -> `kubelet.conf`),
    // beneath the input: never a name taken from the output path.
    let name = item.strip_suffix(".csr").unwrap_or(item);
    let template = root.read(name, crate::input::KUBECONFIG_CAP)?;
    let (ca, _) = home.issuer(issuer).map_err(|e| KubeconfigError::Ca {
        file: name.to_owned(),
        reason: crate::error::chain(&e),
    })?;
    kubeadm::fill_kubeconfig(name, &template, der, &ca.der).map(String::into_bytes)
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
