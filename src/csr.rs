//! Reading a PKCS#10 CSR and proving its signer holds the private key.
//!
//! Everything a CSR says is parsed here with x509-cert into plain values ([`VerifiedCsr`]) that
//! the policy can judge; nothing from the CSR is passed on to the certificate builder unjudged.
//! The signature is checked over the original `CertificationRequestInfo` bytes with an explicit
//! whitelist of (signature algorithm, key type) pairs. rcgen's own CSR reader is not used: it
//! derives the key type from the signature algorithm (rcgen#448) and copies requested extensions.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use x509_cert::der::asn1::{Ia5String, ObjectIdentifier};
use x509_cert::der::{Decode, Encode, Tag, Tagged};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
};
use x509_cert::request::{CertReq, ExtensionReq};

use crate::asn1;
use crate::keys::{self, KeyError, KeyType, PublicKey};

/// CSRs larger than this are refused before parsing: no legitimate CSR comes near it.
pub const MAX_CSR_BYTES: usize = 64 * 1024;

const OID_EXTENSION_REQ: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.14");
const OID_SAN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.17");
const OID_KU: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const OID_EKU: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const OID_BC: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const OID_SKI: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");

/// Why a CSR could not be read or its proof of possession failed. These are problems with the
/// file itself; policy refusals are [`crate::policy::Refusal`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// The file is larger than [`MAX_CSR_BYTES`].
    #[error("file is {0} bytes; a CSR is at most {MAX_CSR_BYTES} bytes")]
    TooLarge(usize),
    /// PEM with another label, e.g. a certificate given instead of a CSR.
    #[error("PEM block is {0:?}, not \"CERTIFICATE REQUEST\"")]
    WrongPemLabel(String),
    /// Neither a PEM CSR nor a DER CSR.
    #[error("not a PKCS#10 CSR (PEM or DER): {0}")]
    Malformed(String),
    /// The CSR's version is not v1 (0).
    #[error("CSR version must be v1 (0)")]
    Version,
    /// A subject attribute with a string type hsmca does not read.
    #[error(
        "subject attribute {attribute} uses ASN.1 type {tag}; UTF8String, PrintableString or IA5String are accepted"
    )]
    SubjectEncoding {
        /// Attribute name or OID.
        attribute: String,
        /// The ASN.1 tag found.
        tag: String,
    },
    /// The public key is weak or of an unsupported type.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// MD5 or SHA-1 signatures are refused outright.
    #[error("CSR is signed with {0}, a broken hash; re-create it with SHA-256 or better")]
    WeakHash(&'static str),
    /// A signature algorithm outside the whitelist, or one that does not fit the key.
    #[error("CSR signature algorithm {algorithm} is not accepted for a {key} key")]
    UnsupportedSignature {
        /// OID or name of the signature algorithm.
        algorithm: String,
        /// The key type in the CSR.
        key: KeyType,
    },
    /// The signature does not verify: the CSR was altered or signed by another key.
    #[error(
        "CSR signature does not verify with the CSR's own public key (altered, or signed by another key)"
    )]
    BadSignature,
}

impl CsrError {
    /// Stable rule id, as reported with policy refusals.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "csr.size",
            Self::WrongPemLabel(_) => "csr.pem_label",
            Self::Malformed(_) => "csr.malformed",
            Self::Version => "csr.version",
            Self::SubjectEncoding { .. } => "csr.subject_encoding",
            Self::Key(KeyError::Malformed) => "key.malformed",
            Self::Key(KeyError::UnsupportedAlgorithm(_)) => "key.algorithm",
            Self::Key(KeyError::UnsupportedCurve(_)) => "key.curve",
            Self::Key(KeyError::UnsupportedRsaSize(_)) => "key.rsa_size",
            Self::WeakHash(_) => "csr.signature.hash",
            Self::UnsupportedSignature { .. } => "csr.signature.algorithm",
            Self::BadSignature => "csr.signature",
        }
    }
}

