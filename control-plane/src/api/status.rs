//! Every error the API can meet, mapped to a gRPC `Status` in one place: the code says what kind
//! of failure it is, the message what failed and what to do.

use crate::{
    bus::error::BusError, ca::CaError, policy::PolicyError, registry::RegistryError, state::State,
    store::StoreError,
};

use tonic::Status;

pub(crate) fn refused(state: &State, s: Status) -> Status {
    let code = match s.code() {
        tonic::Code::Unauthenticated => "unauthenticated",
        _ => "permission_denied",
    };
    state.metrics.api_refused.get_or_create(&[("code", code)]).inc();
    tracing::info!(code, reason = %s.message(), "API call refused");
    s
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(m) => Status::invalid_argument(m),
            RegistryError::Store(e) => store_status(e),
        }
    }
}

impl From<PolicyError> for Status {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::BadService(_) => Status::invalid_argument(e.to_string()),
            PolicyError::VersionMismatch { .. } => Status::failed_precondition(e.to_string()),
            PolicyError::Store(e) => store_status(e),
        }
    }
}

pub(crate) fn store_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "storage write failed");
    match e {
        // A write etcd did not confirm in time may still be applied: say so.
        StoreError::Etcd(crate::etcd::EtcdError::Timeout { .. }) => {
            Status::unavailable(format!("{e}; read it back before retrying"))
        }
        e => Status::unavailable(format!("{e}; nothing was changed, retry later")),
    }
}

impl From<BusError> for Status {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            BusError::Store(e) => store_status(e),
            BusError::Nats(_) => Status::unavailable(e.to_string()),
        }
    }
}

impl From<CaError> for Status {
    fn from(e: CaError) -> Self {
        match e {
            CaError::Csr(_) => Status::invalid_argument(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}
