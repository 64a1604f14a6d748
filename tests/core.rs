//! End-to-end tests of the offline root CA core against a real SoftHSM2 token and OpenSSL.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Env, copy_home, openssl, openssl_verifies, require, s};

#[test]
fn init_with_each_root_key_type_makes_a_valid_root() {
    let env = Env::new("roots");
    for kt in ["ecdsa-p384", "ecdsa-p256", "rsa-3072", "rsa-4096"] {
        let home = env.init(kt, "roots", kt);
        let root = home.join("root.pem");
        assert!(
            openssl_verifies(&root, &root),
            "{kt} root does not verify under itself"
        );
        let text = openssl(&["x509", "-in", s(&root), "-noout", "-text"]);
        assert!(
            text.contains("X509v3 Basic Constraints: critical") && text.contains("CA:TRUE"),
            "{kt}: {text}"
        );
        assert!(
            text.contains("X509v3 Key Usage: critical")
                && text.contains("Certificate Sign, CRL Sign"),
            "{kt}: {text}"
        );
        assert!(text.contains("Subject Key Identifier"), "{kt}: {text}");
        let config = std::fs::read_to_string(home.join("hsmca.json")).unwrap();
        assert!(!config.contains(common::PIN), "the config must hold no PIN");
        env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    }
}

#[test]
fn signs_csrs_of_every_key_type_and_openssl_verifies_them() {
    let env = Env::new("sign");
    for root_type in ["ecdsa-p384", "rsa-3072"] {
        let home = env.init(root_type, "sign", root_type);
        let dir = format!("csr-{root_type}");
        let csrs = [
            env.csr(
                &format!("{dir}/rsa.csr"),
                &["-newkey", "rsa:2048"],
                "/CN=rsa",
                Some("DNS:a.test.internal,IP:127.0.0.1"),
                &[],
            ),
            env.p256_csr(&format!("{dir}/p256.csr"), "/CN=p256"),
            // openssl's default digest for P-384 is SHA-256: the rcgen#448 case.
            env.csr(
                &format!("{dir}/p384.csr"),
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
                "/CN=p384",
                None,
                &[],
            ),
            env.csr(
                &format!("{dir}/ed25519.csr"),
                &["-newkey", "ed25519"],
                "/CN=ed25519",
                None,
                &[],
            ),
            env.csr(
                &format!("{dir}/pss.csr"),
                &["-newkey", "rsa:2048"],
                "/CN=pss",
                None,
                &[
                    "-sigopt",
                    "rsa_padding_mode:pss",
                    "-sigopt",
                    "rsa_pss_saltlen:digest",
                    "-sha256",
                ],
            ),
        ];
        let mut args = vec!["sign", "--home", s(&home), "--profile", "test-any-key"];
        args.extend(csrs.iter().map(|p| s(p)));
        let run = env.hsmca(&args);
        run.ok();
        for csr in &csrs {
            let cert = csr.with_extension("crt");
            assert!(
                openssl_verifies(&home.join("root.pem"), &cert),
                "{}: {}",
                cert.display(),
                run.all()
            );
            let text = openssl(&["x509", "-in", s(&cert), "-noout", "-text"]);
            assert!(text.contains("CA:FALSE"), "{text}");
            assert!(text.contains("TLS Web Client Authentication"), "{text}");
            assert!(
                !text.contains("Key Encipherment")
                    || csr.ends_with("rsa.csr")
                    || csr.ends_with("pss.csr"),
                "keyEncipherment on a non-RSA key: {text}"
            );
            // The certificate's key is the CSR's key.
            let cert_key = openssl(&["x509", "-in", s(&cert), "-noout", "-pubkey"]);
            let csr_key = openssl(&["req", "-in", s(csr), "-noout", "-pubkey"]);
            assert_eq!(cert_key, csr_key);
        }
        // Serials are 16 random bytes, distinct.
        let serials: std::collections::BTreeSet<String> = csrs
            .iter()
            .map(|c| {
                openssl(&[
                    "x509",
                    "-in",
                    s(&c.with_extension("crt")),
                    "-noout",
                    "-serial",
                ])
                .trim()
                .to_string()
            })
            .collect();
        assert_eq!(serials.len(), csrs.len());
        assert!(
            serials.iter().all(|s| s.len() == "serial=".len() + 32),
            "{serials:?}"
        );
        env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    }
}

