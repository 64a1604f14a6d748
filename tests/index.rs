//! Issue 15: the log's derived files (the SQLite index and the tree's stored hashes) on a real
//! SoftHSM2 token. A crash between the log append and the index update loses nothing; an
//! index that is missing, stale, edited or booby-trapped is rebuilt from `entries.jsonl`, never
//! trusted; `log verify --from-checkpoint` checks what was appended after a checkpoint and
//! catches tampering there. Tampering is done with the `sqlite3` tool an auditor would use.
#![allow(clippy::unwrap_used, reason = "tests panic on failure")]

mod common;

use std::path::{Path, PathBuf};

use common::{Env, s, sqlite};

fn lines(home: &Path) -> usize {
    std::fs::read_to_string(home.join("log/entries.jsonl"))
        .unwrap()
        .lines()
        .count()
}

/// Signs CSRs with these CNs in one run; returns their serials in order.
fn sign(env: &Env, home: &Path, cns: &[&str]) -> Vec<String> {
    let csrs: Vec<PathBuf> = cns
        .iter()
        .map(|cn| env.p256_csr(&format!("c/{cn}.csr"), &format!("/CN={cn}")))
        .collect();
    let refs: Vec<&Path> = csrs.iter().map(PathBuf::as_path).collect();
    common::sign_serials(env, home, &refs)
}

/// The serials `log list` shows.
fn listed(env: &Env, home: &Path) -> (Vec<String>, String) {
    let run = env.hsmca(&["log", "list", "--home", s(home), "--json"]);
    run.ok();
    let serials = run
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["serial"].as_str().map(str::to_owned))
        .collect();
    (serials, run.stderr())
}

#[test]
fn a_crash_between_the_log_append_and_the_index_update_loses_nothing() {
    let env = Env::new("idxcrash");
    let home = env.init("ca", "idxcrash", "ecdsa-p256");
    let first = sign(&env, &home, &["a"]);
    assert_eq!(first.len(), 1);
    let before = lines(&home);
    // The process dies right after the intents are durable in entries.jsonl, before the index
    // and the hashes file hear of them.
    let csr = env.p256_csr("c/b.csr", "/CN=b");
    let run = env.hsmca_env(
        &[
            "sign",
            "--home",
            s(&home),
            "--profile",
            "test-any-key",
            s(&csr),
        ],
        &[("HSMCA_DANGER_CRASH_AT", "before-index")],
    );
    assert_ne!(run.code(), 0, "{}", run.all());
    assert_eq!(lines(&home), before + 1, "the intent is durable");
    let indexed: usize = sqlite(&home, "SELECT v FROM meta WHERE k = 'size'")
        .parse()
        .unwrap();
    assert_eq!(indexed, before, "the index lags the log, never leads it");

    // A reader catches the index up from the log: it lists what was issued, once.
    let (serials, _) = listed(&env, &home);
    assert_eq!(serials, first);
    let indexed: usize = sqlite(&home, "SELECT v FROM meta WHERE k = 'size'")
        .parse()
        .unwrap();
    assert_eq!(indexed, before + 1);
    assert_eq!(
        sqlite(&home, "SELECT count(*) FROM intents WHERE open = 1"),
        "1"
    );

    // The usual path after a crash: the unsigned intent stops writers until `log recover`
    // abandons it; then the CSR is signed once.
    let run = env.sign(&home, "test-any-key", &[&csr]);
    assert_eq!(run.code(), 4, "{}", run.all());
    env.hsmca(&["log", "recover", "--home", s(&home)]).ok();
    assert_eq!(
        sqlite(&home, "SELECT count(*) FROM intents WHERE open = 1"),
        "0"
    );
    let second = sign(&env, &home, &["b"]);
    assert_eq!(second.len(), 1);
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
    let (serials, _) = listed(&env, &home);
    assert_eq!(serials, [first, second].concat());
}

