//! REQUEST and CONTROL payloads straight into the decoder, so the fuzzer spends its time in the
//! JSON + attachment parsing rather than on frame headers. Anything accepted must re-encode to
//! a frame that decodes the same.
//!
//! Input layout: byte 0 even → REQUEST, odd → CONTROL; the rest is the payload.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use supermachine_codec::{kind, ControlMessage, ExecCodec, Frame};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let frame_kind = if selector % 2 == 0 {
        kind::REQUEST
    } else {
        kind::CONTROL
    };
    let mut buf = BytesMut::with_capacity(5 + payload.len());
    buf.put_u8(frame_kind);
    buf.put_u32(payload.len() as u32);
    buf.put_slice(payload);
    let mut codec = ExecCodec::new();
    let frame = match codec.decode(&mut buf) {
        Ok(Some(frame)) => frame,
        Ok(None) => panic!("a complete frame must decode or fail"),
        Err(_) => return,
    };
    assert!(buf.is_empty());
    assert_eq!(frame.kind(), frame_kind);
    if let Frame::Control {
        message: ControlMessage::UnknownAction(name),
        ..
    } = &frame
    {
        // Also implied by the re-encode below (the encoder refuses known names), but this names
        // the broken invariant directly.
        assert!(
            ![
                "ping",
                "read_file",
                "write_file",
                "signal_workload",
                "set_clock",
                "reseed_rng",
                "crash_guest",
                "restored"
            ]
            .contains(&name.as_str()),
            "a known action decoded as unknown: {name}"
        );
    }
    let mut wire = BytesMut::new();
    codec
        .encode(&frame, &mut wire)
        .unwrap_or_else(|e| panic!("decoded frame cannot be re-encoded: {e}: {frame:?}"));
    assert_eq!(
        codec
            .decode(&mut wire)
            .expect("re-encoded frame must decode"),
        Some(frame)
    );
    assert!(wire.is_empty());
});
