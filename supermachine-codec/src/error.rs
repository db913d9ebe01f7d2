use std::io;

/// Everything that can go wrong while turning bytes into frames or frames into bytes.
///
/// Every malformed input maps to one of these; the decoder never panics.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The underlying stream failed.
    #[error("I/O error on the exec connection")]
    Io(#[from] io::Error),
    /// A frame header announced (or an encoder was asked to write) more bytes than allowed.
    /// Checked before anything is allocated.
    #[error("frame of kind {kind:#04x} is {len} bytes, above the maximum of {max} bytes")]
    FrameTooLarge {
        /// The frame kind byte.
        kind: u8,
        /// The announced payload length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes of a frame buffered)")]
    Truncated {
        /// How many bytes of the incomplete frame had arrived.
        buffered: usize,
    },
    /// A fixed-size payload (RESIZE, SIGNAL, EXIT, STARTED) had the wrong length.
    #[error("{frame} frame payload is {got} bytes, expected {expected}")]
    BadPayloadLength {
        /// Which frame.
        frame: &'static str,
        /// Lengths that would have been valid, in words.
        expected: &'static str,
        /// The length received.
        got: usize,
    },
    /// A REQUEST or CONTROL payload was not valid JSON of the expected shape.
    #[error("{frame} frame has invalid JSON")]
    BadJson {
        /// Which frame.
        frame: &'static str,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
    /// Staged file lengths in a REQUEST do not add up to the attachment that follows the JSON.
    #[error("REQUEST frame declares {declared} bytes of staged files but carries {carried}")]
    AttachmentMismatch {
        /// Sum of the `len` fields.
        declared: u64,
        /// Attachment bytes actually present.
        carried: usize,
    },
    /// An ERROR frame's message was not UTF-8.
    #[error("ERROR frame message is not valid UTF-8")]
    BadUtf8,
    /// The encoder was given a frame it must not put on the wire (e.g. an `Unknown` frame whose
    /// kind is a known one, which the peer would misread).
    #[error("refusing to encode invalid frame: {0}")]
    InvalidFrame(&'static str),
}
