//! OpenSSH-compatible authorized_keys line parser (sshd(8) "AUTHORIZED_KEYS FILE FORMAT").
//!
//! A line is `[options] keytype base64 [comment]`. Options are comma-separated, keywords are
//! case-insensitive, values are double-quoted (`\"` escapes a quote; spaces and `#` are literal
//! inside quotes). Blank lines and lines starting with `#` are ignored. A bad line is reported
//! with its line number and skipped; it never affects the other lines. ssh-key is used only to
//! decode the key itself.

use std::net::IpAddr;

use russh::keys::PublicKey;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

use crate::ssh::patterns::HostPatterns;

/// Longest accepted line, as sshd.
pub const MAX_LINE: usize = 8 * 1024;
/// Most `environment=` options on one line (sshd's SSH_AUTHOPT_ENV_MAX).
const MAX_ENV: usize = 1024;
/// Smallest accepted RSA modulus (sshd's SSH_RSA_MINIMUM_MODULUS_SIZE).
const MIN_RSA_BITS: u32 = 1024;

/// One usable authorized_keys entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: PublicKey,
    /// 1-based line number in its file.
    pub line: usize,
    pub options: KeyOptions,
    pub comment: String,
}

/// The options of one line, typed. Defaults (no options) permit everything.
#[derive(Debug, Clone)]
pub struct KeyOptions {
    /// `cert-authority`: the key is a CA for user certificates, never a login key itself.
    pub cert_authority: bool,
    /// `restrict` was given (later flags may re-enable individual permissions).
    pub restrict: bool,
    pub permit_pty: bool,
    pub permit_agent_forwarding: bool,
    pub permit_port_forwarding: bool,
    pub permit_x11_forwarding: bool,
    pub permit_user_rc: bool,
    /// `no-touch-required` (FIDO keys).
    pub no_touch_required: bool,
    /// `verify-required` (FIDO keys).
    pub verify_required: bool,
    /// `command=`.
    pub command: Option<String>,
    /// `principals=` (meaningful on `cert-authority` lines only, ignored elsewhere as in sshd).
    pub principals: Option<Vec<String>>,
    /// `from=`, raw text (for logs) and parsed.
    pub from: Option<(String, HostPatterns)>,
    /// `expiry-time=` as a Unix timestamp; the earliest one when given several times.
    pub expiry_time: Option<i64>,
    /// `environment=` in file order; for a repeated name the first one wins.
    pub environment: Vec<(String, String)>,
    /// `permitopen=` / `permitlisten=` / `tunnel=` (accepted; forwarding is refused anyway).
    pub permit_open: Vec<String>,
    pub permit_listen: Vec<String>,
    pub tunnel: Option<String>,
}

impl Default for KeyOptions {
    fn default() -> Self {
        KeyOptions {
            cert_authority: false,
            restrict: false,
            permit_pty: true,
            permit_agent_forwarding: true,
            permit_port_forwarding: true,
            permit_x11_forwarding: true,
            permit_user_rc: true,
            no_touch_required: false,
            verify_required: false,
            command: None,
            principals: None,
            from: None,
            expiry_time: None,
            environment: vec![],
            permit_open: vec![],
            permit_listen: vec![],
            tunnel: None,
        }
    }
}

impl KeyOptions {
    /// Is the line expired at `now` (Unix seconds)? sshd refuses once `expiry < now`.
    pub fn expired_at(&self, now: i64) -> bool {
        self.expiry_time.is_some_and(|t| t < now)
    }

    /// Does `from=` (if any) let the peer in? Without a known peer address a `from=` line is
    /// refused.
    pub fn from_allows(&self, peer: Option<IpAddr>) -> bool {
        match (&self.from, peer) {
            (None, _) => true,
            (Some((_, patterns)), Some(ip)) => patterns.allows(ip),
            (Some(_), None) => false,
        }
    }
}

