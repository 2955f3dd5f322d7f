//! Rows -> desired state. Pure: no I/O. Decides, per subscription, whether it wants a VPS
//! and what that VPS must look like, or why the row cannot be acted on.

use std::collections::BTreeMap;

use crate::config::{Config, Direction, Plan, Protocol};
use crate::db::entities::subscription;
use crate::hcloud::{FirewallDirection, FirewallProtocol, FirewallRule, Labels};

/// Label naming the controller instance that owns a resource. Resources without it are
/// never modified or deleted.
pub const INSTANCE_LABEL: &str = "vps-controller/instance";
/// Label naming the subscription (its resource key) a resource belongs to.
pub const SUBSCRIPTION_LABEL: &str = "vps-controller/subscription";
/// Label naming the plan; lets operators filter in the Hetzner console.
pub const PLAN_LABEL: &str = "vps-controller/plan";

/// Longest resource key; with a prefix of at most 20 chars and the dash the name stays <= 63.
const MAX_KEY_LEN: usize = 42;

/// The stable, Hetzner-safe form of a subscription id: a valid label value and RFC 1123
/// label fragment. Ids that are already safe are used as they are, so names stay readable;
/// any id that had to be changed gets a hash suffix so two ids never share a key.
pub fn resource_key(subscription_id: &str) -> String {
    let sanitized: String = subscription_id
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    let trimmed = sanitized.trim_matches('-');
    if trimmed == subscription_id && !trimmed.is_empty() && trimmed.len() <= MAX_KEY_LEN {
        return trimmed.to_string();
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, subscription_id.as_bytes());
    let hash: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let head: String = trimmed.chars().take(MAX_KEY_LEN - 9).collect();
    let head = head.trim_end_matches('-');
    if head.is_empty() {
        hash
    } else {
        format!("{head}-{hash}")
    }
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
}

#[derive(Clone, Debug, PartialEq)]
pub enum Want {
    /// One server, SSH key and firewall as the plan says.
    Vps(Box<VpsSpec>),
    /// No resources at all (status not active, or the row was deleted).
    Nothing,
    /// The row cannot be acted on; nothing at Hetzner is touched and the row is marked failed.
    Invalid(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct VpsSpec {
    /// Name shared by the server, SSH key and firewall.
    pub name: String,
    pub labels: Labels,
    pub plan_name: String,
    pub plan: Plan,
    /// The plan's firewall rules in wire form, canonicalised for comparison.
    pub firewall_rules: Vec<FirewallRule>,
}

/// Desired state of an existing row.
pub fn desired_for_row(config: &Config, row: &subscription::Model) -> Desired {
    let key = resource_key(&row.id);
    let active = row
        .status
        .as_ref()
        .is_some_and(|status| config.active_statuses.contains(status));
    let want = match (active, row.plan.as_deref()) {
        (false, _) => Want::Nothing,
        (true, None) => Want::Invalid("plan: missing (NULL)".into()),
        (true, Some(plan_name)) => match config.plans.get(plan_name) {
            None => Want::Invalid(format!(
                "plan: {plan_name:?} is not a configured plan (configured: {})",
                config.plans.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
            Some(plan) => Want::Vps(Box::new(VpsSpec {
                name: resource_name(config, &row.id),
                labels: owned_labels(config, &key, Some(plan_name)),
                plan_name: plan_name.to_string(),
                plan: plan.clone(),
                firewall_rules: plan_firewall_rules(plan),
            })),
        },
    };
    Desired {
        subscription_id: row.id.clone(),
        key,
        version: Some(row.desired_version),
        want,
    }
}

/// Desired state of a subscription whose row is gone (deleted in the database, or only
/// known from the labels of resources we own): nothing may remain.
pub fn desired_for_missing_row(subscription_id: &str, key: &str) -> Desired {
    Desired {
        subscription_id: subscription_id.to_string(),
        key: key.to_string(),
        version: None,
        want: Want::Nothing,
    }
}

/// The labels every resource of a subscription carries.
pub fn owned_labels(config: &Config, key: &str, plan: Option<&str>) -> Labels {
    let mut labels = BTreeMap::new();
    labels.insert(INSTANCE_LABEL.to_string(), config.instance.clone());
    labels.insert(SUBSCRIPTION_LABEL.to_string(), key.to_string());
    if let Some(plan) = plan {
        // Plan names are validated as label values by the config loader.
        labels.insert(PLAN_LABEL.to_string(), plan.to_string());
    }
    labels
}

/// Label selector matching everything this controller instance owns.
pub fn instance_selector(config: &Config) -> String {
    format!("{INSTANCE_LABEL}={}", config.instance)
}

/// Label selector matching everything owned for one subscription.
pub fn subscription_selector(config: &Config, key: &str) -> String {
    format!(
        "{INSTANCE_LABEL}={},{SUBSCRIPTION_LABEL}={key}",
        config.instance
    )
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
        assert!(a.starts_with("sub-1abc-"), "{a}");
        assert_eq!(a, resource_key("sub_1ABC"), "deterministic");
    }

    #[test]
    fn names_are_valid_distinct_and_deterministic() {
        let config = Config::builtin();
        assert_eq!(resource_name(&config, "sub-42"), "vps-sub-42");
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
