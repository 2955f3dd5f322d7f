//! SSH after boot: `ready` means the server answers SSH with the key the controller holds,
//! cloud-init finished, and the plan's bootstrap ran.
//!
//! - `host_key`: how the controller knows the server's host key (derived from the
//!   subscription's key pair, handed to cloud-init, pinned on the row).
//! - `session`: one russh connection: host key check, login, commands.
//! - `bootstrap`: the steps on one server, resumable through a marker file on the server.
//! - `bootstrapper`: runs bootstraps beside the reconciles, a bounded number at a time, so SSH
//!   never holds a reconcile worker or the Hetzner request budget.

pub mod access;
pub mod bootstrap;
pub mod bootstrapper;
pub mod host_key;
pub mod session;

pub use bootstrapper::{BootstrapState, Bootstrapper};

/// Why a bootstrap did not finish. Only a host key mismatch is terminal: everything else is
/// retried with backoff, and nothing is ever deleted on account of it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SshError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out after {seconds} s {what}")]
    Timeout { what: String, seconds: u64 },
    #[error(
        "the server presented host key {presented}, not the pinned {expected}: the bootstrap is stopped (a different machine answers at this address, or someone intercepts it); check the server in the Hetzner console, then clear subscriptions.ssh_host_key to pin again or delete the server"
    )]
    HostKeyMismatch { expected: String, presented: String },
    #[error("login as {user} with the subscription's key was refused")]
    LoginRejected { user: String },
    #[error("cloud-init did not finish successfully (exit status {}): {output}", show_status(.exit_status))]
    CloudInitFailed {
        exit_status: Option<u32>,
        output: String,
    },
    #[error("bootstrap {step} failed (exit status {}): {output}", show_status(.exit_status))]
    StepFailed {
        step: String,
        exit_status: Option<u32>,
        output: String,
    },
    #[error("SSH: {0}")]
    Protocol(String),
    #[error("the subscription's private key cannot be used for SSH: {0}")]
    Key(String),
}

fn show_status(status: &Option<u32>) -> String {
    status.map_or_else(|| "none".to_owned(), |s| s.to_string())
}

impl SshError {
    pub fn is_terminal(&self) -> bool {
        matches!(self, SshError::HostKeyMismatch { .. })
    }

    /// The `reason` label of `reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SshError::Connect(_) => "ssh_connect",
            SshError::Timeout { .. } => "ssh_timeout",
            SshError::HostKeyMismatch { .. } => "ssh_host_key_mismatch",
            SshError::LoginRejected { .. } => "ssh_login_rejected",
            SshError::CloudInitFailed { .. } => "ssh_cloud_init_failed",
            SshError::StepFailed { .. } => "ssh_bootstrap_step_failed",
            SshError::Protocol(_) | SshError::Key(_) => "ssh_protocol",
        }
    }
}
