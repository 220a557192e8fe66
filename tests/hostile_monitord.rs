//! Hostile monitord traffic against the real relay on 4124-style UDP/TCP listeners: every bad
//! message is refused and counted under its reason, nothing bad is relayed upstream, memory stays
//! bounded (zlib bombs, floods), and good messages mixed in keep flowing byte-identical.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::admin::scrape_value;
use common::{Sidecar, UpstreamSink, peak_rss_kib, wait_until};

const WAIT: Duration = Duration::from_secs(30);
const GOOD: &[u8] = b"BEACON_HOST SUCCESS 3 1724150010 eNozNDcyMTQ1MDA0AAAK8AH2";

fn zlib(data: &[u8], level: u32) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(level));
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn msg(ty: &str, host: i64, payload: &str) -> Vec<u8> {
    format!("{ty} SUCCESS {host} 1724150010 {payload}").into_bytes()
}

fn send_udp(to: SocketAddr, m: &[u8]) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(m, to).unwrap();
}

fn send_tcp(to: SocketAddr, m: &[u8]) {
    let mut s = TcpStream::connect(to).unwrap();
    // The server may close early (too large): a reset is fine.
    let _ = s.write_all(m);
}

fn rejected(sc: &Sidecar, transport: &str, reason: &str) -> f64 {
    scrape_value(
        sc,
        "tm_sidecar_monitord_rejected_total",
        &[("transport", transport), ("reason", reason)],
    )
}

fn accepted(sc: &Sidecar) -> f64 {
    scrape_value(sc, "tm_sidecar_monitord_messages_total", &[])
}

/// Still healthy and still relaying a good datagram byte-identical.
fn still_relays(sc: &Sidecar, sink: &UpstreamSink) {
    let before = sink.udp().len();
    send_udp(sc.monitord.unwrap(), GOOD);
    wait_until(WAIT, "a good datagram relayed", || {
        sink.udp().len() > before
    });
    assert_eq!(sink.udp().last().map(Vec::as_slice), Some(GOOD));
    let (code, _) = common::admin::http_get(sc.admin.unwrap(), "/healthz");
    assert_eq!(code, 200);
}

fn relay(extra: &[&str]) -> (Sidecar, UpstreamSink) {
    let sink = UpstreamSink::start("127.0.0.1:0".parse().unwrap());
    let up = sink.addr.to_string();
    let mut args = vec![
        "--monitord-upstream",
        up.as_str(),
        "--monitord-rate-limit",
        "0",
    ];
    args.extend_from_slice(extra);
    (Sidecar::start_with(&args), sink)
}

#[test]
fn malformed_datagrams_are_refused_by_reason() {
    let (sc, sink) = relay(&["--monitord-max-message-bytes", "32768"]);
    let to = sc.monitord.unwrap();
    let beacon = zlib(b"", 9);
    let bomb = zlib(&vec![0u8; 20 << 20], 9);
    assert!(bomb.len() < 32768 - 100);
    // One long token of binary junk (no C whitespace in it).
    let garbage: Vec<u8> = (0..600u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .filter(|b| !matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'))
        .collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad_base64_chars",
            msg("BEACON_HOST", 3, "%%%%"),
            "not_base64",
        ),
        (
            "bad_base64_padding",
            msg("BEACON_HOST", 3, "eNozNDcyMTQ1MDA0AAAK8AH"),
            "not_base64",
        ),
        (
            "base64_with_inner_space",
            msg("BEACON_HOST", 3, "eNozNDcy MTQ1MDA0AAAK8AH2"),
            "not_base64",
        ),
        (
            "not_zlib",
            msg("MONITOR_HOST", 3, &b64(b"plain text, not compressed")),
            "bad_zlib",
        ),
        (
            "gzip_instead_of_zlib",
            msg("MONITOR_HOST", 3, &b64(&gzip(b"FREECPU=1\n"))),
            "bad_zlib",
        ),
        (
            "truncated_zlib",
            msg("MONITOR_HOST", 3, &b64(&beacon[..beacon.len() - 3])),
            "bad_zlib",
        ),
        (
            "zlib_bomb",
            msg("MONITOR_HOST", 3, &b64(&bomb)),
            "inflated_too_large",
        ),
        (
            "unknown_type",
            msg("ATTACK_HOST", 3, &b64(&beacon)),
            "unknown_type",
        ),
        (
            "lowercase_type",
            msg("beacon_host", 3, &b64(&beacon)),
            "unknown_type",
        ),
        ("binary_garbage", garbage, "missing_fields"),
        (
            "bad_status",
            b"BEACON_HOST MAYBE 3 1 eNozNDcyMTQ1MDA0AAAK8AH2".to_vec(),
            "bad_status",
        ),
        (
            "host_id_overflow",
            msg("BEACON_HOST", 99_999_999_999, "eNozNDcyMTQ1MDA0AAAK8AH2"),
            "bad_host_id",
        ),
        (
            "epoch_overflow",
            b"BEACON_HOST SUCCESS 3 99999999999999999999 eNozNDcyMTQ1MDA0AAAK8AH2".to_vec(),
            "bad_epoch",
        ),
        (
            "missing_fields",
            b"BEACON_HOST SUCCESS 3".to_vec(),
            "missing_fields",
        ),
        ("empty_datagram", Vec::new(), "empty"),
        ("whitespace_only", b" \n\t\r\n".to_vec(), "empty"),
        ("oversize_datagram", vec![b'A'; 40_000], "too_large"),
    ];
    for (name, m, reason) in &cases {
        let before = rejected(&sc, "udp", reason);
        send_udp(to, m);
        wait_until(WAIT, &format!("{name}: udp {reason}"), || {
            rejected(&sc, "udp", reason) > before
        });
    }
    assert!(sink.udp().is_empty(), "a refused datagram was relayed");
    assert_eq!(accepted(&sc), 0.0);
    still_relays(&sc, &sink);
    let peak = peak_rss_kib(sc.child.id());
    assert!(peak > 0 && peak < 256 * 1024, "peak RSS {peak} KiB");
}

