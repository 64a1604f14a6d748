//! Adversarial review of issues 11 (one gate) and 12 (the hostile stick): attacks that hsmca
//! defends today and that `tests/gate.rs` and `tests/stick.rs` do not already cover. Each one
//! drives the real binary on real files (hard links, sparse files, directories at output
//! names, forged plans, escape sequences, directories swapped for symlinks mid-run) against a
//! SoftHSM2 token, and asserts what the attacker wanted did not happen.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Env, PIN, Run, outcomes, rule, run_within, s};

/// `hsmca ARGS` with this token, killed (and the test failed) after `secs` seconds.
fn hsmca_within(env: &Env, secs: u64, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hsmca"));
    cmd.env("SOFTHSM2_CONF", &env.conf)
        .env("HSMCA_PIN", PIN)
        .env_remove("HSMCA_PKCS11_MODULE")
        .args(args);
    run_within(cmd, Duration::from_secs(secs))
}

/// `sign-dir --home HOME ARGS --out OUT --json`, killed after `secs` seconds.
fn sign_dir(env: &Env, secs: u64, home: &Path, args: &[&str], out: &Path) -> Run {
    let mut all = vec!["sign-dir", "--home", s(home)];
    all.extend_from_slice(args);
    all.extend(["--out", s(out), "--json"]);
    hsmca_within(env, secs, &all)
}

/// A P-256 CSR made by `openssl req` with `subj` (and `extra` arguments) at `path`.
fn csr(path: &Path, subj: &str, extra: &[&str]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let key = path.with_extension("key");
    let mut args = vec![
        "req",
        "-new",
        "-nodes",
        "-utf8",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-keyout",
        s(&key),
        "-subj",
        subj,
        "-out",
        s(path),
    ];
    args.extend_from_slice(extra);
    common::openssl(&args);
}

/// Every certificate entry of the log, as JSON.
fn certs_logged(home: &Path) -> Vec<serde_json::Value> {
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["type"] == "cert")
        .collect()
}

/// The subjects of every certificate the log holds, as `openssl x509 -subject` prints them.
fn logged_subjects(home: &Path, dir: &Path) -> Vec<String> {
    use base64::Engine;
    let mut subjects = Vec::new();
    for (i, e) in certs_logged(home).iter().enumerate() {
        let der = base64::engine::general_purpose::STANDARD
            .decode(e["cert"].as_str().unwrap())
            .unwrap();
        let path = dir.join(format!("logged-{i}.der"));
        std::fs::write(&path, der).unwrap();
        subjects.push(common::openssl(&[
            "x509",
            "-inform",
            "DER",
            "-in",
            s(&path),
            "-noout",
            "-subject",
        ]));
    }
    subjects
}

/// Raw terminal control found in `bytes`: C0 controls but newline, DEL, C1 controls, bidi
/// overrides and zero-width characters.
fn raw_controls(bytes: &[u8]) -> Vec<char> {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|c| {
            (c.is_control() && *c != '\n')
                || matches!(*c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}')
                || matches!(*c, '\u{2066}'..='\u{2069}')
        })
        .collect()
}

