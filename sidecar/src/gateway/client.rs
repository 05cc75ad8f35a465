//! The client behind a request: its address is the connection's peer, unless the peer is a
//! trusted proxy (`--trusted-proxies`), in which case `X-Forwarded-For` is read from the right,
//! skipping trusted hops. What the app receives — `X-Forwarded-For`, `X-Forwarded-Proto` and
//! `Forwarded` (RFC 7239) — is set here; a client's own are kept only from a trusted proxy.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, header::FORWARDED};
use ipnet::IpNet;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The address a request is from.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|h| h.trim().parse::<IpAddr>().ok())
        .collect();
    hops.iter().rev().find(|ip| !is_trusted(ip)).or(hops.first()).copied().unwrap_or(peer)
}

/// Sets the forwarding headers the app reads: the chain so far (a trusted proxy's, else none)
/// plus the peer, the scheme, and the RFC 7239 form.
pub fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr, client: IpAddr, trusted: &[IpNet], tls: bool) {
    let from_proxy = trusted.iter().any(|n| n.contains(&peer));
    let chain = from_proxy
        .then(|| {
            let prior: Vec<&str> =
                headers.get_all(X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
            (!prior.is_empty()).then(|| prior.join(", "))
        })
        .flatten();
    let proto = match (from_proxy, headers.get(X_FORWARDED_PROTO).and_then(|v| v.to_str().ok())) {
        (true, Some(p)) if p == "http" || p == "https" => p.to_string(),
        _ if tls => "https".into(),
        _ => "http".into(),
    };
    headers.remove(X_FORWARDED_FOR);
    headers.remove(X_FORWARDED_PROTO);
    headers.remove(FORWARDED);
    let xff = match chain {
        Some(c) => format!("{c}, {peer}"),
        None => peer.to_string(),
    };
    let node = match client {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    for (name, value) in [
        (X_FORWARDED_FOR, xff),
        (X_FORWARDED_PROTO, proto.clone()),
        (FORWARDED, format!("for={node};proto={proto}")),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(xff: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        if !xff.is_empty() {
            m.insert(X_FORWARDED_FOR, xff.parse().unwrap());
        }
        m
    }

    #[test]
    fn x_forwarded_for_counts_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let (proxy, stranger): (IpAddr, IpAddr) =
            ("10.0.0.5".parse().unwrap(), "198.51.100.9".parse().unwrap());
        assert_eq!(
            client_ip(stranger, &h("1.2.3.4"), &trusted),
            stranger,
            "a client cannot claim an address"
        );
        assert_eq!(client_ip(proxy, &h("1.2.3.4, 10.0.0.7"), &trusted).to_string(), "1.2.3.4");
        assert_eq!(
            client_ip(proxy, &h("6.6.6.6, 1.2.3.4"), &trusted).to_string(),
            "1.2.3.4",
            "the rightmost untrusted hop"
        );
        assert_eq!(client_ip(proxy, &h(""), &trusted), proxy);
        assert_eq!(client_ip(proxy, &h("garbage"), &[]), proxy);
    }

    #[test]
    fn the_app_gets_forwarding_headers_a_client_cannot_forge() {
        let peer: IpAddr = "198.51.100.9".parse().unwrap();
        let mut m = h("1.2.3.4");
        m.insert(FORWARDED, "for=1.2.3.4".parse().unwrap());
        m.insert(X_FORWARDED_PROTO, "https".parse().unwrap());
        set_forwarded(&mut m, peer, peer, &[], false);
        assert_eq!(m[X_FORWARDED_FOR], "198.51.100.9");
        assert_eq!(m[X_FORWARDED_PROTO], "http");
        assert_eq!(m[FORWARDED], "for=198.51.100.9;proto=http");
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let mut m = h("2001:db8::1");
        set_forwarded(&mut m, proxy, "2001:db8::1".parse().unwrap(), &["10.0.0.0/8".parse().unwrap()], true);
        assert_eq!(m[X_FORWARDED_FOR], "2001:db8::1, 10.0.0.5");
        assert_eq!(m[FORWARDED], "for=\"[2001:db8::1]\";proto=https");
    }
}
