//! Load against the real binary on loopback, scaled to fit CI (2 cores, debug build); the full
//! figures (200 clients × 20 execs, 1000 idle connections for 60 s, 50 MB/s of monitord UDP for
//! 60 s) are `bench/load.sh` on a release build, recorded in BENCHMARKS.md.
//!
//! Each scenario asserts zero errors for valid work, records the server's peak RSS (VmHWM) and
//! checks that its RSS comes back near the baseline once the load is gone. The sidecar gets the
//! MaxStartups room an operator would give such a load (`--max-startups 1000:30:2000
//! --per-source-max-startups 999`): every client here comes from 127.0.0.1, and sshd's default
//! 10:30:100 would early-drop part of a burst of new connections from one address by design.
//!
//! Scale with `TM_LOAD_CLIENTS`, `TM_LOAD_EXECS`, `TM_LOAD_IDLE`, `TM_LOAD_IDLE_SECONDS`,
//! `TM_LOAD_UDP_MBPS`, `TM_LOAD_UDP_SECONDS`.

mod common;
#[path = "support/udpgen.rs"]
mod udpgen;
#[path = "support/util.rs"]
mod util;

use std::collections::HashSet;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::admin::{metrics, value};
use common::{Sidecar, run, sshc};
use util::{sha256, vm_kib, wait_until, write_random};

const T: Duration = Duration::from_secs(300);

/// The scenarios measure the server's memory: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const LOAD_FLAGS: [&str; 6] = [
    "--max-startups",
    "1000:30:2000",
    "--per-source-max-startups",
    "999",
    "--max-connections",
    "4096",
];

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Memory of the server process through a scenario (KiB).
struct Memory {
    pid: u32,
    baseline: u64,
}

impl Memory {
    fn start(s: &Sidecar) -> Memory {
        let pid = s.child.id();
        Memory {
            pid,
            baseline: vm_kib(pid, "VmRSS"),
        }
    }

    fn rss(&self) -> u64 {
        vm_kib(self.pid, "VmRSS")
    }

    fn peak(&self) -> u64 {
        vm_kib(self.pid, "VmHWM")
    }

    /// After the load: RSS must come back to within half of what the load added on top of
    /// the baseline, or within 16 MiB of it (allocator arenas keep some pages around).
    fn check_returned(&self, what: &str) -> u64 {
        let peak = self.peak();
        let allowed = self.baseline + ((peak - self.baseline) / 2).max(16 << 10);
        // the server trims malloc within its 10 s interval once the connections are gone
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut after = self.rss();
        while after > allowed && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            after = self.rss();
        }
        eprintln!(
            "{what}: RSS baseline {} KiB, peak (VmHWM) {peak} KiB, after {after} KiB",
            self.baseline
        );
        assert!(
            after <= allowed,
            "{what}: RSS {after} KiB after the load, baseline {} KiB, peak {peak} KiB",
            self.baseline
        );
        after
    }
}

fn quiet_server(s: &Sidecar) {
    wait_until("every connection closed", T, || {
        let m = metrics(s);
        value(&m, "tm_sidecar_ssh_connections_active", &[]) == 0.0
            && value(&m, "tm_sidecar_ssh_channels_active", &[]) == 0.0
    });
}

// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_clients_run_execs_and_small_scp_transfers_without_errors() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let clients = knob("TM_LOAD_CLIENTS", 50) as usize;
    let execs = knob("TM_LOAD_EXECS", 10) as usize;
    let s = Arc::new(Sidecar::start_with(&LOAD_FLAGS));
    assert!(run(&mut s.ssh(&["true"]), T).status.success());
    let mem = Memory::start(&s);
    let local = tempfile::tempdir().unwrap();
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let start = Arc::new(Barrier::new(clients));
    let began = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (s, errors, start) = (s.clone(), errors.clone(), start.clone());
            let dir = local.path().join(format!("c{i}"));
            std::thread::spawn(move || {
                std::fs::create_dir_all(&dir).unwrap();
                let fail = |what: String| errors.lock().unwrap().push(what);
                let src = dir.join("up");
                write_random(&src, 64 << 10, i as u64 + 1);
                let digest = sha256(&src);
                start.wait();
                for j in 0..execs {
                    let out = run(&mut s.ssh(&[&format!("echo c{i}; echo $(({i} * {j}))")]), T);
                    let want = format!("c{i}\n{}\n", i * j);
                    if !out.status.success() || out.stdout != want.as_bytes() {
                        fail(format!(
                            "exec {i}/{j}: {:?} {:?} {}",
                            out.status,
                            String::from_utf8_lossy(&out.stdout),
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                }
                // a small upload (scp, SFTP protocol) and its download (scp -O), both verified
                let remote = s.root.join(format!("c{i}"));
                let out = run(s.scp().arg(&src).arg(s.remote(&remote)), T);
                if !out.status.success() || sha256(&remote) != digest {
                    fail(format!(
                        "upload {i}: {:?} {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                let back = dir.join("back");
                let out = run(s.scp().arg("-O").arg(s.remote(&remote)).arg(&back), T);
                if !out.status.success() || sha256(&back) != digest {
                    fail(format!(
                        "download {i}: {:?} {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let took = began.elapsed();
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{} errors: {errors:#?}", errors.len());
    quiet_server(&s);
    let m = metrics(&s);
    let ok = value(
        &m,
        "tm_sidecar_ssh_exec_completions_total",
        &[("class", "success")],
    );
    // execs, the two scp per client and the warm-up `true`
    assert_eq!(ok as usize, clients * (execs + 2) + 1);
    eprintln!(
        "{clients} clients × ({execs} execs + 2 scp): {} logins in {:.1} s",
        clients * (execs + 2),
        took.as_secs_f64()
    );
    mem.check_returned("clients");
}

// ---------------------------------------------------------------------------------------------

#[test]
fn a_thousand_idle_authenticated_connections_are_held_and_released() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = knob("TM_LOAD_IDLE", 1000) as usize;
    let hold = Duration::from_secs(knob("TM_LOAD_IDLE_SECONDS", 5));
    // The server starts with the soft open-files limit containers often have (1024) and must
    // raise it itself; the test's clients need a socket per connection too.
    util::set_nofile_soft(1024);
    // keepalives every second: the held connections must answer them all along
    let mut flags = LOAD_FLAGS.to_vec();
    flags.extend([
        "--client-alive-interval",
        "1",
        "--client-alive-count-max",
        "3",
    ]);
    let s = Sidecar::start_with(&flags);
    let nofile = sshc::raise_nofile(n as u64 + 512);
    assert!(
        nofile >= n as u64 + 256,
        "RLIMIT_NOFILE {nofile} is too low for {n} connections"
    );
    let server_nofile = util::nofile_soft_of(s.child.id());
    assert!(
        server_nofile >= n as u64 + 256,
        "the server kept an open-files limit of {server_nofile}"
    );
    assert!(run(&mut s.ssh(&["true"]), T).status.success());
    let mem = Memory::start(&s);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let key = sshc::load_key(&s.client_key());
    let (addr, user) = (s.ssh, common::me());
    // Two rounds: a leak would show as RSS growing from one to the next, and at the end.
    for round in 1..=2 {
        let began = Instant::now();
        let (conns, errors) = rt.block_on(sshc::connect_many(addr, &user, &key, n, 64));
        let connect_time = began.elapsed();
        assert!(errors.is_empty(), "{} failed: {:?}", errors.len(), errors);
        wait_until("every connection authenticated on the server", T, || {
            let m = metrics(&s);
            value(&m, "tm_sidecar_ssh_connections_active", &[]) == n as f64
                && value(&m, "tm_sidecar_ssh_connections_unauthenticated", &[]) == 0.0
        });
        let held = mem.rss();
        // hold them (the scenario's duration, not a synchronisation); new logins work meanwhile
        let until = Instant::now() + hold;
        let mut fresh = 0;
        while Instant::now() < until {
            let t = Instant::now();
            let out = run(&mut s.ssh(&["echo fresh"]), T);
            assert!(out.status.success() && out.stdout == b"fresh\n", "{out:?}");
            fresh += 1;
            if let Some(rest) = Duration::from_secs(1).checked_sub(t.elapsed()) {
                std::thread::sleep(rest.min(until.saturating_duration_since(Instant::now())));
            }
        }
        let alive = conns.iter().filter(|c| !c.is_closed()).count();
        assert_eq!(alive, n, "idle connections dropped while held");
        let m = metrics(&s);
        assert_eq!(
            value(&m, "tm_sidecar_ssh_connections_active", &[]),
            n as f64
        );
        // the server still runs work on the held connections themselves
        let step = (n / 10).max(1);
        let echoed = rt.block_on(async {
            let mut ok = 0;
            for c in conns.iter().step_by(step) {
                let r = sshc::exec(c, "echo held", b"").await;
                if r.is_ok_and(|r| r.stdout == b"held\n" && r.exit_status == Some(0)) {
                    ok += 1;
                }
            }
            ok
        });
        assert_eq!(echoed, n.div_ceil(step));
        drop(conns);
        quiet_server(&s);
        let rss = mem.rss();
        eprintln!(
            "round {round}: {n} idle connections connected in {:.1} s, held {:.0} s, {fresh} fresh \
             logins meanwhile; RSS {held} KiB held ({:.1} KiB per connection over the baseline), \
             {rss} KiB after",
            connect_time.as_secs_f64(),
            hold.as_secs_f64(),
            held.saturating_sub(mem.baseline) as f64 / n as f64
        );
    }
    mem.check_returned("idle connections");
}

// ---------------------------------------------------------------------------------------------

#[test]
fn monitord_relays_every_valid_udp_message_of_a_mixed_flood() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mbps = knob("TM_LOAD_UDP_MBPS", 4);
    let seconds = knob("TM_LOAD_UDP_SECONDS", 5);
    // onemonitord stand-in: counts what arrives and checks it is byte-identical to a valid one
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&sink, 32 << 20);
    sink.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let s = Sidecar::start_with(&[
        "--monitord-upstream",
        &sink_addr.to_string(),
        "--monitord-rate-limit",
        "0",
    ]);
    let mem = Memory::start(&s);
    let mix = Arc::new(udpgen::mix(100, 1024, 20));
    let valid_set: HashSet<Vec<u8>> = mix
        .iter()
        .filter(|m| m.valid)
        .map(|m| m.bytes.clone())
        .collect();
    let received = Arc::new(AtomicU64::new(0));
    let foreign = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sink_thread = {
        let (received, foreign, stop) = (received.clone(), foreign.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::SeqCst) {
                if let Ok(n) = sink.recv(&mut buf) {
                    if valid_set.contains(&buf[..n]) {
                        received.fetch_add(1, Ordering::Relaxed);
                    } else {
                        foreign.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    // paced sender: `mbps` MB/s for `seconds`
    let to = s.monitord.unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(to).unwrap();
    let rate = (mbps * 1_000_000) as f64;
    let (mut valid, mut invalid, mut bytes) = (0u64, 0u64, 0u64);
    let began = Instant::now();
    let duration = Duration::from_secs(seconds);
    let mut i = 0;
    while began.elapsed() < duration {
        let due = began.elapsed().as_secs_f64() * rate;
        if bytes as f64 >= due {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        let m = &mix[i % mix.len()];
        tx.send(&m.bytes).unwrap();
        bytes += m.bytes.len() as u64;
        if m.valid {
            valid += 1;
        } else {
            invalid += 1;
        }
        i += 1;
    }
    let sent_for = began.elapsed();
    // everything is accounted for by the relay, and every valid message reaches the sink
    let accounted = |m: &[common::admin::Sample]| {
        value(
            m,
            "tm_sidecar_monitord_messages_total",
            &[("transport", "udp")],
        ) + value(
            m,
            "tm_sidecar_monitord_rejected_total",
            &[("transport", "udp")],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while (accounted(&metrics(&s)) < (valid + invalid) as f64
        || received.load(Ordering::Relaxed) < valid)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    sink_thread.join().unwrap();
    let m = metrics(&s);
    let got = received.load(Ordering::Relaxed);
    // the kernel's own count, should a receive buffer have overflowed (relay or sink)
    let drops = format!(
        "kernel receive-buffer drops: relay {}, sink {}",
        util::udp_drops(to.port()),
        util::udp_drops(sink_addr.port())
    );
    eprintln!(
        "monitord UDP: {:.1} MB/s for {:.1} s, {valid} valid + {invalid} invalid sent; relay \
         counted {} + {} rejected; {got} relayed to the sink; {drops}",
        bytes as f64 / 1e6 / sent_for.as_secs_f64(),
        sent_for.as_secs_f64(),
        value(&m, "tm_sidecar_monitord_messages_total", &[]),
        value(&m, "tm_sidecar_monitord_rejected_total", &[]),
    );
    assert_eq!(
        value(
            &m,
            "tm_sidecar_monitord_messages_total",
            &[("transport", "udp")]
        ),
        valid as f64,
        "valid messages counted ({drops})"
    );
    let mut rejected = 0.0;
    for reason in udpgen::INVALID_KINDS {
        let r = value(
            &m,
            "tm_sidecar_monitord_rejected_total",
            &[("transport", "udp"), ("reason", reason)],
        );
        assert!(r > 0.0, "no {reason} rejections");
        rejected += r;
    }
    assert_eq!(
        rejected, invalid as f64,
        "invalid messages refused by reason"
    );
    assert_eq!(
        value(
            &m,
            "tm_sidecar_monitord_forwarded_total",
            &[("transport", "udp"), ("result", "ok")]
        ),
        valid as f64
    );
    assert_eq!(got, valid, "valid messages relayed ({drops})");
    assert_eq!(
        foreign.load(Ordering::Relaxed),
        0,
        "only valid bytes relayed"
    );
    // and the SSH side is unaffected
    assert!(run(&mut s.ssh(&["true"]), T).status.success());
    mem.check_returned("monitord");
}
