//! Reading desired state and writing observed status back onto `subscriptions`.
//!
//! Rows are decoded one by one: the table belongs to the web app, and one row the controller
//! cannot read (a NULL id, a BLOB where text belongs) must never stop it from serving the others.

use sea_orm::{
    ConnectionTrait, DatabaseConnection, QueryResult, Statement, StreamTrait, TryGetable, Value,
};

use super::entities::subscription;
use super::leases::{self, Fence};
use super::{DbError, SEALED};

/// The query behind [`changed`]. Its WHERE clause contains the predicate of the partial index
/// `subscriptions_unreconciled_idx`, which is what lets the planner use that index; public so
/// tests can EXPLAIN it. Rows without an id cannot be reconciled and are left out.
pub const CHANGED_SQL: &str = "SELECT id, desired_version FROM subscriptions \
     WHERE desired_version <> observed_version AND id IS NOT NULL ORDER BY id";

/// Longest [`BadRow::problem`], in characters.
pub const MAX_PROBLEM_CHARS: usize = 300;
/// Characters of a subscription id quoted in an error (ids are the web app's: any length).
const MAX_QUOTED_ID_CHARS: usize = 64;

/// The columns [`subscription::Model`] is decoded from, in a SELECT list. [`decode`] reads
/// them by position, in this order.
const COLUMNS: &str = "id, user_id, stripe_subscription_id, status, plan, hetzner_server_id, \
     hetzner_ssh_key_id, hetzner_firewall_id, vps_ip_address, vps_hostname, provisioning_status, \
     provisioning_error, provisioned_at, deprovisioned_at, ssh_private_key, ssh_public_key, \
     desired_version, observed_version, last_reconciled_at, status_changed_at, ssh_key_origin, \
     ssh_host_key";

/// Every subscription the controller can read, and the ones it cannot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rows {
    /// Decoded rows, ordered by id.
    pub rows: Vec<subscription::Model>,
    /// Rows that did not decode, in the same order.
    pub bad: Vec<BadRow>,
}

/// A row of `subscriptions` the controller cannot read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// The row's id when it is readable text (or an integer), `None` otherwise.
    pub id: Option<String>,
    /// What is wrong, naming the column; at most [`MAX_PROBLEM_CHARS`] characters.
    pub problem: String,
    /// `provisioning_status` and `provisioning_error` as the row holds them now (`None` when
    /// unreadable), so a pass writes the row's error only when it is not there yet.
    pub provisioning_status: Option<String>,
    pub provisioning_error: Option<String>,
}

/// Every subscription, ordered by id. A row that does not decode lands in [`Rows::bad`]; it
/// never fails the call.
pub async fn all(db: &impl ConnectionTrait) -> Result<Rows, DbError> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT {COLUMNS} FROM subscriptions ORDER BY id"),
        ))
        .await?;
    let mut out = Rows::default();
    for row in &rows {
        match decode(row) {
            Ok(model) => out.rows.push(model),
            Err(problem) => out.bad.push(bad_row(row, problem)),
        }
    }
    Ok(out)
}

/// Most rows [`scan`] takes from the driver at once.
const SCAN_CHUNK_ROWS: usize = 256;

/// Every subscription in id order, handed to `each` one at a time as the database sends
/// them, decoded or not: the resync never holds the table in memory (at 10,000 rows the
/// driver's copies plus the decoded rows were tens of MiB at once).
pub async fn scan(
    db: &DatabaseConnection,
    mut each: impl FnMut(Result<subscription::Model, BadRow>),
) -> Result<(), DbError> {
    use futures::StreamExt;
    // Every row the driver has ready is taken at once: SQLite's driver thread hands rows over
    // a channel of 50 and waits whenever it is full, so taking them one by one woke that
    // thread once per row (10,000 futex round trips per resync), where this wakes it about
    // once per 50.
    let mut rows = db
        .stream_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT {COLUMNS} FROM subscriptions ORDER BY id"),
        ))
        .await?
        .ready_chunks(SCAN_CHUNK_ROWS);
    while let Some(ready) = rows.next().await {
        for row in ready {
            let row = row?;
            each(decode(&row).map_err(|problem| bad_row(&row, problem)));
        }
    }
    Ok(())
}

