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

use futures::StreamExt;
use tokio::sync::{Notify, watch};

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
    /// Largest resource count seen per kind in the last full listing (for the budget).
    last_listing_size: std::sync::atomic::AtomicUsize,
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
        Controller {
            reconciler: Arc::new(reconciler),
            metrics,
            rate_limit_per_hour: rate_limit_per_hour.max(1),
            wake: Arc::new(Notify::new()),
            work: Arc::new(WorkSet::default()),
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
            if Instant::now() >= next_resync {
                match self.resync().await {
                    Ok(report) => tracing::info!(?report, "resync pass done"),
                    Err(e) => {
                        tracing::warn!(error = %e, "resync pass failed; nothing was changed on its account")
                    }
                }
                let interval = self.resync_interval();
                self.metrics.set_resync_interval(interval);
                next_resync = Instant::now() + interval;
            } else if let Err(e) = self.process_changes().await {
                tracing::warn!(error = %e, "change pass failed");
            }
        }
        tracing::info!("control loop stopped");
    }

    /// The change pass: reconciles rows whose desired version changed, deleted rows, and
    /// subscriptions whose requeue or backoff is due. Each is observed by its own labels.
    pub async fn process_changes(&self) -> Result<PassReport, ReconcileError> {
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
        let report = self
            .reconcile_many(wanted.into_iter().collect(), snapshot, false)
            .await;
        if report.reconciled > 0 {
            self.metrics.pass_finished("changes", started.elapsed());
            tracing::debug!(?report, "change pass done");
        }
        Ok(report)
    }

    /// The resync pass: lists everything we own once, then reconciles every row and every
    /// orphan against that snapshot. A failed listing changes nothing (unknown != gone).
    pub async fn resync(&self) -> Result<PassReport, ReconcileError> {
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
        let mut report = self.reconcile_many(work, Some(snapshot), true).await;
        if rows.is_empty() && !unwanted.is_empty() {
            // An empty table next to labelled resources is more likely a wrong DATABASE_URL
            // than a fleet to delete. Deleted rows are still torn down by the change pass.
            tracing::error!(
                groups = unwanted.len(),
                "the subscriptions table is empty but resources carry our instance label: not deleting them; check DATABASE_URL"
            );
        } else {
            report.failed += self.delete_unwanted(unwanted).await;
        }
        self.metrics.pass_finished("resync", started.elapsed());
        Ok(report)
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

    /// Reconciles the given subscriptions with bounded concurrency, each at most once at a
    /// time; ones in flight or backing off are skipped (they come back when due).
    async fn reconcile_many(
        &self,
        work: Vec<(String, Option<i64>)>,
        snapshot: Option<Arc<Snapshot>>,
        resync: bool,
    ) -> PassReport {
        let concurrency = self.reconciler.config.concurrency.max(1);
        let now = Instant::now();
        let offered = work.len();
        let claims: Vec<_> = work
            .into_iter()
            .filter_map(|(id, version)| {
                self.work
                    .try_claim(&id, version, now, resync)
                    .map(|c| (c, version))
            })
            .collect();
        let results: Vec<bool> = futures::stream::iter(claims)
            .map(|(claim, version)| {
                let snapshot = snapshot.clone();
                async move {
                    // A lost lease stops the pass before the next subscription.
                    if !self.reconciler.leadership.is_leader() {
                        return true;
                    }
                    // A snapshot older than this subscription's last reconcile may miss what
                    // that reconcile created: observe it afresh instead.
                    let fresh = snapshot.filter(|s| {
                        self.work
                            .last_done(claim.key())
                            .is_none_or(|done| done < s.taken_at)
                    });
                    let started = Instant::now();
                    let result = self
                        .reconciler
                        .reconcile(claim.key(), fresh.as_deref())
                        .await;
                    let ok = result.is_ok();
                    match result {
                        Ok(Done::Settled) => {
                            self.metrics
                                .reconcile_finished("settled", None, started.elapsed());
                            claim.finish(Finish::Success);
                        }
                        Ok(Done::Requeue(delay)) => {
                            self.metrics
                                .reconcile_finished("requeue", None, started.elapsed());
                            claim.finish(Finish::RetryAfter(delay));
                        }
                        Err(error) => {
                            self.metrics.reconcile_finished(
                                "error",
                                Some(error.metric_label()),
                                started.elapsed(),
                            );
                            claim.finish(Finish::Failure { version });
                        }
                    }
                    ok
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        self.metrics.set_backoff(self.work.in_backoff());
        PassReport {
            reconciled: results.len(),
            failed: results.iter().filter(|ok| !**ok).count(),
            skipped_busy: offered - results.len(),
        }
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
