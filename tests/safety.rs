//! The safety guarantees of the controller, at the level an operator sees them (rows, the
//! simulated Hetzner project, events), on SQLite and PostgreSQL: a status outside the
//! lifecycle policy never destroys, mass deletions pause, another database's resources are
//! never touched, web-app servers are adopted not duplicated, config fixes retry, resource
//! keys are injective, and a broken row or key fails alone and loudly.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{Duration as Days, Utc};
use serde_json::{Value, json};

use common::env::{Env, Options, env_custom, for_each_backend, ids};
use vps_controller::config::{Config, DeletionBudget, Lifecycle};
use vps_controller::db::{deletion_guard, subscriptions};
use vps_controller::keys::KeyAlgorithm;

fn config(edit: impl FnOnce(&mut Config)) -> Config {
    let mut config = Options::default().config;
    edit(&mut config);
    config
}

/// A web-app table without NOT NULL constraints (NULL statuses are possible there).
fn nullable_table(postgres: bool) -> String {
    let timestamp = if postgres { "TIMESTAMPTZ" } else { "INTEGER" };
    format!(
        "CREATE TABLE subscriptions (id TEXT PRIMARY KEY, user_id TEXT, stripe_subscription_id TEXT, status TEXT, plan TEXT, created_at {timestamp}, updated_at {timestamp})"
    )
}

/// A controller on a database whose `subscriptions` table the web app created without NOT
/// NULL constraints.
async fn web_app_env(test_db: &common::TestDb) -> Env {
    env_custom(
        test_db,
        Options {
            web_app_table: Some(nullable_table(test_db.is_postgres())),
            ..Options::default()
        },
    )
    .await
}

