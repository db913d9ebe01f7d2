//! Arbitrary frames → encode → decode give the same frames and consume every byte: one at a
//! time, with a random maximum frame length, and back to back in random chunk sizes.
//!
//! The codec crate does not depend on `arbitrary`, so a fuzz-local mirror of `Frame` is
//! generated and converted through the codec's public constructors.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use supermachine_codec::{
    kind, AgentError, CodecError, ControlAck, ControlAction, ControlMessage, ErrorCode, ExecCodec,
    ExecRequest, ExitInfo, Frame, StagedFile, StdioMode, WindowSize, HEADER_LEN,
};
use tokio_util::codec::{Decoder, Encoder};

/// The whole fuzz input. Field order matters for the seeds (`fuzz_seeds.rs`): the chunk byte
/// comes first and `frames` takes the rest of the data.
#[derive(Arbitrary, Debug)]
struct Input {
    /// Each read of the concatenated stream is `chunk + 1` bytes.
    chunk: u8,
    /// When set, the maximum frame length used for the single-frame encodes.
    max: Option<u16>,
    /// The frames, encoded back to back.
    frames: Vec<FuzzFrame>,
}

/// Mirror of `Frame`; keep the variant order (the seeds select variants by index).
#[derive(Arbitrary, Debug)]
enum FuzzFrame {
    Request(FuzzRequest),
    Control(FuzzControl, Vec<u8>),
    Stdin(Vec<u8>),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Resize(u16, u16),
    Signal(u32),
    Started(u32),
    /// code, peak RSS, terminating signal (the 4/8/12/16-byte EXIT layouts).
    Exit(u32, Option<u64>, Option<u32>),
    Error(u8, String),
    Unknown(u8, Vec<u8>),
}

/// Mirror of `ExecRequest`.
#[derive(Arbitrary, Debug)]
struct FuzzRequest {
    version: u32,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    user: Option<String>,
    tty: bool,
    cols: Option<u16>,
    rows: Option<u16>,
    /// `true` = `StdioMode::Null` for stdin, stdout, stderr.
    stdio: [bool; 3],
    stage_files: Vec<(String, Vec<u8>, Option<u32>)>,
    chain: Vec<Vec<String>>,
    env_clear: bool,
    env_remove: Vec<String>,
}

/// Mirror of `ControlMessage` (actions flattened in).
#[derive(Arbitrary, Debug)]
enum FuzzControl {
    Ping,
    ReadFile(String),
    WriteFile(String, Option<u32>),
    SignalWorkload(i32),
    SetClock(u64),
    ReseedRng,
    CrashGuest,
    Restored(u64, u64),
    ConnectTcp(u16),
    Echo,
    Unknown(String),
    Ack(bool, Option<String>, Option<String>, Option<String>, Option<u32>),
}

fn stdio(null: bool) -> StdioMode {
    if null {
        StdioMode::Null
    } else {
        StdioMode::Piped
    }
}

fn error_code(n: u8) -> ErrorCode {
    match n % 6 {
        0 => ErrorCode::NotFound,
        1 => ErrorCode::PermissionDenied,
        2 => ErrorCode::InvalidRequest,
        3 => ErrorCode::SpawnFailed,
        4 => ErrorCode::Internal,
        _ => ErrorCode::Other,
    }
}

fn request(r: FuzzRequest) -> ExecRequest {
    let mut request = ExecRequest::new(r.argv);
    request.version = r.version;
    request.env = r.env;
    request.cwd = r.cwd;
    request.user = r.user;
    request.tty = r.tty;
    request.cols = r.cols;
    request.rows = r.rows;
    request.stdin = stdio(r.stdio[0]);
    request.stdout = stdio(r.stdio[1]);
    request.stderr = stdio(r.stdio[2]);
    request.stage_files = r
        .stage_files
        .into_iter()
        .map(|(path, contents, mode)| {
            let file = StagedFile::new(path, contents);
            match mode {
                Some(mode) => file.with_mode(mode),
                None => file,
            }
        })
        .collect();
    request.chain = r.chain;
    request.env_clear = r.env_clear;
    request.env_remove = r.env_remove;
    request
}

fn control(c: FuzzControl) -> ControlMessage {
    use ControlMessage::Action;
    match c {
        FuzzControl::Ping => Action(ControlAction::Ping),
        FuzzControl::ReadFile(path) => Action(ControlAction::ReadFile { path }),
        FuzzControl::WriteFile(path, mode) => Action(ControlAction::WriteFile { path, mode }),
        FuzzControl::SignalWorkload(signal) => Action(ControlAction::SignalWorkload { signal }),
        FuzzControl::SetClock(unix_nanos) => Action(ControlAction::SetClock { unix_nanos }),
        FuzzControl::ReseedRng => Action(ControlAction::ReseedRng),
        FuzzControl::CrashGuest => Action(ControlAction::CrashGuest),
        FuzzControl::Restored(unix_nanos, restore_id) => Action(ControlAction::Restored {
            unix_nanos,
            restore_id,
        }),
        FuzzControl::ConnectTcp(port) => Action(ControlAction::ConnectTcp { port }),
        FuzzControl::Echo => Action(ControlAction::Echo),
        FuzzControl::Unknown(name) => ControlMessage::UnknownAction(name),
        FuzzControl::Ack(ok, error, version, boot_id, protocol) => {
            ControlMessage::Ack(ControlAck {
                ok,
                error,
                version,
                boot_id,
                protocol,
            })
        }
    }
}

