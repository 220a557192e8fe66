//! Login policy: which user may log in with which key or certificate, and what the login may do.
//! STUB: plain keys only; options and certificates land with the full parser.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use russh::keys::{Certificate, PublicKey};
use tracing::warn;

use crate::config::Config;
use crate::escape::escape;

/// What an accepted login may do, from its authorized_keys options or certificate.
#[derive(Debug, Clone)]
pub struct Grant {
    /// SHA256 fingerprint of the key (for certificates: of the certified key).
    pub fingerprint: String,
    /// Certificate key id and CA fingerprint, for certificate logins.
    pub certificate: Option<CertificateInfo>,
    /// `command=` / `force-command`.
    pub forced_command: Option<String>,
    pub permit_pty: bool,
    pub permit_agent_forwarding: bool,
    /// `environment=` values (only when `--permit-user-environment`).
    pub environment: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct CertificateInfo {
    pub key_id: String,
    pub ca_fingerprint: String,
}

/// The loaded key sets; cheap to clone, reloadable.
#[derive(Clone)]
pub struct AuthPolicy {
    inner: Arc<RwLock<Loaded>>,
    allow_users: Arc<Vec<String>>,
    sources: Arc<Config>,
}

struct Loaded {
    keys: Vec<crate::ssh::authorized_keys::Entry>,
}

impl AuthPolicy {
    /// Read every authorized_keys file and the trusted CA keys.
    pub fn load(config: &Config) -> Result<AuthPolicy> {
        let loaded = Self::read(config)?;
        Ok(AuthPolicy {
            inner: Arc::new(RwLock::new(loaded)),
            allow_users: Arc::new(config.allow_users.clone()),
            sources: Arc::new(config.clone()),
        })
    }

    fn read(config: &Config) -> Result<Loaded> {
        let mut keys = vec![];
        for path in &config.authorized_keys {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--authorized-keys {}", path.display()))?;
            let (entries, errors) = crate::ssh::authorized_keys::parse(&text);
            for (line, reason) in errors {
                warn!(file = %path.display(), line, reason = %escape(&reason), "skipping authorized_keys line");
            }
            keys.extend(entries);
        }
        Ok(Loaded { keys })
    }

    /// Re-read the files; on error the previous set stays in force.
    pub fn reload(&self) -> Result<()> {
        let loaded = Self::read(&self.sources)?;
        if let Ok(mut guard) = self.inner.write() {
            *guard = loaded;
        }
        Ok(())
    }

    /// May `user` log in at all?
    pub fn user_allowed(&self, user: &str) -> bool {
        self.allow_users.iter().any(|u| u == user)
    }

    /// Answer to a key probe (before the signature is checked).
    pub fn offer_acceptable(&self, user: &str, key: &PublicKey) -> bool {
        self.user_allowed(user)
            && self
                .inner
                .read()
                .map(|l| l.keys.iter().any(|e| e.key.key_data() == key.key_data()))
                .unwrap_or(false)
    }

    /// Decide a verified plain-key login.
    pub fn authorize_key(
        &self,
        user: &str,
        key: &PublicKey,
        _peer: Option<IpAddr>,
    ) -> Option<Grant> {
        if !self.offer_acceptable(user, key) {
            return None;
        }
        Some(Grant {
            fingerprint: crate::keys::fingerprint(key),
            certificate: None,
            forced_command: None,
            permit_pty: true,
            permit_agent_forwarding: true,
            environment: vec![],
        })
    }

    /// Decide a certificate login (signature and dates already checked by russh).
    pub fn authorize_certificate(
        &self,
        _user: &str,
        _cert: &Certificate,
        _peer: Option<IpAddr>,
    ) -> std::result::Result<Grant, String> {
        Err("certificates are not supported yet".into())
    }
}
