//! Certificate lifecycle against a real SoftHSM2 token: revocation, CRLs checked by OpenSSL and
//! pkilint, the expiry report, renewal, listings, and the export whose proofs an independent
//! implementation verifies.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, openssl, require, s};

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Signs a test-any-key CSR with CN=`cn` and returns (serial, certificate path).
fn issue(env: &Env, home: &Path, cn: &str, validity: &str) -> (String, PathBuf) {
    let csr = env.p256_csr(&format!("c/{cn}.csr"), &format!("/CN={cn}"));
    let run = env.hsmca(&[
        "sign",
        "--home",
        s(home),
        "--profile",
        "test-any-key",
        "--validity",
        validity,
        "--json",
        s(&csr),
    ]);
    run.ok();
    let out = &json_lines(&run.stdout())[0];
    (
        out["cert"]["serial"].as_str().unwrap().to_owned(),
        csr.with_extension("crt"),
    )
}

fn tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// pkilint's PKIX rules find no error in the PEM CRL at `crl`.
fn assert_pkilint_clean_crl(crl: &Path) {
    let (ok, lint) = tool(
        "lint_crl",
        &[
            "lint",
            "-t",
            "CRL",
            "-p",
            "PKIX",
            "-s",
            "ERROR",
            "--document-format",
            "PEM",
            s(crl),
        ],
    );
    assert!(
        ok && lint.trim().is_empty(),
        "pkilint on {}: {lint}",
        crl.display()
    );
}

#[test]
fn revocation_and_crls_are_checked_by_openssl_and_pkilint() {
    require("lint_crl");
    let env = Env::new("crl");
    let home = env.init_k8s("ca", "crl");
    let root = home.join("root.pem");
    let (bad, bad_cert) = issue(&env, &home, "bad", "30d");
    let (_, good_cert) = issue(&env, &home, "good", "30d");

    // Unknown serials and double revocations are refused; --cert finds the serial.
    env.hsmca(&[
        "revoke",
        "--home",
        s(&home),
        "00ff",
        "--reason",
        "superseded",
    ])
    .fails_with(2, "was never issued");
    env.hsmca(&["revoke", "--home", s(&home), &bad, "--reason", "nonsense"])
        .fails_with(2, "unknown reason");
    let run = env.hsmca(&[
        "revoke",
        "--home",
        s(&home),
        "--cert",
        s(&bad_cert),
        "--reason",
        "keyCompromise", // the RFC 5280 / OpenSSL spelling
        "--invalidity-date",
        "2026-01-02T03:04:05Z",
    ]);
    run.ok();
    assert!(
        run.stdout().contains(&format!("revoked serial {bad}")),
        "{}",
        run.all()
    );
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    assert!(
        log.contains(r#""reason":"key-compromise""#),
        "logged under hsmca's name: {log}"
    );
    env.hsmca(&["revoke", "--home", s(&home), &bad, "--reason", "superseded"])
        .fails_with(2, "already revoked");

    let crl = env.path("root-1.crl");
    let run = env.hsmca(&[
        "crl",
        "--home",
        s(&home),
        "--issuer",
        "root",
        "--next-update",
        "7d",
        "--out",
        s(&crl),
        "--json",
    ]);
    run.ok();
    let report = &json_lines(&run.stdout())[0];
    assert_eq!(report["number"], 1);
    assert_eq!(report["revoked"][0], bad.as_str());
    let (ok, text) = tool(
        "openssl",
        &[
            "crl",
            "-in",
            s(&crl),
            "-CAfile",
            s(&root),
            "-noout",
            "-text",
        ],
    );
    assert!(ok && text.contains("verify OK"), "{text}");
    assert!(
        text.contains("Key Compromise")
            && text.contains("Invalidity Date")
            && text.contains("X509v3 CRL Number: \n                1"),
        "{text}"
    );
    assert!(text.contains("Authority Key Identifier"), "{text}");
    assert_pkilint_clean_crl(&crl);
    let (ok, text) = tool(
        "openssl",
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            s(&root),
            "-CRLfile",
            s(&crl),
            s(&bad_cert),
        ],
    );
    assert!(!ok && text.contains("certificate revoked"), "{text}");
    let (ok, text) = tool(
        "openssl",
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            s(&root),
            "-CRLfile",
            s(&crl),
            s(&good_cert),
        ],
    );
    assert!(ok, "{text}");

    // Numbers increase per issuer; an intermediate's CRL only lists what it signed.
    let crl2 = env.path("root-2.crl");
    let run = env.hsmca(&["crl", "--home", s(&home), "--out", s(&crl2), "--json"]);
    assert_eq!(json_lines(&run.stdout())[0]["number"], 2, "{}", run.all());
    let k8s = env.path("k8s.crl");
    let run = env.hsmca(&[
        "crl",
        "--home",
        s(&home),
        "--issuer",
        "kubernetes-ca",
        "--out",
        s(&k8s),
        "--json",
    ]);
    let report = &json_lines(&run.stdout())[0];
    assert_eq!(report["number"], 1, "{}", run.all());
    assert_eq!(report["revoked"].as_array().unwrap().len(), 0);
    let (ok, text) = tool(
        "openssl",
        &[
            "crl",
            "-in",
            s(&k8s),
            "-CAfile",
            s(&home.join("cas/kubernetes-ca.pem")),
            "-noout",
        ],
    );
    assert!(ok && text.contains("verify OK"), "{text}");
    assert_pkilint_clean_crl(&k8s);
    // Never overwrites.
    env.hsmca(&["crl", "--home", s(&home), "--out", s(&crl)])
        .fails_with(2, "already exists");
    let run = env.hsmca(&["log", "verify", "--home", s(&home), "--json"]);
    run.ok();
    let v = &json_lines(&run.stdout())[0];
    assert_eq!(v["counts"]["crl"], 3);
    assert_eq!(v["counts"]["revocation"], 1);
}

