//! The SFTP v3 subsystem and `tm-sidecar sftp-server`.
//!
//! Our own engine rather than russh-sftp (see reference/russh.md §4): byte paths, attributes
//! from the raw `st_mode`, an oversize packet is refused without losing sync, and requests are
//! served concurrently — path requests on the blocking pool, each open handle by its own worker
//! thread (in order per handle) — with at most [`MAX_IN_FLIGHT`] requests in flight; replies are
//! written as they complete, coalesced into few channel writes.
//!
//! Modules: [`codec`] (wire format), [`attrs`] (attributes, long names), [`handlers`] (path
//! requests), [`handles`] (open files and directories), [`extensions`] (`@openssh.com`).

pub mod attrs;
pub mod codec;
pub mod extensions;
pub mod handlers;
pub mod handles;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{debug, warn};

use super::Transfer;
use codec::*;
use handlers::Ctx;
use handles::{HandleOp, Job};

/// Requests being worked on at once; more stay unread in the channel (flow control).
pub const MAX_IN_FLIGHT: usize = 128;

/// A reply on its way to the client; the permit returns to the pool once it is written.
pub struct Out {
    pub bytes: Bytes,
    pub permit: Option<OwnedSemaphorePermit>,
}

/// Serve SFTP until the client closes its side; the caller then sends exit-status 0.
pub async fn serve<R, W>(transfer: Arc<Transfer>, input: R, output: W) -> Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Out>();
    let writer = tokio::spawn(write_loop(output, rx));
    let ctx = Arc::new(Ctx::new(transfer, tx));
    let sem = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let result = read_loop(&ctx, input, &sem).await;

    // Input is closed. First let every request in flight finish (a path request still running
    // may yet open a handle), then end the handle workers: open uploads are discarded, and
    // workers of closed handles are joined too, so nothing of this session changes the
    // filesystem after we return (only the blocks of files that uploads replaced may still be
    // being released, see `Replaced`).
    let _ = sem.acquire_many(MAX_IN_FLIGHT as u32).await;
    let entries = ctx.drain();
    let closed = ctx.take_closed();
    let _ = tokio::task::spawn_blocking(move || {
        for e in entries {
            drop(e.tx);
            let _ = e.thread.join();
        }
        for t in closed {
            let _ = t.join();
        }
    })
    .await;
    drop(ctx);
    let _ = writer.await;
    result
}

async fn write_loop<W: AsyncWrite + Unpin>(output: W, mut rx: mpsc::UnboundedReceiver<Out>) {
    // Small replies (status, attributes, names) coalesce here; DATA replies of 64 KiB or more
    // go straight through (tokio's BufWriter writes them after what it holds), which saves a
    // copy of every byte downloaded.
    let mut w = BufWriter::with_capacity(64 * 1024, output);
    while let Some(out) = rx.recv().await {
        if w.write_all(&out.bytes).await.is_err() {
            break;
        }
        drop(out);
        // Coalesce everything already queued into the same flush.
        let mut failed = false;
        while let Ok(out) = rx.try_recv() {
            if w.write_all(&out.bytes).await.is_err() {
                failed = true;
                break;
            }
        }
        if failed || w.flush().await.is_err() {
            break;
        }
    }
    // Dropping the receiver makes further sends fail; their permits are released with them.
}

