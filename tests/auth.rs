//! Authentication against the real binary with the real OpenSSH client: authorized_keys
//! options, user certificates made by `ssh-keygen -s`, and everything that must be refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{Sidecar, me, run, ssh_client_opts};

const T: Duration = Duration::from_secs(60);

/// Keys, certificates and the extra authorized_keys file made for one test server.
struct Material {
    dir: tempfile::TempDir,
}

impl Material {
    fn new() -> Material {
        Material {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new ed25519 key pair `name` / `name.pub`; returns the public line.
    fn key(&self, name: &str) -> String {
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(self.path(name))
            .status()
            .unwrap();
        assert!(status.success(), "ssh-keygen failed");
        std::fs::read_to_string(self.path(&format!("{name}.pub")))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `ssh-keygen -s <ca> -I <id> -n <principals> -V <validity> [extra] <key>.pub`, which
    /// writes `<key>-cert.pub` next to the key (the OpenSSH client picks it up with `-i key`).
    fn certify(&self, ca: &str, key: &str, principals: &str, validity: &str, extra: &[&str]) {
        let out = Command::new("ssh-keygen")
            .arg("-q")
            .arg("-s")
            .arg(self.path(ca))
            .args(["-I", &format!("{key}-id"), "-n", principals, "-V", validity])
            .args(extra)
            .arg(self.path(&format!("{key}.pub")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ssh-keygen -s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(self.path(&format!("{key}-cert.pub")).exists());
    }
}

/// `ssh -i key user@127.0.0.1 args...` against the sidecar.
fn ssh_as(s: &Sidecar, key: &Path, user: &str, args: &[&str]) -> Output {
    let mut c = Command::new("ssh");
    c.args(ssh_client_opts(key))
        .args(["-p", &s.ssh.port().to_string()])
        .arg(format!("{user}@127.0.0.1"))
        .args(args);
    run(&mut c, T)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn accepted(out: &Output, want_stdout: &str) {
    assert!(
        out.status.success(),
        "login should succeed: rc={:?} stderr={}",
        out.status.code(),
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), want_stdout);
}

#[track_caller]
fn refused(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(255),
        "{what}: should be refused; stdout={}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{what}: stderr={}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "{what}: nothing may run");
}

/// One server for all the scenarios: the harness' own client key plus our file with one key per
/// option under test, malformed lines in between, and a trusted user CA.
struct Setup {
    s: Sidecar,
    m: Material,
}

fn setup() -> Setup {
    let m = Material::new();
    let from_bad = m.key("from_bad");
    let from_ok = m.key("from_ok");
    let expired = m.key("expired");
    let future = m.key("future");
    let forced = m.key("forced");
    let after_bad = m.key("after_bad");
    let restricted = m.key("restricted");
    let restricted_pty = m.key("restricted_pty");
    m.key("unknown");
    for k in [
        "cert_ok",
        "cert_rogue",
        "cert_principal",
        "cert_expired",
        "cert_source",
        "cert_forced",
    ] {
        m.key(k);
    }
    let ca = m.key("ca");
    m.key("rogue_ca");

    let user = me();
    m.certify("ca", "cert_ok", &user, "-5m:+1h", &[]);
    m.certify("rogue_ca", "cert_rogue", &user, "-5m:+1h", &[]);
    m.certify("ca", "cert_principal", "someone-else", "-5m:+1h", &[]);
    m.certify("ca", "cert_expired", &user, "20000101:20000102", &[]);
    m.certify(
        "ca",
        "cert_source",
        &user,
        "-5m:+1h",
        &["-O", "source-address=192.0.2.0/24"],
    );
    m.certify(
        "ca",
        "cert_forced",
        &user,
        "-5m:+1h",
        &["-O", "force-command=echo cert-forced"],
    );

    let authorized = format!(
        "# test keys\n\
         from=\"192.0.2.0/24,!127.0.0.1\" {from_bad}\n\
         from=\"10.0.0.0/8,127.0.0.*\" {from_ok}\n\
         expiry-time=\"19990101\" {expired}\n\
         expiry-time=\"20991231\" {future}\n\
         command=\"echo \\\"forced:$SSH_ORIGINAL_COMMAND\\\"\",no-pty {forced}\n\
         this line is not a key\n\
         bogus-option {after_bad}\n\
         command=\"unterminated {after_bad}\n\
         \n\
         {after_bad}\n\
         restrict {restricted}\n\
         restrict,pty {restricted_pty}\n"
    );
    std::fs::write(m.path("authorized_keys"), authorized).unwrap();
    std::fs::write(m.path("trusted_ca"), format!("# the only CA\n{ca}\n")).unwrap();

    let ak = m.path("authorized_keys").display().to_string();
    let tca = m.path("trusted_ca").display().to_string();
    let s = Sidecar::start_with(&["--authorized-keys", &ak, "--trusted-user-ca-keys", &tca]);
    Setup { s, m }
}

#[test]
fn authorized_keys_options_and_refusals() {
    let Setup { s, m } = setup();
    let user = me();
    let key = |n: &str| m.path(n);

    // The harness key still works (our extra file adds to the default one).
    accepted(&ssh_as(&s, &s.client_key(), &user, &["echo", "ok"]), "ok\n");

    refused(
        &ssh_as(&s, &key("unknown"), &user, &["echo", "no"]),
        "unknown key",
    );
    refused(
        &ssh_as(&s, &s.client_key(), "not-an-allowed-user", &["echo", "no"]),
        "wrong user",
    );
    refused(
        &ssh_as(&s, &key("from_bad"), &user, &["echo", "no"]),
        "from= mismatch",
    );
    accepted(
        &ssh_as(&s, &key("from_ok"), &user, &["echo", "from"]),
        "from\n",
    );
    refused(
        &ssh_as(&s, &key("expired"), &user, &["echo", "no"]),
        "past expiry-time",
    );
    accepted(
        &ssh_as(&s, &key("future"), &user, &["echo", "future"]),
        "future\n",
    );

    // command= replaces the client's command, which arrives in SSH_ORIGINAL_COMMAND.
    accepted(
        &ssh_as(&s, &key("forced"), &user, &["echo client; exit 3"]),
        "forced:echo client; exit 3\n",
    );
    // ... also for a shell without a command (SSH_ORIGINAL_COMMAND unset).
    accepted(&ssh_as(&s, &key("forced"), &user, &[]), "forced:\n");

    // Malformed lines are skipped and logged with their line numbers; the next line works.
    accepted(
        &ssh_as(&s, &key("after_bad"), &user, &["echo", "after"]),
        "after\n",
    );
    let logs = s.logs.lines();
    for line in [7, 8, 9] {
        assert!(
            logs.iter()
                .any(|l| l.contains("skipping authorized_keys line")
                    && l.contains(&format!("\"line\":{line}"))),
            "line {line} not reported:\n{}",
            logs.join("\n")
        );
    }
    // No key material in the logs.
    let after_bad = std::fs::read_to_string(key("after_bad.pub")).unwrap();
    let blob = after_bad.split_whitespace().nth(1).unwrap();
    assert!(
        !logs.iter().any(|l| l.contains(blob)),
        "key material logged"
    );

    // restrict: no PTY even when asked for one (the client says so, exactly as with a stock
    // sshd); restrict,pty re-enables it.
    let out = ssh_as(
        &s,
        &key("restricted"),
        &user,
        &["-tt", "echo", "restricted"],
    );
    assert!(
        text(&out.stderr).contains("PTY allocation request failed"),
        "{}",
        text(&out.stderr)
    );
    let out = ssh_as(
        &s,
        &key("restricted_pty"),
        &user,
        &["-tt", "echo", "with-pty"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("PTY allocation request failed"));
    assert_eq!(text(&out.stdout), "with-pty\r\n", "output through a PTY");
}

#[test]
fn certificates() {
    let Setup { s, m } = setup();
    let user = me();
    let key = |n: &str| m.path(n);

    // A certificate made by `ssh-keygen -s` from the trusted CA logs in; its plain key does
    // not (remove the certificate and try again).
    accepted(
        &ssh_as(&s, &key("cert_ok"), &user, &["echo", "cert"]),
        "cert\n",
    );
    let login = s.logs.wait_for(Duration::from_secs(5), |l| {
        l.contains("\"event\":\"login\"") && l.contains("cert_ok-id")
    });
    assert!(
        login.is_some(),
        "certificate login not logged with its key id:\n{}",
        s.logs.lines().join("\n")
    );
    refused(
        &ssh_as(&s, &s.client_key(), "not-an-allowed-user", &["true"]),
        "wrong user",
    );
    if user != "oneadmin" {
        // oneadmin is an allowed user but not a principal of the certificate.
        refused(
            &ssh_as(&s, &key("cert_ok"), "oneadmin", &["true"]),
            "allowed user, not a principal",
        );
    }

    refused(
        &ssh_as(&s, &key("cert_rogue"), &user, &["echo", "no"]),
        "untrusted CA",
    );
    refused(
        &ssh_as(&s, &key("cert_principal"), &user, &["echo", "no"]),
        "wrong principal",
    );
    refused(
        &ssh_as(&s, &key("cert_expired"), &user, &["echo", "no"]),
        "expired certificate",
    );
    refused(
        &ssh_as(&s, &key("cert_source"), &user, &["echo", "no"]),
        "source-address mismatch",
    );
    accepted(
        &ssh_as(&s, &key("cert_forced"), &user, &["echo", "client"]),
        "cert-forced\n",
    );

    // Each refusal is logged with its reason (the expired one is refused by russh itself).
    let logs = s.logs.lines();
    for (id, reason) in [
        ("cert_rogue-id", "untrusted CA"),
        ("cert_principal-id", "is not a principal"),
        ("cert_source-id", "source-address"),
    ] {
        assert!(
            logs.iter()
                .any(|l| l.contains("certificate refused") && l.contains(id) && l.contains(reason)),
            "{id}: no refusal with {reason:?}:\n{}",
            logs.join("\n")
        );
    }

    std::fs::remove_file(key("cert_ok-cert.pub")).unwrap();
    refused(
        &ssh_as(&s, &key("cert_ok"), &user, &["echo", "no"]),
        "plain key of a certified key",
    );
}