#[test]
fn expiring_reports_soonest_first_and_sets_the_exit_status() {
    let env = Env::new("exp");
    let home = env.path("ca");
    env.hsmca(&[
        "init",
        "--home",
        s(&home),
        "--token",
        "exp",
        "--key-type",
        "ecdsa-p256",
        "--subject",
        "CN=Short Root",
        "--validity",
        "150d",
    ])
    .ok();
    env.install_test_any_key(&home);
    let (soon, _) = issue(&env, &home, "soon", "10d");
    let (later, _) = issue(&env, &home, "later", "60d");
    let (gone, _) = issue(&env, &home, "gone", "10d");
    env.hsmca(&[
        "revoke",
        "--home",
        s(&home),
        &gone,
        "--reason",
        "cessation-of-operation",
    ])
    .ok();

    let run = env.hsmca(&["expiring", "--home", s(&home), "--within", "5d"]);
    run.code_is(0);
    assert!(run.stdout().contains("nothing expires within 5d"));
    let run = env.hsmca(&["expiring", "--home", s(&home), "--within", "30d", "--json"]);
    run.code_is(1);
    let list = json_lines(&run.stdout());
    assert_eq!(list.len(), 1, "the revoked one is left out: {list:?}");
    assert_eq!(list[0]["serial"], soon.as_str());
    assert_eq!(list[0]["profile"], "test-any-key");
    assert_eq!(list[0]["days_left"], 10);
    let run = env.hsmca(&["expiring", "--home", s(&home), "--within", "200d", "--json"]);
    run.code_is(1);
    let order: Vec<String> = json_lines(&run.stdout())
        .iter()
        .map(|e| e["serial"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(order.len(), 3);
    assert_eq!(&order[..2], &[soon.clone(), later.clone()]);
    let run = env.hsmca(&["expiring", "--home", s(&home), "--within", "200d"]);
    assert!(
        run.stdout().lines().any(|l| l.contains("root (CA)")),
        "the root itself is reported: {}",
        run.stdout()
    );

    // A renewed certificate is replaced in the report by its successor.
    let out = env.path("renewed");
    std::fs::create_dir_all(&out).unwrap();
    env.hsmca(&[
        "renew",
        "--home",
        s(&home),
        &soon,
        "--validity",
        "90d",
        "--out",
        s(&out),
    ])
    .ok();
    let run = env.hsmca(&["expiring", "--home", s(&home), "--within", "30d"]);
    run.code_is(0);
}

#[test]
fn renew_keeps_subject_and_key_under_todays_profile_and_links_the_serials() {
    let env = Env::new("renew");
    let home = env.init("ca", "renew", "ecdsa-p256");
    let csr = env.csr(
        "c/r.csr",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "/CN=svc1",
        Some("DNS:a.test.internal,IP:127.0.0.2"),
        &[],
    );
    let run = env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        "--json",
        s(&csr),
    ]);
    let old = json_lines(&run.stdout())[0]["cert"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = env.path("new");
    std::fs::create_dir_all(&out).unwrap();
    let run = env.hsmca(&[
        "renew",
        "--home",
        s(&home),
        &old,
        "--out",
        s(&out),
        "--json",
    ]);
    run.ok();
    let new = json_lines(&run.stdout())[0]["cert"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new, old);
    let new_cert = out.join(format!("{new}.crt"));
    assert!(common::openssl_verifies(&home.join("root.pem"), &new_cert));
    let key = |p: &Path| openssl(&["x509", "-in", s(p), "-noout", "-pubkey"]);
    assert_eq!(
        key(&new_cert),
        key(&csr.with_extension("crt")),
        "same public key"
    );
    let text = openssl(&[
        "x509",
        "-in",
        s(&new_cert),
        "-noout",
        "-subject",
        "-ext",
        "subjectAltName",
    ]);
    assert!(
        text.contains("CN = svc1")
            && text.contains("DNS:a.test.internal")
            && text.contains("IP Address:127.0.0.2"),
        "{text}"
    );
    let show = env.hsmca(&["log", "show", "--home", s(&home), &old]);
    assert!(
        show.stdout().contains(&format!("renewed by  {new}")),
        "{}",
        show.stdout()
    );
    let show = env.hsmca(&["log", "show", "--home", s(&home), &new, "--json"]);
    assert_eq!(json_lines(&show.stdout())[0]["renews"], old.as_str());

    // The profile as it stands today decides: narrow it, and the renewal is refused.
    let profile = home.join("profiles/test-any-key.json");
    let text = std::fs::read_to_string(&profile).unwrap();
    std::fs::write(
        &profile,
        text.replace("\"127.0.0.0/8\"", "\"127.9.0.0/16\""),
    )
    .unwrap();
    env.hsmca(&["profiles", "apply", "--home", s(&home)]).ok();
    let run = env.hsmca(&["renew", "--home", s(&home), &new, "--out", s(&out)]);
    run.code_is(1);
    assert!(
        run.stdout().contains("rule san.ip") && run.stdout().contains("127.0.0.2"),
        "{}",
        run.stdout()
    );
    std::fs::write(&profile, text).unwrap();
    env.hsmca(&["profiles", "apply", "--home", s(&home)]).ok();
    env.hsmca(&["revoke", "--home", s(&home), &new, "--reason", "superseded"])
        .ok();
    let run = env.hsmca(&["renew", "--home", s(&home), &new, "--out", s(&out)]);
    run.code_is(1);
    assert!(run.stdout().contains("is revoked"), "{}", run.stdout());
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn log_list_filters_by_profile_subject_serial_time_and_revocation() {
    let env = Env::new("list");
    let home = env.init("ca", "list", "ecdsa-p256");
    let (a, _) = issue(&env, &home, "alpha", "30d");
    let (b, _) = issue(&env, &home, "beta", "30d");
    env.hsmca(&["revoke", "--home", s(&home), &b, "--reason", "superseded"])
        .ok();
    let list = |args: &[&str]| {
        let mut all = vec!["log", "list", "--home", s(&home), "--json"];
        all.extend_from_slice(args);
        let run = env.hsmca(&all);
        run.ok();
        json_lines(&run.stdout())
            .iter()
            .map(|r| r["serial"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(list(&[]), vec![a.clone(), b.clone()]);
    assert_eq!(
        list(&["--profile", "test-any-key", "--subject", "alpha"]),
        vec![a.clone()]
    );
    assert_eq!(list(&["--serial", &b.to_uppercase()]), vec![b.clone()]);
    assert_eq!(list(&["--revoked"]), vec![b.clone()]);
    assert_eq!(list(&["--profile", "admin"]), Vec::<String>::new());
    assert_eq!(
        list(&[
            "--since",
            "2000-01-01T00:00:00Z",
            "--until",
            "2999-01-01T00:00:00Z"
        ])
        .len(),
        2
    );
    assert_eq!(list(&["--since", "2999-01-01T00:00:00Z"]).len(), 0);
    let run = env.hsmca(&["log", "list", "--home", s(&home)]);
    assert!(
        run.stdout().contains("revoked") && run.stdout().contains("CN=alpha"),
        "{}",
        run.stdout()
    );
}

#[test]
fn export_proofs_verify_independently_and_outside_checkpoints_catch_a_rollback() {
    require("python3");
    let env = Env::new("export");
    let home = env.init("ca", "export", "ecdsa-p256");
    let (a, _) = issue(&env, &home, "one", "30d");
    env.hsmca(&["crl", "--home", s(&home), "--out", s(&env.path("r.crl"))])
        .ok();
    // A backup, and the checkpoint an auditor keeps, before more is issued.
    let backup = env.path("backup");
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(&home)
            .arg(&backup)
            .status()
            .unwrap()
            .success()
    );
    let early = env.path("early.checkpoint");
    std::fs::copy(home.join("log/checkpoint"), &early).unwrap();
    issue(&env, &home, "two", "30d");
    env.hsmca(&["revoke", "--home", s(&home), &a, "--reason", "superseded"])
        .ok();
    let late = env.path("late.checkpoint");
    std::fs::copy(home.join("log/checkpoint"), &late).unwrap();

    let out = env.path("export");
    let run = env.hsmca(&[
        "log",
        "export",
        "--home",
        s(&home),
        "--out",
        s(&out),
        "--json",
    ]);
    run.ok();
    let report = &json_lines(&run.stdout())[0];
    assert_eq!(
        report["proofs"], 3,
        "two certificates and one CRL: {report}"
    );
    let entries = std::fs::read_to_string(out.join("entries.jsonl")).unwrap();
    let lines: Vec<&str> = entries.lines().collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/verify_proof.py");
    let mut checked = 0;
    for proof in std::fs::read_dir(out.join("proofs")).unwrap() {
        let proof = proof.unwrap().path();
        let index: usize = proof
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let leaf = env.path(&format!("leaf-{index}"));
        std::fs::write(&leaf, lines[index]).unwrap();
        let (ok, text) = tool(
            "python3",
            &[s(&script), s(&out.join("log.vkey")), s(&leaf), s(&proof)],
        );
        assert!(
            ok && text.starts_with(&format!("OK {index} ")),
            "{}: {text}",
            proof.display()
        );
        // The same proof for a changed entry fails.
        std::fs::write(&leaf, lines[index].replacen("\"v\":1", "\"v\":2", 1)).unwrap();
        let (ok, _) = tool(
            "python3",
            &[s(&script), s(&out.join("log.vkey")), s(&leaf), s(&proof)],
        );
        assert!(!ok, "a changed entry must not verify");
        checked += 1;
    }
    assert_eq!(checked, 3);
    assert!(out.join(format!("certs/{a}.pem")).exists() && out.join("crls/root-1.pem").exists());

    // The live log extends both outside checkpoints; the rolled-back backup does not.
    env.hsmca(&[
        "log",
        "verify",
        "--home",
        s(&home),
        "--checkpoint",
        s(&early),
        "--checkpoint",
        s(&late),
    ])
    .ok();
    env.hsmca(&[
        "log",
        "verify",
        "--home",
        s(&backup),
        "--checkpoint",
        s(&early),
    ])
    .ok();
    let run = env.hsmca(&[
        "log",
        "verify",
        "--home",
        s(&backup),
        "--checkpoint",
        s(&late),
    ]);
    run.code_is(4);
    assert!(
        run.stdout().contains("truncated or rolled back"),
        "{}",
        run.stdout()
    );
    // A forged outside checkpoint is rejected.
    let forged = env.path("forged.checkpoint");
    std::fs::write(
        &forged,
        std::fs::read_to_string(&late)
            .unwrap()
            .replacen("\n", "\n1", 1),
    )
    .unwrap();
    env.hsmca(&[
        "log",
        "verify",
        "--home",
        s(&home),
        "--checkpoint",
        s(&forged),
    ])
    .code_is(4);
}

#[test]
fn a_reader_that_closes_the_pipe_early_is_not_an_error() {
    // `hsmca log list | head -1` after head has gone: every write to stdout fails with EPIPE.
    let env = Env::new("pipe");
    let home = env.init("ca", "pipe", "ecdsa-p256");
    for i in 0..3 {
        issue(&env, &home, &format!("pipe-{i}"), "30d");
    }
    for args in [
        &["log", "list", "--home", s(&home)][..],
        &["log", "list", "--home", s(&home), "--json"][..],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hsmca"))
            .args(args)
            .env("SOFTHSM2_CONF", &env.conf)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The same listing to a reader that stays does print (the test above is not vacuous).
    let run = env.hsmca(&["log", "list", "--home", s(&home)]);
    run.ok();
    assert!(run.stdout().contains("pipe-2"), "{}", run.stdout());
}

/// Adds the `kubernetes-ca` intermediate to `home`.
fn create_kubernetes_ca(env: &Env, home: &Path) {
    env.hsmca(&[
        "ca",
        "create",
        "kubernetes-ca",
        "--home",
        s(home),
        "--profile",
        "kubernetes-ca",
        "--subject",
        "CN=kubernetes-ca",
    ])
    .ok();
}

/// Copies the export `from` into a new empty directory `to` (nothing from the source tree or
/// the CA home comes along) and runs its own verifier there, as an auditor would.
fn run_export_verifier(from: &Path, to: &Path, args: &[&str]) -> (bool, String) {
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap()
            .success()
    );
    let out = Command::new("python3")
        .arg("verify.py")
        .args(args)
        .current_dir(to)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn issue_16_an_export_checks_itself_from_an_empty_directory() {
    require("python3");
    let env = Env::new("audit");
    let home = env.init("ca", "audit", "ecdsa-p256");
    create_kubernetes_ca(&env, &home);
    let (a, _) = issue(&env, &home, "one", "30d");
    let proxy = env.p256_csr("c/proxy.csr", "/O=system:node-proxier/CN=system:kube-proxy");
    env.sign(&home, "kube-proxy", &[&proxy]).ok();
    env.hsmca(&["revoke", "--home", s(&home), &a, "--reason", "superseded"])
        .ok();
    env.hsmca(&["crl", "--home", s(&home), "--out", s(&env.path("root.crl"))])
        .ok();
    env.hsmca(&[
        "crl",
        "--home",
        s(&home),
        "--issuer",
        "kubernetes-ca",
        "--out",
        s(&env.path("k.crl")),
    ])
    .ok();
    let kept = env.path("kept.checkpoint");
    std::fs::copy(home.join("log/checkpoint"), &kept).unwrap();

    let export = env.path("export");
    env.hsmca(&["log", "export", "--home", s(&home), "--out", s(&export)])
        .ok();
    for f in ["verify.py", "README.md", "root.pem"] {
        assert!(export.join(f).is_file(), "{f} missing from the export");
    }
    // Shipped from the binary, not the source tree: the same bytes as src/export/verify.py.
    assert_eq!(
        std::fs::read_to_string(export.join("verify.py")).unwrap(),
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/export/verify.py"))
            .unwrap()
    );

    let kept_arg = s(&kept).to_owned();
    let (ok, text) =
        run_export_verifier(&export, &env.path("auditor"), &["--checkpoint", &kept_arg]);
    assert!(ok, "{text}");
    let last = text.lines().last().unwrap();
    // Every entry of the log; the intermediate and 2 leaves; 2 CRLs.
    let entries = std::fs::read_to_string(home.join("log/entries.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(
        last.starts_with(&format!("OK: {entries} entries,"))
            && last.contains("5 proofs, 3 certificates, 2 CRLs"),
        "{text}"
    );
    assert!(text.contains("the log extends it"), "{text}");
    let run = env.hsmca(&[
        "log",
        "verify",
        "--export",
        s(&export),
        "--checkpoint",
        s(&kept),
    ]);
    run.ok();
    assert!(
        run.stdout()
            .contains(&format!("checked     {}", kept.display()))
            && run.stdout().contains("the log extends it"),
        "{}",
        run.stdout()
    );

    // Tampering, one kind per copy: each makes the verifier and `log verify --export` fail.
    let entries = std::fs::read_to_string(export.join("entries.jsonl")).unwrap();
    let crl_line = entries
        .lines()
        .position(|l| l.contains("\"type\":\"crl\""))
        .unwrap();
    type Tamper = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "an edited entry",
            Box::new(|d: &Path| {
                let t = std::fs::read_to_string(d.join("entries.jsonl")).unwrap();
                let t = t.replacen("\"profile\":\"test-any-key\"", "\"profile\":\"admin\"", 1);
                std::fs::write(d.join("entries.jsonl"), t).unwrap();
            }),
            "prev is not the root",
        ),
        (
            "a swapped certificate file",
            Box::new(move |d: &Path| {
                let other = std::fs::read(d.join("root.pem")).unwrap();
                std::fs::write(d.join(format!("certs/{a}.pem")), other).unwrap();
            }),
            "differs from the logged bytes",
        ),
        (
            "a forged checkpoint",
            Box::new(|d: &Path| {
                let t = std::fs::read_to_string(d.join("checkpoint")).unwrap();
                std::fs::write(d.join("checkpoint"), t.replacen('\n', "\n1", 1)).unwrap();
            }),
            "checkpoint:",
        ),
        (
            "a removed proof",
            Box::new(move |d: &Path| {
                std::fs::remove_file(d.join(format!("proofs/{crl_line:012}.tlog-proof"))).unwrap();
            }),
            "has no inclusion proof",
        ),
    ];
    for (i, (what, tamper, needle)) in cases.iter().enumerate() {
        let copy = env.path(&format!("tampered-{i}"));
        let (ok, _) = run_export_verifier(&export, &copy, &[]);
        assert!(ok, "{what}: the copy verifies before tampering");
        tamper(&copy);
        let out = Command::new("python3")
            .arg("verify.py")
            .current_dir(&copy)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() && text.contains("FAILED") && text.contains(needle),
            "{what}: {text}"
        );
        env.hsmca(&["log", "verify", "--export", s(&copy)])
            .code_is(4);
    }
}

/// One sample of the Prometheus text format: metric name, labels in order, value.
type Sample = (String, Vec<(String, String)>, f64);

/// A strict parser for the Prometheus text exposition format 0.0.4 as node_exporter's textfile
/// collector reads it: `# HELP` / `# TYPE` lines before a metric's samples, names and label
/// names of the allowed characters, label values in double quotes with only `\\`, `\"` and
/// `\n` escapes, a float value, a final newline. Panics on anything else.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    fn is_name(s: &str, colon: bool) -> bool {
        let mut cs = s.chars();
        cs.next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }
    assert!(text.ends_with('\n'), "no final newline");
    let mut typed: std::collections::HashMap<String, String> = Default::default();
    let mut helped = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(is_name(name, true) && !help.is_empty(), "{line}");
            assert!(helped.insert(name.to_owned()), "second HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(is_name(name, true), "{line}");
            assert!(["gauge", "counter", "untyped"].contains(&kind), "{line}");
            assert!(
                typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{line}"
            );
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (name, mut rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("no value: {line}"),
        };
        assert!(is_name(name, true), "{line}");
        assert!(typed.contains_key(name), "sample before its TYPE: {line}");
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            loop {
                let start = chars.peek().unwrap().0;
                let eq = r[start..].find('=').unwrap() + start;
                let label = &r[start..eq];
                assert!(is_name(label, false), "label name {label:?} in {line}");
                while chars.peek().unwrap().0 < eq {
                    chars.next();
                }
                chars.next();
                assert_eq!(chars.next().map(|c| c.1), Some('"'), "{line}");
                let mut value = String::new();
                loop {
                    match chars.next().unwrap().1 {
                        '\\' => match chars.next().unwrap().1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => panic!("invalid escape \\{other} in {line}"),
                        },
                        '"' => break,
                        '\n' => panic!("raw newline in {line}"),
                        c => value.push(c),
                    }
                }
                labels.push((label.to_owned(), value));
                match chars.next().unwrap() {
                    (_, ',') => continue,
                    (i, '}') => {
                        rest = &r[i + 1..];
                        break;
                    }
                    (_, c) => panic!("unexpected {c:?} in {line}"),
                }
            }
        }
        let value = rest.strip_prefix(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        samples.push((name.to_owned(), labels, value));
    }
    samples
}

