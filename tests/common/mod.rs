//! Shared helpers for the integration tests: an isolated SoftHSM2 token per test, the real
//! `hsmca` binary, and OpenSSL for CSRs and independent verification. A missing tool fails the
//! test with an install hint; nothing is skipped.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub const PIN: &str = "123456";

pub fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is not installed: run `bash softhsm/install.sh` (the test command does this)"
    );
}

/// An isolated SoftHSM2 token in a temporary directory.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    /// Every run goes through the fault-injecting shim (healthy unless told otherwise), so the
    /// module pinned at init is the one every later run loads.
    pub shim: bool,
}

impl Env {
    pub fn new(label: &str) -> Self {
        require("softhsm2-util");
        require("openssl");
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                "87654321",
                "--pin",
                PIN,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "softhsm2-util: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            dir,
            conf,
            shim: false,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `hsmca ARGS` with this token and the PIN in HSMCA_PIN.
    pub fn hsmca(&self, args: &[&str]) -> Run {
        self.hsmca_env(args, &[])
    }

    /// A token `label` whose every run (`hsmca`, `hsmca_faulty`) loads the fault-injecting shim.
    pub fn with_shim(label: &str) -> Self {
        Self {
            shim: true,
            ..Self::new(label)
        }
    }

    pub fn hsmca_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hsmca"));
        cmd.env("SOFTHSM2_CONF", &self.conf)
            .env("HSMCA_PIN", PIN)
            .env_remove("HSMCA_PKCS11_MODULE")
            .args(args);
        if self.shim {
            cmd.env("HSMCA_PKCS11_MODULE", shim())
                .env("HSMCA_SHIM_MODULE", real_module());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Run(cmd.output().unwrap())
    }

    /// `hsmca sign --home HOME --profile PROFILE CSR...`.
    pub fn sign(&self, home: &Path, profile: &str, csrs: &[&Path]) -> Run {
        let mut args = vec![
            "sign",
            "--home",
            home.to_str().unwrap(),
            "--profile",
            profile,
        ];
        args.extend(csrs.iter().map(|p| p.to_str().unwrap()));
        self.hsmca(&args)
    }

    /// A CA home at `rel` with a root of `key_type`, under the seed tutorial's site
    /// (`tests/data/site/seed.json`: its C/ST/L/OU values, node names under `*.internal` in
    /// the private ranges), set explicitly as an operator would: the defaults allow none.
    pub fn init(&self, rel: &str, token: &str, key_type: &str) -> PathBuf {
        let home = self.path(rel);
        let label = format!("root-{rel}");
        let site = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/site/seed.json");
        self.hsmca(&[
            "init",
            "--site",
            site.to_str().unwrap(),
            "--home",
            home.to_str().unwrap(),
            "--token",
            token,
            "--key-type",
            key_type,
            "--subject",
            "CN=hsmca Test Root,O=hsmca tests",
            "--key-label",
            &label,
        ])
        .ok();
        self.install_test_any_key(&home);
        home
    }

    /// `hsmca init` of a P-256 root at `rel` with `site` (JSON text, written to
    /// `rel.site.json`) as its site file; the run is returned for tests of its output or refusal.
    pub fn init_with_site(&self, rel: &str, token: &str, site: &str) -> (PathBuf, Run) {
        let site_file = self.path(&format!("{rel}.site.json"));
        std::fs::write(&site_file, site).unwrap();
        let home = self.path(rel);
        let run = self.hsmca(&[
            "init",
            "--home",
            s(&home),
            "--token",
            token,
            "--key-type",
            "ecdsa-p256",
            "--subject",
            &format!("CN={rel} Root"),
            "--site",
            s(&site_file),
        ]);
        (home, run)
    }

    /// `hsmca ca create NAME --home HOME --profile PROFILE --subject "CN=CN"`.
    pub fn ca_create(&self, home: &Path, name: &str, profile: &str, cn: &str) -> Run {
        self.hsmca(&[
            "ca",
            "create",
            name,
            "--home",
            s(home),
            "--profile",
            profile,
            "--subject",
            &format!("CN={cn}"),
        ])
    }

    /// Installs the suite's `test-any-key` profile (any key type, any DNS name, root-issued;
    /// not shipped) the sanctioned way: the file into HOME/profiles, then `profiles apply`.
    pub fn install_test_any_key(&self, home: &Path) {
        let profile =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/profiles/test-any-key.json");
        std::fs::copy(&profile, home.join("profiles/test-any-key.json")).unwrap();
        self.hsmca(&["profiles", "apply", "--home", home.to_str().unwrap()])
            .ok();
    }

    /// A P-256 CSR without SANs, the common case in tests.
    pub fn p256_csr(&self, rel: &str, subj: &str) -> PathBuf {
        self.csr(
            rel,
            &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            subj,
            None,
            &[],
        )
    }

    /// A CA home with the three shipped intermediates (kubernetes-ca, etcd-ca, front-proxy-ca).
    pub fn init_k8s(&self, rel: &str, token: &str) -> PathBuf {
        let home = self.init(rel, token, "ecdsa-p384");
        for ca in ["kubernetes-ca", "etcd-ca", "front-proxy-ca"] {
            let subject = format!("CN={ca}");
            self.hsmca(&[
                "ca",
                "create",
                ca,
                "--home",
                home.to_str().unwrap(),
                "--profile",
                ca,
                "--subject",
                &subject,
            ])
            .ok();
        }
        home
    }

    /// Makes a CSR with `openssl req` into `rel` and returns its path.
    pub fn csr(
        &self,
        rel: &str,
        newkey: &[&str],
        subj: &str,
        san: Option<&str>,
        extra: &[&str],
    ) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut args: Vec<String> = vec!["req".into(), "-new".into(), "-nodes".into()];
        args.extend(newkey.iter().map(|s| s.to_string()));
        args.extend([
            "-keyout".into(),
            path.with_extension("key").display().to_string(),
            "-subj".into(),
            subj.into(),
            "-out".into(),
            path.display().to_string(),
        ]);
        if let Some(san) = san {
            args.extend(["-addext".into(), format!("subjectAltName={san}")]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        openssl(&args.iter().map(String::as_str).collect::<Vec<_>>());
        path
    }
}

/// What `kubeadm certs generate-csr` writes for one kubeconfig, byte for byte in shape.
///
/// Read from kubeadm's source (kubernetes/kubernetes, `cmd/kubeadm/app/phases/kubeconfig/
/// kubeconfig.go` `createKubeConfigAndCSR`, and `cmd/kubeadm/app/util/kubeconfig/kubeconfig.go`
/// `CreateBasic` / `CreateWithCerts`): kubeadm passes a nil CA and a nil client certificate
/// (`var emptyCACert, emptyClientCert []byte`) with the PEM of the new key, and writes through
/// client-go's `clientcmd.Write`, which encodes the v1 `Config` as JSON and converts it to YAML
/// (`yaml.JSONToYAML`: keys sorted). `certificate-authority-data` and
/// `client-certificate-data` are `[]byte` with `omitempty`, so neither line exists;
/// `client-key-data` holds base64 of the key PEM; `preferences` has no `omitempty`, hence `{}`;
/// the context is `USER@CLUSTER`.
pub fn kubeadm_kubeconfig(server: &str, cluster: &str, user: &str, key_pem: &[u8]) -> String {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.encode(key_pem);
    format!(
        "apiVersion: v1
clusters:
- cluster:
    server: {server}
  name: {cluster}
contexts:
- context:
    cluster: {cluster}
    user: {user}
  name: {user}@{cluster}
current-context: {user}@{cluster}
kind: Config
preferences: {{}}
users:
- name: {user}
  user:
    client-key-data: {key}
"
    )
}

/// The kubeconfig files kubeadm's `generate-csr` writes and their CSR subjects (O before CN, as
/// Go encodes it; `NODE` stands for the node name).
pub const KUBEADM_CONFS: [(&str, &str); 5] = [
    ("admin", "/O=kubeadm:cluster-admins/CN=kubernetes-admin"),
    ("super-admin", "/O=system:masters/CN=kubernetes-super-admin"),
    ("kubelet", "/O=system:nodes/CN=system:node:NODE"),
    ("controller-manager", "/CN=system:kube-controller-manager"),
    ("scheduler", "/CN=system:kube-scheduler"),
];

impl Env {
    /// A CA home at `ca` with the three shipped intermediates under a site that accepts
    /// kubeadm's single-label names (`kubernetes`, `localhost`, the node name) for node `node1`.
    pub fn init_kubeadm(&self, token: &str) -> PathBuf {
        let site = self.path("site.json");
        std::fs::write(
            &site,
            r#"{"kubeadm_single_label_names": true, "node_names": ["node1"],
                "node_ip_ranges": ["10.0.0.0/8"]}"#,
        )
        .unwrap();
        let home = self.path("ca");
        self.hsmca(&[
            "init",
            "--home",
            s(&home),
            "--token",
            token,
            "--key-type",
            "ecdsa-p384",
            "--subject",
            "CN=Root",
            "--site",
            s(&site),
        ])
        .ok();
        for ca in ["kubernetes-ca", "etcd-ca", "front-proxy-ca"] {
            self.hsmca(&[
                "ca",
                "create",
                ca,
                "--home",
                s(&home),
                "--profile",
                ca,
                "--subject",
                &format!("CN={ca}"),
            ])
            .ok();
        }
        home
    }

    /// The tree `kubeadm certs generate-csr --cert-dir ROOT/pki --kubeconfig-dir ROOT` writes
    /// for node `node` with advertise address `ip`, cluster `kubernetes`, API server URL
    /// `server`. As kubeadm does it (`phases/certs/certlist.go`, `pkiutil.NewCSR`,
    /// `GetAPIServerAltNames`, `GetEtcdAltNames`; every kubeconfig gets `server`, where kubeadm gives
    /// the controller-manager and scheduler the local endpoint): a new RSA-2048 key per certificate (its
    /// default `encryptionAlgorithm`) as PKCS#1 `RSA PRIVATE KEY` in `NAME.key` beside
    /// `NAME.csr`; only subjectAltName requested; DNS names sorted; the kubeconfigs' keys live
    /// only inside the kubeconfig (`X.conf` plus `X.conf.csr`). Returns ROOT.
    pub fn kubeadm_tree(&self, rel: &str, node: &str, ip: &str, server: &str) -> PathBuf {
        let root = self.path(rel);
        let apiserver = format!(
            "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:{node},IP:10.96.0.1,IP:{ip}"
        );
        let mut etcd = format!("DNS:localhost,DNS:{node},IP:{ip}");
        for extra in ["127.0.0.1", "::1"] {
            if extra != ip {
                etcd.push_str(&format!(",IP:{extra}"));
            }
        }
        let certs: [(&str, &str, Option<&str>); 7] = [
            ("pki/apiserver", "/CN=kube-apiserver", Some(&apiserver)),
            (
                "pki/apiserver-kubelet-client",
                "/O=kubeadm:cluster-admins/CN=kube-apiserver-kubelet-client",
                None,
            ),
            ("pki/front-proxy-client", "/CN=front-proxy-client", None),
            (
                "pki/apiserver-etcd-client",
                "/CN=kube-apiserver-etcd-client",
                None,
            ),
            ("pki/etcd/server", &format!("/CN={node}"), Some(&etcd)),
            ("pki/etcd/peer", &format!("/CN={node}"), Some(&etcd)),
            (
                "pki/etcd/healthcheck-client",
                "/CN=kube-etcd-healthcheck-client",
                None,
            ),
        ];
        for (base, subject, san) in certs {
            let key = root.join(format!("{base}.key"));
            std::fs::create_dir_all(key.parent().unwrap()).unwrap();
            kubeadm_csr(&key, &root.join(format!("{base}.csr")), subject, san);
        }
        for (conf, subject) in KUBEADM_CONFS {
            let key = self.path(&format!("{rel}-keys/{conf}.key"));
            std::fs::create_dir_all(key.parent().unwrap()).unwrap();
            let csr = root.join(format!("{conf}.conf.csr"));
            kubeadm_csr(&key, &csr, &subject.replace("NODE", node), None);
            let user = subject.rsplit_once("CN=").unwrap().1.replace("NODE", node);
            let text =
                kubeadm_kubeconfig(server, "kubernetes", &user, &std::fs::read(&key).unwrap());
            std::fs::write(root.join(format!("{conf}.conf")), text).unwrap();
        }
        root
    }
}

/// A new RSA-2048 key as PKCS#1 PEM at `key`, and its CSR at `csr`.
fn kubeadm_csr(key: &Path, csr: &Path, subject: &str, san: Option<&str>) {
    openssl(&["genrsa", "-traditional", "-out", s(key), "2048"]);
    let mut args = vec![
        "req",
        "-new",
        "-key",
        s(key),
        "-subj",
        subject,
        "-out",
        s(csr),
    ];
    let ext = san.map(|san| format!("subjectAltName={san}"));
    if let Some(ext) = &ext {
        args.extend(["-addext", ext]);
    }
    openssl(&args);
}

/// A CertificateSigningRequest object as `kubectl get csr -o json` shows it, with the request
/// read from `csr`.
pub fn object(
    name: &str,
    csr: &Path,
    signer: &str,
    usages: &[&str],
    username: &str,
    status: serde_json::Value,
    expiration: Option<u64>,
) -> serde_json::Value {
    use base64::Engine;
    let request = base64::engine::general_purpose::STANDARD.encode(std::fs::read(csr).unwrap());
    // The groups the API server would set: kubeadm's admin is in kubeadm:cluster-admins.
    let groups = match username {
        "kubernetes-admin" => ["kubeadm:cluster-admins", "system:authenticated"],
        _ => ["system:nodes", "system:authenticated"],
    };
    let mut spec = serde_json::json!({"request": request, "signerName": signer, "usages": usages, "username": username,
        "groups": groups});
    if let Some(e) = expiration {
        spec["expirationSeconds"] = e.into();
    }
    serde_json::json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": name, "resourceVersion": "42"}, "spec": spec, "status": status})
}

/// `cp -a FROM TO`: a copy of a CA home, as an insider (or a restore) would make it.
pub fn copy_home(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// SoftHSM2's PKCS#11 module.
pub fn softhsm_module() -> PathBuf {
    real_module()
}

/// The hash `hsmca plan` wrote into a plan: what reviewers approve with `--approve`.
pub fn plan_hash(plan: &Path) -> String {
    let text = std::fs::read_to_string(plan).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["hash"].as_str().unwrap().to_owned()
}

/// A path as `&str`, for argument lists.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl verify -CAfile ROOT CERT` succeeded.
pub fn openssl_verifies(root: &Path, cert: &Path) -> bool {
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(root)
        .arg(cert)
        .output()
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": OK")
}

pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout(), self.stderr())
    }
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code(), 0, "hsmca failed:\n{}", self.all());
        self
    }
    /// Exited with `code` and said `needle` on stderr.
    #[track_caller]
    pub fn fails_with(&self, code: i32, needle: &str) {
        self.code_is(code);
        assert!(
            self.stderr().contains(needle),
            "expected {needle:?} in:\n{}",
            self.all()
        );
    }

    #[track_caller]
    pub fn code_is(&self, code: i32) -> &Self {
        assert_eq!(self.code(), code, "expected exit {code}:\n{}", self.all());
        self
    }
}

