//! The control loop. Two passes, each taking no input and doing the same work every time:
//! - the change pass (every second): rows whose desired version moved, deleted rows, and
//!   subscriptions whose requeue or backoff delay is over;
//! - the resync pass (every `resync_seconds`, stretched to stay within the API budget): one
//!   listing of everything we own, every row and every orphan reconciled against it.
//!
//! Both go through `Reconciler::reconcile`, so there is one code path per subscription.

pub mod leader;
pub mod triggers;
pub mod workset;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, watch};

use crate::db::subscriptions;
use crate::hcloud::HcloudApi;
use crate::reconcile::desired::instance_selector;
use crate::reconcile::observe::{self, Observed, Snapshot};
use crate::reconcile::{self, Done, ReconcileError, Reconciler};
use crate::telemetry::metrics::Metrics;

use workset::{Finish, WorkSet};

/// How often rows are checked for changes (a cheap indexed query).
pub const CHANGE_POLL: Duration = Duration::from_secs(1);
/// Resync listing may use at most this share of the API budget; the interval stretches.
const RESYNC_BUDGET_SHARE: f64 = 0.25;

pub struct Controller<A: HcloudApi> {
    pub reconciler: Arc<Reconciler<A>>,
    pub metrics: Arc<Metrics>,
    /// The API budget (requests per hour) the resync interval must fit in.
    pub rate_limit_per_hour: u32,
    /// Poked by `triggers::listen_for_changes` to run the change pass at once.
    pub wake: Arc<Notify>,
    work: Arc<WorkSet>,
    /// One permit per reconcile in flight (`concurrency`), shared by all passes.
    slots: Arc<Semaphore>,
    /// Largest resource count seen per kind in the last full listing (for the budget).
    last_listing_size: std::sync::atomic::AtomicUsize,
}

/// Reconciles started by a pass.
struct Dispatched {
    offered: usize,
    handles: Vec<tokio::task::JoinHandle<bool>>,
    /// Failures of work the pass did itself (orphan deletion).
    failed_inline: usize,
}

impl Dispatched {
    /// Waits for every reconcile of the pass.
    async fn finish(self) -> PassReport {
        let started = self.handles.len();
        let mut failed = self.failed_inline;
        for handle in self.handles {
            // A panicking reconcile counts as failed; its claim was released on unwind.
            if !handle.await.unwrap_or(false) {
                failed += 1;
            }
        }
        PassReport {
            reconciled: started,
            failed,
            skipped_busy: self.offered - started,
        }
    }
}

/// What one pass did, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub reconciled: usize,
    pub failed: usize,
    /// In flight elsewhere or waiting out a backoff.
    pub skipped_busy: usize,
}

