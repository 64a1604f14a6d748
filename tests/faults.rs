//! A misbehaving token (issue 17): hsmca runs against SoftHSM2 through the fault-injecting
//! shim in `tests/shim/`, which zeroes or freezes `C_GenerateRandom` and fails `C_Login` and
//! `C_Sign` on demand. Every run has a time limit: a hang fails the test. Each fault ends with
//! exit 3, a message naming the test or the `CKR_` code, and a log that still verifies. The
//! shim also reports what it sees of the PIN's hygiene at `C_Login` (issue 13).
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::time::Duration;

use common::{Env, s};

/// Long enough for a debug build on a busy 2-core machine; a spinning loop never finishes.
const LIMIT: Duration = Duration::from_secs(30);

fn init_args<'a>(home: &'a str, label: &'a str) -> Vec<&'a str> {
    vec![
        "init",
        "--home",
        home,
        "--token",
        "dev",
        "--key-type",
        "ecdsa-p256",
        "--subject",
        "CN=hsmca Fault Root",
        "--key-label",
        label,
    ]
}

#[test]
fn the_shim_passes_a_healthy_token_through() {
    let env = Env::new("dev");
    let home = env.path("ca");
    env.hsmca_faulty(&init_args(s(&home), "root"), &[], LIMIT)
        .ok();
    let csr = env.p256_csr("csr/a.csr", "/CN=a");
    env.hsmca_faulty(
        &[
            "sign",
            "--home",
            s(&home),
            "--profile",
            "test-any-key",
            s(&csr),
        ],
        &[],
        LIMIT,
    )
    .ok();
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn issue_17_init_with_an_all_zero_rng_stops_with_exit_3_and_no_home() {
    let env = Env::new("dev");
    let home = env.path("ca");
    let run = env.hsmca_faulty(
        &init_args(s(&home), "root"),
        &[("HSMCA_SHIM_RNG", "zero")],
        LIMIT,
    );
    run.fails_with(3, "failed the RNG health check");
    assert!(run.stderr().contains("all-zero test"), "{}", run.all());
    assert!(!home.exists(), "a CA home was made from zero bytes");
    // Nothing went into the token either: the same label works once the RNG is healthy.
    env.hsmca(&init_args(s(&home), "root")).ok();
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn issue_17_init_with_a_stuck_rng_stops_with_exit_3_and_no_home() {
    let env = Env::new("dev");
    let home = env.path("ca");
    let run = env.hsmca_faulty(
        &init_args(s(&home), "root"),
        &[("HSMCA_SHIM_RNG", "stuck")],
        LIMIT,
    );
    run.fails_with(3, "failed the RNG health check");
    assert!(run.stderr().contains("repeat test"), "{}", run.all());
    assert!(
        run.stderr()
            .contains("hint: the token's random number generator is failing")
    );
    assert!(!home.exists());
}

#[test]
fn issue_17_sign_with_a_stuck_rng_exits_3_instead_of_spinning() {
    let env = Env::new("dev");
    let home = env.path("ca");
    env.hsmca(&init_args(s(&home), "root")).ok();
    let a = env.p256_csr("csr/a.csr", "/CN=a");
    let b = env.p256_csr("csr/b.csr", "/CN=b");
    let args = [
        "sign",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        s(&a),
        s(&b),
    ];
    // The first draw of a stuck RNG looks random; the second repeats it.
    let run = env.hsmca_faulty(&args, &[("HSMCA_SHIM_RNG", "stuck")], LIMIT);
    run.fails_with(3, "failed the RNG health check");
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    // A healthy token finishes the job, issuing each CSR once.
    env.hsmca(&args).ok();
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    assert!(a.with_extension("crt").exists() && b.with_extension("crt").exists());
}

#[test]
fn issue_17_login_and_sign_errors_name_the_function_and_ckr_code() {
    let env = Env::new("dev");
    let home = env.path("ca");
    env.hsmca(&init_args(s(&home), "root")).ok();
    let csr = env.p256_csr("csr/a.csr", "/CN=a");
    let args = [
        "sign",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        s(&csr),
    ];
    let run = env.hsmca_faulty(
        &args,
        &[("HSMCA_SHIM_LOGIN", "fail:CKR_DEVICE_ERROR")],
        LIMIT,
    );
    run.fails_with(3, "C_Login returned CKR_DEVICE_ERROR");
    assert!(run.stderr().contains("hint: the token reported a failure"));

    // Which C_Sign fails first (the certificate's or a checkpoint's) and the exit code that
    // follows are the issuance engine's business; the code is named either way.
    for (fault, code) in [
        ("fail:CKR_DEVICE_ERROR", "C_Sign returned CKR_DEVICE_ERROR"),
        ("session-lost", "C_Sign returned CKR_SESSION_HANDLE_INVALID"),
    ] {
        let run = env.hsmca_faulty(&args, &[("HSMCA_SHIM_SIGN", fault)], LIMIT);
        assert_ne!(run.code(), 0, "{}", run.all());
        assert!(run.all().contains(code), "{fault}: {}", run.all());
        assert!(!csr.with_extension("crt").exists());
        env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    }
    env.hsmca(&args).ok();
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn a_misspelt_shim_setting_fails_loudly_instead_of_running_healthy() {
    let env = Env::new("dev");
    let home = env.path("ca");
    let run = env.hsmca_faulty(
        &init_args(s(&home), "root"),
        &[("HSMCA_SHIM_SIGN", "corupt")],
        LIMIT,
    );
    run.fails_with(3, "cannot load PKCS#11 module");
    assert!(run.stderr().contains("hsmca_shim: HSMCA_SHIM_SIGN: corupt"));
}

#[test]
fn issue_13_at_login_the_pin_is_out_of_the_environment_and_the_process_not_dumpable() {
    let env = Env::new("dev");
    let home = env.path("ca");
    env.hsmca(&init_args(s(&home), "root")).ok();
    let csr = env.p256_csr("csr/a.csr", "/CN=a");
    let report = env.path("login.txt");
    env.hsmca_faulty(
        &[
            "sign",
            "--home",
            s(&home),
            "--profile",
            "test-any-key",
            s(&csr),
        ],
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
    let env = Env::new("dev");
    let home = env.path("ca");
    env.hsmca(&init_args(s(&home), "root")).ok();
    let csr = env.p256_csr("csr/a.csr", "/CN=a");
    let pin = env.path("pin");
    std::fs::write(&pin, format!("{}\n", common::PIN)).unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let args = [
        "sign",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        "--pin-file",
        s(&pin),
        s(&csr),
    ];
    let run = env.hsmca_env(&args, &[("HSMCA_PIN", "")]);
    run.fails_with(3, &format!("run `chmod 600 {}`", pin.display()));
    assert!(run.stderr().contains("mode 0644"), "{}", run.all());
    assert!(!csr.with_extension("crt").exists());
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    env.hsmca_env(&args, &[("HSMCA_PIN", "")]).ok();
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn issue_17_sign_dir_with_a_stuck_rng_exits_3_instead_of_spinning() {
    let env = Env::new("dev");
    let home = env.path("ca");
    env.hsmca(&init_args(s(&home), "root")).ok();
    for name in ["a", "b", "c", "d"] {
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
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    env.hsmca(&args).ok();
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    for name in ["a", "b", "c", "d"] {
        assert!(out.join(format!("{name}.crt")).exists(), "{name}.crt");
    }
}

#[test]
fn the_shim_flips_a_signature_bit_and_hsmca_withholds_the_certificate() {
    let env = Env::new("dev");
    let home = env.path("ca");
    env.hsmca(&init_args(s(&home), "root")).ok();
    let csr = env.p256_csr("csr/a.csr", "/CN=a");
    let args = [
        "sign",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        s(&csr),
    ];
    let run = env.hsmca_faulty(&args, &[("HSMCA_SHIM_SIGN", "corrupt")], LIMIT);
    assert_ne!(run.code(), 0, "{}", run.all());
    assert!(
        !csr.with_extension("crt").exists(),
        "a corrupt signature was released"
    );
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    env.hsmca(&args).ok();
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn the_shim_slows_c_sign_down_on_request() {
    let env = Env::new("dev");
    let home = env.path("ca");
    env.hsmca(&init_args(s(&home), "root")).ok();
    let csr = env.p256_csr("csr/a.csr", "/CN=a");
    let start = std::time::Instant::now();
    env.hsmca_faulty(
        &[
            "sign",
            "--home",
            s(&home),
            "--profile",
            "test-any-key",
            s(&csr),
        ],
        &[("HSMCA_SHIM_SIGN", "delay:300ms")],
        LIMIT,
    )
    .ok();
    // At least the certificate and the checkpoint were signed, 300 ms each.
    assert!(
        start.elapsed() >= Duration::from_millis(600),
        "{:?}",
        start.elapsed()
    );
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}