/// Rows per `provisioning_status` (one grouped query, for the metrics between resyncs).
pub async fn count_by_status(
    db: &impl ConnectionTrait,
) -> Result<std::collections::BTreeMap<String, i64>, DbError> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT provisioning_status, COUNT(*) AS n FROM subscriptions GROUP BY provisioning_status"
                .to_string(),
        ))
        .await?;
    let mut out = std::collections::BTreeMap::new();
    for row in &rows {
        // A status that is not text (a BLOB in SQLite) counts as `other` in the metrics.
        let status = row
            .try_get::<String>("", "provisioning_status")
            .unwrap_or_else(|_| "<unreadable>".into());
        let count: i64 = row.try_get("", "n").unwrap_or(0);
        *out.entry(status).or_insert(0) += count;
    }
    Ok(out)
}

/// The row with this id, if any. A row that exists but does not decode is
/// [`DbError::BadData`] naming the column.
pub async fn get(
    db: &impl ConnectionTrait,
    id: &str,
) -> Result<Option<subscription::Model>, DbError> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            format!("SELECT {COLUMNS} FROM subscriptions WHERE id = $1"),
            [id.into()],
        ))
        .await?;
    match row {
        None => Ok(None),
        Some(row) => decode(&row).map(Some).map_err(|problem| DbError::BadData {
            // Ids can be any length: quote enough to find the row, not all of it.
            what: format!("subscription {:?}", shortened(id, MAX_QUOTED_ID_CHARS)),
            problem,
        }),
    }
}

/// `(id, desired_version)` of the rows whose spec changed since the controller last finished a
/// pass on them (`desired_version <> observed_version`), ordered by id. Rows without a readable
/// id or version are skipped ([`all`] reports them).
pub async fn changed(db: &impl ConnectionTrait) -> Result<Vec<(String, i64)>, DbError> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            CHANGED_SQL,
        ))
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let id = row.try_get::<String>("", "id").ok()?;
            let version = row.try_get::<i64>("", "desired_version").ok()?;
            Some((id, version))
        })
        .collect())
}

/// Decodes one row selected with [`COLUMNS`], or says which column is wrong and how.
fn decode(row: &QueryResult) -> Result<subscription::Model, String> {
    let mut next = Cursor { row, at: 0 };
    // Fields are evaluated in the order written: the order of COLUMNS.
    let model = subscription::Model {
        id: next.required("id")?,
        user_id: next.column("user_id")?,
        stripe_subscription_id: next.column("stripe_subscription_id")?,
        status: next.column("status")?,
        plan: next.column("plan")?,
        hetzner_server_id: next.column("hetzner_server_id")?,
        hetzner_ssh_key_id: next.column("hetzner_ssh_key_id")?,
        hetzner_firewall_id: next.column("hetzner_firewall_id")?,
        vps_ip_address: next.column("vps_ip_address")?,
        vps_hostname: next.column("vps_hostname")?,
        provisioning_status: next.required("provisioning_status")?,
        provisioning_error: next.column("provisioning_error")?,
        provisioned_at: next.column("provisioned_at")?,
        deprovisioned_at: next.column("deprovisioned_at")?,
        ssh_private_key: next.column("ssh_private_key")?,
        ssh_public_key: next.column("ssh_public_key")?,
        desired_version: next.required("desired_version")?,
        observed_version: next.required("observed_version")?,
        last_reconciled_at: next.column("last_reconciled_at")?,
        status_changed_at: next.column("status_changed_at")?,
        ssh_key_origin: next.column("ssh_key_origin")?,
        ssh_host_key: next.column("ssh_host_key")?,
    };
    Ok(model)
}

/// Reads a row's columns by position, in the order of [`COLUMNS`]: a lookup by name hashes
/// the name, 22 times per row on every resync.
struct Cursor<'a> {
    row: &'a QueryResult,
    at: usize,
}

