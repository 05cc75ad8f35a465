use std::time::Duration;

use proptest::prelude::*;

use super::*;

#[test]
fn defaults_are_valid_and_an_empty_wire_policy_means_defaults() {
    ServicePolicy::default().validate().unwrap();
    let from_wire = ServicePolicy::try_from(v1::ServicePolicy::default()).unwrap();
    assert_eq!(from_wire, ServicePolicy::default());
}

#[test]
fn explicit_zero_disables_instead_of_meaning_default() {
    let wire = v1::ServicePolicy {
        circuit_breaker: Some(v1::CircuitBreakerPolicy {
            consecutive_failures: Some(0),
            ..Default::default()
        }),
        timeout: Some(v1::TimeoutPolicy { request_ms: Some(0), ..Default::default() }),
        ..Default::default()
    };
    let p = ServicePolicy::try_from(wire).unwrap();
    assert_eq!(p.circuit_breaker.consecutive_failures, 0);
    assert_eq!(p.timeout.request, Duration::ZERO);
    assert_eq!(p.timeout.connect, TimeoutPolicy::default().connect);
}

#[test]
fn errors_name_the_field() {
    let cases: Vec<(&str, &str)> = vec![
        ("retry:\n  max_attempts: 11\n", "retry.max_attempts"),
        ("retry:\n  backoff_base: 1s\n  backoff_max: 10ms\n", "retry.backoff_max"),
        ("retry:\n  retry_on: []\n", "retry.retry_on"),
        ("load_balancer:\n  algorithm: consistent_hash\n", "load_balancer.hash_header"),
        ("load_balancer:\n  algorithm: random\n  hash_header: x-user\n", "load_balancer.hash_header"),
        ("health:\n  heartbeat_interval: 5s\n  heartbeat_ttl: 6s\n", "health.heartbeat_ttl"),
        ("health:\n  probe_path: healthz\n", "health.probe_path"),
        ("circuit_breaker:\n  max_ejection_percent: 101\n", "circuit_breaker.max_ejection_percent"),
        ("cache:\n  ttl: 10s\n  methods: [POST]\n", "cache.methods"),
        ("authz:\n  allowed_callers: [\"Not A Name\"]\n", "authz.allowed_callers"),
        ("external:\n  host: \"bad host\"\n  port: 443\n", "external"),
    ];
    for (yaml, field) in cases {
        let p: ServicePolicy = serde_yaml_ng::from_str(yaml).unwrap();
        let err = p.validate().expect_err(yaml);
        assert_eq!(err.field, field, "{yaml}: {err}");
        if yaml.contains("[]") {
            continue; // on the wire an empty list means the default list
        }
        // The wire path reports the same field.
        let err = ServicePolicy::try_from(v1::ServicePolicy::from(&p)).expect_err(yaml);
        assert_eq!(err.field, field, "{yaml}: {err}");
    }
}

#[test]
fn sub_millisecond_durations_are_refused() {
    let p: ServicePolicy = serde_yaml_ng::from_str("timeout:\n  request: 1500us\n").unwrap();
    assert_eq!(p.validate().unwrap_err().field, "timeout.request");
}

#[test]
fn unknown_fields_and_bad_durations_are_refused_when_parsing_files() {
    let e = serde_yaml_ng::from_str::<ServicePolicy>("retry:\n  max_attemps: 2\n").unwrap_err();
    assert!(e.to_string().contains("max_attemps"), "{e}");
    let e = serde_yaml_ng::from_str::<ServicePolicy>("timeout:\n  request: soon\n").unwrap_err();
    assert!(e.to_string().contains("not a duration"), "{e}");
    let e = serde_yaml_ng::from_str::<ServicePolicy>("retry:\n  retry_on: [teapot]\n").unwrap_err();
    assert!(e.to_string().contains("teapot"), "{e}");
}

#[test]
fn unknown_wire_values_are_refused() {
    let wire = v1::ServicePolicy {
        retry: Some(v1::RetryPolicy { retry_on: vec!["teapot".into()], ..Default::default() }),
        ..Default::default()
    };
    assert_eq!(ServicePolicy::try_from(wire).unwrap_err().field, "retry.retry_on");
    let wire = v1::ServicePolicy {
        load_balancer: Some(v1::LoadBalancer { algorithm: 99, hash_header: None }),
        ..Default::default()
    };
    assert_eq!(ServicePolicy::try_from(wire).unwrap_err().field, "load_balancer.algorithm");
}

#[test]
fn changes_list_dotted_paths() {
    let old = ServicePolicy::default();
    let mut new = old.clone();
    new.retry.max_attempts = 5;
    new.timeout.request = Duration::from_secs(2);
    let changes = old.changes(&new);
    let fields: Vec<_> = changes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(fields, ["retry.max_attempts", "timeout.request"]);
    assert_eq!(changes[0].old_value, "3");
    assert_eq!(changes[0].new_value, "5");
    assert_eq!(changes[1].new_value, "2s");
    assert!(old.changes(&old).is_empty());
}

