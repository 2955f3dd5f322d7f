//! Hostile rows: whatever the web app (or a person with a SQL prompt) leaves in
//! `subscriptions`, the controller neither panics nor stalls. Every row it cannot act on ends
//! `held` or `failed` with an error that names the column and stays short; every row it can
//! act on converges (ready, one server each) next to them.
//!
//! The corpus is generated with proptest strategies from a fixed seed, so a failure names a
//! seed and replays. `HOSTILE_ROWS=N` (default 1000) sets the corpus size, `HOSTILE_SEED=S`
//! the seed, `PROPTEST_CASES=N` the cases of the pure properties (default 256).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, TestRng, TestRunner};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement, TransactionTrait, Value};

use common::env::{Env, Options, env_custom};
use vps_controller::config::{Config, Policy};
use vps_controller::db::entities::subscription;
use vps_controller::db::{events, subscriptions};
use vps_controller::reconcile::desired::{
    self, MAX_ERROR_CHARS, Owner, Want, desired_for_row, resource_key,
};

/// Longest log line the controller may write while it chews on the corpus. Row values are
/// up to 100 kB; a line quoting one whole is a bug, a line with a bounded error is fine.
const MAX_LOG_LINE: usize = 4096;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cases() -> u32 {
    env_number("PROPTEST_CASES", 256) as u32
}

// ---------------------------------------------------------------------------------------------
// The values a column can hold.

/// One cell as written into the table. SQLite stores whatever it is given (a BLOB in a TEXT
/// column, text in a BIGINT one); PostgreSQL refuses what does not fit the column type, so
/// [`Cell::for_backend`] turns a cell into what could exist there.
#[derive(Clone, Debug, PartialEq)]
enum Cell {
    Null,
    Text(String),
    Blob(Vec<u8>),
    Int(i64),
    Real(f64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Text,
    BigInt,
}

impl Cell {
    fn text(s: impl Into<String>) -> Cell {
        Cell::Text(s.into())
    }

    /// What PostgreSQL can hold in a column of `kind` (no NUL in text, no BLOB in text, only
    /// integers in BIGINT); SQLite holds anything.
    fn for_backend(self, postgres: bool, kind: Kind) -> Cell {
        if !postgres {
            return self;
        }
        match (kind, self) {
            (_, Cell::Null) => Cell::Null,
            (Kind::Text, Cell::Text(s)) => Cell::Text(s.replace('\0', "")),
            (Kind::Text, Cell::Blob(b)) => {
                Cell::Text(String::from_utf8_lossy(&b).replace('\0', ""))
            }
            (Kind::Text, Cell::Int(i)) => Cell::Text(i.to_string()),
            (Kind::Text, Cell::Real(f)) => Cell::Text(f.to_string()),
            (Kind::BigInt, Cell::Int(i)) => Cell::Int(i),
            (Kind::BigInt, _) => Cell::Null,
        }
    }

    fn value(&self, kind: Kind) -> Value {
        match (self, kind) {
            (Cell::Null, Kind::Text) => Value::String(None),
            (Cell::Null, Kind::BigInt) => Value::BigInt(None),
            (Cell::Text(s), _) => Value::String(Some(s.clone())),
            (Cell::Blob(b), _) => Value::Bytes(Some(b.clone())),
            (Cell::Int(i), _) => Value::BigInt(Some(*i)),
            (Cell::Real(f), _) => Value::Double(Some(*f)),
        }
    }

    /// The text the controller reads from a TEXT column holding this cell, or `None` when it
    /// cannot read it as text (SQLite converts numbers stored in a TEXT column to text).
    fn as_text(&self) -> Option<Option<String>> {
        match self {
            Cell::Null => Some(None),
            Cell::Text(s) => Some(Some(s.clone())),
            Cell::Int(i) => Some(Some(i.to_string())),
            Cell::Real(_) | Cell::Blob(_) => None,
        }
    }

    /// Whether the controller can read this cell from a TEXT column.
    fn readable_text(&self) -> bool {
        match self {
            // SQLite stores a REAL in a TEXT column as its text.
            Cell::Real(_) => true,
            cell => cell.as_text().is_some(),
        }
    }

    /// Whether the controller can read this cell from a BIGINT column.
    fn readable_bigint(&self) -> bool {
        match self {
            Cell::Null | Cell::Int(_) => true,
            // INTEGER affinity turns text that is an integer into one.
            Cell::Text(s) => s.trim().parse::<i64>().is_ok(),
            Cell::Blob(_) | Cell::Real(_) => false,
        }
    }

