//! Shared harness for integration tests: start the real `tm-sidecar` binary on ephemeral
//! loopback ports with keys made in a temp dir, and build OpenSSH client commands against it.
#![allow(dead_code)]

pub mod admin;
pub mod agent;
#[path = "../support/sshc.rs"]
pub mod sshc;

/// A russh client handler that accepts any host key (the tests' server is on loopback).
pub use sshc::AnyHost;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tm-sidecar");

/// How long a test waits for the server to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The name of the user running the tests (root in CI).
pub fn me() -> String {
    tm_sidecar::config::current_user_name().unwrap_or_else(|| "root".into())
}

/// Log lines the server wrote to stderr, collected by a thread.
#[derive(Clone, Default)]
pub struct Logs {
    inner: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Logs {
    pub fn lines(&self) -> Vec<String> {
        self.inner.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Wait until a line satisfies `pred`, up to `timeout`; returns it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cvar) = &*self.inner;
        let mut lines = lock.lock().ok()?;
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = cvar.wait_timeout(lines, deadline - now).ok()?.0;
        }
    }

    fn push(&self, line: String) {
        let (lock, cvar) = &*self.inner;
        if let Ok(mut l) = lock.lock() {
            l.push(line);
        }
        cvar.notify_all();
    }
}

/// A running tm-sidecar.
pub struct Sidecar {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub ssh: SocketAddr,
    pub monitord: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub logs: Logs,
    /// Keys dir made by `keygen`: host key, client key, authorized_keys.
    pub keys: PathBuf,
    /// The transfer root (`<dir>/datastores`).
    pub root: PathBuf,
    /// Home (`<dir>/home`).
    pub home: PathBuf,
}

fn addr_field(line: &serde_json::Value, name: &str) -> Option<SocketAddr> {
    line.get(name)?.as_str()?.split(',').next()?.parse().ok()
}

impl Sidecar {
    /// Start with defaults: SSH, monitord and admin on 127.0.0.1:0.
    pub fn start() -> Sidecar {
        Self::start_with(&[])
    }

    /// Start with extra `serve` flags (they come after the defaults, and repeatable flags given
    /// here add to them).
    pub fn start_with(extra: &[&str]) -> Sidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = keygen(dir.path());
        let root = dir.path().join("datastores");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&home).unwrap();
        Self::spawn(dir, keys, root, home, extra)
    }

    fn spawn(
        dir: tempfile::TempDir,
        keys: PathBuf,
        root: PathBuf,
        home: PathBuf,
        extra: &[&str],
    ) -> Sidecar {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args(["--ssh-listen", "127.0.0.1:0"])
            .arg("--host-key")
            .arg(keys.join("ssh_host_ed25519_key"))
            .arg("--authorized-keys")
            .arg(keys.join("authorized_keys"))
            .args(["--allow-user", &me(), "--allow-user", "oneadmin"])
            .arg("--home")
            .arg(&home)
            .arg("--transfer-root")
            .arg(&root)
            .args(["--admin-listen", "127.0.0.1:0", "--log-format", "json"]);
        if !extra.contains(&"--monitord-listen") {
            cmd.args(["--monitord-listen", "127.0.0.1:0"]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tm-sidecar");
        let logs = Logs::default();
        let stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("TM_SIDECAR_TEST_LOGS").is_some() {
                    eprintln!("[sidecar] {line}");
                }
                sink.push(line);
            }
            sink.push("<<eof>>".into());
        });
        let ready = logs.wait_for(READY_TIMEOUT, |l| {
            l.contains("tm-sidecar ready") || l == "<<eof>>"
        });
        let ready = match ready {
            Some(l) if l != "<<eof>>" => l,
            _ => {
                let _ = child.kill();
                panic!(
                    "tm-sidecar did not become ready:\n{}",
                    logs.lines().join("\n")
                );
            }
        };
        let json: serde_json::Value = serde_json::from_str(&ready).expect("ready line is JSON");
        let ssh = addr_field(&json, "ssh").expect("ssh address in ready line");
        Sidecar {
            child,
            dir,
            ssh,
            monitord: addr_field(&json, "monitord"),
            admin: addr_field(&json, "admin"),
            logs,
            keys,
            root,
            home,
        }
    }

    pub fn client_key(&self) -> PathBuf {
        self.keys.join("oneadmin_ed25519")
    }

    /// Common OpenSSH client options for this server (no config file, no known_hosts checks).
    pub fn ssh_opts(&self) -> Vec<String> {
        ssh_client_opts(&self.client_key())
    }

    /// `ssh -p PORT ... user@127.0.0.1 <args>`.
    pub fn ssh(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.ssh_opts())
            .args(["-p", &self.ssh.port().to_string()])
            .arg(format!("{}@127.0.0.1", me()))
            .args(args);
        c
    }

    /// `scp -P PORT ...` with the same options; remote paths are `host:path` → use [`Self::remote`].
    pub fn scp(&self) -> Command {
        let mut c = Command::new("scp");
        c.args(self.ssh_opts())
            .args(["-P", &self.ssh.port().to_string()]);
        c
    }

    /// `sftp -P PORT ... user@127.0.0.1`.
    pub fn sftp(&self) -> Command {
        let mut c = Command::new("sftp");
        c.args(self.ssh_opts())
            .args(["-P", &self.ssh.port().to_string()]);
        c
    }

    /// `user@127.0.0.1:path` for scp.
    pub fn remote(&self, path: impl AsRef<Path>) -> String {
        format!("{}@127.0.0.1:{}", me(), path.as_ref().display())
    }

    /// Send SIGTERM and wait (bounded) for exit; returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32)?;
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        wait_timeout(&mut self.child, timeout)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// OpenSSH client options used by every test: key only, no agent, no config, no host key prompts.
pub fn ssh_client_opts(key: &Path) -> Vec<String> {
    [
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=20",
        "-i",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(std::iter::once(key.display().to_string()))
    .collect()
}

/// Wait for a child with a deadline; kills it if the deadline passes.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Run a command with a deadline, capturing stdout/stderr. Panics on timeout.
pub fn run(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    run_with_stdin(cmd, Stdio::null(), timeout)
}

/// [`run`] with `stdin` as the command's standard input (a file, say).
pub fn run_with_stdin(cmd: &mut Command, stdin: Stdio, timeout: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || read_all(out));
    let t_err = std::thread::spawn(move || read_all(err));
    let status = wait_timeout(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("command timed out: {cmd:?}")
    });
    std::process::Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