impl<A: HcloudApi + 'static> Controller<A> {
    pub fn new(reconciler: Reconciler<A>, metrics: Arc<Metrics>, rate_limit_per_hour: u32) -> Self {
        let slots = Arc::new(Semaphore::new(reconciler.config.concurrency.max(1)));
        Controller {
            reconciler: Arc::new(reconciler),
            metrics,
            rate_limit_per_hour: rate_limit_per_hour.max(1),
            wake: Arc::new(Notify::new()),
            work: Arc::new(WorkSet::default()),
            slots,
            last_listing_size: Default::default(),
        }
    }

    /// Runs both passes until `shutdown` flips to true; the pass in flight finishes first.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut next_resync = Instant::now();
        let mut change_tick = tokio::time::interval(CHANGE_POLL);
        change_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = change_tick.tick() => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
            self.metrics
                .set_leader(self.reconciler.leadership.is_leader());
            if !self.reconciler.leadership.is_leader() {
                continue;
            }
            self.metrics.set_backoff(self.work.in_backoff());
            // Passes start reconciles and return; the reconciles run on their own.
            if Instant::now() >= next_resync {
                match self.start_resync().await {
                    Ok(pass) => tracing::info!(
                        subscriptions = pass.offered,
                        started = pass.handles.len(),
                        "resync pass"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "resync pass failed; nothing was changed on its account")
                    }
                }
                let interval = self.resync_interval();
                self.metrics.set_resync_interval(interval);
                next_resync = Instant::now() + interval;
            } else if let Err(e) = self.start_changes().await {
                tracing::warn!(error = %e, "change pass failed");
            }
        }
        tracing::info!("control loop stopped; waiting for the reconciles in flight");
        self.drain().await;
        tracing::info!("reconciles finished");
    }

    /// The change pass: reconciles rows whose desired version changed, deleted rows, and
    /// subscriptions whose requeue or backoff is due. Each is observed by its own labels.
    pub async fn process_changes(&self) -> Result<PassReport, ReconcileError> {
        Ok(self.start_changes().await?.finish().await)
    }

    async fn start_changes(&self) -> Result<Dispatched, ReconcileError> {
        let db = &self.reconciler.db;
        let mut wanted: BTreeMap<String, Option<i64>> = BTreeMap::new();
        for (id, version) in subscriptions::changed(db).await? {
            wanted.insert(id, Some(version));
        }
        for id in subscriptions::take_deletions(db).await? {
            wanted.entry(id).or_insert(None);
        }
        for id in self.work.due(Instant::now()) {
            wanted.entry(id).or_insert(None);
        }
        let started = Instant::now();
        // Many changes at once (a bulk insert): one listing of everything is cheaper than
        // three listings per subscription.
        let listing_pages = self
            .last_listing_size
            .load(Ordering::Relaxed)
            .div_ceil(50)
            .max(1);
        let snapshot = if wanted.len() > listing_pages {
            let selector = instance_selector(&self.reconciler.config);
            Some(Arc::new(
                observe::observe(&self.reconciler.api, &selector).await?,
            ))
        } else {
            None
        };
        let dispatched = self.dispatch(wanted.into_iter().collect(), snapshot, false);
        if !dispatched.handles.is_empty() {
            self.metrics.pass_finished("changes", started.elapsed());
        }
        Ok(dispatched)
    }

    /// The resync pass: lists everything we own once, then reconciles every row and every
    /// orphan against that snapshot. A failed listing changes nothing (unknown != gone).
    pub async fn resync(&self) -> Result<PassReport, ReconcileError> {
        Ok(self.start_resync().await?.finish().await)
    }

    async fn start_resync(&self) -> Result<Dispatched, ReconcileError> {
        let started = Instant::now();
        let config = &self.reconciler.config;
        let snapshot = observe::observe(&self.reconciler.api, &instance_selector(config)).await?;
        let rows = subscriptions::all(&self.reconciler.db).await?;
        let size = [
            snapshot.resources.servers.len(),
            snapshot.resources.ssh_keys.len(),
            snapshot.resources.firewalls.len(),
            rows.len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        self.last_listing_size.store(size, Ordering::Relaxed);

        let mut by_status: BTreeMap<String, i64> = BTreeMap::new();
        for row in &rows {
            *by_status
                .entry(row.provisioning_status.clone())
                .or_default() += 1;
        }
        self.metrics.set_subscriptions(&by_status);

        let work: Vec<(String, Option<i64>)> = rows
            .iter()
            .map(|r| (r.id.clone(), Some(r.desired_version)))
            .collect();
        let unwanted = reconcile::unwanted(config, &snapshot, &rows);
        let live: std::collections::BTreeSet<&str> = rows
            .iter()
            .map(|r| r.id.as_str())
            .chain(unwanted.iter().map(|(key, _)| key.as_str()))
            .collect();
        self.work.retain(|key| live.contains(key));
        let snapshot = Arc::new(snapshot);
        let mut dispatched = self.dispatch(work, Some(snapshot), true);
        if rows.is_empty() && !unwanted.is_empty() {
            // An empty table next to labelled resources is more likely a wrong DATABASE_URL
            // than a fleet to delete. Deleted rows are still torn down by the change pass.
            tracing::error!(
                groups = unwanted.len(),
                "the subscriptions table is empty but resources carry our instance label: not deleting them; check DATABASE_URL"
            );
        } else {
            dispatched.failed_inline += self.delete_unwanted(unwanted).await;
        }
        self.metrics.pass_finished("resync", started.elapsed());
        Ok(dispatched)
    }

    /// Deletes resources no row wants, one group at a time under the group's claim. A failure
    /// is logged and counted; it never stops the pass. Returns the number of failures.
    async fn delete_unwanted(&self, unwanted: Vec<(String, Observed)>) -> usize {
        let mut failed = 0;
        for (key, observed) in unwanted {
            if !self.reconciler.leadership.is_leader() {
                break;
            }
            let Some(claim) = self.work.try_claim(&key, None, Instant::now(), true) else {
                continue;
            };
            tracing::info!(
                key,
                servers = observed.servers.len(),
                ssh_keys = observed.ssh_keys.len(),
                firewalls = observed.firewalls.len(),
                "deleting resources with our instance label that no subscription wants"
            );
            let started = Instant::now();
            match self.reconciler.delete_orphans(&key, &observed).await {
                Ok(()) => {
                    self.metrics
                        .reconcile_finished("settled", None, started.elapsed());
                    claim.finish(Finish::Success);
                }
                Err(error) => {
                    tracing::warn!(key, error = %error, "deleting orphaned resources failed; retrying next resync");
                    self.metrics.reconcile_finished(
                        "error",
                        Some(error.metric_label()),
                        started.elapsed(),
                    );
                    claim.finish(Finish::Failure { version: None });
                    failed += 1;
                }
            }
        }
        failed
    }

    /// Starts a reconcile for each subscription that can be claimed (not in flight, not
    /// backing off) and returns at once. At most `concurrency` reconciles run at a time,
    /// across passes: a slow create never stalls the loop or other subscriptions' changes.
    fn dispatch(
        &self,
        work: Vec<(String, Option<i64>)>,
        snapshot: Option<Arc<Snapshot>>,
        resync: bool,
    ) -> Dispatched {
        let now = Instant::now();
        let offered = work.len();
        let mut handles = Vec::new();
        for (id, version) in work {
            let Some(claim) = self.work.try_claim(&id, version, now, resync) else {
                continue;
            };
            let reconciler = Arc::clone(&self.reconciler);
            let metrics = Arc::clone(&self.metrics);
            let slots = Arc::clone(&self.slots);
            let snapshot = snapshot.clone();
            handles.push(tokio::spawn(async move {
                let Ok(_slot) = slots.acquire_owned().await else {
                    return true; // shutting down
                };
                // A lost lease stops before the next subscription.
                if !reconciler.leadership.is_leader() {
                    return true;
                }
                // A snapshot older than this subscription's last reconcile may miss what
                // that reconcile created: observe it afresh instead.
                let fresh =
                    snapshot.filter(|s| claim.last_done().is_none_or(|done| done < s.taken_at));
                let started = Instant::now();
                let result = reconciler.reconcile(claim.key(), fresh.as_deref()).await;
                let took = started.elapsed();
                match result {
                    Ok(Done::Settled) => {
                        metrics.reconcile_finished("settled", None, took);
                        claim.finish(Finish::Success);
                        true
                    }
                    Ok(Done::Requeue(delay)) => {
                        metrics.reconcile_finished("requeue", None, took);
                        claim.finish(Finish::RetryAfter(delay));
                        true
                    }
                    Err(error) => {
                        metrics.reconcile_finished("error", Some(error.metric_label()), took);
                        claim.finish(Finish::Failure { version });
                        false
                    }
                }
            }));
        }
        Dispatched {
            offered,
            handles,
            failed_inline: 0,
        }
    }

    /// Waits until no reconcile is in flight (all slots free), for a clean shutdown.
    async fn drain(&self) {
        let all = u32::try_from(self.reconciler.config.concurrency.max(1)).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(all).await;
    }

    /// The configured resync interval, stretched so that listing everything we own uses at
    /// most `RESYNC_BUDGET_SHARE` of the API budget's refill rate.
    pub fn resync_interval(&self) -> Duration {
        let configured = Duration::from_secs(self.reconciler.config.resync_seconds);
        let size = self.last_listing_size.load(Ordering::Relaxed);
        let requests = 3 * size.div_ceil(50).max(1);
        let refill_per_second = f64::from(self.rate_limit_per_hour) / 3600.0;
        let needed =
            Duration::from_secs_f64(requests as f64 / (refill_per_second * RESYNC_BUDGET_SHARE));
        configured.max(needed)
    }
}
