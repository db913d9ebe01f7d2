//! The [`Connector`](crate::Connector) of a VM: each call dials the agent's vsock port, and
//! every stream it hands out fails with the VM's exit once the VM is gone.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use supermachine_codec::AGENT_VSOCK_PORT;
use supermachine_vmm::devices::vsock::{VsockHandle, VsockStream};
use supermachine_vmm::MachineExit;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::connector::{BoxedStream, ConnectFuture, Connector};
use crate::vm::exit::VmExit;

/// Whether the VM still runs, shared by the VM, its connector and every stream.
#[derive(Debug)]
pub(crate) struct Liveness {
    pub(crate) exit: watch::Receiver<Option<MachineExit>>,
    /// Cancelled (by the VM's monitor task) once `exit` holds a value or its sender is gone.
    ended: CancellationToken,
}

impl Liveness {
    pub(crate) fn new(exit: watch::Receiver<Option<MachineExit>>) -> Arc<Self> {
        Arc::new(Liveness {
            exit,
            ended: CancellationToken::new(),
        })
    }

    /// Watches the machine and marks the end. Returns when the machine ends or is dropped.
    pub(crate) async fn monitor(self: Arc<Self>) {
        let mut rx = self.exit.clone();
        // An error means the machine was dropped; its last value (if any) is still readable.
        let _ = rx.wait_for(Option::is_some).await;
        self.ended.cancel();
    }

    /// How the VM ended, if it has.
    pub(crate) fn exit(&self) -> Option<VmExit> {
        self.exit.borrow().clone().map(VmExit::from)
    }

    /// The error a stream or connect returns once the VM is gone.
    fn gone_error(&self) -> io::Error {
        let exit = self.exit().unwrap_or_else(|| VmExit {
            reason: crate::vm::exit::VmExitReason::Stopped,
            console_tail: String::new(),
        });
        io::Error::new(io::ErrorKind::ConnectionAborted, VmGone(exit))
    }

    fn has_ended(&self) -> bool {
        self.ended.is_cancelled() || self.exit.borrow().is_some()
    }
}

/// The inner error of the `io::Error`s streams return after the VM ended; turned into
/// [`Error::VmExited`](crate::Error::VmExited) where the library maps I/O errors.
#[derive(Debug, Clone)]
pub(crate) struct VmGone(pub(crate) VmExit);

impl fmt::Display for VmGone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the VM is gone: {}", self.0.reason)
    }
}

impl std::error::Error for VmGone {}

/// Dials the guest agent over the VM's vsock device.
pub(crate) struct VsockConnector {
    pub(crate) handle: VsockHandle,
    pub(crate) liveness: Arc<Liveness>,
}

impl fmt::Debug for VsockConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VsockConnector")
            .field("guest_cid", &self.handle.guest_cid())
            .finish()
    }
}

impl Connector for VsockConnector {
    fn connect(&self) -> ConnectFuture {
        let handle = self.handle.clone();
        let liveness = self.liveness.clone();
        Box::pin(async move {
            if liveness.has_ended() {
                return Err(liveness.gone_error());
            }
            let ended = liveness.ended.clone();
            let stream = tokio::select! {
                result = handle.connect(AGENT_VSOCK_PORT) => result,
                () = ended.cancelled() => return Err(liveness.gone_error()),
            };
            match stream {
                Ok(inner) => Ok(Box::new(VmStream {
                    gone: Box::pin(liveness.ended.clone().cancelled_owned()),
                    inner,
                    liveness,
                }) as BoxedStream),
                Err(_) if liveness.has_ended() => Err(liveness.gone_error()),
                Err(e) => Err(e),
            }
        })
    }

    fn describe(&self) -> String {
        format!(
            "vsock port {AGENT_VSOCK_PORT} of guest CID {}",
            self.handle.guest_cid()
        )
    }
}

/// A vsock stream that fails with [`VmGone`] as soon as the VM ends, rather than with whatever
/// the device says as it is torn down (or never, if the VM merely stopped).
struct VmStream {
    inner: VsockStream,
    liveness: Arc<Liveness>,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl VmStream {
    /// `Some(error)` once the VM has ended (also registers the waker for that moment).
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        match self.gone.as_mut().poll(cx) {
            Poll::Ready(()) => Some(self.liveness.gone_error()),
            Poll::Pending => None,
        }
    }

    /// Errors from the device while the VM goes down are reported as the VM's end.
    fn translate(&self, error: io::Error) -> io::Error {
        if self.liveness.has_ended() {
            self.liveness.gone_error()
        } else {
            error
        }
    }
}

impl AsyncRead for VmStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before && this.liveness.has_ended() => {
                Poll::Ready(Err(this.liveness.gone_error()))
            }
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.translate(e))),
            Poll::Pending => match this.poll_gone(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for VmStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(e) = this.poll_gone(cx) {
            return Poll::Ready(Err(e));
        }
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.translate(e))),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(e) = this.poll_gone(cx) {
            return Poll::Ready(Err(e));
        }
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.translate(e))),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.translate(e))),
            other => other,
        }
    }
}
