//! SFTP v3 file attributes: encoding from `stat` (the raw `st_mode`, so FIFOs, sockets and
//! devices keep their real type), decoding of setstat requests, and `ls -l` style long names.

use rustix::fs::Stat;

use super::codec::{BadMessage, Decoder};
use crate::transfer::fs::SetAttrs;

pub const ATTR_SIZE: u32 = 0x01;
pub const ATTR_UIDGID: u32 = 0x02;
pub const ATTR_PERMISSIONS: u32 = 0x04;
pub const ATTR_ACMODTIME: u32 = 0x08;
pub const ATTR_EXTENDED: u32 = 0x8000_0000;

/// Append the attributes of `st` to a reply.
pub fn encode_stat(out: &mut Vec<u8>, st: &Stat) {
    out.extend_from_slice(
        &(ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME).to_be_bytes(),
    );
    out.extend_from_slice(&(st.st_size.max(0) as u64).to_be_bytes());
    out.extend_from_slice(&st.st_uid.to_be_bytes());
    out.extend_from_slice(&st.st_gid.to_be_bytes());
    out.extend_from_slice(&st.st_mode.to_be_bytes());
    out.extend_from_slice(&(st.st_atime as u32).to_be_bytes());
    out.extend_from_slice(&(st.st_mtime as u32).to_be_bytes());
}

/// Decode an ATTRS structure (extended pairs are skipped).
pub fn decode(d: &mut Decoder<'_>) -> Result<SetAttrs, BadMessage> {
    let flags = d.u32()?;
    let mut a = SetAttrs::default();
    if flags & ATTR_SIZE != 0 {
        a.size = Some(d.u64()?);
    }
    if flags & ATTR_UIDGID != 0 {
        a.uid = Some(d.u32()?);
        a.gid = Some(d.u32()?);
    }
    if flags & ATTR_PERMISSIONS != 0 {
        a.perm = Some(d.u32()?);
    }
    if flags & ATTR_ACMODTIME != 0 {
        let atime = d.u32()?;
        let mtime = d.u32()?;
        a.times = Some((i64::from(atime), i64::from(mtime)));
    }
    if flags & ATTR_EXTENDED != 0 {
        let n = d.u32()?;
        for _ in 0..n {
            d.string()?;
            d.string()?;
        }
    }
    Ok(a)
}

/// `drwxr-xr-x` for a mode.
pub fn mode_string(mode: u32) -> [u8; 10] {
    let mut s = *b"----------";
    s[0] = match mode & libc::S_IFMT {
        libc::S_IFDIR => b'd',
        libc::S_IFLNK => b'l',
        libc::S_IFCHR => b'c',
        libc::S_IFBLK => b'b',
        libc::S_IFIFO => b'p',
        libc::S_IFSOCK => b's',
        libc::S_IFREG => b'-',
        _ => b'?',
    };
    let bits = [
        (0o400, 1, b'r'),
        (0o200, 2, b'w'),
        (0o100, 3, b'x'),
        (0o040, 4, b'r'),
        (0o020, 5, b'w'),
        (0o010, 6, b'x'),
        (0o004, 7, b'r'),
        (0o002, 8, b'w'),
        (0o001, 9, b'x'),
    ];
    for (bit, i, c) in bits {
        if mode & bit != 0 {
            s[i] = c;
        }
    }
    let special = [
        (0o4000, 3, b's', b'S'),
        (0o2000, 6, b's', b'S'),
        (0o1000, 9, b't', b'T'),
    ];
    for (bit, i, with_x, without_x) in special {
        if mode & bit != 0 {
            s[i] = if s[i] == b'x' { with_x } else { without_x };
        }
    }
    s
}

/// The `ls -l` line sftp prints for `ls -l` (numeric owner and group).
pub fn longname(out: &mut Vec<u8>, name: &[u8], st: &Stat, now: i64) {
    use std::io::Write;
    let mode = mode_string(st.st_mode);
    let date = format_date(st.st_mtime, now);
    out.extend_from_slice(&mode);
    let _ = write!(
        out,
        " {:>3} {:<8} {:<8} {:>8} {} ",
        st.st_nlink, st.st_uid, st.st_gid, st.st_size, date
    );
    out.extend_from_slice(name);
}

fn format_date(mtime: i64, now: i64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(mtime) else {
        return "Jan  1  1970".into();
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS[usize::from(u8::from(t.month())) - 1];
    // Recent files show the time, older (or future) ones the year, like ls.
    if mtime <= now && now - mtime < 365 * 86400 / 2 {
        format!("{month} {:>2} {:02}:{:02}", t.day(), t.hour(), t.minute())
    } else {
        format!("{month} {:>2}  {}", t.day(), t.year())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_strings_for_special_files() {
        assert_eq!(&mode_string(libc::S_IFDIR | 0o755), b"drwxr-xr-x");
        assert_eq!(&mode_string(libc::S_IFCHR | 0o666), b"crw-rw-rw-");
        assert_eq!(&mode_string(libc::S_IFIFO | 0o644), b"prw-r--r--");
        assert_eq!(&mode_string(libc::S_IFSOCK | 0o755), b"srwxr-xr-x");
        assert_eq!(&mode_string(libc::S_IFREG | 0o4755), b"-rwsr-xr-x");
        assert_eq!(&mode_string(libc::S_IFDIR | 0o1777), b"drwxrwxrwt");
        assert_eq!(&mode_string(libc::S_IFLNK | 0o777), b"lrwxrwxrwx");
    }

    #[test]
    fn attrs_roundtrip_and_truncation() {
        let mut b = Vec::new();
        b.extend_from_slice(
            &(ATTR_SIZE | ATTR_PERMISSIONS | ATTR_ACMODTIME | ATTR_EXTENDED).to_be_bytes(),
        );
        b.extend_from_slice(&5u64.to_be_bytes());
        b.extend_from_slice(&0o644u32.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&2u32.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 1, b'k', 0, 0, 0, 1, b'v']);
        let a = decode(&mut Decoder::new(&b)).unwrap();
        assert_eq!(a.size, Some(5));
        assert_eq!(a.perm, Some(0o644));
        assert_eq!(a.times, Some((1, 2)));
        assert_eq!(a.uid, None);
        assert!(decode(&mut Decoder::new(&b[..b.len() - 1])).is_err());
        // an absurd extended count fails on the missing bytes instead of looping forever
        let mut b = ATTR_EXTENDED.to_be_bytes().to_vec();
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&mut Decoder::new(&b)).is_err());
    }
}
