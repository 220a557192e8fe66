//! UDP load generator for the monitord relay (bench/).
//!
//! Sends realistic MONITOR_VM messages (OpenNebula wire format, ~`--size` bytes each, from
//! `--hosts` host ids) to `--target` at `--rate` messages/s for `--duration` seconds, and reports
//! how many were sent. With `--sink ADDR` it also plays onemonitord: it binds a UDP socket there
//! (point the sidecar's `--monitord-upstream` at it) and reports how many arrived, i.e. the loss.
//!
//! ```text
//! cargo run --release --example monitord_load -- --target 127.0.0.1:4124 \
//!     --sink 127.0.0.1:5124 --rate 20000 --duration 30 --size 1024
//! ```
//! (start the sidecar with `--monitord-rate-limit 0`: all load comes from one source address).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use clap::Parser;
use tm_sidecar::monitord::wire::{self, MsgType, Status};

#[derive(Parser, Debug)]
struct Args {
    /// The sidecar's monitord address.
    #[arg(long, default_value = "127.0.0.1:4124")]
    target: SocketAddr,
    /// Messages per second in total (0 = as fast as possible).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Seconds to send for.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Approximate wire size of one message in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Distinct host ids (one prebuilt message each).
    #[arg(long, default_value_t = 100)]
    hosts: i32,
    /// Sender threads.
    #[arg(long, default_value_t = 1)]
    threads: u64,
    /// Also bind a UDP sink here (the sidecar's upstream) and count what arrives.
    #[arg(long)]
    sink: Option<SocketAddr>,
}

/// Deterministic xorshift, so that runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A MONITOR_VM message of about `size` bytes for `host`, as poll.rb would produce it.
fn message(host: i32, size: usize, rng: &mut Rng) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut payload = String::new();
    let mut vm = 0;
    loop {
        let monitor = format!(
            "CPU=\"{}.{}\"\nMEMORY=\"{}\"\nNETRX=\"{}\"\nNETTX=\"{}\"\nDISKRDBYTES=\"{}\"\nDISKWRBYTES=\"{}\"\nDISKRDIOPS=\"{}\"\nDISKWRIOPS=\"{}\"\n",
            rng.next() % 800,
            rng.next() % 100,
            rng.next() % 16_000_000,
            rng.next() % 1_000_000_000,
            rng.next() % 1_000_000_000,
            rng.next() % 1_000_000_000,
            rng.next() % 1_000_000_000,
            rng.next() % 100_000,
            rng.next() % 100_000
        );
        let line = format!(
            "VM = [ ID=\"{id}\", DEPLOY_ID=\"one-{id}\", MONITOR=\"{}\"]\n",
            b64.encode(monitor),
            id = host * 1000 + vm
        );
        let mut candidate = payload.clone();
        candidate.push_str(&line);
        let wire = wire::encode(
            MsgType::MonitorVm,
            Status::Success,
            host,
            1_724_150_000,
            candidate.as_bytes(),
            None,
        )
        .expect("encode");
        payload = candidate;
        if wire.len() >= size {
            break;
        }
        vm += 1;
    }
    wire::encode(
        MsgType::MonitorVm,
        Status::Success,
        host,
        1_724_150_000,
        payload.as_bytes(),
        None,
    )
    .expect("encode")
}

fn main() {
    let args = Args::parse();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let msgs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..args.hosts.max(1))
            .map(|h| message(h, args.size, &mut rng))
            .collect(),
    );
    let avg = msgs.iter().map(Vec::len).sum::<usize>() / msgs.len();
    eprintln!("{} distinct messages, {avg} bytes on average", msgs.len());

    let received = Arc::new(AtomicU64::new(0));
    let stop_sink = Arc::new(AtomicBool::new(false));
    let sink_thread = args.sink.map(|addr| {
        let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("--sink {addr}: {e}"));
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&sock, 16 << 20);
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let (received, stop) = (received.clone(), stop_sink.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    });

    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let duration = Duration::from_secs_f64(args.duration);
    let start = Instant::now();
    let threads: Vec<_> = (0..args.threads.max(1))
        .map(|t| {
            let (msgs, sent, errors) = (msgs.clone(), sent.clone(), errors.clone());
            let target = args.target;
            let rate = args.rate / args.threads.max(1);
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
                    match sock.send(&msgs[i % msgs.len()]) {
                        Ok(_) => {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                    i += 1;
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    println!(
        "sent {sent} messages of ~{avg} bytes in {elapsed:.2} s: {:.0} msg/s ({} send errors)",
        sent as f64 / elapsed,
        errors.load(Ordering::Relaxed)
    );
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
        println!(
            "received {got} at the sink: loss {} ({:.3} %)",
            sent.saturating_sub(got),
            100.0 * sent.saturating_sub(got) as f64 / sent.max(1) as f64
        );
    }
}
