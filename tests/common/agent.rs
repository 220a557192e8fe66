//! A real `ssh-agent` holding one key, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::run;

const T: Duration = Duration::from_secs(120);

pub struct Agent {
    /// `SSH_AUTH_SOCK` of the agent.
    pub sock: PathBuf,
    pid: String,
}

impl Agent {
    /// Start an agent with its socket in `dir` and add `key` to it.
    pub fn start(dir: &Path, key: &Path) -> Agent {
        let sock = dir.join("agent.sock");
        let out = run(Command::new("ssh-agent").arg("-a").arg(&sock).arg("-s"), T);
        assert!(out.status.success(), "ssh-agent failed");
        let text = String::from_utf8_lossy(&out.stdout);
        let pid = text
            .split(';')
            .find_map(|p| p.trim().strip_prefix("SSH_AGENT_PID="))
            .expect("agent pid")
            .to_string();
        let add = run(
            Command::new("ssh-add").arg(key).env("SSH_AUTH_SOCK", &sock),
            T,
        );
        assert!(
            add.status.success(),
            "ssh-add: {}",
            String::from_utf8_lossy(&add.stderr)
        );
        Agent { sock, pid }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(&self.pid).status();
    }
}
