//! Shared test harness: fresh, empty databases on every backend the project supports.
//!
//! ```ignore
//! for test_db in common::test_databases().await {
//!     let db = vps_controller::db::connect(&test_db.url).await.unwrap();
//!     // ... assertions, naming test_db.backend in messages ...
//!     test_db.cleanup().await;
//! }
//! ```
//! PostgreSQL comes from `TEST_POSTGRES_URL` (default [`DEFAULT_TEST_POSTGRES_URL`]); each
//! call creates its own database there. If PostgreSQL is unreachable, tests run on SQLite only
//! with a loud warning, except under CI (`CI` set and not `false`/`0`), where they panic.
#![allow(dead_code)]

pub mod env;
pub mod invariants;
pub mod process;
pub mod proxy;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sea_orm::sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, raw_sql};

pub const DEFAULT_TEST_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Test databases are named `vpsc_t_<unix seconds>_<pid>_<counter>_<random>`; the creation
/// time in the name lets later runs drop what a crashed run left behind.
const DATABASE_PREFIX: &str = "vpsc_t_";
const LEFTOVER_AGE: Duration = Duration::from_secs(60 * 60);
const POSTGRES_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

static COUNTER: AtomicU32 = AtomicU32::new(0);
static LEFTOVERS_DROPPED: AtomicBool = AtomicBool::new(false);

/// One fresh, empty database. The PostgreSQL database is dropped by [`TestDb::cleanup`], or
/// when the value is dropped (also when a test panics).
pub struct TestDb {
    pub url: String,
    /// `"sqlite"` or `"postgres"`.
    pub backend: &'static str,
    /// Keeps the SQLite file's directory alive.
    dir: Option<tempfile::TempDir>,
    postgres: Option<PgDatabase>,
}

struct PgDatabase {
    admin_url: String,
    name: String,
}

impl TestDb {
    pub fn is_postgres(&self) -> bool {
        self.backend == "postgres"
    }

    pub fn is_sqlite(&self) -> bool {
        self.backend == "sqlite"
    }

    /// Directory of the SQLite file (a fresh temp dir); `None` for PostgreSQL.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|dir| dir.path())
    }

    /// Drops the PostgreSQL database (terminating open connections) and removes the SQLite
    /// directory.
    pub async fn cleanup(mut self) {
        if let Some(database) = self.postgres.take() {
            drop_database(&database.admin_url, &database.name).await;
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Not cleaned up explicitly (e.g. the test panicked): drop the database from a helper
        // thread with its own runtime, since Drop cannot await.
        if let Some(database) = self.postgres.take() {
            let dropper = std::thread::spawn(move || {
                if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    runtime.block_on(drop_database(&database.admin_url, &database.name));
                }
            });
            let _ = dropper.join();
        }
    }
}

/// A fresh SQLite database and, when reachable, a fresh PostgreSQL database.
pub async fn test_databases() -> Vec<TestDb> {
    let mut databases = vec![sqlite_db()];
    match postgres_db().await {
        Ok(database) => databases.push(database),
        Err(reason) if on_ci() => {
            panic!("PostgreSQL is required in CI but unavailable: {reason}")
        }
        Err(reason) => eprintln!(
            "\n!!!!!!!!\n!!! WARNING: PostgreSQL unavailable ({reason}).\n!!! Running on SQLite \
             ONLY. Start PostgreSQL or set TEST_POSTGRES_URL to test both backends.\n!!!!!!!!\n"
        ),
    }
    databases
}

/// A fresh SQLite file database in its own temp dir.
pub fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().expect("create temp dir for the SQLite test database");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display());
    TestDb {
        url,
        backend: "sqlite",
        dir: Some(dir),
        postgres: None,
    }
}

/// A fresh PostgreSQL database on `TEST_POSTGRES_URL`, or why there is none.
pub async fn postgres_db() -> Result<TestDb, String> {
    let admin_url = std::env::var("TEST_POSTGRES_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_TEST_POSTGRES_URL.to_owned());
    let mut admin = admin_connection(&admin_url).await?;
    if !LEFTOVERS_DROPPED.swap(true, Ordering::SeqCst) {
        drop_leftovers(&mut admin).await;
    }

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let name = format!(
        "{DATABASE_PREFIX}{}_{}_{}_{:05x}",
        now.as_secs(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst),
        now.subsec_nanos() & 0xf_ffff
    );
    admin
        .execute(raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE \"{name}\""
        ))))
        .await
        .map_err(|err| format!("cannot create database {name}: {err}"))?;
    let _ = admin.close().await;

    let mut url = url::Url::parse(&admin_url).map_err(|err| format!("TEST_POSTGRES_URL: {err}"))?;
    url.set_path(&format!("/{name}"));
    Ok(TestDb {
        url: url.to_string(),
        backend: "postgres",
        dir: None,
        postgres: Some(PgDatabase { admin_url, name }),
    })
}

/// `CI` is set and not `false`/`0`: a missing tool or database fails the test instead of
/// skipping it.
pub fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| !value.is_empty() && value != "false" && value != "0")
}

/// Something a test needs is missing: panic under CI, else a loud notice on the real stderr
/// (libtest captures `eprintln!` of passing tests) and the caller returns.
pub fn skip_or_fail(test: &str, reason: &str, hint: &str) {
    use std::io::Write as _;
    if on_ci() {
        panic!("{test}: {reason}; {hint}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !!! SKIPPED {test}: {reason}\n\
         !!! {hint}\n\
         !!! (with CI set, this test fails instead of skipping)\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
}

/// A fresh PostgreSQL database for a test that cannot run without one (two replicas, a
/// proxy in front of it): `None` after a loud skip, a panic under CI.
pub async fn postgres_or_skip(test: &str) -> Option<TestDb> {
    match postgres_db().await {
        Ok(test_db) => Some(test_db),
        Err(reason) => {
            skip_or_fail(
                test,
                &format!("needs PostgreSQL: {reason}"),
                "start it, or set TEST_POSTGRES_URL",
            );
            None
        }
    }
}

async fn admin_connection(admin_url: &str) -> Result<PgConnection, String> {
    match tokio::time::timeout(POSTGRES_CONNECT_TIMEOUT, PgConnection::connect(admin_url)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) => Err(format!("cannot connect to TEST_POSTGRES_URL: {err}")),
        Err(_) => Err(format!(
            "connecting to TEST_POSTGRES_URL timed out after {POSTGRES_CONNECT_TIMEOUT:?}"
        )),
    }
}

async fn drop_database(admin_url: &str, name: &str) {
    match admin_connection(admin_url).await {
        Ok(mut admin) => {
            // FORCE (PostgreSQL 13+) ends the pools the test left open.
            if let Err(err) = admin
                .execute(raw_sql(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                ))))
                .await
            {
                eprintln!("warning: could not drop test database {name}: {err}");
            }
            let _ = admin.close().await;
        }
        Err(err) => eprintln!("warning: could not drop test database {name}: {err}"),
    }
}

/// Drops test databases older than [`LEFTOVER_AGE`] (from runs that crashed before cleanup).
async fn drop_leftovers(admin: &mut PgConnection) {
    let names: Vec<(String,)> = match sea_orm::sqlx::query_as(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'vpsc\\_t\\_%'",
    )
    .fetch_all(&mut *admin)
    .await
    {
        Ok(names) => names,
        Err(_) => return,
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    for (name,) in names {
        let created = name
            .strip_prefix(DATABASE_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|created| now.saturating_sub(created) > LEFTOVER_AGE.as_secs()) {
            let _ = admin
                .execute(raw_sql(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                ))))
                .await;
        }
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
