//! Graceful drain on SIGTERM or SIGINT:
//! 1. `/readyz` answers 503 at once, so load balancers stop sending;
//! 2. the listener keeps accepting for `server.drain_delay`, then closes;
//! 3. requests and streams in flight get `server.drain_timeout` to finish; then a
//!    request still waiting is answered 503 `shutting_down` and an open stream ends
//!    with the surface's error event (never a silent close);
//! 4. the caller flushes the store and exits 0. A second signal exits at once with 1.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::api::ApiError;

pub struct Drain {
    draining: AtomicBool,
    stop: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            draining: AtomicBool::new(false),
            stop: watch::channel(false).0,
        }
    }
}

impl Drain {
    /// Shutdown has begun (`/readyz` says 503).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn begin(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The drain timeout passed: whatever is still running ends now.
    pub fn stop_now(&self) {
        self.begin();
        self.stop.send_replace(true);
    }

    pub fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves when [`Drain::stop_now`] is called.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

/// The answer to a request cut by the end of the drain.
pub fn shutting_down() -> ApiError {
    ApiError::new(
        http::StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "the gateway is shutting down; retry on another replica",
    )
    .with_code("shutting_down")
}

/// Waits for `signal`, then runs steps 1 and 2; resolves when the listener should
/// close. Arms step 3 (a timer thread, so it runs whichever runtime ends first) and
/// the second-signal exit.
pub async fn on_signal(
    drain: Arc<Drain>,
    delay: Duration,
    timeout: Duration,
    signal: impl Future<Output = ()>,
    second: impl Future<Output = ()> + Send + 'static,
) {
    signal.await;
    drain.begin();
    tracing::info!(
        drain_delay_ms = delay.as_millis() as u64,
        drain_timeout_ms = timeout.as_millis() as u64,
        "shutting down: /readyz answers 503; draining"
    );
    tokio::spawn(async move {
        second.await;
        eprintln!("cascade: second signal, exiting now");
        std::process::exit(1);
    });
    tokio::time::sleep(delay).await;
    let stopper = drain.clone();
    let _ = std::thread::Builder::new()
        .name("cascade-drain".into())
        .spawn(move || {
            std::thread::sleep(timeout);
            if !stopper.is_stopped() {
                tracing::warn!("drain timeout passed: ending the requests still in flight");
                stopper.stop_now();
            }
        });
}
