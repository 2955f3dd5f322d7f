//! The controller's YAML configuration: plans and tuning knobs, with errors that name the field.
//!
//! Every top-level field is optional; an omitted one takes the built-in value
//! ([`Config::builtin`], also shipped as `config.example.yaml`). A file's `plans` map
//! **replaces** the built-in plans as a whole (merging plan by plan would leave plans in force
//! that the file does not mention). Unknown fields anywhere are errors, so a typo is not
//! silently ignored.
//!
//! Inside a plan, `server_type`, `image`, `location` and `firewall_rules` are required (an empty
//! `firewall_rules: []` is allowed and means Hetzner drops all inbound traffic); `cloud_init`
//! may be omitted. After validation, IPv6 CIDRs are rewritten to the canonical RFC 5952 form the
//! Hetzner API answers with, so desired and observed rules compare equal.
//!
//! Environment overrides (e.g. `VPS_CONTROLLER_RESYNC_SECONDS`) are applied by the caller.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cloud_init::{CloudInitTemplate, is_octal_mode, is_rfc1123_label};
use crate::keys::KeyAlgorithm;

/// Stripe subscription statuses. The lifecycle lists may name others too (a status the
/// controller does not know is held, never acted on), but these are the ones Stripe sends.
pub const STRIPE_STATUSES: [&str; 8] = [
    "incomplete",
    "incomplete_expired",
    "trialing",
    "active",
    "past_due",
    "canceled",
    "unpaid",
    "paused",
];

/// Longest `name_prefix`: leaves 42 of a name's 63 characters for the subscription id.
pub const MAX_NAME_PREFIX_LEN: usize = 20;
/// Hetzner's limits on firewall rules.
pub const MAX_FIREWALL_RULES: usize = 50;
pub const MAX_IPS_PER_RULE: usize = 100;
pub const MAX_RULE_DESCRIPTION_CHARS: usize = 255;
/// Upper bounds that keep durations far from overflow and catch unit mistakes (ms vs s).
pub const MAX_RESYNC_SECONDS: u64 = 24 * 60 * 60;
pub const MAX_SHUTDOWN_TIMEOUT_SECONDS: u64 = 60 * 60;
pub const MAX_CONCURRENCY: usize = 64;
pub const MAX_GRACE_PERIOD_HOURS: u64 = 24 * 365;
pub const MAX_DELETION_DELAY_HOURS: u64 = 24 * 365;
pub const MAX_SNAPSHOT_RETENTION_DAYS: u64 = 3650;

/// The whole configuration. See the module docs for defaults and merging.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Names this controller in the `vps-controller/instance` label of everything it owns; two
    /// controllers sharing a Hetzner project need different values. A Hetzner label value.
    pub instance: String,
    /// Resource names are `<prefix>-<sanitized subscription id>` (see `reconcile::desired::resource_name`).
    pub name_prefix: String,
    /// What each subscription status means for its server (run, grace, suspend, delete);
    /// any status not listed is held: nothing is created or deleted.
    pub lifecycle: Lifecycle,
    /// How many servers may be deleted per hour before deletions pause for approval.
    pub deletion_budget: DeletionBudget,
    /// Replaced by `lifecycle.run`; kept only to explain that in the error.
    #[serde(default, skip_serializing)]
    pub active_statuses: Option<Vec<String>>,
    /// Seconds between full resync passes.
    pub resync_seconds: u64,
    /// Subscriptions reconciled at the same time.
    pub concurrency: usize,
    /// Key type generated for new subscriptions.
    pub ssh_key_algorithm: KeyAlgorithm,
    /// When a plan's `server_type` changes: `false` reports the difference. `true` (resize the
    /// server, powering it off for a while) is not built yet and is rejected by `validate`.
    pub change_server_type: bool,
    /// Seconds to wait for a graceful shutdown before deleting a server; 0 deletes at once.
    pub shutdown_timeout_seconds: u64,
    /// Plans by name, as found in the `plan` column of `subscriptions`.
    #[serde(deserialize_with = "deserialize_plans")]
    pub plans: BTreeMap<String, Plan>,
    /// The post-boot SSH check and bootstrap that `ready` waits for (see `crate::ssh`).
    pub ssh: SshSettings,
}

/// How the controller logs in to a new server before calling it `ready`: as `user`, with the
/// subscription's own key, checking the host key it put there (see `crate::ssh`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshSettings {
    /// `false`: `ready` means Hetzner reports the server `running` (no SSH at all).
    pub enabled: bool,
    /// The port sshd listens on (tests point it at the simulator's SSH endpoint).
    pub port: u16,
    /// The login user: Hetzner's images log in as root.
    pub user: String,
    /// SSH sessions open at the same time, over all subscriptions.
    pub concurrency: usize,
    /// Seconds for the TCP connect, the handshake and the login together.
    pub connect_timeout_seconds: u64,
    /// Seconds `cloud-init status --wait` may take (first boot installs packages).
    pub cloud_init_timeout_seconds: u64,
    /// Seconds one bootstrap command or upload may take.
    pub command_timeout_seconds: u64,
}

