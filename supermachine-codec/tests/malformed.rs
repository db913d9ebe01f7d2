//! Every malformed input is an error of the right kind, never a panic, never a big allocation.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use supermachine_codec::{
    kind, CodecError, ControlAction, ControlMessage, ExecCodec, Frame, DEFAULT_MAX_FRAME_LENGTH,
};
use tokio_util::codec::{Decoder, Encoder};

fn raw(kind: u8, payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u8(kind);
    buf.put_u32(payload.len() as u32);
    buf.put_slice(payload);
    buf
}

fn decode(mut buf: BytesMut) -> Result<Option<Frame>, CodecError> {
    ExecCodec::new().decode(&mut buf)
}

#[test]
fn oversized_length_is_rejected_before_allocating() {
    let mut buf = BytesMut::with_capacity(16);
    buf.put_u8(kind::STDOUT);
    buf.put_u32(u32::MAX);
    let result = ExecCodec::new().decode(&mut buf);
    assert!(
        matches!(result, Err(CodecError::FrameTooLarge { len, .. }) if len == u32::MAX as usize)
    );
    assert!(buf.capacity() < 1024, "capacity grew to {}", buf.capacity());

    let mut buf = raw(kind::STDOUT, &[0; 101]);
    let result = ExecCodec::with_max_frame_length(100).decode(&mut buf);
    assert!(matches!(
        result,
        Err(CodecError::FrameTooLarge {
            len: 101,
            max: 100,
            ..
        })
    ));

    // Exactly the maximum is fine.
    let mut buf = raw(kind::STDOUT, &[0; 100]);
    assert!(ExecCodec::with_max_frame_length(100)
        .decode(&mut buf)
        .unwrap()
        .is_some());
    assert_eq!(
        ExecCodec::new().max_frame_length(),
        DEFAULT_MAX_FRAME_LENGTH
    );
}

#[test]
fn truncated_header_and_payload_at_eof() {
    for cut in 1..5 {
        let mut buf = BytesMut::from(&raw(kind::STDOUT, b"abc")[..cut]);
        let mut codec = ExecCodec::new();
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(
            matches!(codec.decode_eof(&mut buf), Err(CodecError::Truncated { buffered }) if buffered == cut)
        );
    }
    let mut buf = BytesMut::from(&raw(kind::STDOUT, b"abcdef")[..7]);
    assert!(matches!(
        ExecCodec::new().decode_eof(&mut buf),
        Err(CodecError::Truncated { buffered: 7 })
    ));
    let mut empty = BytesMut::new();
    assert!(ExecCodec::new().decode_eof(&mut empty).unwrap().is_none());
}

#[test]
fn bad_json() {
    for payload in [
        &b"{"[..],
        b"[]",
        b"{\"version\":1}",
        b"{\"version\":1,\"argv\":\"ls\"}",
        b"\xff\xfe",
    ] {
        assert!(
            matches!(
                decode(raw(kind::REQUEST, payload)),
                Err(CodecError::BadJson {
                    frame: "REQUEST",
                    ..
                })
            ),
            "{payload:?}"
        );
    }
    for payload in [
        &b"{"[..],
        b"42",
        b"{\"action\":\"read_file\"}",
        b"{\"ok\":\"yes\"}",
    ] {
        assert!(
            matches!(
                decode(raw(kind::CONTROL, payload)),
                Err(CodecError::BadJson {
                    frame: "CONTROL",
                    ..
                })
            ),
            "{payload:?}"
        );
    }
}

