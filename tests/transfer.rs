//! scp (SFTP mode and legacy -O) and sftp against the real server with the real OpenSSH clients:
//! sizes, sparse > 4 GiB, -r -p trees, odd names, confinement, atomicity when the client dies.

mod common;
#[path = "support/util.rs"]
mod util;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use util::sha256;

const T: Duration = Duration::from_secs(300);
/// scp in SFTP mode (the default of OpenSSH ≥ 9) and the legacy protocol.
const MODES: [&[&str]; 2] = [&[], &["-O"]];

fn mode_name(mode: &[&str]) -> &'static str {
    if mode.is_empty() { "sftp" } else { "legacy" }
}

/// The remote path as the user types it: legacy scp hands it to the remote shell unquoted, so
/// escape it for that shell with backslashes (which the client's own filename check, an
/// fnmatch of the requested name, also understands); SFTP mode sends it as is.
fn rpath(mode: &[&str], path: &Path) -> String {
    let p = path.display().to_string();
    if mode.is_empty() {
        return p;
    }
    let mut out = String::new();
    for c in p.chars() {
        if c.is_ascii() && !c.is_ascii_alphanumeric() && !"/._-".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn scp(s: &common::Sidecar, mode: &[&str], args: &[&str]) -> std::process::Output {
    common::run(s.scp().args(mode).args(args), T)
}

fn scp_ok(s: &common::Sidecar, mode: &[&str], args: &[&str]) {
    let out = scp(s, mode, args);
    assert!(
        out.status.success(),
        "scp {:?} {:?} failed ({:?}): {}",
        mode,
        args,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_random(path: &Path, size: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut left = size;
    let mut block = vec![0u8; 1 << 16];
    while left > 0 {
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

fn hidden_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn scp_upload_and_download_sizes_both_modes() {
    let s = common::Sidecar::start();
    let local = tempfile::tempdir().unwrap();
    for (i, size) in [0u64, 1, 1 << 20, 256 << 20].into_iter().enumerate() {
        let src = local.path().join(format!("src-{size}"));
        write_random(&src, size, i as u64 + 1);
        let want = sha256(&src);
        for mode in MODES {
            let name = format!("{}-{size}", mode_name(mode));
            let remote = s.root.join("1").join(&name);
            std::fs::create_dir_all(s.root.join("1")).unwrap();
            scp_ok(
                &s,
                mode,
                &[src.to_str().unwrap(), &s.remote(rpath(mode, &remote))],
            );
            assert_eq!(sha256(&remote), want, "upload {name}");
            // the tm_cache shape: scp fe:/<root>/1/<hash> <local>
            let back = local.path().join(format!("back-{name}"));
            scp_ok(
                &s,
                mode,
                &[&s.remote(rpath(mode, &remote)), back.to_str().unwrap()],
            );
            assert_eq!(sha256(&back), want, "download {name}");
            std::fs::remove_file(&back).unwrap();
            std::fs::remove_file(&remote).unwrap();
        }
        std::fs::remove_file(&src).unwrap();
    }
    assert!(hidden_files(&s.root.join("1")).is_empty());
}

#[test]
fn scp_sparse_file_over_4gib_both_modes() {
    let s = common::Sidecar::start();
    let local = tempfile::tempdir().unwrap();
    let size: u64 = (4 << 30) + 12345;
    let sparse = s.root.join("sparse.img");
    {
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 1 << 32).unwrap();
        f.write_all_at(b"tail", size - 4).unwrap();
    }
    let want = sha256(&sparse);
    for mode in MODES {
        let back = local.path().join("back.img");
        scp_ok(
            &s,
            mode,
            &[&s.remote(rpath(mode, &sparse)), back.to_str().unwrap()],
        );
        assert_eq!(std::fs::metadata(&back).unwrap().len(), size);
        assert_eq!(sha256(&back), want, "download ({})", mode_name(mode));
        let up = s.root.join(format!("up-{}.img", mode_name(mode)));
        scp_ok(
            &s,
            mode,
            &[back.to_str().unwrap(), &s.remote(rpath(mode, &up))],
        );
        std::fs::remove_file(&back).unwrap();
        assert_eq!(sha256(&up), want, "upload ({})", mode_name(mode));
        std::fs::remove_file(&up).unwrap();
    }
}

fn make_tree(base: &Path) {
    std::fs::create_dir_all(base.join("tree/sub/deeper")).unwrap();
    std::fs::write(base.join("tree/a.txt"), b"alpha").unwrap();
    std::fs::write(base.join("tree/sub/run.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::write(base.join("tree/sub/deeper/z"), b"zzz").unwrap();
    let set = |p: &str, mode: u32, mtime: i64| {
        let p = base.join(p);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let t = std::time::UNIX_EPOCH + Duration::from_secs(mtime as u64);
        let f = std::fs::File::open(&p).unwrap();
        f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))
            .unwrap();
    };
    set("tree/a.txt", 0o640, 1_500_000_000);
    set("tree/sub/run.sh", 0o755, 1_500_000_100);
    set("tree/sub/deeper/z", 0o600, 1_500_000_200);
    set("tree/sub/deeper", 0o750, 1_500_000_300);
    set("tree/sub", 0o700, 1_500_000_400);
    set("tree", 0o755, 1_500_000_500);
}

fn check_tree(base: &Path) {
    for (p, mode, mtime) in [
        ("tree/a.txt", 0o640, 1_500_000_000),
        ("tree/sub/run.sh", 0o755, 1_500_000_100),
        ("tree/sub/deeper/z", 0o600, 1_500_000_200),
        ("tree/sub/deeper", 0o750, 1_500_000_300),
        ("tree/sub", 0o700, 1_500_000_400),
        ("tree", 0o755, 1_500_000_500),
    ] {
        let md = std::fs::metadata(base.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!(md.mode() & 0o7777, mode, "{} mode of {p}", base.display());
        assert_eq!(md.mtime(), mtime, "{} mtime of {p}", base.display());
    }
    assert_eq!(
        std::fs::read(base.join("tree/sub/deeper/z")).unwrap(),
        b"zzz"
    );
}

#[test]
fn scp_recursive_preserve_trees_both_modes() {
    let s = common::Sidecar::start();
    let local = tempfile::tempdir().unwrap();
    make_tree(local.path());
    for mode in MODES {
        let dest = s.root.join(mode_name(mode));
        std::fs::create_dir_all(&dest).unwrap();
        let src = local.path().join("tree");
        scp_ok(
            &s,
            mode,
            &[
                "-r",
                "-p",
                src.to_str().unwrap(),
                &s.remote(rpath(mode, &dest)),
            ],
        );
        check_tree(&dest);
        let back = local.path().join(format!("back-{}", mode_name(mode)));
        std::fs::create_dir_all(&back).unwrap();
        scp_ok(
            &s,
            mode,
            &[
                "-r",
                "-p",
                &s.remote(rpath(mode, &dest.join("tree"))),
                back.to_str().unwrap(),
            ],
        );
        check_tree(&back);
    }
}

#[test]
fn scp_odd_names_both_modes() {
    let s = common::Sidecar::start();
    let local = tempfile::tempdir().unwrap();
    let names = [
        "with space",
        "single'quote",
        "double\"quote",
        "ünïcødé ✓",
        "$(touch pwned)",
        "`touch pwned2`",
        "-leading-dash",
        "semi;colon&amp|pipe",
        "star*glob?",
    ];
    for mode in MODES {
        let dest = s.root.join(mode_name(mode));
        std::fs::create_dir_all(&dest).unwrap();
        for (i, name) in names.iter().enumerate() {
            let src = local.path().join(name);
            std::fs::write(&src, format!("content {i}")).unwrap();
            // upload into a directory: the name travels in the protocol
            scp_ok(
                &s,
                mode,
                &["--", src.to_str().unwrap(), &s.remote(rpath(mode, &dest))],
            );
            assert_eq!(
                std::fs::read(dest.join(name)).unwrap_or_default(),
                format!("content {i}").into_bytes(),
                "{name} ({})",
                mode_name(mode)
            );
            // download by that name
            let back = local.path().join(format!("back-{i}"));
            scp_ok(
                &s,
                mode,
                &[
                    "--",
                    &s.remote(rpath(mode, &dest.join(name))),
                    back.to_str().unwrap(),
                ],
            );
            assert_eq!(
                std::fs::read(&back).unwrap(),
                format!("content {i}").into_bytes(),
                "{name}"
            );
            std::fs::remove_file(&src).unwrap();
        }
    }
    for dir in [
        s.home.clone(),
        s.root.clone(),
        local.path().to_path_buf(),
        PathBuf::from("."),
    ] {
        assert!(
            !dir.join("pwned").exists() && !dir.join("pwned2").exists(),
            "command ran in {}",
            dir.display()
        );
    }
}

#[test]
fn scp_confinement_both_modes() {
    let s = common::Sidecar::start();
    let local = tempfile::tempdir().unwrap();
    std::fs::write(s.dir.path().join("secret"), b"top secret").unwrap();
    std::os::unix::fs::symlink("../secret", s.root.join("escape")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", s.root.join("abs-escape")).unwrap();
    let upload = local.path().join("x");
    std::fs::write(&upload, b"x").unwrap();
    for mode in MODES {
        for bad in [
            PathBuf::from("/etc/passwd"),
            s.root.join("../../etc/passwd"),
            PathBuf::from("../../etc/passwd"),
            s.root.join("escape"),
            s.root.join("abs-escape"),
            s.root.join("../secret"),
        ] {
            let back = local.path().join("stolen");
            let out = scp(
                &s,
                mode,
                &[&s.remote(rpath(mode, &bad)), back.to_str().unwrap()],
            );
            assert!(
                !out.status.success(),
                "{} ({}) was served",
                bad.display(),
                mode_name(mode)
            );
            assert!(!back.exists() || std::fs::read(&back).unwrap().is_empty());
            let _ = std::fs::remove_file(&back);
        }
        for bad in [
            s.root.join("../planted"),
            s.dir.path().join("planted2"),
            s.root.join("escape"),
        ] {
            let out = scp(
                &s,
                mode,
                &[upload.to_str().unwrap(), &s.remote(rpath(mode, &bad))],
            );
            assert!(
                !out.status.success(),
                "upload to {} ({}) worked",
                bad.display(),
                mode_name(mode)
            );
        }
        assert!(!s.dir.path().join("planted").exists());
        assert!(!s.dir.path().join("planted2").exists());
        assert_eq!(
            std::fs::read(s.dir.path().join("secret")).unwrap(),
            b"top secret"
        );
    }
    assert!(
        s.logs
            .wait_for(Duration::from_secs(5), |l| l.contains("transfer refused"))
            .is_some(),
        "a log line for refused paths"
    );
}

/// Wait (bounded) until `pred` holds.
fn wait_until(timeout: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if pred() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    pred()
}

fn temp_file_with_data(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        let e = e.unwrap();
        e.file_name().to_string_lossy().ends_with(".tm-upload")
            && e.metadata().map(|m| m.len() > 0).unwrap_or(false)
    })
}

fn kill9(child: &mut std::process::Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    let _ = child.wait();
}

#[test]
fn killed_uploads_leave_the_old_destination_and_no_temp_file() {
    let s = common::Sidecar::start();
    let local = tempfile::tempdir().unwrap();
    let big = local.path().join("big");
    write_random(&big, 64 << 20, 9);
    let dest = s.root.join("image");
    std::fs::write(&dest, b"previous image").unwrap();

    // scp in SFTP mode and -O, limited to ~2 MB/s so they are surely half-way when killed
    for mode in MODES {
        let mut child = s
            .scp()
            .args(mode)
            .args([
                "-l",
                "16000",
                big.to_str().unwrap(),
                &s.remote(dest.display().to_string()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(60), || temp_file_with_data(&s.root)),
            "upload started ({})",
            mode_name(mode)
        );
        kill9(&mut child);
        assert!(
            wait_until(Duration::from_secs(30), || hidden_files(&s.root).is_empty()),
            "temp file removed ({})",
            mode_name(mode)
        );
        assert_eq!(std::fs::read(&dest).unwrap(), b"previous image");
    }

    // sftp put
    let batch = local.path().join("batch");
    std::fs::write(
        &batch,
        format!("put {} {}\n", big.display(), dest.display()),
    )
    .unwrap();
    let mut child = s
        .sftp()
        .args(["-l", "16000", "-b"])
        .arg(&batch)
        .arg(format!("{}@127.0.0.1", common::me()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || temp_file_with_data(&s.root)),
        "sftp upload started"
    );
    kill9(&mut child);
    assert!(
        wait_until(Duration::from_secs(30), || hidden_files(&s.root).is_empty()),
        "temp file removed"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), b"previous image");
}

#[test]
fn sftp_session_through_the_server() {
    let s = common::Sidecar::start();
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("f"), b"hello").unwrap();
    let batch = local.path().join("batch");
    let r = s.root.display();
    std::fs::write(
        &batch,
        format!(
            "cd {r}\nput {l}/f f\nmkdir d\nrename f d/g\nls -l d\nln -s d/g lnk\nchmod 600 d/g\ndf\nget lnk {l}/back\n",
            l = local.path().display()
        ),
    )
    .unwrap();
    let mut cmd = s.sftp();
    cmd.arg("-b")
        .arg(&batch)
        .arg(format!("{}@127.0.0.1", common::me()));
    let out = common::run(&mut cmd, T);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(local.path().join("back")).unwrap(), b"hello");
    assert_eq!(
        std::fs::metadata(s.root.join("d/g")).unwrap().mode() & 0o777,
        0o600
    );
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn full_filesystem_gives_a_clear_error_and_no_temp_file() {
    let Some(fs) = Tmpfs::mount("2m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs CAP_SYS_ADMIN)");
        return;
    };
    let small = fs.0.path().to_path_buf();
    let s = common::Sidecar::start_with(&["--transfer-root", small.to_str().unwrap()]);
    let local = tempfile::tempdir().unwrap();
    let big = local.path().join("big");
    write_random(&big, 4 << 20, 3);
    let dest = small.join("image");
    std::fs::write(&dest, b"previous image").unwrap();
    for mode in MODES {
        let out = scp(
            &s,
            mode,
            &[big.to_str().unwrap(), &s.remote(rpath(mode, &dest))],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "upload to a full filesystem succeeded ({})",
            mode_name(mode)
        );
        assert!(
            stderr.contains("No space left on device") || stderr.contains("Failure"),
            "clear error ({}): {stderr}",
            mode_name(mode)
        );
        assert!(
            wait_until(Duration::from_secs(30), || hidden_files(&small).is_empty()),
            "no temp file ({})",
            mode_name(mode)
        );
        assert!(
            std::fs::read(&dest).unwrap() == b"previous image",
            "destination changed ({}): {stderr}",
            mode_name(mode)
        );
    }
}

#[test]
fn scp_follows_absolute_links_that_stay_inside_the_roots() {
    // OpenNebula's `ln` leaves `<system ds>/<vm>/disk.0 -> /<image ds>/<hash>` (absolute), and
    // datastores are often links to mounts; both must work when the target is inside a root.
    let mount = tempfile::tempdir().unwrap();
    let s = common::Sidecar::start_with(&["--transfer-root", &mount.path().display().to_string()]);
    std::fs::create_dir_all(s.root.join("1")).unwrap();
    std::fs::create_dir_all(s.root.join("0/5")).unwrap();
    std::fs::create_dir_all(mount.path().join("100")).unwrap();
    write_random(&s.root.join("1/abcd"), 300_000, 7);
    std::os::unix::fs::symlink(s.root.join("1/abcd"), s.root.join("0/5/disk.0")).unwrap();
    std::os::unix::fs::symlink(mount.path().join("100"), s.root.join("100")).unwrap();
    let local = tempfile::tempdir().unwrap();
    for mode in MODES {
        let name = mode_name(mode);
        let back = local.path().join(format!("disk-{name}"));
        scp_ok(
            &s,
            mode,
            &[
                &s.remote(rpath(mode, &s.root.join("0/5/disk.0"))),
                &back.display().to_string(),
            ],
        );
        assert_eq!(sha256(&back), sha256(&s.root.join("1/abcd")), "{name}");
        // upload into the linked datastore lands on the mount
        scp_ok(
            &s,
            mode,
            &[
                &back.display().to_string(),
                &s.remote(rpath(mode, &s.root.join(format!("100/{name}")))),
            ],
        );
        assert_eq!(
            sha256(&mount.path().join(format!("100/{name}"))),
            sha256(&back),
            "{name}"
        );
    }
    assert!(hidden_files(&mount.path().join("100")).is_empty());
}
