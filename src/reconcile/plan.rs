//! The planner: desired state + what exists -> the operations that close the gap.
//! PURE: no I/O, no clock, no randomness. Everything it decides is covered by table tests.

use crate::hcloud::{Firewall, Labels, Server, ServerStatus};

use super::desired::{Desired, VpsSpec, Want, canonical_rules};
use super::observe::{Observed, Resource};

/// What the controller last wrote on the row (the columns it owns).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowState {
    pub provisioning_status: String,
    pub server_id: Option<i64>,
    pub ssh_key_id: Option<i64>,
    pub firewall_id: Option<i64>,
    /// OpenSSH public key line of the stored key pair.
    pub public_key: Option<String>,
    /// Whether a private key is stored (sealed by us, or external).
    pub has_private_key: bool,
    /// What the stored key pair is worth, as checked by opening it.
    pub key: KeyState,
    /// When the row entered its current status.
    pub status_since: Option<chrono::DateTime<chrono::Utc>>,
    /// The error of a terminal failure recorded for the row's current version: it is not
    /// retried until the row changes.
    pub terminal_error: Option<String>,
}

/// The row's key pair, as checked by opening the sealed private key.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum KeyState {
    /// No key pair stored.
    #[default]
    Missing,
    /// Sealed by this controller, opens, and its public half is the row's public key, whose
    /// MD5 fingerprint (Hetzner's format) this is.
    Sealed { fingerprint: String },
    /// Written by someone else (the web app): the controller cannot open it and never
    /// replaces it, nor the key object at Hetzner.
    External,
    /// Sealed by this controller but cannot be opened, or does not match the public key: the
    /// customer may be locked out. Never replaced silently.
    Unusable(String),
}

/// Kind of resource, for ops that apply to any of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Server,
    SshKey,
    Firewall,
}

impl Kind {
    /// The metric label (`ssh_key`); see `noun` for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Server => "server",
            Kind::SshKey => "ssh_key",
            Kind::Firewall => "firewall",
        }
    }

    /// The kind as events and messages name it for people ("SSH key 200 (vps-web-1)").
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Server => "server",
            Kind::SshKey => "SSH key",
            Kind::Firewall => "firewall",
        }
    }
}

/// One step. Ops that create something take their inputs from the `VpsSpec` and from the
/// ids the executor already knows (observed, or created earlier in the same pass).
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Generate a key pair, seal the private key and store both on the row, before any
    /// SSH key exists at Hetzner.
    GenerateKeyPair,
    CreateSshKey,
    CreateFirewall,
    SetFirewallRules {
        firewall_id: i64,
    },
    /// Create the server with the SSH key and firewall attached.
    CreateServer,
    PowerOn {
        server_id: i64,
    },
    /// Suspend: graceful shutdown (bounded), then power off. Server, disk, key and firewall
    /// are kept.
    PowerOff {
        server_id: i64,
    },
    /// Snapshot the server (labelled for retention) before it is deleted; a snapshot of it
    /// that already exists is reused.
    SnapshotServer {
        server_id: i64,
    },
    /// Attach the subscription's firewall to `server_id`.
    ApplyFirewall {
        server_id: i64,
    },
    /// Replace the labels (our keys set, foreign keys kept).
    UpdateLabels {
        kind: Kind,
        id: i64,
        labels: Labels,
    },
    /// Report only: the plan's server type changed; resizing is not automatic.
    ReportServerTypeDrift {
        server_id: i64,
        observed: String,
        wanted: String,
    },
    DeleteServer {
        id: i64,
    },
    /// Detach from `attached_servers` first, then delete.
    DeleteFirewall {
        id: i64,
        attached_servers: Vec<i64>,
    },
    DeleteSshKey {
        id: i64,
    },
}

