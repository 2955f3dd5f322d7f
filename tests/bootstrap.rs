//! Ready means reachable: a new server is `ready` only after the controller logged in over SSH
//! with the subscription's key, saw cloud-init finish and applied the plan's bootstrap. Driven
//! pass by pass against the simulator's SSH endpoint (each server answers on a loopback
//! address of its own), on SQLite and PostgreSQL; and one crash test with the real
//! executables: `vps-controller run` against `vps-controller simulator`, killed between two
//! bootstrap steps.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::env::{Env, Options, env_custom};
use common::process::metric_value;
use vps_controller::config::{Bootstrap, BootstrapStep, Config, SshSettings, Upload};
use vps_controller::db::events;
use vps_controller::keys::KeyAlgorithm;

/// How long a test waits for something the controller does on its own (a bootstrap).
const DEADLINE: Duration = Duration::from_secs(60);

const MOTD: &str = "Welcome, {{not substituted}} 'quoted' text\n";

fn bootstrap() -> Bootstrap {
    Bootstrap {
        version: "1".into(),
        steps: vec![
            BootstrapStep::Upload(Upload {
                path: "/etc/motd".into(),
                mode: "0640".into(),
                content: MOTD.into(),
            }),
            BootstrapStep::Run("systemctl enable --now my-agent".into()),
        ],
    }
}

fn config(concurrency: usize) -> Config {
    let mut config = Config {
        ssh_key_algorithm: KeyAlgorithm::Ed25519,
        shutdown_timeout_seconds: 0,
        ssh: SshSettings {
            concurrency,
            connect_timeout_seconds: 5,
            cloud_init_timeout_seconds: 30,
            command_timeout_seconds: 10,
            ..SshSettings::default()
        },
        ..Config::builtin()
    };
    for plan in config.plans.values_mut() {
        plan.bootstrap = Some(bootstrap());
    }
    config
}

async fn each_backend<F, Fut>(concurrency: usize, test: F)
where
    F: Fn(Env) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for test_db in common::test_databases().await {
        let env = env_custom(
            &test_db,
            Options {
                config: config(concurrency),
                ..Options::default()
            },
        )
        .await;
        test(env).await;
        test_db.cleanup().await;
    }
}

async fn sim_get(env: &Env, path: &str) -> Value {
    let url = format!("http://{}{path}", env.sim.addr());
    let response = env.http.get(url).send().await.unwrap();
    assert!(response.status().is_success(), "GET {path}");
    response.json().await.unwrap()
}

async fn sim_post(env: &Env, path: &str, body: Value) {
    let url = format!("http://{}{path}", env.sim.addr());
    let response = env.http.post(url).json(&body).send().await.unwrap();
    assert!(response.status().is_success(), "POST {path}");
}

async fn sim_delete(env: &Env, path: &str) {
    let url = format!("http://{}{path}", env.sim.addr());
    let response = env.http.delete(url).send().await.unwrap();
    assert!(response.status().is_success(), "DELETE {path}");
}

/// What the simulated server of `id` saw over SSH.
async fn ssh_log(env: &Env, id: &str) -> Value {
    let server = env.row(id).await.hetzner_server_id.expect("a server");
    sim_get(env, &format!("/__simulator/servers/{server}/ssh")).await
}

fn commands<'a>(log: &'a Value, starting: &str) -> Vec<&'a Value> {
    log["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["command"].as_str().unwrap().starts_with(starting))
        .collect()
}

