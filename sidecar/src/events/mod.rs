//! Events: the app's publish `api`, the durable `spool` and its `outbox`, the
//! `forwarder` to the bus; from the bus, `webhook` deliveries to the app (configured by a
//! [`subscription`]) and cache `invalidation`, both reading through `follow`.

pub(crate) mod api;
pub(crate) mod cloudevent;
pub(crate) mod follow;
pub(crate) mod forwarder;
pub(crate) mod invalidation;
pub(crate) mod outbox;
pub(crate) mod spool;
pub mod subscription;
pub(crate) mod webhook;
