//! `vps-controller keys rotate` and `keys status`: re-sealing the stored private keys under the
//! current encryption key, so that an old key can be dropped, and counting rows per key id.
//!
//! The rotation is built to run next to a live controller and to be interrupted:
//! - Rows are read in batches (keyset pagination by id) and each batch is written in one short
//!   transaction. A crash loses at most the batch in flight; every row then holds either its
//!   old value (opens with the previous key) or its new one (opens with the current key).
//!   Running it again re-seals what is left: rows already under the current key are skipped.
//! - Every write is a compare-and-swap on the value read:
//!   `UPDATE .. SET ssh_private_key = new WHERE id = $id AND ssh_private_key = old`. A row whose
//!   value changed in between (the controller generated a pair or cleared it, the web app wrote
//!   its own, a second rotate got there first) is read again and handled by what it holds
//!   now; what was read before is never written back.
//! - Only `ssh_private_key` is written, and only with a value that opens (checked before the
//!   write) to exactly what the old one held, for the same row. For everyone holding the
//!   keys, the row means the same before and after; that is why this write needs no lease
//!   fence (see `docs/keys.md`).
//! - A value this controller did not seal (`ssh_key_origin = 'external'`, or not
//!   `v1:<key id>:...`) is never opened or written; one that does not open with the
//!   configured keys is reported and left as it is.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, SqliteTransactionMode, Statement,
    TransactionOptions, TransactionTrait, Value,
};

use super::{ENV_PREVIOUS_KEYS, Sealer, is_key_id};
use crate::db::DbError;

/// Rows read and written per transaction unless told otherwise.
pub const DEFAULT_BATCH_SIZE: u32 = 100;

/// How often a row whose value keeps changing under us is read again before it is left for the
/// next run.
const MAX_ATTEMPTS: usize = 3;

/// How many unopenable rows the summary names (all of them are counted).
const MAX_LISTED: usize = 20;

/// Rows the rotation and the counts can read: in SQLite, a column may hold any type, and a row
/// whose id or key is not text is not one the controller wrote (it never reconciles it).
fn readable(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Sqlite => {
            "typeof(id) = 'text' AND typeof(ssh_private_key) = 'text' \
             AND (ssh_key_origin IS NULL OR typeof(ssh_key_origin) = 'text')"
        }
        _ => "1 = 1",
    }
}

/// Fails with [`DbError::NotMigrated`] unless every migration of this build is applied: the
/// rotation reads `ssh_key_origin`, which a later migration adds, and must never guess which
/// rows are external.
pub async fn ensure_migrated(db: &DatabaseConnection) -> Result<(), DbError> {
    use migration::{Migrator, MigratorTrait};
    let pending = Migrator::get_pending_migrations_read_only(db)
        .await
        .map_err(|e| {
            DbError::NotMigrated(format!(
                "cannot tell which migrations the database has applied ({e})"
            ))
        })?;
    if pending.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = pending.iter().map(|m| m.name()).collect();
    Err(DbError::NotMigrated(format!(
        "the database schema is not up to date ({} migration(s) pending: {})",
        names.len(),
        names.join(", ")
    )))
}

// ---------------------------------------------------------------------------------------------
// Counting

/// Rows holding a private key, by what holds them. No key material, only key ids (which are
/// part of every sealed value and not secret).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyCounts {
    /// Rows sealed by this controller, by the id of the key that sealed them.
    pub by_key_id: BTreeMap<String, u64>,
    /// Rows whose key this controller did not seal (`ssh_key_origin = 'external'`, or a value
    /// not in the `v1:<key id>:...` form): never opened, never re-sealed.
    pub external: u64,
    /// Rows whose id or key columns are not text (SQLite only): not the controller's.
    pub unreadable: u64,
}

impl KeyCounts {
    /// Rows sealed by this controller, under any key.
    pub fn sealed(&self) -> u64 {
        self.by_key_id.values().sum()
    }

    /// Rows sealed under any key other than `key_id`.
    pub fn sealed_under_other_than(&self, key_id: &str) -> u64 {
        self.by_key_id
            .iter()
            .filter(|(id, _)| id.as_str() != key_id)
            .map(|(_, n)| n)
            .sum()
    }

