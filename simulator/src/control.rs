//! Request accounting around the API (rate limit bucket, statistics, fault injection) and the
//! reference for the test hooks under `/__simulator` (no auth, not rate limited, not counted,
//! never faulted, and they keep answering while the black hole is on).
//!
//! # `GET /__simulator/stats`
//!
//! `{"total", "by_endpoint": {"GET /servers/{id}": n, …}, "rate_limited", "faults": {KIND: n,
//! …}, "list_sorts": {"GET /servers sort=id:asc": n, "GET /images unsorted": n, …},
//! "labelled_lists": {"GET /servers": n, …}, "actions": {"stored", "running"}, "rate_limit":
//! {"limit", "remaining", "reset", "time_scale"}}`.
//! Endpoints are keyed `"METHOD /template"` (unroutable paths as `"METHOD <unmatched>"`);
//! `faults` counts injected faults by kind, `"black_hole"` included; `labelled_lists` counts
//! list requests with a `label_selector`. `rate_limit` is the bucket now (what the next
//! answer's `RateLimit-*` headers would say before taking its token, and the
//! `budget_time_scale`); reading it takes nothing from the bucket.
//! `POST /__simulator/reset` zeroes the counters (resources and faults stay).
//!
//! # `POST /__simulator/faults`
//!
//! ```json
//! {"rate": 0.1,
//!  "faults": [{"kind": "http_502_html", "endpoints": ["POST /servers"], "count": 2},
//!             {"kind": "action_error", "endpoints": ["POST /servers/{id}/actions/poweron"]}],
//!  "black_hole": false}
//! ```
//!
//! Every key is optional, at least one is required, unknown keys are refused (422
//! `invalid_input`, as is an unknown kind or endpoint, `count: 0` or `endpoints: []`). A key left
//! out keeps its current value; `faults` **replaces** the armed list (`[]` clears it).
//! - `rate`: share in [0, 1] of `/v1` requests that get a fault drawn from a generator seeded
//!   with `SimulatorConfig::seed` (kinds `http_500`, `http_503`, `http_429`, `http_502_html`,
//!   `timeout`, and `action_error` for requests that start actions).
//! - `faults[].kind`: see below. `endpoints`: stats keys (`"METHOD /template"`, templates
//!   without `/v1`); absent = every `/v1` endpoint. `count`: how many requests it hits; absent =
//!   until cleared.
//! - `black_hole: true`: every `/v1` request is accepted, counted, and never answered (the
//!   client times out; nothing changes). Only shutdown ends a swallowed request; switching the
//!   black hole off affects new requests.
//!
//! The answer (and `GET /__simulator/faults`) is the armed state:
//! `{"rate": F, "black_hole": B, "faults": [{"kind", "endpoints": [..]|null, "count": N|null,
//! "hits": H, "remaining": R|null}]}`. Exhausted faults stay listed with `remaining: 0` until
//! the list is replaced or cleared. `DELETE /__simulator/faults` clears everything (targeted
//! faults, black hole, `rate` back to 0) and answers the same shape.
//!
//! # Order and kinds
//!
//! Pipeline per `/v1` request: count → black hole → rate limit (real 429) → auth (401) →
//! route (404/405) → fault → handler. At the fault step the first armed targeted fault that
//! matches the endpoint, has hits left and applies to it is used (its hit counted); otherwise the
//! seeded share draws (so armed faults do not consume the generator). Faulted answers carry
//! `x-simulator-fault: KIND` (the real API has no such header).
//!
//! | kind | answer | does the change happen? |
//! |---|---|---|
//! | `http_500` | 500 `server_error` | no |
//! | `http_502_html` | 502, `text/html` nginx page (like a proxy; official clients retry it) | no |
//! | `http_503` | 503 `unavailable` | no |
//! | `http_429` | 429 `rate_limit_exceeded`; aimed ones carry `RateLimit-Remaining: 0` and `RateLimit-Reset` = now + the time to refill (an empty bucket); drawn ones keep the bucket's real headers | no |
//! | `timeout` | the normal answer, held back for `SimulatorConfig::fault_delay` (30 s by default) | **yes**, before the wait |
//! | `truncated_json` | the normal status and headers, body cut to half its length (a 204 stays empty) | **yes** |
//! | `action_error` | the normal answer; the actions it starts end in `error` with `{"code": "action_failed", "message": "simulated failure of COMMAND"}`. A failed create leaves the server `off`, a failed DELETE keeps it | the request yes, its actions fail |
//! | `server_stuck_starting` | the normal answer; the `create_server`/`start_server` actions keep running (server `locked`, `initializing` after a create, `starting` after a poweron) until the faults are cleared by DELETE or a POST with `faults`, then finish at once | yes, but never finishes until cleared |
//!
//! `action_error` only applies to (and is only used up by) requests that start actions;
//! `server_stuck_starting` only to `POST /servers` and `POST /servers/{id}/actions/poweron`.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ApiError, FieldError};
use crate::routes::{Endpoint, ServerVerb};

