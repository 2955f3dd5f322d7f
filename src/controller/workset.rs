//! Which subscriptions may be reconciled now: at most one reconcile per subscription at a
//! time, and per-subscription exponential backoff with jitter after failures.
//!
//! Entries are keyed by the subscription's resource key (`desired::resource_key`), the one
//! identity that the row, its resources' labels and orphans all share; each entry remembers
//! the id to reconcile it by.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Backoff after the first failure; doubles per failure up to `MAX_BACKOFF`.
const BASE_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Longest delay between looks at a subscription that waits for Hetzner.
const MAX_REQUEUE: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct KeyState {
    /// What to pass to `Reconciler::reconcile`: the subscription id (or the orphan's key).
    id: String,
    in_flight: bool,
    /// Requested, or changed while in flight: look again as soon as it is free.
    rerun: bool,
    /// The row version the reconcile in flight started from.
    claimed_version: Option<i64>,
    failures: u32,
    /// Not before this instant (after a failure or a requested requeue).
    not_before: Option<Instant>,
    /// The row version that failed; a newer version is retried at once.
    failed_version: Option<i64>,
    /// When the last reconcile of this key finished.
    last_done: Option<Instant>,
    /// Requeues in a row without settling: each doubles the requested delay (to 60 s), so a
    /// slow server start costs a few listings, not one every two seconds.
    requeues: u32,
}

impl KeyState {
    /// What this entry adds to [`Keys::failing`] and [`Keys::scheduled`].
    fn counted(&self) -> (usize, usize) {
        (
            usize::from(self.failures > 0),
            usize::from(self.not_before.is_some()),
        )
    }
}

#[derive(Debug, Default)]
pub struct WorkSet {
    keys: Mutex<Keys>,
}

/// The entries, and two counts the control loop reads every tick, kept as entries change so
/// that an idle loop over 10,000 subscriptions does not walk them all twice a second.
#[derive(Debug, Default)]
struct Keys {
    map: HashMap<String, KeyState>,
    /// Entries backing off after a failure.
    failing: usize,
    /// Entries with a time to look again: only they can come due.
    scheduled: usize,
}

impl Keys {
    /// Applies `change` to `key`'s entry (a new one if missing), keeping the counts.
    fn update<R>(&mut self, key: &str, change: impl FnOnce(&mut KeyState) -> R) -> R {
        let state = self.map.entry(key.to_string()).or_default();
        let before = state.counted();
        let out = change(state);
        let after = state.counted();
        self.failing = self.failing + after.0 - before.0;
        self.scheduled = self.scheduled + after.1 - before.1;
        out
    }
}

/// Marks a key in flight until dropped.
pub struct Claim {
    set: Arc<WorkSet>,
    key: String,
    id: String,
    finished: bool,
}

/// How a reconcile ended, as the work set sees it.
pub enum Finish {
    Success,
    /// Converged, but the wish changes by itself after this long (a grace period or a
    /// deletion delay ends): look again then, however long that is.
    Recheck(Duration),
    RetryAfter(Duration),
    Failure {
        version: Option<i64>,
    },
}

impl WorkSet {
    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        // A panic elsewhere never leaves the set half-updated: nothing in an update panics.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims `key` unless it is in flight or waiting. `version` is the row's current desired
    /// version when known: a row changed since its failure skips the backoff. A full resync
    /// passes `resync = true`: it looks at every subscription anyway, so it does not wait out
    /// a requested requeue delay (only a failure backoff).
    ///
    /// `read_at` is when `version` was read, when it comes from a query: a reconcile of the
    /// key that ended after that has already acted on the row as it was then (a change pass
    /// reads every unreconciled row, then claims; reconciles end in between), so the key is
    /// not claimed again on that reading. The next reading decides; a change seen while that
    /// reconcile was in flight (`rerun`) still comes back at once.
    pub fn try_claim(
        self: &Arc<Self>,
        key: &str,
        id: &str,
        version: Option<i64>,
        read_at: Option<Instant>,
        now: Instant,
        resync: bool,
    ) -> Option<Claim> {
        let claimed = self.lock().update(key, |state| {
            state.id = id.to_string();
            if state.in_flight {
                // A row that changed after the reconcile in flight read it comes back as soon
                // as that reconcile ends.
                if version.is_some() && version != state.claimed_version {
                    state.rerun = true;
                }
                return false;
            }
            let read_before_last_end = read_at
                .zip(state.last_done)
                .is_some_and(|(read, done)| done > read);
            if version.is_some() && read_before_last_end && !state.rerun {
                return false;
            }
            let changed_since_failure = version.is_some()
                && state.failed_version.is_some()
                && version != state.failed_version;
            let waiting = state.not_before.is_some_and(|t| t > now);
            let failing = state.failures > 0;
            if waiting && (failing || !resync) && !changed_since_failure {
                return false;
            }
            state.in_flight = true;
            state.rerun = false;
            state.claimed_version = version;
            true
        });
        claimed.then(|| Claim {
            set: Arc::clone(self),
            key: key.to_string(),
            id: id.to_string(),
            finished: false,
        })
    }

