//! Durable, write-once output files, written without ever following a link.
//!
//! Every file hsmca writes (certificates and kubeconfigs on the stick, the report,
//! `apply-status.sh`, and the CA home's own files) goes through an [`OutDir`]: the directory
//! is held open, and everything beneath it is reached from that descriptor.
//! - **Names are checked** like input paths (`input::components`: relative, no `..`, no
//!   absolute, no empty component), so nothing is written outside the directory.
//! - **Directories** are created with `mkdirat` and opened with `O_DIRECTORY | O_NOFOLLOW`,
//!   one component at a time: a symlinked directory already in the output is refused.
//! - **Temporaries** are created with `O_CREAT | O_EXCL | O_NOFOLLOW` under a name with 64
//!   random bits (`.NAME.tmp-PID-RANDOM`; the PID only tells [`OutDir::sweep_temporaries`]
//!   whether the writer is alive). A name planted in advance, for this PID or any other, cannot
//!   be predicted, and if hit anyway `O_EXCL` refuses it instead of following it.
//! - **Files appear** by `linkat` of the fsynced temporary (never replaces anything: a symlink,
//!   FIFO or other file in the way is an error for that file), then the directory is fsynced.
//!   A crash leaves either no file or the whole file. An existing regular file with exactly
//!   the same bytes counts as already written (a rerun).
//! - The sweep of stale temporaries removes only regular files with a temporary's name whose
//!   process is gone, found by a walk that never follows links.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{UnlinkatFlags, linkat, unlinkat};

/// Why an output file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The destination exists with other content; hsmca never overwrites.
    #[error("{}: already exists with different content; hsmca never overwrites a file", .0.display())]
    Exists(PathBuf),
    /// A symlink, FIFO, device or other non-regular file is in the way (the file itself or a
    /// directory on its path): never followed, never replaced.
    #[error("{}: is a {what}; hsmca never writes through a symlink or into a special file", .path.display())]
    InTheWay {
        /// The path of what is in the way.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// The output name is not a plain relative path beneath the output directory.
    #[error("{name:?}: not a relative path beneath {}: {why}", .dir.display())]
    Name {
        /// The output directory.
        dir: PathBuf,
        /// The name asked for.
        name: String,
        /// What is wrong with it.
        why: String,
    },
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

impl FileError {
    /// The stable rule id of this failure: `output.exists`, `output.symlink`,
    /// `output.not_regular` (a FIFO, device, socket or directory in the way), `output.path` or
    /// `output.write`.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::Exists(_) => "output.exists",
            Self::InTheWay {
                what: "symlink", ..
            } => "output.symlink",
            Self::InTheWay { .. } => "output.not_regular",
            Self::Name { .. } => "output.path",
            Self::Io { .. } => "output.write",
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Outcome of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The file was created.
    Created,
    /// The file was already there with exactly these bytes (a rerun after a crash).
    AlreadyPresent,
}

/// Flags for every directory opened: never a symlink.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// What a file type is called in messages.
fn what(mode: u32) -> &'static str {
    crate::input::kind_of(mode)
}

/// The type of the entry `name` in `dir`, without following it; `None` if there is none.
fn kind_at(dir: &OwnedFd, name: &str) -> Option<SFlag> {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .ok()
        .map(|st| SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()))
}

/// 64 random bits in hex, for temporary names nobody can plant in advance.
fn random_tag() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    // If the system RNG fails, the clock's nanoseconds still make a name hard to guess, and
    // O_EXCL | O_NOFOLLOW make a guessed one harmless anyway.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        let nanos = std::time::UNIX_EPOCH
            .elapsed()
            .map_or(0, |d| d.subsec_nanos());
        b[..4].copy_from_slice(&nanos.to_le_bytes());
    }
    crate::keys::hex(&b)
}

/// A temporary name for `name`: hidden, tagged with this process's id (for the sweep) and
/// random bits (so it cannot be planted), and short enough for `NAME_MAX`.
fn temp_name(name: &str) -> String {
    let mut end = name.len().min(180);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        ".{}.tmp-{}-{}",
        &name[..end],
        std::process::id(),
        random_tag()
    )
}

/// The process id in a temporary's name, if it is one.
fn temp_owner(name: &str) -> Option<u32> {
    let (_, after) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    after.split('-').next()?.parse().ok()
}

