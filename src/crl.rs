//! CRLs through the same path as certificates: build the exact `TBSCertList` without the token
//! (rcgen with a capturing key), log it as an intent, sign in the token, check the result is
//! those bytes and verifies under the CA key.

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::OffsetDateTime;

use crate::asn1;
use crate::issue::{IssueError, IssuerCert};
use crate::keys;
use crate::signer::{CaSigner, RcgenKey};
use crate::verify::VerifyError;

/// RFC 5280 reason codes by their command-line names. removeFromCRL is left out: it belongs to
/// delta CRLs, which hsmca does not make.
pub const REASONS: [(&str, RevocationReason); 9] = [
    ("unspecified", RevocationReason::Unspecified),
    ("key-compromise", RevocationReason::KeyCompromise),
    ("ca-compromise", RevocationReason::CaCompromise),
    ("affiliation-changed", RevocationReason::AffiliationChanged),
    ("superseded", RevocationReason::Superseded),
    (
        "cessation-of-operation",
        RevocationReason::CessationOfOperation,
    ),
    ("certificate-hold", RevocationReason::CertificateHold),
    ("privilege-withdrawn", RevocationReason::PrivilegeWithdrawn),
    ("aa-compromise", RevocationReason::AaCompromise),
];

/// The name hsmca records (the first column of [`REASONS`]) for a reason in any common
/// spelling: hsmca's own (`key-compromise`), RFC 5280's ASN.1 names (`keyCompromise`,
/// `cACompromise`, `aACompromise`) and OpenSSL's `-crl_reason` names (`CACompromise`). Case,
/// `-`, `_` and spaces are ignored, so every spelling of one reason meets in one log value.
pub fn canonical_reason(name: &str) -> Option<&'static str> {
    fn fold(s: &str) -> String {
        s.chars()
            .filter(|c| !matches!(c, '-' | '_' | ' '))
            .flat_map(char::to_lowercase)
            .collect()
    }
    let wanted = fold(name);
    REASONS
        .iter()
        .find(|(n, _)| fold(n) == wanted)
        .map(|(n, _)| *n)
}

/// Parses a reason name, in any spelling [`canonical_reason`] accepts.
pub fn reason(name: &str) -> Option<RevocationReason> {
    let name = canonical_reason(name)?;
    REASONS.iter().find(|(n, _)| *n == name).map(|(_, r)| *r)
}

/// One revoked certificate on a CRL.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Serial bytes.
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub revocation_time: OffsetDateTime,
    /// Reason name (see [`REASONS`]); `unspecified` is encoded by leaving reasonCode out, as
    /// RFC 5280 §5.3.1 recommends.
    pub reason: String,
    /// invalidityDate, where known.
    pub invalidity_date: Option<OffsetDateTime>,
}

/// What a CRL holds.
#[derive(Debug, Clone)]
pub struct Spec {
    /// cRLNumber.
    pub number: u64,
    /// thisUpdate.
    pub this_update: OffsetDateTime,
    /// nextUpdate.
    pub next_update: OffsetDateTime,
    /// Revoked certificates.
    pub revoked: Vec<Entry>,
}

/// A CRL ready to be signed.
#[derive(Debug)]
pub struct Prepared {
    /// DER TBSCertList.
    pub tbs: Vec<u8>,
    /// Its SHA-256, lowercase hex.
    pub tbs_sha256: String,
    params: CertificateRevocationListParams,
}

/// Builds the TBSCertList without the token.
pub fn prepare(spec: &Spec, issuer: &IssuerCert) -> Result<Prepared, IssueError> {
    let params = CertificateRevocationListParams {
        this_update: spec.this_update,
        next_update: spec.next_update,
        crl_number: SerialNumber::from(spec.number),
        issuing_distribution_point: None,
        revoked_certs: spec
            .revoked
            .iter()
            .map(|e| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&e.serial),
                revocation_time: e.revocation_time,
                reason_code: reason(&e.reason).filter(|r| *r != RevocationReason::Unspecified),
                invalidity_date: e.invalidity_date,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let tbs =
        crate::issue::capture_tbs(issuer, "TBSCertList", |key| sign_with(&params, issuer, key))?;
    Ok(Prepared {
        tbs_sha256: keys::sha256_hex(&tbs),
        tbs,
        params,
    })
}

/// Signs a prepared CRL in the token and checks it: the signed TBS is the prepared one and the
/// signature verifies under the CA key.
pub fn sign(
    prepared: &Prepared,
    issuer: &IssuerCert,
    signer: &dyn CaSigner,
) -> Result<Vec<u8>, IssueError> {
    let key = RcgenKey::signing(signer);
    let der = sign_with(&prepared.params, issuer, &key)?;
    let tbs = asn1::first_inner_element(&der)
        .ok_or_else(|| IssueError::Verify(VerifyError::Parse("bad CRL".into())))?;
    if tbs != prepared.tbs {
        return Err(IssueError::Verify(VerifyError::TbsChanged));
    }
    let (_, sig) = crate::verify::crl_issuer(&der).map_err(IssueError::Verify)?;
    if !issuer.public_key.verify(tbs, &sig) {
        return Err(IssueError::Verify(VerifyError::Signature));
    }
    Ok(der)
}

fn sign_with(
    params: &CertificateRevocationListParams,
    issuer: &IssuerCert,
    key: &RcgenKey<'_>,
) -> Result<Vec<u8>, IssueError> {
    let rc_issuer = issuer.rcgen_issuer(key);
    let crl = params
        .signed_by(&rc_issuer)
        .map_err(|e| crate::issue::rcgen_error(key, e))?;
    Ok(crl.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_read_in_rfc_5280_openssl_and_hsmca_spellings() {
        let table = [
            ("unspecified", "unspecified"),
            ("keyCompromise", "key-compromise"),
            ("key-compromise", "key-compromise"),
            ("KEY_COMPROMISE", "key-compromise"),
            ("cACompromise", "ca-compromise"),
            ("CACompromise", "ca-compromise"),
            ("affiliationChanged", "affiliation-changed"),
            ("superseded", "superseded"),
            ("cessationOfOperation", "cessation-of-operation"),
            ("certificateHold", "certificate-hold"),
            ("privilegeWithdrawn", "privilege-withdrawn"),
            ("aACompromise", "aa-compromise"),
        ];
        for (given, canonical) in table {
            assert_eq!(canonical_reason(given), Some(canonical), "{given}");
            assert!(reason(given).is_some(), "{given}");
        }
        assert_eq!(reason("cACompromise"), Some(RevocationReason::CaCompromise));
        // removeFromCRL belongs to delta CRLs, which hsmca does not make.
        for unknown in ["removeFromCRL", "compromised", "", "key compromise!"] {
            assert_eq!(canonical_reason(unknown), None, "{unknown}");
        }
    }
}
