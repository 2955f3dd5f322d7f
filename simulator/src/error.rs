//! The Hetzner error envelope (API-NOTES §7).

use axum::http::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};

/// One entry of `details.fields` for `invalid_input`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub name: String,
    pub messages: Vec<String>,
}

impl FieldError {
    pub(crate) fn new(name: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            name: name.into(),
            messages: vec![message.into()],
        }
    }
}

/// An error answer: HTTP status plus the JSON `{"error": {code, message, details}}`.
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }

    pub(crate) fn body(&self) -> Value {
        json!({"error": {"code": self.code, "message": self.message, "details": self.details}})
    }

    pub(crate) fn invalid_input(fields: Vec<FieldError>) -> Self {
        // Merge messages per field so each name appears once.
        let mut merged: Vec<FieldError> = Vec::new();
        for field in fields {
            match merged.iter_mut().find(|f| f.name == field.name) {
                Some(existing) => existing.messages.extend(field.messages),
                None => merged.push(field),
            }
        }
        let names: Vec<&str> = merged.iter().map(|f| f.name.as_str()).collect();
        let message = format!("invalid input in fields '{}'", names.join("', '"));
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid_input",
            message,
            details: Some(json!({ "fields": merged })),
        }
    }

    pub(crate) fn invalid_field(name: &str, message: impl Into<String>) -> Self {
        Self::invalid_input(vec![FieldError::new(name, message)])
    }

    pub(crate) fn uniqueness(field: &str) -> Self {
        ApiError {
            status: StatusCode::CONFLICT,
            code: "uniqueness_error",
            message: format!("{field} is already used"),
            details: Some(json!({"fields": [{"name": field}]})),
        }
    }

    pub(crate) fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub(crate) fn json_error(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "json_error", message)
    }

    pub(crate) fn locked() -> Self {
        Self::new(
            StatusCode::LOCKED,
            "locked",
            "server is locked: another action is running",
        )
    }

    /// 403 `resource_limit_exceeded` with `details.limits[{name}]` (spec overview, Errors).
    pub(crate) fn resource_limit(limit: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: "resource_limit_exceeded",
            message: message.into(),
            details: Some(json!({"limits": [{"name": limit}]})),
        }
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub(crate) fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
}
