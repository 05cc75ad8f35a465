//! `bench-tls`: certificates from the mesh CA for the TLS benchmark's peers, and a handshake
//! load generator.
//!
//! - `bench-tls certify --cp URL --token T --service S --dir D`: a key pair made here, a
//!   certificate for `S` from the control plane (`Identity.Certify`), written as `D/S.pem`
//!   (certificate), `D/S.key`, `D/S.bundle` (both, for HAProxy's `crt`) and `D/ca.pem`.
//! - `bench-tls handshakes --target ADDR --dir D --client S --expect SERVICE`: fresh TCP +
//!   mutual TLS handshakes (client certificate `S`, the server must be `SERVICE`) from
//!   `--conns` loops for `--secs`; prints `{"handshakes_per_second": …}`.

// Benchmarks time real work with the wall clock and spawn plain load generators.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Certify {
        #[arg(long)]
        cp: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        service: String,
        #[arg(long)]
        dir: PathBuf,
    },
    Handshakes {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        client: String,
        #[arg(long)]
        expect: String,
        #[arg(long, default_value_t = 8)]
        conns: usize,
        #[arg(long, default_value_t = 5)]
        secs: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Certify { cp, token, service, dir } => {
            let id = sidecar::identity::obtain(
                &mesh_proto::dial::Dialer::plaintext(),
                &cp,
                &service,
                &service,
                &token,
            )
            .await
            .map_err(anyhow::Error::msg)?;
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(format!("{service}.pem")), &id.certificate_pem)?;
            std::fs::write(dir.join(format!("{service}.key")), &id.private_key_pem)?;
            std::fs::write(
                dir.join(format!("{service}.bundle")),
                format!("{}{}", id.certificate_pem, id.private_key_pem),
            )?;
            std::fs::write(dir.join("ca.pem"), &id.trust_anchors_pem)?;
            println!("{}", serde_json::json!({"service": service, "spiffe_id": id.spiffe_id}));
        }
        Cmd::Handshakes { target, dir, client, expect, conns, secs } => {
            let read = |name: String| std::fs::read_to_string(dir.join(name));
            let trust_anchors_pem = read("ca.pem".into())?;
            let spiffe_id = format!("spiffe://mesh.local/service/{client}");
            let id = sidecar::identity::Identity {
                spiffe_id,
                certificate_pem: read(format!("{client}.pem"))?,
                private_key_pem: read(format!("{client}.key"))?,
                trust_anchors_pem,
                expires: SystemTime::now(),
                issued: SystemTime::now(),
            };
            let expected = format!("spiffe://mesh.local/service/{expect}");
            let mut config = sidecar::transport::tls::client_config(&id, &expected)?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            // Every handshake is a full one (no session resumption), as for a new peer.
            config.resumption = rustls::client::Resumption::disabled();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let end = Instant::now() + Duration::from_secs(secs);
            let mut loops = Vec::new();
            for _ in 0..conns {
                let (connector, done, failed) = (connector.clone(), done.clone(), failed.clone());
                loops.push(tokio::spawn(async move {
                    while Instant::now() < end {
                        let name = rustls::pki_types::ServerName::try_from("mesh").expect("a valid name");
                        let ok = match tokio::net::TcpStream::connect(target).await {
                            Ok(tcp) => connector.connect(name, tcp).await.is_ok(),
                            Err(_) => false,
                        };
                        if ok { &done } else { &failed }.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            for l in loops {
                l.await?;
            }
            let n = done.load(Ordering::Relaxed);
            println!(
                "{}",
                serde_json::json!({"handshakes": n, "failed": failed.load(Ordering::Relaxed),
                                   "handshakes_per_second": n as f64 / secs as f64})
            );
        }
    }
    Ok(())
}
