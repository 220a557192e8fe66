//! Pre-authentication limits against the real binary: per-source penalties, MaxStartups with a
//! held-open flood, max auth tries, login grace time and the unused-connection timeout.
//!
//! A second source address is simulated with `ssh -b 127.0.0.2` (all of 127/8 is loopback).

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::admin::{metrics, scrape_value, value};
use common::{Sidecar, make_key, run, ssh_client_opts, wait_timeout};

const T: Duration = Duration::from_secs(120);

/// `ssh` to the sidecar from source address `from` with identity files `keys` (tried in order).
fn ssh_from(s: &Sidecar, from: &str, keys: &[&Path], cmd: &str) -> Command {
    let mut c = Command::new("ssh");
    c.args(ssh_client_opts(keys[0]));
    for k in &keys[1..] {
        c.arg("-i").arg(k);
    }
    c.args(["-b", from, "-p", &s.ssh.port().to_string()])
        .arg(format!("{}@127.0.0.1", common::me()))
        .arg(cmd)
        .stdin(Stdio::null());
    c
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn failed_logins_get_a_source_refused_while_another_logs_in() {
    let s = Sidecar::start_with(&["--penalty-exempt", "none"]);
    let (bad, _) = make_key(s.dir.path(), "stranger");
    let good = s.client_key();
    for _ in 0..20 {
        let out = run(&mut ssh_from(&s, "127.0.0.1", &[&bad], "true"), T);
        assert_eq!(out.status.code(), Some(255));
    }
    // The source is refused now, even with the right key ...
    let out = run(&mut ssh_from(&s, "127.0.0.1", &[&good], "true"), T);
    assert_eq!(
        out.status.code(),
        Some(255),
        "penalised source got in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... while another source logs in normally.
    let out = run(&mut ssh_from(&s, "127.0.0.2", &[&good], "echo in"), T);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"in\n");
    let m = metrics(&s);
    assert_eq!(value(&m, "tm_sidecar_ssh_penalties_active", &[]), 1.0);
    // 3 failures × 5 s reach the 15 s minimum; the penalty is recorded when a connection
    // ends, so one more attempt may slip in before it: every attempt either failed to
    // authenticate or bounced, and most bounced.
    let refused = value(
        &m,
        "tm_sidecar_ssh_connections_refused_total",
        &[("reason", "penalty")],
    );
    let failed = value(
        &m,
        "tm_sidecar_ssh_connections_total",
        &[("outcome", "unauthenticated")],
    );
    assert_eq!(refused + failed, 21.0, "refused {refused}, failed {failed}");
    assert!(refused >= 15.0, "refused {refused}");
    assert!(
        s.logs
            .lines()
            .iter()
            .any(|l| l.contains("source penalised") && l.contains("AuthFailed"))
    );
}

#[test]
fn loopback_is_exempt_from_penalties_by_default() {
    let s = Sidecar::start();
    let (bad, _) = make_key(s.dir.path(), "stranger");
    for _ in 0..5 {
        let out = run(&mut ssh_from(&s, "127.0.0.1", &[&bad], "true"), T);
        assert_eq!(out.status.code(), Some(255));
    }
    let out = run(
        &mut ssh_from(&s, "127.0.0.1", &[&s.client_key()], "true"),
        T,
    );
    assert!(out.status.success());
    assert_eq!(
        scrape_value(&s, "tm_sidecar_ssh_penalties_active", &[]),
        0.0
    );
}

#[test]
fn two_hundred_held_open_unauthenticated_connections_do_not_lock_out_a_user() {
    let s = Sidecar::start();
    let mut flood = vec![];
    for _ in 0..200 {
        flood.push(TcpStream::connect(s.ssh).expect("connect"));
    }
    // Every flood connection has been either admitted or refused by the server.
    wait_until("the flood to be sorted", || {
        let m = metrics(&s);
        value(&m, "tm_sidecar_ssh_connections_active", &[])
            + value(&m, "tm_sidecar_ssh_connections_refused_total", &[])
            >= 200.0
    });
    let m = metrics(&s);
    let pending = value(&m, "tm_sidecar_ssh_connections_unauthenticated", &[]);
    assert!(pending >= 10.0, "only {pending} held");
    assert!(
        value(
            &m,
            "tm_sidecar_ssh_connections_refused_total",
            &[("reason", "per_source_startups")]
        ) > 0.0
    );
    // A hypervisor elsewhere still gets in, every time.
    for _ in 0..5 {
        let out = run(
            &mut ssh_from(&s, "127.0.0.2", &[&s.client_key()], "echo in"),
            T,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(flood);
}

#[test]
fn max_auth_tries_counts_rejected_keys_and_closes_the_connection() {
    let s = Sidecar::start_with(&["--max-auth-tries", "3"]);
    let keys: Vec<_> = (0..3)
        .map(|i| make_key(s.dir.path(), &format!("stranger{i}")).0)
        .collect();
    let good = s.client_key();
    // two wrong keys, then the right one: fine
    let out = run(
        &mut ssh_from(&s, "127.0.0.1", &[&keys[0], &keys[1], &good], "true"),
        T,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // three wrong keys first: disconnected before the right one is tried
    let out = run(
        &mut ssh_from(
            &s,
            "127.0.0.1",
            &[&keys[0], &keys[1], &keys[2], &good],
            "true",
        ),
        T,
    );
    assert_eq!(out.status.code(), Some(255));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Too many authentication failures"),
        "{stderr}"
    );
    wait_until("the outcome to be counted", || {
        scrape_value(
            &s,
            "tm_sidecar_ssh_connections_total",
            &[("outcome", "auth_tries_exceeded")],
        ) == 1.0
    });
}

#[test]
fn login_grace_time_closes_silent_connections_but_not_authenticated_ones() {
    let s = Sidecar::start_with(&["--login-grace-time", "2"]);
    // An authenticated session outlives the grace time (this once killed every session).
    let mut long = s.ssh(&["sleep 4; echo done"]);
    let long = long.stdout(Stdio::piped()).spawn().unwrap();
    // A silent connection is closed by the server.
    let mut silent = TcpStream::connect(s.ssh).unwrap();
    silent.set_read_timeout(Some(T)).unwrap();
    let mut buf = vec![];
    let _ = silent.read_to_end(&mut buf);
    assert!(buf.starts_with(b"SSH-2.0-tm-sidecar"), "{buf:?}");
    let out = long.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"done\n");
    wait_until("the outcome to be counted", || {
        scrape_value(
            &s,
            "tm_sidecar_ssh_connections_total",
            &[("outcome", "grace_exceeded")],
        ) == 1.0
    });
}

#[test]
fn unused_connections_are_closed_but_busy_ones_are_not() {
    let s = Sidecar::start_with(&["--unused-connection-timeout", "2"]);
    let busy = s
        .ssh(&["sleep 3; echo done"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // `ssh -N` opens no channel at all.
    let mut idle = s.ssh(&["-N"]).stdin(Stdio::null()).spawn().unwrap();
    let status = wait_timeout(&mut idle, T).expect("idle connection closed");
    assert!(!status.success());
    let out = busy.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"done\n");
    assert!(
        s.logs
            .lines()
            .iter()
            .any(|l| l.contains("closing unused connection"))
    );
}

#[test]
fn bad_limit_flags_stop_the_start_naming_the_flag() {
    let cwd = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (&["--max-startups", "10:30"][..], "--max-startups"),
        (&["--max-startups", "50:30:10"][..], "--max-startups"),
        (
            &["--per-source-max-startups", "10"][..],
            "--per-source-max-startups",
        ),
        (&["--login-grace-time", "0"][..], "--login-grace-time"),
        (&["--max-auth-tries", "0"][..], "--max-auth-tries"),
        (&["--penalty-exempt", "10.0.0.1/33"][..], "--penalty-exempt"),
        (&["--penalty-exempt", "example.com"][..], "--penalty-exempt"),
    ] {
        let out = run(
            Command::new(common::BIN)
                .args(["check-config", "--dev"])
                .args(args)
                .current_dir(cwd.path())
                .stdin(Stdio::null()),
            T,
        );
        assert!(!out.status.success(), "{args:?} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn a_tiny_input_budget_slows_uploads_down_but_loses_nothing() {
    // Every queued input byte holds a share of --max-input-buffer-mib: with 1 MiB for the whole
    // process, four parallel 24 MiB uploads take turns and all arrive intact.
    let s = Sidecar::start_with(&["--max-input-buffer-mib", "1"]);
    let data: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = s.dir.path().join("src");
    std::fs::write(&src, &data).unwrap();
    let children: Vec<_> = (0..4)
        .map(|i| {
            s.ssh(&[&format!("cat > {}/up{i}", s.root.display())])
                .stdin(std::fs::File::open(&src).unwrap())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, mut c) in children.into_iter().enumerate() {
        assert!(wait_timeout(&mut c, T).expect("upload finished").success());
        assert!(
            std::fs::read(s.root.join(format!("up{i}"))).unwrap() == data,
            "up{i}"
        );
    }
}
