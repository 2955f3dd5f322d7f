//! Endpoint handlers. Each runs synchronously under the world lock and either answers or fails
//! with an [`ApiError`]; HTTP concerns (auth, rate limit, faults, headers) live in `mod.rs`.

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use crate::catalog::{IMAGES, LOCATIONS, SERVER_TYPES, catalog_created};
use crate::error::ApiError;
use crate::labels::Selector;
use crate::list::{PageRequest, Pagination, SortKey, parse_sort, sort_by_keys};
use crate::request::{Body, IdOrName, Query};
use crate::routes::{Endpoint, FirewallVerb, ServerVerb};
use crate::state::{
    Action, Application, Clock, Effect, Firewall, Server, ServerStatus, Snapshot, SshKey, Target,
    World,
};
use crate::validate::{
    MAX_FIREWALL_NAME, MAX_USER_DATA_BYTES, firewall_rules, hostname_problem, ssh_fingerprint,
};
use crate::wire::{ActionOut, ResourceRef};

/// A successful answer.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Option<Value>,
    /// Set for paginated lists (used for the `Link` header).
    pub pagination: Option<Pagination>,
}

impl Reply {
    fn ok(body: Value) -> Reply {
        Reply {
            status: StatusCode::OK,
            body: Some(body),
            pagination: None,
        }
    }

    fn created(body: Value) -> Reply {
        Reply {
            status: StatusCode::CREATED,
            body: Some(body),
            pagination: None,
        }
    }

    fn no_content() -> Reply {
        Reply {
            status: StatusCode::NO_CONTENT,
            body: None,
            pagination: None,
        }
    }

