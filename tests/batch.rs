//! Batch ceremonies against a real SoftHSM2 token: plan then sign a directory, kubeadm's
//! generate-csr layout, and crashes and kill -9 in the middle of a batch.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Env, KUBEADM_CONFS, object, openssl, openssl_verifies, plan_hash, s};

/// Writes `n` P-256 CSRs (CN=c-I) under `dir/a` and `dir/b`, made with rcgen (fast).
fn csrs(dir: &Path, n: usize) -> Vec<PathBuf> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    (0..n)
        .map(|i| {
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, format!("c-{i}"));
            let path = dir
                .join(if i % 2 == 0 { "a" } else { "b" })
                .join(format!("c-{i}.csr"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, p.serialize_request(&key).unwrap().pem().unwrap()).unwrap();
            path
        })
        .collect()
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `sign-dir --json`: one line per CSR, then the summary.
fn sign_dir_json(text: &str) -> (Vec<serde_json::Value>, serde_json::Value) {
    let mut lines = json_lines(text);
    let summary = lines.pop().unwrap();
    (lines, summary)
}

#[test]
fn plan_review_then_sign_exactly_that_plan() {
    let env = Env::new("plan");
    let home = env.init("ca", "plan", "ecdsa-p256");
    let input = env.path("in");
    csrs(&input, 6);
    std::fs::write(input.join("b/bad.csr"), b"not a csr").unwrap();
    let evil = env.p256_csr("in/b/evil.csr", "/CN=Evil Name");
    let manifest = env.path("manifest.json");
    let mut entries: Vec<String> = (0..6)
        .map(|i| {
            format!(
                "\"{}/c-{i}.csr\": \"test-any-key\"",
                if i % 2 == 0 { "a" } else { "b" }
            )
        })
        .collect();
    entries.push("\"b/bad.csr\": \"test-any-key\"".into());
    entries.push("\"b/evil.csr\": {\"profile\": \"test-any-key\", \"validity\": \"10d\"}".into());
    std::fs::write(&manifest, format!("{{{}}}", entries.join(","))).unwrap();
    assert!(evil.exists());

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
    run.code_is(1);
    assert!(
        run.stdout().contains("6 of 8 CSRs would be issued"),
        "{}",
        run.stdout()
    );
    assert!(
        run.stdout().contains("b/evil.csr")
            && run.stdout().contains("REFUSE")
            && run.stdout().contains("subject.CN"),
        "{}",
        run.stdout()
    );
    assert!(
        run.stdout().contains("rule csr.malformed"),
        "{}",
        run.stdout()
    );
    let hash = plan_hash(&plan);

    let out = env.path("out");
    let run = env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        "--plan",
        s(&plan),
        "--approve",
        &hash,
        "--out",
        s(&out),
        "--json",
    ]);
    run.code_is(1);
    let (done, report) = sign_dir_json(&run.stdout());
    assert_eq!(report["issued"], 6);
    // evil.csr is refused by a rule, bad.csr failed to parse: counted apart.
    assert_eq!(
        (&report["refused"], &report["failed"]),
        (&1.into(), &1.into())
    );
    assert_eq!(done.len(), 8);
    assert!(
        done.iter()
            .any(|d| d["outcome"] == "refused" && d["file"] == "b/evil.csr")
    );
    let saved =
        std::fs::read_to_string(out.join(format!("hsmca-report-{}.jsonl", &hash[..16]))).unwrap();
    assert_eq!(saved.lines().count(), 9, "one line per CSR and the summary");
    for i in 0..6 {
        let cert = out
            .join(if i % 2 == 0 { "a" } else { "b" })
            .join(format!("c-{i}.crt"));
        assert!(
            openssl_verifies(&home.join("root.pem"), &cert),
            "{}",
            cert.display()
        );
    }
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    assert!(
        log.contains(&format!("\"type\":\"plan\",\"plan_sha256\":\"{hash}\"")),
        "the plan's hash is logged"
    );

    // Rerunning writes nothing new; a changed input or an edited plan is refused.
    let run = env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        "--plan",
        s(&plan),
        "--approve",
        &hash,
        "--out",
        s(&out),
        "--json",
    ]);
    let (_, report) = sign_dir_json(&run.stdout());
    assert_eq!(
        (report["issued"].as_u64(), report["reissued_files"].as_u64()),
        (Some(0), Some(6)),
        "{report}"
    );
    let text = std::fs::read_to_string(&plan).unwrap();
    std::fs::write(
        &plan,
        text.replacen("\"validity\": \"30d\"", "\"validity\": \"3650d\"", 1),
    )
    .unwrap();
    env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        "--plan",
        s(&plan),
        "--approve",
        &hash,
        "--out",
        s(&out),
    ])
    .fails_with(2, "not the approved");
    std::fs::write(&plan, text).unwrap();
    std::fs::write(input.join("a/c-0.csr"), b"changed").unwrap();
    env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        "--plan",
        s(&plan),
        "--approve",
        &hash,
        "--out",
        s(&out),
    ])
    .fails_with(2, "a/c-0.csr: changed since planning");
}