/// A subject attribute type, by its usual short name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttrType {
    /// countryName (2.5.4.6)
    C,
    /// stateOrProvinceName (2.5.4.8)
    St,
    /// localityName (2.5.4.7)
    L,
    /// organizationName (2.5.4.10)
    O,
    /// organizationalUnitName (2.5.4.11)
    Ou,
    /// commonName (2.5.4.3)
    Cn,
    /// serialNumber (2.5.4.5)
    SerialNumber,
    /// Anything else, by dotted OID (always refused by policy).
    Other(String),
}

impl AttrType {
    const KNOWN: [(Self, &'static str, &'static str); 7] = [
        (Self::C, "C", "2.5.4.6"),
        (Self::St, "ST", "2.5.4.8"),
        (Self::L, "L", "2.5.4.7"),
        (Self::O, "O", "2.5.4.10"),
        (Self::Ou, "OU", "2.5.4.11"),
        (Self::Cn, "CN", "2.5.4.3"),
        (Self::SerialNumber, "serialNumber", "2.5.4.5"),
    ];

    pub(crate) fn from_oid(oid: &ObjectIdentifier) -> Self {
        let dotted = oid.to_string();
        Self::KNOWN
            .iter()
            .find(|(_, _, o)| *o == dotted)
            .map_or(Self::Other(dotted), |(t, _, _)| t.clone())
    }

    /// Parses a short name as used in profiles (`CN`, `O`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::KNOWN
            .iter()
            .find(|(_, n, _)| *n == name)
            .map(|(t, _, _)| t.clone())
    }

    /// The short name (`CN`) or dotted OID.
    pub fn name(&self) -> &str {
        match self {
            Self::Other(oid) => oid,
            known => Self::KNOWN
                .iter()
                .find(|(t, _, _)| t == known)
                .map_or("?", |(_, n, _)| n),
        }
    }
}

impl fmt::Display for AttrType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A subjectAltName entry as requested.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum San {
    /// dNSName
    Dns(String),
    /// iPAddress
    Ip(IpAddr),
    /// rfc822Name
    Email(String),
    /// uniformResourceIdentifier
    Uri(String),
    /// Any other GeneralName form, or an iPAddress of bad length.
    Other(String),
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(d) => write!(f, "DNS:{d}"),
            Self::Ip(ip) => write!(f, "IP:{ip}"),
            Self::Email(e) => write!(f, "email:{e}"),
            Self::Uri(u) => write!(f, "URI:{u}"),
            Self::Other(o) => write!(f, "{o}"),
        }
    }
}

/// An extension the CSR asks for, decoded where hsmca knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestedExtension {
    /// subjectAltName
    SubjectAltName {
        /// Marked critical.
        critical: bool,
    },
    /// keyUsage, by the names used in profiles.
    KeyUsage {
        /// Marked critical.
        critical: bool,
        /// Requested usages.
        usages: Vec<&'static str>,
    },
    /// extKeyUsage, by dotted OID.
    ExtendedKeyUsage {
        /// Marked critical.
        critical: bool,
        /// Requested purposes.
        purposes: Vec<String>,
    },
    /// basicConstraints.
    BasicConstraints {
        /// Marked critical.
        critical: bool,
        /// cA flag.
        ca: bool,
    },
    /// subjectKeyIdentifier (hsmca computes its own).
    SubjectKeyIdentifier {
        /// Marked critical.
        critical: bool,
    },
    /// Anything else, by dotted OID.
    Unknown {
        /// OID.
        oid: String,
        /// Marked critical.
        critical: bool,
    },
}