    fn short(&self) -> String {
        desired::bounded(&format!("{self:?}"), 60)
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

/// Text a column may hold: empty, plausible, any unicode, control and invisible characters,
/// and 50-100 kB (bytes) of one character or a short pattern.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(String::new()),
        5 => "[a-z0-9_-]{1,12}",
        6 => any::<String>(),
        5 => "[\\x00-\\x1f\\x7f\u{80}-\u{9f}\u{200b}-\u{200f}\u{2028}\u{2029}\u{feff}a-z]{1,12}",
        1 => prop_oneof![
            (any::<char>(), 50_000usize..=100_000)
                .prop_map(|(c, bytes)| c.to_string().repeat(bytes / c.len_utf8())),
            "[A-Za-z0-9]{1,4}".prop_map(|s| s.repeat(100_000 / s.len())),
        ],
    ]
}

/// A cell of a TEXT column: mostly text, sometimes NULL, a BLOB or a number.
fn text_cell(text: impl Strategy<Value = String> + 'static) -> impl Strategy<Value = Cell> {
    prop_oneof![
        8 => text.prop_map(Cell::Text),
        2 => Just(Cell::Null),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Cell::Blob),
        1 => any::<i64>().prop_map(Cell::Int),
        1 => (-1e6f64..1e6).prop_map(Cell::Real),
    ]
}

const KNOWN_STATUSES: [&str; 9] = [
    "active",
    "trialing",
    "past_due",
    "paused",
    "unpaid",
    "canceled",
    "incomplete_expired",
    "incomplete",
    "unknown",
];

/// A known status made odd: other case, padding, a control or zero-width character.
fn odd_status() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(&KNOWN_STATUSES[..]),
        0usize..6,
        any::<u64>(),
    )
        .prop_map(|(status, how, bits)| match how {
            0 => status.to_uppercase(),
            1 => status
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if bits >> (i % 64) & 1 == 1 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect(),
            2 => format!(" {status}"),
            3 => format!("{status}\n"),
            4 => format!("{status}\u{200b}"),
            _ => format!("{status}\0"),
        })
}

fn status_cell() -> impl Strategy<Value = Cell> {
    prop_oneof![
        4 => proptest::sample::select(&["active", "trialing", "past_due"][..]).prop_map(Cell::text),
        2 => proptest::sample::select(&KNOWN_STATUSES[3..]).prop_map(Cell::text),
        3 => odd_status().prop_map(Cell::Text),
        3 => text_cell(hostile_text()),
    ]
}

fn plan_cell() -> impl Strategy<Value = Cell> {
    prop_oneof![
        3 => proptest::sample::select(&["starter", "pro"][..]).prop_map(Cell::text),
        2 => proptest::sample::select(&["Starter", "PRO", " starter", "starter\n", "pro\0", "stärter"][..])
            .prop_map(Cell::text),
        5 => text_cell(hostile_text()),
    ]
}

fn id_cell() -> impl Strategy<Value = Cell> {
    prop_oneof![
        30 => hostile_text().prop_map(Cell::Text),
        1 => Just(Cell::Null),
        1 => proptest::collection::vec(any::<u8>(), 0..20).prop_map(Cell::Blob),
        1 => any::<i64>().prop_map(Cell::Int),
    ]
}

/// The controller's own columns, as someone with a SQL prompt may have left them. Mostly
/// untouched (the column defaults).
#[derive(Clone, Debug, Default)]
struct Written {
    provisioning_status: Option<Cell>,
    provisioning_error: Option<Cell>,
    hetzner_server_id: Option<Cell>,
    vps_hostname: Option<Cell>,
    /// `provisioning_status` `failed` and `observed_version` = `desired_version`: a terminal
    /// failure of this very version, kept until the row changes.
    observed: bool,
}

fn written() -> impl Strategy<Value = Written> {
    let sometimes = |s: BoxedStrategy<Cell>| proptest::option::weighted(0.15, s);
    (
        sometimes(
            prop_oneof![
                proptest::sample::select(
                    &[
                        "ready",
                        "failed",
                        "held",
                        "deprovisioned",
                        "provisioning",
                        "READY",
                        ""
                    ][..]
                )
                .prop_map(Cell::text),
                // Short: the controller's own index on the column refuses 100 kB on
                // PostgreSQL, and only the controller writes it.
                "(?s).{0,40}".prop_map(Cell::Text),
            ]
            .boxed(),
        ),
        sometimes(text_cell(hostile_text()).boxed()),
        sometimes(
            prop_oneof![
                proptest::sample::select(&[987_654_321i64, 0, -5, i64::MAX][..])
                    .prop_map(Cell::Int),
                Just(Cell::text("not a number")),
                Just(Cell::Real(1.5)),
                Just(Cell::Blob(vec![1, 2, 3])),
            ]
            .boxed(),
        ),
        sometimes(text_cell(hostile_text()).boxed()),
        proptest::bool::weighted(0.06),
    )
        .prop_map(
            |(
                provisioning_status,
                provisioning_error,
                hetzner_server_id,
                vps_hostname,
                observed,
            )| {
                Written {
                    // A terminal failure recorded for this version.
                    provisioning_status: if observed {
                        Some(Cell::text("failed"))
                    } else {
                        provisioning_status
                    },
                    provisioning_error,
                    hetzner_server_id,
                    vps_hostname,
                    observed,
                }
            },
        )
}

