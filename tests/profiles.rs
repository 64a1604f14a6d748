//! The shipped Kubernetes profiles and the hostile-CSR corpus, against a real SoftHSM2 token,
//! OpenSSL and pkilint.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, openssl, require, s};

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

#[derive(serde::Deserialize)]
struct Case {
    file: String,
    profile: String,
    rule: String,
}

/// The rules an outcome reports: every refusal's rule, or the failure's rule.
fn rules_of(outcome: &serde_json::Value) -> Vec<String> {
    match outcome["outcome"].as_str() {
        Some("refused") => outcome["refusals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["rule"].as_str().unwrap().to_owned())
            .collect(),
        Some("failed") => vec![outcome["rule"].as_str().unwrap().to_owned()],
        _ => Vec::new(),
    }
}

#[test]
fn every_hostile_csr_in_the_corpus_is_refused_by_its_rule() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(data("csr/corpus.json")).unwrap()).unwrap();
    assert!(cases.len() >= 40, "the corpus must hold at least 40 CSRs");
    let env = Env::new("corpus");
    let home = env.init_k8s("ca", "corpus");
    let mut by_profile: BTreeMap<&str, Vec<&Case>> = BTreeMap::new();
    for c in &cases {
        by_profile.entry(&c.profile).or_default().push(c);
    }
    let mut wrong = Vec::new();
    for (profile, group) in by_profile {
        let files: Vec<PathBuf> = group
            .iter()
            .map(|c| data(&format!("csr/{}", c.file)))
            .collect();
        // `check` (no token) and `sign` (token, log) must reach the same verdicts.
        for command in ["check", "sign"] {
            let mut args = vec![command, "--home", s(&home), "--profile", profile, "--json"];
            args.extend(files.iter().map(|f| s(f)));
            let run = env.hsmca(&args);
            assert_eq!(
                run.code(),
                1,
                "{command} {profile}: expected exit 1 (refusals), got:\n{}",
                run.all()
            );
            let outcomes: Vec<serde_json::Value> = run
                .stdout()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(outcomes.len(), group.len());
            for (case, outcome) in group.iter().zip(&outcomes) {
                let rules = rules_of(outcome);
                if !rules.contains(&case.rule) {
                    wrong.push(format!(
                        "{command} {}: expected {}, got {rules:?} ({outcome})",
                        case.file, case.rule
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} cases refused by the wrong rule or not at all:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // Nothing was issued for any of them.
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("\"type\":\"cert\""))
            .count(),
        3,
        "only the three intermediates"
    );
}

/// (profile, subject, SANs, RSA key?) for a good CSR of every shipped leaf profile.
const GOOD: &[(&str, &str, Option<&str>, bool)] = &[
    (
        "apiserver",
        "/CN=kube-apiserver",
        Some(
            "DNS:node1.internal,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.96.0.1,IP:10.0.0.11",
        ),
        true,
    ),
    (
        "apiserver-kubelet-client",
        "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client",
        None,
        true,
    ),
    (
        "apiserver-etcd-client",
        "/CN=kube-apiserver-etcd-client",
        None,
        false,
    ),
    ("front-proxy-client", "/CN=front-proxy-client", None, true),
    (
        "etcd-server",
        "/CN=node1",
        Some("DNS:node1.internal,IP:10.0.0.11,IP:127.0.0.1,IP:::1"),
        false,
    ),
    (
        "etcd-peer",
        "/CN=node1",
        Some("DNS:node1.internal,IP:10.0.0.11,IP:127.0.0.1,IP:::1"),
        false,
    ),
    (
        "etcd-healthcheck-client",
        "/CN=kube-etcd-healthcheck-client",
        None,
        false,
    ),
    (
        "etcd-client",
        "/C=CN/ST=BeiJing/L=BeiJing/O=etcd/OU=System/CN=etcd-client",
        None,
        true,
    ),
    (
        "admin",
        "/O=kubeadm:cluster-admins/CN=kubernetes-admin",
        None,
        true,
    ),
    (
        "super-admin",
        "/O=system:masters/CN=kubernetes-super-admin",
        None,
        true,
    ),
    (
        "controller-manager",
        "/CN=system:kube-controller-manager",
        None,
        false,
    ),
    ("scheduler", "/CN=system:kube-scheduler", None, false),
    (
        "kubelet-client",
        "/O=system:nodes/CN=system:node:node1",
        None,
        false,
    ),
    (
        "kubelet-serving",
        "/O=system:nodes/CN=system:node:node1",
        Some("DNS:node1.internal,IP:10.0.0.11"),
        false,
    ),
    (
        "kube-proxy",
        "/C=CN/ST=BeiJing/L=BeiJing/O=k8s/OU=System/CN=system:kube-proxy",
        None,
        true,
    ),
    (
        "flanneld",
        "/C=CN/ST=FuZhou/L=FuZhou/O=k8s/OU=System/CN=flanneld",
        None,
        true,
    ),
    (
        "test-any-key",
        "/CN=client1",
        Some("DNS:a.test.internal"),
        false,
    ),
];

/// pkilint's lint_pkix_cert: the ERROR and FATAL findings for a PEM certificate.
fn pkilint_errors(cert: &Path) -> Vec<String> {
    let out = Command::new("lint_pkix_cert")
        .args([
            "lint",
            "-s",
            "ERROR",
            "-f",
            "JSON",
            "--document-format",
            "PEM",
        ])
        .arg(cert)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "pkilint on {}: {e}: {text}{}",
            cert.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn every_shipped_profile_issues_certificates_that_openssl_and_pkilint_accept() {
    require("lint_pkix_cert");
    let env = Env::new("shipped");
    let home = env.init_k8s("ca", "shipped");
    let run = env.hsmca(&["profiles", "list", "--home", s(&home), "--json"]);
    run.ok();
    let profiles: Vec<serde_json::Value> = run
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let leafs: Vec<&str> = profiles
        .iter()
        .filter(|p| p["ca"].is_null())
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        leafs.len(),
        GOOD.len(),
        "a good CSR is needed for every shipped leaf profile: {leafs:?}"
    );

    for ca in ["kubernetes-ca", "etcd-ca", "front-proxy-ca"] {
        let pem = home.join(format!("cas/{ca}.pem"));
        assert!(
            common::openssl_verifies(&home.join("root.pem"), &pem),
            "{ca}"
        );
        let text = openssl(&["x509", "-in", s(&pem), "-noout", "-text"]);
        assert!(
            text.contains("CA:TRUE, pathlen:0") && text.contains("Certificate Sign, CRL Sign"),
            "{ca}: {text}"
        );
        assert_eq!(pkilint_errors(&pem), Vec::<String>::new(), "{ca}");
    }
    assert_eq!(
        pkilint_errors(&home.join("root.pem")),
        Vec::<String>::new(),
        "root"
    );

    for (profile, subject, san, rsa) in GOOD {
        assert!(leafs.contains(profile), "{profile} is not shipped");
        let newkey: &[&str] = if *rsa {
            &["-newkey", "rsa:2048"]
        } else {
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        };
        let csr = env.csr(&format!("good/{profile}.csr"), newkey, subject, *san, &[]);
        env.sign(&home, profile, &[&csr]).ok();
        let cert = csr.with_extension("crt");
        let issuer = profiles.iter().find(|p| p["name"] == *profile).unwrap()["issuer"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut verify = vec![
            "verify".to_owned(),
            "-CAfile".into(),
            s(&home.join("root.pem")).into(),
        ];
        if issuer != "root" {
            verify.extend([
                "-untrusted".into(),
                s(&home.join(format!("cas/{issuer}.pem"))).into(),
            ]);
        }
        verify.push(s(&cert).into());
        let out = openssl(&verify.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.contains(": OK"), "{profile}: {out}");
        assert_eq!(pkilint_errors(&cert), Vec::<String>::new(), "{profile}");
        let text = openssl(&["x509", "-in", s(&cert), "-noout", "-text"]);
        assert!(text.contains("CA:FALSE"), "{profile}");
        assert_eq!(
            text.contains("Key Encipherment"),
            *rsa,
            "{profile}: keyEncipherment only for RSA keys"
        );
    }
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn intermediates_sign_their_own_profiles_and_the_chain_is_written_on_request() {
    let env = Env::new("chain");
    let home = env.init_k8s("ca", "chain");
    let csr = env.p256_csr("c/node.csr", "/O=system:nodes/CN=system:node:node1");
    env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "kubelet-client",
        "--chain",
        s(&csr),
    ])
    .ok();
    let chain = std::fs::read_to_string(csr.with_extension("crt")).unwrap();
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        3,
        "leaf, kubernetes-ca, root"
    );
    let issuer = openssl(&[
        "x509",
        "-in",
        s(&csr.with_extension("crt")),
        "-noout",
        "-issuer",
    ]);
    assert!(issuer.contains("CN = kubernetes-ca"), "{issuer}");
    // A profile whose issuer does not exist yet says how to make it.
    let bare = env.init("bare", "chain", "ecdsa-p256");
    let run = env.sign(&bare, "kubelet-client", &[&csr]);
    run.fails_with(
        2,
        &format!(
            "`hsmca ca create kubernetes-ca --home {} --profile kubernetes-ca --subject CN=kubernetes-ca`",
            bare.display()
        ),
    );
    // CA names are unique, and CA profiles cannot be used with sign.
    let again = env.hsmca(&[
        "ca",
        "create",
        "etcd-ca",
        "--home",
        s(&home),
        "--profile",
        "etcd-ca",
        "--subject",
        "CN=etcd-ca",
    ]);
    again.fails_with(2, "already has a CA named \"etcd-ca\"");
    // A CA profile is refused per CSR by the policy, like every other rule.
    let run = env.sign(&home, "etcd-ca", &[&csr]);
    run.code_is(1);
    assert!(
        run.stdout()
            .contains("rule profile.ca expects a leaf profile"),
        "{}",
        run.all()
    );
    let refused = env.hsmca(&[
        "ca",
        "create",
        "x-ca",
        "--home",
        s(&home),
        "--profile",
        "etcd-ca",
        "--subject",
        "CN=evil",
    ]);
    refused.fails_with(2, "rule subject.CN");
}

#[test]
fn profile_commands_list_show_lint_and_import_cfssl() {
    let env = Env::new("profcmd");
    let run = env.hsmca(&["profiles", "lint"]);
    run.ok();
    assert_eq!(
        run.stdout().lines().filter(|l| l.ends_with(": ok")).count(),
        19,
        "{}",
        run.stdout()
    );
    let run = env.hsmca(&["profiles", "show", "apiserver"]);
    run.ok();
    assert!(
        run.stdout()
            .contains("kubernetes.default.svc.cluster.local")
            && run.stdout().contains("10.96.0.1"),
        "site parameters expanded: {}",
        run.stdout()
    );

    // A site file changes what the profiles allow.
    let site = env.path("site.json");
    std::fs::write(&site, r#"{"cluster_domain":"corp.example","service_ip":"10.254.0.1","node_ip_ranges":["192.168.115.0/24"],
        "node_domains":[],"node_names":["vm1","vm2","vm3"],"apiserver_names":[],"countries":["CN"],"states":["FuZhou"],
        "localities":["FuZhou"],"org_units":["System"]}"#).unwrap();
    let home = env.path("ca");
    env.hsmca(&[
        "init",
        "--home",
        s(&home),
        "--token",
        "profcmd",
        "--key-type",
        "ecdsa-p256",
        "--subject",
        "CN=Root",
        "--site",
        s(&site),
    ])
    .ok();
    env.hsmca(&[
        "ca",
        "create",
        "kubernetes-ca",
        "--home",
        s(&home),
        "--profile",
        "kubernetes-ca",
        "--subject",
        "CN=kubernetes-ca",
    ])
    .ok();
    let show = env.hsmca(&["profiles", "show", "apiserver", "--home", s(&home)]);
    assert!(
        show.stdout()
            .contains("kubernetes.default.svc.corp.example")
            && show.stdout().contains("10.254.0.1"),
        "{}",
        show.stdout()
    );
    let vm1 = env.p256_csr("c/vm1.csr", "/O=system:nodes/CN=system:node:vm1");
    let vm9 = env.p256_csr("c/vm9.csr", "/O=system:nodes/CN=system:node:vm9");
    let run = env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "kubelet-client",
        s(&vm1),
        s(&vm9),
    ]);
    run.code_is(1);
    assert!(
        run.stdout().contains("vm1.csr: would issue")
            && run.stdout().contains(
                "rule subject.CN expects \"system:node:{node}\" with {node} one of \"vm1\", \"vm2\", \"vm3\" (from site parameter node_names; to allow another, add it to node_names in HOME/site.json, then run hsmca profiles apply), got \"system:node:vm9\""
            ),
        "{}",
        run.stdout()
    );

    // A broken profile names its file and key.
    let bad = env.path("p/bad.json");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    std::fs::write(&bad, r#"{"name":"bad","key_types":["ecdsa-p256"],"subject":{"CN":{"required":true,"patterns":["x-{host}"]}},
        "key_usage":["digital_signature"],"extended_key_usage":["client_auth"],"validity":{"default":"1d","max":"2d"}}"#).unwrap();
    let run = env.hsmca(&["profiles", "lint", s(&bad)]);
    run.code_is(2);
    assert!(
        run.stdout().contains(
            "bad.json: key \"subject.CN\": pattern \"x-{host}\" uses {host} but parts has no rule"
        ),
        "{}",
        run.stdout()
    );

    // cfssl: the seed's ca-config becomes a profile that refuses to load until its TODOs are filled.
    let out = env.path("imported");
    let run = env.hsmca(&[
        "profiles",
        "import-cfssl",
        s(&data("seed-ca-config.json")),
        "--out",
        s(&out),
    ]);
    run.ok();
    assert!(
        run.stdout().contains("TODO subject.CN.values") && run.stdout().contains("TODO san.dns"),
        "{}",
        run.stdout()
    );
    let imported = out.join("default.json");
    let text = std::fs::read_to_string(&imported).unwrap();
    assert!(
        text.contains("\"max\": \"1825d\"")
            && text.contains("server_auth")
            && text.contains("key_encipherment"),
        "{text}"
    );
    let run = env.hsmca(&["profiles", "lint", s(&imported)]);
    run.code_is(2);
    assert!(
        run.stdout().contains("still holds a TODO"),
        "{}",
        run.stdout()
    );
    let filled = text
        .replace(
            "\"TODO: the exact CNs this profile may sign\"",
            "\"flanneld\"",
        )
        .replace("\"TODO: allowed DNS names or *.suffix\"", "\"*.internal\"");
    std::fs::write(&imported, filled).unwrap();
    env.hsmca(&["profiles", "lint", s(&imported)]).ok();
}

