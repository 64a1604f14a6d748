//! After signing, before anything is logged as issued or written: is this certificate what we
//! decided, and does its signature verify under the CA key? Pure.

use std::collections::BTreeSet;

use x509_cert::Certificate;
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::SubjectAltName;

use crate::asn1;
use crate::keys::{KeyError, PublicKey};
use crate::policy::Decision;

/// What is wrong with a certificate hsmca just signed (or reads back from its log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not a DER certificate.
    #[error("not a DER X.509 certificate: {0}")]
    Parse(String),
    /// The certificate's key cannot be used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Signature does not verify under the CA public key.
    #[error("signature does not verify under the CA public key")]
    Signature,
    /// The signed TBS differs from the bytes prepared and logged as intent.
    #[error("the signed TBSCertificate differs from the one prepared and logged")]
    TbsChanged,
    /// A field differs from the decision.
    #[error("field {field} is {found}, but {expected} was decided")]
    Field {
        /// Which field.
        field: &'static str,
        /// What was decided.
        expected: String,
        /// What is in the certificate.
        found: String,
    },
}

fn parse(der: &[u8]) -> Result<Certificate, VerifyError> {
    Certificate::from_der(der).map_err(|e| VerifyError::Parse(e.to_string()))
}

/// The signed bytes and signature of a certificate, checked under `issuer`.
pub fn signature(der: &[u8], issuer: &PublicKey) -> Result<(), VerifyError> {
    let cert = parse(der)?;
    let tbs = asn1::first_inner_element(der)
        .ok_or_else(|| VerifyError::Parse("bad outer SEQUENCE".into()))?;
    let sig = cert.signature().as_bytes().ok_or(VerifyError::Signature)?;
    if issuer.verify(tbs, sig) {
        Ok(())
    } else {
        Err(VerifyError::Signature)
    }
}

/// What a log verifier needs of a certificate, from one parse: issuer and subject (DER),
/// the signature, and the key only when the certificate is a CA's (a leaf's key is never
/// needed to check anything after it).
pub struct Parts {
    /// Issuer name, DER.
    pub issuer: Vec<u8>,
    /// Subject name, DER.
    pub subject: Vec<u8>,
    /// The signature bits.
    pub signature: Vec<u8>,
    /// The subject key, for a CA certificate.
    pub ca_key: Option<PublicKey>,
}

/// [`Parts`] of a DER certificate.
pub fn parts(der: &[u8]) -> Result<Parts, VerifyError> {
    let cert = parse(der)?;
    let tbs = cert.tbs_certificate();
    let enc = |n: &x509_cert::name::Name| n.to_der().map_err(|e| VerifyError::Parse(e.to_string()));
    let is_ca = matches!(tbs.get_extension::<x509_cert::ext::pkix::BasicConstraints>(), Ok(Some((_, bc))) if bc.ca);
    Ok(Parts {
        issuer: enc(tbs.issuer())?,
        subject: enc(tbs.subject())?,
        signature: cert
            .signature()
            .as_bytes()
            .ok_or(VerifyError::Signature)?
            .to_vec(),
        ca_key: if is_ca {
            Some(PublicKey::from_spki(tbs.subject_public_key_info())?)
        } else {
            None
        },
    })
}

/// The subject's attributes in certificate order (values that are not UTF-8 shown as such).
fn subject_attrs(tbs: &x509_cert::TbsCertificate) -> Vec<(crate::csr::AttrType, String)> {
    tbs.subject()
        .iter()
        .map(|atv| {
            let value = std::str::from_utf8(atv.value.value())
                .unwrap_or("<non-UTF-8>")
                .to_owned();
            (crate::csr::AttrType::from_oid(&atv.oid), value)
        })
        .collect()
}

/// What the log's index keeps of a certificate, from one parse: its subject (RFC 4514),
/// notAfter (Unix seconds) and whether it is a CA. Cheaper than [`describe`], which the index
/// would otherwise run once per certificate logged.
pub fn index_facts(der: &[u8]) -> Result<(String, i64, bool), VerifyError> {
    let cert = parse(der)?;
    let tbs = cert.tbs_certificate();
    let subject = subject_attrs(tbs);
    let not_after =
        i64::try_from(tbs.validity().not_after.to_unix_duration().as_secs()).unwrap_or(i64::MAX);
    let is_ca = matches!(tbs.get_extension::<x509_cert::ext::pkix::BasicConstraints>(), Ok(Some((_, bc))) if bc.ca);
    Ok((crate::names::rfc4514(&subject), not_after, is_ca))
}

