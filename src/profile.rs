//! Profiles: what one kind of certificate may contain, read strictly from JSON.
//!
//! A profile lists what is allowed; everything else is refused by the policy. Loading refuses
//! unknown keys and self-contradictory values, naming the file and the key, so a typo can never
//! silently widen what a profile signs.

use std::collections::{BTreeMap, BTreeSet};
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
    /// Which CA signs: `root`, or the name of an intermediate made by `hsmca ca create`.
    #[serde(default = "root_issuer")]
    pub issuer: String,
    /// Present for CA profiles (intermediates): basicConstraints and name constraints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaRule>,
    /// Key types a CSR may carry.
    pub key_types: Vec<KeyType>,
    /// Rules for the named parts used in patterns, e.g. `{node}` in `system:node:{node}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, PartRule>,
    /// Allowed subject attributes by short name (`CN`, `O`, `OU`, `C`, `ST`, `L`,
    /// `serialNumber`); an attribute not listed is refused.
    pub subject: BTreeMap<String, AttrRule>,
    /// Allowed subjectAltNames.
    #[serde(default)]
    pub san: SanRule,
    /// keyUsage of every certificate; `key_encipherment` is only set for RSA keys (RFC 8813).
    pub key_usage: Vec<KeyUsage>,
    /// extKeyUsage of every certificate (may be empty only for CA profiles).
    #[serde(default)]
    pub extended_key_usage: Vec<ExtKeyUsage>,
    /// Lifetime.
    pub validity: ValidityRule,
    /// Certificates carry a cRLDistributionPoints extension (RFC 5280 4.2.1.13) pointing at
    /// their issuer's CRL, `${crl_url}/ISSUER.crl`, when the site sets `crl_url`; nothing
    /// otherwise. Publish each `hsmca crl --issuer ISSUER` output under that name.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub crl_distribution_point: bool,
    /// The CRL URI this profile's certificates carry, from `crl_distribution_point` and the
    /// site's `crl_url` at load time.
    #[serde(skip)]
    pub crl_uri: Option<String>,
    /// Must be true for a profile to allow `O=system:masters` (cluster-admin that RBAC cannot
    /// revoke); only the break-glass `super-admin` profile sets it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub danger_system_masters: bool,
    /// Set when `site.json` lists this profile in `danger_profiles`: like a profile that can
    /// carry `system:masters`, a batch issues it only when the command line names it with
    /// `--allow-profile` (see [`Profile::danger`]).
    #[serde(skip)]
    pub danger_site: bool,
    /// Which site parameters filled which key at load time (`subject.C.values` ->
    /// `countries`), so a refusal can say which parameter in `site.json` would let a value in.
    #[serde(skip)]
    pub site_sources: Sources,
}

/// Profile keys (`san.dns`, `subject.C.values`, `parts.node.values`) and the site parameters
/// whose values went into them.
pub type Sources = BTreeMap<String, BTreeSet<String>>;

/// Rule for one subject attribute.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttrRule {
    /// The attribute must be present.
    #[serde(default)]
    pub required: bool,
    /// Exact allowed values. Always written out, even empty: an attribute whose site list is
    /// empty shows `"values": []` (nothing allowed) in `profiles show` and the logged policy,
    /// never a bare `{}` that reads like "anything".
    #[serde(default)]
    pub values: Vec<String>,
    /// Allowed shapes with one named part, e.g. `system:node:{node}`; the part's rule is in
    /// the profile's `parts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<String>,
    /// Values refused with their own rule id (`subject.O.forbidden`), even if a pattern matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbidden: Vec<String>,
}

fn root_issuer() -> String {
    "root".into()
}

/// What a named part of a pattern may be.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PartRule {
    /// `dns_label` (one lowercase LDH label) or `dns_name` (dot-separated labels).
    pub kind: PartKind,
    /// If given, the only values allowed (e.g. the cluster's node names from the site).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// Shape of a named part.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PartKind {
    /// One lowercase LDH label, 1-63 characters.
    DnsLabel,
    /// A lowercase LDH hostname.
    DnsName,
}