/// SplitMix64: tiny, seedable and stable across crate versions, so a seed reproduces the same
/// fault sequence forever.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Hetzner-style budget: capacity `limit`, refilled at `limit` per hour (API-NOTES §9), or
/// `time_scale` times faster (`SimulatorConfig::budget_time_scale`): one hour of budget then
/// passes in `1/time_scale` of a real hour.
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    capacity: f64,
    tokens: f64,
    /// How many times faster than Hetzner's it refills.
    time_scale: f64,
    last: Instant,
}

/// Values for the `RateLimit-*` headers.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct RateLimitHeaders {
    pub limit: u32,
    pub remaining: u32,
    pub reset: u64,
}

impl Bucket {
    pub(crate) fn new(limit: u32, time_scale: f64, now: Instant) -> Bucket {
        let capacity = f64::from(limit);
        Bucket {
            capacity,
            tokens: capacity,
            time_scale,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        let refill_per_second = self.capacity / 3600.0 * self.time_scale;
        self.tokens = (self.tokens + elapsed * refill_per_second).min(self.capacity);
        self.last = now;
    }

    /// Takes one request's worth; false when the bucket is empty.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Real seconds until `missing` tokens are back, rounded up (`RateLimit-Reset` is whole
    /// UNIX seconds).
    fn seconds_to_refill(&self, missing: f64) -> u64 {
        (missing.max(0.0) * 3600.0 / (self.capacity * self.time_scale)).ceil() as u64
    }

    /// The headers as of the last refill: Reset = now + the time until the bucket is full, in
    /// the same (scaled) time the bucket refills in.
    pub(crate) fn headers(&self, unix_now: u64) -> RateLimitHeaders {
        RateLimitHeaders {
            limit: self.capacity as u32,
            remaining: self.tokens.floor() as u32,
            reset: unix_now + self.seconds_to_refill(self.capacity - self.tokens),
        }
    }

    /// The headers of an empty bucket (an aimed `http_429` fault): Reset is a full refill away.
    pub(crate) fn empty_headers(&self, unix_now: u64) -> RateLimitHeaders {
        RateLimitHeaders {
            limit: self.capacity as u32,
            remaining: 0,
            reset: unix_now + self.seconds_to_refill(self.capacity),
        }
    }

    /// The headers now, refilled up to `now` (for the stats hook; takes nothing).
    pub(crate) fn peek(&mut self, now: Instant, unix_now: u64) -> RateLimitHeaders {
        self.refill(now);
        self.headers(unix_now)
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Stats {
    pub total: u64,
    pub by_endpoint: BTreeMap<String, u64>,
    pub rate_limited: u64,
    /// Injected faults by kind (`"http_502_html": 3`, `"black_hole": 1`; extra key).
    pub faults: BTreeMap<&'static str, u64>,
    /// List requests by endpoint and `sort` parameters: `"GET /servers sort=id:asc"`, or
    /// `"GET /servers unsorted"` without `sort` (extra key).
    pub list_sorts: BTreeMap<String, u64>,
    /// List requests that carry a `label_selector`, by endpoint: `"GET /servers": n` (extra
    /// key; for telling a client's listings from its lookups by name).
    pub labelled_lists: BTreeMap<String, u64>,
}

/// Distinct keys each statistics map takes; further keys (odd methods, endless `sort`
/// combinations from clients) are counted under [`OTHER_KEY`], so the maps stay bounded.
pub(crate) const MAX_STAT_KEYS: usize = 512;
pub(crate) const OTHER_KEY: &str = "<other>";

fn bump(map: &mut BTreeMap<String, u64>, key: String) {
    let key = if map.len() >= MAX_STAT_KEYS && !map.contains_key(&key) {
        OTHER_KEY.to_string()
    } else {
        key
    };
    *map.entry(key).or_insert(0) += 1;
}

impl Stats {
    pub(crate) fn count(&mut self, key: String) {
        self.total += 1;
        bump(&mut self.by_endpoint, key);
    }

    pub(crate) fn count_fault(&mut self, kind: &'static str) {
        *self.faults.entry(kind).or_insert(0) += 1;
    }

    /// Takes back a count: the fault did not apply after all.
    pub(crate) fn uncount_fault(&mut self, kind: &'static str) {
        if let Some(count) = self.faults.get_mut(kind) {
            *count = count.saturating_sub(1);
        }
    }

    /// Counts a list request (`key` is `"GET <template>"`) by its `sort` values, in order.
    pub(crate) fn count_sort(&mut self, key: &str, sorts: &[&str]) {
        let key = if sorts.is_empty() {
            format!("{key} unsorted")
        } else {
            format!("{key} sort={}", sorts.join(","))
        };
        bump(&mut self.list_sorts, key);
    }

    /// Counts a list request (`key` is `"GET <template>"`) that carries a `label_selector`.
    pub(crate) fn count_labelled_list(&mut self, key: &str) {
        bump(&mut self.labelled_lists, key.to_string());
    }
}

/// The kinds of injected trouble (their names are the `kind` values of the faults hook, the
/// `x-simulator-fault` header and the keys of `stats.faults`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// 500 `server_error`; nothing happens.
    Http500,
    /// 502 with an HTML body, like a proxy in front of the API; nothing happens.
    Http502Html,
    /// 503 `unavailable`; nothing happens.
    Http503,
    /// 429 `rate_limit_exceeded` although the bucket is not empty; nothing happens.
    Http429,
    /// Served normally (the change happens), answered only after `fault_delay`.
    Timeout,
    /// Served normally (the change happens), but the body is cut in half.
    TruncatedJson,
    /// Served normally, but the created actions end in `error`.
    ActionError,
    /// Served normally, but the server's create/start actions keep running until the fault is
    /// cleared: the server stays `initializing` (created) or `starting` (powered on).
    ServerStuckStarting,
}

impl Fault {
    /// What the seeded share draws from, in this order (a seed's sequence is stable).
    const RANDOM: [Fault; 5] = [
        Fault::Http500,
        Fault::Http503,
        Fault::Http429,
        Fault::Http502Html,
        Fault::Timeout,
    ];

    const ALL: [Fault; 8] = [
        Fault::Http500,
        Fault::Http502Html,
        Fault::Http503,
        Fault::Http429,
        Fault::Timeout,
        Fault::TruncatedJson,
        Fault::ActionError,
        Fault::ServerStuckStarting,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::Http500 => "http_500",
            Fault::Http502Html => "http_502_html",
            Fault::Http503 => "http_503",
            Fault::Http429 => "http_429",
            Fault::Timeout => "timeout",
            Fault::TruncatedJson => "truncated_json",
            Fault::ActionError => "action_error",
            Fault::ServerStuckStarting => "server_stuck_starting",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether this kind can do anything to a request for `endpoint`; a fault is only used up
    /// by requests it applies to.
    pub(crate) fn applies_to(self, endpoint: Endpoint) -> bool {
        match self {
            Fault::ActionError => endpoint.creates_actions(),
            Fault::ServerStuckStarting => matches!(
                endpoint,
                Endpoint::CreateServer | Endpoint::ServerAction(_, ServerVerb::PowerOn)
            ),
            _ => true,
        }
    }
}

/// One armed, targeted fault.
#[derive(Clone, Debug)]
pub(crate) struct TargetedFault {
    pub kind: Fault,
    /// `"METHOD /template"` keys; `None` = every `/v1` endpoint.
    pub endpoints: Option<Vec<String>>,
    /// How many requests it hits; `None` = until cleared.
    pub count: Option<u64>,
    pub hits: u64,
}

impl TargetedFault {
    fn remaining(&self) -> Option<u64> {
        self.count.map(|c| c.saturating_sub(self.hits))
    }

    fn matches(&self, key: &str, endpoint: Endpoint) -> bool {
        self.remaining() != Some(0) && self.matches_ignoring_count(key, endpoint)
    }

    fn matches_ignoring_count(&self, key: &str, endpoint: Endpoint) -> bool {
        self.kind.applies_to(endpoint)
            && self
                .endpoints
                .as_ref()
                .is_none_or(|list| list.iter().any(|e| e == key))
    }
}

/// Decides faults. Targeted faults are tried first, in the order they were armed; when none
/// matches, the seeded share draws: one draw per request that reaches it, a second one for the
/// kind, so a fixed seed and request sequence give the same faults.
#[derive(Clone, Debug)]
pub(crate) struct FaultPlan {
    pub rate: f64,
    pub targeted: Vec<TargetedFault>,
    /// `/v1` requests are accepted and never answered.
    pub black_hole: bool,
    rng: SplitMix64,
}

impl FaultPlan {
    pub(crate) fn new(rate: f64, seed: u64) -> FaultPlan {
        FaultPlan {
            rate,
            targeted: Vec::new(),
            black_hole: false,
            rng: SplitMix64::new(seed),
        }
    }

    /// The fault for a request to `endpoint` (stats key `key`), if any, and whether it was a
    /// targeted one (else drawn by the seeded share).
    pub(crate) fn draw(&mut self, key: &str, endpoint: Endpoint) -> Option<(Fault, bool)> {
        if let Some(armed) = self.targeted.iter_mut().find(|t| t.matches(key, endpoint)) {
            armed.hits += 1;
            return Some((armed.kind, true));
        }
        self.draw_random(endpoint.creates_actions())
            .map(|fault| (fault, false))
    }

    /// Gives back the hit of the aimed fault `draw` chose for this request: it did not apply
    /// (an action fault on a request that was refused before starting any action).
    pub(crate) fn refund(&mut self, key: &str, endpoint: Endpoint, kind: Fault) {
        if let Some(armed) = self
            .targeted
            .iter_mut()
            .find(|t| t.kind == kind && t.hits > 0 && t.matches_ignoring_count(key, endpoint))
        {
            armed.hits -= 1;
        }
    }

    fn draw_random(&mut self, creates_actions: bool) -> Option<Fault> {
        if self.rng.next_f64() >= self.rate {
            return None;
        }
        let kinds = if creates_actions { 6 } else { 5 };
        let pick = (self.rng.next_u64() % kinds) as usize;
        Some(
            Fault::RANDOM
                .get(pick)
                .copied()
                .unwrap_or(Fault::ActionError),
        )
    }

    /// What `GET /__simulator/faults` shows.
    pub(crate) fn describe(&self) -> Value {
        let faults: Vec<Value> = self
            .targeted
            .iter()
            .map(|t| {
                json!({
                    "kind": t.kind.name(),
                    "endpoints": t.endpoints,
                    "count": t.count,
                    "hits": t.hits,
                    "remaining": t.remaining(),
                })
            })
            .collect();
        json!({"rate": self.rate, "black_hole": self.black_hole, "faults": faults})
    }
}

/// The body of `POST /__simulator/faults`; every key is optional, at least one is required.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultsRequest {
    pub rate: Option<f64>,
    pub faults: Option<Vec<FaultSpec>>,
    pub black_hole: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FaultSpec {
    pub kind: String,
    pub endpoints: Option<Vec<String>>,
    pub count: Option<u64>,
}

impl FaultsRequest {
    /// Parses and checks a request body; `known` tells whether `"METHOD /template"` is an
    /// endpoint. Returns the new targeted list (when `faults` was given).
    pub(crate) fn parse(
        body: &[u8],
        known: impl Fn(&str) -> bool,
    ) -> Result<(FaultsRequest, Option<Vec<TargetedFault>>), ApiError> {
        let request: FaultsRequest = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid_field(
                "body",
                format!(
                    "{e}; expected {{\"rate\": F, \"faults\": [{{\"kind\", \"endpoints\", \
                     \"count\"}}], \"black_hole\": bool}} (each optional, at least one)"
                ),
            )
        })?;
        if request.rate.is_none() && request.faults.is_none() && request.black_hole.is_none() {
            return Err(ApiError::invalid_field(
                "body",
                "give at least one of rate, faults, black_hole",
            ));
        }
        if let Some(rate) = request.rate
            && !(0.0..=1.0).contains(&rate)
        {
            return Err(ApiError::invalid_field("rate", "must be between 0 and 1"));
        }
        let mut errors = Vec::new();
        let mut targeted = Vec::new();
        for (i, spec) in request.faults.iter().flatten().enumerate() {
            let kind = Fault::parse(&spec.kind);
            if kind.is_none() {
                let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                errors.push(FieldError::new(
                    format!("faults[{i}].kind"),
                    format!("'{}' is not one of {}", spec.kind, names.join(", ")),
                ));
            }
            if spec.count == Some(0) {
                errors.push(FieldError::new(
                    format!("faults[{i}].count"),
                    "must be at least 1 (leave it out for \"until cleared\")",
                ));
            }
            if let Some(endpoints) = &spec.endpoints {
                if endpoints.is_empty() {
                    errors.push(FieldError::new(
                        format!("faults[{i}].endpoints"),
                        "must not be empty (leave it out for every endpoint)",
                    ));
                }
                for e in endpoints.iter().filter(|e| !known(e)) {
                    errors.push(FieldError::new(
                        format!("faults[{i}].endpoints"),
                        format!("'{e}' is not an endpoint (\"METHOD /template\", as in stats)"),
                    ));
                }
            }
            if let Some(kind) = kind {
                targeted.push(TargetedFault {
                    kind,
                    endpoints: spec.endpoints.clone(),
                    count: spec.count,
                    hits: 0,
                });
            }
        }
        if !errors.is_empty() {
            return Err(ApiError::invalid_input(errors));
        }
        let targeted = request.faults.is_some().then_some(targeted);
        Ok((request, targeted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_one_per_second_at_3600() {
        let start = Instant::now();
        let mut b = Bucket::new(3600, 1.0, start);
        for _ in 0..3600 {
            assert!(b.try_take(start));
        }
        assert!(!b.try_take(start));
        let h = b.headers(1000);
        assert_eq!((h.limit, h.remaining, h.reset), (3600, 0, 1000 + 3600));
        assert!(b.try_take(start + Duration::from_millis(1001)));
        assert!(!b.try_take(start + Duration::from_millis(1002)));
    }

    #[test]
    fn a_scaled_bucket_refills_faster_and_resets_in_scaled_time() {
        let start = Instant::now();
        // 10 per hour, 720 times faster: 2 tokens per real second, full in 5 s.
        let mut b = Bucket::new(10, 720.0, start);
        for _ in 0..10 {
            assert!(b.try_take(start));
        }
        assert!(!b.try_take(start));
        let h = b.headers(1000);
        assert_eq!((h.limit, h.remaining, h.reset), (10, 0, 1000 + 5));
        let e = b.empty_headers(1000);
        assert_eq!((e.limit, e.remaining, e.reset), (10, 0, 1000 + 5));
        assert!(!b.try_take(start + Duration::from_millis(490)));
        assert!(b.try_take(start + Duration::from_millis(510)));
        // Long idle: capacity stays the limit.
        let later = b.peek(start + Duration::from_secs(3600), 2000);
        assert_eq!((later.limit, later.remaining, later.reset), (10, 10, 2000));
    }

    #[test]
    fn stats_maps_stay_bounded() {
        let mut stats = Stats::default();
        for i in 0..MAX_STAT_KEYS * 3 {
            stats.count(format!("M{i} <unmatched>"));
            stats.count_sort("GET /servers", &[&format!("x{i}")]);
        }
        assert_eq!(stats.total, (MAX_STAT_KEYS * 3) as u64);
        assert_eq!(stats.by_endpoint.len(), MAX_STAT_KEYS + 1);
        assert_eq!(stats.list_sorts.len(), MAX_STAT_KEYS + 1);
        assert_eq!(stats.by_endpoint[OTHER_KEY], (MAX_STAT_KEYS * 2) as u64);
        // Keys already present keep counting.
        stats.count("M0 <unmatched>".to_string());
        assert_eq!(stats.by_endpoint["M0 <unmatched>"], 2);
    }

    #[test]
    fn faults_are_reproducible() {
        let seq = |seed| {
            let mut plan = FaultPlan::new(0.5, seed);
            (0..64)
                .map(|i| plan.draw_random(i % 2 == 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(seq(7), seq(7));
        assert_ne!(seq(7), seq(8));
        let all = seq(7);
        assert!(all.iter().any(Option::is_none));
        assert!(all.iter().any(Option::is_some));
    }

    #[test]
    fn rate_zero_and_one() {
        let mut never = FaultPlan::new(0.0, 1);
        assert!((0..1000).all(|_| never.draw_random(true).is_none()));
        let mut always = FaultPlan::new(1.0, 1);
        let kinds: Vec<Fault> = (0..1000).filter_map(|_| always.draw_random(true)).collect();
        assert_eq!(kinds.len(), 1000);
        assert!(kinds.contains(&Fault::ActionError));
        let mut general = FaultPlan::new(1.0, 1);
        assert!((0..1000).all(|_| general.draw_random(false) != Some(Fault::ActionError)));
    }
}
