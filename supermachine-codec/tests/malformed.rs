//! Every malformed input is an error of the right [`CodecError`] variant: never a panic, never a
//! large allocation; and the encoder refuses what the peer would misread, leaving its buffer
//! untouched.

mod support;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use supermachine_codec::{
    kind, AgentError, CodecError, ControlAction, ControlMessage, ErrorCode, ExecCodec, ExecRequest,
    ExitInfo, Frame, StagedFile, DEFAULT_MAX_FRAME_LENGTH, HEADER_LEN,
};
use support::{raw, KNOWN_ACTIONS};
use tokio_util::codec::{Decoder, Encoder};

/// Every kind byte the codec decodes into a typed frame.
const KNOWN_KINDS: &[u8] = &[
    kind::REQUEST,
    kind::CONTROL,
    kind::STDIN,
    kind::STDOUT,
    kind::STDERR,
    kind::RESIZE,
    kind::SIGNAL,
    kind::EXIT,
    kind::ERROR,
    kind::STARTED,
];

/// Decodes one frame from `buf` with a default codec.
fn decode(mut buf: BytesMut) -> Result<Option<Frame>, CodecError> {
    ExecCodec::new().decode(&mut buf)
}

/// A REQUEST payload: `json`, then (if `attachment` is given) NUL and the attachment.
fn request_payload(json: &str, attachment: Option<&[u8]>) -> Vec<u8> {
    let mut payload = json.as_bytes().to_vec();
    if let Some(attachment) = attachment {
        payload.push(0);
        payload.extend_from_slice(attachment);
    }
    payload
}

// ---------------------------------------------------------------------------------------------
// Length limits

#[test]
fn oversized_length_is_rejected_before_allocating() {
    // A header announcing 4 GiB - 1, for a known kind and an unknown one (the limit applies to
    // frames we would skip, too), fed one byte at a time into an empty buffer.
    for k in [kind::STDOUT, kind::REQUEST, 0x42] {
        let mut header = BytesMut::new();
        header.put_u8(k);
        header.put_u32(u32::MAX);
        let mut codec = ExecCodec::new();
        let mut buf = BytesMut::new();
        for (i, &byte) in header.iter().enumerate() {
            buf.put_u8(byte);
            let result = codec.decode(&mut buf);
            if i + 1 < HEADER_LEN {
                assert!(matches!(result, Ok(None)), "{result:?}");
            } else {
                match result {
                    Err(CodecError::FrameTooLarge {
                        kind: got,
                        len,
                        max,
                    }) => {
                        assert_eq!(got, k);
                        assert_eq!(len, u32::MAX as usize);
                        assert_eq!(max, DEFAULT_MAX_FRAME_LENGTH);
                    }
                    other => panic!("expected FrameTooLarge, got {other:?}"),
                }
            }
            // Whatever happened, the buffer never grew towards the announced length.
            assert!(buf.capacity() < 1024, "capacity grew to {}", buf.capacity());
        }
        // decode_eof reports the same error rather than a truncation.
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert!(buf.capacity() < 1024, "capacity grew to {}", buf.capacity());
    }
}

#[test]
fn custom_maximum_is_enforced_on_decode() {
    let mut codec = ExecCodec::with_max_frame_length(100);
    assert_eq!(codec.max_frame_length(), 100);
    assert!(matches!(
        codec.decode(&mut raw(kind::STDOUT, &[0; 101])),
        Err(CodecError::FrameTooLarge {
            len: 101,
            max: 100,
            ..
        })
    ));
    // Exactly the maximum is fine.
    assert!(codec
        .decode(&mut raw(kind::STDOUT, &[0; 100]))
        .unwrap()
        .is_some());
    // A zero maximum still passes empty frames (STDIN EOF).
    let mut zero = ExecCodec::with_max_frame_length(0);
    assert_eq!(
        zero.decode(&mut raw(kind::STDIN, b"")).unwrap(),
        Some(Frame::Stdin(Bytes::new()))
    );
    assert!(matches!(
        zero.decode(&mut raw(kind::STDIN, b"x")),
        Err(CodecError::FrameTooLarge { len: 1, max: 0, .. })
    ));
    assert_eq!(
        ExecCodec::new().max_frame_length(),
        DEFAULT_MAX_FRAME_LENGTH
    );
    assert_eq!(
        ExecCodec::default().max_frame_length(),
        DEFAULT_MAX_FRAME_LENGTH
    );
}

