//! Table tests of the planner: every row of the decision table in one place.

use super::*;
use crate::config::Config;
use crate::hcloud::{
    FirewallResource, LocationRef, ServerFirewall, ServerFirewallStatus, ServerIpv4,
    ServerProtection, ServerPublicNet, ServerTypeRef, SshKey,
};
use crate::reconcile::desired::{self, Desired, Owner};

const ID: &str = "sub-1";
const NAME: &str = "vps-sub-1";
const SERVER: i64 = 100;
const KEY: i64 = 200;
const FIREWALL: i64 = 300;

fn config() -> Config {
    Config::builtin()
}

fn owner() -> Owner {
    Owner::new("0123456789abcdef", &config())
}

fn spec() -> VpsSpec {
    let config = config();
    let plan = config.plans["starter"].clone();
    VpsSpec {
        name: NAME.into(),
        labels: owner().labels(ID, Some("starter")),
        plan_name: "starter".into(),
        firewall_rules: desired::plan_firewall_rules(&plan).into(),
        plan: plan.into(),
        suspended: false,
    }
}

fn want_vps() -> Desired {
    Desired {
        subscription_id: ID.into(),
        key: ID.into(),
        version: Some(1),
        want: Want::Vps(Box::new(spec())),
        snapshot_before_delete: false,
        recheck_after: None,
    }
}

fn want_suspended() -> Desired {
    Desired {
        want: Want::Vps(Box::new(VpsSpec {
            suspended: true,
            ..spec()
        })),
        ..want_vps()
    }
}

fn want_nothing_with_snapshot() -> Desired {
    Desired {
        snapshot_before_delete: true,
        ..want_nothing()
    }
}

fn held() -> Desired {
    Desired {
        want: Want::Hold("status: \"Active\" is not mapped".into()),
        ..want_vps()
    }
}

fn want_nothing() -> Desired {
    Desired {
        want: Want::Nothing,
        ..want_vps()
    }
}

fn row_gone() -> Desired {
    Desired {
        version: None,
        ..want_nothing()
    }
}

fn invalid() -> Desired {
    Desired {
        want: Want::Invalid("plan: \"gold\" is not a configured plan".into()),
        ..want_vps()
    }
}

fn created() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::UNIX_EPOCH
}

fn server(id: i64, status: ServerStatus) -> Server {
    Server {
        id,
        name: NAME.into(),
        status,
        created: created(),
        labels: spec().labels,
        locked: false,
        protection: ServerProtection::default(),
        public_net: ServerPublicNet {
            ipv4: Some(ServerIpv4 {
                ip: "198.18.0.10".into(),
                blocked: false,
                dns_ptr: "static.example".into(),
            }),
            ipv6: None,
            firewalls: vec![ServerFirewall {
                id: FIREWALL,
                status: ServerFirewallStatus::Applied,
            }],
        },
        server_type: ServerTypeRef {
            id: 1,
            name: spec().plan.server_type.clone(),
        },
        location: LocationRef {
            id: 1,
            name: "fsn1".into(),
            network_zone: None,
        },
        image: None,
    }
}

fn ssh_key(id: i64) -> SshKey {
    SshKey {
        id,
        name: NAME.into(),
        fingerprint: "00:11".into(),
        public_key: "ssh-ed25519 AAAA".into(),
        labels: spec().labels,
        created: created(),
    }
}

fn firewall(id: i64) -> Firewall {
    Firewall {
        id,
        name: NAME.into(),
        labels: spec().labels,
        created: created(),
        rules: spec().firewall_rules.to_vec(),
        applied_to: vec![FirewallResource::server(SERVER)],
    }
}

fn row() -> RowState {
    RowState {
        provisioning_status: "ready".into(),
        server_id: Some(SERVER),
        ssh_key_id: Some(KEY),
        firewall_id: Some(FIREWALL),
        public_key: Some("ssh-ed25519 AAAA".into()),
        has_private_key: true,
        key: sealed(),
        status_since: None,
        terminal_error: None,
    }
}

fn sealed() -> KeyState {
    KeyState::Sealed {
        fingerprint: "00:11".into(),
    }
}

fn fresh_row() -> RowState {
    RowState {
        provisioning_status: "pending".into(),
        ..RowState::default()
    }
}

