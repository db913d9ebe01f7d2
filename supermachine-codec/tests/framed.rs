//! The codec inside real `tokio_util::codec` stacks over in-memory streams: partial reads,
//! concurrent both-way traffic, and errors surfacing through the stream.

mod support;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use supermachine_codec::{
    kind, AgentError, CodecError, ControlAck, ControlMessage, ErrorCode, ExecCodec, ExecRequest,
    ExitInfo, Frame, StagedFile, WindowSize,
};
use tokio_util::codec::{Framed, FramedRead, FramedWrite};

/// A writer and a reader on a 64-byte duplex pipe: every frame larger than the pipe arrives in
/// several reads, and the writer is held back by the reader (backpressure).
#[tokio::test]
async fn framed_read_over_a_small_duplex_pipe() {
    let (client, server) = tokio::io::duplex(64);
    let mut request = ExecRequest::new(["sh", "-c", "cat"]);
    request.stage_files = vec![StagedFile::new("/data", vec![0xa5u8; 1000])];
    let frames = vec![
        Frame::Request(request),
        Frame::Started { pid: 42 },
        Frame::Stdout(Bytes::from(vec![b'x'; 10_000])),
        Frame::Unknown {
            kind: 0x42,
            payload: "future".into(),
        },
        Frame::Stdin(Bytes::new()),
        Frame::Exit(ExitInfo {
            code: 3,
            peak_rss_kib: Some(1024),
            signal: None,
        }),
    ];
    let sent = frames.clone();
    let writer = tokio::spawn(async move {
        let mut sink = FramedWrite::new(client, ExecCodec::new());
        for frame in sent {
            sink.send(frame).await.unwrap();
        }
        // Dropping the sink closes the pipe: the reader sees a clean EOF.
    });
    let received: Vec<Frame> = FramedRead::new(server, ExecCodec::new())
        .map(|r| r.unwrap())
        .collect()
        .await;
    writer.await.unwrap();
    assert_eq!(received, frames);
}

/// `&[u8]` is an `AsyncRead`; a stream cut mid-frame yields the frames before the cut, then
/// `Truncated` (from `decode_eof`), then ends.
#[tokio::test]
async fn framed_read_over_a_byte_slice_cut_mid_frame() {
    let mut wire =
        support::encode_all(&[Frame::Stdout("hello".into()), Frame::Stderr("world".into())])
            .to_vec();
    wire.extend_from_slice(&support::raw(kind::STDOUT, b"never finished")[..9]);
    let mut stream = FramedRead::new(&wire[..], ExecCodec::new());
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        Frame::Stdout("hello".into())
    );
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        Frame::Stderr("world".into())
    );
    assert!(matches!(
        stream.next().await,
        Some(Err(CodecError::Truncated { buffered: 9 }))
    ));
    assert!(stream.next().await.is_none());
}

/// A hostile length surfaces as an error through the stream, and the read buffer did not grow
/// towards the announced size.
#[tokio::test]
async fn framed_read_rejects_an_oversized_header() {
    let mut wire = support::encode_all(&[Frame::Signal(9)]).to_vec();
    wire.extend_from_slice(&[kind::STDOUT, 0xff, 0xff, 0xff, 0xff]);
    wire.extend_from_slice(&[0u8; 100]);
    let mut stream = FramedRead::new(&wire[..], ExecCodec::new());
    assert_eq!(stream.next().await.unwrap().unwrap(), Frame::Signal(9));
    assert!(matches!(
        stream.next().await,
        Some(Err(CodecError::FrameTooLarge { .. }))
    ));
    assert!(stream.read_buffer().capacity() < 64 * 1024);
    // FramedRead stops after a decoder error instead of re-reading the same bad header.
    assert!(stream.next().await.is_none());
}

