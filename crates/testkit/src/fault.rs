//! A TCP proxy that injects faults (refuse, stall, reset) between two real peers.

use std::{net::SocketAddr, time::Duration};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What a [`FaultProxy`] does to each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Accepts, reads, never answers.
    Blackhole,
    /// Resets the connection at once (RST).
    Reset,
    /// Waits this long before passing anything through.
    Delay(Duration),
    /// Passes the request, then only the first `n` bytes of the answer, then closes.
    Truncate(usize),
}

/// A TCP proxy on 127.0.0.1 that injects one fault into every connection to `target`
/// (a stand-in for toxiproxy, which cannot be installed here).
pub struct FaultProxy {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr, fault: Fault) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let token = token.clone();
                tokio::spawn(async move {
                    let work = async {
                        match fault {
                            Fault::Blackhole => {
                                let mut sink = [0u8; 4096];
                                while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
                            }
                            Fault::Reset => {
                                let _ = client.set_zero_linger();
                                drop(client);
                            }
                            Fault::Delay(d) => {
                                tokio::time::sleep(d).await;
                                if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                                }
                            }
                            Fault::Truncate(n) => {
                                let Ok(up) = tokio::net::TcpStream::connect(target).await else { return };
                                let (mut ur, mut uw) = up.into_split();
                                let (mut cr, mut cw) = client.into_split();
                                let forward = async { tokio::io::copy(&mut cr, &mut uw).await };
                                let back = async {
                                    let mut buf = vec![0u8; n];
                                    let mut got = 0;
                                    while got < n {
                                        match ur.read(&mut buf[got..]).await {
                                            Ok(0) | Err(_) => break,
                                            Ok(k) => got += k,
                                        }
                                    }
                                    let _ = cw.write_all(&buf[..got]).await;
                                    let _ = cw.shutdown().await;
                                };
                                tokio::select! { _ = forward => {}, _ = back => {} }
                            }
                        }
                    };
                    tokio::select! { _ = work => {}, _ = token.cancelled() => {} }
                });
            }
        });
        FaultProxy { addr, stop }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
