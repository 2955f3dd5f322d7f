//! Firewalls: list, create, get, update, delete, `set_rules`, `apply_to_resources`,
//! `remove_from_resources` and their action lists.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::labels::Selector;
use crate::list::{PageRequest, SortKey, parse_sort, sort_by_keys};
use crate::request::Body;
use crate::routes::FirewallVerb;
use crate::state::{Application, Effect, Firewall, Target, World};
use crate::validate::{MAX_FIREWALL_NAME, firewall_rules};

use super::actions::{action_json, firewall_ref, get_action, list_actions, server_ref};
use super::{Ctx, Reply, internal, selector_param, to_value};

pub(super) fn list_firewalls(world: &World, ctx: &Ctx) -> Result<Reply, ApiError> {
    let q = ctx.query;
    let sort = parse_sort(q, &["id", "name", "created"])?;
    let page = PageRequest::from_query(q)?;
    let selector = selector_param(q)?;
    let name = q.first("name");
    let mut firewalls: Vec<&Firewall> = world
        .firewalls
        .values()
        .filter(|f| name.is_none_or(|n| n == f.name))
        .filter(|f| selector.as_ref().is_none_or(|sel| sel.matches(&f.labels)))
        .collect();
    sort_by_keys(
        &mut firewalls,
        &sort,
        |f, field| match field {
            "name" => SortKey::Text(f.name.clone()),
            "created" => SortKey::Int(f.created.timestamp_micros()),
            _ => SortKey::Int(f.id),
        },
        |f| f.id,
    );
    let (firewalls, pagination) = page.apply(firewalls);
    let out: Vec<Value> = firewalls
        .iter()
        .map(|f| to_value(world.firewall_out(f)))
        .collect();
    Ok(Reply::list("firewalls", Value::Array(out), pagination))
}

/// "A Server can be applied to a maximum of 5 Firewalls", label-selector matches included
/// [spec: POST /firewalls/{id}/actions/apply_to_resources].
pub(super) const MAX_FIREWALLS_PER_SERVER: usize = 5;

/// Checks that applying `firewall` to `targets` keeps every affected server within the limit.
/// The spec states the limit but not the error: 403 `resource_limit_exceeded` (limit name
/// `firewalls_per_server`) is UNVERIFIED.
fn check_firewall_limit(world: &World, firewall: i64, targets: &[Target]) -> Result<(), ApiError> {
    for server in world.servers.values() {
        let affected = targets.iter().any(|t| match t {
            Target::Server(id) => *id == server.id,
            Target::Selector { parsed, .. } => parsed.matches(&server.labels),
        });
        if !affected {
            continue;
        }
        let current = world.firewalls_of(server.id);
        if !current.contains(&firewall) && current.len() >= MAX_FIREWALLS_PER_SERVER {
            return Err(ApiError::resource_limit(
                "firewalls_per_server",
                format!(
                    "server {} would have more than {MAX_FIREWALLS_PER_SERVER} firewalls",
                    server.id
                ),
            ));
        }
    }
    Ok(())
}

fn firewall_name(b: &mut Body, name: Option<&str>) {
    if let Some(n) = name {
        let len = n.chars().count();
        if len == 0 || len > MAX_FIREWALL_NAME {
            b.error(
                "name",
                format!("must be 1-{MAX_FIREWALL_NAME} characters, got {len}"),
            );
        }
    }
}

