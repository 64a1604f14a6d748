//! `hsmca sign` and `hsmca check`: CSR files named on the command line, under one profile.
//! `check` decides without the token; `sign` issues through the engine (one chunk) and writes
//! each certificate only once it is durable in the log under a signed checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::clock::Clock;
use crate::csr::{self, VerifiedCsr};
use crate::engine::{self, CaSession, CertSummary, Outcome, Ready, Withheld};
use crate::error::Error;
use crate::home::Home;
use crate::policy::{self, Context, Purpose, Refusal};
use crate::profile::Duration;
use crate::signer::Keystore;

/// What `sign` and `check` are asked to do.
#[derive(Debug, Clone)]
pub struct SignRequest {
    /// Profile name.
    pub profile: String,
    /// CSR files.
    pub csrs: Vec<PathBuf>,
    /// Output file (one CSR) or directory (several); default: beside each CSR.
    pub out: Option<PathBuf>,
    /// Append the issuing CA's chain (the intermediate, if any, and the root) to each file.
    pub chain: bool,
    /// Requested validity.
    pub validity: Option<Duration>,
}

impl SignRequest {
    fn out_path(&self, csr: &Path) -> PathBuf {
        engine::out_path(self.out.as_deref(), self.csrs.len() == 1, csr)
    }
}

/// What `sign` did: one outcome per CSR, and why it stopped early, if it did (the command
/// reports the outcomes, then exits with the stop's code).
#[derive(Debug)]
pub struct Signed {
    /// One per CSR, in order.
    pub outcomes: Vec<Outcome>,
    /// Set when the run stopped before its end.
    pub halt: Option<engine::Halt>,
}

fn load_csr(path: &Path) -> Result<VerifiedCsr, Box<Outcome>> {
    csr::load(path).map_err(|e| {
        let (rule, error) = match e {
            csr::CsrLoadError::Read(e) => (e.rule().to_owned(), crate::error::chain(&e)),
            csr::CsrLoadError::Csr(c) => (c.rule().to_owned(), c.to_string()),
        };
        Box::new(Outcome::Failed {
            csr: path.to_path_buf(),
            rule,
            error,
        })
    })
}

/// `hsmca check`: the decision for each CSR, without the token, the PIN or the lock. It shows
/// the certificate that would really be issued: the profile's issuer, and a validity bounded
/// by that issuer's notAfter.
pub fn check(home: &Home, req: &SignRequest, clock: &dyn Clock) -> Result<Vec<Outcome>, Error> {
    let profile = home.profile(&req.profile)?;
    let (issuer, _) = home.issuer(&profile.issuer)?;
    let issuer_subject = engine::subject_of(&issuer);
    let ctx = Context {
        purpose: Purpose::Leaf,
        kubernetes: None,
        now: clock.now(),
        serial: vec![0; 16],
        requested_validity: req.validity,
        issuer_not_after: issuer.not_after,
        allow_profiles: None,
        compromised: std::sync::Arc::new(compromised_keys(home)?),
    };
    Ok(req
        .csrs
        .iter()
        .map(|path| match load_csr(path) {
            Err(failed) => *failed,
            Ok(c) => match policy::decide(&profile, &c, &ctx) {
                Ok(d) => Outcome::WouldIssue {
                    csr: path.clone(),
                    cert: CertSummary::of(&d, &issuer_subject),
                },
                Err(refusals) => Outcome::Refused {
                    csr: path.clone(),
                    refusals,
                },
            },
        })
        .collect())
}

/// How many of the profiles that refuse a CSR `check --profile auto` shows, closest first.
pub const CLOSEST: usize = 3;

/// One profile judged for one CSR by `check --profile auto`.
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    /// The profile.
    pub profile: String,
    /// A dangerous profile (system:masters, or the site's `danger_profiles`): `plan` and
    /// `sign-dir` issue it only when named with `--allow-profile`.
    pub danger: bool,
    /// What would be issued, when the profile accepts the CSR.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<CertSummary>,
    /// Every rule it violates (empty when it accepts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refusals: Vec<Refusal>,
}

/// `check --profile auto` for one CSR: the profiles that accept it, and the closest that do
/// not (fewest violations of the group, O, then fewest violations), with why.
#[derive(Debug, Clone, Serialize)]
pub struct AutoCheck {
    /// The CSR file.
    pub csr: PathBuf,
    /// Profiles under which it would be issued.
    pub accepted: Vec<Fit>,
    /// Up to [`CLOSEST`] profiles that refuse it, fewest violations first.
    pub closest: Vec<Fit>,
    /// Set when the CSR itself is unusable (unreadable, malformed, bad signature).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<Outcome>,
}

