//! Servers: list, create, get, update, delete, their power, rebuild and type-change actions and
//! their action lists.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::catalog::{IMAGES, LOCATIONS, SERVER_TYPES};
use crate::error::ApiError;
use crate::list::{PageRequest, SortKey, parse_sort, sort_by_keys};
use crate::request::{Body, IdOrName};
use crate::routes::ServerVerb;
use crate::ssh::machine::ServerSsh;
use crate::state::{Application, Effect, Server, ServerStatus, Target, World};
use crate::validate::{MAX_USER_DATA_BYTES, hostname_problem};

use super::actions::{action_json, firewall_ref, get_action, list_actions, server_ref};
use super::firewalls::MAX_FIREWALLS_PER_SERVER;
use super::{Ctx, Reply, internal, selector_param, to_value};

const SERVER_STATUSES: &[&str] = &[
    "running",
    "initializing",
    "starting",
    "stopping",
    "off",
    "deleting",
    "migrating",
    "rebuilding",
    "unknown",
];

pub(super) fn list_servers(world: &World, ctx: &Ctx) -> Result<Reply, ApiError> {
    let q = ctx.query;
    let sort = parse_sort(q, &["id", "name", "created"])?;
    let page = PageRequest::from_query(q)?;
    let selector = selector_param(q)?;
    let statuses = q.all("status");
    if let Some(bad) = statuses.iter().find(|s| !SERVER_STATUSES.contains(s)) {
        return Err(ApiError::invalid_field(
            "status",
            format!("'{bad}' is not a server status"),
        ));
    }
    let name = q.first("name");
    let mut servers: Vec<&Server> = world
        .servers
        .values()
        .filter(|s| name.is_none_or(|n| n == s.name))
        .filter(|s| selector.as_ref().is_none_or(|sel| sel.matches(&s.labels)))
        .filter(|s| statuses.is_empty() || statuses.contains(&s.status.as_str()))
        .collect();
    sort_by_keys(
        &mut servers,
        &sort,
        |s, field| match field {
            "name" => SortKey::Text(s.name.clone()),
            "created" => SortKey::Int(s.created.timestamp_micros()),
            _ => SortKey::Int(s.id),
        },
        |s| s.id,
    );
    let (servers, pagination) = page.apply(servers);
    let mut ids: Vec<i64> = servers.iter().map(|s| s.id).collect();
    ids.sort_unstable();
    let firewalls = world.firewall_index(|id| ids.binary_search(&id).is_ok());
    let out: Vec<Value> = servers
        .iter()
        .map(|s| to_value(world.server_out_in(s, &firewalls)))
        .collect();
    Ok(Reply::list("servers", Value::Array(out), pagination))
}

fn find_server_type(reference: &IdOrName) -> Option<usize> {
    SERVER_TYPES
        .iter()
        .position(|t| reference.refers_to(t.id, t.name))
}

/// An image by ID, or by name for the given architecture (names repeat across architectures).
fn find_image(reference: &IdOrName, architecture: Option<&str>) -> Result<usize, String> {
    let candidates: Vec<usize> = IMAGES
        .iter()
        .enumerate()
        .filter(|(_, i)| reference.refers_to(i.id, i.name))
        .map(|(n, _)| n)
        .collect();
    if candidates.is_empty() {
        return Err(format!("image {reference} not found"));
    }
    let Some(arch) = architecture else {
        return Ok(candidates[0]);
    };
    candidates
        .into_iter()
        .find(|n| IMAGES[*n].architecture == arch)
        .ok_or_else(|| format!("image {reference} is not available for architecture {arch}"))
}

fn resolve_image(body: &mut Body, reference: Option<IdOrName>, st: Option<usize>) -> Option<usize> {
    let reference = reference?;
    let arch = st.map(|t| SERVER_TYPES[t].architecture);
    match find_image(&reference, arch) {
        Ok(i) => Some(i),
        Err(e) => {
            body.error("image", e);
            None
        }
    }
}

fn user_data_field(body: &mut Body) -> Option<String> {
    let user_data = body.string("user_data")?;
    if user_data.len() > MAX_USER_DATA_BYTES {
        body.error(
            "user_data",
            format!(
                "is {} bytes, more than the limit of {MAX_USER_DATA_BYTES}",
                user_data.len()
            ),
        );
        return None;
    }
    Some(user_data)
}

