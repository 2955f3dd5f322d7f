//! Prometheus metrics of the control loop. Label values are bounded sets (outcomes, error
//! labels, statuses, pass kinds); never ids, names or anything secret.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The work queue's lanes, as labels.
pub const LANES: [&str; 2] = ["change", "bulk"];

/// Everything the controller exports under the `vps_controller_` prefix (the registry adds
/// it: names here and in collectors are without it).
pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Family<Labels, Counter>,
    reconcile_errors: Family<Labels, Counter>,
    reconcile_seconds: Histogram,
    queue_depth: Family<Labels, Gauge>,
    queue_adds: Family<Labels, Counter>,
    queue_wait_seconds: Family<Labels, Histogram>,
    work_seconds: Histogram,
    queue_retries: Counter,
    pass_seconds: Family<Labels, Histogram>,
    subscriptions: Family<Labels, Gauge>,
    stuck: Gauge,
    in_backoff: Gauge,
    leader: Gauge,
    resync_interval_seconds: Gauge,
    last_successful_resync: Gauge<f64, AtomicU64>,
    deletions_paused: Gauge,
    invalid_rows: Gauge,
    drift_repairs: Family<Labels, Counter>,
    orphans_deleted: Family<Labels, Counter>,
    ssh_bootstraps: Family<Labels, Counter>,
    ssh_sessions: Gauge,
    ssh_bootstraps_waiting: Gauge,
}

/// How a bootstrap attempt ended, as the `result` label of `ssh_bootstraps_total`.
pub const BOOTSTRAP_RESULTS: [&str; 3] = ["success", "failure", "host_key_mismatch"];

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_string(), value.to_string())]
}

