//! Leader election through a lease row: only the holder reconciles; every replica serves
//! metrics and probes. A failed renew gives up acting at once.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;
use tokio::sync::watch;

use crate::db::leases;

pub use crate::db::leases::LEASE_NAME;
pub const LEASE_TTL: Duration = Duration::from_secs(15);
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Whether this replica may act, and until when. Leadership ends on its own when renewals
/// stop succeeding, even if the renew call hangs: a replica never acts on an expired lease.
#[derive(Clone, Debug, Default)]
pub struct Leadership(Arc<Mutex<Option<Instant>>>);

/// Leadership is given up this long before the lease itself expires (clock and call latency).
const SAFETY_MARGIN: Duration = Duration::from_secs(3);

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.lock().is_some_and(|until| Instant::now() < until)
    }

    /// A handle that always leads (single-process tools and tests).
    pub fn always() -> Leadership {
        let forever = Instant::now().checked_add(Duration::from_secs(100 * 365 * 24 * 3600));
        Leadership(Arc::new(Mutex::new(forever)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lease was renewed by a call started at `asked_at`.
    fn renewed(&self, asked_at: Instant) {
        *self.lock() = Some(asked_at + LEASE_TTL.saturating_sub(SAFETY_MARGIN));
    }

    fn lost(&self) {
        *self.lock() = None;
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
        let was = leadership.is_leader();
        let asked_at = Instant::now();
        let renew = leases::try_acquire(&db, LEASE_NAME, &holder, LEASE_TTL);
        match tokio::time::timeout(RENEW_EVERY, renew).await {
            Ok(Ok(Some(_fence))) => leadership.renewed(asked_at),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leadership_expires_without_renewals() {
        let leadership = Leadership::default();
        assert!(!leadership.is_leader());
        leadership.renewed(Instant::now());
        assert!(leadership.is_leader());
        leadership.renewed(Instant::now() - LEASE_TTL);
        assert!(
            !leadership.is_leader(),
            "a renewal one TTL ago no longer counts"
        );
        assert!(Leadership::always().is_leader());
    }
}
