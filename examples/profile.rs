//! Profiling aid: what the two halves of a steady resync cost the controller, one at a time,
//! without converging a fleet first.
//!
//! `listing` fills a simulator straight through the API with N subscriptions' resources as
//! the controller makes them (an SSH key, a firewall with the built-in plan's rules, a server
//! using both, the controller's labels), then lists them (`observe::observe`, 3 × ⌈N/50⌉
//! pages) `--runs` times. `scan` fills a fresh SQLite file (or the PostgreSQL database of
//! `--database-url`, whose `subscriptions` table must be empty) with N provisioned rows, then
//! streams the table (`subscriptions::scan`, the resync's one query) `--runs` times. Each run
//! prints its CPU seconds and wall time.
//!
//! ```sh
//! cargo run --release --example profile -- listing --n 10000 --runs 5
//! cargo run --release --example profile -- scan --n 10000 --runs 20
//! ```
//!
//! By default the simulator runs in this process on a runtime of its own, whose threads
//! (`sim-*`) are left out of the figures. With `--url` it lists a simulator started
//! elsewhere instead (`vps-controller simulator`), so that a profiler sees only the client:
//!
//! ```sh
//! target/release/vps-controller simulator --listen 127.0.0.1:4010 &
//! target/release/examples/profile listing --url http://127.0.0.1:4010/v1 --n 10000 --runs 0
//! perf record -g target/release/examples/profile listing \
//!     --url http://127.0.0.1:4010/v1 --n 10000 --fill no --runs 5
//! ```
//!
//! CPU per run includes everything this process does for it (for `scan` on SQLite, the
//! database engine too, which runs in the driver's threads); timings vary between runs on a
//! shared machine, instruction counts under callgrind do not.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use vps_controller::config::Config;
use vps_controller::db::{self, subscriptions};
use vps_controller::hcloud::{
    Client, ClientConfig, CreateFirewall, CreateServer, CreateServerFirewall, CreateSshKey,
    HcloudApi, Token,
};
use vps_controller::keys::{self, KeyAlgorithm};
use vps_controller::reconcile::desired::{self, Owner};
use vps_controller::reconcile::observe;
use vps_controller::simulator::{self, SimulatorConfig};
use vps_controller::telemetry::{self, metrics::stat_cpu_seconds};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Listing,
    Scan,
}

struct Args {
    mode: Mode,
    n: usize,
    runs: usize,
    url: Option<String>,
    database_url: Option<String>,
    fill: bool,
}

const USAGE: &str = "usage: profile listing|scan [--n 10000] [--runs 5] [--fill yes|no] \
     [--url SIMULATOR_URL (listing)] [--database-url URL (scan)]";

