//! Authorization of callers by their verified mesh identity.

use crate::server::PeerIdentity;

/// Whether `caller` (a verified identity) may call a service with `authz`: listed by its
/// service name or its whole id, or anyone authenticated when the list is empty.
pub fn authorized(authz: &mesh_proto::policy::AuthzPolicy, caller: &PeerIdentity) -> bool {
    authz.allowed_callers.is_empty()
        || authz.allowed_callers.iter().any(|a| a == caller.id() || Some(a.as_str()) == caller.service())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_authorized_by_service_or_whole_id() {
        let web = PeerIdentity::new("spiffe://mesh/service/web".into());
        let allow = |list: &[&str]| mesh_proto::policy::AuthzPolicy {
            allowed_callers: list.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(authorized(&allow(&[]), &web));
        assert!(authorized(&allow(&["api", "web"]), &web));
        assert!(authorized(&allow(&["spiffe://mesh/service/web"]), &web));
        assert!(!authorized(&allow(&["api"]), &web));
        assert!(!authorized(&allow(&["spiffe://other/service/web"]), &web));
        assert!(!authorized(&allow(&["service/web"]), &web));
    }
}
