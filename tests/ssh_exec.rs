//! Exec as OpenNebula's drivers use it, against the real binary with the real OpenSSH client,
//! compared with a stock sshd where the outcome must be identical.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Sidecar, StockSshd, run};

const T: Duration = Duration::from_secs(120);

/// Run `cmd` with `input` on stdin; returns (rc, stdout, stderr).
fn run_with_input(cmd: &mut Command, input: &[u8]) -> (i32, Vec<u8>, Vec<u8>) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (out.status.code().unwrap_or(-1), out.stdout, out.stderr)
}

/// The two servers side by side, both accepting the sidecar's client key.
struct Pair {
    fe: Sidecar,
    sshd: StockSshd,
}

impl Pair {
    fn new() -> Pair {
        let fe = Sidecar::start();
        let public = std::fs::read_to_string(fe.keys.join("authorized_keys")).unwrap();
        let sshd = StockSshd::start(&public);
        Pair { fe, sshd }
    }

    /// Run the same remote command with the same stdin on both; returns both results.
    fn both(&self, args: &[&str], input: &[u8]) -> [(i32, Vec<u8>, Vec<u8>); 2] {
        let a = run_with_input(&mut self.fe.ssh(args), input);
        let b = run_with_input(&mut self.sshd.ssh(&self.fe.client_key(), args), input);
        [a, b]
    }

    /// Same exit code and stdout on both servers (and same stderr unless told otherwise).
    fn same(&self, args: &[&str], input: &[u8]) -> (i32, Vec<u8>, Vec<u8>) {
        let [ours, theirs] = self.both(args, input);
        assert_eq!(
            ours.0,
            theirs.0,
            "exit code differs for {args:?}: stderr ours={:?} theirs={:?}",
            String::from_utf8_lossy(&ours.2),
            String::from_utf8_lossy(&theirs.2)
        );
        assert_eq!(
            String::from_utf8_lossy(&ours.1),
            String::from_utf8_lossy(&theirs.1),
            "stdout differs for {args:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&ours.2),
            String::from_utf8_lossy(&theirs.2),
            "stderr differs for {args:?}"
        );
        ours
    }
}

#[test]
fn exit_codes_propagate_like_openssh() {
    let p = Pair::new();
    for code in [0, 1, 42, 100] {
        let (rc, _, _) = p.same(&[&format!("exit {code}")], b"");
        assert_eq!(rc, code);
    }
    let (rc, _, _) = p.same(&["no-such-command-anywhere"], b"");
    assert_eq!(rc, 127);
    // Killed by a signal: OpenSSH's client reports 255 for exit-signal.
    let (rc, _, _) = p.same(&["kill -TERM $$"], b"");
    assert_eq!(rc, 255);
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let p = Pair::new();
    let (rc, out, err) = p.same(&["echo out; echo err >&2"], b"");
    assert_eq!(rc, 0);
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"err\n");
    // What `ssh fe '...' 2>/dev/null` gives a shell script.
    let out = run(
        Command::new("sh").arg("-c").arg(format!(
            "{} 2>/dev/null",
            shell_words::join(
                std::iter::once("ssh".to_string())
                    .chain(p.fe.ssh_opts())
                    .chain([
                        "-p".into(),
                        p.fe.ssh.port().to_string(),
                        format!("{}@127.0.0.1", common::me())
                    ])
                    .chain(["echo out; echo err >&2".to_string()])
            )
        )),
        T,
    );
    assert_eq!(out.stdout, b"out\n");
}

#[test]
fn environment_is_clean_and_complete() {
    let s = Sidecar::start();
    let out = run(&mut s.ssh(&["env"]), T);
    let env = String::from_utf8_lossy(&out.stdout);
    for var in [
        "HOME=",
        "USER=",
        "LOGNAME=",
        "SHELL=",
        "PATH=",
        "SSH_CLIENT=127.0.0.1 ",
        "SSH_CONNECTION=127.0.0.1 ",
    ] {
        assert!(
            env.lines().any(|l| l.starts_with(var)),
            "{var} missing in:\n{env}"
        );
    }
    assert!(env.contains(&format!("HOME={}", s.home.display())));
    // Nothing leaks from the server's own environment (RUST_LOG is set for the server).
    assert!(!env.contains("RUST_LOG"), "{env}");
    // cwd is the home directory
    let out = run(&mut s.ssh(&["pwd"]), T);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        s.home.display().to_string()
    );
    // SendEnv: LANG/LC_* pass, anything else is dropped
    let mut c2 = Command::new("ssh");
    c2.args(s.ssh_opts())
        .args([
            "-o",
            "SendEnv=LC_FOO LANG EVIL",
            "-p",
            &s.ssh.port().to_string(),
        ])
        .arg(format!("{}@127.0.0.1", common::me()))
        .arg("echo \"$LC_FOO|$LANG|$EVIL\"")
        .env("LC_FOO", "x")
        .env("LANG", "C.UTF-8")
        .env("EVIL", "y");
    let out = run(&mut c2, T);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x|C.UTF-8|\n");
}

fn random_file(dir: &std::path::Path, name: &str, mib: usize) -> std::path::PathBuf {
    let path = dir.join(name);
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {}M /dev/urandom > '{}'",
            mib,
            path.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    path
}

