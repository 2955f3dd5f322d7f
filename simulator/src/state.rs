//! The simulated project: servers, SSH keys, firewalls, snapshot images and actions.
//!
//! Actions are not driven by a background task: each carries its start instant and duration, and
//! [`World::settle`] (called at the start of every request) applies the effects of every action
//! that has finished by then, in finishing order; [`World::forget_finished`] (also at the start
//! of every request) then drops finished actions beyond the [`Retention`] bound (running actions
//! are always kept).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};

use crate::catalog::{IMAGES, LOCATIONS, SERVER_TYPES};
use crate::control::SplitMix64;
use crate::labels::{Labels, Selector};
use crate::ssh::machine::{ServerSsh, SshWorld};
use crate::wire::{
    ActionErrorOut, ActionOut, AppliedResourceOut, AppliedToOut, CreatedFromOut, FirewallOut,
    ImageOut, ImageProtection, Ipv4Out, Ipv6Out, PublicNetOut, ResourceRef, RuleOut, SelectorOut,
    ServerFirewallOut, ServerIdOut, ServerOut, ServerProtection, SshKeyOut,
};

pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, false)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ServerStatus {
    Initializing,
    Starting,
    Running,
    Stopping,
    Off,
    Rebuilding,
    Migrating,
}

impl ServerStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ServerStatus::Initializing => "initializing",
            ServerStatus::Starting => "starting",
            ServerStatus::Running => "running",
            ServerStatus::Stopping => "stopping",
            ServerStatus::Off => "off",
            ServerStatus::Rebuilding => "rebuilding",
            ServerStatus::Migrating => "migrating",
        }
    }
}

pub(crate) struct Server {
    pub id: i64,
    pub name: String,
    pub status: ServerStatus,
    pub created: DateTime<Utc>,
    pub labels: Labels,
    pub server_type: usize,
    pub image: usize,
    pub location: usize,
    /// Disk size in GB; stays when a type change does not upgrade the disk.
    pub primary_disk_size: u32,
    pub ipv4: Option<PrimaryIp<Ipv4Addr>>,
    pub ipv6: Option<PrimaryIp<Ipv6Addr>>,
    /// Kept like Hetzner keeps it (reused by rebuild); never logged or returned.
    pub user_data: Option<String>,
    pub ssh_keys: Vec<i64>,
    /// The server's side of the simulated SSH endpoint (`None` when the endpoint is off).
    pub ssh: Option<ServerSsh>,
}

/// A public address and the ID of the Primary IP holding it. The API reports that ID as
/// `public_net.ipv4.id` / `ipv6.id`, and hcloud-python reads it unconditionally; Primary IPs
/// themselves are not simulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PrimaryIp<A> {
    pub id: i64,
    pub addr: A,
}

pub(crate) struct SshKey {
    pub id: i64,
    pub name: String,
    pub fingerprint: String,
    pub public_key: String,
    pub labels: Labels,
    pub created: DateTime<Utc>,
}

/// A snapshot image taken of a server (`POST /servers/{id}/actions/create_image`). It is
/// independent of the server: deleting the server keeps it.
pub(crate) struct Snapshot {
    pub id: i64,
    pub description: String,
    pub labels: Labels,
    pub created: DateTime<Utc>,
    /// The server's ID and its name when the snapshot was taken.
    pub created_from: (i64, String),
    /// Catalog index of the server's image (OS flavor, version, architecture).
    pub base_image: usize,
    /// GB of the disk the snapshot holds.
    pub disk_size: u32,
    /// The `create_image` action, while it runs.
    pub creating_action: Option<i64>,
    /// The `create_image` action ended in `error`: the image stays, `unavailable`.
    pub failed: bool,
}

