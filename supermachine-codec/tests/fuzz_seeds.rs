//! The seed corpus of the cargo-fuzz targets in `fuzz/`, generated from the real encoder.
//!
//! Every run checks that each seed still means what its name says (valid seeds decode, malformed
//! ones fail with the intended error), so the seeds cannot silently rot when the wire format
//! changes. To (re)write the checked-in files under `fuzz/corpus/<target>/`:
//!
//! ```text
//! SUPERMACHINE_WRITE_FUZZ_SEEDS=1 cargo test -p supermachine-codec --test fuzz_seeds
//! ```
//!
//! Input formats (they must match `fuzz/fuzz_targets/*.rs`):
//! * `decode_stream`: 1 config byte (bit 7 set: maximum frame length = low 7 bits; clear: the
//!   default maximum), 4 chunk-size bytes (each read is `byte + 1` long, cycled), then the
//!   stream.
//! * `json_payload`: 1 selector byte (even: REQUEST, odd: CONTROL), then the frame's payload.
//! * `roundtrip`: unstructured bytes for `arbitrary`. The seeds only steer the enum
//!   discriminants (arbitrary 1.x picks variant `(u32_le * COUNT) >> 32`) so every frame variant
//!   is reached from the start; the fuzzer fills in the rest (see `roundtrip_seeds`).

mod support;

use std::path::PathBuf;

use bytes::{BufMut, Bytes};
use supermachine_codec::{
    kind, AgentError, CodecError, ControlAck, ControlAction, ControlMessage, ErrorCode, ExecCodec,
    ExecRequest, ExitInfo, Frame, StagedFile, StdioMode, WindowSize, DEFAULT_MAX_FRAME_LENGTH,
};
use support::{encode_all, raw};
use tokio_util::codec::Decoder;

/// Whether an error is the one a malformed seed is meant to trigger.
type ErrorCheck = fn(&CodecError) -> bool;

/// What a `decode_stream` seed must do.
#[derive(Debug)]
enum Expect {
    /// Decode to this many frames and end cleanly.
    Frames(usize),
    /// Fail with an error for which this returns true.
    Fails(ErrorCheck),
}

/// `decode_stream` prefix: default maximum, whole stream in one read.
const WHOLE: [u8; 5] = [0x00, 0xff, 0xff, 0xff, 0xff];
/// `decode_stream` prefix: default maximum, one byte per read.
const BYTEWISE: [u8; 5] = [0x00, 0, 0, 0, 0];
/// `decode_stream` prefix: default maximum, reads of 4, 17, 65 and 2 bytes.
const MIXED: [u8; 5] = [0x00, 3, 16, 64, 1];

fn with_prefix(prefix: [u8; 5], wire: &[u8]) -> Vec<u8> {
    let mut seed = prefix.to_vec();
    seed.extend_from_slice(wire);
    seed
}