#[test]
fn kubeadm_generate_csr_output_is_recognised_and_written_back_in_its_layout() {
    let env = Env::new("kubeadm");
    let home = env.init_kubeadm("kubeadm");
    // Exactly as `kubeadm certs generate-csr` writes it: kubeconfigs without
    // client-certificate-data or certificate-authority-data lines.
    let k = "kubeadm-out";
    env.kubeadm_tree(k, "node1", "10.0.0.11", "https://10.0.0.11:6443");
    let templates: Vec<String> = KUBEADM_CONFS
        .iter()
        .map(|(conf, _)| std::fs::read_to_string(env.path(&format!("{k}/{conf}.conf"))).unwrap())
        .collect();
    assert!(
        templates
            .iter()
            .all(|t| !t.contains("certificate-data") && !t.contains("certificate-authority")),
        "the fixture is kubeadm's format"
    );
    let out = env.path("back");
    let tree = env.path(k);
    let args = [
        "sign-dir",
        "--home",
        s(&home),
        s(&tree),
        "--out",
        s(&out),
        "--json",
    ];
    // super-admin.conf (system:masters) only when the command line names its profile.
    let run = env.hsmca(&args);
    run.code_is(1);
    let (_, report) = sign_dir_json(&run.stdout());
    assert_eq!(report["issued"], 11, "{report}");
    assert!(
        run.stdout()
            .contains(r#""file":"super-admin.conf.csr","refusals":[{"rule":"profile.danger""#),
        "{}",
        run.stdout()
    );
    let run = env.hsmca(&[&args[..], &["--allow-profile", "super-admin"]].concat());
    run.ok();
    let (_, report) = sign_dir_json(&run.stdout());
    assert_eq!(report["issued"], 1, "{report}");

    let root = home.join("root.pem");
    for (leaf, ca) in [
        ("pki/apiserver.crt", "pki/ca.crt"),
        ("pki/apiserver-kubelet-client.crt", "pki/ca.crt"),
        ("pki/front-proxy-client.crt", "pki/front-proxy-ca.crt"),
        ("pki/apiserver-etcd-client.crt", "pki/etcd/ca.crt"),
        ("pki/etcd/server.crt", "pki/etcd/ca.crt"),
        ("pki/etcd/peer.crt", "pki/etcd/ca.crt"),
        ("pki/etcd/healthcheck-client.crt", "pki/etcd/ca.crt"),
    ] {
        let text = openssl(&[
            "verify",
            "-CAfile",
            s(&root),
            "-untrusted",
            s(&out.join(ca)),
            s(&out.join(leaf)),
        ]);
        assert!(text.contains(": OK"), "{leaf}: {text}");
    }
    let san = openssl(&[
        "x509",
        "-in",
        s(&out.join("pki/apiserver.crt")),
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(
        san.contains("DNS:kubernetes,") && san.contains("IP Address:10.96.0.1"),
        "{san}"
    );
    // kubeconfigs come back with the certificate and the cluster CA embedded.
    for ((conf, _), template) in KUBEADM_CONFS.iter().zip(&templates) {
        let text = std::fs::read_to_string(out.join(format!("{conf}.conf"))).unwrap();
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("client-certificate-data:"))
            .unwrap();
        let b64 = line.split_once(':').unwrap().1.trim();
        let pem = out.join(format!("{conf}.pem"));
        let decoded = Command::new("base64")
            .arg("-d")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        decoded
            .stdin
            .as_ref()
            .unwrap()
            .write_all(b64.as_bytes())
            .unwrap();
        std::fs::write(&pem, decoded.wait_with_output().unwrap().stdout).unwrap();
        let ok = openssl(&[
            "verify",
            "-CAfile",
            s(&root),
            "-untrusted",
            s(&out.join("pki/ca.crt")),
            s(&pem),
        ]);
        assert!(ok.contains(": OK"), "{conf}: {ok}");
        assert!(
            text.contains("    certificate-authority-data: LS0t"),
            "{conf}: CA not embedded: {text}"
        );
        let key_line = |t: &str| {
            t.lines()
                .find(|l| l.trim_start().starts_with("client-key-data:"))
                .map(str::to_owned)
        };
        assert_eq!(
            key_line(&text),
            key_line(template),
            "the key stays as kubeadm wrote it"
        );
    }
    // Without the site switch, kubeadm's single-label names are refused, by rule.
    let strict = env.init("strict", "kubeadm", "ecdsa-p256");
    for ca in ["kubernetes-ca", "etcd-ca", "front-proxy-ca"] {
        env.hsmca(&[
            "ca",
            "create",
            ca,
            "--home",
            s(&strict),
            "--profile",
            ca,
            "--subject",
            &format!("CN={ca}"),
        ])
        .ok();
    }
    let run = env.hsmca(&[
        "plan",
        "--home",
        s(&strict),
        s(&env.path(k)),
        "--out",
        s(&env.path("strict-plan.json")),
    ]);
    run.code_is(1);
    assert!(
        run.stdout().contains("rule san.dns.single_label")
            && run.stdout().contains("(kubeadm layout)"),
        "{}",
        run.stdout()
    );
}

/// Cert entries per CSR digest in the log, and serials of every cert entry.
fn issued(home: &Path) -> (HashMap<String, usize>, Vec<String>) {
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    let mut per_csr = HashMap::new();
    let mut serials = Vec::new();
    for line in log.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if e["type"] == "cert" {
            *per_csr
                .entry(e["csr_sha256"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
            serials.push(e["serial"].as_str().unwrap().to_owned());
        }
    }
    (per_csr, serials)
}

/// After any interruption: the log verifies (after `log recover` if a write was torn), and
/// every certificate file on disk is a certificate the log holds.
fn check_after_crash(env: &Env, home: &Path, out: &Path) {
    let run = env.hsmca(&["log", "verify", "--home", s(home)]);
    if run.code() != 0 {
        assert!(
            run.stdout().contains("incomplete last line") || run.stdout().contains("unsigned tail"),
            "log broken after a crash:\n{}",
            run.all()
        );
        env.hsmca(&["log", "recover", "--home", s(home)]).ok();
        env.hsmca(&["log", "verify", "--home", s(home)]).ok();
    }
    let (_, serials) = issued(home);
    let mut files = Vec::new();
    let mut stack = vec![out.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "crt") {
                files.push(p);
            }
        }
    }
    for f in files {
        let cert = hsmca::issue::IssuerCert::from_pem_or_der(&std::fs::read(&f).unwrap()).unwrap();
        let serial = hsmca::verify::describe(&cert.der).unwrap().serial;
        assert!(
            serials.contains(&serial),
            "{} is on disk but not in the log",
            f.display()
        );
    }
}

#[test]
fn crashes_and_kill_9_mid_batch_lose_nothing_and_never_issue_twice() {
    let env = Env::new("kill");
    let home = env.init("ca", "kill", "ecdsa-p256");
    let input = env.path("in");
    let n = 1500;
    csrs(&input, n);
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
    let args = [
        "sign-dir",
        "--home",
        s(&home),
        "--plan",
        s(&plan),
        "--approve",
        &hash,
        "--out",
        s(&out),
    ];
    // Deterministic crash points, then real SIGKILLs at a few moments.
    for point in [
        "after-intent",
        "before-index",
        "after-cert",
        "after-checkpoint",
    ] {
        let run = env.hsmca_env(&args, &[("HSMCA_DANGER_CRASH_AT", point)]);
        assert!(!run.0.status.success(), "{point}: did not crash");
        check_after_crash(&env, &home, &out);
    }
    for delay in [150, 400, 900] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hsmca"))
            .env("SOFTHSM2_CONF", &env.conf)
            .env("HSMCA_PIN", common::PIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        check_after_crash(&env, &home, &out);
    }
    // The rerun finishes the batch: every CSR exactly once in the log, every file written, and
    // what the killed runs left half-written is gone.
    assert!(
        !temporaries(&out).is_empty(),
        "a killed run cannot clean up after itself; the rerun has to"
    );
    let run = env.hsmca(&args);
    run.ok();
    check_after_crash(&env, &home, &out);
    assert!(temporaries(&out).is_empty(), "{:?}", temporaries(&out));
    let (per_csr, serials) = issued(&home);
    assert_eq!(per_csr.len(), n, "every CSR issued");
    assert!(per_csr.values().all(|c| *c == 1), "a CSR was issued twice");
    assert_eq!(serials.len(), n);
    for i in [0, n / 2, n - 1] {
        let cert = out
            .join(if i % 2 == 0 { "a" } else { "b" })
            .join(format!("c-{i}.crt"));
        assert!(
            openssl_verifies(&home.join("root.pem"), &cert),
            "{}",
            cert.display()
        );
    }
}

#[test]
fn kubernetes_csr_objects_are_signed_by_their_signers_rules() {
    use base64::Engine;
    let env = Env::new("k8sobj");
    let home = env.init_k8s("ca", "k8sobj");
    let approved = serde_json::json!({"conditions": [{"type": "Approved", "status": "True", "reason": "KubectlApprove"}]});
    let serving = env.csr(
        "o/serving.csr",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "/O=system:nodes/CN=system:node:node1",
        Some("DNS:node1.internal,IP:10.0.0.11"),
        &[],
    );
    let client = env.p256_csr("o/client.csr", "/O=system:nodes/CN=system:node:node1");
    let admin = env.p256_csr(
        "o/admin.csr",
        "/O=kubeadm:cluster-admins/CN=kubernetes-admin",
    );
    let custom = env.p256_csr("o/custom.csr", "/CN=svc1");
    let admin2 = env.p256_csr(
        "o/admin2.csr",
        "/O=kubeadm:cluster-admins/CN=kubernetes-admin",
    );
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        object("csr-serving", &serving, "kubernetes.io/kubelet-serving", &["digital signature", "server auth"], "system:node:node1", approved.clone(), Some(86_400)),
        object("csr-bootstrap", &client, "kubernetes.io/kube-apiserver-client-kubelet", &["digital signature", "key encipherment", "client auth"], "system:bootstrap:abcdef", approved.clone(), None),
        object("csr-admin", &admin, "kubernetes.io/kube-apiserver-client", &["digital signature", "client auth"], "kubernetes-admin", approved.clone(), None),
        object("csr-admin-mallory", &admin2, "kubernetes.io/kube-apiserver-client", &["digital signature", "client auth"], "system:node:node1", approved.clone(), None),
        object("csr-custom", &custom, "example.com/test", &["client auth"], "svc", approved.clone(), None),
        object("csr-pending", &client, "kubernetes.io/kube-apiserver-client-kubelet", &["digital signature", "client auth"], "system:node:node1", serde_json::json!({}), None),
        object("csr-denied", &client, "kubernetes.io/kube-apiserver-client-kubelet", &["digital signature", "client auth"], "system:node:node1",
            serde_json::json!({"conditions": [{"type": "Denied", "status": "True"}]}), None),
        object("csr-impostor", &serving, "kubernetes.io/kubelet-serving", &["digital signature", "server auth"], "system:node:node2", approved.clone(), None),
        object("csr-usages", &serving, "kubernetes.io/kubelet-serving", &["digital signature", "client auth"], "system:node:node1", approved.clone(), None),
        object("csr-short", &serving, "kubernetes.io/kubelet-serving", &["digital signature", "server auth"], "system:node:node1", approved, Some(60)),
    ]});
    let input = env.path("csrs.json");
    std::fs::write(&input, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    let manifest = env.path("signers.json");
    std::fs::write(&manifest, r#"{"example.com/test": "test-any-key"}"#).unwrap();
    let out = env.path("status");
    let run = env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        s(&input),
        "--manifest",
        s(&manifest),
        "--out",
        s(&out),
        "--json",
    ]);
    run.code_is(1);
    let (done, _) = sign_dir_json(&run.stdout());
    let by_file: HashMap<String, &serde_json::Value> = done
        .iter()
        .map(|d| (d["file"].as_str().unwrap().to_owned(), d))
        .collect();
    for name in ["csr-serving", "csr-bootstrap", "csr-admin", "csr-custom"] {
        assert_eq!(
            by_file[name]["outcome"], "issued",
            "{name}: {}",
            by_file[name]
        );
    }
    for (name, reason) in [("csr-pending", "not approved"), ("csr-denied", "denied")] {
        assert_eq!(by_file[name]["outcome"], "skipped", "{name}");
        assert_eq!(by_file[name]["reason"], reason);
    }
    for (name, rule) in [
        ("csr-impostor", "k8s.username"),
        ("csr-admin-mallory", "k8s.requester"),
        ("csr-usages", "k8s.usages"),
        ("csr-short", "k8s.expiration"),
    ] {
        assert_eq!(by_file[name]["outcome"], "refused", "{name}");
        assert!(
            by_file[name]["refusals"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["rule"] == rule),
            "{name}: {}",
            by_file[name]
        );
    }
    // The status object: conditions untouched, the chain (leaf + kubernetes-ca) in status.certificate.
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("csr-serving.status.json")).unwrap())
            .unwrap();
    assert_eq!(status["status"]["conditions"][0]["type"], "Approved");
    assert_eq!(status["metadata"]["resourceVersion"], "42");
    let chain = base64::engine::general_purpose::STANDARD
        .decode(status["status"]["certificate"].as_str().unwrap())
        .unwrap();
    let chain_file = env.path("chain.pem");
    std::fs::write(&chain_file, &chain).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&chain)
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
    let ok = openssl(&[
        "verify",
        "-CAfile",
        s(&home.join("root.pem")),
        "-untrusted",
        s(&chain_file),
        s(&chain_file),
    ]);
    assert!(ok.contains(": OK"), "{ok}");
    let dates = openssl(&[
        "x509",
        "-in",
        s(&chain_file),
        "-noout",
        "-startdate",
        "-enddate",
        "-ext",
        "extendedKeyUsage",
    ]);
    assert!(dates.contains("TLS Web Server Authentication"), "{dates}");
    let script = std::fs::read_to_string(out.join("apply-status.sh")).unwrap();
    assert!(script.contains("kubectl replace --raw '/apis/certificates.k8s.io/v1/certificatesigningrequests/csr-serving/status' -f"), "{script}");
    assert_eq!(script.matches("kubectl replace").count(), 4);
    // The script runs from any directory, after the stick is mounted somewhere else (here a
    // path with a space), with whatever kubectl is on PATH: a fake one records its arguments.
    let mounted = env.path("media/usb stick");
    std::fs::create_dir_all(&mounted).unwrap();
    let moved = mounted.join("status");
    std::fs::rename(&out, &moved).unwrap();
    let bin = env.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = env.path("kubectl-calls");
    std::fs::write(
        bin.join("kubectl"),
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\" >> '{}'; done\n",
            calls.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("kubectl"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let elsewhere = env.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let ran = Command::new("sh")
        .arg(moved.join("apply-status.sh"))
        .current_dir(&elsewhere)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(ran.status.success(), "{ran:?}");
    let args = std::fs::read_to_string(&calls).unwrap();
    let files: Vec<&str> = args
        .lines()
        .zip(args.lines().skip(1))
        .filter(|(flag, _)| *flag == "-f")
        .map(|(_, f)| f)
        .collect();
    assert_eq!(files.len(), 4, "{args}");
    for f in files {
        let status: serde_json::Value =
            serde_json::from_slice(&std::fs::read(Path::new(f)).unwrap()).unwrap();
        assert!(
            f.starts_with(s(&moved)) && status["status"]["certificate"].is_string(),
            "{f}"
        );
    }
    assert!(
        args.contains(
            "/apis/certificates.k8s.io/v1/certificatesigningrequests/csr-serving/status\n"
        ),
        "{args}"
    );
    // expirationSeconds shortened the serving certificate to a day (the profile allows 398).
    let expires_within = |secs: &str| {
        !Command::new("openssl")
            .args(["x509", "-checkend", secs, "-noout", "-in", s(&chain_file)])
            .status()
            .unwrap()
            .success()
    };
    assert!(
        expires_within("90000") && !expires_within("80000"),
        "validity is not one day"
    );
}

#[test]
fn the_same_csr_twice_in_one_batch_is_issued_once() {
    let env = Env::new("dup");
    let home = env.init("ca", "dup", "ecdsa-p256");
    let a = env.p256_csr("in/a.csr", "/CN=twice");
    std::fs::copy(&a, env.path("in/b.csr")).unwrap();
    let run = env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        s(&env.path("in")),
        "--profile",
        "test-any-key",
        "--out",
        s(&env.path("out")),
        "--json",
    ]);
    run.ok();
    let (done, report) = sign_dir_json(&run.stdout());
    assert_eq!(report["issued"], 1);
    assert_eq!(done[1]["outcome"], "skipped", "{:?}", done);
    assert!(
        done[1]["reason"]
            .as_str()
            .unwrap()
            .contains("earlier in this batch")
    );
    let (per_csr, _) = issued(&home);
    assert_eq!(per_csr.values().sum::<usize>(), 1);
}

