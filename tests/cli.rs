//! The `vps-controller` binary end to end: every test runs the real executable as a
//! subprocess in a fresh temp dir with an environment cleared down to PATH and HOME, and
//! asserts what a user sees: exit codes, messages, files, HTTP probes, the status table.
//!
//! Every run sets HCLOUD_TOKEN (or the simulator's token) to [`SECRET_TOKEN`] where it can
//! matter, and every captured output is checked not to contain it.

mod common;

use common::process::*;

use std::time::Duration;

use sea_orm::ConnectionTrait;
use serde_json::Value;
use tokio::time::{Instant, sleep};

use vps_controller::db::{self, EventKind, events};

#[test]
fn migrate_without_database_url_creates_the_sqlite_file_and_can_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let db_file = dir.path().join("vps-controller.db");
    assert!(!db_file.exists());

    run_cli(dir.path(), &["migrate"], &[]).assert_code(0);
    assert!(db_file.is_file(), "migrate did not create {db_file:?}");
    run_cli(dir.path(), &["migrate"], &[]).assert_code(0);

    // The schema is there: `status` reads the (empty) table.
    let status = run_cli(dir.path(), &["status"], &[]);
    status.assert_code(0);
    let lines: Vec<&str> = status.stdout.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("installation: ") && l.len() == 30),
        "{}",
        status.describe()
    );
    assert_eq!(
        lines[1..],
        [
            "server deletions: allowed (0 in the last hour)",
            "",
            "ID  STATUS  PLAN  PROVISIONING  SERVER  IP  LAST ERROR"
        ],
        "{}",
        status.describe()
    );
}

