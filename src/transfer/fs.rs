//! The confined filesystem layer shared by scp and SFTP.
//!
//! Every path a client names is first mapped *lexically* to one of the transfer roots (absolute
//! paths by component prefix, relative paths after joining them to `--home`), then opened by the
//! kernel with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` relative to that root's
//! directory fd. `..` and symlinks can therefore never leave the root: the kernel refuses with
//! `EXDEV`, which we turn into "permission denied" plus a log line — unless the escape was an
//! absolute symlink whose target lies inside a root, which is then followed by mapping the
//! target into that root (see [`Roots::open_beneath`]). Operations on a final name
//! (mkdir, unlink, rename, link...) open the *parent* beneath the root and use the `*at` syscall
//! with a single component, so a symlink in the last position is never followed.
//!
//! Uploads that create or truncate a file go through [`Upload`]: a hidden temporary file in the
//! destination directory that is renamed over the destination on [`Upload::commit`] and removed
//! when dropped without a commit (error, disconnect). The file a commit replaced is handed back
//! as [`Replaced`], so its storage is released after the client has its answer.
//!
//! All functions here block: call them from blocking threads.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, Mode, OFlags, RenameFlags, ResolveFlags, Stat, StatVfs, Timespec, Timestamps,
};
use tracing::warn;

use crate::escape::escape_bytes;

/// One transfer root: its path as configured (and canonical, if that differs) and an `O_PATH`
/// directory fd everything is opened beneath.
#[derive(Debug)]
struct Root {
    /// Normalised components of the configured path.
    comps: Vec<Vec<u8>>,
    /// Normalised components of the canonical path, when different.
    canon: Option<Vec<Vec<u8>>>,
    fd: OwnedFd,
}

/// The set of roots and the home directory relative paths start from.
#[derive(Debug)]
pub struct Roots {
    roots: Vec<Root>,
    home: Vec<u8>,
    umask: u32,
}

/// A client path mapped into a root: which root, and the path relative to it (`.` for the root).
#[derive(Debug, Clone)]
pub struct Located {
    root: usize,
    /// Components below the root (may contain `..`, which the kernel resolves beneath the root).
    comps: Vec<Vec<u8>>,
    /// The absolute lexical path, for messages and logs.
    pub display: Vec<u8>,
}

impl Located {
    fn rel(&self) -> Vec<u8> {
        if self.comps.is_empty() {
            return b".".to_vec();
        }
        self.comps.join(&b'/')
    }

    /// The last component, if the path names something below its root.
    pub fn file_name(&self) -> Option<&[u8]> {
        self.comps.last().map(|c| c.as_slice())
    }

    /// This path with one more component.
    pub fn join(&self, name: &[u8]) -> Located {
        let mut comps = self.comps.clone();
        comps.push(name.to_vec());
        let mut display = self.display.clone();
        if display.last() != Some(&b'/') {
            display.push(b'/');
        }
        display.extend_from_slice(name);
        Located {
            root: self.root,
            comps,
            display,
        }
    }
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);
/// Absolute symlinks into a root followed on one path at most (the kernel allows 40 links).
const MAX_ABSOLUTE_LINKS: usize = 8;

pub fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

fn denied() -> io::Error {
    io::Error::from_raw_os_error(libc::EACCES)
}

/// Split a path into components, dropping empty and `.` components.
fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(|c| c.to_vec())
        .collect()
}

/// Lexical normalisation of an absolute path: `.` and empty components go, `..` removes the
/// previous component (never above `/`).
pub fn normalize(path: &[u8]) -> Vec<u8> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    let mut s = Vec::with_capacity(path.len() + 1);
    for c in out {
        s.push(b'/');
        s.extend_from_slice(c);
    }
    if s.is_empty() {
        s.push(b'/');
    }
    s
}

/// The process umask, read without changing it (`/proc/self/status`), 022 if unknown.
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

fn retry<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> rustix::io::Result<T> {
    // openat2 with RESOLVE_BENEATH may return EAGAIN when a concurrent rename raced the lookup.
    let mut tries = 0;
    loop {
        match f() {
            Err(rustix::io::Errno::AGAIN) if tries < 16 => tries += 1,
            r => return r,
        }
    }
}

impl Roots {
    /// Open every root (an error names `--transfer-root` and the path).
    pub fn open(roots: &[PathBuf], home: &Path) -> anyhow::Result<Roots> {
        let mut out = Vec::with_capacity(roots.len());
        for path in roots {
            let fd = rustix::fs::open(
                path,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| anyhow::anyhow!("--transfer-root {}: {}", path.display(), errno(e)))?;
            let abs = if path.is_absolute() {
                path.clone()
            } else {
                std::env::current_dir()
                    .map_err(|e| anyhow::anyhow!("--transfer-root {}: {e}", path.display()))?
                    .join(path)
            };
            let comps = components(&normalize(abs.as_os_str().as_bytes()));
            let canon = std::fs::canonicalize(&abs)
                .ok()
                .map(|c| components(c.as_os_str().as_bytes()))
                .filter(|c| *c != comps);
            out.push(Root { comps, canon, fd });
        }
        if out.is_empty() {
            anyhow::bail!("--transfer-root: at least one transfer root is required");
        }
        let home = if home.is_absolute() {
            home.to_path_buf()
        } else {
            std::env::current_dir()
                .unwrap_or_else(|_| PathBuf::from("/"))
                .join(home)
        };
        Ok(Roots {
            roots: out,
            home: normalize(home.as_os_str().as_bytes()),
            umask: current_umask(),
        })
    }

