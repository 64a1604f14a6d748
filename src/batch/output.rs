//! What a `sign-dir` run reports: one outcome per CSR, the summary, and the report file in the
//! output directory.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::files::{self, FileError};
use crate::policy::Refusal;

/// What happened to one CSR in `sign-dir`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Done {
    /// Issued now, or written again from the log.
    Issued {
        /// Input file.
        file: String,
        /// Serial, hex.
        serial: String,
        /// Output file.
        out: PathBuf,
        /// Issued by an earlier run.
        already_issued: bool,
    },
    /// Refused (rule and value).
    Refused {
        /// Input file.
        file: String,
        /// Every violated rule.
        refusals: Vec<Refusal>,
    },
    /// Not to be signed.
    Skipped {
        /// Input (object name).
        file: String,
        /// Why.
        reason: String,
    },
    /// Unusable CSR, or a signing failure.
    Failed {
        /// Input file.
        file: String,
        /// Rule id.
        rule: String,
        /// What went wrong.
        error: String,
    },
}

/// The `sign-dir` report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The plan's hash (also in the log).
    pub plan: String,
    /// CSRs handled (each was passed to the caller as it was done).
    pub handled: usize,
    /// Issued now.
    pub issued: usize,
    /// Written again from the log.
    pub reissued_files: usize,
    /// Refused by their profile.
    pub refused: usize,
    /// Failed: unreadable or malformed, not signed (token failure, a run that stopped), or
    /// issued and logged but not written.
    pub failed: usize,
    /// Wall time of signing, seconds.
    pub seconds: f64,
    /// For Kubernetes objects: the commands that upload each signed object's status.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// Why the run stopped before its end; the command exits with the stop's code after the
    /// report is written.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "display")]
    pub halt: Option<crate::engine::Halt>,
}

fn display<S: serde::Serializer>(
    halt: &Option<crate::engine::Halt>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match halt {
        Some(h) => s.serialize_str(&h.to_string()),
        None => s.serialize_none(),
    }
}

/// The report file of a `sign-dir` run in its output directory: one JSON line per CSR as the
/// batch goes, then the summary. It is written under a temporary name (random, created with
/// `O_EXCL | O_NOFOLLOW`: see `files`) and named after the plan's hash
/// (`hsmca-report-HASH16.jsonl`) only when the run completes. A run that stops (full disk,
/// token gone) removes it: the log holds what was issued, and the rerun's report covers every
/// CSR.
pub struct ReportFile {
    tmp: Option<files::TempFile>,
    buf: Vec<u8>,
}

/// How much of the report is gathered before it is written out.
const REPORT_BUFFER: usize = 1 << 16;

impl ReportFile {
    /// Starts the report in `dir`, first removing temporary files that killed runs left there.
    pub fn create(dir: &Path) -> Result<Self, FileError> {
        let out = files::OutDir::open(dir)?;
        out.sweep_temporaries();
        let tmp = out.temp(REPORT_NAME)?;
        Ok(Self {
            tmp: Some(tmp),
            buf: Vec::with_capacity(REPORT_BUFFER),
        })
    }

    fn flush(&mut self) -> Result<(), FileError> {
        if let Some(tmp) = self.tmp.as_mut() {
            tmp.write_all(&self.buf)?;
        }
        self.buf.clear();
        Ok(())
    }

    /// Appends one line.
    pub fn line(&mut self, json: &[u8]) -> Result<(), FileError> {
        self.buf.extend_from_slice(json);
        self.buf.push(b'\n');
        if self.buf.len() >= REPORT_BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the summary, makes the report durable and gives it its name; returns the path.
    pub fn finish(mut self, report: &Report) -> Result<PathBuf, FileError> {
        let summary = serde_json::to_vec(report).map_err(|e| FileError::Io {
            path: PathBuf::from(REPORT_NAME),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.line(&summary)?;
        self.flush()?;
        let hash = report.plan.get(..16).unwrap_or(&report.plan);
        match self.tmp.take() {
            // Dropping the temporary on failure removes it.
            Some(tmp) => tmp.persist(&format!("hsmca-report-{hash}.jsonl")),
            None => Err(FileError::Io {
                path: PathBuf::from(REPORT_NAME),
                source: std::io::Error::other("the report was already finished"),
            }),
        }
    }
}

/// The name the report's temporary is made from.
const REPORT_NAME: &str = "hsmca-report.jsonl";
