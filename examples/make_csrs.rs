//! Writes N CSRs (CN=bench-I) for the benchmark: OpenSSL would take minutes for 100,000 of
//! them; rcgen takes seconds. The key is ECDSA P-256 (what kubelets generate), or the RSA key
//! in KEY.pem (kubeadm's default is RSA-2048).
//!
//! usage: make_csrs N DIR [KEY.pem]
#![allow(clippy::unwrap_used, reason = "a benchmark tool")]

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (n, dir, key) = match args.as_slice() {
        [_, n, dir] => (n, dir, None),
        [_, n, dir, key] => (n, dir, Some(key)),
        _ => panic!("usage: make_csrs N DIR [KEY.pem]"),
    };
    let n: usize = n.parse().unwrap();
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir).unwrap();
    // One key for all: the CSRs still differ (subject, so each signature is checked on its
    // own), and key generation is not what the benchmark measures.
    let key = match key {
        Some(path) => rcgen::KeyPair::from_pem(&std::fs::read_to_string(path).unwrap()).unwrap(),
        None => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
    };
    for i in 0..n {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("bench-{i}"));
        let csr = p.serialize_request(&key).unwrap();
        let sub = dir.join(format!("{}", i / 1000));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("bench-{i}.csr")), csr.pem().unwrap()).unwrap();
    }
}