#[test]
fn sign_dir_input_decides_as_it_signs_and_logs_its_plan_last() {
    let env = Env::new("stream");
    let home = env.init("ca", "stream", "ecdsa-p256");
    env.p256_csr("in/good-1.csr", "/CN=good-1");
    env.p256_csr("in/good-2.csr", "/CN=good-2");
    env.p256_csr("in/orphan.csr", "/CN=orphan");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/csr/bad");
    std::fs::copy(
        corpus.join("tampered-subject.csr"),
        env.path("in/tampered.csr"),
    )
    .unwrap();
    let manifest = env.path("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"good-1.csr": "test-any-key", "good-2.csr": "test-any-key",
            "tampered.csr": "test-any-key", "orphan.csr": "no-such-profile"}"#,
    )
    .unwrap();
    let out = env.path("out");
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
    let (done, report) = sign_dir_json(&run.stdout());
    let outcome = |file: &str| {
        done.iter()
            .find(|d| d["file"] == file)
            .unwrap_or_else(|| panic!("{file} not reported: {done:?}"))
            .clone()
    };
    assert_eq!(report["issued"], 2, "{report}");
    assert_eq!(outcome("good-1.csr")["outcome"], "issued");
    assert_eq!(outcome("good-2.csr")["outcome"], "issued");
    // The signature is checked as the CSR is signed, and refuses only that CSR.
    assert_eq!(outcome("tampered.csr")["rule"], "csr.signature");
    // A profile that cannot be loaded fails its CSRs, not the batch.
    assert_eq!(outcome("orphan.csr")["rule"], "profile");
    assert!(
        outcome("orphan.csr")["error"]
            .as_str()
            .unwrap()
            .contains("no-such-profile")
    );
    // The plan's hash is logged once everything is decided: after the last certificate.
    let hash = report["plan"].as_str().unwrap();
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let plan_at = lines
        .iter()
        .position(|l| l.contains(&format!("\"plan_sha256\":\"{hash}\"")))
        .expect("the plan's hash is logged");
    let last_cert = lines
        .iter()
        .rposition(|l| l.contains("\"type\":\"cert\""))
        .unwrap();
    assert!(plan_at > last_cert, "plan logged before its certificates");
    assert!(
        lines[plan_at].contains("\"to_issue\":2"),
        "{}",
        lines[plan_at]
    );
    // The report is named after that hash, and no temporary report is left.
    assert!(
        out.join(format!("hsmca-report-{}.jsonl", &hash[..16]))
            .is_file()
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

/// `sign-dir INPUT` of every CSR under `test-any-key`, with `--json` lines.
fn sign_dir_input<'a>(home: &'a Path, input: &'a Path, out: &'a Path) -> [&'a str; 9] {
    [
        "sign-dir",
        "--home",
        s(home),
        s(input),
        "--profile",
        "test-any-key",
        "--out",
        s(out),
        "--json",
    ]
}

