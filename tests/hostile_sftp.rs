//! Hostile SFTP clients against the real binary: `tm-sidecar sftp-server` on stdin/stdout (the
//! engine the `sftp` subsystem runs) and, for a few cases, the subsystem over a real SSH
//! connection. Every case gets a clear status reply, the server stays in sync and exits cleanly
//! when the client goes, memory stays bounded, and nothing outside the transfer root changes.

mod common;
#[path = "support/sftp_wire.rs"]
mod sftp_wire;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{BIN, outside_state, peak_rss_kib};
use sftp_wire::{packet, s};

const T: Duration = Duration::from_secs(30);

const INIT: u8 = 1;
const VERSION: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const WRITE: u8 = 6;
const LSTAT: u8 = 7;
const SETSTAT: u8 = 9;
const OPENDIR: u8 = 11;
const READDIR: u8 = 12;
const REMOVE: u8 = 13;
const MKDIR: u8 = 14;
const RMDIR: u8 = 15;
const STAT: u8 = 17;
const RENAME: u8 = 18;
const SYMLINK: u8 = 20;
const EXTENDED: u8 = 200;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;
const NAME: u8 = 104;
const ATTRS: u8 = 105;

const OK: u32 = 0;
const NO_SUCH_FILE: u32 = 2;
const DENIED: u32 = 3;
const FAILURE: u32 = 4;
const BAD_MESSAGE: u32 = 5;
const UNSUPPORTED: u32 = 8;

const F_READ: u32 = 0x01;
const F_WRITE: u32 = 0x02;
const F_CREAT: u32 = 0x08;
const F_TRUNC: u32 = 0x10;

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn u32b(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

fn u64b(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// A transfer root with a file and symlinks (one relative, one absolute) pointing at a sentinel
/// outside it, and an SFTP server process on it.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<(u8, Vec<u8>)>,
    /// The directory holding the root and the things outside it.
    base: PathBuf,
    _dir: Option<tempfile::TempDir>,
    root: PathBuf,
    before: Vec<String>,
}

fn sandbox() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("sentinel"), b"sentinel\n").unwrap();
    std::fs::write(root.join("f"), b"inside\n").unwrap();
    std::os::unix::fs::symlink("../outside", root.join("up")).unwrap();
    std::os::unix::fs::symlink(outside.join("sentinel"), root.join("abs")).unwrap();
    (dir, root)
}

impl Session {
    /// `tm-sidecar sftp-server` on a fresh sandbox, initialised.
    fn start() -> Session {
        let (dir, root) = sandbox();
        let mut cmd = Command::new(BIN);
        cmd.args(["sftp-server", "--fsync", "false", "--transfer-root"])
            .arg(&root)
            .arg("--home")
            .arg(&root);
        Self::spawn(cmd, dir.path().to_path_buf(), Some(dir), root, true)
    }

