//! Benchmark harness: the controller as it is, against the in-process Hetzner simulator, next
//! to a naive baseline run against the same simulator in the same run.
//!
//! ```sh
//! cargo bench --bench controller -- --n 100,1000 --db sqlite,postgres --json bench.json
//! ```
//!
//! Flags: `--n` (comma list, each 1..=10000; default `100,1000`), `--db` (`sqlite`,
//! `postgres`; default both), `--toggles` (default 100), `--idle-seconds` (default 5),
//! `--action-seconds` (simulator action duration, default 0.1), `--json FILE`.
//! PostgreSQL comes from `TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! a database is created for each case and dropped after it. Unreachable PostgreSQL skips the
//! PostgreSQL cases with a warning. Everything stays on loopback.
//!
//! Per case (one N, one database), with a fresh simulator (budget unlimited) and database:
//! 1. N `active` rows are inserted, then the real loop (`Controller::run`, with PostgreSQL
//!    NOTIFY wake-ups on PostgreSQL) runs; converge = until every row is `ready`. Requests by
//!    endpoint come from the simulator's `/__simulator/stats`.
//! 2. Idle: with the loop still running and nothing to do, controller CPU over `--idle-seconds`.
//! 3. Steady resync: `Controller::resync()` three times on the converged fleet: requests and
//!    controller CPU per resync.
//! 4. Toggles: `--toggles` rows, one at a time, `UPDATE … SET status = 'canceled'`; latency is
//!    from issuing the UPDATE until the simulator has counted the first non-GET request (polled
//!    every 5 ms from its stats). The next toggle waits until the row is `deprovisioned`, so
//!    every write in the window belongs to the toggled row; a random 0–1 s pause before each
//!    toggle puts it at a random phase of the 1 s change poll.
//! 5. Peak RSS (`VmHWM`, reset per case through `/proc/self/clear_refs`) after the controller
//!    phases: the whole process, so it includes the simulator holding N servers.
//! 6. Naive baseline (same simulator, other names): per subscription, `GET ?name=` for key,
//!    firewall and server, create what is missing, wait on each action alone
//!    (`GET /actions/{id}` every 500 ms, the hcloud CLI's first interval); 32 subscriptions at
//!    a time. One provisioning pass, then one steady pass.
//!
//! CPU is "controller CPU": process CPU (`/proc/self/stat`) minus the simulator's threads (its
//! own runtime, threads named `sim-worker`), in USER_HZ ticks (10 ms). Linux only.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use sea_orm::sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, raw_sql};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use vps_controller::config::{Config, DeletionBudget};
use vps_controller::controller::leader::Leadership;
use vps_controller::controller::{Controller, triggers};
use vps_controller::hcloud::{Budget, Client, ClientConfig, Token};
use vps_controller::keys::{self, KeyAlgorithm, Sealer};
use vps_controller::reconcile::Reconciler;
use vps_controller::reconcile::desired::Owner;
use vps_controller::simulator::{self, RunningSimulator, SimulatorConfig};
use vps_controller::telemetry::metrics::Metrics;

const TOKEN: &str = "bench-token";
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Budget "unlimited": neither the simulator nor the client ever throttles.
const UNLIMITED_PER_HOUR: u32 = 1_000_000_000;
const CONCURRENCY: usize = 32;
const NAIVE_POLL: Duration = Duration::from_millis(500);
const MAX_N: usize = 10_000;

