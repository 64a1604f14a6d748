//! The one module that reads untrusted input: CSR files, manifests, plans, kubeadm kubeconfig
//! templates and `kubectl get csr -o json` output, all of which come from a USB stick that
//! whoever last held it chose.
//!
//! What it guarantees, so that no other module has to think about it:
//! - **Regular files only.** Every file is opened with `O_NOFOLLOW | O_NONBLOCK` and its type
//!   checked with `fstat` on the opened descriptor (not before, which would race): a symlink is
//!   `input.symlink` (the kernel's `ELOOP`), a FIFO, device, socket or directory is
//!   `input.not_regular`. `O_NONBLOCK` means opening a FIFO never waits for a writer.
//! - **A size cap** checked on the descriptor and again while reading (a file may grow):
//!   `input.size`. The caps are the `*_CAP` constants below.
//! - **Paths beneath the root.** A path from a manifest, a plan or a directory listing is
//!   relative, `/`-separated, without `.`/`..`/empty components or NUL (`input.path`), and
//!   every directory on the way is opened with `O_DIRECTORY | O_NOFOLLOW` from the root's
//!   descriptor (`openat`), so a symlinked directory is refused, not followed.
//! - **A bounded walk.** [`Root::walk`] never follows symlinks, stops at [`MAX_DEPTH`] and
//!   [`MAX_ENTRIES`], and reports each problem entry instead of stopping.
//!
//! It never writes anything; writing is `files`.

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};

/// Largest CSR file read, 64 KiB (a CSR is one or two KiB; RSA-4096 with many SANs stays far
/// below): the same limit `csr::parse` applies to bytes.
pub const CSR_CAP: u64 = crate::csr::MAX_CSR_BYTES as u64;
/// Largest certificate file read (`revoke --cert`).
pub const CERT_CAP: u64 = 64 * 1024;
/// Largest kubeadm kubeconfig template read (kubeadm writes a few KiB).
pub const KUBECONFIG_CAP: u64 = 64 * 1024;
/// Largest `kubectl get csr -o json` List read (about 10,000 objects).
pub const OBJECTS_CAP: u64 = 16 * 1024 * 1024;
/// Largest manifest read (about 200,000 entries).
pub const MANIFEST_CAP: u64 = 16 * 1024 * 1024;
/// Largest plan read (a plan of 100,000 CSRs is tens of MiB of JSON).
pub const PLAN_CAP: u64 = 256 * 1024 * 1024;
/// How many directory levels below the root [`Root::walk`] descends.
pub const MAX_DEPTH: usize = 16;
/// How many directory entries [`Root::walk`] looks at before it stops.
pub const MAX_ENTRIES: usize = 1_000_000;

/// Why a file from the input was not read. Each variant has a stable rule id ([`Self::rule`]);
/// paths are as given (relative to the input root for files found beneath it).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The name is not a plain relative path beneath the input root.
    #[error("{path:?}: not a relative path beneath the input: {why}")]
    Path {
        /// The offending name.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A symlink (the file itself or a directory on its way): never followed.
    #[error(
        "{path:?}: is a symlink (or goes through one); hsmca never follows symlinks in its input"
    )]
    Symlink {
        /// The file.
        path: String,
    },
    /// Not a regular file: a FIFO, device, socket or directory.
    #[error("{path:?}: is a {kind}, not a regular file")]
    NotRegular {
        /// The file.
        path: String,
        /// What it is.
        kind: &'static str,
    },
    /// Larger than the cap for its kind.
    #[error("{path:?}: is {size} bytes or more; at most {cap} are read for this kind of file")]
    Size {
        /// The file.
        path: String,
        /// Its size (or how far it was read).
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// A directory deeper than [`MAX_DEPTH`] below the root: not searched.
    #[error("{path:?}: more than {max} directories deep; not searched")]
    Depth {
        /// The directory.
        path: String,
        /// The cap.
        max: usize,
    },
    /// More than [`MAX_ENTRIES`] entries: the rest of the tree was not searched.
    #[error("{path:?}: more than {max} entries in the input; the rest was not searched")]
    Count {
        /// Where the walk stopped.
        path: String,
        /// The cap.
        max: usize,
    },
    /// Any other failure to open or read.
    #[error("{path:?}: cannot read")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl InputError {
    /// The stable rule id: `input.path`, `input.symlink`, `input.not_regular`, `input.size`,
    /// `input.depth`, `input.count` or `input.read`.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::Path { .. } => "input.path",
            Self::Symlink { .. } => "input.symlink",
            Self::NotRegular { .. } => "input.not_regular",
            Self::Size { .. } => "input.size",
            Self::Depth { .. } => "input.depth",
            Self::Count { .. } => "input.count",
            Self::Read { .. } => "input.read",
        }
    }
}

