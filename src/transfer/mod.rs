//! Native file transfer (issue 3): a filesystem layer confined to the transfer roots with atomic
//! uploads ([`fs`]), legacy scp ([`scp`]) and the SFTP subsystem ([`sftp`]).

pub mod cached_read;
pub mod fs;
pub mod scp;
pub mod sftp;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use fs::Roots;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Protocol {
    Scp,
    Sftp,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Upload,
    Download,
}

// Label values in lower case, as Prometheus conventions have them.
impl EncodeLabelValue for Protocol {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(match self {
            Protocol::Scp => "scp",
            Protocol::Sftp => "sftp",
        })
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransferLabels {
    pub protocol: Protocol,
    pub direction: Direction,
}

/// Everything a transfer needs: the confined roots, the upload policy and the metrics.
#[derive(Debug)]
pub struct Transfer {
    pub roots: Roots,
    pub fsync: bool,
    bytes: Family<TransferLabels, Counter>,
    files: Family<TransferLabels, Counter>,
}

impl Transfer {
    /// Open the roots (errors name `--transfer-root` and the path) and register metrics.
    pub fn new(
        roots: &[PathBuf],
        home: &Path,
        fsync: bool,
        registry: &mut Registry,
    ) -> Result<Arc<Transfer>> {
        let roots = Roots::open(roots, home)?;
        let bytes = Family::<TransferLabels, Counter>::default();
        let files = Family::<TransferLabels, Counter>::default();
        registry.register(
            "transfer_bytes",
            "Bytes moved by native scp and SFTP, by protocol and direction",
            bytes.clone(),
        );
        registry.register(
            "transfer_files",
            "Files completely uploaded or downloaded by native scp and SFTP",
            files.clone(),
        );
        Ok(Arc::new(Transfer {
            roots,
            fsync,
            bytes,
            files,
        }))
    }

    pub fn count_bytes(&self, protocol: Protocol, direction: Direction, n: u64) {
        if n > 0 {
            self.bytes
                .get_or_create(&TransferLabels {
                    protocol,
                    direction,
                })
                .inc_by(n);
        }
    }

    pub fn count_file(&self, protocol: Protocol, direction: Direction) {
        self.files
            .get_or_create(&TransferLabels {
                protocol,
                direction,
            })
            .inc();
    }
}