#[tokio::test]
async fn migrate_with_database_url_works_on_every_backend_and_can_run_again() {
    for test_db in common::test_databases().await {
        let dir = tempfile::tempdir().unwrap();
        let env = [("DATABASE_URL", test_db.url.as_str())];
        for attempt in ["first", "second"] {
            let ran = run_cli(dir.path(), &["migrate"], &env);
            assert_eq!(
                ran.code,
                Some(0),
                "{} migrate on {}: {}",
                attempt,
                test_db.backend,
                ran.describe()
            );
        }
        let conn = db::connect(&test_db.url).await.unwrap();
        insert_subscription(&conn, "sub-1", "active", "starter").await;
        drop(conn);
        assert!(
            !dir.path().join("vps-controller.db").exists(),
            "{}: DATABASE_URL was ignored, the default SQLite file was created",
            test_db.backend
        );
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn status_shows_rows_with_their_errors_and_one_subscriptions_events() {
    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let dir = tempfile::tempdir().unwrap();
        let env = [("DATABASE_URL", test_db.url.as_str())];
        run_cli(dir.path(), &["migrate"], &env).assert_code(0);

        let conn = db::connect(&test_db.url).await.unwrap();
        insert_subscription(&conn, "sub-ok", "active", "starter").await;
        conn.execute_unprepared(
            "INSERT INTO subscriptions \
             (id, user_id, status, plan, provisioning_status, provisioning_error) \
             VALUES ('sub-bad', 'user-2', 'active', 'gold', 'failed', \
                     'unknown plan \"gold\"; configured plans: pro, starter')",
        )
        .await
        .unwrap();
        events::record(
            &conn,
            "sub-ok",
            EventKind::Normal,
            "ServerCreated",
            "server vps-sub-ok created",
        )
        .await
        .unwrap();
        events::record(
            &conn,
            "sub-ok",
            EventKind::Warning,
            "ApiUnavailable",
            "Hetzner answered 503; retrying",
        )
        .await
        .unwrap();
        events::record(&conn, "sub-bad", EventKind::Warning, "UnknownPlan", "gold")
            .await
            .unwrap();

        let table = run_cli(dir.path(), &["status"], &env);
        table.assert_code(0);
        let context = format!("{backend}: {}", table.describe());
        let header = table
            .stdout
            .lines()
            .find(|line| line.starts_with("ID "))
            .unwrap_or_default();
        for column in ["ID", "STATUS", "PLAN", "PROVISIONING", "LAST ERROR"] {
            assert!(header.contains(column), "{context}");
        }
        assert_eq!(
            status_row(&table.stdout, "sub-ok").as_deref(),
            Some(&["sub-ok", "active", "starter", "pending", "-", "-", "-"].map(String::from)[..]),
            "{context}"
        );
        let failed = table
            .stdout
            .lines()
            .find(|line| line.starts_with("sub-bad"))
            .unwrap_or_else(|| panic!("no sub-bad line; {context}"));
        assert!(failed.contains("failed"), "{context}");
        assert!(
            failed.contains("unknown plan \"gold\"; configured plans: pro, starter"),
            "{context}"
        );

        let events = run_cli(dir.path(), &["status", "sub-ok"], &env);
        events.assert_code(0);
        let context = format!("{backend}: {}", events.describe());
        let lines: Vec<&str> = events.stdout.lines().collect();
        assert_eq!(lines.len(), 3, "header and two events; {context}");
        for column in ["TIME", "KIND", "REASON", "MESSAGE"] {
            assert!(lines[0].contains(column), "{context}");
        }
        // Oldest first, and only this subscription's events.
        assert!(
            lines[1].contains("Normal") && lines[1].contains("ServerCreated"),
            "{context}"
        );
        assert!(lines[1].contains("server vps-sub-ok created"), "{context}");
        assert!(
            lines[2].contains("Warning") && lines[2].contains("ApiUnavailable"),
            "{context}"
        );
        assert!(!events.stdout.contains("UnknownPlan"), "{context}");

        drop(conn);
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn plan_against_the_simulator_exits_2_when_changes_are_pending_and_changes_nothing() {
    let sim_dir = tempfile::tempdir().unwrap();
    let (simulator, sim_url) = spawn_simulator(sim_dir.path(), &[]).await;
    let endpoint = format!("{sim_url}/v1");

    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let dir = tempfile::tempdir().unwrap();
        let env = [
            ("DATABASE_URL", test_db.url.as_str()),
            ("HCLOUD_ENDPOINT", endpoint.as_str()),
            ("HCLOUD_TOKEN", SECRET_TOKEN),
        ];
        run_cli(dir.path(), &["migrate"], &env).assert_code(0);

        let in_sync = run_cli(dir.path(), &["plan"], &env);
        in_sync.assert_code(0);
        assert!(
            in_sync
                .stdout
                .contains("0 subscriptions, 0 with changes pending"),
            "{backend}: {}",
            in_sync.describe()
        );

        let conn = db::connect(&test_db.url).await.unwrap();
        insert_subscription(&conn, "sub-1", "active", "starter").await;
        // Twice: the first `plan` must not have done any of it.
        for _ in 0..2 {
            let pending = run_cli(dir.path(), &["plan"], &env);
            pending.assert_code(2);
            let context = format!("{backend}: {}", pending.describe());
            assert!(pending.stdout.contains("sub-1: -> ready"), "{context}");
            for op in [
                "generate and seal a key pair",
                "create the SSH key",
                "create the firewall",
                "create the server",
            ] {
                assert!(pending.stdout.contains(op), "{op} missing; {context}");
            }
            assert!(
                pending
                    .stdout
                    .contains("1 subscriptions, 1 with changes pending"),
                "{context}"
            );
        }
        let status = run_cli(dir.path(), &["status"], &[("DATABASE_URL", &test_db.url)]);
        assert_eq!(
            status_row(&status.stdout, "sub-1").map(|cells| cells[3].clone()),
            Some("pending".to_owned()),
            "plan changed the row; {backend}: {}",
            status.describe()
        );

        // The same token from a file, with the newline editors leave, works too.
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{SECRET_TOKEN}\n")).unwrap();
        let from_file = run_cli(
            dir.path(),
            &["plan"],
            &[
                ("DATABASE_URL", test_db.url.as_str()),
                ("HCLOUD_ENDPOINT", endpoint.as_str()),
                ("HCLOUD_TOKEN_FILE", token_file.to_str().unwrap()),
            ],
        );
        from_file.assert_code(2);

        drop(conn);
        test_db.cleanup().await;
    }

    // Nothing was created, changed or deleted at "Hetzner".
    let stats: Value = http_client()
        .get(format!("{sim_url}/__simulator/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let by_endpoint = stats["by_endpoint"].as_object().unwrap();
    assert!(
        by_endpoint.keys().any(|key| key.starts_with("GET ")),
        "plan did not list anything: {stats}"
    );
    assert!(
        by_endpoint.keys().all(|key| key.starts_with("GET ")),
        "plan changed something at Hetzner: {stats}"
    );

    // A wrong token: an error naming the refusal, exit 1 (not 2, "changes pending").
    let dir = tempfile::tempdir().unwrap();
    run_cli(dir.path(), &["migrate"], &[]).assert_code(0);
    let refused = run_cli(
        dir.path(),
        &["plan"],
        &[
            ("HCLOUD_ENDPOINT", endpoint.as_str()),
            ("HCLOUD_TOKEN", "not-the-token"),
        ],
    );
    refused.assert_fails_naming("unauthorized");
    assert!(
        !refused.stderr.contains("not-the-token"),
        "{}",
        refused.describe()
    );

    simulator.assert_no_secret();
}

#[tokio::test]
async fn run_simulate_serves_probes_provisions_a_subscription_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut controller, base_url) = spawn_listening(
        |port| {
            let listen = format!("127.0.0.1:{port}");
            // The token is unused with --simulate; set so a leak would show.
            command(
                dir.path(),
                &["run", "--simulate", "--listen", &listen],
                &[("HCLOUD_TOKEN", SECRET_TOKEN)],
            )
        },
        "/readyz",
    )
    .await;
    assert!(dir.path().join("vps-controller.db").is_file());

    let http = http_client();
    let healthz = http
        .get(format!("{base_url}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), reqwest::StatusCode::OK);
    assert_eq!(healthz.text().await.unwrap().trim(), "ok");
    let metrics = http
        .get(format!("{base_url}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), reqwest::StatusCode::OK);
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("vps_controller_hcloud_budget_limit"),
        "{metrics}"
    );

    let conn = db::connect(&sqlite_url(dir.path())).await.unwrap();
    insert_subscription(&conn, "sub-1", "active", "starter").await;
    drop(conn);

    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = run_cli(dir.path(), &["status"], &[]);
        status.assert_code(0);
        let row = status_row(&status.stdout, "sub-1");
        if let Some(cells) = &row
            && cells[3] == "ready"
        {
            assert_ne!(cells[4], "-", "ready without a server id: {cells:?}");
            assert_ne!(cells[5], "-", "ready without an IP: {cells:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sub-1 not ready within {DEADLINE:?}: {row:?}\n{}",
            controller.output()
        );
        sleep(POLL).await;
    }

    controller.terminate();
    let exit = controller.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(exit.code(), Some(0), "{}", controller.output());

    let log = controller.stderr();
    assert!(log.contains("SIMULATION MODE"), "{log}");
    // README: the log tells the subscription's story, and the shutdown finishes.
    let mut rest = log.as_str();
    for step in [
        "KeyPairGenerated",
        "SshKeyCreated",
        "FirewallCreated",
        "ServerCreated",
        // Ready means reachable: the simulated server was logged in to first.
        "bootstrap finished",
        "\"Ready\"",
        "stopped",
    ] {
        let at = rest
            .find(step)
            .unwrap_or_else(|| panic!("{step} missing or out of order in the log:\n{log}"));
        rest = &rest[at + step.len()..];
    }
    assert!(
        !log.contains("PRIVATE KEY"),
        "private key in the log: {log}"
    );
    assert!(!log.contains("BEGIN"), "key material in the log: {log}");
    controller.assert_no_secret();
}

#[test]
fn run_without_a_token_names_hcloud_token() {
    let dir = tempfile::tempdir().unwrap();
    let key = encryption_key();
    run_cli(
        dir.path(),
        &["run", "--listen", "127.0.0.1:0"],
        &[("VPS_CONTROLLER_ENCRYPTION_KEY", &key)],
    )
    .assert_fails_naming("HCLOUD_TOKEN");
}

#[test]
fn run_without_an_encryption_key_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    run_cli(
        dir.path(),
        &["run", "--listen", "127.0.0.1:0"],
        &[("HCLOUD_TOKEN", SECRET_TOKEN)],
    )
    .assert_fails_naming("VPS_CONTROLLER_ENCRYPTION_KEY");
}

#[test]
fn run_with_a_bad_config_file_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let key = encryption_key();
    let zero_resync = dir.path().join("zero-resync.yaml");
    std::fs::write(&zero_resync, "resync_seconds: 0\n").unwrap();
    let unknown_field = dir.path().join("unknown-field.yaml");
    std::fs::write(
        &unknown_field,
        "plans:\n  starter:\n    server_type: cx23\n    image: ubuntu-24.04\n    \
         location: fsn1\n    firewall_rules: []\n    disk_colour: blue\n",
    )
    .unwrap();

    // Through the variable and through the flag.
    let ran = run_cli(
        dir.path(),
        &["run", "--listen", "127.0.0.1:0"],
        &[
            ("VPS_CONTROLLER_CONFIG", zero_resync.to_str().unwrap()),
            ("VPS_CONTROLLER_ENCRYPTION_KEY", &key),
            ("HCLOUD_TOKEN", SECRET_TOKEN),
        ],
    );
    ran.assert_fails_naming("resync_seconds");
    assert!(
        ran.stderr.contains("zero-resync.yaml"),
        "{}",
        ran.describe()
    );

    let ran = run_cli(
        dir.path(),
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--config",
            unknown_field.to_str().unwrap(),
        ],
        &[
            ("VPS_CONTROLLER_ENCRYPTION_KEY", &key),
            ("HCLOUD_TOKEN", SECRET_TOKEN),
        ],
    );
    ran.assert_fails_naming("disk_colour");
}

#[test]
fn simulator_rejects_a_fault_rate_above_one() {
    let dir = tempfile::tempdir().unwrap();
    run_cli(
        dir.path(),
        &["simulator", "--listen", "127.0.0.1:0", "--fault-rate", "2"],
        &[],
    )
    .assert_fails_naming("fault_rate");
}

#[test]
fn simulator_rejects_a_budget_time_scale_of_zero_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    run_cli(
        dir.path(),
        &[
            "simulator",
            "--listen",
            "127.0.0.1:0",
            "--budget-time-scale",
            "0",
        ],
        &[],
    )
    .assert_fails_naming("--budget-time-scale");
}

/// A faster budget against Hetzner itself would collect 429s: refused before anything starts,
/// through the flag and through the variable.
#[test]
fn run_refuses_a_budget_time_scale_against_hetzner() {
    let dir = tempfile::tempdir().unwrap();
    let key = encryption_key();
    let envs = [
        ("VPS_CONTROLLER_ENCRYPTION_KEY", key.as_str()),
        ("HCLOUD_TOKEN", SECRET_TOKEN),
    ];
    let ran = run_cli(
        dir.path(),
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--hcloud-budget-time-scale",
            "60",
        ],
        &envs,
    );
    ran.assert_fails_naming("--hcloud-budget-time-scale");
    assert!(
        ran.stderr.contains("api.hetzner.cloud"),
        "{}",
        ran.describe()
    );
    let mut with_variable = envs.to_vec();
    with_variable.push(("HCLOUD_BUDGET_TIME_SCALE", "60"));
    run_cli(
        dir.path(),
        &["run", "--listen", "127.0.0.1:0"],
        &with_variable,
    )
    .assert_fails_naming("HCLOUD_BUDGET_TIME_SCALE");
    // Nothing was started: not even the database file.
    assert!(!dir.path().join("vps-controller.db").exists());
}

