//! Benchmark harness: the controller as it is, against the Hetzner simulator running as a
//! separate process, next to a naive baseline run against the same simulator in the same run;
//! and, with `--budget real`, the controller under Hetzner's budget model run faster.
//!
//! ```sh
//! cargo bench --bench controller -- --n 100,1000 --db sqlite,postgres --json bench.json
//! cargo bench --bench controller -- --budget real --budget-time-scale 60 --n 3000 --db sqlite
//! ```
//!
//! Flags: `--n` (comma list, each 1..=10000; default `100,1000`), `--db` (`sqlite`,
//! `postgres`; default both), `--toggles` (default 100), `--idle-seconds` (default 5),
//! `--action-seconds` (simulator action duration, default 0.1), `--naive-n M` (the baseline
//! provisions only the first min(N, M) subscriptions; default N), `--budget` (`unlimited`, the
//! default, or `real`), `--budget-time-scale F` (with `--budget real`; default 60),
//! `--steady-seconds S` (with `--budget real`: how long the converged fleet is watched;
//! default three resync intervals, at most 120 s), `--steady-resyncs K` (default 3, 1..=50:
//! on a noisy machine more resyncs and their median make an A/B comparison meaningful),
//! `--json FILE`. With `RUST_LOG` set (e.g.
//! `RUST_LOG=vps_controller=info`) the controller's logs go to stderr.
//! PostgreSQL comes from `TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`);
//! a database is created for each case and dropped after it. Unreachable PostgreSQL skips the
//! PostgreSQL cases with a warning. Everything stays on loopback.
//!
//! The simulator is this package's binary (`vps-controller simulator --listen 127.0.0.1:0`, a
//! fresh child process per case, logs at `warn` on stderr): the bench reads the endpoint it
//! prints, then polls `/__simulator/stats` until it answers (no fixed sleep). So the bench
//! process holds only the controller (and the baseline, and the bench's own polling): its CPU
//! (`/proc/self/stat`) and peak RSS (`VmHWM`, reset per case through `/proc/self/clear_refs`)
//! are the controller's own. The simulator's CPU and peak RSS are read from
//! `/proc/<child>/stat` and `/proc/<child>/status` and reported beside them, for context.
//!
//! # `--budget unlimited` (default): cost and latency
//!
//! Per case (one N, one database), with a fresh simulator (budget unlimited) and database:
//! 1. N `active` rows are inserted (500 per statement), then the real loop
//!    (`Controller::run`, with PostgreSQL NOTIFY wake-ups on PostgreSQL, the `data_version`
//!    watcher on SQLite) runs; converge = until every row is `ready`. Requests by endpoint
//!    come from the simulator's `/__simulator/stats`.
//! 2. Idle: with the loop still running and nothing to do, controller CPU over `--idle-seconds`,
//!    from one second after the loop's next resync has finished (so the window holds none).
//! 3. Steady resync: `Controller::resync()` `--steady-resyncs` times (default 3) on the
//!    converged fleet: requests and controller CPU per resync (mean and median); then, as
//!    often, its listing alone and its table scan alone, which split that CPU. A resync
//!    that takes over `STEADY_RESYNC_LIMIT` (120 s) is recorded as timed out (its reconciles
//!    run on) and ends the phase.
//! 4. Toggles: `--toggles` rows, one at a time, `UPDATE … SET status = 'canceled'`; latency is
//!    from issuing the UPDATE until the simulator has counted the first non-GET request (polled
//!    every 5 ms from its stats). The next toggle waits until the row is `deprovisioned`, so
//!    every write in the window belongs to the toggled row; a random 0–1 s pause before each
//!    toggle puts it at a random phase of the 1 s change poll. The phase stops after
//!    `TOGGLE_PHASE_LIMIT` (5 min); `toggles` is how many ran.
//! 5. Peak RSS of the bench process (`VmHWM`, reset at the start of the case) after the
//!    controller phases; also the RSS at the start of the case (what earlier cases left
//!    allocated in this process) and the simulator's own peak.
//! 6. Naive baseline (same simulator, other names): per subscription, `GET ?name=` for key,
//!    firewall and server, create what is missing, wait on each action alone
//!    (`GET /actions/{id}` every 500 ms, the hcloud CLI's first interval); 32 subscriptions at
//!    a time. One provisioning pass, then one steady pass, over min(N, `--naive-n`)
//!    subscriptions (it needs about 50 s per 1,000, so at N = 10,000 `--naive-n 1000` keeps a
//!    case near 10 minutes); the ratios compare per-subscription figures.
//!
//! # `--budget real --budget-time-scale F`: honest budget use
//!
//! Hetzner's model (a bucket of 3,600 refilling 1 per second, API-NOTES §9) run F times faster:
//! the simulator with `--rate-limit 3600 --budget-time-scale F`, the controller with the same
//! budget (`Budget::new(3600).with_time_scale(F)`, `Controller::new(…, 3600 × F)`, as
//! `run --hcloud-budget-time-scale F` wires it) and its resync configured at one scaled minute
//! (`resync_seconds` = 60 / F, at least 1; the budget stretches it). One real second is F
//! seconds of budget: at F = 60 a real minute is an hour at Hetzner, and 1 request per scaled
//! second is 60 per real second. Only the budget is scaled: actions, the change poll and
//! backoffs run in real time. Per case: N rows converge from empty, then the fleet is watched
//! for `--steady-seconds`; the simulator's stats (and the bucket, read without spending a
//! token) are sampled every scaled minute (60 / F real seconds, within 0.05..=5 s). Reported:
//! 429s (target 0), requests per scaled second overall and from the moment the bucket is
//! drained (remaining ≤ 1 %) while creates remain (target: the refill rate, 1/s), listing
//! requests (`GET /servers|/ssh_keys|/firewalls` with a `label_selector`) as a share of the
//! requests and of the budget (the largest over any window of one resync interval, against
//! the controller's `RESYNC_BUDGET_SHARE` of 0.25), and creates per scaled minute (windows with
//! none while creates remained: target 0). No toggles and no baseline (it would collect 429s).
//! N = 3,000 needs about 12,000 requests, 3.4 bucket-fulls; at F = 60 that is about 3 minutes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use sea_orm::sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, raw_sql};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use vps_controller::config::{Config, DeletionBudget};
use vps_controller::controller::leader::Leadership;
use vps_controller::controller::{Controller, triggers};
use vps_controller::db::subscriptions;
use vps_controller::hcloud::budget::check_time_scale;
use vps_controller::hcloud::{Budget, Client, ClientConfig, Token};
use vps_controller::keys::{self, KeyAlgorithm, Sealer};
use vps_controller::reconcile::Reconciler;
use vps_controller::reconcile::desired::Owner;
use vps_controller::reconcile::observe;
use vps_controller::ssh::Bootstrapper;
use vps_controller::telemetry::metrics::Metrics;
use vps_controller::telemetry::metrics::stat_cpu_seconds;

