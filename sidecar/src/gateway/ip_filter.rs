//! Who may call at all: IP allow and deny lists (CIDR, IPv4 and IPv6, each entry with an
//! optional expiry), and automatic temporary blocks of a client that trips screening rules or
//! fails authentication `after` times within `window` (fail2ban-like), lifted after `block_for`
//! or by an operator (`DELETE /gateway/blocks/{ip}` on the admin listener, `meshctl gateway
//! unblock`).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
pub use mesh_proto::gateway::IpRule;
use serde::Serialize;
use tokio::time::Instant;

/// Automatic blocking: `after` strikes within `window` block the client for `block_for`
/// (`after` 0: off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoBlock {
    pub after: u32,
    pub window: Duration,
    pub block_for: Duration,
}

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// On the deny list.
    Denied,
    /// An allow list is set and the client is not on it.
    NotAllowed,
    /// Blocked automatically, for this much longer.
    Blocked(Duration),
}

impl Denied {
    pub fn rule(self) -> &'static str {
        match self {
            Denied::Denied => "ip_denied",
            Denied::NotAllowed => "ip_not_allowed",
            Denied::Blocked(_) => "ip_blocked",
        }
    }
}

#[derive(Debug)]
enum Client {
    /// Strikes in the current window, which started at `since`.
    Striking {
        since: Instant,
        strikes: u32,
    },
    Blocked {
        until: Instant,
        reason: &'static str,
    },
}

/// Most clients tracked (striking or blocked); past it, expired entries are dropped, then new
/// strikes are not recorded (the lists still apply).
const MAX_CLIENTS: usize = 100_000;

pub struct IpFilter {
    allow: Vec<IpRule>,
    deny: Vec<IpRule>,
    /// The control plane's lists (the `gateway` policy), on top of the gateway's own.
    pushed: ArcSwap<(Vec<IpRule>, Vec<IpRule>)>,
    auto: AutoBlock,
    clients: Mutex<HashMap<IpAddr, Client>>,
}

/// A blocked client, as the admin endpoint lists it.
#[derive(Debug, Clone, Serialize)]
pub struct Block {
    pub ip: IpAddr,
    pub seconds_left: u64,
    /// The rule whose strike blocked it.
    pub reason: &'static str,
}

impl IpFilter {
    pub fn new(allow: Vec<IpRule>, deny: Vec<IpRule>, auto: AutoBlock) -> Self {
        Self { allow, deny, pushed: ArcSwap::default(), auto, clients: Mutex::new(HashMap::new()) }
    }

