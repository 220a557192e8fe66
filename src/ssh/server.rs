//! SSH listeners and accept loop. STUB.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use prometheus_client::registry::Registry;
use russh::keys::PrivateKey;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ssh::auth::AuthPolicy;
use crate::transfer::Transfer;

pub struct SshServer {
    addrs: Vec<SocketAddr>,
}

impl SshServer {
    pub async fn bind(
        _config: &Config,
        _host_keys: Vec<PrivateKey>,
        _auth: AuthPolicy,
        _transfer: Arc<Transfer>,
        _registry: &mut Registry,
    ) -> Result<SshServer> {
        Ok(SshServer { addrs: vec![] })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    pub async fn run(self, shutdown: CancellationToken, _grace: Duration) {
        shutdown.cancelled().await;
    }
}