#[test]
fn output_names_hard_linked_into_the_ca_home_or_taken_by_directories_fail_only_their_item() {
    let env = Env::new("hardlinks");
    let home = env.init("ca", "hardlinks", "ecdsa-p256");
    let input = env.path("usb/csrs");
    for name in ["log", "config", "dir", "good"] {
        csr(
            &input.join(format!("{name}.csr")),
            &format!("/CN={name}.test.internal"),
            &[],
        );
    }
    // Hard links (not symlinks: O_NOFOLLOW does not see them) from output names to the log and
    // the CA's configuration, on the same file system; a directory at another output name.
    let out = env.path("usb/certs");
    std::fs::create_dir_all(out.join("dir.crt")).unwrap();
    std::fs::hard_link(home.join("log/entries.jsonl"), out.join("log.crt")).unwrap();
    std::fs::hard_link(home.join("hsmca.json"), out.join("config.crt")).unwrap();
    let log_before = std::fs::read(home.join("log/entries.jsonl")).unwrap();
    let config_before = std::fs::read(home.join("hsmca.json")).unwrap();

    let run = sign_dir(
        &env,
        60,
        &home,
        &[s(&input), "--profile", "test-any-key"],
        &out,
    );
    run.code_is(1);
    let done = outcomes(&run);
    assert_eq!(done["good.csr"]["outcome"], "issued", "{done:?}");
    // Issued and logged, then reported failed under the output path, nothing written there.
    let failed = |name: &str| rule(&done[s(&out.join(name))]).to_owned();
    assert_eq!(failed("log.crt"), "output.exists", "{done:?}");
    assert_eq!(failed("config.crt"), "output.exists", "{done:?}");
    assert_eq!(failed("dir.crt"), "output.not_regular", "{done:?}");
    assert!(!done.contains_key(s(&out.join("good.crt"))), "{done:?}");
    // The log only grew (its old bytes are its prefix) and verifies; the config is unchanged.
    let log_after = std::fs::read(home.join("log/entries.jsonl")).unwrap();
    assert!(log_after.starts_with(&log_before), "the log was rewritten");
    assert_eq!(certs_logged(&home).len(), 4, "all four issued and logged");
    assert_eq!(
        std::fs::read(home.join("hsmca.json")).unwrap(),
        config_before
    );
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    assert!(out.join("dir.crt").is_dir());
}

#[test]
fn a_csr_hard_linked_to_a_secret_never_shows_the_secret() {
    let env = Env::new("secretcsr");
    let home = env.init("ca", "secretcsr", "ecdsa-p256");
    // A secret that even looks like a CSR, hard-linked into the input (same file system).
    let secret = env.path("secret.pem");
    std::fs::write(
        &secret,
        "-----BEGIN CERTIFICATE REQUEST-----\nSECRETPIN123456\n-----END CERTIFICATE REQUEST-----\n",
    )
    .unwrap();
    let input = env.path("usb/csrs");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::hard_link(&secret, input.join("s.csr")).unwrap();
    csr(&input.join("good.csr"), "/CN=good.test.internal", &[]);
    let out = env.path("usb/certs");
    let runs = [
        sign_dir(
            &env,
            60,
            &home,
            &[s(&input), "--profile", "test-any-key"],
            &out,
        ),
        hsmca_within(
            &env,
            30,
            &[
                "check",
                "--home",
                s(&home),
                "--profile",
                "test-any-key",
                s(&input.join("s.csr")),
            ],
        ),
    ];
    for run in &runs {
        run.code_is(1);
        assert!(!run.all().contains("SECRETPIN"), "{}", run.all());
    }
    assert_eq!(outcomes(&runs[0])["good.csr"]["outcome"], "issued");
    for entry in std::fs::read_dir(&out).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("SECRETPIN"));
    }
}

