//! Database layer against real SQLite and PostgreSQL: schema, upgrade of the web app's table,
//! version triggers, deletions, events, leases, NOTIFY and connection handling.

mod common;

use std::time::Duration;

use common::{TestDb, eventually, test_databases};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait, Statement, TransactionTrait};
use vps_controller::db::entities::{lease, subscription, subscription_deletion};
use vps_controller::db::{self, DbError, EventKind, StatusUpdate, events, leases, subscriptions};

async fn migrated(test_db: &TestDb) -> DatabaseConnection {
    let db = db::connect(&test_db.url).await.unwrap();
    db::migrate(&db).await.unwrap();
    db
}

async fn exec(db: &DatabaseConnection, sql: &str) {
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
}

async fn query_i64(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index(0).unwrap()
}

/// The web app's plain INSERT, everything else defaulted.
async fn insert_plain(db: &DatabaseConnection, id: &str) {
    exec(
        db,
        &format!(
            "INSERT INTO subscriptions (id, user_id, status, plan) \
             VALUES ('{id}', 'user_{id}', 'active', 'starter')"
        ),
    )
    .await;
}

async fn desired_version(db: &DatabaseConnection, id: &str) -> i64 {
    subscriptions::get(db, id)
        .await
        .unwrap()
        .unwrap()
        .desired_version
}

