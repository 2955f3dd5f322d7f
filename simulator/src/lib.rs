//! The built-in Hetzner Cloud API simulator: a stateful stand-in for `https://api.hetzner.cloud/v1`
//! covering servers, SSH keys, firewalls, actions, snapshot images and the catalog (server types,
//! system images, locations), with validation, uniqueness, asynchronous actions, rate limiting, authentication
//! and seeded fault injection. It follows `shared/hcloud/API-NOTES.md` and the official OpenAPI
//! spec and deliberately shares no code with the controller's client (`vps_controller::hcloud`):
//! it is a crate of its own that does not depend on the controller.
//!
//! Endpoints (under `/v1`): `servers` (list/get/create/update/delete, actions poweron, poweroff,
//! shutdown, reboot, reset, rebuild, change_type, create_image, action lists), `ssh_keys`,
//! `firewalls` (with set_rules, apply_to_resources, remove_from_resources, action lists),
//! `actions` (`/{id}` and `?id=`), `servers/actions`, `firewalls/actions`, `images` (system
//! images plus snapshots: list/get, and update/delete for snapshots), and read-only
//! `server_types` and `locations`.
//!
//! Test hooks outside `/v1` (no auth, not rate limited, not counted; full reference in the
//! [`control`] module): `GET /__simulator/stats` → `{"total", "by_endpoint": {"GET
//! /servers/{id}": n, …}, "rate_limited", "faults": {kind: n}, "list_sorts": {"GET /servers
//! sort=id:asc": n, "GET /images unsorted": n, …}, "labelled_lists": {"GET /servers": n, …},
//! "actions": {"stored", "running"}, "rate_limit": {"limit", "remaining", "reset",
//! "time_scale"}}` (unroutable paths count as `"METHOD <unmatched>"`; the maps stop adding
//! keys at a fixed number and count the rest under `"<other>"`), `POST /__simulator/reset`
//! (zeroes the counters, keeps the resources), and `GET`/`POST`/`DELETE /__simulator/faults` (a seeded
//! share `{"rate": F}`, targeted faults `{"faults": [{"kind", "endpoints"?, "count"?}]}`,
//! `{"black_hole": true}`).
//!
//! Simulated SSH endpoint (`SimulatorConfig::ssh`, off by default; the `ssh` module): servers'
//! public IPv4s become loopback addresses of their own and one listener answers SSH for each
//! like a freshly booted Ubuntu with cloud-init (host key from user_data `ssh_keys`, root login
//! with the server's keys, `cloud-init status --wait`, `cat`, `install`, faults), inspected and
//! faulted under `/__simulator/ssh` and `/__simulator/servers/{id}/ssh`.
//!
//! Rate limit: a bucket of `rate_limit` requests refilling `rate_limit` per hour (API-NOTES
//! §9), with `RateLimit-Limit`, `-Remaining` and `-Reset` on every `/v1` answer. Crossing
//! several bucket-fulls at Hetzner's pace takes hours, so `budget_time_scale`
//! (`--budget-time-scale F`) makes the bucket refill F times faster with the same capacity,
//! and Reset counts in that scaled time: with F = 60 one hour of budget passes in one real
//! minute (a drained bucket of 3,600 refills 60 per real second and is full again 60 s
//! later, Reset = now + 60). Only the budget is scaled, not action durations.
//!
//! Order for each `/v1` request: count it → black hole → take a rate-limit token (429 when
//! empty) → check the token (401) → route (404/405) → targeted fault, else draw from the seeded
//! share → run. Only requests reaching the draw consume the fault generator, so a seed and a
//! request sequence fix the drawn faults. Faulted answers carry `x-simulator-fault: <kind>` (for
//! tests and debugging; the real API has no such header).
//!
//! Limits: a server takes at most 5 firewalls, label-selector matches included [spec: apply_to_
//! resources]; a 6th (create with `firewalls`, create firewall with `apply_to`,
//! `apply_to_resources`) is 403 `resource_limit_exceeded` with `details.limits[{name:
//! "firewalls_per_server"}]` (the code and name are UNVERIFIED: the spec states the limit, not
//! the error; label changes that make a selector match a 6th are not refused). Creating a server
//! beyond `SimulatorConfig::server_limit` is 403 `resource_limit_exceeded`, `details.limits[{name:
//! "project_limit"}]` (the spec's example for the code).
//!
//! Choices where the real API is undocumented:
//! - `per_page` above 50 is clamped to 50 (the answer's `meta.pagination.per_page` says so);
//!   `page`/`per_page` below 1 or not a number → 422 `invalid_input`.
//! - Without `sort`, lists are ordered by ID.
//! - A server is `locked` (and its power, rebuild, change_type and create_image actions get 423
//!   `locked`, checked after input validation) while one of its server actions runs
//!   (create_image included); firewall actions do not lock it, and PUT (name, labels), DELETE
//!   and firewall apply/remove are allowed while it is locked (UNVERIFIED which actions Hetzner
//!   refuses; API-NOTES §10).
//! - Snapshots: `create_image` with `type: backup` is `invalid_input` (servers have no backup
//!   option here); a snapshot whose action fails stays as `unavailable`; PUT/DELETE of a system
//!   image is 403 `forbidden`; deleting a server keeps its snapshots. `GET /server_types` has no
//!   `sort` in the spec and ignores it (like any unknown parameter).
//! - Unknown fields are rejected where the spec says `additionalProperties: false` (firewall
//!   requests) and ignored elsewhere, except `datacenter` (removed from the API) and features the
//!   simulator does not model (volumes, networks, placement groups, primary IPs), which are
//!   rejected with `invalid_input`.
//! - Finished actions are kept for `finished_action_retention` (default 30 minutes) and at most
//!   `max_finished_actions` of them (default 10,000, oldest finished dropped first, but never one
//!   finished less than `finished_action_min_age`, default 60 s, ago); running
//!   actions are always kept. A dropped action is `not_found` on `GET /actions/{id}`, missing
//!   from `GET /actions?id=` and from every action list. Hetzner documents no retention period,
//!   so the figures are a choice, not a fact.
//! - Public IPv4 addresses come from 198.18.0.0/15; once it is used up, addresses of deleted
//!   servers are handed out again (oldest first).
//! - A `timeout` fault performs the request, then holds the answer back for `fault_delay`: the
//!   change happened although the client timed out.

