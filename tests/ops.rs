//! Operations: admin endpoints, graceful drain on SIGTERM, hot reload of authorized_keys.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::admin::{http_get, metrics, scrape_value, value};
use common::{Sidecar, run, wait_timeout};

const T: Duration = Duration::from_secs(120);

#[test]
fn endpoints_answer_and_counters_move() {
    let s = Sidecar::start();
    let admin = s.admin.expect("admin address");
    assert_eq!(http_get(admin, "/healthz").0, 200);
    assert_eq!(http_get(admin, "/readyz").0, 200);
    let (code, hosts) = http_get(admin, "/api/v1/hosts");
    assert_eq!(code, 200);
    assert!(serde_json::from_str::<serde_json::Value>(&hosts).is_ok());
    let before = metrics(&s);

    // a login with an exec, an scp upload (legacy protocol) and a monitord message
    assert!(run(&mut s.ssh(&["exit 3"]), T).status.code() == Some(3));
    let src = s.dir.path().join("up");
    std::fs::write(&src, vec![1u8; 1000]).unwrap();
    let up = run(
        s.scp().arg("-O").arg(&src).arg(s.remote(s.root.join("up"))),
        T,
    );
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let sent = run(
        Command::new(common::BIN)
            .args(["monitord-send", "--udp", "--host", "127.0.0.1", "--port"])
            .arg(s.monitord.expect("monitord").port().to_string())
            .args(["--type", "BEACON_HOST", "--host-id", "7"])
            .stdin(Stdio::null()),
        T,
    );
    assert!(sent.status.success());
    let deadline = Instant::now() + T;
    let after = loop {
        let m = metrics(&s);
        if value(&m, "tm_sidecar_monitord_messages_total", &[]) >= 1.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "monitord message not counted");
        std::thread::sleep(Duration::from_millis(20));
    };
    let moved = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(
        moved("tm_sidecar_ssh_channels_total", &[("kind", "exec")]),
        1.0
    );
    assert_eq!(
        moved("tm_sidecar_ssh_channels_total", &[("kind", "scp")]),
        1.0
    );
    assert_eq!(
        moved(
            "tm_sidecar_ssh_exec_completions_total",
            &[("class", "failure")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "tm_sidecar_ssh_auth_attempts_total",
            &[("method", "publickey"), ("result", "accepted")]
        ),
        2.0
    );
    assert_eq!(
        moved(
            "tm_sidecar_transfer_bytes_total",
            &[("protocol", "scp"), ("direction", "upload")]
        ),
        1000.0
    );
    assert_eq!(
        moved(
            "tm_sidecar_monitord_messages_total",
            &[("type", "BEACON_HOST")]
        ),
        1.0
    );
    // process figures are there and plausible
    let rss = value(&after, "tm_sidecar_process_resident_memory_bytes", &[]);
    assert!(rss > 1e6 && rss < 1e9, "rss {rss}");
    assert!(value(&after, "tm_sidecar_process_open_fds", &[]) >= 3.0);
    assert!(value(&after, "tm_sidecar_process_uptime_seconds", &[]) > 0.0);
    assert!(value(&after, "tm_sidecar_process_start_time_seconds", &[]) > 1.7e9);
    assert!(
        after
            .iter()
            .any(|m| m.name == "tm_sidecar_process_cpu_seconds_total")
    );
}

