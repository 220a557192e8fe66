//! A small SSH client on russh, for tests and load generators that need many connections in one
//! process (1000 OpenSSH client processes would measure the clients, not the server) or need to
//! see the wire messages themselves (`exit-signal`).
//!
//! Shared by the tests as `common::sshc` and by `examples/ssh_load.rs` through `#[path]`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, load_secret_key};
use russh::{ChannelMsg, Sig};

/// Accepts any host key (the tests made the server's key themselves).
pub struct AnyHost;

impl client::Handler for AnyHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

pub type Conn = client::Handle<AnyHost>;

pub fn load_key(path: &Path) -> Arc<PrivateKey> {
    Arc::new(load_secret_key(path, None).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Open `n` connections, at most `concurrency` handshakes at a time: the connections that came
/// up, and the errors of those that did not.
pub async fn connect_many(
    addr: SocketAddr,
    user: &str,
    key: &Arc<PrivateKey>,
    n: usize,
    concurrency: usize,
) -> (Vec<Conn>, Vec<String>) {
    use futures::StreamExt;
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|_| connect(addr, user, key))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut conns = vec![];
    let mut errors = vec![];
    for r in results {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => errors.push(e.to_string()),
        }
    }
    (conns, errors)
}

/// Raise this process's soft RLIMIT_NOFILE to at least `want` (up to the hard limit), as many
/// connections need; children (the sidecar, OpenSSH clients) inherit it. Returns the soft
/// limit in force.
pub fn raise_nofile(want: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let cur = getrlimit(Resource::Nofile);
    let soft = cur.current.unwrap_or(u64::MAX);
    if soft >= want {
        return soft;
    }
    let target = cur.maximum.map_or(want, |m| m.min(want));
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: cur.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Connect and authenticate with `key` as `user`.
pub async fn connect(addr: SocketAddr, user: &str, key: &Arc<PrivateKey>) -> anyhow::Result<Conn> {
    let config = Arc::new(client::Config {
        nodelay: true,
        ..Default::default()
    });
    let mut conn = client::connect(config, addr, AnyHost).await?;
    let auth = conn
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), None))
        .await?;
    anyhow::ensure!(auth.success(), "public key refused");
    Ok(conn)
}

/// What one exec produced.
#[derive(Debug, Default)]
pub struct Exec {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_status: Option<u32>,
    pub exit_signal: Option<Sig>,
}

/// Run `command` on a new session channel with `stdin` (then EOF); wait for CLOSE.
pub async fn exec(conn: &Conn, command: &str, stdin: &[u8]) -> anyhow::Result<Exec> {
    let mut ch = conn.channel_open_session().await?;
    ch.exec(true, command).await?;
    if !stdin.is_empty() {
        ch.data_bytes(stdin.to_vec()).await?;
    }
    ch.eof().await?;
    let mut out = Exec::default();
    while let Some(msg) = ch.wait().await {
        match msg {
            ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, ext: 1 } => out.stderr.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => out.exit_status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => out.exit_signal = Some(signal_name),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    Ok(out)
}