impl Default for SshSettings {
    fn default() -> Self {
        SshSettings {
            enabled: true,
            port: 22,
            user: "root".to_owned(),
            concurrency: 16,
            connect_timeout_seconds: 20,
            cloud_init_timeout_seconds: 1800,
            command_timeout_seconds: 600,
        }
    }
}

pub const MAX_SSH_CONCURRENCY: usize = 1024;
pub const MAX_SSH_TIMEOUT_SECONDS: u64 = 24 * 60 * 60;
/// Bootstrap limits: a bootstrap is a few files and commands, not a deployment system.
pub const MAX_BOOTSTRAP_STEPS: usize = 100;
pub const MAX_UPLOAD_BYTES: usize = 1024 * 1024;
pub const MAX_BOOTSTRAP_VERSION_CHARS: usize = 64;

/// What the controller does on a new server over SSH, once cloud-init finished, before the
/// row is `ready`. Steps run in order; each one done is recorded in a marker file on the
/// server together with `version`, so a bootstrap that was interrupted resumes after the last
/// step done, and a new `version` runs every step again (on servers bootstrapped after the
/// change: a server already `ready` is not bootstrapped again).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// Any text of letters, digits, '.', '_' and '-' (e.g. `"3"` or `"2026-12-01"`).
    pub version: String,
    pub steps: Vec<BootstrapStep>,
}

/// One bootstrap step: `upload: {path, mode, content}` or `run: "command"`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "StepFields", into = "StepFields")]
pub enum BootstrapStep {
    /// Write a file (parent directories created), then set its mode.
    Upload(Upload),
    /// Run a command through the login shell; a non-zero exit status fails the step.
    Run(String),
}

/// A step as written: YAML maps a single key to the step kind (serde_norway reads enums
/// from `!tags` only, which nobody writes by hand).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct StepFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upload: Option<Upload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run: Option<String>,
}

impl TryFrom<StepFields> for BootstrapStep {
    type Error = String;

    fn try_from(fields: StepFields) -> Result<Self, Self::Error> {
        match fields {
            StepFields {
                upload: Some(upload),
                run: None,
            } => Ok(BootstrapStep::Upload(upload)),
            StepFields {
                upload: None,
                run: Some(command),
            } => Ok(BootstrapStep::Run(command)),
            _ => Err(
                "a step is either `upload: {path, mode, content}` or `run: COMMAND`, exactly one"
                    .to_owned(),
            ),
        }
    }
}

impl From<BootstrapStep> for StepFields {
    fn from(step: BootstrapStep) -> Self {
        match step {
            BootstrapStep::Upload(upload) => StepFields {
                upload: Some(upload),
                run: None,
            },
            BootstrapStep::Run(command) => StepFields {
                upload: None,
                run: Some(command),
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upload {
    /// Absolute path on the server.
    pub path: String,
    /// Octal mode such as `"0644"`.
    pub mode: String,
    pub content: String,
}

/// What a subscription's status means for its server. Matching is exact (case-sensitive):
/// a status in none of the lists, NULL, or a wrongly cased one is held.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Lifecycle {
    /// Server running.
    pub run: Vec<String>,
    /// Server keeps running for `grace_period_hours` after the row entered the status, then
    /// is suspended.
    pub grace: Vec<String>,
    pub grace_period_hours: u64,
    /// Server powered off; server, disk, key and firewall kept. Powered on again when the
    /// status returns to a `run` status.
    pub suspend: Vec<String>,
    /// Server, firewall and key deleted, `deletion_delay_hours` after the row entered the
    /// status (suspended meanwhile).
    pub delete: Vec<String>,
    pub deletion_delay_hours: u64,
    /// Take a snapshot of the server before deleting it.
    pub snapshot_before_delete: bool,
    /// Snapshots taken before a deletion are deleted by the controller after this many days.
    pub snapshot_retention_days: u64,
}

impl Default for Lifecycle {
    fn default() -> Self {
        let list = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        Lifecycle {
            run: list(&["active", "trialing"]),
            grace: list(&["past_due"]),
            grace_period_hours: 72,
            suspend: list(&["paused", "unpaid"]),
            delete: list(&["canceled", "incomplete_expired"]),
            deletion_delay_hours: 0,
            snapshot_before_delete: false,
            snapshot_retention_days: 30,
        }
    }
}

/// The lifecycle policy one status maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Run,
    Grace,
    Suspend,
    Delete,
    /// Not understood: never create, never delete.
    Hold,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Run => "run",
            Policy::Grace => "grace",
            Policy::Suspend => "suspend",
            Policy::Delete => "delete",
            Policy::Hold => "hold",
        }
    }
}

