//! Shares new connections out evenly over the per-core workers.
//!
//! The workers accept from one socket, and the kernel hands a new connection to
//! whichever of them asks first. In a burst (a client pool opening its connections)
//! the first worker awake takes them all, and one core then serves every request while
//! the other sits idle: a keep-alive connection stays where it was accepted. So when a
//! connection is waiting, a worker holding more open connections than the least
//! loaded one leaves it to that one for up to [`MAX_DEFER`]: long enough for an idle
//! sibling to take it, short enough that a busy one never keeps a client waiting. A
//! sibling that let that time pass (its thread is busy) is not waited for again until
//! some count changes. The open counts are the metric
//! `cascade_worker_connections{worker}`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::IntGauge;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// How long a worker with more connections than a sibling waits for that sibling to
/// take the next one before it takes it itself.
pub const MAX_DEFER: Duration = Duration::from_millis(5);

/// The open connections of each worker.
pub struct Balance {
    open: Vec<IntGauge>,
    /// A worker's count changed: a deferring worker looks again.
    changed: Notify,
    /// Bumped on every change of a count.
    version: AtomicU64,
}

impl Balance {
    /// One count per worker, kept in the given gauges.
    pub fn new(open: Vec<IntGauge>) -> Arc<Balance> {
        Arc::new(Balance {
            open,
            changed: Notify::new(),
            version: AtomicU64::new(0),
        })
    }

    /// Worker `i` holds more connections than the least loaded worker.
    fn over(&self, i: usize) -> bool {
        let mine = self.open.get(i).map_or(0, IntGauge::get);
        self.open.iter().any(|g| g.get() < mine)
    }

    /// Waits while worker `i` is over, at most [`MAX_DEFER`]; true if the time ran
    /// out. `gave_up` is the counts' version when a connection last had to be taken
    /// after such a wait: until the counts change, the worker does not wait again.
    async fn turn(&self, i: usize, gave_up: Option<u64>) -> bool {
        if gave_up == Some(self.version()) {
            return false;
        }
        let deadline = tokio::time::Instant::now() + MAX_DEFER;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change between the two is not missed.
            changed.as_mut().enable();
            if !self.over(i) {
                return false;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => return true,
            }
        }
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn opened(&self, i: usize) {
        if let Some(g) = self.open.get(i) {
            g.inc();
        }
        self.version.fetch_add(1, Ordering::Release);
        self.changed.notify_waiters();
    }

    fn closed(&self, i: usize) {
        if let Some(g) = self.open.get(i) {
            g.dec();
        }
        self.version.fetch_add(1, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// Worker `worker`'s handle of the shared socket.
pub struct BalancedListener {
    /// Watched for readiness directly, so the worker knows a connection is waiting
    /// before it decides whether to take it.
    inner: AsyncFd<std::net::TcpListener>,
    balance: Arc<Balance>,
    worker: usize,
    gave_up: Option<u64>,
}

impl BalancedListener {
    /// `inner` must be non-blocking.
    pub fn new(
        inner: std::net::TcpListener,
        balance: Arc<Balance>,
        worker: usize,
    ) -> io::Result<Self> {
        // SAFETY: the `TcpListener` owns its descriptor, keeps it open and returns the
        // same one until it is dropped, and the `AsyncFd` owns the listener.
        let inner = unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }?;
        Ok(BalancedListener {
            inner,
            balance,
            worker,
            gave_up: None,
        })
    }
}

impl axum::serve::Listener for BalancedListener {
    type Io = Counted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Counted, std::net::SocketAddr) {
        loop {
            let mut ready = match self.inner.readable().await {
                Ok(r) => r,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            };
            // A connection is waiting: a less loaded sibling may take it meanwhile
            // (then this accept finds nothing, and the worker waits again).
            // (Readiness can also be left over from the last accept, with nothing
            // waiting: then the accept below finds nothing.)
            let timed_out = self.balance.turn(self.worker, self.gave_up).await;
            let (stream, peer) = match ready.try_io(|l| l.get_ref().accept()) {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(e)) => {
                    accept_failed(&e).await;
                    continue;
                }
                Err(_would_block) => continue,
            };
            let stream = match stream
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(stream))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register an accepted connection");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            self.balance.opened(self.worker);
            if timed_out {
                // The sibling let a waiting connection be: it is busy.
                self.gave_up = Some(self.balance.version());
            }
            let counted = Counted {
                stream,
                balance: self.balance.clone(),
                worker: self.worker,
            };
            return (counted, peer);
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.get_ref().local_addr()
    }
}

/// As axum's own accept loop: a connection that failed before it was taken is
/// skipped; anything else (out of file descriptors) is logged and waited out.
async fn accept_failed(e: &io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// An accepted connection, counted against its worker until it is dropped.
pub struct Counted {
    stream: TcpStream,
    balance: Arc<Balance>,
    worker: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.balance.closed(self.worker);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges(n: usize) -> Vec<IntGauge> {
        (0..n)
            .map(|i| IntGauge::new(format!("g{i}"), "test").unwrap())
            .collect()
    }

    /// Worker `i`'s wait for its turn, timed, in a task of its own.
    fn timed_turn(b: &Arc<Balance>, i: usize) -> tokio::task::JoinHandle<Duration> {
        let b = b.clone();
        tokio::spawn(async move {
            let t = tokio::time::Instant::now();
            b.turn(i, None).await;
            t.elapsed()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_ahead_waits_for_a_change_or_at_most_max_defer() {
        let b = Balance::new(gauges(2));
        // Even: no wait.
        let t = tokio::time::Instant::now();
        assert!(!b.turn(0, None).await);
        assert_eq!(t.elapsed(), Duration::ZERO);
        // Ahead and nothing changes: it waits MAX_DEFER, then goes on...
        b.opened(0);
        assert!(b.turn(0, None).await);
        assert_eq!(t.elapsed(), MAX_DEFER);
        // ...and, having had to take a connection then, does not wait for that sibling
        // again until a count changes.
        let gave_up = Some(b.version());
        assert!(!b.turn(0, gave_up).await);
        assert_eq!(t.elapsed(), MAX_DEFER);
        b.opened(0);
        b.closed(0);
        assert!(b.turn(0, gave_up).await);
        assert_eq!(t.elapsed(), MAX_DEFER * 2);
        // Behind: no wait.
        let t = tokio::time::Instant::now();
        assert!(!b.turn(1, None).await);
        assert_eq!(t.elapsed(), Duration::ZERO);
        // Ahead, and the sibling catches up 1 ms later: it goes on then.
        let waiter = timed_turn(&b, 0);
        tokio::time::sleep(Duration::from_millis(1)).await;
        b.opened(1);
        assert_eq!(waiter.await.unwrap(), Duration::from_millis(1));
        // Its own connection closing also ends the wait.
        b.opened(0);
        let waiter = timed_turn(&b, 0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        b.closed(0);
        assert_eq!(waiter.await.unwrap(), Duration::from_millis(2));
    }
}
