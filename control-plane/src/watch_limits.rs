//! Bounds on the service names callers watch (discovery and policy streams).
//!
//! Every watched name costs the control plane an entry until the watch ends, so a caller — one
//! mesh identity, shared by all instances of its service, or the admin — may hold at most
//! [`MAX_NAMES_PER_CALLER`] distinct names across all of its open streams at once (on top of
//! [`crate::api::MAX_WATCHED_SERVICES`] per stream). Instances of one service watch the same
//! few names, so the bound counts names, not streams: a fleet of any size fits, while one stolen
//! certificate cannot make the registry grow without bound.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tonic::Status;

/// Distinct service names one caller may watch at once, across all its streams.
pub const MAX_NAMES_PER_CALLER: usize = 4096;

/// Names held per caller, each with the number of streams holding it.
#[derive(Default)]
pub struct WatchLimits {
    held: Mutex<HashMap<String, HashMap<String, u32>>>,
}

/// The names one stream holds; dropping it lets them go.
pub struct Lease {
    limits: Arc<WatchLimits>,
    caller: String,
    names: Vec<String>,
}

impl WatchLimits {
    /// A lease on `names` for `caller`, or `RESOURCE_EXHAUSTED` naming the bound.
    pub fn acquire(self: &Arc<Self>, caller: &str, names: &[String]) -> Result<Lease, Status> {
        let mut lease = Lease { limits: self.clone(), caller: caller.to_string(), names: Vec::new() };
        lease.replace(names)?;
        Ok(lease)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, u32>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Lease {
    /// Holds `names` instead of what this lease held; refused (holding what it held) when the
    /// caller would pass [`MAX_NAMES_PER_CALLER`].
    pub fn replace(&mut self, names: &[String]) -> Result<(), Status> {
        let mut all = self.limits.lock();
        let held = all.entry(self.caller.clone()).or_default();
        // Names nobody holds yet, and names only this lease holds that it would let go.
        let new = names.iter().filter(|n| !held.contains_key(*n)).count();
        let freed = self.names.iter().filter(|n| !names.contains(n) && held.get(*n) == Some(&1)).count();
        if held.len() + new - freed > MAX_NAMES_PER_CALLER {
            return Err(Status::resource_exhausted(format!(
                "{} would watch more than {MAX_NAMES_PER_CALLER} distinct services at once across its streams; \
                 close streams or watch fewer names",
                self.caller
            )));
        }
        for n in names {
            *held.entry(n.clone()).or_default() += 1;
        }
        for n in &self.names {
            release(held, n);
        }
        if held.is_empty() {
            all.remove(&self.caller);
        }
        self.names = names.to_vec();
        Ok(())
    }
}

fn release(held: &mut HashMap<String, u32>, name: &str) {
    if let Some(n) = held.get_mut(name) {
        *n -= 1;
        if *n == 0 {
            held.remove(name);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut all = self.limits.lock();
        if let Some(held) = all.get_mut(&self.caller) {
            for n in &self.names {
                release(held, n);
            }
            if held.is_empty() {
                all.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}-{i}")).collect()
    }

    #[test]
    fn a_caller_holds_at_most_the_bound_of_distinct_names_across_streams() {
        let limits = Arc::new(WatchLimits::default());
        let a = limits.acquire("svc", &names("a", MAX_NAMES_PER_CALLER - 1)).unwrap();
        // The same names again (another instance of the service) cost nothing.
        let same = limits.acquire("svc", &names("a", MAX_NAMES_PER_CALLER - 1)).unwrap();
        let mut b = limits.acquire("svc", &names("b", 1)).unwrap();
        let err = limits.acquire("svc", &names("c", 1)).err().unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("4096"), "{}", err.message());
        // Another caller has its own bound.
        let _other = limits.acquire("web", &names("c", 10)).unwrap();
        // Replacing a lease's names frees the old ones.
        b.replace(&names("c", 1)).unwrap();
        drop((a, same, b));
        assert!(limits.lock().get("svc").is_none(), "every name let go");
        let _again = limits.acquire("svc", &names("d", MAX_NAMES_PER_CALLER)).unwrap();
    }
}
