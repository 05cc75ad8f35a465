//! A webhook subscription as configured: topic, path, group, attempts, dead-letter topic, timeouts.

use mesh_proto::{names, policy::human_duration};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A webhook subscription of the local app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    pub topic: String,
    /// The app's path that receives each event as a POST.
    pub path: String,
    /// Consumer group; default: the service name (its instances share the group's offset and
    /// one of them receives at a time).
    #[serde(default)]
    pub group: Option<String>,
    /// Deliveries of one event before it goes to the dead-letter topic. Default 5.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Default `<topic>.dead-letter`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// How long the app has to answer one delivery. Default 10s.
    #[serde(default = "default_timeout", with = "human_duration")]
    pub timeout: Duration,
    /// First retry delay (full jitter, doubling up to `backoff_max`). Default 100ms.
    #[serde(default = "default_backoff_base", with = "human_duration")]
    pub backoff_base: Duration,
    /// Default 10s.
    #[serde(default = "default_backoff_max", with = "human_duration")]
    pub backoff_max: Duration,
}

fn default_max_attempts() -> u32 {
    5
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_backoff_base() -> Duration {
    Duration::from_millis(100)
}

fn default_backoff_max() -> Duration {
    Duration::from_secs(10)
}

impl Subscription {
    /// `TOPIC=PATH` from the command line, with the defaults for the rest.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (topic, path) = s
            .split_once('=')
            .ok_or_else(|| format!("--subscribe {s:?}: expected TOPIC=PATH, e.g. markets=/events"))?;
        Ok(Subscription {
            topic: topic.trim().to_string(),
            path: path.trim().to_string(),
            group: None,
            max_attempts: default_max_attempts(),
            dead_letter_topic: None,
            timeout: default_timeout(),
            backoff_base: default_backoff_base(),
            backoff_max: default_backoff_max(),
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        let topic_rule = names::TOPIC_RULE;
        if !names::is_topic(&self.topic) {
            return Err(format!("subscription topic {:?}: {topic_rule}", self.topic));
        }
        if !self.path.starts_with('/') {
            return Err(format!("subscription to {}: path {:?} must start with '/'", self.topic, self.path));
        }
        if let Some(g) = &self.group
            && !names::is_topic(g)
        {
            return Err(format!("subscription to {}: group {g:?}: {topic_rule}", self.topic));
        }
        if let Some(d) = &self.dead_letter_topic
            && (!names::is_topic(d) || *d == self.topic)
        {
            return Err(format!(
                "subscription to {}: dead_letter_topic {d:?}: {topic_rule}, not the topic itself",
                self.topic
            ));
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err(format!("subscription to {}: max_attempts must be 1..=100", self.topic));
        }
        if self.timeout.is_zero() || self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return Err(format!(
                "subscription to {}: timeout and backoff_base must be > 0 and backoff_max >= backoff_base",
                self.topic
            ));
        }
        Ok(())
    }

    pub fn dead_letter(&self) -> String {
        self.dead_letter_topic.clone().unwrap_or_else(|| format!("{}.dead-letter", self.topic))
    }
}
