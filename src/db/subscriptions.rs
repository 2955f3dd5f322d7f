//! Reading desired state and writing observed status back onto `subscriptions`.

use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Statement};

use super::entities::subscription::{self, Column, Entity};
use super::{DbError, SEALED};

/// The query behind [`changed`]. Its WHERE clause is the predicate of the partial index
/// `subscriptions_unreconciled_idx`, which is what lets the planner use that index; public so
/// tests can EXPLAIN it.
pub const CHANGED_SQL: &str = "SELECT id, desired_version FROM subscriptions \
     WHERE desired_version <> observed_version ORDER BY id";

/// Every subscription, ordered by id.
pub async fn all(db: &impl ConnectionTrait) -> Result<Vec<subscription::Model>, DbError> {
    Ok(Entity::find().order_by_asc(Column::Id).all(db).await?)
}

pub async fn get(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<Option<subscription::Model>, DbError> {
    Ok(Entity::find_by_id(id.to_owned()).one(db).await?)
}

/// `(id, desired_version)` of the rows whose spec changed since the controller last finished a
/// pass on them (`desired_version <> observed_version`), ordered by id.
pub async fn changed(db: &impl ConnectionTrait) -> Result<Vec<(String, i64)>, DbError> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            CHANGED_SQL,
        ))
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("", "id")?, row.try_get("", "desired_version")?)))
        .collect()
}

/// Controller-owned columns to write; `None` leaves a column as it is, `Some(None)` clears it.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub provisioning_status: Option<String>,
    pub provisioning_error: Option<Option<String>>,
    pub hetzner_server_id: Option<Option<i64>>,
    pub hetzner_ssh_key_id: Option<Option<i64>>,
    pub hetzner_firewall_id: Option<Option<i64>>,
    pub vps_ip_address: Option<Option<String>>,
    pub vps_hostname: Option<Option<String>>,
    pub provisioned_at: Option<Option<sea_orm::prelude::DateTimeUtc>>,
    pub deprovisioned_at: Option<Option<sea_orm::prelude::DateTimeUtc>>,
    /// Sealed ciphertext only.
    pub ssh_private_key: Option<Option<String>>,
    pub ssh_public_key: Option<Option<String>>,
    /// The desired_version a pass finished for (successfully or terminally failed). Setting it
    /// also stamps `last_reconciled_at` with the current time.
    pub observed_version: Option<i64>,
}

impl StatusUpdate {
    /// True when the update writes nothing.
    pub fn is_empty(&self) -> bool {
        *self == StatusUpdate::default()
    }
}

impl std::fmt::Debug for StatusUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sealed = self
            .ssh_private_key
            .as_ref()
            .map(|key| key.as_ref().map(|_| SEALED));
        f.debug_struct("StatusUpdate")
            .field("provisioning_status", &self.provisioning_status)
            .field("provisioning_error", &self.provisioning_error)
            .field("hetzner_server_id", &self.hetzner_server_id)
            .field("hetzner_ssh_key_id", &self.hetzner_ssh_key_id)
            .field("hetzner_firewall_id", &self.hetzner_firewall_id)
            .field("vps_ip_address", &self.vps_ip_address)
            .field("vps_hostname", &self.vps_hostname)
            .field("provisioned_at", &self.provisioned_at)
            .field("deprovisioned_at", &self.deprovisioned_at)
            .field("ssh_private_key", &sealed)
            .field("ssh_public_key", &self.ssh_public_key)
            .field("observed_version", &self.observed_version)
            .finish()
    }
}

/// Writes the `Some(..)` fields of `update` onto the row. Never touches spec columns or
/// `desired_version`, so the version triggers stay quiet. Fails with
/// [`DbError::SubscriptionNotFound`] when the row is gone.
pub async fn write_status(
    db: &impl ConnectionTrait,
    id: &str,
    update: &StatusUpdate,
) -> Result<(), DbError> {
    if update.is_empty() {
        return Ok(());
    }
    let values: [(Column, Option<Expr>); 11] = [
        (
            Column::ProvisioningStatus,
            update.provisioning_status.clone().map(Expr::value),
        ),
        (
            Column::ProvisioningError,
            update.provisioning_error.clone().map(Expr::value),
        ),
        (
            Column::HetznerServerId,
            update.hetzner_server_id.map(Expr::value),
        ),
        (
            Column::HetznerSshKeyId,
            update.hetzner_ssh_key_id.map(Expr::value),
        ),
        (
            Column::HetznerFirewallId,
            update.hetzner_firewall_id.map(Expr::value),
        ),
        (
            Column::VpsIpAddress,
            update.vps_ip_address.clone().map(Expr::value),
        ),
        (
            Column::VpsHostname,
            update.vps_hostname.clone().map(Expr::value),
        ),
        (
            Column::ProvisionedAt,
            update.provisioned_at.map(Expr::value),
        ),
        (
            Column::DeprovisionedAt,
            update.deprovisioned_at.map(Expr::value),
        ),
        (
            Column::SshPrivateKey,
            update.ssh_private_key.clone().map(Expr::value),
        ),
        (
            Column::SshPublicKey,
            update.ssh_public_key.clone().map(Expr::value),
        ),
    ];
    let mut query = Entity::update_many().filter(Column::Id.eq(id));
    for (column, value) in values {
        if let Some(value) = value {
            query = query.col_expr(column, value);
        }
    }
    if let Some(version) = update.observed_version {
        query = query
            .col_expr(Column::ObservedVersion, Expr::value(version))
            .col_expr(Column::LastReconciledAt, Expr::value(chrono::Utc::now()));
    }
    let result = query.exec(db).await?;
    if result.rows_affected == 0 {
        return Err(DbError::SubscriptionNotFound { id: id.to_owned() });
    }
    Ok(())
}

/// Ids of subscription rows deleted since the last call, removed as they are returned (each id
/// is handed out once). An id may belong to a row that was deleted and inserted again; treat it
/// as a hint to look at that id.
pub async fn take_deletions(db: &impl ConnectionTrait) -> Result<Vec<String>, DbError> {
    // DELETE .. RETURNING is atomic on both backends: two takers never get the same id.
    let sql = "DELETE FROM subscription_deletions RETURNING subscription_id";
    let rows = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?;
    let mut ids = rows
        .iter()
        .map(|row| row.try_get::<String>("", "subscription_id"))
        .collect::<Result<Vec<_>, _>>()?;
    ids.sort();
    Ok(ids)
}