mod api;
mod catalog;
pub mod cli;
pub mod control;
mod error;
mod labels;
mod list;
mod request;
mod routes;
mod ssh;
mod state;
mod validate;
mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body as HttpBody;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use control::{Bucket, Fault, FaultPlan, FaultsRequest, RateLimitHeaders, Stats};
use error::ApiError;
use request::Query;
use routes::Routed;
use state::{Clock, Retention, World};

pub use ssh::SshConfig;

const MAX_ACTION_SECONDS: f64 = 86_400.0;

/// Largest `budget_time_scale`: one hour of budget per real second.
pub const MAX_BUDGET_TIME_SCALE: f64 = 3600.0;

/// Default server quota: far above any test or benchmark (the IPv4 pool holds ~130,000).
pub const DEFAULT_SERVER_LIMIT: u32 = 100_000;

/// Largest request body accepted (user_data is at most 32 KiB; rules add a little).
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How the simulator behaves. The token is redacted from `Debug` output.
#[derive(Clone)]
pub struct SimulatorConfig {
    /// When set, every `/v1` request needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// How long every action runs before it finishes (0 = finished at once).
    pub action_seconds: f64,
    /// Requests per hour (bucket capacity; refills at this rate).
    pub rate_limit: u32,
    /// How many times faster than real time the rate-limit bucket refills (default 1, as at
    /// Hetzner; at most [`MAX_BUDGET_TIME_SCALE`]). The capacity stays `rate_limit`; the refill
    /// is `rate_limit / 3600 × budget_time_scale` per second, and `RateLimit-Reset` is the real
    /// UNIX second at which the faster refill fills the bucket. With 60, one hour of Hetzner's
    /// budget passes in one real minute: a client that stays within it here for a minute
    /// would stay within it at Hetzner for an hour (if everything else it does took 60 times
    /// longer too). Only the budget is scaled: actions still take `action_seconds`.
    pub budget_time_scale: f64,
    /// Probability in [0, 1] that a `/v1` request gets an injected fault.
    pub fault_rate: f64,
    /// Seed for fault injection (and generated root passwords).
    pub seed: u64,
    /// How long the `timeout` fault holds a response back.
    pub fault_delay: Duration,
    /// The project's server quota: creating one more fails with 403 `resource_limit_exceeded`.
    pub server_limit: u32,
    /// How long a finished action stays readable (`GET /actions/{id}` and every action list);
    /// after that it is `not_found`. Running actions are always kept.
    pub finished_action_retention: Duration,
    /// At most this many finished actions are kept; beyond it the oldest finished go first.
    pub max_finished_actions: usize,
    /// `max_finished_actions` never drops an action finished less than this long ago.
    pub finished_action_min_age: Duration,
    /// The simulated SSH endpoint (off by default; see [`SshConfig`] and the `ssh` module):
    /// with it on, every server's public IPv4 is a loopback address of its own, and one
    /// listener answers SSH for all of them like a freshly booted Ubuntu with cloud-init.
    pub ssh: Option<SshConfig>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            token: None,
            action_seconds: 1.0,
            rate_limit: 3600,
            budget_time_scale: 1.0,
            fault_rate: 0.0,
            seed: 0,
            fault_delay: Duration::from_secs(30),
            server_limit: DEFAULT_SERVER_LIMIT,
            finished_action_retention: Retention::default().max_age,
            max_finished_actions: Retention::default().max_finished,
            finished_action_min_age: Retention::default().min_age,
            ssh: None,
        }
    }
}

