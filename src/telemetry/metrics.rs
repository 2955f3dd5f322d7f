//! Prometheus metrics of the control loop. Label values are bounded sets (outcomes, error
//! labels, statuses, pass kinds); never ids, names or anything secret.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Family<Labels, Counter>,
    reconcile_errors: Family<Labels, Counter>,
    reconcile_seconds: Histogram,
    pass_seconds: Family<Labels, Histogram>,
    subscriptions: Family<Labels, Gauge>,
    in_backoff: Gauge,
    leader: Gauge,
    resync_interval_seconds: Gauge,
    deletions_paused: Gauge,
    invalid_rows: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_string(), value.to_string())]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vps_controller");
        let reconciles = Family::<Labels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles finished, by outcome (settled, requeue, error)",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<Labels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by error label",
            reconcile_errors.clone(),
        );
        let reconcile_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one subscription's reconcile",
            reconcile_seconds.clone(),
        );
        let pass_seconds = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 16))
        });
        registry.register(
            "pass_duration_seconds",
            "Duration of a change or resync pass",
            pass_seconds.clone(),
        );
        let subscriptions = Family::<Labels, Gauge>::default();
        registry.register(
            "subscriptions",
            "Subscriptions by provisioning_status, as of the last resync",
            subscriptions.clone(),
        );
        let in_backoff = Gauge::default();
        registry.register(
            "subscriptions_in_backoff",
            "Subscriptions waiting to retry after a failure",
            in_backoff.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the lease and reconciles",
            leader.clone(),
        );
        let resync_interval_seconds = Gauge::default();
        registry.register(
            "resync_interval_seconds",
            "Current resync interval (stretched to fit the API budget)",
            resync_interval_seconds.clone(),
        );
        let deletions_paused = Gauge::default();
        registry.register(
            "deletions_paused",
            "1 while server deletions are paused by the deletion guard (approve with `vps-controller deletions approve`)",
            deletions_paused.clone(),
        );
        let invalid_rows = Gauge::default();
        registry.register(
            "invalid_rows",
            "Subscription rows that cannot be read (NULL id, wrong column types), skipped by the last resync",
            invalid_rows.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            pass_seconds,
            subscriptions,
            in_backoff,
            leader,
            resync_interval_seconds,
            deletions_paused,
            invalid_rows,
        }
    }

    /// Adds metrics computed at scrape time (e.g. the Hetzner client's request counters).
    pub fn register_collector(&self, collector: Box<dyn prometheus_client::collector::Collector>) {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .register_collector(collector);
    }

    pub fn reconcile_finished(&self, outcome: &str, error: Option<&str>, took: Duration) {
        self.reconciles
            .get_or_create(&label("outcome", outcome))
            .inc();
        if let Some(error) = error {
            self.reconcile_errors
                .get_or_create(&label("error", error))
                .inc();
        }
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    pub fn pass_finished(&self, kind: &str, took: Duration) {
        self.pass_seconds
            .get_or_create(&label("pass", kind))
            .observe(took.as_secs_f64());
    }

    pub fn set_subscriptions(&self, by_status: &BTreeMap<String, i64>) {
        // Label values stay a fixed set whatever the column holds.
        const KNOWN: [&str; 8] = [
            "pending",
            "provisioning",
            "ready",
            "suspended",
            "held",
            "failed",
            "deprovisioning",
            "deprovisioned",
        ];
        let mut counts: BTreeMap<&str, i64> = KNOWN.iter().map(|s| (*s, 0)).collect();
        for (status, count) in by_status {
            let status = KNOWN
                .iter()
                .find(|known| **known == status.as_str())
                .copied()
                .unwrap_or("other");
            *counts.entry(status).or_default() += count;
        }
        for (status, count) in counts {
            self.subscriptions
                .get_or_create(&label("provisioning_status", status))
                .set(count);
        }
    }

    pub fn set_backoff(&self, count: usize) {
        self.in_backoff
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn set_deletions_paused(&self, paused: bool) {
        self.deletions_paused.set(i64::from(paused));
    }

    pub fn set_invalid_rows(&self, count: usize) {
        self.invalid_rows
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn set_resync_interval(&self, interval: Duration) {
        self.resync_interval_seconds
            .set(i64::try_from(interval.as_secs()).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// Exports the Hetzner client's request counters and budget at scrape time.
#[derive(Clone)]
pub struct HcloudCollector(pub crate::hcloud::Client);

impl std::fmt::Debug for HcloudCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HcloudCollector")
    }
}

impl prometheus_client::collector::Collector for HcloudCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;

        let requests = Family::<Labels, Counter>::default();
        for count in self.0.request_counts() {
            let labels = vec![
                ("method".to_string(), count.method.to_string()),
                ("path".to_string(), count.path_template.to_string()),
                ("outcome".to_string(), count.outcome.clone()),
            ];
            requests.get_or_create(&labels).inc_by(count.count);
        }
        let metric = encoder.encode_descriptor(
            "vps_controller_hcloud_requests",
            "Hetzner API requests, by method, path template and outcome (HTTP status or error label)",
            None,
            requests.metric_type(),
        )?;
        requests.encode(metric)?;

        let retries = ConstCounter::new(self.0.retry_count());
        let metric = encoder.encode_descriptor(
            "vps_controller_hcloud_retries",
            "Hetzner API requests retried",
            None,
            retries.metric_type(),
        )?;
        retries.encode(metric)?;

        let budget = self.0.budget();
        for (name, help, value) in [
            (
                "vps_controller_hcloud_budget_remaining",
                "Requests left in the API budget",
                i64::from(budget.remaining()),
            ),
            (
                "vps_controller_hcloud_budget_limit",
                "API budget, requests per hour",
                i64::from(budget.limit()),
            ),
            (
                "vps_controller_hcloud_paused",
                "1 while every request waits for the rate limit to reset after a 429",
                i64::from(budget.is_paused()),
            ),
        ] {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_a_fixed_set() {
        let metrics = Metrics::new();
        let by_status = [("ready".to_string(), 2), ("weird <script>".to_string(), 1)].into();
        metrics.set_subscriptions(&by_status);
        let text = metrics.render();
        assert!(
            text.contains("vps_controller_subscriptions{provisioning_status=\"ready\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("vps_controller_subscriptions{provisioning_status=\"other\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vps_controller_subscriptions{provisioning_status=\"pending\"} 0"),
            "{text}"
        );
        assert!(!text.contains("weird"), "{text}");
    }
}
