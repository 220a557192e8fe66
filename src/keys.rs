//! Key material: loading host keys safely, and making every key tm-sidecar needs (`keygen`,
//! `serve --dev`). Private keys are created with mode 0600 and never overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey};

/// File names `keygen` writes into its directory.
pub const HOST_KEY: &str = "ssh_host_ed25519_key";
pub const CLIENT_KEY: &str = "oneadmin_ed25519";
pub const AUTHORIZED_KEYS: &str = "authorized_keys";
pub const MONITORD_KEY: &str = "monitord_rsa";
pub const MONITORD_PUBKEY: &str = "monitord_rsa.pub";

/// Load one host key, refusing a private key that group or others can read (as sshd does).
pub fn load_host_key(path: &Path) -> Result<PrivateKey> {
    let meta = std::fs::metadata(path).with_context(|| format!("--host-key {}", path.display()))?;
    if !meta.is_file() {
        // A FIFO would block the start in read_to_string; a directory is a plain mistake.
        bail!("--host-key {}: not a regular file", path.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "--host-key {}: permissions {mode:04o} are too open; the private key must not be \
             accessible by group or others (chmod 600)",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--host-key {}: cannot read", path.display()))?;
    russh::keys::decode_secret_key(&text, None)
        .with_context(|| format!("--host-key {}: not a usable private key", path.display()))
}

/// Load every configured host key.
pub fn load_host_keys(paths: &[PathBuf]) -> Result<Vec<PrivateKey>> {
    paths.iter().map(|p| load_host_key(p)).collect()
}

/// Create `path` with mode `mode`, failing if it already exists.
fn create_new(path: &Path, mode: u32, contents: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    Ok(())
}

/// Write a new ed25519 key pair at `path` and `path.pub`; returns the public line.
pub fn write_ed25519_pair(path: &Path, comment: &str) -> Result<String> {
    let mut key = PrivateKey::random(&mut russh::keys::key::safe_rng(), Algorithm::Ed25519)
        .context("cannot generate an ed25519 key")?;
    key.set_comment(comment);
    let private = key
        .to_openssh(LineEnding::LF)
        .context("cannot encode the private key")?;
    let public = key
        .public_key()
        .to_openssh()
        .context("cannot encode the public key")?;
    create_new(path, 0o600, private.as_bytes())?;
    create_new(&pub_path(path), 0o644, format!("{public}\n").as_bytes())?;
    Ok(public)
}

fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Write a monitord RSA key pair: PKCS#1 PEM private key, PKCS#1 "RSA PUBLIC KEY" public key,
/// the formats OpenNebula's monitord (PRIKEY) and its probes (PUBKEY) read.
pub fn write_monitord_pair(private: &Path, public: &Path, bits: usize) -> Result<()> {
    use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
        .context("cannot generate an RSA key")?;
    let pem = key.to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)?;
    let pubpem = key
        .to_public_key()
        .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)?;
    create_new(private, 0o600, pem.as_bytes())?;
    create_new(public, 0o644, pubpem.as_bytes())?;
    Ok(())
}

/// What `ensure_dev_keys` / `keygen` produced.
#[derive(Debug)]
pub struct KeySet {
    pub host_key: PathBuf,
    pub client_key: PathBuf,
    pub authorized_keys: PathBuf,
    pub created: Vec<PathBuf>,
}

/// `keygen`: write host key, oneadmin client pair, authorized_keys and the monitord RSA pair into
/// `dir`. Existing files are an error (nothing is overwritten), unless `keep_existing`, in which
/// case only the missing ones are made (used by `serve --dev`).
pub fn generate(dir: &Path, keep_existing: bool, with_monitord: bool) -> Result<KeySet> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let host_key = dir.join(HOST_KEY);
    let client_key = dir.join(CLIENT_KEY);
    let authorized_keys = dir.join(AUTHORIZED_KEYS);
    let mut created = vec![];
    let targets: Vec<PathBuf> = {
        let mut t = vec![
            host_key.clone(),
            client_key.clone(),
            authorized_keys.clone(),
        ];
        if with_monitord {
            t.push(dir.join(MONITORD_KEY));
        }
        t
    };
    if !keep_existing {
        for t in &targets {
            if t.exists() {
                bail!(
                    "{} already exists; keygen never overwrites keys",
                    t.display()
                );
            }
        }
    }
    if !host_key.exists() {
        write_ed25519_pair(&host_key, "tm-sidecar host key")?;
        created.push(host_key.clone());
    }
    if !client_key.exists() {
        write_ed25519_pair(&client_key, "oneadmin@tm-sidecar")?;
        created.push(client_key.clone());
    }
    if !authorized_keys.exists() {
        let public = std::fs::read_to_string(pub_path(&client_key))
            .with_context(|| format!("cannot read {}.pub", client_key.display()))?;
        create_new(&authorized_keys, 0o600, public.as_bytes())?;
        created.push(authorized_keys.clone());
    }
    if with_monitord && !dir.join(MONITORD_KEY).exists() {
        write_monitord_pair(&dir.join(MONITORD_KEY), &dir.join(MONITORD_PUBKEY), 2048)?;
        created.push(dir.join(MONITORD_KEY));
    }
    Ok(KeySet {
        host_key,
        client_key,
        authorized_keys,
        created,
    })
}

/// SHA256 fingerprint as `ssh-keygen -lf` prints it.
pub fn fingerprint(key: &russh::keys::PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_private_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let set = generate(dir.path(), false, false).unwrap();
        let mode = std::fs::metadata(&set.host_key)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        load_host_key(&set.host_key).unwrap();
        // a second run refuses to overwrite
        assert!(generate(dir.path(), false, false).is_err());
        // but --dev style keeps what exists
        assert!(
            generate(dir.path(), true, false)
                .unwrap()
                .created
                .is_empty()
        );
    }

    #[test]
    fn group_readable_host_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let set = generate(dir.path(), false, false).unwrap();
        std::fs::set_permissions(&set.host_key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = format!("{:#}", load_host_key(&set.host_key).unwrap_err());
        assert!(err.contains("--host-key") && err.contains("0640"), "{err}");
    }
}
