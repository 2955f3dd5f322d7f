//! Reliability, end to end with the real binary (issue #11): the controller as a separate
//! process against `vps-controller simulator`, killed and cut off, and then held to the
//! invariants of `common::invariants` (one server, key and firewall per subscription that
//! wants one, rows equal to Hetzner, keys that open, foreign resources untouched).
//!
//! - `a_controller_killed_anywhere_converges_within_two_resyncs`: SIGKILL at seeded moments,
//!   mostly while it leads with work in flight, while rows change and API faults are armed.
//!   Short by default (2 seeds x 4 kills); `VPS_RELIABILITY_LONG=1` (6 x 10) or
//!   `VPS_RELIABILITY_LONG=SEEDSxKILLS` (CI: `3x6`) runs longer,
//!   `VPS_RELIABILITY_SEED=N` replays one seed's schedule (the same kills, delays, row
//!   changes and faults; the interleaving with the process is up to the machine).
//! - `postgres_refusing_then_hanging_for_30_s`, `hetzner_refusing_then_hanging`,
//!   `sqlite_locked_by_another_writer`: outages. The process keeps running, deletes nothing
//!   while it cannot see, `/readyz` says so at once, and everything converges afterwards.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};

use common::invariants::{self, Foreign, Project};
use common::process::*;
use common::proxy::{Mode, Proxy};
use vps_controller::db;
use vps_controller::keys::Sealer;

/// Seconds between resyncs: long enough for a fresh server (three creates, three actions, a
/// recheck) to become ready between two of them, short enough to keep the runs short.
const RESYNC_SECONDS: &str = "5";
/// The simulator's action time, seconds.
const ACTION_SECONDS: &str = "0.2";
/// Simulator and controller run the API budget this much faster than Hetzner's: a seeded 429
/// pauses the controller for 3600/600 = 6 s instead of up to a minute, and the resync
/// interval is not stretched by the budget.
const BUDGET_TIME_SCALE: &str = "600";
/// The controller gives up on one API request after this long (a `timeout` fault holds the
/// answer for 30 s; the change has happened, the controller must find out by itself).
const HCLOUD_TIMEOUT_SECONDS: &str = "2";
/// Longest a probe may take to answer, even while the database or Hetzner hangs. The
/// manifests give the kubelet `timeoutSeconds: 3`; the probe answers from cached state and
/// does no I/O, so 2 s leaves room for a loaded test machine and still fails a probe that
/// waits on the database (the pool's acquire timeout is 10 s).
const PROBE_BOUND: Duration = Duration::from_secs(2);
const LEASE_NAME: &str = "vps-controller";

/// ed25519 (RSA-4096 generation is not under test here and costs a second of CPU per row), a
/// deletion budget the toggles never exhaust (the guard is tested in tests/safety.rs; here it
/// would pause deletions after three), and a short graceful shutdown.
const CONFIG: &str = "\
ssh_key_algorithm: ed25519
deletion_budget:
  min_per_hour: 100000
  fleet_percent: 100
shutdown_timeout_seconds: 2
";

/// One installation under test: a working directory, its database, a simulator (reached
/// directly by the test, through `endpoint` by the controller) and the controller's config.
struct Site {
    dir: tempfile::TempDir,
    /// What the controller is given (maybe through a proxy).
    database_url: String,
    /// The simulator's base URL, for the test's own reads and the control API.
    sim_url: String,
    /// The API endpoint the controller is given (maybe through a proxy).
    endpoint: String,
    config: PathBuf,
    key: String,
    http: reqwest::Client,
}

impl Site {
    fn new(sim_url: &str, database_url: Option<String>, endpoint: Option<String>) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, CONFIG).unwrap();
        Site {
            database_url: database_url.unwrap_or_else(|| sqlite_url(dir.path())),
            sim_url: sim_url.to_string(),
            endpoint: endpoint.unwrap_or_else(|| format!("{sim_url}/v1")),
            config,
            key: encryption_key(),
            http: http_client(),
            dir,
        }
    }

    fn envs(&self) -> Vec<(&str, String)> {
        vec![
            ("DATABASE_URL", self.database_url.clone()),
            ("HCLOUD_ENDPOINT", self.endpoint.clone()),
            ("HCLOUD_TOKEN", SECRET_TOKEN.to_string()),
            ("VPS_CONTROLLER_ENCRYPTION_KEY", self.key.clone()),
            ("VPS_CONTROLLER_CONFIG", self.config.display().to_string()),
            ("HCLOUD_BUDGET_TIME_SCALE", BUDGET_TIME_SCALE.to_string()),
            // The servers answer SSH at the simulator, also when the API goes through a proxy.
            (
                "VPS_CONTROLLER_SSH_PORT",
                simulator_ssh_port(&self.sim_url)
                    .expect("a simulator with SSH")
                    .to_string(),
            ),
        ]
    }

    fn controller_command(&self, port: u16) -> std::process::Command {
        let listen = format!("127.0.0.1:{port}");
        let envs = self.envs();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        command(
            self.dir.path(),
            &[
                "run",
                "--listen",
                &listen,
                "--resync-seconds",
                RESYNC_SECONDS,
                "--hcloud-timeout-seconds",
                HCLOUD_TIMEOUT_SECONDS,
            ],
            &envs,
        )
    }

    fn migrate(&self) {
        let envs = self.envs();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_cli(self.dir.path(), &["migrate"], &envs).assert_code(0);
    }

    /// `vps-controller run`, answering /metrics; its base URL.
    async fn spawn(&self) -> (ChildGuard, String) {
        spawn_listening(|port| self.controller_command(port), "/metrics").await
    }

    fn sealer(&self) -> Sealer {
        Sealer::from_base64(&self.key, &[]).unwrap()
    }

    async fn stats(&self) -> Value {
        simulator_stats(&self.http, &self.sim_url).await
    }

    async fn set_faults(&self, body: Value) {
        arm_faults(&self.http, &self.sim_url, &body).await;
    }

    async fn clear_faults(&self) {
        clear_faults(&self.http, &self.sim_url).await;
    }

    async fn violations(&self, conn: &DatabaseConnection, installation: &str) -> Vec<String> {
        invariants::violations(
            conn,
            &self.http,
            &format!("{}/v1", self.sim_url),
            installation,
            &self.sealer(),
        )
        .await
    }

    async fn project(&self) -> Project {
        Project::read(&self.http, &format!("{}/v1", self.sim_url))
            .await
            .unwrap()
    }
}