/// A CSR whose structure was read and whose signature verified with its own key. Only
/// [`parse`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    /// SHA-256 of the CSR's DER, lowercase hex: its identity in the log.
    pub sha256: String,
    /// The subject key, taken from the SubjectPublicKeyInfo (never inferred from the signature).
    pub public_key: PublicKey,
    /// Subject attributes in the order the CSR lists them.
    pub subject: Vec<(AttrType, String)>,
    /// Requested subjectAltNames, in CSR order.
    pub sans: Vec<San>,
    /// Every requested extension.
    pub extensions: Vec<RequestedExtension>,
    /// CSR attributes other than extensionRequest (e.g. challengePassword), by dotted OID.
    pub other_attributes: Vec<String>,
    /// Name of the CSR's signature algorithm, for reports.
    pub signature_algorithm: &'static str,
    /// The CSR's DER.
    pub der: Vec<u8>,
}

/// Reads a CSR file (PEM or DER) named on the command line, through [`crate::input`]: a
/// regular file of at most [`crate::input::CSR_CAP`] bytes, never a symlink or FIFO.
pub fn load(path: &Path) -> Result<VerifiedCsr, CsrLoadError> {
    let bytes = crate::input::read_file(path, crate::input::CSR_CAP).map_err(|e| match e {
        // Too large is the CSR's own rule (`csr.size`), as for bytes handed to `parse`.
        crate::input::InputError::Size { size, .. } => CsrLoadError::Csr(CsrError::TooLarge(
            usize::try_from(size).unwrap_or(usize::MAX),
        )),
        e => CsrLoadError::Read(e),
    })?;
    parse(&bytes).map_err(CsrLoadError::Csr)
}

/// Failure to load a CSR file: unreadable or refused (rule `input.*`), or not an acceptable CSR.
#[derive(Debug, thiserror::Error)]
pub enum CsrLoadError {
    /// The file could not be read, or is not a regular file of a CSR's size.
    #[error(transparent)]
    Read(crate::input::InputError),
    /// The contents are not an acceptable CSR.
    #[error(transparent)]
    Csr(CsrError),
}

/// The DER of a PEM or DER CSR, without parsing or verifying it: the CSR's identity in the log
/// (its SHA-256) for lookups that must not cost a signature check.
pub fn der_of(input: &[u8]) -> Option<Vec<u8>> {
    if input.trim_ascii_start().starts_with(b"-----BEGIN") {
        x509_cert::der::pem::decode_vec(input.trim_ascii())
            .ok()
            .map(|(_, der)| der)
    } else {
        Some(input.to_vec())
    }
}

/// Parses and verifies a CSR from PEM or DER bytes. Pure.
pub fn parse(input: &[u8]) -> Result<VerifiedCsr, CsrError> {
    if input.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(input.len()));
    }
    let der = if input.starts_with(b"-----BEGIN")
        || input.trim_ascii_start().starts_with(b"-----BEGIN")
    {
        let (label, der) = x509_cert::der::pem::decode_vec(input.trim_ascii())
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if label != "CERTIFICATE REQUEST" && label != "NEW CERTIFICATE REQUEST" {
            return Err(CsrError::WrongPemLabel(label.to_owned()));
        }
        der
    } else {
        input.to_vec()
    };
    let req = CertReq::from_der(&der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if req.info.version != x509_cert::request::Version::V1 {
        return Err(CsrError::Version);
    }
    let cri = asn1::first_inner_element(&der)
        .ok_or_else(|| CsrError::Malformed("bad outer SEQUENCE".into()))?;

    let public_key = PublicKey::from_spki(&req.info.public_key)?;
    let (verification, signature_algorithm) = signature_verification(&req, public_key.key_type)?;
    let signature = req.signature.as_bytes().ok_or(CsrError::BadSignature)?;
    ring::signature::UnparsedPublicKey::new(verification, &public_key.raw)
        .verify(cri, signature)
        .map_err(|_| CsrError::BadSignature)?;

    let mut subject = Vec::new();
    for atv in req.info.subject.iter() {
        let attr = AttrType::from_oid(&atv.oid);
        let value = directory_string(&atv.value).ok_or_else(|| CsrError::SubjectEncoding {
            attribute: attr.to_string(),
            tag: format!("{:?}", atv.value.tag()),
        })?;
        subject.push((attr, value));
    }

    let mut sans = Vec::new();
    let mut extensions = Vec::new();
    let mut other_attributes = Vec::new();
    for attr in req.info.attributes.iter() {
        if attr.oid != OID_EXTENSION_REQ {
            other_attributes.push(attr.oid.to_string());
            continue;
        }
        for value in attr.values.iter() {
            let bytes = value
                .to_der()
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
            let req_exts = ExtensionReq::from_der(&bytes)
                .map_err(|e| CsrError::Malformed(format!("extensionRequest: {e}")))?;
            for ext in req_exts.0 {
                extensions.push(decode_extension(&ext, &mut sans)?);
            }
        }
    }

    Ok(VerifiedCsr {
        sha256: keys::sha256_hex(&der),
        public_key,
        subject,
        sans,
        extensions,
        other_attributes,
        signature_algorithm,
        der,
    })
}

