//! Hot reload of authorized_keys and trusted CA keys: on SIGHUP, and when a watched file
//! changes. Kubernetes updates a mounted Secret by swapping the `..data` symlink, so a file is
//! identified by what its path resolves to (device, inode, size, mtime), not by the path.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ssh::auth::AuthPolicy;

/// How often the files are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

type Stamp = Vec<Option<(u64, u64, u64, i64, i64)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
        })
        .collect()
}

/// Reload `auth` on SIGHUP or when any of `paths` changes, until `shutdown`.
pub async fn watch(auth: AuthPolicy, paths: Vec<PathBuf>, shutdown: CancellationToken) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot install SIGHUP handler; reload on file change only");
            None
        }
    };
    let mut last = stamp(&paths);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        let why = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => "SIGHUP",
            _ = tick.tick() => {
                if stamp(&paths) == last { continue; }
                "file changed"
            }
        };
        match auth.reload() {
            Ok(()) => info!(reason = why, "authorized keys reloaded"),
            Err(e) => {
                warn!(reason = why, error = %format!("{e:#}"), "reload failed; keeping the previous keys")
            }
        }
        last = stamp(&paths);
    }
}
