//! Configuration: command-line flags, `TM_SIDECAR_*` environment variables and a TOML file,
//! merged with the precedence flag > env > file > default, then validated into [`Config`].
//!
//! clap already gives "flag beats env". Every field of [`Settings`] is optional, so after clap
//! has parsed we can fill the gaps from the TOML file and finally from the defaults (container
//! defaults, or the `--dev` ones).

use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::ssh::limits::{MaxStartups, PenaltyPolicy, default_exempt};
use crate::ssh::patterns::Cidr;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// Every `serve` setting, as given by flags, env vars or the TOML file (all optional here).
///
/// Field names map to flags (`ssh_listen` → `--ssh-listen`), env vars
/// (`TM_SIDECAR_SSH_LISTEN`, comma-separated for lists) and TOML keys (`ssh-listen`).
#[derive(Args, Debug, Default, Clone, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Settings {
    /// Local try-out mode: listen on 127.0.0.1 (SSH 2222, monitord 4124, admin 9124), create
    /// keys under ./keys/dev/ if missing, serve ./dev/datastores, print an ssh command to paste.
    #[arg(long, env = "TM_SIDECAR_DEV")]
    #[serde(skip)]
    pub dev: bool,

    /// TOML config file; its keys are the flag names without the leading dashes.
    #[arg(long, env = "TM_SIDECAR_CONFIG", value_name = "PATH")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address to accept SSH connections on (repeatable) [default: 0.0.0.0:22].
    #[arg(
        long,
        env = "TM_SIDECAR_SSH_LISTEN",
        value_name = "ADDR:PORT",
        value_delimiter = ','
    )]
    pub ssh_listen: Vec<SocketAddr>,

    /// OpenSSH private host key (repeatable; ed25519, ECDSA or RSA)
    /// [default: /etc/tm-sidecar/ssh_host_ed25519_key].
    #[arg(
        long,
        env = "TM_SIDECAR_HOST_KEY",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub host_key: Vec<PathBuf>,

    /// authorized_keys file in OpenSSH format (repeatable)
    /// [default: /etc/tm-sidecar/authorized_keys].
    #[arg(
        long,
        env = "TM_SIDECAR_AUTHORIZED_KEYS",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub authorized_keys: Vec<PathBuf>,

    /// File of CA public keys trusted to sign user certificates (like sshd's TrustedUserCAKeys).
    #[arg(long, env = "TM_SIDECAR_TRUSTED_USER_CA_KEYS", value_name = "PATH")]
    pub trusted_user_ca_keys: Option<PathBuf>,

    /// User name clients may log in as (repeatable) [default: oneadmin].
    #[arg(
        long,
        env = "TM_SIDECAR_ALLOW_USER",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub allow_user: Vec<String>,

    /// Shell that runs exec commands as `<shell> -c <command>` [default: /bin/bash].
    #[arg(long, env = "TM_SIDECAR_SHELL", value_name = "PATH")]
    pub shell: Option<PathBuf>,

    /// Home and working directory of sessions [default: /var/lib/one].
    #[arg(long, env = "TM_SIDECAR_HOME", value_name = "PATH")]
    pub home: Option<PathBuf>,

    /// Directory native scp/SFTP may touch (repeatable) [default: /var/lib/one/datastores].
    #[arg(
        long,
        env = "TM_SIDECAR_TRANSFER_ROOT",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub transfer_root: Vec<PathBuf>,

    /// Address for the monitord relay, TCP and UDP (repeatable; `off` disables it)
    /// [default: 0.0.0.0:4124].
    #[arg(
        long,
        env = "TM_SIDECAR_MONITORD_LISTEN",
        value_name = "ADDR:PORT|off",
        value_delimiter = ','
    )]
    pub monitord_listen: Vec<String>,

    /// onemonitord address to forward valid messages to; none makes the relay a sink.
    #[arg(long, env = "TM_SIDECAR_MONITORD_UPSTREAM", value_name = "ADDR:PORT")]
    pub monitord_upstream: Option<SocketAddr>,

    /// RSA private key (PEM, PKCS#1 or PKCS#8) that decrypts monitord payloads.
    #[arg(long, env = "TM_SIDECAR_MONITORD_PRIVATE_KEY", value_name = "PATH")]
    pub monitord_private_key: Option<PathBuf>,

    /// Refuse monitord payloads that do not decrypt with --monitord-private-key.
    #[arg(long, env = "TM_SIDECAR_MONITORD_REQUIRE_ENCRYPTION")]
    #[serde(default)]
    pub monitord_require_encryption: Option<bool>,

    /// Largest monitord TCP message in bytes [default: 4194304].
    #[arg(
        long,
        env = "TM_SIDECAR_MONITORD_MAX_MESSAGE_BYTES",
        value_name = "BYTES"
    )]
    pub monitord_max_message_bytes: Option<usize>,

    /// Largest inflated monitord payload in bytes (zlib bomb guard) [default: 16777216].
    #[arg(
        long,
        env = "TM_SIDECAR_MONITORD_MAX_INFLATED_BYTES",
        value_name = "BYTES"
    )]
    pub monitord_max_inflated_bytes: Option<usize>,

    /// Seconds a monitord TCP client has to send its whole message [default: 10].
    #[arg(long, env = "TM_SIDECAR_MONITORD_READ_TIMEOUT", value_name = "SECONDS")]
    pub monitord_read_timeout: Option<u64>,

    /// Concurrent monitord TCP connections [default: 256].
    #[arg(long, env = "TM_SIDECAR_MONITORD_MAX_CONNECTIONS", value_name = "N")]
    pub monitord_max_connections: Option<usize>,

    /// Messages per second accepted from one source address, 0 = unlimited [default: 1000].
    #[arg(long, env = "TM_SIDECAR_MONITORD_RATE_LIMIT", value_name = "N")]
    pub monitord_rate_limit: Option<u32>,

    /// Hosts tracked in the monitord host table [default: 10000].
    #[arg(long, env = "TM_SIDECAR_MONITORD_MAX_HOSTS", value_name = "N")]
    pub monitord_max_hosts: Option<usize>,

    /// Address of the admin HTTP endpoint (/healthz, /readyz, /metrics, /api/v1/hosts), or
    /// `off` [default: 0.0.0.0:9124].
    #[arg(long, env = "TM_SIDECAR_ADMIN_LISTEN", value_name = "ADDR:PORT|off")]
    pub admin_listen: Option<String>,

    /// Log format [default: json, text when stderr is a terminal].
    #[arg(long, env = "TM_SIDECAR_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Seconds running sessions get to finish after SIGTERM [default: 30].
    #[arg(long, env = "TM_SIDECAR_SHUTDOWN_GRACE", value_name = "SECONDS")]
    pub shutdown_grace: Option<u64>,

    /// Session channels one connection may hold open at once (ControlMaster) [default: 64].
    #[arg(long, env = "TM_SIDECAR_MAX_SESSIONS", value_name = "N")]
    pub max_sessions: Option<usize>,

    /// Apply `environment=` options of authorized_keys (like sshd's PermitUserEnvironment).
    #[arg(long, env = "TM_SIDECAR_PERMIT_USER_ENVIRONMENT")]
    pub permit_user_environment: Option<bool>,

    /// fsync uploaded files before renaming them into place [default: true].
    #[arg(long, env = "TM_SIDECAR_FSYNC_UPLOADS")]
    pub fsync_uploads: Option<bool>,

    /// Seconds between server keepalives to detect dead peers, 0 = off [default: 15].
    #[arg(long, env = "TM_SIDECAR_CLIENT_ALIVE_INTERVAL", value_name = "SECONDS")]
    pub client_alive_interval: Option<u64>,

    /// Unanswered keepalives before the connection is dropped [default: 3].
    #[arg(long, env = "TM_SIDECAR_CLIENT_ALIVE_COUNT_MAX", value_name = "N")]
    pub client_alive_count_max: Option<usize>,

    /// SSH connections open at once, authenticated or not [default: 2048].
    #[arg(long, env = "TM_SIDECAR_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// Connections still authenticating, as sshd's MaxStartups: past START new ones are
    /// dropped with probability RATE %, rising linearly to 100 % at FULL [default: 10:30:100].
    #[arg(long, env = "TM_SIDECAR_MAX_STARTUPS", value_name = "START:RATE:FULL")]
    pub max_startups: Option<String>,

    /// How many of one source's authenticating connections count towards --max-startups'
    /// total (the source's own connections are early-dropped on their own count too): a
    /// flooding host cannot push others into the drop zone. Keep it below START [default: 8].
    #[arg(long, env = "TM_SIDECAR_PER_SOURCE_MAX_STARTUPS", value_name = "N")]
    pub per_source_max_startups: Option<usize>,

    /// Seconds a connection has to authenticate before it is closed [default: 60].
    #[arg(long, env = "TM_SIDECAR_LOGIN_GRACE_TIME", value_name = "SECONDS")]
    pub login_grace_time: Option<u64>,

    /// Failed authentication attempts allowed per connection [default: 6].
    #[arg(long, env = "TM_SIDECAR_MAX_AUTH_TRIES", value_name = "N")]
    pub max_auth_tries: Option<usize>,

    /// Close an authenticated connection that has had no channel open for this many seconds
    /// (sshd's UnusedConnectionTimeout); keep it above the clients' ControlPersist, 0 = never
    /// [default: 3600].
    #[arg(
        long,
        env = "TM_SIDECAR_UNUSED_CONNECTION_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub unused_connection_timeout: Option<u64>,

    /// Refuse sources for a growing period after failed logins, connections that never try
    /// to log in and login grace time running out (sshd's PerSourcePenalties) [default: true].
    #[arg(long, env = "TM_SIDECAR_PER_SOURCE_PENALTIES")]
    pub per_source_penalties: Option<bool>,

    /// Client input (stdin of commands, uploads) queued in memory, all channels together, in MiB;
    /// past it, connections wait for consumers to catch up [default: 32].
    #[arg(long, env = "TM_SIDECAR_MAX_INPUT_BUFFER_MIB", value_name = "MIB")]
    pub max_input_buffer_mib: Option<usize>,

    /// Networks never penalised, comma-separated or repeated; `none` penalises loopback too
    /// [default: 127.0.0.0/8,::1/128].
    #[arg(
        long,
        env = "TM_SIDECAR_PENALTY_EXEMPT",
        value_name = "CIDR,...",
        value_delimiter = ','
    )]
    pub penalty_exempt: Vec<String>,
}