/// One frame of every variant, named.
fn valid_frames() -> Vec<(&'static str, Frame)> {
    let mut tty = ExecRequest::new(["sh", "-c", "echo hi; exit 3"]);
    tty.env.insert("TERM".into(), "xterm".into());
    tty.cwd = Some("/tmp".into());
    tty.user = Some("1000:1000".into());
    tty.tty = true;
    tty.cols = Some(80);
    tty.rows = Some(24);
    let mut staged = ExecRequest::new(["/x/run.sh"]);
    staged.stdin = StdioMode::Null;
    staged.stderr = StdioMode::Null;
    staged.stage_files = vec![
        StagedFile::new("/x/run.sh", &b"#!/bin/sh\ncat /x/data\n"[..]).with_mode(0o755),
        StagedFile::new("/x/empty", Bytes::new()),
        StagedFile::new("/x/data", &b"\0\x01\xff\0"[..]),
    ];
    staged.chain = vec![
        vec!["true".into()],
        vec!["sh".into(), "-c".into(), "exit 0".into()],
    ];
    let mut cleared = ExecRequest::new(["env"]);
    cleared.env_clear = true;
    cleared.env_remove = vec!["HOME".into()];
    cleared.env.insert("ONLY".into(), "this".into());
    let action = |a| Frame::control(ControlMessage::Action(a));
    vec![
        ("request", Frame::Request(ExecRequest::new(["true"]))),
        ("request_tty", Frame::Request(tty)),
        ("request_staged", Frame::Request(staged)),
        ("request_env_clear", Frame::Request(cleared)),
        ("control_ping", action(ControlAction::Ping)),
        (
            "control_read_file",
            action(ControlAction::ReadFile {
                path: "/etc/hostname".into(),
            }),
        ),
        (
            "control_write_file",
            Frame::Control {
                message: ControlMessage::Action(ControlAction::WriteFile {
                    path: "/etc/motd".into(),
                    mode: Some(0o644),
                }),
                data: Bytes::from_static(b"hello\0world\n"),
            },
        ),
        (
            "control_signal_workload",
            action(ControlAction::SignalWorkload { signal: 15 }),
        ),
        (
            "control_set_clock",
            action(ControlAction::SetClock {
                unix_nanos: 1_700_000_000_000_000_000,
            }),
        ),
        (
            "control_reseed_rng",
            Frame::Control {
                message: ControlMessage::Action(ControlAction::ReseedRng),
                data: Bytes::from_static(&[0x5a; 32]),
            },
        ),
        ("control_crash_guest", action(ControlAction::CrashGuest)),
        (
            "control_restored",
            action(ControlAction::Restored {
                unix_nanos: 1_700_000_000_000_000_000,
                restore_id: 7,
            }),
        ),
        (
            "control_unknown_action",
            Frame::control(ControlMessage::UnknownAction("teleport".into())),
        ),
        (
            "control_ack_ping",
            Frame::control(ControlMessage::Ack(ControlAck {
                ok: true,
                error: None,
                version: Some("0.1.0".into()),
                boot_id: Some("4f1c5b3e-0000-4000-8000-000000000000".into()),
                protocol: Some(2),
            })),
        ),
        (
            "control_ack_data",
            Frame::Control {
                message: ControlMessage::Ack(ControlAck::ok()),
                data: Bytes::from_static(b"file body"),
            },
        ),
        (
            "control_ack_error",
            Frame::control(ControlMessage::Ack(ControlAck::error("no such file"))),
        ),
        ("stdin", Frame::Stdin("input\n".into())),
        ("stdin_eof", Frame::Stdin(Bytes::new())),
        ("stdout", Frame::Stdout("hello\n".into())),
        ("stderr", Frame::Stderr("oops\n".into())),
        (
            "resize",
            Frame::Resize(WindowSize {
                cols: 120,
                rows: 40,
            }),
        ),
        ("signal", Frame::Signal(15)),
        ("started", Frame::Started { pid: 1234 }),
        (
            "exit",
            Frame::Exit(ExitInfo {
                code: 7,
                peak_rss_kib: None,
                signal: None,
            }),
        ),
        (
            "exit_rss",
            Frame::Exit(ExitInfo {
                code: 137,
                peak_rss_kib: Some(2048),
                signal: None,
            }),
        ),
        ("exit_signal", Frame::Exit(ExitInfo::signaled(9))),
        (
            "exit_rss_signal",
            Frame::Exit(ExitInfo {
                code: 143,
                peak_rss_kib: Some(4096),
                signal: Some(15),
            }),
        ),
        (
            "error",
            Frame::Error(AgentError::new(
                ErrorCode::NotFound,
                "program not found: nope",
            )),
        ),
        (
            "error_other",
            Frame::Error(AgentError::new(ErrorCode::Other, "from a newer agent")),
        ),
        (
            "unknown_kind",
            Frame::Unknown {
                kind: 0x42,
                payload: "future".into(),
            },
        ),
    ]
}

fn request_payload(json: &str, attachment: Option<&[u8]>) -> Vec<u8> {
    let mut payload = json.as_bytes().to_vec();
    if let Some(attachment) = attachment {
        payload.push(0);
        payload.extend_from_slice(attachment);
    }
    payload
}