impl PartRule {
    /// Whether `value` may fill this part.
    pub fn allows(&self, value: &str) -> bool {
        let shaped = match self.kind {
            PartKind::DnsLabel => !value.contains('.') && crate::names::is_dns_name(value),
            PartKind::DnsName => crate::names::is_dns_name(value),
        };
        shaped && (self.values.is_empty() || self.values.iter().any(|v| v == value))
    }
}

/// The CA part of an intermediate's profile.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CaRule {
    /// basicConstraints pathLenConstraint (0: may only issue end-entity certificates).
    pub path_len: u8,
    /// nameConstraints permitted DNS subtrees.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permitted_dns: Vec<String>,
    /// nameConstraints excluded DNS subtrees.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_dns: Vec<String>,
    /// nameConstraints permitted IP ranges (CIDR).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permitted_ip: Vec<String>,
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
    /// Requested wildcard names (`*.x`) are refused unless this is true (and they match `dns`).
    #[serde(default)]
    pub wildcards: bool,
    /// Single-label DNS names (`localhost`, `kubernetes`, a bare node name) are refused unless
    /// this is true: RFC 5280 preferred-name-syntax checkers such as pkilint reject them.
    #[serde(default)]
    pub single_label_dns: bool,
    /// Allowed email addresses (rfc822Name); none unless listed.
    #[serde(default)]
    pub email: Vec<String>,
    /// Allowed URI prefixes; none unless listed.
    #[serde(default)]
    pub uri: Vec<String>,
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
    /// keyCertSign (CA profiles only)
    KeyCertSign,
    /// cRLSign (CA profiles only)
    CrlSign,
}

impl KeyUsage {
    /// The profile-language name.
    pub fn name(self) -> &'static str {
        match self {
            Self::DigitalSignature => "digital_signature",
            Self::KeyEncipherment => "key_encipherment",
            Self::KeyAgreement => "key_agreement",
            Self::ContentCommitment => "content_commitment",
            Self::KeyCertSign => "key_cert_sign",
            Self::CrlSign => "crl_sign",
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
    /// Reads `DIR/NAME.json`, expanding `${param}` from `site`.
    pub fn load_named(dir: &Path, name: &str, site: &Site) -> Result<Self, ProfileError> {
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
        Self::load(&path, site)
    }

    /// Reads and checks one profile file.
    pub fn load(path: &Path, site: &Site) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::parse(&text, path, &stem, site)
    }

