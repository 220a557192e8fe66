//! Per-host monitord state. STUB.

/// Host table keyed by host id, bounded in size.
pub struct HostTable {
    _max_hosts: usize,
}

impl HostTable {
    pub fn new(max_hosts: usize) -> HostTable {
        HostTable {
            _max_hosts: max_hosts,
        }
    }

    /// JSON view for `/api/v1/hosts`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "hosts": [] })
    }
}
