//! From a [`Decision`] to a signed, verified certificate: the one place policy meets the signer.
//!
//! Two steps so the log can record intent before the token signs: [`prepare`] builds the exact
//! `TBSCertificate` bytes without the token (rcgen with a capturing key), and [`sign`] has the
//! token sign the same parameters and then checks the result ([`crate::verify`]): same TBS
//! bytes, valid signature under the CA key, and the fields the decision named.

use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyUsagePurpose, NameConstraints, SanType,
    SerialNumber,
};
use time::OffsetDateTime;

use crate::csr::AttrType;
use crate::keys::{self, PublicKey};
use crate::policy::Decision;
use crate::profile::{Cidr, ExtKeyUsage, KeyUsage};
use crate::signer::{CaSigner, RcgenKey, SignError};
use crate::verify::{self, VerifyError};

/// Why a certificate could not be built or signed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// rcgen refused the parameters (a bug or an impossible decision).
    #[error("cannot build the certificate: {0}")]
    Build(String),
    /// The token failed to sign.
    #[error("the token failed to sign")]
    Sign(#[source] SignError),
    /// The signed certificate is not what was decided, or its signature is bad: withheld.
    #[error("the signed certificate failed verification and is withheld")]
    Verify(#[source] VerifyError),
    /// A subject string given to `init` is not `KEY=VALUE,...`.
    #[error("subject {0:?}: {1}")]
    Subject(String, String),
}

/// A certificate ready to be signed: the decision and the exact TBS bytes the token will sign.
#[derive(Debug)]
pub struct Prepared {
    /// What was decided.
    pub decision: Decision,
    /// DER `TBSCertificate`.
    pub tbs: Vec<u8>,
    /// SHA-256 of `tbs`, lowercase hex (logged in the intent).
    pub tbs_sha256: String,
}

/// The issuer: its certificate and public key.
#[derive(Debug, Clone)]
pub struct IssuerCert {
    /// DER certificate.
    pub der: Vec<u8>,
    /// Its public key.
    pub public_key: PublicKey,
    /// Its notAfter.
    pub not_after: OffsetDateTime,
    /// Its subject name, DER: every certificate it issues must carry exactly this issuer.
    pub subject_der: Vec<u8>,
    /// What rcgen needs of the issuer (subject, SKI, usages), read once: parsing the CA
    /// certificate for every certificate signed was a measurable share of a batch.
    rcgen: CertificateParams,
}

impl IssuerCert {
    /// An rcgen issuer over this certificate and `key`.
    pub(crate) fn rcgen_issuer<'a, S: rcgen::SigningKey>(&'a self, key: S) -> rcgen::Issuer<'a, S> {
        rcgen::Issuer::from_params(&self.rcgen, key)
    }

    /// Reads an issuer certificate (PEM or DER) and takes its key and lifetime.
    pub fn from_pem_or_der(bytes: &[u8]) -> Result<Self, VerifyError> {
        let der = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            x509_cert::der::pem::decode_vec(bytes.trim_ascii())
                .map_err(|e| VerifyError::Parse(e.to_string()))?
                .1
        } else {
            bytes.to_vec()
        };
        let (public_key, not_after) = verify::key_and_expiry(&der)?;
        let (_, subject_der, _, _) = verify::names(&der)?;
        let facts = verify::describe(&der)?;
        let mut rcgen = CertificateParams::default();
        // Not pushed onto the default name: rcgen's default holds a CN, and a pushed CN would
        // take that first place, so an issuer whose CN is not first (`O=x,CN=y` in
        // certificate order) would be named in the wrong order in what it signs.
        rcgen.distinguished_name = rcgen::DistinguishedName::new();
        for (attr, value) in &facts.subject {
            let (t, v) = dn_entry(attr, value).map_err(VerifyError::Parse)?;
            rcgen.distinguished_name.push(t, v);
        }
        let ski = verify::subject_key_id(&der)?.ok_or_else(|| {
            VerifyError::Parse("the CA certificate has no subjectKeyIdentifier".into())
        })?;
        rcgen.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(ski);
        rcgen.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(Self {
            der,
            public_key,
            not_after,
            subject_der,
            rcgen,
        })
    }
}

/// Builds the TBS bytes for `decision` under `issuer`, without the token.
pub fn prepare(decision: Decision, issuer: &IssuerCert) -> Result<Prepared, IssueError> {
    let params = leaf_params(&decision)?;
    let tbs = capture_tbs(issuer, "TBSCertificate", |key| {
        sign_leaf(&params, &decision, issuer, key)
    })?;
    Ok(Prepared {
        tbs_sha256: keys::sha256_hex(&tbs),
        decision,
        tbs,
    })
}