/// A small tmpfs mounted at a directory, to fill the disk on purpose; unmounted when dropped
/// (declare it after the [`Env`] that holds the directory). Mounting needs root, as the test
/// command runs; anything else fails the test, it never skips.
pub struct SmallFs(PathBuf);

impl SmallFs {
    pub fn mount(dir: &Path, bytes: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            mounted.status.success(),
            "mounting a {bytes}-byte tmpfs at {} failed (the full-disk tests need root): {}",
            dir.display(),
            String::from_utf8_lossy(&mounted.stderr)
        );
        Self(dir.to_path_buf())
    }

    /// Bytes in use on it.
    pub fn used(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=used"])
            .arg(&self.0)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    /// Grows (or shrinks) the file system in place: the disk was freed.
    pub fn resize(&self, bytes: u64) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success(), "remounting {} failed", self.0.display());
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Child processes killed on drop, so a failing assertion never leaves a server running.
#[derive(Default)]
pub struct Procs(pub Vec<Child>);

impl Procs {
    pub fn push(&mut self, child: Child) -> usize {
        self.0.push(child);
        self.0.len() - 1
    }

    pub fn stop(&mut self, i: usize) {
        let _ = self.0[i].kill();
        let _ = self.0[i].wait();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 250 ms until it returns a value; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<String>) -> String {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The fault-injecting PKCS#11 shim (`tests/shim/hsmca_shim.c`), compiled with `cc` once per
/// test binary into Cargo's per-target temporary directory. Missing `cc` fails the test.
pub fn shim() -> &'static Path {
    static SHIM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SHIM.get_or_init(|| {
        require("cc");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/shim/hsmca_shim.c");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let out = dir.join("libhsmca_shim.so");
        // Test binaries run in parallel: build under a private name, then rename into place.
        let tmp = dir.join(format!("libhsmca_shim.{}.so", std::process::id()));
        let built = Command::new("cc")
            .args([
                "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
            ])
            .arg(&tmp)
            .arg(&src)
            .args(["-ldl", "-lpthread"])
            .output()
            .unwrap();
        assert!(
            built.status.success(),
            "cc {}: {}",
            src.display(),
            String::from_utf8_lossy(&built.stderr)
        );
        std::fs::rename(&tmp, &out).unwrap();
        out
    })
}

/// The real module the shim forwards to: `HSMCA_PKCS11_MODULE` or SoftHSM2's standard paths.
pub fn real_module() -> PathBuf {
    if let Some(p) = std::env::var_os("HSMCA_PKCS11_MODULE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    hsmca::token::DEFAULT_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("SoftHSM2 is not installed: run `bash softhsm/install.sh`")
}

impl Env {
    /// `hsmca ARGS` on this token through the fault-injecting shim, with `faults` as its
    /// `HSMCA_SHIM_*` settings (e.g. `("HSMCA_SHIM_RNG", "stuck")`). Killed after `limit`: a
    /// hang fails the test instead of stalling the suite.
    pub fn hsmca_faulty(
        &self,
        args: &[&str],
        faults: &[(&str, &str)],
        limit: std::time::Duration,
    ) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hsmca"));
        cmd.env("SOFTHSM2_CONF", &self.conf)
            .env("HSMCA_PIN", PIN)
            .env("HSMCA_PKCS11_MODULE", shim())
            .env("HSMCA_SHIM_MODULE", real_module())
            .args(args);
        for (k, v) in faults {
            cmd.env(k, v);
        }
        run_within(cmd, limit)
    }
}

/// Runs `cmd` to completion, killing it and failing the test if it takes longer than `limit`.
pub fn run_within(mut cmd: Command, limit: std::time::Duration) -> Run {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut b).map(|_| b)
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut b).map(|_| b)
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let err = err.join().unwrap().unwrap_or_default();
            panic!(
                "{:?} still running after {limit:?}; killed. stderr:\n{}",
                cmd,
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Run(Output {
        status,
        stdout: out.join().unwrap().unwrap(),
        stderr: err.join().unwrap().unwrap(),
    })
}