/// A host and an agent each on a `Framed` (both directions through one codec instance per side)
/// run a whole exec exchange concurrently.
#[tokio::test]
async fn host_and_agent_exchange_over_framed() {
    let (host_io, agent_io) = tokio::io::duplex(256);

    let agent = tokio::spawn(async move {
        let mut agent = Framed::new(agent_io, ExecCodec::new());
        let Some(Ok(Frame::Request(request))) = agent.next().await else {
            panic!("agent expected a REQUEST first")
        };
        agent.send(Frame::Started { pid: 7 }).await.unwrap();
        // Echo stdin back on stdout until EOF (an empty STDIN frame), honouring a resize.
        let mut echoed = Vec::new();
        loop {
            match agent.next().await.unwrap().unwrap() {
                Frame::Stdin(data) if data.is_empty() => break,
                Frame::Stdin(data) => {
                    echoed.extend_from_slice(&data);
                    agent.send(Frame::Stdout(data)).await.unwrap();
                }
                Frame::Resize(WindowSize { cols, rows }) => {
                    let text = format!("{cols}x{rows}");
                    agent.send(Frame::Stderr(text.into())).await.unwrap();
                }
                other => panic!("agent got {other:?}"),
            }
        }
        let staged = request.stage_files[0].contents().clone();
        agent
            .send(Frame::Stdout(staged))
            .await
            .expect("send staged file back");
        agent
            .send(Frame::Exit(ExitInfo {
                code: 0,
                peak_rss_kib: Some(echoed.len() as u64),
                signal: None,
            }))
            .await
            .unwrap();
    });

    let mut host = Framed::new(host_io, ExecCodec::new());
    let mut request = ExecRequest::new(["cat"]);
    request.stage_files = vec![StagedFile::new("/s", Bytes::from_static(b"\0staged\xff"))];
    host.send(Frame::Request(request)).await.unwrap();
    assert_eq!(
        host.next().await.unwrap().unwrap(),
        Frame::Started { pid: 7 }
    );
    let chunk = Bytes::from(vec![b'z'; 1000]);
    host.send(Frame::Stdin(chunk.clone())).await.unwrap();
    assert_eq!(host.next().await.unwrap().unwrap(), Frame::Stdout(chunk));
    host.send(Frame::Resize(WindowSize { cols: 80, rows: 24 }))
        .await
        .unwrap();
    assert_eq!(
        host.next().await.unwrap().unwrap(),
        Frame::Stderr("80x24".into())
    );
    host.send(Frame::Stdin(Bytes::new())).await.unwrap();
    assert_eq!(
        host.next().await.unwrap().unwrap(),
        Frame::Stdout(Bytes::from_static(b"\0staged\xff"))
    );
    assert_eq!(
        host.next().await.unwrap().unwrap(),
        Frame::Exit(ExitInfo {
            code: 0,
            peak_rss_kib: Some(1000),
            signal: None
        })
    );
    agent.await.unwrap();
    assert!(host.next().await.is_none(), "agent closed the connection");
}

/// CONTROL round trip through `Framed`, with an attachment both ways, and an ERROR frame.
#[tokio::test]
async fn control_and_error_over_framed() {
    let (a, b) = tokio::io::duplex(32);
    let mut host = Framed::new(a, ExecCodec::new());
    let mut agent = Framed::new(b, ExecCodec::new());
    let write = Frame::Control {
        message: ControlMessage::UnknownAction("future_action".into()),
        data: Bytes::from_static(b"\0\0payload"),
    };
    let ack = Frame::Control {
        message: ControlMessage::Ack(ControlAck::error("unknown action future_action")),
        data: Bytes::new(),
    };
    let error = Frame::Error(AgentError::new(ErrorCode::InvalidRequest, "bad: request"));
    let (sent, got) = tokio::join!(host.send(write.clone()), agent.next());
    sent.unwrap();
    assert_eq!(got.unwrap().unwrap(), write);
    let (sent, got) = tokio::join!(agent.send(ack.clone()), host.next());
    sent.unwrap();
    assert_eq!(got.unwrap().unwrap(), ack);
    let (sent, got) = tokio::join!(agent.send(error.clone()), host.next());
    sent.unwrap();
    assert_eq!(got.unwrap().unwrap(), error);
}
