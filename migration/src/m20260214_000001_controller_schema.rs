//! The controller's schema: the columns it needs on `subscriptions`, the spec/status version
//! triggers, deletion tracking, change notification (PostgreSQL), `events` and `leases`.
//!
//! Every statement is idempotent (IF NOT EXISTS, CREATE OR REPLACE, column existence checks), so
//! the migration also applies to a web-app database whose `subscriptions` table predates the
//! controller, and re-running it after a partial failure finishes the job.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20260214_000001_controller_schema"
    }
}

/// Columns the web app must already have when `subscriptions` exists: without them the table is
/// not the web app's subscriptions table and adding ours would only hide the mistake.
const REQUIRED_WEB_APP_COLUMNS: [&str; 4] = ["id", "user_id", "status", "plan"];

/// How a column is checked on PostgreSQL when it already exists: the controller's entity decodes
/// it, and sqlx refuses to decode e.g. `integer` into `i64` or `timestamp` into `DateTime<Utc>`.
#[derive(Clone, Copy)]
enum PgKind {
    Text,
    BigInt,
    TimestampTz,
    /// Owned by the web app and never decoded by the controller: any type is fine.
    Any,
}

impl PgKind {
    fn accepts(self, pg_type: &str) -> bool {
        match self {
            PgKind::Text => matches!(pg_type, "text" | "character varying" | "character"),
            PgKind::BigInt => pg_type == "bigint",
            PgKind::TimestampTz => pg_type == "timestamp with time zone",
            PgKind::Any => true,
        }
    }

    fn expected(self) -> &'static str {
        match self {
            PgKind::Text => "text",
            PgKind::BigInt => "bigint",
            PgKind::TimestampTz => "timestamptz",
            PgKind::Any => "any type",
        }
    }
}

struct Column {
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
    pg_kind: PgKind,
}

const fn col(
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
    pg_kind: PgKind,
) -> Column {
    Column {
        name,
        sqlite,
        postgres,
        pg_kind,
    }
}

/// Columns added to `subscriptions` when missing. SQLite cannot add a column with a
/// non-constant default (CURRENT_TIMESTAMP), so there `created_at`/`updated_at` are only added
/// as plain nullable columns; a fresh table gets them with defaults from CREATE TABLE.
const ADDED_COLUMNS: &[Column] = &[
    col("stripe_subscription_id", "TEXT", "TEXT", PgKind::Text),
    col(
        "created_at",
        "TIMESTAMP",
        "TIMESTAMPTZ NOT NULL DEFAULT now()",
        PgKind::Any,
    ),
    col(
        "updated_at",
        "TIMESTAMP",
        "TIMESTAMPTZ NOT NULL DEFAULT now()",
        PgKind::Any,
    ),
    // The seed web app's nine VPS fields.
    col("hetzner_server_id", "BIGINT", "BIGINT", PgKind::BigInt),
    col("hetzner_ssh_key_id", "BIGINT", "BIGINT", PgKind::BigInt),
    col("vps_ip_address", "TEXT", "TEXT", PgKind::Text),
    col("vps_hostname", "TEXT", "TEXT", PgKind::Text),
    col(
        "provisioning_status",
        "TEXT NOT NULL DEFAULT 'pending'",
        "TEXT NOT NULL DEFAULT 'pending'",
        PgKind::Text,
    ),
    col("provisioning_error", "TEXT", "TEXT", PgKind::Text),
    col(
        "provisioned_at",
        "TIMESTAMP",
        "TIMESTAMPTZ",
        PgKind::TimestampTz,
    ),
    col(
        "deprovisioned_at",
        "TIMESTAMP",
        "TIMESTAMPTZ",
        PgKind::TimestampTz,
    ),
    col("ssh_private_key", "TEXT", "TEXT", PgKind::Text),
    // The controller's own columns.
    col("hetzner_firewall_id", "BIGINT", "BIGINT", PgKind::BigInt),
    col("ssh_public_key", "TEXT", "TEXT", PgKind::Text),
    col(
        "desired_version",
        "BIGINT NOT NULL DEFAULT 1",
        "BIGINT NOT NULL DEFAULT 1",
        PgKind::BigInt,
    ),
    col(
        "observed_version",
        "BIGINT NOT NULL DEFAULT 0",
        "BIGINT NOT NULL DEFAULT 0",
        PgKind::BigInt,
    ),
    col(
        "last_reconciled_at",
        "TIMESTAMP",
        "TIMESTAMPTZ",
        PgKind::TimestampTz,
    ),
];

