//! Request screening at the edge, before anything reaches a service:
//!
//! - **Limits** (per route, with gateway defaults): URI length (414), header count and total
//!   size (431), body size (413).
//! - **Request shape**: the request-smuggling shapes (`Content-Length` with
//!   `Transfer-Encoding`, a repeated or invalid `Content-Length`, a `Transfer-Encoding` other than
//!   `chunked`), methods outside the standard set, and paths that are not normalised (`.` or `..`
//!   segments, encoded slashes, dots or backslashes, NUL) — each a 4xx naming its rule.
//! - **Threat signatures** ([`threats`]): SQL injection and XSS in the query and the body, by a
//!   documented rule set, in `detect` (logged and counted) or `block` (403) mode per route.
//!
//! Every refusal is a [`Rule`]: a status, the rule's name (in the JSON body and the access log)
//! and what was wrong.

use http::{HeaderMap, Method, StatusCode, header};
pub use mesh_proto::gateway::{Limits, ThreatMode};

/// A screening refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub status: StatusCode,
    pub rule: &'static str,
    pub message: String,
}

impl Rule {
    fn new(status: StatusCode, rule: &'static str, message: impl Into<String>) -> Self {
        Rule { status, rule, message: message.into() }
    }
}

/// Methods a public API is called with; anything else (`TRACE`, `CONNECT`, extensions) is
/// refused at the edge.
const METHODS: [Method; 7] =
    [Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS];

/// [`METHODS`] as an `Allow` header value.
pub const ALLOWED: &str = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS";

/// The checks that need no route: method, smuggling shapes, path normalisation, URI and header
/// limits (`limits` are the gateway's; a route's own are checked again by [`route_limits`]).
pub fn request_shape(
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    limits: &Limits,
) -> Result<(), Rule> {
    if !METHODS.contains(method) {
        return Err(Rule::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
            format!("method {method} is not accepted here ({ALLOWED})"),
        ));
    }
    smuggling(headers)?;
    let path = path_and_query.split_once('?').map_or(path_and_query, |(p, _)| p);
    normalised(path)?;
    route_limits(path_and_query, headers, limits)
}

/// URI and header limits (a route may set tighter ones than the gateway's).
pub fn route_limits(path_and_query: &str, headers: &HeaderMap, limits: &Limits) -> Result<(), Rule> {
    if path_and_query.len() > limits.uri {
        return Err(Rule::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "the request target is {} bytes; at most {} are accepted",
                path_and_query.len(),
                limits.uri
            ),
        ));
    }
    if headers.len() > limits.headers {
        return Err(Rule::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_many_headers",
            format!("{} header fields; at most {} are accepted", headers.len(), limits.headers),
        ));
    }
    let size: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
    if size > limits.header_bytes {
        return Err(Rule::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the headers are {size} bytes; at most {} are accepted", limits.header_bytes),
        ));
    }
    Ok(())
}

/// The body's declared size against the limit (413 before any of it is read).
pub fn declared_body(headers: &HeaderMap, limits: &Limits) -> Result<(), Rule> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(n) if n > limits.body => Err(body_too_large(limits.body, Some(n))),
        _ => Ok(()),
    }
}

pub fn body_too_large(limit: u64, declared: Option<u64>) -> Rule {
    let size = declared.map_or("larger".to_string(), |n| format!("{n} bytes"));
    Rule::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is {size}; this route accepts at most {limit} bytes"),
    )
}

/// The refusal of a request-smuggling shape, by its rule — also what the edge answers for the
/// shapes the parser hides from these headers (reported by `transport::framing`).
pub fn smuggling_refusal(rule: &'static str) -> Rule {
    let message = match rule {
        "smuggling_cl_te" => "both Content-Length and Transfer-Encoding: send one framing",
        "smuggling_content_length" => "Content-Length is repeated: send it once",
        _ => "Transfer-Encoding: only a single `chunked` is accepted",
    };
    Rule::new(StatusCode::BAD_REQUEST, rule, message)
}

/// The request-smuggling shapes (RFC 9112 §6.3): a message whose framing two parsers could read
/// differently is refused, not guessed at.
fn smuggling(headers: &HeaderMap) -> Result<(), Rule> {
    let lengths: Vec<_> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    let te: Vec<_> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if !lengths.is_empty() && !te.is_empty() {
        return Err(smuggling_refusal("smuggling_cl_te"));
    }
    if lengths.len() > 1 {
        return Err(smuggling_refusal("smuggling_content_length"));
    }
    if let Some(cl) = lengths.first()
        && (cl.is_empty() || !cl.as_bytes().iter().all(u8::is_ascii_digit))
    {
        return Err(Rule::new(
            StatusCode::BAD_REQUEST,
            "smuggling_content_length",
            "Content-Length is not a number of bytes",
        ));
    }
    if te.len() > 1 || te.first().is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"chunked")) {
        return Err(smuggling_refusal("smuggling_transfer_encoding"));
    }
    Ok(())
}