/// `decode_stream` seeds, each with what it must do.
fn decode_stream_seeds() -> Vec<(String, Vec<u8>, Expect)> {
    use Expect::*;
    let frames = valid_frames();
    let wire_of = |name: &str| {
        let frame = &frames.iter().find(|(n, _)| *n == name).unwrap().1;
        encode_all(std::slice::from_ref(frame)).to_vec()
    };
    let mut seeds: Vec<(String, Vec<u8>, Expect)> = frames
        .iter()
        .map(|(name, frame)| {
            let wire = encode_all(std::slice::from_ref(frame));
            (
                format!("frame_{name}"),
                with_prefix(WHOLE, &wire),
                Frames(1),
            )
        })
        .collect();

    let exec: Vec<u8> = [
        "request_staged",
        "started",
        "stdin",
        "stdin_eof",
        "stdout",
        "unknown_kind",
        "stderr",
        "exit_rss",
    ]
    .iter()
    .flat_map(|n| wire_of(n))
    .collect();
    for (how, prefix) in [("whole", WHOLE), ("bytewise", BYTEWISE), ("mixed", MIXED)] {
        seeds.push((
            format!("session_exec_{how}"),
            with_prefix(prefix, &exec),
            Frames(8),
        ));
    }
    let tty: Vec<u8> = [
        "request_tty",
        "started",
        "resize",
        "stdout",
        "signal",
        "exit_signal",
    ]
    .iter()
    .flat_map(|n| wire_of(n))
    .collect();
    seeds.push(("session_tty".into(), with_prefix(MIXED, &tty), Frames(6)));
    let control: Vec<u8> = ["control_write_file", "control_ack_data"]
        .iter()
        .flat_map(|n| wire_of(n))
        .collect();
    seeds.push((
        "session_control".into(),
        with_prefix(MIXED, &control),
        Frames(2),
    ));
    let failed: Vec<u8> = ["request", "error"]
        .iter()
        .flat_map(|n| wire_of(n))
        .collect();
    seeds.push((
        "session_error".into(),
        with_prefix(BYTEWISE, &failed),
        Frames(2),
    ));
    // Bit 7 set: maximum 8 bytes, so the STDOUT (6) passes and the REQUEST does not.
    let mut small = wire_of("stdout");
    small.extend_from_slice(&wire_of("request"));
    seeds.push((
        "small_max".into(),
        with_prefix([0x88, 0xff, 0xff, 0xff, 0xff], &small),
        Fails(|e| matches!(e, CodecError::FrameTooLarge { max: 8, .. })),
    ));

    let staged_4 = r#"{"version":1,"argv":["x"],"stage_files":[{"path":"/a","len":4}]}"#;
    let overflow = format!(
        r#"{{"version":1,"argv":["x"],"stage_files":[{{"path":"/a","len":{}}},{{"path":"/b","len":1}}]}}"#,
        u64::MAX
    );
    let mut huge = vec![kind::STDOUT];
    huge.put_u32(u32::MAX);
    let malformed: Vec<(&str, Vec<u8>, ErrorCheck)> = vec![
        ("huge_len", huge, |e| {
            matches!(e, CodecError::FrameTooLarge { .. })
        }),
        ("short_header", vec![kind::STDOUT, 0, 0], |e| {
            matches!(e, CodecError::Truncated { buffered: 3 })
        }),
        (
            "short_payload",
            raw(kind::STDOUT, b"0123456789")[..8].to_vec(),
            |e| matches!(e, CodecError::Truncated { buffered: 8 }),
        ),
        (
            "json_request",
            raw(kind::REQUEST, b"{not json").to_vec(),
            |e| {
                matches!(
                    e,
                    CodecError::BadJson {
                        frame: "REQUEST",
                        ..
                    }
                )
            },
        ),
        (
            "missing_argv",
            raw(kind::REQUEST, br#"{"version":1}"#).to_vec(),
            |e| {
                matches!(
                    e,
                    CodecError::BadJson {
                        frame: "REQUEST",
                        ..
                    }
                )
            },
        ),
        ("json_control", raw(kind::CONTROL, b"[1,2").to_vec(), |e| {
            matches!(
                e,
                CodecError::BadJson {
                    frame: "CONTROL",
                    ..
                }
            )
        }),
        (
            "known_action_bad_field",
            raw(kind::CONTROL, br#"{"action":"read_file","path":1}"#).to_vec(),
            |e| {
                matches!(
                    e,
                    CodecError::BadJson {
                        frame: "CONTROL",
                        ..
                    }
                )
            },
        ),
        (
            "staged_short",
            raw(kind::REQUEST, &request_payload(staged_4, Some(b"ab"))).to_vec(),
            |e| matches!(e, CodecError::AttachmentMismatch { .. }),
        ),
        (
            "staged_long",
            raw(kind::REQUEST, &request_payload(staged_4, Some(b"abcdef"))).to_vec(),
            |e| matches!(e, CodecError::AttachmentMismatch { .. }),
        ),
        (
            "staged_overflow",
            raw(kind::REQUEST, &request_payload(&overflow, Some(b"a"))).to_vec(),
            |e| matches!(e, CodecError::AttachmentMismatch { .. }),
        ),
        (
            "utf8",
            raw(kind::ERROR, b"internal: \xff\xfe").to_vec(),
            |e| matches!(e, CodecError::BadUtf8),
        ),
        ("exit_len_2", raw(kind::EXIT, &[0, 0]).to_vec(), |e| {
            matches!(e, CodecError::BadPayloadLength { .. })
        }),
        ("exit_len_10", raw(kind::EXIT, &[0; 10]).to_vec(), |e| {
            matches!(e, CodecError::BadPayloadLength { .. })
        }),
        ("resize_len_5", raw(kind::RESIZE, &[0; 5]).to_vec(), |e| {
            matches!(e, CodecError::BadPayloadLength { .. })
        }),
        ("signal_len_3", raw(kind::SIGNAL, &[0; 3]).to_vec(), |e| {
            matches!(e, CodecError::BadPayloadLength { .. })
        }),
        ("started_len_0", raw(kind::STARTED, &[]).to_vec(), |e| {
            matches!(e, CodecError::BadPayloadLength { .. })
        }),
    ];
    for (name, wire, check) in malformed {
        // Behind a valid frame, so the decoder has state when it meets the bad one.
        let mut stream = wire_of("stdout");
        stream.extend_from_slice(&wire);
        seeds.push((
            format!("bad_{name}"),
            with_prefix(MIXED, &stream),
            Fails(check),
        ));
    }
    seeds
}

/// Runs a `decode_stream` seed the way the fuzz target does.
fn run_decode_stream(seed: &[u8]) -> Result<usize, CodecError> {
    let (config, rest) = seed.split_first().unwrap();
    let max = if config & 0x80 == 0 {
        DEFAULT_MAX_FRAME_LENGTH
    } else {
        usize::from(config & 0x7f)
    };
    let (sizes, stream) = rest.split_at(rest.len().min(4));
    let sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s) + 1).collect();
    let mut codec = ExecCodec::with_max_frame_length(max);
    support::decode_chunked_with(&mut codec, stream, &sizes, |_, _| {}).map(|f| f.len())
}

