use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::control::ControlMessage;
use crate::error::CodecError;
use crate::frame::{kind, AgentError, ExitInfo, Frame, WindowSize};
use crate::request::ExecRequest;

/// Bytes in a frame header: kind u8 + length u32.
pub const HEADER_LEN: usize = 5;

/// Largest payload accepted by default (16 MiB), as PROTOCOL.md specifies.
pub const DEFAULT_MAX_FRAME_LENGTH: usize = 16 * 1024 * 1024;

/// Separates the JSON document of a REQUEST/CONTROL payload from its binary attachment.
const ATTACHMENT_SEPARATOR: u8 = 0;

/// Encoder and decoder for [`Frame`]s.
///
/// The same codec serves both ends: the decoder accepts every kind in either direction and leaves
/// it to the caller to reject a frame that makes no sense where it arrived.
#[derive(Debug, Clone)]
pub struct ExecCodec {
    max_frame_length: usize,
}

impl Default for ExecCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl ExecCodec {
    /// A codec with the default maximum frame length ([`DEFAULT_MAX_FRAME_LENGTH`]).
    pub fn new() -> Self {
        ExecCodec {
            max_frame_length: DEFAULT_MAX_FRAME_LENGTH,
        }
    }

    /// A codec that refuses payloads longer than `max` bytes in both directions.
    ///
    /// The wire length field is a `u32`, so `max` is capped at `u32::MAX` (pass `usize::MAX` for
    /// "as large as the format allows").
    pub fn with_max_frame_length(max: usize) -> Self {
        ExecCodec {
            max_frame_length: max.min(u32::MAX as usize),
        }
    }

    /// The largest payload this codec accepts.
    pub fn max_frame_length(&self) -> usize {
        self.max_frame_length
    }
}

impl Decoder for ExecCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if src.len() < HEADER_LEN {
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        }
        let frame_kind = src[0];
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
        // Checked before reserving, so a hostile header cannot make us allocate.
        if len > self.max_frame_length {
            return Err(CodecError::FrameTooLarge {
                kind: frame_kind,
                len,
                max: self.max_frame_length,
            });
        }
        // Cannot overflow: len <= max_frame_length <= u32::MAX, far below usize::MAX on 64-bit;
        // checked anyway so 32-bit targets stay panic-free.
        let Some(total) = HEADER_LEN.checked_add(len) else {
            return Err(CodecError::FrameTooLarge {
                kind: frame_kind,
                len,
                max: self.max_frame_length,
            });
        };
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(len).freeze();
        parse_payload(frame_kind, payload).map(Some)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(CodecError::Truncated {
                buffered: buf.len(),
            }),
        }
    }
}

fn parse_payload(frame_kind: u8, payload: Bytes) -> Result<Frame, CodecError> {
    Ok(match frame_kind {
        kind::REQUEST => Frame::Request(parse_request(payload)?),
        kind::CONTROL => {
            let (json, data) = split_attachment(payload);
            let message =
                ControlMessage::from_json(&json).map_err(|source| CodecError::BadJson {
                    frame: "CONTROL",
                    source,
                })?;
            Frame::Control { message, data }
        }
        kind::STDIN => Frame::Stdin(payload),
        kind::STDOUT => Frame::Stdout(payload),
        kind::STDERR => Frame::Stderr(payload),
        kind::RESIZE => {
            let b = fixed::<4>(&payload, "RESIZE", "4")?;
            Frame::Resize(WindowSize {
                cols: u16::from_be_bytes([b[0], b[1]]),
                rows: u16::from_be_bytes([b[2], b[3]]),
            })
        }
        kind::SIGNAL => Frame::Signal(u32::from_be_bytes(fixed::<4>(&payload, "SIGNAL", "4")?)),
        kind::STARTED => Frame::Started {
            pid: u32::from_be_bytes(fixed::<4>(&payload, "STARTED", "4")?),
        },
        kind::EXIT => {
            // Layouts by length (see ExitInfo): the original 4 and 12, and 8 and 16 with the
            // terminating signal appended.
            let mut p = &payload[..];
            let (has_rss, has_signal) = match p.len() {
                4 => (false, false),
                8 => (false, true),
                12 => (true, false),
                16 => (true, true),
                got => {
                    return Err(CodecError::BadPayloadLength {
                        frame: "EXIT",
                        expected: "4, 8, 12 or 16",
                        got,
                    })
                }
            };
            Frame::Exit(ExitInfo {
                code: p.get_u32(),
                peak_rss_kib: has_rss.then(|| p.get_u64()),
                signal: has_signal.then(|| p.get_u32()),
            })
        }
        kind::ERROR => {
            let text = std::str::from_utf8(&payload).map_err(|_| CodecError::BadUtf8)?;
            Frame::Error(AgentError::parse(text))
        }
        other => Frame::Unknown {
            kind: other,
            payload,
        },
    })
}

fn fixed<const N: usize>(
    payload: &[u8],
    frame: &'static str,
    expected: &'static str,
) -> Result<[u8; N], CodecError> {
    payload
        .try_into()
        .map_err(|_| CodecError::BadPayloadLength {
            frame,
            expected,
            got: payload.len(),
        })
}

