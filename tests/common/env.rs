//! The controller wired up as `run` wires it, against the in-process simulator over real
//! sockets and a fresh database: what the integration tests drive pass by pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection};
use serde_json::Value;

use vps_controller::config::{Config, SshSettings};
use vps_controller::controller::Controller;
use vps_controller::controller::leader::Leadership;
use vps_controller::db::{self, entities::subscription, subscriptions};
use vps_controller::hcloud::{
    ActionPollBackoff, Budget, Client, ClientConfig, RetryBackoff, Token,
};
use vps_controller::keys::{KeyAlgorithm, Sealer};
use vps_controller::reconcile::Reconciler;
use vps_controller::reconcile::desired::Owner;
use vps_controller::simulator::{self, RunningSimulator, SimulatorConfig};
use vps_controller::ssh::Bootstrapper;
use vps_controller::telemetry::metrics::Metrics;

pub const TOKEN: &str = "test-token";
/// The encryption key of every test controller, so a second controller on the same database
/// (a restart, a replica) opens the key pairs the first one sealed.
pub const ENCRYPTION_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

pub struct Env {
    pub sim: Arc<RunningSimulator>,
    pub http: reqwest::Client,
    pub db: DatabaseConnection,
    pub controller: Arc<Controller<Client>>,
    pub backend: &'static str,
    /// This database's installation id: the label value that makes a resource ours.
    pub installation: String,
}

pub async fn env(test_db: &super::TestDb) -> Env {
    env_with(test_db, None, 0.05).await
}

/// `web_app_table`: SQL creating the web app's own `subscriptions` table before migrating.
pub async fn env_with(
    test_db: &super::TestDb,
    web_app_table: Option<&str>,
    action_seconds: f64,
) -> Env {
    env_custom(
        test_db,
        Options {
            web_app_table: web_app_table.map(str::to_owned),
            action_seconds,
            ..Options::default()
        },
    )
    .await
}

/// How to build an [`Env`] beyond the defaults.
pub struct Options {
    /// SQL creating the web app's own `subscriptions` table before migrating.
    pub web_app_table: Option<String>,
    pub action_seconds: f64,
    /// Share this simulator (e.g. a second controller on the same Hetzner project).
    pub sim: Option<Arc<RunningSimulator>>,
    /// The controller's config (ed25519 keys and no shutdown wait by default).
    pub config: Config,
    /// The token the controller sends (the simulator accepts only [`TOKEN`]).
    pub token: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            web_app_table: None,
            action_seconds: 0.05,
            sim: None,
            config: Config {
                // Key generation speed is not under test here (tests/foundation.rs covers RSA).
                ssh_key_algorithm: KeyAlgorithm::Ed25519,
                shutdown_timeout_seconds: 0,
                // `ready` as Hetzner's `running`: the bootstrap tests (tests/bootstrap.rs)
                // turn SSH on, against a simulator with its SSH endpoint.
                ssh: SshSettings {
                    enabled: false,
                    ..SshSettings::default()
                },
                ..Config::builtin()
            },
            token: TOKEN.into(),
        }
    }
}

pub async fn env_custom(test_db: &super::TestDb, options: Options) -> Env {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = options.config;
    let sim = match options.sim {
        Some(sim) => sim,
        None => Arc::new(
            simulator::spawn(
                SimulatorConfig {
                    token: Some(TOKEN.into()),
                    action_seconds: options.action_seconds,
                    fault_delay: Duration::from_secs(3),
                    // Servers answer SSH when the controller is to log in to them.
                    ssh: config.ssh.enabled.then(|| simulator::SshConfig {
                        listen: "0.0.0.0:0".parse().unwrap(),
                        cloud_init_seconds: 0.0,
                    }),
                    ..SimulatorConfig::default()
                },
                "127.0.0.1:0".parse().unwrap(),
            )
            .await
            .unwrap(),
        ),
    };
    if let Some(ssh) = sim.ssh_addr() {
        config.ssh.port = ssh.port();
    }
    let db = db::connect(&test_db.url).await.unwrap();
    if let Some(sql) = &options.web_app_table {
        db.execute_unprepared(sql).await.unwrap();
    }
    db::migrate(&db).await.unwrap();
    let api = Client::new(ClientConfig {
        action_poll: ActionPollBackoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
            factor: 1.5,
        },
        // Fast retries and short pauses: these tests count requests, not seconds.
        timeout: Duration::from_secs(1),
        max_retries: 1,
        retry_backoff: RetryBackoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
        },
        budget: Arc::new(Budget::new(3600).with_max_circuit_pause(Duration::from_millis(100))),
        ..ClientConfig::new(sim.base_url(), Token::new(options.token.clone()))
    })
    .unwrap();
    let installation = db::installation::id(&db).await.unwrap();
    let owner = Owner::new(installation.clone(), &config);
    let metrics = Arc::new(Metrics::new());
    let ssh = config.ssh.clone();
    let reconciler = Reconciler {
        api,
        db: db.clone(),
        sealer: Sealer::from_base64(ENCRYPTION_KEY, &[]).unwrap(),
        config,
        owner,
        action_timeout: Duration::from_secs(20),
        leadership: Leadership::always(),
        key_checks: Default::default(),
        bootstrapper: Arc::new(Bootstrapper::new(ssh, Arc::clone(&metrics))),
        metrics,
    };
    let controller = Arc::new(Controller::new(reconciler, 3600));
    Env {
        sim,
        http: reqwest::Client::new(),
        db,
        controller,
        backend: test_db.backend,
        installation,
    }
}