/// Rejects request fields the simulator cannot honour, instead of silently ignoring them.
fn reject_unsupported(body: &mut Body) {
    if body.take("datacenter").is_some() {
        body.error(
            "datacenter",
            "no longer exists (removed 2026-07-01): use location",
        );
    }
    for field in ["volumes", "networks"] {
        if body.array(field).is_some_and(|items| !items.is_empty()) {
            body.error(field, "not supported by the simulator");
        }
    }
    if body.take("placement_group").is_some() {
        body.error("placement_group", "not supported by the simulator");
    }
}

pub(super) fn create_server(world: &mut World, ctx: &Ctx) -> Result<Reply, ApiError> {
    let mut b = Body::parse(ctx.body)?;
    let name = b.required_string("name");
    if let Some(problem) = name.as_deref().and_then(hostname_problem) {
        b.error("name", problem);
    }
    let server_type_ref = b.id_or_name("server_type", true);
    let image_ref = b.id_or_name("image", true);
    let location_ref = b.id_or_name("location", false);
    reject_unsupported(&mut b);
    let start_after_create = b.bool("start_after_create").unwrap_or(true);
    let user_data = user_data_field(&mut b);
    let labels = b.labels("labels").unwrap_or_default();
    let _automount = b.bool("automount");

    let mut ssh_keys = Vec::new();
    for (i, item) in b.array("ssh_keys").unwrap_or_default().iter().enumerate() {
        let reference = match item {
            Value::Number(n) => n.as_i64().map(IdOrName::Id),
            Value::String(s) => Some(IdOrName::Name(s.clone())),
            _ => None,
        };
        match reference {
            None => b.error("ssh_keys", format!("entry {i} must be an ID or a name")),
            Some(r) => match world.ssh_keys.values().find(|k| r.refers_to(k.id, &k.name)) {
                Some(k) if !ssh_keys.contains(&k.id) => ssh_keys.push(k.id),
                Some(_) => {}
                None => b.error("ssh_keys", format!("SSH key {r} not found")),
            },
        }
    }

    let mut firewalls = Vec::new();
    for (i, item) in b.array("firewalls").unwrap_or_default().iter().enumerate() {
        match item.get("firewall").and_then(Value::as_i64) {
            None => b.error(
                "firewalls",
                format!("entry {i} must be an object {{\"firewall\": <id>}}"),
            ),
            Some(id) if !world.firewalls.contains_key(&id) => {
                b.error("firewalls", format!("firewall {id} not found"));
            }
            Some(id) if firewalls.contains(&id) => {
                b.error("firewalls", format!("firewall {id} is listed twice"));
            }
            Some(id) => firewalls.push(id),
        }
    }

    let (mut enable_ipv4, mut enable_ipv6) = (true, true);
    if let Some(map) = b.object("public_net") {
        let mut net = Body::from_map(map);
        enable_ipv4 = net.bool("enable_ipv4").unwrap_or(true);
        enable_ipv6 = net.bool("enable_ipv6").unwrap_or(true);
        for field in ["ipv4", "ipv6"] {
            if net.take(field).is_some() {
                net.error(field, "primary IPs are not supported by the simulator");
            }
        }
        net.reject_unknown();
        // Without networks (not simulated) a server needs a public interface.
        if !enable_ipv4 && !enable_ipv6 {
            net.error(
                "enable_ipv4",
                "a server needs public IPv4 or IPv6 (private networks are not simulated)",
            );
        }
        for mut e in net.errors {
            e.name = format!("public_net.{}", e.name);
            b.errors.push(e);
        }
    }

    let server_type = server_type_ref.and_then(|r| {
        let found = find_server_type(&r);
        if found.is_none() {
            b.error("server_type", format!("server type {r} not found"));
        }
        found
    });
    let image = resolve_image(&mut b, image_ref, server_type);
    let location = match location_ref {
        None => Some(0),
        Some(r) => {
            let found = LOCATIONS.iter().position(|l| r.refers_to(l.id, l.name));
            if found.is_none() {
                b.error("location", format!("location {r} not found"));
            }
            found
        }
    };
    b.finish()?;
    let (Some(name), Some(server_type), Some(image), Some(location)) =
        (name, server_type, image, location)
    else {
        return Err(internal("validation passed without required fields"));
    };
    if world.servers.values().any(|s| s.name == name) {
        return Err(ApiError::uniqueness("name"));
    }
    if world.servers.len() >= world.server_limit as usize {
        // The spec's example for this code [spec:ovw Errors]; the exact limit name is UNVERIFIED.
        return Err(ApiError::resource_limit(
            "project_limit",
            format!(
                "project limit exceeded: at most {} servers",
                world.server_limit
            ),
        ));
    }
    // Direct firewalls plus those whose label selectors match the new server's labels.
    let mut covering: std::collections::BTreeSet<i64> = firewalls.iter().copied().collect();
    covering.extend(
        world
            .firewalls
            .values()
            .filter(|fw| {
                fw.applied.iter().any(|a| match &a.target {
                    Target::Selector { parsed, .. } => parsed.matches(&labels),
                    Target::Server(_) => false,
                })
            })
            .map(|fw| fw.id),
    );
    if covering.len() > MAX_FIREWALLS_PER_SERVER {
        return Err(ApiError::resource_limit(
            "firewalls_per_server",
            format!("a server can have at most {MAX_FIREWALLS_PER_SERVER} firewalls"),
        ));
    }
    let ipv4 = if enable_ipv4 {
        Some(world.allocate_ipv4().ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "resource_limit_exceeded",
                "the simulator ran out of IPv4 addresses",
            )
        })?)
    } else {
        None
    };
    let ipv6 = if enable_ipv6 {
        world.allocate_ipv6()
    } else {
        None
    };
    let root_password = ssh_keys.is_empty().then(|| world.root_password());
    // With the SSH endpoint on, the server's SSH side: the keys are copied now, as Hetzner
    // copies them onto the disk (deleting a key object later does not lock root out).
    let ssh = world.ssh.is_some().then(|| {
        let keys = ssh_keys
            .iter()
            .filter_map(|id| world.ssh_keys.get(id))
            .filter_map(|k| ssh_key::PublicKey::from_openssh(k.public_key.trim()).ok())
            .collect();
        ServerSsh::new(user_data.as_deref(), keys)
    });
    let id = world.new_server_id();
    world.servers.insert(
        id,
        Server {
            id,
            name,
            status: ServerStatus::Initializing,
            created: ctx.clock.utc,
            labels,
            server_type,
            image,
            location,
            primary_disk_size: SERVER_TYPES[server_type].disk,
            ipv4,
            ipv6,
            user_data,
            ssh_keys,
            ssh,
        },
    );
    let fail = ctx.fail_actions;
    let action = world.start_action(
        &ctx.clock,
        "create_server",
        vec![server_ref(id)],
        Effect::ServerStatus {
            server: id,
            success: if start_after_create {
                ServerStatus::Starting
            } else {
                ServerStatus::Off
            },
            failure: ServerStatus::Off,
        },
        Some(id),
        fail,
    );
    let mut next_actions = Vec::new();
    if start_after_create {
        next_actions.push(world.start_action(
            &ctx.clock,
            "start_server",
            vec![server_ref(id)],
            Effect::ServerStatus {
                server: id,
                success: ServerStatus::Running,
                failure: ServerStatus::Off,
            },
            Some(id),
            fail,
        ));
    }
    if ctx.hold_server_start {
        // create_server finishes (the server is then `starting`, as at Hetzner: initializing
        // -> starting -> running); start_server runs until the fault is cleared.
        for held in &next_actions {
            world.hold_action(*held);
        }
    }
    for fw in firewalls {
        let apply = world.start_action(
            &ctx.clock,
            "apply_firewall",
            vec![firewall_ref(fw), server_ref(id)],
            Effect::FirewallApply { firewall: fw },
            None,
            fail,
        );
        if let Some(f) = world.firewalls.get_mut(&fw) {
            f.applied.push(Application {
                target: Target::Server(id),
                apply_action: Some(apply),
                removal_action: None,
            });
        }
        next_actions.push(apply);
    }
    world.settle(ctx.clock.now);
    let server = world
        .servers
        .get(&id)
        .map(|s| to_value(world.server_out(s)))
        .unwrap_or(Value::Null);
    let next: Vec<Value> = next_actions
        .iter()
        .map(|a| action_json(world, *a, ctx))
        .collect();
    Ok(Reply::created(json!({
        "server": server,
        "action": action_json(world, action, ctx),
        "next_actions": next,
        "root_password": root_password,
    })))
}

