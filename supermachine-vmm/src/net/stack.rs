//! The user-mode network: one event loop per VM that owns a smoltcp interface (the guest's
//! gateway), the flow table and the DNS server, and re-originates guest flows from ordinary
//! host sockets.
//!
//! Frames from the guest are looked at first ([`packet::inspect`]): a TCP SYN opens a flow
//! (policy, limit, then the host connects; only then does smoltcp see the SYN and answer it,
//! so a refused or unreachable destination gets an RST and never a half-open connection), a
//! UDP datagram goes to its flow's host socket or the DNS server, and everything else (ARP,
//! the rest of TCP, ICMP echo to the gateway) goes to smoltcp. Each flow's host socket lives
//! in its own task; the loop moves bytes between those tasks and the smoltcp sockets.
//!
//! IPv4 only: IPv6 frames from the guest are dropped (no NDP answer, so the guest sees no IPv6
//! route).
//!
//! Snapshots: a restored VM gets a new [`NetStack`]. The old one's flows are gone with it and
//! the new one shares nothing (flows, DNS names) with any other; the guest's stale TCP
//! connections get an RST the first time they send.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::task::JoinSet;

use super::addressing::{DNS, GATEWAY, GATEWAY_MAC, HOST_LOOPBACK, PREFIX_LEN};
use super::admission::{admit, log_refusal, Refused};
use super::config::StackConfig;
use super::dns;
use super::link::{Frame, GuestLink, Wire, LINK_QUEUE};
use super::names::NameTable;
use super::packet::{self, Datagram, Inspected, Syn};
use super::policy::Protocol;
use super::tcp_flow::{Connect, Service, TcpFlow};
use super::tcp_host;
use super::udp::{UdpEnds, UdpFlow};

/// Frames taken from the guest per turn of the loop before smoltcp runs.
const RX_BATCH: usize = 64;
/// The longest the loop sleeps without a reason to wake (timeouts are checked then).
const TICK: Duration = Duration::from_millis(500);
/// How many poll/service rounds one turn of the loop makes at most. smoltcp sends at most one
/// segment per socket per poll, so this bounds the segments a flow sends per turn; the frames
/// of one turn reach the NIC together (one interrupt for all of them), where one frame per turn
/// would cost the guest an interrupt per frame.
const ROUNDS: usize = 64;

/// A guest flow's two ends.
type FlowKey = (SocketAddrV4, SocketAddrV4);

/// A running user-mode network. Dropping it stops the loop and closes every host socket
/// (asynchronously; [`NetStack::shutdown`] waits for it).
#[derive(Debug)]
pub struct NetStack {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl NetStack {
    /// Starts a user-mode network on the current tokio runtime; the guest's network device
    /// uses the returned link.
    pub fn spawn(config: StackConfig) -> (NetStack, GuestLink) {
        let (to_stack, from_guest) = mpsc::channel(LINK_QUEUE);
        let (to_guest, from_stack) = mpsc::channel(LINK_QUEUE);
        let (stop, stopped) = oneshot::channel();
        let stack = Stack::new(config, from_guest, to_guest);
        let task = tokio::spawn(stack.run(stopped));
        let link = GuestLink {
            to_stack,
            from_stack,
        };
        (
            NetStack {
                stop: Some(stop),
                task,
            },
            link,
        )
    }

