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
