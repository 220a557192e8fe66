//! UDP load generator for the monitord relay (bench/).
//!
//! Sends realistic MONITOR_VM messages (OpenNebula wire format, ~`--size` bytes each, from
//! `--hosts` host ids) to `--target` at `--rate` messages/s (or `--mbps` MB/s) for `--duration`
//! seconds, and reports how many were sent. `--invalid-percent` mixes in malformed messages of
//! the same size (unknown type, bad base64, bad zlib, bad host id, missing fields), which the
//! relay must refuse. With `--sink ADDR` it also plays onemonitord: it binds a UDP socket there
//! (point the sidecar's `--monitord-upstream` at it) and reports how many valid messages arrived
//! byte-identical, i.e. the loss. `--json` prints the summary as one JSON object.
//!
//! ```text
//! cargo run --release --example monitord_load -- --target 127.0.0.1:4124 \
//!     --sink 127.0.0.1:5124 --rate 20000 --duration 30 --size 1024
//! cargo run --release --example monitord_load -- --target 127.0.0.1:4124 \
//!     --sink 127.0.0.1:5124 --mbps 50 --invalid-percent 20 --duration 60 --json
//! ```
//! (start the sidecar with `--monitord-rate-limit 0`: all load comes from one source address).

#[path = "../tests/support/udpgen.rs"]
mod udpgen;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// The sidecar's monitord address.
    #[arg(long, default_value = "127.0.0.1:4124")]
    target: SocketAddr,
    /// Messages per second in total (0 = as fast as possible).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Megabytes (10^6) per second in total; overrides --rate.
    #[arg(long)]
    mbps: Option<f64>,
    /// Seconds to send for.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Approximate wire size of one message in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Distinct host ids (one prebuilt valid message each).
    #[arg(long, default_value_t = 100)]
    hosts: i32,
    /// Share of malformed messages, in percent (0-90).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=90))]
    invalid_percent: u32,
    /// Sender threads.
    #[arg(long, default_value_t = 1)]
    threads: u64,
    /// Also bind a UDP sink here (the sidecar's upstream) and count what arrives.
    #[arg(long)]
    sink: Option<SocketAddr>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    let mix = Arc::new(udpgen::mix(args.hosts, args.size, args.invalid_percent));
    let avg = mix.iter().map(|m| m.bytes.len()).sum::<usize>() / mix.len();
    let rate = match args.mbps {
        Some(mbps) => (mbps * 1e6 / avg as f64) as u64,
        None => args.rate,
    };
    eprintln!(
        "{} distinct messages ({} malformed), {avg} bytes on average, {rate} msg/s",
        mix.len(),
        mix.iter().filter(|m| !m.valid).count()
    );

    let received = Arc::new(AtomicU64::new(0));
    let foreign = Arc::new(AtomicU64::new(0));
    let stop_sink = Arc::new(AtomicBool::new(false));
    let sink_thread = args.sink.map(|addr| {
        let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("--sink {addr}: {e}"));
        if rustix::net::sockopt::set_socket_recv_buffer_size_force(&sock, 32 << 20).is_err() {
            let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&sock, 16 << 20);
        }
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let valid: HashSet<Vec<u8>> = mix
            .iter()
            .filter(|m| m.valid)
            .map(|m| m.bytes.clone())
            .collect();
        let (received, foreign, stop) = (received.clone(), foreign.clone(), stop_sink.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    if valid.contains(&buf[..n]) {
                        received.fetch_add(1, Ordering::Relaxed);
                    } else {
                        foreign.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    });

    let sent_valid = Arc::new(AtomicU64::new(0));
    let sent_invalid = Arc::new(AtomicU64::new(0));
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let duration = Duration::from_secs_f64(args.duration);
    let start = Instant::now();
    let threads: Vec<_> = (0..args.threads.max(1))
        .map(|t| {
            let (mix, sv, si, sb, errors) = (
                mix.clone(),
                sent_valid.clone(),
                sent_invalid.clone(),
                sent_bytes.clone(),
                errors.clone(),
            );
            let target = args.target;
            let rate = rate / args.threads.max(1);
            let stride = args.threads.max(1) as usize;
            std::thread::spawn(move || {
                let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
                sock.connect(target).expect("connect");
                let mut i = t as usize;
                let mut n: u64 = 0;
                loop {
                    let elapsed = start.elapsed();
                    if elapsed >= duration {
                        break;
                    }
                    if rate > 0 {
                        // Send what is due by now; sleep a little when ahead of schedule.
                        let due = (elapsed.as_secs_f64() * rate as f64) as u64;
                        if n >= due {
                            std::thread::sleep(Duration::from_micros(200));
                            continue;
                        }
                    }
                    let m = &mix[i % mix.len()];
                    match sock.send(&m.bytes) {
                        Ok(_) => {
                            if m.valid { &sv } else { &si }.fetch_add(1, Ordering::Relaxed);
                            sb.fetch_add(m.bytes.len() as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                    i += stride;
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (valid, invalid) = (
        sent_valid.load(Ordering::Relaxed),
        sent_invalid.load(Ordering::Relaxed),
    );
    let bytes = sent_bytes.load(Ordering::Relaxed);
    let send_errors = errors.load(Ordering::Relaxed);
    let mut summary = serde_json::json!({
        "sent_valid": valid,
        "sent_invalid": invalid,
        "sent_bytes": bytes,
        "seconds": elapsed,
        "mb_per_s": bytes as f64 / 1e6 / elapsed,
        "msg_per_s": (valid + invalid) as f64 / elapsed,
        "avg_size": avg,
        "send_errors": send_errors,
    });
    if !args.json {
        println!(
            "sent {} messages ({valid} valid, {invalid} malformed) of ~{avg} bytes in {elapsed:.2} s: \
             {:.0} msg/s, {:.1} MB/s ({send_errors} send errors)",
            valid + invalid,
            (valid + invalid) as f64 / elapsed,
            bytes as f64 / 1e6 / elapsed,
        );
    }
    if let Some(t) = sink_thread {
        // Wait until the sink has been quiet for half a second.
        let mut last = received.load(Ordering::Relaxed);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = received.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        stop_sink.store(true, Ordering::Relaxed);
        let _ = t.join();
        let got = received.load(Ordering::Relaxed);
        let lost = valid.saturating_sub(got);
        summary["received_valid"] = got.into();
        summary["received_foreign"] = foreign.load(Ordering::Relaxed).into();
        summary["lost_valid"] = lost.into();
        if !args.json {
            // (bench/monitord.py parses this line: keep its start)
            println!(
                "received {got} at the sink: loss {lost} ({:.3} %); {} datagrams not a sent valid message",
                100.0 * lost as f64 / valid.max(1) as f64,
                foreign.load(Ordering::Relaxed),
            );
        }
    }
    if args.json {
        println!("{summary}");
    }
}
