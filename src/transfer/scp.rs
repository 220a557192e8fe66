//! Legacy scp (`scp -t` / `scp -f`) served in-process, confined to the transfer roots.
//!
//! The exec command is recognised with an exact grammar (see [`parse`]); everything else goes to
//! the shell. The protocol follows OpenSSH's scp.c: `C`/`D`/`E`/`T` records, one-byte acks
//! (`\0` ok, `\1scp: msg\n` error, `\2` fatal); the sink validates records like scp.c does and
//! writes every file through an atomic [`Upload`](super::fs::Upload).

use std::io;
use std::sync::Arc;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tracing::{debug, warn};

use super::cached_read::CachedReader;
use super::fs::{Located, SetAttrs};
use super::{Direction, Protocol, Transfer};
use crate::escape::escape_bytes;

/// Data buffer for file contents.
const BUF: usize = 256 * 1024;
/// Longest control record accepted.
const MAX_LINE: usize = 8192;
/// Deepest directory nesting accepted (sink) or sent (source).
pub const MAX_DEPTH: usize = 128;

/// A word of the exec command after quote removal, with the positions of unquoted glob
/// characters (only those are expanded) and whether it began with an unquoted `~`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    pub bytes: Vec<u8>,
    pub glob: Vec<bool>,
    pub tilde: bool,
}

impl Word {
    fn has_glob(&self) -> bool {
        self.glob.iter().any(|g| *g)
    }
}

/// A parsed `scp [-v] [-q] [-r] [-p] [-d] -t|-f [--] PATH...` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScpCommand {
    /// `-t` (we receive) or `-f` (we send).
    pub sink: bool,
    pub recursive: bool,
    pub preserve: bool,
    pub target_dir: bool,
    pub verbose: bool,
    pub quiet: bool,
    /// One target for `-t`; one or more sources for `-f`.
    pub paths: Vec<Word>,
}

/// Split a command line into words like a POSIX shell, but only the quoting part: returns None
/// for anything that would make the shell do more than split words (expansions, operators,
/// redirections, comments, brace expansion), so such commands go to the real shell.
pub fn split_words(command: &[u8]) -> Option<Vec<Word>> {
    let mut words = Vec::new();
    let mut cur: Option<Word> = None;
    let mut i = 0;
    fn push(cur: &mut Option<Word>, b: u8, glob: bool) {
        let w = cur.get_or_insert_with(|| Word {
            bytes: Vec::new(),
            glob: Vec::new(),
            tilde: false,
        });
        w.bytes.push(b);
        w.glob.push(glob);
    }
    while i < command.len() {
        let b = command[i];
        match b {
            b' ' | b'\t' => {
                if let Some(w) = cur.take() {
                    words.push(w);
                }
            }
            b'\'' => {
                let end = command[i + 1..].iter().position(|c| *c == b'\'')? + i + 1;
                for &c in &command[i + 1..end] {
                    push(&mut cur, c, false);
                }
                if command[i + 1..end].is_empty() {
                    cur.get_or_insert_with(|| Word {
                        bytes: Vec::new(),
                        glob: Vec::new(),
                        tilde: false,
                    });
                }
                i = end;
            }
            b'"' => {
                cur.get_or_insert_with(|| Word {
                    bytes: Vec::new(),
                    glob: Vec::new(),
                    tilde: false,
                });
                i += 1;
                loop {
                    let c = *command.get(i)?;
                    match c {
                        b'"' => break,
                        b'$' | b'`' => return None,
                        b'\\' => {
                            let n = *command.get(i + 1)?;
                            if matches!(n, b'$' | b'`' | b'"' | b'\\') {
                                push(&mut cur, n, false);
                                i += 1;
                            } else if n == b'\n' {
                                return None;
                            } else {
                                push(&mut cur, b'\\', false);
                            }
                        }
                        c => push(&mut cur, c, false),
                    }
                    i += 1;
                }
            }
            b'\\' => {
                let n = *command.get(i + 1)?;
                if n == b'\n' {
                    return None;
                }
                push(&mut cur, n, false);
                i += 1;
            }
            b'\n' | b';' | b'&' | b'|' | b'<' | b'>' | b'(' | b')' | b'$' | b'`' | b'{' | b'}'
            | 0 => {
                return None;
            }
            b'#' if cur.is_none() => return None,
            b'~' if cur.is_none() => {
                push(&mut cur, b, false);
                if let Some(w) = cur.as_mut() {
                    w.tilde = true;
                }
            }
            b'*' | b'?' | b'[' => push(&mut cur, b, true),
            _ => push(&mut cur, b, false),
        }
        i += 1;
    }
    if let Some(w) = cur.take() {
        words.push(w);
    }
    Some(words)
}

