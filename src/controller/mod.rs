//! The control loop. Two passes, each taking no input and doing the same work every time:
//! - the change pass (every second): rows whose desired version moved, deleted rows, and
//!   subscriptions whose requeue or backoff delay is over;
//! - the resync pass (every `resync_seconds`, stretched to stay within the API budget): one
//!   listing of everything we own and one table scan; every row is judged against the
//!   listing in memory (`Reconciler::verdict`), and the rows that are not converged and
//!   every orphan are reconciled.
//!
//! Both queue their work (`queue`: changes before bulk work) and go through
//! `Reconciler::reconcile`, so there is one code path per subscription.

pub mod leader;
pub mod queue;
pub mod retry;
pub mod triggers;
pub mod workset;

pub use retry::{inputs_fingerprint, retry_after_config_change};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::db::{deletion_guard, subscriptions};
use crate::fencing::Term;
use crate::hcloud::{self, HcloudApi};
use crate::reconcile::desired::{self, PRE_DELETE_SNAPSHOT, SNAPSHOT_LABEL};
use crate::reconcile::observe::{self, Observed, RecordedIds, Snapshot};
use crate::reconcile::{self, Done, ReconcileError, Reconciler, Verdict};
use crate::telemetry;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::Metrics;

use queue::{Lane, Queue};
use workset::{Claim, Finish, WorkSet};

/// How often rows are checked for changes (a cheap indexed query).
pub const CHANGE_POLL: Duration = Duration::from_secs(1);
/// Resync listing may use at most this share of the API budget; the interval stretches.
const RESYNC_BUDGET_SHARE: f64 = 0.25;
/// A row in one of these statuses for longer than `STUCK_AFTER` counts as stuck.
const STUCK_STATUSES: [&str; 3] = ["pending", "provisioning", "deprovisioning"];
const STUCK_AFTER: chrono::TimeDelta = chrono::TimeDelta::minutes(30);

pub struct Controller<A: HcloudApi> {
    pub reconciler: Arc<Reconciler<A>>,
    pub metrics: Arc<Metrics>,
    /// What /healthz and /readyz answer from: the loop ticks it, resyncs report to it.
    pub health: Arc<Health>,
    /// Set when a job finished: the next tick counts the rows by status again.
    statuses_stale: Arc<AtomicBool>,
    /// The API budget (requests per hour) the resync interval must fit in.
    pub rate_limit_per_hour: u32,
    /// Poked by `triggers::listen_for_changes` to run the change pass at once.
    pub wake: Arc<Notify>,
    work: Arc<WorkSet>,
    /// Claimed jobs waiting for one of `concurrency` workers, changes first.
    queue: Arc<Queue<Queued>>,
    /// Cancelled on shutdown: queued jobs start nothing.
    stopping: CancellationToken,
    /// Largest resource count seen per kind in the last full listing (for the budget).
    last_listing_size: std::sync::atomic::AtomicUsize,
    /// Resources labelled by the scheme before installation ids were looked for once since
    /// start (they only exist from before the upgrade).
    legacy_checked: AtomicBool,
    /// `inputs_fingerprint` of this process: each new leadership term retries the failed
    /// rows when it differs from the one stored (so only the leader does it).
    pub inputs_fingerprint: Option<String>,
}

/// Reconciles queued by a pass.
struct Dispatched {
    offered: usize,
    /// Rows the resync found converged: nothing queued for them.
    converged: usize,
    /// One per queued job: whether it succeeded.
    results: Vec<oneshot::Receiver<bool>>,
}

/// What a resync keeps of the table while it streams by: the rows themselves are judged and
/// dropped one at a time.
#[derive(Default)]
struct Scanned {
    /// Every id, decoded or not (resources of unreadable rows are never orphans).
    ids: Vec<String>,
    recorded: Vec<RecordedIds>,
    bad: Vec<subscriptions::BadRow>,
    by_status: BTreeMap<String, i64>,
    stuck: usize,
    /// Rows whose resource key another row already has: (id, why they are skipped).
    duplicates: Vec<(String, String)>,
    /// Resource key → the id of the row that has it.
    keys: HashMap<String, String>,
    /// Resource key → (id, row version) of the rows to reconcile.
    work: BTreeMap<String, (String, Option<i64>)>,
    converged: usize,
}

