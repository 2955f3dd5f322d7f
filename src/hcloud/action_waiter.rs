//! Action waits batched across callers: every [`super::HcloudApi::wait_for_actions`] of one
//! client registers here, and one poll round asks `GET /actions?id=…` about the running
//! actions of every caller that is due, 25 IDs per request.
//!
//! No background task: the first due caller of a round drives it (the leader) and the others
//! wait for the round to end ([`Notify`]). Pacing per caller is the single-caller one (first
//! poll `initial` after the wait began, then intervals growing by `factor` up to `max`), with
//! one addition that makes batching happen: a round starts at most once per `initial`, so the
//! callers that fall due in between are served together by the next round (a caller is then
//! answered up to `initial` later than alone, never earlier) — unless the due callers'
//! running actions already fill a request (25 IDs): then a round starts at once and polls as
//! many whole requests' worth of them as there are, oldest callers first. Under load every
//! request is full and nobody waits for the gap; when little is going on the process polls no
//! faster than one hcloud CLI waiter.
//!
//! Outcomes stay per caller: an action in `error` fails the callers waiting for it, a deadline
//! fails its own caller, an ID the API leaves out fails the callers that asked for it, and a
//! failed request fails the callers of that round (they retry through their reconcile). A
//! caller whose future is dropped removes its registration; a dropped leader hands the round
//! back, so its followers start another.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::client::ActionPollBackoff;
use super::error::Error;
use super::types::{Action, ActionStatus};

/// IDs per `GET /actions` request, as hcloud-go does.
pub(super) const ACTION_IDS_PER_REQUEST: usize = 25;

/// Deadline of a wait whose timeout does not fit an `Instant`.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The waits of one client (shared by its clones).
pub(super) struct ActionWaiter {
    poll: ActionPollBackoff,
    state: Mutex<State>,
    /// Signalled when a round ends (or its leader is dropped).
    round_over: Notify,
}

#[derive(Default)]
struct State {
    next_key: u64,
    /// Registered waits, by registration order.
    callers: BTreeMap<u64, Caller>,
    /// A round is being polled.
    in_round: bool,
    last_round_start: Option<Instant>,
    rounds: u64,
}

struct Caller {
    /// The IDs asked for, duplicates removed, in the caller's order.
    order: Vec<i64>,
    /// Not yet seen finished, in `order`'s order.
    pending: Vec<i64>,
    finished: HashMap<i64, Action>,
    deadline: Instant,
    /// The sleep before the next poll once the current one is done.
    interval: Duration,
    next_poll: Instant,
    /// Part of the round in flight.
    in_round: bool,
    outcome: Option<Result<Vec<Action>, Error>>,
}

impl Caller {
    fn due(&self) -> Instant {
        self.next_poll.min(self.deadline)
    }
}

/// What a caller does next.
enum Step {
    Done(Result<Vec<Action>, Error>),
    /// Poll these IDs for the round just started.
    Lead(Vec<i64>),
    /// Until the round ends, or until the instant (if any).
    Wait(Option<Instant>),
}

/// What one round learnt.
struct RoundResult {
    /// Every ID of the requests that were answered.
    asked: HashSet<i64>,
    answers: HashMap<i64, Action>,
    /// The request error that ended the round early.
    error: Option<Error>,
}