/// Recognise an scp server command; anything else (e.g. `scp src host:dst`) returns None and
/// goes to the shell.
pub fn parse(command: &[u8]) -> Option<ScpCommand> {
    let words = split_words(command)?;
    let mut it = words.into_iter();
    let argv0 = it.next()?;
    if argv0.bytes != b"scp" {
        return None;
    }
    let mut cmd = ScpCommand {
        sink: false,
        recursive: false,
        preserve: false,
        target_dir: false,
        verbose: false,
        quiet: false,
        paths: Vec::new(),
    };
    let (mut to, mut from) = (false, false);
    let mut rest: Vec<Word> = Vec::new();
    for w in it.by_ref() {
        if w.bytes == b"--" {
            break;
        }
        if w.bytes.len() < 2 || w.bytes[0] != b'-' || w.glob.iter().any(|g| *g) {
            rest.push(w);
            break;
        }
        for &c in &w.bytes[1..] {
            match c {
                b'v' => cmd.verbose = true,
                b'q' => cmd.quiet = true,
                b'r' => cmd.recursive = true,
                b'p' => cmd.preserve = true,
                b'd' => cmd.target_dir = true,
                b't' => to = true,
                b'f' => from = true,
                _ => return None,
            }
        }
    }
    rest.extend(it);
    if to == from || rest.is_empty() || (to && rest.len() != 1) {
        return None;
    }
    cmd.sink = to;
    cmd.paths = rest;
    Some(cmd)
}

/// A `C` or `D` record from the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    File { mode: u32, size: u64, name: Vec<u8> },
    Dir { mode: u32, name: Vec<u8> },
}

/// Validate a `C`/`D` record (without the newline) as OpenSSH's sink does. Errors are the
/// messages scp.c sends.
pub fn parse_record(line: &[u8]) -> Result<Record, String> {
    let (&kind, rest) = line.split_first().ok_or("expected control record")?;
    if kind != b'C' && kind != b'D' {
        return Err("protocol error: expected control record".into());
    }
    let mut mode = 0u32;
    for i in 0..4 {
        match rest.get(i) {
            Some(c @ b'0'..=b'7') => mode = (mode << 3) | u32::from(c - b'0'),
            _ => return Err("protocol error: bad mode".into()),
        }
    }
    if rest.get(4) != Some(&b' ') {
        return Err("protocol error: mode not delimited".into());
    }
    let rest = &rest[5..];
    let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return Err("protocol error: size not present".into());
    }
    if rest.get(digits) != Some(&b' ') {
        return Err("protocol error: size not delimited".into());
    }
    let size = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s <= i64::MAX as u64)
        .ok_or("protocol error: size out of range")?;
    let name = &rest[digits + 1..];
    if name.is_empty()
        || name.contains(&b'/')
        || name == b"."
        || name == b".."
        || name.iter().any(|c| *c < 0x20 || *c == 0x7f)
    {
        return Err(format!(
            "error: unexpected filename: {}",
            escape_bytes(name, 256)
        ));
    }
    Ok(if kind == b'C' {
        Record::File {
            mode,
            size,
            name: name.to_vec(),
        }
    } else {
        Record::Dir {
            mode,
            name: name.to_vec(),
        }
    })
}

/// Validate a `T<mtime> <usec> <atime> <usec>` record; returns (atime, mtime).
pub fn parse_times(line: &[u8]) -> Result<(i64, i64), String> {
    let s = line
        .strip_prefix(b"T")
        .ok_or("protocol error: expected T record")?;
    let s = std::str::from_utf8(s)
        .map_err(|_| "protocol error: mtime.sec not delimited".to_string())?;
    let parts: Vec<&str> = s.split(' ').collect();
    let num = |p: Option<&&str>, what: &str| -> Result<i64, String> {
        p.and_then(|v| {
            if v.is_empty() || v.starts_with('+') {
                None
            } else {
                v.parse::<i64>().ok()
            }
        })
        .ok_or_else(|| format!("protocol error: {what} not delimited"))
    };
    if parts.len() != 4 {
        return Err("protocol error: atime.usec not delimited".into());
    }
    let mtime = num(parts.first(), "mtime.sec")?;
    let musec = num(parts.get(1), "mtime.usec")?;
    let atime = num(parts.get(2), "atime.sec")?;
    let ausec = num(parts.get(3), "atime.usec")?;
    if !(0..=999_999).contains(&musec) {
        return Err("protocol error: mtime.usec not delimited".into());
    }
    if !(0..=999_999).contains(&ausec) {
        return Err("protocol error: atime.usec not delimited".into());
    }
    Ok((atime, mtime))
}

/// Writes a file on the blocking pool one buffer behind the network: while buffer k is being
/// written, buffer k+1 is read from the channel. The buffers are swapped, not copied (a
/// `tokio::fs::File` would copy each into a buffer of its own). After the first error nothing
/// more is written and the error is kept for the answer to the client.
struct BehindWriter {
    file: Option<Arc<std::fs::File>>,
    spare: Vec<u8>,
    pending: Option<tokio::task::JoinHandle<(Vec<u8>, io::Result<()>)>>,
    error: Option<io::Error>,
}