/// Runs change passes until `done` holds for the row of `id` (the bootstrap runs on its own
/// tasks and asks for the pass that settles the row).
async fn drive_until<F>(
    env: &Env,
    id: &str,
    what: &str,
    done: F,
) -> vps_controller::db::entities::subscription::Model
where
    F: Fn(&vps_controller::db::entities::subscription::Model) -> bool,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let _ = env.controller.process_changes().await;
        let row = env.row(id).await;
        if done(&row) {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "[{}] {id}: {what} did not happen; row: {} {:?}",
            env.backend,
            row.provisioning_status,
            row.provisioning_error
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscription_is_ready_only_after_cloud_init_finished_and_the_bootstrap_ran() {
    each_backend(4, |env| async move {
        // cloud-init is still running on every new server.
        sim_post(
            &env,
            "/__simulator/ssh/faults",
            json!({"cloud_init": "running"}),
        )
        .await;
        env.insert("boot-1", "active", "starter").await;
        env.resync().await;

        let row = env.row("boot-1").await;
        assert_eq!(row.provisioning_status, "provisioning", "[{}]", env.backend);
        let server = row.hetzner_server_id.expect("server created");
        let (_, at_hetzner) = env.api("GET", &format!("/servers/{server}"), None).await;
        assert_eq!(at_hetzner["server"]["status"], "running");
        // The host key the controller expects was pinned before the create.
        let pinned = row.ssh_host_key.clone().expect("host key pinned at create");

        // The controller is waiting in `cloud-init status --wait`; nothing else ran.
        let waiting = common::eventually(DEADLINE, || async {
            let log = ssh_log(&env, "boot-1").await;
            commands(&log, "cloud-init status --wait")
                .iter()
                .any(|c| c["exit_status"].is_null())
        })
        .await;
        assert!(
            waiting,
            "[{}] the controller never waited for cloud-init",
            env.backend
        );
        // Waiting costs Hetzner nothing: change passes and a resync leave the row alone.
        env.reset_stats().await;
        for _ in 0..3 {
            env.process_changes().await;
        }
        env.resync().await;
        let stats = env.stats().await;
        assert_eq!(
            stats["total"].as_u64(),
            Some(3),
            "[{}] only the resync's three listings while the bootstrap waits: {stats}",
            env.backend
        );
        let row = env.row("boot-1").await;
        assert_eq!(
            row.provisioning_status, "provisioning",
            "[{}] not ready while cloud-init runs",
            env.backend
        );
        let log = ssh_log(&env, "boot-1").await;
        assert!(log["files"].as_object().unwrap().is_empty(), "{log}");
        let blob = |line: &str| line.split_whitespace().nth(1).map(str::to_owned);
        assert_eq!(
            log["host_key"].as_str().and_then(blob),
            blob(&pinned),
            "the server presents the host key the controller gave cloud-init: {log}"
        );

        // cloud-init finishes: the bootstrap runs, then the row is ready.
        sim_delete(&env, "/__simulator/ssh/faults").await;
        let row = drive_until(&env, "boot-1", "ready", |r| {
            r.provisioning_status == "ready"
        })
        .await;
        assert!(
            row.provisioning_error.is_none(),
            "{:?}",
            row.provisioning_error
        );
        assert!(row.provisioned_at.is_some());
        let address = row.vps_ip_address.clone().unwrap();
        assert!(address.starts_with("127."), "{address}");

        let log = ssh_log(&env, "boot-1").await;
        let motd = &log["files"]["/etc/motd"];
        assert_eq!(motd["content"], MOTD, "{log}");
        assert_eq!(motd["mode"], "0640", "{log}");
        assert_eq!(motd["writes"], 1, "{log}");
        assert_eq!(
            commands(&log, "systemctl enable --now my-agent").len(),
            1,
            "{log}"
        );
        assert_eq!(
            log["files"]["/var/lib/vps-controller/bootstrap"]["content"],
            "version=1\nsteps_done=2\n",
            "{log}"
        );
        let reasons = env.event_reasons("boot-1").await;
        assert!(reasons.contains(&"Bootstrapped".to_string()), "{reasons:?}");
        assert!(reasons.contains(&"Ready".to_string()), "{reasons:?}");
        let metrics = env.controller.metrics.render();
        assert_eq!(
            metric_value(
                &metrics,
                "vps_controller_ssh_bootstraps_total",
                &[("result", "success")]
            ),
            Some(1.0),
            "{metrics}"
        );

        // Converged: later passes log in no more and change nothing.
        let sessions = log["sessions"].as_u64().unwrap();
        env.resync().await;
        env.process_changes().await;
        assert_eq!(
            ssh_log(&env, "boot-1").await["sessions"].as_u64(),
            Some(sessions)
        );
        assert_eq!(env.row("boot-1").await.provisioning_status, "ready");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_init_failure_shows_on_the_row_and_is_retried_until_it_succeeds() {
    each_backend(4, |env| async move {
        sim_post(
            &env,
            "/__simulator/ssh/faults",
            json!({"cloud_init": "error"}),
        )
        .await;
        env.insert("boot-2", "active", "starter").await;
        env.resync().await;
        let row = drive_until(&env, "boot-2", "the failure on the row", |r| {
            r.provisioning_error
                .as_deref()
                .is_some_and(|e| e.contains("cloud-init"))
        })
        .await;
        assert_eq!(
            row.provisioning_status, "provisioning",
            "[{}] a failed cloud-init is retried, not terminal: {:?}",
            env.backend, row.provisioning_error
        );
        // Retried on its own (the controller's backoff), still failing, and the retries cost
        // Hetzner nothing.
        env.reset_stats().await;
        let retried = common::eventually(DEADLINE, || async {
            let _ = env.controller.process_changes().await;
            commands(&ssh_log(&env, "boot-2").await, "cloud-init status --wait").len() >= 2
        })
        .await;
        assert!(retried, "[{}] the bootstrap was not retried", env.backend);
        let stats = env.stats().await;
        assert_eq!(
            stats["total"].as_u64(),
            Some(0),
            "[{}] {stats}",
            env.backend
        );
        let error = env
            .row("boot-2")
            .await
            .provisioning_error
            .unwrap_or_default();
        assert!(error.contains("attempt"), "says which attempt: {error}");
        assert!(
            env.event_reasons("boot-2")
                .await
                .contains(&"Retrying".to_string())
        );
        let server = row.hetzner_server_id.unwrap();
        let (status, _) = env.api("GET", &format!("/servers/{server}"), None).await;
        assert_eq!(
            status, 200,
            "nothing is deleted on account of a failed bootstrap"
        );

        sim_delete(&env, "/__simulator/ssh/faults").await;
        let row = drive_until(&env, "boot-2", "ready", |r| {
            r.provisioning_status == "ready"
        })
        .await;
        assert_eq!(row.provisioning_error, None);
        assert_eq!(row.hetzner_server_id, Some(server), "the same server");
        let log = ssh_log(&env, "boot-2").await;
        assert_eq!(
            commands(&log, "systemctl enable --now my-agent").len(),
            1,
            "{log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_host_key_stops_the_bootstrap_and_alarms() {
    each_backend(4, |env| async move {
        sim_post(
            &env,
            "/__simulator/ssh/faults",
            json!({"wrong_host_key": true}),
        )
        .await;
        env.insert("boot-3", "active", "starter").await;
        env.resync().await;
        let row = drive_until(&env, "boot-3", "failed", |r| {
            r.provisioning_status == "failed"
        })
        .await;
        let error = row.provisioning_error.clone().unwrap_or_default();
        assert!(error.contains("host key"), "[{}] {error}", env.backend);
        assert!(error.contains("SHA256:"), "names the keys: {error}");
        let reasons = env.event_reasons("boot-3").await;
        assert!(
            reasons.contains(&"HostKeyMismatch".to_string()),
            "{reasons:?}"
        );
        let metrics = env.controller.metrics.render();
        assert_eq!(
            metric_value(
                &metrics,
                "vps_controller_ssh_bootstraps_total",
                &[("result", "host_key_mismatch")]
            ),
            Some(1.0),
            "{metrics}"
        );
        // Nothing was sent to the impostor: no login, no command, no file.
        let log = ssh_log(&env, "boot-3").await;
        assert_eq!(log["sessions"], 0, "{log}");
        assert!(log["commands"].as_array().unwrap().is_empty(), "{log}");
        // Stopped: later passes do not try again, and the server is kept.
        env.resync().await;
        env.process_changes().await;
        assert_eq!(ssh_log(&env, "boot-3").await["sessions"], 0);
        assert_eq!(env.row("boot-3").await.provisioning_status, "failed");
        let (status, _) = env
            .api(
                "GET",
                &format!("/servers/{}", row.hetzner_server_id.unwrap()),
                None,
            )
            .await;
        assert_eq!(status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_subscriptions_bootstrap_with_at_most_the_configured_sessions_at_once() {
    // SQLite only: the bound is the bootstrapper's, not the database's.
    let test_db = common::sqlite_db();
    let env = env_custom(
        &test_db,
        Options {
            config: config(3),
            ..Options::default()
        },
    )
    .await;
    for i in 0..100 {
        env.insert(&format!("many-{i:03}"), "active", "starter")
            .await;
    }
    env.resync().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let _ = env.controller.process_changes().await;
        let ready = vps_controller::db::subscriptions::all(&env.db)
            .await
            .unwrap()
            .rows
            .iter()
            .filter(|r| r.provisioning_status == "ready")
            .count();
        if ready == 100 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {ready} of 100 ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ssh = sim_get(&env, "/__simulator/ssh").await;
    let max = ssh["max_active_sessions"].as_u64().unwrap();
    assert!(
        (1..=3).contains(&max),
        "at most ssh.concurrency = 3 sessions at once: {ssh}"
    );
    assert_eq!(ssh["auth_failures"], 0, "{ssh}");
    let metrics = env.controller.metrics.render();
    assert_eq!(
        metric_value(
            &metrics,
            "vps_controller_ssh_bootstraps_total",
            &[("result", "success")]
        ),
        Some(100.0),
        "one bootstrap per server: {metrics}"
    );
    for i in [0, 50, 99] {
        let log = ssh_log(&env, &format!("many-{i:03}")).await;
        assert_eq!(log["files"]["/etc/motd"]["writes"], 1, "{log}");
    }
    test_db.cleanup().await;
}

/// `run` against `vps-controller simulator` (as the README starts them), killed with SIGKILL
/// while a bootstrap step runs: the next start resumes after the last step done. Steps done
/// are not repeated; the step that was running is, which is why steps should be idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_bootstrap_steps_resumes_without_repeating_the_steps_done() {
    use common::process::{
        DEADLINE as PROCESS_DEADLINE, SECRET_TOKEN, command, encryption_key, http_client,
        insert_subscription, run_cli, spawn_listening, spawn_simulator, sqlite_url,
    };
    let http = http_client();
    let sim_dir = tempfile::tempdir().unwrap();
    let (_simulator, sim_url) = spawn_simulator(sim_dir.path(), &["--action-seconds", "0.2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "ssh_key_algorithm: ed25519\n\
         ssh: {connect_timeout_seconds: 10, command_timeout_seconds: 120}\n\
         plans:\n  starter:\n    server_type: cx23\n    image: ubuntu-24.04\n    location: fsn1\n    firewall_rules: []\n    \
         bootstrap:\n      version: \"7\"\n      steps:\n        \
         - upload: {path: /etc/one, mode: \"0600\", content: \"first\\n\"}\n        \
         - run: echo step-two\n        \
         - run: echo step-three\n        \
         - upload: {path: /etc/four, mode: \"0644\", content: \"last\\n\"}\n",
    )
    .unwrap();
    // Every server hangs in the third step until this is lifted.
    let faults = http
        .post(format!("{sim_url}/__simulator/ssh/faults"))
        .json(&json!({"hang_command": "step-three"}))
        .send()
        .await
        .unwrap();
    assert!(faults.status().is_success());

    let endpoint = format!("{sim_url}/v1");
    let key = encryption_key();
    let database = sqlite_url(dir.path());
    let config_path = config.display().to_string();
    let env = [
        ("DATABASE_URL", database.as_str()),
        ("HCLOUD_ENDPOINT", endpoint.as_str()),
        ("HCLOUD_TOKEN", SECRET_TOKEN),
        ("VPS_CONTROLLER_ENCRYPTION_KEY", key.as_str()),
        ("VPS_CONTROLLER_CONFIG", config_path.as_str()),
    ];
    run_cli(dir.path(), &["migrate"], &env).assert_code(0);
    let conn = vps_controller::db::connect(&database).await.unwrap();
    insert_subscription(&conn, "crash-1", "active", "starter").await;
    let controller = |port: u16| {
        let listen = format!("127.0.0.1:{port}");
        command(dir.path(), &["run", "--listen", &listen], &env)
    };
    let ssh_log = |server: i64| {
        let http = http.clone();
        let url = format!("{sim_url}/__simulator/servers/{server}/ssh");
        async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let row = || async {
        vps_controller::db::subscriptions::get(&conn, "crash-1")
            .await
            .unwrap()
            .unwrap()
    };

    let (mut first, _) = spawn_listening(controller, "/healthz").await;
    let in_step_three = common::eventually(PROCESS_DEADLINE, || async {
        let Some(server) = row().await.hetzner_server_id else {
            return false;
        };
        commands(&ssh_log(server).await, "echo step-three")
            .iter()
            .any(|c| c["exit_status"].is_null())
    })
    .await;
    assert!(in_step_three, "never reached step 3\n{}", first.output());
    assert_eq!(row().await.provisioning_status, "provisioning");
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    drop(first);

    let lifted = http
        .delete(format!("{sim_url}/__simulator/ssh/faults"))
        .send()
        .await
        .unwrap();
    assert!(lifted.status().is_success());
    let (second, _) = spawn_listening(controller, "/healthz").await;
    let ready = common::eventually(PROCESS_DEADLINE, || async {
        row().await.provisioning_status == "ready"
    })
    .await;
    assert!(ready, "not ready after the restart\n{}", second.output());

    let server = row().await.hetzner_server_id.unwrap();
    let log = ssh_log(server).await;
    assert_eq!(
        log["files"]["/etc/one"]["writes"], 1,
        "step 1 not repeated: {log}"
    );
    assert_eq!(
        commands(&log, "echo step-two").len(),
        1,
        "step 2 not repeated: {log}"
    );
    assert_eq!(
        commands(&log, "echo step-three").len(),
        2,
        "step 3, interrupted, ran again: {log}"
    );
    assert_eq!(log["files"]["/etc/four"]["writes"], 1, "{log}");
    assert_eq!(log["files"]["/etc/four"]["mode"], "0644", "{log}");
    assert_eq!(
        log["files"]["/var/lib/vps-controller/bootstrap"]["content"], "version=7\nsteps_done=4\n",
        "{log}"
    );
    let bootstrapped = events::recent(&conn, Some("crash-1"), 50)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.reason == "Bootstrapped")
        .expect("a Bootstrapped event");
    assert!(
        bootstrapped.message.contains("2 steps run, 2 done before"),
        "{}",
        bootstrapped.message
    );
    second.assert_no_secret();

    // Break-glass: the operator gets the key and the pinned host key, the access is recorded,
    // and the printed command logs in with OpenSSH's own client, checking the host key.
    let keys_dir = tempfile::tempdir().unwrap();
    let keys_dir_arg = keys_dir.path().display().to_string();
    let unknown = run_cli(dir.path(), &["ssh", "nobody", "--reason", "test"], &env);
    unknown.assert_fails_naming("does not exist");
    let access = run_cli(
        dir.path(),
        &[
            "ssh",
            "crash-1",
            "--reason",
            "ticket 42",
            "--dir",
            &keys_dir_arg,
        ],
        &env,
    );
    access.assert_code(0);
    let row = row().await;
    let command = access.stdout.trim().to_owned();
    let port = common::process::simulator_ssh_port(&sim_url).expect("a simulator with SSH");
    assert!(
        command.contains(&format!("-p {port}"))
            && command.contains("StrictHostKeyChecking=yes")
            && command.ends_with(&format!("root@{}", row.vps_ip_address.clone().unwrap())),
        "{command}"
    );
    let made: Vec<_> = std::fs::read_dir(keys_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(made.len(), 1, "one new directory: {made:?}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&made[0]), 0o700);
    let key_file = made[0].join("id");
    assert_eq!(mode(&key_file), 0o600);
    let private = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(
        vps_controller::keys::public_blob_of_private(&private).ok(),
        row.ssh_public_key
            .as_deref()
            .and_then(|line| line.split_whitespace().nth(1))
            .map(str::to_owned),
        "the key file holds the subscription's private key"
    );
    let known_hosts = std::fs::read_to_string(made[0].join("known_hosts")).unwrap();
    assert!(
        known_hosts.contains(
            row.ssh_host_key
                .as_deref()
                .unwrap()
                .split_whitespace()
                .nth(1)
                .unwrap()
        ),
        "{known_hosts}"
    );
    assert!(!access.stdout.contains("PRIVATE KEY") && !access.stderr.contains("PRIVATE KEY"));
    let audit = events::recent(&conn, Some("crash-1"), 50)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.reason == "BreakGlassAccess")
        .expect("the access is recorded");
    assert!(audit.message.contains("ticket 42"), "{}", audit.message);
    assert_eq!(audit.kind, "Warning");

    let mut words: Vec<String> = command
        .split_whitespace()
        .map(|w| w.trim_matches('\'').to_owned())
        .collect();
    words.extend([
        "-o".into(),
        "BatchMode=yes".into(),
        "cloud-init status".into(),
    ]);
    let ssh = std::process::Command::new(&words[0])
        .args(&words[1..])
        .output()
        .expect("OpenSSH's client (openssh-client)");
    assert!(
        ssh.status.success() && String::from_utf8_lossy(&ssh.stdout).contains("status: done"),
        "{ssh:?}"
    );
}
