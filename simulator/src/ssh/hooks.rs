//! The test hooks of the simulated SSH endpoint (outside `/v1`, no auth, not counted; 404
//! `not_found` while the endpoint is off).
//!
//! - `GET /__simulator/ssh` → `{"listen", "cloud_init_seconds", "active_sessions",
//!   "max_active_sessions", "connections_total", "auth_failures", "faults"}`: `active_sessions`
//!   counts authenticated connections open now, `max_active_sessions` its high-water mark,
//!   `connections_total` every TCP connection accepted, `faults` the defaults.
//! - `GET|POST|DELETE /__simulator/ssh/faults`: the default faults, for servers without faults
//!   of their own: show, replace (body below), clear. Answers the faults now armed.
//! - `GET /__simulator/servers/{id}/ssh` → `{"ipv4", "host_key", "cloud_init", "sessions",
//!   "auth_failures", "faults", "commands": [{"command", "exit_status", "stdin_bytes"}],
//!   "files": {PATH: {"mode", "content", "writes"}}}`. `host_key` is the public line of the key
//!   presented when no fault says otherwise; `faults` is `null` when the server follows the
//!   defaults; `exit_status` is `null` while a command runs or hangs; `content` is UTF-8
//!   (invalid bytes replaced).
//! - `GET|POST|DELETE /__simulator/servers/{id}/ssh/faults`: the server's own faults (replace
//!   them, or clear them so the defaults apply again). 404 `not_found` for an unknown server.
//!
//! Fault bodies: `{"refuse": bool, "stall": bool, "wrong_host_key": bool, "cloud_init":
//! "running"|"done"|"error", "fail_command": "substr", "hang_command": "substr"}`, every key
//! optional (left out = off); a POST replaces the whole set. A bad body is 400 `invalid_input`
//! naming the field in `details.fields`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use serde_json::{Map, Value, json};

use super::machine::{ServerSsh, SshFaults, SshWorld, public_line};
use crate::error::ApiError;
use crate::state::World;
use crate::{Shared, error_response, json_response, lock};

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/__simulator/ssh", get(endpoint_state))
        .route(
            "/__simulator/ssh/faults",
            get(default_faults)
                .post(set_default_faults)
                .delete(clear_default_faults),
        )
        .route("/__simulator/servers/{id}/ssh", get(server_state))
        .route(
            "/__simulator/servers/{id}/ssh/faults",
            get(server_faults)
                .post(set_server_faults)
                .delete(clear_server_faults),
        )
}

fn off() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "the simulated SSH endpoint is off (SimulatorConfig::ssh, --no-ssh)",
    )
}

fn bad_faults(body: &[u8]) -> Result<SshFaults, ApiError> {
    SshFaults::parse(body).map_err(|e| {
        let mut error = ApiError::invalid_field(&e.field, e.message);
        error.status = StatusCode::BAD_REQUEST;
        error
    })
}

fn ok(body: &Value) -> Response {
    json_response(StatusCode::OK, body)
}

/// Runs `f` on the endpoint's state, or answers 404 while it is off.
fn with_endpoint(shared: &Shared, f: impl FnOnce(&mut SshWorld) -> Value) -> Response {
    match lock(&shared.world).ssh.as_mut() {
        Some(global) => ok(&f(global)),
        None => error_response(&off()),
    }
}

/// Runs `f` on a server's SSH state (after settling actions, so cloud-init's clock is right),
/// or answers 404 for an unknown server or while the endpoint is off.
fn with_server(
    shared: &Shared,
    id: &str,
    f: impl FnOnce(&mut ServerSsh, &SshWorld, Option<String>) -> Value,
) -> Response {
    let mut world = lock(&shared.world);
    world.settle(Instant::now());
    let World { ssh, servers, .. } = &mut *world;
    let Some(global) = ssh.as_ref() else {
        return error_response(&off());
    };
    let server = id.parse::<i64>().ok().and_then(|id| servers.get_mut(&id));
    let Some(server) = server else {
        return error_response(&ApiError::not_found("server"));
    };
    let ipv4 = server.ipv4.map(|ip| ip.addr.to_string());
    match server.ssh.as_mut() {
        Some(machine) => ok(&f(machine, global, ipv4)),
        None => error_response(&off()),
    }
}

async fn endpoint_state(State(shared): State<Arc<Shared>>) -> Response {
    with_endpoint(&shared, |global| {
        json!({
            "listen": global.listen.to_string(),
            "cloud_init_seconds": global.cloud_init.as_secs_f64(),
            "active_sessions": global.active_sessions,
            "max_active_sessions": global.max_active_sessions,
            "connections_total": global.connections_total,
            "auth_failures": global.auth_failures,
            "faults": global.default_faults.to_json(),
        })
    })
}

async fn default_faults(State(shared): State<Arc<Shared>>) -> Response {
    with_endpoint(&shared, |global| global.default_faults.to_json())
}

async fn set_default_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match bad_faults(&body) {
        Ok(faults) => with_endpoint(&shared, |global| {
            global.default_faults = faults;
            global.default_faults.to_json()
        }),
        Err(error) => error_response(&error),
    }
}

async fn clear_default_faults(State(shared): State<Arc<Shared>>) -> Response {
    with_endpoint(&shared, |global| {
        global.default_faults = SshFaults::default();
        global.default_faults.to_json()
    })
}

async fn server_state(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    with_server(&shared, &id, |machine, global, ipv4| {
        let faults = machine
            .faults
            .clone()
            .unwrap_or_else(|| global.default_faults.clone());
        let commands: Vec<Value> = machine
            .commands
            .iter()
            .map(|c| {
                json!({
                    "command": c.command,
                    "exit_status": c.exit_status,
                    "stdin_bytes": c.stdin_bytes,
                })
            })
            .collect();
        let files: Map<String, Value> = machine
            .files
            .iter()
            .map(|(path, file)| {
                let content = String::from_utf8_lossy(&file.content);
                let file = json!({"mode": file.mode, "content": content, "writes": file.writes});
                (path.clone(), file)
            })
            .collect();
        json!({
            "ipv4": ipv4,
            "host_key": public_line(&machine.host_key),
            "cloud_init": machine.cloud_init(&faults, global.cloud_init, Instant::now()).as_str(),
            "sessions": machine.sessions,
            "auth_failures": machine.auth_failures,
            "faults": machine.faults.as_ref().map(SshFaults::to_json),
            "commands": commands,
            "files": files,
        })
    })
}

async fn server_faults(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    with_server(&shared, &id, |machine, _, _| {
        json!(machine.faults.as_ref().map(SshFaults::to_json))
    })
}

async fn set_server_faults(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let faults = match bad_faults(&body) {
        Ok(faults) => faults,
        Err(error) => return error_response(&error),
    };
    with_server(&shared, &id, |machine, _, _| {
        let answer = faults.to_json();
        machine.faults = Some(faults);
        answer
    })
}

async fn clear_server_faults(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    with_server(&shared, &id, |machine, _, _| {
        machine.faults = None;
        Value::Null
    })
}