#[test]
fn sparse_terabyte_inputs_are_refused_in_seconds() {
    let env = Env::new("sparse");
    let home = env.init("ca", "sparse", "ecdsa-p256");
    let input = env.path("usb/csrs");
    csr(&input.join("good.csr"), "/CN=good.test.internal", &[]);
    let tera = 1u64 << 40;
    for name in ["csrs/big.csr", "manifest.json", "objects.json", "plan.json"] {
        let f = std::fs::File::create(env.path(&format!("usb/{name}"))).unwrap();
        f.set_len(tera).unwrap();
    }
    let out = env.path("usb/certs");
    let started = std::time::Instant::now();
    let run = sign_dir(
        &env,
        60,
        &home,
        &[s(&input), "--profile", "test-any-key"],
        &out,
    );
    run.code_is(1);
    let done = outcomes(&run);
    assert_eq!(rule(&done["big.csr"]), "input.size");
    assert_eq!(done["good.csr"]["outcome"], "issued");
    let manifest = env.path("usb/manifest.json");
    let plan = env.path("usb/plan.json");
    let objects = env.path("usb/objects.json");
    let big = input.join("big.csr");
    let refused: [&[&str]; 4] = [
        &[
            "sign-dir",
            "--home",
            s(&home),
            s(&input),
            "--manifest",
            s(&manifest),
            "--out",
            s(&out),
        ],
        &[
            "sign-dir",
            "--home",
            s(&home),
            s(&objects),
            "--out",
            s(&out),
        ],
        &[
            "sign-dir",
            "--home",
            s(&home),
            "--plan",
            s(&plan),
            "--out",
            s(&out),
        ],
        &[
            "check",
            "--home",
            s(&home),
            "--profile",
            "test-any-key",
            s(&big),
        ],
    ];
    for args in refused {
        let run = hsmca_within(&env, 30, args);
        assert_ne!(run.code(), 0, "{args:?}");
        assert!(run.all().contains("size"), "{args:?}: {}", run.all());
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(certs_logged(&home).len(), 1);
}

#[test]
fn a_plan_edited_to_issue_what_was_refused_is_refused_again() {
    let env = Env::new("forged");
    let home = env.init_k8s("ca", "forged");
    let input = env.path("usb/csrs");
    csr(
        &input.join("masters.csr"),
        "/O=system:masters/CN=kubernetes-admin",
        &[],
    );
    csr(
        &input.join("ca.csr"),
        "/O=kubeadm:cluster-admins/CN=kubernetes-admin",
        &[
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ],
    );
    let manifest = env.path("usb/manifest.json");
    std::fs::write(&manifest, r#"{"masters.csr": "admin", "ca.csr": "admin"}"#).unwrap();
    let plan_file = env.path("usb/plan.json");
    let run = env.hsmca(&[
        "plan",
        "--home",
        s(&home),
        s(&input),
        "--manifest",
        s(&manifest),
        "--out",
        s(&plan_file),
    ]);
    run.code_is(1);
    // The attacker turns each refusal into "issue" with harmless-looking review columns and
    // recomputes the (unkeyed) hash.
    let mut plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&plan_file).unwrap()).unwrap();
    for item in plan["items"].as_array_mut().unwrap() {
        let o = item.as_object_mut().unwrap();
        o.remove("refusals");
        o.insert("verdict".into(), "issue".into());
        o.insert("subject".into(), "CN=kubernetes-admin".into());
        o.insert("sans".into(), serde_json::json!([]));
        o.insert("usages".into(), serde_json::json!(["digital_signature"]));
        o.insert("validity".into(), "30d".into());
        o.insert("issuer".into(), "kubernetes-ca".into());
    }
    let items: Vec<hsmca::batch::Item> = serde_json::from_value(plan["items"].clone()).unwrap();
    plan["hash"] = hsmca::batch::Plan::content_hash(&items).into();
    std::fs::write(&plan_file, serde_json::to_vec(&plan).unwrap()).unwrap();
    let before = certs_logged(&home).len();
    let out = env.path("usb/certs");
    // Even approved (an operator who trusted the forged hash), every item is decided again.
    let forged = plan["hash"].as_str().unwrap().to_owned();
    let run = sign_dir(
        &env,
        60,
        &home,
        &["--plan", s(&plan_file), "--approve", &forged],
        &out,
    );
    run.code_is(1);
    let done = outcomes(&run);
    assert_eq!(done["masters.csr"]["outcome"], "refused", "{done:?}");
    assert_eq!(done["ca.csr"]["outcome"], "refused", "{done:?}");
    let text = run.stdout();
    assert!(text.contains("subject.O.forbidden"), "{text}");
    assert!(text.contains("extensions.basic_constraints"), "{text}");
    assert_eq!(certs_logged(&home).len(), before, "nothing was issued");
    assert!(!out.join("masters.crt").exists() && !out.join("ca.crt").exists());
}

