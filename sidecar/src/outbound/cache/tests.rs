use std::time::Duration;

use http::HeaderValue;

use super::*;

fn policy() -> CachePolicy {
    CachePolicy {
        ttl: Duration::from_secs(60),
        stale_if_error: Duration::from_secs(30),
        ..Default::default()
    }
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}

fn req<'a>(h: &'a HeaderMap) -> Request<'a> {
    Request { method: &Method::GET, path_and_query: "/markets/1", headers: h, since: None }
}

fn put(c: &Cache, p: &CachePolicy, reqh: &HeaderMap, resph: &HeaderMap, now: Instant) -> bool {
    c.store(p, &req(reqh), StatusCode::OK, resph, &Bytes::from_static(b"body"), now)
}

fn fresh(c: &Cache, p: &CachePolicy, reqh: &HeaderMap, now: Instant) -> bool {
    matches!(c.lookup(&c.keys(p, &req(reqh)), now), Lookup::Fresh(_))
}

#[tokio::test(start_paused = true)]
async fn answers_are_never_served_across_authorizations_unless_public() {
    let (c, p, now) = (Cache::default(), policy(), Instant::now());
    let alice = headers(&[("authorization", "Bearer alice")]);
    let bob = headers(&[("authorization", "Bearer bob")]);
    assert!(put(&c, &p, &alice, &HeaderMap::new(), now));
    assert!(fresh(&c, &p, &alice, now));
    assert!(!fresh(&c, &p, &bob, now), "bob never gets alice's answer");
    assert!(!fresh(&c, &p, &HeaderMap::new(), now), "nor does an anonymous caller");
    let c = Cache::default();
    assert!(put(&c, &p, &alice, &headers(&[("cache-control", "public, max-age=30")]), now));
    assert!(fresh(&c, &p, &bob, now), "a public answer may be shared");
}

#[tokio::test(start_paused = true)]
async fn no_store_private_and_no_cache_answers_are_not_kept() {
    let (c, p, now) = (Cache::default(), policy(), Instant::now());
    for cc in ["no-store", "private", "no-cache", "private, max-age=60"] {
        let h = headers(&[("cache-control", cc)]);
        assert!(!put(&c, &p, &HeaderMap::new(), &h, now), "{cc}");
    }
    assert!(
        !Cache::applies(&p, &req(&headers(&[("cache-control", "no-cache")]))),
        "a no-cache request bypasses"
    );
    assert!(
        !Cache::applies(&CachePolicy { ttl: Duration::ZERO, ..policy() }, &req(&HeaderMap::new())),
        "ttl 0: off"
    );
    let post =
        Request { method: &Method::POST, path_and_query: "/x", headers: &HeaderMap::new(), since: None };
    assert!(!Cache::applies(&p, &post));
}

#[tokio::test(start_paused = true)]
async fn vary_headers_split_entries_and_max_age_shortens_the_ttl() {
    let (c, p, now) = (Cache::default(), policy(), Instant::now());
    let en = headers(&[("accept-language", "en")]);
    let fr = headers(&[("accept-language", "fr")]);
    assert!(put(&c, &p, &en, &headers(&[("vary", "Accept-Language"), ("cache-control", "max-age=5")]), now));
    assert!(fresh(&c, &p, &en, now));
    assert!(!fresh(&c, &p, &fr, now), "another language is another entry");
    assert!(!fresh(&c, &p, &en, now + Duration::from_secs(5)), "max-age 5 beats the policy's 60");
    assert!(
        matches!(c.lookup(&c.keys(&p, &req(&en)), now + Duration::from_secs(30)), Lookup::Stale(_)),
        "stale-if-error window"
    );
    assert!(matches!(c.lookup(&c.keys(&p, &req(&en)), now + Duration::from_secs(36)), Lookup::Miss));
}

#[tokio::test(start_paused = true)]
async fn size_limits_evict_the_oldest_and_invalidation_drops_by_prefix() {
    let now = Instant::now();
    let p = CachePolicy { max_entries: 2, ..policy() };
    let c = Cache::default();
    for path in ["/a/1", "/a/2", "/b/1"] {
        let h = HeaderMap::new();
        let r = Request { method: &Method::GET, path_and_query: path, headers: &h, since: None };
        assert!(c.store(&p, &r, StatusCode::OK, &HeaderMap::new(), &Bytes::from_static(b"x"), now));
    }
    assert_eq!(c.size().0, 2, "the oldest went");
    assert_eq!(c.invalidate("/a/"), 1);
    assert_eq!(c.size().0, 1);
    assert!(c.size().1 > 0);
}

#[tokio::test]
async fn concurrent_misses_have_one_leader() {
    let c = Cache::default();
    assert!(c.join("k").is_none(), "the first is the leader");
    let mut follower = c.join("k").expect("the second follows");
    c.land("k");
    follower.wait_for(|done| *done).await.unwrap();
    assert!(c.join("k").is_none(), "after landing, a new flight can start");
}

#[tokio::test(start_paused = true)]
async fn a_write_drops_its_target_and_its_ancestors_and_nothing_else() {
    let (c, p, now) = (Cache::default(), policy(), Instant::now());
    let h = HeaderMap::new();
    for path in [
        "/markets",
        "/markets?status=open",
        "/markets/7",
        "/markets/7/trades",
        "/markets/8",
        "/markets/7/history",
    ] {
        let r = Request { method: &Method::GET, path_and_query: path, headers: &h, since: None };
        assert!(c.store(&p, &r, StatusCode::OK, &HeaderMap::new(), &Bytes::from_static(b"x"), now));
    }
    assert_eq!(c.invalidate_written("/markets/7/trades?x=1"), 4);
    assert_eq!(c.size().0, 2, "/markets/8 and /markets/7/history are kept");
}

#[tokio::test(start_paused = true)]
async fn an_answer_fetched_before_an_invalidation_is_not_kept() {
    let (c, p, now) = (Cache::default(), policy(), Instant::now());
    let h = HeaderMap::new();
    let since = Some(c.generation());
    c.invalidate_written("/markets/1/trades");
    let r = Request { method: &Method::GET, path_and_query: "/markets/1", headers: &h, since };
    assert!(!c.store(&p, &r, StatusCode::OK, &HeaderMap::new(), &Bytes::from_static(b"old"), now));
    let r = Request { since: Some(c.generation()), ..r };
    assert!(c.store(&p, &r, StatusCode::OK, &HeaderMap::new(), &Bytes::from_static(b"new"), now));
}
