//! SFTP v3 wire format: packet types, status codes, a bounds-checked decoder and reply builders.

use bytes::Bytes;

pub const SSH_FXP_INIT: u8 = 1;
pub const SSH_FXP_VERSION: u8 = 2;
pub const SSH_FXP_OPEN: u8 = 3;
pub const SSH_FXP_CLOSE: u8 = 4;
pub const SSH_FXP_READ: u8 = 5;
pub const SSH_FXP_WRITE: u8 = 6;
pub const SSH_FXP_LSTAT: u8 = 7;
pub const SSH_FXP_FSTAT: u8 = 8;
pub const SSH_FXP_SETSTAT: u8 = 9;
pub const SSH_FXP_FSETSTAT: u8 = 10;
pub const SSH_FXP_OPENDIR: u8 = 11;
pub const SSH_FXP_READDIR: u8 = 12;
pub const SSH_FXP_REMOVE: u8 = 13;
pub const SSH_FXP_MKDIR: u8 = 14;
pub const SSH_FXP_RMDIR: u8 = 15;
pub const SSH_FXP_REALPATH: u8 = 16;
pub const SSH_FXP_STAT: u8 = 17;
pub const SSH_FXP_RENAME: u8 = 18;
pub const SSH_FXP_READLINK: u8 = 19;
pub const SSH_FXP_SYMLINK: u8 = 20;
pub const SSH_FXP_STATUS: u8 = 101;
pub const SSH_FXP_HANDLE: u8 = 102;
pub const SSH_FXP_DATA: u8 = 103;
pub const SSH_FXP_NAME: u8 = 104;
pub const SSH_FXP_ATTRS: u8 = 105;
pub const SSH_FXP_EXTENDED: u8 = 200;
pub const SSH_FXP_EXTENDED_REPLY: u8 = 201;

pub const SSH_FX_OK: u32 = 0;
pub const SSH_FX_EOF: u32 = 1;
pub const SSH_FX_NO_SUCH_FILE: u32 = 2;
pub const SSH_FX_PERMISSION_DENIED: u32 = 3;
pub const SSH_FX_FAILURE: u32 = 4;
pub const SSH_FX_BAD_MESSAGE: u32 = 5;
pub const SSH_FX_OP_UNSUPPORTED: u32 = 8;

pub const SSH_FXF_READ: u32 = 0x01;
pub const SSH_FXF_WRITE: u32 = 0x02;
pub const SSH_FXF_APPEND: u32 = 0x04;
pub const SSH_FXF_CREAT: u32 = 0x08;
pub const SSH_FXF_TRUNC: u32 = 0x10;
pub const SSH_FXF_EXCL: u32 = 0x20;

/// Largest read or write payload we serve (advertised in `limits@openssh.com`).
pub const MAX_RW: u32 = 261_120;
/// Largest packet accepted (payload after the length field): 256 KiB, like sftp-server.
pub const MAX_PACKET: u32 = 256 * 1024;

/// The request could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadMessage;

/// A bounds-checked cursor over a packet.
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Decoder { buf, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], BadMessage> {
        let end = self.pos.checked_add(n).ok_or(BadMessage)?;
        let s = self.buf.get(self.pos..end).ok_or(BadMessage)?;
        self.pos = end;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8, BadMessage> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, BadMessage> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, BadMessage> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    pub fn string(&mut self) -> Result<&'a [u8], BadMessage> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// The byte range of the next string (for zero-copy slicing of write payloads).
    pub fn string_range(&mut self) -> Result<std::ops::Range<usize>, BadMessage> {
        let n = self.u32()? as usize;
        let start = self.pos;
        self.take(n)?;
        Ok(start..start + n)
    }
}

/// A reply under construction: `u32 length | u8 type | u32 id | ...`.
pub struct Reply {
    buf: Vec<u8>,
}