struct Args {
    ns: Vec<usize>,
    dbs: Vec<String>,
    toggles: usize,
    idle_seconds: u64,
    action_seconds: f64,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        ns: vec![100, 1000],
        dbs: vec!["sqlite".into(), "postgres".into()],
        toggles: 100,
        idle_seconds: 5,
        action_seconds: 0.1,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            // `cargo bench` passes `--bench` to every harness = false target.
            "--bench" => {}
            "--n" => {
                args.ns = value()?
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse::<usize>()
                            .context("--n: a comma list of numbers")
                    })
                    .collect::<Result<_>>()?;
            }
            "--db" => args.dbs = value()?.split(',').map(|s| s.trim().to_owned()).collect(),
            "--toggles" => args.toggles = value()?.parse().context("--toggles")?,
            "--idle-seconds" => args.idle_seconds = value()?.parse().context("--idle-seconds")?,
            "--action-seconds" => {
                args.action_seconds = value()?.parse().context("--action-seconds")?
            }
            "--json" => args.json = Some(value()?.into()),
            other => bail!(
                "unknown argument {other:?}; flags: --n 100,1000 --db sqlite,postgres --toggles 100 --idle-seconds 5 --action-seconds 0.1 --json FILE"
            ),
        }
    }
    if args.ns.iter().any(|&n| n == 0 || n > MAX_N) {
        bail!("--n: each N must be 1..={MAX_N}");
    }
    if args.dbs.iter().any(|db| db != "sqlite" && db != "postgres") {
        bail!("--db: sqlite and/or postgres");
    }
    if args.toggles > 1000
        || args.idle_seconds > 120
        || !(0.01..=5.0).contains(&args.action_seconds)
    {
        bail!("bounds: --toggles ≤ 1000, --idle-seconds ≤ 120, --action-seconds in 0.01..=5");
    }
    Ok(args)
}

// ---------------------------------------------------------------------------------------------
// Process measurements (Linux /proc).

/// utime + stime in seconds from a /proc `stat` line (USER_HZ = 100).
fn stat_cpu(stat: &str) -> Option<f64> {
    // The command name is in parentheses and may contain spaces: count fields after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// CPU seconds of this process minus the simulator's threads (`sim-*`).
fn controller_cpu() -> f64 {
    let process = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu(&s))
        .unwrap_or(f64::NAN);
    let mut sim = 0.0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.starts_with("sim-")
                && let Some(cpu) = std::fs::read_to_string(task.path().join("stat"))
                    .ok()
                    .and_then(|s| stat_cpu(&s))
            {
                sim += cpu;
            }
        }
    }
    process - sim
}

/// Peak RSS (`VmHWM`) in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets `VmHWM` to the current RSS (Linux ≥ 4.0), so each case reports its own peak.
fn reset_peak_rss() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("warning: cannot reset the peak RSS ({e}); peaks accumulate across cases");
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------------------
// Simulator stats.

struct Sim {
    http: reqwest::Client,
    running: RunningSimulator,
}

impl Sim {
    fn base(&self) -> String {
        self.running.base_url()
    }

    async fn stats(&self) -> BTreeMap<String, u64> {
        let url = format!("http://{}/__simulator/stats", self.running.addr());
        let body: Value = self
            .http
            .get(url)
            .send()
            .await
            .expect("simulator stats answer")
            .json()
            .await
            .expect("simulator stats are JSON");
        body["by_endpoint"]
            .as_object()
            .expect("stats have by_endpoint")
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    async fn reset(&self) {
        let url = format!("http://{}/__simulator/reset", self.running.addr());
        self.http
            .post(url)
            .send()
            .await
            .expect("simulator reset answers");
    }

    async fn writes(&self) -> u64 {
        self.stats()
            .await
            .iter()
            .filter(|(k, _)| !k.starts_with("GET "))
            .map(|(_, v)| v)
            .sum()
    }
}

fn total(stats: &BTreeMap<String, u64>) -> u64 {
    stats.values().sum()
}

// ---------------------------------------------------------------------------------------------
// Databases.

struct BenchDb {
    url: String,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl BenchDb {
    fn sqlite() -> Result<BenchDb> {
        let dir = tempfile::tempdir().context("temp dir for SQLite")?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        );
        Ok(BenchDb {
            url,
            _dir: Some(dir),
            postgres: None,
        })
    }

