//! The few DER walks no crate gives us directly: slicing a signed structure into the exact bytes
//! that were signed (a CSR's `CertificationRequestInfo`, a certificate's `TBSCertificate`).
//!
//! Re-encoding a parsed structure would hide non-canonical input, so signatures are always
//! checked over the original bytes. Pure functions, no allocation.

/// One DER element: where its header starts, how long the header is, how long its content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv {
    /// The tag byte (only low-tag-number form is accepted).
    pub tag: u8,
    /// Offset of the tag byte in the input.
    pub start: usize,
    /// Length of tag plus length octets.
    pub header_len: usize,
    /// Length of the content octets.
    pub content_len: usize,
}

impl Tlv {
    /// Offset just past this element.
    pub fn end(&self) -> usize {
        self.start + self.header_len + self.content_len
    }

    /// Offset of the first content octet.
    pub fn content_start(&self) -> usize {
        self.start + self.header_len
    }
}

/// Reads the element that starts at `start`, refusing indefinite lengths, non-minimal long forms
/// and elements that run past the input.
pub fn element(input: &[u8], start: usize) -> Option<Tlv> {
    let tag = *input.get(start)?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let first = *input.get(start + 1)?;
    let (header_len, content_len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let bytes = input.get(start + 2..start + 2 + count)?;
        if bytes[0] == 0 {
            return None;
        }
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        if len < 0x80 {
            return None;
        }
        (2 + count, len)
    };
    let tlv = Tlv {
        tag,
        start,
        header_len,
        content_len,
    };
    if tlv.end() > input.len() {
        return None;
    }
    Some(tlv)
}

/// For `SEQUENCE { first, ... }` spanning the whole input, returns the bytes of `first`
/// (header included): the signed part of a CSR or certificate.
pub fn first_inner_element(input: &[u8]) -> Option<&[u8]> {
    let outer = element(input, 0)?;
    if outer.tag != 0x30 || outer.end() != input.len() {
        return None;
    }
    let inner = element(input, outer.content_start())?;
    input.get(inner.start..inner.end())
}

/// Bit length of a DER `RSAPublicKey`'s modulus (`SEQUENCE { INTEGER n, INTEGER e }`).
pub fn rsa_modulus_bits(rsa_public_key: &[u8]) -> Option<usize> {
    let seq = element(rsa_public_key, 0)?;
    if seq.tag != 0x30 {
        return None;
    }
    let n = element(rsa_public_key, seq.content_start())?;
    if n.tag != 0x02 {
        return None;
    }
    let mut bytes = rsa_public_key.get(n.content_start()..n.end())?;
    while let [0, rest @ ..] = bytes {
        bytes = rest;
    }
    let first = *bytes.first()?;
    Some((bytes.len() - 1) * 8 + (8 - first.leading_zeros() as usize))
}

/// Encodes `r ‖ s` (the PKCS#11 ECDSA output) as DER `Ecdsa-Sig-Value ::= SEQUENCE { r, s }`.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let mut body = Vec::with_capacity(raw.len() + 8);
    for part in [r, s] {
        let mut int = part;
        while let [0, rest @ ..] = int {
            int = rest;
        }
        let pad = int.first().is_none_or(|b| b & 0x80 != 0);
        let len = int.len() + usize::from(pad);
        body.push(0x02);
        push_len(&mut body, len);
        if pad {
            body.push(0);
        }
        body.extend_from_slice(int);
    }
    let mut out = vec![0x30];
    push_len(&mut out, body.len());
    out.extend_from_slice(&body);
    Some(out)
}

/// Encodes one DER element.
pub fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    push_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

