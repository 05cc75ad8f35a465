//! Events: the app's publish [`api`], the durable [`spool`] and its [`outbox`], the
//! [`forwarder`] to the bus; from the bus, [`webhook`] deliveries to the app (configured by a
//! [`subscription`]) and cache [`invalidation`], both reading through [`follow`].

pub mod api;
pub mod follow;
pub mod forwarder;
pub mod invalidation;
pub mod outbox;
pub mod spool;
pub mod subscription;
pub mod webhook;