    /// Parses profile JSON; `path` and `stem` are for messages and the name check.
    pub fn parse(text: &str, path: &Path, stem: &str, site: &Site) -> Result<Self, ProfileError> {
        let syntax = |message: String| ProfileError::Syntax {
            path: path.to_path_buf(),
            message,
        };
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| syntax(e.to_string()))?;
        let mut sources = Sources::new();
        site.expand(&mut value, "", &mut sources)
            .map_err(|(key, problem)| invalid(path, &key, problem))?;
        let mut todo = Vec::new();
        crate::cfssl::todos(&value, "", &mut todo);
        if let Some(key) = todo.first() {
            return Err(invalid(
                path,
                key,
                "still holds a TODO: write the rule before using this profile".into(),
            ));
        }
        let mut profile: Self = serde_json::from_value(value).map_err(|e| syntax(e.to_string()))?;
        profile.danger_site = site.danger_profiles().any(|n| n == stem);
        profile.site_sources = sources;
        if profile.crl_distribution_point
            && let Some(SiteValue::One(base)) = site.0.get("crl_url")
            && !base.is_empty()
        {
            profile.crl_uri = Some(format!(
                "{}/{}.crl",
                base.trim_end_matches('/'),
                profile.issuer
            ));
        }
        if profile.name != stem {
            return Err(invalid(
                path,
                "name",
                format!("is {:?} but the file is {stem}.json", profile.name),
            ));
        }
        profile
            .check()
            .map_err(|(key, problem)| invalid(path, &key, problem))?;
        Ok(profile)
    }

    /// Whether this profile is dangerous: it can carry `system:masters`, or the site says so.
    /// The policy issues a dangerous profile in a batch only when it was named on the command
    /// line (rule `profile.danger`).
    pub fn danger(&self) -> bool {
        self.danger_system_masters || self.danger_site
    }

    /// The checks serde cannot do: safety and consistency.
    fn check(&self) -> Result<(), (String, String)> {
        let err = |key: &str, problem: String| Err((key.to_owned(), problem));
        if self.key_types.is_empty() {
            return err("key_types", "must list at least one key type".into());
        }
        if self.validity.default > self.validity.max {
            return err(
                "validity.default",
                format!(
                    "{} is longer than validity.max {}",
                    self.validity.default, self.validity.max
                ),
            );
        }
        if self.key_usage.is_empty() {
            return err("key_usage", "must list at least one usage".into());
        }
        let signs_certs = self
            .key_usage
            .iter()
            .any(|u| matches!(u, KeyUsage::KeyCertSign | KeyUsage::CrlSign));
        match &self.ca {
            Some(ca) => {
                if !self.key_usage.contains(&KeyUsage::KeyCertSign)
                    || !self.key_usage.contains(&KeyUsage::CrlSign)
                {
                    return err(
                        "key_usage",
                        "a CA profile needs key_cert_sign and crl_sign".into(),
                    );
                }
                if !self.san.dns.is_empty()
                    || !self.san.ip.is_empty()
                    || !self.san.email.is_empty()
                    || !self.san.uri.is_empty()
                {
                    return err("san", "a CA profile issues no subjectAltNames".into());
                }
                for range in &ca.permitted_ip {
                    if Cidr::parse(range).is_none() {
                        return err("ca.permitted_ip", format!("{range:?} is not a CIDR range"));
                    }
                }
                for name in ca.permitted_dns.iter().chain(&ca.excluded_dns) {
                    if !crate::names::is_dns_name(name.trim_start_matches('.')) {
                        return err("ca.permitted_dns", format!("{name:?} is not a DNS name"));
                    }
                }
            }
            None => {
                if signs_certs {
                    return err(
                        "key_usage",
                        "key_cert_sign and crl_sign are only for CA profiles (add \"ca\")".into(),
                    );
                }
                if self.extended_key_usage.is_empty() {
                    return err(
                        "extended_key_usage",
                        "must list at least one purpose".into(),
                    );
                }
            }
        }
        if self
            .key_types
            .iter()
            .any(|k| matches!(k, KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096))
            && !self.key_usage.contains(&KeyUsage::DigitalSignature)
        {
            return err("key_usage", "must include digital_signature".into());
        }
        if self.issuer.is_empty()
            || !self
                .issuer
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return err(
                "issuer",
                format!("{:?} is not root or a CA name", self.issuer),
            );
        }
        let masters = self.subject.get("O").is_some_and(|o| {
            o.values
                .iter()
                .chain(&o.patterns)
                .any(|v| v.contains("system:masters"))
        });
        if masters && !self.danger_system_masters {
            return err(
                "subject.O",
                "allows system:masters; only a profile with danger_system_masters may".into(),
            );
        }
        let mut used_parts = std::collections::BTreeSet::new();
        for (attr, rule) in &self.subject {
            let key = format!("subject.{attr}");
            if AttrType::from_name(attr).is_none() {
                return err(
                    "subject",
                    format!(
                        "{attr:?} is not a known attribute (CN, O, OU, C, ST, L, serialNumber)"
                    ),
                );
            }
            // An attribute whose values all come from an empty site list allows nothing, and
            // the refusal names the list (no C unless the site lists countries).
            let from_site = self.site_sources.contains_key(&format!("{key}.values"));
            if rule.values.is_empty() && rule.patterns.is_empty() && !from_site {
                return err(
                    &key,
                    "give values or patterns; an attribute that may hold anything is not allowed"
                        .into(),
                );
            }
            for f in &rule.forbidden {
                if rule.values.contains(f) {
                    return err(&key, format!("{f:?} is both allowed and forbidden"));
                }
            }
            for p in &rule.patterns {
                used_parts.insert(self.check_pattern(&key, p)?);
            }
        }
        if self.subject.get("CN").is_none_or(|r| !r.required)
            && self.ca.is_none()
            && self.san.min == 0
        {
            return err(
                "subject.CN",
                "a profile must require a CN or at least one SAN".into(),
            );
        }
        for range in &self.san.ip {
            if Cidr::parse(range).is_none() {
                return err(
                    "san.ip",
                    format!("{range:?} is not an address or CIDR range"),
                );
            }
        }
        for name in &self.san.dns {
            let bare = name.strip_prefix("*.").unwrap_or(name);
            if bare.contains('{') {
                used_parts.insert(self.check_pattern("san.dns", bare)?);
            } else if !crate::names::is_dns_name(bare) {
                return err("san.dns", format!("{name:?} is not a DNS name or *.suffix"));
            }
        }
        for name in &self.san.required_dns {
            if !crate::names::is_dns_name(name) {
                return err("san.required_dns", format!("{name:?} is not a DNS name"));
            }
        }
        if self.san.min > self.san.max {
            return err(
                "san.min",
                format!("{} is more than san.max {}", self.san.min, self.san.max),
            );
        }
        let required = self.san.required_dns.len() + self.san.required_ip.len();
        if required > self.san.max {
            return err(
                "san.max",
                format!(
                    "{} is less than the {required} required names",
                    self.san.max
                ),
            );
        }
        for part in self.parts.keys() {
            if !used_parts.contains(part) {
                return err(
                    &format!("parts.{part}"),
                    "is not used by any pattern".into(),
                );
            }
        }
        Ok(())
    }

    /// A pattern holds exactly one `{part}` with a rule in `parts`; returns the part's name.
    fn check_pattern(&self, key: &str, pattern: &str) -> Result<String, (String, String)> {
        let bad = |why: String| (key.to_owned(), format!("pattern {pattern:?} {why}"));
        let open = pattern
            .find('{')
            .ok_or_else(|| bad("has no {part}".into()))?;
        let close = pattern[open..]
            .find('}')
            .map(|c| c + open)
            .ok_or_else(|| bad("has an unclosed {".into()))?;
        let rest = &pattern[close + 1..];
        if rest.contains(['{', '}']) || pattern[..open].contains('}') {
            return Err(bad("must contain exactly one {part}".into()));
        }
        let name = &pattern[open + 1..close];
        if !self.parts.contains_key(name) {
            return Err(bad(format!(
                "uses {{{name}}} but parts has no rule for {name:?}"
            )));
        }
        Ok(name.to_owned())
    }

    /// The rule for the part named in `pattern`.
    pub fn part_of<'a>(&'a self, pattern: &'a str) -> Option<(&'a str, &'a str, &'a PartRule)> {
        let open = pattern.find('{')?;
        let close = pattern.find('}')?;
        let rule = self.parts.get(&pattern[open + 1..close])?;
        Some((&pattern[..open], &pattern[close + 1..], rule))
    }
}