#[test]
fn tcp_bombs_oversize_streams_and_connection_floods_are_bounded() {
    let (sc, sink) = relay(&[
        "--monitord-max-message-bytes",
        "1048576",
        "--monitord-max-connections",
        "8",
        "--monitord-read-timeout",
        "2",
    ]);
    let to = sc.monitord.unwrap();
    // 512 MiB of zeros in ~0.5 MiB of zlib: refused at the 16 MiB inflate cap.
    let bomb = {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..512 {
            z.write_all(&zeros).unwrap();
        }
        z.finish().unwrap()
    };
    let m = msg("MONITOR_HOST", 4, &b64(&bomb));
    assert!(
        m.len() < 1 << 20,
        "the bomb fits the message cap ({})",
        m.len()
    );
    send_tcp(to, &m);
    wait_until(WAIT, "tcp inflated_too_large", || {
        rejected(&sc, "tcp", "inflated_too_large") >= 1.0
    });
    // 4 MiB where 1 MiB is the cap: cut off.
    send_tcp(to, &vec![b'A'; 4 << 20]);
    wait_until(WAIT, "tcp too_large", || {
        rejected(&sc, "tcp", "too_large") >= 1.0
    });
    // 40 connections that send nothing, against a cap of 8: the rest are refused at once.
    let idle: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(to).unwrap()).collect();
    wait_until(WAIT, "tcp connection_limit", || {
        rejected(&sc, "tcp", "connection_limit") >= 1.0
    });
    drop(idle);
    // Once the slots are free, a good TCP message gets through.
    wait_until(WAIT, "idle connections released", || {
        scrape_value(&sc, "tm_sidecar_monitord_tcp_connections", &[]) == 0.0
    });
    send_tcp(to, GOOD);
    wait_until(WAIT, "a good TCP message relayed", || {
        !sink.tcp().is_empty()
    });
    assert_eq!(
        sink.tcp(),
        vec![GOOD.to_vec()],
        "only the good stream is relayed"
    );
    still_relays(&sc, &sink);
    let peak = peak_rss_kib(sc.child.id());
    assert!(peak > 0 && peak < 256 * 1024, "peak RSS {peak} KiB");
}

