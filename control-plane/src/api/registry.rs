//! `mesh.v1.Registry`: register, heartbeat, deregister, list.

use crate::api::{Api, BoxStream, status::refused, streams::GaugeGuard};

use futures::StreamExt;
use mesh_proto::v1;
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

#[tonic::async_trait]
impl v1::registry_server::Registry for Api {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let service = req.get_ref().instance.as_ref().map(|i| i.service.clone());
        let service = service.ok_or_else(|| Status::invalid_argument("instance: required"))?;
        self.as_service(&req, &service, "register an instance")?;
        let inst = req.into_inner().instance.ok_or_else(|| Status::invalid_argument("instance: required"))?;
        Ok(Response::new(self.0.registry.register(inst, Instant::now()).await?))
    }

    type HeartbeatStream = BoxStream<v1::HeartbeatResponse>;

    async fn heartbeat(
        &self,
        req: Request<Streaming<v1::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let caller = self.member(&req, "send heartbeats")?;
        let state = self.0.clone();
        let guard = GaugeGuard::new(&state.metrics.heartbeat_streams);
        let out = req.into_inner().take_until(state.shutdown.clone().cancelled_owned()).map(move |msg| {
            let _open = &guard;
            let hb = msg?;
            caller.may_act_as(&hb.service, "heartbeat").map_err(|s| refused(&state, s))?;
            Ok(state.registry.heartbeat(&hb, Instant::now()))
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn deregister(
        &self,
        req: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::DeregisterResponse>, Status> {
        self.as_service(&req, &req.get_ref().service, "deregister an instance")?;
        let r = req.into_inner();
        let existed = self.0.registry.deregister(&r.service, &r.instance_id).await?;
        let version = self.0.registry.watch(&r.service).borrow().version;
        Ok(Response::new(v1::DeregisterResponse { existed, version }))
    }

    async fn list_services(
        &self,
        req: Request<v1::ListServicesRequest>,
    ) -> Result<Response<v1::ListServicesResponse>, Status> {
        self.member(&req, "list services")?;
        Ok(Response::new(v1::ListServicesResponse { services: self.0.registry.list_services() }))
    }

    async fn get_service(
        &self,
        req: Request<v1::GetServiceRequest>,
    ) -> Result<Response<v1::GetServiceResponse>, Status> {
        self.member(&req, "read the registry")?;
        let name = req.into_inner().name;
        self.0
            .registry
            .get_service(&name, Instant::now())
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("service {name:?} has no registered instances")))
    }
}

// ---- Discovery -----------------------------------------------------------------------------