    fn list(root: &str, items: Value, pagination: Pagination) -> Reply {
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
}

fn to_value<T: serde::Serialize>(value: T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn internal(message: &str) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
}

pub(crate) fn handle(world: &mut World, endpoint: Endpoint, ctx: &Ctx) -> Result<Reply, ApiError> {
    world.settle(ctx.clock.now);
    use Endpoint as E;
    match endpoint {
        E::ListServers => list_servers(world, ctx),
        E::CreateServer => create_server(world, ctx),
        E::GetServer(id) => {
            let server = world
                .servers
                .get(&id)
                .ok_or_else(|| ApiError::not_found("server"))?;
            Ok(Reply::ok(json!({"server": world.server_out(server)})))
        }
        E::UpdateServer(id) => update_server(world, ctx, id),
        E::DeleteServer(id) => delete_server(world, ctx, id),
        E::ServerAction(id, verb) => server_action(world, ctx, id, verb),
        E::ListServerActions(id) => {
            if !world.servers.contains_key(&id) {
                return Err(ApiError::not_found("server"));
            }
            list_actions(world, ctx, |a| a.touches("server", id), false)
        }
        E::GetServerAction(id, action) => {
            if !world.servers.contains_key(&id) {
                return Err(ApiError::not_found("server"));
            }
            get_action(world, ctx, action, |a| a.touches("server", id))
        }
        E::ListAllServerActions => list_actions(
            world,
            ctx,
            |a| a.resources.iter().any(|r| r.kind == "server"),
            true,
        ),
        E::GetAnyServerAction(action) => get_action(world, ctx, action, |a| {
            a.resources.iter().any(|r| r.kind == "server")
        }),
        E::ListSshKeys => list_ssh_keys(world, ctx),
        E::CreateSshKey => create_ssh_key(world, ctx),
        E::GetSshKey(id) => {
            let key = world
                .ssh_keys
                .get(&id)
                .ok_or_else(|| ApiError::not_found("SSH key"))?;
            Ok(Reply::ok(json!({"ssh_key": world.ssh_key_out(key)})))
        }
        E::UpdateSshKey(id) => update_ssh_key(world, ctx, id),
        E::DeleteSshKey(id) => {
            world
                .ssh_keys
                .remove(&id)
                .ok_or_else(|| ApiError::not_found("SSH key"))?;
            Ok(Reply::no_content())
        }
        E::ListFirewalls => list_firewalls(world, ctx),
        E::CreateFirewall => create_firewall(world, ctx),
        E::GetFirewall(id) => {
            let fw = world
                .firewalls
                .get(&id)
                .ok_or_else(|| ApiError::not_found("firewall"))?;
            Ok(Reply::ok(json!({"firewall": world.firewall_out(fw)})))
        }
        E::UpdateFirewall(id) => update_firewall(world, ctx, id),
        E::DeleteFirewall(id) => {
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
        E::FirewallAction(id, verb) => firewall_action(world, ctx, id, verb),
        E::ListFirewallActions(id) => {
            if !world.firewalls.contains_key(&id) {
                return Err(ApiError::not_found("firewall"));
            }
            list_actions(world, ctx, |a| a.touches("firewall", id), false)
        }
        E::GetFirewallAction(id, action) => {
            if !world.firewalls.contains_key(&id) {
                return Err(ApiError::not_found("firewall"));
            }
            get_action(world, ctx, action, |a| a.touches("firewall", id))
        }
        E::ListAllFirewallActions => list_actions(
            world,
            ctx,
            |a| a.resources.iter().any(|r| r.kind == "firewall"),
            true,
        ),
        E::GetAnyFirewallAction(action) => get_action(world, ctx, action, |a| {
            a.resources.iter().any(|r| r.kind == "firewall")
        }),
        E::GetActions => get_actions_by_id(world, ctx),
        E::GetAction(id) => get_action(world, ctx, id, |_| true),
        E::ListServerTypes => catalog_list(
            ctx,
            "server_types",
            SERVER_TYPES
                .iter()
                .filter(|t| ctx.query.first("name").is_none_or(|n| n == t.name))
                .map(|t| to_value(t.out()))
                .collect(),
        ),
        E::GetServerType(id) => SERVER_TYPES
            .iter()
            .find(|t| t.id == id)
            .map(|t| Reply::ok(json!({"server_type": t.out()})))
            .ok_or_else(|| ApiError::not_found("server type")),
        E::ListImages => list_images(world, ctx),
        E::GetImage(id) => {
            let image = match world.snapshots.get(&id) {
                Some(snapshot) => snapshot.out(),
                None => IMAGES
                    .iter()
                    .find(|i| i.id == id)
                    .map(|i| i.out())
                    .ok_or_else(|| ApiError::not_found("image"))?,
            };
            Ok(Reply::ok(json!({ "image": image })))
        }
        E::UpdateImage(id) => update_image(world, ctx, id),
        E::DeleteImage(id) => {
            if world.snapshots.remove(&id).is_some() {
                return Ok(Reply::no_content());
            }
            Err(system_image_or_not_found(id))
        }
        E::CreateImage(id) => create_image(world, ctx, id),
        E::ListLocations => list_locations(ctx),
        E::GetLocation(id) => LOCATIONS
            .iter()
            .find(|l| l.id == id)
            .map(|l| Reply::ok(json!({"location": l.out()})))
            .ok_or_else(|| ApiError::not_found("location")),
    }
}

// ---------------------------------------------------------------------------------------------
// Query helpers

fn selector_param(query: &Query) -> Result<Option<Selector>, ApiError> {
    match query.first("label_selector") {
        None | Some("") => Ok(None),
        Some(raw) => Selector::parse(raw)
            .map(Some)
            .map_err(|e| ApiError::invalid_field("label_selector", e)),
    }
}

fn catalog_list(ctx: &Ctx, root: &str, items: Vec<Value>) -> Result<Reply, ApiError> {
    let page = PageRequest::from_query(ctx.query)?;
    let (items, pagination) = page.apply(items);
    Ok(Reply::list(root, Value::Array(items), pagination))
}

fn list_locations(ctx: &Ctx) -> Result<Reply, ApiError> {
    let q = ctx.query;
    let sort = parse_sort(q, &["id", "name"])?;
    let page = PageRequest::from_query(q)?;
    let mut locations: Vec<_> = LOCATIONS
        .iter()
        .filter(|l| q.first("name").is_none_or(|n| n == l.name))
        .collect();
    sort_by_keys(
        &mut locations,
        &sort,
        |l, field| match field {
            "name" => SortKey::Text(l.name.to_string()),
            _ => SortKey::Int(l.id),
        },
        |l| l.id,
    );
    let (locations, pagination) = page.apply(locations);
    let out: Vec<Value> = locations.iter().map(|l| to_value(l.out())).collect();
    Ok(Reply::list("locations", Value::Array(out), pagination))
}

const IMAGE_TYPES: &[&str] = &["system", "app", "snapshot", "backup"];
const IMAGE_STATUSES: &[&str] = &["available", "creating", "unavailable"];

/// Repeatable enum filter: every value must be one of `allowed`.
fn enum_filter<'q>(
    query: &'q Query,
    name: &str,
    allowed: &[&str],
) -> Result<Vec<&'q str>, ApiError> {
    let values = query.all(name);
    if let Some(bad) = values.iter().find(|v| !allowed.contains(v)) {
        return Err(ApiError::invalid_field(
            name,
            format!("'{bad}' is not one of {}", allowed.join(", ")),
        ));
    }
    Ok(values)
}

