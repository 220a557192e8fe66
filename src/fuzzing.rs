//! Entry points for the fuzz targets in `fuzz/` and for `tests/fuzz_regressions.rs`, which feeds
//! every committed corpus and regression input through the same functions on the stable
//! toolchain.
//!
//! Each function takes arbitrary bytes, drives one parser a peer (or an operator, for the TOML
//! config) can reach, the way the server drives it, and panics only on a bug: a panic inside the
//! parser, or a broken invariant such as a file written, renamed, linked or chmod-ed outside the
//! transfer root, or a login granted more than its certificate allows.
//!
//! Not part of the supported API.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::config::{Config, MonitordConfig, Settings};
use crate::monitord::listener::Pipeline;
use crate::monitord::metrics::Metrics;
use crate::monitord::payload;
use crate::monitord::state::{HostTable, Update};
use crate::monitord::wire::{self, DecodeOptions, Message, MsgType, Status, Transport};
use crate::ssh::auth::AuthPolicy;
use crate::ssh::authorized_keys;
use crate::transfer::{Transfer, scp, sftp};

/// A fuzz entry point: arbitrary bytes in, a panic only on a bug.
pub type Entry = fn(&[u8]);

/// Every target: (name as in `fuzz/fuzz_targets/<name>.rs` and `fuzz/corpus/<name>/`, entry).
pub const TARGETS: &[(&str, Entry)] = &[
    ("authorized_keys", authorized_keys),
    ("certificate", certificate),
    ("scp_sink", scp_sink),
    ("sftp", sftp),
    ("monitord_message", monitord_message),
    ("monitord_payload", monitord_payload),
    ("config_toml", config_toml),
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // Idle blocking-pool threads never retire: a thread exiting while libFuzzer checks for
        // leaks between inputs is reported as one.
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_keep_alive(std::time::Duration::from_secs(u64::from(u32::MAX)))
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("cannot build the tokio runtime: {e}"),
        }
    })
}

/// A resolved default configuration (container defaults), built once.
fn base_config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| match Config::resolve(Settings::default()) {
        Ok(mut c) => {
            c.allow_users = vec!["oneadmin".into(), "alice".into()];
            c
        }
        Err(e) => panic!("default configuration does not resolve: {e:#}"),
    })
}

const PEERS: [Option<IpAddr>; 4] = [
    Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
    Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    None,
];

const USERS: [&str; 4] = ["oneadmin", "alice", "mallory", ""];

// ---------------------------------------------------------------------------------------------
// authorized_keys and trusted CA files

