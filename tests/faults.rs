//! A misbehaving token (issue 17): hsmca runs against SoftHSM2 through the fault-injecting
//! shim in `tests/shim/`, which zeroes or freezes `C_GenerateRandom` and fails `C_Login` and
//! `C_Sign` on demand. Every run has a time limit: a hang fails the test. Each fault ends with
//! exit 3, a message naming the test or the `CKR_` code, and a log that still verifies. The
//! shim also reports what it sees of the PIN's hygiene at `C_Login` (issue 13).
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Env, s};

/// Long enough for a debug build on a busy 2-core machine; a spinning loop never finishes.
const LIMIT: Duration = Duration::from_secs(30);

fn init_args(home: &Path) -> Vec<&str> {
    vec![
        "init",
        "--home",
        s(home),
        "--token",
        "dev",
        "--key-type",
        "ecdsa-p256",
        "--subject",
        "CN=hsmca Fault Root",
        "--key-label",
        "root",
    ]
}

/// A token "dev" and a CA home `ca` on it with test-any-key installed, every run through the
/// (healthy) shim, so the shim is the module the home pins.
fn ca() -> (Env, PathBuf) {
    let env = Env::with_shim("dev");
    let home = env.init("ca", "dev", "ecdsa-p256");
    (env, home)
}

