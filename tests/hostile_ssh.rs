//! Hostile or odd SSH peers get a clean refusal or close and never affect other connections.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Sidecar, run};

const T: Duration = Duration::from_secs(120);

fn still_serves(s: &Sidecar) {
    let out = run(&mut s.ssh(&["echo alive"]), T);
    assert_eq!(
        out.stdout,
        b"alive\n",
        "server stopped serving: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn garbage_instead_of_a_banner_is_closed() {
    let s = Sidecar::start();
    let mut c = std::net::TcpStream::connect(s.ssh).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let mut banner = [0u8; 64];
    let n = c.read(&mut banner).unwrap();
    assert!(banner[..n].starts_with(b"SSH-2.0-tm-sidecar"));
    let _ = c.write_all(&[0xffu8; 70000]);
    let _ = c.write_all(b"\r\n");
    // the server closes: read returns EOF (or a reset) within the timeout instead of hanging
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    still_serves(&s);
}

#[test]
fn a_one_mebibyte_exec_string_is_refused_cleanly() {
    let s = Sidecar::start();
    // ssh joins its arguments into one exec string: 9 × 120 KiB (each under the kernel's
    // per-argument limit) make a command of more than 1 MiB.
    let chunk = "x".repeat(120 << 10);
    let mut args = vec!["echo"];
    args.extend(std::iter::repeat_n(chunk.as_str(), 9));
    let out = run(&mut s.ssh(&args), T);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    still_serves(&s);
}

#[test]
fn odd_env_names_are_ignored() {
    let s = Sidecar::start();
    let mut c = Command::new("ssh");
    c.args(s.ssh_opts())
        .args([
            "-o",
            "SendEnv=LD_PRELOAD BASH_ENV LC_OK",
            "-p",
            &s.ssh.port().to_string(),
        ])
        .arg(format!("{}@127.0.0.1", common::me()))
        .arg("echo \"[$LD_PRELOAD][$BASH_ENV][$LC_OK]\"")
        .env("LD_PRELOAD", "/tmp/evil.so")
        .env("BASH_ENV", "/tmp/evil.sh")
        .env("LC_OK", "fine");
    let out = run(&mut c, T);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[][][fine]\n");
}

#[test]
fn disconnect_mid_stream_kills_the_command_and_leaves_others_alone() {
    let s = Sidecar::start();
    let marker = s.dir.path().join("still-running");
    let mut child = s
        .ssh(&[&format!("cat > /dev/null; touch {}", marker.display())])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&vec![0u8; 1 << 20]).unwrap();
    // kill the client mid-stream: the server must kill `cat` (not let it see EOF and go on)
    child.kill().unwrap();
    let _ = child.wait();
    drop(stdin);
    s.logs
        .wait_for(T, |l| l.contains("\"channel_closed\""))
        .expect("channel ended");
    assert!(
        !marker.exists(),
        "the command went on after the client vanished"
    );
    still_serves(&s);
}

#[test]
fn interactive_shell_gets_a_pty() {
    let s = Sidecar::start();
    let mut c = Command::new("ssh");
    c.args(s.ssh_opts())
        .args(["-tt", "-p", &s.ssh.port().to_string()])
        .arg(format!("{}@127.0.0.1", common::me()))
        .arg("tty >/dev/null && echo has-tty; exit 3");
    let out = run(&mut c, T);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("has-tty"));
}

// ---------------------------------------------------------------------------------------------
// Raw transport abuse before key exchange