/// Seconds since the Unix epoch, as Prometheus timestamps are.
pub fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map(|since| since.as_secs_f64())
        .unwrap_or(0.0)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vps_controller");
        let build = Info::new(vec![
            ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            (
                "revision".to_string(),
                option_env!("VPS_CONTROLLER_REVISION")
                    .unwrap_or("unknown")
                    .to_string(),
            ),
        ]);
        registry.register(
            "build",
            "The running version and its source revision",
            build,
        );
        let reconciles = Family::<Labels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles finished, by result (success, requeue, error)",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<Labels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by reason (the error's label)",
            reconcile_errors.clone(),
        );
        let reconcile_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one subscription's reconcile",
            reconcile_seconds.clone(),
        );
        let queue_depth = Family::<Labels, Gauge>::default();
        registry.register(
            "workqueue_depth",
            "Jobs waiting for a worker, by lane (change goes before bulk)",
            queue_depth.clone(),
        );
        let queue_adds = Family::<Labels, Counter>::default();
        registry.register("workqueue_adds", "Jobs queued, by lane", queue_adds.clone());
        let queue_wait_seconds = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 18))
        });
        registry.register(
            "workqueue_queue_duration_seconds",
            "Time a job waited in the queue before a worker took it, by the lane it was queued in",
            queue_wait_seconds.clone(),
        );
        let work_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        registry.register(
            "workqueue_work_duration_seconds",
            "Time a worker spent on one job (a reconcile or an orphan deletion)",
            work_seconds.clone(),
        );
        let queue_retries = Counter::default();
        registry.register(
            "workqueue_retries",
            "Jobs that ended in an error or asked to run again, and will be retried",
            queue_retries.clone(),
        );
        let pass_seconds = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 16))
        });
        registry.register(
            "pass_duration_seconds",
            "Duration of a change or resync pass, until its work is queued",
            pass_seconds.clone(),
        );
        let subscriptions = Family::<Labels, Gauge>::default();
        registry.register(
            "subscriptions",
            "Subscriptions by provisioning_status, counted again after rows changed",
            subscriptions.clone(),
        );
        let stuck = Gauge::default();
        registry.register(
            "subscriptions_stuck",
            "Subscriptions pending, provisioning or deprovisioning for more than 30 minutes (as of the last resync)",
            stuck.clone(),
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
        let last_successful_resync = Gauge::<f64, AtomicU64>::default();
        last_successful_resync.set(unix_seconds(SystemTime::now()));
        registry.register(
            "last_successful_resync_timestamp_seconds",
            "When a resync last listed Hetzner and scanned the table (the process start until the first)",
            last_successful_resync.clone(),
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
        let drift_repairs = Family::<Labels, Counter>::default();
        registry.register(
            "drift_repairs",
            "Resources changed back to what the subscription wants (rules, attachment, labels, a re-create after it vanished), by kind",
            drift_repairs.clone(),
        );
        let orphans_deleted = Family::<Labels, Counter>::default();
        registry.register(
            "orphans_deleted",
            "Resources with our labels that no subscription wanted, deleted, by kind",
            orphans_deleted.clone(),
        );
        let ssh_bootstraps = Family::<Labels, Counter>::default();
        registry.register(
            "ssh_bootstraps",
            "Bootstrap attempts over SSH (cloud-init wait and the plan's steps), by result; host_key_mismatch stops the subscription",
            ssh_bootstraps.clone(),
        );
        let ssh_sessions = Gauge::default();
        registry.register(
            "ssh_sessions",
            "SSH sessions open now (at most ssh.concurrency)",
            ssh_sessions.clone(),
        );
        let ssh_bootstraps_waiting = Gauge::default();
        registry.register(
            "ssh_bootstraps_waiting",
            "Bootstraps waiting for one of the ssh.concurrency sessions",
            ssh_bootstraps_waiting.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector::new()));
        let metrics = Metrics {
            registry: Mutex::new(registry),
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            queue_depth,
            queue_adds,
            queue_wait_seconds,
            work_seconds,
            queue_retries,
            pass_seconds,
            subscriptions,
            stuck,
            in_backoff,
            leader,
            resync_interval_seconds,
            last_successful_resync,
            deletions_paused,
            invalid_rows,
            drift_repairs,
            orphans_deleted,
            ssh_bootstraps,
            ssh_sessions,
            ssh_bootstraps_waiting,
        };
        // Every labelled family shows its bounded label set from the start, so dashboards
        // and alerts see zeros instead of missing series.
        for lane in LANES {
            metrics
                .queue_depth
                .get_or_create(&label("lane", lane))
                .set(0);
            let _ = metrics.queue_adds.get_or_create(&label("lane", lane));
        }
        for result in ["success", "requeue", "error"] {
            let _ = metrics.reconciles.get_or_create(&label("result", result));
        }
        for kind in ["server", "ssh_key", "firewall"] {
            let _ = metrics.drift_repairs.get_or_create(&label("kind", kind));
            let _ = metrics.orphans_deleted.get_or_create(&label("kind", kind));
        }
        for result in BOOTSTRAP_RESULTS {
            let _ = metrics
                .ssh_bootstraps
                .get_or_create(&label("result", result));
        }
        metrics.set_subscriptions(&BTreeMap::new());
        metrics
    }

    /// A bootstrap attempt ended with `result` (one of [`BOOTSTRAP_RESULTS`]).
    pub fn bootstrap_finished(&self, result: &str) {
        self.ssh_bootstraps
            .get_or_create(&label("result", result))
            .inc();
    }

    /// SSH sessions open now, and bootstraps waiting for one.
    pub fn set_ssh_sessions(&self, open: usize, waiting: usize) {
        self.ssh_sessions
            .set(i64::try_from(open).unwrap_or(i64::MAX));
        self.ssh_bootstraps_waiting
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    /// Adds metrics computed at scrape time (e.g. the Hetzner client's request counters).
    pub fn register_collector(&self, collector: Box<dyn prometheus_client::collector::Collector>) {
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .register_collector(collector);
    }

    /// One job ended: a reconcile (`reconcile` true) or an orphan deletion. `result` is
    /// `success`, `requeue` or `error`; `reason` the error's label.
    pub fn job_finished(
        &self,
        reconcile: bool,
        result: &str,
        reason: Option<&str>,
        took: Duration,
    ) {
        self.reconciles
            .get_or_create(&label("result", result))
            .inc();
        if let Some(reason) = reason {
            self.reconcile_errors
                .get_or_create(&label("reason", reason))
                .inc();
        }
        if result != "success" {
            self.queue_retries.inc();
        }
        if reconcile {
            self.reconcile_seconds.observe(took.as_secs_f64());
        }
        self.work_seconds.observe(took.as_secs_f64());
    }

    /// `count` jobs were queued in `lane`; `depth` is (change, bulk) after them.
    pub fn jobs_queued(&self, lane: &str, count: usize, depth: (usize, usize)) {
        self.queue_adds
            .get_or_create(&label("lane", lane))
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
        self.set_queue_depth(depth);
    }

    /// A worker took a job that waited `waited` in `lane`.
    pub fn job_started(&self, lane: &str, waited: Duration, depth: (usize, usize)) {
        self.queue_wait_seconds
            .get_or_create(&label("lane", lane))
            .observe(waited.as_secs_f64());
        self.set_queue_depth(depth);
    }

    pub fn set_queue_depth(&self, (change, bulk): (usize, usize)) {
        for (lane, depth) in LANES.iter().zip([change, bulk]) {
            self.queue_depth
                .get_or_create(&label("lane", lane))
                .set(i64::try_from(depth).unwrap_or(i64::MAX));
        }
    }

    pub fn drift_repaired(&self, kind: &str) {
        self.drift_repairs.get_or_create(&label("kind", kind)).inc();
    }

    pub fn orphan_deleted(&self, kind: &str) {
        self.orphans_deleted
            .get_or_create(&label("kind", kind))
            .inc();
    }

    pub fn pass_finished(&self, kind: &str, took: Duration) {
        self.pass_seconds
            .get_or_create(&label("pass", kind))
            .observe(took.as_secs_f64());
    }

    pub fn resync_succeeded(&self, at: SystemTime) {
        self.last_successful_resync.set(unix_seconds(at));
    }

    pub fn set_stuck(&self, count: usize) {
        self.stuck.set(i64::try_from(count).unwrap_or(i64::MAX));
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

/// Exports the Hetzner client's request counters, durations, budget and reachability at
/// scrape time.
#[derive(Clone)]
pub struct HcloudCollector(pub crate::hcloud::Client);

impl std::fmt::Debug for HcloudCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HcloudCollector")
    }
}

