//! Links: the ways bytes travel between a worker and a client. For now the
//! signaling WebSocket; data channels join later.

pub mod ws;
