//! Database layer: connection, migrations, entities and the controller's queries.
//!
//! The `subscriptions` table belongs to the web app; the controller reads its spec columns and
//! writes only its own status columns. Triggers bump `desired_version` when a spec column
//! changes, so `desired_version <> observed_version` marks rows that need a reconcile pass.

mod connection;
pub mod deletion_guard;
pub mod entities;
mod error;
pub mod events;
pub mod installation;
pub mod leases;
pub mod state;
pub mod subscriptions;

pub use connection::{DEFAULT_DATABASE_URL, connect, migrate};
pub use error::DbError;
pub use events::EventKind;
pub use leases::{Fence, LEASE_NAME};
pub use subscriptions::StatusUpdate;

/// PostgreSQL channel the triggers NOTIFY with a subscription id as payload when a row is
/// inserted, deleted, or its spec changes (not on the controller's status writes). A hint only:
/// notifications are lost while nobody listens, so a periodic resync stays the source of truth.
pub const NOTIFY_CHANNEL: &str = "vps_controller_subscriptions";

/// Shown instead of the sealed private key in Debug output.
pub(crate) const SEALED: &str = "<sealed>";
