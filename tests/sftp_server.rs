//! `sftp -b batch -D 'tm-sidecar sftp-server --transfer-root DIR'` with the real OpenSSH client.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tm-sidecar");

fn sftp_batch(root: &Path, home: &Path, batch: &str) -> std::process::Output {
    let batch_file = home.join("batch");
    std::fs::write(&batch_file, batch).unwrap();
    let server = format!(
        "{BIN} sftp-server --transfer-root {} --home {} -l INFO -f LOCAL0",
        root.display(),
        home.display()
    );
    let mut child = Command::new("sftp")
        .arg("-b")
        .arg(&batch_file)
        .arg("-D")
        .arg(server)
        .current_dir(home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sftp");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sftp timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn sftp_batch_runs_against_sftp_server() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    let data = random(3_000_000, 7);
    std::fs::write(home.join("local.bin"), &data).unwrap();
    // for reput: half of it already remote; for reget: half of it already local
    std::fs::write(root.join("half.bin"), &data[..1_000_000]).unwrap();
    std::fs::write(root.join("full.bin"), &data).unwrap();
    std::fs::write(home.join("partial.bin"), &data[..1_500_000]).unwrap();
    let r = root.display();
    let batch = format!(
        "cd {r}\n\
         put local.bin up.bin\n\
         get up.bin down.bin\n\
         ls -l\n\
         mkdir newdir\n\
         mkdir gone\n\
         rmdir gone\n\
         rename up.bin renamed.bin\n\
         ln -s renamed.bin link.bin\n\
         chmod 600 renamed.bin\n\
         df\n\
         reput local.bin half.bin\n\
         reget full.bin partial.bin\n\
         ls -l link.bin\n"
    );
    let out = sftp_batch(&root, &home, &batch);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sftp failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(std::fs::read(home.join("down.bin")).unwrap(), data);
    assert_eq!(std::fs::read(root.join("renamed.bin")).unwrap(), data);
    assert!(!root.join("up.bin").exists());
    assert!(root.join("newdir").is_dir());
    assert!(!root.join("gone").exists());
    assert_eq!(
        std::fs::read_link(root.join("link.bin")).unwrap(),
        Path::new("renamed.bin")
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(root.join("renamed.bin"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read(root.join("half.bin")).unwrap(),
        data,
        "reput completed the file"
    );
    assert_eq!(
        std::fs::read(home.join("partial.bin")).unwrap(),
        data,
        "reget completed the file"
    );
    assert!(
        stdout.contains("renamed.bin") || stdout.contains("up.bin"),
        "{stdout}"
    );
    assert!(stdout.contains("Avail"), "df output: {stdout}");
    // no temporary upload file left behind
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn sftp_server_refuses_paths_outside_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(dir.path().join("secret"), b"top secret").unwrap();
    std::os::unix::fs::symlink("../secret", root.join("escape")).unwrap();
    std::fs::write(home.join("x"), b"x").unwrap();
    let r = root.display();
    let batch = format!(
        "-get /etc/passwd p1\n\
         -get {r}/../../etc/passwd p2\n\
         -get {r}/escape p3\n\
         -get ../secret p4\n\
         -put x {r}/../planted\n\
         -put x /tmp/planted-by-test\n\
         -mkdir {r}/../newdir\n"
    );
    let out = sftp_batch(&root, &home, &batch);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in ["p1", "p2", "p3", "p4"] {
        assert!(!home.join(p).exists(), "{p} was downloaded");
    }
    assert!(!dir.path().join("planted").exists());
    assert!(!dir.path().join("newdir").exists());
    assert!(!Path::new("/tmp/planted-by-test").exists());
}
