//! Profiles: what one kind of certificate may contain, read strictly from JSON.
//!
//! A profile lists what is allowed; everything else is refused by the policy. Loading refuses
//! unknown keys and self-contradictory values, naming the file and the key, so a typo can never
//! silently widen what a profile signs.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::csr::AttrType;
use crate::keys::KeyType;

/// A loaded, checked profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The profile's name; must equal the file name without `.json`.
    pub name: String,
    /// One line for operators: what this profile is for.
    #[serde(default)]
    pub description: String,
    /// Key types a CSR may carry.
    pub key_types: Vec<KeyType>,
    /// Allowed subject attributes by short name (`CN`, `O`, `OU`, `C`, `ST`, `L`,
    /// `serialNumber`); an attribute not listed is refused.
    pub subject: BTreeMap<String, AttrRule>,
    /// Allowed subjectAltNames.
    #[serde(default)]
    pub san: SanRule,
    /// keyUsage of every certificate; `key_encipherment` is only set for RSA keys (RFC 8813).
    pub key_usage: Vec<KeyUsage>,
    /// extKeyUsage of every certificate.
    pub extended_key_usage: Vec<ExtKeyUsage>,
    /// Lifetime.
    pub validity: ValidityRule,
}

/// Rule for one subject attribute.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttrRule {
    /// The attribute must be present.
    #[serde(default)]
    pub required: bool,
    /// Exact allowed values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Allowed shapes with one `{name}` placeholder, e.g. `system:node:{name}`; `{name}` must be
    /// a lowercase DNS name (RFC 1123).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
}

/// Rule for subjectAltNames.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SanRule {
    /// Allowed DNS names: exact names, or `*.suffix` for one or more labels under `suffix`.
    #[serde(default)]
    pub dns: Vec<String>,
    /// Allowed IP ranges in CIDR form (`10.0.0.0/8`, `::1/128`); a bare address means itself.
    #[serde(default)]
    pub ip: Vec<String>,
    /// Names that must be present.
    #[serde(default)]
    pub required_dns: Vec<String>,
    /// Addresses that must be present.
    #[serde(default)]
    pub required_ip: Vec<IpAddr>,
    /// At least this many SANs.
    #[serde(default)]
    pub min: usize,
    /// At most this many SANs.
    #[serde(default = "default_max_sans")]
    pub max: usize,
}

fn default_max_sans() -> usize {
    100
}

/// keyUsage bits a profile may set.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum KeyUsage {
    /// digitalSignature
    DigitalSignature,
    /// keyEncipherment (RSA only)
    KeyEncipherment,
    /// keyAgreement
    KeyAgreement,
    /// contentCommitment (nonRepudiation)
    ContentCommitment,
}

impl KeyUsage {
    /// The profile-language name.
    pub fn name(self) -> &'static str {
        match self {
            Self::DigitalSignature => "digital_signature",
            Self::KeyEncipherment => "key_encipherment",
            Self::KeyAgreement => "key_agreement",
            Self::ContentCommitment => "content_commitment",
        }
    }
}

/// extKeyUsage purposes a profile may set.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ExtKeyUsage {
    /// id-kp-serverAuth
    ServerAuth,
    /// id-kp-clientAuth
    ClientAuth,
}

impl ExtKeyUsage {
    /// Dotted OID.
    pub fn oid(self) -> &'static str {
        match self {
            Self::ServerAuth => "1.3.6.1.5.5.7.3.1",
            Self::ClientAuth => "1.3.6.1.5.5.7.3.2",
        }
    }

    /// The profile-language name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ServerAuth => "server_auth",
            Self::ClientAuth => "client_auth",
        }
    }
}

/// Lifetime rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ValidityRule {
    /// Used when the operator does not ask for a validity.
    pub default: Duration,
    /// The operator may not ask for more.
    pub max: Duration,
}

/// A whole number of seconds, written `30d`, `12h`, `20y` (a year is 365 days).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub u64);

impl Duration {
    /// Parses `N` followed by `s`, `m`, `h`, `d` or `y`.
    pub fn parse(s: &str) -> Option<Self> {
        let (num, unit) = s.split_at(s.len().checked_sub(1)?);
        let n: u64 = num.parse().ok()?;
        let mult = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "y" => 365 * 86_400,
            _ => return None,
        };
        let secs = n.checked_mul(mult)?;
        (secs > 0).then_some(Self(secs))
    }

    /// As a `time` duration.
    pub fn to_time(self) -> time::Duration {
        time::Duration::seconds(i64::try_from(self.0).unwrap_or(i64::MAX))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s.is_multiple_of(365 * 86_400) {
            write!(f, "{}y", s / (365 * 86_400))
        } else if s.is_multiple_of(86_400) {
            write!(f, "{}d", s / 86_400)
        } else if s.is_multiple_of(3600) {
            write!(f, "{}h", s / 3600)
        } else {
            write!(f, "{s}s")
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("{s:?} is not a duration like 90d, 12h or 2y"))
        })
    }
}

/// An IP range from a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`, `x::y/n` or a bare address.
    pub fn parse(s: &str) -> Option<Self> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Self { addr, prefix })
    }

    /// Whether `ip` is inside this range (an IPv4 range never holds an IPv6 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, addr, width) = match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                (u128::from(u32::from(n)), u128::from(u32::from(i)), 32)
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        let shift = width - u32::from(self.prefix);
        shift >= 128 || (net >> shift) == (addr >> shift)
    }
}

