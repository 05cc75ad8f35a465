//! The sidecar's side of the control plane: the [`session`] (discovery and policy streams, ACK
//! / NACK), [`registration`] with heartbeats, and the [`probe`] of the local app's health.

pub mod client;
pub mod probe;
pub mod registration;
pub mod session;
