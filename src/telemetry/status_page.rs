//! The read-only status page served at `/` next to /metrics: who this replica is, the fleet by
//! provisioning status, the failing subscriptions, the recent events and the Hetzner API budget.
//!
//! Plain server-rendered HTML without any script, written by hand with `write!` (no template
//! crate). Everything that comes from the database is cut to a bound and HTML-escaped, so a row
//! holding markup, control characters or megabytes of text renders as inert, short text. The
//! queries never select secrets (SSH keys, sealed or not; tokens and user_data are not in the
//! database), and they share one deadline, so the page answers within about
//! [`QUERY_TIMEOUT`] even when the database hangs, saying "database unavailable" where it must.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use tokio::time::Instant;

use crate::controller::leader::Leadership;
use crate::db::events;
use crate::hcloud::Budget;

/// All queries of one page share this deadline.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Failing subscriptions listed at most (the most recently reconciled first).
pub const MAX_FAILING_ROWS: usize = 50;
/// Recent events listed at most.
pub const MAX_EVENTS: u64 = 20;
/// Provisioning errors and event messages are cut to this many characters.
pub const MAX_ERROR_CHARS: usize = 300;
/// Ids, plans, statuses and reasons are cut to this many characters.
pub const MAX_FIELD_CHARS: usize = 100;
/// Distinct provisioning statuses listed at most (the controller writes a handful).
const MAX_STATUSES: usize = 50;

/// The order the fleet table lists the controller's own statuses in; others follow by name.
const STATUS_ORDER: [&str; 8] = [
    "pending",
    "provisioning",
    "ready",
    "failed",
    "suspended",
    "held",
    "deprovisioning",
    "deprovisioned",
];

/// What the page needs besides the database: passed in once by `run`.
#[derive(Clone)]
pub struct StatusPage {
    installation: Arc<str>,
    leadership: Leadership,
    budget: Arc<Budget>,
}

impl StatusPage {
    pub fn new(
        installation: impl Into<String>,
        leadership: Leadership,
        budget: Arc<Budget>,
    ) -> Self {
        StatusPage {
            installation: installation.into().into(),
            leadership,
            budget,
        }
    }

    /// The HTTP response for `GET /`: always 200 with the page, which says itself when the
    /// database did not answer.
    pub async fn respond(&self, db: &DatabaseConnection) -> Response {
        let body = self.render(db).await;
        let mut response = (StatusCode::OK, body).into_response();
        let headers = response.headers_mut();
        for (name, value) in [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // Defence in depth: even if some text escaped escaping, no script could run.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; \
                 form-action 'none'; frame-ancestors 'none'",
            ),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        response
    }

    /// The page as HTML.
    pub async fn render(&self, db: &DatabaseConnection) -> String {
        let started = Instant::now();
        let deadline = started + QUERY_TIMEOUT;
        // One after the other under one deadline: the page holds at most one pooled
        // connection, and a hanging database costs QUERY_TIMEOUT once, not per query.
        let fleet = bounded("fleet", deadline, fleet(db)).await;
        let failing = bounded("failing subscriptions", deadline, failing(db)).await;
        let events = bounded("recent events", deadline, recent_events(db)).await;
        let view = View {
            installation: &self.installation,
            leader: self.leadership.is_leader(),
            version: env!("CARGO_PKG_VERSION"),
            budget: BudgetView {
                remaining: self.budget.remaining(),
                limit: self.budget.limit(),
                paused: self.budget.is_paused(),
            },
            fleet,
            failing,
            events,
            rendered_at: Utc::now(),
            query_time: started.elapsed(),
        };
        render(&view)
    }
}

/// Why a section has no data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unavailable {
    TimedOut,
    Failed,
}

impl Unavailable {
    fn describe(self) -> String {
        match self {
            Unavailable::TimedOut => format!(
                "database unavailable: no answer within {} s",
                QUERY_TIMEOUT.as_secs()
            ),
            // The error itself goes to the log: it may name hosts or users.
            Unavailable::Failed => "database unavailable: the query failed (see the log)".into(),
        }
    }
}

