//! How long and how much of each topic the bus keeps.

use std::time::Duration;

/// How long and how much of each topic the bus keeps; older events go first.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Events older than this are dropped (0: no age limit).
    pub max_age: Duration,
    /// Per topic, the oldest events are dropped beyond this many bytes (0: no size limit).
    pub max_bytes: u64,
}

impl Retention {
    /// A week, and 1 GiB per topic.
    pub const DEFAULT: Retention = Retention { max_age: Duration::from_secs(7 * 86_400), max_bytes: 1 << 30 };
}

impl Default for Retention {
    fn default() -> Self {
        Retention::DEFAULT
    }
}
