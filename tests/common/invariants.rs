//! What must hold once the controller has converged, checked from the outside: the rows in
//! the database against everything the (simulated) Hetzner project holds.
//!
//! - every subscription that wants a VPS (`active`, `trialing`) has exactly one server, SSH
//!   key and firewall carrying this installation's label and its subscription key; every
//!   other subscription has none;
//! - nothing with this installation's label exists that no row records (an orphan, a
//!   duplicate, something left of a deleted row);
//! - each row records exactly what Hetzner has: ids, IP, host name, `ready` (or
//!   `deprovisioned` with every id cleared), and the controller observed its last change;
//! - the server runs, with the row's firewall applied;
//! - the sealed private key opens (subscription id as associated data) and is the pair of
//!   the public key at Hetzner (same key blob, same fingerprint);
//! - resources that are not this installation's ([`Foreign`]) are exactly as they were.
//!
//! Each violation is one line naming the subscription or resource, so a failing run says
//! what is wrong, not only that something is.

use std::collections::{BTreeMap, BTreeSet};

use sea_orm::DatabaseConnection;
use serde_json::{Value, json};

use vps_controller::keys::{self, Sealer};

use super::process::SECRET_TOKEN;

pub const INSTALLATION_LABEL: &str = "vps-controller/installation";
pub const INSTANCE_LABEL: &str = "vps-controller/instance";
pub const SUBSCRIPTION_LABEL: &str = "vps-controller/subscription";
/// The statuses that want a VPS in the built-in lifecycle policy (README, "Safety").
pub const WANTING: [&str; 2] = ["active", "trialing"];
/// The kinds the controller manages, as the API names their lists.
pub const KINDS: [&str; 3] = ["servers", "ssh_keys", "firewalls"];

/// Everything in the simulated project, by kind (`servers`, `ssh_keys`, `firewalls`).
#[derive(Debug, Default, Clone)]
pub struct Project {
    pub by_kind: BTreeMap<&'static str, Vec<Value>>,
}

impl Project {
    /// Lists every server, SSH key and firewall (all pages, no selector), as a client would.
    pub async fn read(http: &reqwest::Client, endpoint: &str) -> Result<Project, String> {
        let mut project = Project::default();
        for kind in KINDS {
            project
                .by_kind
                .insert(kind, list(http, endpoint, kind).await?);
        }
        Ok(project)
    }

    pub fn of(&self, kind: &str) -> &[Value] {
        self.by_kind.get(kind).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Resources of `kind` carrying `installation`'s label.
    pub fn owned<'a>(
        &'a self,
        kind: &str,
        installation: &'a str,
    ) -> impl Iterator<Item = &'a Value> {
        self.of(kind)
            .iter()
            .filter(move |r| label(r, INSTALLATION_LABEL) == Some(installation))
    }

    pub fn count(&self) -> usize {
        self.by_kind.values().map(Vec::len).sum()
    }
}

/// `GET {endpoint}/{kind}`, every page.
pub async fn list(
    http: &reqwest::Client,
    endpoint: &str,
    kind: &str,
) -> Result<Vec<Value>, String> {
    let mut all = Vec::new();
    for page in 1.. {
        let response = http
            .get(format!("{endpoint}/{kind}?per_page=50&page={page}"))
            .bearer_auth(SECRET_TOKEN)
            .send()
            .await
            .map_err(|e| format!("GET /{kind}: {e}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("GET /{kind} ({status}): {e}"))?;
        let items = body[kind]
            .as_array()
            .ok_or_else(|| format!("GET /{kind} ({status}): no {kind} array: {body}"))?;
        all.extend(items.iter().cloned());
        if body["meta"]["pagination"]["next_page"].is_null() {
            return Ok(all);
        }
    }
    unreachable!("pages are finite")
}

pub fn label<'a>(resource: &'a Value, key: &str) -> Option<&'a str> {
    resource["labels"][key].as_str()
}

fn describe(kind: &str, resource: &Value) -> String {
    format!(
        "{kind} {} ({}, labels {})",
        resource["id"], resource["name"], resource["labels"]
    )
}

/// The key blob (second field) of an OpenSSH public key line.
fn blob(line: &str) -> Option<&str> {
    line.split_whitespace().nth(1)
}