impl std::fmt::Debug for SimulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatorConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("action_seconds", &self.action_seconds)
            .field("rate_limit", &self.rate_limit)
            .field("budget_time_scale", &self.budget_time_scale)
            .field("fault_rate", &self.fault_rate)
            .field("seed", &self.seed)
            .field("fault_delay", &self.fault_delay)
            .field("server_limit", &self.server_limit)
            .field("finished_action_retention", &self.finished_action_retention)
            .field("max_finished_actions", &self.max_finished_actions)
            .field("finished_action_min_age", &self.finished_action_min_age)
            .field("ssh", &self.ssh)
            .finish()
    }
}

/// Why a [`SimulatorConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimulatorConfigError {
    #[error("action_seconds must be a number from 0 to 86400 (one day), got {0}")]
    ActionSeconds(f64),
    #[error("fault_rate must be between 0 and 1, got {0}")]
    FaultRate(f64),
    #[error("rate_limit must be at least 1 request per hour, got {0}")]
    RateLimit(u32),
    #[error(
        "budget_time_scale (--budget-time-scale) must be a number above 0 and at most 3600 (1 = real time, 60 = an hour of budget per minute), got {0}"
    )]
    BudgetTimeScale(f64),
    #[error("token must not be empty (leave it unset to disable authentication)")]
    EmptyToken,
    #[error(
        "ssh.cloud_init_seconds (--cloud-init-seconds) must be a number from 0 to 86400 (one day), got {0}"
    )]
    CloudInitSeconds(f64),
}

impl SimulatorConfig {
    pub fn validate(&self) -> Result<(), SimulatorConfigError> {
        // Bounded so instants and timestamps computed from it cannot overflow.
        if !(0.0..=MAX_ACTION_SECONDS).contains(&self.action_seconds) {
            return Err(SimulatorConfigError::ActionSeconds(self.action_seconds));
        }
        if !(0.0..=1.0).contains(&self.fault_rate) {
            return Err(SimulatorConfigError::FaultRate(self.fault_rate));
        }
        if self.rate_limit < 1 {
            return Err(SimulatorConfigError::RateLimit(self.rate_limit));
        }
        // Bounded (and NaN refused) so refill times stay finite numbers of seconds.
        if !(self.budget_time_scale > 0.0 && self.budget_time_scale <= MAX_BUDGET_TIME_SCALE) {
            return Err(SimulatorConfigError::BudgetTimeScale(
                self.budget_time_scale,
            ));
        }
        if self.token.as_deref() == Some("") {
            return Err(SimulatorConfigError::EmptyToken);
        }
        if let Some(ssh) = &self.ssh
            && !(0.0..=MAX_ACTION_SECONDS).contains(&ssh.cloud_init_seconds)
        {
            return Err(SimulatorConfigError::CloudInitSeconds(
                ssh.cloud_init_seconds,
            ));
        }
        Ok(())
    }
}

