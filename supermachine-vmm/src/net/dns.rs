//! The DNS server at [`DNS`](super::addressing::DNS): answers `host.supermachine.internal`
//! itself, forwards everything else to the host's resolvers, and records which names resolved
//! to which addresses so the policy's domain rules see them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use simple_dns::rdata::{RData, A};
use simple_dns::{Name, Packet, PacketFlag, ResourceRecord, CLASS, QTYPE, RCODE, TYPE};
use tokio::net::UdpSocket;

use super::addressing::{HOST_LOOPBACK, HOST_LOOPBACK_NAME};
use super::names::NameTable;

/// The largest DNS message the stack forwards or accepts (EDNS's common 4096).
const MAX_MESSAGE: usize = 4096;

/// What to do with a guest's query.
#[derive(Debug, PartialEq, Eq)]
pub enum Handling {
    /// Send this answer back.
    Answer(Vec<u8>),
    /// Forward it upstream.
    Forward,
    /// Not a DNS query: ignore it.
    Drop,
}

/// Decides how to handle `query`: the fixed name is answered here (with [`HOST_LOOPBACK`] when
/// `host_loopback` is on, NXDOMAIN when not), everything else goes upstream.
pub fn handle(query: &[u8], host_loopback: bool) -> Handling {
    let Ok(packet) = Packet::parse(query) else {
        return Handling::Drop;
    };
    if packet.has_flags(PacketFlag::RESPONSE) {
        return Handling::Drop;
    }
    let local = packet
        .questions
        .iter()
        .any(|q| normalise(&q.qname.to_string()) == HOST_LOOPBACK_NAME);
    if !local {
        return Handling::Forward;
    }
    let mut reply = Packet::new_reply(packet.id());
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_AVAILABLE);
    if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    let name = Name::new_unchecked(HOST_LOOPBACK_NAME);
    for question in &packet.questions {
        reply.questions.push(question.clone());
        let wants_a = matches!(question.qtype, QTYPE::TYPE(TYPE::A) | QTYPE::ANY);
        if host_loopback && wants_a {
            reply.answers.push(ResourceRecord::new(
                name.clone(),
                CLASS::IN,
                60,
                RData::A(A::from(HOST_LOOPBACK)),
            ));
        }
    }
    if !host_loopback {
        *reply.rcode_mut() = RCODE::NameError;
    }
    match reply.build_bytes_vec() {
        Ok(bytes) => Handling::Answer(bytes),
        Err(_) => Handling::Drop,
    }
}

/// Forwards `query` to each upstream in turn until one answers (with the query's id), waiting
/// `timeout` for each; SERVFAIL when none does.
pub async fn forward(query: &[u8], upstreams: &[SocketAddr], timeout: Duration) -> Option<Vec<u8>> {
    let id = Packet::parse(query).ok()?.id();
    for upstream in upstreams {
        match tokio::time::timeout(timeout, ask(query, id, *upstream)).await {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(error)) => tracing::debug!(%upstream, %error, "DNS upstream failed"),
            Err(_) => tracing::debug!(%upstream, "DNS upstream timed out"),
        }
    }
    tracing::debug!("no DNS upstream answered; SERVFAIL");
    server_failure(query)
}

async fn ask(query: &[u8], id: u16, upstream: SocketAddr) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0; MAX_MESSAGE];
    loop {
        let len = socket.recv(&mut buf).await?;
        let answer = &buf[..len];
        // A connected socket only hears from `upstream`; the id check drops stray datagrams.
        if answer.len() >= 2 && u16::from_be_bytes([answer[0], answer[1]]) == id {
            return Ok(answer.to_vec());
        }
    }
}

fn server_failure(query: &[u8]) -> Option<Vec<u8>> {
    let packet = Packet::parse(query).ok()?;
    let mut reply = Packet::new_reply(packet.id());
    reply.questions = packet.questions;
    *reply.rcode_mut() = RCODE::ServerFailure;
    reply.build_bytes_vec().ok()
}

/// Records the addresses in `answer` under the names asked and the names of the records (so a
/// CNAME chain's first name and last name both count).
pub fn record(answer: &[u8], table: &Mutex<NameTable>) {
    let Ok(packet) = Packet::parse(answer) else {
        return;
    };
    let addresses: Vec<(String, IpAddr)> = packet
        .answers
        .iter()
        .filter_map(|rr| {
            let address = match &rr.rdata {
                RData::A(a) => IpAddr::V4(Ipv4Addr::from(a.address)),
                RData::AAAA(aaaa) => IpAddr::V6(Ipv6Addr::from(aaaa.address)),
                _ => return None,
            };
            Some((rr.name.to_string(), address))
        })
        .collect();
    if addresses.is_empty() {
        return;
    }
    let Ok(mut table) = table.lock() else {
        return;
    };
    for (name, address) in &addresses {
        for question in &packet.questions {
            table.record(&question.qname.to_string(), *address);
        }
        table.record(name, *address);
    }
}

fn normalise(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
#[path = "dns_tests.rs"]
mod tests;
