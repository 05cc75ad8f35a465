//! The platform's edge (a sidecar in gateway mode): end-user identity ([`jwt`]).

pub mod jwt;
