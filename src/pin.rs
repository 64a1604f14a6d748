//! Where the token PIN comes from: `HSMCA_PIN`, a PIN file, or a prompt without echo.
//!
//! Never from a command-line value (it would show in `ps` and shell history). The PIN lives in
//! zeroizing memory from the moment it is read until `C_Login`, and no error or log line ever
//! contains it. Before a PIN is read the process is [`harden`]ed: no core dump, not dumpable
//! (so no ptrace or `/proc/PID/mem` by the same user either). `HSMCA_PIN` is taken out of the
//! environment by `main` before anything else runs ([`keep_from_env`]), so nothing started
//! later inherits it. A PIN file must be readable by its owner only.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use zeroize::Zeroizing;

/// The environment variable a PIN may be passed in (for scripts and tests).
pub const PIN_ENV: &str = "HSMCA_PIN";

/// A PIN file is read up to this size; a PIN is at most a few dozen bytes.
const MAX_PIN_FILE: u64 = 4096;

/// The PIN `main` moved out of the environment, for [`read`].
static FROM_ENV: Mutex<Option<Zeroizing<String>>> = Mutex::new(None);

/// A token PIN; wiped from memory on drop, never printed.
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// The PIN text, for `C_Login` only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

/// Why no PIN could be had. Messages never include any part of a PIN.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The PIN file could not be read.
    #[error("{}: cannot read PIN file", .path.display())]
    File {
        /// The file named by `--pin-file`.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The PIN file can be read by group or others.
    #[error(
        "{}: PIN file is readable by group or others (mode {mode:04o}); refusing to use it: run `chmod 600 {}`",
        .path.display(),
        shell_quote(.path)
    )]
    FileMode {
        /// The file named by `--pin-file`.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The PIN file is not a regular file (a FIFO, a device, a directory).
    #[error("{}: PIN file is not a regular file", .path.display())]
    NotAFile {
        /// The file named by `--pin-file`.
        path: PathBuf,
    },
    /// Core dumps could not be disabled, or the process made non-dumpable.
    #[error("cannot protect the PIN in memory: {what} failed")]
    Harden {
        /// The call that failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// An empty PIN was given.
    #[error("the PIN is empty (from {0})")]
    Empty(&'static str),
    /// No PIN source and no terminal to prompt on.
    #[error("no PIN given and no terminal to ask on: set HSMCA_PIN or pass --pin-file FILE")]
    NoTerminal(#[source] io::Error),
}

impl PinError {
    /// What the operator can do next.
    pub fn hint(&self) -> &'static str {
        match self {
            Self::FileMode { .. } => {
                "a PIN file must be readable by its owner only; fix the mode as shown and run the same command again"
            }
            Self::Harden { .. } => {
                "hsmca sets RLIMIT_CORE to 0 and PR_SET_DUMPABLE to 0 before reading a PIN; check that no security module forbids it"
            }
            _ => {
                "the PIN comes from HSMCA_PIN, --pin-file FILE, or the prompt; never from the command line"
            }
        }
    }
}

/// Disables core dumps (`setrlimit(RLIMIT_CORE, 0, 0)`) and makes the process non-dumpable
/// (`prctl(PR_SET_DUMPABLE, 0)`: no core file, no ptrace attach and no `/proc/PID/mem` or
/// `/proc/PID/environ` for other processes of the same user). Called before any PIN is read;
/// calling it again is harmless.
pub fn harden() -> Result<(), PinError> {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|source| PinError::Harden {
        what: "setrlimit(RLIMIT_CORE, 0)",
        source,
    })?;
    nix::sys::prctl::set_dumpable(false).map_err(|source| PinError::Harden {
        what: "prctl(PR_SET_DUMPABLE, 0)",
        source,
    })
}

/// Keeps a PIN that `main` has just removed from the environment (`HSMCA_PIN`), for [`read`].
/// Hardens the process first, so the PIN is never held by a dumpable process.
pub fn keep_from_env(pin: Zeroizing<String>) -> Result<(), PinError> {
    harden()?;
    let mut kept = FROM_ENV
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *kept = Some(pin);
    Ok(())
}

/// Reads the PIN: `--pin-file` first, then `HSMCA_PIN` (as kept by [`keep_from_env`], or
/// still in the environment for callers that did not start in `main`), then a prompt on the
/// terminal. The process is [`harden`]ed first.
pub fn read(pin_file: Option<&Path>, token_label: &str) -> Result<Pin, PinError> {
    harden()?;
    if let Some(path) = pin_file {
        let text = read_file(path)?;
        return trimmed(&text, "--pin-file");
    }
    let kept = FROM_ENV
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if let Some(text) = kept {
        return trimmed(&text, PIN_ENV);
    }
    if let Some(v) = std::env::var_os(PIN_ENV) {
        let text = Zeroizing::new(v.to_string_lossy().into_owned());
        return trimmed(&text, PIN_ENV);
    }
    let text = Zeroizing::new(
        rpassword::prompt_password(format!("PIN for token {token_label:?}: "))
            .map_err(PinError::NoTerminal)?,
    );
    trimmed(&text, "the prompt")
}

/// Reads a PIN file, refusing one that group or others can read. The mode is checked on the
/// open file (`fstat`), so the file checked is the file read.
fn read_file(path: &Path) -> Result<Zeroizing<String>, PinError> {
    let io = |source| PinError::File {
        path: path.to_path_buf(),
        source,
    };
    // Non-blocking: a FIFO planted as the PIN file must not hang the run before the check
    // below refuses it (it is not a regular file).
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)
            .map_err(io)?
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(PinError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PinError::FileMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_PIN_FILE)
        .read_to_string(&mut text)
        .map_err(io)?;
    Ok(text)
}

