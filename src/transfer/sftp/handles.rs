//! Open file and directory handles. Each handle is served by its own blocking worker thread, so
//! requests on one handle run in the order they arrived (positioned I/O, no seeks) while different
//! handles and path requests proceed concurrently; replies go out as they complete.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use rustix::fs::{AtFlags, Dir};

use super::Out;
use super::attrs;
use super::codec::*;
use super::extensions::statvfs_reply;
use crate::transfer::fs::{Replaced, SetAttrs, Upload, errno};
use crate::transfer::{Direction, Protocol, Transfer};

/// A request for a handle's worker.
pub enum HandleOp {
    Read { off: u64, len: u32 },
    Write { off: u64, data: Bytes },
    Fstat,
    Fsetstat(SetAttrs),
    Fsync,
    Fstatvfs,
    Readdir,
    Close,
}

pub struct Job {
    pub id: u32,
    pub op: HandleOp,
    pub permit: tokio::sync::OwnedSemaphorePermit,
}

pub enum FileKind {
    Plain(File),
    Upload(Upload),
}

impl FileKind {
    fn file(&self) -> &File {
        match self {
            FileKind::Plain(f) => f,
            FileKind::Upload(u) => u.file(),
        }
    }
}

pub struct FileObj {
    pub kind: FileKind,
    pub writable: bool,
    pub readable: bool,
    /// A write failed: the upload is discarded on close.
    pub failed: bool,
}

pub struct DirObj {
    pub dir: Dir,
    pub eof: bool,
}

pub enum Obj {
    File(FileObj),
    Dir(DirObj),
}

impl Obj {
    pub fn dir(fd: OwnedFd) -> io::Result<Obj> {
        Ok(Obj::Dir(DirObj {
            dir: Dir::new(fd).map_err(errno)?,
            eof: false,
        }))
    }
}

/// Run a handle's requests until it is closed or the session ends.
pub fn worker(
    mut obj: Obj,
    rx: std::sync::mpsc::Receiver<Job>,
    out: tokio::sync::mpsc::UnboundedSender<Out>,
    transfer: Arc<Transfer>,
) {
    while let Ok(job) = rx.recv() {
        if let HandleOp::Close = job.op {
            let (r, replaced) = close(obj, job.id, &transfer);
            let _ = out.send(Out {
                bytes: r,
                permit: Some(job.permit),
            });
            // Only now, with the client answered, release the file an upload replaced (not
            // on this thread: the session end joins it).
            replaced.release_in_background();
            return;
        }
        let reply = run(&mut obj, job.id, job.op, &transfer);
        let _ = out.send(Out {
            bytes: reply,
            permit: Some(job.permit),
        });
    }
    // The session ended with the handle open: dropping `obj` removes an unfinished upload.
}

/// Close a handle: the reply, and the file a committed upload replaced (none otherwise).
fn close(obj: Obj, id: u32, transfer: &Transfer) -> (Bytes, Replaced) {
    let reply = match obj {
        Obj::Dir(_) => ok(id),
        Obj::File(f) => {
            let dir = if f.writable {
                Direction::Upload
            } else {
                Direction::Download
            };
            match f.kind {
                FileKind::Upload(u) if f.failed => {
                    drop(u);
                    status(
                        id,
                        SSH_FX_FAILURE,
                        "upload failed; the destination was left unchanged",
                    )
                }
                FileKind::Upload(u) => match u.commit() {
                    Ok(replaced) => {
                        transfer.count_file(Protocol::Sftp, dir);
                        return (ok(id), replaced);
                    }
                    Err(e) => io_status(id, &e),
                },
                FileKind::Plain(_) => {
                    if f.readable || f.writable {
                        transfer.count_file(Protocol::Sftp, dir);
                    }
                    ok(id)
                }
            }
        }
    };
    (reply, Replaced::default())
}

