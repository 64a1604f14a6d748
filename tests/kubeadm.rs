//! kubeadm's external-CA round trip with the real clients: a tree exactly as `kubeadm certs
//! generate-csr` writes it goes through `hsmca sign-dir`, the real `kubectl` reads every returned
//! kubeconfig, and `kubectl --kubeconfig admin.conf` completes a mutual-TLS handshake with an
//! OpenSSL `s_server` (on 127.0.0.1) that serves hsmca's apiserver certificate and demands a
//! client certificate from the kubernetes CA. Every server is killed when its test ends.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use common::{Env, KUBEADM_CONFS, Procs, free_port, openssl, require, s, wait_until};

/// `kubectl ARGS` with a private HOME (no cache or config of the machine's user is read).
fn kubectl(home: &Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .env("HOME", home)
        .env_remove("KUBECONFIG")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One field of a kubeconfig as kubectl reads it (`config view --raw`), base64-decoded.
fn field(home: &Path, conf: &Path, path: &str) -> Vec<u8> {
    let o = kubectl(
        home,
        &[
            "config",
            "view",
            "--raw",
            "--kubeconfig",
            s(conf),
            "-o",
            &format!("jsonpath={{{path}}}"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    B64.decode(o.stdout.trim_ascii())
        .unwrap_or_else(|e| panic!("{path} in {}: {e}: {}", conf.display(), text(&o)))
}

#[test]
fn kubeadm_tree_comes_back_with_kubeconfigs_kubectl_uses_over_mutual_tls() {
    for tool in ["kubectl", "openssl"] {
        require(tool);
    }
    let env = Env::new("kubectl");
    let home = env.init_kubeadm("kubectl");
    let port = free_port();
    let endpoint = format!("https://127.0.0.1:{port}");
    // kubeadm with --apiserver-advertise-address 127.0.0.1: the apiserver CSR carries that IP.
    let tree = env.kubeadm_tree("kubeadm", "node1", "127.0.0.1", &endpoint);
    let out = env.path("back");
    env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        s(&tree),
        "--out",
        s(&out),
        "--allow-profile",
        "super-admin",
    ])
    .ok();

    // kubectl reads every kubeconfig: the certificate chains to the CA next to it, the CA is
    // kubeadm's pki/ca.crt, and the key is the one kubeadm generated.
    let kube_home = env.path("kubectl-home");
    std::fs::create_dir_all(&kube_home).unwrap();
    let ca_crt = std::fs::read(out.join("pki/ca.crt")).unwrap();
    for (conf, subject) in KUBEADM_CONFS {
        let path = out.join(format!("{conf}.conf"));
        let cert = field(&kube_home, &path, ".users[0].user.client-certificate-data");
        let ca = field(
            &kube_home,
            &path,
            ".clusters[0].cluster.certificate-authority-data",
        );
        let key = field(&kube_home, &path, ".users[0].user.client-key-data");
        assert_eq!(
            ca, ca_crt,
            "{conf}: certificate-authority-data is pki/ca.crt"
        );
        assert_eq!(
            key,
            std::fs::read(env.path(&format!("kubeadm-keys/{conf}.key"))).unwrap(),
            "{conf}: the key kubeadm wrote"
        );
        let pem = env.path(&format!("{conf}.pem"));
        std::fs::write(&pem, &cert).unwrap();
        let verified = openssl(&[
            "verify",
            "-partial_chain",
            "-CAfile",
            s(&out.join("pki/ca.crt")),
            s(&pem),
        ]);
        assert!(verified.contains(": OK"), "{conf}: {verified}");
        let subj = openssl(&["x509", "-in", s(&pem), "-noout", "-subject"]);
        let cn = subject
            .rsplit_once("CN=")
            .unwrap()
            .1
            .replace("NODE", "node1");
        assert!(subj.contains(&format!("CN = {cn}")), "{conf}: {subj}");
        let server = kubectl(
            &kube_home,
            &[
                "config",
                "view",
                "--kubeconfig",
                s(&path),
                "-o",
                "jsonpath={.clusters[0].cluster.server}",
            ],
        );
        assert_eq!(String::from_utf8_lossy(&server.stdout), endpoint);
    }

    // An API server stand-in on loopback: hsmca's apiserver certificate and kubeadm's key, and
    // client certificates demanded and checked against the kubernetes CA alone (as the real
    // apiserver's --client-ca-file=pki/ca.crt; -partial_chain: the intermediate is the anchor,
    // as Go's verifier takes it).
    let log = env.path("s_server.log");
    let mut procs = Procs::default();
    procs.push(
        Command::new("openssl")
            .args(["s_server", "-accept", &format!("127.0.0.1:{port}")])
            .args(["-cert", s(&out.join("pki/apiserver.crt"))])
            .args(["-key", s(&tree.join("pki/apiserver.key"))])
            .args(["-CAfile", s(&out.join("pki/ca.crt")), "-partial_chain"])
            .args(["-Verify", "1", "-verify_return_error", "-www"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(env.path("s_server.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until("s_server to accept", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(|_| String::new())
    });
    let admin = out.join("admin.conf");
    let get = kubectl(
        &kube_home,
        &["--kubeconfig", s(&admin), "get", "--raw", "/"],
    );
    let served = std::fs::read_to_string(env.path("s_server.err")).unwrap_or_default()
        + &std::fs::read_to_string(&log).unwrap_or_default();
    assert!(get.status.success(), "{}\ns_server: {served}", text(&get));
    // s_server -www answers with a page describing the session it just verified.
    let page = String::from_utf8_lossy(&get.stdout);
    assert!(
        page.contains("s_server") && page.contains("Cipher"),
        "{page}"
    );
    assert!(
        served.contains("CN = kubernetes-admin") && served.contains("verify return:1"),
        "s_server saw and verified the admin certificate: {served}"
    );

    // A client certificate from another CA fails the handshake: one from an OpenSSL-made CA,
    // and one from hsmca's etcd-ca (same root, other intermediate).
    let foreign = env.path("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let f = |n: &str| s(&foreign.join(n)).to_owned();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &f("ca.key"),
        "-out",
        &f("ca.crt"),
        "-subj",
        "/CN=kubernetes",
        "-days",
        "2",
    ]);
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &f("admin.key"),
        "-out",
        &f("admin.csr"),
        "-subj",
        "/O=kubeadm:cluster-admins/CN=kubernetes-admin",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &f("admin.csr"),
        "-CA",
        &f("ca.crt"),
        "-CAkey",
        &f("ca.key"),
        "-days",
        "2",
        "-out",
        &f("admin.crt"),
    ]);
    let wrong_ca = [
        (f("admin.crt"), f("admin.key")),
        (
            s(&out.join("pki/apiserver-etcd-client.crt")).to_owned(),
            s(&tree.join("pki/apiserver-etcd-client.key")).to_owned(),
        ),
    ];
    for (i, (cert, key)) in wrong_ca.iter().enumerate() {
        let conf = foreign.join(format!("wrong-{i}.conf"));
        std::fs::copy(&admin, &conf).unwrap();
        let set = kubectl(
            &kube_home,
            &[
                "config",
                "set-credentials",
                "kubernetes-admin",
                "--client-certificate",
                cert,
                "--client-key",
                key,
                "--embed-certs=true",
                "--kubeconfig",
                s(&conf),
            ],
        );
        assert!(set.status.success(), "{}", text(&set));
        let get = kubectl(&kube_home, &["--kubeconfig", s(&conf), "get", "--raw", "/"]);
        assert!(!get.status.success(), "{cert}: {}", text(&get));
    }
    let served = std::fs::read_to_string(env.path("s_server.err")).unwrap_or_default()
        + &std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        served.matches("verify error").count() >= 2,
        "s_server refused both: {served}"
    );
}

#[test]
fn a_kubeconfig_template_that_cannot_be_completed_fails_its_item_with_the_rule() {
    let env = Env::new("badconf");
    let home = env.init_kubeadm("badconf");
    let tree = env.kubeadm_tree("kubeadm", "node1", "10.0.0.11", "https://10.0.0.11:6443");
    // admin.conf: its context names a user the file does not have.
    let admin = tree.join("admin.conf");
    let text = std::fs::read_to_string(&admin).unwrap();
    std::fs::write(
        &admin,
        text.replace("- name: kubernetes-admin", "- name: someone"),
    )
    .unwrap();
    // scheduler.conf: a symlink on the stick (to a file that would do) is not followed.
    let elsewhere = env.path("scheduler.conf");
    std::fs::rename(tree.join("scheduler.conf"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, tree.join("scheduler.conf")).unwrap();
    // kubelet.conf: missing.
    std::fs::remove_file(tree.join("kubelet.conf")).unwrap();
    // controller-manager.conf: the key of another kubeconfig.
    let other = std::fs::read_to_string(tree.join("super-admin.conf")).unwrap();
    let key = |t: &str| {
        t.lines()
            .find(|l| l.contains("client-key-data"))
            .unwrap()
            .to_owned()
    };
    let cm = tree.join("controller-manager.conf");
    let text = std::fs::read_to_string(&cm).unwrap();
    std::fs::write(&cm, text.replace(&key(&text), &key(&other))).unwrap();

    let out = env.path("back");
    let run = env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        s(&tree),
        "--out",
        s(&out),
        "--allow-profile",
        "super-admin",
    ]);
    run.code_is(1);
    let stdout = run.stdout();
    // Refused before issuance where the template alone tells (no certificate is spent); the
    // key that is not the certificate's is known only after signing: logged, not released.
    for (csr, rule, issued) in [
        ("admin.conf.csr", "kubeconfig.user", false),
        ("scheduler.conf.csr", "input.symlink", false),
        ("kubelet.conf.csr", "input.read", false),
        (
            "controller-manager.conf.csr",
            "kubeconfig.key_mismatch",
            true,
        ),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(csr))
            .unwrap_or_else(|| panic!("{csr} not reported: {stdout}"));
        assert!(
            line.contains("FAILED") && line.contains(&format!("(rule {rule})")),
            "{line}"
        );
        assert_eq!(line.contains("issued and logged"), issued, "{line}");
        let conf = csr.trim_end_matches(".csr");
        assert!(!out.join(conf).exists(), "{conf} must not be released");
    }
    assert!(stdout.contains(": 9 issued, "), "{stdout}");
    // The rest came back complete.
    let good = std::fs::read_to_string(out.join("super-admin.conf")).unwrap();
    assert!(good.contains("client-certificate-data: LS0t"), "{good}");
    assert!(out.join("pki/apiserver.crt").exists());
}

