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
    let tmp = temp_path(path, "");
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

/// [`write_new`] for many files at once, with one `syncfs(2)` for all their data and one
/// fsync per directory instead of two fsyncs per file: the batch path. Same guarantees: a file
/// appears under its name only with all its bytes on disk, and nothing is overwritten. Returns
/// one result per file, in order.
pub fn write_new_all(files: &[(PathBuf, Vec<u8>)]) -> Vec<Result<Written, FileError>> {
    let mut results: Vec<Option<Result<Written, FileError>>> = Vec::with_capacity(files.len());
    let mut staged = Vec::new();
    // Batches mostly write many files into few directories: create each one once.
    let mut made: Option<PathBuf> = None;
    for (i, (path, _)) in files.iter().enumerate() {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let tmp = temp_path(path, &format!("-{i}"));
        let ready = if made.as_ref() == Some(&dir) {
            Ok(())
        } else {
            fs::create_dir_all(&dir)
        };
        if ready.is_ok() {
            made = Some(dir.clone());
        }
        // An existing destination is found when linking (EEXIST), not probed for up front: one
        // system call less per file on the batch path.
        let written = ready
            .and_then(|()| OpenOptions::new().write(true).create_new(true).open(&tmp))
            .and_then(|mut f| f.write_all(&files[i].1));
        match written {
            Ok(()) => {
                staged.push((i, tmp, dir));
                results.push(None);
            }
            Err(source) => {
                let _ = fs::remove_file(&tmp);
                results.push(Some(Err(FileError::Io {
                    path: path.clone(),
                    source,
                })));
            }
        }
    }
    // One flush of the whole file system makes every staged file's data durable.
    if let Some((_, tmp, _)) = staged.first() {
        let synced = File::open(tmp)
            .map_err(|e| e.to_string())
            .and_then(|f| nix::unistd::syncfs(&f).map_err(|e| e.to_string()));
        if let Err(e) = synced {
            for (i, tmp, _) in &staged {
                let _ = fs::remove_file(tmp);
                results[*i] = Some(Err(FileError::Io {
                    path: files[*i].0.clone(),
                    source: io::Error::other(e.clone()),
                }));
            }
            return results
                .into_iter()
                .map(|r| r.unwrap_or(Ok(Written::Created)))
                .collect();
        }
    }
    let mut dirs = std::collections::BTreeSet::new();
    for (i, tmp, dir) in staged {
        let (path, bytes) = &files[i];
        let linked = match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(Written::Created),
            // Already there: a rerun's identical file is fine, anything else is never replaced.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match fs::read(path) {
                Ok(existing) if existing == *bytes => Ok(Written::AlreadyPresent),
                _ => Err(FileError::Exists(path.clone())),
            },
            Err(e) => Err(FileError::Io {
                path: path.clone(),
                source: e,
            }),
        };
        let _ = fs::remove_file(&tmp);
        results[i] = Some(linked);
        dirs.insert(dir);
    }
    let mut out: Vec<Result<Written, FileError>> = results
        .into_iter()
        .map(|r| r.unwrap_or(Ok(Written::Created)))
        .collect();
    for dir in dirs {
        if let Err(e) = sync_dir(&dir) {
            // The names may not survive a power cut; report it on every file of that directory.
            for (r, (path, _)) in out.iter_mut().zip(files) {
                if path.parent() == Some(dir.as_path()) {
                    *r = Err(FileError::Io {
                        path: path.clone(),
                        source: io::Error::other(e.to_string()),
                    });
                }
            }
        }
    }
    out
}

/// Replaces `path` atomically (temporary file, fsync, rename, directory fsync). Only for files
/// that are derived and re-creatable, such as the latest checkpoint.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(path, "");
    let written = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(io_err(&tmp))
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err(path)));
    if written.is_err() {
        // A full disk must not leave a torn temporary behind.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

/// The temporary name a file is written under before it appears as `path`: hidden, beside it,
/// and tagged with this process's id so that a later run can tell a killed run's leftover
/// ([`sweep_temporaries`]) from a file another live process is still writing.
pub fn temp_path(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}{tag}", std::process::id()))
}

/// The process id in a [`temp_path`] name, if it is one.
fn temp_owner(name: &str) -> Option<u32> {
    let (_, after) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    after.split('-').next()?.parse().ok()
}

/// Removes, under `dir`, the temporary files of runs that were killed before they could clean
/// up (their process is gone); returns how many. A rerun calls this so that an interrupted
/// batch leaves nothing half-written behind once it is finished.
pub fn sweep_temporaries(dir: &Path) -> usize {
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                stack.push(e.path());
                continue;
            }
            let name = e.file_name();
            let Some(pid) = temp_owner(&name.to_string_lossy()) else {
                continue;
            };
            let alive = Path::new("/proc").join(pid.to_string()).exists();
            if !alive && fs::remove_file(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
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
    fn write_new_all_stages_syncs_once_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("x/a.pem");
        let b = dir.path().join("y/b.pem");
        write_new(&b, b"old").unwrap();
        let r = write_new_all(&[
            (a.clone(), b"A".to_vec()),
            (b.clone(), b"new".to_vec()),
            (a.clone(), b"A".to_vec()),
        ]);
        assert!(matches!(r[0], Ok(Written::Created)));
        assert!(matches!(r[1], Err(FileError::Exists(_))));
        assert!(matches!(
            r[2],
            Err(FileError::Exists(_)) | Ok(Written::AlreadyPresent)
        ));
        assert_eq!(fs::read(&a).unwrap(), b"A");
        assert_eq!(fs::read(&b).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(dir.path().join("x")).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn sweep_removes_only_a_dead_processes_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        fs::create_dir_all(&sub).unwrap();
        // No process has an id above the kernel's pid_max (at most 2^22).
        let dead = 1 << 23;
        let stale = [
            sub.join(format!(".c.crt.tmp-{dead}-7")),
            dir.path().join(format!(".hsmca-report.jsonl.tmp-{dead}")),
        ];
        let live = temp_path(&sub.join("d.crt"), "-1");
        let kept = [
            live.clone(),
            sub.join("c.crt"),
            sub.join(".hidden"),
            sub.join(".x.tmp-notapid"),
        ];
        for p in stale.iter().chain(&kept) {
            fs::write(p, b"x").unwrap();
        }
        assert_eq!(sweep_temporaries(dir.path()), 2);
        assert!(stale.iter().all(|p| !p.exists()));
        assert!(kept.iter().all(|p| p.exists()), "{live:?}");
    }

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
