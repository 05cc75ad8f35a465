//! The proxies' byte streams: TCP with coalesced writes (`net`) and mutual TLS ([`tls`]).

pub(crate) mod net;
pub mod tls;
