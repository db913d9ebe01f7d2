//! The CLI's own stdout. Rust ignores SIGPIPE, so `println!` panics when the reader has gone
//! (`supermachine ps | head -1`); here a closed stdout just ends the output, as in other tools.

use std::io::Write;

/// Writes `text` to stdout; a reader that went away is not an error.
pub fn write(text: &[u8]) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text).and_then(|()| stdout.flush());
}

/// `println!` for the CLI's own output.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write(format!("{}\n", format_args!($($arg)*)).as_bytes())
    };
}

pub(crate) use out;