impl Cursor<'_> {
    /// The next column, which is `name` in [`COLUMNS`].
    fn column<T: TryGetable>(&mut self, name: &str) -> Result<T, String> {
        let index = self.at;
        self.at += 1;
        debug_assert_eq!(COLUMNS.split(',').nth(index).map(str::trim), Some(name));
        self.row.try_get_by_index::<T>(index).map_err(|err| {
            // sqlx says "error occurred while decoding column 3: <why>"; keep the why.
            let text = err.to_string();
            let marker = format!("decoding column {index}: ");
            let why = text
                .split_once(&marker)
                .map_or(text.as_str(), |(_, why)| why);
            bounded(format!("column {name}: {why}"))
        })
    }

    fn required<T: TryGetable>(&mut self, name: &str) -> Result<T, String> {
        self.column::<Option<T>>(name)?
            .ok_or_else(|| format!("column {name} is NULL but the controller needs a value"))
    }
}

/// A row that did not decode: what can still be read of it, and `problem`.
fn bad_row(row: &QueryResult, problem: String) -> BadRow {
    BadRow {
        id: raw_id(row),
        problem,
        provisioning_status: row.try_get("", "provisioning_status").ok(),
        provisioning_error: row.try_get("", "provisioning_error").ok().flatten(),
    }
}

/// The id of a row that did not decode, if it can be read at all.
fn raw_id(row: &QueryResult) -> Option<String> {
    let id = match row.try_get::<Option<String>>("", "id") {
        Ok(id) => id,
        Err(_) => row
            .try_get::<Option<i64>>("", "id")
            .ok()
            .flatten()
            .map(|id| id.to_string()),
    };
    // Kept whole: the id names the row's resources; a shortened one would make them
    // look like orphans. Shorten it only for display.
    id
}

/// Cuts `text` to [`MAX_PROBLEM_CHARS`] characters, ending with `…` when cut.
fn bounded(text: String) -> String {
    shortened(&text, MAX_PROBLEM_CHARS)
}

/// At most `max` characters of `text`, the last one `…` when it was cut.
fn shortened(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some(_) => {
            let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
            cut.push('…');
            cut
        }
    }
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
    /// Where the row's key pair came from: `None`/`controller` (the controller generated and
    /// sealed it) or `external` (written by someone else; the controller cannot open it).
    pub ssh_key_origin: Option<Option<String>>,
    /// The host key the server must present (public, OpenSSH line).
    pub ssh_host_key: Option<Option<String>>,
    /// The desired_version a pass finished for (successfully or terminally failed). Setting it
    /// also stamps `last_reconciled_at` with the current time.
    pub observed_version: Option<i64>,
}

impl StatusUpdate {
    /// True when the update writes nothing.
    pub fn is_empty(&self) -> bool {
        *self == StatusUpdate::default()
    }

