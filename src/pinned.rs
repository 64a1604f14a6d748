//! What the log pins besides certificates, and the checks against it: the policy in force
//! (every profile and the site parameters; logged by `init` and `hsmca profiles apply`), the
//! PKCS#11 module (logged by `init`, and again when `--module` names another one) and the log
//! head (a copy of the latest checkpoint kept in the token).
//!
//! Someone with write access to the CA home but without the PIN can edit profiles,
//! `site.json`, `hsmca.json` and the log itself. None of that takes effect unseen: a changed
//! policy file stops every signing command until an operator logs the new policy with the
//! token; another module is refused before it is loaded; a log that no longer extends the
//! token's head is refused. No token access here: callers pass what the token holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::home::{Home, HomeError, io_at};
use crate::keys;
use crate::log::{self, Body, ModulePin, PolicyPin};
use crate::profile::{Profile, ProfileError, Site};

/// Why a pin refuses.
#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    /// A CA home whose log has no `policy` entry (made before policies were logged).
    #[error("{}: the issuance log records no policy, so nothing can be signed under it", .0.display())]
    NoPolicy(PathBuf),
    /// Policy files differ from the last logged policy.
    #[error(
        "{}: the profiles or site parameters differ from the policy in the log (entry {seq}): {}",
        .home.display(),
        .changes.join(", ")
    )]
    PolicyDrift {
        /// The CA home.
        home: PathBuf,
        /// The logged policy's entry.
        seq: u64,
        /// `profiles/x.json changed`, `... added`, `... removed`.
        changes: Vec<String>,
    },
    /// The module differs from the one the log pins.
    #[error(
        "{path}: PKCS#11 module (SHA-256 {sha256}) is not the one pinned in the log ({pinned_path}, SHA-256 {pinned_sha256}); refusing to load it"
    )]
    ModuleChanged {
        /// The module that would be loaded.
        path: String,
        /// Its hash.
        sha256: String,
        /// The pinned one.
        pinned_path: String,
        /// Its hash.
        pinned_sha256: String,
    },
    /// The log pins no module (a CA home made before modules were pinned).
    #[error("{path}: the issuance log pins no PKCS#11 module; refusing to load one unnamed")]
    ModuleUnpinned {
        /// The module that would be loaded.
        path: String,
    },
    /// The module file cannot be read.
    #[error("{}: cannot read the PKCS#11 module", .path.display())]
    ModuleRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The log does not extend the head kept in the token.
    #[error("the issuance log does not extend the log head kept in the token: {0}")]
    LogHead(String),
    /// Entries past the latest checkpoint.
    #[error(
        "entries {from}..{to} of the issuance log are past the latest checkpoint: no checkpoint signs them"
    )]
    UnsignedTail {
        /// First unsigned entry.
        from: u64,
        /// Last one.
        to: u64,
    },
    /// A plan signed without the approved hash.
    #[error("{0}")]
    NotApproved(String),
}

impl PinnedError {
    /// The exit code: 2 for the policy and approvals, 3 for the module, 4 for the log head.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NoPolicy(_) | Self::PolicyDrift { .. } | Self::NotApproved(_) => 2,
            Self::ModuleChanged { .. } | Self::ModuleUnpinned { .. } | Self::ModuleRead { .. } => 3,
            Self::LogHead(_) | Self::UnsignedTail { .. } => 4,
        }
    }

    /// What to do next.
    pub fn hint(&self) -> Option<&'static str> {
        Some(match self {
            Self::NoPolicy(_) => {
                "review the profiles and site.json, then log them with `hsmca profiles apply --home DIR` (needs the token)"
            }
            Self::PolicyDrift { .. } => {
                "if the change is intended, review it and log it with `hsmca profiles apply --home DIR` (needs the token); otherwise restore the files"
            }
            Self::ModuleChanged { .. } | Self::ModuleUnpinned { .. } => {
                "check who changed hsmca.json, HSMCA_PKCS11_MODULE or the module file; to move to another module on purpose, name it with --module (the change is logged)"
            }
            Self::LogHead(_) => {
                "the CA home was rolled back, truncated or rewritten: restore the log from the latest ceremony backup and compare with the checkpoint in the minutes"
            }
            Self::UnsignedTail { .. } => {
                "a command stopped before its checkpoint, or entries were added by hand: check them with `hsmca log verify --home DIR` (and `log list`), then sign them with `hsmca log recover --home DIR`"
            }
            Self::NotApproved(_) => {
                "sign with --approve HASH, the plan hash the reviewers wrote down from `hsmca plan`"
            }
            Self::ModuleRead { .. } => return None,
        })
    }
}

