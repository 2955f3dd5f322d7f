//! Secrets stay secret, and the encryption key can be rotated.
//!
//! - `keys rotate` re-seals every row under the new key so the old one can be dropped; it is
//!   safe to kill and re-run, never overwrites a row that changed under it, and leaves what
//!   it cannot open (or did not seal) exactly as it was.
//! - A fleet provisioned (RSA and ed25519) and rotated by the real binary, logging at trace
//!   level, leaves no private key, token, encryption key or user_data in the database, the
//!   logs, `/metrics`, the status page, the CLI's output or its error messages.

mod common;

use std::path::Path;
use std::time::Duration;

use sea_orm::sqlx::{self, AssertSqlSafe, Row as _};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, Value};
use tokio::time::{Instant, sleep};

use common::TestDb;
use common::process::*;
use vps_controller::db::{self, entities::subscription, subscriptions};
use vps_controller::keys::{self, KeyAlgorithm, Sealer, rotate};
use vps_controller::reconcile::keycheck::{KeyChecks, check_sealer_opens_stored_keys};
use vps_controller::reconcile::plan::KeyState;

/// The key rotated to. [`encryption_key`] (the harness's) is the old one.
const NEW_KEY: &str = "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=";
/// A valid key that never sealed anything here.
const STRANGER_KEY: &str = "oKGio6SlpqeoqaqrrK2ur7CxsrO0tba3uLm6u7y9vr8=";

fn sealer(current: &str, previous: &[&str]) -> Sealer {
    Sealer::from_base64(current, previous).unwrap()
}

fn key_id(key: &str) -> String {
    sealer(key, &[]).key_id().to_owned()
}

/// The environment of a `keys` command: the database and the keys.
fn key_env<'a>(
    database_url: &'a str,
    current: &'a str,
    previous: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("DATABASE_URL", database_url),
        ("VPS_CONTROLLER_ENCRYPTION_KEY", current),
    ];
    if let Some(previous) = previous {
        env.push(("VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS", previous));
    }
    env
}

async fn migrated(test_db: &TestDb) -> DatabaseConnection {
    let conn = db::connect(&test_db.url).await.unwrap();
    db::migrate(&conn).await.unwrap();
    conn
}

async fn insert_row(
    db: &DatabaseConnection,
    id: &str,
    private: Option<&str>,
    public: Option<&str>,
    origin: Option<&str>,
) {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO subscriptions (id, user_id, status, plan, ssh_private_key, ssh_public_key, \
         ssh_key_origin) VALUES ($1, $2, 'active', 'starter', $3, $4, $5)",
        [
            id.into(),
            format!("user-{id}").into(),
            Value::from(private.map(str::to_owned)),
            Value::from(public.map(str::to_owned)),
            Value::from(origin.map(str::to_owned)),
        ],
    ))
    .await
    .unwrap();
}

async fn set_private_key(db: &DatabaseConnection, id: &str, value: Option<&str>) {
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "UPDATE subscriptions SET ssh_private_key = $1 WHERE id = $2",
        [Value::from(value.map(str::to_owned)), id.into()],
    ))
    .await
    .unwrap();
}

async fn stored(db: &DatabaseConnection, id: &str) -> Option<String> {
    row(db, id).await.ssh_private_key
}

async fn row(db: &DatabaseConnection, id: &str) -> subscription::Model {
    subscriptions::get(db, id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("row {id} is gone"))
}

/// A row with an ed25519 pair sealed by `sealer`; its private key, to compare with later.
async fn insert_sealed(db: &DatabaseConnection, sealer: &Sealer, id: &str) -> String {
    let pair = keys::generate_blocking(KeyAlgorithm::Ed25519, id).unwrap();
    let sealed = sealer.seal(pair.private_pem(), id).unwrap();
    insert_row(db, id, Some(&sealed), Some(&pair.public_openssh), None).await;
    pair.private_pem().to_owned()
}

/// What the controller's key check says about `id`'s row with `sealer`, not cached.
async fn key_state(db: &DatabaseConnection, sealer: &Sealer, id: &str) -> KeyState {
    KeyChecks::default().check(sealer, &row(db, id).await, true)
}

/// Asserts that `id`'s row opens with `sealer` to `private`, and that the controller's key
/// check (open, compare with the public key) accepts it.
async fn assert_opens(
    db: &DatabaseConnection,
    sealer: &Sealer,
    id: &str,
    private: &str,
    backend: &str,
) {
    let value = stored(db, id).await.expect("a private key");
    let opened = sealer
        .open(&value, id)
        .unwrap_or_else(|e| panic!("[{backend}] {id} does not open: {e}"));
    assert_eq!(
        opened.as_str(),
        private,
        "[{backend}] {id} opens to another key"
    );
    let state = key_state(db, sealer, id).await;
    assert!(
        matches!(state, KeyState::Sealed { .. }),
        "[{backend}] the controller's key check on {id}: {state:?}"
    );
}

/// The row counts of `keys status` output: `(key id, rows, state)`.
fn status_lines(stdout: &str) -> Vec<(String, u64, String)> {
    stdout
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cells = line.splitn(3, char::is_whitespace);
            let id = cells.next()?.to_owned();
            let rest = line[id.len()..].trim_start();
            let (rows, state) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            Some((id, rows.parse().ok()?, state.trim().to_owned()))
        })
        .collect()
}

fn rows_under(stdout: &str, key_id: &str) -> Option<u64> {
    status_lines(stdout)
        .into_iter()
        .find(|(id, _, _)| id == key_id)
        .map(|(_, rows, _)| rows)
}

