//! Faults against the real binary: clients killed (SIGKILL) or connections reset (RST) in the
//! middle of exec+tar, exec+cat, scp (both protocols) and sftp transfers; a full filesystem; an
//! exec child killed with SIGKILL; the monitord upstream going away and coming back;
//! authorized_keys deleted while sessions are open; SIGTERM while transfers are running.
//!
//! Every case checks that nothing is lost — a destination is either complete (sha256) or
//! untouched (old content, no `.tm-upload` temp file) — and that the server keeps serving
//! (a fresh `ssh true` works, no channel or connection is left behind in the metrics).
//!
//! What `tests/transfer.rs` already covers is not repeated: scp (SFTP mode and `-O`) and
//! `sftp put` uploads killed with SIGKILL (`killed_uploads_leave_the_old_destination_and_no_temp_file`)
//! and scp into a full filesystem (`full_filesystem_gives_a_clear_error_and_no_temp_file`);
//! `tests/ops.rs` drains idle-load SIGTERM and `tests/monitord.rs` starts with the upstream down.

mod common;
#[path = "support/util.rs"]
mod util;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::admin::{http_get, metrics, value};
use common::{Sidecar, StockSshd, run, sshc, wait_timeout};
use util::{
    Proxy, ResetAfter, Tmpfs, feed_and_hold, group_members, hidden_files, kill9, sha256,
    wait_until, write_random,
};

const T: Duration = Duration::from_secs(120);
const OLD: &[u8] = b"previous image, must survive\n";

// ---------------------------------------------------------------------------------------------
// Clients aimed at the sidecar or at a proxy in front of it

fn user_at() -> String {
    format!("{}@127.0.0.1", common::me())
}

fn ssh_to(s: &Sidecar, port: u16, command: &str) -> Command {
    let mut c = Command::new("ssh");
    c.args(s.ssh_opts())
        .args(["-p", &port.to_string()])
        .arg(user_at())
        .arg(command);
    c
}

fn scp_to(s: &Sidecar, port: u16, legacy: bool) -> Command {
    let mut c = Command::new("scp");
    c.args(s.ssh_opts()).args(["-P", &port.to_string()]);
    if legacy {
        c.arg("-O");
    }
    c
}

fn sftp_batch(s: &Sidecar, port: u16, batch: &Path) -> Command {
    let mut c = Command::new("sftp");
    c.args(s.ssh_opts())
        .args(["-P", &port.to_string(), "-b"])
        .arg(batch)
        .arg(user_at());
    c
}

fn quiet(c: &mut Command) -> &mut Command {
    c.stdout(Stdio::null()).stderr(Stdio::null())
}

/// A fresh login still works and nothing of the fault is left open on the server.
fn still_serving(s: &Sidecar) {
    wait_until("no channel or connection left open", T, || {
        let m = metrics(s);
        value(&m, "tm_sidecar_ssh_channels_active", &[]) == 0.0
            && value(&m, "tm_sidecar_ssh_connections_active", &[]) == 0.0
    });
    let out = run(&mut s.ssh(&["true"]), T);
    assert!(
        out.status.success(),
        "a fresh `ssh true` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Wait for every process of the remote command's group (its pid, written by the command
/// itself into `pidfile`) to be gone.
fn group_gone(pidfile: &Path) {
    let pgid: u32 = std::fs::read_to_string(pidfile)
        .unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()))
        .trim()
        .parse()
        .unwrap();
    wait_until(&format!("process group {pgid} to be killed"), T, || {
        group_members(pgid).is_empty()
    });
}

fn size_of(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Uploads of each kind, started against a port (the sidecar's or a proxy's)

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// `ssh fe 'cat > part && mv part dest'`: a clean EOF would commit a truncated file.
    ExecCat,
    /// `tar -cf - | ssh fe 'tar -C stage -xf - && mv stage/img dest'`.
    ExecTar,
    /// scp in SFTP mode (OpenSSH ≥ 9 default).
    Scp,
    /// scp -O (the legacy protocol: exec `scp -t`).
    ScpLegacy,
    /// sftp -b with `put`.
    Sftp,
}

