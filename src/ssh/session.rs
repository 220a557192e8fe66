//! The per-connection russh handler: authentication decisions, session channels and their
//! requests. Every request gets a reply, and nothing slow runs here: programs are started as
//! tasks ([`crate::ssh::exec::run`]) so the connection loop keeps serving other channels.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use russh::keys::Certificate;
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, MethodKind, MethodSet};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::escape::{escape, escape_bytes};
use crate::ssh::auth::{AuthPolicy, Grant};
use crate::ssh::exec::{ChannelJob, Work};
use crate::ssh::limits::StartupTicket;
use crate::ssh::pty::{self, Pty, PtyRequest};
use crate::ssh::server::Shared;
use crate::transfer::scp;

/// Env variables a client may set with `env` requests.
fn env_allowed(name: &str) -> bool {
    name == "LANG" || name.starts_with("LC_")
}
/// Caps on what a client can make one channel hold before it starts.
const MAX_ENV_PER_CHANNEL: usize = 64;
const MAX_ENV_BYTES: usize = 4096;
/// Longest exec command accepted (OpenSSH's own limit is the 256 KiB packet).
const MAX_COMMAND_BYTES: usize = 256 * 1024;
/// Default PATH of sessions.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// State of one connection shared with its task in the server and its channels.
#[derive(Default)]
pub struct ConnState {
    authenticated: AtomicBool,
    user: Mutex<Option<String>>,
    channels: AtomicUsize,
    /// Notified when the last channel of the connection ends.
    pub idle: Notify,
    /// Cancelled when the connection ends: kills whatever its channels still run.
    pub kill_all: CancellationToken,
    /// Rejected authentication attempts (key probes included, as sshd counts them).
    auth_failures: AtomicUsize,
    /// Notified when `auth_failures` reaches `--max-auth-tries`: the connection is closed.
    pub auth_exhausted: Notify,
    /// Counts the connection against MaxStartups until it authenticates.
    startup: Mutex<Option<StartupTicket>>,
    /// When the connection last had no channel open (for the unused-connection timeout).
    idle_since: Mutex<Option<Instant>>,
}

impl ConnState {
    pub fn authenticated(&self) -> bool {
        self.authenticated.load(Ordering::SeqCst)
    }

    pub fn user(&self) -> Option<String> {
        self.user.lock().ok().and_then(|u| u.clone())
    }

    pub fn open_channels(&self) -> usize {
        self.channels.load(Ordering::SeqCst)
    }

    pub fn auth_failures(&self) -> usize {
        self.auth_failures.load(Ordering::SeqCst)
    }

    /// Hold `ticket` until the connection authenticates.
    pub fn hold_startup(&self, ticket: StartupTicket) {
        if let Ok(mut t) = self.startup.lock() {
            *t = Some(ticket);
        }
    }

    /// Since when the authenticated connection has had no channel, `None` while one is open.
    pub fn idle_since(&self) -> Option<Instant> {
        self.idle_since.lock().ok().and_then(|t| *t)
    }

    fn set_idle_since(&self, at: Option<Instant>) {
        if let Ok(mut t) = self.idle_since.lock() {
            *t = at;
        }
    }
}

/// Counts an open session channel; dropping it ends the count and may wake a draining server.
pub struct ChannelSlot {
    conn: Arc<ConnState>,
}

impl ChannelSlot {
    fn new(conn: Arc<ConnState>) -> ChannelSlot {
        conn.channels.fetch_add(1, Ordering::SeqCst);
        conn.set_idle_since(None);
        ChannelSlot { conn }
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        if self.conn.channels.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.conn.set_idle_since(Some(Instant::now()));
            self.conn.idle.notify_waiters();
        }
    }
}

/// A session channel that has not started a program yet.
struct Pending {
    channel: Channel<Msg>,
    slot: ChannelSlot,
    env: Vec<(String, String)>,
    env_bytes: usize,
    pty: Option<(PtyRequest, Pty)>,
    agent: bool,
}

