//! Red team, issue 13: an insider who can write every file of the CA home (but has no PIN)
//! tries to make the operator's next ordinary command sign something unseen. Only attacks
//! hsmca defends today are here; the ones that succeeded are in the red2 report.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Env, s};

fn lines(home: &Path) -> Vec<String> {
    std::fs::read_to_string(home.join("log/entries.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Writes `entries` as the log, each one's `seq` and `prev` recomputed the way hsmca chains
/// them (the Merkle root of the lines before it), so only a signature can tell it apart.
fn rechain(home: &Path, entries: Vec<serde_json::Value>) {
    let mut tree = hsmca::log::translog::Tree::default();
    let mut out = String::new();
    for (seq, mut e) in entries.into_iter().enumerate() {
        e["seq"] = seq.into();
        e["prev"] = hsmca::log::translog::b64(&tree.root()).into();
        let line = serde_json::to_string(&e).unwrap();
        tree.push(line.as_bytes());
        out.push_str(&line);
        out.push('\n');
    }
    std::fs::write(home.join("log/entries.jsonl"), out).unwrap();
}

#[test]
fn red2_a_module_symlink_retargeted_to_a_shim_is_refused_before_loading() {
    common::require("cc");
    let env = Env::new("symlink");
    let home = env.init("ca", "symlink", "ecdsa-p256");
    let marker = env.path("shim-loaded");
    let src = env.path("shim.c");
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n__attribute__((constructor)) static void l(void) {{ FILE *f = fopen(\"{}\", \"w\"); if (f) fclose(f); }}\nunsigned long C_GetFunctionList(void **l) {{ return 5; }}\n",
            marker.display()
        ),
    )
    .unwrap();
    let so = env.path("shim.so");
    assert!(
        Command::new("cc")
            .args(["-shared", "-fPIC", "-o", s(&so), s(&src)])
            .status()
            .unwrap()
            .success()
    );
    // A link to the pinned module is the pinned module: its target is what is hashed.
    let link = env.path("module.so");
    std::os::unix::fs::symlink(common::real_module(), &link).unwrap();
    let config = home.join("hsmca.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["module"] = s(&link).into();
    std::fs::write(&config, json.to_string()).unwrap();
    let a = env.p256_csr("c/a.csr", "/CN=a");
    env.sign(&home, "test-any-key", &[&a]).ok();

    // The insider retargets the link: refused with exit 3, the shim never loaded.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&so, &link).unwrap();
    let b = env.p256_csr("c/b.csr", "/CN=b");
    let run = env.sign(&home, "test-any-key", &[&b]);
    run.fails_with(3, "is not the one pinned in the log");
    assert!(run.stderr().contains("--module"), "{}", run.all());
    assert!(!marker.exists(), "the shim was loaded");
    assert!(!b.with_extension("crt").exists());
}

#[test]
fn red2_an_issuance_erased_and_the_log_rechained_is_refused_against_the_tokens_head() {
    let env = Env::new("rechain");
    let home = env.init("ca", "rechain", "ecdsa-p256");
    let before = lines(&home).len();
    let a = env.p256_csr("c/a.csr", "/CN=a");
    env.sign(&home, "test-any-key", &[&a]).ok();
    let b = env.p256_csr("c/b.csr", "/CN=b");
    env.sign(&home, "test-any-key", &[&b]).ok();

    // Erase a's issuance (its intent and cert entries) and recompute every later prev: a
    // self-consistent history that no longer shows the certificate.
    let all: Vec<serde_json::Value> = lines(&home)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let serial = all
        .iter()
        .find(|e| e["type"] == "issue-intent" && e["subject"] == "CN=a")
        .unwrap()["serial"]
        .clone();
    let kept: Vec<serde_json::Value> = all
        .into_iter()
        .enumerate()
        .filter(|(i, e)| *i < before || e["serial"] != serial)
        .map(|(_, e)| e)
        .collect();
    let erased = lines(&home).len() - kept.len();
    assert!(erased > 0, "nothing erased");
    rechain(&home, kept);

    let c = env.p256_csr("c/c.csr", "/CN=c");
    let run = env.sign(&home, "test-any-key", &[&c]);
    assert!(
        run.code() == 4,
        "the rewritten log was signed on: {}",
        run.all()
    );
    assert!(!c.with_extension("crt").exists());
    let run = env.hsmca(&["log", "verify", "--home", s(&home), "--token"]);
    run.code_is(4);
    assert!(!run.stdout().contains("log OK"), "{}", run.all());
}

#[test]
fn red2_a_policy_entry_appended_with_a_broken_chain_is_not_signed_under() {
    let env = Env::new("forged");
    let home = env.init("ca", "forged", "ecdsa-p256");
    // The insider widens test-any-key's validity and appends a `policy` entry for the new
    // file by hand, copying the last one (its prev is not recomputed).
    let profile = home.join("profiles/test-any-key.json");
    let mut p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&profile).unwrap()).unwrap();
    p["validity"] = serde_json::json!({"default": "3650d", "max": "3650d"});
    std::fs::write(&profile, p.to_string()).unwrap();
    let all = lines(&home);
    let mut policy: serde_json::Value = all
        .iter()
        .rev()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["type"] == "policy")
        .unwrap();
    policy["seq"] = all.len().into();
    policy["files"]["profiles/test-any-key.json"] =
        hsmca::keys::sha256_hex(&std::fs::read(&profile).unwrap()).into();
    let mut log = all.join("\n");
    log.push('\n');
    log.push_str(&policy.to_string());
    log.push('\n');
    std::fs::write(home.join("log/entries.jsonl"), log).unwrap();

    let run = env.hsmca(&["log", "verify", "--home", s(&home)]);
    run.code_is(4);
    assert!(run.stdout().contains("was altered"), "{}", run.all());
    let a = env.p256_csr("c/a.csr", "/CN=a");
    let run = env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        "--validity",
        "3000d",
        s(&a),
    ]);
    run.fails_with(4, "log verify");
    assert!(!a.with_extension("crt").exists());
}

