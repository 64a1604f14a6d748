//! The top-level error, its exit code and its hint: the only place exit codes are decided.
//!
//! Exit codes: 0 all done; 1 some CSRs refused or failed (the rest signed and logged); 2 usage,
//! profile or CA-home error (nothing signed); 3 token or PIN problem; 4 issuance log
//! unwritable or failing verification; 5 a signed certificate failed verification, or a bug.

use crate::ceremony::CeremonyError;
use crate::engine::{EngineError, Halt};
use crate::files::FileError;
use crate::home::HomeError;
use crate::input::InputError;
use crate::issue::IssueError;
use crate::log::LogError;
use crate::pin::PinError;
use crate::pinned::PinnedError;
use crate::profile::ProfileError;
use crate::token::TokenError;

/// Everything that can stop an hsmca command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// CA home.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// Profile.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// PIN.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// Token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Issuance log.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Building or signing a certificate.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// Writing an output file.
    #[error(transparent)]
    File(#[from] FileError),
    /// Writing to standard output or error failed (a closed pipe is not an error:
    /// [`Error::is_broken_pipe`]). Every file error carries its path in its own variant.
    #[error("cannot write to the terminal or pipe")]
    Io(#[source] std::io::Error),
    /// The operating system refused a thread (out of memory or processes).
    #[error("cannot start a worker thread")]
    Thread(#[source] std::io::Error),
    /// Reading the input (a plan, a manifest, `kubectl` JSON, the input directory itself).
    #[error("{err} (rule {rule})", err = .0, rule = .0.rule())]
    Input(#[from] InputError),
    /// What the log pins (policy, module, log head) or an approval refused.
    #[error(transparent)]
    Pinned(#[from] PinnedError),
    /// `ca create` refused (nothing was signed).
    #[error(transparent)]
    Ceremony(Box<CeremonyError>),
    /// The issuance engine stopped a run, or the token's generator failed it.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A bug: something the code assumed cannot happen did.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_)
            | Self::Ceremony(_)
            | Self::Home(_)
            | Self::Profile(_)
            | Self::File(_)
            | Self::Input(_) => 2,
            Self::Pin(_) | Self::Token(_) => 3,
            // A token fault while signing a checkpoint is the token's, not the log's.
            Self::Log(LogError::CheckpointSign(e)) | Self::Issue(IssueError::Sign(e)) => {
                e.kind().exit_code()
            }
            Self::Log(_) => 4,
            Self::Engine(EngineError::Halt(Halt::TokenFailing { .. })) => 3,
            Self::Engine(EngineError::Halt(Halt::Interrupted { signal })) => signal.exit_code(),
            Self::Pinned(e) => e.exit_code(),
            Self::Engine(EngineError::Withheld(w)) if w.rule == "token.sign" => 3,
            Self::Engine(_) => 5,
            Self::Issue(IssueError::Subject(..)) => 2,
            Self::Io(_) | Self::Thread(_) => 2,
            Self::Issue(_) | Self::Internal(_) => 5,
        }
    }

    /// What to do next, when there is something useful to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            Self::Ceremony(e) => Some(e.hint()),
            _ => self.fixed_hint().map(str::to_owned),
        }
    }

    /// The hints that are the same every time.
    fn fixed_hint(&self) -> Option<&'static str> {
        if self.disk_full() {
            return Some(match self {
                Self::Log(_) => {
                    "the disk under the CA home is full: free space there, then run the same command again; it finishes the work and issues nothing twice"
                }
                _ => {
                    "the disk is full: free space (or write to another --out), then run the same command again; it finishes the work and issues nothing twice"
                }
            });
        }
        match self {
            Self::Token(e) => e.hint(),
            Self::Log(LogError::CheckpointSign(e)) | Self::Issue(IssueError::Sign(e)) => {
                e.kind().hint()
            }
            Self::Log(e) => e.hint(),
            Self::Pinned(e) => e.hint(),
            Self::Pin(e) => Some(e.hint()),
            Self::Home(HomeError::Missing(_)) => {
                Some("create a CA home with `hsmca init`, or check --home")
            }
            Self::Profile(ProfileError::NotFound { .. }) => {
                Some("list profiles with `ls HOME/profiles`, or pick one of those named above")
            }
            Self::Engine(EngineError::Halt(Halt::Interrupted { .. })) => Some(
                "what was issued before the stop is written and logged, and nothing after it was signed; run the same command again: it finishes the rest and issues nothing twice",
            ),
            Self::Engine(EngineError::Halt(Halt::TokenFailing { .. })) => Some(
                "what was issued before the stop is written and logged; check the token (is it plugged in, logged in, healthy?) and run the same command again: it finishes the rest and issues nothing twice",
            ),
            Self::Engine(EngineError::Halt(Halt::BadCertificate { .. })) => Some(
                "the token produced a certificate that does not verify: it was withheld and the run stopped so the token is not used further; what was issued before is written and logged. Check the token and the CA's key before signing again",
            ),
            Self::Input(_) => Some(
                "hsmca reads only regular files beneath the input, never through a symlink: replace what is named above with a regular file (or remove it), then run again",
            ),
            Self::Issue(IssueError::Verify(_)) => Some(
                "the certificate was withheld and the intent abandoned in the log; report this as a bug",
            ),
            _ => None,
        }
    }

    /// Whether a full disk (ENOSPC or a quota) is among the causes.
    fn disk_full(&self) -> bool {
        self.io_cause(|kind| {
            matches!(
                kind,
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        })
    }

    /// Whether a closed pipe (EPIPE) is among the causes: the reader of hsmca's output went
    /// away (`hsmca log list | head -1`), which is the reader's choice, not a failure. Asked by
    /// kind, never by message text (that depends on the platform's wording).
    pub fn is_broken_pipe(&self) -> bool {
        self.io_cause(|kind| kind == std::io::ErrorKind::BrokenPipe)
    }

    /// Whether an [`std::io::Error`] among the causes (this error included) is of a kind `want`
    /// accepts.
    fn io_cause(&self, want: impl Fn(std::io::ErrorKind) -> bool) -> bool {
        if let Self::Io(e) = self {
            return want(e.kind());
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| want(io.kind()))
            {
                return true;
            }
            cause = e.source();
        }
        false
    }
}

