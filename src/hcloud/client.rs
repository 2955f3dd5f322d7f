//! The HTTP client: one place that sends requests, so budget, retries, error decoding,
//! counters and logging apply to every call.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use rand::RngExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::action_waiter::{ActionWaiter, Endpoint};
use super::budget::Budget;
use super::error::{Error, ErrorCode};
use super::types::*;
use super::{HcloudApi, Labels, ServerPowerAction};

/// Hetzner's production endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://api.hetzner.cloud/v1";
/// Page size for list calls: the documented maximum.
const PER_PAGE: u32 = 50;
/// Default of [`ClientConfig::max_pages`]: 5 million objects per listing.
pub const DEFAULT_MAX_PAGES: u32 = 100_000;
/// Order of every paginated list the client walks: by ID, so objects created or deleted while
/// the pages are fetched don't shift the rest (no duplicates, no skipped objects).
const LIST_SORT: &str = "id:asc";
/// Characters of an undecodable body kept in an error.
const SNIPPET_CHARS: usize = 160;
/// Characters of a decoding error's own text kept in an error (serde quotes the offending
/// value, which can be any length).
const REASON_CHARS: usize = 200;
/// Largest response body the client reads, in bytes.
///
/// The largest answers it asks for are pages of 50 objects. At the size of the spec's
/// example server (about 2.8 kB of JSON) a page of 50 servers is about 140 kB, and at 20 kB
/// per server (long label sets, many firewalls) still under 1 MiB; every other answer is a
/// single object or a short list of actions. So 4 MiB is several times the largest real
/// answer, while a body past it is not a page of anything: it is refused as soon as it is
/// known to be larger (by `Content-Length` before reading, else while reading), so a broken
/// proxy or an endless stream costs at most this much memory per request.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The API token. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Surrounding whitespace (e.g. the newline of a token file) is dropped.
    pub fn new(token: impl Into<String>) -> Self {
        Token(token.into().trim().to_owned())
    }

    fn expose(&self) -> &str {
        &self.0
    }

    /// Tells tokens apart without revealing them: 8 bytes of the token's SHA-256, in hex.
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Truncated exponential backoff with full jitter between retries of one request:
/// the n-th retry (0-based) sleeps a uniform time in `[base, min(cap, base * 2^n)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBackoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryBackoff {
    /// The official clients' values: 1 s base, 60 s cap.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        }
    }
}

impl RetryBackoff {
    fn delay(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.min(31)))
            .min(self.cap)
            .max(self.base);
        if ceiling <= self.base {
            return ceiling;
        }
        rand::rng().random_range(self.base..=ceiling)
    }
}

/// Poll intervals of [`HcloudApi::wait_for_actions`]: `initial`, growing by `factor` per poll
/// up to `max` (the hcloud CLI's 500 ms → 2.5 s). The waits of one client are polled together
/// in rounds, at most one per `initial` unless the due waits fill a request, so a wait may be
/// answered up to `initial` late, never early.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActionPollBackoff {
    pub initial: Duration,
    pub max: Duration,
    pub factor: f64,
}

impl Default for ActionPollBackoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_millis(2500),
            factor: 1.5,
        }
    }
}

/// Everything a [`Client`] needs. Build with [`ClientConfig::new`] and change fields with
/// struct update syntax.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// API base URL, e.g. `https://api.hetzner.cloud/v1`.
    pub endpoint: String,
    pub token: Token,
    /// Per attempt, from connect to the end of the body.
    pub timeout: Duration,
    /// Retries of one request after retryable failures (so at most `max_retries + 1` attempts).
    pub max_retries: u32,
    pub user_agent: String,
    pub retry_backoff: RetryBackoff,
    pub action_poll: ActionPollBackoff,
    /// Shared by every client using the same project token.
    pub budget: Arc<Budget>,
    /// Longest a request waits for a budget token before failing with
    /// [`Error::RateLimited`].
    pub max_budget_wait: Duration,
    /// Pages (of 50) a listing may have; a listing with more fails with [`Error::PageLimit`]
    /// instead of returning a truncated list.
    pub max_pages: u32,
    /// Asked right before every attempt of a request that changes something; `None` sends
    /// them all (single-process tools).
    pub write_gate: Option<WriteGate>,
}

/// Whether a request that changes something may be sent now. The controller's gate is its
/// leader lease, read with the real clock: checked as the last step before each attempt
/// (retries, and each call of a several-call step, included), it leaves a replica that wakes
/// from a pause past its lease no room to send anything new.
#[derive(Clone)]
pub struct WriteGate(Arc<dyn Fn() -> bool + Send + Sync>);

impl WriteGate {
    pub fn new(allows: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        WriteGate(Arc::new(allows))
    }

    fn allows(&self) -> bool {
        (self.0)()
    }
}

impl fmt::Debug for WriteGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WriteGate")
    }
}

