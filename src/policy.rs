//! The policy engine: does this CSR get a certificate under this profile, and exactly which?
//!
//! Pure: no file system, clock, token or randomness. `now`, the serial and the issuer's limits
//! arrive in [`Context`], so every rule is a table test. Every rule that refuses reports a
//! stable rule id (the profile key it enforces), what it expected and the offending value, and
//! all refusals are collected, not only the first.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use time::OffsetDateTime;

use crate::csr::{AttrType, RequestedExtension, San, VerifiedCsr};
use crate::keys::PublicKey;
use crate::names::is_dns_name;
use crate::profile::{Cidr, Duration, ExtKeyUsage, KeyUsage, Profile};

/// How far `notBefore` is set in the past, for clocks that run a little behind ours.
pub const BACKDATE: time::Duration = time::Duration::minutes(5);

/// Why a CSR is refused: a rule id, what the rule expects, and what the CSR had.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Refusal {
    /// Stable rule id, e.g. `subject.O` or `san.ip`.
    pub rule: String,
    /// What the profile allows.
    pub expected: String,
    /// The offending value from the CSR (or request).
    pub value: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rule {} expects {}, got {:?}",
            self.rule, self.expected, self.value
        )
    }
}

/// Why a certificate is being made. Only `hsmca ca create`, which generates the CA key inside
/// the token, may make a CA certificate: a CA profile reached from any CSR path (a manifest, a
/// plan, a kubectl custom signer, a renewal) would hand the stick's own key a certificate that
/// can mint anything, so it is refused here, once, for every path (rule `profile.ca`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// An intermediate CA certificate for a key `ca create` generated in the token.
    Intermediate,
    /// A leaf certificate for a CSR (`check`, `plan`, `sign`, `sign-dir`, kubectl objects).
    Leaf,
    /// A leaf certificate re-issued for a logged one (`renew`).
    Renewal,
}

/// What a Kubernetes CertificateSigningRequest object asks for besides its PKCS#10 request:
/// the built-in signers' own rules are judged with the profile's, so a reviewed plan is
/// re-decided by exactly the rules that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignerRequest {
    /// spec.signerName.
    pub signer: String,
    /// spec.usages.
    pub usages: Vec<String>,
    /// spec.username (set by the API server: who asked).
    pub username: String,
    /// spec.groups (set by the API server: the requester's groups).
    pub groups: Vec<String>,
    /// spec.expirationSeconds.
    pub expiration_seconds: Option<u64>,
}

/// Everything the decision needs that does not come from the profile or the CSR.
#[derive(Debug, Clone)]
pub struct Context {
    /// Why the certificate is made; a CA profile is refused for every purpose but
    /// [`Purpose::Intermediate`].
    pub purpose: Purpose,
    /// The Kubernetes object's own request, when the CSR came in one.
    pub kubernetes: Option<SignerRequest>,
    /// The time of issuance.
    pub now: OffsetDateTime,
    /// The serial to use (random, from the token; unique in the log).
    pub serial: Vec<u8>,
    /// A validity the operator asked for (`--validity`), else the profile default.
    pub requested_validity: Option<Duration>,
    /// The issuer's own notAfter; nothing may outlive it.
    pub issuer_not_after: OffsetDateTime,
    /// Where the profile came from the stick (a batch: `sign-dir`, kubectl objects, kubeadm
    /// trees), the profiles the command line named with `--allow-profile`: a dangerous
    /// profile ([`Profile::danger`]) is refused unless listed (rule `profile.danger`). `None`
    /// where the operator named the profile itself (`sign --profile`, `renew`, `ca create`).
    pub allow_profiles: Option<Arc<BTreeSet<String>>>,
    /// Public keys (SPKI SHA-256, hex) whose certificate was revoked for key compromise, with
    /// that certificate's serial: refused for any new certificate (rule `key.compromised`).
    pub compromised: Arc<BTreeMap<String, String>>,
}

/// The certificate that will be issued, field by field. Only [`decide`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::manual_non_exhaustive,
    reason = "sealed against construction inside the crate too, not only outside"
)]
pub struct Decision {
    /// The profile that allowed it.
    pub profile: String,
    /// Subject attributes in issuance order (C, ST, L, O, OU, CN, serialNumber).
    pub subject: Vec<(AttrType, String)>,
    /// dNSName SANs.
    pub dns_names: Vec<String>,
    /// iPAddress SANs.
    pub ip_addresses: Vec<IpAddr>,
    /// keyUsage bits.
    pub key_usage: Vec<KeyUsage>,
    /// extKeyUsage purposes.
    pub extended_key_usage: Vec<ExtKeyUsage>,
    /// rfc822Name SANs (only where the profile lists them).
    pub emails: Vec<String>,
    /// URI SANs (only where the profile allows their prefix).
    pub uris: Vec<String>,
    /// Which CA signs (`root` or an intermediate's name).
    pub issuer: String,
    /// Set when this is an intermediate CA certificate.
    pub ca: Option<crate::profile::CaRule>,
    /// The CRL URI for a cRLDistributionPoints extension, when the profile and site give one.
    pub crl_distribution_point: Option<String>,
    /// notBefore (now minus [`BACKDATE`]).
    pub not_before: OffsetDateTime,
    /// notAfter.
    pub not_after: OffsetDateTime,
    /// Serial number bytes (positive, big-endian).
    pub serial: Vec<u8>,
    /// The subject's public key, from the CSR's SPKI.
    pub public_key: PublicKey,
    /// SHA-256 of the CSR.
    pub csr_sha256: String,
    /// Private: only `decide` makes a `Decision`.
    _sealed: (),
}

impl Decision {
    /// The subject in RFC 4514 form (`CN=system:node:n1,O=system:nodes`), as every report
    /// prints names.
    pub fn subject_string(&self) -> String {
        crate::names::rfc4514(&self.subject)
    }

    /// SANs as `DNS:x` / `IP:y` strings.
    pub fn san_strings(&self) -> Vec<String> {
        self.dns_names
            .iter()
            .map(|d| format!("DNS:{d}"))
            .chain(self.ip_addresses.iter().map(|i| format!("IP:{i}")))
            .chain(self.emails.iter().map(|e| format!("email:{e}")))
            .chain(self.uris.iter().map(|u| format!("URI:{u}")))
            .collect()
    }
}

const SUBJECT_ORDER: [AttrType; 7] = [
    AttrType::C,
    AttrType::St,
    AttrType::L,
    AttrType::O,
    AttrType::Ou,
    AttrType::Cn,
    AttrType::SerialNumber,
];

