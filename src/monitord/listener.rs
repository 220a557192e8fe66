//! UDP and TCP listeners and the per-message pipeline: limit → decode → account → forward.
//!
//! UDP: a few receive tasks per socket, each with its own 64 KiB buffer, decoder scratch space and
//! connected upstream socket, so the steady state allocates nothing per datagram beyond the
//! payload parse. TCP: one message per connection, read until EOF under a size cap and a deadline,
//! with a cap on concurrent connections.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::metrics::Metrics;
use super::relay::{ForwardBatch, TcpQueue, UdpForwarder};
use super::state::{HostTable, Recorded, Update};
use super::wire::{DecodeOptions, Decoder, Reject, Transport};
use crate::escape::escape_bytes;

/// UDP receive buffer: onemonitord accepts `0 < n < 65536`.
pub const UDP_BUF: usize = 65536;
/// Datagrams handled per wake-up before forwarding them together.
const UDP_BURST: usize = 64;

/// Per-source token bucket (messages per second, burst of one second's worth).
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_sources: usize,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(rate: u32) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(rate.max(1)),
            max_sources: 65_536,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// True if `ip` may send one more message now. A rate of 0 disables the limit.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() >= self.max_sources && !b.contains_key(&ip) {
            // Forget sources whose bucket has refilled; they lose nothing by it.
            let (rate, burst) = (self.rate, self.burst);
            b.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
            if b.len() >= self.max_sources {
                b.clear();
            }
        }
        let (tokens, at) = b.entry(ip).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate)
            .min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Everything a receive task needs, shared.
pub struct Pipeline {
    pub metrics: Arc<Metrics>,
    pub table: Arc<HostTable>,
    pub decode: DecodeOptions,
    pub upstream: Option<SocketAddr>,
    pub tcp_queue: Option<Arc<TcpQueue>>,
    pub limiter: RateLimiter,
    pub max_message_bytes: usize,
    pub read_timeout: Duration,
    pub connections: Arc<Semaphore>,
    last_warn: AtomicU64,
    started: Instant,
}

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        metrics: Arc<Metrics>,
        table: Arc<HostTable>,
        decode: DecodeOptions,
        upstream: Option<SocketAddr>,
        tcp_queue: Option<Arc<TcpQueue>>,
        rate_limit: u32,
        max_message_bytes: usize,
        read_timeout: Duration,
        max_connections: usize,
    ) -> Pipeline {
        Pipeline {
            metrics,
            table,
            decode,
            upstream,
            tcp_queue,
            limiter: RateLimiter::new(rate_limit),
            max_message_bytes,
            read_timeout,
            connections: Arc::new(Semaphore::new(max_connections.max(1))),
            last_warn: AtomicU64::new(u64::MAX),
            started: Instant::now(),
        }
    }

    /// Count a refusal; log it at warn level at most once a second (debug otherwise).
    fn reject(&self, t: Transport, r: Reject, peer: SocketAddr, sample: &[u8]) {
        self.metrics.reject(t, r);
        let sec = self.started.elapsed().as_secs();
        let prev = self.last_warn.load(Ordering::Relaxed);
        if prev != sec
            && self
                .last_warn
                .compare_exchange(prev, sec, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(transport = t.as_str(), source = %peer, reason = r.as_str(), sample = %escape_bytes(sample, 120),
                "monitord: message refused (further refusals this second are only counted)");
        } else {
            debug!(transport = t.as_str(), source = %peer, reason = r.as_str(), "monitord: message refused");
        }
    }

    /// Decode and account one whole message; returns its (host id, type) if it is well-formed
    /// and must be forwarded.
    pub fn process(
        &self,
        t: Transport,
        decoder: &mut Decoder,
        peer: SocketAddr,
        msg: &[u8],
    ) -> Option<(i32, super::wire::MsgType)> {
        let m = match decoder.decode(msg) {
            Ok(m) => m,
            Err(r) => {
                self.reject(t, r, peer, msg);
                return None;
            }
        };
        self.metrics.message(t, m.ty, m.status);
        let update = match Update::from_message(&m) {
            Ok(u) => u,
            Err(e) => {
                self.metrics.payload_error(m.ty);
                debug!(source = %peer, r#type = m.ty.as_str(), host_id = m.host_id, error = %escape_bytes(e.to_string().as_bytes(), 200),
                    "monitord: payload is not a valid template");
                Update::None
            }
        };
        match self
            .table
            .record(m.ty, m.status, m.host_id, m.epoch, update)
        {
            Recorded::Updated => {}
            Recorded::OutOfOrder => self.metrics.out_of_order(m.ty),
            Recorded::Untracked => {
                self.metrics.untracked_hosts.inc();
            }
        }
        Some((m.host_id, m.ty))
    }
}