fn decode_extension(
    ext: &x509_cert::ext::Extension,
    sans: &mut Vec<San>,
) -> Result<RequestedExtension, CsrError> {
    let critical = ext.critical;
    let value = ext.extn_value.as_bytes();
    let bad = |what: &str, e: x509_cert::der::Error| {
        CsrError::Malformed(format!("requested {what}: {e}"))
    };
    Ok(if ext.extn_id == OID_SAN {
        let names = SubjectAltName::from_der(value).map_err(|e| bad("subjectAltName", e))?;
        sans.extend(names.0.iter().map(san_from));
        RequestedExtension::SubjectAltName { critical }
    } else if ext.extn_id == OID_KU {
        let ku = KeyUsage::from_der(value).map_err(|e| bad("keyUsage", e))?;
        let usages = ku.0.into_iter().map(key_usage_name).collect();
        RequestedExtension::KeyUsage { critical, usages }
    } else if ext.extn_id == OID_EKU {
        let eku = ExtendedKeyUsage::from_der(value).map_err(|e| bad("extKeyUsage", e))?;
        RequestedExtension::ExtendedKeyUsage {
            critical,
            purposes: eku.0.iter().map(|o| o.to_string()).collect(),
        }
    } else if ext.extn_id == OID_BC {
        let bc = BasicConstraints::from_der(value).map_err(|e| bad("basicConstraints", e))?;
        RequestedExtension::BasicConstraints {
            critical,
            ca: bc.ca,
        }
    } else if ext.extn_id == OID_SKI {
        RequestedExtension::SubjectKeyIdentifier { critical }
    } else {
        RequestedExtension::Unknown {
            oid: ext.extn_id.to_string(),
            critical,
        }
    })
}

/// The profile-language name of a keyUsage bit.
pub fn key_usage_name(bit: KeyUsages) -> &'static str {
    match bit {
        KeyUsages::DigitalSignature => "digital_signature",
        KeyUsages::NonRepudiation => "content_commitment",
        KeyUsages::KeyEncipherment => "key_encipherment",
        KeyUsages::DataEncipherment => "data_encipherment",
        KeyUsages::KeyAgreement => "key_agreement",
        KeyUsages::KeyCertSign => "key_cert_sign",
        KeyUsages::CRLSign => "crl_sign",
        KeyUsages::EncipherOnly => "encipher_only",
        KeyUsages::DecipherOnly => "decipher_only",
    }
}

fn ia5(s: &Ia5String) -> String {
    s.to_string()
}

