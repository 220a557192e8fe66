//! Forwarding to onemonitord, byte-for-byte on the transport a message came on.
//!
//! * UDP: each receive task owns a non-blocking socket connected to the upstream and hands the
//!   datagram to the kernel; if that fails (buffer full, upstream refusing) it is counted and lost,
//!   as a probe's datagram would be.
//! * TCP: a message goes into a queue that keeps only the newest message per (host, type); a
//!   worker delivers each on a new connection (connect, write, close) and retries failures with
//!   exponential backoff. Listeners never wait for the upstream.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::metrics::{Forward, Metrics};
use super::wire::{MsgType, Transport};

/// Connected, non-blocking UDP socket towards the upstream (one per receive task).
pub struct UdpForwarder {
    sock: UdpSocket,
    metrics: Arc<Metrics>,
}

impl UdpForwarder {
    pub fn connect(upstream: SocketAddr, metrics: Arc<Metrics>) -> io::Result<UdpForwarder> {
        let local: SocketAddr = if upstream.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let sock = UdpSocket::bind(local)?;
        sock.connect(upstream)?;
        sock.set_nonblocking(true)?;
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&sock, 4 << 20);
        Ok(UdpForwarder { sock, metrics })
    }

    /// Send a batch of datagrams, in order, with as few `sendmmsg` calls as the kernel allows;
    /// never blocks. Datagrams the socket buffer cannot take are counted as dropped.
    pub fn forward_batch(&self, batch: &ForwardBatch) {
        let n = batch.len();
        let mut sent = 0;
        while sent < n {
            let iovs: Vec<[IoSlice<'_>; 1]> =
                (sent..n).map(|i| [IoSlice::new(batch.get(i))]).collect();
            let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = iovs
                .iter()
                .map(|_| SendAncillaryBuffer::default())
                .collect();
            let mut headers: Vec<MMsgHdr<'_>> = iovs
                .iter()
                .zip(controls.iter_mut())
                .map(|(iov, control)| MMsgHdr::new(iov, control))
                .collect();
            match rustix::net::sendmmsg(&self.sock, &mut headers, SendFlags::empty()) {
                Ok(0) => break,
                Ok(k) => {
                    for _ in 0..k {
                        self.metrics.forward(Transport::Udp, Forward::Ok);
                    }
                    sent += k;
                }
                Err(e) if e == rustix::io::Errno::INTR => continue,
                Err(e) => {
                    // The first unsent datagram failed: count it and go on with the rest.
                    let result = if e == rustix::io::Errno::AGAIN {
                        Forward::Dropped
                    } else {
                        debug!(error = %e, "monitord: UDP forward failed");
                        Forward::Error
                    };
                    self.metrics.forward(Transport::Udp, result);
                    sent += 1;
                }
            }
        }
    }

    /// Send one datagram; never blocks.
    pub fn forward(&self, msg: &[u8]) {
        let result = match self.sock.send(msg) {
            Ok(_) => Forward::Ok,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Forward::Dropped,
            Err(e) => {
                debug!(error = %e, "monitord: UDP forward failed");
                Forward::Error
            }
        };
        self.metrics.forward(Transport::Udp, result);
    }
}

