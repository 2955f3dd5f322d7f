//! Rows -> desired state. Pure: no I/O, no clock (the caller passes `now`). Decides, per
//! subscription, what its server must be (running, suspended, gone) from the lifecycle
//! policy of its status, or why the row is held or cannot be acted on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{Config, Direction, Plan, Policy, Protocol};
use crate::db::entities::subscription;
use crate::hcloud::{FirewallDirection, FirewallProtocol, FirewallRule, Labels};

/// Label carrying the database's installation id: the one label that makes a resource ours.
/// Resources without this database's value are never modified or deleted.
pub const INSTALLATION_LABEL: &str = "vps-controller/installation";
/// Label naming the controller instance (`instance` in the config), for people reading labels.
pub const INSTANCE_LABEL: &str = "vps-controller/instance";
/// Label naming the subscription (its resource key) a resource belongs to.
pub const SUBSCRIPTION_LABEL: &str = "vps-controller/subscription";
/// Label naming the plan; lets operators filter in the Hetzner console.
pub const PLAN_LABEL: &str = "vps-controller/plan";
/// Label marking snapshots taken before a deletion (deleted after the retention period).
pub const SNAPSHOT_LABEL: &str = "vps-controller/snapshot";
/// Value of `SNAPSHOT_LABEL` on snapshots taken before a deletion.
pub const PRE_DELETE_SNAPSHOT: &str = "pre-delete";

/// Longest error text the controller writes to a row's `provisioning_error` (and the most
/// it quotes of anything, row values included, in one message), in characters.
pub const MAX_ERROR_CHARS: usize = 1000;

/// Characters of a subscription id shown in logs: enough to find the row (ids are the web
/// app's, of any length).
pub const MAX_SHOWN_ID_CHARS: usize = 64;

/// Longest resource key; with a prefix of at most 20 chars and the dash the name stays <= 63.
const MAX_KEY_LEN: usize = 42;
/// Hex digits of the hash suffix of a changed id (64 bits: two of a million changed ids
/// share one with odds of about 3 in 100 million; the resync still checks).
const HASH_LEN: usize = 16;

/// Who owns a resource: this database (its installation id, made by `migrate`) and, for
/// readability, the configured instance name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub installation: String,
    pub instance: String,
}

impl Owner {
    pub fn new(installation: impl Into<String>, config: &Config) -> Owner {
        Owner {
            installation: installation.into(),
            instance: config.instance.clone(),
        }
    }

    /// The labels every resource of a subscription carries.
    pub fn labels(&self, key: &str, plan: Option<&str>) -> Labels {
        let mut labels = BTreeMap::new();
        labels.insert(INSTALLATION_LABEL.to_string(), self.installation.clone());
        labels.insert(INSTANCE_LABEL.to_string(), self.instance.clone());
        labels.insert(SUBSCRIPTION_LABEL.to_string(), key.to_string());
        if let Some(plan) = plan {
            // Plan names are validated as label values by the config loader.
            labels.insert(PLAN_LABEL.to_string(), plan.to_string());
        }
        labels
    }

    /// Label selector matching everything this database owns.
    pub fn selector(&self) -> String {
        format!("{INSTALLATION_LABEL}={}", self.installation)
    }

    /// Label selector matching everything owned for one subscription.
    pub fn subscription_selector(&self, key: &str) -> String {
        format!("{},{SUBSCRIPTION_LABEL}={key}", self.selector())
    }

    /// Resources labelled by the scheme before installation ids (instance label only): they
    /// are ours only where a row of this database records their id.
    pub fn legacy_selector(&self) -> String {
        format!("{INSTANCE_LABEL}={},!{INSTALLATION_LABEL}", self.instance)
    }

    /// Whether `labels` say this database owns the resource.
    pub fn owns(&self, labels: &Labels) -> bool {
        labels.get(INSTALLATION_LABEL) == Some(&self.installation)
    }

    /// Whether the resource belongs to another database's controller.
    pub fn foreign(&self, labels: &Labels) -> bool {
        labels
            .get(INSTALLATION_LABEL)
            .is_some_and(|id| *id != self.installation)
    }
}

