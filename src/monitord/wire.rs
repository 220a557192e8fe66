//! The monitord wire format (reference/opennebula.md §4): `TYPE STATUS HOSTID EPOCH PAYLOAD`,
//! whitespace-separated, where PAYLOAD is `base64(zlib(rsa?(text)))`.
//!
//! Decoding follows onemonitord's `Message::parse_from`: the four header fields are read like
//! C++ `operator>>` (leading whitespace, including newlines, is skipped), the payload is the rest
//! of that line, base64 must be padded and free of embedded whitespace, bytes after the end of
//! the zlib stream are ignored, and with a private key a payload that does not decrypt is taken
//! as plaintext unless encryption is required.
//!
//! The [`Decoder`] keeps its scratch buffers between messages so that the per-datagram path does
//! not allocate once it has warmed up.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use flate2::{Decompress, FlushDecompress, Status as ZStatus};
use rsa::{Pkcs1v15Encrypt, RsaPrivateKey, RsaPublicKey};

/// Message types the listeners accept (onemonitord registers exactly these).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MsgType {
    MonitorVm,
    BeaconHost,
    MonitorHost,
    SystemHost,
    StateVm,
    ExecVm,
}

impl MsgType {
    pub const ALL: [MsgType; 6] = [
        MsgType::MonitorVm,
        MsgType::BeaconHost,
        MsgType::MonitorHost,
        MsgType::SystemHost,
        MsgType::StateVm,
        MsgType::ExecVm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MsgType::MonitorVm => "MONITOR_VM",
            MsgType::BeaconHost => "BEACON_HOST",
            MsgType::MonitorHost => "MONITOR_HOST",
            MsgType::SystemHost => "SYSTEM_HOST",
            MsgType::StateVm => "STATE_VM",
            MsgType::ExecVm => "EXEC_VM",
        }
    }

    /// Index into per-type arrays (same order as [`MsgType::ALL`]).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Exact, case-sensitive match as onemonitord does.
    pub fn from_bytes(b: &[u8]) -> Option<MsgType> {
        MsgType::ALL
            .into_iter()
            .find(|t| t.as_str().as_bytes() == b)
    }

    /// The transport OpenNebula's probe client uses for this type (`monitord-client.rb`).
    pub fn default_transport(self) -> Transport {
        match self {
            MsgType::StateVm => Transport::Tcp,
            _ => Transport::Udp,
        }
    }
}