/// A directory files are written beneath, held open.
#[derive(Debug)]
pub struct OutDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// A temporary file in an [`OutDir`], removed on drop unless it was given its name.
pub struct TempFile {
    dir: OwnedFd,
    name: String,
    file: Option<File>,
    path: PathBuf,
}

impl OutDir {
    /// Opens (creating it and its parents if missing) the directory `dir`. Its last component
    /// must not be a symlink: an output directory on the stick that points elsewhere (into the
    /// CA home, say) is refused.
    pub fn open(dir: &Path) -> Result<Self, FileError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let fd = nix::fcntl::open(dir, dir_flags(), Mode::empty()).map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => FileError::InTheWay {
                path: dir.to_path_buf(),
                what: if dir.symlink_metadata().is_ok_and(|m| m.is_symlink()) {
                    "symlink"
                } else {
                    "non-directory"
                },
            },
            e => io_err(dir)(e.into()),
        })?;
        Ok(Self {
            fd,
            path: dir.to_path_buf(),
        })
    }

    /// The directory as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Splits and checks an output name: the directories on its way, and the file name.
    fn split<'r>(&self, rel: &'r str) -> Result<(Vec<&'r str>, &'r str), FileError> {
        let parts = crate::input::components(rel).map_err(|e| FileError::Name {
            dir: self.path.clone(),
            name: rel.to_owned(),
            why: match e {
                crate::input::InputError::Path { why, .. } => why.to_owned(),
                other => other.to_string(),
            },
        })?;
        match parts.split_last() {
            Some((name, dirs)) => Ok((dirs.to_vec(), name)),
            None => Err(FileError::Name {
                dir: self.path.clone(),
                name: rel.to_owned(),
                why: "empty".into(),
            }),
        }
    }

    /// Opens (creating if `create`) the directories `dirs` beneath this one, never through a
    /// symlink.
    fn subdir(&self, dirs: &[&str], create: bool) -> Result<OwnedFd, FileError> {
        let mut cur = self.fd.try_clone().map_err(io_err(&self.path))?;
        let mut path = self.path.clone();
        for d in dirs {
            path.push(d);
            if create {
                match mkdirat(&cur, *d, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(io_err(&path)(e.into())),
                }
            }
            cur = match openat(&cur, *d, dir_flags(), Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let what = kind_at(&cur, d).map_or("non-directory", |k| what(k.bits()));
                    return Err(FileError::InTheWay { path, what });
                }
                Err(e) => return Err(io_err(&path)(e.into())),
            };
        }
        Ok(cur)
    }

    /// Creates a temporary for `rel` (its directories created as needed).
    pub fn temp(&self, rel: &str) -> Result<TempFile, FileError> {
        let (dirs, name) = self.split(rel)?;
        let dir = self.subdir(&dirs, true)?;
        let at = self.path.join(rel);
        let (name, file) = create_temp(&dir, name).map_err(io_err(&at))?;
        let path = at.with_file_name(&name);
        Ok(TempFile {
            dir,
            name,
            file: Some(file),
            path,
        })
    }

    /// Writes `bytes` to `rel` durably, never replacing anything: a regular file already there
    /// with exactly `bytes` is [`Written::AlreadyPresent`]; other content is
    /// [`FileError::Exists`]; a symlink or special file is [`FileError::InTheWay`].
    pub fn write_new(&self, rel: &str, bytes: &[u8]) -> Result<Written, FileError> {
        let mut tmp = self.temp(rel)?;
        tmp.write_all(bytes)?;
        tmp.sync()?;
        let written = tmp.link(rel, bytes)?;
        tmp.sync_dir()?;
        Ok(written)
    }

    /// [`Self::write_new`] for many files at once, with one `syncfs(2)` for all their data and
    /// one fsync per directory instead of two fsyncs per file: the batch path. Same guarantees.
    /// Returns one result per file, in order.
    pub fn write_new_all(&self, files: &[(String, Vec<u8>)]) -> Vec<Result<Written, FileError>> {
        let mut results: Vec<Option<Result<Written, FileError>>> = Vec::with_capacity(files.len());
        let mut staged: Vec<(usize, TempFile)> = Vec::new();
        for (i, (rel, bytes)) in files.iter().enumerate() {
            let written = self
                .temp(rel)
                .and_then(|mut t| t.write_all(bytes).map(|()| t));
            match written {
                Ok(t) => {
                    staged.push((i, t));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        // One flush of the whole file system makes every staged file's data durable.
        if let Some((_, t)) = staged.first() {
            let synced = t
                .file
                .as_ref()
                .map_or(Ok(()), |f| nix::unistd::syncfs(f).map_err(io::Error::from));
            if let Err(e) = synced {
                for (i, t) in staged {
                    results[i] = Some(Err(io_err(&t.path)(io::Error::new(
                        e.kind(),
                        e.to_string(),
                    ))));
                }
                return results
                    .into_iter()
                    .map(|r| r.unwrap_or(Ok(Written::Created)))
                    .collect();
            }
        }
        // The directories to fsync, once each, and which files are in them.
        let mut dirs: BTreeMap<PathBuf, (OwnedFd, Vec<usize>)> = BTreeMap::new();
        for (i, t) in staged {
            let (rel, bytes) = &files[i];
            let linked = t.link(rel, bytes);
            if linked.is_ok() {
                let dir_path = t.path.parent().map(Path::to_path_buf).unwrap_or_default();
                match t.dir.try_clone() {
                    Ok(fd) => dirs.entry(dir_path).or_insert((fd, Vec::new())).1.push(i),
                    Err(e) => {
                        results[i] = Some(Err(io_err(&t.path)(e)));
                        continue;
                    }
                }
            }
            results[i] = Some(linked);
        }
        let mut out: Vec<Result<Written, FileError>> = results
            .into_iter()
            .map(|r| r.unwrap_or(Ok(Written::Created)))
            .collect();
        for (dir_path, (fd, members)) in dirs {
            if let Err(e) = nix::unistd::fsync(&fd) {
                // The names may not survive a power cut; report it on every file there.
                for i in members {
                    out[i] = Err(io_err(&dir_path)(e.into()));
                }
            }
        }
        out
    }

    /// Replaces `rel` atomically (temporary, fsync, `renameat`, directory fsync). Only for
    /// files that are derived and re-creatable (the latest checkpoint, `apply-status.sh`, the
    /// CA home's config). Whatever is there must be a regular file: a symlink or special file
    /// in the way is an error, not replaced.
    pub fn replace(&self, rel: &str, bytes: &[u8]) -> Result<(), FileError> {
        let mut tmp = self.temp(rel)?;
        tmp.write_all(bytes)?;
        tmp.sync()?;
        tmp.rename(rel)?;
        tmp.sync_dir()
    }

    /// Removes, beneath this directory, the temporary files of runs that were killed before
    /// they could clean up (their process is gone); returns how many. Only regular files with
    /// a temporary's name are removed; links are neither followed nor removed.
    pub fn sweep_temporaries(&self) -> usize {
        let Ok(fd) = self.fd.try_clone() else {
            return 0;
        };
        let root = crate::input::Root::from_fd(fd, &self.path);
        let stale = |rel: &str| {
            let name = rel.rsplit('/').next().unwrap_or(rel);
            temp_owner(name).is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
        };
        let (files, _) = root.walk(stale);
        let mut removed = 0;
        for rel in files {
            let Ok((dirs, name)) = self.split(&rel) else {
                continue;
            };
            let Ok(dir) = self.subdir(&dirs, false) else {
                continue;
            };
            if kind_at(&dir, name) == Some(SFlag::S_IFREG)
                && unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }
}

/// Creates a new temporary for `name` in `dir`: `O_CREAT | O_EXCL | O_NOFOLLOW`, a fresh
/// random name on the (unlikely) collision.
fn create_temp(dir: &OwnedFd, name: &str) -> io::Result<(String, File)> {
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    for _ in 0..8 {
        let tmp = temp_name(name);
        match openat(dir, tmp.as_str(), flags, Mode::from_bits_truncate(0o644)) {
            Ok(fd) => return Ok((tmp, File::from(fd))),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free temporary name after 8 random tries",
    ))
}

impl TempFile {
    /// The temporary's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&mut self) -> Result<&mut File, FileError> {
        let path = self.path.clone();
        self.file
            .as_mut()
            .ok_or_else(|| io_err(&path)(io::Error::other("already closed")))
    }

    /// Appends `bytes`.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), FileError> {
        let path = self.path.clone();
        self.file()?.write_all(bytes).map_err(io_err(&path))
    }

    /// Makes the data durable.
    pub fn sync(&mut self) -> Result<(), FileError> {
        let path = self.path.clone();
        self.file()?.sync_all().map_err(io_err(&path))
    }

    /// fsyncs the directory the temporary is in, so that a new name there survives a crash.
    pub fn sync_dir(&self) -> Result<(), FileError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        nix::unistd::fsync(&self.dir).map_err(|e| io_err(dir)(e.into()))
    }

    /// Gives the (synced) temporary the name `rel` without replacing anything, and removes the
    /// temporary name.
    fn link(&self, rel: &str, bytes: &[u8]) -> Result<Written, FileError> {
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let path = self.path.with_file_name(name);
        let linked = linkat(
            &self.dir,
            self.name.as_str(),
            &self.dir,
            name,
            AtFlags::empty(),
        );
        let result = match linked {
            Ok(()) => Ok(Written::Created),
            // Something is there: a rerun's identical regular file is fine, anything else is
            // never replaced (and a symlink there is never followed to compare).
            Err(Errno::EEXIST) => match read_regular(&self.dir, name, bytes.len()) {
                Ok(Some(existing)) if existing == bytes => Ok(Written::AlreadyPresent),
                Ok(_) => Err(FileError::Exists(path)),
                Err(what) => Err(FileError::InTheWay { path, what }),
            },
            Err(e) => Err(io_err(&path)(e.into())),
        };
        let _ = unlinkat(&self.dir, self.name.as_str(), UnlinkatFlags::NoRemoveDir);
        result
    }

    /// Renames the temporary over `rel`, which must be absent or a regular file.
    fn rename(&mut self, rel: &str) -> Result<(), FileError> {
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let path = self.path.with_file_name(name);
        if let Some(k) = kind_at(&self.dir, name).filter(|k| *k != SFlag::S_IFREG) {
            return Err(FileError::InTheWay {
                path,
                what: what(k.bits()),
            });
        }
        nix::fcntl::renameat(&self.dir, self.name.as_str(), &self.dir, name)
            .map_err(|e| io_err(&path)(e.into()))?;
        self.file = None;
        self.name.clear();
        Ok(())
    }

    /// Syncs the temporary and renames it to `rel` (beside it), replacing a regular file of
    /// that name only.
    pub fn persist(mut self, rel: &str) -> Result<PathBuf, FileError> {
        self.sync()?;
        self.rename(rel)?;
        self.sync_dir()?;
        let name = rel.rsplit('/').next().unwrap_or(rel);
        Ok(self.path.with_file_name(name))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Not given its name: nothing half-written is left behind.
        if !self.name.is_empty() {
            let _ = unlinkat(&self.dir, self.name.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// The content of `name` in `dir` if it is a regular file of exactly `len` bytes (`None` if
/// another size), or what it is instead; never follows a symlink or opens a FIFO for long.
fn read_regular(dir: &OwnedFd, name: &str, len: usize) -> Result<Option<Vec<u8>>, &'static str> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = match openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ELOOP) => return Err("symlink"),
        Err(_) => return Ok(None),
    };
    let st = fstat(&fd).map_err(|_| "special file")?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(what(st.st_mode));
    }
    if u64::try_from(st.st_size).ok() != Some(len as u64) {
        return Ok(None);
    }
    let mut existing = Vec::with_capacity(len);
    match File::from(fd)
        .take(len as u64 + 1)
        .read_to_end(&mut existing)
    {
        Ok(_) => Ok(Some(existing)),
        Err(_) => Ok(None),
    }
}

/// Splits a path into its directory (opened as an [`OutDir`]) and its file name.
fn split_path(path: &Path) -> Result<(OutDir, String), FileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| FileError::Name {
            dir: dir.to_path_buf(),
            name: path.display().to_string(),
            why: "no UTF-8 file name".into(),
        })?;
    Ok((OutDir::open(dir)?, name.to_owned()))
}