/// An authorized_keys file (also read as a TrustedUserCAKeys file); every usable line's key is
/// then offered for login from a few peers.
pub fn authorized_keys(data: &[u8]) {
    // The server reads the file as UTF-8 (a file that is not is refused whole); lossy decoding
    // keeps the rest of the bytes useful to the fuzzer.
    let text = String::from_utf8_lossy(data);
    let (entries, errors) = authorized_keys::parse(&text);
    let lines = text.split('\n').count();
    for e in &entries {
        assert!(e.line >= 1 && e.line <= lines, "line number out of range");
        for peer in PEERS {
            let _ = e.options.from_allows(peer);
        }
        let _ = e.options.expired_at(0);
    }
    for (line, _) in &errors {
        assert!(*line >= 1 && *line <= lines, "error line out of range");
    }
    let mut config = base_config().clone();
    config.permit_user_environment = data.first().is_some_and(|b| b & 1 == 1);
    let policy = AuthPolicy::from_texts(&config, &text, Some(&text));
    let _ = policy.counts();
    let _ = policy.has_certificate_authorities();
    for e in entries.iter().take(8) {
        for (user, peer) in USERS.iter().zip(PEERS) {
            let _ = policy.offer_acceptable(user, &e.key);
            if let Some(g) = policy.authorize_key(user, &e.key, peer) {
                assert!(
                    config.allow_users.iter().any(|u| u == user),
                    "login granted to a user outside --allow-user"
                );
                assert!(
                    config.permit_user_environment || g.environment.is_empty(),
                    "environment= applied without --permit-user-environment"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates

fn ca_key() -> &'static russh::keys::PrivateKey {
    static CA: OnceLock<russh::keys::PrivateKey> = OnceLock::new();
    CA.get_or_init(|| {
        // A fixed throw-away CA derived at run time; nothing secret, and never written anywhere.
        let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[0x42; 32]);
        russh::keys::PrivateKey::from(pair)
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Rebuild `cert` with the same fields, signed by [`ca_key`], so that the policy's deeper checks
/// (principals, options, extensions) run instead of stopping at the signature.
fn resign(cert: &russh::keys::Certificate, fresh: bool) -> Option<russh::keys::Certificate> {
    use russh::keys::ssh_key::certificate::Builder;
    let (after, before) = if fresh {
        let now = unix_now();
        (now.saturating_sub(60), now + 3600)
    } else {
        (cert.valid_after(), cert.valid_before())
    };
    let mut b = Builder::new(cert.nonce(), cert.public_key().clone(), after, before).ok()?;
    b.serial(cert.serial()).ok()?;
    b.cert_type(cert.cert_type()).ok()?;
    b.key_id(cert.key_id()).ok()?;
    if cert.valid_principals().is_empty() {
        b.all_principals_valid().ok()?;
    }
    for p in cert.valid_principals() {
        b.valid_principal(p.clone()).ok()?;
    }
    for (k, v) in cert.critical_options().iter() {
        b.critical_option(k.clone(), v.clone()).ok()?;
    }
    for (k, v) in cert.extensions().iter() {
        b.extension(k.clone(), v.clone()).ok()?;
    }
    b.sign(ca_key()).ok()
}

/// A user certificate presented at login. Input: one flag byte, an authorized_keys options
/// field for a `cert-authority` line (up to the first newline), then the certificate blob as it
/// travels in the SSH userauth request.
pub fn certificate(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (opts, blob) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&rest[..0], rest),
    };
    let Ok(parsed) = russh::keys::Certificate::from_bytes(blob) else {
        return;
    };
    let opts = String::from_utf8_lossy(opts);
    let resigned = if flags & 0x04 != 0 {
        resign(&parsed, flags & 0x08 != 0)
    } else {
        None
    };
    let cert = resigned.as_ref().unwrap_or(&parsed);
    let Ok(ca_line) = russh::keys::PublicKey::new(cert.signature_key().clone(), "ca").to_openssh()
    else {
        return;
    };
    let Ok(user_line) = russh::keys::PublicKey::new(cert.public_key().clone(), "u").to_openssh()
    else {
        return;
    };
    let mut ak = String::new();
    if flags & 0x02 != 0 {
        let opts = opts.trim_matches(|c: char| c == ' ' || c == '\t');
        if opts.is_empty() {
            ak.push_str(&format!("cert-authority {ca_line}\n"));
        } else {
            ak.push_str(&format!("cert-authority,{opts} {ca_line}\n"));
        }
    }
    if flags & 0x10 != 0 {
        ak.push_str(&format!("{opts} {user_line}\n"));
    }
    let trusted = (flags & 0x01 != 0).then_some(ca_line.as_str());
    let mut config = base_config().clone();
    config.permit_user_environment = flags & 0x20 != 0;
    let policy = AuthPolicy::from_texts(&config, &ak, trusted);
    let user = USERS[usize::from(flags >> 6)];
    let peer = PEERS[usize::from((flags >> 6) ^ (flags & 3))];
    let ext = |name: &str| cert.extensions().contains_key(name);

    let _ = policy.offer_acceptable(
        user,
        &russh::keys::PublicKey::new(cert.public_key().clone(), ""),
    );
    let plain = russh::keys::PublicKey::new(cert.public_key().clone(), "");
    let _ = policy.authorize_key(user, &plain, peer);
    if let Ok(g) = policy.authorize_certificate(user, cert, peer) {
        assert!(
            config.allow_users.iter().any(|u| u == user),
            "certificate login for a user outside --allow-user"
        );
        assert!(
            g.certificate.is_some(),
            "certificate grant without its info"
        );
        assert!(
            !g.permit_pty || ext("permit-pty"),
            "PTY granted without permit-pty"
        );
        assert!(
            !g.permit_agent_forwarding || ext("permit-agent-forwarding"),
            "agent forwarding granted without permit-agent-forwarding"
        );
        assert!(
            !g.permit_port_forwarding || ext("permit-port-forwarding"),
            "port forwarding granted without permit-port-forwarding"
        );
        assert!(
            !g.permit_user_rc || ext("permit-user-rc"),
            "user rc granted without permit-user-rc"
        );
        if let Some(fc) = cert.critical_options().get("force-command") {
            assert_eq!(
                g.forced_command.as_deref(),
                Some(fc.as_str()),
                "force-command of the certificate not enforced"
            );
        }
        for (name, _) in cert.critical_options().iter() {
            assert!(
                name == "force-command" || name == "source-address",
                "certificate with an unknown critical option accepted"
            );
        }
        let at = u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0);
        // Allow a second of clock movement between the decision and this check.
        assert!(
            cert.valid_after() <= at + 1 && at <= cert.valid_before().saturating_add(1),
            "certificate outside its validity period accepted"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Transfer sandboxes

/// A transfer root with a few files and symlinks (some pointing out), next to a directory
/// outside the root holding a sentinel file. [`Sandbox::check`] proves nothing outside the root
/// was created, removed, written, linked or chmod-ed.
struct Sandbox {
    dir: tempfile::TempDir,
    root: PathBuf,
    transfer: Arc<Transfer>,
    before: Snapshot,
}

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    top: BTreeSet<std::ffi::OsString>,
    outside: BTreeSet<std::ffi::OsString>,
    outside_mode: u32,
    dir_mode: u32,
    sentinel: (u32, u64, u64, i64, u32, u32, Vec<u8>),
}

const SENTINEL: &[u8] = b"sentinel: must never change\n";

fn names(dir: &Path) -> BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
        .unwrap_or_default()
}

fn snapshot(dir: &Path) -> Snapshot {
    let outside = dir.join("outside");
    let sentinel = outside.join("sentinel");
    let md = std::fs::symlink_metadata(&sentinel).ok();
    let mode = |p: &Path| std::fs::symlink_metadata(p).map_or(0, |m| m.mode());
    Snapshot {
        top: names(dir),
        outside: names(&outside),
        outside_mode: mode(&outside),
        dir_mode: mode(dir),
        sentinel: (
            md.as_ref().map_or(0, |m| m.mode()),
            md.as_ref().map_or(0, |m| m.nlink()),
            md.as_ref().map_or(0, |m| m.size()),
            md.as_ref().map_or(0, |m| m.mtime()),
            md.as_ref().map_or(0, |m| m.uid()),
            md.as_ref().map_or(0, |m| m.gid()),
            std::fs::read(&sentinel).unwrap_or_default(),
        ),
    }
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = match tempfile::Builder::new().prefix("tm-fuzz.").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("cannot create a temp dir: {e}"),
        };
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        let setup = || -> std::io::Result<()> {
            std::fs::create_dir_all(root.join("sub/deeper"))?;
            std::fs::create_dir_all(&outside)?;
            std::fs::write(outside.join("sentinel"), SENTINEL)?;
            std::fs::set_permissions(
                outside.join("sentinel"),
                std::fs::Permissions::from_mode(0o640),
            )?;
            std::fs::write(root.join("f"), b"a file inside the root\n")?;
            std::fs::write(root.join("sub/g"), b"g\n")?;
            std::os::unix::fs::symlink("../outside", root.join("up"))?;
            std::os::unix::fs::symlink(outside.join("sentinel"), root.join("abs"))?;
            std::os::unix::fs::symlink("loop", root.join("loop"))?;
            std::os::unix::fs::symlink("sub", root.join("in"))?;
            Ok(())
        };
        if let Err(e) = setup() {
            panic!("cannot populate the sandbox: {e}");
        }
        let mut registry = prometheus_client::registry::Registry::default();
        let transfer = match Transfer::new(std::slice::from_ref(&root), &root, false, &mut registry)
        {
            Ok(t) => t,
            Err(e) => panic!("cannot open the sandbox root: {e:#}"),
        };
        let before = snapshot(dir.path());
        Sandbox {
            dir,
            root,
            transfer,
            before,
        }
    }

    /// Panic if anything outside the root changed; then make the tree removable.
    fn check(self) {
        let after = snapshot(self.dir.path());
        assert_eq!(
            self.before, after,
            "something outside the transfer root changed"
        );
        make_removable(&self.root);
    }
}

/// Give every directory under `dir` (not following symlinks) owner rwx, so that the temp dir can
/// be removed whatever modes a session set.
fn make_removable(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&d) else {
            continue;
        };
        if !md.is_dir() {
            continue;
        }
        if md.mode() & 0o700 != 0o700 {
            let _ = std::fs::set_permissions(
                &d,
                std::fs::Permissions::from_mode((md.mode() & 0o7777) | 0o700),
            );
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            stack.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// scp

/// `scp -t` (sink) or `scp -f` (source) on a sandbox root. Input: one flag byte (`-r`, `-p`,
/// `-d`, target, direction), then what the client sends. The input is also parsed as an exec
/// command line.
pub fn scp_sink(data: &[u8]) {
    let _ = scp::parse(data);
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    let sb = Sandbox::new();
    let mut opts = String::new();
    for (bit, c) in [(0x01, 'r'), (0x02, 'p'), (0x04, 'd')] {
        if flags & bit != 0 {
            opts.push(c);
        }
    }
    let source = flags & 0x10 != 0;
    opts.push(if source { 'f' } else { 't' });
    let target = match (flags >> 5) & 3 {
        0 => sb.root.clone(),
        1 => sb.root.join("f"),
        2 => sb.root.join("new"),
        _ => sb.root.join("up"),
    };
    let line = format!("scp -{opts} {}", target.display());
    let Some(cmd) = scp::parse(line.as_bytes()) else {
        panic!("scp command line not recognised: {line}");
    };
    let input = std::io::Cursor::new(stream.to_vec());
    let transfer = sb.transfer.clone();
    runtime().block_on(async move {
        let _ = scp::serve(cmd, transfer, input, tokio::io::sink(), tokio::io::sink()).await;
    });
    sb.check();
}

// ---------------------------------------------------------------------------------------------
// SFTP

/// An SFTP session on a sandbox root (home = the root). The input is the client's byte stream;
/// when it does not start with an INIT packet one is prepended, so mutations reach the requests.
pub fn sftp(data: &[u8]) {
    let mut stream = Vec::with_capacity(data.len() + 9);
    if data.get(4) != Some(&1) {
        stream.extend_from_slice(&[0, 0, 0, 5, 1, 0, 0, 0, 3]);
    }
    stream.extend_from_slice(data);
    let sb = Sandbox::new();
    let transfer = sb.transfer.clone();
    runtime().block_on(async move {
        let _ = sftp::serve(transfer, std::io::Cursor::new(stream), tokio::io::sink()).await;
    });
    sb.check();
}

// ---------------------------------------------------------------------------------------------
// monitord

/// A deterministic 512-bit RSA key for the encrypted decode path (generated at run time).
fn monitord_key() -> &'static Arc<rsa::RsaPrivateKey> {
    static KEY: OnceLock<Arc<rsa::RsaPrivateKey>> = OnceLock::new();
    KEY.get_or_init(|| {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(4124);
        match rsa::RsaPrivateKey::new(&mut rng, 512) {
            Ok(k) => Arc::new(k),
            Err(e) => panic!("cannot generate the RSA test key: {e}"),
        }
    })
}

fn metrics() -> Arc<Metrics> {
    static M: OnceLock<Arc<Metrics>> = OnceLock::new();
    M.get_or_init(|| Arc::new(Metrics::new_unregistered()))
        .clone()
}

/// One monitord message (a UDP datagram or a whole TCP stream) through the listener pipeline:
/// decode, account, update the host table; without a key, with one, and with encryption
/// required.
pub fn monitord_message(data: &[u8]) {
    let _ = wire::parse_header(data);
    let dflt = MonitordConfig::default();
    if data.len() > dflt.max_message_bytes {
        return; // the listeners refuse it before decoding
    }
    let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 4124));
    for (key, require) in [(false, false), (true, false), (true, true)] {
        let opts = DecodeOptions {
            private_key: key.then(|| monitord_key().clone()),
            require_encryption: require,
            max_inflated: dflt.max_inflated_bytes,
        };
        let p = Pipeline::new(
            metrics(),
            Arc::new(HostTable::new(4)),
            opts.clone(),
            None,
            None,
            0,
            dflt.max_message_bytes,
            dflt.read_timeout,
            1,
        );
        let mut decoder = wire::Decoder::new(opts);
        if let Ok(m) = decoder.decode(data) {
            assert!(
                m.payload.len() <= dflt.max_inflated_bytes,
                "payload larger than --monitord-max-inflated-bytes"
            );
            assert!(
                !require || m.encrypted,
                "plaintext accepted with encryption required"
            );
        }
        let accepted = p.process(Transport::Udp, &mut decoder, peer, data);
        if accepted.is_some() {
            assert_eq!(p.table.len(), 1, "an accepted message is recorded");
        }
        let _ = serde_json::to_string(&p.table.to_json());
    }
}