/// The certificate's public key and notAfter.
pub fn key_and_expiry(der: &[u8]) -> Result<(PublicKey, time::OffsetDateTime), VerifyError> {
    let cert = parse(der)?;
    let key = PublicKey::from_spki(cert.tbs_certificate().subject_public_key_info())?;
    let secs = cert
        .tbs_certificate()
        .validity()
        .not_after
        .to_unix_duration()
        .as_secs();
    let not_after =
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
            .map_err(|e| VerifyError::Parse(e.to_string()))?;
    Ok((key, not_after))
}

/// Issuer and subject names (DER), whether basicConstraints says CA, and the public key.
pub fn names(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>, bool, PublicKey), VerifyError> {
    let cert = parse(der)?;
    let tbs = cert.tbs_certificate();
    let enc = |n: &x509_cert::name::Name| n.to_der().map_err(|e| VerifyError::Parse(e.to_string()));
    let is_ca = matches!(tbs.get_extension::<x509_cert::ext::pkix::BasicConstraints>(), Ok(Some((_, bc))) if bc.ca);
    let key = PublicKey::from_spki(tbs.subject_public_key_info())?;
    Ok((enc(tbs.issuer())?, enc(tbs.subject())?, is_ca, key))
}

/// The certificate's subjectAltNames as `DNS:x`, `IP:y`, `email:z`, `URI:u`.
fn san_strings(tbs: &x509_cert::TbsCertificate) -> Vec<String> {
    match tbs.get_extension::<SubjectAltName>() {
        Ok(Some((_, san))) => san
            .0
            .iter()
            .map(|n| crate::csr::san_from(n).to_string())
            .collect(),
        _ => Vec::new(),
    }
}

/// The subjectKeyIdentifier of a certificate, if it has one.
pub fn subject_key_id(der: &[u8]) -> Result<Option<Vec<u8>>, VerifyError> {
    let cert = parse(der)?;
    Ok(
        match cert
            .tbs_certificate()
            .get_extension::<x509_cert::ext::pkix::SubjectKeyIdentifier>()
        {
            Ok(Some((_, ski))) => Some(ski.0.as_bytes().to_vec()),
            _ => None,
        },
    )
}

/// A CRL's issuer name (DER) and signature bits.
pub fn crl_issuer(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), VerifyError> {
    let crl = x509_cert::crl::CertificateList::<x509_cert::certificate::Rfc5280>::from_der(der)
        .map_err(|e| VerifyError::Parse(e.to_string()))?;
    let issuer = crl
        .tbs_cert_list
        .issuer
        .to_der()
        .map_err(|e| VerifyError::Parse(e.to_string()))?;
    let sig = crl
        .signature
        .as_bytes()
        .ok_or(VerifyError::Signature)?
        .to_vec();
    Ok((issuer, sig))
}

/// What a certificate says, for listings and renewals.
#[derive(Debug, Clone)]
pub struct CertFacts {
    /// Serial, hex.
    pub serial: String,
    /// Subject attributes in certificate order.
    pub subject: Vec<(crate::csr::AttrType, String)>,
    /// Subject as one line.
    pub subject_string: String,
    /// subjectAltNames as `DNS:x` / `IP:y` strings.
    pub sans: Vec<String>,
    /// notBefore.
    pub not_before: time::OffsetDateTime,
    /// notAfter.
    pub not_after: time::OffsetDateTime,
    /// Issuer name, DER.
    pub issuer_der: Vec<u8>,
    /// Issuer name, RFC 4514.
    pub issuer_string: String,
    /// Whether basicConstraints says CA.
    pub is_ca: bool,
    /// Subject key.
    pub public_key: PublicKey,
}

/// Reads the facts of a DER certificate.
pub fn describe(der: &[u8]) -> Result<CertFacts, VerifyError> {
    let cert = parse(der)?;
    let tbs = cert.tbs_certificate();
    let (issuer_der, _, is_ca, public_key) = names(der)?;
    let time = |t: &x509_cert::time::Time| {
        time::OffsetDateTime::from_unix_timestamp(
            i64::try_from(t.to_unix_duration().as_secs()).unwrap_or(i64::MAX),
        )
        .map_err(|e| VerifyError::Parse(e.to_string()))
    };
    let subject = subject_attrs(tbs);
    Ok(CertFacts {
        serial: crate::keys::hex(tbs.serial_number().as_bytes()),
        subject_string: crate::names::rfc4514(&subject),
        subject,
        sans: san_strings(tbs),
        not_before: time(&tbs.validity().not_before)?,
        not_after: time(&tbs.validity().not_after)?,
        issuer_der,
        issuer_string: tbs.issuer().to_string(),
        is_ca,
        public_key,
    })
}