    async fn postgres() -> Result<BenchDb> {
        let admin_url = std::env::var("TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_POSTGRES_URL.to_owned());
        let mut admin =
            tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&admin_url))
                .await
                .context("connecting to PostgreSQL timed out")??;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let name = format!(
            "vpsc_bench_{}_{}_{:05x}",
            now.as_secs(),
            std::process::id(),
            now.subsec_nanos() & 0xf_ffff
        );
        admin
            .execute(raw_sql(AssertSqlSafe(format!(
                "CREATE DATABASE \"{name}\""
            ))))
            .await?;
        let _ = admin.close().await;
        let mut url = url::Url::parse(&admin_url)?;
        url.set_path(&format!("/{name}"));
        Ok(BenchDb {
            url: url.to_string(),
            _dir: None,
            postgres: Some((admin_url, name)),
        })
    }

    async fn cleanup(self) {
        if let Some((admin_url, name)) = &self.postgres
            && let Ok(mut admin) = PgConnection::connect(admin_url).await
        {
            if let Err(e) = admin
                .execute(raw_sql(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                ))))
                .await
            {
                eprintln!("warning: could not drop {name}: {e}");
            }
            let _ = admin.close().await;
        }
    }
}

async fn count_status(db: &DatabaseConnection, status: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT COUNT(*) AS c FROM subscriptions WHERE provisioning_status = '{status}'"
            ),
        ))
        .await
        .expect("count query")
        .expect("a count row");
    row.try_get::<i64>("", "c").expect("count is an integer")
}

async fn row_status(db: &DatabaseConnection, id: &str) -> String {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("SELECT provisioning_status FROM subscriptions WHERE id = '{id}'"),
        ))
        .await
        .expect("status query")
        .expect("the row exists");
    row.try_get::<String>("", "provisioning_status")
        .expect("status is text")
}

// ---------------------------------------------------------------------------------------------
// Results.

#[derive(Serialize, Default)]
struct ControllerResult {
    converge_seconds: f64,
    converged: bool,
    provision_requests: u64,
    provision_by_endpoint: BTreeMap<String, u64>,
    requests_per_subscription: f64,
    provision_cpu_seconds: f64,
    idle_seconds: f64,
    idle_cpu_seconds: f64,
    idle_cpu_percent_of_core: f64,
    idle_requests: u64,
    steady_resync_requests: Vec<u64>,
    steady_resync_cpu_seconds: Vec<f64>,
    steady_resync_seconds: Vec<f64>,
    peak_rss_mib: f64,
    toggles: usize,
    toggle_first_write_ms: Vec<f64>,
    toggle_p50_ms: f64,
    toggle_p99_ms: f64,
    toggle_max_ms: f64,
    toggles_without_write_in_10s: usize,
}

#[derive(Serialize, Default)]
struct NaiveResult {
    provision_seconds: f64,
    provision_requests: u64,
    provision_by_endpoint: BTreeMap<String, u64>,
    requests_per_subscription: f64,
    provision_cpu_seconds: f64,
    steady_pass_requests: u64,
    steady_pass_seconds: f64,
    steady_pass_cpu_seconds: f64,
    errors: usize,
}

#[derive(Serialize)]
struct CaseResult {
    n: usize,
    db: String,
    controller: ControllerResult,
    naive: NaiveResult,
    /// controller / naive.
    ratios: BTreeMap<String, f64>,
}

// ---------------------------------------------------------------------------------------------
// The controller as `run` wires it (ed25519 keys, concurrency 32, budget unlimited).

fn bench_config() -> Config {
    Config {
        ssh_key_algorithm: KeyAlgorithm::Ed25519,
        concurrency: CONCURRENCY,
        // 100 cancellations within minutes would trip the deletion guard's hourly budget.
        deletion_budget: DeletionBudget {
            min_per_hour: 1_000_000,
            fleet_percent: 100,
        },
        ..Config::builtin()
    }
}

