//! Worker threads for `scheduler: per_core`: one single-threaded tokio runtime per
//! thread, like nginx's worker processes.
//!
//! Each worker accepts from the same listening socket and keeps its own upstream
//! connection pool (`providers::HttpClients`), so a request stays on one thread from
//! accept to answer. With tokio's work-stealing runtime, the server connection, the
//! upstream connection's task and the handler wake each other across threads several
//! times per request; on the 2-core bench that cost more than the routing itself.
//! What stays shared (config, breakers, health, cache, metrics) is `Sync` already.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Arc;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// This thread's worker index: 0 outside per-core workers (tests, work-stealing).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Runs `work(i)` for `i` in `0..workers`, each on its own thread with its own
/// current-thread runtime; worker 0 runs on the calling thread. Returns when all have
/// returned, with the first error.
pub fn run<F, Fut>(workers: usize, work: F) -> io::Result<()>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<()>>,
{
    let work = Arc::new(work);
    let mut threads = Vec::with_capacity(workers.saturating_sub(1));
    for i in 1..workers.max(1) {
        let work = work.clone();
        let thread = std::thread::Builder::new()
            .name(format!("cascade-worker-{i}"))
            .spawn(move || run_one(i, &*work))?;
        threads.push(thread);
    }
    let mut result = run_one(0, &*work);
    for t in threads {
        let joined = t
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("a worker thread panicked")));
        result = result.and(joined);
    }
    result
}

fn run_one<F, Fut>(i: usize, work: &F) -> io::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = io::Result<()>>,
{
    INDEX.with(|c| c.set(i));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(work(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn each_worker_runs_on_its_own_thread_with_its_index() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        run(3, move |i| {
            let record = record.clone();
            async move {
                // A runtime is running here: spawned work completes.
                let spawned = tokio::spawn(async { index() })
                    .await
                    .map_err(io::Error::other)?;
                let name = std::thread::current().name().map(str::to_owned);
                if let Ok(mut v) = record.lock() {
                    v.push((i, index(), spawned, name));
                }
                Ok(())
            }
        })
        .unwrap();
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen.len(), 3);
        for (n, (i, idx, spawned, name)) in seen.iter().enumerate() {
            assert_eq!((*i, *idx, *spawned), (n, n, n));
            if n > 0 {
                assert_eq!(
                    name.as_deref(),
                    Some(format!("cascade-worker-{n}").as_str())
                );
            }
        }
    }

    #[test]
    fn the_first_error_comes_back_after_every_worker_ended() {
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = done.clone();
        let r = run(2, move |i| {
            let count = count.clone();
            async move {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i == 1 {
                    Err(io::Error::other("worker 1 failed"))
                } else {
                    Ok(())
                }
            }
        });
        assert_eq!(r.unwrap_err().to_string(), "worker 1 failed");
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