/// `observed_version` equal to the default `desired_version` of a new row.
const OBSERVED: Cell = Cell::Int(1);

#[derive(Clone, Debug)]
struct HostileRow {
    id: Cell,
    user_id: Cell,
    stripe_subscription_id: Cell,
    status: Cell,
    plan: Cell,
    written: Written,
}

fn hostile_row() -> impl Strategy<Value = HostileRow> {
    (
        id_cell(),
        text_cell(hostile_text()),
        text_cell(hostile_text()),
        status_cell(),
        plan_cell(),
        written(),
    )
        .prop_map(
            |(id, user_id, stripe_subscription_id, status, plan, written)| HostileRow {
                id,
                user_id,
                stripe_subscription_id,
                status,
                plan,
                written,
            },
        )
}

impl HostileRow {
    fn for_backend(self, postgres: bool) -> HostileRow {
        let text = |c: Cell| c.for_backend(postgres, Kind::Text);
        let written = self.written;
        HostileRow {
            id: text(self.id),
            user_id: text(self.user_id),
            stripe_subscription_id: text(self.stripe_subscription_id),
            status: text(self.status),
            plan: text(self.plan),
            written: Written {
                // NOT NULL DEFAULT 'pending' on both backends.
                provisioning_status: written
                    .provisioning_status
                    .map(text)
                    .filter(|c| *c != Cell::Null),
                provisioning_error: written.provisioning_error.map(text),
                hetzner_server_id: written
                    .hetzner_server_id
                    .map(|c| c.for_backend(postgres, Kind::BigInt)),
                vps_hostname: written.vps_hostname.map(text),
                observed: written.observed,
            },
        }
    }

    /// The key two rows must not share: PostgreSQL compares text; SQLite's TEXT affinity
    /// turns numbers into text, while a BLOB stays apart.
    fn id_key(&self) -> Option<String> {
        match &self.id {
            Cell::Null => None,
            Cell::Text(s) => Some(s.clone()),
            Cell::Int(i) => Some(i.to_string()),
            Cell::Real(f) => Some(f.to_string()),
            Cell::Blob(b) => Some(format!("blob:{b:?}")),
        }
    }

    /// The id the controller reads, when it can read one.
    fn readable_id(&self) -> Option<String> {
        self.id.as_text().flatten()
    }

    /// `(column, cell)` of every column the INSERT names.
    fn columns(&self) -> Vec<(&'static str, Kind, &Cell)> {
        let mut columns = vec![
            ("id", Kind::Text, &self.id),
            ("user_id", Kind::Text, &self.user_id),
            (
                "stripe_subscription_id",
                Kind::Text,
                &self.stripe_subscription_id,
            ),
            ("status", Kind::Text, &self.status),
            ("plan", Kind::Text, &self.plan),
        ];
        let w = &self.written;
        for (name, kind, cell) in [
            ("provisioning_status", Kind::Text, &w.provisioning_status),
            ("provisioning_error", Kind::Text, &w.provisioning_error),
            ("hetzner_server_id", Kind::BigInt, &w.hetzner_server_id),
            ("vps_hostname", Kind::Text, &w.vps_hostname),
        ] {
            if let Some(cell) = cell {
                columns.push((name, kind, cell));
            }
        }
        if w.observed {
            columns.push(("observed_version", Kind::BigInt, &OBSERVED));
        }
        columns
    }

    /// Columns the controller decodes but cannot read in this row.
    fn unreadable_columns(&self) -> Vec<&'static str> {
        self.columns()
            .into_iter()
            .filter(|(name, kind, cell)| {
                *name != "id"
                    && match kind {
                        Kind::Text => !cell.readable_text(),
                        Kind::BigInt => !cell.readable_bigint(),
                    }
            })
            .map(|(name, _, _)| name)
            .collect()
    }
}

/// What the controller must make of a row.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    /// One server running, row `ready`.
    Ready,
    /// Nothing created; the row `suspended` (suspend policy: nothing is created).
    Suspended,
    /// Nothing at Hetzner; row `deprovisioned`, or left as it is when it never held
    /// anything.
    Deprovisioned,
    /// Row `held`, the error naming the status.
    Held,
    /// Row `failed`, the error naming the plan.
    BadPlan,
    /// Row `failed`: one of these columns cannot be read.
    Unreadable(Vec<&'static str>),
    /// Row stays `failed` with the error it had (cut to the bound): a terminal failure of
    /// this version waits for the row to change.
    StaysFailed,
    /// No id the controller can read: nothing created, nothing written.
    NoId,
}