#[test]
fn repeated_or_multi_valued_organizations_and_ca_requests_are_refused_on_every_batch_path() {
    let env = Env::new("subjects");
    let home = env.init_k8s("ca", "subjects");
    let input = env.path("usb/csrs");
    csr(
        &input.join("repeated.csr"),
        "/O=kubeadm:cluster-admins/O=system:masters/CN=kubernetes-admin",
        &[],
    );
    csr(
        &input.join("multi.csr"),
        "/O=kubeadm:cluster-admins+O=system:masters/CN=kubernetes-admin",
        &["-multivalue-rdn"],
    );
    csr(
        &input.join("ca.csr"),
        "/O=kubeadm:cluster-admins/CN=kubernetes-admin",
        &[
            "-addext",
            "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext",
            "keyUsage=critical,keyCertSign,digitalSignature",
        ],
    );
    let before = certs_logged(&home).len();
    let manifest = env.path("usb/manifest.json");
    std::fs::write(
        &manifest,
        r#"{"repeated.csr": "admin", "multi.csr": "admin", "ca.csr": "admin"}"#,
    )
    .unwrap();
    let run = sign_dir(
        &env,
        60,
        &home,
        &[s(&input), "--manifest", s(&manifest)],
        &env.path("usb/certs"),
    );
    run.code_is(1);
    let done = outcomes(&run);
    assert_eq!(
        rule(&done["repeated.csr"]),
        "subject.O.repeated",
        "{done:?}"
    );
    assert!(run.stdout().contains("subject.O.forbidden"));
    assert_eq!(
        rule(&done["ca.csr"]),
        "extensions.basic_constraints",
        "{done:?}"
    );
    for item in ["repeated.csr", "multi.csr", "ca.csr"] {
        assert_eq!(done[item]["outcome"], "refused", "{item}");
    }
    // The same CSRs as kubectl objects of the client signer.
    use base64::Engine;
    let approved = serde_json::json!({"conditions": [{"type": "Approved", "status": "True"}]});
    let items: Vec<serde_json::Value> = ["repeated", "multi", "ca"]
        .iter()
        .map(|n| {
            let request = base64::engine::general_purpose::STANDARD
                .encode(std::fs::read(input.join(format!("{n}.csr"))).unwrap());
            serde_json::json!({"apiVersion": "certificates.k8s.io/v1",
                "kind": "CertificateSigningRequest", "metadata": {"name": n},
                "spec": {"request": request, "signerName": "kubernetes.io/kube-apiserver-client",
                         "usages": ["digital signature", "client auth"], "username": "mallory"},
                "status": approved})
        })
        .collect();
    let objects = env.path("usb/csrs.json");
    std::fs::write(
        &objects,
        serde_json::to_vec(&serde_json::json!({"kind": "List", "items": items})).unwrap(),
    )
    .unwrap();
    let run = sign_dir(&env, 60, &home, &[s(&objects)], &env.path("usb/status"));
    run.code_is(1);
    let done = outcomes(&run);
    for item in ["repeated", "multi", "ca"] {
        assert_eq!(done[item]["outcome"], "refused", "{item}: {done:?}");
    }
    assert_eq!(certs_logged(&home).len(), before, "nothing was issued");
}

#[test]
fn a_rerun_under_a_profile_that_refuses_the_csr_does_not_release_the_old_certificate() {
    let env = Env::new("rerun");
    let home = env.init_k8s("ca", "rerun");
    let input = env.path("usb/csrs");
    csr(&input.join("r.csr"), "/CN=r.test.internal", &[]);
    let first = env.path("usb/first");
    env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        s(&input),
        "--profile",
        "test-any-key",
        "--out",
        s(&first),
    ])
    .ok();
    let second = env.path("usb/second");
    let run = sign_dir(&env, 60, &home, &[s(&input), "--profile", "admin"], &second);
    run.code_is(1);
    assert_eq!(outcomes(&run)["r.csr"]["outcome"], "refused");
    assert!(!second.join("r.crt").exists());
    let run = env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "admin",
        s(&input.join("r.csr")),
    ]);
    run.code_is(1);
    assert!(run.stdout().contains("refused"), "{}", run.stdout());
    assert_eq!(
        certs_logged(&home).len(),
        4,
        "three intermediates and r.csr once"
    );
}

