use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::SqliteJournalMode;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend,
    SqliteTransactionMode, TransactionOptions, TransactionTrait,
};

use super::DbError;

/// A SQLite file `vps-controller.db` in the working directory, created if missing.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://vps-controller.db?mode=rwc";

/// Concurrent migrators (two replicas starting together) queue on this PostgreSQL advisory lock
/// instead of racing on DDL and on the migration table's primary key.
const MIGRATION_LOCK_KEY: i64 = 0x7670_735f_6d69_6772; // "vps_migr"

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SQLite writer waits for another process's write lock before failing.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Opens a connection pool for a `sqlite:` or `postgres://` URL.
///
/// SQLite: the file is created when the URL does not say otherwise (no `mode=` parameter means
/// `mode=rwc`); WAL journal and a busy timeout let the controller and the web app write the
/// same file. Errors name the URL with its password masked.
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbError> {
    let backend = classify(url)?;
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .connect_timeout(CONNECT_TIMEOUT)
        .acquire_timeout(CONNECT_TIMEOUT)
        // sqlx would log every statement at info level; the controller logs what matters.
        .sqlx_logging(false);
    match backend {
        Backend::Sqlite => {
            let mode = sqlite_mode(url);
            let create = mode.is_none();
            let file_backed = !matches!(mode.as_deref(), Some("memory") | Some("ro"))
                && !url.starts_with("sqlite::memory:");
            options
                .max_connections(4)
                .map_sqlx_sqlite_opts(move |sqlite| {
                    let sqlite = sqlite.busy_timeout(SQLITE_BUSY_TIMEOUT);
                    let sqlite = if create {
                        sqlite.create_if_missing(true)
                    } else {
                        sqlite
                    };
                    if file_backed {
                        sqlite.journal_mode(SqliteJournalMode::Wal)
                    } else {
                        sqlite
                    }
                });
        }
        Backend::Postgres => {
            options
                .max_connections(10)
                .set_application_name("vps-controller");
        }
    }
    Database::connect(options)
        .await
        .map_err(|err| DbError::Connect {
            url: redact_url(url),
            message: mask_password(url, &err.to_string()),
        })
}

/// Applies all pending migrations. Safe to run on every start, from several replicas at once,
/// and on the web app's existing database.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbError> {
    // One transaction around everything. On SQLite, IMMEDIATE takes the write lock up front so
    // two migrators queue (busy timeout) instead of failing on a lock upgrade.
    let txn = db
        .begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        })
        .await
        .map_err(DbError::Migrate)?;
    if db.get_database_backend() == DbBackend::Postgres {
        txn.execute_unprepared(&format!(
            "SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"
        ))
        .await
        .map_err(DbError::Migrate)?;
    }
    Migrator::up(&txn, None).await.map_err(DbError::Migrate)?;
    txn.commit().await.map_err(DbError::Migrate)?;
    // Bind a new installation id to this database at once, so a copy made before the
    // first `run` is told apart too. A database bound elsewhere is left for `run` to refuse.
    super::installation::check_binding(db).await?;
    Ok(())
}

fn classify(url: &str) -> Result<Backend, DbError> {
    if url.is_empty() {
        return Err(DbError::InvalidUrl(
            "the URL is empty; use sqlite://PATH or postgres://USER@HOST/DB".into(),
        ));
    }
    if url.starts_with("sqlite:") {
        return Ok(Backend::Sqlite);
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Backend::Postgres);
    }
    match url.split_once(':') {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            // Only the scheme is echoed: the rest may hold credentials.
            Err(DbError::InvalidUrl(format!(
                "unsupported scheme {scheme:?}; use sqlite://PATH or postgres://USER@HOST/DB"
            )))
        }
        // Without a ':' there can be no user:password part, so the input is safe to echo.
        None => Err(DbError::InvalidUrl(format!(
            "{url:?} has no scheme; for a SQLite file write sqlite://{url}?mode=rwc, \
             for PostgreSQL postgres://USER@HOST/DB"
        ))),
        Some(_) => Err(DbError::InvalidUrl(
            "the URL has no scheme; use sqlite://PATH or postgres://USER@HOST/DB".into(),
        )),
    }
}

/// Value of the `mode` query parameter of a SQLite URL, if given.
fn sqlite_mode(url: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "mode")
        .map(|(_, value)| value.into_owned())
}

/// The URL for messages: password replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only fails for URLs that cannot carry a password, which this one does.
            if parsed.set_password(Some("***")).is_ok() {
                parsed.to_string()
            } else {
                "<URL with password>".into()
            }
        }
        Ok(_) => url.to_owned(),
        // Unparseable: may still hold a password, so do not echo it.
        Err(_) if url.contains('@') => "<unparseable URL>".into(),
        Err(_) => url.to_owned(),
    }
}

/// Masks the URL's password (raw and percent-decoded) wherever it appears in `message`.
fn mask_password(url: &str, message: &str) -> String {
    let Ok(parsed) = url::Url::parse(url) else {
        return message.to_owned();
    };
    let Some(raw) = parsed.password() else {
        return message.to_owned();
    };
    let mut masked = message.replace(raw, "***");
    if let Ok(decoded) = percent_decode(raw)
        && !decoded.is_empty()
    {
        masked = masked.replace(&decoded, "***");
    }
    masked
}

/// Decodes `%XX` escapes (userinfo encoding; unlike form encoding, `+` stays `+`).
fn percent_decode(text: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_names_the_scheme_problem_without_echoing_credentials() {
        assert_eq!(classify("sqlite://x.db").ok(), Some(Backend::Sqlite));
        assert_eq!(classify("sqlite::memory:").ok(), Some(Backend::Sqlite));
        assert_eq!(classify("postgresql://h/db").ok(), Some(Backend::Postgres));
        let err = classify("mysql://root:hunter2@h/db")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"mysql\""), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = classify("vps.db").unwrap_err().to_string();
        assert!(err.contains("sqlite://vps.db?mode=rwc"), "{err}");
        assert!(classify("").is_err());
    }

    #[test]
    fn redaction_hides_password_in_url_and_message() {
        let url = "postgres://app:p%40ss@db.example:5432/prod";
        let redacted = redact_url(url);
        assert_eq!(redacted, "postgres://app:***@db.example:5432/prod");
        let masked = mask_password(url, "auth failed for p@ss and p%40ss");
        assert_eq!(masked, "auth failed for *** and ***");
        assert_eq!(percent_decode("a+b%2Fc%").unwrap(), "a+b/c%");
    }

    #[test]
    fn sqlite_mode_reads_the_query() {
        assert_eq!(sqlite_mode("sqlite://a.db"), None);
        assert_eq!(sqlite_mode("sqlite://a.db?mode=ro").as_deref(), Some("ro"));
    }
}
