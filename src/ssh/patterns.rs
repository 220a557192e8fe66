//! Host/IP pattern matching for `from=` (authorized_keys) and CIDR lists for the certificate
//! critical option `source-address`, with OpenSSH semantics and no DNS: the peer is only ever
//! known by its IP address.
//!
//! `from=` takes a PATTERNS list as in ssh_config(5): comma-separated entries, each optionally
//! negated with `!`; an entry that is an address or `addr/len` network matches by address, any
//! other entry is a `*`/`?` wildcard pattern matched (case-insensitively) against the textual
//! address. A matching negated entry denies outright; otherwise at least one positive entry must
//! match.

use std::net::IpAddr;

/// An address or network (`192.0.2.0/24`, `2001:db8::/32`, `10.1.2.3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parse `addr` or `addr/len`.
    ///
    /// `Ok(None)` when the text is not an address at all (it may be a wildcard pattern); `Err`
    /// when it is an address but the mask is not a number in range or leaves host bits set
    /// (OpenSSH: "inconsistent mask length"), which OpenSSH treats as a match error.
    pub fn parse(text: &str) -> Result<Option<Cidr>, String> {
        let (addr, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let Ok(addr) = addr.parse::<IpAddr>() else {
            return Ok(None);
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max && !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("invalid mask length in {text:?}")),
            },
        };
        let cidr = Cidr { addr, len };
        if cidr.masked(addr) != addr {
            return Err(format!("inconsistent mask length for network {text:?}"));
        }
        Ok(Some(cidr))
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                IpAddr::V6((bits & mask).into())
            }
        }
    }

    /// Is `ip` inside this network? Families must agree (IPv4-mapped IPv6 peers are
    /// normalised to IPv4 first, as OpenSSH does).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == self.addr
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `*` matches any run of characters, `?` exactly one; ASCII case-insensitive.
pub fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi].eq_ignore_ascii_case(&t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[derive(Debug, Clone)]
enum Pattern {
    Net(Cidr),
    Wild(String),
}

/// A parsed `from=` pattern list.
#[derive(Debug, Clone)]
pub struct HostPatterns {
    entries: Vec<(bool, Pattern)>,
}

impl HostPatterns {
    /// Parse a comma-separated pattern list. Empty entries and malformed networks are errors
    /// (OpenSSH would refuse the key at login time; we refuse the line when it is read).
    pub fn parse(list: &str) -> Result<HostPatterns, String> {
        let mut entries = vec![];
        for raw in list.split(',') {
            let (negated, body) = match raw.strip_prefix('!') {
                Some(b) => (true, b),
                None => (false, raw),
            };
            if body.is_empty() {
                return Err(format!("empty entry in pattern list {list:?}"));
            }
            let pattern = match Cidr::parse(body)? {
                Some(cidr) => Pattern::Net(cidr),
                None => Pattern::Wild(body.to_string()),
            };
            entries.push((negated, pattern));
        }
        Ok(HostPatterns { entries })
    }

    /// Does the peer at `ip` satisfy the list? A matching negated entry denies; otherwise a
    /// matching positive entry is required.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let text = ip.to_string();
        let mut positive = false;
        for (negated, pattern) in &self.entries {
            let hit = match pattern {
                Pattern::Net(cidr) => cidr.contains(ip),
                Pattern::Wild(w) => wildcard_match(w, &text),
            };
            if hit {
                if *negated {
                    return false;
                }
                positive = true;
            }
        }
        positive
    }
}

/// A certificate `source-address` list: comma-separated addresses or networks, nothing else
/// (no wildcards, no negation); any malformed entry makes the whole list invalid.
pub fn parse_cidr_list(list: &str) -> Result<Vec<Cidr>, String> {
    list.split(',')
        .map(|entry| {
            if entry.is_empty()
                || entry.len() > 49
                || !entry
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'/'))
            {
                return Err(format!("invalid address {entry:?}"));
            }
            Cidr::parse(entry)?.ok_or_else(|| format!("invalid address {entry:?}"))
        })
        .collect()
}