    /// The `keys status` table. With the configured keys, each id says whether it is the
    /// current key, a previous one (and whether any row still needs it), or not configured.
    pub fn render(&self, sealer: Option<&Sealer>) -> String {
        let mut ids: Vec<(&str, u64)> = self
            .by_key_id
            .iter()
            .map(|(id, n)| (id.as_str(), *n))
            .collect();
        if let Some(sealer) = sealer {
            for id in std::iter::once(sealer.key_id()).chain(sealer.previous_key_ids()) {
                if !self.by_key_id.contains_key(id) {
                    ids.push((id, 0));
                }
            }
        }
        ids.sort();
        let mut out = String::new();
        let _ = writeln!(out, "{:<10} {:>8}  STATE", "KEY ID", "ROWS");
        for (id, rows) in ids {
            let role = match sealer {
                None => "",
                Some(sealer) if sealer.key_id() == id => "current",
                Some(_) if rows == 0 => "previous; no row needs it: it can be removed",
                Some(sealer) if sealer.has_key_id(id) => {
                    "previous; still needed: `vps-controller keys rotate` re-seals these rows"
                }
                Some(_) => "NOT CONFIGURED: these rows cannot be opened",
            };
            let _ = writeln!(out, "{id:<10} {rows:>8}  {role}");
        }
        let _ = writeln!(
            out,
            "{} rows sealed by this controller; {} hold a key it did not seal (external, left \
             alone){}",
            self.sealed(),
            self.external,
            if self.unreadable > 0 {
                format!(
                    "; {} cannot be read (id or key column not text)",
                    self.unreadable
                )
            } else {
                String::new()
            }
        );
        if sealer.is_none() {
            let _ = writeln!(
                out,
                "(no encryption key is set: set VPS_CONTROLLER_ENCRYPTION_KEY and \
                 {ENV_PREVIOUS_KEYS} to see which ids are configured)"
            );
        }
        out
    }
}

/// Rows per key id, one grouped query (nothing is opened, nothing leaves the database but ids
/// and counts).
pub async fn count_by_key(db: &impl ConnectionTrait) -> Result<KeyCounts, DbError> {
    let backend = db.get_database_backend();
    let sql = format!(
        "SELECT CASE \
           WHEN NOT ({readable}) THEN '!unreadable' \
           WHEN ssh_key_origin = 'external' THEN '!external' \
           WHEN substr(ssh_private_key, 1, 3) = 'v1:' AND substr(ssh_private_key, 12, 1) = ':' \
             THEN substr(ssh_private_key, 4, 8) \
           ELSE '!external' END AS bucket, \
         COUNT(*) AS n \
         FROM subscriptions WHERE id IS NOT NULL AND ssh_private_key IS NOT NULL \
         GROUP BY bucket",
        readable = readable(backend)
    );
    let rows = db
        .query_all_raw(Statement::from_string(backend, sql))
        .await?;
    let mut counts = KeyCounts::default();
    for row in &rows {
        let bucket: String = row.try_get("", "bucket")?;
        let n = u64::try_from(row.try_get::<i64>("", "n")?).unwrap_or(0);
        match bucket.as_str() {
            "!unreadable" => counts.unreadable += n,
            id if is_key_id(id) => *counts.by_key_id.entry(id.to_owned()).or_insert(0) += n,
            // `!external`, and `v1:` values whose key id is not 8 lowercase hex digits.
            _ => counts.external += n,
        }
    }
    Ok(counts)
}

// ---------------------------------------------------------------------------------------------
// Re-sealing

/// One row's private key as read. `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub subscription_id: String,
    /// `ssh_private_key` exactly as stored (the compare-and-swap compares with it).
    pub value: String,
    /// `ssh_key_origin = 'external'`.
    pub external: bool,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("subscription_id", &self.subscription_id)
            .field("key_id", &Sealer::sealed_key_id(&self.value))
            .field("external", &self.external)
            .finish_non_exhaustive()
    }
}

const KEY_COLUMNS: &str = "id, ssh_private_key, ssh_key_origin";

