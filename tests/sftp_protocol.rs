//! sftp::serve driven in-process with hand-made packets: malformed input, unknown types,
//! oversize packets (refused without desync), handle reuse after close, pipelining, confinement.

#[path = "support/sftp_wire.rs"]
mod sftp_wire;

use std::path::PathBuf;
use std::time::Duration;

use sftp_wire::{packet, s};
use tm_sidecar::transfer::{Transfer, sftp};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const INIT: u8 = 1;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const WRITE: u8 = 6;
const STAT: u8 = 17;
const SETSTAT: u8 = 9;
const EXTENDED: u8 = 200;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;
const VERSION: u8 = 2;

struct Client {
    to: DuplexStream,
    from: DuplexStream,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Client {
    async fn start() -> Client {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(dir.path().join("secret"), b"secret").unwrap();
        let mut reg = prometheus_client::registry::Registry::default();
        let transfer =
            Transfer::new(std::slice::from_ref(&root), dir.path(), false, &mut reg).unwrap();
        let (to, server_in) = tokio::io::duplex(4 << 20);
        let (server_out, from) = tokio::io::duplex(4 << 20);
        let task = tokio::spawn(sftp::serve(transfer, server_in, server_out));
        let mut c = Client {
            to,
            from,
            task,
            _dir: dir,
            root,
        };
        let mut init = vec![0, 0, 0, 5, INIT];
        init.extend_from_slice(&3u32.to_be_bytes());
        c.to.write_all(&init).await.unwrap();
        let (kind, body) = c.recv().await;
        assert_eq!(kind, VERSION);
        assert_eq!(&body[..4], &3u32.to_be_bytes());
        c
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.to.write_all(bytes).await.unwrap();
    }

    /// (type, rest after type)
    async fn recv(&mut self) -> (u8, Vec<u8>) {
        let mut len = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), self.from.read_exact(&mut len))
            .await
            .expect("reply in time")
            .unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.from.read_exact(&mut body).await.unwrap();
        (body[0], body[1..].to_vec())
    }

    async fn status(&mut self, expect_id: u32) -> u32 {
        let (kind, body) = self.recv().await;
        assert_eq!(kind, STATUS, "expected STATUS, got {kind}");
        assert_eq!(u32::from_be_bytes(body[..4].try_into().unwrap()), expect_id);
        u32::from_be_bytes(body[4..8].try_into().unwrap())
    }

    async fn open(&mut self, id: u32, path: &[u8], pflags: u32) -> Result<Vec<u8>, u32> {
        let mut body = s(path);
        body.extend_from_slice(&pflags.to_be_bytes());
        body.extend_from_slice(&0u32.to_be_bytes());
        self.send(&packet(OPEN, id, &body)).await;
        let (kind, body) = self.recv().await;
        assert_eq!(u32::from_be_bytes(body[..4].try_into().unwrap()), id);
        match kind {
            HANDLE => Ok(body[8..].to_vec()),
            STATUS => Err(u32::from_be_bytes(body[4..8].try_into().unwrap())),
            k => panic!("unexpected {k}"),
        }
    }

    fn path(&self, rel: &str) -> Vec<u8> {
        format!("{}/{rel}", self.root.display()).into_bytes()
    }

    /// Close our side; returns the temp dir so the caller can inspect it.
    async fn finish(mut self) -> tempfile::TempDir {
        self.to.shutdown().await.unwrap();
        drop(self.to);
        let r = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("serve returns");
        r.unwrap().unwrap();
        let mut rest = Vec::new();
        let _ = self.from.read_to_end(&mut rest).await;
        self._dir
    }
}

#[tokio::test]
async fn unknown_types_and_malformed_requests_get_status_replies() {
    let mut c = Client::start().await;
    c.send(&packet(99, 1, b"whatever")).await;
    assert_eq!(c.status(1).await, 8); // OP_UNSUPPORTED
    // STAT with a string length running past the packet
    c.send(&packet(STAT, 2, &[0, 0, 0, 50, b'x'])).await;
    assert_eq!(c.status(2).await, 5); // BAD_MESSAGE
    // unknown extension
    c.send(&packet(EXTENDED, 3, &s(b"nope@example.com"))).await;
    assert_eq!(c.status(3).await, 8);
    // still in sync
    c.send(&packet(STAT, 4, &s(c.path("")))).await;
    assert_eq!(c.recv().await.0, 105);
    c.finish().await;
}

#[tokio::test]
async fn oversize_packet_is_refused_without_desync() {
    let mut c = Client::start().await;
    let mut big = packet(WRITE, 7, &vec![0u8; 300 * 1024]);
    big.extend_from_slice(&packet(STAT, 8, &s(c.path(""))));
    c.send(&big).await;
    assert_eq!(c.status(7).await, 5);
    let (kind, body) = c.recv().await;
    assert_eq!(kind, 105);
    assert_eq!(&body[..4], &8u32.to_be_bytes());
    c.finish().await;
}

