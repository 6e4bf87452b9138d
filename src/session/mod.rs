//! The session layer: numbered byte streams with acknowledgements, carried
//! by session frames ([`cocoon_signaling::protocol::frame`]) over whichever
//! link is live. Stream 0 carries control messages (the service protocol's
//! JSON, length-prefixed); each terminal has a stream of its own bytes.
//!
//! - [`stream`]: what a sender keeps until acknowledged, how a receiver
//!   takes each byte once, and message framing;
//! - [`peer`]: the worker's side of one client's session;
//! - [`client`]: the client's side.

pub mod client;
pub mod peer;
pub mod stream;
