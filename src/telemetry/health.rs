//! What the probes answer, computed from state the loop and a database pinger keep up to
//! date: a probe reads it and never waits on the database or Hetzner itself.
//!
//! - **Liveness** (`/healthz`) fails when the loop stopped ticking, or when this replica has
//!   led for three resync intervals without one resync finishing its listing and table scan
//!   (a hung Hetzner endpoint, a pass stuck on something). A follower only needs a ticking
//!   loop.
//! - **Readiness** (`/readyz`) fails when the last database ping failed or is old, and, on
//!   the leader, when every Hetzner answer for a while said the API does not work for us
//!   (no answer, 5xx, a rejected token).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::hcloud::Reachability;

/// A loop that has not ticked for this long (and three resync intervals) is stuck.
const MIN_STALL: Duration = Duration::from_secs(10);
/// Hetzner failing for shorter than this (or the resync interval) is not yet unready: one
/// timeout is not an outage.
const MIN_HETZNER_GRACE: Duration = Duration::from_secs(10);
/// A database ping older than this no longer counts (the pinger runs every 2 s).
const PING_VALID_FOR: Duration = Duration::from_secs(10);

type ReachabilitySource = Box<dyn Fn() -> Reachability + Send + Sync>;

pub struct Health {
    state: Mutex<State>,
    /// How Hetzner has answered lately (the client's view); none in tests without one.
    hetzner: Option<ReachabilitySource>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("state", &self.lock())
            .finish()
    }
}

#[derive(Debug, Clone)]
struct State {
    /// The control loop's last iteration.
    tick: Instant,
    /// Since when this replica leads; `None` while it follows.
    leading_since: Option<Instant>,
    last_resync: Option<Instant>,
    resync_interval: Duration,
    /// The last database ping: when, and whether it answered.
    ping: Option<(Instant, Result<(), String>)>,
}

/// A failed probe says why, in one line.
pub type Probe = Result<(), String>;

impl Default for Health {
    fn default() -> Self {
        Health::new(None)
    }
}

