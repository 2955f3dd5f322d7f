//! Errors of the Hetzner Cloud client, keyed on Hetzner's error `code`, not the HTTP status.
//!
//! The one rule callers rely on: only [`Error::is_not_found`] means "the object is gone".
//! A 429, a 5xx, a timeout or an undecodable body is "unknown" and must never be read as absent.

use std::fmt;
use std::time::Duration;

use super::types::ErrorPayload;

/// Characters of Hetzner's error `message` (and an action's) kept in an error.
pub const MAX_MESSAGE_CHARS: usize = 500;
/// Characters of an error `code`, an action `command` or a correlation id kept in an error:
/// real ones are short identifiers.
pub const MAX_CODE_CHARS: usize = 64;
/// Serialized bytes of an error's `details` kept (real ones name a few fields).
const MAX_DETAILS_BYTES: usize = 16 * 1024;

/// `text` as one line of at most `max` characters: control characters (newlines, escapes)
/// become spaces, and a cut text ends with `…`. For everything the API sends that ends up in
/// an error, a log line or a row.
pub fn clean(text: &str, max: usize) -> String {
    let cut = text.char_indices().nth(max).is_some();
    let keep = if cut { max.saturating_sub(1) } else { max };
    let mut out: String = text
        .chars()
        .take(keep)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if cut && max > 0 {
        out.push('…');
    }
    out
}

/// Hetzner's machine-readable error codes (spec overview "Errors" plus the operation-specific
/// ones of the endpoints this client calls). Unknown codes keep their text in `Other`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    JsonError,
    Unauthorized,
    TokenReadonly,
    Forbidden,
    Maintenance,
    ResourceLimitExceeded,
    NotFound,
    MethodNotAllowed,
    UniquenessError,
    Conflict,
    DeprecatedApiEndpoint,
    ResourceUnavailable,
    InvalidInput,
    ServiceError,
    UnsupportedError,
    Locked,
    Protected,
    RateLimitExceeded,
    ServerError,
    BadGateway,
    Unavailable,
    Timeout,
    // Operation-specific codes of servers and firewalls.
    PlacementError,
    PrimaryIpVersionMismatch,
    PrimaryIpAssigned,
    PrimaryIpDatacenterMismatch,
    FirewallResourceNotFound,
    FirewallAlreadyApplied,
    FirewallManagedByLabelSelector,
    IncompatibleNetworkType,
    PrivateNetOnlyServer,
    ServerAlreadyAdded,
    ResourceInUse,
    ServerNotStopped,
    InvalidServerType,
    UnknownError,
    Other(String),
}