/// Fill every unset field of `self` from `other`.
macro_rules! fill_from {
    ($dst:expr, $src:expr; opt: $($o:ident),* ; vec: $($v:ident),* ) => {{
        $( if $dst.$o.is_none() { $dst.$o = $src.$o.take(); } )*
        $( if $dst.$v.is_empty() { $dst.$v = std::mem::take(&mut $src.$v); } )*
    }};
}

impl Settings {
    fn fill_from(&mut self, mut file: Settings) {
        fill_from!(self, file;
            opt: trusted_user_ca_keys, shell, home, monitord_upstream, monitord_private_key,
                 monitord_require_encryption, monitord_max_message_bytes,
                 monitord_max_inflated_bytes, monitord_read_timeout, monitord_max_connections,
                 monitord_rate_limit, monitord_max_hosts, admin_listen, log_format,
                 shutdown_grace, max_sessions, permit_user_environment, fsync_uploads,
                 client_alive_interval, client_alive_count_max, max_connections, max_startups,
                 per_source_max_startups, login_grace_time, max_auth_tries,
                 unused_connection_timeout, per_source_penalties, max_input_buffer_mib;
            vec: ssh_listen, host_key, authorized_keys, allow_user, transfer_root,
                 monitord_listen, penalty_exempt);
    }

