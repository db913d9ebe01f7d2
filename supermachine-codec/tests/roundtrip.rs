//! Every frame survives encode → decode: alone, in sequences, and fed in arbitrary chunk sizes;
//! and byte payloads come out of the decoder without being copied.

mod support;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use supermachine_codec::{
    AgentError, ControlAck, ControlAction, ControlMessage, ErrorCode, ExecCodec, ExecRequest,
    ExitInfo, Frame, StagedFile, StdioMode, WindowSize, HEADER_LEN,
};
use support::{byte_payloads, chunking, decode_chunked, decode_chunked_with, encode_all};
use tokio_util::codec::{Decoder, Encoder};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// One frame: the decoder returns it unchanged and consumes exactly the encoded bytes, no
    /// more (a following frame's bytes stay in the buffer) and no less.
    #[test]
    fn single_frame_roundtrips(frame in support::frame(), trailer in support::bytes(16)) {
        let mut wire = encode_all(std::slice::from_ref(&frame));
        let encoded_len = wire.len();
        prop_assert!(encoded_len >= HEADER_LEN);
        prop_assert_eq!(
            u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize,
            encoded_len - HEADER_LEN,
            "header length must match the payload written"
        );
        wire.extend_from_slice(&trailer);
        let decoded = ExecCodec::new().decode(&mut wire).unwrap();
        prop_assert_eq!(decoded, Some(frame));
        prop_assert_eq!(&wire[..], &trailer[..], "decoder must consume exactly the frame");
    }

    /// The same frame through `decode_eof` (what `FramedRead` calls once the stream ends).
    #[test]
    fn single_frame_roundtrips_at_eof(frame in support::frame()) {
        let mut wire = encode_all(std::slice::from_ref(&frame));
        let mut codec = ExecCodec::new();
        prop_assert_eq!(codec.decode_eof(&mut wire).unwrap(), Some(frame));
        prop_assert!(wire.is_empty());
        prop_assert_eq!(codec.decode_eof(&mut wire).unwrap(), None);
    }

    /// A whole session encoded back to back decodes to the same sequence however the bytes are
    /// split into reads (one byte at a time, random sizes, all at once).
    #[test]
    fn sequences_roundtrip_in_any_chunking(
        frames in proptest::collection::vec(support::frame(), 0..10),
        chunks in chunking(),
    ) {
        let wire = encode_all(&frames);
        prop_assert_eq!(decode_chunked(&wire, &chunks).unwrap(), frames);
    }

    /// Zero-copy: every non-empty byte payload of a decoded frame (STDIN/STDOUT/STDERR data,
    /// unknown payloads, CONTROL attachments, staged file contents) points into the buffer that
    /// was handed to the `decode` call that produced it.
    ///
    /// This is meaningful because that buffer is still alive when we look (the codec's `src`
    /// keeps its tail, and the decoded `Bytes` keeps a reference to the storage): no other live
    /// allocation can overlap its address range, so a payload that lies inside the range shares
    /// the buffer's storage; a copy would necessarily live elsewhere.
    #[test]
    fn payloads_are_split_off_the_read_buffer(
        frames in proptest::collection::vec(support::frame(), 1..6),
        chunks in chunking(),
    ) {
        let wire = encode_all(&frames);
        let decoded = decode_chunked_with(&mut ExecCodec::new(), &wire, &chunks, |frame, buffer| {
            for payload in byte_payloads(frame).into_iter().filter(|p| !p.is_empty()) {
                let at = payload.as_ptr() as usize;
                assert!(
                    buffer.start <= at && at + payload.len() <= buffer.end,
                    "payload {:#x}+{} is outside the decode buffer {:#x?}",
                    at, payload.len(), buffer
                );
            }
        }).unwrap();
        prop_assert_eq!(decoded, frames);
    }
}