impl From<FuzzFrame> for Frame {
    fn from(f: FuzzFrame) -> Frame {
        match f {
            FuzzFrame::Request(r) => Frame::Request(request(r)),
            FuzzFrame::Control(c, data) => Frame::Control {
                message: control(c),
                data: Bytes::from(data),
            },
            FuzzFrame::Stdin(b) => Frame::Stdin(b.into()),
            FuzzFrame::Stdout(b) => Frame::Stdout(b.into()),
            FuzzFrame::Stderr(b) => Frame::Stderr(b.into()),
            FuzzFrame::Resize(cols, rows) => Frame::Resize(WindowSize { cols, rows }),
            FuzzFrame::Signal(s) => Frame::Signal(s),
            FuzzFrame::Started(pid) => Frame::Started { pid },
            FuzzFrame::Exit(code, peak_rss_kib, signal) => Frame::Exit(ExitInfo {
                code,
                peak_rss_kib,
                signal,
            }),
            FuzzFrame::Error(code, message) => {
                Frame::Error(AgentError::new(error_code(code), message))
            }
            FuzzFrame::Unknown(kind, payload) => Frame::Unknown {
                kind,
                payload: payload.into(),
            },
        }
    }
}

/// Whether the encoder must refuse `frame` as `InvalidFrame`: the two shapes a peer would
/// misread (an `Unknown` frame under a known kind byte, an `UnknownAction` naming a known
/// action; the names mirror the codec's `KNOWN_ACTIONS`).
fn must_be_refused(frame: &Frame) -> bool {
    match frame {
        Frame::Unknown { kind: k, .. } => kind::is_known(*k),
        Frame::Control {
            message: ControlMessage::UnknownAction(name),
            ..
        } => matches!(
            name.as_str(),
            "ping"
                | "read_file"
                | "write_file"
                | "signal_workload"
                | "set_clock"
                | "reseed_rng"
                | "crash_guest"
                | "restored"
                | "connect_tcp"
                | "echo"
        ),
        _ => false,
    }
}

/// Encodes `frame` alone with the default codec and checks the outcome; returns the wire bytes
/// when the frame is one the encoder must accept.
fn encode_one(frame: &Frame) -> Option<BytesMut> {
    let mut wire = BytesMut::new();
    match ExecCodec::new().encode(frame, &mut wire) {
        Ok(()) => {
            assert!(
                !must_be_refused(frame),
                "encoded a frame it must refuse: {frame:?}"
            );
            Some(wire)
        }
        Err(CodecError::InvalidFrame(_)) if must_be_refused(frame) => {
            assert!(wire.is_empty(), "a refused frame left bytes behind");
            None
        }
        Err(e) => panic!("encode failed for {frame:?}: {e}"),
    }
}

fuzz_target!(|input: Input| {
    let frames: Vec<Frame> = input.frames.into_iter().map(Frame::from).collect();
    let mut stream = BytesMut::new();
    let mut accepted = Vec::new();
    for frame in frames {
        let Some(mut wire) = encode_one(&frame) else {
            continue;
        };
        let payload_len = wire.len() - HEADER_LEN;
        stream.extend_from_slice(&wire);

        // A smaller maximum: refused exactly when the payload is over it, and then the
        // destination buffer is left as it was.
        if let Some(max) = input.max {
            let max = usize::from(max);
            let mut limited = BytesMut::from(&b"before"[..]);
            match ExecCodec::with_max_frame_length(max).encode(&frame, &mut limited) {
                Ok(()) => assert!(payload_len <= max && limited[6..] == wire[..]),
                Err(CodecError::FrameTooLarge { len, .. }) => {
                    assert!(payload_len > max && len == payload_len);
                    assert_eq!(&limited[..], b"before");
                }
                Err(e) => panic!("unexpected error {e} with max {max} for {frame:?}"),
            }
        }

        let decoded = ExecCodec::new()
            .decode(&mut wire)
            .unwrap_or_else(|e| panic!("decoding what we encoded failed: {e}: {frame:?}"));
        assert_eq!(decoded.as_ref(), Some(&frame));
        assert!(wire.is_empty(), "{} bytes left over", wire.len());
        accepted.push(frame);
    }

    // The same frames back to back, read `chunk + 1` bytes at a time.
    let step = usize::from(input.chunk) + 1;
    let mut codec = ExecCodec::new();
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    for piece in stream.chunks(step) {
        buf.extend_from_slice(piece);
        while let Some(frame) = codec.decode(&mut buf).expect("valid stream") {
            decoded.push(frame);
        }
    }
    assert!(codec.decode_eof(&mut buf).expect("clean end").is_none());
    assert_eq!(decoded, accepted);
});
