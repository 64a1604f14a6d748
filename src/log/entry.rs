//! The log's entries: one JSON object per line, each a leaf of the Merkle tree.
//!
//! A leaf is the exact bytes of the line without its newline; verifiers hash stored bytes and
//! never re-serialise. Every entry carries `prev`, the tree root over all earlier entries, so a
//! changed entry is pinned to its number by the next entry's `prev`.

use serde::{Deserialize, Serialize};

/// Format version of entries.
pub const VERSION: u32 = 1;

/// One log line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// Format version.
    pub v: u32,
    /// Position in the log (0-based); equals the line number.
    pub seq: u64,
    /// When it was written (RFC 3339 UTC, from this machine's clock).
    pub time: String,
    /// Base64 RFC 6962 root of entries `0..seq`.
    pub prev: String,
    /// What happened.
    #[serde(flatten)]
    pub body: Body,
}

/// What an entry records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Body {
    /// Entry 0: the root CA was created.
    Root {
        /// Root subject.
        subject: String,
        /// Root serial, hex.
        serial: String,
        /// Root key type.
        key_type: String,
        /// Label of the root key in the token.
        key_label: String,
        /// SHA-256 of the root's SPKI.
        spki_sha256: String,
        /// SHA-256 of the root certificate.
        cert_sha256: String,
        /// The root certificate, base64 DER.
        cert: String,
        /// Log origin (checkpoint first line and note key name).
        origin: String,
        /// The checkpoint verifier key.
        log_vkey: String,
        /// hsmca version.
        tool: String,
    },
    /// About to sign: the exact TBS the token will sign.
    IssueIntent {
        /// Serial, hex.
        serial: String,
        /// Profile.
        profile: String,
        /// Subject.
        subject: String,
        /// SANs as `DNS:x` / `IP:y`.
        sans: Vec<String>,
        /// notBefore.
        not_before: String,
        /// notAfter.
        not_after: String,
        /// SHA-256 of the CSR.
        csr_sha256: String,
        /// SHA-256 of the DER TBSCertificate.
        tbs_sha256: String,
        /// Serial (hex) of the certificate this one renews, for `hsmca renew`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        renews: Option<String>,
        /// The policy (`policy` entry's `policy_sha256`) this certificate was decided under.
        /// Absent only in logs written before policies were logged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        policy_sha256: Option<String>,
    },
    /// Signed, verified, and about to be released.
    Cert {
        /// The intent this fulfils.
        intent_seq: u64,
        /// Serial, hex.
        serial: String,
        /// Profile.
        profile: String,
        /// SHA-256 of the CSR.
        csr_sha256: String,
        /// SHA-256 of the certificate.
        cert_sha256: String,
        /// The certificate, base64 DER.
        cert: String,
    },
    /// An intent that has no result: the process ended between intent and result. Nothing was
    /// released for it.
    Abandon {
        /// The intent.
        intent_seq: u64,
        /// Why.
        reason: String,
    },
    /// A certificate was revoked.
    Revocation {
        /// Serial, hex.
        serial: String,
        /// RFC 5280 reason, kebab-case (`key-compromise`, ...).
        reason: String,
        /// When it was revoked.
        revocation_time: String,
        /// When the key is known or suspected to have been compromised (RFC 5280 invalidityDate).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        invalidity_date: Option<String>,
    },
    /// About to sign a CRL: the exact TBSCertList the token will sign.
    CrlIntent {
        /// The issuing CA (`root` or an intermediate's name).
        issuer: String,
        /// cRLNumber.
        crl_number: u64,
        /// thisUpdate.
        this_update: String,
        /// nextUpdate.
        next_update: String,
        /// Serials (hex) listed as revoked.
        revoked: Vec<String>,
        /// SHA-256 of the DER TBSCertList.
        tbs_sha256: String,
    },
    /// A CRL, signed and verified.
    Crl {
        /// The intent this fulfils.
        intent_seq: u64,
        /// The issuing CA.
        issuer: String,
        /// cRLNumber.
        crl_number: u64,
        /// SHA-256 of the CRL.
        crl_sha256: String,
        /// The CRL, base64 DER.
        crl: String,
    },
    /// A batch's plan: logged before `hsmca sign-dir --plan` signs anything, or after the last
    /// certificate of `hsmca sign-dir INPUT`, which decides as it signs.
    Plan {
        /// The plan's content hash (for a reviewed plan, as shown to the operators).
        plan_sha256: String,
        /// CSRs the plan would issue.
        to_issue: u64,
    },
    /// The policy in force from here on: logged by `init` and by `hsmca profiles apply`, the
    /// only way to change what is signed. Signing commands refuse a CA home whose files differ
    /// from the last one.
    Policy {
        /// SHA-256 of the JSON of `files`: the one hash intents refer to.
        policy_sha256: String,
        /// SHA-256 of each file, by path relative to the CA home (`site.json`,
        /// `profiles/NAME.json`).
        files: std::collections::BTreeMap<String, String>,
        /// The site parameters.
        site: serde_json::Value,
        /// Every profile, expanded with the site parameters, by name.
        profiles: std::collections::BTreeMap<String, serde_json::Value>,
    },
    /// The PKCS#11 module signing commands may load: recorded by `init`, and again whenever an
    /// operator names another one with `--module`.
    Module {
        /// Canonical path.
        path: String,
        /// SHA-256 of the file.
        sha256: String,
    },
    /// A torn tail was removed by `hsmca log recover`.
    Recovery {
        /// How many bytes were cut.
        bytes_removed: u64,
        /// Their SHA-256.
        removed_sha256: String,
        /// Where they were kept.
        quarantine: String,
    },
}

impl Body {
    /// The `type` field value.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Root { .. } => "root",
            Self::IssueIntent { .. } => "issue-intent",
            Self::Cert { .. } => "cert",
            Self::Abandon { .. } => "abandon",
            Self::Recovery { .. } => "recovery",
            Self::Revocation { .. } => "revocation",
            Self::CrlIntent { .. } => "crl-intent",
            Self::Crl { .. } => "crl",
            Self::Plan { .. } => "plan",
            Self::Policy { .. } => "policy",
            Self::Module { .. } => "module",
        }
    }
}
