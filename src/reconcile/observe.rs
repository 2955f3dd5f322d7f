//! Lists -> snapshot. One paginated list per resource kind, filtered by our instance label,
//! so observing N subscriptions costs 3 * ceil(N / 50) requests, never a GET per object.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use chrono::{DateTime, Utc};
use foldhash::{HashMap, HashSet};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::hcloud::{
    Error, Firewall, FirewallResource, FirewallRule, FirewallsPage, HcloudApi, ImageRef, Labels,
    ListedPage, LocationRef, Meta, Server, ServerProtection, ServerPublicNet, ServerStatus,
    ServerTypeRef, ServersPage, SshKey, SshKeysPage,
};

mod view;

use view::{
    FirewallView, ImageView, LabelsView, LocationView, RuleView, ServerTypeView, ServerView,
    SshKeyView,
};

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
///
/// Kept compact: at 10,000 subscriptions a listing is 30,000 objects, and as sent each one
/// carries its label map, names and nested objects as strings of its own (about 4 KB per
/// subscription). Here what repeats across the listing (label keys and values, names shared
/// by a subscription's three resources, server types, locations, images, firewall rules) is
/// stored once and shared, and every resource is given back whole, exactly as listed
/// ([`Stored::load`]), when a subscription's resources are looked up. The listing is
/// compacted page by page as it arrives ([`observe`]), so it is never held whole as sent.
#[derive(Clone, Debug)]
pub struct Snapshot {
    servers: Vec<StoredServer>,
    ssh_keys: Vec<StoredSshKey>,
    firewalls: Vec<StoredFirewall>,
    pub taken_at: Instant,
    /// Where each subscription's resources are, so finding them costs a lookup, not a scan
    /// of the whole fleet (10,000 rows against 30,000 resources per resync).
    index: Index,
}

/// Positions in the snapshot's lists, by what `for_subscription` matches on.
#[derive(Clone, Debug, Default)]
struct Index {
    /// By the subscription label's value.
    by_key: HashMap<Arc<str>, Vec<(Kind, usize)>>,
    /// By name, for resources without a subscription label.
    by_name: HashMap<Arc<str>, Vec<(Kind, usize)>>,
    /// By id, for resources without an installation label (labelled before installation ids).
    legacy: HashMap<(Kind, i64), usize>,
}

impl Index {
    fn of(snapshot: &Snapshot) -> Index {
        let mut index = Index::default();
        for (i, r) in snapshot.servers.iter().enumerate() {
            index.add(Kind::Server, i, r);
        }
        for (i, r) in snapshot.ssh_keys.iter().enumerate() {
            index.add(Kind::SshKey, i, r);
        }
        for (i, r) in snapshot.firewalls.iter().enumerate() {
            index.add(Kind::Firewall, i, r);
        }
        index
    }

    fn add<R: Stored>(&mut self, kind: Kind, position: usize, resource: &R) {
        match resource.label(SUBSCRIPTION_LABEL) {
            Some(key) => self.by_key.entry(Arc::clone(key)).or_default(),
            None => self.by_name.entry(Arc::clone(resource.name())).or_default(),
        }
        .push((kind, position));
        if resource.label(INSTALLATION_LABEL).is_none() {
            self.legacy.insert((kind, resource.id()), position);
        }
    }
}

/// Labels as a snapshot keeps them: sorted like [`Labels`], keys and values shared.
type StoredLabels = Arc<[(Arc<str>, Arc<str>)]>;

/// What a listing shares across its resources while it is compacted: each distinct value is
/// stored once. Dropped once the listing is in.
#[derive(Default)]
struct Interner {
    strings: HashSet<Arc<str>>,
    labels: Shared<[(Arc<str>, Arc<str>)]>,
    server_types: Shared<ServerTypeRef>,
    locations: Shared<LocationRef>,
    images: Shared<ImageRef>,
    rules: Shared<[FirewallRule]>,
    hasher: foldhash::fast::RandomState,
}

/// Shared values by a hash of the borrowed form they were read from, so a value already
/// stored (a subscription's three resources carry the same labels; the fleet shares a few
/// rule sets) is found by comparing fields, without building an owned copy to look it up.
/// Each entry keeps its hash, for when the table grows.
struct Shared<T: ?Sized>(hashbrown::HashTable<(u64, Arc<T>)>);