    fn spawn(
        mut cmd: Command,
        base: PathBuf,
        dir: Option<tempfile::TempDir>,
        root: PathBuf,
        init: bool,
    ) -> Session {
        let before = outside_state(&base, &root);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            loop {
                let mut len = [0u8; 4];
                if stdout.read_exact(&mut len).is_err() {
                    return;
                }
                let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                if stdout.read_exact(&mut body).is_err() || body.is_empty() {
                    return;
                }
                let kind = body.remove(0);
                if tx.send((kind, body)).is_err() {
                    return;
                }
            }
        });
        let mut sess = Session {
            child,
            stdin,
            rx,
            base,
            _dir: dir,
            root,
            before,
        };
        if init {
            sess.send(&[0, 0, 0, 5, INIT, 0, 0, 0, 3]);
            let (kind, body) = sess.recv();
            assert_eq!(kind, VERSION);
            assert_eq!(&body[..4], &3u32.to_be_bytes());
        }
        sess
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stdin.as_mut().unwrap().write_all(bytes).unwrap();
    }

    fn recv(&mut self) -> (u8, Vec<u8>) {
        self.rx.recv_timeout(T).expect("a reply in time")
    }

    /// The status code of the next reply, which must be a STATUS for `id`.
    fn status(&mut self, id: u32) -> u32 {
        let (kind, body) = self.recv();
        assert_eq!(kind, STATUS, "expected STATUS for {id}, got {kind}");
        assert_eq!(u32::from_be_bytes(body[..4].try_into().unwrap()), id);
        u32::from_be_bytes(body[4..8].try_into().unwrap())
    }

    fn request(&mut self, kind: u8, id: u32, body: &[u8]) -> (u8, Vec<u8>) {
        self.send(&packet(kind, id, body));
        let (k, b) = self.recv();
        assert_eq!(
            u32::from_be_bytes(b[..4].try_into().unwrap()),
            id,
            "reply id"
        );
        (k, b)
    }

    fn expect_status(&mut self, kind: u8, id: u32, body: &[u8], want: u32, what: &str) {
        self.send(&packet(kind, id, body));
        assert_eq!(self.status(id), want, "{what}");
    }

    fn open(&mut self, id: u32, path: &str, flags: u32) -> Result<Vec<u8>, u32> {
        let (k, b) = self.request(OPEN, id, &cat(&[&s(path), &u32b(flags), &u32b(0)]));
        match k {
            HANDLE => Ok(b[8..].to_vec()),
            STATUS => Err(u32::from_be_bytes(b[4..8].try_into().unwrap())),
            k => panic!("unexpected reply {k}"),
        }
    }

    /// Prove the server is still in sync: a STAT of the root answers with ATTRS.
    fn in_sync(&mut self, id: u32) {
        let (k, _) = self.request(STAT, id, &s("."));
        assert_eq!(k, ATTRS, "server out of sync");
    }

    /// Close stdin; the server must exit 0 in time, and nothing outside the root changed.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = common::wait_timeout(&mut self.child, T).expect("server exits");
        assert!(status.success(), "server exit status {status}");
        assert_eq!(
            outside_state(&self.base, &self.root),
            self.before,
            "something outside the transfer root changed"
        );
    }
}

#[test]
fn malformed_string_length_gets_bad_message() {
    let mut c = Session::start();
    c.expect_status(
        STAT,
        1,
        &[0, 0, 0, 50, b'x'],
        BAD_MESSAGE,
        "length past the end",
    );
    c.expect_status(
        STAT,
        2,
        &[0xff, 0xff, 0xff, 0xff],
        BAD_MESSAGE,
        "4 GiB string",
    );
    c.expect_status(OPEN, 3, &s("f"), BAD_MESSAGE, "OPEN without flags");
    c.in_sync(4);
    c.finish();
}

#[test]
fn zero_length_packet_is_skipped() {
    let mut c = Session::start();
    c.send(&[0, 0, 0, 0]);
    c.in_sync(1);
    c.finish();
}

#[test]
fn oversize_packet_is_refused_without_desync() {
    let mut c = Session::start();
    let mut big = packet(WRITE, 7, &vec![0u8; 300 * 1024]);
    big.extend_from_slice(&packet(STAT, 8, &s(".")));
    c.send(&big);
    assert_eq!(c.status(7), BAD_MESSAGE);
    let (k, b) = c.recv();
    assert_eq!((k, &b[..4]), (ATTRS, &8u32.to_be_bytes()[..]));
    c.finish();
}

#[test]
fn four_gib_packet_length_allocates_nothing() {
    let mut c = Session::start();
    // Announce a 4 GiB packet, send 1 MiB of it, then go away.
    let mut head = vec![0xff, 0xff, 0xff, 0xf0, WRITE];
    head.extend_from_slice(&9u32.to_be_bytes());
    c.send(&head);
    c.send(&vec![0u8; 1 << 20]);
    let peak = peak_rss_kib(c.child.id());
    assert!(
        peak > 0 && peak < 64 * 1024,
        "peak RSS {peak} KiB after a 4 GiB length"
    );
    c.finish();
}

#[test]
fn unknown_packet_type_is_unsupported() {
    let mut c = Session::start();
    for (id, kind) in [(1, 99u8), (2, 0), (3, 255), (4, VERSION), (5, STATUS)] {
        c.expect_status(kind, id, b"junk", UNSUPPORTED, "unknown type");
    }
    c.expect_status(
        EXTENDED,
        6,
        &s("nope@example.com"),
        UNSUPPORTED,
        "unknown ext",
    );
    c.in_sync(7);
    c.finish();
}

