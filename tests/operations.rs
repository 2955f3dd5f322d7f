//! What an operator relies on, end to end with the real binary against `vps-controller
//! simulator`: the metrics (one prefix, every family, sane values), JSON logs, probes that
//! catch a hung or refusing Hetzner, and a start-up that checks its configuration before it
//! touches the database.

mod common;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::time::{Instant, sleep};

use common::process::*;
use vps_controller::db;

/// The families an SRE builds dashboards and alerts on, as `# TYPE` names them (without
/// `_total`; the info family without `_info`). `reconcile_errors` has one series per reason
/// and appears with the first error: the rejected-token test asserts it.
const FAMILIES: &[&str] = &[
    "vps_controller_build",
    "vps_controller_leader",
    "vps_controller_reconciles",
    "vps_controller_reconcile_duration_seconds",
    "vps_controller_workqueue_depth",
    "vps_controller_workqueue_adds",
    "vps_controller_workqueue_queue_duration_seconds",
    "vps_controller_workqueue_work_duration_seconds",
    "vps_controller_workqueue_retries",
    "vps_controller_subscriptions",
    "vps_controller_subscriptions_stuck",
    "vps_controller_subscriptions_in_backoff",
    "vps_controller_invalid_rows",
    "vps_controller_drift_repairs",
    "vps_controller_orphans_deleted",
    "vps_controller_pass_duration_seconds",
    "vps_controller_last_successful_resync_timestamp_seconds",
    "vps_controller_resync_interval_seconds",
    "vps_controller_deletions_paused",
    "vps_controller_hcloud_requests",
    "vps_controller_hcloud_request_duration_seconds",
    "vps_controller_hcloud_rate_limited",
    "vps_controller_hcloud_retries",
    "vps_controller_hcloud_budget_remaining",
    "vps_controller_hcloud_budget_limit",
    "vps_controller_hcloud_paused",
    "vps_controller_hcloud_last_success_timestamp_seconds",
    "vps_controller_process_cpu_seconds",
    "vps_controller_process_resident_memory_bytes",
    "vps_controller_process_open_fds",
    "vps_controller_process_max_fds",
    "vps_controller_process_start_time_seconds",
];

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `vps-controller run` against the simulator at `sim_url`, on a free port, answering
/// /metrics; its base URL.
async fn spawn_controller(
    dir: &Path,
    sim_url: &str,
    token: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (ChildGuard, String) {
    let endpoint = format!("{sim_url}/v1");
    let key = encryption_key();
    let database_url = sqlite_url(dir);
    spawn_listening(
        |port| {
            let listen = format!("127.0.0.1:{port}");
            let mut all = vec!["run", "--listen", &listen];
            all.extend_from_slice(args);
            let mut env = vec![
                ("HCLOUD_ENDPOINT", endpoint.as_str()),
                ("HCLOUD_TOKEN", token),
                ("VPS_CONTROLLER_ENCRYPTION_KEY", key.as_str()),
                ("DATABASE_URL", database_url.as_str()),
            ];
            env.extend_from_slice(envs);
            command(dir, &all, &env)
        },
        "/metrics",
    )
    .await
}

/// Polls `probe` until its status is `status`; returns its body.
async fn wait_for_probe(
    http: &reqwest::Client,
    url: &str,
    status: u16,
    controller: &ChildGuard,
) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok(response) = http.get(url).send().await
            && response.status().as_u16() == status
        {
            return response.text().await.unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer {status} within {DEADLINE:?}\n{}",
            controller.output()
        );
        sleep(POLL).await;
    }
}

/// Polls /metrics until `check` holds; returns that scrape.
async fn wait_for_metrics(
    http: &reqwest::Client,
    base_url: &str,
    what: &str,
    controller: &ChildGuard,
    check: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = metrics(http, base_url).await;
        if check(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what} within {DEADLINE:?}\n{text}\n{}",
            controller.output()
        );
        sleep(POLL).await;
    }
}

