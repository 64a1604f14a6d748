//! Issue 13, "nothing changes unseen": an insider with write access to the CA home (but not
//! the PIN) edits profiles or site.json, swaps the PKCS#11 module, restores an older log, or
//! edits a reviewed plan. Each is refused with its exit code before the token signs anything.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Env, copy_home, plan_hash, s};

/// The run finished (exit 1) with an item refused under `rule`.
fn refused(run: &common::Run, rule: &str) {
    run.code_is(1);
    assert!(run.stdout().contains(rule), "{}", run.all());
}

fn entries(home: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(home.join("log/entries.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn issue_13_an_edited_profile_or_site_stops_every_signing_command_until_applied() {
    let env = Env::new("policy");
    let home = env.init("ca", "policy", "ecdsa-p256");
    let log = entries(&home);
    assert_eq!(log[1]["type"], "policy", "init logs the policy");
    assert!(log[1]["profiles"]["kubelet-client"]["subject"].is_object());
    assert_eq!(log[2]["type"], "module", "init pins the module");
    let policy = log[1]["policy_sha256"].as_str().unwrap().to_owned();

    let csr = env.p256_csr("c/n1.csr", "/O=system:nodes/CN=system:node:n1");
    let path = home.join("profiles/kubelet-client.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen("\"description\": \"", "\"description\": \"edited: ", 1),
    )
    .unwrap();
    std::fs::write(home.join("profiles/extra.json"), &text).unwrap();
    let before = entries(&home).len();
    let run = env.sign(&home, "kubelet-client", &[&csr]);
    run.fails_with(2, "profiles/kubelet-client.json changed");
    assert!(
        run.stderr().contains("profiles/extra.json added"),
        "{}",
        run.all()
    );
    assert!(run.stderr().contains("profiles apply"), "{}", run.all());
    // check and plan (no token) refuse too, and so do the other writing commands.
    env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "kubelet-client",
        s(&csr),
    ])
    .fails_with(2, "profiles/kubelet-client.json changed");
    env.hsmca(&["crl", "--home", s(&home), "--out", s(&env.path("crl.pem"))])
        .fails_with(2, "profiles/kubelet-client.json changed");
    assert!(!csr.with_extension("crt").exists());
    assert_eq!(entries(&home).len(), before, "nothing logged");
    std::fs::remove_file(home.join("profiles/extra.json")).unwrap();

    // site.json too.
    let site = home.join("site.json");
    let site_text = std::fs::read_to_string(&site).unwrap();
    std::fs::write(&site, format!("{site_text}\n")).unwrap();
    env.sign(&home, "kubelet-client", &[&csr])
        .fails_with(2, "site.json changed");

    // profiles apply shows the difference and logs the new policy; then signing works.
    let run = env.hsmca(&["profiles", "apply", "--home", s(&home)]);
    run.ok();
    assert!(
        run.stdout()
            .contains("profiles/kubelet-client.json changed: description")
            && run.stdout().contains("site.json changed"),
        "{}",
        run.all()
    );
    let applied = entries(&home).last().unwrap().clone();
    assert_eq!(applied["type"], "policy");
    let new_policy = applied["policy_sha256"].as_str().unwrap().to_owned();
    assert_ne!(new_policy, policy);
    assert!(run.stdout().contains(&new_policy), "{}", run.all());
    let run = env.hsmca(&["profiles", "apply", "--home", s(&home)]);
    assert!(run.stdout().contains("unchanged"), "{}", run.all());
    let any = env.p256_csr("c/any.csr", "/CN=any");
    env.sign(&home, "test-any-key", &[&any]).ok();
    let intent = entries(&home)
        .into_iter()
        .find(|e| e["type"] == "issue-intent")
        .unwrap();
    assert_eq!(intent["policy_sha256"], new_policy.as_str());
    let serial = intent["serial"].as_str().unwrap().to_owned();
    let run = env.hsmca(&["log", "show", "--home", s(&home), &serial]);
    run.ok();
    assert!(
        run.stdout().contains(&format!("policy      {new_policy}")),
        "{}",
        run.all()
    );
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn issue_13_a_ca_home_without_a_logged_policy_is_refused_with_a_hint() {
    let env = Env::new("nopolicy");
    let home = env.init("ca", "nopolicy", "ecdsa-p256");
    let csr = env.p256_csr("c/x.csr", "/CN=x");
    // A log from before policies were logged: the entries past the root dropped (the token's
    // head is then ahead of it, so the home is also refused as rolled back; check needs no
    // token and shows the policy refusal).
    let text = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    let first = text.lines().next().unwrap();
    std::fs::write(home.join("log/entries.jsonl"), format!("{first}\n")).unwrap();
    // Its checkpoints end at the root entry, as an old home's did.
    for e in std::fs::read_dir(home.join("log/checkpoints")).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "000000000001" {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    std::fs::copy(
        home.join("log/checkpoints/000000000001"),
        home.join("log/checkpoint"),
    )
    .unwrap();
    let run = env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        s(&csr),
    ]);
    run.fails_with(2, "records no policy");
    assert!(run.stderr().contains("profiles apply"), "{}", run.all());
}