/// Site parameters: facts about the cluster set once in the CA home (`site.json`) and used by
/// profiles as `${name}`. A string equal to `${name}` inside a list is replaced by the
/// parameter's items when the parameter is a list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Site(pub BTreeMap<String, SiteValue>);

/// One site parameter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SiteValue {
    /// A switch: `"${name}"` standing alone becomes `true` or `false`.
    Switch(bool),
    /// A single value.
    One(String),
    /// A list, spliced into the list it is used in.
    Many(Vec<String>),
}

/// How a site parameter is used in profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteKind {
    /// A list, spliced into the list a profile uses it in as `"${name}"`.
    List,
    /// One string, put into a profile string as `${name}`.
    One,
    /// `true` or `false`, a profile value `"${name}"` standing alone.
    Switch,
}

impl SiteKind {
    /// The word `site show` and the man page print.
    pub fn name(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::One => "one",
            Self::Switch => "switch",
        }
    }
}

/// One site parameter hsmca knows: its kind, its default and what it is for.
#[derive(Debug, Clone, Copy)]
pub struct SiteKey {
    /// The key in `site.json`, used in profiles as `${name}`.
    pub name: &'static str,
    /// List, one value, or switch.
    pub kind: SiteKind,
    /// The default's items (a list), its value (one; `true`/`false` for a switch).
    pub default: &'static [&'static str],
    /// One line for operators.
    pub meaning: &'static str,
}