/// Receive loop for one UDP socket (several may run on the same socket).
pub async fn udp_loop(sock: Arc<UdpSocket>, p: Arc<Pipeline>, stop: CancellationToken) {
    let mut buf = vec![0u8; UDP_BUF];
    let mut decoder = Decoder::new(p.decode.clone());
    let forwarder = match p.upstream {
        Some(up) => match UdpForwarder::connect(up, p.metrics.clone()) {
            Ok(f) => Some(f),
            Err(e) => {
                warn!(upstream = %up, error = %e, "monitord: cannot open the UDP upstream socket; UDP messages will not be forwarded");
                None
            }
        },
        None => None,
    };
    let cap = p.max_message_bytes.min(UDP_BUF - 1);
    // Datagrams are drained in bursts without waiting, then forwarded with one sendmmsg per
    // burst: one syscall and one wake-up of onemonitord per burst instead of per message.
    let mut batch = ForwardBatch::default();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = sock.readable() => if let Err(e) = r {
                debug!(error = %e, "monitord: UDP socket error");
                continue;
            },
        }
        for _ in 0..UDP_BURST {
            let (n, peer) = match sock.try_recv_from(&mut buf) {
                Ok(v) => v,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ICMP errors and the like; the socket stays usable.
                    debug!(error = %e, "monitord: UDP receive error");
                    continue;
                }
            };
            if !p.limiter.allow(peer.ip(), Instant::now()) {
                p.reject(Transport::Udp, Reject::RateLimited, peer, &[]);
                continue;
            }
            if n == 0 {
                p.reject(Transport::Udp, Reject::Empty, peer, &[]);
                continue;
            }
            if n > cap {
                p.reject(Transport::Udp, Reject::TooLarge, peer, &buf[..n.min(120)]);
                continue;
            }
            let msg = &buf[..n];
            if p.process(Transport::Udp, &mut decoder, peer, msg).is_some() && forwarder.is_some() {
                batch.push(msg);
            }
        }
        if let Some(f) = &forwarder
            && !batch.is_empty()
        {
            f.forward_batch(&batch);
        }
        batch.clear();
        // Let the TCP side and the other tasks run between bursts.
        tokio::task::yield_now().await;
    }
}

/// Accept loop for one TCP listener; connections are tracked so that shutdown can wait for them.
pub async fn tcp_loop(
    listener: TcpListener,
    p: Arc<Pipeline>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    warn!(error = %e, "monitord: TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = p.connections.clone().try_acquire_owned() else {
            p.reject(Transport::Tcp, Reject::ConnectionLimit, peer, &[]);
            continue;
        };
        if !p.limiter.allow(peer.ip(), Instant::now()) {
            p.reject(Transport::Tcp, Reject::RateLimited, peer, &[]);
            continue;
        }
        let p = p.clone();
        tracker.spawn(async move {
            p.metrics.tcp_connections.inc();
            handle_tcp(stream, peer, &p).await;
            p.metrics.tcp_connections.dec();
            drop(permit);
        });
    }
}

enum ReadEnd {
    Eof,
    TooLarge,
    Error,
}

async fn handle_tcp(mut stream: tokio::net::TcpStream, peer: SocketAddr, p: &Pipeline) {
    let cap = p.max_message_bytes;
    let mut msg = Vec::with_capacity(4096);
    let read = async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => return ReadEnd::Eof,
                Ok(n) => {
                    if msg.len() + n > cap {
                        return ReadEnd::TooLarge;
                    }
                    msg.extend_from_slice(&chunk[..n]);
                }
                Err(e) => {
                    debug!(source = %peer, error = %e, "monitord: TCP read error");
                    return ReadEnd::Error;
                }
            }
        }
    };
    let end = match tokio::time::timeout(p.read_timeout, read).await {
        Ok(end) => end,
        Err(_) => {
            p.reject(
                Transport::Tcp,
                Reject::Timeout,
                peer,
                &msg[..msg.len().min(120)],
            );
            return;
        }
    };
    match end {
        ReadEnd::Eof => {}
        ReadEnd::TooLarge => {
            p.reject(
                Transport::Tcp,
                Reject::TooLarge,
                peer,
                &msg[..msg.len().min(120)],
            );
            return;
        }
        ReadEnd::Error => {
            p.reject(Transport::Tcp, Reject::ReadError, peer, &[]);
            return;
        }
    }
    drop(stream);
    if msg.is_empty() {
        p.reject(Transport::Tcp, Reject::Empty, peer, &[]);
        return;
    }
    let mut decoder = Decoder::new(p.decode.clone());
    if let Some((host_id, ty)) = p.process(Transport::Tcp, &mut decoder, peer, &msg)
        && let Some(q) = &p.tcp_queue
    {
        q.enqueue(host_id, ty, msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_per_source() {
        let l = RateLimiter::new(10);
        let t0 = Instant::now();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let allowed = (0..100).filter(|_| l.allow(a, t0)).count();
        assert_eq!(allowed, 10);
        assert!(l.allow(b, t0), "another source has its own bucket");
        assert!(!l.allow(a, t0));
        assert!(
            l.allow(a, t0 + Duration::from_millis(150)),
            "refilled at 10/s"
        );
        let unlimited = RateLimiter::new(0);
        assert!((0..10_000).all(|_| unlimited.allow(a, t0)));
    }

    #[test]
    fn limiter_map_is_bounded() {
        let mut l = RateLimiter::new(5);
        l.max_sources = 100;
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let ip: IpAddr = std::net::Ipv4Addr::from(i).into();
            assert!(l.allow(ip, t0));
        }
        assert!(l.buckets.lock().unwrap().len() <= 100);
    }
}