/// Type expectations for the web app's own columns that the controller decodes.
const WEB_APP_DECODED_COLUMNS: &[(&str, PgKind)] = &[
    ("id", PgKind::Text),
    ("user_id", PgKind::Text),
    ("status", PgKind::Text),
    ("plan", PgKind::Text),
];

const SQLITE_CREATE_SUBSCRIPTIONS: &str = "CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL,
    stripe_subscription_id TEXT,
    status TEXT NOT NULL,
    plan TEXT NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
)";

const PG_CREATE_SUBSCRIPTIONS: &str = "CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL,
    stripe_subscription_id TEXT,
    status TEXT NOT NULL,
    plan TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

/// Statements after the columns exist. SQLite keeps timestamps as text in
/// `YYYY-MM-DD HH:MM:SS.SSS` (UTC) so they compare correctly as strings.
const SQLITE_STATEMENTS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS subscription_deletions (
        subscription_id TEXT PRIMARY KEY NOT NULL,
        deleted_at TIMESTAMP NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
    )",
    "CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        subscription_id TEXT NOT NULL,
        created_at TIMESTAMP NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        message TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS leases (
        name TEXT PRIMARY KEY NOT NULL,
        holder TEXT NOT NULL,
        expires_at TIMESTAMP NOT NULL,
        renewed_at TIMESTAMP NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS subscriptions_unreconciled_idx
        ON subscriptions (id, desired_version, observed_version)
        WHERE desired_version <> observed_version",
    "CREATE INDEX IF NOT EXISTS subscriptions_provisioning_status_idx
        ON subscriptions (provisioning_status)",
    "CREATE INDEX IF NOT EXISTS subscriptions_hetzner_server_id_idx
        ON subscriptions (hetzner_server_id)",
    "CREATE INDEX IF NOT EXISTS events_subscription_id_idx ON events (subscription_id, id)",
    // Spec columns compare by value. The inner UPDATE touches only desired_version, which
    // matches neither trigger's UPDATE OF list, so nothing recurses.
    "CREATE TRIGGER IF NOT EXISTS subscriptions_spec_changed
        AFTER UPDATE OF status, plan, user_id, stripe_subscription_id ON subscriptions
        FOR EACH ROW
        WHEN OLD.status IS NOT NEW.status
          OR OLD.plan IS NOT NEW.plan
          OR OLD.user_id IS NOT NEW.user_id
          OR OLD.stripe_subscription_id IS NOT NEW.stripe_subscription_id
        BEGIN
            UPDATE subscriptions SET desired_version = OLD.desired_version + 1 WHERE id = NEW.id;
        END",
    // Assigning updated_at counts even when the value is unchanged (SQLite's CURRENT_TIMESTAMP
    // has one-second resolution): touching it is how an operator asks for a retry. Both
    // triggers set OLD + 1, so an UPDATE that fires both still bumps by one.
    "CREATE TRIGGER IF NOT EXISTS subscriptions_touched
        AFTER UPDATE OF updated_at ON subscriptions
        FOR EACH ROW
        BEGIN
            UPDATE subscriptions SET desired_version = OLD.desired_version + 1 WHERE id = NEW.id;
        END",
    "CREATE TRIGGER IF NOT EXISTS subscriptions_record_deletion
        AFTER DELETE ON subscriptions
        FOR EACH ROW
        BEGIN
            INSERT OR REPLACE INTO subscription_deletions (subscription_id, deleted_at)
            VALUES (OLD.id, strftime('%Y-%m-%d %H:%M:%f', 'now'));
        END",
];

