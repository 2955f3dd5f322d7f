//! The probe and metrics server every replica runs, leader or not.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sea_orm::DatabaseConnection;

use super::health::{Health, Probe};
use super::metrics::Metrics;
use super::status_page::StatusPage;

/// How often the database is pinged for readiness, and how long one ping may take.
const PING_EVERY: Duration = Duration::from_secs(2);
const PING_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    db: DatabaseConnection,
    status_page: StatusPage,
}

/// Serves the status page at /, /metrics, /healthz and /readyz (see `health` for what the
/// probes mean) until `shutdown`
/// completes. The probes answer from state kept up to date beside them, so they answer at
/// once even while the database or Hetzner hangs.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    db: DatabaseConnection,
    status_page: StatusPage,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let pinger = tokio::spawn(ping_database(db.clone(), Arc::clone(&health)));
    let app = Router::new()
        // The read-only status page (telemetry::status_page).
        .route("/", get(status_page_handler))
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(live_handler))
        .route("/readyz", get(ready_handler))
        .with_state(AppState {
            metrics,
            health,
            db,
            status_page,
        });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    pinger.abort();
    served
}

/// Pings the database every `PING_EVERY` (bounded by `PING_TIMEOUT`) and tells `health`.
async fn ping_database(db: DatabaseConnection, health: Arc<Health>) {
    let mut every = tokio::time::interval(PING_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let result = match tokio::time::timeout(PING_TIMEOUT, db.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(crate::db::DbError::from(e).to_string()),
            Err(_) => Err(format!("no answer within {} s", PING_TIMEOUT.as_secs())),
        };
        health.database_pinged(result);
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

fn probe_answer(probe: Probe, ok: &str) -> (StatusCode, String) {
    match probe {
        Ok(()) => (StatusCode::OK, format!("{ok}\n")),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn live_handler(State(state): State<AppState>) -> impl IntoResponse {
    probe_answer(state.health.liveness(), "ok")
}

async fn ready_handler(State(state): State<AppState>) -> impl IntoResponse {
    probe_answer(state.health.readiness(), "ready")
}

async fn status_page_handler(State(state): State<AppState>) -> Response {
    state.status_page.respond(&state.db).await
}