/// A path that means what it says: no `.`/`..` segments, no encoded `/`, `\`, `.` or NUL (which
/// a service could decode into a different path than the one routed), no raw backslash.
fn normalised(path: &str) -> Result<(), Rule> {
    let refuse = |why: &str| {
        Err(Rule::new(StatusCode::BAD_REQUEST, "path_not_normalised", format!("path {path:?}: {why}")))
    };
    if !path.starts_with('/') && path != "*" {
        return refuse("must start with '/'");
    }
    if path.contains('\\') {
        return refuse("contains a backslash");
    }
    let lower = path.to_ascii_lowercase();
    for (enc, what) in [
        ("%2f", "an encoded '/'"),
        ("%5c", "an encoded '\\'"),
        ("%2e", "an encoded '.'"),
        ("%00", "an encoded NUL"),
        ("%25", "a doubly encoded character"),
    ] {
        if lower.contains(enc) {
            return refuse(&format!("contains {what}"));
        }
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return refuse("contains a '.' or '..' segment");
    }
    Ok(())
}

pub mod threats {
    //! SQL-injection and XSS signatures: a small, documented rule set (no maintained
    //! libinjection binding builds here without a C toolchain change). Input is percent- and
    //! plus-decoded (twice, for double encoding), lower-cased, SQL comments removed and
    //! whitespace collapsed; then each signature is a substring of the normalised text.
    //! Chosen to catch the classic probes (tautologies, UNION SELECT, stacked queries, time
    //! delays, script tags, event handlers, `javascript:` URLs) without refusing ordinary text
    //! such as "or" and "select" in a sentence.

    /// `(rule, signature)`: `sqli` for SQL injection, `xss` for cross-site scripting.
    pub const SIGNATURES: &[(&str, &str)] = &[
        ("sqli", "' or '1'='1"),
        ("sqli", "' or 1=1"),
        ("sqli", "\" or 1=1"),
        ("sqli", " or 1=1"),
        ("sqli", "' or ''='"),
        ("sqli", "'or'1'='1"),
        ("sqli", "union select"),
        ("sqli", "union all select"),
        ("sqli", "'; drop "),
        ("sqli", "; drop table"),
        ("sqli", "'; delete "),
        ("sqli", "'; insert "),
        ("sqli", "'; update "),
        ("sqli", "'; exec"),
        ("sqli", "' and 1=1"),
        ("sqli", "' and '1'='1"),
        ("sqli", "'--"),
        ("sqli", "' --"),
        ("sqli", "'#"),
        ("sqli", "sleep("),
        ("sqli", "pg_sleep("),
        ("sqli", "benchmark("),
        ("sqli", "waitfor delay"),
        ("sqli", "information_schema"),
        ("sqli", "xp_cmdshell"),
        ("sqli", "load_file("),
        ("sqli", "into outfile"),
        ("xss", "<script"),
        ("xss", "</script"),
        ("xss", "javascript:"),
        ("xss", "vbscript:"),
        ("xss", "<iframe"),
        ("xss", "<object"),
        ("xss", "<embed"),
        ("xss", "<svg"),
        ("xss", "onerror="),
        ("xss", "onload="),
        ("xss", "onmouseover="),
        ("xss", "onfocus="),
        ("xss", "onclick="),
        ("xss", "srcdoc="),
        ("xss", "document.cookie"),
        ("xss", "expression("),
    ];