/// An input directory, held open: every file beneath it is reached from this descriptor.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// Flags for every directory opened on the way down: never a symlink, never anything else.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Flags for every file read: never through a symlink, never waiting on a FIFO.
fn file_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC
}

/// What a file type is called in messages (also for `files`).
pub(crate) fn kind_of(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFLNK => "symlink",
        _ => "special file",
    }
}

fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == kind
}

/// The error for a failed `open` of `path`: `ELOOP` (and `ENOTDIR` for a symlink where a
/// directory was wanted) is a symlink, the rest a read failure.
fn open_error(path: &str, e: Errno) -> InputError {
    match e {
        Errno::ELOOP | Errno::EMLINK => InputError::Symlink { path: path.into() },
        Errno::ENXIO | Errno::ENODEV => InputError::NotRegular {
            path: path.into(),
            kind: "special file",
        },
        e => InputError::Read {
            path: path.into(),
            source: e.into(),
        },
    }
}

/// Checks a path from the stick: relative, `/`-separated, no empty, `.` or `..` component, no
/// NUL. Returns its components.
pub fn components(rel: &str) -> Result<Vec<&str>, InputError> {
    let bad = |why| InputError::Path {
        path: rel.into(),
        why,
    };
    if rel.is_empty() {
        return Err(bad("empty"));
    }
    if rel.contains('\0') {
        return Err(bad("contains NUL"));
    }
    if rel.starts_with('/') {
        return Err(bad("absolute"));
    }
    let parts: Vec<&str> = rel.split('/').collect();
    for p in &parts {
        match *p {
            "" => return Err(bad("empty component (`//` or a trailing `/`)")),
            "." => return Err(bad("`.` component")),
            ".." => return Err(bad("`..` component")),
            _ => {}
        }
    }
    Ok(parts)
}