/// `sign-dir --json` outcome lines by input file (the summary dropped).
pub fn outcomes(run: &Run) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut lines: Vec<serde_json::Value> = run
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines.pop();
    lines
        .into_iter()
        .map(|d| (d["file"].as_str().unwrap().to_owned(), d))
        .collect()
}

/// The rule of a failed outcome, or the first rule of a refused one.
pub fn rule(d: &serde_json::Value) -> &str {
    d["rule"]
        .as_str()
        .or_else(|| d["refusals"][0]["rule"].as_str())
        .unwrap_or_default()
}

/// A forwarding PKCS#11 module, as an attacker would put in hsmca.json to log the PIN: every
/// call goes to SoftHSM2; loading it writes a marker file, so the test sees whether it was
/// ever loaded.
pub fn forwarding_shim(env: &Env) -> (PathBuf, PathBuf) {
    require("cc");
    let real = softhsm_module();
    let marker = env.path("shim-loaded");
    let src = env.path("shim.c");
    std::fs::write(
        &src,
        format!(
            r#"#include <dlfcn.h>
#include <stdio.h>
typedef unsigned long CK_RV;
typedef CK_RV (*get_list)(void **);
__attribute__((constructor)) static void loaded(void) {{
    FILE *f = fopen("{marker}", "w");
    if (f) {{ fputs("loaded\n", f); fclose(f); }}
}}
CK_RV C_GetFunctionList(void **list) {{
    void *real = dlopen("{real}", RTLD_NOW | RTLD_LOCAL);
    if (!real) return 5;
    return ((get_list)dlsym(real, "C_GetFunctionList"))(list);
}}
"#,
            marker = marker.display(),
            real = real.display()
        ),
    )
    .unwrap();
    let so = env.path("shim.so");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-o", s(&so), s(&src), "-ldl"])
        .status()
        .unwrap();
    assert!(st.success(), "cc failed");
    (so, marker)
}

/// Runs `sqlite3` (the tool an auditor would use) on the CA home's index with `sql` and
/// returns its output.
pub fn sqlite(home: &Path, sql: &str) -> String {
    require("sqlite3");
    let out = Command::new("sqlite3")
        .arg(home.join("log/index.sqlite"))
        .arg(sql)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `hsmca sign --profile test-any-key --json CSR...` in one run; returns the serials it
/// issued, in order.
pub fn sign_serials(env: &Env, home: &Path, csrs: &[&Path]) -> Vec<String> {
    let mut args = vec![
        "sign",
        "--home",
        s(home),
        "--profile",
        "test-any-key",
        "--json",
    ];
    args.extend(csrs.iter().map(|p| s(p)));
    let run = env.hsmca(&args);
    run.ok();
    run.stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["cert"]["serial"].as_str().map(str::to_owned))
        .collect()
}