/// DELETE requests the simulator received, all kinds together.
fn deletes(stats: &Value) -> u64 {
    stats["by_endpoint"]
        .as_object()
        .map(|all| {
            all.iter()
                .filter(|(endpoint, _)| endpoint.starts_with("DELETE "))
                .map(|(_, n)| n.as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

fn faults_injected(stats: &Value) -> u64 {
    stats["faults"]
        .as_object()
        .map(|all| all.values().map(|n| n.as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

async fn scrape(http: &reqwest::Client, base_url: &str) -> String {
    metrics(http, base_url).await
}

async fn leads(http: &reqwest::Client, base_url: &str) -> bool {
    metric_value(&scrape(http, base_url).await, "vps_controller_leader", &[]) == Some(1.0)
}

async fn resyncs(http: &reqwest::Client, base_url: &str) -> f64 {
    metric_value(
        &scrape(http, base_url).await,
        "vps_controller_pass_duration_seconds_count",
        &[("pass", "resync")],
    )
    .unwrap_or(0.0)
}

/// Takes the lease from a holder the test has killed (and reaped): what its expiry would do
/// 15 s later, done at once so the next process leads without waiting. Production behaviour
/// is untouched; the takeover path (`expires_at <= now`, a new epoch) is the same one.
async fn expire_lease_of_dead_holder(conn: &DatabaseConnection) {
    conn.execute_unprepared(&format!(
        "UPDATE leases SET expires_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE name = '{LEASE_NAME}'"
    ))
    .await
    .unwrap();
}

/// Rows the controller has not finished with: a change not yet observed, or a status on the
/// way somewhere.
async fn unconverged_rows(conn: &DatabaseConnection) -> usize {
    db::subscriptions::all(conn)
        .await
        .map(|table| {
            table
                .rows
                .iter()
                .filter(|r| {
                    r.observed_version != r.desired_version
                        || !matches!(r.provisioning_status.as_str(), "ready" | "deprovisioned")
                })
                .count()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Part 1: crash anywhere
// ---------------------------------------------------------------------------------------

/// The size of a run: seeds and kills per seed.
#[derive(Clone, Debug)]
struct Size {
    seeds: Vec<u64>,
    kills: usize,
    long: Option<String>,
}

impl Size {
    fn from_env() -> Size {
        let long = std::env::var("VPS_RELIABILITY_LONG")
            .ok()
            .filter(|v| !v.is_empty() && v != "0" && v != "false");
        let (seed_count, kills) = match long.as_deref() {
            None => (2, 4),
            Some("1") | Some("true") => (6, 10),
            Some(size) => {
                let parsed = size
                    .split_once('x')
                    .and_then(|(s, k)| Some((s.parse().ok()?, k.parse().ok()?)));
                parsed.unwrap_or_else(|| {
                    panic!("VPS_RELIABILITY_LONG={size}: expected 1 or SEEDSxKILLS, e.g. 3x6")
                })
            }
        };
        let seeds = match std::env::var("VPS_RELIABILITY_SEED") {
            Ok(seed) if !seed.is_empty() => vec![
                seed.parse()
                    .unwrap_or_else(|_| panic!("VPS_RELIABILITY_SEED={seed}: not a number")),
            ],
            _ => (1..=seed_count).collect(),
        };
        Size { seeds, kills, long }
    }

    fn replay(&self, seed: u64) -> String {
        let long = self
            .long
            .as_ref()
            .map(|l| format!("VPS_RELIABILITY_LONG={l} "))
            .unwrap_or_default();
        format!(
            "{long}VPS_RELIABILITY_SEED={seed} cargo test --locked --test reliability \
             a_controller_killed_anywhere -- --nocapture"
        )
    }
}

#[derive(Debug, Default)]
struct CrashReport {
    kills: usize,
    kills_while_leading: usize,
    /// Kills with rows the controller had not finished (a change unobserved, a status on the
    /// way) right after the kill.
    kills_with_work_in_flight: usize,
    /// Kills after which Hetzner and the database disagreed (the invariants checked on the
    /// state the killed process left): work the next process had to repair.
    kills_leaving_repairs: usize,
    /// Resources labelled for a row that wants them but whose id the row did not record,
    /// right after a kill: created, and the process died before storing the id.
    unrecorded_after_kill: usize,
    /// Resources with our label that no wanting row owns, right after a kill: the process
    /// died before deleting them (a canceled or deleted row's, or a duplicate).
    undeleted_after_kill: usize,
    faults_injected: u64,
    faults_by_kind: BTreeMap<String, u64>,
    row_changes: usize,
    violations: usize,
    resyncs_to_converge: f64,
    /// Recovery paths the controllers took, by event reason (adoptions after a create whose
    /// answer was lost, recorded servers found gone, ...).
    recoveries: BTreeMap<String, i64>,
    took: Duration,
}

/// The endpoints faults are aimed at: the writes a provisioning or a teardown makes.
const WRITES: &[&str] = &[
    "POST /servers",
    "DELETE /servers/{id}",
    "POST /servers/{id}/actions/poweron",
    "POST /servers/{id}/actions/shutdown",
    "POST /ssh_keys",
    "DELETE /ssh_keys/{id}",
    "POST /firewalls",
    "DELETE /firewalls/{id}",
    "POST /firewalls/{id}/actions/apply_to_resources",
    "POST /firewalls/{id}/actions/remove_from_resources",
];
const READS: &[&str] = &[
    "GET /servers",
    "GET /ssh_keys",
    "GET /firewalls",
    "GET /actions",
    "GET /servers/actions",
];
const STARTS_ACTIONS: &[&str] = &[
    "POST /servers",
    "DELETE /servers/{id}",
    "POST /servers/{id}/actions/poweron",
    "POST /servers/{id}/actions/shutdown",
    "POST /firewalls/{id}/actions/apply_to_resources",
    "POST /firewalls/{id}/actions/remove_from_resources",
];

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[rng.random_range(0..from.len())]
}

/// A seeded set of targeted faults (and sometimes a seeded share of random ones).
fn fault_plan(rng: &mut StdRng) -> Value {
    let mut faults = Vec::new();
    for _ in 0..rng.random_range(2..=4) {
        let roll = rng.random_range(0..100);
        let (kind, endpoints): (&str, Vec<&str>) = match roll {
            0..=14 => ("http_500", vec![pick(rng, WRITES)]),
            15..=24 => ("http_502_html", vec![pick(rng, WRITES), pick(rng, READS)]),
            25..=34 => ("http_503", vec![pick(rng, READS)]),
            35..=39 => ("http_429", vec![pick(rng, WRITES)]),
            40..=59 => ("timeout", vec![pick(rng, WRITES)]),
            60..=74 => ("truncated_json", vec![pick(rng, WRITES), pick(rng, READS)]),
            75..=94 => ("action_error", vec![pick(rng, STARTS_ACTIONS)]),
            _ => ("server_stuck_starting", vec!["POST /servers"]),
        };
        faults.push(json!({
            "kind": kind,
            "endpoints": endpoints,
            "count": rng.random_range(1..=3),
        }));
    }
    let rate = if rng.random_bool(0.3) { 0.05 } else { 0.0 };
    json!({"faults": faults, "rate": rate})
}

/// The rows of a run, as the test wrote them.
struct Rows {
    ids: Vec<String>,
    next: usize,
}

impl Rows {
    /// One seeded change, as the web app would make it: a toggle, a new row, a deleted row.
    async fn change(&mut self, rng: &mut StdRng, conn: &DatabaseConnection) -> String {
        let roll = rng.random_range(0..100);
        if roll < 55 && !self.ids.is_empty() {
            let id = self.ids[rng.random_range(0..self.ids.len())].clone();
            conn.execute_unprepared(&format!(
                "UPDATE subscriptions SET status = CASE status WHEN 'active' THEN 'canceled' \
                 ELSE 'active' END WHERE id = '{id}'"
            ))
            .await
            .unwrap();
            format!("toggle {id}")
        } else if roll < 85 || self.ids.len() < 3 {
            let id = format!("sub-{}", self.next);
            self.next += 1;
            let status = if rng.random_bool(0.8) {
                "active"
            } else {
                "canceled"
            };
            insert_subscription(conn, &id, status, "starter").await;
            self.ids.push(id.clone());
            format!("insert {id} {status}")
        } else {
            let id = self.ids.remove(rng.random_range(0..self.ids.len()));
            conn.execute_unprepared(&format!("DELETE FROM subscriptions WHERE id = '{id}'"))
                .await
                .unwrap();
            format!("delete {id}")
        }
    }
}

/// SIGKILL, reaped. A process that had already exited by itself (anything but our SIGKILL)
/// is a crash: returned as a message.
fn kill(child: &mut ChildGuard) -> Option<String> {
    signal(child, "-KILL");
    let status = child.child.wait().unwrap();
    match status.signal() {
        Some(9) => None,
        _ if child.stderr().contains("cannot bind") => None,
        _ => Some(format!(
            "the controller exited by itself ({status}) before it was killed\n{}",
            tail(&child.output(), 4000)
        )),
    }
}

fn tail(text: &str, chars: usize) -> String {
    let skip = text.chars().count().saturating_sub(chars);
    text.chars().skip(skip).collect()
}

async fn crash_run(seed: u64, kills: usize, size: &Size) -> CrashReport {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = CrashReport::default();
    let sim_dir = tempfile::tempdir().unwrap();
    let seed_arg = seed.to_string();
    let (_simulator, sim_url) = spawn_simulator(
        sim_dir.path(),
        &[
            "--action-seconds",
            ACTION_SECONDS,
            "--seed",
            &seed_arg,
            "--budget-time-scale",
            BUDGET_TIME_SCALE,
        ],
    )
    .await;
    let site = Site::new(&sim_url, None, None);
    site.migrate();
    let conn = db::connect(&site.database_url).await.unwrap();
    let installation = db::installation::id(&conn).await.unwrap();
    let mut rows = Rows {
        ids: Vec::new(),
        next: 0,
    };
    for _ in 0..6 {
        let id = format!("sub-{}", rows.next);
        rows.next += 1;
        let status = if rng.random_bool(0.8) {
            "active"
        } else {
            "canceled"
        };
        insert_subscription(&conn, &id, status, "starter").await;
        rows.ids.push(id);
    }
    let foreign = Foreign::create(&site.http, &format!("{sim_url}/v1"), "sub-0").await;
    let mut log = Vec::new();
    let mut crashes = Vec::new();

    for k in 0..kills {
        // One kill in five lands anywhere in start-up (migrations, the plan check, the first
        // lease); the others wait until the process leads, change rows, arm faults, and kill
        // it a seeded moment later, while that work is in flight.
        let early = rng.random_bool(0.2);
        if early {
            // Start-up (migrations, the plan check, the first lease) takes about 200 ms here.
            let delay = Duration::from_millis(rng.random_range(0..400));
            let port = free_port();
            let mut child = ChildGuard::spawn(site.controller_command(port));
            log.push(format!("kill {k}: during start-up, {delay:?} after exec"));
            sleep(delay).await;
            let was_leading = leads(&site.http, &format!("http://127.0.0.1:{port}")).await;
            if let Some(crash) = kill(&mut child) {
                crashes.push(crash);
            }
            report.kills += 1;
            if was_leading {
                report.kills_while_leading += 1;
            }
        } else {
            let (mut child, base_url) = site.spawn().await;
            let leading = common::eventually(DEADLINE, || leads(&site.http, &base_url)).await;
            assert!(
                leading,
                "seed {seed}: the controller never led\nreplay: {}\n{}",
                size.replay(seed),
                child.output()
            );
            for _ in 0..rng.random_range(1..=3) {
                log.push(format!("kill {k}: {}", rows.change(&mut rng, &conn).await));
                report.row_changes += 1;
            }
            let faults = fault_plan(&mut rng);
            log.push(format!("kill {k}: faults {faults}"));
            site.set_faults(faults).await;
            let delay = Duration::from_millis(rng.random_range(200..3000));
            log.push(format!("kill {k}: {delay:?} after the changes"));
            sleep(delay).await;
            let was_leading = leads(&site.http, &base_url).await;
            if let Some(crash) = kill(&mut child) {
                crashes.push(crash);
            }
            report.kills += 1;
            if was_leading {
                report.kills_while_leading += 1;
            }
        }
        if unconverged_rows(&conn).await > 0 {
            report.kills_with_work_in_flight += 1;
        }
        // What the dead process left, read before anything else runs (faults off, so the
        // test's own listing is not faulted; the next cycle arms new ones).
        site.clear_faults().await;
        let left = site.violations(&conn, &installation).await;
        if !left.is_empty() {
            report.kills_leaving_repairs += 1;
        }
        report.unrecorded_after_kill += left
            .iter()
            .filter(|v| v.contains("but the row does not record it"))
            .count();
        report.undeleted_after_kill += left
            .iter()
            .filter(|v| v.contains("no row that wants it records it"))
            .count();
        expire_lease_of_dead_holder(&conn).await;
        // Sometimes the web app changes rows while no controller runs.
        if rng.random_bool(0.4) {
            log.push(format!(
                "kill {k}: while down, {}",
                rows.change(&mut rng, &conn).await
            ));
            report.row_changes += 1;
        }
    }

    // The faults stop; one more process must converge within two of its resyncs: before its
    // third resync pass starts (its first runs as soon as it leads).
    let stats = site.stats().await;
    report.faults_injected = faults_injected(&stats);
    if let Some(kinds) = stats["faults"].as_object() {
        for (kind, n) in kinds {
            report
                .faults_by_kind
                .insert(kind.clone(), n.as_u64().unwrap_or(0));
        }
    }
    site.clear_faults().await;
    let (controller, base_url) = site.spawn().await;
    let converged_after = loop {
        let passes = resyncs(&site.http, &base_url).await;
        let found = site.violations(&conn, &installation).await;
        if found.is_empty() {
            break Ok(passes);
        }
        if passes >= 3.0 || started.elapsed() > DEADLINE * 3 {
            break Err((passes, found));
        }
        sleep(POLL).await;
    };
    report.recoveries = recoveries(&conn).await;
    let foreign_changes = foreign.changes(&site.project().await);
    let mut problems = crashes;
    match converged_after {
        Ok(passes) => report.resyncs_to_converge = passes,
        Err((passes, found)) => {
            problems.push(format!(
                "not converged after {passes} resyncs of the last controller:\n  {}",
                found.join("\n  ")
            ));
            report.violations += found.len();
        }
    }
    report.violations += foreign_changes.len();
    problems.extend(foreign_changes);
    if !problems.is_empty() {
        panic!(
            "seed {seed}: {}\nreplay: {}\nschedule:\n  {}\nlast controller:\n{}",
            problems.join("\n"),
            size.replay(seed),
            log.join("\n  "),
            tail(&controller.output(), 8000)
        );
    }
    if seed == size.seeds[0] {
        checker_is_not_vacuous(&site, &conn, &installation, &controller).await;
    }
    controller.assert_no_secret();
    assert_eq!(
        foreign.len(),
        9,
        "three foreign servers, keys and firewalls checked"
    );
    report.took = started.elapsed();
    report
}

/// Events that say a controller repaired what an earlier one left half done.
const RECOVERY_EVENTS: &[&str] = &[
    "ServerAdopted",
    "SshKeyAdopted",
    "FirewallAdopted",
    "RecordedServerGone",
    "SshKeyReplaced",
    "ServerPoweredOn",
    "LabelsRepaired",
];

async fn recoveries(conn: &DatabaseConnection) -> BTreeMap<String, i64> {
    let rows = conn
        .query_all_raw(sea_orm::Statement::from_string(
            conn.get_database_backend(),
            "SELECT reason, COUNT(*) AS n FROM events GROUP BY reason".to_string(),
        ))
        .await
        .unwrap();
    rows.iter()
        .filter_map(|row| {
            let reason: String = row.try_get("", "reason").ok()?;
            let n: i64 = row.try_get("", "n").ok()?;
            RECOVERY_EVENTS
                .contains(&reason.as_str())
                .then_some((reason, n))
        })
        .collect()
}

/// The invariants fail on a state that is wrong: a second server carrying our labels for a
/// row that wants one (what a create retried after a lost answer could leave). The
/// controller then deletes it as a duplicate, and everything holds again.
async fn checker_is_not_vacuous(
    site: &Site,
    conn: &DatabaseConnection,
    installation: &str,
    controller: &ChildGuard,
) {
    let row = db::subscriptions::all(conn)
        .await
        .unwrap()
        .rows
        .into_iter()
        .find(|r| r.provisioning_status == "ready")
        .expect("a ready row");
    let created = site
        .http
        .post(format!("{}/v1/servers", site.sim_url))
        .bearer_auth(SECRET_TOKEN)
        .json(&json!({
            "name": format!("duplicate-{}", row.id),
            "server_type": "cx23",
            "image": "ubuntu-24.04",
            "location": "fsn1",
            "labels": {
                invariants::INSTALLATION_LABEL: installation,
                invariants::INSTANCE_LABEL: "default",
                invariants::SUBSCRIPTION_LABEL: row.id,
            },
        }))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    let found = site.violations(conn, installation).await;
    assert!(
        found
            .iter()
            .any(|v| v.contains(&format!("{} wants a VPS and has 2 servers", row.id))),
        "the invariants missed a duplicate server: {found:?}"
    );
    let started = Instant::now();
    loop {
        let found = site.violations(conn, installation).await;
        if found.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the duplicate was never removed:\n  {}\n{}",
            found.join("\n  "),
            tail(&controller.output(), 4000)
        );
        sleep(POLL).await;
    }
}

/// Issue #11: a controller killed at any moment (SIGKILL, no clean-up) leaves nothing that
/// the next one cannot finish. Kills land during start-up and, mostly, while the process
/// leads with work in flight; rows change and API faults are armed meanwhile. Once faults
/// stop, the next process converges within two resyncs, and every invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_anywhere_converges_within_two_resyncs() {
    let size = Size::from_env();
    let mut total = CrashReport::default();
    for seed in size.seeds.clone() {
        // Printed first, so any failure below (not only the final check) names its seed.
        eprintln!(
            "reliability: seed {seed}, {} kills; replay: {}",
            size.kills,
            size.replay(seed)
        );
        let report = crash_run(seed, size.kills, &size).await;
        eprintln!(
            "reliability: seed {seed}: {} kills ({} while leading, {} with work in flight, {} \
             leaving repairs: {} resources created but not recorded, {} left to delete), {} row \
             changes, {} faults injected, {} \
             violations, converged after {} resyncs, recoveries {:?}, {:.1} s",
            report.kills,
            report.kills_while_leading,
            report.kills_with_work_in_flight,
            report.kills_leaving_repairs,
            report.unrecorded_after_kill,
            report.undeleted_after_kill,
            report.row_changes,
            report.faults_injected,
            report.violations,
            report.resyncs_to_converge,
            report.recoveries,
            report.took.as_secs_f64()
        );
        total.kills += report.kills;
        total.kills_while_leading += report.kills_while_leading;
        total.kills_with_work_in_flight += report.kills_with_work_in_flight;
        total.kills_leaving_repairs += report.kills_leaving_repairs;
        total.unrecorded_after_kill += report.unrecorded_after_kill;
        total.undeleted_after_kill += report.undeleted_after_kill;
        total.row_changes += report.row_changes;
        total.faults_injected += report.faults_injected;
        total.violations += report.violations;
        total.took += report.took;
        for (kind, n) in report.faults_by_kind {
            *total.faults_by_kind.entry(kind).or_default() += n;
        }
        for (reason, n) in report.recoveries {
            *total.recoveries.entry(reason).or_default() += n;
        }
    }
    eprintln!(
        "reliability: total over {} seeds: {} kills, {} while leading, {} with work in flight, \
         {} leaving repairs ({} resources created but not recorded, {} left to delete), {} row \
         changes, {} faults injected {:?}, {} invariant violations, recoveries {:?}, {:.1} s",
        size.seeds.len(),
        total.kills,
        total.kills_while_leading,
        total.kills_with_work_in_flight,
        total.kills_leaving_repairs,
        total.unrecorded_after_kill,
        total.undeleted_after_kill,
        total.row_changes,
        total.faults_injected,
        total.faults_by_kind,
        total.violations,
        total.recoveries,
        total.took.as_secs_f64()
    );
    // CI's size (and the default long one) must land enough kills where it hurts; a replay
    // of one seed or a tiny custom size is exempt.
    if size.long.is_some() && size.seeds.len() * size.kills >= 12 {
        assert!(
            total.kills_while_leading >= 10,
            "the long run must land at least 10 kills while the controller leads; it landed {}",
            total.kills_while_leading
        );
    }
}

// ---------------------------------------------------------------------------------------
// Part 2: outages
// ---------------------------------------------------------------------------------------

/// What the process and its probes did during an outage, polled every 250 ms.
#[derive(Debug, Default)]
struct Outage {
    probes: usize,
    /// The slowest /readyz or /healthz answer (a failed request counts with its time).
    slowest: Duration,
    /// When /readyz first answered 503, from the start of the outage.
    first_unready: Option<Duration>,
    unready_why: Option<String>,
    /// /healthz answers that were 503 (reported, not asserted: a hung database stalls the
    /// loop, and liveness is meant to notice a stalled loop).
    not_alive: usize,
    not_alive_why: Option<String>,
    /// Set when the process exited during the outage.
    exited: Option<String>,
}

async fn probe(http: &reqwest::Client, url: &str) -> (Duration, Option<(u16, String)>) {
    let asked = Instant::now();
    let answer = match http.get(url).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            Some((status, response.text().await.unwrap_or_default()))
        }
        Err(_) => None,
    };
    (asked.elapsed(), answer)
}

/// Watches `child` for `duration` (the outage's length: the schedule, not a wait for a
/// condition).
async fn watch(
    http: &reqwest::Client,
    child: &mut ChildGuard,
    base_url: &str,
    duration: Duration,
) -> Outage {
    let mut outage = Outage::default();
    let started = Instant::now();
    while started.elapsed() < duration {
        if let Some(status) = child.child.try_wait().unwrap() {
            outage.exited = Some(format!("{status}\n{}", tail(&child.output(), 4000)));
            break;
        }
        let (took, ready) = probe(http, &format!("{base_url}/readyz")).await;
        outage.slowest = outage.slowest.max(took);
        if let Some((503, why)) = ready {
            outage.first_unready.get_or_insert(started.elapsed());
            outage.unready_why.get_or_insert(why.trim().to_string());
        }
        let (took, alive) = probe(http, &format!("{base_url}/healthz")).await;
        outage.slowest = outage.slowest.max(took);
        if let Some((503, why)) = alive {
            outage.not_alive += 1;
            outage.not_alive_why.get_or_insert(why.trim().to_string());
        }
        outage.probes += 2;
        sleep(Duration::from_millis(250)).await;
    }
    outage
}

/// The server each row that is ready records.
async fn ready_servers(conn: &DatabaseConnection) -> BTreeMap<String, i64> {
    db::subscriptions::all(conn)
        .await
        .unwrap()
        .rows
        .into_iter()
        .filter(|r| r.provisioning_status == "ready")
        .filter_map(|r| Some((r.id, r.hetzner_server_id?)))
        .collect()
}

/// Polls until every invariant holds (failing with the violations after [`DEADLINE`]);
/// returns how long it took.
async fn converge(
    site: &Site,
    conn: &DatabaseConnection,
    installation: &str,
    what: &str,
    child: &ChildGuard,
) -> Duration {
    let started = Instant::now();
    loop {
        let found = site.violations(conn, installation).await;
        if found.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: not converged after {DEADLINE:?}:\n  {}\n{}",
            found.join("\n  "),
            tail(&child.output(), 8000)
        );
        sleep(POLL).await;
    }
}

/// The checks every outage shares: the process ran through it, its probes answered at once
/// and /readyz said it was not ready, and nothing was deleted while it could not see.
fn assert_outage(what: &str, outage: &Outage, deletes_during: u64, child: &ChildGuard) {
    assert!(
        outage.exited.is_none(),
        "{what}: the controller exited: {}",
        outage.exited.as_deref().unwrap_or_default()
    );
    assert!(
        outage.slowest < PROBE_BOUND,
        "{what}: a probe took {:?} to answer (bound {PROBE_BOUND:?}); probes must answer from \
         cached state\n{}",
        outage.slowest,
        tail(&child.output(), 4000)
    );
    assert!(
        outage.first_unready.is_some(),
        "{what}: /readyz never answered 503 in {} probes\n{}",
        outage.probes / 2,
        tail(&child.output(), 4000)
    );
    assert_eq!(
        deletes_during,
        0,
        "{what}: the controller sent DELETE requests while it could not see\n{}",
        tail(&child.output(), 4000)
    );
}

fn report_outage(what: &str, outage: &Outage, recovered: Duration) {
    eprintln!(
        "reliability: {what}: /readyz 503 after {:.1} s ({:?}); slowest probe {} ms over {} \
         probes; /healthz 503 {} times ({:?}); converged {:.1} s after it ended",
        outage.first_unready.unwrap_or_default().as_secs_f64(),
        outage.unready_why.as_deref().unwrap_or_default(),
        outage.slowest.as_millis(),
        outage.probes,
        outage.not_alive,
        outage.not_alive_why.as_deref().unwrap_or_default(),
        recovered.as_secs_f64()
    );
}

/// Rows that want a VPS, added just before an outage so it starts with work in flight.
/// Only activations: nothing in these tests wants a deletion, so any DELETE is a bug.
async fn add_rows(conn: &DatabaseConnection, prefix: &str, from: usize, count: usize) {
    for i in from..from + count {
        insert_subscription(conn, &format!("{prefix}-{i}"), "active", "starter").await;
    }
}

fn assert_servers_kept(what: &str, before: &BTreeMap<String, i64>, after: &BTreeMap<String, i64>) {
    for (id, server) in before {
        assert_eq!(
            after.get(id),
            Some(server),
            "{what}: {id} was ready with server {server} before the outage and is not after"
        );
    }
}

async fn start_simulator(dir: &Path) -> (ChildGuard, String) {
    spawn_simulator(
        dir,
        &[
            "--action-seconds",
            ACTION_SECONDS,
            "--budget-time-scale",
            BUDGET_TIME_SCALE,
        ],
    )
    .await
}

fn socket_of(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).unwrap();
    let host = parsed.host_str().unwrap();
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{}", parsed.port_or_known_default().unwrap())
        .parse()
        .unwrap_or_else(|e| panic!("{url}: the test proxy needs an IP address: {e}"))
}

/// PostgreSQL cut off for 30 s through a proxy, first refusing connections (and closing the
/// open ones), then accepting and never answering (open connections stall too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refusing_then_hanging_for_30_s() {
    let Some(test_db) = common::postgres_or_skip("the PostgreSQL outage test").await else {
        return;
    };
    let proxy = Proxy::start(socket_of(&test_db.url)).await;
    let mut through_proxy = url::Url::parse(&test_db.url).unwrap();
    through_proxy.set_host(Some("127.0.0.1")).unwrap();
    through_proxy.set_port(Some(proxy.addr().port())).unwrap();
    let sim_dir = tempfile::tempdir().unwrap();
    let (_simulator, sim_url) = start_simulator(sim_dir.path()).await;
    let site = Site::new(&sim_url, Some(through_proxy.to_string()), None);
    site.migrate();
    // The test itself (the web app) reaches PostgreSQL directly.
    let conn = db::connect(&test_db.url).await.unwrap();
    let installation = db::installation::id(&conn).await.unwrap();
    let foreign = Foreign::create(&site.http, &format!("{sim_url}/v1"), "pg-0").await;
    add_rows(&conn, "pg", 0, 3).await;
    insert_subscription(&conn, "pg-canceled", "canceled", "starter").await;
    let (mut child, base_url) = site.spawn().await;
    converge(&site, &conn, &installation, "before the outages", &child).await;

    let mut next = 3;
    for (what, mode) in [
        ("PostgreSQL refusing for 30 s", Mode::Refuse),
        ("PostgreSQL hanging for 30 s", Mode::Hang),
    ] {
        add_rows(&conn, "pg", next, 2).await;
        next += 2;
        let servers = ready_servers(&conn).await;
        let deletes_before = deletes(&site.stats().await);
        proxy.set(mode);
        let outage = watch(&site.http, &mut child, &base_url, Duration::from_secs(30)).await;
        let deletes_during = deletes(&site.stats().await) - deletes_before;
        proxy.set(Mode::Forward);
        assert_outage(what, &outage, deletes_during, &child);
        let recovered = converge(&site, &conn, &installation, what, &child).await;
        assert_servers_kept(what, &servers, &ready_servers(&conn).await);
        assert_eq!(
            deletes(&site.stats().await),
            deletes_before,
            "{what}: nothing needed deleting after it either"
        );
        assert!(
            common::eventually(DEADLINE, || async {
                probe(&site.http, &format!("{base_url}/readyz"))
                    .await
                    .1
                    .map(|a| a.0)
                    == Some(200)
            })
            .await,
            "{what}: /readyz never recovered\n{}",
            child.output()
        );
        report_outage(what, &outage, recovered);
    }
    // Still whole: a cancellation is carried out.
    conn.execute_unprepared("UPDATE subscriptions SET status = 'canceled' WHERE id = 'pg-0'")
        .await
        .unwrap();
    converge(
        &site,
        &conn,
        &installation,
        "a cancellation after the outages",
        &child,
    )
    .await;
    let changes = foreign.changes(&site.project().await);
    assert!(changes.is_empty(), "{}", changes.join("\n"));
    child.assert_no_secret();
    eprintln!(
        "reliability: the PostgreSQL proxy accepted {} connections, held {} while hanging",
        proxy
            .counters
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed),
        proxy
            .counters
            .held
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(child);
    drop(conn);
    test_db.cleanup().await;
}

/// The Hetzner API cut off for 20 s each way (tens of seconds: past readiness's grace of
/// 10 s and several resyncs): refusing connections (a proxy in between stops forwarding),
/// then accepting them and never answering (the simulator's black hole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hetzner_refusing_then_hanging() {
    let sim_dir = tempfile::tempdir().unwrap();
    let (_simulator, sim_url) = start_simulator(sim_dir.path()).await;
    let proxy = Proxy::start(socket_of(&sim_url)).await;
    let site = Site::new(&sim_url, None, Some(format!("http://{}/v1", proxy.addr())));
    site.migrate();
    let conn = db::connect(&site.database_url).await.unwrap();
    let installation = db::installation::id(&conn).await.unwrap();
    let foreign = Foreign::create(&site.http, &format!("{sim_url}/v1"), "api-0").await;
    add_rows(&conn, "api", 0, 3).await;
    insert_subscription(&conn, "api-canceled", "canceled", "starter").await;
    let (mut child, base_url) = site.spawn().await;
    converge(&site, &conn, &installation, "before the outages", &child).await;

    let mut next = 3;
    for what in ["Hetzner refusing for 20 s", "Hetzner hanging for 20 s"] {
        add_rows(&conn, "api", next, 2).await;
        next += 2;
        let servers = ready_servers(&conn).await;
        let deletes_before = deletes(&site.stats().await);
        let hanging = what.contains("hanging");
        if hanging {
            site.set_faults(json!({"black_hole": true})).await;
        } else {
            proxy.set(Mode::Refuse);
        }
        let outage = watch(&site.http, &mut child, &base_url, Duration::from_secs(20)).await;
        // Swallowed requests are counted too: a DELETE attempted into the hole shows.
        let deletes_during = deletes(&site.stats().await) - deletes_before;
        if hanging {
            site.clear_faults().await;
        } else {
            proxy.set(Mode::Forward);
        }
        assert_outage(what, &outage, deletes_during, &child);
        let why = outage.unready_why.as_deref().unwrap_or_default();
        assert!(why.contains("Hetzner"), "{what}: /readyz said {why:?}");
        let recovered = converge(&site, &conn, &installation, what, &child).await;
        assert_servers_kept(what, &servers, &ready_servers(&conn).await);
        assert_eq!(deletes(&site.stats().await), deletes_before, "{what}");
        report_outage(what, &outage, recovered);
    }
    let changes = foreign.changes(&site.project().await);
    assert!(changes.is_empty(), "{}", changes.join("\n"));
    child.assert_no_secret();
}

/// Another process holds SQLite's write lock (`BEGIN EXCLUSIVE`) for 20 s: longer than the
/// busy timeout (5 s) and the lease (15 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_by_another_writer() {
    use sea_orm::sqlx::{Connection, Executor, SqliteConnection};

    let sim_dir = tempfile::tempdir().unwrap();
    let (_simulator, sim_url) = start_simulator(sim_dir.path()).await;
    let site = Site::new(&sim_url, None, None);
    site.migrate();
    let conn = db::connect(&site.database_url).await.unwrap();
    let installation = db::installation::id(&conn).await.unwrap();
    add_rows(&conn, "lock", 0, 3).await;
    let (mut child, base_url) = site.spawn().await;
    converge(&site, &conn, &installation, "before the lock", &child).await;

    let what = "SQLite locked by another writer for 20 s";
    add_rows(&conn, "lock", 3, 2).await;
    let servers = ready_servers(&conn).await;
    let deletes_before = deletes(&site.stats().await);
    let mut locker = SqliteConnection::connect(&site.database_url).await.unwrap();
    locker.execute("BEGIN EXCLUSIVE").await.unwrap();
    let outage = watch(&site.http, &mut child, &base_url, Duration::from_secs(20)).await;
    locker.execute("ROLLBACK").await.unwrap();
    locker.close().await.unwrap();
    let deletes_during = deletes(&site.stats().await) - deletes_before;
    assert_outage(what, &outage, deletes_during, &child);
    let recovered = converge(&site, &conn, &installation, what, &child).await;
    assert_servers_kept(what, &servers, &ready_servers(&conn).await);
    report_outage(what, &outage, recovered);
    child.assert_no_secret();
}
