//! Shares new connections out evenly over the per-core workers.
//!
//! The workers accept from one socket, and the kernel hands a new connection to
//! whichever of them asks first. In a burst (a client pool opening its connections)
//! the first worker awake takes them all, and one core then serves every request while
//! the other sits idle: a keep-alive connection stays where it was accepted. So a
//! worker holding more open connections than the least loaded one leaves the next
//! connection to it, for up to [`MAX_DEFER`]: long enough for an idle sibling to take
//! it, short enough that a busy one never keeps a client waiting. The open count is
//! also the metric `cascade_worker_connections{worker}`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// How long a worker with more connections than a sibling waits for that sibling to
/// take the next one before it takes it itself.
pub const MAX_DEFER: Duration = Duration::from_millis(5);

/// The open connections of each worker.
pub struct Balance {
    open: Vec<IntGauge>,
    /// A worker's count changed: a deferring worker looks again.
    changed: Notify,
}

impl Balance {
    /// One count per worker, kept in the given gauges.
    pub fn new(open: Vec<IntGauge>) -> Arc<Balance> {
        Arc::new(Balance {
            open,
            changed: Notify::new(),
        })
    }

    /// Worker `i` holds more connections than the least loaded worker.
    fn over(&self, i: usize) -> bool {
        let mine = self.open.get(i).map_or(0, IntGauge::get);
        self.open.iter().any(|g| g.get() < mine)
    }

    /// Waits while worker `i` is over, at most [`MAX_DEFER`].
    async fn turn(&self, i: usize) {
        let deadline = tokio::time::Instant::now() + MAX_DEFER;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a change between the two is not missed.
            changed.as_mut().enable();
            if !self.over(i) {
                return;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    fn opened(&self, i: usize) {
        if let Some(g) = self.open.get(i) {
            g.inc();
        }
        self.changed.notify_waiters();
    }

    fn closed(&self, i: usize) {
        if let Some(g) = self.open.get(i) {
            g.dec();
        }
        self.changed.notify_waiters();
    }
}

/// Worker `worker`'s handle of the shared socket.
pub struct BalancedListener {
    inner: TcpListener,
    balance: Arc<Balance>,
    worker: usize,
}

impl BalancedListener {
    pub fn new(inner: TcpListener, balance: Arc<Balance>, worker: usize) -> Self {
        BalancedListener {
            inner,
            balance,
            worker,
        }
    }
}

impl axum::serve::Listener for BalancedListener {
    type Io = Counted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Counted, std::net::SocketAddr) {
        self.balance.turn(self.worker).await;
        // axum's own accept: connection errors are skipped, others (EMFILE) logged and
        // waited out.
        let (stream, peer) = axum::serve::Listener::accept(&mut self.inner).await;
        let _ = stream.set_nodelay(true);
        self.balance.opened(self.worker);
        let counted = Counted {
            stream,
            balance: self.balance.clone(),
            worker: self.worker,
        };
        (counted, peer)
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
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
            b.turn(i).await;
            t.elapsed()
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_ahead_waits_for_a_change_or_at_most_max_defer() {
        let b = Balance::new(gauges(2));
        // Even: no wait.
        let t = tokio::time::Instant::now();
        b.turn(0).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        // Ahead and nothing changes: it waits MAX_DEFER, then goes on.
        b.opened(0);
        b.turn(0).await;
        assert_eq!(t.elapsed(), MAX_DEFER);
        // Behind: no wait.
        let t = tokio::time::Instant::now();
        b.turn(1).await;
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