/// Read until `buf` holds `n` bytes; false on end of input before that.
async fn fill<R: AsyncRead + Unpin>(input: &mut R, buf: &mut BytesMut, n: usize) -> Result<bool> {
    while buf.len() < n {
        if buf.capacity() - buf.len() < 64 * 1024 {
            buf.reserve((n - buf.len()).max(512 * 1024));
        }
        if input.read_buf(buf).await.context("reading SFTP input")? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn read_loop<R: AsyncRead + Unpin>(
    ctx: &Arc<Ctx>,
    mut input: R,
    sem: &Arc<Semaphore>,
) -> Result<()> {
    let mut buf = BytesMut::with_capacity(1024 * 1024);
    let mut initialized = false;
    loop {
        if !fill(&mut input, &mut buf, 4).await? {
            return Ok(());
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if len == 0 {
            buf.advance(4);
            warn!("sftp: empty packet ignored");
            continue;
        }
        if len > MAX_PACKET {
            // Refuse without losing sync: read the type and id, skip the body, answer.
            let head = len.min(5) as usize;
            if !fill(&mut input, &mut buf, 4 + head).await? {
                return Ok(());
            }
            let id = if head == 5 {
                u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]])
            } else {
                0
            };
            warn!(len, kind = buf[4], "sftp: packet too long, refused");
            buf.advance(4 + head);
            let mut skip = (len as usize) - head;
            while skip > 0 {
                if buf.is_empty() && !fill(&mut input, &mut buf, 1).await? {
                    return Ok(());
                }
                let n = skip.min(buf.len());
                buf.advance(n);
                skip -= n;
            }
            let permit = sem.clone().acquire_owned().await?;
            let _ = ctx.out.send(Out {
                bytes: status(id, SSH_FX_BAD_MESSAGE, "Packet too long"),
                permit: Some(permit),
            });
            continue;
        }
        if !fill(&mut input, &mut buf, 4 + len as usize).await? {
            return Ok(());
        }
        buf.advance(4);
        let packet = buf.split_to(len as usize).freeze();
        let permit = sem.clone().acquire_owned().await?;
        dispatch(ctx, packet, permit, &mut initialized);
    }
}

fn reply(ctx: &Ctx, bytes: Bytes, permit: OwnedSemaphorePermit) {
    let _ = ctx.out.send(Out {
        bytes,
        permit: Some(permit),
    });
}

/// Route one packet: INIT inline, handle requests to the handle's worker, the rest to the
/// blocking pool.
fn dispatch(ctx: &Arc<Ctx>, packet: Bytes, permit: OwnedSemaphorePermit, initialized: &mut bool) {
    let mut d = Decoder::new(&packet);
    let Ok(kind) = d.u8() else { return };
    if kind == SSH_FXP_INIT {
        if !*initialized {
            *initialized = true;
            reply(ctx, extensions::version_reply(), permit);
        } else {
            warn!("sftp: second INIT ignored");
        }
        return;
    }
    let Ok(id) = d.u32() else {
        warn!(kind, "sftp: packet without request id ignored");
        return;
    };
    if !*initialized {
        reply(ctx, status(id, SSH_FX_FAILURE, "INIT expected"), permit);
        return;
    }
    match handle_op(kind, &packet, &mut d) {
        Ok(Some((h, op))) => send_to_handle(ctx, h, id, op, permit),
        Err(BadMessage) => reply(ctx, status(id, SSH_FX_BAD_MESSAGE, "Bad message"), permit),
        Ok(None) => {
            let ctx = ctx.clone();
            tokio::task::spawn_blocking(move || {
                let mut d = Decoder::new(&packet);
                // Skip type and id (already read once).
                let _ = d.u8();
                let _ = d.u32();
                let bytes = handlers::path_op(&ctx, kind, id, &mut d)
                    .unwrap_or_else(|BadMessage| status(id, SSH_FX_BAD_MESSAGE, "Bad message"));
                reply(&ctx, bytes, permit);
            });
        }
    }
}