#[test]
fn issue_13_another_module_is_refused_before_it_is_loaded_unless_named_and_logged() {
    let env = Env::new("module");
    let home = env.init("ca", "module", "ecdsa-p256");
    let (so, marker) = common::forwarding_shim(&env);
    let csr = env.p256_csr("c/x.csr", "/CN=x");

    // From hsmca.json.
    let config_path = home.join("hsmca.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let mut edited: serde_json::Value = serde_json::from_str(&config).unwrap();
    edited["module"] = serde_json::Value::String(s(&so).into());
    std::fs::write(&config_path, edited.to_string()).unwrap();
    let run = env.sign(&home, "test-any-key", &[&csr]);
    run.fails_with(3, "is not the one pinned in the log");
    assert!(run.stderr().contains(s(&so)), "{}", run.all());
    assert!(!marker.exists(), "the shim was loaded");
    std::fs::write(&config_path, &config).unwrap();

    // From the environment.
    let run = env.hsmca_env(
        &[
            "sign",
            "--home",
            s(&home),
            "--profile",
            "test-any-key",
            s(&csr),
        ],
        &[("HSMCA_PKCS11_MODULE", s(&so))],
    );
    run.fails_with(3, "is not the one pinned in the log");
    assert!(!marker.exists(), "the shim was loaded");
    assert!(!csr.with_extension("crt").exists());

    // The pinned module is printed at login for the minutes.
    let run = env.sign(&home, "test-any-key", &[&csr]);
    run.ok();
    let pinned = entries(&home)[2]["sha256"].as_str().unwrap().to_owned();
    assert!(
        run.stderr().contains(&format!("sha256 {pinned}")),
        "{}",
        run.all()
    );

    // Named with --module, it is loaded and the change is logged.
    let csr2 = env.p256_csr("c/y.csr", "/CN=y");
    let run = env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        "--module",
        s(&so),
        s(&csr2),
    ]);
    run.ok();
    assert!(marker.exists());
    let shim_sha = ring_sha256(&std::fs::read(&so).unwrap());
    assert!(
        entries(&home)
            .iter()
            .any(|e| e["type"] == "module" && e["sha256"] == shim_sha.as_str()),
        "the module change is logged"
    );
}

