//! Read-only views for operators: `vps-controller plan` and `vps-controller status`.

use std::fmt::Write as _;

use sea_orm::DatabaseConnection;

use chrono::Utc;

use crate::config::Config;
use crate::db::{DbError, StatusUpdate, deletion_guard, events, installation, subscriptions};
use crate::hcloud::HcloudApi;

use super::desired::{self, Owner};
use super::plan::{self, Outcome, Plan};
use super::{ReconcileError, observe, row_state};

/// What the controller would do now, per subscription.
pub struct PlanReport {
    pub entries: Vec<PlanEntry>,
}

pub struct PlanEntry {
    pub subscription_id: String,
    pub plan: Plan,
    /// The reconcile would write the row beyond its bookkeeping (`observed_version`): e.g.
    /// `ready` not yet recorded, an id, an error that is no longer true.
    pub status_pending: bool,
    /// `(from, to)` when the row's `provisioning_status` would change.
    pub status_change: Option<(String, String)>,
    /// Resources no row wants (deleted as orphans), not a subscription.
    pub orphaned: bool,
}

impl PlanEntry {
    /// Whether the controller would change anything: at Hetzner (a report is no change) or
    /// on the row (stamping `observed_version` is none either).
    pub fn has_changes(&self) -> bool {
        self.plan.has_changes() || self.status_pending
    }
}

impl PlanReport {
    /// True when nothing has changes pending, at Hetzner or on a row.
    pub fn in_sync(&self) -> bool {
        self.entries.iter().all(|e| !e.has_changes())
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for entry in &self.entries {
            if !entry.has_changes() && entry.plan.ops.is_empty() {
                continue;
            }
            if entry.has_changes() {
                let _ = writeln!(
                    out,
                    "{}: -> {}",
                    entry.subscription_id,
                    outcome_text(&entry.plan.outcome)
                );
            } else {
                // Only reports (e.g. a server type that differs from the plan's).
                let _ = writeln!(
                    out,
                    "{}: nothing to change ({})",
                    entry.subscription_id,
                    outcome_text(&entry.plan.outcome)
                );
            }
            if let Some((from, to)) = &entry.status_change {
                let _ = writeln!(out, "    provisioning_status: {from} -> {to}");
            }
            for op in &entry.plan.ops {
                let _ = writeln!(out, "    {op}");
            }
        }
        let subscriptions = self.entries.iter().filter(|e| !e.orphaned).count();
        let pending = self
            .entries
            .iter()
            .filter(|e| !e.orphaned && e.has_changes())
            .count();
        let orphans = self
            .entries
            .iter()
            .filter(|e| e.orphaned && e.has_changes())
            .count();
        let _ = write!(
            out,
            "{subscriptions} subscriptions, {pending} with changes pending"
        );
        if orphans > 0 {
            let _ = write!(
                out,
                "; {orphans} groups of resources no subscription wants, to be deleted"
            );
        }
        out.push('\n');
        out
    }
}

fn outcome_text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ready => "ready".into(),
        Outcome::Provisioning => "provisioning (waiting for Hetzner)".into(),
        Outcome::Deprovisioned => "deprovisioned".into(),
        Outcome::Suspended { .. } => "suspended (powered off, kept)".into(),
        Outcome::Held(reason) => format!("held: {reason}"),
        Outcome::Unchanged => "unchanged".into(),
        Outcome::Failed(message) => format!("failed: {message}"),
    }
}

/// Plans every row and every orphan against one listing, like a resync, without acting.
pub async fn plan_all<A: HcloudApi>(
    api: &A,
    db: &DatabaseConnection,
    config: &Config,
) -> Result<PlanReport, ReconcileError> {
    // The database first: an unmigrated one is the likelier mistake than an API problem.
    let table = subscriptions::all(db).await?;
    let owner = Owner::new(installation::id(db).await?, config);
    let snapshot = observe::observe(api, &owner.selector()).await?;
    let rows = table.rows;
    let now = Utc::now();
    let mut entries = Vec::new();
    for row in &rows {
        let desired = desired::desired_for_row(config, &owner, row, now);
        let observed = snapshot.for_subscription(
            &desired.key,
            &desired::resource_name(config, &row.id),
            &super::recorded_ids(Some(row)),
        );
        // The key pair is not opened here (no encryption key needed for `plan`): a stored
        // pair is assumed to match its public key.
        let mut state = row_state(row);
        state.key = match (&row.ssh_private_key, &row.ssh_public_key) {
            (Some(private), _) if !crate::keys::Sealer::looks_sealed(private) => {
                plan::KeyState::External
            }
            (Some(_), Some(public)) => match crate::keys::md5_fingerprint(public) {
                Ok(fingerprint) => plan::KeyState::Sealed { fingerprint },
                Err(e) => plan::KeyState::Unusable(format!("ssh_public_key: {e}")),
            },
            (Some(_), None) => plan::KeyState::Unusable("ssh_public_key is missing".into()),
            (None, _) => plan::KeyState::Missing,
        };
        let plan = plan::plan(&desired, &state, &observed);
        // What the reconcile would write if no op changed anything: the same `settlement`
        // the reconcile and the resync's verdict use. `observed_version` alone is
        // bookkeeping (the spec changed in a way that changes nothing), not a change.
        let progress = super::progress_before(&desired, &state, &observed, &plan);
        let context = super::Settle {
            desired: &desired,
            row_state: &state,
            ready_server: super::ready_server(Some(row)),
            plan: &plan,
            adopting: observed.adopting,
            // What Hetzner would see; the SSH bootstrap is not part of a plan.
            gate: super::Gate::Open,
        };
        let update = super::settlement(&context, Some(row), &progress)
            .map(|settlement| StatusUpdate {
                observed_version: None,
                ..settlement.update
            })
            .unwrap_or_default();
        let status_change = update
            .provisioning_status
            .clone()
            .map(|to| (row.provisioning_status.clone(), to));
        entries.push(PlanEntry {
            subscription_id: row.id.clone(),
            plan,
            status_pending: !update.is_empty(),
            status_change,
            orphaned: false,
        });
    }
    let ids: Vec<&str> = rows
        .iter()
        .map(|r| r.id.as_str())
        .chain(table.bad.iter().filter_map(|b| b.id.as_deref()))
        .collect();
    let recorded: Vec<_> = rows.iter().map(|r| super::recorded_ids(Some(r))).collect();
    for (key, observed) in super::unwanted(config, &snapshot, &ids, &recorded) {
        let desired = desired::desired_for_missing_row(config, &key, &key);
        entries.push(PlanEntry {
            subscription_id: format!("{key} (no subscription wants these)"),
            plan: plan::plan(&desired, &Default::default(), &observed),
            status_pending: false,
            status_change: None,
            orphaned: true,
        });
    }
    Ok(PlanReport { entries })
}

