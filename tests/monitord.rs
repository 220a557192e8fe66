//! monitord relay against the real binary: byte-identical relaying on the same transport to a
//! UDP+TCP sink, refusal of bad input counted by reason, the TCP retry queue across an upstream
//! outage, the host table and metrics on the admin endpoint, and `monitord-send`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::admin::{http_get, metrics, value};
use common::{Sidecar, UpstreamSink as Sink};
use tm_sidecar::monitord::wire::{self, MsgType, Status};

const WAIT: Duration = Duration::from_secs(20);

const EX_MONITOR_VM: &str = "MONITOR_VM SUCCESS 3 1724150000 eNpNzDsPgjAUhuG/0nTWhHoZGDrIpUmRtlDaQ4gxDsYQihE3lV9vJSE4nifvd0Agik6IJxSTDV6hJC1y1Vx+9/C4rScTSnKjNMUliaCo+Dt3tot7wowNq9oEnTCHQCV2Kzt+ND1Ye29D7tKPGEvf7Rkw3fgdke664+0zrUDmttdxDZrZcdq/ZgeSLe4W931mSGT8n/GvnS3g7UDx+QulOT8O";
const EX_STATE_VM: &str = "STATE_VM SUCCESS 3 1724150005 eNoLjvRzjg8OcQxxta1MLeby9QwO9vRzh4oE+Ie7Bvm7uXGF+SrYKkQreLrYKhkaKekouLgG+PhHxoP4+XmpumAxBYgepaBQPz+gEUoKsQC1XRjP";
const EX_BEACON: &str = "BEACON_HOST SUCCESS 3 1724150010 eNozNDcyMTQ1MDA0AAAK8AH2";

// ---------------------------------------------------------------------------------------------
// Starting the sidecar

/// Start `serve` with monitord on 127.0.0.1:0 and `extra` flags.
fn start(extra: &[&str]) -> Sidecar {
    Sidecar::start_with(extra)
}

/// A port free on 127.0.0.1 for both TCP and UDP right now.
fn free_port() -> SocketAddr {
    let tl = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tl.local_addr().unwrap();
    let _u = UdpSocket::bind(addr).unwrap();
    addr
}

// ---------------------------------------------------------------------------------------------
// Clients

fn send_udp(to: SocketAddr, msg: &[u8]) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(msg, to).unwrap();
}