#[test]
fn escapes_in_subjects_kubectl_fields_and_manifest_profiles_never_reach_the_terminal_raw() {
    let env = Env::new("escapes");
    let home = env.init_k8s("ca", "escapes");
    let input = env.path("usb/csrs");
    // Subjects: a conceal sequence, a bidi override and a zero-width space inside the CN, and
    // a CN that would pass but for a trailing right-to-left override.
    csr(
        &input.join("a.csr"),
        "/CN=a\u{1b}[8m\u{202e}b\u{200b}.test.internal",
        &[],
    );
    csr(
        &input.join("b.csr"),
        "/O=kubeadm:cluster-admins/CN=kubernetes-admin\u{202e}",
        &[],
    );
    let manifest = env.path("usb/manifest.json");
    std::fs::write(
        &manifest,
        serde_json::json!({
            "a.csr": "test-any-key",
            "b.csr": {"profile": "admin", "validity": "9\u{1b}[2J\u{202e}d"},
            "c.csr": "adm\u{1b}[1A\u{2067}in",
        })
        .to_string(),
    )
    .unwrap();
    csr(&input.join("c.csr"), "/CN=c.test.internal", &[]);
    use base64::Engine;
    let request = base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(input.join("b.csr")).unwrap());
    let approved = serde_json::json!({"conditions": [{"type": "Approved", "status": "True"}]});
    let objects = env.path("usb/csrs.json");
    std::fs::write(
        &objects,
        serde_json::to_vec(&serde_json::json!({"kind": "List", "items": [
            {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
             "metadata": {"name": "one"},
             "spec": {"request": request, "signerName": "ex\u{1b}[2J\u{202e}",
                      "usages": ["u\u{1b}[1A\u{202e}"],
                      "username": "m\u{1b}]0;title\u{7}\u{202e}"},
             "status": approved},
            {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
             "metadata": {"name": "two"},
             "spec": {"request": request, "signerName": "kubernetes.io/kube-apiserver-client",
                      "usages": ["client auth\u{9b}2J"], "username": "m\u{1b}\u{202e}"},
             "status": approved}]}))
        .unwrap(),
    )
    .unwrap();
    let signers = env.path("usb/signers.json");
    std::fs::write(
        &signers,
        serde_json::json!({"ex\u{1b}[2J\u{202e}": "adm\u{1b}\u{202e}"}).to_string(),
    )
    .unwrap();
    let out = env.path("usb/out");
    let (plan, plan_k8s) = (env.path("usb/plan.json"), env.path("usb/plan-k8s.json"));
    let (a, b) = (input.join("a.csr"), input.join("b.csr"));
    let runs: Vec<Vec<&str>> = vec![
        vec![
            "check",
            "--home",
            s(&home),
            "--profile",
            "test-any-key",
            s(&a),
        ],
        vec!["check", "--home", s(&home), "--profile", "admin", s(&b)],
        vec![
            "plan",
            "--home",
            s(&home),
            s(&input),
            "--manifest",
            s(&manifest),
            "--out",
            s(&plan),
        ],
        vec![
            "sign-dir",
            "--home",
            s(&home),
            s(&input),
            "--manifest",
            s(&manifest),
            "--out",
            s(&out),
        ],
        vec![
            "plan",
            "--home",
            s(&home),
            s(&objects),
            "--manifest",
            s(&signers),
            "--out",
            s(&plan_k8s),
        ],
        vec![
            "sign-dir",
            "--home",
            s(&home),
            s(&objects),
            "--manifest",
            s(&signers),
            "--out",
            s(&out),
        ],
        vec![
            "sign-dir",
            "--home",
            s(&home),
            s(&objects),
            "--out",
            s(&out),
            "--json",
        ],
    ];
    for args in &runs {
        let run = hsmca_within(&env, 60, args);
        assert_eq!(run.code(), 1, "{args:?}: {}", run.all());
        for (stream, bytes) in [("stdout", &run.0.stdout), ("stderr", &run.0.stderr)] {
            let raw = raw_controls(bytes);
            assert!(
                raw.is_empty(),
                "{args:?} {stream} has raw {raw:?}:\n{}",
                run.all()
            );
        }
        if args.contains(&"--json") {
            for line in run.stdout().lines() {
                serde_json::from_str::<serde_json::Value>(line).unwrap();
            }
        }
    }
    // Nothing was issued.
    assert_eq!(certs_logged(&home).len(), 3, "only the three intermediates");
}

