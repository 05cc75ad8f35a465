//! The gRPC listener's transport: [`tls`] (the API's certificate from the mesh CA, the handshake
//! queue) and [`peer`] (the connection with the client certificate it proved).

pub(crate) mod peer;
pub(crate) mod tls;