fn send_tcp(to: SocketAddr, msg: &[u8]) {
    let mut s = TcpStream::connect(to).unwrap();
    s.write_all(msg).unwrap();
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_metric(sc: &Sidecar, name: &str, want: &[(&str, &str)], at_least: f64) {
    wait_until(&format!("{name}{want:?} >= {at_least}"), || {
        value(&metrics(sc), name, want) >= at_least
    });
}

fn rejected(sc: &Sidecar, transport: &str, reason: &str) -> f64 {
    value(
        &metrics(sc),
        "tm_sidecar_monitord_rejected_total",
        &[("transport", transport), ("reason", reason)],
    )
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn monitord_send(sc: &Sidecar, args: &[&str], payload: &[u8]) {
    let addr = sc.monitord.unwrap();
    let mut child = Command::new(common::BIN)
        .arg("monitord-send")
        .args([
            "--host",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "monitord-send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn valid_messages_arrive_byte_identical_on_the_same_transport() {
    let sink = Sink::start("127.0.0.1:0".parse().unwrap());
    let up = sink.addr.to_string();
    let sc = start(&["--monitord-upstream", &up]);
    let to = sc.monitord.expect("monitord address");

    // send_to_monitor from the front-end: host -1, epoch 0, "\n" after the zlib stream, echo's "\n".
    let mut z = zlib(b"DS = [ ID = 0, USED_MB = 1 ]");
    z.push(b'\n');
    let fe = format!("MONITOR_HOST SUCCESS -1 0 {}\n", b64(&z)).into_bytes();

    let udp_msgs = vec![
        EX_MONITOR_VM.as_bytes().to_vec(),
        EX_BEACON.as_bytes().to_vec(),
        fe.clone(),
    ];
    let tcp_msgs = vec![EX_STATE_VM.as_bytes().to_vec(), fe.clone()];
    for m in &udp_msgs {
        send_udp(to, m);
    }
    for m in &tcp_msgs {
        send_tcp(to, m);
    }
    // Garbage on both transports.
    let garbage: Vec<Vec<u8>> = vec![
        b"MONITOR_VM SUCCESS 3 1724150000 not-base64!".to_vec(),
        b"NOPE SUCCESS 3 1 eNozNDcyMTQ1MDA0AAAK8AH2".to_vec(),
        b"BEACON_HOST".to_vec(),
    ];
    for g in &garbage {
        send_udp(to, g);
        send_tcp(to, g);
    }

    wait_until("all valid messages at the sink", || {
        sink.udp().len() >= 3 && sink.tcp().len() >= 2
    });
    wait_until("garbage counted", || {
        let m = metrics(&sc);
        value(&m, "tm_sidecar_monitord_rejected_total", &[]) >= 6.0
    });
    let mut got_udp = sink.udp();
    let mut got_tcp = sink.tcp();
    let (mut want_udp, mut want_tcp) = (udp_msgs.clone(), tcp_msgs.clone());
    for v in [&mut got_udp, &mut got_tcp, &mut want_udp, &mut want_tcp] {
        v.sort();
    }
    assert_eq!(
        got_udp, want_udp,
        "UDP sink got exactly the valid datagrams"
    );
    assert_eq!(got_tcp, want_tcp, "TCP sink got exactly the valid messages");

    let m = metrics(&sc);
    let msgs = |t: &str, ty: &str| {
        value(
            &m,
            "tm_sidecar_monitord_messages_total",
            &[("transport", t), ("type", ty)],
        )
    };
    assert_eq!(msgs("udp", "MONITOR_VM"), 1.0);
    assert_eq!(msgs("udp", "MONITOR_HOST"), 1.0);
    assert_eq!(msgs("tcp", "STATE_VM"), 1.0);
    let fwd = |t: &str| {
        value(
            &m,
            "tm_sidecar_monitord_forwarded_total",
            &[("transport", t), ("result", "ok")],
        )
    };
    assert_eq!((fwd("udp"), fwd("tcp")), (3.0, 2.0));
    for t in ["udp", "tcp"] {
        for reason in ["not_base64", "unknown_type", "missing_fields"] {
            assert_eq!(
                value(
                    &m,
                    "tm_sidecar_monitord_rejected_total",
                    &[("transport", t), ("reason", reason)]
                ),
                1.0,
                "{t} {reason}"
            );
        }
    }

    // Host table: host 3 and the front-end's -1.
    let (code, body) = http_get(sc.admin.unwrap(), "/api/v1/hosts");
    assert_eq!(code, 200);
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<i64> = j["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![-1, 3]);
    assert_eq!(j["hosts"][1]["vms"]["by_state"]["RUNNING"], 1);
    assert_eq!(
        j["hosts"][1]["last_seen"]["BEACON_HOST"]["epoch"],
        1724150010
    );
}

#[test]
fn bad_input_is_refused_counted_and_harmless() {
    let sink = Sink::start("127.0.0.1:0".parse().unwrap());
    let up = sink.addr.to_string();
    let sc = start(&[
        "--monitord-upstream",
        &up,
        "--monitord-max-message-bytes",
        "32768",
        "--monitord-read-timeout",
        "1",
    ]);
    let to = sc.monitord.unwrap();
    let bomb = zlib(&vec![0u8; 20 << 20]);
    let full = zlib(&[b'x'; 5000]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"BEACON_HOST SUCCESS 3 1 %%%%".to_vec(), "not_base64"),
        (
            format!("BEACON_HOST SUCCESS 3 1 {}", b64(&full[..full.len() / 2])).into_bytes(),
            "bad_zlib",
        ),
        (
            format!("MONITOR_HOST SUCCESS 3 1 {}", b64(&bomb)).into_bytes(),
            "inflated_too_large",
        ),
        (vec![b'A'; 40_000], "too_large"),
        (
            b"ATTACK_HOST SUCCESS 3 1 eNozNDcyMTQ1MDA0AAAK8AH2".to_vec(),
            "unknown_type",
        ),
        (b"BEACON_HOST SUCCESS".to_vec(), "missing_fields"),
        (
            b"BEACON_HOST SUCCESS three 1 eNozNDcyMTQ1MDA0AAAK8AH2".to_vec(),
            "bad_host_id",
        ),
        (
            b"BEACON_HOST SUCCESS 3 yesterday eNozNDcyMTQ1MDA0AAAK8AH2".to_vec(),
            "bad_epoch",
        ),
    ];
    assert!(
        cases[2].0.len() < 32768,
        "the bomb fits under the message cap"
    );
    for (msg, reason) in &cases {
        send_udp(to, msg);
        wait_until(&format!("udp {reason}"), || {
            rejected(&sc, "udp", reason) >= 1.0
        });
    }

    // A 100 MB TCP stream is cut at the cap.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(to).unwrap();
    let chunk = vec![b'A'; 1 << 20];
    let mut sent = 0usize;
    while sent < 100 << 20 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    assert!(sent < 100 << 20, "server kept reading a 100 MB stream");
    wait_until("tcp too_large", || rejected(&sc, "tcp", "too_large") >= 1.0);
    assert!(t0.elapsed() < WAIT);

    // A TCP client that never closes is dropped after the read timeout.
    let mut idle = TcpStream::connect(to).unwrap();
    idle.write_all(b"BEACON_HOST SUCCESS 3 1 ").unwrap();
    wait_until("tcp timeout", || rejected(&sc, "tcp", "timeout") >= 1.0);
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert!(
        matches!(idle.read(&mut buf), Ok(0) | Err(_)),
        "server closed the idle connection"
    );

    // Nothing bad reached the upstream; the server still relays a good message.
    send_udp(to, EX_BEACON.as_bytes());
    wait_until("good datagram relayed", || !sink.udp().is_empty());
    assert_eq!(sink.udp(), vec![EX_BEACON.as_bytes().to_vec()]);
    assert!(sink.tcp().is_empty());
    assert_eq!(http_get(sc.admin.unwrap(), "/healthz").0, 200);
}

#[test]
fn a_flood_from_one_source_is_rate_limited() {
    let sc = start(&["--monitord-rate-limit", "20"]);
    let to = sc.monitord.unwrap();
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..300 {
        s.send_to(EX_BEACON.as_bytes(), to).unwrap();
    }
    wait_until("flood accounted", || {
        let m = metrics(&sc);
        let ok = value(
            &m,
            "tm_sidecar_monitord_messages_total",
            &[("transport", "udp")],
        );
        let limited = value(
            &m,
            "tm_sidecar_monitord_rejected_total",
            &[("reason", "rate_limited")],
        );
        ok + limited >= 300.0 || limited >= 250.0
    });
    let m = metrics(&sc);
    let ok = value(
        &m,
        "tm_sidecar_monitord_messages_total",
        &[("transport", "udp")],
    );
    assert!(
        (20.0..=40.0).contains(&ok),
        "accepted {ok} of a 300-message burst at 20/s"
    );
    // After the bucket refills, the source is served again.
    let before = ok;
    wait_until("source served again", || {
        s.send_to(EX_BEACON.as_bytes(), to).unwrap();
        value(
            &metrics(&sc),
            "tm_sidecar_monitord_messages_total",
            &[("transport", "udp")],
        ) > before
    });
}

#[test]
fn upstream_down_then_up_delivers_the_newest_tcp_message_per_host() {
    let up = free_port();
    let sc = start(&["--monitord-upstream", &up.to_string()]);
    let to = sc.monitord.unwrap();
    let mut newest = vec![];
    for i in 0..3 {
        for host in [1, 2] {
            let payload = format!("VM = [ ID=\"{i}\", DEPLOY_ID=\"one-{i}\", STATE=\"RUNNING\" ]");
            let msg = wire::encode(
                MsgType::StateVm,
                Status::Success,
                host,
                1000 + i,
                payload.as_bytes(),
                None,
            )
            .unwrap();
            send_tcp(to, &msg);
            let n = (i * 2 + host as i64) as f64;
            // One at a time, so that arrival order is sending order.
            wait_metric(
                &sc,
                "tm_sidecar_monitord_messages_total",
                &[("transport", "tcp")],
                n,
            );
            if i == 2 {
                newest.push(msg);
            }
        }
    }
    wait_metric(
        &sc,
        "tm_sidecar_monitord_forwarded_total",
        &[("transport", "tcp"), ("result", "error")],
        1.0,
    );
    let sink = Sink::start(up);
    wait_until("queued messages delivered", || sink.tcp().len() >= 2);
    wait_metric(
        &sc,
        "tm_sidecar_monitord_forwarded_total",
        &[("transport", "tcp"), ("result", "ok")],
        2.0,
    );
    let mut got = sink.tcp();
    got.sort();
    newest.sort();
    assert_eq!(got, newest, "only the newest message per host arrives");
    let m = metrics(&sc);
    assert_eq!(value(&m, "tm_sidecar_monitord_tcp_queue", &[]), 0.0);
    assert!(
        value(
            &m,
            "tm_sidecar_monitord_forwarded_total",
            &[("transport", "tcp"), ("result", "superseded")]
        ) >= 4.0
    );
}

#[test]
fn monitord_send_with_rsa_fills_the_host_table() {
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new(common::BIN)
        .args(["keygen", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let private = dir.path().join("monitord_rsa");
    let public = dir.path().join("monitord_rsa.pub");
    let sink = Sink::start("127.0.0.1:0".parse().unwrap());
    let up = sink.addr.to_string();
    let sc = start(&[
        "--monitord-upstream",
        &up,
        "--monitord-private-key",
        private.to_str().unwrap(),
        "--monitord-require-encryption",
        "true",
    ]);
    let pubkey = public.to_str().unwrap();
    monitord_send(
        &sc,
        &[
            "--type",
            "SYSTEM_HOST",
            "--host-id",
            "7",
            "--pubkey",
            pubkey,
        ],
        b"HYPERVISOR=kvm\nTOTALCPU=800\nTOTALMEMORY=16000000\nHOSTNAME=kvm-7\nVERSION=\"7.0.0\"\n",
    );
    monitord_send(
        &sc,
        &[
            "--type",
            "MONITOR_HOST",
            "--host-id",
            "7",
            "--pubkey",
            pubkey,
        ],
        b"FREECPU=780\nUSEDCPU=20\nFREEMEMORY=100\nUSEDMEMORY=200\nNETRX=5\nNETTX=6\n",
    );
    monitord_send(
        &sc,
        &["--type", "STATE_VM", "--host-id", "7", "--pubkey", pubkey],
        b"VM = [ ID=\"1\", STATE=\"RUNNING\" ]\nVM = [ ID=\"2\", STATE=\"POWEROFF\" ]\n",
    );
    monitord_send(
        &sc,
        &[
            "--type",
            "BEACON_HOST",
            "--host-id",
            "7",
            "--status",
            "FAILURE",
            "--pubkey",
            pubkey,
        ],
        b"probe timed out\n",
    );
    // Unencrypted is refused with --monitord-require-encryption.
    monitord_send(&sc, &["--type", "BEACON_HOST", "--host-id", "7"], b"1");
    wait_until("unencrypted refused", || {
        rejected(&sc, "udp", "not_encrypted") >= 1.0
    });
    wait_until("3 UDP + 1 TCP relayed", || {
        sink.udp().len() >= 3 && !sink.tcp().is_empty()
    });

    let (_, body) = http_get(sc.admin.unwrap(), "/api/v1/hosts");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    let h = &j["hosts"][0];
    assert_eq!(h["id"], 7);
    assert_eq!(h["system"]["HOSTNAME"], "kvm-7");
    assert_eq!(h["usage"]["FREECPU"], 780.0);
    assert_eq!(h["vms"]["by_state"]["POWEROFF"], 1);
    assert_eq!(h["last_failure"]["type"], "BEACON_HOST");
    assert_eq!(h["last_failure"]["text"], "probe timed out");
    let m = metrics(&sc);
    assert_eq!(
        value(&m, "tm_sidecar_monitord_host_free_cpu", &[("host_id", "7")]),
        780.0
    );
    assert_eq!(
        value(
            &m,
            "tm_sidecar_monitord_host_vms",
            &[("host_id", "7"), ("state", "RUNNING")]
        ),
        1.0
    );
    assert!(
        value(
            &m,
            "tm_sidecar_monitord_host_last_seen_seconds",
            &[("host_id", "7"), ("type", "STATE_VM")]
        ) > 1.6e9
    );
    assert_eq!(value(&m, "tm_sidecar_monitord_hosts", &[]), 1.0);
    assert_eq!(
        value(
            &m,
            "tm_sidecar_monitord_messages_total",
            &[("type", "BEACON_HOST"), ("status", "FAILURE")]
        ),
        1.0
    );
}

#[test]
fn a_busy_listen_address_is_a_clear_error() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let keys = common::keygen(dir.path());
    let mut cmd = Command::new(common::BIN);
    cmd.args([
        "serve",
        "--ssh-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "off",
        "--monitord-listen",
        &addr,
    ])
    .arg("--host-key")
    .arg(keys.join("ssh_host_ed25519_key"))
    .arg("--authorized-keys")
    .arg(keys.join("authorized_keys"))
    .arg("--home")
    .arg(dir.path())
    .arg("--transfer-root")
    .arg(dir.path())
    .args(["--log-format", "text"]);
    let out = common::run(&mut cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("--monitord-listen {addr}")) && err.contains("in use"),
        "{err}"
    );
}