/// A path as an operator can paste it into a shell: bare if it is plain, else single-quoted.
fn shell_quote(path: &Path) -> String {
    let s = path.display().to_string();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if plain {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn trimmed(text: &str, from: &'static str) -> Result<Pin, PinError> {
    let t = text.trim_end_matches(['\n', '\r']);
    if t.is_empty() {
        return Err(PinError::Empty(from));
    }
    Ok(Pin(Zeroizing::new(t.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "123456\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn issue_13_a_pin_file_others_can_read_is_refused_with_the_chmod_to_fix_it() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            let path = pin_file(dir.path(), "pin file's", mode);
            let err = read_file(&path).unwrap_err();
            assert!(
                matches!(err, PinError::FileMode { mode: m, .. } if m == mode),
                "{mode:o}: {err:?}"
            );
            let quoted = format!(
                "`chmod 600 '{}'`",
                path.display().to_string().replace('\'', r"'\''")
            );
            assert!(err.to_string().contains(&quoted), "{err}");
            assert!(!err.to_string().contains("123456"));
        }
        for mode in [0o600, 0o400] {
            let path = pin_file(dir.path(), "ok", mode);
            assert_eq!(read_file(&path).unwrap().as_str(), "123456\n");
        }
    }

    #[test]
    fn a_pin_file_must_be_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_file(dir.path()).unwrap_err();
        assert!(matches!(err, PinError::NotAFile { .. }), "{err:?}");
    }

    #[test]
    fn plain_paths_are_pasted_bare() {
        assert_eq!(shell_quote(Path::new("/etc/hsmca/pin")), "/etc/hsmca/pin");
        assert_eq!(shell_quote(Path::new("a b")), "'a b'");
        assert_eq!(shell_quote(Path::new("it's")), r"'it'\''s'");
    }

    #[test]
    fn hardening_turns_off_core_dumps_and_dumpability() {
        harden().unwrap();
        let (soft, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_CORE).unwrap();
        assert_eq!((soft, hard), (0, 0));
        assert!(!nix::sys::prctl::get_dumpable().unwrap());
    }
}
