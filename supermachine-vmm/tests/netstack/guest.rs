//! The test's "guest": a second smoltcp interface at 10.0.2.15 wired to the stack's
//! [`GuestLink`], with small async TCP and UDP helpers on top.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, Icmpv4Packet, IpAddress,
    IpCidr, IpProtocol, Ipv4Packet,
};
use supermachine_vmm::net::addressing::{GATEWAY, GUEST, MTU, PREFIX_LEN};
use supermachine_vmm::net::GuestLink;
use tokio::sync::Notify;

/// The guest's MAC (QEMU's default).
const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
/// Per-socket buffers on the guest side.
const BUFFER: usize = 256 * 1024;

#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        self.0.push_back(frame);
        result
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + 14;
        // The stack sends TCP segments without a checksum for the NIC to vouch for
        // (`VIRTIO_NET_HDR_F_DATA_VALID`); this guest has no NIC, so it does not verify them.
        caps.checksum.tcp = Checksum::Tx;
        caps
    }
}

struct State {
    iface: Interface,
    sockets: SocketSet<'static>,
    queues: Queues,
    next_port: u16,
    /// ICMP destination-unreachable codes received.
    unreachable: Vec<u8>,
    epoch: std::time::Instant,
}

impl State {
    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }
}

/// The guest.
#[derive(Clone)]
pub struct Guest {
    state: Arc<Mutex<State>>,
    poke: Arc<Notify>,
}

impl Guest {
    /// Wires a guest to `link` and drives it on the current runtime.
    pub fn attach(link: GuestLink) -> Guest {
        let mut queues = Queues::default();
        let mut config = Config::new(HardwareAddress::Ethernet(GUEST_MAC));
        config.random_seed = 7;
        let mut iface = Interface::new(config, &mut queues, Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::new(IpAddress::Ipv4(GUEST), PREFIX_LEN))
                .unwrap()
        });
        iface.routes_mut().add_default_ipv4_route(GATEWAY).unwrap();
        let guest = Guest {
            state: Arc::new(Mutex::new(State {
                iface,
                sockets: SocketSet::new(Vec::new()),
                queues,
                next_port: 49152,
                unreachable: Vec::new(),
                epoch: std::time::Instant::now(),
            })),
            poke: Arc::new(Notify::new()),
        };
        tokio::spawn(guest.clone().drive(link));
        guest
    }

    async fn drive(self, mut link: GuestLink) {
        loop {
            let delay = {
                let mut state = self.lock();
                let now = state.now();
                let State { iface, sockets, .. } = &mut *state;
                iface
                    .poll_delay(now, sockets)
                    .map_or(Duration::from_millis(100), |d| {
                        Duration::from_micros(d.total_micros()).min(Duration::from_millis(100))
                    })
            };
            let mut incoming = Vec::new();
            tokio::select! {
                frame = link.from_stack.recv() => match frame {
                    Some(frame) => incoming.push(frame),
                    None => return,
                },
                () = self.poke.notified() => {}
                () = tokio::time::sleep(delay) => {}
            }
            while let Ok(frame) = link.from_stack.try_recv() {
                incoming.push(frame);
                if incoming.len() == 64 {
                    break;
                }
            }
            let outgoing: Vec<Vec<u8>> = {
                let mut state = self.lock();
                for frame in incoming {
                    if let Some(code) = icmp_unreachable_code(&frame) {
                        state.unreachable.push(code);
                    }
                    state.queues.rx.push_back(frame);
                }
                let now = state.now();
                let State {
                    iface,
                    sockets,
                    queues,
                    ..
                } = &mut *state;
                iface.poll(now, queues, sockets);
                queues.tx.drain(..).collect()
            };
            for frame in outgoing {
                if link.to_stack.send(frame).await.is_err() {
                    return;
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// The ICMP destination-unreachable codes the guest received so far.
    pub fn unreachable_codes(&self) -> Vec<u8> {
        self.lock().unreachable.clone()
    }

    fn port(&self) -> u16 {
        let mut state = self.lock();
        state.next_port = state.next_port.wrapping_add(1).max(49152);
        state.next_port
    }

    /// Opens a TCP connection; `ConnectionRefused` on an RST.
    pub async fn connect(&self, to: SocketAddrV4) -> io::Result<GuestTcp> {
        let local = self.port();
        let handle = {
            let mut state = self.lock();
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; BUFFER]),
                tcp::SocketBuffer::new(vec![0; BUFFER]),
            );
            socket.set_nagle_enabled(false);
            let State { iface, sockets, .. } = &mut *state;
            socket
                .connect(
                    iface.context(),
                    (IpAddress::Ipv4(*to.ip()), to.port()),
                    local,
                )
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
            sockets.add(socket)
        };
        self.poke.notify_one();
        let tcp = GuestTcp {
            guest: self.clone(),
            handle,
            eof: false,
        };
        poll_fn(|cx| {
            let mut state = tcp.guest.lock();
            let socket = state.sockets.get_mut::<tcp::Socket>(handle);
            match socket.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    socket.register_send_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Closed => {
                    Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionRefused)))
                }
                _ => Poll::Ready(Ok(())),
            }
        })
        .await?;
        Ok(tcp)
    }

    /// Sends `payload` from a fresh port to `to` and waits up to `wait` for one reply.
    pub async fn udp_exchange(
        &self,
        to: SocketAddrV4,
        payload: &[u8],
        wait: Duration,
    ) -> io::Result<Vec<u8>> {
        let local = self.port();
        let handle = {
            let mut state = self.lock();
            let mut socket = udp::Socket::new(
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 65536]),
                udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 65536]),
            );
            socket.bind(local).unwrap();
            socket
                .send_slice(payload, (IpAddress::Ipv4(*to.ip()), to.port()))
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
            state.sockets.add(socket)
        };
        self.poke.notify_one();
        let received = tokio::time::timeout(
            wait,
            poll_fn(|cx| {
                let mut state = self.lock();
                let socket = state.sockets.get_mut::<udp::Socket>(handle);
                match socket.recv() {
                    Ok((data, _)) => Poll::Ready(data.to_vec()),
                    Err(_) => {
                        socket.register_recv_waker(cx.waker());
                        Poll::Pending
                    }
                }
            }),
        )
        .await;
        self.lock().sockets.remove(handle);
        received.map_err(|_| io::ErrorKind::TimedOut.into())
    }

    /// Resolves `name` (A) through the stack's DNS at 10.0.2.3.
    pub async fn resolve(&self, name: &str) -> io::Result<Vec<Ipv4Addr>> {
        use simple_dns::{Name, Packet, PacketFlag, Question, CLASS, QCLASS, QTYPE, TYPE};
        let mut query = Packet::new_query(0x5a5a);
        query.set_flags(PacketFlag::RECURSION_DESIRED);
        query.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let query = query.build_bytes_vec().unwrap();
        let dns = SocketAddrV4::new(supermachine_vmm::net::addressing::DNS, 53);
        let answer = self
            .udp_exchange(dns, &query, Duration::from_secs(10))
            .await?;
        let answer = Packet::parse(&answer).map_err(io::Error::other)?;
        Ok(answer
            .answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                simple_dns::rdata::RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect())
    }
}

