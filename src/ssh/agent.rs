//! Agent forwarding: a per-session unix socket whose connections are relayed to the client over
//! `auth-agent@openssh.com` channels, so that a nested `ssh <hypervisor>` inside a TM script
//! authenticates with the key held by oned's agent.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::debug;

/// Agent connections one session may have open at once.
const MAX_AGENT_CONNECTIONS: usize = 16;

/// The listening socket of one session; removed with its private directory when dropped.
pub struct AgentSocket {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
    task: JoinHandle<()>,
}

impl Drop for AgentSocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Create the socket in a fresh 0700 directory under the temp dir and start relaying.
pub fn start(handle: russh::server::Handle) -> std::io::Result<AgentSocket> {
    let dir = tempfile::Builder::new()
        .prefix("tm-sidecar-agent.")
        .tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let slots = Arc::new(Semaphore::new(MAX_AGENT_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut local, _)) = listener.accept().await else {
                return;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                debug!("agent forwarding: too many agent connections, refusing one");
                continue;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                match handle.channel_open_agent().await {
                    Ok(channel) => {
                        let mut remote = channel.into_stream();
                        let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                    }
                    Err(e) => debug!(error = %e, "agent forwarding: client refused the channel"),
                }
                drop(permit);
            });
        }
    });
    Ok(AgentSocket {
        path,
        _dir: dir,
        task,
    })
}
