//! A row of `subscriptions`: the web app's spec columns plus what the controller observed.
//!
//! `created_at`/`updated_at` are deliberately absent: the web app owns them and, in SQLite,
//! may store them as integers, so leaving them out lets every row decode.

use sea_orm::entity::prelude::*;

#[derive(Clone, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "subscriptions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// Optional here although the schema says NOT NULL: a web-app table upgraded in place may
    /// hold NULLs, and one such row must not stop every other row from decoding.
    pub user_id: Option<String>,
    pub stripe_subscription_id: Option<String>,
    /// Stripe status (active, trialing, past_due, canceled, ...), not validated by the DB.
    /// NULL never wants a VPS.
    pub status: Option<String>,
    /// NULL is an invalid row (failed, no Hetzner call).
    pub plan: Option<String>,
    pub hetzner_server_id: Option<i64>,
    pub hetzner_ssh_key_id: Option<i64>,
    pub hetzner_firewall_id: Option<i64>,
    pub vps_ip_address: Option<String>,
    pub vps_hostname: Option<String>,
    /// pending, provisioning, ready, failed, deprovisioning, deprovisioned.
    pub provisioning_status: String,
    pub provisioning_error: Option<String>,
    pub provisioned_at: Option<DateTimeUtc>,
    pub deprovisioned_at: Option<DateTimeUtc>,
    /// Sealed ciphertext of the private key, never the key itself.
    pub ssh_private_key: Option<String>,
    /// OpenSSH public key line (not secret).
    pub ssh_public_key: Option<String>,
    /// Bumped by triggers whenever a spec column changes.
    pub desired_version: i64,
    /// The desired_version the controller last finished a pass for.
    pub observed_version: i64,
    pub last_reconciled_at: Option<DateTimeUtc>,
    /// When the row entered its current `status` (set by triggers, database clock). NULL only
    /// if a writer set it so explicitly.
    pub status_changed_at: Option<DateTimeUtc>,
    /// NULL or `controller`: the controller generated and sealed the key pair; `external`: the
    /// key came from elsewhere (the web app) and the controller cannot open it.
    pub ssh_key_origin: Option<String>,
    /// The SSH host key (OpenSSH public key line) the server must present: the one the
    /// controller gave cloud-init, or pinned at the first login (see `crate::ssh`).
    pub ssh_host_key: Option<String>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .field("stripe_subscription_id", &self.stripe_subscription_id)
            .field("status", &self.status)
            .field("plan", &self.plan)
            .field("hetzner_server_id", &self.hetzner_server_id)
            .field("hetzner_ssh_key_id", &self.hetzner_ssh_key_id)
            .field("hetzner_firewall_id", &self.hetzner_firewall_id)
            .field("vps_ip_address", &self.vps_ip_address)
            .field("vps_hostname", &self.vps_hostname)
            .field("provisioning_status", &self.provisioning_status)
            .field("provisioning_error", &self.provisioning_error)
            .field("provisioned_at", &self.provisioned_at)
            .field("deprovisioned_at", &self.deprovisioned_at)
            .field(
                "ssh_private_key",
                &self.ssh_private_key.as_ref().map(|_| crate::db::SEALED),
            )
            .field("ssh_public_key", &self.ssh_public_key)
            .field("desired_version", &self.desired_version)
            .field("observed_version", &self.observed_version)
            .field("last_reconciled_at", &self.last_reconciled_at)
            .field("status_changed_at", &self.status_changed_at)
            .field("ssh_key_origin", &self.ssh_key_origin)
            .field("ssh_host_key", &self.ssh_host_key)
            .finish()
    }
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

impl Model {
    /// A row as the web app inserts it: `active` on the `starter` plan, every controller
    /// column at its default. For tests (unit and integration), which set what they are
    /// about with `..`.
    #[doc(hidden)]
    pub fn example(id: &str) -> Model {
        Model {
            id: id.into(),
            user_id: None,
            stripe_subscription_id: None,
            status: Some("active".into()),
            plan: Some("starter".into()),
            hetzner_server_id: None,
            hetzner_ssh_key_id: None,
            hetzner_firewall_id: None,
            vps_ip_address: None,
            vps_hostname: None,
            provisioning_status: "pending".into(),
            provisioning_error: None,
            provisioned_at: None,
            deprovisioned_at: None,
            ssh_private_key: None,
            ssh_public_key: None,
            desired_version: 1,
            observed_version: 0,
            last_reconciled_at: None,
            status_changed_at: None,
            ssh_key_origin: None,
            ssh_host_key: None,
        }
    }
}