impl SiteKey {
    /// The default as a site value.
    pub fn default_value(&self) -> SiteValue {
        let first = self.default.first().copied().unwrap_or_default();
        match self.kind {
            SiteKind::List => {
                SiteValue::Many(self.default.iter().map(|s| (*s).to_owned()).collect())
            }
            SiteKind::One => SiteValue::One(first.to_owned()),
            SiteKind::Switch => SiteValue::Switch(first == "true"),
        }
    }
}

/// Every site parameter hsmca knows, in one place: the defaults, `hsmca site show`, the man
/// page and `--help` all read this table. Defaults are neutral: nothing about a particular
/// cluster is allowed until the site says so (no C, ST, L or OU; no node names, domains or
/// address ranges). The two exceptions are kubeadm's own defaults, which a cluster built
/// with kubeadm has unless it changed them: `networking.dnsDomain` `cluster.local`, and the
/// first address of `networking.serviceSubnet` `10.96.0.0/12`, the API server's service IP
/// `10.96.0.1` (kubeadm `cmd/kubeadm/app/apis/kubeadm/v1beta4/defaults.go`).
pub const SITE_KEYS: &[SiteKey] = &[
    SiteKey {
        name: "cluster_name",
        kind: SiteKind::One,
        default: &[""],
        meaning: "names this cluster's intermediates: CA CN \"${cluster_name} kubernetes-ca\", leaf issuer \"${cluster_name}-kubernetes-ca\"; empty: plain kubernetes-ca",
    },
    SiteKey {
        name: "cluster_domain",
        kind: SiteKind::One,
        default: &["cluster.local"],
        meaning: "the cluster's DNS domain (kubeadm dnsDomain): kubernetes.default.svc.${cluster_domain}",
    },
    SiteKey {
        name: "service_ip",
        kind: SiteKind::One,
        default: &["10.96.0.1"],
        meaning: "the API server's service IP, the first address of kubeadm's serviceSubnet",
    },
    SiteKey {
        name: "node_names",
        kind: SiteKind::List,
        default: &[],
        meaning: "the values {node} may take in system:node:{node} and node SANs; empty: any DNS label",
    },
    SiteKey {
        name: "node_domains",
        kind: SiteKind::List,
        default: &[],
        meaning: "node DNS names in server certificates (exact names or *.suffix); empty: none",
    },
    SiteKey {
        name: "node_ip_ranges",
        kind: SiteKind::List,
        default: &[],
        meaning: "node addresses in server certificates (CIDR ranges); empty: none",
    },
    SiteKey {
        name: "apiserver_names",
        kind: SiteKind::List,
        default: &[],
        meaning: "extra DNS names of the API server (a load balancer); empty: none",
    },
    SiteKey {
        name: "kubeadm_single_label_names",
        kind: SiteKind::Switch,
        default: &["false"],
        meaning: "accept kubeadm's single-label SANs (kubernetes, localhost, the node name); pkilint flags them",
    },
    SiteKey {
        name: "countries",
        kind: SiteKind::List,
        default: &[],
        meaning: "C values the seed-style profiles allow; empty: no C",
    },
    SiteKey {
        name: "states",
        kind: SiteKind::List,
        default: &[],
        meaning: "ST values the seed-style profiles allow; empty: no ST",
    },
    SiteKey {
        name: "localities",
        kind: SiteKind::List,
        default: &[],
        meaning: "L values the seed-style profiles allow; empty: no L",
    },
    SiteKey {
        name: "org_units",
        kind: SiteKind::List,
        default: &[],
        meaning: "OU values the seed-style profiles allow; empty: no OU",
    },
    SiteKey {
        name: "crl_url",
        kind: SiteKind::One,
        default: &[""],
        meaning: "http(s) URL where each issuer's CRL is published as ISSUER.crl; profiles with crl_distribution_point put URL/ISSUER.crl in their certificates; empty: none",
    },
    SiteKey {
        name: "danger_profiles",
        kind: SiteKind::List,
        default: &[],
        meaning: "profiles a batch issues only when named with --allow-profile",
    },
];