    /// Parse a TOML config file.
    pub fn from_toml(text: &str) -> Result<Settings> {
        Ok(toml::from_str(text)?)
    }
}

/// Settings of the monitord relay.
#[derive(Clone, Debug, Serialize)]
pub struct MonitordConfig {
    pub listen: Vec<SocketAddr>,
    pub upstream: Option<SocketAddr>,
    pub private_key: Option<PathBuf>,
    pub require_encryption: bool,
    pub max_message_bytes: usize,
    pub max_inflated_bytes: usize,
    #[serde(with = "secs")]
    pub read_timeout: Duration,
    pub max_connections: usize,
    pub rate_limit: u32,
    pub max_hosts: usize,
}

impl Default for MonitordConfig {
    fn default() -> Self {
        MonitordConfig {
            listen: vec![],
            upstream: None,
            private_key: None,
            require_encryption: false,
            max_message_bytes: 4 << 20,
            max_inflated_bytes: 16 << 20,
            read_timeout: Duration::from_secs(10),
            max_connections: 256,
            rate_limit: 1000,
            max_hosts: 10_000,
        }
    }
}

/// The validated configuration `serve` runs with.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub dev: bool,
    pub ssh_listen: Vec<SocketAddr>,
    pub host_keys: Vec<PathBuf>,
    pub authorized_keys: Vec<PathBuf>,
    pub trusted_user_ca_keys: Option<PathBuf>,
    pub allow_users: Vec<String>,
    pub shell: PathBuf,
    pub home: PathBuf,
    pub transfer_roots: Vec<PathBuf>,
    pub monitord: MonitordConfig,
    pub admin_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    #[serde(with = "secs")]
    pub shutdown_grace: Duration,
    pub max_sessions: usize,
    pub permit_user_environment: bool,
    pub fsync_uploads: bool,
    #[serde(with = "secs")]
    pub client_alive_interval: Duration,
    pub client_alive_count_max: usize,
    pub max_input_buffer_mib: usize,
    pub limits: SshLimits,
}

