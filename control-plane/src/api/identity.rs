//! `mesh.v1.Identity`: certificates for proven services, bootstrap tokens.

use crate::{
    api::{Api, status::store_status},
    ca,
};

use mesh_proto::{names, v1};
use tonic::{Request, Response, Status};

/// Tokens are stored as the hex SHA-256 of the token.
fn token_hash(token: &str) -> String {
    mesh_runtime::hex(&mesh_runtime::sha256(token.as_bytes()))
}

fn check_service(service: &str) -> Result<(), Status> {
    names::check_service(service).map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl v1::identity_server::Identity for Api {
    async fn certify(
        &self,
        req: Request<v1::CertifyRequest>,
    ) -> Result<Response<v1::CertifyResponse>, Status> {
        let r = req.into_inner();
        check_service(&r.service)?;
        let allowed = if r.token.is_empty() {
            None
        } else {
            self.0.store.token_service(&token_hash(&r.token)).map_err(store_status)?
        };
        match allowed {
            None => {
                return Err(Status::unauthenticated(
                    "no valid bootstrap token: create one with `meshctl identity token create SERVICE`",
                ));
            }
            Some(s) if s != r.service => {
                return Err(Status::permission_denied(format!(
                    "this token is for service {s}, not {}",
                    r.service
                )));
            }
            Some(_) => {}
        }
        let (pem, expires) = self.0.ca.certify(&r.service, &r.csr_pem, std::time::SystemTime::now())?;
        let id = ca::spiffe_id(&self.0.ca.trust_domain, &r.service);
        tracing::info!(service = %r.service, node = %r.node_id, %id, "certificate issued");
        if !r.node_id.is_empty() {
            self.0.proxies.certified(&r.node_id, &id, mesh_proto::unix_ms(expires));
        }
        Ok(Response::new(v1::CertifyResponse {
            certificate_chain_pem: pem,
            trust_anchors_pem: self.0.ca.root_pem.clone(),
            expires_at_unix_ms: mesh_proto::unix_ms(expires),
            spiffe_id: id,
        }))
    }

    async fn create_token(
        &self,
        req: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        self.admin(&req, "create a bootstrap token")?;
        let service = req.into_inner().service;
        check_service(&service)?;
        let token =
            mesh_runtime::random_token().ok_or_else(|| Status::internal("no randomness for a token"))?;
        self.0.store.token_add(&token_hash(&token), &service).await.map_err(store_status)?;
        Ok(Response::new(v1::CreateTokenResponse { token, service }))
    }

    async fn revoke_tokens(
        &self,
        req: Request<v1::RevokeTokensRequest>,
    ) -> Result<Response<v1::RevokeTokensResponse>, Status> {
        self.admin(&req, "revoke bootstrap tokens")?;
        let service = req.into_inner().service;
        check_service(&service)?;
        let n = self.0.store.tokens_revoke(&service).await.map_err(store_status)?;
        Ok(Response::new(v1::RevokeTokensResponse { revoked: n as u32 }))
    }

    async fn trust_bundle(
        &self,
        _: Request<v1::TrustBundleRequest>,
    ) -> Result<Response<v1::TrustBundleResponse>, Status> {
        Ok(Response::new(v1::TrustBundleResponse {
            trust_anchors_pem: self.0.ca.root_pem.clone(),
            trust_domain: self.0.ca.trust_domain.clone(),
        }))
    }
}
