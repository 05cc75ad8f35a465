//! Registry semantics in virtual time: every call takes `now`, so these tests step time exactly
//! (to the millisecond around each TTL edge) without sleeping.

use std::time::Duration;

use mesh_proto::policy::ServicePolicy;

use super::*;
use crate::store::Store;

const MS: Duration = Duration::from_millis(1);
const GRACE: Duration = Duration::from_secs(15);

struct Fixture {
    _dir: tempfile::TempDir,
    reg: Registry,
    policies: Arc<Policies>,
    t0: Instant,
}

async fn fixture_with(health: impl FnOnce(&mut HealthPolicy)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (store, loaded) = Store::open(dir.path()).unwrap();
    let policies = Arc::new(Policies::new(store.clone(), loaded.policies).unwrap());
    let mut p = ServicePolicy::default();
    health(&mut p.health);
    policies.set("svc", p, None, false).await.unwrap();
    let t0 = Instant::now();
    let reg =
        Registry::new(store, policies.clone(), Metrics::new(), loaded.epoch, loaded.instances, t0, GRACE);
    Fixture { _dir: dir, reg, policies, t0 }
}

/// TTL 3s, heartbeat 1s, deregister 10s after expiry, self-preservation off.
async fn fixture() -> Fixture {
    fixture_with(|h| {
        h.heartbeat_interval = Duration::from_secs(1);
        h.heartbeat_ttl = Duration::from_secs(3);
        h.deregister_after = Duration::from_secs(10);
        h.self_preservation_percent = 0;
    })
    .await
}

fn inst(id: &str) -> v1::Instance {
    v1::Instance {
        service: "svc".into(),
        id: id.into(),
        address: format!("127.0.0.1:{}", 1000 + id.len()),
        ..Default::default()
    }
}

fn hb(id: &str, health: v1::HealthStatus) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest { service: "svc".into(), instance_id: id.into(), health: health.into(), load: 3 }
}

fn endpoints(reg: &Registry) -> Vec<String> {
    reg.watch("svc").borrow().endpoints.iter().map(|e| e.instance_id.clone()).collect()
}

#[tokio::test]
async fn ttl_is_a_lower_bound_and_expiry_removes_from_discovery() {
    let f = fixture().await;
    let r = f.reg.register(inst("a"), f.t0).await.unwrap();
    assert_eq!((r.heartbeat_interval_ms, r.ttl_ms), (1000, 3000));
    assert_eq!(endpoints(&f.reg), ["a"]);

    // Exactly at the TTL: not yet.
    assert!(f.reg.sweep(f.t0 + Duration::from_secs(3)).expired.is_empty());
    assert_eq!(endpoints(&f.reg), ["a"]);
    // One millisecond past it: expired and gone from discovery, still registered.
    let s = f.reg.sweep(f.t0 + Duration::from_secs(3) + MS);
    assert_eq!(s.expired, [("svc".to_string(), "a".to_string())]);
    assert!(endpoints(&f.reg).is_empty());
    let view = f.reg.get_service("svc", f.t0 + Duration::from_secs(4)).unwrap();
    assert_eq!(view.instances[0].health(), v1::HealthStatus::Expired);
}

#[tokio::test]
async fn heartbeats_renew_the_ttl_and_carry_health() {
    let f = fixture().await;
    f.reg.register(inst("a"), f.t0).await.unwrap();
    let mut rx = f.reg.watch("svc");
    let v0 = rx.borrow_and_update().version;
    for s in 1..=10 {
        let r = f.reg.heartbeat(&hb("a", v1::HealthStatus::Healthy), f.t0 + Duration::from_secs(s * 2));
        assert!(r.known);
        assert!(
            f.reg.sweep(f.t0 + Duration::from_secs(s * 2) + Duration::from_millis(2999)).expired.is_empty()
        );
    }
    // Renewals of a healthy instance publish nothing.
    assert!(!rx.has_changed().unwrap());

    // Reported unhealthy: leaves discovery; healthy again: back, each with a higher version.
    let t = f.t0 + Duration::from_secs(21);
    f.reg.heartbeat(&hb("a", v1::HealthStatus::Unhealthy), t);
    assert!(endpoints(&f.reg).is_empty());
    let v1_ = rx.borrow_and_update().version;
    f.reg.heartbeat(&hb("a", v1::HealthStatus::Healthy), t + MS);
    assert_eq!(endpoints(&f.reg), ["a"]);
    let v2 = rx.borrow_and_update().version;
    assert!(v0 < v1_ && v1_ < v2, "{v0} {v1_} {v2}");
    assert_eq!(f.reg.get_service("svc", t).unwrap().instances[0].load, 3);
}

#[tokio::test]
async fn an_expired_instance_that_heartbeats_again_returns() {
    let f = fixture().await;
    f.reg.register(inst("a"), f.t0).await.unwrap();
    f.reg.sweep(f.t0 + Duration::from_secs(4));
    assert!(endpoints(&f.reg).is_empty());
    assert!(f.reg.heartbeat(&hb("a", v1::HealthStatus::Healthy), f.t0 + Duration::from_secs(5)).known);
    assert_eq!(endpoints(&f.reg), ["a"]);
}

