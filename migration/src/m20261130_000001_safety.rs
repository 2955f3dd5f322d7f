//! Safety: when a row entered its status, where its SSH key came from, this database's
//! installation id, fenced leases, a NULL-tolerant deletion trigger, the durable server-deletion
//! guard and a small key/value table for the controller's own state.
//!
//! Idempotent like the first migration (IF NOT EXISTS, CREATE OR REPLACE, column checks, inserts
//! that do nothing on conflict), so re-running it after a partial failure finishes the job and
//! never replaces the installation id.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261130_000001_safety"
    }
}

/// (table, column, SQLite declaration, PostgreSQL declaration, PostgreSQL type an existing
/// column must have so the controller can decode it).
const ADDED_COLUMNS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "subscriptions",
        "status_changed_at",
        "TIMESTAMP",
        "TIMESTAMPTZ",
        "timestamp with time zone",
    ),
    ("subscriptions", "ssh_key_origin", "TEXT", "TEXT", "text"),
    (
        "leases",
        "epoch",
        "BIGINT NOT NULL DEFAULT 0",
        "BIGINT NOT NULL DEFAULT 0",
        "bigint",
    ),
];

/// SQLite's clock as the text the entities decode (`YYYY-MM-DD HH:MM:SS.SSS`, UTC); fixed width,
/// so these timestamps compare correctly as strings.
macro_rules! sqlite_now {
    () => {
        "strftime('%Y-%m-%d %H:%M:%f', 'now')"
    };
}