#[test]
fn keys_in_the_token_are_sensitive_and_not_extractable() {
    require("pkcs11-tool");
    let env = Env::new("keys");
    env.init("ca", "keys", "ecdsa-p256");
    let module = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libsofthsm2.so not found");
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &env.conf)
        .args([
            "--module",
            module,
            "--token-label",
            "keys",
            "--login",
            "--pin",
            common::PIN,
            "--list-objects",
            "--type",
            "privkey",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let blocks: Vec<&str> = text.split("Private Key Object").skip(1).collect();
    assert_eq!(blocks.len(), 2, "root and log keys expected: {text}");
    for block in blocks {
        assert!(
            block.contains("sensitive") && block.contains("never extractable"),
            "{block}"
        );
        assert!(
            block.contains("Usage:      sign")
                && !block.contains("decrypt")
                && !block.contains("derive"),
            "{block}"
        );
    }
    assert!(
        text.contains("label:      root-ca\n") && text.contains("label:      root-ca-log\n"),
        "{text}"
    );
}

#[test]
fn token_and_pin_errors_are_clear_and_never_show_the_pin() {
    let env = Env::new("errs");
    let home = env.init("ca", "errs", "ecdsa-p256");
    let csr = env.p256_csr("c/a.csr", "/CN=a");
    let sign_args = [
        "sign",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        s(&csr),
    ];
    let wrong = "99999999";
    let run = env.hsmca_env(&sign_args, &[("HSMCA_PIN", wrong)]);
    run.fails_with(3, "wrong PIN for token \"errs\"");
    assert!(!run.all().contains(wrong), "the PIN leaked: {}", run.all());
    assert!(!csr.with_extension("crt").exists());

    let run = env.hsmca(&[
        "sign",
        "--home",
        s(&home),
        "--profile",
        "test-any-key",
        "--token",
        "nope",
        s(&csr),
    ]);
    run.fails_with(3, "no token labelled \"nope\"; tokens seen: \"errs\"");

    let run = env.hsmca_env(
        &sign_args,
        &[("HSMCA_PKCS11_MODULE", "/nonexistent/lib.so")],
    );
    run.fails_with(3, "/nonexistent/lib.so: cannot read the PKCS#11 module");

    // init refuses an existing home, and an existing key label in the token.
    let init_again = |home: &Path| {
        let args = [
            "init",
            "--home",
            s(home),
            "--token",
            "errs",
            "--key-type",
            "ecdsa-p256",
        ];
        env.hsmca(&[&args[..], &["--subject", "CN=x", "--key-label", "root-ca"]].concat())
    };
    let run = init_again(&home);
    run.fails_with(2, "already exists");
    let other = env.path("other");
    let run = init_again(&other);
    run.fails_with(3, "already holds an object labelled \"root-ca\"");
    assert!(!other.exists());

    // An unknown profile fails before the PIN is needed.
    let run = env.hsmca_env(
        &["sign", "--home", s(&home), "--profile", "nope", s(&csr)],
        &[("HSMCA_PIN", "")],
    );
    run.fails_with(2, "no profile named \"nope\"");
}

#[test]
fn a_second_writer_gets_a_clear_error() {
    let env = Env::new("lock");
    let home = env.init("ca", "lock", "ecdsa-p256");
    let csr = env.p256_csr("c/a.csr", "/CN=a");
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(home.join("LOCK"))
        .unwrap();
    lock.try_lock().unwrap();
    let run = env.sign(&home, "test-any-key", &[&csr]);
    run.fails_with(4, "another hsmca process is writing");
    drop(lock);
    env.sign(&home, "test-any-key", &[&csr]).ok();
}

#[test]
fn refused_csrs_name_the_rule_and_do_not_stop_the_rest() {
    let env = Env::new("policy");
    let home = env.init_k8s("ca", "policy");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
    let good = env.csr(
        "c/good.csr",
        &ec,
        "/O=system:nodes/CN=system:node:node1",
        None,
        &[],
    );
    let masters = env.csr(
        "c/masters.csr",
        &ec,
        "/O=system:masters/CN=system:node:node1",
        None,
        &[],
    );
    let run = env.hsmca(&[
        "check",
        "--home",
        s(&home),
        "--profile",
        "kubelet-client",
        s(&good),
        s(&masters),
        "--json",
    ]);
    run.code_is(1);
    let lines: Vec<serde_json::Value> = run
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["outcome"], "would-issue");
    assert_eq!(lines[1]["outcome"], "refused");
    assert_eq!(lines[1]["refusals"][0]["rule"], "subject.O.forbidden");
    assert_eq!(lines[1]["refusals"][0]["value"], "system:masters");

    let run = env.sign(&home, "kubelet-client", &[&masters, &good]);
    run.code_is(1);
    assert!(
        run.stdout()
            .contains("rule subject.O.forbidden expects never \"system:masters\""),
        "{}",
        run.all()
    );
    assert!(good.with_extension("crt").exists() && !masters.with_extension("crt").exists());
    let text = openssl(&[
        "x509",
        "-in",
        s(&good.with_extension("crt")),
        "-noout",
        "-subject",
    ]);
    assert!(
        text.contains("O = system:nodes, CN = system:node:node1"),
        "{text}"
    );
}