impl ActionWaiter {
    pub(super) fn new(poll: ActionPollBackoff) -> Self {
        Self {
            poll,
            state: Mutex::new(State::default()),
            round_over: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is applied whole under the lock; a panic elsewhere leaves it usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits currently registered (for tests and diagnostics).
    pub(super) fn pending_waits(&self) -> usize {
        self.lock().callers.len()
    }

    /// Poll rounds run so far.
    pub(super) fn rounds(&self) -> u64 {
        self.lock().rounds
    }

    /// Waits until every action in `ids` finished, polling through `fetch` (one call per
    /// request of at most [`ACTION_IDS_PER_REQUEST`] IDs).
    pub(super) async fn wait<F, Fut>(
        &self,
        ids: &[i64],
        timeout: Duration,
        fetch: F,
    ) -> Result<Vec<Action>, Error>
    where
        F: Fn(Vec<i64>) -> Fut,
        Fut: Future<Output = Result<Vec<Action>, Error>>,
    {
        let mut order: Vec<i64> = Vec::with_capacity(ids.len());
        for id in ids {
            if !order.contains(id) {
                order.push(*id);
            }
        }
        if order.is_empty() {
            return Ok(Vec::new());
        }
        let mut registration = self.register(order, timeout);
        loop {
            // Created before the state is read, so a round ending in between still wakes us.
            let round_over = self.round_over.notified();
            let step = self.decide(registration.key, Instant::now());
            match step {
                Step::Done(outcome) => return outcome,
                Step::Lead(ids) => {
                    registration.leading = true;
                    let result = self.poll_round(&ids, &fetch).await;
                    self.finish_round(result, Instant::now());
                    registration.leading = false;
                }
                Step::Wait(until) => match until {
                    Some(until) => {
                        tokio::select! {
                            _ = round_over => {}
                            _ = tokio::time::sleep_until(until) => {}
                        }
                    }
                    None => round_over.await,
                },
            }
        }
    }

    fn register(&self, order: Vec<i64>, timeout: Duration) -> Registration<'_> {
        let now = Instant::now();
        let mut state = self.lock();
        let key = state.next_key;
        state.next_key += 1;
        state.callers.insert(
            key,
            Caller {
                pending: order.clone(),
                order,
                finished: HashMap::new(),
                deadline: now.checked_add(timeout).unwrap_or_else(|| now + FAR_FUTURE),
                interval: self.poll.initial,
                next_poll: now + self.poll.initial,
                in_round: false,
                outcome: None,
            },
        );
        Registration {
            waiter: self,
            key,
            leading: false,
        }
    }

    fn decide(&self, key: u64, now: Instant) -> Step {
        let mut state = self.lock();
        let gap_end = state
            .last_round_start
            .map(|start| start + self.poll.initial);
        let round_busy = state.in_round;
        let Some(caller) = state.callers.get_mut(&key) else {
            // Only the caller's own guard removes its entry; never reached.
            return Step::Done(Err(Error::Config(
                "action wait lost its registration".into(),
            )));
        };
        if let Some(outcome) = caller.outcome.take() {
            return Step::Done(outcome);
        }
        if caller.in_round {
            return Step::Wait(None);
        }
        if now >= caller.deadline {
            if round_busy {
                return Step::Done(Err(Error::ActionTimeout {
                    ids: caller.pending.clone(),
                }));
            }
            // A last look at the deadline, as a lone waiter takes one.
            return Step::Lead(Self::start_round(&mut state, now, None));
        }
        let deadline = caller.deadline;
        if round_busy {
            return Step::Wait(Some(deadline));
        }
        let due = caller.due();
        if now < due {
            return Step::Wait(Some(due));
        }
        match gap_end {
            Some(gap_end) if now < gap_end => {
                // Too soon after the last round, unless the due waits fill a request.
                let due_ids: usize = state
                    .callers
                    .values()
                    .filter(|c| c.outcome.is_none() && !c.in_round && c.due() <= now)
                    .map(|c| c.pending.len())
                    .sum();
                if due_ids >= ACTION_IDS_PER_REQUEST {
                    let whole = due_ids - due_ids % ACTION_IDS_PER_REQUEST;
                    return Step::Lead(Self::start_round(&mut state, now, Some(whole)));
                }
                Step::Wait(Some(gap_end.min(deadline)))
            }
            _ => Step::Lead(Self::start_round(&mut state, now, None)),
        }
    }

    /// Marks the due callers as part of a new round, oldest first; returns the IDs to poll.
    /// With a `limit`, only whole callers that keep the IDs within it (but at least one).
    fn start_round(state: &mut State, now: Instant, limit: Option<usize>) -> Vec<i64> {
        state.in_round = true;
        state.last_round_start = Some(now);
        state.rounds += 1;
        let mut ids = Vec::new();
        let mut seen = HashSet::new();
        for caller in state.callers.values_mut() {
            if caller.outcome.is_some() || caller.in_round || caller.due() > now {
                continue;
            }
            if let Some(limit) = limit {
                let new = caller
                    .pending
                    .iter()
                    .filter(|id| !seen.contains(*id))
                    .count();
                if !ids.is_empty() && ids.len() + new > limit {
                    continue;
                }
            }
            caller.in_round = true;
            for id in &caller.pending {
                if seen.insert(*id) {
                    ids.push(*id);
                }
            }
        }
        ids
    }

    async fn poll_round<F, Fut>(&self, ids: &[i64], fetch: &F) -> RoundResult
    where
        F: Fn(Vec<i64>) -> Fut,
        Fut: Future<Output = Result<Vec<Action>, Error>>,
    {
        let mut result = RoundResult {
            asked: HashSet::with_capacity(ids.len()),
            answers: HashMap::with_capacity(ids.len()),
            error: None,
        };
        for chunk in ids.chunks(ACTION_IDS_PER_REQUEST) {
            match fetch(chunk.to_vec()).await {
                Ok(actions) => {
                    result.asked.extend(chunk.iter().copied());
                    for action in actions {
                        result.answers.insert(action.id, action);
                    }
                }
                Err(err) => {
                    result.error = Some(err);
                    break;
                }
            }
        }
        tracing::debug!(
            ids = ids.len(),
            answered = result.asked.len(),
            failed = result.error.is_some(),
            "hcloud action poll round"
        );
        result
    }

    /// Hands the round's answers to its callers and ends it.
    fn finish_round(&self, result: RoundResult, now: Instant) {
        let mut state = self.lock();
        for caller in state.callers.values_mut() {
            if !caller.in_round {
                continue;
            }
            caller.in_round = false;
            if let Some(outcome) = self.judge(caller, &result, now) {
                caller.outcome = Some(outcome);
            }
        }
        state.in_round = false;
        drop(state);
        self.round_over.notify_waiters();
    }

    /// The caller's outcome after a round, or `None` (rescheduled) if it must wait on.
    fn judge(
        &self,
        caller: &mut Caller,
        result: &RoundResult,
        now: Instant,
    ) -> Option<Result<Vec<Action>, Error>> {
        let mut missing = Vec::new();
        let mut unanswered = false;
        for id in &caller.pending {
            if !result.asked.contains(id) {
                unanswered = true;
                continue;
            }
            match result.answers.get(id) {
                None => missing.push(*id),
                Some(action) if action.status == ActionStatus::Error => {
                    return Some(Err(action_failed(action)));
                }
                Some(action) if action.status.is_finished() => {
                    caller.finished.insert(*id, action.clone());
                }
                Some(_) => {}
            }
        }
        if !missing.is_empty() {
            return Some(Err(Error::InvalidResponse {
                status: 200,
                snippet: format!("GET /actions did not return actions {missing:?}"),
            }));
        }
        if unanswered && let Some(err) = &result.error {
            return Some(Err(err.clone()));
        }
        let finished = &caller.finished;
        caller.pending.retain(|id| !finished.contains_key(id));
        if caller.pending.is_empty() {
            let mut finished = std::mem::take(&mut caller.finished);
            return Some(Ok(caller
                .order
                .iter()
                .filter_map(|id| finished.remove(id))
                .collect()));
        }
        if now >= caller.deadline {
            return Some(Err(Error::ActionTimeout {
                ids: caller.pending.clone(),
            }));
        }
        let max = self.poll.max;
        caller.interval =
            Duration::try_from_secs_f64(caller.interval.as_secs_f64() * self.poll.factor)
                .unwrap_or(max)
                .min(max);
        caller.next_poll = now + caller.interval;
        None
    }
}

fn action_failed(action: &Action) -> Error {
    use super::error::{MAX_CODE_CHARS, MAX_MESSAGE_CHARS, clean};
    let (code, message) = action
        .error
        .as_ref()
        .map(|error| {
            (
                clean(&error.code, MAX_CODE_CHARS),
                clean(&error.message, MAX_MESSAGE_CHARS),
            )
        })
        .unwrap_or_else(|| ("unknown".into(), "no error details".into()));
    Error::ActionFailed {
        action_id: action.id,
        command: clean(&action.command, MAX_CODE_CHARS),
        code,
        message,
    }
}

/// A caller's entry; dropping it (the wait returned or was cancelled) removes the entry, and
/// a leader dropped mid-round gives the round up so its followers start another.
struct Registration<'a> {
    waiter: &'a ActionWaiter,
    key: u64,
    leading: bool,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut state = self.waiter.lock();
        state.callers.remove(&self.key);
        if !self.leading {
            return;
        }
        for caller in state.callers.values_mut() {
            caller.in_round = false;
        }
        state.in_round = false;
        drop(state);
        self.waiter.round_over.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    //! The waiter against a scripted `fetch`, on tokio's paused clock: times are exact.

