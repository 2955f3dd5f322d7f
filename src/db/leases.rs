//! Leader election through a lease row, and fencing. All times come from the database's clock,
//! so replicas with skewed clocks still agree on when a lease expires.
//!
//! Every acquisition that is not a renewal of a live lease by its holder gets a new, larger
//! `epoch`. A [`Fence`] (holder + epoch) names one uninterrupted tenure: fenced writes check, in
//! the same statement, that the lease is still held with that epoch and has not expired, so a
//! replica that lost the lease (even for a moment) cannot write with an old fence.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};

use super::DbError;

/// Name of the controller's leader lease; fenced writes check this lease.
pub const LEASE_NAME: &str = "vps-controller";

/// Longest lease accepted; guards against overflowing the database's date arithmetic.
const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Proof of one uninterrupted tenure of a lease: who holds it and in which epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub holder: String,
    pub epoch: i64,
}

/// The database's current time, as the lease columns store it. SQLite: fixed-width text
/// timestamps that compare correctly as strings.
pub(crate) fn now_sql(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => "clock_timestamp()",
        _ => "strftime('%Y-%m-%d %H:%M:%f', 'now')",
    }
}

/// `EXISTS (..)` that holds while `fence` still holds [`LEASE_NAME`], with its parameters
/// numbered from `$first` (lease name, holder, epoch).
pub(crate) fn fence_sql(backend: DbBackend, first: usize) -> String {
    format!(
        "EXISTS (SELECT 1 FROM leases WHERE name = ${} AND holder = ${} AND epoch = ${} \
         AND expires_at > {})",
        first,
        first + 1,
        first + 2,
        now_sql(backend)
    )
}

/// The values for [`fence_sql`]'s parameters.
pub(crate) fn fence_values(fence: &Fence) -> [Value; 3] {
    [
        LEASE_NAME.into(),
        fence.holder.clone().into(),
        fence.epoch.into(),
    ]
}

/// Whether `fence` still holds the lease right now.
pub async fn holds(db: &impl ConnectionTrait, fence: &Fence) -> Result<bool, DbError> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            format!("SELECT 1 AS held WHERE {}", fence_sql(backend, 1)),
            fence_values(fence),
        ))
        .await?;
    Ok(row.is_some())
}

/// Takes the lease `name` for `holder` if nobody holds it, it expired, or `holder` already
/// holds it (renewal). Returns the fence when `holder` holds it now, for `ttl` from now.
///
/// A renewal of a live lease keeps the epoch; anything else (a fresh lease, taking over an
/// expired one, the same holder coming back after its lease lapsed) bumps it, so fences from
/// before the gap stop working.
///
/// Atomic under concurrent callers: one conditional UPDATE (renew or take over an expired
/// lease), then, if no row matched, an INSERT that does nothing on conflict. On PostgreSQL a
/// competing UPDATE waits for the row lock and re-checks the condition on the new row.
pub async fn try_acquire(
    db: &impl ConnectionTrait,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<Option<Fence>, DbError> {
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(DbError::InvalidInput {
            field: "ttl",
            problem: format!(
                "{} ms must be more than zero and at most 24 hours",
                ttl.as_millis()
            ),
        });
    }
    let backend = db.get_database_backend();
    let now = now_sql(backend);
    let (expires, ttl_value) = match backend {
        DbBackend::Postgres => (
            "clock_timestamp() + make_interval(secs => $3)",
            Value::from(ttl.as_secs_f64()),
        ),
        _ => (
            "strftime('%Y-%m-%d %H:%M:%f', 'now', $3)",
            Value::from(format!("+{:.3} seconds", ttl.as_secs_f64())),
        ),
    };
    // SET expressions all see the old row, so the CASE compares with the previous holder.
    let renewed = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "UPDATE leases SET
                     epoch = CASE WHEN holder = $2 AND expires_at > {now}
                                  THEN epoch ELSE epoch + 1 END,
                     holder = $2, renewed_at = {now}, expires_at = {expires}
                 WHERE name = $1 AND (holder = $2 OR expires_at <= {now})
                 RETURNING epoch"
            ),
            [name.into(), holder.into(), ttl_value.clone()],
        ))
        .await?;
    let fence = |epoch: i64| Fence {
        holder: holder.to_owned(),
        epoch,
    };
    if let Some(row) = renewed {
        return Ok(Some(fence(row.try_get("", "epoch")?)));
    }
    let inserted = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "INSERT INTO leases (name, holder, renewed_at, expires_at, epoch)
                 VALUES ($1, $2, {now}, {expires}, 1)
                 ON CONFLICT (name) DO NOTHING
                 RETURNING epoch"
            ),
            [name.into(), holder.into(), ttl_value],
        ))
        .await?;
    match inserted {
        Some(row) => Ok(Some(fence(row.try_get("", "epoch")?))),
        None => Ok(None),
    }
}

/// Gives the lease up if `holder` holds it, so another replica can take over at once. The row
/// stays (expired) so the next tenure's epoch is larger than every earlier one.
pub async fn release(db: &impl ConnectionTrait, name: &str, holder: &str) -> Result<(), DbError> {
    let backend = db.get_database_backend();
    let now = now_sql(backend);
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        format!(
            "UPDATE leases SET expires_at = {now}
             WHERE name = $1 AND holder = $2 AND expires_at > {now}"
        ),
        [name.into(), holder.into()],
    ))
    .await?;
    Ok(())
}
