//! Where the request path leaves its rows: one lane per worker thread, each a short
//! `Vec` under its own lock, which the writer empties on its tick.
//!
//! A shared channel makes every row a few atomic operations on counters all the
//! worker cores and the writer share (the channel's tail, the queue-depth gauge), and
//! their cache lines move between cores on each of them. A worker's own lane is locked
//! by that worker alone between the writer's visits, so recording a request's rows is
//! one uncontended lock and a copy. Each lane holds `queue / lanes` rows at most;
//! rows that don't fit are dropped and counted.

use std::sync::Mutex;

use super::Row;

/// One worker's rows; aligned so two lanes never share a cache line.
#[repr(align(128))]
struct Lane(Mutex<Vec<Row>>);

impl Lane {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Row>> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

pub(super) struct Lanes {
    lanes: Box<[Lane]>,
    /// Rows per lane at most.
    bound: usize,
}

impl Lanes {
    /// `count` lanes (at least one) sharing a bound of `queue` rows.
    pub(super) fn new(count: usize, queue: usize) -> Lanes {
        let count = count.max(1);
        Lanes {
            lanes: (0..count).map(|_| Lane(Mutex::new(Vec::new()))).collect(),
            bound: queue.div_ceil(count).max(1),
        }
    }

    /// Adds `rows` to this thread's lane, in order; the number that did not fit.
    pub(super) fn push(&self, rows: impl IntoIterator<Item = Row>) -> u64 {
        let lane = &self.lanes[crate::workers::index() % self.lanes.len()];
        let mut lane = lane.lock();
        let mut dropped = 0;
        for row in rows {
            if lane.len() >= self.bound {
                dropped += 1;
            } else {
                lane.push(row);
            }
        }
        dropped
    }

    /// Moves every lane's rows to the end of `out`. `spare` is an empty `Vec` swapped
    /// in for each lane, so a lane keeps an allocation and its lock is held only for
    /// the swap.
    pub(super) fn take(&self, out: &mut Vec<Row>, spare: &mut Vec<Row>) {
        for lane in self.lanes.iter() {
            std::mem::swap(&mut *lane.lock(), spare);
            out.append(spare);
        }
    }

    /// Rows waiting in the lanes.
    pub(super) fn len(&self) -> usize {
        self.lanes.iter().map(|l| l.lock().len()).sum()
    }
}
