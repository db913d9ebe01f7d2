//! The host end of a guest TCP flow: one task per flow that connects an ordinary
//! `tokio::net::TcpStream` and moves bytes between it and the stack's event loop.
//!
//! Channels to and from the loop are bounded ([`CHANNEL_CHUNKS`] chunks of at most the flow's
//! buffer size), so a slow side stops the other: a host that does not read leaves the guest's
//! bytes in smoltcp, whose window closes; a guest that does not read leaves the host's bytes in
//! the host kernel. Closing the channel toward the host is the guest's FIN (the task shuts the
//! socket's write side); the channel from the host closing is the host's FIN. Resets travel as
//! [`HostEvent::Reset`] one way and the `reset` signal the other (the task then closes with
//! SO_LINGER 0 so the host peer gets an RST).

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit};

use super::admission::Refused;

/// Chunks in flight each way between a flow's task and the event loop.
pub const CHANNEL_CHUNKS: usize = 2;
/// The largest chunk: one host read, or what the loop takes from smoltcp at once. A flow's
/// window (its smoltcp buffers) can be larger; this keeps the bytes in the channels small
/// beside it.
pub const MAX_CHUNK: usize = 256 * 1024;

/// What the host side reports to the loop.
#[derive(Debug)]
pub enum HostEvent {
    /// Bytes the host peer sent.
    Data(Vec<u8>),
    /// The host peer's FIN: it sends nothing more.
    Eof,
    /// The host peer reset the connection (or the socket failed).
    Reset,
}

/// The task's ends of its channels.
pub struct HostSide {
    /// Where to connect.
    pub target: SocketAddr,
    /// Gives up connecting after this long.
    pub connect_timeout: Duration,
    /// Read size: the flow's buffer.
    pub chunk: usize,
    /// Reports the connect's outcome.
    pub connected: oneshot::Sender<Result<(), Refused>>,
    /// Bytes the guest sent; closed at the guest's FIN.
    pub from_guest: mpsc::Receiver<Vec<u8>>,
    /// Bytes, FIN and reset for the guest.
    pub to_guest: mpsc::Sender<HostEvent>,
    /// Fires when the guest reset the flow (or the loop aborted it).
    pub reset: oneshot::Receiver<()>,
    /// Wakes the loop after the task produced or consumed something.
    pub wake: Arc<Notify>,
    /// The flow's place in the per-VM limit, held while the host socket is open.
    pub permit: Arc<OwnedSemaphorePermit>,
}

/// Runs the host end of one flow to completion.
pub async fn run(side: HostSide) {
    let HostSide {
        target,
        connect_timeout,
        chunk,
        connected,
        from_guest,
        to_guest,
        mut reset,
        wake,
        permit,
    } = side;
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            let _ = connected.send(Err(Refused::Connect(error)));
            wake.notify_one();
            return;
        }
        Err(_) => {
            let _ = connected.send(Err(Refused::ConnectTimeout));
            wake.notify_one();
            return;
        }
    };
    // Latency over batching: the guest's own stack already batched what it sent.
    let _ = stream.set_nodelay(true);
    if connected.send(Ok(())).is_err() {
        return;
    }
    wake.notify_one();

    let both = async {
        tokio::join!(
            host_to_guest(&stream, chunk, to_guest.clone(), &wake),
            guest_to_host(&stream, from_guest, to_guest, &wake)
        )
    };
    tokio::select! {
        biased;
        // A dropped sender (the flow closed in order) disables this branch: the copies finish.
        Ok(()) = &mut reset => {
            // Close with an RST rather than a FIN.
            let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
        _ = both => {}
    }
    drop(stream);
    drop(permit);
}

async fn host_to_guest(
    stream: &TcpStream,
    chunk: usize,
    to_guest: mpsc::Sender<HostEvent>,
    wake: &Notify,
) {
    loop {
        // Capacity, not zeroed length: the read fills only what arrived, and zeroing a whole
        // chunk (256 KiB) for every read would be a pass over memory per read.
        let mut buf = Vec::with_capacity(chunk);
        let event = match read(stream, &mut buf).await {
            Ok(0) => HostEvent::Eof,
            Ok(_) => HostEvent::Data(buf),
            Err(_) => HostEvent::Reset,
        };
        let last = !matches!(event, HostEvent::Data(_));
        if to_guest.send(event).await.is_err() {
            return;
        }
        wake.notify_one();
        if last {
            return;
        }
    }
}

async fn guest_to_host(
    stream: &TcpStream,
    mut from_guest: mpsc::Receiver<Vec<u8>>,
    to_guest: mpsc::Sender<HostEvent>,
    wake: &Notify,
) {
    while let Some(data) = from_guest.recv().await {
        // Room in the channel: the loop can take more from the guest.
        wake.notify_one();
        if write_all(stream, &data).await.is_err() {
            let _ = to_guest.send(HostEvent::Reset).await;
            wake.notify_one();
            return;
        }
    }
    // The guest's FIN.
    let _ = SockRef::from(stream).shutdown(Shutdown::Write);
}

/// Reads into `buf`'s spare capacity (appending); `Ok(0)` at EOF.
async fn read(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read_buf(buf) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(written) => data = &data[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