/// The russh handler of one connection.
pub struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    conn: Arc<ConnState>,
    grant: Option<Grant>,
    user: String,
    pending: HashMap<ChannelId, Pending>,
    /// pty masters of started shells, for `window-change`.
    terminals: HashMap<ChannelId, OwnedFd>,
}

impl Connection {
    pub fn new(
        shared: Arc<Shared>,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        conn: Arc<ConnState>,
    ) -> Self {
        Connection {
            shared,
            peer,
            local,
            conn,
            grant: None,
            user: String::new(),
            pending: HashMap::new(),
            terminals: HashMap::new(),
        }
    }

    fn reject() -> Auth {
        Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey][..])),
            partial_success: false,
        }
    }

    fn accept(&mut self, user: &str, grant: Grant, method: &'static str) -> Auth {
        info!(
            event = "login",
            peer = %self.peer,
            user = %escape(user),
            method,
            fingerprint = %grant.fingerprint,
            cert_key_id = grant.certificate.as_ref().map(|c| escape(&c.key_id)),
            ca_fingerprint = grant.certificate.as_ref().map(|c| c.ca_fingerprint.clone()),
            forced_command = grant.forced_command.is_some(),
        );
        self.shared.metrics.auth_attempt(method, "accepted");
        self.user = user.to_string();
        if let Ok(mut u) = self.conn.user.lock() {
            *u = Some(user.to_string());
        }
        self.grant = Some(grant);
        Auth::Accept
    }

    /// True once `--max-auth-tries` attempts failed: the disconnect is on its way from the
    /// connection loop, and a client that pipelined further attempts must not have them
    /// evaluated meanwhile (sshd never looks at an attempt past the limit).
    fn exhausted(&self) -> bool {
        self.conn.auth_failures() >= self.shared.config.limits.max_auth_tries
    }

    /// Accept or refuse a signed attempt by `method`, after the checks every method shares.
    fn decide(
        &mut self,
        user: &str,
        method: &'static str,
        authorize: impl FnOnce(&AuthPolicy) -> Result<Grant, String>,
    ) -> Auth {
        if self.exhausted() {
            return Self::reject();
        }
        if !self.shared.auth.user_allowed(user) {
            return self.refuse(user, method, "user not allowed");
        }
        match authorize(&self.shared.auth) {
            Ok(grant) => self.accept(user, grant, method),
            Err(why) => self.refuse(user, method, &why),
        }
    }

    /// Count a rejected attempt; past `--max-auth-tries` the server loop disconnects.
    fn count_failure(&self) {
        let failures = self.conn.auth_failures.fetch_add(1, Ordering::SeqCst) + 1;
        if failures == self.shared.config.limits.max_auth_tries {
            self.conn.auth_exhausted.notify_one();
        }
    }

    /// russh also puts every request of a channel into that channel's own bounded queue,
    /// which nothing reads before the channel starts; a client sending many requests before
    /// `exec` would fill it and stall the whole connection. Empty it as requests are handled.
    fn drain_pending(&mut self, id: ChannelId) {
        use futures::FutureExt;
        if let Some(p) = self.pending.get_mut(&id) {
            while let Some(Some(msg)) = p.channel.wait().now_or_never() {
                if matches!(
                    msg,
                    ChannelMsg::Data { .. } | ChannelMsg::ExtendedData { .. }
                ) {
                    debug!(peer = %self.peer, "data before the channel started: discarded");
                }
            }
        }
    }

    fn refuse(&self, user: &str, method: &'static str, why: &str) -> Auth {
        self.count_failure();
        info!(event = "auth_failed", peer = %self.peer, user = %escape(user), method, reason = %escape(why));
        self.shared.metrics.auth_attempt(method, "rejected");
        Self::reject()
    }

    /// The environment of a program started on this connection.
    fn base_env(
        &self,
        pending: &Pending,
        original_command: Option<&[u8]>,
    ) -> Vec<(OsString, OsString)> {
        use std::os::unix::ffi::OsStringExt;
        let config = &self.shared.config;
        let mut env: Vec<(OsString, OsString)> = vec![];
        let mut set = |k: &str, v: OsString| env.push((k.into(), v));
        set("HOME", config.home.clone().into_os_string());
        set("USER", self.user.clone().into());
        set("LOGNAME", self.user.clone().into());
        set("SHELL", config.shell.clone().into_os_string());
        set("PATH", DEFAULT_PATH.into());
        let (lip, lport) = self
            .local
            .map(|a| (a.ip().to_string(), a.port()))
            .unwrap_or_default();
        set(
            "SSH_CLIENT",
            format!("{} {} {}", self.peer.ip(), self.peer.port(), lport).into(),
        );
        set(
            "SSH_CONNECTION",
            format!("{} {} {} {}", self.peer.ip(), self.peer.port(), lip, lport).into(),
        );
        if let Some(cmd) = original_command {
            set("SSH_ORIGINAL_COMMAND", OsString::from_vec(cmd.to_vec()));
        }
        if let Some((req, _)) = &pending.pty {
            set("TERM", req.term.clone().into());
        }
        for (k, v) in &pending.env {
            env.push((k.into(), v.into()));
        }
        if config.permit_user_environment
            && let Some(grant) = &self.grant
        {
            for (k, v) in &grant.environment {
                env.push((k.into(), v.into()));
            }
        }
        env
    }

    /// Start `what` on a pending channel: reply success and hand the channel to a task.
    fn start(
        &mut self,
        id: ChannelId,
        what: Request,
        session: &mut Session,
    ) -> Result<(), anyhow::Error> {
        let Some(mut pending) = self.pending.remove(&id) else {
            session.channel_failure(id)?;
            return Ok(());
        };
        if self.shared.draining.is_cancelled() {
            session.channel_failure(id)?;
            return Ok(());
        }
        let forced = self.grant.as_ref().and_then(|g| g.forced_command.clone());
        let (audit_command, original) = match &what {
            Request::Exec(cmd) => (cmd.clone(), Some(cmd.clone())),
            Request::Shell => (Vec::new(), None),
            Request::Subsystem(name) => (
                format!("subsystem {name}").into_bytes(),
                Some(name.clone().into_bytes()),
            ),
        };
        let work = match (forced, what) {
            (Some(forced), _) => {
                let env = self.base_env(&pending, original.as_deref());
                Work::Process {
                    command: Some(forced.into_bytes()),
                    env,
                    pty: pending.pty.take().map(|p| p.1),
                }
            }
            (None, Request::Exec(cmd)) => match scp::parse(&cmd) {
                Some(scp_cmd) if pending.pty.is_none() => Work::Scp(scp_cmd),
                _ => {
                    let env = self.base_env(&pending, None);
                    Work::Process {
                        command: Some(cmd),
                        env,
                        pty: pending.pty.take().map(|p| p.1),
                    }
                }
            },
            (None, Request::Shell) => {
                let env = self.base_env(&pending, None);
                Work::Process {
                    command: None,
                    env,
                    pty: pending.pty.take().map(|p| p.1),
                }
            }
            (None, Request::Subsystem(name)) => {
                if name == "sftp" {
                    Work::Sftp
                } else {
                    info!(peer = %self.peer, subsystem = %escape(&name), "unknown subsystem refused");
                    session.channel_failure(id)?;
                    self.pending.insert(id, pending);
                    return Ok(());
                }
            }
        };
        // An agent socket only matters for programs, and only when the key allows it.
        let agent = if pending.agent && matches!(work, Work::Process { .. }) {
            match crate::ssh::agent::start(session.handle()) {
                Ok(sock) => Some(sock),
                Err(e) => {
                    warn!(error = %e, "cannot create the agent socket");
                    None
                }
            }
        } else {
            None
        };
        let mut work = work;
        if let (Some(sock), Work::Process { env, .. }) = (&agent, &mut work) {
            env.push(("SSH_AUTH_SOCK".into(), sock.path.clone().into_os_string()));
        }
        if let Work::Process { pty: Some(p), .. } = &work
            && let Ok(master) = p.master.try_clone()
        {
            self.terminals.insert(id, master);
        }
        session.channel_success(id)?;
        let job = ChannelJob {
            channel: pending.channel,
            handle: session.handle(),
            shared: self.shared.clone(),
            work,
            audit_command,
            user: self.user.clone(),
            peer: self.peer,
            agent,
            slot: pending.slot,
            kill_all: self.conn.kill_all.clone(),
        };
        tokio::spawn(crate::ssh::exec::run(job));
        Ok(())
    }
}