impl Op {
    /// The kind of resource this op changes back to what the subscription wants, if it is a
    /// drift repair (rules, attachment or labels of a resource that exists).
    pub fn repairs_drift(&self) -> Option<Kind> {
        match self {
            Op::SetFirewallRules { .. } | Op::ApplyFirewall { .. } => Some(Kind::Firewall),
            Op::UpdateLabels { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// The kind of resource this op deletes, if it deletes one.
    pub fn deletes(&self) -> Option<Kind> {
        match self {
            Op::DeleteServer { .. } => Some(Kind::Server),
            Op::DeleteFirewall { .. } => Some(Kind::Firewall),
            Op::DeleteSshKey { .. } => Some(Kind::SshKey),
            _ => None,
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::GenerateKeyPair => write!(f, "generate and seal a key pair"),
            Op::CreateSshKey => write!(f, "create the SSH key"),
            Op::CreateFirewall => write!(f, "create the firewall"),
            Op::SetFirewallRules { firewall_id } => {
                write!(f, "set the plan's rules on firewall {firewall_id}")
            }
            Op::CreateServer => write!(f, "create the server"),
            Op::PowerOn { server_id } => write!(f, "power on server {server_id}"),
            Op::PowerOff { server_id } => write!(f, "power off server {server_id} (suspend)"),
            Op::SnapshotServer { server_id } => {
                write!(f, "snapshot server {server_id} before deleting it")
            }
            Op::ApplyFirewall { server_id } => {
                write!(f, "apply the firewall to server {server_id}")
            }
            Op::UpdateLabels { kind, id, .. } => {
                write!(f, "repair the labels of {} {id}", kind.noun())
            }
            Op::ReportServerTypeDrift {
                server_id,
                observed,
                wanted,
            } => write!(
                f,
                "report: server {server_id} is {observed}, the plan says {wanted} (not resized)"
            ),
            Op::DeleteServer { id } => write!(f, "delete server {id}"),
            Op::DeleteFirewall {
                id,
                attached_servers,
            } if attached_servers.is_empty() => {
                write!(f, "delete firewall {id}")
            }
            Op::DeleteFirewall {
                id,
                attached_servers,
            } => {
                let servers: Vec<String> = attached_servers.iter().map(i64::to_string).collect();
                let noun = if servers.len() == 1 {
                    "server"
                } else {
                    "servers"
                };
                write!(
                    f,
                    "detach firewall {id} from {noun} {}, then delete it",
                    servers.join(", ")
                )
            }
            Op::DeleteSshKey { id } => write!(f, "delete SSH key {id}"),
        }
    }
}

impl Op {
    /// Ops that only report never count as pending changes.
    pub fn changes_anything(&self) -> bool {
        !matches!(self, Op::ReportServerTypeDrift { .. })
    }
}

/// The status the row should end up with once every op succeeded.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The server runs (or will once the ops' actions finish): `ready`.
    Ready,
    /// Waiting for Hetzner (server starting, stopping, ...): `provisioning`, look again soon.
    Provisioning,
    /// Nothing exists any more, or never did (canceled while `pending`): `deprovisioned`.
    Deprovisioned,
    /// Powered off and kept: `suspended`. `settled` is false while Hetzner is still busy
    /// (starting, stopping): look again soon.
    Suspended { settled: bool },
    /// The status is not understood: `held` with this reason; nothing done.
    Held(String),
    /// Nothing to do and nothing to record (already `deprovisioned`, or the row is gone).
    Unchanged,
    /// The row cannot be acted on: `failed` with this message, not retried until it changes.
    Failed(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub outcome: Outcome,
    /// The observed resources the plan keeps (duplicates of each kind are deleted).
    pub keep: Kept,
}

/// Ids of the observed resources a plan builds on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Kept {
    pub server: Option<i64>,
    pub ssh_key: Option<i64>,
    pub firewall: Option<i64>,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        self.ops.iter().any(Op::changes_anything)
    }
}

/// Computes the plan for one subscription.
pub fn plan(desired: &Desired, row: &RowState, observed: &Observed) -> Plan {
    match &desired.want {
        Want::Invalid(message) => Plan {
            ops: vec![],
            outcome: Outcome::Failed(message.clone()),
            keep: Kept::default(),
        },
        Want::Hold(reason) => Plan {
            ops: vec![],
            outcome: Outcome::Held(reason.clone()),
            keep: Kept::default(),
        },
        // Recorded as terminal for this version (a teardown too: a protected or foreign
        // server is not retried every minute): wait for the row to change or a `retry`.
        Want::Vps(_) | Want::Nothing if row.terminal_error.is_some() => Plan {
            ops: vec![],
            outcome: Outcome::Failed(row.terminal_error.clone().unwrap_or_default()),
            keep: Kept::default(),
        },
        Want::Nothing => plan_teardown(desired, row, observed),
        Want::Vps(spec) => plan_vps(spec, row, observed),
    }
}

fn plan_teardown(desired: &Desired, row: &RowState, observed: &Observed) -> Plan {
    // Servers first (they hold the firewall), then firewalls, then keys.
    let mut ops: Vec<Op> = Vec::new();
    for server in &observed.servers {
        if desired.snapshot_before_delete {
            ops.push(Op::SnapshotServer {
                server_id: server.id,
            });
        }
        ops.push(Op::DeleteServer { id: server.id });
    }
    ops.extend(observed.firewalls.iter().map(|f| Op::DeleteFirewall {
        id: f.id,
        attached_servers: attached_own_servers(f, observed),
    }));
    ops.extend(
        observed
            .ssh_keys
            .iter()
            .map(|k| Op::DeleteSshKey { id: k.id }),
    );

    let row_exists = desired.version.is_some();
    let row_holds_anything = row.server_id.is_some()
        || row.ssh_key_id.is_some()
        || row.firewall_id.is_some()
        || row.has_private_key
        || row.public_key.is_some();
    // Once a row wants nothing it ends `deprovisioned`, also when nothing was ever created
    // for it (canceled while `pending`): `pending` would say a server is still to come.
    let outcome = if !row_exists
        || (ops.is_empty() && !row_holds_anything && row.provisioning_status == "deprovisioned")
    {
        Outcome::Unchanged
    } else {
        Outcome::Deprovisioned
    };
    Plan {
        ops,
        outcome,
        keep: Kept::default(),
    }
}

fn plan_vps(spec: &VpsSpec, row: &RowState, observed: &Observed) -> Plan {
    let (server, extra_servers) = pick(&observed.servers, row.server_id, &spec.name);
    if spec.suspended {
        return plan_suspended(spec, row, observed, server);
    }
    let mut ops = Vec::new();
    let mut extras = Vec::new();

    let (ssh_key, extra_keys) = pick(&observed.ssh_keys, row.ssh_key_id, &spec.name);
    let (firewall, extra_firewalls) = pick(&observed.firewalls, row.firewall_id, &spec.name);

    // The key at Hetzner must be the public half of the pair sealed on the row; otherwise the
    // customer's private key would not open the server. Hetzner injects keys only at create
    // (or rebuild), so once a server exists a replaced key object opens nothing: never
    // "repair" the key of an existing server, fail loudly instead.
    let fail = |message: String| Plan {
        ops: vec![],
        outcome: Outcome::Failed(message),
        keep: Kept::default(),
    };
    let ssh_key = match (&row.key, ssh_key, server) {
        (KeyState::Unusable(reason), _, _) => return fail(reason.clone()),
        (KeyState::Sealed { fingerprint }, Some(key), _) if key.fingerprint == *fingerprint => {
            ops.extend(label_update(Kind::SshKey, key, &spec.labels));
            Some(key)
        }
        (KeyState::Sealed { fingerprint }, Some(key), Some(server)) => {
            return fail(format!(
                "SSH key {} at Hetzner has fingerprint {}, but the stored key pair's is {fingerprint}; \
                 server {} was created with one of them and the stored private key may not open it. \
                 Nothing was changed; see README \"Recovering a lost key pair\"",
                key.id, key.fingerprint, server.id
            ));
        }
        (KeyState::Sealed { .. }, stale, _) => {
            // No key object, or a stale one and no server yet: (re)create it.
            if let Some(stale) = stale {
                ops.push(Op::DeleteSshKey { id: stale.id });
            }
            ops.push(Op::CreateSshKey);
            None
        }
        (KeyState::External, key, server) => {
            if let Some(key) = key {
                ops.extend(label_update(Kind::SshKey, key, &spec.labels));
            } else if server.is_none() {
                return fail(
                    "ssh_private_key was not written by this controller (it cannot open it) and \
                     no SSH key object of the row exists at Hetzner: a new server could not be \
                     opened with the stored key. The controller never overwrites such a key; \
                     clear ssh_private_key to let it generate a new pair"
                        .into(),
                );
            }
            key
        }
        (KeyState::Missing, key, Some(_)) if observed.adopting => {
            // A server the web app created, without a key pair we could read: adopt as it is.
            if let Some(key) = key {
                ops.extend(label_update(Kind::SshKey, key, &spec.labels));
            }
            key
        }
        (KeyState::Missing, _, Some(server)) => {
            return fail(format!(
                "no key pair is stored on the row but server {} exists: a new key would open \
                 nothing (Hetzner injects keys only at create). Nothing was changed; see README \
                 \"Recovering a lost key pair\"",
                server.id
            ));
        }
        (KeyState::Missing, stale, None) => {
            if let Some(stale) = stale {
                ops.push(Op::DeleteSshKey { id: stale.id });
            }
            ops.push(Op::GenerateKeyPair);
            ops.push(Op::CreateSshKey);
            None
        }
    };

    match firewall {
        None => ops.push(Op::CreateFirewall),
        Some(fw) => {
            // Hetzner gives rules back canonical, so the exact comparison settles almost
            // every firewall without canonicalising (parsing every CIDR) again.
            if fw.rules.as_slice() != &*spec.firewall_rules
                && canonical_rules(fw.rules.clone()).as_slice() != &*spec.firewall_rules
            {
                ops.push(Op::SetFirewallRules { firewall_id: fw.id });
            }
            ops.extend(label_update(Kind::Firewall, fw, &spec.labels));
        }
    }

    let outcome = match server {
        None => {
            ops.push(Op::CreateServer);
            Outcome::Ready
        }
        Some(server) => {
            ops.extend(label_update(Kind::Server, server, &spec.labels));
            let applied = firewall.is_some_and(|fw| firewall_applied(fw, server));
            if !applied {
                ops.push(Op::ApplyFirewall {
                    server_id: server.id,
                });
            }
            ops.extend(type_drift(spec, server));
            match server.status {
                ServerStatus::Running => Outcome::Ready,
                ServerStatus::Off => {
                    ops.push(Op::PowerOn {
                        server_id: server.id,
                    });
                    Outcome::Ready
                }
                // Starting, stopping, migrating, ...: Hetzner is busy; look again soon.
                _ => Outcome::Provisioning,
            }
        }
    };

    // Duplicates (e.g. a retried create that went through twice) go last, once the kept
    // resources are in place.
    extras.extend(extra_servers.iter().map(|s| Op::DeleteServer { id: s.id }));
    extras.extend(extra_firewalls.iter().map(|f| Op::DeleteFirewall {
        id: f.id,
        attached_servers: attached_own_servers(f, observed),
    }));
    extras.extend(extra_keys.iter().map(|k| Op::DeleteSshKey { id: k.id }));
    ops.extend(extras);

    Plan {
        ops,
        outcome,
        keep: Kept {
            server: server.map(|s| s.id),
            ssh_key: ssh_key.map(|k| k.id),
            firewall: firewall.map(|f| f.id),
        },
    }
}

/// Suspended: the server is powered off and everything is kept as it is. Nothing missing is
/// created and nothing is deleted (not even duplicates: that waits for a `run` status); only
/// labels are repaired, so ownership stays visible.
fn plan_suspended(
    spec: &VpsSpec,
    row: &RowState,
    observed: &Observed,
    server: Option<&Server>,
) -> Plan {
    let (ssh_key, _) = pick(&observed.ssh_keys, row.ssh_key_id, &spec.name);
    let (firewall, _) = pick(&observed.firewalls, row.firewall_id, &spec.name);
    let mut ops = Vec::new();
    ops.extend(ssh_key.and_then(|k| label_update(Kind::SshKey, k, &spec.labels)));
    ops.extend(firewall.and_then(|f| label_update(Kind::Firewall, f, &spec.labels)));
    let settled = match server {
        None => true,
        Some(server) => {
            ops.extend(label_update(Kind::Server, server, &spec.labels));
            match server.status {
                ServerStatus::Off => true,
                ServerStatus::Running => {
                    ops.push(Op::PowerOff {
                        server_id: server.id,
                    });
                    true
                }
                _ => false,
            }
        }
    };
    Plan {
        ops,
        outcome: Outcome::Suspended { settled },
        keep: Kept {
            server: server.map(|s| s.id),
            ssh_key: ssh_key.map(|k| k.id),
            firewall: firewall.map(|f| f.id),
        },
    }
}

fn type_drift(spec: &VpsSpec, server: &Server) -> Option<Op> {
    (server.server_type.name != spec.plan.server_type).then(|| Op::ReportServerTypeDrift {
        server_id: server.id,
        observed: server.server_type.name.clone(),
        wanted: spec.plan.server_type.clone(),
    })
}

/// Chooses the resource to keep among those of one kind: the one whose id the row records,
/// else the one with the deterministic name, else the oldest (lowest id). The rest are
/// duplicates.
fn pick<'a, T: Resource>(
    items: &'a [T],
    row_id: Option<i64>,
    name: &str,
) -> (Option<&'a T>, Vec<&'a T>) {
    let keep = items
        .iter()
        .find(|r| Some(r.id()) == row_id)
        .or_else(|| items.iter().find(|r| r.name() == name))
        .or_else(|| items.iter().min_by_key(|r| r.id()));
    let extras = items
        .iter()
        .filter(|r| Some(r.id()) != keep.map(|k| k.id()))
        .collect();
    (keep, extras)
}