/// Runs `query` until `deadline`; a failure or timeout is logged and becomes [`Unavailable`].
async fn bounded<T, E: std::fmt::Display>(
    what: &'static str,
    deadline: Instant,
    query: impl Future<Output = Result<T, E>>,
) -> Result<T, Unavailable> {
    match tokio::time::timeout_at(deadline, query).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "status page: reading {what} failed");
            Err(Unavailable::Failed)
        }
        Err(_) => {
            tracing::warn!("status page: reading {what} timed out");
            Err(Unavailable::TimedOut)
        }
    }
}

struct FailingRow {
    id: String,
    plan: Option<String>,
    status: Option<String>,
    provisioning_status: String,
    error: Option<String>,
}

struct Failing {
    rows: Vec<FailingRow>,
    /// More failing rows exist than are listed.
    more: bool,
}

struct EventRow {
    at: DateTime<Utc>,
    subscription_id: String,
    kind: String,
    reason: String,
    message: String,
}

/// Counts by provisioning status, in [`STATUS_ORDER`]; `true` if statuses were left out.
async fn fleet(db: &DatabaseConnection) -> Result<(Vec<(String, i64)>, bool), sea_orm::DbErr> {
    let sql = format!(
        "SELECT SUBSTR(CAST(provisioning_status AS TEXT), 1, {field}) AS provisioning_status, \
         COUNT(*) AS n FROM subscriptions GROUP BY provisioning_status \
         ORDER BY provisioning_status LIMIT {limit}",
        field = MAX_FIELD_CHARS + 1,
        limit = MAX_STATUSES + 1,
    );
    let rows = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?;
    let more = rows.len() > MAX_STATUSES;
    let mut counts = rows
        .iter()
        .take(MAX_STATUSES)
        .map(|row| {
            Ok((
                row.try_get::<Option<String>>("", "provisioning_status")?
                    .unwrap_or_default(),
                row.try_get::<i64>("", "n")?,
            ))
        })
        .collect::<Result<Vec<_>, sea_orm::DbErr>>()?;
    counts.sort_by_key(|(status, _)| {
        let rank = STATUS_ORDER
            .iter()
            .position(|known| known == status)
            .unwrap_or(STATUS_ORDER.len());
        (rank, status.clone())
    });
    Ok((counts, more))
}

/// Rows with `provisioning_status = 'failed'` or a non-empty error. Every text column is cut
/// in the query already, so a huge error never leaves the database whole; the secret columns
/// (`ssh_private_key`, `ssh_public_key`) are never selected.
async fn failing(db: &DatabaseConnection) -> Result<Failing, sea_orm::DbErr> {
    let sql = format!(
        "SELECT SUBSTR(CAST(id AS TEXT), 1, {field}) AS sid, \
                SUBSTR(CAST(plan AS TEXT), 1, {field}) AS plan, \
                SUBSTR(CAST(status AS TEXT), 1, {field}) AS status, \
                SUBSTR(CAST(provisioning_status AS TEXT), 1, {field}) AS provisioning_status, \
                SUBSTR(provisioning_error, 1, {error}) AS error \
         FROM subscriptions \
         WHERE provisioning_status = 'failed' \
            OR (provisioning_error IS NOT NULL AND provisioning_error <> '') \
         ORDER BY last_reconciled_at IS NULL, last_reconciled_at DESC, id \
         LIMIT {limit}",
        field = MAX_FIELD_CHARS + 1,
        error = MAX_ERROR_CHARS + 1,
        limit = MAX_FAILING_ROWS + 1,
    );
    let rows = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?;
    let more = rows.len() > MAX_FAILING_ROWS;
    let rows = rows
        .iter()
        .take(MAX_FAILING_ROWS)
        .map(|row| {
            Ok(FailingRow {
                id: row
                    .try_get::<Option<String>>("", "sid")?
                    .unwrap_or_default(),
                plan: row.try_get("", "plan")?,
                status: row.try_get("", "status")?,
                provisioning_status: row
                    .try_get::<Option<String>>("", "provisioning_status")?
                    .unwrap_or_default(),
                error: row.try_get("", "error")?,
            })
        })
        .collect::<Result<Vec<_>, sea_orm::DbErr>>()?;
    Ok(Failing { rows, more })
}