fn expect(row: &HostileRow, config: &Config) -> Expect {
    if row.readable_id().is_none() {
        return Expect::NoId;
    }
    let mut unreadable = row.unreadable_columns();
    // Marking an unreadable row failed overwrites its provisioning_error: when that was the
    // only bad column, the row reads fine from then on and is reconciled like any other.
    unreadable.retain(|column| *column != "provisioning_error");
    if !unreadable.is_empty() {
        return Expect::Unreadable(unreadable);
    }
    let settled_failure = row.written.observed;
    let status = row.status.as_text().flatten();
    let plan = row.plan.as_text().flatten();
    let plan_ok = plan.as_ref().is_some_and(|p| config.plans.contains_key(p));
    match config.lifecycle.policy(status.as_deref()) {
        Policy::Hold => Expect::Held,
        Policy::Delete if settled_failure => Expect::StaysFailed,
        Policy::Delete => Expect::Deprovisioned,
        _ if !plan_ok => Expect::BadPlan,
        _ if settled_failure => Expect::StaysFailed,
        // Grace with an unknown start counts from now: still running.
        Policy::Run | Policy::Grace => Expect::Ready,
        Policy::Suspend => Expect::Suspended,
    }
}

/// `n` rows from `seed`, unique by id as the backend compares ids.
fn corpus(seed: u64, n: usize, postgres: bool) -> Vec<HostileRow> {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let strategy = hostile_row();
    let mut rows = fixed_rows();
    let mut seen: BTreeSet<String> = rows.iter().filter_map(HostileRow::id_key).collect();
    while rows.len() < n {
        let row = strategy
            .new_tree(&mut runner)
            .expect("generate a row")
            .current()
            .for_backend(postgres);
        // SQLite allows any number of NULL ids; PostgreSQL's primary key none.
        if matches!(row.id, Cell::Null) && postgres {
            continue;
        }
        if let Some(key) = row.id_key()
            && !seen.insert(key)
        {
            continue;
        }
        rows.push(row);
    }
    rows
}

/// Rows every corpus has: ids that look alike once cleaned, each of which must get its own
/// server, and the 100 kB plan that was once copied whole into `provisioning_error`.
fn fixed_rows() -> Vec<HostileRow> {
    let valid = |id: String| HostileRow {
        id: Cell::Text(id.clone()),
        user_id: Cell::text("u"),
        stripe_subscription_id: Cell::Null,
        status: Cell::text("active"),
        plan: Cell::text("starter"),
        written: Written::default(),
    };
    let mut rows: Vec<HostileRow> = [
        "CaseDup".to_string(),
        "casedup".to_string(),
        "casedup-c9aee856".to_string(),
        resource_key("CaseDup"),
        "sub_1ABC".to_string(),
        "sub-1abc".to_string(),
        String::new(),
        "ünïcødé 🚀".to_string(),
        "tab\there\nnewline".to_string(),
        "-unattributed".to_string(),
        "a".repeat(100_000),
        format!("{}b", "a".repeat(99_999)),
    ]
    .into_iter()
    .map(valid)
    .collect();
    rows.push(HostileRow {
        id: Cell::text("huge-plan"),
        plan: Cell::Text("p".repeat(100_000)),
        ..valid(String::new())
    });
    // Suspended (nothing is created) with a server id on the row that Hetzner does not know.
    rows.push(HostileRow {
        id: Cell::text("suspended-gone-server"),
        status: Cell::text("paused"),
        written: Written {
            hetzner_server_id: Some(Cell::Int(987_654_321)),
            ..Written::default()
        },
        ..valid(String::new())
    });
    // A terminal failure of this version whose error someone made 100 kB long.
    rows.push(HostileRow {
        id: Cell::text("huge-settled-error"),
        written: Written {
            provisioning_status: Some(Cell::text("failed")),
            provisioning_error: Some(Cell::Text("E".repeat(100_000))),
            observed: true,
            ..Written::default()
        },
        ..valid(String::new())
    });
    rows.push(HostileRow {
        id: Cell::text("huge-status"),
        status: Cell::Text("s".repeat(100_000)),
        ..valid(String::new())
    });
    rows
}

// ---------------------------------------------------------------------------------------------
// Log capture: every line the controller logs, checked for length.

