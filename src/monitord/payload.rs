//! OpenNebula template text, as probes send it: `KEY=VALUE`, `KEY="VALUE"` (quoted values may
//! span lines, `\"` escapes a quote), `# comments`, and vector attributes
//! `NAME = [ K = "v", K2 = v2 ]` spanning lines. Names are case-insensitive (stored upper case).
//!
//! Values borrow from the input where possible; the parser never panics on any input.

use std::borrow::Cow;

use base64::Engine;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Single(Cow<'a, str>),
    Vector(Vec<(Cow<'a, str>, Cow<'a, str>)>),
}

impl<'a> Value<'a> {
    /// The value of a vector's element `key` (case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        match self {
            Value::Vector(v) => v
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.as_ref()),
            Value::Single(_) => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Template<'a> {
    pub attrs: Vec<(Cow<'a, str>, Value<'a>)>,
}

impl<'a> Template<'a> {
    /// First single value named `key` (case-insensitive).
    pub fn single(&self, key: &str) -> Option<&str> {
        self.attrs.iter().find_map(|(k, v)| match v {
            Value::Single(s) if k.eq_ignore_ascii_case(key) => Some(s.as_ref()),
            _ => None,
        })
    }

    /// Every vector named `key`.
    pub fn vectors<'s>(&'s self, key: &'s str) -> impl Iterator<Item = &'s Value<'a>> + 's {
        self.attrs
            .iter()
            .filter(move |(k, v)| k.eq_ignore_ascii_case(key) && matches!(v, Value::Vector(_)))
            .map(|(_, v)| v)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is not UTF-8")]
    NotUtf8,
    #[error("syntax error at byte {0}: {1}")]
    Syntax(usize, &'static str),
    #[error("VM {0}: MONITOR is not base64")]
    MonitorNotBase64(String),
    #[error("VM {0}: MONITOR template: {1}")]
    Monitor(String, Box<PayloadError>),
}

struct Parser<'a> {
    s: &'a str,
    b: &'a [u8],
    pos: usize,
}

fn is_name(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

impl<'a> Parser<'a> {
    fn err<T>(&self, what: &'static str) -> Result<T, PayloadError> {
        Err(PayloadError::Syntax(self.pos, what))
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    /// Skip spaces and tabs (and newlines and comments if `lines`).
    fn skip(&mut self, lines: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'\n' if lines => self.pos += 1,
                b'#' if lines => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Result<Cow<'a, str>, PayloadError> {
        let start = self.pos;
        while self.peek().is_some_and(is_name) {
            self.pos += 1;
        }
        if start == self.pos {
            return self.err("expected an attribute name");
        }
        let n = &self.s[start..self.pos];
        Ok(if n.bytes().any(|b| b.is_ascii_lowercase()) {
            Cow::Owned(n.to_ascii_uppercase())
        } else {
            Cow::Borrowed(n)
        })
    }

    fn equals(&mut self, lines: bool) -> Result<(), PayloadError> {
        self.skip(lines);
        if self.peek() != Some(b'=') {
            return self.err("expected '='");
        }
        self.pos += 1;
        self.skip(lines);
        Ok(())
    }

    fn quoted(&mut self) -> Result<Cow<'a, str>, PayloadError> {
        self.pos += 1; // opening quote
        let start = self.pos;
        let mut escaped = false;
        // memchr: values are long (base64 MONITOR templates), byte-at-a-time scanning showed
        // up in the relay's profile.
        loop {
            let Some(off) = memchr::memchr2(b'"', b'\\', &self.b[self.pos..]) else {
                self.pos = self.b.len();
                return self.err("unterminated quoted value");
            };
            self.pos += off;
            if self.b[self.pos] == b'"' {
                break;
            }
            if self.pos + 1 >= self.b.len() {
                self.pos = self.b.len();
                return self.err("unterminated quoted value");
            }
            escaped = true;
            self.pos += 2;
        }
        let raw = &self.s[start..self.pos];
        self.pos += 1; // closing quote
        if !escaped {
            return Ok(Cow::Borrowed(raw));
        }
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some(n @ ('"' | '\\')) => out.push(n),
                    Some(n) => {
                        out.push('\\');
                        out.push(n);
                    }
                    None => out.push('\\'),
                }
            } else {
                out.push(c);
            }
        }
        Ok(Cow::Owned(out))
    }

    /// Unquoted value: up to end of line, or inside a vector up to `,` / `]` / end of line.
    fn bare(&mut self, in_vector: bool) -> Cow<'a, str> {
        let start = self.pos;
        let rest = &self.b[self.pos..];
        let end = if in_vector {
            memchr::memchr3(b'\n', b',', b']', rest)
        } else {
            memchr::memchr(b'\n', rest)
        };
        self.pos += end.unwrap_or(rest.len());
        Cow::Borrowed(self.s[start..self.pos].trim_end())
    }

    fn value(&mut self, in_vector: bool) -> Result<Cow<'a, str>, PayloadError> {
        if self.peek() == Some(b'"') {
            self.quoted()
        } else {
            Ok(self.bare(in_vector))
        }
    }

    fn vector(&mut self) -> Result<Value<'a>, PayloadError> {
        self.pos += 1; // '['
        let mut items = Vec::new();
        loop {
            self.skip(true);
            match self.peek() {
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Vector(items));
                }
                None => return self.err("unterminated vector"),
                _ => {}
            }
            let k = self.name()?;
            self.equals(true)?;
            let v = self.value(true)?;
            items.push((k, v));
            self.skip(true);
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {}
                None => return self.err("unterminated vector"),
                _ => return self.err("expected ',' or ']'"),
            }
        }
    }

    fn template(&mut self) -> Result<Template<'a>, PayloadError> {
        let mut t = Template {
            attrs: Vec::with_capacity(16),
        };
        loop {
            self.skip(true);
            if self.peek().is_none() {
                return Ok(t);
            }
            let name = self.name()?;
            self.equals(false)?;
            let v = if self.peek() == Some(b'[') {
                self.vector()?
            } else {
                Value::Single(self.value(false)?)
            };
            t.attrs.push((name, v));
            self.skip(false);
            match self.peek() {
                None | Some(b'\n') | Some(b'#') => {}
                _ => return self.err("unexpected text after value"),
            }
        }
    }
}