async fn controller(sim: &Sim, db: &DatabaseConnection) -> Result<Arc<Controller<Client>>> {
    let api = Client::new(ClientConfig {
        budget: Arc::new(Budget::new(UNLIMITED_PER_HOUR)),
        ..ClientConfig::new(sim.base(), Token::new(TOKEN))
    })?;
    let config = bench_config();
    let owner = Owner::new(vps_controller::db::installation::id(db).await?, &config);
    let reconciler = Reconciler {
        api,
        db: db.clone(),
        sealer: Sealer::ephemeral(),
        config,
        owner,
        action_timeout: Duration::from_secs(60),
        leadership: Leadership::always(),
        key_checks: Default::default(),
    };
    Ok(Arc::new(Controller::new(
        reconciler,
        Arc::new(Metrics::new()),
        UNLIMITED_PER_HOUR,
    )))
}

async fn insert_rows(db: &DatabaseConnection, n: usize) -> Result<()> {
    for start in (0..n).step_by(500) {
        let values: Vec<String> = (start..(start + 500).min(n))
            .map(|i| format!("('sub-{i}', 'user-{i}', 'active', 'starter')"))
            .collect();
        db.execute_unprepared(&format!(
            "INSERT INTO subscriptions (id, user_id, status, plan) VALUES {}",
            values.join(", ")
        ))
        .await?;
    }
    Ok(())
}

