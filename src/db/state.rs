//! A small key/value table for the controller's own durable state (e.g. the fingerprint of the
//! configuration the last pass ran with).

use sea_orm::{ConnectionTrait, Statement};

use super::DbError;

/// The value stored under `key`, if any.
pub async fn get(db: &impl ConnectionTrait, key: &str) -> Result<Option<String>, DbError> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT value FROM vps_controller_state WHERE key = $1",
            [key.into()],
        ))
        .await?;
    match row {
        None => Ok(None),
        Some(row) => row
            .try_get::<String>("", "value")
            .map(Some)
            .map_err(|err| DbError::BadData {
                what: format!("vps_controller_state key {key:?}"),
                problem: format!("column value: {err}"),
            }),
    }
}

/// Stores `value` under `key`, replacing what was there.
pub async fn set(db: &impl ConnectionTrait, key: &str, value: &str) -> Result<(), DbError> {
    if key.is_empty() {
        return Err(DbError::InvalidInput {
            field: "key",
            problem: "must not be empty".into(),
        });
    }
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO vps_controller_state (key, value) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        [key.into(), value.into()],
    ))
    .await?;
    Ok(())
}
