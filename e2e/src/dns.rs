//! A DNS server on loopback whose answers a test changes, for gateway addresses given as names.
//!
//! It answers A and AAAA queries for the names it is given, with a short TTL, and NXDOMAIN for
//! anything else; it never forwards a query (tests reach nothing off this machine).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA},
    },
};
use tokio::net::UdpSocket;

use crate::Error;

/// TTL of every answer, seconds: a changed answer is seen within about this long.
pub const TTL: u32 = 1;

/// A running DNS server; stops when dropped.
#[derive(Debug)]
pub struct DnsServer {
    addr: SocketAddr,
    records: Arc<Mutex<HashMap<Name, Vec<IpAddr>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Serves on a free UDP port of 127.0.0.1.
    pub async fn start() -> Result<Self, Error> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves on `addr` (port 53 of an address test hosts reach, for their resolv.conf).
    pub async fn start_on(addr: SocketAddr) -> Result<Self, Error> {
        let io = |source| Error::Io {
            cluster: "dns".to_owned(),
            source,
        };
        let socket = UdpSocket::bind(addr).await.map_err(io)?;
        let addr = socket.local_addr().map_err(io)?;
        let records: Arc<Mutex<HashMap<Name, Vec<IpAddr>>>> = Arc::default();
        let served = records.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Some(reply) = answer(&buf[..n], &served) else {
                    continue;
                };
                let _ = socket.send_to(&reply, peer).await;
            }
        });
        Ok(Self {
            addr,
            records,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on `name` resolves to `ips` (none: an empty answer); unknown names get NXDOMAIN.
    pub fn set(&self, name: &str, ips: &[IpAddr]) -> Result<(), Error> {
        let name = Name::from_ascii(name)
            .map_err(|e| Error::Invalid(format!("DNS name {name:?}: {e}")))?;
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key(&name), ips.to_vec());
        Ok(())
    }
}

/// Names are matched case-insensitively, fully qualified or not.
fn key(name: &Name) -> Name {
    let mut key = name.to_lowercase();
    key.set_fqdn(true);
    key
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(query: &[u8], records: &Mutex<HashMap<Name, Vec<IpAddr>>>) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.message_type = MessageType::Response;
    let records = records.lock().unwrap_or_else(|e| e.into_inner());
    let mut known = true;
    for q in &request.queries {
        reply.add_query(q.clone());
        let Some(ips) = records.get(&key(q.name())) else {
            known = false;
            continue;
        };
        for ip in ips {
            let rdata = match (ip, q.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
        }
    }
    if !known {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    reply.to_vec().ok()
}
