//! The proxies' byte streams: TCP with coalesced writes (`net`), mutual TLS ([`tls`]) and the
//! gateway's public TLS ([`public_tls`]).

pub mod framing;
pub(crate) mod net;
pub mod public_tls;
pub mod tls;
