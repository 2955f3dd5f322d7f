//! Break-glass access for an operator (`vps-controller ssh SUBSCRIPTION`): the subscription's
//! sealed private key opened into a fresh private directory (0700) as a 0600 file, next to a
//! `known_hosts` holding the pinned host key, and the `ssh` command that uses both. Every use
//! is recorded as a Warning event on the subscription and logged; the key itself never is.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use sea_orm::DatabaseConnection;

use crate::db::events::{self, EventKind};
use crate::db::subscriptions;
use crate::keys::Sealer;

use super::session::quote;

/// What `open` wrote and the command that uses it.
#[derive(Debug)]
pub struct Access {
    pub directory: PathBuf,
    pub key_file: PathBuf,
    /// `None` when no host key is pinned yet: the command then asks ssh to pin it.
    pub known_hosts: Option<PathBuf>,
    pub command: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("subscription {0:?} does not exist; `vps-controller status` lists them all")]
    NoSuchSubscription(String),
    #[error(
        "subscription {0:?} has no server address yet (vps_ip_address is empty): nothing to log in to"
    )]
    NoAddress(String),
    #[error(
        "subscription {0:?} has no private key this controller sealed (none stored, or the web app's own): the controller cannot open it"
    )]
    NoKey(String),
    #[error("opening the sealed key: {0}")]
    Seal(#[from] crate::keys::SealError),
    #[error("database: {0}")]
    Db(#[from] crate::db::DbError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Who asks for which subscription's key, and where to put it.
pub struct Request<'a> {
    pub subscription_id: &'a str,
    /// The key's directory is created in here.
    pub parent: &'a Path,
    /// Login user and sshd port of the command printed.
    pub user: &'a str,
    pub port: u16,
    /// Written into the event, for the audit.
    pub operator: &'a str,
    pub reason: &'a str,
}

/// Opens the key of the subscription into a new directory under `parent` and records the
/// access.
pub async fn open(
    db: &DatabaseConnection,
    sealer: &Sealer,
    request: Request<'_>,
) -> Result<Access, AccessError> {
    let Request {
        subscription_id,
        parent,
        user,
        port,
        operator,
        reason,
    } = request;
    let row = subscriptions::get(db, subscription_id)
        .await?
        .ok_or_else(|| AccessError::NoSuchSubscription(subscription_id.to_owned()))?;
    let address = row
        .vps_ip_address
        .clone()
        .filter(|ip| !ip.is_empty())
        .ok_or_else(|| AccessError::NoAddress(subscription_id.to_owned()))?;
    let sealed = crate::reconcile::keycheck::sealed_by_controller(&row)
        .ok_or_else(|| AccessError::NoKey(subscription_id.to_owned()))?;
    let private = sealer.open(sealed, subscription_id)?;

    // Recorded before the key touches the disk: no access goes unrecorded.
    let message = format!(
        "break-glass SSH access: {operator} opened the private key of this subscription ({reason})"
    );
    tracing::warn!(subscription = %crate::reconcile::desired::shown_id(subscription_id), operator, reason, "break-glass SSH access: private key opened");
    events::record(
        db,
        subscription_id,
        EventKind::Warning,
        "BreakGlassAccess",
        &message,
    )
    .await?;

    let directory = private_directory(parent)?;
    let key_file = directory.join("id");
    write_private(&key_file, private.as_bytes())?;
    let known_hosts = match &row.ssh_host_key {
        Some(host_key) => {
            let path = directory.join("known_hosts");
            let host = if port == 22 {
                address.clone()
            } else {
                format!("[{address}]:{port}")
            };
            write_private(&path, format!("{host} {}\n", host_key.trim()).as_bytes())?;
            Some(path)
        }
        None => None,
    };
    let mut command = vec![
        "ssh".to_owned(),
        "-i".to_owned(),
        quote(&key_file.to_string_lossy()),
        "-o".to_owned(),
        "IdentitiesOnly=yes".to_owned(),
    ];
    match &known_hosts {
        Some(path) => command.extend([
            "-o".to_owned(),
            quote(&format!("UserKnownHostsFile={}", path.to_string_lossy())),
            "-o".to_owned(),
            "StrictHostKeyChecking=yes".to_owned(),
        ]),
        None => command.extend(["-o".to_owned(), "StrictHostKeyChecking=ask".to_owned()]),
    }
    if port != 22 {
        command.extend(["-p".to_owned(), port.to_string()]);
    }
    command.push(quote(&format!("{user}@{address}")));
    Ok(Access {
        directory,
        key_file,
        known_hosts,
        command: command.join(" "),
    })
}

/// A new directory only its owner can enter.
fn private_directory(parent: &Path) -> Result<PathBuf, AccessError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| AccessError::Io { path, source }
    };
    for attempt in 0..16u32 {
        let name = format!(
            "vps-controller-ssh-{}-{}",
            std::process::id(),
            rand::random::<u32>().wrapping_add(attempt)
        );
        let path = parent.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(&path)(e)),
        }
    }
    Err(AccessError::Io {
        path: parent.to_owned(),
        source: std::io::Error::other("could not create a new directory"),
    })
}

/// Creates `path` (never an existing file) with mode 0600 and writes `content`.
fn write_private(path: &Path, content: &[u8]) -> Result<(), AccessError> {
    let io = |source| AccessError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(content).map_err(io)?;
    file.sync_all().map_err(io)
}