#[test]
fn shipped_profiles_match_the_documented_json_schema() {
    require("python3");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root.join("tests/tools/check_schema.py");
    let readme = root.join("profiles/README.md");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("profiles"))
        .unwrap()
        .chain(std::fs::read_dir(root.join("tests/data/profiles")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 20);
    let out = Command::new("python3")
        .arg(&script)
        .arg(&readme)
        .args(&files)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().filter(|l| l.ends_with(": ok")).count(),
        20,
        "{text}"
    );
    // The schema, like the loader, refuses unknown keys.
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.json");
    let shipped = std::fs::read_to_string(root.join("profiles/admin.json")).unwrap();
    std::fs::write(&typo, shipped.replacen("\"subject\"", "\"subjekt\"", 1)).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(&readme)
        .arg(&typo)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn name_constraints_on_an_intermediate_are_enforced_by_openssl() {
    let env = Env::new("nc");
    let home = env.init("ca", "nc", "ecdsa-p256");
    std::fs::write(home.join("profiles/constrained-ca.json"), r#"{"name":"constrained-ca","issuer":"root",
        "ca":{"path_len":0,"permitted_dns":["cluster.internal"],"permitted_ip":["10.0.0.0/8"]},
        "key_types":["ecdsa-p256"],"subject":{"CN":{"required":true,"values":["constrained"]}},
        "key_usage":["digital_signature","key_cert_sign","crl_sign"],"validity":{"default":"365d","max":"365d"}}"#).unwrap();
    // The leaf profile is (deliberately) wider than the CA's constraints.
    std::fs::write(home.join("profiles/constrained-leaf.json"), r#"{"name":"constrained-leaf","issuer":"constrained",
        "key_types":["ecdsa-p256"],"subject":{"CN":{"required":true,"values":["svc"]}},
        "san":{"dns":["*.cluster.internal","*.example.com"],"ip":["10.0.0.0/8"],"min":1},
        "key_usage":["digital_signature"],"extended_key_usage":["server_auth"],"validity":{"default":"30d","max":"30d"}}"#).unwrap();
    env.hsmca(&["profiles", "apply", "--home", s(&home)]).ok();
    env.hsmca(&[
        "ca",
        "create",
        "constrained",
        "--home",
        s(&home),
        "--profile",
        "constrained-ca",
        "--subject",
        "CN=constrained",
    ])
    .ok();
    let ca = home.join("cas/constrained.pem");
    let text = openssl(&["x509", "-in", s(&ca), "-noout", "-text"]);
    assert!(
        text.contains("X509v3 Name Constraints: critical") && text.contains("DNS:cluster.internal"),
        "{text}"
    );
    let inside = env.csr(
        "c/in.csr",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "/CN=svc",
        Some("DNS:a.cluster.internal"),
        &[],
    );
    let outside = env.csr(
        "c/out.csr",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "/CN=svc",
        Some("DNS:a.example.com"),
        &[],
    );
    env.sign(&home, "constrained-leaf", &[&inside, &outside])
        .ok();
    let verify = |cert: &Path| {
        Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(home.join("root.pem"))
            .arg("-untrusted")
            .arg(&ca)
            .arg(cert)
            .output()
            .unwrap()
    };
    assert!(verify(&inside.with_extension("crt")).status.success());
    let out = verify(&outside.with_extension("crt"));
    assert!(
        !out.status.success(),
        "a name outside the constraint must not verify"
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("permitted subtree violation"), "{said}");
}