#[tokio::test]
async fn expired_instances_are_deregistered_after_the_delay_durably() {
    let f = fixture().await;
    f.reg.register(inst("a"), f.t0).await.unwrap();
    f.reg.register(inst("bb"), f.t0).await.unwrap();
    let expired_at = f.t0 + Duration::from_secs(4);
    f.reg.heartbeat(&hb("bb", v1::HealthStatus::Healthy), expired_at);
    f.reg.sweep_and_deregister(expired_at).await.unwrap();
    // Not before the delay.
    let s = f.reg.sweep_and_deregister(expired_at + Duration::from_secs(10) - MS).await.unwrap();
    assert!(s.due.is_empty());
    let s = f.reg.sweep_and_deregister(expired_at + Duration::from_secs(10)).await.unwrap();
    assert_eq!(s.due, [("svc".to_string(), "a".to_string())]);
    assert!(
        !f.reg.heartbeat(&hb("a", v1::HealthStatus::Healthy), expired_at + Duration::from_secs(11)).known
    );
    let Fixture { _dir: dir, reg, policies, .. } = f;
    drop((reg, policies));
    let (_, loaded) = Store::open(dir.path()).unwrap();
    let ids: Vec<_> = loaded.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["bb"]);
}

#[tokio::test]
async fn self_preservation_never_expires_more_than_the_share_per_window() {
    let f = fixture_with(|h| {
        h.heartbeat_interval = Duration::from_secs(1);
        h.heartbeat_ttl = Duration::from_secs(3);
        h.deregister_after = Duration::ZERO;
        h.self_preservation_percent = 50;
        h.self_preservation_window = Duration::from_secs(60);
    })
    .await;
    for id in ["a", "b", "c", "d"] {
        f.reg.register(inst(id), f.t0).await.unwrap();
    }
    // All four go silent (a network partition, say).
    let s = f.reg.sweep(f.t0 + Duration::from_secs(4));
    assert_eq!(s.expired.len(), 2, "{s:?}");
    assert_eq!(s.held.len(), 2);
    assert_eq!(endpoints(&f.reg).len(), 2);
    // Held instances are counted once, not on every sweep.
    let s = f.reg.sweep(f.t0 + Duration::from_secs(5));
    assert!(s.expired.is_empty() && s.held.is_empty(), "{s:?}");
    // Once the window has passed, the guard allows the next share.
    let s = f.reg.sweep(f.t0 + Duration::from_secs(64));
    assert_eq!(s.expired.len(), 2, "{s:?}");
    assert!(endpoints(&f.reg).is_empty());
}

#[tokio::test]
async fn a_restart_gives_stored_instances_a_fresh_ttl_and_versions_keep_increasing() {
    let f = fixture().await;
    f.reg.register(inst("a"), f.t0).await.unwrap();
    let before = f.reg.watch("svc").borrow().version;
    let dir = f._dir;
    drop(f.reg);
    drop(f.policies);

    // The control plane was down far longer than the TTL.
    let restart = f.t0 + Duration::from_secs(600);
    let (store, loaded) = Store::open(dir.path()).unwrap();
    let policies = Arc::new(Policies::new(store.clone(), loaded.policies).unwrap());
    let reg = Registry::new(store, policies, Metrics::new(), loaded.epoch, loaded.instances, restart, GRACE);
    assert_eq!(endpoints(&reg), ["a"]);
    assert!(reg.watch("svc").borrow().version > before);
    // Its sidecar is still backing off: no expiry within the grace period plus the TTL…
    assert!(reg.sweep(restart + GRACE).expired.is_empty());
    assert!(reg.sweep(restart + GRACE + Duration::from_secs(3)).expired.is_empty());
    // …and once it heartbeats, ordinary TTL rules apply again.
    assert!(reg.heartbeat(&hb("a", v1::HealthStatus::Healthy), restart + Duration::from_secs(2)).known);
    assert!(reg.sweep(restart + Duration::from_secs(5)).expired.is_empty());
    assert_eq!(reg.sweep(restart + Duration::from_secs(5) + MS).expired.len(), 1);
}

#[tokio::test]
async fn bad_instances_are_refused_with_the_field() {
    let f = fixture().await;
    let cases = [
        (v1::Instance { service: "Bad_Name".into(), ..inst("a") }, "service"),
        (v1::Instance { id: "".into(), ..inst("a") }, "id"),
        (v1::Instance { address: "nowhere".into(), ..inst("a") }, "address"),
        (v1::Instance { address: "127.0.0.1:0".into(), ..inst("a") }, "address"),
        (v1::Instance { weight: 2_000_000, ..inst("a") }, "weight"),
    ];
    for (i, field) in cases {
        let e = f.reg.register(i, f.t0).await.unwrap_err();
        assert!(matches!(&e, RegistryError::Invalid(m) if m.starts_with(field)), "{e}");
    }
    assert!(f.reg.get_service("svc", f.t0).is_none());
}

#[test]
fn revisions_are_monotonic_across_epochs() {
    let a = Revisions::new(1);
    let first = a.next();
    let second = a.next();
    assert!(first < second);
    let b = Revisions::new(2);
    assert!(b.next() > second);
}