#[test]
fn checkpoints_verify_with_an_independent_implementation() {
    require("python3");
    for log_key in ["ed25519", "ecdsa-p256"] {
        let env = Env::new("indep");
        let home = env.path("ca");
        env.hsmca(&[
            "init",
            "--home",
            s(&home),
            "--token",
            "indep",
            "--key-type",
            "ecdsa-p256",
            "--subject",
            "CN=Root",
            "--log-key-type",
            log_key,
        ])
        .ok();
        env.install_test_any_key(&home);
        let csr = env.csr("c/a.csr", &["-newkey", "ed25519"], "/CN=a", None, &[]);
        env.sign(&home, "test-any-key", &[&csr]).ok();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/verify_log.py");
        let out = Command::new("python3")
            .arg(&script)
            .arg(&home)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.starts_with("OK 6 "),
            "{log_key}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The same script rejects a forged checkpoint.
        let cp = home.join("log/checkpoint");
        let note = std::fs::read_to_string(&cp).unwrap();
        std::fs::write(&cp, note.replacen("\n6\n", "\n5\n", 1)).unwrap();
        let out = Command::new("python3")
            .arg(&script)
            .arg(&home)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{log_key}: forged checkpoint accepted"
        );
    }
}

/// A CA home with 7 entries: root, then 3 × (intent, cert).
fn home_with_history(env: &Env, token: &str) -> std::path::PathBuf {
    let home = env.init("ca", token, "ecdsa-p256");
    for n in ["a", "b", "c"] {
        let csr = env.csr(
            &format!("c/{n}.csr"),
            &["-newkey", "ed25519"],
            &format!("/CN={n}"),
            None,
            &[],
        );
        env.sign(&home, "test-any-key", &[&csr]).ok();
    }
    home
}

