//! # cocoon
//!
//! A worker that gives people a real terminal, command execution and HTTP
//! access on a remote machine, and the clients that reach it.
//!
//! ## Layout
//!
//! - [`config`]: flags > environment > defaults.
//! - [`identity`]: the worker's secret and device id on disk.
//! - [`link`]: how bytes travel: the signaling WebSocket (data channels later).
//! - [`worker`]: registration, reconnection, dispatch to [`services`].
//! - [`client`]: the client side of the protocol.
//! - [`up`]: server and worker in one process for local use.
//! - [`cli`]: the `cocoon` command line.
//!
//! The wire protocol lives in [`cocoon_signaling::protocol`], shared with the
//! signaling server.

#![warn(missing_docs)]

pub mod cli;
pub mod client;
pub mod config;
pub mod identity;
pub mod link;
pub mod services;
pub mod session;
pub mod tls;
pub mod up;
pub mod worker;