/// Issue 16: neutral site defaults, `init` and `site show` print every setting with its
/// origin, a refusal names the site parameter that would allow the value, and a site.json
/// change goes through `profiles apply` (shown, logged), after which the value is allowed.
#[test]
fn site_settings_are_shown_with_their_origin_and_changed_through_profiles_apply() {
    let env = Env::new("site");
    let (home, init) = env.init_with_site(
        "ca",
        "site",
        r#"{"node_names": ["node-a", "node-b", "node-c"]}"#,
    );
    init.ok();
    let printed = init.stdout();
    assert!(printed.contains("site settings"), "{printed}");
    let line = |text: &str, key: &str| -> String {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .to_owned()
    };
    assert!(line(&printed, "node_names").contains("set"), "{printed}");
    assert!(line(&printed, "countries").contains("default"), "{printed}");
    env.ca_create(&home, "kubernetes-ca", "kubernetes-ca", "kubernetes-ca")
        .ok();

    // site show: every known key, with value and origin, as text and JSON.
    let shown = env.hsmca(&["site", "show", "--home", s(&home), "--json"]);
    shown.ok();
    let settings: Vec<serde_json::Value> = serde_json::from_str(&shown.stdout()).unwrap();
    let get = |settings: &[serde_json::Value], key: &str| {
        settings
            .iter()
            .find(|v| v["name"] == key)
            .unwrap_or_else(|| panic!("no {key}"))
            .clone()
    };
    // init writes every value in force into site.json, so all of them are `set` there.
    let countries = get(&settings, "countries");
    assert_eq!(countries["value"], serde_json::json!([]));
    assert_eq!(countries["origin"], "set");
    assert_eq!(get(&settings, "service_ip")["value"], "10.96.0.1");
    assert_eq!(
        get(&settings, "node_ip_ranges")["value"],
        serde_json::json!([])
    );
    assert_eq!(get(&settings, "kubeadm_single_label_names")["value"], false);
    // A key site.json leaves out is the default.
    let path = home.join("site.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    value.as_object_mut().unwrap().remove("countries");
    value["countries"] = serde_json::json!(["DE"]);
    value.as_object_mut().unwrap().remove("states");
    std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    let text = env.hsmca(&["site", "show", "--home", s(&home)]);
    text.ok();
    assert!(
        line(&text.stdout(), "states").contains("default"),
        "{}",
        text.all()
    );
    assert!(
        line(&text.stdout(), "countries").contains("[\"DE\"]"),
        "{}",
        text.all()
    );

    // Every key is documented where operators look: --help and the man page.
    let help = env.hsmca(&["site", "show", "--help"]).stdout();
    let man = env.path("man");
    env.hsmca(&["man", "--out", s(&man)]).ok();
    let page = std::fs::read_to_string(man.join("hsmca-site-show.1")).unwrap();
    assert!(page.contains("SITE PARAMETERS"), "{page}");
    for setting in &settings {
        let key = setting["name"].as_str().unwrap();
        assert!(help.contains(key) && page.contains(key), "{key}");
    }

    // The edit is not in force until applied: every command refuses until then.
    let worker = env.p256_csr("c/worker.csr", "/O=system:nodes/CN=system:node:worker-01");
    env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "kubelet-client",
        s(&worker),
    ])
    .fails_with(2, "site.json changed");
    let applied = env.hsmca(&["profiles", "apply", "--home", s(&home)]);
    applied.ok();
    assert!(
        applied.stdout().contains("site.json changed") && applied.stdout().contains("countries"),
        "{}",
        applied.all()
    );
    let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
    assert!(
        log.lines().last().unwrap().contains("\"type\":\"policy\""),
        "{log}"
    );

    // The refusal names node_names, lists its values and says how to change it.
    let run = env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "kubelet-client",
        s(&worker),
    ]);
    assert_eq!(run.code(), 1, "{}", run.all());
    let out = run.stdout();
    for want in [
        "rule subject.CN expects \"system:node:{node}\" with {node} one of \"node-a\", \"node-b\", \"node-c\" (from site parameter node_names",
        "then run hsmca profiles apply",
        "\"system:node:worker-01\"",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    // An OU no site list allows names org_units; C=DE is now allowed by countries.
    let proxy = env.p256_csr("c/proxy.csr", "/C=DE/O=k8s/OU=Ops/CN=system:kube-proxy");
    let run = env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "kube-proxy",
        "--json",
        s(&proxy),
    ]);
    let outcome: serde_json::Value =
        serde_json::from_str(run.stdout().lines().next().unwrap()).unwrap();
    assert_eq!(
        rules_of(&outcome),
        vec!["subject.OU".to_owned()],
        "{}",
        run.all()
    );
    let expected = outcome["refusals"][0]["expected"].as_str().unwrap();
    assert!(
        expected.starts_with("nothing: site parameter org_units is empty"),
        "{expected}"
    );
}