/// Every violation of the invariants above (empty when converged). `installation` is this
/// database's id; `sealer` opens the controller's sealed private keys.
pub async fn violations(
    conn: &DatabaseConnection,
    http: &reqwest::Client,
    endpoint: &str,
    installation: &str,
    sealer: &Sealer,
) -> Vec<String> {
    let table = match vps_controller::db::subscriptions::all(conn).await {
        Ok(table) => table,
        Err(e) => return vec![format!("cannot read the subscriptions: {e}")],
    };
    let project = match Project::read(http, endpoint).await {
        Ok(project) => project,
        Err(e) => return vec![format!("cannot list the project: {e}")],
    };
    let mut found = Vec::new();
    for bad in &table.bad {
        found.push(format!("an unreadable row: {bad:?}"));
    }
    // Which rows record which resource, to find what no row owns.
    let mut recorded: BTreeMap<(&str, i64), &str> = BTreeMap::new();
    for row in &table.rows {
        let id = row.id.as_str();
        // The tests use clean ids, whose resource key is the id itself (README, "Ownership").
        let key = id;
        let wants = row.status.as_deref().is_some_and(|s| WANTING.contains(&s));
        let for_key = |kind: &str| -> Vec<&Value> {
            project
                .owned(kind, installation)
                .filter(|r| label(r, SUBSCRIPTION_LABEL) == Some(key))
                .collect()
        };
        let (servers, ssh_keys, firewalls) = (
            for_key("servers"),
            for_key("ssh_keys"),
            for_key("firewalls"),
        );
        if row.observed_version != row.desired_version {
            found.push(format!(
                "{id}: desired version {} was never observed (observed {})",
                row.desired_version, row.observed_version
            ));
        }
        if !wants {
            for (kind, list) in [
                ("servers", &servers),
                ("ssh_keys", &ssh_keys),
                ("firewalls", &firewalls),
            ] {
                for resource in list.iter() {
                    found.push(format!(
                        "{id} ({:?}) wants nothing, yet {} exists",
                        row.status,
                        describe(kind, resource)
                    ));
                }
            }
            // Also a row canceled before it ever had a VPS (78d3f72: `pending` would say a
            // server is still to come).
            if row.provisioning_status != "deprovisioned" {
                found.push(format!(
                    "{id} ({:?}): provisioning status {:?}, not \"deprovisioned\" ({:?})",
                    row.status, row.provisioning_status, row.provisioning_error
                ));
            }
            let leftovers = [
                ("hetzner_server_id", row.hetzner_server_id.is_some()),
                ("hetzner_ssh_key_id", row.hetzner_ssh_key_id.is_some()),
                ("hetzner_firewall_id", row.hetzner_firewall_id.is_some()),
                ("vps_ip_address", row.vps_ip_address.is_some()),
                ("ssh_private_key", row.ssh_private_key.is_some()),
            ];
            for (column, set) in leftovers {
                if set {
                    found.push(format!("{id} is deprovisioned but still records {column}"));
                }
            }
            continue;
        }

        for (kind, list) in [
            ("servers", &servers),
            ("ssh_keys", &ssh_keys),
            ("firewalls", &firewalls),
        ] {
            if list.len() != 1 {
                let ids: Vec<String> = list.iter().map(|r| r["id"].to_string()).collect();
                found.push(format!(
                    "{id} wants a VPS and has {} {kind} ({})",
                    list.len(),
                    ids.join(", ")
                ));
            }
        }
        if row.provisioning_status != "ready" {
            found.push(format!(
                "{id}: provisioning status {:?}, not \"ready\" ({:?})",
                row.provisioning_status, row.provisioning_error
            ));
        }
        for (kind, recorded_id) in [
            ("servers", row.hetzner_server_id),
            ("ssh_keys", row.hetzner_ssh_key_id),
            ("firewalls", row.hetzner_firewall_id),
        ] {
            if let Some(recorded_id) = recorded_id {
                recorded.insert((kind, recorded_id), id);
            }
        }
        let (Some(server), Some(ssh_key), Some(firewall)) =
            (servers.first(), ssh_keys.first(), firewalls.first())
        else {
            continue;
        };
        let checks = [
            (
                "hetzner_server_id",
                row.hetzner_server_id.map(|v| v.to_string()),
                server["id"].as_i64().map(|v| v.to_string()),
            ),
            (
                "hetzner_ssh_key_id",
                row.hetzner_ssh_key_id.map(|v| v.to_string()),
                ssh_key["id"].as_i64().map(|v| v.to_string()),
            ),
            (
                "hetzner_firewall_id",
                row.hetzner_firewall_id.map(|v| v.to_string()),
                firewall["id"].as_i64().map(|v| v.to_string()),
            ),
            (
                "vps_ip_address",
                row.vps_ip_address.clone(),
                server["public_net"]["ipv4"]["ip"]
                    .as_str()
                    .map(str::to_owned),
            ),
            (
                "vps_hostname",
                row.vps_hostname.clone(),
                server["name"].as_str().map(str::to_owned),
            ),
        ];
        for (column, on_row, at_hetzner) in checks {
            if on_row != at_hetzner {
                found.push(format!(
                    "{id}: {column} is {on_row:?} on the row, {at_hetzner:?} at Hetzner"
                ));
            }
        }
        if server["status"] != "running" {
            found.push(format!(
                "{id}: server {} is {}",
                server["id"], server["status"]
            ));
        }
        let applied = server["public_net"]["firewalls"]
            .as_array()
            .is_some_and(|list| {
                list.iter()
                    .any(|f| f["id"] == firewall["id"] && f["status"] == "applied")
            });
        if !applied {
            found.push(format!(
                "{id}: firewall {} is not applied to server {} ({})",
                firewall["id"], server["id"], server["public_net"]["firewalls"]
            ));
        }
        found.extend(key_problems(row, ssh_key, sealer));
    }

    let rows: BTreeMap<&str, &vps_controller::db::entities::subscription::Model> =
        table.rows.iter().map(|r| (r.id.as_str(), r)).collect();
    for kind in KINDS {
        for resource in project.owned(kind, installation) {
            let Some(id) = resource["id"].as_i64() else {
                found.push(format!("{}: no numeric id", describe(kind, resource)));
                continue;
            };
            let owner = recorded.get(&(kind, id)).copied();
            let wanted_by = label(resource, SUBSCRIPTION_LABEL)
                .and_then(|key| rows.get(key))
                .filter(|row| row.status.as_deref().is_some_and(|s| WANTING.contains(&s)));
            match (owner, wanted_by) {
                (Some(owner), Some(row)) if owner == row.id => {}
                (None, Some(row)) => found.push(format!(
                    "{} is labelled for {} but the row does not record it",
                    describe(kind, resource),
                    row.id
                )),
                _ => found.push(format!(
                    "{} carries our installation label but no row that wants it records it{}",
                    describe(kind, resource),
                    owner
                        .map(|o| format!(" (recorded by {o})"))
                        .unwrap_or_default()
                )),
            }
        }
    }
    found
}