/// Mutable accounting shared by all requests.
struct Control {
    bucket: Bucket,
    stats: Stats,
    faults: FaultPlan,
}

struct Shared {
    token: Option<String>,
    budget_time_scale: f64,
    fault_delay: Duration,
    world: Mutex<World>,
    control: Mutex<Control>,
    /// Flips to true when the server shuts down, so delayed answers end early.
    stopping: watch::Receiver<bool>,
    correlation: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent-enough state for a test double.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A simulator serving on a background task; dropped or shut down, it stops.
pub struct RunningSimulator {
    addr: SocketAddr,
    ssh_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningSimulator {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the simulated SSH endpoint bound (the port chosen, with port 0); `None`
    /// when `SimulatorConfig::ssh` is off. Dial a server's public IPv4 on this port.
    pub fn ssh_addr(&self) -> Option<SocketAddr> {
        self.ssh_addr
    }

    /// `http://127.0.0.1:PORT/v1` — the API endpoint to give a client.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops accepting, ends delayed answers, waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "simulator stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "simulator task failed"),
        }
    }
}

/// Binds `listen` (use port 0 for a free port), and `config.ssh`'s listen address if the SSH
/// endpoint is on, and serves on a tokio task.
pub async fn spawn(
    config: SimulatorConfig,
    listen: SocketAddr,
) -> std::io::Result<RunningSimulator> {
    config
        .validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let ssh_listener = match &config.ssh {
        Some(ssh) => Some(tokio::net::TcpListener::bind(ssh.listen).await?),
        None => None,
    };
    let ssh_addr = ssh_listener
        .as_ref()
        .map(tokio::net::TcpListener::local_addr)
        .transpose()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_inner(config, listener, ssh_listener, async move {
        // A dropped sender also stops the server.
        let _ = stopped.await;
    }));
    Ok(RunningSimulator {
        addr,
        ssh_addr,
        stop: Some(stop),
        task,
    })
}

/// Serves the simulator on `listener` until `shutdown` completes; with `config.ssh` set, binds
/// its listen address for the SSH endpoint too (and stops it at shutdown).
pub async fn serve(
    config: SimulatorConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ssh_listener = match &config.ssh {
        Some(ssh) => Some(tokio::net::TcpListener::bind(ssh.listen).await?),
        None => None,
    };
    serve_inner(config, listener, ssh_listener, shutdown).await
}

/// [`serve`] with an SSH listener bound by the caller (its address is used, not
/// `config.ssh.listen`); `config.ssh` must be set (for `cloud_init_seconds`).
pub async fn serve_with_ssh(
    config: SimulatorConfig,
    listener: tokio::net::TcpListener,
    ssh_listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if config.ssh.is_none() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "serve_with_ssh needs SimulatorConfig::ssh (for cloud_init_seconds)",
        ));
    }
    serve_inner(config, listener, Some(ssh_listener), shutdown).await
}

