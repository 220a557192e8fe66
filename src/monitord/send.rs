//! `tm-sidecar monitord-send`: send one message exactly as OpenNebula's probe client does. STUB.

use anyhow::{Result, bail};

/// Flags of `monitord-send`.
#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// monitord host name or address.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
}

pub async fn run(_args: SendArgs) -> Result<()> {
    bail!("monitord-send is not implemented yet")
}
