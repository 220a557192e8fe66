//! Agent forwarding for the nested `ssh <hypervisor>` inside TM scripts, with a stock sshd
//! playing the hypervisor that only the agent's key opens.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::agent::Agent;
use common::{Sidecar, StockSshd, make_key, run};

const T: Duration = Duration::from_secs(120);

/// `ssh [-A] fe <cmd>` with the agent in the environment, as oned's ssh_forward does.
fn fe_ssh(s: &Sidecar, agent: &Agent, forward: bool, cmd: &str) -> Command {
    let mut c = Command::new("ssh");
    let opts: Vec<String> = s
        .ssh_opts()
        .into_iter()
        .map(|o| {
            if o == "IdentityAgent=none" {
                format!("IdentityAgent={}", agent.sock.display())
            } else {
                o
            }
        })
        .collect();
    c.args(opts)
        .args([
            "-o",
            if forward {
                "ForwardAgent=yes"
            } else {
                "ForwardAgent=no"
            },
        ])
        .args(["-o", "ControlMaster=no", "-o", "ControlPath=none"])
        .args(["-p", &s.ssh.port().to_string()])
        .arg(format!("{}@127.0.0.1", common::me()))
        .arg(cmd)
        .env("SSH_AUTH_SOCK", &agent.sock)
        .stdin(Stdio::null());
    c
}

fn nested(hv: &StockSshd, cmd: &str) -> String {
    format!(
        "ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
         -o LogLevel=ERROR -p {} {}@127.0.0.1 {}",
        hv.port,
        common::me(),
        shell_words::quote(cmd)
    )
}

#[test]
fn nested_ssh_uses_the_forwarded_agent() {
    let s = Sidecar::start();
    let (hv_key, hv_pub) = make_key(s.dir.path(), "hv_key");
    let hv = StockSshd::start(&hv_pub);
    let agent = Agent::start(s.dir.path(), &hv_key);

    let out = run(&mut fe_ssh(&s, &agent, true, &nested(&hv, "echo ok")), T);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ok\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // a tar pipeline from the sidecar session into the hypervisor
    let src = s.root.join("1");
    std::fs::create_dir_all(src.join("img.snap")).unwrap();
    std::fs::write(src.join("img"), b"image bytes").unwrap();
    std::fs::write(src.join("img.snap/0"), b"snapshot").unwrap();
    let dst = s.dir.path().join("hv_ds");
    std::fs::create_dir_all(&dst).unwrap();
    let script = format!(
        "tar -C {} -cf - img img.snap | {}",
        src.display(),
        nested(&hv, &format!("tar -xf - -C {}", dst.display()))
    );
    let out = run(&mut fe_ssh(&s, &agent, true, &script), T);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dst.join("img")).unwrap(), b"image bytes");
    assert_eq!(std::fs::read(dst.join("img.snap/0")).unwrap(), b"snapshot");

    // without forwarding the nested ssh has no key
    let out = run(&mut fe_ssh(&s, &agent, false, &nested(&hv, "echo ok")), T);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    // and SSH_AUTH_SOCK is not set at all
    let out = run(
        &mut fe_ssh(&s, &agent, false, "echo \"[$SSH_AUTH_SOCK]\""),
        T,
    );
    assert_eq!(out.stdout, b"[]\n");
}

#[test]
fn agent_socket_is_private_and_removed_after_the_session() {
    let s = Sidecar::start();
    let (key, _) = make_key(s.dir.path(), "k");
    let agent = Agent::start(s.dir.path(), &key);
    let out = run(
        &mut fe_ssh(
            &s,
            &agent,
            true,
            "echo $SSH_AUTH_SOCK; stat -c %a $(dirname $SSH_AUTH_SOCK)",
        ),
        T,
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let sock = lines.next().expect("socket path").to_string();
    assert_eq!(lines.next(), Some("700"));
    // The listing through the forwarded agent shows the key.
    let out = run(&mut fe_ssh(&s, &agent, true, "ssh-add -l"), T);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ED25519"));
    // gone once the session ended (the server removes it when the channel closes)
    let deadline = std::time::Instant::now() + T;
    while std::path::Path::new(&sock).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "agent socket {sock} left behind"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