/// Issue 16: `check --profile auto` with a cfssl-era admin CSR (made by `cfssl genkey`, as
/// the seed tutorial made its admin-csr.json) points to super-admin and says a batch needs
/// `--allow-profile super-admin`; a node CSR is accepted by kubelet-client; CA profiles are
/// never offered.
#[test]
fn check_auto_finds_the_profiles_that_fit_and_the_closest_that_do_not() {
    require("cfssl");
    require("cfssljson");
    let env = Env::new("auto");
    let home = env.init_k8s("ca", "auto");
    let dir = env.path("c");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("admin-csr.json"),
        r#"{"CN":"admin","hosts":[],"key":{"algo":"rsa","size":2048},
            "names":[{"C":"CN","ST":"BeiJing","L":"BeiJing","O":"system:masters","OU":"System"}]}"#,
    )
    .unwrap();
    let made = Command::new("sh")
        .current_dir(&dir)
        .args(["-c", "cfssl genkey admin-csr.json | cfssljson -bare admin"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let admin = dir.join("admin.csr");
    let node = env.p256_csr("c/node1.csr", "/O=system:nodes/CN=system:node:node1");

    let run = env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "auto",
        "--json",
        s(&admin),
        s(&node),
    ]);
    assert_eq!(
        run.code(),
        1,
        "the admin CSR fits no profile: {}",
        run.all()
    );
    let lines: Vec<serde_json::Value> = run
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let admin_check = &lines[0];
    assert_eq!(admin_check["accepted"], serde_json::json!([]));
    let closest = admin_check["closest"].as_array().unwrap();
    assert_eq!(closest[0]["profile"], "super-admin", "{admin_check}");
    assert_eq!(closest[0]["danger"], true);
    let rules: Vec<&str> = closest[0]["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert!(rules.contains(&"subject.CN"), "{rules:?}");
    assert!(closest.len() <= 3);
    let node_check = &lines[1];
    let accepted: Vec<&str> = node_check["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["profile"].as_str().unwrap())
        .collect();
    assert_eq!(accepted, vec!["kubelet-client"], "{node_check}");
    for line in &lines {
        for fit in line["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .chain(line["closest"].as_array().unwrap())
        {
            assert!(!fit["profile"].as_str().unwrap().ends_with("-ca"), "{line}");
        }
    }

    // The text says the same, with the note and the command that signs.
    let text = env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "auto",
        s(&admin),
        s(&node),
    ]);
    let out = text.stdout();
    assert!(
        out.contains("no profile accepts it")
            && out.contains("super-admin (")
            && out.contains("need --allow-profile super-admin")
            && out.contains("rule subject.CN expects \"kubernetes-super-admin\", got \"admin\"")
            && out.contains("--profile kubelet-client")
            && out.contains("1 of 2 CSRs accepted"),
        "{out}"
    );
}

