//! The monitord relay on 4124 TCP+UDP (issue 8): decode OpenNebula's wire format, keep per-host
//! state, export metrics, forward the original bytes to onemonitord.
//!
//! * [`wire`]: message codec (decode, encode, RSA), [`payload`]: template parser,
//! * [`listener`]: UDP/TCP receive loops, limits and the per-message pipeline,
//! * [`relay`]: forwarding (UDP datagrams; TCP newest-per-(host, type) retry queue),
//! * [`state`]: the host table (`/api/v1/hosts`, per-host gauges), [`metrics`]: counters,
//! * [`send`]: `tm-sidecar monitord-send`.

pub mod listener;
pub mod metrics;
pub mod payload;
pub mod relay;
pub mod send;
pub mod state;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::config::MonitordConfig;

/// How long shutdown waits for queued TCP messages to reach the upstream.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound listeners, ready to run.
pub struct Monitord {
    table: Arc<state::HostTable>,
    addrs: Vec<SocketAddr>,
    udp: Vec<Arc<UdpSocket>>,
    tcp: Vec<TcpListener>,
    pipeline: Arc<listener::Pipeline>,
}

/// Receive tasks per UDP socket: one per core, at most 4.
fn udp_tasks() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
}

impl Monitord {
    /// Bind every TCP and UDP listener (errors name the flag and address) and register metrics.
    pub async fn bind(cfg: &MonitordConfig, registry: &mut Registry) -> Result<Monitord> {
        let private_key = match &cfg.private_key {
            Some(path) => Some(Arc::new(wire::load_private_key(path)?)),
            None => None,
        };
        let mut addrs = Vec::new();
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for &addr in &cfg.listen {
            // TCP first: with port 0 the UDP socket then takes the port TCP got.
            let t = TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow!("--monitord-listen {addr}: cannot bind TCP: {e}"))?;
            let actual = t
                .local_addr()
                .map_err(|e| anyhow!("--monitord-listen {addr}: {e}"))?;
            let u = UdpSocket::bind(actual).await.map_err(|e| {
                anyhow!("--monitord-listen {addr}: cannot bind UDP on {actual}: {e}")
            })?;
            // Bursts of datagrams must not overflow the default (~200 KiB) receive buffer.
            let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&u, 8 << 20);
            addrs.push(actual);
            udp.push(Arc::new(u));
            tcp.push(t);
        }

        let metrics = Arc::new(metrics::Metrics::register(registry));
        let table = Arc::new(state::HostTable::new(cfg.max_hosts));
        registry.register_collector(Box::new(state::HostCollector(table.clone())));
        let tcp_queue = cfg
            .upstream
            .map(|up| relay::TcpQueue::new(up, relay::QueueLimits::default(), metrics.clone()));
        let pipeline = Arc::new(listener::Pipeline::new(
            metrics,
            table.clone(),
            wire::DecodeOptions {
                private_key,
                require_encryption: cfg.require_encryption,
                max_inflated: cfg.max_inflated_bytes,
            },
            cfg.upstream,
            tcp_queue,
            cfg.rate_limit,
            cfg.max_message_bytes,
            cfg.read_timeout,
            cfg.max_connections,
        ));
        Ok(Monitord {
            table,
            addrs,
            udp,
            tcp,
            pipeline,
        })
    }

    /// Validate what `bind` would load (the private key), without binding (`check-config`).
    pub fn check(cfg: &MonitordConfig) -> Result<()> {
        if let Some(path) = &cfg.private_key {
            wire::load_private_key(path)?;
        }
        Ok(())
    }

    /// The host table, for `/api/v1/hosts`.
    pub fn host_table(&self) -> Arc<state::HostTable> {
        self.table.clone()
    }

    /// Addresses actually bound (UDP and TCP share them).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// Serve until `shutdown`; TCP accept stops at once, in-flight messages finish.
    pub async fn run(self, shutdown: CancellationToken) {
        let Monitord {
            udp,
            tcp,
            pipeline,
            addrs,
            ..
        } = self;
        if addrs.is_empty() {
            shutdown.cancelled().await;
            return;
        }
        info!(
            listen = ?addrs,
            upstream = ?pipeline.upstream,
            encrypted = pipeline.decode.private_key.is_some(),
            "monitord relay running"
        );
        let relay_stop = CancellationToken::new();
        let queue_task = pipeline
            .tcp_queue
            .clone()
            .map(|q| tokio::spawn(q.run(relay_stop.clone())));
        let tracker = TaskTracker::new();
        let mut loops = tokio::task::JoinSet::new();
        for sock in udp {
            for _ in 0..udp_tasks() {
                loops.spawn(listener::udp_loop(
                    sock.clone(),
                    pipeline.clone(),
                    shutdown.clone(),
                ));
            }
        }
        for l in tcp {
            loops.spawn(listener::tcp_loop(
                l,
                pipeline.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        while loops.join_next().await.is_some() {}
        // Listeners are closed; let accepted connections finish (bounded by the read timeout).
        tracker.close();
        tracker.wait().await;
        if let Some(q) = &pipeline.tcp_queue
            && !q.wait_empty(DRAIN_TIMEOUT).await
        {
            tracing::warn!(
                pending = q.len(),
                "monitord: TCP messages not delivered before shutdown"
            );
        }
        relay_stop.cancel();
        if let Some(t) = queue_task {
            let _ = t.await;
        }
    }
}