/// The subscriptions table as operators want to see it.
pub async fn status_table(db: &DatabaseConnection) -> Result<String, ReconcileError> {
    let all = subscriptions::all(db).await?;
    let guard = deletion_guard::status(db).await?;
    let mut out = format!("installation: {}\n", installation::id(db).await?);
    match &guard.paused_since {
        Some(since) => {
            let _ = writeln!(
                out,
                "server deletions: PAUSED since {} ({}); resume with `vps-controller deletions approve`",
                since.to_rfc3339(),
                guard.pause_reason.as_deref().unwrap_or("over budget")
            );
        }
        None => {
            let _ = writeln!(
                out,
                "server deletions: allowed ({} in the last hour)",
                guard.deleted_last_hour
            );
        }
    }
    for bad in &all.bad {
        let _ = writeln!(
            out,
            "unreadable row {}: {}",
            bad.id.as_deref().unwrap_or("<NULL id>"),
            shorten(&bad.problem, 120)
        );
    }
    out.push('\n');
    let rows = all.rows;
    let mut table = vec![[
        "ID".to_string(),
        "STATUS".into(),
        "PLAN".into(),
        "PROVISIONING".into(),
        "SERVER".into(),
        "IP".into(),
        "LAST ERROR".into(),
    ]];
    for row in rows {
        table.push([
            row.id,
            row.status.unwrap_or_else(|| "-".into()),
            row.plan.unwrap_or_else(|| "-".into()),
            row.provisioning_status,
            row.hetzner_server_id
                .map(|id| id.to_string())
                .unwrap_or_else(|| "-".into()),
            row.vps_ip_address.unwrap_or_else(|| "-".into()),
            row.provisioning_error
                .map(|e| shorten(&e, 80))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    out.push_str(&render_table(&table));
    Ok(out)
}

/// The recent events of one subscription, newest last; `None` when there is no such
/// subscription: no row, and no event of one that was deleted.
pub async fn events_table(
    db: &DatabaseConnection,
    subscription_id: &str,
) -> Result<Option<String>, ReconcileError> {
    let row = match subscriptions::get(db, subscription_id).await {
        Ok(row) => Ok(row.is_some()),
        // The row is there but does not decode: its events are what helps most.
        Err(DbError::BadData { problem, .. }) => Err(problem),
        Err(e) => return Err(e.into()),
    };
    let mut recent = events::recent(db, Some(subscription_id), 50).await?;
    if row == Ok(false) && recent.is_empty() {
        return Ok(None);
    }
    recent.sort_by_key(|e| e.id);
    let mut out = String::new();
    match row {
        Ok(true) => {}
        Ok(false) => {
            let _ = writeln!(
                out,
                "subscription {subscription_id:?} no longer exists; its recorded events:"
            );
        }
        Err(problem) => {
            let _ = writeln!(
                out,
                "subscription {subscription_id:?} cannot be read ({}); its recorded events:",
                shorten(&problem, 120)
            );
        }
    }
    let mut table = vec![[
        "TIME".to_string(),
        "KIND".into(),
        "REASON".into(),
        "MESSAGE".into(),
    ]];
    for event in recent {
        table.push([
            event.created_at.to_rfc3339(),
            event.kind,
            event.reason,
            event.message,
        ]);
    }
    out.push_str(&render_table(&table));
    Ok(Some(out))
}

fn shorten(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() <= max {
        line.to_string()
    } else {
        format!("{}...", line.chars().take(max).collect::<String>())
    }
}

fn render_table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| format!("{cell:<width$}", width = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}
