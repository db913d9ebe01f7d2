//! proptest strategies for every [`Frame`] variant, and wire helpers, shared by the codec's
//! integration tests.
//!
//! Strategies only produce frames the encoder must accept; frames it must refuse are built by
//! hand in `malformed.rs`. Strings are drawn from the whole `char` range (NUL, quotes,
//! backslashes, control characters, non-BMP) because they end up inside JSON, where escaping is
//! what can go wrong.

// Each test binary includes this module and uses a different subset of it.
#![allow(dead_code)]

use bytes::{BufMut, Bytes, BytesMut};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use supermachine_codec::{
    kind, AgentError, ControlAck, ControlAction, ControlMessage, ErrorCode, ExecCodec, ExecRequest,
    ExitInfo, Frame, StagedFile, StdioMode, WindowSize,
};
use tokio_util::codec::{Decoder, Encoder};

/// The CONTROL action names this version of the codec knows (mirrors the private list in
/// `control.rs`; `malformed.rs` checks each one is refused as an `UnknownAction`, which keeps the
/// two in sync).
pub const KNOWN_ACTIONS: &[&str] = &[
    "ping",
    "read_file",
    "write_file",
    "signal_workload",
    "set_clock",
    "reseed_rng",
    "crash_guest",
    "restored",
];

/// Every [`ErrorCode`].
pub const ERROR_CODES: &[ErrorCode] = &[
    ErrorCode::NotFound,
    ErrorCode::PermissionDenied,
    ErrorCode::InvalidRequest,
    ErrorCode::SpawnFailed,
    ErrorCode::Internal,
    ErrorCode::Other,
];

/// The wire tokens of [`ERROR_CODES`], used to build messages that look like nested codes.
pub const ERROR_TOKENS: &[&str] = &[
    "not-found",
    "permission-denied",
    "invalid-request",
    "spawn-failed",
    "internal",
    "error",
];

/// A header + payload, written by hand (not by the encoder) so malformed frames can be built.
pub fn raw(kind: u8, payload: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(5 + payload.len());
    buf.put_u8(kind);
    buf.put_u32(u32::try_from(payload.len()).expect("test payloads fit a u32"));
    buf.put_slice(payload);
    buf
}

/// Encodes `frames` back to back with a default codec, panicking if any is refused.
pub fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut codec = ExecCodec::new();
    let mut buf = BytesMut::new();
    for frame in frames {
        codec.encode(frame, &mut buf).expect("encodable frame");
    }
    buf
}

/// Feeds `wire` to `codec` in the given chunk sizes (cycled; 0 counts as 1), decoding after every
/// chunk, then calls `decode_eof`. Returns every frame, or the first error.
///
/// `on_frame` sees each frame together with the address range of the buffer it was decoded
/// from, captured just before the `decode` call that produced it (for zero-copy checks).
pub fn decode_chunked_with(
    codec: &mut ExecCodec,
    wire: &[u8],
    chunks: &[usize],
    mut on_frame: impl FnMut(&Frame, std::ops::Range<usize>),
) -> Result<Vec<Frame>, supermachine_codec::CodecError> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut sizes = chunks.iter().copied().cycle();
    loop {
        if at < wire.len() {
            let n = sizes.next().unwrap_or(1).max(1).min(wire.len() - at);
            buf.extend_from_slice(&wire[at..at + n]);
            at += n;
        }
        let eof = at == wire.len();
        loop {
            let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
            let next = if eof {
                codec.decode_eof(&mut buf)?
            } else {
                codec.decode(&mut buf)?
            };
            match next {
                Some(frame) => {
                    on_frame(&frame, range);
                    frames.push(frame);
                }
                None => break,
            }
        }
        if eof {
            return Ok(frames);
        }
    }
}

/// [`decode_chunked_with`] with a default codec and no per-frame hook.
pub fn decode_chunked(
    wire: &[u8],
    chunks: &[usize],
) -> Result<Vec<Frame>, supermachine_codec::CodecError> {
    decode_chunked_with(&mut ExecCodec::new(), wire, chunks, |_, _| {})
}

/// Every byte payload a frame carries as [`Bytes`] (the ones the decoder must not copy).
pub fn byte_payloads(frame: &Frame) -> Vec<&Bytes> {
    match frame {
        Frame::Stdin(b) | Frame::Stdout(b) | Frame::Stderr(b) => vec![b],
        Frame::Unknown { payload, .. } => vec![payload],
        Frame::Control { data, .. } => vec![data],
        Frame::Request(request) => request.stage_files.iter().map(|f| f.contents()).collect(),
        _ => Vec::new(),
    }
}

/// Arbitrary bytes, up to `max` long; empty is drawn often because it is a special case
/// (STDIN EOF, no attachment).
pub fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        1 => Just(Bytes::new()),
        6 => vec(any::<u8>(), 0..max).prop_map(Bytes::from),
    ]
}

/// Arbitrary text from the whole `char` range, up to `max` chars.
pub fn text(max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..max).prop_map(String::from_iter)
}

fn stdio() -> impl Strategy<Value = StdioMode> {
    prop_oneof![Just(StdioMode::Piped), Just(StdioMode::Null)]
}

// Empty argvs are included: the codec does not police them (the agent answers
// `invalid-request`), so they must round-trip like anything else.
fn argv() -> impl Strategy<Value = Vec<String>> {
    vec(text(12), 0..4)
}

fn staged_file() -> impl Strategy<Value = StagedFile> {
    (text(16), bytes(300), option::of(any::<u32>())).prop_map(|(path, contents, mode)| {
        let file = StagedFile::new(path, contents);
        match mode {
            Some(mode) => file.with_mode(mode),
            None => file,
        }
    })
}