fn icmp_unreachable_code(frame: &[u8]) -> Option<u8> {
    let ethernet = EthernetFrame::new_checked(frame).ok()?;
    if ethernet.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(ethernet.payload()).ok()?;
    if ip.next_header() != IpProtocol::Icmp {
        return None;
    }
    let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
    (u8::from(icmp.msg_type()) == 3).then(|| icmp.msg_code())
}

/// A guest TCP connection.
pub struct GuestTcp {
    guest: Guest,
    handle: SocketHandle,
    eof: bool,
}

impl GuestTcp {
    /// Sends all of `data`.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let sent = poll_fn(|cx| {
                let mut state = self.guest.lock();
                let socket = state.sockets.get_mut::<tcp::Socket>(self.handle);
                if !socket.may_send() {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe)));
                }
                match socket.send_slice(data) {
                    Ok(0) => {
                        socket.register_send_waker(cx.waker());
                        Poll::Pending
                    }
                    Ok(sent) => Poll::Ready(Ok(sent)),
                    Err(e) => Poll::Ready(Err(io::Error::other(format!("{e:?}")))),
                }
            })
            .await?;
            data = &data[sent..];
            self.guest.poke.notify_one();
        }
        Ok(())
    }

    /// Sends a test server command (`netns::Server`): the byte, then `len` big-endian.
    pub async fn command(&self, command: u8, len: u64) -> io::Result<()> {
        let mut header = vec![command];
        header.extend_from_slice(&len.to_be_bytes());
        self.write_all(&header).await
    }

    /// Sends `len` bytes of the test pattern (a multiple of 64 KiB).
    pub async fn write_pattern(&self, len: u64) -> io::Result<()> {
        let mut chunk = vec![0; 64 * 1024];
        let mut sent = 0u64;
        while sent < len {
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = crate::netns::pattern(sent + i as u64);
            }
            self.write_all(&chunk).await?;
            sent += chunk.len() as u64;
        }
        Ok(())
    }

    /// Reads some bytes: 0 at the peer's FIN, `ConnectionReset` at an RST.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let eof = self.eof;
        let result = poll_fn(|cx| {
            let mut state = self.guest.lock();
            let socket = state.sockets.get_mut::<tcp::Socket>(self.handle);
            if socket.can_recv() {
                return Poll::Ready(
                    socket
                        .recv_slice(buf)
                        .map_err(|e| io::Error::other(format!("{e:?}"))),
                );
            }
            match socket.state() {
                tcp::State::CloseWait
                | tcp::State::LastAck
                | tcp::State::TimeWait
                | tcp::State::Closing => Poll::Ready(Ok(0)),
                tcp::State::Closed if eof => Poll::Ready(Ok(0)),
                tcp::State::Closed => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
                _ => {
                    socket.register_recv_waker(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await;
        // Reading made window room: tell the stack.
        self.guest.poke.notify_one();
        if let Ok(0) = result {
            self.eof = true;
        }
        result
    }

    /// Reads until the peer's FIN.
    pub async fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        let mut all = Vec::new();
        let mut buf = vec![0; 64 * 1024];
        loop {
            match self.read(&mut buf).await? {
                0 => return Ok(all),
                n => all.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Sends a FIN.
    pub fn shutdown(&self) {
        self.guest
            .lock()
            .sockets
            .get_mut::<tcp::Socket>(self.handle)
            .close();
        self.guest.poke.notify_one();
    }
}

impl Drop for GuestTcp {
    fn drop(&mut self) {
        // A FIN, as a process closing the socket sends.
        self.shutdown();
    }
}
