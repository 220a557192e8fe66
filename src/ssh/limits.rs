//! Pre-authentication limits: MaxStartups-style random early drop, a per-source cap on
//! connections still authenticating, and per-source penalties (OpenSSH's PerSourcePenalties).
//!
//! The point of all three is that a flood of connections that never authenticate (a scanner, a
//! password-guessing bot, a slowloris holding sockets open) must not lock hypervisors out of
//! the front-end:
//!
//! - [`Startups`] counts connections between accept and successful authentication. Past
//!   `start` of them, new ones are dropped with a probability rising linearly from `rate` % to
//!   100 % at `full` (sshd's MaxStartups). The drop is decided twice, on the source's own count
//!   and on the total, and in the total one source counts for at most `per_source` (below
//!   `start`): a host that floods only raises its own drop rate and cannot lock others out.
//! - [`Penalties`] remembers sources whose connections failed to authenticate, gave up without
//!   trying or ran out of login grace time, and refuses them for a period that grows with each
//!   offence up to a maximum. Loopback and `--penalty-exempt` networks are never penalised.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::ssh::patterns::Cidr;

/// `start:rate:full` as in sshd_config's MaxStartups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MaxStartups {
    pub start: usize,
    pub rate: u32,
    pub full: usize,
}

impl Default for MaxStartups {
    fn default() -> Self {
        MaxStartups {
            start: 10,
            rate: 30,
            full: 100,
        }
    }
}

impl MaxStartups {
    /// Parse `start:rate:full` or a plain `N` (hard limit, no early drop).
    pub fn parse(text: &str) -> Result<MaxStartups> {
        let num = |s: &str| -> Result<usize> {
            match s.parse::<usize>() {
                Ok(n) => Ok(n),
                Err(_) => bail!("--max-startups {text:?}: {s:?} is not a number"),
            }
        };
        let parts: Vec<&str> = text.split(':').collect();
        let m = match parts.as_slice() {
            [n] => {
                let n = num(n)?;
                MaxStartups {
                    start: n,
                    rate: 100,
                    full: n,
                }
            }
            [start, rate, full] => MaxStartups {
                start: num(start)?,
                rate: u32::try_from(num(rate)?).unwrap_or(u32::MAX),
                full: num(full)?,
            },
            _ => bail!("--max-startups {text:?}: expected START:RATE:FULL (e.g. 10:30:100) or N"),
        };
        if m.start == 0 || m.full < m.start || m.rate == 0 || m.rate > 100 {
            bail!(
                "--max-startups {text:?}: need 1 <= START <= FULL and 1 <= RATE <= 100 \
                 (e.g. 10:30:100)"
            );
        }
        Ok(m)
    }

    /// Probability (per mille) that a new connection is dropped while `pending` others are
    /// still authenticating.
    fn drop_per_mille(&self, pending: usize) -> u32 {
        if pending < self.start {
            0
        } else if pending >= self.full {
            1000
        } else {
            // Linear from `rate` % at `start` to 100 % at `full`, as sshd does.
            let span = (self.full - self.start) as u64;
            let above = (pending - self.start) as u64;
            let rate = u64::from(self.rate) * 10;
            (rate + (1000 - rate) * above / span) as u32
        }
    }
}

impl fmt::Display for MaxStartups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.start, self.rate, self.full)
    }
}

/// Why a new connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Early drop on the total of connections authenticating.
    MaxStartups,
    /// Early drop on the source's own connections authenticating.
    PerSource,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::MaxStartups => "max_startups",
            Refusal::PerSource => "per_source_startups",
        }
    }
}

#[derive(Default)]
struct StartupCounts {
    total: usize,
    /// Σ min(count of a source, per_source): what the global drop decision sees.
    weighted: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Connections between accept and authentication.
pub struct Startups {
    policy: MaxStartups,
    per_source: usize,
    counts: Mutex<StartupCounts>,
}

impl Startups {
    pub fn new(policy: MaxStartups, per_source: usize) -> Arc<Startups> {
        Arc::new(Startups {
            policy,
            per_source,
            counts: Mutex::new(StartupCounts::default()),
        })
    }

    /// Admit a new connection from `source`, or say why not. `roll` is a uniform random number
    /// in 0..1000 (a parameter so tests can be exact).
    pub fn admit(self: &Arc<Self>, source: IpAddr, roll: u32) -> Result<StartupTicket, Refusal> {
        let source = source.to_canonical();
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mine = counts.by_source.get(&source).copied().unwrap_or(0);
        if roll < self.policy.drop_per_mille(mine) {
            return Err(Refusal::PerSource);
        }
        if roll < self.policy.drop_per_mille(counts.weighted) {
            return Err(Refusal::MaxStartups);
        }
        counts.total += 1;
        if mine < self.per_source {
            counts.weighted += 1;
        }
        *counts.by_source.entry(source).or_insert(0) += 1;
        Ok(StartupTicket {
            startups: self.clone(),
            source,
        })
    }

    /// Connections currently authenticating.
    pub fn pending(&self) -> usize {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }

    fn release(&self, source: IpAddr) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let Some(n) = counts.by_source.get_mut(&source) else {
            return;
        };
        *n -= 1;
        let left = *n;
        if left == 0 {
            counts.by_source.remove(&source);
        }
        counts.total = counts.total.saturating_sub(1);
        if left < self.per_source {
            counts.weighted = counts.weighted.saturating_sub(1);
        }
    }
}

/// Held by a connection until it authenticates or ends.
pub struct StartupTicket {
    startups: Arc<Startups>,
    source: IpAddr,
}

impl Drop for StartupTicket {
    fn drop(&mut self) {
        self.startups.release(self.source);
    }
}

impl fmt::Debug for StartupTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StartupTicket({})", self.source)
    }
}

/// What a source did to earn a penalty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offence {
    /// The connection tried to authenticate and failed (bad key, user not allowed).
    AuthFailed,
    /// The connection ended without trying to authenticate (scanners, port probes).
    NoAuth,
    /// The connection ran out of login grace time.
    GraceExceeded,
}

/// Penalty durations and bounds; the defaults are OpenSSH 9.8's.
#[derive(Clone, Debug, Serialize)]
pub struct PenaltyPolicy {
    pub enabled: bool,
    #[serde(skip)]
    pub auth_failed: Duration,
    #[serde(skip)]
    pub no_auth: Duration,
    #[serde(skip)]
    pub grace_exceeded: Duration,
    /// A source is refused only once its accrued penalty reaches this.
    #[serde(skip)]
    pub min: Duration,
    /// Penalties accrue up to this.
    #[serde(skip)]
    pub max: Duration,
    /// Sources tracked at most; past this new offenders are let through (fail open, as
    /// OpenSSH's default `overflow:permissive`), so the table cannot grow without bound.
    #[serde(skip)]
    pub max_sources: usize,
    /// Networks never penalised.
    pub exempt: Vec<Cidr>,
}

impl Default for PenaltyPolicy {
    fn default() -> Self {
        PenaltyPolicy {
            enabled: true,
            auth_failed: Duration::from_secs(5),
            no_auth: Duration::from_secs(1),
            grace_exceeded: Duration::from_secs(10),
            min: Duration::from_secs(15),
            max: Duration::from_secs(600),
            max_sources: 65536,
            exempt: default_exempt(),
        }
    }
}

/// Loopback: the pod's own processes and probes.
pub fn default_exempt() -> Vec<Cidr> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|c| Cidr::parse(c).ok().flatten())
        .collect()
}

#[derive(Debug, Clone, Copy)]
struct Penalty {
    expires: Instant,
    active: bool,
}

/// Per-source penalty table.
pub struct Penalties {
    policy: PenaltyPolicy,
    table: Mutex<HashMap<IpAddr, Penalty>>,
}

