//! tm-sidecar command line: parse, wire the servers together, handle signals.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use tm_sidecar::config::{Config, Settings};
use tm_sidecar::{admin, collect, keys, logging, monitord, resources, ssh, transfer};

/// SSH transfer-manager and monitord sidecar for OpenNebula front-ends on Kubernetes.
///
/// Runs next to oned in the front-end pod: an SSH server for the oneadmin account on port 22
/// (exec through bash, native scp and SFTP confined to the datastores, agent forwarding), a
/// relay for hypervisor monitoring messages on 4124 TCP+UDP, and an admin HTTP endpoint with
/// health, readiness and Prometheus metrics on 9124.
///
/// Try it locally:  tm-sidecar serve --dev
#[derive(Parser, Debug)]
#[command(name = "tm-sidecar", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the SSH server, the monitord relay and the admin endpoint.
    Serve(Box<Settings>),
    /// Write host key, oneadmin client key pair, authorized_keys and monitord RSA key pair into a
    /// directory (mode 0600, never overwriting).
    Keygen {
        /// Directory to write the keys into (created if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// Do not write the monitord RSA key pair.
        #[arg(long)]
        no_monitord: bool,
    },
    /// Load and validate everything `serve` would, print the effective configuration as TOML.
    CheckConfig(Box<Settings>),
    /// Send one monitord message as OpenNebula's probes do (reachability check from a hypervisor).
    MonitordSend(monitord::send::SendArgs),
    /// Speak SFTP on stdin/stdout, confined like the subsystem (usable as `sftp -D`).
    SftpServer(transfer::sftp::SftpServerArgs),
    /// Exit 0 if the admin endpoint answers /healthz (for the container HEALTHCHECK).
    Healthcheck {
        /// URL to probe (plain http).
        #[arg(long, default_value = "http://127.0.0.1:9124/healthz")]
        url: String,
    },
}

