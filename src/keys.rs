//! Key types hsmca knows, their SubjectPublicKeyInfo, and checking signatures made by them.
//!
//! One table maps a key type to everything that depends on it: its name in profiles and on the
//! command line, the signature algorithm a CA key of that type uses, and how ring verifies it.

use std::fmt;

use x509_cert::der::{Decode, Encode};
use x509_cert::spki::{ObjectIdentifier, SubjectPublicKeyInfoOwned};

use crate::asn1;

/// rsaEncryption.
pub const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// id-ecPublicKey.
pub const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// id-Ed25519.
pub const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
/// secp256r1 (P-256).
pub const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
/// secp384r1 (P-384).
pub const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");

/// A public key algorithm and size, as named in profiles and on the command line.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// RSA with a 2048-bit modulus.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// RSA with a 3072-bit modulus.
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    /// RSA with a 4096-bit modulus.
    #[serde(rename = "rsa-4096")]
    Rsa4096,
    /// ECDSA on NIST P-256.
    EcdsaP256,
    /// ECDSA on NIST P-384.
    EcdsaP384,
    /// Ed25519 (RFC 8410).
    Ed25519,
}

impl KeyType {
    /// Every key type, in the order shown to users.
    pub const ALL: [Self; 6] = [
        Self::Rsa2048,
        Self::Rsa3072,
        Self::Rsa4096,
        Self::EcdsaP256,
        Self::EcdsaP384,
        Self::Ed25519,
    ];

    /// The name used in profiles, flags and the log.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rsa2048 => "rsa-2048",
            Self::Rsa3072 => "rsa-3072",
            Self::Rsa4096 => "rsa-4096",
            Self::EcdsaP256 => "ecdsa-p256",
            Self::EcdsaP384 => "ecdsa-p384",
            Self::Ed25519 => "ed25519",
        }
    }

    /// Parses a name as written by [`KeyType::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether this is an RSA key (keyEncipherment is only meaningful for RSA, RFC 8813).
    pub fn is_rsa(self) -> bool {
        matches!(self, Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096)
    }

    /// RSA modulus size in bits, if RSA.
    pub fn rsa_bits(self) -> Option<u64> {
        match self {
            Self::Rsa2048 => Some(2048),
            Self::Rsa3072 => Some(3072),
            Self::Rsa4096 => Some(4096),
            _ => None,
        }
    }

    /// The signature algorithm a CA key of this type signs certificates with. One choice per
    /// key type keeps SPKI and signature AlgorithmIdentifiers consistent (rcgen uses one value
    /// for both). ECDSA pairs each curve with its matching hash (P-384 with SHA-384).
    pub fn rcgen_algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => &rcgen::PKCS_RSA_SHA256,
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }

    /// How ring verifies a signature made by a CA key of this type (see `rcgen_algorithm`).
    fn ring_verification(self) -> &'static dyn ring::signature::VerificationAlgorithm {
        match self {
            Self::Rsa2048 | Self::Rsa3072 | Self::Rsa4096 => {
                &ring::signature::RSA_PKCS1_2048_8192_SHA256
            }
            Self::EcdsaP256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
            Self::EcdsaP384 => &ring::signature::ECDSA_P384_SHA384_ASN1,
            Self::Ed25519 => &ring::signature::ED25519,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a SubjectPublicKeyInfo is not one hsmca accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not DER, or trailing bytes.
    #[error("public key is not a valid DER SubjectPublicKeyInfo")]
    Malformed,
    /// An algorithm hsmca does not accept (DSA, RSA-PSS keys, X25519, ...).
    #[error("public key algorithm {0} is not supported (RSA, ECDSA P-256/P-384 and Ed25519 are)")]
    UnsupportedAlgorithm(String),
    /// An EC key on a curve other than P-256 or P-384.
    #[error("elliptic curve {0} is not supported (P-256 and P-384 are)")]
    UnsupportedCurve(String),
    /// RSA with a modulus size that is not 2048, 3072 or 4096 bits.
    #[error("RSA key of {0} bits is not supported (2048, 3072 or 4096 bits are)")]
    UnsupportedRsaSize(usize),
}