#[test]
fn an_index_that_is_missing_stale_edited_or_booby_trapped_is_rebuilt_never_trusted() {
    let env = Env::new("idxtamper");
    let home = env.init("ca", "idxtamper", "ecdsa-p256");
    let serials = sign(&env, &home, &["a", "b", "c"]);
    assert_eq!(serials.len(), 3);
    let old_index = env.path("old-index.sqlite");
    std::fs::copy(home.join("log/index.sqlite"), &old_index).unwrap();
    env.hsmca(&[
        "revoke",
        "--home",
        s(&home),
        &serials[1],
        "--reason",
        "key-compromise",
    ])
    .ok();

    // An insider deletes the revocation from the index (and its mark on the certificate):
    // the CRL still lists it, because the checkpoint signs the chain of critical entries.
    sqlite(
        &home,
        "DELETE FROM critical WHERE seq = (SELECT max(seq) FROM critical); UPDATE certs SET rev_seq = NULL;",
    );
    let crl = env.path("root.crl");
    let run = env.hsmca(&[
        "crl",
        "--home",
        s(&home),
        "--issuer",
        "root",
        "--out",
        s(&crl),
    ]);
    run.ok();
    assert!(
        run.stderr().contains("rebuilding it from the log"),
        "{}",
        run.all()
    );
    let text = common::openssl(&["crl", "-in", s(&crl), "-noout", "-text"]);
    assert!(
        text.to_uppercase().contains(&serials[1].to_uppercase()),
        "the revoked serial is in the CRL:\n{text}"
    );
    assert_eq!(
        sqlite(
            &home,
            "SELECT count(*) FROM certs WHERE rev_seq IS NOT NULL"
        ),
        "1",
        "the rebuilt index has the revocation again"
    );

    // A trigger planted in the index never runs: the schema is not hsmca's, so it is rebuilt.
    sqlite(
        &home,
        "CREATE TRIGGER evil AFTER INSERT ON certs BEGIN DELETE FROM certs; END;",
    );
    let more = sign(&env, &home, &["d"]);
    let (all, _) = listed(&env, &home);
    assert_eq!(all, [serials.clone(), more].concat());
    assert_eq!(
        sqlite(
            &home,
            "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger'"
        ),
        "0"
    );

    // An older copy of the index is caught up from the log; a missing one is rebuilt; so is
    // a hashes file cut short.
    std::fs::copy(&old_index, home.join("log/index.sqlite")).unwrap();
    let (again, _) = listed(&env, &home);
    assert_eq!(again, all);
    std::fs::remove_file(home.join("log/index.sqlite")).unwrap();
    let (again, stderr) = listed(&env, &home);
    assert_eq!(again, all);
    assert!(stderr.contains("index.sqlite is missing"), "{stderr}");
    let hashes = home.join("log/hashes");
    let len = std::fs::metadata(&hashes).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&hashes)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (again, stderr) = listed(&env, &home);
    assert_eq!(again, all);
    assert!(stderr.contains("rebuilding"), "{stderr}");

    // `log reindex` does it on demand; the index then answers an auditor's sqlite3 query.
    let run = env.hsmca(&["log", "reindex", "--home", s(&home)]);
    run.ok();
    assert!(
        run.stdout()
            .contains(&format!("reindexed {} entries", lines(&home))),
        "{}",
        run.all()
    );
    assert_eq!(sqlite(&home, "SELECT count(*) FROM certs"), "4");
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn verify_from_a_checkpoint_checks_what_was_appended_and_catches_tampering_there() {
    let env = Env::new("idxfrom");
    let home = env.init("ca", "idxfrom", "ecdsa-p256");
    sign(&env, &home, &["a"]);
    let kept = env.path("kept.checkpoint");
    std::fs::copy(home.join("log/checkpoint"), &kept).unwrap();
    let from: usize = lines(&home);
    sign(&env, &home, &["b", "c"]);
    let run = env.hsmca(&[
        "log",
        "verify",
        "--home",
        s(&home),
        "--from-checkpoint",
        s(&kept),
    ]);
    run.ok();
    assert!(
        run.stdout()
            .contains(&format!("checked     entries {from}..{}", lines(&home) - 1)),
        "{}",
        run.all()
    );
    assert!(run.stdout().contains("the log extends it"), "{}", run.all());

    // A same-length edit of a certificate entry after the kept checkpoint (b's, not the
    // last line: opening the log proves the last line, and refuses an altered one itself).
    let entries = home.join("log/entries.jsonl");
    let text = std::fs::read_to_string(&entries).unwrap();
    let needle = "\"type\":\"cert\"";
    let last = text.rfind(needle).unwrap();
    let cert_b = text[..last].rfind(needle).unwrap();
    let at = cert_b
        + text[cert_b..].find("\"profile\":\"test-any-key\"").unwrap()
        + "\"profile\":\"".len();
    let mut edited = text.clone();
    edited.replace_range(at..at + 1, "T");
    assert_eq!(edited.len(), text.len());
    std::fs::write(&entries, &edited).unwrap();
    let run = env.hsmca(&[
        "log",
        "verify",
        "--home",
        s(&home),
        "--from-checkpoint",
        s(&kept),
    ]);
    assert_eq!(run.code(), 4, "{}", run.all());
    assert!(run.stdout().contains("problem:"), "{}", run.all());
    std::fs::write(&entries, &text).unwrap();

    // A checkpoint of another log is refused, not taken as a starting point.
    let env2 = Env::new("idxfrom2");
    let other = env2.init("other", "idxfrom2", "ecdsa-p256");
    let run = env.hsmca(&[
        "log",
        "verify",
        "--home",
        s(&home),
        "--from-checkpoint",
        s(&other.join("log/checkpoint")),
    ]);
    assert_eq!(run.code(), 4, "{}", run.all());
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();
}