    /// `(column, value)` for every field to write.
    fn assignments(&self) -> Vec<(&'static str, Value)> {
        let fields: [(&'static str, Option<Value>); 14] = [
            (
                "provisioning_status",
                self.provisioning_status.clone().map(Value::from),
            ),
            (
                "provisioning_error",
                self.provisioning_error.clone().map(Value::from),
            ),
            ("hetzner_server_id", self.hetzner_server_id.map(Value::from)),
            (
                "hetzner_ssh_key_id",
                self.hetzner_ssh_key_id.map(Value::from),
            ),
            (
                "hetzner_firewall_id",
                self.hetzner_firewall_id.map(Value::from),
            ),
            (
                "vps_ip_address",
                self.vps_ip_address.clone().map(Value::from),
            ),
            ("vps_hostname", self.vps_hostname.clone().map(Value::from)),
            ("provisioned_at", self.provisioned_at.map(Value::from)),
            ("deprovisioned_at", self.deprovisioned_at.map(Value::from)),
            (
                "ssh_private_key",
                self.ssh_private_key.clone().map(Value::from),
            ),
            (
                "ssh_public_key",
                self.ssh_public_key.clone().map(Value::from),
            ),
            (
                "ssh_key_origin",
                self.ssh_key_origin.clone().map(Value::from),
            ),
            ("ssh_host_key", self.ssh_host_key.clone().map(Value::from)),
            ("observed_version", self.observed_version.map(Value::from)),
        ];
        let mut assignments: Vec<_> = fields
            .into_iter()
            .filter_map(|(column, value)| value.map(|value| (column, value)))
            .collect();
        if self.observed_version.is_some() {
            assignments.push(("last_reconciled_at", Value::from(chrono::Utc::now())));
        }
        assignments
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
            .field("ssh_key_origin", &self.ssh_key_origin)
            .field("ssh_host_key", &self.ssh_host_key)
            .field("observed_version", &self.observed_version)
            .finish()
    }
}

/// Writes the `Some(..)` fields of `update` onto the row. Never touches spec columns or
/// `desired_version`, so the version triggers stay quiet.
///
/// With a fence, the UPDATE itself checks that the fence still holds the leader lease (same
/// statement, database clock), so a replica that lost the lease cannot overwrite the new
/// leader's work. Fails with [`DbError::LeaseLost`] when the fence no longer holds and
/// [`DbError::SubscriptionNotFound`] when the row is gone.
pub async fn write_status(
    db: &impl ConnectionTrait,
    fence: Option<&Fence>,
    id: &str,
    update: &StatusUpdate,
) -> Result<(), DbError> {
    if update.is_empty() {
        return Ok(());
    }
    let backend = db.get_database_backend();
    let mut values: Vec<Value> = Vec::new();
    let mut sets = Vec::new();
    for (column, value) in update.assignments() {
        values.push(value);
        sets.push(format!("{column} = ${}", values.len()));
    }
    values.push(id.into());
    let mut sql = format!(
        "UPDATE subscriptions SET {} WHERE id = ${}",
        sets.join(", "),
        values.len()
    );
    if let Some(fence) = fence {
        sql.push_str(" AND ");
        sql.push_str(&leases::fence_sql(backend, values.len() + 1));
        values.extend(leases::fence_values(fence));
    }
    let result = db
        .execute_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    if result.rows_affected() > 0 {
        return Ok(());
    }
    if fence.is_some() && exists(db, id).await? {
        return Err(DbError::LeaseLost);
    }
    Err(DbError::SubscriptionNotFound { id: id.to_owned() })
}

async fn exists(db: &impl ConnectionTrait, id: &str) -> Result<bool, DbError> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT 1 AS found FROM subscriptions WHERE id = $1",
            [id.into()],
        ))
        .await?;
    Ok(row.is_some())
}

/// Sets `provisioning_error = message` on every row still waiting for a server
/// (`provisioning_status` pending or provisioning) whose error differs; returns how many rows
/// changed. For causes that hold for the whole project (Hetzner rejects the token, or cannot
/// be reached), so users see why nothing happens. Fenced like [`write_status`]: with a fence
/// that no longer holds, nothing is written and the result is [`DbError::LeaseLost`].
pub async fn write_error_on_waiting(
    db: &impl ConnectionTrait,
    fence: Option<&Fence>,
    message: &str,
) -> Result<u64, DbError> {
    let backend = db.get_database_backend();
    let mut sql = "UPDATE subscriptions SET provisioning_error = $1
         WHERE provisioning_status IN ('pending', 'provisioning')
           AND (provisioning_error IS NULL OR provisioning_error <> $1)"
        .to_owned();
    let mut values: Vec<Value> = vec![message.into()];
    if let Some(fence) = fence {
        sql.push_str(" AND ");
        sql.push_str(&leases::fence_sql(backend, 2));
        values.extend(leases::fence_values(fence));
    }
    let changed = db
        .execute_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?
        .rows_affected();
    // Nothing changed: either nothing needed to, or the fence failed. Only the latter is an
    // error the caller must act on.
    if changed == 0
        && let Some(fence) = fence
        && !leases::holds(db, fence).await?
    {
        return Err(DbError::LeaseLost);
    }
    Ok(changed)
}

