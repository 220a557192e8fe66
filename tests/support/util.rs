//! Helpers shared by `tests/faults.rs` and `tests/load.rs` (included with `#[path]`): file
//! digests, bounded polling, process-group inspection, a small tmpfs, and a TCP proxy that can
//! reset a connection mid-stream.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub fn sha256(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

pub fn sha256_bytes(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Deterministic pseudo-random bytes (xorshift), incompressible.
pub fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

pub fn write_random(path: &Path, size: usize, seed: u64) {
    std::fs::write(path, random_bytes(size, seed)).unwrap();
}

/// Poll `cond` every 20 ms until it holds; panic naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Names starting with '.' in `dir` (the server's upload temp files are hidden).
pub fn hidden_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    let _ = rustix::process::kill_process(pid, sig);
}

pub fn kill9(child: &mut Child) {
    signal(child.id(), rustix::process::Signal::KILL);
    let _ = child.wait();
}

/// Processes whose process group is `pgid` (from /proc/*/stat).
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = vec![];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after the last ')'
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // a zombie is dead already; it only waits for its parent to reap it
        if f.len() > 2 && f[2].parse() == Ok(pgid) && f[0] != "Z" {
            out.push(pid);
        }
    }
    out
}

/// `VmRSS` / `VmHWM` (KiB) of a process.
pub fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A small tmpfs on a temp dir, unmounted on drop (the tests run as root in CI).
pub struct Tmpfs(pub tempfile::TempDir);

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs (these tests need root / CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir)
    }

    pub fn path(&self) -> PathBuf {
        self.0.path().to_path_buf()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Which way the proxy counts bytes before it resets the connection.
#[derive(Clone, Copy, Debug)]
pub enum ResetAfter {
    /// After this many bytes client → server.
    Up(u64),
    /// After this many bytes server → client.
    Down(u64),
}

/// A TCP proxy between an SSH client and the server that, after a set number of bytes in one
/// direction, aborts both sides of the connection with RST (SO_LINGER 0, then close): what a
/// crashed middlebox or a peer's kernel losing the connection looks like. Every connection
/// through it gets the same treatment.
pub struct Proxy {
    pub addr: SocketAddr,
    resets: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

struct Pair {
    client: TcpStream,
    server: TcpStream,
    reset: AtomicBool,
    up: AtomicU64,
    down: AtomicU64,
}

impl Pair {
    /// Abort both sides: linger 0 makes the final close send RST instead of FIN; shutting the
    /// read side down wakes the pump blocked in read, so that both drop their handles now.
    fn abort(&self) {
        if self.reset.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in [&self.client, &self.server] {
            let _ = rustix::net::sockopt::set_socket_linger(s, Some(Duration::ZERO));
            let _ = s.shutdown(Shutdown::Read);
        }
    }
}

impl Proxy {
    pub fn start(target: SocketAddr, after: ResetAfter) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let resets = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (resets.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => continue,
                };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let pair = Arc::new(Pair {
                    client,
                    server,
                    reset: AtomicBool::new(false),
                    up: AtomicU64::new(0),
                    down: AtomicU64::new(0),
                });
                for up in [true, false] {
                    let (pair, r) = (pair.clone(), r.clone());
                    std::thread::spawn(move || pump(&pair, up, after, &r));
                }
            }
        });
        Proxy { addr, resets, stop }
    }

    /// How many connections were reset so far.
    pub fn resets(&self) -> usize {
        self.resets.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pump(pair: &Pair, up: bool, after: ResetAfter, resets: &AtomicUsize) {
    let (mut from, mut to, count) = if up {
        (&pair.client, &pair.server, &pair.up)
    } else {
        (&pair.server, &pair.client, &pair.down)
    };
    let limit = match after {
        ResetAfter::Up(n) if up => Some(n),
        ResetAfter::Down(n) if !up => Some(n),
        _ => None,
    };
    let _ = to.set_write_timeout(Some(Duration::from_millis(100)));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                // an orderly end: pass the half-close on
                if !pair.reset.load(Ordering::SeqCst) {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => n,
            Err(_) => {
                pair.abort();
                return;
            }
        };
        // Forward up to the limit exactly, then abort.
        let mut n = n;
        let mut trip = false;
        if let Some(limit) = limit {
            let done = count.load(Ordering::SeqCst);
            if done + n as u64 >= limit {
                n = (limit - done.min(limit)) as usize;
                trip = true;
            }
        }
        let mut off = 0;
        while off < n {
            if pair.reset.load(Ordering::SeqCst) {
                return;
            }
            match to.write(&buf[off..n]) {
                Ok(w) => off += w,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => {
                    pair.abort();
                    return;
                }
            }
        }
        count.fetch_add(n as u64, Ordering::SeqCst);
        if trip {
            resets.fetch_add(1, Ordering::SeqCst);
            pair.abort();
            return;
        }
        if pair.reset.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// Write `first` to `w` in a thread, then hold the pipe open until the returned sender is
/// dropped; then write `rest` and close (a client whose stream is surely not finished when
/// the fault hits, and that can be let finish later).
pub fn feed_and_hold(
    mut w: impl Write + Send + 'static,
    first: Vec<u8>,
    rest: Vec<u8>,
) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let _ = w.write_all(&first);
        let _ = w.flush();
        let _ = rx.recv();
        let _ = w.write_all(&rest);
        drop(w);
    });
    tx
}

/// Datagrams the kernel dropped for the UDP sockets bound to local `port` (receive buffer full),
/// from the last column of /proc/net/udp.
pub fn udp_drops(port: u16) -> u64 {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/udp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 12 && f[1].ends_with(&want)).then(|| f[12].parse::<u64>().unwrap_or(0))
        })
        .sum()
}

/// Set this process's soft RLIMIT_NOFILE (the hard limit stays).
pub fn set_nofile_soft(v: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(cur.maximum.map_or(v, |m| m.min(v))),
            maximum: cur.maximum,
        },
    )
    .expect("setrlimit");
}

/// The soft "Max open files" of a process, from /proc/PID/limits.
pub fn nofile_soft_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0)
}