impl<T: ?Sized> Default for Shared<T> {
    fn default() -> Self {
        Shared(hashbrown::HashTable::new())
    }
}

impl<T: ?Sized> Shared<T> {
    fn get_or_add(
        &mut self,
        hash: u64,
        is: impl Fn(&T) -> bool,
        make: impl FnOnce() -> Arc<T>,
    ) -> Arc<T> {
        if let Some((_, found)) = self.0.find(hash, |(h, stored)| *h == hash && is(stored)) {
            return Arc::clone(found);
        }
        let made = make();
        self.0
            .insert_unique(hash, (hash, Arc::clone(&made)), |(h, _)| *h);
        made
    }
}

impl Interner {
    fn string(&mut self, value: &str) -> Arc<str> {
        if let Some(found) = self.strings.get(value) {
            return Arc::clone(found);
        }
        let made: Arc<str> = Arc::from(value);
        self.strings.insert(Arc::clone(&made));
        made
    }

    fn labels(&mut self, labels: &LabelsView) -> StoredLabels {
        let hash = self.hasher.hash_one(labels);
        let is = |stored: &[(Arc<str>, Arc<str>)]| {
            stored.len() == labels.len()
                && stored
                    .iter()
                    .zip(labels)
                    .all(|((k, v), (key, value))| **k == *key.as_str() && **v == *value.as_str())
        };
        // Taken out while strings are interned into `self`.
        let mut sets = std::mem::take(&mut self.labels);
        let found = sets.get_or_add(hash, is, || {
            labels
                .iter()
                .map(|(key, value)| (self.string(key.as_str()), self.string(value.as_str())))
                .collect()
        });
        self.labels = sets;
        found
    }

    fn server_type(&mut self, value: &ServerTypeView) -> Arc<ServerTypeRef> {
        let hash = self.hasher.hash_one(value);
        self.server_types
            .get_or_add(hash, |stored| value.is(stored), || Arc::new(value.owned()))
    }

    fn location(&mut self, value: &LocationView) -> Arc<LocationRef> {
        let hash = self.hasher.hash_one(value);
        self.locations
            .get_or_add(hash, |stored| value.is(stored), || Arc::new(value.owned()))
    }

    fn image(&mut self, value: &ImageView) -> Arc<ImageRef> {
        let hash = self.hasher.hash_one(value);
        self.images
            .get_or_add(hash, |stored| value.is(stored), || Arc::new(value.owned()))
    }

    fn rules(&mut self, rules: &[RuleView]) -> Arc<[FirewallRule]> {
        let hash = self.hasher.hash_one(rules);
        let is = |stored: &[FirewallRule]| {
            stored.len() == rules.len() && rules.iter().zip(stored).all(|(r, s)| r.is(s))
        };
        self.rules
            .get_or_add(hash, is, || rules.iter().map(RuleView::owned).collect())
    }
}

/// A listing page as decoded, holding `T`s (wire objects or views).
trait Page<T> {
    fn into_parts(self) -> (Vec<T>, Option<Meta>);
}

macro_rules! impl_page {
    ($($page:ident . $items:ident),*) => {$(
        impl<T> Page<T> for $page<T> {
            fn into_parts(self) -> (Vec<T>, Option<Meta>) {
                (self.$items, self.meta)
            }
        }
    )*};
}
impl_page!(
    ServersPage.servers,
    SshKeysPage.ssh_keys,
    FirewallsPage.firewalls
);

/// Compacts `page` onto the end of `into` and returns its `meta`. The page is read through
/// the borrowing views; one they refuse is read as the wire types, whose error names the
/// field, or, if those accept it, stored from them (through the same views).
fn store_page<'a, R: Stored>(
    page: &ListedPage<'a>,
    into: &mut Vec<R>,
    interner: &mut Interner,
) -> Result<Option<Meta>, Error>
where
    R::Page<R::View<'a>>: Deserialize<'a>,
    R::Page<R::Wire>: DeserializeOwned,
{
    if let Some(views) = page.borrowed::<R::Page<R::View<'a>>>() {
        let (views, meta) = views.into_parts();
        into.extend(views.iter().map(|view| R::store(view, interner)));
        return Ok(meta);
    }
    let (wires, meta) = page.decode::<R::Page<R::Wire>>()?.into_parts();
    store_all(into, &wires, interner);
    Ok(meta)
}