async fn serve_inner(
    config: SimulatorConfig,
    listener: tokio::net::TcpListener,
    ssh_listener: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    config
        .validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let now = Instant::now();
    let mut world = World::new(Duration::from_secs_f64(config.action_seconds), config.seed);
    world.server_limit = config.server_limit;
    world.retention = Retention {
        max_age: config.finished_action_retention,
        max_finished: config.max_finished_actions,
        min_age: config.finished_action_min_age,
    };
    let ssh = match (&config.ssh, ssh_listener) {
        (Some(ssh), Some(ssh_listener)) => {
            let ssh_addr = ssh_listener.local_addr()?;
            world.enable_ssh(ssh::machine::SshWorld::new(
                ssh_addr,
                Duration::from_secs_f64(ssh.cloud_init_seconds),
            ));
            tracing::info!(
                addr = %ssh_addr,
                cloud_init_seconds = ssh.cloud_init_seconds,
                "simulated SSH endpoint listening (servers' public IPv4s are loopback addresses; \
                 dial one on this port)"
            );
            Some(ssh_listener)
        }
        _ => None,
    };
    let shared = Arc::new(Shared {
        token: config.token.clone(),
        budget_time_scale: config.budget_time_scale,
        fault_delay: config.fault_delay,
        world: Mutex::new(world),
        control: Mutex::new(Control {
            bucket: Bucket::new(config.rate_limit, config.budget_time_scale, now),
            stats: Stats::default(),
            faults: FaultPlan::new(config.fault_rate, config.seed),
        }),
        stopping: stopping_rx,
        correlation: AtomicU64::new(1),
    });
    let app = routes::router()
        .route("/__simulator/stats", get(stats_hook))
        .route("/__simulator/reset", post(reset_hook))
        .route(
            "/__simulator/faults",
            get(faults_get_hook)
                .post(faults_hook)
                .delete(faults_clear_hook),
        )
        .merge(ssh::hooks::routes())
        .fallback(entry)
        .with_state(shared.clone());
    // Plain fields, not `?` Debug: no `addr=Some(..)`, no `fault_delay: 3s` in a struct dump.
    let addr = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_string(), |addr| addr.to_string());
    tracing::info!(
        addr = %addr,
        token_required = config.token.is_some(),
        action_seconds = config.action_seconds,
        rate_limit = config.rate_limit,
        budget_time_scale = config.budget_time_scale,
        fault_rate = config.fault_rate,
        seed = config.seed,
        server_limit = config.server_limit,
        "Hetzner Cloud API simulator listening"
    );
    let ssh_task = ssh.map(|ssh_listener| {
        tokio::spawn(ssh::serve(
            shared.clone(),
            ssh_listener,
            shared.stopping.clone(),
        ))
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stopping_tx.send(true);
        })
        .await;
    // `stopping` is true (or its sender gone): the SSH endpoint closes its connections.
    if let Some(task) = ssh_task
        && let Err(e) = task.await
    {
        tracing::warn!(error = %e, "simulated SSH endpoint task failed");
    }
    served
}

async fn stats_hook(State(shared): State<Arc<Shared>>) -> Response {
    let (stats, limits) = {
        let mut control = lock(&shared.control);
        let limits = control.bucket.peek(Instant::now(), unix_now());
        (control.stats.clone(), limits)
    };
    let mut body = json!(stats);
    body["actions"] = actions_stats(&shared);
    body["rate_limit"] = json!(limits);
    body["rate_limit"]["time_scale"] = json!(shared.budget_time_scale);
    json_response(StatusCode::OK, &body)
}

/// `{"stored", "running"}`: how many actions the simulator holds (finished ones are bounded by
/// the retention settings), after settling those due.
fn actions_stats(shared: &Shared) -> Value {
    let mut world = lock(&shared.world);
    let now = Instant::now();
    world.settle(now);
    world.forget_finished(now);
    let (stored, running) = world.action_counts();
    json!({ "stored": stored, "running": running })
}