/// The row's sealed private key opens and is the pair of the key at Hetzner.
fn key_problems(
    row: &vps_controller::db::entities::subscription::Model,
    at_hetzner: &Value,
    sealer: &Sealer,
) -> Vec<String> {
    let id = &row.id;
    let mut found = Vec::new();
    let hetzner_line = at_hetzner["public_key"].as_str().unwrap_or_default();
    let Some(sealed) = row.ssh_private_key.as_deref() else {
        return vec![format!("{id}: ready without a sealed private key")];
    };
    let private = match sealer.open(sealed, id) {
        Ok(private) => private,
        Err(e) => return vec![format!("{id}: the sealed private key does not open: {e}")],
    };
    match keys::public_blob_of_private(&private) {
        Ok(public) if Some(public.as_str()) == blob(hetzner_line) => {}
        Ok(_) => found.push(format!(
            "{id}: the stored private key is not the pair of SSH key {} at Hetzner",
            at_hetzner["id"]
        )),
        Err(e) => found.push(format!("{id}: the stored private key does not parse: {e}")),
    }
    match row.ssh_public_key.as_deref() {
        Some(line) if blob(line) == blob(hetzner_line) => match keys::md5_fingerprint(line) {
            Ok(fingerprint) if Some(fingerprint.as_str()) == at_hetzner["fingerprint"].as_str() => {
            }
            Ok(fingerprint) => found.push(format!(
                "{id}: fingerprint {fingerprint} of the row's public key, {} at Hetzner",
                at_hetzner["fingerprint"]
            )),
            Err(e) => found.push(format!("{id}: the row's public key does not parse: {e}")),
        },
        other => found.push(format!(
            "{id}: the row's public key {other:?} is not SSH key {} at Hetzner",
            at_hetzner["id"]
        )),
    }
    found
}

