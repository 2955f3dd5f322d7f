//! The process-wide request budget: a token bucket mirroring Hetzner's rate limit.
//!
//! Hetzner allows `limit` requests per hour per project (default 3600) as a bucket that refills
//! `limit/3600` per second and allows bursts. Every request takes a token here first, so the
//! controller slows itself down instead of collecting 429s. Several [`super::Client`]s using the
//! same token (project) share one `Arc<Budget>`.
//!
//! - Waiting is asynchronous and fair: a caller reserves the next token (the count may go
//!   negative) and sleeps exactly until its reservation is covered; no spinning.
//! - The server's view is followed, without handing a token out twice: a response's
//!   `RateLimit-Remaining` was counted when its request arrived, before the requests still in
//!   flight (already taken here) reached the server. So it lowers the local count at once
//!   (minus reservations still waiting to be sent), but raises it only to what is left after
//!   every token taken here within the last [`IN_FLIGHT_WINDOW`] (the longest a request can
//!   be in flight). Raising it to the header alone, with many requests in flight, sent a burst
//!   of 429s whenever the bucket was nearly empty (seen in the budget benchmark: hundreds per
//!   few thousand requests after the bucket drained).
//! - After a 429 the bucket is emptied and a circuit pauses every caller until
//!   `RateLimit-Reset`, capped at `max_circuit_pause`: Reset is when the bucket is *full* again
//!   (an hour after exhaustion at the default limit), while a few tokens are back within
//!   seconds and the emptied bucket paces callers at the refill rate from then on.
//! - A time scale F (default 1, Hetzner's pace) runs the same model F times faster, for a
//!   simulator started with the same `--budget-time-scale F`: the capacity stays `limit`, the
//!   refill is `limit/3600 × F` per second, and the pause cap is `max_circuit_pause / F`. One
//!   real second is then F seconds of budget (F = 60: an hour of Hetzner's budget per real
//!   minute). Against Hetzner itself anything but 1 means 429s (F > 1) or a wasted budget.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::Error;

/// Hetzner's default limit: requests per hour per project.
pub const DEFAULT_LIMIT_PER_HOUR: u32 = 3600;
/// Default upper bound of the pause after a 429.
pub const DEFAULT_MAX_CIRCUIT_PAUSE: Duration = Duration::from_secs(60);
/// Tokens taken within this long may still be in flight (the client's default per-attempt
/// timeout): a server count raises the local one only by what is left after them.
pub const IN_FLIGHT_WINDOW: Duration = Duration::from_secs(30);
/// Granularity of the record of recently taken tokens (so it stays a few dozen entries).
const RECENT_SLOT: Duration = Duration::from_secs(1);

/// Largest time scale: one hour of budget per real second (the simulator's bound too).
pub const MAX_TIME_SCALE: f64 = 3600.0;

/// A time scale outside `(0, MAX_TIME_SCALE]` (or not a number).
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
#[error(
    "the budget time scale must be a number above 0 and at most 3600 (1 = Hetzner's pace), got {0}"
)]
pub struct InvalidTimeScale(pub f64);

#[derive(Debug)]
pub struct Budget {
    state: Mutex<State>,
    max_circuit_pause: Duration,
    /// How many times faster than Hetzner's the bucket refills (1 = real time).
    time_scale: f64,
}

#[derive(Debug)]
struct State {
    limit: u32,
    /// Copy of `Budget::time_scale`, for the refill.
    time_scale: f64,
    /// Available tokens; negative while callers hold reservations for future tokens.
    tokens: f64,
    refilled_at: Instant,
    paused_until: Option<Instant>,
    /// Callers that reserved a token and are sleeping until it exists.
    waiting: u32,
    /// Tokens used (sent) recently: (start of a `RECENT_SLOT`, count), oldest first.
    recent: VecDeque<(Instant, u32)>,
}