impl Snapshot {
    pub(crate) fn status(&self) -> &'static str {
        match (self.creating_action, self.failed) {
            (Some(_), _) => "creating",
            (None, false) => "available",
            (None, true) => "unavailable",
        }
    }

    /// GB stored: what the disk holds (compressed), not the disk size; a plausible figure.
    pub(crate) fn image_size(&self) -> f64 {
        ((f64::from(self.disk_size) * 0.04 + 1.1) * 100.0).round() / 100.0
    }

    pub(crate) fn out(&self) -> ImageOut {
        let base = &IMAGES[self.base_image];
        ImageOut {
            id: self.id,
            kind: "snapshot",
            status: self.status(),
            name: None,
            description: self.description.clone(),
            image_size: Some(self.image_size()),
            disk_size: f64::from(self.disk_size),
            created: rfc3339(self.created),
            created_from: Some(CreatedFromOut {
                id: self.created_from.0,
                name: self.created_from.1.clone(),
            }),
            bound_to: None,
            os_flavor: base.os_flavor.to_string(),
            os_version: Some(base.os_version.to_string()),
            rapid_deploy: false,
            protection: ImageProtection { delete: false },
            deprecated: None,
            deleted: None,
            labels: self.labels.clone(),
            architecture: base.architecture,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Target {
    Server(i64),
    Selector { raw: String, parsed: Selector },
}

impl Target {
    pub(crate) fn same_as(&self, other: &Target) -> bool {
        match (self, other) {
            (Target::Server(a), Target::Server(b)) => a == b,
            (Target::Selector { raw: a, .. }, Target::Selector { raw: b, .. }) => a == b,
            _ => false,
        }
    }
}

/// A firewall applied to a server or label selector. `apply_action` is set while the
/// `apply_firewall` action runs (status `pending`), `removal_action` while `remove_firewall` runs.
pub(crate) struct Application {
    pub target: Target,
    pub apply_action: Option<i64>,
    pub removal_action: Option<i64>,
}

/// See [`World::firewall_index`].
#[derive(Default)]
pub(crate) struct FirewallIndex<'w> {
    /// By server id: the firewalls applied to it directly, in firewall id order.
    direct: std::collections::HashMap<i64, Vec<(i64, &'w Application)>>,
    /// Every label-selector application, in firewall id order.
    by_selector: Vec<(i64, &'w Selector, &'w Application)>,
}

pub(crate) struct Firewall {
    pub id: i64,
    pub name: String,
    pub labels: Labels,
    pub created: DateTime<Utc>,
    pub rules: Vec<RuleOut>,
    pub applied: Vec<Application>,
}

/// What an action does to the world when it finishes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Effect {
    None,
    ServerStatus {
        server: i64,
        success: ServerStatus,
        failure: ServerStatus,
    },
    FirewallApply {
        firewall: i64,
    },
    FirewallRemove {
        firewall: i64,
    },
    /// A snapshot becomes `available` (or `unavailable` when the action failed).
    ImageCreated {
        image: i64,
    },
}

pub(crate) struct Action {
    pub id: i64,
    pub command: &'static str,
    pub resources: Vec<ResourceRef>,
    pub started: DateTime<Utc>,
    pub started_at: Instant,
    pub duration: Duration,
    /// `Some` when the action is going to end in `error` (fault injection).
    pub failure: Option<ActionErrorOut>,
    pub effect: Effect,
    /// A server that counts as `locked` while this action runs.
    pub locks_server: Option<i64>,
}

impl Action {
    /// When the action finishes; `None` if that is beyond what an `Instant` can hold (never).
    pub(crate) fn due(&self) -> Option<Instant> {
        self.started_at.checked_add(self.duration)
    }

    pub(crate) fn is_done(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.started_at) >= self.duration
    }

    pub(crate) fn status(&self, now: Instant) -> &'static str {
        match (self.is_done(now), &self.failure) {
            (false, _) => "running",
            (true, None) => "success",
            (true, Some(_)) => "error",
        }
    }

    pub(crate) fn finished(&self, now: Instant) -> Option<DateTime<Utc>> {
        self.is_done(now)
            .then(|| self.started + chrono::Duration::from_std(self.duration).unwrap_or_default())
    }

    pub(crate) fn out(&self, now: Instant) -> ActionOut {
        let done = self.is_done(now);
        let progress = if done {
            100
        } else {
            let elapsed = now.saturating_duration_since(self.started_at).as_secs_f64();
            let fraction = elapsed / self.duration.as_secs_f64().max(f64::MIN_POSITIVE);
            (fraction * 100.0).clamp(0.0, 99.0) as u8
        };
        ActionOut {
            id: self.id,
            command: self.command,
            status: self.status(now),
            progress,
            started: rfc3339(self.started),
            finished: self.finished(now).map(rfc3339),
            resources: self.resources.clone(),
            error: if done { self.failure.clone() } else { None },
        }
    }

    pub(crate) fn touches(&self, kind: &str, id: i64) -> bool {
        self.resources.iter().any(|r| r.kind == kind && r.id == id)
    }
}

