//! Label validation and label selectors, following API-NOTES §3.

use std::collections::BTreeMap;

pub(crate) type Labels = BTreeMap<String, String>;

fn is_alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

fn is_inner(c: char) -> bool {
    is_alnum(c) || matches!(c, '-' | '_' | '.')
}

/// 1..=max chars, alphanumeric at both ends, `-_.` allowed inside.
fn is_label_token(s: &str, max: usize) -> bool {
    let len = s.chars().count();
    if len == 0 || len > max {
        return false;
    }
    let first = s.chars().next();
    let last = s.chars().last();
    first.is_some_and(is_alnum) && last.is_some_and(is_alnum) && s.chars().all(is_inner)
}

/// Why a label key cannot be set, or `None` when it is fine.
pub(crate) fn key_problem(key: &str) -> Option<String> {
    if let Some(problem) = key_syntax_problem(key) {
        return Some(problem);
    }
    let prefix = key.split_once('/').map(|(p, _)| p.to_ascii_lowercase());
    if let Some(prefix) = prefix
        && (prefix == "hetzner.cloud" || prefix.ends_with(".hetzner.cloud"))
    {
        return Some(format!(
            "label key '{key}': the prefix 'hetzner.cloud/' is reserved"
        ));
    }
    None
}

/// Syntax only; selectors may name reserved keys (they just match nothing we set).
fn key_syntax_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && !is_label_token(prefix, 253)
    {
        return Some(format!(
            "label key '{key}': prefix must be a DNS subdomain of at most 253 characters"
        ));
    }
    if !is_label_token(name, 63) {
        return Some(format!(
            "label key '{key}': name must be 1-63 characters, start and end with a letter or digit, \
             and contain only letters, digits, '-', '_' and '.'"
        ));
    }
    None
}

/// Why a label value is unacceptable, or `None` when it is fine.
pub(crate) fn value_problem(key: &str, value: &str) -> Option<String> {
    if value.is_empty() || is_label_token(value, 63) {
        None
    } else {
        Some(format!(
            "label value of '{key}': must be empty or 1-63 characters, start and end with a letter \
             or digit, and contain only letters, digits, '-', '_' and '.'"
        ))
    }
}

/// All problems of a label map (empty when valid).
pub(crate) fn label_problems(labels: &Labels) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, value) in labels {
        problems.extend(key_problem(key));
        problems.extend(value_problem(key, value));
    }
    problems
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector: every term must match (comma = AND).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Selector {
    terms: Vec<Term>,
}

impl Selector {
    pub(crate) fn parse(input: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for raw in split_terms(input)? {
            terms.push(parse_term(raw.trim())?);
        }
        Ok(Selector { terms })
    }