fn ring_sha256(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(bytes)?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn issue_13_a_rolled_back_or_truncated_log_is_refused_against_the_tokens_head() {
    let env = Env::new("head");
    let home = env.init("ca", "head", "ecdsa-p256");
    let a = env.p256_csr("c/a.csr", "/CN=a");
    env.sign(&home, "test-any-key", &[&a]).ok();
    let older = env.path("older");
    copy_home(&home, &older);
    let b = env.p256_csr("c/b.csr", "/CN=b");
    env.sign(&home, "test-any-key", &[&b]).ok();
    let run = env.hsmca(&["log", "verify", "--home", s(&home), "--token"]);
    run.ok();
    assert!(
        run.stdout().contains("checkpoint for the minutes"),
        "{}",
        run.all()
    );

    // The older copy is a valid log on its own, but an issuance is missing from it.
    env.hsmca(&["log", "verify", "--home", s(&older)]).ok();
    let c = env.p256_csr("c/c.csr", "/CN=c");
    let run = env.sign(&older, "test-any-key", &[&c]);
    run.fails_with(4, "token's head covers");
    assert!(!c.with_extension("crt").exists());
    let run = env.hsmca(&["log", "verify", "--home", s(&older), "--token"]);
    run.code_is(4);
    assert!(
        run.stdout().contains("truncated or rolled back"),
        "{}",
        run.all()
    );
    env.hsmca(&["crl", "--home", s(&older), "--out", s(&env.path("crl.pem"))])
        .fails_with(4, "token's head covers");

    // The checkpoint from the minutes catches the same without the token.
    let minutes = env.path("minutes.txt");
    std::fs::copy(home.join("log/checkpoint"), &minutes).unwrap();
    let run = env.hsmca(&[
        "log",
        "verify",
        "--home",
        s(&older),
        "--checkpoint",
        s(&minutes),
    ]);
    run.code_is(4);
    assert!(
        run.stdout().contains("truncated or rolled back"),
        "{}",
        run.all()
    );
}

#[test]
fn issue_13_a_plan_is_signed_only_under_the_hash_the_reviewers_approved() {
    let env = Env::new("approve");
    let home = env.init("ca", "approve", "ecdsa-p256");
    let input = env.path("in");
    env.p256_csr("in/a.csr", "/CN=a");
    env.p256_csr("in/b.csr", "/CN=b");
    let plan = env.path("plan.json");
    env.hsmca(&[
        "plan",
        "--home",
        s(&home),
        s(&input),
        "--profile",
        "test-any-key",
        "--out",
        s(&plan),
    ])
    .ok();
    let hash = plan_hash(&plan);
    let out = env.path("out");
    let sign = |extra: &[&str]| {
        let mut args = vec![
            "sign-dir",
            "--home",
            s(&home),
            "--plan",
            s(&plan),
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        env.hsmca(&args)
    };
    sign(&[]).fails_with(2, "no --approve HASH and no terminal");
    sign(&["--approve", &"0".repeat(64)]).fails_with(2, "not the approved");
    assert!(!out.join("a.crt").exists());
    // An edited plan (its own hash recomputed or not) does not carry the reviewed hash.
    let text = std::fs::read_to_string(&plan).unwrap();
    std::fs::write(&plan, text.replacen("CN=b", "CN=admin", 1)).unwrap();
    sign(&["--approve", &hash]).fails_with(2, "not the approved");
    std::fs::write(&plan, &text).unwrap();
    sign(&["--approve", &hash]).ok();
    assert!(out.join("a.crt").exists() && out.join("b.crt").exists());
}

#[test]
fn issue_13_a_batch_issues_a_danger_profile_only_when_the_command_line_names_it() {
    let env = Env::new("danger");
    let home = env.init_k8s("ca", "danger");
    let input = env.path("in");
    env.p256_csr("in/sa.csr", "/O=system:masters/CN=kubernetes-super-admin");
    let manifest = env.path("manifest.json");
    std::fs::write(&manifest, r#"{"sa.csr": "super-admin"}"#).unwrap();
    let sign_dir = |out: &str, extra: &[&str]| {
        let out = env.path(out);
        let mut args = vec![
            "sign-dir",
            "--home",
            s(&home),
            s(&input),
            "--manifest",
            s(&manifest),
            "--out",
        ];
        args.push(s(&out));
        args.extend_from_slice(extra);
        env.hsmca(&args)
    };
    // The stick's manifest chooses super-admin: refused in sign-dir INPUT and in plan.
    let run = sign_dir("out1", &[]);
    refused(&run, "profile.danger");
    assert!(!env.path("out1/sa.crt").exists());
    let plan = env.path("plan.json");
    let run = env.hsmca(&[
        "plan",
        "--home",
        s(&home),
        s(&input),
        "--manifest",
        s(&manifest),
        "--out",
        s(&plan),
    ]);
    refused(&run, "profile.danger");
    // A reviewed plan names it at review and again at signing.
    let plan2 = env.path("plan2.json");
    env.hsmca(&[
        "plan",
        "--home",
        s(&home),
        s(&input),
        "--manifest",
        s(&manifest),
        "--out",
        s(&plan2),
        "--allow-profile",
        "super-admin",
    ])
    .ok();
    let hash = plan_hash(&plan2);
    let signed = |out: &str, extra: &[&str]| {
        let out = env.path(out);
        let mut args = vec![
            "sign-dir",
            "--home",
            s(&home),
            "--plan",
            s(&plan2),
            "--approve",
            &hash,
            "--out",
        ];
        args.push(s(&out));
        args.extend_from_slice(extra);
        env.hsmca(&args)
    };
    let run = signed("out-plan1", &[]);
    refused(&run, "profile.danger");
    signed("out-plan2", &["--allow-profile", "super-admin"]).ok();
    assert!(env.path("out-plan2/sa.crt").exists());
    // Named on the command line, it is issued (sign-dir INPUT issues nothing twice: a new CSR).
    std::fs::remove_dir_all(&input).unwrap();
    env.p256_csr("in/sa.csr", "/O=system:masters/CN=kubernetes-super-admin");
    sign_dir("out2", &["--allow-profile", "super-admin"]).ok();
    assert!(env.path("out2/sa.crt").exists());

    // A profile the site marks dangerous, once the site change is applied.
    let site = home.join("site.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&site).unwrap()).unwrap();
    value["danger_profiles"] = serde_json::json!(["test-any-key"]);
    std::fs::write(&site, value.to_string()).unwrap();
    env.hsmca(&["profiles", "apply", "--home", s(&home)]).ok();
    let any = env.path("any");
    env.p256_csr("any/x.csr", "/CN=x");
    let run = env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        s(&any),
        "--profile",
        "test-any-key",
        "--out",
        s(&env.path("out3")),
    ]);
    refused(&run, "profile.danger");
    // `sign --profile` names the profile itself.
    env.sign(&home, "test-any-key", &[&any.join("x.csr")]).ok();
}

#[test]
fn issue_13_test_any_key_is_not_installed_by_init() {
    let env = Env::new("shipped13");
    let home = env.path("ca");
    env.hsmca(&[
        "init",
        "--home",
        s(&home),
        "--token",
        "shipped13",
        "--key-type",
        "ecdsa-p256",
        "--subject",
        "CN=Root",
    ])
    .ok();
    assert!(home.join("profiles/super-admin.json").exists());
    assert!(!home.join("profiles/test-any-key.json").exists());
}

#[test]
fn issue_13_a_key_revoked_for_key_compromise_gets_no_new_certificate() {
    let env = Env::new("compromise");
    let home = env.init("ca", "compromise", "ecdsa-p256");
    let csr = env.p256_csr("c/a.csr", "/CN=a");
    let run = env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        s(&csr),
        "--json",
    ]);
    run.ok();
    let serial = serde_json::from_str::<serde_json::Value>(run.stdout().lines().next().unwrap())
        .unwrap()["cert"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    env.hsmca(&[
        "revoke",
        "--home",
        s(&home),
        &serial,
        "--reason",
        "key-compromise",
    ])
    .ok();
    // The same CSR again: reported as revoked, never issued.
    std::fs::remove_file(csr.with_extension("crt")).unwrap();
    let run = env.sign(&home, "test-any-key", &[&csr]);
    refused(&run, "revoked");
    assert!(!csr.with_extension("crt").exists());
    // A new CSR for the same key, another subject: refused, in check and in sign.
    let other = env.path("c/b.csr");
    common::openssl(&[
        "req",
        "-new",
        "-key",
        s(&csr.with_extension("key")),
        "-subj",
        "/CN=b",
        "-out",
        s(&other),
    ]);
    let run = env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        s(&other),
    ]);
    refused(&run, "key.compromised");
    let run = env.sign(&home, "test-any-key", &[&other]);
    run.code_is(1);
    assert!(
        run.stdout().contains("key.compromised") && run.stdout().contains(&serial),
        "{}",
        run.all()
    );
    assert!(!other.with_extension("crt").exists());
}