/// Parses `apply_to` / `remove_from` entries: `{type: server, server: {id}}` or
/// `{type: label_selector, label_selector: {selector}}`.
fn firewall_targets(b: &mut Body, field: &str, required: bool) -> Vec<Target> {
    let Some(items) = b.array(field) else {
        if required {
            b.error(field, "is required");
        }
        return Vec::new();
    };
    let mut targets = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("{field}[{i}]");
        let Value::Object(map) = item else {
            b.error(path, "must be an object");
            continue;
        };
        let mut entry = Body::from_map(map);
        let kind = entry.required_string("type");
        let server = entry.object("server");
        let selector = entry.object("label_selector");
        match kind.as_deref() {
            Some("server") => match server
                .as_ref()
                .and_then(|s| s.get("id"))
                .and_then(Value::as_i64)
            {
                Some(id) => targets.push(Target::Server(id)),
                None => entry.error(
                    "server",
                    "{\"id\": <server id>} is required for type server",
                ),
            },
            Some("label_selector") => {
                match selector
                    .as_ref()
                    .and_then(|s| s.get("selector"))
                    .and_then(Value::as_str)
                {
                    Some(raw) => match Selector::parse(raw) {
                        Ok(parsed) => targets.push(Target::Selector {
                            raw: raw.to_string(),
                            parsed,
                        }),
                        Err(e) => entry.error("label_selector", e),
                    },
                    None => entry.error(
                        "label_selector",
                        "{\"selector\": \"…\"} is required for type label_selector",
                    ),
                }
            }
            Some(other) => entry.error(
                "type",
                format!("'{other}' is not one of server, label_selector"),
            ),
            None => {}
        }
        entry.reject_unknown();
        for mut e in entry.errors {
            e.name = format!("{path}.{}", e.name);
            b.errors.push(e);
        }
    }
    targets
}

/// The resources an apply or remove action names: the firewall, and the server when the
/// target is one.
fn action_resources(firewall: i64, target: &Target) -> Vec<crate::wire::ResourceRef> {
    let mut resources = vec![firewall_ref(firewall)];
    if let Target::Server(id) = target {
        resources.push(server_ref(*id));
    }
    resources
}

/// Starts `apply_firewall` for each target and records the (pending) application.
fn apply_targets(world: &mut World, ctx: &Ctx, firewall: i64, targets: Vec<Target>) -> Vec<i64> {
    let mut actions = Vec::new();
    for target in targets {
        let resources = action_resources(firewall, &target);
        let action = world.start_action(
            &ctx.clock,
            "apply_firewall",
            resources,
            Effect::FirewallApply { firewall },
            None,
            ctx.fail_actions,
        );
        if let Some(fw) = world.firewalls.get_mut(&firewall) {
            fw.applied.push(Application {
                target,
                apply_action: Some(action),
                removal_action: None,
            });
        }
        actions.push(action);
    }
    actions
}

pub(super) fn create_firewall(world: &mut World, ctx: &Ctx) -> Result<Reply, ApiError> {
    let mut b = Body::parse(ctx.body)?;
    let name = b.required_string("name");
    firewall_name(&mut b, name.as_deref());
    let labels = b.labels("labels").unwrap_or_default();
    let rules = match b.array("rules") {
        Some(items) => firewall_rules(&mut b, items),
        None => Vec::new(),
    };
    let targets = firewall_targets(&mut b, "apply_to", false);
    b.reject_unknown();
    b.finish()?;
    let Some(name) = name else {
        return Err(internal("validation passed without name"));
    };
    if world.firewalls.values().any(|f| f.name == name) {
        return Err(ApiError::uniqueness("name"));
    }
    for (i, target) in targets.iter().enumerate() {
        if targets[..i].iter().any(|t| t.same_as(target)) {
            return Err(ApiError::unprocessable(
                "server_already_added",
                "a resource is listed more than once in apply_to",
            ));
        }
        if let Target::Server(id) = target
            && !world.servers.contains_key(id)
        {
            return Err(ApiError::unprocessable(
                "firewall_resource_not_found",
                format!("server {id} not found"),
            ));
        }
    }
    // The new firewall's ID is not in use yet, so it counts as one more everywhere.
    check_firewall_limit(world, 0, &targets)?;
    let id = world.new_firewall_id();
    world.firewalls.insert(
        id,
        Firewall {
            id,
            name,
            labels,
            created: ctx.clock.utc,
            rules,
            applied: Vec::new(),
        },
    );
    let actions = apply_targets(world, ctx, id, targets);
    world.settle(ctx.clock.now);
    let firewall = world
        .firewalls
        .get(&id)
        .map(|f| to_value(world.firewall_out(f)))
        .unwrap_or(Value::Null);
    let actions: Vec<Value> = actions
        .iter()
        .map(|a| action_json(world, *a, ctx))
        .collect();
    Ok(Reply::created(
        json!({"firewall": firewall, "actions": actions}),
    ))
}