    pub(crate) fn matches(&self, labels: &Labels) -> bool {
        self.terms.iter().all(|term| match term {
            Term::Equals(k, v) => labels.get(k) == Some(v),
            // Kubernetes semantics: a missing key satisfies `!=` (API-NOTES §3, UNVERIFIED).
            Term::NotEquals(k, v) => labels.get(k) != Some(v),
            Term::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Term::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Term::Exists(k) => labels.contains_key(k),
            Term::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// Splits on commas that are not inside `( … )`.
fn split_terms(input: &str) -> Result<Vec<&str>, String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    for (i, c) in input.char_indices() {
        match c {
            '(' => {
                if depth > 0 {
                    return Err("nested '(' in label selector".to_string());
                }
                depth += 1;
            }
            ')' => {
                if depth == 0 {
                    return Err("unbalanced ')' in label selector".to_string());
                }
                depth -= 1;
            }
            ',' if depth == 0 => {
                terms.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '(' in label selector".to_string());
    }
    terms.push(&input[start..]);
    if terms.iter().any(|t| t.trim().is_empty()) {
        return Err("empty term in label selector".to_string());
    }
    Ok(terms)
}

fn checked_key(key: &str) -> Result<String, String> {
    let key = key.trim();
    match key_syntax_problem(key) {
        None => Ok(key.to_string()),
        Some(problem) => Err(format!("invalid label selector: {problem}")),
    }
}

fn checked_value(key: &str, value: &str) -> Result<String, String> {
    let value = value.trim();
    match value_problem(key, value) {
        None => Ok(value.to_string()),
        Some(problem) => Err(format!("invalid label selector: {problem}")),
    }
}

fn parse_set(key: &str, rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("invalid label selector: expected '(v1,v2)' after '{key} in'"))?;
    let values = inner
        .split(',')
        .map(|v| checked_value(key, v))
        .collect::<Result<Vec<_>, _>>()?;
    if values.iter().any(String::is_empty) {
        return Err("invalid label selector: empty value in set".to_string());
    }
    Ok(values)
}

fn parse_term(term: &str) -> Result<Term, String> {
    if let Some(key) = term.strip_prefix('!') {
        if key.contains(['=', '!', '(', ')', ' ']) {
            return Err(format!("invalid label selector term '{term}'"));
        }
        return Ok(Term::NotExists(checked_key(key)?));
    }
    if let Some((key, value)) = term.split_once("!=") {
        let key = checked_key(key)?;
        let value = checked_value(&key, value)?;
        return Ok(Term::NotEquals(key, value));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        let key = checked_key(key)?;
        if value.starts_with('=') {
            return Err(format!("invalid label selector term '{term}'"));
        }
        let value = checked_value(&key, value)?;
        return Ok(Term::Equals(key, value));
    }
    let mut words = term.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default();
    match words.next().map(str::trim_start) {
        None => Ok(Term::Exists(checked_key(key)?)),
        Some(rest) => {
            let key = checked_key(key)?;
            if let Some(set) = rest.strip_prefix("notin") {
                Ok(Term::NotIn(key.clone(), parse_set(&key, set)?))
            } else if let Some(set) = rest.strip_prefix("in") {
                Ok(Term::In(key.clone(), parse_set(&key, set)?))
            } else {
                Err(format!("invalid label selector term '{term}'"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_and_values() {
        assert!(key_problem("env").is_none());
        assert!(key_problem("vps-controller/instance").is_none());
        assert!(key_problem("example.com/my").is_none());
        assert!(key_problem("").is_some());
        assert!(key_problem("-env").is_some());
        assert!(key_problem("env-").is_some());
        assert!(key_problem("hetzner.cloud/x").is_some());
        assert!(key_problem("lb.hetzner.cloud/x").is_some());
        assert!(Selector::parse("hetzner.cloud/x=1").is_ok());
        assert!(key_problem(&"a".repeat(64)).is_some());
        assert!(key_problem(&"a".repeat(63)).is_none());
        assert!(value_problem("k", "").is_none());
        assert!(value_problem("k", "prod").is_none());
        assert!(value_problem("k", "a b").is_some());
        assert!(value_problem("k", "x/y").is_some());
    }

    #[test]
    fn selector_table() {
        let prod_web = labels(&[("env", "prod"), ("type", "web")]);
        let test_db = labels(&[("env", "test"), ("type", "database")]);
        let bare = labels(&[]);
        let cases: &[(&str, [bool; 3])] = &[
            ("env=prod", [true, false, false]),
            ("env==prod", [true, false, false]),
            ("env!=prod", [false, true, true]),
            ("env", [true, true, false]),
            ("!env", [false, false, true]),
            ("env in (prod,staging)", [true, false, false]),
            ("env in (test, staging)", [false, true, false]),
            ("env notin (prod)", [false, true, true]),
            ("env=prod,type!=database", [true, false, false]),
            ("env,type=database", [false, true, false]),
        ];
        for (selector, expected) in cases {
            let parsed = Selector::parse(selector).unwrap();
            let got = [
                parsed.matches(&prod_web),
                parsed.matches(&test_db),
                parsed.matches(&bare),
            ];
            assert_eq!(&got, expected, "selector {selector}");
        }
    }

    #[test]
    fn malformed_selectors() {
        for bad in [
            "",
            "env=",
            "=prod",
            "env=prod,",
            "env in prod",
            "env in (a",
            "env===x",
            "a b c",
            "env in ()",
            "!",
            "env=a b",
        ] {
            // `env=` is legal (empty value) — handled below.
            if bad == "env=" {
                assert!(Selector::parse(bad).is_ok());
                continue;
            }
            assert!(Selector::parse(bad).is_err(), "should reject {bad:?}");
        }
    }
}
