//! SSH listeners, the accept loop, connection limits and the russh configuration.
//!
//! Each accepted TCP connection gets its own task that runs the russh session with a
//! [`Connection`] handler, enforces the login grace time and, on shutdown, closes the
//! connection once its last channel has finished (or when the grace period runs out).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use prometheus_client::registry::Registry;
use russh::keys::PrivateKey;
use russh::{MethodKind, MethodSet, SshId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::ssh::auth::AuthPolicy;
use crate::ssh::limits::{Offence, Penalties, StartupTicket, Startups};
use crate::ssh::metrics::SshMetrics;
use crate::ssh::session::{ConnState, Connection};
use crate::transfer::Transfer;

/// Everything a connection needs, shared by all connections.
pub struct Shared {
    pub config: Config,
    pub auth: AuthPolicy,
    pub transfer: Arc<Transfer>,
    pub metrics: SshMetrics,
    /// Cancelled when the server starts draining: no new channels.
    pub draining: CancellationToken,
    /// Connections still authenticating (MaxStartups).
    pub startups: Arc<Startups>,
    /// Sources refused for misbehaving (PerSourcePenalties).
    pub penalties: Arc<Penalties>,
    /// Bytes of client input queued for consumers, all channels together.
    pub input_budget: Arc<Semaphore>,
}

/// Bound SSH listeners, ready to run.
pub struct SshServer {
    listeners: Vec<TcpListener>,
    russh: Arc<russh::server::Config>,
    shared: Arc<Shared>,
}

/// Ciphers in server preference order. The client's order decides, so OpenSSH clients (which
/// list chacha20-poly1305 first) still pick chacha20; AES-GCM is cheaper per byte and is chosen
/// by clients that prefer it or when an operator restricts the list.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// While draining: how long an idle connection may stay before it is closed.
const DRAIN_IDLE_CLOSE: Duration = Duration::from_millis(500);

fn russh_config(config: &Config, host_keys: Vec<PrivateKey>) -> russh::server::Config {
    let keepalive =
        (!config.client_alive_interval.is_zero()).then_some(config.client_alive_interval);
    russh::server::Config {
        server_id: SshId::Standard(Cow::Borrowed(concat!(
            "SSH-2.0-tm-sidecar_",
            env!("CARGO_PKG_VERSION")
        ))),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // Publickey rejections are not secret (PK_OK says as much), and OpenSSH clients try
        // every agent key in turn: a delay per rejected key would slow every login.
        auth_rejection_time: Duration::from_millis(0),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: host_keys,
        // New channels start at sshd's 2 MiB; `Connection::adjust_window` grows a lone transfer's.
        window_size: super::session::CHANNEL_WINDOW_MIN,
        maximum_packet_size: 65535,
        // russh's per-channel queue in front of ours (exec.rs drains it at once); 64 packets
        // keep its share of a stalled channel's memory at 2-4 MiB.
        channel_buffer_size: 64,
        event_buffer_size: 64,
        preferred: russh::Preferred {
            cipher: Cow::Borrowed(CIPHERS),
            compression: Cow::Borrowed(&[russh::compression::NONE]),
            ..Default::default()
        },
        // Our handler counts failures as sshd does (key probes included) and disconnects at
        // --max-auth-tries; russh's own count (signatures and `none` only) is a backstop.
        max_auth_attempts: config.limits.max_auth_tries + 1,
        // Idle ControlPersist masters must survive; dead peers are found by keepalives.
        inactivity_timeout: None,
        keepalive_interval: keepalive,
        keepalive_max: config.client_alive_count_max,
        nodelay: true,
        ..Default::default()
    }
}

impl SshServer {
    /// Bind every `--ssh-listen` address.
    pub async fn bind(
        config: &Config,
        host_keys: Vec<PrivateKey>,
        auth: AuthPolicy,
        transfer: Arc<Transfer>,
        registry: &mut Registry,
    ) -> Result<SshServer> {
        let mut listeners = vec![];
        for addr in &config.ssh_listen {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("--ssh-listen {addr}: cannot bind"))?;
            listeners.push(listener);
        }
        let limits = &config.limits;
        let startups = Startups::new(limits.max_startups, limits.per_source_max_startups);
        let penalties = Penalties::new(limits.penalties.clone());
        let shared = Arc::new(Shared {
            config: config.clone(),
            auth,
            transfer,
            metrics: SshMetrics::new(registry, startups.clone(), penalties.clone()),
            draining: CancellationToken::new(),
            startups,
            penalties,
            input_budget: Arc::new(Semaphore::new(config.max_input_buffer_mib << 20)),
        });
        Ok(SshServer {
            listeners,
            russh: Arc::new(russh_config(config, host_keys)),
            shared,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The shared state (auth policy for reloads, metrics).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Accept until `shutdown`, then let open channels finish for up to `grace` before closing
    /// every connection.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        let tracker = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        let slots = Arc::new(Semaphore::new(self.shared.config.limits.max_connections));
        let mut accept_tasks = vec![];
        for listener in self.listeners {
            let ctx = AcceptCtx {
                shared: self.shared.clone(),
                russh: self.russh.clone(),
                tracker: tracker.clone(),
                hard_stop: hard_stop.clone(),
                slots: slots.clone(),
            };
            accept_tasks.push(tokio::spawn(accept_loop(listener, ctx, shutdown.clone())));
        }
        shutdown.cancelled().await;
        self.shared.draining.cancel();
        for task in accept_tasks {
            let _ = task.await;
        }
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                grace_seconds = grace.as_secs(),
                "grace period over: closing remaining sessions"
            );
            hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        }
    }
}