/// When and how requests are served; fixed per request.
pub(crate) struct Clock {
    pub now: Instant,
    pub utc: DateTime<Utc>,
}

/// How long finished actions stay readable. Running actions are never dropped; a finished one
/// goes once it finished `max_age` ago or once more than `max_finished` finished actions are
/// kept (oldest finished first). A dropped action is `not_found` everywhere, as if it had never
/// existed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retention {
    pub max_age: Duration,
    pub max_finished: usize,
    /// The count bound never drops an action finished less than this long ago: a client
    /// polling its actions every few seconds must find them, however busy the simulator is.
    pub min_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(30 * 60),
            max_finished: 10_000,
            min_age: Duration::from_secs(60),
        }
    }
}

pub(crate) struct World {
    pub action_duration: Duration,
    pub retention: Retention,
    pub servers: BTreeMap<i64, Server>,
    pub ssh_keys: BTreeMap<i64, SshKey>,
    pub firewalls: BTreeMap<i64, Firewall>,
    pub snapshots: BTreeMap<i64, Snapshot>,
    pub actions: BTreeMap<i64, Action>,
    /// Actions whose effects have not been applied yet, by the instant they finish, so settling
    /// looks only at the ones due (actions that never finish are in `locks` only).
    pending: BTreeSet<(Instant, i64)>,
    /// Servers with running actions that lock them: server ID → how many.
    locks: BTreeMap<i64, usize>,
    /// Settled actions, oldest finished first, with the instant each finished.
    finished: VecDeque<(Instant, i64)>,
    /// Public IPv4 addresses of deleted servers, reused once the fresh range is exhausted.
    released_ipv4: VecDeque<Ipv4Addr>,
    /// Running actions held by the `server_stuck_starting` fault until [`World::release_held`].
    held: BTreeSet<i64>,
    /// The server quota (`SimulatorConfig::server_limit`).
    pub server_limit: u32,
    /// The simulated SSH endpoint, when it is on ([`World::enable_ssh`]).
    pub ssh: Option<SshWorld>,
    /// First address of the public IPv4 range (198.18.0.0, or 127.1.0.0 with SSH on).
    ipv4_base: u32,
    next_server_id: i64,
    next_ssh_key_id: i64,
    next_firewall_id: i64,
    next_image_id: i64,
    next_action_id: i64,
    next_primary_ip_id: i64,
    next_ipv4: u32,
    next_ipv6: u32,
    passwords: SplitMix64,
}

/// How long a held action "runs": until released, in practice.
const HELD_FOR: Duration = Duration::from_secs(365 * 86_400);

/// Simulated IPv4 space: 198.18.0.0/15 (RFC 2544 benchmarking range).
const IPV4_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// With the SSH endpoint on: 127.1.0.0 to 127.2.255.255, loopback addresses a client on this
/// machine can dial, each telling the endpoint which server it wants (never 127.0.0.1).
const IPV4_LOOPBACK_BASE: u32 = u32::from_be_bytes([127, 1, 0, 0]);
const IPV4_SIZE: u32 = 1 << 17;