fn decode(row: &sea_orm::QueryResult) -> Result<StoredKey, DbError> {
    Ok(StoredKey {
        subscription_id: row.try_get("", "id")?,
        value: row.try_get("", "ssh_private_key")?,
        external: row
            .try_get::<Option<String>>("", "ssh_key_origin")?
            .as_deref()
            == Some("external"),
    })
}

/// Up to `limit` rows holding a private key, ordered by id, after `after` (exclusive).
pub async fn read_batch(
    db: &impl ConnectionTrait,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<StoredKey>, DbError> {
    let backend = db.get_database_backend();
    let mut values: Vec<Value> = Vec::new();
    let mut sql = format!(
        "SELECT {KEY_COLUMNS} FROM subscriptions \
         WHERE id IS NOT NULL AND ssh_private_key IS NOT NULL AND {}",
        readable(backend)
    );
    if let Some(after) = after {
        values.push(after.into());
        let _ = write!(sql, " AND id > ${}", values.len());
    }
    values.push(i64::from(limit).into());
    let _ = write!(sql, " ORDER BY id LIMIT ${}", values.len());
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    rows.iter().map(decode).collect()
}

/// The row as it is now; `None` when it is gone, holds no key any more, or cannot be read.
async fn read_one(db: &impl ConnectionTrait, id: &str) -> Result<Option<StoredKey>, DbError> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            format!(
                "SELECT {KEY_COLUMNS} FROM subscriptions \
                 WHERE id = $1 AND ssh_private_key IS NOT NULL AND {}",
                readable(backend)
            ),
            [id.into()],
        ))
        .await?;
    row.as_ref().map(decode).transpose()
}

/// Writes `new` only if the row still holds `old` and is not external; whether it did.
async fn compare_and_swap(
    db: &impl ConnectionTrait,
    id: &str,
    old: &str,
    new: &str,
) -> Result<bool, DbError> {
    let result = db
        .execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "UPDATE subscriptions SET ssh_private_key = $1 \
             WHERE id = $2 AND ssh_private_key = $3 \
             AND (ssh_key_origin IS NULL OR ssh_key_origin <> 'external')",
            [new.into(), id.into(), old.into()],
        ))
        .await?;
    Ok(result.rows_affected() > 0)
}

/// What a rotation did, row by row. Never holds key material.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Re-sealed under the current key by this run.
    pub resealed: u64,
    /// Already under the current key (and opened: it is usable).
    pub already_current: u64,
    /// Not sealed by this controller: left alone.
    pub external: u64,
    /// The first [`MAX_LISTED`] of those, by subscription id, for the summary.
    pub external_ids: Vec<String>,
    /// Deleted, or their key cleared, between the read and the write.
    pub gone: u64,
    /// Rows whose value changed between the read and the write (the controller, the web app
    /// or another rotate wrote it): read again and handled by their new value, which is
    /// counted in the other fields.
    pub changed_meanwhile: u64,
    /// `(subscription id, why)` of the rows that do not open with the configured keys: left as
    /// they are.
    pub unopenable: Vec<(String, String)>,
    /// Rows that changed on every attempt: left for the next run.
    pub busy: Vec<String>,
}

impl Tally {
    /// Rows handled, whatever the outcome.
    pub fn done(&self) -> u64 {
        self.resealed
            + self.already_current
            + self.external
            + self.gone
            + self.unopenable.len() as u64
            + self.busy.len() as u64
    }

    fn add(&mut self, other: Tally) {
        self.resealed += other.resealed;
        self.already_current += other.already_current;
        self.external += other.external;
        let room = MAX_LISTED.saturating_sub(self.external_ids.len());
        self.external_ids
            .extend(other.external_ids.into_iter().take(room));
        self.gone += other.gone;
        self.changed_meanwhile += other.changed_meanwhile;
        self.unopenable.extend(other.unopenable);
        self.busy.extend(other.busy);
    }
}

enum Outcome {
    Resealed,
    AlreadyCurrent,
    External,
    Gone,
    Unopenable(String),
    Busy,
}

