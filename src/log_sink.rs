//! Where log lines go: in-memory buffers, one per worker thread, that one thread
//! writes to standard output every few milliseconds.
//!
//! A writer thread that wakes for each line costs a futex wake, a context switch and
//! a `write` per line, taken from the cores that answer requests. Here a line is one
//! copy into its worker's buffer under a lock only that worker and the flusher take
//! (one shared buffer would move its lock's cache line between the cores on every
//! line); the flusher wakes on its own tick and writes whatever has gathered in one
//! call. Lines of one worker keep their order; lines of different workers are written
//! a tick's worth at a time. When a buffer is full (standard output is slower than
//! the log), lines are dropped and counted, never waited for.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the flusher writes what has gathered.
const TICK: Duration = Duration::from_millis(10);
/// Bytes one worker's buffer holds at most before its lines are dropped.
const LIMIT: usize = 8 * 1024 * 1024;

/// One worker's buffer; aligned so two never share a cache line.
#[repr(align(128))]
struct Lane(Mutex<Vec<u8>>);

impl Lane {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        match self.0.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        }
    }
}

pub struct Sink {
    lanes: Box<[Lane]>,
    dropped: AtomicU64,
    stop: AtomicBool,
}

impl Sink {
    /// Lines dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn push(&self, line: &[u8]) {
        let mut buf = self.lanes[crate::workers::index() % self.lanes.len()].lock();
        if buf.len() + line.len() > LIMIT {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            buf.extend_from_slice(line);
        }
    }

    /// Writes out what has gathered; each buffer is swapped out so its lock is short.
    fn flush_to(&self, out: &mut dyn Write, spare: &mut Vec<u8>) {
        let mut wrote = false;
        for lane in self.lanes.iter() {
            std::mem::swap(&mut *lane.lock(), spare);
            if !spare.is_empty() {
                let _ = out.write_all(spare);
                spare.clear();
                wrote = true;
            }
        }
        if wrote {
            let _ = out.flush();
        }
    }
}

/// Keeps the flusher running; dropping it writes out what is left.
pub struct Flusher {
    sink: Arc<Sink>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long exiting waits for the last lines (standard output may be blocked).
const LAST_FLUSH: Duration = Duration::from_secs(1);

impl Drop for Flusher {
    fn drop(&mut self) {
        self.sink.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let deadline = std::time::Instant::now() + LAST_FLUSH;
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// A sink writing to `out` from its own thread (named `cascade-log`), with a buffer
/// for each of `workers` threads (at least one).
pub fn start(
    mut out: Box<dyn Write + Send>,
    workers: usize,
) -> std::io::Result<(Arc<Sink>, Flusher)> {
    let sink = Arc::new(Sink {
        lanes: (0..workers.max(1))
            .map(|_| Lane(Mutex::new(Vec::with_capacity(64 * 1024))))
            .collect(),
        dropped: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let s = sink.clone();
    let thread = std::thread::Builder::new()
        .name("cascade-log".into())
        .spawn(move || {
            let mut spare = Vec::with_capacity(64 * 1024);
            loop {
                let stopping = s.stop.load(Ordering::Acquire);
                s.flush_to(&mut *out, &mut spare);
                if stopping {
                    return;
                }
                std::thread::sleep(TICK);
            }
        })?;
    Ok((
        sink.clone(),
        Flusher {
            sink,
            thread: Some(thread),
        },
    ))
}

/// One line's writer: the formatter writes a whole line, which goes to the buffer.
/// It borrows the sink (a clone per line would be an atomic increment and decrement on
/// a count every core shares).
pub struct LineWriter<'a>(&'a Sink);

impl Write for LineWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.push(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SinkHandle {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.0)
    }
}

/// What the formatter is given to make a writer per line.
pub struct SinkHandle(pub Arc<Sink>);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_gather_and_are_written_out_and_a_full_buffer_drops_and_counts() {
        let out = Shared::default();
        let (sink, flusher) = start(Box::new(out.clone()), 2).unwrap();
        let mut w = LineWriter(&sink);
        w.write_all(b"one\n").unwrap();
        w.write_all(b"two\n").unwrap();
        let big = vec![b'x'; LIMIT + 1];
        w.write_all(&big).unwrap();
        assert_eq!(sink.dropped(), 1);
        drop(flusher);
        assert_eq!(&*out.0.lock().unwrap(), b"one\ntwo\n");
    }
}