const TOKEN: &str = "bench-token";
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The simulator: this package's binary, `vps-controller simulator`.
const SIMULATOR_BIN: &str = env!("CARGO_BIN_EXE_vps-controller");
/// Budget "unlimited": neither the simulator nor the client ever throttles.
const UNLIMITED_PER_HOUR: u32 = 1_000_000_000;
/// Hetzner's default budget (API-NOTES §9), for `--budget real`.
const HETZNER_PER_HOUR: u32 = 3600;
/// The controller's resync share of the budget (`RESYNC_BUDGET_SHARE` in
/// `src/controller/mod.rs`), what the listings are measured against.
const RESYNC_BUDGET_SHARE: f64 = 0.25;
const CONCURRENCY: usize = 32;
const NAIVE_POLL: Duration = Duration::from_millis(500);
const MAX_N: usize = 10_000;
/// Longest a measured steady resync may take before the phase gives up on it.
const STEADY_RESYNC_LIMIT: Duration = Duration::from_secs(120);
/// Longest the toggle phase runs.
const TOGGLE_PHASE_LIMIT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, PartialEq)]
enum BudgetMode {
    Unlimited,
    Real,
}

struct Args {
    ns: Vec<usize>,
    dbs: Vec<String>,
    toggles: usize,
    idle_seconds: u64,
    action_seconds: f64,
    naive_n: Option<usize>,
    budget: BudgetMode,
    budget_time_scale: f64,
    steady_seconds: Option<f64>,
    steady_resyncs: usize,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        ns: vec![100, 1000],
        dbs: vec!["sqlite".into(), "postgres".into()],
        toggles: 100,
        idle_seconds: 5,
        action_seconds: 0.1,
        naive_n: None,
        budget: BudgetMode::Unlimited,
        budget_time_scale: 60.0,
        steady_seconds: None,
        steady_resyncs: 3,
        json: None,
    };
    let mut scale_given = false;
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
            "--naive-n" => args.naive_n = Some(value()?.parse().context("--naive-n")?),
            "--idle-seconds" => args.idle_seconds = value()?.parse().context("--idle-seconds")?,
            "--action-seconds" => {
                args.action_seconds = value()?.parse().context("--action-seconds")?
            }
            "--budget" => {
                args.budget = match value()?.as_str() {
                    "unlimited" => BudgetMode::Unlimited,
                    "real" => BudgetMode::Real,
                    other => bail!("--budget: unlimited or real, not {other:?}"),
                }
            }
            "--budget-time-scale" => {
                let scale: f64 = value()?.parse().context("--budget-time-scale: a number")?;
                args.budget_time_scale = check_time_scale(scale).context("--budget-time-scale")?;
                scale_given = true;
            }
            "--steady-seconds" => {
                args.steady_seconds = Some(value()?.parse().context("--steady-seconds")?)
            }
            "--steady-resyncs" => {
                args.steady_resyncs = value()?.parse().context("--steady-resyncs")?
            }
            "--json" => args.json = Some(value()?.into()),
            other => bail!(
                "unknown argument {other:?}; flags: --n 100,1000 --db sqlite,postgres --toggles 100 --idle-seconds 5 --action-seconds 0.1 --naive-n M --steady-resyncs 3 --budget unlimited|real --budget-time-scale 60 --steady-seconds S --json FILE"
            ),
        }
    }
    if args.naive_n.is_some_and(|m| m == 0 || m > MAX_N) {
        bail!("--naive-n: 1..={MAX_N}");
    }
    if args.ns.iter().any(|&n| n == 0 || n > MAX_N) {
        bail!("--n: each N must be 1..={MAX_N}");
    }
    if args.dbs.iter().any(|db| db != "sqlite" && db != "postgres") {
        bail!("--db: sqlite and/or postgres");
    }
    if !(1..=50).contains(&args.steady_resyncs) {
        bail!("--steady-resyncs: 1..=50");
    }
    if args.toggles > 1000
        || args.idle_seconds > 120
        || !(0.01..=5.0).contains(&args.action_seconds)
    {
        bail!("bounds: --toggles ≤ 1000, --idle-seconds ≤ 120, --action-seconds in 0.01..=5");
    }
    if args.budget == BudgetMode::Unlimited && (scale_given || args.steady_seconds.is_some()) {
        bail!("--budget-time-scale and --steady-seconds go with --budget real");
    }
    if args
        .steady_seconds
        .is_some_and(|s| !(0.0..=3600.0).contains(&s))
    {
        bail!("--steady-seconds: 0..=3600");
    }
    Ok(args)
}

// ---------------------------------------------------------------------------------------------
// Process measurements (Linux /proc).

/// CPU seconds of a process (`"self"` or a pid) so far.
fn process_cpu(process: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{process}/stat"))
        .ok()
        .and_then(|s| stat_cpu_seconds(&s))
        .unwrap_or(f64::NAN)
}

/// CPU seconds of this process: the controller, the baseline and the bench's own polling (the
/// simulator is another process).
fn controller_cpu() -> f64 {
    process_cpu("self")
}