    /// Stops the network and waits until every host socket it opened is closed.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for NetStack {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Stack {
    config: Arc<StackConfig>,
    iface: Interface,
    sockets: SocketSet<'static>,
    wire: Wire,
    from_guest: mpsc::Receiver<Frame>,
    tcp: HashMap<FlowKey, TcpFlow>,
    udp: HashMap<FlowKey, UdpFlow>,
    flows: Arc<Semaphore>,
    dns_queries: Arc<Semaphore>,
    names: Arc<Mutex<NameTable>>,
    wake: Arc<Notify>,
    tasks: JoinSet<()>,
    epoch: std::time::Instant,
}

/// Why the loop woke.
enum Wake {
    Stop,
    Frame(Frame),
    Other,
}

impl Stack {
    fn new(
        config: StackConfig,
        from_guest: mpsc::Receiver<Frame>,
        to_guest: mpsc::Sender<Frame>,
    ) -> Self {
        let mut wire = Wire::new(to_guest);
        let epoch = std::time::Instant::now();
        let mut iface_config = Config::new(HardwareAddress::Ethernet(GATEWAY_MAC));
        iface_config.random_seed = u64::from(epoch.elapsed().subsec_nanos()) ^ 0x5eed;
        let mut iface = Interface::new(iface_config, &mut wire, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            for address in [GATEWAY, DNS, HOST_LOOPBACK] {
                // Capacity 4 (the `iface-max-addr-count-4` feature): these three fit.
                let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(address), PREFIX_LEN));
            }
        });
        // Accept packets to any address routed through the gateway: every destination.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY);
        let limits = config.limits;
        Stack {
            config: Arc::new(config),
            iface,
            sockets: SocketSet::new(Vec::new()),
            wire,
            from_guest,
            tcp: HashMap::new(),
            udp: HashMap::new(),
            flows: Arc::new(Semaphore::new(limits.max_flows)),
            dns_queries: Arc::new(Semaphore::new(limits.max_dns_queries)),
            names: Arc::new(Mutex::new(NameTable::default())),
            wake: Arc::new(Notify::new()),
            tasks: JoinSet::new(),
            epoch,
        }
    }

    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        loop {
            let delay = self
                .iface
                .poll_delay(self.now(), &self.sockets)
                .map_or(TICK, |d| Duration::from_micros(d.total_micros()).min(TICK));
            // Room again toward the guest after smoltcp found the link full.
            let link = self.wire.blocked.then(|| self.wire.tx.clone());
            let woke = tokio::select! {
                biased;
                _ = &mut stop => Wake::Stop,
                frame = self.from_guest.recv() => frame.map_or(Wake::Stop, Wake::Frame),
                () = self.wake.notified() => Wake::Other,
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => Wake::Other,
                Ok(_) = async { link.as_ref().ok_or(())?.reserve().await.map_err(drop) }, if link.is_some() => Wake::Other,
                () = tokio::time::sleep(delay) => Wake::Other,
            };
            match woke {
                Wake::Stop => break,
                Wake::Frame(frame) => {
                    self.take_guest_frame(frame);
                    for _ in 1..RX_BATCH {
                        match self.from_guest.try_recv() {
                            Ok(frame) => self.take_guest_frame(frame),
                            Err(_) => break,
                        }
                    }
                }
                Wake::Other => {}
            }
            self.wire.blocked = false;
            self.turn();
        }
        // Closes every host socket before returning.
        self.tasks.shutdown().await;
    }

    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(
            i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX),
        )
    }

    /// Polls smoltcp and services the flows until neither sends nor moves anything (or
    /// [`ROUNDS`]).
    fn turn(&mut self) {
        for _ in 0..ROUNDS {
            let now = self.now();
            let polled = self.iface.poll(now, &mut self.wire, &mut self.sockets);
            let moved = self.service_tcp();
            if polled == PollResult::None && !moved {
                break;
            }
        }
        self.udp.retain(|_, flow| !flow.ended());
    }

    fn take_guest_frame(&mut self, frame: Frame) {
        match packet::inspect(&frame) {
            Inspected::TcpSyn(syn) => {
                let key = (syn.guest, syn.destination);
                match self.tcp.get(&key) {
                    // A retransmitted SYN while the host connects.
                    Some(flow) if flow.handle().is_none() => {}
                    Some(_) => self.wire.rx.push_back(frame),
                    None => self.open_tcp(syn, frame),
                }
            }
            Inspected::Udp(datagram) => self.udp_datagram(&datagram),
            Inspected::Other => self.wire.rx.push_back(frame),
            Inspected::Foreign => {
                tracing::debug!("guest frame from an address other than the guest's; dropped");
            }
        }
    }

    fn open_tcp(&mut self, syn: Syn, frame: Frame) {
        let admitted = self.admit(Protocol::Tcp, syn.destination);
        let (target, permit) = match admitted {
            Ok(admitted) => admitted,
            Err(refused) => return self.refuse_tcp(&syn, &refused),
        };
        let limits = self.config.limits;
        let (flow, side) = TcpFlow::start(
            syn,
            frame,
            target,
            limits.connect_timeout,
            limits.tcp_buffer.min(tcp_host::MAX_CHUNK),
            permit,
            Arc::clone(&self.wake),
        );
        self.tcp
            .insert((flow.syn.guest, flow.syn.destination), flow);
        self.tasks.spawn(tcp_host::run(side));
    }

    /// The policy's verdict and a place in the flow limit.
    fn admit(
        &self,
        protocol: Protocol,
        destination: SocketAddrV4,
    ) -> Result<(std::net::SocketAddr, tokio::sync::OwnedSemaphorePermit), Refused> {
        let target = {
            let names = self
                .names
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            admit(&self.config, &names, protocol, destination)?
        };
        let permit = Arc::clone(&self.flows)
            .try_acquire_owned()
            .map_err(|_| Refused::FlowLimit(self.config.limits.max_flows))?;
        Ok((target, permit))
    }

    fn refuse_tcp(&mut self, syn: &Syn, refused: &Refused) {
        log_refusal(Protocol::Tcp, syn.guest, syn.destination, refused);
        let _ = self.wire.tx.try_send(packet::tcp_rst(syn));
    }

    /// Services every TCP flow; `true` when any moved something smoltcp should send.
    fn service_tcp(&mut self) -> bool {
        let limits = self.config.limits;
        let now = std::time::Instant::now();
        let mut moved = false;
        let mut finished = Vec::new();
        let mut connected = Vec::new();
        for (key, flow) in &mut self.tcp {
            let Some(handle) = flow.handle() else {
                match flow.poll_connect() {
                    Connect::Waiting => {}
                    Connect::Connected(frame) => connected.push((*key, frame)),
                    Connect::Refused(refused) => {
                        log_refusal(
                            Protocol::Tcp,
                            flow.syn.guest,
                            flow.syn.destination,
                            &refused,
                        );
                        let _ = self.wire.tx.try_send(packet::tcp_rst(&flow.syn));
                        finished.push((*key, None));
                    }
                }
                continue;
            };
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            match flow.service(socket, now, limits.connect_timeout, limits.tcp_idle_timeout) {
                Service::Open(true) => moved = true,
                Service::Open(false) => {}
                Service::Finished => finished.push((*key, Some(handle))),
            }
        }
        for (key, handle) in finished {
            if let Some(handle) = handle {
                self.sockets.remove(handle);
            }
            self.tcp.remove(&key);
        }
        for (key, frame) in connected {
            self.accept_tcp(key, frame);
            moved = true;
        }
        moved
    }

    /// Gives a connected flow its smoltcp socket and lets it answer the guest's SYN. One at a
    /// time: the new socket is the only one listening when the SYN goes in, so it takes it.
    fn accept_tcp(&mut self, key: FlowKey, syn_frame: Frame) {
        // Frames already queued go to smoltcp first: a listening socket only takes SYNs to its
        // own endpoint, but a retransmitted SYN of another flow that is still queued would
        // otherwise meet this socket in an earlier slot of the set before its own (50
        // concurrent downloads: 16 came back empty).
        let now = self.now();
        self.iface.poll(now, &mut self.wire, &mut self.sockets);
        let size = self.config.limits.tcp_buffer;
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; size]),
            tcp::SocketBuffer::new(vec![0; size]),
        );
        let (address, port) = (*key.1.ip(), key.1.port());
        let endpoint = IpListenEndpoint {
            addr: Some(IpAddress::Ipv4(address)),
            port,
        };
        if socket.listen(endpoint).is_err() {
            return;
        }
        socket.set_nagle_enabled(false);
        let handle = self.sockets.add(socket);
        if let Some(flow) = self.tcp.get_mut(&key) {
            flow.opened(handle);
        }
        self.wire.rx.push_back(syn_frame);
        self.iface.poll(now, &mut self.wire, &mut self.sockets);
    }

    fn udp_datagram(&mut self, datagram: &Datagram<'_>) {
        if datagram.destination == SocketAddrV4::new(DNS, 53) {
            return self.dns_query(datagram);
        }
        let key = (datagram.guest, datagram.destination);
        if let Some(flow) = self.udp.get(&key) {
            if flow.send(datagram.payload) {
                return;
            }
            self.udp.remove(&key);
        }
        let (target, permit) = match self.admit(Protocol::Udp, datagram.destination) {
            Ok(admitted) => admitted,
            Err(refused) => {
                log_refusal(
                    Protocol::Udp,
                    datagram.guest,
                    datagram.destination,
                    &refused,
                );
                let prohibited = matches!(refused, Refused::Policy(_) | Refused::GuestSubnet);
                if let Some(frame) = packet::icmp_unreachable(datagram, prohibited) {
                    let _ = self.wire.tx.try_send(frame);
                }
                return;
            }
        };
        let ends = UdpEnds {
            guest_mac: datagram.guest_mac,
            guest: datagram.guest,
            destination: datagram.destination,
            target,
        };
        let (flow, task) = UdpFlow::start(
            ends,
            self.config.limits.udp_idle_timeout,
            self.wire.tx.clone(),
            permit,
        );
        flow.send(datagram.payload);
        self.udp.insert(key, flow);
        self.tasks.spawn(task);
    }

    fn dns_query(&mut self, datagram: &Datagram<'_>) {
        let reply = |payload: &[u8]| {
            packet::udp_to_guest(
                datagram.guest_mac,
                datagram.destination,
                datagram.guest,
                payload,
            )
        };
        match dns::handle(datagram.payload, !self.config.host_loopback.is_empty()) {
            dns::Handling::Drop => {}
            dns::Handling::Answer(answer) => {
                if let Some(frame) = reply(&answer) {
                    let _ = self.wire.tx.try_send(frame);
                }
            }
            dns::Handling::Forward => {
                let Ok(permit) = Arc::clone(&self.dns_queries).try_acquire_owned() else {
                    tracing::info!(guest = %datagram.guest, "DNS query dropped: too many in flight");
                    return;
                };
                let query = datagram.payload.to_vec();
                let (guest_mac, from, to) =
                    (datagram.guest_mac, datagram.destination, datagram.guest);
                let config = Arc::clone(&self.config);
                let names = Arc::clone(&self.names);
                let to_guest = self.wire.tx.clone();
                self.tasks.spawn(async move {
                    let limits = config.limits;
                    let answer =
                        dns::forward(&query, &config.dns_upstreams, limits.dns_timeout).await;
                    drop(permit);
                    let Some(answer) = answer else { return };
                    // Before the guest sees the answer, so its next flow is judged by name.
                    dns::record(&answer, &names);
                    match packet::udp_to_guest(guest_mac, from, to, &answer) {
                        Some(frame) => {
                            let _ = to_guest.send(frame).await;
                        }
                        None => tracing::debug!("DNS answer too large for one frame; dropped"),
                    }
                });
            }
        }
    }
}