/// Resources that are not this installation's, made before a run: nothing the controller
/// does may change or delete them. Names never collide with the controller's
/// (`vps-<subscription>`), so a create of ours never hits them by name.
pub struct Foreign {
    /// `(kind, id)` -> the resource as it was.
    before: BTreeMap<(&'static str, i64), Value>,
}

impl Foreign {
    /// Creates, per kind: one with another app's labels, one with our instance label but
    /// another installation's id naming `subscription` (one of ours), and one labelled the
    /// way installations before installation ids did (instance label only) that no row
    /// records. Waits until the servers' create actions are over, then remembers them.
    pub async fn create(http: &reqwest::Client, endpoint: &str, subscription: &str) -> Foreign {
        let label_sets = [
            ("web", json!({"app": "website", "team": "marketing"})),
            (
                "other-install",
                json!({
                    INSTALLATION_LABEL: "0123456789abcdef",
                    INSTANCE_LABEL: "default",
                    SUBSCRIPTION_LABEL: subscription,
                }),
            ),
            (
                "legacy",
                json!({INSTANCE_LABEL: "default", SUBSCRIPTION_LABEL: subscription}),
            ),
        ];
        for (n, (name, labels)) in label_sets.iter().enumerate() {
            let pair = keys::generate_blocking(keys::KeyAlgorithm::Ed25519, "foreign")
                .expect("generate a foreign key pair");
            let bodies = [
                (
                    "ssh_keys",
                    json!({"name": format!("foreign-{name}"), "public_key": pair.public_openssh, "labels": labels}),
                ),
                (
                    "firewalls",
                    json!({"name": format!("foreign-{name}"), "labels": labels, "rules": [
                        {"direction": "in", "protocol": "tcp", "port": "443", "source_ips": ["0.0.0.0/0"]}
                    ]}),
                ),
                (
                    "servers",
                    json!({
                        "name": format!("foreign-{name}-{n}"),
                        "server_type": "cx23",
                        "image": "ubuntu-24.04",
                        "location": "fsn1",
                        "labels": labels,
                    }),
                ),
            ];
            for (kind, body) in bodies {
                let response = http
                    .post(format!("{endpoint}/{kind}"))
                    .bearer_auth(SECRET_TOKEN)
                    .json(&body)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("create a foreign {kind}: {e}"));
                assert!(
                    response.status().is_success(),
                    "create a foreign {kind}: {} {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
        }
        let deadline = tokio::time::Instant::now() + super::process::DEADLINE;
        loop {
            let project = Project::read(http, endpoint)
                .await
                .expect("list the foreign resources");
            let settled = project
                .of("servers")
                .iter()
                .all(|s| s["status"] == "running" && s["locked"] == false);
            if settled {
                let mut before = BTreeMap::new();
                for kind in KINDS {
                    for resource in project.of(kind) {
                        let id = resource["id"].as_i64().expect("numeric id");
                        before.insert((kind, id), resource.clone());
                    }
                }
                return Foreign { before };
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the foreign servers never came up: {:?}",
                project.of("servers")
            );
            tokio::time::sleep(super::process::POLL).await;
        }
    }

    pub fn len(&self) -> usize {
        self.before.len()
    }

    /// Every foreign resource that is gone or differs now, one line each.
    pub fn changes(&self, now: &Project) -> Vec<String> {
        let mut found = Vec::new();
        let current: BTreeMap<(&str, i64), &Value> = KINDS
            .iter()
            .flat_map(|kind| {
                now.of(kind)
                    .iter()
                    .filter_map(move |r| Some(((*kind, r["id"].as_i64()?), r)))
            })
            .collect();
        for ((kind, id), before) in &self.before {
            match current.get(&(*kind, *id)) {
                None => found.push(format!("foreign {} was deleted", describe(kind, before))),
                Some(after) if *after != before => found.push(format!(
                    "foreign {kind} {id} changed:\n  before {before}\n  after  {after}"
                )),
                Some(_) => {}
            }
        }
        found
    }

    /// The ids of the foreign resources, so callers can tell them from the controller's.
    pub fn ids(&self) -> BTreeSet<(&'static str, i64)> {
        self.before.keys().copied().collect()
    }
}
