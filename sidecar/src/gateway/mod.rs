//! The platform's edge (a sidecar in gateway mode): end-user identity — tokens verified
//! ([`jwt`]) and handed to apps ([`auth`]).

pub mod auth;
pub mod jwt;