#[test]
fn a_mixed_flood_is_counted_exactly_and_only_valid_messages_are_relayed() {
    let (sc, sink) = relay(&["--monitord-max-hosts", "50"]);
    let to = sc.monitord.unwrap();
    let beacon = b64(&zlib(b"", 9));
    let bad_kinds: [&[u8]; 4] = [
        b"BEACON_HOST SUCCESS 3 1 %%%%",
        b"NOPE SUCCESS 3 1 eNozNDcyMTQ1MDA0AAAK8AH2",
        b"BEACON_HOST SUCCESS x 1 eNozNDcyMTQ1MDA0AAAK8AH2",
        b"\x00\xff\x00\xff",
    ];
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (batches, per_batch) = (40, 50);
    let mut valid = Vec::new();
    for b in 0..batches {
        for i in 0..per_batch {
            let n = b * per_batch + i;
            if n % 2 == 0 {
                // 1000 distinct hosts against a table of 50.
                let m = msg("BEACON_HOST", n as i64, &beacon);
                sock.send_to(&m, to).unwrap();
                valid.push(m);
            } else {
                sock.send_to(bad_kinds[(n / 2) % 4], to).unwrap();
            }
        }
        // One batch at a time, so that no socket buffer overflows on a slow machine.
        let want = ((b + 1) * per_batch) as f64;
        wait_until(WAIT, "a batch counted", || {
            accepted(&sc) + scrape_value(&sc, "tm_sidecar_monitord_rejected_total", &[]) >= want
        });
    }
    let total = (batches * per_batch) as f64;
    assert_eq!(accepted(&sc), total / 2.0);
    assert_eq!(
        scrape_value(&sc, "tm_sidecar_monitord_rejected_total", &[]),
        total / 2.0
    );
    wait_until(WAIT, "every valid datagram relayed", || {
        sink.udp().len() >= valid.len()
    });
    let mut got = sink.udp();
    got.sort();
    valid.sort();
    assert_eq!(got, valid, "exactly the valid datagrams, byte-identical");
    // The host table stays bounded; the rest are counted as untracked.
    let (_, hosts) = common::admin::http_get(sc.admin.unwrap(), "/api/v1/hosts");
    let hosts: serde_json::Value = serde_json::from_str(&hosts).unwrap();
    assert_eq!(hosts["count"], 50);
    assert_eq!(
        scrape_value(&sc, "tm_sidecar_monitord_untracked_hosts_total", &[]),
        total / 2.0 - 50.0
    );
    still_relays(&sc, &sink);
}

#[test]
fn plaintext_is_refused_when_encryption_is_required() {
    let keys = tempfile::tempdir().unwrap();
    let st = Command::new(common::BIN)
        .args(["keygen", "--dir"])
        .arg(keys.path())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let key = keys.path().join("monitord_rsa").display().to_string();
    let (sc, sink) = relay(&[
        "--monitord-private-key",
        &key,
        "--monitord-require-encryption",
        "true",
    ]);
    let to = sc.monitord.unwrap();
    // Plain payloads, and random data of exactly one RSA block (256 bytes) that does not
    // decrypt.
    let block: Vec<u8> = (0..256u32).map(|i| (i * 37 + 11) as u8).collect();
    for (i, m) in [
        GOOD.to_vec(),
        msg("MONITOR_HOST", 3, &b64(&zlib(b"FREECPU=10\n", 9))),
        msg("MONITOR_HOST", 3, &b64(&zlib(&block, 9))),
        b"BEACON_HOST SUCCESS 3 1".to_vec(),
    ]
    .iter()
    .enumerate()
    {
        send_udp(to, m);
        wait_until(WAIT, &format!("not_encrypted #{i}"), || {
            rejected(&sc, "udp", "not_encrypted") >= (i + 1) as f64
        });
    }
    assert!(sink.udp().is_empty());
}

#[test]
fn payloads_that_are_not_templates_are_counted_and_still_relayed() {
    let (sc, sink) = relay(&[]);
    let to = sc.monitord.unwrap();
    let payloads: [&[u8]; 4] = [
        b"\xff\xfe not UTF-8 \x00",
        b"A=\"unterminated\n",
        // (a nested MONITOR="…" that is not base64 is onemonitord's business: the relay counts
        // VM entries without decoding them)
        b"VM = [ ID=\"1\", MONITOR=\"unterminated ]\n",
        b"= no name\n",
    ];
    for (i, p) in payloads.iter().enumerate() {
        let m = msg("MONITOR_VM", 10 + i as i64, &b64(&zlib(p, 9)));
        send_udp(to, &m);
        wait_until(WAIT, "payload error counted", || {
            scrape_value(&sc, "tm_sidecar_monitord_payload_errors_total", &[]) >= (i + 1) as f64
        });
    }
    // Well-formed messages are relayed as they are (onemonitord decides about the payload).
    wait_until(WAIT, "relayed", || sink.udp().len() == payloads.len());
    still_relays(&sc, &sink);
}