#[test]
fn unknown_control_actions_are_not_errors() {
    match decode(raw(
        kind::CONTROL,
        b"{\"action\":\"teleport\",\"to\":\"mars\"}",
    )) {
        Ok(Some(Frame::Control {
            message: ControlMessage::UnknownAction(name),
            ..
        })) => {
            assert_eq!(name, "teleport")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn staged_file_lengths_must_match_the_attachment() {
    let json = br#"{"version":1,"argv":["true"],"stage_files":[{"path":"/a","len":4}]}"#;
    for attachment in [&b"abc"[..], b"abcde", b""] {
        let mut payload = json.to_vec();
        payload.push(0);
        payload.extend_from_slice(attachment);
        assert!(matches!(
            decode(raw(kind::REQUEST, &payload)),
            Err(CodecError::AttachmentMismatch { declared: 4, .. })
        ));
    }
    let overflow = br#"{"version":1,"argv":["true"],"stage_files":[{"path":"/a","len":18446744073709551615},{"path":"/b","len":2}]}"#;
    let mut payload = overflow.to_vec();
    payload.extend_from_slice(b"\0ab");
    assert!(matches!(
        decode(raw(kind::REQUEST, &payload)),
        Err(CodecError::AttachmentMismatch { .. })
    ));
    // Declared files but no attachment at all.
    assert!(matches!(
        decode(raw(kind::REQUEST, json)),
        Err(CodecError::AttachmentMismatch { .. })
    ));
}

#[test]
fn bad_utf8_in_error() {
    assert!(matches!(
        decode(raw(kind::ERROR, b"not-found: \xff")),
        Err(CodecError::BadUtf8)
    ));
}

#[test]
fn fixed_size_payloads_with_wrong_lengths() {
    for (k, valid) in [
        (kind::RESIZE, &[4usize][..]),
        (kind::SIGNAL, &[4]),
        (kind::STARTED, &[4]),
        (kind::EXIT, &[4, 12]),
    ] {
        for len in 0..=16 {
            let result = decode(raw(k, &vec![1u8; len]));
            if valid.contains(&len) {
                assert!(matches!(result, Ok(Some(_))), "kind {k:#x} len {len}");
            } else {
                assert!(
                    matches!(result, Err(CodecError::BadPayloadLength { got, .. }) if got == len),
                    "kind {k:#x} len {len}: {result:?}"
                );
            }
        }
    }
}

#[test]
fn unknown_kinds_are_skippable_and_decoding_continues() {
    let mut buf = raw(0x42, b"from the future");
    buf.extend_from_slice(&raw(kind::STDOUT, b"still here"));
    let mut codec = ExecCodec::new();
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(Frame::Unknown {
            kind: 0x42,
            payload: Bytes::from_static(b"from the future")
        })
    );
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(Frame::Stdout("still here".into()))
    );
}

#[test]
fn encoder_refuses_what_the_peer_would_misread() {
    let mut codec = ExecCodec::new();
    let mut buf = BytesMut::from(&b"prefix"[..]);
    let unknown_with_known_kind = Frame::Unknown {
        kind: kind::STDOUT,
        payload: "x".into(),
    };
    assert!(matches!(
        codec.encode(&unknown_with_known_kind, &mut buf),
        Err(CodecError::InvalidFrame(_))
    ));
    let fake_unknown = Frame::control(ControlMessage::UnknownAction("ping".into()));
    assert!(matches!(
        codec.encode(&fake_unknown, &mut buf),
        Err(CodecError::InvalidFrame(_))
    ));
    let mut small = ExecCodec::with_max_frame_length(10);
    assert!(matches!(
        small.encode(&Frame::Stdout(vec![0u8; 11].into()), &mut buf),
        Err(CodecError::FrameTooLarge {
            len: 11,
            max: 10,
            ..
        })
    ));
    let big_write = Frame::Control {
        message: ControlMessage::Action(ControlAction::WriteFile {
            path: "/x".into(),
            mode: None,
        }),
        data: vec![0u8; 64].into(),
    };
    assert!(small.encode(&big_write, &mut buf).is_err());
    // Refused frames leave the buffer exactly as it was.
    assert_eq!(&buf[..], b"prefix");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..512),
        chunk in 1usize..32,
        max in prop_oneof![Just(DEFAULT_MAX_FRAME_LENGTH), 0usize..64],
    ) {
        let mut codec = ExecCodec::with_max_frame_length(max);
        let mut buf = BytesMut::new();
        'feed: for piece in data.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
        let _ = codec.decode_eof(&mut buf);
    }

    #[test]
    fn arbitrary_kind_and_payload_never_panic(k in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode(raw(k, &payload));
    }
}