#[test]
fn directories_swapped_for_symlinks_mid_run_never_lead_outside_the_input_or_the_output() {
    let env = Env::new("swap");
    let home = env.init("ca", "swap", "ecdsa-p256");
    let input = env.path("usb/csrs");
    let outside = env.path("elsewhere");
    let n = 24;
    let mut manifest = serde_json::Map::new();
    for i in 0..n {
        csr(
            &input.join(format!("sub/c-{i}.csr")),
            &format!("/CN=inside-{i}.test.internal"),
            &[],
        );
        csr(
            &outside.join(format!("c-{i}.csr")),
            &format!("/CN=outside-{i}.test.internal"),
            &[],
        );
        manifest.insert(format!("sub/c-{i}.csr"), "test-any-key".into());
    }
    let manifest_file = env.path("usb/manifest.json");
    std::fs::write(&manifest_file, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let out = env.path("usb/certs");
    let victim = env.path("victim");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    std::fs::create_dir_all(&victim).unwrap();

    // A thread swaps usb/csrs/sub and usb/certs/sub for symlinks (to `elsewhere` and `victim`)
    // and back, as fast as it can, for the whole run.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let pairs = [
            (input.join("sub"), input.join("sub.real"), outside.clone()),
            (out.join("sub"), out.join("sub.real"), victim.clone()),
        ];
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Errors are ignored: hsmca may recreate OUT/sub between two steps.
                for (name, real, target) in &pairs {
                    let _ = std::fs::rename(name, real);
                    let _ = std::os::unix::fs::symlink(target, name);
                    std::thread::yield_now();
                    if name.symlink_metadata().is_ok_and(|m| m.is_symlink()) {
                        let _ = std::fs::remove_file(name);
                    }
                    let _ = std::fs::rename(real, name);
                }
                swaps += 1;
            }
            swaps
        })
    };
    let run = sign_dir(
        &env,
        120,
        &home,
        &[s(&input), "--manifest", s(&manifest_file)],
        &out,
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 0);
    assert!(matches!(run.code(), 0 | 1), "{}", run.all());

    // Nothing from `elsewhere` was read into a certificate, nothing was written to `victim`.
    let subjects = logged_subjects(&home, env.dir.path());
    assert!(
        subjects.iter().all(|s| !s.contains("outside")),
        "{subjects:?}"
    );
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 2 * n);
    // Each item ended one way or another (a write failure adds a line under the output path).
    let done = outcomes(&run);
    let items = done.keys().filter(|k| k.starts_with("sub/")).count();
    assert_eq!(items, n, "{done:?}");
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn kubectl_objects_not_plainly_approved_or_asking_for_forever_are_not_signed_as_asked() {
    let env = Env::new("objects");
    let home = env.init("ca", "objects", "ecdsa-p256");
    use base64::Engine;
    let approved = serde_json::json!({"type": "Approved", "status": "True"});
    let object = |name: &str, status: serde_json::Value, expiration: Option<u64>| {
        let path = env.path(&format!("usb/{name}.csr"));
        csr(&path, &format!("/CN={name}.test.internal"), &[]);
        let request =
            base64::engine::general_purpose::STANDARD.encode(std::fs::read(&path).unwrap());
        let mut spec = serde_json::json!({"request": request, "signerName": "example.com/test",
            "usages": ["digital signature", "client auth"], "username": "mallory"});
        if let Some(e) = expiration {
            spec["expirationSeconds"] = e.into();
        }
        serde_json::json!({"apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest", "metadata": {"name": name},
            "spec": spec, "status": status})
    };
    let items = vec![
        object(
            "approved-false",
            serde_json::json!({"conditions": [{"type": "Approved", "status": "False"}]}),
            None,
        ),
        object(
            "approved-then-denied",
            serde_json::json!({"conditions": [approved, {"type": "Denied", "status": "True"}]}),
            None,
        ),
        object(
            "approved-then-failed",
            serde_json::json!({"conditions": [approved, {"type": "Failed", "status": "True"}]}),
            None,
        ),
        object(
            "has-certificate",
            serde_json::json!({"conditions": [approved], "certificate": "eA=="}),
            None,
        ),
        object(
            "forever",
            serde_json::json!({"conditions": [approved]}),
            Some(u64::MAX),
        ),
        object("twice", serde_json::json!({"conditions": [approved]}), None),
        object("twice", serde_json::json!({"conditions": [approved]}), None),
    ];
    let objects = env.path("usb/csrs.json");
    std::fs::write(
        &objects,
        serde_json::to_vec(&serde_json::json!({"kind": "List", "items": items})).unwrap(),
    )
    .unwrap();
    let signers = env.path("usb/signers.json");
    std::fs::write(&signers, r#"{"example.com/test": "test-any-key"}"#).unwrap();
    let out = env.path("usb/status");
    let run = sign_dir(
        &env,
        60,
        &home,
        &[s(&objects), "--manifest", s(&signers)],
        &out,
    );
    run.code_is(1);
    let done = outcomes(&run);
    for name in [
        "approved-false",
        "approved-then-denied",
        "approved-then-failed",
        "has-certificate",
    ] {
        assert_eq!(done[name]["outcome"], "skipped", "{name}: {done:?}");
        assert!(!out.join(format!("{name}.status.json")).exists());
    }
    assert_eq!(done["forever"]["outcome"], "issued", "{done:?}");
    assert_eq!(done["twice"]["outcome"], "issued", "{done:?}");
    assert_eq!(rule(&done["items[6]"]), "k8s.name", "{done:?}");
    assert_eq!(certs_logged(&home).len(), 2);
    // expirationSeconds of u64::MAX is capped by the profile (test-any-key: at most 90 days).
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("forever.status.json")).unwrap()).unwrap();
    let chain = base64::engine::general_purpose::STANDARD
        .decode(status["status"]["certificate"].as_str().unwrap())
        .unwrap();
    let pem = env.path("forever.pem");
    std::fs::write(&pem, chain).unwrap();
    // `-checkend N` fails when the certificate expires within N seconds (90 days and 10 min).
    let end = Command::new("openssl")
        .args(["x509", "-in", s(&pem), "-noout", "-checkend", "7776600"])
        .output()
        .unwrap();
    assert!(!end.status.success(), "{end:?}");
    assert!(String::from_utf8_lossy(&end.stdout).contains("will expire"));
}