/// Compacts `wires` onto the end of `into`.
fn store_all<R: Stored>(into: &mut Vec<R>, wires: &[R::Wire], interner: &mut Interner) {
    into.extend(wires.iter().map(|wire| R::store(&R::view(wire), interner)));
}

fn load_labels(labels: &StoredLabels) -> Labels {
    labels
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

/// A resource as a snapshot keeps it.
trait Stored: Sized {
    type Wire: Resource;
    /// The wire type's form that borrows its strings from a page (module `view`).
    type View<'a>;
    /// The page type of the listing, holding wire objects or views.
    type Page<T>: Page<T>;
    fn view(wire: &Self::Wire) -> Self::View<'_>;
    /// Compacts a listed resource, sharing what repeats through `interner`.
    fn store(view: &Self::View<'_>, interner: &mut Interner) -> Self;
    fn id(&self) -> i64;
    fn name(&self) -> &Arc<str>;
    fn labels(&self) -> &StoredLabels;
    /// The resource exactly as it was listed.
    fn load(&self) -> Self::Wire;
    fn label(&self, key: &str) -> Option<&Arc<str>> {
        self.labels()
            .iter()
            .find(|(k, _)| k.as_ref() == key)
            .map(|(_, value)| value)
    }
}

/// The accessors of [`Stored`], the same for every kind (their fields share names).
macro_rules! stored_fields {
    () => {
        fn id(&self) -> i64 {
            self.id
        }
        fn name(&self) -> &Arc<str> {
            &self.name
        }
        fn labels(&self) -> &StoredLabels {
            &self.labels
        }
    };
}

// Every field of the wire types is kept: the views name each one (see `view`), so a field
// added to a wire type is a compile error there rather than lost in a snapshot.

#[derive(Clone, Debug)]
struct StoredServer {
    id: i64,
    name: Arc<str>,
    status: ServerStatus,
    created: DateTime<Utc>,
    labels: StoredLabels,
    locked: bool,
    protection: ServerProtection,
    public_net: ServerPublicNet,
    server_type: Arc<ServerTypeRef>,
    location: Arc<LocationRef>,
    image: Option<Arc<ImageRef>>,
}

impl Stored for StoredServer {
    type Wire = Server;
    type View<'a> = ServerView<'a>;
    type Page<T> = ServersPage<T>;
    fn view(server: &Server) -> ServerView<'_> {
        ServerView::of(server)
    }
    fn store(server: &ServerView, interner: &mut Interner) -> Self {
        StoredServer {
            id: server.id,
            name: interner.string(server.name.as_str()),
            status: server.status,
            created: server.created,
            labels: interner.labels(&server.labels),
            locked: server.locked,
            protection: server.protection,
            public_net: server.public_net.owned(),
            server_type: interner.server_type(&server.server_type),
            location: interner.location(&server.location),
            image: server.image.as_ref().map(|image| interner.image(image)),
        }
    }
    stored_fields!();
    fn load(&self) -> Server {
        Server {
            id: self.id,
            name: self.name.to_string(),
            status: self.status,
            created: self.created,
            labels: load_labels(&self.labels),
            locked: self.locked,
            protection: self.protection,
            public_net: self.public_net.clone(),
            server_type: ServerTypeRef::clone(&self.server_type),
            location: LocationRef::clone(&self.location),
            image: self.image.as_deref().cloned(),
        }
    }
}

#[derive(Clone, Debug)]
struct StoredSshKey {
    id: i64,
    name: Arc<str>,
    fingerprint: Box<str>,
    public_key: Box<str>,
    labels: StoredLabels,
    created: DateTime<Utc>,
}

impl Stored for StoredSshKey {
    type Wire = SshKey;
    type View<'a> = SshKeyView<'a>;
    type Page<T> = SshKeysPage<T>;
    fn view(key: &SshKey) -> SshKeyView<'_> {
        SshKeyView::of(key)
    }
    fn store(key: &SshKeyView, interner: &mut Interner) -> Self {
        StoredSshKey {
            id: key.id,
            name: interner.string(key.name.as_str()),
            fingerprint: key.fingerprint.as_str().into(),
            public_key: key.public_key.as_str().into(),
            labels: interner.labels(&key.labels),
            created: key.created,
        }
    }
    stored_fields!();
    fn load(&self) -> SshKey {
        SshKey {
            id: self.id,
            name: self.name.to_string(),
            fingerprint: self.fingerprint.to_string(),
            public_key: self.public_key.to_string(),
            labels: load_labels(&self.labels),
            created: self.created,
        }
    }
}

