//! Idle-connection load generator for the SSH server (bench/load.py).
//!
//! Opens `--count` SSH connections to `--target`, authenticates each with `--key` as `--user`
//! (russh client, in one process: a thousand OpenSSH client processes would measure the clients),
//! prints one JSON line when all are up, holds them for `--hold` seconds without opening any
//! channel (an idle ControlPersist master looks like this), checks they are all still open, runs
//! `echo held` on every tenth, then closes them and prints a second JSON line.
//!
//! ```text
//! cargo run --release --example ssh_load -- --target 127.0.0.1:2222 \
//!     --key keys/dev/oneadmin_ed25519 --user oneadmin --count 1000 --hold 60
//! ```
//! (start the sidecar with `--max-startups 1000:30:2000 --per-source-max-startups 999`: all
//! connections come from one address; raise `ulimit -n` on both sides.)

#[path = "../tests/support/sshc.rs"]
mod sshc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:2222")]
    target: SocketAddr,
    /// Private key (OpenSSH format, unencrypted).
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value = "oneadmin")]
    user: String,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Seconds to hold them.
    #[arg(long, default_value_t = 60.0)]
    hold: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    sshc::raise_nofile(args.count as u64 + 256);
    let key = sshc::load_key(&args.key);
    let began = Instant::now();
    let (conns, mut errors) =
        sshc::connect_many(args.target, &args.user, &key, args.count, args.concurrency).await;
    let connect_seconds = began.elapsed().as_secs_f64();
    errors.sort();
    errors.dedup();
    println!(
        "{}",
        serde_json::json!({
            "event": "connected",
            "connected": conns.len(),
            "errors": args.count - conns.len(),
            "error_kinds": errors,
            "connect_seconds": connect_seconds,
        })
    );
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let alive = conns.iter().filter(|c| !c.is_closed()).count();
    let step = (conns.len() / 10).max(1);
    let (mut exec_ok, mut exec_failed) = (0, 0);
    for c in conns.iter().step_by(step) {
        match sshc::exec(c, "echo held", b"").await {
            Ok(r) if r.stdout == b"held\n" && r.exit_status == Some(0) => exec_ok += 1,
            _ => exec_failed += 1,
        }
    }
    for c in &conns {
        let _ = c
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
    drop(conns);
    println!(
        "{}",
        serde_json::json!({
            "event": "done",
            "alive_after_hold": alive,
            "exec_ok": exec_ok,
            "exec_failed": exec_failed,
        })
    );
}