    /// Asks for `key` to be looked at in the next change pass and until one reconcile of it
    /// ran (e.g. its row was deleted: the notice is consumed, this keeps it). A failure
    /// backoff still applies.
    pub fn request(&self, key: &str, id: &str, now: Instant) {
        self.lock().update(key, |state| {
            state.id = id.to_string();
            state.rerun = true;
            if !state.in_flight && state.failures == 0 {
                state.not_before = Some(now);
            }
        });
    }

    /// Asks for `key` to be looked at again at `at` (a grace period or a deletion delay ends
    /// then), unless it is in flight, backing off, or already due sooner.
    pub fn recheck(&self, key: &str, id: &str, at: Instant) {
        self.lock().update(key, |state| {
            state.id = id.to_string();
            if state.in_flight || state.failures > 0 {
                return;
            }
            if state.not_before.is_none_or(|due| due > at) {
                state.not_before = Some(at);
            }
        });
    }

    /// `(key, id)` of the entries whose requeue or backoff delay has passed.
    pub fn due(&self, now: Instant) -> Vec<(String, String)> {
        let keys = self.lock();
        if keys.scheduled == 0 {
            return Vec::new();
        }
        keys.map
            .iter()
            .filter(|(_, s)| !s.in_flight && s.not_before.is_some_and(|t| t <= now))
            .map(|(k, s)| (k.clone(), s.id.clone()))
            .collect()
    }

    /// When `key` last finished a reconcile (to know whether a snapshot is still fresh).
    pub fn last_done(&self, key: &str) -> Option<Instant> {
        self.lock().map.get(key).and_then(|s| s.last_done)
    }

    /// Forgets keys `keep` rejects (deleted subscriptions), except those in flight.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut keys = self.lock();
        let Keys {
            map,
            failing,
            scheduled,
        } = &mut *keys;
        map.retain(|key, state| {
            let kept = state.in_flight || state.rerun || keep(key);
            if !kept {
                let (was_failing, was_scheduled) = state.counted();
                *failing -= was_failing;
                *scheduled -= was_scheduled;
            }
            kept
        });
    }

    pub fn in_backoff(&self) -> usize {
        self.lock().failing
    }

    fn finish(&self, key: &str, finish: Option<Finish>, now: Instant) {
        self.lock()
            .update(key, |state| Self::finish_entry(state, finish, now));
    }

    fn finish_entry(state: &mut KeyState, finish: Option<Finish>, now: Instant) {
        state.in_flight = false;
        state.last_done = Some(now);
        match finish {
            Some(Finish::Success) => {
                *state = KeyState {
                    id: std::mem::take(&mut state.id),
                    rerun: state.rerun,
                    last_done: Some(now),
                    ..KeyState::default()
                };
            }
            Some(Finish::Recheck(delay)) => {
                *state = KeyState {
                    id: std::mem::take(&mut state.id),
                    rerun: state.rerun,
                    last_done: Some(now),
                    not_before: now.checked_add(delay),
                    ..KeyState::default()
                };
            }
            Some(Finish::RetryAfter(delay)) => {
                state.failures = 0;
                state.failed_version = None;
                let grown = delay.saturating_mul(1 << state.requeues.min(5));
                state.not_before = Some(now + grown.min(MAX_REQUEUE));
                state.requeues = state.requeues.saturating_add(1);
            }
            Some(Finish::Failure { version }) => {
                state.failures = state.failures.saturating_add(1);
                state.requeues = 0;
                // A retry that did not know the version keeps the one that failed.
                state.failed_version = version.or(state.failed_version);
                state.not_before = Some(now + backoff(state.failures));
            }
            // Dropped without a verdict (cancelled, panicked): a failure like any other, so
            // a reconcile that panics every time backs off instead of looping.
            None => {
                state.failures = state.failures.saturating_add(1);
                state.requeues = 0;
                state.not_before = Some(now + backoff(state.failures));
            }
        }
        if state.rerun && state.failures == 0 {
            state.not_before = Some(now);
        }
    }
}

