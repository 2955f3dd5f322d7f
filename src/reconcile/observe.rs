//! Lists -> snapshot. One paginated list per resource kind, filtered by our instance label,
//! so observing N subscriptions costs 3 * ceil(N / 50) requests, never a GET per object.

use std::collections::BTreeSet;
use std::time::Instant;

use crate::hcloud::{Error, Firewall, HcloudApi, Labels, Server, SshKey};

use super::desired::{INSTALLATION_LABEL, SUBSCRIPTION_LABEL};
use super::plan::Kind;

impl RecordedIds {
    pub fn get(&self, kind: Kind) -> Option<i64> {
        match kind {
            Kind::Server => self.server,
            Kind::SshKey => self.ssh_key,
            Kind::Firewall => self.firewall,
        }
    }
}

/// What exists at Hetzner under our instance label, at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub resources: Observed,
    pub taken_at: Instant,
}

/// The resources of one subscription, as found in a snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub servers: Vec<Server>,
    pub ssh_keys: Vec<SshKey>,
    pub firewalls: Vec<Firewall>,
    /// The server is being adopted: the row records its id but it does not carry our labels
    /// yet (created by the web app before this controller ran).
    pub adopting: bool,
}

/// The Hetzner ids a row records. A resource whose id the row records belongs to that row
/// whatever its labels say (adoption, and resources labelled by an older key scheme).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordedIds {
    pub server: Option<i64>,
    pub ssh_key: Option<i64>,
    pub firewall: Option<i64>,
}

impl Observed {
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.ssh_keys.is_empty() && self.firewalls.is_empty()
    }
}

/// Lists everything matching `selector` (all three kinds concurrently).
pub async fn observe<A: HcloudApi>(api: &A, selector: &str) -> Result<Snapshot, Error> {
    // Stamped before listing: anything that changed while the lists ran counts as newer.
    let taken_at = Instant::now();
    let (servers, ssh_keys, firewalls) = futures::try_join!(
        api.list_servers(selector),
        api.list_ssh_keys(selector),
        api.list_firewalls(selector),
    )?;
    Ok(Snapshot {
        resources: Observed {
            servers,
            ssh_keys,
            firewalls,
            adopting: false,
        },
        taken_at,
    })
}

/// Shared view of the three resource kinds, so matching rules are written once.
pub trait Resource: Clone {
    fn id(&self) -> i64;
    fn name(&self) -> &str;
    fn labels(&self) -> &Labels;
}

macro_rules! impl_resource {
    ($($ty:ty),*) => {$(
        impl Resource for $ty {
            fn id(&self) -> i64 { self.id }
            fn name(&self) -> &str { &self.name }
            fn labels(&self) -> &Labels { &self.labels }
        }
    )*};
}
impl_resource!(Server, SshKey, Firewall);

fn matching<T: Resource>(items: &[T], keep: &impl Fn(&T) -> bool) -> Vec<T> {
    items.iter().filter(|item| keep(item)).cloned().collect()
}

impl Observed {
    /// The resources for which `keep(kind, id, labels, name)` holds.
    pub fn filter(&self, keep: impl Fn(Kind, i64, &Labels, &str) -> bool) -> Observed {
        Observed {
            servers: matching(&self.servers, &|r: &Server| {
                keep(Kind::Server, r.id, r.labels(), r.name())
            }),
            ssh_keys: matching(&self.ssh_keys, &|r: &SshKey| {
                keep(Kind::SshKey, r.id, r.labels(), r.name())
            }),
            firewalls: matching(&self.firewalls, &|r: &Firewall| {
                keep(Kind::Firewall, r.id, r.labels(), r.name())
            }),
            adopting: false,
        }
    }

    /// Adds the resources of `other` not already present (by kind and id).
    pub fn merge(&mut self, other: Observed) {
        fn add<T: Resource>(into: &mut Vec<T>, from: Vec<T>) {
            for item in from {
                if !into.iter().any(|r| r.id() == item.id()) {
                    into.push(item);
                }
            }
        }
        add(&mut self.servers, other.servers);
        add(&mut self.ssh_keys, other.ssh_keys);
        add(&mut self.firewalls, other.firewalls);
        self.adopting |= other.adopting;
    }
}

impl Snapshot {
    /// Resources of the subscription with resource key `key`: those with its subscription
    /// label and, when that label is missing, those with its deterministic `name` (so a
    /// resource whose labels drifted is repaired, not treated as an orphan). A resource whose
    /// id the row records also belongs to it while it carries no installation label yet
    /// (labelled by the scheme before installation ids, possibly under an older key).
    pub fn for_subscription(&self, key: &str, name: &str, recorded: &RecordedIds) -> Observed {
        self.resources.filter(|kind, id, labels, resource_name| {
            let legacy = !labels.contains_key(INSTALLATION_LABEL);
            (legacy && recorded.get(kind) == Some(id))
                || match labels.get(SUBSCRIPTION_LABEL) {
                    Some(value) => value == key,
                    None => resource_name == name,
                }
        })
    }

    /// Subscription keys named by the labels of the resources in this snapshot.
    pub fn subscription_keys(&self) -> BTreeSet<String> {
        let r = &self.resources;
        let servers = r.servers.iter().map(|s| s.labels());
        let keys = r.ssh_keys.iter().map(|k| k.labels());
        let firewalls = r.firewalls.iter().map(|f| f.labels());
        servers
            .chain(keys)
            .chain(firewalls)
            .filter_map(|labels| labels.get(SUBSCRIPTION_LABEL).cloned())
            .collect()
    }

    /// Resources carrying our instance label but neither a subscription label nor a name
    /// that any known subscription would use: owned by us, wanted by nobody.
    pub fn unattributed(&self, known_names: &BTreeSet<String>) -> Observed {
        self.resources.filter(|_, _, labels, name| {
            !labels.contains_key(SUBSCRIPTION_LABEL) && !known_names.contains(name)
        })
    }
}
