//! Opinion markets (see `domain`).

pub mod domain;