/// `json_payload` seeds: selector byte, then a REQUEST (even) or CONTROL (odd) payload.
fn json_payload_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for (name, frame) in valid_frames() {
        let selector = match frame.kind() {
            kind::REQUEST => 0,
            kind::CONTROL => 1,
            _ => continue,
        };
        let wire = encode_all(&[frame]);
        let mut seed = vec![selector];
        seed.extend_from_slice(&wire[5..]);
        seeds.push((name.to_string(), seed));
    }
    let extra: &[(&str, u8, &[u8])] = &[
        (
            "request_all_fields",
            0,
            br#"{"version":1,"argv":["a"],"env":{"K":"V"},"cwd":"/","user":"root","tty":false,"cols":1,"rows":2,"stdin":"null","stdout":"piped","stderr":"null","chain":[["b"]],"future_field":{"x":[1,2.5,null]}}"#,
        ),
        ("request_escapes", 0, br#"{"version":1,"argv":["\u0000\"\\\ud83d\ude00\n"]}"#),
        ("request_nested", 0, b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"),
        ("request_missing_version", 0, br#"{"argv":["a"]}"#),
        ("control_null_action", 1, br#"{"action":null,"ok":true}"#),
        ("control_extra_fields", 1, br#"{"action":"ping","extra":{"a":[true]}}"#),
        ("control_bad_mode", 1, br#"{"action":"write_file","path":"/a","mode":1e3}"#),
        ("control_duplicate_key", 1, br#"{"action":"ping","action":"ping"}"#),
    ];
    for (name, selector, payload) in extra {
        let mut seed = vec![*selector];
        seed.extend_from_slice(payload);
        seeds.push((name.to_string(), seed));
    }
    seeds
}

/// `roundtrip` seeds. `Input` is `{ chunk: u8, max: Option<u16>, frames: Vec<FuzzFrame> }`;
/// `frames` takes the rest of the data as (continue byte, odd = another element; element)*,
/// and each `FuzzFrame` starts with a 4-byte discriminant. The field bytes after it are filler
/// (arbitrary takes collection lengths from the *end* of the data, so exact layouts are not worth
/// hand-building); `cargo fuzz fmt roundtrip <seed>` shows what a seed decodes to.
fn roundtrip_seeds() -> Vec<(String, Vec<u8>)> {
    const VARIANTS: u64 = 11;
    let selector = |i: u64| -> [u8; 4] {
        // Smallest u32 v with (v * VARIANTS) >> 32 == i.
        let v = (i << 32).div_ceil(VARIANTS);
        u32::try_from(v).unwrap().to_le_bytes()
    };
    let filler: &[u8] = b"\x05/bin/sh\0-c\x01echo hi\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b";
    let mut seeds = Vec::new();
    for i in 0..VARIANTS {
        // chunk 7, max None, one element.
        let mut seed = vec![7u8, 0, 1];
        seed.extend_from_slice(&selector(i));
        seed.extend_from_slice(filler);
        seeds.push((format!("variant_{i:02}"), seed));
    }
    // The fixed-size variants (RESIZE, SIGNAL, STARTED, EXIT with RSS) in one stream, read one
    // byte at a time, single frames encoded with an 8-byte maximum: here the layout is exact.
    let mut all = vec![0u8, 1, 8, 0];
    for (i, fields) in [
        (5, &[80u8, 0, 24, 0][..]),
        (6, &[15, 0, 0, 0]),
        (7, &[1, 0, 0, 0]),
        (8, &[3, 0, 0, 0, 1, 0, 4, 0, 0, 0, 0, 0, 0]),
    ] {
        all.push(1);
        all.extend_from_slice(&selector(i));
        all.extend_from_slice(fields);
    }
    all.push(0);
    seeds.push(("fixed_size_stream".into(), all));
    seeds
}

fn seed_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Replaces `fuzz/corpus/<target>/` with `seeds`.
fn write_seeds(target: &str, seeds: &[(String, Vec<u8>)]) {
    let dir = seed_dir(target);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
}

#[test]
fn seeds_mean_what_their_names_say() {
    let stream = decode_stream_seeds();
    assert!(stream.len() >= 40, "{} decode_stream seeds", stream.len());
    for (name, seed, expect) in &stream {
        match (expect, run_decode_stream(seed)) {
            (Expect::Frames(n), Ok(got)) => assert_eq!(got, *n, "{name}"),
            (Expect::Fails(check), Err(err)) => assert!(check(&err), "{name}: {err:?}"),
            (expect, got) => panic!("{name}: expected {expect:?}, got {got:?}"),
        }
    }
    for (name, seed) in json_payload_seeds() {
        let (selector, payload) = seed.split_first().unwrap();
        let k = if selector % 2 == 0 {
            kind::REQUEST
        } else {
            kind::CONTROL
        };
        // Named "request_*"/"control_*" seeds from valid frames must decode; extras may fail.
        let result = ExecCodec::new().decode(&mut raw(k, payload));
        if valid_frames().iter().any(|(n, _)| *n == name) {
            assert!(matches!(result, Ok(Some(_))), "{name}: {result:?}");
        }
    }
    assert_eq!(roundtrip_seeds().len(), 12);

    if std::env::var_os("SUPERMACHINE_WRITE_FUZZ_SEEDS").is_some() {
        let stream: Vec<(String, Vec<u8>)> = stream.into_iter().map(|(n, s, _)| (n, s)).collect();
        write_seeds("decode_stream", &stream);
        write_seeds("json_payload", &json_payload_seeds());
        write_seeds("roundtrip", &roundtrip_seeds());
    }
}