struct AcceptCtx {
    shared: Arc<Shared>,
    russh: Arc<russh::server::Config>,
    tracker: TaskTracker,
    hard_stop: CancellationToken,
    slots: Arc<Semaphore>,
}

async fn accept_loop(listener: TcpListener, ctx: AcceptCtx, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Refusals close the socket at once, before any SSH byte, as sshd does.
        if ctx.shared.penalties.refused(peer.ip(), Instant::now()) {
            ctx.shared.metrics.refused("penalty");
            debug!(%peer, "refused: source penalised");
            continue;
        }
        let Ok(permit) = ctx.slots.clone().try_acquire_owned() else {
            ctx.shared.metrics.refused("max_connections");
            debug!(%peer, "refused: too many connections");
            continue;
        };
        let ticket = match ctx
            .shared
            .startups
            .admit(peer.ip(), rand::random::<u32>() % 1000)
        {
            Ok(t) => t,
            Err(why) => {
                ctx.shared.metrics.refused(why.reason());
                debug!(%peer, reason = why.reason(), "refused: too many connections authenticating");
                continue;
            }
        };
        let shared = ctx.shared.clone();
        let russh = ctx.russh.clone();
        let hard_stop = ctx.hard_stop.clone();
        ctx.tracker.spawn(async move {
            serve_connection(stream, peer, shared, russh, hard_stop, ticket).await;
            drop(permit);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    russh: Arc<russh::server::Config>,
    hard_stop: CancellationToken,
    ticket: StartupTicket,
) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().ok();
    let conn = Arc::new(ConnState::default());
    conn.hold_startup(ticket);
    let limits = &shared.config.limits;
    let handler = Connection::new(shared.clone(), peer, local, conn.clone());
    shared.metrics.connection_opened();
    let started = std::time::Instant::now();

    // The client's identification line must arrive within the grace time.
    let session = tokio::time::timeout(
        limits.login_grace_time,
        russh::server::run_stream(russh, stream, handler),
    )
    .await;
    let session = match session {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "connection failed before key exchange");
            shared.metrics.connection_closed("failed");
            penalise(&shared, peer, Offence::NoAuth);
            return;
        }
        Err(_) => {
            shared.metrics.connection_closed("grace_exceeded");
            penalise(&shared, peer, Offence::GraceExceeded);
            return;
        }
    };
    let handle = session.handle();
    tokio::pin!(session);
    let grace = tokio::time::sleep(limits.login_grace_time.saturating_sub(started.elapsed()));
    tokio::pin!(grace);
    let mut grace_armed = true;
    let mut draining = false;
    // While draining, an idle connection is closed shortly after its last channel ended: a
    // plain client closes it itself after reading its exit status, and a DISCONNECT sent
    // before its channel CLOSE reply would turn a good exit into 255.
    let idle_close = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(idle_close);
    let mut idle_armed = false;
    // Authenticated connections without channels are closed after the unused timeout; the
    // timer is re-aimed at the idle start each time it fires early.
    let unused_after = limits.unused_connection_timeout;
    let unused = tokio::time::sleep(unused_after.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(unused);
    let outcome = loop {
        tokio::select! {
            result = &mut session => {
                if let Err(e) = result {
                    debug!(%peer, error = %e, "connection ended with error");
                }
                break if conn.authenticated() { "closed" } else { "unauthenticated" };
            }
            // `select!` checks the condition only when the loop turns, so a connection that
            // authenticated since then reaches here too: disarm the timer instead of closing it.
            _ = &mut grace, if grace_armed => {
                grace_armed = false;
                if conn.authenticated() {
                    continue;
                }
                info!(%peer, "login grace time exceeded");
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, "login grace time exceeded".into(), "".into())
                    .await;
                break "grace_exceeded";
            }
            _ = conn.auth_exhausted.notified(), if !conn.authenticated() => {
                info!(%peer, failures = conn.auth_failures(), "too many authentication failures");
                let _ = handle
                    .disconnect(russh::Disconnect::NoMoreAuthMethodsAvailable, "Too many authentication failures".into(), "".into())
                    .await;
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut session).await;
                break "auth_tries_exceeded";
            }
            _ = &mut unused, if unused_after.is_some() => {
                let timeout = unused_after.unwrap_or_default();
                match conn.idle_since() {
                    Some(since) if conn.authenticated() && since.elapsed() >= timeout => {
                        info!(%peer, timeout_seconds = timeout.as_secs(), "closing unused connection");
                        let _ = handle
                            .disconnect(russh::Disconnect::ByApplication, "unused connection timeout".into(), "".into())
                            .await;
                        let _ = tokio::time::timeout(Duration::from_secs(2), &mut session).await;
                        break "unused_timeout";
                    }
                    Some(since) => unused.as_mut().reset((since + timeout).into()),
                    None => unused.as_mut().reset(tokio::time::Instant::now() + timeout),
                }
            }
            _ = shared.draining.cancelled(), if !draining => {
                draining = true;
                if conn.open_channels() == 0 {
                    idle_close.as_mut().reset(tokio::time::Instant::now() + DRAIN_IDLE_CLOSE);
                    idle_armed = true;
                }
            }
            _ = conn.idle.notified(), if draining => {
                if conn.open_channels() == 0 {
                    idle_close.as_mut().reset(tokio::time::Instant::now() + DRAIN_IDLE_CLOSE);
                    idle_armed = true;
                }
            }
            _ = &mut idle_close, if idle_armed => {
                idle_armed = false;
                if conn.open_channels() == 0 {
                    let _ = handle
                        .disconnect(russh::Disconnect::ByApplication, "server shutting down".into(), "".into())
                        .await;
                }
            }
            _ = hard_stop.cancelled() => {
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, "server shutting down".into(), "".into())
                    .await;
                conn.kill_all.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut session).await;
                break "shutdown";
            }
        }
    };
    conn.kill_all.cancel();
    shared.metrics.connection_closed(outcome);
    match outcome {
        "grace_exceeded" => penalise(&shared, peer, Offence::GraceExceeded),
        "auth_tries_exceeded" => penalise(&shared, peer, Offence::AuthFailed),
        "unauthenticated" if conn.auth_failures() > 0 => {
            penalise(&shared, peer, Offence::AuthFailed)
        }
        "unauthenticated" => penalise(&shared, peer, Offence::NoAuth),
        _ => {}
    }
    info!(
        event = "connection_closed",
        %peer,
        user = %conn.user().unwrap_or_default(),
        outcome,
        duration_seconds = started.elapsed().as_secs_f64(),
    );
}

/// Record `offence` against the peer's address; say so when it starts being refused.
fn penalise(shared: &Shared, peer: SocketAddr, offence: Offence) {
    if let Some(period) = shared
        .penalties
        .penalise(peer.ip(), offence, Instant::now())
    {
        info!(
            %peer,
            offence = ?offence,
            refused_for_seconds = period.as_secs(),
            "source penalised: new connections refused"
        );
    }
}