/// The zero-copy property on its own, with exact offsets: two large STDOUT payloads decoded from
/// one buffer sit right after their headers, back to back, in the buffer's storage.
#[test]
fn stdout_payloads_share_the_frozen_read_buffer() {
    let first = Bytes::from(vec![1u8; 100_000]);
    let second = Bytes::from(vec![2u8; 50_000]);
    let wire = encode_all(&[Frame::Stdout(first.clone()), Frame::Stdout(second.clone())]);
    // Freeze a copy of the wire so there is one immutable allocation to compare against; the
    // decoder works on a `BytesMut` converted back from it without copying (it is unique).
    let frozen: Bytes = wire.freeze();
    let base = frozen.as_ptr() as usize;
    let mut buf = BytesMut::from(frozen);
    assert_eq!(
        buf.as_ptr() as usize,
        base,
        "BytesMut::from(Bytes) must not copy here"
    );

    let mut codec = ExecCodec::new();
    let Some(Frame::Stdout(a)) = codec.decode(&mut buf).unwrap() else {
        panic!("expected STDOUT")
    };
    let Some(Frame::Stdout(b)) = codec.decode(&mut buf).unwrap() else {
        panic!("expected STDOUT")
    };
    assert_eq!(a, first);
    assert_eq!(b, second);
    assert_eq!(a.as_ptr() as usize, base + HEADER_LEN);
    assert_eq!(
        b.as_ptr() as usize,
        base + HEADER_LEN + first.len() + HEADER_LEN
    );
    // A copy would own its storage alone; a split shares it with the rest of the buffer.
    assert!(!a.is_unique() && !b.is_unique());
    // The payloads outlive the buffer they were split from, and once the other references are
    // gone the survivor is the storage's only owner.
    drop(buf);
    drop(b);
    assert!(a.is_unique());
    assert!(a.iter().all(|&x| x == 1));
}

/// Staged file contents are split off the REQUEST attachment in order, without copies.
#[test]
fn staged_files_are_slices_of_the_attachment() {
    let mut request = ExecRequest::new(["sh", "/x/run.sh"]);
    request.stage_files = vec![
        StagedFile::new("/x/run.sh", &b"#!/bin/sh\necho hi\n"[..]).with_mode(0o755),
        StagedFile::new("/x/empty", Bytes::new()),
        StagedFile::new("/x/bin", vec![0u8, 0xff, 0, 0]),
    ];
    let mut wire = encode_all(&[Frame::Request(request.clone())]);
    let range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
    let Some(Frame::Request(decoded)) = ExecCodec::new().decode(&mut wire).unwrap() else {
        panic!("expected REQUEST")
    };
    assert_eq!(decoded, request);
    let run = decoded.stage_files[0].contents();
    let bin = decoded.stage_files[2].contents();
    assert!(range.contains(&(run.as_ptr() as usize)));
    // Contents are concatenated in order: the empty file takes no room.
    assert_eq!(bin.as_ptr() as usize, run.as_ptr() as usize + run.len());
    // The attachment is the tail of the frame.
    assert_eq!(bin.as_ptr() as usize + bin.len(), range.end);
}