#[tokio::test]
async fn handle_reuse_after_close_is_invalid() {
    let mut c = Client::start().await;
    let path = c.path("f");
    let h = c.open(1, &path, 0x02 | 0x08 | 0x10).await.unwrap();
    let mut w = s(&h);
    w.extend_from_slice(&0u64.to_be_bytes());
    w.extend_from_slice(&s(b"hello"));
    c.send(&packet(WRITE, 2, &w)).await;
    assert_eq!(c.status(2).await, 0);
    c.send(&packet(CLOSE, 3, &s(&h))).await;
    assert_eq!(c.status(3).await, 0);
    assert_eq!(std::fs::read(c.root.join("f")).unwrap(), b"hello");
    // the same handle again: failure, and no write happens
    c.send(&packet(WRITE, 4, &w)).await;
    assert_eq!(c.status(4).await, 4);
    c.send(&packet(CLOSE, 5, &s(&h))).await;
    assert_eq!(c.status(5).await, 4);
    // a handle of the wrong length
    c.send(&packet(CLOSE, 6, &s(b"xyz"))).await;
    assert_eq!(c.status(6).await, 4);
    c.finish().await;
}

#[tokio::test]
async fn pipelined_reads_all_answer() {
    let mut c = Client::start().await;
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(c.root.join("big"), &data).unwrap();
    let h = c.open(1, &c.path("big"), 0x01).await.unwrap();
    let chunk = 32768u32;
    let n = data.len().div_ceil(chunk as usize) as u32 + 1;
    let mut batch = Vec::new();
    for i in 0..n {
        let mut r = s(&h);
        r.extend_from_slice(&(u64::from(i) * u64::from(chunk)).to_be_bytes());
        r.extend_from_slice(&chunk.to_be_bytes());
        batch.extend_from_slice(&packet(READ, 100 + i, &r));
    }
    c.send(&batch).await;
    let mut got = vec![Vec::new(); n as usize];
    let mut eofs = 0;
    for _ in 0..n {
        let (kind, body) = c.recv().await;
        let id = u32::from_be_bytes(body[..4].try_into().unwrap());
        match kind {
            DATA => got[(id - 100) as usize] = body[8..].to_vec(),
            STATUS => {
                assert_eq!(u32::from_be_bytes(body[4..8].try_into().unwrap()), 1);
                eofs += 1;
            }
            k => panic!("unexpected {k}"),
        }
    }
    assert_eq!(eofs, 1);
    assert_eq!(got.concat(), data);
    c.finish().await;
}

#[tokio::test]
async fn confinement_through_sftp() {
    let mut c = Client::start().await;
    std::os::unix::fs::symlink("../secret", c.root.join("out")).unwrap();
    for p in [
        b"/etc/passwd".to_vec(),
        c.path("../secret"),
        c.path("out"),
        b"secret".to_vec(),
    ] {
        assert_eq!(
            c.open(1, &p, 0x01).await,
            Err(3),
            "{}",
            String::from_utf8_lossy(&p)
        );
    }
    // setstat through the symlink pointing out
    let mut body = s(c.path("out"));
    body.extend_from_slice(&4u32.to_be_bytes());
    body.extend_from_slice(&0o777u32.to_be_bytes());
    c.send(&packet(SETSTAT, 2, &body)).await;
    assert_eq!(c.status(2).await, 3);
    // posix-rename and hardlink out of the root
    std::fs::write(c.root.join("f"), b"x").unwrap();
    for ext in [&b"posix-rename@openssh.com"[..], b"hardlink@openssh.com"] {
        let mut body = s(ext);
        body.extend_from_slice(&s(c.path("f")));
        body.extend_from_slice(&s(c.path("../stolen")));
        c.send(&packet(EXTENDED, 3, &body)).await;
        assert_eq!(c.status(3).await, 3);
    }
    assert!(!c.root.join("../stolen").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(c.root.join("../secret"))
        .unwrap()
        .permissions()
        .mode();
    assert_ne!(mode & 0o777, 0o777);
    c.finish().await;
}

#[tokio::test]
async fn disconnect_discards_open_uploads() {
    let mut c = Client::start().await;
    std::fs::write(c.root.join("img"), b"old").unwrap();
    let h = c.open(1, &c.path("img"), 0x02 | 0x08 | 0x10).await.unwrap();
    let mut w = s(&h);
    w.extend_from_slice(&0u64.to_be_bytes());
    w.extend_from_slice(&s(b"partial"));
    c.send(&packet(WRITE, 2, &w)).await;
    assert_eq!(c.status(2).await, 0);
    let root = c.root.clone();
    let _dir = c.finish().await; // input closed without CLOSE
    assert_eq!(std::fs::read(root.join("img")).unwrap(), b"old");
    let names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("img")]);
}