fn ms_in(lo: u64, hi: u64) -> impl Strategy<Value = Duration> {
    prop_oneof![Just(Duration::ZERO), (lo..=hi).prop_map(Duration::from_millis)]
}

prop_compose! {
    fn arb_policy()(
        algorithm in prop_oneof![
            Just(Algorithm::RoundRobin), Just(Algorithm::Random), Just(Algorithm::LeastConnections),
            Just(Algorithm::P2cPeakEwma), Just(Algorithm::Weighted), Just(Algorithm::ConsistentHash)],
        hb in 100u64..=10_000,
        ttl_factor in prop_oneof![Just(0u64), 2u64..=10],
        probe in ms_in(100, 60_000),
        sp in 0u32..=100,
        cf in 0u32..=50, rate in 0u32..=100, open in 1u64..=10_000, extra_open in 0u64..=50_000,
        attempts in 0u32..=10, base in 1u64..=1000, extra_backoff in 0u64..=10_000,
        retry_on in proptest::sample::subsequence(RetryOn::ALL.to_vec(), 1..=7),
        budget in 0u32..=100, floor in 0u32..=1000,
        request in ms_in(1, 3_600_000), connect in ms_in(1, 300_000),
        cache_ttl in ms_in(1, 86_400_000), methods in prop_oneof![Just(vec!["GET".to_string()]), Just(vec!["GET".to_string(), "HEAD".to_string()])],
        rps in 0u32..=100_000, callers in proptest::collection::vec("[a-z][a-z0-9-]{0,10}[a-z0-9]", 0..3),
        anon in any::<bool>(),
        external in proptest::option::of(("[a-z]{1,10}(\\.[a-z]{1,5}){0,2}", 1u16..)),
    ) -> ServicePolicy {
        let mut p = ServicePolicy::default();
        p.load_balancer.algorithm = algorithm;
        p.load_balancer.hash_header = (algorithm == Algorithm::ConsistentHash).then(|| "x-user-id".to_string());
        p.health.heartbeat_interval = Duration::from_millis(hb);
        p.health.heartbeat_ttl = Duration::from_millis(hb * ttl_factor);
        p.health.probe_interval = probe;
        p.health.probe_timeout = probe.min(Duration::from_millis(500));
        p.health.self_preservation_percent = sp;
        p.circuit_breaker.consecutive_failures = cf;
        p.circuit_breaker.failure_rate_percent = rate;
        p.circuit_breaker.open_duration = Duration::from_millis(open);
        p.circuit_breaker.max_open_duration = Duration::from_millis(open + extra_open);
        p.retry.max_attempts = attempts;
        p.retry.backoff_base = Duration::from_millis(base);
        p.retry.backoff_max = Duration::from_millis(base + extra_backoff);
        p.retry.retry_on = retry_on;
        p.retry.budget_percent = budget;
        p.retry.budget_min_per_second = floor;
        p.timeout.request = request;
        p.timeout.connect = connect;
        p.cache.ttl = cache_ttl;
        p.cache.methods = methods;
        p.rate_limit.requests_per_second = rps;
        p.authz.allowed_callers = callers;
        p.authz.allow_unauthenticated = anon;
        p.external = external.map(|(host, port)| ExternalService { host, port });
        p
    }
}

proptest! {
    #[test]
    fn valid_policies_round_trip_through_the_wire_and_files(p in arb_policy()) {
        prop_assert_eq!(p.validate(), Ok(()));
        let wire = v1::ServicePolicy::from(&p);
        prop_assert_eq!(&ServicePolicy::try_from(wire.clone()).unwrap(), &p);
        // And through protobuf bytes.
        let bytes = prost::Message::encode_to_vec(&wire);
        let decoded = <v1::ServicePolicy as prost::Message>::decode(bytes.as_slice()).unwrap();
        prop_assert_eq!(&ServicePolicy::try_from(decoded).unwrap(), &p);
        // And through the YAML a user would write.
        let yaml = serde_yaml_ng::to_string(&p).unwrap();
        let back: ServicePolicy = serde_yaml_ng::from_str(&yaml).unwrap();
        prop_assert_eq!(back, p);
    }

    #[test]
    fn arbitrary_wire_policies_never_panic(
        attempts in any::<Option<u32>>(), ttl in any::<Option<u64>>(), hb in any::<Option<u64>>(),
        pct in any::<Option<u32>>(), algo in any::<i32>(), header in proptest::option::of(".{0,20}"),
    ) {
        let wire = v1::ServicePolicy {
            load_balancer: Some(v1::LoadBalancer { algorithm: algo, hash_header: header }),
            health: Some(v1::HealthPolicy { heartbeat_ttl_ms: ttl, heartbeat_interval_ms: hb, ..Default::default() }),
            retry: Some(v1::RetryPolicy { max_attempts: attempts, budget_percent: pct, ..Default::default() }),
            ..Default::default()
        };
        // Either a valid policy or an error naming a field; whatever is accepted validates.
        match ServicePolicy::try_from(wire) {
            Ok(p) => prop_assert_eq!(p.validate(), Ok(())),
            Err(e) => prop_assert!(!e.field.is_empty() && e.field.contains('.')),
        }
    }
}