/// Parse template text.
pub fn parse_str(s: &str) -> Result<Template<'_>, PayloadError> {
    Parser {
        s,
        b: s.as_bytes(),
        pos: 0,
    }
    .template()
}

/// Parse a decoded payload (must be UTF-8).
pub fn parse(payload: &[u8]) -> Result<Template<'_>, PayloadError> {
    parse_str(std::str::from_utf8(payload).map_err(|_| PayloadError::NotUtf8)?)
}

/// Visit every `VM = [ ..., MONITOR = "<base64 template>" ]` of a MONITOR_VM payload with its
/// decoded MONITOR template (empty when the VM has none); returns the number of VMs.
///
/// One decode buffer is reused for all VMs and nothing is copied out of it.
pub fn for_each_monitor_vm(
    t: &Template<'_>,
    mut visit: impl FnMut(&str, &Template<'_>),
) -> Result<usize, PayloadError> {
    let mut buf = Vec::new();
    let mut clean = Vec::new();
    let mut n = 0;
    for vm in t.vectors("VM") {
        n += 1;
        let id = vm.get("ID").unwrap_or("");
        let Some(b64) = vm.get("MONITOR") else {
            visit(id, &Template::default());
            continue;
        };
        let mut input = b64.as_bytes();
        if input.iter().any(u8::is_ascii_whitespace) {
            clean.clear();
            clean.extend(input.iter().filter(|b| !b.is_ascii_whitespace()));
            input = &clean;
        }
        buf.clear();
        base64::engine::general_purpose::STANDARD
            .decode_vec(input, &mut buf)
            .map_err(|_| {
                PayloadError::MonitorNotBase64(crate::escape::escape_bytes(id.as_bytes(), 64))
            })?;
        let monitor = parse(&buf).map_err(|e| {
            PayloadError::Monitor(crate::escape::escape_bytes(id.as_bytes(), 64), Box::new(e))
        })?;
        visit(id, &monitor);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_host_example() {
        let text = "HYPERVISOR=kvm\nUSEDMEMORY=3012345\nFREEMEMORY=13004567\nFREECPU=780\nUSEDCPU=20\n\
                    NETRX=123456789\nNETTX=98765432\n\
                    HUGEPAGE = [ NODE_ID = \"0\", SIZE = \"2048\", FREE = \"0\" ]\n\
                    MEMORY_NODE = [ NODE_ID = \"0\", FREE = \"13004567\", USED = \"3012345\" ]\n";
        let t = parse_str(text).unwrap();
        assert_eq!(t.single("FREECPU"), Some("780"));
        assert_eq!(t.single("hypervisor"), Some("kvm"));
        let hp: Vec<_> = t.vectors("HUGEPAGE").collect();
        assert_eq!(hp.len(), 1);
        assert_eq!(hp[0].get("SIZE"), Some("2048"));
        assert_eq!(
            t.vectors("MEMORY_NODE").next().unwrap().get("used"),
            Some("3012345")
        );
    }

    #[test]
    fn system_host_multiline_vector_and_quotes() {
        let text = "DS_LOCATION_USED_MB  = 1234\nDS_LOCATION_TOTAL_MB = 50000\n\
                    DS = [ ID = 0,\n       USED_MB  = 1234,\n       TOTAL_MB = 50000,\n       FREE_MB  = 48766\n]\n\
                    VERSION=\"7.0.0\"\nMODELNAME=\"Intel(R) \\\"Xeon\\\" = [x]\"\n# comment\nHOSTNAME=node-1 \n";
        let t = parse_str(text).unwrap();
        assert_eq!(t.single("DS_LOCATION_USED_MB"), Some("1234"));
        let ds = t.vectors("DS").next().unwrap();
        assert_eq!(
            (ds.get("ID"), ds.get("FREE_MB")),
            (Some("0"), Some("48766"))
        );
        assert_eq!(t.single("VERSION"), Some("7.0.0"));
        assert_eq!(t.single("MODELNAME"), Some("Intel(R) \"Xeon\" = [x]"));
        assert_eq!(t.single("HOSTNAME"), Some("node-1"));
    }

    #[test]
    fn monitor_vm_example_decodes_monitor() {
        let text = "VM = [ ID=\"12\", DEPLOY_ID=\"one-12\", MONITOR=\"Q1BVPSIxLjUiCk1FTU9SWT0iMTA0ODU3NiIKTkVUUlg9IjEyMzQiCk5FVFRYPSI1Njc4IgpESVNLUkRCWVRFUz0iMTAwIgpESVNLV1JCWVRFUz0iMjAwIgpESVNLUkRJT1BTPSIzIgpESVNLV1JJT1BTPSI0Igo=\"]";
        let t = parse_str(text).unwrap();
        let mut seen = vec![];
        let n = for_each_monitor_vm(&t, |id, m| {
            seen.push((
                id.to_string(),
                m.single("CPU").map(String::from),
                m.single("DISKWRIOPS").map(String::from),
            ));
        })
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            seen,
            vec![(
                "12".to_string(),
                Some("1.5".to_string()),
                Some("4".to_string())
            )]
        );
        // monitor_ds_vm variant without DEPLOY_ID and with a nested vector.
        let inner = base64::engine::general_purpose::STANDARD.encode("DISK_SIZE=[ID=0,SIZE=123]\n");
        let text = format!("VM = [ ID = 12, MONITOR = \"{inner}\"]");
        let t = parse_str(&text).unwrap();
        let mut size = None;
        for_each_monitor_vm(&t, |_, m| {
            size = m
                .vectors("DISK_SIZE")
                .next()
                .and_then(|v| v.get("SIZE"))
                .map(String::from)
        })
        .unwrap();
        assert_eq!(size.as_deref(), Some("123"));
    }

    #[test]
    fn bad_templates_are_errors_not_panics() {
        for bad in [
            "=x",
            "KEY",
            "KEY x",
            "KEY=\"unterminated",
            "V = [ A = 1",
            "V = [ = 1 ]",
            "K=\"v\" trailing",
            "K=\"\\",
        ] {
            assert!(parse_str(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse(b"\xff\xfe"), Err(PayloadError::NotUtf8));
        let t = parse_str("VM=[ID=1,MONITOR=\"%%%\"]").unwrap();
        assert!(matches!(
            for_each_monitor_vm(&t, |_, _| {}),
            Err(PayloadError::MonitorNotBase64(_))
        ));
        assert_eq!(parse_str("").unwrap().attrs.len(), 0);
        assert_eq!(parse_str("K=").unwrap().single("K"), Some(""));
    }
}