const KNOWN_CODES: &[(&str, ErrorCode)] = &[
    ("json_error", ErrorCode::JsonError),
    ("unauthorized", ErrorCode::Unauthorized),
    ("token_readonly", ErrorCode::TokenReadonly),
    ("forbidden", ErrorCode::Forbidden),
    ("maintenance", ErrorCode::Maintenance),
    ("resource_limit_exceeded", ErrorCode::ResourceLimitExceeded),
    ("not_found", ErrorCode::NotFound),
    ("method_not_allowed", ErrorCode::MethodNotAllowed),
    ("uniqueness_error", ErrorCode::UniquenessError),
    ("conflict", ErrorCode::Conflict),
    ("deprecated_api_endpoint", ErrorCode::DeprecatedApiEndpoint),
    ("resource_unavailable", ErrorCode::ResourceUnavailable),
    ("invalid_input", ErrorCode::InvalidInput),
    ("service_error", ErrorCode::ServiceError),
    ("unsupported_error", ErrorCode::UnsupportedError),
    ("locked", ErrorCode::Locked),
    ("protected", ErrorCode::Protected),
    ("rate_limit_exceeded", ErrorCode::RateLimitExceeded),
    ("server_error", ErrorCode::ServerError),
    ("bad_gateway", ErrorCode::BadGateway),
    ("unavailable", ErrorCode::Unavailable),
    ("timeout", ErrorCode::Timeout),
    ("placement_error", ErrorCode::PlacementError),
    (
        "primary_ip_version_mismatch",
        ErrorCode::PrimaryIpVersionMismatch,
    ),
    ("primary_ip_assigned", ErrorCode::PrimaryIpAssigned),
    (
        "primary_ip_datacenter_mismatch",
        ErrorCode::PrimaryIpDatacenterMismatch,
    ),
    (
        "firewall_resource_not_found",
        ErrorCode::FirewallResourceNotFound,
    ),
    (
        "firewall_already_applied",
        ErrorCode::FirewallAlreadyApplied,
    ),
    (
        "firewall_managed_by_label_selector",
        ErrorCode::FirewallManagedByLabelSelector,
    ),
    (
        "incompatible_network_type",
        ErrorCode::IncompatibleNetworkType,
    ),
    ("private_net_only_server", ErrorCode::PrivateNetOnlyServer),
    ("server_already_added", ErrorCode::ServerAlreadyAdded),
    ("resource_in_use", ErrorCode::ResourceInUse),
    ("server_not_stopped", ErrorCode::ServerNotStopped),
    ("invalid_server_type", ErrorCode::InvalidServerType),
    ("unknown_error", ErrorCode::UnknownError),
];

impl ErrorCode {
    pub fn parse(code: &str) -> Self {
        KNOWN_CODES
            .iter()
            .find(|(text, _)| *text == code)
            .map(|(_, known)| known.clone())
            .unwrap_or_else(|| ErrorCode::Other(code.to_owned()))
    }

    /// The code as on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::Other(text) => text,
            known => KNOWN_CODES
                .iter()
                .find(|(_, code)| code == known)
                .map(|(text, _)| *text)
                .unwrap_or("unknown_error"),
        }
    }

    /// A bounded label for metrics: the code for known ones, `other_api_error` otherwise
    /// (so an API inventing codes can't blow up metric cardinality).
    pub fn metric_label(&self) -> &'static str {
        match self {
            ErrorCode::Other(_) => "other_api_error",
            known => KNOWN_CODES
                .iter()
                .find(|(_, code)| code == known)
                .map(|(text, _)| *text)
                .unwrap_or("other_api_error"),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of transport failure happened; decides whether a retry is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// No connection was made: the request never reached the API.
    Connect,
    /// The request or response took longer than the configured timeout. A POST may have
    /// been carried out anyway.
    Timeout,
    /// The connection broke while sending or reading.
    Io,
}

impl TransportKind {
    /// For messages: what happened, in words.
    pub fn describe(self) -> &'static str {
        match self {
            TransportKind::Connect => "cannot connect",
            TransportKind::Timeout => "timed out",
            TransportKind::Io => "connection broken",
        }
    }
}

/// `Clone`, so one failed action poll can fail every wait it served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{}", api_display(*status, code, message, correlation_id.as_deref()))]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
        details: Option<serde_json::Value>,
        correlation_id: Option<String>,
    },
    /// Connect failure, timeout, broken body. Never carries the request URL.
    #[error("hcloud transport error ({}): {message}", kind.describe())]
    Transport {
        kind: TransportKind,
        message: String,
    },
    /// The API answered with a body this client can't decode (e.g. a proxy's HTML 502).
    #[error("hcloud API gave an unusable response (HTTP {status}): {snippet}")]
    InvalidResponse { status: u16, snippet: String },
    /// The request budget is exhausted (or paused after a 429) for longer than the client is
    /// configured to wait; try again after `reset_in`.
    #[error(
        "hcloud request budget exhausted; next request possible in {} s",
        reset_in.as_secs_f64().ceil()
    )]
    RateLimited { reset_in: Duration },
    #[error("hcloud action {action_id} ({command}) failed: {code}: {message}")]
    ActionFailed {
        action_id: i64,
        command: String,
        code: String,
        message: String,
    },
    #[error(
        "hcloud actions {} still running when the wait timed out",
        ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
    )]
    ActionTimeout { ids: Vec<i64> },
    /// A listing had more than `max_pages` pages; returning the first ones would silently
    /// drop objects (and a reconciler would read them as gone). Raise `ClientConfig::max_pages`
    /// or narrow the label selector.
    #[error(
        "hcloud listing GET {path} has more than {max_pages} pages (of up to 50 items); \
         refusing to return a truncated list"
    )]
    PageLimit { path: &'static str, max_pages: u32 },
    #[error("hcloud client configuration: {0}")]
    Config(String),
    /// A request that changes something was not sent: the client's [`WriteGate`] is closed
    /// (this replica no longer holds the leader lease).
    ///
    /// [`WriteGate`]: super::WriteGate
    #[error("hcloud request not sent: this replica does not hold the leader lease")]
    NotLeading,
}