/// `hsmca sign --home HOME --profile test-any-key CSR...`.
fn sign_args<'a>(home: &'a Path, csrs: &[&'a Path]) -> Vec<&'a str> {
    let mut args = vec!["sign", "--home", s(home), "--profile", "test-any-key"];
    args.extend(csrs.iter().map(|c| s(c)));
    args
}

#[track_caller]
fn log_verifies(env: &Env, home: &Path) {
    env.hsmca(&["log", "verify", "--home", s(home)]).ok();
}

/// After a token fault that kept the checkpoint from being signed, the entries past it are an
/// unsigned tail: `log verify` says so, and `log recover` (the operator's step) signs them;
/// then the log verifies.
#[track_caller]
fn recovers_and_verifies(env: &Env, home: &Path) {
    env.hsmca(&["log", "recover", "--home", s(home)]).ok();
    log_verifies(env, home);
}

#[test]
fn the_shim_passes_a_healthy_token_through() {
    let (env, home) = ca();
    let csr = env.p256_csr("csr/a.csr", "/CN=a");
    env.hsmca_faulty(&sign_args(&home, &[&csr]), &[], LIMIT)
        .ok();
    log_verifies(&env, &home);
}

#[test]
fn issue_17_init_with_a_zero_or_stuck_rng_stops_with_exit_3_and_no_home() {
    for (fault, test) in [("zero", "all-zero test"), ("stuck", "repeat test")] {
        let env = Env::with_shim("dev");
        let home = env.path("ca");
        let run = env.hsmca_faulty(&init_args(&home), &[("HSMCA_SHIM_RNG", fault)], LIMIT);
        run.fails_with(3, "failed the RNG health check");
        assert!(run.stderr().contains(test), "{fault}: {}", run.all());
        assert!(
            run.stderr()
                .contains("hint: the token's random number generator is failing"),
            "{}",
            run.all()
        );
        assert!(!home.exists(), "{fault}: a CA home was made");
        // Nothing went into the token either: the same label works once the RNG is healthy.
        env.hsmca(&init_args(&home)).ok();
        log_verifies(&env, &home);
    }
}

#[test]
fn issue_17_sign_with_a_stuck_rng_exits_3_instead_of_spinning() {
    let (env, home) = ca();
    let a = env.p256_csr("csr/a.csr", "/CN=a");
    let b = env.p256_csr("csr/b.csr", "/CN=b");
    let args = sign_args(&home, &[&a, &b]);
    // The first draw of a stuck RNG looks random; the second repeats it.
    let run = env.hsmca_faulty(&args, &[("HSMCA_SHIM_RNG", "stuck")], LIMIT);
    run.fails_with(3, "failed the RNG health check");
    log_verifies(&env, &home);
    // A healthy token finishes the job, issuing each CSR once.
    env.hsmca(&args).ok();
    log_verifies(&env, &home);
    assert!(a.with_extension("crt").exists() && b.with_extension("crt").exists());
}

#[test]
fn issue_17_sign_dir_with_a_stuck_rng_exits_3_instead_of_spinning() {
    let (env, home) = ca();
    let names = ["a", "b", "c", "d"];
    for name in names {
        env.p256_csr(&format!("in/{name}.csr"), &format!("/CN={name}"));
    }
    let (input, out) = (env.path("in"), env.path("out"));
    let args = [
        "sign-dir",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        s(&input),
        "--out",
        s(&out),
    ];
    // The token's start-up test (two draws at login) sees the stuck generator repeat itself
    // before any serial is drawn.
    let run = env.hsmca_faulty(&args, &[("HSMCA_SHIM_RNG", "stuck")], LIMIT);
    run.fails_with(3, "failed the RNG health check");
    assert!(run.stderr().contains("repeat test"), "{}", run.all());
    log_verifies(&env, &home);
    env.hsmca(&args).ok();
    log_verifies(&env, &home);
    for name in names {
        assert!(out.join(format!("{name}.crt")).exists(), "{name}.crt");
    }
}

#[test]
fn issue_17_login_and_sign_errors_name_the_function_and_ckr_code() {
    let (env, home) = ca();
    let csr = env.p256_csr("csr/a.csr", "/CN=a");
    let args = sign_args(&home, &[&csr]);
    let run = env.hsmca_faulty(
        &args,
        &[("HSMCA_SHIM_LOGIN", "fail:CKR_DEVICE_ERROR")],
        LIMIT,
    );
    run.fails_with(3, "C_Login returned CKR_DEVICE_ERROR");
    assert!(run.stderr().contains("hint: the token reported a failure"));

    // Every C_Sign fails, or only the checkpoint's (the certificate's passes): a token error
    // is exit 3 wherever it happens, a wrong signature exit 5; nothing is released (a
    // certificate is released only under a checkpoint), and the log verifies.
    for after in ["0", "1"] {
        for (fault, exit, says) in [
            (
                "fail:CKR_DEVICE_ERROR",
                3,
                "C_Sign returned CKR_DEVICE_ERROR",
            ),
            (
                "session-lost",
                3,
                "C_Sign returned CKR_SESSION_HANDLE_INVALID",
            ),
            ("corrupt", 5, "does not verify"),
        ] {
            // A CSR of its own: a rerun releases what an earlier drill logged.
            let name = format!("{}{after}", &fault[..4]);
            let csr = env.p256_csr(&format!("csr/{name}.csr"), &format!("/CN={name}"));
            let faults = [("HSMCA_SHIM_SIGN", fault), ("HSMCA_SHIM_SIGN_AFTER", after)];
            let run = env.hsmca_faulty(&sign_args(&home, &[&csr]), &faults, LIMIT);
            run.fails_with(exit, says);
            assert!(!csr.with_extension("crt").exists(), "{name}: released");
            recovers_and_verifies(&env, &home);
        }
    }
    env.hsmca(&args).ok();
    log_verifies(&env, &home);
}

#[test]
fn the_shim_slows_c_sign_down_on_request() {
    let (env, home) = ca();
    let csr = env.p256_csr("csr/a.csr", "/CN=a");
    let start = Instant::now();
    env.hsmca_faulty(
        &sign_args(&home, &[&csr]),
        &[("HSMCA_SHIM_SIGN", "delay:300ms")],
        LIMIT,
    )
    .ok();
    // At least the certificate and the checkpoint were signed, 300 ms each.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(600), "{took:?}");
    log_verifies(&env, &home);
}

#[test]
fn a_misspelt_shim_setting_fails_loudly_instead_of_running_healthy() {
    let env = Env::with_shim("dev");
    let home = env.path("ca");
    let run = env.hsmca_faulty(&init_args(&home), &[("HSMCA_SHIM_SIGN", "corupt")], LIMIT);
    run.fails_with(3, "cannot load PKCS#11 module");
    assert!(run.stderr().contains("hsmca_shim: HSMCA_SHIM_SIGN: corupt"));
}

#[test]
fn issue_13_at_login_the_pin_is_out_of_the_environment_and_the_process_not_dumpable() {
    let (env, home) = ca();
    let csr = env.p256_csr("csr/a.csr", "/CN=a");
    let report = env.path("login.txt");
    env.hsmca_faulty(
        &sign_args(&home, &[&csr]),
        &[("HSMCA_SHIM_REPORT", s(&report))],
        LIMIT,
    )
    .ok();
    // Written by the shim inside hsmca's process, at C_Login (HSMCA_PIN was set for it).
    let seen = std::fs::read_to_string(&report).unwrap();
    assert_eq!(seen, "pin_env=absent dumpable=0 core=0\n");
}

#[test]
fn issue_13_a_pin_file_others_can_read_is_refused_with_exit_3_and_the_chmod() {
    use std::os::unix::fs::PermissionsExt;
    let (env, home) = ca();
    let csr = env.p256_csr("csr/a.csr", "/CN=a");
    let pin = env.path("pin");
    std::fs::write(&pin, format!("{}\n", common::PIN)).unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut args = sign_args(&home, &[&csr]);
    args.extend(["--pin-file", s(&pin)]);
    let run = env.hsmca_env(&args, &[("HSMCA_PIN", "")]);
    run.fails_with(3, &format!("run `chmod 600 {}`", pin.display()));
    assert!(run.stderr().contains("mode 0644"), "{}", run.all());
    assert!(!csr.with_extension("crt").exists());
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    env.hsmca_env(&args, &[("HSMCA_PIN", "")]).ok();
    log_verifies(&env, &home);
}