/// Parse a whole file; bad lines are reported (line number, reason) and skipped.
pub fn parse(text: &str) -> (Vec<Entry>, Vec<(usize, String)>) {
    let mut entries = vec![];
    let mut errors = vec![];
    for (i, line) in text.split('\n').enumerate() {
        match parse_line(line) {
            Ok(Some((key, options, comment))) => entries.push(Entry {
                key,
                line: i + 1,
                options,
                comment,
            }),
            Ok(None) => {}
            Err(reason) => errors.push((i + 1, reason)),
        }
    }
    (entries, errors)
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Key type names as they start a line without options.
fn looks_like_keytype(token: &str) -> bool {
    ["ssh-", "ecdsa-", "sk-", "rsa-sha2-"]
        .iter()
        .any(|p| token.starts_with(p))
}

/// One line: `Ok(None)` for blank and comment lines.
pub fn parse_line(line: &str) -> Result<Option<(PublicKey, KeyOptions, String)>, String> {
    if line.len() > MAX_LINE {
        return Err(format!("line longer than {MAX_LINE} bytes"));
    }
    let line = line
        .strip_suffix('\r')
        .unwrap_or(line)
        .trim_start_matches(is_blank);
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let first = line.split(is_blank).next().unwrap_or("");
    let (options, rest) = if looks_like_keytype(first) {
        (KeyOptions::default(), line)
    } else {
        let end = options_end(line)?;
        let (opts, rest) = line.split_at(end);
        (parse_options(opts)?, rest.trim_start_matches(is_blank))
    };
    let (keytype, rest) = next_field(rest);
    if keytype.is_empty() {
        return Err("missing key after options".into());
    }
    let (base64, comment) = next_field(rest);
    if base64.is_empty() {
        return Err("missing key data".into());
    }
    let comment = comment.trim_end_matches(is_blank).to_string();
    let key = PublicKey::from_openssh(&format!("{keytype} {base64}"))
        .map_err(|e| format!("cannot decode {keytype:?} key: {e}"))?;
    if let Some(rsa) = key.key_data().rsa()
        && rsa.key_size() < MIN_RSA_BITS
    {
        return Err(format!(
            "RSA key of {} bits is too small (minimum {MIN_RSA_BITS})",
            rsa.key_size()
        ));
    }
    Ok(Some((key, options, comment)))
}

/// The first blank-separated field and the rest after the blanks that follow it.
fn next_field(text: &str) -> (&str, &str) {
    match text.split_once(is_blank) {
        Some((field, rest)) => (field, rest.trim_start_matches(is_blank)),
        None => (text, ""),
    }
}

/// Byte index where the options field ends: the first blank outside double quotes.
fn options_end(line: &str) -> Result<usize, String> {
    let bytes = line.as_bytes();
    let mut quoted = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if bytes.get(i + 1) == Some(&b'"') => i += 1,
            b'"' => quoted = !quoted,
            b' ' | b'\t' if !quoted => return Ok(i),
            _ => {}
        }
        i += 1;
    }
    if quoted {
        Err("unterminated quote in options".into())
    } else {
        Err("missing key after options".into())
    }
}

/// Split `name[="value"]` items, dequoting values.
fn option_items(text: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let mut items = vec![];
    let mut chars = text.char_indices().peekable();
    loop {
        let start = chars.peek().map(|&(i, _)| i).unwrap_or(text.len());
        let mut name_end = text.len();
        let mut has_value = false;
        while let Some(&(i, c)) = chars.peek() {
            if c == ',' || c == '=' {
                name_end = i;
                has_value = c == '=';
                break;
            }
            chars.next();
        }
        let name = &text[start..name_end];
        if name.is_empty() {
            return Err("empty option".into());
        }
        let ended_with_sep = chars.next().is_some(); // consume ',' or '='
        let value = if has_value {
            match chars.next() {
                Some((_, '"')) => {}
                _ => return Err(format!("missing start quote in value of option {name:?}")),
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' if chars.peek().map(|&(_, n)| n) == Some('"') => {
                        chars.next();
                        value.push('"');
                    }
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("missing end quote in value of option {name:?}"));
            }
            Some(value)
        } else {
            None
        };
        items.push((name.to_string(), value));
        if has_value {
            match chars.next() {
                None => break,
                Some((_, ',')) => {
                    if chars.peek().is_none() {
                        return Err("trailing comma in options".into());
                    }
                }
                Some(_) => {
                    return Err(format!(
                        "unexpected text after the value of option {name:?}"
                    ));
                }
            }
        } else if !ended_with_sep {
            break;
        } else if chars.peek().is_none() {
            return Err("trailing comma in options".into());
        }
    }
    Ok(items)
}