/// Checks a freshly self-signed root: its key is `key` and it verifies under itself.
pub fn self_signed(der: &[u8], key: &PublicKey) -> Result<(), VerifyError> {
    let (cert_key, _) = key_and_expiry(der)?;
    if cert_key.spki_der != key.spki_der {
        return Err(VerifyError::Field {
            field: "subjectPublicKeyInfo",
            expected: key.fingerprint(),
            found: cert_key.fingerprint(),
        });
    }
    signature(der, key)
}

/// Checks an issued certificate against the prepared TBS, the CA key and the decision.
///
/// Runs once per certificate on the batch path, so it compares bytes and numbers and only
/// formats strings to explain a mismatch.
pub fn issued(
    der: &[u8],
    prepared_tbs: &[u8],
    issuer: &PublicKey,
    issuer_subject_der: &[u8],
    d: &Decision,
) -> Result<(), VerifyError> {
    let signed_tbs = asn1::first_inner_element(der)
        .ok_or_else(|| VerifyError::Parse("bad outer SEQUENCE".into()))?;
    if signed_tbs != prepared_tbs {
        return Err(VerifyError::TbsChanged);
    }
    let cert = parse(der)?;
    let tbs = cert.tbs_certificate();
    if cert.signature_algorithm() != tbs.signature() {
        return Err(VerifyError::Field {
            field: "signatureAlgorithm",
            expected: tbs.signature().oid.to_string(),
            found: cert.signature_algorithm().oid.to_string(),
        });
    }
    let sig = cert.signature().as_bytes().ok_or(VerifyError::Signature)?;
    if !issuer.verify(signed_tbs, sig) {
        return Err(VerifyError::Signature);
    }
    let mismatch = |field, expected: String, found: String| {
        Err(VerifyError::Field {
            field,
            expected,
            found,
        })
    };
    let serial = tbs.serial_number().as_bytes();
    if serial != d.serial.as_slice() {
        return mismatch(
            "serialNumber",
            crate::keys::hex(&d.serial),
            crate::keys::hex(serial),
        );
    }
    let spki = tbs
        .subject_public_key_info()
        .to_der()
        .map_err(|e| VerifyError::Parse(e.to_string()))?;
    if spki != d.public_key.spki_der {
        return mismatch(
            "subjectPublicKeyInfo",
            d.public_key.fingerprint(),
            crate::keys::sha256_hex(&spki),
        );
    }
    let issuer_name = tbs
        .issuer()
        .to_der()
        .map_err(|e| VerifyError::Parse(e.to_string()))?;
    if issuer_name != issuer_subject_der {
        let expected = x509_cert::name::Name::from_der(issuer_subject_der)
            .map_or_else(|e| e.to_string(), |n| n.to_string());
        return mismatch("issuer (DER)", expected, tbs.issuer().to_string());
    }
    let secs = |t: &x509_cert::time::Time| t.to_unix_duration().as_secs();
    let not_after = secs(&tbs.validity().not_after);
    if i64::try_from(not_after).ok() != Some(d.not_after.unix_timestamp()) {
        let expected = d.not_after.unix_timestamp().to_string();
        return mismatch("notAfter", expected, not_after.to_string());
    }
    let not_before = secs(&tbs.validity().not_before);
    if i64::try_from(not_before).ok() != Some(d.not_before.unix_timestamp()) {
        let expected = d.not_before.unix_timestamp().to_string();
        return mismatch("notBefore", expected, not_before.to_string());
    }
    let subject: Vec<&[u8]> = tbs.subject().iter().map(|atv| atv.value.value()).collect();
    if !subject
        .iter()
        .copied()
        .eq(d.subject.iter().map(|(_, v)| v.as_bytes()))
    {
        let decided: Vec<&str> = d.subject.iter().map(|(_, v)| v.as_str()).collect();
        let found: Vec<String> = subject
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        return mismatch("subject", decided.join(", "), found.join(", "));
    }
    let sans: BTreeSet<String> = san_strings(tbs).into_iter().collect();
    let decided: BTreeSet<String> = d.san_strings().into_iter().collect();
    if sans != decided {
        return mismatch(
            "subjectAltName",
            format!("{decided:?}"),
            format!("{sans:?}"),
        );
    }
    Ok(())
}