/// A decoded monitord payload (template text) as every message type interprets it.
pub fn monitord_payload(data: &[u8]) {
    if let Ok(t) = payload::parse(data) {
        let _ = t.single("HOSTNAME");
        let _ = t.vectors("VM").count();
        let _ = payload::for_each_monitor_vm(&t, |id, m| {
            let _ = (id.len(), m.attrs.len());
        });
    }
    let table = HostTable::new(16);
    for (i, ty) in MsgType::ALL.into_iter().enumerate() {
        for status in Status::ALL {
            let m = Message {
                ty,
                status,
                host_id: i as i32,
                epoch: 1,
                payload: data,
                encrypted: false,
            };
            let update = Update::from_message(&m).unwrap_or(Update::None);
            let _ = table.record(ty, status, m.host_id, m.epoch, update);
        }
    }
    let _ = serde_json::to_string(&table.to_json());
}

// ---------------------------------------------------------------------------------------------
// TOML configuration

/// A `--config` file: parse, merge with defaults, validate, print as `check-config` does.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // read_to_string refuses it with a clear error
    };
    let Ok(settings) = Settings::from_toml(text) else {
        return;
    };
    if let Ok(config) = Config::resolve(settings) {
        let _ = toml::to_string_pretty(&config);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Tamper = fn(&Path);

    #[test]
    fn sandbox_check_sees_every_change_outside_the_root() {
        let tampers: [(&str, Tamper); 7] = [
            ("write", |d| {
                std::fs::write(d.join("outside/sentinel"), b"pwned").unwrap()
            }),
            ("chmod", |d| {
                std::fs::set_permissions(
                    d.join("outside/sentinel"),
                    std::fs::Permissions::from_mode(0o777),
                )
                .unwrap()
            }),
            ("hardlink", |d| {
                std::fs::hard_link(d.join("outside/sentinel"), d.join("root/hl")).unwrap()
            }),
            ("create", |d| {
                std::fs::write(d.join("outside/new"), b"").unwrap()
            }),
            ("create-top", |d| {
                std::fs::write(d.join("new"), b"").unwrap()
            }),
            ("rename", |d| {
                std::fs::rename(d.join("outside/sentinel"), d.join("root/s")).unwrap()
            }),
            ("chmod-dir", |d| {
                std::fs::set_permissions(d.join("outside"), std::fs::Permissions::from_mode(0o777))
                    .unwrap()
            }),
        ];
        for (name, tamper) in tampers {
            let sb = Sandbox::new();
            tamper(sb.dir.path());
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sb.check()));
            assert!(caught.is_err(), "{name} outside the root went unnoticed");
        }
    }

    #[test]
    fn sandbox_check_allows_changes_inside_the_root() {
        let sb = Sandbox::new();
        let root = sb.root.clone();
        std::fs::write(root.join("f"), b"changed").unwrap();
        std::fs::create_dir(root.join("locked")).unwrap();
        std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o000))
            .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("lnk")).unwrap();
        sb.check();
    }
}