async fn run_controller(
    args: &Args,
    n: usize,
    backend: &str,
    sim: &Sim,
    bench_db: &BenchDb,
) -> Result<ControllerResult> {
    let mut out = ControllerResult::default();
    let db = vps_controller::db::connect(&bench_db.url).await?;
    vps_controller::db::migrate(&db).await?;
    insert_rows(&db, n).await?;
    let controller = controller(sim, &db).await?;
    sim.reset().await;

    // 1. Converge from empty with the real loop.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if backend == "postgres" {
        tokio::spawn(triggers::listen_for_changes(
            bench_db.url.clone(),
            controller.wake.clone(),
            shutdown_rx.clone(),
        ));
        // Let LISTEN connect before anything is timed.
        tokio::time::sleep(Duration::from_millis(300)).await;
    } else {
        // As `run` does: commits by other connections (the toggles) wake the change pass.
        tokio::spawn(triggers::watch_sqlite(
            bench_db.url.clone(),
            controller.wake.clone(),
            shutdown_rx.clone(),
        ));
    }
    let cpu = controller_cpu();
    let started = Instant::now();
    let mut control = tokio::spawn(Arc::clone(&controller).run(shutdown_rx));
    let deadline = Duration::from_secs(60) + Duration::from_millis(100) * n as u32;
    loop {
        if count_status(&db, "ready").await == n as i64 {
            out.converged = true;
            break;
        }
        if started.elapsed() > deadline {
            eprintln!("  not converged after {deadline:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out.converge_seconds = started.elapsed().as_secs_f64();
    out.provision_cpu_seconds = controller_cpu() - cpu;
    out.provision_by_endpoint = sim.stats().await;
    out.provision_requests = total(&out.provision_by_endpoint);
    out.requests_per_subscription = out.provision_requests as f64 / n as f64;
    eprintln!(
        "  converged in {:.1} s, {} requests",
        out.converge_seconds, out.provision_requests
    );

    // 2. Idle: the loop runs, nothing changes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = total(&sim.stats().await);
    let cpu = controller_cpu();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    out.idle_seconds = started.elapsed().as_secs_f64();
    out.idle_cpu_seconds = controller_cpu() - cpu;
    out.idle_cpu_percent_of_core = 100.0 * out.idle_cpu_seconds / out.idle_seconds;
    out.idle_requests = total(&sim.stats().await) - before;

    // 3. Steady resyncs on the converged fleet (the loop keeps running, idle).
    for _ in 0..3 {
        let before = total(&sim.stats().await);
        let cpu = controller_cpu();
        let started = Instant::now();
        let report = controller.resync().await?;
        out.steady_resync_seconds
            .push(started.elapsed().as_secs_f64());
        out.steady_resync_cpu_seconds.push(controller_cpu() - cpu);
        out.steady_resync_requests
            .push(total(&sim.stats().await) - before);
        if report.failed > 0 {
            eprintln!("  steady resync had failures: {report:?}");
        }
    }

    // 4. Toggles while the rest sits idle.
    let toggles = args.toggles.min(n);
    out.toggles = toggles;
    for t in 0..toggles {
        let id = format!("sub-{}", t * n / toggles);
        // A random phase against the 1 s change poll: the previous toggle ended right after a
        // tick, so toggling at once would always wait almost a full second.
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..1000))).await;
        let before = sim.writes().await;
        let started = Instant::now();
        db.execute_unprepared(&format!(
            "UPDATE subscriptions SET status = 'canceled' WHERE id = '{id}'"
        ))
        .await?;
        let mut seen = false;
        while started.elapsed() < Duration::from_secs(10) {
            if sim.writes().await > before {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if seen {
            out.toggle_first_write_ms
                .push(started.elapsed().as_secs_f64() * 1000.0);
        } else {
            out.toggles_without_write_in_10s += 1;
        }
        // Its remaining writes (firewall, key) must not count for the next toggle.
        let settle = Instant::now();
        while row_status(&db, &id).await != "deprovisioned"
            && settle.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut sorted = out.toggle_first_write_ms.clone();
    sorted.sort_by(f64::total_cmp);
    out.toggle_p50_ms = percentile(&sorted, 0.50);
    out.toggle_p99_ms = percentile(&sorted, 0.99);
    out.toggle_max_ms = sorted.last().copied().unwrap_or(f64::NAN);
    out.peak_rss_mib = peak_rss_mib();

    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(60), &mut control)
        .await
        .is_err()
    {
        control.abort();
    }
    db.close().await?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The naive baseline: what a script with an official client does, per subscription per pass.

struct Naive {
    http: reqwest::Client,
    base: String,
    config: Config,
}

impl Naive {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path}: {status} {body}");
        }
        Ok(body)
    }

    async fn find(&self, kind: &str, name: &str) -> Result<Option<Value>> {
        let body = self
            .call(reqwest::Method::GET, &format!("/{kind}?name={name}"), None)
            .await?;
        Ok(body[kind].as_array().and_then(|a| a.first()).cloned())
    }

    /// Polls one action until it is no longer running, like `action.wait_until_finished()`.
    async fn wait(&self, action: &Value) -> Result<()> {
        let Some(id) = action["id"].as_i64() else {
            return Ok(());
        };
        let mut status = action["status"].as_str().unwrap_or("running").to_owned();
        while status == "running" {
            tokio::time::sleep(NAIVE_POLL).await;
            let body = self
                .call(reqwest::Method::GET, &format!("/actions/{id}"), None)
                .await?;
            status = body["action"]["status"]
                .as_str()
                .unwrap_or("error")
                .to_owned();
        }
        if status != "success" {
            bail!("action {id} ended {status}");
        }
        Ok(())
    }

    async fn ensure(&self, id: &str) -> Result<()> {
        let name = format!("naive-{id}");
        let plan = self
            .config
            .plans
            .get("starter")
            .context("the built-in starter plan")?;
        let key_id = match self.find("ssh_keys", &name).await? {
            Some(key) => key["id"].clone(),
            None => {
                let pair = keys::generate(KeyAlgorithm::Ed25519, &name).await?;
                let body = json!({"name": name, "public_key": pair.public_openssh});
                self.call(reqwest::Method::POST, "/ssh_keys", Some(body))
                    .await?["ssh_key"]["id"]
                    .clone()
            }
        };
        let firewall_id = match self.find("firewalls", &name).await? {
            Some(firewall) => firewall["id"].clone(),
            None => {
                let body = json!({"name": name, "rules": plan.firewall_rules});
                let created = self
                    .call(reqwest::Method::POST, "/firewalls", Some(body))
                    .await?;
                for action in created["actions"].as_array().into_iter().flatten() {
                    self.wait(action).await?;
                }
                created["firewall"]["id"].clone()
            }
        };
        if self.find("servers", &name).await?.is_none() {
            let body = json!({
                "name": name,
                "server_type": plan.server_type,
                "image": plan.image,
                "location": plan.location,
                "ssh_keys": [key_id],
                "firewalls": [{"firewall": firewall_id}],
                "labels": {"naive": "1"},
            });
            let created = self
                .call(reqwest::Method::POST, "/servers", Some(body))
                .await?;
            self.wait(&created["action"]).await?;
            for action in created["next_actions"].as_array().into_iter().flatten() {
                self.wait(action).await?;
            }
        }
        Ok(())
    }

    /// One pass over every subscription, 32 at a time; returns how many failed.
    async fn pass(&self, n: usize) -> usize {
        futures::stream::iter(0..n)
            .map(|i| async move { self.ensure(&format!("sub-{i}")).await })
            .buffer_unordered(CONCURRENCY)
            .filter(|r| {
                if let Err(e) = r {
                    eprintln!("  naive: {e:#}");
                }
                futures::future::ready(r.is_err())
            })
            .count()
            .await
    }
}

