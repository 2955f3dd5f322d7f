//! Reading request bodies and query strings field by field, so that every problem names its field
//! (`details.fields[].name`) the way the API does.

use serde_json::{Map, Value};

use crate::error::{ApiError, FieldError};
use crate::labels::{Labels, label_problems};

/// A JSON object body being taken apart; problems accumulate until [`Body::finish`].
pub(crate) struct Body {
    map: Map<String, Value>,
    pub errors: Vec<FieldError>,
}

/// An ID (JSON integer or decimal string) or a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum IdOrName {
    Id(i64),
    Name(String),
}

impl IdOrName {
    fn from_value(value: &Value) -> Option<IdOrName> {
        match value {
            Value::Number(n) => n.as_i64().map(IdOrName::Id),
            Value::String(s) => Some(IdOrName::Name(s.clone())),
            _ => None,
        }
    }

    /// True when this refers to the object with `id` and `name`. A string of digits may be an ID
    /// (hcloud-go sends a location ID as a decimal string).
    pub(crate) fn refers_to(&self, id: i64, name: &str) -> bool {
        match self {
            IdOrName::Id(want) => *want == id,
            IdOrName::Name(want) => want == name || want.parse::<i64>().ok() == Some(id),
        }
    }
}

impl std::fmt::Display for IdOrName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdOrName::Id(id) => write!(f, "{id}"),
            IdOrName::Name(name) => write!(f, "'{name}'"),
        }
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl Body {
    /// Parses raw bytes: syntax errors are 400 `json_error`; an empty body counts as `{}`.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Body, ApiError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body::from_map(Map::new()));
        }
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::json_error(format!("request body is not valid JSON: {e}")))?;
        match value {
            Value::Object(map) => Ok(Body::from_map(map)),
            other => Err(ApiError::json_error(format!(
                "request body must be a JSON object, got {}",
                type_name(&other)
            ))),
        }
    }

    pub(crate) fn from_map(map: Map<String, Value>) -> Body {
        Body {
            map,
            errors: Vec::new(),
        }
    }

    pub(crate) fn error(&mut self, name: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(name, message));
    }

    /// Removes a field; JSON `null` counts as absent.
    pub(crate) fn take(&mut self, name: &str) -> Option<Value> {
        match self.map.remove(name) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn wrong_type(&mut self, name: &str, expected: &str, got: &Value) {
        let got = type_name(got);
        self.error(name, format!("must be {expected}, got {got}"));
    }

    pub(crate) fn string(&mut self, name: &str) -> Option<String> {
        match self.take(name)? {
            Value::String(s) => Some(s),
            other => {
                self.wrong_type(name, "a string", &other);
                None
            }
        }
    }

    pub(crate) fn required_string(&mut self, name: &str) -> Option<String> {
        if self.take_peek_missing(name) {
            self.error(name, "is required");
            return None;
        }
        self.string(name)
    }

    fn take_peek_missing(&self, name: &str) -> bool {
        matches!(self.map.get(name), None | Some(Value::Null))
    }

    pub(crate) fn bool(&mut self, name: &str) -> Option<bool> {
        match self.take(name)? {
            Value::Bool(b) => Some(b),
            other => {
                self.wrong_type(name, "a boolean", &other);
                None
            }
        }
    }

    pub(crate) fn id_or_name(&mut self, name: &str, required: bool) -> Option<IdOrName> {
        let Some(value) = self.take(name) else {
            if required {
                self.error(name, "is required");
            }
            return None;
        };
        let parsed = IdOrName::from_value(&value);
        if parsed.is_none() {
            self.wrong_type(name, "an ID (integer) or a name (string)", &value);
        }
        parsed
    }

    pub(crate) fn array(&mut self, name: &str) -> Option<Vec<Value>> {
        match self.take(name)? {
            Value::Array(items) => Some(items),
            other => {
                self.wrong_type(name, "an array", &other);
                None
            }
        }
    }

    pub(crate) fn object(&mut self, name: &str) -> Option<Map<String, Value>> {
        match self.take(name)? {
            Value::Object(map) => Some(map),
            other => {
                self.wrong_type(name, "an object", &other);
                None
            }
        }
    }

    /// A `labels` map: string values, valid keys and values.
    pub(crate) fn labels(&mut self, name: &str) -> Option<Labels> {
        let map = self.object(name)?;
        let mut labels = Labels::new();
        let mut ok = true;
        for (key, value) in map {
            match value {
                Value::String(v) => {
                    labels.insert(key, v);
                }
                other => {
                    ok = false;
                    let got = type_name(&other);
                    self.error(name, format!("label '{key}' must be a string, got {got}"));
                }
            }
        }
        for problem in label_problems(&labels) {
            ok = false;
            self.error(name, problem);
        }
        ok.then_some(labels)
    }

    /// Fields left over after taking the known ones are rejected (for schemas with
    /// `additionalProperties: false`).
    pub(crate) fn reject_unknown(&mut self) {
        let unknown: Vec<String> = self.map.keys().cloned().collect();
        for key in unknown {
            self.error(key, "unknown field");
        }
        self.map.clear();
    }

    pub(crate) fn finish(self) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid_input(self.errors))
        }
    }
}

/// Query parameters in order; keys may repeat (`?status=a&status=b`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    pub(crate) fn parse(raw: Option<&str>) -> Query {
        let pairs = raw
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Query { pairs }
    }

    pub(crate) fn first(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn all(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The query string without `page`/`per_page`, for building `Link` URLs.
    pub(crate) fn without_paging(&self) -> String {
        let mut ser = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.pairs {
            if k != "page" && k != "per_page" {
                ser.append_pair(k, v);
            }
        }
        ser.finish()
    }
}