#[tokio::test]
async fn keys_rotate_reseals_every_row_so_the_old_key_can_be_dropped() {
    let old_key = encryption_key();
    let (old_id, new_id) = (key_id(&old_key), key_id(NEW_KEY));
    let old = sealer(&old_key, &[]);
    let new_only = sealer(NEW_KEY, &[]);
    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated(&test_db).await;
        let mut private = Vec::new();
        for id in ["a-1", "a-2", "a-3", "a-4", "a-5"] {
            private.push((id, insert_sealed(&conn, &old, id).await));
        }
        private.push((
            "b-current",
            insert_sealed(&conn, &new_only, "b-current").await,
        ));
        // The web app's own keys: one marked external, one merely not in our format.
        insert_row(
            &conn,
            "c-external",
            Some("webapp:v9:c2VjcmV0"),
            None,
            Some("external"),
        )
        .await;
        insert_row(&conn, "d-foreign", Some("enc:opaque"), None, None).await;
        insert_row(&conn, "e-no-key", None, None, None).await;

        // Before: the old rows do not open with the new key alone.
        assert!(
            matches!(
                key_state(&conn, &new_only, "a-1").await,
                KeyState::Unusable(_)
            ),
            "[{backend}]"
        );
        let env = key_env(&test_db.url, NEW_KEY, Some(&old_key));
        let status = run_cli(dir.path(), &["keys", "status"], &env)
            .assert_code(0)
            .stdout
            .clone();
        assert_eq!(
            rows_under(&status, &old_id),
            Some(5),
            "[{backend}] {status}"
        );
        assert_eq!(
            rows_under(&status, &new_id),
            Some(1),
            "[{backend}] {status}"
        );
        assert!(status.contains("still needed"), "[{backend}] {status}");
        assert!(
            status.contains("6 rows sealed by this controller; 2 hold a key it did not seal"),
            "[{backend}] {status}"
        );

        let ran = run_cli(dir.path(), &["keys", "rotate"], &env);
        ran.assert_code(0);
        assert!(
            ran.stderr.contains("8/8 rows done"),
            "[{backend}] {}",
            ran.describe()
        );
        assert!(
            ran.stdout.contains(&format!(
                "re-sealed under key {new_id}: 5; already under it: 1; external (left alone): 2; \
                 cannot be opened (left alone): 0"
            )),
            "[{backend}] {}",
            ran.describe()
        );
        assert!(
            ran.stdout
                .contains("never changed): c-external, d-foreign\n"),
            "[{backend}] the external rows are not named\n{}",
            ran.describe()
        );
        assert_no_key_material(&ran, &[&old_key, NEW_KEY], &private);

        // The old key can go: every row opens with the new key alone, to the same key pair,
        // and the controller's start-up check passes without the old key.
        for (id, pem) in &private {
            assert_opens(&conn, &new_only, id, pem, backend).await;
        }
        check_sealer_opens_stored_keys(&conn, &new_only)
            .await
            .unwrap_or_else(|e| panic!("[{backend}] start-up check: {e}"));
        assert_eq!(
            stored(&conn, "c-external").await.as_deref(),
            Some("webapp:v9:c2VjcmV0")
        );
        assert_eq!(
            stored(&conn, "d-foreign").await.as_deref(),
            Some("enc:opaque")
        );
        assert_eq!(stored(&conn, "e-no-key").await, None);

        let status = run_cli(dir.path(), &["keys", "status"], &env)
            .assert_code(0)
            .stdout
            .clone();
        assert_eq!(
            rows_under(&status, &new_id),
            Some(6),
            "[{backend}] {status}"
        );
        assert_eq!(
            rows_under(&status, &old_id),
            Some(0),
            "[{backend}] {status}"
        );
        assert!(
            status.contains("no row needs it: it can be removed"),
            "[{backend}] {status}"
        );
        let without_old = key_env(&test_db.url, NEW_KEY, None);
        let status = run_cli(dir.path(), &["keys", "status"], &without_old)
            .assert_code(0)
            .stdout
            .clone();
        assert_eq!(rows_under(&status, &old_id), None, "[{backend}] {status}");

        // Again: nothing left to do, nothing rewritten.
        let before: Vec<Option<String>> = {
            let mut values = Vec::new();
            for (id, _) in &private {
                values.push(stored(&conn, id).await);
            }
            values
        };
        let again = run_cli(dir.path(), &["keys", "rotate"], &without_old);
        again.assert_code(0);
        assert!(
            again.stdout.contains(&format!(
                "re-sealed under key {new_id}: 0; already under it: 6"
            )),
            "[{backend}] {}",
            again.describe()
        );
        for ((id, _), value) in private.iter().zip(before) {
            assert_eq!(stored(&conn, id).await, value, "[{backend}] {id} rewritten");
        }
        conn.close().await.ok();
        test_db.cleanup().await;
    }
}

/// Asserts that a command printed neither key nor any of the private keys.
fn assert_no_key_material(ran: &Ran, keys: &[&str], private: &[(&str, String)]) {
    let output = format!("{}{}", ran.stdout, ran.stderr);
    let mut needles = Needles::default();
    for key in keys {
        needles.add("an encryption key", key);
    }
    for (id, pem) in private {
        needles.add_private_key(id, pem, "");
    }
    needles.assert_absent("the output of `keys`", &output);
}

