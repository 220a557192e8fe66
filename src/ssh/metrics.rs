//! Prometheus metrics of the SSH server. Label values are fixed strings, so label sets stay
//! bounded whatever peers send.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::collect::gauge;
use crate::ssh::limits::{Penalties, Startups};

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// Counters and gauges of the SSH side.
#[derive(Clone, Default)]
pub struct SshMetrics {
    connections_active: Gauge,
    connections: Family<Labels1, Counter>,
    refused: Family<Labels1, Counter>,
    auth_attempts: Family<Labels2, Counter>,
    channels_active: Family<Labels1, Gauge>,
    channels: Family<Labels1, Counter>,
    exec_exits: Family<Labels1, Counter>,
    bytes: Family<Labels1, Counter>,
}

impl SshMetrics {
    pub fn new(
        registry: &mut Registry,
        startups: Arc<Startups>,
        penalties: Arc<Penalties>,
    ) -> SshMetrics {
        let m = SshMetrics::default();
        let r = registry.sub_registry_with_prefix("ssh");
        r.register_collector(Box::new(LimitsCollector {
            startups,
            penalties,
        }));
        r.register(
            "connections_active",
            "Open SSH connections",
            m.connections_active.clone(),
        );
        r.register(
            "connections",
            "SSH connections by how they ended (closed, unauthenticated, grace_exceeded, failed, auth_tries_exceeded, unused_timeout, shutdown)",
            m.connections.clone(),
        );
        r.register(
            "connections_refused",
            "SSH connections refused before the handshake, by reason (penalty, max_connections, max_startups, per_source_startups)",
            m.refused.clone(),
        );
        r.register(
            "auth_attempts",
            "Authentication attempts by method and result",
            m.auth_attempts.clone(),
        );
        r.register(
            "channels_active",
            "Open session channels by kind (exec, shell, scp, sftp, agent)",
            m.channels_active.clone(),
        );
        r.register(
            "channels",
            "Session channels started, by kind",
            m.channels.clone(),
        );
        r.register(
            "exec_completions",
            "Finished exec/shell/scp channels by exit class (success, failure, signal, killed)",
            m.exec_exits.clone(),
        );
        r.register_with_unit(
            "channel",
            "Channel payload bytes by direction (in = from clients, out = to clients)",
            Unit::Bytes,
            m.bytes.clone(),
        );
        m
    }

    pub fn connection_opened(&self) {
        self.connections_active.inc();
    }

    pub fn connection_closed(&self, outcome: &'static str) {
        self.connections_active.dec();
        self.connections
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn auth_attempt(&self, method: &'static str, result: &'static str) {
        self.auth_attempts
            .get_or_create(&[("method", method), ("result", result)])
            .inc();
    }

    /// Count a channel as started and active; the guard decrements the gauge when dropped.
    pub fn channel(&self, kind: &'static str) -> ChannelGuard {
        self.channels.get_or_create(&[("kind", kind)]).inc();
        let gauge = self
            .channels_active
            .get_or_create(&[("kind", kind)])
            .clone();
        gauge.inc();
        ChannelGuard { gauge }
    }

    pub fn exec_exit(&self, class: &'static str) {
        self.exec_exits.get_or_create(&[("class", class)]).inc();
    }

    pub fn bytes_in(&self, n: usize) {
        self.bytes
            .get_or_create(&[("direction", "in")])
            .inc_by(n as u64);
    }

    pub fn bytes_out(&self, n: usize) {
        self.bytes
            .get_or_create(&[("direction", "out")])
            .inc_by(n as u64);
    }
}

/// Keeps a channel counted as active while alive.
pub struct ChannelGuard {
    gauge: Gauge,
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Scrape-time view of the pre-authentication limits.
struct LimitsCollector {
    startups: Arc<Startups>,
    penalties: Arc<Penalties>,
}

impl std::fmt::Debug for LimitsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LimitsCollector")
    }
}

impl Collector for LimitsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "connections_unauthenticated",
            "SSH connections still authenticating (counted against --max-startups)",
            None,
            self.startups.pending() as f64,
        )?;
        gauge(
            &mut encoder,
            "penalties_active",
            "Source addresses currently refused by per-source penalties",
            None,
            self.penalties.active(Instant::now()) as f64,
        )
    }
}
