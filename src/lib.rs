//! # cocoon
//!
//! A worker that gives people a real terminal, command execution and HTTP
//! access on a remote machine, and the clients that reach it.
//!
//! ## Layout
//!
//! - [`config`]: flags > environment > defaults.
//! - [`identity`]: the worker's secret and device id on disk.
//! - [`link`]: how frames travel: the signaling WebSocket (and its relay),
//!   WebRTC data channels.
//! - [`session`]: streams with offsets and acks over whichever link is live;
//!   the worker's side ([`session::peer`]) and the client's
//!   ([`session::client`]).
//! - [`services`]: execute, PTY sessions, HTTP proxy, local queries.
//! - [`worker`]: registration, reconnection, dispatch to the services.
//! - [`client`]: authenticating and talking to the signaling server.
//! - [`up`]: server and worker in one process for local use.
//! - [`doctor`]: why this machine does or does not get peer-to-peer paths.
//! - [`remote`]: `attach`, `exec` and `forward`, the client commands that reach a device.
//! - [`kinds`]: `COCOON_KINDS`, the kinds of worker a hive spawns.
//! - [`hive`]: the hive that starts workers of those kinds on request.
//! - [`container`], [`start`]: workers in Docker or Podman containers.
//! - [`service`]: the worker as a systemd user unit or a launchd agent.
//! - [`cli`]: the `cocoon` command line.
//!
//! Each floor uses only the floors below it: services know nothing of
//! links, links nothing of services; the session layer joins them.
//!
//! The wire protocol lives in [`cocoon_signaling::protocol`], shared with the
//! signaling server.

#![warn(missing_docs)]

pub mod cli;
pub mod client;
pub mod config;
pub mod container;
pub mod doctor;
pub mod hive;
pub mod identity;
pub mod kinds;
pub mod link;
pub mod remote;
pub mod service;
pub mod services;
pub mod session;
pub mod start;
pub mod tls;
pub mod up;
pub mod worker;