/// Judges one CSR against one profile.
pub fn decide(
    profile: &Profile,
    csr: &VerifiedCsr,
    ctx: &Context,
) -> Result<Decision, Vec<Refusal>> {
    let mut refusals = Vec::new();
    let mut refuse = |rule: &str, expected: String, value: String| {
        refusals.push(Refusal {
            rule: rule.to_owned(),
            expected,
            value,
        });
    };

    match (ctx.purpose, &profile.ca) {
        (Purpose::Intermediate, Some(_)) | (Purpose::Leaf | Purpose::Renewal, None) => {}
        (Purpose::Intermediate, None) => refuse(
            "profile.ca",
            "a CA profile (one with a \"ca\" section)".into(),
            profile.name.clone(),
        ),
        (Purpose::Leaf | Purpose::Renewal, Some(_)) => refuse(
            "profile.ca",
            "a leaf profile: CA certificates are made only by `hsmca ca create`, for a key it \
             generates in the token"
                .into(),
            profile.name.clone(),
        ),
    }
    if let Some(allowed) = &ctx.allow_profiles
        && profile.danger()
        && !allowed.contains(&profile.name)
    {
        refuse(
            "profile.danger",
            format!(
                "--allow-profile {} on the command line: this profile can issue cluster-admin \
                 (system:masters) or is marked dangerous by the site",
                profile.name
            ),
            profile.name.clone(),
        );
    }
    if let Some(serial) = ctx.compromised.get(&csr.public_key.fingerprint()) {
        refuse(
            "key.compromised",
            "a key whose certificate was never revoked for key compromise".into(),
            format!("key of serial {serial}"),
        );
    }
    let mut requested_validity = ctx.requested_validity;
    if let Some(request) = &ctx.kubernetes {
        let cn = csr
            .subject
            .iter()
            .find(|(a, _)| *a == AttrType::Cn)
            .map(|(_, v)| v.as_str());
        let (more, seconds) = signer_rules(request, cn, profile.validity.max.0);
        refusals.extend(more);
        refusals.extend(requester_rule(request, profile));
        if let Some(seconds) = seconds {
            requested_validity = Some(Duration(seconds));
        }
    }
    let mut refuse = |rule: &str, expected: String, value: String| {
        refusals.push(Refusal {
            rule: rule.to_owned(),
            expected,
            value,
        });
    };

    let key_type = csr.public_key.key_type;
    if !profile.key_types.contains(&key_type) {
        refuse(
            "key_types",
            one_of(profile.key_types.iter().map(|k| k.name())),
            key_type.name().into(),
        );
    }
    for oid in &csr.other_attributes {
        refuse(
            "csr.attributes",
            "no CSR attributes besides extensionRequest".into(),
            oid.clone(),
        );
    }

    // Usages the certificate will carry: the profile's, minus keyEncipherment for non-RSA keys.
    let key_usage: Vec<KeyUsage> = profile
        .key_usage
        .iter()
        .copied()
        .filter(|u| *u != KeyUsage::KeyEncipherment || key_type.is_rsa())
        .collect();
    for ext in &csr.extensions {
        match ext {
            RequestedExtension::SubjectAltName { critical: true } => {
                refuse(
                    "extensions.critical",
                    "a non-critical subjectAltName".into(),
                    "critical subjectAltName".into(),
                );
            }
            RequestedExtension::SubjectAltName { .. }
            | RequestedExtension::SubjectKeyIdentifier { critical: false } => {}
            RequestedExtension::BasicConstraints { ca: true, .. } => {
                refuse(
                    "extensions.basic_constraints",
                    "CA:FALSE".into(),
                    "CA:TRUE".into(),
                );
            }
            RequestedExtension::BasicConstraints { ca: false, .. } => {}
            RequestedExtension::KeyUsage { usages, .. } => {
                let allowed: BTreeSet<&str> = key_usage.iter().map(|u| u.name()).collect();
                for u in usages.iter().filter(|u| !allowed.contains(*u)) {
                    refuse(
                        "extensions.key_usage",
                        one_of(allowed.iter().copied()),
                        (*u).into(),
                    );
                }
            }
            RequestedExtension::ExtendedKeyUsage { purposes, .. } => {
                let allowed: BTreeSet<&str> =
                    profile.extended_key_usage.iter().map(|e| e.oid()).collect();
                for p in purposes.iter().filter(|p| !allowed.contains(p.as_str())) {
                    refuse(
                        "extensions.extended_key_usage",
                        one_of(allowed.iter().copied()),
                        p.clone(),
                    );
                }
            }
            RequestedExtension::SubjectKeyIdentifier { critical: true } => {
                refuse(
                    "extensions.critical",
                    "a non-critical subjectKeyIdentifier".into(),
                    "critical subjectKeyIdentifier".into(),
                );
            }
            RequestedExtension::Unknown { oid, critical } => {
                let what = if *critical {
                    format!("{oid} (critical)")
                } else {
                    oid.clone()
                };
                refuse(
                    "extensions.unknown",
                    "only subjectAltName, keyUsage, extKeyUsage, basicConstraints CA:FALSE".into(),
                    what,
                );
            }
        }
    }

    // Subject.
    let mut subject = Vec::new();
    let mut seen = BTreeSet::new();
    for (attr, value) in &csr.subject {
        let name = attr.name();
        let Some(rule) = profile.subject.get(name) else {
            refuse(
                "subject.attribute",
                one_of(profile.subject.keys().map(String::as_str)),
                format!("{name}={value}"),
            );
            continue;
        };
        if !seen.insert(attr.clone()) {
            refuse(
                &format!("subject.{name}.repeated"),
                format!("at most one {name}"),
                value.clone(),
            );
            continue;
        }
        if value.is_empty() || value.chars().any(char::is_control) {
            refuse(
                &format!("subject.{name}.value"),
                "a non-empty value without control characters".into(),
                value.clone(),
            );
            continue;
        }
        if rule.forbidden.iter().any(|f| f == value) {
            refuse(
                &format!("subject.{name}.forbidden"),
                format!("never {value:?} under this profile"),
                value.clone(),
            );
            continue;
        }
        let exact = rule.values.iter().any(|v| v == value);
        let shaped = rule
            .patterns
            .iter()
            .any(|p| pattern_matches(profile, p, value));
        if !exact && !shaped {
            refuse(
                &format!("subject.{name}"),
                attr_expected(profile, name),
                value.clone(),
            );
        }
        subject.push((attr.clone(), value.clone()));
    }
    for (name, rule) in &profile.subject {
        if rule.required && !csr.subject.iter().any(|(a, _)| a.name() == name) {
            refuse(
                &format!("subject.{name}.required"),
                attr_expected(profile, name),
                String::new(),
            );
        }
    }
    subject.sort_by_key(|(a, _)| SUBJECT_ORDER.iter().position(|o| o == a));
    // system:masters bypasses every RBAC rule. Whatever a profile's patterns or the site's
    // lists let through, only a profile marked danger_system_masters may put it in a
    // certificate (the profile loader checks the literal values; this checks the result).
    if !profile.danger_system_masters
        && subject
            .iter()
            .any(|(a, v)| *a == AttrType::O && v.eq_ignore_ascii_case("system:masters"))
    {
        refuse(
            "subject.O.system_masters",
            "no system:masters unless the profile is marked danger_system_masters".into(),
            "system:masters".into(),
        );
    }

    // Subject alternative names.
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    let (mut emails, mut uris) = (Vec::new(), Vec::new());
    let mut unique = BTreeSet::new();
    for san in &csr.sans {
        if !unique.insert(san.clone()) {
            refuse("san.duplicate", "each name once".into(), san.to_string());
            continue;
        }
        match san {
            San::Dns(name) => {
                let wildcard = name.strip_prefix("*.");
                let checked =
                    wildcard.map_or_else(|| name.clone(), |rest| format!("wildcard.{rest}"));
                if name.contains('*')
                    && (!profile.san.wildcards || wildcard.is_none_or(|r| r.contains('*')))
                {
                    refuse("san.dns.wildcard", "no wildcard names".into(), name.clone());
                } else if !is_dns_name(&checked) {
                    refuse(
                        "san.dns.syntax",
                        "a lowercase LDH hostname (RFC 1123)".into(),
                        name.clone(),
                    );
                } else if !checked.contains('.') && !profile.san.single_label_dns {
                    refuse(
                        "san.dns.single_label",
                        format!(
                            "a name with at least two labels, e.g. node1.cluster.internal{}",
                            single_label_way_out(profile)
                        ),
                        name.clone(),
                    );
                } else if !profile
                    .san
                    .dns
                    .iter()
                    .any(|allowed| dns_allowed(profile, allowed, &checked))
                {
                    refuse("san.dns", san_expected(profile, "san.dns"), name.clone());
                } else {
                    dns_names.push(name.clone());
                }
            }
            San::Ip(ip) => {
                if profile
                    .san
                    .ip
                    .iter()
                    .filter_map(|r| Cidr::parse(r))
                    .any(|r| r.contains(*ip))
                {
                    ip_addresses.push(*ip);
                } else {
                    refuse("san.ip", san_expected(profile, "san.ip"), ip.to_string());
                }
            }
            San::Email(e) if profile.san.email.contains(e) => emails.push(e.clone()),
            San::Email(e) => refuse(
                "san.email",
                one_of(profile.san.email.iter().map(String::as_str)),
                e.clone(),
            ),
            San::Uri(u) if profile.san.uri.iter().any(|p| u.starts_with(p.as_str())) => {
                uris.push(u.clone());
            }
            San::Uri(u) => refuse(
                "san.uri",
                one_of(profile.san.uri.iter().map(String::as_str)),
                u.clone(),
            ),
            San::Other(o) => refuse(
                "san.other",
                "only DNS names and IP addresses".into(),
                o.clone(),
            ),
        }
    }
    for need in &profile.san.required_dns {
        if !csr.sans.contains(&San::Dns(need.clone())) {
            refuse(
                "san.required_dns",
                format!("DNS:{need} present"),
                String::new(),
            );
        }
    }
    for need in &profile.san.required_ip {
        if !csr.sans.contains(&San::Ip(*need)) {
            refuse(
                "san.required_ip",
                format!("IP:{need} present"),
                String::new(),
            );
        }
    }
    if csr.sans.len() > profile.san.max {
        refuse(
            "san.max",
            format!(
                "at most {}",
                crate::names::count(profile.san.max, "name", "names")
            ),
            csr.sans.len().to_string(),
        );
    }
    if csr.sans.len() < profile.san.min {
        refuse(
            "san.min",
            format!(
                "at least {}",
                crate::names::count(profile.san.min, "name", "names")
            ),
            csr.sans.len().to_string(),
        );
    }

    // Validity.
    let validity = requested_validity.unwrap_or(profile.validity.default);
    if validity > profile.validity.max {
        refuse(
            "validity.max",
            format!("at most {}", profile.validity.max),
            validity.to_string(),
        );
    }
    let not_before = ctx.now - BACKDATE;
    // A validity from the stick (a manifest, expirationSeconds) can be absurd: past the end of
    // time is a refusal like any other, never an overflow.
    let not_after = ctx.now.checked_add(validity.to_time());
    match not_after {
        Some(t) if t <= ctx.issuer_not_after => {}
        _ => refuse(
            "validity.issuer",
            format!(
                "notAfter no later than the issuer's {}",
                crate::clock::rfc3339(ctx.issuer_not_after)
            ),
            not_after.map_or_else(|| validity.to_string(), crate::clock::rfc3339),
        ),
    }

    if !refusals.is_empty() {
        return Err(refusals);
    }
    Ok(Decision {
        profile: profile.name.clone(),
        subject,
        dns_names,
        ip_addresses,
        key_usage,
        extended_key_usage: profile.extended_key_usage.clone(),
        emails,
        uris,
        issuer: profile.issuer.clone(),
        ca: profile.ca.clone(),
        crl_distribution_point: profile.crl_uri.clone(),
        not_before,
        not_after: not_after.unwrap_or(ctx.issuer_not_after),
        serial: ctx.serial.clone(),
        public_key: csr.public_key.clone(),
        csr_sha256: csr.sha256.clone(),
        _sealed: (),
    })
}

