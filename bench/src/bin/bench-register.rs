//! `bench-register URL SERVICE ADDR...`: registers one instance of SERVICE per address with the
//! control plane at URL and keeps them alive with heartbeats until killed (benchmarks use it to
//! point a sidecar straight at backends).

// Benchmarks time real work with the wall clock and spawn plain load generators.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::time::Duration;

use mesh_proto::v1::{self, registry_client::RegistryClient};
use tokio_stream::wrappers::ReceiverStream;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, service, addrs @ ..] = args.as_slice() else {
        anyhow::bail!("usage: bench-register URL SERVICE ADDR...");
    };
    let ch = tonic::transport::Endpoint::from_shared(url.clone())?.connect().await?;
    let mut reg = RegistryClient::new(ch);
    for (i, a) in addrs.iter().enumerate() {
        let inst = v1::Instance {
            service: service.clone(),
            id: format!("{service}-{i}"),
            address: a.clone(),
            ..Default::default()
        };
        reg.register(v1::RegisterRequest { instance: Some(inst) }).await?;
    }
    println!("{}", serde_json::json!({"event": "listening", "registered": addrs.len()}));
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut answers = reg.heartbeat(ReceiverStream::new(rx)).await?.into_inner();
    tokio::spawn(async move { while let Some(Ok(_)) = futures::StreamExt::next(&mut answers).await {} });
    loop {
        for i in 0..addrs.len() {
            let hb = v1::HeartbeatRequest {
                service: service.clone(),
                instance_id: format!("{service}-{i}"),
                health: 1,
                load: 0,
            };
            tx.send(hb).await?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
