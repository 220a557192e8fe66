//! Running what a session channel asked for: a command or shell as a child process (pipes or a
//! pty), or an in-process scp/SFTP server, with stdin/stdout/stderr pumped over the channel and
//! `exit-status` / `exit-signal`, EOF, CLOSE sent in that order at the end.
//!
//! Inbound data (client → us) is drained from russh's per-channel queue at once into a bounded
//! per-channel queue ([`INPUT_QUEUE_PACKETS`] packets of at most 64 KiB, i.e. ≤ 32 MiB per
//! channel). russh acknowledges the SSH window as data arrives, not as it is consumed, and its
//! session loop blocks when any channel's queue is full; draining here keeps one slow consumer
//! (a child that does not read its stdin) from freezing the other channels of the connection
//! until that bound is reached. All queues together hold at most `--max-input-buffer-mib`
//! (a process-wide byte budget), so many channels cannot grow memory without bound.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use russh::server::Msg;
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::escape::escape_bytes;
use crate::ssh::agent::AgentSocket;
use crate::ssh::metrics::SshMetrics;
use crate::ssh::pty::Pty;
use crate::ssh::server::Shared;
use crate::ssh::session::ChannelSlot;
use crate::transfer::{scp, sftp};

/// Packets buffered per channel between russh and the consumer (see the module docs).
pub const INPUT_QUEUE_PACKETS: usize = 512;
/// Read size for child output.
const OUTPUT_CHUNK: usize = 256 * 1024;

/// What to run on a channel.
pub enum Work {
    /// `<shell> -c <command>`, or a login shell reading stdin when `command` is None.
    Process {
        command: Option<Vec<u8>>,
        env: Vec<(OsString, OsString)>,
        pty: Option<Pty>,
    },
    /// Native legacy scp.
    Scp(scp::ScpCommand),
    /// The SFTP subsystem.
    Sftp,
}

impl Work {
    fn kind(&self) -> &'static str {
        match self {
            Work::Process {
                command: Some(_), ..
            } => "exec",
            Work::Process { command: None, .. } => "shell",
            Work::Scp(_) => "scp",
            Work::Sftp => "sftp",
        }
    }
}

/// Everything a running channel owns.
pub struct ChannelJob {
    pub channel: Channel<Msg>,
    pub handle: russh::server::Handle,
    pub shared: Arc<Shared>,
    pub work: Work,
    /// The command as the client sent it, for the audit line.
    pub audit_command: Vec<u8>,
    pub user: String,
    pub peer: std::net::SocketAddr,
    pub agent: Option<AgentSocket>,
    pub slot: ChannelSlot,
    /// Cancelled when the connection goes away or the server stops for good.
    pub kill_all: CancellationToken,
}

/// Byte counters of one channel, for the audit line and metrics.
#[derive(Default)]
struct Counters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// How the channel's work ended.
enum Outcome {
    Exited(ExitStatus),
    Status(u32),
    /// The client closed the channel or the connection went away: nothing more to send.
    Abandoned,
}