/// Any [`ExecRequest`] built through the public API, with binary staged files.
pub fn request() -> impl Strategy<Value = ExecRequest> {
    (
        (any::<u32>(), argv(), btree_map(text(8), text(8), 0..4)),
        (option::of(text(10)), option::of(text(10)), any::<bool>()),
        (option::of(any::<u16>()), option::of(any::<u16>())),
        (stdio(), stdio(), stdio()),
        (vec(staged_file(), 0..4), vec(argv(), 0..3)),
        (any::<bool>(), vec(text(8), 0..3)),
    )
        .prop_map(
            |(
                (version, argv, env),
                (cwd, user, tty),
                (cols, rows),
                (i, o, e),
                (files, chain),
                (env_clear, env_remove),
            )| {
                let mut request = ExecRequest::new(argv);
                request.version = version;
                request.env = env;
                request.cwd = cwd;
                request.user = user;
                request.tty = tty;
                request.cols = cols;
                request.rows = rows;
                request.stdin = i;
                request.stdout = o;
                request.stderr = e;
                request.stage_files = files;
                request.chain = chain;
                request.env_clear = env_clear;
                request.env_remove = env_remove;
                request
            },
        )
}

/// Every [`ControlAction`], with arbitrary fields.
pub fn action() -> impl Strategy<Value = ControlAction> {
    prop_oneof![
        Just(ControlAction::Ping),
        text(20).prop_map(|path| ControlAction::ReadFile { path }),
        (text(20), option::of(any::<u32>()))
            .prop_map(|(path, mode)| ControlAction::WriteFile { path, mode }),
        any::<i32>().prop_map(|signal| ControlAction::SignalWorkload { signal }),
        any::<u64>().prop_map(|unix_nanos| ControlAction::SetClock { unix_nanos }),
        Just(ControlAction::ReseedRng),
        Just(ControlAction::CrashGuest),
        (any::<u64>(), any::<u64>()).prop_map(|(unix_nanos, restore_id)| {
            ControlAction::Restored {
                unix_nanos,
                restore_id,
            }
        }),
    ]
}

/// An action name this version does not know: random text, or a near miss of a known name
/// (case, separators, whitespace) that must not be mistaken for it.
pub fn unknown_action_name() -> impl Strategy<Value = String> {
    let near_miss = (0..KNOWN_ACTIONS.len(), 0..5usize).prop_map(|(i, how)| {
        let name = KNOWN_ACTIONS[i];
        match how {
            0 => name.to_uppercase(),
            1 => name.replace('_', "-"),
            2 => format!("{name} "),
            3 => format!("{name}\0"),
            _ => format!("x{name}"),
        }
    });
    prop_oneof![text(16), near_miss, Just(String::new())]
        .prop_filter("must not be a known action", |n| {
            !KNOWN_ACTIONS.contains(&n.as_str())
        })
}

/// Any [`ControlAck`].
pub fn ack() -> impl Strategy<Value = ControlAck> {
    (
        any::<bool>(),
        option::of(text(20)),
        option::of(text(8)),
        option::of(text(36)),
        option::of(any::<u32>()),
    )
        .prop_map(|(ok, error, version, boot_id, protocol)| ControlAck {
            ok,
            error,
            version,
            boot_id,
            protocol,
        })
}

/// Any [`ControlMessage`] the encoder accepts.
pub fn control() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        action().prop_map(ControlMessage::Action),
        unknown_action_name().prop_map(ControlMessage::UnknownAction),
        ack().prop_map(ControlMessage::Ack),
    ]
}

/// Any [`ErrorCode`].
pub fn error_code() -> impl Strategy<Value = ErrorCode> {
    (0..ERROR_CODES.len()).prop_map(|i| ERROR_CODES[i])
}

/// An ERROR message, including ones that themselves look like `code: message` (the wire form
/// is `code: message`, so a parser splitting at the wrong `": "` would be caught here).
pub fn error_message() -> impl Strategy<Value = String> {
    prop_oneof![
        text(40),
        ((0..ERROR_TOKENS.len()), text(20))
            .prop_map(|(i, rest)| format!("{}: {rest}", ERROR_TOKENS[i])),
        Just(String::new()),
        Just(": ".to_string()),
        Just(":".to_string()),
    ]
}

/// A kind byte this version does not know.
pub fn unknown_kind() -> impl Strategy<Value = u8> {
    any::<u8>().prop_filter("unknown kinds only", |k| !kind::is_known(*k))
}

/// Any frame the encoder accepts, every variant represented.
pub fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        request().prop_map(Frame::Request),
        (control(), bytes(300)).prop_map(|(message, data)| Frame::Control { message, data }),
        bytes(2000).prop_map(Frame::Stdin),
        bytes(2000).prop_map(Frame::Stdout),
        bytes(2000).prop_map(Frame::Stderr),
        (any::<u16>(), any::<u16>())
            .prop_map(|(cols, rows)| Frame::Resize(WindowSize { cols, rows })),
        any::<u32>().prop_map(Frame::Signal),
        any::<u32>().prop_map(|pid| Frame::Started { pid }),
        (
            any::<u32>(),
            option::of(any::<u64>()),
            option::of(any::<u32>())
        )
            .prop_map(|(code, peak_rss_kib, signal)| Frame::Exit(ExitInfo {
                code,
                peak_rss_kib,
                signal
            })),
        (error_code(), error_message())
            .prop_map(|(code, message)| Frame::Error(AgentError::new(code, message))),
        (unknown_kind(), bytes(100)).prop_map(|(kind, payload)| Frame::Unknown { kind, payload }),
    ]
}

/// Chunk sizes to feed a stream in: one byte at a time, or a cycled list of sizes.
pub fn chunking() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        1 => Just(vec![1]),
        4 => vec(1usize..80, 1..8),
        1 => Just(vec![usize::MAX]),
    ]
}
