//! Path-based requests (everything that does not name an open handle). They run on the blocking
//! pool, concurrently with each other and with the handle workers.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rustix::fs::OFlags;

use super::Out;
use super::attrs;
use super::codec::*;
use super::extensions::{self, MAX_HANDLES, result};
use super::handles::{FileKind, FileObj, Job, Obj, worker};
use crate::transfer::Transfer;
use crate::transfer::fs::{Located, normalize};

pub struct HandleEntry {
    pub tx: std::sync::mpsc::Sender<Job>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Per-session state shared by the reader, the path tasks and the handle workers.
pub struct Ctx {
    pub transfer: Arc<Transfer>,
    pub out: tokio::sync::mpsc::UnboundedSender<Out>,
    pub handles: Mutex<HashMap<u32, HandleEntry>>,
    /// Workers of closed handles, still finishing their last job; joined at the session end.
    closing: Mutex<Vec<std::thread::JoinHandle<()>>>,
    next_handle: AtomicU32,
}

impl Ctx {
    pub fn new(transfer: Arc<Transfer>, out: tokio::sync::mpsc::UnboundedSender<Out>) -> Ctx {
        Ctx {
            transfer,
            out,
            handles: Mutex::new(HashMap::new()),
            closing: Mutex::new(Vec::new()),
            next_handle: AtomicU32::new(1),
        }
    }

    /// Start a worker for `obj` and return its handle number (numbers are never reused).
    fn register(&self, obj: Obj) -> io::Result<u32> {
        let mut handles = self
            .handles
            .lock()
            .map_err(|_| io::Error::other("handle table poisoned"))?;
        if handles.len() >= MAX_HANDLES {
            return Err(io::Error::other("too many open handles"));
        }
        let h = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::channel();
        let out = self.out.clone();
        let transfer = self.transfer.clone();
        // The worker runs in the runtime's context so it can hand slow clean-up to the
        // blocking pool (see `Replaced`).
        let rt = tokio::runtime::Handle::try_current().ok();
        let thread = std::thread::Builder::new()
            .name("sftp-handle".into())
            .spawn(move || {
                let _rt = rt.as_ref().map(|h| h.enter());
                worker(obj, rx, out, transfer)
            })?;
        handles.insert(h, HandleEntry { tx, thread });
        Ok(h)
    }

