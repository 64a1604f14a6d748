//! Writes N ECDSA P-256 CSRs (CN=bench-I) for the benchmark: OpenSSL would take minutes for
//! 100,000 of them; rcgen takes seconds.
//!
//! usage: make_csrs N DIR
#![allow(clippy::unwrap_used, reason = "a benchmark tool")]

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, n, dir] = args.as_slice() else {
        panic!("usage: make_csrs N DIR")
    };
    let n: usize = n.parse().unwrap();
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    for i in 0..n {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("bench-{i}"));
        // One key for all: the CSRs still differ (subject), and key generation is not what
        // the benchmark measures.
        let csr = p.serialize_request(&key).unwrap();
        let sub = dir.join(format!("{}", i / 1000));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("bench-{i}.csr")), csr.pem().unwrap()).unwrap();
    }
}