/// Why a profile cannot be used. Always names the file, and the key where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// No such profile in the CA home.
    #[error("no profile named {name:?} in {}; available: {}", .dir.display(), .available.join(", "))]
    NotFound {
        /// The name asked for.
        name: String,
        /// Where profiles were looked for.
        dir: PathBuf,
        /// Profiles that exist.
        available: Vec<String>,
    },
    /// Unreadable file.
    #[error("{}: cannot read profile", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Bad JSON, unknown key or bad value (serde's message names the key and line).
    #[error("{}: {message}", .path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What serde said.
        message: String,
    },
    /// Parses, but is unsafe or contradicts itself.
    #[error("{}: key {key:?}: {problem}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending key.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

impl Profile {
    /// Reads `DIR/NAME.json`.
    pub fn load_named(dir: &Path, name: &str) -> Result<Self, ProfileError> {
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        let path = dir.join(format!("{name}.json"));
        if !valid_name || !path.is_file() {
            return Err(ProfileError::NotFound {
                name: name.to_owned(),
                dir: dir.to_path_buf(),
                available: list(dir),
            });
        }
        Self::load(&path)
    }

    /// Reads and checks one profile file.
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let profile: Self = serde_json::from_str(&text).map_err(|e| ProfileError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if profile.name != stem {
            return Err(invalid(
                path,
                "name",
                format!("is {:?} but the file is {stem}.json", profile.name),
            ));
        }
        profile
            .check()
            .map_err(|(key, problem)| invalid(path, key, problem))?;
        Ok(profile)
    }

    /// The checks serde cannot do: safety and consistency.
    fn check(&self) -> Result<(), (&'static str, String)> {
        if self.key_types.is_empty() {
            return Err(("key_types", "must list at least one key type".into()));
        }
        if self.validity.default > self.validity.max {
            return Err((
                "validity.default",
                format!(
                    "{} is longer than validity.max {}",
                    self.validity.default, self.validity.max
                ),
            ));
        }
        if self.extended_key_usage.is_empty() {
            return Err((
                "extended_key_usage",
                "must list at least one purpose".into(),
            ));
        }
        if self.key_usage.is_empty() {
            return Err(("key_usage", "must list at least one usage".into()));
        }
        for (attr, rule) in &self.subject {
            if AttrType::from_name(attr).is_none() {
                return Err((
                    "subject",
                    format!(
                        "{attr:?} is not a known attribute (CN, O, OU, C, ST, L, serialNumber)"
                    ),
                ));
            }
            if rule.values.is_empty() && rule.patterns.is_empty() {
                return Err((
                    "subject",
                    format!(
                        "{attr}: give values or patterns; an attribute that may hold anything is not allowed"
                    ),
                ));
            }
            for p in &rule.patterns {
                if p.matches("{name}").count() != 1 || p.replace("{name}", "").contains(['{', '}'])
                {
                    return Err((
                        "subject",
                        format!("{attr}: pattern {p:?} must contain exactly one {{name}}"),
                    ));
                }
            }
        }
        for range in &self.san.ip {
            if Cidr::parse(range).is_none() {
                return Err((
                    "san.ip",
                    format!("{range:?} is not an address or CIDR range"),
                ));
            }
        }
        for name in &self.san.dns {
            let bare = name.strip_prefix("*.").unwrap_or(name);
            if !crate::policy::is_dns_name(bare) {
                return Err(("san.dns", format!("{name:?} is not a DNS name or *.suffix")));
            }
        }
        if self.san.min > self.san.max {
            return Err((
                "san.min",
                format!("{} is more than san.max {}", self.san.min, self.san.max),
            ));
        }
        Ok(())
    }
}

fn invalid(path: &Path, key: &str, problem: String) -> ProfileError {
    ProfileError::Invalid {
        path: path.to_path_buf(),
        key: key.to_owned(),
        problem,
    }
}

/// Names of the profiles in `dir`, sorted.
pub fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "json")
                .then(|| p.file_stem().map(|s| s.to_string_lossy().into_owned()))?
        })
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Duration::parse("20y"), Some(Duration(20 * 365 * 86_400)));
        assert_eq!(
            Duration::parse("90d").map(|d| d.to_string()),
            Some("90d".into())
        );
        assert_eq!(Duration::parse("0d"), None);
        assert_eq!(Duration::parse("d"), None);
        assert_eq!(Duration::parse("5w"), None);
    }

    #[test]
    fn cidr_contains() {
        let net = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(net.contains("10.254.0.1".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(Cidr::parse("10.0.0.0/33").is_none());
    }

    #[test]
    fn unknown_keys_and_contradictions_fail_to_load() {
        let dir = tempfile::tempdir().unwrap();
        let base = r#"{"name":"p","key_types":["ecdsa-p256"],"subject":{"CN":{"values":["x"]}},
            "key_usage":["digital_signature"],"extended_key_usage":["client_auth"],
            "validity":{"default":"30d","max":"10d"}}"#;
        std::fs::write(dir.path().join("p.json"), base).unwrap();
        let err = Profile::load_named(dir.path(), "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("validity.default"), "{err}");
        std::fs::write(
            dir.path().join("p.json"),
            base.replace("\"subject\"", "\"subjekt\""),
        )
        .unwrap();
        let err = Profile::load_named(dir.path(), "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("subjekt"), "{err}");
        assert!(matches!(
            Profile::load_named(dir.path(), "../p"),
            Err(ProfileError::NotFound { .. })
        ));
    }
}