pub(super) fn update_server(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
    if !world.servers.contains_key(&id) {
        return Err(ApiError::not_found("server"));
    }
    let mut b = Body::parse(ctx.body)?;
    let name = b.string("name");
    if let Some(problem) = name.as_deref().and_then(hostname_problem) {
        b.error("name", problem);
    }
    let labels = b.labels("labels");
    b.finish()?;
    if let Some(n) = &name
        && world.servers.values().any(|s| s.id != id && &s.name == n)
    {
        return Err(ApiError::uniqueness("name"));
    }
    let server = world
        .servers
        .get_mut(&id)
        .ok_or_else(|| ApiError::not_found("server"))?;
    if let Some(n) = name {
        server.name = n;
    }
    if let Some(l) = labels {
        server.labels = l;
    }
    let server = world
        .servers
        .get(&id)
        .ok_or_else(|| ApiError::not_found("server"))?;
    Ok(Reply::ok(json!({"server": world.server_out(server)})))
}

/// DELETE removes the server at once (and detaches its firewalls), even while it is locked.
/// With the "action ends in error" fault the server stays and the action fails.
pub(super) fn delete_server(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
    if !world.servers.contains_key(&id) {
        return Err(ApiError::not_found("server"));
    }
    let action = world.start_action(
        &ctx.clock,
        "delete_server",
        vec![server_ref(id)],
        Effect::None,
        None,
        ctx.fail_actions,
    );
    if !ctx.fail_actions {
        world.remove_server(id);
    }
    world.settle(ctx.clock.now);
    Ok(Reply::ok(
        json!({"action": action_json(world, action, ctx)}),
    ))
}

