//! Arbitrary bytes, fed to the decoder in arbitrary chunk sizes, never panic; and every frame
//! the decoder accepts re-encodes to bytes that decode to the same frame.
//!
//! Input layout (shared with the seed generator in
//! `supermachine-codec/tests/fuzz_seeds.rs`):
//! * byte 0: bit 7 set → maximum frame length = low 7 bits (0..=127, to reach the limit checks
//!   with short inputs); clear → the default maximum;
//! * bytes 1..=4: chunk sizes, each read is `byte + 1` bytes, cycled;
//! * the rest: the byte stream.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use supermachine_codec::{ExecCodec, Frame, DEFAULT_MAX_FRAME_LENGTH, HEADER_LEN};
use tokio_util::codec::{Decoder, Encoder};

/// A decoded frame must survive encode → decode unchanged (decoding canonicalises: an ERROR
/// text without a code gains `error: `, unknown JSON fields are dropped, ...; the canonical form
/// must then be stable).
fn check_reencodes(frame: &Frame) {
    let mut codec = ExecCodec::new();
    let mut wire = BytesMut::new();
    codec
        .encode(frame, &mut wire)
        .unwrap_or_else(|e| panic!("decoded frame cannot be re-encoded: {e}: {frame:?}"));
    let again = codec
        .decode(&mut wire)
        .expect("re-encoded frame must decode");
    assert_eq!(again.as_ref(), Some(frame), "decode is not stable");
    assert!(
        wire.is_empty(),
        "re-encoded frame left {} bytes",
        wire.len()
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&config, rest)) = data.split_first() else {
        return;
    };
    let max = if config & 0x80 == 0 {
        DEFAULT_MAX_FRAME_LENGTH
    } else {
        usize::from(config & 0x7f)
    };
    let (sizes, stream) = rest.split_at(rest.len().min(4));
    let mut sizes = sizes.iter().map(|&s| usize::from(s) + 1).cycle();
    let mut codec = ExecCodec::with_max_frame_length(max);
    let mut buf = BytesMut::new();
    let mut at = 0;
    loop {
        if at < stream.len() {
            let n = sizes.next().unwrap_or(usize::MAX).min(stream.len() - at);
            buf.extend_from_slice(&stream[at..at + n]);
            at += n;
        }
        let eof = at == stream.len();
        loop {
            let next = if eof {
                codec.decode_eof(&mut buf)
            } else {
                codec.decode(&mut buf)
            };
            match next {
                Ok(Some(frame)) => check_reencodes(&frame),
                Ok(None) => break,
                // A decoding error ends the stream, as it does for FramedRead.
                Err(_) => return,
            }
            // Memory is bounded by what was fed plus one maximum-sized frame (reservations may
            // round up, hence the slack), never by what a header claims.
            assert!(buf.capacity() <= 2 * (stream.len() + HEADER_LEN + max) + (128 << 10));
        }
        if eof {
            // decode_eof returned Ok(None): the stream ended on a frame boundary.
            assert!(buf.is_empty());
            return;
        }
    }
});