/// Encodes one unlabelled constant sample.
fn encode_const(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl prometheus_client::encoding::EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let sample = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(sample)
}

impl prometheus_client::collector::Collector for HcloudCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;

        let client = &self.0;
        let requests = Family::<Labels, Counter>::default();
        let mut rate_limited = 0;
        for count in client.request_counts() {
            if count.outcome == "rate_limited" {
                rate_limited += count.count;
            }
            let labels = vec![
                ("method".to_string(), count.method.to_string()),
                ("path".to_string(), count.path_template.to_string()),
                ("code".to_string(), count.outcome.clone()),
            ];
            requests.get_or_create(&labels).inc_by(count.count);
        }
        let metric = encoder.encode_descriptor(
            "hcloud_requests",
            "Hetzner API requests, by method, path template and code (HTTP status of a success, Hetzner's error code, or a transport error)",
            None,
            requests.metric_type(),
        )?;
        requests.encode(metric)?;

        let durations = client.request_durations();
        let metric = encoder.encode_descriptor(
            "hcloud_request_duration_seconds",
            "Duration of each Hetzner API request attempt, by method and path template",
            None,
            durations.metric_type(),
        )?;
        durations.encode(metric)?;

        encode_const(
            &mut encoder,
            "hcloud_rate_limited",
            "Hetzner API answers 429 (rate limit exceeded)",
            &ConstCounter::new(rate_limited),
        )?;
        encode_const(
            &mut encoder,
            "hcloud_retries",
            "Hetzner API requests retried",
            &ConstCounter::new(client.retry_count()),
        )?;
        let budget = client.budget();
        for (name, help, value) in [
            (
                "hcloud_budget_remaining",
                "Requests left in the API budget",
                i64::from(budget.remaining()),
            ),
            (
                "hcloud_budget_limit",
                "API budget, requests per hour",
                i64::from(budget.limit()),
            ),
            (
                "hcloud_paused",
                "1 while every request waits for the rate limit to reset after a 429",
                i64::from(budget.is_paused()),
            ),
        ] {
            encode_const(&mut encoder, name, help, &ConstGauge::new(value))?;
        }
        let reachability = client.reachability();
        encode_const(
            &mut encoder,
            "hcloud_last_success_timestamp_seconds",
            "When Hetzner last answered in a way that shows the API working for us (a 2xx, or a 4xx about the request such as not_found); 0 before the first",
            &ConstGauge::new(reachability.last_success.map_or(0.0, unix_seconds)),
        )?;
        Ok(())
    }
}

/// The process's own CPU, memory and file descriptors, read from /proc at scrape time (the
/// standard `process_*` metrics, under our prefix). Absent where there is no /proc.
#[derive(Debug)]
struct ProcessCollector {
    started: f64,
}

impl ProcessCollector {
    fn new() -> Self {
        ProcessCollector {
            started: unix_seconds(SystemTime::now()),
        }
    }
}

/// `/proc/self/stat` counts CPU time in clock ticks; Linux reports them at 100 Hz to user
/// space on every architecture we ship for (as Prometheus' procfs assumes).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

fn process_cpu_seconds() -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// User plus system CPU seconds from a `/proc/<pid>/stat` (or `/proc/<pid>/task/<tid>/stat`)
/// line; public for the bench and the profiling example, which read other processes and
/// threads.
pub fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state (field 3).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / CLOCK_TICKS_PER_SECOND)
}

fn process_resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: i64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn process_fds() -> Option<(i64, i64)> {
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count();
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let max = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((i64::try_from(open).unwrap_or(i64::MAX), max))
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;

        encode_const(
            &mut encoder,
            "process_start_time_seconds",
            "When the process started, seconds since the Unix epoch",
            &ConstGauge::new(self.started),
        )?;
        if let Some(cpu) = process_cpu_seconds() {
            encode_const(
                &mut encoder,
                "process_cpu_seconds",
                "CPU time used by the process, user and system",
                &ConstCounter::new(cpu),
            )?;
        }
        if let Some(rss) = process_resident_bytes() {
            encode_const(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory of the process",
                &ConstGauge::new(rss),
            )?;
        }
        if let Some((open, max)) = process_fds() {
            encode_const(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                &ConstGauge::new(open),
            )?;
            encode_const(
                &mut encoder,
                "process_max_fds",
                "Limit of open file descriptors",
                &ConstGauge::new(max),
            )?;
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