impl Health {
    pub fn new(hetzner: Option<ReachabilitySource>) -> Self {
        Health {
            state: Mutex::new(State {
                tick: Instant::now(),
                leading_since: None,
                last_resync: None,
                resync_interval: Duration::from_secs(60),
                ping: None,
            }),
            hetzner,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is one assignment: a panic elsewhere leaves it whole.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The loop went round once; `leader` is whether it may act.
    pub fn tick(&self, leader: bool, resync_interval: Duration) {
        let now = Instant::now();
        let mut state = self.lock();
        state.tick = now;
        state.resync_interval = resync_interval;
        match (leader, state.leading_since) {
            (true, None) => state.leading_since = Some(now),
            (false, Some(_)) => state.leading_since = None,
            _ => {}
        }
    }

    /// A resync listed Hetzner and scanned the table.
    pub fn resync_finished(&self) {
        self.lock().last_resync = Some(Instant::now());
    }

    pub fn database_pinged(&self, result: Result<(), String>) {
        self.lock().ping = Some((Instant::now(), result));
    }

    /// `/healthz`: whether restarting this process could help.
    pub fn liveness(&self) -> Probe {
        let now = Instant::now();
        let state = self.lock().clone();
        let allowed = 3 * state.resync_interval;
        let silent = now.saturating_duration_since(state.tick);
        if silent > allowed.max(MIN_STALL) {
            return Err(format!(
                "the control loop has not run for {} s (allowed: {} s)",
                silent.as_secs(),
                allowed.max(MIN_STALL).as_secs()
            ));
        }
        if let Some(since) = state.leading_since {
            let last = state.last_resync.map_or(since, |last| last.max(since));
            let waited = now.saturating_duration_since(last);
            if waited > allowed {
                let hetzner = self
                    .hetzner
                    .as_ref()
                    .and_then(|source| source().last_failure)
                    .map(|label| format!("; the last Hetzner failure: {label}"))
                    .unwrap_or_default();
                return Err(format!(
                    "leader without a finished resync for {} s (3 × the resync interval of {} s){hetzner}",
                    waited.as_secs(),
                    state.resync_interval.as_secs()
                ));
            }
        }
        Ok(())
    }

    /// `/readyz`: whether this replica can do its job right now.
    pub fn readiness(&self) -> Probe {
        let now = Instant::now();
        let state = self.lock().clone();
        match &state.ping {
            None => return Err("database not checked yet".into()),
            Some((_, Err(e))) => return Err(format!("database unreachable: {e}")),
            Some((at, Ok(()))) if now.saturating_duration_since(*at) > PING_VALID_FOR => {
                return Err(format!(
                    "database ping has not answered for {} s",
                    now.saturating_duration_since(*at).as_secs()
                ));
            }
            Some(_) => {}
        }
        if state.leading_since.is_some()
            && let Some(reachability) = self.hetzner.as_ref().map(|source| source())
            && let Some(since) = reachability.failing_since
        {
            let failing = since.elapsed().unwrap_or_default();
            if failing > state.resync_interval.max(MIN_HETZNER_GRACE) {
                return Err(format!(
                    "Hetzner has not worked for this leader for {} s (last failure: {})",
                    failing.as_secs(),
                    reachability.last_failure.unwrap_or("unknown")
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::SystemTime;

    fn failing_for(seconds: u64) -> Reachability {
        Reachability {
            last_success: None,
            failing_since: SystemTime::now().checked_sub(Duration::from_secs(seconds)),
            last_failure: Some("transport_timeout"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_without_a_resync_for_three_intervals_is_not_alive() {
        let health = Health::default();
        health.tick(true, Duration::from_secs(10));
        health.database_pinged(Ok(()));
        assert_eq!(
            health.liveness(),
            Ok(()),
            "a new leader has three intervals"
        );
        tokio::time::advance(Duration::from_secs(29)).await;
        health.tick(true, Duration::from_secs(10));
        assert_eq!(health.liveness(), Ok(()));
        tokio::time::advance(Duration::from_secs(2)).await;
        health.tick(true, Duration::from_secs(10));
        let failed = health.liveness().unwrap_err();
        assert!(
            failed.contains("without a finished resync for 31 s"),
            "{failed}"
        );
        health.resync_finished();
        assert_eq!(health.liveness(), Ok(()), "a finished resync recovers it");
        // A follower does not resync: only its loop must tick.
        tokio::time::advance(Duration::from_secs(60)).await;
        health.tick(false, Duration::from_secs(10));
        assert_eq!(health.liveness(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_stopped_ticking_is_not_alive_leader_or_not() {
        let health = Health::default();
        health.tick(false, Duration::from_secs(1));
        tokio::time::advance(MIN_STALL + Duration::from_secs(1)).await;
        let failed = health.liveness().unwrap_err();
        assert!(
            failed.contains("control loop has not run for 11 s"),
            "{failed}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_follows_the_database_ping_and_the_leaders_hetzner() {
        let reachability = Arc::new(Mutex::new(Reachability::default()));
        let source = Arc::clone(&reachability);
        let health = Health::new(Some(Box::new(move || {
            *source
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        })));
        assert!(health.readiness().is_err(), "no ping yet");
        health.database_pinged(Err("connection refused".into()));
        assert_eq!(
            health.readiness(),
            Err("database unreachable: connection refused".into())
        );
        health.database_pinged(Ok(()));
        assert_eq!(health.readiness(), Ok(()));

        *reachability.lock().unwrap() = failing_for(5);
        health.tick(true, Duration::from_secs(1));
        assert_eq!(
            health.readiness(),
            Ok(()),
            "5 s of failures is within the grace"
        );
        *reachability.lock().unwrap() = failing_for(30);
        let failed = health.readiness().unwrap_err();
        assert!(failed.contains("transport_timeout"), "{failed}");
        health.tick(false, Duration::from_secs(1));
        assert_eq!(
            health.readiness(),
            Ok(()),
            "a follower does not call Hetzner"
        );

        tokio::time::advance(PING_VALID_FOR + Duration::from_secs(1)).await;
        assert!(
            health
                .readiness()
                .unwrap_err()
                .contains("not answered for 11 s")
        );
    }
}
