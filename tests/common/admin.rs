//! Talking to the admin endpoint: a minimal HTTP GET and a parser for the Prometheus /
//! OpenMetrics text exposition, so tests compare counters by name and labels.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::Sidecar;

/// Minimal HTTP/1.0 GET; returns (status, body).
pub fn http_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(admin).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n").unwrap();
    let mut resp = vec![];
    s.read_to_end(&mut resp).unwrap();
    let resp = String::from_utf8(resp).expect("UTF-8 response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (code, body.to_string())
}

/// One sample of the Prometheus/OpenMetrics text exposition.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = vec![];
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("metric name");
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let chars = r.char_indices();
            let mut end = None;
            let (mut key, mut val, mut in_val, mut esc) =
                (String::new(), String::new(), false, false);
            for (i, c) in chars {
                if in_val {
                    match (esc, c) {
                        (true, 'n') => {
                            val.push('\n');
                            esc = false;
                        }
                        (true, c) => {
                            val.push(c);
                            esc = false;
                        }
                        (false, '\\') => esc = true,
                        (false, '"') => {
                            labels.insert(std::mem::take(&mut key), std::mem::take(&mut val));
                            in_val = false;
                        }
                        (false, c) => val.push(c),
                    }
                } else {
                    match c {
                        '}' => {
                            end = Some(i);
                            break;
                        }
                        ',' | '=' => {}
                        '"' => in_val = true,
                        c => key.push(c),
                    }
                }
            }
            let end = end.expect("closing brace");
            rest = &r[end + 1..];
        }
        let value = rest.split_whitespace().next().expect("value");
        let value = value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Scrape the sidecar's `/metrics`.
pub fn metrics(sc: &Sidecar) -> Vec<Sample> {
    let (code, body) = http_get(sc.admin.expect("admin address"), "/metrics");
    assert_eq!(code, 200);
    parse_exposition(&body)
}

/// Sum of the samples named `name` whose labels include `want`.
pub fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// [`value`] of a fresh scrape.
pub fn scrape_value(sc: &Sidecar, name: &str, want: &[(&str, &str)]) -> f64 {
    value(&metrics(sc), name, want)
}
