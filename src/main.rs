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
            // Errors quote file names and values from the input: escaped, one line each.
            let mut err = cli::report::Terminal::new(std::io::stderr().lock());
            let _ = writeln!(err, "error: {}", cli::report::safe(&e.to_string()));
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                let _ = writeln!(err, "caused by: {}", cli::report::safe(&cause.to_string()));
                source = cause.source();
            }
            if let Some(hint) = e.hint() {
                let _ = writeln!(err, "hint: {hint}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