impl BehindWriter {
    /// `file`: where to write (an error here is kept and answered like a write error);
    /// `spare`: a buffer to swap in (kept from the previous file, so a tree of small files does
    /// not allocate one per file).
    fn new(file: io::Result<std::fs::File>, spare: Vec<u8>) -> BehindWriter {
        let (file, error) = match file {
            Ok(f) => (Some(Arc::new(f)), None),
            Err(e) => (None, Some(e)),
        };
        BehindWriter {
            file,
            spare,
            pending: None,
            error,
        }
    }

    /// Wait for the write in flight and keep its buffer for the next swap.
    async fn settle(&mut self) {
        if let Some(job) = self.pending.take() {
            match job.await {
                Ok((buf, result)) => {
                    self.spare = buf;
                    if let Err(e) = result {
                        self.fail(e);
                    }
                }
                Err(e) => self.fail(io::Error::other(e)),
            }
        }
    }

    fn fail(&mut self, e: io::Error) {
        self.error.get_or_insert(e);
        self.file = None;
    }

    /// Queue `buf[..n]` for writing; `buf` is replaced by the spare buffer (same length) for
    /// the next read.
    async fn write(&mut self, buf: &mut Vec<u8>, n: usize) {
        self.settle().await;
        let Some(file) = self.file.clone() else {
            return;
        };
        let len = buf.len();
        let mut next = std::mem::take(&mut self.spare);
        next.resize(len, 0);
        let full = std::mem::replace(buf, next);
        self.pending = Some(tokio::task::spawn_blocking(move || {
            let result = std::io::Write::write_all(&mut &*file, &full[..n]);
            (full, result)
        }));
    }

    /// Wait for the last write; the first error, if any, and the spare buffer.
    async fn finish(mut self) -> (Option<io::Error>, Vec<u8>) {
        self.settle().await;
        (self.error, self.spare)
    }
}

/// Run the scp protocol on the channel streams; returns the exit status for `exit-status`.
pub async fn serve<R, W, E>(
    cmd: ScpCommand,
    transfer: Arc<Transfer>,
    input: R,
    output: W,
    stderr: E,
) -> u32
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    E: AsyncWrite + Unpin + Send,
{
    // Like OpenSSH's scp in server mode, errors go to the peer in-band, not to stderr.
    drop(stderr);
    let mut s = Scp {
        input: BufReader::with_capacity(BUF, input),
        output: BufWriter::with_capacity(64 * 1024, output),
        transfer,
        errs: 0,
        buf: vec![0u8; BUF],
        spare: Vec::new(),
    };
    let result = if cmd.sink {
        s.sink(&cmd).await
    } else {
        s.source(&cmd).await
    };
    let _ = s.output.flush().await;
    match result {
        Ok(()) if s.errs == 0 => 0,
        Ok(()) => 1,
        Err(e) => {
            debug!(error = %e, "scp ended");
            1
        }
    }
}