/// An error and its causes on one line, `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl From<CeremonyError> for Error {
    fn from(e: CeremonyError) -> Self {
        Self::Ceremony(Box::new(e))
    }
}

impl From<crate::rng::SerialError> for Error {
    fn from(e: crate::rng::SerialError) -> Self {
        Self::Token(crate::token::TokenError::Serials(e))
    }
}

/// An I/O error with no path reaching the top is a write to standard output or error (every
/// file the code opens wraps its errors with the path where it is opened).
impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// An I/O error on `path`, for the few files the CLI reads or writes itself.
pub fn at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| {
        Error::File(FileError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn a_full_disk_anywhere_in_the_causes_gets_its_hint() {
        let full = || io::Error::from(io::ErrorKind::StorageFull);
        let log = Error::Log(LogError::Io {
            path: "log/entries.jsonl".into(),
            source: full(),
        });
        assert!(log.hint().unwrap().contains("under the CA home is full"));
        let out = Error::File(FileError::Io {
            path: "out/a.crt".into(),
            source: full(),
        });
        assert!(out.hint().unwrap().contains("another --out"));
        let other = Error::File(FileError::Io {
            path: "out/a.crt".into(),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        });
        assert_eq!(other.hint(), None);
    }

    #[test]
    fn a_closed_pipe_is_known_by_its_kind_wherever_it_is() {
        let pipe = || io::Error::new(io::ErrorKind::BrokenPipe, "la tuberia se ha roto");
        assert!(Error::from(pipe()).is_broken_pipe());
        let wrapped = Error::File(FileError::Io {
            path: "out/a.crt".into(),
            source: pipe(),
        });
        assert!(wrapped.is_broken_pipe());
        assert!(!Error::Internal("Broken pipe".into()).is_broken_pipe());
        assert!(!Error::from(io::Error::other("Broken pipe")).is_broken_pipe());
    }

    #[test]
    fn a_token_fault_while_signing_is_exit_3_and_a_wrong_signature_exit_5() {
        use crate::signer::{FaultKind, SignError};
        for (kind, code) in [
            (FaultKind::Token, 3),
            (FaultKind::SessionLost, 3),
            (FaultKind::BadSignature, 5),
        ] {
            let e = || SignError::new(kind, "C_Sign returned CKR_X");
            let checkpoint = Error::Log(LogError::CheckpointSign(e()));
            assert_eq!(checkpoint.exit_code(), code, "{kind:?}");
            assert_eq!(checkpoint.hint().as_deref(), kind.hint());
            assert_eq!(Error::Issue(IssueError::Sign(e())).exit_code(), code);
        }
    }
}