    pub fn umask(&self) -> u32 {
        self.umask
    }

    pub fn home(&self) -> &[u8] {
        &self.home
    }

    /// The absolute form of a client path: relative paths start at home.
    pub fn absolute(&self, path: &[u8]) -> Vec<u8> {
        if path.first() == Some(&b'/') {
            path.to_vec()
        } else {
            let mut p = self.home.clone();
            if !path.is_empty() {
                p.push(b'/');
                p.extend_from_slice(path);
            }
            p
        }
    }

    /// Expand a leading `~` or `~/` to home (other `~user` forms stay as they are).
    pub fn expand_tilde(&self, path: &[u8]) -> Vec<u8> {
        if path == b"~" {
            return self.home.clone();
        }
        if let Some(rest) = path.strip_prefix(b"~/") {
            let mut p = self.home.clone();
            p.push(b'/');
            p.extend_from_slice(rest);
            return p;
        }
        path.to_vec()
    }

    /// Map a client path to a root; outside every root → permission denied and a log line.
    pub fn locate(&self, path: &[u8]) -> io::Result<Located> {
        if path.contains(&0) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let abs = self.absolute(path);
        let comps = components(&abs);
        for (i, root) in self.roots.iter().enumerate() {
            for prefix in std::iter::once(&root.comps).chain(root.canon.as_ref()) {
                if comps.len() >= prefix.len() && comps[..prefix.len()] == prefix[..] {
                    return Ok(Located {
                        root: i,
                        comps: comps[prefix.len()..].to_vec(),
                        display: abs,
                    });
                }
            }
        }
        warn!(path = %escape_bytes(path, 1024), "transfer refused: path is outside the transfer roots");
        Err(denied())
    }

