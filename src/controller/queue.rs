//! The work queue between the passes and the reconciles. A pass claims subscriptions and
//! queues them; at most `concurrency` workers take them off and run them.
//!
//! - Two lanes: a change (a toggle, a deleted row, a requeue that came due) goes before bulk
//!   work (a resync, or a bulk insert observed by one listing), so a toggle never waits
//!   behind thousands of rows.
//! - Entries are plain data, not tasks: 10,000 queued rows cost 10,000 small structs, and at
//!   most `concurrency` tasks exist. A worker is started when an entry finds fewer than
//!   `concurrency` running, and ends when the queue is empty, so an idle controller has none.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

/// Which lane an entry waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Few subscriptions that changed: served first.
    Change,
    /// Many subscriptions at once: served when no change waits.
    Bulk,
}

impl Lane {
    /// The metric label: `change` or `bulk`.
    pub fn label(self) -> &'static str {
        match self {
            Lane::Change => "change",
            Lane::Bulk => "bulk",
        }
    }
}

#[derive(Debug)]
pub struct Queue<T> {
    state: Mutex<State<T>>,
    /// Notified when the last worker ends.
    idle: Notify,
    workers_limit: usize,
}

#[derive(Debug)]
struct State<T> {
    change: VecDeque<T>,
    bulk: VecDeque<T>,
    workers: usize,
}

impl<T> Queue<T> {
    pub fn new(workers_limit: usize) -> Self {
        Queue {
            state: Mutex::new(State {
                change: VecDeque::new(),
                bulk: VecDeque::new(),
                workers: 0,
            }),
            idle: Notify::new(),
            workers_limit: workers_limit.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // Every update is a single push, pop or count: a panic elsewhere leaves it whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `item`. Returns true when the caller must start a worker (one more is allowed);
    /// that worker is already counted.
    #[must_use]
    pub fn push(&self, lane: Lane, item: T) -> bool {
        let mut state = self.lock();
        match lane {
            Lane::Change => state.change.push_back(item),
            Lane::Bulk => state.bulk.push_back(item),
        }
        let start = state.workers < self.workers_limit;
        if start {
            state.workers += 1;
        }
        start
    }

    /// The next entry for a worker, changes first. `None` means the queue is empty and the
    /// worker must end: it is no longer counted.
    pub fn next(&self) -> Option<T> {
        let mut state = self.lock();
        let item = state.change.pop_front().or_else(|| state.bulk.pop_front());
        if item.is_none() {
            state.workers = state.workers.saturating_sub(1);
            if state.workers == 0 {
                self.idle.notify_waiters();
            }
        }
        item
    }

    /// Moves the bulk entries for which `changed` holds to the end of the change lane (a row
    /// toggled while it waited behind a resync). Returns how many moved.
    pub fn promote(&self, changed: impl Fn(&T) -> bool) -> usize {
        let mut state = self.lock();
        let (moved, stay): (VecDeque<T>, VecDeque<T>) = std::mem::take(&mut state.bulk)
            .into_iter()
            .partition(changed);
        state.bulk = stay;
        let count = moved.len();
        state.change.extend(moved);
        count
    }

    /// Entries waiting, per lane: (change, bulk).
    pub fn depth(&self) -> (usize, usize) {
        let state = self.lock();
        (state.change.len(), state.bulk.len())
    }

    /// Waits until no worker runs.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before checking, so a worker ending in between is not missed.
            notified.as_mut().enable();
            if self.lock().workers == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes `items` and returns how many workers the pushes started.
    fn push_all(queue: &Queue<&'static str>, items: &[(Lane, &'static str)]) -> usize {
        items
            .iter()
            .filter(|(lane, item)| queue.push(*lane, item))
            .count()
    }

    fn drain(queue: &Queue<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| queue.next()).collect()
    }

    #[test]
    fn changes_are_served_before_bulk_work_whatever_the_order_of_arrival() {
        use Lane::{Bulk, Change};
        /// Entries pushed in this order, and the order they are served in.
        type Case = (&'static [(Lane, &'static str)], &'static [&'static str]);
        let cases: &[Case] = &[
            (
                &[(Bulk, "r1"), (Bulk, "r2"), (Change, "t")],
                &["t", "r1", "r2"],
            ),
            (
                &[(Change, "a"), (Bulk, "r"), (Change, "b")],
                &["a", "b", "r"],
            ),
            (&[(Bulk, "r1"), (Bulk, "r2")], &["r1", "r2"]),
            (&[(Change, "a"), (Change, "b")], &["a", "b"]),
        ];
        for (pushed, served) in cases {
            let queue = Queue::new(4);
            push_all(&queue, pushed);
            assert_eq!(drain(&queue), *served, "{pushed:?}");
        }
    }

    #[test]
    fn workers_are_started_up_to_the_limit_and_end_when_the_queue_is_empty() {
        let queue = Queue::new(2);
        let started = push_all(
            &queue,
            &[(Lane::Bulk, "a"), (Lane::Bulk, "b"), (Lane::Bulk, "c")],
        );
        assert_eq!(started, 2, "two workers for three entries");
        assert_eq!(drain(&queue), ["a", "b", "c"]);

        let queue = Queue::new(1);
        assert!(queue.push(Lane::Bulk, "a"), "none running: start one");
        assert!(
            !queue.push(Lane::Change, "b"),
            "one running: it takes b too"
        );
        assert_eq!(drain(&queue), ["b", "a"]);
        assert!(
            queue.push(Lane::Change, "c"),
            "the worker ended: start another"
        );
    }

    #[test]
    fn a_toggled_row_waiting_in_bulk_moves_to_the_change_lane() {
        let queue = Queue::new(1);
        let _ = push_all(
            &queue,
            &[
                (Lane::Bulk, "r1"),
                (Lane::Bulk, "toggled"),
                (Lane::Bulk, "r3"),
            ],
        );
        assert_eq!(queue.promote(|item| *item == "toggled"), 1);
        assert_eq!(queue.depth(), (1, 2));
        assert_eq!(drain(&queue), ["toggled", "r1", "r3"]);
    }

    #[tokio::test]
    async fn idle_returns_once_the_last_worker_ended() {
        let queue = std::sync::Arc::new(Queue::new(1));
        assert!(queue.push(Lane::Bulk, "a"));
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a worker is still counted");
        assert_eq!(queue.next(), Some("a"));
        assert_eq!(queue.next(), None);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("idle returned")
            .expect("no panic");
    }
}