impl World {
    pub(crate) fn new(action_duration: Duration, seed: u64) -> World {
        World {
            action_duration,
            retention: Retention::default(),
            servers: BTreeMap::new(),
            ssh_keys: BTreeMap::new(),
            firewalls: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            actions: BTreeMap::new(),
            pending: BTreeSet::new(),
            locks: BTreeMap::new(),
            finished: VecDeque::new(),
            released_ipv4: VecDeque::new(),
            held: BTreeSet::new(),
            server_limit: u32::MAX,
            ssh: None,
            ipv4_base: IPV4_BASE,
            // Distinct ID ranges per kind, so a client mixing up IDs hits `not_found`.
            next_server_id: 100_001,
            next_ssh_key_id: 200_001,
            next_firewall_id: 300_001,
            // Below every catalog (system) image ID.
            next_image_id: 500_001,
            next_action_id: 1_000_001,
            next_primary_ip_id: 400_001,
            next_ipv4: 1,
            next_ipv6: 1,
            passwords: SplitMix64::new(seed ^ 0x005e_ed0f_9a55_u64),
        }
    }

    /// Turns the simulated SSH endpoint on (before any server exists): public IPv4 addresses
    /// become loopback addresses of their own, and servers get SSH state.
    pub(crate) fn enable_ssh(&mut self, ssh: SshWorld) {
        self.ssh = Some(ssh);
        self.ipv4_base = IPV4_LOOPBACK_BASE;
    }

    pub(crate) fn new_server_id(&mut self) -> i64 {
        let id = self.next_server_id;
        self.next_server_id += 1;
        id
    }

    pub(crate) fn new_ssh_key_id(&mut self) -> i64 {
        let id = self.next_ssh_key_id;
        self.next_ssh_key_id += 1;
        id
    }

    pub(crate) fn new_firewall_id(&mut self) -> i64 {
        let id = self.next_firewall_id;
        self.next_firewall_id += 1;
        id
    }

    pub(crate) fn new_image_id(&mut self) -> i64 {
        let id = self.next_image_id;
        self.next_image_id += 1;
        id
    }

    fn new_primary_ip<A>(&mut self, addr: A) -> PrimaryIp<A> {
        let id = self.next_primary_ip_id;
        self.next_primary_ip_id += 1;
        PrimaryIp { id, addr }
    }

    /// Next unused IPv4 in 198.18.0.0/15 (127.1.0.0 to 127.2.255.255 with SSH on), skipping
    /// .0 and .255 host parts; once the range is used up, addresses of deleted servers (oldest
    /// first); `None` when none is free.
    pub(crate) fn allocate_ipv4(&mut self) -> Option<PrimaryIp<Ipv4Addr>> {
        while self.next_ipv4 < IPV4_SIZE {
            let candidate = self.next_ipv4;
            self.next_ipv4 += 1;
            let last = candidate & 0xff;
            if last != 0 && last != 255 {
                return Some(self.new_primary_ip(Ipv4Addr::from(self.ipv4_base + candidate)));
            }
        }
        let addr = self.released_ipv4.pop_front()?;
        Some(self.new_primary_ip(addr))
    }

    /// Next unused /64 network: 2001:db8:<hi>:<lo>::/64.
    pub(crate) fn allocate_ipv6(&mut self) -> Option<PrimaryIp<Ipv6Addr>> {
        let n = self.next_ipv6;
        self.next_ipv6 = n.checked_add(1)?;
        let hi = u16::try_from(n >> 16).ok()?;
        let lo = (n & 0xffff) as u16;
        Some(self.new_primary_ip(Ipv6Addr::new(0x2001, 0x0db8, hi, lo, 0, 0, 0, 0)))
    }

    pub(crate) fn root_password(&mut self) -> String {
        const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
        (0..20)
            .map(|_| {
                let i = (self.passwords.next_u64() % ALPHABET.len() as u64) as usize;
                char::from(ALPHABET[i])
            })
            .collect()
    }