impl State {
    fn refill_per_second(&self) -> f64 {
        f64::from(self.limit) / 3600.0 * self.time_scale
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.refill_per_second()).min(f64::from(self.limit));
        self.refilled_at = now;
    }

    /// Notes one token used now (its request is being sent).
    fn record_use(&mut self, now: Instant) {
        match self.recent.back_mut() {
            Some((start, count)) if now.saturating_duration_since(*start) < RECENT_SLOT => {
                *count += 1
            }
            _ => self.recent.push_back((now, 1)),
        }
        self.forget_old(now);
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some((start, _)) = self.recent.front() {
            if now.saturating_duration_since(*start) > IN_FLIGHT_WINDOW + RECENT_SLOT {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }

    /// Tokens used within about the last `IN_FLIGHT_WINDOW` (a little more, never less).
    fn recently_used(&mut self, now: Instant) -> f64 {
        self.forget_old(now);
        self.recent.iter().map(|(_, count)| f64::from(*count)).sum()
    }

    fn pause_left(&self, now: Instant) -> Duration {
        self.paused_until
            .map(|until| until.saturating_duration_since(now))
            .unwrap_or_default()
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(DEFAULT_LIMIT_PER_HOUR)
    }
}

impl Budget {
    /// A full bucket of `limit_per_hour` tokens (at least 1). The real limit is learned from
    /// the first response's headers.
    pub fn new(limit_per_hour: u32) -> Self {
        let limit = limit_per_hour.max(1);
        Self {
            state: Mutex::new(State {
                limit,
                time_scale: 1.0,
                tokens: f64::from(limit),
                refilled_at: Instant::now(),
                paused_until: None,
                waiting: 0,
                recent: VecDeque::new(),
            }),
            max_circuit_pause: DEFAULT_MAX_CIRCUIT_PAUSE,
            time_scale: 1.0,
        }
    }

    /// Changes the upper bound of the pause after a 429, in budget time: the real pause is
    /// at most `pause / time_scale`.
    pub fn with_max_circuit_pause(mut self, pause: Duration) -> Self {
        self.max_circuit_pause = pause;
        self
    }

    /// Runs the budget `scale` times faster than Hetzner's (see the module docs): only for a
    /// simulator whose bucket runs at the same scale.
    pub fn with_time_scale(mut self, scale: f64) -> Result<Self, InvalidTimeScale> {
        let scale = check_time_scale(scale)?;
        self.time_scale = scale;
        self.state
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .time_scale = scale;
        Ok(self)
    }

    /// How many times faster than Hetzner's the bucket refills.
    pub fn time_scale(&self) -> f64 {
        self.time_scale
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock can't leave the numbers inconsistent in a way that
        // matters more than stopping all API traffic would.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whole tokens available now (0 while reservations are outstanding).
    pub fn remaining(&self) -> u32 {
        let mut state = self.lock();
        state.refill(Instant::now());
        // Truncation is intended: only whole tokens are usable.
        state.tokens.max(0.0).floor() as u32
    }

    /// Requests per hour, as last reported by the API.
    pub fn limit(&self) -> u32 {
        self.lock().limit
    }

    /// True while the circuit opened by a 429 holds every caller back.
    pub fn is_paused(&self) -> bool {
        let state = self.lock();
        !state.pause_left(Instant::now()).is_zero()
    }

    /// Takes one token, sleeping until one is available. Fails with [`Error::RateLimited`]
    /// instead of sleeping longer than `max_wait`.
    pub async fn acquire(&self, max_wait: Duration) -> Result<(), Error> {
        loop {
            let wait = {
                let mut state = self.lock();
                let now = Instant::now();
                state.refill(now);
                let deficit = (1.0 - state.tokens).max(0.0);
                let refill_wait = Duration::try_from_secs_f64(deficit / state.refill_per_second())
                    .unwrap_or(Duration::MAX);
                let wait = refill_wait.max(state.pause_left(now));
                if wait > max_wait {
                    return Err(Error::RateLimited { reset_in: wait });
                }
                state.tokens -= 1.0;
                if wait.is_zero() {
                    state.record_use(now);
                    return Ok(());
                }
                state.waiting += 1;
                wait
            };
            let reservation = Reservation {
                budget: self,
                armed: true,
            };
            tokio::time::sleep(wait).await;
            let paused = reservation.finish_waiting();
            if !paused {
                return Ok(());
            }
            // A 429 opened the circuit while we slept: the token we reserved was given back;
            // queue again behind the pause (or give up if it is too long).
        }
    }

    /// Syncs with the API's `RateLimit-*` headers of any response: the limit is taken as it
    /// is; the remaining count lowers the local one, or raises it by no more than what is left
    /// after the tokens that may still be in flight (see the module docs).
    pub fn observe_headers(&self, limit: Option<u32>, remaining: Option<u32>) {
        let mut state = self.lock();
        let now = Instant::now();
        state.refill(now);
        if let Some(limit) = limit.filter(|limit| *limit > 0) {
            state.limit = limit;
        }
        if let Some(remaining) = remaining {
            let server = f64::from(remaining.min(state.limit)) - f64::from(state.waiting);
            let in_flight = state.recently_used(now);
            state.tokens = if server < state.tokens {
                server
            } else {
                state.tokens.max(server - in_flight)
            };
        }
        state.tokens = state.tokens.min(f64::from(state.limit));
    }

    /// Opens the circuit after a 429: no tokens left, every caller waits until `reset_unix`
    /// (`RateLimit-Reset`, UNIX seconds), at most `max_circuit_pause`.
    pub fn observe_rate_limited(&self, reset_unix: Option<u64>) {
        let mut state = self.lock();
        let now = Instant::now();
        state.refill(now);
        state.tokens = -f64::from(state.waiting);
        let until_reset = reset_unix
            .map(|reset| {
                let now_unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                Duration::from_secs(reset.saturating_sub(now_unix))
            })
            .unwrap_or(self.max_circuit_pause);
        let pause = until_reset.min(self.max_circuit_pause.div_f64(self.time_scale));
        let until = now + pause;
        state.paused_until = Some(match state.paused_until {
            Some(existing) if existing > until => existing,
            _ => until,
        });
    }
}

/// `scale` if it is a usable time scale: above 0, at most [`MAX_TIME_SCALE`].
pub fn check_time_scale(scale: f64) -> Result<f64, InvalidTimeScale> {
    if scale > 0.0 && scale <= MAX_TIME_SCALE {
        Ok(scale)
    } else {
        Err(InvalidTimeScale(scale))
    }
}

/// A reserved token while its holder sleeps. Dropping it early (the caller's future was
/// cancelled) gives the token back.
struct Reservation<'a> {
    budget: &'a Budget,
    armed: bool,
}

impl Reservation<'_> {
    /// Ends the wait; returns true (and gives the token back) if the circuit is open.
    fn finish_waiting(mut self) -> bool {
        self.armed = false;
        let mut state = self.budget.lock();
        state.waiting = state.waiting.saturating_sub(1);
        let now = Instant::now();
        if state.pause_left(now).is_zero() {
            state.record_use(now);
            false
        } else {
            state.tokens += 1.0;
            true
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.budget.lock();
            state.waiting = state.waiting.saturating_sub(1);
            state.tokens += 1.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_allows_a_burst_then_paces_at_the_refill_rate() {
        let budget = Budget::new(3600);
        for _ in 0..3600 {
            budget.acquire(Duration::ZERO).await.unwrap();
        }
        assert_eq!(budget.remaining(), 0);
        let err = budget.acquire(Duration::ZERO).await.unwrap_err();
        assert!(
            matches!(err, Error::RateLimited { reset_in } if reset_in <= Duration::from_secs(1))
        );
        let start = Instant::now();
        budget.acquire(Duration::from_secs(5)).await.unwrap();
        budget.acquire(Duration::from_secs(5)).await.unwrap();
        // 3600/h refills one token per second.
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(1990) && waited <= Duration::from_millis(2100),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_waiters_queue_instead_of_racing() {
        let budget = std::sync::Arc::new(Budget::new(3600));
        budget.observe_headers(Some(3600), Some(0));
        let start = Instant::now();
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let budget = budget.clone();
                tokio::spawn(async move {
                    budget.acquire(Duration::from_secs(60)).await.unwrap();
                    start.elapsed()
                })
            })
            .collect();
        let mut finished = Vec::new();
        for task in tasks {
            finished.push(task.await.unwrap());
        }
        finished.sort();
        // One token per second: the fifth waiter gets its token after ~5 s, not all at once.
        assert!(finished[0] >= Duration::from_millis(990), "{finished:?}");
        assert!(finished[4] >= Duration::from_millis(4990), "{finished:?}");
        assert!(finished[4] <= Duration::from_millis(5100), "{finished:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn headers_override_the_local_count_and_limit() {
        let budget = Budget::new(3600);
        budget.observe_headers(Some(10), Some(3));
        assert_eq!(budget.limit(), 10);
        assert_eq!(budget.remaining(), 3);
        for _ in 0..3 {
            budget.acquire(Duration::ZERO).await.unwrap();
        }
        // 10/h: the next token is 6 minutes away.
        let err = budget.acquire(Duration::from_secs(60)).await.unwrap_err();
        assert!(
            matches!(err, Error::RateLimited { reset_in } if reset_in > Duration::from_secs(300)),
            "{err:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_every_caller_until_reset_capped() {
        let budget = Budget::new(3600).with_max_circuit_pause(Duration::from_secs(30));
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        budget.observe_rate_limited(Some(now_unix + 3600));
        assert!(budget.is_paused());
        assert_eq!(budget.remaining(), 0);
        // Shorter waits than the pause are refused with the time left.
        let err = budget.acquire(Duration::from_secs(10)).await.unwrap_err();
        assert!(
            matches!(err, Error::RateLimited { reset_in } if reset_in >= Duration::from_secs(29)),
            "{err:?}"
        );
        let start = Instant::now();
        budget.acquire(Duration::from_secs(60)).await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(29));
        assert!(!budget.is_paused());
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_while_waiting_extends_the_wait() {
        let budget =
            std::sync::Arc::new(Budget::new(3600).with_max_circuit_pause(Duration::from_secs(20)));
        budget.observe_headers(None, Some(0));
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                budget.acquire(Duration::from_secs(60)).await.unwrap();
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        budget.observe_rate_limited(None);
        let waited = waiter.await.unwrap();
        assert!(waited >= Duration::from_millis(20_400), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_does_not_give_back_the_tokens_of_requests_still_in_flight() {
        let budget = Budget::new(100);
        // Ten requests sent at once; the first answer comes back before the other nine
        // reached the server, which therefore still counts 99.
        for _ in 0..10 {
            budget.acquire(Duration::ZERO).await.unwrap();
        }
        assert_eq!(budget.remaining(), 90);
        budget.observe_headers(Some(100), Some(99));
        assert_eq!(budget.remaining(), 90);
        // Fewer at the server than here (another client of the project): that wins.
        budget.observe_headers(Some(100), Some(50));
        assert_eq!(budget.remaining(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_count_raises_the_local_one_once_nothing_can_be_in_flight() {
        let budget = Budget::new(3600).with_max_circuit_pause(Duration::from_secs(2));
        budget.acquire(Duration::ZERO).await.unwrap();
        // A 429 that was not the bucket's (a proxy, another client): the local count is
        // emptied although the server has plenty.
        budget.observe_rate_limited(None);
        assert_eq!(budget.remaining(), 0);
        budget.acquire(Duration::from_secs(5)).await.unwrap();
        // Two tokens were used within the window: they may still be in flight.
        budget.observe_headers(Some(3600), Some(3500));
        assert_eq!(budget.remaining(), 3498);
        // Long after, nothing is in flight any more: the server's count is the count.
        tokio::time::sleep(IN_FLIGHT_WINDOW + RECENT_SLOT * 2).await;
        budget.observe_headers(Some(3600), Some(3500));
        assert_eq!(budget.remaining(), 3500);
    }

    #[tokio::test(start_paused = true)]
    async fn a_scaled_bucket_keeps_its_capacity_and_refills_faster() {
        // Hetzner's 3600/h, 60 times faster: 60 tokens per real second.
        let budget = Budget::new(3600).with_time_scale(60.0).unwrap();
        assert_eq!(budget.time_scale(), 60.0);
        for _ in 0..3600 {
            budget.acquire(Duration::ZERO).await.unwrap();
        }
        assert!(budget.acquire(Duration::ZERO).await.is_err());
        let start = Instant::now();
        for _ in 0..60 {
            budget.acquire(Duration::from_secs(5)).await.unwrap();
        }
        // Unscaled this would be a minute.
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(990) && waited <= Duration::from_millis(1010),
            "{waited:?}"
        );
        // Half a real minute is half an hour of budget; the capacity caps the refill.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(
            (1799..=1800).contains(&budget.remaining()),
            "{}",
            budget.remaining()
        );
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(budget.remaining(), 3600);
        assert_eq!(budget.limit(), 3600);
    }

    #[tokio::test(start_paused = true)]
    async fn headers_keep_the_time_scale() {
        // The limit comes from the headers; the scale stays: 10/h at 720x is 2 per second.
        let budget = Budget::new(3600).with_time_scale(720.0).unwrap();
        budget.observe_headers(Some(10), Some(0));
        let start = Instant::now();
        budget.acquire(Duration::from_secs(5)).await.unwrap();
        budget.acquire(Duration::from_secs(5)).await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(990) && waited <= Duration::from_millis(1010),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pause_is_capped_in_scaled_time() {
        // Default cap 60 s of budget time: 1 real second at 60x, even when Reset says an hour.
        let budget = Budget::new(3600).with_time_scale(60.0).unwrap();
        let now_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        budget.observe_rate_limited(Some(now_unix + 3600));
        assert!(budget.is_paused());
        let start = Instant::now();
        budget.acquire(Duration::from_secs(5)).await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(990) && waited <= Duration::from_millis(1100),
            "{waited:?}"
        );
    }

    #[test]
    fn unusable_time_scales_are_refused() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 3600.5] {
            let err = Budget::new(3600).with_time_scale(bad).unwrap_err();
            assert!(err.to_string().contains("time scale"), "{err}");
        }
        assert_eq!(check_time_scale(1.0), Ok(1.0));
        assert_eq!(check_time_scale(3600.0), Ok(3600.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_returns_its_reservation() {
        let budget = Budget::new(3600);
        budget.observe_headers(None, Some(0));
        let cancelled = tokio::time::timeout(
            Duration::from_millis(100),
            budget.acquire(Duration::from_secs(5)),
        )
        .await;
        assert!(cancelled.is_err());
        // Without the give-back the next caller would wait ~2 s instead of ~1 s.
        let start = Instant::now();
        budget.acquire(Duration::from_secs(5)).await.unwrap();
        assert!(
            start.elapsed() <= Duration::from_millis(950),
            "{:?}",
            start.elapsed()
        );
    }
}