pub(super) fn update_firewall(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
    if !world.firewalls.contains_key(&id) {
        return Err(ApiError::not_found("firewall"));
    }
    let mut b = Body::parse(ctx.body)?;
    let name = b.string("name");
    firewall_name(&mut b, name.as_deref());
    let labels = b.labels("labels");
    b.reject_unknown();
    b.finish()?;
    if let Some(n) = &name
        && world.firewalls.values().any(|f| f.id != id && &f.name == n)
    {
        return Err(ApiError::uniqueness("name"));
    }
    let fw = world
        .firewalls
        .get_mut(&id)
        .ok_or_else(|| ApiError::not_found("firewall"))?;
    if let Some(n) = name {
        fw.name = n;
    }
    if let Some(l) = labels {
        fw.labels = l;
    }
    let fw = world
        .firewalls
        .get(&id)
        .ok_or_else(|| ApiError::not_found("firewall"))?;
    Ok(Reply::ok(json!({"firewall": world.firewall_out(fw)})))
}

pub(super) fn firewall_action(
    world: &mut World,
    ctx: &Ctx,
    id: i64,
    verb: FirewallVerb,
) -> Result<Reply, ApiError> {
    if !world.firewalls.contains_key(&id) {
        return Err(ApiError::not_found("firewall"));
    }
    let mut b = Body::parse(ctx.body)?;
    let actions = match verb {
        FirewallVerb::SetRules => {
            let rules = match b.array("rules") {
                Some(items) => firewall_rules(&mut b, items),
                None => {
                    b.error("rules", "is required (an empty array removes all rules)");
                    Vec::new()
                }
            };
            b.reject_unknown();
            b.finish()?;
            set_rules(world, ctx, id, rules)
        }
        FirewallVerb::ApplyToResources => {
            let targets = firewall_targets(&mut b, "apply_to", true);
            b.reject_unknown();
            b.finish()?;
            apply_to_resources(world, ctx, id, targets)?
        }
        FirewallVerb::RemoveFromResources => {
            let targets = firewall_targets(&mut b, "remove_from", true);
            b.reject_unknown();
            b.finish()?;
            remove_from_resources(world, ctx, id, targets)?
        }
    };
    world.settle(ctx.clock.now);
    let actions: Vec<Value> = actions
        .iter()
        .map(|a| action_json(world, *a, ctx))
        .collect();
    Ok(Reply::created(json!({ "actions": actions })))
}

/// Replaces the rules; one `set_firewall_rules` action plus one `apply_firewall` per server the
/// firewall currently covers (as in the spec's example).
fn set_rules(world: &mut World, ctx: &Ctx, id: i64, rules: Vec<crate::wire::RuleOut>) -> Vec<i64> {
    let covered: Vec<i64> = match world.firewalls.get(&id) {
        Some(fw) => world
            .servers
            .values()
            .filter(|s| {
                fw.applied.iter().any(|a| match &a.target {
                    Target::Server(sid) => *sid == s.id,
                    Target::Selector { parsed, .. } => parsed.matches(&s.labels),
                })
            })
            .map(|s| s.id)
            .collect(),
        None => Vec::new(),
    };
    if let Some(fw) = world.firewalls.get_mut(&id) {
        fw.rules = rules;
    }
    let mut actions = vec![world.start_action(
        &ctx.clock,
        "set_firewall_rules",
        vec![firewall_ref(id)],
        Effect::None,
        None,
        ctx.fail_actions,
    )];
    for server in covered {
        actions.push(world.start_action(
            &ctx.clock,
            "apply_firewall",
            vec![firewall_ref(id), server_ref(server)],
            Effect::None,
            None,
            ctx.fail_actions,
        ));
    }
    actions
}