#[tokio::test]
async fn every_metric_family_has_one_prefix_and_sane_values_and_json_logs_name_the_subscription() {
    let sim_dir = tempfile::tempdir().unwrap();
    let (_simulator, sim_url) = spawn_simulator(sim_dir.path(), &["--action-seconds", "0.2"]).await;
    let dir = tempfile::tempdir().unwrap();
    // No resync after the first: the fleet gauge must follow the rows by itself.
    let (mut controller, base_url) = spawn_controller(
        dir.path(),
        &sim_url,
        SECRET_TOKEN,
        &["--resync-seconds", "3600", "--log-format", "json"],
        &[("RUST_LOG", "info,vps_controller=debug")],
    )
    .await;
    let http = http_client();
    wait_for_metrics(&http, &base_url, "a first resync", &controller, |m| {
        metric_value(
            m,
            "vps_controller_pass_duration_seconds_count",
            &[("pass", "resync")],
        )
        .is_some_and(|n| n >= 1.0)
    })
    .await;
    let conn = db::connect(&sqlite_url(dir.path())).await.unwrap();
    insert_subscription(&conn, "sub-ops", "active", "starter").await;
    drop(conn);

    let text = wait_for_metrics(&http, &base_url, "the row ready", &controller, |m| {
        metric_value(
            m,
            "vps_controller_subscriptions",
            &[("provisioning_status", "ready")],
        ) == Some(1.0)
    })
    .await;

    // One prefix, on every family.
    let families: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    for family in &families {
        assert!(
            family.starts_with("vps_controller_")
                && !family.contains("vps_controller_vps_controller"),
            "family {family} does not carry exactly one vps_controller_ prefix\n{text}"
        );
    }
    let missing: Vec<&&str> = FAMILIES
        .iter()
        .filter(|family| !families.contains(family))
        .collect();
    assert!(missing.is_empty(), "families missing: {missing:?}\n{text}");

    // Sane values after one subscription was provisioned.
    let at = |name: &str, labels: &[(&str, &str)]| {
        metric_value(&text, name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}\n{text}"))
    };
    assert!(
        text.lines()
            .any(|line| line.starts_with("vps_controller_build_info{")
                && line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
                && line.ends_with(" 1")),
        "{text}"
    );
    assert_eq!(at("vps_controller_leader", &[]), 1.0);
    assert!(at("vps_controller_reconciles_total", &[("result", "success")]) >= 1.0);
    assert!(at("vps_controller_reconcile_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(
        at(
            "vps_controller_hcloud_requests_total",
            &[("method", "POST"), ("path", "/servers"), ("code", "201")]
        ),
        1.0,
        "one server created"
    );
    assert_eq!(
        at(
            "vps_controller_hcloud_request_duration_seconds_count",
            &[("method", "POST"), ("path", "/servers")]
        ),
        1.0
    );
    assert!(at("vps_controller_workqueue_adds_total", &[("lane", "change")]) >= 1.0);
    assert!(
        at(
            "vps_controller_workqueue_queue_duration_seconds_count",
            &[("lane", "change")]
        ) >= 1.0
    );
    assert!(at("vps_controller_workqueue_work_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(
        at("vps_controller_workqueue_depth", &[("lane", "change")]),
        0.0
    );
    assert_eq!(
        at("vps_controller_workqueue_depth", &[("lane", "bulk")]),
        0.0
    );
    assert_eq!(
        at(
            "vps_controller_subscriptions",
            &[("provisioning_status", "pending")]
        ),
        0.0
    );
    assert_eq!(at("vps_controller_subscriptions_stuck", &[]), 0.0);
    assert_eq!(at("vps_controller_hcloud_rate_limited_total", &[]), 0.0);
    assert_eq!(
        at(
            "vps_controller_drift_repairs_total",
            &[("kind", "firewall")]
        ),
        0.0
    );
    assert_eq!(
        at(
            "vps_controller_orphans_deleted_total",
            &[("kind", "server")]
        ),
        0.0
    );
    assert_eq!(at("vps_controller_hcloud_budget_limit", &[]), 3600.0);
    assert!(at("vps_controller_hcloud_budget_remaining", &[]) > 3500.0);
    assert_eq!(at("vps_controller_resync_interval_seconds", &[]), 3600.0);
    let now = unix_now();
    for recent in [
        "vps_controller_hcloud_last_success_timestamp_seconds",
        "vps_controller_last_successful_resync_timestamp_seconds",
        "vps_controller_process_start_time_seconds",
    ] {
        let at = at(recent, &[]);
        assert!(
            now - 600.0 < at && at <= now + 1.0,
            "{recent} = {at}, now {now}"
        );
    }
    assert!(at("vps_controller_process_cpu_seconds_total", &[]) > 0.0);
    assert!(at("vps_controller_process_resident_memory_bytes", &[]) > 1e6);
    assert!(at("vps_controller_process_open_fds", &[]) >= 3.0);
    assert!(
        at("vps_controller_process_max_fds", &[]) >= at("vps_controller_process_open_fds", &[])
    );

    controller.terminate();
    let exit = controller.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(exit.code(), Some(0), "{}", controller.output());
    controller.assert_no_secret();

    // JSON logs: every line is one JSON object, no colour codes, and every line logged by a
    // reconcile names its subscription.
    let log = controller.stderr();
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log that is not a terminal"
    );
    let mut reconcile_lines = 0;
    for line in log.lines() {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        let target = event["target"].as_str().unwrap_or_default();
        let in_reconcile =
            event["span"]["name"] == "reconcile" || target.starts_with("vps_controller::reconcile");
        if in_reconcile {
            reconcile_lines += 1;
            let subscription = event["span"]["subscription"]
                .as_str()
                .or(event["subscription"].as_str());
            assert_eq!(
                subscription,
                Some("sub-ops"),
                "a reconcile line without its subscription: {line}"
            );
        }
    }
    assert!(
        reconcile_lines >= 5,
        "only {reconcile_lines} reconcile lines:\n{log}"
    );
}

#[tokio::test]
async fn a_hetzner_that_never_answers_fails_liveness_and_readiness_until_it_answers_again() {
    let sim_dir = tempfile::tempdir().unwrap();
    let (_simulator, sim_url) = spawn_simulator(sim_dir.path(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let (controller, base_url) = spawn_controller(
        dir.path(),
        &sim_url,
        SECRET_TOKEN,
        &["--resync-seconds", "1", "--hcloud-timeout-seconds", "1"],
        &[],
    )
    .await;
    let http = http_client();
    wait_for_probe(&http, &format!("{base_url}/readyz"), 200, &controller).await;
    wait_for_probe(&http, &format!("{base_url}/healthz"), 200, &controller).await;

    // Connections are accepted and never answered.
    arm_faults(&http, &sim_url, &serde_json::json!({"black_hole": true})).await;

    let why = wait_for_probe(&http, &format!("{base_url}/healthz"), 503, &controller).await;
    assert!(why.contains("without a finished resync"), "{why}");
    let why = wait_for_probe(&http, &format!("{base_url}/readyz"), 503, &controller).await;
    assert!(
        why.contains("Hetzner") && why.contains("transport_timeout"),
        "{why}"
    );
    let text = metrics(&http, &base_url).await;
    assert!(
        text.lines().any(
            |line| line.starts_with("vps_controller_hcloud_requests_total{")
                && line.contains("code=\"transport_timeout\"")
        ),
        "timeouts not counted:\n{text}"
    );
    // The probes turn on how long no resync finished; the failing resync logs once its
    // listing gives up (every retry timed out), which can come later.
    let logged = common::eventually(DEADLINE, || async {
        controller.stderr().contains("resync pass failed")
    })
    .await;
    assert!(logged, "{}", controller.output());

    clear_faults(&http, &sim_url).await;
    wait_for_probe(&http, &format!("{base_url}/healthz"), 200, &controller).await;
    wait_for_probe(&http, &format!("{base_url}/readyz"), 200, &controller).await;
    controller.assert_no_secret();
}

#[tokio::test]
async fn a_rejected_token_shows_in_metrics_logs_readiness_and_on_the_waiting_row() {
    let sim_dir = tempfile::tempdir().unwrap();
    let (_simulator, sim_url) = spawn_simulator(sim_dir.path(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = "wrong-token-Hq2vX9";
    let (controller, base_url) =
        spawn_controller(dir.path(), &sim_url, wrong, &["--resync-seconds", "1"], &[]).await;
    let conn = db::connect(&sqlite_url(dir.path())).await.unwrap();
    insert_subscription(&conn, "sub-waits", "active", "starter").await;
    drop(conn);
    let http = http_client();
    wait_for_metrics(&http, &base_url, "401s counted", &controller, |m| {
        metric_value(
            m,
            "vps_controller_hcloud_requests_total",
            &[("code", "unauthorized")],
        )
        .is_some_and(|n| n >= 1.0)
    })
    .await;
    let why = wait_for_probe(&http, &format!("{base_url}/readyz"), 503, &controller).await;
    assert!(why.contains("unauthorized"), "{why}");
    wait_for_metrics(
        &http,
        &base_url,
        "the reconcile error by reason",
        &controller,
        |m| {
            metric_value(
                m,
                "vps_controller_reconcile_errors_total",
                &[("reason", "unauthorized")],
            )
            .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = run_cli(dir.path(), &["status"], &[]);
        if status.stdout.contains("sub-waits") && status.stdout.contains("unauthorized") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the row never showed the rejected token\n{}\n{}",
            status.describe(),
            controller.output()
        );
        sleep(POLL).await;
    }
    let log = controller.stderr();
    assert!(log.contains("unauthorized"), "{log}");
    assert!(!log.contains(wrong), "the token reached the log:\n{log}");
}

#[test]
fn a_misconfigured_run_fails_before_it_creates_or_migrates_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let key = encryption_key();
    let database_url = sqlite_url(dir.path());
    let bad_config = dir.path().join("bad.yaml");
    std::fs::write(&bad_config, "resync_seconds: 0\n").unwrap();
    let config_arg = bad_config.to_string_lossy().into_owned();
    let db_file = dir.path().join("vps-controller.db");
    for (what, args, envs, names) in [
        (
            "no token",
            vec!["run", "--listen", "127.0.0.1:0"],
            vec![("VPS_CONTROLLER_ENCRYPTION_KEY", key.as_str())],
            "HCLOUD_TOKEN",
        ),
        (
            "a token with a line break inside",
            vec!["run", "--listen", "127.0.0.1:0"],
            vec![
                ("VPS_CONTROLLER_ENCRYPTION_KEY", key.as_str()),
                ("HCLOUD_TOKEN", "abc\ndef"),
            ],
            "whitespace",
        ),
        (
            "no encryption key",
            vec!["run", "--listen", "127.0.0.1:0"],
            vec![("HCLOUD_TOKEN", SECRET_TOKEN)],
            "VPS_CONTROLLER_ENCRYPTION_KEY",
        ),
        (
            "a bad config",
            vec!["run", "--listen", "127.0.0.1:0", "--config", &config_arg],
            vec![
                ("VPS_CONTROLLER_ENCRYPTION_KEY", key.as_str()),
                ("HCLOUD_TOKEN", SECRET_TOKEN),
            ],
            "resync_seconds",
        ),
    ] {
        let mut envs = envs;
        envs.push(("DATABASE_URL", database_url.as_str()));
        let ran = run_cli(dir.path(), &args, &envs);
        ran.assert_fails_naming(names);
        assert!(
            !db_file.exists(),
            "{what}: the database was created (and migrated) before the check failed"
        );
    }
}

#[test]
fn fatal_errors_are_json_in_json_mode_and_plain_without_colours_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let key = encryption_key();
    let envs = [("VPS_CONTROLLER_ENCRYPTION_KEY", key.as_str())];
    let ran = run_cli(
        dir.path(),
        &["--log-format", "json", "run", "--listen", "127.0.0.1:0"],
        &envs,
    );
    ran.assert_fails_naming("HCLOUD_TOKEN");
    let last = ran.stderr.lines().last().unwrap_or_default();
    let event: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the fatal error is not JSON ({e}):\n{}", ran.describe()));
    assert_eq!(event["level"], "ERROR", "{last}");
    assert!(
        event["message"]
            .as_str()
            .unwrap_or_default()
            .contains("HCLOUD_TOKEN"),
        "{last}"
    );
    for line in ran.stderr.lines() {
        serde_json::from_str::<Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    }

    let ran = run_cli(dir.path(), &["run", "--listen", "127.0.0.1:0"], &envs);
    ran.assert_fails_naming("HCLOUD_TOKEN");
    assert!(
        ran.stderr.contains("error: no Hetzner API token"),
        "{}",
        ran.describe()
    );
    assert!(
        !ran.stderr.contains('\u{1b}'),
        "colour codes: {}",
        ran.describe()
    );
}

#[test]
fn the_database_url_can_come_from_a_file_and_two_sources_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("database-url");
    std::fs::write(&url_file, format!("{}\n", sqlite_url(dir.path()))).unwrap();
    let url_file_arg = url_file.to_string_lossy().into_owned();
    run_cli(
        dir.path(),
        &["migrate"],
        &[("DATABASE_URL_FILE", &url_file_arg)],
    )
    .assert_code(0);
    assert!(dir.path().join("vps-controller.db").is_file());
    run_cli(
        dir.path(),
        &["status"],
        &[("DATABASE_URL_FILE", &url_file_arg)],
    )
    .assert_code(0);

    run_cli(
        dir.path(),
        &["migrate"],
        &[
            ("DATABASE_URL_FILE", &url_file_arg),
            ("DATABASE_URL", "sqlite://other.db?mode=rwc"),
        ],
    )
    .assert_fails_naming("DATABASE_URL_FILE, not both");
    assert!(!dir.path().join("other.db").exists());

    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    run_cli(
        dir.path(),
        &["migrate"],
        &[("DATABASE_URL_FILE", &empty.to_string_lossy())],
    )
    .assert_fails_naming("is empty");
}

/// README "Two replicas": SIGKILL the leader; the standby takes the lease once it expires and
/// provisions what was inserted meanwhile. Prints the measured failover time (the figure in
/// the README); the test asserts the takeover, not the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_when_the_leader_is_killed() {
    let Some(test_db) = common::postgres_or_skip("two replicas need PostgreSQL").await else {
        return;
    };
    let http = http_client();
    let sim_dir = tempfile::tempdir().unwrap();
    let (_simulator, sim_url) = spawn_simulator(sim_dir.path(), &["--action-seconds", "0.2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let envs = [("DATABASE_URL", test_db.url.as_str())];
    let (first, first_url) = spawn_controller(dir.path(), &sim_url, SECRET_TOKEN, &[], &envs).await;
    let leads = |url: &str| {
        let http = http.clone();
        let url = url.to_string();
        async move {
            metric_value(&metrics(&http, &url).await, "vps_controller_leader", &[]) == Some(1.0)
        }
    };
    assert!(
        common::eventually(DEADLINE, || leads(&first_url)).await,
        "{}",
        first.output()
    );
    let (second, second_url) =
        spawn_controller(dir.path(), &sim_url, SECRET_TOKEN, &[], &envs).await;
    assert!(!leads(&second_url).await, "two leaders at once");

    signal(&first, "-KILL");
    let killed = Instant::now();
    let conn = db::connect(&test_db.url).await.unwrap();
    insert_subscription(&conn, "after-failover", "active", "starter").await;
    assert!(
        common::eventually(DEADLINE, || leads(&second_url)).await,
        "{}",
        second.output()
    );
    let failover = killed.elapsed();
    let ready = common::eventually(DEADLINE, || async {
        db::subscriptions::get(&conn, "after-failover")
            .await
            .ok()
            .flatten()
            .is_some_and(|row| row.provisioning_status == "ready")
    })
    .await;
    assert!(ready, "{}", second.output());
    eprintln!(
        "failover: the standby led {:.1} s after the leader was killed (lease {} s)",
        failover.as_secs_f64(),
        vps_controller::controller::leader::LEASE_TTL.as_secs()
    );
    drop(conn);
    drop(first);
    drop(second);
    test_db.cleanup().await;
}