#[test]
fn issue_16_expiring_writes_prometheus_text_and_one_json_document() {
    let env = Env::new("prom");
    let home = env.path("ca");
    // A root subject with characters both RFC 4514 and the exposition format must escape: it
    // is every leaf's issuer label.
    env.hsmca(&[
        "init",
        "--home",
        s(&home),
        "--token",
        "prom",
        "--key-type",
        "ecdsa-p256",
        "--subject",
        "CN=q\"uote\\back Root,O=hsmca tests",
    ])
    .ok();
    env.install_test_any_key(&home);
    issue(&env, &home, "plain", "30d");
    issue(&env, &home, "later", "80d");

    let run = env.hsmca(&["expiring", "--home", s(&home), "--format", "prometheus"]);
    // Every certificate (no window given), and exit 0 so `> f.$$ && mv f.$$ f` works.
    run.ok();
    let samples = parse_prometheus(&run.stdout());
    let certs: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.0 == "hsmca_certificate_not_after_seconds")
        .collect();
    assert_eq!(certs.len(), 3, "root and two leaves: {}", run.stdout());
    assert!(
        samples
            .iter()
            .any(|s| s.0 == "hsmca_expiring_generated_seconds")
    );

    // The same certificates as one JSON document (every certificate within 100 years).
    let doc = env.hsmca(&[
        "expiring",
        "--home",
        s(&home),
        "--within",
        "100y",
        "--format",
        "json",
    ]);
    doc.code_is(1);
    let doc: serde_json::Value = serde_json::from_str(&doc.stdout()).unwrap();
    let doc = doc.as_array().unwrap();
    assert_eq!(doc.len(), 3);
    for (sample, json) in certs.iter().zip(doc) {
        let label = |k: &str| {
            sample
                .1
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .unwrap()
        };
        let names: Vec<&str> = sample.1.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["serial", "profile", "subject", "issuer", "ca"]);
        assert_eq!(label("serial"), json["serial"].as_str().unwrap());
        assert_eq!(label("profile"), json["profile"].as_str().unwrap());
        assert_eq!(label("subject"), json["subject"].as_str().unwrap());
        assert_eq!(label("issuer"), json["issuer"].as_str().unwrap());
        assert_eq!(sample.2, json["not_after_seconds"].as_i64().unwrap() as f64);
    }
    // Printed as typed (RFC 4514), with RFC 4514's escapes.
    let issuer = "CN=q\\\"uote\\\\back Root,O=hsmca tests";
    assert!(
        run.stdout()
            .contains("issuer=\"CN=q\\\\\\\"uote\\\\\\\\back Root,O=hsmca tests\""),
        "{}",
        run.stdout()
    );
    assert!(certs.iter().all(|c| c.1[3].1 == issuer), "{}", run.stdout());
    assert!(certs.iter().any(|c| c.1[2].1 == "CN=later"));

    // --json keeps today's JSON lines; a window narrows the Prometheus output too.
    let lines = env.hsmca(&["expiring", "--home", s(&home), "--json"]);
    assert_eq!(json_lines(&lines.stdout()).len(), 1, "{}", lines.stdout());
    let narrow = env.hsmca(&[
        "expiring",
        "--home",
        s(&home),
        "--within",
        "60d",
        "--format",
        "prometheus",
    ]);
    narrow.ok();
    assert_eq!(parse_prometheus(&narrow.stdout()).len(), 2);
}

