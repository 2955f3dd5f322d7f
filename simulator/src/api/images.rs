//! Images: the catalog's system images and the project's snapshots (`GET /images`,
//! `/images/{id}`, `PUT`/`DELETE /images/{id}`), and `POST /servers/{id}/actions/create_image`,
//! which makes a snapshot.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::catalog::{IMAGES, catalog_created};
use crate::error::ApiError;
use crate::list::{PageRequest, SortKey, parse_sort, sort_by_keys};
use crate::request::{Body, Query};
use crate::state::{Effect, Snapshot, World};

use super::actions::{action_json, server_ref};
use super::{Ctx, Reply, selector_param, to_value};

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
pub(super) fn list_images(world: &World, ctx: &Ctx) -> Result<Reply, ApiError> {
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
pub(super) fn create_image(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
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
pub(super) fn update_image(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
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

pub(super) fn get_image(world: &World, id: i64) -> Result<Reply, ApiError> {
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

pub(super) fn delete_image(world: &mut World, id: i64) -> Result<Reply, ApiError> {
    if world.snapshots.remove(&id).is_some() {
        return Ok(Reply::no_content());
    }
    Err(system_image_or_not_found(id))
}