impl ClientConfig {
    pub fn new(endpoint: impl Into<String>, token: Token) -> Self {
        Self {
            endpoint: endpoint.into(),
            token,
            timeout: Duration::from_secs(30),
            max_retries: 5,
            user_agent: format!("vps-controller/{}", env!("CARGO_PKG_VERSION")),
            retry_backoff: RetryBackoff::default(),
            action_poll: ActionPollBackoff::default(),
            budget: Arc::new(Budget::default()),
            max_budget_wait: Duration::from_secs(60),
            max_pages: DEFAULT_MAX_PAGES,
            write_gate: None,
        }
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

/// One row of the request counters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RequestCount {
    pub method: &'static str,
    /// e.g. `/servers/{id}/actions/poweron`
    pub path_template: &'static str,
    /// HTTP status for successes (`"200"`), [`Error::metric_label`] for failures, and
    /// `"budget_exhausted"` for requests the budget refused to send, `"not_leading"` for
    /// writes the [`WriteGate`] held back.
    pub outcome: String,
    pub count: u64,
}

type CountKey = (&'static str, &'static str, String);

/// `[("method", …), ("path", template)]`: the labels of the request duration histogram.
pub type RequestLabels = Vec<(&'static str, &'static str)>;

/// How Hetzner has answered lately: what readiness and the alerts look at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reachability {
    /// The last answer that showed the API working for us: a 2xx, or a 4xx about the request
    /// itself (`not_found`, `uniqueness_error`, …).
    pub last_success: Option<SystemTime>,
    /// Since when every answer said the API does not work for us (no answer, a timeout, a
    /// 5xx, an unreadable body, 401/403: a token rejected); `None` after a success.
    pub failing_since: Option<SystemTime>,
    /// The label of the latest such failure (`transport_timeout`, `unauthorized`, …).
    pub last_failure: Option<&'static str>,
}

impl Reachability {
    fn record(&mut self, outcome: &Result<(), &Error>, now: SystemTime) {
        match outcome {
            Ok(()) => {
                self.last_success = Some(now);
                self.failing_since = None;
            }
            Err(err) if is_outage(err) => {
                self.failing_since.get_or_insert(now);
                self.last_failure = Some(err.metric_label());
            }
            // A 429 or a refusal about the request: Hetzner answered, but that says nothing
            // about whether it works for us.
            Err(Error::Api { status: 429, .. }) => {}
            Err(_) => {
                self.last_success = Some(now);
                self.failing_since = None;
            }
        }
    }
}

/// An answer (or its absence) that means Hetzner does not work for this controller at all.
fn is_outage(err: &Error) -> bool {
    match err {
        Error::Transport { .. } | Error::InvalidResponse { .. } => true,
        Error::Api { status, .. } => *status >= 500 || *status == 401 || *status == 403,
        _ => false,
    }
}

/// The Hetzner Cloud client. Cheap to clone (shared state behind an `Arc`).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// Endpoint without a trailing slash.
    base: String,
    token: Token,
    max_retries: u32,
    retry_backoff: RetryBackoff,
    budget: Arc<Budget>,
    max_budget_wait: Duration,
    max_pages: u32,
    write_gate: Option<WriteGate>,
    counts: Mutex<HashMap<CountKey, u64>>,
    /// Every `wait_for_actions` of this client (and its clones) polls through it.
    actions: ActionWaiter,
    retries: AtomicU64,
    /// Per attempt, by method and path template.
    durations: Family<RequestLabels, Histogram>,
    reachability: Mutex<Reachability>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.inner.base)
            .field("token", &self.inner.token)
            .finish_non_exhaustive()
    }
}

/// One request as the client sends it; `template` names it in counters and logs.
struct Call {
    method: Method,
    template: &'static str,
    path: String,
    query: Vec<(&'static str, String)>,
    body: Option<Vec<u8>>,
    /// The answer may hold secrets (root password): never quote it in errors.
    sensitive_response: bool,
}

impl Call {
    fn new(method: Method, template: &'static str, path: String) -> Self {
        Self {
            method,
            template,
            path,
            query: Vec::new(),
            body: None,
            sensitive_response: false,
        }
    }

    fn query(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.query.push((key, value.into()));
        self
    }

    fn json<B: Serialize + ?Sized>(mut self, body: &B) -> Result<Self, Error> {
        let bytes = serde_json::to_vec(body)
            .map_err(|err| Error::Config(format!("request body not serializable: {err}")))?;
        self.body = Some(bytes);
        Ok(self)
    }

