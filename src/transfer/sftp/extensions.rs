//! `@openssh.com` extensions: what we advertise in VERSION and the path-based ones.

use bytes::Bytes;
use rustix::fs::{StatVfs, StatVfsMountFlags};

use super::codec::*;
use super::handlers::{Ctx, located};

/// Extensions announced in the VERSION reply (name, version).
pub const ADVERTISED: &[(&str, &str)] = &[
    ("posix-rename@openssh.com", "1"),
    ("statvfs@openssh.com", "2"),
    ("fstatvfs@openssh.com", "2"),
    ("hardlink@openssh.com", "1"),
    ("fsync@openssh.com", "1"),
    ("lsetstat@openssh.com", "1"),
    ("limits@openssh.com", "1"),
    ("expand-path@openssh.com", "1"),
];

/// Maximum open handles per session (also advertised in limits).
pub const MAX_HANDLES: usize = 256;

pub fn version_reply() -> Bytes {
    let mut r = Reply::without_id(SSH_FXP_VERSION);
    r.u32(3);
    for (name, version) in ADVERTISED {
        r.string(name.as_bytes()).string(version.as_bytes());
    }
    r.finish()
}

pub fn statvfs_reply(id: u32, v: &StatVfs) -> Bytes {
    let mut flag = 0u64;
    if v.f_flag.contains(StatVfsMountFlags::RDONLY) {
        flag |= 1; // SSH_FXE_STATVFS_ST_RDONLY
    }
    if v.f_flag.contains(StatVfsMountFlags::NOSUID) {
        flag |= 2; // SSH_FXE_STATVFS_ST_NOSUID
    }
    let mut r = Reply::new(SSH_FXP_EXTENDED_REPLY, id, 88);
    r.u64(v.f_bsize)
        .u64(v.f_frsize)
        .u64(v.f_blocks)
        .u64(v.f_bfree)
        .u64(v.f_bavail)
        .u64(v.f_files)
        .u64(v.f_ffree)
        .u64(v.f_favail)
        .u64(v.f_fsid)
        .u64(flag)
        .u64(v.f_namemax);
    r.finish()
}

/// Path-based extended requests; `d` is positioned after the extension name.
pub fn extended(ctx: &Ctx, id: u32, name: &[u8], d: &mut Decoder<'_>) -> Result<Bytes, BadMessage> {
    let roots = &ctx.transfer.roots;
    Ok(match name {
        b"limits@openssh.com" => {
            let mut r = Reply::new(SSH_FXP_EXTENDED_REPLY, id, 32);
            r.u64(u64::from(MAX_PACKET))
                .u64(u64::from(MAX_RW))
                .u64(u64::from(MAX_RW))
                .u64(MAX_HANDLES as u64);
            r.finish()
        }
        b"posix-rename@openssh.com" => {
            let from = d.string()?;
            let to = d.string()?;
            match located(ctx, from).and_then(|f| Ok((f, located(ctx, to)?))) {
                Ok((f, t)) => result(id, roots.rename(&f, &t, true)),
                Err(e) => io_status(id, &e),
            }
        }
        b"hardlink@openssh.com" => {
            let old = d.string()?;
            let new = d.string()?;
            match located(ctx, old).and_then(|o| Ok((o, located(ctx, new)?))) {
                Ok((o, n)) => result(id, roots.hardlink(&o, &n)),
                Err(e) => io_status(id, &e),
            }
        }
        b"statvfs@openssh.com" => {
            let path = d.string()?;
            match located(ctx, path).and_then(|l| roots.statvfs(&l)) {
                Ok(v) => statvfs_reply(id, &v),
                Err(e) => io_status(id, &e),
            }
        }
        b"lsetstat@openssh.com" => {
            let path = d.string()?;
            let a = super::attrs::decode(d)?;
            result(
                id,
                located(ctx, path).and_then(|l| roots.set_attrs(&l, false, &a)),
            )
        }
        b"expand-path@openssh.com" => {
            let path = d.string()?;
            let expanded = roots.expand_tilde(path);
            if expanded.first() == Some(&b'~') {
                // ~user: only the one account we serve exists here.
                return Ok(status(id, SSH_FX_NO_SUCH_FILE, "No such file"));
            }
            super::handlers::name_reply(
                id,
                &crate::transfer::fs::normalize(&roots.absolute(&expanded)),
            )
        }
        _ => status(id, SSH_FX_OP_UNSUPPORTED, "Operation unsupported"),
    })
}

pub fn result(id: u32, r: std::io::Result<()>) -> Bytes {
    match r {
        Ok(()) => ok(id),
        Err(e) => io_status(id, &e),
    }
}