/// Run the job to completion. Never panics; every exit path closes the channel.
pub async fn run(job: ChannelJob) {
    let ChannelJob {
        channel,
        handle,
        shared,
        work,
        audit_command,
        user,
        peer,
        agent,
        slot,
        kill_all,
    } = job;
    let id = channel.id();
    let kind = work.kind();
    // Declared first, dropped last: the heap is trimmed after this channel's buffers are gone.
    let _activity = crate::memory::ChannelActivity::start();
    let _active = shared.metrics.channel(kind);
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    let (rx, tx) = channel.split();
    let closed = CancellationToken::new();
    let signals = Arc::new(SignalTarget::default());
    let input = spawn_input(
        rx,
        counters.clone(),
        shared.metrics.clone(),
        shared.input_budget.clone(),
        closed.clone(),
        signals.clone(),
    );

    let outcome = match work {
        Work::Process { command, env, pty } => {
            let spawn = SpawnSpec {
                shell: shared.config.shell.clone(),
                command,
                env,
                cwd: shared.config.home.clone(),
            };
            run_process(
                spawn,
                pty,
                input,
                &tx,
                &counters,
                &shared.metrics,
                &closed,
                &kill_all,
                &signals,
            )
            .await
        }
        Work::Scp(cmd) => {
            let reader = input.into_reader();
            let out =
                CountingWriter::new(tx.make_writer(), counters.clone(), shared.metrics.clone());
            let err = tx.make_writer_ext(Some(1));
            tokio::select! {
                code = scp::serve(cmd, shared.transfer.clone(), reader, out, err) => Outcome::Status(code),
                _ = closed.cancelled() => Outcome::Abandoned,
                _ = kill_all.cancelled() => Outcome::Abandoned,
            }
        }
        Work::Sftp => {
            let reader = input.into_reader();
            let out =
                CountingWriter::new(tx.make_writer(), counters.clone(), shared.metrics.clone());
            tokio::select! {
                r = sftp::serve(shared.transfer.clone(), reader, out) => match r {
                    Ok(()) => Outcome::Status(0),
                    Err(e) => {
                        warn!(%peer, error = %e, "sftp session failed");
                        Outcome::Status(1)
                    }
                },
                _ = closed.cancelled() => Outcome::Abandoned,
                _ = kill_all.cancelled() => Outcome::Abandoned,
            }
        }
    };

    let (status_field, class) = report(&outcome, id, &handle, &tx).await;
    shared.metrics.exec_exit(class);
    drop(agent);
    drop(slot);
    info!(
        event = "channel_closed",
        %peer,
        user = %user,
        channel = u32::from(id),
        kind,
        command = %escape_bytes(&audit_command, 4096),
        exit = %status_field,
        bytes_in = counters.bytes_in.load(Ordering::Relaxed),
        bytes_out = counters.bytes_out.load(Ordering::Relaxed),
        duration_seconds = started.elapsed().as_secs_f64(),
    );
}

/// Send exit-status / exit-signal, EOF and CLOSE; returns the audit text and the metric class.
async fn report(
    outcome: &Outcome,
    id: ChannelId,
    handle: &russh::server::Handle,
    tx: &ChannelWriteHalf<Msg>,
) -> (String, &'static str) {
    let (text, class) = match outcome {
        Outcome::Abandoned => return ("abandoned".into(), "killed"),
        Outcome::Status(code) => {
            let _ = tx.exit_status(*code).await;
            (
                code.to_string(),
                if *code == 0 { "success" } else { "failure" },
            )
        }
        Outcome::Exited(status) => {
            if let Some(code) = status.code() {
                let _ = tx.exit_status(code as u32).await;
                (
                    code.to_string(),
                    if code == 0 { "success" } else { "failure" },
                )
            } else {
                let signal = status.signal().unwrap_or(libc::SIGKILL);
                let _ = handle
                    .exit_signal_request(
                        id,
                        sig_from_number(signal),
                        status.core_dumped(),
                        String::new(),
                        String::new(),
                    )
                    .await;
                (
                    format!("signal {}", sig_from_number(signal).name_str()),
                    "signal",
                )
            }
        }
    };
    let _ = tx.eof().await;
    let _ = tx.close().await;
    (text, class)
}

trait SigName {
    fn name_str(&self) -> String;
}

impl SigName for Sig {
    fn name_str(&self) -> String {
        match self {
            Sig::Custom(s) => s.clone(),
            other => format!("{other:?}"),
        }
    }
}

