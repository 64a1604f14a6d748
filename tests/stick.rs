//! Issue 12, the hostile USB stick: every attack from the issue, end to end with the real
//! binary on real files, FIFOs and symlinks, against a SoftHSM2 token. Each run is wrapped in
//! `timeout`, so a hang fails the test instead of stalling it.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, PIN, Run, object, outcomes, rule, s};

/// `hsmca ARGS` as `Env::hsmca` runs it, killed after `secs` seconds: exit 124 is a hang.
fn hsmca_within(env: &Env, secs: u64, args: &[&str]) -> Run {
    common::require("timeout");
    let out = Command::new("timeout")
        .args(["--kill-after=5", &secs.to_string()])
        .arg(env!("CARGO_BIN_EXE_hsmca"))
        .args(args)
        .env("SOFTHSM2_CONF", &env.conf)
        .env("HSMCA_PIN", PIN)
        .env_remove("HSMCA_PKCS11_MODULE")
        .output()
        .unwrap();
    let run = Run(out);
    assert!(
        !matches!(run.code(), 124 | 137),
        "hsmca hung (killed after {secs} s):\n{}",
        run.all()
    );
    run
}

/// `sign-dir --home HOME ARGS --out OUT --json`, killed after `secs` seconds.
fn sign_dir(env: &Env, secs: u64, home: &Path, args: &[&str], out: &Path) -> Run {
    let mut all = vec!["sign-dir", "--home", s(home)];
    all.extend_from_slice(args);
    all.extend(["--out", s(out), "--json"]);
    hsmca_within(env, secs, &all)
}

/// A P-256 CSR with CN `cn` at `path` (made with rcgen).
fn csr_at(path: &Path, cn: &str) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, p.serialize_request(&key).unwrap().pem().unwrap()).unwrap();
}

fn mkfifo(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// How many certificate entries the log holds.
fn certs_logged(home: &Path) -> usize {
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["type"] == "cert")
        .count()
}

/// Every regular file beneath `dir` and its bytes, by path (symlinks are not followed).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = p.symlink_metadata().unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                files.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    files
}

#[test]
fn issue_12_an_output_dir_full_of_planted_links_leaves_the_ca_home_untouched() {
    let env = Env::new("planted");
    let home = env.init("ca", "planted", "ecdsa-p256");
    let input = env.path("in");
    for i in 0..3 {
        csr_at(&input.join(format!("c-{i}.csr")), &format!("c-{i}"));
    }
    csr_at(&input.join("sub/d.csr"), "d");
    let entries = home.join("log/entries.jsonl");
    let out = env.path("out");
    std::fs::create_dir_all(&out).unwrap();
    // A link for every PID near ours (the child's is among them), named like every temporary
    // the old code made, each pointing at the log; and the whole `sub/` output directory
    // linked into the CA home.
    let me = std::process::id();
    for pid in me.saturating_sub(50)..me + 3000 {
        for name in [
            format!(".hsmca-report.jsonl.tmp-{pid}"),
            format!(".c-0.crt.tmp-{pid}-0"),
            format!(".apply-status.sh.tmp-{pid}"),
        ] {
            symlink(&entries, out.join(name)).unwrap();
        }
    }
    // Dead PIDs' names too: the sweep of stale temporaries must not touch what is not its own.
    let dead = 1 << 23;
    symlink(
        &entries,
        out.join(format!(".hsmca-report.jsonl.tmp-{dead}")),
    )
    .unwrap();
    symlink(home.join("log"), out.join("sub")).unwrap();
    symlink(&entries, out.join("c-2.crt")).unwrap();
    let before = snapshot(&home);
    let log_before = std::fs::read(&entries).unwrap();

    let run = sign_dir(
        &env,
        120,
        &home,
        &[s(&input), "--profile", "test-any-key"],
        &out,
    );
    run.code_is(1);
    let done = outcomes(&run);
    assert_eq!(done["c-0.csr"]["outcome"], "issued", "{done:?}");
    assert_eq!(done["c-1.csr"]["outcome"], "issued", "{done:?}");
    // Issued and logged, but the file in the way was neither followed nor replaced.
    let failed: Vec<&str> = done
        .values()
        .filter(|d| d["outcome"] == "failed")
        .map(rule)
        .collect();
    assert_eq!(failed, ["output.symlink", "output.symlink"], "{done:?}");
    assert!(out.join("c-0.crt").symlink_metadata().unwrap().is_file());

    // The log only grew by this run's entries, and verifies; every other CA-home file is
    // byte-identical.
    let log_after = std::fs::read(&entries).unwrap();
    assert!(log_after.starts_with(&log_before) && log_after.len() > log_before.len());
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    let after = snapshot(&home);
    for (path, bytes) in &before {
        let changing = path.starts_with(home.join("log"))
            && (path.ends_with("entries.jsonl")
                || path.ends_with("checkpoint")
                || path.to_string_lossy().contains("index.sqlite"));
        if path.ends_with("log/hashes") {
            // The tree's stored hashes only grow, like the log.
            let grown = after.get(path).unwrap();
            assert!(grown.starts_with(bytes) && grown.len() > bytes.len());
        } else if !changing {
            assert_eq!(after.get(path), Some(bytes), "{} changed", path.display());
        }
    }
    // Nothing new in the CA home but this run's numbered checkpoints.
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        assert!(
            path.starts_with(home.join("log/checkpoints")),
            "{} appeared in the CA home",
            path.display()
        );
    }
    assert_eq!(certs_logged(&home), 4);
    // Every planted link is still there, still a link.
    let planted = out.join(format!(".hsmca-report.jsonl.tmp-{dead}"));
    assert!(planted.symlink_metadata().unwrap().is_symlink());
    assert!(out.join("sub").symlink_metadata().unwrap().is_symlink());
}

