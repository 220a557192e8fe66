//! SFTP v3 wire builders for tests that speak the protocol by hand.

/// An SFTP string: u32 length, then the bytes.
pub fn s(b: impl AsRef<[u8]>) -> Vec<u8> {
    let b = b.as_ref();
    let mut v = (b.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(b);
    v
}

/// One framed request: u32 length, type byte, u32 request id, body.
pub fn packet(kind: u8, id: u32, body: &[u8]) -> Vec<u8> {
    let mut p = vec![kind];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(body);
    let mut out = (p.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&p);
    out
}