/// An allowed-but-large announced length may make the decoder reserve room for that frame, but
/// never much more than the maximum: memory per connection is bounded by the maximum.
#[test]
fn reservation_is_bounded_by_the_maximum() {
    let max = 1 << 20;
    let mut buf = BytesMut::new();
    buf.put_u8(kind::STDOUT);
    buf.put_u32(max as u32);
    let mut codec = ExecCodec::with_max_frame_length(max);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    assert!(
        buf.capacity() <= 2 * (HEADER_LEN + max),
        "capacity {}",
        buf.capacity()
    );
}

// ---------------------------------------------------------------------------------------------
// Truncation

#[test]
fn truncated_header_at_eof() {
    for cut in 1..HEADER_LEN {
        let mut buf = BytesMut::from(&raw(kind::STDOUT, b"abc")[..cut]);
        let mut codec = ExecCodec::new();
        assert!(codec.decode(&mut buf).unwrap().is_none());
        match codec.decode_eof(&mut buf) {
            Err(CodecError::Truncated { buffered }) => assert_eq!(buffered, cut),
            other => panic!("cut {cut}: {other:?}"),
        }
    }
}

#[test]
fn truncated_payload_at_eof() {
    let whole = raw(kind::STDOUT, b"abcdef");
    for cut in HEADER_LEN..whole.len() {
        let mut buf = BytesMut::from(&whole[..cut]);
        let mut codec = ExecCodec::new();
        assert!(codec.decode(&mut buf).unwrap().is_none());
        match codec.decode_eof(&mut buf) {
            Err(CodecError::Truncated { buffered }) => assert_eq!(buffered, cut),
            other => panic!("cut {cut}: {other:?}"),
        }
    }
}

#[test]
fn complete_frames_before_a_truncated_one_are_delivered() {
    let mut buf = raw(kind::STDOUT, b"one");
    buf.extend_from_slice(&raw(kind::EXIT, &[0, 0, 0, 0]));
    buf.extend_from_slice(&raw(kind::STDERR, b"partial")[..8]);
    let mut codec = ExecCodec::new();
    assert_eq!(
        codec.decode_eof(&mut buf).unwrap(),
        Some(Frame::Stdout("one".into()))
    );
    assert_eq!(
        codec.decode_eof(&mut buf).unwrap(),
        Some(Frame::Exit(ExitInfo {
            code: 0,
            peak_rss_kib: None,
            signal: None
        }))
    );
    assert!(matches!(
        codec.decode_eof(&mut buf),
        Err(CodecError::Truncated { buffered: 8 })
    ));
}

