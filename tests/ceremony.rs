//! `ca create` can be run again after any failure (issue 17) and tells the truth about the
//! validity it gives (issue 14). Each drill breaks a `ca create` through the fault-injecting
//! shim (a token error or a wrong signature at each of its three signatures: the new key's
//! self-test, the certificate, the checkpoint) or crashes it at each durable step, then checks
//! that the log verifies and that the same command run again ends with a usable intermediate:
//! installed in the home, chaining to the root with openssl, and signing a leaf.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Env, PIN, openssl, s};

const LIMIT: Duration = Duration::from_secs(60);

/// A token "dev" and a CA home `ca` with a root of `validity`; every run goes through the
/// (healthy) shim, so the shim is the module the home pins.
fn root(validity: &str) -> (Env, PathBuf) {
    let env = Env::with_shim("dev");
    let home = env.path("ca");
    env.hsmca(&[
        "init",
        "--home",
        s(&home),
        "--token",
        "dev",
        "--key-type",
        "ecdsa-p256",
        "--subject",
        "CN=hsmca Ceremony Root",
        "--key-label",
        "root",
        "--validity",
        validity,
    ])
    .ok();
    (env, home)
}

fn create_args<'a>(home: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "ca",
        "create",
        "etcd-ca",
        "--home",
        s(home),
        "--profile",
        "etcd-ca",
        "--subject",
        "CN=etcd-ca",
    ];
    args.extend(extra);
    args
}

#[track_caller]
fn log_verifies(env: &Env, home: &Path) {
    env.hsmca(&["log", "verify", "--home", s(home)]).ok();
}

/// Certificate entries in the log for CA certificates (those `ca create` made).
/// What the operator does after a stop that left entries past the last checkpoint: look, then
/// `log recover`, which signs them (writing commands refuse such a log until then).
fn recover(env: &Env, home: &Path) {
    env.hsmca(&["log", "recover", "--home", s(home)]).ok();
}

fn logged_cas(home: &Path) -> usize {
    std::fs::read_to_string(home.join("log/entries.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "cert" && e["profile"] == "etcd-ca")
        .count()
}

/// The intermediate is installed, chains to the root, and its key in the token signs a leaf
/// that chains through it.
#[track_caller]
fn usable(env: &Env, home: &Path) {
    let config = std::fs::read_to_string(home.join("hsmca.json")).unwrap();
    assert!(config.contains("\"etcd-ca\""), "{config}");
    let ca = home.join("cas/etcd-ca.pem");
    assert!(common::openssl_verifies(&home.join("root.pem"), &ca));
    let csr = env.p256_csr("leaf/client.csr", "/CN=etcd-client/O=etcd");
    env.sign(home, "etcd-client", &[&csr]).ok();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile", s(&home.join("root.pem")), "-untrusted"])
        .arg(&ca)
        .arg(csr.with_extension("crt"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        logged_cas(home),
        1,
        "one intermediate certificate in the log"
    );
    log_verifies(env, home);
}

#[test]
fn issue_17_ca_create_after_a_token_fault_at_each_signature_finishes_on_a_rerun() {
    // C_Sign number 1 is the new key's self-test, 2 the certificate, 3 the checkpoint.
    for (after, fault, exit, resumed) in [
        (
            "0",
            "fail:CKR_DEVICE_ERROR",
            3,
            "with the key an earlier, failed run left",
        ),
        (
            "1",
            "fail:CKR_DEVICE_ERROR",
            3,
            "with the key an earlier, failed run left",
        ),
        (
            "1",
            "corrupt",
            5,
            "with the key an earlier, failed run left",
        ),
        (
            "1",
            "session-lost",
            3,
            "with the key an earlier, failed run left",
        ),
        (
            "2",
            "fail:CKR_DEVICE_ERROR",
            3,
            "installed (the certificate an earlier",
        ),
    ] {
        let (env, home) = root("20y");
        let faults = [("HSMCA_SHIM_SIGN", fault), ("HSMCA_SHIM_SIGN_AFTER", after)];
        let run = env.hsmca_faulty(&create_args(&home, &[]), &faults, LIMIT);
        assert_eq!(run.code(), exit, "{fault} after {after}: {}", run.all());
        assert!(
            !home.join("cas/etcd-ca.pem").exists(),
            "{fault} after {after}"
        );
        recover(&env, &home);
        log_verifies(&env, &home);
        let again = env.hsmca(&create_args(&home, &[]));
        again.ok();
        assert!(
            again.stdout().contains(resumed),
            "{fault} after {after}: {}",
            again.all()
        );
        usable(&env, &home);
    }
}

#[test]
fn issue_17_ca_create_after_a_crash_at_each_step_finishes_on_a_rerun() {
    for (point, resumed) in [
        ("after-intent", "with the key an earlier, failed run left"),
        ("after-cert", "installed (the certificate an earlier"),
        ("after-checkpoint", "installed (the certificate an earlier"),
    ] {
        let (env, home) = root("20y");
        let run = env.hsmca_env(
            &create_args(&home, &[]),
            &[("HSMCA_DANGER_CRASH_AT", point)],
        );
        assert!(!run.0.status.success(), "{point}: {}", run.all());
        recover(&env, &home);
        let again = env.hsmca(&create_args(&home, &["--json"]));
        again.ok();
        let report: serde_json::Value = serde_json::from_str(&again.stdout()).unwrap();
        let expected = if resumed.starts_with("installed") {
            "installed-from-log"
        } else {
            "key-reused"
        };
        assert_eq!(report["resumed"], expected, "{point}: {}", again.all());
        usable(&env, &home);
    }
}

#[test]
fn issue_17_a_key_under_the_label_that_the_token_did_not_generate_is_refused_with_key_label() {
    let (env, home) = root("20y");
    // A key imported under the label the CA's key would get: CKA_LOCAL is false.
    let pem = env.path("foreign.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        s(&pem),
    ]);
    let pkcs8 = env.path("foreign.p8");
    openssl(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        s(&pem),
        "-out",
        s(&pkcs8),
    ]);
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &env.conf)
        .args([
            "--import",
            s(&pkcs8),
            "--token",
            "dev",
            "--label",
            "root-etcd-ca",
        ])
        .args(["--id", "abcd", "--pin", PIN])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = env.hsmca(&create_args(&home, &[]));
    run.fails_with(2, "the issuance log has never seen");
    assert!(run.stderr().contains("CKA_LOCAL false"), "{}", run.all());
    let hint = format!(
        "hint: if you know where that key came from, remove it from the token yourself; or leave it and give the new CA's key another label: `hsmca ca create etcd-ca --home {} --profile etcd-ca --subject CN=etcd-ca --key-label root-etcd-ca-2`",
        home.display()
    );
    assert!(run.stderr().contains(&hint), "{}", run.all());
    assert!(!home.join("cas/etcd-ca.pem").exists());
    env.hsmca(&create_args(&home, &["--key-label", "root-etcd-ca-2"]))
        .ok();
    usable(&env, &home);
    let config = std::fs::read_to_string(home.join("hsmca.json")).unwrap();
    assert!(config.contains("\"root-etcd-ca-2\""), "{config}");
    // The home's own keys are never taken for a CA's.
    let run = env.hsmca(&[
        "ca",
        "create",
        "kubernetes-ca",
        "--home",
        s(&home),
        "--profile",
        "kubernetes-ca",
        "--subject",
        "CN=kubernetes-ca",
        "--key-label",
        "root",
    ]);
    run.fails_with(2, "key label \"root\" is the key of the root");
}

