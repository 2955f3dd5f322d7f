//! The server-deletion budget: a durable brake on destroying customer disks.
//!
//! Every server deletion first asks [`reserve`]. Deletions are counted in the database, so the
//! budget holds across restarts and leader failovers. Past the budget the guard pauses: every
//! further deletion is refused until an operator [`approve`]s, which starts a fresh window
//! (earlier deletions no longer count) and may grant extra deletions on top of the budget.

use sea_orm::prelude::DateTimeUtc;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, Statement,
    TransactionTrait,
};

use super::DbError;
use super::leases::{self, Fence};

/// Deletion records older than this are dropped (only the last hour counts).
const KEEP_RECORDS: &str = "7 days";

/// The answer to a deletion request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Delete; the deletion is already recorded.
    Granted,
    /// Do not delete. `newly` is true for the request that tripped the guard (report it once).
    Paused {
        newly: bool,
        deleted_in_window: u64,
        budget: u64,
    },
}

/// What the guard looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardStatus {
    /// When deletions were paused; `None` while they are allowed.
    pub paused_since: Option<DateTimeUtc>,
    pub pause_reason: Option<String>,
    /// Server deletions recorded in the last hour, whatever the window.
    pub deleted_last_hour: u64,
    /// Of those, the ones since the last approval: what counts against the budget.
    pub deleted_in_window: u64,
    /// Deletions allowed beyond the budget, granted by the last approval and not yet used.
    pub extra_allowance: u64,
    /// The last approval; deletions before it no longer count.
    pub window_start: Option<DateTimeUtc>,
}

/// Database clock expressions: now, one hour ago, and the record retention cut-off. PostgreSQL
/// uses clock_timestamp(), not the transaction's start time, so a request that waited for the
/// guard's lock is timed after the approval it waited for.
fn clock(backend: DbBackend) -> (&'static str, String, String) {
    match backend {
        DbBackend::Postgres => (
            "clock_timestamp()",
            "clock_timestamp() - interval '1 hour'".into(),
            format!("clock_timestamp() - interval '{KEEP_RECORDS}'"),
        ),
        _ => (
            "strftime('%Y-%m-%d %H:%M:%f', 'now')",
            "strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 hour')".into(),
            format!("strftime('%Y-%m-%d %H:%M:%f', 'now', '-{KEEP_RECORDS}')"),
        ),
    }
}

/// Counts deletions in the last hour, since `window_start` (inclusive) when it is set.
fn counts_sql(backend: DbBackend) -> String {
    let (_, hour_ago, _) = clock(backend);
    format!(
        "SELECT
             (SELECT count(*) FROM vps_controller_server_deletions
               WHERE deleted_at > {hour_ago}) AS last_hour,
             (SELECT count(*) FROM vps_controller_server_deletions
               WHERE deleted_at > {hour_ago}
                 AND (g.window_start IS NULL OR deleted_at >= g.window_start)) AS in_window,
             CAST(CASE WHEN g.paused_at IS NULL THEN 0 ELSE 1 END AS BIGINT) AS paused,
             g.paused_at, g.pause_reason, g.window_start, g.extra_allowance
         FROM vps_controller_deletion_guard g WHERE g.id = 1"
    )
}

/// Asks to delete server `server_id` (of `subscription_key`), with at most `budget_per_hour`
/// deletions counted in the window. Atomic: concurrent callers, in this process or others,
/// never get more grants than the budget (plus approved extras).
///
/// With a fence, refuses with [`DbError::LeaseLost`] unless the fence still holds the lease
/// (checked under lock in the same transaction that records the deletion).
pub async fn reserve(
    db: &DatabaseConnection,
    fence: Option<&Fence>,
    server_id: i64,
    subscription_key: &str,
    budget_per_hour: u64,
) -> Result<Reservation, DbError> {
    let txn = db.begin().await?;
    let outcome = reserve_in(&txn, fence, server_id, subscription_key, budget_per_hour).await;
    match outcome {
        Ok(reservation) => {
            txn.commit().await?;
            Ok(reservation)
        }
        Err(err) => {
            // Rolled back on drop as well; an explicit rollback releases the lock sooner.
            let _ = txn.rollback().await;
            Err(err)
        }
    }
}