/// Asks for a fresh reconcile pass: with an id, of that row; without, of every row whose
/// `provisioning_status` is `failed` (e.g. after fixing a project-wide cause). Sets
/// `observed_version = -1`, which no version ever equals, so [`changed`] returns the rows; it is
/// not a spec column, so no trigger fires (the controller sees it on its next poll or resync,
/// not through NOTIFY). Returns how many rows were marked.
pub async fn retry(db: &impl ConnectionTrait, id: Option<&str>) -> Result<u64, DbError> {
    let backend = db.get_database_backend();
    let statement = match id {
        Some(id) => Statement::from_sql_and_values(
            backend,
            "UPDATE subscriptions SET observed_version = -1 WHERE id = $1",
            [id.into()],
        ),
        None => Statement::from_string(
            backend,
            "UPDATE subscriptions SET observed_version = -1 WHERE provisioning_status = 'failed'",
        ),
    };
    Ok(db.execute_raw(statement).await?.rows_affected())
}

/// Which Hetzner id column [`recorded_elsewhere`] looks in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordedColumn {
    Server,
    SshKey,
    Firewall,
}

/// Ids of the rows other than `except_id` that record `resource_id` in `column`: a resource
/// recorded on two rows belongs to neither until an operator decides (two customers must
/// never share a server). Uses the index on `hetzner_server_id` for servers.
pub async fn recorded_elsewhere(
    db: &impl ConnectionTrait,
    column: RecordedColumn,
    resource_id: i64,
    except_id: &str,
) -> Result<Vec<String>, DbError> {
    let column = match column {
        RecordedColumn::Server => "hetzner_server_id",
        RecordedColumn::SshKey => "hetzner_ssh_key_id",
        RecordedColumn::Firewall => "hetzner_firewall_id",
    };
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            format!(
                "SELECT id FROM subscriptions WHERE {column} = $1 AND id IS NOT NULL AND id <> $2 \
                 ORDER BY id LIMIT 10"
            ),
            [resource_id.into(), except_id.into()],
        ))
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| row.try_get::<String>("", "id").ok())
        .collect())
}

/// Ids of subscription rows deleted since the last call, removed as they are returned (each id
/// is handed out once). An id may belong to a row that was deleted and inserted again; treat it
/// as a hint to look at that id.
///
/// With a fence, only while it still holds the lease (checked in the same statement): a
/// replica that lost it never takes the new leader's notices.
pub async fn take_deletions(
    db: &impl ConnectionTrait,
    fence: Option<&Fence>,
) -> Result<Vec<String>, DbError> {
    // DELETE .. RETURNING is atomic on both backends: two takers never get the same id.
    let backend = db.get_database_backend();
    let statement = match fence {
        None => Statement::from_string(
            backend,
            "DELETE FROM subscription_deletions RETURNING subscription_id",
        ),
        Some(fence) => Statement::from_sql_and_values(
            backend,
            format!(
                "DELETE FROM subscription_deletions WHERE {} RETURNING subscription_id",
                leases::fence_sql(backend, 1)
            ),
            leases::fence_values(fence),
        ),
    };
    let rows = db.query_all_raw(statement).await?;
    // The notices are taken now: one id that is not text (a BLOB id on SQLite, cast to
    // invalid UTF-8) must not lose the others. No row with such an id can be reconciled,
    // so there is nothing to tear down for it.
    let mut unreadable = 0;
    let mut ids: Vec<String> = rows
        .iter()
        .filter_map(|row| {
            let id = row.try_get::<String>("", "subscription_id").ok();
            unreadable += usize::from(id.is_none());
            id
        })
        .collect();
    if unreadable > 0 {
        tracing::warn!(
            unreadable,
            "deleted subscription rows whose id is not text were skipped"
        );
    }
    ids.sort();
    Ok(ids)
}