/// A `/proc/<process>/status` figure in kB (`VmHWM`, `VmRSS`), as MiB.
fn status_mib(process: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
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
// The simulator, a child process.

struct Sim {
    http: reqwest::Client,
    child: tokio::process::Child,
    pid: String,
    /// `http://127.0.0.1:PORT`
    root: String,
}

impl Sim {
    /// Starts `vps-controller simulator` on a free port and waits until its hooks answer.
    async fn start(action_seconds: f64, rate_limit: u32, budget_time_scale: f64) -> Result<Sim> {
        let mut child = tokio::process::Command::new(SIMULATOR_BIN)
            .args([
                "simulator",
                "--listen",
                "127.0.0.1:0",
                "--token",
                TOKEN,
                "--action-seconds",
                &action_seconds.to_string(),
                "--rate-limit",
                &rate_limit.to_string(),
                "--budget-time-scale",
                &budget_time_scale.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {SIMULATOR_BIN} simulator"))?;
        let pid = child.id().context("the simulator has no pid")?.to_string();
        // Its one stdout line is the endpoint, printed once it listens.
        let stdout = child.stdout.take().context("the simulator's stdout")?;
        let endpoint = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::io::BufReader::new(stdout).lines().next_line(),
        )
        .await
        .context("the simulator printed no endpoint within 60 s")??
        .context("the simulator exited before printing its endpoint")?;
        let root = endpoint
            .strip_suffix("/v1")
            .with_context(|| format!("unexpected simulator endpoint {endpoint:?}"))?
            .to_owned();
        let sim = Sim {
            http: reqwest::Client::new(),
            child,
            pid,
            root,
        };
        // Ready when the hooks answer: polled, no fixed sleep.
        let started = Instant::now();
        loop {
            if let Ok(response) = sim.http.get(sim.hook("stats")).send().await
                && response.status().is_success()
            {
                return Ok(sim);
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the simulator at {} did not answer within 60 s", sim.root);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn base(&self) -> String {
        format!("{}/v1", self.root)
    }

    fn hook(&self, name: &str) -> String {
        format!("{}/__simulator/{name}", self.root)
    }

    /// The whole `/__simulator/stats` answer.
    async fn stats_json(&self) -> Value {
        self.http
            .get(self.hook("stats"))
            .send()
            .await
            .expect("simulator stats answer")
            .json()
            .await
            .expect("simulator stats are JSON")
    }

    /// Requests by endpoint (`"METHOD /template"`), the non-zero ones.
    async fn stats(&self) -> BTreeMap<String, u64> {
        by_endpoint(&self.stats_json().await)
    }

    async fn reset(&self) {
        self.http
            .post(self.hook("reset"))
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

    /// The simulator's CPU seconds so far.
    fn cpu(&self) -> f64 {
        process_cpu(&self.pid)
    }

    /// The simulator's peak RSS (it is fresh per case, so the peak is this case's).
    fn peak_rss_mib(&self) -> f64 {
        status_mib(&self.pid, "VmHWM")
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn by_endpoint(stats: &Value) -> BTreeMap<String, u64> {
    stats["by_endpoint"]
        .as_object()
        .expect("stats have by_endpoint")
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
        .filter(|(_, v)| *v > 0)
        .collect()
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
    /// The simulator's CPU while the controller converged (another process; for context).
    simulator_provision_cpu_seconds: f64,
    idle_seconds: f64,
    idle_cpu_seconds: f64,
    idle_cpu_percent_of_core: f64,
    idle_requests: u64,
    steady_resync_requests: Vec<u64>,
    steady_resync_cpu_seconds: Vec<f64>,
    steady_resync_seconds: Vec<f64>,
    simulator_steady_resync_cpu_seconds: Vec<f64>,
    /// The steady resync's listing alone (`observe::observe`), as often as the resyncs ran.
    steady_listing_cpu_seconds: Vec<f64>,
    /// The steady resync's table scan alone (`subscriptions::scan`, rows decoded, no verdict).
    steady_scan_cpu_seconds: Vec<f64>,
    /// Steady resyncs that did not finish within `STEADY_RESYNC_LIMIT` (the phase stopped).
    steady_resyncs_timed_out: usize,
    /// The bench process's peak RSS during the controller phases: the controller's own.
    peak_rss_mib: f64,
    /// The bench process's RSS when the case started (left by earlier cases).
    rss_at_start_mib: f64,
    /// The simulator process's peak RSS by the end of the controller phases.
    simulator_peak_rss_mib: f64,
    toggles: usize,
    toggle_first_write_ms: Vec<f64>,
    toggle_p50_ms: f64,
    toggle_p99_ms: f64,
    toggle_max_ms: f64,
    toggles_without_write_in_10s: usize,
}

#[derive(Serialize, Default)]
struct NaiveResult {
    /// How many subscriptions the baseline provisioned (min(N, `--naive-n`)).
    subscriptions: usize,
    provision_seconds: f64,
    provision_requests: u64,
    provision_by_endpoint: BTreeMap<String, u64>,
    requests_per_subscription: f64,
    provision_cpu_seconds: f64,
    simulator_provision_cpu_seconds: f64,
    steady_pass_requests: u64,
    steady_pass_seconds: f64,
    steady_pass_cpu_seconds: f64,
    simulator_steady_pass_cpu_seconds: f64,
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
// The controller as `run` wires it (ed25519 keys, concurrency 32; the budget unlimited, or
// Hetzner's at a time scale).

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

/// The API budget the controller and the simulator share: requests per hour and time scale.
#[derive(Clone, Copy)]
struct BudgetModel {
    per_hour: u32,
    time_scale: f64,
}

impl BudgetModel {
    const UNLIMITED: BudgetModel = BudgetModel {
        per_hour: UNLIMITED_PER_HOUR,
        time_scale: 1.0,
    };
}

async fn controller(
    sim: &Sim,
    db: &DatabaseConnection,
    budget: BudgetModel,
) -> Result<Arc<Controller<Client>>> {
    let api = Client::new(ClientConfig {
        budget: Arc::new(Budget::new(budget.per_hour).with_time_scale(budget.time_scale)?),
        ..ClientConfig::new(sim.base(), Token::new(TOKEN))
    })?;
    let mut config = bench_config();
    if budget.time_scale != 1.0 {
        // The default resync (60 s) in the same scaled time; the budget stretches it.
        config.resync_seconds = (60.0 / budget.time_scale).round().max(1.0) as u64;
    }
    let owner = Owner::new(vps_controller::db::installation::id(db).await?, &config);
    let metrics = Arc::new(Metrics::new());
    // The bench measures Hetzner requests, CPU and memory of the loop; its simulator has no
    // SSH endpoint, so `ready` means running as before.
    let ssh = vps_controller::config::SshSettings {
        enabled: false,
        ..config.ssh.clone()
    };
    let reconciler = Reconciler {
        api,
        db: db.clone(),
        sealer: Sealer::ephemeral(),
        config,
        owner,
        action_timeout: Duration::from_secs(60),
        leadership: Leadership::always(),
        key_checks: Default::default(),
        bootstrapper: Arc::new(Bootstrapper::new(ssh, Arc::clone(&metrics))),
        metrics,
    };
    // As `run` does: the resync's budget in the same scaled time as the bucket.
    let scaled_per_hour = (f64::from(budget.per_hour) * budget.time_scale)
        .round()
        .min(f64::from(u32::MAX)) as u32;
    Ok(Arc::new(Controller::new(reconciler, scaled_per_hour)))
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

/// The controller's loop on a database of N `active` rows, wired as `run` wires it.
struct Loop {
    db: DatabaseConnection,
    controller: Arc<Controller<Client>>,
    shutdown: watch::Sender<bool>,
    shutdown_rx: watch::Receiver<bool>,
    control: Option<tokio::task::JoinHandle<()>>,
}

impl Loop {
    /// Migrates, inserts the rows, builds the controller, zeroes the simulator's counters and
    /// starts the database wake-ups; the loop itself starts with [`Loop::start`].
    async fn prepare(
        n: usize,
        backend: &str,
        sim: &Sim,
        bench_db: &BenchDb,
        budget: BudgetModel,
    ) -> Result<Loop> {
        let db = vps_controller::db::connect(&bench_db.url).await?;
        vps_controller::db::migrate(&db).await?;
        insert_rows(&db, n).await?;
        let controller = controller(sim, &db, budget).await?;
        sim.reset().await;
        let (shutdown, shutdown_rx) = watch::channel(false);
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
        Ok(Loop {
            db,
            controller,
            shutdown,
            shutdown_rx,
            control: None,
        })
    }

    fn start(&mut self) {
        self.control = Some(tokio::spawn(
            Arc::clone(&self.controller).run(self.shutdown_rx.clone()),
        ));
    }

    /// Stops the loop (the reconciles in flight finish, at most 60 s) and closes the database.
    async fn stop(mut self) -> Result<()> {
        let _ = self.shutdown.send(true);
        if let Some(mut control) = self.control.take()
            && tokio::time::timeout(Duration::from_secs(60), &mut control)
                .await
                .is_err()
        {
            control.abort();
        }
        self.db.close().await?;
        Ok(())
    }
}

/// When the controller last finished a resync's scan, from its own metrics.
fn last_resync(controller: &Controller<Client>) -> Option<String> {
    controller.metrics.render().lines().find_map(|line| {
        line.strip_prefix("vps_controller_last_successful_resync_timestamp_seconds ")
            .map(str::to_owned)
    })
}

async fn run_controller(
    args: &Args,
    n: usize,
    backend: &str,
    sim: &Sim,
    bench_db: &BenchDb,
) -> Result<ControllerResult> {
    let mut out = ControllerResult::default();
    let mut running = Loop::prepare(n, backend, sim, bench_db, BudgetModel::UNLIMITED).await?;
    let db = running.db.clone();
    let controller = Arc::clone(&running.controller);

    // 1. Converge from empty with the real loop.
    let cpu = controller_cpu();
    let sim_cpu = sim.cpu();
    let started = Instant::now();
    running.start();
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
    out.simulator_provision_cpu_seconds = sim.cpu() - sim_cpu;
    out.provision_by_endpoint = sim.stats().await;
    out.provision_requests = total(&out.provision_by_endpoint);
    out.requests_per_subscription = out.provision_requests as f64 / n as f64;
    eprintln!(
        "  converged in {:.1} s, {} requests; RSS {:.0} MiB, peak so far {:.0} MiB",
        out.converge_seconds,
        out.provision_requests,
        status_mib("self", "VmRSS"),
        status_mib("self", "VmHWM")
    );

    // 2. Idle between resyncs: the loop runs, nothing changes. The window opens once the
    // loop's next resync has finished, so it holds no resync (at 10,000 a resync's listing
    // takes seconds and otherwise often overlapped a window opened at a random phase).
    let seen = last_resync(&controller);
    let wait_limit = controller.resync_interval() * 2 + Duration::from_secs(60);
    let waiting = Instant::now();
    while last_resync(&controller) == seen {
        if waiting.elapsed() > wait_limit {
            eprintln!("  no resync finished within {wait_limit:?}; measuring idle anyway");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What the resync dispatched (nothing, on a converged fleet) settles.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = total(&sim.stats().await);
    let cpu = controller_cpu();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    out.idle_seconds = started.elapsed().as_secs_f64();
    out.idle_cpu_seconds = controller_cpu() - cpu;
    out.idle_cpu_percent_of_core = 100.0 * out.idle_cpu_seconds / out.idle_seconds;
    out.idle_requests = total(&sim.stats().await) - before;

    // 3. Steady resyncs on the converged fleet (the loop keeps running, idle).
    for _ in 0..args.steady_resyncs {
        let before = total(&sim.stats().await);
        let cpu = controller_cpu();
        let sim_cpu = sim.cpu();
        let started = Instant::now();
        let report = tokio::time::timeout(STEADY_RESYNC_LIMIT, controller.resync()).await;
        out.steady_resync_seconds
            .push(started.elapsed().as_secs_f64());
        out.steady_resync_cpu_seconds.push(controller_cpu() - cpu);
        out.simulator_steady_resync_cpu_seconds
            .push(sim.cpu() - sim_cpu);
        out.steady_resync_requests
            .push(total(&sim.stats().await) - before);
        match report {
            Ok(report) => {
                let report = report?;
                if report.failed > 0 {
                    eprintln!("  steady resync had failures: {report:?}");
                }
            }
            Err(_) => {
                eprintln!(
                    "  a steady resync took over {STEADY_RESYNC_LIMIT:?}: {} requests so far; stopping the phase",
                    out.steady_resync_requests.last().unwrap_or(&0)
                );
                out.steady_resyncs_timed_out += 1;
                break;
            }
        }
    }

    // Where a steady resync's CPU goes: its two inputs measured alone, the listing (three
    // kinds, compacted into a snapshot) and the table scan (every row decoded); the rest is
    // the verdicts and the pass's bookkeeping.
    let reconciler = &controller.reconciler;
    let selector = reconciler.owner.selector();
    for _ in 0..args.steady_resyncs {
        let cpu = controller_cpu();
        let snapshot = observe::observe(&reconciler.api, &selector).await?;
        out.steady_listing_cpu_seconds.push(controller_cpu() - cpu);
        // As a resync does when it ends: the peak RSS stays the controller's.
        drop(snapshot);
        vps_controller::telemetry::release_freed_memory();
        let cpu = controller_cpu();
        let mut rows = 0usize;
        subscriptions::scan(&db, |row| rows += usize::from(row.is_ok())).await?;
        out.steady_scan_cpu_seconds.push(controller_cpu() - cpu);
        if rows != n {
            eprintln!("  the scan alone read {rows} rows of {n}");
        }
    }

    eprintln!(
        "  after the steady resyncs: RSS {:.0} MiB, peak so far {:.0} MiB",
        status_mib("self", "VmRSS"),
        status_mib("self", "VmHWM")
    );

    // 4. Toggles while the rest sits idle.
    let toggles = args.toggles.min(n);
    let phase = Instant::now();
    for t in 0..toggles {
        if phase.elapsed() > TOGGLE_PHASE_LIMIT {
            eprintln!(
                "  toggle phase stopped after {TOGGLE_PHASE_LIMIT:?}: {t} of {toggles} toggles ran"
            );
            break;
        }
        out.toggles = t + 1;
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
    out.peak_rss_mib = status_mib("self", "VmHWM");
    out.simulator_peak_rss_mib = sim.peak_rss_mib();
    running.stop().await?;
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
    let mut out = NaiveResult {
        subscriptions: n,
        ..NaiveResult::default()
    };
    sim.reset().await;
    let cpu = controller_cpu();
    let sim_cpu = sim.cpu();
    let started = Instant::now();
    out.errors += naive.pass(n).await;
    out.provision_seconds = started.elapsed().as_secs_f64();
    out.provision_cpu_seconds = controller_cpu() - cpu;
    out.simulator_provision_cpu_seconds = sim.cpu() - sim_cpu;
    out.provision_by_endpoint = sim.stats().await;
    out.provision_requests = total(&out.provision_by_endpoint);
    out.requests_per_subscription = out.provision_requests as f64 / n as f64;

    sim.reset().await;
    let cpu = controller_cpu();
    let sim_cpu = sim.cpu();
    let started = Instant::now();
    out.errors += naive.pass(n).await;
    out.steady_pass_seconds = started.elapsed().as_secs_f64();
    out.steady_pass_cpu_seconds = controller_cpu() - cpu;
    out.simulator_steady_pass_cpu_seconds = sim.cpu() - sim_cpu;
    out.steady_pass_requests = total(&sim.stats().await);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Per-resync request counts: `600 × 15` when every resync made the same number.
fn request_counts(counts: &[u64]) -> String {
    match counts {
        [first, rest @ ..] if rest.iter().all(|c| c == first) && !rest.is_empty() => {
            format!("{first} × {}", counts.len())
        }
        _ => counts
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The middle value (the mean of the two middle ones for an even count): on a noisy machine
/// one slow resync moves the mean, not the median.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

async fn case_db(n: usize, backend: &str) -> Result<Option<BenchDb>> {
    Ok(Some(match backend {
        "postgres" => match BenchDb::postgres().await {
            Ok(db) => db,
            Err(e) => {
                eprintln!("!!! PostgreSQL unavailable ({e:#}): skipping N = {n} on PostgreSQL");
                return Ok(None);
            }
        },
        _ => BenchDb::sqlite()?,
    }))
}

async fn run_case(args: &Args, n: usize, backend: &str) -> Result<Option<CaseResult>> {
    let Some(bench_db) = case_db(n, backend).await? else {
        return Ok(None);
    };
    let sim = Sim::start(args.action_seconds, u32::MAX, 1.0).await?;
    let rss_at_start = status_mib("self", "VmRSS");
    reset_peak_rss();
    eprintln!("N = {n}, {backend}: controller");
    let controller = run_controller(args, n, backend, &sim, &bench_db).await;
    eprintln!("N = {n}, {backend}: naive baseline");
    let naive_n = args.naive_n.map_or(n, |m| m.min(n));
    let naive = match &controller {
        Ok(_) => run_naive(naive_n, &sim).await,
        Err(_) => Ok(NaiveResult::default()),
    };
    sim.stop().await;
    bench_db.cleanup().await;
    let mut controller = controller?;
    controller.rss_at_start_mib = rss_at_start;
    let naive = naive?;
    // Per subscription, so a baseline over fewer subscriptions (`--naive-n`) compares too;
    // with the same N these are the plain ratios.
    let per_controller = |v: f64| v / n as f64;
    let per_naive = |v: f64| v / naive.subscriptions.max(1) as f64;
    let mut ratios = BTreeMap::new();
    ratios.insert(
        "provision_requests".into(),
        per_controller(controller.provision_requests as f64)
            / per_naive(naive.provision_requests as f64),
    );
    ratios.insert(
        "converge_seconds".into(),
        per_controller(controller.converge_seconds) / per_naive(naive.provision_seconds),
    );
    ratios.insert(
        "steady_pass_requests".into(),
        per_controller(mean(
            &controller
                .steady_resync_requests
                .iter()
                .map(|&r| r as f64)
                .collect::<Vec<_>>(),
        )) / per_naive(naive.steady_pass_requests as f64),
    );
    ratios.insert(
        "steady_pass_cpu_seconds".into(),
        per_controller(mean(&controller.steady_resync_cpu_seconds))
            / per_naive(naive.steady_pass_cpu_seconds),
    );
    Ok(Some(CaseResult {
        n,
        db: backend.into(),
        controller,
        naive,
        ratios,
    }))
}

// ---------------------------------------------------------------------------------------------
// `--budget real`: Hetzner's budget model, F times faster.

/// The endpoints whose label-selected lists are the controller's listings.
const LISTED_KINDS: [&str; 3] = ["GET /servers", "GET /ssh_keys", "GET /firewalls"];
const CREATES: [&str; 3] = ["POST /ssh_keys", "POST /firewalls", "POST /servers"];

/// One look at the simulator (and the rows) during a budget run.
#[derive(Serialize, Clone, Copy, Default)]
struct Sample {
    /// Seconds of budget time since the loop started (real seconds × F).
    t_scaled: f64,
    requests: u64,
    rate_limited: u64,
    /// `POST /ssh_keys|/firewalls|/servers`.
    creates: u64,
    /// `GET /servers|/ssh_keys|/firewalls` with a `label_selector`.
    listings: u64,
    /// The simulator's bucket.
    remaining: u64,
    ready: i64,
}

async fn sample(sim: &Sim, db: &DatabaseConnection, started: Instant, scale: f64) -> Sample {
    let stats = sim.stats_json().await;
    let count = |map: &str, keys: &[&str]| -> u64 {
        keys.iter()
            .map(|k| stats[map][*k].as_u64().unwrap_or(0))
            .sum()
    };
    Sample {
        t_scaled: started.elapsed().as_secs_f64() * scale,
        requests: stats["total"].as_u64().unwrap_or(0),
        rate_limited: stats["rate_limited"].as_u64().unwrap_or(0),
        creates: count("by_endpoint", &CREATES),
        listings: count("labelled_lists", &LISTED_KINDS),
        remaining: stats["rate_limit"]["remaining"].as_u64().unwrap_or(0),
        ready: count_status(db, "ready").await,
    }
}

#[derive(Serialize, Default)]
struct BudgetResult {
    time_scale: f64,
    limit_per_hour: u32,
    /// Requests per second of budget time the bucket refills (limit / 3600).
    refill_per_scaled_second: f64,
    converged: bool,
    converge_real_seconds: f64,
    converge_scaled_hours: f64,
    /// Requests the simulator counted during the converge.
    requests: u64,
    /// 429s the simulator answered (converge and steady).
    rate_limited: u64,
    /// Requests the controller's own budget refused to send (a wait over a minute), and its
    /// retries, from the client's counters (converge and steady).
    client_budget_exhausted: u64,
    client_retries: u64,
    requests_per_scaled_second: f64,
    /// Budget time until the bucket was first down to 1 % of its capacity.
    drained_at_scaled_seconds: Option<f64>,
    /// Requests per scaled second from then until the last create was sent.
    requests_per_scaled_second_drained: Option<f64>,
    listing_requests: u64,
    listing_share_of_requests: f64,
    /// The resync interval the controller chose for the converged fleet (real seconds).
    resync_interval_real_seconds: f64,
    /// Listings per scaled second over a window of one resync interval, divided by the refill
    /// rate: the largest such share between the bucket draining and the fleet converging (the
    /// controller allows its resync `resync_budget_share`).
    listing_share_of_refill_max: Option<f64>,
    resync_budget_share: f64,
    steady_real_seconds: f64,
    steady_requests: u64,
    steady_listing_requests: u64,
    steady_listing_share_of_refill: f64,
    /// Creates per scaled minute in each sampling window that started with creates left.
    creates_per_scaled_minute_min: f64,
    creates_per_scaled_minute_mean: f64,
    windows_with_creates_left: usize,
    windows_without_creates: usize,
    controller_cpu_seconds: f64,
    peak_rss_mib: f64,
    rss_at_start_mib: f64,
    simulator_cpu_seconds: f64,
    simulator_peak_rss_mib: f64,
    samples: Vec<Sample>,
}

#[derive(Serialize)]
struct BudgetCase {
    n: usize,
    db: String,
    budget: BudgetResult,
}

async fn run_budget_case(args: &Args, n: usize, backend: &str) -> Result<Option<BudgetCase>> {
    let Some(bench_db) = case_db(n, backend).await? else {
        return Ok(None);
    };
    let scale = args.budget_time_scale;
    let sim = Sim::start(args.action_seconds, HETZNER_PER_HOUR, scale).await?;
    let rss_at_start = status_mib("self", "VmRSS");
    reset_peak_rss();
    eprintln!("N = {n}, {backend}: controller under Hetzner's budget, {scale}x");
    let result = run_budget(args, n, backend, &sim, &bench_db).await;
    sim.stop().await;
    bench_db.cleanup().await;
    let mut budget = result?;
    budget.rss_at_start_mib = rss_at_start;
    Ok(Some(BudgetCase {
        n,
        db: backend.into(),
        budget,
    }))
}

async fn run_budget(
    args: &Args,
    n: usize,
    backend: &str,
    sim: &Sim,
    bench_db: &BenchDb,
) -> Result<BudgetResult> {
    let scale = args.budget_time_scale;
    let model = BudgetModel {
        per_hour: HETZNER_PER_HOUR,
        time_scale: scale,
    };
    let refill = f64::from(HETZNER_PER_HOUR) / 3600.0;
    let mut out = BudgetResult {
        time_scale: scale,
        limit_per_hour: HETZNER_PER_HOUR,
        refill_per_scaled_second: refill,
        resync_budget_share: RESYNC_BUDGET_SHARE,
        ..BudgetResult::default()
    };
    let mut running = Loop::prepare(n, backend, sim, bench_db, model).await?;
    let db = running.db.clone();
    // About 4 requests per subscription, the first 3,600 from the full bucket, at the refill
    // rate after that; twice that and a margin before giving up.
    let expected_real = (4.5 * n as f64 - f64::from(HETZNER_PER_HOUR)).max(0.0) / (refill * scale)
        + n as f64 / 30.0;
    let deadline = Duration::from_secs_f64(120.0 + 2.0 * expected_real);
    // One sample per scaled minute.
    let period = Duration::from_secs_f64((60.0 / scale).clamp(0.05, 5.0));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let cpu = controller_cpu();
    let sim_cpu = sim.cpu();
    let started = Instant::now();
    running.start();
    let mut samples: Vec<Sample> = Vec::new();
    let mut converged_at: Option<usize> = None;
    let mut steady_until = Duration::MAX;
    loop {
        tick.tick().await;
        let s = sample(sim, &db, started, scale).await;
        samples.push(s);
        match converged_at {
            None if s.ready == n as i64 => {
                converged_at = Some(samples.len() - 1);
                out.converged = true;
                out.converge_real_seconds = started.elapsed().as_secs_f64();
                let interval = running.controller.resync_interval();
                out.resync_interval_real_seconds = interval.as_secs_f64();
                let steady = args
                    .steady_seconds
                    .map(Duration::from_secs_f64)
                    .unwrap_or_else(|| (interval * 3).min(Duration::from_secs(120)));
                out.steady_real_seconds = steady.as_secs_f64();
                steady_until = started.elapsed() + steady;
                eprintln!(
                    "  converged in {:.1} s ({:.2} h of budget), {} requests, {} 429s; watching {:.0} s more",
                    out.converge_real_seconds,
                    s.t_scaled / 3600.0,
                    s.requests,
                    s.rate_limited,
                    steady.as_secs_f64()
                );
            }
            None if started.elapsed() > deadline => {
                eprintln!(
                    "  not converged after {deadline:?}: {} of {n} ready",
                    s.ready
                );
                converged_at = Some(samples.len() - 1);
                out.converge_real_seconds = started.elapsed().as_secs_f64();
                break;
            }
            Some(_) if started.elapsed() >= steady_until => break,
            _ => {}
        }
    }
    out.controller_cpu_seconds = controller_cpu() - cpu;
    out.simulator_cpu_seconds = sim.cpu() - sim_cpu;
    out.peak_rss_mib = status_mib("self", "VmHWM");
    out.simulator_peak_rss_mib = sim.peak_rss_mib();
    for count in running.controller.reconciler.api.request_counts() {
        if count.outcome == "budget_exhausted" {
            out.client_budget_exhausted += count.count;
        }
    }
    out.client_retries = running.controller.reconciler.api.retry_count();
    running.stop().await?;

    let c = converged_at.unwrap_or(samples.len() - 1);
    analyse_budget(&mut out, &samples, c, n, scale);
    out.samples = samples;
    Ok(out)
}

/// The figures of a budget run from its samples (`c`: the sample where it converged).
fn analyse_budget(out: &mut BudgetResult, samples: &[Sample], c: usize, n: usize, scale: f64) {
    let refill = out.refill_per_scaled_second;
    let at = &samples[c];
    let last = samples.last().copied().unwrap_or_default();
    out.converge_scaled_hours = at.t_scaled / 3600.0;
    out.requests = at.requests;
    out.rate_limited = last.rate_limited;
    out.requests_per_scaled_second = at.requests as f64 / at.t_scaled.max(f64::MIN_POSITIVE);
    out.listing_requests = at.listings;
    out.listing_share_of_requests = at.listings as f64 / at.requests.max(1) as f64;

    let all_created = 3 * n as u64;
    let drained = samples[..=c]
        .iter()
        .position(|s| s.remaining as f64 <= f64::from(out.limit_per_hour) / 100.0);
    let creates_done = samples[..=c]
        .iter()
        .position(|s| s.creates >= all_created)
        .unwrap_or(c);
    if let Some(d) = drained {
        out.drained_at_scaled_seconds = Some(samples[d].t_scaled);
        if creates_done > d {
            let (a, b) = (&samples[d], &samples[creates_done]);
            out.requests_per_scaled_second_drained =
                Some((b.requests - a.requests) as f64 / (b.t_scaled - a.t_scaled));
        }
        // Listings over windows of one resync interval, from the drained bucket until the
        // fleet converged (the steady watch has its own figure).
        let window = out.resync_interval_real_seconds * scale;
        let mut max_share: Option<f64> = None;
        for i in d..=c {
            if let Some(j) = (i..=c).find(|&j| samples[j].t_scaled - samples[i].t_scaled >= window)
            {
                let share = (samples[j].listings - samples[i].listings) as f64
                    / ((samples[j].t_scaled - samples[i].t_scaled) * refill);
                max_share = Some(max_share.map_or(share, |m: f64| m.max(share)));
            }
        }
        out.listing_share_of_refill_max = max_share;
    }

    // Creates per scaled minute in each window that started with creates left.
    let mut rates = Vec::new();
    for w in samples[..=c].windows(2) {
        if w[0].creates < all_created {
            let minutes = (w[1].t_scaled - w[0].t_scaled) / 60.0;
            rates.push((w[1].creates - w[0].creates) as f64 / minutes);
        }
    }
    out.windows_with_creates_left = rates.len();
    out.windows_without_creates = rates.iter().filter(|&&r| r == 0.0).count();
    out.creates_per_scaled_minute_min = rates.iter().copied().fold(f64::NAN, f64::min);
    out.creates_per_scaled_minute_mean = mean(&rates);

    let (a, b) = (at, &last);
    out.steady_requests = b.requests - a.requests;
    out.steady_listing_requests = b.listings - a.listings;
    out.steady_listing_share_of_refill = if b.t_scaled > a.t_scaled {
        out.steady_listing_requests as f64 / ((b.t_scaled - a.t_scaled) * refill)
    } else {
        f64::NAN
    };
}

fn print_budget_table(results: &[BudgetCase]) {
    println!();
    println!(
        "| N | db | F | converge s real (h of budget) | requests | 429s | req/scaled s: overall / drained (refill 1) | converge listings: share of requests / max share of refill per resync interval once drained (allowed 0.25) | creates/scaled min: min / mean, windows without creates | steady listings / refill | controller CPU s | peak RSS MiB (at start) | sim CPU s | sim peak RSS MiB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    for r in results {
        let b = &r.budget;
        println!(
            "| {} | {} | {} | {:.1}{} ({:.2}) | {} | {} | {:.2} / {} | {:.3} / {} | {:.0} / {:.0}, {} of {} | {:.3} | {:.1} | {:.0} ({:.0}) | {:.1} | {:.0} |",
            r.n,
            r.db,
            b.time_scale,
            b.converge_real_seconds,
            if b.converged { "" } else { " (not converged)" },
            b.converge_scaled_hours,
            b.requests,
            b.rate_limited,
            b.requests_per_scaled_second,
            opt(b.requests_per_scaled_second_drained, 2),
            b.listing_share_of_requests,
            opt(b.listing_share_of_refill_max, 3),
            b.creates_per_scaled_minute_min,
            b.creates_per_scaled_minute_mean,
            b.windows_without_creates,
            b.windows_with_creates_left,
            b.steady_listing_share_of_refill,
            b.controller_cpu_seconds,
            b.peak_rss_mib,
            b.rss_at_start_mib,
            b.simulator_cpu_seconds,
            b.simulator_peak_rss_mib,
        );
    }
    println!();
    for r in results {
        let b = &r.budget;
        println!(
            "N = {} {}: drained after {} scaled s; resync interval {:.1} real s; steady {:.0} real s: {} requests, {} listings; client: {} refused by its budget, {} retries",
            r.n,
            r.db,
            opt(b.drained_at_scaled_seconds, 0),
            b.resync_interval_real_seconds,
            b.steady_real_seconds,
            b.steady_requests,
            b.steady_listing_requests,
            b.client_budget_exhausted,
            b.client_retries,
        );
    }
}

fn print_table(results: &[CaseResult]) {
    println!();
    println!(
        "| N | db | converge s | requests (req/sub) | req/steady resync | CPU s/resync: mean / median | idle CPU % core | peak RSS MiB (at start) | toggle→first write p50 / p99 / max ms | sim CPU s: converge / resync | sim peak RSS MiB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let c = &r.controller;
        println!(
            "| {} | {} | {:.1}{} | {} ({:.2}) | {} | {:.2} / {:.2} | {:.1}{} | {:.0} ({:.0}) | {:.0} / {:.0} / {:.0}{} | {:.1} / {:.2} | {:.0} |",
            r.n,
            r.db,
            c.converge_seconds,
            if c.converged { "" } else { " (not converged)" },
            c.provision_requests,
            c.requests_per_subscription,
            request_counts(&c.steady_resync_requests)
                + if c.steady_resyncs_timed_out > 0 {
                    " (timed out)"
                } else {
                    ""
                },
            mean(&c.steady_resync_cpu_seconds),
            median(&c.steady_resync_cpu_seconds),
            c.idle_cpu_percent_of_core,
            if c.idle_requests > 0 {
                format!(" ({} requests)", c.idle_requests)
            } else {
                String::new()
            },
            c.peak_rss_mib,
            c.rss_at_start_mib,
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
            c.simulator_provision_cpu_seconds,
            mean(&c.simulator_steady_resync_cpu_seconds),
            c.simulator_peak_rss_mib,
        );
    }
    println!();
    println!(
        "| N | db | steady resync CPU s (median) | its listing alone | its table scan alone | the rest: verdicts, bookkeeping |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for r in results {
        let c = &r.controller;
        let resync = median(&c.steady_resync_cpu_seconds);
        let listing = median(&c.steady_listing_cpu_seconds);
        let scan = median(&c.steady_scan_cpu_seconds);
        println!(
            "| {} | {} | {resync:.2} | {listing:.2} | {scan:.2} | {:.2} |",
            r.n,
            r.db,
            resync - listing - scan,
        );
    }
    println!();
    println!(
        "| N | db | naive provision s | naive requests (req/sub) | naive req/steady pass | naive CPU s/pass | ratio provision req | ratio steady req | ratio steady CPU | ratio converge time | sim CPU s: naive provision / pass |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let v = &r.naive;
        let ratio = |k: &str| r.ratios.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {:.1}{} | {} ({:.2}) | {} | {:.2} | {:.3} | {:.4} | {:.2} | {:.2} | {:.1} / {:.2} |",
            r.n,
            r.db,
            v.provision_seconds,
            if v.subscriptions < r.n {
                format!(" ({} subscriptions)", v.subscriptions)
            } else {
                String::new()
            },
            v.provision_requests,
            v.requests_per_subscription,
            v.steady_pass_requests,
            v.steady_pass_cpu_seconds,
            ratio("provision_requests"),
            ratio("steady_pass_requests"),
            ratio("steady_pass_cpu_seconds"),
            ratio("converge_seconds"),
            v.simulator_provision_cpu_seconds,
            v.simulator_steady_pass_cpu_seconds,
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
    // As the binary does, so the peak RSS is the controller's as shipped.
    vps_controller::telemetry::limit_malloc_arenas();
    let args = parse_args()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The controller's own logs, only when asked for (e.g. RUST_LOG=vps_controller=info).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("bench")
        .enable_all()
        .build()?;
    let cases = args
        .ns
        .iter()
        .flat_map(|&n| args.dbs.iter().map(move |db| (n, db.as_str())));
    let mut common = json!({
        "machine_cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "concurrency": CONCURRENCY,
        "action_seconds": args.action_seconds,
    });
    match args.budget {
        BudgetMode::Unlimited => {
            let results = rt.block_on(async {
                let mut results = Vec::new();
                for (n, backend) in cases {
                    results.extend(run_case(&args, n, backend).await?);
                }
                anyhow::Ok(results)
            })?;
            print_table(&results);
            common["budget"] = json!("unlimited");
            common["toggles"] = json!(args.toggles);
            common["cases"] = json!(results);
        }
        BudgetMode::Real => {
            let results = rt.block_on(async {
                let mut results = Vec::new();
                for (n, backend) in cases {
                    results.extend(run_budget_case(&args, n, backend).await?);
                }
                anyhow::Ok(results)
            })?;
            print_budget_table(&results);
            common["budget"] = json!("real");
            common["budget_time_scale"] = json!(args.budget_time_scale);
            common["cases"] = json!(results);
        }
    }
    if let Some(path) = &args.json {
        let file = std::fs::File::create(path)
            .with_context(|| format!("--json {}: cannot create", path.display()))?;
        serde_json::to_writer_pretty(file, &common)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