/// Runs an rcgen build with a key that only records what it is asked to sign, and returns those
/// bytes: the exact TBS the token will sign, known before the token is touched.
pub(crate) fn capture_tbs(
    issuer: &IssuerCert,
    what: &str,
    build: impl FnOnce(&RcgenKey<'_>) -> Result<Vec<u8>, IssueError>,
) -> Result<Vec<u8>, IssueError> {
    let capture = RcgenKey::capture(&issuer.public_key);
    build(&capture)?;
    capture
        .take_message()
        .ok_or_else(|| IssueError::Build(format!("rcgen did not produce a {what}")))
}

/// Signs a prepared certificate with the CA key and verifies the result. Returns the DER.
pub fn sign(
    prepared: &Prepared,
    issuer: &IssuerCert,
    signer: &dyn CaSigner,
) -> Result<Vec<u8>, IssueError> {
    // The token signs the very bytes logged in the intent; rcgen built them once, in prepare.
    let signature = signer.sign(&prepared.tbs).map_err(IssueError::Sign)?;
    finish(prepared, issuer, &signature)
}

/// The certificate around a prepared TBS and the token's signature over it, verified: the
/// second half of [`sign`], for callers that keep the token's sessions busy with signing
/// alone and verify on other threads.
pub fn finish(
    prepared: &Prepared,
    issuer: &IssuerCert,
    signature: &[u8],
) -> Result<Vec<u8>, IssueError> {
    let der = crate::asn1::signed(&prepared.tbs, signature)
        .ok_or_else(|| IssueError::Build("the prepared TBSCertificate is not DER".into()))?;
    verify::issued(
        &der,
        &prepared.tbs,
        &issuer.public_key,
        &issuer.subject_der,
        &prepared.decision,
    )
    .map_err(IssueError::Verify)?;
    Ok(der)
}

/// Runs rcgen over `params` with `key` as the issuer's key (capturing or signing).
fn sign_leaf(
    params: &CertificateParams,
    decision: &Decision,
    issuer: &IssuerCert,
    key: &RcgenKey<'_>,
) -> Result<Vec<u8>, IssueError> {
    let subject_key = rcgen::SubjectPublicKeyInfo::from_der(&decision.public_key.spki_der)
        .map_err(|e| IssueError::Build(e.to_string()))?;
    let rc_issuer = issuer.rcgen_issuer(key);
    let cert = params
        .signed_by(&subject_key, &rc_issuer)
        .map_err(|e| rcgen_error(key, e))?;
    Ok(cert.der().to_vec())
}

/// rcgen reports every signer failure as a bare `RemoteKeyError`; recover the real cause.
pub(crate) fn rcgen_error(key: &RcgenKey<'_>, e: rcgen::Error) -> IssueError {
    match key.take_error() {
        Some(sign_error) => IssueError::Sign(sign_error),
        None => IssueError::Build(e.to_string()),
    }
}

/// What a root certificate is made of.
#[derive(Debug, Clone)]
pub struct RootSpec {
    /// `CN=...,O=...` as given to `init`.
    pub subject: String,
    /// Positive serial bytes.
    pub serial: Vec<u8>,
    /// notBefore.
    pub not_before: OffsetDateTime,
    /// notAfter.
    pub not_after: OffsetDateTime,
}

/// Self-signs the root certificate (basicConstraints CA critical with pathLen 1, keyUsage
/// keyCertSign + cRLSign critical, SKI) with the token key, and verifies it.
pub fn self_signed_root(spec: &RootSpec, signer: &dyn CaSigner) -> Result<Vec<u8>, IssueError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = parse_subject(&spec.subject)?;
    params.serial_number = Some(SerialNumber::from_slice(&spec.serial));
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = RcgenKey::signing(signer);
    let cert = params.self_signed(&key).map_err(|e| rcgen_error(&key, e))?;
    let der = cert.der().to_vec();
    verify::self_signed(&der, signer.public_key()).map_err(IssueError::Verify)?;
    Ok(der)
}

/// Parses `CN=x,O=y` into a DN, in the order given. Only CN, O, OU, C, ST, L.
pub fn parse_subject(s: &str) -> Result<DistinguishedName, IssueError> {
    let mut dn = DistinguishedName::new();
    for (attr, v) in subject_pairs(s)? {
        let (t, value) = dn_entry(&attr, &v).map_err(|e| IssueError::Subject(s.to_owned(), e))?;
        dn.push(t, value);
    }
    Ok(dn)
}

/// Parses an RFC 4514 string (`CN=x,O=y`: the last RDN first, as every report prints names)
/// into attribute/value pairs in certificate order (`O=y` then `CN=x`), so a name prints back
/// exactly as it was typed. A CN is required.
pub fn subject_pairs(s: &str) -> Result<Vec<(AttrType, String)>, IssueError> {
    let bad = |why: &str| IssueError::Subject(s.to_owned(), why.to_owned());
    let mut pairs = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE pairs separated by commas"))?;
        let attr = AttrType::from_name(k.trim())
            .ok_or_else(|| bad(&format!("unknown attribute {k:?} (CN, O, OU, C, ST, L)")))?;
        let v = v.trim();
        if v.is_empty() || v.chars().any(char::is_control) {
            return Err(bad(&format!("{k} is empty or has control characters")));
        }
        pairs.push((attr, v.to_owned()));
    }
    if !pairs.iter().any(|(a, _)| *a == AttrType::Cn) {
        return Err(bad("a CN is required"));
    }
    pairs.reverse();
    Ok(pairs)
}