/// Where a site parameter's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteOrigin {
    /// The built-in default ([`SITE_KEYS`]).
    Default,
    /// Given in the site file.
    Set,
}

/// One site parameter as `init` and `site show` print it.
#[derive(Debug, Clone, Serialize)]
pub struct SiteSetting {
    /// The key.
    pub name: String,
    /// `list`, `one` or `switch`; `profile` for a key hsmca does not know (a profile's own).
    pub kind: &'static str,
    /// The value in force.
    pub value: SiteValue,
    /// Set in the file, or the default.
    pub origin: SiteOrigin,
    /// What it is for (empty for a profile's own key).
    pub meaning: &'static str,
}

impl Default for Site {
    fn default() -> Self {
        Self(
            SITE_KEYS
                .iter()
                .map(|k| (k.name.to_owned(), k.default_value()))
                .collect(),
        )
    }
}

impl fmt::Display for SiteValue {
    /// JSON, as in `site.json`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Switch(on) => write!(f, "{on}"),
            Self::One(v) => write!(f, "{v:?}"),
            Self::Many(items) => {
                let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
                write!(f, "[{}]", quoted.join(", "))
            }
        }
    }
}

impl Site {
    /// Reads `site.json` strictly; unknown parameters are kept (profiles may use their own).
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `site.json` text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ProfileError> {
        let given: Self = serde_json::from_str(text).map_err(|e| ProfileError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        for (name, value) in &given.0 {
            let Some(key) = SITE_KEYS.iter().find(|k| k.name == name) else {
                continue;
            };
            let fits = matches!(
                (key.kind, value),
                (SiteKind::List, SiteValue::Many(_))
                    | (SiteKind::One, SiteValue::One(_))
                    | (SiteKind::Switch, SiteValue::Switch(_))
            );
            if !fits {
                return Err(ProfileError::Invalid {
                    path: path.to_path_buf(),
                    key: name.clone(),
                    problem: format!(
                        "must be {} (default {}), got {}",
                        match key.kind {
                            SiteKind::List => "a list of strings",
                            SiteKind::One => "a string",
                            SiteKind::Switch => "true or false",
                        },
                        key.default_value(),
                        value
                    ),
                });
            }
        }
        // The cluster name becomes part of CA names (`prod-eu-kubernetes-ca`), which profiles
        // use as `issuer`: the same characters, so a bad one is named here, not in every profile.
        if let Some(SiteValue::One(name)) = given.0.get("cluster_name")
            && !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                key: "cluster_name".into(),
                problem: format!(
                    "{name:?} may hold only letters, digits, '-' and '_' (it names CAs, e.g. \
                     {name}-kubernetes-ca)"
                ),
            });
        }
        if let Some(SiteValue::One(url)) = given.0.get("crl_url")
            && !url.is_empty()
            && !is_crl_url(url)
        {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                key: "crl_url".into(),
                problem: format!(
                    "{url:?} is not an http:// or https:// URL with a host (printable ASCII, no \
                     spaces, query or fragment); leave it \"\" for no CRL distribution point"
                ),
            });
        }
        // Parameters the file leaves out keep their defaults, so a site file written before a
        // parameter existed still loads.
        let mut site = Self::default();
        site.0.extend(given.0);
        Ok(site)
    }

    /// Reads `site.json` and says which keys it sets (the others are defaults).
    pub fn load_with_origins(path: &Path) -> Result<(Self, BTreeSet<String>), ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let site = Self::parse(&text, path)?;
        let given: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| ProfileError::Syntax {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok((site, given.into_keys().collect()))
    }

    /// Every parameter in force: the known ones in [`SITE_KEYS`] order, then any a profile of
    /// the site's own uses, each with its origin (`given` holds the keys the file sets).
    pub fn settings(&self, given: &BTreeSet<String>) -> Vec<SiteSetting> {
        let origin = |name: &str| {
            if given.contains(name) {
                SiteOrigin::Set
            } else {
                SiteOrigin::Default
            }
        };
        let known = SITE_KEYS.iter().map(|k| SiteSetting {
            name: k.name.to_owned(),
            kind: k.kind.name(),
            value: self
                .0
                .get(k.name)
                .cloned()
                .unwrap_or_else(|| k.default_value()),
            origin: origin(k.name),
            meaning: k.meaning,
        });
        let own = self
            .0
            .iter()
            .filter(|(n, _)| !SITE_KEYS.iter().any(|k| k.name == n.as_str()))
            .map(|(n, v)| SiteSetting {
                name: n.clone(),
                kind: "profile",
                value: v.clone(),
                origin: origin(n),
                meaning: "",
            });
        known.chain(own).collect()
    }

    /// Profiles the site marks dangerous (`"danger_profiles": ["name", ...]`).
    pub fn danger_profiles(&self) -> impl Iterator<Item = &str> {
        let list = match self.0.get("danger_profiles") {
            Some(SiteValue::Many(v)) => v.as_slice(),
            Some(SiteValue::One(v)) => std::slice::from_ref(v),
            _ => &[],
        };
        list.iter().map(String::as_str)
    }

    /// Replaces every `${name}` in `value`; `at` is the key path for messages. Which
    /// parameters filled which key (`subject.C.values`, `san.dns`, `parts.node.values`) goes
    /// into `sources`, so a refusal can name the site parameter that would let a value in.
    fn expand(
        &self,
        value: &mut serde_json::Value,
        at: &str,
        sources: &mut Sources,
    ) -> Result<(), (String, String)> {
        use serde_json::Value;
        match value {
            Value::String(s) => {
                let whole = s
                    .strip_prefix("${")
                    .and_then(|r| r.strip_suffix('}'))
                    .map(|n| self.0.get(n));
                if let Some(Some(SiteValue::Switch(on))) = whole {
                    let name = s[2..s.len() - 1].to_owned();
                    sources.entry(at.to_owned()).or_default().insert(name);
                    *value = Value::Bool(*on);
                } else {
                    *s = self.expand_str(s, at, sources)?;
                }
            }
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items.drain(..) {
                    if let Value::String(s) = &item
                        && let Some(name) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}'))
                        && let Some(SiteValue::Many(list)) = self.0.get(name)
                    {
                        sources
                            .entry(at.to_owned())
                            .or_default()
                            .insert(name.to_owned());
                        out.extend(list.iter().cloned().map(Value::String));
                        continue;
                    }
                    let mut item = item;
                    self.expand(&mut item, at, sources)?;
                    out.push(item);
                }
                *items = out;
            }
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    self.expand(v, &path, sources)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// `${name}` inside a string takes a single value. An empty value drops cleanly: with
    /// the one space or `-` that follows it (`"${cluster_name} kubernetes-ca"` becomes
    /// `"kubernetes-ca"`), or that precedes it at the end of the string.
    fn expand_str(
        &self,
        s: &str,
        at: &str,
        sources: &mut Sources,
    ) -> Result<String, (String, String)> {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let end = rest[start..]
                .find('}')
                .ok_or_else(|| (at.to_owned(), format!("unclosed ${{ in {s:?}")))?
                + start;
            let name = &rest[start + 2..end];
            let mut after = end + 1;
            match self.0.get(name) {
                Some(SiteValue::One(v)) => {
                    sources
                        .entry(at.to_owned())
                        .or_default()
                        .insert(name.to_owned());
                    if !v.is_empty() {
                        out.push_str(v);
                    } else if rest[after..].starts_with([' ', '-']) {
                        after += 1;
                    } else if rest[after..].is_empty() && out.ends_with([' ', '-']) {
                        out.pop();
                    }
                }
                Some(SiteValue::Many(_) | SiteValue::Switch(_)) => {
                    return Err((
                        at.to_owned(),
                        format!(
                            "site parameter {name:?} is a list; use \"${{{name}}}\" alone as a list item"
                        ),
                    ));
                }
                None => {
                    return Err((
                        at.to_owned(),
                        format!(
                            "unknown site parameter ${{{name}}} (known: {})",
                            self.0.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
            rest = &rest[after..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// A URL relying parties can fetch a CRL from: `http` (RFC 5280 4.2.1.13 recommends it for
/// CRLs) or `https`, a host, printable ASCII (an IA5String), no query or fragment.
fn is_crl_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    rest.is_some_and(|r| {
        let host = r.split('/').next().unwrap_or_default();
        !host.is_empty()
            && url
                .chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, '?' | '#' | '"' | '\\'))
    })
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
        let err = Profile::load_named(dir.path(), "p", &Site::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("validity.default"), "{err}");
        std::fs::write(
            dir.path().join("p.json"),
            base.replace("\"subject\"", "\"subjekt\""),
        )
        .unwrap();
        let err = Profile::load_named(dir.path(), "p", &Site::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("subjekt"), "{err}");
        assert!(matches!(
            Profile::load_named(dir.path(), "../p", &Site::default()),
            Err(ProfileError::NotFound { .. })
        ));
    }

    #[test]
    fn an_empty_single_value_drops_with_its_separator() {
        let mut site = Site::default();
        let mut sources = Sources::new();
        let expand =
            |site: &Site, s: &str, sources: &mut Sources| site.expand_str(s, "k", sources).unwrap();
        for (text, want) in [
            ("${cluster_name} kubernetes-ca", "kubernetes-ca"),
            ("${cluster_name}-etcd-ca", "etcd-ca"),
            ("root of ${cluster_name}", "root of"),
            ("a${cluster_name}b", "ab"),
        ] {
            assert_eq!(expand(&site, text, &mut sources), want);
        }
        assert_eq!(
            sources
                .get("k")
                .map(|s| s.iter().cloned().collect::<Vec<_>>()),
            Some(vec!["cluster_name".to_owned()])
        );
        site.0
            .insert("cluster_name".into(), SiteValue::One("prod-eu".into()));
        assert_eq!(
            expand(&site, "${cluster_name} kubernetes-ca", &mut sources),
            "prod-eu kubernetes-ca"
        );
        assert_eq!(
            expand(&site, "${cluster_name}-etcd-ca", &mut sources),
            "prod-eu-etcd-ca"
        );
    }

    #[test]
    fn site_values_of_the_wrong_kind_are_refused_naming_the_key() {
        let err = Site::parse(r#"{"countries": "DE"}"#, Path::new("site.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("site.json") && err.contains("countries"),
            "{err}"
        );
        assert!(err.contains("a list of strings"), "{err}");
        let err = Site::parse(r#"{"cluster_name": "prod eu"}"#, Path::new("site.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cluster_name") && err.contains("prod eu"),
            "{err}"
        );
        // A profile's own parameter may be anything.
        assert!(Site::parse(r#"{"my_domains": ["a.example"]}"#, Path::new("s")).is_ok());
    }
}
