//! The read-only catalog: `GET /server_types`, `/server_types/{id}`, `/locations`,
//! `/locations/{id}`.

use serde_json::{Value, json};

use crate::catalog::{LOCATIONS, SERVER_TYPES};
use crate::error::ApiError;
use crate::list::{PageRequest, SortKey, parse_sort, sort_by_keys};

use super::{Ctx, Reply, to_value};

/// `GET /server_types`: no `sort` in the spec, so it is ignored like any unknown parameter.
pub(super) fn list_server_types(ctx: &Ctx) -> Result<Reply, ApiError> {
    catalog_list(
        ctx,
        "server_types",
        SERVER_TYPES
            .iter()
            .filter(|t| ctx.query.first("name").is_none_or(|n| n == t.name))
            .map(|t| to_value(t.out()))
            .collect(),
    )
}

pub(super) fn get_server_type(id: i64) -> Result<Reply, ApiError> {
    SERVER_TYPES
        .iter()
        .find(|t| t.id == id)
        .map(|t| Reply::ok(json!({"server_type": t.out()})))
        .ok_or_else(|| ApiError::not_found("server type"))
}

pub(super) fn get_location(id: i64) -> Result<Reply, ApiError> {
    LOCATIONS
        .iter()
        .find(|l| l.id == id)
        .map(|l| Reply::ok(json!({"location": l.out()})))
        .ok_or_else(|| ApiError::not_found("location"))
}

fn catalog_list(ctx: &Ctx, root: &str, items: Vec<Value>) -> Result<Reply, ApiError> {
    let page = PageRequest::from_query(ctx.query)?;
    let (items, pagination) = page.apply(items);
    Ok(Reply::list(root, Value::Array(items), pagination))
}

pub(super) fn list_locations(ctx: &Ctx) -> Result<Reply, ApiError> {
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