async fn run_naive(n: usize, sim: &Sim) -> Result<NaiveResult> {
    let naive = Naive {
        http: reqwest::Client::new(),
        base: sim.base(),
        config: bench_config(),
    };
    let mut out = NaiveResult::default();
    sim.reset().await;
    let cpu = controller_cpu();
    let started = Instant::now();
    out.errors += naive.pass(n).await;
    out.provision_seconds = started.elapsed().as_secs_f64();
    out.provision_cpu_seconds = controller_cpu() - cpu;
    out.provision_by_endpoint = sim.stats().await;
    out.provision_requests = total(&out.provision_by_endpoint);
    out.requests_per_subscription = out.provision_requests as f64 / n as f64;

    sim.reset().await;
    let cpu = controller_cpu();
    let started = Instant::now();
    out.errors += naive.pass(n).await;
    out.steady_pass_seconds = started.elapsed().as_secs_f64();
    out.steady_pass_cpu_seconds = controller_cpu() - cpu;
    out.steady_pass_requests = total(&sim.stats().await);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

async fn run_case(
    args: &Args,
    n: usize,
    backend: &str,
    sim_rt: &tokio::runtime::Handle,
) -> Result<Option<CaseResult>> {
    let bench_db = match backend {
        "postgres" => match BenchDb::postgres().await {
            Ok(db) => db,
            Err(e) => {
                eprintln!("!!! PostgreSQL unavailable ({e:#}): skipping N = {n} on PostgreSQL");
                return Ok(None);
            }
        },
        _ => BenchDb::sqlite()?,
    };
    let action_seconds = args.action_seconds;
    let running = sim_rt
        .spawn(async move {
            simulator::spawn(
                SimulatorConfig {
                    token: Some(TOKEN.into()),
                    action_seconds,
                    rate_limit: u32::MAX,
                    ..SimulatorConfig::default()
                },
                "127.0.0.1:0".parse().expect("a loopback address"),
            )
            .await
        })
        .await??;
    let sim = Sim {
        http: reqwest::Client::new(),
        running,
    };
    reset_peak_rss();
    eprintln!("N = {n}, {backend}: controller");
    let controller = run_controller(args, n, backend, &sim, &bench_db).await;
    eprintln!("N = {n}, {backend}: naive baseline");
    let naive = match &controller {
        Ok(_) => run_naive(n, &sim).await,
        Err(_) => Ok(NaiveResult::default()),
    };
    sim.running.shutdown().await;
    bench_db.cleanup().await;
    let controller = controller?;
    let naive = naive?;
    let mut ratios = BTreeMap::new();
    ratios.insert(
        "provision_requests".into(),
        controller.provision_requests as f64 / naive.provision_requests as f64,
    );
    ratios.insert(
        "converge_seconds".into(),
        controller.converge_seconds / naive.provision_seconds,
    );
    ratios.insert(
        "steady_pass_requests".into(),
        mean(
            &controller
                .steady_resync_requests
                .iter()
                .map(|&r| r as f64)
                .collect::<Vec<_>>(),
        ) / naive.steady_pass_requests as f64,
    );
    ratios.insert(
        "steady_pass_cpu_seconds".into(),
        mean(&controller.steady_resync_cpu_seconds) / naive.steady_pass_cpu_seconds,
    );
    Ok(Some(CaseResult {
        n,
        db: backend.into(),
        controller,
        naive,
        ratios,
    }))
}

fn print_table(results: &[CaseResult]) {
    println!();
    println!(
        "| N | db | converge s | requests (req/sub) | req/steady resync | CPU s/resync | idle CPU % core | peak RSS MiB | toggle→first write p50 / p99 / max ms |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let c = &r.controller;
        println!(
            "| {} | {} | {:.1}{} | {} ({:.2}) | {} | {:.2} | {:.1}{} | {:.0} | {:.0} / {:.0} / {:.0}{} |",
            r.n,
            r.db,
            c.converge_seconds,
            if c.converged { "" } else { " (not converged)" },
            c.provision_requests,
            c.requests_per_subscription,
            c.steady_resync_requests
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            mean(&c.steady_resync_cpu_seconds),
            c.idle_cpu_percent_of_core,
            if c.idle_requests > 0 {
                format!(" ({} requests)", c.idle_requests)
            } else {
                String::new()
            },
            c.peak_rss_mib,
            c.toggle_p50_ms,
            c.toggle_p99_ms,
            c.toggle_max_ms,
            if c.toggles_without_write_in_10s > 0 {
                format!(
                    " ({} of {} missed)",
                    c.toggles_without_write_in_10s, c.toggles
                )
            } else {
                String::new()
            },
        );
    }
    println!();
    println!(
        "| N | db | naive provision s | naive requests (req/sub) | naive req/steady pass | naive CPU s/pass | ratio provision req | ratio steady req | ratio steady CPU | ratio converge time |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let v = &r.naive;
        let ratio = |k: &str| r.ratios.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {:.1} | {} ({:.2}) | {} | {:.2} | {:.3} | {:.4} | {:.2} | {:.2} |",
            r.n,
            r.db,
            v.provision_seconds,
            v.provision_requests,
            v.requests_per_subscription,
            v.steady_pass_requests,
            v.steady_pass_cpu_seconds,
            ratio("provision_requests"),
            ratio("steady_pass_requests"),
            ratio("steady_pass_cpu_seconds"),
            ratio("converge_seconds"),
        );
    }
    println!();
    for r in results {
        println!(
            "N = {} {}: controller provisioning requests by endpoint: {:?}",
            r.n, r.db, r.controller.provision_by_endpoint
        );
        println!(
            "N = {} {}: naive provisioning requests by endpoint: {:?}",
            r.n, r.db, r.naive.provision_by_endpoint
        );
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sim-worker")
        .enable_all()
        .build()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("bench")
        .enable_all()
        .build()?;
    let results = rt.block_on(async {
        let mut results = Vec::new();
        for &n in &args.ns {
            for backend in &args.dbs {
                if let Some(result) = run_case(&args, n, backend, sim_rt.handle()).await? {
                    results.push(result);
                }
            }
        }
        anyhow::Ok(results)
    })?;
    print_table(&results);
    if let Some(path) = &args.json {
        let file = std::fs::File::create(path)
            .with_context(|| format!("--json {}: cannot create", path.display()))?;
        serde_json::to_writer_pretty(
            file,
            &json!({
                "machine_cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "concurrency": CONCURRENCY,
                "action_seconds": args.action_seconds,
                "toggles": args.toggles,
                "cases": results,
            }),
        )?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