/// With port 0 the simulator prints its endpoint on stdout, and that endpoint answers with the
/// budget it was given.
#[tokio::test]
async fn simulator_on_port_0_prints_its_endpoint_and_runs_a_scaled_budget() {
    let dir = tempfile::tempdir().unwrap();
    let child = ChildGuard::spawn(command(
        dir.path(),
        &[
            "simulator",
            "--listen",
            "127.0.0.1:0",
            "--rate-limit",
            "100",
            "--budget-time-scale",
            "60",
        ],
        &[],
    ));
    let deadline = Instant::now() + DEADLINE;
    let endpoint = loop {
        let stdout = std::fs::read_to_string(&child.stdout).unwrap_or_default();
        if let Some(line) = stdout.lines().next()
            && stdout.contains('\n')
        {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no endpoint on stdout\n{}",
            child.output()
        );
        sleep(POLL).await;
    };
    let root = endpoint
        .strip_suffix("/v1")
        .unwrap_or_else(|| panic!("endpoint {endpoint:?} does not end in /v1"));
    assert!(root.starts_with("http://127.0.0.1:"), "{endpoint}");
    assert!(!root.ends_with(":0"), "{endpoint}");
    let http = http_client();
    let stats: serde_json::Value = http
        .get(format!("{root}/__simulator/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["rate_limit"]["limit"], 100, "{stats}");
    assert_eq!(stats["rate_limit"]["time_scale"], 60.0, "{stats}");
    let answer = http
        .get(format!("{endpoint}/servers"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), reqwest::StatusCode::OK);
    assert_eq!(answer.headers()["ratelimit-limit"], "100");
}

/// The `hcloud request` log lines (JSON, debug) of writes that started at or after `at`:
/// each line is logged when the request ends, with how long it took.
fn writes_started_at_or_after(stderr: &str, at: chrono::DateTime<chrono::Utc>) -> Vec<String> {
    let started = |event: &Value| -> Option<chrono::DateTime<chrono::Utc>> {
        let ended: chrono::DateTime<chrono::Utc> = event["timestamp"].as_str()?.parse().ok()?;
        Some(ended - chrono::Duration::milliseconds(event["elapsed_ms"].as_i64()?))
    };
    let requests: Vec<Value> = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["message"] == "hcloud request")
        .collect();
    // Its start-up and resync listings at least: the lines are there to be checked.
    assert!(
        !requests.is_empty(),
        "the log shows the replica's requests (debug level on): {stderr}"
    );
    requests
        .iter()
        .filter(|event| event["method"] != "GET")
        .filter(|event| started(event).is_none_or(|started| started >= at))
        .map(Value::to_string)
        .collect()
}

/// Issue 7: a leader SIGSTOPped right after rows were activated, for longer than its lease,
/// wakes up after another replica took over and provisioned them. It must change nothing at
/// Hetzner and write no row (key pairs included): every stored private key keeps matching the
/// key its server was created with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_changes_nothing_after_waking() {
    let Some(test_db) = common::postgres_or_skip("two replicas need PostgreSQL").await else {
        return;
    };
    let http = http_client();
    let sim_dir = tempfile::tempdir().unwrap();
    let (_simulator, sim_url) = spawn_simulator(sim_dir.path(), &["--action-seconds", "0.2"]).await;
    let endpoint = format!("{sim_url}/v1");
    let dir = tempfile::tempdir().unwrap();
    let key = encryption_key();
    let env = [
        ("DATABASE_URL", test_db.url.as_str()),
        ("HCLOUD_ENDPOINT", endpoint.as_str()),
        ("HCLOUD_TOKEN", SECRET_TOKEN),
        ("VPS_CONTROLLER_ENCRYPTION_KEY", key.as_str()),
        ("VPS_CONTROLLER_RESYNC_SECONDS", "3"),
        // Every Hetzner request as a JSON line: when it ended and how long it took.
        ("VPS_CONTROLLER_LOG_FORMAT", "json"),
        ("RUST_LOG", "info,vps_controller::hcloud::client=debug"),
    ];
    run_cli(dir.path(), &["migrate"], &env).assert_code(0);
    let conn = db::connect(&test_db.url).await.unwrap();
    let replica = |port: u16| {
        let listen = format!("127.0.0.1:{port}");
        command(dir.path(), &["run", "--listen", &listen], &env)
    };
    let leads = |base_url: String| {
        let http = http.clone();
        async move { sample(&metrics(&http, &base_url).await, "vps_controller_leader") == Some(1.0) }
    };

    // Everything at Hetzner, as its API shows it.
    let at_hetzner = || async {
        let list = |kind| common::invariants::list(&http, &endpoint, kind);
        [
            list("servers").await.unwrap(),
            list("ssh_keys").await.unwrap(),
            list("firewalls").await.unwrap(),
        ]
    };

    let (first, first_url) = spawn_listening(replica, "/healthz").await;
    assert!(
        common::eventually(DEADLINE, || leads(first_url.clone())).await,
        "{}",
        first.output()
    );
    let (second, second_url) = spawn_listening(replica, "/healthz").await;

    for i in 0..8 {
        insert_subscription(&conn, &format!("r{i}"), "active", "starter").await;
    }
    // The leader is at work (RSA-4096 key pairs being generated) when it is frozen.
    let at_work = common::eventually(DEADLINE, || async {
        events::recent(&conn, None, 50)
            .await
            .unwrap()
            .iter()
            .any(|e| e.reason == "KeyPairGenerated")
    })
    .await;
    assert!(at_work, "{}", first.output());
    signal(&first, "-STOP");

    // The other replica takes over once the lease expired and provisions every row.
    let converged = common::eventually(DEADLINE, || async {
        let rows = vps_controller::db::subscriptions::all(&conn)
            .await
            .unwrap()
            .rows;
        rows.len() == 8 && rows.iter().all(|r| r.provisioning_status == "ready")
    })
    .await;
    assert!(converged, "{}", second.output());
    assert!(leads(second_url.clone()).await);
    let rows_before = vps_controller::db::subscriptions::all(&conn)
        .await
        .unwrap()
        .rows;
    let hetzner_before = at_hetzner().await;

    let woke_at = chrono::Utc::now();
    signal(&first, "-CONT");
    // Awake: it reports that it no longer leads, and the new leader finishes two more
    // resyncs meanwhile (time for any stale work of the old leader to show).
    let resyncs = |base_url: String| {
        let http = http.clone();
        async move {
            sample(
                &metrics(&http, &base_url).await,
                "vps_controller_pass_duration_seconds_count{pass=\"resync\"}",
            )
            .unwrap_or(0.0)
        }
    };
    let first_url_ = first_url.clone();
    let awake = common::eventually(DEADLINE, || {
        let http = http.clone();
        let url = first_url_.clone();
        async move { sample(&metrics(&http, &url).await, "vps_controller_leader") == Some(0.0) }
    })
    .await;
    assert!(awake, "{}", first.output());
    assert!(
        common::eventually(DEADLINE, || async {
            first
                .stderr()
                .contains("lost the lease: stopped reconciling")
        })
        .await,
        "the old leader says it stopped\n{}",
        first.output()
    );
    let start = resyncs(second_url.clone()).await;
    assert!(
        common::eventually(DEADLINE, || async {
            resyncs(second_url.clone()).await >= start + 2.0
        })
        .await,
        "{}",
        second.output()
    );

    // No write started after waking. Not counted at the simulator: a request whose bytes were
    // already leaving the process at the instant it froze arrives after it wakes (Hetzner
    // takes no fencing token to refuse it), but it started under the lease.
    let late = writes_started_at_or_after(&first.stderr(), woke_at);
    assert!(
        late.is_empty(),
        "the old leader started writes after waking: {late:?}\n{}",
        first.output()
    );
    // And what Hetzner holds did not change.
    assert_eq!(
        at_hetzner().await,
        hetzner_before,
        "Hetzner changed after the old leader woke\nold leader: {}\nnew leader: {}",
        first.output(),
        second.output()
    );
    let rows_after = vps_controller::db::subscriptions::all(&conn)
        .await
        .unwrap()
        .rows;
    assert_eq!(rows_after.len(), 8);
    for (before, after) in rows_before.iter().zip(&rows_after) {
        assert_eq!(
            before.ssh_private_key, after.ssh_private_key,
            "{}: key pair clobbered",
            after.id
        );
        assert_eq!(before.ssh_public_key, after.ssh_public_key, "{}", after.id);
        assert_eq!(
            before, after,
            "{}: row written after the lease was lost",
            after.id
        );
    }
    // Exactly one server, key and firewall per row, and every stored private key is the
    // pair of the key object its server was created with.
    let sealer = vps_controller::keys::Sealer::from_base64(&key, &[]).unwrap();
    let [servers, keys_at_hetzner, firewalls] = hetzner_before;
    assert_eq!(servers.len(), 8, "no duplicate server");
    assert_eq!(keys_at_hetzner.len(), 8, "no duplicate key");
    assert_eq!(firewalls.len(), 8, "no duplicate firewall");
    for row in &rows_after {
        let private = sealer
            .open(row.ssh_private_key.as_deref().unwrap(), &row.id)
            .unwrap();
        let blob = vps_controller::keys::public_blob_of_private(&private).unwrap();
        let at_hetzner = keys_at_hetzner
            .iter()
            .find(|k| k["id"].as_i64() == row.hetzner_ssh_key_id)
            .unwrap_or_else(|| panic!("{}: its key object is gone", row.id));
        assert_eq!(
            at_hetzner["public_key"]
                .as_str()
                .and_then(|k| k.split_whitespace().nth(1)),
            Some(blob.as_str()),
            "{}: the stored private key does not open its server",
            row.id
        );
    }
    first.assert_no_secret();
    second.assert_no_secret();
    drop(first);
    drop(second);
    test_db.cleanup().await;
}

