//! scp::serve driven in-process over tokio::io::duplex with hand-made protocol bytes: hostile
//! sink records are refused and nothing is written outside the root.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tm_sidecar::transfer::{Transfer, scp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Env {
    dir: tempfile::TempDir,
    root: PathBuf,
    transfer: Arc<Transfer>,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    let mut reg = prometheus_client::registry::Registry::default();
    let transfer = Transfer::new(std::slice::from_ref(&root), dir.path(), false, &mut reg).unwrap();
    Env {
        dir,
        root,
        transfer,
    }
}

/// Everything under `dir`, sorted (to prove nothing else appeared).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Run `command` with `input` as the client's bytes; returns (exit status, server output).
async fn run(env: &Env, command: &str, input: &[u8]) -> (u32, Vec<u8>) {
    let cmd = scp::parse(command.as_bytes()).expect("command parses");
    let (mut client_in, server_in) = tokio::io::duplex(1 << 20);
    let (server_out, mut client_out) = tokio::io::duplex(1 << 20);
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        let _ = client_in.write_all(&input).await;
        let _ = client_in.shutdown().await;
    });
    let reader = tokio::spawn(async move {
        let mut v = Vec::new();
        let _ = client_out.read_to_end(&mut v).await;
        v
    });
    let status = tokio::time::timeout(
        Duration::from_secs(20),
        scp::serve(
            cmd,
            env.transfer.clone(),
            server_in,
            server_out,
            tokio::io::sink(),
        ),
    )
    .await
    .expect("scp::serve finishes");
    let _ = writer.await;
    let out = reader.await.unwrap();
    (status, out)
}

fn sink_cmd(env: &Env, flags: &str) -> String {
    format!("scp {flags} -t {}", env.root.display())
}

#[tokio::test]
async fn sink_accepts_a_file_and_a_tree() {
    let e = env();
    let mut input = b"C0640 5 hello\nworld\0".to_vec();
    input.extend_from_slice(b"D0755 0 dir\nT1600000000 0 1600000000 0\nC0600 3 f\nabc\0E\n");
    let (status, out) = run(&e, &sink_cmd(&e, "-r -p"), &input).await;
    assert_eq!(status, 0, "{}", String::from_utf8_lossy(&out));
    assert!(out.iter().all(|b| *b == 0), "only acks: {out:?}");
    assert_eq!(std::fs::read(e.root.join("hello")).unwrap(), b"world");
    assert_eq!(std::fs::read(e.root.join("dir/f")).unwrap(), b"abc");
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(e.root.join("dir/f")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o600);
    assert_eq!(md.mtime(), 1600000000);
    assert_eq!(tree(&e.root), vec!["dir", "dir/f", "hello", "sub"]);
}

#[tokio::test]
async fn hostile_sink_records_write_nothing_outside() {
    let cases: &[(&str, &[u8])] = &[
        ("-r", b"D0755 0 ..\nC0644 4 x\nevil\0E\n"),
        ("-r", b"D0755 0 .\nE\n"),
        ("", b"C0644 10 ../x\n0123456789\0"),
        ("", b"C0644 10 /abs\n0123456789\0"),
        ("", b"C0644 10 a/b\n0123456789\0"),
        ("", b"C0644 -10 x\n0123456789\0"),
        ("", b"C0644 99999999999999999999999 x\n0123456789\0"),
        ("", b"C00644 10 x\n0123456789\0"),
        ("", b"C0644 10 \n0123456789\0"),
        ("", b"C0644 10 a\x1b[31mb\n0123456789\0"),
        ("", b"D0755 0 dir\nE\n"), // directory without -r
        ("", b"Q junk\n"),
        ("", b"T1 2000000 3 0\n"),
    ];
    for (flags, input) in cases {
        let e = env();
        let before_outside = tree(e.dir.path());
        let (status, out) = run(&e, &sink_cmd(&e, flags), input).await;
        let shown = String::from_utf8_lossy(input);
        assert_eq!(status, 1, "{shown}");
        assert!(out.contains(&1), "an error record for {shown}: {out:?}");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("scp: "), "{text}");
        assert_eq!(tree(&e.root), vec!["sub"], "nothing written for {shown}");
        assert_eq!(
            tree(e.dir.path()),
            before_outside,
            "nothing written outside for {shown}"
        );
    }
}

#[tokio::test]
async fn sink_depth_is_bounded() {
    let e = env();
    let mut input = Vec::new();
    for i in 0..(scp::MAX_DEPTH + 5) {
        input.extend_from_slice(format!("D0755 0 d{i}\n").as_bytes());
    }
    let (status, out) = run(&e, &sink_cmd(&e, "-r"), &input).await;
    assert_eq!(status, 1);
    assert!(String::from_utf8_lossy(&out).contains("too deep"));
}

#[tokio::test]
async fn sink_target_outside_the_root_is_refused() {
    let e = env();
    let outside = e.dir.path().join("out");
    let cmd = format!("scp -t {}", outside.display());
    let (status, out) = run(&e, &cmd, b"C0644 1 x\nx\0").await;
    assert_eq!(status, 1);
    assert_eq!(out.first(), Some(&1u8));
    assert!(!outside.exists());
    let cmd = format!("scp -t {}/../out", e.root.display());
    let (status, _) = run(&e, &cmd, b"C0644 1 x\nx\0").await;
    assert_eq!(status, 1);
    assert!(!outside.exists());
    // -d needs a directory
    let cmd = format!("scp -d -t {}/nodir", e.root.display());
    let (status, _) = run(&e, &cmd, b"").await;
    assert_eq!(status, 1);
}