/// Datagrams received in one burst, waiting to be forwarded together.
#[derive(Default)]
pub struct ForwardBatch {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl ForwardBatch {
    pub fn push(&mut self, msg: &[u8]) {
        self.data.extend_from_slice(msg);
        self.ends.push(self.data.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
    }

    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.data[start..self.ends[i]]
    }
}

type Key = (i32, MsgType);

#[derive(Default)]
struct Queue {
    pending: HashMap<Key, Vec<u8>>,
    /// Keys with a pending message and no delivery in flight, in delivery order.
    order: VecDeque<Key>,
    inflight: HashSet<Key>,
    bytes: usize,
}

/// Limits of the TCP retry queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
    pub max_inflight: usize,
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_entries: 10_000,
            max_bytes: 64 << 20,
            max_inflight: 8,
            connect_timeout: Duration::from_secs(2),
            write_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Newest-per-(host, type) TCP delivery queue.
pub struct TcpQueue {
    upstream: SocketAddr,
    limits: QueueLimits,
    q: Mutex<Queue>,
    wake: Notify,
    idle: Notify,
    metrics: Arc<Metrics>,
}

impl TcpQueue {
    pub fn new(upstream: SocketAddr, limits: QueueLimits, metrics: Arc<Metrics>) -> Arc<TcpQueue> {
        Arc::new(TcpQueue {
            upstream,
            limits,
            q: Mutex::new(Queue::default()),
            wake: Notify::new(),
            idle: Notify::new(),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update_gauge(&self, q: &Queue) {
        self.metrics
            .tcp_queue
            .set((q.pending.len() + q.inflight.len()) as i64);
    }

    /// Queue a message for delivery; returns at once.
    pub fn enqueue(&self, host_id: i32, ty: MsgType, msg: Vec<u8>) {
        let key = (host_id, ty);
        let mut q = self.lock();
        let len = msg.len();
        if let Some(old) = q.pending.get_mut(&key) {
            let old_len = old.len();
            *old = msg;
            q.bytes = q.bytes - old_len + len;
            drop(q);
            self.metrics.forward(Transport::Tcp, Forward::Superseded);
            return;
        }
        if q.pending.len() >= self.limits.max_entries || q.bytes + len > self.limits.max_bytes {
            drop(q);
            self.metrics.forward(Transport::Tcp, Forward::Dropped);
            warn!(
                host_id,
                r#type = ty.as_str(),
                "monitord: TCP retry queue full, message dropped"
            );
            return;
        }
        q.pending.insert(key, msg);
        q.bytes += len;
        if !q.inflight.contains(&key) {
            q.order.push_back(key);
        }
        self.update_gauge(&q);
        drop(q);
        self.wake.notify_one();
    }

    /// Messages queued or in flight.
    pub fn len(&self) -> usize {
        let q = self.lock();
        q.pending.len() + q.inflight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wait until the queue is empty or `timeout` passes; true if empty.
    pub async fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.is_empty();
            }
        }
    }

    fn take_next(&self) -> Option<(Key, Vec<u8>)> {
        let mut q = self.lock();
        while let Some(key) = q.order.pop_front() {
            if let Some(msg) = q.pending.remove(&key) {
                q.bytes -= msg.len();
                q.inflight.insert(key);
                return Some((key, msg));
            }
        }
        None
    }

    /// A delivery finished: re-queue on failure unless a newer message arrived meanwhile.
    fn finished(&self, key: Key, msg: Vec<u8>, ok: bool) {
        let mut q = self.lock();
        q.inflight.remove(&key);
        let newer = q.pending.contains_key(&key);
        if ok {
            self.metrics.forward(Transport::Tcp, Forward::Ok);
        } else {
            self.metrics.forward(Transport::Tcp, Forward::Error);
            if newer {
                self.metrics.forward(Transport::Tcp, Forward::Superseded);
            } else {
                q.bytes += msg.len();
                q.pending.insert(key, msg);
                q.order.push_front(key);
            }
        }
        if newer {
            q.order.push_back(key);
        }
        self.update_gauge(&q);
        let empty = q.pending.is_empty() && q.inflight.is_empty();
        drop(q);
        if empty {
            self.idle.notify_waiters();
        }
    }

    async fn deliver(upstream: SocketAddr, limits: QueueLimits, msg: &[u8]) -> io::Result<()> {
        let mut s = tokio::time::timeout(
            limits.connect_timeout,
            tokio::net::TcpStream::connect(upstream),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        tokio::time::timeout(limits.write_timeout, async {
            s.write_all(msg).await?;
            s.shutdown().await
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))?
    }

    /// Deliver until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tasks: JoinSet<(Key, Vec<u8>, io::Result<()>)> = JoinSet::new();
        let mut backoff = self.limits.backoff_min;
        let mut retry_at: Option<Instant> = None;
        let mut logged_down = false;
        loop {
            while let Some(done) = tasks.try_join_next() {
                self.on_done(done, &mut backoff, &mut retry_at, &mut logged_down);
            }
            let blocked = retry_at.is_some_and(|t| Instant::now() < t);
            if !blocked
                && tasks.len() < self.limits.max_inflight
                && let Some((key, msg)) = self.take_next()
            {
                let (up, limits) = (self.upstream, self.limits);
                tasks.spawn(async move {
                    let r = Self::deliver(up, limits, &msg).await;
                    (key, msg, r)
                });
                continue;
            }
            let sleep_until = retry_at.filter(|_| blocked);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.wake.notified() => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    self.on_done(done, &mut backoff, &mut retry_at, &mut logged_down);
                }
                _ = tokio::time::sleep_until(sleep_until.unwrap_or_else(Instant::now)), if sleep_until.is_some() => {}
            }
        }
        tasks.abort_all();
    }

