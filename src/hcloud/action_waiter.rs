//! Action waits batched across callers: every [`super::HcloudApi::wait_for_actions`] of one
//! client registers here, and one poll round asks about the running actions of every caller
//! that is due: those that touch a server at `GET /servers/actions?id=…`, 50 IDs per page,
//! the others at `GET /actions?id=…`, 25 IDs per request (that answer has no pagination, and
//! 25 is its default page size). An ID `/servers/actions` leaves out is asked at `/actions` in
//! the same round, and only there afterwards, so a wrong guess costs one request, not the wait.
//!
//! No background task: the first due caller of a round drives it (the leader) and the others
//! wait for the round to end ([`Notify`]). Pacing per caller is the single-caller one (first
//! poll `initial` after the wait began, then intervals growing by `factor` up to `max`), with
//! one addition that makes batching happen: a round starts at most once per `initial`, so the
//! callers that fall due in between are served together by the next round (a caller is then
//! answered up to `initial` later than alone, never earlier) — unless the due callers'
//! running actions already fill a request: then a round starts at once and polls as many whole
//! requests' worth of them as there are, oldest callers first. Under load every
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
use super::types::{Action, ActionRef, ActionStatus};

/// IDs per `GET /actions` request, as hcloud-go does.
pub(super) const ACTION_IDS_PER_REQUEST: usize = 25;
/// IDs per `GET /servers/actions` request: one page of the most the API pages (50).
pub(super) const SERVER_ACTION_IDS_PER_REQUEST: usize = 50;

/// A request's worth of IDs, in units where an ID asked at `/servers/actions` weighs 1 and
/// one asked at `/actions` weighs 2.
const REQUEST_UNITS: usize = SERVER_ACTION_IDS_PER_REQUEST;

/// Where a round asks about an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// `GET /actions?id=…`
    Actions,
    /// `GET /servers/actions?id=…&per_page=50`
    ServerActions,
}

fn units(on_server: bool) -> usize {
    if on_server {
        REQUEST_UNITS / SERVER_ACTION_IDS_PER_REQUEST
    } else {
        REQUEST_UNITS / ACTION_IDS_PER_REQUEST
    }
}

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
    /// The IDs to ask at `/servers/actions` (until it leaves one out).
    on_server: HashSet<i64>,
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

    fn pending_units(&self) -> usize {
        self.pending
            .iter()
            .map(|id| units(self.on_server.contains(id)))
            .sum()
    }
}

/// What a caller does next.
enum Step {
    Done(Result<Vec<Action>, Error>),
    /// Poll these IDs for the round just started.
    Lead(RoundIds),
    /// Until the round ends, or until the instant (if any).
    Wait(Option<Instant>),
}

/// The IDs one round asks about, by endpoint.
#[derive(Default)]
struct RoundIds {
    server: Vec<i64>,
    other: Vec<i64>,
}

/// What one round learnt.
struct RoundResult {
    /// Every ID of the requests that were answered.
    asked: HashSet<i64>,
    answers: HashMap<i64, Action>,
    /// IDs `/servers/actions` left out (then asked at `/actions`).
    off_server: HashSet<i64>,
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

    /// Waits until every action in `actions` finished, polling through `fetch` (one call per
    /// request of at most [`ACTION_IDS_PER_REQUEST`] or [`SERVER_ACTION_IDS_PER_REQUEST`]
    /// IDs, by endpoint).
    pub(super) async fn wait<F, Fut>(
        &self,
        actions: &[ActionRef],
        timeout: Duration,
        fetch: F,
    ) -> Result<Vec<Action>, Error>
    where
        F: Fn(Endpoint, Vec<i64>) -> Fut,
        Fut: Future<Output = Result<Vec<Action>, Error>>,
    {
        let mut order: Vec<i64> = Vec::with_capacity(actions.len());
        let mut on_server = HashSet::new();
        for action in actions {
            if !order.contains(&action.id) {
                order.push(action.id);
            }
            if action.on_server {
                on_server.insert(action.id);
            }
        }
        if order.is_empty() {
            return Ok(Vec::new());
        }
        let mut registration = self.register(order, on_server, timeout);
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

    fn register(
        &self,
        order: Vec<i64>,
        on_server: HashSet<i64>,
        timeout: Duration,
    ) -> Registration<'_> {
        let now = Instant::now();
        let mut state = self.lock();
        let key = state.next_key;
        state.next_key += 1;
        state.callers.insert(
            key,
            Caller {
                pending: order.clone(),
                order,
                on_server,
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
                let due_units: usize = state
                    .callers
                    .values()
                    .filter(|c| c.outcome.is_none() && !c.in_round && c.due() <= now)
                    .map(Caller::pending_units)
                    .sum();
                if due_units >= REQUEST_UNITS {
                    let whole = due_units - due_units % REQUEST_UNITS;
                    return Step::Lead(Self::start_round(&mut state, now, Some(whole)));
                }
                Step::Wait(Some(gap_end.min(deadline)))
            }
            _ => Step::Lead(Self::start_round(&mut state, now, None)),
        }
    }