    fn root_fd(&self, loc: &Located) -> BorrowedFd<'_> {
        self.roots[loc.root].fd.as_fd()
    }

    fn escaped(&self, loc: &Located, e: rustix::io::Errno) -> io::Error {
        if e == rustix::io::Errno::XDEV {
            warn!(
                path = %escape_bytes(&loc.display, 1024),
                "transfer refused: path resolves outside its transfer root (.. or symlink)"
            );
            return denied();
        }
        errno(e)
    }

    /// openat2 beneath the root of `loc`. An absolute symlink on the way that points into a
    /// root (the same or another: OpenNebula's `ln` links, datastores linked to mounts that are
    /// roots themselves) is followed by mapping its target into that root and opening again
    /// beneath it; anything else leaving the roots stays refused.
    pub fn open_beneath(&self, loc: &Located, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
        let mut loc = std::borrow::Cow::Borrowed(loc);
        for _ in 0..MAX_ABSOLUTE_LINKS {
            match self.open_beneath_once(&loc, flags, mode) {
                Err(rustix::io::Errno::XDEV) => match self.reroute(&loc, flags) {
                    Some(next) => loc = std::borrow::Cow::Owned(next),
                    None => break,
                },
                r => return r.map_err(errno),
            }
        }
        Err(self.escaped(&loc, rustix::io::Errno::XDEV))
    }

    /// Where `loc` leads when its first absolute symlink is replaced by its target, if that
    /// target lies inside a root. `None` when nothing of the kind is on the path (a `..` or a
    /// relative link escaping), which leaves the refusal in place.
    fn reroute(&self, loc: &Located, flags: OFlags) -> Option<Located> {
        let last = loc.comps.len();
        for i in 1..=last {
            // The final component is followed only when the open would follow it.
            if i == last && flags.contains(OFlags::NOFOLLOW) {
                return None;
            }
            let prefix = Located {
                root: loc.root,
                comps: loc.comps[..i].to_vec(),
                display: loc.display.clone(),
            };
            let fd = self
                .open_beneath_once(&prefix, OFlags::PATH | OFlags::NOFOLLOW, 0)
                .ok()?;
            let st = rustix::fs::fstat(&fd).ok()?;
            if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                continue;
            }
            let target = rustix::fs::readlinkat(&fd, "", Vec::new())
                .ok()?
                .into_bytes();
            if target.first() != Some(&b'/') {
                // Relative links are the kernel's business (beneath the root).
                continue;
            }
            let mut path = target;
            for c in &loc.comps[i..] {
                path.push(b'/');
                path.extend_from_slice(c);
            }
            let mut next = self.locate(&path).ok()?;
            next.display = loc.display.clone();
            return Some(next);
        }
        None
    }

    fn open_beneath_once(
        &self,
        loc: &Located,
        flags: OFlags,
        mode: u32,
    ) -> rustix::io::Result<OwnedFd> {
        let rel = loc.rel();
        // openat2 is strict: O_PATH allows only O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC.
        let extra = if flags.contains(OFlags::PATH) {
            OFlags::CLOEXEC
        } else {
            OFlags::CLOEXEC | OFlags::NOCTTY
        };
        retry(|| {
            rustix::fs::openat2(
                self.root_fd(loc),
                rel.as_slice(),
                flags | extra,
                // ... and a mode only together with O_CREAT.
                Mode::from_raw_mode(if flags.contains(OFlags::CREATE) {
                    mode
                } else {
                    0
                }),
                RESOLVE,
            )
        })
    }

    /// An `O_PATH` fd for `loc`; `follow` decides whether a final symlink is followed (beneath).
    pub fn open_path(&self, loc: &Located, follow: bool) -> io::Result<OwnedFd> {
        let mut flags = OFlags::PATH;
        if !follow {
            flags |= OFlags::NOFOLLOW;
        }
        self.open_beneath(loc, flags, 0)
    }

    pub fn stat(&self, loc: &Located, follow: bool) -> io::Result<Stat> {
        let fd = self.open_path(loc, follow)?;
        rustix::fs::fstat(&fd).map_err(errno)
    }

    /// The parent directory (an `O_PATH` fd beneath the root) and the final name. Refused for a
    /// root itself and for names ending in `.` or `..`.
    pub fn parent(&self, loc: &Located) -> io::Result<(OwnedFd, Vec<u8>)> {
        let Some(name) = loc.comps.last() else {
            warn!(path = %escape_bytes(&loc.display, 1024), "transfer refused: cannot modify a transfer root itself");
            return Err(denied());
        };
        if name == b".." {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let parent = Located {
            root: loc.root,
            comps: loc.comps[..loc.comps.len() - 1].to_vec(),
            display: loc.display.clone(),
        };
        let fd = self.open_beneath(&parent, OFlags::PATH | OFlags::DIRECTORY, 0)?;
        Ok((fd, name.clone()))
    }

    pub fn mkdir(&self, loc: &Located, mode: u32) -> io::Result<()> {
        let (dir, name) = self.parent(loc)?;
        rustix::fs::mkdirat(&dir, name.as_slice(), Mode::from_raw_mode(mode & 0o7777))
            .map_err(errno)
    }

    pub fn rmdir(&self, loc: &Located) -> io::Result<()> {
        let (dir, name) = self.parent(loc)?;
        rustix::fs::unlinkat(&dir, name.as_slice(), AtFlags::REMOVEDIR).map_err(errno)
    }

    pub fn unlink(&self, loc: &Located) -> io::Result<()> {
        let (dir, name) = self.parent(loc)?;
        rustix::fs::unlinkat(&dir, name.as_slice(), AtFlags::empty()).map_err(errno)
    }

    /// Rename; `replace` false refuses an existing destination (SFTP v3 `RENAME`).
    pub fn rename(&self, from: &Located, to: &Located, replace: bool) -> io::Result<()> {
        let (fdir, fname) = self.parent(from)?;
        let (tdir, tname) = self.parent(to)?;
        if replace {
            return rustix::fs::renameat(&fdir, fname.as_slice(), &tdir, tname.as_slice())
                .map_err(errno);
        }
        match rustix::fs::renameat_with(
            &fdir,
            fname.as_slice(),
            &tdir,
            tname.as_slice(),
            RenameFlags::NOREPLACE,
        ) {
            Err(rustix::io::Errno::INVAL) => {
                // The filesystem lacks RENAME_NOREPLACE: check, then rename (as sftp-server does
                // when link(2) is unavailable).
                match rustix::fs::statat(&tdir, tname.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(_) => Err(io::Error::from_raw_os_error(libc::EEXIST)),
                    Err(_) => {
                        rustix::fs::renameat(&fdir, fname.as_slice(), &tdir, tname.as_slice())
                            .map_err(errno)
                    }
                }
            }
            r => r.map_err(errno),
        }
    }

    /// Create a symlink at `link` whose content is `target` (uninterpreted; following it later is
    /// confined like any other path).
    pub fn symlink(&self, target: &[u8], link: &Located) -> io::Result<()> {
        if target.contains(&0) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let (dir, name) = self.parent(link)?;
        rustix::fs::symlinkat(target, &dir, name.as_slice()).map_err(errno)
    }

    /// Hard link `new` to the object at `old` (a final symlink is linked, not followed).
    pub fn hardlink(&self, old: &Located, new: &Located) -> io::Result<()> {
        let (odir, oname) = self.parent(old)?;
        let (ndir, nname) = self.parent(new)?;
        rustix::fs::linkat(
            &odir,
            oname.as_slice(),
            &ndir,
            nname.as_slice(),
            AtFlags::empty(),
        )
        .map_err(errno)
    }

    pub fn readlink(&self, loc: &Located) -> io::Result<Vec<u8>> {
        let (dir, name) = self.parent(loc)?;
        rustix::fs::readlinkat(&dir, name.as_slice(), Vec::new())
            .map(|c| c.into_bytes())
            .map_err(errno)
    }

    pub fn statvfs(&self, loc: &Located) -> io::Result<StatVfs> {
        let fd = self.open_path(loc, true)?;
        rustix::fs::fstatvfs(&fd).map_err(errno)
    }

    /// Open a directory for listing.
    pub fn opendir(&self, loc: &Located) -> io::Result<OwnedFd> {
        self.open_beneath(loc, OFlags::RDONLY | OFlags::DIRECTORY, 0)
    }

    /// Open an existing file for reading.
    pub fn open_read(&self, loc: &Located) -> io::Result<File> {
        let fd = self.open_beneath(loc, OFlags::RDONLY, 0)?;
        let st = rustix::fs::fstat(&fd).map_err(errno)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        Ok(File::from(fd))
    }

    /// Set attributes on the object at `loc`. With `follow` false a final symlink is not
    /// followed (lsetstat); Linux cannot change a symlink's mode, so that is refused.
    pub fn set_attrs(&self, loc: &Located, follow: bool, a: &SetAttrs) -> io::Result<()> {
        let fd = self.open_path(loc, follow)?;
        let st = rustix::fs::fstat(&fd).map_err(errno)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if let Some(size) = a.size {
            let w = self.open_beneath(loc, OFlags::WRONLY | OFlags::NONBLOCK, 0)?;
            rustix::fs::ftruncate(&w, size).map_err(errno)?;
        }
        // The O_PATH fd names exactly the inode we resolved beneath the root; the /proc magic
        // link lets the path-based syscalls act on that inode without resolving anything again.
        let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let proc = proc.as_str();
        let (uid, gid) = a.owner();
        if uid.is_some() || gid.is_some() {
            rustix::fs::chownat(rustix::fs::CWD, proc, uid, gid, AtFlags::empty())
                .map_err(errno)?;
        }
        if let Some(perm) = a.perm {
            rustix::fs::chmodat(
                rustix::fs::CWD,
                proc,
                Mode::from_raw_mode(perm & 0o7777),
                AtFlags::empty(),
            )
            .map_err(errno)?;
        }
        if let Some((atime, mtime)) = a.times {
            rustix::fs::utimensat(
                rustix::fs::CWD,
                proc,
                &timestamps(atime, mtime),
                AtFlags::empty(),
            )
            .map_err(errno)?;
        }
        Ok(())
    }

    /// Create the destination of an upload. New files and existing regular files get a hidden
    /// temporary file renamed into place on commit; anything else (a symlink, a FIFO) is opened
    /// in place beneath the root. `mode` is the requested mode (before the umask).
    pub fn create_upload(&self, loc: &Located, mode: u32, fsync: bool) -> io::Result<Upload> {
        self.upload(loc, mode, fsync, false)
    }

    /// Like [`Self::create_upload`] for an open *without* truncation (OpenSSH ≥ 9 uploads open
    /// with WRITE|CREAT and truncate at the end): the result must equal writing in place, so at
    /// commit the bytes of the old file the client did not overwrite are copied into the
    /// temporary file before the rename. An interrupted upload still leaves the old file intact.
    pub fn create_upload_overlay(
        &self,
        loc: &Located,
        mode: u32,
        fsync: bool,
    ) -> io::Result<Upload> {
        self.upload(loc, mode, fsync, true)
    }

    fn upload(&self, loc: &Located, mode: u32, fsync: bool, keep: bool) -> io::Result<Upload> {
        let (dir, name) = self.parent(loc)?;
        let mut overlay = None;
        let final_mode = match rustix::fs::statat(&dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
        {
            Err(rustix::io::Errno::NOENT) => mode & 0o7777 & !self.umask,
            Err(e) => return Err(errno(e)),
            Ok(st) => match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => return Err(io::Error::from_raw_os_error(libc::EISDIR)),
                libc::S_IFREG => {
                    rustix::fs::accessat(
                        &dir,
                        name.as_slice(),
                        rustix::fs::Access::WRITE_OK,
                        AtFlags::EACCESS | AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(errno)?;
                    if keep {
                        let old = rustix::fs::openat(
                            &dir,
                            name.as_slice(),
                            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
                            Mode::empty(),
                        );
                        match old {
                            Ok(old) => {
                                let len = st.st_size.max(0) as u64;
                                overlay = Some(Overlay {
                                    old: File::from(old),
                                    old_limit: len,
                                    size: len,
                                    written: Vec::new(),
                                });
                            }
                            // Unreadable (write-only) file: fall back to writing in place.
                            Err(_) => {
                                let fd = self.open_beneath(
                                    loc,
                                    OFlags::WRONLY | OFlags::CREATE,
                                    mode & 0o7777,
                                )?;
                                return Ok(Upload::in_place(File::from(fd), loc.display.clone()));
                            }
                        }
                    }
                    st.st_mode & 0o7777
                }
                _ => {
                    let trunc = if keep { OFlags::empty() } else { OFlags::TRUNC };
                    let fd = self.open_beneath(
                        loc,
                        OFlags::WRONLY | OFlags::CREATE | trunc,
                        mode & 0o7777,
                    )?;
                    return Ok(Upload::in_place(File::from(fd), loc.display.clone()));
                }
            },
        };
        let mut tmp = Vec::with_capacity(name.len() + 32);
        tmp.push(b'.');
        tmp.extend_from_slice(&name[..name.len().min(180)]);
        tmp.extend_from_slice(format!(".{:016x}.tm-upload", rand::random::<u64>()).as_bytes());
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_slice(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(errno)?;
        Ok(Upload {
            file: File::from(fd),
            atomic: Some(Atomic {
                dir,
                tmp: CString::new(tmp).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
                name,
                mode: final_mode,
                fsync,
                committed: false,
            }),
            overlay,
            display: loc.display.clone(),
        })
    }
}

/// Attributes to set (SFTP setstat, scp -p).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SetAttrs {
    pub size: Option<u64>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub perm: Option<u32>,
    /// (atime, mtime) in seconds.
    pub times: Option<(i64, i64)>,
}

impl SetAttrs {
    /// Owner and group to set. An id of `u32::MAX` is chown(2)'s -1, "leave unchanged" (and not
    /// a valid id for rustix).
    pub fn owner(&self) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
        (
            self.uid
                .filter(|&u| u != u32::MAX)
                .map(rustix::fs::Uid::from_raw),
            self.gid
                .filter(|&g| g != u32::MAX)
                .map(rustix::fs::Gid::from_raw),
        )
    }
}

