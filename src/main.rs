//! The `hsmca` command: parse, run, print the error with its causes and a hint, exit.

use std::io::Write;
use std::process::ExitCode;

use zeroize::Zeroizing;

mod cli;

fn main() -> ExitCode {
    // First, while this process has only one thread: see `take_env_pin`.
    if let Some(pin) = take_env_pin()
        && let Err(e) = hsmca::pin::keep_from_env(pin)
    {
        return report(&e.into());
    }
    let args = cli::parse();
    match cli::run(args) {
        Ok(code) => ExitCode::from(code),
        // A closed pipe (`hsmca log list | head`) is the reader's choice, not an error.
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

/// Moves `HSMCA_PIN` out of the environment, so nothing this process starts inherits it and
/// nothing that reads the environment later sees it (issue 13).
#[expect(
    unsafe_code,
    reason = "std::env::remove_var is unsafe in edition 2024; this is its one sound call site"
)]
fn take_env_pin() -> Option<Zeroizing<String>> {
    let value = std::env::var_os(hsmca::pin::PIN_ENV)?;
    // SAFETY: `remove_var` is unsound only while another thread reads or writes the
    // environment. This runs as the first statement of `main`: the Rust runtime starts no
    // threads before `main`, hsmca registers no constructors, and no library has been called
    // yet, so this is the only thread there is.
    unsafe { std::env::remove_var(hsmca::pin::PIN_ENV) };
    Some(Zeroizing::new(
        value
            .into_string()
            .unwrap_or_else(|v| v.to_string_lossy().into_owned()),
    ))
}

/// Prints `error:`, each `caused by:` and the hint; returns the error's exit code. Errors quote
/// file names and values from the input: escaped, one line each.
fn report(e: &hsmca::Error) -> ExitCode {
    let mut err = cli::report::Terminal::new(std::io::stderr().lock());
    let _ = writeln!(err, "error: {}", cli::report::safe(&e.to_string()));
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let _ = writeln!(err, "caused by: {}", cli::report::safe(&cause.to_string()));
        source = cause.source();
    }
    if let Some(hint) = e.hint() {
        let _ = writeln!(err, "hint: {hint}");
    }
    ExitCode::from(e.exit_code())
}