/// [`OutDir::write_new`] for a path the operator gave (or the CA home's): its parent is
/// created if missing and must not itself be a symlink.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<Written, FileError> {
    let (dir, name) = split_path(path)?;
    dir.write_new(&name, bytes)
}

/// [`OutDir::replace`] for a path the operator gave (or the CA home's).
pub fn replace(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let (dir, name) = split_path(path)?;
    dir.replace(&name, bytes)
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
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn write_new_all_stages_syncs_once_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let out = OutDir::open(dir.path()).unwrap();
        out.write_new("y/b.pem", b"old").unwrap();
        let r = out.write_new_all(&[
            ("x/a.pem".into(), b"A".to_vec()),
            ("y/b.pem".into(), b"new".to_vec()),
            ("x/a.pem".into(), b"A".to_vec()),
            ("../escape.pem".into(), b"E".to_vec()),
        ]);
        assert!(matches!(r[0], Ok(Written::Created)));
        assert!(matches!(r[1], Err(FileError::Exists(_))));
        assert!(matches!(r[2], Ok(Written::AlreadyPresent)));
        assert_eq!(r[3].as_ref().unwrap_err().rule(), "output.path");
        assert_eq!(fs::read(dir.path().join("x/a.pem")).unwrap(), b"A");
        assert_eq!(fs::read(dir.path().join("y/b.pem")).unwrap(), b"old");
        assert_eq!(
            fs::read_dir(dir.path().join("x")).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn nothing_is_written_through_a_symlink_or_into_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let victim = d.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let out_path = d.join("out");
        fs::create_dir(&out_path).unwrap();
        symlink(&victim, out_path.join("a.crt")).unwrap();
        symlink(d, out_path.join("sub")).unwrap();
        nix::unistd::mkfifo(&out_path.join("f.crt"), Mode::from_bits_truncate(0o600)).unwrap();
        symlink(&victim, out_path.join("apply-status.sh")).unwrap();
        let out = OutDir::open(&out_path).unwrap();
        let rule = |r: Result<Written, FileError>| r.unwrap_err().rule();
        assert_eq!(rule(out.write_new("a.crt", b"x")), "output.symlink");
        assert_eq!(rule(out.write_new("sub/victim", b"x")), "output.symlink");
        assert_eq!(rule(out.write_new("f.crt", b"x")), "output.not_regular");
        assert_eq!(rule(out.write_new("/etc/x", b"x")), "output.path");
        let replaced = out.replace("apply-status.sh", b"x").unwrap_err();
        assert_eq!(replaced.rule(), "output.symlink");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        // The output directory itself may not be a symlink either.
        symlink(&out_path, d.join("linked-out")).unwrap();
        let e = OutDir::open(&d.join("linked-out")).unwrap_err();
        assert_eq!(e.rule(), "output.symlink");
        // Only the planted entries are there: no temporary was left behind.
        assert_eq!(fs::read_dir(&out_path).unwrap().count(), 4);
    }

    #[test]
    fn sweep_removes_only_a_dead_processes_regular_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        fs::create_dir_all(&sub).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        // No process has an id above the kernel's pid_max (at most 2^22).
        let dead = 1 << 23;
        let stale = [
            sub.join(format!(".c.crt.tmp-{dead}-7")),
            dir.path()
                .join(format!(".hsmca-report.jsonl.tmp-{dead}-ab")),
        ];
        let live = sub.join(format!(".d.crt.tmp-{}-1", std::process::id()));
        let kept = [
            live.clone(),
            sub.join("c.crt"),
            sub.join(".hidden"),
            sub.join(".x.tmp-notapid"),
        ];
        for p in stale.iter().chain(&kept) {
            fs::write(p, b"x").unwrap();
        }
        let planted = dir.path().join(format!(".e.crt.tmp-{dead}-1"));
        symlink(&victim, &planted).unwrap();
        let out = OutDir::open(dir.path()).unwrap();
        assert_eq!(out.sweep_temporaries(), 2);
        assert!(stale.iter().all(|p| !p.exists()));
        assert!(kept.iter().all(|p| p.exists()), "{live:?}");
        assert!(planted.symlink_metadata().is_ok(), "a symlink is not ours");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
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
        replace(&p, b"three").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"three");
    }

    #[test]
    fn temporaries_are_random_and_carry_the_pid_for_the_sweep() {
        let a = temp_name("x.crt");
        let b = temp_name("x.crt");
        assert_ne!(a, b);
        assert_eq!(temp_owner(&a), Some(std::process::id()));
        assert!(temp_name(&"é".repeat(200)).len() < 255);
    }
}
