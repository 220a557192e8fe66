//! Hostile or broken configuration: `serve` and `check-config` must exit non-zero, promptly, with
//! one error naming the flag and the path, and never hang (a FIFO where a key file should be) or
//! start with a private key others can read.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{BIN, run};

const T: Duration = Duration::from_secs(30);

struct Env {
    dir: tempfile::TempDir,
    keys: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let status = Command::new(BIN)
            .args(["keygen", "--dir"])
            .arg(&keys)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        Env { dir, keys }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn key(&self, name: &str) -> String {
        self.keys.join(name).display().to_string()
    }

    /// The flags of a working `serve`, with `overrides` replacing (or adding) flags.
    fn args(&self, overrides: &[(&str, &str)]) -> Vec<String> {
        let root = self.path("root").display().to_string();
        let home = self.dir.path().display().to_string();
        let defaults = [
            ("--ssh-listen", "127.0.0.1:0".to_string()),
            ("--host-key", self.key("ssh_host_ed25519_key")),
            ("--authorized-keys", self.key("authorized_keys")),
            ("--transfer-root", root),
            ("--home", home),
            ("--shell", "/bin/bash".to_string()),
            ("--monitord-listen", "off".to_string()),
            ("--admin-listen", "off".to_string()),
            ("--log-format", "text".to_string()),
        ];
        let mut args = Vec::new();
        for (flag, value) in &defaults {
            if !overrides.iter().any(|(f, _)| f == flag) {
                args.push(flag.to_string());
                args.push(value.clone());
            }
        }
        for (flag, value) in overrides {
            args.push(flag.to_string());
            if !value.is_empty() {
                args.push(value.to_string());
            }
        }
        args
    }

    fn run(&self, sub: &str, overrides: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg(sub)
            .args(self.args(overrides))
            .env_remove("RUST_LOG");
        run(&mut cmd, T)
    }
}