fn sha256(path: &std::path::Path) -> String {
    let out = run(Command::new("sha256sum").arg(path), T);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn large_streams_are_byte_exact() {
    let s = Sidecar::start();
    let data = random_file(s.dir.path(), "big.bin", 512);
    let want = sha256(&data);
    // 512 MiB of stdin into sha256sum
    let mut c = s.ssh(&["sha256sum"]);
    let out = c
        .stdin(std::fs::File::open(&data).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some(want.as_str())
    );
    // 512 MiB of stdout
    let copy = s.dir.path().join("copy.bin");
    let mut c = s.ssh(&[&format!("cat '{}'", data.display())]);
    let status = c
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&copy).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(sha256(&copy), want);
}

#[test]
fn opennebula_script_shapes_match_openssh() {
    let p = Pair::new();
    let dir = p.fe.dir.path().join("ds");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    // bash -s with a heredoc, as the TM drivers send it
    let script = format!(
        "export LANG=C\nexport LC_ALL=C\nset -e -o pipefail\n\
         if [ ! -d \"{d}/0/disk.0.snap\" ]; then mkdir -p \"{d}/0/disk.0.snap\"; fi\n\
         echo created\nls \"{d}/0\"\n"
    );
    let (rc, out, _) = p.same(&["bash", "-s"], script.as_bytes());
    assert_eq!(rc, 0);
    assert_eq!(String::from_utf8_lossy(&out), "created\ndisk.0.snap\n");
    // rm retry loop (delete)
    let script = format!(
        "TIMEOUT=0\nfor i in 1 2 3; do rm -rf \"{d}/0\" && break; sleep 1; done\n[ ! -e \"{d}/0\" ] && echo gone\n"
    );
    let (rc, out, _) = p.same(&["bash", "-s"], script.as_bytes());
    assert_eq!((rc, out.as_slice()), (0, b"gone\n".as_slice()));
    // a script exiting 42 (cpds)
    let (rc, _, _) = p.same(&["bash", "-s"], b"set -e\necho start >&2\nexit 42\n");
    assert_eq!(rc, 42);
    // mktemp -p prints the name on stdout
    let [ours, theirs] = p.both(&[&format!("mktemp -p \"{d}\"")], b"");
    assert_eq!((ours.0, theirs.0), (0, 0));
    for (_, out, _) in [&ours, &theirs] {
        let name = String::from_utf8_lossy(out).trim().to_string();
        assert!(
            name.starts_with(&d.to_string()) && std::path::Path::new(&name).is_file(),
            "{name}"
        );
    }
    // Multi-line 7.x Ruby helper script with PATH extension
    let (rc, out, _) = p.same(
        &["bash", "-s"],
        b"export PATH=$PATH:/usr/sbin:/sbin\nset -e\ncommand -v tar >/dev/null && echo tar-ok\n",
    );
    assert_eq!((rc, out.as_slice()), (0, b"tar-ok\n".as_slice()));
}

#[test]
fn tar_streams_in_and_out_keep_sparse_files() {
    let s = Sidecar::start();
    let src = s.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // a sparse 1 GiB image with some data
    let img = src.join("disk.0");
    let st = Command::new("sh").arg("-c").arg(format!(
        "truncate -s 1G '{0}' && printf hello | dd of='{0}' bs=1 seek=12345678 conv=notrunc 2>/dev/null",
        img.display()
    )).status().unwrap();
    assert!(st.success());
    let dst = s.root.join("0");
    std::fs::create_dir_all(&dst).unwrap();
    // hypervisor → fe: tar stream on stdin
    let pipeline = format!(
        "tar -C '{}' --sparse -cf - disk.0 | {} 'tar -C {} --sparse -xf -'",
        src.display(),
        ssh_line(&s),
        dst.display()
    );
    let out = run(Command::new("sh").arg("-c").arg(&pipeline), T);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256(&img), sha256(&dst.join("disk.0")));
    let blocks = |p: &std::path::Path| {
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap())
    };
    assert!(blocks(&dst.join("disk.0")) < 1024, "stayed sparse");
    // fe → hypervisor: tar on stdout
    let back = s.dir.path().join("back");
    std::fs::create_dir_all(&back).unwrap();
    let pipeline = format!(
        "{} 'tar -C {} -cSf - disk.0' | tar -C '{}' -xSf -",
        ssh_line(&s),
        dst.display(),
        back.display()
    );
    let out = run(Command::new("sh").arg("-c").arg(&pipeline), T);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256(&img), sha256(&back.join("disk.0")));
}

/// The ssh command line for this sidecar, for use inside `sh -c` pipelines.
fn ssh_line(s: &Sidecar) -> String {
    shell_words::join(
        std::iter::once("ssh".to_string())
            .chain(s.ssh_opts())
            .chain([
                "-p".into(),
                s.ssh.port().to_string(),
                format!("{}@127.0.0.1", common::me()),
            ]),
    )
}

#[test]
fn serve_dev_prints_a_working_ssh_command() {
    let cwd = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::BIN)
        .args([
            "serve",
            "--dev",
            "--ssh-listen",
            "127.0.0.1:0",
            "--monitord-listen",
            "off",
            "--admin-listen",
            "off",
        ])
        .current_dir(cwd.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.trim_start().starts_with("ssh ") {
                let _ = tx.send(line.trim().to_string());
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("serve --dev printed an ssh command");
    let out = run(
        Command::new("sh")
            .arg("-c")
            .arg(format!("{line} </dev/null"))
            .current_dir(cwd.path()),
        T,
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("hello from"),
        "{:?}",
        out
    );
}
