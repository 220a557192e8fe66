//! Per-host monitord state: what each hypervisor last reported, bounded in size.
//!
//! The table is updated from decoded messages (see [`Update::from_message`]), shown as JSON on
//! `/api/v1/hosts`, and exported as per-host gauges by [`HostCollector`] at scrape time (so the
//! hot path never touches a metric family; label sets are bounded by `max_hosts`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use serde_json::{Value as Json, json};

use super::payload::{self, Template};
use super::wire::{Message, MsgType, Status};

/// Longest peer string kept (host name, version, FAILURE text).
const MAX_TEXT: usize = 1024;

/// VM states counted from STATE_VM (kvm.rb STATE_MAP); anything else is `OTHER`.
const VM_STATES: [&str; 6] = [
    "RUNNING",
    "SUSPENDED",
    "FAILURE",
    "POWEROFF",
    "UNKNOWN",
    "OTHER",
];

#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    epoch: i64,
    /// Newest non-zero epoch, the out-of-order reference (`TS == 0` skips the check).
    max_epoch: i64,
    received: f64,
}

/// MONITOR_HOST usage gauges.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub free_cpu: Option<f64>,
    pub used_cpu: Option<f64>,
    pub free_memory: Option<f64>,
    pub used_memory: Option<f64>,
    pub net_rx: Option<f64>,
    pub net_tx: Option<f64>,
}

/// SYSTEM_HOST static facts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct System {
    pub hostname: Option<String>,
    pub hypervisor: Option<String>,
    pub total_cpu: Option<f64>,
    pub total_memory: Option<f64>,
    pub version: Option<String>,
}

#[derive(Clone, Debug)]
struct Failure {
    ty: MsgType,
    text: String,
    received: f64,
}

#[derive(Clone, Debug)]
struct Host {
    seen: [Option<Seen>; 6],
    messages: u64,
    out_of_order: u64,
    last_type: MsgType,
    last_status: Status,
    last_received: f64,
    last_failure: Option<Failure>,
    usage: Option<Usage>,
    system: Option<System>,
    vm_states: Option<[u64; 6]>,
    vms_monitored: Option<u64>,
}

/// What a message changes beyond last-seen, extracted before taking the table lock.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    None,
    Usage(Usage),
    System(System),
    /// STATE_VM: number of VMs by state (indexes of `VM_STATES`).
    VmStates([u64; 6]),
    /// MONITOR_VM: number of VMs reported.
    VmsMonitored(u64),
    Failure(String),
}

fn text(s: &str) -> String {
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn num(t: &Template<'_>, k: &str) -> Option<f64> {
    t.single(k)?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
}

impl Update {
    /// Derive the state change of a decoded message. `Err` means the payload is not a valid
    /// template (counted by the caller; last-seen is still recorded).
    pub fn from_message(m: &Message<'_>) -> Result<Update, payload::PayloadError> {
        if m.status == Status::Failure {
            return Ok(Update::Failure(text(
                String::from_utf8_lossy(m.payload).trim(),
            )));
        }
        match m.ty {
            MsgType::BeaconHost => Ok(Update::None),
            MsgType::MonitorHost => {
                let t = payload::parse(m.payload)?;
                Ok(Update::Usage(Usage {
                    free_cpu: num(&t, "FREECPU"),
                    used_cpu: num(&t, "USEDCPU"),
                    free_memory: num(&t, "FREEMEMORY"),
                    used_memory: num(&t, "USEDMEMORY"),
                    net_rx: num(&t, "NETRX"),
                    net_tx: num(&t, "NETTX"),
                }))
            }
            MsgType::SystemHost => {
                let t = payload::parse(m.payload)?;
                Ok(Update::System(System {
                    hostname: t.single("HOSTNAME").map(text),
                    hypervisor: t.single("HYPERVISOR").map(text),
                    total_cpu: num(&t, "TOTALCPU"),
                    total_memory: num(&t, "TOTALMEMORY"),
                    version: t.single("VERSION").map(text),
                }))
            }
            MsgType::StateVm => {
                let t = payload::parse(m.payload)?;
                let mut counts = [0u64; 6];
                for vm in t.vectors("VM") {
                    let state = vm.get("STATE").unwrap_or("");
                    let i = VM_STATES[..5]
                        .iter()
                        .position(|s| s.eq_ignore_ascii_case(state))
                        .unwrap_or(5);
                    counts[i] += 1;
                }
                Ok(Update::VmStates(counts))
            }
            MsgType::MonitorVm => {
                // Only the count is kept: the nested per-VM MONITOR templates are onemonitord's
                // business, and decoding them would double the relay's cost per message.
                let t = payload::parse(m.payload)?;
                Ok(Update::VmsMonitored(t.vectors("VM").count() as u64))
            }
            MsgType::ExecVm => {
                payload::parse(m.payload)?;
                Ok(Update::None)
            }
        }
    }
}

/// Result of recording a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    Updated,
    /// Older than the newest epoch seen for that host and type; state unchanged.
    OutOfOrder,
    /// New host while the table is full; not tracked.
    Untracked,
}