const PG_STATEMENTS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS subscription_deletions (
        subscription_id TEXT PRIMARY KEY NOT NULL,
        deleted_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )",
    "CREATE TABLE IF NOT EXISTS events (
        id BIGSERIAL PRIMARY KEY,
        subscription_id TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        message TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS leases (
        name TEXT PRIMARY KEY NOT NULL,
        holder TEXT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL,
        renewed_at TIMESTAMPTZ NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS subscriptions_unreconciled_idx
        ON subscriptions (id, desired_version, observed_version)
        WHERE desired_version <> observed_version",
    "CREATE INDEX IF NOT EXISTS subscriptions_provisioning_status_idx
        ON subscriptions (provisioning_status)",
    "CREATE INDEX IF NOT EXISTS subscriptions_hetzner_server_id_idx
        ON subscriptions (hetzner_server_id)",
    "CREATE INDEX IF NOT EXISTS events_subscription_id_idx ON events (subscription_id, id)",
    // Spec columns compare by value; this also sees changes made by other BEFORE triggers
    // that run earlier (alphabetical order).
    "CREATE OR REPLACE FUNCTION vps_controller_spec_changed() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.status IS DISTINCT FROM OLD.status
               OR NEW.plan IS DISTINCT FROM OLD.plan
               OR NEW.user_id IS DISTINCT FROM OLD.user_id
               OR NEW.stripe_subscription_id IS DISTINCT FROM OLD.stripe_subscription_id
               OR NEW.updated_at IS DISTINCT FROM OLD.updated_at THEN
                NEW.desired_version := OLD.desired_version + 1;
            END IF;
            RETURN NEW;
        END $$",
    // Assigning updated_at counts even when the value is unchanged: touching it is how an
    // operator asks for a retry. OLD + 1 in both functions: an UPDATE firing both bumps once.
    "CREATE OR REPLACE FUNCTION vps_controller_touched() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            NEW.desired_version := OLD.desired_version + 1;
            RETURN NEW;
        END $$",
    // SET search_path FROM CURRENT: the web app's sessions may use another search_path, and
    // the function must still find subscription_deletions where this migration created it.
    "CREATE OR REPLACE FUNCTION vps_controller_record_deletion() RETURNS trigger
        LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
        BEGIN
            INSERT INTO subscription_deletions (subscription_id, deleted_at)
            VALUES (OLD.id::text, now())
            ON CONFLICT (subscription_id) DO UPDATE SET deleted_at = EXCLUDED.deleted_at;
            RETURN NULL;
        END $$",
    // A hint for the controller. Updates that leave desired_version alone (the controller's
    // own status writes) stay quiet so the controller does not wake itself.
    "CREATE OR REPLACE FUNCTION vps_controller_notify() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('vps_controller_subscriptions', OLD.id::text);
            ELSIF TG_OP = 'INSERT' THEN
                PERFORM pg_notify('vps_controller_subscriptions', NEW.id::text);
            ELSIF NEW.desired_version IS DISTINCT FROM OLD.desired_version THEN
                PERFORM pg_notify('vps_controller_subscriptions', NEW.id::text);
            END IF;
            RETURN NULL;
        END $$",
    // DROP + CREATE rather than CREATE OR REPLACE TRIGGER, which needs PostgreSQL 14.
    "DROP TRIGGER IF EXISTS subscriptions_spec_changed ON subscriptions",
    "CREATE TRIGGER subscriptions_spec_changed
        BEFORE UPDATE ON subscriptions
        FOR EACH ROW EXECUTE FUNCTION vps_controller_spec_changed()",
    "DROP TRIGGER IF EXISTS subscriptions_touched ON subscriptions",
    "CREATE TRIGGER subscriptions_touched
        BEFORE UPDATE OF updated_at ON subscriptions
        FOR EACH ROW EXECUTE FUNCTION vps_controller_touched()",
    "DROP TRIGGER IF EXISTS subscriptions_record_deletion ON subscriptions",
    "CREATE TRIGGER subscriptions_record_deletion
        AFTER DELETE ON subscriptions
        FOR EACH ROW EXECUTE FUNCTION vps_controller_record_deletion()",
    "DROP TRIGGER IF EXISTS subscriptions_notify ON subscriptions",
    "CREATE TRIGGER subscriptions_notify
        AFTER INSERT OR UPDATE OR DELETE ON subscriptions
        FOR EACH ROW EXECUTE FUNCTION vps_controller_notify()",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = manager.get_database_backend();
        let (create_subscriptions, statements) = match backend {
            DbBackend::Sqlite => (SQLITE_CREATE_SUBSCRIPTIONS, SQLITE_STATEMENTS),
            DbBackend::Postgres => (PG_CREATE_SUBSCRIPTIONS, PG_STATEMENTS),
            other => {
                return Err(DbErr::Migration(format!(
                    "unsupported database backend {other:?}: use SQLite or PostgreSQL"
                )));
            }
        };

        db.execute_unprepared(create_subscriptions).await?;

        let existing = existing_columns(db, backend).await?;
        if let Some(missing) = REQUIRED_WEB_APP_COLUMNS
            .iter()
            .find(|name| !existing.iter().any(|(column, _)| column == *name))
        {
            return Err(DbErr::Migration(format!(
                "table subscriptions exists but has no column {missing}; it does not look like \
                 the web app's subscriptions table (expected at least id, user_id, status, plan)"
            )));
        }
        if backend == DbBackend::Postgres {
            check_pg_types(&existing)?;
        }

        for column in ADDED_COLUMNS {
            if existing.iter().any(|(name, _)| name == column.name) {
                continue;
            }
            let declaration = match backend {
                DbBackend::Sqlite => column.sqlite,
                _ => column.postgres,
            };
            // Existing rows take the defaults: provisioning_status 'pending', desired_version 1,
            // observed_version 0, so the controller looks at every pre-existing subscription.
            db.execute_unprepared(&format!(
                "ALTER TABLE subscriptions ADD COLUMN {} {declaration}",
                column.name
            ))
            .await?;
        }

        for statement in statements {
            db.execute_unprepared(statement).await?;
        }
        Ok(())
    }

    /// DDL is transactional on both backends: a failure leaves the database as it was.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// (column name, type) of `subscriptions`; the type is PostgreSQL's `format_type` name, or the