fn sig_from_number(n: i32) -> Sig {
    match n {
        libc::SIGABRT => Sig::ABRT,
        libc::SIGALRM => Sig::ALRM,
        libc::SIGFPE => Sig::FPE,
        libc::SIGHUP => Sig::HUP,
        libc::SIGILL => Sig::ILL,
        libc::SIGINT => Sig::INT,
        libc::SIGKILL => Sig::KILL,
        libc::SIGPIPE => Sig::PIPE,
        libc::SIGQUIT => Sig::QUIT,
        libc::SIGSEGV => Sig::SEGV,
        libc::SIGTERM => Sig::TERM,
        libc::SIGUSR1 => Sig::USR1,
        libc::SIGUSR2 => Sig::Custom("USR2".into()),
        libc::SIGBUS => Sig::Custom("BUS".into()),
        libc::SIGTRAP => Sig::Custom("TRAP".into()),
        other => Sig::Custom(format!("SIG{other}")),
    }
}

fn sig_to_number(sig: &Sig) -> Option<i32> {
    Some(match sig {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => libc::SIGUSR2,
            "CONT" => libc::SIGCONT,
            "STOP" => libc::SIGSTOP,
            "TSTP" => libc::SIGTSTP,
            "WINCH" => libc::SIGWINCH,
            _ => return None,
        },
    })
}

/// The process group that client `signal` requests go to, once the child exists.
#[derive(Default)]
struct SignalTarget {
    pgid: std::sync::Mutex<Option<i32>>,
}

impl SignalTarget {
    fn set(&self, pgid: i32) {
        if let Ok(mut g) = self.pgid.lock() {
            *g = Some(pgid);
        }
    }

    fn send(&self, signal: i32) {
        let pgid = self.pgid.lock().ok().and_then(|g| *g);
        if let Some(pgid) = pgid {
            kill_group(pgid, signal);
        }
    }
}

fn kill_group(pgid: i32, signal: i32) {
    if let (Some(pid), Some(sig)) = (
        rustix::process::Pid::from_raw(pgid),
        rustix::process::Signal::from_named_raw(signal),
    ) {
        let _ = rustix::process::kill_process_group(pid, sig);
    }
}

/// The client → server side of a channel, drained by its own task.
struct Input {
    data: mpsc::Receiver<Queued>,
}

/// A packet waiting for its consumer, holding its share of the process-wide input budget.
struct Queued {
    data: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

impl Input {
    /// An `AsyncRead` over the channel's data (EOF when the client sends EOF or closes).
    fn into_reader(self) -> impl AsyncRead + Send + Unpin + 'static {
        let stream = futures::stream::unfold(self.data, |mut rx| async move {
            rx.recv()
                .await
                .map(|q| (Ok::<Bytes, std::io::Error>(q.data), rx))
        });
        tokio_util::io::StreamReader::new(Box::pin(stream))
    }
}

fn spawn_input(
    mut rx: ChannelReadHalf,
    counters: Arc<Counters>,
    metrics: SshMetrics,
    budget: Arc<Semaphore>,
    closed: CancellationToken,
    signals: Arc<SignalTarget>,
) -> Input {
    let (data_tx, data_rx) = mpsc::channel::<Queued>(INPUT_QUEUE_PACKETS);
    tokio::spawn(async move {
        let mut data_tx = Some(data_tx);
        loop {
            match rx.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    counters
                        .bytes_in
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    metrics.bytes_in(data.len());
                    if let Some(tx) = &data_tx {
                        // Wait for room in the process-wide budget (this back-pressures the
                        // connection, as a full queue does). Closed only at shutdown.
                        let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                        let permit = budget.clone().acquire_many_owned(n).await.ok();
                        let queued = Queued {
                            data,
                            _budget: permit,
                        };
                        // An error means the consumer is gone (child closed stdin): discard.
                        if tx.send(queued).await.is_err() {
                            data_tx = None;
                        }
                    }
                }
                Some(ChannelMsg::Eof) => data_tx = None,
                Some(ChannelMsg::Signal { signal }) => {
                    if let Some(n) = sig_to_number(&signal) {
                        signals.send(n);
                    }
                }
                Some(ChannelMsg::Close) | None => {
                    closed.cancel();
                    return;
                }
                Some(_) => {}
            }
        }
    });
    Input { data: data_rx }
}

