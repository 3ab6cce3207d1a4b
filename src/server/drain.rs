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

/// SIGTERM and SIGINT, listened to from the first poll on, so a second signal is
/// never missed while the first is handled.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Signals {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        if s.recv().await.is_none() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = recv(&mut self.term) => {}
                () = recv(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Starts the thread that handles SIGTERM and SIGINT for the life of the process
/// (the serving runtimes may end before the drain does). The returned future
/// resolves when the listener should close: after the first signal and
/// `delay`. Then, after `timeout`, whatever still runs is ended
/// ([`Drain::stop_now`]); a second signal exits at once with code 1.
pub fn on_signal(
    drain: Arc<Drain>,
    delay: Duration,
    timeout: Duration,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (close, mut closed) = watch::channel(false);
    // Listening from now on: a signal sent before the servers poll is not lost.
    let mut signals = rt.block_on(async { Signals::new() });
    std::thread::Builder::new()
        .name("cascade-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                signals.next().await;
                drain.begin();
                tracing::info!(
                    drain_delay_ms = delay.as_millis() as u64,
                    drain_timeout_ms = timeout.as_millis() as u64,
                    "shutting down: /readyz answers 503; draining"
                );
                let drained = async {
                    tokio::time::sleep(delay).await;
                    close.send_replace(true);
                    tokio::time::sleep(timeout).await;
                    if !drain.is_stopped() {
                        tracing::warn!("drain timeout passed: ending the requests still in flight");
                        drain.stop_now();
                    }
                    std::future::pending::<()>().await;
                };
                tokio::select! {
                    () = drained => {}
                    () = signals.next() => {
                        eprintln!("cascade: second signal, exiting now");
                        std::process::exit(1);
                    }
                }
            })
        })?;
    Ok(async move {
        let _ = closed.wait_for(|c| *c).await;
    })
}
