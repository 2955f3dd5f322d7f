//! Soak (issue #11): the real `vps-controller run` for half an hour against `vps-controller
//! simulator`, 500 subscriptions, seeded churn and a seeded share of API faults, sampled every
//! 30 s. What an operator would notice over days must not show in half an hour either:
//!
//! - memory: resident set growth under 5 % after warm-up (defined at [`RSS_GROWTH_LIMIT`]),
//!   open file descriptors flat;
//! - tables within their bounds: `events` (per subscription and in total, `db::events`),
//!   `vps_controller_server_deletions` (one record per deleted server, none per resync),
//!   `subscription_deletions` drained within a sampling interval, one `leases` row;
//! - a steady pace: requests per minute, and resync passes started per minute, in the second
//!   half after warm-up within [`RATE_FACTOR`] of the first half (a resync whose cost in
//!   requests grows with time fails the first, one whose duration grows the second);
//! - the same process all along (never exited, never restarted), no panic in its log;
//! - once churn and faults stop, every invariant of `common::invariants` holds, and the
//!   resources of others are untouched.
//!
//! Ignored by default (it takes `VPS_SOAK_MINUTES`, default 30):
//!
//! ```sh
//! cargo test --release --locked --test soak -- --ignored --nocapture
//! VPS_SOAK_MINUTES=3 VPS_SOAK_SUBSCRIPTIONS=200 cargo test --release --locked --test soak -- --ignored --nocapture
//! ```
//! `VPS_SOAK_SUBSCRIPTIONS` (default 500), `VPS_SOAK_SEED` (default 11: churn and faults),
//! `VPS_SOAK_SAMPLE_SECONDS` (default 30). It prints a table of the samples and a summary line
//! (README, "Reliability").

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, sleep_until};

use common::invariants::{self, Foreign};
use common::process::*;
use vps_controller::db;
use vps_controller::db::events::{MAX_EVENTS_PER_SUBSCRIPTION, MAX_EVENTS_TOTAL};
use vps_controller::keys::Sealer;

/// Seconds between full resyncs: many of them in a run (180 in 30 minutes).
const RESYNC_SECONDS: u64 = 10;
/// The simulator's action time, seconds.
const ACTION_SECONDS: &str = "0.2";
/// Simulator and controller run the API budget 600 times faster than Hetzner's, so the
/// budget never paces the controller: the request rate is what the controller asks for,
/// and a controller that asks for more and more shows.
const BUDGET_TIME_SCALE: &str = "600";
/// The controller gives up on one request after this long (a `timeout` fault holds its answer
/// for 30 s).
const HCLOUD_TIMEOUT_SECONDS: &str = "2";
/// Share of `/v1` requests that get a seeded fault (500, 503, 429, 502 HTML, a 30 s hold, a
/// failed action).
const FAULT_RATE: f64 = 0.03;
/// Churn: a batch of 1-4 row changes this often.
const CHURN_EVERY: Duration = Duration::from_secs(5);
/// Share of the rows that want a VPS; toggles keep it there, so the fleet (and with it the
/// cost of a listing) stays the same size while rows change.
const ACTIVE_SHARE: f64 = 0.8;
/// The first 20 % of the run is warm-up: allocator arenas, pools and caches fill up.
const WARM_UP_SHARE: f64 = 0.2;
/// RSS growth = late / early - 1, where early is the largest RSS among the first quarter of
/// the samples after warm-up and late the largest among the last quarter (peak to peak: one
/// sample that happens to land after a free neither hides a leak nor fakes one). Must stay
/// below 5 %.
const RSS_GROWTH_LIMIT: f64 = 0.05;
/// The most open file descriptors in the last quarter may exceed the most in the first
/// quarter by this many (a pool connection opened late, a request in flight).
const FD_SLACK: u64 = 10;
/// Requests per minute, and resync passes started per minute, in the second half of the
/// measured part (after warm-up) must be within this factor of the first half, either way.
/// The listings of the resyncs are most of the requests (58 % in the recorded run, which
/// prints the split), so a resync whose cost doubles over the run moves the halves apart by
/// about 1.25; over halves of 12 minutes, noise (faults, churn) moved them by 2-6 %.
const RATE_FACTOR: f64 = 1.2;
/// The initial fleet has this long to become ready before the soak starts.
const INITIAL_DEADLINE: Duration = Duration::from_secs(15 * 60);
/// Once faults stop, everything must hold within this long: a row that failed several
/// times in a row waits out its backoff (up to 5 minutes) first.
const FINAL_DEADLINE: Duration = Duration::from_secs(12 * 60);
/// A granted deletion is recorded before its DELETE is sent: this many (the default
/// concurrency) may be recorded and not yet sent when a sample is taken.
const DELETIONS_IN_FLIGHT: i64 = 8;

