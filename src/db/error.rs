use sea_orm::DbErr;

/// Everything the database layer can fail with. Messages never contain a URL's password.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database URL is malformed or names a backend we do not support.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),

    /// Could not open the database. `url` has its password replaced by `***`, and any copy
    /// of the password in `message` is masked too.
    #[error("cannot connect to database {url}: {message}")]
    Connect { url: String, message: String },

    /// Applying the schema failed; nothing of the failed migration was kept.
    #[error("database migration failed: {0}")]
    Migrate(DbErr),

    /// A query failed (connection lost, constraint, undecodable row, ...).
    #[error("database query failed: {0}")]
    Query(#[from] DbErr),

    /// The subscription row does not exist (any more): deleted while the controller worked.
    #[error("subscription {id:?} not found")]
    SubscriptionNotFound { id: String },

    /// A fenced write was refused: the caller's lease expired or another replica took it over
    /// (a newer epoch). Stop acting; nothing was written.
    #[error(
        "lease lost: this replica no longer holds the leader lease (expired or taken over), \
         so the write was refused; stop acting until the lease is acquired again"
    )]
    LeaseLost,

    /// A stored value the controller cannot use (NULL where a value is needed, a BLOB or an
    /// integer where text is expected, a malformed id, ...). `problem` names the column.
    #[error("{what} cannot be read: {problem}")]
    BadData { what: String, problem: String },

    /// The schema is missing something `vps-controller migrate` creates.
    #[error("{0}; run `vps-controller migrate`")]
    NotMigrated(String),

    /// An argument was rejected before reaching the database.
    #[error("invalid {field}: {problem}")]
    InvalidInput {
        field: &'static str,
        problem: String,
    },
}

impl DbError {
    /// Short, bounded label for the `error` dimension of metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            DbError::InvalidUrl(_) => "invalid_url",
            DbError::Connect { .. } => "connect",
            DbError::Migrate(_) => "migrate",
            DbError::Query(err) => match err {
                DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => "connection",
                DbErr::Type(_) | DbErr::TryIntoErr { .. } | DbErr::Json(_) => "decode",
                _ => "query",
            },
            DbError::SubscriptionNotFound { .. } => "not_found",
            DbError::InvalidInput { .. } => "invalid_input",
            DbError::LeaseLost => "lease_lost",
            DbError::BadData { .. } => "decode",
            DbError::NotMigrated(_) => "not_migrated",
        }
    }
}