#[test]
fn requests_before_init_fail_and_a_second_init_is_ignored() {
    let (dir, root) = sandbox();
    let mut cmd = Command::new(BIN);
    cmd.args(["sftp-server", "--transfer-root"])
        .arg(&root)
        .arg("--home")
        .arg(&root);
    let mut c = Session::spawn(cmd, dir.path().to_path_buf(), Some(dir), root, false);
    c.expect_status(STAT, 1, &s("."), FAILURE, "STAT before INIT");
    c.send(&[0, 0, 0, 5, INIT, 0, 0, 0, 3]);
    assert_eq!(c.recv().0, VERSION);
    c.send(&[0, 0, 0, 5, INIT, 0, 0, 0, 3]); // ignored: no second VERSION
    c.in_sync(2);
    c.finish();
}

#[test]
fn truncated_packet_then_eof_exits_cleanly() {
    let mut c = Session::start();
    let p = packet(
        OPEN,
        1,
        &cat(&[&s("new"), &u32b(F_WRITE | F_CREAT | F_TRUNC), &u32b(0)]),
    );
    c.send(&p[..p.len() - 3]);
    let root = c.root.clone();
    c.finish();
    assert!(!root.join("new").exists());
}

#[test]
fn handle_reuse_after_close_is_invalid() {
    let mut c = Session::start();
    let h = c.open(1, "up.img", F_WRITE | F_CREAT | F_TRUNC).unwrap();
    let w = cat(&[&s(&h), &u64b(0), &s("hello")]);
    c.expect_status(WRITE, 2, &w, OK, "write");
    c.expect_status(CLOSE, 3, &s(&h), OK, "close");
    c.expect_status(WRITE, 4, &w, FAILURE, "write after close");
    c.expect_status(CLOSE, 5, &s(&h), FAILURE, "double close");
    c.expect_status(
        READ,
        6,
        &cat(&[&s(&h), &u64b(0), &u32b(5)]),
        FAILURE,
        "read",
    );
    assert_eq!(std::fs::read(c.root.join("up.img")).unwrap(), b"hello");
    c.finish();
}

#[test]
fn forged_handles_are_invalid() {
    let mut c = Session::start();
    let h = c.open(1, "f", F_READ).unwrap();
    for (id, forged) in [
        (2u32, b"".to_vec()),
        (3, b"xyz".to_vec()),
        (4, vec![0, 0, 0, 0, 1]),
        (5, 0xdead_beefu32.to_be_bytes().to_vec()),
        (6, u32::MAX.to_be_bytes().to_vec()),
    ] {
        let read = cat(&[&s(&forged), &u64b(0), &u32b(4)]);
        c.expect_status(READ, id, &read, FAILURE, "forged handle");
    }
    // A directory operation on a file handle.
    c.expect_status(READDIR, 7, &s(&h), FAILURE, "readdir on a file");
    c.expect_status(CLOSE, 8, &s(&h), OK, "close");
    c.finish();
}

#[test]
fn open_handles_are_capped() {
    let mut c = Session::start();
    let mut handles = Vec::new();
    let mut refused = 0;
    for id in 0..300u32 {
        match c.open(id, "f", F_READ) {
            Ok(h) => handles.push(h),
            Err(code) => {
                assert_eq!(code, FAILURE);
                refused += 1;
            }
        }
    }
    assert_eq!(handles.len(), 256, "MAX_HANDLES");
    assert_eq!(refused, 44);
    // Closing one frees a slot.
    c.expect_status(CLOSE, 1000, &s(&handles[0]), OK, "close");
    assert!(c.open(1001, "f", F_READ).is_ok());
    c.finish();
}

