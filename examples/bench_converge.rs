//! Benchmark: how long N subscriptions take to converge against the in-process simulator, how
//! many API requests that costs, and what a steady-state resync costs.
//!
//! `cargo run --release --example bench_converge -- 200` (default N = 100). Uses a fresh SQLite
//! file in a temp dir and ed25519 keys (RSA-4096 generation dominates otherwise; measure it
//! separately).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use vps_controller::config::Config;
use vps_controller::controller::Controller;
use vps_controller::controller::leader::Leadership;
use vps_controller::hcloud::{ActionPollBackoff, Client, ClientConfig, Token};
use vps_controller::keys::{self, KeyAlgorithm, Sealer};
use vps_controller::reconcile::Reconciler;
use vps_controller::reconcile::desired::Owner;
use vps_controller::simulator::{self, SimulatorConfig};
use vps_controller::ssh::Bootstrapper;
use vps_controller::telemetry::metrics::Metrics;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100);
    let dir = tempfile::tempdir()?;
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("bench.db").display()
    );
    let db = vps_controller::db::connect(&url).await?;
    vps_controller::db::migrate(&db).await?;
    let sim = simulator::spawn(
        SimulatorConfig {
            action_seconds: 0.2,
            rate_limit: 1_000_000,
            ..SimulatorConfig::default()
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    let api = Client::new(ClientConfig {
        action_poll: ActionPollBackoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(500),
            factor: 1.5,
        },
        ..ClientConfig::new(sim.base_url(), Token::new("bench"))
    })?;
    let config = Config {
        ssh_key_algorithm: KeyAlgorithm::Ed25519,
        concurrency: 16,
        ..Config::builtin()
    };
    let owner = Owner::new(vps_controller::db::installation::id(&db).await?, &config);
    let metrics = Arc::new(Metrics::new());
    // The bench measures Hetzner requests, CPU and memory of the loop; its simulator has no
    // SSH endpoint, so `ready` means running as before.
    let ssh = vps_controller::config::SshSettings {
        enabled: false,
        ..config.ssh.clone()
    };
    let reconciler = Reconciler {
        api: api.clone(),
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
    let controller = Controller::new(reconciler, 1_000_000);
    for i in 0..n {
        db.execute_unprepared(&format!(
            "INSERT INTO subscriptions (id, user_id, status, plan) VALUES ('sub-{i}', 'u{i}', 'active', 'starter')"
        ))
        .await?;
    }

    let requests = |c: &Client| c.request_counts().iter().map(|r| r.count).sum::<u64>();
    let started = Instant::now();
    let report = controller.resync().await?;
    let converge = started.elapsed();
    let converge_requests = requests(&api);
    let started = Instant::now();
    controller.resync().await?;
    let steady = started.elapsed();
    let steady_requests = requests(&api) - converge_requests;

    let rsa = Instant::now();
    keys::generate(KeyAlgorithm::Rsa4096, "bench").await?;
    let rsa = rsa.elapsed();

    println!("subscriptions:            {n}");
    println!("first resync (converge):  {converge:.2?}, {converge_requests} requests, {report:?}");
    println!(
        "steady-state resync:      {steady:.2?}, {steady_requests} requests (expected 3 * ceil({n}/50) = {})",
        3 * n.div_ceil(50)
    );
    println!("one RSA-4096 key pair:    {rsa:.2?}");
    sim.shutdown().await;
    Ok(())
}
