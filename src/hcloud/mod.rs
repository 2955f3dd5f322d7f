//! Typed Hetzner Cloud API client: wire types, errors keyed on Hetzner's error codes, safe
//! retries, pagination, batched action waits and a process-wide request budget.
//!
//! The controller's executor talks to Hetzner only through [`HcloudApi`]; [`Client`] is the
//! real implementation (tests may provide fakes).
//!
//! ```no_run
//! use std::sync::Arc;
//! use vps_controller::hcloud::{Budget, Client, ClientConfig, HcloudApi, Token};
//!
//! # async fn demo() -> Result<(), vps_controller::hcloud::Error> {
//! let _ = rustls::crypto::ring::default_provider().install_default();
//! // One budget per Hetzner project, shared by every client using its token.
//! let budget = Arc::new(Budget::default());
//! let client = Client::new(ClientConfig {
//!     budget: budget.clone(),
//!     ..ClientConfig::new("https://api.hetzner.cloud/v1", Token::new("token from a secret"))
//! })?;
//! let mine = client.list_servers("vps-controller/instance=prod").await?;
//! println!("{} servers, {} requests left", mine.len(), budget.remaining());
//! # Ok(())
//! # }
//! ```
//!
//! Retries: only what the official clients retry (codes `conflict`, `rate_limit_exceeded`,
//! `bad_gateway`, `timeout`; a non-JSON 502/504; connect failures and timeouts), with
//! truncated exponential backoff and full jitter. A retried POST may have succeeded the first
//! time (timeout after the server acted): creates then answer `uniqueness_error`, which callers
//! resolve by looking the object up and adopting it.

mod action_waiter;
pub mod budget;
mod client;
pub mod error;
pub mod types;

use std::future::Future;
use std::time::Duration;

pub use budget::Budget;
pub use client::{
    ActionPollBackoff, Client, ClientConfig, DEFAULT_ENDPOINT, DEFAULT_MAX_PAGES, ListedPage,
    MAX_BODY_BYTES, Reachability, RequestCount, RequestLabels, RetryBackoff, Token, WriteGate,
    decode_answer, error_from_answer,
};
pub use error::{Error, ErrorCode, TransportKind};
pub use types::*;

/// Labels as on the wire: a flat string map. Sorted, so comparisons and selectors are stable.
pub type Labels = std::collections::BTreeMap<String, String>;

/// Power changes of a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerPowerAction {
    /// `poweron`: start the server.
    PowerOn,
    /// `poweroff`: cut power (hard off).
    PowerOff,
    /// `shutdown`: ACPI request; success means only that the signal was sent.
    Shutdown,
}

impl ServerPowerAction {
    /// The action's path segment under `/servers/{id}/actions/`.
    pub fn path_segment(self) -> &'static str {
        match self {
            ServerPowerAction::PowerOn => "poweron",
            ServerPowerAction::PowerOff => "poweroff",
            ServerPowerAction::Shutdown => "shutdown",
        }
    }
}

