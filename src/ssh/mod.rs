//! The embedded SSH server (russh).
//!
//! - [`server`]: listeners, accept loop, connection limits, russh configuration
//! - [`limits`]: MaxStartups random early drop, per-source startups and penalties
//! - [`auth`]: authorized_keys, certificates, login policy ([`authorized_keys`], [`patterns`])
//! - [`session`]: the per-connection russh handler (channels, requests)
//! - [`exec`]: running a command and pumping its stdin/stdout/stderr
//! - [`agent`]: agent forwarding (`auth-agent@openssh.com`)
//! - [`pty`]: pseudo-terminals for interactive shells

pub mod agent;
pub mod auth;
pub mod authorized_keys;
pub mod exec;
pub mod limits;
pub mod metrics;
pub mod patterns;
pub mod pty;
pub mod reload;
pub mod server;
pub mod session;
