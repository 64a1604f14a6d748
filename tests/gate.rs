//! One gate: no path but `ca create` makes a CA certificate. A CSR from the stick under a CA
//! profile is refused with rule `profile.ca` by `check`, `plan`, `sign`, `sign-dir INPUT`,
//! `sign-dir --plan`, a kubectl custom signer mapped to a CA profile, and `renew` of an
//! intermediate; afterwards the log and the output directories hold no CA certificate but the
//! three `ca create` made.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::Path;

use common::{Env, plan_hash, s};

/// Every certificate in the log that says CA:TRUE, by profile.
fn ca_certificates_in_log(home: &Path) -> Vec<String> {
    use base64::Engine;
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    let mut found = Vec::new();
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        if entry["type"] != "cert" {
            continue;
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(entry["cert"].as_str().unwrap())
            .unwrap();
        if is_ca(&der) {
            found.push(entry["profile"].as_str().unwrap().to_owned());
        }
    }
    found.sort();
    found
}

/// Whether a DER certificate has basicConstraints CA:TRUE, as OpenSSL reads it.
fn is_ca(der: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.der");
    std::fs::write(&path, der).unwrap();
    let text = common::openssl(&["x509", "-inform", "DER", "-in", s(&path), "-noout", "-text"]);
    text.contains("CA:TRUE")
}

/// Every file under `dir` that holds a CA certificate (PEM).
fn ca_files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            found.extend(ca_files_under(&path));
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if !text.contains("-----BEGIN CERTIFICATE-----") {
            continue;
        }
        let out = common::openssl(&["x509", "-in", s(&path), "-noout", "-text"]);
        if out.contains("CA:TRUE") {
            found.push(path.display().to_string());
        }
    }
    found
}

#[test]
fn no_path_but_ca_create_makes_a_ca_certificate() {
    let env = Env::new("gate");
    let home = env.init_k8s("ca", "gate");
    assert_eq!(
        ca_certificates_in_log(&home),
        ["etcd-ca", "front-proxy-ca", "kubernetes-ca"],
        "ca create made the three intermediates"
    );
    // The stick's own key, asking to be a CA under every CA profile.
    let rogue = env.p256_csr("in/rogue.csr", "/CN=kubernetes-ca");

    // check and sign.
    for command in ["check", "sign"] {
        let run = env.hsmca(&[
            command,
            "--home",
            s(&home),
            "--profile",
            "kubernetes-ca",
            s(&rogue),
        ]);
        run.code_is(1);
        assert!(
            run.stdout().contains("profile.ca"),
            "{command}: {}",
            run.stdout()
        );
        assert!(!run.stdout().contains("would issue"), "{}", run.stdout());
    }
    assert!(!env.path("in/rogue.crt").exists());

    // plan, then sign-dir --plan, with a manifest naming a CA profile.
    let manifest = env.path("manifest.json");
    std::fs::write(&manifest, r#"{"rogue.csr": "kubernetes-ca"}"#).unwrap();
    let plan = env.path("plan.json");
    let run = env.hsmca(&[
        "plan",
        "--home",
        s(&home),
        s(&env.path("in")),
        "--manifest",
        s(&manifest),
        "--out",
        s(&plan),
    ]);
    run.code_is(1);
    assert!(run.stdout().contains("profile.ca"), "{}", run.stdout());
    let out_plan = env.path("out-plan");
    let hash = plan_hash(&plan);
    let run = env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        "--plan",
        s(&plan),
        "--approve",
        &hash,
        "--out",
        s(&out_plan),
        "--json",
    ]);
    run.code_is(1);
    assert!(run.stdout().contains("profile.ca"), "{}", run.stdout());

    // sign-dir INPUT with the same manifest, under every CA profile.
    for ca in ["kubernetes-ca", "etcd-ca", "front-proxy-ca"] {
        std::fs::write(&manifest, format!(r#"{{"rogue.csr": "{ca}"}}"#)).unwrap();
        let out = env.path(&format!("out-{ca}"));
        let run = env.hsmca(&[
            "sign-dir",
            "--home",
            s(&home),
            s(&env.path("in")),
            "--manifest",
            s(&manifest),
            "--out",
            s(&out),
            "--json",
        ]);
        run.code_is(1);
        assert!(
            run.stdout().contains("profile.ca"),
            "{ca}: {}",
            run.stdout()
        );
    }

    // A kubectl custom signer mapped to a CA profile.
    use base64::Engine;
    let request = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&rogue).unwrap());
    let approved = serde_json::json!({"conditions": [{"type": "Approved", "status": "True"}]});
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
         "metadata": {"name": "csr-rogue"},
         "spec": {"request": request, "signerName": "example.com/ca", "usages": ["cert sign"],
                  "username": "mallory"},
         "status": approved}]});
    let objects = env.path("csrs.json");
    std::fs::write(&objects, serde_json::to_vec(&list).unwrap()).unwrap();
    let signers = env.path("signers.json");
    std::fs::write(&signers, r#"{"example.com/ca": "etcd-ca"}"#).unwrap();
    let out_k8s = env.path("out-k8s");
    let run = env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        s(&objects),
        "--manifest",
        s(&signers),
        "--out",
        s(&out_k8s),
        "--json",
    ]);
    run.code_is(1);
    assert!(run.stdout().contains("profile.ca"), "{}", run.stdout());

    // renew of an intermediate's serial.
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    let serial = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["type"] == "cert" && e["profile"] == "kubernetes-ca")
        .unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let out_renew = env.path("out-renew");
    let run = env.hsmca(&["renew", "--home", s(&home), &serial, "--out", s(&out_renew)]);
    run.code_is(1);
    assert!(run.stdout().contains("profile.ca"), "{}", run.stdout());

    // Nothing anywhere but the three intermediates.
    assert_eq!(
        ca_certificates_in_log(&home),
        ["etcd-ca", "front-proxy-ca", "kubernetes-ca"]
    );
    assert!(ca_files_under(&env.path("in")).is_empty());
    for dir in [
        "out-plan",
        "out-kubernetes-ca",
        "out-etcd-ca",
        "out-front-proxy-ca",
        "out-k8s",
        "out-renew",
    ] {
        assert_eq!(
            ca_files_under(&env.path(dir)),
            Vec::<String>::new(),
            "{dir}"
        );
    }
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}