fn api_display(
    status: u16,
    code: &ErrorCode,
    message: &str,
    correlation_id: Option<&str>,
) -> String {
    match correlation_id {
        Some(id) => {
            format!("hcloud API error {code} (HTTP {status}): {message} (correlation id {id})")
        }
        None => format!("hcloud API error {code} (HTTP {status}): {message}"),
    }
}

impl Error {
    /// The API error code, if the API answered with one.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Hetzner's error envelope as an error, every text bounded and on one line (the API is
    /// trusted to say what failed, not to be short). `details` larger than a few kB are
    /// dropped.
    pub fn api(status: u16, error: ErrorPayload, correlation_id: Option<&str>) -> Error {
        let code = match ErrorCode::parse(&error.code) {
            ErrorCode::Other(text) => ErrorCode::Other(clean(&text, MAX_CODE_CHARS)),
            known => known,
        };
        let details = error.details.filter(|details| {
            !details.is_null()
                && serde_json::to_vec(details).is_ok_and(|bytes| bytes.len() <= MAX_DETAILS_BYTES)
        });
        Error::Api {
            status,
            code,
            message: clean(&error.message, MAX_MESSAGE_CHARS),
            details,
            correlation_id: correlation_id.map(|id| clean(id, MAX_CODE_CHARS)),
        }
    }