    use std::sync::Arc;

    use super::*;
    use crate::hcloud::types::ActionError;

    const INITIAL: Duration = Duration::from_millis(100);

    fn poll() -> ActionPollBackoff {
        ActionPollBackoff {
            initial: INITIAL,
            max: Duration::from_millis(300),
            factor: 2.0,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A scripted `GET /actions`: each known action runs until its finish time, then ends in
    /// its final status; unknown IDs are left out, as the API does.
    struct Fake {
        start: Instant,
        finish: HashMap<i64, (Duration, ActionStatus)>,
        /// (time since start, IDs) of every request.
        calls: Mutex<Vec<(Duration, Vec<i64>)>>,
        /// Requests (0-based) that fail, and that never answer.
        failing: HashSet<usize>,
        hanging: HashSet<usize>,
    }

    impl Fake {
        fn new(finish: &[(i64, u64, ActionStatus)]) -> Self {
            Self {
                start: Instant::now(),
                finish: finish
                    .iter()
                    .map(|(id, at, status)| (*id, (ms(*at), *status)))
                    .collect(),
                calls: Mutex::new(Vec::new()),
                failing: HashSet::new(),
                hanging: HashSet::new(),
            }
        }

        fn calls(&self) -> Vec<(Duration, Vec<i64>)> {
            self.calls.lock().unwrap().clone()
        }

        async fn fetch(&self, ids: Vec<i64>) -> Result<Vec<Action>, Error> {
            let now = self.start.elapsed();
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push((now, ids.clone()));
                calls.len() - 1
            };
            if self.hanging.contains(&n) {
                std::future::pending::<()>().await;
            }
            if self.failing.contains(&n) {
                return Err(Error::Api {
                    status: 500,
                    code: crate::hcloud::ErrorCode::parse("server_error"),
                    message: "scripted".into(),
                    details: None,
                    correlation_id: None,
                });
            }
            Ok(ids
                .iter()
                .filter_map(|id| {
                    let (at, status) = self.finish.get(id)?;
                    let status = if now >= *at {
                        *status
                    } else {
                        ActionStatus::Running
                    };
                    Some(action(*id, status))
                })
                .collect())
        }
    }

    fn action(id: i64, status: ActionStatus) -> Action {
        Action {
            id,
            command: "start_server".into(),
            status,
            progress: if status == ActionStatus::Running {
                0
            } else {
                100
            },
            started: chrono::Utc::now(),
            finished: None,
            resources: Vec::new(),
            error: (status == ActionStatus::Error).then(|| ActionError {
                code: "action_failed".into(),
                message: "scripted failure".into(),
            }),
        }
    }

    async fn wait(
        waiter: &ActionWaiter,
        fake: &Arc<Fake>,
        ids: &[i64],
        timeout: Duration,
    ) -> Result<Vec<Action>, Error> {
        waiter
            .wait(ids, timeout, |chunk| {
                let fake = fake.clone();
                async move { fake.fetch(chunk).await }
            })
            .await
    }

    fn ids_of(result: &Result<Vec<Action>, Error>) -> Vec<i64> {
        match result {
            Ok(actions) => actions.iter().map(|a| a.id).collect(),
            Err(err) => panic!("{err}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn callers_waiting_together_share_requests() {
        let finish: Vec<(i64, u64, ActionStatus)> =
            (1..=30).map(|id| (id, 0, ActionStatus::Success)).collect();
        let fake = Arc::new(Fake::new(&finish));
        let waiter = ActionWaiter::new(poll());
        let waits = (1..=30).map(|id| {
            let (waiter, fake) = (&waiter, &fake);
            async move { wait(waiter, fake, &[id], Duration::from_secs(10)).await }
        });
        let results = futures::future::join_all(waits).await;
        for (id, result) in (1..=30).zip(&results) {
            assert_eq!(ids_of(result), vec![id]);
        }
        let calls = fake.calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0].1.len(), 25);
        assert_eq!(calls[1].1.len(), 5);
        assert!(calls.iter().all(|(at, _)| *at == INITIAL), "{calls:?}");
        assert_eq!(waiter.rounds(), 1);
        assert_eq!(waiter.pending_waits(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_caller_keeps_its_pacing_and_gets_its_order_back() {
        let fake = Arc::new(Fake::new(&[
            (7, 1000, ActionStatus::Success),
            (3, 0, ActionStatus::Success),
        ]));
        let waiter = ActionWaiter::new(poll());
        let result = wait(&waiter, &fake, &[7, 3, 7], Duration::from_secs(10)).await;
        assert_eq!(ids_of(&result), vec![7, 3]);
        let times: Vec<Duration> = fake.calls().iter().map(|(at, _)| *at).collect();
        // 100 ms, then intervals 200, 300 (the cap), 300, 300.
        assert_eq!(times, vec![ms(100), ms(300), ms(600), ms(900), ms(1200)]);
        // Finished actions are not asked about again.
        assert_eq!(fake.calls()[0].1, vec![7, 3]);
        assert_eq!(fake.calls()[1].1, vec![7]);
        assert!(wait(&waiter, &fake, &[], INITIAL).await.unwrap().is_empty());
        assert_eq!(fake.calls().len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn rounds_start_at_most_once_per_initial_and_never_poll_early() {
        let fake = Arc::new(Fake::new(&[
            (1, 0, ActionStatus::Success),
            (2, 0, ActionStatus::Success),
            (3, 0, ActionStatus::Success),
        ]));
        let waiter = ActionWaiter::new(poll());
        let later = |delay: u64, id: i64| {
            let (waiter, fake) = (&waiter, &fake);
            async move {
                tokio::time::sleep(ms(delay)).await;
                let result = wait(waiter, fake, &[id], Duration::from_secs(10)).await;
                (ids_of(&result), fake.start.elapsed())
            }
        };
        let (a, b, c) = tokio::join!(later(0, 1), later(10, 2), later(20, 3));
        // A alone at 100 ms (B is due at 110); B and C together once the gap has passed.
        assert_eq!(a, (vec![1], ms(100)));
        assert_eq!(b, (vec![2], ms(200)));
        assert_eq!(c, (vec![3], ms(200)));
        assert_eq!(
            fake.calls(),
            vec![(ms(100), vec![1]), (ms(200), vec![2, 3])]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn due_waits_that_fill_a_request_do_not_wait_for_the_gap() {
        let mut finish = vec![(1, 0, ActionStatus::Success)];
        finish.extend((10..37).map(|id| (id, 0, ActionStatus::Success)));
        let fake = Arc::new(Fake::new(&finish));
        let waiter = ActionWaiter::new(poll());
        let three = |k: i64| {
            let (waiter, fake) = (&waiter, &fake);
            async move {
                tokio::time::sleep(ms(20)).await;
                let ids = [10 + 3 * k, 11 + 3 * k, 12 + 3 * k];
                let result = wait(waiter, fake, &ids, Duration::from_secs(10)).await;
                assert_eq!(ids_of(&result), ids);
                fake.start.elapsed()
            }
        };
        let (lone, answered) = tokio::join!(
            wait(&waiter, &fake, &[1], Duration::from_secs(10)),
            futures::future::join_all((0..9).map(three)),
        );
        assert_eq!(ids_of(&lone), vec![1]);
        // The lone wait at 100 ms; at 120 ms nine waits of 3 IDs are due, 27 IDs: a round
        // starts at once, before the gap ends, with the eight oldest (24 IDs, one request);
        // the ninth waits for the gap after that round.
        assert_eq!(answered[..8], [ms(120); 8]);
        assert_eq!(answered[8], ms(220));
        assert_eq!(
            fake.calls(),
            vec![
                (ms(100), vec![1]),
                (ms(120), (10..34).collect()),
                (ms(220), vec![34, 35, 36]),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_reach_only_the_callers_they_concern() {
        let fake = Arc::new(Fake::new(&[
            (1, 0, ActionStatus::Success),
            (2, 0, ActionStatus::Error),
            (3, 60_000, ActionStatus::Success),
            (4, 150, ActionStatus::Success),
        ]));
        let waiter = ActionWaiter::new(poll());
        let long = Duration::from_secs(10);
        let (ok, failed, missing, timed_out, shared) = tokio::join!(
            wait(&waiter, &fake, &[1], long),
            wait(&waiter, &fake, &[1, 2], long),
            wait(&waiter, &fake, &[99, 1], long),
            wait(&waiter, &fake, &[3, 1], ms(250)),
            wait(&waiter, &fake, &[4, 1], long),
        );
        assert_eq!(ids_of(&ok), vec![1]);
        assert!(
            matches!(&failed, Err(Error::ActionFailed { action_id: 2, code, .. }) if code == "action_failed"),
            "{failed:?}"
        );
        assert!(
            matches!(&missing, Err(Error::InvalidResponse { snippet, .. }) if snippet.contains("[99]")),
            "{missing:?}"
        );
        assert!(
            matches!(&timed_out, Err(Error::ActionTimeout { ids }) if *ids == vec![3]),
            "{timed_out:?}"
        );
        assert_eq!(ids_of(&shared), vec![4, 1]);
        // Every wait was in the first round; the timed-out one took its last look at 250 ms,
        // alone (the other running wait was not due), which pushed the next round to 350 ms.
        let calls = fake.calls();
        assert_eq!(
            calls,
            vec![
                (ms(100), vec![1, 2, 99, 3, 4]),
                (ms(250), vec![3]),
                (ms(350), vec![4]),
            ]
        );
        assert_eq!(waiter.pending_waits(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_request_fails_its_round_not_the_waiter() {
        let mut fake = Fake::new(&[(1, 0, ActionStatus::Success), (2, 0, ActionStatus::Success)]);
        fake.failing.insert(0);
        let fake = Arc::new(fake);
        let waiter = ActionWaiter::new(poll());
        let late = async {
            tokio::time::sleep(ms(150)).await;
            wait(&waiter, &fake, &[2], Duration::from_secs(10)).await
        };
        let (first, second) =
            tokio::join!(wait(&waiter, &fake, &[1], Duration::from_secs(10)), late);
        assert!(
            matches!(&first, Err(Error::Api { status: 500, .. })),
            "{first:?}"
        );
        assert_eq!(ids_of(&second), vec![2]);
        // The failed caller retries with a new wait, which works.
        assert_eq!(
            ids_of(&wait(&waiter, &fake, &[1], Duration::from_secs(10)).await),
            vec![1]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_leader_hands_the_round_over() {
        let mut fake = Fake::new(&[(1, 0, ActionStatus::Success), (2, 0, ActionStatus::Success)]);
        fake.hanging.insert(0);
        let fake = Arc::new(fake);
        let waiter = ActionWaiter::new(poll());
        // A leads the round at 100 ms, whose request never answers; it is cancelled at 150 ms.
        let leader =
            tokio::time::timeout(ms(150), wait(&waiter, &fake, &[1], Duration::from_secs(10)));
        let follower = async {
            tokio::time::sleep(ms(10)).await;
            let result = wait(&waiter, &fake, &[2], Duration::from_secs(10)).await;
            (result, fake.start.elapsed())
        };
        let (leader, (follower, at)) = tokio::join!(leader, follower);
        assert!(leader.is_err(), "the leader was not cancelled");
        assert_eq!(ids_of(&follower), vec![2]);
        assert_eq!(at, ms(200));
        assert_eq!(fake.calls(), vec![(ms(100), vec![1]), (ms(200), vec![2])]);
        assert_eq!(waiter.pending_waits(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_caller_leaves_nothing_behind() {
        let fake = Arc::new(Fake::new(&[
            (1, 60_000, ActionStatus::Success),
            (2, 400, ActionStatus::Success),
        ]));
        let waiter = ActionWaiter::new(poll());
        let cancelled = tokio::time::timeout(
            ms(250),
            wait(&waiter, &fake, &[1], Duration::from_secs(100)),
        );
        let (cancelled, kept) = tokio::join!(
            cancelled,
            wait(&waiter, &fake, &[2], Duration::from_secs(10))
        );
        assert!(cancelled.is_err());
        assert_eq!(ids_of(&kept), vec![2]);
        assert_eq!(waiter.pending_waits(), 0);
        let calls = fake.calls().len();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(fake.calls().len(), calls, "polled after every caller left");
        assert!(
            fake.calls()
                .iter()
                .filter(|(at, _)| *at > ms(250))
                .all(|(_, ids)| ids == &vec![2]),
            "{:?}",
            fake.calls()
        );
    }
}