pub fn timestamps(atime: i64, mtime: i64) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: atime,
            tv_nsec: 0,
        },
        last_modification: Timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
    }
}

#[derive(Debug)]
struct Atomic {
    dir: OwnedFd,
    tmp: CString,
    name: Vec<u8>,
    mode: u32,
    fsync: bool,
    committed: bool,
}

/// What an upload opened without truncation needs to reproduce in-place semantics at commit.
#[derive(Debug)]
struct Overlay {
    /// The destination as it was at open.
    old: File,
    /// Old bytes beyond this were truncated away by the client.
    old_limit: u64,
    /// The logical file size.
    size: u64,
    /// Written ranges, sorted and merged.
    written: Vec<(u64, u64)>,
}

impl Overlay {
    fn wrote(&mut self, start: u64, end: u64) {
        self.size = self.size.max(end);
        if let Some(last) = self.written.last_mut()
            && last.0 <= start
            && start <= last.1
        {
            last.1 = last.1.max(end);
            return;
        }
        self.written.push((start, end));
        self.written.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.written.len());
        for (s, e) in self.written.drain(..) {
            match merged.last_mut() {
                Some(m) if s <= m.1 => m.1 = m.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.written = merged;
    }

    fn truncate(&mut self, size: u64) {
        self.size = size;
        self.old_limit = self.old_limit.min(size);
        self.written.retain(|r| r.0 < size);
        if let Some(last) = self.written.last_mut() {
            last.1 = last.1.min(size);
        }
    }

    /// Ranges of old content that must be copied: [0, old_limit) minus what was written.
    fn gaps(&self) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut pos = 0;
        for &(s, e) in &self.written {
            if s >= self.old_limit {
                break;
            }
            if s > pos {
                gaps.push((pos, s));
            }
            pos = pos.max(e);
        }
        if pos < self.old_limit {
            gaps.push((pos, self.old_limit));
        }
        gaps
    }
}

