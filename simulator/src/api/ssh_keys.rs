//! SSH keys: list, create, get, update, delete.

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::list::{PageRequest, SortKey, parse_sort, sort_by_keys};
use crate::request::Body;
use crate::state::{SshKey, World};
use crate::validate::ssh_fingerprint;

use super::{Ctx, Reply, internal, selector_param, to_value};

pub(super) fn list_ssh_keys(world: &World, ctx: &Ctx) -> Result<Reply, ApiError> {
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

pub(super) fn create_ssh_key(world: &mut World, ctx: &Ctx) -> Result<Reply, ApiError> {
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

pub(super) fn update_ssh_key(world: &mut World, ctx: &Ctx, id: i64) -> Result<Reply, ApiError> {
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

pub(super) fn get_ssh_key(world: &World, id: i64) -> Result<Reply, ApiError> {
    let key = world
        .ssh_keys
        .get(&id)
        .ok_or_else(|| ApiError::not_found("SSH key"))?;
    Ok(Reply::ok(json!({"ssh_key": world.ssh_key_out(key)})))
}

pub(super) fn delete_ssh_key(world: &mut World, id: i64) -> Result<Reply, ApiError> {
    world
        .ssh_keys
        .remove(&id)
        .ok_or_else(|| ApiError::not_found("SSH key"))?;
    Ok(Reply::no_content())
}