impl Lifecycle {
    /// The policy for a row's status (`None` is a NULL status).
    pub fn policy(&self, status: Option<&str>) -> Policy {
        let Some(status) = status else {
            return Policy::Hold;
        };
        let has = |list: &[String]| list.iter().any(|s| s == status);
        if has(&self.run) {
            Policy::Run
        } else if has(&self.grace) {
            Policy::Grace
        } else if has(&self.suspend) {
            Policy::Suspend
        } else if has(&self.delete) {
            Policy::Delete
        } else {
            Policy::Hold
        }
    }

    fn lists(&self) -> [(&'static str, &Vec<String>); 4] {
        [
            ("run", &self.run),
            ("grace", &self.grace),
            ("suspend", &self.suspend),
            ("delete", &self.delete),
        ]
    }
}

/// Server deletions allowed per hour: `max(min_per_hour, fleet_percent % of the servers the
/// controller manages)`. Past it, deletions pause until an operator approves
/// (`vps-controller deletions approve`); creating and repairing go on.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeletionBudget {
    pub min_per_hour: u64,
    pub fleet_percent: u64,
}

impl Default for DeletionBudget {
    fn default() -> Self {
        DeletionBudget {
            min_per_hour: 3,
            fleet_percent: 10,
        }
    }
}

impl DeletionBudget {
    /// Deletions allowed in one hour for a fleet of `managed` servers.
    pub fn per_hour(&self, managed: u64) -> u64 {
        let share = managed.saturating_mul(self.fleet_percent).div_ceil(100);
        share.max(self.min_per_hour)
    }
}

/// What a subscription on this plan gets.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Hetzner server type name, e.g. `cx23`.
    pub server_type: String,
    /// Image name or id, e.g. `ubuntu-24.04`.
    pub image: String,
    /// Location name, e.g. `fsn1`.
    pub location: String,
    /// Rules of the subscription's own firewall.
    pub firewall_rules: Vec<FirewallRule>,
    /// The plan's part of the server's cloud-init `user_data`.
    #[serde(default)]
    pub cloud_init: CloudInitTemplate,
    /// Files and commands applied over SSH after cloud-init finished (needs `ssh.enabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<Bootstrap>,
}

/// One Hetzner firewall rule (see API-NOTES §4).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRule {
    pub direction: Direction,
    pub protocol: Protocol,
    /// `"80"`, `"1024-5000"` or `"any"`; required for tcp/udp, absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// CIDRs traffic may come from; only (and at least one) for `in` rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<String>,
    /// CIDRs traffic may go to; only (and at least one) for `out` rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

impl Direction {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Esp,
    Gre,
}

impl Protocol {
    /// The API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Esp => "esp",
            Protocol::Gre => "gre",
        }
    }

    /// Whether rules for this protocol take a port.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// One problem found by validation: the field path (e.g. `plans.pro.firewall_rules[1].port`)
/// and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.problem)
        } else {
            write!(f, "{}: {}", self.field, self.problem)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not YAML, or not the shape of a config: `message` names the field path and position.
    #[error("{}: {message}", origin(.file.as_deref()))]
    Parse {
        file: Option<PathBuf>,
        message: String,
    },
    /// Well-formed but invalid; every problem found is listed.
    #[error("{}: {}", origin(.file.as_deref()), describe_problems(.problems))]
    Invalid {
        file: Option<PathBuf>,
        problems: Vec<FieldProblem>,
    },
}

