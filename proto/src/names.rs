//! Validation of the names that cross the wire: services, instance ids, topics, header names,
//! SPIFFE ids and socket addresses. Each check says what it accepts so errors can repeat it.

/// Service names: DNS labels — 1..=63 of `[a-z0-9-]`, starting with a letter, not ending in `-`.
pub fn is_service_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

pub const SERVICE_NAME_RULE: &str =
    "1..=63 characters of a-z, 0-9 and '-', starting with a letter and not ending in '-'";

/// Instance ids: 1..=128 of `[A-Za-z0-9._:-]`.
pub fn is_instance_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

pub const INSTANCE_ID_RULE: &str = "1..=128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'";

/// Topics: 1..=128 of `[a-z0-9._-]`.
pub fn is_topic(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'))
}

pub const TOPIC_RULE: &str = "1..=128 characters of a-z, 0-9, '.', '_' and '-'";

/// `Ok` for a service name, otherwise the sentence saying what a service name must be.
pub fn check_service(s: &str) -> Result<(), String> {
    if is_service_name(s) { Ok(()) } else { Err(format!("service {s:?} must be {SERVICE_NAME_RULE}")) }
}

/// Lowercase HTTP header names (RFC 9110 token characters).
pub fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// The mesh identity of a service: `spiffe://<trust-domain>/service/<service>` (with an empty
/// `service`, the prefix every service identity of that trust domain starts with).
pub fn spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/service/{service}")
}

/// `spiffe://<trust-domain>/<path>` with a non-empty trust domain and path.
pub fn is_spiffe_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else { return false };
    let Some((domain, path)) = rest.split_once('/') else { return false };
    !domain.is_empty()
        && !path.is_empty()
        && s.len() <= 2048
        && domain.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'-'))
        && path.bytes().all(|c| c.is_ascii_graphic())
}

/// `host:port` with a non-zero port; host a name or an IP (IPv6 in brackets).
pub fn is_host_port(s: &str) -> bool {
    if s.parse::<std::net::SocketAddr>().is_ok_and(|a| a.port() != 0) {
        return true;
    }
    let Some((host, port)) = s.rsplit_once(':') else { return false };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        });
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for ok in ["a", "market-service", "svc2", &"a".repeat(63)] {
            assert!(is_service_name(ok), "{ok}");
        }
        for bad in ["", "1svc", "Svc", "svc-", "svc_x", "svc.x", &"a".repeat(64)] {
            assert!(!is_service_name(bad), "{bad}");
        }
    }

    #[test]
    fn host_ports() {
        for ok in ["127.0.0.1:80", "[::1]:4143", "market-1.default.svc:8080", "localhost:1"] {
            assert!(is_host_port(ok), "{ok}");
        }
        for bad in ["127.0.0.1", "host:0", ":80", "host:99999", "a b:80", "host..x:1"] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[test]
    fn spiffe_ids() {
        assert!(is_spiffe_id("spiffe://mesh.local/service/market-service"));
        assert!(!is_spiffe_id("spiffe://mesh.local"));
        assert!(!is_spiffe_id("spiffe:///service/x"));
        assert!(!is_spiffe_id("https://mesh.local/service/x"));
    }

    #[test]
    fn ids_topics_headers() {
        assert!(is_instance_id("market-service-7f3a:4143"));
        assert!(!is_instance_id("has space"));
        assert!(is_topic("market.events"));
        assert!(!is_topic("Market"));
        assert!(is_header_name("x-user-id"));
        assert!(!is_header_name("X-User"));
    }
}