/// A file being uploaded. Dropping it without [`Upload::commit`] removes the temporary file and
/// leaves any existing destination untouched.
#[derive(Debug)]
pub struct Upload {
    file: File,
    atomic: Option<Atomic>,
    overlay: Option<Overlay>,
    pub display: Vec<u8>,
}

impl Upload {
    fn in_place(file: File, display: Vec<u8>) -> Upload {
        Upload {
            file,
            atomic: None,
            overlay: None,
            display,
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Positioned write (SFTP).
    pub fn write_at(&mut self, data: &[u8], off: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, off)?;
        if let Some(o) = &mut self.overlay {
            o.wrote(off, off + data.len() as u64);
        }
        Ok(())
    }

    /// Set the final mode (scp -p, SFTP fsetstat).
    pub fn set_mode(&mut self, mode: u32) -> io::Result<()> {
        match &mut self.atomic {
            Some(a) => a.mode = mode & 0o7777,
            None => {
                rustix::fs::fchmod(&self.file, Mode::from_raw_mode(mode & 0o7777)).map_err(errno)?
            }
        }
        Ok(())
    }

    /// Apply attributes to the open file (mode is kept for the commit).
    pub fn set_attrs(&mut self, a: &SetAttrs) -> io::Result<()> {
        if let Some(size) = a.size {
            rustix::fs::ftruncate(&self.file, size).map_err(errno)?;
            if let Some(o) = &mut self.overlay {
                o.truncate(size);
            }
        }
        let (uid, gid) = a.owner();
        if uid.is_some() || gid.is_some() {
            rustix::fs::fchown(&self.file, uid, gid).map_err(errno)?;
        }
        if let Some(perm) = a.perm {
            self.set_mode(perm)?;
        }
        if let Some((atime, mtime)) = a.times {
            rustix::fs::futimens(&self.file, &timestamps(atime, mtime)).map_err(errno)?;
        }
        Ok(())
    }

    /// Finish: fsync (if configured), give the file its mode and rename it over the destination.
    /// The file that was replaced comes back as [`Replaced`]: drop it once the client has been
    /// answered.
    pub fn commit(mut self) -> io::Result<Replaced> {
        if let Some(o) = &self.overlay {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; 1 << 20];
            for (mut s, e) in o.gaps() {
                // Only the old file's data extents are copied: its holes stay holes (the
                // temporary file is truncated to the final size below), so overlaying a
                // terabyte-sized sparse file costs its data, not a terabyte of writes.
                while s < e {
                    let (data, hole) = data_extent(&o.old, s, e);
                    s = data;
                    while s < hole {
                        let want = ((hole - s) as usize).min(buf.len());
                        let n = o.old.read_at(&mut buf[..want], s)?;
                        if n == 0 {
                            s = e; // the old file shrank meanwhile: the rest stays a hole
                            break;
                        }
                        self.file.write_all_at(&buf[..n], s)?;
                        s += n as u64;
                    }
                }
            }
            rustix::fs::ftruncate(&self.file, o.size).map_err(errno)?;
        }
        let Some(a) = self.atomic.as_mut() else {
            return Ok(Replaced(None));
        };
        if a.fsync {
            rustix::fs::fsync(&self.file).map_err(errno)?;
        }
        rustix::fs::fchmod(&self.file, Mode::from_raw_mode(a.mode)).map_err(errno)?;
        // Hold the destination about to be replaced (O_PATH: no I/O, no open side effects), so
        // that the rename only unlinks it and the release of its blocks waits for `Replaced`.
        let old = rustix::fs::openat(
            &a.dir,
            a.name.as_slice(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok();
        rustix::fs::renameat(&a.dir, a.tmp.as_c_str(), &a.dir, a.name.as_slice()).map_err(errno)?;
        a.committed = true;
        if a.fsync {
            // Make the rename durable too; the data is already safe, so failure here is minor.
            if let Ok(d) = rustix::fs::openat(
                &a.dir,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                let _ = rustix::fs::fsync(&d);
            }
        }
        Ok(Replaced(old))
    }
}

/// The file an upload's commit renamed over, unlinked but still referenced. Releasing a large
/// file's blocks is slow (a third of a second for 2 GiB on tmpfs) and the rename would do it
/// while the client waits for its answer; dropping this does it instead, so drop it after
/// answering, on a thread that may block ([`Replaced::release_in_background`] from async code).
#[derive(Debug, Default)]
#[must_use = "dropping it at once releases the old file's storage before the client is answered"]
pub struct Replaced(Option<OwnedFd>);

impl Replaced {
    /// Release the replaced file's storage on the blocking pool (here and now outside a
    /// runtime).
    pub fn release_in_background(self) {
        if self.0.is_some()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn_blocking(move || drop(self));
        }
    }
}

/// The first data extent of `file` at or after `from`, clipped to `end`, as (start, end);
/// (end, end) when only a hole is left. Without SEEK_DATA support everything counts as data.
fn data_extent(file: &File, from: u64, end: u64) -> (u64, u64) {
    use rustix::fs::{SeekFrom, seek};
    let start = match seek(file, SeekFrom::Data(from)) {
        Ok(d) => d.min(end),
        Err(rustix::io::Errno::NXIO) => end,
        Err(_) => return (from, end),
    };
    let stop = match seek(file, SeekFrom::Hole(start)) {
        Ok(h) if h > start => h.min(end),
        _ => end,
    };
    (start, stop)
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(a) = &self.atomic
            && !a.committed
        {
            let _ = rustix::fs::unlinkat(&a.dir, a.tmp.as_c_str(), AtFlags::empty());
        }
    }
}

