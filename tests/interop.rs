//! SSH clients other than OpenSSH against the real binary: dropbear's `dbclient` and PuTTY's
//! `plink`. Each has its own implementation of chacha20-poly1305@openssh.com, the cipher
//! tm-sidecar serves through OpenSSL (third_party/russh/PATCHES.md), so a byte-exact transfer
//! both ways shows the patched cipher agrees with two more independent implementations than
//! OpenSSH's. Several MiB each way: many packets, sequence numbers and window adjustments.

mod common;
#[path = "support/util.rs"]
mod util;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Sidecar, me, run_with_stdin};

const T: Duration = Duration::from_secs(120);
const SIZE: usize = 5 << 20;

/// Run `cmd` with `stdin` from a file (or nothing), bounded by `T`.
fn run(cmd: &mut Command, stdin: Option<&Path>) -> Output {
    let input = match stdin {
        Some(p) => Stdio::from(File::open(p).unwrap()),
        None => Stdio::null(),
    };
    run_with_stdin(cmd, input, T)
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Upload (the server opens) and download (the server seals) `SIZE` random bytes with `client`
/// (a command line up to, not including, the remote command).
fn both_ways(fe: &Sidecar, client: impl Fn() -> Command, label: &str) {
    let data = fe.dir.path().join(format!("{label}.bin"));
    util::write_random(&data, SIZE, 42);
    let want = util::sha256(&data);

    let up = run(client().arg("sha256sum"), Some(&data));
    let got = ok(&up, &format!("{label} upload"));
    assert_eq!(
        got.split_whitespace().next(),
        Some(want.as_str()),
        "{label} upload"
    );

    let cat = format!("cat '{}'", data.display());
    let down = run(client().arg(&cat), None);
    ok(&down, &format!("{label} download"));
    assert_eq!(down.stdout.len(), SIZE, "{label} download length");
    assert_eq!(util::sha256_bytes(&down.stdout), want, "{label} download");
}

/// dropbear's client with its own key format (converted from the OpenSSH key).
fn dbclient(fe: &Sidecar, cipher: &str) -> Command {
    let key = fe.dir.path().join("client.dropbear");
    if !key.exists() {
        let out = run(
            Command::new("dropbearconvert")
                .args(["openssh", "dropbear"])
                .arg(fe.client_key())
                .arg(&key),
            None,
        );
        ok(&out, "dropbearconvert");
    }
    let mut c = Command::new("dbclient");
    // -y -y: no host key check (the key is fresh each run); -c: only this cipher.
    c.args(["-y", "-y", "-c", cipher, "-i"])
        .arg(&key)
        .args(["-p", &fe.ssh.port().to_string()])
        .arg(format!("{}@127.0.0.1", me()));
    c
}

#[test]
fn dropbear_client_moves_bytes_exactly_with_chacha20_poly1305() {
    let fe = Sidecar::start();
    both_ways(
        &fe,
        || dbclient(&fe, "chacha20-poly1305@openssh.com"),
        "dbclient-chacha",
    );
}

#[test]
fn dropbear_client_moves_bytes_exactly_with_aes_ctr() {
    let fe = Sidecar::start();
    both_ways(&fe, || dbclient(&fe, "aes256-ctr"), "dbclient-aes");
}

#[test]
fn putty_plink_moves_bytes_exactly_with_chacha20_poly1305() {
    let fe = Sidecar::start();
    let dir = fe.dir.path();
    let ppk = dir.join("client.ppk");
    let out = run(
        Command::new("puttygen")
            .arg(fe.client_key())
            .args(["-O", "private", "-o"])
            .arg(&ppk),
        None,
    );
    ok(&out, "puttygen");
    // PuTTY takes its cipher order from a saved session; everything below WARN would need a
    // confirmation, which -batch refuses, so only chacha20 can be negotiated.
    let home = dir.join("putty-home");
    std::fs::create_dir_all(home.join(".putty/sessions")).unwrap();
    std::fs::write(
        home.join(".putty/sessions/interop"),
        "Cipher=chacha20,WARN,aes,aesgcm,3des,des,blowfish,arcfour\n",
    )
    .unwrap();
    let fingerprint = ok(
        &run(
            Command::new("ssh-keygen")
                .arg("-lf")
                .arg(fe.keys.join("ssh_host_ed25519_key.pub")),
            None,
        ),
        "ssh-keygen -l",
    );
    let fingerprint = fingerprint.split_whitespace().nth(1).unwrap().to_string();
    let plink = || {
        let mut c = Command::new("plink");
        c.env("HOME", &home)
            .args(["-load", "interop", "-batch", "-ssh", "-v", "-no-antispoof"])
            .args(["-P", &fe.ssh.port().to_string(), "-l", &me(), "-i"])
            .arg(&ppk)
            .args(["-hostkey", &fingerprint, "127.0.0.1"]);
        c
    };
    both_ways(&fe, plink, "plink");
    let check = run(plink().arg("true"), None);
    ok(&check, "plink true");
    let log = String::from_utf8_lossy(&check.stderr);
    assert!(
        log.contains("ChaCha20 inbound encryption") && log.contains("ChaCha20 outbound encryption"),
        "plink did not use chacha20:\n{log}"
    );
}