#[test]
fn issue_13_entries_appended_by_hand_are_signed_by_no_one_and_refused() {
    let env = Env::new("tail");
    let home = env.init("ca", "tail", "ecdsa-p256");
    let csr = env.p256_csr("c/a.csr", "/CN=a");
    env.sign(&home, "test-any-key", &[&csr]).ok();
    // A fabricated revocation appended with a correct chain hash: taken from a real one made
    // on a copy (same token, so the copy's checkpoint is not kept).
    let serial = entries(&home).iter().find(|e| e["type"] == "cert").unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let log_path = home.join("log/entries.jsonl");
    let before = std::fs::read(&log_path).unwrap();
    let cp_before = std::fs::read(home.join("log/checkpoint")).unwrap();
    let head_files: Vec<_> = std::fs::read_dir(home.join("log/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    env.hsmca(&[
        "revoke",
        "--home",
        s(&home),
        &serial,
        "--reason",
        "key-compromise",
    ])
    .ok();
    let forged = std::fs::read(&log_path).unwrap();
    // Put back the old checkpoints: the revocation is now an unsigned tail.
    std::fs::write(home.join("log/checkpoint"), &cp_before).unwrap();
    for e in std::fs::read_dir(home.join("log/checkpoints")).unwrap() {
        let p = e.unwrap().path();
        if !head_files.contains(&p) {
            std::fs::remove_file(p).unwrap();
        }
    }
    assert!(forged.len() > before.len());
    let run = env.hsmca(&["log", "verify", "--home", s(&home)]);
    run.code_is(4);
    assert!(run.stdout().contains("unsigned tail"), "{}", run.all());
    env.hsmca(&["crl", "--home", s(&home), "--out", s(&env.path("crl.pem"))])
        .fails_with(4, "past the latest checkpoint");
    assert!(!env.path("crl.pem").exists());
    // The operator looks, then signs the tail deliberately.
    let run = env.hsmca(&["log", "recover", "--home", s(&home)]);
    run.ok();
    assert!(
        run.stdout()
            .contains("1 entries past the previous checkpoint"),
        "{}",
        run.all()
    );
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn issue_13_an_older_ca_home_is_moved_onto_a_pinned_module_and_policy_once() {
    common::require("pkcs11-tool");
    let env = Env::new("older");
    let home = env.init("ca", "older", "ecdsa-p256");
    // As a CA home made before this: the root entry and its checkpoint, no head in the token.
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    std::fs::write(
        home.join("log/entries.jsonl"),
        format!("{}\n", log.lines().next().unwrap()),
    )
    .unwrap();
    for e in std::fs::read_dir(home.join("log/checkpoints")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "000000000001" {
            std::fs::remove_file(p).unwrap();
        }
    }
    std::fs::copy(
        home.join("log/checkpoints/000000000001"),
        home.join("log/checkpoint"),
    )
    .unwrap();
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &env.conf)
        .args([
            "--module",
            s(&common::softhsm_module()),
            "--token-label",
            "older",
        ])
        .args([
            "--login",
            "--pin",
            common::PIN,
            "--delete-object",
            "--type",
            "data",
        ])
        .args(["--label", "root-ca-log-head"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();

    let csr = env.p256_csr("c/a.csr", "/CN=a");
    env.sign(&home, "test-any-key", &[&csr])
        .fails_with(2, "records no policy");
    env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        s(&csr),
    ])
    .fails_with(2, "records no policy");
    env.hsmca(&["profiles", "apply", "--home", s(&home)])
        .fails_with(3, "pins no PKCS#11 module");
    let module = common::softhsm_module();
    env.hsmca(&[
        "profiles",
        "apply",
        "--home",
        s(&home),
        "--module",
        s(&module),
    ])
    .ok();
    let kinds: Vec<String> = entries(&home)
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["root", "module", "policy"]);
    env.sign(&home, "test-any-key", &[&csr]).ok();
    env.hsmca(&["log", "verify", "--home", s(&home), "--token"])
        .ok();
}