async fn reset_hook(State(shared): State<Arc<Shared>>) -> Response {
    lock(&shared.control).stats = Stats::default();
    {
        let mut world = lock(&shared.world);
        let world = &mut *world;
        if let Some(ssh) = &mut world.ssh {
            ssh.reset_counters();
            for machine in world.servers.values_mut().filter_map(|s| s.ssh.as_mut()) {
                machine.sessions = 0;
                machine.auth_failures = 0;
            }
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn faults_get_hook(State(shared): State<Arc<Shared>>) -> Response {
    let state = lock(&shared.control).faults.describe();
    json_response(StatusCode::OK, &state)
}

/// Sets the seeded share, the targeted faults (replacing the armed list) and/or the black hole;
/// keys left out stay as they are. See the `control` module for the shape.
async fn faults_hook(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let (request, targeted) = match FaultsRequest::parse(&body, routes::is_endpoint_key) {
        Ok(parsed) => parsed,
        Err(error) => return error_response(&error),
    };
    let replaced = targeted.is_some();
    let state = {
        let mut control = lock(&shared.control);
        let plan = &mut control.faults;
        if let Some(rate) = request.rate {
            plan.rate = rate;
        }
        if let Some(black_hole) = request.black_hole {
            plan.black_hole = black_hole;
        }
        if let Some(targeted) = targeted {
            plan.targeted = targeted;
        }
        plan.describe()
    };
    if replaced {
        // Replacing the list clears `server_stuck_starting`: stuck servers carry on.
        lock(&shared.world).release_held(Instant::now());
    }
    json_response(StatusCode::OK, &state)
}

/// Clears everything: targeted faults, the black hole and the seeded share (rate 0).
async fn faults_clear_hook(State(shared): State<Arc<Shared>>) -> Response {
    let state = {
        let mut control = lock(&shared.control);
        let plan = &mut control.faults;
        plan.rate = 0.0;
        plan.black_hole = false;
        plan.targeted.clear();
        plan.describe()
    };
    lock(&shared.world).release_held(Instant::now());
    json_response(StatusCode::OK, &state)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(error: &ApiError) -> Response {
    json_response(error.status, &error.body())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn add_rate_headers(headers: &mut HeaderMap, limits: RateLimitHeaders) {
    headers.insert("ratelimit-limit", HeaderValue::from(limits.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(limits.remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(limits.reset));
}

/// Constant-time comparison, so response timing does not reveal the token.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = &shared.token else {
        return true;
    };
    let expected = format!("Bearer {token}");
    headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| same_secret(v.as_bytes(), expected.as_bytes()))
}

/// Requests no route matched: under `/v1` they go through the pipeline (counted as
/// `METHOD <unmatched>`, rate limited, authenticated, then 404); elsewhere a plain 404.
async fn entry(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let path = request.uri().path();
    if path == "/v1" || path.starts_with("/v1/") {
        api_request(shared, Routed::NotFound, request).await
    } else {
        error_response(&ApiError::not_found("route"))
    }
}

const HTML_502: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// One `/v1` request, already routed (by `routes::router` or the fallback): count → rate limit →
/// auth → 404/405 → fault → handler.
async fn api_request(shared: Arc<Shared>, routed: Routed, request: Request) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let query = Query::parse(request.uri().query());
    let key = match &routed {
        Routed::Found { template, .. } | Routed::WrongMethod { template } => {
            format!("{method} {template}")
        }
        Routed::NotFound => format!("{method} <unmatched>"),
    };

    let (allowed, mut limits, empty_limits, black_hole) = {
        let mut control = lock(&shared.control);
        control.stats.count(key.clone());
        if let Routed::Found { template, .. } = &routed
            && method == axum::http::Method::GET
            && !template.ends_with('}')
        {
            control.stats.count_sort(&key, &query.all("sort"));
            if query.first("label_selector").is_some() {
                control.stats.count_labelled_list(&key);
            }
        }
        let black_hole = control.faults.black_hole;
        let allowed = if black_hole {
            control.stats.count_fault("black_hole");
            true
        } else {
            let allowed = control.bucket.try_take(started);
            if !allowed {
                control.stats.rate_limited += 1;
            }
            allowed
        };
        let unix = unix_now();
        (
            allowed,
            control.bucket.headers(unix),
            control.bucket.empty_headers(unix),
            black_hole,
        )
    };
    if black_hole {
        // Accepted, never answered: the client times out. Only shutdown ends the wait.
        let mut stopping = shared.stopping.clone();
        let _ = stopping.wait_for(|stop| *stop).await;
        return error_response(&ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "simulator shutting down",
        ));
    }

    let (mut response, fault) = if !allowed {
        (
            error_response(&ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "rate limit exceeded",
            )),
            None,
        )
    } else if !authorized(&shared, request.headers()) {
        (
            error_response(&ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unable to authenticate",
            )),
            None,
        )
    } else {
        match routed {
            Routed::NotFound => (error_response(&ApiError::not_found("route")), None),
            Routed::WrongMethod { .. } => (
                error_response(&ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("method {method} is not allowed here"),
                )),
                None,
            ),
            Routed::Found { endpoint, .. } => {
                let drawn = {
                    let mut control = lock(&shared.control);
                    let drawn = control.faults.draw(&key, endpoint);
                    if let Some((fault, _)) = drawn {
                        control.stats.count_fault(fault.name());
                    }
                    drawn
                };
                let fault = drawn.map(|(fault, _)| fault);
                if let Some((Fault::Http429, true)) = drawn {
                    // Aimed 429s look like an empty bucket (the seeded share keeps the
                    // bucket's real headers, as it always did).
                    limits = empty_limits;
                }
                let mut refunded = false;
                let response = match fault {
                    Some(Fault::Http500) => error_response(&ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "simulated internal error",
                    )),
                    Some(Fault::Http503) => error_response(&ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "simulated: service temporarily unavailable",
                    )),
                    Some(Fault::Http429) => error_response(&ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_exceeded",
                        "rate limit exceeded",
                    )),
                    Some(Fault::Http502Html) => {
                        let mut r = (StatusCode::BAD_GATEWAY, HTML_502).into_response();
                        r.headers_mut()
                            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
                        r
                    }
                    Some(
                        Fault::Timeout
                        | Fault::TruncatedJson
                        | Fault::ActionError
                        | Fault::ServerStuckStarting,
                    )
                    | None => {
                        let response =
                            run_endpoint(&shared, endpoint, &query, request, fault).await;
                        // An action fault is spent only on a request that started actions:
                        // one refused (locked, invalid, not found) gives its hit back.
                        if let Some((
                            kind @ (Fault::ActionError | Fault::ServerStuckStarting),
                            aimed,
                        )) = drawn
                            && !response.status().is_success()
                        {
                            let mut control = lock(&shared.control);
                            if aimed {
                                control.faults.refund(&key, endpoint, kind);
                            }
                            control.stats.uncount_fault(kind.name());
                            refunded = true;
                        }
                        match fault {
                            Some(Fault::Timeout) => {
                                let mut stopping = shared.stopping.clone();
                                tokio::select! {
                                    () = tokio::time::sleep(shared.fault_delay) => {}
                                    _ = stopping.wait_for(|stop| *stop) => {}
                                }
                                response
                            }
                            Some(Fault::TruncatedJson) => truncate_body(response).await,
                            _ => response,
                        }
                    }
                };
                (response, if refunded { None } else { fault })
            }
        }
    };

    let headers = response.headers_mut();
    add_rate_headers(headers, limits);
    let correlation = shared.correlation.fetch_add(1, Ordering::Relaxed);
    if let Ok(v) = HeaderValue::from_str(&format!("{correlation:016x}")) {
        headers.insert("x-correlation-id", v);
    }
    if let Some(fault) = fault {
        headers.insert("x-simulator-fault", HeaderValue::from_static(fault.name()));
    }
    // Never log headers or bodies: they carry the token and user_data.
    tracing::debug!(
        method = %method,
        endpoint = %key,
        status = response.status().as_u16(),
        fault = fault.map(Fault::name),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "simulator request"
    );
    response
}