#[derive(Clone, Default)]
struct LogSink {
    longest: Arc<Mutex<(usize, String)>>,
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut longest = self.longest.lock().unwrap();
        for line in text.lines() {
            let chars = line.chars().count();
            if chars > longest.0 {
                *longest = (chars, line.chars().take(300).collect());
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_sink() -> &'static LogSink {
    static SINK: OnceLock<LogSink> = OnceLock::new();
    SINK.get_or_init(|| {
        let sink = LogSink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("vps_controller=debug"))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        sink
    })
}

// ---------------------------------------------------------------------------------------------
// The corpus against a running controller.

/// A web-app table without NOT NULL constraints: NULL user ids, statuses and plans happen
/// there (and NULL ids on SQLite, whose TEXT primary key allows them).
fn nullable_table(postgres: bool) -> String {
    let timestamp = if postgres { "TIMESTAMPTZ" } else { "INTEGER" };
    format!(
        "CREATE TABLE subscriptions (id TEXT PRIMARY KEY, user_id TEXT, stripe_subscription_id TEXT, \
         status TEXT, plan TEXT, created_at {timestamp}, updated_at {timestamp})"
    )
}

/// Inserts `row`; false when PostgreSQL refuses its id for the primary key's index (too long
/// even compressed): such a row cannot exist there. Any other refusal fails the test: one of
/// the controller's triggers or indexes would be turning the web app's write down.
async fn insert(db: &impl ConnectionTrait, row: &HostileRow) -> bool {
    let columns = row.columns();
    let names: Vec<&str> = columns.iter().map(|(name, _, _)| *name).collect();
    let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
    let values: Vec<Value> = columns
        .iter()
        .map(|(_, kind, cell)| cell.value(*kind))
        .collect();
    let sql = format!(
        "INSERT INTO subscriptions ({}) VALUES ({})",
        names.join(", "),
        placeholders.join(", ")
    );
    let statement = Statement::from_sql_and_values(db.get_database_backend(), sql, values);
    match db.execute_raw(statement).await {
        Ok(_) => true,
        Err(e) if e.to_string().contains("for index \"subscriptions_pkey\"") => false,
        Err(e) => panic!("insert {:?}: {e}", row.id.short()),
    }
}

/// Inserts every row of `rows` the database accepts, in one transaction (a savepoint per
/// row, so a refused row leaves the others); returns those.
async fn insert_all(db: &DatabaseConnection, rows: Vec<HostileRow>) -> Vec<HostileRow> {
    let txn = db.begin().await.unwrap();
    let mut inserted = Vec::with_capacity(rows.len());
    for row in rows {
        let savepoint = txn.begin().await.unwrap();
        if insert(&savepoint, &row).await {
            savepoint.commit().await.unwrap();
            inserted.push(row);
        } else {
            savepoint.rollback().await.unwrap();
        }
    }
    txn.commit().await.unwrap();
    inserted
}

/// `(provisioning_status, provisioning_error)` of every row with a text id, read column by
/// column, so rows the controller cannot decode can be checked too.
async fn written_back(db: &DatabaseConnection) -> BTreeMap<String, (String, Option<String>)> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT id, provisioning_status, provisioning_error FROM subscriptions",
        ))
        .await
        .unwrap();
    rows.iter()
        .filter_map(|row| {
            let id = row.try_get::<String>("", "id").ok()?;
            let status = row
                .try_get::<String>("", "provisioning_status")
                .unwrap_or_else(|e| format!("<unreadable: {e}>"));
            let error = row
                .try_get::<Option<String>>("", "provisioning_error")
                .unwrap_or_else(|e| Some(format!("<unreadable: {e}>")));
            Some((id, (status, error)))
        })
        .collect()
}

