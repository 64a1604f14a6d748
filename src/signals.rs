//! SIGINT and SIGTERM as a request to stop, which long runs poll between certificates.
//!
//! An operator's Ctrl-C or a service manager's SIGTERM must not kill a batch between a log
//! append and its file write (the log survives that, but temporaries stay behind and nobody is
//! told how far the run got). So [`install`] replaces the default action of both signals with
//! setting a flag, [`requested`] tells the engine a stop was asked for, and the engine finishes
//! or abandons the current chunk, cleans up, says how much was done, and exits with
//! [`Signal::exit_code`] (128 + the signal number, as a shell reports a process killed by it).
//! A second signal while the first is being handled gets the default action at once (the
//! process dies by the signal, as if nothing had been installed): a stop that hangs can always
//! be forced, and the log is crash-safe.
//!
//! The handlers only store into atomics (async-signal-safe); `signal-hook` owns the `unsafe`
//! registration.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

/// The number of the last stop signal received, 0 for none.
static REQUESTED: AtomicUsize = AtomicUsize::new(0);
/// Set by the first stop signal; arms the default action for the second.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The outcome of the one installation.
static INSTALLED: OnceLock<Result<(), std::io::ErrorKind>> = OnceLock::new();

/// A stop signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: Ctrl-C on the terminal.
    Interrupt,
    /// SIGTERM: `kill`, a service manager, a shutdown.
    Terminate,
}

impl Signal {
    /// The exit code of a run stopped by this signal: 130 for SIGINT, 143 for SIGTERM.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Interrupt => 130,
            Self::Terminate => 143,
        }
    }

    /// The signal's name, for messages: `SIGINT`, `SIGTERM`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Interrupt => "SIGINT",
            Self::Terminate => "SIGTERM",
        }
    }

    fn from_number(n: usize) -> Option<Self> {
        match i32::try_from(n).ok()? {
            SIGINT => Some(Self::Interrupt),
            SIGTERM => Some(Self::Terminate),
            _ => None,
        }
    }
}

/// Why the handlers could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the SIGINT/SIGTERM handlers ({kind})")]
pub struct SignalError {
    kind: std::io::ErrorKind,
}

/// Installs the handlers for SIGINT and SIGTERM; later calls do nothing and return the first
/// call's result. Call it before the first certificate is signed: from then on those signals
/// only set the flag [`requested`] reads (until a second one arrives).
pub fn install() -> Result<(), SignalError> {
    let result = INSTALLED.get_or_init(|| {
        for sig in [SIGINT, SIGTERM] {
            // Registration order is execution order: the default action checks ARMED before
            // this signal's own action sets it, so only a second signal runs it.
            signal_hook::flag::register_conditional_default(sig, &ARMED)
                .and_then(|_| {
                    signal_hook::flag::register_usize(sig, &REQUESTED, sig.unsigned_abs() as usize)
                })
                .and_then(|_| signal_hook::flag::register(sig, &ARMED))
                .map_err(|e| e.kind())?;
        }
        Ok(())
    });
    (*result).map_err(|kind| SignalError { kind })
}

/// The stop signal received since [`install`], if any. Cheap enough to call per certificate.
pub fn requested() -> Option<Signal> {
    Signal::from_number(REQUESTED.load(Ordering::SeqCst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_128_plus_the_signal_number() {
        assert_eq!(Signal::Interrupt.exit_code(), 128 + 2);
        assert_eq!(Signal::Terminate.exit_code(), 128 + 15);
        assert_eq!(Signal::from_number(2), Some(Signal::Interrupt));
        assert_eq!(Signal::from_number(9), None);
        assert_eq!(Signal::Terminate.name(), "SIGTERM");
    }

    /// The only test that raises a signal: a second one would (rightly) kill the test binary.
    #[test]
    fn a_signal_after_install_is_recorded_instead_of_killing_the_process() {
        install().unwrap();
        install().unwrap();
        assert_eq!(requested(), None);
        signal_hook::low_level::raise(SIGTERM).unwrap();
        // We are still alive, and the request is visible.
        assert_eq!(requested(), Some(Signal::Terminate));
        assert!(ARMED.load(Ordering::SeqCst));
    }

    /// Run in a child process by the test below; never on its own.
    #[test]
    #[ignore = "run in a child process by a_second_signal_forces_the_default_action"]
    fn child_raises_twice() {
        install().unwrap();
        signal_hook::low_level::raise(SIGINT).unwrap();
        assert_eq!(requested(), Some(Signal::Interrupt));
        signal_hook::low_level::raise(SIGINT).unwrap();
        unreachable!("the second SIGINT must kill the process");
    }

    #[test]
    fn a_second_signal_forces_the_default_action() {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "signals::tests::child_raises_twice", "--ignored"])
            .args(["--test-threads", "1", "--nocapture"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.signal(), Some(SIGINT), "{status:?}");
    }
}