#[test]
fn issue_16_minutes_record_token_module_fingerprints_and_checkpoints() {
    let env = Env::new("minutes");
    let home = env.init("ca", "minutes", "ecdsa-p256");
    create_kubernetes_ca(&env, &home);
    let (a, _) = issue(&env, &home, "one", "30d");
    let kept = env.path("first-ceremony.checkpoint");
    std::fs::copy(home.join("log/checkpoint"), &kept).unwrap();
    let first = env.hsmca(&["minutes", "--home", s(&home)]);
    first.ok();
    let md = first.stdout();

    // Later: a batch with a plan, a revocation and a CRL.
    for n in ["b1", "b2"] {
        env.p256_csr(&format!("batch/{n}.csr"), &format!("/CN={n}"));
    }
    env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        s(&env.path("batch")),
        "--profile",
        "test-any-key",
        "--out",
        s(&env.path("batch-out")),
    ])
    .ok();
    env.hsmca(&["revoke", "--home", s(&home), &a, "--reason", "superseded"])
        .ok();
    env.hsmca(&["crl", "--home", s(&home), "--out", s(&env.path("r.crl"))])
        .ok();
    let later = env.hsmca(&["minutes", "--home", s(&home), "--since", s(&kept)]);
    later.ok();
    let later = later.stdout();

    // The token as it describes itself, and the module with its hash.
    for needle in [
        "| token label | `minutes` |",
        "| manufacturer | SoftHSM project |",
        "| model | SoftHSM v2 |",
        "| token serial | `",
    ] {
        assert!(md.contains(needle), "{needle} missing:\n{md}");
    }
    let module = md
        .lines()
        .find_map(|l| l.strip_prefix("| PKCS#11 module | `"))
        .unwrap()
        .trim_end_matches("` |");
    let module_sha = openssl(&["dgst", "-sha256", "-r", module]);
    let module_sha = module_sha.split_whitespace().next().unwrap();
    assert!(
        md.contains(&format!("| module SHA-256 | `{module_sha}` |")),
        "{md}"
    );
    // Fingerprints as OpenSSL computes them from the files.
    for (name, pem) in [
        ("root", home.join("root.pem")),
        ("kubernetes-ca", home.join("cas/kubernetes-ca.pem")),
    ] {
        let fp = openssl(&["x509", "-in", s(&pem), "-noout", "-fingerprint", "-sha256"]);
        let fp = fp
            .trim()
            .rsplit('=')
            .next()
            .unwrap()
            .replace(':', "")
            .to_lowercase();
        assert!(
            md.lines()
                .any(|l| l.starts_with(&format!("| {name} |")) && l.contains(&fp)),
            "{name} {fp}:\n{md}"
        );
    }
    let vkey = std::fs::read_to_string(home.join("log/log.vkey")).unwrap();
    assert!(md.contains(vkey.trim()), "{md}");
    assert!(
        md.contains("- certificates issued: 1\n  - test-any-key: 1"),
        "{md}"
    );
    assert!(
        md.contains("- intermediates created: 1\n  - CN=kubernetes-ca"),
        "{md}"
    );
    assert!(md.contains("Policy in force: log entry"), "{md}");
    assert!(md.contains("Pinned PKCS#11 module: log entry"), "{md}");
    assert!(
        md.contains("| operator | | | |") && md.contains("| witness | | | |"),
        "{md}"
    );
    // init's first checkpoint (the root entry) first, the log's size last.
    assert!(md.contains("- first: size 1,"), "init's checkpoint: {md}");
    // The kept checkpoint's size (its second line).
    let kept_size = std::fs::read_to_string(&kept)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(md.contains(&format!("- last: size {kept_size},")), "{md}");
    assert!(
        md.contains(&std::fs::read_to_string(&kept).unwrap()),
        "{md}"
    );

    // --since: only what came after the kept checkpoint.
    assert!(
        later.contains(&format!("## What the log records (entries {kept_size}..")),
        "{later}"
    );
    assert!(
        later.contains("- certificates issued: 2\n  - test-any-key: 2"),
        "{later}"
    );
    assert!(later.contains("- intermediates created: 0"), "{later}");
    assert!(later.contains("- plans signed: 1\n  - `"), "{later}");
    assert!(
        later.contains(&format!("- revocations: 1\n  - `{a}`: superseded")),
        "{later}"
    );
    assert!(
        later.contains("- CRLs signed: 1\n  - root CRL 1: 1 revoked"),
        "{later}"
    );
    assert!(
        later.contains(&format!("- first: size {kept_size}, root")) && later.contains(s(&kept)),
        "{later}"
    );

    // A checkpoint the log does not extend is refused.
    let forged = env.path("forged.checkpoint");
    std::fs::write(
        &forged,
        std::fs::read_to_string(&kept)
            .unwrap()
            .replacen('\n', "\n1", 1),
    )
    .unwrap();
    env.hsmca(&["minutes", "--home", s(&home), "--since", s(&forged)])
        .code_is(4);
}