/// Limits on what unauthenticated and idle peers can hold.
#[derive(Clone, Debug, Serialize)]
pub struct SshLimits {
    pub max_connections: usize,
    #[serde(serialize_with = "display")]
    pub max_startups: MaxStartups,
    pub per_source_max_startups: usize,
    #[serde(with = "secs")]
    pub login_grace_time: Duration,
    pub max_auth_tries: usize,
    /// `None` = never.
    #[serde(serialize_with = "opt_secs")]
    pub unused_connection_timeout: Option<Duration>,
    pub penalties: PenaltyPolicy,
}

impl SshLimits {
    fn resolve(s: &Settings) -> Result<SshLimits> {
        let positive = |flag: &str, v: Option<usize>, default: usize| -> Result<usize> {
            match v.unwrap_or(default) {
                0 => bail!("{flag} must be at least 1"),
                n => Ok(n),
            }
        };
        let max_startups = match &s.max_startups {
            Some(text) => MaxStartups::parse(text)?,
            None => MaxStartups::default(),
        };
        let per_source_max_startups = match s.per_source_max_startups {
            None => 8.min(max_startups.start.saturating_sub(1)).max(1),
            Some(n) if n == 0 || (n >= max_startups.start && max_startups.start > 1) => bail!(
                "--per-source-max-startups {n}: must be at least 1 and below START of \
                 --max-startups ({})",
                max_startups.start
            ),
            Some(n) => n,
        };
        let login_grace_time = Duration::from_secs(s.login_grace_time.unwrap_or(60));
        if login_grace_time.is_zero() {
            // sshd allows 0 = unlimited; an SSH port facing the network should not.
            bail!("--login-grace-time must be at least 1 second");
        }
        let exempt = if s.penalty_exempt.is_empty() {
            default_exempt()
        } else if s.penalty_exempt.len() == 1 && s.penalty_exempt[0].eq_ignore_ascii_case("none") {
            vec![]
        } else {
            let mut list = vec![];
            for entry in &s.penalty_exempt {
                match Cidr::parse(entry.trim()) {
                    Ok(Some(c)) => list.push(c),
                    Ok(None) => {
                        bail!("--penalty-exempt {entry:?}: expected an address or ADDR/LEN")
                    }
                    Err(e) => bail!("--penalty-exempt: {e}"),
                }
            }
            list
        };
        Ok(SshLimits {
            max_connections: positive("--max-connections", s.max_connections, 2048)?,
            max_startups,
            per_source_max_startups,
            login_grace_time,
            max_auth_tries: positive("--max-auth-tries", s.max_auth_tries, 6)?,
            unused_connection_timeout: match s.unused_connection_timeout.unwrap_or(3600) {
                0 => None,
                n => Some(Duration::from_secs(n)),
            },
            penalties: PenaltyPolicy {
                enabled: s.per_source_penalties.unwrap_or(true),
                exempt,
                ..PenaltyPolicy::default()
            },
        })
    }
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.map_or(0, |d| d.as_secs()))
}