async fn reserve_in(
    txn: &DatabaseTransaction,
    fence: Option<&Fence>,
    server_id: i64,
    subscription_key: &str,
    budget_per_hour: u64,
) -> Result<Reservation, DbError> {
    let backend = txn.get_database_backend();
    let (now, hour_ago, keep_after) = clock(backend);
    let exec = |sql: String, values: Vec<sea_orm::Value>| {
        txn.execute_raw(Statement::from_sql_and_values(backend, sql, values))
    };

    // Serialize every reservation on the guard row. SQLite: the first statement is a write,
    // so the transaction holds the database's write lock from here on (no lock upgrade that
    // could fail with SQLITE_BUSY). PostgreSQL: a row lock.
    exec(
        "INSERT INTO vps_controller_deletion_guard (id) VALUES (1) ON CONFLICT (id) DO NOTHING"
            .into(),
        vec![],
    )
    .await?;
    let lock = match backend {
        DbBackend::Postgres => {
            "SELECT id FROM vps_controller_deletion_guard WHERE id = 1 FOR UPDATE"
        }
        _ => "UPDATE vps_controller_deletion_guard SET id = id WHERE id = 1",
    };
    exec(lock.into(), vec![]).await?;

    if let Some(fence) = fence {
        // FOR SHARE: a takeover of the lease waits until this transaction ends.
        let share = if backend == DbBackend::Postgres {
            " FOR SHARE"
        } else {
            ""
        };
        let held = txn
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                format!(
                    "SELECT 1 AS held FROM leases WHERE name = $1 AND holder = $2 AND epoch = $3 \
                     AND expires_at > {}{share}",
                    leases::now_sql(backend)
                ),
                leases::fence_values(fence),
            ))
            .await?;
        if held.is_none() {
            return Err(DbError::LeaseLost);
        }
    }

    // A retry of a deletion already granted (the shutdown timed out, Hetzner failed, the
    // lease moved) is not counted twice: one server costs the budget once.
    let granted_before = txn
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "SELECT 1 AS granted FROM vps_controller_server_deletions \
                 WHERE server_id = $1 AND deleted_at > {hour_ago}"
            ),
            [server_id.into()],
        ))
        .await?;
    if granted_before.is_some() {
        return Ok(Reservation::Granted);
    }

    let row = txn
        .query_one_raw(Statement::from_string(backend, counts_sql(backend)))
        .await?
        .ok_or_else(|| DbError::NotMigrated("the deletion guard row is missing".into()))?;
    let in_window = count(&row, "in_window")?;
    let paused = get::<i64>(&row, "paused")? != 0;
    let extra = count(&row, "extra_allowance")?;
    if paused {
        return Ok(Reservation::Paused {
            newly: false,
            deleted_in_window: in_window,
            budget: budget_per_hour,
        });
    }

    let grant = if in_window < budget_per_hour {
        true
    } else if extra > 0 {
        exec(
            "UPDATE vps_controller_deletion_guard SET extra_allowance = extra_allowance - 1 \
             WHERE id = 1"
                .into(),
            vec![],
        )
        .await?;
        true
    } else {
        false
    };
    if grant {
        exec(
            format!(
                "INSERT INTO vps_controller_server_deletions
                     (server_id, subscription_key, deleted_at)
                 VALUES ($1, $2, {now})"
            ),
            vec![server_id.into(), subscription_key.into()],
        )
        .await?;
        exec(
            format!("DELETE FROM vps_controller_server_deletions WHERE deleted_at < {keep_after}"),
            vec![],
        )
        .await?;
        return Ok(Reservation::Granted);
    }

    let reason = format!(
        "server deletions paused: {in_window} deleted within the last hour (since the last \
         approval), budget {budget_per_hour} per hour; check why so many servers are being \
         deleted, then approve to continue"
    );
    exec(
        format!(
            "UPDATE vps_controller_deletion_guard SET paused_at = {now}, pause_reason = $1 \
             WHERE id = 1"
        ),
        vec![reason.into()],
    )
    .await?;
    Ok(Reservation::Paused {
        newly: true,
        deleted_in_window: in_window,
        budget: budget_per_hour,
    })
}

/// The guard's state and the deletion counts.
pub async fn status(db: &impl ConnectionTrait) -> Result<GuardStatus, DbError> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_string(backend, counts_sql(backend)))
        .await?;
    let Some(row) = row else {
        return Err(DbError::NotMigrated(
            "the deletion guard row is missing".into(),
        ));
    };
    Ok(GuardStatus {
        paused_since: get(&row, "paused_at")?,
        pause_reason: get(&row, "pause_reason")?,
        deleted_last_hour: count(&row, "last_hour")?,
        deleted_in_window: count(&row, "in_window")?,
        extra_allowance: count(&row, "extra_allowance")?,
        window_start: get(&row, "window_start")?,
    })
}

/// Lifts a pause: starts a fresh window now (deletions before it no longer count) and allows
/// `extra` deletions beyond the budget until they are used. Returns the new state.
pub async fn approve(db: &impl ConnectionTrait, extra: u64) -> Result<GuardStatus, DbError> {
    let extra = i64::try_from(extra).map_err(|_| DbError::InvalidInput {
        field: "extra",
        problem: format!("{extra} is too large"),
    })?;
    let backend = db.get_database_backend();
    let (now, _, _) = clock(backend);
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        format!(
            "INSERT INTO vps_controller_deletion_guard
                 (id, paused_at, pause_reason, window_start, extra_allowance)
             VALUES (1, NULL, NULL, {now}, $1)
             ON CONFLICT (id) DO UPDATE SET paused_at = NULL, pause_reason = NULL,
                 window_start = EXCLUDED.window_start,
                 extra_allowance = EXCLUDED.extra_allowance"
        ),
        [extra.into()],
    ))
    .await?;
    status(db).await
}

/// How many subscriptions have a server recorded (`hetzner_server_id IS NOT NULL`): the fleet
/// size a deletion budget can be derived from.
pub async fn managed_servers(db: &impl ConnectionTrait) -> Result<u64, DbError> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT count(*) AS n FROM subscriptions WHERE hetzner_server_id IS NOT NULL",
        ))
        .await?;
    match row {
        Some(row) => count(&row, "n"),
        None => Ok(0),
    }
}

fn get<T: sea_orm::TryGetable>(row: &sea_orm::QueryResult, column: &str) -> Result<T, DbError> {
    row.try_get("", column).map_err(|err| DbError::BadData {
        what: "the deletion guard".into(),
        problem: format!("column {column}: {err}"),
    })
}

/// A non-negative count; a negative stored value (edited by hand) counts as zero.
fn count(row: &sea_orm::QueryResult, column: &str) -> Result<u64, DbError> {
    Ok(u64::try_from(get::<i64>(row, column)?).unwrap_or(0))
}
