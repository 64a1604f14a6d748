//! Shared helpers for the integration tests: an isolated SoftHSM2 token per test, the real
//! `hsmca` binary, and OpenSSL for CSRs and independent verification. A missing tool fails the
//! test with an install hint; nothing is skipped.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
        Self { dir, conf }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `hsmca ARGS` with this token and the PIN in HSMCA_PIN.
    pub fn hsmca(&self, args: &[&str]) -> Run {
        self.hsmca_env(args, &[])
    }

    pub fn hsmca_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hsmca"));
        cmd.env("SOFTHSM2_CONF", &self.conf)
            .env("HSMCA_PIN", PIN)
            .env_remove("HSMCA_PKCS11_MODULE")
            .args(args);
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

    /// A CA home at `rel` with a root of `key_type`.
    pub fn init(&self, rel: &str, token: &str, key_type: &str) -> PathBuf {
        let home = self.path(rel);
        let label = format!("root-{rel}");
        self.hsmca(&[
            "init",
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
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("libsofthsm2.so not found: install SoftHSM2 (softhsm/install.sh)")
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
