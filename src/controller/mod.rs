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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, watch};

use crate::db::subscriptions;
use crate::hcloud::HcloudApi;
use crate::reconcile::desired::{self, instance_selector};
use crate::reconcile::observe::{self, Observed, Snapshot};
use crate::reconcile::{self, Done, ReconcileError, Reconciler};
use crate::telemetry::metrics::Metrics;

use workset::{Claim, Finish, WorkSet};

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
    /// Set on shutdown: queued jobs start nothing.
    stopping: Arc<AtomicBool>,
    /// Largest resource count seen per kind in the last full listing (for the budget).
    last_listing_size: std::sync::atomic::AtomicUsize,
}

/// Reconciles started by a pass.
struct Dispatched {
    offered: usize,
    handles: Vec<tokio::task::JoinHandle<bool>>,
}

/// What a claimed entry is for.
enum Job {
    /// Reconcile the subscription (against `snapshot` when it is fresh enough).
    Reconcile {
        version: Option<i64>,
        snapshot: Option<Arc<Snapshot>>,
    },
    /// Delete resources we own that no row wants.
    DeleteUnwanted(Observed),
}

impl Dispatched {
    /// Waits for every reconcile of the pass.
    async fn finish(self) -> PassReport {
        let started = self.handles.len();
        let mut failed = 0;
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
            stopping: Arc::new(AtomicBool::new(false)),
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
    /// subscriptions whose requeue or backoff is due. Each is observed by its own labels, or
    /// all together by one listing when that is cheaper.
    pub async fn process_changes(&self) -> Result<PassReport, ReconcileError> {
        Ok(self.start_changes().await?.finish().await)
    }

    async fn start_changes(&self) -> Result<Dispatched, ReconcileError> {
        let db = &self.reconciler.db;
        let now = Instant::now();
        // A deletion notice is consumed here; the work set keeps it until it was served.
        for id in subscriptions::take_deletions(db).await? {
            self.work.request(&desired::resource_key(&id), &id, now);
        }
        let mut wanted: BTreeMap<String, (String, Option<i64>)> = BTreeMap::new();
        for (key, id) in self.work.due(now) {
            wanted.insert(key, (id, None));
        }
        for (id, version) in subscriptions::changed(db).await? {
            wanted.insert(desired::resource_key(&id), (id, Some(version)));
        }
        let started = Instant::now();
        let offered = wanted.len();
        let claims = self.claim(wanted, false);
        // Many claims at once (a bulk insert): one listing of everything is cheaper than
        // three listings per subscription. Counted after claiming, so rows that wait out a
        // delay cost nothing.
        let listing_pages = self
            .last_listing_size
            .load(Ordering::Relaxed)
            .div_ceil(50)
            .max(1);
        let snapshot = if claims.len() > listing_pages {
            let selector = instance_selector(&self.reconciler.config);
            // On error the claims drop: each counts as a failure and backs off.
            Some(Arc::new(
                observe::observe(&self.reconciler.api, &selector).await?,
            ))
        } else {
            None
        };
        let jobs = claims
            .into_iter()
            .map(|(claim, version)| {
                (
                    claim,
                    Job::Reconcile {
                        version,
                        snapshot: snapshot.clone(),
                    },
                )
            })
            .collect();
        let dispatched = self.spawn(jobs, offered);
        if !dispatched.handles.is_empty() {
            self.metrics.pass_finished("changes", started.elapsed());
        }
        Ok(dispatched)
    }

    /// The resync pass: lists everything we own once, then reconciles every row against that
    /// snapshot and deletes what no row wants. A failed listing changes nothing (unknown is
    /// not gone).
    pub async fn resync(&self) -> Result<PassReport, ReconcileError> {
        Ok(self.start_resync().await?.finish().await)
    }

    async fn start_resync(&self) -> Result<Dispatched, ReconcileError> {
        let started = Instant::now();
        let config = &self.reconciler.config;
        let snapshot = observe::observe(&self.reconciler.api, &instance_selector(config)).await?;
        // TODO(controller): rows in `.bad` must protect their resources from orphan deletion.
        let rows = subscriptions::all(&self.reconciler.db).await?.rows;
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

        let mut unwanted = reconcile::unwanted(config, &snapshot, &rows);
        if rows.is_empty() && !unwanted.is_empty() {
            // An empty table next to labelled resources is more likely a wrong DATABASE_URL
            // than a fleet to delete. Deleted rows are still torn down by the change pass.
            tracing::error!(
                groups = unwanted.len(),
                "the subscriptions table is empty but resources carry our instance label: not deleting them; check DATABASE_URL"
            );
            unwanted.clear();
        }
        let mut work: BTreeMap<String, (String, Option<i64>)> = rows
            .iter()
            .map(|r| {
                (
                    desired::resource_key(&r.id),
                    (r.id.clone(), Some(r.desired_version)),
                )
            })
            .collect();
        let mut orphans = BTreeMap::new();
        for (key, observed) in unwanted {
            work.entry(key.clone())
                .or_insert_with(|| (key.clone(), None));
            orphans.insert(key, observed);
        }
        self.work.retain(|key| work.contains_key(key));

        let snapshot = Arc::new(snapshot);
        let offered = work.len();
        let claims = self.claim(work, true);
        let jobs = claims
            .into_iter()
            .map(|(claim, version)| {
                let job = match orphans.remove(claim.key()) {
                    Some(observed) => Job::DeleteUnwanted(observed),
                    None => Job::Reconcile {
                        version,
                        snapshot: Some(Arc::clone(&snapshot)),
                    },
                };
                (claim, job)
            })
            .collect();
        let dispatched = self.spawn(jobs, offered);
        self.metrics.pass_finished("resync", started.elapsed());
        Ok(dispatched)
    }

    /// Claims every entry that is free (not in flight, not waiting); the rest come back when
    /// due. `work` maps resource keys to the id to reconcile and the row version.
    fn claim(
        &self,
        work: BTreeMap<String, (String, Option<i64>)>,
        resync: bool,
    ) -> Vec<(Claim, Option<i64>)> {
        let now = Instant::now();
        work.into_iter()
            .filter_map(|(key, (id, version))| {
                self.work
                    .try_claim(&key, &id, version, now, resync)
                    .map(|claim| (claim, version))
            })
            .collect()
    }

    /// Runs each job as a task and returns at once. At most `concurrency` jobs run at a
    /// time, across passes: a slow create never stalls the loop or other subscriptions.
    fn spawn(&self, jobs: Vec<(Claim, Job)>, offered: usize) -> Dispatched {
        let mut handles = Vec::with_capacity(jobs.len());
        for (claim, job) in jobs {
            let reconciler = Arc::clone(&self.reconciler);
            let metrics = Arc::clone(&self.metrics);
            let slots = Arc::clone(&self.slots);
            let stopping = Arc::clone(&self.stopping);
            handles.push(tokio::spawn(async move {
                let Ok(_slot) = slots.acquire_owned().await else {
                    return true;
                };
                // Shutting down, or the lease is gone: start nothing new. Dropping the claim
                // brings the subscription back later (or to the next leader).
                if stopping.load(Ordering::SeqCst) || !reconciler.leadership.is_leader() {
                    return true;
                }
                let started = Instant::now();
                let version = match &job {
                    Job::Reconcile { version, .. } => *version,
                    Job::DeleteUnwanted(_) => None,
                };
                let result = match job {
                    Job::Reconcile { snapshot, .. } => {
                        // A snapshot taken before this subscription's last reconcile ended
                        // may miss what it created: observe afresh instead.
                        let fresh = snapshot.filter(|s| {
                            claim.last_done().is_none_or(|done| done < s.taken_at)
                        });
                        reconciler.reconcile(claim.id(), fresh.as_deref()).await
                    }
                    Job::DeleteUnwanted(observed) => {
                        tracing::info!(
                            key = claim.key(),
                            servers = observed.servers.len(),
                            ssh_keys = observed.ssh_keys.len(),
                            firewalls = observed.firewalls.len(),
                            "deleting resources with our instance label that no subscription wants"
                        );
                        let result = reconciler.delete_orphans(claim.key(), &observed).await;
                        result.map(|()| Done::Settled)
                    }
                };
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
                        tracing::debug!(key = claim.key(), error = %error, "reconcile failed; backing off");
                        metrics.reconcile_finished("error", Some(error.metric_label()), took);
                        claim.finish(Finish::Failure { version });
                        false
                    }
                }
            }));
        }
        Dispatched { offered, handles }
    }

    /// Stops starting reconciles and waits until none is in flight, for a clean shutdown.
    async fn drain(&self) {
        self.stopping.store(true, Ordering::SeqCst);
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
