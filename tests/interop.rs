//! Proof against real peers: a three-member etcd cluster with mutual TLS on hsmca certificates
//! (driven with etcdctl), OpenSSL s_server/s_client, and GnuTLS certtool, all on loopback.
//! Every process a test starts is killed when the test ends, pass or fail (`Procs` on drop).
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{Env, Procs, free_port, require, s, wait_until};

/// A key and a certificate signed by hsmca under `profile`.
struct Issued {
    cert: PathBuf,
    key: PathBuf,
    serial: String,
}

fn issue(
    env: &Env,
    home: &Path,
    profile: &str,
    name: &str,
    subject: &str,
    san: Option<&str>,
) -> Issued {
    let csr = env.csr(
        &format!("pki/{name}.csr"),
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        subject,
        san,
        &[],
    );
    let run = env.hsmca(&[
        "sign",
        "--home",
        s(home),
        "--profile",
        profile,
        "--json",
        s(&csr),
    ]);
    run.ok();
    let out: serde_json::Value =
        serde_json::from_str(run.stdout().lines().next().unwrap()).unwrap();
    Issued {
        cert: csr.with_extension("crt"),
        key: csr.with_extension("key"),
        serial: out["cert"]["serial"].as_str().unwrap().to_owned(),
    }
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
}

struct Cluster {
    members: Vec<Member>,
    ca: PathBuf,
    crl: PathBuf,
    dir: PathBuf,
}

