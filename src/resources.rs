//! Process-wide resources of a server that keeps every connection in one process (sshd forks one
//! per connection): the open-files limit. (Freed memory: see [`crate::memory`].)

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