/// A copied database (a laptop with a copy of production's SQLite file) refuses to run until
/// an operator renews its installation id; `retry` and `deletions` work on a fresh database.
#[test]
fn a_copied_database_refuses_to_run_until_renewed_and_the_operator_commands_work() {
    let original = tempfile::tempdir().unwrap();
    run_cli(original.path(), &["migrate"], &[]).assert_code(0);
    let shown = run_cli(original.path(), &["installation", "show"], &[]);
    shown.assert_code(0);
    assert!(
        shown.stdout.contains("bound to this database"),
        "{}",
        shown.describe()
    );
    let id = shown.stdout.split_whitespace().next().unwrap().to_string();

    let laptop = tempfile::tempdir().unwrap();
    // The whole database: the file and its write-ahead log.
    for file in [
        "vps-controller.db",
        "vps-controller.db-wal",
        "vps-controller.db-shm",
    ] {
        let from = original.path().join(file);
        if from.exists() {
            std::fs::copy(&from, laptop.path().join(file)).unwrap();
        }
    }
    let key = encryption_key();
    let env = [
        ("HCLOUD_TOKEN", SECRET_TOKEN),
        ("VPS_CONTROLLER_ENCRYPTION_KEY", key.as_str()),
        ("HCLOUD_ENDPOINT", "http://127.0.0.1:9/v1"),
    ];
    let refused = run_cli(laptop.path(), &["run", "--listen", "127.0.0.1:0"], &env);
    refused.assert_fails_naming("installation renew");
    assert!(refused.stderr.contains(&id), "{}", refused.describe());
    let renewed = run_cli(laptop.path(), &["installation", "renew"], &[]);
    renewed.assert_code(0);
    assert!(
        renewed.stdout.contains(&format!("was {id}")),
        "{}",
        renewed.describe()
    );
    let shown = run_cli(laptop.path(), &["installation", "show"], &[]);
    assert!(!shown.stdout.contains(&id) && shown.stdout.contains("bound to this database"));

    // The operator commands on the original.
    let status = run_cli(original.path(), &["deletions", "status"], &[]);
    status.assert_code(0);
    assert!(
        status.stdout.contains("not paused"),
        "{}",
        status.describe()
    );
    let approved = run_cli(
        original.path(),
        &["deletions", "approve", "--count", "5"],
        &[],
    );
    approved.assert_code(0);
    assert!(
        approved.stdout.contains("5 more may run"),
        "{}",
        approved.describe()
    );
    run_cli(original.path(), &["retry", "nobody"], &[])
        .assert_fails_naming("subscription \"nobody\" does not exist");
    let retried = run_cli(original.path(), &["retry", "--failed"], &[]);
    retried.assert_code(0);
    assert!(
        retried.stdout.contains("0 failed subscriptions"),
        "{}",
        retried.describe()
    );
    // Neither an id nor --failed: a usage error, not a silent no-op.
    run_cli(original.path(), &["retry"], &[]).assert_code(2);
}