#[test]
fn red2_a_pin_file_readable_by_others_is_refused_and_the_pin_never_echoed() {
    let env = Env::new("pinfile");
    let home = env.init("ca", "pinfile", "ecdsa-p256");
    let a = env.p256_csr("c/a.csr", "/CN=a");
    let sign = |pin_file: &Path, pin: &str| {
        env.hsmca_env(
            &[
                "sign",
                "--home",
                s(&home),
                "--profile",
                "test-any-key",
                "--pin-file",
                s(pin_file),
                s(&a),
            ],
            &[("HSMCA_PIN", pin)],
        )
    };
    let loose = env.path("pin.txt");
    std::fs::write(&loose, "wr0ngPIN99\n").unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let run = sign(&loose, "");
    run.fails_with(3, "chmod 600");
    assert!(!run.all().contains("wr0ngPIN99"), "{}", run.all());
    assert!(!a.with_extension("crt").exists());
    // A wrong PIN from the environment is refused without being echoed.
    let run = env.hsmca_env(
        &[
            "sign",
            "--home",
            s(&home),
            "--profile",
            "test-any-key",
            s(&a),
        ],
        &[("HSMCA_PIN", "wr0ngPIN99")],
    );
    assert_ne!(run.code(), 0, "{}", run.all());
    assert!(!run.all().contains("wr0ngPIN99"), "{}", run.all());
    assert!(!a.with_extension("crt").exists());
}

/// The critical one the second red team found: a `module` entry appended by hand (chained
/// correctly, past the last checkpoint) naming a PIN-logging module, with hsmca.json pointing at
/// it. The operator's next command, and `log recover` (which an exit-4 hint suggests), must
/// refuse before the module is ever loaded; the same goes for a forged `policy` entry.
#[test]
fn red2_a_forged_pin_past_the_checkpoint_never_gets_a_module_loaded_or_signed() {
    let env = Env::new("red2pin");
    let home = env.init("ca", "red2pin", "ecdsa-p256");
    let (so, marker) = common::forwarding_shim(&env);
    let csr = env.p256_csr("c/x.csr", "/CN=x");
    let sha = {
        let d = ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&so).unwrap());
        d.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    // Appended after the last line, chained exactly as hsmca chains (the Merkle root of the
    // lines before it), the earlier lines untouched: only the checkpoint does not cover it.
    let existing = lines(&home);
    let mut tree = hsmca::log::translog::Tree::default();
    for l in &existing {
        tree.push(l.as_bytes());
    }
    let mut forged: serde_json::Value = existing
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|e| e["type"] == "module")
        .unwrap();
    forged["seq"] = existing.len().into();
    forged["prev"] = hsmca::log::translog::b64(&tree.root()).into();
    forged["path"] = s(&so).into();
    forged["sha256"] = sha.into();
    let mut text = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    text.push_str(&serde_json::to_string(&forged).unwrap());
    text.push('\n');
    std::fs::write(home.join("log/entries.jsonl"), text).unwrap();
    let config_path = home.join("hsmca.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["module"] = s(&so).into();
    std::fs::write(&config_path, config.to_string()).unwrap();

    let run = env.sign(&home, "test-any-key", &[&csr]);
    run.fails_with(4, "past the latest checkpoint is not trusted");
    assert!(!marker.exists(), "the forged module was loaded");
    let run = env.hsmca(&["log", "recover", "--home", s(&home)]);
    run.fails_with(4, "past the latest checkpoint is not trusted");
    assert!(
        !marker.exists(),
        "the forged module was loaded by log recover"
    );
    assert!(!csr.with_extension("crt").exists());
}
