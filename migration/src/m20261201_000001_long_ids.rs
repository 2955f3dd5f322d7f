//! PostgreSQL: a long subscription id never makes a write to `subscriptions` fail because of
//! something the controller added. Whatever id the table's own key accepts, the controller's
//! triggers and indexes accept too.
//!
//! - The NOTIFY that wakes the controller carried the whole id. PostgreSQL refuses a payload
//!   of 8,000 bytes or more ("payload string too long"), and a trigger's error fails the
//!   statement that fired it: the web app could not insert, update or delete a row with such
//!   an id. The controller never reads the payload (a notification only wakes the change
//!   check), so it now carries the first 1,000 characters (at most 4,000 bytes).
//! - A btree index entry holds at most 2,704 bytes (after compression). The primary key on
//!   `subscriptions.id` is the web app's limit; `subscriptions_unreconciled_idx (id,
//!   desired_version, observed_version)` and `events_subscription_id_idx (subscription_id,
//!   id)` added 16 and 8 bytes to it, so ids just under the limit were refused by our index
//!   (the web app's INSERT failed) or could not get an event (the reconcile failed). Both now
//!   index the id alone: exactly as long as the key's entry. The queries they serve sort at
//!   most a handful of rows by id (rows whose spec changed; the newest 50 events of one
//!   subscription).
//!
//! SQLite has no NOTIFY and no index entry limit: nothing changes there.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261201_000001_long_ids"
    }
}

const PG_STATEMENTS: &[&str] = &[
    "CREATE OR REPLACE FUNCTION vps_controller_notify() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('vps_controller_subscriptions', left(OLD.id::text, 1000));
            ELSIF TG_OP = 'INSERT' THEN
                PERFORM pg_notify('vps_controller_subscriptions', left(NEW.id::text, 1000));
            ELSIF NEW.desired_version IS DISTINCT FROM OLD.desired_version THEN
                PERFORM pg_notify('vps_controller_subscriptions', left(NEW.id::text, 1000));
            END IF;
            RETURN NULL;
        END $$",
    "DROP INDEX IF EXISTS subscriptions_unreconciled_idx",
    "CREATE INDEX IF NOT EXISTS subscriptions_unreconciled_idx
        ON subscriptions (id)
        WHERE desired_version <> observed_version",
    "DROP INDEX IF EXISTS events_subscription_id_idx",
    "CREATE INDEX IF NOT EXISTS events_subscription_id_idx ON events (subscription_id)",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let db = manager.get_connection();
        for statement in PG_STATEMENTS {
            db.execute_unprepared(statement).await?;
        }
        Ok(())
    }
}