/// One hand-written frame of every variant, so a failure names the variant directly.
#[test]
fn every_variant_by_hand() {
    let mut request = ExecRequest::new(["ls", "-l"]);
    request.env.insert("A".into(), "b=c".into());
    request.cwd = Some("/tmp".into());
    request.user = Some("1000:1000".into());
    request.tty = true;
    request.cols = Some(80);
    request.rows = Some(24);
    request.stdin = StdioMode::Null;
    request.stage_files = vec![StagedFile::new("/f", &b"\0\x01\x02"[..])];
    request.chain = vec![vec!["true".into()], vec![]];
    let frames = vec![
        Frame::Request(request),
        Frame::Request(ExecRequest::new(Vec::<String>::new())),
        Frame::control(ControlMessage::Action(ControlAction::Ping)),
        Frame::Control {
            message: ControlMessage::Action(ControlAction::WriteFile {
                path: "/etc/x".into(),
                mode: Some(0o600),
            }),
            data: Bytes::from_static(b"\0contents\0"),
        },
        Frame::control(ControlMessage::Action(ControlAction::ReadFile {
            path: "/etc/hostname".into(),
        })),
        Frame::control(ControlMessage::Action(ControlAction::SignalWorkload {
            signal: -9,
        })),
        Frame::control(ControlMessage::Action(ControlAction::SetClock {
            unix_nanos: u64::MAX,
        })),
        Frame::Control {
            message: ControlMessage::Action(ControlAction::ReseedRng),
            data: Bytes::from_static(&[0; 32]),
        },
        Frame::control(ControlMessage::Action(ControlAction::CrashGuest)),
        Frame::Control {
            message: ControlMessage::Action(ControlAction::Restored {
                unix_nanos: 1_700_000_000_000_000_000,
                restore_id: 7,
            }),
            data: Bytes::from_static(&[7; 32]),
        },
        Frame::control(ControlMessage::UnknownAction("teleport".into())),
        Frame::control(ControlMessage::UnknownAction(String::new())),
        Frame::control(ControlMessage::Ack(ControlAck::ok())),
        Frame::Control {
            message: ControlMessage::Ack(ControlAck {
                ok: true,
                error: None,
                version: Some("0.1.0".into()),
                boot_id: Some("abc".into()),
                protocol: Some(2),
            }),
            data: Bytes::from_static(b"file body"),
        },
        Frame::control(ControlMessage::Ack(ControlAck::error("no such file"))),
        Frame::Stdin(Bytes::new()),
        Frame::Stdin(Bytes::from_static(b"in")),
        Frame::Stdout(Bytes::new()),
        Frame::Stdout(Bytes::from_static(b"out")),
        Frame::Stderr(Bytes::new()),
        Frame::Stderr(Bytes::from_static(b"err")),
        Frame::Resize(WindowSize {
            cols: u16::MAX,
            rows: 0,
        }),
        Frame::Signal(15),
        Frame::Started { pid: 1 },
        Frame::Exit(ExitInfo {
            code: 0,
            peak_rss_kib: None,
            signal: None,
        }),
        Frame::Exit(ExitInfo {
            code: 137,
            peak_rss_kib: Some(u64::MAX),
            signal: None,
        }),
        Frame::Exit(ExitInfo::signaled(9)),
        Frame::Exit(ExitInfo {
            code: 143,
            peak_rss_kib: Some(0),
            signal: Some(15),
        }),
        Frame::Error(AgentError::new(ErrorCode::NotFound, "nope: not here")),
        Frame::Error(AgentError::new(ErrorCode::Other, "internal: looks nested")),
        Frame::Error(AgentError::new(ErrorCode::Internal, "")),
        Frame::Unknown {
            kind: 0x08,
            payload: Bytes::new(),
        },
        Frame::Unknown {
            kind: 0xfd,
            payload: Bytes::from_static(b"future"),
        },
    ];
    let wire = encode_all(&frames);
    assert_eq!(decode_chunked(&wire, &[usize::MAX]).unwrap(), frames);
    assert_eq!(decode_chunked(&wire, &[1]).unwrap(), frames);
}

/// A frame of exactly the maximum length is accepted by both sides.
#[test]
fn frame_of_exactly_the_maximum_length() {
    let mut codec = ExecCodec::with_max_frame_length(64);
    let frame = Frame::Stdout(vec![9u8; 64].into());
    let mut wire = BytesMut::new();
    codec.encode(&frame, &mut wire).unwrap();
    assert_eq!(wire.len(), HEADER_LEN + 64);
    assert_eq!(codec.decode(&mut wire).unwrap(), Some(frame));
}

/// The four EXIT layouts, byte for byte: the original 4- and 12-byte payloads still decode (with
/// no signal), and a signal is appended as a trailing u32 (8 and 16 bytes).
#[test]
fn exit_layouts_on_the_wire() {
    let cases: [(&[u8], ExitInfo); 4] = [
        (&[0, 0, 0, 137], ExitInfo::exited(137)),
        (
            &[0, 0, 0, 137, 0, 0, 0, 9],
            ExitInfo {
                code: 137,
                peak_rss_kib: None,
                signal: Some(9),
            },
        ),
        (
            &[0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 4, 0],
            ExitInfo {
                code: 7,
                peak_rss_kib: Some(1024),
                signal: None,
            },
        ),
        (
            &[0, 0, 0, 143, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 15],
            ExitInfo {
                code: 143,
                peak_rss_kib: Some(2),
                signal: Some(15),
            },
        ),
    ];
    for (payload, info) in cases {
        let wire = support::raw(supermachine_codec::kind::EXIT, payload);
        assert_eq!(encode_all(&[Frame::Exit(info)]), wire, "{info:?}");
        let mut buf = wire.clone();
        assert_eq!(
            ExecCodec::new().decode(&mut buf).unwrap(),
            Some(Frame::Exit(info))
        );
    }
    assert_eq!(ExitInfo::signaled(9).code, 137);
    assert_eq!(ExitInfo::signaled(u32::MAX).code, u32::MAX);
}