async fn recent_events(db: &DatabaseConnection) -> Result<Vec<EventRow>, crate::db::DbError> {
    Ok(events::recent(db, None, MAX_EVENTS)
        .await?
        .into_iter()
        .map(|event| EventRow {
            at: event.created_at,
            subscription_id: event.subscription_id,
            kind: event.kind,
            reason: event.reason,
            message: event.message,
        })
        .collect())
}

struct BudgetView {
    remaining: u32,
    limit: u32,
    paused: bool,
}

/// Everything the page shows, gathered; [`render`] is pure.
struct View<'a> {
    installation: &'a str,
    leader: bool,
    version: &'a str,
    budget: BudgetView,
    fleet: Result<(Vec<(String, i64)>, bool), Unavailable>,
    failing: Result<Failing, Unavailable>,
    events: Result<Vec<EventRow>, Unavailable>,
    rendered_at: DateTime<Utc>,
    query_time: Duration,
}

const STYLE: &str = "\
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d2430;background:#f4f6f9}\
header{background:#1d2430;color:#fff;padding:14px 24px}\
header h1{margin:0;font-size:20px}header p{margin:2px 0 0;color:#b8c2d2}\
main{padding:8px 24px 24px;max-width:1200px}\
section{background:#fff;border:1px solid #dde2ea;border-radius:6px;margin:16px 0;padding:12px 16px}\
h2{font-size:16px;margin:0 0 8px}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}dt{color:#5a6474}dd{margin:0}\
table{border-collapse:collapse;width:100%}\
th,td{text-align:left;vertical-align:top;padding:4px 8px;border-bottom:1px solid #edf0f4}\
thead th{color:#5a6474;font-weight:600}\
td.text{white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,monospace;font-size:12px}\
td.num{text-align:right;font-variant-numeric:tabular-nums}\
table.counts{width:auto;min-width:320px}td.time{white-space:nowrap}\
.leader{color:#0a7d32;font-weight:600}.follower{color:#5a6474;font-weight:600}\
.st-failed,.Warning,.paused{color:#b3261e;font-weight:600}.st-ready{color:#0a7d32}\
.unavailable{color:#b3261e;font-weight:600}.note{color:#5a6474}\
meter{width:240px}footer{color:#5a6474;padding:0 24px 24px}";

fn render(view: &View<'_>) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail.
    let _ = write_page(&mut out, view);
    out
}

