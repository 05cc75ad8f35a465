//! A tiny authoritative DNS server over UDP for tests: A records for the names it is given
//! (AAAA and anything else: no answer; unknown names: NXDOMAIN). Enough for a resolver to find
//! several addresses behind one name without touching /etc/hosts.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use tokio::net::UdpSocket;

/// The server; it stops when dropped.
pub struct DnsServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Serves `records` (name → addresses) on a UDP port of 127.0.0.1.
    pub async fn start(records: &[(&str, Vec<Ipv4Addr>)]) -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let records: Arc<HashMap<String, Vec<Ipv4Addr>>> = Arc::new(
            records.iter().map(|(n, a)| (n.trim_end_matches('.').to_ascii_lowercase(), a.clone())).collect(),
        );
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { return };
                if let Some(answer) = answer(&buf[..n], &records) {
                    let _ = socket.send_to(&answer, from).await;
                }
            }
        });
        DnsServer { addr, task }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer to one query, or `None` if it is not one we can read.
fn answer(q: &[u8], records: &HashMap<String, Vec<Ipv4Addr>>) -> Option<Vec<u8>> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question = &q[12..i + 4];
    let name = labels.join(".");
    let found = records.get(&name);
    let ips: &[Ipv4Addr] = match (found, qtype) {
        (Some(ips), 1) => ips,
        _ => &[],
    };
    let rcode = if found.is_none() { 3 } else { 0 };
    let flags: u16 = 0x8000 | 0x0400 | (u16::from_be_bytes([q[2], q[3]]) & 0x0100) | 0x0080 | rcode;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&q[0..2]);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for ip in ips {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}