/// Is `ip` inside any network of the list?
pub fn cidr_list_allows(list: &[Cidr], ip: IpAddr) -> bool {
    list.iter().any(|c| c.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("*", "10.0.0.1"));
        assert!(wildcard_match("10.0.0.?", "10.0.0.1"));
        assert!(!wildcard_match("10.0.0.?", "10.0.0.12"));
        assert!(wildcard_match("10.*.1", "10.0.0.1"));
        assert!(wildcard_match("10.*.1", "10..1"));
        assert!(!wildcard_match("10.*.1", "10.1"));
        assert!(!wildcard_match("10.*.1", "10.0.0.2"));
        assert!(wildcard_match("FE80::*", "fe80::1"));
        assert!(wildcard_match("a*b*c", "axxbyyc"));
        assert!(!wildcard_match("a*b*c", "axxbyy"));
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(Cidr::parse("host.example").unwrap(), None);
        assert_eq!(Cidr::parse("10.0.0.*").unwrap(), None);
        assert!(Cidr::parse("10.0.0.1/8").is_err(), "host bits set");
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0.0/").is_err());
        assert!(Cidr::parse("10.0.0.0/+8").is_err());
        let net = Cidr::parse("10.0.0.0/8").unwrap().unwrap();
        assert!(net.contains(ip("10.255.1.2")));
        assert!(
            net.contains(ip("::ffff:10.1.2.3")),
            "mapped v4 is normalised"
        );
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(!net.contains(ip("::1")));
        let v6 = Cidr::parse("2001:db8::/32").unwrap().unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")));
        assert!(!v6.contains(ip("2001:db9::5")));
        let any = Cidr::parse("0.0.0.0/0").unwrap().unwrap();
        assert!(any.contains(ip("203.0.113.9")));
        let host = Cidr::parse("127.0.0.1").unwrap().unwrap();
        assert!(host.contains(ip("127.0.0.1")) && !host.contains(ip("127.0.0.2")));
    }

    #[test]
    fn host_patterns() {
        let p = HostPatterns::parse("127.0.0.0/8,!127.0.0.2,192.168.1.*").unwrap();
        assert!(p.allows(ip("127.0.0.1")));
        assert!(!p.allows(ip("127.0.0.2")), "negated entry denies");
        assert!(p.allows(ip("192.168.1.77")));
        assert!(!p.allows(ip("192.168.2.1")));
        // A negation alone never allows anything.
        let p = HostPatterns::parse("!10.0.0.1").unwrap();
        assert!(!p.allows(ip("10.0.0.2")));
        // Negation wins regardless of order.
        let p = HostPatterns::parse("*,!10.*").unwrap();
        assert!(p.allows(ip("192.0.2.1")));
        assert!(!p.allows(ip("10.9.9.9")));
        // Hostname patterns never match an IP-only peer.
        let p = HostPatterns::parse("*.example.com").unwrap();
        assert!(!p.allows(ip("10.0.0.1")));
        let p = HostPatterns::parse("::1,fe80::*").unwrap();
        assert!(p.allows(ip("::1")) && p.allows(ip("fe80::abcd")) && !p.allows(ip("::2")));
        assert!(HostPatterns::parse("10.0.0.1,,10.0.0.2").is_err());
        assert!(HostPatterns::parse("!").is_err());
        assert!(HostPatterns::parse("10.0.0.1/8").is_err());
    }

    #[test]
    fn cidr_lists() {
        let l = parse_cidr_list("10.0.0.0/8,192.0.2.7,2001:db8::/48").unwrap();
        assert!(cidr_list_allows(&l, ip("10.1.1.1")));
        assert!(cidr_list_allows(&l, ip("192.0.2.7")));
        assert!(!cidr_list_allows(&l, ip("192.0.2.8")));
        assert!(cidr_list_allows(&l, ip("2001:db8:0:1::1")));
        assert!(parse_cidr_list("10.0.0.*").is_err());
        assert!(parse_cidr_list("!10.0.0.1").is_err());
        assert!(parse_cidr_list("").is_err());
        assert!(parse_cidr_list("10.0.0.1/8").is_err());
        assert!(parse_cidr_list("10.0.0.1,").is_err());
    }
}
