//! OpenSSH-compatible authorized_keys line parser. STUB: keys only, no options.

use russh::keys::PublicKey;

/// One usable authorized_keys entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: PublicKey,
    pub line: usize,
}

/// Parse a whole file; bad lines are reported (line number, reason) and skipped.
pub fn parse(text: &str) -> (Vec<Entry>, Vec<(usize, String)>) {
    let mut entries = vec![];
    let mut errors = vec![];
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match PublicKey::from_openssh(line) {
            Ok(key) => entries.push(Entry { key, line: i + 1 }),
            Err(e) => errors.push((i + 1, e.to_string())),
        }
    }
    (entries, errors)
}