/// After a batch of `n` CSRs stopped with `before` of them issued: the rerun writes those
/// again and issues only the rest; the log verifies and holds every CSR exactly once, and
/// every file on disk is in it. Returns the rerun's summary.
fn rerun_finishes(
    env: &Env,
    home: &Path,
    out: &Path,
    args: &[&str],
    n: usize,
    before: usize,
) -> serde_json::Value {
    let run = env.hsmca(args);
    run.ok();
    let (done, report) = sign_dir_json(&run.stdout());
    assert_eq!(done.len(), n);
    let again = done.iter().filter(|d| d["already_issued"] == true).count();
    assert_eq!(again, before, "{report}");
    assert_eq!(report["issued"].as_u64().unwrap() as usize, n - before);
    env.hsmca(&["log", "verify", "--home", s(home)]).ok();
    check_after_crash(env, home, out);
    let (per_csr, serials) = issued(home);
    assert_eq!(per_csr.len(), n, "every CSR issued");
    assert!(per_csr.values().all(|c| *c == 1), "a CSR was issued twice");
    assert_eq!(serials.len(), n);
    report
}

#[test]
fn sign_dir_input_crashed_mid_batch_reruns_without_issuing_twice() {
    let env = Env::new("streamkill");
    let home = env.init("ca", "streamkill", "ecdsa-p256");
    let input = env.path("in");
    let n = 1100; // several chunks: the crash lands after the first chunk's results
    csrs(&input, n);
    let out = env.path("out");
    let args = sign_dir_input(&home, &input, &out);
    let run = env.hsmca_env(&args, &[("HSMCA_DANGER_CRASH_AT", "after-checkpoint")]);
    assert!(!run.0.status.success(), "did not crash");
    check_after_crash(&env, &home, &out);
    let (before, _) = issued(&home);
    assert!(
        !before.is_empty() && before.len() < n,
        "the crash should leave a part done: {} of {n}",
        before.len()
    );
    // The rerun re-decides everything, writes the logged part again and issues only the rest.
    rerun_finishes(&env, &home, &out, &args, n, before.len());
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    assert_eq!(
        log.matches("\"type\":\"plan\"").count(),
        1,
        "only the finished run logs its plan"
    );
}