impl ConfigError {
    /// The validation problems (empty for read and parse errors).
    pub fn problems(&self) -> &[FieldProblem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

fn origin(file: Option<&Path>) -> String {
    match file {
        Some(path) => format!("config file {}", path.display()),
        None => "config".to_owned(),
    }
}

fn describe_problems(problems: &[FieldProblem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => format!(
            "{} problems: {}",
            many.len(),
            many.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::builtin()
    }
}

impl Config {
    /// The configuration used without a file; identical to `config.example.yaml`.
    pub fn builtin() -> Config {
        let allow_in = |protocol: Protocol, port: Option<&str>, description: &str| FirewallRule {
            direction: Direction::In,
            protocol,
            port: port.map(str::to_owned),
            source_ips: vec!["0.0.0.0/0".to_owned(), "::/0".to_owned()],
            destination_ips: Vec::new(),
            description: Some(description.to_owned()),
        };
        let firewall_rules = vec![
            allow_in(Protocol::Tcp, Some("22"), "SSH"),
            allow_in(Protocol::Icmp, None, "ping"),
        ];
        let cloud_init = CloudInitTemplate {
            package_update: true,
            package_upgrade: false,
            packages: vec!["fail2ban".to_owned(), "unattended-upgrades".to_owned()],
            write_files: vec![crate::cloud_init::WriteFile {
                path: "/etc/apt/apt.conf.d/20auto-upgrades".to_owned(),
                content: "APT::Periodic::Update-Package-Lists \"1\";\n\
                          APT::Periodic::Unattended-Upgrade \"1\";\n"
                    .to_owned(),
                permissions: Some("0644".to_owned()),
                owner: None,
            }],
            runcmd: vec!["systemctl enable --now fail2ban".to_owned()],
        };
        let plan = |server_type: &str| Plan {
            server_type: server_type.to_owned(),
            image: "ubuntu-24.04".to_owned(),
            location: "fsn1".to_owned(),
            firewall_rules: firewall_rules.clone(),
            cloud_init: cloud_init.clone(),
            bootstrap: None,
        };
        Config {
            instance: "default".to_owned(),
            name_prefix: "vps".to_owned(),
            lifecycle: Lifecycle::default(),
            deletion_budget: DeletionBudget::default(),
            active_statuses: None,
            resync_seconds: 60,
            concurrency: 8,
            ssh_key_algorithm: KeyAlgorithm::Rsa4096,
            change_server_type: false,
            shutdown_timeout_seconds: 30,
            plans: BTreeMap::from([
                ("starter".to_owned(), plan("cx23")),
                ("pro".to_owned(), plan("cpx32")),
            ]),
            ssh: SshSettings::default(),
        }
    }

    /// Parses and validates YAML. An empty document (or only comments) gives the built-in config.
    pub fn from_yaml_str(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, None)
    }

    /// Loads and validates the file at `path`, or returns the built-in config for `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::builtin());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, Some(path))
    }

    fn parse(text: &str, file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config: Config = serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.map(Path::to_owned),
            message: e.to_string(),
        })?;
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                file: file.map(Path::to_owned),
                problems,
            });
        }
        config.canonicalize_cidrs();
        Ok(config)
    }

    /// Checks every field; the error lists all problems found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                file: None,
                problems,
            })
        }
    }

    /// The plan named `name`, if configured.
    pub fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.get(name)
    }

    /// A stable fingerprint of everything that decides what the controller builds: when it
    /// changes between two starts, rows that failed on the old config are retried.
    pub fn fingerprint(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn problems(&self) -> Vec<FieldProblem> {
        let mut p = Problems::default();
        if self.instance.is_empty() {
            p.add("instance", "must not be empty");
        } else if !is_label_value(&self.instance) {
            p.add(
                "instance",
                format!(
                    "{:?} is not a valid Hetzner label value (1-63 characters, letters, digits, \
                     '-', '_' and '.', starting and ending with a letter or digit)",
                    self.instance
                ),
            );
        }
        if !is_rfc1123_label(&self.name_prefix) || self.name_prefix.len() > MAX_NAME_PREFIX_LEN {
            p.add(
                "name_prefix",
                format!(
                    "{:?} is not a lowercase DNS label of 1-{MAX_NAME_PREFIX_LEN} characters \
                     (a-z, 0-9 and '-', starting and ending with a letter or digit)",
                    self.name_prefix
                ),
            );
        }
        if self.active_statuses.is_some() {
            p.add(
                "active_statuses",
                "was replaced by lifecycle.run (and lifecycle.grace, suspend, delete); move the list there",
            );
        }
        lifecycle_problems(&mut p, &self.lifecycle);
        if self.deletion_budget.fleet_percent > 100 {
            p.add(
                "deletion_budget.fleet_percent",
                format!(
                    "{} is out of range 0-100",
                    self.deletion_budget.fleet_percent
                ),
            );
        }
        if !(1..=MAX_RESYNC_SECONDS).contains(&self.resync_seconds) {
            p.add(
                "resync_seconds",
                format!(
                    "{} is out of range 1-{MAX_RESYNC_SECONDS}",
                    self.resync_seconds
                ),
            );
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            p.add(
                "concurrency",
                format!("{} is out of range 1-{MAX_CONCURRENCY}", self.concurrency),
            );
        }
        if self.shutdown_timeout_seconds > MAX_SHUTDOWN_TIMEOUT_SECONDS {
            p.add(
                "shutdown_timeout_seconds",
                format!(
                    "{} is out of range 0-{MAX_SHUTDOWN_TIMEOUT_SECONDS}",
                    self.shutdown_timeout_seconds
                ),
            );
        }
        if self.change_server_type {
            p.add(
                "change_server_type",
                "true is not supported yet: a plan's server type change is reported (log and event), not applied; set it to false",
            );
        }
        ssh_problems(&mut p, &self.ssh);
        if self.plans.is_empty() {
            p.add("plans", "must define at least one plan");
        }
        for (name, plan) in &self.plans {
            let field = format!("plans.{name}");
            if !is_label_value(name) {
                p.add(
                    &field,
                    format!(
                        "plan name {name:?} must be 1-63 letters, digits, '-', '_' or '.', \
                         starting and ending with a letter or digit"
                    ),
                );
            }
            plan_problems(&mut p, &field, plan);
        }
        p.0
    }

    fn canonicalize_cidrs(&mut self) {
        for plan in self.plans.values_mut() {
            for rule in &mut plan.firewall_rules {
                for cidr in rule.source_ips.iter_mut().chain(&mut rule.destination_ips) {
                    if let Ok(canonical) = canonical_cidr(cidr) {
                        *cidr = canonical;
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct Problems(Vec<FieldProblem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(FieldProblem {
            field: field.into(),
            problem: problem.into(),
        });
    }
}

fn lifecycle_problems(p: &mut Problems, lifecycle: &Lifecycle) {
    if lifecycle.run.is_empty() {
        p.add(
            "lifecycle.run",
            "must list at least one status (without one no subscription ever gets a server)",
        );
    }
    let lists = lifecycle.lists();
    for (index, (name, list)) in lists.iter().enumerate() {
        for (i, status) in list.iter().enumerate() {
            let field = format!("lifecycle.{name}[{i}]");
            let valid = !status.is_empty()
                && status.len() <= 64
                && status.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            if !valid {
                p.add(
                    field,
                    format!(
                        "{status:?} is not a subscription status: lowercase letters and '_' only \
                         (Stripe's are {})",
                        STRIPE_STATUSES.join(", ")
                    ),
                );
            } else if list[..i].contains(status) {
                p.add(field, format!("{status:?} is listed twice"));
            } else if let Some((other, _)) = lists[..index].iter().find(|(_, l)| l.contains(status))
            {
                p.add(
                    field,
                    format!(
                        "{status:?} is already listed in lifecycle.{other}; a status has one policy"
                    ),
                );
            }
        }
    }
    for (field, value, max) in [
        (
            "lifecycle.grace_period_hours",
            lifecycle.grace_period_hours,
            MAX_GRACE_PERIOD_HOURS,
        ),
        (
            "lifecycle.deletion_delay_hours",
            lifecycle.deletion_delay_hours,
            MAX_DELETION_DELAY_HOURS,
        ),
    ] {
        if value > max {
            p.add(field, format!("{value} is out of range 0-{max}"));
        }
    }
    if !(1..=MAX_SNAPSHOT_RETENTION_DAYS).contains(&lifecycle.snapshot_retention_days) {
        p.add(
            "lifecycle.snapshot_retention_days",
            format!(
                "{} is out of range 1-{MAX_SNAPSHOT_RETENTION_DAYS}",
                lifecycle.snapshot_retention_days
            ),
        );
    }
}

fn plan_problems(p: &mut Problems, field: &str, plan: &Plan) {
    for (name, value) in [
        ("server_type", &plan.server_type),
        ("image", &plan.image),
        ("location", &plan.location),
    ] {
        if value.is_empty() {
            p.add(format!("{field}.{name}"), "must not be empty");
        } else if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            p.add(
                format!("{field}.{name}"),
                format!("{value:?} must not contain spaces"),
            );
        }
    }
    if plan.firewall_rules.len() > MAX_FIREWALL_RULES {
        p.add(
            format!("{field}.firewall_rules"),
            format!(
                "has {} rules; Hetzner allows at most {MAX_FIREWALL_RULES}",
                plan.firewall_rules.len()
            ),
        );
    }
    for (i, rule) in plan.firewall_rules.iter().enumerate() {
        rule_problems(p, &format!("{field}.firewall_rules[{i}]"), rule);
    }
    for (sub_field, problem) in plan.cloud_init.problems() {
        let path = if sub_field.is_empty() {
            format!("{field}.cloud_init")
        } else {
            format!("{field}.cloud_init.{sub_field}")
        };
        p.add(path, problem);
    }
    if let Some(bootstrap) = &plan.bootstrap {
        bootstrap_problems(p, &format!("{field}.bootstrap"), bootstrap);
    }
}

fn ssh_problems(p: &mut Problems, ssh: &SshSettings) {
    if ssh.port == 0 {
        p.add("ssh.port", "0 is not a port (sshd listens on 22)");
    }
    if ssh.user.is_empty()
        || !ssh
            .user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        p.add(
            "ssh.user",
            format!(
                "{:?} is not a login name (letters, digits, '_', '-', '.')",
                ssh.user
            ),
        );
    }
    if !(1..=MAX_SSH_CONCURRENCY).contains(&ssh.concurrency) {
        p.add(
            "ssh.concurrency",
            format!(
                "{} is out of range 1-{MAX_SSH_CONCURRENCY}",
                ssh.concurrency
            ),
        );
    }
    for (field, value) in [
        ("ssh.connect_timeout_seconds", ssh.connect_timeout_seconds),
        (
            "ssh.cloud_init_timeout_seconds",
            ssh.cloud_init_timeout_seconds,
        ),
        ("ssh.command_timeout_seconds", ssh.command_timeout_seconds),
    ] {
        if !(1..=MAX_SSH_TIMEOUT_SECONDS).contains(&value) {
            p.add(
                field,
                format!("{value} is out of range 1-{MAX_SSH_TIMEOUT_SECONDS}"),
            );
        }
    }
}

fn bootstrap_problems(p: &mut Problems, field: &str, bootstrap: &Bootstrap) {
    let version = &bootstrap.version;
    if version.is_empty()
        || version.len() > MAX_BOOTSTRAP_VERSION_CHARS
        || !version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        p.add(
            format!("{field}.version"),
            format!(
                "{version:?} must be 1-{MAX_BOOTSTRAP_VERSION_CHARS} letters, digits, '.', '_' or '-'"
            ),
        );
    }
    if bootstrap.steps.len() > MAX_BOOTSTRAP_STEPS {
        p.add(
            format!("{field}.steps"),
            format!(
                "has {} steps; at most {MAX_BOOTSTRAP_STEPS}",
                bootstrap.steps.len()
            ),
        );
    }
    for (i, step) in bootstrap.steps.iter().enumerate() {
        let field = format!("{field}.steps[{i}]");
        match step {
            BootstrapStep::Run(command) => {
                if command.trim().is_empty() {
                    p.add(format!("{field}.run"), "must not be empty");
                } else if command.contains('\0') {
                    p.add(format!("{field}.run"), "must not contain a NUL character");
                }
            }
            BootstrapStep::Upload(upload) => {
                if !upload.path.starts_with('/')
                    || upload.path.ends_with('/')
                    || upload.path.chars().any(char::is_control)
                {
                    p.add(
                        format!("{field}.upload.path"),
                        format!(
                            "{:?} must be an absolute file path without control characters",
                            upload.path
                        ),
                    );
                }
                if !is_octal_mode(&upload.mode) {
                    p.add(
                        format!("{field}.upload.mode"),
                        format!(
                            "{:?} is not an octal file mode such as \"0644\"",
                            upload.mode
                        ),
                    );
                }
                if upload.content.len() > MAX_UPLOAD_BYTES {
                    p.add(
                        format!("{field}.upload.content"),
                        format!(
                            "is {} bytes; at most {MAX_UPLOAD_BYTES}",
                            upload.content.len()
                        ),
                    );
                }
            }
        }
    }
}

fn rule_problems(p: &mut Problems, field: &str, rule: &FirewallRule) {
    match (&rule.port, rule.protocol.has_ports()) {
        (None, true) => p.add(
            format!("{field}.port"),
            format!(
                "is required for protocol {} (e.g. \"22\", \"1024-5000\" or \"any\")",
                rule.protocol.as_str()
            ),
        ),
        (Some(_), false) => p.add(
            format!("{field}.port"),
            format!(
                "is only allowed for tcp and udp, not {}",
                rule.protocol.as_str()
            ),
        ),
        (Some(port), true) => {
            if let Err(problem) = check_port(port) {
                p.add(format!("{field}.port"), problem);
            }
        }
        (None, false) => {}
    }
    let (own, own_name, other, other_name) = match rule.direction {
        Direction::In => (
            &rule.source_ips,
            "source_ips",
            &rule.destination_ips,
            "destination_ips",
        ),
        Direction::Out => (
            &rule.destination_ips,
            "destination_ips",
            &rule.source_ips,
            "source_ips",
        ),
    };
    if !other.is_empty() {
        p.add(
            format!("{field}.{other_name}"),
            format!(
                "is not allowed for direction {} (use {own_name})",
                rule.direction.as_str()
            ),
        );
    }
    if own.is_empty() {
        p.add(
            format!("{field}.{own_name}"),
            format!(
                "needs at least one CIDR for direction {} (0.0.0.0/0 and ::/0 mean any)",
                rule.direction.as_str()
            ),
        );
    }
    if own.len() > MAX_IPS_PER_RULE {
        p.add(
            format!("{field}.{own_name}"),
            format!(
                "has {} entries; Hetzner allows at most {MAX_IPS_PER_RULE}",
                own.len()
            ),
        );
    }
    for (i, cidr) in own.iter().enumerate() {
        if let Err(problem) = canonical_cidr(cidr) {
            p.add(format!("{field}.{own_name}[{i}]"), problem);
        }
    }
    if let Some(description) = &rule.description
        && description.chars().count() > MAX_RULE_DESCRIPTION_CHARS
    {
        p.add(
            format!("{field}.description"),
            format!(
                "is {} characters; Hetzner allows at most {MAX_RULE_DESCRIPTION_CHARS}",
                description.chars().count()
            ),
        );
    }
}

fn check_port(port: &str) -> Result<(), String> {
    let not_a_port =
        || format!("{port:?} is not a port or range 1-65535 (e.g. \"80\", \"1024-5000\", \"any\")");
    let parse = |s: &str| -> Option<u16> {
        if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u16>().ok().filter(|&n| n >= 1)
    };
    if port == "any" {
        return Ok(());
    }
    match port.split_once('-') {
        None => parse(port).map(|_| ()).ok_or_else(not_a_port),
        Some((start, end)) => match (parse(start), parse(end)) {
            (Some(start), Some(end)) if start <= end => Ok(()),
            (Some(start), Some(end)) => Err(format!(
                "{port:?}: range start {start} is above its end {end}"
            )),
            _ => Err(not_a_port()),
        },
    }
}

/// Checks a CIDR (`address/prefix`, IPv4 or IPv6, no host bits set outside the prefix) and
/// returns it in the canonical form the Hetzner API uses (RFC 5952 for IPv6).
pub fn canonical_cidr(cidr: &str) -> Result<String, String> {
    let Some((address, prefix)) = cidr.split_once('/') else {
        return Err(format!(
            "{cidr:?} is not a CIDR: add a prefix length (e.g. \"203.0.113.7/32\" for one host)"
        ));
    };
    let address: IpAddr = address
        .parse()
        .map_err(|_| format!("{cidr:?} is not a CIDR: {address:?} is not an IP address"))?;
    let max_prefix: u8 = if address.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| {
            *p <= max_prefix && !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_digit())
        })
        .ok_or_else(|| format!("{cidr:?} is not a CIDR: prefix length must be 0-{max_prefix}"))?;
    let network = ipnet::IpNet::new(address, prefix)
        .map_err(|_| format!("{cidr:?} is not a CIDR: prefix length must be 0-{max_prefix}"))?
        .trunc();
    if network.addr() != address {
        return Err(format!(
            "{cidr:?} has host bits set (did you mean \"{network}\"?)"
        ));
    }
    // IpNet prints IPv6 in RFC 5952 form, as the Hetzner API answers.
    Ok(network.to_string())
}