pub(crate) fn san_from(name: &GeneralName) -> San {
    match name {
        GeneralName::DnsName(d) => San::Dns(ia5(d)),
        GeneralName::Rfc822Name(e) => San::Email(ia5(e)),
        GeneralName::UniformResourceIdentifier(u) => San::Uri(ia5(u)),
        GeneralName::IpAddress(o) => match o.as_bytes().len() {
            4 => {
                let b: [u8; 4] = o.as_bytes().try_into().unwrap_or_default();
                San::Ip(IpAddr::from(b))
            }
            16 => {
                let b: [u8; 16] = o.as_bytes().try_into().unwrap_or_default();
                San::Ip(IpAddr::from(b))
            }
            n => San::Other(format!("IP address of {n} bytes")),
        },
        GeneralName::OtherName(o) => San::Other(format!("otherName:{}", o.type_id)),
        GeneralName::DirectoryName(_) => San::Other("dirName".into()),
        GeneralName::EdiPartyName(_) => San::Other("ediPartyName".into()),
        GeneralName::RegisteredId(oid) => San::Other(format!("registeredID:{oid}")),
    }
}

fn directory_string(value: &x509_cert::der::Any) -> Option<String> {
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String => {
            std::str::from_utf8(value.value()).ok().map(str::to_owned)
        }
        _ => None,
    }
}

type Verification = &'static dyn ring::signature::VerificationAlgorithm;

/// The whitelist: which (signature algorithm, key type) pairs are accepted, and how ring checks
/// each. Anything not listed is refused, and broken hashes get their own error.
fn signature_verification(
    req: &CertReq,
    key: KeyType,
) -> Result<(Verification, &'static str), CsrError> {
    use ring::signature as sig;
    let oid = req.algorithm.oid.to_string();
    let params_der = req
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.to_der().ok());
    let unsupported = || CsrError::UnsupportedSignature {
        algorithm: oid.clone(),
        key,
    };
    let rsa = key.is_rsa();
    let absent_or_null = params_der.as_deref().is_none_or(|p| p == [0x05, 0x00]);
    let absent = params_der.is_none();
    let pick = match oid.as_str() {
        "1.2.840.113549.1.1.4" => return Err(CsrError::WeakHash("md5WithRSAEncryption")),
        "1.2.840.113549.1.1.5" => return Err(CsrError::WeakHash("sha1WithRSAEncryption")),
        "1.2.840.10045.4.1" => return Err(CsrError::WeakHash("ecdsa-with-SHA1")),
        "1.2.840.10040.4.3" => return Err(CsrError::WeakHash("dsa-with-SHA1")),
        "1.2.840.113549.1.1.11" if rsa && absent_or_null => (
            &sig::RSA_PKCS1_2048_8192_SHA256 as Verification,
            "sha256WithRSAEncryption",
        ),
        "1.2.840.113549.1.1.12" if rsa && absent_or_null => (
            &sig::RSA_PKCS1_2048_8192_SHA384 as Verification,
            "sha384WithRSAEncryption",
        ),
        "1.2.840.113549.1.1.13" if rsa && absent_or_null => (
            &sig::RSA_PKCS1_2048_8192_SHA512 as Verification,
            "sha512WithRSAEncryption",
        ),
        "1.2.840.113549.1.1.10" if rsa => {
            let p = params_der.as_deref().ok_or_else(unsupported)?;
            if pss_params(1, 0x20).iter().any(|c| c == p) {
                (
                    &sig::RSA_PSS_2048_8192_SHA256 as Verification,
                    "RSASSA-PSS-SHA256",
                )
            } else if pss_params(2, 0x30).iter().any(|c| c == p) {
                (
                    &sig::RSA_PSS_2048_8192_SHA384 as Verification,
                    "RSASSA-PSS-SHA384",
                )
            } else if pss_params(3, 0x40).iter().any(|c| c == p) {
                (
                    &sig::RSA_PSS_2048_8192_SHA512 as Verification,
                    "RSASSA-PSS-SHA512",
                )
            } else {
                return Err(CsrError::UnsupportedSignature {
                    algorithm: "RSASSA-PSS with a salt length other than the hash length (use -sigopt rsa_pss_saltlen:digest)".into(),
                    key,
                });
            }
        }
        "1.2.840.10045.4.3.2" if absent && key == KeyType::EcdsaP256 => (
            &sig::ECDSA_P256_SHA256_ASN1 as Verification,
            "ecdsa-with-SHA256",
        ),
        "1.2.840.10045.4.3.3" if absent && key == KeyType::EcdsaP256 => (
            &sig::ECDSA_P256_SHA384_ASN1 as Verification,
            "ecdsa-with-SHA384",
        ),
        "1.2.840.10045.4.3.2" if absent && key == KeyType::EcdsaP384 => (
            &sig::ECDSA_P384_SHA256_ASN1 as Verification,
            "ecdsa-with-SHA256",
        ),
        "1.2.840.10045.4.3.3" if absent && key == KeyType::EcdsaP384 => (
            &sig::ECDSA_P384_SHA384_ASN1 as Verification,
            "ecdsa-with-SHA384",
        ),
        "1.3.101.112" if absent && key == KeyType::Ed25519 => {
            (&sig::ED25519 as Verification, "Ed25519")
        }
        _ => return Err(unsupported()),
    };
    Ok(pick)
}

