//! Pseudo-terminals for interactive shells (`pty-req`, `window-change`).

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use rustix::termios::{Winsize, tcsetwinsize};

/// What the client asked for in `pty-req`.
#[derive(Debug, Clone)]
pub struct PtyRequest {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub pix_width: u32,
    pub pix_height: u32,
}

/// An allocated pseudo-terminal: the master stays with the server, the slave becomes the
/// child's stdin/stdout/stderr and controlling terminal.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

fn clamp(v: u32) -> u16 {
    v.min(u16::MAX as u32) as u16
}

/// Set the terminal size seen by the child (and deliver SIGWINCH to it).
pub fn resize(
    master: impl AsFd,
    cols: u32,
    rows: u32,
    pix_width: u32,
    pix_height: u32,
) -> io::Result<()> {
    tcsetwinsize(
        master,
        Winsize {
            ws_row: clamp(rows),
            ws_col: clamp(cols),
            ws_xpixel: clamp(pix_width),
            ws_ypixel: clamp(pix_height),
        },
    )?;
    Ok(())
}

/// Allocate a pty sized as requested.
pub fn open(req: &PtyRequest) -> io::Result<Pty> {
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    resize(&master, req.cols, req.rows, req.pix_width, req.pix_height)?;
    Ok(Pty { master, slave })
}