fn everything() -> Observed {
    Observed {
        servers: vec![server(SERVER, ServerStatus::Running)],
        ssh_keys: vec![ssh_key(KEY)],
        firewalls: vec![firewall(FIREWALL)],
        adopting: false,
    }
}

/// A server the web app created: no labels of ours, no firewall of ours, its own key object.
fn web_app_server() -> Observed {
    let mut server = server(SERVER, ServerStatus::Running);
    server.labels = foreign_labels();
    server.name = "customer-box".into();
    server.public_net.firewalls.clear();
    Observed {
        servers: vec![server],
        ssh_keys: vec![],
        firewalls: vec![],
        adopting: true,
    }
}

fn with(f: impl FnOnce(&mut Observed)) -> Observed {
    let mut observed = everything();
    f(&mut observed);
    observed
}

fn foreign_labels() -> Labels {
    [("team".to_string(), "billing".to_string())].into()
}

struct Case {
    name: &'static str,
    desired: Desired,
    row: RowState,
    observed: Observed,
    ops: Vec<Op>,
    outcome: Outcome,
}

fn cases() -> Vec<Case> {
    let mut other_rules = spec().firewall_rules.to_vec();
    other_rules.pop();
    let mut wrong_labels = spec().labels;
    wrong_labels.insert(desired::PLAN_LABEL.into(), "pro".into());
    let mut with_foreign = spec().labels;
    with_foreign.extend(foreign_labels());
    vec![
        Case {
            name: "new subscription: key pair first, then key, firewall, server",
            desired: want_vps(),
            row: fresh_row(),
            observed: Observed::default(),
            ops: vec![
                Op::GenerateKeyPair,
                Op::CreateSshKey,
                Op::CreateFirewall,
                Op::CreateServer,
            ],
            outcome: Outcome::Ready,
        },
        Case {
            name: "stored key pair is reused, never regenerated",
            desired: want_vps(),
            row: RowState {
                public_key: Some("ssh-ed25519 AAAA".into()),
                has_private_key: true,
                key: sealed(),
                ..fresh_row()
            },
            observed: Observed::default(),
            ops: vec![Op::CreateSshKey, Op::CreateFirewall, Op::CreateServer],
            outcome: Outcome::Ready,
        },
        Case {
            name: "converged: nothing to do",
            desired: want_vps(),
            row: row(),
            observed: everything(),
            ops: vec![],
            outcome: Outcome::Ready,
        },
        Case {
            name: "server missing: recreated",
            desired: want_vps(),
            row: row(),
            observed: with(|o| o.servers.clear()),
            ops: vec![Op::CreateServer],
            outcome: Outcome::Ready,
        },
        Case {
            name: "server off: powered on",
            desired: want_vps(),
            row: row(),
            observed: with(|o| o.servers[0].status = ServerStatus::Off),
            ops: vec![Op::PowerOn { server_id: SERVER }],
            outcome: Outcome::Ready,
        },
        Case {
            name: "server starting: wait, no ops",
            desired: want_vps(),
            row: row(),
            observed: with(|o| o.servers[0].status = ServerStatus::Initializing),
            ops: vec![],
            outcome: Outcome::Provisioning,
        },
        Case {
            name: "server stopping: wait (power on once it is off)",
            desired: want_vps(),
            row: row(),
            observed: with(|o| o.servers[0].status = ServerStatus::Stopping),
            ops: vec![],
            outcome: Outcome::Provisioning,
        },
        Case {
            name: "firewall rules differ: set_rules",
            desired: want_vps(),
            row: row(),
            observed: with(|o| o.firewalls[0].rules = other_rules.clone()),
            ops: vec![Op::SetFirewallRules {
                firewall_id: FIREWALL,
            }],
            outcome: Outcome::Ready,
        },
        Case {
            name: "firewall rules in another order: no change",
            desired: want_vps(),
            row: row(),
            observed: with(|o| o.firewalls[0].rules.reverse()),
            ops: vec![],
            outcome: Outcome::Ready,
        },
        Case {
            name: "firewall not applied: apply",
            desired: want_vps(),
            row: row(),
            observed: with(|o| {
                o.firewalls[0].applied_to.clear();
                o.servers[0].public_net.firewalls.clear();
            }),
            ops: vec![Op::ApplyFirewall { server_id: SERVER }],
            outcome: Outcome::Ready,
        },
        Case {
            name: "firewall applied as seen from the server only: fine",
            desired: want_vps(),
            row: row(),
            observed: with(|o| o.firewalls[0].applied_to.clear()),
            ops: vec![],
            outcome: Outcome::Ready,
        },
        Case {
            name: "firewall missing: created, then applied to the existing server",
            desired: want_vps(),
            row: row(),
            observed: with(|o| {
                o.firewalls.clear();
                o.servers[0].public_net.firewalls.clear();
            }),
            ops: vec![Op::CreateFirewall, Op::ApplyFirewall { server_id: SERVER }],
            outcome: Outcome::Ready,
        },
        Case {
            name: "ssh key missing: recreated from the stored key",
            desired: want_vps(),
            row: row(),
            observed: with(|o| o.ssh_keys.clear()),
            ops: vec![Op::CreateSshKey],
            outcome: Outcome::Ready,
        },
        Case {
            name: "ssh key at Hetzner is not the stored pair's, server exists: fail, touch nothing",
            desired: want_vps(),
            row: row(),
            observed: with(|o| o.ssh_keys[0].fingerprint = "ff:ff".into()),
            ops: vec![],
            outcome: Outcome::Failed(format!(
                "SSH key {KEY} at Hetzner has fingerprint ff:ff, but the stored key pair's is 00:11; \
                 server {SERVER} was created with one of them and the stored private key may not open it. \
                 Nothing was changed; see README \"Recovering a lost key pair\""
            )),
        },
        Case {
            name: "ssh key at Hetzner is not the stored pair's, no server yet: replaced",
            desired: want_vps(),
            row: row(),
            observed: with(|o| {
                o.ssh_keys[0].fingerprint = "ff:ff".into();
                o.servers.clear();
            }),
            ops: vec![
                Op::DeleteSshKey { id: KEY },
                Op::CreateSshKey,
                Op::CreateServer,
            ],
            outcome: Outcome::Ready,
        },
        Case {
            name: "private key lost while the server exists: fail, never a silent new pair",
            desired: want_vps(),
            row: RowState {
                has_private_key: false,
                key: KeyState::Missing,
                ..row()
            },
            observed: everything(),
            ops: vec![],
            outcome: Outcome::Failed(format!(
                "no key pair is stored on the row but server {SERVER} exists: a new key would open \
                 nothing (Hetzner injects keys only at create). Nothing was changed; see README \
                 \"Recovering a lost key pair\""
            )),
        },
        Case {
            name: "sealed key cannot be opened: fail, even before any server exists",
            desired: want_vps(),
            row: RowState {
                key: KeyState::Unusable("ssh_private_key cannot be opened".into()),
                ..fresh_row()
            },
            observed: Observed::default(),
            ops: vec![],
            outcome: Outcome::Failed("ssh_private_key cannot be opened".into()),
        },
        Case {
            name: "private key lost and no server: a new pair replaces the stale key object",
            desired: want_vps(),
            row: RowState {
                has_private_key: false,
                key: KeyState::Missing,
                ..row()
            },
            observed: with(|o| o.servers.clear()),
            ops: vec![
                Op::DeleteSshKey { id: KEY },
                Op::GenerateKeyPair,
                Op::CreateSshKey,
                Op::CreateServer,
            ],
            outcome: Outcome::Ready,
        },
        Case {
            name: "adopting a web-app server with its external key: labels, our firewall, no new server or key",
            desired: want_vps(),
            row: RowState {
                key: KeyState::External,
                firewall_id: None,
                ..row()
            },
            observed: web_app_server(),
            ops: vec![
                Op::CreateFirewall,
                Op::UpdateLabels {
                    kind: Kind::Server,
                    id: SERVER,
                    labels: with_foreign.clone(),
                },
                Op::ApplyFirewall { server_id: SERVER },
            ],
            outcome: Outcome::Ready,
        },
        Case {
            name: "adopting a web-app server without any stored key: adopted as it is",
            desired: want_vps(),
            row: RowState {
                key: KeyState::Missing,
                has_private_key: false,
                public_key: None,
                firewall_id: None,
                ..row()
            },
            observed: web_app_server(),
            ops: vec![
                Op::CreateFirewall,
                Op::UpdateLabels {
                    kind: Kind::Server,
                    id: SERVER,
                    labels: with_foreign.clone(),
                },
                Op::ApplyFirewall { server_id: SERVER },
            ],
            outcome: Outcome::Ready,
        },
        Case {
            name: "external key, server gone, no key object: fail, the key is never overwritten",
            desired: want_vps(),
            row: RowState {
                key: KeyState::External,
                ..row()
            },
            observed: Observed::default(),
            ops: vec![],
            outcome: Outcome::Failed(
                "ssh_private_key was not written by this controller (it cannot open it) and \
                 no SSH key object of the row exists at Hetzner: a new server could not be \
                 opened with the stored key. The controller never overwrites such a key; \
                 clear ssh_private_key to let it generate a new pair"
                    .into(),
            ),
        },
        Case {
            name: "external key, server gone, key object kept: server created with that key",
            desired: want_vps(),
            row: RowState {
                key: KeyState::External,
                ..row()
            },
            observed: with(|o| o.servers.clear()),
            ops: vec![Op::CreateServer],
            outcome: Outcome::Ready,
        },
        Case {
            name: "suspended: running server powered off, nothing else",
            desired: want_suspended(),
            row: row(),
            observed: everything(),
            ops: vec![Op::PowerOff { server_id: SERVER }],
            outcome: Outcome::Suspended { settled: true },
        },
        Case {
            name: "suspended and off: nothing to do",
            desired: want_suspended(),
            row: row(),
            observed: with(|o| o.servers[0].status = ServerStatus::Off),
            ops: vec![],
            outcome: Outcome::Suspended { settled: true },
        },
        Case {
            name: "suspended while stopping: wait",
            desired: want_suspended(),
            row: row(),
            observed: with(|o| o.servers[0].status = ServerStatus::Stopping),
            ops: vec![],
            outcome: Outcome::Suspended { settled: false },
        },
        Case {
            name: "suspended never creates what is missing, nor deletes duplicates",
            desired: want_suspended(),
            row: fresh_row(),
            observed: with(|o| {
                o.servers.clear();
                o.firewalls.push(firewall(FIREWALL + 1));
            }),
            ops: vec![],
            outcome: Outcome::Suspended { settled: true },
        },
        Case {
            name: "suspended ignores a key problem: powering off must not wait for it",
            desired: want_suspended(),
            row: RowState {
                key: KeyState::Unusable("cannot open".into()),
                ..row()
            },
            observed: everything(),
            ops: vec![Op::PowerOff { server_id: SERVER }],
            outcome: Outcome::Suspended { settled: true },
        },
        Case {
            name: "held status: nothing at all, whatever exists",
            desired: held(),
            row: row(),
            observed: everything(),
            ops: vec![],
            outcome: Outcome::Held("status: \"Active\" is not mapped".into()),
        },
        Case {
            name: "held status with nothing provisioned: nothing created",
            desired: held(),
            row: fresh_row(),
            observed: Observed::default(),
            ops: vec![],
            outcome: Outcome::Held("status: \"Active\" is not mapped".into()),
        },
        Case {
            name: "canceled with snapshot_before_delete: snapshot, then delete",
            desired: want_nothing_with_snapshot(),
            row: row(),
            observed: everything(),
            ops: vec![
                Op::SnapshotServer { server_id: SERVER },
                Op::DeleteServer { id: SERVER },
                Op::DeleteFirewall {
                    id: FIREWALL,
                    attached_servers: vec![SERVER],
                },
                Op::DeleteSshKey { id: KEY },
            ],
            outcome: Outcome::Deprovisioned,
        },
        Case {
            name: "terminal failure of this version: nothing until the row changes",
            desired: want_vps(),
            row: RowState {
                terminal_error: Some("server name taken".into()),
                ..fresh_row()
            },
            observed: Observed::default(),
            ops: vec![],
            outcome: Outcome::Failed("server name taken".into()),
        },
        Case {
            name: "terminal failure of a teardown: not retried until the row changes",
            desired: want_nothing(),
            row: RowState {
                terminal_error: Some("server 100 is protected".into()),
                ..row()
            },
            observed: everything(),
            ops: vec![],
            outcome: Outcome::Failed("server 100 is protected".into()),
        },
        Case {
            name: "teardown never detaches the firewall from foreign servers",
            desired: want_nothing(),
            row: row(),
            observed: with(|o| {
                o.firewalls[0]
                    .applied_to
                    .push(FirewallResource::server(999))
            }),
            ops: vec![
                Op::DeleteServer { id: SERVER },
                Op::DeleteFirewall {
                    id: FIREWALL,
                    attached_servers: vec![SERVER],
                },
                Op::DeleteSshKey { id: KEY },
            ],
            outcome: Outcome::Deprovisioned,
        },
        Case {
            name: "server labels differ: updated, foreign labels kept",
            desired: want_vps(),
            row: row(),
            observed: with(|o| {
                o.servers[0].labels = wrong_labels.clone();
                o.servers[0].labels.extend(foreign_labels());
            }),
            ops: vec![Op::UpdateLabels {
                kind: Kind::Server,
                id: SERVER,
                labels: with_foreign.clone(),
            }],
            outcome: Outcome::Ready,
        },
        Case {
            name: "extra foreign labels alone are no drift",
            desired: want_vps(),
            row: row(),
            observed: with(|o| o.ssh_keys[0].labels.extend(foreign_labels())),
            ops: vec![],
            outcome: Outcome::Ready,
        },
        Case {
            name: "key and firewall labels repaired too",
            desired: want_vps(),
            row: row(),
            observed: with(|o| {
                o.ssh_keys[0].labels.remove(desired::PLAN_LABEL);
                o.firewalls[0].labels.remove(desired::PLAN_LABEL);
            }),
            ops: vec![
                Op::UpdateLabels {
                    kind: Kind::SshKey,
                    id: KEY,
                    labels: spec().labels,
                },
                Op::UpdateLabels {
                    kind: Kind::Firewall,
                    id: FIREWALL,
                    labels: spec().labels,
                },
            ],
            outcome: Outcome::Ready,
        },
        Case {
            name: "server type differs from the plan: reported only",
            desired: want_vps(),
            row: row(),
            observed: with(|o| o.servers[0].server_type.name = "cx53".into()),
            ops: vec![Op::ReportServerTypeDrift {
                server_id: SERVER,
                observed: "cx53".into(),
                wanted: spec().plan.server_type.clone(),
            }],
            outcome: Outcome::Ready,
        },
        Case {
            name: "duplicate server: the one on the row is kept, the other deleted",
            desired: want_vps(),
            row: row(),
            observed: with(|o| {
                let mut twin = server(SERVER + 1, ServerStatus::Running);
                twin.name = "vps-sub-1-copy".into();
                o.servers.insert(0, twin);
            }),
            ops: vec![Op::DeleteServer { id: SERVER + 1 }],
            outcome: Outcome::Ready,
        },
        Case {
            name: "crash before the id was stored: the named server is adopted",
            desired: want_vps(),
            row: RowState {
                server_id: None,
                ..row()
            },
            observed: everything(),
            ops: vec![],
            outcome: Outcome::Ready,
        },
        Case {
            name: "canceled: server, then firewall (detached), then key",
            desired: want_nothing(),
            row: row(),
            observed: everything(),
            ops: vec![
                Op::DeleteServer { id: SERVER },
                Op::DeleteFirewall {
                    id: FIREWALL,
                    attached_servers: vec![SERVER],
                },
                Op::DeleteSshKey { id: KEY },
            ],
            outcome: Outcome::Deprovisioned,
        },
        Case {
            name: "canceled and already gone: row still cleaned",
            desired: want_nothing(),
            row: row(),
            observed: Observed::default(),
            ops: vec![],
            outcome: Outcome::Deprovisioned,
        },
        Case {
            name: "canceled before it was ever provisioned: deprovisioned, not pending forever",
            desired: want_nothing(),
            row: fresh_row(),
            observed: Observed::default(),
            ops: vec![],
            outcome: Outcome::Deprovisioned,
        },
        Case {
            name: "deprovisioned stays deprovisioned",
            desired: want_nothing(),
            row: RowState {
                provisioning_status: "deprovisioned".into(),
                ..fresh_row()
            },
            observed: Observed::default(),
            ops: vec![],
            outcome: Outcome::Unchanged,
        },
        Case {
            name: "row deleted: orphans removed, nothing written",
            desired: row_gone(),
            row: RowState::default(),
            observed: with(|o| o.firewalls[0].applied_to.clear()),
            ops: vec![
                Op::DeleteServer { id: SERVER },
                Op::DeleteFirewall {
                    id: FIREWALL,
                    attached_servers: vec![],
                },
                Op::DeleteSshKey { id: KEY },
            ],
            outcome: Outcome::Unchanged,
        },
        Case {
            name: "invalid row: no Hetzner call, even with resources present",
            desired: invalid(),
            row: row(),
            observed: everything(),
            ops: vec![],
            outcome: Outcome::Failed("plan: \"gold\" is not a configured plan".into()),
        },
    ]
}

