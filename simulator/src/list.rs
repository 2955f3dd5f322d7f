//! Sorting and pagination of list endpoints (API-NOTES §2).

use std::cmp::Ordering;

use serde::Serialize;

use crate::error::ApiError;
use crate::request::Query;

/// Largest `per_page` the API documents. Larger requests are clamped to it (the real behaviour is
/// undocumented; clamping keeps clients that ask for more working, and the answer's
/// `meta.pagination.per_page` shows what was applied).
pub(crate) const MAX_PER_PAGE: u64 = 50;
const DEFAULT_PER_PAGE: u64 = 25;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum SortKey {
    Int(i64),
    Text(String),
}

/// Parsed `sort` parameters: (field, descending).
pub(crate) fn parse_sort(query: &Query, allowed: &[&str]) -> Result<Vec<(String, bool)>, ApiError> {
    let mut keys = Vec::new();
    for raw in query.all("sort") {
        let (field, desc) = match raw.split_once(':') {
            None => (raw, false),
            Some((field, "asc")) => (field, false),
            Some((field, "desc")) => (field, true),
            Some(_) => {
                return Err(ApiError::invalid_field(
                    "sort",
                    format!("invalid sort '{raw}': direction must be 'asc' or 'desc'"),
                ));
            }
        };
        if !allowed.contains(&field) {
            return Err(ApiError::invalid_field(
                "sort",
                format!(
                    "invalid sort field '{field}': allowed are {}",
                    allowed.join(", ")
                ),
            ));
        }
        keys.push((field.to_string(), desc));
    }
    Ok(keys)
}

/// A sort key with its direction, so a derived `Vec` order is the multi-key order.
#[derive(PartialEq, Eq)]
struct Directed {
    key: SortKey,
    desc: bool,
}

impl PartialOrd for Directed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Directed {
    fn cmp(&self, other: &Self) -> Ordering {
        let ord = self.key.cmp(&other.key);
        if self.desc { ord.reverse() } else { ord }
    }
}

/// Sorts by the given keys, then by `id` ascending (the default order).
///
/// Keys are computed once per item (not twice per comparison: text keys are owned strings), and
/// without `sort` this is a single pass over input that already comes in ID order.
pub(crate) fn sort_by_keys<T>(
    items: &mut [T],
    keys: &[(String, bool)],
    key_of: impl Fn(&T, &str) -> SortKey,
    id_of: impl Fn(&T) -> i64,
) {
    if keys.is_empty() {
        items.sort_by_key(|item| id_of(item));
        return;
    }
    items.sort_by_cached_key(|item| {
        let directed: Vec<Directed> = keys
            .iter()
            .map(|(field, desc)| Directed {
                key: key_of(item, field),
                desc: *desc,
            })
            .collect();
        (directed, id_of(item))
    });
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct Pagination {
    pub page: u64,
    pub per_page: u64,
    pub previous_page: Option<u64>,
    pub next_page: Option<u64>,
    pub last_page: Option<u64>,
    pub total_entries: Option<u64>,
}

fn positive(query: &Query, name: &str, default: u64) -> Result<u64, ApiError> {
    match query.first(name) {
        None => Ok(default),
        Some(raw) => match raw.parse::<u64>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(ApiError::invalid_field(
                name,
                format!("must be a positive integer, got '{raw}'"),
            )),
        },
    }
}

/// Requested page and page size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PageRequest {
    pub page: u64,
    pub per_page: u64,
}

impl PageRequest {
    pub(crate) fn from_query(query: &Query) -> Result<PageRequest, ApiError> {
        let page = positive(query, "page", 1)?;
        let per_page = positive(query, "per_page", DEFAULT_PER_PAGE)?.min(MAX_PER_PAGE);
        Ok(PageRequest { page, per_page })
    }

    /// Cuts one page out of `items` and describes it.
    pub(crate) fn apply<T>(&self, items: Vec<T>) -> (Vec<T>, Pagination) {
        let total = items.len() as u64;
        let last_page = total.div_ceil(self.per_page).max(1);
        let start = (self.page - 1).saturating_mul(self.per_page);
        let page_items: Vec<T> = items
            .into_iter()
            .skip(usize::try_from(start).unwrap_or(usize::MAX))
            .take(usize::try_from(self.per_page).unwrap_or(usize::MAX))
            .collect();
        let pagination = Pagination {
            page: self.page,
            per_page: self.per_page,
            previous_page: (self.page > 1).then(|| (self.page - 1).min(last_page)),
            next_page: (self.page < last_page).then_some(self.page + 1),
            last_page: Some(last_page),
            total_entries: Some(total),
        };
        (page_items, pagination)
    }
}

/// RFC 8288 `Link` header value for a page (prev/next/last), relative to `base`.
pub(crate) fn link_header(base: &str, query: &Query, p: &Pagination) -> Option<String> {
    let rest = query.without_paging();
    let url = |page: u64| {
        let sep = if rest.is_empty() { "" } else { "&" };
        format!("<{base}?{rest}{sep}page={page}&per_page={}>", p.per_page)
    };
    let mut parts = Vec::new();
    if let Some(prev) = p.previous_page {
        parts.push(format!("{}; rel=\"prev\"", url(prev)));
    }
    if let Some(next) = p.next_page {
        parts.push(format!("{}; rel=\"next\"", url(next)));
    }
    if let Some(last) = p.last_page {
        parts.push(format!("{}; rel=\"last\"", url(last)));
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        let q = Query::parse(Some("page=3&per_page=50"));
        let req = PageRequest::from_query(&q).unwrap();
        let (items, p) = req.apply((0..120).collect::<Vec<_>>());
        assert_eq!(items, (100..120).collect::<Vec<_>>());
        assert_eq!(p.previous_page, Some(2));
        assert_eq!(p.next_page, None);
        assert_eq!(p.last_page, Some(3));
        assert_eq!(p.total_entries, Some(120));
    }

    #[test]
    fn sorts_by_keys_then_id() {
        // (id, name, created)
        let mut items = vec![(3, "b", 1), (1, "a", 2), (2, "b", 2), (4, "a", 1)];
        let key = |t: &(i64, &str, i64), f: &str| match f {
            "name" => SortKey::Text(t.1.to_string()),
            "created" => SortKey::Int(t.2),
            _ => SortKey::Int(t.0),
        };
        let keys = vec![("name".to_string(), true), ("created".to_string(), false)];
        sort_by_keys(&mut items, &keys, key, |t| t.0);
        let ids: Vec<i64> = items.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![3, 2, 4, 1]);
        sort_by_keys(&mut items, &[], key, |t| t.0);
        let ids: Vec<i64> = items.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2, 3, 4]);
        let keys = vec![("id".to_string(), true)];
        sort_by_keys(&mut items, &keys, key, |t| t.0);
        let ids: Vec<i64> = items.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![4, 3, 2, 1]);
    }

    #[test]
    fn empty_and_clamped() {
        let q = Query::parse(Some("per_page=500"));
        let req = PageRequest::from_query(&q).unwrap();
        assert_eq!(req.per_page, 50);
        let (items, p) = req.apply(Vec::<i32>::new());
        assert!(items.is_empty());
        assert_eq!(
            p,
            Pagination {
                page: 1,
                per_page: 50,
                previous_page: None,
                next_page: None,
                last_page: Some(1),
                total_entries: Some(0)
            }
        );
        assert!(PageRequest::from_query(&Query::parse(Some("page=0"))).is_err());
        assert!(PageRequest::from_query(&Query::parse(Some("per_page=x"))).is_err());
    }
}