/// Issue 16: several clusters under one root. The site's `cluster_name` names the cluster's
/// intermediates (`prod-eu-kubernetes-ca`, CN "prod-eu kubernetes-ca") and makes them the
/// issuer of the leaf profiles; switching it is a logged policy change. Each cluster's
/// kubelet certificate chains to the one root through its own intermediate only.
#[test]
fn two_clusters_share_one_root_each_with_its_own_intermediate() {
    let env = Env::new("clusters");
    let (home, init) = env.init_with_site(
        "ca",
        "clusters",
        r#"{"cluster_name": "prod-eu", "node_names": ["node-a"]}"#,
    );
    init.ok();
    let create = |name: &str, cn: &str| env.ca_create(&home, name, "kubernetes-ca", cn);
    // Without the cluster's name the CN is refused, and the refusal names cluster_name.
    let bare = create("kubernetes-ca", "kubernetes-ca");
    assert_ne!(bare.code(), 0);
    assert!(
        bare.all().contains("\"prod-eu kubernetes-ca\"") && bare.all().contains("cluster_name"),
        "{}",
        bare.all()
    );
    create("prod-eu-kubernetes-ca", "prod-eu kubernetes-ca").ok();
    let a = env.p256_csr("c/node-a.csr", "/O=system:nodes/CN=system:node:node-a");
    env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "kubelet-client",
        "--chain",
        s(&a),
    ])
    .ok();

    // The second cluster: change cluster_name (and its nodes), apply, create its intermediate.
    let path = home.join("site.json");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    value["cluster_name"] = "staging".into();
    value["node_names"] = serde_json::json!(["node-s"]);
    std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    let applied = env.hsmca(&["profiles", "apply", "--home", s(&home)]);
    applied.ok();
    assert!(
        applied.stdout().contains("cluster_name"),
        "{}",
        applied.all()
    );
    // Before its intermediate exists, a kubelet CSR is refused with the command that makes it.
    let b = env.p256_csr("c/node-s.csr", "/O=system:nodes/CN=system:node:node-s");
    let missing = env.sign(&home, "kubelet-client", &[&b]);
    assert!(
        missing
            .all()
            .contains("hsmca ca create staging-kubernetes-ca --home")
            && missing
                .all()
                .contains("--profile kubernetes-ca --subject 'CN=staging kubernetes-ca'"),
        "{}",
        missing.all()
    );
    create("staging-kubernetes-ca", "staging kubernetes-ca").ok();
    env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "kubelet-client",
        "--chain",
        s(&b),
    ])
    .ok();

    let root = home.join("root.pem");
    for (leaf, issuer) in [(&a, "prod-eu kubernetes-ca"), (&b, "staging kubernetes-ca")] {
        let cert = leaf.with_extension("crt");
        assert!(
            openssl(&["x509", "-in", s(&cert), "-noout", "-issuer"]).contains(issuer),
            "{}",
            cert.display()
        );
        // The file holds the leaf, its cluster's intermediate and the root.
        let verified = openssl(&[
            "verify",
            "-CAfile",
            s(&root),
            "-untrusted",
            s(&cert),
            s(&cert),
        ]);
        assert!(verified.contains(": OK"), "{verified}");
    }
    // A cluster's certificate does not chain through the other cluster's intermediate.
    let other = env.path("staging-ca.pem");
    std::fs::write(
        &other,
        std::fs::read(home.join("cas/staging-kubernetes-ca.pem")).unwrap(),
    )
    .unwrap();
    let crossed = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            s(&root),
            "-untrusted",
            s(&other),
            s(&a.with_extension("crt")),
        ])
        .output()
        .unwrap();
    assert!(!crossed.status.success());
}