impl Reply {
    pub fn new(kind: u8, id: u32, capacity: usize) -> Reply {
        let mut buf = Vec::with_capacity(9 + capacity);
        buf.extend_from_slice(&[0, 0, 0, 0, kind]);
        buf.extend_from_slice(&id.to_be_bytes());
        Reply { buf }
    }

    /// A reply without an id (VERSION).
    pub fn without_id(kind: u8) -> Reply {
        Reply {
            buf: vec![0, 0, 0, 0, kind],
        }
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn string(&mut self, s: &[u8]) -> &mut Self {
        self.u32(s.len() as u32);
        self.buf.extend_from_slice(s);
        self
    }

    pub fn raw(&mut self, s: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(s);
        self
    }

    pub fn vec(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    pub fn finish(self) -> Bytes {
        let mut buf = self.buf;
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        Bytes::from(buf)
    }
}

pub fn status(id: u32, code: u32, msg: &str) -> Bytes {
    let mut r = Reply::new(SSH_FXP_STATUS, id, 12 + msg.len());
    r.u32(code).string(msg.as_bytes()).string(b"");
    r.finish()
}

pub fn ok(id: u32) -> Bytes {
    status(id, SSH_FX_OK, "Success")
}

/// Map an OS error to an SFTP status the way OpenSSH's sftp-server does, with the OS message.
pub fn io_status(id: u32, e: &std::io::Error) -> Bytes {
    let code = match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR | libc::EBADF | libc::ELOOP) => SSH_FX_NO_SUCH_FILE,
        Some(libc::EPERM | libc::EACCES | libc::EFAULT) => SSH_FX_PERMISSION_DENIED,
        Some(libc::ENAMETOOLONG | libc::EINVAL) => SSH_FX_BAD_MESSAGE,
        Some(libc::ENOSYS | libc::EOPNOTSUPP) => SSH_FX_OP_UNSUPPORTED,
        _ => SSH_FX_FAILURE,
    };
    let msg = match code {
        SSH_FX_NO_SUCH_FILE => "No such file".to_string(),
        SSH_FX_PERMISSION_DENIED => "Permission denied".to_string(),
        // Failures carry the OS reason ("No space left on device"), which sftp shows.
        _ => strip_os_error(e),
    };
    status(id, code, &msg)
}

/// "No space left on device" instead of "No space left on device (os error 28)".
pub fn strip_os_error(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

pub fn handle(id: u32, h: u32) -> Bytes {
    let mut r = Reply::new(SSH_FXP_HANDLE, id, 8);
    r.string(&h.to_be_bytes());
    r.finish()
}

/// Parse a handle string we issued (4 bytes, big-endian counter).
pub fn parse_handle(h: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(h).ok().map(u32::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_refuses_truncated_and_huge_strings() {
        let mut d = Decoder::new(&[0, 0, 0, 5, b'a']);
        assert_eq!(d.string(), Err(BadMessage));
        let mut d = Decoder::new(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.string(), Err(BadMessage));
        let mut d = Decoder::new(&[0, 0, 0]);
        assert_eq!(d.u32(), Err(BadMessage));
        let mut d = Decoder::new(&[0, 0, 0, 1, b'x', 7]);
        assert_eq!(d.string(), Ok(&b"x"[..]));
        assert_eq!(d.u8(), Ok(7));
        assert_eq!(d.u8(), Err(BadMessage));
    }

    #[test]
    fn status_layout() {
        let s = status(7, SSH_FX_EOF, "End of file");
        assert_eq!(&s[..4], &((s.len() - 4) as u32).to_be_bytes());
        assert_eq!(s[4], SSH_FXP_STATUS);
        assert_eq!(&s[5..9], &7u32.to_be_bytes());
        assert_eq!(&s[9..13], &SSH_FX_EOF.to_be_bytes());
    }

    #[test]
    fn handles_must_be_four_bytes() {
        assert_eq!(parse_handle(&[0, 0, 0, 9]), Some(9));
        assert_eq!(parse_handle(&[0, 0, 9]), None);
        assert_eq!(parse_handle(&[0, 0, 0, 0, 9]), None);
    }
}
