//! `connect_tcp`: the guest end of a published port. The agent dials `127.0.0.1:<port>` (or
//! `[::1]:<port>`), acks,
//! and from then on the host connection and the TCP connection are spliced byte for byte.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use futures::SinkExt;
use supermachine_codec::{CodecError, ControlAck, ControlMessage, ExecCodec, Frame};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::server::reply_and_close;
use crate::state::Agent;

/// How long the agent waits for the guest's TCP connect. Loopback connects either succeed or
/// are refused at once; a full accept queue is the only thing that makes them wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Buffer size of each direction of a splice: tokio's default (8 KiB) would cost 8 times the
/// guest syscalls per byte, and a guest syscall costs ~300 µs under PVM. The price is 128 KiB
/// of agent memory per open forwarded connection (a thousand keep-alive connections to a
/// published port hold 128 MiB).
const SPLICE_BUF: usize = 64 * 1024;

/// Serves one `connect_tcp` request on a host connection whose first frame was that request.
pub async fn run<S>(
    port: u16,
    frames: FramedRead<ReadHalf<S>, ExecCodec>,
    sink: FramedWrite<WriteHalf<S>, ExecCodec>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut tcp = match connect(port).await {
        Ok(tcp) => tcp,
        Err(e) => {
            let ack = ControlAck::error(format!("connect_tcp 127.0.0.1:{port}: {e}"));
            tracing::debug!(port, "connect_tcp failed: {e}");
            reply_and_close(frames, sink, Frame::control(ControlMessage::Ack(ack))).await;
            return;
        }
    };
    let (mut host, early) = match into_stream(frames, sink).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(port, "connect_tcp: sending the ack failed: {e}");
            return;
        }
    };
    if !early.is_empty() {
        if let Err(e) = tcp.write_all(&early).await {
            tracing::debug!(port, "connect_tcp: {e}");
            return;
        }
    }
    // copy_bidirectional passes an EOF on one side on as a write shutdown of the other and
    // carries on with the other direction, so half-closed connections behave as over TCP.
    // Each guest syscall is expensive under PVM: copy in large chunks.
    match tokio::io::copy_bidirectional_with_sizes(&mut host, &mut tcp, SPLICE_BUF, SPLICE_BUF)
        .await
    {
        Ok((to_guest, to_host)) => tracing::debug!(port, to_guest, to_host, "forward done"),
        Err(e) => tracing::debug!(port, "forward ended: {e}"),
    }
}

/// Acks the request and turns the framed connection back into a plain byte stream. The host
/// waits for the ack before it sends stream bytes, but whatever the frame reader already
/// buffered past the request belongs to the stream all the same: it is returned with it.
/// Fails when the ack cannot be sent (the host went away).
async fn into_stream<S>(
    frames: FramedRead<ReadHalf<S>, ExecCodec>,
    mut sink: FramedWrite<WriteHalf<S>, ExecCodec>,
) -> Result<(S, BytesMut), CodecError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    sink.send(Frame::control(ControlMessage::Ack(ControlAck::ok())))
        .await?;
    let early = frames.read_buffer().clone();
    Ok((frames.into_inner().unsplit(sink.into_inner()), early))
}

/// Serves the `echo` test hook: after the ack, every byte read is written back until EOF.
pub async fn echo<S>(
    agent: &Agent,
    frames: FramedRead<ReadHalf<S>, ExecCodec>,
    sink: FramedWrite<WriteHalf<S>, ExecCodec>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !agent.boot_flags.test_hooks {
        let ack = ControlAck::error(
            "echo is a test hook: refused without supermachine.test_hooks=1 on the guest kernel \
             command line",
        );
        reply_and_close(frames, sink, Frame::control(ControlMessage::Ack(ack))).await;
        return;
    }
    let Ok((host, early)) = into_stream(frames, sink).await else {
        return;
    };
    let (read, mut write) = tokio::io::split(host);
    if write.write_all(&early).await.is_err() {
        return;
    }
    let mut read = tokio::io::BufReader::with_capacity(SPLICE_BUF, read);
    let _ = tokio::io::copy_buf(&mut read, &mut write).await;
    let _ = write.shutdown().await;
}

/// `127.0.0.1:port`, else `[::1]:port`: servers that listen on "localhost" may have bound
/// either.
async fn connect(port: u16) -> io::Result<TcpStream> {
    let v4 = connect_to((Ipv4Addr::LOCALHOST, port).into()).await;
    let tcp = match v4 {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            // Report the IPv4 refusal when IPv6 fails too: it is the address users expect.
            connect_to((Ipv6Addr::LOCALHOST, port).into())
                .await
                .map_err(|_| e)?
        }
        other => other?,
    };
    // Request/response traffic (HTTP) would otherwise wait on Nagle for every small write.
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

async fn connect_to(address: SocketAddr) -> io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))?
}