#[test]
fn symlink_loops_are_refused() {
    let mut c = Session::start();
    c.expect_status(SYMLINK, 1, &cat(&[&s("loop"), &s("loop")]), OK, "make loop");
    c.expect_status(SYMLINK, 2, &cat(&[&s("b"), &s("a")]), OK, "a -> b");
    c.expect_status(SYMLINK, 3, &cat(&[&s("a"), &s("b")]), OK, "b -> a");
    for (id, p) in [(4u32, "loop"), (5, "a"), (6, "loop/x")] {
        c.expect_status(STAT, id, &s(p), NO_SUCH_FILE, "stat loop");
        assert_eq!(c.open(id + 10, p, F_READ), Err(NO_SUCH_FILE), "{p}");
    }
    // lstat of the link itself works; readdir of the root lists it.
    assert_eq!(c.request(LSTAT, 30, &s("loop")).0, ATTRS);
    let (k, dh) = c.request(OPENDIR, 31, &s("."));
    assert_eq!(k, HANDLE);
    assert_eq!(c.request(READDIR, 32, &s(&dh[8..])).0, NAME);
    c.finish();
}

#[test]
fn symlinks_pointing_out_are_not_followed() {
    let mut c = Session::start();
    c.expect_status(
        SYMLINK,
        1,
        &cat(&[&s("/etc/passwd"), &s("pw")]),
        OK,
        "symlink",
    );
    for p in ["pw", "abs", "up/sentinel"] {
        assert_eq!(c.open(2, p, F_READ), Err(DENIED), "read {p}");
        assert_eq!(
            c.open(3, p, F_WRITE | F_CREAT | F_TRUNC),
            Err(DENIED),
            "write {p}"
        );
        assert_eq!(c.open(4, p, F_WRITE | F_CREAT), Err(DENIED), "overlay {p}");
        c.expect_status(STAT, 5, &s(p), DENIED, "stat");
    }
    assert_eq!(c.request(OPENDIR, 6, &s("up")).0, STATUS);
    c.finish();
}

#[test]
fn rename_out_of_the_root_is_refused() {
    let mut c = Session::start();
    let outside = c.base.join("outside");
    let abs_out = format!("{}/stolen", outside.display());
    for (id, to) in [
        (1u32, "../outside/stolen"),
        (2, "up/stolen"),
        (3, abs_out.as_str()),
        (4, "/tmp/stolen-by-sftp"),
    ] {
        c.expect_status(RENAME, id, &cat(&[&s("f"), &s(to)]), DENIED, to);
        let posix = cat(&[&s("posix-rename@openssh.com"), &s("f"), &s(to)]);
        c.expect_status(EXTENDED, id + 10, &posix, DENIED, to);
    }
    // ... and into the root from outside.
    c.expect_status(
        RENAME,
        20,
        &cat(&[&s("up/sentinel"), &s("got")]),
        DENIED,
        "in",
    );
    // The root itself cannot be renamed or removed.
    c.expect_status(RENAME, 21, &cat(&[&s("."), &s("x")]), DENIED, "root");
    c.expect_status(RMDIR, 22, &s("."), DENIED, "rmdir root");
    assert!(c.root.join("f").exists());
    assert!(!std::path::Path::new("/tmp/stolen-by-sftp").exists());
    c.finish();
}

#[test]
fn hardlinks_across_the_root_are_refused() {
    let mut c = Session::start();
    let link = |old: &str, new: &str| cat(&[&s("hardlink@openssh.com"), &s(old), &s(new)]);
    c.expect_status(EXTENDED, 1, &link("up/sentinel", "hl"), DENIED, "out->in");
    c.expect_status(
        EXTENDED,
        2,
        &link("../outside/sentinel", "hl"),
        DENIED,
        "..",
    );
    c.expect_status(EXTENDED, 3, &link("f", "up/hl"), DENIED, "in->out");
    c.expect_status(EXTENDED, 4, &link("/etc/passwd", "hl"), DENIED, "abs");
    // Linking the symlink itself stays inside the root (the link is not followed).
    c.expect_status(EXTENDED, 5, &link("abs", "abs2"), OK, "symlink inode");
    assert!(!c.root.join("hl").exists());
    c.finish();
}