/// How to start the child.
struct SpawnSpec {
    shell: PathBuf,
    command: Option<Vec<u8>>,
    env: Vec<(OsString, OsString)>,
    cwd: PathBuf,
}

fn build_command(spec: &SpawnSpec) -> tokio::process::Command {
    use std::os::unix::ffi::OsStringExt;
    let mut cmd = tokio::process::Command::new(&spec.shell);
    // As sshd does: argv[0] is the shell's base name ("bash"), or "-bash" for a login shell, so
    // messages such as "bash: line 1: x: command not found" read the same as under OpenSSH.
    let name = spec
        .shell
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let name = name.unwrap_or_else(|| "sh".into());
    match &spec.command {
        Some(command) => {
            cmd.arg0(&name)
                .arg("-c")
                .arg(OsString::from_vec(command.clone()));
        }
        None => {
            cmd.arg0(format!("-{name}"));
        }
    }
    cmd.env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .kill_on_drop(true);
    cmd
}

#[allow(clippy::too_many_arguments)]
async fn run_process(
    spec: SpawnSpec,
    pty: Option<Pty>,
    input: Input,
    tx: &ChannelWriteHalf<Msg>,
    counters: &Arc<Counters>,
    metrics: &SshMetrics,
    closed: &CancellationToken,
    kill_all: &CancellationToken,
    signals: &SignalTarget,
) -> Outcome {
    let mut cmd = build_command(&spec);
    let mut pty_master = None;
    match pty {
        None => {
            cmd.process_group(0)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
        Some(pty) => {
            let (Ok(a), Ok(b)) = (pty.slave.try_clone(), pty.slave.try_clone()) else {
                return spawn_failed(tx, "cannot set up the terminal").await;
            };
            cmd.stdin(Stdio::from(pty.slave))
                .stdout(Stdio::from(a))
                .stderr(Stdio::from(b));
            // SAFETY: runs in the forked child before exec; setsid and ioctl(TIOCSCTTY) are
            // async-signal-safe system calls and touch no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    rustix::process::setsid()?;
                    rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
                    Ok(())
                });
            }
            pty_master = Some(pty.master);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("{}: {e}", spec.shell.display());
            return spawn_failed(tx, &msg).await;
        }
    };
    drop(cmd); // closes our copies of the pty slave
    let Some(pid) = child.id().map(|p| p as i32) else {
        return spawn_failed(tx, "child vanished").await;
    };
    signals.set(pid);

    // The child's stdin lives out here, not in `pumps`: `select!` drops the losing futures
    // before it runs a branch, and closing stdin there would hand the command an EOF (and let
    // `cat > part && mv part dest` commit a cut stream) just before the kill below.
    let mut stdin = child.stdin.take();
    let pumps = async {
        match pty_master {
            None => {
                let stdout = child.stdout.take();
                let stderr = child.stderr.take();
                let feed = feed_stdin(input, &mut stdin, closed);
                let out = pump_out(stdout, tx, None, counters, metrics);
                let err = pump_out(stderr, tx, Some(1), counters, metrics);
                // stdin feeding may still wait for data when the child is done: don't wait for it.
                tokio::pin!(feed);
                let outputs = async { tokio::join!(out, err) };
                tokio::select! {
                    _ = outputs => {}
                    _ = async { (&mut feed).await; std::future::pending::<()>().await } => {}
                }
            }
            Some(master) => {
                let (Ok(r), Ok(w)) = (master.try_clone(), master.try_clone()) else {
                    return;
                };
                let reader = tokio::fs::File::from_std(std::fs::File::from(r));
                let mut writer = Some(tokio::fs::File::from_std(std::fs::File::from(w)));
                let feed = feed_stdin(input, &mut writer, closed);
                tokio::pin!(feed);
                tokio::select! {
                    _ = pump_out(Some(reader), tx, None, counters, metrics) => {}
                    _ = async { (&mut feed).await; std::future::pending::<()>().await } => {}
                }
                drop(master);
            }
        }
    };
    tokio::select! {
        // the outputs are closed: stop feeding (the child may be gone, or not read any more)
        _ = pumps => drop(stdin.take()),
        _ = closed.cancelled() => {
            kill_group(pid, libc::SIGKILL);
            drop(stdin.take());
            let _ = child.wait().await;
            return Outcome::Abandoned;
        }
        _ = kill_all.cancelled() => {
            kill_group(pid, libc::SIGKILL);
            drop(stdin.take());
        }
    }
    let status = tokio::select! {
        s = child.wait() => s,
        _ = closed.cancelled() => {
            kill_group(pid, libc::SIGKILL);
            let _ = child.wait().await;
            return Outcome::Abandoned;
        }
    };
    match status {
        Ok(status) => Outcome::Exited(status),
        Err(e) => {
            warn!(error = %e, "cannot collect child status");
            Outcome::Status(255)
        }
    }
}