async fn hostile_env(test_db: &common::TestDb) -> Env {
    let mut config = Options::default().config;
    // Deleting the whole corpus at the end is not what the deletion budget is about.
    config.deletion_budget.min_per_hour = 10_000;
    env_custom(
        test_db,
        Options {
            web_app_table: Some(nullable_table(test_db.is_postgres())),
            config,
            ..Options::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_corpus_fails_or_holds_each_bad_row_alone_and_the_good_ones_converge() {
    let sink = log_sink();
    let seed = env_number("HOSTILE_SEED", 0x5eed_0011);
    let n = env_number("HOSTILE_ROWS", 1000) as usize;
    for test_db in common::test_databases().await {
        let started = Instant::now();
        let env = hostile_env(&test_db).await;
        let backend = env.backend;
        let config = Options::default().config;
        let rows = insert_all(&env.db, corpus(seed, n, test_db.is_postgres())).await;
        let inserted = started.elapsed();

        // A change pass, then resyncs until two in a row find nothing to do (a server still
        // starting is looked at again by the next pass; a row whose only unreadable column
        // was its provisioning_error reads fine once marked, and is reconciled by the next).
        env.process_changes().await;
        let changed = started.elapsed();
        let mut passes = 0;
        let mut idle = 0;
        loop {
            let report =
                env.controller.resync().await.unwrap_or_else(|e| {
                    panic!("[{backend}] seed {seed:#x}: the resync failed: {e}")
                });
            passes += 1;
            assert_eq!(
                report.failed, 0,
                "[{backend}] seed {seed:#x}: reconciles failed: {report:?}"
            );
            idle = if report.reconciled == 0 { idle + 1 } else { 0 };
            if idle == 2 || passes == 10 {
                break;
            }
        }
        // A settled table costs nothing: no row is reconciled again and again.
        assert_eq!(
            idle, 2,
            "[{backend}] seed {seed:#x}: rows are still reconciled after {passes} resyncs"
        );

        let servers = env.list("servers").await;
        let mut servers_by_key: BTreeMap<String, usize> = BTreeMap::new();
        for server in &servers {
            let key = server["labels"]["vps-controller/subscription"]
                .as_str()
                .unwrap_or("<none>")
                .to_string();
            *servers_by_key.entry(key).or_default() += 1;
        }
        let written = written_back(&env.db).await;
        let mut tally: BTreeMap<String, usize> = BTreeMap::new();
        let mut ready = 0;
        for row in &rows {
            let expected = expect(row, &config);
            *tally
                .entry(format!("{expected:?}").chars().take(12).collect())
                .or_default() += 1;
            let Some(id) = row.readable_id() else {
                continue;
            };
            let shown = desired::bounded(&id, 40);
            let (status, error) = written
                .get(&id)
                .cloned()
                .unwrap_or_else(|| panic!("[{backend}] row {shown:?} is gone"));
            let error_text = error.clone().unwrap_or_default();
            let context = || {
                format!(
                    "[{backend}] seed {seed:#x} row {shown:?} (status {}, plan {}): expected {expected:?}, \
                     got {status:?} / {:?}",
                    row.status.short(),
                    row.plan.short(),
                    desired::bounded(&error_text, 200)
                )
            };
            // What the controller writes is bounded; what the web app left is its own.
            let untouched_error = match &row.written.provisioning_error {
                None => error.is_none(),
                // SQLite keeps a REAL in a TEXT column as its own rendering of the number.
                Some(Cell::Real(_)) => error.is_some(),
                Some(cell) => error == cell.as_text().flatten(),
            };
            assert!(
                error_text.chars().count() <= MAX_ERROR_CHARS || untouched_error,
                "{}: error of {} chars",
                context(),
                error_text.chars().count()
            );
            let servers_of_row = servers_by_key.get(&resource_key(&id)).copied().unwrap_or(0);
            match &expected {
                Expect::Ready => {
                    ready += 1;
                    assert_eq!(status, "ready", "{}", context());
                    assert_eq!(error, None, "{}", context());
                    assert_eq!(servers_of_row, 1, "{}", context());
                }
                Expect::Suspended => {
                    assert_eq!(status, "suspended", "{}", context());
                    assert_eq!(error, None, "{}", context());
                    assert_eq!(servers_of_row, 0, "{}", context());
                }
                Expect::Deprovisioned => {
                    let preset_status = match &row.written.provisioning_status {
                        Some(cell) => cell.as_text().flatten(),
                        None => Some("pending".to_string()),
                    };
                    if Some(&status) == preset_status.as_ref() {
                        // A row that never held anything is left as it is.
                        assert!(untouched_error, "{}", context());
                    } else {
                        assert_eq!(status, "deprovisioned", "{}", context());
                        assert_eq!(error, None, "{}", context());
                    }
                    assert_eq!(servers_of_row, 0, "{}", context());
                }
                Expect::Held => {
                    assert_eq!(status, "held", "{}", context());
                    assert!(error_text.starts_with("status: "), "{}", context());
                    assert_eq!(servers_of_row, 0, "{}", context());
                }
                Expect::BadPlan => {
                    assert_eq!(status, "failed", "{}", context());
                    assert!(error_text.starts_with("plan: "), "{}", context());
                    assert_eq!(servers_of_row, 0, "{}", context());
                }
                Expect::Unreadable(columns) => {
                    assert_eq!(status, "failed", "{}", context());
                    assert!(
                        error_text.starts_with("row cannot be read: column ")
                            && columns
                                .iter()
                                .any(|c| error_text.contains(&format!("column {c}"))),
                        "{}: should name one of {columns:?}",
                        context()
                    );
                    assert_eq!(servers_of_row, 0, "{}", context());
                }
                Expect::StaysFailed => {
                    assert_eq!(status, "failed", "{}", context());
                    if let Some(preset) = row
                        .written
                        .provisioning_error
                        .as_ref()
                        .and_then(|c| c.as_text().flatten())
                    {
                        assert_eq!(
                            error,
                            Some(desired::bounded(&preset, MAX_ERROR_CHARS)),
                            "{}",
                            context()
                        );
                    }
                    assert_eq!(servers_of_row, 0, "{}", context());
                }
                Expect::NoId => unreachable!(),
            }
        }
        assert_eq!(
            servers.len(),
            ready,
            "[{backend}] seed {seed:#x}: one server per ready row, nothing else ({tally:?})"
        );

        // Events say what happened, each message bounded too.
        let recent = events::recent(&env.db, None, 100_000).await.unwrap();
        for event in &recent {
            assert!(
                event.message.chars().count() <= events::MAX_MESSAGE_CHARS,
                "[{backend}] event {} of {} chars",
                event.reason,
                event.message.chars().count()
            );
        }
        let (longest, line) = sink.longest.lock().unwrap().clone();
        assert!(
            longest <= MAX_LOG_LINE,
            "[{backend}] seed {seed:#x}: a log line of {longest} chars: {line}…"
        );
        // The web app deletes every row, the hostile ones too: the change pass copes with
        // whatever ids the deletions leave behind, and nothing of any row remains.
        env.sql("DELETE FROM subscriptions").await;
        let report = env.controller.process_changes().await.unwrap_or_else(|e| {
            panic!("[{backend}] seed {seed:#x}: the change pass after the deletions failed: {e}")
        });
        assert_eq!(report.failed, 0, "[{backend}] {report:?}");
        assert!(
            env.list("servers").await.is_empty(),
            "[{backend}] seed {seed:#x}: servers left after every row was deleted"
        );

        eprintln!(
            "[{backend}] {} rows ({tally:?}), {} servers, {passes} resyncs, {:.1} s (inserted {:.1} s, change pass done {:.1} s)",
            rows.len(),
            servers.len(),
            started.elapsed().as_secs_f64(),
            inserted.as_secs_f64(),
            changed.as_secs_f64()
        );
        test_db.cleanup().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Pure properties: the decision for one row, and the resource key.

fn model(status: Option<String>, plan: Option<String>, id: String) -> subscription::Model {
    subscription::Model {
        status,
        plan,
        ..subscription::Model::example(&id)
    }
}

fn optional_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::weighted(0.9, hostile_text())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Whatever status and plan a row holds, the decision is one of: a server as the plan
    /// says, nothing, held naming the status, or failed naming the plan; never a panic and
    /// never a message longer than the bound.
    #[test]
    fn every_status_and_plan_gets_a_bounded_decision_naming_the_field(
        status in prop_oneof![optional_text(), odd_status().prop_map(Some)],
        plan in prop_oneof![optional_text(), Just(Some("starter".to_string()))],
        id in hostile_text(),
    ) {
        let config = Options::default().config;
        let owner = Owner::new("0123456789abcdef", &config);
        let row = model(status.clone(), plan.clone(), id.clone());
        let desired = desired_for_row(&config, &owner, &row, chrono::Utc::now());
        prop_assert_eq!(&desired.key, &resource_key(&id));
        match (&desired.want, config.lifecycle.policy(status.as_deref())) {
            (Want::Hold(reason), Policy::Hold) => {
                prop_assert!(reason.starts_with("status: "), "{}", reason);
                prop_assert!(reason.chars().count() <= MAX_ERROR_CHARS, "{}", reason.len());
            }
            (Want::Nothing, Policy::Delete) => {}
            (Want::Invalid(message), _) => {
                prop_assert!(plan.as_ref().is_none_or(|p| !config.plans.contains_key(p)));
                prop_assert!(message.starts_with("plan: "), "{}", message);
                prop_assert!(message.chars().count() <= MAX_ERROR_CHARS, "{}", message.len());
            }
            (Want::Vps(spec), Policy::Run | Policy::Grace | Policy::Suspend) => {
                prop_assert_eq!(Some(&spec.plan_name), plan.as_ref());
                prop_assert!(spec.name.len() <= 63);
            }
            (want, policy) => prop_assert!(false, "{:?} for {:?}", want, policy),
        }
    }

    /// Two different ids never share a resource key, and every key is a short, valid label
    /// value (and name part).
    #[test]
    fn different_ids_never_share_a_resource_key(
        a in hostile_text(),
        b in prop_oneof![
            hostile_text(),
            Just("casedup".to_string()),
            "[A-Za-z0-9_ -]{0,50}",
        ],
    ) {
        let (key_a, key_b) = (resource_key(&a), resource_key(&b));
        for key in [&key_a, &key_b] {
            prop_assert!(!key.is_empty() && key.len() <= 42, "{:?}", key);
            prop_assert!(
                key.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                    && !key.starts_with('-')
                    && !key.ends_with('-'),
                "{:?}",
                key
            );
        }
        prop_assert_eq!(a == b, key_a == key_b, "{:?} / {:?}", key_a, key_b);
        // Changing the case of an id changes its key whenever it changes the id.
        let upper = a.to_uppercase();
        prop_assert_eq!(upper == a, resource_key(&upper) == key_a);
    }
}

/// Decoding every row of a table of hostile rows never fails the call, and each row that
/// does not decode is reported with its id and a bounded problem naming a column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_decodes_or_is_reported_alone_with_a_bounded_problem() {
    let seed = env_number("HOSTILE_SEED", 0x5eed_0011) ^ 0xdec0de;
    let n = env_number("HOSTILE_ROWS", 1000) as usize;
    for test_db in common::test_databases().await {
        let db = vps_controller::db::connect(&test_db.url).await.unwrap();
        db.execute_unprepared(&nullable_table(test_db.is_postgres()))
            .await
            .unwrap();
        vps_controller::db::migrate(&db).await.unwrap();
        let rows = insert_all(&db, corpus(seed, n, test_db.is_postgres())).await;
        let table = subscriptions::all(&db).await.unwrap();
        let backend = test_db.backend;
        assert_eq!(
            table.rows.len() + table.bad.len(),
            rows.len(),
            "[{backend}] every row is either decoded or reported"
        );
        for bad in &table.bad {
            assert!(
                bad.problem.starts_with("column ")
                    && bad.problem.chars().count() <= subscriptions::MAX_PROBLEM_CHARS,
                "[{backend}] {bad:?}"
            );
        }
        let decoded: BTreeMap<&str, &subscription::Model> =
            table.rows.iter().map(|r| (r.id.as_str(), r)).collect();
        for row in &rows {
            let Some(id) = row.readable_id() else {
                continue;
            };
            let unreadable = row.unreadable_columns();
            match decoded.get(id.as_str()) {
                Some(model) => {
                    assert!(unreadable.is_empty(), "[{backend}] {id:?}: {unreadable:?}");
                    // (A REAL in a TEXT column reads as SQLite's text for it.)
                    if let Some(status) = row.status.as_text() {
                        assert_eq!(model.status, status);
                    }
                    if let Some(plan) = row.plan.as_text() {
                        assert_eq!(model.plan, plan);
                    }
                }
                None => {
                    let bad = table
                        .bad
                        .iter()
                        .find(|b| b.id.as_deref() == Some(id.as_str()))
                        .unwrap_or_else(|| panic!("[{backend}] {:?} is missing", row.id.short()));
                    assert!(
                        unreadable
                            .iter()
                            .any(|c| bad.problem.starts_with(&format!("column {c}"))),
                        "[{backend}] {bad:?} should name one of {unreadable:?}"
                    );
                    let err = subscriptions::get(&db, &id).await.unwrap_err();
                    let message = err.to_string();
                    assert!(
                        message.chars().count() <= 1000 && message.contains("column "),
                        "[{backend}] {}",
                        desired::bounded(&message, 300)
                    );
                }
            }
        }
        let _ = std::io::stderr().flush();
        test_db.cleanup().await;
    }
}

/// `len` characters of letters and digits that do not compress (a fixed pseudo-random
/// sequence), so PostgreSQL stores them as long as they are in an index entry.
fn incompressible(len: usize, salt: u64) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ salt;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ALPHABET[(state >> 33) as usize % ALPHABET.len()] as char
        })
        .collect()
}