impl Cluster {
    fn initial(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=https://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts member `i` with its serving and peer certificates; stderr goes to DIR/NAME.log.
    fn start(&self, i: usize, server: &Issued, peer: &Issued) -> Child {
        let m = &self.members[i];
        let log = std::fs::File::create(self.log(i)).unwrap();
        Command::new("etcd")
            .args(["--name", &m.name, "--data-dir", s(&self.dir.join(&m.name))])
            .args([
                "--listen-client-urls",
                &format!("https://127.0.0.1:{}", m.client),
            ])
            .args([
                "--advertise-client-urls",
                &format!("https://127.0.0.1:{}", m.client),
            ])
            .args([
                "--listen-peer-urls",
                &format!("https://127.0.0.1:{}", m.peer),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("https://127.0.0.1:{}", m.peer),
            ])
            .args([
                "--initial-cluster",
                &self.initial(),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "hsmca-interop",
            ])
            .args([
                "--client-cert-auth",
                "--trusted-ca-file",
                s(&self.ca),
                "--client-crl-file",
                s(&self.crl),
            ])
            .args(["--cert-file", s(&server.cert), "--key-file", s(&server.key)])
            .args([
                "--peer-client-cert-auth",
                "--peer-trusted-ca-file",
                s(&self.ca),
            ])
            .args([
                "--peer-cert-file",
                s(&peer.cert),
                "--peer-key-file",
                s(&peer.key),
            ])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .env_remove("ETCD_NAME")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.log", self.members[i].name))
    }

    fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("https://127.0.0.1:{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn etcdctl(&self, client: &Issued, cacert: &Path, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.endpoints(),
                "--cacert",
                s(cacert),
                "--cert",
                s(&client.cert),
                "--key",
                s(&client.key),
            ])
            .args(["--dial-timeout", "3s", "--command-timeout", "5s"])
            .args(args)
            .output()
            .unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn etcd_cluster_with_mutual_tls_on_hsmca_certificates() {
    for tool in ["etcd", "etcdctl", "openssl"] {
        require(tool);
    }
    let env = Env::new("etcd");
    let home = env.init_k8s("ca", "etcd");
    let etcd_ca = home.join("cas/etcd-ca.pem");
    let names = ["m1", "m2", "m3"];
    let mut servers = Vec::new();
    let mut peers = Vec::new();
    for n in names {
        let san = format!("DNS:{n}.cluster.internal,IP:127.0.0.1");
        servers.push(issue(
            &env,
            &home,
            "etcd-server",
            &format!("{n}-server"),
            &format!("/CN={n}"),
            Some(&san),
        ));
        peers.push(issue(
            &env,
            &home,
            "etcd-peer",
            &format!("{n}-peer"),
            &format!("/CN={n}"),
            Some(&san),
        ));
    }
    let apiserver = issue(
        &env,
        &home,
        "apiserver-etcd-client",
        "apiserver-etcd-client",
        "/CN=kube-apiserver-etcd-client",
        None,
    );
    let healthcheck = issue(
        &env,
        &home,
        "etcd-healthcheck-client",
        "healthcheck",
        "/CN=kube-etcd-healthcheck-client",
        None,
    );
    let flanneld = issue(
        &env,
        &home,
        "flanneld",
        "flanneld",
        "/O=k8s/CN=flanneld",
        None,
    );
    let revoked = issue(
        &env,
        &home,
        "flanneld",
        "flanneld-old",
        "/O=k8s/OU=System/CN=flanneld",
        None,
    );
    // A client certificate from hsmca's other intermediate, and one from a foreign CA.
    let admin = issue(
        &env,
        &home,
        "admin",
        "admin",
        "/O=kubeadm:cluster-admins/CN=kubernetes-admin",
        None,
    );
    let foreign_key = env.path("foreign/ca.key");
    std::fs::create_dir_all(foreign_key.parent().unwrap()).unwrap();
    common::openssl(&[
        "req",
        "-x509",
        "-new",
        "-nodes",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-keyout",
        s(&foreign_key),
        "-subj",
        "/CN=Foreign CA",
        "-days",
        "2",
        "-out",
        s(&env.path("foreign/ca.pem")),
    ]);
    let fcsr = env.p256_csr("foreign/client.csr", "/CN=kube-apiserver-etcd-client");
    common::openssl(&[
        "x509",
        "-req",
        "-in",
        s(&fcsr),
        "-CA",
        s(&env.path("foreign/ca.pem")),
        "-CAkey",
        s(&foreign_key),
        "-days",
        "1",
        "-out",
        s(&fcsr.with_extension("crt")),
    ]);
    let foreign = Issued {
        cert: fcsr.with_extension("crt"),
        key: fcsr.with_extension("key"),
        serial: String::new(),
    };

    env.hsmca(&[
        "revoke",
        "--home",
        s(&home),
        &revoked.serial,
        "--reason",
        "key-compromise",
    ])
    .ok();
    let crl = env.path("etcd-ca.crl");
    env.hsmca(&[
        "crl",
        "--home",
        s(&home),
        "--issuer",
        "etcd-ca",
        "--out",
        s(&crl),
    ])
    .ok();

    let dir = env.path("etcd");
    std::fs::create_dir_all(&dir).unwrap();
    let cluster = Cluster {
        members: names
            .iter()
            .map(|n| Member {
                name: (*n).into(),
                client: free_port(),
                peer: free_port(),
            })
            .collect(),
        ca: etcd_ca.clone(),
        crl,
        dir,
    };
    let mut procs = Procs::default();
    let ids: Vec<usize> = (0..3)
        .map(|i| procs.push(cluster.start(i, &servers[i], &peers[i])))
        .collect();

    // The cluster forms and serves the apiserver's client certificate.
    wait_until("a healthy cluster", Duration::from_secs(60), || {
        let o = cluster.etcdctl(&healthcheck, &etcd_ca, &["endpoint", "health"]);
        o.status.success().then(|| text(&o))
    });
    let put = cluster.etcdctl(
        &apiserver,
        &etcd_ca,
        &["put", "/registry/hsmca", "issued-offline"],
    );
    assert!(put.status.success(), "{}", text(&put));
    let get = cluster.etcdctl(
        &flanneld,
        &etcd_ca,
        &["get", "/registry/hsmca", "--print-value-only"],
    );
    assert!(
        get.status.success() && text(&get).trim() == "issued-offline",
        "{}",
        text(&get)
    );
    let list = cluster.etcdctl(&apiserver, &etcd_ca, &["member", "list"]);
    let members = text(&list);
    assert!(
        list.status.success()
            && names.iter().all(|n| members.contains(n))
            && members.matches("started").count() == 3,
        "{members}"
    );

    // Refused: a client certificate from another CA, one from hsmca's kubernetes-ca (etcd
    // trusts only etcd-ca), and a revoked one listed in the CRL etcd was given.
    for (what, client) in [
        ("foreign CA", &foreign),
        ("kubernetes-ca", &admin),
        ("revoked", &revoked),
    ] {
        let o = cluster.etcdctl(client, &etcd_ca, &["get", "/registry/hsmca"]);
        assert!(
            !o.status.success(),
            "{what}: client was accepted: {}",
            text(&o)
        );
    }
    let logs: String = (0..3)
        .map(|i| std::fs::read_to_string(cluster.log(i)).unwrap())
        .collect();
    assert!(
        logs.contains("revoked"),
        "etcd should log the revoked certificate"
    );

    // A peer whose serving certificate lacks the member's IP is refused by the other members.
    procs.stop(ids[2]);
    let bad_peer = issue(
        &env,
        &home,
        "etcd-peer",
        "m3-peer-no-ip",
        "/CN=m3",
        Some("DNS:m3.cluster.internal"),
    );
    procs.push(cluster.start(2, &servers[2], &bad_peer));
    let refused = wait_until(
        "the peers to refuse m3's certificate",
        Duration::from_secs(60),
        || {
            let logs = std::fs::read_to_string(cluster.log(0)).unwrap()
                + &std::fs::read_to_string(cluster.log(1)).unwrap();
            logs.lines()
                .find(|l| l.contains("127.0.0.1") && l.contains("doesn't contain any IP SANs"))
                .map(str::to_owned)
        },
    );
    assert!(refused.contains("x509"), "{refused}");
}

#[test]
fn tls_handshakes_through_an_offline_intermediate() {
    for tool in ["openssl", "certtool"] {
        require(tool);
    }
    let env = Env::new("tls");
    let home = env.init_k8s("ca", "tls");
    let root = home.join("root.pem");
    let server = env.csr(
        "pki/apiserver.csr",
        &["-newkey", "rsa:2048"],
        "/CN=kube-apiserver",
        Some("DNS:kubernetes.default.svc,IP:127.0.0.1"),
        &[],
    );
    env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "apiserver",
        "--chain",
        s(&server),
    ])
    .ok();
    let client = env.p256_csr(
        "pki/admin.csr",
        "/O=kubeadm:cluster-admins/CN=kubernetes-admin",
    );
    env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "admin",
        "--chain",
        s(&client),
    ])
    .ok();

    // GnuTLS verifies leaf → kubernetes-ca → root.
    let out = Command::new("certtool")
        .args(["--verify-chain", "--infile"])
        .arg(server.with_extension("crt"))
        .output()
        .unwrap();
    let said = text(&out);
    assert!(
        out.status.success() && said.contains("Chain verification output: Verified"),
        "{said}"
    );
    let out = Command::new("certtool")
        .args(["--verify", "--load-ca-certificate"])
        .arg(&root)
        .arg("--infile")
        .arg(client.with_extension("crt"))
        .output()
        .unwrap();
    assert!(
        out.status.success() && text(&out).contains("Verified"),
        "{}",
        text(&out)
    );

    // OpenSSL: mutual TLS on loopback, both sides checking the other against the root only.
    let port = free_port();
    let mut procs = Procs::default();
    procs.push(
        Command::new("openssl")
            .args([
                "s_server",
                "-accept",
                &format!("127.0.0.1:{port}"),
                "-naccept",
                "1",
                "-Verify",
                "2",
                "-verify_return_error",
            ])
            .args([
                "-cert",
                s(&server.with_extension("crt")),
                "-key",
                s(&server.with_extension("key")),
                "-cert_chain",
                s(&server.with_extension("crt")),
            ])
            .args(["-CAfile", s(&root), "-www"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let out = wait_until("s_server to accept", Duration::from_secs(20), || {
        let o = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-verify_return_error",
                "-verify_ip",
                "127.0.0.1",
            ])
            .args([
                "-CAfile",
                s(&root),
                "-cert",
                s(&client.with_extension("crt")),
                "-key",
                s(&client.with_extension("key")),
                "-cert_chain",
                s(&client.with_extension("crt")),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let t = text(&o);
        (!t.contains("Connection refused")).then_some(t)
    });
    assert!(
        out.contains("Verify return code: 0 (ok)") && out.contains("CN = kube-apiserver"),
        "{out}"
    );
    assert!(
        out.contains("i:CN = kubernetes-ca"),
        "the intermediate is sent: {out}"
    );
}