impl AutoCheck {
    /// Some profile accepts it.
    pub fn ok(&self) -> bool {
        !self.accepted.is_empty()
    }
}

/// `hsmca check --profile auto`: every CSR against every leaf profile of the home, without
/// the token. CA profiles are never offered: no CSR gets a CA certificate (rule
/// `profile.ca`). Dangerous profiles are judged like the others and marked. A profile whose
/// issuer was not created yet is refused by `profile.issuer`, with the command that creates it.
pub fn check_auto(
    home: &Home,
    csrs: &[PathBuf],
    validity: Option<Duration>,
    clock: &dyn Clock,
) -> Result<Vec<AutoCheck>, Error> {
    let root = home.root()?;
    let compromised = std::sync::Arc::new(compromised_keys(home)?);
    let mut profiles = Vec::new();
    for name in crate::profile::list(&home.profiles_dir()) {
        let profile = home.profile(&name)?;
        if profile.ca.is_some() {
            continue;
        }
        let issuer = home.issuer(&profile.issuer).map(|(cert, _)| cert);
        let issuer_subject = issuer.as_ref().map(engine::subject_of).unwrap_or_default();
        let issuer = issuer.map_err(|e| e.to_string());
        profiles.push((profile, issuer, issuer_subject));
    }
    let mut checks = Vec::with_capacity(csrs.len());
    for path in csrs {
        let csr = match load_csr(path) {
            Ok(c) => c,
            Err(failed) => {
                checks.push(AutoCheck {
                    csr: path.clone(),
                    accepted: Vec::new(),
                    closest: Vec::new(),
                    failed: Some(*failed),
                });
                continue;
            }
        };
        let (mut accepted, mut refused) = (Vec::new(), Vec::new());
        for (profile, issuer, issuer_subject) in &profiles {
            let ctx = Context {
                purpose: Purpose::Leaf,
                kubernetes: None,
                now: clock.now(),
                serial: vec![0; 16],
                requested_validity: validity,
                issuer_not_after: issuer.as_ref().unwrap_or(&root).not_after,
                allow_profiles: None,
                compromised: compromised.clone(),
            };
            let mut fit = Fit {
                profile: profile.name.clone(),
                danger: profile.danger(),
                cert: None,
                refusals: Vec::new(),
            };
            match policy::decide(profile, &csr, &ctx) {
                Ok(d) => fit.cert = Some(CertSummary::of(&d, issuer_subject)),
                Err(refusals) => fit.refusals = refusals,
            }
            if let Err(missing) = issuer {
                fit.cert = None;
                fit.refusals.push(Refusal {
                    rule: "profile.issuer".into(),
                    expected: format!("an issuer that exists: {missing}"),
                    value: profile.issuer.clone(),
                });
            }
            if fit.refusals.is_empty() {
                accepted.push(fit);
            } else {
                refused.push(fit);
            }
        }
        refused.sort_by_cached_key(|f| (group_violations(f), f.refusals.len(), f.profile.clone()));
        refused.truncate(CLOSEST);
        checks.push(AutoCheck {
            csr: path.clone(),
            accepted,
            closest: refused,
            failed: None,
        });
    }
    Ok(checks)
}

/// Refusals of the subject's O, the Kubernetes group the CSR asks to be in: what it really
/// asks for, so `check --profile auto` ranks a profile that grants that group closest (a
/// cfssl admin CSR with O=system:masters is nearest to super-admin, not to a profile that
/// only happens to allow its C and OU).
fn group_violations(fit: &Fit) -> usize {
    fit.refusals
        .iter()
        .filter(|r| {
            r.rule == "subject.O"
                || r.rule.starts_with("subject.O.")
                || (r.rule == "subject.attribute" && r.value.starts_with("O="))
        })
        .count()
}

/// Keys revoked for key compromise, read from the log without the lock (for `check`).
fn compromised_keys(home: &Home) -> Result<BTreeMap<String, String>, Error> {
    let log = crate::log::Log::open_mode(&home.dir, crate::log::Mode::Tolerant)?;
    Ok(log
        .compromised()?
        .into_iter()
        .filter_map(|(serial, der)| {
            let (key, _) = crate::verify::key_and_expiry(&der).ok()?;
            Some((key.fingerprint(), serial))
        })
        .collect())
}