/// Splits `json \0 attachment`; without a separator the whole payload is JSON.
fn split_attachment(mut payload: Bytes) -> (Bytes, Bytes) {
    match payload.iter().position(|&b| b == ATTACHMENT_SEPARATOR) {
        Some(at) => {
            let json = payload.split_to(at);
            payload.advance(1);
            (json, payload)
        }
        None => (payload, Bytes::new()),
    }
}

fn parse_request(payload: Bytes) -> Result<ExecRequest, CodecError> {
    let (json, mut data) = split_attachment(payload);
    let mut request: ExecRequest =
        serde_json::from_slice(&json).map_err(|source| CodecError::BadJson {
            frame: "REQUEST",
            source,
        })?;
    let declared = request
        .stage_files
        .iter()
        .try_fold(0u64, |sum, f| sum.checked_add(f.declared_len()));
    if declared != Some(data.len() as u64) {
        return Err(CodecError::AttachmentMismatch {
            declared: declared.unwrap_or(u64::MAX),
            carried: data.len(),
        });
    }
    for file in &mut request.stage_files {
        // Lengths were checked to sum to data.len(), so each split is in bounds.
        let len = file.declared_len() as usize;
        file.set_contents(data.split_to(len));
    }
    Ok(request)
}

impl Encoder<Frame> for ExecCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&frame, dst)
    }
}

impl Encoder<&Frame> for ExecCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        // Byte payloads are checked before they are copied, so an oversized one costs nothing.
        if let Some(len) = known_payload_len(frame) {
            if len > self.max_frame_length {
                return Err(CodecError::FrameTooLarge {
                    kind: frame.kind(),
                    len,
                    max: self.max_frame_length,
                });
            }
        }
        let start = dst.len();
        dst.reserve(HEADER_LEN);
        dst.put_u8(frame.kind());
        dst.put_u32(0); // length, patched below once the payload is written
        if let Err(err) = write_payload(frame, dst) {
            dst.truncate(start);
            return Err(err);
        }
        let len = dst.len() - start - HEADER_LEN;
        if len > self.max_frame_length {
            dst.truncate(start);
            return Err(CodecError::FrameTooLarge {
                kind: frame.kind(),
                len,
                max: self.max_frame_length,
            });
        }
        let Ok(len32) = u32::try_from(len) else {
            // Unreachable while max_frame_length <= u32::MAX; never write a lying header.
            dst.truncate(start);
            return Err(CodecError::FrameTooLarge {
                kind: frame.kind(),
                len,
                max: self.max_frame_length,
            });
        };
        dst[start + 1..start + HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
        Ok(())
    }
}

/// The payload length of frames whose payload is raw bytes, known before encoding.
fn known_payload_len(frame: &Frame) -> Option<usize> {
    match frame {
        Frame::Stdin(b) | Frame::Stdout(b) | Frame::Stderr(b) => Some(b.len()),
        Frame::Unknown { payload, .. } => Some(payload.len()),
        // JSON frames are measured after serializing, so the error reports the true length.
        _ => None,
    }
}

fn write_payload(frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
    match frame {
        Frame::Request(request) => {
            // A StagedFile deserialized from JSON carries a `len` but no contents; sending it
            // would make the peer reject the whole request, so refuse it here, where the caller
            // can still act.
            if request
                .stage_files
                .iter()
                .any(|f| f.declared_len() != f.contents().len() as u64)
            {
                return Err(CodecError::InvalidFrame(
                    "a staged file's declared length does not match its contents",
                ));
            }
            serde_json::to_writer(dst.writer(), request).map_err(|source| CodecError::BadJson {
                frame: "REQUEST",
                source,
            })?;
            if !request.stage_files.is_empty() {
                dst.put_u8(ATTACHMENT_SEPARATOR);
                for file in &request.stage_files {
                    dst.extend_from_slice(file.contents());
                }
            }
        }
        Frame::Control { message, data } => {
            if let ControlMessage::UnknownAction(name) = message {
                if crate::control::is_known_action(name) {
                    return Err(CodecError::InvalidFrame(
                        "UnknownAction must name an action this version does not know",
                    ));
                }
            }
            message
                .write_json(dst.writer())
                .map_err(|source| CodecError::BadJson {
                    frame: "CONTROL",
                    source,
                })?;
            if !data.is_empty() {
                dst.put_u8(ATTACHMENT_SEPARATOR);
                dst.extend_from_slice(data);
            }
        }
        Frame::Stdin(bytes) | Frame::Stdout(bytes) | Frame::Stderr(bytes) => {
            dst.extend_from_slice(bytes)
        }
        Frame::Resize(size) => {
            dst.put_u16(size.cols);
            dst.put_u16(size.rows);
        }
        Frame::Signal(signal) => dst.put_u32(*signal),
        Frame::Started { pid } => dst.put_u32(*pid),
        Frame::Exit(info) => {
            dst.put_u32(info.code);
            if let Some(rss) = info.peak_rss_kib {
                dst.put_u64(rss);
            }
            if let Some(signal) = info.signal {
                dst.put_u32(signal);
            }
        }
        Frame::Error(error) => dst.extend_from_slice(error.to_string().as_bytes()),
        Frame::Unknown { kind: k, payload } => {
            if kind::is_known(*k) {
                return Err(CodecError::InvalidFrame(
                    "an Unknown frame cannot use a known kind byte",
                ));
            }
            dst.extend_from_slice(payload);
        }
    }
    Ok(())
}