/// Encodes an unsigned big-endian integer as DER INTEGER (minimal, positive).
pub fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let mut int = bytes;
    while let [0, rest @ ..] = int {
        int = rest;
    }
    let mut content = Vec::with_capacity(int.len() + 1);
    if int.first().is_none_or(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(int);
    der_tlv(0x02, &content)
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// The signed structure around a `TBSCertificate` (or `TBSCertList`): `SEQUENCE { tbs,
/// signatureAlgorithm, BIT STRING signature }`, with signatureAlgorithm copied byte for byte
/// from the TBS's own `signature` field, as RFC 5280 4.1.1.2 requires them to match. The
/// token signs the TBS bytes already logged; wrapping them needs no second build.
pub fn signed(tbs: &[u8], signature: &[u8]) -> Option<Vec<u8>> {
    let outer = element(tbs, 0)?;
    if outer.tag != 0x30 || outer.end() != tbs.len() {
        return None;
    }
    let mut at = outer.content_start();
    let first = element(tbs, at)?;
    // TBSCertificate opens with [0] version and an INTEGER serial; TBSCertList with an
    // optional INTEGER version. The AlgorithmIdentifier is the first SEQUENCE after them.
    if first.tag == 0xa0 {
        at = first.end();
    }
    let mut alg = element(tbs, at)?;
    if alg.tag == 0x02 {
        alg = element(tbs, alg.end())?;
    }
    if alg.tag != 0x30 {
        return None;
    }
    let mut body = Vec::with_capacity(tbs.len() + alg.end() - alg.start + signature.len() + 8);
    body.extend_from_slice(tbs);
    body.extend_from_slice(&tbs[alg.start..alg.end()]);
    body.push(0x03);
    push_len(&mut body, signature.len() + 1);
    body.push(0);
    body.extend_from_slice(signature);
    Some(der_tlv(0x30, &body))
}

/// Unwraps a DER OCTET STRING if `bytes` is exactly one, else returns `bytes` unchanged.
///
/// `CKA_EC_POINT` comes DER-wrapped from SoftHSM2 and OpenSC but raw from some HSMs; decide by
/// whether the wrapper parses and spans the whole value.
pub fn unwrap_octet_string(bytes: &[u8]) -> &[u8] {
    match element(bytes, 0) {
        Some(t) if t.tag == 0x04 && t.end() == bytes.len() => &bytes[t.content_start()..],
        _ => bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_der_pads_high_bit_and_strips_zeros() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80; // r needs a 0x00 pad
        raw[32] = 0x00;
        raw[33] = 0x01; // s has a leading zero to strip
        let der = ecdsa_raw_to_der(&raw).unwrap();
        assert_eq!(&der[..5], &[0x30, 0x44, 0x02, 0x21, 0x00]);
        let s = element(&der, 2 + 2 + 33).unwrap();
        assert_eq!(s.tag, 0x02);
        assert_eq!(s.content_len, 31);
    }

    #[test]
    fn signed_rebuilds_what_rcgen_signed_byte_for_byte() {
        use x509_cert::der::Decode;
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_RSA_SHA256] {
            let key = if alg == &rcgen::PKCS_RSA_SHA256 {
                rcgen::KeyPair::from_pem(include_str!("../tests/data/rsa2048-test-key.pem"))
                    .unwrap()
            } else {
                rcgen::KeyPair::generate_for(alg).unwrap()
            };
            let mut params = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
            params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x42; 16]));
            let der = params.self_signed(&key).unwrap().der().to_vec();
            let tbs = first_inner_element(&der).unwrap();
            let cert = x509_cert::Certificate::from_der(&der).unwrap();
            let sig = cert.signature().as_bytes().unwrap();
            assert_eq!(signed(tbs, sig).unwrap(), der);
        }
        // A TBSCertList without a version: the AlgorithmIdentifier comes first.
        let tbs = der_tlv(
            0x30,
            &[der_tlv(0x30, &[6, 1, 42]), der_tlv(0x30, &[])].concat(),
        );
        let crl = signed(&tbs, &[1, 2]).unwrap();
        assert_eq!(first_inner_element(&crl), Some(&tbs[..]));
        assert!(crl.ends_with(&[0x30, 3, 6, 1, 42, 0x03, 3, 0, 1, 2]));
        assert!(signed(&[0x30, 0x02, 0x02, 0x00], &[1]).is_none());
        let long = der_tlv(0x04, &[7; 70_000]);
        assert_eq!(element(&long, 0).unwrap().content_len, 70_000);
    }

    #[test]
    fn element_refuses_overlong_and_indefinite() {
        assert!(element(&[0x30, 0x80, 0, 0], 0).is_none());
        assert!(element(&[0x30, 0x81, 0x05, 0, 0, 0, 0, 0], 0).is_none());
        assert!(element(&[0x30, 0x05, 0, 0], 0).is_none());
        assert_eq!(
            first_inner_element(&[0x30, 0x03, 0x02, 0x01, 0x05, 0x00]),
            None
        );
        assert_eq!(
            first_inner_element(&[0x30, 0x03, 0x02, 0x01, 0x05]),
            Some(&[2u8, 1, 5][..])
        );
    }

    #[test]
    fn octet_string_unwrap_by_shape() {
        assert_eq!(
            unwrap_octet_string(&[0x04, 0x02, 0xaa, 0xbb]),
            &[0xaa, 0xbb]
        );
        assert_eq!(unwrap_octet_string(&[0xaa, 0xbb]), &[0xaa, 0xbb]);
    }
}
