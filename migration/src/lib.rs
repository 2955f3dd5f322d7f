//! Schema migrations for vps-controller.
//!
//! The controller shares its database with the web app that owns `subscriptions`, so every
//! migration here must also apply on top of the web app's existing table: create what is
//! missing, add missing columns, never rewrite or drop the web app's data.

pub use sea_orm_migration::prelude::*;

mod m20260214_000001_controller_schema;
mod m20261130_000001_safety;
mod m20261201_000001_long_ids;
mod m20261202_000001_ssh_host_key;

/// Name of the table recording applied migrations. Not sea-orm's default `seaql_migrations`
/// so that, in a database shared with the web app, it is obvious which tool owns it.
pub const MIGRATION_TABLE: &str = "vps_controller_migrations";

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20260214_000001_controller_schema::Migration),
            Box::new(m20261130_000001_safety::Migration),
            Box::new(m20261201_000001_long_ids::Migration),
            Box::new(m20261202_000001_ssh_host_key::Migration),
        ]
    }

    fn migration_table_name() -> DynIden {
        MIGRATION_TABLE.into_iden()
    }
}
