//! What a `sign-dir` run reports: one outcome per CSR, the summary, and the report file in the
//! output directory.

use std::io::Write;
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
    /// Refused or failed.
    pub refused: usize,
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
/// batch goes, then the summary. It is written under a temporary name and named after the
/// plan's hash (`hsmca-report-HASH16.jsonl`) only when the run completes. A run that stops
/// (full disk, token gone) removes it: the log holds what was issued, and the rerun's report
/// covers every CSR.
pub struct ReportFile {
    tmp: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl ReportFile {
    /// Starts the report in `dir`, first removing temporary files that killed runs left there.
    pub fn create(dir: &Path) -> Result<Self, FileError> {
        std::fs::create_dir_all(dir).map_err(|source| FileError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        files::sweep_temporaries(dir);
        let tmp = files::temp_path(&dir.join("hsmca-report.jsonl"), "");
        let file = std::fs::File::create(&tmp).map_err(|source| FileError::Io {
            path: tmp.clone(),
            source,
        })?;
        Ok(Self {
            tmp,
            file: Some(std::io::BufWriter::new(file)),
        })
    }

    fn io_error(&self, source: std::io::Error) -> FileError {
        FileError::Io {
            path: self.tmp.clone(),
            source,
        }
    }

    /// Appends one line.
    pub fn line(&mut self, json: &[u8]) -> Result<(), FileError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let written = file.write_all(json).and_then(|()| file.write_all(b"\n"));
        written.map_err(|e| self.io_error(e))
    }

    /// Writes the summary, makes the report durable and gives it its name; returns the path.
    pub fn finish(mut self, report: &Report) -> Result<PathBuf, FileError> {
        let summary = serde_json::to_vec(report)
            .map_err(|e| self.io_error(std::io::Error::other(e.to_string())))?;
        self.line(&summary)?;
        let synced = match self.file.take() {
            Some(file) => file
                .into_inner()
                .map_err(std::io::IntoInnerError::into_error)
                .and_then(|f| f.sync_all()),
            None => Ok(()),
        };
        let hash = report.plan.get(..16).unwrap_or(&report.plan);
        let path = self
            .tmp
            .with_file_name(format!("hsmca-report-{hash}.jsonl"));
        let named = synced.and_then(|()| std::fs::rename(&self.tmp, &path));
        if let Err(e) = named {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(self.io_error(e));
        }
        Ok(path)
    }
}

impl Drop for ReportFile {
    fn drop(&mut self) {
        // Not finished: the run stopped. No half-written report is left behind.
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
