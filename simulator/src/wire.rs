//! Response shapes as the official spec describes them. Written independently of the client in
//! `vps_controller::hcloud` on purpose: a misreading of the spec on one side must not hide in the other.

use serde::Serialize;

use crate::labels::Labels;

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ActionOut {
    pub id: i64,
    pub command: &'static str,
    pub status: &'static str,
    pub progress: u8,
    pub started: String,
    pub finished: Option<String>,
    pub resources: Vec<ResourceRef>,
    pub error: Option<ActionErrorOut>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct ResourceRef {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct ActionErrorOut {
    pub code: String,
    pub message: String,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Price {
    pub net: String,
    pub gross: String,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ServerTypePrice {
    pub location: String,
    pub price_hourly: Price,
    pub price_monthly: Price,
    pub included_traffic: u64,
    pub price_per_tb_traffic: Price,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ServerTypeLocation {
    pub id: i64,
    pub name: String,
    pub deprecation: Option<()>,
    pub available: bool,
    pub recommended: bool,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ServerTypeOut {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub cores: u32,
    pub memory: f64,
    pub disk: u32,
    pub deprecated: bool,
    pub prices: Vec<ServerTypePrice>,
    pub storage_type: &'static str,
    pub cpu_type: &'static str,
    pub category: String,
    pub architecture: &'static str,
    pub deprecation: Option<()>,
    pub locations: Vec<ServerTypeLocation>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct LocationOut {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub country: String,
    pub city: String,
    pub latitude: f64,
    pub longitude: f64,
    pub network_zone: String,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ImageProtection {
    pub delete: bool,
}

/// The server a snapshot was taken of, with its name at that time.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct CreatedFromOut {
    pub id: i64,
    pub name: String,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ImageOut {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub status: &'static str,
    pub name: Option<String>,
    pub description: String,
    pub image_size: Option<f64>,
    pub disk_size: f64,
    pub created: String,
    pub created_from: Option<CreatedFromOut>,
    pub bound_to: Option<i64>,
    pub os_flavor: String,
    pub os_version: Option<String>,
    pub rapid_deploy: bool,
    pub protection: ImageProtection,
    pub deprecated: Option<String>,
    pub deleted: Option<String>,
    pub labels: Labels,
    pub architecture: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Ipv4Out {
    /// The Primary IP's ID (optional in the spec, but hcloud-python requires it).
    pub id: i64,
    pub ip: String,
    pub blocked: bool,
    pub dns_ptr: String,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct DnsPtrOut {
    pub ip: String,
    pub dns_ptr: String,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Ipv6Out {
    pub id: i64,
    pub ip: String,
    pub blocked: bool,
    pub dns_ptr: Vec<DnsPtrOut>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct ServerFirewallOut {
    pub id: i64,
    pub status: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct PublicNetOut {
    pub ipv4: Option<Ipv4Out>,
    pub ipv6: Option<Ipv6Out>,
    pub floating_ips: Vec<i64>,
    pub firewalls: Vec<ServerFirewallOut>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ServerProtection {
    pub delete: bool,
    pub rebuild: bool,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ServerOut {
    pub id: i64,
    pub name: String,
    pub status: &'static str,
    pub created: String,
    pub public_net: PublicNetOut,
    pub private_net: Vec<()>,
    pub server_type: ServerTypeOut,
    pub location: LocationOut,
    pub image: Option<ImageOut>,
    pub iso: Option<()>,
    pub rescue_enabled: bool,
    pub locked: bool,
    pub backup_window: Option<String>,
    pub outgoing_traffic: Option<u64>,
    pub ingoing_traffic: Option<u64>,
    pub included_traffic: Option<u64>,
    pub protection: ServerProtection,
    pub labels: Labels,
    pub volumes: Vec<i64>,
    pub load_balancers: Vec<i64>,
    pub primary_disk_size: u32,
    pub placement_group: Option<()>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct SshKeyOut {
    pub id: i64,
    pub name: String,
    pub fingerprint: String,
    pub public_key: String,
    pub labels: Labels,
    pub created: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct RuleOut {
    pub description: Option<String>,
    pub direction: &'static str,
    pub source_ips: Vec<String>,
    pub destination_ips: Vec<String>,
    pub protocol: &'static str,
    pub port: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct ServerIdOut {
    pub id: i64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct SelectorOut {
    pub selector: String,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct AppliedResourceOut {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub server: ServerIdOut,
}

/// Fields that do not apply to the `type` are omitted: the spec declares them as non-nullable
/// objects with `additionalProperties: false` on the item.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct AppliedToOut {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerIdOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<SelectorOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_to_resources: Option<Vec<AppliedResourceOut>>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct FirewallOut {
    pub id: i64,
    pub name: String,
    pub labels: Labels,
    pub created: String,
    pub rules: Vec<RuleOut>,
    pub applied_to: Vec<AppliedToOut>,
}
