//! The sidecar's side of the control plane: the [`session`] (discovery and policy streams, ACK
//! / NACK), [`registration`] with heartbeats, the [`probe`] of the local app's health, and the
//! [`on_demand`] session (taps and probes an operator asks for).

pub mod client;
pub mod on_demand;
pub mod probe;
pub mod registration;
pub mod session;
pub mod tap;