/// DER of RSASSA-PSS-params with hash SHA-2 (`hash` = 1, 2, 3 for SHA-256/384/512), MGF1 with
/// the same hash, and salt = hash length; with and without NULL hash parameters, since encoders
/// differ.
fn pss_params(hash: u8, salt: u8) -> [Vec<u8>; 2] {
    let hash_oid = [
        0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, hash,
    ];
    let make = |with_null: bool| {
        let mut alg = hash_oid.to_vec();
        if with_null {
            alg.extend_from_slice(&[0x05, 0x00]);
        }
        let alg = tlv(0x30, &alg);
        let mut mgf = vec![
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08,
        ];
        mgf.extend_from_slice(&alg);
        let mut body = tlv(0xa0, &alg);
        body.extend(tlv(0xa1, &tlv(0x30, &mgf)));
        body.extend(tlv(0xa2, &[0x02, 0x01, salt]));
        tlv(0x30, &body)
    };
    [make(true), make(false)]
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag, u8::try_from(content.len()).unwrap_or(0)];
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_with(key: &rcgen::KeyPair, f: impl FnOnce(&mut rcgen::CertificateParams)) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(vec!["node1.example".to_string()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:node1");
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:nodes");
        f(&mut p);
        p.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_subject_sans_and_key_from_a_good_csr() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = parse(&csr_with(&key, |_| {})).unwrap();
        assert_eq!(csr.public_key.key_type, KeyType::EcdsaP256);
        assert!(
            csr.subject
                .contains(&(AttrType::Cn, "system:node:node1".into()))
        );
        assert!(csr.subject.contains(&(AttrType::O, "system:nodes".into())));
        assert_eq!(csr.sans, vec![San::Dns("node1.example".into())]);
    }

    #[test]
    fn tampered_csr_fails_proof_of_possession() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut der = csr_with(&key, |_| {});
        let at = der.windows(5).position(|w| w == b"node1").unwrap();
        der[at + 4] = b'2';
        assert_eq!(parse(&der).unwrap_err(), CsrError::BadSignature);
    }

    #[test]
    fn requested_ca_and_unknown_extensions_are_reported_not_dropped() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let der = csr_with(&key, |p| {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[1, 2, 3, 4],
                    vec![5, 0],
                ));
        });
        let csr = parse(&der).unwrap();
        assert!(
            csr.extensions
                .iter()
                .any(|e| matches!(e, RequestedExtension::BasicConstraints { ca: true, .. }))
        );
        assert!(
            csr.extensions
                .iter()
                .any(|e| matches!(e, RequestedExtension::Unknown { oid, .. } if oid == "1.2.3.4"))
        );
    }

    #[test]
    fn certificate_and_garbage_are_not_csrs() {
        assert!(matches!(
            parse(b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n"),
            Err(CsrError::WrongPemLabel(_))
        ));
        assert!(matches!(
            parse(b"\x30\x03\x02\x01"),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(
            parse(&vec![0u8; MAX_CSR_BYTES + 1]),
            Err(CsrError::TooLarge(_))
        ));
    }
}