/// Parse the options field into [`KeyOptions`], in order (so `restrict,pty` re-enables the PTY).
pub fn parse_options(text: &str) -> Result<KeyOptions, String> {
    let mut o = KeyOptions::default();
    for (name, value) in option_items(text)? {
        let lower = name.to_ascii_lowercase();
        match (lower.as_str(), value) {
            ("restrict", None) => {
                o.restrict = true;
                o.permit_pty = false;
                o.permit_agent_forwarding = false;
                o.permit_port_forwarding = false;
                o.permit_x11_forwarding = false;
                o.permit_user_rc = false;
            }
            ("cert-authority", None) => o.cert_authority = true,
            ("pty", None) => o.permit_pty = true,
            ("no-pty", None) => o.permit_pty = false,
            ("agent-forwarding", None) => o.permit_agent_forwarding = true,
            ("no-agent-forwarding", None) => o.permit_agent_forwarding = false,
            ("port-forwarding", None) => o.permit_port_forwarding = true,
            ("no-port-forwarding", None) => o.permit_port_forwarding = false,
            ("x11-forwarding", None) => o.permit_x11_forwarding = true,
            ("no-x11-forwarding", None) => o.permit_x11_forwarding = false,
            ("user-rc", None) => o.permit_user_rc = true,
            ("no-user-rc", None) => o.permit_user_rc = false,
            ("touch-required", None) => o.no_touch_required = false,
            ("no-touch-required", None) => o.no_touch_required = true,
            ("verify-required", None) => o.verify_required = true,
            ("no-verify-required", None) => o.verify_required = false,
            ("command", Some(v)) => {
                if o.command.is_some() {
                    return Err("multiple \"command\" clauses".into());
                }
                o.command = Some(v);
            }
            ("principals", Some(v)) => {
                if o.principals.is_some() {
                    return Err("multiple \"principals\" clauses".into());
                }
                o.principals = Some(
                    v.split(',')
                        .filter(|p| !p.is_empty())
                        .map(String::from)
                        .collect(),
                );
            }
            ("from", Some(v)) => {
                if o.from.is_some() {
                    return Err("multiple \"from\" clauses".into());
                }
                let patterns = HostPatterns::parse(&v).map_err(|e| format!("from=: {e}"))?;
                o.from = Some((v, patterns));
            }
            ("expiry-time", Some(v)) => {
                let t = parse_expiry_time(&v).ok_or_else(|| {
                    format!("invalid expiry-time {v:?} (expected YYYYMMDD[HHMM[SS]][Z])")
                })?;
                o.expiry_time = Some(o.expiry_time.map_or(t, |old| old.min(t)));
            }
            ("environment", Some(v)) => {
                let (var, val) = v
                    .split_once('=')
                    .filter(|(n, _)| valid_env_name(n))
                    .ok_or_else(|| format!("invalid environment string {v:?}"))?;
                if o.environment.len() >= MAX_ENV {
                    return Err("too many environment strings".into());
                }
                if !o.environment.iter().any(|(n, _)| n == var) {
                    o.environment.push((var.to_string(), val.to_string()));
                }
            }
            ("permitopen", Some(v)) => o.permit_open.push(host_port(&name, v)?),
            ("permitlisten", Some(v)) => o.permit_listen.push(host_port(&name, v)?),
            ("tunnel", Some(v)) => {
                if !(v.eq_ignore_ascii_case("any")
                    || (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())))
                {
                    return Err(format!("invalid tunnel {v:?}"));
                }
                o.tunnel = Some(v);
            }
            (_, Some(_)) if is_known(&lower) => {
                return Err(format!("option {name:?} takes no value"));
            }
            (_, None) if is_known(&lower) => {
                return Err(format!("option {name:?} needs a value"));
            }
            _ => return Err(format!("unknown option {name:?}")),
        }
    }
    Ok(o)
}

fn is_known(lower: &str) -> bool {
    const KNOWN: &[&str] = &[
        "restrict",
        "cert-authority",
        "pty",
        "no-pty",
        "agent-forwarding",
        "no-agent-forwarding",
        "port-forwarding",
        "no-port-forwarding",
        "x11-forwarding",
        "no-x11-forwarding",
        "user-rc",
        "no-user-rc",
        "touch-required",
        "no-touch-required",
        "verify-required",
        "no-verify-required",
        "command",
        "principals",
        "from",
        "expiry-time",
        "environment",
        "permitopen",
        "permitlisten",
        "tunnel",
    ];
    KNOWN.contains(&lower)
}