#[test]
fn issue_12_a_kubeconfig_template_linked_to_a_secret_never_reaches_the_output() {
    let env = Env::new("secret");
    let home = env.init_k8s("ca", "secret");
    let input = env.path("kubeadm-out");
    let secret = env.path("pin-file");
    std::fs::write(&secret, "SECRET-PIN-123456\n").unwrap();
    env.p256_csr(
        "kubeadm-out/admin.conf.csr",
        "/O=kubeadm:cluster-admins/CN=kubernetes-admin",
    );
    env.p256_csr(
        "kubeadm-out/kubelet.conf.csr",
        "/O=system:nodes/CN=system:node:node1",
    );
    // kubeadm's own partial kubeconfig (`kubeadm certs generate-csr`), with the CSR's key.
    let key = std::fs::read(input.join("admin.conf.key")).unwrap();
    std::fs::write(
        input.join("admin.conf"),
        common::kubeadm_kubeconfig(
            "https://10.0.0.11:6443",
            "kubernetes",
            "kubernetes-admin",
            &key,
        ),
    )
    .unwrap();
    symlink(&secret, input.join("kubelet.conf")).unwrap();
    let out = env.path("back");
    let logged = certs_logged(&home);
    let run = sign_dir(&env, 60, &home, &[s(&input)], &out);
    run.code_is(1);
    let done = outcomes(&run);
    assert_eq!(rule(&done["kubelet.conf.csr"]), "input.symlink", "{done:?}");
    assert_eq!(done["admin.conf.csr"]["outcome"], "issued", "{done:?}");
    // Refused before issuing: the only certificate logged is admin's.
    assert_eq!(certs_logged(&home), logged + 1);
    for (path, bytes) in snapshot(&out) {
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("SECRET-PIN"),
            "{} holds the secret",
            path.display()
        );
    }
    assert!(!out.join("kubelet.conf").exists());
}