const ALL_KINDS: [Kind; 5] = [
    Kind::ExecCat,
    Kind::ExecTar,
    Kind::Scp,
    Kind::ScpLegacy,
    Kind::Sftp,
];

/// One upload: where it goes, what a complete one holds, and the files a script uses.
struct Upload {
    kind: Kind,
    dest: PathBuf,
    /// The exec command's own work file (exec kinds): the script's to clean, not the server's.
    work: PathBuf,
    pidfile: PathBuf,
    child: Child,
    /// The client's stderr.
    errlog: PathBuf,
    /// Holds the exec client's stdin open until dropped.
    hold: Option<std::sync::mpsc::Sender<()>>,
}

struct Source {
    /// The image itself.
    file: PathBuf,
    /// `tar -cf -` of it (member name `img`).
    tar: Vec<u8>,
    digest: String,
}

fn source(dir: &Path, size: usize, seed: u64) -> Source {
    let d = dir.join(format!("src-{seed}"));
    std::fs::create_dir_all(&d).unwrap();
    let file = d.join("img");
    write_random(&file, size, seed);
    let out = run(
        Command::new("tar")
            .arg("-C")
            .arg(&d)
            .args(["-cf", "-", "img"]),
        T,
    );
    assert!(out.status.success());
    Source {
        digest: sha256(&file),
        file,
        tar: out.stdout,
    }
}

