//! One reconcile of one subscription, top to bottom:
//! row -> desired (`desired.rs`) -> observed (`observe.rs`) -> plan (`plan.rs`, pure)
//! -> execute (`execute.rs`) -> status written back on the row.

pub mod desired;
pub mod execute;
pub mod keycheck;
pub mod observe;
pub mod plan;
pub mod report;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sea_orm::DatabaseConnection;

use crate::config::Config;
use crate::db::DbError;
use crate::db::entities::subscription;
use crate::db::events::{self, EventKind};
use crate::db::subscriptions::{self, StatusUpdate};
use crate::fencing::{Leadership, Term};
use crate::hcloud::{self, HcloudApi};
use crate::keys::Sealer;
use crate::ssh::bootstrapper::{Context as BootstrapContext, Job as BootstrapJob};
use crate::ssh::{BootstrapState, Bootstrapper, SshError};
use crate::telemetry::metrics::Metrics;

use desired::{Desired, MAX_ERROR_CHARS, Owner, Want};
use execute::{Executor, Progress};
use keycheck::KeyChecks;
use observe::{Observed, RecordedIds, Snapshot};
use plan::{KeyState, Kind, Op, Outcome, Plan, RowState};

/// Why a reconcile did not complete. Knows whether retrying can help and its metric label.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Hetzner API: {0}")]
    Api(hcloud::Error),
    #[error("database: {0}")]
    Db(DbError),
    #[error("SSH key: {0}")]
    Key(#[from] crate::keys::KeyError),
    #[error("sealed private key: {0}")]
    Seal(#[from] crate::keys::SealError),
    #[error("cloud-init: {0}")]
    CloudInit(#[from] crate::cloud_init::CloudInitError),
    #[error("{0}")]
    ForeignResource(String),
    /// The deletion guard refused a server deletion: past the hourly budget, or paused until
    /// an operator approves. Creating and repairing go on.
    #[error("{0}")]
    DeletionsPaused(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error("lost the leader lease; another replica takes over")]
    LostLease,
    /// The server runs but is not bootstrapped: shown on the row and retried, except for a
    /// host key mismatch, which stops the subscription.
    #[error("bootstrap over SSH: {0}")]
    Bootstrap(SshError),
}

impl From<hcloud::Error> for ReconcileError {
    fn from(error: hcloud::Error) -> Self {
        match error {
            // A write the client's gate held back: this replica's term is over.
            hcloud::Error::NotLeading => ReconcileError::LostLease,
            error => ReconcileError::Api(error),
        }
    }
}

impl From<DbError> for ReconcileError {
    fn from(error: DbError) -> Self {
        match error {
            // A fenced write refused: this replica's term is over.
            DbError::LeaseLost => ReconcileError::LostLease,
            error => ReconcileError::Db(error),
        }
    }
}

impl ReconcileError {
    /// Terminal errors are written to the row and not retried until the row changes.
    pub fn is_terminal(&self) -> bool {
        match self {
            // A rejected token or an unreachable API is not this row's fault: shown on the
            // row, retried with backoff, cured by fixing the token without touching rows.
            ReconcileError::Api(e) => e.is_terminal() && !e.is_project_wide(),
            ReconcileError::CloudInit(_) | ReconcileError::ForeignResource(_) => true,
            ReconcileError::Seal(_) => true,
            ReconcileError::Bootstrap(e) => e.is_terminal(),
            ReconcileError::Db(_)
            | ReconcileError::Key(_)
            | ReconcileError::Internal(_)
            | ReconcileError::DeletionsPaused(_)
            | ReconcileError::LostLease => false,
        }
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Api(e) => e.metric_label(),
            ReconcileError::Db(_) => "database",
            ReconcileError::Key(_) => "key_generation",
            ReconcileError::Seal(_) => "sealing",
            ReconcileError::CloudInit(_) => "cloud_init",
            ReconcileError::ForeignResource(_) => "foreign_resource",
            ReconcileError::DeletionsPaused(_) => "deletions_paused",
            ReconcileError::Internal(_) => "internal",
            ReconcileError::LostLease => "lost_lease",
            ReconcileError::Bootstrap(e) => e.metric_label(),
        }
    }
}

/// Shared, read-only inputs of every reconcile.
pub struct Reconciler<A: HcloudApi> {
    pub api: A,
    pub db: DatabaseConnection,
    pub sealer: Sealer,
    pub config: Config,
    /// This database's installation id and the instance name: what our labels say.
    pub owner: Owner,
    /// Upper bound for waiting on Hetzner actions (create, power on, delete).
    pub action_timeout: Duration,
    /// Reconciles run only inside a leadership term, and are cancelled when it ends.
    pub leadership: Leadership,
    /// Key pairs already opened and checked since this process started.
    pub key_checks: KeyChecks,
    /// Drift repairs and orphan deletions are counted here.
    pub metrics: Arc<Metrics>,
    /// Runs the SSH bootstraps that a new server's `ready` waits for.
    pub bootstrapper: Arc<Bootstrapper>,
}

/// What a reconcile of a row would do, judged without doing it (`Reconciler::verdict`).
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Nothing: no request, no write.
    Converged,
    /// Nothing now; the wish changes by itself after this long (a grace period or a deletion
    /// delay ends): look again then.
    Recheck(Duration),
    /// Something: reconcile it.
    Work,
}