/// The policy files of a CA home, by path relative to it: `site.json` (when present) and
/// every `profiles/*.json`.
pub fn policy_files(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, HomeError> {
    let mut out = BTreeMap::new();
    let site = dir.join("site.json");
    if site.exists() {
        out.insert(
            "site.json".to_owned(),
            std::fs::read(&site).map_err(io_at(&site))?,
        );
    }
    for name in crate::profile::list(&dir.join("profiles")) {
        let rel = format!("profiles/{name}.json");
        let path = dir.join(&rel);
        out.insert(rel, std::fs::read(&path).map_err(io_at(&path))?);
    }
    Ok(out)
}

/// SHA-256 of each file.
pub fn hashes(files: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|(k, v)| (k.clone(), keys::sha256_hex(v)))
        .collect()
}

/// The `policy` entry for the files of the CA home at `dir`: every profile expanded with the
/// site parameters (so the log shows what was really in force), and their hashes. Refuses a
/// profile that does not load.
pub fn policy_entry(dir: &Path) -> Result<Body, Error> {
    let files = policy_files(dir)?;
    let site = site_of(dir, &files)?;
    let mut profiles = BTreeMap::new();
    for (rel, bytes) in &files {
        let Some(name) = rel
            .strip_prefix("profiles/")
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let profile = parse_profile(&dir.join(rel), name, bytes, &site)?;
        let value = serde_json::to_value(&profile).map_err(|e| Error::Internal(e.to_string()))?;
        profiles.insert(name.to_owned(), value);
    }
    let hashes = hashes(&files);
    Ok(Body::Policy {
        policy_sha256: log::policy_sha256(&hashes),
        files: hashes,
        site: serde_json::to_value(&site).map_err(|e| Error::Internal(e.to_string()))?,
        profiles,
    })
}

fn site_of(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<Site, Error> {
    match files.get("site.json") {
        None => Ok(Site::default()),
        Some(bytes) => {
            let path = dir.join("site.json");
            Ok(Site::parse(&utf8(&path, bytes)?, &path)?)
        }
    }
}

fn utf8(path: &Path, bytes: &[u8]) -> Result<String, ProfileError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ProfileError::Syntax {
        path: path.to_path_buf(),
        message: "not UTF-8".into(),
    })
}

fn parse_profile(path: &Path, name: &str, bytes: &[u8], site: &Site) -> Result<Profile, Error> {
    Ok(Profile::parse(&utf8(path, bytes)?, path, name, site)?)
}

/// What differs between the logged policy and the files now: `profiles/x.json changed`,
/// `... added`, `... removed`.
pub fn changes(pinned: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (file, hash) in now {
        match pinned.get(file) {
            None => out.push(format!("{file} added")),
            Some(h) if h != hash => out.push(format!("{file} changed")),
            Some(_) => {}
        }
    }
    for file in pinned.keys().filter(|f| !now.contains_key(*f)) {
        out.push(format!("{file} removed"));
    }
    out
}

/// [`changes`] with, for each changed file, the keys whose expanded values differ between the
/// two `policy` entries (`profiles/kubelet-client.json changed: subject, validity`), so the
/// reviewers see what the edit does, not only where.
pub fn detailed_changes(previous: &Body, new: &Body) -> Vec<String> {
    let (
        Body::Policy {
            files: old_files,
            site: old_site,
            profiles: old_profiles,
            ..
        },
        Body::Policy {
            files,
            site,
            profiles,
            ..
        },
    ) = (previous, new)
    else {
        return Vec::new();
    };
    changes(old_files, files)
        .into_iter()
        .map(|change| {
            let Some(file) = change.strip_suffix(" changed") else {
                return change;
            };
            let keys = match file
                .strip_prefix("profiles/")
                .and_then(|n| n.strip_suffix(".json"))
            {
                None => changed_keys(old_site, site),
                Some(name) => match (old_profiles.get(name), profiles.get(name)) {
                    (Some(old), Some(new)) => changed_keys(old, new),
                    _ => Vec::new(),
                },
            };
            if keys.is_empty() {
                change
            } else {
                format!("{change}: {}", keys.join(", "))
            }
        })
        .collect()
}