    /// Percent- and plus-decoding (invalid escapes kept as they are).
    fn decode(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < s.len() => {
                    let hex = |c: u8| (c as char).to_digit(16);
                    match (hex(s[i + 1]), hex(s[i + 2])) {
                        (Some(a), Some(b)) => {
                            out.push((a * 16 + b) as u8);
                            i += 3;
                            continue;
                        }
                        _ => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        out
    }

    /// The text signatures are matched against.
    pub fn normalise(input: &[u8]) -> String {
        let once = decode(input);
        let twice = decode(&once);
        let text = String::from_utf8_lossy(&twice).to_lowercase();
        // SQL comments inside keywords (`UN/**/ION`) and runs of whitespace collapse.
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(start) = rest.find("/*") {
            out.push_str(&rest[..start]);
            out.push(' ');
            match rest[start + 2..].find("*/") {
                Some(end) => rest = &rest[start + 2 + end + 2..],
                None => rest = "",
            }
        }
        out.push_str(rest);
        let mut collapsed = String::with_capacity(out.len());
        let mut space = false;
        for c in out.chars() {
            let ws = c.is_whitespace() || c == '\u{0}';
            if ws && !space {
                collapsed.push(' ');
            } else if !ws {
                collapsed.push(c);
            }
            space = ws;
        }
        // Spaces around '=' and before '(' are optional to a database or a browser.
        collapsed.replace(" =", "=").replace("= ", "=").replace(" (", "(")
    }

    /// The first signature `input` matches: `(rule, signature)`.
    pub fn scan(input: &[u8]) -> Option<(&'static str, &'static str)> {
        if input.is_empty() {
            return None;
        }
        let text = normalise(input);
        SIGNATURES.iter().find(|(_, sig)| text.contains(sig)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn shape(method: &str, pq: &str, headers: &[(&str, &str)]) -> Result<(), &'static str> {
        let mut h = HeaderMap::new();
        for (n, v) in headers {
            h.append(http::HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        request_shape(&Method::from_bytes(method.as_bytes()).unwrap(), pq, &h, &Limits::DEFAULT)
            .map_err(|r| r.rule)
    }

    #[test]
    fn smuggling_shapes_bad_methods_and_unnormalised_paths_are_refused_by_rule() {
        assert_eq!(shape("GET", "/api/markets?x=1", &[]), Ok(()));
        assert_eq!(shape("POST", "/a", &[("content-length", "3")]), Ok(()));
        assert_eq!(shape("POST", "/a", &[("transfer-encoding", "chunked")]), Ok(()));
        let refused = [
            (
                "POST",
                "/a",
                vec![("content-length", "3"), ("transfer-encoding", "chunked")],
                "smuggling_cl_te",
            ),
            (
                "POST",
                "/a",
                vec![("content-length", "3"), ("content-length", "3")],
                "smuggling_content_length",
            ),
            ("POST", "/a", vec![("content-length", "3, 4")], "smuggling_content_length"),
            ("POST", "/a", vec![("content-length", "-1")], "smuggling_content_length"),
            ("POST", "/a", vec![("transfer-encoding", "gzip, chunked")], "smuggling_transfer_encoding"),
            (
                "POST",
                "/a",
                vec![("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
                "smuggling_transfer_encoding",
            ),
            ("TRACE", "/a", vec![], "method"),
            ("CONNECT", "/a", vec![], "method"),
            ("PURGE", "/a", vec![], "method"),
            ("GET", "/api/../admin", vec![], "path_not_normalised"),
            ("GET", "/api/./x", vec![], "path_not_normalised"),
            ("GET", "/api/%2e%2e/admin", vec![], "path_not_normalised"),
            ("GET", "/api%2Fadmin", vec![], "path_not_normalised"),
            ("GET", "/api/%252e", vec![], "path_not_normalised"),
            ("GET", "/a\\b", vec![], "path_not_normalised"),
            ("GET", "/a%00", vec![], "path_not_normalised"),
        ];
        for (m, p, h, rule) in refused {
            assert_eq!(shape(m, p, &h), Err(rule), "{m} {p} {h:?}");
        }
        // `..` in the query is no path segment.
        assert_eq!(shape("GET", "/a?next=../b", &[]), Ok(()));
    }

    #[test]
    fn limits_refuse_long_uris_many_or_large_headers_and_large_bodies() {
        let tight = Limits { uri: 20, headers: 2, header_bytes: 40, body: 10 };
        let h = |n: usize, v: &str| {
            let mut m = HeaderMap::new();
            for i in 0..n {
                m.insert(
                    http::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        assert_eq!(route_limits(&"/a".repeat(11), &h(0, ""), &tight).unwrap_err().status, 414);
        assert_eq!(route_limits("/", &h(3, "v"), &tight).unwrap_err().rule, "too_many_headers");
        assert_eq!(route_limits("/", &h(1, &"v".repeat(40)), &tight).unwrap_err().rule, "headers_too_large");
        let mut cl = HeaderMap::new();
        cl.insert(header::CONTENT_LENGTH, HeaderValue::from_static("11"));
        assert_eq!(declared_body(&cl, &tight).unwrap_err().status, 413);
        assert_eq!(Limits { uri: 5, ..Limits::default() }.or(Limits::DEFAULT).headers, 100);
    }

    #[test]
    fn threat_signatures_catch_the_classic_probes_but_not_ordinary_text() {
        for probe in [
            "id=1' OR '1'='1",
            "q=1%27%20or%201%3D1--",
            "q=1 UNION/**/SELECT password FROM users",
            "q=x';%20DROP%20TABLE%20markets;--",
            "q=1;waitfor delay '0:0:5'",
            "q=%253Cscript%253Ealert(1)%253C/script%253E",
            "{\"question\":\"<img src=x onerror=alert(1)>\"}",
            "next=javascript:alert(document.cookie)",
        ] {
            assert!(threats::scan(probe.as_bytes()).is_some(), "{probe}");
        }
        for fine in [
            "status=open&category=weather&limit=10",
            "{\"question\":\"Will it rain or snow tomorrow?\",\"outcomes\":[\"yes\",\"no\"]}",
            "{\"description\":\"Select the best option; update later\"}",
            "q=o'brien",
            "",
        ] {
            assert_eq!(threats::scan(fine.as_bytes()), None, "{fine}");
        }
        assert_eq!(threats::scan(b"<script>").map(|(r, _)| r), Some("xss"));
        assert_eq!(threats::scan(b"1 union select 2").map(|(r, _)| r), Some("sqli"));
    }
}
