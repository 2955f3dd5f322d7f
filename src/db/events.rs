//! A bounded log of what the controller did and why, per subscription (like Kubernetes Events).

use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Statement,
};

use super::DbError;
use super::entities::event::{self, Column, Entity};

/// Events kept per subscription; older ones are trimmed when a new one is recorded.
pub const MAX_EVENTS_PER_SUBSCRIPTION: u64 = 50;
/// Events kept in total.
pub const MAX_EVENTS_TOTAL: u64 = 100_000;
/// Longer messages are cut (on a character boundary) and end with `…`.
pub const MAX_MESSAGE_CHARS: usize = 1_000;
const MAX_REASON_CHARS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Normal,
    Warning,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Normal => "Normal",
            EventKind::Warning => "Warning",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Records an event and trims the table to its bounds. `reason` must be short CamelCase
/// (`ServerCreated`); `message` is free text and must not contain secrets.
pub async fn record(
    db: &impl ConnectionTrait,
    subscription_id: &str,
    kind: EventKind,
    reason: &str,
    message: &str,
) -> Result<(), DbError> {
    check_reason(reason)?;
    let backend = db.get_database_backend();
    // Created_at comes from the column default: the database's clock, like the other
    // timestamps the database writes.
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        "INSERT INTO events (subscription_id, kind, reason, message) VALUES ($1, $2, $3, $4)",
        [
            subscription_id.into(),
            kind.as_str().into(),
            reason.into(),
            truncate(message).into(),
        ],
    ))
    .await?;
    // Keep the newest MAX_EVENTS_PER_SUBSCRIPTION: delete up to the first one past that
    // (walks the (subscription_id, id) index; no-op while there are fewer).
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        "DELETE FROM events WHERE subscription_id = $1 AND id <= (
             SELECT id FROM events WHERE subscription_id = $1
             ORDER BY id DESC LIMIT 1 OFFSET $2)",
        [
            subscription_id.into(),
            (MAX_EVENTS_PER_SUBSCRIPTION as i64).into(),
        ],
    ))
    .await?;
    // Ids only grow, so everything older than the newest MAX_EVENTS_TOTAL ids goes; gaps left
    // by per-subscription trims only make the table smaller than the bound.
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        "DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - $1",
        [(MAX_EVENTS_TOTAL as i64).into()],
    ))
    .await?;
    Ok(())
}

/// The newest events first, of one subscription or of all.
pub async fn recent(
    db: &impl ConnectionTrait,
    subscription_id: Option<&str>,
    limit: u64,
) -> Result<Vec<event::Model>, DbError> {
    let mut query = Entity::find();
    if let Some(id) = subscription_id {
        query = query.filter(Column::SubscriptionId.eq(id));
    }
    Ok(query.order_by_desc(Column::Id).limit(limit).all(db).await?)
}

fn check_reason(reason: &str) -> Result<(), DbError> {
    let problem = if reason.is_empty() {
        Some("must not be empty")
    } else if reason.len() > MAX_REASON_CHARS {
        Some("must be at most 64 characters")
    } else if !reason.starts_with(|c: char| c.is_ascii_uppercase())
        || !reason.chars().all(|c| c.is_ascii_alphanumeric())
    {
        Some("must be CamelCase ASCII letters and digits, like ServerCreated")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(DbError::InvalidInput {
            field: "reason",
            problem: format!("{reason:?} {problem}"),
        }),
        None => Ok(()),
    }
}

fn truncate(message: &str) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_must_be_short_camel_case() {
        assert!(check_reason("ServerCreated").is_ok());
        for bad in [
            "",
            "serverCreated",
            "Server Created",
            "Server-Created",
            &"A".repeat(65),
        ] {
            let err = check_reason(bad).unwrap_err();
            assert_eq!(err.metric_label(), "invalid_input");
            assert!(err.to_string().contains("invalid reason"), "{err}");
        }
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "ä".repeat(MAX_MESSAGE_CHARS + 5);
        let cut = truncate(&long);
        assert_eq!(cut.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short"), "short");
    }
}