/// At start, each plan's server type, location and image are looked up at Hetzner; a bad
/// one is reported once, naming the plan and the field, and the controller keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reports_plans_that_hetzner_does_not_know_once_at_start() {
    let sim_dir = tempfile::tempdir().unwrap();
    let (_simulator, sim_url) = spawn_simulator(sim_dir.path(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "plans:\n  gold:\n    server_type: cx999\n    image: ubuntu-24.04\n    location: fsn9\n    firewall_rules: []\n  \
         fine:\n    server_type: cx23\n    image: ubuntu-24.04\n    location: fsn1\n    firewall_rules: []\n",
    )
    .unwrap();
    let endpoint = format!("{sim_url}/v1");
    let key = encryption_key();
    let database = sqlite_url(dir.path());
    let config_path = config.display().to_string();
    let (mut controller, _url) = spawn_listening(
        |port| {
            let listen = format!("127.0.0.1:{port}");
            command(
                dir.path(),
                &["run", "--listen", &listen],
                &[
                    ("DATABASE_URL", database.as_str()),
                    ("HCLOUD_ENDPOINT", endpoint.as_str()),
                    ("HCLOUD_TOKEN", SECRET_TOKEN),
                    ("VPS_CONTROLLER_ENCRYPTION_KEY", key.as_str()),
                    ("VPS_CONTROLLER_CONFIG", config_path.as_str()),
                ],
            )
        },
        "/healthz",
    )
    .await;
    let wanted =
        "plans.gold: server_type \"cx999\" does not exist; location \"fsn9\" does not exist";
    let reported =
        common::eventually(DEADLINE, || async { controller.stderr().contains(wanted) }).await;
    assert!(reported, "{}", controller.output());
    assert_eq!(
        controller.stderr().matches("does not exist").count(),
        2,
        "once, and nothing about plan fine"
    );
    controller.terminate();
    assert!(controller.wait_exit(DEADLINE).await.success());
    controller.assert_no_secret();
}

