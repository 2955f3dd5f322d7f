//! Wake-ups from the database. PostgreSQL sends a NOTIFY (from the subscriptions triggers)
//! for every insert, delete and spec change; this turns it into an immediate change pass.
//! SQLite has no NOTIFY: a dedicated connection polls `PRAGMA data_version`, which changes
//! whenever another connection (the web app, or the controller's own pool) commits.
//! Both are only hints: the 1 s change check and the resync stay the source of truth, so a
//! lost connection costs at most a second of latency.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sea_orm::sqlx::postgres::PgListener;
use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sea_orm::sqlx::{self, Connection};
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

/// How often [`watch_sqlite`] looks at `PRAGMA data_version`. One pragma on an open
/// connection reads a counter in shared memory (WAL) or the file header: far below 1 % of a
/// core at 10 per second, and a toggle waits at most this long for its change pass.
pub const SQLITE_POLL: Duration = Duration::from_millis(100);

/// What [`watch_sqlite_with`] did, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct WatchCounters {
    /// `PRAGMA data_version` reads that succeeded.
    pub polls: AtomicU64,
    /// Times `wake` was poked.
    pub pokes: AtomicU64,
}

/// Watches a SQLite file (`database_url`) for commits by other connections and pokes `wake`
/// when one happened, until `shutdown` flips. Does nothing for other databases and for
/// in-memory SQLite (no other connection can see it).
pub async fn watch_sqlite(
    database_url: String,
    wake: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
) {
    watch_sqlite_with(database_url, SQLITE_POLL, Arc::default(), wake, shutdown).await
}

/// [`watch_sqlite`] polling every `interval` and counting into `counters`.
///
/// `PRAGMA data_version` is per connection: it changes when *another* connection committed,
/// never for the same connection's own commits. So it is read on one connection held for the
/// purpose and used for nothing else (a pooled connection would miss the commits it made
/// itself). Every commit through the controller's pool changes it too; that costs one
/// change pass that finds nothing, since a change pass with nothing to do writes nothing.
pub async fn watch_sqlite_with(
    database_url: String,
    interval: Duration,
    counters: Arc<WatchCounters>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    if !database_url.starts_with("sqlite:") || sqlite_in_memory(&database_url) {
        return;
    }
    let mut reconnected = false;
    loop {
        let stopped = tokio::select! {
            result = watch_once(&database_url, interval, &counters, &wake, reconnected) => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "watching the SQLite file for changes failed; polling covers it, retrying in 5 s");
                }
                false
            }
            _ = shutdown.changed() => true,
        };
        if stopped || *shutdown.borrow() {
            return;
        }
        reconnected = true;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn watch_once(
    database_url: &str,
    interval: Duration,
    counters: &WatchCounters,
    wake: &Notify,
    reconnected: bool,
) -> Result<(), sqlx::Error> {
    // Never creates the file (the pool did, and migrated it); journal mode is left as the
    // pool set it.
    let options = SqliteConnectOptions::from_str(database_url)?
        .create_if_missing(false)
        .busy_timeout(Duration::from_secs(5));
    let mut conn = SqliteConnection::connect_with(&options).await?;
    let mut last = data_version(&mut conn).await?;
    counters.polls.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(
        every_ms = interval.as_millis(),
        "watching the SQLite file for changes"
    );
    if reconnected {
        // Commits while the connection was down went unseen.
        poke(counters, wake);
    }
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let version = data_version(&mut conn).await?;
        counters.polls.fetch_add(1, Ordering::Relaxed);
        if version != last {
            last = version;
            poke(counters, wake);
        }
    }
}

async fn data_version(conn: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar::<_, i64>("PRAGMA data_version")
        .fetch_one(conn)
        .await
}

fn poke(counters: &WatchCounters, wake: &Notify) {
    counters.pokes.fetch_add(1, Ordering::Relaxed);
    wake.notify_one();
}

/// `sqlite::memory:` or `mode=memory`: a database private to each connection.
fn sqlite_in_memory(url: &str) -> bool {
    url.starts_with("sqlite::memory:")
        || url.starts_with("sqlite://:memory:")
        || url.split_once('?').is_some_and(|(_, query)| {
            url::form_urlencoded::parse(query.as_bytes())
                .any(|(key, value)| key == "mode" && value == "memory")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_urls_are_not_watched() {
        assert!(sqlite_in_memory("sqlite::memory:"));
        assert!(sqlite_in_memory("sqlite://x.db?mode=memory&cache=shared"));
        assert!(!sqlite_in_memory("sqlite://x.db?mode=rwc"));
        assert!(!sqlite_in_memory("sqlite:///data/vps.db"));
    }
}