impl fmt::Debug for Penalties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Penalties")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Penalties {
    pub fn new(policy: PenaltyPolicy) -> Arc<Penalties> {
        Arc::new(Penalties {
            policy,
            table: Mutex::new(HashMap::new()),
        })
    }

    fn exempt(&self, ip: IpAddr) -> bool {
        !self.policy.enabled || self.policy.exempt.iter().any(|c| c.contains(ip))
    }

    /// Is `ip` currently refused?
    pub fn refused(&self, ip: IpAddr, now: Instant) -> bool {
        if self.exempt(ip) {
            return false;
        }
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table
            .get(&ip.to_canonical())
            .is_some_and(|p| p.active && p.expires > now)
    }

    /// Record an offence by `ip`. Returns the remaining penalty if the source is now refused.
    pub fn penalise(&self, ip: IpAddr, offence: Offence, now: Instant) -> Option<Duration> {
        if self.exempt(ip) {
            return None;
        }
        let add = match offence {
            Offence::AuthFailed => self.policy.auth_failed,
            Offence::NoAuth => self.policy.no_auth,
            Offence::GraceExceeded => self.policy.grace_exceeded,
        };
        let ip = ip.to_canonical();
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() >= self.policy.max_sources && !table.contains_key(&ip) {
            table.retain(|_, p| p.expires > now);
            if table.len() >= self.policy.max_sources {
                return None;
            }
        }
        let entry = table.entry(ip).or_insert(Penalty {
            expires: now,
            active: false,
        });
        // An expired penalty starts over; a live one grows, up to `max` from now.
        let base = entry.expires.max(now);
        entry.expires = (base + add).min(now + self.policy.max);
        let remaining = entry.expires - now;
        if remaining >= self.policy.min {
            entry.active = true;
        }
        entry.active.then_some(remaining)
    }

    /// Sources refused right now (for the metrics gauge).
    pub fn active(&self, now: Instant) -> usize {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table
            .values()
            .filter(|p| p.active && p.expires > now)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn max_startups_parses_like_sshd() {
        assert_eq!(
            MaxStartups::parse("10:30:100").unwrap(),
            MaxStartups::default()
        );
        let hard = MaxStartups::parse("20").unwrap();
        assert_eq!((hard.start, hard.rate, hard.full), (20, 100, 20));
        for bad in [
            "",
            "a",
            "10:30",
            "10:0:100",
            "10:101:100",
            "50:30:10",
            "0",
            "1:2:3:4",
        ] {
            assert!(MaxStartups::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn drop_probability_rises_linearly() {
        let m = MaxStartups::default();
        assert_eq!(m.drop_per_mille(0), 0);
        assert_eq!(m.drop_per_mille(9), 0);
        assert_eq!(m.drop_per_mille(10), 300);
        assert_eq!(m.drop_per_mille(55), 650);
        assert_eq!(m.drop_per_mille(100), 1000);
        assert_eq!(m.drop_per_mille(5000), 1000);
    }

    #[test]
    fn one_flooding_source_only_raises_its_own_drop_rate() {
        let s = Startups::new(MaxStartups::parse("4:50:6").unwrap(), 3);
        let a = ip("192.0.2.1");
        let b = ip("192.0.2.2");
        let mut held = vec![];
        // `a` alone: free below start, early drop from start, refused at full.
        for _ in 0..4 {
            held.push(s.admit(a, 0).unwrap());
        }
        assert_eq!(s.admit(a, 499).unwrap_err(), Refusal::PerSource);
        held.push(s.admit(a, 500).unwrap());
        held.push(s.admit(a, 998).unwrap());
        assert_eq!(s.admit(a, 999).unwrap_err(), Refusal::PerSource);
        // IPv4-mapped IPv6 is the same source.
        assert_eq!(
            s.admit(ip("::ffff:192.0.2.1"), 999).unwrap_err(),
            Refusal::PerSource
        );
        assert_eq!(s.pending(), 6);
        // `a` weighs 3 in the total, so `b` still gets in whatever the roll.
        held.push(s.admit(b, 0).unwrap());
        // Now the total weighs 4 = start: new sources are early-dropped.
        assert_eq!(
            s.admit(ip("192.0.2.3"), 0).unwrap_err(),
            Refusal::MaxStartups
        );
        assert!(s.admit(ip("192.0.2.3"), 999).is_ok());
        held.clear();
        assert_eq!(s.pending(), 0);
        for _ in 0..3 {
            held.push(s.admit(b, 0).unwrap());
        }
        assert!(s.admit(a, 0).is_ok());
    }

    #[test]
    fn penalties_accrue_to_min_then_refuse_until_expiry() {
        let p = Penalties::new(PenaltyPolicy {
            exempt: vec![],
            ..Default::default()
        });
        let src = ip("198.51.100.7");
        let t0 = Instant::now();
        assert_eq!(p.penalise(src, Offence::AuthFailed, t0), None);
        assert_eq!(p.penalise(src, Offence::AuthFailed, t0), None);
        assert!(!p.refused(src, t0));
        assert_eq!(
            p.penalise(src, Offence::AuthFailed, t0),
            Some(Duration::from_secs(15))
        );
        assert!(p.refused(src, t0));
        assert!(!p.refused(ip("198.51.100.8"), t0));
        assert_eq!(p.active(t0), 1);
        assert!(!p.refused(src, t0 + Duration::from_secs(16)));
        assert_eq!(p.active(t0 + Duration::from_secs(16)), 0);
        // Capped at max.
        for _ in 0..1000 {
            p.penalise(src, Offence::GraceExceeded, t0);
        }
        assert!(p.refused(src, t0 + Duration::from_secs(599)));
        assert!(!p.refused(src, t0 + Duration::from_secs(601)));
    }

    #[test]
    fn exempt_and_disabled_sources_are_never_refused() {
        let p = Penalties::new(PenaltyPolicy::default());
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(
                p.penalise(ip("127.0.0.1"), Offence::GraceExceeded, t0),
                None
            );
            assert_eq!(p.penalise(ip("::1"), Offence::GraceExceeded, t0), None);
        }
        assert!(!p.refused(ip("127.0.0.1"), t0));
        let off = Penalties::new(PenaltyPolicy {
            enabled: false,
            exempt: vec![],
            ..Default::default()
        });
        for _ in 0..10 {
            off.penalise(ip("198.51.100.7"), Offence::GraceExceeded, t0);
        }
        assert!(!off.refused(ip("198.51.100.7"), t0));
    }

    #[test]
    fn the_table_is_bounded() {
        let p = Penalties::new(PenaltyPolicy {
            exempt: vec![],
            max_sources: 4,
            ..Default::default()
        });
        let t0 = Instant::now();
        for i in 0..10u8 {
            for _ in 0..3 {
                p.penalise(IpAddr::from([203, 0, 113, i]), Offence::AuthFailed, t0);
            }
        }
        assert_eq!(p.active(t0), 4);
        assert!(!p.refused(IpAddr::from([203, 0, 113, 9]), t0));
        // Expired entries make room again.
        let later = t0 + Duration::from_secs(700);
        for _ in 0..3 {
            p.penalise(IpAddr::from([203, 0, 113, 9]), Offence::AuthFailed, later);
        }
        assert!(p.refused(IpAddr::from([203, 0, 113, 9]), later));
    }
}