#[test]
fn planner_decision_table() {
    let mut failures = Vec::new();
    for case in cases() {
        let got = plan(&case.desired, &case.row, &case.observed);
        if got.ops != case.ops || got.outcome != case.outcome {
            failures.push(format!(
                "{}\n  expected {:?} -> {:?}\n  got      {:?} -> {:?}",
                case.name, case.ops, case.outcome, got.ops, got.outcome
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_plan_keeps_the_resources_it_does_not_delete() {
    let observed = with(|o| {
        let mut twin = server(SERVER + 1, ServerStatus::Running);
        twin.name = "other".into();
        o.servers.insert(0, twin);
    });
    let got = plan(&want_vps(), &row(), &observed);
    assert_eq!(
        got.keep,
        Kept {
            server: Some(SERVER),
            ssh_key: Some(KEY),
            firewall: Some(FIREWALL)
        }
    );
    assert!(got.ops.contains(&Op::DeleteServer { id: SERVER + 1 }));
}

#[test]
fn converged_plans_report_no_changes_but_drift_reports_do() {
    assert!(!plan(&want_vps(), &row(), &everything()).has_changes());
    let drifted = with(|o| o.servers[0].server_type.name = "cx53".into());
    let report_only = plan(&want_vps(), &row(), &drifted);
    assert!(!report_only.has_changes(), "a report is not a change");
    let off = with(|o| o.servers[0].status = ServerStatus::Off);
    assert!(plan(&want_vps(), &row(), &off).has_changes());
}

#[test]
fn planning_twice_gives_the_same_plan() {
    for case in cases() {
        assert_eq!(
            plan(&case.desired, &case.row, &case.observed),
            plan(&case.desired, &case.row, &case.observed),
            "{}",
            case.name
        );
    }
}

/// A `subscriptions` row as the web app inserts it (every controller column defaulted), with
/// the spec changed once since the controller last looked (`desired_version` 2).
fn model(provisioning_status: &str) -> crate::db::entities::subscription::Model {
    crate::db::entities::subscription::Model {
        user_id: Some("user-1".into()),
        status: Some("canceled".into()),
        provisioning_status: provisioning_status.into(),
        desired_version: 2,
        observed_version: 1,
        ..crate::db::entities::subscription::Model::example(ID)
    }
}

/// Writes `update` onto `row` as `subscriptions::write_status` would.
fn apply(row: &mut crate::db::entities::subscription::Model, update: &crate::db::StatusUpdate) {
    fn set<T: Clone>(column: &mut T, value: &Option<T>) {
        if let Some(value) = value {
            *column = value.clone();
        }
    }
    set(&mut row.provisioning_status, &update.provisioning_status);
    set(&mut row.provisioning_error, &update.provisioning_error);
    set(&mut row.hetzner_server_id, &update.hetzner_server_id);
    set(&mut row.hetzner_ssh_key_id, &update.hetzner_ssh_key_id);
    set(&mut row.hetzner_firewall_id, &update.hetzner_firewall_id);
    set(&mut row.vps_ip_address, &update.vps_ip_address);
    set(&mut row.vps_hostname, &update.vps_hostname);
    set(&mut row.provisioned_at, &update.provisioned_at);
    set(&mut row.deprovisioned_at, &update.deprovisioned_at);
    set(&mut row.ssh_private_key, &update.ssh_private_key);
    set(&mut row.ssh_public_key, &update.ssh_public_key);
    set(&mut row.ssh_key_origin, &update.ssh_key_origin);
    set(&mut row.observed_version, &update.observed_version);
}

/// One pass over `row` with nothing left at Hetzner, through the same `settlement` that the
/// reconcile writes and the resync's verdict judges: the columns it would write.
fn settle_canceled(row: &crate::db::entities::subscription::Model) -> crate::db::StatusUpdate {
    let desired = Desired {
        version: Some(row.desired_version),
        ..want_nothing()
    };
    let row_state = crate::reconcile::row_state(row);
    let observed = Observed::default();
    let plan = plan(&desired, &row_state, &observed);
    assert_eq!(
        plan.ops,
        vec![],
        "{}: nothing exists to delete",
        row.provisioning_status
    );
    let progress = crate::reconcile::progress_before(&desired, &row_state, &observed, &plan);
    let context = crate::reconcile::Settle {
        desired: &desired,
        row_state: &row_state,
        ready_server: crate::reconcile::ready_server(Some(row)),
        plan: &plan,
        adopting: false,
        gate: crate::reconcile::Gate::Open,
    };
    let settlement = crate::reconcile::settlement(&context, Some(row), &progress)
        .expect("a row with a version always settles");
    assert_eq!(
        settlement.done,
        crate::reconcile::Done::Settled,
        "{}: nothing to wait for",
        row.provisioning_status
    );
    settlement.update
}

#[test]
fn a_canceled_row_with_nothing_at_hetzner_settles_deprovisioned_and_stays_there() {
    let with_ids = |status: &str| crate::db::entities::subscription::Model {
        hetzner_server_id: Some(SERVER),
        hetzner_ssh_key_id: Some(KEY),
        hetzner_firewall_id: Some(FIREWALL),
        vps_ip_address: Some("198.18.0.10".into()),
        vps_hostname: Some(NAME.into()),
        provisioned_at: Some(created()),
        ..model(status)
    };
    // (what, the row before, the provisioning_status written: None = no status write)
    let cases = [
        (
            "canceled while pending: nothing was ever created",
            model("pending"),
            Some("deprovisioned"),
        ),
        (
            "canceled while provisioning, before any id was stored",
            model("provisioning"),
            Some("deprovisioned"),
        ),
        (
            "canceled while held (status was not understood)",
            model("held"),
            Some("deprovisioned"),
        ),
        (
            "canceled while suspended with nothing running",
            model("suspended"),
            Some("deprovisioned"),
        ),
        (
            "canceled after ready, deleted at Hetzner by hand",
            with_ids("ready"),
            Some("deprovisioned"),
        ),
        (
            "already deprovisioned, spec touched again",
            crate::db::entities::subscription::Model {
                deprovisioned_at: Some(created()),
                ..model("deprovisioned")
            },
            None,
        ),
    ];
    let mut failures = Vec::new();
    for (what, mut row, expected) in cases {
        let first = settle_canceled(&row);
        if first.provisioning_status.as_deref() != expected {
            failures.push(format!(
                "{what}: provisioning_status written {:?}, expected {expected:?}",
                first.provisioning_status
            ));
            continue;
        }
        apply(&mut row, &first);
        if row.provisioning_status != "deprovisioned"
            || row.deprovisioned_at.is_none()
            || row.hetzner_server_id.is_some()
            || row.vps_ip_address.is_some()
            || row.observed_version != row.desired_version
        {
            failures.push(format!("{what}: not a clean deprovisioned row: {row:?}"));
        }
        // Terminal: the next pass (a resync, a restart) writes nothing, so the verdict is
        // `Converged` and the row is never queued again.
        let second = settle_canceled(&row);
        if !second.is_empty() {
            failures.push(format!(
                "{what}: the second pass still writes {:?}",
                second.provisioning_status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ops_read_as_people_name_things() {
    let cases = [
        (
            Op::UpdateLabels {
                kind: Kind::SshKey,
                id: KEY,
                labels: spec().labels,
            },
            "repair the labels of SSH key 200",
        ),
        (
            Op::DeleteFirewall {
                id: FIREWALL,
                attached_servers: vec![SERVER],
            },
            "detach firewall 300 from server 100, then delete it",
        ),
        (
            Op::DeleteFirewall {
                id: FIREWALL,
                attached_servers: vec![SERVER, SERVER + 1],
            },
            "detach firewall 300 from servers 100, 101, then delete it",
        ),
        (Op::DeleteSshKey { id: KEY }, "delete SSH key 200"),
    ];
    for (op, text) in cases {
        assert_eq!(op.to_string(), text);
    }
    // The metric label stays the identifier.
    assert_eq!(Kind::SshKey.as_str(), "ssh_key");
}