#[test]
fn issue_16_revoke_hints_the_complete_crl_command_of_the_actual_issuer() {
    let env = Env::new("hint");
    let home = env.init("ca", "hint", "ecdsa-p256");
    create_kubernetes_ca(&env, &home);
    let proxy = env.p256_csr("c/proxy.csr", "/O=system:node-proxier/CN=system:kube-proxy");
    let run = env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "kube-proxy",
        "--json",
        s(&proxy),
    ]);
    run.ok();
    let serial = json_lines(&run.stdout())[0]["cert"]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let run = env.hsmca(&[
        "revoke",
        "--home",
        s(&home),
        &serial,
        "--reason",
        "superseded",
    ]);
    run.ok();
    let hint = run
        .stdout()
        .lines()
        .find_map(|l| l.trim().strip_prefix("hsmca ").map(str::to_owned))
        .unwrap_or_else(|| panic!("no command in {}", run.stdout()));
    assert!(
        hint.starts_with(&format!(
            "crl --home {} --issuer kubernetes-ca --out ",
            home.display()
        )),
        "{hint}"
    );
    // Pasted as it is (from the CA home's parent, where --out lands), it lists the certificate.
    let args: Vec<&str> = hint.split_whitespace().collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hsmca"))
        .args(&args)
        .current_dir(env.path(""))
        .env("SOFTHSM2_CONF", &env.conf)
        .env("HSMCA_PIN", common::PIN)
        .env_remove("HSMCA_PKCS11_MODULE")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("CRL 1 of \"kubernetes-ca\": 1 revoked"),
        "{text}"
    );
}