/// One attempt on one row: an outcome, or `Err(now)` when the row changed under us.
async fn attempt(
    db: &impl ConnectionTrait,
    sealer: &Sealer,
    row: &StoredKey,
) -> Result<Result<Outcome, Option<StoredKey>>, DbError> {
    if row.external || !Sealer::looks_sealed(&row.value) {
        return Ok(Ok(Outcome::External));
    }
    let id = &row.subscription_id;
    if sealer.is_sealed_under_current(&row.value) {
        return Ok(Ok(match sealer.open(&row.value, id) {
            Ok(_) => Outcome::AlreadyCurrent,
            Err(e) => Outcome::Unopenable(e.to_string()),
        }));
    }
    let resealed = match sealer.reseal(&row.value, id) {
        Ok(resealed) => resealed,
        Err(e) => return Ok(Ok(Outcome::Unopenable(e.to_string()))),
    };
    if compare_and_swap(db, id, &row.value, &resealed).await? {
        return Ok(Ok(Outcome::Resealed));
    }
    Ok(Err(read_one(db, id).await?))
}

/// Re-seals `batch` (as [`read_batch`] returned it) in one transaction, each row by
/// compare-and-swap on the value in `batch`.
pub async fn reseal_batch(
    db: &DatabaseConnection,
    sealer: &Sealer,
    batch: &[StoredKey],
) -> Result<Tally, DbError> {
    // IMMEDIATE: take SQLite's write lock up front, so a controller writing at the same time
    // waits (busy timeout) instead of failing on a lock upgrade.
    let txn = db
        .begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..TransactionOptions::default()
        })
        .await?;
    let mut tally = Tally::default();
    for row in batch {
        let mut row = row.clone();
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            match attempt(&txn, sealer, &row).await? {
                Ok(outcome) => break outcome,
                Err(now) => {
                    if attempts == 1 {
                        tally.changed_meanwhile += 1;
                    }
                    match now {
                        None => break Outcome::Gone,
                        Some(_) if attempts >= MAX_ATTEMPTS => break Outcome::Busy,
                        Some(now) => row = now,
                    }
                }
            }
        };
        match outcome {
            Outcome::Resealed => tally.resealed += 1,
            Outcome::AlreadyCurrent => tally.already_current += 1,
            Outcome::External => {
                tally.external += 1;
                if tally.external_ids.len() < MAX_LISTED {
                    tally.external_ids.push(row.subscription_id);
                }
            }
            Outcome::Gone => tally.gone += 1,
            Outcome::Unopenable(why) => tally.unopenable.push((row.subscription_id, why)),
            Outcome::Busy => tally.busy.push(row.subscription_id),
        }
    }
    txn.commit().await?;
    Ok(tally)
}

/// How [`rotate`] paces itself.
#[derive(Clone, Debug)]
pub struct Options {
    /// Rows per read and per write transaction (at least 1).
    pub batch_size: u32,
    /// Wait between batches, to spare a busy database.
    pub pause: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            batch_size: DEFAULT_BATCH_SIZE,
            pause: Duration::ZERO,
        }
    }
}

/// Where a rotation is, after each batch.
#[derive(Debug)]
pub struct Progress<'a> {
    /// Rows handled so far.
    pub done: u64,
    /// Rows holding a private key when the rotation started (at least `done`).
    pub total: u64,
    pub tally: &'a Tally,
}

/// The result of [`rotate`].
#[derive(Clone, Debug)]
pub struct Report {
    pub current_key_id: String,
    pub tally: Tally,
    /// The counts after the last batch: the truth about what is left, including rows written
    /// meanwhile by someone else (an old replica still sealing under an old key).
    pub after: KeyCounts,
}

impl Report {
    /// Every sealed row is under the current key and opens with it.
    pub fn is_complete(&self) -> bool {
        self.problem().is_none()
    }