fn run(obj: &mut Obj, id: u32, op: HandleOp, transfer: &Transfer) -> Bytes {
    match (obj, op) {
        (Obj::File(f), HandleOp::Read { off, len }) => {
            let len = len.min(MAX_RW) as usize;
            let mut r = Reply::new(SSH_FXP_DATA, id, 4 + len);
            let buf = r.vec();
            let start = buf.len() + 4;
            buf.resize(start + len, 0);
            match read_full_at(f.kind.file(), &mut buf[start..], off) {
                Ok(0) if len > 0 => status(id, SSH_FX_EOF, "End of file"),
                Ok(n) => {
                    buf.truncate(start + n);
                    buf[start - 4..start].copy_from_slice(&(n as u32).to_be_bytes());
                    transfer.count_bytes(Protocol::Sftp, Direction::Download, n as u64);
                    r.finish()
                }
                Err(e) => io_status(id, &e),
            }
        }
        (Obj::File(f), HandleOp::Write { off, data }) => {
            let written = match &mut f.kind {
                FileKind::Upload(u) => u.write_at(&data, off),
                FileKind::Plain(file) => file.write_all_at(&data, off),
            };
            match written {
                Ok(()) => {
                    transfer.count_bytes(Protocol::Sftp, Direction::Upload, data.len() as u64);
                    ok(id)
                }
                Err(e) => {
                    f.failed = true;
                    io_status(id, &e)
                }
            }
        }
        (Obj::File(f), HandleOp::Fstat) => match rustix::fs::fstat(f.kind.file()) {
            Ok(st) => {
                let mut r = Reply::new(SSH_FXP_ATTRS, id, 32);
                attrs::encode_stat(r.vec(), &st);
                r.finish()
            }
            Err(e) => io_status(id, &errno(e)),
        },
        (Obj::File(f), HandleOp::Fsetstat(a)) => {
            let res = match &mut f.kind {
                FileKind::Upload(u) => u.set_attrs(&a),
                FileKind::Plain(file) => fset_plain(file, &a),
            };
            match res {
                Ok(()) => ok(id),
                Err(e) => io_status(id, &e),
            }
        }
        (Obj::File(f), HandleOp::Fsync) => match rustix::fs::fsync(f.kind.file()) {
            Ok(()) => ok(id),
            Err(e) => io_status(id, &errno(e)),
        },
        (Obj::File(f), HandleOp::Fstatvfs) => match rustix::fs::fstatvfs(f.kind.file()) {
            Ok(v) => statvfs_reply(id, &v),
            Err(e) => io_status(id, &errno(e)),
        },
        (Obj::Dir(d), HandleOp::Readdir) => readdir(d, id),
        (Obj::Dir(d), HandleOp::Fstat) => match d.dir.stat() {
            Ok(st) => {
                let mut r = Reply::new(SSH_FXP_ATTRS, id, 32);
                attrs::encode_stat(r.vec(), &st);
                r.finish()
            }
            Err(e) => io_status(id, &errno(e)),
        },
        (Obj::Dir(d), HandleOp::Fstatvfs) => match d.dir.statvfs() {
            Ok(v) => statvfs_reply(id, &v),
            Err(e) => io_status(id, &errno(e)),
        },
        // Reading a directory handle, readdir on a file, fsync on a directory...
        _ => status(id, SSH_FX_FAILURE, "Invalid handle for this operation"),
    }
}

/// pread until `buf` is full or end of file (a short read mid-file would make clients think the
/// file ended).
fn read_full_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn fset_plain(file: &File, a: &SetAttrs) -> io::Result<()> {
    if let Some(size) = a.size {
        rustix::fs::ftruncate(file, size).map_err(errno)?;
    }
    let (uid, gid) = a.owner();
    if uid.is_some() || gid.is_some() {
        rustix::fs::fchown(file, uid, gid).map_err(errno)?;
    }
    if let Some(perm) = a.perm {
        rustix::fs::fchmod(file, rustix::fs::Mode::from_raw_mode(perm & 0o7777)).map_err(errno)?;
    }
    if let Some((at, mt)) = a.times {
        rustix::fs::futimens(file, &crate::transfer::fs::timestamps(at, mt)).map_err(errno)?;
    }
    Ok(())
}

const READDIR_BATCH: u32 = 128;

fn readdir(d: &mut DirObj, id: u32) -> Bytes {
    if d.eof {
        return status(id, SSH_FX_EOF, "End of file");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let dot = match d.dir.stat() {
        Ok(st) => st,
        Err(e) => return io_status(id, &errno(e)),
    };
    let mut r = Reply::new(SSH_FXP_NAME, id, 8192);
    r.u32(0);
    let mut count = 0u32;
    while count < READDIR_BATCH {
        let entry = match d.dir.read() {
            None => {
                d.eof = true;
                break;
            }
            Some(Err(e)) if count == 0 => return io_status(id, &errno(e)),
            Some(Err(_)) => break,
            Some(Ok(e)) => e,
        };
        let name = entry.file_name().to_bytes();
        // ".." may be outside the root: describe it with the directory's own attributes.
        let st = if name == b"." || name == b".." {
            dot
        } else {
            let Ok(fd) = d.dir.fd() else { break };
            match rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(_) => continue, // removed meanwhile
            }
        };
        r.string(name);
        let mut long = Vec::with_capacity(64 + name.len());
        attrs::longname(&mut long, name, &st, now);
        r.string(&long);
        attrs::encode_stat(r.vec(), &st);
        count += 1;
    }
    if count == 0 {
        return status(id, SSH_FX_EOF, "End of file");
    }
    let mut bytes = r.finish().to_vec();
    bytes[9..13].copy_from_slice(&count.to_be_bytes());
    Bytes::from(bytes)
}