    fn on_done(
        &self,
        done: Result<(Key, Vec<u8>, io::Result<()>), tokio::task::JoinError>,
        backoff: &mut Duration,
        retry_at: &mut Option<Instant>,
        logged_down: &mut bool,
    ) {
        let Ok((key, msg, result)) = done else { return };
        match result {
            Ok(()) => {
                if *logged_down {
                    tracing::info!(upstream = %self.upstream, "monitord: TCP upstream reachable again");
                }
                *logged_down = false;
                *backoff = self.limits.backoff_min;
                *retry_at = None;
                self.finished(key, msg, true);
            }
            Err(e) => {
                if !*logged_down {
                    warn!(upstream = %self.upstream, error = %e, "monitord: TCP upstream unreachable, retrying with backoff");
                    *logged_down = true;
                }
                *retry_at = Some(Instant::now() + *backoff);
                *backoff = (*backoff * 2).min(self.limits.backoff_max);
                self.finished(key, msg, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn read_one(l: &tokio::net::TcpListener) -> Vec<u8> {
        let (mut s, _) = l.accept().await.unwrap();
        let mut v = vec![];
        s.read_to_end(&mut v).await.unwrap();
        v
    }

    #[tokio::test]
    async fn newest_per_key_is_delivered_after_recovery() {
        // Reserve a port, then close it: upstream down.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let metrics = Arc::new(Metrics::new_unregistered());
        let limits = QueueLimits {
            backoff_max: Duration::from_millis(200),
            ..QueueLimits::default()
        };
        let q = TcpQueue::new(addr, limits, metrics.clone());
        let stop = CancellationToken::new();
        let worker = tokio::spawn(q.clone().run(stop.clone()));
        for i in 0..5 {
            q.enqueue(1, MsgType::StateVm, format!("h1 #{i}").into_bytes());
            q.enqueue(2, MsgType::StateVm, format!("h2 #{i}").into_bytes());
        }
        // Let at least one attempt fail.
        let deadline = Instant::now() + Duration::from_secs(5);
        while metrics.forwarded(Transport::Tcp, Forward::Error) == 0 {
            assert!(Instant::now() < deadline, "no failed attempt");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(q.len(), 2);
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        let mut got = vec![read_one(&l).await, read_one(&l).await];
        got.sort();
        assert_eq!(got, vec![b"h1 #4".to_vec(), b"h2 #4".to_vec()]);
        assert!(q.wait_empty(Duration::from_secs(5)).await);
        assert_eq!(metrics.forwarded(Transport::Tcp, Forward::Ok), 2);
        stop.cancel();
        worker.await.unwrap();
    }

    #[tokio::test]
    async fn queue_is_bounded() {
        let metrics = Arc::new(Metrics::new_unregistered());
        let limits = QueueLimits {
            max_entries: 2,
            max_bytes: 10,
            ..QueueLimits::default()
        };
        let q = TcpQueue::new("127.0.0.1:9".parse().unwrap(), limits, metrics.clone());
        q.enqueue(1, MsgType::StateVm, b"aaaa".to_vec());
        q.enqueue(2, MsgType::StateVm, b"bbbb".to_vec());
        q.enqueue(3, MsgType::StateVm, b"c".to_vec());
        q.enqueue(1, MsgType::StateVm, b"aaaaa".to_vec());
        assert_eq!(q.len(), 2);
        assert_eq!(metrics.forwarded(Transport::Tcp, Forward::Dropped), 1);
        assert_eq!(metrics.forwarded(Transport::Tcp, Forward::Superseded), 1);
    }
}