#[test]
fn clean_eof_is_not_an_error() {
    let mut empty = BytesMut::new();
    assert!(ExecCodec::new().decode_eof(&mut empty).unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// JSON payloads

#[test]
fn bad_json_in_request() {
    let cases: &[&[u8]] = &[
        b"",
        b"\0",
        b"{",
        b"{not json}",
        b"[]",
        b"null",
        b"42",
        b"\"string\"",
        b"\xff\xfe{}",
        br#"{"version":1,"argv":["ok"]} trailing"#,
        br#"{"version":1,"argv":["ok"]}}"#,
        br#"{"version":1,"argv":"ls"}"#,
        br#"{"version":-1,"argv":["ls"]}"#,
        br#"{"version":1,"argv":["ls"],"tty":"yes"}"#,
        br#"{"version":1,"argv":["ls"],"cols":65536}"#,
        br#"{"version":1,"argv":["ls"],"stdin":"file"}"#,
        br#"{"version":1,"argv":["ls"],"stage_files":[{"path":"/a"}]}"#,
        br#"{"version":1,"argv":["ls"],"stage_files":[{"path":"/a","len":-1}]}"#,
        br#"{"version":1,"argv":["\ud800"]}"#,
        b"{\"version\":1,\"argv\":[\"raw\x01control\"]}",
    ];
    for payload in cases {
        match decode(raw(kind::REQUEST, payload)) {
            Err(CodecError::BadJson {
                frame: "REQUEST", ..
            }) => {}
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(payload)),
        }
    }
}

#[test]
fn request_missing_a_required_field() {
    for (json, field) in [
        (r#"{"argv":["ls"]}"#, "version"),
        (r#"{"version":1}"#, "argv"),
        (r#"{}"#, "version"),
    ] {
        match decode(raw(kind::REQUEST, json.as_bytes())) {
            Err(CodecError::BadJson {
                frame: "REQUEST",
                source,
            }) => assert!(
                source
                    .to_string()
                    .contains(&format!("missing field `{field}`")),
                "{json}: {source}"
            ),
            other => panic!("{json}: {other:?}"),
        }
    }
}

#[test]
fn bad_json_in_control() {
    let cases: &[&[u8]] = &[
        b"",
        b"\0attachment",
        b"{",
        b"42",
        b"[]",
        b"null",
        b"\xff",
        // Not an ack (no `ok`) and not an action.
        b"{}",
        br#"{"ok":"yes"}"#,
        br#"{"ok":true,"error":5}"#,
        // The action name must be a string.
        br#"{"action":5}"#,
        br#"{"action":["ping"]}"#,
        // A known action with missing or mistyped fields is an error, not an unknown action.
        br#"{"action":"read_file"}"#,
        br#"{"action":"read_file","path":7}"#,
        br#"{"action":"write_file"}"#,
        br#"{"action":"write_file","path":"/a","mode":-1}"#,
        br#"{"action":"signal_workload"}"#,
        br#"{"action":"signal_workload","signal":4294967295}"#,
        br#"{"action":"set_clock","unix_nanos":"now"}"#,
        br#"{"action":"set_clock","unix_nanos":-1}"#,
        br#"{"action":"ping"} trailing"#,
    ];
    for payload in cases {
        match decode(raw(kind::CONTROL, payload)) {
            Err(CodecError::BadJson {
                frame: "CONTROL", ..
            }) => {}
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(payload)),
        }
    }
}

#[test]
fn unknown_control_actions_are_not_errors() {
    let mut payload = br#"{"action":"teleport","to":"mars"}"#.to_vec();
    payload.extend_from_slice(b"\0\0attached\0");
    match decode(raw(kind::CONTROL, &payload)) {
        Ok(Some(Frame::Control {
            message: ControlMessage::UnknownAction(name),
            data,
        })) => {
            assert_eq!(name, "teleport");
            // Only the first NUL separates; the attachment may contain NULs.
            assert_eq!(&data[..], b"\0attached\0");
        }
        other => panic!("{other:?}"),
    }
    // Case matters: "Ping" is not "ping".
    assert!(matches!(
        decode(raw(kind::CONTROL, br#"{"action":"Ping"}"#)),
        Ok(Some(Frame::Control {
            message: ControlMessage::UnknownAction(_),
            ..
        }))
    ));
}

// ---------------------------------------------------------------------------------------------
// Staged files vs. attachment

const ONE_FILE_OF_4: &str =
    r#"{"version":1,"argv":["true"],"stage_files":[{"path":"/a","len":4}]}"#;

#[test]
fn staged_file_lengths_must_match_the_attachment() {
    for (attachment, carried) in [
        (Some(&b""[..]), 0),
        (Some(b"abc"), 3),   // too short
        (Some(b"abcde"), 5), // too long
        (None, 0),           // no separator at all
    ] {
        match decode(raw(
            kind::REQUEST,
            &request_payload(ONE_FILE_OF_4, attachment),
        )) {
            Err(CodecError::AttachmentMismatch {
                declared: 4,
                carried: got,
            }) => assert_eq!(got, carried),
            other => panic!("{attachment:?}: {other:?}"),
        }
    }
    // Exactly right decodes.
    assert!(decode(raw(
        kind::REQUEST,
        &request_payload(ONE_FILE_OF_4, Some(b"abcd"))
    ))
    .unwrap()
    .is_some());
}

#[test]
fn attachment_without_staged_files_is_a_mismatch() {
    let json = r#"{"version":1,"argv":["true"]}"#;
    assert!(matches!(
        decode(raw(kind::REQUEST, &request_payload(json, Some(b"stray")))),
        Err(CodecError::AttachmentMismatch {
            declared: 0,
            carried: 5
        })
    ));
    // A separator with nothing after it carries zero bytes, which matches zero files.
    assert!(
        decode(raw(kind::REQUEST, &request_payload(json, Some(b""))))
            .unwrap()
            .is_some()
    );
}

#[test]
fn staged_file_lengths_that_overflow_u64() {
    let json = format!(
        r#"{{"version":1,"argv":["true"],"stage_files":[{{"path":"/a","len":{}}},{{"path":"/b","len":2}}]}}"#,
        u64::MAX
    );
    match decode(raw(kind::REQUEST, &request_payload(&json, Some(b"ab")))) {
        Err(CodecError::AttachmentMismatch { declared, carried }) => {
            assert_eq!(declared, u64::MAX);
            assert_eq!(carried, 2);
        }
        other => panic!("{other:?}"),
    }
    // A single huge length (no overflow) is a plain mismatch, with no allocation for it.
    let json = format!(
        r#"{{"version":1,"argv":["true"],"stage_files":[{{"path":"/a","len":{}}}]}}"#,
        u64::MAX
    );
    assert!(matches!(
        decode(raw(kind::REQUEST, &request_payload(&json, Some(b"")))),
        Err(CodecError::AttachmentMismatch {
            declared: u64::MAX,
            carried: 0
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// ERROR text

#[test]
fn bad_utf8_in_error() {
    let cases: &[&[u8]] = &[
        b"not-found: \xff",
        b"\x80",                // lone continuation byte
        b"internal: \xe2\x82",  // truncated multi-byte sequence
        b"\xc0\x80",            // overlong NUL
        b"error: \xed\xa0\x80", // UTF-16 surrogate
        b"\xf4\x90\x80\x80",    // above U+10FFFF
    ];
    for payload in cases {
        assert!(
            matches!(decode(raw(kind::ERROR, payload)), Err(CodecError::BadUtf8)),
            "{payload:?}"
        );
    }
}

#[test]
fn error_text_without_a_known_code_is_kept_whole() {
    for text in [
        "",
        "plain text",
        "timeout: from a newer agent",
        "not-found:no space",
    ] {
        assert_eq!(
            decode(raw(kind::ERROR, text.as_bytes())).unwrap(),
            Some(Frame::Error(AgentError::new(ErrorCode::Other, text)))
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed-size payloads

#[test]
fn fixed_size_payloads_with_wrong_lengths() {
    for (k, name, valid) in [
        (kind::RESIZE, "RESIZE", &[4usize][..]),
        (kind::SIGNAL, "SIGNAL", &[4]),
        (kind::STARTED, "STARTED", &[4]),
        (kind::EXIT, "EXIT", &[4, 8, 12, 16]),
    ] {
        for len in 0..=20 {
            let result = decode(raw(k, &vec![1u8; len]));
            if valid.contains(&len) {
                assert!(
                    matches!(result, Ok(Some(_))),
                    "{name} len {len}: {result:?}"
                );
            } else {
                match result {
                    Err(CodecError::BadPayloadLength { frame, got, .. }) => {
                        assert_eq!((frame, got), (name, len))
                    }
                    other => panic!("{name} len {len}: {other:?}"),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Unknown kinds

#[test]
fn unknown_kinds_are_skippable_and_decoding_continues() {
    let unknown: Vec<u8> = (0..=u8::MAX).filter(|k| !kind::is_known(*k)).collect();
    assert_eq!(unknown.len(), 256 - KNOWN_KINDS.len());
    assert!(KNOWN_KINDS.iter().all(|k| kind::is_known(*k)));

    let mut buf = BytesMut::new();
    let mut expected = Vec::new();
    for &k in &unknown {
        // Payloads that would be malformed for a known kind (bad JSON, odd lengths, bad
        // UTF-8) are opaque here.
        let payload = vec![k; usize::from(k % 7)];
        buf.extend_from_slice(&raw(k, &payload));
        expected.push(Frame::Unknown {
            kind: k,
            payload: payload.into(),
        });
        buf.extend_from_slice(&raw(kind::STDOUT, &[k]));
        expected.push(Frame::Stdout(vec![k].into()));
    }
    let mut codec = ExecCodec::new();
    let mut decoded = Vec::new();
    while let Some(frame) = codec.decode_eof(&mut buf).unwrap() {
        decoded.push(frame);
    }
    assert_eq!(decoded, expected);
}

// ---------------------------------------------------------------------------------------------
// Encoder refusals

/// Encodes `frame` after some existing bytes and checks it is refused with an error matching
/// `expected`, leaving the buffer byte-for-byte as it was.
fn assert_refused(codec: &mut ExecCodec, frame: &Frame, expected: impl Fn(&CodecError) -> bool) {
    let mut buf = BytesMut::from(&b"earlier frames"[..]);
    match codec.encode(frame, &mut buf) {
        Err(err) => assert!(expected(&err), "{frame:?}: unexpected error {err:?}"),
        Ok(()) => panic!("{frame:?} was encoded"),
    }
    assert_eq!(
        &buf[..],
        b"earlier frames",
        "buffer changed by a refused {frame:?}"
    );
}

#[test]
fn encoder_refuses_unknown_frames_with_a_known_kind() {
    for &k in KNOWN_KINDS {
        assert_refused(
            &mut ExecCodec::new(),
            &Frame::Unknown {
                kind: k,
                payload: "x".into(),
            },
            |e| matches!(e, CodecError::InvalidFrame(_)),
        );
    }
}

#[test]
fn encoder_refuses_unknown_action_naming_a_known_action() {
    for name in KNOWN_ACTIONS {
        assert_refused(
            &mut ExecCodec::new(),
            &Frame::control(ControlMessage::UnknownAction(name.to_string())),
            |e| matches!(e, CodecError::InvalidFrame(_)),
        );
    }
}

#[test]
fn encoder_refuses_frames_over_the_maximum() {
    let mut small = ExecCodec::with_max_frame_length(10);
    let too_large = |len: usize| move |e: &CodecError| matches!(e, CodecError::FrameTooLarge { len: l, max: 10, .. } if *l == len);
    assert_refused(
        &mut small,
        &Frame::Stdout(vec![0u8; 11].into()),
        too_large(11),
    );
    assert_refused(
        &mut small,
        &Frame::Stdin(vec![0u8; 4096].into()),
        too_large(4096),
    );
    assert_refused(
        &mut small,
        &Frame::Unknown {
            kind: 0x42,
            payload: vec![0u8; 11].into(),
        },
        too_large(11),
    );
    assert_refused(
        &mut small,
        &Frame::Error(AgentError::new(ErrorCode::Internal, "0123")),
        too_large("internal: 0123".len()),
    );
    let write = Frame::Control {
        message: ControlMessage::Action(ControlAction::WriteFile {
            path: "/x".into(),
            mode: None,
        }),
        data: vec![0u8; 64].into(),
    };
    assert_refused(&mut small, &write, |e| {
        matches!(e, CodecError::FrameTooLarge { max: 10, .. })
    });
    let mut request = ExecRequest::new(["true"]);
    request.stage_files = vec![StagedFile::new("/f", vec![1u8; 100])];
    assert_refused(&mut small, &Frame::Request(request), |e| {
        matches!(
            e,
            CodecError::FrameTooLarge {
                kind: 0xff,
                max: 10,
                ..
            }
        )
    });
    // An EXIT with peak RSS is 12 bytes; without, 4.
    let mut eight = ExecCodec::with_max_frame_length(8);
    assert_refused(
        &mut eight,
        &Frame::Exit(ExitInfo {
            code: 0,
            peak_rss_kib: Some(1),
            signal: None,
        }),
        |e| matches!(e, CodecError::FrameTooLarge { len: 12, .. }),
    );
    let mut buf = BytesMut::new();
    eight
        .encode(
            Frame::Exit(ExitInfo {
                code: 0,
                peak_rss_kib: None,
                signal: None,
            }),
            &mut buf,
        )
        .unwrap();
    assert_eq!(buf.len(), HEADER_LEN + 4);
}

// ---------------------------------------------------------------------------------------------
// Never panic

/// Feeds `data` to a codec with maximum `max` in `chunk`-sized pieces, stopping at the first
/// error the way `FramedRead` does; returns whether the stream ended cleanly.
fn feed(data: &[u8], chunk: usize, max: usize) -> bool {
    let mut codec = ExecCodec::with_max_frame_length(max);
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return false,
            }
        }
        // Memory stays bounded by what was fed plus one maximum-sized frame (growth may
        // double, and a re-allocation may round up to the first allocation size: hence the
        // factor and the slack), however hostile the announced lengths.
        assert!(buf.capacity() <= 2 * (data.len() + HEADER_LEN + max) + (64 << 10));
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(_)) => continue,
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Arbitrary bytes in arbitrary chunks, with the default or a tiny maximum, never panic.
    #[test]
    fn arbitrary_bytes_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..512),
        chunk in 1usize..40,
        max in prop_oneof![Just(DEFAULT_MAX_FRAME_LENGTH), 0usize..64],
    ) {
        feed(&data, chunk, max);
    }

    /// A well-formed header with an arbitrary kind and payload: the payload parsers see
    /// arbitrary bytes for every kind, which random streams rarely reach.
    #[test]
    fn arbitrary_kind_and_payload_never_panic(
        k in prop_oneof![proptest::sample::select(KNOWN_KINDS), any::<u8>()],
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let result = decode(raw(k, &payload));
        prop_assert!(!matches!(result, Ok(None)), "a complete frame must decode or fail");
    }

    /// Valid sessions with a few bytes overwritten: close to real traffic, so the corruption
    /// lands in JSON, lengths and attachments rather than only in headers.
    #[test]
    fn corrupted_valid_streams_never_panic(
        frames in proptest::collection::vec(support::frame(), 1..5),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        chunk in 1usize..64,
    ) {
        let mut wire = support::encode_all(&frames).to_vec();
        for (at, byte) in flips {
            let at = at.index(wire.len());
            wire[at] = byte;
        }
        feed(&wire, chunk, DEFAULT_MAX_FRAME_LENGTH);
    }

    /// Anything the decoder accepts is a frame the encoder can write back, and that re-encoding
    /// decodes to the same frame (decoding is a canonicalisation, not a lossy guess).
    #[test]
    fn accepted_frames_reencode_stably(
        k in proptest::sample::select(KNOWN_KINDS),
        payload in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            // JSON-looking payloads, so REQUEST/CONTROL get past the parser sometimes.
            support::text(40).prop_map(|s| serde_json::json!({ "action": s }).to_string().into_bytes()),
            support::text(20).prop_map(|s| {
                serde_json::json!({ "version": 1, "argv": [s], "cwd": null }).to_string().into_bytes()
            }),
            support::text(20).prop_map(|s| {
                serde_json::json!({ "ok": false, "error": s, "extra": [1] }).to_string().into_bytes()
            }),
        ],
    ) {
        if let Ok(Some(frame)) = decode(raw(k, &payload)) {
            let mut wire = support::encode_all(std::slice::from_ref(&frame));
            prop_assert_eq!(ExecCodec::new().decode(&mut wire).unwrap(), Some(frame));
            prop_assert!(wire.is_empty());
        }
    }
}