    fn sensitive(mut self) -> Self {
        self.sensitive_response = true;
        self
    }
}

/// A raw successful answer; reading the body may still have failed.
struct Answer {
    status: StatusCode,
    body: Result<Vec<u8>, Error>,
}

fn validate_endpoint(endpoint: &str) -> Result<String, Error> {
    let url = url::Url::parse(endpoint).map_err(|err| {
        Error::Config(format!(
            "endpoint {endpoint:?} is not a valid URL ({err}); expected e.g. {DEFAULT_ENDPOINT}"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::Config(format!(
            "endpoint {endpoint:?} must use http or https, not {:?}",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::Config(format!("endpoint {endpoint:?} has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::Config(
            "endpoint must not contain credentials; pass the token separately".into(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(Error::Config(format!(
            "endpoint {endpoint:?} must not have a query or fragment"
        )));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(SNIPPET_CHARS * 4)]);
    let mut short = super::error::clean(&text, SNIPPET_CHARS);
    if body.len() > SNIPPET_CHARS * 4 && !short.ends_with('…') {
        short.push('…');
    }
    short
}

/// Reads the body of `response` (whose status is `status`), refusing one larger than
/// [`MAX_BODY_BYTES`]: by its `Content-Length` before reading anything, else as soon as the
/// bytes read pass the limit. Nothing past the limit is kept or read.
async fn read_body(status: StatusCode, mut response: reqwest::Response) -> Result<Vec<u8>, Error> {
    let too_large = |what: String| Error::InvalidResponse {
        status: status.as_u16(),
        snippet: format!(
            "{what}: larger than the client's limit of {MAX_BODY_BYTES} bytes for one answer \
             (a page of 50 servers is about 150 kB); not read any further"
        ),
    };
    let declared = response.content_length();
    if let Some(declared) = declared
        && declared > MAX_BODY_BYTES as u64
    {
        return Err(too_large(format!(
            "body of {declared} bytes (Content-Length)"
        )));
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(chunk) = response.chunk().await.map_err(Error::from_reqwest)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_large(format!(
                "body of more than {} bytes",
                body.len() + chunk.len()
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Decodes a successful answer's `body` as `T`, or says which field is wrong and how.
///
/// An error names the field by its path (`servers[3].public_net.ipv4.ip`), says what was
/// wrong (missing, wrong type, out of range, truncated, not JSON at all) and quotes the start
/// of the body, all of it bounded. It is always [`Error::InvalidResponse`], never
/// `not_found`: only Hetzner's own `not_found` error means an object is gone.
pub fn decode_answer<T: DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, Error> {
    decode(status, body, false)
}

/// One page of a listing, as the bytes Hetzner sent. The snapshot decodes its pages straight
/// into its compact form, borrowing strings from these bytes ([`ListedPage::borrowed`]):
/// through the wire types, every name, label and rule of a 10,000-server fleet would be
/// copied once more on each resync, only to be dropped.
pub struct ListedPage<'a> {
    status: u16,
    body: &'a [u8],
}

impl<'a> ListedPage<'a> {
    /// The page as `P` (which may borrow from the page), or `None` when it does not decode
    /// so; [`ListedPage::decode`] then says what is wrong.
    pub fn borrowed<P: Deserialize<'a>>(&self) -> Option<P> {
        // Checked as UTF-8 once, whole: read from bytes, serde_json checks each string it
        // borrows on its own, which cost a twentieth of a listing's CPU.
        let text = std::str::from_utf8(self.body).ok()?;
        serde_json::from_str(text).ok()
    }

    /// The page as the wire type `P`; an error names the field, as [`decode_answer`] does.
    pub fn decode<P: DeserializeOwned>(&self) -> Result<P, Error> {
        decode(self.status, self.body, false)
    }

    /// A page of `body` as if Hetzner had answered `200 OK` with it (for tests).
    #[doc(hidden)]
    pub fn of(body: &'a [u8]) -> Self {
        ListedPage { status: 200, body }
    }
}

fn decode<T: DeserializeOwned>(status: u16, body: &[u8], sensitive: bool) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|err| Error::InvalidResponse {
        status,
        snippet: undecodable::<T>(body, &err, sensitive),
    })
}

/// Why `body` does not decode as `T`. Decodes again (only after a failure, so the happy path
/// pays nothing) with the path tracked, to name the field.
fn undecodable<T: DeserializeOwned>(
    body: &[u8],
    err: &serde_json::Error,
    sensitive: bool,
) -> String {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let path = match serde_path_to_error::deserialize::<_, T>(&mut deserializer) {
        Err(traced) => traced.path().to_string(),
        Ok(_) => ".".to_string(),
    };
    let start = body.iter().find(|b| !b.is_ascii_whitespace());
    let what = match start {
        None => "empty body".to_string(),
        Some(b'<') => "an HTML page, not JSON (e.g. from a proxy)".to_string(),
        Some(b'{' | b'[') if path == "." => "the body".to_string(),
        Some(b'{' | b'[') => format!("field {}", super::error::clean(&path, REASON_CHARS)),
        Some(_) => "not JSON".to_string(),
    };
    if sensitive {
        // serde's message may quote values, and the body may hold a root password: only
        // the field's path and the position are given.
        return format!(
            "{what}: {:?} error at line {} column {} (content withheld)",
            err.classify(),
            err.line(),
            err.column()
        );
    }
    format!(
        "{what}: {}; body: {}",
        super::error::clean(&err.to_string(), REASON_CHARS),
        snippet(body)
    )
}

/// The error a non-2xx answer stands for: Hetzner's error (its `code`, `message`,
/// `details`, bounded) when the body is Hetzner's error envelope, else
/// [`Error::InvalidResponse`] quoting the start of the body.
pub fn error_from_answer(status: u16, body: &[u8], correlation_id: Option<&str>) -> Error {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => Error::api(status, error, correlation_id),
        Err(err) => Error::InvalidResponse {
            status,
            snippet: undecodable::<ErrorBody>(body, &err, false),
        },
    }
}

/// Pages of list endpoints.
trait ListPage: DeserializeOwned {
    type Item: Send;
    fn into_parts(self) -> (Vec<Self::Item>, Option<Meta>);
}

impl ListPage for ActionsEnvelope {
    type Item = Action;
    fn into_parts(self) -> (Vec<Action>, Option<Meta>) {
        (self.actions, self.meta)
    }
}

impl ListPage for ServersPage {
    type Item = Server;
    fn into_parts(self) -> (Vec<Server>, Option<Meta>) {
        (self.servers, self.meta)
    }
}

impl ListPage for SshKeysPage {
    type Item = SshKey;
    fn into_parts(self) -> (Vec<SshKey>, Option<Meta>) {
        (self.ssh_keys, self.meta)
    }
}

impl ListPage for FirewallsPage {
    type Item = Firewall;
    fn into_parts(self) -> (Vec<Firewall>, Option<Meta>) {
        (self.firewalls, self.meta)
    }
}

impl ListPage for ImagesPage {
    type Item = Image;
    fn into_parts(self) -> (Vec<Image>, Option<Meta>) {
        (self.images, self.meta)
    }
}

impl ListPage for ServerTypesPage {
    type Item = ServerType;
    fn into_parts(self) -> (Vec<ServerType>, Option<Meta>) {
        (self.server_types, self.meta)
    }
}

impl ListPage for LocationsPage {
    type Item = Location;
    fn into_parts(self) -> (Vec<Location>, Option<Meta>) {
        (self.locations, self.meta)
    }
}

/// Whether a list endpoint takes `sort` (the spec declares none for `GET /server_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sorting {
    ById,
    Unsupported,
}

impl Client {
    /// Validates the configuration and builds the HTTP client. Install a rustls crypto
    /// provider first (`rustls::crypto::ring::default_provider().install_default()`).
    pub fn new(config: ClientConfig) -> Result<Self, Error> {
        let base = validate_endpoint(&config.endpoint)?;
        if config.token.expose().is_empty() {
            return Err(Error::Config("token is empty".into()));
        }
        if reqwest::header::HeaderValue::from_str(&format!("Bearer {}", config.token.expose()))
            .is_err()
        {
            return Err(Error::Config(
                "token contains characters not allowed in an HTTP header".into(),
            ));
        }
        if config.timeout.is_zero() {
            return Err(Error::Config("timeout must be greater than zero".into()));
        }
        if config.retry_backoff.base > config.retry_backoff.cap {
            return Err(Error::Config(
                "retry_backoff.base must not exceed retry_backoff.cap".into(),
            ));
        }
        if config.action_poll.initial.is_zero()
            || config.action_poll.max < config.action_poll.initial
            || !(config.action_poll.factor >= 1.0 && config.action_poll.factor.is_finite())
        {
            return Err(Error::Config(
                "action_poll needs initial > 0, max >= initial and a finite factor >= 1".into(),
            ));
        }
        if config.max_pages == 0 {
            return Err(Error::Config("max_pages must be at least 1".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .user_agent(config.user_agent.clone())
            // The API never redirects; following one could carry the token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| Error::Config(format!("cannot build HTTP client: {err}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base,
                token: config.token,
                max_retries: config.max_retries,
                retry_backoff: config.retry_backoff,
                budget: config.budget,
                max_budget_wait: config.max_budget_wait,
                max_pages: config.max_pages,
                write_gate: config.write_gate,
                counts: Mutex::new(HashMap::new()),
                actions: ActionWaiter::new(config.action_poll),
                retries: AtomicU64::new(0),
                durations: Family::new_with_constructor(|| {
                    Histogram::new(exponential_buckets(0.005, 2.0, 14))
                }),
                reachability: Mutex::new(Reachability::default()),
            }),
        })
    }

    /// The endpoint in use (without trailing slash).
    pub fn endpoint(&self) -> &str {
        &self.inner.base
    }

    /// The shared request budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.inner.budget
    }

    /// Requests sent (and refused by the budget) so far, by method, path template and outcome.
    pub fn request_counts(&self) -> Vec<RequestCount> {
        let counts = self
            .inner
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut rows: Vec<RequestCount> = counts
            .iter()
            .map(|((method, path_template, outcome), count)| RequestCount {
                method,
                path_template,
                outcome: outcome.clone(),
                count: *count,
            })
            .collect();
        rows.sort();
        rows
    }

    /// `wait_for_actions` calls waiting right now, across this client and its clones.
    pub fn pending_action_waits(&self) -> usize {
        self.inner.actions.pending_waits()
    }

    /// Action poll rounds so far: each asks about every due wait's actions at once (one
    /// `GET /servers/actions` per 50 IDs that touch a server, one `GET /actions` per 25 others).
    pub fn action_poll_rounds(&self) -> u64 {
        self.inner.actions.rounds()
    }

    /// How long each attempt took, by method and path template.
    pub fn request_durations(&self) -> &Family<RequestLabels, Histogram> {
        &self.inner.durations
    }

    /// How Hetzner has answered lately.
    pub fn reachability(&self) -> Reachability {
        *self
            .inner
            .reachability
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Retries made so far (attempts beyond the first of each request).
    pub fn retry_count(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    fn count(&self, method: &Method, template: &'static str, outcome: String) {
        let method = method_label(method);
        let mut counts = self
            .inner
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *counts.entry((method, template, outcome)).or_insert(0) += 1;
    }

    /// Sends `call` with budget, retries, counting and logging; decodes a 2xx body with
    /// `decode_ok`.
    async fn execute<T>(
        &self,
        call: &Call,
        mut decode_ok: impl FnMut(StatusCode, &[u8]) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut retry = 0;
        loop {
            if let Err(refused) = self.inner.budget.acquire(self.inner.max_budget_wait).await {
                self.count(&call.method, call.template, "budget_exhausted".into());
                return Err(refused);
            }
            // After the budget wait, so nothing stands between this check and the send.
            if call.method != Method::GET
                && let Some(gate) = &self.inner.write_gate
                && !gate.allows()
            {
                self.count(&call.method, call.template, "not_leading".into());
                return Err(Error::NotLeading);
            }
            let started = Instant::now();
            let result = match self.send_once(call).await {
                Ok(answer) => answer
                    .body
                    .and_then(|body| decode_ok(answer.status, &body))
                    .map(|value| (answer.status, value)),
                Err(err) => Err(err),
            };
            let outcome = match &result {
                Ok((status, _)) => status.as_str().to_owned(),
                Err(err) => err.metric_label().to_owned(),
            };
            self.inner
                .durations
                .get_or_create(&vec![
                    ("method", method_label(&call.method)),
                    ("path", call.template),
                ])
                .observe(started.elapsed().as_secs_f64());
            self.inner
                .reachability
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .record(&result.as_ref().map(drop), SystemTime::now());
            tracing::debug!(
                method = %call.method,
                path = call.template,
                outcome = %outcome,
                elapsed_ms = started.elapsed().as_millis() as u64,
                retry,
                "hcloud request"
            );
            self.count(&call.method, call.template, outcome);
            match result {
                Ok((_, value)) => return Ok(value),
                Err(err) if retry < self.inner.max_retries && err.is_retryable_now() => {
                    self.inner.retries.fetch_add(1, Ordering::Relaxed);
                    // After a 429 the budget's circuit is the wait; otherwise back off.
                    if !matches!(err.code(), Some(ErrorCode::RateLimitExceeded)) {
                        tokio::time::sleep(self.inner.retry_backoff.delay(retry)).await;
                    }
                    tracing::debug!(
                        method = %call.method,
                        path = call.template,
                        error = %err,
                        retry,
                        "hcloud request will be retried"
                    );
                    retry += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// One HTTP exchange. Non-2xx answers become errors here; 2xx bodies are returned raw.
    async fn send_once(&self, call: &Call) -> Result<Answer, Error> {
        let url = format!("{}{}", self.inner.base, call.path);
        let mut request = self
            .inner
            .http
            .request(call.method.clone(), url)
            .bearer_auth(self.inner.token.expose())
            .header(ACCEPT, "application/json");
        if !call.query.is_empty() {
            request = request.query(&call.query);
        }
        if let Some(body) = &call.body {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let response = request.send().await.map_err(Error::from_reqwest)?;
        let status = response.status();
        let headers = response.headers();
        let limit =
            header_u64(headers, "ratelimit-limit").map(|v| v.min(u64::from(u32::MAX)) as u32);
        let remaining =
            header_u64(headers, "ratelimit-remaining").map(|v| v.min(u64::from(u32::MAX)) as u32);
        let reset = header_u64(headers, "ratelimit-reset");
        let correlation_id = headers
            .get("x-correlation-id")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        self.inner.budget.observe_headers(limit, remaining);
        if status == StatusCode::TOO_MANY_REQUESTS {
            self.inner.budget.observe_rate_limited(reset);
        }
        let body = read_body(status, response).await;
        if status.is_success() {
            return Ok(Answer { status, body });
        }
        Err(error_from_answer(
            status.as_u16(),
            &body?,
            correlation_id.as_deref(),
        ))
    }

    async fn fetch<T: DeserializeOwned>(&self, call: Call) -> Result<T, Error> {
        let sensitive = call.sensitive_response;
        self.execute(&call, |status, body| {
            decode(status.as_u16(), body, sensitive)
        })
        .await
    }

    /// For `204 No Content` answers (a body, if any, is ignored).
    async fn fetch_empty(&self, call: Call) -> Result<(), Error> {
        self.execute(&call, |_, _| Ok(())).await
    }

    /// Every page of a list, sorted by ID.
    async fn list_all<P: ListPage>(
        &self,
        template: &'static str,
        filters: &[(&'static str, &str)],
    ) -> Result<Vec<P::Item>, Error> {
        self.list_pages::<P>(template, filters, Sorting::ById).await
    }

    /// Follows `next_page` (null or 0 ends the list) up to `max_pages` pages; a list with more
    /// is an error rather than silently cut short.
    async fn list_pages<P: ListPage>(
        &self,
        template: &'static str,
        filters: &[(&'static str, &str)],
        sorting: Sorting,
    ) -> Result<Vec<P::Item>, Error> {
        let mut items = Vec::new();
        self.each_page::<P>(template, filters, sorting, |batch| items.extend(batch))
            .await?;
        Ok(items)
    }

    /// [`Client::list_pages`], handing each page to `on_page` as it arrives, so that a list
    /// of thousands is never held whole.
    async fn each_page<P: ListPage>(
        &self,
        template: &'static str,
        filters: &[(&'static str, &str)],
        sorting: Sorting,
        mut on_page: impl FnMut(Vec<P::Item>) + Send,
    ) -> Result<(), Error> {
        self.each_listed_page(template, filters, sorting, |page| {
            let (batch, meta) = page.decode::<P>()?.into_parts();
            on_page(batch);
            Ok(meta)
        })
        .await
    }

    /// Every page of a list as Hetzner sent it, for `on_page` to decode (it returns the
    /// page's `meta`). Decoding happens inside the request, so a page that does not decode
    /// is counted and reported like any other invalid answer.
    async fn each_listed_page(
        &self,
        template: &'static str,
        filters: &[(&'static str, &str)],
        sorting: Sorting,
        mut on_page: impl FnMut(ListedPage<'_>) -> Result<Option<Meta>, Error> + Send,
    ) -> Result<(), Error> {
        let mut page: i64 = 1;
        loop {
            let mut call = Call::new(Method::GET, template, template.to_owned());
            for (key, value) in filters {
                if !value.is_empty() {
                    call = call.query(key, *value);
                }
            }
            if sorting == Sorting::ById {
                call = call.query("sort", LIST_SORT);
            }
            call = call
                .query("page", page.to_string())
                .query("per_page", PER_PAGE.to_string());
            let meta = self
                .execute(&call, |status, body| {
                    on_page(ListedPage {
                        status: status.as_u16(),
                        body,
                    })
                })
                .await?;
            match meta.and_then(|meta| meta.pagination.next_page) {
                None | Some(0) => return Ok(()),
                // Any other next page would loop, or skip a page and with it objects that
                // would then look gone.
                Some(next) if Some(next) != page.checked_add(1) => {
                    return Err(Error::InvalidResponse {
                        status: 200,
                        snippet: format!(
                            "{template}: field meta.pagination.next_page is {next} after page \
                             {page}; expected {} or null",
                            page.saturating_add(1)
                        ),
                    });
                }
                Some(next) if next > i64::from(self.inner.max_pages) => {
                    return Err(Error::PageLimit {
                        path: template,
                        max_pages: self.inner.max_pages,
                    });
                }
                Some(next) => page = next,
            }
        }
    }

    pub async fn get_server(&self, id: i64) -> Result<Server, Error> {
        let call = Call::new(Method::GET, "/servers/{id}", format!("/servers/{id}"));
        Ok(self.fetch::<ServerEnvelope>(call).await?.server)
    }

    pub async fn get_ssh_key(&self, id: i64) -> Result<SshKey, Error> {
        let call = Call::new(Method::GET, "/ssh_keys/{id}", format!("/ssh_keys/{id}"));
        Ok(self.fetch::<SshKeyEnvelope>(call).await?.ssh_key)
    }

    pub async fn get_firewall(&self, id: i64) -> Result<Firewall, Error> {
        let call = Call::new(Method::GET, "/firewalls/{id}", format!("/firewalls/{id}"));
        Ok(self.fetch::<FirewallEnvelope>(call).await?.firewall)
    }

    /// `GET /images/{id}`: a system image, snapshot or backup.
    pub async fn get_image(&self, id: i64) -> Result<Image, Error> {
        let call = Call::new(Method::GET, "/images/{id}", format!("/images/{id}"));
        Ok(self.fetch::<ImageEnvelope>(call).await?.image)
    }

    pub async fn get_action(&self, id: i64) -> Result<Action, Error> {
        let call = Call::new(Method::GET, "/actions/{id}", format!("/actions/{id}"));
        Ok(self.fetch::<ActionEnvelope>(call).await?.action)
    }

    /// `GET /actions?id=..` for at most 25 IDs (the waiter chunks them).
    async fn actions_by_ids(&self, ids: &[i64]) -> Result<Vec<Action>, Error> {
        let mut call = Call::new(Method::GET, "/actions", "/actions".to_owned());
        for id in ids {
            call = call.query("id", id.to_string());
        }
        Ok(self.fetch::<ActionsEnvelope>(call).await?.actions)
    }

    /// `GET /servers/actions?id=..` for at most 50 IDs (one page; the waiter chunks them).
    async fn server_actions_by_ids(&self, ids: &[i64]) -> Result<Vec<Action>, Error> {
        let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
        let filters: Vec<(&'static str, &str)> = ids.iter().map(|id| ("id", id.as_str())).collect();
        self.list_all::<ActionsEnvelope>("/servers/actions", &filters)
            .await
    }

    async fn update_labels<T: DeserializeOwned>(
        &self,
        template: &'static str,
        path: String,
        labels: &Labels,
    ) -> Result<T, Error> {
        let call = Call::new(Method::PUT, template, path).json(&UpdateLabels { labels })?;
        self.fetch(call).await
    }

    async fn firewall_action(
        &self,
        template: &'static str,
        path: String,
        body: &impl Serialize,
    ) -> Result<Vec<Action>, Error> {
        let call = Call::new(Method::POST, template, path).json(body)?;
        Ok(self.fetch::<ActionsEnvelope>(call).await?.actions)
    }
}

impl HcloudApi for Client {
    async fn list_servers(&self, label_selector: &str) -> Result<Vec<Server>, Error> {
        self.list_all::<ServersPage>("/servers", &[("label_selector", label_selector)])
            .await
    }

    async fn list_ssh_keys(&self, label_selector: &str) -> Result<Vec<SshKey>, Error> {
        self.list_all::<SshKeysPage>("/ssh_keys", &[("label_selector", label_selector)])
            .await
    }

    async fn list_firewalls(&self, label_selector: &str) -> Result<Vec<Firewall>, Error> {
        self.list_all::<FirewallsPage>("/firewalls", &[("label_selector", label_selector)])
            .await
    }

    async fn each_server_page(
        &self,
        label_selector: &str,
        on_page: impl FnMut(ListedPage<'_>) -> Result<Option<Meta>, Error> + Send,
    ) -> Result<(), Error> {
        self.each_listed_page(
            "/servers",
            &[("label_selector", label_selector)],
            Sorting::ById,
            on_page,
        )
        .await
    }

    async fn each_ssh_key_page(
        &self,
        label_selector: &str,
        on_page: impl FnMut(ListedPage<'_>) -> Result<Option<Meta>, Error> + Send,
    ) -> Result<(), Error> {
        self.each_listed_page(
            "/ssh_keys",
            &[("label_selector", label_selector)],
            Sorting::ById,
            on_page,
        )
        .await
    }

    async fn each_firewall_page(
        &self,
        label_selector: &str,
        on_page: impl FnMut(ListedPage<'_>) -> Result<Option<Meta>, Error> + Send,
    ) -> Result<(), Error> {
        self.each_listed_page(
            "/firewalls",
            &[("label_selector", label_selector)],
            Sorting::ById,
            on_page,
        )
        .await
    }

    async fn server_by_name(&self, name: &str) -> Result<Option<Server>, Error> {
        if name.is_empty() {
            return Ok(None);
        }
        let found = self
            .list_all::<ServersPage>("/servers", &[("name", name)])
            .await?;
        Ok(found.into_iter().find(|server| server.name == name))
    }

    async fn ssh_key_by_name(&self, name: &str) -> Result<Option<SshKey>, Error> {
        if name.is_empty() {
            return Ok(None);
        }
        let found = self
            .list_all::<SshKeysPage>("/ssh_keys", &[("name", name)])
            .await?;
        Ok(found.into_iter().find(|key| key.name == name))
    }

    async fn ssh_key_by_fingerprint(&self, fingerprint: &str) -> Result<Option<SshKey>, Error> {
        if fingerprint.is_empty() {
            return Ok(None);
        }
        let found = self
            .list_all::<SshKeysPage>("/ssh_keys", &[("fingerprint", fingerprint)])
            .await?;
        Ok(found
            .into_iter()
            .find(|key| key.fingerprint.eq_ignore_ascii_case(fingerprint)))
    }

    async fn firewall_by_name(&self, name: &str) -> Result<Option<Firewall>, Error> {
        if name.is_empty() {
            return Ok(None);
        }
        let found = self
            .list_all::<FirewallsPage>("/firewalls", &[("name", name)])
            .await?;
        Ok(found.into_iter().find(|firewall| firewall.name == name))
    }

    async fn create_ssh_key(&self, req: &CreateSshKey) -> Result<SshKey, Error> {
        let call = Call::new(Method::POST, "/ssh_keys", "/ssh_keys".to_owned()).json(req)?;
        Ok(self.fetch::<SshKeyEnvelope>(call).await?.ssh_key)
    }

    async fn create_firewall(&self, req: &CreateFirewall) -> Result<CreateFirewallResponse, Error> {
        let call = Call::new(Method::POST, "/firewalls", "/firewalls".to_owned()).json(req)?;
        self.fetch(call).await
    }

    async fn create_server(&self, req: &CreateServer) -> Result<CreateServerResponse, Error> {
        let call = Call::new(Method::POST, "/servers", "/servers".to_owned())
            .json(req)?
            .sensitive();
        self.fetch(call).await
    }

    async fn update_server_labels(&self, id: i64, labels: &Labels) -> Result<Server, Error> {
        let envelope: ServerEnvelope = self
            .update_labels("/servers/{id}", format!("/servers/{id}"), labels)
            .await?;
        Ok(envelope.server)
    }

    async fn update_ssh_key_labels(&self, id: i64, labels: &Labels) -> Result<SshKey, Error> {
        let envelope: SshKeyEnvelope = self
            .update_labels("/ssh_keys/{id}", format!("/ssh_keys/{id}"), labels)
            .await?;
        Ok(envelope.ssh_key)
    }

    async fn update_firewall_labels(&self, id: i64, labels: &Labels) -> Result<Firewall, Error> {
        let envelope: FirewallEnvelope = self
            .update_labels("/firewalls/{id}", format!("/firewalls/{id}"), labels)
            .await?;
        Ok(envelope.firewall)
    }

    async fn delete_server(&self, id: i64) -> Result<Action, Error> {
        let call = Call::new(Method::DELETE, "/servers/{id}", format!("/servers/{id}"));
        Ok(self.fetch::<ActionEnvelope>(call).await?.action)
    }

    async fn delete_ssh_key(&self, id: i64) -> Result<(), Error> {
        let call = Call::new(Method::DELETE, "/ssh_keys/{id}", format!("/ssh_keys/{id}"));
        self.fetch_empty(call).await
    }

    async fn delete_firewall(&self, id: i64) -> Result<(), Error> {
        let call = Call::new(
            Method::DELETE,
            "/firewalls/{id}",
            format!("/firewalls/{id}"),
        );
        self.fetch_empty(call).await
    }

    async fn server_power(&self, id: i64, action: ServerPowerAction) -> Result<Action, Error> {
        let template = match action {
            ServerPowerAction::PowerOn => "/servers/{id}/actions/poweron",
            ServerPowerAction::PowerOff => "/servers/{id}/actions/poweroff",
            ServerPowerAction::Shutdown => "/servers/{id}/actions/shutdown",
        };
        let path = format!("/servers/{id}/actions/{}", action.path_segment());
        let call = Call::new(Method::POST, template, path);
        Ok(self.fetch::<ActionEnvelope>(call).await?.action)
    }

    async fn set_firewall_rules(
        &self,
        id: i64,
        rules: &[FirewallRule],
    ) -> Result<Vec<Action>, Error> {
        self.firewall_action(
            "/firewalls/{id}/actions/set_rules",
            format!("/firewalls/{id}/actions/set_rules"),
            &SetRules { rules },
        )
        .await
    }

    async fn apply_firewall(&self, id: i64, server_ids: &[i64]) -> Result<Vec<Action>, Error> {
        let apply_to = server_ids
            .iter()
            .map(|id| FirewallResource::server(*id))
            .collect();
        self.firewall_action(
            "/firewalls/{id}/actions/apply_to_resources",
            format!("/firewalls/{id}/actions/apply_to_resources"),
            &ApplyTo { apply_to },
        )
        .await
    }

    async fn remove_firewall(&self, id: i64, server_ids: &[i64]) -> Result<Vec<Action>, Error> {
        let remove_from = server_ids
            .iter()
            .map(|id| FirewallResource::server(*id))
            .collect();
        self.firewall_action(
            "/firewalls/{id}/actions/remove_from_resources",
            format!("/firewalls/{id}/actions/remove_from_resources"),
            &RemoveFrom { remove_from },
        )
        .await
    }

    async fn get_server(&self, id: i64) -> Result<Server, Error> {
        Client::get_server(self, id).await
    }

    async fn get_ssh_key(&self, id: i64) -> Result<SshKey, Error> {
        Client::get_ssh_key(self, id).await
    }

    async fn get_firewall(&self, id: i64) -> Result<Firewall, Error> {
        Client::get_firewall(self, id).await
    }

    async fn create_snapshot(
        &self,
        server_id: i64,
        description: &str,
        labels: &Labels,
    ) -> Result<CreateImageResponse, Error> {
        let body = CreateImage {
            kind: ImageType::Snapshot,
            description: (!description.is_empty()).then(|| description.to_owned()),
            labels: labels.clone(),
        };
        let call = Call::new(
            Method::POST,
            "/servers/{id}/actions/create_image",
            format!("/servers/{server_id}/actions/create_image"),
        )
        .json(&body)?;
        self.fetch(call).await
    }

    async fn list_snapshots(&self, label_selector: &str) -> Result<Vec<Image>, Error> {
        self.list_all::<ImagesPage>(
            "/images",
            &[("type", "snapshot"), ("label_selector", label_selector)],
        )
        .await
    }

    async fn delete_image(&self, id: i64) -> Result<(), Error> {
        let call = Call::new(Method::DELETE, "/images/{id}", format!("/images/{id}"));
        self.fetch_empty(call).await
    }

    async fn server_type_by_name(&self, name: &str) -> Result<Option<ServerType>, Error> {
        if name.is_empty() {
            return Ok(None);
        }
        let found = self
            .list_pages::<ServerTypesPage>("/server_types", &[("name", name)], Sorting::Unsupported)
            .await?;
        Ok(found
            .into_iter()
            .find(|server_type| server_type.name == name))
    }

    async fn location_by_name(&self, name: &str) -> Result<Option<Location>, Error> {
        if name.is_empty() {
            return Ok(None);
        }
        let found = self
            .list_all::<LocationsPage>("/locations", &[("name", name)])
            .await?;
        Ok(found.into_iter().find(|location| location.name == name))
    }

    async fn image_by_name(&self, name: &str) -> Result<Vec<Image>, Error> {
        if name.is_empty() {
            return Ok(Vec::new());
        }
        let found = self
            .list_all::<ImagesPage>("/images", &[("name", name), ("include_deprecated", "true")])
            .await?;
        Ok(found
            .into_iter()
            .filter(|image| image.name.as_deref() == Some(name))
            .collect())
    }

    async fn wait_for_actions(
        &self,
        actions: &[ActionRef],
        timeout: Duration,
    ) -> Result<Vec<Action>, Error> {
        self.inner
            .actions
            .wait(actions, timeout, |endpoint, chunk| async move {
                match endpoint {
                    Endpoint::Actions => self.actions_by_ids(&chunk).await,
                    Endpoint::ServerActions => self.server_actions_by_ids(&chunk).await,
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str) -> ClientConfig {
        ClientConfig::new(endpoint, Token::new("secret-token"))
    }

    #[test]
    fn token_never_prints() {
        let token = Token::new("  hunter2\n");
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
        assert_eq!(format!("{token}"), "Token(<redacted>)");
        assert_eq!(token.expose(), "hunter2");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(config("https://api.hetzner.cloud/v1/")).unwrap();
        let printed = format!("{client:?}");
        assert!(!printed.contains("secret-token"), "{printed}");
        assert_eq!(client.endpoint(), "https://api.hetzner.cloud/v1");
    }

    #[test]
    fn bad_configuration_is_refused_with_a_reason() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cases = [
            (config("api.hetzner.cloud/v1"), "not a valid URL"),
            (config("ftp://api.hetzner.cloud/v1"), "http or https"),
            (
                config("https://user:pw@api.hetzner.cloud/v1"),
                "credentials",
            ),
            (config("https://api.hetzner.cloud/v1?x=1"), "query"),
            (
                ClientConfig::new("https://api.hetzner.cloud/v1", Token::new(" ")),
                "token is empty",
            ),
            (
                ClientConfig::new("https://api.hetzner.cloud/v1", Token::new("a\nb")),
                "not allowed in an HTTP header",
            ),
            (
                ClientConfig {
                    timeout: Duration::ZERO,
                    ..config("https://api.hetzner.cloud/v1")
                },
                "timeout",
            ),
        ];
        for (cfg, expected) in cases {
            let err = Client::new(cfg).unwrap_err();
            assert!(matches!(err, Error::Config(_)));
            assert!(err.to_string().contains(expected), "{err} lacks {expected}");
        }
    }

    #[test]
    fn backoff_stays_between_base_and_the_capped_ceiling() {
        let backoff = RetryBackoff {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
        };
        for retry in 0..40 {
            let ceiling = Duration::from_millis(100 * 2u64.pow(retry.min(10))).min(backoff.cap);
            for _ in 0..20 {
                let delay = backoff.delay(retry);
                assert!(
                    delay >= backoff.base && delay <= ceiling,
                    "{retry}: {delay:?}"
                );
            }
        }
        // Jitter: not all delays of a later retry are equal.
        let delays: std::collections::BTreeSet<_> = (0..50).map(|_| backoff.delay(5)).collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn snippets_are_short_and_single_line() {
        let body = format!("<html>\n{}</html>", "x".repeat(1000));
        let short = snippet(body.as_bytes());
        assert!(short.chars().count() <= SNIPPET_CHARS + 1);
        assert!(!short.contains('\n'));
    }

    #[test]
    fn undecodable_create_server_answers_do_not_quote_the_body() {
        let body = br#"{"server": 1, "root_password": "s3cret-pass"}"#;
        let err = decode::<CreateServerResponse>(201, body, true).unwrap_err();
        assert!(matches!(err, Error::InvalidResponse { status: 201, .. }));
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