#[test]
fn issue_14_ca_create_cuts_the_default_validity_to_the_root_and_refuses_a_longer_explicit_one() {
    // The root lives 5 years; etcd-ca's default is 3650 days.
    let (env, home) = root("5y");
    let root_end = openssl(&[
        "x509",
        "-in",
        s(&home.join("root.pem")),
        "-noout",
        "-enddate",
    ]);
    let run = env.hsmca(&create_args(&home, &["--validity", "3650d"]));
    run.fails_with(2, "rule validity.issuer");
    let prefix = format!(
        "`hsmca ca create etcd-ca --home {} --profile etcd-ca --subject CN=etcd-ca --validity ",
        home.display()
    );
    assert!(run.stderr().contains(&prefix), "{}", run.all());
    assert!(!home.join("cas/etcd-ca.pem").exists());

    let run = env.hsmca(&create_args(&home, &["--json"]));
    run.ok();
    let report: serde_json::Value = serde_json::from_str(&run.stdout()).unwrap();
    let clamped = report["clamped_to_issuer"].as_str().unwrap().to_owned();
    assert_eq!(report["cert"]["not_after"].as_str().unwrap(), clamped);
    let sha = report["cert_sha256"].as_str().unwrap();
    let ca = home.join("cas/etcd-ca.pem");
    let fingerprint = openssl(&["x509", "-in", s(&ca), "-noout", "-fingerprint", "-sha256"]);
    assert_eq!(
        fingerprint
            .trim()
            .rsplit('=')
            .next()
            .unwrap()
            .replace(':', "")
            .to_lowercase(),
        sha
    );
    let ca_end = openssl(&["x509", "-in", s(&ca), "-noout", "-enddate"]);
    assert_eq!(ca_end, root_end);
    usable(&env, &home);
}

#[test]
fn issue_14_ca_create_says_when_it_cut_the_validity_and_prints_the_fingerprint() {
    let (env, home) = root("5y");
    let run = env.hsmca(&create_args(&home, &[]));
    run.ok();
    assert!(
        run.stdout()
            .contains("validity cut to the issuer's notAfter"),
        "{}",
        run.all()
    );
    assert!(run.stdout().contains("  sha256   "), "{}", run.all());
}

#[test]
fn issue_17_a_rerun_asking_for_another_key_type_says_how_to_finish_or_start_afresh() {
    let (env, home) = root("20y");
    let run = env.hsmca_env(
        &create_args(&home, &[]),
        &[("HSMCA_DANGER_CRASH_AT", "after-cert")],
    );
    assert!(!run.0.status.success(), "{}", run.all());
    recover(&env, &home);
    let run = env.hsmca(&create_args(&home, &["--key-type", "ecdsa-p384"]));
    run.fails_with(2, "is ecdsa-p256, not ecdsa-p384");
    let finish = format!(
        "`hsmca ca create etcd-ca --home {} --profile etcd-ca --subject CN=etcd-ca`",
        home.display()
    );
    assert!(run.stderr().contains(&finish), "{}", run.all());
    // Another label starts afresh, but not with a subject the log's CA certificate has.
    let run = env.hsmca(&create_args(
        &home,
        &["--key-type", "ecdsa-p384", "--key-label", "fresh"],
    ));
    run.fails_with(2, "never installed in this home");
    let install = format!(
        "run it again with the key label it used (`hsmca ca create etcd-ca --home {} --profile etcd-ca --subject CN=etcd-ca --key-type ecdsa-p384` for the default one)",
        home.display()
    );
    assert!(run.stderr().contains(&install), "{}", run.all());
    env.hsmca(&create_args(&home, &[])).ok();
    usable(&env, &home);
}
