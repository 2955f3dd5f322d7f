//! One reconcile of one subscription, top to bottom:
//! row -> desired (`desired.rs`) -> observed (`observe.rs`) -> plan (`plan.rs`, pure)
//! -> execute (`execute.rs`) -> status written back on the row.

pub mod desired;
pub mod execute;
pub mod observe;
pub mod plan;
pub mod report;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use sea_orm::DatabaseConnection;

use crate::config::Config;
use crate::controller::leader::Leadership;
use crate::db::DbError;
use crate::db::entities::subscription;
use crate::db::events::{self, EventKind};
use crate::db::subscriptions::{self, StatusUpdate};
use crate::hcloud::{self, HcloudApi};
use crate::keys::Sealer;

use desired::{Desired, Want};
use execute::{Executor, Progress};
use observe::{Observed, Snapshot};
use plan::{Op, Outcome, Plan, RowState};

/// Why a reconcile did not complete. Knows whether retrying can help and its metric label.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Hetzner API: {0}")]
    Api(#[from] hcloud::Error),
    #[error("database: {0}")]
    Db(#[from] DbError),
    #[error("ssh key: {0}")]
    Key(#[from] crate::keys::KeyError),
    #[error("sealed private key: {0}")]
    Seal(#[from] crate::keys::SealError),
    #[error("cloud-init: {0}")]
    CloudInit(#[from] crate::cloud_init::CloudInitError),
    #[error("{0}")]
    ForeignResource(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error("lost the leader lease; another replica takes over")]
    LostLease,
}

impl ReconcileError {
    /// Terminal errors are written to the row and not retried until the row changes.
    pub fn is_terminal(&self) -> bool {
        match self {
            ReconcileError::Api(e) => e.is_terminal(),
            ReconcileError::CloudInit(_) | ReconcileError::ForeignResource(_) => true,
            ReconcileError::Seal(_) => true,
            ReconcileError::Db(_)
            | ReconcileError::Key(_)
            | ReconcileError::Internal(_)
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
            ReconcileError::Internal(_) => "internal",
            ReconcileError::LostLease => "lost_lease",
        }
    }
}

/// Shared, read-only inputs of every reconcile.
pub struct Reconciler<A: HcloudApi> {
    pub api: A,
    pub db: DatabaseConnection,
    pub sealer: Sealer,
    pub config: Config,
    /// Upper bound for waiting on Hetzner actions (create, power on, delete).
    pub action_timeout: Duration,
    /// Checked before every operation: a replica that lost the lease stops acting.
    pub leadership: Leadership,
}

/// How a reconcile ended, for the controller's queue.
#[derive(Clone, Debug, PartialEq)]
pub enum Done {
    /// Converged (or terminally failed and recorded): wait for the next change or resync.
    Settled,
    /// Hetzner is still busy with it: look again after this delay.
    Requeue(Duration),
}

/// How soon to look again at a subscription whose server is still starting.
const PROVISIONING_RECHECK: Duration = Duration::from_secs(2);

impl<A: HcloudApi> Reconciler<A> {
    /// Reconciles one subscription. `snapshot` is a fresh enough view of everything we own;
    /// without one, this subscription's resources are listed by label.
    pub async fn reconcile(
        &self,
        subscription_id: &str,
        snapshot: Option<&Snapshot>,
    ) -> Result<Done, ReconcileError> {
        // 1. Desired state, from the row as it is now.
        let row = subscriptions::get(&self.db, subscription_id).await?;
        let desired = match &row {
            Some(row) => desired::desired_for_row(&self.config, row),
            None => desired::desired_for_missing_row(
                subscription_id,
                &desired::resource_key(subscription_id),
            ),
        };
        let row_state = row.as_ref().map(row_state).unwrap_or_default();

        // 2. What exists (not needed, and not asked, for a row that cannot be acted on).
        let name = desired::resource_name(&self.config, subscription_id);
        let acts = match &desired.want {
            Want::Invalid(_) => false,
            Want::Vps(_) => row_state.terminal_error.is_none(),
            Want::Nothing => true,
        };
        let observed = match snapshot {
            _ if !acts => Observed::default(),
            Some(snapshot) => snapshot.for_subscription(&desired.key, &name),
            None => {
                let selector = desired::subscription_selector(&self.config, &desired.key);
                // Resources whose subscription label was removed are matched by name in
                // the next full pass, which lists everything we own anyway.
                observe::observe(&self.api, &selector)
                    .await?
                    .for_subscription(&desired.key, &name)
            }
        };

        // 3. The plan (pure).
        let plan = plan::plan(&desired, &row_state, &observed);

        // 4. Carry it out, then 5. write what was observed back onto the row.
        let result = self.execute(&desired, &row_state, &observed, &plan).await;
        // The server the row was ready with before this pass: repairing its firewall or key is
        // not a new provisioning, a new server is.
        let ready_server = row
            .as_ref()
            .filter(|r| r.provisioning_status == "ready")
            .and_then(|r| r.hetzner_server_id);
        // The executor records ids as it goes: compare the outcome with the row as it is now.
        let row = match (&row, plan.ops.is_empty()) {
            (Some(_), false) => subscriptions::get(&self.db, subscription_id).await?,
            _ => row,
        };
        match result {
            Ok(progress) => {
                self.settle(&desired, row.as_ref(), ready_server, &plan, progress)
                    .await
            }
            // Not ours to record any more: the new leader looks at this row.
            Err(ReconcileError::LostLease) => Err(ReconcileError::LostLease),
            Err(error) => {
                self.record_failure(&desired, row.as_ref(), &error).await?;
                if error.is_terminal() {
                    Ok(Done::Settled)
                } else {
                    Err(error)
                }
            }
        }
    }

    /// Same as `reconcile` for a subscription known only from resource labels (an orphan
    /// whose id cannot be recovered from its key) or unlabelled strays: delete them.
    pub async fn delete_orphans(
        &self,
        key: &str,
        observed: &Observed,
    ) -> Result<(), ReconcileError> {
        let desired = desired::desired_for_missing_row(key, key);
        let plan = plan::plan(&desired, &RowState::default(), observed);
        self.execute(&desired, &RowState::default(), observed, &plan)
            .await
            .map(drop)
    }

    async fn execute(
        &self,
        desired: &Desired,
        row: &RowState,
        observed: &Observed,
        plan: &Plan,
    ) -> Result<Progress, ReconcileError> {
        let spec = match &desired.want {
            Want::Vps(spec) => Some(spec.as_ref()),
            _ => None,
        };
        let mut progress = Progress {
            subscription_id: desired.subscription_id.clone(),
            key: desired.key.clone(),
            row_exists: desired.version.is_some(),
            public_key: row.public_key.clone(),
            ssh_key_id: plan.keep.ssh_key,
            firewall_id: plan.keep.firewall,
            server: plan
                .keep
                .server
                .and_then(|id| observed.servers.iter().find(|s| s.id == id).cloned()),
            ..Default::default()
        };
        if plan.ops.is_empty() {
            return Ok(progress);
        }
        let executor = Executor {
            api: &self.api,
            db: &self.db,
            sealer: &self.sealer,
            config: &self.config,
            action_timeout: self.action_timeout,
            leadership: &self.leadership,
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
            subscriptions::write_status(&self.db, None, &desired.subscription_id, &update).await?;
        }
        executor.run(spec, &plan.ops, &mut progress).await?;
        Ok(progress)
    }

    /// Writes the outcome onto the row, only the columns that differ (a converged
    /// subscription costs no write).
    async fn settle(
        &self,
        desired: &Desired,
        row: Option<&subscription::Model>,
        ready_server: Option<i64>,
        plan: &Plan,
        progress: Progress,
    ) -> Result<Done, ReconcileError> {
        let (Some(row), Some(version)) = (row, desired.version) else {
            return Ok(Done::Settled);
        };
        let newly_ready = row.provisioned_at.is_none()
            || ready_server.is_none()
            || ready_server != progress.server.as_ref().map(|s| s.id);
        let mut done = Done::Settled;
        let mut update = StatusUpdate::default();
        match &plan.outcome {
            Outcome::Ready if progress.needs_another_look => {
                update.provisioning_status = Some("provisioning".into());
                done = Done::Requeue(PROVISIONING_RECHECK);
            }
            Outcome::Ready => {
                let server = progress.server.as_ref();
                update.provisioning_status = Some("ready".into());
                update.provisioning_error = Some(None);
                update.hetzner_server_id = Some(server.map(|s| s.id));
                update.hetzner_ssh_key_id = Some(progress.ssh_key_id);
                update.hetzner_firewall_id = Some(progress.firewall_id);
                update.vps_ip_address = Some(
                    server
                        .and_then(|s| s.public_net.ipv4.as_ref())
                        .map(|ip| ip.ip.clone()),
                );
                update.vps_hostname = Some(server.map(|s| s.name.clone()));
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
            Outcome::Deprovisioned => {
                update.provisioning_status = Some("deprovisioned".into());
                update.provisioning_error = Some(None);
                update.hetzner_server_id = Some(None);
                update.hetzner_ssh_key_id = Some(None);
                update.hetzner_firewall_id = Some(None);
                update.vps_ip_address = Some(None);
                update.vps_hostname = Some(None);
                update.ssh_private_key = Some(None);
                update.ssh_public_key = Some(None);
                if row.deprovisioned_at.is_none() || row.provisioning_status != "deprovisioned" {
                    update.deprovisioned_at = Some(Some(Utc::now()));
                }
                update.observed_version = Some(version);
            }
            Outcome::Unchanged => update.observed_version = Some(version),
            Outcome::Failed(message) => {
                update.provisioning_status = Some("failed".into());
                update.provisioning_error = Some(Some(message.clone()));
                update.observed_version = Some(version);
            }
        }
        let update = only_changes(row, update);
        if !update.is_empty() {
            let milestone = match update.provisioning_status.as_deref() {
                Some("ready") if newly_ready => Some((EventKind::Normal, "Ready")),
                Some("deprovisioned") => Some((EventKind::Normal, "Deprovisioned")),
                Some("failed") => Some((EventKind::Warning, "Failed")),
                _ => None,
            };
            if let Some((kind, reason)) = milestone {
                let message = match (&plan.outcome, &progress.server) {
                    (Outcome::Failed(message), _) => message.clone(),
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
                    _ => "all resources deleted".to_string(),
                };
                tracing::info!(subscription = %row.id, reason, "{message}");
                events::record(&self.db, &row.id, kind, reason, &message).await?;
            }
            subscriptions::write_status(&self.db, None, &row.id, &update).await?;
        }
        Ok(done)
    }

    async fn record_failure(
        &self,
        desired: &Desired,
        row: Option<&subscription::Model>,
        error: &ReconcileError,
    ) -> Result<(), ReconcileError> {
        let message = error.to_string();
        tracing::warn!(subscription = %desired.subscription_id, error = %message, terminal = error.is_terminal(), "reconcile failed");
        events::record(
            &self.db,
            &desired.subscription_id,
            EventKind::Warning,
            if error.is_terminal() {
                "Failed"
            } else {
                "Retrying"
            },
            &message,
        )
        .await?;
        let (Some(row), Some(version)) = (row, desired.version) else {
            return Ok(());
        };
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
            subscriptions::write_status(&self.db, None, &row.id, &update).await?;
        }
        Ok(())
    }
}

/// Resources we own that no row wants: one group per subscription key without a row, plus
/// one group ("unattributed") of resources with our instance label but neither a
/// subscription label nor the name of any row. Used by the resync and by `plan`.
pub fn unwanted(
    config: &Config,
    snapshot: &Snapshot,
    rows: &[subscription::Model],
) -> Vec<(String, Observed)> {
    let known_keys: BTreeSet<String> = rows.iter().map(|r| desired::resource_key(&r.id)).collect();
    let known_names: BTreeSet<String> = rows
        .iter()
        .map(|r| desired::resource_name(config, &r.id))
        .collect();
    let mut groups: Vec<(String, Observed)> = snapshot
        .subscription_keys()
        .into_iter()
        .filter(|key| !known_keys.contains(key))
        .map(|key| {
            let observed = snapshot
                .resources
                .filter(|labels, _| labels.get(desired::SUBSCRIPTION_LABEL) == Some(&key));
            (key, observed)
        })
        .collect();
    let stray = snapshot.unattributed(&known_names);
    if !stray.is_empty() {
        groups.push(("unattributed".to_string(), stray));
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
        public_key_fingerprint: row
            .ssh_public_key
            .as_deref()
            .and_then(|key| crate::keys::md5_fingerprint(key).ok()),
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
    keep_if_differs(&mut update.observed_version, row.observed_version);
    update
}