/// The built-in signers' own rules (usages compared as sets; the requester's name), and the
/// validity: `expirationSeconds` honoured up to `max_seconds`, at least 600.
pub fn signer_rules(
    obj: &SignerRequest,
    cn: Option<&str>,
    max_seconds: u64,
) -> (Vec<Refusal>, Option<u64>) {
    let mut out = Vec::new();
    let usages: BTreeSet<&str> = obj.usages.iter().map(String::as_str).collect();
    let set = |u: &[&'static str]| u.iter().copied().collect::<BTreeSet<&str>>();
    let node_signer = |purpose: &'static str| {
        [
            set(&["digital signature", "key encipherment", purpose]),
            set(&["digital signature", purpose]),
        ]
    };
    let allowed: Option<Vec<BTreeSet<&str>>> = match obj.signer.as_str() {
        "kubernetes.io/kube-apiserver-client-kubelet" => Some(node_signer("client auth").to_vec()),
        "kubernetes.io/kubelet-serving" => Some(node_signer("server auth").to_vec()),
        _ => None,
    };
    match allowed {
        Some(sets) if !sets.contains(&usages) => {
            out.push(k8s_refusal(
                "k8s.usages",
                "{digital signature, [key encipherment,] client/server auth}",
                obj.usages.join(", "),
            ));
        }
        None if obj.signer == "kubernetes.io/kube-apiserver-client" => {
            let ok = set(&["digital signature", "key encipherment", "client auth"]);
            if !usages.contains("client auth") || !usages.is_subset(&ok) {
                out.push(k8s_refusal(
                    "k8s.usages",
                    "client auth, with only digital signature and key encipherment besides",
                    obj.usages.join(", "),
                ));
            }
        }
        _ => {}
    }
    // A node may only ask for its own name; the kubelet's first client certificate comes
    // from a bootstrap token (system:bootstrap:...), as Kubernetes' own approver allows.
    let node_cn = cn.is_some_and(|c| c.starts_with("system:node:"));
    let bootstrap = obj.signer == "kubernetes.io/kube-apiserver-client-kubelet"
        && obj.username.starts_with("system:bootstrap:");
    if node_cn && !bootstrap && Some(obj.username.as_str()) != cn {
        out.push(k8s_refusal(
            "k8s.username",
            format!("the requester to be {:?}", cn.unwrap_or_default()),
            obj.username.clone(),
        ));
    }
    let validity = match obj.expiration_seconds {
        Some(s) if s < 600 => {
            out.push(k8s_refusal(
                "k8s.expiration",
                "expirationSeconds of at least 600",
                s.to_string(),
            ));
            None
        }
        Some(s) => Some(s.min(max_seconds)),
        None => None,
    };
    (out, validity)
}