/// Whatever id the table's own primary key accepts, the controller's triggers and indexes
/// accept too: the web app's INSERT, UPDATE and DELETE of such a row work, and the row
/// converges like any other. On PostgreSQL the NOTIFY payload (8,000 bytes at most) once
/// carried the whole id, and two of our indexes added bytes to the id's index entry (2,704
/// bytes at most), so these writes failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_id_never_fails_a_write_of_the_web_app() {
    for test_db in common::test_databases().await {
        let env = hostile_env(&test_db).await;
        let backend = env.backend;
        // Over the NOTIFY limit (compressible, so the key takes it); and just under the
        // key's entry limit (incompressible).
        let ids = ["n".repeat(9_000), incompressible(2_685, 1)];
        for id in &ids {
            let row = HostileRow {
                id: Cell::Text(id.clone()),
                user_id: Cell::text("u"),
                stripe_subscription_id: Cell::Null,
                status: Cell::text("active"),
                plan: Cell::text("starter"),
                written: Written::default(),
            };
            insert(&env.db, &row).await;
            assert!(
                subscriptions::get(&env.db, id).await.unwrap().is_some(),
                "[{backend}] the insert of a {}-character id worked",
                id.len()
            );
        }
        env.process_changes().await;
        for id in &ids {
            let row = subscriptions::get(&env.db, id).await.unwrap().unwrap();
            assert_eq!(row.provisioning_status, "ready", "[{backend}] {}", id.len());
            assert!(
                !events::recent(&env.db, Some(id), 10)
                    .await
                    .unwrap()
                    .is_empty(),
                "[{backend}] events of the {}-character id",
                id.len()
            );
            let update = Statement::from_sql_and_values(
                env.db.get_database_backend(),
                "UPDATE subscriptions SET status = 'canceled' WHERE id = $1",
                [id.as_str().into()],
            );
            env.db.execute_raw(update).await.unwrap_or_else(|e| {
                panic!("[{backend}] update of a {}-character id: {e}", id.len())
            });
        }
        env.process_changes().await;
        assert!(env.list("servers").await.is_empty(), "[{backend}]");
        for id in &ids {
            let delete = Statement::from_sql_and_values(
                env.db.get_database_backend(),
                "DELETE FROM subscriptions WHERE id = $1",
                [id.as_str().into()],
            );
            env.db.execute_raw(delete).await.unwrap_or_else(|e| {
                panic!("[{backend}] delete of a {}-character id: {e}", id.len())
            });
        }
        env.process_changes().await;
        test_db.cleanup().await;
    }
}
