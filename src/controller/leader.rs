//! Leader election through a lease row: only the holder reconciles; every replica serves
//! metrics and probes. A failed renew gives up acting at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::sync::watch;

use crate::db::leases;

pub const LEASE_NAME: &str = "vps-controller";
pub const LEASE_TTL: Duration = Duration::from_secs(15);
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn set(&self, leader: bool) -> bool {
        self.0.swap(leader, Ordering::SeqCst)
    }

    /// A handle that always leads (single-process tools such as tests).
    pub fn always() -> Leadership {
        Leadership(Arc::new(AtomicBool::new(true)))
    }
}

/// A holder id unique to this process.
pub fn holder_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown-host".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Acquires and renews the lease until `shutdown` flips, then releases it.
pub async fn run(
    db: DatabaseConnection,
    holder: String,
    leadership: Leadership,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let acquired = match leases::try_acquire(&db, LEASE_NAME, &holder, LEASE_TTL).await {
            Ok(acquired) => acquired,
            Err(e) => {
                tracing::warn!(error = %e, "lease renew failed; not acting until it succeeds");
                false
            }
        };
        let was = leadership.set(acquired);
        if acquired && !was {
            tracing::info!(%holder, "acquired the lease: this replica reconciles");
        } else if !acquired && was {
            tracing::warn!(%holder, "lost the lease: stopped reconciling");
        }
        tokio::select! {
            _ = tokio::time::sleep(RENEW_EVERY) => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
    }
    leadership.set(false);
    if let Err(e) = leases::release(&db, LEASE_NAME, &holder).await {
        tracing::warn!(error = %e, "could not release the lease; it expires by itself");
    }
}