#[derive(Clone, Debug)]
struct StoredFirewall {
    id: i64,
    name: Arc<str>,
    labels: StoredLabels,
    created: DateTime<Utc>,
    rules: Arc<[FirewallRule]>,
    applied_to: Box<[FirewallResource]>,
}

impl Stored for StoredFirewall {
    type Wire = Firewall;
    type View<'a> = FirewallView<'a>;
    type Page<T> = FirewallsPage<T>;
    fn view(firewall: &Firewall) -> FirewallView<'_> {
        FirewallView::of(firewall)
    }
    fn store(firewall: &FirewallView, interner: &mut Interner) -> Self {
        StoredFirewall {
            id: firewall.id,
            name: interner.string(firewall.name.as_str()),
            labels: interner.labels(&firewall.labels),
            created: firewall.created,
            rules: interner.rules(&firewall.rules),
            applied_to: firewall.applied_to.as_slice().into(),
        }
    }
    stored_fields!();
    fn load(&self) -> Firewall {
        Firewall {
            id: self.id,
            name: self.name.to_string(),
            labels: load_labels(&self.labels),
            created: self.created,
            rules: self.rules.to_vec(),
            applied_to: self.applied_to.to_vec(),
        }
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

/// Lists everything matching `selector` (all three kinds concurrently), compacting each
/// page as it arrives.
pub async fn observe<A: HcloudApi>(api: &A, selector: &str) -> Result<Snapshot, Error> {
    // Stamped before listing: anything that changed while the lists ran counts as newer.
    let taken_at = Instant::now();
    let interner = Mutex::new(Interner::default());
    let lock = || interner.lock().unwrap_or_else(PoisonError::into_inner);
    let (mut servers, mut ssh_keys, mut firewalls) = (Vec::new(), Vec::new(), Vec::new());
    futures::try_join!(
        api.each_server_page(selector, |page| store_page(
            &page,
            &mut servers,
            &mut lock()
        )),
        api.each_ssh_key_page(selector, |page| store_page(
            &page,
            &mut ssh_keys,
            &mut lock()
        )),
        api.each_firewall_page(selector, |page| store_page(
            &page,
            &mut firewalls,
            &mut lock()
        )),
    )?;
    Ok(Snapshot::of(servers, ssh_keys, firewalls, taken_at))
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
}

impl Snapshot {
    /// A snapshot of `resources`, as if listed at `taken_at`.
    pub fn new(resources: Observed, taken_at: Instant) -> Snapshot {
        let mut interner = Interner::default();
        let Observed {
            servers,
            ssh_keys,
            firewalls,
            adopting: _,
        } = resources;
        let (mut stored_servers, mut stored_keys, mut stored_firewalls) =
            (Vec::new(), Vec::new(), Vec::new());
        store_all(&mut stored_servers, &servers, &mut interner);
        store_all(&mut stored_keys, &ssh_keys, &mut interner);
        store_all(&mut stored_firewalls, &firewalls, &mut interner);
        Snapshot::of(stored_servers, stored_keys, stored_firewalls, taken_at)
    }

    fn of(
        mut servers: Vec<StoredServer>,
        mut ssh_keys: Vec<StoredSshKey>,
        mut firewalls: Vec<StoredFirewall>,
        taken_at: Instant,
    ) -> Snapshot {
        servers.shrink_to_fit();
        ssh_keys.shrink_to_fit();
        firewalls.shrink_to_fit();
        let mut snapshot = Snapshot {
            servers,
            ssh_keys,
            firewalls,
            taken_at,
            index: Index::default(),
        };
        snapshot.index = Index::of(&snapshot);
        snapshot
    }

    /// How many servers, SSH keys and firewalls were listed.
    pub fn counts(&self) -> [usize; 3] {
        [
            self.servers.len(),
            self.ssh_keys.len(),
            self.firewalls.len(),
        ]
    }

    /// The listed resources for which `keep(kind, id)` holds.
    pub fn filter(&self, keep: impl Fn(Kind, i64) -> bool) -> Observed {
        fn kept<R: Stored>(items: &[R], keep: impl Fn(i64) -> bool) -> Vec<R::Wire> {
            items
                .iter()
                .filter(|r| keep(r.id()))
                .map(Stored::load)
                .collect()
        }
        Observed {
            servers: kept(&self.servers, |id| keep(Kind::Server, id)),
            ssh_keys: kept(&self.ssh_keys, |id| keep(Kind::SshKey, id)),
            firewalls: kept(&self.firewalls, |id| keep(Kind::Firewall, id)),
            adopting: false,
        }
    }

    /// Adds the resources of `other` not already present (by kind and id).
    pub fn merge(&mut self, other: Observed) {
        fn add<R: Stored>(into: &mut Vec<R>, from: Vec<R::Wire>, interner: &mut Interner) {
            for wire in from {
                if !into.iter().any(|r| r.id() == wire.id()) {
                    into.push(R::store(&R::view(&wire), interner));
                }
            }
        }
        let mut interner = Interner::default();
        add(&mut self.servers, other.servers, &mut interner);
        add(&mut self.ssh_keys, other.ssh_keys, &mut interner);
        add(&mut self.firewalls, other.firewalls, &mut interner);
        self.index = Index::of(self);
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

    /// The resources at these positions of the listing, as listed.
    fn at(&self, positions: &[(Kind, usize)]) -> Observed {
        let mut observed = Observed::default();
        for &(kind, position) in positions {
            match kind {
                Kind::Server => observed
                    .servers
                    .extend(self.servers.get(position).map(Stored::load)),
                Kind::SshKey => observed
                    .ssh_keys
                    .extend(self.ssh_keys.get(position).map(Stored::load)),
                Kind::Firewall => observed
                    .firewalls
                    .extend(self.firewalls.get(position).map(Stored::load)),
            }
        }
        observed
    }

    /// Subscription keys named by the labels of the resources in this snapshot.
    pub fn subscription_keys(&self) -> BTreeSet<String> {
        self.index
            .by_key
            .keys()
            .map(|key| key.to_string())
            .collect()
    }

    /// Resources carrying our instance label but neither a subscription label nor a name
    /// that any known subscription would use: owned by us, wanted by nobody.
    pub fn unattributed(&self, known_names: &BTreeSet<String>) -> Observed {
        let mut positions: Vec<(Kind, usize)> = self
            .index
            .by_name
            .iter()
            .filter(|(name, _)| !known_names.contains(name.as_ref()))
            .flat_map(|(_, found)| found.iter().copied())
            .collect();
        positions.sort_by_key(|(kind, position)| (*kind as u8, *position));
        self.at(&positions)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn labels(key: Option<&str>) -> serde_json::Value {
        let mut labels = json!({
            INSTALLATION_LABEL: "b1e7c0de-0000-4000-8000-000000000001",
            "vps-controller/instance": "default",
        });
        if let Some(key) = key {
            labels[SUBSCRIPTION_LABEL] = json!(key);
        }
        labels
    }

    fn server(id: i64, key: Option<&str>, name: &str) -> Server {
        serde_json::from_value(json!({
            "id": id, "name": name, "status": "running", "created": "2026-11-30T10:00:00Z",
            "labels": labels(key), "locked": false,
            "protection": {"delete": false, "rebuild": false},
            "public_net": {
                "ipv4": {"ip": format!("203.0.113.{id}"), "blocked": false, "dns_ptr": format!("static.{id}.example")},
                "ipv6": {"ip": "2001:db8::/64", "blocked": false},
                "firewalls": [{"id": 100 + id, "status": "applied"}],
            },
            "server_type": {"id": 1, "name": "cx23"},
            "location": {"id": 1, "name": "fsn1", "network_zone": "eu-central"},
            "image": {"id": 7, "name": "ubuntu-24.04", "os_flavor": "ubuntu"},
        }))
        .expect("a server")
    }

    fn ssh_key(id: i64, key: Option<&str>, name: &str) -> SshKey {
        serde_json::from_value(json!({
            "id": id, "name": name, "fingerprint": format!("aa:bb:{id:02}"),
            "public_key": format!("ssh-ed25519 AAAA{id}"), "labels": labels(key),
            "created": "2026-11-30T10:00:00Z",
        }))
        .expect("an SSH key")
    }

    fn firewall(id: i64, key: Option<&str>, name: &str) -> Firewall {
        serde_json::from_value(json!({
            "id": id, "name": name, "labels": labels(key), "created": "2026-11-30T10:00:00Z",
            "rules": [{"direction": "in", "protocol": "tcp", "port": "22",
                       "source_ips": ["0.0.0.0/0", "::/0"], "destination_ips": []}],
            "applied_to": [{"type": "server", "server": {"id": id - 100}}],
        }))
        .expect("a firewall")
    }

    fn listing() -> Observed {
        Observed {
            servers: vec![
                server(1, Some("k1"), "vps-1"),
                server(2, Some("k2"), "vps-2"),
                server(3, None, "vps-stray"),
            ],
            ssh_keys: vec![ssh_key(11, Some("k1"), "vps-1"), ssh_key(12, None, "vps-2")],
            firewalls: vec![
                firewall(101, Some("k1"), "vps-1"),
                firewall(102, Some("k2"), "vps-2"),
            ],
            adopting: false,
        }
    }

    #[test]
    fn a_snapshot_gives_back_every_resource_exactly_as_listed() {
        let listed = listing();
        let snapshot = Snapshot::new(listed.clone(), Instant::now());
        assert_eq!(snapshot.filter(|_, _| true), listed);
        assert_eq!(snapshot.counts(), [3, 2, 2]);
        let none = RecordedIds::default();
        assert_eq!(
            snapshot.for_subscription("k1", "vps-1", &none),
            Observed {
                servers: vec![listed.servers[0].clone()],
                ssh_keys: vec![listed.ssh_keys[0].clone()],
                firewalls: vec![listed.firewalls[0].clone()],
                adopting: false,
            }
        );
        // The key whose subscription label is gone is found by name.
        let two = snapshot.for_subscription("k2", "vps-2", &none);
        assert_eq!(two.ssh_keys, vec![listed.ssh_keys[1].clone()]);
        assert_eq!(
            snapshot.subscription_keys(),
            BTreeSet::from(["k1".to_string(), "k2".to_string()])
        );
        let known = BTreeSet::from(["vps-1".to_string(), "vps-2".to_string()]);
        assert_eq!(
            snapshot.unattributed(&known).servers,
            vec![listed.servers[2].clone()]
        );
    }

    #[test]
    fn what_repeats_across_a_listing_is_stored_once() {
        let snapshot = Snapshot::new(listing(), Instant::now());
        let (one, two) = (&snapshot.firewalls[0], &snapshot.firewalls[1]);
        assert!(Arc::ptr_eq(&one.rules, &two.rules), "rules");
        assert!(
            Arc::ptr_eq(&snapshot.servers[0].labels, &snapshot.ssh_keys[0].labels),
            "a subscription's label set"
        );
        assert!(
            Arc::ptr_eq(&snapshot.servers[0].name, &snapshot.firewalls[0].name),
            "a subscription's name"
        );
        assert!(Arc::ptr_eq(
            &snapshot.servers[0].server_type,
            &snapshot.servers[1].server_type
        ));
        assert!(Arc::ptr_eq(
            &snapshot.servers[0].labels[0].0,
            &snapshot.servers[1].labels[0].0
        ));
    }

    #[test]
    fn merging_adds_only_what_is_not_there() {
        let mut snapshot = Snapshot::new(listing(), Instant::now());
        let mut legacy = Observed::default();
        legacy.servers.push(server(1, Some("k1"), "vps-1"));
        legacy.servers.push(server(4, None, "vps-4"));
        snapshot.merge(legacy);
        assert_eq!(snapshot.counts(), [4, 2, 2]);
        let recorded = RecordedIds {
            server: Some(4),
            ..RecordedIds::default()
        };
        // Without an installation label it belongs to the row that records its id.
        let mut unlabelled = server(5, None, "vps-5");
        unlabelled.labels.clear();
        snapshot.merge(Observed {
            servers: vec![unlabelled.clone()],
            ..Observed::default()
        });
        let recorded_five = RecordedIds {
            server: Some(5),
            ..RecordedIds::default()
        };
        assert_eq!(
            snapshot
                .for_subscription("k9", "vps-9", &recorded_five)
                .servers,
            vec![unlabelled]
        );
        assert_eq!(
            snapshot
                .for_subscription("k4", "vps-4", &recorded)
                .servers
                .len(),
            1,
            "by name"
        );
    }

    /// Servers as Hetzner lists them, with what a reader might get wrong: fields the wire
    /// types do not read, escapes and non-ASCII text, nulls and absent optional fields, a
    /// label key given twice.
    const SERVERS_PAGE: &str = r#"{"servers": [
        {"id": 1, "name": "vps-1", "status": "running", "created": "2026-11-30T10:00:00+00:00",
         "labels": {"vps-controller/subscription": "k1", "note": "caf\u00e9 \"quoted\"", "note": "last wins"},
         "locked": false, "protection": {"delete": true, "rebuild": false},
         "public_net": {"ipv4": {"id": 9, "ip": "203.0.113.1", "blocked": false, "dns_ptr": "static.1.example"},
                        "ipv6": null, "floating_ips": [], "firewalls": [{"id": 101, "status": "pending"}]},
         "server_type": {"id": 1, "name": "cx23", "cores": 2, "prices": [{"location": "fsn1"}]},
         "location": {"id": 1, "name": "fsn1"},
         "image": null, "datacenter": {"id": 4, "name": "fsn1-dc14"}, "rescue_enabled": false},
        {"id": 2, "name": "vps-\u00fc\n2", "status": "some_new_status", "created": "2026-11-30T10:00:00Z",
         "locked": true, "protection": {"delete": false, "rebuild": true},
         "public_net": {"ipv4": null, "ipv6": {"ip": "2001:db8::/64", "blocked": true, "dns_ptr": []}},
         "server_type": {"id": 1, "name": "cx23"},
         "location": {"id": 1, "name": "fsn1", "network_zone": "eu-central"},
         "image": {"id": 7, "name": null, "os_flavor": "ubuntu", "type": "snapshot"}}
    ], "meta": {"pagination": {"page": 1, "per_page": 50, "next_page": 2}}}"#;

    const SSH_KEYS_PAGE: &str = r#"{"ssh_keys": [
        {"id": 11, "name": "vps-1", "fingerprint": "aa:bb", "public_key": "ssh-ed25519 AAAA\/x+ c\u00e9",
         "labels": {"vps-controller/subscription": "k1"}, "created": "2026-11-30T10:00:00Z"},
        {"id": 12, "name": "vps-2", "fingerprint": "cc:dd", "public_key": "ssh-ed25519 BBBB",
         "created": "2026-11-30T10:00:00Z"}
    ], "meta": null}"#;

    const FIREWALLS_PAGE: &str = r#"{"firewalls": [
        {"id": 101, "name": "vps-1", "labels": {}, "created": "2026-11-30T10:00:00Z",
         "rules": [{"direction": "in", "protocol": "tcp", "port": "22", "source_ips": ["0.0.0.0/0", "::/0"],
                    "destination_ips": [], "description": "ssh \"admin\""},
                   {"direction": "out", "protocol": "icmp", "destination_ips": ["10.0.0.0/8"]}],
         "applied_to": [{"type": "label_selector", "label_selector": {"selector": "a=b"},
                         "applied_to_resources": [{"type": "server", "server": {"id": 1}}]}]},
        {"id": 102, "name": "vps-2", "created": "2026-11-30T10:00:00Z",
         "rules": [{"direction": "in", "protocol": "tcp", "port": "22", "source_ips": ["0.0.0.0/0", "::/0"],
                    "destination_ips": [], "description": "ssh \"admin\""},
                   {"direction": "out", "protocol": "icmp", "destination_ips": ["10.0.0.0/8"]}]}
    ]}"#;

    /// `body` read as a page of `R`, through the views, and as the wire types.
    fn both_ways<R: Stored>(body: &str) -> (Vec<R::Wire>, Vec<R::Wire>, Option<Meta>)
    where
        for<'a> R::Page<R::View<'a>>: Deserialize<'a>,
        R::Page<R::Wire>: DeserializeOwned,
    {
        let page = ListedPage::of(body.as_bytes());
        assert!(
            page.borrowed::<R::Page<R::View<'_>>>().is_some(),
            "the views read the page themselves"
        );
        let mut stored: Vec<R> = Vec::new();
        let meta = store_page(&page, &mut stored, &mut Interner::default()).expect("decodes");
        let (wires, wire_meta) = page
            .decode::<R::Page<R::Wire>>()
            .expect("decodes")
            .into_parts();
        assert_eq!(meta, wire_meta);
        (stored.iter().map(Stored::load).collect(), wires, meta)
    }

    #[test]
    fn a_page_read_through_the_views_is_what_the_wire_types_read() {
        let (servers, wires, meta) = both_ways::<StoredServer>(SERVERS_PAGE);
        assert_eq!(servers, wires);
        assert_eq!(meta.and_then(|m| m.pagination.next_page), Some(2));
        assert_eq!(servers[0].labels["note"], "last wins");
        assert_eq!(servers[1].name, "vps-\u{fc}\n2");
        assert_eq!(servers[1].status, ServerStatus::Unknown);
        let (keys, wires, _) = both_ways::<StoredSshKey>(SSH_KEYS_PAGE);
        assert_eq!(keys, wires);
        assert_eq!(keys[0].public_key, "ssh-ed25519 AAAA/x+ c\u{e9}");
        let (firewalls, wires, meta) = both_ways::<StoredFirewall>(FIREWALLS_PAGE);
        assert_eq!(firewalls, wires);
        assert_eq!(meta, None);
        assert_eq!(
            firewalls[0].rules[0].description.as_deref(),
            Some("ssh \"admin\"")
        );
    }

    #[test]
    fn a_page_the_views_refuse_fails_with_the_wire_types_error() {
        for (body, field) in [
            (
                SERVERS_PAGE.replacen(
                    r#""id": 1, "name": "vps-1""#,
                    r#""id": 0, "name": "vps-1""#,
                    1,
                ),
                "servers[0].id",
            ),
            (
                SERVERS_PAGE.replacen(r#""location": {"id": 1, "name": "fsn1"},"#, "", 1),
                "servers[0]",
            ),
            (
                SERVERS_PAGE.replacen(r#""name": "cx23", "cores""#, r#""name": 23, "cores""#, 1),
                "servers[0].server_type.name",
            ),
            (
                FIREWALLS_PAGE.replacen(r#""protocol": "icmp""#, r#""protocol": "sctp""#, 1),
                "firewalls[0].rules[1].protocol",
            ),
        ] {
            let page = ListedPage::of(body.as_bytes());
            let wire = match page.decode::<ServersPage>() {
                Err(e) if field.starts_with("servers") => e.to_string(),
                _ => page
                    .decode::<FirewallsPage>()
                    .expect_err("refused")
                    .to_string(),
            };
            assert!(wire.contains(field), "{field}: {wire}");
            let through_views = if field.starts_with("servers") {
                store_page(
                    &page,
                    &mut Vec::<StoredServer>::new(),
                    &mut Interner::default(),
                )
            } else {
                store_page(
                    &page,
                    &mut Vec::<StoredFirewall>::new(),
                    &mut Interner::default(),
                )
            };
            assert_eq!(through_views.expect_err("refused").to_string(), wire);
        }
    }

    #[test]
    fn a_page_read_through_the_views_shares_what_repeats() {
        let page = ListedPage::of(FIREWALLS_PAGE.as_bytes());
        let mut interner = Interner::default();
        let mut firewalls: Vec<StoredFirewall> = Vec::new();
        store_page(&page, &mut firewalls, &mut interner).expect("decodes");
        assert!(Arc::ptr_eq(&firewalls[0].rules, &firewalls[1].rules));
        let page = ListedPage::of(SERVERS_PAGE.as_bytes());
        let mut servers: Vec<StoredServer> = Vec::new();
        store_page(&page, &mut servers, &mut interner).expect("decodes");
        assert!(Arc::ptr_eq(
            &servers[0].server_type,
            &servers[1].server_type
        ));
        assert!(Arc::ptr_eq(&servers[0].name, &firewalls[0].name));
        assert!(
            !Arc::ptr_eq(&servers[0].location, &servers[1].location),
            "zones differ"
        );
    }
}