/// Every operator command that needs the schema, with the argument it needs.
const OPERATOR_COMMANDS: &[&[&str]] = &[
    &["status"],
    &["status", "sub-1"],
    &["plan"],
    &["retry", "sub-1"],
    &["retry", "--failed"],
    &["deletions", "status"],
    &["deletions", "approve"],
    &["installation", "show"],
    &["installation", "keep"],
    &["installation", "renew"],
];

/// The names in `dir`, with the size of each file.
fn files_in(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let size = entry.metadata().unwrap().len();
            (entry.file_name().to_string_lossy().into_owned(), size)
        })
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn operator_commands_on_an_unmigrated_database_say_to_run_migrate_and_create_nothing() {
    const NEEDLE: &str = "run `vps-controller migrate` first";
    // No database at all (the default SQLite URL): said so, naming the file, and nothing is
    // left behind that the next command would take for a database.
    let dir = tempfile::tempdir().unwrap();
    for args in OPERATOR_COMMANDS {
        let ran = run_cli(dir.path(), args, &[]);
        ran.assert_fails_naming(NEEDLE);
        assert!(
            ran.stderr.contains("vps-controller.db") && ran.stderr.contains("does not exist"),
            "`{}`: {}",
            args.join(" "),
            ran.describe()
        );
        assert_eq!(
            files_in(dir.path()),
            [],
            "`{}` created files",
            args.join(" ")
        );
    }

    // An empty file (touched by hand, or left by an earlier version): not changed at all.
    std::fs::write(dir.path().join("vps-controller.db"), "").unwrap();
    for args in OPERATOR_COMMANDS {
        let ran = run_cli(dir.path(), args, &[]);
        ran.assert_fails_naming(NEEDLE);
        assert_eq!(
            files_in(dir.path()),
            [("vps-controller.db".to_string(), 0)],
            "`{}` wrote to the empty file",
            args.join(" ")
        );
    }

    // Every backend through DATABASE_URL; PostgreSQL: an empty database gets no table.
    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let dir = tempfile::tempdir().unwrap();
        for args in OPERATOR_COMMANDS {
            let ran = run_cli(dir.path(), args, &[("DATABASE_URL", &test_db.url)]);
            assert!(
                ran.code == Some(1) && ran.stderr.contains(NEEDLE),
                "{backend} `{}`: {}",
                args.join(" "),
                ran.describe()
            );
        }
        if let Some(sqlite_dir) = test_db.dir() {
            assert_eq!(files_in(sqlite_dir), [], "{backend}: a file was created");
        } else {
            let conn = db::connect(&test_db.url).await.unwrap();
            let tables = conn
                .query_one_raw(sea_orm::Statement::from_string(
                    conn.get_database_backend(),
                    "SELECT COUNT(*) AS n FROM information_schema.tables \
                     WHERE table_schema = current_schema()",
                ))
                .await
                .unwrap()
                .unwrap()
                .try_get::<i64>("", "n")
                .unwrap();
            assert_eq!(tables, 0, "{backend}: tables were created");
            drop(conn);
        }
        test_db.cleanup().await;
    }
}