fn write_page(out: &mut String, view: &View<'_>) -> std::fmt::Result {
    write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>vps-controller status</title><style>{STYLE}</style></head><body>\
         <header><h1>vps-controller</h1><p>Read-only status of this replica. Reload to \
         refresh.</p></header><main>"
    )?;

    let role = if view.leader { "leader" } else { "follower" };
    let role_note = if view.leader {
        "this replica reconciles"
    } else {
        "another replica (or none, for now) holds the lease and reconciles"
    };
    write!(
        out,
        "<section id=\"replica\"><h2>This replica</h2><dl>\
         <dt>Installation</dt><dd id=\"installation\">{installation}</dd>\
         <dt>Role</dt><dd><span id=\"role\" class=\"{role}\">{role}</span> \
         <span class=\"note\">({role_note})</span></dd>\
         <dt>Version</dt><dd id=\"version\">{version}</dd>\
         <dt>Rendered</dt><dd id=\"rendered\"><time datetime=\"{iso}\">{at}</time> \
         <span class=\"note\">(database read in {ms} ms)</span></dd>\
         </dl></section>",
        installation = escape(&cut(view.installation, MAX_FIELD_CHARS)),
        version = escape(view.version),
        iso = view
            .rendered_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        at = time(view.rendered_at),
        ms = view.query_time.as_millis(),
    )?;

    let budget = &view.budget;
    write!(
        out,
        "<section id=\"budget\"><h2>Hetzner API budget</h2><p>\
         <span id=\"budget-remaining\">{remaining}</span> of \
         <span id=\"budget-limit\">{limit}</span> requests left this hour \
         <meter min=\"0\" max=\"{limit}\" value=\"{remaining}\"></meter></p><p id=\"budget-state\">{state}</p>\
         </section>",
        remaining = budget.remaining,
        limit = budget.limit,
        state = if budget.paused {
            "<span class=\"paused\">PAUSED</span>: Hetzner answered 429 (rate limited); every \
             request waits until the limit resets"
        } else {
            "Requests are flowing (not paused)."
        },
    )?;

    out.push_str("<section id=\"fleet\"><h2>Fleet by provisioning status</h2>");
    match &view.fleet {
        Err(why) => unavailable(out, *why)?,
        Ok((counts, _)) if counts.is_empty() => {
            out.push_str("<p class=\"note\">No subscriptions.</p>")
        }
        Ok((counts, more)) => {
            out.push_str(
                "<table class=\"counts\"><thead><tr><th scope=\"col\">Provisioning status</th>\
                 <th scope=\"col\" class=\"num\">Subscriptions</th></tr></thead><tbody>",
            );
            for (status, count) in counts {
                write!(
                    out,
                    "<tr><th scope=\"row\"{class}>{status}</th><td class=\"num\">{count}</td></tr>",
                    class = status_class(status),
                    status = escape(&cut(status, MAX_FIELD_CHARS)),
                )?;
            }
            write!(
                out,
                "</tbody><tfoot><tr><th scope=\"row\">total{more}</th>\
                 <td class=\"num\" id=\"fleet-total\">{total}</td></tr></tfoot></table>",
                more = if *more {
                    " (of the statuses listed)"
                } else {
                    ""
                },
                total = counts.iter().map(|(_, n)| n).sum::<i64>(),
            )?;
        }
    }
    out.push_str("</section>");

    out.push_str("<section id=\"failing\"><h2>Failing subscriptions</h2>");
    match &view.failing {
        Err(why) => unavailable(out, *why)?,
        Ok(failing) if failing.rows.is_empty() => {
            out.push_str("<p class=\"note\">None: no row is failed or carries an error.</p>")
        }
        Ok(failing) => {
            out.push_str(
                "<table><thead><tr><th scope=\"col\">Subscription</th><th scope=\"col\">Plan</th>\
                 <th scope=\"col\">Status</th><th scope=\"col\">Provisioning</th>\
                 <th scope=\"col\">Last error</th></tr></thead><tbody>",
            );
            for row in &failing.rows {
                write!(
                    out,
                    "<tr><td class=\"text\">{id}</td><td class=\"text\">{plan}</td>\
                     <td class=\"text\">{status}</td><td{class}>{provisioning}</td>\
                     <td class=\"text\">{error}</td></tr>",
                    id = escape(&cut(&row.id, MAX_FIELD_CHARS)),
                    plan = optional(row.plan.as_deref(), MAX_FIELD_CHARS),
                    status = optional(row.status.as_deref(), MAX_FIELD_CHARS),
                    class = status_class(&row.provisioning_status),
                    provisioning = escape(&cut(&row.provisioning_status, MAX_FIELD_CHARS)),
                    error = optional(row.error.as_deref(), MAX_ERROR_CHARS),
                )?;
            }
            out.push_str("</tbody></table>");
            if failing.more {
                write!(
                    out,
                    "<p class=\"note\">Only the {MAX_FAILING_ROWS} most recently reconciled are \
                     listed; <code>vps-controller status</code> lists every row.</p>"
                )?;
            }
        }
    }
    out.push_str("</section>");

    write!(
        out,
        "<section id=\"events\"><h2>Recent events <span class=\"note\">(newest first, at most \
         {MAX_EVENTS})</span></h2>"
    )?;
    match &view.events {
        Err(why) => unavailable(out, *why)?,
        Ok(events) if events.is_empty() => out.push_str("<p class=\"note\">No events yet.</p>"),
        Ok(events) => {
            out.push_str(
                "<table><thead><tr><th scope=\"col\">Time</th><th scope=\"col\">Subscription</th>\
                 <th scope=\"col\">Kind</th><th scope=\"col\">Reason</th>\
                 <th scope=\"col\">Message</th></tr></thead><tbody>",
            );
            for event in events {
                let kind = match event.kind.as_str() {
                    "Normal" => " class=\"Normal\"",
                    "Warning" => " class=\"Warning\"",
                    _ => "",
                };
                write!(
                    out,
                    "<tr><td class=\"time\"><time datetime=\"{iso}\">{at}</time></td><td class=\"text\">{id}</td>\
                     <td{kind}>{kind_text}</td><td>{reason}</td><td class=\"text\">{message}</td></tr>",
                    iso = event.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    at = time(event.at),
                    id = escape(&cut(&event.subscription_id, MAX_FIELD_CHARS)),
                    kind_text = escape(&cut(&event.kind, MAX_FIELD_CHARS)),
                    reason = escape(&cut(&event.reason, MAX_FIELD_CHARS)),
                    message = escape(&cut(&event.message, MAX_ERROR_CHARS)),
                )?;
            }
            out.push_str("</tbody></table>");
        }
    }
    out.push_str("</section>");

    out.push_str(
        "</main><footer>Read-only: this page changes nothing and never shows SSH keys, API \
         tokens or user data. The command line has the rest: <code>vps-controller status</code>, \
         <code>vps-controller status SUBSCRIPTION</code>.</footer></body></html>\n",
    );
    Ok(())
}