    /// True only for Hetzner's `not_found` error (code `not_found`, HTTP 404): the object
    /// does not exist. Anything else, however it looks, says nothing about existence.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::Api {
                status: 404,
                code: ErrorCode::NotFound,
                ..
            }
        )
    }

    /// A name (or SSH key fingerprint) is taken; the caller can look the object up and adopt it.
    pub fn is_uniqueness_error(&self) -> bool {
        matches!(self.code(), Some(ErrorCode::UniquenessError))
    }

    /// Names of the fields an `invalid_input` or `uniqueness_error` complains about
    /// (`details.fields[].name`).
    pub fn field_names(&self) -> Vec<String> {
        let Error::Api {
            details: Some(details),
            ..
        } = self
        else {
            return Vec::new();
        };
        details
            .get("fields")
            .and_then(|fields| fields.as_array())
            .map(|fields| {
                fields
                    .iter()
                    .filter_map(|field| field.get("name")?.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Retrying can't fix this without a change of input, configuration or quota. A uniqueness
    /// error is not terminal: the caller resolves it by adopting the existing object.
    pub fn is_terminal(&self) -> bool {
        match self {
            Error::Api { code, .. } => matches!(
                code,
                ErrorCode::InvalidInput
                    | ErrorCode::JsonError
                    | ErrorCode::Unauthorized
                    | ErrorCode::TokenReadonly
                    | ErrorCode::Forbidden
                    | ErrorCode::ResourceLimitExceeded
                    | ErrorCode::Protected
                    | ErrorCode::MethodNotAllowed
                    | ErrorCode::DeprecatedApiEndpoint
                    | ErrorCode::UnsupportedError
                    | ErrorCode::InvalidServerType
                    | ErrorCode::IncompatibleNetworkType
                    | ErrorCode::PrivateNetOnlyServer
                    | ErrorCode::PrimaryIpVersionMismatch
                    | ErrorCode::PrimaryIpDatacenterMismatch
            ),
            Error::Config(_) => true,
            _ => false,
        }
    }

    /// A failure that hits every request of the project alike, not one resource: the token is
    /// rejected or lacks rights, or Hetzner cannot be reached or answered garbage.
    pub fn is_project_wide(&self) -> bool {
        match self {
            Error::Api { code, .. } => matches!(
                code,
                ErrorCode::Unauthorized | ErrorCode::TokenReadonly | ErrorCode::Forbidden
            ),
            Error::Transport { .. } | Error::InvalidResponse { .. } => true,
            _ => false,
        }
    }

    /// The official clients' policy for an immediate retry of the same request (any method):
    /// codes `conflict`, `rate_limit_exceeded`, `bad_gateway`, `timeout`; a 502/504 whose body
    /// is not a JSON error; and transport timeouts and connect failures. Not `locked`,
    /// `unavailable`, `server_error` or `service_error`: those are for a later requeue.
    pub fn is_retryable_now(&self) -> bool {
        match self {
            Error::Api { code, .. } => matches!(
                code,
                ErrorCode::Conflict
                    | ErrorCode::RateLimitExceeded
                    | ErrorCode::BadGateway
                    | ErrorCode::Timeout
            ),
            Error::InvalidResponse { status, .. } => matches!(status, 502 | 504),
            Error::Transport { kind, .. } => {
                matches!(kind, TransportKind::Connect | TransportKind::Timeout)
            }
            _ => false,
        }
    }

    /// A low-cardinality label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Api { code, .. } => match code {
                ErrorCode::RateLimitExceeded => "rate_limited",
                code => code.metric_label(),
            },
            Error::Transport {
                kind: TransportKind::Timeout,
                ..
            } => "transport_timeout",
            Error::Transport { .. } => "transport",
            Error::InvalidResponse { .. } => "invalid_response",
            Error::RateLimited { .. } => "rate_limited",
            Error::ActionFailed { .. } => "action_failed",
            Error::ActionTimeout { .. } => "action_timeout",
            Error::PageLimit { .. } => "page_limit",
            Error::Config(_) => "config",
            Error::NotLeading => "not_leading",
        }
    }

    pub(crate) fn from_reqwest(err: reqwest::Error) -> Self {
        let kind = if err.is_timeout() {
            TransportKind::Timeout
        } else if err.is_connect() {
            TransportKind::Connect
        } else {
            TransportKind::Io
        };
        let err = err.without_url();
        let mut message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Error::Transport { kind, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: &str, status: u16) -> Error {
        Error::Api {
            status,
            code: ErrorCode::parse(code),
            message: "m".into(),
            details: None,
            correlation_id: None,
        }
    }

    #[test]
    fn codes_round_trip_and_unknown_codes_are_kept() {
        for (text, code) in KNOWN_CODES {
            assert_eq!(&ErrorCode::parse(text), code);
            assert_eq!(code.as_str(), *text);
            assert_eq!(code.metric_label(), *text);
        }
        let other = ErrorCode::parse("brand_new_code");
        assert_eq!(other, ErrorCode::Other("brand_new_code".into()));
        assert_eq!(other.as_str(), "brand_new_code");
        assert_eq!(other.metric_label(), "other_api_error");
    }

    #[test]
    fn only_the_not_found_code_means_gone() {
        assert!(api("not_found", 404).is_not_found());
        // The code without its status is not Hetzner's not_found (a proxy, a bug).
        assert!(!api("not_found", 500).is_not_found());
        assert!(!api("not_found", 200).is_not_found());
        // A 404 status with another code (e.g. a firewall apply naming a missing server) or any
        // unknown-state error is not "gone".
        assert!(!api("firewall_resource_not_found", 404).is_not_found());
        assert!(!api("rate_limit_exceeded", 429).is_not_found());
        assert!(!api("server_error", 500).is_not_found());
        assert!(
            !Error::InvalidResponse {
                status: 404,
                snippet: "<html>".into()
            }
            .is_not_found()
        );
        assert!(
            !Error::Transport {
                kind: TransportKind::Timeout,
                message: "t".into()
            }
            .is_not_found()
        );
    }

    #[test]
    fn retry_classes_follow_the_official_clients() {
        for code in ["conflict", "rate_limit_exceeded", "bad_gateway", "timeout"] {
            assert!(api(code, 500).is_retryable_now(), "{code}");
        }
        for code in [
            "locked",
            "unavailable",
            "server_error",
            "service_error",
            "invalid_input",
            "not_found",
            "uniqueness_error",
        ] {
            assert!(!api(code, 500).is_retryable_now(), "{code}");
        }
        let html = |status| Error::InvalidResponse {
            status,
            snippet: String::new(),
        };
        assert!(html(502).is_retryable_now());
        assert!(html(504).is_retryable_now());
        assert!(!html(503).is_retryable_now());
        assert!(!html(200).is_retryable_now());
        let transport = |kind| Error::Transport {
            kind,
            message: String::new(),
        };
        assert!(transport(TransportKind::Connect).is_retryable_now());
        assert!(transport(TransportKind::Timeout).is_retryable_now());
        assert!(!transport(TransportKind::Io).is_retryable_now());
    }

    #[test]
    fn terminal_errors_are_the_ones_a_retry_cannot_fix() {
        for code in [
            "invalid_input",
            "json_error",
            "unauthorized",
            "token_readonly",
            "forbidden",
            "resource_limit_exceeded",
            "protected",
        ] {
            assert!(api(code, 400).is_terminal(), "{code}");
        }
        for code in [
            "not_found",
            "uniqueness_error",
            "locked",
            "conflict",
            "server_error",
            "rate_limit_exceeded",
        ] {
            assert!(!api(code, 400).is_terminal(), "{code}");
        }
        assert!(Error::Config("x".into()).is_terminal());
        assert!(
            !Error::RateLimited {
                reset_in: Duration::from_secs(1)
            }
            .is_terminal()
        );
    }

    #[test]
    fn metric_labels_are_bounded() {
        assert_eq!(api("not_found", 404).metric_label(), "not_found");
        assert_eq!(
            api("rate_limit_exceeded", 429).metric_label(),
            "rate_limited"
        );
        assert_eq!(api("server_error", 500).metric_label(), "server_error");
        assert_eq!(api("whatever_new", 500).metric_label(), "other_api_error");
        let truncated = Error::PageLimit {
            path: "/servers",
            max_pages: 3,
        };
        assert_eq!(truncated.metric_label(), "page_limit");
        assert!(
            truncated.to_string().contains("GET /servers"),
            "{truncated}"
        );
        assert!(!truncated.is_terminal() && !truncated.is_retryable_now());
        assert_eq!(
            Error::RateLimited {
                reset_in: Duration::ZERO
            }
            .metric_label(),
            "rate_limited"
        );
    }

    #[test]
    fn field_names_come_from_details() {
        let err = Error::Api {
            status: 409,
            code: ErrorCode::UniquenessError,
            message: "SSH key with the same fingerprint already exists".into(),
            details: Some(serde_json::json!({"fields": [{"name": "public_key"}]})),
            correlation_id: Some("abc".into()),
        };
        assert_eq!(err.field_names(), vec!["public_key".to_string()]);
        assert!(err.to_string().contains("correlation id abc"));
        assert!(err.is_uniqueness_error());
    }
}