#[test]
fn setstat_on_outside_paths_is_refused() {
    let mut c = Session::start();
    let perm = cat(&[&u32b(0x04), &u32b(0o777)]);
    let size = cat(&[&u32b(0x01), &u64b(0)]);
    let times = cat(&[&u32b(0x08), &u32b(1), &u32b(1)]);
    let mut id = 0;
    for p in ["abs", "up/sentinel", "../outside/sentinel", "up"] {
        for attrs in [&perm, &size, &times] {
            id += 1;
            c.expect_status(SETSTAT, id, &cat(&[&s(p), attrs]), DENIED, p);
        }
    }
    // lsetstat on the symlink itself: Linux cannot chmod a symlink.
    let l = cat(&[&s("lsetstat@openssh.com"), &s("abs"), &perm]);
    c.expect_status(EXTENDED, 100, &l, UNSUPPORTED, "lsetstat symlink");
    c.finish();
}

#[test]
fn paths_outside_the_root_are_refused() {
    let mut c = Session::start();
    for p in [
        "/etc/passwd",
        "/",
        "..",
        "../outside/sentinel",
        "/proc/self/root/etc",
    ] {
        assert_eq!(c.open(1, p, F_READ), Err(DENIED), "{p}");
        c.expect_status(OPENDIR, 2, &s(p), DENIED, p);
        c.expect_status(MKDIR, 3, &cat(&[&s(format!("{p}/x")), &u32b(0)]), DENIED, p);
        c.expect_status(REMOVE, 4, &s(format!("{p}/sentinel")), DENIED, p);
    }
    c.expect_status(REMOVE, 5, &s("up/sentinel"), DENIED, "remove through up");
    c.expect_status(
        MKDIR,
        6,
        &cat(&[&s("up/newdir"), &u32b(0)]),
        DENIED,
        "mkdir up",
    );
    // NUL inside a path.
    c.expect_status(STAT, 7, &s(b"f\0/../../etc/passwd"), BAD_MESSAGE, "NUL");
    c.finish();
}

#[test]
fn absurd_attribute_counts_and_offsets_fail_cleanly() {
    let mut c = Session::start();
    // An ATTRS with 2^32-1 extended pairs and nothing after it.
    let ext = cat(&[&s("f"), &u32b(0x8000_0000), &u32b(u32::MAX)]);
    c.expect_status(SETSTAT, 1, &ext, BAD_MESSAGE, "extended count");
    // uid/gid 0xFFFFFFFF is chown's -1 ("unchanged"), on a path and on a handle.
    let ids = cat(&[&u32b(0x02), &u32b(u32::MAX), &u32b(u32::MAX)]);
    c.expect_status(SETSTAT, 10, &cat(&[&s("f"), &ids]), OK, "setstat uid -1");
    let hf = c.open(11, "f", F_READ | F_WRITE).unwrap();
    c.expect_status(10, 12, &cat(&[&s(&hf), &ids]), OK, "fsetstat uid -1");
    c.expect_status(CLOSE, 13, &s(&hf), OK, "close");
    // Writes beyond what a file offset can express.
    let h = c.open(2, "w", F_WRITE | F_CREAT | F_TRUNC).unwrap();
    for (id, off) in [(3u32, u64::MAX - 3), (4, 1u64 << 63)] {
        let w = cat(&[&s(&h), &u64b(off), &s("x")]);
        c.send(&packet(WRITE, id, &w));
        assert_ne!(c.status(id), OK, "write at {off}");
    }
    // The failed upload is discarded on close.
    assert_eq!(
        {
            c.send(&packet(CLOSE, 5, &s(&h)));
            c.status(5)
        },
        FAILURE
    );
    assert!(!c.root.join("w").exists());
    // A 4 GiB read is capped at the advertised maximum.
    std::fs::write(c.root.join("big"), vec![7u8; 1 << 20]).unwrap();
    let h = c.open(6, "big", F_READ).unwrap();
    let (k, b) = c.request(READ, 7, &cat(&[&s(&h), &u64b(0), &u32b(u32::MAX)]));
    assert_eq!(k, DATA);
    assert_eq!(u32::from_be_bytes(b[4..8].try_into().unwrap()), 261_120);
    c.finish();
}