/// The Hetzner Cloud calls the controller makes. List calls fetch every page (`per_page=50`,
/// `sort=id:asc` so pages stay stable while objects come and go) and fail with
/// [`Error::PageLimit`] rather than return a truncated list; `*_by_name` and
/// `ssh_key_by_fingerprint` return `None` when nothing matches. An empty label selector means
/// "no filter".
///
/// Creates are not idempotent and may be retried after a timeout (when the first attempt may
/// have succeeded): callers treat `uniqueness_error` as "it exists", look the object up and
/// adopt it if it carries their ownership labels.
pub trait HcloudApi: Send + Sync {
    fn list_servers(
        &self,
        label_selector: &str,
    ) -> impl Future<Output = Result<Vec<Server>, Error>> + Send;
    fn list_ssh_keys(
        &self,
        label_selector: &str,
    ) -> impl Future<Output = Result<Vec<SshKey>, Error>> + Send;
    fn list_firewalls(
        &self,
        label_selector: &str,
    ) -> impl Future<Output = Result<Vec<Firewall>, Error>> + Send;
    /// [`HcloudApi::list_servers`], handing each page to `on_page` as it arrives, to decode
    /// into a form of its own (it returns the page's `meta`, which says whether another page
    /// follows): a listing of the whole fleet is never held whole, nor copied into the wire
    /// types first.
    fn each_server_page(
        &self,
        label_selector: &str,
        on_page: impl FnMut(ListedPage<'_>) -> Result<Option<Meta>, Error> + Send,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// [`HcloudApi::list_ssh_keys`] a page at a time, like [`HcloudApi::each_server_page`].
    fn each_ssh_key_page(
        &self,
        label_selector: &str,
        on_page: impl FnMut(ListedPage<'_>) -> Result<Option<Meta>, Error> + Send,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// [`HcloudApi::list_firewalls`] a page at a time, like [`HcloudApi::each_server_page`].
    fn each_firewall_page(
        &self,
        label_selector: &str,
        on_page: impl FnMut(ListedPage<'_>) -> Result<Option<Meta>, Error> + Send,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    fn server_by_name(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Server>, Error>> + Send;
    fn ssh_key_by_name(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<SshKey>, Error>> + Send;
    fn ssh_key_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> impl Future<Output = Result<Option<SshKey>, Error>> + Send;
    fn firewall_by_name(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Firewall>, Error>> + Send;

    fn create_ssh_key(
        &self,
        req: &CreateSshKey,
    ) -> impl Future<Output = Result<SshKey, Error>> + Send;
    fn create_firewall(
        &self,
        req: &CreateFirewall,
    ) -> impl Future<Output = Result<CreateFirewallResponse, Error>> + Send;
    fn create_server(
        &self,
        req: &CreateServer,
    ) -> impl Future<Output = Result<CreateServerResponse, Error>> + Send;

    /// Replaces the whole label map.
    fn update_server_labels(
        &self,
        id: i64,
        labels: &Labels,
    ) -> impl Future<Output = Result<Server, Error>> + Send;
    /// Replaces the whole label map.
    fn update_ssh_key_labels(
        &self,
        id: i64,
        labels: &Labels,
    ) -> impl Future<Output = Result<SshKey, Error>> + Send;
    /// Replaces the whole label map.
    fn update_firewall_labels(
        &self,
        id: i64,
        labels: &Labels,
    ) -> impl Future<Output = Result<Firewall, Error>> + Send;

    fn delete_server(&self, id: i64) -> impl Future<Output = Result<Action, Error>> + Send;
    fn delete_ssh_key(&self, id: i64) -> impl Future<Output = Result<(), Error>> + Send;
    /// Fails with `resource_in_use` while the firewall is applied anywhere.
    fn delete_firewall(&self, id: i64) -> impl Future<Output = Result<(), Error>> + Send;

    fn server_power(
        &self,
        id: i64,
        action: ServerPowerAction,
    ) -> impl Future<Output = Result<Action, Error>> + Send;

    /// Replaces all rules (`[]` clears them).
    fn set_firewall_rules(
        &self,
        id: i64,
        rules: &[FirewallRule],
    ) -> impl Future<Output = Result<Vec<Action>, Error>> + Send;
    fn apply_firewall(
        &self,
        id: i64,
        server_ids: &[i64],
    ) -> impl Future<Output = Result<Vec<Action>, Error>> + Send;
    fn remove_firewall(
        &self,
        id: i64,
        server_ids: &[i64],
    ) -> impl Future<Output = Result<Vec<Action>, Error>> + Send;

    /// `GET /servers/{id}`: one server (waiting for a graceful shutdown, adopting a server
    /// the row records).
    fn get_server(&self, id: i64) -> impl Future<Output = Result<Server, Error>> + Send;
    /// `GET /ssh_keys/{id}`: one SSH key (adopting the key object the row records).
    fn get_ssh_key(&self, id: i64) -> impl Future<Output = Result<SshKey, Error>> + Send;
    /// `GET /firewalls/{id}`: one firewall (adopting the firewall the row records).
    fn get_firewall(&self, id: i64) -> impl Future<Output = Result<Firewall, Error>> + Send;

    /// `POST /servers/{id}/actions/create_image` with type `snapshot`: the image is `creating`
    /// until the returned action finishes (the server is locked meanwhile), then `available`.
    /// Snapshots outlive the server. An empty `description` lets Hetzner generate one.
    fn create_snapshot(
        &self,
        server_id: i64,
        description: &str,
        labels: &Labels,
    ) -> impl Future<Output = Result<CreateImageResponse, Error>> + Send;
    /// Every snapshot image (`type=snapshot`) matching the selector.
    fn list_snapshots(
        &self,
        label_selector: &str,
    ) -> impl Future<Output = Result<Vec<Image>, Error>> + Send;
    /// `DELETE /images/{id}`: snapshots and backups only; system images can't be deleted.
    fn delete_image(&self, id: i64) -> impl Future<Output = Result<(), Error>> + Send;

    /// A server type by exact name (e.g. `cpx22`), to validate plans at startup.
    fn server_type_by_name(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<ServerType>, Error>> + Send;
    /// A location by exact name (e.g. `fsn1`).
    fn location_by_name(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Location>, Error>> + Send;
    /// Every image with this exact name (system image names repeat, one per architecture),
    /// deprecated ones included (check [`Image::deprecated`]); empty when there is none.
    fn image_by_name(&self, name: &str) -> impl Future<Output = Result<Vec<Image>, Error>> + Send;

    /// Polls until every action finished: those that touch a server at
    /// `GET /servers/actions?id=..` (50 IDs per request), the others at `GET /actions?id=..`
    /// (25). Returns the finished actions in the order of `actions` (duplicates removed);
    /// [`Error::ActionFailed`] as soon as one ends in `error`; [`Error::ActionTimeout`] with the
    /// still-running IDs once `timeout` has passed.
    ///
    /// [`Client`] polls the waits of all its callers together (one round asks about every due
    /// wait's IDs), so concurrent reconciles share requests; an outcome (failed
    /// action, timeout, failed request) still reaches only the waits it concerns.
    fn wait_for_actions(
        &self,
        actions: &[ActionRef],
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<Action>, Error>> + Send;
}