#[test]
fn full_verify_checks_every_certificate_signature_on_the_worker_threads() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let env = Env::new("idxverify");
    let home = env.init("ca", "idxverify", "ecdsa-p256");
    // More certificates than one batch of work for a checking thread.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let input = env.path("in");
    std::fs::create_dir_all(&input).unwrap();
    for i in 0..600 {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("c-{i}"));
        std::fs::write(
            input.join(format!("c-{i}.csr")),
            p.serialize_request(&key).unwrap().pem().unwrap(),
        )
        .unwrap();
    }
    let out = env.path("out");
    env.hsmca(&[
        "sign-dir",
        "--home",
        s(&home),
        s(&input),
        "--profile",
        "test-any-key",
        "--out",
        s(&out),
    ])
    .ok();
    env.hsmca(&["log", "verify", "--home", s(&home)]).ok();

    // One certificate's signature is changed, and its recorded SHA-256 with it: only the
    // signature check can tell (the chain and checkpoints also report the edit).
    let entries = home.join("log/entries.jsonl");
    let text = std::fs::read_to_string(&entries).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let target = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("\"type\":\"cert\""))
        .nth(450)
        .map(|(i, _)| i)
        .unwrap();
    let mut entry: serde_json::Value = serde_json::from_str(&lines[target]).unwrap();
    let mut der = b64.decode(entry["cert"].as_str().unwrap()).unwrap();
    let last = der.len() - 3;
    der[last] ^= 0x01;
    let sha = ring::digest::digest(&ring::digest::SHA256, &der);
    let hex: String = sha.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    entry["cert"] = b64.encode(&der).into();
    entry["cert_sha256"] = hex.into();
    lines[target] = serde_json::to_string(&entry).unwrap();
    std::fs::write(&entries, lines.join("\n") + "\n").unwrap();
    let run = env.hsmca(&["log", "verify", "--home", s(&home)]);
    assert_eq!(run.code(), 4, "{}", run.all());
    assert!(
        run.stdout().contains(&format!(
            "problem: entry {target}: certificate signature does not verify under its issuer's key"
        )),
        "{}",
        run.all()
    );
}