/// `GET /images`: the catalog's system images and the project's snapshots. `name` only matches
/// system images (snapshots have none); `bound_to` only backups (none are simulated).
fn list_images(world: &World, ctx: &Ctx) -> Result<Reply, ApiError> {
    let q = ctx.query;
    let sort = parse_sort(q, &["id", "name", "created"])?;
    let page = PageRequest::from_query(q)?;
    let types = enum_filter(q, "type", IMAGE_TYPES)?;
    let statuses = enum_filter(q, "status", IMAGE_STATUSES)?;
    let architecture = enum_filter(q, "architecture", &["x86", "arm"])?;
    let selector = selector_param(q)?;
    let name = q.first("name");
    let bound_to = !q.all("bound_to").is_empty();
    let system = IMAGES.iter().map(|i| (catalog_created(), i.out()));
    let snapshots = world.snapshots.values().map(|s| (s.created, s.out()));
    let mut images: Vec<_> = system
        .chain(snapshots)
        .filter(|(_, i)| types.is_empty() || types.contains(&i.kind))
        .filter(|(_, i)| statuses.is_empty() || statuses.contains(&i.status))
        .filter(|(_, i)| architecture.is_empty() || architecture.contains(&i.architecture))
        .filter(|(_, i)| name.is_none_or(|n| i.name.as_deref() == Some(n)))
        .filter(|_| !bound_to)
        .filter(|(_, i)| selector.as_ref().is_none_or(|sel| sel.matches(&i.labels)))
        .collect();
    sort_by_keys(
        &mut images,
        &sort,
        |(created, i), field| match field {
            "name" => SortKey::Text(i.name.clone().unwrap_or_default()),
            "created" => SortKey::Int(created.timestamp_micros()),
            _ => SortKey::Int(i.id),
        },
        |(_, i)| i.id,
    );
    let (images, pagination) = page.apply(images);
    let out: Vec<Value> = images.into_iter().map(|(_, i)| to_value(i)).collect();
    Ok(Reply::list("images", Value::Array(out), pagination))
}

/// System images can be neither changed nor deleted ("Only Images of type `snapshot` and
/// `backup`"); the code for trying is undocumented, the simulator answers 403 `forbidden`.
fn system_image_or_not_found(id: i64) -> ApiError {
    if IMAGES.iter().any(|i| i.id == id) {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only images of type snapshot or backup can be changed or deleted",
        )
    } else {
        ApiError::not_found("image")
    }
}