impl Claim {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The id to reconcile.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// When the previous reconcile of this key finished.
    pub fn last_done(&self) -> Option<Instant> {
        self.set.last_done(&self.key)
    }

    pub fn finish(mut self, finish: Finish) {
        self.finished = true;
        self.set.finish(&self.key, Some(finish), Instant::now());
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.finished {
            self.set.finish(&self.key, None, Instant::now());
        }
    }
}

/// Exponential backoff with jitter: uniformly in [d/2, d], d = min(MAX, BASE * 2^(n-1)).
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let full = BASE_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF);
    let half = full / 2;
    half + full.mul_f64(rand::random::<f64>()) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ends `claim` as `Claim::finish` does, but at `at` instead of now.
    fn finish_at(mut claim: Claim, finish: Finish, at: Instant) {
        claim.finished = true;
        let (set, key) = (Arc::clone(&claim.set), claim.key.clone());
        drop(claim);
        set.finish(&key, Some(finish), at);
    }

    /// The counts the loop reads (`in_backoff`, whether anything can be `due`) follow every
    /// kind of change, against a count of the entries themselves.
    #[test]
    fn the_kept_counts_match_the_entries_after_every_change() {
        fn check(set: &WorkSet, step: &str) {
            let keys = set.lock();
            let failing = keys.map.values().filter(|s| s.failures > 0).count();
            let scheduled = keys.map.values().filter(|s| s.not_before.is_some()).count();
            assert_eq!(
                (keys.failing, keys.scheduled),
                (failing, scheduled),
                "after {step}"
            );
        }
        let set = Arc::new(WorkSet::default());
        let now = Instant::now();
        let keys = ["a", "b", "c", "d", "e"];
        for round in 0..4u32 {
            for (i, key) in keys.iter().enumerate() {
                let Some(claim) = set.try_claim(key, key, Some(1), None, now, true) else {
                    check(&set, &format!("a refused claim of {key}"));
                    continue;
                };
                check(&set, &format!("claiming {key}"));
                match (i + round as usize) % 5 {
                    0 => claim.finish(Finish::Success),
                    1 => claim.finish(Finish::Failure { version: Some(1) }),
                    2 => claim.finish(Finish::RetryAfter(Duration::from_secs(1))),
                    3 => claim.finish(Finish::Recheck(Duration::from_secs(60))),
                    _ => drop(claim),
                }
                check(&set, &format!("finishing {key} in round {round}"));
            }
            set.request("a", "a", now);
            check(&set, "a request");
            set.recheck("b", "b", now + Duration::from_secs(5));
            check(&set, "a recheck");
            // Claimed at a later time, so backoffs and requeues have passed.
            let later = now + Duration::from_secs(3600);
            if let Some(claim) = set.try_claim("c", "c", Some(2), None, later, false) {
                claim.finish(Finish::Success);
            }
            check(&set, "a success after a failure");
            set.retain(|key| key != "d" && key != "e");
            check(&set, "forgetting d and e");
        }
        assert!(set.in_backoff() <= keys.len());
        // Only a key asked for again ("a") outlives forgetting everything.
        set.retain(|_| false);
        check(&set, "forgetting all");
        assert_eq!(set.lock().map.keys().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn a_recheck_comes_due_after_its_delay_however_long() {
        let set = Arc::new(WorkSet::default());
        let now = Instant::now();
        let claim = set.try_claim("a", "a", Some(1), None, now, false).unwrap();
        claim.finish(Finish::Recheck(Duration::from_secs(3 * 3600)));
        assert!(set.due(now + Duration::from_secs(3600)).is_empty());
        assert_eq!(set.due(now + Duration::from_secs(3 * 3600 + 60)).len(), 1);
        assert_eq!(set.in_backoff(), 0, "a recheck is no failure");
    }

    #[test]
    fn a_recheck_found_by_a_resync_keeps_the_earliest_due_time() {
        let set = Arc::new(WorkSet::default());
        let now = Instant::now();
        set.recheck("a", "a", now + Duration::from_secs(600));
        set.recheck("a", "a", now + Duration::from_secs(900));
        assert!(set.due(now + Duration::from_secs(599)).is_empty());
        assert_eq!(set.due(now + Duration::from_secs(600)).len(), 1);
        set.recheck("a", "a", now + Duration::from_secs(60));
        assert_eq!(
            set.due(now + Duration::from_secs(60)).len(),
            1,
            "sooner wins"
        );
        // In flight: the reconcile's own verdict decides.
        let claim = set
            .try_claim("b", "b", None, None, now, true)
            .expect("free");
        set.recheck("b", "b", now);
        assert_eq!(
            set.due(now + Duration::from_secs(60)),
            vec![("a".to_string(), "a".to_string())],
            "b is in flight: not asked for again"
        );
        drop(claim);
    }

    #[test]
    fn one_claim_per_key_at_a_time() {
        let set = Arc::new(WorkSet::default());
        let now = Instant::now();
        let claim = set
            .try_claim("a", "a", None, None, now, false)
            .expect("free key");
        assert!(
            set.try_claim("a", "a", None, None, now, false).is_none(),
            "second claim refused"
        );
        assert!(
            set.try_claim("b", "b", None, None, now, false).is_some(),
            "other keys unaffected"
        );
        claim.finish(Finish::Success);
        assert!(set.try_claim("a", "a", None, None, now, false).is_some());
    }

    #[test]
    fn failures_back_off_until_the_row_changes() {
        let set = Arc::new(WorkSet::default());
        let now = Instant::now();
        set.try_claim("a", "a", Some(1), None, now, false)
            .expect("free")
            .finish(Finish::Failure { version: Some(1) });
        assert!(
            set.try_claim("a", "a", Some(1), None, Instant::now(), true)
                .is_none(),
            "same version waits"
        );
        assert!(set.due(Instant::now()).is_empty());
        assert_eq!(
            set.due(Instant::now() + MAX_BACKOFF),
            vec![("a".to_string(), "a".to_string())]
        );
        assert!(
            set.try_claim("a", "a", Some(2), None, Instant::now(), false)
                .is_some(),
            "changed row retried at once"
        );
    }

    #[test]
    fn a_resync_does_not_wait_out_a_requeue_but_a_change_pass_does() {
        let set = Arc::new(WorkSet::default());
        let now = Instant::now();
        set.try_claim("a", "a", None, None, now, false)
            .expect("free")
            .finish(Finish::RetryAfter(Duration::from_secs(60)));
        assert!(
            set.try_claim("a", "a", None, None, Instant::now(), false)
                .is_none()
        );
        assert!(
            set.try_claim("a", "a", None, None, Instant::now(), true)
                .is_some()
        );
    }

    #[test]
    fn requeue_delays_grow_until_settled() {
        let set = Arc::new(WorkSet::default());
        let delay = Duration::from_secs(2);
        let mut now = Instant::now();
        for expected in [2, 4, 8, 16, 32, 60, 60] {
            let claim = set
                .try_claim("a", "a", None, None, now, false)
                .expect("due");
            finish_at(claim, Finish::RetryAfter(delay), now);
            let due_at = now + Duration::from_secs(expected);
            assert!(
                set.due(due_at - Duration::from_millis(1500)).is_empty(),
                "{expected}s"
            );
            assert_eq!(
                set.due(due_at + Duration::from_secs(1)),
                vec![("a".to_string(), "a".to_string())]
            );
            now = due_at + Duration::from_secs(1);
        }
    }

    #[test]
    fn a_request_while_in_flight_comes_back_once_the_claim_ends() {
        let set = Arc::new(WorkSet::default());
        let now = Instant::now();
        let claim = set
            .try_claim("k", "id-1", Some(1), None, now, false)
            .expect("free");
        set.request("k", "id-1", now);
        assert!(set.due(now).is_empty(), "in flight");
        claim.finish(Finish::Success);
        assert_eq!(
            set.due(Instant::now()),
            vec![("k".to_string(), "id-1".to_string())]
        );
        set.retain(|_| false);
        assert_eq!(
            set.due(Instant::now()).len(),
            1,
            "a pending request survives pruning"
        );
        set.try_claim("k", "id-1", None, None, Instant::now(), false)
            .expect("due")
            .finish(Finish::Success);
        assert!(set.due(Instant::now()).is_empty(), "served once");
    }

    #[test]
    fn only_a_row_changed_while_in_flight_skips_the_requeue_delay() {
        let set = Arc::new(WorkSet::default());
        let delay = Duration::from_secs(30);
        let claim = set
            .try_claim("k", "k", Some(1), None, Instant::now(), false)
            .expect("free");
        assert!(
            set.try_claim("k", "k", Some(1), None, Instant::now(), false)
                .is_none()
        );
        claim.finish(Finish::RetryAfter(delay));
        assert!(
            set.due(Instant::now()).is_empty(),
            "same version: the requeue delay holds"
        );

        let claim = set
            .try_claim("k", "k", Some(1), None, Instant::now(), true)
            .expect("resync");
        assert!(
            set.try_claim("k", "k", Some(2), None, Instant::now(), false)
                .is_none()
        );
        claim.finish(Finish::RetryAfter(delay));
        assert_eq!(
            set.due(Instant::now()).len(),
            1,
            "changed meanwhile: at once"
        );
    }

    #[test]
    fn a_reading_older_than_the_last_reconcile_claims_nothing() {
        let set = Arc::new(WorkSet::default());
        // A change pass reads the unreconciled rows; the reconcile in flight ends before the
        // pass gets to claiming.
        let read_at = Instant::now();
        let ended = read_at + Duration::from_millis(1);
        let claim = set
            .try_claim("k", "k", Some(1), None, read_at, false)
            .expect("free");
        finish_at(claim, Finish::Success, ended);
        assert!(
            set.try_claim("k", "k", Some(1), Some(read_at), ended, false)
                .is_none(),
            "the reconcile that ended saw the row as read: no second reconcile on that reading"
        );
        let read_again = ended + Duration::from_millis(1);
        assert!(
            set.try_claim("k", "k", Some(1), Some(read_again), read_again, false)
                .is_some(),
            "a reading after it ended decides"
        );
    }

    #[test]
    fn a_change_seen_in_flight_is_claimed_even_on_an_older_reading() {
        let set = Arc::new(WorkSet::default());
        let read_at = Instant::now();
        let ended = read_at + Duration::from_millis(1);
        let claim = set
            .try_claim("k", "k", Some(1), None, read_at, false)
            .expect("free");
        assert!(
            set.try_claim("k", "k", Some(2), Some(read_at), read_at, false)
                .is_none(),
            "in flight"
        );
        finish_at(claim, Finish::Success, ended);
        assert!(
            set.try_claim("k", "k", Some(2), Some(read_at), ended, false)
                .is_some(),
            "version 2 was read while version 1 was being reconciled"
        );
    }

    #[test]
    fn a_dropped_claim_counts_as_a_failure() {
        let set = Arc::new(WorkSet::default());
        drop(set.try_claim("k", "k", None, None, Instant::now(), false));
        assert_eq!(set.in_backoff(), 1);
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for n in 1..40 {
            let d = backoff(n);
            let full = BASE_BACKOFF
                .saturating_mul(1 << (n - 1).min(16))
                .min(MAX_BACKOFF);
            assert!(
                d >= full / 2 && d <= full,
                "failure {n}: {d:?} outside [{:?}, {full:?}]",
                full / 2
            );
        }
        assert!(backoff(30) <= MAX_BACKOFF);
    }

    #[test]
    fn success_resets_backoff() {
        let set = Arc::new(WorkSet::default());
        let now = Instant::now();
        set.try_claim("a", "a", None, None, now, false)
            .expect("free")
            .finish(Finish::Failure { version: None });
        let later = now + MAX_BACKOFF;
        set.try_claim("a", "a", None, None, later, false)
            .expect("due")
            .finish(Finish::Success);
        assert_eq!(set.in_backoff(), 0);
        assert!(set.try_claim("a", "a", None, None, later, false).is_some());
    }
}
