//! Arbitrary bytes, fed to the decoder in arbitrary chunk sizes, never panic.
//!
//! The first byte picks a small maximum frame length (or the default), the next bytes pick the
//! chunk sizes; the rest is the stream.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use supermachine_codec::{ExecCodec, DEFAULT_MAX_FRAME_LENGTH};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&config, rest)) = data.split_first() else {
        return;
    };
    let max = if config & 0x80 == 0 {
        DEFAULT_MAX_FRAME_LENGTH
    } else {
        (config & 0x7f) as usize
    };
    let (sizes, stream) = rest.split_at(rest.len().min(4));
    let mut sizes = sizes.iter().map(|&s| s as usize + 1).cycle();
    let mut codec = ExecCodec::with_max_frame_length(max);
    let mut buf = BytesMut::new();
    let mut at = 0;
    while at < stream.len() {
        let n = sizes.next().unwrap_or(1).min(stream.len() - at);
        buf.extend_from_slice(&stream[at..at + n]);
        at += n;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                // A decoding error ends the stream, as it does for FramedRead.
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});