/// How a reconcile ended, for the controller's queue.
#[derive(Clone, Debug, PartialEq)]
pub enum Done {
    /// Converged (or terminally failed and recorded): wait for the next change or resync.
    Settled,
    /// Hetzner is still busy with it: look again after this delay.
    Requeue(Duration),
    /// Converged; the wish changes by itself after this long (a grace period or a deletion
    /// delay ends): look again then.
    Recheck(Duration),
}

/// How soon to look again at a subscription whose server is still starting.
const PROVISIONING_RECHECK: Duration = Duration::from_secs(2);
/// How soon to look again at a subscription whose server deletion the guard refused.
const DELETION_PAUSED_RECHECK: Duration = Duration::from_secs(30);

impl<A: HcloudApi> Reconciler<A> {
    /// Reconciles one subscription. `snapshot` is a fresh enough view of everything we own;
    /// without one, this subscription's resources are listed by label. Runs only inside the
    /// current leadership term and stops at once (no further call, no write) when it ends.
    pub async fn reconcile(
        &self,
        term: &Term,
        subscription_id: &str,
        snapshot: Option<&Snapshot>,
    ) -> Result<Done, ReconcileError> {
        if !self.leadership.holds(term) {
            return Err(ReconcileError::LostLease);
        }
        tokio::select! {
            biased;
            _ = self.leadership.ended(term) => Err(ReconcileError::LostLease),
            done = self.reconcile_in(term, subscription_id, snapshot) => done,
        }
    }

    /// Whether a reconcile of `row` against `snapshot` would do anything: call Hetzner, write
    /// the row, or look again later. Pure (no request, no query; the key check is the cached
    /// one), and the same steps as `reconcile`, so the resync reconciles only what it must:
    /// a converged row costs no query, no task and no write.
    pub fn verdict(
        &self,
        row: &subscription::Model,
        snapshot: &Snapshot,
        now: chrono::DateTime<Utc>,
    ) -> Verdict {
        let desired = desired::desired_for_row(&self.config, &self.owner, row, now);
        let mut row_state = row_state(row);
        let observed = if acts(&desired, &row_state) {
            let name = desired::resource_name(&self.config, &row.id);
            let recorded = recorded_ids(Some(row));
            let observed = snapshot.for_subscription(&desired.key, &name, &recorded);
            // A recorded resource the listing did not show is fetched by id: work.
            fn shown<T: observe::Resource>(id: Option<i64>, seen: &[T]) -> bool {
                id.is_none_or(|id| seen.iter().any(|r| r.id() == id))
            }
            if !shown(recorded.server, &observed.servers)
                || !shown(recorded.ssh_key, &observed.ssh_keys)
                || !shown(recorded.firewall, &observed.firewalls)
            {
                return Verdict::Work;
            }
            observed
        } else {
            Observed::default()
        };
        if matches!(desired.want, Want::Vps(_)) {
            row_state.key = self.key_checks.check(&self.sealer, row, false);
        }
        let plan = plan::plan(&desired, &row_state, &observed);
        if !plan.ops.is_empty() {
            return Verdict::Work;
        }
        let progress = progress_before(&desired, &row_state, &observed, &plan);
        let ready_server = ready_server(Some(row));
        let gate = match self.bootstrap_gate(row, &row_state, ready_server, &plan, &progress) {
            // Not started (since this process started) or failed: the reconcile starts it
            // or reports the failure.
            Some((_, BootstrapState::NotStarted | BootstrapState::Failed(_))) => {
                return Verdict::Work;
            }
            Some((_, BootstrapState::Running)) => Gate::Waiting,
            Some((_, BootstrapState::Done)) | None => Gate::Open,
        };
        let context = Settle {
            desired: &desired,
            row_state: &row_state,
            ready_server,
            plan: &plan,
            adopting: observed.adopting,
            gate,
        };
        match settlement(&context, Some(row), &progress) {
            Some(s) if s.update.is_empty() && s.done == Done::Settled => {
                match desired.recheck_after {
                    Some(after) => Verdict::Recheck(after),
                    None => Verdict::Converged,
                }
            }
            _ => Verdict::Work,
        }
    }