mod secs {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

/// Where `--dev` keeps its generated keys, relative to the working directory.
pub const DEV_KEY_DIR: &str = "keys/dev";
/// Where `--dev` serves datastores from, relative to the working directory.
pub const DEV_TRANSFER_ROOT: &str = "dev/datastores";

fn parse_addr(flag: &str, value: &str) -> Result<SocketAddr> {
    value
        .parse()
        .with_context(|| format!("{flag} {value:?}: expected ADDR:PORT, e.g. 0.0.0.0:22"))
}

fn parse_optional_addr(flag: &str, value: &str) -> Result<Option<SocketAddr>> {
    if value.eq_ignore_ascii_case("off") {
        Ok(None)
    } else {
        parse_addr(flag, value).map(Some)
    }
}

impl Config {
    /// Merge flags/env with the config file (if any) and the defaults.
    pub fn load(mut settings: Settings) -> Result<Config> {
        if let Some(path) = settings.config.clone() {
            check_file("--config", &path)?;
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("--config {}: cannot read", path.display()))?;
            let file = Settings::from_toml(&text)
                .with_context(|| format!("--config {}: invalid TOML config", path.display()))?;
            settings.fill_from(file);
        }
        Self::resolve(settings)
    }

    /// Apply defaults to merged settings and check what can be checked without touching files.
    pub fn resolve(s: Settings) -> Result<Config> {
        let dev = s.dev;
        let limits = SshLimits::resolve(&s)?;
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        let or_vec = |v: Vec<PathBuf>, dflt: PathBuf| if v.is_empty() { vec![dflt] } else { v };

        let (ssh_default, monitord_default, admin_default, key_dir) = if dev {
            (
                "127.0.0.1:2222",
                "127.0.0.1:4124",
                "127.0.0.1:9124",
                cwd.join(DEV_KEY_DIR),
            )
        } else {
            (
                "0.0.0.0:22",
                "0.0.0.0:4124",
                "0.0.0.0:9124",
                PathBuf::from("/etc/tm-sidecar"),
            )
        };

        let ssh_listen = if s.ssh_listen.is_empty() {
            vec![parse_addr("--ssh-listen", ssh_default)?]
        } else {
            s.ssh_listen
        };
        let host_keys = or_vec(s.host_key, key_dir.join("ssh_host_ed25519_key"));
        let authorized_keys = or_vec(s.authorized_keys, key_dir.join("authorized_keys"));
        let transfer_roots = or_vec(
            s.transfer_root,
            if dev {
                cwd.join(DEV_TRANSFER_ROOT)
            } else {
                PathBuf::from("/var/lib/one/datastores")
            },
        );
        let home = s.home.unwrap_or_else(|| {
            if dev {
                cwd.join("dev")
            } else {
                PathBuf::from("/var/lib/one")
            }
        });
        let allow_users = if !s.allow_user.is_empty() {
            s.allow_user
        } else if dev {
            let mut users = vec!["oneadmin".to_string()];
            if let Some(me) = current_user_name().filter(|u| u != "oneadmin") {
                users.push(me);
            }
            users
        } else {
            vec!["oneadmin".to_string()]
        };

        let monitord_listen = if s.monitord_listen.is_empty() {
            vec![parse_addr("--monitord-listen", monitord_default)?]
        } else if s
            .monitord_listen
            .iter()
            .any(|v| v.eq_ignore_ascii_case("off"))
        {
            if s.monitord_listen.len() > 1 {
                bail!("--monitord-listen: `off` cannot be combined with addresses");
            }
            vec![]
        } else {
            s.monitord_listen
                .iter()
                .map(|v| parse_addr("--monitord-listen", v))
                .collect::<Result<_>>()?
        };
        let admin_listen = parse_optional_addr(
            "--admin-listen",
            s.admin_listen.as_deref().unwrap_or(admin_default),
        )?;

        let mut monitord = MonitordConfig {
            listen: monitord_listen,
            upstream: s.monitord_upstream,
            private_key: s.monitord_private_key,
            require_encryption: s.monitord_require_encryption.unwrap_or(false),
            ..MonitordConfig::default()
        };
        if let Some(v) = s.monitord_max_message_bytes {
            monitord.max_message_bytes = v;
        }
        if let Some(v) = s.monitord_max_inflated_bytes {
            monitord.max_inflated_bytes = v;
        }
        if let Some(v) = s.monitord_read_timeout {
            monitord.read_timeout = Duration::from_secs(v);
        }
        if let Some(v) = s.monitord_max_connections {
            monitord.max_connections = v;
        }
        if let Some(v) = s.monitord_rate_limit {
            monitord.rate_limit = v;
        }
        if let Some(v) = s.monitord_max_hosts {
            monitord.max_hosts = v;
        }
        if monitord.require_encryption && monitord.private_key.is_none() {
            bail!("--monitord-require-encryption needs --monitord-private-key");
        }

        let log_format = s.log_format.unwrap_or_else(|| {
            use std::io::IsTerminal;
            if dev || std::io::stderr().is_terminal() {
                LogFormat::Text
            } else {
                LogFormat::Json
            }
        });
        let max_input_buffer_mib = s.max_input_buffer_mib.unwrap_or(32);
        if !(1..=65536).contains(&max_input_buffer_mib) {
            bail!("--max-input-buffer-mib must be between 1 and 65536");
        }
        let max_sessions = s.max_sessions.unwrap_or(64);
        if max_sessions == 0 {
            bail!("--max-sessions must be at least 1");
        }

        Ok(Config {
            dev,
            ssh_listen,
            host_keys,
            authorized_keys,
            trusted_user_ca_keys: s.trusted_user_ca_keys,
            allow_users,
            shell: s.shell.unwrap_or_else(|| PathBuf::from("/bin/bash")),
            home,
            transfer_roots,
            monitord,
            admin_listen,
            log_format,
            shutdown_grace: Duration::from_secs(s.shutdown_grace.unwrap_or(30)),
            max_sessions,
            permit_user_environment: s.permit_user_environment.unwrap_or(false),
            fsync_uploads: s.fsync_uploads.unwrap_or(true),
            client_alive_interval: Duration::from_secs(s.client_alive_interval.unwrap_or(15)),
            client_alive_count_max: s.client_alive_count_max.unwrap_or(3),
            max_input_buffer_mib,
            limits,
        })
    }