#[tokio::test]
async fn an_interrupted_rotate_leaves_every_row_openable_and_a_rerun_finishes() {
    let old_key = encryption_key();
    let (old_id, new_id) = (key_id(&old_key), key_id(NEW_KEY));
    let old = sealer(&old_key, &[]);
    let new_only = sealer(NEW_KEY, &[]);
    let both = sealer(NEW_KEY, &[&old_key]);
    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated(&test_db).await;
        let mut private = Vec::new();
        for i in 1..=6 {
            let id = format!("sub-{i}");
            let pem = insert_sealed(&conn, &old, &id).await;
            private.push((id, pem));
        }
        // The new key alone opens nothing yet: a controller started with it would refuse.
        assert!(
            check_sealer_opens_stored_keys(&conn, &new_only)
                .await
                .is_err(),
            "[{backend}]"
        );

        // One row per batch, and a long pause after each: killed after the first batch.
        let env = key_env(&test_db.url, NEW_KEY, Some(&old_key));
        let mut child = ChildGuard::spawn(command(
            dir.path(),
            &[
                "keys",
                "rotate",
                "--batch-size",
                "1",
                "--batch-pause-ms",
                "600000",
            ],
            &env,
        ));
        let deadline = Instant::now() + DEADLINE;
        while !child.stderr().contains("rows done") {
            assert!(
                child.child.try_wait().unwrap().is_none(),
                "[{backend}] rotate ended before its first batch was done\n{}",
                child.output()
            );
            assert!(
                Instant::now() < deadline,
                "[{backend}] no progress\n{}",
                child.output()
            );
            sleep(POLL).await;
        }
        assert!(
            child.stderr().contains("1/6 rows done"),
            "[{backend}] {}",
            child.output()
        );
        signal(&child, "-KILL");
        let exit = child.wait_exit(DEADLINE).await;
        assert_eq!(exit.code(), None, "[{backend}] killed by a signal");

        // Half way: every row opens with the keys configured during a rotation (new
        // current, old previous), to the key pair it held.
        let status = run_cli(dir.path(), &["keys", "status"], &env)
            .assert_code(0)
            .stdout
            .clone();
        assert_eq!(
            rows_under(&status, &new_id),
            Some(1),
            "[{backend}] {status}"
        );
        assert_eq!(
            rows_under(&status, &old_id),
            Some(5),
            "[{backend}] {status}"
        );
        for (id, pem) in &private {
            assert_opens(&conn, &both, id, pem, backend).await;
        }

        // Run again: it finishes the rest.
        let ran = run_cli(dir.path(), &["keys", "rotate"], &env);
        ran.assert_code(0);
        assert!(
            ran.stdout.contains(&format!(
                "re-sealed under key {new_id}: 5; already under it: 1"
            )),
            "[{backend}] {}",
            ran.describe()
        );
        for (id, pem) in &private {
            assert_opens(&conn, &new_only, id, pem, backend).await;
        }
        check_sealer_opens_stored_keys(&conn, &new_only)
            .await
            .unwrap_or_else(|e| panic!("[{backend}] start-up check: {e}"));
        conn.close().await.ok();
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn a_row_written_while_rotate_works_on_it_keeps_what_was_written() {
    let old_key = encryption_key();
    let old = sealer(&old_key, &[]);
    let new_only = sealer(NEW_KEY, &[]);
    let rotating = sealer(NEW_KEY, &[&old_key]);
    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let conn = migrated(&test_db).await;
        for id in ["regenerated", "cleared", "old-replica", "untouched"] {
            insert_sealed(&conn, &old, id).await;
        }
        let untouched = old
            .open(&stored(&conn, "untouched").await.unwrap(), "untouched")
            .unwrap();

        // The rotation has read the rows...
        let batch = rotate::read_batch(&conn, None, 10).await.unwrap();
        assert_eq!(batch.len(), 4, "[{backend}] {batch:?}");
        // ... when others write them: the controller generates a new pair under the new key
        // for one and deprovisions another; a replica still on the old key re-generates a
        // third.
        let regenerated = new_only.seal("regenerated pair", "regenerated").unwrap();
        set_private_key(&conn, "regenerated", Some(&regenerated)).await;
        set_private_key(&conn, "cleared", None).await;
        let by_old_replica = old.seal("old replica's pair", "old-replica").unwrap();
        set_private_key(&conn, "old-replica", Some(&by_old_replica)).await;

        let tally = rotate::reseal_batch(&conn, &rotating, &batch)
            .await
            .unwrap();

        assert_eq!(
            stored(&conn, "regenerated").await.as_deref(),
            Some(regenerated.as_str()),
            "[{backend}] the controller's new pair was overwritten"
        );
        assert_eq!(
            stored(&conn, "cleared").await,
            None,
            "[{backend}] a cleared key came back"
        );
        let now = stored(&conn, "old-replica").await.unwrap();
        assert_eq!(
            new_only.open(&now, "old-replica").unwrap().as_str(),
            "old replica's pair",
            "[{backend}] the pair written meanwhile is what gets re-sealed"
        );
        let now = stored(&conn, "untouched").await.unwrap();
        assert_eq!(
            new_only.open(&now, "untouched").unwrap(),
            untouched,
            "[{backend}]"
        );
        assert_eq!(
            (
                tally.resealed,
                tally.already_current,
                tally.gone,
                tally.changed_meanwhile
            ),
            (2, 1, 1, 3),
            "[{backend}] {tally:?}"
        );
        assert!(
            tally.unopenable.is_empty() && tally.busy.is_empty(),
            "[{backend}] {tally:?}"
        );
        conn.close().await.ok();
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn two_rotates_at_once_reseal_each_row_once() {
    let old_key = encryption_key();
    let old = sealer(&old_key, &[]);
    let new_only = sealer(NEW_KEY, &[]);
    let rotating = sealer(NEW_KEY, &[&old_key]);
    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let conn = migrated(&test_db).await;
        let other = db::connect(&test_db.url).await.unwrap();
        let mut private = Vec::new();
        for i in 0..12 {
            let id = format!("sub-{i:02}");
            let pem = insert_sealed(&conn, &old, &id).await;
            private.push((id, pem));
        }

        // Both read the same rows before either writes: the second writes nothing.
        let first = rotate::read_batch(&conn, None, 6).await.unwrap();
        let second = rotate::read_batch(&other, None, 6).await.unwrap();
        let by_first = rotate::reseal_batch(&conn, &rotating, &first)
            .await
            .unwrap();
        let mut after_first = Vec::new();
        for row in &first {
            after_first.push(stored(&conn, &row.subscription_id).await);
        }
        let by_second = rotate::reseal_batch(&other, &rotating, &second)
            .await
            .unwrap();
        assert_eq!(
            (
                by_first.resealed,
                by_second.resealed,
                by_second.already_current
            ),
            (6, 0, 6),
            "[{backend}] {by_first:?} {by_second:?}"
        );
        assert_eq!(by_second.changed_meanwhile, 6, "[{backend}] {by_second:?}");
        for (row, value) in first.iter().zip(after_first) {
            assert_eq!(
                stored(&conn, &row.subscription_id).await,
                value,
                "[{backend}] the second rotate rewrote {}",
                row.subscription_id
            );
        }

        // And two whole rotations side by side both finish, each row re-sealed once.
        let options = rotate::Options {
            batch_size: 2,
            ..rotate::Options::default()
        };
        let (first, second) = tokio::join!(
            rotate::rotate(&conn, &rotating, &options, |_| {}),
            rotate::rotate(&other, &rotating, &options, |_| {}),
        );
        let (first, second) = (first.unwrap(), second.unwrap());
        assert!(
            first.is_complete() && second.is_complete(),
            "[{backend}] {first:?} {second:?}"
        );
        assert_eq!(
            first.tally.resealed + second.tally.resealed,
            6,
            "[{backend}] each remaining row re-sealed exactly once: {first:?} {second:?}"
        );
        for (id, pem) in &private {
            assert_opens(&conn, &new_only, id, pem, backend).await;
        }
        other.close().await.ok();
        conn.close().await.ok();
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn rows_rotate_cannot_open_or_did_not_seal_are_reported_and_left_alone() {
    let old_key = encryption_key();
    let stranger_id = key_id(STRANGER_KEY);
    let old = sealer(&old_key, &[]);
    let stranger = sealer(STRANGER_KEY, &[]);
    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let dir = tempfile::tempdir().unwrap();
        let conn = migrated(&test_db).await;
        let good = insert_sealed(&conn, &old, "good").await;
        // Sealed under a key nobody configured.
        insert_sealed(&conn, &stranger, "stranger").await;
        // Another row's value copied here: it names a configured key but is bound to "good".
        let copied = stored(&conn, "good").await.unwrap();
        insert_row(&conn, "copied", Some(&copied), None, None).await;
        // Marked external: never opened, although it looks like ours and would open.
        let external = old.seal("web app's key", "external").unwrap();
        insert_row(&conn, "external", Some(&external), None, Some("external")).await;
        let left_alone = [
            ("stranger", stored(&conn, "stranger").await),
            ("copied", Some(copied)),
            ("external", Some(external)),
        ];

        let env = key_env(&test_db.url, NEW_KEY, Some(&old_key));
        for run in ["first", "second"] {
            let ran = run_cli(dir.path(), &["keys", "rotate"], &env);
            ran.assert_code(1);
            for needle in [
                "keys rotate did not finish: 2 row(s) cannot be opened",
                "\"stranger\": value was sealed with encryption key id",
                &stranger_id,
                "\"copied\": cannot open value sealed with key id",
                "VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS",
            ] {
                assert!(
                    ran.stderr.contains(needle),
                    "[{backend}] {run} run: the error does not say {needle:?}\n{}",
                    ran.describe()
                );
            }
            assert!(
                ran.stdout
                    .contains("external (left alone): 1; cannot be opened (left alone): 2"),
                "[{backend}] {}",
                ran.describe()
            );
            assert!(
                ran.stdout.contains("NOT DONE"),
                "[{backend}] {}",
                ran.describe()
            );
            for (id, value) in &left_alone {
                assert_eq!(
                    &stored(&conn, id).await,
                    value,
                    "[{backend}] {id} was changed"
                );
            }
        }
        assert_opens(&conn, &sealer(NEW_KEY, &[]), "good", &good, backend).await;
        conn.close().await.ok();
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn keys_commands_need_a_migrated_database_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let key = encryption_key();
    for args in [&["keys", "status"][..], &["keys", "rotate"][..]] {
        let ran = run_cli(dir.path(), args, &key_env(&url, &key, None));
        ran.assert_fails_naming("run `vps-controller migrate`");
        assert!(ran.stderr.contains("not up to date"), "{}", ran.describe());
    }
    let ran = run_cli(dir.path(), &["keys", "rotate"], &[("DATABASE_URL", &url)]);
    ran.assert_fails_naming("VPS_CONTROLLER_ENCRYPTION_KEY");
}

// ---------------------------------------------------------------------------------------------
// Nothing leaks

/// Texts that must not appear somewhere, with what each one is.
#[derive(Default, Clone)]
struct Needles(Vec<(String, String)>);

impl Needles {
    fn add(&mut self, what: impl Into<String>, text: &str) {
        assert!(
            text.len() >= 8,
            "needle {text:?} too short to mean anything"
        );
        self.0.push((what.into(), text.to_owned()));
    }

    /// Every body line of a PEM private key (the BEGIN/END lines are needles of their own),
    /// but those found in its `public` key line: the public half (an RSA modulus, an ed25519
    /// point) is inside the private key too, and a line of it may match the public key's
    /// base64 when the two encodings happen to align.
    fn add_private_key(&mut self, id: &str, pem: &str, public: &str) {
        let mut lines = 0;
        for line in pem.lines().filter(|line| !line.starts_with("-----")) {
            if line.len() >= 16 && !public.contains(line) {
                self.add(format!("a line of {id}'s private key"), line);
                lines += 1;
            }
        }
        assert!(
            lines > 0,
            "{id}: no private key lines in {} bytes",
            pem.len()
        );
    }

    fn assert_absent(&self, place: &str, text: &str) {
        for (what, needle) in &self.0 {
            if let Some(at) = text.find(needle.as_str()) {
                let start = text.floor_char_boundary(at.saturating_sub(300));
                let end = text.ceil_char_boundary((at + needle.len() + 300).min(text.len()));
                panic!(
                    "{what} found in {place} (of {} bytes):\n…{}…",
                    text.len(),
                    &text[start..end]
                );
            }
        }
    }
}

/// Never anywhere, in any form the controller writes private keys.
fn private_key_markers() -> Needles {
    let mut needles = Needles::default();
    for (what, text) in [
        ("PEM private key text", "PRIVATE KEY"),
        ("a PEM header", "-----BEGIN"),
        ("OpenSSH private key text", "openssh-key-v1"),
        ("OpenSSH private key text (base64)", "b3BlbnNzaC1rZXktdjE"),
    ] {
        needles.add(what, text);
    }
    needles
}

/// Marks the plan's cloud-init template, so user_data is recognisable anywhere.
const USER_DATA_MARKER: &str = "userdata-marker-5Kq2Wz";

fn config_yaml(algorithm: &str) -> String {
    format!(
        "ssh_key_algorithm: {algorithm}
shutdown_timeout_seconds: 0
plans:
  starter:
    server_type: cx23
    image: ubuntu-24.04
    location: fsn1
    firewall_rules:
      - direction: in
        protocol: tcp
        port: \"22\"
        source_ips: [0.0.0.0/0]
    cloud_init:
      write_files:
        - path: /etc/{USER_DATA_MARKER}
          content: \"{USER_DATA_MARKER} on {{{{hostname}}}}\"
      runcmd:
        - echo {USER_DATA_MARKER}
"
    )
}

/// Every table, every column, every row, as text (`SELECT *` on SQLite, each column cast to
/// text on PostgreSQL), one cell per line. Also returns the table names.
async fn dump(conn: &DatabaseConnection) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut tables = Vec::new();
    match conn.get_database_backend() {
        DbBackend::Sqlite => {
            let pool = conn.get_sqlite_connection_pool();
            let names: Vec<(String,)> =
                sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                    .fetch_all(pool)
                    .await
                    .unwrap();
            for (table,) in names {
                let rows = sqlx::query(AssertSqlSafe(format!("SELECT * FROM \"{table}\"")))
                    .fetch_all(pool)
                    .await
                    .unwrap();
                for row in &rows {
                    for i in 0..row.len() {
                        // Any storage class as its bytes (SQLite converts numbers to text).
                        let cell: Option<Vec<u8>> = row.try_get_unchecked(i).unwrap();
                        if let Some(cell) = cell {
                            out.push_str(&String::from_utf8_lossy(&cell));
                            out.push('\n');
                        }
                    }
                }
                tables.push(table);
            }
        }
        DbBackend::Postgres => {
            let pool = conn.get_postgres_connection_pool();
            let names: Vec<(String,)> = sqlx::query_as(
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = current_schema() ORDER BY table_name",
            )
            .fetch_all(pool)
            .await
            .unwrap();
            for (table,) in names {
                let columns: Vec<(String, String)> = sqlx::query_as(
                    "SELECT column_name::text, data_type::text FROM information_schema.columns \
                     WHERE table_schema = current_schema() AND table_name = $1 \
                     ORDER BY ordinal_position",
                )
                .bind(&table)
                .fetch_all(pool)
                .await
                .unwrap();
                assert!(!columns.is_empty(), "table {table} without columns");
                let select: Vec<String> = columns
                    .iter()
                    .map(|(column, data_type)| match data_type.as_str() {
                        "bytea" => format!("encode(\"{column}\", 'escape')"),
                        _ => format!("CAST(\"{column}\" AS TEXT)"),
                    })
                    .collect();
                let rows = sqlx::query(AssertSqlSafe(format!(
                    "SELECT {} FROM \"{table}\"",
                    select.join(", ")
                )))
                .fetch_all(pool)
                .await
                .unwrap();
                for row in &rows {
                    for i in 0..row.len() {
                        if let Some(cell) = row.try_get::<Option<String>, _>(i).unwrap() {
                            out.push_str(&cell);
                            out.push('\n');
                        }
                    }
                }
                tables.push(table);
            }
        }
        other => panic!("no dump for {other:?}"),
    }
    (out, tables)
}

/// `vps-controller run` against the simulator at `sim_url`, logging at trace level.
async fn spawn_controller(
    dir: &Path,
    sim_url: &str,
    database_url: &str,
    config: &Path,
    keys: (&str, Option<&str>),
    log_format: &str,
) -> (ChildGuard, String) {
    let endpoint = format!("{sim_url}/v1");
    let config = config.display().to_string();
    spawn_listening(
        |port| {
            let listen = format!("127.0.0.1:{port}");
            let args = [
                "run",
                "--listen",
                &listen,
                "--log-format",
                log_format,
                "--resync-seconds",
                "2",
            ];
            let mut env = vec![
                ("HCLOUD_ENDPOINT", endpoint.as_str()),
                ("HCLOUD_TOKEN", SECRET_TOKEN),
                ("DATABASE_URL", database_url),
                ("VPS_CONTROLLER_CONFIG", config.as_str()),
                ("VPS_CONTROLLER_ENCRYPTION_KEY", keys.0),
                ("RUST_LOG", "trace"),
            ];
            if let Some(previous) = keys.1 {
                env.push(("VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS", previous));
            }
            command(dir, &args, &env)
        },
        "/metrics",
    )
    .await
}

/// Stops a controller with SIGTERM; its output.
async fn stop(mut controller: ChildGuard) -> String {
    controller.terminate();
    let exit = controller.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(exit.code(), Some(0), "{}", controller.output());
    controller.output()
}

/// Waits until `id`'s provisioning_status is `status`, failing at once if it turns `failed`.
async fn wait_for_status(
    conn: &DatabaseConnection,
    id: &str,
    status: &str,
    controller: &ChildGuard,
) -> subscription::Model {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(row) = subscriptions::get(conn, id).await.unwrap() {
            if row.provisioning_status == status {
                return row;
            }
            assert_ne!(
                row.provisioning_status,
                "failed",
                "{id} failed: {:?}\n{}",
                row.provisioning_error,
                controller.output()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{id} not {status} within {DEADLINE:?}\n{}",
            controller.output()
        );
        sleep(POLL).await;
    }
}

async fn get(http: &reqwest::Client, url: &str) -> String {
    let response = http.get(url).send().await.unwrap();
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    response.text().await.unwrap()
}

/// Every place a secret could end up, with what it holds.
#[derive(Default)]
struct Seen(Vec<(String, String)>);

impl Seen {
    fn add(&mut self, place: impl Into<String>, text: impl Into<String>) {
        self.0.push((place.into(), text.into()));
    }

    fn ran(&mut self, args: &[&str], ran: &Ran) {
        self.add(
            format!("`vps-controller {}`", args.join(" ")),
            format!("{}{}", ran.stdout, ran.stderr),
        );
    }
}

/// A command expected to fail: its arguments, its environment as changes to a base, and
/// what its error must name.
struct Failing {
    args: &'static [&'static str],
    names: &'static str,
    changes: Vec<(&'static str, Option<String>)>,
}

impl Failing {
    fn new(args: &'static [&'static str], names: &'static str) -> Failing {
        Failing {
            args,
            names,
            changes: Vec::new(),
        }
    }

    fn set(mut self, name: &'static str, value: &str) -> Failing {
        self.changes.push((name, Some(value.to_owned())));
        self
    }

    fn unset(mut self, name: &'static str) -> Failing {
        self.changes.push((name, None));
        self
    }

    fn env<'a>(&'a self, base: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
        let mut env: Vec<(&str, &str)> = base
            .iter()
            .filter(|(name, _)| !self.changes.iter().any(|(changed, _)| changed == name))
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        env.extend(
            self.changes
                .iter()
                .filter_map(|(name, value)| Some((*name, value.as_deref()?))),
        );
        env
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_provisioned_and_rotated_leaks_no_secret_anywhere() {
    let old_key = encryption_key();
    let new_id = key_id(NEW_KEY);
    let both = sealer(NEW_KEY, &[&old_key]);
    let new_only = sealer(NEW_KEY, &[]);
    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let url = test_db.url.clone();
        let dir = tempfile::tempdir().unwrap();
        let sim_dir = tempfile::tempdir().unwrap();
        let (_simulator, sim_url) =
            spawn_simulator(sim_dir.path(), &["--action-seconds", "0.2"]).await;
        let rsa_config = dir.path().join("rsa.yaml");
        let ed_config = dir.path().join("ed25519.yaml");
        std::fs::write(&rsa_config, config_yaml("rsa-4096")).unwrap();
        std::fs::write(&ed_config, config_yaml("ed25519")).unwrap();
        // The marker really is user_data: what the controller sends with each server.
        let config = vps_controller::config::Config::load(Some(&ed_config)).unwrap();
        let user_data = vps_controller::cloud_init::render(
            &config.plans["starter"].cloud_init,
            "vps-x",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl c",
            None,
        )
        .unwrap();
        assert!(user_data.contains(USER_DATA_MARKER), "{user_data}");

        let mut seen = Seen::default();
        let mut private = Vec::new();
        let http = http_client();

        // 1. RSA pairs under the old key (pretty logs).
        let (controller, _) = spawn_controller(
            dir.path(),
            &sim_url,
            &url,
            &rsa_config,
            (&old_key, None),
            "pretty",
        )
        .await;
        let conn = db::connect(&url).await.unwrap();
        for id in ["rsa-1", "rsa-2"] {
            insert_row(&conn, id, None, None, None).await;
        }
        for id in ["rsa-1", "rsa-2"] {
            let row = wait_for_status(&conn, id, "ready", &controller).await;
            let sealed = row.ssh_private_key.expect("a sealed key");
            assert_eq!(
                Sealer::sealed_key_id(&sealed),
                Some(key_id(&old_key).as_str())
            );
            let pem = both.open(&sealed, id).unwrap();
            assert!(
                pem.starts_with("-----BEGIN PRIVATE KEY-----"),
                "[{backend}] {id}"
            );
            let public = row.ssh_public_key.expect("a public key");
            private.push((id, pem.to_string(), sealed, public));
        }
        let output = stop(controller).await;
        assert!(
            output.contains(" TRACE "),
            "[{backend}] not logging at trace level"
        );
        seen.add("the first controller's log (pretty, trace)", output);

        // 2. Rolled to the new key (old one previous); ed25519 pairs; one deprovisioned
        //    (JSON logs).
        let (controller, base_url) = spawn_controller(
            dir.path(),
            &sim_url,
            &url,
            &ed_config,
            (NEW_KEY, Some(&old_key)),
            "json",
        )
        .await;
        for id in ["ed-1", "ed-2"] {
            insert_row(&conn, id, None, None, None).await;
        }
        for id in ["ed-1", "ed-2"] {
            let row = wait_for_status(&conn, id, "ready", &controller).await;
            let sealed = row.ssh_private_key.expect("a sealed key");
            assert_eq!(Sealer::sealed_key_id(&sealed), Some(new_id.as_str()));
            let pem = both.open(&sealed, id).unwrap();
            assert!(
                pem.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"),
                "[{backend}] {id}"
            );
            let public = row.ssh_public_key.expect("a public key");
            private.push((id, pem.to_string(), sealed, public));
        }
        conn.execute_unprepared("UPDATE subscriptions SET status = 'canceled' WHERE id = 'ed-2'")
            .await
            .unwrap();
        wait_for_status(&conn, "ed-2", "deprovisioned", &controller).await;

        seen.add("/metrics", get(&http, &format!("{base_url}/metrics")).await);
        seen.add("the status page", get(&http, &format!("{base_url}/")).await);
        let endpoint = format!("{sim_url}/v1");
        let ed_config_path = ed_config.display().to_string();
        let cli_env = [
            ("DATABASE_URL", url.as_str()),
            ("HCLOUD_ENDPOINT", endpoint.as_str()),
            ("HCLOUD_TOKEN", SECRET_TOKEN),
            ("VPS_CONTROLLER_CONFIG", ed_config_path.as_str()),
            ("VPS_CONTROLLER_ENCRYPTION_KEY", NEW_KEY),
            ("VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS", old_key.as_str()),
            ("RUST_LOG", "trace"),
        ];
        for args in [
            &["status"][..],
            &["status", "rsa-1"],
            &["status", "ed-1"],
            &["status", "ed-2"],
            &["plan"],
        ] {
            let ran = run_cli(dir.path(), args, &cli_env);
            seen.ran(args, &ran);
        }
        let status = run_cli(dir.path(), &["keys", "status"], &cli_env);
        assert_eq!(
            rows_under(&status.stdout, &key_id(&old_key)),
            Some(2),
            "[{backend}] {}",
            status.describe()
        );
        seen.ran(&["keys", "status"], &status);

        // 3. The rotation, with the controller running.
        let rotated = run_cli(dir.path(), &["keys", "rotate"], &cli_env);
        rotated.assert_code(0);
        assert!(
            rotated.stdout.contains(&format!(
                "re-sealed under key {new_id}: 2; already under it: 1"
            )),
            "[{backend}] {}",
            rotated.describe()
        );
        seen.ran(&["keys", "rotate"], &rotated);
        let status = run_cli(dir.path(), &["keys", "status"], &cli_env);
        assert_eq!(
            rows_under(&status.stdout, &key_id(&old_key)),
            Some(0),
            "[{backend}]"
        );
        seen.ran(&["keys", "status"], &status);
        seen.add(
            "the second controller's log (json, trace)",
            stop(controller).await,
        );

        // 4. Errors: wrong keys, unreadable files, a rejected token.
        let missing = dir.path().join("missing");
        let missing = missing.display().to_string();
        let bad_key = "c2VjcmV0LWJ1dC10b28tc2hvcnQta2V5"; // base64, 24 bytes
        let two_lines = dir.path().join("token");
        std::fs::write(&two_lines, format!("{SECRET_TOKEN}\n{SECRET_TOKEN}\n")).unwrap();
        let two_lines = two_lines.display().to_string();
        let base: Vec<(&str, String)> = vec![
            ("DATABASE_URL", url.clone()),
            ("HCLOUD_ENDPOINT", endpoint.clone()),
            ("HCLOUD_TOKEN", SECRET_TOKEN.into()),
            ("VPS_CONTROLLER_CONFIG", ed_config_path.clone()),
            ("VPS_CONTROLLER_ENCRYPTION_KEY", NEW_KEY.into()),
            ("RUST_LOG", "trace".into()),
        ];
        let run = &["run", "--listen", "127.0.0.1:0"][..];
        let cases = [
            // A valid key that opens none of the rows: the start-up check refuses.
            Failing::new(run, "VPS_CONTROLLER_ENCRYPTION_KEY")
                .set("VPS_CONTROLLER_ENCRYPTION_KEY", STRANGER_KEY),
            Failing::new(run, "VPS_CONTROLLER_ENCRYPTION_KEY")
                .set("VPS_CONTROLLER_ENCRYPTION_KEY", bad_key),
            Failing::new(run, "VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS item 2").set(
                "VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS",
                &format!("{old_key},{bad_key}"),
            ),
            Failing::new(run, "VPS_CONTROLLER_ENCRYPTION_KEY_FILE")
                .unset("VPS_CONTROLLER_ENCRYPTION_KEY")
                .set("VPS_CONTROLLER_ENCRYPTION_KEY_FILE", &missing),
            Failing::new(run, "HCLOUD_TOKEN_FILE")
                .unset("HCLOUD_TOKEN")
                .set("HCLOUD_TOKEN_FILE", &missing),
            Failing::new(run, "HCLOUD_TOKEN")
                .unset("HCLOUD_TOKEN")
                .set("HCLOUD_TOKEN_FILE", &two_lines),
            Failing::new(&["plan"], "unauthorized").set("HCLOUD_TOKEN", "rejected-token-Vb82xQ"),
            // Rotating with a key that opens nothing: every row reported, none touched.
            Failing::new(&["keys", "rotate"], "cannot be opened")
                .set("VPS_CONTROLLER_ENCRYPTION_KEY", STRANGER_KEY),
        ];
        for case in &cases {
            let env = case.env(&base);
            let ran = run_cli(dir.path(), case.args, &env);
            assert_eq!(
                ran.code,
                Some(1),
                "[{backend}] {:?} {env:?}\n{}",
                case.args,
                ran.describe()
            );
            assert!(
                ran.stderr.contains(case.names),
                "[{backend}] {:?}: the error does not name {:?}\n{}",
                case.args,
                case.names,
                ran.describe()
            );
            seen.ran(case.args, &ran);
        }
        let mut error_needles = Needles::default();
        error_needles.add("a malformed encryption key", bad_key);
        error_needles.add("a rejected token", "rejected-token-Vb82xQ");
        error_needles.add("a key that opens nothing", STRANGER_KEY);

        // 5. The old key dropped: the controller starts (its start-up check opens the
        //    stored keys) and every row still works when reconciled again.
        let (controller, base_url) = spawn_controller(
            dir.path(),
            &sim_url,
            &url,
            &ed_config,
            (NEW_KEY, None),
            "pretty",
        )
        .await;
        let retry_env = [("DATABASE_URL", url.as_str())];
        for id in ["rsa-1", "rsa-2", "ed-1"] {
            let ran = run_cli(dir.path(), &["retry", id], &retry_env);
            seen.ran(&["retry", id], ran.assert_code(0));
        }
        for id in ["rsa-1", "rsa-2", "ed-1"] {
            let deadline = Instant::now() + DEADLINE;
            let row = loop {
                let row = row(&conn, id).await;
                if row.observed_version != -1 {
                    break row;
                }
                assert!(
                    Instant::now() < deadline,
                    "[{backend}] {id} not reconciled\n{}",
                    controller.output()
                );
                sleep(POLL).await;
            };
            assert_eq!(
                (
                    row.provisioning_status.as_str(),
                    row.provisioning_error.as_deref()
                ),
                ("ready", None),
                "[{backend}] {id} after the old key was dropped\n{}",
                controller.output()
            );
            assert_opens(
                &conn,
                &new_only,
                id,
                &private.iter().find(|p| p.0 == id).unwrap().1,
                backend,
            )
            .await;
        }
        seen.add(
            "/metrics (new key only)",
            get(&http, &format!("{base_url}/metrics")).await,
        );
        seen.add(
            "the status page (new key only)",
            get(&http, &format!("{base_url}/")).await,
        );
        seen.add(
            "the third controller's log (pretty, trace)",
            stop(controller).await,
        );

        // What must be nowhere: private keys in any form, the token, the keys, user_data.
        let mut nowhere = private_key_markers();
        for (id, pem, _, public) in &private {
            nowhere.add_private_key(id, pem, public);
        }
        nowhere.add("the API token", SECRET_TOKEN);
        nowhere.add("the old encryption key", &old_key);
        nowhere.add("the new encryption key", NEW_KEY);
        nowhere.add("user_data (the template's marker)", USER_DATA_MARKER);
        nowhere.add("user_data", "#cloud-config");

        // The database holds sealed keys only.
        let (dump, tables) = dump(&conn).await;
        for table in ["subscriptions", "events", "leases"] {
            assert!(
                tables.iter().any(|t| t == table),
                "[{backend}] dump missed {table}: {tables:?}"
            );
        }
        assert!(
            dump.contains(&format!("v1:{new_id}:"))
                && dump.contains("ssh-rsa AAAA")
                && dump.contains("KeyPairGenerated"),
            "[{backend}] the dump does not show the key columns and events it must read"
        );
        nowhere.assert_absent(&format!("the {backend} database"), &dump);
        if let Some(db_dir) = test_db.dir() {
            for file in ["test.db", "test.db-wal"] {
                if let Ok(bytes) = std::fs::read(db_dir.join(file)) {
                    nowhere.assert_absent(
                        &format!("the bytes of {file}"),
                        &String::from_utf8_lossy(&bytes),
                    );
                }
            }
        }

        // Logs, pages, metrics and output hold neither these nor the sealed values.
        let mut nothing = nowhere.clone();
        nothing.0.extend(error_needles.0);
        for (id, _, sealed, _) in &private {
            let payload = sealed.splitn(3, ':').nth(2).unwrap();
            nothing.add(format!("{id}'s sealed private key"), &payload[..40]);
        }
        for (place, text) in &seen.0 {
            nothing.assert_absent(&format!("[{backend}] {place}"), text);
        }
        drop(conn);
        test_db.cleanup().await;
    }
}