/// Groups whose members administer the cluster, as kubeadm sets them up: `system:masters`
/// (bypasses RBAC) and `kubeadm:cluster-admins` (bound to cluster-admin).
pub const ADMIN_GROUPS: [&str; 2] = ["system:masters", "kubeadm:cluster-admins"];

/// For the `kubernetes.io/kube-apiserver-client` signer, the requester must fit the profile the
/// certificate's CN maps to: a profile that can put a subject into an admin group (a danger
/// profile, or one allowing `O=kubeadm:cluster-admins` or `O=system:masters`) is issued only
/// to a requester who is already in one of [`ADMIN_GROUPS`] (`spec.groups`, which the API
/// server sets). Anyone may create a CertificateSigningRequest object; an approver's slip
/// must not turn one into cluster-admin. Rule `k8s.requester`.
pub fn requester_rule(request: &SignerRequest, profile: &Profile) -> Option<Refusal> {
    if request.signer != "kubernetes.io/kube-apiserver-client" {
        return None;
    }
    let grants_admin = profile.danger()
        || profile.subject.get("O").is_some_and(|rule| {
            rule.values
                .iter()
                .chain(&rule.patterns)
                .any(|v| ADMIN_GROUPS.contains(&v.as_str()))
        });
    let is_admin = request
        .groups
        .iter()
        .any(|g| ADMIN_GROUPS.contains(&g.as_str()));
    (grants_admin && !is_admin).then(|| {
        k8s_refusal(
            "k8s.requester",
            format!(
                "a requester in {} for profile {:?}",
                ADMIN_GROUPS.join(" or "),
                profile.name
            ),
            format!(
                "{} (groups: {})",
                request.username,
                request.groups.join(", ")
            ),
        )
    })
}

fn k8s_refusal(rule: &str, expected: impl Into<String>, value: impl Into<String>) -> Refusal {
    Refusal {
        rule: rule.into(),
        expected: expected.into(),
        value: value.into(),
    }
}

/// How many allowed values a refusal lists before it gives only the count.
const SHOWN: usize = 6;

fn one_of<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<String> = items.map(|s| format!("{s:?}")).collect();
    match v.len() {
        0 => "nothing (the profile allows none)".into(),
        1 => v.concat(),
        n if n > SHOWN => format!("one of {}, ... ({n} in all)", v[..SHOWN].join(", ")),
        _ => format!("one of {}", v.join(", ")),
    }
}

/// What a subject attribute may be, naming the site parameters its values and its
/// patterns' parts come from: `"system:node:{node}" with {node} one of "node-a", "node-b"
/// (from site parameter node_names: ...)`.
fn attr_expected(profile: &Profile, name: &str) -> String {
    let Some(rule) = profile.subject.get(name) else {
        return one_of(std::iter::empty());
    };
    let key = format!("subject.{name}.values");
    let from_site = profile.site_sources.get(&key);
    let mut shown: Vec<String> = rule.values.iter().map(|v| format!("{v:?}")).collect();
    shown.extend(rule.patterns.iter().map(|p| pattern_expected(profile, p)));
    let listed = match shown.len() {
        0 => "nothing".to_owned(),
        1 => shown.concat(),
        n if n > SHOWN => format!("one of {}, ... ({n} in all)", shown[..SHOWN].join(", ")),
        _ => format!("one of {}", shown.join(", ")),
    };
    match from_site {
        Some(params) if rule.values.is_empty() && rule.patterns.is_empty() => format!(
            "nothing: site parameter {} is empty ({})",
            names(params),
            site_way_out(params, "list the values to allow in")
        ),
        Some(params) => format!(
            "{listed} (from site parameter {}; {})",
            names(params),
            site_way_out(params, "to allow another, add it to")
        ),
        None if rule.values.is_empty() && rule.patterns.is_empty() => {
            "nothing (the profile allows none)".into()
        }
        None => listed,
    }
}

/// A pattern, with what its part may be when the part's values come from the site.
fn pattern_expected(profile: &Profile, pattern: &str) -> String {
    let Some((_, _, part_rule)) = profile.part_of(pattern) else {
        return format!("{pattern:?}");
    };
    let part = pattern
        .split_once('{')
        .and_then(|(_, r)| r.split_once('}'))
        .map_or("", |(p, _)| p);
    let Some(params) = profile.site_sources.get(&format!("parts.{part}.values")) else {
        return format!("{pattern:?}");
    };
    if part_rule.values.is_empty() {
        let any = match part_rule.kind {
            crate::profile::PartKind::DnsLabel => "any DNS label",
            crate::profile::PartKind::DnsName => "any DNS name",
        };
        return format!(
            "{pattern:?} with {{{part}}} {any} (site parameter {} is empty)",
            names(params)
        );
    }
    format!(
        "{pattern:?} with {{{part}}} {} (from site parameter {}; {})",
        one_of(part_rule.values.iter().map(String::as_str)),
        names(params),
        site_way_out(params, "to allow another, add it to")
    )
}

/// The allowed SANs of one kind, naming the site parameters that fill the list.
fn san_expected(profile: &Profile, key: &str) -> String {
    let list = if key == "san.ip" {
        &profile.san.ip
    } else {
        &profile.san.dns
    };
    let listed = one_of(list.iter().map(String::as_str));
    match profile.site_sources.get(key) {
        Some(params) if list.is_empty() => format!(
            "nothing: site parameter {} {} empty ({})",
            names(params),
            if params.len() == 1 { "is" } else { "are" },
            site_way_out(params, "list the values to allow in")
        ),
        Some(params) => format!(
            "{listed} (the list takes site parameter{} {}; {})",
            if params.len() == 1 { "" } else { "s" },
            names(params),
            site_way_out(params, "to allow another, add it to")
        ),
        None => listed,
    }
}

/// For `san.dns.single_label`: the site switch that lifts it, when the profile has one.
fn single_label_way_out(profile: &Profile) -> String {
    match profile.site_sources.get("san.single_label_dns") {
        Some(params) => format!(
            "; or set the site switch {} to true in HOME/site.json, then run hsmca profiles \
             apply (pkilint reports such names)",
            names(params)
        ),
        None => String::new(),
    }
}

