//! The SFTP v3 subsystem and `tm-sidecar sftp-server`. STUB.

use std::sync::Arc;

use anyhow::{Result, bail};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Transfer;

/// Serve SFTP until the client closes its side; the caller then sends exit-status 0.
pub async fn serve<R, W>(_transfer: Arc<Transfer>, _input: R, _output: W) -> Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    bail!("sftp is not implemented yet")
}

/// Flags of `tm-sidecar sftp-server` (OpenSSH sftp-server's common flags are accepted).
#[derive(clap::Args, Debug)]
pub struct SftpServerArgs {}

pub async fn run_stdio(_args: SftpServerArgs) -> Result<()> {
    bail!("sftp-server is not implemented yet")
}
