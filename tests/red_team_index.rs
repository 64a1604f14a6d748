//! Red team, issue 15: an insider who can write every file of the CA home (but has no PIN)
//! edits the log's SQLite index with the `sqlite3` tool an auditor would use, so that the
//! operator's next ordinary command signs, releases or refuses the wrong thing. Each test here
//! was an attack that worked against the first index; the index is derived data, so every
//! answer that decides what is signed or released must be proven against the log.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, openssl, require, s, sqlite};

/// Signs these CSRs in one run; returns their serials in order.
fn sign(env: &Env, home: &Path, csrs: &[&Path]) -> Vec<String> {
    common::sign_serials(env, home, csrs)
}

/// Certificate entries in `entries.jsonl` (the log, not the index).
fn logged_certs(home: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(home.join("log/entries.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["type"] == "cert")
        .collect()
}

/// Signs `csr` and checks nothing was released or signed: no certificate file, a failing
/// exit, and still `certs` certificate entries in the log.
#[track_caller]
fn nothing_signed(env: &Env, home: &Path, csr: &Path, certs: usize, what: &str) {
    let run = env.sign(home, "test-any-key", &[csr]);
    assert!(
        !csr.with_extension("crt").exists(),
        "signed for {what}: {}",
        run.all()
    );
    assert_ne!(run.code(), 0, "{}", run.all());
    assert_eq!(logged_certs(home).len(), certs, "nothing new was signed");
}

/// A new CA home (token `label`) that signed one CSR, `c/a.csr` for CN=a: the env, the
/// home, the CSR and the certificate's serial.
fn one_signed(label: &str) -> (Env, PathBuf, PathBuf, String) {
    let env = Env::new(label);
    let home = env.init("ca", label, "ecdsa-p256");
    let csr = env.p256_csr("c/a.csr", "/CN=a");
    let serial = sign(&env, &home, &[&csr]).pop().unwrap();
    (env, home, csr, serial)
}

/// `hsmca revoke --home HOME SERIAL --reason REASON`.
fn revoke(env: &Env, home: &Path, serial: &str, reason: &str) -> common::Run {
    env.hsmca(&["revoke", "--home", s(home), serial, "--reason", reason])
}

/// A new CSR at `rel` for the key of `csr` (made by `Env::p256_csr`), subject `/CN=cn`.
fn csr_for_key_of(env: &Env, csr: &Path, rel: &str, cn: &str) -> PathBuf {
    let out = env.path(rel);
    openssl(&[
        "req",
        "-new",
        "-key",
        s(&csr.with_extension("key")),
        "-subj",
        &format!("/CN={cn}"),
        "-out",
        s(&out),
    ]);
    out
}

#[test]
fn red3_a_compromised_certificate_dropped_from_the_index_still_blocks_its_key() {
    let (env, home, csr, serial) = one_signed("r3blk");
    revoke(&env, &home, &serial, "key-compromise").ok();
    // The insider deletes the compromised certificate's row: the revocation itself is a
    // critical entry the checkpoint signs, but the key it blocks was looked up in the index.
    sqlite(
        &home,
        &format!("DELETE FROM certs WHERE serial = '{serial}'"),
    );
    // A new CSR for the compromised key, another subject.
    let other = csr_for_key_of(&env, &csr, "c/b.csr", "b");
    nothing_signed(&env, &home, &other, 1, "a key revoked for key compromise");
    // `log reindex` repairs the index, and the blocklist refuses the key by its rule.
    env.hsmca(&["log", "reindex", "--home", s(&home)]).ok();
    let run = env.sign(&home, "test-any-key", &[&other]);
    run.code_is(1);
    assert!(run.stdout().contains("key.compromised"), "{}", run.all());
    assert!(!other.with_extension("crt").exists());
}

#[test]
fn red3_a_rerun_never_writes_back_another_csrs_certificate_the_index_points_at() {
    let env = Env::new("r3swap");
    let home = env.init("ca", "r3swap", "ecdsa-p256");
    let a = env.p256_csr("c/a.csr", "/CN=a");
    let b = env.p256_csr("c/b.csr", "/CN=b");
    let serials = sign(&env, &home, &[&a, &b]);
    assert_eq!(serials.len(), 2);
    let (sa, sb) = (&serials[0], &serials[1]);
    // The insider points a's row (CSR hash, profile) at b's certificate entry: seq, serial and
    // place all b's, so the line read back is a real, proven certificate of this log.
    sqlite(
        &home,
        &format!(
            "CREATE TEMP TABLE b AS SELECT * FROM certs WHERE serial = '{sb}'; \
             DELETE FROM certs WHERE serial = '{sb}'; \
             UPDATE certs SET seq = (SELECT seq FROM b), serial = (SELECT serial FROM b), \
               offset = (SELECT offset FROM b), len = (SELECT len FROM b) WHERE serial = '{sa}';"
        ),
    );
    // The operator reruns a's CSR (its certificate was lost): the log's certificate for a,
    // or nothing; never b's.
    let crt = a.with_extension("crt");
    std::fs::remove_file(&crt).unwrap();
    let run = env.sign(&home, "test-any-key", &[&a]);
    if crt.exists() {
        let subject = openssl(&["x509", "-in", s(&crt), "-noout", "-subject", "-serial"]);
        assert!(
            subject.contains("CN = a") || subject.contains("CN=a"),
            "a rerun of a's CSR wrote back another certificate: {subject}\n{}",
            run.all()
        );
    } else {
        assert_eq!(run.code(), 4, "{}", run.all());
        assert!(run.stderr().contains("reindex"), "{}", run.all());
    }
    assert_eq!(logged_certs(&home).len(), 2, "nothing new was signed");
    // After `log reindex` the rerun writes back a's own certificate.
    env.hsmca(&["log", "reindex", "--home", s(&home)]).ok();
    if crt.exists() {
        std::fs::remove_file(&crt).unwrap();
    }
    env.sign(&home, "test-any-key", &[&a]).ok();
    let serial = openssl(&["x509", "-in", s(&crt), "-noout", "-serial"]);
    assert!(
        serial.trim().to_lowercase().ends_with(&sa.to_lowercase()),
        "{serial} vs {sa}"
    );
    assert_eq!(logged_certs(&home).len(), 2);
}

/// `hsmca ca create etcd-ca` (profile etcd-ca, CN=etcd-ca) with its key under `label`.
fn create_etcd_ca(env: &Env, home: &Path, label: &str) -> common::Run {
    env.hsmca(&[
        "ca",
        "create",
        "etcd-ca",
        "--home",
        s(home),
        "--profile",
        "etcd-ca",
        "--subject",
        "CN=etcd-ca",
        "--key-label",
        label,
    ])
}

/// A root made by `init` on token `token` (`ca create` needs the etcd profiles of `init`).
fn root(env: &Env, token: &str) -> PathBuf {
    let home = env.path("ca");
    env.hsmca(&[
        "init",
        "--home",
        s(&home),
        "--token",
        token,
        "--key-type",
        "ecdsa-p256",
        "--subject",
        "CN=red3 Root",
        "--key-label",
        "root",
    ])
    .ok();
    home
}

#[test]
fn red3_an_intermediate_hidden_from_the_index_still_holds_its_subject() {
    let env = Env::new("r3ca");
    let home = root(&env, "r3ca");
    create_etcd_ca(&env, &home, "root-etcd-ca").ok();
    let cas = |home: &Path| {
        logged_certs(home)
            .iter()
            .filter(|e| e["profile"] == "etcd-ca")
            .count()
    };
    assert_eq!(cas(&home), 1);
    // The insider takes the intermediate out of the home (config and certificate file, which
    // are theirs to write) and marks its index row as a leaf: the log still holds the CA
    // certificate for CN=etcd-ca, which `ca create` must find before giving the subject to
    // another key.
    let config = home.join("hsmca.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("cas");
    std::fs::write(&config, json.to_string()).unwrap();
    std::fs::remove_file(home.join("cas/etcd-ca.pem")).unwrap();
    sqlite(&home, "UPDATE certs SET is_ca = 0 WHERE is_ca = 1");
    let run = create_etcd_ca(&env, &home, "root-etcd-ca-2");
    assert_ne!(
        run.code(),
        0,
        "a second CA took a logged CA's subject: {}",
        run.all()
    );
    assert!(run.stderr().contains("etcd-ca"), "{}", run.all());
    assert_eq!(cas(&home), 1, "one CA certificate for CN=etcd-ca");
}

#[test]
fn red3_huge_or_negative_numbers_in_the_index_never_crash_hsmca() {
    let env = Env::new("r3big");
    let home = env.init("ca", "r3big", "ecdsa-p256");
    let a = env.p256_csr("c/a.csr", "/CN=a");
    sign(&env, &home, &[&a]);
    let saved = env.path("saved.sqlite");
    sqlite(&home, "PRAGMA wal_checkpoint(TRUNCATE)");
    std::fs::copy(home.join("log/index.sqlite"), &saved).unwrap();
    // Rows the open checks (the critical entries' places, the size the index reflects): the
    // index is rebuilt from the log and the command works. These panicked (capacity
    // overflow, multiply overflow) or failed with an I/O error blaming entries.jsonl.
    let rebuilt = [
        "UPDATE critical SET len = -1 WHERE seq = 0",
        "UPDATE critical SET len = 4000000000 WHERE seq = 0",
        "UPDATE critical SET offset = 100000000 WHERE seq = 0",
        "UPDATE meta SET v = 9223372036854775807 WHERE k = 'size'",
    ];
    // Rows read only when a command needs them: refused, naming the index and `log
    // reindex`. The first aborted the process (a 9 EB allocation), the others blamed
    // entries.jsonl.
    let refused = [
        "UPDATE certs SET len = 9000000000000000000",
        "UPDATE certs SET len = 4000000000",
        "UPDATE certs SET offset = -5",
    ];
    let b = env.p256_csr("c/b.csr", "/CN=b");
    for (sql, rebuilds) in rebuilt
        .iter()
        .map(|q| (q, true))
        .chain(refused.iter().map(|q| (q, false)))
    {
        std::fs::copy(&saved, home.join("log/index.sqlite")).unwrap();
        sqlite(&home, sql);
        let list = env.hsmca(&["log", "list", "--home", s(&home)]);
        let run = env.sign(&home, "test-any-key", &[&a, &b]);
        if rebuilds {
            list.ok();
            assert!(
                list.stderr().contains("rebuilding"),
                "{sql}: {}",
                list.all()
            );
            run.ok();
            std::fs::remove_file(b.with_extension("crt")).unwrap();
            // The rebuilt index is the one kept for the next round's copy.
            std::fs::copy(&saved, home.join("log/index.sqlite")).unwrap();
            env.hsmca(&["log", "reindex", "--home", s(&home)]).ok();
            sqlite(&home, "PRAGMA wal_checkpoint(TRUNCATE)");
            std::fs::copy(home.join("log/index.sqlite"), &saved).unwrap();
        } else {
            for run in [&list, &run] {
                run.code_is(4);
                assert!(
                    run.stderr().contains("index.sqlite") && run.stderr().contains("reindex"),
                    "{sql}: {}",
                    run.all()
                );
            }
            assert!(!b.with_extension("crt").exists());
        }
    }
}

#[test]
fn red3_intents_marked_open_in_the_index_are_not_abandoned_in_the_signed_log() {
    let env = Env::new("r3open");
    let home = env.init("ca", "r3open", "ecdsa-p256");
    let a = env.p256_csr("c/a.csr", "/CN=a");
    let b = env.p256_csr("c/b.csr", "/CN=b");
    assert_eq!(sign(&env, &home, &[&a, &b]).len(), 2);
    let abandons = |home: &Path| {
        std::fs::read_to_string(home.join("log/entries.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| l.contains(r#""type":"abandon""#))
            .count()
    };
    let saved = env.path("saved.sqlite");
    sqlite(&home, "PRAGMA wal_checkpoint(TRUNCATE)");
    std::fs::copy(home.join("log/index.sqlite"), &saved).unwrap();
    // The insider marks both issued certificates' intents open again, or makes up an open
    // intent at the root entry: the next writer would sign an `abandon` ("nothing was
    // released") for a certificate that was released, and `log verify` would fail forever.
    let c = env.p256_csr("c/c.csr", "/CN=c");
    for sql in [
        "UPDATE intents SET open = 1",
        "INSERT INTO intents VALUES(0, NULL, NULL, NULL, NULL, 1, NULL, NULL)",
    ] {
        std::fs::copy(&saved, home.join("log/index.sqlite")).unwrap();
        sqlite(&home, sql);
        let run = env.sign(&home, "test-any-key", &[&c]);
        run.code_is(4);
        assert!(
            run.stderr().contains("index.sqlite") && run.stderr().contains("reindex"),
            "{sql}: {}",
            run.all()
        );
        assert_eq!(abandons(&home), 0, "{sql}: {}", run.all());
        assert!(!c.with_extension("crt").exists());
        env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    }
    env.hsmca(&["log", "reindex", "--home", s(&home)]).ok();
    env.sign(&home, "test-any-key", &[&c]).ok();
    assert_eq!(abandons(&home), 0);
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn red3_a_revoked_certificate_dropped_from_the_index_is_not_issued_again_on_a_rerun() {
    let (env, home, a, serial) = one_signed("r3rev");
    revoke(&env, &home, &serial, "superseded").ok();
    // The insider deletes the revoked certificate's row: a rerun of its CSR no longer finds
    // it "already issued (revoked)" and would sign the same request again.
    sqlite(
        &home,
        &format!("DELETE FROM certs WHERE serial = '{serial}'"),
    );
    std::fs::remove_file(a.with_extension("crt")).unwrap();
    nothing_signed(&env, &home, &a, 1, "a revoked request");
    env.hsmca(&["log", "reindex", "--home", s(&home)]).ok();
    let run = env.sign(&home, "test-any-key", &[&a]);
    assert!(run.all().contains("revoked"), "{}", run.all());
    assert!(!a.with_extension("crt").exists());
    assert_eq!(logged_certs(&home).len(), 1);
}

#[test]
fn red3_a_certificate_dropped_from_the_index_can_still_be_revoked() {
    let (env, home, _, serial) = one_signed("r3revoke");
    // The insider deletes the row of a certificate that is about to be revoked: `revoke`
    // said "never issued by this CA" (exit 2), and the certificate stayed off every CRL.
    sqlite(
        &home,
        &format!("DELETE FROM certs WHERE serial = '{serial}'"),
    );
    let run = revoke(&env, &home, &serial, "key-compromise");
    run.code_is(4);
    assert!(
        run.stderr().contains(&serial) && run.stderr().contains("reindex"),
        "{}",
        run.all()
    );
    // A serial never issued is still refused as such.
    let run = revoke(
        &env,
        &home,
        "0badbadbadbadbadbadbadbadbadbad0",
        "superseded",
    );
    run.fails_with(2, "never issued");
    env.hsmca(&["log", "reindex", "--home", s(&home)]).ok();
    revoke(&env, &home, &serial, "key-compromise").ok();
}

#[test]
fn red3_an_intent_made_up_in_the_index_does_not_vouch_for_an_imported_key() {
    let env = Env::new("r3fk");
    let home = root(&env, "r3fk");
    // A key imported under the label the CA's key would get (CKA_LOCAL false): `ca create`
    // takes it only if the log shows an earlier run of its own made it (an intent naming
    // its public key).
    let pem = env.path("foreign.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        s(&pem),
    ]);
    let pkcs8 = env.path("foreign.p8");
    openssl(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        s(&pem),
        "-out",
        s(&pkcs8),
    ]);
    let spki = env.path("foreign.spki");
    openssl(&[
        "pkey",
        "-in",
        s(&pem),
        "-pubout",
        "-outform",
        "DER",
        "-out",
        s(&spki),
    ]);
    let fingerprint = hsmca::keys::sha256_hex(&std::fs::read(&spki).unwrap());
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &env.conf)
        .args([
            "--import",
            s(&pkcs8),
            "--token",
            "r3fk",
            "--label",
            "root-etcd-ca",
        ])
        .args(["--id", "abcd", "--pin", common::PIN])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The insider makes up that intent in the index, at the root entry's number.
    sqlite(
        &home,
        &format!(
            "INSERT INTO intents VALUES(0, 'ab', '{fingerprint}', NULL, NULL, 0, 0, {})",
            index_key(&fingerprint)
        ),
    );
    let run = create_etcd_ca(&env, &home, "root-etcd-ca");
    assert!(
        !home.join("cas/etcd-ca.pem").exists(),
        "a CA was made on an imported key: {}",
        run.all()
    );
    assert_ne!(run.code(), 0, "{}", run.all());
    // Once the index is rebuilt, the key is refused for what it is.
    env.hsmca(&["log", "reindex", "--home", s(&home)]).ok();
    let run = create_etcd_ca(&env, &home, "root-etcd-ca");
    run.fails_with(2, "the issuance log has never seen");
}

#[test]
fn red3_a_line_appended_by_hand_and_hidden_from_the_index_is_not_buried_by_the_next_writer() {
    let (env, home, _, serial) = one_signed("r3bury");
    // The insider appends a revocation with the right number and chain hash (anyone can
    // compute them), then tells the index it has seen every byte: the O(1) open read
    // nothing past the index, so the line was in no tree, not an unsigned tail, and the next
    // writer appended after it and signed a tree without it (log verify then failed).
    let path = home.join("log/entries.jsonl");
    let (text, forged) = forged_revocation(&path, &serial);
    let with_forged = format!("{text}{forged}");
    std::fs::write(&path, &with_forged).unwrap();
    sqlite(
        &home,
        &format!(
            "UPDATE meta SET v = {} WHERE k = 'bytes'",
            with_forged.len()
        ),
    );
    let b = env.p256_csr("c/b.csr", "/CN=b");
    let run = env.sign(&home, "test-any-key", &[&b]);
    assert!(
        !b.with_extension("crt").exists(),
        "signed after a line no checkpoint covers: {}",
        run.all()
    );
    run.code_is(4);
    assert!(run.stderr().contains("recover"), "{}", run.all());
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        with_forged,
        "nothing appended after the forged line"
    );
}

/// Runs `sqlite3` on the index with the schema writable (an insider's tool, not hsmca's).
fn sqlite_schema_edit(home: &Path, sql: &str) {
    sqlite(home, &format!("PRAGMA writable_schema = ON; {sql}"));
}

#[test]
fn red3_a_crl_lists_the_revoked_serial_even_when_the_index_btree_lies() {
    let env = Env::new("r3btree");
    let home = env.init("ca", "r3btree", "ecdsa-p256");
    let a = env.p256_csr("c/a.csr", "/CN=a");
    let b = env.p256_csr("c/b.csr", "/CN=b");
    let serials = sign(&env, &home, &[&a, &b]);
    let (sa, sb) = (&serials[0], &serials[1]);
    revoke(&env, &home, sa, "key-compromise").ok();
    // The insider rebuilds the serial index's b-tree over another column, keyed so that a's
    // serial finds b's row, and puts the schema text back exactly as hsmca writes it: the
    // schema check passes, and `WHERE serial = a` returns b's row (with a's serial, read
    // from the index). Held: the row is proven against the entry it points at, which is b's.
    sqlite_schema_edit(
        &home,
        "UPDATE sqlite_schema SET sql = 'CREATE INDEX certs_serial ON certs(subject)' WHERE name = 'certs_serial';",
    );
    sqlite(
        &home,
        &format!(
            "REINDEX certs_serial; UPDATE certs SET subject = '{sa}' WHERE serial = '{sb}'; \
             UPDATE certs SET subject = 'CN=a' WHERE serial = '{sa}';"
        ),
    );
    sqlite_schema_edit(
        &home,
        "UPDATE sqlite_schema SET sql = 'CREATE INDEX certs_serial ON certs(serial)' WHERE name = 'certs_serial';",
    );
    let crl = env.path("root.crl");
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
    ]);
    if crl.exists() {
        let text = openssl(&["crl", "-in", s(&crl), "-noout", "-text"]).to_lowercase();
        let flat = text.replace([':', ' '], "");
        assert!(
            flat.contains(&format!("serialnumber{sa}")) && !flat.contains(sb.as_str()),
            "the CRL does not list exactly the revoked serial {sa}:\n{text}\n{}",
            run.all()
        );
    } else {
        run.code_is(4);
    }
    // And the compromised key stays blocked: a new CSR for a's key is not signed.
    let other = csr_for_key_of(&env, &a, "c/a2.csr", "a2");
    let run = env.sign(&home, "test-any-key", &[&other]);
    assert!(!other.with_extension("crt").exists(), "{}", run.all());
}

