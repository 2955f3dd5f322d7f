//! Bootstraps run here, beside the reconciles: a reconcile that finds a new server running
//! starts one (`start`) and settles the row as `provisioning`; the bootstrap runs on its own
//! task, at most `ssh.concurrency` at a time, and when it ends it asks for the subscription to
//! be reconciled again (`take_finished`). That reconcile sees the outcome (`state`): done
//! makes the row `ready`; a host key mismatch is the reconcile's terminal error. Other
//! failures are retried here, with the controller's backoff, and shown on the row meanwhile.
//! So SSH never holds a reconcile worker or Hetzner's request budget, and a slow server
//! never blocks another.
//!
//! The outcome lives in memory: after a restart the next reconcile starts the bootstrap
//! again, and the marker on the server makes it resume where it stopped.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use russh::keys::PublicKey;
use sea_orm::DatabaseConnection;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::config::{Bootstrap, SshSettings};
use crate::db::events::{self, EventKind};
use crate::db::subscriptions::{self, StatusUpdate};
use crate::fencing::{Leadership, Term};
use crate::reconcile::desired::shown_id;
use crate::telemetry::metrics::Metrics;

use super::SshError;
use super::bootstrap::{self, Limits, Ran};
use super::session::{HostKeyCheck, Session, fingerprint};

/// What the bootstrapper knows of a subscription's bootstrap on one server.
#[derive(Clone, Debug, PartialEq)]
pub enum BootstrapState {
    /// None started since this process started (or it was forgotten).
    NotStarted,
    Running,
    Done,
    Failed(SshError),
}

/// One bootstrap to run.
pub struct Job {
    pub subscription_id: String,
    pub server_id: i64,
    pub address: IpAddr,
    /// The subscription's private key, opened.
    pub private_key: Zeroizing<String>,
    /// The host key pinned on the row (OpenSSH line); `None` pins what the server presents.
    pub host_key: Option<String>,
    pub bootstrap: Option<Bootstrap>,
}

/// Where a job runs: the database, and the leadership term it belongs to.
pub struct Context {
    pub db: DatabaseConnection,
    pub leadership: Leadership,
    pub term: Term,
}

enum Outcome {
    Running(tokio::task::AbortHandle),
    Done,
    Failed(SshError),
}

struct Entry {
    server_id: i64,
    outcome: Outcome,
}

