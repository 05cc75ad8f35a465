//! Metrics exposition with content negotiation: the registries render OpenMetrics; a scraper
//! that asks for it (`Accept: application/openmetrics-text`) gets that, every other one — the
//! Prometheus text format 0.0.4 being the default of Prometheus' own tools — gets the same
//! samples in that format.

/// OpenMetrics' media type, as answered.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's media type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type and body for a scrape whose `Accept` header is `accept`, from the
/// registry's OpenMetrics rendering.
pub fn negotiate(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    let wants_openmetrics = accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';');
            let kind = params.next().unwrap_or("").trim();
            let q = params
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            kind.eq_ignore_ascii_case("application/openmetrics-text") && q > 0.0
        })
    });
    if wants_openmetrics {
        (OPENMETRICS, openmetrics)
    } else {
        (PROMETHEUS_TEXT, to_prometheus_text(&openmetrics))
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4: a counter's family is named as its
/// samples are (`x_total`), an info metric becomes a gauge named `x_info`, and what that format
/// has no place for (`# UNIT`, `# EOF`, exemplars) is left out.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    use std::collections::HashMap;
    let mut renamed: HashMap<&str, (String, &str)> = HashMap::new();
    for line in openmetrics.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        match kind {
            "counter" if !name.ends_with("_total") => {
                renamed.insert(name, (format!("{name}_total"), "counter"));
            }
            "info" => {
                renamed.insert(name, (format!("{name}_info"), "gauge"));
            }
            "unknown" => {
                renamed.insert(name, (name.to_string(), "untyped"));
            }
            _ => {}
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = renamed.get(name).map_or(name, |(n, _)| n.as_str());
            out.push_str(&format!("# HELP {name} {help}\n"));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            match renamed.get(name) {
                Some((n, k)) => out.push_str(&format!("# TYPE {n} {k}\n")),
                None => out.push_str(&format!("# TYPE {name} {kind}\n")),
            }
            continue;
        }
        // A sample: drop an exemplar (` # {…} value [timestamp]`) after the value.
        let sample = match line.find(" # {") {
            Some(i) if !line.starts_with('#') => &line[..i],
            _ => line,
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "# HELP requests Requests.\n# TYPE requests counter\nrequests_total{code=\"200\"} 3 # {trace_id=\"abc\"} 1.0\n# HELP up Up.\n# TYPE up gauge\nup 1\n# HELP build Build.\n# TYPE build info\nbuild_info{version=\"1\"} 1\n# HELP size Bytes.\n# TYPE size gauge\n# UNIT size bytes\nsize 5\n# EOF\n";

    #[test]
    fn prometheus_text_names_families_as_their_samples_and_drops_what_it_cannot_say() {
        let text = to_prometheus_text(OM);
        assert_eq!(
            text,
            "# HELP requests_total Requests.\n# TYPE requests_total counter\nrequests_total{code=\"200\"} 3\n# HELP up Up.\n# TYPE up gauge\nup 1\n# HELP build_info Build.\n# TYPE build_info gauge\nbuild_info{version=\"1\"} 1\n# HELP size Bytes.\n# TYPE size gauge\nsize 5\n"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        assert_eq!(negotiate(None, OM.into()).0, PROMETHEUS_TEXT);
        assert_eq!(negotiate(Some("text/plain;version=0.0.4"), OM.into()).0, PROMETHEUS_TEXT);
        assert_eq!(negotiate(Some("*/*"), OM.into()).0, PROMETHEUS_TEXT);
        let prometheus =
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1";
        assert_eq!(negotiate(Some(prometheus), OM.into()), (OPENMETRICS, OM.to_string()));
        assert_eq!(negotiate(Some("application/openmetrics-text;q=0"), OM.into()).0, PROMETHEUS_TEXT);
    }
}
