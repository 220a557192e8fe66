//! Handing memory back to the system after bursts of transfers.
//!
//! Transfers allocate many short-lived packet buffers on several threads; glibc keeps what they
//! freed in per-thread arenas for the life of the process (eight parallel 512 MiB uploads left
//! ~130 MiB resident). When the last channel of the process ends, [`ChannelActivity`] asks glibc
//! to return free pages with `malloc_trim`, at most once a second, on a blocking thread; and
//! [`trim_after_churn`] catches what connections free after that (and idle connections).
//! (jemalloc returns memory by itself but cost ~25 % more CPU per uploaded byte here.)
//!
//! Since those explicit trims return memory when it is no longer in use, [`tune_allocator`]
//! stops glibc from doing it on its own in the middle of a transfer.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static LAST_TRIM: Mutex<Option<Instant>> = Mutex::new(None);
const MIN_TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Heap top kept by glibc before it shrinks the heap by itself.
const TRIM_THRESHOLD: i32 = 64 << 20;
/// Allocations from this size on get their own mapping.
const MMAP_THRESHOLD: i32 = 4 << 20;

/// Fixed malloc parameters, set at the start of `main` before other threads exist.
///
/// With glibc's defaults a streaming upload kept shrinking the heaps (`madvise`) and faulting
/// the same pages back in for the next packets: page faults, unmapping and memcg accounting
/// cost about a fifth of the server's CPU per uploaded GiB (1.5–2.1 s/GiB against 1.2–1.6 with
/// a fixed 64 MiB trim threshold). Memory then goes back to the system only through the trims
/// of this module, and `malloc_trim` can give back the top of the main heap but not of the
/// per-thread arenas: so one arena for all threads (packet buffers are too large for the
/// per-thread caches anyway; measured no slower, and peak RSS of a run of transfers went from
/// ~50 to ~30 MiB).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's malloc parameters, under glibc's own lock; it takes
    // no pointers. No safe wrapper exists in a maintained crate.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Held while a channel runs; dropping the last one trims the heap.
pub struct ChannelActivity(());

impl ChannelActivity {
    pub fn start() -> ChannelActivity {
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        ChannelActivity(())
    }
}

impl Drop for ChannelActivity {
    fn drop(&mut self) {
        if ACTIVE.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        {
            let mut last = LAST_TRIM.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < MIN_TRIM_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(trim);
            }
            Err(_) => trim(),
        }
    }
}

/// Return free heap pages of every arena to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas and madvises free pages; it takes no
    // pointers and has no preconditions. No safe wrapper exists in a maintained crate.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How often [`trim_after_churn`] looks at malloc's free bytes.
const CHURN_INTERVAL: Duration = Duration::from_secs(10);
/// Growth of malloc's free bytes since the last look that makes it trim.
const CHURN_GROWTH: usize = 4 << 20;

/// Connections free their memory after their last channel has ended, and idle connections (a
/// ControlPersist master, a monitoring probe's login) have none: after 1000 of them closed, RSS
/// stayed at its 58 MB peak. Every 10 s, trim when the free bytes glibc holds have grown by
/// 4 MiB since the last look (`mallinfo2`, on a blocking thread: it walks the arenas).
pub async fn trim_after_churn(shutdown: tokio_util::sync::CancellationToken) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut tick = tokio::time::interval(CHURN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut base = usize::MAX;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let step = tokio::task::spawn_blocking(move || {
                // SAFETY: mallinfo2 only reads glibc's arena statistics under its locks; it
                // takes no pointers and has no preconditions.
                let free = unsafe { libc::mallinfo2() }.fordblks;
                if free < base.saturating_add(CHURN_GROWTH) {
                    return base.min(free);
                }
                *LAST_TRIM.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                trim();
                // SAFETY: as above.
                unsafe { libc::mallinfo2() }.fordblks
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
    fn the_last_channel_trims_and_nothing_breaks() {
        let a = ChannelActivity::start();
        let b = ChannelActivity::start();
        let big: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 1 << 20]).collect();
        drop(big);
        drop(a);
        drop(b);
        assert_eq!(ACTIVE.load(Ordering::SeqCst), 0);
        assert!(LAST_TRIM.lock().unwrap().is_some());
    }
}