async fn spawn_failed(tx: &ChannelWriteHalf<Msg>, msg: &str) -> Outcome {
    let _ = tx
        .extended_data_bytes(1, Bytes::from(format!("tm-sidecar: {msg}\r\n")))
        .await;
    Outcome::Status(127)
}

/// Copy channel data into the child's stdin; EOF from the client closes it (takes it out of
/// `slot`). A channel closed or a connection lost without EOF leaves stdin open: the process
/// group is killed instead, so that `cat > part && mv part dest` never sees a cut stream as a
/// complete one.
async fn feed_stdin<W: tokio::io::AsyncWrite + Unpin>(
    mut input: Input,
    slot: &mut Option<W>,
    closed: &CancellationToken,
) {
    let Some(stdin) = slot.as_mut() else { return };
    while let Some(chunk) = input.data.recv().await {
        let Queued { data, _budget } = chunk;
        drop(_budget);
        if stdin.write_all(&data).await.is_err() {
            return; // child closed its stdin; the input task discards the rest
        }
    }
    if closed.is_cancelled() {
        // the input task cancels `closed` before it drops the sender: not an EOF
        std::future::pending::<()>().await;
    }
    let _ = stdin.shutdown().await;
    *slot = None;
}

/// Copy a child's output to the channel (stdout as data, stderr as extended data 1).
/// `data_bytes` waits for the client's window, which back-pressures the child's pipe.
async fn pump_out<R: AsyncRead + Unpin>(
    reader: Option<R>,
    tx: &ChannelWriteHalf<Msg>,
    ext: Option<u32>,
    counters: &Counters,
    metrics: &SshMetrics,
) {
    let Some(mut reader) = reader else { return };
    let mut buf = BytesMut::with_capacity(OUTPUT_CHUNK);
    loop {
        if buf.capacity() < OUTPUT_CHUNK / 4 {
            buf.reserve(OUTPUT_CHUNK);
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return, // EOF, or EIO from a pty whose child is gone
            Ok(n) => {
                counters.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                metrics.bytes_out(n);
            }
        }
        let chunk = buf.split().freeze();
        let sent = match ext {
            None => tx.data_bytes(chunk).await,
            Some(code) => tx.extended_data_bytes(code, chunk).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Counts bytes written through an inner writer (scp/SFTP output).
struct CountingWriter<W> {
    inner: W,
    counters: Arc<Counters>,
    metrics: SshMetrics,
}

impl<W> CountingWriter<W> {
    fn new(inner: W, counters: Arc<Counters>, metrics: SshMetrics) -> Self {
        CountingWriter {
            inner,
            counters,
            metrics,
        }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CountingWriter<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.counters
                .bytes_out
                .fetch_add(*n as u64, Ordering::Relaxed);
            self.metrics.bytes_out(*n);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
