//! hsmca: an offline root CA whose keys live in a PKCS#11 token.
//!
//! Data flow for one CSR (the order never changes):
//!
//! ```text
//! csr file --csr::load--> VerifiedCsr --+
//! profile --profile::load--> Profile ---+--> policy::decide (pure) --> Decision | Refusals
//! clock, serial --> Context ------------+                |
//!                                                        v
//! issue::prepare (TBS bytes) --> log: intent (durable) --> CaSigner::sign (token)
//!   --> verify::issued (signature + "is it what we decided") --> log: cert (durable)
//!   --> checkpoint (signed by the log key) --> files::write_new (certificate)
//! ```
//!
//! `policy`, `verify` and the parsing half of `csr` are pure: no file system, clock, token or RNG.
//! Only `token` talks to PKCS#11; only `issue` and `signer` build certificates with rcgen.

pub mod asn1;
pub mod batch;
pub mod ceremony;
pub mod cfssl;
pub mod clock;
pub mod crl;
pub mod csr;
pub mod engine;
pub mod error;
pub mod files;
pub mod home;
pub mod input;
pub mod issue;
pub mod k8s;
pub mod keys;
pub mod kubeadm;
pub mod lifecycle;
pub mod log;
pub mod minutes;
pub mod names;
pub mod pin;
pub mod pinned;
pub mod policy;
pub mod profile;
pub mod rng;
pub mod sign;
pub mod signals;
pub mod signer;
pub mod token;
pub mod verify;

pub use error::Error;