/// Issue 16: with a site `cluster_name`, a kubeadm tree comes back signed by that cluster's
/// intermediates, and `pki/ca.crt`, `pki/etcd/ca.crt` and `pki/front-proxy-ca.crt` are those
/// intermediates (the leaf profiles' issuers), each verifying the certificates beside it.
#[test]
fn a_kubeadm_tree_of_a_named_cluster_gets_that_clusters_intermediates() {
    let env = Env::new("named");
    let (home, init) = env.init_with_site(
        "ca",
        "named",
        r#"{"cluster_name": "prod-eu", "kubeadm_single_label_names": true,
            "node_names": ["node1"], "node_ip_ranges": ["10.0.0.0/8"]}"#,
    );
    init.ok();
    for ca in ["kubernetes-ca", "etcd-ca", "front-proxy-ca"] {
        env.ca_create(
            &home,
            &format!("prod-eu-{ca}"),
            ca,
            &format!("prod-eu {ca}"),
        )
        .ok();
    }
    let tree = env.kubeadm_tree("kubeadm", "node1", "10.0.0.11", "https://10.0.0.11:6443");
    let out = env.path("back");
    env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        s(&tree),
        "--out",
        s(&out),
        "--allow-profile",
        "super-admin",
    ])
    .ok();
    let root = home.join("root.pem");
    for (ca, cn, leaf) in [
        ("pki/ca.crt", "prod-eu kubernetes-ca", "pki/apiserver.crt"),
        ("pki/etcd/ca.crt", "prod-eu etcd-ca", "pki/etcd/server.crt"),
        (
            "pki/front-proxy-ca.crt",
            "prod-eu front-proxy-ca",
            "pki/front-proxy-client.crt",
        ),
    ] {
        let ca = out.join(ca);
        let subject = common::openssl(&["x509", "-in", s(&ca), "-noout", "-subject"]);
        assert!(subject.contains(cn), "{subject}");
        let verified = common::openssl(&[
            "verify",
            "-CAfile",
            s(&root),
            "-untrusted",
            s(&ca),
            s(&out.join(leaf)),
        ]);
        assert!(verified.contains(": OK"), "{verified}");
    }
}
