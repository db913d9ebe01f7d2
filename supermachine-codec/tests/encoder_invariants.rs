//! Regression tests for encoder bugs found while writing the property tests and fuzz targets:
//! the encoder must never put a frame on the wire that its own decoder rejects or misreads.

use bytes::BytesMut;
use supermachine_codec::{CodecError, ExecCodec, ExecRequest, Frame, StagedFile};
use tokio_util::codec::{Decoder, Encoder};

/// Encodes `frame`; if the encoder accepts it, it must decode back to the same frame.
fn encode_then_decode(frame: &Frame) -> Result<Option<Frame>, CodecError> {
    let mut wire = BytesMut::new();
    ExecCodec::new().encode(frame, &mut wire)?;
    ExecCodec::new().decode(&mut wire)
}

/// `StagedFile` and `ExecRequest` implement `Deserialize`, which fills `len` from the JSON but
/// leaves `contents` empty (`#[serde(skip)]`). Such a request used to encode into a frame the
/// decoder rejects (`AttachmentMismatch`); the encoder now refuses it up front.
#[test]
fn deserialized_staged_file_encodes_an_undecodable_request() {
    let file: StagedFile = serde_json::from_str(r#"{"path":"/a","len":5}"#).unwrap();
    let mut request = ExecRequest::new(["true"]);
    request.stage_files.push(file);
    let frame = Frame::Request(request);
    match encode_then_decode(&frame) {
        Err(CodecError::InvalidFrame(_)) => {} // refused up front: fine
        Ok(Some(decoded)) => assert_eq!(decoded, frame),
        other => panic!("encoder accepted a frame that decodes to {other:?}"),
    }
}

/// The same bug reached through `ExecRequest`'s own `Deserialize` (e.g. a request loaded from a
/// file or forwarded by a proxy).
#[test]
fn deserialized_exec_request_encodes_an_undecodable_request() {
    let request: ExecRequest = serde_json::from_str(
        r#"{"version":1,"argv":["cat","/a"],"stage_files":[{"path":"/a","len":3}]}"#,
    )
    .unwrap();
    let frame = Frame::Request(request);
    match encode_then_decode(&frame) {
        Err(CodecError::InvalidFrame(_)) => {}
        Ok(Some(decoded)) => assert_eq!(decoded, frame),
        other => panic!("encoder accepted a frame that decodes to {other:?}"),
    }
}

/// With a maximum above `u32::MAX` (e.g. `with_max_frame_length(usize::MAX)` to "turn the limit
/// off"), a payload longer than `u32::MAX` used to pass the length check and get a saturated,
/// lying header. The maximum is now capped at `u32::MAX` and byte payloads are checked before
/// they are copied, so this costs no memory: the 4 GiB vector is untouched calloc'd zero pages.
#[test]
fn payload_over_u32_max_is_refused_not_mislabelled() {
    let len = u32::MAX as usize + 1;
    // vec![0; n] comes from calloc: untouched zero pages, so only the encoder's copy costs RAM.
    let frame = Frame::Stdout(vec![0u8; len].into());
    let mut wire = BytesMut::new();
    let result = ExecCodec::with_max_frame_length(usize::MAX).encode(&frame, &mut wire);
    let header = wire
        .get(1..5)
        .map(|h| u32::from_be_bytes(h.try_into().unwrap()));
    let written = wire.len();
    drop(wire);
    match result {
        Err(CodecError::FrameTooLarge { .. }) => assert_eq!(written, 0),
        Err(other) => panic!("unexpected error {other:?}"),
        Ok(()) => panic!(
            "encoded a {len}-byte payload with header length {header:?} ({written} bytes written)"
        ),
    }
}
