//! Durable, write-once output files.
//!
//! Every artefact hsmca releases goes through [`write_new`]: written under a temporary name in
//! the same directory, fsynced, linked to its final name only if that name is free, and the
//! directory fsynced. A crash leaves either no file or the whole file, never a torn one, and an
//! existing file is never replaced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Why an output file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The destination exists with other content; hsmca never overwrites.
    #[error("{}: already exists with different content; hsmca never overwrites a file", .0.display())]
    Exists(PathBuf),
    /// Any I/O failure, with the path it happened on.
    #[error("{}: cannot write", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Outcome of [`write_new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The file was created.
    Created,
    /// The file was already there with exactly these bytes (a rerun after a crash).
    AlreadyPresent,
}

/// Writes `bytes` to `path` durably, never replacing an existing file.
///
/// If `path` already holds exactly `bytes`, that is a completed earlier run, not a conflict.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<Written, FileError> {
    if let Ok(existing) = fs::read(path) {
        return if existing == bytes {
            Ok(Written::AlreadyPresent)
        } else {
            Err(FileError::Exists(path.to_path_buf()))
        };
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        // hard_link fails if the destination exists: the never-overwrite rule without a race.
        fs::hard_link(&tmp, path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                FileError::Exists(path.to_path_buf())
            } else {
                FileError::Io {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })
    })();
    let _ = fs::remove_file(&tmp);
    result?;
    sync_dir(&dir)?;
    Ok(Written::Created)
}

/// Replaces `path` atomically (temporary file, fsync, rename, directory fsync). Only for files
/// that are derived and re-creatable, such as the latest checkpoint.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

/// fsyncs a directory so that a created or renamed entry in it survives a power cut.
pub fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_new_never_overwrites_but_accepts_identical() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/a.pem");
        assert_eq!(write_new(&p, b"one").unwrap(), Written::Created);
        assert_eq!(write_new(&p, b"one").unwrap(), Written::AlreadyPresent);
        assert!(matches!(write_new(&p, b"two"), Err(FileError::Exists(_))));
        assert_eq!(fs::read(&p).unwrap(), b"one");
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file may be left behind");
    }
}
