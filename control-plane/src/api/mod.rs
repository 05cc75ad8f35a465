//! The gRPC API: one file per service, one map from errors to `Status` (`status`), and
//! [`Api`], the handle every service is implemented on (authorization checks included).

pub(crate) mod admin;
pub(crate) mod discovery;
pub(crate) mod events;
pub(crate) mod identity;
pub(crate) mod policy;
pub(crate) mod registry;
pub(crate) mod status;
pub(crate) mod streams;

use crate::{api::status::refused, auth::Caller, state::State};

use futures::Stream;
use std::{pin::Pin, sync::Arc};
use tonic::{Request, Status};

pub use mesh_proto::DEFAULT_REPLAY_LIMIT;

/// Most services one discovery watch or policy stream may follow.
pub const MAX_WATCHED_SERVICES: usize = 256;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// All four services over one shared state.
#[derive(Clone)]
pub struct Api(pub Arc<State>);

/// Authorization (see [`crate::auth`]), counting what it refuses.
impl Api {
    fn refused(&self, s: Status) -> Status {
        refused(&self.0, s)
    }

    fn admin<T>(&self, req: &Request<T>, what: &str) -> Result<(), Status> {
        self.0.auth.admin(req, what).map_err(|s| self.refused(s))
    }

    fn member<T>(&self, req: &Request<T>, what: &str) -> Result<Caller, Status> {
        self.0.auth.member(req, what).map_err(|s| self.refused(s))
    }

    fn as_service<T>(&self, req: &Request<T>, service: &str, what: &str) -> Result<Caller, Status> {
        self.0.auth.as_service(req, service, what).map_err(|s| self.refused(s))
    }
}
