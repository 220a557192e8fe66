//! Legacy scp (`scp -t` / `scp -f`) served in-process. STUB.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::Transfer;

/// A parsed `scp [-v] [-q] [-r] [-p] [-d] -t|-f [--] PATH` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScpCommand {}

/// Recognise an scp server command; anything else (e.g. `scp src host:dst`) returns None and
/// goes to the shell.
pub fn parse(_command: &[u8]) -> Option<ScpCommand> {
    None
}

/// Run the scp protocol on the channel streams; returns the exit status for `exit-status`.
pub async fn serve<R, W, E>(
    _cmd: ScpCommand,
    _transfer: Arc<Transfer>,
    _input: R,
    _output: W,
    _stderr: E,
) -> u32
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    E: AsyncWrite + Unpin + Send,
{
    1
}
