//! Leader election through a lease row: only the holder reconciles; every replica serves
//! metrics and probes. A failed renew gives up acting at once.

use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;
use tokio::sync::watch;

use crate::db::leases;
pub use crate::db::leases::LEASE_NAME;
pub use crate::fencing::Leadership;

pub const LEASE_TTL: Duration = Duration::from_secs(15);
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Leadership is given up this long before the lease itself expires (clock and call latency).
const SAFETY_MARGIN: Duration = Duration::from_secs(3);

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
    // What the last round saw, not `is_leader()` now: a lease that ran out while the process
    // was paused must still be reported as lost.
    let mut was = false;
    loop {
        let asked_at = Instant::now();
        let renew = leases::try_acquire(&db, LEASE_NAME, &holder, LEASE_TTL);
        match tokio::time::timeout(RENEW_EVERY, renew).await {
            Ok(Ok(Some(fence))) => {
                leadership.renewed(asked_at, LEASE_TTL.saturating_sub(SAFETY_MARGIN), fence)
            }
            Ok(Ok(None)) => leadership.lost(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "lease renew failed; not acting until it succeeds");
                leadership.lost();
            }
            Err(_) => {
                tracing::warn!("lease renew timed out; not acting until it succeeds");
                leadership.lost();
            }
        }
        let is = leadership.is_leader();
        if is && !was {
            tracing::info!(%holder, "acquired the lease: this replica reconciles");
        } else if !is && was {
            tracing::warn!(%holder, "lost the lease: stopped reconciling");
        }
        was = is;
        // Renew every RENEW_EVERY from the start of the last renew, however slow it was.
        tokio::select! {
            _ = tokio::time::sleep(RENEW_EVERY.saturating_sub(asked_at.elapsed())) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
    }
    leadership.lost();
    if let Err(e) = leases::release(&db, LEASE_NAME, &holder).await {
        tracing::warn!(error = %e, "could not release the lease; it expires by itself");
    }
}