#[test]
fn audit_lines_carry_fingerprint_command_exit_and_escape_control_characters() {
    let s = Sidecar::start();
    let out = run(
        &mut s.ssh(&["printf abc; : '\u{1b}[31m\nsecond line'; exit 5"]),
        T,
    );
    assert_eq!(out.status.code(), Some(5));
    let fp = run(Command::new("ssh-keygen").arg("-lf").arg(s.client_key()), T);
    let fp = String::from_utf8_lossy(&fp.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let login = s
        .logs
        .wait_for(T, |l| l.contains("\"login\""))
        .expect("login line");
    assert!(login.contains(&fp), "{login} lacks {fp}");
    let line = s
        .logs
        .wait_for(T, |l| l.contains("\"channel_closed\""))
        .expect("channel line");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let command = v["command"].as_str().unwrap();
    assert!(
        !command.contains('\u{1b}') && !command.contains('\n'),
        "{command:?}"
    );
    assert!(
        command.contains("\\u{1b}[31m") && command.contains("\\nsecond line"),
        "{command:?}"
    );
    assert_eq!(v["exit"].as_str(), Some("5"));
    assert_eq!(v["bytes_out"].as_u64(), Some(3));
}

#[test]
fn sigterm_drains_running_sessions_then_exits_zero() {
    let mut s = Sidecar::start_with(&["--shutdown-grace", "60"]);
    let admin = s.admin.unwrap();
    let mut long = s
        .ssh(&["sleep 6; exit 7"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut transfers = vec![];
    for i in 0..5 {
        let dst = s.root.join(format!("t{i}"));
        let mut c = s.ssh(&[&format!("sleep 2; cat > {}", dst.display())]);
        let mut child = c.stdin(Stdio::piped()).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&vec![b'x'; 4 << 20]);
        });
        transfers.push((dst, child));
    }
    // all six sessions are running once their channels are counted
    let deadline = Instant::now() + T;
    loop {
        if scrape_value(&s, "tm_sidecar_ssh_channels_active", &[("kind", "exec")]) >= 6.0 {
            break;
        }
        assert!(Instant::now() < deadline, "sessions did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = rustix::process::Pid::from_raw(s.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    // readiness drops and new connections are refused while the old ones finish
    let deadline = Instant::now() + T;
    while http_get(admin, "/readyz").0 != 503 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    // The listeners close right after readiness drops (not in the same instant): poll.
    while std::net::TcpStream::connect(s.ssh).is_ok() {
        assert!(
            Instant::now() < deadline,
            "new SSH connections must be refused"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        long.try_wait().unwrap().is_none(),
        "refusal must come while the old sessions still run"
    );
    assert_eq!(wait_timeout(&mut long, T).unwrap().code(), Some(7));
    for (dst, mut child) in transfers {
        assert!(wait_timeout(&mut child, T).unwrap().success());
        assert_eq!(std::fs::metadata(dst).unwrap().len(), 4 << 20);
    }
    let status = wait_timeout(&mut s.child, T).expect("exits after draining");
    assert!(status.success(), "{status:?}");
}

fn logs_in(s: &Sidecar, key: &std::path::Path) -> bool {
    let mut c = Command::new("ssh");
    c.args(common::ssh_client_opts(key))
        .args(["-p", &s.ssh.port().to_string()])
        .arg(format!("{}@127.0.0.1", common::me()))
        .arg("true");
    run(&mut c, T).status.success()
}

#[test]
fn authorized_keys_reload_on_change_and_on_sighup() {
    let s = Sidecar::start();
    let (k2, pub2) = common::make_key(s.dir.path(), "second");
    assert!(!logs_in(&s, &k2));
    // Secret-style layout: the configured path is a symlink through ..data
    let ak = s.keys.join("authorized_keys");
    let original = std::fs::read_to_string(&ak).unwrap();
    // appended key works without restart (file watch)
    std::fs::write(&ak, format!("{original}{pub2}")).unwrap();
    let deadline = Instant::now() + T;
    while !logs_in(&s, &k2) {
        assert!(Instant::now() < deadline, "appended key never accepted");
        std::thread::sleep(Duration::from_millis(200));
    }
    // an open session with the second key survives its removal
    let mut open = Command::new("ssh");
    open.args(common::ssh_client_opts(&k2))
        .args(["-p", &s.ssh.port().to_string()])
        .arg(format!("{}@127.0.0.1", common::me()))
        .arg("echo ready; read line; echo got $line");
    let mut open = open
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut open_out = std::io::BufReader::new(open.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut open_out, &mut first).unwrap();
    assert_eq!(first, "ready\n", "the session with the second key is open");
    std::fs::write(&ak, &original).unwrap();
    let pid = rustix::process::Pid::from_raw(s.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    let deadline = Instant::now() + T;
    while logs_in(&s, &k2) {
        assert!(Instant::now() < deadline, "removed key still accepted");
        std::thread::sleep(Duration::from_millis(200));
    }
    open.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let mut rest = String::new();
    open_out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "got hello\n");
    assert!(wait_timeout(&mut open, T).unwrap().success());
    // a broken new file (a directory in its place) keeps the old keys; a deleted one revokes
    // them (tests/faults.rs)
    std::fs::remove_file(&ak).unwrap();
    std::fs::create_dir(&ak).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
    s.logs
        .wait_for(T, |l| l.contains("reload failed"))
        .expect("failed reload is logged");
    assert!(logs_in(&s, &s.client_key()));
}

#[test]
fn secret_style_symlink_swap_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let keys = common::keygen(dir.path());
    // /secret/..data -> ..v1 ; /secret/authorized_keys -> ..data/authorized_keys
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(secret.join("..v1")).unwrap();
    std::fs::copy(
        keys.join("authorized_keys"),
        secret.join("..v1/authorized_keys"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v1", secret.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/authorized_keys", secret.join("authorized_keys")).unwrap();
    let s = Sidecar::start_with(&[
        "--authorized-keys",
        &secret.join("authorized_keys").display().to_string(),
    ]);
    let (k2, pub2) = common::make_key(dir.path(), "rotated");
    assert!(!logs_in(&s, &k2));
    std::fs::create_dir_all(secret.join("..v2")).unwrap();
    std::fs::write(secret.join("..v2/authorized_keys"), pub2).unwrap();
    std::os::unix::fs::symlink("..v2", secret.join("..data_tmp")).unwrap();
    std::fs::rename(secret.join("..data_tmp"), secret.join("..data")).unwrap();
    let deadline = Instant::now() + T;
    while !logs_in(&s, &k2) {
        assert!(Instant::now() < deadline, "swapped Secret never picked up");
        std::thread::sleep(Duration::from_millis(200));
    }
}