/// The `truncated_json` fault: the same answer with its body cut in half (at least one byte
/// shorter), so it is no longer valid JSON.
async fn truncate_body(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let cut = bytes.slice(..bytes.len() / 2);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, HttpBody::from(cut))
}

async fn run_endpoint(
    shared: &Shared,
    endpoint: routes::Endpoint,
    query: &Query,
    request: Request,
    fault: Option<Fault>,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_string();
    let path = request.uri().path().to_string();
    let body = match axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return error_response(&ApiError::json_error(format!(
                "request body unreadable or larger than {MAX_BODY_BYTES} bytes"
            )));
        }
    };
    let result = {
        let mut world = lock(&shared.world);
        let ctx = api::Ctx {
            clock: Clock {
                now: Instant::now(),
                utc: chrono::Utc::now(),
            },
            query,
            body: &body,
            fail_actions: fault == Some(Fault::ActionError),
            hold_server_start: fault == Some(Fault::ServerStuckStarting),
        };
        api::handle(&mut world, endpoint, &ctx)
    };
    match result {
        Err(error) => error_response(&error),
        Ok(reply) => {
            let mut response = match &reply.body {
                Some(body) => json_response(reply.status, body),
                None => Response::builder()
                    .status(reply.status)
                    .body(HttpBody::empty())
                    .unwrap_or_default(),
            };
            if let Some(pagination) = &reply.pagination {
                let base = format!("http://{host}{path}");
                if let Some(link) = list::link_header(&base, query, pagination)
                    && let Ok(v) = HeaderValue::from_str(&link)
                {
                    response.headers_mut().insert(header::LINK, v);
                }
            }
            response
        }
    }
}