/// Read until the server closes; true if it did (EOF or reset), false on the read timeout.
fn closed_by_server(c: &mut std::net::TcpStream) -> bool {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// One unencrypted SSH binary packet (before NEWKEYS there is no MAC).
fn plain_packet(payload: &[u8]) -> Vec<u8> {
    let mut pad = 8 - (payload.len() + 5) % 8;
    if pad < 4 {
        pad += 8;
    }
    let mut p = ((payload.len() + pad + 1) as u32).to_be_bytes().to_vec();
    p.push(pad as u8);
    p.extend_from_slice(payload);
    p.extend(std::iter::repeat_n(0u8, pad));
    p
}

#[test]
fn a_2_gib_packet_length_before_key_exchange_is_dropped() {
    let s = Sidecar::start();
    let mut c = std::net::TcpStream::connect(s.ssh).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(b"SSH-2.0-hostile\r\n").unwrap();
    let _ = c.write_all(&[0x7f, 0xff, 0xff, 0xff, 4, 20]);
    let _ = c.write_all(&[0u8; 4096]);
    assert!(closed_by_server(&mut c), "connection left open");
    let peak = common::peak_rss_kib(s.child.id());
    assert!(peak > 0 && peak < 256 * 1024, "peak RSS {peak} KiB");
    still_serves(&s);
}

#[test]
fn a_kexinit_with_huge_bogus_name_lists_is_refused() {
    let s = Sidecar::start();
    let mut c = std::net::TcpStream::connect(s.ssh).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(b"SSH-2.0-hostile\r\n").unwrap();
    let names: Vec<String> = (0..20_000).map(|i| format!("bogus-{i}@x")).collect();
    let list = names.join(",");
    let mut kexinit = vec![20u8];
    kexinit.extend_from_slice(&[7u8; 16]);
    for _ in 0..10 {
        kexinit.extend_from_slice(&(list.len() as u32).to_be_bytes());
        kexinit.extend_from_slice(list.as_bytes());
    }
    kexinit.extend_from_slice(&[0, 0, 0, 0, 0]);
    let _ = c.write_all(&plain_packet(&kexinit));
    assert!(closed_by_server(&mut c), "connection left open");
    still_serves(&s);
}

#[test]
fn a_flood_of_unauthenticated_connections_does_not_lock_out_logins() {
    let s = Sidecar::start();
    let mut held = Vec::new();
    for i in 0..300 {
        let mut c = std::net::TcpStream::connect(s.ssh).unwrap();
        if i % 2 == 0 {
            let _ = c.write_all(b"SSH-2.0-idle\r\n");
        }
        held.push(c);
    }
    // The flood's own address is early-dropped past --max-startups (as sshd would); another
    // host still gets in (tests/limits.rs covers the per-source weighting in detail).
    let out = run(
        Command::new("ssh")
            .args(common::ssh_client_opts(&s.client_key()))
            .args(["-b", "127.0.0.2", "-p", &s.ssh.port().to_string()])
            .arg(format!("{}@127.0.0.1", common::me()))
            .arg("echo alive"),
        T,
    );
    assert_eq!(
        out.stdout,
        b"alive\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(held);
    // Once the server has seen the flood go away, its address gets in again.
    let deadline = std::time::Instant::now() + T;
    while run(&mut s.ssh(&["true"]), T).status.code() != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood's address stays locked out"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// Requests OpenSSH's client would not send (russh client)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_flood_is_capped_at_max_sessions() {
    let s = Sidecar::start_with(&["--max-sessions", "4"]);
    let h = common::russh_login(&s).await;
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..50 {
        match h.channel_open_session().await {
            Ok(ch) => open.push(ch),
            Err(_) => refused += 1,
        }
    }
    assert_eq!((open.len(), refused), (4, 46));
    // Closing one frees a slot, and the slots work.
    let first = open.remove(0);
    first.close().await.unwrap();
    drop(first);
    let mut ch = tokio::time::timeout(T, async {
        loop {
            if let Ok(ch) = h.channel_open_session().await {
                break ch;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a slot frees up");
    ch.exec(true, "echo slot").await.unwrap();
    let (out, _, status, _) = common::russh_collect(&mut ch, T).await;
    assert_eq!((out.as_slice(), status), (&b"slot\n"[..], Some(0)));
    // Other connections are not affected.
    let h2 = common::russh_login(&s).await;
    assert!(h2.channel_open_session().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_on_a_started_channel_is_refused() {
    let s = Sidecar::start();
    let h = common::russh_login(&s).await;
    let mut ch = h.channel_open_session().await.unwrap();
    ch.exec(true, "cat").await.unwrap();
    ch.exec(true, "echo second").await.unwrap();
    ch.request_subsystem(true, "sftp").await.unwrap();
    ch.request_pty(true, "xterm", 80, 24, 0, 0, &[])
        .await
        .unwrap();
    ch.data_bytes(&b"only cat runs\n"[..]).await.unwrap();
    ch.eof().await.unwrap();
    let (out, _, status, failures) = common::russh_collect(&mut ch, T).await;
    assert_eq!(out, b"only cat runs\n");
    assert_eq!(status, Some(0));
    assert_eq!(
        failures, 3,
        "exec, subsystem and pty after the start are refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_strings_with_nul_and_invalid_utf8_fail_cleanly() {
    let s = Sidecar::start();
    let h = common::russh_login(&s).await;
    let mut ch = h.channel_open_session().await.unwrap();
    ch.exec(true, &b"echo a\0; touch /tmp/tm-sidecar-nul"[..])
        .await
        .unwrap();
    let (_, err, status, _) = common::russh_collect(&mut ch, T).await;
    assert_eq!(status, Some(127), "{}", String::from_utf8_lossy(&err));
    assert!(!std::path::Path::new("/tmp/tm-sidecar-nul").exists());
    let mut ch = h.channel_open_session().await.unwrap();
    ch.exec(true, &b"printf '%s' '\xff\xfe\x80'"[..])
        .await
        .unwrap();
    let (out, _, status, _) = common::russh_collect(&mut ch, T).await;
    assert_eq!((out.as_slice(), status), (&b"\xff\xfe\x80"[..], Some(0)));
    drop(h);
    still_serves(&s);
}

/// `n` env requests (and a few odd ones) on one channel before its exec.
async fn env_flood(s: &Sidecar, n: usize) {
    let h = common::russh_login(s).await;
    let mut ch = h.channel_open_session().await.unwrap();
    for i in 0..n {
        ch.set_env(false, format!("LC_X{i}"), "v").await.unwrap();
    }
    ch.set_env(false, "LC_BIG", "x".repeat(30_000))
        .await
        .unwrap();
    ch.set_env(false, "LD_PRELOAD", "/tmp/evil.so")
        .await
        .unwrap();
    ch.set_env(false, "LC_NUL", "a\0b").await.unwrap();
    ch.exec(
        true,
        "env | grep -c '^LC_'; echo \"[$LD_PRELOAD][${#LC_BIG}]\"",
    )
    .await
    .unwrap();
    let (out, _, status, _) = common::russh_collect(&mut ch, T).await;
    assert_eq!(status, Some(0));
    assert_eq!(String::from_utf8_lossy(&out), "64\n[][0]\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_request_flood_is_capped() {
    // 200 requests: over the 64-variable cap, under russh's per-channel queue (see below).
    let s = Sidecar::start();
    env_flood(&s, 200).await;
    still_serves(&s);
}

/// russh also queues every request of a not-yet-started channel in that channel's bounded
/// queue; the server empties it as it handles requests, so thousands of requests before exec
/// do not stall the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_request_flood_beyond_the_russh_queue_does_not_wedge_the_connection() {
    let s = Sidecar::start();
    env_flood(&s, 5000).await;
    still_serves(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pty_request_with_absurd_values_is_clamped() {
    let s = Sidecar::start();
    let h = common::russh_login(&s).await;
    let mut ch = h.channel_open_session().await.unwrap();
    let term = format!("xterm\x1b]0;pwn\x07{}", "A".repeat(10_000));
    let modes = [
        (russh::Pty::VINTR, u32::MAX),
        (russh::Pty::ECHO, 7),
        (russh::Pty::TTY_OP_ISPEED, u32::MAX),
    ];
    ch.request_pty(true, &term, u32::MAX, u32::MAX, u32::MAX, u32::MAX, &modes)
        .await
        .unwrap();
    ch.window_change(u32::MAX, 0, u32::MAX, 0).await.unwrap();
    ch.exec(true, "stty size; printf '%s' \"$TERM\" | wc -c")
        .await
        .unwrap();
    let (out, _, status, failures) = common::russh_collect(&mut ch, T).await;
    assert_eq!((status, failures), (Some(0), 0));
    let text = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = text.split(['\r', '\n']).filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 2, "{text:?}");
    assert!(lines[0].ends_with(" 65535"), "{text:?}");
    let term_len: usize = lines[1].trim().parse().unwrap();
    assert!(term_len <= 64, "TERM kept {term_len} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_x11_and_unknown_subsystems_are_refused() {
    let s = Sidecar::start();
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    let h = common::russh_login(&s).await;
    assert!(
        h.channel_open_direct_tcpip("127.0.0.1", u32::from(port), "127.0.0.1", 5555)
            .await
            .is_err(),
        "direct-tcpip opened"
    );
    assert!(
        h.channel_open_direct_streamlocal("/run/docker.sock")
            .await
            .is_err(),
        "direct-streamlocal opened"
    );
    assert!(
        h.tcpip_forward("127.0.0.1", 0).await.is_err(),
        "tcpip-forward"
    );
    target.set_nonblocking(true).unwrap();
    assert!(
        target.accept().is_err(),
        "something connected to the target"
    );
    let mut ch = h.channel_open_session().await.unwrap();
    ch.request_x11(true, false, "MIT-MAGIC-COOKIE-1", "00", 0)
        .await
        .unwrap();
    ch.request_subsystem(true, "nonesuch").await.unwrap();
    ch.request_subsystem(true, &"s".repeat(60_000))
        .await
        .unwrap();
    // The channel is still usable after the refusals.
    ch.exec(true, "echo still").await.unwrap();
    let (out, _, status, failures) = common::russh_collect(&mut ch, T).await;
    assert_eq!((out.as_slice(), status), (&b"still\n"[..], Some(0)));
    assert_eq!(failures, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authentication_flood_is_disconnected() {
    let s = Sidecar::start();
    let config = std::sync::Arc::new(russh::client::Config::default());
    let mut h = russh::client::connect(config, s.ssh, common::AnyHost)
        .await
        .unwrap();
    let mut outcome = Vec::new();
    for _ in 0..20 {
        let key = russh::keys::PrivateKey::random(
            &mut russh::keys::key::safe_rng(),
            russh::keys::Algorithm::Ed25519,
        )
        .unwrap();
        let r = h
            .authenticate_publickey(
                common::me(),
                russh::keys::PrivateKeyWithHashAlg::new(std::sync::Arc::new(key), None),
            )
            .await;
        let stop = !matches!(r, Ok(ref a) if !a.success());
        outcome.push(r.map(|a| a.success()).unwrap_or(false));
        if stop {
            break;
        }
    }
    assert!(outcome.iter().all(|ok| !ok), "a random key logged in");
    // MaxAuthTries-like cut-off: russh drops the connection after a handful of failures.
    assert!(outcome.len() <= 8, "{} attempts allowed", outcome.len());
    still_serves(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_flood_to_a_command_that_never_reads_is_flow_controlled() {
    let s = Sidecar::start();
    let h = common::russh_login(&s).await;
    let mut ch = h.channel_open_session().await.unwrap();
    ch.exec(true, "sleep 2; echo done").await.unwrap();
    let writer = ch.make_writer();
    let flood = tokio::spawn(async move {
        let mut w = writer;
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..256 {
            if tokio::io::AsyncWriteExt::write_all(&mut w, &chunk)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let (out, _, status, _) = common::russh_collect(&mut ch, T).await;
    assert_eq!((out.as_slice(), status), (&b"done\n"[..], Some(0)));
    flood.abort();
    let peak = common::peak_rss_kib(s.child.id());
    assert!(peak > 0 && peak < 256 * 1024, "peak RSS {peak} KiB");
    drop(h);
    still_serves(&s);
}

// ---------------------------------------------------------------------------------------------
// Agent socket abuse

/// `ssh-agent -D` holding the test key, killed on drop.
struct Agent {
    child: std::process::Child,
    sock: std::path::PathBuf,
}

impl Agent {
    fn start(dir: &std::path::Path, key: &std::path::Path) -> Agent {
        let sock = dir.join("client-agent.sock");
        let mut child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + T;
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "ssh-agent did not start"
            );
            if let Ok(Some(st)) = child.try_wait() {
                panic!("ssh-agent exited: {st}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let add = run(
            Command::new("ssh-add").arg(key).env("SSH_AUTH_SOCK", &sock),
            T,
        );
        assert!(add.status.success());
        Agent { child, sock }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forwarding_ssh(s: &Sidecar, agent: &Agent, cmd: &str) -> Command {
    // IdentityAgent=none (the tests' default) would also turn forwarding off.
    let opts = s.ssh_opts().into_iter().map(|o| {
        if o == "IdentityAgent=none" {
            format!("IdentityAgent={}", agent.sock.display())
        } else {
            o
        }
    });
    let mut c = Command::new("ssh");
    c.args(opts)
        .args(["-o", "ForwardAgent=yes"])
        .args(["-p", &s.ssh.port().to_string()])
        .arg(format!("{}@127.0.0.1", common::me()))
        .arg(cmd)
        .env("SSH_AUTH_SOCK", &agent.sock);
    c
}

#[test]
fn agent_socket_garbage_and_connection_floods_leave_forwarding_working() {
    use std::io::BufRead;
    use std::os::unix::net::UnixStream;
    let s = Sidecar::start();
    let agent = Agent::start(s.dir.path(), &s.client_key());
    // A session that prints its agent socket and then holds on stdin.
    let mut holder = forwarding_ssh(&s, &agent, "echo \"$SSH_AUTH_SOCK\"; exec cat >/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = holder.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let sock = std::path::PathBuf::from(rx.recv_timeout(T).expect("agent socket path").trim());
    assert!(sock.is_absolute(), "no agent socket: {sock:?}");

    // 64 connections at once (16 are relayed, the rest refused), garbage, a 2 GiB length
    // prefix, and connect/close churn.
    let held: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let mut junk = UnixStream::connect(&sock).unwrap();
    junk.set_read_timeout(Some(T)).unwrap();
    let _ = junk.write_all(&[0, 0, 0, 9, 0xff, 1, 2, 3, 4, 5, 6, 7, 8]);
    let mut huge = UnixStream::connect(&sock).unwrap();
    let _ = huge.write_all(&[0x7f, 0xff, 0xff, 0xff]);
    let _ = huge.write_all(&vec![0x42u8; 1 << 20]);
    for _ in 0..200 {
        drop(UnixStream::connect(&sock));
    }
    drop(held);
    drop((junk, huge));

    // The session ends normally, and forwarding still works for the next one.
    drop(holder.stdin.take());
    let st = common::wait_timeout(&mut holder, T).expect("holder session ends");
    assert!(st.success(), "{st}");
    let out = run(&mut forwarding_ssh(&s, &agent, "ssh-add -l"), T);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ED25519"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::wait_until(T, "the agent socket removed", || !sock.exists());
    let peak = common::peak_rss_kib(s.child.id());
    assert!(peak > 0 && peak < 256 * 1024, "peak RSS {peak} KiB");
    still_serves(&s);
}
