//! Gateway routes: a path prefix to a service, with an optional rewrite.

use serde::{Deserialize, Serialize};

/// A gateway route: requests whose path starts with `prefix` go to `service`, with the prefix
/// replaced by `rewrite` when set (`/api/markets/7` → `/markets/7` for prefix `/api/markets`,
/// rewrite `/markets`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub prefix: String,
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<String>,
}

impl Route {
    /// `PREFIX=SERVICE` or `PREFIX=SERVICE,REWRITE`.
    pub fn parse(s: &str) -> Result<Route, String> {
        let (prefix, rest) =
            s.split_once('=').ok_or_else(|| format!("route {s:?}: expected PREFIX=SERVICE[,REWRITE]"))?;
        let (service, rewrite) = match rest.split_once(',') {
            Some((svc, rw)) => (svc, Some(rw.to_string())),
            None => (rest, None),
        };
        let r = Route { prefix: prefix.to_string(), service: service.to_string(), rewrite };
        r.validate()?;
        Ok(r)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.prefix.starts_with('/') || self.rewrite.as_deref().is_some_and(|r| !r.starts_with('/')) {
            return Err(format!("route {}: prefix and rewrite must start with '/'", self.prefix));
        }
        if !mesh_proto::names::is_service_name(&self.service) {
            return Err(format!(
                "route {}: service {:?} must be {}",
                self.prefix,
                self.service,
                mesh_proto::names::SERVICE_NAME_RULE
            ));
        }
        Ok(())
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        path.strip_prefix(self.prefix.trim_end_matches('/'))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || self.prefix.ends_with('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_match_on_segment_boundaries() {
        let r = Route::parse("/api/markets=market-service,/markets").unwrap();
        assert_eq!(r.rewrite.as_deref(), Some("/markets"));
        assert!(r.matches("/api/markets"));
        assert!(r.matches("/api/markets/7"));
        assert!(!r.matches("/api/marketsx"));
        assert!(Route::parse("api=svc").is_err());
        assert!(Route::parse("/api=Bad_Svc").is_err());
        assert!(Route::parse("/api").is_err());
    }
}