/// A public key as it appears in certificates: its type, its DER SPKI, and the bare key bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Algorithm and size.
    pub key_type: KeyType,
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// The subjectPublicKey BIT STRING contents (RSAPublicKey DER, EC point, Ed25519 bytes).
    pub raw: Vec<u8>,
}

impl PublicKey {
    /// Classifies a DER SPKI, refusing anything outside [`KeyType`].
    pub fn from_spki_der(spki_der: &[u8]) -> Result<Self, KeyError> {
        let spki =
            SubjectPublicKeyInfoOwned::from_der(spki_der).map_err(|_| KeyError::Malformed)?;
        Self::from_spki(&spki)
    }

    /// Classifies a parsed SPKI.
    pub fn from_spki(spki: &SubjectPublicKeyInfoOwned) -> Result<Self, KeyError> {
        let raw = spki
            .subject_public_key
            .as_bytes()
            .ok_or(KeyError::Malformed)?
            .to_vec();
        let oid = spki.algorithm.oid;
        let key_type = if oid == OID_RSA {
            let bits = asn1::rsa_modulus_bits(&raw).ok_or(KeyError::Malformed)?;
            match bits {
                2048 => KeyType::Rsa2048,
                3072 => KeyType::Rsa3072,
                4096 => KeyType::Rsa4096,
                other => return Err(KeyError::UnsupportedRsaSize(other)),
            }
        } else if oid == OID_EC {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
                .ok_or_else(|| {
                    KeyError::UnsupportedCurve("(missing or not a named curve)".into())
                })?;
            let (kt, point_len) = if curve == OID_P256 {
                (KeyType::EcdsaP256, 65)
            } else if curve == OID_P384 {
                (KeyType::EcdsaP384, 97)
            } else {
                return Err(KeyError::UnsupportedCurve(curve.to_string()));
            };
            if raw.len() != point_len || raw[0] != 0x04 {
                return Err(KeyError::Malformed);
            }
            kt
        } else if oid == OID_ED25519 {
            if spki.algorithm.parameters.is_some() || raw.len() != 32 {
                return Err(KeyError::Malformed);
            }
            KeyType::Ed25519
        } else {
            return Err(KeyError::UnsupportedAlgorithm(oid.to_string()));
        };
        let spki_der = spki.to_der().map_err(|_| KeyError::Malformed)?;
        Ok(Self {
            key_type,
            spki_der,
            raw,
        })
    }

    /// Checks a signature this key made as a CA (algorithm per [`KeyType::rcgen_algorithm`]).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(self.key_type.ring_verification(), &self.raw)
            .verify(message, signature)
            .is_ok()
    }

    /// SHA-256 of the DER SPKI, lowercase hex: a stable fingerprint for messages and the log.
    pub fn fingerprint(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, &self.spki_der).as_ref())
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    // Table lookup, not `format!`: serials and digests are hexed several times per certificate.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// SHA-256, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Builds a DER SPKI from an algorithm OID (with optional parameter OID) and key bits.
pub fn spki_der(
    alg: ObjectIdentifier,
    param: Option<ObjectIdentifier>,
    key: &[u8],
) -> Option<Vec<u8>> {
    use x509_cert::der::asn1::{Any, BitString};
    use x509_cert::spki::AlgorithmIdentifierOwned;
    let parameters = match (alg == OID_RSA, param) {
        (true, _) => Some(Any::null()),
        (false, Some(p)) => Some(Any::encode_from(&p).ok()?),
        (false, None) => None,
    };
    SubjectPublicKeyInfoOwned {
        algorithm: AlgorithmIdentifierOwned {
            oid: alg,
            parameters,
        },
        subject_public_key: BitString::from_bytes(key).ok()?,
    }
    .to_der()
    .ok()
}
