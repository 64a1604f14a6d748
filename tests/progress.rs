//! The progress line of `sign-dir` (issue 17): it counts done, issued, written again, refused
//! and failed separately, issued never runs ahead of done, and with a slow token (200 ms a
//! signature, through the fault-injecting shim) it moves with each certificate, not once per
//! chunk. Here stderr is a pipe, so the line is the plain form, printed when the counts change.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::time::Duration;

use common::{Env, s};

/// `done/total`, issued, written again, refused, failed, from one progress line.
fn parse(line: &str) -> Option<[usize; 6]> {
    let (done, rest) = line.split_once(" CSRs: ")?;
    let (done, total) = done.split_once('/')?;
    let mut n = [done.parse().ok()?, total.parse().ok()?, 0, 0, 0, 0];
    for (i, part) in rest.split(", ").take(4).enumerate() {
        n[i + 2] = part.split(' ').next()?.parse().ok()?;
    }
    Some(n)
}

#[test]
fn issue_17_progress_counts_each_outcome_apart_and_moves_with_each_certificate() {
    let env = Env::with_shim("progress");
    let home = env.init("ca", "progress", "ecdsa-p256");
    for i in 0..16 {
        env.p256_csr(&format!("in/c-{i:02}.csr"), &format!("/CN=c{i}"));
    }
    env.p256_csr("in/refused.csr", "/CN=not a dns name");
    std::fs::write(env.path("in/broken.csr"), "not a CSR\n").unwrap();
    // c-00 is issued beforehand: the batch writes its certificate again.
    let first = env.path("in/c-00.csr");
    env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        s(&first),
        "--out",
        s(&env.path("before.crt")),
    ])
    .ok();

    let out = env.path("out");
    let run = env.hsmca_faulty(
        &[
            "sign-dir",
            "--home",
            s(&home),
            "--profile",
            "test-any-key",
            s(&env.path("in")),
            "--out",
            s(&out),
            "--sessions",
            "1",
            "--json",
        ],
        &[("HSMCA_SHIM_SIGN", "delay:200ms")],
        Duration::from_secs(60),
    );
    run.code_is(1);
    let lines: Vec<[usize; 6]> = run.stderr().lines().filter_map(parse).collect();
    assert_eq!(
        lines.last(),
        Some(&[18, 18, 15, 1, 1, 1]),
        "{}",
        run.stderr()
    );
    // The 18 CSRs are one chunk: the line moved while its certificates were signed.
    let moving = lines.iter().filter(|n| n[2] > 0 && n[2] < 15).count();
    assert!(moving >= 2, "{}", run.stderr());
    for pair in lines.windows(2) {
        assert!(pair[0][0] <= pair[1][0], "done went back: {}", run.stderr());
    }
    for n in &lines {
        assert!(n[2] + n[3] + n[4] + n[5] <= n[0], "ahead of done: {n:?}");
    }
    let report: serde_json::Value =
        serde_json::from_str(run.stdout().lines().last().unwrap()).unwrap();
    assert_eq!(
        (
            &report["issued"],
            &report["reissued_files"],
            &report["refused"],
            &report["failed"],
            &report["handled"],
        ),
        (&15.into(), &1.into(), &1.into(), &1.into(), &18.into()),
        "{report}"
    );
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

/// Issue 16: a rerun that only writes files again issues nothing, says so (`written again`,
/// not `issued`), and leaves no log entry after the last signed checkpoint: the checkpoint
/// covers every entry, and `log verify` passes.
#[test]
fn a_rerun_that_only_writes_again_says_so_and_leaves_no_unsigned_entry() {
    let env = Env::new("rerun");
    let home = env.init("ca", "rerun", "ecdsa-p256");
    for i in 0..3 {
        env.p256_csr(&format!("in/c-{i}.csr"), &format!("/CN=c{i}"));
    }
    let input = env.path("in");
    let sign_dir = |out: &str| {
        env.hsmca(&[
            "sign-dir",
            "--home",
            s(&home),
            "--profile",
            "test-any-key",
            s(&input),
            "--out",
            s(&env.path(out)),
        ])
    };
    let covered = || {
        let entries = std::fs::read_to_string(home.join("log/entries.jsonl"))
            .unwrap()
            .lines()
            .count();
        let checkpoint = std::fs::read_to_string(home.join("log/checkpoint")).unwrap();
        let size: usize = checkpoint.lines().nth(1).unwrap().parse().unwrap();
        (entries, size)
    };
    sign_dir("out1").ok();
    let rerun = sign_dir("out2");
    rerun.ok();
    assert!(
        rerun.all().contains("0 issued, 3 written again"),
        "{}",
        rerun.all()
    );
    let (entries, size) = covered();
    assert_eq!(entries, size, "every entry under the last checkpoint");
    // The same with `sign`, one CSR at a time.
    let again = env.sign(&home, "test-any-key", &[&env.path("in/c-0.csr")]);
    again.ok();
    assert!(
        again.stdout().contains("1 of 1 CSR ok (1 written again)"),
        "{}",
        again.all()
    );
    assert_eq!(
        covered(),
        (entries, size),
        "nothing logged by a rerun of sign"
    );
    let verify = env.hsmca(&["log", "verify", "--home", s(&home)]);
    verify.ok();
    assert!(!verify.all().contains("unsigned"), "{}", verify.all());
}