/// A claimed job waiting in the queue.
struct Queued {
    term: Term,
    claim: Claim,
    job: Job,
    result: oneshot::Sender<bool>,
    lane: Lane,
    queued_at: Instant,
}

/// What a claimed entry is for. Every job runs in the leadership term of the pass that
/// decided it, or not at all.
enum Job {
    /// Reconcile the subscription (against `snapshot` when it is fresh enough).
    Reconcile {
        version: Option<i64>,
        snapshot: Option<Arc<Snapshot>>,
    },
    /// Delete resources we own that no row wants.
    DeleteUnwanted(Observed),
}

impl Job {
    fn version(&self) -> Option<i64> {
        match self {
            Job::Reconcile { version, .. } => *version,
            Job::DeleteUnwanted(_) => None,
        }
    }
}

/// Runs one claimed job in `term` and records how it ended on the claim. Returns whether it
/// succeeded.
async fn run_job<A: HcloudApi>(
    reconciler: &Reconciler<A>,
    metrics: &Metrics,
    term: &Term,
    claim: Claim,
    job: Job,
) -> bool {
    let started = Instant::now();
    let version = job.version();
    let reconcile = matches!(job, Job::Reconcile { .. });
    let span = tracing::info_span!("reconcile", subscription = %desired::shown_id(claim.id()));
    let result = match job {
        Job::Reconcile { snapshot, .. } => {
            // A snapshot taken before this subscription's last reconcile ended may miss what
            // it created: observe afresh instead.
            let fresh = snapshot.filter(|s| claim.last_done().is_none_or(|done| done < s.taken_at));
            reconciler
                .reconcile(term, claim.id(), fresh.as_deref())
                .instrument(span)
                .await
        }
        Job::DeleteUnwanted(observed) => {
            tracing::info!(
                key = claim.key(),
                servers = observed.servers.len(),
                ssh_keys = observed.ssh_keys.len(),
                firewalls = observed.firewalls.len(),
                "deleting resources with our instance label that no subscription wants"
            );
            let result = reconciler
                .delete_orphans(term, claim.key(), &observed)
                .instrument(span)
                .await;
            result.map(|()| Done::Settled)
        }
    };
    let took = started.elapsed();
    match result {
        Ok(Done::Settled) => {
            metrics.job_finished(reconcile, "success", None, took);
            claim.finish(Finish::Success);
            true
        }
        Ok(Done::Recheck(after)) => {
            metrics.job_finished(reconcile, "success", None, took);
            claim.finish(Finish::Recheck(after));
            true
        }
        Ok(Done::Requeue(delay)) => {
            metrics.job_finished(reconcile, "requeue", None, took);
            claim.finish(Finish::RetryAfter(delay));
            true
        }
        // Not this subscription's failure: whoever leads next looks at it at once.
        Err(ReconcileError::LostLease) => {
            metrics.job_finished(reconcile, "error", Some("lost_lease"), took);
            claim.finish(Finish::RetryAfter(Duration::ZERO));
            false
        }
        Err(error) => {
            tracing::debug!(subscription = %desired::shown_id(claim.id()), error = %error, "reconcile failed; backing off");
            metrics.job_finished(reconcile, "error", Some(error.metric_label()), took);
            claim.finish(Finish::Failure { version });
            false
        }
    }
}

