//! monitord traffic for load tests: realistic MONITOR_VM messages (OpenNebula wire format) and
//! malformed ones of the same size, each kind refused by the relay for a known reason.
//!
//! Shared by `tests/load.rs` and `examples/monitord_load.rs` through `#[path]`.
#![allow(dead_code)]

use base64::Engine;
use tm_sidecar::monitord::wire::{self, MsgType, Status};

/// Deterministic xorshift, so that runs are comparable.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A MONITOR_VM message of about `size` bytes for `host`, as poll.rb would produce it.
pub fn valid(host: i32, size: usize, rng: &mut Rng) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let encode = |payload: &str| {
        wire::encode(
            MsgType::MonitorVm,
            Status::Success,
            host,
            1_724_150_000,
            payload.as_bytes(),
            None,
        )
        .expect("encode")
    };
    let mut payload = String::new();
    let mut vm = 0;
    loop {
        let monitor = format!(
            "CPU=\"{}.{}\"\nMEMORY=\"{}\"\nNETRX=\"{}\"\nNETTX=\"{}\"\nDISKRDBYTES=\"{}\"\nDISKWRBYTES=\"{}\"\nDISKRDIOPS=\"{}\"\nDISKWRIOPS=\"{}\"\n",
            rng.next() % 800,
            rng.next() % 100,
            rng.next() % 16_000_000,
            rng.next() % 1_000_000_000,
            rng.next() % 1_000_000_000,
            rng.next() % 1_000_000_000,
            rng.next() % 1_000_000_000,
            rng.next() % 100_000,
            rng.next() % 100_000
        );
        payload.push_str(&format!(
            "VM = [ ID=\"{id}\", DEPLOY_ID=\"one-{id}\", MONITOR=\"{}\"]\n",
            b64.encode(monitor),
            id = host * 1000 + vm
        ));
        let msg = encode(&payload);
        if msg.len() >= size {
            return msg;
        }
        vm += 1;
    }
}

/// The ways a message is malformed here, with the relay's reason label for each.
pub const INVALID_KINDS: [&str; 5] = [
    "unknown_type",
    "not_base64",
    "bad_zlib",
    "bad_host_id",
    "missing_fields",
];

/// A malformed variant (`kind` indexes [`INVALID_KINDS`]) of a valid message, about as long.
pub fn invalid(kind: usize, valid: &[u8], rng: &mut Rng) -> Vec<u8> {
    let text = String::from_utf8_lossy(valid).into_owned();
    let mut parts = text.splitn(5, ' ');
    let (ty, status, host, epoch, payload) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    match INVALID_KINDS[kind % INVALID_KINDS.len()] {
        "unknown_type" => format!("MONITOR_XX {status} {host} {epoch} {payload}").into_bytes(),
        "not_base64" => {
            let mut p = payload.as_bytes().to_vec();
            let mid = p.len() / 2;
            p[mid] = b'!';
            let mut m = format!("{ty} {status} {host} {epoch} ").into_bytes();
            m.extend_from_slice(&p);
            m
        }
        "bad_zlib" => {
            let junk: Vec<u8> = (0..payload.len() * 3 / 4)
                .map(|_| rng.next() as u8)
                .collect();
            let b64 = base64::engine::general_purpose::STANDARD.encode(junk);
            format!("{ty} {status} {host} {epoch} {b64}").into_bytes()
        }
        "bad_host_id" => format!("{ty} {status} h{host} {epoch} {payload}").into_bytes(),
        _ => {
            // two fields, padded with spaces to keep the size
            let mut m = format!("{ty} {status}").into_bytes();
            m.resize(valid.len(), b' ');
            m
        }
    }
}

/// One message of a load mix.
pub struct Msg {
    pub bytes: Vec<u8>,
    pub valid: bool,
}

/// `hosts` valid messages of about `size` bytes and, interleaved, malformed ones so that about
/// `invalid_percent` of all messages are malformed (cycling through every kind).
pub fn mix(hosts: i32, size: usize, invalid_percent: u32) -> Vec<Msg> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = vec![];
    let mut bad = 0usize;
    for h in 0..hosts.max(1) {
        let v = valid(h, size, &mut rng);
        // keep invalid / total at the wanted share
        while (bad as u64 + 1) * 100 <= invalid_percent as u64 * (out.len() as u64 + 1) {
            out.push(Msg {
                bytes: invalid(bad, &v, &mut rng),
                valid: false,
            });
            bad += 1;
        }
        out.push(Msg {
            bytes: v,
            valid: true,
        });
    }
    out
}