pub(super) fn server_action(
    world: &mut World,
    ctx: &Ctx,
    id: i64,
    verb: ServerVerb,
) -> Result<Reply, ApiError> {
    let (status, server_type, image, disk) = match world.servers.get(&id) {
        Some(s) => (s.status, s.server_type, s.image, s.primary_disk_size),
        None => return Err(ApiError::not_found("server")),
    };
    // Rebuild takes a body; the power actions take none (a body is ignored).
    let mut rebuild = None;
    if verb == ServerVerb::Rebuild {
        let mut b = Body::parse(ctx.body)?;
        let image_ref = b.id_or_name("image", true);
        let image = resolve_image(&mut b, image_ref, Some(server_type));
        let user_data = user_data_field(&mut b);
        b.finish()?;
        let Some(image) = image else {
            return Err(internal("validation passed without image"));
        };
        rebuild = Some((image, user_data));
    }
    let mut change_type = None;
    if verb == ServerVerb::ChangeType {
        let mut b = Body::parse(ctx.body)?;
        let type_ref = b.id_or_name("server_type", true);
        let new_type = type_ref.and_then(|r| {
            let found = find_server_type(&r);
            if found.is_none() {
                b.error("server_type", format!("server type {r} not found"));
            }
            found
        });
        let upgrade_disk = b.bool("upgrade_disk");
        if upgrade_disk.is_none() && !b.errors.iter().any(|e| e.name == "upgrade_disk") {
            b.error("upgrade_disk", "is required");
        }
        b.finish()?;
        let (Some(new_type), Some(upgrade_disk)) = (new_type, upgrade_disk) else {
            return Err(internal("validation passed without server_type"));
        };
        // A running action (a poweroff, say) locks the server before its state is judged.
        if world.server_locked(id) {
            return Err(ApiError::locked());
        }
        change_type = Some(check_type_change(
            status,
            image,
            disk,
            new_type,
            upgrade_disk,
        )?);
    }
    if world.server_locked(id) {
        return Err(ApiError::locked());
    }
    use ServerStatus as S;
    let power = |from: S, interim: S, to: S| {
        if status == from {
            (
                Some(interim),
                Effect::ServerStatus {
                    server: id,
                    success: to,
                    failure: from,
                },
            )
        } else {
            (None, Effect::None)
        }
    };
    let (command, (interim, effect)) = match verb {
        ServerVerb::PowerOn => ("start_server", power(S::Off, S::Starting, S::Running)),
        ServerVerb::PowerOff => ("stop_server", power(S::Running, S::Stopping, S::Off)),
        // The simulated OS always honours the ACPI request.
        ServerVerb::Shutdown => ("shutdown_server", power(S::Running, S::Stopping, S::Off)),
        ServerVerb::Reboot => ("reboot_server", (None, Effect::None)),
        ServerVerb::Reset => ("reset_server", (None, Effect::None)),
        ServerVerb::Rebuild => (
            "rebuild_server",
            (
                Some(S::Rebuilding),
                Effect::ServerStatus {
                    server: id,
                    success: S::Running,
                    failure: S::Off,
                },
            ),
        ),
        // The spec: the disk is copied "and starts it again".
        ServerVerb::ChangeType => (
            "change_server_type",
            (
                Some(S::Migrating),
                Effect::ServerStatus {
                    server: id,
                    success: S::Running,
                    failure: S::Off,
                },
            ),
        ),
    };
    let mut root_password = None;
    let has_keys = world
        .servers
        .get(&id)
        .is_some_and(|s| !s.ssh_keys.is_empty());
    if rebuild.is_some() && !has_keys {
        root_password = Some(world.root_password());
    }
    if let Some(server) = world.servers.get_mut(&id) {
        if let Some(interim) = interim {
            server.status = interim;
        }
        if let Some((new_type, new_disk)) = change_type {
            server.server_type = new_type;
            server.primary_disk_size = new_disk;
        }
        if let Some((image, user_data)) = rebuild {
            server.image = image;
            // Without user_data the previous one is reused.
            if user_data.is_some() {
                server.user_data = user_data;
            }
            // A fresh install: new host key, empty disk, cloud-init runs again.
            if let Some(ssh) = &mut server.ssh {
                ssh.reinstall(server.user_data.as_deref());
            }
        }
    }
    let action = world.start_action(
        &ctx.clock,
        command,
        vec![server_ref(id)],
        effect,
        Some(id),
        ctx.fail_actions,
    );
    if ctx.hold_server_start && verb == ServerVerb::PowerOn {
        // Stays `starting` (if it was off) until the fault is cleared.
        world.hold_action(action);
    }
    world.settle(ctx.clock.now);
    let mut body = json!({"action": action_json(world, action, ctx)});
    if verb == ServerVerb::Rebuild {
        body["root_password"] = json!(root_password);
    }
    Ok(Reply::created(body))
}

