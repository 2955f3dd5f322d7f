//! Wake-ups from the database. PostgreSQL sends a NOTIFY (from the subscriptions triggers)
//! for every insert, delete and spec change; this turns it into an immediate change pass.
//! It is only a hint: the 1 s change check and the resync stay the source of truth, so a
//! lost connection costs at most a second of latency.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use tokio::sync::{Notify, watch};

use crate::db::NOTIFY_CHANNEL;

/// Listens on `database_url` (PostgreSQL only) and pokes `wake` on every notification until
/// `shutdown` flips. Reconnects after errors.
pub async fn listen_for_changes(
    database_url: String,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    if !database_url.starts_with("postgres") {
        return;
    }
    loop {
        let stopped = tokio::select! {
            result = listen_once(&database_url, &wake) => {
                if let Err(e) = result {
                    // sqlx errors name the host, never the password.
                    tracing::warn!(error = %e, "LISTEN for subscription changes failed; polling covers it, retrying in 5 s");
                }
                false
            }
            _ = shutdown.changed() => true,
        };
        if stopped || *shutdown.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn listen_once(database_url: &str, wake: &Notify) -> Result<(), sea_orm::sqlx::Error> {
    let mut listener = PgListener::connect(database_url).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    tracing::debug!(
        channel = NOTIFY_CHANNEL,
        "listening for subscription changes"
    );
    loop {
        listener.recv().await?;
        wake.notify_one();
    }
}