/// Ends the session: a fatal protocol problem or a broken stream.
#[derive(Debug)]
struct Fatal(String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<io::Error> for Fatal {
    fn from(e: io::Error) -> Self {
        Fatal(e.to_string())
    }
}

struct Scp<R, W> {
    input: BufReader<R>,
    output: BufWriter<W>,
    transfer: Arc<Transfer>,
    errs: u32,
    buf: Vec<u8>,
    /// The second buffer of the sink's double buffering (see `BehindWriter`).
    spare: Vec<u8>,
}

struct Frame {
    loc: Located,
    mode: u32,
    times: Option<(i64, i64)>,
    created: bool,
}

fn os_msg(e: &io::Error) -> String {
    super::sftp::codec::strip_os_error(e)
}

impl<R: AsyncRead + Unpin + Send, W: AsyncWrite + Unpin + Send> Scp<R, W> {
    async fn ack(&mut self) -> Result<(), Fatal> {
        self.output.write_all(b"\0").await?;
        self.output.flush().await?;
        Ok(())
    }

    /// Send `\1scp: msg\n` (counts as an error for the exit status).
    /// `run_err` for an OS error on a path: "<path>: <error>", as OpenSSH's scp words it.
    async fn path_err(&mut self, path: &[u8], e: &io::Error) -> Result<(), Fatal> {
        let msg = format!("{}: {}", escape_bytes(path, 1024), os_msg(e));
        self.run_err(&msg).await
    }

    async fn run_err(&mut self, msg: &str) -> Result<(), Fatal> {
        self.errs += 1;
        let line: String = msg.chars().filter(|c| *c != '\n').collect();
        self.output
            .write_all(format!("\x01scp: {line}\n").as_bytes())
            .await?;
        self.output.flush().await?;
        Ok(())
    }

    async fn fatal(&mut self, msg: &str) -> Result<(), Fatal> {
        self.run_err(msg).await?;
        Err(Fatal(msg.to_string()))
    }

    /// One control line without its newline; None at end of input.
    async fn read_line(&mut self) -> Result<Option<Vec<u8>>, Fatal> {
        let mut line = Vec::new();
        loop {
            let avail = self.input.fill_buf().await?;
            if avail.is_empty() {
                return if line.is_empty() {
                    Ok(None)
                } else {
                    Err(Fatal("end of input in a record".into()))
                };
            }
            if let Some(p) = avail.iter().position(|c| *c == b'\n') {
                line.extend_from_slice(&avail[..p]);
                self.input.consume(p + 1);
                return Ok(Some(line));
            }
            let n = avail.len();
            line.extend_from_slice(avail);
            self.input.consume(n);
            if line.len() > MAX_LINE {
                return Err(Fatal("record too long".into()));
            }
        }
    }

    /// Read the peer's one-byte answer: Ok(true) on `\0`, Ok(false) on a `\1` error (counted),
    /// Err on `\2` or end of input.
    async fn response(&mut self) -> Result<bool, Fatal> {
        let mut b = [0u8; 1];
        if self.input.read(&mut b).await? == 0 {
            return Err(Fatal("lost connection".into()));
        }
        match b[0] {
            0 => Ok(true),
            1 | 2 => {
                let msg = self.read_line().await?.unwrap_or_default();
                self.errs += 1;
                debug!(msg = %escape_bytes(&msg, 512), "scp peer reported an error");
                if b[0] == 2 {
                    Err(Fatal("peer sent a fatal error".into()))
                } else {
                    Ok(false)
                }
            }
            _ => Err(Fatal("protocol error: bad response".into())),
        }
    }

    fn roots(&self) -> &super::fs::Roots {
        &self.transfer.roots
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transfer) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let t = self.transfer.clone();
        tokio::task::spawn_blocking(move || f(&t))
            .await
            .map_err(io::Error::other)?
    }

    fn expand(&self, w: &Word) -> Vec<u8> {
        if w.tilde {
            self.roots().expand_tilde(&w.bytes)
        } else {
            w.bytes.clone()
        }
    }

    // ---------------------------------------------------------------- sink (-t)

    async fn sink(&mut self, cmd: &ScpCommand) -> Result<(), Fatal> {
        let Some(word) = cmd.paths.first() else {
            return Ok(());
        };
        let target = self.expand(word);
        let located = self.roots().locate(&target);
        let targ = match located {
            Ok(l) => l,
            Err(e) => {
                return self
                    .fatal(&format!("{}: {}", escape_bytes(&target, 1024), os_msg(&e)))
                    .await;
            }
        };
        let t = targ.clone();
        let targ_is_dir = self
            .blocking(move |tr| tr.roots.stat(&t, true))
            .await
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
            .unwrap_or(false);
        if cmd.target_dir && !targ_is_dir {
            return self
                .fatal(&format!("{}: Not a directory", escape_bytes(&target, 1024)))
                .await;
        }
        self.ack().await?;
        let umask = self.roots().umask();
        let mut stack: Vec<Frame> = Vec::new();
        let mut times: Option<(i64, i64)> = None;
        loop {
            // Like scp.c's SCREWUP, a broken record is answered in-band before giving up.
            let line = match self.read_line().await {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(()),
                Err(Fatal(msg)) => return self.fatal(&format!("protocol error: {msg}")).await,
            };
            let Some(&first) = line.first() else {
                return self.fatal("protocol error: expected control record").await;
            };
            match first {
                1 | 2 => {
                    self.errs += 1;
                    if first == 2 {
                        return Ok(());
                    }
                    continue;
                }
                b'E' => {
                    if line.len() != 1 {
                        return self.fatal("protocol error: bad E record").await;
                    }
                    self.ack().await?;
                    let Some(frame) = stack.pop() else {
                        return Ok(());
                    };
                    let mut a = SetAttrs::default();
                    if cmd.preserve {
                        a.times = frame.times;
                    }
                    if cmd.preserve || frame.created {
                        a.perm = Some(frame.mode);
                    }
                    if a != SetAttrs::default() {
                        let loc = frame.loc.clone();
                        if let Err(e) = self
                            .blocking(move |t| t.roots.set_attrs(&loc, true, &a))
                            .await
                        {
                            warn!(path = %escape_bytes(&frame.loc.display, 1024), error = %e, "scp: cannot set directory attributes");
                        }
                    }
                    continue;
                }
                b'T' => {
                    match parse_times(&line) {
                        Ok(t) => times = Some(t),
                        Err(msg) => return self.fatal(&msg).await,
                    }
                    self.ack().await?;
                    continue;
                }
                _ => {}
            }
            let record = match parse_record(&line) {
                Ok(r) => r,
                Err(msg) => {
                    warn!(record = %escape_bytes(&line, 512), "scp: refused record: {msg}");
                    return self.fatal(&msg).await;
                }
            };
            let (name, mode) = match &record {
                Record::File { name, mode, .. } | Record::Dir { name, mode } => {
                    (name.clone(), *mode)
                }
            };
            let mode = if cmd.preserve { mode } else { mode & !umask };
            let np = match stack.last() {
                Some(f) => f.loc.join(&name),
                None if targ_is_dir => targ.join(&name),
                None => targ.clone(),
            };
            match record {
                Record::Dir { .. } => {
                    if !cmd.recursive {
                        return self
                            .fatal("protocol error: received directory without -r")
                            .await;
                    }
                    if stack.len() >= MAX_DEPTH {
                        return self
                            .fatal("protocol error: directory nesting too deep")
                            .await;
                    }
                    let loc = np.clone();
                    let made = self
                        .blocking(move |t| match t.roots.stat(&loc, true) {
                            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => Ok(false),
                            Ok(_) => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                                t.roots.mkdir(&loc, mode | 0o700).map(|_| true)
                            }
                            Err(e) => Err(e),
                        })
                        .await;
                    match made {
                        Ok(created) => {
                            stack.push(Frame {
                                loc: np,
                                mode,
                                times: times.take(),
                                created,
                            });
                            self.ack().await?;
                        }
                        Err(e) => {
                            times = None;
                            self.path_err(&np.display, &e).await?;
                        }
                    }
                }
                Record::File { size, .. } => {
                    let t = times.take();
                    self.sink_file(cmd, np, mode, size, t).await?;
                }
            }
        }
    }

    async fn sink_file(
        &mut self,
        cmd: &ScpCommand,
        np: Located,
        mode: u32,
        size: u64,
        times: Option<(i64, i64)>,
    ) -> Result<(), Fatal> {
        let loc = np.clone();
        let fsync = self.transfer.fsync;
        let opened = self
            .blocking(move |t| t.roots.create_upload(&loc, mode, fsync))
            .await;
        let mut upload = match opened {
            Ok(u) => u,
            Err(e) => {
                // The source skips the data after an error answer.
                return self.path_err(&np.display, &e).await;
            }
        };
        self.ack().await?;
        let spare = std::mem::take(&mut self.spare);
        let mut writer = BehindWriter::new(upload.file().try_clone(), spare);
        let mut remaining = size;
        while remaining > 0 {
            // Whole buffers, not the 32 KiB packets as they come: each write is a hop to a
            // blocking thread, so fewer and larger writes move more bytes per hop.
            let n = remaining.min(self.buf.len() as u64) as usize;
            if let Err(e) = self.input.read_exact(&mut self.buf[..n]).await {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    // Disconnected mid-file: the upload is dropped and its temporary file removed.
                    return self
                        .fatal("protocol error: lost connection during a file")
                        .await;
                }
                return Err(e.into());
            }
            remaining -= n as u64;
            writer.write(&mut self.buf, n).await;
        }
        let (wrerr, spare) = writer.finish().await;
        self.spare = spare;
        self.transfer
            .count_bytes(Protocol::Scp, Direction::Upload, size);
        // The source ends the file with its own status byte.
        let source_ok = self.response().await?;
        if !source_ok {
            drop(upload);
            return Ok(());
        }
        if let Some(e) = wrerr {
            drop(upload);
            return self.path_err(&np.display, &e).await;
        }
        let preserve = cmd.preserve;
        let committed = self
            .blocking(move |_| {
                if preserve {
                    upload.set_mode(mode)?;
                    if let Some(tm) = times {
                        upload.set_attrs(&SetAttrs {
                            times: Some(tm),
                            ..Default::default()
                        })?;
                    }
                }
                upload.commit()
            })
            .await;
        match committed {
            Ok(replaced) => {
                self.transfer.count_file(Protocol::Scp, Direction::Upload);
                let acked = self.ack().await;
                replaced.release_in_background();
                acked
            }
            Err(e) => self.path_err(&np.display, &e).await,
        }
    }

    // ---------------------------------------------------------------- source (-f)

    async fn source(&mut self, cmd: &ScpCommand) -> Result<(), Fatal> {
        if !self.response().await? {
            return Ok(());
        }
        for word in &cmd.paths {
            let path = self.expand(word);
            let paths = if word.has_glob() {
                let w = Word {
                    bytes: path.clone(),
                    glob: word.glob.clone(),
                    tilde: false,
                };
                // A tilde expansion shifted the bytes: glob positions then refer to the tail.
                let w = if word.tilde {
                    shift_glob(&w, &word.bytes)
                } else {
                    w
                };
                let matches = self
                    .blocking(move |t| Ok(glob(&t.roots, &w)))
                    .await
                    .unwrap_or_default();
                if matches.is_empty() {
                    vec![path]
                } else {
                    matches
                }
            } else {
                vec![path]
            };
            for p in paths {
                let loc = match self.roots().locate(&p) {
                    Ok(l) => l,
                    Err(e) => {
                        self.run_err(&format!("{}: {}", escape_bytes(&p, 1024), os_msg(&e)))
                            .await?;
                        continue;
                    }
                };
                self.send_path(cmd, loc, 0).await?;
            }
        }
        Ok(())
    }

    async fn send_path(
        &mut self,
        cmd: &ScpCommand,
        loc: Located,
        depth: usize,
    ) -> Result<(), Fatal> {
        let l = loc.clone();
        let st = match self.blocking(move |t| t.roots.stat(&l, true)).await {
            Ok(st) => st,
            Err(e) => {
                return self.path_err(&loc.display, &e).await;
            }
        };
        let name = loc.file_name().map(|n| n.to_vec()).unwrap_or_else(|| {
            loc.display
                .rsplit(|c| *c == b'/')
                .find(|c| !c.is_empty())
                .unwrap_or(b"/")
                .to_vec()
        });
        if name.contains(&b'\n') {
            return self
                .run_err(&format!(
                    "{}: skipping, filename contains a newline",
                    escape_bytes(&loc.display, 1024)
                ))
                .await;
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFDIR {
            if !cmd.recursive {
                return self
                    .run_err(&format!(
                        "{}: not a regular file",
                        escape_bytes(&loc.display, 1024)
                    ))
                    .await;
            }
            if depth >= MAX_DEPTH {
                return self
                    .run_err(&format!(
                        "{}: directory nesting too deep",
                        escape_bytes(&loc.display, 1024)
                    ))
                    .await;
            }
            return Box::pin(self.send_dir(cmd, loc, &name, &st, depth)).await;
        }
        if kind != libc::S_IFREG {
            return self
                .run_err(&format!(
                    "{}: not a regular file",
                    escape_bytes(&loc.display, 1024)
                ))
                .await;
        }
        let l = loc.clone();
        let file = match self.blocking(move |t| t.roots.open_read(&l)).await {
            Ok(f) => f,
            Err(e) => {
                return self.path_err(&loc.display, &e).await;
            }
        };
        let st = rustix::fs::fstat(&file).unwrap_or(st);
        if cmd.preserve {
            self.output
                .write_all(format!("T{} 0 {} 0\n", st.st_mtime, st.st_atime).as_bytes())
                .await?;
            self.output.flush().await?;
            if !self.response().await? {
                return Ok(());
            }
        }
        let size = st.st_size.max(0) as u64;
        let mut head = format!("C{:04o} {} ", st.st_mode & 0o7777, size).into_bytes();
        head.extend_from_slice(&name);
        head.push(b'\n');
        self.output.write_all(&head).await?;
        self.output.flush().await?;
        if !self.response().await? {
            return Ok(());
        }
        let mut file = CachedReader::new(file);
        let mut remaining = size;
        let mut haderr: Option<io::Error> = None;
        while remaining > 0 {
            let want = remaining.min(self.buf.len() as u64) as usize;
            let n = if haderr.is_none() {
                match file.read(&mut self.buf, want).await {
                    Ok(0) => {
                        haderr = Some(io::Error::from_raw_os_error(libc::EIO));
                        0
                    }
                    Ok(n) => n,
                    Err(e) => {
                        haderr = Some(e);
                        0
                    }
                }
            } else {
                0
            };
            // After a read error (or a file that shrank) keep the stream in sync with zeros.
            let n = if n == 0 {
                self.buf[..want].fill(0);
                want
            } else {
                n
            };
            self.output.write_all(&self.buf[..n]).await?;
            remaining -= n as u64;
        }
        self.transfer
            .count_bytes(Protocol::Scp, Direction::Download, size);
        match haderr {
            None => {
                self.output.write_all(b"\0").await?;
                self.output.flush().await?;
                if self.response().await? {
                    self.transfer.count_file(Protocol::Scp, Direction::Download);
                }
                Ok(())
            }
            Some(e) => {
                self.path_err(&loc.display, &e).await?;
                self.response().await.map(|_| ())
            }
        }
    }

    async fn send_dir(
        &mut self,
        cmd: &ScpCommand,
        loc: Located,
        name: &[u8],
        st: &rustix::fs::Stat,
        depth: usize,
    ) -> Result<(), Fatal> {
        let l = loc.clone();
        let entries = match self.blocking(move |t| list_dir(&t.roots, &l)).await {
            Ok(e) => e,
            Err(e) => {
                return self.path_err(&loc.display, &e).await;
            }
        };
        if cmd.preserve {
            self.output
                .write_all(format!("T{} 0 {} 0\n", st.st_mtime, st.st_atime).as_bytes())
                .await?;
            self.output.flush().await?;
            if !self.response().await? {
                return Ok(());
            }
        }
        let mut head = format!("D{:04o} 0 ", st.st_mode & 0o7777).into_bytes();
        head.extend_from_slice(name);
        head.push(b'\n');
        self.output.write_all(&head).await?;
        self.output.flush().await?;
        if !self.response().await? {
            return Ok(());
        }
        for entry in entries {
            self.send_path(cmd, loc.join(&entry), depth + 1).await?;
        }
        self.output.write_all(b"E\n").await?;
        self.output.flush().await?;
        self.response().await.map(|_| ())
    }
}