impl std::str::FromStr for MsgType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MsgType::from_bytes(s.to_ascii_uppercase().as_bytes()).ok_or_else(|| {
            let names: Vec<_> = MsgType::ALL.iter().map(|t| t.as_str()).collect();
            format!(
                "unknown message type {s:?}; expected one of {}",
                names.join(", ")
            )
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    Success,
    Failure,
}

impl Status {
    pub const ALL: [Status; 2] = [Status::Success, Status::Failure];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "SUCCESS",
            Status::Failure => "FAILURE",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::str::FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "SUCCESS" => Ok(Status::Success),
            "FAILURE" => Ok(Status::Failure),
            _ => Err(format!("unknown status {s:?}; expected SUCCESS or FAILURE")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::Udp, Transport::Tcp];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why a message was refused (the `reason` label of `monitord_rejected_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Zero bytes (an empty datagram, or a TCP connection closed without data).
    Empty,
    /// Fewer than the four header fields.
    MissingFields,
    UnknownType,
    BadStatus,
    BadHostId,
    BadEpoch,
    NotBase64,
    /// Not a zlib stream, corrupt, or truncated before its end.
    BadZlib,
    /// Inflates beyond `--monitord-max-inflated-bytes` (zlib bomb).
    InflatedTooLarge,
    /// `--monitord-require-encryption` and the payload does not decrypt.
    NotEncrypted,
    /// Datagram or TCP stream beyond `--monitord-max-message-bytes` (or 65535 for UDP).
    TooLarge,
    /// TCP client did not close within `--monitord-read-timeout`.
    Timeout,
    /// Over the per-source rate (`--monitord-rate-limit`).
    RateLimited,
    /// Over `--monitord-max-connections`.
    ConnectionLimit,
    /// Socket error while reading.
    ReadError,
}

impl Reject {
    pub const ALL: [Reject; 15] = [
        Reject::Empty,
        Reject::MissingFields,
        Reject::UnknownType,
        Reject::BadStatus,
        Reject::BadHostId,
        Reject::BadEpoch,
        Reject::NotBase64,
        Reject::BadZlib,
        Reject::InflatedTooLarge,
        Reject::NotEncrypted,
        Reject::TooLarge,
        Reject::Timeout,
        Reject::RateLimited,
        Reject::ConnectionLimit,
        Reject::ReadError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Empty => "empty",
            Reject::MissingFields => "missing_fields",
            Reject::UnknownType => "unknown_type",
            Reject::BadStatus => "bad_status",
            Reject::BadHostId => "bad_host_id",
            Reject::BadEpoch => "bad_epoch",
            Reject::NotBase64 => "not_base64",
            Reject::BadZlib => "bad_zlib",
            Reject::InflatedTooLarge => "inflated_too_large",
            Reject::NotEncrypted => "not_encrypted",
            Reject::TooLarge => "too_large",
            Reject::Timeout => "timeout",
            Reject::RateLimited => "rate_limited",
            Reject::ConnectionLimit => "connection_limit",
            Reject::ReadError => "read_error",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The header of a message and its still-encoded payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    pub ty: MsgType,
    pub status: Status,
    pub host_id: i32,
    pub epoch: i64,
    /// The base64 text: rest of the first payload line, surrounding whitespace removed.
    pub payload: &'a [u8],
}

/// A decoded message; `payload` borrows the decoder's buffers.
#[derive(Debug, PartialEq, Eq)]
pub struct Message<'d> {
    pub ty: MsgType,
    pub status: Status,
    pub host_id: i32,
    pub epoch: i64,
    pub payload: &'d [u8],
    /// The payload was RSA-encrypted and decrypted with the private key.
    pub encrypted: bool,
}

/// C `isspace` in the "C" locale, which `operator>>` and `std::ws` use.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// Next whitespace-delimited token after skipping leading whitespace.
fn token<'a>(input: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    while *pos < input.len() && is_space(input[*pos]) {
        *pos += 1;
    }
    let start = *pos;
    while *pos < input.len() && !is_space(input[*pos]) {
        *pos += 1;
    }
    (start < *pos).then(|| &input[start..*pos])
}

/// An integer as `operator>>` reads it (optional sign, decimal digits), but the whole token must
/// be numeric: `3abc` is refused instead of silently splitting.
fn parse_int(tok: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(tok).ok()?;
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Split a message into its header fields and base64 payload (no decoding).
pub fn parse_header(msg: &[u8]) -> Result<Header<'_>, Reject> {
    let mut pos = 0;
    let Some(ty) = token(msg, &mut pos) else {
        return Err(Reject::Empty);
    };
    let status = token(msg, &mut pos);
    let host = token(msg, &mut pos);
    let epoch_start = pos;
    let epoch = token(msg, &mut pos);
    let (Some(status), Some(host), Some(epoch)) = (status, host, epoch) else {
        return Err(Reject::MissingFields);
    };
    let ty = MsgType::from_bytes(ty).ok_or(Reject::UnknownType)?;
    let status = match status {
        b"SUCCESS" => Status::Success,
        b"FAILURE" => Status::Failure,
        _ => return Err(Reject::BadStatus),
    };
    let host_id = parse_int(host)
        .and_then(|v| i32::try_from(v).ok())
        .ok_or(Reject::BadHostId)?;
    let epoch = parse_int(epoch).ok_or(Reject::BadEpoch)?;
    debug_assert!(pos > epoch_start);
    // `>> ws` then `getline`: skip whitespace (newlines too), take the rest of that line.
    while pos < msg.len() && is_space(msg[pos]) {
        pos += 1;
    }
    let rest = &msg[pos..];
    let line = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => &rest[..i],
        None => rest,
    };
    // EVP_DecodeBlock trims trailing whitespace (a `\r` before the newline, say).
    let end = line
        .iter()
        .rposition(|&b| !is_space(b))
        .map_or(0, |i| i + 1);
    Ok(Header {
        ty,
        status,
        host_id,
        epoch,
        payload: &line[..end],
    })
}

/// Standard alphabet, padding required (EVP_DecodeBlock needs a multiple of 4), lenient about
/// the unused bits of the last symbol.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical)
        .with_decode_allow_trailing_bits(true),
);

/// Decoding settings shared by every receive task.
#[derive(Clone)]
pub struct DecodeOptions {
    pub private_key: Option<Arc<RsaPrivateKey>>,
    pub require_encryption: bool,
    pub max_inflated: usize,
}

/// Reusable message decoder (one per receive task).
pub struct Decoder {
    opts: DecodeOptions,
    b64: Vec<u8>,
    inflated: Vec<u8>,
    plain: Vec<u8>,
    z: Decompress,
}

impl Decoder {
    pub fn new(opts: DecodeOptions) -> Decoder {
        Decoder {
            opts,
            b64: Vec::new(),
            inflated: Vec::new(),
            plain: Vec::new(),
            z: Decompress::new(true),
        }
    }

    /// Validate and decode one whole message.
    pub fn decode<'d>(&'d mut self, msg: &[u8]) -> Result<Message<'d>, Reject> {
        let h = parse_header(msg)?;
        let mut msg = Message {
            ty: h.ty,
            status: h.status,
            host_id: h.host_id,
            epoch: h.epoch,
            payload: &[],
            encrypted: false,
        };
        if h.payload.is_empty() {
            if self.opts.require_encryption {
                return Err(Reject::NotEncrypted);
            }
            return Ok(msg);
        }
        let need = base64::decoded_len_estimate(h.payload.len());
        if self.b64.len() < need {
            self.b64.resize(need, 0);
        }
        let n = B64
            .decode_slice(h.payload, &mut self.b64[..])
            .map_err(|_| Reject::NotBase64)?;
        inflate(
            &mut self.z,
            &self.b64[..n],
            &mut self.inflated,
            self.opts.max_inflated,
        )?;
        let Some(key) = &self.opts.private_key else {
            msg.payload = &self.inflated;
            return Ok(msg);
        };
        if rsa_decrypt(key, &self.inflated, &mut self.plain) {
            msg.payload = &self.plain;
            msg.encrypted = true;
        } else if self.opts.require_encryption {
            return Err(Reject::NotEncrypted);
        } else {
            msg.payload = &self.inflated;
        }
        Ok(msg)
    }
}

/// Inflate a zlib stream into `out` (cleared first), ignoring bytes after the stream's end and
/// refusing output beyond `max`.
fn inflate(z: &mut Decompress, input: &[u8], out: &mut Vec<u8>, max: usize) -> Result<(), Reject> {
    z.reset(true);
    out.clear();
    let limit = max.saturating_add(1);
    loop {
        if out.len() == out.capacity() {
            if out.len() >= limit {
                return Err(Reject::InflatedTooLarge);
            }
            let want = (out.capacity().max(2048) * 2).min(limit);
            out.reserve_exact(want - out.len());
        }
        let (in_before, out_before) = (z.total_in(), z.total_out());
        let consumed = usize::try_from(in_before)
            .unwrap_or(usize::MAX)
            .min(input.len());
        let status = z
            .decompress_vec(&input[consumed..], out, FlushDecompress::None)
            .map_err(|_| Reject::BadZlib)?;
        if out.len() > max {
            return Err(Reject::InflatedTooLarge);
        }
        if status == ZStatus::StreamEnd {
            return Ok(());
        }
        let progressed = z.total_in() != in_before || z.total_out() != out_before;
        if !progressed && out.len() < out.capacity() {
            // Needs more input than there is: truncated.
            return Err(Reject::BadZlib);
        }
    }
}

/// Decrypt modulus-sized PKCS#1 v1.5 blocks into `out`; false if `data` is not such a sequence.
fn rsa_decrypt(key: &RsaPrivateKey, data: &[u8], out: &mut Vec<u8>) -> bool {
    use rsa::traits::PublicKeyParts;
    let k = key.size();
    out.clear();
    if data.is_empty() || k == 0 || !data.len().is_multiple_of(k) {
        return false;
    }
    let mut rng = rsa::rand_core::OsRng;
    for block in data.chunks(k) {
        match key.decrypt_blinded(&mut rng, Pkcs1v15Encrypt, block) {
            Ok(p) => out.extend_from_slice(&p),
            Err(_) => return false,
        }
    }
    true
}

/// Encrypt as the Ruby client does: `n − 11`-byte chunks, each PKCS#1 v1.5 → one block.
pub fn rsa_encrypt(key: &RsaPublicKey, data: &[u8]) -> Result<Vec<u8>> {
    use rsa::traits::PublicKeyParts;
    let k = key.size();
    if k <= 11 {
        bail!("RSA key too small");
    }
    let mut rng = rsa::rand_core::OsRng;
    let mut out = Vec::with_capacity(data.len().div_ceil(k - 11) * k);
    for chunk in data.chunks(k - 11) {
        out.extend(
            key.encrypt(&mut rng, Pkcs1v15Encrypt, chunk)
                .context("RSA encryption failed")?,
        );
    }
    Ok(out)
}

/// `pack` of the Ruby client: encrypt (optional) → zlib level 9 → strict base64.
pub fn pack(payload: &[u8], key: Option<&RsaPublicKey>) -> Result<String> {
    use std::io::Write;
    let encrypted;
    let data = match key {
        Some(k) => {
            encrypted = rsa_encrypt(k, payload)?;
            &encrypted[..]
        }
        None => payload,
    };
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(data)?;
    let compressed = z.finish()?;
    Ok(base64::engine::general_purpose::STANDARD.encode(compressed))
}

/// One wire message as OpenNebula's client sends it (no trailing newline).
pub fn encode(
    ty: MsgType,
    status: Status,
    host_id: i32,
    epoch: i64,
    payload: &[u8],
    key: Option<&RsaPublicKey>,
) -> Result<Vec<u8>> {
    let packed = pack(payload, key)?;
    Ok(format!(
        "{} {} {host_id} {epoch} {packed}",
        ty.as_str(),
        status.as_str()
    )
    .into_bytes())
}

/// Load the monitord private key: PEM, PKCS#1 (`RSA PRIVATE KEY`) or PKCS#8 (`PRIVATE KEY`).
pub fn load_private_key(path: &std::path::Path) -> Result<RsaPrivateKey> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::DecodePrivateKey;
    use std::os::unix::fs::PermissionsExt;
    let flag = "--monitord-private-key";
    // Like the host keys (and sshd): a regular file that only its owner can read. Checking the
    // type first also keeps a FIFO from blocking the start in read_to_string.
    let meta = std::fs::metadata(path).with_context(|| format!("{flag} {}", path.display()))?;
    if !meta.is_file() {
        bail!("{flag} {}: not a regular file", path.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{flag} {}: permissions {mode:04o} are too open; the private key must not be \
             accessible by group or others (chmod 600)",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{flag} {}: cannot read", path.display()))?;
    let mut key = if text.contains(concat!("-----BEGIN RSA ", "PRIVATE KEY-----")) {
        RsaPrivateKey::from_pkcs1_pem(&text)
            .with_context(|| format!("{flag} {}: not a valid PKCS#1 RSA key", path.display()))?
    } else if text.contains(concat!("-----BEGIN ", "PRIVATE KEY-----")) {
        RsaPrivateKey::from_pkcs8_pem(&text)
            .with_context(|| format!("{flag} {}: not a valid PKCS#8 RSA key", path.display()))?
    } else if text.contains(concat!("-----BEGIN OPENSSH ", "PRIVATE KEY-----")) {
        bail!(
            "{flag} {}: OpenSSH-format keys are not supported (onemonitord cannot read them \
             either); convert with `ssh-keygen -p -m PEM -f <key>`",
            path.display()
        );
    } else {
        bail!("{flag} {}: no PEM RSA private key found", path.display());
    };
    key.precompute().ok();
    Ok(key)
}

/// Load a PKCS#1 `RSA PUBLIC KEY` PEM (the PUBKEY format probes use); SPKI `PUBLIC KEY` too.
pub fn load_public_key(path: &std::path::Path) -> Result<RsaPublicKey> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    use rsa::pkcs8::DecodePublicKey;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--pubkey {}: cannot read", path.display()))?;
    if text.contains("-----BEGIN RSA PUBLIC KEY-----") {
        RsaPublicKey::from_pkcs1_pem(&text).with_context(|| {
            format!(
                "--pubkey {}: not a valid PKCS#1 RSA public key",
                path.display()
            )
        })
    } else if text.contains("-----BEGIN PUBLIC KEY-----") {
        RsaPublicKey::from_public_key_pem(&text)
            .with_context(|| format!("--pubkey {}: not a valid RSA public key", path.display()))
    } else {
        bail!(
            "--pubkey {}: expected a PEM \"RSA PUBLIC KEY\"",
            path.display()
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    pub const EX_MONITOR_VM: &str = "MONITOR_VM SUCCESS 3 1724150000 eNpNzDsPgjAUhuG/0nTWhHoZGDrIpUmRtlDaQ4gxDsYQihE3lV9vJSE4nifvd0Agik6IJxSTDV6hJC1y1Vx+9/C4rScTSnKjNMUliaCo+Dt3tot7wowNq9oEnTCHQCV2Kzt+ND1Ye29D7tKPGEvf7Rkw3fgdke664+0zrUDmttdxDZrZcdq/ZgeSLe4W931mSGT8n/GvnS3g7UDx+QulOT8O";
    pub const EX_STATE_VM: &str = "STATE_VM SUCCESS 3 1724150005 eNoLjvRzjg8OcQxxta1MLeby9QwO9vRzh4oE+Ie7Bvm7uXGF+SrYKkQreLrYKhkaKekouLgG+PhHxoP4+XmpumAxBYgepaBQPz+gEUoKsQC1XRjP";
    pub const EX_BEACON: &str = "BEACON_HOST SUCCESS 3 1724150010 eNozNDcyMTQ1MDA0AAAK8AH2";

    pub fn plain_decoder() -> Decoder {
        Decoder::new(DecodeOptions {
            private_key: None,
            require_encryption: false,
            max_inflated: 16 << 20,
        })
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(data).unwrap();
        z.finish().unwrap()
    }

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    #[test]
    fn decodes_the_reference_examples() {
        let mut d = plain_decoder();
        let m = d.decode(EX_MONITOR_VM.as_bytes()).unwrap();
        assert_eq!(
            (m.ty, m.status, m.host_id, m.epoch),
            (MsgType::MonitorVm, Status::Success, 3, 1724150000)
        );
        assert_eq!(
            std::str::from_utf8(m.payload).unwrap(),
            "VM = [ ID=\"12\", DEPLOY_ID=\"one-12\", MONITOR=\"Q1BVPSIxLjUiCk1FTU9SWT0iMTA0ODU3NiIKTkVUUlg9IjEyMzQiCk5FVFRYPSI1Njc4IgpESVNLUkRCWVRFUz0iMTAwIgpESVNLV1JCWVRFUz0iMjAwIgpESVNLUkRJT1BTPSIzIgpESVNLV1JJT1BTPSI0Igo=\"]"
        );
        let m = d.decode(EX_STATE_VM.as_bytes()).unwrap();
        assert_eq!(
            (m.ty, m.host_id, m.epoch),
            (MsgType::StateVm, 3, 1724150005)
        );
        assert_eq!(
            std::str::from_utf8(m.payload).unwrap(),
            "SYNC_STATE=yes\nMISSING_STATE=POWEROFF\nVM = [ ID=\"12\", DEPLOY_ID=\"one-12\",  STATE=\"RUNNING\" ]"
        );
        let m = d.decode(EX_BEACON.as_bytes()).unwrap();
        assert_eq!(
            (m.ty, m.host_id, m.epoch),
            (MsgType::BeaconHost, 3, 1724150010)
        );
        assert_eq!(m.payload, b"1724150010");
    }

    #[test]
    fn round_trip_every_type_plain() {
        let mut d = plain_decoder();
        for ty in MsgType::ALL {
            for status in Status::ALL {
                let payload = format!("{}=\"x\"\nHOSTNAME=node-1\n", ty.as_str());
                let wire = encode(ty, status, 42, 1724150000, payload.as_bytes(), None).unwrap();
                let m = d.decode(&wire).unwrap();
                assert_eq!(
                    (m.ty, m.status, m.host_id, m.epoch),
                    (ty, status, 42, 1724150000)
                );
                assert_eq!(m.payload, payload.as_bytes());
                assert!(!m.encrypted);
            }
        }
    }

    #[test]
    fn round_trip_every_type_rsa_2048() {
        let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        let public = key.to_public_key();
        let mut d = Decoder::new(DecodeOptions {
            private_key: Some(Arc::new(key)),
            require_encryption: true,
            max_inflated: 16 << 20,
        });
        // Longer than one n−11 chunk (245 bytes) so that several blocks are used.
        let long: String = (0..40)
            .map(|i| format!("KEY_{i}=\"value number {i}\"\n"))
            .collect();
        for ty in MsgType::ALL {
            let wire = encode(ty, Status::Success, 7, 1, long.as_bytes(), Some(&public)).unwrap();
            let m = d.decode(&wire).unwrap();
            assert_eq!((m.ty, m.host_id, m.epoch), (ty, 7, 1));
            assert_eq!(m.payload, long.as_bytes());
            assert!(m.encrypted);
        }
        // Ciphertext is a whole number of modulus-sized blocks.
        let enc = rsa_encrypt(&public, long.as_bytes()).unwrap();
        assert_eq!(enc.len(), long.len().div_ceil(245) * 256);
        // Plaintext is refused when encryption is required ...
        let plain = encode(MsgType::BeaconHost, Status::Success, 7, 1, b"123", None).unwrap();
        assert_eq!(d.decode(&plain), Err(Reject::NotEncrypted));
        // ... and accepted otherwise (OpenNebula >= 6).
        d.opts.require_encryption = false;
        let m = d.decode(&plain).unwrap();
        assert_eq!((m.payload, m.encrypted), (&b"123"[..], false));
    }

    #[test]
    fn front_end_send_to_monitor_shape() {
        // `puts Zlib::Deflate.deflate(...)` adds "\n" after the stream; `echo` adds one more.
        let mut z = zlib(b"DS = [ ID = 0, USED_MB = 1 ]");
        z.push(b'\n');
        let wire = format!("MONITOR_HOST SUCCESS -1 0 {}\n", b64(&z));
        let mut d = plain_decoder();
        let m = d.decode(wire.as_bytes()).unwrap();
        assert_eq!((m.host_id, m.epoch), (-1, 0));
        assert_eq!(m.payload, b"DS = [ ID = 0, USED_MB = 1 ]");
    }

    #[test]
    fn header_parsing_like_operator_shift() {
        let h = parse_header(b"  BEACON_HOST\tSUCCESS\n+5  -3 \r\n abc= \r\nnext line").unwrap();
        assert_eq!((h.host_id, h.epoch, h.payload), (5, -3, &b"abc="[..]));
        let h = parse_header(b"BEACON_HOST SUCCESS 1 2").unwrap();
        assert_eq!(h.payload, b"");
        let h = parse_header(b"BEACON_HOST SUCCESS 1 2\n").unwrap();
        assert_eq!(h.payload, b"");
    }

    #[test]
    fn bad_input_is_refused_by_reason() {
        let good = b64(&zlib(b"x"));
        let cases: Vec<(Vec<u8>, Reject)> = vec![
            (b"".to_vec(), Reject::Empty),
            (b" \n\t".to_vec(), Reject::Empty),
            (b"BEACON_HOST".to_vec(), Reject::MissingFields),
            (b"BEACON_HOST SUCCESS 3".to_vec(), Reject::MissingFields),
            (
                format!("BOGUS SUCCESS 3 4 {good}").into_bytes(),
                Reject::UnknownType,
            ),
            (
                format!("beacon_host SUCCESS 3 4 {good}").into_bytes(),
                Reject::UnknownType,
            ),
            (
                format!("BEACON_HOST OK 3 4 {good}").into_bytes(),
                Reject::BadStatus,
            ),
            (
                format!("BEACON_HOST SUCCESS x3 4 {good}").into_bytes(),
                Reject::BadHostId,
            ),
            (
                format!("BEACON_HOST SUCCESS 3abc 4 {good}").into_bytes(),
                Reject::BadHostId,
            ),
            (
                format!("BEACON_HOST SUCCESS 99999999999 4 {good}").into_bytes(),
                Reject::BadHostId,
            ),
            (
                format!("BEACON_HOST SUCCESS 3 now {good}").into_bytes(),
                Reject::BadEpoch,
            ),
            (
                format!("BEACON_HOST SUCCESS 3 - {good}").into_bytes(),
                Reject::BadEpoch,
            ),
            (
                b"BEACON_HOST SUCCESS 3 4 not*base64".to_vec(),
                Reject::NotBase64,
            ),
            (b"BEACON_HOST SUCCESS 3 4 eNoz".to_vec(), Reject::BadZlib),
            (b"BEACON_HOST SUCCESS 3 4 eNo".to_vec(), Reject::NotBase64),
            (
                format!("BEACON_HOST SUCCESS 3 4 {} {good}", good).into_bytes(),
                Reject::NotBase64,
            ),
            (
                format!("BEACON_HOST SUCCESS 3 4 {}", b64(b"plain text")).into_bytes(),
                Reject::BadZlib,
            ),
        ];
        let mut d = plain_decoder();
        for (input, want) in cases {
            assert_eq!(
                d.decode(&input).map(|_| ()),
                Err(want),
                "{}",
                crate::escape::escape_bytes(&input, 200)
            );
        }
        // Truncated zlib: a valid stream cut in the middle.
        let z = zlib(&vec![b'a'; 100_000]);
        let cut = b64(&z[..z.len() / 2]);
        assert_eq!(
            d.decode(format!("BEACON_HOST SUCCESS 3 4 {cut}").as_bytes())
                .map(|_| ()),
            Err(Reject::BadZlib)
        );
    }

    #[test]
    fn zlib_bomb_is_capped() {
        let bomb = zlib(&vec![0u8; 20 << 20]);
        assert!(bomb.len() < 64 << 10, "bomb is {} bytes", bomb.len());
        let wire = format!("MONITOR_HOST SUCCESS 1 2 {}", b64(&bomb));
        let mut d = plain_decoder();
        assert_eq!(
            d.decode(wire.as_bytes()).map(|_| ()),
            Err(Reject::InflatedTooLarge)
        );
        // Exactly at the cap is fine.
        d.opts.max_inflated = 1000;
        let wire = encode(
            MsgType::MonitorHost,
            Status::Success,
            1,
            2,
            &[b'a'; 1000],
            None,
        )
        .unwrap();
        assert_eq!(d.decode(&wire).unwrap().payload.len(), 1000);
        let wire = encode(
            MsgType::MonitorHost,
            Status::Success,
            1,
            2,
            &[b'a'; 1001],
            None,
        )
        .unwrap();
        assert_eq!(d.decode(&wire).map(|_| ()), Err(Reject::InflatedTooLarge));
        // And the decoder still works afterwards.
        assert!(d.decode(EX_BEACON.as_bytes()).is_ok());
    }

    #[test]
    fn keys_load_in_both_pem_forms() {
        use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
        use rsa::pkcs8::EncodePrivateKey;
        let dir = tempfile::tempdir().unwrap();
        let key = RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
        let p1 = dir.path().join("k1");
        let p8 = dir.path().join("k8");
        let pubp = dir.path().join("pub");
        std::fs::write(
            &p1,
            key.to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        std::fs::write(
            &p8,
            key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        std::fs::write(
            &pubp,
            key.to_public_key()
                .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
                .unwrap(),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        for p in [&p1, &p8] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(load_private_key(&p1).unwrap(), key);
        assert_eq!(load_private_key(&p8).unwrap(), key);
        std::fs::set_permissions(&p1, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", load_private_key(&p1).unwrap_err());
        assert!(
            err.contains("--monitord-private-key") && err.contains("0644"),
            "{err}"
        );
        std::fs::set_permissions(&p1, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_public_key(&pubp).unwrap(), key.to_public_key());
        let err = format!("{:#}", load_private_key(&pubp).unwrap_err());
        assert!(err.contains("--monitord-private-key"), "{err}");
    }
}