    /// Why the rotation is not complete, for the error an operator reads; `None` when it is.
    pub fn problem(&self) -> Option<String> {
        let mut problems = Vec::new();
        if !self.tally.unopenable.is_empty() {
            let listed: Vec<String> = self
                .tally
                .unopenable
                .iter()
                .take(MAX_LISTED)
                .map(|(id, why)| format!("{id:?}: {why}"))
                .collect();
            problems.push(format!(
                "{} row(s) cannot be opened with the configured keys and were left as they are \
                 ({}{}); add the key that sealed them to {ENV_PREVIOUS_KEYS}, or see README \
                 \"Recovering a lost key pair\"",
                self.tally.unopenable.len(),
                listed.join("; "),
                if self.tally.unopenable.len() > MAX_LISTED {
                    "; …"
                } else {
                    ""
                }
            ));
        }
        if !self.tally.busy.is_empty() {
            problems.push(format!(
                "{} row(s) changed on every attempt ({}); run `vps-controller keys rotate` again",
                self.tally.busy.len(),
                self.tally.busy.join(", ")
            ));
        }
        let left = self.after.sealed_under_other_than(&self.current_key_id);
        if left > 0 {
            let ids: Vec<String> = self
                .after
                .by_key_id
                .iter()
                .filter(|(id, _)| **id != self.current_key_id)
                .map(|(id, n)| format!("{id}: {n}"))
                .collect();
            problems.push(format!(
                "{left} row(s) are still sealed under another key than the current one {} \
                 (by key id: {}). Rows that do not open are listed above; others were written \
                 while this ran (is a replica still running with an old key as current?): \
                 run `vps-controller keys rotate` again",
                self.current_key_id,
                ids.join(", ")
            ));
        }
        (!problems.is_empty()).then(|| problems.join(". "))
    }

    /// The summary printed at the end.
    pub fn render(&self) -> String {
        let t = &self.tally;
        let mut out = format!(
            "re-sealed under key {}: {}; already under it: {}; external (left alone): {}; \
             cannot be opened (left alone): {}; gone meanwhile: {}; changed meanwhile (read \
             again): {}\n",
            self.current_key_id,
            t.resealed,
            t.already_current,
            t.external,
            t.unopenable.len(),
            t.gone,
            t.changed_meanwhile
        );
        if t.external > 0 {
            let _ = writeln!(
                out,
                "external rows (a key this controller did not seal; never opened, never \
                 changed): {}{}",
                t.external_ids.join(", "),
                if t.external > t.external_ids.len() as u64 {
                    ", …"
                } else {
                    ""
                }
            );
        }
        let left = self.after.sealed_under_other_than(&self.current_key_id);
        if self.is_complete() {
            let _ = writeln!(
                out,
                "every sealed private key is under the current key {}: no previous key is \
                 needed any more (`vps-controller keys status` shows it)",
                self.current_key_id
            );
        } else {
            let _ = writeln!(
                out,
                "NOT DONE: {left} sealed row(s) under other keys, {} that cannot be opened",
                t.unopenable.len()
            );
        }
        out
    }
}

/// Re-seals every row's private key under the current key of `sealer`, batch by batch,
/// calling `progress` after each. See the module docs for why this is safe next to a running
/// controller and after a crash.
pub async fn rotate(
    db: &DatabaseConnection,
    sealer: &Sealer,
    options: &Options,
    mut progress: impl FnMut(&Progress<'_>),
) -> Result<Report, DbError> {
    ensure_migrated(db).await?;
    let batch_size = options.batch_size.max(1);
    let before = count_by_key(db).await?;
    let total = before.sealed() + before.external;
    let mut tally = Tally::default();
    let mut after: Option<String> = None;
    loop {
        let batch = read_batch(db, after.as_deref(), batch_size).await?;
        let Some(last) = batch.last() else {
            break;
        };
        after = Some(last.subscription_id.clone());
        tally.add(reseal_batch(db, sealer, &batch).await?);
        progress(&Progress {
            done: tally.done(),
            total: total.max(tally.done()),
            tally: &tally,
        });
        if batch.len() < batch_size as usize {
            break;
        }
        if !options.pause.is_zero() {
            tokio::time::sleep(options.pause).await;
        }
    }
    Ok(Report {
        current_key_id: sealer.key_id().to_owned(),
        tally,
        after: count_by_key(db).await?,
    })
}
