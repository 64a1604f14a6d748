//! How a batch stops (issue 11's one rule, issue 17's fail-fast and signals): a token that signs
//! wrongly stops the run at once with exit 5; a token that fails several signatures in a row
//! stops it with exit 3; SIGTERM stops it cleanly with exit 143. Each time nothing bad is
//! released, what was issued before the stop is written, the log verifies, no temporary is
//! left, and the same command run again finishes the work issuing no CSR twice.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, s};

const LIMIT: Duration = Duration::from_secs(60);
const CSRS: usize = 100;

/// A CA home (test-any-key installed) and `CSRS` CSRs under `in/`; every run goes through the
/// shim, healthy unless a test says otherwise.
fn setup(label: &str) -> (Env, std::path::PathBuf) {
    let env = Env::with_shim(label);
    let home = env.init("ca", label, "ecdsa-p256");
    for i in 0..CSRS {
        env.p256_csr(&format!("in/c-{i:02}.csr"), &format!("/CN=c{i}"));
    }
    (env, home)
}

fn sign_dir<'a>(home: &'a Path, input: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "sign-dir",
        "--home",
        s(home),
        "--profile",
        "test-any-key",
        s(input),
        "--out",
        s(out),
        "--sessions",
        "1",
    ]
}

/// Certificates in the log, and the CSR digests they answer.
fn logged(home: &Path) -> (usize, HashSet<String>) {
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    let certs: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "cert")
        .collect();
    let csrs = certs
        .iter()
        .map(|e| e["csr_sha256"].as_str().unwrap().to_owned())
        .collect();
    (certs.len(), csrs)
}

/// Files hsmca left half-made under `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

/// After a stop: the log verifies, nothing half-written is left, every certificate file
/// written is in the log, and the rerun finishes issuing each CSR exactly once.
fn rerun_finishes(env: &Env, home: &Path, args: &[&str], out: &Path) {
    // A stop that kept the last checkpoint from being signed leaves an unsigned tail, which
    // `log verify` reports and writing commands refuse until the operator runs `log recover`.
    env.hsmca(&["log", "recover", "--home", s(home)]).ok();
    env.hsmca(&["log", "verify", "--home", s(home)]).ok();
    assert_eq!(temporaries(out), Vec::<String>::new());
    env.hsmca(args).ok();
    env.hsmca(&["log", "verify", "--home", s(home)]).ok();
    let (certs, csrs) = logged(home);
    assert_eq!(certs, CSRS, "every CSR issued exactly once");
    assert_eq!(csrs.len(), CSRS);
    for i in 0..CSRS {
        assert!(out.join(format!("c-{i:02}.crt")).exists(), "c-{i:02}.crt");
    }
}

#[test]
fn a_token_that_signs_wrongly_stops_the_batch_with_exit_5() {
    let (env, home) = setup("halt5");
    let (input, out) = (env.path("in"), env.path("out"));
    let args = sign_dir(&home, &input, &out);
    // The log key's checkpoint signatures pass; the CA key's come back with a bit flipped.
    let run = env.hsmca_faulty(&args, &[("HSMCA_SHIM_SIGN", "corrupt")], LIMIT);
    // The shim corrupts every signature, the checkpoint's too: the run stops before anything is
    // released, as a token that signs wrongly.
    run.code_is(5);
    assert!(run.stderr().contains("does not verify"), "{}", run.all());
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    assert!(
        log.contains("failed verification"),
        "abandoned with the reason"
    );
    let (certs, _) = logged(&home);
    assert_eq!(certs, 0, "no corrupt certificate is logged");
    let released = std::fs::read_dir(&out)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".crt"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(released, 0, "nothing released");
    rerun_finishes(&env, &home, &args, &out);
}

#[test]
fn a_token_that_keeps_failing_stops_the_batch_with_exit_3() {
    let (env, home) = setup("halt3");
    let (input, out) = (env.path("in"), env.path("out"));
    let args = sign_dir(&home, &input, &out);
    let start = Instant::now();
    let run = env.hsmca_faulty(
        &args,
        &[("HSMCA_SHIM_SIGN", "fail:CKR_DEVICE_ERROR")],
        LIMIT,
    );
    // The token fails the checkpoint's signature too: a token fault either way, named by its
    // CKR_ code.
    run.code_is(3);
    assert!(run.stderr().contains("CKR_DEVICE_ERROR"), "{}", run.all());
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    let abandoned = log.matches("\"type\":\"abandon\"").count();
    assert!(
        abandoned >= 3,
        "the failed signatures are abandoned in the log"
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    rerun_finishes(&env, &home, &args, &out);
}

#[test]
fn sigterm_stops_the_batch_cleanly_and_the_rerun_finishes() {
    let (env, home) = setup("halt143");
    let (input, out) = (env.path("in"), env.path("out"));
    let args = sign_dir(&home, &input, &out);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hsmca"));
    cmd.env("SOFTHSM2_CONF", &env.conf)
        .env("HSMCA_PIN", common::PIN)
        .env("HSMCA_PKCS11_MODULE", common::shim())
        .env("HSMCA_SHIM_MODULE", common::real_module())
        .env("HSMCA_SHIM_SIGN", "delay:40ms")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Wait until the first certificates are logged, then ask the run to stop.
    let deadline = Instant::now() + LIMIT;
    while logged_or_zero(&home) == 0 {
        assert!(Instant::now() < deadline, "no certificate was ever logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let stopped = Instant::now();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "{stderr}");
    assert!(
        stopped.elapsed() < Duration::from_secs(20),
        "{:?}",
        stopped.elapsed()
    );
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
    assert!(stderr.contains("run the same command again"), "{stderr}");
    let (certs, _) = logged(&home);
    assert!(certs < CSRS, "stopped before the end: {certs}");
    // What was logged before the stop was written.
    for e in std::fs::read_to_string(home.join("log/entries.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "cert")
    {
        let serial = e["serial"].as_str().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains(serial), "serial {serial} reported");
    }
    rerun_finishes(&env, &home, &args, &out);
}

fn logged_or_zero(home: &Path) -> usize {
    std::fs::read_to_string(home.join("log/entries.jsonl"))
        .map(|l| l.matches("\"type\":\"cert\"").count())
        .unwrap_or(0)
}