/// `POST /servers/{id}/actions/create_image`: a snapshot, `creating` while its `create_image`
/// action runs (the server is locked meanwhile), then `available`. `backup` needs the server's
/// backup option, which the simulator does not offer. Unknown fields are rejected, as the real
/// API does for this call (422 "unknown field name").
fn create_image(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
    let (server_name, base_image, disk_size) = match world.servers.get(&id) {
        Some(s) => (s.name.clone(), s.image, s.primary_disk_size),
        None => return Err(ApiError::not_found("server")),
    };
    let mut b = Body::parse(ctx.body)?;
    match b.string("type").as_deref() {
        None | Some("snapshot") => {}
        Some("backup") => b.error(
            "type",
            "backup images need the server's backup option, which is not enabled",
        ),
        Some(other) => b.error("type", format!("'{other}' is not one of snapshot, backup")),
    }
    let description = b.string("description");
    let labels = b.labels("labels").unwrap_or_default();
    b.reject_unknown();
    b.finish()?;
    if world.server_locked(id) {
        return Err(ApiError::locked());
    }
    let image_id = world.new_image_id();
    let action = world.start_action(
        &ctx.clock,
        "create_image",
        vec![server_ref(id)],
        Effect::ImageCreated { image: image_id },
        Some(id),
        ctx.fail_actions,
    );
    let description = description
        .unwrap_or_else(|| format!("{server_name}-{}", ctx.clock.utc.format("%Y%m%d%H%M%S")));
    world.snapshots.insert(
        image_id,
        Snapshot {
            id: image_id,
            description,
            labels,
            created: ctx.clock.utc,
            created_from: (id, server_name),
            base_image,
            disk_size,
            creating_action: Some(action),
            failed: false,
        },
    );
    world.settle(ctx.clock.now);
    let image = world
        .snapshots
        .get(&image_id)
        .map(|s| to_value(s.out()))
        .unwrap_or(Value::Null);
    Ok(Reply::created(json!({
        "image": image,
        "action": action_json(world, action, ctx),
    })))
}

/// `PUT /images/{id}`: description and labels (replacing the whole map); `type` may only be
/// `snapshot` (converting a backup, and a snapshot already is one).
fn update_image(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
    if !world.snapshots.contains_key(&id) {
        return Err(system_image_or_not_found(id));
    }
    let mut b = Body::parse(ctx.body)?;
    let description = b.string("description");
    if let Some(kind) = b.string("type")
        && kind != "snapshot"
    {
        b.error("type", format!("'{kind}' is not snapshot"));
    }
    let labels = b.labels("labels");
    b.finish()?;
    let snapshot = world
        .snapshots
        .get_mut(&id)
        .ok_or_else(|| ApiError::not_found("image"))?;
    if let Some(d) = description {
        snapshot.description = d;
    }
    if let Some(l) = labels {
        snapshot.labels = l;
    }
    Ok(Reply::ok(json!({ "image": snapshot.out() })))
}

// ---------------------------------------------------------------------------------------------
// Actions

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

