//! Actions: `GET /actions?id=…`, `/actions/{id}`, the per-kind lists (`/servers/actions`,
//! `/firewalls/actions`) and the helpers the resources use to list and show their own.

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::list::{PageRequest, SortKey, parse_sort, sort_by_keys};
use crate::request::Query;
use crate::state::{Action, Clock, World};
use crate::wire::{ActionOut, ResourceRef};

use super::{Ctx, Reply, to_value};

const ACTION_STATUSES: &[&str] = &["running", "success", "error"];

fn action_sort_key(a: &Action, field: &str, clock: &Clock) -> SortKey {
    match field {
        "command" => SortKey::Text(a.command.to_string()),
        "status" => SortKey::Text(a.status(clock.now).to_string()),
        "started" => SortKey::Int(a.started.timestamp_micros()),
        "finished" => SortKey::Int(
            a.finished(clock.now)
                .map_or(i64::MAX, |t| t.timestamp_micros()),
        ),
        _ => SortKey::Int(a.id),
    }
}

fn status_filter(query: &Query) -> Result<Vec<String>, ApiError> {
    let statuses: Vec<String> = query.all("status").into_iter().map(String::from).collect();
    for s in &statuses {
        if !ACTION_STATUSES.contains(&s.as_str()) {
            return Err(ApiError::invalid_field(
                "status",
                format!("'{s}' is not one of running, success, error"),
            ));
        }
    }
    Ok(statuses)
}

fn id_filter(query: &Query) -> Result<Vec<i64>, ApiError> {
    query
        .all("id")
        .into_iter()
        .map(|raw| {
            raw.parse::<i64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| ApiError::invalid_field("id", format!("'{raw}' is not an ID")))
        })
        .collect()
}

const ACTION_SORT_FIELDS: &[&str] = &["id", "command", "status", "started", "finished"];

pub(super) fn list_actions(
    world: &World,
    ctx: &Ctx,
    belongs: impl Fn(&Action) -> bool,
    filter_ids: bool,
) -> Result<Reply, ApiError> {
    let q = ctx.query;
    let sort = parse_sort(q, ACTION_SORT_FIELDS)?;
    let page = PageRequest::from_query(q)?;
    let statuses = status_filter(q)?;
    let ids = if filter_ids {
        id_filter(q)?
    } else {
        Vec::new()
    };
    let mut actions: Vec<&Action> = world
        .actions
        .values()
        .filter(|a| belongs(a))
        .filter(|a| ids.is_empty() || ids.contains(&a.id))
        .filter(|a| statuses.is_empty() || statuses.iter().any(|s| s == a.status(ctx.clock.now)))
        .collect();
    sort_by_keys(
        &mut actions,
        &sort,
        |a, f| action_sort_key(a, f, &ctx.clock),
        |a| a.id,
    );
    let (actions, pagination) = page.apply(actions);
    let out: Vec<ActionOut> = actions.iter().map(|a| a.out(ctx.clock.now)).collect();
    Ok(Reply::list("actions", to_value(out), pagination))
}

pub(super) fn get_action(
    world: &World,
    ctx: &Ctx,
    id: i64,
    belongs: impl Fn(&Action) -> bool,
) -> Result<Reply, ApiError> {
    let action = world
        .actions
        .get(&id)
        .filter(|a| belongs(a))
        .ok_or_else(|| ApiError::not_found("action"))?;
    Ok(Reply::ok(json!({"action": action.out(ctx.clock.now)})))
}

/// `GET /actions?id=…`: `id` is required (listing all actions was removed from the API); unknown
/// IDs are left out; no `meta` in the answer.
pub(super) fn get_actions_by_id(world: &World, ctx: &Ctx) -> Result<Reply, ApiError> {
    let q = ctx.query;
    let ids = id_filter(q)?;
    if ids.is_empty() {
        return Err(ApiError::invalid_field(
            "id",
            "is required: list the action IDs with ?id=1&id=2",
        ));
    }
    let sort = parse_sort(q, ACTION_SORT_FIELDS)?;
    let statuses = status_filter(q)?;
    let mut actions: Vec<&Action> = ids
        .iter()
        .filter_map(|id| world.actions.get(id))
        .filter(|a| statuses.is_empty() || statuses.iter().any(|s| s == a.status(ctx.clock.now)))
        .collect();
    sort_by_keys(
        &mut actions,
        &sort,
        |a, f| action_sort_key(a, f, &ctx.clock),
        |a| a.id,
    );
    // Sorting ends on the ID, so a repeated `id` is adjacent here and shows once.
    actions.dedup_by_key(|a| a.id);
    let out: Vec<ActionOut> = actions.iter().map(|a| a.out(ctx.clock.now)).collect();
    Ok(Reply::ok(json!({ "actions": out })))
}

pub(super) fn action_json(world: &World, id: i64, ctx: &Ctx) -> Value {
    world
        .actions
        .get(&id)
        .map_or(Value::Null, |a| to_value(a.out(ctx.clock.now)))
}

pub(super) fn server_ref(id: i64) -> ResourceRef {
    ResourceRef { id, kind: "server" }
}

pub(super) fn firewall_ref(id: i64) -> ResourceRef {
    ResourceRef {
        id,
        kind: "firewall",
    }
}

/// `GET /servers/actions` and `GET /firewalls/actions`: the actions touching any resource of
/// `kind`.
pub(super) fn list_actions_of_kind(
    world: &World,
    ctx: &Ctx,
    kind: &str,
) -> Result<Reply, ApiError> {
    list_actions(
        world,
        ctx,
        |a| a.resources.iter().any(|r| r.kind == kind),
        true,
    )
}

/// `GET /servers/actions/{id}` and `GET /firewalls/actions/{id}`.
pub(super) fn get_action_of_kind(
    world: &World,
    ctx: &Ctx,
    kind: &str,
    id: i64,
) -> Result<Reply, ApiError> {
    get_action(world, ctx, id, |a| {
        a.resources.iter().any(|r| r.kind == kind)
    })
}