    /// Starts an action now; with `fail` it will end in `error`.
    pub(crate) fn start_action(
        &mut self,
        clock: &Clock,
        command: &'static str,
        resources: Vec<ResourceRef>,
        effect: Effect,
        locks_server: Option<i64>,
        fail: bool,
    ) -> i64 {
        let id = self.next_action_id;
        self.next_action_id += 1;
        let failure = fail.then(|| ActionErrorOut {
            code: "action_failed".to_string(),
            message: format!("simulated failure of {command}"),
        });
        let action = Action {
            id,
            command,
            resources,
            started: clock.utc,
            started_at: clock.now,
            duration: self.action_duration,
            failure,
            effect,
            locks_server,
        };
        if let Some(due) = action.due() {
            self.pending.insert((due, id));
        }
        if let Some(server) = locks_server {
            *self.locks.entry(server).or_insert(0) += 1;
        }
        self.actions.insert(id, action);
        id
    }

    /// Keeps a running action running (and its server locked) until [`World::release_held`].
    pub(crate) fn hold_action(&mut self, id: i64) {
        if let Some(action) = self.actions.get_mut(&id) {
            // The pending queue is ordered by finishing time: move the action in it.
            if let Some(due) = action.due() {
                self.pending.remove(&(due, id));
            }
            action.duration = HELD_FOR;
            if let Some(due) = action.due() {
                self.pending.insert((due, id));
            }
            self.held.insert(id);
        }
    }

    /// Lets every held action finish now (its effects apply at the next request).
    pub(crate) fn release_held(&mut self, now: Instant) {
        for id in std::mem::take(&mut self.held) {
            if let Some(action) = self.actions.get_mut(&id) {
                if let Some(due) = action.due() {
                    self.pending.remove(&(due, id));
                }
                action.duration = now.saturating_duration_since(action.started_at);
                if let Some(due) = action.due() {
                    self.pending.insert((due, id));
                }
            }
        }
    }

    /// Distinct firewalls applied to a server, directly or through a label selector, counting
    /// applications still pending (Hetzner's limit of 5 counts both).
    pub(crate) fn firewalls_of(&self, server: i64) -> BTreeSet<i64> {
        let Some(s) = self.servers.get(&server) else {
            return BTreeSet::new();
        };
        self.firewalls
            .values()
            .filter(|fw| {
                fw.applied.iter().any(|a| match &a.target {
                    Target::Server(id) => *id == server,
                    Target::Selector { parsed, .. } => parsed.matches(&s.labels),
                })
            })
            .map(|fw| fw.id)
            .collect()
    }

    /// How many actions are stored, and how many of those still run.
    pub(crate) fn action_counts(&self) -> (usize, usize) {
        (
            self.actions.len(),
            self.actions.len().saturating_sub(self.finished.len()),
        )
    }

    /// Drops finished actions beyond the retention bound, oldest finished first (call after
    /// `settle`, before a request runs: handlers settle again after starting actions and must
    /// still find the actions they answer with).
    pub(crate) fn forget_finished(&mut self, now: Instant) {
        while let Some(&(finished_at, id)) = self.finished.front() {
            let age = now.saturating_duration_since(finished_at);
            let too_many = self.finished.len() > self.retention.max_finished
                && age >= self.retention.min_age.min(self.retention.max_age);
            let too_old = age >= self.retention.max_age;
            if !too_many && !too_old {
                break;
            }
            self.finished.pop_front();
            self.actions.remove(&id);
        }
    }

