//! How the CLI fails: one line on stderr (`supermachine: ...`) and a non-zero exit code, never
//! a panic or a backtrace.

use std::fmt;
use std::process::ExitCode;

/// Exit code for errors of the CLI itself (as `docker run` uses 125).
pub const EXIT_FAILURE: u8 = 125;

/// An error, flattened to the one line the user sees.
#[derive(Debug)]
pub struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    /// A failure with exit code [`EXIT_FAILURE`].
    pub fn new(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: EXIT_FAILURE,
        }
    }

    /// A failure with its own exit code.
    pub fn with_code(message: impl Into<String>, code: u8) -> Self {
        Failure {
            message: message.into(),
            code,
        }
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The line, without the `supermachine: ` prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The exit code it ends the CLI with.
    pub fn code(&self) -> u8 {
        self.code
    }

    /// Prints the line and returns the exit code.
    pub fn report(self) -> ExitCode {
        eprintln!("supermachine: {}", self.message);
        ExitCode::from(self.code)
    }
}

/// The error and its sources on one line (as `supermachine::Report`), skipping a source whose
/// text the line already carries: this crate's errors never repeat their cause, but errors of
/// other crates (I/O, HTTP, JSON) sometimes do.
fn one_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = e.source();
    }
    line.replace('\n', " ")
}

macro_rules! from_error {
    ($($ty:ty),*) => {$(
        impl From<$ty> for Failure {
            fn from(error: $ty) -> Self {
                Failure::new(one_line(&error))
            }
        }
    )*};
}

from_error!(
    std::io::Error,
    supermachine::Error,
    supermachine::ImageError,
    supermachine::PortMappingError,
    supermachine::RuleError,
    serde_json::Error
);
