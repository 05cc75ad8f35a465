//! The sidecar's mesh identity: a key pair made here (the private key never leaves this
//! process), a certificate for `spiffe://<trust-domain>/service/<service>` from the control
//! plane's CA (`Identity.Certify`, proven with the service's bootstrap token), renewed at two
//! thirds of its lifetime. Rotation swaps the identity atomically: connections already open keep
//! the certificate they were made with; new ones get the new one.

pub(crate) mod cell;
pub mod cert;

pub use cert::Identity;

use crate::{identity::cell::Certified, shared::Shared};

use mesh_proto::{dial::Dialer, v1};
use mesh_runtime::{Backoff, Rotation};
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};
use tokio_util::sync::CancellationToken;

/// One CSR → certificate exchange with the control plane at `url`.
pub async fn obtain(
    dialer: &Dialer,
    url: &str,
    service: &str,
    node_id: &str,
    token: &str,
) -> Result<Identity, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot generate a key pair: {e}"))?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("cannot build a CSR: {e}"))?;
    let ep = Dialer::endpoint(url).map_err(|e| e.to_string())?.connect_timeout(Duration::from_secs(3));
    let ch = dialer.connect(ep).await.map_err(|e| e.to_string())?;
    let issued = SystemTime::now();
    let r = v1::identity_client::IdentityClient::new(ch)
        .certify(v1::CertifyRequest {
            service: service.into(),
            csr_pem: csr,
            token: token.into(),
            node_id: node_id.into(),
        })
        .await
        .map_err(|s| format!("the CA refused: {}", s.message()))?
        .into_inner();
    Ok(Identity {
        spiffe_id: r.spiffe_id,
        certificate_pem: r.certificate_chain_pem,
        private_key_pem: key.serialize_pem(),
        trust_anchors_pem: r.trust_anchors_pem,
        expires: SystemTime::UNIX_EPOCH + Duration::from_millis(r.expires_at_unix_ms),
        issued,
    })
}

/// When to renew: two thirds into the certificate's lifetime.
pub fn renew_at(id: &Identity) -> SystemTime {
    let life = id.expires.duration_since(id.issued).unwrap_or_default();
    id.issued + life * 2 / 3
}

/// Keeps `shared.identity` certified until `stop`: obtains a certificate, renews it at two
/// thirds of its lifetime, retries failures with backoff (the old certificate serves meanwhile).
pub async fn run(shared: Arc<Shared>, token: String, stop: CancellationToken) {
    let service = shared.identity_service();
    let mut urls = Rotation::new(&shared.config.control_plane);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let url = urls.next_url();
        let certified =
            obtain(&shared.dialer, url, &service, &shared.config.instance_id, &token).await.and_then(|id| {
                Certified::new(id).map_err(|e| format!("the issued certificate is unusable: {e}"))
            });
        let wait = match certified {
            Ok(c) => {
                let id = &c.id;
                backoff.reset();
                let next = renew_at(id);
                let m = &shared.metrics;
                m.certificate_expiry.set(mesh_proto::unix_ms(id.expires) as i64 / 1000);
                if shared.identity.current().is_some() {
                    m.certificate_rotations.inc();
                }
                tracing::info!(id = %id.spiffe_id, expires = %humantime::format_rfc3339_seconds(id.expires), "certificate issued");
                shared.identity.store(c);
                next.duration_since(SystemTime::now()).unwrap_or_default()
            }
            Err(e) => {
                shared.metrics.certificate_failures.inc();
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "getting a certificate failed");
                wait
            }
        };
        if !Backoff::sleep(wait, &stop).await {
            return;
        }
    }
}