    /// Applies the effects of all actions finished by `now`, in finishing order.
    pub(crate) fn settle(&mut self, now: Instant) {
        while let Some(&(due, id)) = self.pending.first() {
            if due > now {
                break;
            }
            self.pending.pop_first();
            let Some(action) = self.actions.get(&id) else {
                continue;
            };
            self.finished.push_back((due, id));
            if let Some(server) = action.locks_server
                && let Some(count) = self.locks.get_mut(&server)
            {
                *count -= 1;
                if *count == 0 {
                    self.locks.remove(&server);
                }
            }
            let failed = action.failure.is_some();
            match action.effect {
                Effect::None => {}
                Effect::ServerStatus {
                    server,
                    success,
                    failure,
                } => {
                    if let Some(s) = self.servers.get_mut(&server) {
                        s.status = if failed { failure } else { success };
                        // cloud-init starts when the server first runs.
                        if s.status == ServerStatus::Running
                            && let Some(ssh) = &mut s.ssh
                            && ssh.running_since.is_none()
                        {
                            ssh.running_since = Some(due);
                        }
                    }
                }
                Effect::FirewallApply { firewall } => {
                    if let Some(fw) = self.firewalls.get_mut(&firewall) {
                        if failed {
                            fw.applied.retain(|a| a.apply_action != Some(id));
                        } else {
                            for a in fw.applied.iter_mut().filter(|a| a.apply_action == Some(id)) {
                                a.apply_action = None;
                            }
                        }
                    }
                }
                Effect::ImageCreated { image } => {
                    if let Some(snapshot) = self.snapshots.get_mut(&image) {
                        snapshot.creating_action = None;
                        snapshot.failed = failed;
                    }
                }
                Effect::FirewallRemove { firewall } => {
                    if let Some(fw) = self.firewalls.get_mut(&firewall) {
                        if failed {
                            for a in fw
                                .applied
                                .iter_mut()
                                .filter(|a| a.removal_action == Some(id))
                            {
                                a.removal_action = None;
                            }
                        } else {
                            fw.applied.retain(|a| a.removal_action != Some(id));
                        }
                    }
                }
            }
        }
    }

    /// A server is locked while one of its server actions runs (call after `settle`).
    pub(crate) fn server_locked(&self, server: i64) -> bool {
        self.locks.contains_key(&server)
    }

    /// Removes a server and detaches it from every firewall.
    pub(crate) fn remove_server(&mut self, id: i64) {
        if let Some(server) = self.servers.remove(&id)
            && let Some(ipv4) = server.ipv4
        {
            self.released_ipv4.push_back(ipv4.addr);
        }
        for fw in self.firewalls.values_mut() {
            fw.applied
                .retain(|a| !matches!(a.target, Target::Server(s) if s == id));
        }
    }