fn list_actions(
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

fn get_action(
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
fn get_actions_by_id(world: &World, ctx: &Ctx) -> Result<Reply, ApiError> {
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
    actions.dedup_by_key(|a| a.id);
    sort_by_keys(
        &mut actions,
        &sort,
        |a, f| action_sort_key(a, f, &ctx.clock),
        |a| a.id,
    );
    let out: Vec<ActionOut> = actions.iter().map(|a| a.out(ctx.clock.now)).collect();
    Ok(Reply::ok(json!({ "actions": out })))
}

fn action_json(world: &World, id: i64, ctx: &Ctx) -> Value {
    world
        .actions
        .get(&id)
        .map_or(Value::Null, |a| to_value(a.out(ctx.clock.now)))
}

fn server_ref(id: i64) -> ResourceRef {
    ResourceRef { id, kind: "server" }
}

fn firewall_ref(id: i64) -> ResourceRef {
    ResourceRef {
        id,
        kind: "firewall",
    }
}

// ---------------------------------------------------------------------------------------------
// Servers

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

fn list_servers(world: &World, ctx: &Ctx) -> Result<Reply, ApiError> {
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
    let out: Vec<Value> = servers
        .iter()
        .map(|s| to_value(world.server_out(s)))
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

fn create_server(world: &mut World, ctx: &Ctx) -> Result<Reply, ApiError> {
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

fn update_server(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
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
fn delete_server(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
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

fn server_action(
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

// ---------------------------------------------------------------------------------------------
// SSH keys

fn list_ssh_keys(world: &World, ctx: &Ctx) -> Result<Reply, ApiError> {
    let q = ctx.query;
    let sort = parse_sort(q, &["id", "name"])?;
    let page = PageRequest::from_query(q)?;
    let selector = selector_param(q)?;
    let name = q.first("name");
    let fingerprint = q.first("fingerprint");
    let mut keys: Vec<&SshKey> = world
        .ssh_keys
        .values()
        .filter(|k| name.is_none_or(|n| n == k.name))
        .filter(|k| fingerprint.is_none_or(|f| f == k.fingerprint))
        .filter(|k| selector.as_ref().is_none_or(|sel| sel.matches(&k.labels)))
        .collect();
    sort_by_keys(
        &mut keys,
        &sort,
        |k, field| match field {
            "name" => SortKey::Text(k.name.clone()),
            _ => SortKey::Int(k.id),
        },
        |k| k.id,
    );
    let (keys, pagination) = page.apply(keys);
    let out: Vec<Value> = keys
        .iter()
        .map(|k| to_value(world.ssh_key_out(k)))
        .collect();
    Ok(Reply::list("ssh_keys", Value::Array(out), pagination))
}

fn create_ssh_key(world: &mut World, ctx: &Ctx) -> Result<Reply, ApiError> {
    let mut b = Body::parse(ctx.body)?;
    let name = b.required_string("name");
    if name.as_deref() == Some("") {
        b.error("name", "must not be empty");
    }
    let public_key = b.required_string("public_key");
    let fingerprint = public_key
        .as_deref()
        .and_then(|k| match ssh_fingerprint(k) {
            Ok(fp) => Some(fp),
            Err(e) => {
                b.error("public_key", e);
                None
            }
        });
    let labels = b.labels("labels").unwrap_or_default();
    b.finish()?;
    let (Some(name), Some(public_key), Some(fingerprint)) = (name, public_key, fingerprint) else {
        return Err(internal("validation passed without required fields"));
    };
    if world.ssh_keys.values().any(|k| k.name == name) {
        return Err(ApiError::uniqueness("name"));
    }
    if world
        .ssh_keys
        .values()
        .any(|k| k.fingerprint == fingerprint)
    {
        return Err(ApiError::uniqueness("public_key"));
    }
    let id = world.new_ssh_key_id();
    let key = SshKey {
        id,
        name,
        fingerprint,
        public_key: public_key.trim().to_string(),
        labels,
        created: ctx.clock.utc,
    };
    let out = world.ssh_key_out(&key);
    world.ssh_keys.insert(id, key);
    Ok(Reply::created(json!({ "ssh_key": out })))
}

fn update_ssh_key(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
    if !world.ssh_keys.contains_key(&id) {
        return Err(ApiError::not_found("SSH key"));
    }
    let mut b = Body::parse(ctx.body)?;
    let name = b.string("name");
    if name.as_deref() == Some("") {
        b.error("name", "must not be empty");
    }
    let labels = b.labels("labels");
    b.finish()?;
    if let Some(n) = &name
        && world.ssh_keys.values().any(|k| k.id != id && &k.name == n)
    {
        return Err(ApiError::uniqueness("name"));
    }
    let key = world
        .ssh_keys
        .get_mut(&id)
        .ok_or_else(|| ApiError::not_found("SSH key"))?;
    if let Some(n) = name {
        key.name = n;
    }
    if let Some(l) = labels {
        key.labels = l;
    }
    let key = world
        .ssh_keys
        .get(&id)
        .ok_or_else(|| ApiError::not_found("SSH key"))?;
    Ok(Reply::ok(json!({"ssh_key": world.ssh_key_out(key)})))
}

// ---------------------------------------------------------------------------------------------
// Firewalls

fn list_firewalls(world: &World, ctx: &Ctx) -> Result<Reply, ApiError> {
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

/// Starts `apply_firewall` for each target and records the (pending) application.
fn apply_targets(world: &mut World, ctx: &Ctx, firewall: i64, targets: Vec<Target>) -> Vec<i64> {
    let mut actions = Vec::new();
    for target in targets {
        let mut resources = vec![firewall_ref(firewall)];
        if let Target::Server(id) = target {
            resources.push(server_ref(id));
        }
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

fn create_firewall(world: &mut World, ctx: &Ctx) -> Result<Reply, ApiError> {
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

fn update_firewall(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
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

fn firewall_action(
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
        let mut resources = vec![firewall_ref(id)];
        if let Target::Server(sid) = target {
            resources.push(server_ref(sid));
        }
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