/// Every file under `dir` whose name marks it temporary: what an interrupted write leaves.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                stack.push(p);
            } else if name.starts_with('.') || name.contains(".tmp") {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn a_full_disk_under_the_log_stops_the_batch_cleanly_and_the_rerun_finishes() {
    let env = Env::new("fulllog");
    let disk = common::SmallFs::mount(&env.path("small"), 16 << 20);
    let home = env.init("small/ca", "fulllog", "ecdsa-p256");
    let input = env.path("in");
    let n = 600;
    csrs(&input, n);
    let out = env.path("out");
    let args = sign_dir_input(&home, &input, &out);
    // Room for the log entries of roughly a quarter of the batch.
    disk.resize(disk.used() + (256 << 10));
    let run = env.hsmca(&args);
    assert_ne!(run.code(), 0, "the batch cannot finish on a full disk");
    assert!(
        run.stderr().contains("No space left on device")
            && run
                .stderr()
                .contains("hint: the disk under the CA home is full"),
        "the operator is told why and what to do:\n{}",
        run.all()
    );
    // Nothing torn: the log verifies as it is, every file released is in it, no temporary
    // file is left behind, in the home or in the output.
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    check_after_crash(&env, &home, &out);
    let leftovers = [temporaries(&home), temporaries(&out)].concat();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let (before, _) = issued(&home);
    assert!(
        !before.is_empty() && before.len() < n,
        "the disk should fill part way: {} of {n}",
        before.len()
    );
    // Space is freed; the rerun finishes.
    disk.resize(16 << 20);
    rerun_finishes(&env, &home, &out, &args, n, before.len());
}

#[test]
fn a_full_output_disk_stops_the_batch_cleanly_and_the_rerun_writes_every_file() {
    let env = Env::new("fullout");
    let home = env.init("ca", "fullout", "ecdsa-p256");
    let input = env.path("in");
    let n = 100;
    csrs(&input, n);
    let out = env.path("out");
    // tmpfs charges a page per file: room for a few dozen certificates, not a hundred.
    let disk = common::SmallFs::mount(&out, 160 << 10);
    let args = sign_dir_input(&home, &input, &out);
    let run = env.hsmca(&args);
    assert_ne!(run.code(), 0, "{}", run.all());
    assert!(
        run.stderr().contains("No space left on device")
            && run.stderr().contains("hint: the disk is full"),
        "{}",
        run.all()
    );
    // What was issued is logged; what reached the disk is whole and logged; no temporary file
    // (certificate or report) is left.
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    check_after_crash(&env, &home, &out);
    assert!(temporaries(&out).is_empty(), "{:?}", temporaries(&out));
    let (before, _) = issued(&home);
    assert!(!before.is_empty());
    // With room on the disk, the rerun writes every file.
    disk.resize(16 << 20);
    rerun_finishes(&env, &home, &out, &args, n, before.len());
    for i in 0..n {
        let cert = out
            .join(if i % 2 == 0 { "a" } else { "b" })
            .join(format!("c-{i}.crt"));
        assert!(cert.is_file(), "{} missing", cert.display());
    }
    assert!(openssl_verifies(
        &home.join("root.pem"),
        &out.join("a/c-0.crt")
    ));
    assert!(temporaries(&out).is_empty(), "{:?}", temporaries(&out));
}