fn read_all(mut r: impl std::io::Read) -> Vec<u8> {
    let mut v = vec![];
    let _ = r.read_to_end(&mut v);
    v
}

/// A stock OpenSSH `sshd` (Debian's openssh-server) on an ephemeral loopback port: the
/// "hypervisor" in two-host tests and the reference in comparisons.
pub struct StockSshd {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

/// Pick a free loopback port (bind :0 and release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl StockSshd {
    /// Start sshd accepting exactly the keys in `authorized_keys`.
    pub fn start(authorized_keys: &str) -> StockSshd {
        Self::start_with_config(authorized_keys, "")
    }

    /// `ssh -p PORT <opts> user@127.0.0.1 args`, with the given client key.
    pub fn ssh(&self, key: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(ssh_client_opts(key))
            .args(["-p", &self.port.to_string()])
            .arg(format!("{}@127.0.0.1", me()))
            .args(args);
        c
    }
}

impl Drop for StockSshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tm-sidecar keygen` into `<dir>/keys` (host key, client key, authorized_keys); returns it.
pub fn keygen(dir: &Path) -> PathBuf {
    let keys = dir.join("keys");
    let status = Command::new(BIN)
        .args(["keygen", "--no-monitord", "--dir"])
        .arg(&keys)
        .stdout(Stdio::null())
        .status()
        .expect("run keygen");
    assert!(status.success(), "keygen failed");
    keys
}

/// Make an ed25519 key pair with ssh-keygen; returns (private key path, public line).
pub fn make_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    let public = std::fs::read_to_string(path.with_extension("pub"))
        .or_else(|_| std::fs::read_to_string(format!("{}.pub", path.display())))
        .expect("public key");
    (path, public)
}

impl StockSshd {
    /// Like [`StockSshd::start`], with `extra` lines appended to the sshd_config (e.g.
    /// `SetEnv HOME=/some/dir`, so that sessions do not read the real home's dotfiles).
    pub fn start_with_config(authorized_keys: &str, extra: &str) -> StockSshd {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("host_key"))
            .status()
            .expect("ssh-keygen");
        assert!(status.success());
        std::fs::write(d.join("authorized_keys"), authorized_keys).unwrap();
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n\
             AllowAgentForwarding yes\nSubsystem sftp internal-sftp\nLogLevel ERROR\n\
             PrintMotd no\nPrintLastLog no\nMaxSessions 64\nMaxStartups 100:30:200\n{extra}\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let check = Command::new("/usr/sbin/sshd")
            .arg("-t")
            .arg("-f")
            .arg(d.join("sshd_config"))
            .output()
            .expect("sshd -t (install openssh-server)");
        assert!(
            check.status.success(),
            "sshd_config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/sbin/sshd (install openssh-server)");
        let deadline = Instant::now() + READY_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        StockSshd { child, dir, port }
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile-input helpers (tests/hostile_*.rs)

/// Everything under `dir` except the subtree `skip` (the transfer root, itself included), one line per entry
/// with type, mode, size, link count, mtime and a content digest for files; compare before and
/// after a hostile session to prove nothing outside the root changed.
pub fn outside_state(dir: &Path, skip: &Path) -> Vec<String> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d == skip {
            continue;
        }
        let md = std::fs::symlink_metadata(&d).expect("stat");
        let mut line = format!(
            "{} mode={:o} size={} nlink={} mtime={}",
            d.strip_prefix(dir).unwrap_or(&d).display(),
            md.mode(),
            md.size(),
            md.nlink(),
            md.mtime()
        );
        if md.is_file() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::fs::read(&d).expect("read").hash(&mut h);
            line.push_str(&format!(" digest={:x}", h.finish()));
        }
        out.push(line);
        if md.is_dir() {
            for e in std::fs::read_dir(&d).expect("read_dir") {
                stack.push(e.expect("entry").path());
            }
        }
    }
    out.sort();
    out
}

/// Peak resident memory of a running process in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// An in-process SSH client (russh) logged in to `s` with the test key, for what OpenSSH's
/// client will not send: floods of requests, absurd sizes, NUL bytes.
pub async fn russh_login(s: &Sidecar) -> russh::client::Handle<AnyHost> {
    let config = Arc::new(russh::client::Config::default());
    let mut h = russh::client::connect(config, s.ssh, AnyHost)
        .await
        .expect("russh connect");
    let key = russh::keys::load_secret_key(s.client_key(), None).expect("client key");
    let auth = h
        .authenticate_publickey(
            me(),
            russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .expect("russh auth");
    assert!(auth.success(), "test key refused");
    h
}

/// Read a channel until it closes (bounded): (stdout, stderr, exit status, failures seen).
pub async fn russh_collect(
    ch: &mut russh::Channel<russh::client::Msg>,
    timeout: Duration,
) -> (Vec<u8>, Vec<u8>, Option<u32>, usize) {
    let (mut out, mut err, mut status, mut failures) = (Vec::new(), Vec::new(), None, 0);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, ch.wait())
            .await
            .expect("channel did not close in time");
        match msg {
            None | Some(russh::ChannelMsg::Close) => break,
            Some(russh::ChannelMsg::Data { data }) => out.extend_from_slice(&data),
            Some(russh::ChannelMsg::ExtendedData { data, .. }) => err.extend_from_slice(&data),
            Some(russh::ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
            Some(russh::ChannelMsg::Failure) => failures += 1,
            Some(_) => {}
        }
    }
    (out, err, status, failures)
}

// ---------------------------------------------------------------------------------------------
// A UDP + TCP sink playing onemonitord (the relay's upstream)

pub struct UpstreamSink {
    pub addr: SocketAddr,
    udp: Arc<Mutex<Vec<Vec<u8>>>>,
    tcp: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl UpstreamSink {
    /// Bind TCP and UDP on the same port (`addr` may have port 0).
    pub fn start(addr: SocketAddr) -> UpstreamSink {
        let tl = std::net::TcpListener::bind(addr).expect("sink TCP bind");
        let addr = tl.local_addr().unwrap();
        let us = std::net::UdpSocket::bind(addr).expect("sink UDP bind");
        let udp = Arc::new(Mutex::new(vec![]));
        let tcp = Arc::new(Mutex::new(vec![]));
        let u = udp.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = us.recv(&mut buf) {
                u.lock().unwrap().push(buf[..n].to_vec());
            }
        });
        let t = tcp.clone();
        std::thread::spawn(move || {
            for s in tl.incoming() {
                let Ok(mut s) = s else { continue };
                let t = t.clone();
                std::thread::spawn(move || {
                    let mut v = vec![];
                    let _ = std::io::Read::read_to_end(&mut s, &mut v);
                    t.lock().unwrap().push(v);
                });
            }
        });
        UpstreamSink { addr, udp, tcp }
    }

    /// Datagrams received so far.
    pub fn udp(&self) -> Vec<Vec<u8>> {
        self.udp.lock().unwrap().clone()
    }

    /// Whole TCP streams received so far (one per connection).
    pub fn tcp(&self) -> Vec<Vec<u8>> {
        self.tcp.lock().unwrap().clone()
    }
}

/// A client multiplexed over the master. When the master refuses the session, OpenSSH falls
/// back to a direct connection: aim that at the discard port so it fails at once instead of
/// waiting on a DNS lookup or reaching the sidecar.
pub fn mux_client(ctl: &std::path::Path, cmd: &str) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-S"]).arg(ctl).args([
        "-o",
        "ControlMaster=no",
        "-F",
        "/dev/null",
        "-p",
        "9",
        "127.0.0.1",
        cmd,
    ]);
    c
}

/// Poll `cond` until it holds, for at most `timeout`; panics naming `what` otherwise.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
