//! Server shutdown as the connection tasks see it.
//!
//! Every open connection must notice a shutdown at once, so its task checks on every
//! wake-up: once or twice per message. A `CancellationToken`'s future takes two mutexes
//! on each of those polls, which `bench/instructions` measured at 0.36k instructions per
//! echo, about 3% of the wasm path. So each connection holds a [`ShutdownListener`]
//! instead: a flag and a waker, registered once per connection, which
//! [`Shutdown::trigger`] sets and wakes. Polling it is an atomic load and a waker check.
//! The server's own long-lived tasks (reload watcher, certificate watcher) keep waiting on
//! the token, which `trigger` cancels too.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

/// The server's shutdown switch.
#[derive(Default)]
pub(crate) struct Shutdown {
    token: CancellationToken,
    listeners: Mutex<Listeners>,
}

#[derive(Default)]
struct Listeners {
    next_id: u64,
    by_id: HashMap<u64, Arc<Flag>>,
}

#[derive(Default)]
struct Flag {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl Shutdown {
    /// Cancelled by [`Shutdown::trigger`], for tasks that are not connections.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Starts the shutdown: every listener, present and future, resolves.
    pub(crate) fn trigger(&self) {
        let listeners = self.lock();
        // Cancelled under the lock, so a listener made now either sees the token
        // cancelled or is in the map below.
        self.token.cancel();
        for flag in listeners.by_id.values() {
            flag.set.store(true, Ordering::Release);
            flag.waker.wake();
        }
    }

    /// A listener for one connection; it unregisters itself when dropped.
    pub(crate) fn listen(self: &Arc<Self>) -> ShutdownListener {
        let mut listeners = self.lock();
        let flag =
            Arc::new(Flag { set: AtomicBool::new(self.token.is_cancelled()), waker: AtomicWaker::new() });
        let id = listeners.next_id;
        listeners.next_id += 1;
        listeners.by_id.insert(id, flag.clone());
        ShutdownListener { shutdown: self.clone(), id, flag }
    }

    fn lock(&self) -> MutexGuard<'_, Listeners> {
        self.listeners.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Resolves once the server shuts down (at once if it already has), and again on every
/// later poll.
pub(crate) struct ShutdownListener {
    shutdown: Arc<Shutdown>,
    id: u64,
    flag: Arc<Flag>,
}

impl Future for ShutdownListener {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.set.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.flag.waker.register(cx.waker());
        // A trigger between the load and the registration woke the old waker, or none:
        // look again.
        if self.flag.set.load(Ordering::Acquire) { Poll::Ready(()) } else { Poll::Pending }
    }
}

impl Drop for ShutdownListener {
    fn drop(&mut self) {
        self.shutdown.lock().by_id.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn listeners_before_and_after_the_trigger_resolve_and_leave_no_trace() {
        let shutdown = Arc::new(Shutdown::default());
        let mut early = shutdown.listen();
        let waiting = tokio::spawn(shutdown.listen());
        tokio::task::yield_now().await;
        assert_eq!((&mut early).now_or_never(), None, "no shutdown yet");
        assert!(!shutdown.token().is_cancelled());

        shutdown.trigger();
        waiting.await.unwrap();
        (&mut early).await;
        (&mut early).await;
        assert!(shutdown.token().is_cancelled());
        shutdown.listen().await;

        drop(early);
        assert!(shutdown.lock().by_id.is_empty(), "every listener unregistered");
    }
}