    /// Check the files and directories the configuration names, so that a bad start fails with
    /// one line naming the flag, the path and the OS error.
    pub fn check_paths(&self) -> Result<()> {
        check_file("--shell", &self.shell)?;
        check_dir("--home", &self.home)?;
        for root in &self.transfer_roots {
            check_dir("--transfer-root", root)?;
        }
        for path in &self.authorized_keys {
            check_file("--authorized-keys", path)?;
        }
        if let Some(path) = &self.trusted_user_ca_keys {
            check_file("--trusted-user-ca-keys", path)?;
        }
        if let Some(path) = &self.monitord.private_key {
            check_file("--monitord-private-key", path)?;
        }
        Ok(())
    }
}

fn check_file(flag: &str, path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{flag} {}", path.display()))?;
    if meta.is_dir() {
        bail!("{flag} {}: is a directory, expected a file", path.display());
    }
    // Opening a FIFO blocks until a writer appears: refuse it (and sockets) instead of hanging.
    let kind = meta.file_type();
    if kind.is_fifo() || kind.is_socket() {
        bail!("{flag} {}: not a regular file", path.display());
    }
    std::fs::File::open(path).with_context(|| format!("{flag} {}: cannot open", path.display()))?;
    Ok(())
}

fn check_dir(flag: &str, path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{flag} {}", path.display()))?;
    if !meta.is_dir() {
        bail!("{flag} {}: not a directory", path.display());
    }
    Ok(())
}

