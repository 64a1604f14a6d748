//! Where the token PIN comes from: `HSMCA_PIN`, a PIN file, or a prompt without echo.
//!
//! Never from a command-line value (it would show in `ps` and shell history). The PIN lives in
//! zeroizing memory from the moment it is read until `C_Login`, and no error or log line ever
//! contains it.

use std::io;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// The environment variable a PIN may be passed in (for scripts and tests).
pub const PIN_ENV: &str = "HSMCA_PIN";

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
    /// An empty PIN was given.
    #[error("the PIN is empty (from {0})")]
    Empty(&'static str),
    /// No PIN source and no terminal to prompt on.
    #[error("no PIN given and no terminal to ask on: set HSMCA_PIN or pass --pin-file FILE")]
    NoTerminal(#[source] io::Error),
}

/// Reads the PIN: `--pin-file` first, then `HSMCA_PIN`, then a prompt on the terminal.
pub fn read(pin_file: Option<&Path>, token_label: &str) -> Result<Pin, PinError> {
    if let Some(path) = pin_file {
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| PinError::File {
                    path: path.to_path_buf(),
                    source,
                })?,
            );
        return trimmed(&text, "--pin-file");
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

fn trimmed(text: &str, from: &'static str) -> Result<Pin, PinError> {
    let t = text.trim_end_matches(['\n', '\r']);
    if t.is_empty() {
        return Err(PinError::Empty(from));
    }
    Ok(Pin(Zeroizing::new(t.to_owned())))
}
