//! Escaping of peer-supplied strings before they reach a log line or an error message.

use std::fmt::Write;

/// Render bytes a peer sent as printable text: printable ASCII and valid non-control UTF-8 pass,
/// everything else (control characters such as ESC or newline, invalid UTF-8) becomes a `\xNN`,
/// `\n`, `\t`... escape. Long input is cut at `max` bytes with a marker.
pub fn escape_bytes(input: &[u8], max: usize) -> String {
    let cut = input.len() > max;
    let input = &input[..input.len().min(max)];
    let mut out = String::with_capacity(input.len() + 8);
    for chunk in input.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    if cut {
        out.push_str("...");
    }
    out
}

/// [`escape_bytes`] for `&str` input, capped at 4 KiB.
pub fn escape(input: &str) -> String {
    escape_bytes(input.as_bytes(), 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            escape("echo \u{1b}[31mred\nnext"),
            "echo \\u{1b}[31mred\\nnext"
        );
        assert_eq!(escape_bytes(b"a\xffb", 100), "a\\xffb");
        assert_eq!(escape_bytes(b"abcdef", 3), "abc...");
        assert_eq!(escape("ünïcödé ok"), "ünïcödé ok");
    }
}
