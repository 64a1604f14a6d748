//! Names as RFC 1123 and RFC 5280 shape them, shared by the profile loader (which checks what a
//! profile allows) and the policy (which checks what a CSR asks for). Pure.

/// Whether `name` is a lowercase LDH hostname: labels of 1-63 letters, digits and inner hyphens,
/// at most 253 characters, no empty label, no trailing dot, ASCII only.
pub fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// A distinguished name as RFC 4514 §2 writes it, the one style every report, listing and log
/// entry uses: the last RDN first, `,` between them, no spaces (`CN=kubernetes-ca,O=Example`,
/// the form `--subject` takes and OpenSSL's `-nameopt RFC2253` prints). `attrs` are in
/// certificate order. Special characters in values are escaped (§2.4), so a value holding `,`
/// or `+` cannot pass for a second attribute; the same escapes as `x509_cert`'s `Name` display,
/// which prints issuers.
pub fn rfc4514(attrs: &[(crate::csr::AttrType, String)]) -> String {
    let mut out = String::new();
    for (i, (attr, value)) in attrs.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(attr.name());
        out.push('=');
        let last = value.chars().count().saturating_sub(1);
        for (j, c) in value.chars().enumerate() {
            match c {
                '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                '#' | ' ' if j == 0 => {
                    out.push('\\');
                    out.push(c);
                }
                ' ' if j == last => out.push_str("\\ "),
                '\0'..='\x1f' | '\x7f' => out.push_str(&format!("\\{:02x}", u32::from(c))),
                _ => out.push(c),
            }
        }
    }
    out
}

/// "1 name", "2 names": a count with its noun in the right number, for messages whose count
/// can be 1.
pub fn count<N: std::fmt::Display + TryInto<u64> + Copy>(n: N, one: &str, many: &str) -> String {
    let singular = n.try_into().ok() == Some(1);
    format!("{n} {}", if singular { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::AttrType;

    #[test]
    fn distinguished_names_print_as_rfc_4514() {
        let dn = |a: &[(AttrType, &str)]| {
            rfc4514(
                &a.iter()
                    .map(|(t, v)| (t.clone(), (*v).to_owned()))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            dn(&[
                (AttrType::O, "system:nodes"),
                (AttrType::Cn, "system:node:n1")
            ]),
            "CN=system:node:n1,O=system:nodes"
        );
        assert_eq!(
            dn(&[(AttrType::Cn, "a,b+c\"d\\e")]),
            "CN=a\\,b\\+c\\\"d\\\\e"
        );
        assert_eq!(dn(&[(AttrType::Cn, "#x y ")]), "CN=\\#x y\\ ");
        assert_eq!(dn(&[]), "");
    }

    #[test]
    fn counts_agree_with_their_nouns() {
        assert_eq!(count(1u64, "entry", "entries"), "1 entry");
        assert_eq!(count(0u64, "entry", "entries"), "0 entries");
    }
}
