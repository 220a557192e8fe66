//! tm-sidecar: the SSH transfer-manager and monitord sidecar for OpenNebula front-ends.
//!
//! Layout (see README "Architecture"):
//! - [`config`]: flags, env, TOML file → validated [`config::Config`]
//! - [`ssh`]: the embedded SSH server (russh): accept loop, auth, sessions, exec, agent, pty
//! - [`transfer`]: confined filesystem, native scp and SFTP
//! - [`monitord`]: the monitord relay on 4124 TCP+UDP
//! - [`admin`]: HTTP health, readiness, metrics and the host table
//! - [`collect`]: scrape-time metrics (process figures)
//! - [`memory`]: returning freed heap to the system after transfers
//! - [`resources`]: the open-files limit
//! - [`keys`]: host keys and `keygen`

pub mod admin;
pub mod collect;
pub mod config;
pub mod escape;
#[doc(hidden)]
pub mod fuzzing;
pub mod keys;
pub mod logging;
pub mod memory;
pub mod monitord;
pub mod resources;
pub mod ssh;
pub mod transfer;
