//! The executor: carries out a plan's ops through `HcloudApi`, persisting every Hetzner id
//! on the row as soon as it is known, so a crash never loses track of what was created.

use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;

use crate::cloud_init;
use crate::config::Config;
use crate::db::deletion_guard::{self, Reservation};
use crate::db::events::{self, EventKind};
use crate::db::state;
use crate::db::subscriptions::{self, StatusUpdate};
use crate::fencing::{Leadership, Term};
use crate::hcloud::{
    ActionRef, CreateFirewall, CreateServer, CreateServerFirewall, CreateSshKey, Error as ApiError,
    ErrorCode, HcloudApi, ImageStatus, Labels, Server, ServerPowerAction, ServerStatus,
};
use crate::keys::{self, Sealer};

use super::ReconcileError;
use super::desired::{
    self, Owner, PRE_DELETE_SNAPSHOT, SNAPSHOT_LABEL, SUBSCRIPTION_LABEL, VpsSpec,
};
use super::keycheck::KeyChecks;
use super::plan::{Kind, Op};

/// How long deleting a firewall retries `resource_in_use` (Hetzner detaches asynchronously).
const FIREWALL_IN_USE_RETRY: Duration = Duration::from_secs(60);

/// Everything the executor needs besides the API.
pub struct Executor<'a, A: HcloudApi> {
    pub api: &'a A,
    pub db: &'a DatabaseConnection,
    pub sealer: &'a Sealer,
    /// Told about a key pair generated here, so the next pass does not open it to check it.
    pub key_checks: &'a KeyChecks,
    pub config: &'a Config,
    pub owner: &'a Owner,
    /// Upper bound for waiting on Hetzner actions.
    pub action_timeout: Duration,
    pub leadership: &'a Leadership,
    /// The leadership term this reconcile runs in: every call checks it, every write is
    /// fenced by it.
    pub term: &'a Term,
}

/// What is known about one subscription's resources while its ops run.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub subscription_id: String,
    pub key: String,
    /// False when the row is gone: nothing is written back.
    pub row_exists: bool,
    pub public_key: Option<String>,
    pub ssh_key_id: Option<i64>,
    pub firewall_id: Option<i64>,
    pub server: Option<Server>,
    /// Actions started and not yet waited for.
    pub pending_actions: Vec<ActionRef>,
    /// The server was adopted in whatever state it had: look at it again before `ready`.
    pub needs_another_look: bool,
    /// When the row entered its status: a snapshot taken before that belongs to an earlier
    /// cancellation and is not this deletion's backup.
    pub status_since: Option<chrono::DateTime<chrono::Utc>>,
}