impl Env {
    pub async fn sql(&self, statement: &str) {
        self.db.execute_unprepared(statement).await.unwrap();
    }

    pub async fn insert(&self, id: &str, status: &str, plan: &str) {
        self.sql(&format!(
            "INSERT INTO subscriptions (id, user_id, status, plan) VALUES ('{id}', 'user-{id}', '{status}', '{plan}')"
        ))
        .await;
    }

    pub async fn set_status(&self, id: &str, status: &str) {
        self.sql(&format!(
            "UPDATE subscriptions SET status = '{status}' WHERE id = '{id}'"
        ))
        .await;
    }

    pub async fn row(&self, id: &str) -> subscription::Model {
        subscriptions::get(&self.db, id).await.unwrap().unwrap()
    }

    /// A raw call to the simulator, as any Hetzner user would make it.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.sim.base_url());
        let mut request = self
            .http
            .request(method.parse().unwrap(), url)
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn list(&self, kind: &str) -> Vec<Value> {
        let mut all = Vec::new();
        let mut page = 1;
        loop {
            let (status, body) = self
                .api("GET", &format!("/{kind}?per_page=50&page={page}"), None)
                .await;
            assert_eq!(status, 200, "{body}");
            all.extend(body[kind].as_array().unwrap().iter().cloned());
            match body["meta"]["pagination"]["next_page"].as_i64() {
                Some(next) => page = next,
                None => return all,
            }
        }
    }

    pub async fn stats(&self) -> Value {
        super::process::simulator_stats(&self.http, &format!("http://{}", self.sim.addr())).await
    }

    /// The reasons of the subscription's recent events, newest first.
    pub async fn event_reasons(&self, id: &str) -> Vec<String> {
        vps_controller::db::events::recent(&self.db, Some(id), 50)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.reason)
            .collect()
    }

    pub async fn reset_stats(&self) {
        let url = format!("http://{}/__simulator/reset", self.sim.addr());
        let response = self.http.post(url).send().await.unwrap();
        assert!(response.status().is_success());
    }

    pub async fn resync(&self) {
        let report = self.controller.resync().await.unwrap();
        assert_eq!(
            report.failed, 0,
            "[{}] resync had failures: {report:?}",
            self.backend
        );
    }

    /// A resync whose reconciles may fail (e.g. deletions refused by the deletion guard).
    pub async fn resync_allowing_failures(&self) {
        let _ = self.controller.resync().await;
    }

    pub async fn process_changes(&self) {
        self.controller.process_changes().await.unwrap();
    }

    /// Labels of the resource whose `vps-controller/subscription` label is `key`.
    pub async fn owned_by(&self, kind: &str, key: &str) -> Vec<Value> {
        self.list(kind)
            .await
            .into_iter()
            .filter(|r| r["labels"]["vps-controller/subscription"] == key)
            .collect()
    }
}

pub fn ids(values: &[Value]) -> Vec<i64> {
    values.iter().map(|v| v["id"].as_i64().unwrap()).collect()
}

/// Write-only endpoints called, with counts (everything but GETs).
pub fn writes(stats: &Value) -> BTreeMap<String, u64> {
    stats["by_endpoint"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(endpoint, _)| !endpoint.starts_with("GET "))
        .map(|(endpoint, n)| (endpoint.clone(), n.as_u64().unwrap()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

pub async fn for_each_backend<F, Fut>(test: F)
where
    F: Fn(Env) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for test_db in super::test_databases().await {
        let env = env(&test_db).await;
        test(env).await;
        test_db.cleanup().await;
    }
}