/// declared type on SQLite (informational only there).
async fn existing_columns<C: ConnectionTrait>(
    db: &C,
    backend: DbBackend,
) -> Result<Vec<(String, String)>, DbErr> {
    let sql = match backend {
        DbBackend::Sqlite => "SELECT name, type FROM pragma_table_info('subscriptions')",
        // regclass resolves the name through search_path exactly like the unqualified DDL above.
        _ => {
            "SELECT attname::text AS name, format_type(atttypid, NULL) AS type
             FROM pg_attribute
             WHERE attrelid = 'subscriptions'::regclass AND attnum > 0 AND NOT attisdropped"
        }
    };
    let rows = db
        .query_all_raw(Statement::from_string(backend, sql))
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("", "name")?, row.try_get("", "type")?)))
        .collect()
}

fn check_pg_types(existing: &[(String, String)]) -> Result<(), DbErr> {
    let expectations = WEB_APP_DECODED_COLUMNS
        .iter()
        .copied()
        .chain(ADDED_COLUMNS.iter().map(|c| (c.name, c.pg_kind)));
    for (name, kind) in expectations {
        let Some((_, found)) = existing.iter().find(|(column, _)| column == name) else {
            continue;
        };
        if !kind.accepts(found) {
            return Err(DbErr::Migration(format!(
                "column subscriptions.{name} has type {found}, but the controller needs {}; \
                 convert it (ALTER TABLE subscriptions ALTER COLUMN {name} TYPE {}) and run the \
                 migration again",
                kind.expected(),
                kind.expected()
            )));
        }
    }
    Ok(())
}
