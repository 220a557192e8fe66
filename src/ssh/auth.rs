//! Login policy: which user may log in with which key or certificate, and what the login may do.
//!
//! Semantics follow OpenSSH's sshd:
//! - users outside `--allow-user` are refused before anything else;
//! - plain keys: the first authorized_keys line (files in order) that holds the key, is not a
//!   `cert-authority` line, is not expired (`expiry-time=`) and whose `from=` admits the peer
//!   wins; its options become the [`Grant`];
//! - certificates: a user certificate signed by a CA from `--trusted-user-ca-keys` (the user must
//!   be one of its principals; a certificate without principals is refused) or by the key of a
//!   `cert-authority` authorized_keys line (that line's `principals=` replaces the user-name
//!   check, its other options are merged with the certificate's as the most restrictive union).
//!   Unknown critical options refuse the certificate; `force-command` and `source-address` are
//!   enforced; the `permit-*` extensions grant (absent = denied).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::{Certificate, HashAlg, PublicKey};
use tracing::{info, warn};

use crate::config::Config;
use crate::escape::escape;
use crate::ssh::authorized_keys::{self, Entry, KeyOptions};
use crate::ssh::patterns::{self, Cidr};

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
    /// Port forwarding, X11 forwarding and `~/.ssh/rc` permissions (for completeness; the server
    /// refuses forwarding and runs no rc file regardless).
    pub permit_port_forwarding: bool,
    pub permit_x11_forwarding: bool,
    pub permit_user_rc: bool,
    /// Where the permission came from, for logs: `path:line` of the authorized_keys line, or the
    /// trusted CA file.
    pub source: String,
}

#[derive(Debug, Clone)]
pub struct CertificateInfo {
    pub key_id: String,
    pub ca_fingerprint: String,
}

/// The loaded key sets; cheap to clone, reloadable.
#[derive(Clone)]
pub struct AuthPolicy {
    inner: Arc<RwLock<Arc<Loaded>>>,
    allow_users: Arc<Vec<String>>,
    sources: Arc<Config>,
}

/// One authorized_keys line with the file it came from.
struct Line {
    file: Arc<PathBuf>,
    entry: Entry,
}

impl Line {
    fn source(&self) -> String {
        format!("{}:{}", self.file.display(), self.entry.line)
    }
}

/// A key from `--trusted-user-ca-keys`.
struct TrustedCa {
    key: PublicKey,
    line: usize,
}

#[derive(Default)]
struct Loaded {
    lines: Vec<Line>,
    trusted_cas: Vec<TrustedCa>,
    trusted_ca_file: Option<PathBuf>,
}

impl Loaded {
    fn has_ca(&self) -> bool {
        !self.trusted_cas.is_empty() || self.lines.iter().any(|l| l.entry.options.cert_authority)
    }
}

/// Options that come from a certificate.
struct CertOptions {
    force_command: Option<String>,
    source_address: Option<Vec<Cidr>>,
    permit_pty: bool,
    permit_agent_forwarding: bool,
    permit_port_forwarding: bool,
    permit_x11_forwarding: bool,
    permit_user_rc: bool,
}

impl CertOptions {
    /// Read the critical options and extensions; unknown critical options refuse the
    /// certificate. `verify-required` (FIDO user verification) cannot be checked here, so it
    /// refuses too.
    fn from_cert(cert: &Certificate) -> std::result::Result<CertOptions, String> {
        let mut force_command = None;
        let mut source_address = None;
        for (name, value) in cert.critical_options().iter() {
            match name.as_str() {
                "force-command" => force_command = Some(value.clone()),
                "source-address" => {
                    let list = patterns::parse_cidr_list(value)
                        .map_err(|e| format!("certificate source-address: {}", escape(&e)))?;
                    source_address = Some(list);
                }
                other => {
                    return Err(format!(
                        "certificate critical option {:?} is not supported",
                        escape(other)
                    ));
                }
            }
        }
        let ext = |name: &str| cert.extensions().contains_key(name);
        Ok(CertOptions {
            force_command,
            source_address,
            permit_pty: ext("permit-pty"),
            permit_agent_forwarding: ext("permit-agent-forwarding"),
            permit_port_forwarding: ext("permit-port-forwarding"),
            permit_x11_forwarding: ext("permit-X11-forwarding"),
            permit_user_rc: ext("permit-user-rc"),
        })
    }