/// Start an upload of `src` to `dest`. Exec kinds get the first `stdin_first` bytes of their
/// stream on stdin (all of it by default); the rest, and EOF, follow when the hold is dropped.
/// scp and sftp can be rate-limited (`-l`, Kbit/s).
fn start_upload(
    s: &Sidecar,
    port: u16,
    kind: Kind,
    src: &Source,
    dest: &Path,
    stdin_first: Option<usize>,
    limit_kbit: Option<&str>,
) -> Upload {
    let dir = dest.parent().unwrap();
    let name = dest.file_name().unwrap().to_string_lossy().into_owned();
    let pidfile = s.dir.path().join(format!("{name}.{kind:?}.pid"));
    let _ = std::fs::remove_file(&pidfile);
    let (work, mut cmd, stream) = match kind {
        Kind::ExecCat => {
            let work = dir.join(format!("{name}.part"));
            let c = ssh_to(
                s,
                port,
                &format!(
                    "echo $$ > {pid}; cat > {work} && mv {work} {dest}",
                    pid = pidfile.display(),
                    work = work.display(),
                    dest = dest.display()
                ),
            );
            (work, c, Some(std::fs::read(&src.file).unwrap()))
        }
        Kind::ExecTar => {
            let stage = dir.join(format!("{name}.stage"));
            let c = ssh_to(
                s,
                port,
                &format!(
                    "echo $$ > {pid}; mkdir -p {stage} && tar -C {stage} -xf - && mv {stage}/img {dest}",
                    pid = pidfile.display(),
                    stage = stage.display(),
                    dest = dest.display()
                ),
            );
            (stage.join("img"), c, Some(src.tar.clone()))
        }
        Kind::Scp | Kind::ScpLegacy => {
            let mut c = scp_to(s, port, kind == Kind::ScpLegacy);
            if let Some(l) = limit_kbit {
                c.args(["-l", l]);
            }
            c.arg(&src.file)
                .arg(format!("{}:{}", user_at(), dest.display()));
            (PathBuf::new(), c, None)
        }
        Kind::Sftp => {
            let batch = s.dir.path().join(format!("{name}.batch"));
            std::fs::write(
                &batch,
                format!("put {} {}\n", src.file.display(), dest.display()),
            )
            .unwrap();
            let mut c = sftp_batch(s, port, &batch);
            if let Some(l) = limit_kbit {
                // options must come before the destination
                let args: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
                c = Command::new("sftp");
                c.args(["-l", l]).args(args);
            }
            (PathBuf::new(), c, None)
        }
    };
    let mut hold = None;
    let errlog = s.dir.path().join(format!("{name}.{kind:?}.stderr"));
    cmd.stderr(std::fs::File::create(&errlog).unwrap());
    let child = match stream {
        Some(mut data) => {
            let rest = data.split_off(stdin_first.unwrap_or(data.len()));
            let mut child = cmd
                .stdout(Stdio::null())
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            hold = Some(feed_and_hold(child.stdin.take().unwrap(), data, rest));
            child
        }
        None => cmd
            .stdout(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    };
    Upload {
        kind,
        errlog,
        dest: dest.to_path_buf(),
        work,
        pidfile,
        child,
        hold,
    }
}

impl Upload {
    fn is_exec(&self) -> bool {
        matches!(self.kind, Kind::ExecCat | Kind::ExecTar)
    }

    /// After a fault: the destination is untouched, the server left no temp file, an exec's
    /// whole process group is gone (so its work file no longer grows) — then tidy the script's
    /// work file, which tar and cat leave behind under OpenSSH too.
    fn assert_untouched(&self) {
        let what = format!("{:?} to {}", self.kind, self.dest.display());
        let now = std::fs::read(&self.dest).unwrap();
        assert!(
            now == OLD,
            "{what}: destination changed ({} bytes now)",
            now.len()
        );
        let dir = self.dest.parent().unwrap();
        wait_until(&format!("{what}: temp file removed"), T, || {
            hidden_files(dir).iter().all(|n| !n.ends_with(".tm-upload"))
        });
        if self.is_exec() {
            group_gone(&self.pidfile);
            let _ = std::fs::remove_file(&self.work);
        }
    }
}

/// Upload `src` to `dest` in full with `kind` straight to the server; check the digest.
fn upload_completes(s: &Sidecar, kind: Kind, src: &Source, dest: &Path) {
    let mut up = start_upload(s, s.ssh.port(), kind, src, dest, None, None);
    drop(up.hold.take()); // EOF after the stream
    let status = wait_timeout(&mut up.child, T).expect("upload finished");
    assert!(status.success(), "{kind:?} upload failed: {status:?}");
    assert_eq!(sha256(dest), src.digest, "{kind:?} upload content");
}

// ---------------------------------------------------------------------------------------------
// Disconnects

#[test]
fn client_killed_mid_exec_upload_kills_the_command_and_keeps_the_destination() {
    let s = Sidecar::start();
    let local = tempfile::tempdir().unwrap();
    let src = source(local.path(), 16 << 20, 1);
    for kind in [Kind::ExecCat, Kind::ExecTar] {
        let dest = s.root.join(format!("killed-{kind:?}"));
        std::fs::write(&dest, OLD).unwrap();
        // 6 MiB of the stream, then the client holds its stdin open: surely mid-transfer
        let up = start_upload(&s, s.ssh.port(), kind, &src, &dest, Some(6 << 20), None);
        let mut up = up;
        wait_until(&format!("{kind:?}: data reached the server"), T, || {
            size_of(&up.work) >= 4 << 20
        });
        kill9(&mut up.child);
        up.assert_untouched();
        still_serving(&s);
        upload_completes(&s, kind, &src, &dest);
    }
    still_serving(&s);
}

#[test]
fn tcp_reset_mid_upload_keeps_destinations_for_exec_scp_and_sftp() {
    let s = Sidecar::start();
    let local = tempfile::tempdir().unwrap();
    let src = source(local.path(), 24 << 20, 2);
    for kind in ALL_KINDS {
        let proxy = Proxy::start(s.ssh, ResetAfter::Up(6 << 20));
        let dest = s.root.join(format!("reset-{kind:?}"));
        std::fs::write(&dest, OLD).unwrap();
        let mut up = start_upload(&s, proxy.addr.port(), kind, &src, &dest, None, None);
        let status = wait_timeout(&mut up.child, T).expect("client gave up after the reset");
        assert!(
            !status.success(),
            "{kind:?} succeeded through a reset: {}",
            std::fs::read_to_string(&up.errlog).unwrap_or_default()
        );
        assert_eq!(
            proxy.resets(),
            1,
            "{kind:?}: the proxy reset the connection"
        );

        up.assert_untouched();
        still_serving(&s);
        upload_completes(&s, kind, &src, &dest);
    }
    still_serving(&s);
}

#[test]
fn tcp_reset_mid_download_ends_the_server_side_and_keeps_the_source() {
    let s = Sidecar::start();
    let big = s.root.join("big");
    write_random(&big, 24 << 20, 3);
    let digest = sha256(&big);
    let local = tempfile::tempdir().unwrap();
    // exec: tar -cf - on the server, the client reading stdout
    let proxy = Proxy::start(s.ssh, ResetAfter::Down(6 << 20));
    let pidfile = s.dir.path().join("tar-c.pid");
    let mut c = ssh_to(
        &s,
        proxy.addr.port(),
        &format!(
            "echo $$ > {}; exec tar -C {} -cf - big",
            pidfile.display(),
            s.root.display()
        ),
    );
    let mut child = quiet(&mut c).stdin(Stdio::null()).spawn().unwrap();
    let status = wait_timeout(&mut child, T).expect("ssh gave up after the reset");
    assert!(!status.success());
    assert_eq!(proxy.resets(), 1);
    group_gone(&pidfile);
    still_serving(&s);
    // scp in both protocols
    for legacy in [false, true] {
        let proxy = Proxy::start(s.ssh, ResetAfter::Down(6 << 20));
        let back = local.path().join(format!("back-{legacy}"));
        let mut c = scp_to(&s, proxy.addr.port(), legacy);
        c.arg(format!("{}:{}", user_at(), big.display())).arg(&back);
        let mut child = quiet(&mut c).stdin(Stdio::null()).spawn().unwrap();
        let status = wait_timeout(&mut child, T).expect("scp gave up after the reset");
        assert!(!status.success(), "scp (legacy {legacy}) succeeded");
        assert_eq!(proxy.resets(), 1);
        still_serving(&s);
    }
    assert_eq!(sha256(&big), digest, "the source is unchanged");
    assert!(hidden_files(&s.root).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Full filesystem

fn free_bytes(p: &Path) -> u64 {
    let v = rustix::fs::statvfs(p).unwrap();
    v.f_bavail * v.f_frsize
}

#[test]
fn full_disk_fails_exec_tar_exec_cat_and_sftp_cleanly_and_frees_the_space() {
    let fs = Tmpfs::mount("8m");
    let small = fs.path();
    let s = Sidecar::start_with(&["--transfer-root", small.to_str().unwrap()]);
    let local = tempfile::tempdir().unwrap();
    let big = source(local.path(), 12 << 20, 4);
    let dest = small.join("image");
    std::fs::write(&dest, OLD).unwrap();
    let free = free_bytes(&small);
    for kind in [Kind::Sftp, Kind::ExecTar, Kind::ExecCat] {
        let mut up = start_upload(&s, s.ssh.port(), kind, &big, &dest, None, None);
        drop(up.hold.take());
        let status = wait_timeout(&mut up.child, T).expect("upload ended");
        assert!(
            !status.success(),
            "{kind:?} into a full filesystem succeeded"
        );
        up.assert_untouched();
        if kind == Kind::ExecTar {
            let _ = std::fs::remove_dir_all(small.join("image.stage"));
        }
        // the failed upload's space is back (no temp file, no descriptor kept open)
        wait_until(&format!("{kind:?}: space returned"), T, || {
            free_bytes(&small) >= free
        });
        still_serving(&s);
    }
    // the error a user sees names the cause
    let out = s
        .ssh(&[&format!("cat > {}/x", small.display())])
        .stdin(std::fs::File::open(&big.file).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left on device"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(small.join("x")).unwrap();
    // once there is room, the same server takes a complete upload of every kind
    let fits = source(local.path(), 1 << 20, 5);
    for kind in ALL_KINDS {
        upload_completes(&s, kind, &fits, &dest);
        std::fs::write(&dest, OLD).unwrap();
        let _ = std::fs::remove_dir_all(small.join("image.stage"));
    }
    still_serving(&s);
}

// ---------------------------------------------------------------------------------------------
// An exec child killed with SIGKILL

#[test]
fn sigkill_of_an_exec_child_is_reported_like_sshd() {
    let s = Sidecar::start();
    let sshd = StockSshd::start(&std::fs::read_to_string(s.keys.join("authorized_keys")).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let key = s.client_key();
    let ssh_sshd = |cmd: &str| sshd.ssh(&key, &[cmd]);

    // Run `command` (which writes the pid to kill into `pidfile`), kill it, return the output.
    let killed = |mut c: Command, pidfile: &Path| {
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_until("the pid file", T, || {
            std::fs::read_to_string(pidfile).is_ok_and(|p| p.ends_with('\n'))
        });
        let pid: u32 = std::fs::read_to_string(pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        util::signal(pid, rustix::process::Signal::KILL);
        let out = child.wait_with_output().unwrap();
        std::fs::remove_file(pidfile).unwrap();
        out
    };
    // The command itself (bash execs sleep) dies of SIGKILL: exit-signal KILL; OpenSSH's
    // client then exits 255, under both servers.
    // A process the command waits for dies of SIGKILL: the shell sees 137 and goes on.
    for (command, code, stdout) in [
        ("echo $$ > {p}; exec sleep 600", 255, ""),
        (
            "sleep 600 & echo $! > {p}; wait $!; echo rc=$?",
            0,
            "rc=137\n",
        ),
    ] {
        let pidfile = tmp.path().join("pid");
        let command = command.replace("{p}", &pidfile.display().to_string());
        let ours = killed(s.ssh(&[&command]), &pidfile);
        let theirs = killed(ssh_sshd(&command), &pidfile);
        assert_eq!(ours.status.code(), Some(code), "{command}");
        assert_eq!(theirs.status.code(), Some(code), "{command} under sshd");
        assert_eq!(String::from_utf8_lossy(&ours.stdout), stdout);
        assert_eq!(ours.stdout, theirs.stdout);
    }
    // On the wire: exit-signal "KILL" and no exit-status, from both servers.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let k = sshc::load_key(&key);
    for (name, addr) in [
        ("tm-sidecar", s.ssh),
        ("sshd", SocketAddr::from(([127, 0, 0, 1], sshd.port))),
    ] {
        let pidfile = tmp.path().join(format!("{name}.pid"));
        let command = format!("echo $$ > {}; exec sleep 600", pidfile.display());
        let killer = {
            let pidfile = pidfile.clone();
            std::thread::spawn(move || {
                wait_until("the pid file", T, || {
                    std::fs::read_to_string(&pidfile).is_ok_and(|p| p.ends_with('\n'))
                });
                let pid = std::fs::read_to_string(&pidfile).unwrap();
                util::signal(pid.trim().parse().unwrap(), rustix::process::Signal::KILL);
            })
        };
        let got = rt.block_on(async {
            let conn = sshc::connect(addr, &common::me(), &k).await.unwrap();
            tokio::time::timeout(T, sshc::exec(&conn, &command, b""))
                .await
                .expect("channel closed")
                .unwrap()
        });
        killer.join().unwrap();
        assert!(
            matches!(got.exit_signal, Some(russh::Sig::KILL)),
            "{name}: {got:?}"
        );
        assert_eq!(got.exit_status, None, "{name}");
    }
    assert!(
        s.logs
            .wait_for(T, |l| l.contains("channel_closed")
                && l.contains("signal KILL"))
            .is_some(),
        "the audit line names the signal"
    );
    still_serving(&s);
}

// ---------------------------------------------------------------------------------------------
// monitord upstream down and back

/// onemonitord stand-in on TCP+UDP that can be stopped and started again on the same port.
struct Upstream {
    addr: SocketAddr,
    udp: Arc<Mutex<Vec<Vec<u8>>>>,
    tcp: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Upstream {
    fn start(addr: SocketAddr) -> Upstream {
        let tl = TcpListener::bind(addr).expect("upstream TCP bind");
        let addr = tl.local_addr().unwrap();
        let us = UdpSocket::bind(addr).expect("upstream UDP bind");
        us.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        tl.set_nonblocking(true).unwrap();
        let udp: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let tcp: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (u, st) = (Arc::clone(&udp), stop.clone());
        let t1 = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::SeqCst) {
                if let Ok(n) = us.recv(&mut buf) {
                    u.lock().unwrap().push(buf[..n].to_vec());
                }
            }
        });
        let (t, st) = (tcp.clone(), stop.clone());
        let t2 = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match tl.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                        let mut v = vec![];
                        let _ = std::io::Read::read_to_end(&mut c, &mut v);
                        t.lock().unwrap().push(v);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Upstream {
            addr,
            udp,
            tcp,
            stop,
            threads: vec![t1, t2],
        }
    }

    /// Close both sockets (the threads own them).
    fn stop(mut self) -> SocketAddr {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        self.addr
    }
}

#[test]
fn monitord_upstream_down_and_back_keeps_relaying() {
    use tm_sidecar::monitord::wire::{self, MsgType, Status};
    let msg = |ty: MsgType, host: i32, epoch: i64| {
        let payload = format!("VM = [ ID=\"{host}\", STATE=\"RUNNING\", EPOCH=\"{epoch}\" ]");
        wire::encode(ty, Status::Success, host, epoch, payload.as_bytes(), None).unwrap()
    };
    let up = Upstream::start("127.0.0.1:0".parse().unwrap());
    let s = Sidecar::start_with(&[
        "--monitord-upstream",
        &up.addr.to_string(),
        "--monitord-rate-limit",
        "0",
    ]);
    let to = s.monitord.unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let send_tcp = |m: &[u8]| {
        let mut c = std::net::TcpStream::connect(to).unwrap();
        c.write_all(m).unwrap();
    };
    let forwarded = |transport: &str, result: &str| {
        value(
            &metrics(&s),
            "tm_sidecar_monitord_forwarded_total",
            &[("transport", transport), ("result", result)],
        )
    };
    // up: both transports arrive
    let a = msg(MsgType::MonitorVm, 1, 1000);
    udp.send_to(&a, to).unwrap();
    send_tcp(&msg(MsgType::StateVm, 1, 1000));
    wait_until("delivery while up", T, || {
        up.udp.lock().unwrap().contains(&a) && up.tcp.lock().unwrap().len() == 1
    });
    // down: UDP is lost, TCP is queued, newest per host. One datagram at a time, so that each
    // is forwarded on its own: the upstream's ICMP "port unreachable" for one makes the kernel
    // fail the next send, which the relay counts (a burst goes out in one sendmmsg, and UDP
    // gives no other sign of loss).
    let addr = up.stop();
    let udp_errors = forwarded("udp", "error") + forwarded("udp", "dropped");
    for i in 0..20 {
        udp.send_to(&msg(MsgType::MonitorVm, 2, 2000 + i), to)
            .unwrap();
        wait_until("the UDP message counted", T, || {
            value(&metrics(&s), "tm_sidecar_monitord_messages_total", &[]) >= 3.0 + i as f64
        });
    }
    let mut newest = vec![];
    let mut counted = value(&metrics(&s), "tm_sidecar_monitord_messages_total", &[]);
    for epoch in 2000..2003 {
        for host in [1, 2] {
            let m = msg(MsgType::StateVm, host, epoch);
            send_tcp(&m);
            // one at a time, so that arrival order is sending order
            wait_until("the TCP message counted", T, || {
                value(&metrics(&s), "tm_sidecar_monitord_messages_total", &[]) > counted
            });
            counted += 1.0;
            if epoch == 2002 {
                newest.push(m);
            }
        }
    }
    wait_until("all messages counted", T, || {
        value(&metrics(&s), "tm_sidecar_monitord_messages_total", &[]) >= 2.0 + 20.0 + 6.0
    });
    wait_until("TCP delivery failing", T, || {
        forwarded("tcp", "error") >= 1.0
    });
    wait_until("UDP loss counted", T, || {
        forwarded("udp", "error") + forwarded("udp", "dropped") > udp_errors
    });
    assert_eq!(http_get(s.admin.unwrap(), "/healthz").0, 200);
    // back on the same address: the queue drains, UDP flows again
    let up = Upstream::start(addr);
    wait_until("queued TCP messages delivered", T, || {
        up.tcp.lock().unwrap().len() >= 2
            && value(&metrics(&s), "tm_sidecar_monitord_tcp_queue", &[]) == 0.0
    });
    let mut got = up.tcp.lock().unwrap().clone();
    got.sort();
    newest.sort();
    let show = |v: &[Vec<u8>]| {
        v.iter()
            .map(|m| String::from_utf8_lossy(&m[..m.len().min(40)]).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        got,
        newest,
        "only the newest message per host, byte-identical: got {:?}, want {:?}",
        show(&got),
        show(&newest)
    );
    let b = msg(MsgType::MonitorVm, 3, 3000);
    wait_until("UDP relayed again", T, || {
        udp.send_to(&b, to).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        up.udp.lock().unwrap().contains(&b)
    });
    assert_eq!(
        value(&metrics(&s), "tm_sidecar_monitord_tcp_queue", &[]),
        0.0
    );
    still_serving(&s);
    up.stop();
}

// ---------------------------------------------------------------------------------------------
// authorized_keys deleted at runtime

fn login(s: &Sidecar) -> std::process::Output {
    run(&mut s.ssh(&["true"]), T)
}

#[test]
fn authorized_keys_deleted_at_runtime_refuses_new_logins_only() {
    let s = Sidecar::start();
    let ak = s.keys.join("authorized_keys");
    let keys = std::fs::read(&ak).unwrap();
    // an open exec session and an idle ControlMaster connection
    let mut open = s
        .ssh(&["echo ready; read line; echo got $line"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut open_out = BufReader::new(open.stdout.take().unwrap());
    let mut first = String::new();
    open_out.read_line(&mut first).unwrap();
    assert_eq!(first, "ready\n");
    let ctl = s.dir.path().join("ctl");
    let mut master = Command::new("ssh")
        .args(s.ssh_opts())
        .args(["-M", "-N", "-o", "ControlPersist=no", "-S"])
        .arg(&ctl)
        .args(["-p", &s.ssh.port().to_string()])
        .arg(user_at())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let via_master = |cmd: &str| run(&mut common::mux_client(&ctl, cmd), T);
    wait_until("the master to be up", T, || {
        via_master("true").status.success()
    });

    std::fs::remove_file(&ak).unwrap();
    // new logins are refused once the deletion is seen (file watch)
    let deadline = Instant::now() + T;
    let refused = loop {
        let out = login(&s);
        if !out.status.success() {
            break out;
        }
        assert!(Instant::now() < deadline, "deleted keys still accepted");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(refused.status.code(), Some(255));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // authenticated connections keep working: the open session and new channels on the master
    open.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut open_out, &mut rest).unwrap();
    assert_eq!(rest, "got hello\n");
    assert!(wait_timeout(&mut open, T).unwrap().success());
    let out = via_master("echo still here");
    assert!(out.status.success());
    assert_eq!(out.stdout, b"still here\n");
    assert_eq!(http_get(s.admin.unwrap(), "/healthz").0, 200);

    // the restored file works again
    std::fs::write(&ak, &keys).unwrap();
    let deadline = Instant::now() + T;
    while !login(&s).status.success() {
        assert!(Instant::now() < deadline, "restored keys never accepted");
        std::thread::sleep(Duration::from_millis(200));
    }
    kill9(&mut master);
    assert!(
        s.logs.lines().iter().all(|l| !l.contains("panicked")),
        "{}",
        s.logs.lines().join("\n")
    );
    still_serving(&s);
}

// ---------------------------------------------------------------------------------------------
// SIGTERM under load

/// Length of the stream an exec kind sends for `src`.
fn src_len(src: &Source, kind: Kind) -> usize {
    match kind {
        Kind::ExecTar => src.tar.len(),
        _ => std::fs::metadata(&src.file).unwrap().len() as usize,
    }
}

/// A `.<name>.*.tm-upload` temp file with data exists next to `dest`.
fn temp_with_data(dest: &Path) -> bool {
    let prefix = format!(".{}.", dest.file_name().unwrap().to_string_lossy());
    std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .flatten()
        .any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix)
                && n.ends_with(".tm-upload")
                && e.metadata().is_ok_and(|m| m.len() > 0)
        })
}

#[test]
fn sigterm_under_load_finishes_or_discards_every_transfer_and_restarts_clean() {
    let grace = 8;
    // a dozen clients start at once from one address: give them the MaxStartups room an
    // operator would (sshd's 10:30:100 would early-drop some, as tests/limits.rs shows)
    let mut s = Sidecar::start_with(&[
        "--shutdown-grace",
        &grace.to_string(),
        "--max-startups",
        "1000:30:2000",
        "--per-source-max-startups",
        "999",
    ]);
    let local = tempfile::tempdir().unwrap();
    let short = source(local.path(), 3 << 20, 6);
    let long = source(local.path(), 48 << 20, 7);
    // Every kind twice, all in flight at SIGTERM: one that finishes within the grace time (an
    // exec whose client sends EOF only after the signal; scp/sftp of 3 MiB at ~1 MB/s) and one
    // that cannot (an exec whose client never finishes; 48 MiB at ~1 MB/s).
    let mut ups = vec![];
    for kind in ALL_KINDS {
        for (src, finishes) in [(&short, true), (&long, false)] {
            let dest = s.root.join(format!(
                "term-{kind:?}-{}",
                if finishes { "short" } else { "long" }
            ));
            std::fs::write(&dest, OLD).unwrap();
            let up = match kind {
                Kind::ExecCat | Kind::ExecTar => {
                    // the last KiB (tar's end-of-archive blocks) only after the signal
                    let first = if finishes {
                        src_len(src, kind) - 1024
                    } else {
                        4 << 20
                    };
                    start_upload(&s, s.ssh.port(), kind, src, &dest, Some(first), None)
                }
                _ => start_upload(&s, s.ssh.port(), kind, src, &dest, None, Some("8000")),
            };
            ups.push((up, src.digest.clone(), finishes));
        }
    }
    // logins keep arriving until the listener goes away
    let stop = Arc::new(AtomicBool::new(false));
    let logins = Arc::new(AtomicUsize::new(0));
    let login_loop = {
        let (stop, ok, port, opts) = (stop.clone(), logins.clone(), s.ssh.port(), s.ssh_opts());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let mut c = Command::new("ssh");
                c.args(&opts)
                    .args(["-p", &port.to_string()])
                    .arg(user_at())
                    .arg("true");
                if run(&mut c, T).status.success() {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let under_way = |up: &Upload| {
        if up.is_exec() {
            size_of(&up.work) > 0
        } else {
            temp_with_data(&up.dest)
        }
    };
    let deadline = Instant::now() + T;
    while !ups.iter().all(|(up, _, _)| under_way(up)) || logins.load(Ordering::SeqCst) == 0 {
        let late: Vec<_> = ups
            .iter()
            .filter(|(up, _, _)| !under_way(up))
            .map(|(up, _, _)| up.dest.display().to_string())
            .collect();
        assert!(
            Instant::now() < deadline,
            "not under way: {late:?}; {:?}",
            std::fs::read_dir(&s.root)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let admin = s.admin.unwrap();
    let signalled = Instant::now();
    util::signal(s.child.id(), rustix::process::Signal::TERM);
    wait_until("readiness to drop", T, || {
        http_get(admin, "/readyz").0 == 503
    });
    // the short execs' clients finish their streams now, during the drain
    for (up, _, finishes) in &mut ups {
        if *finishes {
            drop(up.hold.take());
        }
    }
    let status = wait_timeout(&mut s.child, T).expect("the server exits");
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(grace + 5 + 10),
        "exit took {took:?} with a {grace} s grace"
    );
    assert!(
        took >= Duration::from_secs(grace),
        "exit after {took:?}: the long transfers should have held it for the grace time"
    );
    stop.store(true, Ordering::SeqCst);
    login_loop.join().unwrap();
    for (mut up, digest, finishes) in ups {
        drop(up.hold.take());
        let st = wait_timeout(&mut up.child, T).expect("client ended");
        if finishes {
            assert!(st.success(), "{:?} short upload: {st:?}", up.kind);
            assert_eq!(sha256(&up.dest), digest, "{:?} short upload", up.kind);
        } else {
            assert!(!st.success(), "{:?} long upload finished?", up.kind);
            up.assert_untouched();
        }
    }
    assert!(
        hidden_files(&s.root).is_empty(),
        "{:?}",
        hidden_files(&s.root)
    );
    // a new server on the same root serves at once, and sees what the old one wrote
    let again = Sidecar::start_with(&["--transfer-root", s.root.to_str().unwrap()]);
    still_serving(&again);
    let out = run(
        &mut again.ssh(&[&format!("sha256sum < {}/term-Scp-short", s.root.display())]),
        T,
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&short.digest));
}
