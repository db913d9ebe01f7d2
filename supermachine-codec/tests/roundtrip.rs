//! Every frame survives encode → decode, alone, in sequences, and fed in arbitrary chunks.

mod support;
use support as strategies;

use bytes::BytesMut;
use proptest::prelude::*;
use supermachine_codec::{ExecCodec, Frame};
use tokio_util::codec::{Decoder, Encoder};

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut codec = ExecCodec::new();
    let mut buf = BytesMut::new();
    for frame in frames {
        codec.encode(frame, &mut buf).expect("encodable frame");
    }
    buf
}

/// Feeds `wire` to a decoder in the given chunk sizes (cycled), collecting every frame.
fn decode_chunked(wire: &[u8], chunks: &[usize]) -> Vec<Frame> {
    let mut codec = ExecCodec::new();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut sizes = chunks.iter().copied().cycle();
    while at < wire.len() {
        let n = sizes.next().unwrap_or(1).max(1).min(wire.len() - at);
        buf.extend_from_slice(&wire[at..at + n]);
        at += n;
        while let Some(frame) = codec.decode(&mut buf).expect("valid stream") {
            frames.push(frame);
        }
    }
    assert!(codec.decode_eof(&mut buf).expect("clean end").is_none());
    frames
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn single_frame_roundtrips(frame in strategies::frame()) {
        let mut wire = encode_all(std::slice::from_ref(&frame));
        let encoded_len = wire.len();
        let decoded = ExecCodec::new().decode(&mut wire).unwrap();
        prop_assert_eq!(decoded, Some(frame));
        prop_assert!(wire.is_empty(), "decoder consumed {} of {} bytes", encoded_len - wire.len(), encoded_len);
    }

    #[test]
    fn sequences_roundtrip_in_any_chunking(
        frames in proptest::collection::vec(strategies::frame(), 1..8),
        chunks in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let wire = encode_all(&frames);
        prop_assert_eq!(decode_chunked(&wire, &chunks), frames);
    }
}

#[test]
fn one_byte_at_a_time() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..64 {
        let frames: Vec<Frame> = (0..4)
            .map(|_| strategies::frame().new_tree(&mut runner).unwrap().current())
            .collect();
        let wire = encode_all(&frames);
        assert_eq!(decode_chunked(&wire, &[1]), frames);
    }
}

#[test]
fn payloads_are_split_off_the_read_buffer_not_copied() {
    let payload = vec![7u8; 100_000];
    let mut wire = encode_all(&[Frame::Stdout(payload.clone().into())]);
    let buffer_start = wire.as_ptr() as usize;
    let buffer_end = buffer_start + wire.len();
    match ExecCodec::new().decode(&mut wire).unwrap() {
        Some(Frame::Stdout(bytes)) => {
            let at = bytes.as_ptr() as usize;
            // The payload lives inside the decode buffer's allocation, right after the header.
            assert!(at > buffer_start && at + bytes.len() <= buffer_end);
            assert_eq!(at, buffer_start + supermachine_codec::HEADER_LEN);
            assert_eq!(&bytes[..], &payload[..]);
        }
        other => panic!("expected stdout, got {other:?}"),
    }
}

#[tokio::test]
async fn works_in_a_framed_stack() {
    use futures::{SinkExt, StreamExt};
    use tokio_util::codec::{FramedRead, FramedWrite};

    let (client, server) = tokio::io::duplex(64);
    let frames = vec![
        Frame::Stdout("hello".into()),
        Frame::Unknown {
            kind: 0x42,
            payload: "future".into(),
        },
        Frame::Exit(supermachine_codec::ExitInfo {
            code: 3,
            peak_rss_kib: Some(1024),
        }),
    ];
    let sent = frames.clone();
    let writer = tokio::spawn(async move {
        let mut sink = FramedWrite::new(client, ExecCodec::new());
        for frame in sent {
            sink.send(frame).await.unwrap();
        }
    });
    let received: Vec<Frame> = FramedRead::new(server, ExecCodec::new())
        .map(|r| r.unwrap())
        .collect()
        .await;
    writer.await.unwrap();
    assert_eq!(received, frames);
}