/// ed25519 (RSA-4096 generation would dominate the CPU), a deletion budget churn never
/// exhausts (the guard is tested in tests/safety.rs; here it would pause deletions after a
/// few cancellations), and a short graceful shutdown.
const CONFIG: &str = "\
ssh_key_algorithm: ed25519
deletion_budget:
  min_per_hour: 100000
  fleet_percent: 100
shutdown_timeout_seconds: 2
";

/// The size of a run, from the environment.
#[derive(Clone, Debug)]
struct Settings {
    minutes: f64,
    subscriptions: usize,
    seed: u64,
    sample_every: Duration,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value}: not a number")),
        _ => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let settings = Settings {
            minutes: env_or("VPS_SOAK_MINUTES", 30.0),
            subscriptions: env_or("VPS_SOAK_SUBSCRIPTIONS", 500),
            seed: env_or("VPS_SOAK_SEED", 11),
            sample_every: Duration::from_secs(env_or("VPS_SOAK_SAMPLE_SECONDS", 30)),
        };
        assert!(settings.minutes > 0.0, "VPS_SOAK_MINUTES must be positive");
        assert!(
            settings.subscriptions >= 10,
            "VPS_SOAK_SUBSCRIPTIONS must be at least 10"
        );
        assert!(
            !settings.sample_every.is_zero(),
            "VPS_SOAK_SAMPLE_SECONDS must be positive"
        );
        settings
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.minutes * 60.0)
    }
}

