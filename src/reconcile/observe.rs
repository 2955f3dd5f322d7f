//! Lists -> snapshot. One paginated list per resource kind, filtered by our instance label,
//! so observing N subscriptions costs 3 * ceil(N / 50) requests, never a GET per object.

use std::collections::{BTreeSet, HashMap};
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
    resources: Observed,
    pub taken_at: Instant,
    /// Where each subscription's resources are, so finding them costs a lookup, not a scan
    /// of the whole fleet (10,000 rows against 30,000 resources per resync).
    index: Index,
}

/// Positions in `Snapshot::resources`, by what `for_subscription` matches on.
#[derive(Clone, Debug, Default)]
struct Index {
    /// By the subscription label's value.
    by_key: HashMap<String, Vec<(Kind, usize)>>,
    /// By name, for resources without a subscription label.
    by_name: HashMap<String, Vec<(Kind, usize)>>,
    /// By id, for resources without an installation label (labelled before installation ids).
    legacy: HashMap<(Kind, i64), usize>,
}

impl Index {
    fn of(resources: &Observed) -> Index {
        let mut index = Index::default();
        let mut add = |kind: Kind, position: usize, id: i64, labels: &Labels, name: &str| {
            match labels.get(SUBSCRIPTION_LABEL) {
                Some(key) => index.by_key.entry(key.clone()).or_default(),
                None => index.by_name.entry(name.to_string()).or_default(),
            }
            .push((kind, position));
            if !labels.contains_key(INSTALLATION_LABEL) {
                index.legacy.insert((kind, id), position);
            }
        };
        for (i, r) in resources.servers.iter().enumerate() {
            add(Kind::Server, i, r.id, &r.labels, &r.name);
        }
        for (i, r) in resources.ssh_keys.iter().enumerate() {
            add(Kind::SshKey, i, r.id, &r.labels, &r.name);
        }
        for (i, r) in resources.firewalls.iter().enumerate() {
            add(Kind::Firewall, i, r.id, &r.labels, &r.name);
        }
        index
    }
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
    let resources = Observed {
        servers,
        ssh_keys,
        firewalls,
        adopting: false,
    };
    Ok(Snapshot::new(resources, taken_at))
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
    pub fn new(resources: Observed, taken_at: Instant) -> Snapshot {
        Snapshot {
            index: Index::of(&resources),
            resources,
            taken_at,
        }
    }

    /// Everything listed.
    pub fn resources(&self) -> &Observed {
        &self.resources
    }

    /// Adds the resources of `other` not already present.
    pub fn merge(&mut self, other: Observed) {
        self.resources.merge(other);
        self.index = Index::of(&self.resources);
    }

    /// Resources of the subscription with resource key `key`: those with its subscription
    /// label and, when that label is missing, those with its deterministic `name` (so a
    /// resource whose labels drifted is repaired, not treated as an orphan). A resource whose
    /// id the row records also belongs to it while it carries no installation label yet
    /// (labelled by the scheme before installation ids, possibly under an older key).
    pub fn for_subscription(&self, key: &str, name: &str, recorded: &RecordedIds) -> Observed {
        let index = &self.index;
        let mut found: Vec<(Kind, usize)> = Vec::new();
        found.extend(index.by_key.get(key).into_iter().flatten());
        found.extend(index.by_name.get(name).into_iter().flatten());
        for kind in [Kind::Server, Kind::SshKey, Kind::Firewall] {
            if let Some(id) = recorded.get(kind)
                && let Some(position) = index.legacy.get(&(kind, id))
            {
                found.push((kind, *position));
            }
        }
        // Listing order, each resource once (a legacy one may also match by key or name).
        found.sort_by_key(|(kind, position)| (*kind as u8, *position));
        found.dedup();
        self.at(&found)
    }

    /// The resources labelled with subscription key `key`.
    pub fn labelled(&self, key: &str) -> Observed {
        self.at(self.index.by_key.get(key).map_or(&[], Vec::as_slice))
    }

    /// The resources at these positions of the listing.
    fn at(&self, positions: &[(Kind, usize)]) -> Observed {
        let r = &self.resources;
        let mut observed = Observed::default();
        for &(kind, position) in positions {
            match kind {
                Kind::Server => observed.servers.extend(r.servers.get(position).cloned()),
                Kind::SshKey => observed.ssh_keys.extend(r.ssh_keys.get(position).cloned()),
                Kind::Firewall => observed
                    .firewalls
                    .extend(r.firewalls.get(position).cloned()),
            }
        }
        observed
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
