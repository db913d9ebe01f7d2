//! The control socket of a VM host: one JSON request line, one JSON answer line.
//!
//! `{"op":"ping"}` → `{"ok":true,"text":"running"}` (or `"paused"`); `{"op":"console"}` →
//! `{"ok":true,"text":"..."}` (the guest console); `{"op":"pause"}` / `{"op":"unpause"}` →
//! `{"ok":true}` once the VM is paused / running again; `{"op":"stop"}` → `{"ok":true}`, after
//! which the host stops the VM, removes its registry directory and exits.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::failure::Failure;

/// How long a client waits for an answer; a host that takes longer is wedged.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for a pause or unpause: longer than the VMM gives its vCPUs to
/// park (10 s), so its own error comes back rather than a time-out here.
const PAUSE_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest request line a host reads.
const MAX_REQUEST: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    Console,
    Pause,
    Unpause,
    Stop,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Sends `request` to the host listening at `socket` and returns its answer.
pub async fn call(socket: &Path, request: Request) -> Result<Answer, Failure> {
    let limit = match request {
        Request::Pause | Request::Unpause => PAUSE_ANSWER_TIMEOUT,
        _ => ANSWER_TIMEOUT,
    };
    call_within(socket, request, limit).await
}

/// [`call`] with its own time limit.
pub async fn call_within(
    socket: &Path,
    request: Request,
    limit: Duration,
) -> Result<Answer, Failure> {
    let exchange = async {
        let stream = UnixStream::connect(socket).await?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(&request)?;
        line.push(b'\n');
        write.write_all(&line).await?;
        let mut answer = String::new();
        BufReader::new(read).read_line(&mut answer).await?;
        if answer.is_empty() {
            return Err(Failure::new("the VM host closed the control connection"));
        }
        Ok(serde_json::from_str::<Answer>(&answer)?)
    };
    let answer = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| Failure::new("the VM host did not answer in time"))??;
    match answer.ok {
        true => Ok(answer),
        false => Err(Failure::new(
            answer.error.unwrap_or_else(|| "the VM host refused".into()),
        )),
    }
}

/// Reads one request from a client; `None` for a malformed or missing one (answered here).
pub async fn read_request(stream: &mut UnixStream) -> Option<Request> {
    let (read, _) = stream.split();
    let mut line = String::new();
    let read = tokio::io::AsyncReadExt::take(read, MAX_REQUEST);
    let got = tokio::time::timeout(ANSWER_TIMEOUT, BufReader::new(read).read_line(&mut line)).await;
    match got {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str(&line) {
            Ok(request) => Some(request),
            Err(e) => {
                let _ = answer(stream, Answer::error(format!("bad request: {e}"))).await;
                None
            }
        },
        _ => None,
    }
}

/// Writes `answer` as one line.
pub async fn answer(stream: &mut UnixStream, answer: Answer) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

impl Answer {
    pub fn ok() -> Self {
        Answer {
            ok: true,
            ..Answer::default()
        }
    }

    pub fn text(text: String) -> Self {
        Answer {
            ok: true,
            text: Some(text),
            ..Answer::default()
        }
    }

    pub fn error(message: String) -> Self {
        Answer {
            ok: false,
            error: Some(message),
            ..Answer::default()
        }
    }
}

/// Binds the control socket (private to the user).
pub fn bind(path: &Path) -> Result<UnixListener, Failure> {
    let listener = UnixListener::bind(path)
        .map_err(|e| Failure::from(e).context(format!("cannot bind {}", path.display())))?;
    crate::registry::make_private(path)?;
    Ok(listener)
}