    /// Puts the control plane's allow and deny lists in force (replacing the previous ones).
    pub fn set_pushed(&self, allow: Vec<IpRule>, deny: Vec<IpRule>) {
        self.pushed.store(std::sync::Arc::new((allow, deny)));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Client>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `ip` may call now.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Denied> {
        let wall = SystemTime::now();
        let pushed = self.pushed.load();
        if self.deny.iter().chain(&pushed.1).any(|r| r.applies(ip, wall)) {
            return Err(Denied::Denied);
        }
        let mut allow = self.allow.iter().chain(&pushed.0).filter(|r| r.live(wall)).peekable();
        if allow.peek().is_some() && !allow.any(|r| r.cidr.contains(&ip)) {
            return Err(Denied::NotAllowed);
        }
        if self.auto.after == 0 {
            return Ok(());
        }
        let mut clients = self.lock();
        match clients.get(&ip) {
            Some(Client::Blocked { until, .. }) if *until > now => Err(Denied::Blocked(*until - now)),
            Some(Client::Blocked { .. }) => {
                clients.remove(&ip);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Records a strike (a screening refusal or an authentication failure) against `ip`:
    /// `true` when it blocks the client now.
    pub fn strike(&self, ip: IpAddr, rule: &'static str, now: Instant) -> bool {
        if self.auto.after == 0 {
            return false;
        }
        let mut clients = self.lock();
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&ip) {
            let window = self.auto.window;
            clients.retain(|_, c| match c {
                Client::Striking { since, .. } => now.duration_since(*since) < window,
                Client::Blocked { until, .. } => *until > now,
            });
            if clients.len() >= MAX_CLIENTS {
                return false;
            }
        }
        let entry = clients.entry(ip).or_insert(Client::Striking { since: now, strikes: 0 });
        match entry {
            Client::Blocked { .. } => false,
            Client::Striking { since, strikes } => {
                if now.duration_since(*since) >= self.auto.window {
                    *since = now;
                    *strikes = 0;
                }
                *strikes += 1;
                if *strikes >= self.auto.after {
                    *entry = Client::Blocked { until: now + self.auto.block_for, reason: rule };
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Clients blocked now.
    pub fn blocks(&self, now: Instant) -> Vec<Block> {
        let mut list: Vec<Block> = self
            .lock()
            .iter()
            .filter_map(|(ip, c)| match c {
                Client::Blocked { until, reason } if *until > now => {
                    Some(Block { ip: *ip, seconds_left: (*until - now).as_secs().max(1), reason })
                }
                _ => None,
            })
            .collect();
        list.sort_by_key(|b| b.ip);
        list
    }

    /// Lifts a block (and forgets the client's strikes): whether there was one.
    pub fn unblock(&self, ip: IpAddr) -> bool {
        matches!(self.lock().remove(&ip), Some(Client::Blocked { .. }))
    }

    /// Drops expired strikes and blocks (the periodic sweep).
    pub fn sweep(&self, now: Instant) {
        let window = self.auto.window;
        self.lock().retain(|_, c| match c {
            Client::Striking { since, .. } => now.duration_since(*since) < window,
            Client::Blocked { until, .. } => *until > now,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_and_allow_lists_take_cidrs_of_both_families_with_expiry() {
        let past = "2000-01-01T00:00:00Z";
        let f = IpFilter::new(
            vec![IpRule::parse("10.0.0.0/8").unwrap(), IpRule::parse("2001:db8::/32").unwrap()],
            vec![
                IpRule::parse("10.1.0.0/16").unwrap(),
                IpRule::parse(&format!("10.2.0.0/16@{past}")).unwrap(),
                IpRule::parse("2001:db8::dead").unwrap(),
            ],
            AutoBlock { after: 0, window: Duration::ZERO, block_for: Duration::ZERO },
        );
        let now = Instant::now();
        assert_eq!(f.check(ip("10.9.9.9"), now), Ok(()));
        assert_eq!(f.check(ip("10.1.2.3"), now), Err(Denied::Denied));
        assert_eq!(f.check(ip("10.2.2.3"), now), Ok(()), "an expired deny entry no longer applies");
        assert_eq!(f.check(ip("2001:db8::1"), now), Ok(()));
        assert_eq!(f.check(ip("2001:db8::dead"), now), Err(Denied::Denied));
        assert_eq!(f.check(ip("192.0.2.1"), now), Err(Denied::NotAllowed));
        assert!(IpRule::parse("10.0.0.0/33").is_err() && IpRule::parse("x").is_err());
        // The control plane's lists add to the gateway's own.
        f.set_pushed(vec![IpRule::parse("192.0.2.0/24").unwrap()], vec![IpRule::parse("10.9.9.9").unwrap()]);
        assert_eq!(f.check(ip("192.0.2.1"), now), Ok(()));
        assert_eq!(f.check(ip("10.9.9.9"), now), Err(Denied::Denied));
        f.set_pushed(vec![], vec![]);
        assert_eq!(f.check(ip("10.9.9.9"), now), Ok(()));
        assert!(IpRule::parse("10.0.0.0/8@tomorrow").is_err());
    }

    #[test]
    fn strikes_within_the_window_block_for_a_while_then_the_client_is_served_again() {
        let auto =
            AutoBlock { after: 3, window: Duration::from_secs(10), block_for: Duration::from_secs(60) };
        let f = IpFilter::new(vec![], vec![], auto);
        let (a, t0) = (ip("192.0.2.7"), Instant::now());
        assert!(!f.strike(a, "sqli", t0));
        assert!(!f.strike(a, "sqli", t0 + Duration::from_secs(11)), "the window restarted");
        assert!(!f.strike(a, "sqli", t0 + Duration::from_secs(12)));
        assert!(f.strike(a, "token_bad_signature", t0 + Duration::from_secs(13)));
        let t = t0 + Duration::from_secs(14);
        assert_eq!(f.check(a, t), Err(Denied::Blocked(Duration::from_secs(59))));
        assert_eq!(f.check(ip("192.0.2.8"), t), Ok(()), "only that client");
        assert_eq!(f.blocks(t)[0].reason, "token_bad_signature");
        assert_eq!(f.check(a, t0 + Duration::from_secs(74)), Ok(()), "served again after the block");
        for s in 0..3 {
            f.strike(a, "sqli", t + Duration::from_secs(100 + s));
        }
        assert!(f.unblock(a) && !f.unblock(a));
        assert_eq!(f.check(a, t + Duration::from_secs(104)), Ok(()));
    }
}
