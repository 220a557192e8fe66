//! `tm-sidecar monitord-send`: send one message exactly as OpenNebula's probe client does
//! (`monitord_client.rb`): `TYPE STATUS HOSTID EPOCH base64(zlib9(rsa?(payload)))`, the payload
//! stripped of surrounding whitespace first, RSA in `n − 11`-byte PKCS#1 v1.5 chunks, one UDP
//! datagram or one TCP connection (connect, write, close; no trailing newline, no reply).

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use tokio::io::AsyncWriteExt;

use super::wire::{self, MsgType, Status, Transport};

/// Flags of `monitord-send`.
#[derive(clap::Args, Debug, Clone)]
pub struct SendArgs {
    /// monitord host name or address.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// monitord port.
    #[arg(long, default_value_t = 4124)]
    pub port: u16,

    /// Send over TCP [default: TCP for STATE_VM, UDP otherwise, as OpenNebula's probes do].
    #[arg(long, conflicts_with = "udp")]
    pub tcp: bool,

    /// Send over UDP.
    #[arg(long)]
    pub udp: bool,

    /// Message type: MONITOR_VM, BEACON_HOST, MONITOR_HOST, SYSTEM_HOST, STATE_VM, EXEC_VM.
    #[arg(long = "type", value_name = "TYPE", default_value = "BEACON_HOST")]
    pub msg_type: MsgType,

    /// SUCCESS or FAILURE (a FAILURE payload is the error text).
    #[arg(long, default_value = "SUCCESS")]
    pub status: Status,

    /// OpenNebula host id (-1 is what front-end scripts use).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub host_id: i32,

    /// Message timestamp, Unix seconds (0 skips monitord's ordering check) [default: now].
    #[arg(long, allow_negative_numbers = true)]
    pub epoch: Option<i64>,

    /// File with the payload (OpenNebula template text); `-` is stdin.
    #[arg(long, value_name = "PATH", default_value = "-")]
    pub payload_file: PathBuf,

    /// PKCS#1 "RSA PUBLIC KEY" PEM (monitord's PUBKEY): encrypt the payload as probes do.
    #[arg(long, value_name = "PATH")]
    pub pubkey: Option<PathBuf>,
}

impl SendArgs {
    pub fn transport(&self) -> Transport {
        if self.tcp {
            Transport::Tcp
        } else if self.udp {
            Transport::Udp
        } else {
            self.msg_type.default_transport()
        }
    }
}

/// Build the wire message for these arguments (payload already read).
pub fn build(args: &SendArgs, payload: &[u8]) -> Result<Vec<u8>> {
    let key = match &args.pubkey {
        Some(p) => Some(wire::load_public_key(p)?),
        None => None,
    };
    let epoch = args.epoch.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    });
    // Ruby's String#strip: surrounding whitespace and NULs.
    let strip = |b: &u8| b.is_ascii_whitespace() || *b == 0 || *b == 0x0b;
    let start = payload
        .iter()
        .position(|b| !strip(b))
        .unwrap_or(payload.len());
    let end = payload
        .iter()
        .rposition(|b| !strip(b))
        .map_or(start, |i| i + 1);
    wire::encode(
        args.msg_type,
        args.status,
        args.host_id,
        epoch,
        &payload[start..end],
        key.as_ref(),
    )
}

pub async fn run(args: SendArgs) -> Result<()> {
    let mut payload = Vec::new();
    if args.payload_file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut payload)
            .context("cannot read the payload from stdin")?;
    } else {
        payload = std::fs::read(&args.payload_file)
            .with_context(|| format!("--payload-file {}", args.payload_file.display()))?;
    }
    let msg = build(&args, &payload)?;
    let transport = args.transport();
    if transport == Transport::Udp && msg.len() >= 65507 {
        bail!(
            "message is {} bytes, too large for one UDP datagram; use --tcp",
            msg.len()
        );
    }
    let target = (args.host.as_str(), args.port);
    let addr = tokio::net::lookup_host(target)
        .await
        .with_context(|| format!("cannot resolve {}", args.host))?
        .next()
        .with_context(|| format!("{} has no address", args.host))?;
    match transport {
        Transport::Udp => {
            let local: std::net::SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                ([0u16; 8], 0).into()
            };
            let sock = tokio::net::UdpSocket::bind(local)
                .await
                .context("cannot open a UDP socket")?;
            sock.send_to(&msg, addr)
                .await
                .with_context(|| format!("cannot send to {addr}"))?;
        }
        Transport::Tcp => {
            let fut = async {
                let mut s = tokio::net::TcpStream::connect(addr).await?;
                s.write_all(&msg).await?;
                s.shutdown().await
            };
            tokio::time::timeout(std::time::Duration::from_secs(30), fut)
                .await
                .with_context(|| format!("{addr}: timed out"))?
                .with_context(|| format!("cannot send to {addr} over TCP"))?;
        }
    }
    println!(
        "sent {} {} host {} ({} bytes) to {addr} over {}",
        args.msg_type.as_str(),
        args.status.as_str(),
        args.host_id,
        msg.len(),
        transport.as_str()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SendArgs,
    }

    #[test]
    fn flags_and_defaults() {
        let a = Cli::parse_from(["x"]).args;
        assert_eq!(
            (a.host.as_str(), a.port, a.host_id),
            ("127.0.0.1", 4124, -1)
        );
        assert_eq!(
            (a.msg_type, a.status, a.transport()),
            (MsgType::BeaconHost, Status::Success, Transport::Udp)
        );
        let a =
            Cli::parse_from(["x", "--type", "STATE_VM", "--host-id", "-1", "--epoch", "0"]).args;
        assert_eq!(
            (a.transport(), a.host_id, a.epoch),
            (Transport::Tcp, -1, Some(0))
        );
        let a = Cli::parse_from(["x", "--type", "state_vm", "--udp", "--status", "FAILURE"]).args;
        assert_eq!((a.transport(), a.status), (Transport::Udp, Status::Failure));
        assert!(Cli::try_parse_from(["x", "--tcp", "--udp"]).is_err());
        assert!(Cli::try_parse_from(["x", "--type", "NOPE"]).is_err());
    }

    #[test]
    fn built_message_decodes_and_is_stripped() {
        let a = Cli::parse_from([
            "x",
            "--type",
            "MONITOR_HOST",
            "--host-id",
            "5",
            "--epoch",
            "77",
        ])
        .args;
        let msg = build(&a, b"\n  FREECPU=1\n\n").unwrap();
        assert!(msg.starts_with(b"MONITOR_HOST SUCCESS 5 77 "));
        assert!(!msg.ends_with(b"\n"));
        let mut d = wire::tests::plain_decoder();
        assert_eq!(d.decode(&msg).unwrap().payload, b"FREECPU=1");
    }
}