fn dn_entry(attr: &AttrType, value: &str) -> Result<(DnType, DnValue), String> {
    let printable = |v: &str| {
        PrintableString::try_from(v)
            .map(DnValue::PrintableString)
            .map_err(|_| format!("{v:?} is not a PrintableString"))
    };
    Ok(match attr {
        AttrType::C => {
            if value.len() != 2 {
                return Err(format!(
                    "C must be a two-letter country code, got {value:?}"
                ));
            }
            (DnType::CountryName, printable(value)?)
        }
        AttrType::St => (
            DnType::StateOrProvinceName,
            DnValue::Utf8String(value.into()),
        ),
        AttrType::L => (DnType::LocalityName, DnValue::Utf8String(value.into())),
        AttrType::O => (DnType::OrganizationName, DnValue::Utf8String(value.into())),
        AttrType::Ou => (
            DnType::OrganizationalUnitName,
            DnValue::Utf8String(value.into()),
        ),
        AttrType::Cn => (DnType::CommonName, DnValue::Utf8String(value.into())),
        AttrType::SerialNumber => (DnType::CustomDnType(vec![2, 5, 4, 5]), printable(value)?),
        AttrType::Other(oid) => return Err(format!("attribute {oid} cannot be issued")),
    })
}

/// Every field comes from the decision; nothing is copied from the CSR.
fn leaf_params(d: &Decision) -> Result<CertificateParams, IssueError> {
    let mut p = CertificateParams::default();
    p.serial_number = Some(SerialNumber::from_slice(&d.serial));
    p.not_before = d.not_before;
    p.not_after = d.not_after;
    let mut dn = DistinguishedName::new();
    for (attr, value) in &d.subject {
        let (t, v) = dn_entry(attr, value).map_err(IssueError::Build)?;
        dn.push(t, v);
    }
    p.distinguished_name = dn;
    for name in &d.dns_names {
        let ia5 =
            Ia5String::try_from(name.as_str()).map_err(|e| IssueError::Build(e.to_string()))?;
        p.subject_alt_names.push(SanType::DnsName(ia5));
    }
    p.subject_alt_names
        .extend(d.ip_addresses.iter().map(|ip| SanType::IpAddress(*ip)));
    for (names, uri) in [(&d.emails, false), (&d.uris, true)] {
        for name in names {
            let ia5 =
                Ia5String::try_from(name.as_str()).map_err(|e| IssueError::Build(e.to_string()))?;
            p.subject_alt_names.push(if uri {
                SanType::URI(ia5)
            } else {
                SanType::Rfc822Name(ia5)
            });
        }
    }
    p.is_ca = match &d.ca {
        None => IsCa::ExplicitNoCa,
        Some(ca) => {
            let subtrees = |dns: &[String], ip: &[String]| {
                dns.iter()
                    .map(|n| GeneralSubtree::DnsName(n.clone()))
                    .chain(ip.iter().filter_map(|r| Cidr::parse(r)).map(|c| {
                        GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(c.addr, c.prefix))
                    }))
                    .collect::<Vec<_>>()
            };
            let permitted = subtrees(&ca.permitted_dns, &ca.permitted_ip);
            let excluded = subtrees(&ca.excluded_dns, &[]);
            if !permitted.is_empty() || !excluded.is_empty() {
                p.name_constraints = Some(NameConstraints {
                    permitted_subtrees: permitted,
                    excluded_subtrees: excluded,
                });
            }
            IsCa::Ca(BasicConstraints::Constrained(ca.path_len))
        }
    };
    p.key_usages = d
        .key_usage
        .iter()
        .map(|u| match u {
            KeyUsage::DigitalSignature => KeyUsagePurpose::DigitalSignature,
            KeyUsage::KeyEncipherment => KeyUsagePurpose::KeyEncipherment,
            KeyUsage::KeyAgreement => KeyUsagePurpose::KeyAgreement,
            KeyUsage::ContentCommitment => KeyUsagePurpose::ContentCommitment,
            KeyUsage::KeyCertSign => KeyUsagePurpose::KeyCertSign,
            KeyUsage::CrlSign => KeyUsagePurpose::CrlSign,
        })
        .collect();
    p.extended_key_usages = d
        .extended_key_usage
        .iter()
        .map(|e| match e {
            ExtKeyUsage::ServerAuth => ExtendedKeyUsagePurpose::ServerAuth,
            ExtKeyUsage::ClientAuth => ExtendedKeyUsagePurpose::ClientAuth,
        })
        .collect();
    p.crl_distribution_points = d
        .crl_distribution_point
        .iter()
        .map(|uri| rcgen::CrlDistributionPoint {
            uris: vec![uri.clone()],
        })
        .collect();
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_subject_is_rfc_4514_and_prints_back_as_typed() {
        let pairs = subject_pairs("CN=Example Root CA,O=Example").unwrap();
        assert_eq!(
            pairs,
            [
                (AttrType::O, "Example".to_owned()),
                (AttrType::Cn, "Example Root CA".to_owned())
            ]
        );
        assert_eq!(
            crate::names::rfc4514(&pairs),
            "CN=Example Root CA,O=Example"
        );
    }
}
