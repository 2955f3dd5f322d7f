//! `subscriptions.ssh_host_key`: the SSH host key the controller expects its server to present
//! (an OpenSSH public key line; not a secret). Written before a server is created (the key the
//! controller hands to cloud-init), or pinned at the first login to a server it did not create.
//! A server that presents another key is never bootstrapped.
//!
//! Idempotent: the column is added only when missing, and an existing one must be text.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20261130_000001_safety::existing_columns;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000001_ssh_host_key"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        let backend = manager.get_database_backend();
        if !matches!(backend, DbBackend::Sqlite | DbBackend::Postgres) {
            return Err(DbErr::Migration(format!(
                "unsupported database backend {backend:?}: use SQLite or PostgreSQL"
            )));
        }
        let existing = existing_columns(db, backend, "subscriptions").await?;
        match existing.iter().find(|(name, _)| name == "ssh_host_key") {
            Some((_, found)) if backend == DbBackend::Postgres && found != "text" => {
                Err(DbErr::Migration(format!(
                    "column subscriptions.ssh_host_key has type {found}, but the controller needs \
                     text; convert it (ALTER TABLE subscriptions ALTER COLUMN ssh_host_key TYPE \
                     text) and run the migration again"
                )))
            }
            Some(_) => Ok(()),
            None => {
                db.execute_unprepared("ALTER TABLE subscriptions ADD COLUMN ssh_host_key TEXT")
                    .await?;
                Ok(())
            }
        }
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