/// Environment names we accept: a C identifier (stricter than sshd, which only wants a `=`).
fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn host_port(name: &str, value: String) -> Result<String, String> {
    match value.rsplit_once(':') {
        Some((_, port))
            if port == "*" || (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())) =>
        {
            Ok(value)
        }
        _ => Err(format!("invalid {name} {value:?} (expected host:port)")),
    }
}

/// `YYYYMMDD[Z]`, `YYYYMMDDHHMM[Z]` or `YYYYMMDDHHMMSS[Z]` → Unix seconds; local time unless `Z`.
pub fn parse_expiry_time(text: &str) -> Option<i64> {
    let (digits, utc) = match text.strip_suffix(['Z', 'z']) {
        Some(d) => (d, true),
        None => (text, false),
    };
    if !matches!(digits.len(), 8 | 12 | 14) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| digits.get(r).and_then(|s| s.parse::<u32>().ok());
    let year = i32::try_from(num(0..4)?).ok()?;
    let month = Month::try_from(u8::try_from(num(4..6)?).ok()?).ok()?;
    let day = u8::try_from(num(6..8)?).ok()?;
    let (hour, minute, second) = match digits.len() {
        8 => (0, 0, 0),
        12 => (num(8..10)?, num(10..12)?, 0),
        _ => (num(8..10)?, num(10..12)?, num(12..14)?),
    };
    let date = Date::from_calendar_date(year, month, day).ok()?;
    let clock = Time::from_hms(
        u8::try_from(hour).ok()?,
        u8::try_from(minute).ok()?,
        u8::try_from(second).ok()?,
    )
    .ok()?;
    let local = PrimitiveDateTime::new(date, clock);
    if utc {
        return Some(local.assume_utc().unix_timestamp());
    }
    // Local time: take the zone's offset near that instant, then correct once for a DST change
    // between the guess and the answer (as mktime would). Unknown zone → UTC.
    let guess = local.assume_utc();
    let offset = UtcOffset::local_offset_at(guess).unwrap_or(UtcOffset::UTC);
    let first: OffsetDateTime = local.assume_offset(offset);
    let offset2 = UtcOffset::local_offset_at(first).unwrap_or(offset);
    Some(local.assume_offset(offset2).unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC/qeB//esMyePs9t3I5J6NLoAsBUWmc6bU3kxQi6h6L";

    fn one(line: &str) -> KeyOptions {
        let (entries, errors) = parse(line);
        assert!(errors.is_empty(), "{line}: {errors:?}");
        assert_eq!(entries.len(), 1);
        entries
            .into_iter()
            .next()
            .map(|e| e.options)
            .unwrap_or_default()
    }

    fn bad(line: &str) -> String {
        let (entries, errors) = parse(line);
        assert!(entries.is_empty(), "{line} should be refused");
        assert_eq!(errors.len(), 1);
        errors[0].1.clone()
    }

    #[test]
    fn plain_key_with_comment() {
        let (entries, errors) = parse(&format!("{KEY} alice@example with spaces  \n"));
        assert!(errors.is_empty());
        assert_eq!(entries[0].comment, "alice@example with spaces");
        assert_eq!(entries[0].line, 1);
        let o = &entries[0].options;
        assert!(o.permit_pty && o.permit_agent_forwarding && o.permit_port_forwarding);
        assert!(o.command.is_none() && !o.cert_authority);
    }

    #[test]
    fn comments_and_blank_lines() {
        let text =
            format!("# a comment\n\n   \n\t# indented comment\r\n{KEY}\r\n  {KEY} indented\n");
        let (entries, errors) = parse(&text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            entries.iter().map(|e| e.line).collect::<Vec<_>>(),
            vec![5, 6]
        );
        assert_eq!(entries[0].comment, "");
    }

    #[test]
    fn quoted_values_with_spaces_and_escaped_quotes() {
        let o = one(&format!(
            r#"command="/usr/bin/rrsync -ro /srv \"x y\"",no-pty {KEY} c"#
        ));
        assert_eq!(
            o.command.as_deref(),
            Some(r#"/usr/bin/rrsync -ro /srv "x y""#)
        );
        assert!(!o.permit_pty);
        // Other backslashes stay literal, as in sshd.
        let o = one(&format!(r#"command="echo a\\b \n" {KEY}"#));
        assert_eq!(o.command.as_deref(), Some(r#"echo a\\b \n"#));
    }

    #[test]
    fn hash_inside_quotes_is_not_a_comment() {
        let o = one(&format!(
            r#"environment="FOO=bar#baz",command="echo # not a comment" {KEY} # tail"#
        ));
        assert_eq!(o.environment, vec![("FOO".into(), "bar#baz".into())]);
        assert_eq!(o.command.as_deref(), Some("echo # not a comment"));
    }

    #[test]
    fn option_keywords_are_case_insensitive() {
        let o = one(&format!(r#"No-PTY,COMMAND="x",No-X11-Forwarding {KEY}"#));
        assert!(!o.permit_pty && !o.permit_x11_forwarding);
        assert_eq!(o.command.as_deref(), Some("x"));
    }

    #[test]
    fn malformed_line_does_not_disable_others() {
        let text = format!(
            "{KEY} first\nnot-an-option {KEY}\nssh-ed25519 AAAAbroken\ncommand=\"unterminated {KEY}\n\
             {KEY} last\nssh-ed25519\nfrom=\"10.0.0.1/8\" {KEY}\n"
        );
        let (entries, errors) = parse(&text);
        assert_eq!(
            entries.iter().map(|e| e.line).collect::<Vec<_>>(),
            vec![1, 5]
        );
        assert_eq!(
            errors.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![2, 3, 4, 6, 7]
        );
        assert!(errors[0].1.contains("unknown option"), "{errors:?}");
        // No key material in the reasons.
        assert!(
            errors.iter().all(|(_, r)| !r.contains("AAAA")),
            "{errors:?}"
        );
    }

    #[test]
    fn long_lines_are_refused() {
        let long = format!("{KEY} {}", "x".repeat(MAX_LINE));
        assert!(bad(&long).contains("longer"));
        let ok = format!("{KEY} {}", "x".repeat(MAX_LINE - KEY.len() - 1));
        one(&ok);
    }

    #[test]
    fn every_option() {
        let o = one(&format!(
            r#"cert-authority,principals="alice,bob",from="10.0.0.0/8,!10.0.0.1",expiry-time="20991231Z",environment="A=1",environment="B=x y",environment="A=2",permitopen="localhost:80",permitlisten="*:8080",tunnel="1",no-touch-required,verify-required,no-user-rc,no-port-forwarding,no-agent-forwarding,no-x11-forwarding,no-pty,command="ls" {KEY}"#
        ));
        assert!(o.cert_authority);
        assert_eq!(
            o.principals,
            Some(vec!["alice".to_string(), "bob".to_string()])
        );
        let from = o.from.as_ref().map(|f| f.0.as_str());
        assert_eq!(from, Some("10.0.0.0/8,!10.0.0.1"));
        assert!(o.from_allows(Some("10.2.3.4".parse().unwrap())));
        assert!(!o.from_allows(Some("10.0.0.1".parse().unwrap())));
        assert!(!o.from_allows(None));
        assert_eq!(o.expiry_time, Some(4102358400));
        assert_eq!(
            o.environment,
            vec![
                ("A".to_string(), "1".to_string()),
                ("B".to_string(), "x y".to_string())
            ]
        );
        assert_eq!(o.permit_open, vec!["localhost:80"]);
        assert_eq!(o.permit_listen, vec!["*:8080"]);
        assert_eq!(o.tunnel.as_deref(), Some("1"));
        assert!(o.no_touch_required && o.verify_required);
        assert!(!o.permit_user_rc && !o.permit_port_forwarding && !o.permit_agent_forwarding);
        assert!(!o.permit_x11_forwarding && !o.permit_pty);
        assert_eq!(o.command.as_deref(), Some("ls"));
        let o = one(&format!(
            "pty,agent-forwarding,port-forwarding,x11-forwarding,user-rc,touch-required {KEY}"
        ));
        assert!(o.permit_pty && o.permit_agent_forwarding && o.permit_port_forwarding);
        assert!(o.permit_x11_forwarding && o.permit_user_rc && !o.no_touch_required);
    }

    #[test]
    fn option_errors() {
        for (line, want) in [
            (format!("bogus-option {KEY}"), "unknown option"),
            (format!("no-cert-authority {KEY}"), "unknown option"),
            (format!("command=ls {KEY}"), "missing start quote"),
            (format!(r#"command="a",command="b" {KEY}"#), "multiple"),
            (format!(r#"from="a",from="b" {KEY}"#), "multiple"),
            (format!(r#"pty="yes" {KEY}"#), "takes no value"),
            (format!("command {KEY}"), "needs a value"),
            (format!(r#"command="x"junk {KEY}"#), "unexpected text"),
            (format!("no-pty, {KEY}"), "trailing comma"),
            (format!("no-pty,,pty {KEY}"), "empty option"),
            (format!(r#"environment="NOEQUALS" {KEY}"#), "environment"),
            (format!(r#"environment="=v" {KEY}"#), "environment"),
            (format!(r#"environment="BAD-NAME=v" {KEY}"#), "environment"),
            (format!(r#"permitopen="nohostport" {KEY}"#), "permitopen"),
            (format!(r#"tunnel="x" {KEY}"#), "tunnel"),
            (format!(r#"from="10.0.0.0/99" {KEY}"#), "from="),
            ("no-pty".to_string(), "missing key"),
            ("ssh-ed25519 AAAA!!".to_string(), "cannot decode"),
        ] {
            let reason = bad(&line);
            assert!(reason.contains(want), "{line}: {reason}");
        }
    }

    #[test]
    fn restrict_and_reenable() {
        let o = one(&format!("restrict {KEY}"));
        assert!(o.restrict);
        assert!(!o.permit_pty && !o.permit_agent_forwarding && !o.permit_port_forwarding);
        assert!(!o.permit_x11_forwarding && !o.permit_user_rc);
        let o = one(&format!("restrict,pty {KEY}"));
        assert!(o.permit_pty && !o.permit_agent_forwarding && !o.permit_port_forwarding);
        let o = one(&format!("restrict,agent-forwarding,user-rc {KEY}"));
        assert!(!o.permit_pty && o.permit_agent_forwarding && o.permit_user_rc);
        // Order matters: a later restrict wins.
        let o = one(&format!("pty,restrict {KEY}"));
        assert!(!o.permit_pty);
    }

    #[test]
    fn expiry_times() {
        assert_eq!(parse_expiry_time("19700101Z"), Some(0));
        assert_eq!(parse_expiry_time("19700102z"), Some(86400));
        assert_eq!(parse_expiry_time("197001010001Z"), Some(60));
        assert_eq!(parse_expiry_time("19700101000001Z"), Some(1));
        for bad in [
            "INVALID",
            "1999010",
            "199901011",
            "19991301",
            "19990230",
            "199901012460Z",
            "",
            "Z",
        ] {
            assert_eq!(parse_expiry_time(bad), None, "{bad}");
        }
        // Local time: within a day of the UTC reading whatever the zone.
        let local = parse_expiry_time("20300101").unwrap();
        let utc = parse_expiry_time("20300101Z").unwrap();
        assert!((local - utc).abs() <= 86400);

        let now = OffsetDateTime::now_utc().unix_timestamp();
        let past = one(&format!(r#"expiry-time="19990101" {KEY}"#));
        assert!(past.expired_at(now));
        let future = one(&format!(r#"expiry-time="20991231235959" {KEY}"#));
        assert!(!future.expired_at(now));
        let earliest = one(&format!(
            r#"expiry-time="20991231Z",expiry-time="20500101Z" {KEY}"#
        ));
        assert_eq!(earliest.expiry_time, parse_expiry_time("20500101Z"));
        assert!(bad(&format!(r#"expiry-time="INVALID" {KEY}"#)).contains("expiry-time"));
        assert!(!one(KEY).expired_at(now));
    }

    #[test]
    fn from_patterns() {
        let o = one(&format!(r#"from="127.0.0.0/8" {KEY}"#));
        assert!(o.from_allows(Some("127.0.0.1".parse().unwrap())));
        assert!(!o.from_allows(Some("192.0.2.1".parse().unwrap())));
        let o = one(&format!(r#"from="192.0.2.*,!192.0.2.13,::1" {KEY}"#));
        assert!(o.from_allows(Some("192.0.2.12".parse().unwrap())));
        assert!(!o.from_allows(Some("192.0.2.13".parse().unwrap())));
        assert!(o.from_allows(Some("::1".parse().unwrap())));
        assert!(!o.from_allows(Some("127.0.0.1".parse().unwrap())));
    }
}