#[tokio::test]
async fn a_schema_older_than_the_binary_is_refused_until_migrate_and_then_works() {
    let dir = tempfile::tempdir().unwrap();
    run_cli(dir.path(), &["migrate"], &[]).assert_code(0);
    let url = sqlite_url(dir.path());
    let conn = db::connect(&url).await.unwrap();
    // As if the database were migrated by the previous release: the newest migration missing.
    conn.execute_unprepared(&format!(
        "DELETE FROM {} WHERE version = (SELECT MAX(version) FROM {})",
        migration::MIGRATION_TABLE,
        migration::MIGRATION_TABLE
    ))
    .await
    .unwrap();
    drop(conn);
    let ran = run_cli(dir.path(), &["status"], &[]);
    ran.assert_fails_naming("run `vps-controller migrate` first");
    assert!(
        ran.stderr.contains("older than this vps-controller"),
        "{}",
        ran.describe()
    );
    run_cli(dir.path(), &["migrate"], &[]).assert_code(0);
    run_cli(dir.path(), &["status"], &[]).assert_code(0);
}

#[tokio::test]
async fn status_of_a_subscription_that_does_not_exist_fails_and_a_known_one_works() {
    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let dir = tempfile::tempdir().unwrap();
        let env = [("DATABASE_URL", test_db.url.as_str())];
        run_cli(dir.path(), &["migrate"], &env).assert_code(0);
        let conn = db::connect(&test_db.url).await.unwrap();
        insert_subscription(&conn, "sub-1", "active", "starter").await;
        events::record(
            &conn,
            "sub-1",
            EventKind::Normal,
            "ServerCreated",
            "server 100001 (vps-sub-1, cx23 ubuntu-24.04 in fsn1)",
        )
        .await
        .unwrap();
        // A subscription deleted from the table: its events outlive it.
        events::record(
            &conn,
            "sub-gone",
            EventKind::Normal,
            "ServerDeleted",
            "server 100002 deleted",
        )
        .await
        .unwrap();

        let unknown = run_cli(dir.path(), &["status", "no-such-sub"], &env);
        unknown.assert_fails_naming("subscription \"no-such-sub\" does not exist");
        assert_eq!(unknown.stdout, "", "{backend}: {}", unknown.describe());

        let known = run_cli(dir.path(), &["status", "sub-1"], &env);
        known.assert_code(0);
        assert!(
            known.stdout.contains("ServerCreated") && known.stdout.contains("server 100001"),
            "{backend}: {}",
            known.describe()
        );

        let gone = run_cli(dir.path(), &["status", "sub-gone"], &env);
        gone.assert_code(0);
        assert!(
            gone.stdout.contains("no longer exists") && gone.stdout.contains("server 100002"),
            "{backend}: {}",
            gone.describe()
        );

        run_cli(dir.path(), &["retry", "no-such-sub"], &env)
            .assert_fails_naming("subscription \"no-such-sub\" does not exist");
        drop(conn);
        test_db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_counts_only_real_changes_and_a_row_canceled_before_its_vps_settles() {
    for test_db in common::test_databases().await {
        let backend = test_db.backend;
        let env = common::env::env(&test_db).await;
        env.insert("live", "active", "starter").await;
        env.insert("never", "canceled", "starter").await;
        env.resync().await;
        let dir = tempfile::tempdir().unwrap();
        let endpoint = env.sim.base_url();
        let vars = [
            ("DATABASE_URL", test_db.url.as_str()),
            ("HCLOUD_ENDPOINT", endpoint.as_str()),
            ("HCLOUD_TOKEN", common::env::TOKEN),
        ];

        // Canceled before anything was created: done, and the event says why nothing went.
        let status = run_cli(dir.path(), &["status"], &vars);
        status.assert_code(0);
        assert_eq!(
            status_row(&status.stdout, "never").map(|cells| cells[3].clone()),
            Some("deprovisioned".to_owned()),
            "{backend}: {}",
            status.describe()
        );
        let events = run_cli(dir.path(), &["status", "never"], &vars);
        events.assert_code(0);
        assert!(
            events.stdout.contains("Deprovisioned") && events.stdout.contains("nothing to delete"),
            "{backend}: {}",
            events.describe()
        );

        let plan = |extra: &[&str]| {
            let mut args = vec!["plan"];
            args.extend_from_slice(extra);
            run_cli(dir.path(), &args, &vars)
        };
        let in_sync = plan(&[]);
        in_sync.assert_code(0);
        assert_eq!(
            in_sync.stdout,
            "2 subscriptions, 0 with changes pending\n",
            "{backend}: {}",
            in_sync.describe()
        );

        // A spec change that changes nothing (trialing runs like active): still in sync.
        env.set_status("live", "trialing").await;
        let no_op = plan(&[]);
        no_op.assert_code(0);
        assert_eq!(
            no_op.stdout,
            "2 subscriptions, 0 with changes pending\n",
            "{backend}: {}",
            no_op.describe()
        );

        // The plan's server type changed: reported, not counted (resizing is not automatic).
        let example =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml"))
                .unwrap();
        assert!(example.contains("server_type: cx23"));
        let config = dir.path().join("bigger.yaml");
        std::fs::write(
            &config,
            example.replace("server_type: cx23", "server_type: cx33"),
        )
        .unwrap();
        let report_only = plan(&["--config", config.to_str().unwrap()]);
        report_only.assert_code(0);
        let context = format!("{backend}: {}", report_only.describe());
        assert!(
            report_only.stdout.contains("live: nothing to change"),
            "{context}"
        );
        assert!(
            report_only.stdout.contains("report: server")
                && report_only.stdout.contains("the plan says cx33"),
            "{context}"
        );
        assert!(
            report_only
                .stdout
                .ends_with("2 subscriptions, 0 with changes pending\n"),
            "{context}"
        );

        // A real change still counts: paused powers the server off.
        env.set_status("live", "paused").await;
        let pending = plan(&[]);
        pending.assert_code(2);
        let context = format!("{backend}: {}", pending.describe());
        assert!(pending.stdout.contains("live: -> suspended"), "{context}");
        assert!(pending.stdout.contains("power off server"), "{context}");
        assert!(
            pending
                .stdout
                .ends_with("2 subscriptions, 1 with changes pending\n"),
            "{context}"
        );
        test_db.cleanup().await;
    }
}

/// Every environment variable the controller's source (src/) reads: clap's `env = "..."`,
/// `std::env::var("...")` / `var_os("...")`, and the `ENV_*` constants that keys.rs reads the
/// encryption keys through. Plus RUST_LOG, which tracing-subscriber's `EnvFilter` reads
/// without the name appearing in our source. `option_env!` is read at build time: not listed.
fn variables_the_source_reads() -> std::collections::BTreeSet<String> {
    fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    rust_files(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut names = std::collections::BTreeSet::from(["RUST_LOG".to_string()]);
    for file in files {
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            let reads = ["env::var(", "env::var_os(", "env = \"", "const ENV_"]
                .iter()
                .any(|pattern| line.contains(pattern));
            if !reads {
                continue;
            }
            // The quoted SCREAMING_CASE literals on the line.
            for (i, literal) in line.split('"').enumerate() {
                if i % 2 == 1
                    && literal.len() > 1
                    && literal
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                {
                    names.insert(literal.to_string());
                }
            }
        }
    }
    names
}

/// Whether `text` names the variable `name` as a word (HCLOUD_TOKEN_FILE does not name
/// HCLOUD_TOKEN).
fn mentions(text: &str, name: &str) -> bool {
    let part_of_name = |c: char| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_';
    text.match_indices(name).any(|(at, _)| {
        !text[..at].ends_with(part_of_name) && !text[at + name.len()..].starts_with(part_of_name)
    })
}

#[test]
fn run_help_names_every_environment_variable_the_source_reads() {
    assert!(mentions("set HCLOUD_TOKEN.", "HCLOUD_TOKEN"));
    assert!(!mentions("[env: HCLOUD_TOKEN_FILE=]", "HCLOUD_TOKEN"));
    let names = variables_the_source_reads();
    // The scan itself must find what we know is read, or it would prove nothing.
    for known in [
        "DATABASE_URL",
        "DATABASE_URL_FILE",
        "HCLOUD_TOKEN",
        "HCLOUD_TOKEN_FILE",
        "NO_COLOR",
        "VPS_CONTROLLER_ENCRYPTION_KEY",
        "VPS_CONTROLLER_ENCRYPTION_KEY_FILE",
        "VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS",
    ] {
        assert!(names.contains(known), "the scan missed {known}: {names:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let help = run_cli(dir.path(), &["run", "--help"], &[]);
    help.assert_code(0);
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| !mentions(&help.stdout, name))
        .collect();
    assert!(
        missing.is_empty(),
        "`run --help` does not name {missing:?}\n{}",
        help.describe()
    );

    // `plan` reads the token and the log variables too, but never an encryption key.
    let help = run_cli(dir.path(), &["plan", "--help"], &[]);
    help.assert_code(0);
    for name in ["HCLOUD_TOKEN", "HCLOUD_TOKEN_FILE", "RUST_LOG", "NO_COLOR"] {
        assert!(mentions(&help.stdout, name), "{name}\n{}", help.describe());
    }
    assert!(
        !help.stdout.contains("ENCRYPTION_KEY"),
        "{}",
        help.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_events_name_resources_as_people_do() {
    let test_db = common::sqlite_db();
    let env = common::env::env(&test_db).await;
    env.insert("web-1", "active", "starter").await;
    env.resync().await;
    let key_id = env.row("web-1").await.hetzner_ssh_key_id.unwrap();
    // Someone strips the key's labels at Hetzner: the next resync puts them back.
    let (code, _) = env
        .api(
            "PUT",
            &format!("/ssh_keys/{key_id}"),
            Some(serde_json::json!({"labels": {}})),
        )
        .await;
    assert_eq!(code, 200);
    env.resync().await;

    let dir = tempfile::tempdir().unwrap();
    let events = run_cli(
        dir.path(),
        &["status", "web-1"],
        &[("DATABASE_URL", &test_db.url)],
    );
    events.assert_code(0);
    let context = events.describe();
    let line = |reason: &str| {
        events
            .stdout
            .lines()
            .find(|line| line.contains(reason))
            .unwrap_or_else(|| panic!("no {reason} event\n{context}"))
            .to_owned()
    };
    assert!(
        line("SshKeyCreated").ends_with(&format!("SSH key {key_id} (vps-web-1)")),
        "{context}"
    );
    assert!(
        line("LabelsRepaired").ends_with(&format!("SSH key {key_id}: labels set")),
        "{context}"
    );
    // No identifier or Debug output in what people read (reasons are CamelCase ids).
    for noise in ["ssh_key", "Some(", "None"] {
        assert!(!events.stdout.contains(noise), "{noise:?} in\n{context}");
    }
}

#[tokio::test]
async fn the_simulators_start_line_has_plain_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (simulator, sim_url) = spawn_simulator(dir.path(), &[]).await;
    let log = simulator.stderr();
    let line = log
        .lines()
        .find(|line| line.contains("simulator listening"))
        .unwrap_or_else(|| panic!("no start line\n{log}"));
    let port = sim_url.rsplit(':').next().unwrap();
    assert!(
        line.contains(&format!("addr=127.0.0.1:{port}")) && line.contains("token_required=true"),
        "{line}"
    );
    assert!(
        !line.contains("Some(") && !line.contains("SimulatorConfig"),
        "{line}"
    );
    simulator.assert_no_secret();
}