#[test]
fn issue_12_manifest_paths_outside_the_input_are_refused_and_nothing_is_written_outside_out() {
    let env = Env::new("escape");
    let home = env.init("ca", "escape", "ecdsa-p256");
    let input = env.path("usb/csrs");
    csr_at(&input.join("good.csr"), "good");
    csr_at(&env.path("usb/victim.csr"), "victim");
    csr_at(&env.path("elsewhere/abs.csr"), "abs");
    let manifest = env.path("usb/manifest.json");
    let abs = env.path("elsewhere/abs.csr");
    std::fs::write(
        &manifest,
        serde_json::json!({
            "good.csr": "test-any-key",
            "../victim.csr": "test-any-key",
            "sub/../../victim.csr": "test-any-key",
            s(&abs): "test-any-key",
        })
        .to_string(),
    )
    .unwrap();
    let out = env.path("usb/certs");
    let run = sign_dir(
        &env,
        60,
        &home,
        &[s(&input), "--manifest", s(&manifest)],
        &out,
    );
    run.code_is(1);
    let done = outcomes(&run);
    assert_eq!(done["good.csr"]["outcome"], "issued");
    for bad in ["../victim.csr", "sub/../../victim.csr", s(&abs)] {
        assert_eq!(rule(&done[bad]), "input.path", "{bad}: {done:?}");
    }
    assert_eq!(certs_logged(&home), 1);
    // No certificate anywhere but OUT.
    let crts: Vec<PathBuf> = snapshot(env.dir.path())
        .into_keys()
        .filter(|p| p.extension().is_some_and(|e| e == "crt"))
        .collect();
    assert_eq!(crts, [out.join("good.crt")]);

    // A plan whose `out` was edited to leave OUT (its hash recomputed, as an attacker can) is
    // refused for that item before anything is issued for it.
    let plan_file = env.path("plan.json");
    csr_at(&input.join("later.csr"), "later");
    std::fs::write(&manifest, r#"{"later.csr": "test-any-key"}"#).unwrap();
    let made = env.hsmca(&[
        "plan",
        "--home",
        s(&home),
        s(&input),
        "--manifest",
        s(&manifest),
        "--out",
        s(&plan_file),
    ]);
    made.ok();
    let mut plan: hsmca::batch::Plan =
        serde_json::from_slice(&std::fs::read(&plan_file).unwrap()).unwrap();
    plan.items[0].out = "../../escaped.crt".into();
    plan.hash = hsmca::batch::Plan::content_hash(&plan.items);
    std::fs::write(&plan_file, serde_json::to_vec(&plan).unwrap()).unwrap();
    // Even approved (an operator who trusted the forged hash), the escaping item is refused.
    let run = sign_dir(
        &env,
        60,
        &home,
        &["--plan", s(&plan_file), "--approve", &plan.hash],
        &out,
    );
    run.code_is(1);
    assert_eq!(rule(&outcomes(&run)["later.csr"]), "output.path");
    assert!(!env.path("escaped.crt").exists());
    assert_eq!(certs_logged(&home), 1);

    // A manifest that is a FIFO, and a plan that is a symlink, are refused at once (exit 2).
    let fifo = env.path("usb/fifo.json");
    mkfifo(&fifo);
    let plan_args = [
        "plan",
        "--home",
        s(&home),
        s(&input),
        "--out",
        s(&plan_file),
    ];
    let run = hsmca_within(
        &env,
        30,
        &[&plan_args[..], &["--manifest", s(&fifo)]].concat(),
    );
    run.fails_with(2, "input.not_regular");
    let linked = env.path("usb/linked-plan.json");
    symlink(&plan_file, &linked).unwrap();
    let run = sign_dir(&env, 30, &home, &["--plan", s(&linked)], &out);
    run.fails_with(2, "input.symlink");
}

/// Makes `depth` nested directories of long names under `dir`, beyond PATH_MAX in total,
/// descending with `openat` (no path that long can be passed to the kernel).
fn deep_tree(dir: &Path, depth: usize) {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::{Mode, mkdirat};
    let name = "d".repeat(250);
    let mut cur = nix::fcntl::open(dir, OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    for _ in 0..depth {
        mkdirat(&cur, name.as_str(), Mode::from_bits_truncate(0o755)).unwrap();
        cur = openat(&cur, name.as_str(), OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    }
}

#[test]
fn issue_12_fifos_devices_loops_and_deep_trees_are_refused_in_seconds() {
    let env = Env::new("hangs");
    let home = env.init("ca", "hangs", "ecdsa-p256");
    let input = env.path("in");
    for i in 0..4 {
        csr_at(&input.join(format!("a/c-{i}.csr")), &format!("c-{i}"));
    }
    mkfifo(&input.join("x.csr"));
    symlink("/dev/zero", input.join("zero.csr")).unwrap();
    symlink(".", input.join("loop1")).unwrap();
    symlink(".", input.join("a/loop2")).unwrap();
    deep_tree(&input, 20);
    let out = env.path("out");
    mkfifo(&out.join("a/c-3.crt"));
    let started = std::time::Instant::now();
    let run = sign_dir(
        &env,
        60,
        &home,
        &[s(&input), "--profile", "test-any-key"],
        &out,
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "took {:?}",
        started.elapsed()
    );
    run.code_is(1);
    let done = outcomes(&run);
    for i in 0..3 {
        assert_eq!(
            done[&format!("a/c-{i}.csr")]["outcome"],
            "issued",
            "{done:?}"
        );
    }
    assert_eq!(rule(&done["x.csr"]), "input.not_regular");
    assert_eq!(rule(&done["zero.csr"]), "input.symlink");
    assert_eq!(rule(&done["loop1"]), "input.symlink");
    assert_eq!(rule(&done["a/loop2"]), "input.symlink");
    assert!(
        done.iter()
            .any(|(f, d)| f.starts_with("ddd") && rule(d) == "input.depth"),
        "{done:?}"
    );
    // The FIFO at an output name: logged, reported failed, never opened.
    let fifo_out = done
        .values()
        .find(|d| d["file"].as_str().unwrap().ends_with("a/c-3.crt"))
        .unwrap();
    assert_eq!(rule(fifo_out), "output.not_regular");
    // Each good CSR was issued exactly once, even with the loops.
    assert_eq!(certs_logged(&home), 4);
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn issue_12_escape_sequences_in_file_names_never_reach_the_terminal_raw() {
    let env = Env::new("ansi");
    let home = env.init("ca", "ansi", "ecdsa-p256");
    let input = env.path("in");
    let names = [
        "conceal\u{1b}[0;8m.csr",
        "up\u{1b}[1A\u{1b}[2K.csr",
        "bidi\u{202e}rsc.csr",
        "new\nline.csr",
    ];
    for n in names {
        csr_at(&input.join(n), "x");
    }
    std::fs::write(input.join("bad\u{1b}]0;title\u{7}.csr"), b"not a csr").unwrap();
    let plan_file = env.path("plan.json");
    let plan = env.hsmca(&[
        "plan",
        "--home",
        s(&home),
        s(&input),
        "--profile",
        "test-any-key",
        "--out",
        s(&plan_file),
    ]);
    let out = env.path("out");
    let args = [
        "sign-dir",
        "--home",
        s(&home),
        s(&input),
        "--profile",
        "test-any-key",
        "--out",
        s(&out),
    ];
    let sign = hsmca_within(&env, 60, &args);
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let json = hsmca_within(&env, 60, &json_args);
    // A failing command's error quotes the name too.
    let check = env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        s(&input.join("bad\u{1b}]0;title\u{7}.csr")),
    ]);
    for run in [&plan, &sign, &json, &check] {
        for text in [run.stdout(), run.stderr()] {
            assert!(
                !text
                    .chars()
                    .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
                "raw control character in:\n{text:?}"
            );
        }
    }
    assert!(
        plan.stdout().contains("conceal\\x1b[0;8m.csr"),
        "{}",
        plan.stdout()
    );
    assert!(plan.stdout().contains("bidi\\u202ersc.csr"));
    assert!(sign.stdout().contains("up\\x1b[1A\\x1b[2K.csr"));
    // The plan table has exactly one row per CSR: a newline in a name cannot add one.
    assert_eq!(
        plan.stdout().lines().filter(|l| l.contains(".csr")).count(),
        5
    );
    // JSON output stays valid JSON and keeps the names exactly.
    let done = outcomes(&json);
    for n in names {
        assert!(done.contains_key(n), "{n:?} not in {:?}", done.keys());
    }
}

#[test]
fn issue_12_one_malformed_kubectl_object_is_one_refused_item() {
    let env = Env::new("objs");
    let home = env.init_k8s("ca", "objs");
    let approved = serde_json::json!({"conditions": [{"type": "Approved", "status": "True"}]});
    let client = env.p256_csr("o/client.csr", "/O=system:nodes/CN=system:node:node1");
    let usages = ["digital signature", "client auth"];
    let signer = "kubernetes.io/kube-apiserver-client-kubelet";
    let good = |name: &str| {
        object(
            name,
            &client,
            signer,
            &usages,
            "system:node:node1",
            approved.clone(),
            None,
        )
    };
    let mut bad_name = good("x");
    bad_name["metadata"]["name"] = "../../etc/evil\u{1b}[2K".into();
    let mut bad_b64 = good("csr-b64");
    bad_b64["spec"]["request"] = "not base64 !!".into();
    let mut negative = good("csr-negative");
    negative["spec"]["expirationSeconds"] = (-5).into();
    let mut fraction = good("csr-fraction");
    fraction["spec"]["expirationSeconds"] = 601.5.into();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List",
        "items": [good("csr-good"), bad_name, bad_b64, negative, fraction]});
    let input = env.path("csrs.json");
    std::fs::write(&input, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    let out = env.path("status");
    let logged = certs_logged(&home);
    let run = sign_dir(&env, 60, &home, &[s(&input)], &out);
    run.code_is(1);
    let done = outcomes(&run);
    assert_eq!(done["csr-good"]["outcome"], "issued", "{done:?}");
    assert_eq!(rule(&done["items[1]"]), "k8s.name");
    assert_eq!(rule(&done["csr-b64"]), "k8s.request");
    assert_eq!(rule(&done["csr-negative"]), "k8s.expiration");
    assert_eq!(rule(&done["csr-fraction"]), "k8s.expiration");
    assert_eq!(certs_logged(&home), logged + 1, "csr-good only");
    assert!(out.join("csr-good.status.json").is_file());
}
