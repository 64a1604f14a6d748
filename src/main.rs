//! The `hsmca` command: parse, run, print the error with its causes and a hint, exit.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    match cli::run(args) {
        Ok(code) => ExitCode::from(code),
        // A closed pipe (`hsmca log list | head`) is the reader's choice, not an error.
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                let _ = writeln!(err, "caused by: {cause}");
                source = cause.source();
            }
            if let Some(hint) = e.hint() {
                let _ = writeln!(err, "hint: {hint}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