/// The new (type, disk size) of a type change, or why it is refused: the server must be off, the
/// architecture must fit its image, and the disk cannot shrink.
fn check_type_change(
    status: ServerStatus,
    image: usize,
    disk: u32,
    new_type: usize,
    upgrade_disk: bool,
) -> Result<(usize, u32), ApiError> {
    if status != ServerStatus::Off {
        return Err(ApiError::unprocessable(
            "server_not_stopped",
            "the server must be powered off to change its type",
        ));
    }
    let target = &SERVER_TYPES[new_type];
    if target.architecture != IMAGES[image].architecture {
        return Err(ApiError::unprocessable(
            "invalid_server_type",
            format!(
                "server type {} ({}) does not fit the server's {} image",
                target.name, target.architecture, IMAGES[image].architecture
            ),
        ));
    }
    if target.disk < disk {
        return Err(ApiError::unprocessable(
            "invalid_server_type",
            format!(
                "server type {} has a {} GB disk, smaller than the server's {} GB",
                target.name, target.disk, disk
            ),
        ));
    }
    Ok((new_type, if upgrade_disk { target.disk } else { disk }))
}

pub(super) fn get_server(world: &World, id: i64) -> Result<Reply, ApiError> {
    let server = world
        .servers
        .get(&id)
        .ok_or_else(|| ApiError::not_found("server"))?;
    Ok(Reply::ok(json!({"server": world.server_out(server)})))
}

/// `GET /servers/{id}/actions`.
pub(super) fn list_server_actions(world: &World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
    if !world.servers.contains_key(&id) {
        return Err(ApiError::not_found("server"));
    }
    list_actions(world, ctx, |a| a.touches("server", id), false)
}

/// `GET /servers/{id}/actions/{action_id}`.
pub(super) fn get_server_action(
    world: &World,
    ctx: &Ctx,
    id: i64,
    action: i64,
) -> Result<Reply, ApiError> {
    if !world.servers.contains_key(&id) {
        return Err(ApiError::not_found("server"));
    }
    get_action(world, ctx, action, |a| a.touches("server", id))
}