/// Decode a request that names a handle; None for path requests.
fn handle_op(
    kind: u8,
    packet: &Bytes,
    d: &mut Decoder<'_>,
) -> Result<Option<(Option<u32>, HandleOp)>, BadMessage> {
    let op = match kind {
        SSH_FXP_CLOSE | SSH_FXP_FSTAT | SSH_FXP_READDIR => {
            let h = parse_handle(d.string()?);
            let op = match kind {
                SSH_FXP_CLOSE => HandleOp::Close,
                SSH_FXP_FSTAT => HandleOp::Fstat,
                _ => HandleOp::Readdir,
            };
            (h, op)
        }
        SSH_FXP_READ => {
            let h = parse_handle(d.string()?);
            let off = d.u64()?;
            let len = d.u32()?;
            (h, HandleOp::Read { off, len })
        }
        SSH_FXP_WRITE => {
            let h = parse_handle(d.string()?);
            let off = d.u64()?;
            let range = d.string_range()?;
            (
                h,
                HandleOp::Write {
                    off,
                    data: packet.slice(range),
                },
            )
        }
        SSH_FXP_FSETSTAT => {
            let h = parse_handle(d.string()?);
            (h, HandleOp::Fsetstat(attrs::decode(d)?))
        }
        SSH_FXP_EXTENDED => {
            let name = d.string()?;
            match name {
                b"fsync@openssh.com" => (parse_handle(d.string()?), HandleOp::Fsync),
                b"fstatvfs@openssh.com" => (parse_handle(d.string()?), HandleOp::Fstatvfs),
                // Path-based extensions are decoded again by the path task.
                _ => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(op))
}

fn send_to_handle(ctx: &Ctx, h: Option<u32>, id: u32, op: HandleOp, permit: OwnedSemaphorePermit) {
    let closing = matches!(op, HandleOp::Close);
    let entry_tx = h.and_then(|h| {
        let mut table = ctx.handles.lock().ok()?;
        if closing {
            // Closed handles leave the table at once: reuse after close is "invalid handle".
            // The worker ends by itself after the Close job; serve joins it at the end.
            let entry = table.remove(&h)?;
            ctx.closed(entry.thread);
            Some(entry.tx)
        } else {
            table.get(&h).map(|e| e.tx.clone())
        }
    });
    let Some(tx) = entry_tx else {
        debug!(id, "sftp: request on an unknown handle");
        reply(ctx, status(id, SSH_FX_FAILURE, "Invalid handle"), permit);
        return;
    };
    if let Err(std::sync::mpsc::SendError(job)) = tx.send(Job { id, op, permit }) {
        reply(
            ctx,
            status(id, SSH_FX_FAILURE, "Invalid handle"),
            job.permit,
        );
    }
}

/// Flags of `tm-sidecar sftp-server` (OpenSSH sftp-server's common flags are accepted).
#[derive(clap::Args, Debug, Clone)]
pub struct SftpServerArgs {
    /// Directory the session may touch (repeatable); everything else is refused.
    #[arg(long = "transfer-root", value_name = "DIR", required = true)]
    pub transfer_root: Vec<PathBuf>,
    /// Directory relative paths start from [default: the current directory].
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// fsync uploads before renaming them into place.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub fsync: bool,
    /// Log to stderr (sftp-server -e).
    #[arg(short = 'e')]
    pub log_stderr: bool,
    /// Log level (sftp-server -l: QUIET, FATAL, ERROR, INFO, VERBOSE, DEBUG, DEBUG1-3).
    #[arg(short = 'l', value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Syslog facility (sftp-server -f); accepted and ignored.
    #[arg(short = 'f', value_name = "FACILITY")]
    pub log_facility: Option<String>,
    /// Umask for created files (sftp-server -u, octal).
    #[arg(short = 'u', value_name = "UMASK")]
    pub umask: Option<String>,
}

fn log_filter(level: Option<&str>) -> &'static str {
    match level.map(|l| l.to_ascii_uppercase()) {
        Some(l) if l == "QUIET" => "off",
        Some(l) if l == "FATAL" || l == "ERROR" => "error",
        Some(l) if l.starts_with("DEBUG") => "debug",
        Some(l) if l == "VERBOSE" || l == "INFO" => "info",
        _ => "warn",
    }
}

/// SFTP on stdin/stdout, e.g. `sftp -D 'tm-sidecar sftp-server --transfer-root DIR'`.
pub async fn run_stdio(args: SftpServerArgs) -> Result<()> {
    if args.log_stderr {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(log_filter(
                args.log_level.as_deref(),
            )))
            .with_writer(std::io::stderr)
            .try_init();
    }
    if let Some(u) = &args.umask {
        let mask = u32::from_str_radix(u, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .with_context(|| format!("-u {u}: not an octal umask"))?;
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask));
    }
    let home = match args.home {
        Some(h) => h,
        None => std::env::current_dir().context("cannot read the current directory")?,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let transfer = Transfer::new(&args.transfer_root, &home, args.fsync, &mut registry)?;
    serve(transfer, tokio::io::stdin(), tokio::io::stdout()).await
}