/// Names in a directory (without `.` and `..`), sorted.
fn list_dir(roots: &super::fs::Roots, loc: &Located) -> io::Result<Vec<Vec<u8>>> {
    let fd = roots.opendir(loc)?;
    let mut dir = rustix::fs::Dir::new(fd).map_err(super::fs::errno)?;
    let mut names = Vec::new();
    while let Some(e) = dir.read() {
        let e = e.map_err(super::fs::errno)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort();
    Ok(names)
}

/// Re-align the glob mask after `~` expansion replaced the first byte.
fn shift_glob(expanded: &Word, original: &[u8]) -> Word {
    let tail = original.len().saturating_sub(1);
    let mut glob = vec![false; expanded.bytes.len().saturating_sub(tail)];
    glob.extend_from_slice(expanded.glob.get(1..).unwrap_or(&[]));
    glob.resize(expanded.bytes.len(), false);
    Word {
        bytes: expanded.bytes.clone(),
        glob,
        tilde: false,
    }
}

/// Expand unquoted `*`, `?` and `[...]` component by component, listing directories only inside
/// the roots. Like the shell, a leading `.` must be matched explicitly; results are sorted.
pub fn glob(roots: &super::fs::Roots, w: &Word) -> Vec<Vec<u8>> {
    let abs = roots.absolute(&w.bytes);
    let offset = abs.len() - w.bytes.len();
    let mut mask = vec![false; offset];
    mask.extend_from_slice(&w.glob);
    let mut prefixes: Vec<Vec<u8>> = vec![Vec::new()];
    let mut start = 0;
    while start < abs.len() {
        let end = abs[start..]
            .iter()
            .position(|c| *c == b'/')
            .map_or(abs.len(), |p| start + p);
        let comp = &abs[start..end];
        let cmask = &mask[start..end];
        if comp.is_empty() {
            start = end + 1;
            continue;
        }
        if !cmask.iter().any(|g| *g) {
            for p in &mut prefixes {
                p.push(b'/');
                p.extend_from_slice(comp);
            }
        } else {
            let mut next = Vec::new();
            for p in &prefixes {
                let dir = if p.is_empty() {
                    b"/".to_vec()
                } else {
                    p.clone()
                };
                let Ok(loc) = roots.locate(&dir) else {
                    continue;
                };
                let Ok(names) = list_dir(roots, &loc) else {
                    continue;
                };
                for n in names {
                    if n.first() == Some(&b'.') && comp.first() != Some(&b'.') {
                        continue;
                    }
                    if fnmatch(comp, cmask, &n) {
                        let mut q = p.clone();
                        q.push(b'/');
                        q.extend_from_slice(&n);
                        next.push(q);
                    }
                }
            }
            prefixes = next;
            if prefixes.is_empty() {
                return Vec::new();
            }
        }
        start = end + 1;
    }
    prefixes.sort();
    prefixes
}

/// Shell pattern match; `mask[i]` says whether `pat[i]` is an unquoted (active) glob character.
pub fn fnmatch(pat: &[u8], mask: &[bool], name: &[u8]) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() && mask[p] && pat[p] == b'*' {
            star = Some((p, n));
            p += 1;
            continue;
        }
        if p < pat.len() {
            let step = if mask[p] && pat[p] == b'?' {
                Some(1)
            } else if mask[p] && pat[p] == b'[' {
                class(&pat[p..], name[n])
                    .map(|(ok, len)| if ok { len } else { 0 })
                    .filter(|l| *l > 0)
            } else if pat[p] == name[n] {
                Some(1)
            } else {
                None
            };
            if let Some(len) = step {
                p += len;
                n += 1;
                continue;
            }
        }
        match star {
            Some((sp, sn)) => {
                p = sp + 1;
                n = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    while p < pat.len() && mask[p] && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

/// Match a `[...]` class at the start of `pat`: (matched, pattern length), None if unterminated.
fn class(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pat.get(1), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let b = *pat.get(i)?;
        if b == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if pat.get(i + 1) == Some(&b'-') && pat.get(i + 2).is_some_and(|e| *e != b']') {
            let hi = pat[i + 2];
            if b <= c && c <= hi {
                matched = true;
            }
            i += 3;
        } else {
            if b == c {
                matched = true;
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(cmd: &ScpCommand) -> Vec<&[u8]> {
        cmd.paths.iter().map(|w| w.bytes.as_slice()).collect()
    }

    #[test]
    fn parses_what_openssh_sends() {
        let c = parse(b"scp -v -r -p -d -t -- /var/lib/one/datastores/1").unwrap();
        assert!(c.sink && c.recursive && c.preserve && c.target_dir && c.verbose);
        assert_eq!(paths(&c), vec![&b"/var/lib/one/datastores/1"[..]]);
        let c = parse(b"scp -f /x/y").unwrap();
        assert!(!c.sink && !c.recursive);
        let c = parse(b"scp -f -- -leading").unwrap();
        assert_eq!(paths(&c), vec![&b"-leading"[..]]);
        let c = parse(b"scp -pt 'a b'").unwrap();
        assert!(c.sink && c.preserve);
        assert_eq!(paths(&c), vec![&b"a b"[..]]);
        let c = parse(b"scp -qf \"it's\" b\\ c").unwrap();
        assert_eq!(paths(&c), vec![&b"it's"[..], &b"b c"[..]]);
        let c = parse(b"scp -t ~/x").unwrap();
        assert!(c.paths[0].tilde);
        let c = parse(b"scp -f '~/x'").unwrap();
        assert!(!c.paths[0].tilde);
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            &b"scp -r /a host:/b"[..],
            b"scp -t",
            b"scp -t a b",
            b"scp -t -f x",
            b"scp x",
            b"scp -S prog -t x",
            b"scp -o ProxyCommand=x -t y",
            b"scp -vS x -t y",
            b"scp -F cfg -t y",
            b"scp -t x; rm -rf /",
            b"scp -t $(id)",
            b"scp -t \"$(id)\"",
            b"scp -t `id`",
            b"scp -t x > y",
            b"scp -t x | y",
            b"scp -t x\nid",
            b"scp -t 'unterminated",
            b"/usr/bin/scp -t x",
            b"scpx -t x",
            b"ssh -t x",
            b"scp -t {a,b}",
            b"# scp -t x",
            b"",
        ] {
            assert_eq!(parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        // quoted metacharacters are just bytes
        let c = parse(b"scp -t '$(id) `x`; y'").unwrap();
        assert_eq!(paths(&c), vec![&b"$(id) `x`; y"[..]]);
    }

    #[test]
    fn glob_masks_follow_quoting() {
        let c = parse(b"scp -f /a/*.img '/b/*.raw'").unwrap();
        assert!(c.paths[0].has_glob());
        assert!(!c.paths[1].has_glob());
        let m = |p: &[u8], n: &[u8]| fnmatch(p, &vec![true; p.len()], n);
        assert!(m(b"*.img", b"disk.img"));
        assert!(!m(b"*.img", b"disk.raw"));
        assert!(m(b"d?sk[0-9]", b"disk7"));
        assert!(!m(b"d?sk[!0-9]", b"disk7"));
        assert!(m(b"*", b""));
        assert!(!fnmatch(b"a*", &[false, false], b"abc"));
        assert!(fnmatch(b"a*", &[false, false], b"a*"));
    }

    #[test]
    fn sink_record_validation() {
        assert_eq!(
            parse_record(b"C0644 10 file"),
            Ok(Record::File {
                mode: 0o644,
                size: 10,
                name: b"file".to_vec()
            })
        );
        assert_eq!(
            parse_record(b"D0755 0 dir"),
            Ok(Record::Dir {
                mode: 0o755,
                name: b"dir".to_vec()
            })
        );
        assert_eq!(
            parse_record(b"C0644 10 name with spaces"),
            Ok(Record::File {
                mode: 0o644,
                size: 10,
                name: b"name with spaces".to_vec()
            })
        );
        let err = |l: &[u8]| parse_record(l).unwrap_err();
        assert!(err(b"C06440 10 x").contains("mode not delimited"));
        assert!(err(b"C064 10 x").contains("bad mode"));
        assert!(err(b"C0648 10 x").contains("bad mode"));
        assert!(err(b"C0644 -5 x").contains("size not present"));
        assert!(err(b"C0644 10x x").contains("size not delimited"));
        assert!(err(b"C0644 99999999999999999999 x").contains("size out of range"));
        assert!(err(b"C0644 9223372036854775808 x").contains("size out of range"));
        assert!(parse_record(b"C0644 9223372036854775807 x").is_ok());
        for name in [
            &b""[..],
            b".",
            b"..",
            b"a/b",
            b"/abs",
            b"../x",
            b"a\x1bb",
            b"a\rb",
        ] {
            let mut l = b"C0644 10 ".to_vec();
            l.extend_from_slice(name);
            assert!(err(&l).contains("unexpected filename"), "{name:?}");
            let mut l = b"D0755 0 ".to_vec();
            l.extend_from_slice(name);
            assert!(err(&l).contains("unexpected filename"), "{name:?}");
        }
        assert!(err(b"X0644 1 x").contains("expected control record"));
    }

    #[test]
    fn times_validation() {
        assert_eq!(
            parse_times(b"T1700000000 0 1600000000 0"),
            Ok((1600000000, 1700000000))
        );
        assert!(parse_times(b"T1 1000000 2 0").is_err());
        assert!(parse_times(b"T1 0 2 -1").is_err());
        assert!(parse_times(b"T1 0 2").is_err());
        assert!(parse_times(b"T1 0 2 0 ").is_err());
        assert!(parse_times(b"Tx 0 2 0").is_err());
    }
}
