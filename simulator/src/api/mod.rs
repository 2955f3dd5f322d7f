//! Endpoint handlers, one file per resource. Each runs synchronously under the world lock and
//! either answers or fails with an [`ApiError`]; HTTP concerns (auth, rate limit, faults,
//! headers) live in `lib.rs`, routing in `routes.rs`.

mod actions;
mod catalog;
mod firewalls;
mod images;
mod servers;
mod ssh_keys;

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::labels::Selector;
use crate::list::Pagination;
use crate::request::Query;
use crate::routes::Endpoint;
use crate::state::{Clock, World};

/// A successful answer.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Option<Value>,
    /// Set for paginated lists (used for the `Link` header).
    pub pagination: Option<Pagination>,
}

impl Reply {
    pub(super) fn ok(body: Value) -> Reply {
        Reply {
            status: StatusCode::OK,
            body: Some(body),
            pagination: None,
        }
    }

    pub(super) fn created(body: Value) -> Reply {
        Reply {
            status: StatusCode::CREATED,
            body: Some(body),
            pagination: None,
        }
    }

    pub(super) fn no_content() -> Reply {
        Reply {
            status: StatusCode::NO_CONTENT,
            body: None,
            pagination: None,
        }
    }

    pub(super) fn list(root: &str, items: Value, pagination: Pagination) -> Reply {
        let mut body = Map::new();
        body.insert(root.to_string(), items);
        body.insert("meta".to_string(), json!({ "pagination": pagination }));
        Reply {
            status: StatusCode::OK,
            body: Some(Value::Object(body)),
            pagination: Some(pagination),
        }
    }
}

pub(crate) struct Ctx<'a> {
    pub clock: Clock,
    pub query: &'a Query,
    pub body: &'a [u8],
    /// Fault injection: actions created by this request end in `error`.
    pub fail_actions: bool,
    /// Fault injection: the server create/start actions of this request keep running until the
    /// faults are cleared (`server_stuck_starting`).
    pub hold_server_start: bool,
}

pub(super) fn to_value<T: serde::Serialize>(value: T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

pub(super) fn internal(message: &str) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
}

pub(crate) fn handle(world: &mut World, endpoint: Endpoint, ctx: &Ctx) -> Result<Reply, ApiError> {
    world.settle(ctx.clock.now);
    world.forget_finished(ctx.clock.now);
    use Endpoint as E;
    match endpoint {
        E::ListServers => servers::list_servers(world, ctx),
        E::CreateServer => servers::create_server(world, ctx),
        E::GetServer(id) => servers::get_server(world, id),
        E::UpdateServer(id) => servers::update_server(world, ctx, id),
        E::DeleteServer(id) => servers::delete_server(world, ctx, id),
        E::ServerAction(id, verb) => servers::server_action(world, ctx, id, verb),
        E::ListServerActions(id) => servers::list_server_actions(world, ctx, id),
        E::GetServerAction(id, action) => servers::get_server_action(world, ctx, id, action),
        E::ListAllServerActions => actions::list_actions_of_kind(world, ctx, "server"),
        E::GetAnyServerAction(action) => actions::get_action_of_kind(world, ctx, "server", action),
        E::ListSshKeys => ssh_keys::list_ssh_keys(world, ctx),
        E::CreateSshKey => ssh_keys::create_ssh_key(world, ctx),
        E::GetSshKey(id) => ssh_keys::get_ssh_key(world, id),
        E::UpdateSshKey(id) => ssh_keys::update_ssh_key(world, ctx, id),
        E::DeleteSshKey(id) => ssh_keys::delete_ssh_key(world, id),
        E::ListFirewalls => firewalls::list_firewalls(world, ctx),
        E::CreateFirewall => firewalls::create_firewall(world, ctx),
        E::GetFirewall(id) => firewalls::get_firewall(world, id),
        E::UpdateFirewall(id) => firewalls::update_firewall(world, ctx, id),
        E::DeleteFirewall(id) => firewalls::delete_firewall(world, id),
        E::FirewallAction(id, verb) => firewalls::firewall_action(world, ctx, id, verb),
        E::ListFirewallActions(id) => firewalls::list_firewall_actions(world, ctx, id),
        E::GetFirewallAction(id, action) => firewalls::get_firewall_action(world, ctx, id, action),
        E::ListAllFirewallActions => actions::list_actions_of_kind(world, ctx, "firewall"),
        E::GetAnyFirewallAction(action) => {
            actions::get_action_of_kind(world, ctx, "firewall", action)
        }
        E::GetActions => actions::get_actions_by_id(world, ctx),
        E::GetAction(id) => actions::get_action(world, ctx, id, |_| true),
        E::ListServerTypes => catalog::list_server_types(ctx),
        E::GetServerType(id) => catalog::get_server_type(id),
        E::ListImages => images::list_images(world, ctx),
        E::GetImage(id) => images::get_image(world, id),
        E::UpdateImage(id) => images::update_image(world, ctx, id),
        E::DeleteImage(id) => images::delete_image(world, id),
        E::CreateImage(id) => images::create_image(world, ctx, id),
        E::ListLocations => catalog::list_locations(ctx),
        E::GetLocation(id) => catalog::get_location(id),
    }
}

/// `?label_selector=…`, parsed; absent or empty means no filter.
pub(super) fn selector_param(query: &Query) -> Result<Option<Selector>, ApiError> {
    match query.first("label_selector") {
        None | Some("") => Ok(None),
        Some(raw) => Selector::parse(raw)
            .map(Some)
            .map_err(|e| ApiError::invalid_field("label_selector", e)),
    }
}