    fn source_allows(&self, peer: Option<IpAddr>) -> bool {
        match (&self.source_address, peer) {
            (None, _) => true,
            (Some(list), Some(ip)) => patterns::cidr_list_allows(list, ip),
            (Some(_), None) => false,
        }
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn read_authorized_keys(path: &Path) -> Result<Vec<Line>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--authorized-keys {}", path.display()))?;
    Ok(authorized_keys_lines(path, &text))
}

/// The usable lines of one authorized_keys file's text; bad lines are logged and skipped.
fn authorized_keys_lines(path: &Path, text: &str) -> Vec<Line> {
    let (entries, errors) = authorized_keys::parse(text);
    for (line, reason) in errors {
        warn!(file = %path.display(), line, reason = %escape(&reason), "skipping authorized_keys line");
    }
    let file = Arc::new(path.to_path_buf());
    entries
        .into_iter()
        .map(|entry| Line {
            file: file.clone(),
            entry,
        })
        .collect()
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

/// A TrustedUserCAKeys file: one public key per line (`keytype base64 [comment]`), blank lines
/// and `#` comments ignored, bad lines logged and skipped.
fn read_trusted_cas(path: &Path) -> Result<Vec<TrustedCa>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--trusted-user-ca-keys {}", path.display()))?;
    Ok(trusted_cas(path, &text))
}

/// The usable keys of a TrustedUserCAKeys file's text; bad lines are logged and skipped.
fn trusted_cas(path: &Path, text: &str) -> Vec<TrustedCa> {
    let mut cas = vec![];
    for (i, raw) in text.split('\n').enumerate() {
        let line = raw.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split([' ', '\t']).filter(|f| !f.is_empty());
        let parsed = match (fields.next(), fields.next()) {
            (Some(ty), Some(b64)) if line.len() <= authorized_keys::MAX_LINE => {
                PublicKey::from_openssh(&format!("{ty} {b64}"))
                    .map_err(|e| format!("cannot decode key: {e}"))
            }
            (Some(_), Some(_)) => Err("line too long".to_string()),
            _ => Err("expected `keytype base64 [comment]`".to_string()),
        };
        match parsed {
            Ok(key) => {
                info!(file = %path.display(), line = i + 1, ca = %key.fingerprint(HashAlg::Sha256), "trusted user CA");
                cas.push(TrustedCa { key, line: i + 1 });
            }
            Err(reason) => {
                warn!(file = %path.display(), line = i + 1, reason = %escape(&reason), "skipping trusted CA line")
            }
        }
    }
    cas
}

impl AuthPolicy {
    /// Read every authorized_keys file and the trusted CA keys.
    pub fn load(config: &Config) -> Result<AuthPolicy> {
        let loaded = Self::read(config, false)?;
        Ok(AuthPolicy {
            inner: Arc::new(RwLock::new(Arc::new(loaded))),
            allow_users: Arc::new(config.allow_users.clone()),
            sources: Arc::new(config.clone()),
        })
    }

    /// A policy from file contents instead of files (for the fuzz targets): `authorized_keys`
    /// stands for the single `--authorized-keys` file, `trusted_cas_text` for
    /// `--trusted-user-ca-keys`. Parsing is exactly that of [`Self::load`].
    #[doc(hidden)]
    pub fn from_texts(
        config: &Config,
        authorized_keys: &str,
        trusted_cas_text: Option<&str>,
    ) -> AuthPolicy {
        let ak_path = Path::new("authorized_keys");
        let ca_path = Path::new("trusted_user_ca_keys");
        let loaded = Loaded {
            lines: authorized_keys_lines(ak_path, authorized_keys),
            trusted_cas: trusted_cas_text
                .map(|t| trusted_cas(ca_path, t))
                .unwrap_or_default(),
            trusted_ca_file: trusted_cas_text.map(|_| ca_path.to_path_buf()),
        };
        AuthPolicy {
            inner: Arc::new(RwLock::new(Arc::new(loaded))),
            allow_users: Arc::new(config.allow_users.clone()),
            sources: Arc::new(config.clone()),
        }
    }

    /// `reloading`: an authorized_keys file that no longer exists grants nothing (sshd reads
    /// the file at each login, so deleting it revokes its keys); at startup it is an error.
    fn read(config: &Config, reloading: bool) -> Result<Loaded> {
        let mut lines = vec![];
        for path in &config.authorized_keys {
            match read_authorized_keys(path) {
                Err(e) if reloading && is_not_found(&e) => {
                    warn!(file = %path.display(), "authorized_keys file is gone: its keys are revoked")
                }
                read => lines.extend(read?),
            }
        }
        let trusted_cas = match &config.trusted_user_ca_keys {
            Some(path) => read_trusted_cas(path)?,
            None => vec![],
        };
        Ok(Loaded {
            lines,
            trusted_cas,
            trusted_ca_file: config.trusted_user_ca_keys.clone(),
        })
    }

    /// Re-read the files; on error (an unreadable or broken file) the previous set stays in
    /// force, but a deleted authorized_keys file revokes its keys.
    pub fn reload(&self) -> Result<()> {
        let loaded = Arc::new(Self::read(&self.sources, true)?);
        match self.inner.write() {
            Ok(mut guard) => *guard = loaded,
            Err(poisoned) => *poisoned.into_inner() = loaded,
        }
        Ok(())
    }