enum Request {
    Exec(Vec<u8>),
    Shell,
    Subsystem(String),
}

/// Receive window of a new channel (as sshd's), and the most one channel is granted.
pub const CHANNEL_WINDOW_MIN: u32 = 2 << 20;
const CHANNEL_WINDOW_MAX: u32 = 8 << 20;
/// What all channels of one connection are granted together, when more than two are busy.
const CONNECTION_WINDOW: u32 = 16 << 20;

/// The window russh grants at its next adjustment: a lone transfer gets 8 MiB (a few percent
/// faster than sshd's 2 MiB on one stream), many channels share 16 MiB (at least 2 MiB each).
/// Granting 8 MiB to each of 15 parallel uploads let the client put 120 MiB in flight: the
/// connection stalled behind the slowest consumer and throughput halved on a fresh connection.
fn channel_window(open_channels: usize) -> u32 {
    let n = u32::try_from(open_channels.max(1)).unwrap_or(u32::MAX);
    (CONNECTION_WINDOW / n).clamp(CHANNEL_WINDOW_MIN, CHANNEL_WINDOW_MAX)
}

impl russh::server::Handler for Connection {
    type Error = anyhow::Error;

    fn adjust_window(&mut self, _channel: ChannelId, _current: u32) -> u32 {
        channel_window(self.conn.open_channels())
    }

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Self::reject())
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(self.refuse(user, "password", "password authentication is not offered"))
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.exhausted() {
            return Ok(Self::reject());
        }
        if self.shared.auth.offer_acceptable(user, offer.public_key) {
            Ok(Auth::Accept)
        } else {
            debug!(peer = %self.peer, user = %escape(user), "key probe refused");
            self.count_failure();
            Ok(Self::reject())
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let ip = Some(self.peer.ip());
        Ok(self.decide(user, "publickey", |auth| {
            auth.authorize_key(user, key.public_key, ip)
                .ok_or_else(|| "key not authorized".to_string())
        }))
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        cert: &Certificate,
    ) -> Result<Auth, Self::Error> {
        let ip = Some(self.peer.ip());
        Ok(self.decide(user, "certificate", |auth| {
            auth.authorize_certificate(user, cert, ip)
        }))
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.conn.authenticated.store(true, Ordering::SeqCst);
        self.conn.set_idle_since(Some(Instant::now()));
        // Authenticated: no longer counts against MaxStartups.
        if let Ok(mut t) = self.conn.startup.lock() {
            t.take();
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let max = self.shared.config.max_sessions;
        if self.shared.draining.is_cancelled() {
            debug!(peer = %self.peer, "session refused: shutting down");
            return Ok(()); // dropping `reply` refuses the channel
        }
        if self.conn.open_channels() >= max {
            info!(peer = %self.peer, max_sessions = max, "session refused: too many sessions");
            self.shared.metrics.refused("max_sessions");
            return Ok(());
        }
        let slot = ChannelSlot::new(self.conn.clone());
        self.pending.insert(
            channel.id(),
            Pending {
                channel,
                slot,
                env: vec![],
                env_bytes: 0,
                pty: None,
                agent: false,
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn env_request(
        &mut self,
        id: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.drain_pending(id);
        let ok = match self.pending.get_mut(&id) {
            Some(p)
                if env_allowed(name)
                    && p.env.len() < MAX_ENV_PER_CHANNEL
                    && p.env_bytes + name.len() + value.len() <= MAX_ENV_BYTES
                    && !value.contains('\0') =>
            {
                p.env_bytes += name.len() + value.len();
                p.env.push((name.to_string(), value.to_string()));
                true
            }
            _ => {
                debug!(peer = %self.peer, name = %escape(name), "env request ignored");
                false
            }
        };
        if ok {
            session.channel_success(id)?
        } else {
            session.channel_failure(id)?
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        id: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.drain_pending(id);
        let allowed = self.grant.as_ref().is_some_and(|g| g.permit_pty);
        let Some(pending) = self.pending.get_mut(&id).filter(|p| p.pty.is_none()) else {
            session.channel_failure(id)?;
            return Ok(());
        };
        if !allowed {
            session.channel_failure(id)?;
            return Ok(());
        }
        let term: String = term
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect();
        let req = PtyRequest {
            term,
            cols,
            rows,
            pix_width,
            pix_height,
        };
        match pty::open(&req) {
            Ok(p) => {
                pending.pty = Some((req, p));
                session.channel_success(id)?;
            }
            Err(e) => {
                warn!(error = %e, "cannot allocate a pty");
                session.channel_failure(id)?;
            }
        }
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        id: ChannelId,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.drain_pending(id);
        let ok = if let Some(fd) = self.terminals.get(&id) {
            pty::resize(fd, cols, rows, pix_width, pix_height).is_ok()
        } else if let Some((req, p)) = self.pending.get_mut(&id).and_then(|p| p.pty.as_mut()) {
            (req.cols, req.rows) = (cols, rows);
            pty::resize(&p.master, cols, rows, pix_width, pix_height).is_ok()
        } else {
            false
        };
        if ok {
            session.channel_success(id)?
        } else {
            session.channel_failure(id)?
        }
        Ok(())
    }

    async fn agent_request(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.drain_pending(id);
        let allowed = self
            .grant
            .as_ref()
            .is_some_and(|g| g.permit_agent_forwarding);
        match self.pending.get_mut(&id) {
            Some(p) if allowed => {
                p.agent = true;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if data.len() > MAX_COMMAND_BYTES {
            info!(peer = %self.peer, bytes = data.len(), "exec refused: command too long");
            session.channel_failure(id)?;
            return Ok(());
        }
        debug!(peer = %self.peer, command = %escape_bytes(data, 256), "exec");
        self.start(id, Request::Exec(data.to_vec()), session)
    }

    async fn shell_request(
        &mut self,
        id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(id, Request::Shell, session)
    }

    async fn subsystem_request(
        &mut self,
        id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(id, Request::Subsystem(name.to_string()), session)
    }

    async fn x11_request(
        &mut self,
        id: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.drain_pending(id);
        session.channel_failure(id)?;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.pending.remove(&id);
        self.terminals.remove(&id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_connections_share_their_window() {
        assert_eq!(channel_window(0), 8 << 20);
        assert_eq!(channel_window(1), 8 << 20);
        assert_eq!(channel_window(4), 4 << 20);
        assert_eq!(channel_window(15), 2 << 20);
        assert_eq!(channel_window(usize::MAX), 2 << 20);
    }

    /// The patched russh (third_party/russh) serves chacha20-poly1305 through OpenSSL only after
    /// its self-test against the built-in cipher passes; a build where it silently falls back
    /// loses most of the speed-up, so that fails here.
    #[test]
    fn chacha20_poly1305_goes_through_openssl() {
        assert_eq!(russh::cipher::chacha20_poly1305_openssl_self_test(), Ok(()));
        assert_eq!(russh::cipher::chacha20_poly1305_backend(), "openssl");
    }
}