    async fn reconcile_in(
        &self,
        term: &Term,
        subscription_id: &str,
        snapshot: Option<&Snapshot>,
    ) -> Result<Done, ReconcileError> {
        // 1. Desired state, from the row as it is now.
        let row = subscriptions::get(&self.db, subscription_id).await?;
        let desired = match &row {
            Some(row) => desired::desired_for_row(&self.config, &self.owner, row, Utc::now()),
            None => desired::desired_for_missing_row(
                &self.config,
                subscription_id,
                &desired::resource_key(subscription_id),
            ),
        };
        let mut row_state = row.as_ref().map(row_state).unwrap_or_default();

        // 2. What exists (not needed, and not asked, for a row that is held or cannot be
        //    acted on). A failure to observe is recorded on the row like any other.
        let observed = match self
            .observe(&desired, &row_state, row.as_ref(), snapshot)
            .await
        {
            Ok(observed) => observed,
            Err(error) => return self.failed(term, &desired, row.as_ref(), error).await,
        };
        if let Some(row) = &row
            && matches!(desired.want, Want::Vps(_))
        {
            row_state.key = self.key_checks.check(&self.sealer, row, false);
        }

        // 3. The plan (pure). A plan that changes anything re-checks the key pair first, not
        //    trusting the check cached since start.
        let mut plan = plan::plan(&desired, &row_state, &observed);
        if let Some(row) = &row
            && plan.has_changes()
            && matches!(desired.want, Want::Vps(_))
        {
            let fresh = self.key_checks.check(&self.sealer, row, true);
            if fresh != row_state.key {
                row_state.key = fresh;
                plan = plan::plan(&desired, &row_state, &observed);
            }
        }

        // 4. Carry it out, then 5. write what was observed back onto the row.
        let result = self
            .execute(term, &desired, &row_state, &observed, &plan)
            .await;
        // The server the row was ready with before this pass: repairing its firewall or key is
        // not a new provisioning, a new server is.
        let ready_server = ready_server(row.as_ref());
        // The executor records ids as it goes: compare the outcome with the row as it is now.
        let row = match (&row, plan.ops.is_empty()) {
            (Some(_), false) => subscriptions::get(&self.db, subscription_id).await?,
            _ => row,
        };
        match result {
            Ok(progress) => {
                let recheck = desired.recheck_after;
                if plan.outcome != Outcome::Ready {
                    // No longer wants a running server (suspended, canceled, deleted): a
                    // bootstrap still under way, or its outcome, is of no use.
                    self.bootstrapper.forget(&desired.subscription_id);
                }
                let gate = match row.as_ref().and_then(|row| {
                    self.bootstrap_gate(row, &row_state, ready_server, &plan, &progress)
                        .map(|gate| (row, gate))
                }) {
                    None | Some((_, (_, BootstrapState::Done))) => Gate::Open,
                    Some((_, (_, BootstrapState::Running))) => Gate::Waiting,
                    Some((row, (server, BootstrapState::NotStarted))) => {
                        match self.start_bootstrap(term, &desired, row, server) {
                            Ok(()) => Gate::Waiting,
                            Err(error) => {
                                return self.failed(term, &desired, Some(row), error).await;
                            }
                        }
                    }
                    Some((row, (_, BootstrapState::Failed(error)))) => {
                        // Only a host key mismatch ends a bootstrap (the bootstrapper retries
                        // everything else): reported once, terminal.
                        self.bootstrapper.forget(&row.id);
                        return self
                            .failed(term, &desired, Some(row), ReconcileError::Bootstrap(error))
                            .await;
                    }
                };
                let context = Settle {
                    desired: &desired,
                    row_state: &row_state,
                    ready_server,
                    plan: &plan,
                    adopting: observed.adopting,
                    gate,
                };
                match (
                    self.settle(term, context, row.as_ref(), progress).await?,
                    recheck,
                ) {
                    (Done::Settled, Some(after)) => Ok(Done::Recheck(after)),
                    (done, _) => Ok(done),
                }
            }
            Err(error) => self.failed(term, &desired, row.as_ref(), error).await,
        }
    }

    /// What exists for `desired`: from the snapshot, or listed by its labels; plus what the
    /// row records by id when that does not carry our labels (adoption of what the web app
    /// created, resources labelled before installation ids).
    async fn observe(
        &self,
        desired: &Desired,
        row_state: &RowState,
        row: Option<&subscription::Model>,
        snapshot: Option<&Snapshot>,
    ) -> Result<Observed, ReconcileError> {
        if !acts(desired, row_state) {
            return Ok(Observed::default());
        }
        let name = desired::resource_name(&self.config, &desired.subscription_id);
        let recorded = recorded_ids(row);
        let mut observed = match snapshot {
            Some(snapshot) => snapshot.for_subscription(&desired.key, &name, &recorded),
            None => {
                let selector = self.owner.subscription_selector(&desired.key);
                // Resources whose subscription label was removed are matched by name in
                // the next full pass, which lists everything we own anyway.
                observe::observe(&self.api, &selector)
                    .await?
                    .for_subscription(&desired.key, &name, &recorded)
            }
        };
        // What the row records but the listing did not show (labels of an earlier scheme,
        // created by the web app, or deleted at Hetzner) is fetched by id and judged.
        let get_server = |id| self.api.get_server(id);
        match self
            .fetch_recorded(
                desired,
                Kind::Server,
                recorded.server,
                &observed.servers,
                get_server,
            )
            .await?
        {
            Recorded::Taken(server) => {
                observed.adopting |= !self.owner.owns(&server.labels);
                observed.servers.push(server);
            }
            Recorded::Gone(id)
                if matches!(desired.want, Want::Vps(_)) && desired.version.is_some() =>
            {
                let next = match &desired.want {
                    Want::Vps(spec) if spec.suspended => {
                        "nothing is created while the subscription is suspended"
                    }
                    _ => "provisioning a new one",
                };
                let message =
                    format!("server {id} recorded on the row does not exist at Hetzner; {next}");
                tracing::warn!(subscription = %desired::shown_id(&desired.subscription_id), "{message}");
                events::record(
                    &self.db,
                    &desired.subscription_id,
                    EventKind::Warning,
                    "RecordedServerGone",
                    &message,
                )
                .await?;
            }
            _ => {}
        }
        let get_key = |id| self.api.get_ssh_key(id);
        if let Recorded::Taken(key) = self
            .fetch_recorded(
                desired,
                Kind::SshKey,
                recorded.ssh_key,
                &observed.ssh_keys,
                get_key,
            )
            .await?
        {
            observed.ssh_keys.push(key);
        }
        let get_firewall = |id| self.api.get_firewall(id);
        if let Recorded::Taken(firewall) = self
            .fetch_recorded(
                desired,
                Kind::Firewall,
                recorded.firewall,
                &observed.firewalls,
                get_firewall,
            )
            .await?
        {
            observed.firewalls.push(firewall);
        }
        Ok(observed)
    }