/// `hsmca sign`: decide, log the intents, sign in the token, check, log the results,
/// checkpoint, and only then write the certificates. A refused or broken CSR is reported and
/// the rest are signed. A CSR the log already holds under this profile gets its logged
/// certificate written again. A run that stops (a bad signature, a failing token) still writes
/// and reports what it issued before the stop.
pub fn sign(
    home: &Home,
    req: &SignRequest,
    keys: &dyn Keystore,
    clock: &dyn Clock,
) -> Result<Signed, Error> {
    let mut session = CaSession::open(home, keys, clock)?;
    let profile = session.profile(&req.profile)?;
    let issuer = session.issuer(&profile.issuer)?;
    let (issuer_cert, issuer_subject) = (issuer.cert.clone(), issuer.subject.clone());

    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(req.csrs.len());
    let mut release: Vec<(usize, Vec<u8>, String)> = Vec::new();
    let mut fresh: Vec<(usize, VerifiedCsr)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for path in &req.csrs {
        let index = outcomes.len();
        let csr = match load_csr(path) {
            Ok(c) => c,
            Err(failed) => {
                outcomes.push(Some(*failed));
                continue;
            }
        };
        match session.prior(&csr.sha256, &profile.name)? {
            Some(prior) if prior.revoked => outcomes.push(Some(Outcome::Failed {
                csr: path.clone(),
                rule: "revoked".into(),
                error: format!(
                    "this CSR's certificate (serial {}) was revoked; it is not issued again",
                    prior.serial
                ),
            })),
            Some(prior) => {
                let cert = CertSummary::read_back(&prior.der, &profile.name, &issuer_subject);
                release.push((index, prior.der, prior.serial.clone()));
                outcomes.push(Some(Outcome::Issued {
                    csr: path.clone(),
                    cert: CertSummary {
                        serial: prior.serial,
                        ..cert
                    },
                    file: req.out_path(path),
                    log_entry: prior.log_entry,
                    already_issued: true,
                }));
            }
            None if !seen.insert(csr.sha256.clone()) => outcomes.push(Some(Outcome::Failed {
                csr: path.clone(),
                rule: "csr.duplicate".into(),
                error: "the same CSR appears earlier in this run; it is issued once".into(),
            })),
            None => {
                outcomes.push(None);
                fresh.push((index, csr));
            }
        }
    }

    let serials = session.serials(fresh.len())?;
    let mut ready = Vec::new();
    let mut ready_at = Vec::new();
    for ((index, csr), serial) in fresh.into_iter().zip(serials) {
        let path = req.csrs[index].clone();
        let ctx = Context {
            purpose: Purpose::Leaf,
            kubernetes: None,
            now: clock.now(),
            serial,
            requested_validity: req.validity,
            issuer_not_after: issuer_cert.not_after,
            allow_profiles: None,
            compromised: session.compromised(),
        };
        match policy::decide(&profile, &csr, &ctx) {
            Err(refusals) => {
                outcomes[index] = Some(Outcome::Refused {
                    csr: path,
                    refusals,
                });
            }
            Ok(d) => match Ready::new(d, &issuer_cert, csr.sha256.clone(), None) {
                Ok(r) => {
                    ready.push(r);
                    ready_at.push(index);
                }
                Err(e) => {
                    outcomes[index] = Some(Outcome::Failed {
                        csr: path,
                        rule: "build".into(),
                        error: crate::error::chain(&e),
                    });
                }
            },
        }
    }
    let issued = session.issue(ready)?;
    for ((r, result), index) in issued
        .certificates
        .into_iter()
        .map(|m| (m.ready, m.result))
        .zip(ready_at)
    {
        let path = req.csrs[index].clone();
        outcomes[index] = Some(match result {
            Ok((seq, der)) => {
                let cert = CertSummary::of(&r.prepared.decision, &issuer_subject);
                release.push((index, der, cert.serial.clone()));
                Outcome::Issued {
                    csr: path.clone(),
                    cert,
                    file: req.out_path(&path),
                    log_entry: seq,
                    already_issued: false,
                }
            }
            Err(Withheld { rule, error }) => Outcome::Failed {
                csr: path,
                rule: rule.into(),
                error,
            },
        });
    }

    // Every certificate below is durable in the log and covered by a signed checkpoint.
    let chain = if req.chain {
        home.chain_pem(&profile.issuer)?
    } else {
        String::new()
    };
    for (index, der, serial) in release {
        let Some(Outcome::Issued { file, csr, .. }) = &outcomes[index] else {
            continue;
        };
        let mut text = engine::pem("CERTIFICATE", &der);
        text.push_str(&chain);
        if let Err(Withheld { rule, error }) = engine::release(file, text.as_bytes(), &serial) {
            outcomes[index] = Some(Outcome::Failed {
                csr: csr.clone(),
                rule: rule.into(),
                error,
            });
        }
    }
    Ok(Signed {
        outcomes: outcomes.into_iter().flatten().collect(),
        halt: issued.halt,
    })
}