impl<A: HcloudApi> Executor<'_, A> {
    /// Runs `ops` in order, then waits for every action they started.
    pub async fn run(
        &self,
        spec: Option<&VpsSpec>,
        ops: &[Op],
        progress: &mut Progress,
    ) -> Result<(), ReconcileError> {
        for op in ops {
            self.ensure_leader()?;
            self.apply(spec, op, progress).await?;
        }
        self.wait_pending(progress).await
    }

    async fn apply(
        &self,
        spec: Option<&VpsSpec>,
        op: &Op,
        progress: &mut Progress,
    ) -> Result<(), ReconcileError> {
        tracing::debug!(subscription = %desired::shown_id(&progress.subscription_id), op = %op, "applying");
        match op {
            Op::GenerateKeyPair => self.generate_key_pair(need(spec)?, progress).await,
            Op::CreateSshKey => self.create_ssh_key(need(spec)?, progress).await,
            Op::CreateFirewall => self.create_firewall(need(spec)?, progress).await,
            Op::SetFirewallRules { firewall_id } => {
                let actions = self
                    .api
                    .set_firewall_rules(*firewall_id, &need(spec)?.firewall_rules)
                    .await?;
                progress.pending_actions.extend(ActionRef::all(&actions));
                self.event(
                    progress,
                    EventKind::Normal,
                    "FirewallRulesSet",
                    &format!("firewall {firewall_id}: rules set to the plan's"),
                )
                .await
            }
            Op::CreateServer => self.create_server(need(spec)?, progress).await,
            Op::PowerOff { server_id } => self.power_off(*server_id, progress).await,
            Op::SnapshotServer { server_id } => self.snapshot(*server_id, progress).await,
            Op::PowerOn { server_id } => {
                let action = self
                    .api
                    .server_power(*server_id, ServerPowerAction::PowerOn)
                    .await?;
                progress.pending_actions.push(ActionRef::from(&action));
                self.event(
                    progress,
                    EventKind::Normal,
                    "ServerPoweredOn",
                    &format!("server {server_id} was off; powering on"),
                )
                .await
            }
            Op::ApplyFirewall { server_id } => {
                let firewall_id = progress
                    .firewall_id
                    .ok_or_else(|| ReconcileError::Internal("no firewall to apply".into()))?;
                match self.api.apply_firewall(firewall_id, &[*server_id]).await {
                    Ok(actions) => progress.pending_actions.extend(ActionRef::all(&actions)),
                    Err(e) if e.code() == Some(&ErrorCode::FirewallAlreadyApplied) => {}
                    Err(e) => return Err(e.into()),
                }
                self.event(
                    progress,
                    EventKind::Normal,
                    "FirewallApplied",
                    &format!("firewall {firewall_id} applied to server {server_id}"),
                )
                .await
            }
            Op::UpdateLabels { kind, id, labels } => {
                self.update_labels(*kind, *id, labels).await?;
                self.event(
                    progress,
                    EventKind::Normal,
                    "LabelsRepaired",
                    &format!("{} {id}: labels set", kind.noun()),
                )
                .await
            }
            Op::ReportServerTypeDrift {
                server_id,
                observed,
                wanted,
            } => {
                // Seen on every resync until someone resizes: tell once, not every minute.
                let latest = events::recent(self.db, Some(&progress.subscription_id), 1).await?;
                if latest
                    .first()
                    .is_some_and(|e| e.reason == "ServerTypeDrift")
                {
                    return Ok(());
                }
                let message = format!(
                    "server {server_id} is {observed}, the plan says {wanted}; resizing is not automatic"
                );
                self.event(progress, EventKind::Warning, "ServerTypeDrift", &message)
                    .await
            }
            Op::DeleteServer { id } => self.delete_server(*id, progress).await,
            Op::DeleteFirewall {
                id,
                attached_servers,
            } => self.delete_firewall(*id, attached_servers, progress).await,
            Op::DeleteSshKey { id } => {
                ignore_not_found(self.api.delete_ssh_key(*id).await)?;
                if progress.ssh_key_id == Some(*id) {
                    progress.ssh_key_id = None;
                }
                self.event(
                    progress,
                    EventKind::Normal,
                    "SshKeyDeleted",
                    &format!("SSH key {id} deleted"),
                )
                .await
            }
        }
    }

    /// Checked before every mutation, also between the steps of ops that wait for minutes.
    fn ensure_leader(&self) -> Result<(), ReconcileError> {
        if self.leadership.holds(self.term) {
            Ok(())
        } else {
            Err(ReconcileError::LostLease)
        }
    }

    async fn generate_key_pair(
        &self,
        spec: &VpsSpec,
        progress: &mut Progress,
    ) -> Result<(), ReconcileError> {
        let pair = keys::generate(self.config.ssh_key_algorithm, &spec.name).await?;
        let sealed = self
            .sealer
            .seal(pair.private_pem(), &progress.subscription_id)?;
        // Stored before the key exists at Hetzner: a crash after this point re-uses it.
        self.write(
            progress,
            StatusUpdate {
                provisioning_status: Some("provisioning".into()),
                ssh_private_key: Some(Some(sealed.clone())),
                ssh_public_key: Some(Some(pair.public_openssh.clone())),
                ..Default::default()
            },
        )
        .await?;
        self.key_checks
            .record_generated(&progress.subscription_id, &sealed, &pair.public_openssh);
        progress.public_key = Some(pair.public_openssh);
        self.event(
            progress,
            EventKind::Normal,
            "KeyPairGenerated",
            &format!(
                "{} key pair generated and sealed ({})",
                self.config.ssh_key_algorithm.as_str(),
                pair.fingerprint_md5
            ),
        )
        .await
    }

    async fn create_ssh_key(
        &self,
        spec: &VpsSpec,
        progress: &mut Progress,
    ) -> Result<(), ReconcileError> {
        let public_key = progress
            .public_key
            .clone()
            .ok_or_else(|| ReconcileError::Internal("no public key to upload".into()))?;
        let request = CreateSshKey {
            name: spec.name.clone(),
            public_key: public_key.clone(),
            labels: spec.labels.clone(),
        };
        let (key, reason) = match self.api.create_ssh_key(&request).await {
            Ok(key) => (key, "SshKeyCreated"),
            Err(e) if e.is_uniqueness_error() => {
                // The name or the key itself exists: ours from a crashed pass, or foreign.
                let existing = match self.api.ssh_key_by_name(&spec.name).await? {
                    Some(key) => Some(key),
                    None => {
                        let fingerprint = keys::md5_fingerprint(&public_key)?;
                        self.api.ssh_key_by_fingerprint(&fingerprint).await?
                    }
                };
                let key = existing.ok_or(e)?;
                self.check_owned(progress, "SSH key", key.id, &key.name, &key.labels)?;
                if key.public_key.split_whitespace().nth(1) == public_key.split_whitespace().nth(1)
                {
                    (key, "SshKeyAdopted")
                } else {
                    // Ours, but not the pair stored on the row (e.g. a pair generated by a
                    // pass that crashed before storing it): replace it.
                    ignore_not_found(self.api.delete_ssh_key(key.id).await)?;
                    (self.api.create_ssh_key(&request).await?, "SshKeyReplaced")
                }
            }
            Err(e) => return Err(e.into()),
        };
        progress.ssh_key_id = Some(key.id);
        self.persist_id(progress, Kind::SshKey, key.id, reason, &key.name)
            .await
    }

    async fn create_firewall(
        &self,
        spec: &VpsSpec,
        progress: &mut Progress,
    ) -> Result<(), ReconcileError> {
        let request = CreateFirewall {
            name: spec.name.clone(),
            labels: spec.labels.clone(),
            rules: spec.firewall_rules.to_vec(),
            apply_to: vec![],
        };
        let (firewall, reason) = match self.api.create_firewall(&request).await {
            Ok(created) => {
                progress
                    .pending_actions
                    .extend(ActionRef::all(&created.actions));
                (created.firewall, "FirewallCreated")
            }
            Err(e) if e.is_uniqueness_error() => {
                let firewall = self.api.firewall_by_name(&spec.name).await?.ok_or(e)?;
                self.check_owned(
                    progress,
                    "firewall",
                    firewall.id,
                    &firewall.name,
                    &firewall.labels,
                )?;
                (firewall, "FirewallAdopted")
            }
            Err(e) => return Err(e.into()),
        };
        progress.firewall_id = Some(firewall.id);
        self.persist_id(
            progress,
            Kind::Firewall,
            firewall.id,
            reason,
            &firewall.name,
        )
        .await
    }

    async fn create_server(
        &self,
        spec: &VpsSpec,
        progress: &mut Progress,
    ) -> Result<(), ReconcileError> {
        let public_key = progress
            .public_key
            .clone()
            .ok_or_else(|| ReconcileError::Internal("no public key for cloud-init".into()))?;
        let ssh_key_id = progress
            .ssh_key_id
            .ok_or_else(|| ReconcileError::Internal("no ssh key for the server".into()))?;
        let firewall_id = progress
            .firewall_id
            .ok_or_else(|| ReconcileError::Internal("no firewall for the server".into()))?;
        let host_key = self.host_key(progress).await?;
        let user_data = cloud_init::render(
            &spec.plan.cloud_init,
            &spec.name,
            &public_key,
            host_key
                .as_ref()
                .map(|k| (k.private_openssh.as_str(), k.public_openssh.as_str())),
        )?;
        if let Some(host_key) = &host_key {
            // Pinned before the server exists: the first login checks it, also after a crash.
            self.write(
                progress,
                StatusUpdate {
                    ssh_host_key: Some(Some(host_key.public_openssh.clone())),
                    ..Default::default()
                },
            )
            .await?;
        }
        let request = CreateServer {
            name: spec.name.clone(),
            server_type: spec.plan.server_type.clone(),
            image: spec.plan.image.clone(),
            location: Some(spec.plan.location.clone()),
            ssh_keys: vec![ssh_key_id],
            firewalls: vec![CreateServerFirewall {
                firewall: firewall_id,
            }],
            labels: spec.labels.clone(),
            user_data: Some(user_data),
            start_after_create: Some(true),
            public_net: None,
        };
        let (server, reason) = match self.api.create_server(&request).await {
            Ok(created) => {
                progress.pending_actions.extend(created.actions());
                (created.server, "ServerCreated")
            }
            Err(e) if e.is_uniqueness_error() => {
                // A previous pass created it and crashed before recording the id.
                let server = self.api.server_by_name(&spec.name).await?.ok_or(e)?;
                self.check_owned(progress, "server", server.id, &server.name, &server.labels)?;
                progress.needs_another_look = true;
                (server, "ServerAdopted")
            }
            Err(e) => return Err(e.into()),
        };
        let detail = format!(
            "{}, {} {} in {}",
            server.name, spec.plan.server_type, spec.plan.image, spec.plan.location
        );
        let id = server.id;
        progress.server = Some(server);
        self.persist_id(progress, Kind::Server, id, reason, &detail)
            .await
    }

    /// The host key a new server gets through cloud-init: derived from the subscription's
    /// private key (`crate::ssh::host_key`), so only for a key pair this controller sealed.
    /// `None` for a key the web app wrote: the controller cannot log in with it anyway.
    async fn host_key(
        &self,
        progress: &Progress,
    ) -> Result<Option<crate::ssh::host_key::HostKey>, ReconcileError> {
        let Some(row) = subscriptions::get(self.db, &progress.subscription_id).await? else {
            return Ok(None);
        };
        let Some(sealed) = super::keycheck::sealed_by_controller(&row) else {
            return Ok(None);
        };
        let private = self.sealer.open(sealed, &progress.subscription_id)?;
        let name = desired::resource_name(self.config, &progress.subscription_id);
        Ok(Some(crate::ssh::host_key::derive(&private, &name)?))
    }

    /// Stores the id of a resource just created or adopted before anything else happens, so
    /// a crash never loses track of it, and records the event.
    async fn persist_id(
        &self,
        progress: &Progress,
        kind: Kind,
        id: i64,
        reason: &str,
        detail: &str,
    ) -> Result<(), ReconcileError> {
        let mut update = StatusUpdate {
            provisioning_status: Some("provisioning".into()),
            ..Default::default()
        };
        match kind {
            Kind::Server => update.hetzner_server_id = Some(Some(id)),
            Kind::SshKey => update.hetzner_ssh_key_id = Some(Some(id)),
            Kind::Firewall => update.hetzner_firewall_id = Some(Some(id)),
        }
        self.write(progress, update).await?;
        let message = format!("{} {id} ({detail})", kind.noun());
        self.event(progress, EventKind::Normal, reason, &message)
            .await
    }

    async fn update_labels(&self, kind: Kind, id: i64, labels: &Labels) -> Result<(), ApiError> {
        match kind {
            Kind::Server => self.api.update_server_labels(id, labels).await.map(drop),
            Kind::SshKey => self.api.update_ssh_key_labels(id, labels).await.map(drop),
            Kind::Firewall => self.api.update_firewall_labels(id, labels).await.map(drop),
        }
    }

    /// Suspends a server: graceful shutdown within `shutdown_timeout_seconds`, then a hard
    /// power off if it is still running. Nothing is deleted.
    async fn power_off(&self, id: i64, progress: &mut Progress) -> Result<(), ReconcileError> {
        let grace = Duration::from_secs(self.config.shutdown_timeout_seconds);
        if !grace.is_zero() {
            self.shut_down(id, grace).await?;
            self.ensure_leader()?;
        }
        let still_on = match ignore_not_found(self.api.get_server(id).await)? {
            Some(server) => server.status != ServerStatus::Off,
            None => false,
        };
        if still_on
            && let Some(action) =
                ignore_not_found(self.api.server_power(id, ServerPowerAction::PowerOff).await)?
        {
            self.api
                .wait_for_actions(&[ActionRef::from(&action)], self.action_timeout)
                .await?;
        }
        if let Some(server) = progress.server.as_mut().filter(|s| s.id == id) {
            server.status = ServerStatus::Off;
        }
        self.event(
            progress,
            EventKind::Normal,
            "ServerPoweredOff",
            &format!("server {id} powered off (suspended); disk, key and firewall kept"),
        )
        .await
    }

    /// Takes a snapshot of the server before it is deleted, labelled as ours with its
    /// subscription so the retention sweep finds it. A snapshot of this server that already
    /// exists (a retry after a crash) is used instead of taking another.
    async fn snapshot(
        &self,
        server_id: i64,
        progress: &mut Progress,
    ) -> Result<(), ReconcileError> {
        let selector = format!(
            "{},{SNAPSHOT_LABEL}={PRE_DELETE_SNAPSHOT},{SUBSCRIPTION_LABEL}={}",
            self.owner.selector(),
            progress.key
        );
        let existing = self
            .api
            .list_snapshots(&selector)
            .await?
            .into_iter()
            .find(|image| {
                image
                    .created_from
                    .as_ref()
                    .is_some_and(|from| from.id == server_id)
                    && progress
                        .status_since
                        .is_none_or(|since| image.created >= since)
                    // A snapshot that failed is no backup: take another.
                    && matches!(image.status, ImageStatus::Available | ImageStatus::Creating)
            });
        if let Some(image) = existing {
            if image.status == ImageStatus::Available {
                return Ok(());
            }
            return Err(ReconcileError::Internal(format!(
                "snapshot {} of server {server_id} is still being created; the server is deleted once it is available",
                image.id
            )));
        }
        let mut labels = self.owner.labels(&progress.key, None);
        labels.insert(SNAPSHOT_LABEL.to_string(), PRE_DELETE_SNAPSHOT.to_string());
        let description = format!(
            "vps-controller: server {server_id} of subscription {} before deletion",
            progress.key
        );
        let created = self
            .api
            .create_snapshot(server_id, &description, &labels)
            .await?;
        self.api
            .wait_for_actions(&[ActionRef::from(&created.action)], self.action_timeout)
            .await?;
        self.ensure_leader()?;
        self.event(
            progress,
            EventKind::Normal,
            "SnapshotTaken",
            &format!(
                "snapshot {} of server {server_id} taken before deletion; kept {} days",
                created.image.id, self.config.lifecycle.snapshot_retention_days
            ),
        )
        .await
    }

    /// Asks the deletion guard for one server deletion. Past the hourly budget, deletions
    /// pause until an operator approves; the refusal is loud and creating goes on.
    async fn reserve_deletion(&self, id: i64, progress: &Progress) -> Result<(), ReconcileError> {
        /// The `deletion_budget` in force when deletions paused: changing it in the config is
        /// the other way (besides `deletions approve`) an operator resumes.
        const BUDGET_AT_PAUSE: &str = "deletion_budget_at_pause";
        let configured = {
            let budget = &self.config.deletion_budget;
            format!("{}/{}%", budget.min_per_hour, budget.fleet_percent)
        };
        for attempt in 0..2 {
            let managed = deletion_guard::managed_servers(self.db).await?;
            let budget = self.config.deletion_budget.per_hour(managed);
            let reservation = deletion_guard::reserve(
                self.db,
                self.term.fence.as_ref(),
                id,
                &progress.key,
                budget,
            )
            .await?;
            let Reservation::Paused {
                newly,
                deleted_in_window,
                budget,
            } = reservation
            else {
                return Ok(());
            };
            let at_pause = state::get(self.db, BUDGET_AT_PAUSE).await?;
            if newly || at_pause.is_none() {
                state::set(self.db, BUDGET_AT_PAUSE, &configured).await?;
            } else if attempt == 0 && at_pause.as_deref() != Some(configured.as_str()) {
                deletion_guard::approve(self.db, 0).await?;
                state::set(self.db, BUDGET_AT_PAUSE, &configured).await?;
                tracing::warn!(
                    was = at_pause.as_deref().unwrap_or_default(),
                    now = %configured,
                    "deletion_budget changed in the config: the deletion pause is lifted, a new hourly window starts"
                );
                continue;
            }
            let message = format!(
                "server deletion paused by the deletion guard: {deleted_in_window} servers deleted \
                 in the last hour, budget {budget}; server {id} is kept. Approve with \
                 `vps-controller deletions approve` (or change deletion_budget in the config)"
            );
            if newly {
                tracing::error!(
                    server_id = id,
                    deleted_in_window,
                    budget,
                    "DELETIONS PAUSED: {message}"
                );
            }
            return Err(ReconcileError::DeletionsPaused(message));
        }
        Err(ReconcileError::Internal(
            "the deletion guard paused again right after a config change lifted it".into(),
        ))
    }

    async fn delete_server(&self, id: i64, progress: &mut Progress) -> Result<(), ReconcileError> {
        // The last look before a disk is lost: a server another row records is that row's.
        let others = subscriptions::recorded_elsewhere(
            self.db,
            subscriptions::RecordedColumn::Server,
            id,
            &progress.subscription_id,
        )
        .await?;
        if !others.is_empty() {
            return Err(ReconcileError::ForeignResource(format!(
                "server {id} is recorded on subscription {:?}; not deleting it",
                others[0]
            )));
        }
        self.reserve_deletion(id, progress).await?;
        self.ensure_leader()?;
        let grace = Duration::from_secs(self.config.shutdown_timeout_seconds);
        if !grace.is_zero() {
            self.shut_down(id, grace).await?;
            self.ensure_leader()?;
        }
        if let Some(action) = ignore_not_found(self.api.delete_server(id).await)? {
            // The firewall can only go once the server has released it.
            self.api
                .wait_for_actions(&[ActionRef::from(&action)], self.action_timeout)
                .await?;
        }
        if progress.server.as_ref().is_some_and(|s| s.id == id) {
            progress.server = None;
        }
        self.event(
            progress,
            EventKind::Normal,
            "ServerDeleted",
            &format!("server {id} deleted"),
        )
        .await
    }

    /// Graceful ACPI shutdown, bounded by `grace`; a server that ignores it is then powered
    /// off or deleted anyway by the caller.
    async fn shut_down(&self, id: i64, grace: Duration) -> Result<(), ReconcileError> {
        let Some(server) = ignore_not_found(self.api.get_server(id).await)? else {
            return Ok(());
        };
        if server.status != ServerStatus::Running {
            return Ok(());
        }
        let Some(action) =
            ignore_not_found(self.api.server_power(id, ServerPowerAction::Shutdown).await)?
        else {
            return Ok(());
        };
        let mut poll = Poll::until(Instant::now() + grace);
        // Success only means the ACPI signal was sent; a failed or slow action changes
        // nothing: the server is deleted when the grace period ends either way.
        match self
            .api
            .wait_for_actions(&[ActionRef::from(&action)], grace)
            .await
        {
            Ok(_) | Err(ApiError::ActionFailed { .. } | ApiError::ActionTimeout { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        loop {
            match ignore_not_found(self.api.get_server(id).await)? {
                Some(server) if server.status != ServerStatus::Off => {}
                _ => return Ok(()),
            }
            if !poll.wait().await {
                tracing::info!(
                    server_id = id,
                    grace_seconds = grace.as_secs(),
                    "server did not shut down within the grace period; going on without it"
                );
                return Ok(());
            }
        }
    }

    async fn delete_firewall(
        &self,
        id: i64,
        attached_servers: &[i64],
        progress: &mut Progress,
    ) -> Result<(), ReconcileError> {
        if !attached_servers.is_empty() {
            match self.api.remove_firewall(id, attached_servers).await {
                Ok(actions) => {
                    self.api
                        .wait_for_actions(&ActionRef::all(&actions), self.action_timeout)
                        .await?;
                }
                // Already detached (e.g. its server was deleted a moment ago) or already gone.
                Err(e)
                    if e.is_not_found()
                        || e.code() == Some(&ErrorCode::FirewallResourceNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let deadline = Instant::now() + FIREWALL_IN_USE_RETRY;
        let mut delay = Duration::from_millis(500);
        loop {
            self.ensure_leader()?;
            match self.api.delete_firewall(id).await {
                Ok(()) => break,
                Err(e) if e.is_not_found() => break,
                Err(e)
                    if e.code() == Some(&ErrorCode::ResourceInUse) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
        if progress.firewall_id == Some(id) {
            progress.firewall_id = None;
        }
        self.event(
            progress,
            EventKind::Normal,
            "FirewallDeleted",
            &format!("firewall {id} deleted"),
        )
        .await
    }

    async fn wait_pending(&self, progress: &mut Progress) -> Result<(), ReconcileError> {
        if progress.pending_actions.is_empty() {
            return Ok(());
        }
        let actions = std::mem::take(&mut progress.pending_actions);
        self.api
            .wait_for_actions(&actions, self.action_timeout)
            .await?;
        Ok(())
    }

    /// Adopting is only allowed for resources that carry our labels; anything else that
    /// holds our deterministic name is someone else's and is never touched.
    fn check_owned(
        &self,
        progress: &Progress,
        what: &str,
        id: i64,
        name: &str,
        labels: &Labels,
    ) -> Result<(), ReconcileError> {
        let ours = self.owner.owns(labels)
            && labels
                .get(SUBSCRIPTION_LABEL)
                .is_none_or(|key| key == &progress.key);
        if ours {
            Ok(())
        } else {
            Err(ReconcileError::ForeignResource(format!(
                "{what} name {name:?} is taken by {what} {id}, which this installation does not own; rename or delete it"
            )))
        }
    }

    async fn write(&self, progress: &Progress, update: StatusUpdate) -> Result<(), ReconcileError> {
        if progress.row_exists {
            subscriptions::write_status(
                self.db,
                self.term.fence.as_ref(),
                &progress.subscription_id,
                &update,
            )
            .await?;
        }
        Ok(())
    }

    async fn event(
        &self,
        progress: &Progress,
        kind: EventKind,
        reason: &str,
        message: &str,
    ) -> Result<(), ReconcileError> {
        match kind {
            EventKind::Normal => {
                tracing::info!(subscription = %desired::shown_id(&progress.subscription_id), reason, "{message}")
            }
            EventKind::Warning => {
                tracing::warn!(subscription = %desired::shown_id(&progress.subscription_id), reason, "{message}")
            }
        }
        events::record(self.db, &progress.subscription_id, kind, reason, message).await?;
        Ok(())
    }
}

/// Waits with a doubling delay (0.5 s up to 5 s) until a deadline.
struct Poll {
    delay: Duration,
    deadline: Instant,
}

impl Poll {
    fn until(deadline: Instant) -> Poll {
        Poll {
            delay: Duration::from_millis(500),
            deadline,
        }
    }

    /// Sleeps for the next delay; false (without sleeping) once the deadline has passed.
    async fn wait(&mut self) -> bool {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        tokio::time::sleep(self.delay.min(left)).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        true
    }
}

fn need(spec: Option<&VpsSpec>) -> Result<&VpsSpec, ReconcileError> {
    spec.ok_or_else(|| ReconcileError::Internal("op needs a VPS spec".into()))
}

/// Only `not_found` means the resource is gone; every other error stays an error.
fn ignore_not_found<T>(result: Result<T, ApiError>) -> Result<Option<T>, ApiError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}
