//! Readiness, draining and shutdown: the one signal every part watches, so a part needs only
//! this handle (not the whole server state) to stop in time.

use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;

/// Readiness and shutdown signals shared by every task.
#[derive(Debug)]
pub struct Lifecycle {
    ready: AtomicBool,
    draining: AtomicBool,
    shutdown: watch::Sender<bool>,
}

impl Lifecycle {
    /// Not ready, not draining, not shut down: what a part under test starts from.
    pub fn new() -> Lifecycle {
        Lifecycle {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
        }
    }
    /// True once every listener is bound and until draining starts.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining()
    }
    /// True after SIGTERM: refuse new work, let existing work finish.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
    /// Stop taking new work.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }
    /// Every listener is bound: readiness probes may pass.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }
    /// Tell every task to stop now.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
    /// A receiver that flips to `true` on shutdown.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
    /// Whether shutdown was requested.
    pub fn is_shutdown(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// Resolve when `rx` sees shutdown (or its sender is gone).
pub async fn shutdown_signal(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}