/// An `UpdateLabels` op when any of our labels is missing or differs. Foreign labels that
/// someone else put on the resource are kept.
fn label_update<T: Resource>(kind: Kind, resource: &T, wanted: &Labels) -> Option<Op> {
    let current = resource.labels();
    let in_sync = wanted.iter().all(|(k, v)| current.get(k) == Some(v));
    if in_sync {
        return None;
    }
    let mut labels = current.clone();
    labels.extend(wanted.iter().map(|(k, v)| (k.clone(), v.clone())));
    Some(Op::UpdateLabels {
        kind,
        id: resource.id(),
        labels,
    })
}

fn firewall_applied(firewall: &Firewall, server: &Server) -> bool {
    server
        .public_net
        .firewalls
        .iter()
        .any(|f| f.id == firewall.id)
        || attached_servers(firewall).contains(&server.id)
}

/// Servers the firewall is applied to directly.
fn attached_servers(firewall: &Firewall) -> Vec<i64> {
    firewall
        .applied_to
        .iter()
        .filter_map(|r| r.server.as_ref().map(|s| s.id))
        .collect()
}

/// The servers of ours to detach before deleting `firewall`. Foreign servers it protects are
/// never changed: deleting the firewall then fails with `resource_in_use`, visibly.
fn attached_own_servers(firewall: &Firewall, observed: &Observed) -> Vec<i64> {
    attached_servers(firewall)
        .into_iter()
        .filter(|id| observed.servers.iter().any(|s| s.id == *id))
        .collect()
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
