//! Wire types of the Hetzner Cloud API, field names exactly as on the wire (snake_case).
//!
//! Response types decode only what the controller needs and ignore the rest, so new fields
//! at Hetzner never break decoding. Fields the spec marks required stay required here;
//! optional or nullable ones are `Option` or `#[serde(default)]`.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Labels;

/// Hetzner ids are 1 or more (the spec: int64, 1 … 2^53−1). A zero or negative id is not an
/// object the controller can act on: decoding fails there, naming the field.
pub(crate) fn positive_id<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<i64, D::Error> {
    let id = i64::deserialize(deserializer)?;
    if id >= 1 {
        Ok(id)
    } else {
        Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Signed(id),
            &"an id of 1 or more",
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Servers

/// `status` of a server. Anything new from the API decodes as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerStatus {
    Initializing,
    Starting,
    Running,
    Stopping,
    Off,
    Deleting,
    Migrating,
    Rebuilding,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Server {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    pub name: String,
    pub status: ServerStatus,
    pub created: DateTime<Utc>,
    #[serde(default)]
    pub labels: Labels,
    pub locked: bool,
    pub protection: ServerProtection,
    pub public_net: ServerPublicNet,
    pub server_type: ServerTypeRef,
    pub location: LocationRef,
    /// Null when the server was created from an image that has since been deleted.
    pub image: Option<ImageRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServerProtection {
    pub delete: bool,
    pub rebuild: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerPublicNet {
    /// Null when the server has no public IPv4.
    pub ipv4: Option<ServerIpv4>,
    /// Null when the server has no public IPv6.
    pub ipv6: Option<ServerIpv6>,
    #[serde(default)]
    pub firewalls: Vec<ServerFirewall>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerIpv4 {
    pub ip: String,
    pub blocked: bool,
    pub dns_ptr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerIpv6 {
    /// The server's /64 network (e.g. `2001:db8::/64`), not a host address.
    pub ip: String,
    pub blocked: bool,
}

/// A firewall on the server's public interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFirewall {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    #[serde(default)]
    pub status: ServerFirewallStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerFirewallStatus {
    Applied,
    Pending,
    #[default]
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServerTypeRef {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LocationRef {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    pub name: String,
    #[serde(default)]
    pub network_zone: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageRef {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    /// Null for snapshots and backups.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub os_flavor: Option<String>,
}

/// `POST /servers` body.
///
/// `user_data` is stored by Hetzner and may contain bootstrap material, so `Debug` prints only
/// its length.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateServer {
    pub name: String,
    /// Server type name (e.g. `cpx22`) or ID as a decimal string.
    pub server_type: String,
    /// Image name (e.g. `ubuntu-24.04`) or ID as a decimal string.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// SSH key IDs. The API also takes names; IDs are unambiguous.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firewalls: Vec<CreateServerFirewall>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_after_create: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_net: Option<CreateServerPublicNet>,
}

impl fmt::Debug for CreateServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateServer")
            .field("name", &self.name)
            .field("server_type", &self.server_type)
            .field("image", &self.image)
            .field("location", &self.location)
            .field("ssh_keys", &self.ssh_keys)
            .field("firewalls", &self.firewalls)
            .field("labels", &self.labels)
            .field(
                "user_data",
                &self
                    .user_data
                    .as_ref()
                    .map(|data| format!("<redacted, {} bytes>", data.len())),
            )
            .field("start_after_create", &self.start_after_create)
            .field("public_net", &self.public_net)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateServerFirewall {
    pub firewall: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateServerPublicNet {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    /// ID of an existing IPv4 primary IP to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<i64>,
    /// ID of an existing IPv6 primary IP to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<i64>,
}

/// `POST /servers` answer. Wait for `action` and all of `next_actions` before treating the
/// server as converged. `Debug` hides `root_password`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateServerResponse {
    pub server: Server,
    pub action: Action,
    #[serde(default)]
    pub next_actions: Vec<Action>,
    /// Only set when the server was created without SSH keys.
    #[serde(default)]
    pub root_password: Option<String>,
}

impl CreateServerResponse {
    /// `action` and every `next_actions` entry, for [`super::HcloudApi::wait_for_actions`].
    pub fn actions(&self) -> Vec<ActionRef> {
        ActionRef::all(std::iter::once(&self.action).chain(&self.next_actions))
    }
}

impl fmt::Debug for CreateServerResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateServerResponse")
            .field("server", &self.server)
            .field("action", &self.action)
            .field("next_actions", &self.next_actions)
            .field(
                "root_password",
                &self.root_password.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// SSH keys

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshKey {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    pub name: String,
    /// Legacy MD5 fingerprint, lowercase hex pairs joined by `:`.
    pub fingerprint: String,
    pub public_key: String,
    #[serde(default)]
    pub labels: Labels,
    pub created: DateTime<Utc>,
}

/// `POST /ssh_keys` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSshKey {
    pub name: String,
    pub public_key: String,
    #[serde(default)]
    pub labels: Labels,
}

// ---------------------------------------------------------------------------------------------
// Firewalls

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Firewall {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    pub name: String,
    /// Optional in the spec's firewall schema; absent means no labels.
    #[serde(default)]
    pub labels: Labels,
    pub created: DateTime<Utc>,
    pub rules: Vec<FirewallRule>,
    #[serde(default)]
    pub applied_to: Vec<FirewallResource>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirewallDirection {
    In,
    Out,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirewallProtocol {
    Tcp,
    Udp,
    Icmp,
    Esp,
    Gre,
}

/// One firewall rule, as sent in requests and returned in responses.
///
/// In responses `port` is null for protocols without ports and both IP lists are always present;
/// in requests empty lists and a missing port are omitted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FirewallRule {
    pub direction: FirewallDirection,
    pub protocol: FirewallProtocol,
    /// `"80"` or a range `"1024-5000"`; only for tcp and udp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// CIDRs, only for direction `in`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<String>,
    /// CIDRs, only for direction `out`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FirewallResourceType {
    Server,
    LabelSelector,
    #[serde(other)]
    Unknown,
}

/// Where a firewall applies: a server, or all servers matching a label selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallResource {
    #[serde(rename = "type")]
    pub kind: FirewallResourceType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ResourceId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<LabelSelectorRef>,
    /// Response only: the servers a label selector currently matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_to_resources: Option<Vec<FirewallAppliedResource>>,
}

impl FirewallResource {
    /// A request item naming one server.
    pub fn server(id: i64) -> Self {
        Self {
            kind: FirewallResourceType::Server,
            server: Some(ResourceId { id }),
            label_selector: None,
            applied_to_resources: None,
        }
    }

    /// A request item naming a label selector.
    pub fn label_selector(selector: impl Into<String>) -> Self {
        Self {
            kind: FirewallResourceType::LabelSelector,
            server: None,
            label_selector: Some(LabelSelectorRef {
                selector: selector.into(),
            }),
            applied_to_resources: None,
        }
    }

    /// The server ID when this item names one server directly.
    pub fn server_id(&self) -> Option<i64> {
        match self.kind {
            FirewallResourceType::Server => self.server.map(|server| server.id),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceId {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSelectorRef {
    pub selector: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallAppliedResource {
    #[serde(rename = "type")]
    pub kind: FirewallResourceType,
    #[serde(default)]
    pub server: Option<ResourceId>,
}

/// `POST /firewalls` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateFirewall {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub rules: Vec<FirewallRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apply_to: Vec<FirewallResource>,
}

/// `POST /firewalls` answer: the firewall plus one action per resource it was applied to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateFirewallResponse {
    pub firewall: Firewall,
    #[serde(default)]
    pub actions: Vec<Action>,
}

// ---------------------------------------------------------------------------------------------
// Images (system images and snapshots), server types, locations

/// CPU architecture of a server type or image. Anything new decodes as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    X86,
    Arm,
    #[serde(other)]
    Unknown,
}

/// `type` of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageType {
    System,
    App,
    Snapshot,
    Backup,
    #[serde(other)]
    Unknown,
}

/// `status` of an image: a snapshot is `creating` while its `create_image` action runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageStatus {
    Available,
    Creating,
    Unavailable,
    #[serde(other)]
    Unknown,
}

/// An image: a system image (`ubuntu-24.04`, one per architecture) or a snapshot/backup of a
/// server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Image {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: ImageType,
    pub status: ImageStatus,
    /// Only system images have a name; null for snapshots and backups.
    pub name: Option<String>,
    pub description: String,
    #[serde(default)]
    pub labels: Labels,
    pub created: DateTime<Utc>,
    /// The server a snapshot or backup was taken of (its name at that time).
    #[serde(default)]
    pub created_from: Option<ImageCreatedFrom>,
    pub architecture: Architecture,
    #[serde(default)]
    pub os_flavor: Option<String>,
    #[serde(default)]
    pub os_version: Option<String>,
    /// GB stored (what snapshots are billed by); null while unknown.
    #[serde(default)]
    pub image_size: Option<f64>,
    /// GB of the disk the image holds.
    pub disk_size: f64,
    /// The server a backup belongs to (backups are deleted with it).
    #[serde(default)]
    pub bound_to: Option<i64>,
    /// When the image was or will be deprecated.
    #[serde(default)]
    pub deprecated: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCreatedFrom {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    pub name: String,
}

/// `POST /servers/{id}/actions/create_image` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateImage {
    /// `snapshot` (independent of the server) or `backup` (needs the server's backup option).
    #[serde(rename = "type")]
    pub kind: ImageType,
    /// Omitted: Hetzner generates one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub labels: Labels,
}

/// `POST /servers/{id}/actions/create_image` answer: the image (`creating`) and the action
/// that makes it `available`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateImageResponse {
    pub image: Image,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerType {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    pub name: String,
    pub description: String,
    /// JSON numbers in the spec.
    pub cores: f64,
    /// GB.
    pub memory: f64,
    /// GB.
    pub disk: f64,
    /// Deprecated server types can't be ordered any more.
    #[serde(default)]
    pub deprecated: Option<bool>,
    pub cpu_type: String,
    pub architecture: Architecture,
    /// Where the type can be ordered.
    #[serde(default)]
    pub locations: Vec<ServerTypeLocation>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerTypeLocation {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    pub name: String,
    #[serde(default)]
    pub available: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Location {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    pub name: String,
    pub description: String,
    pub country: String,
    pub city: String,
    pub network_zone: String,
}

// ---------------------------------------------------------------------------------------------
// Actions

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    Running,
    Success,
    Error,
    /// A status this client does not know; treated as still running.
    #[serde(other)]
    Unknown,
}

impl ActionStatus {
    pub fn is_finished(self) -> bool {
        matches!(self, ActionStatus::Success | ActionStatus::Error)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    /// Informational (`create_server`, `apply_firewall`, ...); don't branch on it.
    pub command: String,
    pub status: ActionStatus,
    pub progress: i64,
    pub started: DateTime<Utc>,
    pub finished: Option<DateTime<Utc>>,
    #[serde(default)]
    pub resources: Vec<ActionResource>,
    /// Only meaningful when `status` is `error` (the spec's examples carry one on success too).
    pub error: Option<ActionError>,
}

/// An action to wait for. One that touches a server is asked about at `GET /servers/actions`,
/// which pages 50 actions per request, where `GET /actions?id=…` answers 25.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ActionRef {
    pub id: i64,
    pub on_server: bool,
}

impl ActionRef {
    /// An action known only by its ID: asked about at `GET /actions`.
    pub fn from_id(id: i64) -> Self {
        Self {
            id,
            on_server: false,
        }
    }

    pub fn all<'a>(actions: impl IntoIterator<Item = &'a Action>) -> Vec<Self> {
        actions.into_iter().map(Self::from).collect()
    }
}

impl From<&Action> for ActionRef {
    fn from(action: &Action) -> Self {
        Self {
            id: action.id,
            on_server: action.resources.iter().any(|r| r.kind == "server"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionResource {
    #[serde(deserialize_with = "positive_id")]
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionError {
    pub code: String,
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Envelopes

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub pagination: Pagination,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pagination {
    pub page: i64,
    pub per_page: i64,
    #[serde(default)]
    pub previous_page: Option<i64>,
    #[serde(default)]
    pub next_page: Option<i64>,
    #[serde(default)]
    pub last_page: Option<i64>,
    #[serde(default)]
    pub total_entries: Option<i64>,
}

/// Error envelope: `{"error": {"code", "message", "details"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorPayload,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorPayload {
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub details: Option<serde_json::Value>,
}

// Root-key wrappers, one per response or request shape (public for contract tests).

#[derive(Debug, Deserialize)]
pub struct ServerEnvelope {
    pub server: Server,
}

/// A page of the list; `T` may be a borrowing form of [`Server`] (see [`super::ListedPage`]).
#[derive(Debug, Deserialize)]
pub struct ServersPage<T = Server> {
    pub servers: Vec<T>,
    pub meta: Option<Meta>,
}

#[derive(Debug, Deserialize)]
pub struct SshKeyEnvelope {
    pub ssh_key: SshKey,
}

/// A page of the list; `T` may be a borrowing form of [`SshKey`] (see [`super::ListedPage`]).
#[derive(Debug, Deserialize)]
pub struct SshKeysPage<T = SshKey> {
    pub ssh_keys: Vec<T>,
    pub meta: Option<Meta>,
}

#[derive(Debug, Deserialize)]
pub struct FirewallEnvelope {
    pub firewall: Firewall,
}

/// A page of the list; `T` may be a borrowing form of [`Firewall`] (see [`super::ListedPage`]).
#[derive(Debug, Deserialize)]
pub struct FirewallsPage<T = Firewall> {
    pub firewalls: Vec<T>,
    pub meta: Option<Meta>,
}

#[derive(Debug, Deserialize)]
pub struct ImageEnvelope {
    pub image: Image,
}

#[derive(Debug, Deserialize)]
pub struct ImagesPage {
    pub images: Vec<Image>,
    pub meta: Option<Meta>,
}

#[derive(Debug, Deserialize)]
pub struct ServerTypesPage {
    pub server_types: Vec<ServerType>,
    pub meta: Option<Meta>,
}

#[derive(Debug, Deserialize)]
pub struct LocationsPage {
    pub locations: Vec<Location>,
    pub meta: Option<Meta>,
}

#[derive(Debug, Deserialize)]
pub struct ActionEnvelope {
    pub action: Action,
}

/// `{actions}` of a mutation, or a page of `GET /servers/actions` (with `meta`).
#[derive(Debug, Deserialize)]
pub struct ActionsEnvelope {
    pub actions: Vec<Action>,
    #[serde(default)]
    pub meta: Option<Meta>,
}

#[derive(Debug, Serialize)]
pub struct UpdateLabels<'a> {
    pub labels: &'a Labels,
}

#[derive(Debug, Serialize)]
pub struct SetRules<'a> {
    pub rules: &'a [FirewallRule],
}

#[derive(Debug, Serialize)]
pub struct ApplyTo {
    pub apply_to: Vec<FirewallResource>,
}

#[derive(Debug, Serialize)]
pub struct RemoveFrom {
    pub remove_from: Vec<FirewallResource>,
}
