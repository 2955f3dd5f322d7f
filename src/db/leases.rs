//! Leader election through a lease row. All times come from the database's clock, so replicas
//! with skewed clocks still agree on when a lease expires.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};

use super::DbError;

/// Longest lease accepted; guards against overflowing the database's date arithmetic.
const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Takes the lease `name` for `holder` if nobody holds it, it expired, or `holder` already
/// holds it (renewal). Returns whether `holder` holds it now, for `ttl` from now.
///
/// Atomic under concurrent callers: one conditional UPDATE (renew or take over an expired
/// lease), then, if no row matched, an INSERT that does nothing on conflict. On PostgreSQL a
/// competing UPDATE waits for the row lock and re-checks the condition on the new row.
pub async fn try_acquire(
    db: &impl ConnectionTrait,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<bool, DbError> {
    if ttl.is_zero() || ttl > MAX_TTL {
        return Err(DbError::InvalidInput {
            field: "ttl",
            problem: format!("{ttl:?} must be more than zero and at most 24 hours"),
        });
    }
    let backend = db.get_database_backend();
    let (now, expires, ttl_value) = match backend {
        DbBackend::Postgres => (
            "clock_timestamp()",
            "clock_timestamp() + make_interval(secs => $3)",
            Value::from(ttl.as_secs_f64()),
        ),
        // SQLite: fixed-width text timestamps compare correctly as strings.
        _ => (
            "strftime('%Y-%m-%d %H:%M:%f', 'now')",
            "strftime('%Y-%m-%d %H:%M:%f', 'now', $3)",
            Value::from(format!("+{:.3} seconds", ttl.as_secs_f64())),
        ),
    };
    let renewed = db
        .execute_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "UPDATE leases SET holder = $2, renewed_at = {now}, expires_at = {expires}
                 WHERE name = $1 AND (holder = $2 OR expires_at <= {now})"
            ),
            [name.into(), holder.into(), ttl_value.clone()],
        ))
        .await?;
    if renewed.rows_affected() > 0 {
        return Ok(true);
    }
    let inserted = db
        .execute_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "INSERT INTO leases (name, holder, renewed_at, expires_at)
                 VALUES ($1, $2, {now}, {expires})
                 ON CONFLICT (name) DO NOTHING"
            ),
            [name.into(), holder.into(), ttl_value],
        ))
        .await?;
    Ok(inserted.rows_affected() > 0)
}

/// Gives the lease up if `holder` holds it, so another replica can take over at once.
pub async fn release(db: &impl ConnectionTrait, name: &str, holder: &str) -> Result<(), DbError> {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "DELETE FROM leases WHERE name = $1 AND holder = $2",
        [name.into(), holder.into()],
    ))
    .await?;
    Ok(())
}
