//! Request accounting around the API: rate limit bucket, statistics, fault injection.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

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

/// Hetzner-style budget: capacity `limit`, refilled at `limit` per hour (API-NOTES §9).
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    capacity: f64,
    tokens: f64,
    last: Instant,
}

/// Values for the `RateLimit-*` headers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RateLimitHeaders {
    pub limit: u32,
    pub remaining: u32,
    pub reset: u64,
}

impl Bucket {
    pub(crate) fn new(limit: u32, now: Instant) -> Bucket {
        Bucket {
            capacity: f64::from(limit),
            tokens: f64::from(limit),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.capacity / 3600.0).min(self.capacity);
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

    pub(crate) fn headers(&self, unix_now: u64) -> RateLimitHeaders {
        let missing = (self.capacity - self.tokens).max(0.0);
        let seconds_to_full = (missing * 3600.0 / self.capacity).ceil() as u64;
        RateLimitHeaders {
            limit: self.capacity as u32,
            remaining: self.tokens.floor() as u32,
            reset: unix_now + seconds_to_full,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Stats {
    pub total: u64,
    pub by_endpoint: BTreeMap<String, u64>,
    pub rate_limited: u64,
    /// Requests that got an injected fault (not part of the documented shape; extra key).
    pub faults: u64,
    /// List requests by endpoint and `sort` parameters: `"GET /servers sort=id:asc"`, or
    /// `"GET /servers unsorted"` without `sort` (extra key).
    pub list_sorts: BTreeMap<String, u64>,
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

    /// Counts a list request (`key` is `"GET <template>"`) by its `sort` values, in order.
    pub(crate) fn count_sort(&mut self, key: &str, sorts: &[&str]) {
        let key = if sorts.is_empty() {
            format!("{key} unsorted")
        } else {
            format!("{key} sort={}", sorts.join(","))
        };
        bump(&mut self.list_sorts, key);
    }
}

/// The kinds of injected trouble.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// 500 `server_error`.
    ServerError,
    /// 503 `unavailable`.
    Unavailable,
    /// 429 `rate_limit_exceeded` although the bucket is not empty.
    RateLimited,
    /// 502 with an HTML body, like a proxy in front of the API.
    BadGatewayHtml,
    /// Served normally but answered only after `fault_delay`.
    Delay,
    /// Served normally, but the created actions end in `error`.
    ActionError,
}

impl Fault {
    const GENERAL: [Fault; 5] = [
        Fault::ServerError,
        Fault::Unavailable,
        Fault::RateLimited,
        Fault::BadGatewayHtml,
        Fault::Delay,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::ServerError => "server_error",
            Fault::Unavailable => "unavailable",
            Fault::RateLimited => "rate_limited",
            Fault::BadGatewayHtml => "bad_gateway_html",
            Fault::Delay => "delay",
            Fault::ActionError => "action_error",
        }
    }
}

/// Decides faults from a seeded generator: one draw per request that reaches this point, a
/// second one for the kind, so a fixed seed and request sequence give the same faults.
#[derive(Clone, Debug)]
pub(crate) struct FaultPlan {
    pub rate: f64,
    rng: SplitMix64,
}

impl FaultPlan {
    pub(crate) fn new(rate: f64, seed: u64) -> FaultPlan {
        FaultPlan {
            rate,
            rng: SplitMix64::new(seed),
        }
    }

    pub(crate) fn draw(&mut self, creates_actions: bool) -> Option<Fault> {
        if self.rng.next_f64() >= self.rate {
            return None;
        }
        let kinds = if creates_actions { 6 } else { 5 };
        let pick = (self.rng.next_u64() % kinds) as usize;
        Some(
            Fault::GENERAL
                .get(pick)
                .copied()
                .unwrap_or(Fault::ActionError),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_one_per_second_at_3600() {
        let start = Instant::now();
        let mut b = Bucket::new(3600, start);
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
            (0..64).map(|i| plan.draw(i % 2 == 0)).collect::<Vec<_>>()
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
        assert!((0..1000).all(|_| never.draw(true).is_none()));
        let mut always = FaultPlan::new(1.0, 1);
        let kinds: Vec<Fault> = (0..1000).filter_map(|_| always.draw(true)).collect();
        assert_eq!(kinds.len(), 1000);
        assert!(kinds.contains(&Fault::ActionError));
        let mut general = FaultPlan::new(1.0, 1);
        assert!((0..1000).all(|_| general.draw(false) != Some(Fault::ActionError)));
    }
}