/// Reads an opened descriptor: refuses anything but a regular file, and more than `cap` bytes.
fn read_fd(fd: OwnedFd, path: &str, cap: u64) -> Result<Vec<u8>, InputError> {
    let read_err = |source: std::io::Error| InputError::Read {
        path: path.into(),
        source,
    };
    let st = fstat(&fd).map_err(|e| read_err(e.into()))?;
    if !is_kind(&st, SFlag::S_IFREG) {
        return Err(InputError::NotRegular {
            path: path.into(),
            kind: kind_of(st.st_mode),
        });
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if size > cap {
        return Err(InputError::Size {
            path: path.into(),
            size,
            cap,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // One byte over the cap tells a file that grew since fstat from one that is exactly cap.
    std::fs::File::from(fd)
        .take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let read = bytes.len() as u64;
    if read > cap {
        return Err(InputError::Size {
            path: path.into(),
            size: read,
            cap,
        });
    }
    Ok(bytes)
}

/// Reads one file named on the command line (a plan, a manifest, `kubectl` JSON, a CSR): the
/// operator chose the directory, but the file itself is from the stick, so it too must be a
/// regular file (not a symlink, FIFO or device) of at most `cap` bytes.
pub fn read_file(path: &Path, cap: u64) -> Result<Vec<u8>, InputError> {
    let shown = path.display().to_string();
    let fd =
        nix::fcntl::open(path, file_flags(), Mode::empty()).map_err(|e| open_error(&shown, e))?;
    read_fd(fd, &shown, cap)
}

/// A directory entry: its name and, if known, its type.
type Entry = (Vec<u8>, Option<SFlag>);

/// One entry found by [`Root::walk`] that is not a plain file to read.
pub type Problem = (String, InputError);

impl Root {
    /// Opens the input directory `dir`. Its last component must not be a symlink either.
    pub fn open(dir: &Path) -> Result<Self, InputError> {
        let shown = dir.display().to_string();
        let fd = nix::fcntl::open(dir, dir_flags(), Mode::empty()).map_err(|e| match e {
            // With O_DIRECTORY a symlink comes back as ENOTDIR.
            Errno::ENOTDIR if dir.symlink_metadata().is_ok_and(|m| m.is_symlink()) => {
                InputError::Symlink {
                    path: shown.clone(),
                }
            }
            Errno::ENOTDIR => InputError::NotRegular {
                path: shown.clone(),
                kind: "file (a directory was expected)",
            },
            e => open_error(&shown, e),
        })?;
        Ok(Self {
            fd,
            path: dir.to_path_buf(),
        })
    }

    /// A root over a directory already held open (the output directory, for the sweep of
    /// stale temporaries, which walks it by the same rules).
    pub(crate) fn from_fd(fd: OwnedFd, path: &Path) -> Self {
        Self {
            fd,
            path: path.to_path_buf(),
        }
    }

    /// The directory as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory `parts` beneath the root, one component at a time, never through a
    /// symlink.
    fn descend(&self, rel: &str, parts: &[&str]) -> Result<Option<OwnedFd>, InputError> {
        let mut cur: Option<OwnedFd> = None;
        for p in parts {
            let at = cur.as_ref().unwrap_or(&self.fd);
            let next = openat(at, *p, dir_flags(), Mode::empty()).map_err(|e| match e {
                // With O_DIRECTORY a symlink may also come back as ENOTDIR.
                Errno::ENOTDIR if self.is_symlink(at, p) => {
                    InputError::Symlink { path: rel.into() }
                }
                e => open_error(rel, e),
            })?;
            cur = Some(next);
        }
        Ok(cur)
    }

    fn is_symlink(&self, at: &OwnedFd, name: &str) -> bool {
        nix::sys::stat::fstatat(at, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| is_kind(&st, SFlag::S_IFLNK))
    }

    /// Reads `rel` beneath the root: a regular file of at most `cap` bytes.
    pub fn read(&self, rel: &str, cap: u64) -> Result<Vec<u8>, InputError> {
        let parts = components(rel)?;
        let (name, dirs) = parts.split_last().ok_or_else(|| InputError::Path {
            path: rel.into(),
            why: "empty",
        })?;
        let dir = self.descend(rel, dirs)?;
        let at = dir.as_ref().unwrap_or(&self.fd);
        // Looked at before opening too: opening a device can have effects of its own (a tape
        // rewinds); the fstat after opening is what closes the race.
        if let Ok(st) = nix::sys::stat::fstatat(at, *name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        {
            if is_kind(&st, SFlag::S_IFLNK) {
                return Err(InputError::Symlink { path: rel.into() });
            }
            if !is_kind(&st, SFlag::S_IFREG) {
                return Err(InputError::NotRegular {
                    path: rel.into(),
                    kind: kind_of(st.st_mode),
                });
            }
        }
        let fd = openat(at, *name, file_flags(), Mode::empty()).map_err(|e| open_error(rel, e))?;
        read_fd(fd, rel, cap)
    }

    /// Whether anything (of any type, a symlink included) is at `rel`: for recognising a
    /// layout by its names. Reading it is still [`Self::read`]'s decision.
    pub fn exists(&self, rel: &str) -> bool {
        let Ok(parts) = components(rel) else {
            return false;
        };
        let Some((name, dirs)) = parts.split_last() else {
            return false;
        };
        let Ok(dir) = self.descend(rel, dirs) else {
            return false;
        };
        let at = dir.as_ref().unwrap_or(&self.fd);
        nix::sys::stat::fstatat(at, *name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok()
    }

    /// Every regular file beneath the root whose name `wanted` accepts, as sorted relative
    /// paths, and the entries that were refused: symlinks (any name: a symlinked directory may
    /// hide files), FIFOs, devices and sockets with a wanted name, non-UTF-8 names, directories
    /// too deep or unreadable, and where the walk stopped at [`MAX_ENTRIES`]. Symlinks are
    /// never followed, so a loop costs one entry.
    pub fn walk(&self, wanted: impl Fn(&str) -> bool) -> (Vec<String>, Vec<Problem>) {
        let mut files = Vec::new();
        let mut problems = Vec::new();
        let mut seen = 0usize;
        // Directories still to list, as relative paths ("" is the root), re-opened from the
        // root when their turn comes so that a wide tree does not hold a descriptor each.
        let mut stack: Vec<(String, usize)> = vec![(String::new(), 0)];
        'dirs: while let Some((dir_rel, depth)) = stack.pop() {
            let shown = if dir_rel.is_empty() { "." } else { &dir_rel };
            let listed = self.list(&dir_rel);
            let entries = match listed {
                Ok(entries) => entries,
                Err(e) => {
                    problems.push((shown.to_owned(), e));
                    continue;
                }
            };
            for (name, kind) in entries {
                seen += 1;
                let rel = match std::str::from_utf8(&name) {
                    Ok(n) if dir_rel.is_empty() => n.to_owned(),
                    Ok(n) => format!("{dir_rel}/{n}"),
                    Err(_) => {
                        let lossy = String::from_utf8_lossy(&name);
                        let path = format!("{dir_rel}/{lossy}");
                        let why = "the name is not UTF-8";
                        problems.push((path.clone(), InputError::Path { path, why }));
                        continue;
                    }
                };
                if seen > MAX_ENTRIES {
                    let max = MAX_ENTRIES;
                    problems.push((rel.clone(), InputError::Count { path: rel, max }));
                    break 'dirs;
                }
                match kind {
                    Some(SFlag::S_IFDIR) if depth + 1 > MAX_DEPTH => {
                        let max = MAX_DEPTH;
                        problems.push((rel.clone(), InputError::Depth { path: rel, max }));
                    }
                    Some(SFlag::S_IFDIR) => stack.push((rel, depth + 1)),
                    Some(SFlag::S_IFLNK) => {
                        problems.push((rel.clone(), InputError::Symlink { path: rel }));
                    }
                    Some(SFlag::S_IFREG) if wanted(&rel) => files.push(rel),
                    Some(SFlag::S_IFREG) => {}
                    Some(other) if wanted(&rel) => {
                        let kind = kind_of(other.bits());
                        problems.push((rel.clone(), InputError::NotRegular { path: rel, kind }));
                    }
                    Some(_) => {}
                    None => {
                        let source = std::io::Error::other("cannot tell its type");
                        problems.push((rel.clone(), InputError::Read { path: rel, source }));
                    }
                }
            }
        }
        files.sort();
        problems.sort_by(|a, b| a.0.cmp(&b.0));
        (files, problems)
    }

    /// The entries of directory `rel` ("" for the root), with their types (from the listing,
    /// else `fstatat` without following).
    fn list(&self, rel: &str) -> Result<Vec<Entry>, InputError> {
        let parts = if rel.is_empty() {
            Vec::new()
        } else {
            components(rel)?
        };
        let fd = match self.descend(rel, &parts)? {
            Some(fd) => fd,
            None => {
                openat(&self.fd, ".", dir_flags(), Mode::empty()).map_err(|e| open_error(".", e))?
            }
        };
        let read_err = |e: Errno| InputError::Read {
            path: rel.into(),
            source: e.into(),
        };
        let stat_fd = fd.try_clone().map_err(|source| InputError::Read {
            path: rel.into(),
            source,
        })?;
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(read_err)?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(read_err)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            use nix::dir::Type;
            let kind = match entry.file_type() {
                Some(Type::Directory) => Some(SFlag::S_IFDIR),
                Some(Type::File) => Some(SFlag::S_IFREG),
                Some(Type::Symlink) => Some(SFlag::S_IFLNK),
                Some(Type::Fifo) => Some(SFlag::S_IFIFO),
                Some(Type::CharacterDevice) => Some(SFlag::S_IFCHR),
                Some(Type::BlockDevice) => Some(SFlag::S_IFBLK),
                Some(Type::Socket) => Some(SFlag::S_IFSOCK),
                None => nix::sys::stat::fstatat(
                    &stat_fd,
                    OsStr::from_bytes(name),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .ok()
                .map(|st| SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())),
            };
            out.push((name.to_vec(), kind));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fifo(path: &Path) {
        nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600)).unwrap();
    }

    #[test]
    fn paths_must_be_plain_relative_names() {
        for bad in [
            "",
            "/etc/shadow",
            "../x.csr",
            "a/../../x",
            "a//b",
            "a/",
            "./a",
            "a\0b",
        ] {
            assert_eq!(components(bad).unwrap_err().rule(), "input.path", "{bad:?}");
        }
        assert_eq!(components("a/b.csr").unwrap(), ["a", "b.csr"]);
        assert_eq!(components("..x.csr").unwrap(), ["..x.csr"]);
    }

    #[test]
    fn reads_regular_files_and_refuses_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/ok.csr"), b"csr").unwrap();
        std::fs::write(d.join("secret"), b"secret").unwrap();
        symlink(d.join("secret"), d.join("link.csr")).unwrap();
        symlink("/dev/zero", d.join("zero.csr")).unwrap();
        symlink(d.join("sub"), d.join("linkdir")).unwrap();
        fifo(&d.join("pipe.csr"));
        std::fs::write(d.join("big.csr"), vec![b'x'; 101]).unwrap();
        let root = Root::open(d).unwrap();
        assert_eq!(root.read("sub/ok.csr", 100).unwrap(), b"csr");
        let rule = |rel: &str| root.read(rel, 100).unwrap_err().rule();
        assert_eq!(rule("link.csr"), "input.symlink");
        assert_eq!(rule("zero.csr"), "input.symlink");
        assert_eq!(rule("linkdir/ok.csr"), "input.symlink");
        assert_eq!(rule("pipe.csr"), "input.not_regular");
        assert_eq!(rule("sub"), "input.not_regular");
        assert_eq!(rule("big.csr"), "input.size");
        assert_eq!(rule("../secret"), "input.path");
        assert_eq!(rule("missing.csr"), "input.read");
        // Single files named on the command line get the same rules.
        assert_eq!(read_file(&d.join("secret"), 6).unwrap(), b"secret");
        let file_rule = |p: &str, cap| read_file(&d.join(p), cap).unwrap_err().rule();
        assert_eq!(file_rule("secret", 5), "input.size");
        assert_eq!(file_rule("zero.csr", 5), "input.symlink");
        assert_eq!(file_rule("pipe.csr", 5), "input.not_regular");
        assert_eq!(
            read_file(Path::new("/dev/null"), 5).unwrap_err().rule(),
            "input.not_regular"
        );
    }

    #[test]
    fn walk_never_follows_links_and_reports_what_it_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/x.csr"), b"x").unwrap();
        std::fs::write(d.join("top.req"), b"y").unwrap();
        std::fs::write(d.join("notes.txt"), b"z").unwrap();
        symlink(".", d.join("loop1")).unwrap();
        symlink(".", d.join("a/loop2")).unwrap();
        symlink("/dev/zero", d.join("zero.csr")).unwrap();
        fifo(&d.join("pipe.csr"));
        fifo(&d.join("pipe.txt"));
        std::fs::write(d.join(OsStr::from_bytes(b"bad\xff.csr")), b"w").unwrap();
        let root = Root::open(d).unwrap();
        let wanted = |n: &str| n.ends_with(".csr") || n.ends_with(".req");
        let (files, problems) = root.walk(wanted);
        assert_eq!(files, ["a/b/x.csr", "top.req"]);
        let got: Vec<(&str, &str)> = problems
            .iter()
            .map(|(p, e)| (p.as_str(), e.rule()))
            .collect();
        assert_eq!(
            got,
            [
                ("/bad\u{fffd}.csr", "input.path"),
                ("a/loop2", "input.symlink"),
                ("loop1", "input.symlink"),
                ("pipe.csr", "input.not_regular"),
                ("zero.csr", "input.symlink"),
            ]
        );
    }

    #[test]
    fn a_tree_deeper_than_the_cap_is_one_problem_not_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        for _ in 0..MAX_DEPTH + 3 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("deep.csr"), b"x").unwrap();
        std::fs::write(dir.path().join("ok.csr"), b"x").unwrap();
        let root = Root::open(dir.path()).unwrap();
        let (files, problems) = root.walk(|n| n.ends_with(".csr"));
        assert_eq!(files, ["ok.csr"]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].1.rule(), "input.depth");
    }

    #[test]
    fn a_symlinked_input_root_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        assert!(Root::open(&dir.path().join("real")).is_ok());
        let e = Root::open(&dir.path().join("link")).unwrap_err();
        assert_eq!(e.rule(), "input.symlink");
    }
}