fn tail(text: &str, chars: usize) -> String {
    let skip = text.chars().count().saturating_sub(chars);
    text.chars().skip(skip).collect()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------------------
// The installation
// ---------------------------------------------------------------------------------------

struct Site {
    dir: tempfile::TempDir,
    database_url: String,
    sim_url: String,
    config: PathBuf,
    key: String,
    http: reqwest::Client,
}

impl Site {
    fn new(sim_url: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, CONFIG).unwrap();
        Site {
            database_url: sqlite_url(dir.path()),
            sim_url: sim_url.to_string(),
            config,
            key: encryption_key(),
            http: http_client(),
            dir,
        }
    }

    fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.database_url.clone()),
            ("HCLOUD_ENDPOINT", format!("{}/v1", self.sim_url)),
            ("HCLOUD_TOKEN", SECRET_TOKEN.to_string()),
            ("VPS_CONTROLLER_ENCRYPTION_KEY", self.key.clone()),
            ("VPS_CONTROLLER_CONFIG", self.config.display().to_string()),
            ("HCLOUD_BUDGET_TIME_SCALE", BUDGET_TIME_SCALE.to_string()),
        ]
    }

    fn migrate(&self) {
        let envs = self.envs();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_cli(self.dir.path(), &["migrate"], &envs).assert_code(0);
    }

    /// `vps-controller run`, answering /metrics; its base URL.
    async fn spawn(&self) -> (ChildGuard, String) {
        let resync = RESYNC_SECONDS.to_string();
        spawn_listening(
            |port| {
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
                        &resync,
                        "--hcloud-timeout-seconds",
                        HCLOUD_TIMEOUT_SECONDS,
                        "--log-format",
                        "json",
                    ],
                    &envs,
                )
            },
            "/metrics",
        )
        .await
    }

    /// The SQLite file and its write-ahead log, bytes.
    fn database_bytes(&self) -> u64 {
        ["vps-controller.db", "vps-controller.db-wal"]
            .iter()
            .filter_map(|name| std::fs::metadata(self.dir.path().join(name)).ok())
            .map(|meta| meta.len())
            .sum()
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
            &Sealer::from_base64(&self.key, &[]).unwrap(),
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------
// Churn
// ---------------------------------------------------------------------------------------

/// The rows, as the test (the web app) wrote them.
struct Fleet {
    active: Vec<String>,
    canceled: Vec<String>,
    next: usize,
    target: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct ChurnCounts {
    cancels: u64,
    reactivations: u64,
    inserts: u64,
    deletes: u64,
    /// Writes that failed (the database busy past its timeout); the change is not made.
    failed: u64,
}

impl ChurnCounts {
    fn total(&self) -> u64 {
        self.cancels + self.reactivations + self.inserts + self.deletes
    }
}

impl Fleet {
    fn len(&self) -> usize {
        self.active.len() + self.canceled.len()
    }

    fn new_id(&mut self) -> String {
        let id = format!("soak-{}", self.next);
        self.next += 1;
        id
    }

    /// The initial rows, `ACTIVE_SHARE` of them active, in one statement.
    async fn seed(&mut self, rng: &mut StdRng, conn: &DatabaseConnection) {
        let mut values = Vec::new();
        for _ in 0..self.target {
            let id = self.new_id();
            let status = if rng.random_bool(ACTIVE_SHARE) {
                self.active.push(id.clone());
                "active"
            } else {
                self.canceled.push(id.clone());
                "canceled"
            };
            values.push(format!("('{id}', 'user-{id}', '{status}', 'starter')"));
        }
        conn.execute_unprepared(&format!(
            "INSERT INTO subscriptions (id, user_id, status, plan) VALUES {}",
            values.join(", ")
        ))
        .await
        .unwrap();
    }

    /// One seeded change, as the web app would make it. Toggles keep the active share at
    /// `ACTIVE_SHARE`; inserts and deletes keep the total within 2 % of the target.
    async fn change(
        &mut self,
        rng: &mut StdRng,
        conn: &DatabaseConnection,
        counts: &mut ChurnCounts,
    ) {
        let total = self.len();
        let roll = rng.random_range(0..100);
        let op = if total * 100 < self.target * 98 {
            "insert"
        } else if total * 100 > self.target * 102 {
            "delete"
        } else if roll < 60 {
            "toggle"
        } else if roll < 80 {
            "insert"
        } else {
            "delete"
        };
        let outcome = match op {
            "toggle" => {
                let cancel = (self.active.len() as f64) > ACTIVE_SHARE * total as f64
                    || self.canceled.is_empty();
                let (from, status) = if cancel {
                    (&self.active, "canceled")
                } else {
                    (&self.canceled, "active")
                };
                let id = from[rng.random_range(0..from.len())].clone();
                let done = conn
                    .execute_unprepared(&format!(
                        "UPDATE subscriptions SET status = '{status}' WHERE id = '{id}'"
                    ))
                    .await;
                done.map(|_| {
                    if cancel {
                        self.active.retain(|x| *x != id);
                        self.canceled.push(id);
                        counts.cancels += 1;
                    } else {
                        self.canceled.retain(|x| *x != id);
                        self.active.push(id);
                        counts.reactivations += 1;
                    }
                })
            }
            "insert" => {
                let id = self.new_id();
                let active = rng.random_bool(ACTIVE_SHARE);
                let status = if active { "active" } else { "canceled" };
                conn.execute_unprepared(&format!(
                    "INSERT INTO subscriptions (id, user_id, status, plan) \
                     VALUES ('{id}', 'user-{id}', '{status}', 'starter')"
                ))
                .await
                .map(|_| {
                    if active {
                        self.active.push(id);
                    } else {
                        self.canceled.push(id);
                    }
                    counts.inserts += 1;
                })
            }
            _ => {
                let n = rng.random_range(0..total);
                let id = if n < self.active.len() {
                    self.active[n].clone()
                } else {
                    self.canceled[n - self.active.len()].clone()
                };
                conn.execute_unprepared(&format!("DELETE FROM subscriptions WHERE id = '{id}'"))
                    .await
                    .map(|_| {
                        self.active.retain(|x| *x != id);
                        self.canceled.retain(|x| *x != id);
                        counts.deletes += 1;
                    })
            }
        };
        if let Err(e) = outcome {
            eprintln!("soak: churn {op} failed (retried by later changes): {e}");
            counts.failed += 1;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Samples
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Sample {
    /// Seconds since the soak started.
    t: f64,
    /// VmRSS and VmHWM of the controller, bytes (from /proc/<pid>/status).
    rss: u64,
    hwm: u64,
    /// `vps_controller_process_resident_memory_bytes`.
    rss_metric: u64,
    /// Entries of /proc/<pid>/fd.
    fds: u64,
    start_time: f64,
    leader: bool,
    /// Resync passes that listed Hetzner and queued their work
    /// (`vps_controller_pass_duration_seconds_count{pass="resync"}`).
    resyncs: u64,
    /// Resync passes started, from the log: those that finished and those that failed.
    resync_attempts: u64,
    rows: i64,
    wanting: i64,
    ready: i64,
    events: i64,
    events_max_per_subscription: i64,
    server_deletions: i64,
    tombstones: i64,
    leases: i64,
    database_bytes: u64,
    /// Requests the simulator received since it started, and faults it injected.
    requests: u64,
    faults: u64,
    delete_server_requests: u64,
    /// The simulator's requests by `"METHOD /template"`, since it started.
    by_endpoint: BTreeMap<String, u64>,
    churn: ChurnCounts,
}

/// `VmRSS` and `VmHWM` of `pid`, bytes.
fn proc_memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn proc_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count() as u64)
        .unwrap_or(0)
}

async fn count(conn: &DatabaseConnection, sql: &str) -> i64 {
    let row = conn
        .query_one_raw(Statement::from_string(
            conn.get_database_backend(),
            sql.to_string(),
        ))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .unwrap_or_else(|| panic!("{sql}: no row"));
    row.try_get::<Option<i64>>("", "n").unwrap().unwrap_or(0)
}

/// Resync passes the controller logged, finished or failed (`resync pass`, `resync pass
/// failed; …`). The logs go to stderr; stdout is read too.
fn resync_attempts(child: &ChildGuard) -> u64 {
    [&child.stdout, &child.stderr]
        .iter()
        .map(|path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter(|line| line.contains("\"message\":\"resync pass"))
                .count() as u64
        })
        .sum()
}

fn endpoint_count(stats: &Value, key: &str) -> u64 {
    stats["by_endpoint"][key].as_u64().unwrap_or(0)
}

fn faults_injected(stats: &Value) -> u64 {
    stats["faults"]
        .as_object()
        .map(|all| all.values().map(|n| n.as_u64().unwrap_or(0)).sum())
        .unwrap_or(0)
}

async fn take_sample(
    site: &Site,
    conn: &DatabaseConnection,
    child: &ChildGuard,
    base_url: &str,
    t: f64,
    churn: ChurnCounts,
) -> Sample {
    let pid = child.child.id();
    let (rss, hwm) = proc_memory(pid);
    let text = metrics(&site.http, base_url).await;
    let metric =
        |name: &str, labels: &[(&str, &str)]| metric_value(&text, name, labels).unwrap_or(0.0);
    let stats = site.stats().await;
    Sample {
        t,
        rss,
        hwm,
        rss_metric: metric("vps_controller_process_resident_memory_bytes", &[]) as u64,
        fds: proc_fds(pid),
        start_time: metric("vps_controller_process_start_time_seconds", &[]),
        leader: metric("vps_controller_leader", &[]) == 1.0,
        resyncs: metric(
            "vps_controller_pass_duration_seconds_count",
            &[("pass", "resync")],
        ) as u64,
        resync_attempts: resync_attempts(child),
        rows: count(conn, "SELECT count(*) AS n FROM subscriptions").await,
        wanting: count(
            conn,
            "SELECT count(*) AS n FROM subscriptions WHERE status IN ('active', 'trialing')",
        )
        .await,
        ready: count(
            conn,
            "SELECT count(*) AS n FROM subscriptions WHERE provisioning_status = 'ready'",
        )
        .await,
        events: count(conn, "SELECT count(*) AS n FROM events").await,
        events_max_per_subscription: count(
            conn,
            "SELECT max(c) AS n FROM (SELECT count(*) AS c FROM events GROUP BY subscription_id) AS per",
        )
        .await,
        server_deletions: count(
            conn,
            "SELECT count(*) AS n FROM vps_controller_server_deletions",
        )
        .await,
        tombstones: count(conn, "SELECT count(*) AS n FROM subscription_deletions").await,
        leases: count(conn, "SELECT count(*) AS n FROM leases").await,
        database_bytes: site.database_bytes(),
        requests: stats["total"].as_u64().unwrap_or(0),
        faults: faults_injected(&stats),
        delete_server_requests: endpoint_count(&stats, "DELETE /servers/{id}"),
        by_endpoint: stats["by_endpoint"]
            .as_object()
            .map(|all| {
                all.iter()
                    .map(|(key, n)| (key.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default(),
        churn,
    }
}

fn print_table(samples: &[Sample], warm_up_until: f64) {
    eprintln!(
        "| min | RSS MiB | RSS metric MiB | fds | rows | wanting | ready | events | max/sub | server deletions | tombstones | leases | DB MiB | requests | req/min | faults | resyncs ok/started | leader |"
    );
    eprintln!(
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for (i, s) in samples.iter().enumerate() {
        let rate = i
            .checked_sub(1)
            .map(|p| {
                let prev = &samples[p];
                (s.requests - prev.requests) as f64 / (s.t - prev.t) * 60.0
            })
            .map(|r| format!("{r:.0}"))
            .unwrap_or_else(|| "-".into());
        let warm = if s.t < warm_up_until {
            " (warm-up)"
        } else {
            ""
        };
        eprintln!(
            "| {:.1}{warm} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} | {rate} | {} | {}/{} | {} |",
            s.t / 60.0,
            mib(s.rss),
            mib(s.rss_metric),
            s.fds,
            s.rows,
            s.wanting,
            s.ready,
            s.events,
            s.events_max_per_subscription,
            s.server_deletions,
            s.tombstones,
            s.leases,
            mib(s.database_bytes),
            s.requests,
            s.faults,
            s.resyncs,
            s.resync_attempts,
            if s.leader { "yes" } else { "NO" },
        );
    }
}

/// Between two samples: requests per minute and resync passes started per minute.
fn rates(from: &Sample, to: &Sample) -> (f64, f64) {
    let minutes = (to.t - from.t) / 60.0;
    let requests = (to.requests - from.requests) as f64;
    let attempts = to.resync_attempts.saturating_sub(from.resync_attempts) as f64;
    (requests / minutes, attempts / minutes)
}

fn within_factor(a: f64, b: f64, factor: f64) -> bool {
    a > 0.0 && b > 0.0 && a / b <= factor && b / a <= factor
}

/// Log lines by level, and the most frequent messages of the warnings and errors.
fn log_summary(child: &ChildGuard) -> (BTreeMap<String, u64>, Vec<(u64, String)>, u64) {
    let read = |path: &PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    let (text, stderr) = (read(&child.stdout), read(&child.stderr));
    let mut levels: BTreeMap<String, u64> = BTreeMap::new();
    let mut messages: BTreeMap<String, u64> = BTreeMap::new();
    for line in text.lines().chain(stderr.lines()) {
        let Ok(entry) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let level = entry["level"].as_str().unwrap_or("?").to_string();
        if level == "WARN" || level == "ERROR" {
            let message = entry["message"]
                .as_str()
                .or(entry["fields"]["message"].as_str())
                .unwrap_or_default()
                .to_string();
            *messages.entry(format!("{level} {message}")).or_default() += 1;
        }
        *levels.entry(level).or_default() += 1;
    }
    let panics = text
        .lines()
        .chain(stderr.lines())
        .filter(|line| line.contains("panicked"))
        .count() as u64;
    let mut top: Vec<(u64, String)> = messages.into_iter().map(|(m, n)| (n, m)).collect();
    top.sort_by(|a, b| b.cmp(a));
    top.truncate(8);
    (levels, top, panics)
}

/// Polls until every invariant holds and the deletion notices are drained (failing after
/// `deadline`); returns how long it took.
async fn converge(
    site: &Site,
    conn: &DatabaseConnection,
    installation: &str,
    child: &ChildGuard,
    deadline: Duration,
    what: &str,
) -> Duration {
    let started = Instant::now();
    loop {
        let mut found = site.violations(conn, installation).await;
        let tombstones = count(conn, "SELECT count(*) AS n FROM subscription_deletions").await;
        if tombstones > 0 {
            found.push(format!("{tombstones} deletion notices not taken"));
        }
        if found.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < deadline,
            "{what}: not converged after {deadline:?} ({} violations):\n  {}\n{}",
            found.len(),
            found
                .iter()
                .take(40)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  "),
            tail(&child.output(), 8000)
        );
        sleep(Duration::from_secs(2)).await;
    }
}

/// Issue #11, the soak. See the module documentation for what it asserts and how to run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 30-minute soak: cargo test --release --locked --test soak -- --ignored --nocapture"]
async fn soak_500_subscriptions_with_churn_and_faults_stays_flat() {
    let settings = Settings::from_env();
    eprintln!(
        "soak: {} min, {} subscriptions, seed {}, samples every {:?}, resync every {RESYNC_SECONDS} s, \
         fault rate {FAULT_RATE}",
        settings.minutes, settings.subscriptions, settings.seed, settings.sample_every
    );
    let mut rng = StdRng::seed_from_u64(settings.seed);
    let sim_dir = tempfile::tempdir().unwrap();
    let seed = settings.seed.to_string();
    let (_simulator, sim_url) = spawn_simulator(
        sim_dir.path(),
        &[
            "--action-seconds",
            ACTION_SECONDS,
            "--seed",
            &seed,
            "--budget-time-scale",
            BUDGET_TIME_SCALE,
        ],
    )
    .await;
    let site = Site::new(&sim_url);
    site.migrate();
    let conn = db::connect(&site.database_url).await.unwrap();
    let installation = db::installation::id(&conn).await.unwrap();
    let mut fleet = Fleet {
        active: Vec::new(),
        canceled: Vec::new(),
        next: 0,
        target: settings.subscriptions,
    };
    fleet.seed(&mut rng, &conn).await;
    let foreign = Foreign::create(&site.http, &format!("{sim_url}/v1"), "soak-0").await;
    let (mut child, base_url) = site.spawn().await;

    let initial = converge(
        &site,
        &conn,
        &installation,
        &child,
        INITIAL_DEADLINE,
        "the initial fleet",
    )
    .await;
    eprintln!(
        "soak: the initial fleet ({} wanting a VPS of {}) converged in {:.1} s",
        fleet.active.len(),
        fleet.len(),
        initial.as_secs_f64()
    );

    // The soak: churn on a fixed schedule, samples on another, faults throughout.
    site.set_faults(json!({"rate": FAULT_RATE})).await;
    let duration = settings.duration();
    let warm_up_until = duration.as_secs_f64() * WARM_UP_SHARE;
    let started = Instant::now();
    let end = started + duration;
    let mut counts = ChurnCounts::default();
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = started;
    let mut next_churn = started + CHURN_EVERY;
    let mut failures: Vec<String> = Vec::new();
    loop {
        let now = Instant::now();
        if now >= next_sample {
            if let Some(status) = child.child.try_wait().unwrap() {
                print_table(&samples, warm_up_until);
                panic!(
                    "the controller exited ({status}) {:.0} s into the soak\n{}",
                    started.elapsed().as_secs_f64(),
                    tail(&child.output(), 8000)
                );
            }
            let t = now.duration_since(started).as_secs_f64();
            let sample = take_sample(&site, &conn, &child, &base_url, t, counts).await;
            eprintln!(
                "soak: {:5.1} min  RSS {:6.1} MiB  fds {:3}  rows {}  ready {}  events {}  \
                 server deletions {}  requests {}  faults {}  resyncs {}",
                t / 60.0,
                mib(sample.rss),
                sample.fds,
                sample.rows,
                sample.ready,
                sample.events,
                sample.server_deletions,
                sample.requests,
                sample.faults,
                sample.resyncs
            );
            samples.push(sample);
            if now >= end {
                break;
            }
            next_sample = (next_sample + settings.sample_every).min(end);
        }
        if now >= next_churn && now < end {
            for _ in 0..rng.random_range(1..=4) {
                fleet.change(&mut rng, &conn, &mut counts).await;
            }
            next_churn += CHURN_EVERY;
        }
        sleep_until(next_sample.min(next_churn)).await;
    }

    // Faults off, churn stopped: everything must hold.
    let faults_at_end = site.stats().await;
    site.clear_faults().await;
    let converged = converge(
        &site,
        &conn,
        &installation,
        &child,
        FINAL_DEADLINE,
        "after the soak",
    )
    .await;
    let violations = site.violations(&conn, &installation).await;
    let project = invariants::Project::read(&site.http, &format!("{sim_url}/v1"))
        .await
        .unwrap();
    let foreign_changes = foreign.changes(&project);
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "the controller exited after the soak\n{}",
        tail(&child.output(), 8000)
    );
    child.assert_no_secret();

    // ---- The figures ----
    print_table(&samples, warm_up_until);
    let measured: Vec<&Sample> = samples.iter().filter(|s| s.t >= warm_up_until).collect();
    assert!(
        measured.len() >= 3,
        "{} samples after warm-up; run longer or sample more often",
        measured.len()
    );
    let first = samples.first().unwrap();
    let last = samples.last().unwrap();
    let quarter = measured.len().div_ceil(4).max(1);
    let (early, late) = (&measured[..quarter], &measured[measured.len() - quarter..]);
    let most = |part: &[&Sample], of: fn(&Sample) -> u64| part.iter().map(|s| of(s)).max().unwrap();
    let (rss_early, rss_late) = (most(early, |s| s.rss), most(late, |s| s.rss));
    let growth = rss_late as f64 / rss_early as f64 - 1.0;
    let (fds_early, fds_late) = (most(early, |s| s.fds), most(late, |s| s.fds));
    let mid = measured.len() / 2;
    let (first_per_minute, first_resyncs_per_minute) = rates(measured[0], measured[mid]);
    let (second_per_minute, second_resyncs_per_minute) = rates(measured[mid], last);
    let (levels, top_messages, panics) = log_summary(&child);
    let faults = faults_injected(&faults_at_end) - first.faults;
    let churn = last.churn;

    eprintln!("soak: by kind, faults injected {}", faults_at_end["faults"]);
    let measured_minutes = (last.t - measured[0].t) / 60.0;
    let mut endpoints: Vec<(u64, &String)> = last
        .by_endpoint
        .iter()
        .map(|(key, n)| {
            (
                n - measured[0].by_endpoint.get(key).copied().unwrap_or(0),
                key,
            )
        })
        .filter(|(n, _)| *n > 0)
        .collect();
    endpoints.sort_by(|a, b| b.cmp(a));
    eprintln!(
        "soak: requests/min after warm-up by endpoint: {}",
        endpoints
            .iter()
            .map(|(n, key)| format!("{key} {:.1}", *n as f64 / measured_minutes))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!("soak: log lines by level {levels:?}; panics {panics}");
    for (n, message) in &top_messages {
        eprintln!("soak:   {n:6} x {message}");
    }
    eprintln!(
        "soak: churn {} changes ({} cancels, {} reactivations, {} inserts, {} deletes, {} failed \
         writes)",
        churn.total(),
        churn.cancels,
        churn.reactivations,
        churn.inserts,
        churn.deletes,
        churn.failed
    );
    let summary = format!(
        "{} min, {} subscriptions (seed {}), {} churn operations, {} faults injected \
         ({:.0} %), RSS after warm-up {:.1} MiB (most in the first quarter) -> {:.1} MiB (most \
         in the last quarter): {:+.1} % (last sample {:.1} MiB, VmHWM {:.1} MiB), fds {} -> {}, \
         events {} rows (max {} per subscription; bounds \
         {MAX_EVENTS_PER_SUBSCRIPTION}/{MAX_EVENTS_TOTAL}), server deletions {} rows for {} \
         DELETE /servers requests, leases {}, requests/min {:.0} first half vs {:.0} second \
         half (x{:.2}), resyncs started/min {:.1} vs {:.1} (x{:.2}), {} of {} resyncs finished \
         (the others met a fault), converged {:.1} s after faults stopped, {} invariant \
         violations",
        settings.minutes,
        settings.subscriptions,
        settings.seed,
        churn.total(),
        faults,
        FAULT_RATE * 100.0,
        mib(rss_early),
        mib(rss_late),
        growth * 100.0,
        mib(last.rss),
        mib(last.hwm),
        fds_early,
        fds_late,
        last.events,
        last.events_max_per_subscription,
        last.server_deletions,
        last.delete_server_requests,
        last.leases,
        first_per_minute,
        second_per_minute,
        second_per_minute / first_per_minute,
        first_resyncs_per_minute,
        second_resyncs_per_minute,
        second_resyncs_per_minute / first_resyncs_per_minute,
        last.resyncs - first.resyncs,
        last.resync_attempts - first.resync_attempts,
        converged.as_secs_f64(),
        violations.len() + foreign_changes.len(),
    );
    eprintln!("soak: SUMMARY {summary}");

    // ---- What must hold ----
    if growth >= RSS_GROWTH_LIMIT {
        failures.push(format!(
            "RSS grew {:.1} % after warm-up ({:.1} -> {:.1} MiB, most in the first and the last \
             quarter), limit {:.0} %",
            growth * 100.0,
            mib(rss_early),
            mib(rss_late),
            RSS_GROWTH_LIMIT * 100.0
        ));
    }
    if fds_late > fds_early + FD_SLACK {
        failures.push(format!(
            "open file descriptors grew from {fds_early} to {fds_late} (most in the first and \
             the last quarter)"
        ));
    }
    for pair in samples.windows(2) {
        let (before, s) = (&pair[0], &pair[1]);
        let at = format!("at {:.1} min", s.t / 60.0);
        if s.start_time != first.start_time {
            failures.push(format!(
                "{at}: the process start time changed ({} -> {}): it restarted",
                first.start_time, s.start_time
            ));
        }
        if !s.leader {
            failures.push(format!("{at}: the controller did not lead"));
        }
        if s.events > MAX_EVENTS_TOTAL as i64 {
            failures.push(format!(
                "{at}: {} events, bound {MAX_EVENTS_TOTAL}",
                s.events
            ));
        }
        if s.events_max_per_subscription > MAX_EVENTS_PER_SUBSCRIPTION as i64 {
            failures.push(format!(
                "{at}: {} events for one subscription, bound {MAX_EVENTS_PER_SUBSCRIPTION}",
                s.events_max_per_subscription
            ));
        }
        if s.server_deletions > s.delete_server_requests as i64 + DELETIONS_IN_FLIGHT {
            failures.push(format!(
                "{at}: {} deletion records for {} DELETE /servers requests: records that are \
                 not deletions",
                s.server_deletions, s.delete_server_requests
            ));
        }
        let deleted_since = (s.churn.deletes - before.churn.deletes) as i64;
        if s.tombstones > deleted_since {
            failures.push(format!(
                "{at}: {} deletion notices waiting, {deleted_since} rows deleted since the \
                 last sample: notices are not taken",
                s.tombstones
            ));
        }
        if s.leases != 1 {
            failures.push(format!("{at}: {} lease rows", s.leases));
        }
    }
    if !within_factor(first_per_minute, second_per_minute, RATE_FACTOR) {
        failures.push(format!(
            "requests/min {first_per_minute:.0} in the first half, {second_per_minute:.0} in \
             the second (factor {RATE_FACTOR})"
        ));
    }
    if !within_factor(
        first_resyncs_per_minute,
        second_resyncs_per_minute,
        RATE_FACTOR,
    ) {
        failures.push(format!(
            "resyncs started per minute {first_resyncs_per_minute:.1} in the first half, \
             {second_resyncs_per_minute:.1} in the second (factor {RATE_FACTOR}): the loop \
             does not keep its pace"
        ));
    }
    if panics > 0 {
        failures.push(format!("{panics} panics in the controller's log"));
    }
    failures.extend(violations);
    failures.extend(foreign_changes);
    assert!(
        failures.is_empty(),
        "the soak failed:\n  {}\n{}",
        failures.join("\n  "),
        tail(&child.output(), 4000)
    );
    drop(child);
}