/// The name of the user this process runs as (from the passwd database, else $USER).
pub fn current_user_name() -> Option<String> {
    let uid = rustix::process::getuid().as_raw();
    if let Ok(passwd) = std::fs::read_to_string("/etc/passwd") {
        for line in passwd.lines() {
            let mut fields = line.split(':');
            let (Some(name), _, Some(id)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            if id.parse::<u32>().ok() == Some(uid) {
                return Some(name.to_string());
            }
        }
    }
    std::env::var("USER").ok().filter(|u| !u.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_fill_only_unset_fields() {
        let mut flags = Settings {
            shell: Some("/bin/sh".into()),
            ..Default::default()
        };
        let file = Settings::from_toml(
            "shell = \"/bin/zsh\"\nhome = \"/h\"\nssh-listen = [\"127.0.0.1:2200\"]\n",
        )
        .unwrap();
        flags.fill_from(file);
        assert_eq!(flags.shell.as_deref(), Some(Path::new("/bin/sh")));
        assert_eq!(flags.home.as_deref(), Some(Path::new("/h")));
        assert_eq!(
            flags.ssh_listen,
            vec!["127.0.0.1:2200".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn unknown_toml_keys_are_rejected() {
        let err = Settings::from_toml("shel = \"/bin/sh\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("shel"), "{err:#}");
    }

    #[test]
    fn container_defaults_match_the_contract() {
        let c = Config::resolve(Settings::default()).unwrap();
        assert_eq!(
            c.ssh_listen,
            vec!["0.0.0.0:22".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            c.monitord.listen,
            vec!["0.0.0.0:4124".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.admin_listen, Some("0.0.0.0:9124".parse().unwrap()));
        assert_eq!(c.allow_users, vec!["oneadmin"]);
        assert_eq!(c.shell, Path::new("/bin/bash"));
        assert_eq!(
            c.transfer_roots,
            vec![PathBuf::from("/var/lib/one/datastores")]
        );
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    }

    #[test]
    fn monitord_can_be_turned_off() {
        let s = Settings {
            monitord_listen: vec!["off".into()],
            ..Default::default()
        };
        assert!(Config::resolve(s).unwrap().monitord.listen.is_empty());
    }

    #[test]
    fn bad_address_names_the_flag() {
        let s = Settings {
            monitord_listen: vec!["nowhere".into()],
            ..Default::default()
        };
        let err = format!("{:#}", Config::resolve(s).unwrap_err());
        assert!(err.contains("--monitord-listen"), "{err}");
    }
}