fn main() -> ExitCode {
    // Before any other thread exists, so that every thread shares the one arena.
    tm_sidecar::memory::tune_allocator();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tm-sidecar: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("tm-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve(settings) => serve(*settings).await,
        Command::CheckConfig(settings) => check_config(*settings).await,
        Command::Keygen { dir, no_monitord } => {
            let set = keys::generate(&dir, false, !no_monitord)?;
            for path in &set.created {
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::MonitordSend(args) => {
            monitord::send::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SftpServer(args) => {
            transfer::sftp::run_stdio(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck { url } => admin::healthcheck(&url).await,
    }
}

/// Make what `--dev` needs (keys, a datastore directory) if it is missing.
fn prepare_dev() -> Result<()> {
    let cwd = std::env::current_dir()?;
    keys::generate(&cwd.join(tm_sidecar::config::DEV_KEY_DIR), true, false)?;
    let root = cwd.join(tm_sidecar::config::DEV_TRANSFER_ROOT);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    Ok(())
}

async fn check_config(settings: Settings) -> Result<ExitCode> {
    if settings.dev {
        prepare_dev()?;
    }
    let config = Config::load(settings)?;
    config.check_paths()?;
    keys::load_host_keys(&config.host_keys)?;
    ssh::auth::AuthPolicy::load(&config)?;
    monitord::Monitord::check(&config.monitord)?;
    println!(
        "{}",
        toml::to_string_pretty(&config).context("cannot print the configuration")?
    );
    Ok(ExitCode::SUCCESS)
}

async fn serve(settings: Settings) -> Result<ExitCode> {
    if settings.dev {
        prepare_dev()?;
    }
    let config = Config::load(settings)?;
    logging::init(config.log_format);
    config.check_paths()?;
    resources::raise_open_files_limit(config.limits.max_connections);

    let mut registry = prometheus_client::registry::Registry::with_prefix("tm_sidecar");
    registry.register_collector(Box::new(collect::ProcessCollector::new()));
    let host_keys = keys::load_host_keys(&config.host_keys)?;
    let auth = ssh::auth::AuthPolicy::load(&config)?;
    let transfer = transfer::Transfer::new(
        &config.transfer_roots,
        &config.home,
        config.fsync_uploads,
        &mut registry,
    )?;
    let ssh_server =
        ssh::server::SshServer::bind(&config, host_keys, auth.clone(), transfer, &mut registry)
            .await?;
    let monitord = monitord::Monitord::bind(&config.monitord, &mut registry).await?;
    let admin_state = admin::AdminState::new(registry, monitord.host_table());
    let admin_addr = match config.admin_listen {
        Some(addr) => Some(admin::bind(addr, admin_state.clone()).await?),
        None => None,
    };

    let mut signals = StopSignals::install()?;
    let shutdown = CancellationToken::new();
    let ssh_addrs = ssh_server.local_addrs();
    admin_state.set_ready(true);
    info!(
        ssh = %join(&ssh_addrs),
        monitord = %join(&monitord.local_addrs()),
        admin = %join(&admin_addr.into_iter().collect::<Vec<_>>()),
        version = env!("CARGO_PKG_VERSION"),
        chacha20_poly1305 = russh::cipher::chacha20_poly1305_backend(),
        "tm-sidecar ready"
    );
    if config.dev {
        print_dev_help(&config, &ssh_addrs);
    }
    let ssh_task = tokio::spawn(ssh_server.run(shutdown.clone(), config.shutdown_grace));
    let monitord_task = tokio::spawn(monitord.run(shutdown.clone()));
    let watched: Vec<_> = config
        .authorized_keys
        .iter()
        .chain(&config.trusted_user_ca_keys)
        .cloned()
        .collect();
    tokio::spawn(ssh::reload::watch(auth, watched, shutdown.clone()));
    tokio::spawn(tm_sidecar::memory::trim_after_churn(shutdown.clone()));

    signals.next().await;
    info!(
        grace_seconds = config.shutdown_grace.as_secs(),
        "shutting down: draining sessions"
    );
    admin_state.set_ready(false);
    shutdown.cancel();
    let drained = async {
        let _ = monitord_task.await;
        let _ = ssh_task.await;
    };
    tokio::select! {
        _ = drained => info!("all sessions finished"),
        _ = signals.next() => warn!("second signal: exiting at once"),
    }
    Ok(ExitCode::SUCCESS)
}

fn join(addrs: &[std::net::SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// SIGTERM and SIGINT, installed once so that a second signal is seen as a second one.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn print_dev_help(config: &Config, ssh_addrs: &[std::net::SocketAddr]) {
    let Some(addr) = ssh_addrs.first() else {
        return;
    };
    let key_dir = std::env::current_dir()
        .map(|d| d.join(tm_sidecar::config::DEV_KEY_DIR))
        .unwrap_or_default();
    let user = config
        .allow_users
        .last()
        .cloned()
        .unwrap_or_else(|| "oneadmin".into());
    let key = key_dir.join(keys::CLIENT_KEY);
    let known = key_dir.join("known_hosts");
    let ssh = format!(
        "ssh -p {port} -i {key} -o IdentitiesOnly=yes -o UserKnownHostsFile={known} \
         -o StrictHostKeyChecking=accept-new {user}@{host}",
        port = addr.port(),
        key = shell_quote(&key.display().to_string()),
        known = shell_quote(&known.display().to_string()),
        host = addr.ip(),
    );
    println!();
    println!("tm-sidecar is running (dev mode). Connect with:");
    println!();
    println!("  {ssh} 'echo hello from $(hostname)'");
    println!();
    println!(
        "Files under {} are reachable with scp/sftp (-P {}).",
        config.transfer_roots[0].display(),
        addr.port()
    );
    if let Some(admin) = config.admin_listen {
        println!("Metrics: curl http://{admin}/metrics   Stop: Ctrl-C");
    }
    println!();
}

/// Quote a path for a POSIX shell only when it needs it.
fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