#[tokio::test]
async fn interrupted_sink_file_leaves_the_old_destination() {
    let e = env();
    std::fs::write(e.root.join("img"), b"old contents").unwrap();
    // 100 bytes announced, 10 sent, then end of input
    let (status, _) = run(&e, &sink_cmd(&e, ""), b"C0644 100 img\n0123456789").await;
    assert_eq!(status, 1);
    assert_eq!(std::fs::read(e.root.join("img")).unwrap(), b"old contents");
    assert_eq!(tree(&e.root), vec!["img", "sub"], "no temporary file left");
    // the source reports a read error after the data: also discarded
    let (status, _) = run(
        &e,
        &sink_cmd(&e, ""),
        b"C0644 3 img\nabc\x01scp: img: Input/output error\n",
    )
    .await;
    assert_eq!(status, 1);
    assert_eq!(std::fs::read(e.root.join("img")).unwrap(), b"old contents");
    assert_eq!(tree(&e.root), vec!["img", "sub"]);
}

#[tokio::test]
async fn source_sends_files_trees_and_globs() {
    let e = env();
    std::fs::write(e.root.join("a.img"), b"AAA").unwrap();
    std::fs::write(e.root.join("b.img"), b"BB").unwrap();
    std::fs::write(e.root.join("sub/c"), b"C").unwrap();
    let cmd = format!("scp -f {}/*.img", e.root.display());
    // the sink acks: start, each header, each file
    let (status, out) = run(&e, &cmd, &[0; 5]).await;
    assert_eq!(status, 0);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "C0644 3 a.img\nAAA\0C0644 2 b.img\nBB\0"
    );
    let cmd = format!("scp -r -f {}/sub", e.root.display());
    let (status, out) = run(&e, &cmd, &[0; 5]).await;
    assert_eq!(status, 0);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("D0755 0 sub\nC0644 1 c\nC\0E\n"),
        "{text:?}"
    );
    // outside and escaping sources are refused in-band
    for bad in ["/etc/passwd", "../secret"] {
        let path = if bad.starts_with('/') {
            bad.to_string()
        } else {
            format!("{}/{bad}", e.root.display())
        };
        let (status, out) = run(&e, &format!("scp -f {path}"), &[0; 2]).await;
        assert_eq!(status, 1, "{bad}");
        assert_eq!(out.first(), Some(&1u8), "{bad}");
        assert!(!String::from_utf8_lossy(&out).contains("root:"), "{bad}");
    }
}

#[tokio::test]
async fn source_keeps_the_stream_in_sync_when_a_file_shrinks() {
    let e = env();
    // more than two of the source's 256 KiB buffers, distinct bytes throughout
    let content: Vec<u8> = (0..600 * 1024u32).map(|i| (i % 251) as u8).collect();
    let path = e.root.join("shrinking.img");
    std::fs::write(&path, &content).unwrap();
    let cmd = scp::parse(format!("scp -f {}", path.display()).as_bytes()).unwrap();
    let (mut client_in, server_in) = tokio::io::duplex(1 << 20);
    let (server_out, mut client_out) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(scp::serve(
        cmd,
        e.transfer.clone(),
        server_in,
        server_out,
        tokio::io::sink(),
    ));
    client_in.write_all(b"\0").await.unwrap();
    let header = format!("C0644 {} shrinking.img\n", content.len());
    let mut got = vec![0; header.len()];
    client_out.read_exact(&mut got).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&got), header);
    // the file loses half its bytes after the header went out, before the data is read
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(300 * 1024)
        .unwrap();
    client_in.write_all(b"\0").await.unwrap();
    let mut data = vec![0; content.len()];
    client_out.read_exact(&mut data).await.unwrap();
    assert!(
        data[..300 * 1024] == content[..300 * 1024],
        "what is left is sent"
    );
    assert!(data[300 * 1024..].iter().all(|&b| b == 0), "then zeros");
    // then an error instead of the success byte, and the stream is still in step
    client_in.write_all(b"\0").await.unwrap();
    client_in.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), client_out.read_to_end(&mut rest))
        .await
        .expect("server finishes")
        .unwrap();
    assert_eq!(
        rest.first(),
        Some(&1u8),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(String::from_utf8_lossy(&rest).starts_with("\u{1}scp: "));
    let status = tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("server finishes")
        .unwrap();
    assert_eq!(status, 1);
}

#[tokio::test]
async fn source_sends_large_files_in_order() {
    let e = env();
    // several of the source's 256 KiB buffers and a partial last one
    let content: Vec<u8> = (0..(3 * 256 * 1024 + 4321) as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(e.root.join("big.img"), &content).unwrap();
    std::fs::write(e.root.join("small.img"), b"tail").unwrap();
    let cmd = format!("scp -f {0}/big.img {0}/small.img", e.root.display());
    let (status, out) = run(&e, &cmd, &[0; 5]).await;
    assert_eq!(status, 0);
    let mut expected = format!("C0644 {} big.img\n", content.len()).into_bytes();
    expected.extend_from_slice(&content);
    expected.extend_from_slice(b"\0C0644 4 small.img\ntail\0");
    assert!(
        out == expected,
        "{} bytes instead of {}",
        out.len(),
        expected.len()
    );
}