#[test]
fn red3_a_critical_row_of_the_wrong_type_gets_the_index_rebuilt() {
    let env = Env::new("r3ty");
    let home = env.init("ca", "r3ty", "ecdsa-p256");
    let a = env.p256_csr("c/a.csr", "/CN=a");
    sign(&env, &home, &[&a]);
    // STRICT is only in the schema text: the insider makes the table loose, writes text
    // where a length goes, and puts the text back. Every command failed (exit 4) until
    // someone thought of `log reindex`.
    let strict = sqlite(
        &home,
        "SELECT sql FROM sqlite_schema WHERE name = 'critical'",
    );
    let set = |sql: &str| {
        sqlite(
            &home,
            &format!(
                "PRAGMA writable_schema = ON; UPDATE sqlite_schema SET sql = '{}' WHERE name = 'critical'",
                sql.replace('\'', "''")
            ),
        );
    };
    set(&strict.replace(") STRICT", ")"));
    sqlite(&home, "UPDATE critical SET len = 'abc' WHERE seq = 0");
    set(&strict);
    let run = env.hsmca(&["log", "list", "--home", s(&home)]);
    run.ok();
    assert!(run.stderr().contains("rebuilding"), "{}", run.all());
    let b = env.p256_csr("c/b.csr", "/CN=b");
    env.sign(&home, "test-any-key", &[&b]).ok();
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn red3_a_huge_sparse_tail_is_never_read_into_memory() {
    require("time");
    let (env, home, _, _) = one_signed("r3huge");
    // The insider extends entries.jsonl by 2 GiB of zeros (a sparse file: no disk used). Every
    // command read it whole into memory looking for a newline (RSS grew with the tail: a
    // large enough one is an out-of-memory kill of every command).
    let path = home.join("log/entries.jsonl");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    let tail = 2u64 << 30;
    f.set_len(len + tail).unwrap();
    drop(f);
    let peak = |args: &[&str]| {
        let mut cmd = Command::new("time");
        cmd.env("SOFTHSM2_CONF", &env.conf)
            .env("HSMCA_PIN", common::PIN)
            .env_remove("HSMCA_PKCS11_MODULE")
            .arg("-f")
            .arg("peak-rss-kb %M")
            .arg(env!("CARGO_BIN_EXE_hsmca"))
            .args(args)
            .arg("--home")
            .arg(&home);
        let run = common::run_within(cmd, std::time::Duration::from_secs(60));
        let kb: u64 = run
            .stderr()
            .lines()
            .find_map(|l| l.strip_prefix("peak-rss-kb "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        assert!(kb < 150 << 10, "{args:?}: peak RSS {kb} KiB\n{}", run.all());
        run
    };
    peak(&["log", "list"]).ok();
    let run = peak(&["log", "verify"]);
    run.code_is(4);
    assert!(
        run.stdout()
            .contains(&format!("incomplete last line ({tail} bytes")),
        "{}",
        run.all()
    );
    let a2 = env.p256_csr("c/a2.csr", "/CN=a2");
    let run = env.sign(&home, "test-any-key", &[&a2]);
    run.fails_with(4, "log recover");
    // `log recover` streams the tail into quarantine/ (256 MiB of it here, to spare the
    // disk): it read it whole into memory.
    let kept = 256u64 << 20;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len + kept)
        .unwrap();
    let run = peak(&["log", "recover"]);
    run.ok();
    let after = std::fs::read(&path).unwrap();
    assert!(
        after.ends_with(b"\n") && !after.contains(&0),
        "the tail is cut and the recovery logged: {}",
        run.all()
    );
    let quarantined: Vec<_> = std::fs::read_dir(home.join("log/quarantine"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    assert_eq!(quarantined, [kept], "{}", run.all());
    env.sign(&home, "test-any-key", &[&a2]).ok();
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

/// The key the index files a text under (first 8 bytes of its SHA-256, as hsmca computes it),
/// so a made-up row is one hsmca's lookups find.
fn index_key(text: &str) -> i64 {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    i64::from_be_bytes(d.as_ref()[..8].try_into().unwrap())
}

#[test]
fn red4_verify_from_a_checkpoint_fails_a_log_rolled_back_behind_a_stored_checkpoint() {
    let (env, home, _, _) = one_signed("r4roll");
    // The minutes keep the checkpoint after the first certificate.
    let minutes = env.path("minutes-checkpoint");
    std::fs::copy(home.join("log/checkpoint"), &minutes).unwrap();
    let entries = home.join("log/entries.jsonl");
    let before = std::fs::read(&entries).unwrap();
    let b = env.p256_csr("c/b.csr", "/CN=b");
    sign(&env, &home, &[&b]);
    // The insider rolls the log back to the minutes (the second certificate is gone from
    // it) and puts the old checkpoint back as the latest; `checkpoints/<size>` of the
    // removed history, signed by the log key, stays where it is.
    std::fs::write(&entries, &before).unwrap();
    std::fs::copy(&minutes, home.join("log/checkpoint")).unwrap();
    let full = env.hsmca(&["log", "verify", "--home", s(&home)]);
    assert_eq!(full.code(), 4, "{}", full.all());
    let since = verify_from(&env, &home, &minutes);
    assert_eq!(
        since.code(),
        4,
        "a signed checkpoint past the log's end is history removed: {}",
        since.all()
    );
    assert!(since.stdout().contains("removed"), "{}", since.all());
}

#[test]
fn red4_verify_from_a_checkpoint_fails_entries_no_checkpoint_signs() {
    let (env, home, _, serial) = one_signed("r4tail");
    let minutes = env.path("minutes-checkpoint");
    std::fs::copy(home.join("log/checkpoint"), &minutes).unwrap();
    // The insider appends a revocation with the right number and chain hash (anyone can
    // compute them); no checkpoint signs it. A full `log verify` fails the log; the quick
    // one from the minutes said "log OK" (a warning only), and `log recover` would then
    // sign the forged line into the log.
    let path = home.join("log/entries.jsonl");
    let (text, forged) = forged_revocation(&path, &serial);
    std::fs::write(&path, format!("{text}{forged}")).unwrap();
    let full = env.hsmca(&["log", "verify", "--home", s(&home)]);
    assert_eq!(full.code(), 4, "{}", full.all());
    let since = verify_from(&env, &home, &minutes);
    assert_eq!(since.code(), 4, "{}", since.all());
    assert!(since.stdout().contains("unsigned tail"), "{}", since.all());
    // A torn last line fails it too, as it fails the full verification.
    std::fs::write(&path, format!("{text}{{\"v\":1,\"seq\"")).unwrap();
    let since = verify_from(&env, &home, &minutes);
    assert_eq!(since.code(), 4, "{}", since.all());
    assert!(
        since.stdout().contains("incomplete last line"),
        "{}",
        since.all()
    );
}

/// The text of `entries.jsonl` and a `revocation` line (newline included) for `serial` that
/// continues it: the right number and chain hash, which anyone can compute.
fn forged_revocation(entries: &Path, serial: &str) -> (String, String) {
    let text = std::fs::read_to_string(entries).unwrap();
    let mut tree = hsmca::log::translog::Tree::default();
    for l in text.lines() {
        tree.push(l.as_bytes());
    }
    let forged = serde_json::json!({
        "v": 1,
        "seq": tree.size(),
        "time": "2026-01-01T00:00:00Z",
        "prev": hsmca::log::translog::b64(&tree.root()),
        "type": "revocation",
        "serial": serial,
        "reason": "superseded",
        "revocation_time": "2026-01-01T00:00:00Z",
    });
    (text, format!("{forged}\n"))
}

/// `hsmca log verify --home HOME --from-checkpoint FILE`.
fn verify_from(env: &Env, home: &Path, checkpoint: &Path) -> common::Run {
    env.hsmca(&[
        "log",
        "verify",
        "--home",
        s(home),
        "--from-checkpoint",
        s(checkpoint),
    ])
}