/// The top-level keys whose values differ between two JSON objects (present in only one
/// counts as differing).
fn changed_keys(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let (Some(old), Some(new)) = (old.as_object(), new.as_object()) else {
        return Vec::new();
    };
    let mut keys: Vec<String> = old
        .keys()
        .chain(new.keys())
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Refuses a CA home whose policy files differ from the last logged policy, or that has none.
pub fn check_policy(dir: &Path, pinned: Option<&PolicyPin>) -> Result<(), Error> {
    let Some(pin) = pinned else {
        return Err(PinnedError::NoPolicy(dir.to_path_buf()).into());
    };
    let changes = changes(&pin.files, &hashes(&policy_files(dir)?));
    if changes.is_empty() {
        Ok(())
    } else {
        Err(PinnedError::PolicyDrift {
            home: dir.to_path_buf(),
            seq: pin.seq,
            changes,
        }
        .into())
    }
}

/// [`check_policy`] for commands that do not take the lock or the token (`check`, `plan`):
/// they refuse too, so a review never shows what an edited profile would sign.
pub fn check_home(home: &Home) -> Result<(), Error> {
    let root = home.root()?;
    let (policy, _) = log::verified_pins(&home.dir, Some(&root.der))?;
    check_policy(&home.dir, policy.as_ref())
}

/// A profile of the CA home, read once and parsed from exactly the bytes whose hash the logged
/// policy holds (with the pinned site parameters): a file changed after the session's check is
/// refused, not used.
pub fn load_profile(home: &Home, pin: &PolicyPin, name: &str) -> Result<Profile, Error> {
    let rel = format!("profiles/{name}.json");
    if !pin.files.contains_key(&rel) {
        // Not in the policy: the usual "no such profile" message, or a drift if it appeared.
        home.profile(name)?;
        return Err(drift(home, pin, vec![format!("{rel} added")]));
    }
    let files = policy_files(&home.dir)?;
    let mut bad = Vec::new();
    for file in [rel.as_str(), "site.json"] {
        let now = files.get(file).map(|b| keys::sha256_hex(b));
        if now.as_ref() != pin.files.get(file) {
            bad.push(format!("{file} changed"));
        }
    }
    if !bad.is_empty() {
        return Err(drift(home, pin, bad));
    }
    let site = site_of(&home.dir, &files)?;
    let bytes = files.get(&rel).map(Vec::as_slice).unwrap_or_default();
    parse_profile(&home.dir.join(&rel), name, bytes, &site)
}

fn drift(home: &Home, pin: &PolicyPin, changes: Vec<String>) -> Error {
    PinnedError::PolicyDrift {
        home: home.dir.clone(),
        seq: pin.seq,
        changes,
    }
    .into()
}

/// A sealed in-memory copy of a checked module file, to load in its place.
#[derive(Debug)]
pub struct SealedModule {
    file: std::fs::File,
}

impl SealedModule {
    /// The path that loads exactly the sealed bytes.
    pub fn path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// A PKCS#11 module file, hashed before it is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    /// Canonical path (links resolved), the one that is then loaded.
    pub path: PathBuf,
    /// SHA-256 of its bytes.
    pub sha256: String,
}

impl ModuleFile {
    /// Resolves links and hashes the file.
    pub fn hash(path: &Path) -> Result<Self, PinnedError> {
        let read = |source| PinnedError::ModuleRead {
            path: path.to_path_buf(),
            source,
        };
        let path = std::fs::canonicalize(path).map_err(read)?;
        let bytes = std::fs::read(&path).map_err(read)?;
        Ok(Self {
            sha256: keys::sha256_hex(&bytes),
            path,
        })
    }

    /// A sealed in-memory copy of the module to load, made from the file read again now and
    /// refused unless its bytes still have the hash that was checked. The token is then opened
    /// from the copy (`/proc/self/fd/N`), so a module file swapped or rewritten after the check
    /// (while the PIN prompt waits, say) is never what gets loaded.
    pub fn seal(&self) -> Result<SealedModule, PinnedError> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let read = |source| PinnedError::ModuleRead {
            path: self.path.clone(),
            source,
        };
        let bytes = std::fs::read(&self.path).map_err(read)?;
        let now = keys::sha256_hex(&bytes);
        if now != self.sha256 {
            return Err(PinnedError::ModuleChanged {
                path: self.path.display().to_string(),
                sha256: now,
                pinned_path: self.path.display().to_string(),
                pinned_sha256: self.sha256.clone(),
            });
        }
        let sys = |e: nix::errno::Errno| read(std::io::Error::from(e));
        let fd = memfd_create(
            c"hsmca-pkcs11-module",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(sys)?;
        let mut file = std::fs::File::from(fd);
        std::io::Write::write_all(&mut file, &bytes).map_err(read)?;
        let seals = SealFlag::F_SEAL_WRITE
            | SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(sys)?;
        Ok(SealedModule { file })
    }

    /// The `module` entry pinning this file.
    pub fn entry(&self) -> Body {
        Body::Module {
            path: self.path.display().to_string(),
            sha256: self.sha256.clone(),
        }
    }

    /// Whether this is the pinned module. A different one is refused unless the operator named
    /// it with `--module` (`explicit`); then `Ok(true)` says the change must be logged.
    pub fn check(&self, pinned: Option<&ModulePin>, explicit: bool) -> Result<bool, PinnedError> {
        let path = self.path.display().to_string();
        match pinned {
            Some(p) if p.path == path && p.sha256 == self.sha256 => Ok(false),
            _ if explicit => Ok(true),
            Some(p) => Err(PinnedError::ModuleChanged {
                path,
                sha256: self.sha256.clone(),
                pinned_path: p.path.clone(),
                pinned_sha256: p.sha256.clone(),
            }),
            None => Err(PinnedError::ModuleUnpinned { path }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_name_every_file() {
        let pinned: BTreeMap<String, String> = [("a", "1"), ("b", "2"), ("c", "3")]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut now = pinned.clone();
        now.insert("b".into(), "9".into());
        now.remove("c");
        now.insert("d".into(), "4".into());
        assert_eq!(
            changes(&pinned, &now),
            vec!["b changed", "d added", "c removed"]
        );
        assert!(changes(&pinned, &pinned).is_empty());
    }

    #[test]
    fn detailed_changes_name_the_keys_that_differ() {
        let policy = |validity: &str, domain: &str, desc: &str| {
            let files = [("site.json", domain), ("profiles/p.json", desc)]
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            Body::Policy {
                policy_sha256: String::new(),
                files,
                site: serde_json::json!({"cluster_domain": domain}),
                profiles: [(
                    "p".to_owned(),
                    serde_json::json!({"validity": validity, "description": desc}),
                )]
                .into_iter()
                .collect(),
            }
        };
        let old = policy("30d", "cluster.local", "a");
        assert_eq!(
            detailed_changes(&old, &policy("3650d", "evil.com", "a ")),
            vec![
                "profiles/p.json changed: description, validity",
                "site.json changed: cluster_domain"
            ]
        );
        assert!(detailed_changes(&old, &old).is_empty());
    }

    #[test]
    fn another_module_is_refused_unless_named() {
        let m = ModuleFile {
            path: "/m.so".into(),
            sha256: "aa".into(),
        };
        let pin = ModulePin {
            seq: 1,
            path: "/m.so".into(),
            sha256: "bb".into(),
        };
        assert!(matches!(
            m.check(Some(&pin), false),
            Err(PinnedError::ModuleChanged { .. })
        ));
        assert!(m.check(Some(&pin), true).unwrap());
        assert!(matches!(
            m.check(None, false),
            Err(PinnedError::ModuleUnpinned { .. })
        ));
        let same = ModulePin {
            sha256: "aa".into(),
            ..pin
        };
        assert!(!m.check(Some(&same), false).unwrap());
    }
}
