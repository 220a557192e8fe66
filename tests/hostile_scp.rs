//! Hostile legacy-scp peers against the real server: `ssh fe 'scp -t DIR'` / `'scp -f PATH'`
//! with hand-made protocol bytes on stdin. Every case gets an in-band error (`\x01scp: ...`) and
//! a non-zero exit status, nothing is written or read outside the transfer root, no temporary
//! upload file is left behind, and the server keeps serving.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{Sidecar, outside_state, run};

const T: Duration = Duration::from_secs(60);

struct Env {
    sc: Sidecar,
    root: PathBuf,
}

const SENTINEL: &[u8] = b"sentinel: never sent, never changed\n";

/// A server whose root holds a file and two symlinks pointing at a sentinel outside it.
fn env() -> Env {
    let sc = Sidecar::start();
    let root = sc.root.clone();
    let outside = sc.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("sentinel"), SENTINEL).unwrap();
    std::fs::write(root.join("f"), b"old contents\n").unwrap();
    std::os::unix::fs::symlink("../outside", root.join("up")).unwrap();
    std::os::unix::fs::symlink(outside.join("sentinel"), root.join("abs")).unwrap();
    Env { sc, root }
}

impl Env {
    fn r(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.root.display().to_string()
        } else {
            format!("{}/{rel}", self.root.display())
        }
    }

    /// Run `command` remotely with `input` on stdin: (exit code, what the server sent).
    fn scp(&self, command: &str, input: &[u8]) -> (i32, Vec<u8>) {
        let mut child = self
            .sc
            .ssh(&[command])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        // The server may stop reading after a fatal error: a broken pipe is fine.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = stdout.read_to_end(&mut v);
            v
        });
        let status = common::wait_timeout(&mut child, T).expect("ssh finished in time");
        let _ = writer.join();
        (status.code().unwrap_or(-1), reader.join().unwrap())
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn still_serves(&self) {
        let out = run(&mut self.sc.ssh(&["echo alive"]), T);
        assert_eq!(out.stdout, b"alive\n");
    }
}

fn has_error(out: &[u8]) -> bool {
    out.windows(6).any(|w| w == b"\x01scp: ")
}

fn no_temp_files(root: &Path) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.ends_with(".tm-upload"), "temporary file left: {name}");
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
}

/// (case name, scp flags, stream from the source)
type Case<'a> = (&'a str, &'a str, Vec<u8>);