fn names(params: &BTreeSet<String>) -> String {
    params
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The complete way out through the logged policy change: `{verb} countries in
/// HOME/site.json, then run hsmca profiles apply`; for a single-value parameter
/// (`cluster_name`), `change cluster_name in ...`.
fn site_way_out(params: &BTreeSet<String>, verb: &str) -> String {
    let single = params.iter().all(|p| {
        crate::profile::SITE_KEYS
            .iter()
            .any(|k| k.name == p && k.kind == crate::profile::SiteKind::One)
    });
    let target = if params.len() == 1 {
        names(params)
    } else {
        "the right one".to_owned()
    };
    let verb = if single { "or change" } else { verb };
    format!("{verb} {target} in HOME/site.json, then run hsmca profiles apply")
}

/// `allowed` is an exact name, a pattern with one `{part}`, or `*.suffix`, which matches one
/// or more labels under `suffix`.
fn dns_allowed(profile: &Profile, allowed: &str, name: &str) -> bool {
    match allowed.strip_prefix("*.") {
        Some(suffix) if suffix.contains('{') => name.split_once('.').is_some_and(|(_, rest)| {
            dns_allowed(profile, allowed, rest) || pattern_matches(profile, suffix, rest)
        }),
        Some(suffix) => name
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None if allowed.contains('{') => pattern_matches(profile, allowed, name),
        None => allowed == name,
    }
}

/// `pattern` holds one `{part}`; the text around it must match exactly and the part must
/// satisfy its rule in the profile.
fn pattern_matches(profile: &Profile, pattern: &str, value: &str) -> bool {
    let Some((prefix, suffix, rule)) = profile.part_of(pattern) else {
        return false;
    };
    value
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(suffix))
        .is_some_and(|part| rule.allows(part))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr;

    fn profile() -> Profile {
        serde_json::from_str(
            r#"{"name":"kubelet","key_types":["ecdsa-p256","rsa-2048"],
            "subject":{"CN":{"required":true,"patterns":["system:node:{node}"],"forbidden":["system:node:root"]},
                       "O":{"required":true,"values":["system:nodes"],"forbidden":["system:masters"]}},
            "parts":{"node":{"kind":"dns_label"}},
            "san":{"dns":["*.cluster.local","api.example.com"],"ip":["10.0.0.0/8"],"max":3},
            "key_usage":["digital_signature","key_encipherment"],"extended_key_usage":["client_auth"],
            "validity":{"default":"30d","max":"365d"}}"#,
        )
        .unwrap()
    }

    fn ctx() -> Context {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        Context {
            purpose: Purpose::Leaf,
            kubernetes: None,
            now,
            serial: vec![1, 2, 3],
            requested_validity: None,
            issuer_not_after: now + time::Duration::days(3650),
            allow_profiles: None,
            compromised: Arc::default(),
        }
    }

    fn csr(
        subject: &[(rcgen::DnType, &str)],
        sans: &[&str],
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> VerifiedCsr {
        let mut p = rcgen::CertificateParams::default();
        for (t, v) in subject {
            p.distinguished_name.push(t.clone(), *v);
        }
        p.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) if s.contains('@') => rcgen::SanType::Rfc822Name((*s).try_into().unwrap()),
                Err(_) => rcgen::SanType::DnsName((*s).try_into().unwrap()),
            })
            .collect();
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        csr::parse(p.serialize_request(&key).unwrap().der()).unwrap()
    }

    fn node(sans: &[&str]) -> VerifiedCsr {
        use rcgen::DnType::*;
        csr(
            &[
                (CommonName, "system:node:n1"),
                (OrganizationName, "system:nodes"),
            ],
            sans,
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )
    }

    fn rules(r: Result<Decision, Vec<Refusal>>) -> Vec<(String, String)> {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.rule, r.value))
            .collect()
    }

    fn ca_profile() -> Profile {
        serde_json::from_str(
            r#"{"name":"kubernetes-ca","key_types":["ecdsa-p256"],"ca":{"path_len":0},
            "subject":{"CN":{"required":true,"values":["kubernetes-ca"]}},
            "key_usage":["digital_signature","key_cert_sign","crl_sign"],
            "validity":{"default":"30d","max":"365d"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn only_an_intermediate_ceremony_may_use_a_ca_profile() {
        use rcgen::DnType::*;
        let rogue = csr(
            &[(CommonName, "kubernetes-ca")],
            &[],
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        let with = |purpose| Context { purpose, ..ctx() };
        // A CSR from any path (a manifest, a plan, a kubectl signer, a renewal) is refused.
        for purpose in [Purpose::Leaf, Purpose::Renewal] {
            let got = rules(decide(&ca_profile(), &rogue, &with(purpose)));
            assert_eq!(
                got,
                vec![("profile.ca".to_owned(), "kubernetes-ca".to_owned())],
                "{purpose:?}"
            );
        }
        let d = decide(&ca_profile(), &rogue, &with(Purpose::Intermediate)).unwrap();
        assert!(d.ca.is_some());
        // And a ceremony cannot make an intermediate under a leaf profile.
        let got = rules(decide(&profile(), &node(&[]), &with(Purpose::Intermediate)));
        assert!(
            got.contains(&("profile.ca".to_owned(), "kubelet".to_owned())),
            "{got:?}"
        );
    }

    #[test]
    fn system_masters_needs_a_danger_profile_whatever_its_patterns_allow() {
        use rcgen::DnType::*;
        let mut loose = profile();
        loose.subject.get_mut("O").unwrap().values = vec![];
        loose.subject.get_mut("O").unwrap().forbidden = vec![];
        loose.subject.get_mut("O").unwrap().patterns = vec!["system:{node}".into()];
        let masters = csr(
            &[
                (CommonName, "system:node:n1"),
                (OrganizationName, "system:masters"),
            ],
            &[],
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        let got = rules(decide(&loose, &masters, &ctx()));
        assert_eq!(
            got,
            vec![(
                "subject.O.system_masters".to_owned(),
                "system:masters".to_owned()
            )]
        );
        loose.danger_system_masters = true;
        assert!(decide(&loose, &masters, &ctx()).is_ok());
    }

    #[test]
    fn an_absurd_validity_is_a_refusal_not_an_overflow() {
        let max = Context {
            requested_validity: Some(Duration(u64::MAX)),
            ..ctx()
        };
        let got = rules(decide(&profile(), &node(&[]), &max));
        assert!(got.iter().any(|(r, _)| r == "validity.issuer"), "{got:?}");
        assert!(got.iter().any(|(r, _)| r == "validity.max"), "{got:?}");
        let huge = Duration::parse("9999999999d").unwrap();
        let huge = Context {
            requested_validity: Some(huge),
            ..ctx()
        };
        assert!(decide(&profile(), &node(&[]), &huge).is_err());
    }

    #[test]
    fn danger_profiles_compromised_keys_and_admin_requesters() {
        use rcgen::DnType::*;
        let mut admin = profile();
        admin.name = "super-admin".into();
        admin.danger_system_masters = true;
        admin.subject.get_mut("O").unwrap().values = vec!["system:masters".into()];
        admin.subject.get_mut("O").unwrap().forbidden.clear();
        let masters = csr(
            &[
                (CommonName, "system:node:n1"),
                (OrganizationName, "system:masters"),
            ],
            &[],
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        let allow = |names: &[&str]| Context {
            allow_profiles: Some(Arc::new(names.iter().map(|n| (*n).to_owned()).collect())),
            ..ctx()
        };
        let danger = ("profile.danger".to_owned(), "super-admin".to_owned());
        // A batch without --allow-profile: refused; named: issued; not a batch: issued.
        assert_eq!(
            rules(decide(&admin, &masters, &allow(&[]))),
            vec![danger.clone()]
        );
        assert_eq!(
            rules(decide(&admin, &masters, &allow(&["kubelet"]))),
            vec![danger]
        );
        assert!(decide(&admin, &masters, &allow(&["super-admin"])).is_ok());
        assert!(decide(&admin, &masters, &ctx()).is_ok());
        // A site-marked profile is dangerous too; an ordinary one is not.
        let mut marked = profile();
        assert!(decide(&marked, &node(&[]), &allow(&[])).is_ok());
        marked.danger_site = true;
        assert_eq!(
            rules(decide(&marked, &node(&[]), &allow(&[])))[0].0,
            "profile.danger"
        );

        // A key revoked for key compromise, under any profile and purpose.
        let n1 = node(&[]);
        let revoked = Context {
            compromised: Arc::new(BTreeMap::from([(
                n1.public_key.fingerprint(),
                "0abc".to_owned(),
            )])),
            ..ctx()
        };
        assert_eq!(
            rules(decide(&profile(), &n1, &revoked)),
            vec![(
                "key.compromised".to_owned(),
                "key of serial 0abc".to_owned()
            )]
        );
        assert!(
            decide(&profile(), &node(&[]), &revoked).is_ok(),
            "another key"
        );

        // kube-apiserver-client: an admin profile only for a requester already admin.
        let request = |groups: &[&str]| SignerRequest {
            signer: "kubernetes.io/kube-apiserver-client".into(),
            usages: vec!["digital signature".into(), "client auth".into()],
            username: "mallory".into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            expiration_seconds: None,
        };
        assert_eq!(
            requester_rule(&request(&["system:authenticated"]), &admin).map(|r| r.rule),
            Some("k8s.requester".to_owned())
        );
        assert_eq!(
            requester_rule(&request(&["kubeadm:cluster-admins"]), &admin),
            None
        );
        assert_eq!(requester_rule(&request(&[]), &profile()), None);
    }

    #[test]
    fn kubernetes_signer_rules_are_part_of_the_decision() {
        let request = |usages: &[&str], username: &str, expiration| SignerRequest {
            signer: "kubernetes.io/kube-apiserver-client-kubelet".into(),
            usages: usages.iter().map(|u| (*u).to_owned()).collect(),
            username: username.into(),
            groups: Vec::new(),
            expiration_seconds: expiration,
        };
        let with = |r: SignerRequest| Context {
            kubernetes: Some(r),
            ..ctx()
        };
        let good = request(
            &["digital signature", "client auth"],
            "system:node:n1",
            None,
        );
        assert!(decide(&profile(), &node(&[]), &with(good)).is_ok());
        let usages = request(
            &["digital signature", "server auth"],
            "system:node:n1",
            None,
        );
        let got = rules(decide(&profile(), &node(&[]), &with(usages)));
        assert_eq!(got[0].0, "k8s.usages");
        let impostor = request(
            &["digital signature", "client auth"],
            "system:node:n2",
            None,
        );
        let got = rules(decide(&profile(), &node(&[]), &with(impostor)));
        assert_eq!(got[0].0, "k8s.username");
        // expirationSeconds sets the validity, clipped to the profile's maximum.
        let short = request(
            &["digital signature", "client auth"],
            "system:node:n1",
            Some(3_600),
        );
        let d = decide(&profile(), &node(&[]), &with(short)).unwrap();
        assert_eq!(d.not_after, ctx().now + time::Duration::hours(1));
    }

    #[test]
    fn good_csr_gets_exactly_the_profile() {
        let d = decide(
            &profile(),
            &node(&["a.svc.cluster.local", "10.1.2.3"]),
            &ctx(),
        )
        .unwrap();
        assert_eq!(d.subject_string(), "CN=system:node:n1,O=system:nodes");
        assert_eq!(
            d.san_strings(),
            vec!["DNS:a.svc.cluster.local", "IP:10.1.2.3"]
        );
        assert_eq!(
            d.key_usage,
            vec![KeyUsage::DigitalSignature],
            "no keyEncipherment on an EC key"
        );
        assert_eq!(
            d.not_after - d.not_before,
            time::Duration::days(30) + BACKDATE
        );
    }

    #[test]
    fn table_of_refusals() {
        use rcgen::DnType::*;
        let p = profile();
        let cases: Vec<(VerifiedCsr, Vec<(&str, &str)>)> = vec![
            (
                csr(
                    &[
                        (CommonName, "system:node:n1"),
                        (OrganizationName, "system:masters"),
                    ],
                    &[],
                    &rcgen::PKCS_ECDSA_P256_SHA256,
                ),
                vec![("subject.O.forbidden", "system:masters")],
            ),
            (
                csr(
                    &[
                        (CommonName, "system:node:"),
                        (OrganizationName, "system:nodes"),
                    ],
                    &[],
                    &rcgen::PKCS_ECDSA_P256_SHA256,
                ),
                vec![("subject.CN", "system:node:")],
            ),
            (
                csr(
                    &[(CommonName, "system:node:n1")],
                    &[],
                    &rcgen::PKCS_ECDSA_P256_SHA256,
                ),
                vec![("subject.O.required", "")],
            ),
            (
                csr(
                    &[
                        (CommonName, "system:node:n1"),
                        (OrganizationName, "system:nodes"),
                        (OrganizationalUnitName, "x"),
                    ],
                    &[],
                    &rcgen::PKCS_ECDSA_P256_SHA256,
                ),
                vec![("subject.attribute", "OU=x")],
            ),
            (
                csr(
                    &[
                        (CommonName, "system:node:n1"),
                        (OrganizationName, "system:nodes"),
                    ],
                    &[],
                    &rcgen::PKCS_ED25519,
                ),
                vec![("key_types", "ed25519")],
            ),
            (
                node(&["evil.example.com"]),
                vec![("san.dns", "evil.example.com")],
            ),
            (node(&["cluster.local"]), vec![("san.dns", "cluster.local")]),
            (
                node(&["*.svc.cluster.local"]),
                vec![("san.dns.wildcard", "*.svc.cluster.local")],
            ),
            (
                node(&["a..cluster.local"]),
                vec![("san.dns.syntax", "a..cluster.local")],
            ),
            (
                node(&["Upper.cluster.local"]),
                vec![("san.dns.syntax", "Upper.cluster.local")],
            ),
            (node(&["192.168.1.1"]), vec![("san.ip", "192.168.1.1")]),
            (
                node(&["root@example.com"]),
                vec![("san.email", "root@example.com")],
            ),
            (
                node(&["api.example.com", "10.0.0.1", "10.0.0.2", "10.0.0.3"]),
                vec![("san.max", "4")],
            ),
        ];
        for (i, (c, want)) in cases.into_iter().enumerate() {
            let got = rules(decide(&p, &c, &ctx()));
            let want: Vec<(String, String)> = want
                .into_iter()
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .collect();
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn validity_is_capped_by_profile_and_issuer() {
        let mut c = ctx();
        c.requested_validity = Duration::parse("400d");
        assert_eq!(
            rules(decide(&profile(), &node(&[]), &c)),
            vec![("validity.max".into(), "400d".into())]
        );
        c.requested_validity = None;
        c.issuer_not_after = c.now + time::Duration::days(10);
        assert_eq!(
            rules(decide(&profile(), &node(&[]), &c))[0].0,
            "validity.issuer"
        );
    }

    /// A profile exercising every knob, loaded through the same checks as a file.
    fn rich(extra: &str) -> Profile {
        let text = format!(
            r#"{{"name":"rich","key_types":["ecdsa-p256","ed25519"],
            "parts":{{"node":{{"kind":"dns_label","values":["n1","n2"]}},"host":{{"kind":"dns_name"}}}},
            "subject":{{"CN":{{"required":true,"values":["fixed"],"patterns":["system:node:{{node}}","svc-{{host}}"]}},
                        "O":{{"values":["a","b"],"forbidden":["system:masters"]}}}},
            "san":{{"dns":["*.cluster.local","{{node}}.nodes.internal","api.example.com"],"ip":["10.0.0.0/8","fd00::/8"],
                    "email":["ops@example.com"],"uri":["spiffe://cluster/"],"required_ip":[],"max":4{extra}}},
            "key_usage":["digital_signature","key_encipherment"],"extended_key_usage":["client_auth","server_auth"],
            "validity":{{"default":"30d","max":"90d"}}}}"#
        );
        Profile::parse(
            &text,
            std::path::Path::new("rich.json"),
            "rich",
            &crate::profile::Site::default(),
        )
        .unwrap()
    }

    fn build(f: impl FnOnce(&mut rcgen::CertificateParams)) -> VerifiedCsr {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "fixed");
        f(&mut p);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        csr::parse(p.serialize_request(&key).unwrap().der()).unwrap()
    }

    fn dn(p: &mut rcgen::CertificateParams, pairs: &[(rcgen::DnType, &str)]) {
        p.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in pairs {
            p.distinguished_name.push(t.clone(), *v);
        }
    }

    fn sans(p: &mut rcgen::CertificateParams, list: &[rcgen::SanType]) {
        p.subject_alt_names = list.to_vec();
    }

    fn dns(n: &str) -> rcgen::SanType {
        rcgen::SanType::DnsName(n.try_into().unwrap())
    }

    #[test]
    fn every_rule_accepts_what_it_allows_and_refuses_the_rest() {
        use rcgen::DnType::{
            CommonName as Cn, OrganizationName as O, OrganizationalUnitName as Ou,
        };
        use rcgen::SanType::{IpAddress, Rfc822Name, URI};
        type Case = (
            &'static str,
            Box<dyn FnOnce(&mut rcgen::CertificateParams)>,
            Option<(&'static str, &'static str)>,
        );
        let ip = |s: &str| IpAddress(s.parse().unwrap());
        let cases: Vec<Case> = vec![
            ("exact CN", Box::new(|_| {}), None),
            (
                "pattern with a listed part",
                Box::new(|p| dn(p, &[(Cn, "system:node:n1")])),
                None,
            ),
            (
                "part not in its value list",
                Box::new(|p| dn(p, &[(Cn, "system:node:n3")])),
                Some(("subject.CN", "system:node:n3")),
            ),
            (
                "dns_name part",
                Box::new(|p| dn(p, &[(Cn, "svc-a.b.c")])),
                None,
            ),
            (
                "dns_name part with bad syntax",
                Box::new(|p| dn(p, &[(Cn, "svc-a..b")])),
                Some(("subject.CN", "svc-a..b")),
            ),
            (
                "allowed O",
                Box::new(|p| dn(p, &[(O, "b"), (Cn, "fixed")])),
                None,
            ),
            (
                "O not listed",
                Box::new(|p| dn(p, &[(O, "c"), (Cn, "fixed")])),
                Some(("subject.O", "c")),
            ),
            (
                "O forbidden",
                Box::new(|p| dn(p, &[(O, "system:masters"), (Cn, "fixed")])),
                Some(("subject.O.forbidden", "system:masters")),
            ),
            (
                "attribute not in profile",
                Box::new(|p| dn(p, &[(Ou, "x"), (Cn, "fixed")])),
                Some(("subject.attribute", "OU=x")),
            ),
            (
                "CN missing",
                Box::new(|p| dn(p, &[(O, "a")])),
                Some(("subject.CN.required", "")),
            ),
            (
                "CN with a control character",
                Box::new(|p| dn(p, &[(Cn, "fix\u{7}ed")])),
                Some(("subject.CN.value", "fix\u{7}ed")),
            ),
            (
                "suffix rule, two labels deep",
                Box::new(|p| sans(p, &[dns("a.b.cluster.local")])),
                None,
            ),
            (
                "suffix itself is not under the suffix",
                Box::new(|p| sans(p, &[dns("cluster.local")])),
                Some(("san.dns", "cluster.local")),
            ),
            (
                "part inside a DNS rule",
                Box::new(|p| sans(p, &[dns("n2.nodes.internal")])),
                None,
            ),
            (
                "part value not listed in a DNS rule",
                Box::new(|p| sans(p, &[dns("n9.nodes.internal")])),
                Some(("san.dns", "n9.nodes.internal")),
            ),
            (
                "wildcard refused by default",
                Box::new(|p| sans(p, &[dns("*.cluster.local")])),
                Some(("san.dns.wildcard", "*.cluster.local")),
            ),
            (
                "single label refused by default",
                Box::new(|p| sans(p, &[dns("node1")])),
                Some(("san.dns.single_label", "node1")),
            ),
            (
                "non-LDH name",
                Box::new(|p| sans(p, &[dns("a_b.cluster.local")])),
                Some(("san.dns.syntax", "a_b.cluster.local")),
            ),
            (
                "foreign name",
                Box::new(|p| sans(p, &[dns("evil.com")])),
                Some(("san.dns", "evil.com")),
            ),
            (
                "IPv4 in range",
                Box::new(move |p| sans(p, &[ip("10.1.2.3")])),
                None,
            ),
            (
                "IPv6 in range",
                Box::new(move |p| sans(p, &[ip("fd00::5")])),
                None,
            ),
            (
                "IP outside",
                Box::new(move |p| sans(p, &[ip("11.0.0.1")])),
                Some(("san.ip", "11.0.0.1")),
            ),
            (
                "listed email",
                Box::new(|p| sans(p, &[Rfc822Name("ops@example.com".try_into().unwrap())])),
                None,
            ),
            (
                "other email",
                Box::new(|p| sans(p, &[Rfc822Name("x@example.com".try_into().unwrap())])),
                Some(("san.email", "x@example.com")),
            ),
            (
                "URI under an allowed prefix",
                Box::new(|p| sans(p, &[URI("spiffe://cluster/ns/a".try_into().unwrap())])),
                None,
            ),
            (
                "URI elsewhere",
                Box::new(|p| sans(p, &[URI("https://x".try_into().unwrap())])),
                Some(("san.uri", "https://x")),
            ),
            (
                "duplicate SAN",
                Box::new(|p| sans(p, &[dns("api.example.com"), dns("api.example.com")])),
                Some(("san.duplicate", "DNS:api.example.com")),
            ),
            (
                "too many SANs",
                Box::new(move |p| {
                    sans(
                        p,
                        &[
                            ip("10.0.0.1"),
                            ip("10.0.0.2"),
                            ip("10.0.0.3"),
                            ip("10.0.0.4"),
                            ip("10.0.0.5"),
                        ],
                    );
                }),
                Some(("san.max", "5")),
            ),
            (
                "requested usages within the profile",
                Box::new(|p| {
                    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
                    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
                    p.is_ca = rcgen::IsCa::ExplicitNoCa;
                }),
                None,
            ),
            (
                "requested keyEncipherment on an EC key",
                Box::new(|p| p.key_usages = vec![rcgen::KeyUsagePurpose::KeyEncipherment]),
                Some(("extensions.key_usage", "key_encipherment")),
            ),
            (
                "requested codeSigning",
                Box::new(|p| {
                    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
                }),
                Some(("extensions.extended_key_usage", "1.3.6.1.5.5.7.3.3")),
            ),
            (
                "requested CA:TRUE",
                Box::new(|p| p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0))),
                Some(("extensions.basic_constraints", "CA:TRUE")),
            ),
            (
                "unknown extension",
                Box::new(|p| {
                    p.custom_extensions
                        .push(rcgen::CustomExtension::from_oid_content(
                            &[1, 2, 3],
                            vec![5, 0],
                        ));
                }),
                Some(("extensions.unknown", "1.2.3")),
            ),
        ];
        for (what, f, want) in cases {
            let got = decide(&rich(""), &build(f), &ctx());
            match (want, got) {
                (None, Ok(_)) => {}
                (Some((rule, value)), Err(refusals)) => {
                    assert!(
                        refusals.iter().any(|r| r.rule == rule && r.value == value),
                        "{what}: want {rule}={value:?}, got {refusals:?}"
                    );
                }
                (want, got) => panic!("{what}: want {want:?}, got {got:?}"),
            }
        }
        // The knobs that widen a rule.
        let wide = rich(r#","wildcards":true,"single_label_dns":true,"min":0"#);
        let wildcard = build(|p| sans(p, &[dns("*.a.cluster.local")]));
        assert!(decide(&wide, &wildcard, &ctx()).is_ok());
        let nested = build(|p| sans(p, &[dns("*.*.cluster.local")]));
        assert_eq!(
            rules(decide(&wide, &nested, &ctx())),
            vec![("san.dns.wildcard".into(), "*.*.cluster.local".into())]
        );
        let need_two = rich(r#","min":2"#);
        assert_eq!(
            rules(decide(&need_two, &build(|_| {}), &ctx())),
            vec![("san.min".into(), "0".into())]
        );
    }

    #[test]
    fn profiles_that_widen_by_mistake_fail_to_load() {
        let site = crate::profile::Site::default();
        let load = |text: &str| {
            Profile::parse(text, std::path::Path::new("p.json"), "p", &site)
                .unwrap_err()
                .to_string()
        };
        let base = r#"{"name":"p","key_types":["ecdsa-p256"],"subject":{"CN":{"required":true,"values":["x"]}},
            "key_usage":["digital_signature"],"extended_key_usage":["client_auth"],"validity":{"default":"1d","max":"2d"}"#;
        let cases = [
            (r#","key_usage":["key_cert_sign"]}"#, "only for CA profiles"),
            (r#","issuer":"../root"}"#, "is not root or a CA name"),
            (r#","parts":{"x":{"kind":"dns_label"}}}"#, "parts.x"),
            (r#","san":{"ip":["10.0.0.0/40"]}}"#, "san.ip"),
            (
                r#","san":{"dns":["${nope}"]}}"#,
                "unknown site parameter ${nope}",
            ),
            (r#","san":{"dns":["x.${node_ip_ranges}"]}}"#, "is a list"),
            (
                r#","ca":{"path_len":0}}"#,
                "a CA profile needs key_cert_sign and crl_sign",
            ),
        ];
        for (extra, want) in cases {
            let err = load(&format!("{base}{extra}"));
            assert!(err.contains(want), "{extra}: {err}");
        }
        let bad_usage = base.replace(
            r#""key_usage":["digital_signature"]"#,
            r#""key_usage":["digital_signature","crl_sign"]"#,
        );
        assert!(load(&format!("{bad_usage}}}")).contains("only for CA profiles"));
        let no_cn = base.replace(r#""required":true,"#, "");
        assert!(load(&format!("{no_cn}}}")).contains("must require a CN"));
    }

    /// Issue 16: a refusal whose allowed values come from the site names the parameter, lists
    /// the values and says how to change it.
    #[test]
    fn refusals_name_the_site_parameter_that_would_allow_the_value() {
        use rcgen::DnType::*;
        let site = crate::profile::Site::parse(
            r#"{"node_names":["node-a","node-b","node-c"],"countries":["DE","FR"]}"#,
            std::path::Path::new("site.json"),
        )
        .unwrap();
        let text = r#"{"name":"k","key_types":["ecdsa-p256"],
            "parts":{"node":{"kind":"dns_label","values":["${node_names}"]}},
            "subject":{"CN":{"required":true,"patterns":["system:node:{node}"]},
                       "C":{"values":["${countries}"]},"ST":{"values":["${states}"]}},
            "san":{"dns":["${node_domains}","api.example.com"],"ip":["${node_ip_ranges}"],
                   "single_label_dns":"${kubeadm_single_label_names}"},
            "key_usage":["digital_signature"],"extended_key_usage":["client_auth"],
            "validity":{"default":"1d","max":"2d"}}"#;
        let profile = Profile::parse(text, std::path::Path::new("k.json"), "k", &site).unwrap();
        let worker = csr(
            &[
                (CommonName, "system:node:worker-01"),
                (CountryName, "US"),
                (StateOrProvinceName, "Bavaria"),
            ],
            &["worker", "w.example.org", "10.1.2.3"],
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        let refusals = decide(&profile, &worker, &ctx()).unwrap_err();
        let expected = |rule: &str| {
            refusals
                .iter()
                .find(|r| r.rule == rule)
                .map(|r| r.expected.clone())
                .unwrap_or_else(|| panic!("no {rule} in {refusals:?}"))
        };
        let cn = expected("subject.CN");
        for want in [
            "node_names",
            "\"node-a\", \"node-b\", \"node-c\"",
            "hsmca profiles apply",
        ] {
            assert!(cn.contains(want), "{want}: {cn}");
        }
        assert!(expected("subject.C").contains("\"DE\", \"FR\" (from site parameter countries"));
        let st = expected("subject.ST");
        assert!(
            st.starts_with("nothing: site parameter states is empty"),
            "{st}"
        );
        assert!(expected("san.dns.single_label").contains("kubeadm_single_label_names"));
        assert!(expected("san.dns").contains("node_domains"));
        assert!(expected("san.ip").contains("node_ip_ranges"));
        // A long list shows its first values and the count.
        let many: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
        assert_eq!(
            one_of(many.iter().map(String::as_str)),
            r#"one of "n0", "n1", "n2", "n3", "n4", "n5", ... (20 in all)"#
        );
    }
}
