//! The reconcile loop end to end: real databases (SQLite and PostgreSQL), the real client
//! over real sockets, the simulator standing in for Hetzner. Every test drives the passes
//! directly (`resync`, `process_changes`), so nothing waits on a timer.

mod common;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use sea_orm::sqlx::Connection;
use sea_orm::sqlx::sqlite::SqliteConnectOptions;
use serde_json::json;

use common::env::{env, env_with, for_each_backend, ids, writes};
use vps_controller::config::Config;
use vps_controller::controller::triggers::{self, WatchCounters};
use vps_controller::db::entities::subscription;
use vps_controller::db::{events, subscriptions};
use vps_controller::reconcile::{Verdict, observe};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_rows_converge_canceled_ones_stay_empty_and_steady_state_only_lists() {
    for_each_backend(|env| async move {
        for i in 0..10 {
            env.insert(
                &format!("sub-{i}"),
                if i % 2 == 0 { "active" } else { "trialing" },
                if i < 5 { "starter" } else { "pro" },
            )
            .await;
        }
        for i in 10..13 {
            env.insert(&format!("sub-{i}"), "canceled", "pro").await;
        }
        env.resync().await;

        let servers = env.list("servers").await;
        let keys = env.list("ssh_keys").await;
        let firewalls = env.list("firewalls").await;
        assert_eq!(
            (servers.len(), keys.len(), firewalls.len()),
            (10, 10, 10),
            "[{}]",
            env.backend
        );
        for i in 0..10 {
            let id = format!("sub-{i}");
            let row = env.row(&id).await;
            let server = env.owned_by("servers", &id).await;
            let key = env.owned_by("ssh_keys", &id).await;
            let firewall = env.owned_by("firewalls", &id).await;
            assert_eq!(
                (server.len(), key.len(), firewall.len()),
                (1, 1, 1),
                "[{}] {id}",
                env.backend
            );
            assert_eq!(
                row.provisioning_status, "ready",
                "[{}] {id}: {:?}",
                env.backend, row.provisioning_error
            );
            assert_eq!(row.hetzner_server_id, server[0]["id"].as_i64());
            assert_eq!(row.hetzner_ssh_key_id, key[0]["id"].as_i64());
            assert_eq!(row.hetzner_firewall_id, firewall[0]["id"].as_i64());
            assert_eq!(
                row.vps_ip_address.as_deref(),
                server[0]["public_net"]["ipv4"]["ip"].as_str()
            );
            assert_eq!(row.vps_hostname.as_deref(), server[0]["name"].as_str());
            assert!(row.provisioned_at.is_some());
            assert_eq!(server[0]["status"], "running");
            assert_eq!(
                server[0]["server_type"]["name"],
                if i < 5 { "cx23" } else { "cpx32" }
            );
            assert_eq!(key[0]["public_key"].as_str(), row.ssh_public_key.as_deref());
            let sealed = row.ssh_private_key.clone().unwrap();
            assert!(
                sealed.starts_with("v1:") && !sealed.contains("PRIVATE KEY"),
                "sealed at rest"
            );
            assert_eq!(row.observed_version, row.desired_version);
        }
        // Canceled before anything was created: settled, not `pending` for ever.
        for i in 10..13 {
            let row = env.row(&format!("sub-{i}")).await;
            assert_eq!(
                row.provisioning_status, "deprovisioned",
                "[{}]",
                env.backend
            );
            assert_eq!(row.hetzner_server_id, None);
        }
        let recorded = events::recent(&env.db, Some("sub-0"), 50).await.unwrap();
        let reasons: Vec<&str> = recorded.iter().map(|e| e.reason.as_str()).collect();
        for reason in [
            "KeyPairGenerated",
            "SshKeyCreated",
            "FirewallCreated",
            "ServerCreated",
            "Ready",
        ] {
            assert!(
                reasons.contains(&reason),
                "[{}] events: {reasons:?}",
                env.backend
            );
        }

        // Steady state: a resync lists (3 requests), writes nothing at Hetzner or in the DB,
        // and queues no reconcile: every row is judged converged in memory.
        let before = subscriptions::all(&env.db).await.unwrap().rows;
        env.reset_stats().await;
        let report = env.controller.resync().await.unwrap();
        assert_eq!(
            (report.reconciled, report.converged),
            (0, 13),
            "[{}] {report:?}",
            env.backend
        );
        env.process_changes().await;
        let stats = env.stats().await;
        assert_eq!(stats["total"], 3, "[{}] {stats}", env.backend);
        for endpoint in ["GET /servers", "GET /ssh_keys", "GET /firewalls"] {
            assert_eq!(
                stats["by_endpoint"][endpoint], 1,
                "[{}] {stats}",
                env.backend
            );
        }
        assert_eq!(
            subscriptions::all(&env.db).await.unwrap().rows,
            before,
            "[{}] no row changed",
            env.backend
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceling_deletes_everything_and_reactivating_provisions_again() {
    for_each_backend(|env| async move {
        env.insert("sub-a", "active", "starter").await;
        env.process_changes().await;
        let first = env.row("sub-a").await;
        assert_eq!(
            first.provisioning_status, "ready",
            "[{}] {:?}",
            env.backend, first.provisioning_error
        );

        env.set_status("sub-a", "canceled").await;
        env.process_changes().await;
        let row = env.row("sub-a").await;
        assert_eq!(
            row.provisioning_status, "deprovisioned",
            "[{}] {:?}",
            env.backend, row.provisioning_error
        );
        assert!(row.deprovisioned_at.is_some());
        assert_eq!(
            (
                row.hetzner_server_id,
                row.hetzner_ssh_key_id,
                row.hetzner_firewall_id
            ),
            (None, None, None)
        );
        assert_eq!((row.ssh_private_key, row.vps_ip_address), (None, None));
        assert!(env.list("servers").await.is_empty());
        assert!(env.list("ssh_keys").await.is_empty());
        assert!(env.list("firewalls").await.is_empty());

        env.set_status("sub-a", "active").await;
        env.process_changes().await;
        let again = env.row("sub-a").await;
        assert_eq!(
            again.provisioning_status, "ready",
            "[{}] {:?}",
            env.backend, again.provisioning_error
        );
        assert_ne!(
            again.hetzner_server_id, first.hetzner_server_id,
            "a new server"
        );
        assert_eq!(
            ids(&env.list("servers").await),
            vec![again.hetzner_server_id.unwrap()]
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_loses_its_resources_at_once() {
    for_each_backend(|env| async move {
        env.insert("sub-d", "active", "starter").await;
        env.process_changes().await;
        assert_eq!(env.list("servers").await.len(), 1);
        env.sql("DELETE FROM subscriptions WHERE id = 'sub-d'")
            .await;
        env.process_changes().await;
        assert!(env.list("servers").await.is_empty(), "[{}]", env.backend);
        assert!(env.list("ssh_keys").await.is_empty());
        assert!(env.list("firewalls").await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_drift_is_repaired_within_one_resync() {
    for_each_backend(|env| async move {
        for id in ["gone", "off", "rules", "unapplied", "labels", "key", "calm-1", "calm-2"] {
            env.insert(id, "active", "starter").await;
        }
        env.resync().await;
        let before: BTreeMap<String, subscription::Model> = subscriptions::all(&env.db).await.unwrap().rows.into_iter().map(|r| (r.id.clone(), r)).collect();
        let server = |id: &str| before[id].hetzner_server_id.unwrap();
        let firewall = |id: &str| before[id].hetzner_firewall_id.unwrap();

        let (status, _) = env.api("DELETE", &format!("/servers/{}", server("gone")), None).await;
        assert_eq!(status, 200);
        let (status, _) = env.api("POST", &format!("/servers/{}/actions/poweroff", server("off")), None).await;
        assert_eq!(status, 201);
        let (status, _) = env.api("POST", &format!("/firewalls/{}/actions/set_rules", firewall("rules")), Some(json!({"rules": []}))).await;
        assert_eq!(status, 201);
        let (status, body) = env
            .api("POST", &format!("/firewalls/{}/actions/remove_from_resources", firewall("unapplied")), Some(json!({"remove_from": [{"type": "server", "server": {"id": server("unapplied")}}]})))
            .await;
        assert_eq!(status, 201, "{body}");
        let (status, _) = env
            .api("PUT", &format!("/servers/{}", server("labels")), Some(json!({"labels": {"vps-controller/instance": "default", "vps-controller/subscription": "labels", "team": "ops"}})))
            .await;
        assert_eq!(status, 200);
        let (status, _) = env.api("DELETE", &format!("/ssh_keys/{}", before["key"].hetzner_ssh_key_id.unwrap()), None).await;
        assert_eq!(status, 204);
        // Let the drift's own actions (delete, power off, detach) finish, as at Hetzner.
        assert!(common::eventually(Duration::from_secs(10), || async {
            let (gone, _) = env.api("GET", &format!("/servers/{}", server("gone")), None).await;
            let (_, off) = env.api("GET", &format!("/servers/{}", server("off")), None).await;
            let (_, fw) = env.api("GET", &format!("/firewalls/{}", firewall("unapplied")), None).await;
            gone == 404 && off["server"]["status"] == "off" && fw["firewall"]["applied_to"] == json!([])
        }).await);

        // Exactly the six drifted subscriptions are reconciled; the calm ones are judged
        // converged against the listing and cost nothing.
        let report = env.controller.resync().await.unwrap();
        assert_eq!((report.reconciled, report.converged, report.failed), (6, 2, 0), "[{}] {report:?}", env.backend);

        let gone = env.row("gone").await;
        assert_ne!(gone.hetzner_server_id, Some(server("gone")), "[{}] recreated", env.backend);
        assert_eq!(ids(&env.owned_by("servers", "gone").await), vec![gone.hetzner_server_id.unwrap()]);
        let recorded = events::recent(&env.db, Some("gone"), 50).await.unwrap();
        assert_eq!(gone.provisioning_status, "ready", "{recorded:#?}");
        let (_, off) = env.api("GET", &format!("/servers/{}", server("off")), None).await;
        assert_eq!(off["server"]["status"], "running", "[{}] powered on", env.backend);
        let (_, rules) = env.api("GET", &format!("/firewalls/{}", firewall("rules")), None).await;
        assert_eq!(rules["firewall"]["rules"].as_array().unwrap().len(), Config::builtin().plans["starter"].firewall_rules.len());
        let (_, unapplied) = env.api("GET", &format!("/firewalls/{}", firewall("unapplied")), None).await;
        assert_eq!(unapplied["firewall"]["applied_to"][0]["server"]["id"].as_i64(), Some(server("unapplied")), "[{}] {unapplied}", env.backend);
        let (_, labels) = env.api("GET", &format!("/servers/{}", server("labels")), None).await;
        assert_eq!(labels["server"]["labels"]["vps-controller/plan"], "starter");
        assert_eq!(labels["server"]["labels"]["team"], "ops", "foreign labels kept");
        let key = env.owned_by("ssh_keys", "key").await;
        assert_eq!(key.len(), 1);
        assert_eq!(key[0]["public_key"].as_str(), before["key"].ssh_public_key.as_deref(), "recreated from the stored key");
        let key_row = env.row("key").await;
        assert_eq!(key_row.hetzner_ssh_key_id, key[0]["id"].as_i64());
        assert_eq!(key_row.provisioning_status, "ready");
        assert_eq!(key_row.provisioned_at, before["key"].provisioned_at, "a repair is not a new provisioning");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_deleted_and_foreign_resources_are_untouched() {
    for_each_backend(|env| async move {
        // An orphan: our labels, no row.
        let (status, body) = env
            .api("POST", "/servers", Some(json!({"name": "vps-ghost", "server_type": "cx23", "image": "ubuntu-24.04", "labels": {"vps-controller/installation": env.installation, "vps-controller/instance": "default", "vps-controller/subscription": "ghost"}})))
            .await;
        assert_eq!(status, 201, "{body}");
        // Someone else's server holding the name a new subscription would use.
        let (status, body) = env
            .api("POST", "/servers", Some(json!({"name": "vps-taken", "server_type": "cx23", "image": "debian-12", "labels": {"team": "web"}})))
            .await;
        assert_eq!(status, 201, "{body}");
        let foreign_id = body["server"]["id"].as_i64().unwrap();
        env.insert("taken", "active", "starter").await;

        env.resync().await;

        let names: Vec<String> = env.list("servers").await.iter().map(|s| s["name"].as_str().unwrap().to_string()).collect();
        assert_eq!(names, vec!["vps-taken".to_string()], "[{}] orphan deleted, foreign kept", env.backend);
        let (_, foreign) = env.api("GET", &format!("/servers/{foreign_id}"), None).await;
        assert_eq!(foreign["server"]["labels"], json!({"team": "web"}), "foreign labels untouched");
        let row = env.row("taken").await;
        assert_eq!(row.provisioning_status, "failed");
        let error = row.provisioning_error.unwrap();
        assert!(error.contains("vps-taken") && error.contains("does not own"), "{error}");

        // Terminal: not retried until the row changes, neither by the change pass nor by a
        // resync (which only lists).
        env.reset_stats().await;
        env.process_changes().await;
        env.resync().await;
        assert!(writes(&env.stats().await).is_empty(), "[{}] {}", env.backend, env.stats().await);
        assert_eq!(env.row("taken").await.provisioning_status, "failed");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_plan_fails_clearly_without_calling_hetzner() {
    for_each_backend(|env| async move {
        env.insert("gold", "active", "gold").await;
        env.reset_stats().await;
        env.process_changes().await;
        let row = env.row("gold").await;
        assert_eq!(row.provisioning_status, "failed");
        assert_eq!(
            row.provisioning_error.as_deref(),
            Some("plan: \"gold\" is not a configured plan (configured: pro, starter)")
        );
        assert_eq!(
            env.stats().await["total"],
            0,
            "[{}] not a single Hetzner call",
            env.backend
        );
        // Fixing the plan retries at once.
        env.sql("UPDATE subscriptions SET plan = 'pro' WHERE id = 'gold'")
            .await;
        env.process_changes().await;
        assert_eq!(env.row("gold").await.provisioning_status, "ready");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_create_and_persist_ends_with_one_adopted_server() {
    for_each_backend(|env| async move {
        env.insert("crash", "active", "starter").await;
        // A first pass that created the key, firewall and server but died before writing the
        // server's id: the server carries our instance label and deterministic name, and the
        // subscription label was never written (so a label lookup cannot find it).
        env.process_changes().await;
        let row = env.row("crash").await;
        let original = row.hetzner_server_id.unwrap();
        let (status, _) = env.api("DELETE", &format!("/servers/{original}"), None).await;
        assert_eq!(status, 200);
        let (status, body) = env
            .api("POST", "/servers", Some(json!({"name": "vps-crash", "server_type": "cx23", "image": "ubuntu-24.04", "labels": {"vps-controller/installation": env.installation, "vps-controller/instance": "default"}})))
            .await;
        assert_eq!(status, 201, "{body}");
        let crashed = body["server"]["id"].as_i64().unwrap();
        env.sql("UPDATE subscriptions SET hetzner_server_id = NULL, plan = 'starter', updated_at = CURRENT_TIMESTAMP WHERE id = 'crash'").await;

        env.process_changes().await; // create -> uniqueness_error -> adopt, look again later
        env.resync().await; // repairs the missing label and firewall
        // The adopted server may still be starting: the requeue looks again until it runs.
        assert!(common::eventually(Duration::from_secs(10), || async {
            env.process_changes().await;
            env.row("crash").await.provisioning_status == "ready"
        }).await, "[{}] adopted server recorded ready", env.backend);

        let servers = env.list("servers").await;
        assert_eq!(ids(&servers), vec![crashed], "[{}] exactly one server, the adopted one", env.backend);
        assert_eq!(servers[0]["labels"]["vps-controller/subscription"], "crash");
        let row = env.row("crash").await;
        assert_eq!(row.hetzner_server_id, Some(crashed));
        let recorded = events::recent(&env.db, Some("crash"), 50).await.unwrap();
        assert_eq!(row.provisioning_status, "ready", "{:?} {recorded:#?}", row.provisioning_error);
        let reasons: Vec<String> = events::recent(&env.db, Some("crash"), 50).await.unwrap().into_iter().map(|e| e.reason).collect();
        assert!(reasons.contains(&"ServerAdopted".to_string()), "{reasons:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_listings_mean_unknown_never_gone() {
    for_each_backend(|env| async move {
        env.insert("flaky", "active", "starter").await;
        env.process_changes().await;
        let ready = env.row("flaky").await;
        assert_eq!(ready.provisioning_status, "ready");
        // Every request now gets an injected fault (5xx, 429, non-JSON 502, late answer).
        let url = format!("http://{}/__simulator/faults", env.sim.addr());
        env.http
            .post(&url)
            .json(&json!({"rate": 1.0}))
            .send()
            .await
            .unwrap();
        assert!(
            env.controller.resync().await.is_err(),
            "[{}] the listing failed",
            env.backend
        );
        env.sql("UPDATE subscriptions SET updated_at = CURRENT_TIMESTAMP WHERE id = 'flaky'")
            .await;
        env.process_changes().await;
        // The failed row now backs off: the next pass offers it but starts nothing.
        let report = env.controller.process_changes().await.unwrap();
        assert_eq!(
            (report.reconciled, report.skipped_busy),
            (0, 1),
            "[{}] {report:?}",
            env.backend
        );
        env.http
            .post(&url)
            .json(&json!({"rate": 0.0}))
            .send()
            .await
            .unwrap();
        // Nothing was recreated or deleted on an unknown answer.
        assert_eq!(
            ids(&env.list("servers").await),
            vec![ready.hetzner_server_id.unwrap()],
            "[{}]",
            env.backend
        );
        assert_eq!(env.list("ssh_keys").await.len(), 1);
        assert_eq!(env.list("firewalls").await.len(), 1);
        let row = env.row("flaky").await;
        assert_eq!(row.hetzner_server_id, ready.hetzner_server_id);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_change_is_reported_once_and_never_resizes() {
    for_each_backend(|env| async move {
        env.insert("grow", "active", "starter").await;
        env.process_changes().await;
        let server_id = env.row("grow").await.hetzner_server_id.unwrap();
        env.sql("UPDATE subscriptions SET plan = 'pro' WHERE id = 'grow'")
            .await;
        env.process_changes().await;
        env.resync().await;
        env.resync().await;

        let (_, server) = env.api("GET", &format!("/servers/{server_id}"), None).await;
        assert_eq!(
            server["server"]["server_type"]["name"], "cx23",
            "[{}] not resized",
            env.backend
        );
        assert_eq!(
            server["server"]["labels"]["vps-controller/plan"], "pro",
            "plan label follows the row"
        );
        let drift_events = events::recent(&env.db, Some("grow"), 50)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.reason == "ServerTypeDrift")
            .count();
        assert_eq!(
            drift_events, 1,
            "[{}] reported once, not on every resync",
            env.backend
        );
        let row = env.row("grow").await;
        assert_eq!(
            (row.provisioning_status.as_str(), row.hetzner_server_id),
            ("ready", Some(server_id))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_columns_of_an_upgraded_web_app_table_fail_one_row_not_all() {
    for test_db in common::test_databases().await {
        let timestamp = if test_db.is_postgres() {
            "TIMESTAMPTZ"
        } else {
            "INTEGER"
        };
        // The web app's table, without NOT NULL constraints.
        let table = format!(
            "CREATE TABLE subscriptions (id TEXT PRIMARY KEY, user_id TEXT, stripe_subscription_id TEXT, status TEXT, plan TEXT, created_at {timestamp}, updated_at {timestamp})"
        );
        let env = env_with(&test_db, Some(&table), 0.05).await;
        env.sql("INSERT INTO subscriptions (id, user_id, status, plan) VALUES ('no-plan', NULL, 'active', NULL)").await;
        env.sql("INSERT INTO subscriptions (id, user_id, status, plan) VALUES ('no-status', 'u', NULL, 'pro')").await;
        env.insert("fine", "active", "starter").await;
        env.process_changes().await;

        let no_plan = env.row("no-plan").await;
        assert_eq!(no_plan.provisioning_status, "failed", "[{}]", env.backend);
        assert_eq!(
            no_plan.provisioning_error.as_deref(),
            Some("plan: missing (NULL)")
        );
        // A NULL status is held: nothing created, nothing deleted, the row says why.
        let no_status = env.row("no-status").await;
        assert_eq!(no_status.provisioning_status, "held");
        assert!(
            no_status
                .provisioning_error
                .as_deref()
                .is_some_and(|e| e.starts_with("status: NULL")),
            "{no_status:?}"
        );
        assert_eq!(
            env.row("fine").await.provisioning_status,
            "ready",
            "[{}] other rows unaffected",
            env.backend
        );
        assert_eq!(env.list("servers").await.len(), 1);
        test_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notifies_wake_the_change_pass() {
    for test_db in common::test_databases().await {
        if !test_db.is_postgres() {
            continue;
        }
        let env = env(&test_db).await;
        env.insert("wake", "active", "starter").await;
        let wake = Arc::new(tokio::sync::Notify::new());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let listener = tokio::spawn(vps_controller::controller::triggers::listen_for_changes(
            test_db.url.clone(),
            wake.clone(),
            stopped,
        ));
        // LISTEN starts asynchronously: keep changing the row until a wake-up arrives.
        let woken = common::eventually(Duration::from_secs(10), || async {
            env.sql("UPDATE subscriptions SET updated_at = CURRENT_TIMESTAMP WHERE id = 'wake'")
                .await;
            tokio::time::timeout(Duration::from_millis(200), wake.notified())
                .await
                .is_ok()
        })
        .await;
        assert!(woken, "a spec change on PostgreSQL wakes the controller");
        stop.send(true).unwrap();
        listener.await.unwrap();
        test_db.cleanup().await;
    }
}

/// `PRAGMA data_version` as a connection of its own sees it.
async fn data_version(conn: &mut sea_orm::sqlx::SqliteConnection) -> i64 {
    sea_orm::sqlx::query_scalar::<_, i64>("PRAGMA data_version")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Runs `watch_sqlite_with` polling every 5 ms into the returned counters.
fn spawn_sqlite_watch(
    url: &str,
    wake: Arc<tokio::sync::Notify>,
) -> (
    Arc<WatchCounters>,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let counters = Arc::new(WatchCounters::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(triggers::watch_sqlite_with(
        url.to_owned(),
        Duration::from_millis(5),
        counters.clone(),
        wake,
        stopped,
    ));
    (counters, stop, task)
}

/// Waits until the watcher has polled `n` more times (a count, not a duration).
async fn polls_pass(counters: &WatchCounters, n: u64) -> bool {
    let from = counters.polls.load(Ordering::SeqCst);
    common::eventually(Duration::from_secs(10), || async {
        counters.polls.load(Ordering::SeqCst) >= from + n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_commits_by_another_connection_wake_the_change_pass_once() {
    let test_db = common::sqlite_db();
    let env = env(&test_db).await;
    let wake = Arc::new(tokio::sync::Notify::new());
    let (counters, stop, watcher) = spawn_sqlite_watch(&test_db.url, wake.clone());

    assert!(polls_pass(&counters, 50).await, "the watcher polls");
    assert_eq!(
        counters.pokes.load(Ordering::SeqCst),
        0,
        "no commit, no wake-up, however often it looks"
    );

    // The web app's INSERT, through a connection other than the watcher's.
    env.insert("wake", "active", "starter").await;
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            counters.pokes.load(Ordering::SeqCst) >= 1
        })
        .await,
        "a commit by another connection pokes the change pass"
    );
    assert!(
        wake.notified().now_or_never().is_some(),
        "the poke is waiting for the control loop"
    );
    assert!(polls_pass(&counters, 50).await);
    assert_eq!(
        counters.pokes.load(Ordering::SeqCst),
        1,
        "one commit is one wake-up, not one per poll"
    );

    stop.send(true).unwrap();
    watcher.await.unwrap();
    test_db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_pass_with_nothing_to_do_writes_nothing() {
    let test_db = common::sqlite_db();
    let env = env(&test_db).await;
    let options = SqliteConnectOptions::from_str(&test_db.url).unwrap();
    let mut watcher = sea_orm::sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();

    env.insert("idle", "active", "starter").await;
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            env.process_changes().await;
            env.row("idle").await.provisioning_status == "ready"
        })
        .await
    );
    // Rows waiting for Hetzner come back on their own; wait until none is left.
    assert!(
        common::eventually(Duration::from_secs(30), || async {
            env.controller.process_changes().await.unwrap().reconciled == 0
        })
        .await
    );
    let before = data_version(&mut watcher).await;
    for _ in 0..3 {
        let report = env.controller.process_changes().await.unwrap();
        assert_eq!(report.reconciled, 0, "{report:?}");
    }
    assert_eq!(
        data_version(&mut watcher).await,
        before,
        "taking no deletion notices and finding no changed rows commits nothing, so the \
         SQLite watcher does not wake the loop again (no busy loop)"
    );
    env.set_status("idle", "canceled").await;
    assert_ne!(
        data_version(&mut watcher).await,
        before,
        "and this connection does see other connections' commits"
    );
    test_db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_loop_on_sqlite_goes_quiet_once_converged() {
    let test_db = common::sqlite_db();
    let env = Arc::new(env(&test_db).await);
    let (counters, stop_watch, watcher) =
        spawn_sqlite_watch(&test_db.url, env.controller.wake.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(env.controller.clone().run(stopped));

    env.insert("quiet", "active", "starter").await;
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            env.row("quiet").await.provisioning_status == "ready"
        })
        .await
    );
    // A loop that wrote on every pass would poke itself forever: 200 polls in a row with
    // no poke only happen once its passes stop writing.
    let quiet = common::eventually(Duration::from_secs(30), || async {
        let pokes = counters.pokes.load(Ordering::SeqCst);
        polls_pass(&counters, 200).await && counters.pokes.load(Ordering::SeqCst) == pokes
    })
    .await;
    assert!(quiet, "still poked after convergence: {counters:?}");

    stop.send(true).unwrap();
    running.await.unwrap();
    stop_watch.send(true).unwrap();
    watcher.await.unwrap();
    test_db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_insert_under_the_sqlite_watcher_reconciles_each_row_once() {
    // The watcher wakes the change pass on every commit, the controller's own status writes
    // included, so change passes read the unreconciled rows many times a second while
    // reconciles end. A row whose reconcile ended between a pass's reading and its claiming
    // must not be reconciled again on that reading: that second reconcile has no snapshot and
    // lists its subscription's resources by label (3 requests), about 4 % of the rows at
    // 10,000.
    const N: usize = 40; // under one listing page (50) per kind: each listing is 1 request
    let test_db = common::sqlite_db();
    let env = Arc::new(env(&test_db).await);
    let (counters, stop_watch, watcher) =
        spawn_sqlite_watch(&test_db.url, env.controller.wake.clone());
    let values: Vec<String> = (0..N)
        .map(|i| format!("('bulk-{i}', 'user-{i}', 'active', 'starter')"))
        .collect();
    env.sql(&format!(
        "INSERT INTO subscriptions (id, user_id, status, plan) VALUES {}",
        values.join(", ")
    ))
    .await;
    env.reset_stats().await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(env.controller.clone().run(stopped));
    assert!(
        common::eventually(Duration::from_secs(60), || async {
            subscriptions::count_by_status(&env.db)
                .await
                .unwrap()
                .get("ready")
                .copied()
                == Some(N as i64)
        })
        .await,
        "converged"
    );
    // The loop goes quiet (no pass writes), so nothing more is on its way.
    assert!(
        common::eventually(Duration::from_secs(30), || async {
            let pokes = counters.pokes.load(Ordering::SeqCst);
            polls_pass(&counters, 100).await && counters.pokes.load(Ordering::SeqCst) == pokes
        })
        .await
    );
    stop.send(true).unwrap();
    running.await.unwrap();
    stop_watch.send(true).unwrap();
    watcher.await.unwrap();

    let metrics = env.controller.metrics.render();
    let reconciles = common::process::metric_value(
        &metrics,
        "vps_controller_reconciles_total",
        &[("result", "success")],
    );
    assert_eq!(reconciles, Some(N as f64), "one reconcile per row");
    let stats = env.stats().await;
    for endpoint in ["GET /servers", "GET /ssh_keys", "GET /firewalls"] {
        // The first change pass's listing (it claimed every row), the first resync's and its
        // look for resources labelled before installation ids (once per process); a
        // reconcile without a snapshot would add one.
        let listings = stats["by_endpoint"][endpoint].as_u64().unwrap_or(0);
        assert!(listings <= 3, "{endpoint}: {listings} listings; {stats}");
    }
    for endpoint in ["POST /servers", "POST /ssh_keys", "POST /firewalls"] {
        assert_eq!(stats["by_endpoint"][endpoint], N as u64, "{stats}");
    }
    test_db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_create_does_not_hold_up_other_subscriptions() {
    let test_db = common::sqlite_db();
    // Every Hetzner action takes 8 s, like a real server boot.
    let env = Arc::new(env_with(&test_db, None, 8.0).await);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(env.controller.clone().run(stopped));

    env.insert("slow", "active", "starter").await;
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            env.row("slow").await.hetzner_server_id.is_some()
        })
        .await,
        "the create started"
    );
    env.insert("other", "active", "gold").await;
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            env.row("other").await.provisioning_status == "failed"
        })
        .await,
        "another subscription is handled while the first waits for its server"
    );
    assert_ne!(
        env.row("slow").await.provisioning_status,
        "ready",
        "still waiting"
    );
    stop.send(true).unwrap();
    running.await.unwrap();
    assert_eq!(
        env.row("slow").await.provisioning_status,
        "ready",
        "shutdown let it finish"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_judged_converged_would_cost_nothing_if_reconciled() {
    for_each_backend(|env| async move {
        let rows = [
            ("running", "active", "starter"),
            ("in-grace", "past_due", "starter"),
            ("paused", "paused", "starter"),
            ("canceled-later", "canceled", "starter"),
            ("never", "canceled", "starter"),
            ("never-provisioned", "canceled", "starter"),
            ("odd-case", "Active", "starter"),
            ("bad-plan", "active", "gold"),
        ];
        for (id, status, plan) in rows {
            // Canceled before the controller ever saw it: nothing is created for it.
            let first = if id == "never-provisioned" {
                status
            } else {
                "active"
            };
            env.insert(id, first, plan).await;
        }
        env.resync_allowing_failures().await;
        for (id, status, _) in rows {
            if id == "never-provisioned" {
                continue;
            }
            if id == "never" {
                env.sql("DELETE FROM subscriptions WHERE id = 'never'")
                    .await;
                env.insert(id, status, "starter").await;
            } else {
                env.set_status(id, status).await;
            }
        }
        // Until nothing is left to do (the paused server powers off, the canceled one goes).
        assert!(
            common::eventually(Duration::from_secs(30), || async {
                env.resync_allowing_failures().await;
                env.controller.resync().await.unwrap().reconciled == 0
            })
            .await,
            "[{}] converged",
            env.backend
        );
        let reconciler = &env.controller.reconciler;
        let term = reconciler.leadership.term().unwrap();
        let snapshot = observe::observe(&reconciler.api, &reconciler.owner.selector())
            .await
            .unwrap();
        let table = subscriptions::all(&env.db).await.unwrap().rows;
        let mut verdicts = BTreeMap::new();
        for row in &table {
            let verdict = reconciler.verdict(row, &snapshot, chrono::Utc::now());
            verdicts.insert(row.id.clone(), verdict.clone());
            if verdict == Verdict::Work {
                continue;
            }
            // What the resync skips must be exactly what a reconcile would not touch.
            env.reset_stats().await;
            reconciler
                .reconcile(&term, &row.id, Some(&snapshot))
                .await
                .unwrap();
            assert_eq!(
                env.stats().await["total"],
                0,
                "[{}] {}: no request",
                env.backend,
                row.id
            );
            assert_eq!(&env.row(&row.id).await, row, "[{}] no write", env.backend);
        }
        let expected: BTreeMap<String, Verdict> = rows
            .iter()
            .map(|(id, _, _)| {
                let verdict = match *id {
                    "in-grace" => Verdict::Recheck(Duration::ZERO),
                    _ => Verdict::Converged,
                };
                (id.to_string(), verdict)
            })
            .collect();
        // The grace period's remaining time varies: compare its kind only.
        let kinds = |v: &BTreeMap<String, Verdict>| -> BTreeMap<String, &'static str> {
            v.iter()
                .map(|(id, v)| {
                    let kind = match v {
                        Verdict::Converged => "converged",
                        Verdict::Recheck(_) => "recheck",
                        Verdict::Work => "work",
                    };
                    (id.clone(), kind)
                })
                .collect()
        };
        assert_eq!(kinds(&verdicts), kinds(&expected), "[{}]", env.backend);
        for (id, status) in [
            ("running", "ready"),
            ("paused", "suspended"),
            ("canceled-later", "deprovisioned"),
            ("never-provisioned", "deprovisioned"),
            ("odd-case", "held"),
            ("bad-plan", "failed"),
        ] {
            assert_eq!(
                env.row(id).await.provisioning_status,
                status,
                "[{}] {id}",
                env.backend
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toggle_does_not_wait_behind_a_bulk_insert() {
    let test_db = common::sqlite_db();
    // Two workers, actions of 1 s: 24 new subscriptions take a dozen seconds in bulk.
    let defaults = common::env::Options::default();
    let env = Arc::new(
        common::env::env_custom(
            &test_db,
            common::env::Options {
                action_seconds: 1.0,
                config: Config {
                    concurrency: 2,
                    ..defaults.config.clone()
                },
                ..defaults
            },
        )
        .await,
    );
    env.insert("early", "active", "starter").await;
    assert!(
        common::eventually(Duration::from_secs(20), || async {
            env.process_changes().await;
            env.row("early").await.provisioning_status == "ready"
        })
        .await
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(env.controller.clone().run(stopped));
    let bulk: Vec<String> = (0..24).map(|i| format!("bulk-{i:02}")).collect();
    let values: Vec<String> = bulk
        .iter()
        .map(|id| format!("('{id}', 'user-{id}', 'active', 'starter')"))
        .collect();
    env.sql(&format!(
        "INSERT INTO subscriptions (id, user_id, status, plan) VALUES {}",
        values.join(", ")
    ))
    .await;
    // The bulk is under way, then the early subscription is canceled.
    assert!(
        common::eventually(Duration::from_secs(20), || async {
            env.row("bulk-00").await.hetzner_server_id.is_some()
                || env.row("bulk-23").await.hetzner_server_id.is_some()
        })
        .await
    );
    env.set_status("early", "canceled").await;
    assert!(
        common::eventually(Duration::from_secs(60), || async {
            env.row("early").await.provisioning_status == "deprovisioned"
        })
        .await
    );
    let mut waiting = 0;
    for id in &bulk {
        waiting += usize::from(env.row(id).await.provisioning_status != "ready");
    }
    // First come, first served would have provisioned (nearly) all 24 first.
    assert!(
        waiting >= 12,
        "the cancellation went before the bulk: {waiting} of 24 still waited when it was done"
    );
    stop.send(true).unwrap();
    running.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_while_hetzner_fails_is_still_torn_down_afterwards() {
    for_each_backend(|env| async move {
        // Two rows, so the change pass lists everything at once (and that listing fails).
        env.insert("gone-later", "active", "starter").await;
        env.insert("gone-too", "active", "starter").await;
        env.process_changes().await;
        assert_eq!(env.list("servers").await.len(), 2);
        let faults = format!("http://{}/__simulator/faults", env.sim.addr());
        env.http
            .post(&faults)
            .json(&json!({"rate": 1.0}))
            .send()
            .await
            .unwrap();
        env.sql("DELETE FROM subscriptions WHERE id IN ('gone-later', 'gone-too')")
            .await;
        // The deletion notice is consumed by this pass, whose Hetzner calls all fail.
        assert!(
            env.controller.process_changes().await.is_err(),
            "its listing failed"
        );
        env.http
            .post(&faults)
            .json(&json!({"rate": 0.0}))
            .send()
            .await
            .unwrap();
        // Later change passes (after the backoff) still remember it and tear it down.
        let torn_down = common::eventually(Duration::from_secs(30), || async {
            env.process_changes().await;
            env.list("servers").await.is_empty()
        })
        .await;
        assert!(
            torn_down,
            "[{}] the deleted row's server is gone",
            env.backend
        );
        assert!(env.list("ssh_keys").await.is_empty());
        assert!(env.list("firewalls").await.is_empty());
    })
    .await;
}
