use std::os::unix::fs::PermissionsExt;

#[tokio::test]
async fn local_addresses_parse_and_unix_sockets_are_owner_only() {
    use crate::LocalAddr;
    assert_eq!("127.0.0.1:8081".parse::<LocalAddr>(), Ok(LocalAddr::Tcp("127.0.0.1:8081".parse().unwrap())));
    assert_eq!("unix:/run/a.sock".parse::<LocalAddr>(), Ok(LocalAddr::Unix("/run/a.sock".into())));
    assert_eq!(LocalAddr::Unix("/run/a.sock".into()).to_string(), "unix:/run/a.sock");
    assert!("unix:".parse::<LocalAddr>().is_err() && "nowhere".parse::<LocalAddr>().is_err());
    let dir = std::env::temp_dir().join(format!("mesh-sock-{}", std::process::id()));
    let path = dir.join("sub/app.sock");
    let first = crate::bind_unix(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    drop(first);
    crate::bind_unix(&path).expect("a stale socket is replaced");
    std::fs::write(dir.join("file"), b"").unwrap();
    assert!(crate::bind_unix(&dir.join("file")).is_err(), "a regular file is not replaced");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn secrets_are_read_trimmed_and_an_empty_or_missing_file_is_an_error() {
    let dir = std::env::temp_dir().join(format!("mesh-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("token");
    std::fs::write(&path, "  s3cret\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(crate::read_secret(&path).unwrap(), "s3cret");
    std::fs::write(&path, "\n").unwrap();
    assert!(crate::read_secret(&path).unwrap_err().contains("is empty"));
    let missing = dir.join("missing");
    assert!(crate::read_secret(&missing).unwrap_err().contains("missing"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn backoff_is_jittered_under_an_exponential_cap() {
    use std::time::Duration;
    let mut b = crate::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    for attempt in 0..20u32 {
        let cap = Duration::from_millis(100)
            .saturating_mul(2u32.saturating_pow(attempt))
            .min(Duration::from_secs(10));
        assert!(b.next_delay() <= cap);
    }
    let waits: Vec<_> = (0..50).map(|_| b.next_delay()).collect();
    assert!(waits.iter().any(|w| *w != waits[0]), "jittered");
    b.reset();
    assert!(b.next_delay() <= Duration::from_millis(100));
}

#[test]
fn rotation_walks_the_urls_in_turn() {
    let urls = vec!["a".to_string(), "b".to_string()];
    let mut r = crate::Rotation::new(&urls);
    assert_eq!([r.next_url(), r.next_url(), r.next_url()], ["a", "b", "a"]);
}

#[test]
fn error_bodies_have_one_shape() {
    let b = crate::error_body(404, "no_route", "no route for /x", serde_json::json!({"path": "/x"}));
    assert_eq!(
        b,
        serde_json::json!({
            "type": "urn:mesh:problem:no_route", "title": "No route", "status": 404, "detail": "no route for /x",
            "error": "no_route", "message": "no route for /x", "path": "/x",
        })
    );
    assert_eq!(
        crate::hex(&crate::sha256(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_ne!(crate::sha256_parts(&[b"ab", b"c"]), crate::sha256_parts(&[b"a", b"bc"]));
    // RFC 4648 §10 vectors, padded; and back.
    for (plain, coded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(crate::base64(plain.as_bytes()), coded);
        assert_eq!(crate::base64_decode(coded).as_deref(), Some(plain.as_bytes()));
    }
    assert_eq!(crate::base64_decode("Zm9v!"), None);
    // RFC 4648 §10 vectors, base64url without padding.
    let b64: Vec<String> = ["", "f", "fo", "foo", "foob", "fooba", "foobar"]
        .iter()
        .map(|s| crate::base64url(s.as_bytes()))
        .collect();
    assert_eq!(b64, ["", "Zg", "Zm8", "Zm9v", "Zm9vYg", "Zm9vYmE", "Zm9vYmFy"]);
    assert_eq!(crate::base64url(&[0xfb, 0xff]), "-_8");
}

#[test]
fn secrets_are_written_owner_only_and_kept_when_asked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("mesh-write-secret-{}", std::process::id()));
    let path = dir.join("sub/token");
    crate::write_secret(&path, "one", crate::Existing::Keep).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let again = crate::write_secret(&path, "two", crate::Existing::Keep).unwrap_err();
    assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    crate::write_secret(&path, "three", crate::Existing::Replace).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "three");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600,
        "made owner-only again"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_digit_table_spells_every_byte() {
    for (b, pair) in crate::digest::HEX_PAIRS.iter().enumerate() {
        assert_eq!(std::str::from_utf8(pair).unwrap(), format!("{b:02x}"));
    }
    assert_eq!(crate::hex(&[0x00, 0x9f, 0xff]), "009fff");
}

#[test]
fn a_span_names_itself_as_the_next_hops_parent_in_w3c_form() {
    use crate::telemetry::{SpanContext, traceparent};
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
    let id = |flags| {
        SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            flags,
            false,
            TraceState::default(),
        )
    };
    assert_eq!(
        traceparent(&id(TraceFlags::SAMPLED)),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    assert_eq!(
        traceparent(&id(TraceFlags::default())),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    );
}