/// Issue 16: with the site's `crl_url`, certificates of profiles with
/// `crl_distribution_point` carry a cRLDistributionPoints URI to their issuer's CRL
/// (`URL/ISSUER.crl`), pkilint-clean; a profile without it carries none; a URL that is not
/// http(s) is refused when the site is loaded, naming the key.
#[test]
fn crl_distribution_point_from_the_site_is_pkilint_clean() {
    require("lint_pkix_cert");
    let env = Env::new("cdp");
    let (_, refused) =
        env.init_with_site("bad", "cdp", r#"{"crl_url": "ldap://pki.example.com/crl"}"#);
    refused.fails_with(2, "crl_url");
    assert!(
        refused.all().contains("ldap://pki.example.com/crl"),
        "{}",
        refused.all()
    );

    let (home, init) =
        env.init_with_site("ca", "cdp", r#"{"crl_url": "http://pki.example.com/crl/"}"#);
    init.ok();
    env.install_test_any_key(&home);
    env.ca_create(&home, "kubernetes-ca", "kubernetes-ca", "kubernetes-ca")
        .ok();
    let node = env.p256_csr("c/node.csr", "/O=system:nodes/CN=system:node:node1");
    env.sign(&home, "kubelet-client", &[&node]).ok();
    let any = env.p256_csr("c/any.csr", "/CN=any.test.internal");
    env.sign(&home, "test-any-key", &[&any]).ok();

    let text = |cert: &Path| openssl(&["x509", "-in", s(cert), "-noout", "-text"]);
    let leaf = node.with_extension("crt");
    let intermediate = home.join("cas/kubernetes-ca.pem");
    for (cert, uri) in [
        (&leaf, "URI:http://pki.example.com/crl/kubernetes-ca.crl"),
        (&intermediate, "URI:http://pki.example.com/crl/root.crl"),
    ] {
        let t = text(cert);
        assert!(
            t.contains("X509v3 CRL Distribution Points") && t.contains(uri),
            "{}: {t}",
            cert.display()
        );
        assert_eq!(
            pkilint_errors(cert),
            Vec::<String>::new(),
            "{}",
            cert.display()
        );
    }
    assert!(
        !text(&any.with_extension("crt")).contains("CRL Distribution Points"),
        "a profile without crl_distribution_point carries none"
    );
}