const SQLITE_STATEMENTS: &[&str] = &[
    // Rows that predate the column entered their status at some unknown earlier time; now is
    // the only honest lower bound we have. The UPDATE touches no column any trigger watches.
    concat!(
        "UPDATE subscriptions SET status_changed_at = ",
        sqlite_now!(),
        " WHERE status_changed_at IS NULL"
    ),
    // NEW.status IS NOT OLD.status compares by value (NULL-safe). The inner UPDATEs touch only
    // status_changed_at, which no trigger's UPDATE OF list names: nothing recurses and
    // desired_version is left alone (the status change itself already bumps it).
    // ROW_MATCH is replaced by `rowid = NEW.rowid` (id may be NULL) or, on a WITHOUT ROWID
    // table, by `id = NEW.id`.
    concat!(
        "CREATE TRIGGER IF NOT EXISTS subscriptions_status_changed_at_insert
        AFTER INSERT ON subscriptions
        FOR EACH ROW
        WHEN NEW.status_changed_at IS NULL
        BEGIN
            UPDATE subscriptions SET status_changed_at = ",
        sqlite_now!(),
        " WHERE ROW_MATCH;
        END"
    ),
    concat!(
        "CREATE TRIGGER IF NOT EXISTS subscriptions_status_changed_at_update
        AFTER UPDATE OF status ON subscriptions
        FOR EACH ROW
        WHEN OLD.status IS NOT NEW.status
        BEGIN
            UPDATE subscriptions SET status_changed_at = ",
        sqlite_now!(),
        " WHERE ROW_MATCH;
        END"
    ),
    // A web-app row with a NULL id can be deleted; there is nothing to record for it. CAST:
    // the deletions table must only ever hold text, whatever the web app stored in id.
    "DROP TRIGGER IF EXISTS subscriptions_record_deletion",
    concat!(
        "CREATE TRIGGER subscriptions_record_deletion
        AFTER DELETE ON subscriptions
        FOR EACH ROW
        WHEN OLD.id IS NOT NULL
        BEGIN
            INSERT OR REPLACE INTO subscription_deletions (subscription_id, deleted_at)
            VALUES (CAST(OLD.id AS TEXT), ",
        sqlite_now!(),
        ");
        END"
    ),
    concat!(
        "CREATE TABLE IF NOT EXISTS vps_controller_installation (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        installation_id TEXT NOT NULL,
        bound_to TEXT,
        created_at TIMESTAMP NOT NULL DEFAULT (",
        sqlite_now!(),
        "))"
    ),
    // 16 lowercase hex characters: a valid Hetzner label value. Never replaced.
    "INSERT INTO vps_controller_installation (id, installation_id)
        VALUES (1, lower(hex(randomblob(8))))
        ON CONFLICT (id) DO NOTHING",
    "CREATE TABLE IF NOT EXISTS vps_controller_deletion_guard (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        paused_at TIMESTAMP,
        pause_reason TEXT,
        window_start TIMESTAMP,
        extra_allowance BIGINT NOT NULL DEFAULT 0
    )",
    "INSERT INTO vps_controller_deletion_guard (id) VALUES (1) ON CONFLICT (id) DO NOTHING",
    concat!(
        "CREATE TABLE IF NOT EXISTS vps_controller_server_deletions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        server_id BIGINT NOT NULL,
        subscription_key TEXT NOT NULL,
        deleted_at TIMESTAMP NOT NULL DEFAULT (",
        sqlite_now!(),
        "))"
    ),
    "CREATE INDEX IF NOT EXISTS vps_controller_server_deletions_deleted_at_idx
        ON vps_controller_server_deletions (deleted_at)",
    "CREATE TABLE IF NOT EXISTS vps_controller_state (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    )",
];

const PG_STATEMENTS: &[&str] = &[
    "UPDATE subscriptions SET status_changed_at = now() WHERE status_changed_at IS NULL",
    // Sets only status_changed_at: desired_version stays the spec trigger's business.
    "CREATE OR REPLACE FUNCTION vps_controller_status_changed_at() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                IF NEW.status_changed_at IS NULL THEN
                    NEW.status_changed_at := now();
                END IF;
            ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
                NEW.status_changed_at := now();
            END IF;
            RETURN NEW;
        END $$",
    "DROP TRIGGER IF EXISTS subscriptions_status_changed_at ON subscriptions",
    "CREATE TRIGGER subscriptions_status_changed_at
        BEFORE INSERT OR UPDATE ON subscriptions
        FOR EACH ROW EXECUTE FUNCTION vps_controller_status_changed_at()",
    // Replaces the first migration's function: a row with a NULL id is deleted without record.
    "CREATE OR REPLACE FUNCTION vps_controller_record_deletion() RETURNS trigger
        LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
        BEGIN
            IF OLD.id IS NULL THEN
                RETURN NULL;
            END IF;
            INSERT INTO subscription_deletions (subscription_id, deleted_at)
            VALUES (OLD.id::text, now())
            ON CONFLICT (subscription_id) DO UPDATE SET deleted_at = EXCLUDED.deleted_at;
            RETURN NULL;
        END $$",
    "CREATE TABLE IF NOT EXISTS vps_controller_installation (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        installation_id TEXT NOT NULL,
        bound_to TEXT,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )",
    // 16 lowercase hex characters (md5 output is lowercase hex): a valid Hetzner label value.
    // Never replaced.
    "INSERT INTO vps_controller_installation (id, installation_id)
        VALUES (1, substr(md5(random()::text || clock_timestamp()::text
                              || pg_backend_pid()::text), 1, 16))
        ON CONFLICT (id) DO NOTHING",
    "CREATE TABLE IF NOT EXISTS vps_controller_deletion_guard (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        paused_at TIMESTAMPTZ,
        pause_reason TEXT,
        window_start TIMESTAMPTZ,
        extra_allowance BIGINT NOT NULL DEFAULT 0
    )",
    "INSERT INTO vps_controller_deletion_guard (id) VALUES (1) ON CONFLICT (id) DO NOTHING",
    "CREATE TABLE IF NOT EXISTS vps_controller_server_deletions (
        id BIGSERIAL PRIMARY KEY,
        server_id BIGINT NOT NULL,
        subscription_key TEXT NOT NULL,
        deleted_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )",
    "CREATE INDEX IF NOT EXISTS vps_controller_server_deletions_deleted_at_idx
        ON vps_controller_server_deletions (deleted_at)",
    "CREATE TABLE IF NOT EXISTS vps_controller_state (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL
    )",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = manager.get_database_backend();
        let statements = match backend {
            DbBackend::Sqlite => SQLITE_STATEMENTS,
            DbBackend::Postgres => PG_STATEMENTS,
            other => {
                return Err(DbErr::Migration(format!(
                    "unsupported database backend {other:?}: use SQLite or PostgreSQL"
                )));
            }
        };

        for (table, column, sqlite, postgres, pg_type) in ADDED_COLUMNS {
            let existing = existing_columns(db, backend, table).await?;
            match existing.iter().find(|(name, _)| name == column) {
                Some((_, found)) if backend == DbBackend::Postgres && found != pg_type => {
                    return Err(DbErr::Migration(format!(
                        "column {table}.{column} has type {found}, but the controller needs \
                         {pg_type}; convert it (ALTER TABLE {table} ALTER COLUMN {column} TYPE \
                         {pg_type}) and run the migration again"
                    )));
                }
                Some(_) => {}
                None => {
                    let declaration = if backend == DbBackend::Sqlite {
                        sqlite
                    } else {
                        postgres
                    };
                    db.execute_unprepared(&format!(
                        "ALTER TABLE {table} ADD COLUMN {column} {declaration}"
                    ))
                    .await?;
                }
            }
        }

        let row_match = if backend == DbBackend::Sqlite && sqlite_without_rowid(db).await? {
            "id = NEW.id"
        } else {
            "rowid = NEW.rowid"
        };
        for statement in statements {
            db.execute_unprepared(&statement.replace("ROW_MATCH", row_match))
                .await?;
        }
        Ok(())
    }

    /// DDL is transactional on both backends: a failure leaves the database as it was.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// (column name, type) of `table`: PostgreSQL's `format_type` name, or SQLite's declared type.
pub(crate) async fn existing_columns<C: ConnectionTrait>(
    db: &C,
    backend: DbBackend,
    table: &str,
) -> Result<Vec<(String, String)>, DbErr> {
    let sql = match backend {
        DbBackend::Sqlite => "SELECT name, type FROM pragma_table_info($1)",
        _ => {
            "SELECT attname::text AS name, format_type(atttypid, NULL) AS type
             FROM pg_attribute
             WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped"
        }
    };
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(backend, sql, [table.into()]))
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("", "name")?, row.try_get("", "type")?)))
        .collect()
}

/// Whether the web app declared `subscriptions` WITHOUT ROWID (then triggers cannot use rowid).
async fn sqlite_without_rowid<C: ConnectionTrait>(db: &C) -> Result<bool, DbErr> {
    // pragma_table_list needs SQLite 3.37; an older SQLite has no error to roll back here
    // (a failed statement does not abort a SQLite transaction), so assume a rowid table.
    let Ok(row) = db
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT wr FROM pragma_table_list('subscriptions') WHERE schema = 'main'",
        ))
        .await
    else {
        return Ok(false);
    };
    match row {
        Some(row) => Ok(row.try_get::<i64>("", "wr")? != 0),
        None => Ok(false),
    }
}
