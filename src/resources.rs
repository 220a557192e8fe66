//! Process-wide resources of a server that keeps every connection in one process (sshd forks one
//! per connection): the open-files limit, and giving freed memory back to the system.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Descriptors a connection needs (its socket), plus headroom for listeners, children's pipes,
/// files being transferred and the admin endpoint.
const FDS_HEADROOM: u64 = 256;

/// Raise the soft RLIMIT_NOFILE to the hard limit (containers often start with 1024, and
/// `--max-connections` defaults to 2048); warn when even that is short of what
/// `max_connections` needs. Children inherit the raised limit.
pub fn raise_open_files_limit(max_connections: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    // an unlimited hard limit still has the kernel's nr_open ceiling: stay well below it
    let hard = cur.maximum.unwrap_or(1 << 20).min(1 << 20);
    let mut soft = cur.current.unwrap_or(u64::MAX);
    if soft < hard {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: cur.maximum,
            },
        ) {
            Ok(()) => soft = hard,
            Err(e) => warn!(error = %e, "cannot raise the open-files limit"),
        }
    }
    let need = max_connections as u64 + FDS_HEADROOM;
    if soft < need {
        warn!(
            open_files_limit = soft,
            max_connections,
            "the open-files limit (ulimit -n) is below what --max-connections needs: connections \
             past it wait in the listen queue"
        );
    } else {
        info!(open_files_limit = soft, "open-files limit");
    }
}

/// How often freed memory is looked at.
const TRIM_INTERVAL: Duration = Duration::from_secs(10);
/// Growth of malloc's free bytes since the last trim that makes the next tick trim.
const TRIM_GROWTH: usize = 4 << 20;

/// glibc's malloc keeps memory freed by ended connections in its arenas when it lies below
/// still-used chunks: after a thousand connections come and go, the resident set would stay at
/// its peak. When the free bytes malloc holds have grown since the last look, `malloc_trim(0)`
/// hands their pages back to the system.
pub async fn return_freed_memory(shutdown: CancellationToken) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut tick = tokio::time::interval(TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut base = usize::MAX;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let step = tokio::task::spawn_blocking(move || {
                // SAFETY: mallinfo2 and malloc_trim only read and madvise glibc's own free
                // lists, under its arena locks.
                let free = unsafe { libc::mallinfo2() }.fordblks;
                if free >= base.saturating_add(TRIM_GROWTH) {
                    unsafe { libc::malloc_trim(0) };
                    unsafe { libc::mallinfo2() }.fordblks
                } else {
                    base.min(free)
                }
            })
            .await;
            match step {
                Ok(b) => base = b,
                Err(_) => return,
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    shutdown.cancelled().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_the_limit_keeps_at_least_the_old_one() {
        use rustix::process::{Resource, getrlimit};
        let before = getrlimit(Resource::Nofile).current;
        raise_open_files_limit(16);
        assert!(getrlimit(Resource::Nofile).current >= before);
    }
}