    /// Fetches the resource the row records as `id` when the listing did not show it, and
    /// judges it (`judge_recorded`). Only `not_found` means it is gone.
    async fn fetch_recorded<T, F, Fut>(
        &self,
        desired: &Desired,
        kind: Kind,
        id: Option<i64>,
        seen: &[T],
        get: F,
    ) -> Result<Recorded<T>, ReconcileError>
    where
        T: observe::Resource,
        F: FnOnce(i64) -> Fut,
        Fut: std::future::Future<Output = Result<T, hcloud::Error>>,
    {
        let Some(id) = id.filter(|id| !seen.iter().any(|r| r.id() == *id)) else {
            return Ok(Recorded::Seen);
        };
        match get(id).await {
            Ok(resource) => Ok(
                if self
                    .judge_recorded(desired, kind, id, resource.labels())
                    .await?
                {
                    Recorded::Taken(resource)
                } else {
                    Recorded::Left
                },
            ),
            Err(e) if e.is_not_found() => Ok(Recorded::Gone(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a resource the row records (fetched by id, not found by our labels) belongs to
    /// this subscription. Another installation's, another subscription's, or one that two rows
    /// record is never taken: the row fails and says whose it is. One without any label of
    /// ours (created by the web app) is adopted while the row wants a server, but never
    /// deleted: only what this installation adopted or created is ever deleted.
    async fn judge_recorded(
        &self,
        desired: &Desired,
        kind: Kind,
        id: i64,
        labels: &crate::hcloud::Labels,
    ) -> Result<bool, ReconcileError> {
        let what = format!("{} {id} recorded on the row", kind.noun());
        if self.owner.foreign(labels) {
            return Err(ReconcileError::ForeignResource(format!(
                "{what} belongs to another installation (label {}={}); this controller never changes it",
                desired::INSTALLATION_LABEL,
                desired::bounded(
                    labels
                        .get(desired::INSTALLATION_LABEL)
                        .map_or("", String::as_str),
                    64
                )
            )));
        }
        if self.owner.owns(labels) {
            return match labels.get(desired::SUBSCRIPTION_LABEL) {
                Some(key) if *key != desired.key => Err(ReconcileError::ForeignResource(format!(
                    "{what} belongs to subscription key {:?} of this installation; two subscriptions never share a resource",
                    desired::bounded(key, 64)
                ))),
                _ => Ok(true),
            };
        }
        let column = match kind {
            Kind::Server => subscriptions::RecordedColumn::Server,
            Kind::SshKey => subscriptions::RecordedColumn::SshKey,
            Kind::Firewall => subscriptions::RecordedColumn::Firewall,
        };
        let others =
            subscriptions::recorded_elsewhere(&self.db, column, id, &desired.subscription_id)
                .await?;
        if !others.is_empty() {
            return Err(ReconcileError::ForeignResource(format!(
                "{what} is also recorded on subscription {}; two subscriptions never share a resource: clear the id on the row that does not own it",
                others
                    .iter()
                    .map(|o| format!("{:?}", desired::bounded(o, 64)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let legacy = labels.get(desired::INSTANCE_LABEL) == Some(&self.owner.instance);
        match (&desired.want, kind) {
            (Want::Vps(_), _) => Ok(true),
            // Labelled by this controller before installation ids, and recorded on this row
            // alone: ours to tear down.
            (_, _) if legacy => Ok(true),
            (_, Kind::Server) => Err(ReconcileError::ForeignResource(format!(
                "{what} was never adopted by this controller (it carries no label of this installation), so it is not deleted; delete it in the Hetzner console, or give the row a `run` status first to adopt it"
            ))),
            // The web app's key object or firewall: left as it is.
            _ => Ok(false),
        }
    }

    /// Same as `reconcile` for a subscription known only from resource labels (an orphan
    /// whose id cannot be recovered from its key) or unlabelled strays: delete them.
    pub async fn delete_orphans(
        &self,
        term: &Term,
        key: &str,
        observed: &Observed,
    ) -> Result<(), ReconcileError> {
        if !self.leadership.holds(term) {
            return Err(ReconcileError::LostLease);
        }
        let desired = desired::desired_for_missing_row(&self.config, key, key);
        let row = RowState::default();
        let plan = plan::plan(&desired, &row, observed);
        let work = self.execute(term, &desired, &row, observed, &plan);
        tokio::select! {
            biased;
            _ = self.leadership.ended(term) => Err(ReconcileError::LostLease),
            result = work => {
                result?;
                for op in &plan.ops {
                    if let Some(kind) = op.deletes() {
                        self.metrics.orphan_deleted(kind.as_str());
                    }
                }
                Ok(())
            }
        }
    }

    /// The server a `ready` would be for, and where its bootstrap stands; `None` when `ready`
    /// does not wait for one: SSH is off, the plan does not end `ready`, the row is already
    /// `ready` with this server (a repair), or the controller cannot log in (a key pair it
    /// did not seal, or a server without IPv4).
    fn bootstrap_gate<'p>(
        &self,
        row: &subscription::Model,
        row_state: &RowState,
        ready_server: Option<i64>,
        plan: &Plan,
        progress: &'p Progress,
    ) -> Option<(&'p hcloud::Server, BootstrapState)> {
        // The key as the row holds it now: a pass that generated the pair started with none.
        let key_sealed_here = keycheck::sealed_by_controller(row).is_some()
            && !matches!(row_state.key, KeyState::External | KeyState::Unusable(_));
        if !self.bootstrapper.enabled()
            || plan.outcome != Outcome::Ready
            || progress.needs_another_look
            || !key_sealed_here
            || !newly_ready(row, ready_server, progress)
        {
            return None;
        }
        let server = progress.server.as_ref()?;
        server.public_net.ipv4.as_ref()?;
        Some((server, self.bootstrapper.state(&row.id, server.id)))
    }

    /// Starts the bootstrap of `server` with the row's key and pinned host key.
    fn start_bootstrap(
        &self,
        term: &Term,
        desired: &Desired,
        row: &subscription::Model,
        server: &hcloud::Server,
    ) -> Result<(), ReconcileError> {
        let sealed = keycheck::sealed_by_controller(row)
            .ok_or_else(|| ReconcileError::Internal("no private key to log in with".into()))?;
        let private_key = self.sealer.open(sealed, &row.id)?;
        let address = server
            .public_net
            .ipv4
            .as_ref()
            .map(|ip| ip.ip.as_str())
            .unwrap_or_default();
        let address = address.parse().map_err(|_| {
            ReconcileError::Bootstrap(SshError::Connect(format!(
                "the server's IPv4 {:?} is not an address",
                desired::bounded(address, 64)
            )))
        })?;
        let bootstrap = match &desired.want {
            Want::Vps(spec) => spec.plan.bootstrap.clone(),
            _ => None,
        };
        tracing::info!(subscription = %desired::shown_id(&row.id), server = server.id, "server running; bootstrap over SSH started");
        self.bootstrapper.start(
            BootstrapContext {
                db: self.db.clone(),
                leadership: self.leadership.clone(),
                term: term.clone(),
            },
            BootstrapJob {
                subscription_id: row.id.clone(),
                server_id: server.id,
                address,
                private_key,
                host_key: row.ssh_host_key.clone(),
                bootstrap,
            },
        );
        Ok(())
    }

    async fn execute(
        &self,
        term: &Term,
        desired: &Desired,
        row: &RowState,
        observed: &Observed,
        plan: &Plan,
    ) -> Result<Progress, ReconcileError> {
        let spec = match &desired.want {
            Want::Vps(spec) => Some(spec.as_ref()),
            _ => None,
        };
        let mut progress = progress_before(desired, row, observed, plan);
        if plan.ops.is_empty() {
            return Ok(progress);
        }
        let executor = Executor {
            api: &self.api,
            db: &self.db,
            sealer: &self.sealer,
            key_checks: &self.key_checks,
            config: &self.config,
            owner: &self.owner,
            action_timeout: self.action_timeout,
            leadership: &self.leadership,
            term,
        };
        let tears_down = plan.ops.iter().any(|op| {
            matches!(
                op,
                Op::DeleteServer { .. } | Op::DeleteFirewall { .. } | Op::DeleteSshKey { .. }
            )
        });
        if spec.is_none() && tears_down && progress.row_exists {
            let update = StatusUpdate {
                provisioning_status: Some("deprovisioning".into()),
                ..Default::default()
            };
            subscriptions::write_status(
                &self.db,
                term.fence.as_ref(),
                &desired.subscription_id,
                &update,
            )
            .await?;
        }
        executor.run(spec, &plan.ops, &mut progress).await?;
        if spec.is_some() {
            for op in &plan.ops {
                if let Some(kind) = op.repairs_drift() {
                    self.metrics.drift_repaired(kind.as_str());
                }
            }
        }
        Ok(progress)
    }

    /// Writes the outcome onto the row, only the columns that differ (a converged
    /// subscription costs no write).
    async fn settle(
        &self,
        term: &Term,
        context: Settle<'_>,
        row: Option<&subscription::Model>,
        progress: Progress,
    ) -> Result<Done, ReconcileError> {
        let (
            Some(row),
            Some(Settlement {
                update,
                done,
                newly_ready,
            }),
        ) = (row, settlement(&context, row, &progress))
        else {
            return Ok(Done::Settled);
        };
        let plan = context.plan;
        if !update.is_empty() {
            let milestone = match update.provisioning_status.as_deref() {
                Some("ready") if newly_ready => Some((EventKind::Normal, "Ready")),
                Some("deprovisioned") => Some((EventKind::Normal, "Deprovisioned")),
                Some("suspended") => Some((EventKind::Normal, "Suspended")),
                Some("held") => Some((EventKind::Warning, "Held")),
                Some("failed") => Some((EventKind::Warning, "Failed")),
                _ => None,
            };
            if let Some((kind, reason)) = milestone {
                let message = match (&plan.outcome, &progress.server) {
                    (Outcome::Failed(message) | Outcome::Held(message), _) => {
                        desired::bounded(message, MAX_ERROR_CHARS)
                    }
                    (Outcome::Ready, Some(server)) => format!(
                        "server {} ({}) running at {}",
                        server.id,
                        server.name,
                        update
                            .vps_ip_address
                            .clone()
                            .flatten()
                            .unwrap_or_else(|| "-".into())
                    ),
                    (Outcome::Suspended { .. }, Some(server)) => format!(
                        "server {} powered off and kept (status {:?})",
                        server.id,
                        row.status.as_deref().unwrap_or("NULL")
                    ),
                    (Outcome::Suspended { .. }, None) => format!(
                        "nothing running (status {:?}); nothing is created while suspended",
                        row.status.as_deref().unwrap_or("NULL")
                    ),
                    // Canceled before anything was created, or deleted at Hetzner by hand.
                    (Outcome::Deprovisioned, _)
                        if !plan.ops.iter().any(|op| op.deletes().is_some()) =>
                    {
                        "nothing to delete: no server, SSH key or firewall of this subscription exists"
                            .to_string()
                    }
                    _ => "all resources deleted".to_string(),
                };
                match kind {
                    EventKind::Normal => {
                        tracing::info!(subscription = %desired::shown_id(&row.id), reason, "{message}")
                    }
                    EventKind::Warning => {
                        tracing::warn!(subscription = %desired::shown_id(&row.id), reason, "{message}")
                    }
                }
                events::record(&self.db, &row.id, kind, reason, &message).await?;
            }
            subscriptions::write_status(&self.db, term.fence.as_ref(), &row.id, &update).await?;
            if update.provisioning_status.as_deref() == Some("ready") {
                self.bootstrapper.forget(&row.id);
            }
        }
        Ok(done)
    }

    /// Records a failed reconcile on the row (and as an event). Terminal errors settle the
    /// row until it changes; others are retried with backoff.
    async fn failed(
        &self,
        term: &Term,
        desired: &Desired,
        row: Option<&subscription::Model>,
        error: ReconcileError,
    ) -> Result<Done, ReconcileError> {
        // Not ours to record any more: the new leader looks at this row.
        if matches!(error, ReconcileError::LostLease) {
            return Err(error);
        }
        let message = desired::bounded(&error.to_string(), MAX_ERROR_CHARS);
        tracing::warn!(subscription = %desired::shown_id(&desired.subscription_id), error = %message, terminal = error.is_terminal(), "reconcile failed");
        let reason = match &error {
            ReconcileError::DeletionsPaused(_) => "DeletionsPaused",
            ReconcileError::Bootstrap(SshError::HostKeyMismatch { .. }) => "HostKeyMismatch",
            e if e.is_terminal() => "Failed",
            _ => "Retrying",
        };
        // The same refusal every 30 s is one event, not hundreds.
        let latest = events::recent(&self.db, Some(&desired.subscription_id), 1).await?;
        if !latest
            .first()
            .is_some_and(|e| e.reason == reason && e.message == message)
        {
            events::record(
                &self.db,
                &desired.subscription_id,
                EventKind::Warning,
                reason,
                &message,
            )
            .await?;
        }
        if let (Some(row), Some(version)) = (row, desired.version) {
            let mut update = StatusUpdate {
                provisioning_error: Some(Some(message)),
                ..Default::default()
            };
            if error.is_terminal() {
                update.provisioning_status = Some("failed".into());
                update.observed_version = Some(version);
            }
            let update = only_changes(row, update);
            if !update.is_empty() {
                subscriptions::write_status(&self.db, term.fence.as_ref(), &row.id, &update)
                    .await?;
            }
        }
        match error {
            ReconcileError::DeletionsPaused(_) => Ok(Done::Requeue(DELETION_PAUSED_RECHECK)),
            e if e.is_terminal() => Ok(Done::Settled),
            e => Err(e),
        }
    }
}

/// What a reconcile writes onto the row and how it ends, given what it did: only the
/// columns that differ from `row`. `None` without a row to write to.
fn settlement(
    context: &Settle<'_>,
    row: Option<&subscription::Model>,
    progress: &Progress,
) -> Option<Settlement> {
    let Settle {
        desired,
        row_state,
        ready_server,
        plan,
        adopting,
        gate,
    } = *context;
    let (Some(row), Some(version)) = (row, desired.version) else {
        return None;
    };
    let newly_ready = newly_ready(row, ready_server, progress);
    let mut done = Done::Settled;
    let mut update = StatusUpdate::default();
    let record_ids = |update: &mut StatusUpdate| {
        let server = progress.server.as_ref();
        update.hetzner_server_id = Some(server.map(|s| s.id));
        update.hetzner_ssh_key_id = Some(progress.ssh_key_id);
        update.hetzner_firewall_id = Some(progress.firewall_id);
        update.vps_ip_address = Some(
            server
                .and_then(|s| s.public_net.ipv4.as_ref())
                .map(|ip| ip.ip.clone()),
        );
        update.vps_hostname = Some(server.map(|s| s.name.clone()));
    };
    match &plan.outcome {
        Outcome::Ready if progress.needs_another_look => {
            update.provisioning_status = Some("provisioning".into());
            done = Done::Requeue(PROVISIONING_RECHECK);
        }
        // Running at Hetzner, bootstrap under way: the bootstrapper asks for another look
        // when it ends, so this pass is finished (no change pass picks the row up meanwhile,
        // which would list its resources every second). The address is shown already.
        Outcome::Ready if gate == Gate::Waiting => {
            update.provisioning_status = Some("provisioning".into());
            record_ids(&mut update);
            update.observed_version = Some(version);
        }
        Outcome::Ready => {
            update.provisioning_status = Some("ready".into());
            update.provisioning_error = Some(None);
            record_ids(&mut update);
            if newly_ready {
                update.provisioned_at = Some(Some(Utc::now()));
            }
            update.deprovisioned_at = Some(None);
            update.observed_version = Some(version);
        }
        Outcome::Provisioning => {
            update.provisioning_status = Some("provisioning".into());
            update.hetzner_server_id = Some(progress.server.as_ref().map(|s| s.id));
            done = Done::Requeue(PROVISIONING_RECHECK);
        }
        Outcome::Suspended { settled } => {
            update.provisioning_status = Some("suspended".into());
            update.provisioning_error = Some(None);
            // What exists, also when the server does not: an id Hetzner answered not_found
            // for is cleared, else every resync would look it up (and record its absence)
            // again.
            record_ids(&mut update);
            if *settled {
                update.observed_version = Some(version);
            } else {
                done = Done::Requeue(PROVISIONING_RECHECK);
            }
        }
        Outcome::Held(reason) => {
            update.provisioning_status = Some("held".into());
            update.provisioning_error = Some(Some(desired::bounded(reason, MAX_ERROR_CHARS)));
            update.observed_version = Some(version);
        }
        Outcome::Deprovisioned => {
            update.provisioning_status = Some("deprovisioned".into());
            update.provisioning_error = Some(None);
            update.hetzner_server_id = Some(None);
            update.hetzner_ssh_key_id = Some(None);
            update.hetzner_firewall_id = Some(None);
            update.vps_ip_address = Some(None);
            update.vps_hostname = Some(None);
            // Only a key pair we sealed is ours to remove; an external one stays.
            let external = row.ssh_key_origin.as_deref() == Some("external")
                || row
                    .ssh_private_key
                    .as_deref()
                    .is_some_and(|key| !Sealer::looks_sealed(key));
            if !external {
                update.ssh_private_key = Some(None);
                update.ssh_public_key = Some(None);
            }
            update.ssh_host_key = Some(None);
            if row.deprovisioned_at.is_none() || row.provisioning_status != "deprovisioned" {
                update.deprovisioned_at = Some(Some(Utc::now()));
            }
            update.observed_version = Some(version);
        }
        Outcome::Unchanged => update.observed_version = Some(version),
        Outcome::Failed(message) => {
            update.provisioning_status = Some("failed".into());
            update.provisioning_error = Some(Some(desired::bounded(message, MAX_ERROR_CHARS)));
            update.observed_version = Some(version);
        }
    }
    // Adopting a server whose key pair the controller cannot open (or has none): the key
    // is the web app's, kept as it is and never replaced.
    if matches!(plan.outcome, Outcome::Ready | Outcome::Suspended { .. })
        && (row_state.key == KeyState::External || (adopting && row_state.key == KeyState::Missing))
    {
        update.ssh_key_origin = Some(Some("external".into()));
    }
    Some(Settlement {
        update: only_changes(row, update),
        done,
        newly_ready,
    })
}

/// Whether a `ready` now would be a new provisioning (not a repair of a row `ready` with the
/// same server).
fn newly_ready(row: &subscription::Model, ready_server: Option<i64>, progress: &Progress) -> bool {
    row.provisioned_at.is_none()
        || ready_server.is_none()
        || ready_server != progress.server.as_ref().map(|s| s.id)
}

/// Whether `ready` waits for the bootstrap (see `Reconciler::bootstrap_gate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    /// Nothing to wait for: SSH is off, the server is not new, or its bootstrap is done.
    Open,
    /// The bootstrap runs (or is starting): the row stays `provisioning`.
    Waiting,
}

/// See `settlement`.
struct Settlement {
    update: StatusUpdate,
    done: Done,
    newly_ready: bool,
}

/// The progress of a reconcile before its first op: what the plan keeps.
fn progress_before(
    desired: &Desired,
    row: &RowState,
    observed: &Observed,
    plan: &Plan,
) -> Progress {
    let kept_key = plan
        .keep
        .ssh_key
        .and_then(|id| observed.ssh_keys.iter().find(|k| k.id == id));
    Progress {
        subscription_id: desired.subscription_id.clone(),
        key: desired.key.clone(),
        row_exists: desired.version.is_some(),
        // An external key pair has no public key on the row: the key object's is the one.
        public_key: row
            .public_key
            .clone()
            .or_else(|| kept_key.map(|k| k.public_key.clone())),
        ssh_key_id: plan.keep.ssh_key,
        firewall_id: plan.keep.firewall,
        server: plan
            .keep
            .server
            .and_then(|id| observed.servers.iter().find(|s| s.id == id).cloned()),
        status_since: row.status_since,
        ..Default::default()
    }
}

/// The server a row was `ready` with: repairing its firewall or key is not a new
/// provisioning, a new server is.
fn ready_server(row: Option<&subscription::Model>) -> Option<i64> {
    row.filter(|r| r.provisioning_status == "ready")
        .and_then(|r| r.hetzner_server_id)
}

/// Whether the reconcile looks at Hetzner at all: not for a row that is held, invalid, or
/// failed terminally (until it changes).
fn acts(desired: &Desired, row_state: &RowState) -> bool {
    match &desired.want {
        Want::Invalid(_) | Want::Hold(_) => false,
        Want::Vps(_) | Want::Nothing => row_state.terminal_error.is_none(),
    }
}

/// What became of a resource the row records, after `fetch_recorded`.
enum Recorded<T> {
    /// None recorded, or the listing showed it already.
    Seen,
    /// `not_found` at Hetzner.
    Gone(i64),
    /// Exists but is not this subscription's to take (the web app's key or firewall).
    Left,
    /// Belongs to this subscription: add it to what was observed.
    Taken(T),
}

/// What `settle` needs besides the row and the progress.
#[derive(Clone, Copy)]
struct Settle<'a> {
    desired: &'a Desired,
    row_state: &'a RowState,
    ready_server: Option<i64>,
    plan: &'a Plan,
    adopting: bool,
    gate: Gate,
}

/// The Hetzner ids the row records.
pub fn recorded_ids(row: Option<&subscription::Model>) -> RecordedIds {
    row.map(|r| RecordedIds {
        server: r.hetzner_server_id,
        ssh_key: r.hetzner_ssh_key_id,
        firewall: r.hetzner_firewall_id,
    })
    .unwrap_or_default()
}

/// The work key of resources we own that carry no subscription label: it cannot be a
/// resource key (which never starts with a dash), so it never stands for a row.
pub const UNATTRIBUTED: &str = "-unattributed";

/// Resources we own that no row wants: one group per subscription key without a row, plus
/// one group ("unattributed") of resources with our installation label but neither a
/// subscription label nor the name of any row. `ids` are every row's id (also of rows that
/// could not be decoded: their resources are not orphans); a resource whose id any row
/// records is never unwanted. Used by the resync and by `plan`.
pub fn unwanted(
    config: &Config,
    snapshot: &Snapshot,
    ids: &[&str],
    recorded: &[RecordedIds],
) -> Vec<(String, Observed)> {
    let known_keys: BTreeSet<String> = ids.iter().map(|id| desired::resource_key(id)).collect();
    let known_names: BTreeSet<String> = ids
        .iter()
        .map(|id| desired::resource_name(config, id))
        .collect();
    let recorded: HashSet<(plan::Kind, i64)> = recorded
        .iter()
        .flat_map(|r| {
            [plan::Kind::Server, plan::Kind::SshKey, plan::Kind::Firewall]
                .into_iter()
                .filter_map(|kind| r.get(kind).map(|id| (kind, id)))
        })
        .collect();
    let is_recorded = |kind: plan::Kind, id: i64| recorded.contains(&(kind, id));
    let mut groups: Vec<(String, Observed)> = snapshot
        .subscription_keys()
        .into_iter()
        .filter(|key| !known_keys.contains(key))
        .map(|key| {
            let observed = snapshot
                .labelled(&key)
                .filter(|kind, id, _, _| !is_recorded(kind, id));
            (key, observed)
        })
        .filter(|(_, observed)| !observed.is_empty())
        .collect();
    let stray = snapshot
        .unattributed(&known_names)
        .filter(|kind, id, _, _| !is_recorded(kind, id));
    if !stray.is_empty() {
        groups.push((UNATTRIBUTED.to_string(), stray));
    }
    groups
}

pub fn row_state(row: &subscription::Model) -> RowState {
    RowState {
        provisioning_status: row.provisioning_status.clone(),
        server_id: row.hetzner_server_id,
        ssh_key_id: row.hetzner_ssh_key_id,
        firewall_id: row.hetzner_firewall_id,
        public_key: row.ssh_public_key.clone(),
        has_private_key: row.ssh_private_key.is_some(),
        // Filled in by the reconcile, which opens the key (see `keycheck`).
        key: KeyState::Missing,
        status_since: row.status_changed_at,
        terminal_error: (row.provisioning_status == "failed"
            && row.observed_version == row.desired_version)
            .then(|| row.provisioning_error.clone().unwrap_or_default()),
    }
}

/// Drops the fields of `update` that already hold the value on `row`.
fn only_changes(row: &subscription::Model, mut update: StatusUpdate) -> StatusUpdate {
    fn keep_if_differs<T: PartialEq>(field: &mut Option<T>, current: T) {
        if field.as_ref() == Some(&current) {
            *field = None;
        }
    }
    keep_if_differs(
        &mut update.provisioning_status,
        row.provisioning_status.clone(),
    );
    keep_if_differs(
        &mut update.provisioning_error,
        row.provisioning_error.clone(),
    );
    keep_if_differs(&mut update.hetzner_server_id, row.hetzner_server_id);
    keep_if_differs(&mut update.hetzner_ssh_key_id, row.hetzner_ssh_key_id);
    keep_if_differs(&mut update.hetzner_firewall_id, row.hetzner_firewall_id);
    keep_if_differs(&mut update.vps_ip_address, row.vps_ip_address.clone());
    keep_if_differs(&mut update.vps_hostname, row.vps_hostname.clone());
    keep_if_differs(&mut update.provisioned_at, row.provisioned_at);
    keep_if_differs(&mut update.deprovisioned_at, row.deprovisioned_at);
    keep_if_differs(&mut update.ssh_private_key, row.ssh_private_key.clone());
    keep_if_differs(&mut update.ssh_public_key, row.ssh_public_key.clone());
    keep_if_differs(&mut update.ssh_key_origin, row.ssh_key_origin.clone());
    keep_if_differs(&mut update.ssh_host_key, row.ssh_host_key.clone());
    keep_if_differs(&mut update.observed_version, row.observed_version);
    update
}