fn parse_args() -> anyhow::Result<Args> {
    let mut given = std::env::args().skip(1);
    let mode = match given.next().as_deref() {
        Some("listing") => Mode::Listing,
        Some("scan") => Mode::Scan,
        _ => bail!("{USAGE}"),
    };
    let mut args = Args {
        mode,
        n: 10_000,
        runs: 5,
        url: None,
        database_url: None,
        fill: true,
    };
    while let Some(flag) = given.next() {
        let mut value = || {
            given
                .next()
                .with_context(|| format!("{flag}: needs a value"))
        };
        match flag.as_str() {
            "--n" => args.n = value()?.parse().context("--n: a number")?,
            "--runs" => args.runs = value()?.parse().context("--runs: a number")?,
            "--url" if mode == Mode::Listing => args.url = Some(value()?),
            "--database-url" if mode == Mode::Scan => args.database_url = Some(value()?),
            "--fill" => {
                args.fill = match value()?.as_str() {
                    "yes" => true,
                    "no" => false,
                    other => bail!("--fill: yes or no, not {other:?}"),
                }
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    if !(1..=10_000).contains(&args.n) {
        bail!("--n: 1..=10000");
    }
    if !args.fill && args.url.is_none() && args.database_url.is_none() {
        bail!("--fill no needs --url or --database-url (what this starts is empty)");
    }
    Ok(args)
}

/// CPU seconds used so far by this process, leaving out the simulator's threads (`sim-*`,
/// which live as long as the process; threads that ended still count in the process's) when
/// `without_simulator`.
fn process_cpu_seconds(without_simulator: bool) -> anyhow::Result<f64> {
    let cpu_seconds = |stat_path: &std::path::Path| -> anyhow::Result<f64> {
        stat_cpu_seconds(&std::fs::read_to_string(stat_path)?)
            .with_context(|| format!("{}: no utime/stime", stat_path.display()))
    };
    let mut seconds = cpu_seconds("/proc/self/stat".as_ref())?;
    if !without_simulator {
        return Ok(seconds);
    }
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        // A thread that ended meanwhile has no files left: skip it.
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        if name.starts_with("sim-") {
            seconds -= cpu_seconds(&task.join("stat")).unwrap_or(0.0);
        }
    }
    Ok(seconds)
}

/// Creates `n` subscriptions' resources, 32 at a time.
async fn fill(api: &Client, owner: &Owner, config: &Config, n: usize) -> anyhow::Result<()> {
    let plan_name = "starter";
    let plan = config.plans.get(plan_name).context("the built-in plan")?;
    let rules = desired::plan_firewall_rules(plan);
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let rules = rules.clone();
            async move {
                let subscription = format!("sub-{i}");
                let key = desired::resource_key(&subscription);
                let name = desired::resource_name(config, &subscription);
                let labels = owner.labels(&key, Some(plan_name));
                let pair = keys::generate(KeyAlgorithm::Ed25519, &name).await?;
                let ssh_key = api
                    .create_ssh_key(&CreateSshKey {
                        name: name.clone(),
                        public_key: pair.public_openssh,
                        labels: labels.clone(),
                    })
                    .await?;
                let firewall = api
                    .create_firewall(&CreateFirewall {
                        name: name.clone(),
                        labels: labels.clone(),
                        rules,
                        apply_to: vec![],
                    })
                    .await?
                    .firewall;
                api.create_server(&CreateServer {
                    name,
                    server_type: plan.server_type.clone(),
                    image: plan.image.clone(),
                    location: Some(plan.location.clone()),
                    ssh_keys: vec![ssh_key.id],
                    firewalls: vec![CreateServerFirewall {
                        firewall: firewall.id,
                    }],
                    labels,
                    user_data: Some("#cloud-config\n".to_owned()),
                    start_after_create: Some(true),
                    public_net: None,
                })
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await?;
    eprintln!(
        "filled {n} subscriptions ({} resources) in {:.1?}",
        3 * n,
        started.elapsed()
    );
    Ok(())
}

/// `n` provisioned rows as the controller leaves them (ids, addresses, a sealed key, the
/// timestamps in the formats the controller and the triggers write), 500 per statement.
async fn fill_rows(db: &DatabaseConnection, n: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let sealed = "x".repeat(560); // the length of a sealed ed25519 key
    for first in (0..n).step_by(500) {
        let values: Vec<String> = (first..n.min(first + 500))
            .map(|i| {
                format!(
                    "('sub-{i:05}', 'user-{i}', 'sub_{i}', 'active', 'starter', {server}, \
                     {key}, {firewall}, '10.{a}.{b}.1', 'vps-sub-{i:05}', 'ready', \
                     '2026-12-01T10:00:00.123456+00:00', '{sealed}', \
                     'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{i:040} vps-sub-{i:05}', \
                     '2026-12-01T10:00:01.123456+00:00', '2026-12-01 09:59:00.000', \
                     'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{i:040}')",
                    server = 1_000_000 + i,
                    key = 2_000_000 + i,
                    firewall = 3_000_000 + i,
                    a = i / 256,
                    b = i % 256,
                )
            })
            .collect();
        db.execute_unprepared(&format!(
            "INSERT INTO subscriptions (id, user_id, stripe_subscription_id, status, plan, \
             hetzner_server_id, hetzner_ssh_key_id, hetzner_firewall_id, vps_ip_address, \
             vps_hostname, provisioning_status, provisioned_at, ssh_private_key, \
             ssh_public_key, last_reconciled_at, status_changed_at, ssh_host_key) VALUES {}",
            values.join(", ")
        ))
        .await?;
    }
    eprintln!("filled {n} rows in {:.1?}", started.elapsed());
    Ok(())
}

async fn profile_scan(args: &Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = match &args.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", dir.path().join("profile.db").display()),
    };
    let db = db::connect(&url).await?;
    db::migrate(&db).await?;
    if args.fill {
        fill_rows(&db, args.n).await?;
    }
    for run in 1..=args.runs {
        let cpu = process_cpu_seconds(false)?;
        let started = Instant::now();
        let (mut decoded, mut bad) = (0, 0);
        subscriptions::scan(&db, |row| match row {
            Ok(_) => decoded += 1,
            Err(_) => bad += 1,
        })
        .await?;
        let cpu = process_cpu_seconds(false)? - cpu;
        println!(
            "scan {run}: {cpu:.3} CPU s, {:.3} s wall, {decoded} rows, {bad} unreadable",
            started.elapsed().as_secs_f64(),
        );
    }
    Ok(())
}

async fn profile_listing(args: &Args, url: String) -> anyhow::Result<()> {
    let api = Client::new(ClientConfig {
        timeout: Duration::from_secs(120),
        ..ClientConfig::new(url, Token::new("profile"))
    })?;
    let config = Config::builtin();
    let owner = Owner::new("profile-listing", &config);
    if args.fill {
        fill(&api, &owner, &config, args.n).await?;
    }
    let selector = owner.selector();
    for run in 1..=args.runs {
        let cpu = process_cpu_seconds(true)?;
        let started = Instant::now();
        let snapshot = observe::observe(&api, &selector).await?;
        let cpu = process_cpu_seconds(true)? - cpu;
        let [servers, ssh_keys, firewalls] = snapshot.counts();
        println!(
            "listing {run}: {cpu:.3} CPU s, {:.2} s wall, \
             {servers} servers, {ssh_keys} SSH keys, {firewalls} firewalls",
            started.elapsed().as_secs_f64(),
        );
        drop(snapshot);
        telemetry::release_freed_memory();
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.mode == Mode::Scan {
        return runtime.block_on(profile_scan(&args));
    }
    let simulator_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sim-worker")
        .enable_all()
        .build()?;
    let (url, _simulator) = match &args.url {
        Some(url) => (url.clone(), None),
        None => {
            let simulator = simulator_runtime.block_on(simulator::spawn(
                SimulatorConfig {
                    action_seconds: 0.0,
                    rate_limit: 1_000_000_000,
                    ..SimulatorConfig::default()
                },
                "127.0.0.1:0".parse()?,
            ))?;
            (simulator.base_url(), Some(simulator))
        }
    };
    runtime.block_on(profile_listing(&args, url))
}
