//! Spawned tasks that are aborted when their handle is dropped, so tearing down an exec (or
//! dropping it halfway through) never leaves a pump or reader running.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::{JoinError, JoinHandle};

/// A task owned by its handle: dropping the handle aborts the task.
///
/// Awaiting it (by `&mut`) gives the task's result; like a `JoinHandle`, it must not be polled
/// again after it has completed.
#[derive(Debug)]
pub struct Task<T>(JoinHandle<T>);

impl<T: Send + 'static> Task<T> {
    /// Spawns `future` on the current runtime.
    pub fn spawn<F>(future: F) -> Task<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        Task(tokio::spawn(future))
    }
}

impl<T> Future for Task<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