impl Dispatched {
    /// Waits for every reconcile of the pass.
    async fn finish(self) -> PassReport {
        let started = self.results.len();
        let mut failed = 0;
        for result in self.results {
            if !result.await.unwrap_or(false) {
                failed += 1;
            }
        }
        PassReport {
            reconciled: started,
            failed,
            skipped_busy: self.offered - started,
            converged: self.converged,
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
    /// Rows a resync found converged (nothing to do, nothing queued).
    pub converged: usize,
}

impl<A: HcloudApi + 'static> Controller<A> {
    /// The controller of `reconciler`, reporting to its metrics; `rate_limit_per_hour` is the
    /// API budget the resync interval must fit in.
    pub fn new(reconciler: Reconciler<A>, rate_limit_per_hour: u32) -> Self {
        let queue = Arc::new(Queue::new(reconciler.config.concurrency.max(1)));
        Controller {
            metrics: Arc::clone(&reconciler.metrics),
            reconciler: Arc::new(reconciler),
            health: Arc::new(Health::default()),
            statuses_stale: Arc::new(AtomicBool::new(false)),
            rate_limit_per_hour: rate_limit_per_hour.max(1),
            wake: Arc::new(Notify::new()),
            work: Arc::new(WorkSet::default()),
            queue,
            stopping: CancellationToken::new(),
            last_listing_size: Default::default(),
            legacy_checked: AtomicBool::new(false),
            inputs_fingerprint: None,
        }
    }

    /// Runs both passes until `shutdown` flips to true; the pass in flight finishes first.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut next_resync = Instant::now();
        let mut last_term = None;
        let mut resync: Option<tokio::task::JoinHandle<()>> = None;
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
            let leader = self.reconciler.leadership.is_leader();
            self.metrics.set_leader(leader);
            self.health.tick(leader, self.resync_interval());
            let Some(term) = self.reconciler.leadership.term() else {
                continue;
            };
            if self.statuses_stale.swap(false, Ordering::Relaxed) {
                self.count_statuses().await;
            }
            if last_term.as_ref() != Some(&term) {
                // A new term: what changed since the last leader looked is this leader's to act on.
                if let Some(fingerprint) = &self.inputs_fingerprint
                    && let Err(e) =
                        retry_after_config_change(&self.reconciler.db, fingerprint).await
                {
                    tracing::warn!(error = %e, "could not check whether failed rows need a retry");
                }
                last_term = Some(term);
            }
            self.metrics.set_backoff(self.work.in_backoff());
            // Passes queue reconciles and return; the reconciles run on their own. The resync
            // runs beside the loop, so its listing (600 requests at 10,000 rows) never holds
            // up the change pass: a toggle is queued within its second. A resync also waits
            // while bulk work is still queued: its listing would judge rows that are already
            // on their way.
            let resyncing = resync.as_ref().is_some_and(|task| !task.is_finished());
            let (_, bulk_waiting) = self.queue.depth();
            if Instant::now() >= next_resync && bulk_waiting == 0 && !resyncing {
                let interval = self.resync_interval();
                self.metrics.set_resync_interval(interval);
                next_resync = Instant::now() + interval;
                let this = Arc::clone(&self);
                resync = Some(tokio::spawn(async move {
                    match this.start_resync().await {
                        Ok(pass) => tracing::info!(
                            converged = pass.converged,
                            queued = pass.results.len(),
                            busy = pass.offered - pass.results.len(),
                            "resync pass"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "resync pass failed; nothing was changed on its account")
                        }
                    }
                }));
            }
            if let Err(e) = self.start_changes().await {
                tracing::warn!(error = %e, "change pass failed");
            }
        }
        // A resync still listing queues nothing more.
        if let Some(task) = resync {
            task.abort();
            let _ = task.await;
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
        let term = self.term()?;
        let db = &self.reconciler.db;
        let now = Instant::now();
        // A deletion notice is consumed here; the work set keeps it until it was served.
        for id in subscriptions::take_deletions(db, term.fence.as_ref()).await? {
            self.work.request(&desired::resource_key(&id), &id, now);
        }
        // Bootstraps that ended: their rows become `ready` (or show the failure) now.
        for id in self.reconciler.bootstrapper.take_finished() {
            self.work.request(&desired::resource_key(&id), &id, now);
        }
        let mut wanted: BTreeMap<String, (String, Option<i64>)> = BTreeMap::new();
        for (key, id) in self.work.due(now) {
            wanted.insert(key, (id, None));
        }
        // Reconciles go on ending while the query runs and until the rows are claimed: one
        // that ended after this reading already acted on what it shows.
        let read_at = Instant::now();
        for (id, version) in subscriptions::changed(db).await? {
            wanted.insert(desired::resource_key(&id), (id, Some(version)));
        }
        let started = Instant::now();
        let offered = wanted.len();
        let changed: HashMap<String, i64> = wanted
            .iter()
            .filter_map(|(key, (_, version))| version.map(|v| (key.clone(), v)))
            .collect();
        let claims = self.claim(wanted, Some(read_at), false);
        // A row toggled while it waits behind bulk work goes first now.
        self.queue.promote(|queued| {
            changed
                .get(queued.claim.key())
                .is_some_and(|version| queued.job.version() != Some(*version))
        });
        // Many claims at once (a bulk insert): one listing of everything is cheaper than
        // three listings per subscription. Counted after claiming, so rows that wait out a
        // delay cost nothing.
        let listing_pages = self
            .last_listing_size
            .load(Ordering::Relaxed)
            .div_ceil(50)
            .max(1);
        let snapshot = if claims.len() > listing_pages {
            let selector = self.reconciler.owner.selector();
            // On error the claims drop: each counts as a failure and backs off.
            Some(Arc::new(
                observe::observe(&self.reconciler.api, &selector).await?,
            ))
        } else {
            None
        };
        // Bulk work (observed by one listing) waits behind single changes.
        let lane = if snapshot.is_some() {
            Lane::Bulk
        } else {
            Lane::Change
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
        let dispatched = self.enqueue(&term, lane, jobs, offered, 0);
        if !dispatched.results.is_empty() {
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
        let dispatched = self.judge_and_queue().await;
        // The pass's scan maps are freed now, and so is its snapshot unless queued reconciles
        // hold it: give the pages back, so the next resync does not stack on this one's.
        telemetry::release_freed_memory();
        dispatched
    }

    /// One resync pass: the listing, the table scan with a verdict per row, and only what
    /// would change queued.
    async fn judge_and_queue(&self) -> Result<Dispatched, ReconcileError> {
        let term = self.term()?;
        let started = Instant::now();
        let reconciler = &self.reconciler;
        let config = &reconciler.config;
        let mut snapshot =
            match observe::observe(&reconciler.api, &reconciler.owner.selector()).await {
                Ok(snapshot) => snapshot,
                Err(error) => {
                    self.report_project_wide(&term, &error).await;
                    return Err(error.into());
                }
            };
        if !self.legacy_checked.load(Ordering::Relaxed) {
            // Once per process: legacy resources are adopted by the ids rows record.
            let mut recorded = Vec::new();
            subscriptions::scan(&reconciler.db, |row| {
                if let Ok(row) = row {
                    recorded.push(reconcile::recorded_ids(Some(&row)));
                }
            })
            .await?;
            self.adopt_legacy(&mut snapshot, &recorded).await?;
            self.legacy_checked.store(true, Ordering::Relaxed);
        }

        // Each row is judged against the listing as it streams in, and only what that needs
        // is kept: the table is never in memory at once. Only what would change is queued.
        let now = chrono::Utc::now();
        let stuck_before = now - STUCK_AFTER;
        let mut scan = Scanned::default();
        subscriptions::scan(&reconciler.db, |row| {
            let row = match row {
                Ok(row) => row,
                Err(bad) => {
                    // Rows that could not be decoded still own their resources: never orphans.
                    if let Some(id) = &bad.id {
                        scan.ids.push(id.clone());
                    }
                    scan.bad.push(bad);
                    return;
                }
            };
            *scan
                .by_status
                .entry(row.provisioning_status.clone())
                .or_default() += 1;
            if STUCK_STATUSES.contains(&row.provisioning_status.as_str())
                && row.status_changed_at.is_some_and(|since| since < stuck_before)
            {
                scan.stuck += 1;
            }
            scan.ids.push(row.id.clone());
            scan.recorded.push(reconcile::recorded_ids(Some(&row)));
            let key = desired::resource_key(&row.id);
            if let Some(first) = scan.keys.get(&key) {
                // Resource keys are injective up to a 64-bit hash: never two rows on one key.
                let problem = format!(
                    "id: resource key {key:?} is also the key of subscription {:?}; this row is not acted on",
                    desired::bounded(first, 64)
                );
                scan.duplicates.push((row.id, problem));
                return;
            }
            match reconciler.verdict(&row, &snapshot, now) {
                Verdict::Converged => scan.converged += 1,
                Verdict::Recheck(after) => {
                    scan.converged += 1;
                    self.work.recheck(&key, &row.id, Instant::now() + after);
                }
                Verdict::Work => {
                    scan.work
                        .insert(key.clone(), (row.id.clone(), Some(row.desired_version)));
                }
            }
            scan.keys.insert(key, row.id);
        })
        .await?;
        self.metrics.resync_succeeded(std::time::SystemTime::now());
        self.health.resync_finished();
        self.report_bad_rows(&term, &scan.bad).await;
        for (id, problem) in &scan.duplicates {
            tracing::error!(subscription = %desired::bounded(id, 64), "{problem}");
            self.record_skipped(&term, id, problem).await;
        }
        let size = snapshot
            .counts()
            .into_iter()
            .chain([scan.ids.len()])
            .max()
            .unwrap_or(0);
        self.last_listing_size.store(size, Ordering::Relaxed);
        self.metrics.set_subscriptions(&scan.by_status);
        self.metrics.set_stuck(scan.stuck);
        self.metrics.set_invalid_rows(scan.bad.len());
        match deletion_guard::status(&reconciler.db).await {
            Ok(guard) => self
                .metrics
                .set_deletions_paused(guard.paused_since.is_some()),
            Err(e) => tracing::warn!(error = %e, "cannot read the deletion guard"),
        }
        if let Err(e) = self.sweep_snapshots_in(&term, chrono::Utc::now()).await {
            tracing::warn!(error = %e, "snapshot retention sweep failed; retried next resync");
        }

        let ids: Vec<&str> = scan.ids.iter().map(String::as_str).collect();
        let mut unwanted = reconcile::unwanted(config, &snapshot, &ids, &scan.recorded);
        if ids.is_empty() && !unwanted.is_empty() {
            // An empty table next to labelled resources is more likely a wrong DATABASE_URL
            // than a fleet to delete. Deleted rows are still torn down by the change pass.
            tracing::error!(
                groups = unwanted.len(),
                "the subscriptions table is empty but resources carry our installation label: not deleting them; check DATABASE_URL"
            );
            unwanted.clear();
        }
        let Scanned {
            mut work,
            keys,
            converged,
            ..
        } = scan;
        let mut orphans = BTreeMap::new();
        for (key, observed) in unwanted {
            work.entry(key.clone())
                .or_insert_with(|| (key.clone(), None));
            orphans.insert(key, observed);
        }
        self.work
            .retain(|key| keys.contains_key(key) || orphans.contains_key(key));

        let snapshot = Arc::new(snapshot);
        let offered = work.len();
        // A row whose reconcile ended after the listing was stamped was judged against a
        // listing older than what that reconcile saw (it may have created what the listing
        // misses): that reconcile has the last word, the next resync judges the row again.
        let claims = self.claim(work, Some(snapshot.taken_at), true);
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
        let dispatched = self.enqueue(&term, Lane::Bulk, jobs, offered, converged);
        self.metrics.pass_finished("resync", started.elapsed());
        Ok(dispatched)
    }

    /// Resources labelled by the scheme before installation ids (our instance label, no
    /// installation label) join the snapshot where exactly one row of this database records
    /// their id: their labels are then repaired like any drift, nothing is recreated. All
    /// others are left alone (another database's, or nobody's): reported, never changed.
    async fn adopt_legacy(
        &self,
        snapshot: &mut Snapshot,
        recorded: &[RecordedIds],
    ) -> Result<(), ReconcileError> {
        let owner = &self.reconciler.owner;
        let legacy = observe::observe(&self.reconciler.api, &owner.legacy_selector()).await?;
        let claims = |kind, id| recorded.iter().filter(|r| r.get(kind) == Some(id)).count();
        let claimed = legacy.filter(|kind, id| claims(kind, id) == 1);
        let total: usize = legacy.counts().into_iter().sum();
        let adopted = claimed.servers.len() + claimed.ssh_keys.len() + claimed.firewalls.len();
        if total > 0 {
            tracing::warn!(
                adopted,
                left_alone = total - adopted,
                selector = %owner.legacy_selector(),
                "resources labelled without an installation id: the ones a row of this database records are adopted (installation label added); the rest are not this database's and are never changed"
            );
        }
        snapshot.merge(claimed);
        Ok(())
    }

    /// Snapshots taken before deletions are deleted after `snapshot_retention_days`, as of
    /// `now`. Runs while `snapshot_before_delete` is on (one listing per resync). Returns how
    /// many were deleted.
    pub async fn sweep_snapshots(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize, ReconcileError> {
        let term = self.term()?;
        self.sweep_snapshots_in(&term, now).await
    }

    async fn sweep_snapshots_in(
        &self,
        term: &Term,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<usize, ReconcileError> {
        let reconciler = &self.reconciler;
        let lifecycle = &reconciler.config.lifecycle;
        if !lifecycle.snapshot_before_delete {
            return Ok(0);
        }
        let selector = format!(
            "{},{SNAPSHOT_LABEL}={PRE_DELETE_SNAPSHOT}",
            reconciler.owner.selector()
        );
        let retention = chrono::Duration::days(
            i64::try_from(lifecycle.snapshot_retention_days).unwrap_or(i64::MAX / 86_400_000),
        );
        let mut deleted = 0;
        for image in reconciler.api.list_snapshots(&selector).await? {
            if image.created + retention > now {
                continue;
            }
            if !reconciler.leadership.holds(term) {
                return Err(ReconcileError::LostLease);
            }
            match reconciler.api.delete_image(image.id).await {
                Ok(()) => deleted += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            tracing::info!(
                image = image.id,
                created = %image.created,
                retention_days = lifecycle.snapshot_retention_days,
                "deleted a pre-deletion snapshot past its retention"
            );
        }
        Ok(deleted)
    }

    /// A listing that failed for a reason that hits every subscription (the token is
    /// rejected, Hetzner cannot be reached) is written onto the rows that wait, so the
    /// operator sees it where they look.
    async fn report_project_wide(&self, term: &Term, error: &hcloud::Error) {
        if !error.is_project_wide() {
            tracing::warn!(error = %error, "resync listing failed; nothing was changed on its account");
            return;
        }
        let message = desired::bounded(&format!("Hetzner API: {error}"), desired::MAX_ERROR_CHARS);
        tracing::warn!(error = %error, "Hetzner API fails for every subscription; recorded on the rows that wait");
        if let Err(e) = subscriptions::write_error_on_waiting(
            &self.reconciler.db,
            term.fence.as_ref(),
            &message,
        )
        .await
        {
            tracing::warn!(error = %e, "could not record the API failure on the rows");
        }
    }

    /// Rows that cannot be decoded are skipped, each reported alone (a NULL id, a BLOB where
    /// text belongs, ...); every other row goes on. Each one with an id is marked `failed`
    /// with the problem (written once, not every pass); the first 20 are logged.
    async fn report_bad_rows(&self, term: &Term, bad: &[subscriptions::BadRow]) {
        let mut reported = BTreeSet::new();
        for (i, row) in bad.iter().enumerate() {
            if i < 20 {
                let shown = row
                    .id
                    .as_deref()
                    .map_or_else(|| "<NULL id>".to_string(), |id| desired::bounded(id, 64));
                tracing::warn!(
                    subscription = %shown,
                    problem = %row.problem,
                    "skipping a subscription row that cannot be read"
                );
            }
            let message = desired::bounded(
                &format!("row cannot be read: {}", row.problem),
                desired::MAX_ERROR_CHARS,
            );
            let marked = row.provisioning_status.as_deref() == Some("failed")
                && row.provisioning_error.as_deref() == Some(message.as_str());
            if let Some(id) = &row.id
                && !marked
                && reported.insert(id.clone())
            {
                self.record_skipped(term, id, &message).await;
            }
        }
        if bad.len() > 20 {
            tracing::warn!(
                more = bad.len() - 20,
                "more subscription rows cannot be read"
            );
        }
    }

    /// Marks a row the pass skips as `failed` with `message` (best effort, fenced).
    async fn record_skipped(&self, term: &Term, id: &str, message: &str) {
        let fence = term.fence.clone();
        let update = subscriptions::StatusUpdate {
            provisioning_status: Some("failed".into()),
            provisioning_error: Some(Some(desired::bounded(message, desired::MAX_ERROR_CHARS))),
            ..Default::default()
        };
        if let Err(e) =
            subscriptions::write_status(&self.reconciler.db, fence.as_ref(), id, &update).await
        {
            tracing::debug!(subscription = %desired::shown_id(id), error = %e, "could not record the unreadable row");
        }
    }

    /// The leadership term a pass runs in: its jobs run in it or not at all.
    fn term(&self) -> Result<Term, ReconcileError> {
        self.reconciler
            .leadership
            .term()
            .ok_or(ReconcileError::LostLease)
    }

    /// Claims every entry that is free (not in flight, not waiting); the rest come back when
    /// due. `work` maps resource keys to the id to reconcile and the row version, read from
    /// the table at `read_at` (`WorkSet::try_claim`).
    fn claim(
        &self,
        work: BTreeMap<String, (String, Option<i64>)>,
        read_at: Option<Instant>,
        resync: bool,
    ) -> Vec<(Claim, Option<i64>)> {
        let now = Instant::now();
        work.into_iter()
            .filter_map(|(key, (id, version))| {
                self.work
                    .try_claim(&key, &id, version, read_at, now, resync)
                    .map(|claim| (claim, version))
            })
            .collect()
    }

    /// Queues each job and returns at once. At most `concurrency` jobs run at a time, across
    /// passes: a slow create never stalls the loop or other subscriptions.
    fn enqueue(
        &self,
        term: &Term,
        lane: Lane,
        jobs: Vec<(Claim, Job)>,
        offered: usize,
        converged: usize,
    ) -> Dispatched {
        let mut results = Vec::with_capacity(jobs.len());
        let added = jobs.len();
        for (claim, job) in jobs {
            let (result, receiver) = oneshot::channel();
            results.push(receiver);
            let queued = Queued {
                term: term.clone(),
                claim,
                job,
                result,
                lane,
                queued_at: Instant::now(),
            };
            if self.queue.push(lane, queued) {
                self.start_worker();
            }
        }
        // Once per pass, not per job: a bulk insert queues thousands.
        self.metrics
            .jobs_queued(lane.label(), added, self.queue.depth());
        Dispatched {
            offered,
            converged,
            results,
        }
    }

    /// A worker: runs queued jobs until the queue is empty.
    fn start_worker(&self) {
        let queue = Arc::clone(&self.queue);
        let reconciler = Arc::clone(&self.reconciler);
        let metrics = Arc::clone(&self.metrics);
        let stopping = self.stopping.clone();
        let statuses_stale = Arc::clone(&self.statuses_stale);
        tokio::spawn(async move {
            while let Some(queued) = queue.next() {
                let Queued {
                    term,
                    claim,
                    job,
                    result,
                    lane,
                    queued_at,
                } = queued;
                metrics.job_started(lane.label(), queued_at.elapsed(), queue.depth());
                // Shutting down, or the lease is gone: start nothing new. Dropping the claim
                // brings the subscription back later (or to the next leader).
                let ok = if stopping.is_cancelled() || !reconciler.leadership.holds(&term) {
                    true
                } else {
                    // A panicking reconcile counts as failed; its claim is released on unwind
                    // and this worker goes on with the next job.
                    std::panic::AssertUnwindSafe(run_job(&reconciler, &metrics, &term, claim, job))
                        .catch_unwind()
                        .await
                        .unwrap_or(false)
                };
                statuses_stale.store(true, Ordering::Relaxed);
                let _ = result.send(ok);
            }
        });
    }

    /// Counts the rows by provisioning status again for the metrics (after jobs changed them).
    async fn count_statuses(&self) {
        match subscriptions::count_by_status(&self.reconciler.db).await {
            Ok(by_status) => self.metrics.set_subscriptions(&by_status),
            Err(e) => {
                tracing::debug!(error = %e, "cannot count subscriptions by status; next time");
                self.statuses_stale.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Stops starting reconciles and waits until none is in flight, for a clean shutdown.
    async fn drain(&self) {
        self.stopping.cancel();
        self.queue.idle().await;
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