    /// Take every handle out of the table (session end); the workers finish and drop their
    /// objects, which discards unfinished uploads.
    pub fn drain(&self) -> Vec<HandleEntry> {
        match self.handles.lock() {
            Ok(mut h) => h.drain().map(|(_, e)| e).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Keep the worker of a closed handle until the session end (it exits by itself after the
    /// Close job); finished ones are forgotten here, so the list stays short.
    pub fn closed(&self, thread: std::thread::JoinHandle<()>) {
        if let Ok(mut c) = self.closing.lock() {
            c.retain(|t| !t.is_finished());
            c.push(thread);
        }
    }

    /// Workers of closed handles that may still be running.
    pub fn take_closed(&self) -> Vec<std::thread::JoinHandle<()>> {
        self.closing
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }
}

pub fn located(ctx: &Ctx, path: &[u8]) -> io::Result<Located> {
    ctx.transfer.roots.locate(path)
}

/// A NAME reply with one entry and no attributes (realpath, readlink, expand-path).
pub fn name_reply(id: u32, name: &[u8]) -> Bytes {
    let mut r = Reply::new(SSH_FXP_NAME, id, 16 + 2 * name.len());
    r.u32(1).string(name).string(name).u32(0);
    r.finish()
}

fn attrs_reply(id: u32, st: &rustix::fs::Stat) -> Bytes {
    let mut r = Reply::new(SSH_FXP_ATTRS, id, 32);
    attrs::encode_stat(r.vec(), st);
    r.finish()
}

/// Serve one path request; `d` is positioned after the request id.
pub fn path_op(ctx: &Ctx, kind: u8, id: u32, d: &mut Decoder<'_>) -> Result<Bytes, BadMessage> {
    let roots = &ctx.transfer.roots;
    Ok(match kind {
        SSH_FXP_OPEN => {
            let path = d.string()?;
            let pflags = d.u32()?;
            let a = attrs::decode(d)?;
            match open(ctx, path, pflags, a.perm.unwrap_or(0o666)) {
                Ok(h) => handle(id, h),
                Err(e) => io_status(id, &e),
            }
        }
        SSH_FXP_OPENDIR => {
            let path = d.string()?;
            match located(ctx, path)
                .and_then(|l| roots.opendir(&l))
                .and_then(Obj::dir)
                .and_then(|o| ctx.register(o))
            {
                Ok(h) => handle(id, h),
                Err(e) => io_status(id, &e),
            }
        }
        SSH_FXP_REMOVE => {
            let path = d.string()?;
            result(id, located(ctx, path).and_then(|l| roots.unlink(&l)))
        }
        SSH_FXP_MKDIR => {
            let path = d.string()?;
            let a = attrs::decode(d)?;
            result(
                id,
                located(ctx, path).and_then(|l| roots.mkdir(&l, a.perm.unwrap_or(0o777))),
            )
        }
        SSH_FXP_RMDIR => {
            let path = d.string()?;
            result(id, located(ctx, path).and_then(|l| roots.rmdir(&l)))
        }
        SSH_FXP_REALPATH => {
            let path = d.string()?;
            name_reply(id, &normalize(&roots.absolute(path)))
        }
        SSH_FXP_STAT | SSH_FXP_LSTAT => {
            let path = d.string()?;
            match located(ctx, path).and_then(|l| roots.stat(&l, kind == SSH_FXP_STAT)) {
                Ok(st) => attrs_reply(id, &st),
                Err(e) => io_status(id, &e),
            }
        }
        SSH_FXP_SETSTAT => {
            let path = d.string()?;
            let a = attrs::decode(d)?;
            result(
                id,
                located(ctx, path).and_then(|l| roots.set_attrs(&l, true, &a)),
            )
        }
        SSH_FXP_RENAME => {
            let from = d.string()?;
            let to = d.string()?;
            match located(ctx, from).and_then(|f| Ok((f, located(ctx, to)?))) {
                Ok((f, t)) => result(id, roots.rename(&f, &t, false)),
                Err(e) => io_status(id, &e),
            }
        }
        SSH_FXP_READLINK => {
            let path = d.string()?;
            match located(ctx, path).and_then(|l| roots.readlink(&l)) {
                Ok(target) => name_reply(id, &target),
                Err(e) => io_status(id, &e),
            }
        }
        SSH_FXP_SYMLINK => {
            // OpenSSH's order (PROTOCOL §4.1): target first, then the link to create.
            let target = d.string()?;
            let link = d.string()?;
            result(
                id,
                located(ctx, link).and_then(|l| roots.symlink(target, &l)),
            )
        }
        SSH_FXP_EXTENDED => {
            let name = d.string()?;
            extensions::extended(ctx, id, name, d)?
        }
        _ => status(id, SSH_FX_OP_UNSUPPORTED, "Operation unsupported"),
    })
}

fn open(ctx: &Ctx, path: &[u8], pflags: u32, mode: u32) -> io::Result<u32> {
    let roots = &ctx.transfer.roots;
    let loc = located(ctx, path)?;
    let readable = pflags & SSH_FXF_READ != 0;
    let writable = pflags & SSH_FXF_WRITE != 0;
    let atomic = SSH_FXF_WRITE | SSH_FXF_CREAT | SSH_FXF_TRUNC;
    let overlay = SSH_FXF_WRITE | SSH_FXF_CREAT;
    let kind = if pflags & atomic == atomic && pflags & (SSH_FXF_EXCL | SSH_FXF_APPEND) == 0 {
        FileKind::Upload(roots.create_upload(&loc, mode, ctx.transfer.fsync)?)
    } else if pflags & !SSH_FXF_TRUNC == overlay {
        // OpenSSH ≥ 9 uploads: WRITE|CREAT, writes, then fsetstat(size). Still atomic.
        FileKind::Upload(roots.create_upload_overlay(&loc, mode, ctx.transfer.fsync)?)
    } else {
        let mut flags = match (readable, writable) {
            (true, true) => OFlags::RDWR,
            (false, true) => OFlags::WRONLY,
            _ => OFlags::RDONLY,
        };
        if pflags & SSH_FXF_APPEND != 0 {
            flags |= OFlags::APPEND;
        }
        if pflags & SSH_FXF_CREAT != 0 {
            flags |= OFlags::CREATE;
        }
        if pflags & SSH_FXF_TRUNC != 0 {
            flags |= OFlags::TRUNC;
        }
        if pflags & SSH_FXF_EXCL != 0 {
            flags |= OFlags::EXCL;
        }
        FileKind::Plain(std::fs::File::from(roots.open_beneath(
            &loc,
            flags,
            mode & 0o7777,
        )?))
    };
    ctx.register(Obj::File(FileObj {
        kind,
        readable,
        writable,
        failed: false,
    }))
}