/// Host table keyed by host id, bounded in size.
pub struct HostTable {
    max_hosts: usize,
    hosts: Mutex<HashMap<i32, Host>>,
}

impl std::fmt::Debug for HostTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTable")
            .field("max_hosts", &self.max_hosts)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn rfc3339(t: f64) -> Json {
    let nanos = (t * 1e9) as i128;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Json::Null, Json::String)
}

impl HostTable {
    pub fn new(max_hosts: usize) -> HostTable {
        HostTable {
            max_hosts,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Host>> {
        // A poisoned lock only means another thread panicked mid-update; the data is plain.
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Record a message received now.
    pub fn record(
        &self,
        ty: MsgType,
        status: Status,
        host_id: i32,
        epoch: i64,
        update: Update,
    ) -> Recorded {
        self.record_at(ty, status, host_id, epoch, update, unix_now())
    }

    pub fn record_at(
        &self,
        ty: MsgType,
        status: Status,
        host_id: i32,
        epoch: i64,
        update: Update,
        now: f64,
    ) -> Recorded {
        let mut hosts = self.lock();
        let len = hosts.len();
        let host = match hosts.entry(host_id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                if len >= self.max_hosts {
                    return Recorded::Untracked;
                }
                e.insert(Host {
                    seen: [None; 6],
                    messages: 0,
                    out_of_order: 0,
                    last_type: ty,
                    last_status: status,
                    last_received: now,
                    last_failure: None,
                    usage: None,
                    system: None,
                    vm_states: None,
                    vms_monitored: None,
                })
            }
        };
        host.messages += 1;
        let seen = host.seen[ty.index()].get_or_insert_with(Seen::default);
        if epoch != 0 && seen.max_epoch != 0 && epoch < seen.max_epoch {
            host.out_of_order += 1;
            return Recorded::OutOfOrder;
        }
        seen.epoch = epoch;
        seen.max_epoch = seen.max_epoch.max(epoch);
        seen.received = now;
        host.last_type = ty;
        host.last_status = status;
        host.last_received = now;
        match update {
            Update::None => {}
            Update::Usage(u) => host.usage = Some(u),
            Update::System(s) => host.system = Some(s),
            Update::VmStates(c) => host.vm_states = Some(c),
            Update::VmsMonitored(n) => host.vms_monitored = Some(n),
            Update::Failure(text) => {
                host.last_failure = Some(Failure {
                    ty,
                    text,
                    received: now,
                })
            }
        }
        Recorded::Updated
    }

    /// JSON view for `/api/v1/hosts`, hosts sorted by id.
    pub fn to_json(&self) -> Json {
        let hosts = self.lock();
        let mut ids: Vec<_> = hosts.keys().copied().collect();
        ids.sort_unstable();
        let list: Vec<Json> = ids
            .iter()
            .filter_map(|id| hosts.get(id).map(|h| host_json(*id, h)))
            .collect();
        json!({ "max_hosts": self.max_hosts, "count": list.len(), "hosts": list })
    }
}

fn host_json(id: i32, h: &Host) -> Json {
    let mut last_seen = serde_json::Map::new();
    for ty in MsgType::ALL {
        if let Some(s) = &h.seen[ty.index()] {
            if s.received == 0.0 {
                continue;
            }
            last_seen.insert(
                ty.as_str().into(),
                json!({ "epoch": s.epoch, "received": s.received, "received_at": rfc3339(s.received) }),
            );
        }
    }
    let usage = h.usage.as_ref().map(|u| {
        json!({
            "FREECPU": u.free_cpu, "USEDCPU": u.used_cpu,
            "FREEMEMORY": u.free_memory, "USEDMEMORY": u.used_memory,
            "NETRX": u.net_rx, "NETTX": u.net_tx,
        })
    });
    let system = h.system.as_ref().map(|s| {
        json!({
            "HOSTNAME": s.hostname, "HYPERVISOR": s.hypervisor, "TOTALCPU": s.total_cpu,
            "TOTALMEMORY": s.total_memory, "VERSION": s.version,
        })
    });
    let by_state = h.vm_states.map(|c| {
        VM_STATES
            .iter()
            .zip(c)
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (s.to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>()
    });
    json!({
        "id": id,
        "messages": h.messages,
        "out_of_order": h.out_of_order,
        "last_type": h.last_type.as_str(),
        "last_status": h.last_status.as_str(),
        "last_received": h.last_received,
        "last_received_at": rfc3339(h.last_received),
        "last_seen": last_seen,
        "last_failure": h.last_failure.as_ref().map(|f| json!({
            "type": f.ty.as_str(), "text": f.text, "received": f.received,
            "received_at": rfc3339(f.received),
        })),
        "usage": usage,
        "system": system,
        "vms": { "by_state": by_state, "monitored": h.vms_monitored },
    })
}

/// Per-host gauges, produced from the table at scrape time.
#[derive(Debug)]
pub struct HostCollector(pub Arc<HostTable>);

impl Collector for HostCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hosts = self.0.lock();
        let mut ids: Vec<_> = hosts.keys().copied().collect();
        ids.sort_unstable();
        let id_labels: Vec<String> = ids.iter().map(|i| i.to_string()).collect();

        let g = ConstGauge::new(hosts.len() as i64);
        g.encode(encoder.encode_descriptor(
            "monitord_hosts",
            "Hosts in the monitord host table",
            None,
            MetricType::Gauge,
        )?)?;

        {
            let mut m = encoder.encode_descriptor(
                "monitord_host_last_seen_seconds",
                "Unix time a message of this type was last received from the host",
                None,
                MetricType::Gauge,
            )?;
            for (id, label) in ids.iter().zip(&id_labels) {
                let Some(h) = hosts.get(id) else { continue };
                for ty in MsgType::ALL {
                    if let Some(s) = &h.seen[ty.index()] {
                        if s.received == 0.0 {
                            continue;
                        }
                        let labels = [("host_id", label.as_str()), ("type", ty.as_str())];
                        ConstGauge::new(s.received).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
        }

        type Pick = fn(&Usage) -> Option<f64>;
        let usage: [(&str, &str, Pick); 6] = [
            (
                "monitord_host_free_cpu",
                "FREECPU of the last MONITOR_HOST (percent of one CPU x cores)",
                |u| u.free_cpu,
            ),
            (
                "monitord_host_used_cpu",
                "USEDCPU of the last MONITOR_HOST",
                |u| u.used_cpu,
            ),
            (
                "monitord_host_free_memory_kilobytes",
                "FREEMEMORY of the last MONITOR_HOST (KiB)",
                |u| u.free_memory,
            ),
            (
                "monitord_host_used_memory_kilobytes",
                "USEDMEMORY of the last MONITOR_HOST (KiB)",
                |u| u.used_memory,
            ),
            (
                "monitord_host_net_rx_bytes",
                "NETRX of the last MONITOR_HOST",
                |u| u.net_rx,
            ),
            (
                "monitord_host_net_tx_bytes",
                "NETTX of the last MONITOR_HOST",
                |u| u.net_tx,
            ),
        ];
        for (name, help, pick) in usage {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (id, label) in ids.iter().zip(&id_labels) {
                if let Some(v) = hosts.get(id).and_then(|h| h.usage.as_ref()).and_then(pick) {
                    ConstGauge::new(v).encode(m.encode_family(&[("host_id", label.as_str())])?)?;
                }
            }
        }

        let mut m = encoder.encode_descriptor(
            "monitord_host_vms",
            "VMs by state in the last STATE_VM of the host",
            None,
            MetricType::Gauge,
        )?;
        for (id, label) in ids.iter().zip(&id_labels) {
            if let Some(c) = hosts.get(id).and_then(|h| h.vm_states) {
                for (state, n) in VM_STATES.iter().zip(c) {
                    let labels = [("host_id", label.as_str()), ("state", *state)];
                    ConstGauge::new(n as i64).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitord::wire::{self, tests::plain_decoder};

    fn feed(table: &HostTable, wire_msg: &[u8], now: f64) -> Recorded {
        let mut d = plain_decoder();
        let m = d.decode(wire_msg).unwrap();
        let u = Update::from_message(&m).unwrap();
        table.record_at(m.ty, m.status, m.host_id, m.epoch, u, now)
    }

    fn enc(ty: MsgType, status: Status, host: i32, epoch: i64, payload: &str) -> Vec<u8> {
        wire::encode(ty, status, host, epoch, payload.as_bytes(), None).unwrap()
    }

    #[test]
    fn two_hosts_all_types_and_failure() {
        let t = HostTable::new(10);
        for (host, hostname) in [(3, "kvm-3"), (4, "kvm-4")] {
            let base = 1_724_150_000 + host as i64;
            feed(
                &t,
                &enc(
                    MsgType::MonitorHost,
                    Status::Success,
                    host,
                    base,
                    &format!(
                        "HYPERVISOR=kvm\nUSEDMEMORY=3012345\nFREEMEMORY=13004567\nFREECPU={}\nUSEDCPU=20\nNETRX=123456789\nNETTX=98765432\nHUGEPAGE = [ NODE_ID = \"0\", SIZE = \"2048\", FREE = \"0\" ]\n",
                        700 + host
                    ),
                ),
                1000.0,
            );
            feed(
                &t,
                &enc(
                    MsgType::SystemHost,
                    Status::Success,
                    host,
                    base,
                    &format!(
                        "HYPERVISOR=kvm\nTOTALCPU=800\nTOTALMEMORY=16017000\nHOSTNAME={hostname}\nVERSION=\"7.0.0\"\nDS = [ ID = 0,\n USED_MB = 1 ]\n"
                    ),
                ),
                1001.0,
            );
            feed(
                &t,
                &enc(
                    MsgType::BeaconHost,
                    Status::Success,
                    host,
                    base,
                    "1724150010",
                ),
                1002.0,
            );
            feed(
                &t,
                wire::tests::EX_STATE_VM
                    .replace(" 3 ", &format!(" {host} "))
                    .as_bytes(),
                1003.0,
            );
            feed(
                &t,
                wire::tests::EX_MONITOR_VM
                    .replace(" 3 ", &format!(" {host} "))
                    .as_bytes(),
                1004.0,
            );
        }
        feed(
            &t,
            &enc(
                MsgType::MonitorHost,
                Status::Failure,
                4,
                0,
                "Error executing linux_usage.rb\n",
            ),
            1005.0,
        );
        let j = t.to_json();
        assert_eq!(j["count"], 2);
        let h3 = &j["hosts"][0];
        assert_eq!(h3["id"], 3);
        assert_eq!(h3["usage"]["FREECPU"], 703.0);
        assert_eq!(h3["usage"]["NETTX"], 98765432.0);
        assert_eq!(h3["system"]["HOSTNAME"], "kvm-3");
        assert_eq!(h3["system"]["TOTALMEMORY"], 16017000.0);
        assert_eq!(h3["system"]["VERSION"], "7.0.0");
        assert_eq!(h3["vms"]["by_state"]["RUNNING"], 1);
        assert_eq!(h3["vms"]["monitored"], 1);
        assert_eq!(h3["last_seen"]["BEACON_HOST"]["received"], 1002.0);
        assert_eq!(h3["last_seen"]["BEACON_HOST"]["epoch"], 1724150003);
        assert_eq!(h3["last_seen"]["STATE_VM"]["epoch"], 1724150005);
        assert_eq!(h3["last_seen"]["MONITOR_VM"]["received"], 1004.0);
        assert!(h3["last_failure"].is_null());
        let h4 = &j["hosts"][1];
        assert_eq!(h4["system"]["HOSTNAME"], "kvm-4");
        assert_eq!(h4["last_status"], "FAILURE");
        assert_eq!(h4["last_failure"]["type"], "MONITOR_HOST");
        assert_eq!(h4["last_failure"]["text"], "Error executing linux_usage.rb");
        // The FAILURE did not wipe the last good usage.
        assert_eq!(h4["usage"]["FREECPU"], 704.0);
    }

    #[test]
    fn out_of_order_and_epoch_zero() {
        let t = HostTable::new(10);
        assert_eq!(
            feed(
                &t,
                &enc(MsgType::BeaconHost, Status::Success, 1, 100, "1"),
                1.0
            ),
            Recorded::Updated
        );
        assert_eq!(
            feed(
                &t,
                &enc(MsgType::BeaconHost, Status::Success, 1, 99, "1"),
                2.0
            ),
            Recorded::OutOfOrder
        );
        assert_eq!(
            feed(
                &t,
                &enc(MsgType::BeaconHost, Status::Success, 1, 0, "1"),
                3.0
            ),
            Recorded::Updated
        );
        assert_eq!(
            feed(
                &t,
                &enc(MsgType::BeaconHost, Status::Success, 1, 100, "1"),
                4.0
            ),
            Recorded::Updated
        );
        // Other types have their own reference.
        assert_eq!(
            feed(&t, &enc(MsgType::MonitorVm, Status::Success, 1, 5, ""), 5.0),
            Recorded::Updated
        );
        assert_eq!(t.to_json()["hosts"][0]["out_of_order"], 1);
    }

    #[test]
    fn table_is_bounded() {
        let t = HostTable::new(2);
        for h in 0..5 {
            let r = t.record_at(
                MsgType::BeaconHost,
                Status::Success,
                h,
                1,
                Update::None,
                1.0,
            );
            assert_eq!(
                r,
                if h < 2 {
                    Recorded::Updated
                } else {
                    Recorded::Untracked
                }
            );
        }
        assert_eq!(t.len(), 2);
        // Known hosts still update.
        assert_eq!(
            t.record_at(
                MsgType::BeaconHost,
                Status::Success,
                1,
                2,
                Update::None,
                2.0
            ),
            Recorded::Updated
        );
    }

    #[test]
    fn bad_payload_is_an_error_not_a_panic() {
        let mut d = plain_decoder();
        let w = enc(
            MsgType::MonitorHost,
            Status::Success,
            1,
            1,
            "FREECPU=\"unterminated",
        );
        let m = d.decode(&w).unwrap();
        assert!(Update::from_message(&m).is_err());
        let w = enc(
            MsgType::MonitorVm,
            Status::Success,
            1,
            1,
            "VM=[ID=1,MONITOR=\"unterminated]",
        );
        let m = d.decode(&w).unwrap();
        assert!(Update::from_message(&m).is_err());
        // Nested MONITOR templates are counted, not decoded (onemonitord's business).
        let w = enc(
            MsgType::MonitorVm,
            Status::Success,
            1,
            1,
            "VM=[ID=1,MONITOR=\"!!\"]\nVM=[ID=2]",
        );
        let m = d.decode(&w).unwrap();
        assert!(matches!(
            Update::from_message(&m),
            Ok(Update::VmsMonitored(2))
        ));
    }

    #[test]
    fn collector_exports_bounded_gauges() {
        let t = Arc::new(HostTable::new(10));
        feed(
            &t,
            &enc(
                MsgType::MonitorHost,
                Status::Success,
                3,
                1,
                "FREECPU=780\nUSEDCPU=20",
            ),
            1000.0,
        );
        let mut reg = prometheus_client::registry::Registry::with_prefix("tm_sidecar");
        reg.register_collector(Box::new(HostCollector(t.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.lines()
                .any(|l| l == "tm_sidecar_monitord_host_free_cpu{host_id=\"3\"} 780.0"),
            "{out}"
        );
        assert!(
            out.lines().any(|l| l == "tm_sidecar_monitord_hosts 1"),
            "{out}"
        );
        assert!(
            out.lines().any(|l| l == "tm_sidecar_monitord_host_last_seen_seconds{host_id=\"3\",type=\"MONITOR_HOST\"} 1000.0"),
            "{out}"
        );
    }
}