fn unavailable(out: &mut String, why: Unavailable) -> std::fmt::Result {
    write!(
        out,
        "<p class=\"unavailable\">{}</p>",
        escape(&why.describe())
    )
}

/// ` class="st-…"` for the controller's own statuses; nothing for anything else, so row data
/// never reaches an attribute.
fn status_class(status: &str) -> String {
    if STATUS_ORDER.contains(&status) {
        format!(" class=\"st-{status}\"")
    } else {
        String::new()
    }
}

/// A NULL shows as a dash, text is cut and escaped.
fn optional(text: Option<&str>, max_chars: usize) -> String {
    match text {
        Some(text) => escape(&cut(text, max_chars)),
        None => "-".into(),
    }
}

fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// `text` cut to `max_chars` characters (on a character boundary), ending with `…` if cut.
pub fn cut(text: &str, max_chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        Some((at, _)) => Cow::Owned(format!("{}…", &text[..at])),
        None => Cow::Borrowed(text),
    }
}

/// `text` made safe as HTML text and as a double- or single-quoted attribute value: the five
/// markup characters become entities, and characters that could hide or disguise text (control
/// characters other than newline and tab, Unicode direction overrides) become visible `\u{…}`.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\t' => out.push(c),
            c if c.is_control() || is_direction_control(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// Bidirectional formatting characters, which can make text read differently than it is.
fn is_direction_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_turns_markup_into_text() {
        assert_eq!(
            escape(r#"<script>alert("x" & 'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
        // Already-escaped text is escaped again, never decoded.
        assert_eq!(escape("&lt;"), "&amp;lt;");
        assert_eq!(escape(""), "");
    }

    #[test]
    fn escape_shows_control_and_direction_characters_visibly() {
        assert_eq!(
            escape("a\u{1b}[31mb\u{0}c\u{7f}"),
            "a\\u{1b}[31mb\\u{0}c\\u{7f}"
        );
        assert_eq!(escape("\r"), "\\u{d}");
        assert_eq!(escape("x\u{202e}y\u{2066}z"), "x\\u{202e}y\\u{2066}z");
        assert_eq!(escape("\u{85}"), "\\u{85}");
    }

    #[test]
    fn escape_keeps_ordinary_text_newlines_and_tabs() {
        assert_eq!(escape("plain text"), "plain text");
        assert_eq!(escape("zwölf Ünïcödé ✓ 日本"), "zwölf Ünïcödé ✓ 日本");
        assert_eq!(escape("line 1\n\tline 2"), "line 1\n\tline 2");
    }

    #[test]
    fn cut_bounds_text_on_a_character_boundary() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("exact", 5), "exact");
        assert_eq!(cut("abcdef", 3), "abc…");
        let long = "ä".repeat(1000);
        let cut = cut(&long, 300);
        assert_eq!(cut.chars().count(), 301);
        assert!(cut.ends_with("ä…"));
    }

    fn view<'a>(
        failing: Result<Failing, Unavailable>,
        events: Result<Vec<EventRow>, Unavailable>,
    ) -> View<'a> {
        View {
            installation: "0123456789abcdef",
            leader: true,
            version: "9.9.9",
            budget: BudgetView {
                remaining: 3500,
                limit: 3600,
                paused: false,
            },
            fleet: Ok((vec![("ready".into(), 3), ("failed".into(), 1)], false)),
            failing,
            events,
            rendered_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
            query_time: Duration::from_millis(4),
        }
    }

    #[test]
    fn hostile_rows_render_as_bounded_inert_text() {
        let hostile = format!("<script>alert(1)</script>\u{1b}[2J{}", "x".repeat(100_000));
        let page = render(&view(
            Ok(Failing {
                rows: vec![FailingRow {
                    id: "<img src=x onerror=alert(1)>".into(),
                    plan: Some("\"><script>alert(2)</script>".into()),
                    status: None,
                    provisioning_status: "failed\" onmouseover=\"alert(3)".into(),
                    error: Some(hostile.clone()),
                }],
                more: false,
            }),
            Ok(vec![EventRow {
                at: Utc::now(),
                subscription_id: "<b>".into(),
                kind: "<i>".into(),
                reason: "Failed".into(),
                message: hostile,
            }]),
        ));
        for raw in ["<script>", "<img", "<b>", "<i>", "\u{1b}", "onmouseover=\""] {
            assert!(!page.contains(raw), "{raw:?} reached the page raw");
        }
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;\\u{1b}[2Jxxx"));
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(page.len() < 12_000, "page of {} bytes", page.len());
        assert!(!page.to_ascii_lowercase().contains("<script"));
    }

    #[test]
    fn the_page_names_installation_role_version_counts_and_budget() {
        let page = render(&view(
            Ok(Failing {
                rows: vec![],
                more: false,
            }),
            Ok(vec![]),
        ));
        assert!(page.contains("<dd id=\"installation\">0123456789abcdef</dd>"));
        assert!(page.contains("<span id=\"role\" class=\"leader\">leader</span>"));
        assert!(page.contains("<dd id=\"version\">9.9.9</dd>"));
        // The controller's order, not the database's: ready before failed.
        let ready =
            page.find("<th scope=\"row\" class=\"st-ready\">ready</th><td class=\"num\">3</td>");
        let failed =
            page.find("<th scope=\"row\" class=\"st-failed\">failed</th><td class=\"num\">1</td>");
        assert!(
            ready.is_some() && failed.is_some() && ready < failed,
            "{page}"
        );
        assert!(page.contains("<td class=\"num\" id=\"fleet-total\">4</td>"));
        assert!(page.contains("<span id=\"budget-remaining\">3500</span>"));
        assert!(page.contains("not paused"));
        assert!(page.contains("2027-01-15 08:00:00 UTC"), "{page}");
        assert!(page.contains("None: no row is failed"));
        assert!(page.contains("No events yet."));
    }

    #[test]
    fn a_follower_and_a_paused_budget_say_so() {
        let mut view = view(
            Ok(Failing {
                rows: vec![],
                more: true,
            }),
            Ok(vec![]),
        );
        view.leader = false;
        view.budget.paused = true;
        let page = render(&view);
        assert!(page.contains("<span id=\"role\" class=\"follower\">follower</span>"));
        assert!(page.contains("<span class=\"paused\">PAUSED</span>"));
    }

    #[test]
    fn sections_without_data_say_the_database_is_unavailable() {
        let mut view = view(Err(Unavailable::Failed), Err(Unavailable::TimedOut));
        view.fleet = Err(Unavailable::TimedOut);
        let page = render(&view);
        assert_eq!(
            page.matches("database unavailable: no answer within 2 s")
                .count(),
            2,
            "{page}"
        );
        assert!(page.contains("database unavailable: the query failed (see the log)"));
        // What does not need the database is still there.
        assert!(page.contains("<span id=\"role\" class=\"leader\">leader</span>"));
        assert!(page.contains("<span id=\"budget-limit\">3600</span>"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_query_is_cut_off_at_the_deadline() {
        let deadline = Instant::now() + QUERY_TIMEOUT;
        let hung = bounded(
            "test",
            deadline,
            std::future::pending::<Result<(), sea_orm::DbErr>>(),
        )
        .await;
        assert_eq!(hung, Err(Unavailable::TimedOut));
        assert!(Instant::now() >= deadline);
        // A later query under the same, passed deadline does not wait again.
        let late = bounded("test", deadline, async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, sea_orm::DbErr>(())
        })
        .await;
        assert_eq!(late, Err(Unavailable::TimedOut));
        assert!(Instant::now() < deadline + Duration::from_millis(1));
    }

    #[tokio::test]
    async fn against_a_database_without_the_schema_the_page_still_renders() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("empty.db").display()
        );
        let db = crate::db::connect(&url).await.expect("connect");
        let page = StatusPage::new(
            "0123456789abcdef",
            Leadership::default(),
            Arc::new(Budget::new(3600)),
        );
        let html = page.render(&db).await;
        assert_eq!(
            html.matches("database unavailable: the query failed")
                .count(),
            3,
            "{html}"
        );
        assert!(html.contains("<span id=\"role\" class=\"follower\">follower</span>"));
        assert!(html.contains("<span id=\"budget-limit\">3600</span>"));
    }

    #[tokio::test]
    async fn the_queries_read_a_migrated_database() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("page.db").display());
        let db = crate::db::connect(&url).await.expect("connect");
        crate::db::migrate(&db).await.expect("migrate");
        db.execute_unprepared(
            "INSERT INTO subscriptions (id, user_id, status, plan, provisioning_status, \
             provisioning_error, ssh_private_key, ssh_public_key) VALUES \
             ('ok-1', 'u', 'active', 'starter', 'ready', NULL, 'SEALED-PRIVATE', 'ssh-ed25519 AAAAPUBLIC'), \
             ('bad-1', 'u', 'active', 'gold', 'failed', 'plan: \"gold\" is unknown', NULL, NULL), \
             ('odd-1', 'u', 'active', 'pro', 'provisioning', 'timeout talking to Hetzner', NULL, NULL)",
        )
        .await
        .expect("insert");
        events::record(
            &db,
            "bad-1",
            events::EventKind::Warning,
            "Failed",
            "plan unknown",
        )
        .await
        .expect("event");
        let page = StatusPage::new(
            "0123456789abcdef",
            Leadership::always(),
            Arc::new(Budget::new(3600)),
        );
        let html = page.render(&db).await;
        assert!(!html.contains("database unavailable"), "{html}");
        assert!(
            html.contains("<td class=\"num\" id=\"fleet-total\">3</td>"),
            "{html}"
        );
        assert!(
            html.contains("class=\"st-provisioning\">provisioning</th><td class=\"num\">1</td>")
        );
        let failing = section(&html, "failing");
        assert!(failing.contains("bad-1") && failing.contains("plan: &quot;gold&quot; is unknown"));
        assert!(failing.contains("odd-1") && failing.contains("timeout talking to Hetzner"));
        assert!(!failing.contains("ok-1"), "{failing}");
        let events = section(&html, "events");
        assert!(
            events.contains("plan unknown") && events.contains("Warning"),
            "{events}"
        );
        for secret in ["SEALED-PRIVATE", "AAAAPUBLIC"] {
            assert!(!html.contains(secret), "{secret} on the page");
        }
    }

    fn section<'a>(html: &'a str, id: &str) -> &'a str {
        let start = html.find(&format!("<section id=\"{id}\">")).unwrap_or(0);
        let end = html[start..]
            .find("</section>")
            .map_or(html.len(), |end| start + end);
        &html[start..end]
    }
}