    /// Marks the due callers as part of a new round, oldest first; returns the IDs to poll.
    /// With a `limit` (in request units), only whole callers that keep the IDs within it (but
    /// at least one).
    fn start_round(state: &mut State, now: Instant, limit: Option<usize>) -> RoundIds {
        state.in_round = true;
        state.last_round_start = Some(now);
        state.rounds += 1;
        let mut ids = RoundIds::default();
        let mut taken = 0;
        let mut seen = HashSet::new();
        for caller in state.callers.values_mut() {
            if caller.outcome.is_some() || caller.in_round || caller.due() > now {
                continue;
            }
            if let Some(limit) = limit {
                let new: usize = caller
                    .pending
                    .iter()
                    .filter(|id| !seen.contains(*id))
                    .map(|id| units(caller.on_server.contains(id)))
                    .sum();
                if taken > 0 && taken + new > limit {
                    continue;
                }
            }
            caller.in_round = true;
            for id in &caller.pending {
                if seen.insert(*id) {
                    let on_server = caller.on_server.contains(id);
                    taken += units(on_server);
                    if on_server {
                        ids.server.push(*id);
                    } else {
                        ids.other.push(*id);
                    }
                }
            }
        }
        ids
    }

    async fn poll_round<F, Fut>(&self, ids: &RoundIds, fetch: &F) -> RoundResult
    where
        F: Fn(Endpoint, Vec<i64>) -> Fut,
        Fut: Future<Output = Result<Vec<Action>, Error>>,
    {
        let total = ids.server.len() + ids.other.len();
        let mut result = RoundResult {
            asked: HashSet::with_capacity(total),
            answers: HashMap::with_capacity(total),
            off_server: HashSet::new(),
            error: None,
        };
        let mut other = ids.other.clone();
        for chunk in ids.server.chunks(SERVER_ACTION_IDS_PER_REQUEST) {
            match fetch(Endpoint::ServerActions, chunk.to_vec()).await {
                Ok(actions) => {
                    for action in actions {
                        result.answers.insert(action.id, action);
                    }
                    for id in chunk {
                        if result.answers.contains_key(id) {
                            result.asked.insert(*id);
                        } else {
                            result.off_server.insert(*id);
                            other.push(*id);
                        }
                    }
                }
                Err(err) => {
                    result.error = Some(err);
                    break;
                }
            }
        }
        if result.error.is_none() {
            for chunk in other.chunks(ACTION_IDS_PER_REQUEST) {
                match fetch(Endpoint::Actions, chunk.to_vec()).await {
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
        }
        tracing::debug!(
            ids = total,
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
            caller
                .on_server
                .retain(|id| !result.off_server.contains(id));
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

    /// A scripted `GET /actions` and `GET /servers/actions`: each known action runs until its
    /// finish time, then ends in its final status; unknown IDs are left out, as the API does,
    /// and `/servers/actions` also leaves out those in `off_server`.
    struct Fake {
        start: Instant,
        finish: HashMap<i64, (Duration, ActionStatus)>,
        off_server: HashSet<i64>,
        /// (time since start, IDs) of every request.
        calls: Mutex<Vec<(Duration, Vec<i64>)>>,
        endpoints: Mutex<Vec<Endpoint>>,
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
                off_server: HashSet::new(),
                calls: Mutex::new(Vec::new()),
                endpoints: Mutex::new(Vec::new()),
                failing: HashSet::new(),
                hanging: HashSet::new(),
            }
        }

        fn calls(&self) -> Vec<(Duration, Vec<i64>)> {
            self.calls.lock().unwrap().clone()
        }

        fn endpoints(&self) -> Vec<Endpoint> {
            self.endpoints.lock().unwrap().clone()
        }

        async fn fetch(&self, endpoint: Endpoint, ids: Vec<i64>) -> Result<Vec<Action>, Error> {
            let now = self.start.elapsed();
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push((now, ids.clone()));
                self.endpoints.lock().unwrap().push(endpoint);
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
                .filter(|id| endpoint == Endpoint::Actions || !self.off_server.contains(*id))
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

    /// Waits on actions known by ID only (asked at `/actions`).
    async fn wait(
        waiter: &ActionWaiter,
        fake: &Arc<Fake>,
        ids: &[i64],
        timeout: Duration,
    ) -> Result<Vec<Action>, Error> {
        let actions: Vec<ActionRef> = ids.iter().map(|id| ActionRef::from_id(*id)).collect();
        wait_refs(waiter, fake, &actions, timeout).await
    }

    async fn wait_refs(
        waiter: &ActionWaiter,
        fake: &Arc<Fake>,
        actions: &[ActionRef],
        timeout: Duration,
    ) -> Result<Vec<Action>, Error> {
        waiter
            .wait(actions, timeout, |endpoint, chunk| {
                let fake = fake.clone();
                async move { fake.fetch(endpoint, chunk).await }
            })
            .await
    }

    fn on_server(ids: &[i64]) -> Vec<ActionRef> {
        ids.iter()
            .map(|id| ActionRef {
                id: *id,
                on_server: true,
            })
            .collect()
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
    async fn server_actions_are_asked_fifty_to_a_request_and_the_rest_twenty_five() {
        let finish: Vec<(i64, u64, ActionStatus)> =
            (1..=90).map(|id| (id, 0, ActionStatus::Success)).collect();
        let fake = Arc::new(Fake::new(&finish));
        let waiter = ActionWaiter::new(poll());
        // 60 waits on one server action each, 30 on one other action each.
        let waits = (1..=90).map(|id| {
            let (waiter, fake) = (&waiter, &fake);
            async move {
                let action = ActionRef {
                    id,
                    on_server: id <= 60,
                };
                wait_refs(waiter, fake, &[action], Duration::from_secs(10)).await
            }
        });
        let results = futures::future::join_all(waits).await;
        for (id, result) in (1..=90).zip(&results) {
            assert_eq!(ids_of(result), vec![id]);
        }
        let sizes: Vec<(Endpoint, usize)> = fake
            .endpoints()
            .into_iter()
            .zip(fake.calls().iter().map(|(_, ids)| ids.len()))
            .collect();
        assert_eq!(
            sizes,
            vec![
                (Endpoint::ServerActions, 50),
                (Endpoint::ServerActions, 10),
                (Endpoint::Actions, 25),
                (Endpoint::Actions, 5),
            ]
        );
        assert_eq!(waiter.rounds(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_id_servers_actions_leaves_out_is_asked_at_actions_then_only_there() {
        let mut fake = Fake::new(&[
            (1, 150, ActionStatus::Success),
            (2, 0, ActionStatus::Success),
        ]);
        fake.off_server.insert(1);
        let fake = Arc::new(fake);
        let waiter = ActionWaiter::new(poll());
        let result = wait_refs(&waiter, &fake, &on_server(&[1, 2]), Duration::from_secs(10)).await;
        assert_eq!(ids_of(&result), vec![1, 2]);
        // Round 1 (100 ms): both at /servers/actions, which leaves 1 out; 1 at /actions in the
        // same round (still running). Round 2 (300 ms): 1 at /actions only.
        assert_eq!(
            fake.calls(),
            vec![
                (ms(100), vec![1, 2]),
                (ms(100), vec![1]),
                (ms(300), vec![1])
            ]
        );
        assert_eq!(
            fake.endpoints(),
            vec![
                Endpoint::ServerActions,
                Endpoint::Actions,
                Endpoint::Actions
            ]
        );
        // Left out by both: the wait fails naming it, as before.
        let result = wait_refs(&waiter, &fake, &on_server(&[2, 7]), Duration::from_secs(10)).await;
        assert!(
            matches!(&result, Err(Error::InvalidResponse { snippet, .. }) if snippet.contains("[7]")),
            "{result:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fifty_due_server_actions_fill_a_request() {
        let mut finish = vec![(1, 0, ActionStatus::Success)];
        finish.extend((10..60).map(|id| (id, 0, ActionStatus::Success)));
        let fake = Arc::new(Fake::new(&finish));
        let waiter = ActionWaiter::new(poll());
        let late = |ids: Vec<i64>| {
            let (waiter, fake) = (&waiter, &fake);
            async move {
                tokio::time::sleep(ms(20)).await;
                let result =
                    wait_refs(waiter, fake, &on_server(&ids), Duration::from_secs(10)).await;
                assert_eq!(ids_of(&result), ids);
                fake.start.elapsed()
            }
        };
        // At 120 ms 25 waits of 2 server IDs are due (50: a whole request) inside the gap.
        let (lone, answered) = tokio::join!(
            wait(&waiter, &fake, &[1], Duration::from_secs(10)),
            futures::future::join_all((0..25).map(|k| late(vec![10 + 2 * k, 11 + 2 * k]))),
        );
        assert_eq!(ids_of(&lone), vec![1]);
        assert_eq!(answered, vec![ms(120); 25]);
        assert_eq!(fake.calls().len(), 2);
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