    fn current(&self) -> Arc<Loaded> {
        match self.inner.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Number of usable authorized_keys lines and trusted CA keys (for the startup log).
    pub fn counts(&self) -> (usize, usize) {
        let l = self.current();
        (l.lines.len(), l.trusted_cas.len())
    }

    /// Is any certificate authority configured (trusted CA file or `cert-authority` line)?
    pub fn has_certificate_authorities(&self) -> bool {
        self.current().has_ca()
    }

    /// May `user` log in at all?
    pub fn user_allowed(&self, user: &str) -> bool {
        self.allow_users.iter().any(|u| u == user)
    }

    /// Answer to a key probe (before the signature is checked). russh shows us only the inner
    /// key of a certificate here, so any key is acceptable once a CA is configured; the real
    /// decision is [`Self::authorize_key`] / [`Self::authorize_certificate`].
    pub fn offer_acceptable(&self, user: &str, key: &PublicKey) -> bool {
        if !self.user_allowed(user) {
            return false;
        }
        let loaded = self.current();
        loaded.has_ca()
            || loaded.lines.iter().any(|l| {
                !l.entry.options.cert_authority && l.entry.key.key_data() == key.key_data()
            })
    }

    /// Decide a verified plain-key login.
    pub fn authorize_key(
        &self,
        user: &str,
        key: &PublicKey,
        peer: Option<IpAddr>,
    ) -> Option<Grant> {
        let fingerprint = crate::keys::fingerprint(key);
        match self.decide_key(user, key, peer, now()) {
            Ok(grant) => Some(grant),
            Err(reason) => {
                info!(user = %escape(user), fingerprint = %fingerprint, peer = ?peer, reason = %reason, "public key refused");
                None
            }
        }
    }

    fn decide_key(
        &self,
        user: &str,
        key: &PublicKey,
        peer: Option<IpAddr>,
        now: i64,
    ) -> std::result::Result<Grant, String> {
        if !self.user_allowed(user) {
            return Err("user not allowed".into());
        }
        let loaded = self.current();
        let mut reason = "key not in authorized_keys".to_string();
        for line in loaded
            .lines
            .iter()
            .filter(|l| l.entry.key.key_data() == key.key_data())
        {
            let o = &line.entry.options;
            if o.cert_authority {
                reason = format!("{}: key is a certificate authority", line.source());
            } else if let Err(r) = check_line(line, peer, now) {
                reason = r;
            } else if o.verify_required && is_security_key(key.key_data()) {
                reason = format!("{}: verify-required cannot be checked", line.source());
            } else {
                return Ok(Grant {
                    fingerprint: crate::keys::fingerprint(key),
                    certificate: None,
                    forced_command: o.command.clone(),
                    permit_pty: o.permit_pty,
                    permit_agent_forwarding: o.permit_agent_forwarding,
                    environment: self.environment(o),
                    permit_port_forwarding: o.permit_port_forwarding,
                    permit_x11_forwarding: o.permit_x11_forwarding,
                    permit_user_rc: o.permit_user_rc,
                    source: line.source(),
                });
            }
        }
        Err(reason)
    }

    fn environment(&self, o: &KeyOptions) -> Vec<(String, String)> {
        if self.sources.permit_user_environment {
            o.environment.clone()
        } else {
            vec![]
        }
    }

    /// Decide a certificate login (russh has already checked its self-signature and dates; we
    /// check them again against the trusted CA).
    pub fn authorize_certificate(
        &self,
        user: &str,
        cert: &Certificate,
        peer: Option<IpAddr>,
    ) -> std::result::Result<Grant, String> {
        let result = self.decide_certificate(user, cert, peer, now());
        if let Err(reason) = &result {
            info!(
                user = %escape(user),
                key_id = %escape(cert.key_id()),
                fingerprint = %cert.public_key().fingerprint(HashAlg::Sha256),
                ca = %cert.signature_key().fingerprint(HashAlg::Sha256),
                peer = ?peer,
                reason = %reason,
                "certificate refused"
            );
        }
        result
    }

    fn decide_certificate(
        &self,
        user: &str,
        cert: &Certificate,
        peer: Option<IpAddr>,
        now: i64,
    ) -> std::result::Result<Grant, String> {
        if !self.user_allowed(user) {
            return Err("user not allowed".into());
        }
        if cert.cert_type() != CertType::User {
            return Err("not a user certificate".into());
        }
        let opts = CertOptions::from_cert(cert)?;
        let ca = cert.signature_key();
        let ca_fp = ca.fingerprint(HashAlg::Sha256);
        let valid = |cert: &Certificate| {
            let at = u64::try_from(now).unwrap_or(0);
            cert.validate_at(at, [&ca_fp])
                .map_err(|_| "certificate signature or validity period invalid".to_string())
        };
        let info = CertificateInfo {
            key_id: cert.key_id().to_string(),
            ca_fingerprint: ca_fp.to_string(),
        };
        let fingerprint = cert.public_key().fingerprint(HashAlg::Sha256).to_string();
        let loaded = self.current();
        let mut reason: Option<String> = None;

        // 1. --trusted-user-ca-keys: the user must be a listed principal.
        if let Some(trusted) = loaded.trusted_cas.iter().find(|t| t.key.key_data() == ca) {
            let attempt = (|| {
                valid(cert)?;
                let principals = cert.valid_principals();
                if principals.is_empty() {
                    return Err("certificate lacks a principal list".to_string());
                }
                if !principals.iter().any(|p| p == user) {
                    return Err(format!(
                        "user {:?} is not a principal of the certificate",
                        escape(user)
                    ));
                }
                if !opts.source_allows(peer) {
                    return Err("source-address does not allow the peer".to_string());
                }
                let source = match &loaded.trusted_ca_file {
                    Some(f) => format!("{}:{}", f.display(), trusted.line),
                    None => "trusted CA".into(),
                };
                Ok(Grant {
                    fingerprint: fingerprint.clone(),
                    certificate: Some(info.clone()),
                    forced_command: opts.force_command.clone(),
                    permit_pty: opts.permit_pty,
                    permit_agent_forwarding: opts.permit_agent_forwarding,
                    environment: vec![],
                    permit_port_forwarding: opts.permit_port_forwarding,
                    permit_x11_forwarding: opts.permit_x11_forwarding,
                    permit_user_rc: opts.permit_user_rc,
                    source,
                })
            })();
            match attempt {
                Ok(grant) => return Ok(grant),
                Err(r) => reason = Some(format!("trusted CA: {r}")),
            }
        }

        // 2. cert-authority lines of authorized_keys, in order.
        for line in loaded
            .lines
            .iter()
            .filter(|l| l.entry.options.cert_authority && l.entry.key.key_data() == ca)
        {
            let o = &line.entry.options;
            let attempt = (|| {
                check_line(line, peer, now)?;
                valid(cert)?;
                let principals = cert.valid_principals();
                match &o.principals {
                    Some(allowed) => {
                        if !principals.iter().any(|p| allowed.contains(p)) {
                            return Err(
                                "certificate does not contain an authorized principal".to_string()
                            );
                        }
                    }
                    // No principals= : the user name must be a principal; a certificate without
                    // principals is valid for any user (OpenSSH).
                    None => {
                        if !principals.is_empty() && !principals.iter().any(|p| p == user) {
                            return Err(format!(
                                "user {:?} is not a principal of the certificate",
                                escape(user)
                            ));
                        }
                    }
                }
                if !opts.source_allows(peer) {
                    return Err("source-address does not allow the peer".to_string());
                }
                let forced_command = match (&o.command, &opts.force_command) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(
                            "forced command of the key and the certificate differ".to_string()
                        );
                    }
                    (Some(a), _) => Some(a.clone()),
                    (None, b) => b.clone(),
                };
                Ok(Grant {
                    fingerprint: fingerprint.clone(),
                    certificate: Some(info.clone()),
                    forced_command,
                    permit_pty: o.permit_pty && opts.permit_pty,
                    permit_agent_forwarding: o.permit_agent_forwarding
                        && opts.permit_agent_forwarding,
                    environment: self.environment(o),
                    permit_port_forwarding: o.permit_port_forwarding && opts.permit_port_forwarding,
                    permit_x11_forwarding: o.permit_x11_forwarding && opts.permit_x11_forwarding,
                    permit_user_rc: o.permit_user_rc && opts.permit_user_rc,
                    source: line.source(),
                })
            })();
            match attempt {
                Ok(grant) => return Ok(grant),
                Err(r) => reason = Some(format!("{}: {r}", line.source())),
            }
        }
        Err(reason.unwrap_or_else(|| format!("certificate signed by an untrusted CA {ca_fp}")))
    }
}