pub struct Bootstrapper {
    settings: SshSettings,
    permits: Arc<Semaphore>,
    entries: Mutex<HashMap<String, Entry>>,
    /// Subscriptions whose bootstrap ended since the controller last asked.
    finished: Mutex<Vec<String>>,
    open: AtomicUsize,
    waiting: AtomicUsize,
    metrics: Arc<Metrics>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Bootstrapper {
    pub fn new(settings: SshSettings, metrics: Arc<Metrics>) -> Bootstrapper {
        Bootstrapper {
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            settings,
            entries: Mutex::default(),
            finished: Mutex::default(),
            open: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            metrics,
        }
    }

    /// Whether `ready` waits for SSH at all (`ssh.enabled`).
    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    pub fn state(&self, subscription_id: &str, server_id: i64) -> BootstrapState {
        match lock(&self.entries).get(subscription_id) {
            Some(entry) if entry.server_id == server_id => match &entry.outcome {
                Outcome::Running(_) => BootstrapState::Running,
                Outcome::Done => BootstrapState::Done,
                Outcome::Failed(error) => BootstrapState::Failed(error.clone()),
            },
            _ => BootstrapState::NotStarted,
        }
    }

    /// Drops what is known of the subscription's bootstrap (a failure was reported, or the
    /// row is `ready`); a bootstrap still running is stopped.
    pub fn forget(&self, subscription_id: &str) {
        if let Some(Entry {
            outcome: Outcome::Running(task),
            ..
        }) = lock(&self.entries).remove(subscription_id)
        {
            task.abort();
        }
    }

    /// The subscriptions whose bootstrap ended since the last call: reconcile them now.
    pub fn take_finished(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.finished))
    }

    /// Starts `job` unless a bootstrap of the same server is running or known; one of another
    /// server (replaced since) is stopped.
    pub fn start(self: &Arc<Self>, context: Context, job: Job) {
        let mut entries = lock(&self.entries);
        if entries
            .get(&job.subscription_id)
            .is_some_and(|e| e.server_id == job.server_id)
        {
            return;
        }
        if let Some(Entry {
            outcome: Outcome::Running(task),
            ..
        }) = entries.remove(&job.subscription_id)
        {
            task.abort();
        }
        let id = job.subscription_id.clone();
        let server_id = job.server_id;
        let this = Arc::clone(self);
        // Registered before the task can finish, under the same lock.
        let task = tokio::spawn(async move {
            let Context {
                db,
                leadership,
                term,
            } = context;
            let outcome = tokio::select! {
                biased;
                _ = leadership.ended(&term) => None,
                outcome = this.run_until_done(&db, &term, &job) => Some(outcome),
            };
            if let Some(outcome) = outcome {
                this.finish(&job, outcome);
            } else {
                this.forget(&job.subscription_id);
            }
        });
        entries.insert(
            id,
            Entry {
                server_id,
                outcome: Outcome::Running(task.abort_handle()),
            },
        );
    }

    fn finish(&self, job: &Job, outcome: Result<(), SshError>) {
        let mut entries = lock(&self.entries);
        if let Some(entry) = entries
            .get_mut(&job.subscription_id)
            .filter(|e| e.server_id == job.server_id)
        {
            entry.outcome = match outcome {
                Ok(()) => Outcome::Done,
                Err(error) => Outcome::Failed(error),
            };
        }
        drop(entries);
        lock(&self.finished).push(job.subscription_id.clone());
    }

    /// Attempts until the bootstrap is done or stopped by a host key mismatch. A failed
    /// attempt is written on the row and as an event, then retried after the controller's
    /// backoff (2 s doubling to 5 min, with jitter). While it retries the row simply waits:
    /// no reconcile, no Hetzner request.
    async fn run_until_done(
        &self,
        db: &DatabaseConnection,
        term: &Term,
        job: &Job,
    ) -> Result<(), SshError> {
        let mut failures = 0;
        loop {
            match self.run(db, term, job).await {
                Err(error) if !error.is_terminal() => {
                    failures += 1;
                    let delay = crate::controller::workset::backoff(failures);
                    let message = crate::reconcile::desired::bounded(
                        &format!(
                            "bootstrap over SSH: {error} (attempt {failures}; next in {} s)",
                            delay.as_secs().max(1)
                        ),
                        crate::reconcile::desired::MAX_ERROR_CHARS,
                    );
                    if let Err(e) = record_failure(db, term, job, &message).await {
                        tracing::warn!(subscription = %shown_id(&job.subscription_id), error = %e, "could not record the failed bootstrap on the row");
                    }
                    tokio::time::sleep(delay).await;
                }
                outcome => return outcome,
            }
        }
    }

    /// One attempt: wait for a session, log in, bootstrap; record what happened.
    async fn run(&self, db: &DatabaseConnection, term: &Term, job: &Job) -> Result<(), SshError> {
        let shown = shown_id(&job.subscription_id);
        let waiting = Counted::new(self, &self.waiting);
        let permit = Arc::clone(&self.permits).acquire_owned().await;
        drop(waiting);
        let Ok(_permit) = permit else {
            return Err(SshError::Protocol(
                "the bootstrapper is shutting down".into(),
            ));
        };
        let _open = Counted::new(self, &self.open);
        let started = Instant::now();
        let result = self.attempt(job).await;
        let (result, label) = match result {
            Ok((ran, presented)) => {
                let pinned = match job.host_key {
                    Some(_) => None,
                    None => Some(presented),
                };
                let recorded = self
                    .record_success(db, term, job, &ran, pinned.as_ref())
                    .await;
                tracing::info!(
                    subscription = %shown,
                    server = job.server_id,
                    steps_run = ran.ran,
                    steps_already_done = ran.skipped,
                    seconds = started.elapsed().as_secs_f64(),
                    "bootstrap finished"
                );
                (recorded, "success")
            }
            Err(error @ SshError::HostKeyMismatch { .. }) => {
                tracing::error!(subscription = %shown, server = job.server_id, error = %error, "SSH host key mismatch: bootstrap stopped");
                (Err(error), "host_key_mismatch")
            }
            Err(error) => {
                tracing::warn!(subscription = %shown, server = job.server_id, error = %error, "bootstrap attempt failed; retried with backoff");
                (Err(error), "failure")
            }
        };
        self.metrics.bootstrap_finished(label);
        result
    }

    async fn attempt(&self, job: &Job) -> Result<(Ran, PublicKey), SshError> {
        let key = russh::keys::decode_secret_key(&job.private_key, None)
            .map_err(|e| SshError::Key(e.to_string()))?;
        let check = match &job.host_key {
            Some(line) => HostKeyCheck::Pinned(PublicKey::from_openssh(line).map_err(|e| {
                SshError::Key(format!(
                    "the host key pinned on the row (ssh_host_key) does not parse: {e}"
                ))
            })?),
            None => HostKeyCheck::FirstUse,
        };
        let settings = &self.settings;
        let session = Session::connect(
            SocketAddr::new(job.address, settings.port),
            &settings.user,
            key,
            check,
            Duration::from_secs(settings.connect_timeout_seconds),
        )
        .await?;
        let limits = Limits {
            cloud_init: Duration::from_secs(settings.cloud_init_timeout_seconds),
            command: Duration::from_secs(settings.command_timeout_seconds),
        };
        let result = bootstrap::run(&session, job.bootstrap.as_ref(), limits).await;
        let presented = session.host_key.clone();
        session.close().await;
        Ok((result?, presented))
    }

    /// Pins a first-use host key on the row and records the event. Fenced: a replica that
    /// lost its term writes nothing.
    async fn record_success(
        &self,
        db: &DatabaseConnection,
        term: &Term,
        job: &Job,
        ran: &Ran,
        pinned: Option<&PublicKey>,
    ) -> Result<(), SshError> {
        let db_error =
            |e: crate::db::DbError| SshError::Protocol(format!("recording the bootstrap: {e}"));
        if let Some(key) = pinned {
            let line = key.to_openssh().map_err(|e| SshError::Key(e.to_string()))?;
            let update = StatusUpdate {
                ssh_host_key: Some(Some(line)),
                ..Default::default()
            };
            subscriptions::write_status(db, term.fence.as_ref(), &job.subscription_id, &update)
                .await
                .map_err(db_error)?;
            events::record(
                db,
                &job.subscription_id,
                EventKind::Warning,
                "HostKeyPinned",
                &format!(
                    "server {} presented host key {} at the first login; pinned (the controller did not create this server with a known host key)",
                    job.server_id,
                    fingerprint(key)
                ),
            )
            .await
            .map_err(db_error)?;
        }
        let message = match &job.bootstrap {
            Some(bootstrap) => format!(
                "server {} answers SSH, cloud-init finished, bootstrap version {}: {} steps run, {} done before",
                job.server_id, bootstrap.version, ran.ran, ran.skipped
            ),
            None => format!(
                "server {} answers SSH and cloud-init finished (the plan has no bootstrap steps)",
                job.server_id
            ),
        };
        events::record(
            db,
            &job.subscription_id,
            EventKind::Normal,
            "Bootstrapped",
            &message,
        )
        .await
        .map_err(db_error)
    }

    fn report_sessions(&self) {
        self.metrics.set_ssh_sessions(
            self.open.load(Ordering::Relaxed),
            self.waiting.load(Ordering::Relaxed),
        );
    }
}

/// Shows a failed attempt on the row (fenced) and as a `Retrying` event.
async fn record_failure(
    db: &DatabaseConnection,
    term: &Term,
    job: &Job,
    message: &str,
) -> Result<(), crate::db::DbError> {
    let update = StatusUpdate {
        provisioning_error: Some(Some(message.to_owned())),
        ..Default::default()
    };
    subscriptions::write_status(db, term.fence.as_ref(), &job.subscription_id, &update).await?;
    events::record(
        db,
        &job.subscription_id,
        EventKind::Warning,
        "Retrying",
        message,
    )
    .await
}

/// Counts a waiting bootstrap or an open session for the metrics while it lives, also when
/// the task is stopped half-way (its future dropped).
struct Counted<'a> {
    bootstrapper: &'a Bootstrapper,
    count: &'a AtomicUsize,
}

impl<'a> Counted<'a> {
    fn new(bootstrapper: &'a Bootstrapper, count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        bootstrapper.report_sessions();
        Counted {
            bootstrapper,
            count,
        }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.bootstrapper.report_sessions();
    }
}