#[test]
fn a_request_flood_is_answered_with_bounded_memory() {
    let mut c = Session::start();
    const N: u32 = 20_000;
    let mut flood = Vec::new();
    for id in 0..N {
        flood.extend_from_slice(&packet(STAT, id, &s("f")));
    }
    let mut stdin = c.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&flood).unwrap();
        stdin
    });
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let (k, b) = c.recv();
        assert_eq!(k, ATTRS);
        let id = u32::from_be_bytes(b[..4].try_into().unwrap());
        assert!(!std::mem::replace(&mut seen[id as usize], true), "dup {id}");
    }
    c.stdin = Some(writer.join().unwrap());
    let peak = peak_rss_kib(c.child.id());
    assert!(peak > 0 && peak < 64 * 1024, "peak RSS {peak} KiB");
    c.finish();
}

#[test]
fn hostile_packets_through_the_ssh_subsystem() {
    let sc = common::Sidecar::start();
    let root = sc.root.clone();
    std::fs::write(root.join("f"), b"inside\n").unwrap();
    let outside = sc.dir.path().join("outside-sentinel");
    std::fs::write(&outside, b"sentinel\n").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("abs")).unwrap();
    let mut cmd = Command::new("ssh");
    cmd.args(sc.ssh_opts())
        .args(["-p", &sc.ssh.port().to_string(), "-s"])
        .arg(format!("{}@127.0.0.1", common::me()))
        .arg("sftp");
    let mut c = Session::spawn(cmd, sc.dir.path().to_path_buf(), None, root.clone(), true);
    let root_s = root.display().to_string();
    c.expect_status(STAT, 1, &[0, 0, 0, 50, b'x'], BAD_MESSAGE, "malformed");
    c.expect_status(99, 2, b"junk", UNSUPPORTED, "unknown type");
    let abs = format!("{root_s}/abs");
    assert_eq!(c.open(3, &abs, F_WRITE | F_CREAT | F_TRUNC), Err(DENIED));
    let set = cat(&[&s(&abs), &u32b(0x04), &u32b(0o777)]);
    c.expect_status(SETSTAT, 4, &set, DENIED, "setstat out");
    let f = format!("{root_s}/f");
    let out = outside.display().to_string();
    c.expect_status(RENAME, 5, &cat(&[&s(&f), &s(&out)]), DENIED, "rename out");
    let link = cat(&[
        &s("hardlink@openssh.com"),
        &s(&abs),
        &s(format!("{root_s}/h")),
    ]);
    c.expect_status(EXTENDED, 6, &link, OK, "link the symlink inode");
    c.expect_status(STAT, 7, &s(format!("{root_s}/h")), DENIED, "follow it");
    c.finish();
    assert_eq!(std::fs::read(&outside).unwrap(), b"sentinel\n");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&outside).unwrap().permissions().mode();
    assert_ne!(mode & 0o777, 0o777);
}

#[test]
fn overlay_upload_onto_a_huge_sparse_file_copies_only_its_data() {
    use std::os::unix::fs::MetadataExt;
    const F_EXCL: u32 = 0x20;
    let mut c = Session::start();
    // A 4 GiB file made of one hole and 4 bytes, created through SFTP itself...
    let h = c.open(1, "sparse", F_WRITE | F_CREAT | F_EXCL).unwrap();
    let w = cat(&[&s(&h), &u64b((4 << 30) - 4), &s("tail")]);
    c.expect_status(WRITE, 2, &w, OK, "write at 4 GiB");
    c.expect_status(CLOSE, 3, &s(&h), OK, "close");
    // ... then rewritten in place the way OpenSSH >= 9 uploads (WRITE|CREAT, no TRUNC).
    let h = c.open(4, "sparse", F_WRITE | F_CREAT).unwrap();
    c.expect_status(WRITE, 5, &cat(&[&s(&h), &u64b(0), &s("head")]), OK, "write");
    c.expect_status(CLOSE, 6, &s(&h), OK, "commit");
    let md = std::fs::metadata(c.root.join("sparse")).unwrap();
    assert_eq!(md.len(), 4 << 30);
    assert!(
        md.blocks() * 512 < 1 << 20,
        "holes were copied: {} blocks",
        md.blocks()
    );
    c.finish();
}
