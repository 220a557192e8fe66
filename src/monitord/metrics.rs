//! Counters of the relay. Every label combination is created up front and the hot path holds
//! plain `Counter` handles in arrays, so counting a message is one atomic add (no map lookup).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::wire::{MsgType, Reject, Status, Transport};

/// Outcome of forwarding one message upstream (the `result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forward {
    /// Delivered (UDP: handed to the kernel; TCP: written and closed).
    Ok,
    /// UDP send failed (upstream refused or unreachable); TCP attempt failed and will be retried.
    Error,
    /// UDP send buffer full, or the TCP retry queue is full: the message is lost.
    Dropped,
    /// A queued TCP message was replaced by a newer one for the same host and type.
    Superseded,
}

impl Forward {
    pub const ALL: [Forward; 4] = [
        Forward::Ok,
        Forward::Error,
        Forward::Dropped,
        Forward::Superseded,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Forward::Ok => "ok",
            Forward::Error => "error",
            Forward::Dropped => "dropped",
            Forward::Superseded => "superseded",
        }
    }
}

type L2 = [(&'static str, &'static str); 2];
type L3 = [(&'static str, &'static str); 3];
type L1 = [(&'static str, &'static str); 1];

#[derive(Debug)]
pub struct Metrics {
    messages: Vec<Counter>,
    rejected: Vec<Counter>,
    forwarded: Vec<Counter>,
    out_of_order: Vec<Counter>,
    payload_errors: Vec<Counter>,
    pub untracked_hosts: Counter,
    pub tcp_connections: Gauge,
    pub tcp_queue: Gauge,
}

impl Metrics {
    /// Unregistered metrics (unit tests).
    pub fn new_unregistered() -> Metrics {
        Self::register(&mut Registry::default())
    }

    pub fn register(registry: &mut Registry) -> Metrics {
        let messages_f = Family::<L3, Counter>::default();
        let rejected_f = Family::<L2, Counter>::default();
        let forwarded_f = Family::<L2, Counter>::default();
        let ooo_f = Family::<L1, Counter>::default();
        let perr_f = Family::<L1, Counter>::default();
        let mut messages = Vec::new();
        let mut rejected = Vec::new();
        let mut forwarded = Vec::new();
        for t in Transport::ALL {
            for ty in MsgType::ALL {
                for s in Status::ALL {
                    let labels = [
                        ("transport", t.as_str()),
                        ("type", ty.as_str()),
                        ("status", s.as_str()),
                    ];
                    messages.push(messages_f.get_or_create(&labels).clone());
                }
            }
            for r in Reject::ALL {
                rejected.push(
                    rejected_f
                        .get_or_create(&[("transport", t.as_str()), ("reason", r.as_str())])
                        .clone(),
                );
            }
            for f in Forward::ALL {
                forwarded.push(
                    forwarded_f
                        .get_or_create(&[("transport", t.as_str()), ("result", f.as_str())])
                        .clone(),
                );
            }
        }
        let out_of_order = MsgType::ALL
            .iter()
            .map(|ty| ooo_f.get_or_create(&[("type", ty.as_str())]).clone())
            .collect();
        let payload_errors = MsgType::ALL
            .iter()
            .map(|ty| perr_f.get_or_create(&[("type", ty.as_str())]).clone())
            .collect();
        let m = Metrics {
            messages,
            rejected,
            forwarded,
            out_of_order,
            payload_errors,
            untracked_hosts: Counter::default(),
            tcp_connections: Gauge::default(),
            tcp_queue: Gauge::default(),
        };
        registry.register(
            "monitord_messages",
            "Well-formed monitord messages received",
            messages_f,
        );
        registry.register(
            "monitord_rejected",
            "Monitord messages refused, by reason",
            rejected_f,
        );
        registry.register(
            "monitord_forwarded",
            "Monitord messages forwarded upstream, by result",
            forwarded_f,
        );
        registry.register(
            "monitord_out_of_order",
            "Messages older than the last one seen for the same host and type",
            ooo_f,
        );
        registry.register(
            "monitord_payload_errors",
            "Well-formed messages whose decoded payload is not a valid template (still forwarded)",
            perr_f,
        );
        registry.register(
            "monitord_untracked_hosts",
            "Messages from hosts not tracked because the host table is full",
            m.untracked_hosts.clone(),
        );
        registry.register(
            "monitord_tcp_connections",
            "Open monitord TCP connections",
            m.tcp_connections.clone(),
        );
        registry.register(
            "monitord_tcp_queue",
            "TCP messages waiting for (or in) delivery upstream",
            m.tcp_queue.clone(),
        );
        m
    }

    pub fn message(&self, t: Transport, ty: MsgType, s: Status) {
        let i = (t.index() * MsgType::ALL.len() + ty.index()) * Status::ALL.len() + s.index();
        self.messages[i].inc();
    }

    pub fn reject(&self, t: Transport, r: Reject) {
        self.rejected[t.index() * Reject::ALL.len() + r.index()].inc();
    }

    pub fn forward(&self, t: Transport, f: Forward) {
        self.forwarded[t.index() * Forward::ALL.len() + f as usize].inc();
    }

    pub fn out_of_order(&self, ty: MsgType) {
        self.out_of_order[ty.index()].inc();
    }

    pub fn payload_error(&self, ty: MsgType) {
        self.payload_errors[ty.index()].inc();
    }

    /// Current value (tests).
    pub fn rejected(&self, t: Transport, r: Reject) -> u64 {
        self.rejected[t.index() * Reject::ALL.len() + r.index()].get()
    }

    pub fn messages(&self, t: Transport, ty: MsgType, s: Status) -> u64 {
        let i = (t.index() * MsgType::ALL.len() + ty.index()) * Status::ALL.len() + s.index();
        self.messages[i].get()
    }

    pub fn forwarded(&self, t: Transport, f: Forward) -> u64 {
        self.forwarded[t.index() * Forward::ALL.len() + f as usize].get()
    }
}