/// A server created straight at Hetzner (as the web app did), with `labels`; its id.
async fn server_made_by_hand(env: &Env, name: &str, labels: Value) -> i64 {
    let (status, body) = env
        .api(
            "POST",
            "/servers",
            Some(json!({"name": name, "server_type": "cx23", "image": "ubuntu-24.04", "labels": labels})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["server"]["id"].as_i64().unwrap()
}

/// The status of the server recorded on the row, as Hetzner reports it.
async fn server_status(env: &Env, id: &str) -> Option<String> {
    let server = env.row(id).await.hetzner_server_id?;
    let (status, body) = env.api("GET", &format!("/servers/{server}"), None).await;
    (status == 200).then(|| body["server"]["status"].as_str().unwrap_or("").to_string())
}

/// Makes the row look as if it entered its status `hours` ago.
async fn backdate_status(env: &Env, id: &str, hours: u32) {
    let expression = if env.backend == "postgres" {
        format!("now() - interval '{hours} hours'")
    } else {
        format!("strftime('%Y-%m-%d %H:%M:%f', 'now', '-{hours} hours')")
    };
    env.sql(&format!(
        "UPDATE subscriptions SET status_changed_at = {expression} WHERE id = '{id}'"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_status_gets_its_lifecycle_policy_and_unknown_ones_are_held() {
    for test_db in common::test_databases().await {
        let env = env_custom(
            &test_db,
            Options {
                web_app_table: Some(nullable_table(test_db.is_postgres())),
                config: config(|c| c.lifecycle.snapshot_before_delete = true),
                ..Options::default()
            },
        )
        .await;
        for id in [
            "grace",
            "paused",
            "odd-case",
            "null-status",
            "canceled",
            "new-stripe",
        ] {
            env.insert(id, "active", "starter").await;
        }
        env.resync().await;
        for id in ["grace", "paused", "canceled"] {
            assert_eq!(server_status(&env, id).await.as_deref(), Some("running"));
        }
        let canceled_server = env.row("canceled").await.hetzner_server_id.unwrap();

        env.set_status("grace", "past_due").await;
        env.set_status("paused", "paused").await;
        env.set_status("odd-case", "Active").await;
        env.set_status("new-stripe", "something_new").await;
        env.sql("UPDATE subscriptions SET status = NULL WHERE id = 'null-status'")
            .await;
        env.set_status("canceled", "canceled").await;
        env.process_changes().await;
        let backend = env.backend;

        // past_due within its grace period: still running.
        assert_eq!(
            env.row("grace").await.provisioning_status,
            "ready",
            "[{backend}]"
        );
        assert_eq!(
            server_status(&env, "grace").await.as_deref(),
            Some("running")
        );
        // paused: powered off, everything kept.
        let paused = env.row("paused").await;
        assert_eq!(paused.provisioning_status, "suspended", "[{backend}]");
        assert_eq!(server_status(&env, "paused").await.as_deref(), Some("off"));
        assert!(paused.hetzner_ssh_key_id.is_some() && paused.hetzner_firewall_id.is_some());
        assert!(paused.ssh_private_key.is_some());
        // Not understood: held, nothing touched, the row says why.
        for id in ["odd-case", "new-stripe", "null-status"] {
            let row = env.row(id).await;
            assert_eq!(row.provisioning_status, "held", "[{backend}] {id}");
            let error = row.provisioning_error.unwrap_or_default();
            assert!(error.contains("held"), "{id}: {error}");
            assert_eq!(
                server_status(&env, id).await.as_deref(),
                Some("running"),
                "[{backend}] {id} keeps its server"
            );
            assert!(env.event_reasons(id).await.contains(&"Held".to_string()));
        }
        // canceled: snapshot first, then deleted.
        let canceled = env.row("canceled").await;
        assert_eq!(canceled.provisioning_status, "deprovisioned", "[{backend}]");
        let (_, gone) = env
            .api("GET", &format!("/servers/{canceled_server}"), None)
            .await;
        assert_eq!(gone["error"]["code"], "not_found");
        let (_, images) = env.api("GET", "/images?type=snapshot", None).await;
        let snapshots = images["images"].as_array().unwrap().clone();
        assert_eq!(snapshots.len(), 1, "[{backend}] {images}");
        assert_eq!(snapshots[0]["created_from"]["id"], canceled_server);
        assert_eq!(
            snapshots[0]["labels"]["vps-controller/installation"],
            env.installation.as_str()
        );
        assert_eq!(
            snapshots[0]["labels"]["vps-controller/snapshot"],
            "pre-delete"
        );
        let reasons_canceled = env.event_reasons("canceled").await;
        assert!(
            reasons_canceled.contains(&"SnapshotTaken".to_string()),
            "{reasons_canceled:?}"
        );

        // The grace period (72 h) runs out: suspended by the next resync.
        backdate_status(&env, "grace", 73).await;
        env.resync().await;
        assert_eq!(
            env.row("grace").await.provisioning_status,
            "suspended",
            "[{backend}]"
        );
        assert_eq!(server_status(&env, "grace").await.as_deref(), Some("off"));

        // Paid again: powered on, the same server.
        let paused_server = env.row("paused").await.hetzner_server_id;
        env.set_status("grace", "active").await;
        env.set_status("paused", "active").await;
        env.process_changes().await;
        for id in ["grace", "paused"] {
            assert_eq!(
                env.row(id).await.provisioning_status,
                "ready",
                "[{backend}] {id}"
            );
            assert_eq!(
                server_status(&env, id).await.as_deref(),
                Some("running"),
                "[{backend}] {id}"
            );
        }
        assert_eq!(env.row("paused").await.hetzner_server_id, paused_server);

        // Retention: the snapshot stays until it is older than snapshot_retention_days.
        assert_eq!(env.controller.sweep_snapshots(Utc::now()).await.unwrap(), 0);
        let later = Utc::now() + Days::days(31);
        assert_eq!(env.controller.sweep_snapshots(later).await.unwrap(), 1);
        let (_, images) = env.api("GET", "/images?type=snapshot", None).await;
        assert_eq!(
            images["images"],
            json!([]),
            "[{backend}] snapshot removed after retention"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_delay_suspends_first_and_deletes_when_it_ends() {
    for test_db in common::test_databases().await {
        let env = env_custom(
            &test_db,
            Options {
                config: config(|c| c.lifecycle.deletion_delay_hours = 24),
                ..Options::default()
            },
        )
        .await;
        env.insert("late", "active", "starter").await;
        env.process_changes().await;
        env.set_status("late", "canceled").await;
        env.process_changes().await;
        assert_eq!(
            env.row("late").await.provisioning_status,
            "suspended",
            "[{}]",
            env.backend
        );
        assert_eq!(server_status(&env, "late").await.as_deref(), Some("off"));
        backdate_status(&env, "late", 25).await;
        env.resync().await;
        assert_eq!(
            env.row("late").await.provisioning_status,
            "deprovisioned",
            "[{}]",
            env.backend
        );
        assert!(env.list("servers").await.is_empty());
        test_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_cancellation_deletes_only_the_budget_then_pauses_until_approved() {
    for test_db in common::test_databases().await {
        let env = env_custom(
            &test_db,
            Options {
                config: config(|c| {
                    c.concurrency = 16;
                    c.deletion_budget = DeletionBudget {
                        min_per_hour: 3,
                        fleet_percent: 10,
                    };
                }),
                ..Options::default()
            },
        )
        .await;
        let backend = env.backend;
        for i in 0..100 {
            env.insert(&format!("s{i:03}"), "active", "starter").await;
        }
        env.resync().await;
        assert_eq!(env.list("servers").await.len(), 100, "[{backend}]");

        env.sql("UPDATE subscriptions SET status = 'canceled' WHERE id < 's050'")
            .await;
        env.resync_allowing_failures().await;
        // 10 % of 100 managed servers.
        let servers = env.list("servers").await.len();
        assert!(
            (90..=91).contains(&servers),
            "[{backend}] {servers} servers left, expected the budget (9-10) deleted"
        );
        let guard = deletion_guard::status(&env.db).await.unwrap();
        assert!(guard.paused_since.is_some(), "[{backend}] {guard:?}");
        let all = subscriptions::all(&env.db).await.unwrap().rows;
        let waiting: Vec<_> = all
            .iter()
            .filter(|r| {
                r.provisioning_error
                    .as_deref()
                    .is_some_and(|e| e.contains("deletion paused"))
            })
            .collect();
        assert_eq!(
            waiting.len(),
            servers - 50,
            "[{backend}] every kept server says why"
        );
        assert!(
            env.event_reasons(&waiting[0].id)
                .await
                .contains(&"DeletionsPaused".to_string())
        );
        let status = vps_controller::reconcile::report::status_table(&env.db)
            .await
            .unwrap();
        assert!(status.contains("server deletions: PAUSED"), "{status}");
        let metrics = env.controller.metrics.render();
        assert!(
            metrics.contains("vps_controller_deletions_paused 1"),
            "{metrics}"
        );

        // Creating goes on while deletions wait.
        env.insert("newcomer", "active", "starter").await;
        env.process_changes().await;
        assert_eq!(
            env.row("newcomer").await.provisioning_status,
            "ready",
            "[{backend}]"
        );
        // And the pause holds on the next resync.
        env.resync_allowing_failures().await;
        assert_eq!(
            env.list("servers").await.len(),
            servers + 1,
            "[{backend}] nothing more deleted while paused"
        );

        // Approved for the rest: all canceled servers go.
        deletion_guard::approve(&env.db, 40).await.unwrap();
        env.resync().await;
        assert_eq!(env.list("servers").await.len(), 51, "[{backend}]");
        let canceled = subscriptions::all(&env.db).await.unwrap().rows;
        assert!(
            canceled
                .iter()
                .filter(|r| r.status.as_deref() == Some("canceled"))
                .all(|r| r.provisioning_status == "deprovisioned")
        );
        test_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_database_on_the_same_project_changes_nothing_of_the_first() {
    let backends: [(&str, bool); 2] = [("sqlite", false), ("postgres", true)];
    for (backend, postgres) in backends {
        let (first_db, second_db) = if postgres {
            match (common::postgres_db().await, common::postgres_db().await) {
                (Ok(a), Ok(b)) => (a, b),
                _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
                    panic!("PostgreSQL is required in CI")
                }
                _ => continue,
            }
        } else {
            (common::sqlite_db(), common::sqlite_db())
        };
        let first = common::env::env(&first_db).await;
        for id in ["shared-1", "shared-2", "only-first"] {
            first.insert(id, "active", "starter").await;
        }
        first.resync().await;
        let before = (
            first.list("servers").await,
            first.list("ssh_keys").await,
            first.list("firewalls").await,
        );
        assert_eq!(before.0.len(), 3);

        // A laptop with a test database and the production token.
        let second = env_custom(
            &second_db,
            Options {
                sim: Some(Arc::clone(&first.sim)),
                ..Options::default()
            },
        )
        .await;
        assert_ne!(
            second.installation, first.installation,
            "each database has its own id"
        );
        second.resync().await; // an empty table: nothing to do, nothing deleted
        second.insert("shared-1", "active", "starter").await; // same id, same names
        second.insert("shared-2", "canceled", "starter").await;
        second.insert("only-second", "active", "starter").await;
        second.process_changes().await;
        second.resync_allowing_failures().await;
        second
            .sql("DELETE FROM subscriptions WHERE id = 'only-second'")
            .await;
        second.process_changes().await;
        second.resync_allowing_failures().await;

        let strip = |items: Vec<Value>| -> Vec<Value> {
            items
                .into_iter()
                .filter(|item| {
                    item["labels"]["vps-controller/installation"] == first.installation.as_str()
                })
                .collect()
        };
        let after = (
            strip(first.list("servers").await),
            strip(first.list("ssh_keys").await),
            strip(first.list("firewalls").await),
        );
        assert_eq!(
            after.0, before.0,
            "[{backend}] the first database's servers are untouched"
        );
        assert_eq!(after.1, before.1, "[{backend}] ... and its SSH keys");
        assert_eq!(after.2, before.2, "[{backend}] ... and its firewalls");
        let clash = second.row("shared-1").await;
        assert_eq!(clash.provisioning_status, "failed", "[{backend}]");
        assert!(
            clash
                .provisioning_error
                .unwrap_or_default()
                .contains("does not own")
        );
        first_db.cleanup().await;
        second_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_the_web_app_created_are_adopted_never_duplicated() {
    for test_db in common::test_databases().await {
        let env = web_app_env(&test_db).await;
        let backend = env.backend;
        // What the seed web app did before the controller existed: its own key and server.
        let pair = vps_controller::keys::generate(KeyAlgorithm::Ed25519, "web-app")
            .await
            .unwrap();
        let (status, key) = env
            .api(
                "POST",
                "/ssh_keys",
                Some(json!({"name": "webapp-key-1", "public_key": pair.public_openssh})),
            )
            .await;
        assert_eq!(status, 201, "{key}");
        let key_id = key["ssh_key"]["id"].as_i64().unwrap();
        let (status, server) = env
            .api("POST", "/servers", Some(json!({"name": "customer-1", "server_type": "cx23", "image": "ubuntu-24.04", "ssh_keys": [key_id], "labels": {"app": "web"}})))
            .await;
        assert_eq!(status, 201, "{server}");
        let server_id = server["server"]["id"].as_i64().unwrap();
        let web_app_secret = "enc:web-app-aes:3q2+7w==";
        env.sql(&format!(
            "INSERT INTO subscriptions (id, user_id, status, plan, hetzner_server_id, hetzner_ssh_key_id, ssh_private_key) \
             VALUES ('adopt-me', 'u1', 'active', 'starter', {server_id}, {key_id}, '{web_app_secret}')"
        ))
        .await;
        env.sql(
            "INSERT INTO subscriptions (id, user_id, status, plan, hetzner_server_id) \
             VALUES ('dangling', 'u2', 'active', 'starter', 987654321)",
        )
        .await;
        common::eventually(std::time::Duration::from_secs(10), || async {
            let (_, s) = env.api("GET", &format!("/servers/{server_id}"), None).await;
            s["server"]["status"] == "running"
        })
        .await;

        env.process_changes().await;
        env.resync().await;

        let adopted = env.row("adopt-me").await;
        assert_eq!(
            adopted.provisioning_status, "ready",
            "[{backend}] {adopted:?}"
        );
        assert_eq!(
            adopted.hetzner_server_id,
            Some(server_id),
            "[{backend}] no second server"
        );
        assert_eq!(
            adopted.ssh_private_key.as_deref(),
            Some(web_app_secret),
            "never overwritten"
        );
        assert_eq!(adopted.ssh_key_origin.as_deref(), Some("external"));
        assert_eq!(
            adopted.hetzner_ssh_key_id,
            Some(key_id),
            "Hetzner's key object kept"
        );
        let (_, server) = env.api("GET", &format!("/servers/{server_id}"), None).await;
        let labels = &server["server"]["labels"];
        assert_eq!(
            labels["vps-controller/installation"],
            env.installation.as_str()
        );
        assert_eq!(labels["app"], "web", "the web app's labels kept");
        let firewall = adopted.hetzner_firewall_id.expect("our firewall");
        assert!(
            server["server"]["public_net"]["firewalls"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["id"] == firewall)
        );
        let (_, key) = env.api("GET", &format!("/ssh_keys/{key_id}"), None).await;
        assert_eq!(
            key["ssh_key"]["public_key"].as_str(),
            Some(pair.public_openssh.as_str())
        );

        let dangling = env.row("dangling").await;
        assert_eq!(
            dangling.provisioning_status, "ready",
            "[{backend}] fresh provision"
        );
        assert_ne!(dangling.hetzner_server_id, Some(987654321));
        assert!(
            env.event_reasons("dangling")
                .await
                .contains(&"RecordedServerGone".to_string())
        );
        assert_eq!(
            env.list("servers").await.len(),
            2,
            "[{backend}] the adopted one and the fresh one"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_fix_retries_failed_rows_retry_works_and_a_wrong_token_shows_on_the_rows() {
    for test_db in common::test_databases().await {
        let env = common::env::env(&test_db).await;
        let backend = env.backend;
        let before = env.controller.reconciler.config.clone();
        vps_controller::controller::retry_after_config_change(&env.db, &before.fingerprint())
            .await
            .unwrap();
        env.insert("gold-1", "active", "gold").await;
        env.insert("gold-2", "active", "gold").await;
        env.process_changes().await;
        assert_eq!(
            env.row("gold-1").await.provisioning_status,
            "failed",
            "[{backend}]"
        );

        // The same config again retries nothing; a config with the plan retries both.
        let retried =
            vps_controller::controller::retry_after_config_change(&env.db, &before.fingerprint())
                .await
                .unwrap();
        assert_eq!(retried, 0);
        let fixed = config(|c| {
            let starter = c.plans["starter"].clone();
            c.plans.insert("gold".into(), starter);
        });
        let retried =
            vps_controller::controller::retry_after_config_change(&env.db, &fixed.fingerprint())
                .await
                .unwrap();
        assert_eq!(retried, 2, "[{backend}]");
        let restarted = env_custom(
            &test_db,
            Options {
                sim: Some(Arc::clone(&env.sim)),
                config: fixed,
                ..Options::default()
            },
        )
        .await;
        restarted.process_changes().await;
        assert_eq!(
            restarted.row("gold-1").await.provisioning_status,
            "ready",
            "[{backend}]"
        );
        assert_eq!(
            restarted.row("gold-2").await.provisioning_status,
            "ready",
            "[{backend}]"
        );

        // `retry` by hand: a terminal failure is looked at again.
        env.insert("typo", "active", "platinum").await;
        restarted.process_changes().await;
        assert_eq!(restarted.row("typo").await.provisioning_status, "failed");
        env.sql("UPDATE subscriptions SET plan = 'platinum' WHERE id = 'typo'")
            .await; // unchanged: no new version
        assert_eq!(
            subscriptions::retry(&env.db, Some("typo")).await.unwrap(),
            1
        );
        assert_eq!(
            subscriptions::changed(&env.db)
                .await
                .unwrap()
                .iter()
                .filter(|(id, _)| id == "typo")
                .count(),
            1
        );

        // A rejected token: the rows that wait say so.
        let wrong = env_custom(
            &test_db,
            Options {
                sim: Some(Arc::clone(&env.sim)),
                token: "not-the-token".into(),
                ..Options::default()
            },
        )
        .await;
        env.insert("waiting", "active", "starter").await;
        assert!(wrong.controller.resync().await.is_err());
        let waiting = env.row("waiting").await;
        assert_eq!(waiting.provisioning_status, "pending");
        let error = waiting.provisioning_error.unwrap_or_default();
        assert!(error.contains("unauthorized"), "[{backend}] {error}");
        assert!(
            !error.contains("not-the-token"),
            "the token never reaches the row"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_look_alike_get_separate_resources_and_independent_lifecycles() {
    for_each_backend(|env| async move {
        let backend = env.backend;
        let mut ids_: Vec<String> = vec!["CaseDup".into(), "casedup-c9aee856".into()];
        for base in [
            "sub_1", "Sub_1", "sub-1", "SUB-1", "sub--1", "sub.1", "sub 1",
        ] {
            ids_.push(base.to_string());
        }
        for id in &ids_ {
            env.insert(id, "active", "starter").await;
        }
        env.resync().await;
        let servers = env.list("servers").await;
        assert_eq!(
            servers.len(),
            ids_.len(),
            "[{backend}] one server per subscription"
        );
        let rows = subscriptions::all(&env.db).await.unwrap().rows;
        let distinct: BTreeSet<i64> = rows.iter().filter_map(|r| r.hetzner_server_id).collect();
        assert_eq!(
            distinct.len(),
            ids_.len(),
            "[{backend}] no two rows share a server"
        );
        let keys: BTreeSet<i64> = rows.iter().filter_map(|r| r.hetzner_ssh_key_id).collect();
        assert_eq!(keys.len(), ids_.len());

        // Canceling one never touches its look-alike.
        let twin = env.row("casedup-c9aee856").await;
        env.set_status("CaseDup", "canceled").await;
        env.process_changes().await;
        env.resync().await;
        assert_eq!(
            env.row("CaseDup").await.provisioning_status,
            "deprovisioned"
        );
        let twin_after = env.row("casedup-c9aee856").await;
        assert_eq!(twin_after.provisioning_status, "ready", "[{backend}]");
        assert_eq!(twin_after.hetzner_server_id, twin.hetzner_server_id);
        assert_eq!(twin_after.hetzner_ssh_key_id, twin.hetzner_ssh_key_id);
        let remaining = ids(&env.list("servers").await);
        assert!(remaining.contains(&twin.hetzner_server_id.unwrap()));
        assert_eq!(remaining.len(), ids_.len() - 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_id_row_stops_nothing_and_a_corrupted_key_fails_its_row() {
    for test_db in common::test_databases().await {
        // SQLite accepts NULL in a TEXT primary key; on PostgreSQL the web app's id is a
        // plain column here.
        let table = if test_db.is_postgres() {
            "CREATE TABLE subscriptions (id TEXT, user_id TEXT, stripe_subscription_id TEXT, status TEXT, plan TEXT, created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ)"
        } else {
            "CREATE TABLE subscriptions (id TEXT PRIMARY KEY, user_id TEXT, stripe_subscription_id TEXT, status TEXT, plan TEXT, created_at INTEGER, updated_at INTEGER)"
        };
        let env = env_custom(
            &test_db,
            Options {
                web_app_table: Some(table.into()),
                ..Options::default()
            },
        )
        .await;
        let backend = env.backend;
        env.sql("INSERT INTO subscriptions (id, user_id, status, plan) VALUES (NULL, 'u0', 'active', 'starter')").await;
        env.insert("fine", "active", "starter").await;
        env.insert("broken-key", "active", "starter").await;
        env.process_changes().await;
        env.resync().await;
        assert_eq!(
            env.row("fine").await.provisioning_status,
            "ready",
            "[{backend}]"
        );
        assert_eq!(
            env.row("broken-key").await.provisioning_status,
            "ready",
            "[{backend}]"
        );
        assert_eq!(
            env.list("servers").await.len(),
            2,
            "[{backend}] nothing for the NULL id"
        );
        env.sql("DELETE FROM subscriptions WHERE id IS NULL").await; // the delete trigger copes

        // The sealed key is damaged (a bad restore, a wrong encryption key).
        let server = env.row("broken-key").await.hetzner_server_id;
        env.sql("UPDATE subscriptions SET ssh_private_key = 'v1:0badc0de:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA' WHERE id = 'broken-key'").await;
        env.resync().await;
        let row = env.row("broken-key").await;
        assert_eq!(row.provisioning_status, "failed", "[{backend}]");
        let error = row.provisioning_error.unwrap_or_default();
        assert!(
            error.contains("cannot be opened") && error.contains("Recovering a lost key pair"),
            "{error}"
        );
        assert!(
            env.event_reasons("broken-key")
                .await
                .contains(&"Failed".to_string())
        );
        assert_eq!(row.hetzner_server_id, server, "the server is kept");
        assert!(ids(&env.list("servers").await).contains(&server.unwrap()));
        assert_eq!(env.row("fine").await.provisioning_status, "ready");
        test_db.cleanup().await;
    }
}

#[test]
fn the_lifecycle_defaults_are_the_documented_ones() {
    let lifecycle = Lifecycle::default();
    assert_eq!(lifecycle.run, ["active", "trialing"]);
    assert_eq!(lifecycle.grace, ["past_due"]);
    assert_eq!(lifecycle.grace_period_hours, 72);
    assert_eq!(lifecycle.suspend, ["paused", "unpaid"]);
    assert_eq!(lifecycle.delete, ["canceled", "incomplete_expired"]);
    assert_eq!(DeletionBudget::default().per_hour(100), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_labelled_before_installation_ids_are_adopted_in_place() {
    for test_db in common::test_databases().await {
        let env = common::env::env(&test_db).await;
        let backend = env.backend;
        env.insert("old", "active", "starter").await;
        env.resync().await;
        let row = env.row("old").await;
        // What an earlier version left: the instance label only.
        let legacy = |labels: &Value| {
            let mut labels = labels.as_object().unwrap().clone();
            labels.remove("vps-controller/installation");
            Value::Object(labels)
        };
        for (kind, id) in [
            ("servers", row.hetzner_server_id.unwrap()),
            ("ssh_keys", row.hetzner_ssh_key_id.unwrap()),
            ("firewalls", row.hetzner_firewall_id.unwrap()),
        ] {
            let singular = &kind[..kind.len() - 1];
            let (_, body) = env.api("GET", &format!("/{kind}/{id}"), None).await;
            let labels = legacy(&body[singular]["labels"]);
            let (status, _) = env
                .api(
                    "PUT",
                    &format!("/{kind}/{id}"),
                    Some(json!({"labels": labels})),
                )
                .await;
            assert_eq!(status, 200);
        }
        // Another database's resource of the same era: no row here records it.
        let stranger_id = server_made_by_hand(
            &env,
            "vps-stranger",
            json!({"vps-controller/instance": "default", "vps-controller/subscription": "stranger"}),
        )
        .await;

        // The upgraded controller starts (same database, same encryption key).
        let upgraded = env_custom(
            &test_db,
            Options {
                sim: Some(Arc::clone(&env.sim)),
                ..Options::default()
            },
        )
        .await;
        upgraded.reset_stats().await;
        upgraded.resync().await;
        let after = upgraded.row("old").await;
        assert_eq!(after.provisioning_status, "ready", "[{backend}]");
        assert_eq!(
            (
                after.hetzner_server_id,
                after.hetzner_ssh_key_id,
                after.hetzner_firewall_id
            ),
            (
                row.hetzner_server_id,
                row.hetzner_ssh_key_id,
                row.hetzner_firewall_id
            ),
            "[{backend}] adopted in place, nothing recreated"
        );
        for kind in ["servers", "ssh_keys", "firewalls"] {
            let owned = upgraded.owned_by(kind, "old").await;
            assert_eq!(owned.len(), 1, "[{backend}] {kind}");
            assert_eq!(
                owned[0]["labels"]["vps-controller/installation"],
                upgraded.installation.as_str()
            );
        }
        let writes = common::env::writes(&upgraded.stats().await);
        assert!(
            writes.keys().all(|endpoint| endpoint.starts_with("PUT ")),
            "[{backend}] only label updates: {writes:?}"
        );
        let (_, stranger) = env
            .api("GET", &format!("/servers/{stranger_id}"), None)
            .await;
        assert_eq!(
            stranger["server"]["labels"],
            json!({"vps-controller/instance": "default", "vps-controller/subscription": "stranger"}),
            "[{backend}] a legacy resource no row records is never changed"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_recorded_on_two_rows_or_never_adopted_is_never_taken_or_deleted() {
    for test_db in common::test_databases().await {
        let env = web_app_env(&test_db).await;
        let backend = env.backend;
        let web_app_server = |name| server_made_by_hand(&env, name, json!({"app": "web"}));
        // The web app copied one row's server id into another row.
        let shared = web_app_server("shared-box").await;
        for id in ["first", "copy"] {
            env.sql(&format!(
                "INSERT INTO subscriptions (id, user_id, status, plan, hetzner_server_id) VALUES ('{id}', 'u', 'active', 'starter', {shared})"
            ))
            .await;
        }
        // A canceled row points at a server this controller never adopted.
        let stranger = web_app_server("never-adopted").await;
        env.sql(&format!(
            "INSERT INTO subscriptions (id, user_id, status, plan, hetzner_server_id) VALUES ('gone', 'u', 'canceled', 'starter', {stranger})"
        ))
        .await;
        env.process_changes().await;

        for (id, other) in [("first", "copy"), ("copy", "first")] {
            let row = env.row(id).await;
            assert_eq!(row.provisioning_status, "failed", "[{backend}] {id}");
            let error = row.provisioning_error.unwrap_or_default();
            assert!(
                error.contains("also recorded on subscription") && error.contains(other),
                "{error}"
            );
        }
        let gone = env.row("gone").await;
        assert_eq!(gone.provisioning_status, "failed", "[{backend}]");
        assert!(
            gone.provisioning_error
                .unwrap_or_default()
                .contains("never adopted")
        );

        // Canceling one of the two sharing rows deletes nothing either.
        env.set_status("first", "canceled").await;
        env.process_changes().await;
        env.resync_allowing_failures().await;
        let left = ids(&env.list("servers").await);
        assert!(
            left.contains(&shared) && left.contains(&stranger),
            "[{backend}] {left:?}"
        );
        assert_eq!(
            left.len(),
            2,
            "[{backend}] and no server was created for the sharing rows"
        );
        let (_, box_) = env.api("GET", &format!("/servers/{shared}"), None).await;
        assert_eq!(
            box_["server"]["labels"],
            json!({"app": "web"}),
            "[{backend}] not even relabelled"
        );
        test_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_server_stays_ready_and_its_external_key_survives_deprovisioning() {
    for test_db in common::test_databases().await {
        let env = web_app_env(&test_db).await;
        let backend = env.backend;
        let (status, body) = env
            .api(
                "POST",
                "/servers",
                Some(json!({"name": "keyless", "server_type": "cx23", "image": "ubuntu-24.04"})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let keyless = body["server"]["id"].as_i64().unwrap();
        let (status, body) = env
            .api(
                "POST",
                "/servers",
                Some(json!({"name": "with-key", "server_type": "cx23", "image": "ubuntu-24.04"})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let with_key = body["server"]["id"].as_i64().unwrap();
        env.sql(&format!(
            "INSERT INTO subscriptions (id, user_id, status, plan, hetzner_server_id) VALUES ('keyless', 'u', 'active', 'starter', {keyless})"
        ))
        .await;
        env.sql(&format!(
            "INSERT INTO subscriptions (id, user_id, status, plan, hetzner_server_id, ssh_private_key) VALUES ('with-key', 'u', 'active', 'starter', {with_key}, 'enc:web-app')"
        ))
        .await;
        common::eventually(std::time::Duration::from_secs(10), || async {
            let (_, s) = env.api("GET", &format!("/servers/{keyless}"), None).await;
            let (_, t) = env.api("GET", &format!("/servers/{with_key}"), None).await;
            s["server"]["status"] == "running" && t["server"]["status"] == "running"
        })
        .await;
        // Adopted in one pass, still ready in every later one.
        env.process_changes().await;
        for _ in 0..2 {
            env.resync().await;
            for id in ["keyless", "with-key"] {
                let row = env.row(id).await;
                assert_eq!(
                    row.provisioning_status, "ready",
                    "[{backend}] {id}: {row:?}"
                );
                assert_eq!(row.ssh_key_origin.as_deref(), Some("external"));
            }
        }
        assert_eq!(
            env.list("servers").await.len(),
            2,
            "[{backend}] no second server"
        );

        // Canceled: the adopted server goes (it is ours now), the web app's key stays.
        env.set_status("with-key", "canceled").await;
        env.process_changes().await;
        let row = env.row("with-key").await;
        assert_eq!(row.provisioning_status, "deprovisioned", "[{backend}]");
        assert_eq!(
            row.ssh_private_key.as_deref(),
            Some("enc:web-app"),
            "[{backend}]"
        );
        assert_eq!(ids(&env.list("servers").await), vec![keyless]);
        test_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_deletion_budget_in_the_config_lifts_a_pause() {
    for test_db in common::test_databases().await {
        let tight = |min_per_hour| {
            config(|c| {
                c.deletion_budget = DeletionBudget {
                    min_per_hour,
                    fleet_percent: 0,
                }
            })
        };
        let env = env_custom(
            &test_db,
            Options {
                config: tight(2),
                ..Options::default()
            },
        )
        .await;
        let backend = env.backend;
        for i in 0..4 {
            env.insert(&format!("c{i}"), "active", "starter").await;
        }
        env.resync().await;
        env.sql("UPDATE subscriptions SET status = 'canceled'")
            .await;
        env.resync_allowing_failures().await;
        assert_eq!(
            env.list("servers").await.len(),
            2,
            "[{backend}] the budget of 2"
        );
        assert!(
            deletion_guard::status(&env.db)
                .await
                .unwrap()
                .paused_since
                .is_some()
        );
        // The same config again: still paused.
        env.resync_allowing_failures().await;
        assert_eq!(env.list("servers").await.len(), 2, "[{backend}]");

        let raised = env_custom(
            &test_db,
            Options {
                sim: Some(Arc::clone(&env.sim)),
                config: tight(10),
                ..Options::default()
            },
        )
        .await;
        raised.resync().await;
        assert!(
            raised.list("servers").await.is_empty(),
            "[{backend}] resumed under the new budget"
        );
        assert!(
            deletion_guard::status(&env.db)
                .await
                .unwrap()
                .paused_since
                .is_none()
        );
        test_db.cleanup().await;
    }
}

/// A snapshot that fails is no backup: the server is kept until one succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_snapshot_keeps_the_server_until_one_succeeds() {
    for test_db in common::test_databases().await {
        let env = env_custom(
            &test_db,
            Options {
                config: config(|c| c.lifecycle.snapshot_before_delete = true),
                ..Options::default()
            },
        )
        .await;
        let backend = env.backend;
        env.insert("snap", "active", "starter").await;
        env.process_changes().await;
        let server = env.row("snap").await.hetzner_server_id.unwrap();
        let faults = format!("http://{}/__simulator/faults", env.sim.addr());
        let armed = env
            .http
            .post(&faults)
            .json(&json!({"faults": [{"kind": "action_error", "endpoints": ["POST /servers/{id}/actions/create_image"], "count": 1}]}))
            .send()
            .await
            .unwrap();
        assert!(armed.status().is_success());
        env.set_status("snap", "canceled").await;
        env.process_changes().await;
        assert!(
            ids(&env.list("servers").await).contains(&server),
            "[{backend}] kept"
        );
        let error = env.row("snap").await.provisioning_error.unwrap_or_default();
        assert!(error.contains("create_image"), "[{backend}] {error}");

        // The next attempt takes a new snapshot (the failed one does not count) and deletes.
        let gone = common::eventually(std::time::Duration::from_secs(30), || async {
            env.process_changes().await;
            env.row("snap").await.provisioning_status == "deprovisioned"
        })
        .await;
        assert!(gone, "[{backend}] {:?}", env.row("snap").await);
        let (_, images) = env.api("GET", "/images?type=snapshot", None).await;
        let statuses: Vec<&str> = images["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["status"].as_str().unwrap_or_default())
            .collect();
        assert!(statuses.contains(&"available"), "[{backend}] {images}");
        test_db.cleanup().await;
    }
}
