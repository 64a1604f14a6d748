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