/// Whether `value` is a non-empty Hetzner label value: 1-63 characters, letters, digits, `-`,
/// `_` and `.`, starting and ending with a letter or digit (API-NOTES §3).
pub fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    bytes.len() <= 63
        && first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Like the derived map deserializer, but a plan name given twice is an error instead of the
/// last one silently winning.
fn deserialize_plans<'de, D>(deserializer: D) -> Result<BTreeMap<String, Plan>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct PlansVisitor;
    impl<'de> serde::de::Visitor<'de> for PlansVisitor {
        type Value = BTreeMap<String, Plan>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map from plan name to plan")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut plans = BTreeMap::new();
            while let Some(name) = map.next_key::<String>()? {
                if plans.contains_key(&name) {
                    return Err(serde::de::Error::custom(format!(
                        "plan {name:?} is defined twice"
                    )));
                }
                let plan = map.next_value::<Plan>()?;
                plans.insert(name, plan);
            }
            Ok(plans)
        }
    }
    deserializer.deserialize_map(PlansVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config of one plan with `extra` (YAML lines) inside the plan and `top` at the top.
    fn with(top: &str, plan_extra: &str) -> Result<Config, ConfigError> {
        let yaml = format!(
            "{top}\nplans:\n  p:\n    server_type: cx23\n    image: ubuntu-24.04\n    location: fsn1\n    firewall_rules: []\n{plan_extra}"
        );
        Config::from_yaml_str(&yaml)
    }

    #[test]
    fn a_bootstrap_parses_with_its_steps_in_order() {
        let config = with(
            "ssh: {port: 2222, concurrency: 4}",
            "    bootstrap:\n      version: \"2026-12.1\"\n      steps:\n        - upload: {path: /etc/motd, mode: \"0644\", content: hi}\n        - run: systemctl restart ssh\n",
        )
        .unwrap();
        assert_eq!(config.ssh.port, 2222);
        assert_eq!(config.ssh.concurrency, 4);
        assert!(config.ssh.enabled, "SSH is on unless turned off");
        let bootstrap = config.plans["p"].bootstrap.as_ref().unwrap();
        assert_eq!(bootstrap.version, "2026-12.1");
        assert_eq!(
            bootstrap.steps,
            vec![
                BootstrapStep::Upload(Upload {
                    path: "/etc/motd".into(),
                    mode: "0644".into(),
                    content: "hi".into()
                }),
                BootstrapStep::Run("systemctl restart ssh".into()),
            ]
        );
    }

    #[test]
    fn bad_ssh_and_bootstrap_fields_are_named() {
        let cases: &[(&str, &str, &str)] = &[
            ("ssh: {port: 0}", "", "ssh.port"),
            ("ssh: {user: \"root; rm\"}", "", "ssh.user"),
            ("ssh: {concurrency: 0}", "", "ssh.concurrency"),
            (
                "ssh: {connect_timeout_seconds: 0}",
                "",
                "ssh.connect_timeout_seconds",
            ),
            (
                "ssh: {cloud_init_timeout_seconds: 90000}",
                "",
                "ssh.cloud_init_timeout_seconds",
            ),
            (
                "",
                "    bootstrap: {version: \"\", steps: []}\n",
                "plans.p.bootstrap.version",
            ),
            (
                "",
                "    bootstrap: {version: \"a b\", steps: []}\n",
                "plans.p.bootstrap.version",
            ),
            (
                "",
                "    bootstrap: {version: \"1\", steps: [{run: \" \"}]}\n",
                "plans.p.bootstrap.steps[0].run",
            ),
            (
                "",
                "    bootstrap: {version: \"1\", steps: [{upload: {path: etc/x, mode: \"0644\", content: x}}]}\n",
                "plans.p.bootstrap.steps[0].upload.path",
            ),
            (
                "",
                "    bootstrap: {version: \"1\", steps: [{run: ok}, {upload: {path: /x, mode: \"0999\", content: x}}]}\n",
                "plans.p.bootstrap.steps[1].upload.mode",
            ),
        ];
        for (top, plan, field) in cases {
            let error = with(top, plan).unwrap_err();
            assert!(
                error.problems().iter().any(|p| p.field == *field),
                "{top} {plan}: {error}"
            );
        }
        // Unknown fields and unknown step kinds are parse errors that say where.
        let error = with("ssh: {prot: 22}", "").unwrap_err().to_string();
        assert!(error.contains("prot"), "{error}");
        let error = with("", "    bootstrap: {version: \"1\", steps: [{copy: x}]}\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("copy"), "{error}");
    }

    #[test]
    fn ports() {
        for ok in ["1", "80", "65535", "1024-5000", "80-80", "any"] {
            assert_eq!(check_port(ok), Ok(()), "{ok}");
        }
        for bad in [
            "0", "70000", "", "-", "80-", "-80", "+80", " 80", "80 ", "1-2-3", "ANY", "08x",
        ] {
            assert!(check_port(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(
            check_port("5000-1024")
                .unwrap_err()
                .contains("above its end")
        );
    }

    #[test]
    fn cidrs_are_checked_and_canonicalized() {
        assert_eq!(canonical_cidr("0.0.0.0/0").unwrap(), "0.0.0.0/0");
        assert_eq!(canonical_cidr("10.1.0.0/16").unwrap(), "10.1.0.0/16");
        assert_eq!(canonical_cidr("192.0.2.7/32").unwrap(), "192.0.2.7/32");
        assert_eq!(
            canonical_cidr("2001:0DB8:0000:0000:0000:0000:0000:0000/32").unwrap(),
            "2001:db8::/32"
        );
        assert_eq!(canonical_cidr("::/0").unwrap(), "::/0");
        assert!(
            canonical_cidr("10.0.0.1/8")
                .unwrap_err()
                .contains("\"10.0.0.0/8\"")
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "/8",
        ] {
            assert!(canonical_cidr(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn lifecycle_policies_match_exactly_and_default_to_hold() {
        let lifecycle = Lifecycle::default();
        for (status, policy) in [
            (Some("active"), Policy::Run),
            (Some("trialing"), Policy::Run),
            (Some("past_due"), Policy::Grace),
            (Some("paused"), Policy::Suspend),
            (Some("unpaid"), Policy::Suspend),
            (Some("canceled"), Policy::Delete),
            (Some("incomplete_expired"), Policy::Delete),
            (Some("incomplete"), Policy::Hold),
            (Some("Active"), Policy::Hold),
            (Some("active "), Policy::Hold),
            (Some("something_new"), Policy::Hold),
            (Some(""), Policy::Hold),
            (None, Policy::Hold),
        ] {
            assert_eq!(lifecycle.policy(status), policy, "{status:?}");
        }
    }

    #[test]
    fn deletion_budget_is_a_share_of_the_fleet_with_a_floor() {
        let budget = DeletionBudget::default();
        assert_eq!(budget.per_hour(0), 3);
        assert_eq!(budget.per_hour(29), 3);
        assert_eq!(budget.per_hour(31), 4);
        assert_eq!(budget.per_hour(100), 10);
        assert_eq!(budget.per_hour(10_000), 1_000);
        assert_eq!(budget.per_hour(u64::MAX), u64::MAX.div_ceil(100).max(3));
    }

    #[test]
    fn label_values() {
        for ok in ["a", "default", "prod_eu.1", "A-b", &"x".repeat(63)] {
            assert!(is_label_value(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a b", "ä", "a/b", &"x".repeat(64)] {
            assert!(!is_label_value(bad), "{bad}");
        }
    }
}
