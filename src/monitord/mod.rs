//! The monitord relay on 4124 TCP+UDP (issue 8): decode OpenNebula's wire format, keep per-host
//! state, export metrics, forward the original bytes to onemonitord.
//!
//! STUB: interface only; the implementation lands with the monitord issue.

pub mod send;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::MonitordConfig;

/// Bound listeners, ready to run.
pub struct Monitord {
    table: Arc<state::HostTable>,
    addrs: Vec<SocketAddr>,
}

impl Monitord {
    /// Bind every TCP and UDP listener (errors name the flag and address) and register metrics.
    pub async fn bind(cfg: &MonitordConfig, _registry: &mut Registry) -> Result<Monitord> {
        Ok(Monitord {
            table: Arc::new(state::HostTable::new(cfg.max_hosts)),
            addrs: vec![],
        })
    }

    /// Validate what `bind` would load (the private key), without binding (`check-config`).
    pub fn check(_cfg: &MonitordConfig) -> Result<()> {
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
        shutdown.cancelled().await;
    }
}