/// Both `serve` and `check-config` refuse with an error naming `flag` and `path` (and `also`).
fn refused(env: &Env, overrides: &[(&str, &str)], flag: &str, path: &str, also: &str) {
    for sub in ["serve", "check-config"] {
        let out = env.run(sub, overrides);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{sub} {overrides:?} succeeded: {err}"
        );
        assert!(
            err.contains(&format!("{flag} {path}")),
            "{sub}: error does not name `{flag} {path}`: {err}"
        );
        assert!(
            err.to_lowercase().contains(&also.to_lowercase()),
            "{sub}: error lacks {also:?}: {err}"
        );
        assert!(
            err.lines().filter(|l| l.contains("tm-sidecar:")).count() == 1,
            "{sub}: expected one error line: {err}"
        );
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn a_working_configuration_passes_check_config() {
    let env = Env::new();
    let out = env.run("check-config", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn missing_key_files_are_named() {
    let env = Env::new();
    let missing = s(&env.path("no-such-file"));
    refused(
        &env,
        &[("--host-key", &missing)],
        "--host-key",
        &missing,
        "No such file",
    );
    refused(
        &env,
        &[("--authorized-keys", &missing)],
        "--authorized-keys",
        &missing,
        "No such file",
    );
    refused(
        &env,
        &[("--trusted-user-ca-keys", &missing)],
        "--trusted-user-ca-keys",
        &missing,
        "No such file",
    );
    refused(
        &env,
        &[("--monitord-private-key", &missing)],
        "--monitord-private-key",
        &missing,
        "No such file",
    );
    refused(
        &env,
        &[("--config", &missing)],
        "--config",
        &missing,
        "No such file",
    );
}

#[test]
fn private_keys_readable_by_others_are_refused() {
    let env = Env::new();
    for (flag, name) in [
        ("--host-key", "ssh_host_ed25519_key"),
        ("--monitord-private-key", "monitord_rsa"),
    ] {
        let key = env.key(name);
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            refused(&env, &[(flag, &key)], flag, &key, "too open");
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // ... and 0600 / 0400 are fine.
    let key = env.key("monitord_rsa");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    let out = env.run("check-config", &[("--monitord-private-key", &key)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unreadable_key_files_are_named() {
    let env = Env::new();
    // A directory where a file should be.
    let dir = s(&env.path("root"));
    for flag in [
        "--authorized-keys",
        "--trusted-user-ca-keys",
        "--monitord-private-key",
    ] {
        refused(&env, &[(flag, &dir)], flag, &dir, "directory");
    }
    refused(
        &env,
        &[("--host-key", &dir)],
        "--host-key",
        &dir,
        "regular file",
    );
    // A unix socket cannot be opened even by root.
    let sock = env.path("agent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let sock = s(&sock);
    for flag in [
        "--host-key",
        "--authorized-keys",
        "--trusted-user-ca-keys",
        "--monitord-private-key",
    ] {
        refused(&env, &[(flag, &sock)], flag, &sock, "");
    }
    // Mode 000 stops everyone but root (CI runs as root, where the file is readable).
    if !rustix::process::geteuid().is_root() {
        let ak = env.key("authorized_keys");
        std::fs::set_permissions(&ak, std::fs::Permissions::from_mode(0o000)).unwrap();
        refused(
            &env,
            &[("--authorized-keys", &ak)],
            "--authorized-keys",
            &ak,
            "denied",
        );
    }
}

#[test]
fn a_fifo_instead_of_a_key_file_does_not_hang_the_start() {
    let env = Env::new();
    let fifo = env.path("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let fifo = s(&fifo);
    for flag in [
        "--host-key",
        "--authorized-keys",
        "--trusted-user-ca-keys",
        "--monitord-private-key",
        "--config",
    ] {
        refused(&env, &[(flag, &fifo)], flag, &fifo, "regular file");
    }
}

#[test]
fn key_files_with_the_wrong_content_are_named() {
    let env = Env::new();
    // A public key where the private host key should be.
    let public = env.path("public_as_private");
    std::fs::copy(env.keys.join("ssh_host_ed25519_key.pub"), &public).unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o600)).unwrap();
    let public = s(&public);
    refused(
        &env,
        &[("--host-key", &public)],
        "--host-key",
        &public,
        "not a usable private key",
    );
    // An ed25519 key where the monitord RSA key should be.
    let host = env.key("ssh_host_ed25519_key");
    refused(
        &env,
        &[("--monitord-private-key", &host)],
        "--monitord-private-key",
        &host,
        "not supported",
    );
    let junk = env.path("junk");
    std::fs::write(&junk, b"\xff\xfe not text at all \x00\x01").unwrap();
    std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let junk = s(&junk);
    for flag in [
        "--host-key",
        "--authorized-keys",
        "--monitord-private-key",
        "--trusted-user-ca-keys",
    ] {
        refused(&env, &[(flag, &junk)], flag, &junk, "");
    }
}

#[test]
fn bad_toml_config_files_are_named() {
    let env = Env::new();
    for (name, text, want) in [
        ("syntax.toml", "ssh-listen = [\n", "invalid TOML"),
        ("unknown.toml", "shel = \"/bin/sh\"\n", "shel"),
        ("type.toml", "max-sessions = \"many\"\n", "max-sessions"),
        (
            "deep.toml",
            &format!("x = {}{}\n", "[".repeat(5000), "]".repeat(5000)),
            "invalid TOML",
        ),
    ] {
        let path = env.path(name);
        std::fs::write(&path, text).unwrap();
        let path = s(&path);
        refused(&env, &[("--config", &path)], "--config", &path, want);
    }
}

#[test]
fn bad_directories_are_named() {
    let env = Env::new();
    let missing = s(&env.path("nowhere"));
    let file = env.key("authorized_keys");
    refused(
        &env,
        &[("--transfer-root", &missing)],
        "--transfer-root",
        &missing,
        "No such file",
    );
    refused(
        &env,
        &[("--transfer-root", &file)],
        "--transfer-root",
        &file,
        "not a directory",
    );
    refused(
        &env,
        &[("--home", &missing)],
        "--home",
        &missing,
        "No such file",
    );
    refused(
        &env,
        &[("--shell", &missing)],
        "--shell",
        &missing,
        "No such file",
    );
}