#[test]
fn export_and_crl_outputs_planted_as_links_into_the_ca_home_leave_it_untouched() {
    let env = Env::new("exportlinks");
    let home = env.init("ca", "exportlinks", "ecdsa-p256");
    let export = env.path("usb/export");
    std::fs::create_dir_all(export.join("proofs")).unwrap();
    std::os::unix::fs::symlink(home.join("log/entries.jsonl"), export.join("entries.jsonl"))
        .unwrap();
    std::os::unix::fs::symlink(home.join("root.pem"), export.join("log.vkey")).unwrap();
    std::os::unix::fs::symlink(home.join("hsmca.json"), export.join("proofs/1.tlog-proof"))
        .unwrap();
    let before: Vec<Vec<u8>> = ["log/entries.jsonl", "root.pem", "hsmca.json"]
        .iter()
        .map(|f| std::fs::read(home.join(f)).unwrap())
        .collect();
    let run = hsmca_within(
        &env,
        60,
        &["log", "export", "--home", s(&home), "--out", s(&export)],
    );
    assert_ne!(run.code(), 0, "{}", run.all());
    let crl = export.join("log.vkey");
    let run = hsmca_within(
        &env,
        60,
        &[
            "crl",
            "--home",
            s(&home),
            "--issuer",
            "root",
            "--next-update",
            "30d",
            "--out",
            s(&crl),
        ],
    );
    assert_ne!(run.code(), 0, "{}", run.all());
    let log = std::fs::read(home.join("log/entries.jsonl")).unwrap();
    assert!(log.starts_with(&before[0]), "the log was rewritten");
    assert_eq!(std::fs::read(home.join("root.pem")).unwrap(), before[1]);
    assert_eq!(std::fs::read(home.join("hsmca.json")).unwrap(), before[2]);
    for link in ["entries.jsonl", "log.vkey", "proofs/1.tlog-proof"] {
        assert!(export.join(link).symlink_metadata().unwrap().is_symlink());
    }
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}
