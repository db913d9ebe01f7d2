//! Arbitrary frame → encode → decode gives the same frame and consumes every byte.
//!
//! The codec crate does not depend on `arbitrary`, so a fuzz-local mirror of `Frame` is
//! generated and converted.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use supermachine_codec::{
    kind, AgentError, CodecError, ControlAck, ControlAction, ControlMessage, ErrorCode, ExecCodec,
    ExecRequest, ExitInfo, Frame, StagedFile, StdioMode, WindowSize,
};
use tokio_util::codec::{Decoder, Encoder};

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
    Exit(u32, Option<u64>),
    Error(u8, String),
    Unknown(u8, Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct FuzzRequest {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    user: Option<String>,
    tty: bool,
    cols: Option<u16>,
    rows: Option<u16>,
    stdio: [bool; 3],
    stage_files: Vec<(String, Vec<u8>, Option<u32>)>,
    chain: Vec<Vec<String>>,
}

#[derive(Arbitrary, Debug)]
enum FuzzControl {
    Ping,
    ReadFile(String),
    WriteFile(String, Option<u32>),
    SignalWorkload(i32),
    SetClock(u64),
    ReseedRng,
    Unknown(String),
    Ack(bool, Option<String>, Option<String>, Option<String>),
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

impl From<FuzzFrame> for Frame {
    fn from(f: FuzzFrame) -> Frame {
        match f {
            FuzzFrame::Request(r) => {
                let mut request = ExecRequest::new(r.argv);
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
                Frame::Request(request)
            }
            FuzzFrame::Control(c, data) => Frame::Control {
                message: match c {
                    FuzzControl::Ping => ControlMessage::Action(ControlAction::Ping),
                    FuzzControl::ReadFile(path) => {
                        ControlMessage::Action(ControlAction::ReadFile { path })
                    }
                    FuzzControl::WriteFile(path, mode) => {
                        ControlMessage::Action(ControlAction::WriteFile { path, mode })
                    }
                    FuzzControl::SignalWorkload(signal) => {
                        ControlMessage::Action(ControlAction::SignalWorkload { signal })
                    }
                    FuzzControl::SetClock(unix_nanos) => {
                        ControlMessage::Action(ControlAction::SetClock { unix_nanos })
                    }
                    FuzzControl::ReseedRng => ControlMessage::Action(ControlAction::ReseedRng),
                    FuzzControl::Unknown(name) => ControlMessage::UnknownAction(name),
                    FuzzControl::Ack(ok, error, version, boot_id) => {
                        ControlMessage::Ack(ControlAck {
                            ok,
                            error,
                            version,
                            boot_id,
                        })
                    }
                },
                data: Bytes::from(data),
            },
            FuzzFrame::Stdin(b) => Frame::Stdin(b.into()),
            FuzzFrame::Stdout(b) => Frame::Stdout(b.into()),
            FuzzFrame::Stderr(b) => Frame::Stderr(b.into()),
            FuzzFrame::Resize(cols, rows) => Frame::Resize(WindowSize { cols, rows }),
            FuzzFrame::Signal(s) => Frame::Signal(s),
            FuzzFrame::Started(pid) => Frame::Started { pid },
            FuzzFrame::Exit(code, peak_rss_kib) => Frame::Exit(ExitInfo { code, peak_rss_kib }),
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

fuzz_target!(|input: FuzzFrame| {
    let frame = Frame::from(input);
    let mut codec = ExecCodec::new();
    let mut wire = BytesMut::new();
    match codec.encode(&frame, &mut wire) {
        Ok(()) => {}
        // The encoder rightly refuses these two shapes; anything else is a bug.
        Err(CodecError::InvalidFrame(_)) => {
            let refusable = matches!(&frame, Frame::Unknown { kind: k, .. } if kind::is_known(*k))
                || matches!(
                    &frame,
                    Frame::Control {
                        message: ControlMessage::UnknownAction(_),
                        ..
                    }
                );
            assert!(refusable, "refused a valid frame: {frame:?}");
            assert!(wire.is_empty());
            return;
        }
        Err(e) => panic!("encode failed for {frame:?}: {e}"),
    }
    let decoded = codec.decode(&mut wire).expect("decoding what we encoded");
    assert_eq!(decoded.as_ref(), Some(&frame));
    assert!(wire.is_empty(), "{} bytes left over", wire.len());
});