fn apply_to_resources(
    world: &mut World,
    ctx: &Ctx,
    id: i64,
    targets: Vec<Target>,
) -> Result<Vec<i64>, ApiError> {
    let Some(fw) = world.firewalls.get(&id) else {
        return Err(ApiError::not_found("firewall"));
    };
    for (i, target) in targets.iter().enumerate() {
        if let Target::Server(sid) = target
            && !world.servers.contains_key(sid)
        {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "firewall_resource_not_found",
                format!("server {sid} not found"),
            ));
        }
        let existing = fw.applied.iter().find(|a| a.target.same_as(target));
        if let Some(application) = existing {
            if application.removal_action.is_some() {
                return Err(ApiError::conflict(
                    "the firewall is being removed from this resource; retry when that action finished",
                ));
            }
            return Err(ApiError::unprocessable(
                "firewall_already_applied",
                "firewall is already applied to this resource",
            ));
        }
        if targets[..i].iter().any(|t| t.same_as(target)) {
            return Err(ApiError::unprocessable(
                "firewall_already_applied",
                "a resource is listed more than once in apply_to",
            ));
        }
    }
    check_firewall_limit(world, id, &targets)?;
    Ok(apply_targets(world, ctx, id, targets))
}

fn remove_from_resources(
    world: &mut World,
    ctx: &Ctx,
    id: i64,
    targets: Vec<Target>,
) -> Result<Vec<i64>, ApiError> {
    let Some(fw) = world.firewalls.get(&id) else {
        return Err(ApiError::not_found("firewall"));
    };
    for (i, target) in targets.iter().enumerate() {
        let applied = fw
            .applied
            .iter()
            .any(|a| a.target.same_as(target) && a.removal_action.is_none());
        let duplicate = targets[..i].iter().any(|t| t.same_as(target));
        if applied && !duplicate {
            continue;
        }
        if let Target::Server(sid) = target
            && let Some(server) = world.servers.get(sid)
            && fw.applied.iter().any(|a| match &a.target {
                Target::Selector { parsed, .. } => parsed.matches(&server.labels),
                Target::Server(_) => false,
            })
        {
            return Err(ApiError::unprocessable(
                "firewall_managed_by_label_selector",
                format!("firewall is applied to server {sid} through a label selector"),
            ));
        }
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "firewall_resource_not_found",
            "the firewall is not applied to this resource",
        ));
    }
    let mut actions = Vec::new();
    for target in targets {
        let resources = action_resources(id, &target);
        let action = world.start_action(
            &ctx.clock,
            "remove_firewall",
            resources,
            Effect::FirewallRemove { firewall: id },
            None,
            ctx.fail_actions,
        );
        if let Some(fw) = world.firewalls.get_mut(&id) {
            for a in fw
                .applied
                .iter_mut()
                .filter(|a| a.target.same_as(&target) && a.removal_action.is_none())
            {
                a.removal_action = Some(action);
            }
        }
        actions.push(action);
    }
    Ok(actions)
}

pub(super) fn get_firewall(world: &World, id: i64) -> Result<Reply, ApiError> {
    let fw = world
        .firewalls
        .get(&id)
        .ok_or_else(|| ApiError::not_found("firewall"))?;
    Ok(Reply::ok(json!({"firewall": world.firewall_out(fw)})))
}

/// Refused while the firewall is applied to anything.
pub(super) fn delete_firewall(world: &mut World, id: i64) -> Result<Reply, ApiError> {
    let fw = world
        .firewalls
        .get(&id)
        .ok_or_else(|| ApiError::not_found("firewall"))?;
    if !fw.applied.is_empty() {
        return Err(ApiError::unprocessable(
            "resource_in_use",
            "firewall is still applied to a resource",
        ));
    }
    world.firewalls.remove(&id);
    Ok(Reply::no_content())
}

/// `GET /firewalls/{id}/actions`.
pub(super) fn list_firewall_actions(world: &World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
    if !world.firewalls.contains_key(&id) {
        return Err(ApiError::not_found("firewall"));
    }
    list_actions(world, ctx, |a| a.touches("firewall", id), false)
}

/// `GET /firewalls/{id}/actions/{action_id}`.
pub(super) fn get_firewall_action(
    world: &World,
    ctx: &Ctx,
    id: i64,
    action: i64,
) -> Result<Reply, ApiError> {
    if !world.firewalls.contains_key(&id) {
        return Err(ApiError::not_found("firewall"));
    }
    get_action(world, ctx, action, |a| a.touches("firewall", id))
}