#[test]
fn every_kind_of_log_tampering_is_caught_with_its_entry_number() {
    let env = Env::new("tamper");
    let home = home_with_history(&env, "tamper");
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    let lines: Vec<String> = std::fs::read_to_string(home.join("log/entries.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    // Entries: 0 root, 1 policy, 2 module, 3 the policy with test-any-key, then the history.
    assert_eq!(lines.len(), 10);
    let join = |ls: &[String]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
    let edited = {
        let mut ls = lines.clone();
        ls[6] = ls[6].replacen("CN=b", "CN=B", 1);
        join(&ls)
    };
    let edited_last = {
        let mut ls = lines.clone();
        ls[9] = ls[9].replacen("\"seq\":9", "\"seq\":9 ", 1);
        join(&ls)
    };
    let dropped = join(&[&lines[..5], &lines[6..]].concat());
    let swapped = {
        let mut ls = lines.clone();
        ls.swap(6, 7);
        join(&ls)
    };
    let full = join(&lines);
    let torn = full[..full.len() - 20].to_string();
    let cut = join(&lines[..9]);
    // The last field: whether a writer must refuse too. Opening the log reads only what it
    // uses (the checkpoint, the tree's right edge, the critical entries, the lines it
    // releases), so a same-length edit of an old intent the writer never reads is left for
    // `log verify`; the writer's new entries chain to the signed tree, not to the edit.
    let cases = [
        ("edit a byte", edited, "entry 6", false),
        ("edit the last entry", edited_last, "entry 9", true),
        ("drop a line", dropped, "entry 5", true),
        ("swap two lines", swapped, "entry 6", false),
        (
            "truncate mid-line",
            torn,
            "entry 9: incomplete last line",
            true,
        ),
        (
            "truncate whole lines",
            cut,
            "entries 9..9 were removed",
            true,
        ),
    ];
    for (i, (what, content, expect, writer_refuses)) in cases.into_iter().enumerate() {
        let copy = env.path(&format!("copy{i}"));
        copy_home(&home, &copy);
        std::fs::write(copy.join("log/entries.jsonl"), content).unwrap();
        let run = env.hsmca(&["log", "verify", "--home", s(&copy)]);
        assert_eq!(run.code(), 4, "{what}: not caught:\n{}", run.all());
        assert!(
            run.stdout().contains(expect),
            "{what}: expected {expect:?} in:\n{}",
            run.all()
        );
        let csr = env.path("c/a.csr");
        let run = env.sign(&copy, "test-any-key", &[&csr]);
        if writer_refuses {
            assert_eq!(run.code(), 4, "{what}: sign went ahead:\n{}", run.all());
        } else {
            // Whatever the writer did, the evidence stays: verify still names the entry.
            let run = env.hsmca(&["log", "verify", "--home", s(&copy)]);
            assert_eq!(run.code(), 4, "{what}: no longer caught:\n{}", run.all());
            assert!(run.stdout().contains(expect), "{what}: {}", run.all());
        }
    }
}

#[test]
fn a_torn_tail_is_recovered_explicitly_and_logged() {
    let env = Env::new("torn");
    let home = home_with_history(&env, "torn");
    let path = home.join("log/entries.jsonl");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"v\":1,\"seq\":7,\"ti");
    std::fs::write(&path, &bytes).unwrap();
    let csr = env.csr("c/d.csr", &["-newkey", "ed25519"], "/CN=d", None, &[]);
    let run = env.sign(&home, "test-any-key", &[&csr]);
    run.fails_with(4, "hsmca log recover");
    let run = env.hsmca(&["log", "recover", "--home", s(&home)]);
    run.ok();
    assert!(
        run.stdout().contains("removed 18 torn bytes"),
        "{}",
        run.all()
    );
    let quarantined: Vec<_> = std::fs::read_dir(home.join("log/quarantine"))
        .unwrap()
        .collect();
    assert_eq!(quarantined.len(), 1);
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(
        log.lines()
            .last()
            .unwrap()
            .contains("\"type\":\"recovery\""),
        "{log}"
    );
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    env.sign(&home, "test-any-key", &[&csr]).ok();
}

#[test]
fn a_crash_at_any_point_leaves_a_valid_log_and_a_rerun_never_issues_twice() {
    let env = Env::new("crash");
    let home = env.init("ca", "crash", "ecdsa-p256");
    for (i, point) in ["after-intent", "after-cert", "after-checkpoint"]
        .into_iter()
        .enumerate()
    {
        let csr = env.p256_csr(&format!("c/{i}.csr"), &format!("/CN=n{i}"));
        let args = [
            "sign",
            "--home",
            s(&home),
            "--profile",
            "test-any-key",
            s(&csr),
        ];
        let run = env.hsmca_env(&args, &[("HSMCA_DANGER_CRASH_AT", point)]);
        assert!(!run.0.status.success(), "{point}: did not crash");
        assert!(
            !csr.with_extension("crt").exists(),
            "{point}: a certificate was released before the crash"
        );
        // A crash before the checkpoint leaves an unsigned tail: `log verify` fails until an
        // operator has looked and run `log recover`, which signs it.
        let verify = env.hsmca(&["log", "verify", "--home", s(&home)]);
        if point == "after-checkpoint" {
            verify.ok();
        } else {
            verify.code_is(4);
            assert!(
                verify.stdout().contains("unsigned tail"),
                "{}",
                verify.all()
            );
            env.hsmca(&["log", "recover", "--home", s(&home)]).ok();
            env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
        }
        let run = env.hsmca(&args);
        run.ok();
        let cert = csr.with_extension("crt");
        assert!(openssl_verifies(&home.join("root.pem"), &cert), "{point}");
        let reused = run.stdout().contains("already issued");
        assert_eq!(reused, point != "after-intent", "{point}: {}", run.stdout());
        // The CSR has exactly one certificate in the log, and it is the file on disk.
        let log = std::fs::read_to_string(home.join("log/entries.jsonl")).unwrap();
        let csr_der = openssl(&[
            "req",
            "-in",
            s(&csr),
            "-outform",
            "DER",
            "-out",
            s(&env.path("tmp.der")),
        ]);
        let _ = csr_der;
        let sha = sha256_hex(&std::fs::read(env.path("tmp.der")).unwrap());
        let certs = log
            .lines()
            .filter(|l| l.contains("\"type\":\"cert\"") && l.contains(&sha))
            .count();
        assert_eq!(certs, 1, "{point}: issued {certs} times");
        if point == "after-intent" {
            assert!(
                log.contains("\"type\":\"abandon\""),
                "{point}: the dangling intent was not closed"
            );
        }
    }
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    out.stdin.as_ref().unwrap().write_all(bytes).unwrap();
    let o = out.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn help_completions_and_man_pages_come_from_the_cli_definition() {
    let env = Env::new("help");
    let run = env.hsmca(&["-h"]);
    run.ok();
    assert!(
        run.stdout().contains("Exit codes: 0 done") && run.stdout().contains("sign"),
        "{}",
        run.stdout()
    );
    // The long help carries the same reference sections as the man pages.
    let run = env.hsmca(&["--help"]);
    run.ok();
    for needle in [
        "Examples:",
        "Environment:",
        "HSMCA_PIN",
        "Files:",
        "Exit status:",
    ] {
        assert!(run.stdout().contains(needle), "{needle}: {}", run.stdout());
    }
    let revoke_help = env.hsmca(&["revoke", "--help"]).stdout();
    let run = env.hsmca(&["completions", "bash"]);
    run.ok();
    assert!(
        run.stdout().contains("complete -F _hsmca") && run.stdout().contains("recover"),
        "{}",
        run.stdout()
    );
    let dir = env.path("man");
    env.hsmca(&["man", "--out", s(&dir)]).ok();
    assert!(dir.join("hsmca.1").exists() && dir.join("hsmca-sign.1").exists());
    // Every page has the reference sections and renders without a groff warning.
    require("groff");
    for page in std::fs::read_dir(&dir).unwrap() {
        let page = page.unwrap().path();
        let text = std::fs::read_to_string(&page).unwrap();
        for section in [
            ".SH ENVIRONMENT",
            ".SH FILES",
            ".SH \"EXIT STATUS\"",
            "HSMCA_PIN",
        ] {
            assert!(text.contains(section), "{}: no {section}", page.display());
        }
        let out = std::process::Command::new("groff")
            .args(["-man", "-ww", "-z"])
            .arg(&page)
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{}: {}",
            page.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The revoke page's example is the one `revoke --help` shows: one source.
    let revoke = std::fs::read_to_string(dir.join("hsmca-revoke.1")).unwrap();
    assert!(
        revoke.contains(".SH EXAMPLES")
            && revoke.contains("\\-\\-issuer kubernetes\\-ca")
            && revoke_help.contains("--issuer kubernetes-ca"),
        "{revoke}"
    );
}

#[test]
fn a_missing_or_mismatched_token_key_is_refused_before_signing() {
    let env = Env::new("keymix");
    let a = env.init("a", "keymix", "ecdsa-p256");
    env.init("b", "keymix", "ecdsa-p256");
    let csr = env.csr("c/x.csr", &["-newkey", "ed25519"], "/CN=x", None, &[]);
    let config = std::fs::read_to_string(a.join("hsmca.json")).unwrap();
    // b's root key no longer matches a's root.pem; "gone" is not in the token at all.
    for (label, expect) in [
        ("root-b", "does not match the CA certificate"),
        ("gone", "no private key labelled \"gone\""),
    ] {
        let edited = config.replace("\"root-a\"", &format!("{label:?}"));
        std::fs::write(a.join("hsmca.json"), edited).unwrap();
        let run = env.sign(&a, "test-any-key", &[&csr]);
        run.code_is(3);
        assert!(run.stderr().contains(expect), "{label}: {}", run.all());
    }
    assert!(!csr.with_extension("crt").exists());
    let log = std::fs::read_to_string(a.join("log/entries.jsonl")).unwrap();
    assert_eq!(
        log.lines().count(),
        4,
        "nothing may be logged when the key is wrong (root, policy, module, applied policy)"
    );
}