/// The stable, Hetzner-safe form of a subscription id: a valid label value and RFC 1123 label
/// fragment, injective over ids. An id that is already a clean key (lowercase letters and
/// digits in groups joined by single dashes, at most 42 characters) is used as it is, so names
/// stay readable. Any other id becomes `<cleaned head>--<hash>`: the double dash never occurs
/// in a clean key, so a changed id can never take the key of another, clean id.
pub fn resource_key(subscription_id: &str) -> String {
    if is_clean_key(subscription_id) {
        return subscription_id.to_string();
    }
    let mut head = String::new();
    for c in subscription_id.chars() {
        let c = match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        };
        // Runs of dashes collapse, so the head never holds the `--` marker itself.
        if c == '-' && (head.is_empty() || head.ends_with('-')) {
            continue;
        }
        head.push(c);
        if head.len() >= MAX_KEY_LEN - HASH_LEN - 2 {
            break;
        }
    }
    let head = head.trim_end_matches('-');
    let head = if head.is_empty() { "x" } else { head };
    let digest = ring::digest::digest(&ring::digest::SHA256, subscription_id.as_bytes());
    let hash: String = digest.as_ref()[..HASH_LEN / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{head}--{hash}")
}

/// Lowercase letters and digits in groups joined by single dashes, at most `MAX_KEY_LEN`.
fn is_clean_key(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_LEN
        && id.split('-').all(|group| {
            !group.is_empty()
                && group
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// Name of every resource (server, SSH key, firewall) of one subscription.
pub fn resource_name(config: &Config, subscription_id: &str) -> String {
    format!("{}-{}", config.name_prefix, resource_key(subscription_id))
}

/// What one subscription row asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub subscription_id: String,
    /// `resource_key(subscription_id)`: the value of the subscription label.
    pub key: String,
    /// The row's `desired_version`; `None` when the row no longer exists.
    pub version: Option<i64>,
    pub want: Want,
    /// Snapshot each server before deleting it (`lifecycle.snapshot_before_delete`).
    pub snapshot_before_delete: bool,
    /// The wish changes by itself after this long (a grace period or deletion delay ends):
    /// look again then.
    pub recheck_after: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Want {
    /// One server, SSH key and firewall as the plan says (running, or powered off when
    /// suspended).
    Vps(Box<VpsSpec>),
    /// No resources at all (status mapped to `delete`, or the row was deleted).
    Nothing,
    /// The status is not understood: nothing is created or deleted; the row says why.
    Hold(String),
    /// The row cannot be acted on; nothing at Hetzner is touched and the row is marked failed.
    Invalid(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct VpsSpec {
    /// Name shared by the server, SSH key and firewall.
    pub name: String,
    pub labels: Labels,
    pub plan_name: String,
    /// Shared by every row on the plan ([`shared_plan`]).
    pub plan: Arc<Plan>,
    /// The plan's firewall rules in wire form, canonicalised for comparison.
    pub firewall_rules: Arc<[FirewallRule]>,
    /// Powered off and kept (suspend policy, grace period over, deletion delayed): nothing
    /// missing is created, the server is not started.
    pub suspended: bool,
}

/// Desired state of an existing row at `now`.
pub fn desired_for_row(
    config: &Config,
    owner: &Owner,
    row: &subscription::Model,
    now: DateTime<Utc>,
) -> Desired {
    let key = resource_key(&row.id);
    let lifecycle = &config.lifecycle;
    let status = row.status.as_deref();
    // A row whose status change time is unknown counts from now: the longer wait.
    let in_status = row
        .status_changed_at
        .map(|since| (now - since).to_std().unwrap_or_default())
        .unwrap_or_default();
    let hours = |h: u64| Duration::from_secs(h.saturating_mul(3600));
    let mut recheck_after = None;
    let suspended = match lifecycle.policy(status) {
        Policy::Run => Some(false),
        Policy::Grace => {
            let grace = hours(lifecycle.grace_period_hours);
            recheck_after = grace.checked_sub(in_status).filter(|d| !d.is_zero());
            Some(recheck_after.is_none())
        }
        Policy::Suspend => Some(true),
        Policy::Delete => {
            let delay = hours(lifecycle.deletion_delay_hours);
            recheck_after = delay.checked_sub(in_status).filter(|d| !d.is_zero());
            // Suspended while the deletion delay runs.
            recheck_after.map(|_| true)
        }
        Policy::Hold => None,
    };
    let want = match (lifecycle.policy(status), suspended) {
        (Policy::Hold, _) => Want::Hold(match status {
            None => "status: NULL is not a subscription status; held (nothing is created or deleted) until the row has a status the lifecycle policy maps".to_string(),
            Some(status) => format!(
                "status: {:?} is not mapped by the lifecycle policy (run: {}; grace: {}; suspend: {}; delete: {}); held: nothing is created or deleted",
                bounded(status, 64),
                lifecycle.run.join(", "),
                lifecycle.grace.join(", "),
                lifecycle.suspend.join(", "),
                lifecycle.delete.join(", ")
            ),
        }),
        (_, None) => Want::Nothing,
        (_, Some(suspended)) => match row.plan.as_deref() {
            None => Want::Invalid("plan: missing (NULL)".into()),
            Some(plan_name) => match config.plans.get(plan_name) {
                None => Want::Invalid(format!(
                    "plan: {:?} is not a configured plan (configured: {})",
                    bounded(plan_name, 64),
                    config.plans.keys().cloned().collect::<Vec<_>>().join(", ")
                )),
                Some(plan) => {
                    let (plan, firewall_rules) = shared_plan(plan);
                    Want::Vps(Box::new(VpsSpec {
                        name: resource_name(config, &row.id),
                        labels: owner.labels(&key, Some(plan_name)),
                        plan_name: plan_name.to_string(),
                        plan,
                        firewall_rules,
                        suspended,
                    }))
                }
            },
        },
    };
    Desired {
        subscription_id: row.id.clone(),
        key,
        version: Some(row.desired_version),
        want,
        snapshot_before_delete: lifecycle.snapshot_before_delete,
        recheck_after,
    }
}

/// At most `max` characters of `text`, the last one `…` when it was cut (values from rows
/// can be any length).
pub fn bounded(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some(_) => match text.char_indices().nth(max.saturating_sub(1)) {
            Some((end, _)) if max > 0 => format!("{}…", &text[..end]),
            _ => String::new(),
        },
    }
}

/// A subscription id as logs show it: at most [`MAX_SHOWN_ID_CHARS`] characters.
pub fn shown_id(id: &str) -> String {
    bounded(id, MAX_SHOWN_ID_CHARS)
}

/// Desired state of a subscription whose row is gone (deleted in the database, or only
/// known from the labels of resources we own): nothing may remain.
pub fn desired_for_missing_row(config: &Config, subscription_id: &str, key: &str) -> Desired {
    Desired {
        subscription_id: subscription_id.to_string(),
        key: key.to_string(),
        version: None,
        want: Want::Nothing,
        snapshot_before_delete: config.lifecycle.snapshot_before_delete,
        recheck_after: None,
    }
}

/// Plans seen lately, each with its canonical rules: a resync judges every row, and cloning the
/// plan and canonicalising its rules for each would be most of what judging a converged row
/// allocates. Found by content, so an edited plan (or another configuration) never gets a
/// stale entry; cleared when full, so it stays small whatever passes through.
static SHARED_PLANS: Mutex<Vec<SharedPlan>> = Mutex::new(Vec::new());
const SHARED_PLANS_MAX: usize = 64;

type SharedPlan = (Arc<Plan>, Arc<[FirewallRule]>);

/// `plan` and its canonical firewall rules, as copies shared with every row on the same plan.
pub fn shared_plan(plan: &Plan) -> SharedPlan {
    let mut shared = SHARED_PLANS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((found, rules)) = shared.iter().find(|(found, _)| **found == *plan) {
        return (Arc::clone(found), Arc::clone(rules));
    }
    if shared.len() >= SHARED_PLANS_MAX {
        shared.clear();
    }
    let entry = (Arc::new(plan.clone()), Arc::from(plan_firewall_rules(plan)));
    shared.push(entry.clone());
    entry
}

/// The plan's firewall rules in wire form, canonicalised (see `canonical_rules`).
pub fn plan_firewall_rules(plan: &Plan) -> Vec<FirewallRule> {
    let rules = plan
        .firewall_rules
        .iter()
        .map(|rule| FirewallRule {
            direction: match rule.direction {
                Direction::In => FirewallDirection::In,
                Direction::Out => FirewallDirection::Out,
            },
            protocol: match rule.protocol {
                Protocol::Tcp => FirewallProtocol::Tcp,
                Protocol::Udp => FirewallProtocol::Udp,
                Protocol::Icmp => FirewallProtocol::Icmp,
                Protocol::Esp => FirewallProtocol::Esp,
                Protocol::Gre => FirewallProtocol::Gre,
            },
            port: rule.port.clone(),
            source_ips: rule.source_ips.clone(),
            destination_ips: rule.destination_ips.clone(),
            description: rule.description.clone(),
        })
        .collect();
    canonical_rules(rules)
}

/// Rules in a form where two equivalent rule sets compare equal: CIDRs in canonical text
/// (Hetzner normalises IPv6 to RFC 5952), address lists and rules sorted.
pub fn canonical_rules(rules: Vec<FirewallRule>) -> Vec<FirewallRule> {
    let mut rules: Vec<FirewallRule> = rules
        .into_iter()
        .map(|mut rule| {
            rule.source_ips = canonical_cidrs(&rule.source_ips);
            rule.destination_ips = canonical_cidrs(&rule.destination_ips);
            if rule.description.as_deref() == Some("") {
                rule.description = None;
            }
            rule
        })
        .collect();
    rules.sort_by_key(rule_sort_key);
    rules
}

type RuleSortKey = (
    FirewallDirection,
    FirewallProtocol,
    Option<String>,
    Vec<String>,
    Vec<String>,
);

fn rule_sort_key(rule: &FirewallRule) -> RuleSortKey {
    (
        rule.direction,
        rule.protocol,
        rule.port.clone(),
        rule.source_ips.clone(),
        rule.destination_ips.clone(),
    )
}

fn canonical_cidrs(cidrs: &[String]) -> Vec<String> {
    let mut out: Vec<String> = cidrs
        .iter()
        // Not a CIDR (only possible from the API side): kept verbatim, so it shows as drift.
        .map(|c| crate::config::canonical_cidr(c).unwrap_or_else(|_| c.clone()))
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        status: Option<&str>,
        hours_in_status: Option<i64>,
        now: DateTime<Utc>,
    ) -> subscription::Model {
        subscription::Model {
            user_id: Some("u".into()),
            status: status.map(str::to_owned),
            provisioning_status: "ready".into(),
            observed_version: 1,
            status_changed_at: hours_in_status.map(|h| now - chrono::Duration::hours(h)),
            ..subscription::Model::example("sub-1")
        }
    }

    /// Rows on one plan share one copy of it and its rules; an edited plan gets its own.
    #[test]
    fn rows_share_their_plan_until_it_changes() {
        let config = Config::builtin();
        let now = Utc::now();
        let owner = Owner::new("0123456789abcdef", &config);
        let spec = |config: &Config, id: &str| {
            let mut row = row(Some("active"), None, now);
            row.id = id.into();
            match desired_for_row(config, &owner, &row, now).want {
                Want::Vps(spec) => spec,
                other => panic!("{other:?}"),
            }
        };
        let (a, b) = (spec(&config, "sub-a"), spec(&config, "sub-b"));
        assert!(Arc::ptr_eq(&a.plan, &b.plan));
        assert!(Arc::ptr_eq(&a.firewall_rules, &b.firewall_rules));

        let mut edited = config.clone();
        let starter = edited.plans.get_mut("starter").unwrap();
        starter.firewall_rules[0].source_ips = vec!["2001:DB8:0:0::/64".into()];
        let c = spec(&edited, "sub-a");
        assert!(!Arc::ptr_eq(&a.plan, &c.plan));
        assert_eq!(*c.plan, edited.plans["starter"]);
        // Canonicalised: the address in RFC 5952 form.
        assert_eq!(c.firewall_rules[0].source_ips, vec!["2001:db8::/64"]);
        // The first configuration's plan is still found, unchanged.
        let d = spec(&config, "sub-c");
        assert_eq!(d.firewall_rules, a.firewall_rules);
        assert_eq!(*d.plan, config.plans["starter"]);
    }

    /// What a status wants, and for how long, at the boundaries of the grace period and the
    /// deletion delay.
    #[test]
    fn lifecycle_decision_table() {
        #[derive(Debug, PartialEq)]
        enum Got {
            Running,
            Suspended,
            Deleted,
            Held,
        }
        let mut config = Config::builtin();
        config.lifecycle.deletion_delay_hours = 24;
        let owner = Owner::new("0123456789abcdef", &config);
        let now = Utc::now();
        // (status, hours in that status, what it wants, hours until that changes)
        type Case = (Option<&'static str>, Option<i64>, Got, Option<u64>);
        let cases: [Case; 16] = [
            (Some("active"), Some(1000), Got::Running, None),
            (Some("trialing"), None, Got::Running, None),
            (Some("past_due"), Some(0), Got::Running, Some(72)),
            (Some("past_due"), Some(71), Got::Running, Some(1)),
            (Some("past_due"), Some(72), Got::Suspended, None),
            (Some("past_due"), Some(500), Got::Suspended, None),
            // Unknown entry time counts from now: the longer wait, never the shorter.
            (Some("past_due"), None, Got::Running, Some(72)),
            (Some("paused"), Some(0), Got::Suspended, None),
            (Some("unpaid"), Some(0), Got::Suspended, None),
            (Some("canceled"), Some(0), Got::Suspended, Some(24)),
            (Some("canceled"), Some(23), Got::Suspended, Some(1)),
            (Some("canceled"), Some(24), Got::Deleted, None),
            (Some("incomplete_expired"), Some(100), Got::Deleted, None),
            (Some("incomplete"), Some(100), Got::Held, None),
            (Some("Active"), Some(0), Got::Held, None),
            (None, Some(0), Got::Held, None),
        ];
        for (status, hours, expected, recheck_hours) in cases {
            let desired = desired_for_row(&config, &owner, &row(status, hours, now), now);
            let got = match &desired.want {
                Want::Vps(spec) if spec.suspended => Got::Suspended,
                Want::Vps(_) => Got::Running,
                Want::Nothing => Got::Deleted,
                Want::Hold(_) => Got::Held,
                Want::Invalid(e) => panic!("{status:?}: invalid {e}"),
            };
            assert_eq!(got, expected, "{status:?} for {hours:?} h");
            assert_eq!(
                desired.recheck_after.map(|d| d.as_secs().div_ceil(3600)),
                recheck_hours,
                "{status:?} for {hours:?} h"
            );
        }
        // Held rows say why, naming the status and the policy.
        let held = desired_for_row(&config, &owner, &row(Some("Active"), None, now), now);
        let Want::Hold(reason) = held.want else {
            panic!("held")
        };
        assert!(
            reason.contains("\"Active\"") && reason.contains("run: active, trialing"),
            "{reason}"
        );
        // A 100 kB status is not copied whole into the row.
        let huge = "x".repeat(100_000);
        let held = desired_for_row(&config, &owner, &row(Some(&huge), None, now), now);
        let Want::Hold(reason) = held.want else {
            panic!("held")
        };
        assert!(reason.len() < 1_000, "{}", reason.len());
    }

    /// The bound counts the `…`: a cut text is exactly `max` characters, never one more.
    #[test]
    fn bounded_text_never_exceeds_its_bound() {
        let long = "é".repeat(5000);
        for max in [0, 1, 2, 64, MAX_ERROR_CHARS] {
            let cut = bounded(&long, max);
            assert_eq!(cut.chars().count(), max, "{max}");
            assert!(max < 1 || cut.ends_with('…'), "{max}: {cut}");
        }
        assert_eq!(bounded("short", 5), "short");
        assert_eq!(bounded("longer", 5), "long…");
        assert_eq!(
            shown_id(&"x".repeat(100_000)).chars().count(),
            MAX_SHOWN_ID_CHARS
        );
    }

    #[test]
    fn safe_ids_are_used_verbatim() {
        assert_eq!(resource_key("sub-42"), "sub-42");
        assert_eq!(resource_key("abc123"), "abc123");
    }

    #[test]
    fn unsafe_ids_get_distinct_hashed_keys() {
        let a = resource_key("sub_1ABC");
        let b = resource_key("sub-1abc");
        assert_ne!(a, b);
        assert!(a.starts_with("sub-1abc--"), "{a}");
        assert_eq!(a, resource_key("sub_1ABC"), "deterministic");
    }

    /// The collision found in review: `CaseDup` was keyed `casedup-c9aee856`, which is also a
    /// clean id of its own. A changed id's key always holds `--`; a clean key never does.
    #[test]
    fn a_changed_id_never_takes_the_key_of_a_clean_id() {
        let changed = resource_key("CaseDup");
        assert!(changed.contains("--"), "{changed}");
        assert_ne!(
            changed,
            resource_key(&changed),
            "the key itself is not a clean id"
        );
        for clean in ["casedup-c9aee856", "a-b-c", "x", &"a".repeat(42)] {
            assert_eq!(resource_key(clean), clean);
            assert!(!resource_key(clean).contains("--"));
        }
        for unclean in ["a--b", "-a", "a-", "A", "a_b", "", &"a".repeat(43), "ä"] {
            assert!(resource_key(unclean).contains("--"), "{unclean:?}");
        }
    }

    /// Generated ids that look alike after cleaning (case, separators, length, unicode) all
    /// get distinct keys.
    #[test]
    fn colliding_looking_ids_get_distinct_keys() {
        let mut ids: Vec<String> = Vec::new();
        for base in ["casedup", "sub-1", "a"] {
            let upper = base.to_uppercase();
            for variant in [
                base.to_string(),
                upper.clone(),
                format!("{base}_"),
                format!("_{base}"),
                format!("{base}--"),
                base.replace('-', "_"),
                base.replace('-', "--"),
                format!("{base} "),
                format!("{base}.x"),
                format!("{base}-x"),
                format!("{base}ä"),
                format!("{}{}", base, "z".repeat(60)),
                format!("{}{}", base, "Z".repeat(60)),
            ] {
                ids.push(variant.clone());
                ids.push(resource_key(&variant));
            }
        }
        ids.sort();
        ids.dedup();
        let keys: std::collections::BTreeMap<String, &String> =
            ids.iter().map(|id| (resource_key(id), id)).collect();
        assert_eq!(keys.len(), ids.len(), "two ids share a key: {keys:?}");
    }

    #[test]
    fn names_are_valid_distinct_and_deterministic() {
        let config = Config::builtin();
        assert_eq!(resource_name(&config, "sub-42"), "vps-sub-42");
        assert_eq!(
            resource_name(&config, "Sub-42"),
            format!("vps-sub-42--{}", &resource_key("Sub-42")[8..])
        );
        let ids = [
            "sub_1MowQVLkdIwHu7ixeRlqHVzs",
            "sub_1mowqvlkdiwhu7ixerlqhvzs",
            "sub-1mowqvlkdiwhu7ixerlqhvzs",
            "---",
            "",
            "ünïcødé",
            &"a".repeat(200),
            &format!("{}b", "a".repeat(199)),
        ];
        let names: Vec<String> = ids.iter().map(|id| resource_name(&config, id)).collect();
        for name in &names {
            assert!(
                crate::cloud_init::is_rfc1123_label(name) && name.len() <= 63,
                "{name:?}"
            );
        }
        let distinct: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{names:?}");
        // A crash between create and persist finds the same name again.
        assert_eq!(resource_name(&config, ids[0]), names[0]);
    }

    #[test]
    fn keys_are_valid_label_values_and_short() {
        for id in [
            "x".repeat(200),
            "___".to_string(),
            "ÄÖÜ".to_string(),
            "-a-".to_string(),
            "".to_string(),
            "sub_Ab.c/d".to_string(),
        ] {
            let key = resource_key(&id);
            assert!(
                !key.is_empty() && key.len() <= MAX_KEY_LEN,
                "{id:?} -> {key:?}"
            );
            assert!(
                key.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{key}"
            );
            assert!(!key.starts_with('-') && !key.ends_with('-'), "{key}");
        }
    }

    #[test]
    fn canonical_rules_ignore_order_and_ipv6_spelling() {
        let rule = |ips: &[&str]| FirewallRule {
            direction: FirewallDirection::In,
            protocol: FirewallProtocol::Tcp,
            port: Some("22".into()),
            source_ips: ips.iter().map(|s| s.to_string()).collect(),
            destination_ips: vec![],
            description: None,
        };
        assert_eq!(
            canonical_rules(vec![rule(&["2001:0db8:0000::/32", "0.0.0.0/0"])]),
            canonical_rules(vec![rule(&["0.0.0.0/0", "2001:db8::/32"])])
        );
    }
}