/// Run sink cases against the root: each must fail with an in-band error, leave the root as it
/// was (when `root_unchanged`) and everything outside untouched.
fn sink_cases(e: &Env, cases: &[Case<'_>], root_unchanged: bool) {
    for (name, flags, input) in cases {
        let before_root = e.names();
        let before_out = outside_state(e.sc.dir.path(), &e.root);
        let (code, out) = e.scp(&format!("scp {flags} -t {}", e.r("")), input);
        assert_ne!(code, 0, "{name}: exit status");
        assert!(has_error(&out), "{name}: no error record in {out:?}");
        if root_unchanged {
            assert_eq!(e.names(), before_root, "{name}: the root changed");
        }
        assert_eq!(
            std::fs::read(e.root.join("f")).unwrap(),
            b"old contents\n",
            "{name}"
        );
        no_temp_files(&e.root);
        assert_eq!(
            outside_state(e.sc.dir.path(), &e.root),
            before_out,
            "{name}: something outside the root changed"
        );
    }
    e.still_serves();
}

#[test]
fn sink_refuses_names_that_are_not_one_plain_component() {
    let e = env();
    let c = |name: &'static str, flags: &'static str, input: &[u8]| (name, flags, input.to_vec());
    sink_cases(
        &e,
        &[
            c("dotdot_dir", "-r", b"D0755 0 ..\nC0644 4 x\nevil\0E\n"),
            c("dot_dir", "-r", b"D0755 0 .\nC0644 4 x\nevil\0E\n"),
            c("dotdot_file", "", b"C0644 4 ..\nevil\0"),
            c("slash_in_name", "", b"C0644 4 ../outside/x\nevil\0"),
            c(
                "absolute_name",
                "",
                b"C0644 4 /tmp/tm-sidecar-hostile\nevil\0",
            ),
            c("empty_name", "", b"C0644 4 \nevil\0"),
            c(
                "escape_sequence_name",
                "",
                b"C0644 4 a\x1b]0;pwn\x07b\nevil\0",
            ),
            c("carriage_return_name", "", b"C0644 4 a\rb\nevil\0"),
            c("delete_char_name", "", b"C0644 4 a\x7fb\nevil\0"),
            c("nul_in_name", "", b"C0644 4 a\0b\nevil\0"),
        ],
        true,
    );
    assert!(!Path::new("/tmp/tm-sidecar-hostile").exists());
}

#[test]
fn sink_refuses_targets_and_symlinks_outside_the_root() {
    let e = env();
    let outside = e.sc.dir.path().join("outside");
    for (name, target, flags, input) in [
        (
            "target_absolute_outside",
            "/etc".to_string(),
            "",
            &b"C0644 4 x\nevil\0"[..],
        ),
        ("target_dotdot", e.r("../outside"), "", b"C0644 4 x\nevil\0"),
        (
            "target_symlinked_dir",
            e.r("up"),
            "",
            b"C0644 4 sentinel\nevil\0",
        ),
        (
            "target_symlinked_dir_d",
            e.r("up"),
            "-d",
            b"C0644 4 sentinel\nevil\0",
        ),
        ("target_symlink_file", e.r("abs"), "", b"C0644 4 x\nevil\0"),
        ("file_over_symlink_out", e.r(""), "", b"C0644 4 abs\nevil\0"),
        (
            "dir_through_symlink",
            e.r(""),
            "-r",
            b"D0755 0 up\nC0644 4 sentinel\nevil\0E\n",
        ),
    ] {
        let before = outside_state(e.sc.dir.path(), &e.root);
        let (code, out) = e.scp(&format!("scp {flags} -t {target}"), input);
        assert_ne!(code, 0, "{name}");
        assert!(has_error(&out), "{name}: {out:?}");
        assert_eq!(
            outside_state(e.sc.dir.path(), &e.root),
            before,
            "{name}: something outside the root changed"
        );
        assert_eq!(std::fs::read(outside.join("sentinel")).unwrap(), SENTINEL);
        assert!(!outside.join("x").exists() && !Path::new("/etc/x").exists());
        no_temp_files(&e.root);
    }
    e.still_serves();
}

#[test]
fn sink_survives_size_lies_and_truncated_streams() {
    let e = env();
    let c = |name: &'static str, input: Vec<u8>| (name, "", input);
    let mut long_record = b"C0644 5 ".to_vec();
    long_record.extend(std::iter::repeat_n(b'a', 20_000));
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    sink_cases(
        &e,
        &[
            c("short_body", b"C0644 100 img\n0123456789".to_vec()),
            c(
                "huge_size_short_body",
                b"C0644 9223372036854775807 img\n01234".to_vec(),
            ),
            c(
                "size_overflow",
                b"C0644 99999999999999999999 img\nx\0".to_vec(),
            ),
            c(
                "size_beyond_i64",
                b"C0644 9223372036854775808 img\nx\0".to_vec(),
            ),
            c("negative_size", b"C0644 -1 img\nx\0".to_vec()),
            c("size_with_junk", b"C0644 10x img\n0123456789\0".to_vec()),
            c("bad_mode", b"C06x4 1 img\nx\0".to_vec()),
            c("long_mode", b"C00644 1 img\nx\0".to_vec()),
            c("truncated_record", b"C0644 5 img".to_vec()),
            c("record_too_long", long_record),
            c("binary_garbage", garbage),
            c("unknown_record", b"Q junk\n".to_vec()),
            c("overwrite_cut_short", b"C0644 100 f\nshort".to_vec()),
        ],
        true,
    );
    // The source reports its own read error after the data: the file is discarded.
    let (code, _) = e.scp(
        &format!("scp -t {}", e.r("")),
        b"C0644 3 f\nabc\x01scp: f: Input/output error\n",
    );
    assert_ne!(code, 0);
    assert_eq!(std::fs::read(e.root.join("f")).unwrap(), b"old contents\n");
    no_temp_files(&e.root);
}

#[test]
fn sink_bounds_recursion_and_refuses_bad_directory_streams() {
    let e = env();
    let deep: Vec<u8> = (0..200)
        .flat_map(|i| format!("D0755 0 d{i}\n").into_bytes())
        .collect();
    let c = |name: &'static str, flags: &'static str, input: Vec<u8>| (name, flags, input);
    sink_cases(
        &e,
        &[
            c("directory_without_r", "", b"D0755 0 d\nE\n".to_vec()),
            c("bad_e_record", "-r", b"D0755 0 d\nEXTRA\n".to_vec()),
            c(
                "bad_times_usec",
                "-p",
                b"T1 2000000 3 0\nC0644 1 t\nx\0".to_vec(),
            ),
            c("bad_times_fields", "-p", b"T1 0 3\nC0644 1 t\nx\0".to_vec()),
        ],
        false,
    );
    let (code, out) = e.scp(&format!("scp -r -t {}", e.r("")), &deep);
    assert_ne!(code, 0);
    assert!(String::from_utf8_lossy(&out).contains("too deep"));
    // Depth stops at the limit, inside the root.
    let mut depth = 0;
    let mut p = e.root.clone();
    while p.join(format!("d{depth}")).is_dir() {
        p = p.join(format!("d{depth}"));
        depth += 1;
    }
    assert_eq!(depth, 128);
    // Extra E records at the top end the transfer without writing anything.
    let before = e.names();
    let (code, _) = e.scp(&format!("scp -r -t {}", e.r("")), b"E\nE\nE\n");
    assert_eq!(code, 0);
    assert_eq!(e.names(), before);
    e.still_serves();
}

#[test]
fn source_refuses_paths_outside_the_root() {
    let e = env();
    let outside = e.sc.dir.path().join("outside");
    let acks = [0u8; 16];
    for (name, command) in [
        ("absolute_outside", "scp -f /etc/passwd".to_string()),
        ("dotdot", format!("scp -f {}", e.r("../outside/sentinel"))),
        ("symlink_file_out", format!("scp -f {}", e.r("abs"))),
        ("symlinked_dir", format!("scp -f {}", e.r("up/sentinel"))),
        (
            "symlinked_dir_recursive",
            format!("scp -r -f {}", e.r("up")),
        ),
        ("glob_through_symlink", format!("scp -f {}", e.r("up/*"))),
        (
            "glob_matching_symlink",
            format!("scp -r -f {}", e.r("*/sentinel")),
        ),
        (
            "tilde_home_outside",
            "scp -f ~/../outside/sentinel".to_string(),
        ),
        ("relative_to_home", "scp -f ../outside/sentinel".to_string()),
    ] {
        let (code, out) = e.scp(&command, &acks);
        assert_ne!(code, 0, "{name}");
        assert!(has_error(&out), "{name}: {out:?}");
        let text = String::from_utf8_lossy(&out);
        assert!(
            !text.contains("sentinel: never sent") && !text.contains("root:"),
            "{name}: outside content was sent"
        );
    }
    assert_eq!(std::fs::read(outside.join("sentinel")).unwrap(), SENTINEL);
    e.still_serves();
}
