//! Many sessions per connection (OpenSSH ControlMaster), as oned's 15 parallel TM actions use it.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::admin::scrape_value;
use common::{Sidecar, run, wait_timeout};

const T: Duration = Duration::from_secs(120);

/// Start a ControlMaster for the sidecar; returns the control socket path.
fn master(s: &Sidecar) -> (std::path::PathBuf, std::process::Child) {
    let ctl = s.dir.path().join("ctl.sock");
    let child = Command::new("ssh")
        .args(s.ssh_opts())
        .args(["-M", "-N", "-o", "ControlPersist=no", "-S"])
        .arg(&ctl)
        .args(["-p", &s.ssh.port().to_string()])
        .arg(format!("{}@127.0.0.1", common::me()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + T;
    loop {
        let check = Command::new("ssh")
            .args(["-S"])
            .arg(&ctl)
            .args(["-O", "check", "127.0.0.1"])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if check.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "master did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (ctl, child)
}

#[test]
fn fifteen_concurrent_sessions_keep_their_own_exit_codes() {
    let s = Sidecar::start();
    let (ctl, mut m) = master(&s);
    let mut children = vec![];
    for i in 0..15 {
        let cmd = if i % 3 == 0 {
            // long streams
            format!("head -c 64M /dev/zero | sha256sum >/dev/null; head -c 32M /dev/zero; exit {i}")
        } else {
            format!("echo session-{i}; exit {i}")
        };
        let child = common::mux_client(&ctl, &cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.push((i, child));
    }
    for (i, child) in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(i),
            "session {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i % 3 == 0 {
            assert_eq!(out.stdout.len(), 32 << 20);
        } else {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("session-{i}\n")
            );
        }
    }
    let _ = m.kill();
}

#[test]
fn a_stalled_channel_does_not_block_the_others() {
    let s = Sidecar::start();
    let (ctl, mut m) = master(&s);
    // Channel A pushes 16 MiB into a command that does not read stdin for 5 seconds.
    let data = s.dir.path().join("16m");
    std::fs::write(&data, vec![7u8; 16 << 20]).unwrap();
    let mut stalled = common::mux_client(&ctl, "sleep 5; cat >/dev/null; echo drained")
        .stdin(std::fs::File::open(&data).unwrap())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Channel B must complete while A is still sleeping (A needs at least 5 s).
    let out = run(&mut common::mux_client(&ctl, "echo fast"), T);
    assert_eq!(out.stdout, b"fast\n");
    assert!(
        stalled.try_wait().unwrap().is_none(),
        "the stalled channel finished first: B was blocked behind it"
    );
    let status = wait_timeout(&mut stalled, T).expect("stalled channel finishes");
    assert!(status.success());
    let _ = m.kill();
}

#[test]
fn sessions_past_the_cap_are_refused_cleanly() {
    let s = Sidecar::start_with(&["--max-sessions", "2"]);
    let (ctl, mut m) = master(&s);
    let mut a = common::mux_client(&ctl, "cat >/dev/null")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut b = common::mux_client(&ctl, "cat >/dev/null")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    // Once both hold their slots (they start asynchronously: wait for the server to count
    // them, so that no probe races them for a slot), a third session is refused.
    let deadline = std::time::Instant::now() + T;
    while scrape_value(&s, "tm_sidecar_ssh_channels_active", &[("kind", "exec")]) < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "sessions did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let probe = run(&mut common::mux_client(&ctl, "true"), T);
    assert!(!probe.status.success(), "a third session got through");
    assert!(
        s.logs
            .lines()
            .iter()
            .any(|l| l.contains("too many sessions"))
    );
    drop(a.stdin.take());
    drop(b.stdin.take());
    assert!(wait_timeout(&mut a, T).unwrap().success());
    assert!(wait_timeout(&mut b, T).unwrap().success());
    // after they end, new sessions work again
    assert!(
        run(&mut common::mux_client(&ctl, "true"), T)
            .status
            .success()
    );
    let _ = m.kill();
}