/// `OsStr` view of bytes, for messages.
pub fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn setup() -> (tempfile::TempDir, Roots, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(dir.path().join("secret"), b"secret").unwrap();
        let roots = Roots::open(std::slice::from_ref(&root), dir.path()).unwrap();
        (dir, roots, root)
    }

    fn p(path: &Path) -> Vec<u8> {
        path.as_os_str().as_bytes().to_vec()
    }

    fn is_denied(e: &io::Error) -> bool {
        e.raw_os_error() == Some(libc::EACCES)
    }

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(normalize(b"/a/./b//c/../d"), b"/a/b/d");
        assert_eq!(normalize(b"/../.."), b"/");
        assert_eq!(normalize(b""), b"/");
    }

    #[test]
    fn open_roots_names_the_flag() {
        let e = Roots::open(&[PathBuf::from("/nonexistent/xyz")], Path::new("/")).unwrap_err();
        let msg = format!("{e}");
        assert!(
            msg.contains("--transfer-root") && msg.contains("/nonexistent/xyz"),
            "{msg}"
        );
    }

    #[test]
    fn dotdot_escape_is_refused() {
        let (dir, roots, root) = setup();
        let loc = roots.locate(&p(&root.join("../secret"))).unwrap();
        assert!(is_denied(&roots.open_read(&loc).unwrap_err()));
        let loc = roots.locate(&p(&root.join("sub/../../secret"))).unwrap();
        assert!(is_denied(&roots.open_read(&loc).unwrap_err()));
        // relative to home (the temp dir): "secret" is outside the root
        assert!(is_denied(&roots.locate(b"secret").unwrap_err()));
        let loc = roots.locate(b"root/../secret").unwrap();
        assert!(is_denied(&roots.open_read(&loc).unwrap_err()));
        drop(dir);
    }

    #[test]
    fn absolute_outside_is_refused() {
        let (_dir, roots, root) = setup();
        assert!(is_denied(&roots.locate(b"/etc/passwd").unwrap_err()));
        // a sibling whose name merely starts with the root's name is outside (no string prefix)
        let mut sib = p(&root);
        sib.extend_from_slice(b"2/x");
        assert!(is_denied(&roots.locate(&sib).unwrap_err()));
    }

    #[test]
    fn absolute_symlinks_into_a_root_are_followed_beneath_it() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dir.path().join("datastores");
        let mount = dir.path().join("mnt");
        std::fs::create_dir_all(ds.join("1")).unwrap();
        std::fs::create_dir_all(ds.join("0/5")).unwrap();
        std::fs::create_dir_all(mount.join("100")).unwrap();
        std::fs::write(ds.join("1/img"), b"image").unwrap();
        std::fs::write(mount.join("100/img"), b"mounted").unwrap();
        std::fs::write(dir.path().join("secret"), b"secret").unwrap();
        // OpenNebula `ln`: an absolute link from the system datastore into an image datastore
        std::os::unix::fs::symlink(ds.join("1/img"), ds.join("0/5/disk.0")).unwrap();
        // a datastore that is a link to a mount, itself a root
        std::os::unix::fs::symlink(mount.join("100"), ds.join("100")).unwrap();
        // links that lead out, or round
        std::os::unix::fs::symlink(dir.path().join("secret"), ds.join("out")).unwrap();
        std::os::unix::fs::symlink(ds.join("100/../../secret"), ds.join("up")).unwrap();
        std::os::unix::fs::symlink(ds.join("round"), ds.join("round")).unwrap();
        let roots = Roots::open(&[ds.clone(), mount.clone()], dir.path()).unwrap();
        let read = |path: &Path| -> io::Result<Vec<u8>> {
            let mut f = roots.open_read(&roots.locate(&p(path))?)?;
            let mut v = vec![];
            std::io::Read::read_to_end(&mut f, &mut v)?;
            Ok(v)
        };
        assert_eq!(read(&ds.join("0/5/disk.0")).unwrap(), b"image");
        assert_eq!(read(&ds.join("100/img")).unwrap(), b"mounted");
        assert!(is_denied(&read(&ds.join("out")).unwrap_err()));
        assert!(is_denied(&read(&ds.join("up")).unwrap_err()));
        assert!(read(&ds.join("round")).is_err());
        // the final link is not followed where the operation says so
        let loc = roots.locate(&p(&ds.join("0/5/disk.0"))).unwrap();
        assert!(roots.stat(&loc, false).unwrap().st_mode & libc::S_IFMT == libc::S_IFLNK);
        // an upload through a linked datastore lands in the mount, atomically
        let loc = roots.locate(&p(&ds.join("100/new"))).unwrap();
        let mut up = roots.create_upload(&loc, 0o644, false).unwrap();
        up.write_at(b"uploaded", 0).unwrap();
        drop(up.commit().unwrap());
        assert_eq!(std::fs::read(mount.join("100/new")).unwrap(), b"uploaded");
        // with the mount not a root, the linked datastore is out of reach
        let only_ds = Roots::open(std::slice::from_ref(&ds), dir.path()).unwrap();
        let loc = only_ds.locate(&p(&ds.join("100/img"))).unwrap();
        assert!(is_denied(&only_ds.open_read(&loc).unwrap_err()));
    }

    #[test]
    fn symlink_out_and_loop() {
        let (dir, roots, root) = setup();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../secret", root.join("rel")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        std::os::unix::fs::symlink("sub", root.join("in")).unwrap();
        for name in ["abs", "rel"] {
            let loc = roots.locate(&p(&root.join(name))).unwrap();
            assert!(is_denied(&roots.open_read(&loc).unwrap_err()), "{name}");
            assert!(is_denied(&roots.stat(&loc, true).unwrap_err()), "{name}");
            // lstat of the link itself is fine
            assert!(roots.stat(&loc, false).is_ok());
            // setstat follows and is refused; the target keeps its mode
            let a = SetAttrs {
                perm: Some(0o777),
                ..Default::default()
            };
            assert!(is_denied(&roots.set_attrs(&loc, true, &a).unwrap_err()));
        }
        let mode = std::fs::metadata(dir.path().join("secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_ne!(mode & 0o777, 0o777);
        let loc = roots.locate(&p(&root.join("loop"))).unwrap();
        assert_eq!(
            roots.open_read(&loc).unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        // a symlink inside the root works
        let loc = roots.locate(&p(&root.join("in"))).unwrap();
        assert!(roots.stat(&loc, true).is_ok());
    }

    #[test]
    fn rename_and_link_out_are_refused() {
        let (dir, roots, root) = setup();
        std::fs::write(root.join("f"), b"data").unwrap();
        let from = roots.locate(&p(&root.join("f"))).unwrap();
        assert!(is_denied(
            &roots.locate(&p(&dir.path().join("stolen"))).unwrap_err()
        ));
        let to = roots.locate(&p(&root.join("../stolen"))).unwrap();
        assert!(is_denied(&roots.rename(&from, &to, true).unwrap_err()));
        assert!(is_denied(&roots.hardlink(&from, &to).unwrap_err()));
        // a directory symlink pointing out cannot be used as a parent
        std::os::unix::fs::symlink(dir.path(), root.join("out")).unwrap();
        let to = roots.locate(&p(&root.join("out/stolen"))).unwrap();
        assert!(is_denied(&roots.rename(&from, &to, true).unwrap_err()));
        assert!(is_denied(&roots.hardlink(&from, &to).unwrap_err()));
        assert!(is_denied(&roots.mkdir(&to, 0o755).unwrap_err()));
        assert!(!dir.path().join("stolen").exists());
        // hardlink from outside into the root
        let src = roots.locate(&p(&root.join("out/secret"))).unwrap();
        let dst = roots.locate(&p(&root.join("copy"))).unwrap();
        assert!(is_denied(&roots.hardlink(&src, &dst).unwrap_err()));
        assert!(!root.join("copy").exists());
        // the root itself cannot be removed or renamed
        let r = roots.locate(&p(&root)).unwrap();
        assert!(is_denied(&roots.rmdir(&r).unwrap_err()));
        assert!(is_denied(&roots.rename(&r, &dst, true).unwrap_err()));
    }

    #[test]
    fn commit_hands_back_the_replaced_file_until_released() {
        let (_dir, roots, root) = setup();
        let loc = roots.locate(&p(&root.join("img"))).unwrap();
        // a new file replaces nothing
        let mut up = roots.create_upload(&loc, 0o644, false).unwrap();
        up.write_at(b"first", 0).unwrap();
        assert!(up.commit().unwrap().0.is_none());
        // replacing: the old file is unlinked but still held, blocks and all, until dropped
        let mut up = roots.create_upload(&loc, 0o644, false).unwrap();
        up.write_at(b"second!", 0).unwrap();
        let replaced = up.commit().unwrap();
        let held = rustix::fs::fstat(replaced.0.as_ref().unwrap()).unwrap();
        assert_eq!((held.st_nlink, held.st_size), (0, 5));
        assert_eq!(std::fs::read(root.join("img")).unwrap(), b"second!");
        // released from async code: on the blocking pool
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async { replaced.release_in_background() });
        drop(rt); // waits for the blocking pool
        let mut names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["img", "sub"], "no temporary file is left");
    }

    #[test]
    fn overlay_upload_keeps_unwritten_old_bytes() {
        let (_dir, roots, root) = setup();
        std::fs::write(root.join("f"), b"0123456789").unwrap();
        let loc = roots.locate(&p(&root.join("f"))).unwrap();
        let mut up = roots.create_upload_overlay(&loc, 0o644, false).unwrap();
        up.write_at(b"ab", 2).unwrap();
        up.write_at(b"XY", 12).unwrap();
        assert_eq!(
            std::fs::read(root.join("f")).unwrap(),
            b"0123456789",
            "untouched until commit"
        );
        drop(up.commit().unwrap());
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"01ab456789\0\0XY");
        // a full rewrite followed by a truncation (what OpenSSH 9 uploads do)
        let mut up = roots.create_upload_overlay(&loc, 0o644, false).unwrap();
        up.write_at(b"new", 0).unwrap();
        up.set_attrs(&SetAttrs {
            size: Some(3),
            ..Default::default()
        })
        .unwrap();
        drop(up.commit().unwrap());
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"new");
        // dropped: old content stays
        let mut up = roots.create_upload_overlay(&loc, 0o644, false).unwrap();
        up.write_at(b"zzzzzz", 0).unwrap();
        drop(up);
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 2);
    }

    #[test]
    fn overlay_upload_onto_a_sparse_file_copies_only_its_data() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let (_dir, roots, root) = setup();
        let size = 4u64 << 30;
        let f = File::create(root.join("sparse")).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(b"middle", 1 << 30).unwrap();
        f.write_all_at(b"tail", size - 4).unwrap();
        drop(f);
        let loc = roots.locate(&p(&root.join("sparse"))).unwrap();
        let mut up = roots.create_upload_overlay(&loc, 0o644, false).unwrap();
        up.write_at(b"head", 0).unwrap();
        drop(up.commit().unwrap());
        let f = File::open(root.join("sparse")).unwrap();
        let md = f.metadata().unwrap();
        assert_eq!(md.len(), size);
        // A few blocks of data, not 4 GiB of copied zeros.
        assert!(md.blocks() * 512 < 1 << 20, "{} blocks", md.blocks());
        let mut b = [0u8; 6];
        f.read_exact_at(&mut b[..4], 0).unwrap();
        assert_eq!(&b[..4], b"head");
        f.read_exact_at(&mut b, 1 << 30).unwrap();
        assert_eq!(&b, b"middle");
        f.read_exact_at(&mut b[..4], size - 4).unwrap();
        assert_eq!(&b[..4], b"tail");
        f.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(b, [0; 6]);
    }

    #[test]
    fn upload_is_atomic() {
        let (_dir, roots, root) = setup();
        std::fs::write(root.join("img"), b"old").unwrap();
        let loc = roots.locate(&p(&root.join("img"))).unwrap();
        {
            let up = roots.create_upload(&loc, 0o644, false).unwrap();
            std::io::Write::write_all(&mut up.file(), b"partial").unwrap();
            // dropped without commit
        }
        assert_eq!(std::fs::read(root.join("img")).unwrap(), b"old");
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            2,
            "no temp file left"
        );
        let up = roots.create_upload(&loc, 0o600, true).unwrap();
        std::io::Write::write_all(&mut up.file(), b"new").unwrap();
        drop(up.commit().unwrap());
        assert_eq!(std::fs::read(root.join("img")).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 2);
        // an upload through a symlink pointing out is refused
        std::os::unix::fs::symlink("../secret", root.join("lnk")).unwrap();
        let loc = roots.locate(&p(&root.join("lnk"))).unwrap();
        assert!(is_denied(
            &roots.create_upload(&loc, 0o644, false).unwrap_err()
        ));
    }
}