#[tokio::test]
async fn fresh_database_accepts_the_plain_insert_with_defaults() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        insert_plain(&db, "sub_1").await;

        let row = subscriptions::get(&db, "sub_1").await.unwrap().unwrap();
        assert_eq!(row.user_id.as_deref(), Some("user_sub_1"), "[{backend}]");
        assert_eq!(row.status.as_deref(), Some("active"), "[{backend}]");
        assert_eq!(row.plan.as_deref(), Some("starter"), "[{backend}]");
        assert_eq!(row.provisioning_status, "pending", "[{backend}]");
        assert_eq!(
            (row.desired_version, row.observed_version),
            (1, 0),
            "[{backend}]"
        );
        assert_eq!(row.stripe_subscription_id, None, "[{backend}]");
        assert_eq!(row.hetzner_server_id, None, "[{backend}]");
        assert_eq!(row.ssh_private_key, None, "[{backend}]");
        assert_eq!(row.last_reconciled_at, None, "[{backend}]");
        let stamped = query_i64(
            &db,
            "SELECT count(*) FROM subscriptions \
             WHERE created_at IS NOT NULL AND updated_at IS NOT NULL",
        )
        .await;
        assert_eq!(stamped, 1, "[{backend}] created_at/updated_at defaulted");

        assert_eq!(
            subscriptions::all(&db).await.unwrap().rows,
            vec![row],
            "[{backend}]"
        );
        assert_eq!(
            subscriptions::changed(&db).await.unwrap(),
            vec![("sub_1".to_owned(), 1)],
            "[{backend}] a new row needs a pass"
        );
        assert_eq!(
            subscriptions::get(&db, "nope").await.unwrap(),
            None,
            "[{backend}]"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn migrating_again_changes_nothing() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        insert_plain(&db, "sub_1").await;
        exec(
            &db,
            "UPDATE subscriptions SET status = 'past_due' WHERE id = 'sub_1'",
        )
        .await;
        assert_eq!(desired_version(&db, "sub_1").await, 2, "[{backend}]");

        db::migrate(&db).await.unwrap();
        let recorded = query_i64(&db, "SELECT count(*) FROM vps_controller_migrations").await;
        assert_eq!(recorded, 4, "[{backend}] every migration recorded");
        assert_eq!(
            desired_version(&db, "sub_1").await,
            2,
            "[{backend}] row untouched"
        );

        // Forget the record so the migration body itself runs a second time: it must be
        // idempotent (no duplicate columns, triggers or indexes).
        exec(&db, "DELETE FROM vps_controller_migrations").await;
        db::migrate(&db).await.unwrap();
        let row = subscriptions::get(&db, "sub_1").await.unwrap().unwrap();
        assert_eq!(
            (row.status.as_deref().unwrap_or(""), row.desired_version),
            ("past_due", 2),
            "[{backend}]"
        );
        exec(
            &db,
            "UPDATE subscriptions SET plan = 'pro' WHERE id = 'sub_1'",
        )
        .await;
        assert_eq!(
            desired_version(&db, "sub_1").await,
            3,
            "[{backend}] one trigger, one bump"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn upgrade_keeps_the_web_app_rows_and_they_decode() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = db::connect(&test_db.url).await.unwrap();
        // The web app's table before the controller: drizzle on SQLite keeps timestamps as
        // integers; vps_provisioned stands for web-app columns the controller does not know.
        if test_db.is_sqlite() {
            exec(
                &db,
                "CREATE TABLE subscriptions (
                    id text PRIMARY KEY NOT NULL,
                    user_id text NOT NULL,
                    stripe_subscription_id text,
                    status text NOT NULL,
                    plan text NOT NULL,
                    vps_provisioned integer DEFAULT 0 NOT NULL,
                    created_at integer DEFAULT (unixepoch()) NOT NULL,
                    updated_at integer DEFAULT (unixepoch()) NOT NULL)",
            )
            .await;
            exec(
                &db,
                "INSERT INTO subscriptions VALUES
                    ('old_1', 'u1', 'sub_stripe_1', 'active', 'pro', 0, 1700000000, 1700000000),
                    ('old_2', 'u2', NULL, 'canceled', 'starter', 1, 1700000100, 1700000200)",
            )
            .await;
        } else {
            exec(
                &db,
                "CREATE TABLE subscriptions (
                    id text PRIMARY KEY NOT NULL,
                    user_id text NOT NULL,
                    stripe_subscription_id text,
                    status text NOT NULL,
                    plan text NOT NULL,
                    vps_provisioned boolean DEFAULT false NOT NULL,
                    created_at timestamptz DEFAULT now() NOT NULL,
                    updated_at timestamptz DEFAULT now() NOT NULL)",
            )
            .await;
            exec(
                &db,
                "INSERT INTO subscriptions (id, user_id, stripe_subscription_id, status, plan)
                 VALUES ('old_1', 'u1', 'sub_stripe_1', 'active', 'pro'),
                        ('old_2', 'u2', NULL, 'canceled', 'starter')",
            )
            .await;
        }

        db::migrate(&db).await.unwrap();

        let rows = subscriptions::all(&db).await.unwrap().rows;
        let summary: Vec<_> = rows
            .iter()
            .map(|row| {
                (
                    row.id.as_str(),
                    row.user_id.as_deref().unwrap_or(""),
                    row.stripe_subscription_id.as_deref(),
                    row.status.as_deref().unwrap_or(""),
                    row.plan.as_deref().unwrap_or(""),
                    row.provisioning_status.as_str(),
                    row.desired_version,
                    row.observed_version,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "old_1",
                    "u1",
                    Some("sub_stripe_1"),
                    "active",
                    "pro",
                    "pending",
                    1,
                    0
                ),
                ("old_2", "u2", None, "canceled", "starter", "pending", 1, 0),
            ],
            "[{backend}]"
        );
        assert_eq!(
            subscriptions::changed(&db).await.unwrap(),
            vec![("old_1".to_owned(), 1), ("old_2".to_owned(), 1)],
            "[{backend}] existing rows get a first pass"
        );

        // The web app keeps working: its edit bumps the version, its INSERT still works.
        let edit = if test_db.is_sqlite() {
            "UPDATE subscriptions SET status = 'active', updated_at = 1700000300 WHERE id = 'old_2'"
        } else {
            "UPDATE subscriptions SET status = 'active', updated_at = now() WHERE id = 'old_2'"
        };
        exec(&db, edit).await;
        assert_eq!(desired_version(&db, "old_2").await, 2, "[{backend}]");
        insert_plain(&db, "new_1").await;
        assert_eq!(
            subscriptions::all(&db).await.unwrap().rows.len(),
            3,
            "[{backend}]"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn migration_refuses_tables_it_cannot_serve_and_changes_nothing() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = db::connect(&test_db.url).await.unwrap();
        exec(
            &db,
            "CREATE TABLE subscriptions (id text PRIMARY KEY, user_id text, status text)",
        )
        .await;
        let err = db::migrate(&db).await.unwrap_err();
        assert_eq!(err.metric_label(), "migrate", "[{backend}]");
        assert!(
            err.to_string().contains("no column plan"),
            "[{backend}] {err}"
        );
        let columns = if test_db.is_sqlite() {
            "SELECT count(*) FROM pragma_table_info('subscriptions')"
        } else {
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'subscriptions'"
        };
        assert_eq!(query_i64(&db, columns).await, 3, "[{backend}] rolled back");

        if test_db.is_postgres() {
            // sqlx cannot decode integer into i64: refuse with the fix instead of failing later.
            exec(&db, "ALTER TABLE subscriptions ADD COLUMN plan text").await;
            exec(
                &db,
                "ALTER TABLE subscriptions ADD COLUMN hetzner_server_id integer",
            )
            .await;
            let err = db::migrate(&db).await.unwrap_err().to_string();
            assert!(
                err.contains("subscriptions.hetzner_server_id has type integer")
                    && err.contains("bigint"),
                "[{backend}] {err}"
            );
            assert_eq!(query_i64(&db, columns).await, 5, "[{backend}] rolled back");
        }
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn spec_changes_bump_desired_version_and_status_writes_do_not() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        insert_plain(&db, "a").await;
        insert_plain(&db, "b").await;

        // A full controller write, including observed_version, leaves desired_version alone.
        let provisioned_at = chrono::DateTime::parse_from_rfc3339("2026-02-14T09:25:12.5Z")
            .unwrap()
            .to_utc();
        let full = StatusUpdate {
            provisioning_status: Some("ready".into()),
            provisioning_error: Some(None),
            hetzner_server_id: Some(Some(9_000_000_001)),
            hetzner_ssh_key_id: Some(Some(42)),
            hetzner_firewall_id: Some(Some(43)),
            vps_ip_address: Some(Some("203.0.113.7".into())),
            vps_hostname: Some(Some("vps-a".into())),
            provisioned_at: Some(Some(provisioned_at)),
            deprovisioned_at: Some(None),
            ssh_private_key: Some(Some("sealed:v1:abc".into())),
            ssh_public_key: Some(Some("ssh-ed25519 AAAA vps-a".into())),
            ssh_key_origin: Some(Some("controller".into())),
            ssh_host_key: Some(Some("ssh-ed25519 AAAAhost".into())),
            observed_version: Some(1),
        };
        subscriptions::write_status(&db, None, "a", &full)
            .await
            .unwrap();
        let row = subscriptions::get(&db, "a").await.unwrap().unwrap();
        assert_eq!(
            (row.desired_version, row.observed_version),
            (1, 1),
            "[{backend}]"
        );
        assert_eq!(row.provisioning_status, "ready", "[{backend}]");
        assert_eq!(row.hetzner_server_id, Some(9_000_000_001), "[{backend}]");
        assert_eq!(row.hetzner_ssh_key_id, Some(42), "[{backend}]");
        assert_eq!(row.hetzner_firewall_id, Some(43), "[{backend}]");
        assert_eq!(
            row.ssh_host_key.as_deref(),
            Some("ssh-ed25519 AAAAhost"),
            "[{backend}]"
        );
        assert_eq!(
            row.vps_ip_address.as_deref(),
            Some("203.0.113.7"),
            "[{backend}]"
        );
        assert_eq!(row.vps_hostname.as_deref(), Some("vps-a"), "[{backend}]");
        assert_eq!(row.provisioned_at, Some(provisioned_at), "[{backend}]");
        assert_eq!(
            row.ssh_private_key.as_deref(),
            Some("sealed:v1:abc"),
            "[{backend}]"
        );
        assert_eq!(
            row.ssh_public_key.as_deref(),
            Some("ssh-ed25519 AAAA vps-a"),
            "[{backend}]"
        );
        assert!(row.last_reconciled_at.is_some(), "[{backend}]");
        assert_eq!(
            subscriptions::changed(&db).await.unwrap(),
            vec![("b".to_owned(), 1)],
            "[{backend}] a is in sync, b still new"
        );

        // Each spec column counts; an assignment that changes nothing does not.
        let edits = [
            ("status = 'canceled'", 2),
            ("status = 'canceled'", 2),
            ("plan = 'pro'", 3),
            ("user_id = 'someone_else'", 4),
            ("stripe_subscription_id = 'sub_stripe'", 5),
            ("stripe_subscription_id = NULL", 6),
            // Touching updated_at asks for a retry even when its value stays the same.
            ("updated_at = updated_at", 7),
            // Both triggers fire; still one bump.
            ("status = 'active', updated_at = updated_at", 8),
        ];
        for (set, expected) in edits {
            exec(
                &db,
                &format!("UPDATE subscriptions SET {set} WHERE id = 'a'"),
            )
            .await;
            assert_eq!(
                desired_version(&db, "a").await,
                expected,
                "[{backend}] SET {set}"
            );
        }
        assert_eq!(
            desired_version(&db, "b").await,
            1,
            "[{backend}] other rows untouched"
        );
        assert_eq!(
            subscriptions::changed(&db).await.unwrap(),
            vec![("a".to_owned(), 8), ("b".to_owned(), 1)],
            "[{backend}]"
        );

        // A partial write touches only its fields; Some(None) clears.
        let partial = StatusUpdate {
            provisioning_status: Some("deprovisioning".into()),
            vps_ip_address: Some(None),
            ..StatusUpdate::default()
        };
        subscriptions::write_status(&db, None, "a", &partial)
            .await
            .unwrap();
        let row = subscriptions::get(&db, "a").await.unwrap().unwrap();
        assert_eq!(row.provisioning_status, "deprovisioning", "[{backend}]");
        assert_eq!(row.vps_ip_address, None, "[{backend}]");
        assert_eq!(row.vps_hostname.as_deref(), Some("vps-a"), "[{backend}]");
        assert_eq!(
            (row.desired_version, row.observed_version),
            (8, 1),
            "[{backend}]"
        );

        let done = StatusUpdate {
            observed_version: Some(8),
            ..StatusUpdate::default()
        };
        subscriptions::write_status(&db, None, "a", &done)
            .await
            .unwrap();
        assert_eq!(
            subscriptions::changed(&db).await.unwrap(),
            vec![("b".to_owned(), 1)],
            "[{backend}]"
        );

        let err = subscriptions::write_status(&db, None, "gone", &done)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DbError::SubscriptionNotFound { id } if id == "gone"),
            "[{backend}] {err}"
        );
        assert_eq!(err.metric_label(), "not_found");
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn schema_has_the_indexes_and_changed_uses_the_partial_one() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        let index_names = if test_db.is_sqlite() {
            "SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name"
        } else {
            "SELECT indexname AS name FROM pg_indexes WHERE schemaname = current_schema() \
             ORDER BY indexname"
        };
        let names: Vec<String> = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                index_names,
            ))
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get("", "name").unwrap())
            .collect();
        for expected in [
            "events_subscription_id_idx",
            "subscriptions_hetzner_server_id_idx",
            "subscriptions_provisioning_status_idx",
            "subscriptions_unreconciled_idx",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "[{backend}] {expected} in {names:?}"
            );
        }

        // PostgreSQL prefers a sequential scan on a tiny table; forbid it to see the choice.
        let txn = db.begin().await.unwrap();
        let explain = if test_db.is_sqlite() {
            format!("EXPLAIN QUERY PLAN {}", subscriptions::CHANGED_SQL)
        } else {
            txn.execute_unprepared("SET LOCAL enable_seqscan = off")
                .await
                .unwrap();
            format!("EXPLAIN {}", subscriptions::CHANGED_SQL)
        };
        let plan: Vec<String> = txn
            .query_all_raw(Statement::from_string(db.get_database_backend(), explain))
            .await
            .unwrap()
            .iter()
            .map(|row| {
                let column = if test_db.is_sqlite() {
                    "detail"
                } else {
                    "QUERY PLAN"
                };
                row.try_get("", column).unwrap()
            })
            .collect();
        txn.rollback().await.unwrap();
        assert!(
            plan.iter()
                .any(|line| line.contains("subscriptions_unreconciled_idx")),
            "[{backend}] plan: {plan:?}"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn deletions_are_recorded_and_handed_out_once() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        for id in ["a", "b", "c"] {
            insert_plain(&db, id).await;
        }
        assert!(
            subscriptions::take_deletions(&db, None)
                .await
                .unwrap()
                .is_empty(),
            "[{backend}]"
        );

        exec(&db, "DELETE FROM subscriptions WHERE id IN ('a', 'c')").await;
        let recorded = subscription_deletion::Entity::find()
            .all(&db)
            .await
            .unwrap();
        assert_eq!(
            recorded.len(),
            2,
            "[{backend}] deleted_at decodes: {recorded:?}"
        );
        assert_eq!(
            subscriptions::take_deletions(&db, None).await.unwrap(),
            vec!["a".to_owned(), "c".to_owned()],
            "[{backend}]"
        );
        assert!(
            subscriptions::take_deletions(&db, None)
                .await
                .unwrap()
                .is_empty(),
            "[{backend}] taken once"
        );
        exec(&db, "DELETE FROM subscriptions WHERE id = 'b'").await;
        assert_eq!(
            subscriptions::take_deletions(&db, None).await.unwrap(),
            vec!["b".to_owned()],
            "[{backend}]"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn events_are_kept_newest_first_and_bounded_per_subscription() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        for i in 0..60 {
            let kind = if i % 2 == 0 {
                EventKind::Normal
            } else {
                EventKind::Warning
            };
            events::record(&db, "a", kind, "ServerCreated", &format!("event {i}"))
                .await
                .unwrap();
        }
        for i in 0..3 {
            events::record(
                &db,
                "b",
                EventKind::Normal,
                "SshKeyCreated",
                &format!("b {i}"),
            )
            .await
            .unwrap();
        }

        let a = events::recent(&db, Some("a"), 1000).await.unwrap();
        assert_eq!(a.len(), 50, "[{backend}] bounded per subscription");
        assert_eq!(a[0].message, "event 59", "[{backend}] newest first");
        assert_eq!(a[0].kind, "Warning", "[{backend}]");
        assert_eq!(a[0].reason, "ServerCreated", "[{backend}]");
        assert_eq!(a[49].message, "event 10", "[{backend}] oldest trimmed");
        let b = events::recent(&db, Some("b"), 2).await.unwrap();
        let b_messages: Vec<_> = b.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(b_messages, vec!["b 2", "b 1"], "[{backend}]");
        assert_eq!(
            events::recent(&db, None, 1000).await.unwrap().len(),
            53,
            "[{backend}]"
        );

        let err = events::record(&db, "a", EventKind::Normal, "server created", "x")
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("invalid reason"),
            "[{backend}] {err}"
        );
        assert_eq!(
            events::recent(&db, None, 1000).await.unwrap().len(),
            53,
            "[{backend}]"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn events_are_bounded_in_total() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        let bulk = if test_db.is_sqlite() {
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100050)
             INSERT INTO events (subscription_id, kind, reason, message)
             SELECT 'bulk_' || (i % 1000), 'Normal', 'Bulk', 'bulk' FROM n"
        } else {
            "INSERT INTO events (subscription_id, kind, reason, message)
             SELECT 'bulk_' || (i % 1000), 'Normal', 'Bulk', 'bulk'
             FROM generate_series(1, 100050) AS i"
        };
        exec(&db, bulk).await;
        events::record(&db, "fresh", EventKind::Normal, "ServerCreated", "newest")
            .await
            .unwrap();
        assert_eq!(
            query_i64(&db, "SELECT count(*) FROM events").await,
            events::MAX_EVENTS_TOTAL as i64,
            "[{backend}]"
        );
        let newest = events::recent(&db, None, 1).await.unwrap();
        assert_eq!(newest[0].message, "newest", "[{backend}]");
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn lease_is_exclusive_until_it_expires_or_is_released() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        let long = Duration::from_secs(30);

        assert!(
            leases::try_acquire(&db, "leader", "a", long)
                .await
                .unwrap()
                .is_some(),
            "[{backend}]"
        );
        assert!(
            leases::try_acquire(&db, "leader", "b", long)
                .await
                .unwrap()
                .is_none(),
            "[{backend}]"
        );
        assert!(
            leases::try_acquire(&db, "leader", "a", long)
                .await
                .unwrap()
                .is_some(),
            "[{backend}] owner renews"
        );
        leases::release(&db, "leader", "b").await.unwrap();
        assert!(
            leases::try_acquire(&db, "leader", "b", long)
                .await
                .unwrap()
                .is_none(),
            "[{backend}] only the holder can release"
        );
        leases::release(&db, "leader", "a").await.unwrap();
        assert!(
            leases::try_acquire(&db, "leader", "b", long)
                .await
                .unwrap()
                .is_some(),
            "[{backend}] released lease is free"
        );
        let row = lease::Entity::find_by_id("leader".to_owned())
            .one(&db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.holder, "b", "[{backend}]");
        assert!(row.expires_at > row.renewed_at, "[{backend}] {row:?}");

        // Expiry: b gets the lease only once a's short lease has run out.
        let short = Duration::from_secs(1);
        assert!(
            leases::try_acquire(&db, "short", "a", short)
                .await
                .unwrap()
                .is_some(),
            "[{backend}]"
        );
        assert!(
            leases::try_acquire(&db, "short", "b", long)
                .await
                .unwrap()
                .is_none(),
            "[{backend}]"
        );
        let taken_over = eventually(Duration::from_secs(10), || async {
            leases::try_acquire(&db, "short", "b", long)
                .await
                .unwrap()
                .is_some()
        })
        .await;
        assert!(taken_over, "[{backend}] expired lease taken over");
        assert!(
            leases::try_acquire(&db, "short", "a", short)
                .await
                .unwrap()
                .is_none(),
            "[{backend}]"
        );

        let err = leases::try_acquire(&db, "x", "a", Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.metric_label(), "invalid_input", "[{backend}]");
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn concurrent_lease_candidates_get_exactly_one_winner() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        // Two pools, like two replicas.
        let first = migrated(&test_db).await;
        let second = db::connect(&test_db.url).await.unwrap();
        for round in 0..5 {
            let name = format!("race_{round}");
            let attempts = (0..16).map(|i| {
                let db = if i % 2 == 0 { &first } else { &second };
                let name = name.clone();
                async move {
                    leases::try_acquire(db, &name, &format!("h{i}"), Duration::from_secs(30))
                        .await
                        .unwrap()
                        .is_some()
                }
            });
            let winners = futures::future::join_all(attempts)
                .await
                .into_iter()
                .filter(|won| *won)
                .count();
            assert_eq!(winners, 1, "[{backend}] round {round}");
        }
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn postgres_notifies_on_spec_changes_but_not_on_status_writes() {
    for test_db in test_databases().await {
        if !test_db.is_postgres() {
            continue;
        }
        let db = migrated(&test_db).await;
        let mut listener = sea_orm::sqlx::postgres::PgListener::connect(&test_db.url)
            .await
            .unwrap();
        listener.listen(db::NOTIFY_CHANNEL).await.unwrap();
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(10), listener.recv())
                .await
                .expect("notification within 10 s")
                .unwrap()
                .payload()
                .to_owned()
        };

        insert_plain(&db, "n1").await;
        assert_eq!(next().await, "n1");
        insert_plain(&db, "n2").await;
        assert_eq!(next().await, "n2");

        // Notifications arrive in commit order: if the status write on n1 notified, its
        // notification would come before n2's.
        let update = StatusUpdate {
            provisioning_status: Some("provisioning".into()),
            observed_version: Some(1),
            ..StatusUpdate::default()
        };
        subscriptions::write_status(&db, None, "n1", &update)
            .await
            .unwrap();
        exec(&db, "UPDATE subscriptions SET plan = 'pro' WHERE id = 'n2'").await;
        assert_eq!(next().await, "n2");

        exec(&db, "DELETE FROM subscriptions WHERE id = 'n1'").await;
        assert_eq!(next().await, "n1");
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn connect_creates_sqlite_files_and_reports_bad_urls_without_passwords() {
    // The default URL names a file in the working directory.
    let dir = tempfile::tempdir().unwrap();
    let previous = std::env::current_dir().unwrap();
    std::env::set_current_dir(dir.path()).unwrap();
    // The pool opens connections lazily by relative path: keep the directory until closed.
    let outcome = async {
        let db = db::connect(db::DEFAULT_DATABASE_URL).await?;
        db::migrate(&db).await?;
        let _ = db.close().await;
        Ok::<(), DbError>(())
    }
    .await;
    std::env::set_current_dir(previous).unwrap();
    outcome.unwrap();
    assert!(dir.path().join("vps-controller.db").is_file());

    // No mode= means create; an explicit mode is respected.
    let plain = dir.path().join("plain.db");
    db::connect(&format!("sqlite://{}", plain.display()))
        .await
        .unwrap();
    assert!(plain.is_file());
    let missing = dir.path().join("missing.db");
    let err = db::connect(&format!("sqlite://{}?mode=rw", missing.display()))
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "connect");
    assert!(err.to_string().contains("missing.db"), "{err}");
    assert!(!missing.exists());

    let err = db::connect("mysql://root:hunter2@localhost/app")
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "invalid_url");
    assert!(err.to_string().contains("\"mysql\""), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");

    // A server that answers but refuses (no such database) fails fast, unlike a closed port,
    // which is retried until the connect timeout.
    let mut url = url::Url::parse(
        &std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| common::DEFAULT_TEST_POSTGRES_URL.to_owned()),
    )
    .unwrap();
    url.set_password(Some("hunter2")).unwrap();
    url.set_path("/vpsc_no_such_database");
    let err = db::connect(url.as_str()).await.unwrap_err();
    let message = format!("{err} {err:?}");
    assert_eq!(err.metric_label(), "connect");
    assert!(message.contains("vpsc_no_such_database"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn debug_output_never_shows_the_sealed_private_key() {
    let update = StatusUpdate {
        ssh_private_key: Some(Some("sealed-ciphertext-xyz".into())),
        ..StatusUpdate::default()
    };
    let printed = format!("{update:?}");
    assert!(!printed.contains("sealed-ciphertext-xyz"), "{printed}");
    assert!(printed.contains("<sealed>"), "{printed}");

    let model = subscription::Model {
        user_id: Some("u".into()),
        plan: Some("pro".into()),
        provisioning_status: "ready".into(),
        ssh_private_key: Some("sealed-ciphertext-xyz".into()),
        ssh_public_key: Some("ssh-ed25519 AAAA".into()),
        observed_version: 1,
        ..subscription::Model::example("a")
    };
    let printed = format!("{model:?}");
    assert!(!printed.contains("sealed-ciphertext-xyz"), "{printed}");
    assert!(
        printed.contains("<sealed>") && printed.contains("ssh-ed25519 AAAA"),
        "{printed}"
    );
}

async fn status_changed_at(db: &DatabaseConnection, id: &str) -> chrono::DateTime<chrono::Utc> {
    subscriptions::get(db, id)
        .await
        .unwrap()
        .unwrap()
        .status_changed_at
        .expect("status_changed_at is set")
}

#[tokio::test]
async fn status_changed_at_follows_status_changes_only() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        let before_insert = chrono::Utc::now() - chrono::Duration::seconds(5);
        insert_plain(&db, "a").await;
        // Written by the trigger and decoded into DateTimeUtc (SQLite text from strftime).
        let inserted = status_changed_at(&db, "a").await;
        assert!(inserted >= before_insert, "[{backend}] {inserted}");
        assert_eq!(desired_version(&db, "a").await, 1, "[{backend}]");

        // Neither other spec columns, an unchanged status, nor status writes move it.
        tokio::time::sleep(Duration::from_millis(20)).await;
        for set in ["plan = 'pro'", "status = 'active'", "user_id = 'other'"] {
            exec(
                &db,
                &format!("UPDATE subscriptions SET {set} WHERE id = 'a'"),
            )
            .await;
        }
        let write = StatusUpdate {
            provisioning_status: Some("ready".into()),
            ..StatusUpdate::default()
        };
        subscriptions::write_status(&db, None, "a", &write)
            .await
            .unwrap();
        assert_eq!(status_changed_at(&db, "a").await, inserted, "[{backend}]");
        assert_eq!(desired_version(&db, "a").await, 3, "[{backend}]");

        // A status change moves it, and bumps desired_version exactly once.
        exec(
            &db,
            "UPDATE subscriptions SET status = 'canceled' WHERE id = 'a'",
        )
        .await;
        let canceled = status_changed_at(&db, "a").await;
        assert!(canceled > inserted, "[{backend}] {canceled} > {inserted}");
        assert_eq!(desired_version(&db, "a").await, 4, "[{backend}]");
        // Back to an earlier status counts too.
        tokio::time::sleep(Duration::from_millis(20)).await;
        exec(
            &db,
            "UPDATE subscriptions SET status = 'active' WHERE id = 'a'",
        )
        .await;
        let reactivated = status_changed_at(&db, "a").await;
        assert!(reactivated > canceled, "[{backend}]");
        assert_eq!(desired_version(&db, "a").await, 5, "[{backend}]");

        // An explicit value on INSERT is kept.
        exec(
            &db,
            "INSERT INTO subscriptions (id, user_id, status, plan, status_changed_at) \
             VALUES ('b', 'u', 'active', 'pro', '2026-01-02 03:04:05')",
        )
        .await;
        assert_eq!(
            status_changed_at(&db, "b").await.to_rfc3339(),
            "2026-01-02T03:04:05+00:00",
            "[{backend}]"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn upgrade_backfills_status_changed_at_and_keeps_rows_quiet() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = db::connect(&test_db.url).await.unwrap();
        exec(
            &db,
            "CREATE TABLE subscriptions (id text PRIMARY KEY NOT NULL, user_id text NOT NULL, \
             status text NOT NULL, plan text NOT NULL)",
        )
        .await;
        exec(
            &db,
            "INSERT INTO subscriptions VALUES ('old', 'u', 'active', 'pro')",
        )
        .await;
        db::migrate(&db).await.unwrap();
        let row = subscriptions::get(&db, "old").await.unwrap().unwrap();
        assert!(row.status_changed_at.is_some(), "[{backend}] {row:?}");
        assert_eq!(row.ssh_key_origin, None, "[{backend}]");
        assert_eq!(
            row.desired_version, 1,
            "[{backend}] backfill is no spec change"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn ssh_key_origin_is_written_and_cleared() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        insert_plain(&db, "a").await;
        let external = StatusUpdate {
            ssh_key_origin: Some(Some("external".into())),
            ..StatusUpdate::default()
        };
        subscriptions::write_status(&db, None, "a", &external)
            .await
            .unwrap();
        let row = subscriptions::get(&db, "a").await.unwrap().unwrap();
        assert_eq!(
            row.ssh_key_origin.as_deref(),
            Some("external"),
            "[{backend}]"
        );
        assert_eq!(row.desired_version, 1, "[{backend}] not a spec column");
        assert!(format!("{row:?}").contains("external"), "[{backend}]");
        let clear = StatusUpdate {
            ssh_key_origin: Some(None),
            ..StatusUpdate::default()
        };
        subscriptions::write_status(&db, None, "a", &clear)
            .await
            .unwrap();
        let row = subscriptions::get(&db, "a").await.unwrap().unwrap();
        assert_eq!(row.ssh_key_origin, None, "[{backend}]");
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn installation_id_is_a_label_value_made_once() {
    let mut seen = Vec::new();
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = db::connect(&test_db.url).await.unwrap();
        let err = db::installation::id(&db).await.unwrap_err();
        assert!(
            err.to_string().contains("run `vps-controller migrate`"),
            "[{backend}] {err}"
        );

        db::migrate(&db).await.unwrap();
        let id = db::installation::id(&db).await.unwrap();
        assert_eq!(id.len(), 16, "[{backend}] {id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "[{backend}] {id}"
        );

        // Running the migration bodies again never replaces it.
        exec(&db, "DELETE FROM vps_controller_migrations").await;
        db::migrate(&db).await.unwrap();
        assert_eq!(db::installation::id(&db).await.unwrap(), id, "[{backend}]");
        assert!(!seen.contains(&id), "[{backend}] {id} repeats {seen:?}");
        seen.push(id);

        exec(
            &db,
            "UPDATE vps_controller_installation SET installation_id = 'Not A Label'",
        )
        .await;
        let err = db::installation::id(&db).await.unwrap_err().to_string();
        assert!(
            err.contains("installation") && err.contains("16 lowercase hex"),
            "[{backend}] {err}"
        );
        exec(&db, "DELETE FROM vps_controller_installation").await;
        let err = db::installation::id(&db).await.unwrap_err().to_string();
        assert!(err.contains("vps-controller migrate"), "[{backend}] {err}");
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn lease_epoch_stays_on_renewal_and_grows_on_every_new_tenure() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        let long = Duration::from_secs(30);
        let acquire = async |holder: &str, ttl| {
            leases::try_acquire(&db, leases::LEASE_NAME, holder, ttl)
                .await
                .unwrap()
        };
        let fence = |holder: &str, epoch| {
            Some(leases::Fence {
                holder: holder.into(),
                epoch,
            })
        };

        assert_eq!(acquire("a", long).await, fence("a", 1), "[{backend}]");
        assert_eq!(
            acquire("a", long).await,
            fence("a", 1),
            "[{backend}] renewal"
        );
        assert_eq!(acquire("b", long).await, None, "[{backend}]");
        leases::release(&db, leases::LEASE_NAME, "a").await.unwrap();
        assert_eq!(acquire("b", long).await, fence("b", 2), "[{backend}]");
        assert_eq!(acquire("a", long).await, None, "[{backend}]");
        // The holder coming back after its own release starts a new tenure.
        leases::release(&db, leases::LEASE_NAME, "b").await.unwrap();
        assert_eq!(acquire("b", long).await, fence("b", 3), "[{backend}]");

        // Expiry: the same holder renewing after a lapse gets a new epoch too.
        leases::release(&db, leases::LEASE_NAME, "b").await.unwrap();
        assert_eq!(
            acquire("b", Duration::from_secs(1)).await,
            fence("b", 4),
            "[{backend}]"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(acquire("b", long).await, fence("b", 5), "[{backend}]");
        let row = lease::Entity::find_by_id(leases::LEASE_NAME.to_owned())
            .one(&db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((row.holder.as_str(), row.epoch), ("b", 5), "[{backend}]");
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn fenced_writes_are_refused_once_the_lease_is_lost() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        for id in ["a", "b", "c"] {
            insert_plain(&db, id).await;
        }
        let long = Duration::from_secs(30);
        let old = leases::try_acquire(&db, leases::LEASE_NAME, "old", long)
            .await
            .unwrap()
            .unwrap();
        let update = |status: &str| StatusUpdate {
            provisioning_status: Some(status.into()),
            ..StatusUpdate::default()
        };
        subscriptions::write_status(&db, Some(&old), "a", &update("provisioning"))
            .await
            .unwrap();
        let err = subscriptions::write_status(&db, Some(&old), "gone", &update("ready"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DbError::SubscriptionNotFound { id } if id == "gone"),
            "[{backend}] {err}"
        );

        // Another replica takes over: the old fence no longer writes, the new one does.
        leases::release(&db, leases::LEASE_NAME, "old")
            .await
            .unwrap();
        let new = leases::try_acquire(&db, leases::LEASE_NAME, "new", long)
            .await
            .unwrap()
            .unwrap();
        let err = subscriptions::write_status(&db, Some(&old), "a", &update("failed"))
            .await
            .unwrap_err();
        assert!(matches!(err, DbError::LeaseLost), "[{backend}] {err}");
        assert_eq!(err.metric_label(), "lease_lost");
        assert!(err.to_string().contains("lease"), "[{backend}] {err}");
        let row = subscriptions::get(&db, "a").await.unwrap().unwrap();
        assert_eq!(row.provisioning_status, "provisioning", "[{backend}]");
        subscriptions::write_status(&db, Some(&new), "a", &update("ready"))
            .await
            .unwrap();
        // Even the same holder name with an old epoch is refused.
        let stale = leases::Fence {
            holder: "new".into(),
            epoch: new.epoch - 1,
        };
        let err = subscriptions::write_status(&db, Some(&stale), "a", &update("failed"))
            .await
            .unwrap_err();
        assert!(matches!(err, DbError::LeaseLost), "[{backend}] {err}");

        // The bulk error write: only waiting rows whose error differs, fenced the same way.
        // a is ready; b and c are pending.
        exec(
            &db,
            "UPDATE subscriptions SET provisioning_status = 'provisioning' WHERE id = 'c'",
        )
        .await;
        let message = "Hetzner rejected the API token (unauthorized)";
        let err = subscriptions::write_error_on_waiting(&db, Some(&old), message)
            .await
            .unwrap_err();
        assert!(matches!(err, DbError::LeaseLost), "[{backend}] {err}");
        assert_eq!(
            query_i64(
                &db,
                "SELECT count(*) FROM subscriptions WHERE provisioning_error IS NOT NULL"
            )
            .await,
            0,
            "[{backend}] nothing written with a lost lease"
        );
        assert_eq!(
            subscriptions::write_error_on_waiting(&db, Some(&new), message)
                .await
                .unwrap(),
            2,
            "[{backend}]"
        );
        assert_eq!(
            subscriptions::write_error_on_waiting(&db, Some(&new), message)
                .await
                .unwrap(),
            0,
            "[{backend}] unchanged rows are not rewritten"
        );
        assert_eq!(
            subscriptions::write_error_on_waiting(&db, None, "unreachable")
                .await
                .unwrap(),
            2,
            "[{backend}]"
        );
        let a = subscriptions::get(&db, "a").await.unwrap().unwrap();
        let b = subscriptions::get(&db, "b").await.unwrap().unwrap();
        assert_eq!(
            a.provisioning_error, None,
            "[{backend}] ready row untouched"
        );
        assert_eq!(
            b.provisioning_error.as_deref(),
            Some("unreachable"),
            "[{backend}]"
        );
        assert_eq!(b.desired_version, 1, "[{backend}] no spec change");
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn a_bad_row_never_stops_a_pass() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = db::connect(&test_db.url).await.unwrap();
        // A web-app table that lets id be NULL (SQLite allows NULL in a non-INTEGER primary
        // key; on PostgreSQL id is simply not the key).
        let create = if test_db.is_sqlite() {
            "CREATE TABLE subscriptions (id TEXT PRIMARY KEY, user_id TEXT, status TEXT, \
             plan TEXT)"
        } else {
            "CREATE TABLE subscriptions (id TEXT, user_id TEXT, status TEXT, plan TEXT)"
        };
        exec(&db, create).await;
        db::migrate(&db).await.unwrap();
        insert_plain(&db, "good_1").await;
        insert_plain(&db, "good_2").await;
        exec(
            &db,
            "INSERT INTO subscriptions (id, user_id, status, plan) VALUES (NULL, 'u', 'active', 'pro')",
        )
        .await;
        exec(
            &db,
            "INSERT INTO subscriptions (id, user_id, status, plan) VALUES ('nulls', NULL, NULL, NULL)",
        )
        .await;
        let mut expected_bad = vec![(None, "column id is NULL")];
        if test_db.is_sqlite() {
            exec(
                &db,
                "INSERT INTO subscriptions (id, user_id, status, plan) \
                 VALUES ('blob', 'u', X'00FF', 'pro')",
            )
            .await;
            exec(
                &db,
                &format!(
                    "INSERT INTO subscriptions (id, user_id, status, plan, provisioned_at) \
                     VALUES ('long', 'u', 'active', 'pro', '{}')",
                    "x".repeat(2000)
                ),
            )
            .await;
            expected_bad.push((Some("blob"), "column status"));
            expected_bad.push((Some("long"), "column provisioned_at"));
        }

        let all = subscriptions::all(&db).await.unwrap();
        let good: Vec<_> = all.rows.iter().map(|row| row.id.as_str()).collect();
        assert_eq!(good, vec!["good_1", "good_2", "nulls"], "[{backend}]");
        let nulls = &all.rows[2];
        assert_eq!(
            (&nulls.user_id, &nulls.status, &nulls.plan),
            (&None, &None, &None),
            "[{backend}]"
        );
        assert_eq!(
            all.bad.len(),
            expected_bad.len(),
            "[{backend}] {:?}",
            all.bad
        );
        for (id, problem) in expected_bad {
            let bad = all
                .bad
                .iter()
                .find(|bad| bad.id.as_deref() == id)
                .unwrap_or_else(|| panic!("[{backend}] {id:?} in {:?}", all.bad));
            assert!(bad.problem.contains(problem), "[{backend}] {bad:?}");
            assert!(
                bad.problem.chars().count() <= subscriptions::MAX_PROBLEM_CHARS,
                "[{backend}] {bad:?}"
            );
        }

        // changed() leaves out the row without an id; get() names the bad column.
        let changed: Vec<_> = subscriptions::changed(&db)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let expected: &[&str] = if test_db.is_sqlite() {
            &["blob", "good_1", "good_2", "long", "nulls"]
        } else {
            &["good_1", "good_2", "nulls"]
        };
        assert_eq!(changed, expected, "[{backend}]");
        if test_db.is_sqlite() {
            let err = subscriptions::get(&db, "blob").await.unwrap_err();
            assert_eq!(err.metric_label(), "decode", "[{backend}]");
            let message = err.to_string();
            assert!(
                message.contains("\"blob\"") && message.contains("column status"),
                "[{backend}] {message}"
            );
        }
        assert!(subscriptions::get(&db, "good_1").await.unwrap().is_some());

        // Deleting the row without an id works and records nothing.
        exec(&db, "DELETE FROM subscriptions WHERE id IS NULL").await;
        exec(&db, "DELETE FROM subscriptions WHERE id = 'good_2'").await;
        assert_eq!(
            subscriptions::take_deletions(&db, None).await.unwrap(),
            vec!["good_2".to_owned()],
            "[{backend}]"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn retry_marks_one_row_or_every_failed_row() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        for id in ["a", "b", "c"] {
            insert_plain(&db, id).await;
            let done = StatusUpdate {
                provisioning_status: Some(if id == "a" { "ready" } else { "failed" }.into()),
                observed_version: Some(1),
                ..StatusUpdate::default()
            };
            subscriptions::write_status(&db, None, id, &done)
                .await
                .unwrap();
        }
        assert!(
            subscriptions::changed(&db).await.unwrap().is_empty(),
            "[{backend}]"
        );

        assert_eq!(
            subscriptions::retry(&db, Some("a")).await.unwrap(),
            1,
            "[{backend}]"
        );
        assert_eq!(
            subscriptions::changed(&db).await.unwrap(),
            vec![("a".to_owned(), 1)],
            "[{backend}]"
        );
        assert_eq!(
            subscriptions::retry(&db, Some("gone")).await.unwrap(),
            0,
            "[{backend}]"
        );
        assert_eq!(
            subscriptions::retry(&db, None).await.unwrap(),
            2,
            "[{backend}]"
        );
        assert_eq!(
            subscriptions::changed(&db).await.unwrap(),
            vec![
                ("a".to_owned(), 1),
                ("b".to_owned(), 1),
                ("c".to_owned(), 1)
            ],
            "[{backend}]"
        );
        assert_eq!(
            desired_version(&db, "b").await,
            1,
            "[{backend}] no spec change"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn state_values_are_stored_and_replaced() {
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        assert_eq!(
            db::state::get(&db, "config_fingerprint").await.unwrap(),
            None
        );
        db::state::set(&db, "config_fingerprint", "abc")
            .await
            .unwrap();
        db::state::set(&db, "config_fingerprint", "def")
            .await
            .unwrap();
        db::state::set(&db, "other", "x").await.unwrap();
        assert_eq!(
            db::state::get(&db, "config_fingerprint")
                .await
                .unwrap()
                .as_deref(),
            Some("def"),
            "[{backend}]"
        );
        assert!(db::state::set(&db, "", "x").await.is_err(), "[{backend}]");
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn deletion_budget_pauses_until_approved() {
    use db::deletion_guard::{self, Reservation};
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let db = migrated(&test_db).await;
        let reserve = async |server: i64| {
            deletion_guard::reserve(&db, None, server, &format!("sub_{server}"), 3)
                .await
                .unwrap()
        };
        for server in 1..=3 {
            assert_eq!(reserve(server).await, Reservation::Granted, "[{backend}]");
        }
        // A retried deletion of a server already granted costs nothing more, even at the
        // budget's edge.
        assert_eq!(
            reserve(2).await,
            Reservation::Granted,
            "[{backend}] retry of server 2"
        );
        let paused = |newly| Reservation::Paused {
            newly,
            deleted_in_window: 3,
            budget: 3,
        };
        assert_eq!(reserve(4).await, paused(true), "[{backend}] trips once");
        assert_eq!(reserve(5).await, paused(false), "[{backend}]");
        assert_eq!(reserve(6).await, paused(false), "[{backend}]");

        // Durable: a fresh connection (a restarted or failed-over controller) sees the pause.
        let other = db::connect(&test_db.url).await.unwrap();
        let status = deletion_guard::status(&other).await.unwrap();
        assert!(status.paused_since.is_some(), "[{backend}] {status:?}");
        let reason = status.pause_reason.clone().unwrap_or_default();
        assert!(
            reason.contains('3') && reason.contains("approve"),
            "[{backend}] {reason}"
        );
        assert_eq!(
            (
                status.deleted_last_hour,
                status.deleted_in_window,
                status.extra_allowance
            ),
            (3, 3, 0),
            "[{backend}]"
        );
        assert_eq!(status.window_start, None, "[{backend}]");

        // Approval: a fresh window, plus one extra deletion on top of the budget.
        let approved = deletion_guard::approve(&other, 1).await.unwrap();
        assert_eq!(approved.paused_since, None, "[{backend}]");
        assert_eq!(approved.pause_reason, None, "[{backend}]");
        assert!(approved.window_start.is_some(), "[{backend}]");
        assert_eq!(
            (
                approved.deleted_last_hour,
                approved.deleted_in_window,
                approved.extra_allowance
            ),
            (3, 0, 1),
            "[{backend}]"
        );
        for server in 10..=13 {
            assert_eq!(
                reserve(server).await,
                Reservation::Granted,
                "[{backend}] {server}"
            );
        }
        let status = deletion_guard::status(&db).await.unwrap();
        assert_eq!(
            (status.deleted_in_window, status.extra_allowance),
            (4, 0),
            "[{backend}] extra used"
        );
        assert_eq!(
            reserve(14).await,
            Reservation::Paused {
                newly: true,
                deleted_in_window: 4,
                budget: 3
            },
            "[{backend}]"
        );

        // A reservation with a lost fence is refused before anything is recorded.
        deletion_guard::approve(&db, 0).await.unwrap();
        let stale = leases::Fence {
            holder: "nobody".into(),
            epoch: 7,
        };
        let err = deletion_guard::reserve(&db, Some(&stale), 20, "sub_20", 3)
            .await
            .unwrap_err();
        assert!(matches!(err, DbError::LeaseLost), "[{backend}] {err}");
        let fence = leases::try_acquire(&db, leases::LEASE_NAME, "me", Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            deletion_guard::reserve(&db, Some(&fence), 20, "sub_20", 3)
                .await
                .unwrap(),
            Reservation::Granted,
            "[{backend}]"
        );
        assert_eq!(
            deletion_guard::status(&db).await.unwrap().deleted_in_window,
            1,
            "[{backend}]"
        );

        // managed_servers counts rows with a server.
        insert_plain(&db, "x").await;
        insert_plain(&db, "y").await;
        let with_server = StatusUpdate {
            hetzner_server_id: Some(Some(5)),
            ..StatusUpdate::default()
        };
        subscriptions::write_status(&db, None, "x", &with_server)
            .await
            .unwrap();
        assert_eq!(
            deletion_guard::managed_servers(&db).await.unwrap(),
            1,
            "[{backend}]"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn concurrent_reservations_never_exceed_the_budget() {
    use db::deletion_guard::{self, Reservation};
    for test_db in test_databases().await {
        let backend = test_db.backend;
        // Two pools, like two replicas racing after a failover.
        let first = migrated(&test_db).await;
        let second = db::connect(&test_db.url).await.unwrap();
        let attempts = (0..20).map(|i| {
            let db = if i % 2 == 0 {
                first.clone()
            } else {
                second.clone()
            };
            tokio::spawn(async move {
                deletion_guard::reserve(&db, None, i, &format!("sub_{i}"), 5).await
            })
        });
        let outcomes: Vec<Reservation> = futures::future::join_all(attempts)
            .await
            .into_iter()
            .map(|joined| joined.unwrap().unwrap())
            .collect();
        let granted = outcomes
            .iter()
            .filter(|outcome| **outcome == Reservation::Granted)
            .count();
        let newly = outcomes
            .iter()
            .filter(|outcome| matches!(outcome, Reservation::Paused { newly: true, .. }))
            .count();
        assert_eq!((granted, newly), (5, 1), "[{backend}] {outcomes:?}");
        assert_eq!(
            query_i64(
                &first,
                "SELECT count(*) FROM vps_controller_server_deletions"
            )
            .await,
            5,
            "[{backend}]"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn sqlite_without_rowid_web_app_table_gets_working_triggers() {
    let test_db = common::sqlite_db();
    let db = db::connect(&test_db.url).await.unwrap();
    exec(
        &db,
        "CREATE TABLE subscriptions (id TEXT PRIMARY KEY NOT NULL, user_id TEXT NOT NULL, \
         status TEXT NOT NULL, plan TEXT NOT NULL) WITHOUT ROWID",
    )
    .await;
    db::migrate(&db).await.unwrap();
    insert_plain(&db, "a").await;
    let inserted = status_changed_at(&db, "a").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    exec(
        &db,
        "UPDATE subscriptions SET status = 'canceled' WHERE id = 'a'",
    )
    .await;
    assert!(status_changed_at(&db, "a").await > inserted);
    assert_eq!(desired_version(&db, "a").await, 2);
    exec(&db, "DELETE FROM subscriptions WHERE id = 'a'").await;
    assert_eq!(
        subscriptions::take_deletions(&db, None).await.unwrap(),
        vec!["a".to_owned()]
    );
}

/// A copy of the database carries its installation id along; the binding tells the copy
/// apart, and `renew` gives it an id of its own while `keep` accepts a move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_database_is_told_apart_from_the_original() {
    use db::installation::{self, Binding};
    for test_db in test_databases().await {
        let backend = test_db.backend;
        let original = migrated(&test_db).await;
        let id = installation::id(&original).await.unwrap();
        assert_eq!(
            installation::check_binding(&original).await.unwrap(),
            Binding::Here,
            "[{backend}]"
        );

        // The copy: a SQLite file copied elsewhere, a PostgreSQL database cloned from it.
        original.close().await.unwrap();
        let admin_url = {
            let mut url = url::Url::parse(&test_db.url).unwrap();
            url.set_path("/postgres");
            url.to_string()
        };
        let source = test_db.url.rsplit('/').next().unwrap().to_string();
        let copy_name = format!("{source}_copy");
        let (copy_url, _dir): (String, Option<tempfile::TempDir>) = if test_db.is_postgres() {
            let server = db::connect(&admin_url).await.unwrap();
            server
                .execute_unprepared(&format!(
                    "CREATE DATABASE \"{copy_name}\" TEMPLATE \"{source}\""
                ))
                .await
                .unwrap();
            server.close().await.unwrap();
            let mut copy = url::Url::parse(&test_db.url).unwrap();
            copy.set_path(&format!("/{copy_name}"));
            (copy.to_string(), None)
        } else {
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("copy.db");
            std::fs::copy(test_db.dir().unwrap().join("test.db"), &target).unwrap();
            (format!("sqlite://{}?mode=rwc", target.display()), Some(dir))
        };
        let copy = db::connect(&copy_url).await.unwrap();
        assert_eq!(
            installation::id(&copy).await.unwrap(),
            id,
            "[{backend}] the id travels along"
        );
        db::migrate(&copy).await.unwrap(); // never rebinds a moved database
        assert!(
            matches!(
                installation::check_binding(&copy).await.unwrap(),
                Binding::Moved { .. }
            ),
            "[{backend}] the copy is told apart"
        );
        let renewed = installation::renew(&copy).await.unwrap();
        assert_ne!(renewed, id, "[{backend}]");
        assert_eq!(
            installation::check_binding(&copy).await.unwrap(),
            Binding::Here
        );
        assert_eq!(installation::id(&copy).await.unwrap(), renewed);

        // `keep`: the same installation, moved here.
        installation::keep(&copy).await.unwrap();
        assert_eq!(
            installation::check_binding(&copy).await.unwrap(),
            Binding::Here
        );
        copy.close().await.unwrap();
        if test_db.is_postgres() {
            let server = db::connect(&admin_url).await.unwrap();
            server
                .execute_unprepared(&format!(
                    "DROP DATABASE IF EXISTS \"{copy_name}\" WITH (FORCE)"
                ))
                .await
                .unwrap();
        }
        test_db.cleanup().await;
    }
}

/// The SQLite compiled into the binary is built without memory statistics
/// (`.cargo/config.toml`): with them on, every allocation takes one global mutex, and the
/// resync's table scan (values allocated on the driver's thread, freed on a tokio worker)
/// spent a third of its CPU contending on it. Fails when the build option is lost, or when
/// the build links a system SQLite instead.
#[tokio::test]
async fn embedded_sqlite_is_built_without_memory_statistics() {
    let test_db = common::sqlite_db();
    let db = db::connect(&test_db.url).await.unwrap();
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "PRAGMA compile_options",
        ))
        .await
        .unwrap();
    let options: Vec<String> = rows
        .iter()
        .map(|row| row.try_get_by_index(0).unwrap())
        .collect();
    assert!(
        options.iter().any(|option| option == "DEFAULT_MEMSTATUS=0"),
        "SQLite's compile options: {options:?}"
    );
}
