//! The platform's edge (a sidecar in gateway mode): end-user identity — tokens verified
//! ([`jwt`]) and handed to apps ([`auth`]) — and the security middleware a public API needs,
//! composed in [`edge`]: client addresses ([`client`]), IP lists and automatic blocks
//! ([`ip_filter`]), request screening ([`screen`]), CORS ([`cors`]), rate limits
//! ([`rate_limit`]) and the access log ([`access_log`]).

pub mod access_log;
pub mod auth;
pub mod client;
pub mod cors;
pub mod edge;
pub mod ip_filter;
pub mod jwks_url;
pub mod jwt;
pub mod rate_limit;
pub mod screen;