    /// Which firewalls apply to the servers `wanted` picks, found once for a whole page:
    /// asking every firewall about every server rendered was 50 × 10,000 checks per page at
    /// 10,000 subscriptions, and made the simulator what limited a benchmark.
    pub(crate) fn firewall_index(&self, wanted: impl Fn(i64) -> bool) -> FirewallIndex<'_> {
        let mut index = FirewallIndex::default();
        for fw in self.firewalls.values() {
            for application in &fw.applied {
                match &application.target {
                    Target::Server(server) if wanted(*server) => {
                        let on = index.direct.entry(*server).or_default();
                        // The first application naming the server counts.
                        if on.last().is_none_or(|(id, _)| *id != fw.id) {
                            on.push((fw.id, application));
                        }
                    }
                    Target::Server(_) => {}
                    Target::Selector { parsed, .. } => {
                        index.by_selector.push((fw.id, parsed, application));
                    }
                }
            }
        }
        index
    }

    /// The firewalls on `server`'s public interface, in firewall id order. A firewall applied
    /// to the server directly shows that application's status; otherwise the first of its
    /// label selectors that matches.
    fn server_firewalls(&self, server: &Server, index: &FirewallIndex) -> Vec<ServerFirewallOut> {
        let mut found: Vec<(i64, &Application)> =
            index.direct.get(&server.id).cloned().unwrap_or_default();
        for (fw, selector, application) in &index.by_selector {
            if !found.iter().any(|(id, _)| id == fw) && selector.matches(&server.labels) {
                found.push((*fw, application));
            }
        }
        found.sort_by_key(|(id, _)| *id);
        found
            .into_iter()
            .map(|(id, application)| ServerFirewallOut {
                id,
                status: if application.apply_action.is_some() {
                    "pending"
                } else {
                    "applied"
                },
            })
            .collect()
    }

    pub(crate) fn server_out(&self, server: &Server) -> ServerOut {
        self.server_out_in(server, &self.firewall_index(|id| id == server.id))
    }

    /// [`World::server_out`] with the firewall index built once for many servers.
    pub(crate) fn server_out_in(&self, server: &Server, firewalls: &FirewallIndex) -> ServerOut {
        let server_type = &SERVER_TYPES[server.server_type];
        ServerOut {
            id: server.id,
            name: server.name.clone(),
            status: server.status.as_str(),
            created: rfc3339(server.created),
            public_net: PublicNetOut {
                ipv4: server.ipv4.map(|PrimaryIp { id, addr: ip }| {
                    let o = ip.octets();
                    Ipv4Out {
                        id,
                        ip: ip.to_string(),
                        blocked: false,
                        dns_ptr: format!(
                            "static.{}.{}.{}.{}.clients.your-server.de",
                            o[3], o[2], o[1], o[0]
                        ),
                    }
                }),
                ipv6: server.ipv6.map(|PrimaryIp { id, addr: net }| Ipv6Out {
                    id,
                    ip: format!("{net}/64"),
                    blocked: false,
                    dns_ptr: Vec::new(),
                }),
                floating_ips: Vec::new(),
                firewalls: self.server_firewalls(server, firewalls),
            },
            private_net: Vec::new(),
            server_type: server_type.out(),
            location: LOCATIONS[server.location].out(),
            image: Some(IMAGES[server.image].out()),
            iso: None,
            rescue_enabled: false,
            locked: self.server_locked(server.id),
            backup_window: None,
            outgoing_traffic: Some(0),
            ingoing_traffic: Some(0),
            included_traffic: Some(21_990_232_555_520),
            protection: ServerProtection {
                delete: false,
                rebuild: false,
            },
            labels: server.labels.clone(),
            volumes: Vec::new(),
            load_balancers: Vec::new(),
            primary_disk_size: server.primary_disk_size,
            placement_group: None,
        }
    }

    pub(crate) fn ssh_key_out(&self, key: &SshKey) -> SshKeyOut {
        SshKeyOut {
            id: key.id,
            name: key.name.clone(),
            fingerprint: key.fingerprint.clone(),
            public_key: key.public_key.clone(),
            labels: key.labels.clone(),
            created: rfc3339(key.created),
        }
    }

    pub(crate) fn firewall_out(&self, fw: &Firewall) -> FirewallOut {
        let applied_to = fw
            .applied
            .iter()
            .map(|a| match &a.target {
                Target::Server(id) => AppliedToOut {
                    kind: "server",
                    server: Some(ServerIdOut { id: *id }),
                    label_selector: None,
                    applied_to_resources: None,
                },
                Target::Selector { raw, parsed } => AppliedToOut {
                    kind: "label_selector",
                    server: None,
                    label_selector: Some(SelectorOut {
                        selector: raw.clone(),
                    }),
                    applied_to_resources: Some(
                        self.servers
                            .values()
                            .filter(|s| parsed.matches(&s.labels))
                            .map(|s| AppliedResourceOut {
                                kind: "server",
                                server: ServerIdOut { id: s.id },
                            })
                            .collect(),
                    ),
                },
            })
            .collect();
        FirewallOut {
            id: fw.id,
            name: fw.name.clone(),
            labels: fw.labels.clone(),
            created: rfc3339(fw.created),
            rules: fw.rules.clone(),
            applied_to,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_and_in_range() {
        let mut w = World::new(Duration::ZERO, 0);
        let mut seen = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for _ in 0..600 {
            let PrimaryIp { id, addr: ip } = w.allocate_ipv4().unwrap();
            let o = ip.octets();
            assert_eq!(o[0], 198);
            assert!(o[1] == 18 || o[1] == 19);
            assert!(o[3] != 0 && o[3] != 255);
            assert!(seen.insert(ip));
            assert!(ids.insert(id));
        }
        let a = w.allocate_ipv6().unwrap();
        let b = w.allocate_ipv6().unwrap();
        assert_ne!(a.addr, b.addr);
        assert_eq!(a.addr.to_string(), "2001:db8:0:1::");
        // Primary IP IDs are shared by both families.
        assert!(ids.insert(a.id) && ids.insert(b.id));
    }
}