/// Checks of an authorized_keys line that do not depend on the kind of login.
fn check_line(line: &Line, peer: Option<IpAddr>, now: i64) -> std::result::Result<(), String> {
    let o = &line.entry.options;
    if o.expired_at(now) {
        return Err(format!("{}: key expired (expiry-time)", line.source()));
    }
    if !o.from_allows(peer) {
        let patterns = o.from.as_ref().map(|f| f.0.as_str()).unwrap_or("");
        return Err(format!(
            "{}: peer not allowed by from=\"{}\"",
            line.source(),
            escape(patterns)
        ));
    }
    Ok(())
}

fn is_security_key(key: &KeyData) -> bool {
    matches!(key, KeyData::SkEcdsaSha2NistP256(_) | KeyData::SkEd25519(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use russh::keys::ssh_key::certificate::Builder;
    use russh::keys::{Algorithm, PrivateKey};

    const ALICE: &str = "alice";

    fn key() -> PrivateKey {
        PrivateKey::random(&mut russh::keys::key::safe_rng(), Algorithm::Ed25519).unwrap()
    }

    fn line(k: &PrivateKey) -> String {
        k.public_key().to_openssh().unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        config: Config,
    }

    impl Fixture {
        fn new(authorized_keys: &str, trusted_cas: Option<&str>) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let ak = dir.path().join("authorized_keys");
            std::fs::write(&ak, authorized_keys).unwrap();
            let mut config = Config::resolve(Settings::default()).unwrap();
            config.authorized_keys = vec![ak];
            config.allow_users = vec![ALICE.into(), "bob".into()];
            config.trusted_user_ca_keys = trusted_cas.map(|text| {
                let p = dir.path().join("trusted_ca");
                std::fs::write(&p, text).unwrap();
                p
            });
            Fixture { dir, config }
        }

        fn policy(&self) -> AuthPolicy {
            AuthPolicy::load(&self.config).unwrap()
        }
    }

    fn peer(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    const LOCAL: &str = "127.0.0.1";

    /// A user certificate for `subject` signed by `ca`, valid for the last and next hour, with
    /// principal `alice` and the usual extensions, adjusted by `f`.
    fn cert_with(
        ca: &PrivateKey,
        subject: &PrivateKey,
        f: impl FnOnce(&mut Builder),
    ) -> Certificate {
        let t = u64::try_from(now()).unwrap();
        let mut b = Builder::new(
            [7u8; 16],
            subject.public_key().key_data().clone(),
            t - 3600,
            t + 3600,
        )
        .unwrap();
        b.key_id("test-cert").unwrap();
        b.cert_type(CertType::User).unwrap();
        f(&mut b);
        b.sign(ca).unwrap()
    }

    fn standard(b: &mut Builder) {
        b.valid_principal(ALICE).unwrap();
        b.extension("permit-pty", "").unwrap();
        b.extension("permit-agent-forwarding", "").unwrap();
    }

    fn cert(ca: &PrivateKey, subject: &PrivateKey) -> Certificate {
        cert_with(ca, subject, standard)
    }

    #[test]
    fn plain_key_listed_unknown_and_wrong_user() {
        let (k, other) = (key(), key());
        let f = Fixture::new(&format!("{}\n", line(&k)), None);
        let p = f.policy();
        let g = p.authorize_key(ALICE, k.public_key(), peer(LOCAL)).unwrap();
        assert_eq!(g.fingerprint, crate::keys::fingerprint(k.public_key()));
        assert!(g.permit_pty && g.permit_agent_forwarding && g.forced_command.is_none());
        assert!(g.certificate.is_none());
        assert!(g.source.ends_with("authorized_keys:1"));
        assert!(p.offer_acceptable(ALICE, k.public_key()));
        assert!(!p.offer_acceptable(ALICE, other.public_key()));
        assert!(
            p.authorize_key(ALICE, other.public_key(), peer(LOCAL))
                .is_none()
        );
        assert!(!p.user_allowed("mallory"));
        assert!(!p.offer_acceptable("mallory", k.public_key()));
        assert!(
            p.authorize_key("mallory", k.public_key(), peer(LOCAL))
                .is_none()
        );
        assert!(!p.has_certificate_authorities());
        assert_eq!(p.counts(), (1, 0));
    }

    #[test]
    fn malformed_line_does_not_disable_others() {
        let (a, b) = (key(), key());
        let f = Fixture::new(
            &format!(
                "{}\nbogus,options {}\n\"\n{}\n",
                line(&a),
                line(&b),
                line(&b)
            ),
            None,
        );
        let p = f.policy();
        assert!(
            p.authorize_key(ALICE, a.public_key(), peer(LOCAL))
                .is_some()
        );
        let g = p.authorize_key(ALICE, b.public_key(), peer(LOCAL)).unwrap();
        assert!(g.source.ends_with(":4"), "{}", g.source);
    }

    #[test]
    fn from_option() {
        let k = key();
        let f = Fixture::new(
            &format!("from=\"10.0.0.0/8,!10.0.0.66,192.168.*\" {}\n", line(&k)),
            None,
        );
        let p = f.policy();
        assert!(
            p.authorize_key(ALICE, k.public_key(), peer("10.1.2.3"))
                .is_some()
        );
        assert!(
            p.authorize_key(ALICE, k.public_key(), peer("::ffff:10.1.2.3"))
                .is_some()
        );
        assert!(
            p.authorize_key(ALICE, k.public_key(), peer("192.168.7.7"))
                .is_some()
        );
        assert!(
            p.authorize_key(ALICE, k.public_key(), peer("10.0.0.66"))
                .is_none()
        );
        assert!(
            p.authorize_key(ALICE, k.public_key(), peer(LOCAL))
                .is_none()
        );
        assert!(p.authorize_key(ALICE, k.public_key(), None).is_none());
        // The probe does not know the peer: it accepts and the final check refuses.
        assert!(p.offer_acceptable(ALICE, k.public_key()));
    }

    #[test]
    fn first_usable_line_wins() {
        let k = key();
        let text = format!(
            "from=\"192.0.2.1\",command=\"first\" {k}\nexpiry-time=\"20000101\",command=\"second\" {k}\ncommand=\"third\" {k}\ncommand=\"fourth\" {k}\n",
            k = line(&k)
        );
        let p = Fixture::new(&text, None).policy();
        let g = p.authorize_key(ALICE, k.public_key(), peer(LOCAL)).unwrap();
        assert_eq!(g.forced_command.as_deref(), Some("third"));
        let g = p
            .authorize_key(ALICE, k.public_key(), peer("192.0.2.1"))
            .unwrap();
        assert_eq!(g.forced_command.as_deref(), Some("first"));
    }

    #[test]
    fn expiry_time() {
        let (old, new) = (key(), key());
        let text = format!(
            "expiry-time=\"19990101\" {}\nexpiry-time=\"20991231Z\" {}\n",
            line(&old),
            line(&new)
        );
        let p = Fixture::new(&text, None).policy();
        assert!(
            p.authorize_key(ALICE, old.public_key(), peer(LOCAL))
                .is_none()
        );
        assert!(
            p.authorize_key(ALICE, new.public_key(), peer(LOCAL))
                .is_some()
        );
        // Exactly at the expiry second it still works; one second later it does not.
        let t = authorized_keys::parse_expiry_time("20991231Z").unwrap();
        assert!(
            p.decide_key(ALICE, new.public_key(), peer(LOCAL), t)
                .is_ok()
        );
        assert!(
            p.decide_key(ALICE, new.public_key(), peer(LOCAL), t + 1)
                .is_err()
        );
        // An invalid time disables that line only.
        let text = format!("expiry-time=\"INVALID\" {}\n{}\n", line(&old), line(&new));
        let p = Fixture::new(&text, None).policy();
        assert!(
            p.authorize_key(ALICE, old.public_key(), peer(LOCAL))
                .is_none()
        );
        assert!(
            p.authorize_key(ALICE, new.public_key(), peer(LOCAL))
                .is_some()
        );
    }

    #[test]
    fn restrict_command_and_environment() {
        let (r, rp, c) = (key(), key(), key());
        let text = format!(
            "restrict {}\nrestrict,pty {}\ncommand=\"echo \\\"forced\\\"\",environment=\"LANG=C\",no-agent-forwarding {}\n",
            line(&r),
            line(&rp),
            line(&c)
        );
        let mut f = Fixture::new(&text, None);
        let p = f.policy();
        let g = p.authorize_key(ALICE, r.public_key(), peer(LOCAL)).unwrap();
        assert!(!g.permit_pty && !g.permit_agent_forwarding && !g.permit_port_forwarding);
        assert!(!g.permit_x11_forwarding && !g.permit_user_rc);
        let g = p
            .authorize_key(ALICE, rp.public_key(), peer(LOCAL))
            .unwrap();
        assert!(g.permit_pty && !g.permit_agent_forwarding);
        let g = p.authorize_key(ALICE, c.public_key(), peer(LOCAL)).unwrap();
        assert_eq!(g.forced_command.as_deref(), Some("echo \"forced\""));
        assert!(g.permit_pty && !g.permit_agent_forwarding);
        assert!(
            g.environment.is_empty(),
            "environment= needs --permit-user-environment"
        );
        f.config.permit_user_environment = true;
        let g = f
            .policy()
            .authorize_key(ALICE, c.public_key(), peer(LOCAL))
            .unwrap();
        assert_eq!(g.environment, vec![("LANG".to_string(), "C".to_string())]);
    }

    #[test]
    fn load_and_reload() {
        let (a, b) = (key(), key());
        let f = Fixture::new(&format!("{}\n", line(&a)), None);
        let p = f.policy();
        let clone = p.clone();
        assert!(
            p.authorize_key(ALICE, b.public_key(), peer(LOCAL))
                .is_none()
        );
        std::fs::write(&f.config.authorized_keys[0], format!("{}\n", line(&b))).unwrap();
        p.reload().unwrap();
        assert!(
            clone
                .authorize_key(ALICE, b.public_key(), peer(LOCAL))
                .is_some(),
            "clones share the reload"
        );
        assert!(
            clone
                .authorize_key(ALICE, a.public_key(), peer(LOCAL))
                .is_none()
        );
        // A failed reload (here: a directory in the file's place) keeps the previous set.
        std::fs::remove_file(&f.config.authorized_keys[0]).unwrap();
        std::fs::create_dir(&f.config.authorized_keys[0]).unwrap();
        let err = format!("{:#}", p.reload().unwrap_err());
        assert!(err.contains("--authorized-keys"), "{err}");
        assert!(
            p.authorize_key(ALICE, b.public_key(), peer(LOCAL))
                .is_some()
        );
        // A deleted file revokes its keys, as under sshd.
        std::fs::remove_dir(&f.config.authorized_keys[0]).unwrap();
        p.reload().unwrap();
        assert!(
            p.authorize_key(ALICE, b.public_key(), peer(LOCAL))
                .is_none()
        );
        // Missing files at load name the flag and the path.
        let err = format!("{:#}", AuthPolicy::load(&f.config).err().unwrap());
        assert!(
            err.contains("--authorized-keys") && err.contains("authorized_keys"),
            "{err}"
        );
        let empty = Fixture::new("", None);
        let mut config = empty.config.clone();
        config.trusted_user_ca_keys = Some(f.dir.path().join("no-such-ca"));
        let err = format!("{:#}", AuthPolicy::load(&config).err().unwrap());
        assert!(
            err.contains("--trusted-user-ca-keys") && err.contains("no-such-ca"),
            "{err}"
        );
    }

    #[test]
    fn trusted_ca_certificates() {
        let (ca, user, rogue) = (key(), key(), key());
        let ca_file = format!("# CAs\n\nnot a key\n{} ca comment\n", line(&ca));
        let p = Fixture::new("", Some(&ca_file)).policy();
        assert_eq!(p.counts(), (0, 1));
        assert!(p.has_certificate_authorities());
        // Any key may be offered by an allowed user once a CA exists (the probe cannot tell a
        // certificate from a plain key), but never by another user.
        assert!(p.offer_acceptable(ALICE, user.public_key()));
        assert!(!p.offer_acceptable("mallory", user.public_key()));
        // ... and the plain key itself still does not log in.
        assert!(
            p.authorize_key(ALICE, user.public_key(), peer(LOCAL))
                .is_none()
        );

        let g = p
            .authorize_certificate(ALICE, &cert(&ca, &user), peer(LOCAL))
            .unwrap();
        let info = g.certificate.clone().unwrap();
        assert_eq!(info.key_id, "test-cert");
        assert_eq!(
            info.ca_fingerprint,
            crate::keys::fingerprint(ca.public_key())
        );
        assert_eq!(g.fingerprint, crate::keys::fingerprint(user.public_key()));
        assert!(g.permit_pty && g.permit_agent_forwarding && !g.permit_port_forwarding);
        assert!(g.forced_command.is_none() && g.source.ends_with("trusted_ca:4"));

        let refused = |c: &Certificate, user: &str, from: Option<IpAddr>, want: &str| {
            let err = p.authorize_certificate(user, c, from).unwrap_err();
            assert!(err.contains(want), "{err} (wanted {want})");
        };
        refused(&cert(&ca, &user), "bob", peer(LOCAL), "not a principal");
        refused(&cert(&ca, &user), "mallory", peer(LOCAL), "not allowed");
        refused(&cert(&rogue, &user), ALICE, peer(LOCAL), "untrusted CA");
        let no_principals = cert_with(&ca, &user, |b| {
            b.all_principals_valid().unwrap();
        });
        refused(&no_principals, ALICE, peer(LOCAL), "lacks a principal list");
        let t = u64::try_from(now()).unwrap();
        let mut b = Builder::new(
            [1u8; 16],
            user.public_key().key_data().clone(),
            t - 60,
            t + 60,
        )
        .unwrap();
        b.cert_type(CertType::Host).unwrap();
        b.valid_principal(ALICE).unwrap();
        let host = b.sign(&ca).unwrap();
        refused(&host, ALICE, peer(LOCAL), "not a user certificate");
        let unknown = cert_with(&ca, &user, |b| {
            standard(b);
            b.critical_option("frobnicate", "yes").unwrap();
        });
        refused(&unknown, ALICE, peer(LOCAL), "not supported");
        let verify = cert_with(&ca, &user, |b| {
            standard(b);
            b.critical_option("verify-required", "").unwrap();
        });
        refused(&verify, ALICE, peer(LOCAL), "not supported");

        // Expired and not-yet-valid certificates.
        let t = u64::try_from(now()).unwrap();
        let mut b = Builder::new(
            [2u8; 16],
            user.public_key().key_data().clone(),
            t - 7200,
            t - 3600,
        )
        .unwrap();
        b.cert_type(CertType::User).unwrap();
        b.valid_principal(ALICE).unwrap();
        let expired = b.sign(&ca).unwrap();
        refused(&expired, ALICE, peer(LOCAL), "validity");
        let mut b = Builder::new(
            [3u8; 16],
            user.public_key().key_data().clone(),
            t + 3600,
            t + 7200,
        )
        .unwrap();
        b.cert_type(CertType::User).unwrap();
        b.valid_principal(ALICE).unwrap();
        refused(&b.sign(&ca).unwrap(), ALICE, peer(LOCAL), "validity");

        // A tampered certificate (signature no longer matches) is refused.
        let mut bytes = cert(&ca, &user).to_bytes().unwrap();
        if let Some(pos) = bytes.windows(9).position(|w| w == b"test-cert") {
            bytes[pos] = b'b';
            let tampered = Certificate::from_bytes(&bytes).unwrap();
            refused(&tampered, ALICE, peer(LOCAL), "signature");
        } else {
            panic!("key id not found in the encoding");
        }

        // force-command and source-address.
        let forced = cert_with(&ca, &user, |b| {
            standard(b);
            b.critical_option("force-command", "/bin/date").unwrap();
            b.critical_option("source-address", "10.0.0.0/8,127.0.0.1")
                .unwrap();
        });
        let g = p
            .authorize_certificate(ALICE, &forced, peer(LOCAL))
            .unwrap();
        assert_eq!(g.forced_command.as_deref(), Some("/bin/date"));
        assert!(
            p.authorize_certificate(ALICE, &forced, peer("10.9.8.7"))
                .is_ok()
        );
        refused(&forced, ALICE, peer("192.0.2.1"), "source-address");
        refused(&forced, ALICE, None, "source-address");
        let bad_source = cert_with(&ca, &user, |b| {
            standard(b);
            b.critical_option("source-address", "10.*").unwrap();
        });
        refused(&bad_source, ALICE, peer(LOCAL), "source-address");

        // Extensions absent: no PTY, no agent.
        let bare = cert_with(&ca, &user, |b| {
            b.valid_principal(ALICE).unwrap();
        });
        let g = p.authorize_certificate(ALICE, &bare, peer(LOCAL)).unwrap();
        assert!(!g.permit_pty && !g.permit_agent_forwarding && !g.permit_user_rc);
    }

    #[test]
    fn cert_authority_lines() {
        let (ca, user, plain) = (key(), key(), key());
        let text = format!(
            "cert-authority,principals=\"ops,admins\",from=\"127.0.0.0/8\",no-agent-forwarding {ca}\n{plain}\n",
            ca = line(&ca),
            plain = line(&plain)
        );
        let p = Fixture::new(&text, None).policy();
        assert!(p.has_certificate_authorities());
        // The CA key itself is not a login key.
        assert!(
            p.authorize_key(ALICE, ca.public_key(), peer(LOCAL))
                .is_none()
        );
        // A certificate for principal "ops" logs in as alice thanks to principals=.
        let ops = cert_with(&ca, &user, |b| {
            b.valid_principal("ops").unwrap();
            b.extension("permit-pty", "").unwrap();
            b.extension("permit-agent-forwarding", "").unwrap();
        });
        let g = p.authorize_certificate(ALICE, &ops, peer(LOCAL)).unwrap();
        assert!(g.permit_pty, "both allow a PTY");
        assert!(!g.permit_agent_forwarding, "most restrictive union");
        assert!(g.source.ends_with("authorized_keys:1"));
        // principals= overrides the user name: a cert for "alice" is not enough.
        let err = p
            .authorize_certificate(ALICE, &cert(&ca, &user), peer(LOCAL))
            .unwrap_err();
        assert!(err.contains("authorized principal"), "{err}");
        // The line's from= applies.
        let err = p
            .authorize_certificate(ALICE, &ops, peer("192.0.2.1"))
            .unwrap_err();
        assert!(err.contains("from="), "{err}");
        // A plain key line never accepts certificates signed by that key.
        let by_plain = cert(&plain, &user);
        assert!(
            p.authorize_certificate(ALICE, &by_plain, peer(LOCAL))
                .unwrap_err()
                .contains("untrusted")
        );

        // Without principals= the user must be a principal, unless the cert lists none.
        let text = format!(
            "cert-authority,command=\"/bin/true\",expiry-time=\"20991231\" {}\n",
            line(&ca)
        );
        let p = Fixture::new(&text, None).policy();
        let g = p
            .authorize_certificate(ALICE, &cert(&ca, &user), peer(LOCAL))
            .unwrap();
        assert_eq!(g.forced_command.as_deref(), Some("/bin/true"));
        assert!(
            p.authorize_certificate("bob", &cert(&ca, &user), peer(LOCAL))
                .unwrap_err()
                .contains("principal")
        );
        let any = cert_with(&ca, &user, |b| {
            b.all_principals_valid().unwrap();
        });
        assert!(p.authorize_certificate("bob", &any, peer(LOCAL)).is_ok());
        // command= and force-command must agree.
        let same = cert_with(&ca, &user, |b| {
            standard(b);
            b.critical_option("force-command", "/bin/true").unwrap();
        });
        assert!(p.authorize_certificate(ALICE, &same, peer(LOCAL)).is_ok());
        let differ = cert_with(&ca, &user, |b| {
            standard(b);
            b.critical_option("force-command", "/bin/false").unwrap();
        });
        let err = p
            .authorize_certificate(ALICE, &differ, peer(LOCAL))
            .unwrap_err();
        assert!(err.contains("differ"), "{err}");

        // An expired cert-authority line refuses.
        let text = format!("cert-authority,expiry-time=\"20000101\" {}\n", line(&ca));
        let p = Fixture::new(&text, None).policy();
        assert!(
            p.authorize_certificate(ALICE, &cert(&ca, &user), peer(LOCAL))
                .unwrap_err()
                .contains("expired")
        );
    }

    #[test]
    fn trusted_ca_and_cert_authority_line_both_tried() {
        let (ca, user) = (key(), key());
        // The trusted CA path refuses bob (not a principal); the authorized_keys line with
        // principals="alice" lets the same certificate in as bob.
        let text = format!("cert-authority,principals=\"alice\",no-pty {}\n", line(&ca));
        let p = Fixture::new(&text, Some(&line(&ca))).policy();
        let g = p
            .authorize_certificate(ALICE, &cert(&ca, &user), peer(LOCAL))
            .unwrap();
        assert!(
            g.permit_pty,
            "trusted CA path first, without the line's options"
        );
        let g = p
            .authorize_certificate("bob", &cert(&ca, &user), peer(LOCAL))
            .unwrap();
        assert!(!g.permit_pty, "cert-authority line options apply");
    }
}
