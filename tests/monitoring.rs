//! The monitoring manifests (`manifests/monitoring`, a kustomize component, and the overlay
//! `manifests/overlays/monitoring` that turns it on) against the tools that consume them:
//! - `kubectl kustomize` renders the base (without monitoring) and every overlay;
//! - `kubernetes-validate --strict` accepts every built-in object; the ServiceMonitor and the
//!   PrometheusRule, whose CRDs it does not know, are checked against a strict subset of their
//!   CRD schemas and against the Service and Deployment they point at;
//! - `promtool check rules` accepts the alert group and `promtool test rules` passes the unit
//!   tests in `tests/monitoring/*.yaml`, which fire and silence every alert;
//! - every dashboard query parses as PromQL (`promtool check rules` on them as recording rules);
//! - every `vps_controller_*` metric (and label) that the alerts and the dashboard use is in
//!   the metric contract (`tests/monitoring/contract.prom`), and is exported by the real binary
//!   (`run` against the simulator: one subscription provisioned, one reconcile failed).
//!
//! Tools: `kubectl` (or `KUBECTL`), `promtool` (Debian's `prometheus` package, or `PROMTOOL`),
//! `kubernetes-validate` (PyPI, or `KUBERNETES_VALIDATE`; `python3 -m kubernetes_validate`
//! also works). A missing tool skips its test with a loud warning, unless `CI` is set (and not
//! `false`/`0`), where the test fails.
//!
//! To run the promtool unit tests by hand: write the PrometheusRule's `spec` (the `groups:`
//! document) to `rules.yaml` beside copies of `tests/monitoring/*.yaml`, then
//! `promtool test rules` on the copies.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::{Instant, sleep};

use common::process::{
    ChildGuard, DEADLINE, POLL, SECRET_TOKEN, command, encryption_key, http_client,
    insert_subscription, metrics, run_cli, spawn_listening, spawn_simulator, sqlite_url,
    status_row,
};

const BASE: &str = "manifests";
const COMPONENT: &str = "manifests/monitoring";
const MONITORING_OVERLAY: &str = "manifests/overlays/monitoring";
const NAMESPACE: &str = "vps-controller";
const RUNBOOK_PREFIX: &str = "https://github.com/OWNER/vps-controller/blob/main/README.md#runbook-";
const SEVERITIES: &[&str] = &["critical", "warning", "info"];
/// Labels that Prometheus (and the operator's ServiceMonitor) put on every scraped series:
/// not the controller's to export.
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "endpoint",
    "container",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    let path = repo().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {path:?}: {err}"))
}

// ---------------------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------------------

/// An external program, possibly with leading arguments (`python3 -m kubernetes_validate`).
struct Tool {
    argv: Vec<String>,
}

impl Tool {
    fn output(&self, args: &[&str], cwd: &Path) -> Output {
        Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", self.argv.join(" ")))
    }

    fn describe(&self, args: &[&str], output: &Output) -> String {
        format!(
            "`{} {}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.argv.join(" "),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// Runs the tool; fails the test with everything it printed unless it exits 0. Returns
    /// what it printed.
    fn run_ok(&self, args: &[&str], cwd: &Path, why: &str) -> String {
        let output = self.output(args, cwd);
        let printed = self.describe(args, &output);
        assert!(output.status.success(), "{why}\n{printed}");
        printed
    }

    /// Like [`Tool::run_ok`], returning only its stdout.
    fn stdout_ok(&self, args: &[&str], cwd: &Path, why: &str) -> String {
        let output = self.output(args, cwd);
        assert!(
            output.status.success(),
            "{why}\n{}",
            self.describe(args, &output)
        );
        String::from_utf8(output.stdout).unwrap()
    }
}

/// The first of `candidates` (after the `env` override) that answers `probe` with exit 0.
fn find_tool(
    test: &str,
    env: &str,
    candidates: &[&str],
    probe: &[&str],
    hint: &str,
) -> Option<Tool> {
    let overridden = std::env::var(env).ok().filter(|v| !v.trim().is_empty());
    let candidates: Vec<String> = match &overridden {
        Some(value) => vec![value.clone()],
        None => candidates.iter().map(|c| c.to_string()).collect(),
    };
    let mut reasons = Vec::new();
    for candidate in &candidates {
        let argv: Vec<String> = candidate.split_whitespace().map(str::to_string).collect();
        match Command::new(&argv[0])
            .args(&argv[1..])
            .args(probe)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => return Some(Tool { argv }),
            Ok(out) => reasons.push(format!(
                "`{candidate} {}` failed ({}): {}",
                probe.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(err) => reasons.push(format!("`{candidate}` cannot be started: {err}")),
        }
    }
    common::skip_or_fail(test, &reasons.join("; "), hint);
    None
}

fn kubectl(test: &str) -> Option<Tool> {
    find_tool(
        test,
        "KUBECTL",
        &["kubectl"],
        &["version", "--client"],
        "install kubectl (it comes with the machine image), or point KUBECTL at one",
    )
}

fn promtool(test: &str) -> Option<Tool> {
    find_tool(
        test,
        "PROMTOOL",
        &["promtool"],
        &["--version"],
        "install it with: apt-get install --no-install-recommends prometheus \
         (or point PROMTOOL at a promtool binary)",
    )
}

fn kubernetes_validate(test: &str) -> Option<Tool> {
    find_tool(
        test,
        "KUBERNETES_VALIDATE",
        &["kubernetes-validate", "python3 -m kubernetes_validate"],
        &["--version"],
        "install it with: python3 -m pip install kubernetes-validate \
         (or point KUBERNETES_VALIDATE at it)",
    )
}

// ---------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------

/// The base and every overlay under manifests/overlays/ (each directory with a kustomization.yaml).
fn kustomize_targets() -> Vec<String> {
    let mut targets = vec![BASE.to_string()];
    let mut overlays: Vec<String> = std::fs::read_dir(repo().join("manifests/overlays"))
        .expect("manifests/overlays/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|dir| dir.join("kustomization.yaml").is_file())
        .map(|dir| {
            format!(
                "manifests/overlays/{}",
                dir.file_name().unwrap().to_string_lossy().into_owned()
            )
        })
        .collect();
    overlays.sort();
    targets.extend(overlays);
    assert!(
        targets.iter().any(|t| t == MONITORING_OVERLAY),
        "no {MONITORING_OVERLAY}/kustomization.yaml; targets: {targets:?}"
    );
    targets
}

/// `kubectl kustomize TARGET`: its YAML and the objects in it.
fn render(kubectl: &Tool, target: &str) -> (String, Vec<Value>) {
    let yaml = kubectl.stdout_ok(
        &["kustomize", target],
        &repo(),
        &format!("kubectl kustomize {target} failed"),
    );
    (yaml.clone(), yaml_documents(&yaml, target))
}

fn yaml_documents(yaml: &str, what: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|err| panic!("{what}: not YAML: {err}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn kind(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn id(object: &Value) -> String {
    format!("{}/{}", kind(object), name(object))
}

fn is_prometheus_operator_kind(object: &Value) -> bool {
    object["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
}

fn is_dashboard(object: &Value) -> bool {
    kind(object) == "ConfigMap" && object["metadata"]["labels"]["grafana_dashboard"] == "1"
}

fn the_one<'a>(objects: &'a [Value], kind_name: &str, target: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| kind(o) == kind_name).collect();
    assert_eq!(
        found.len(),
        1,
        "{target}: expected exactly one {kind_name}, found {:?}",
        found.iter().map(|o| id(o)).collect::<Vec<_>>()
    );
    found[0]
}

#[test]
fn kustomize_renders_the_base_without_monitoring_and_the_overlay_with_it() {
    let test = "kustomize_renders_the_base_without_monitoring_and_the_overlay_with_it";
    let Some(kubectl) = kubectl(test) else {
        return;
    };
    let mut rendered = BTreeMap::new();
    for target in kustomize_targets() {
        let (_, objects) = render(&kubectl, &target);
        assert!(!objects.is_empty(), "{target} rendered nothing");
        for object in &objects {
            assert!(
                object["apiVersion"].is_string()
                    && !kind(object).is_empty()
                    && !name(object).is_empty(),
                "{target}: an object without apiVersion, kind or name: {object:#}"
            );
        }
        if target == BASE {
            // The base must deploy on a cluster without the Prometheus Operator CRDs.
            let monitoring_in_base: Vec<String> = objects
                .iter()
                .filter(|o| is_prometheus_operator_kind(o) || is_dashboard(o))
                .map(id)
                .collect();
            assert!(
                monitoring_in_base.is_empty(),
                "the base renders monitoring objects, so `kubectl apply -k {BASE}` fails on a \
                 cluster without the Prometheus Operator: {monitoring_in_base:?}"
            );
        }
        rendered.insert(target, objects);
    }

    let base = &rendered[BASE];
    let overlay = &rendered[MONITORING_OVERLAY];
    let overlay_ids: BTreeSet<String> = overlay.iter().map(id).collect();
    let lost: Vec<String> = base
        .iter()
        .map(id)
        .filter(|id| !overlay_ids.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{MONITORING_OVERLAY} lost base objects: {lost:?}"
    );
    the_one(overlay, "ServiceMonitor", MONITORING_OVERLAY);
    the_one(overlay, "PrometheusRule", MONITORING_OVERLAY);
    for object in overlay.iter().filter(|o| kind(o) != "Namespace") {
        assert_eq!(
            object["metadata"]["namespace"],
            NAMESPACE,
            "{MONITORING_OVERLAY}: {} is not in namespace {NAMESPACE}",
            id(object)
        );
    }

    // The Grafana sidecar loads the ConfigMap labelled grafana_dashboard: "1"; it must carry
    // dashboard.json as it is in the repository.
    let dashboards: Vec<&Value> = overlay.iter().filter(|o| is_dashboard(o)).collect();
    assert_eq!(
        dashboards.len(),
        1,
        "{MONITORING_OVERLAY}: expected one ConfigMap labelled grafana_dashboard: \"1\", found {:?}",
        dashboards.iter().map(|o| id(o)).collect::<Vec<_>>()
    );
    let data = dashboards[0]["data"]
        .as_object()
        .expect("dashboard ConfigMap has data");
    assert_eq!(
        data.len(),
        1,
        "one dashboard file in the ConfigMap: {:?}",
        data.keys()
    );
    let (file, content) = data.iter().next().unwrap();
    assert!(
        file.ends_with(".json"),
        "the sidecar loads *.json keys only, not {file:?}"
    );
    let shipped: Value = serde_json::from_str(content.as_str().unwrap())
        .unwrap_or_else(|err| panic!("the dashboard ConfigMap's {file} is not JSON: {err}"));
    let source: Value =
        serde_json::from_str(&read(&format!("{COMPONENT}/dashboard.json"))).unwrap();
    assert_eq!(
        shipped, source,
        "the ConfigMap does not carry dashboard.json"
    );
}

// ---------------------------------------------------------------------------------------
// Schemas
// ---------------------------------------------------------------------------------------

/// The CRDs' duration pattern (monitoring.coreos.com `Duration`).
const DURATION: &str =
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$";

fn string_map() -> Value {
    json!({"type": "object", "additionalProperties": {"type": "string"}})
}

fn object_meta() -> Value {
    json!({
        "type": "object",
        "required": ["name", "namespace"],
        "additionalProperties": false,
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "namespace": {"type": "string", "minLength": 1},
            "labels": string_map(),
            "annotations": string_map(),
        }
    })
}

/// A strict subset of the ServiceMonitor CRD (monitoring.coreos.com/v1): the fields this
/// project may use, with the CRD's types; anything else (a typo) is rejected. Extend it from
/// the CRD when a new field is needed.
fn service_monitor_schema() -> Value {
    let duration = json!({"type": "string", "pattern": DURATION});
    json!({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": false,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": object_meta(),
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": false,
                "properties": {
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "additionalProperties": false,
                        "properties": {"matchLabels": string_map()}
                    },
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": false,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}}
                        }
                    },
                    "jobLabel": {"type": "string"},
                    "targetLabels": {"type": "array", "items": {"type": "string"}},
                    "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                    "sampleLimit": {"type": "integer", "minimum": 0},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": false,
                            "properties": {
                                "port": {"type": "string", "minLength": 1},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": duration,
                                "scrapeTimeout": duration,
                                "honorLabels": {"type": "boolean"},
                                "honorTimestamps": {"type": "boolean"},
                                "relabelings": {"type": "array", "items": {"type": "object"}},
                                "metricRelabelings": {"type": "array", "items": {"type": "object"}}
                            }
                        }
                    }
                }
            }
        }
    })
}

/// The PrometheusRule CRD (monitoring.coreos.com/v1), strict, alerting and recording rules.
fn prometheus_rule_schema() -> Value {
    let duration = json!({"type": "string", "pattern": DURATION});
    let rule = json!({
        "type": "object",
        "required": ["expr"],
        "additionalProperties": false,
        "oneOf": [
            {"required": ["alert"], "not": {"required": ["record"]}},
            {"required": ["record"], "not": {"required": ["alert"]}}
        ],
        "properties": {
            "alert": {"type": "string", "minLength": 1},
            "record": {"type": "string", "minLength": 1},
            "expr": {"type": "string", "minLength": 1},
            "for": duration,
            "keep_firing_for": duration,
            "labels": string_map(),
            "annotations": string_map()
        }
    });
    let group = json!({
        "type": "object",
        "required": ["name", "rules"],
        "additionalProperties": false,
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "interval": duration,
            "limit": {"type": "integer"},
            "rules": {"type": "array", "minItems": 1, "items": rule}
        }
    });
    json!({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": false,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": object_meta(),
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": false,
                "properties": {
                    "groups": {"type": "array", "minItems": 1, "items": group}
                }
            }
        }
    })
}

fn schema_errors(schema: &Value, instance: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(schema).unwrap();
    validator
        .iter_errors(instance)
        .map(|err| format!("{err} at {}", err.instance_path()))
        .collect()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector.as_object().is_some_and(|wanted| {
        wanted
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    })
}

/// What the ServiceMonitor scrapes: a Service in its namespace whose labels match its
/// selector, a port of that Service by name, and behind it a container port of the Deployment.
fn service_monitor_problems(monitor: &Value, objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let namespace = &monitor["metadata"]["namespace"];
    let selector = &monitor["spec"]["selector"]["matchLabels"];
    let services: Vec<&Value> = objects
        .iter()
        .filter(|o| kind(o) == "Service" && o["metadata"]["namespace"] == *namespace)
        .filter(|o| labels_match(selector, &o["metadata"]["labels"]))
        .collect();
    let [service] = services.as_slice() else {
        problems.push(format!(
            "its selector {selector} matches {} Services in namespace {namespace}, not 1: {:?}",
            services.len(),
            services.iter().map(|s| name(s)).collect::<Vec<_>>()
        ));
        return problems;
    };
    let deployment = objects.iter().find(|o| {
        kind(o) == "Deployment"
            && o["metadata"]["namespace"] == *namespace
            && labels_match(
                &service["spec"]["selector"],
                &o["spec"]["template"]["metadata"]["labels"],
            )
    });
    for endpoint in monitor["spec"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let port_name = &endpoint["port"];
        let Some(port) = service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == *port_name)
        else {
            problems.push(format!(
                "endpoint port {port_name} is not a port name of Service {}: {}",
                name(service),
                service["spec"]["ports"]
            ));
            continue;
        };
        if endpoint["path"] != "/metrics" {
            problems.push(format!(
                "endpoint path {} is not /metrics, where the controller serves its metrics",
                endpoint["path"]
            ));
        }
        let Some(deployment) = deployment else {
            problems.push(format!("no Deployment behind Service {}", name(service)));
            continue;
        };
        let target = &port["targetPort"];
        let container_port = deployment["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .any(|p| p["name"] == *target || p["containerPort"] == *target);
        if !container_port {
            problems.push(format!(
                "Service port {port_name} targets {target}, which no container of Deployment {} exposes",
                name(deployment)
            ));
        }
    }
    problems
}

#[test]
fn rendered_objects_validate_against_kubernetes_and_crd_schemas() {
    let test = "rendered_objects_validate_against_kubernetes_and_crd_schemas";
    let Some(kubectl) = kubectl(test) else {
        return;
    };
    let Some(validate) = kubernetes_validate(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut rendered = Vec::new();
    for target in kustomize_targets() {
        let (yaml, objects) = render(&kubectl, &target);
        let file = format!("{}.yaml", target.replace('/', "_"));
        std::fs::write(dir.path().join(&file), yaml).unwrap();
        files.push(file.clone());
        rendered.push((target, file, objects));
    }

    // Built-in kinds: strictly (unknown fields are errors). kubernetes-validate only warns
    // about kinds it has no schema for, so each object must be named in a "passed" line.
    let mut args = vec!["--strict"];
    args.extend(files.iter().map(String::as_str));
    let output = validate.run_ok(
        &args,
        dir.path(),
        "kubernetes-validate rejected a rendered object",
    );
    let mut problems = Vec::new();
    for (target, file, objects) in &rendered {
        for object in objects.iter().filter(|o| !is_prometheus_operator_kind(o)) {
            let passed = format!(
                "{file} passed for resource {}/{}",
                kind(object).to_lowercase(),
                name(object)
            );
            if !output.contains(&passed) {
                problems.push(format!(
                    "{target}: {} was not validated (no schema for its apiVersion {}?)",
                    id(object),
                    object["apiVersion"]
                ));
            }
        }
        for object in objects.iter().filter(|o| is_prometheus_operator_kind(o)) {
            let schema = match kind(object) {
                "ServiceMonitor" => service_monitor_schema(),
                "PrometheusRule" => prometheus_rule_schema(),
                other => {
                    problems.push(format!(
                        "{target}: no schema for monitoring.coreos.com kind {other}"
                    ));
                    continue;
                }
            };
            for error in schema_errors(&schema, object) {
                problems.push(format!("{target}: {}: {error}", id(object)));
            }
            if kind(object) == "ServiceMonitor" {
                for problem in service_monitor_problems(object, objects) {
                    problems.push(format!("{target}: {}: {problem}", id(object)));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "rendered objects do not validate:\n  {}\n\nkubernetes-validate said:\n{output}",
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------------------

fn prometheus_rule() -> Value {
    let path = format!("{COMPONENT}/prometheusrule.yaml");
    let mut documents = yaml_documents(&read(&path), &path);
    assert_eq!(documents.len(), 1, "{path}: one document");
    documents.remove(0)
}

/// Every alerting rule of the PrometheusRule.
fn alerts(rule: &Value) -> Vec<&Value> {
    rule["spec"]["groups"]
        .as_array()
        .expect("spec.groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().expect("groups[].rules"))
        .filter(|rule| rule["alert"].is_string())
        .collect()
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_and_its_runbook() {
    let readme = read("README.md");
    let rule = prometheus_rule();
    let alerts = alerts(&rule);
    assert!(!alerts.is_empty(), "the PrometheusRule has no alerts");
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    for alert in &alerts {
        let name = alert["alert"].as_str().unwrap();
        if !names.insert(name) {
            problems.push(format!("{name}: defined twice"));
        }
        let severity = alert["labels"]["severity"].as_str().unwrap_or_default();
        if !SEVERITIES.contains(&severity) {
            problems.push(format!(
                "{name}: severity {severity:?} is not one of {SEVERITIES:?}"
            ));
        }
        for key in ["summary", "description"] {
            if alert["annotations"][key]
                .as_str()
                .is_none_or(|t| t.trim().is_empty())
            {
                problems.push(format!("{name}: no {key} annotation"));
            }
        }
        // The link lands on a heading: GitHub's anchor of `#### Runbook: NAME`.
        if !readme.contains(&format!("\n#### Runbook: {name}\n")) {
            problems.push(format!(
                "{name}: README.md has no `#### Runbook: {name}` section for its runbook_url"
            ));
        }
        let runbook = format!("{RUNBOOK_PREFIX}{}", name.to_lowercase());
        if alert["annotations"]["runbook_url"] != runbook.as_str() {
            problems.push(format!(
                "{name}: runbook_url is {}, expected {runbook}",
                alert["annotations"]["runbook_url"]
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "alert metadata:\n  {}",
        problems.join("\n  ")
    );
}

/// Alert name -> (has a case where it fires, has a case where it stays silent), over every
/// `alert_rule_test` in tests/monitoring/*.yaml.
fn unit_test_coverage(files: &[PathBuf]) -> BTreeMap<String, (bool, bool)> {
    let mut coverage: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        let doc: Value = serde_norway::from_str(&text)
            .unwrap_or_else(|err| panic!("{file:?} is not YAML: {err}"));
        for test in doc["tests"].as_array().into_iter().flatten() {
            for case in test["alert_rule_test"].as_array().into_iter().flatten() {
                let name = case["alertname"].as_str().unwrap_or_default().to_string();
                let fires = case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
                let entry = coverage.entry(name).or_default();
                if fires {
                    entry.0 = true;
                } else {
                    entry.1 = true;
                }
            }
        }
    }
    coverage
}

#[test]
fn alert_rules_pass_promtool_check_and_the_unit_tests() {
    let test = "alert_rules_pass_promtool_check_and_the_unit_tests";
    let rule = prometheus_rule();
    let mut unit_tests: Vec<PathBuf> = std::fs::read_dir(repo().join("tests/monitoring"))
        .expect("tests/monitoring/")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    unit_tests.sort();
    assert!(
        !unit_tests.is_empty(),
        "no promtool unit tests in tests/monitoring/"
    );

    // Each alert fires on a bad series and stays silent on a healthy one somewhere.
    let coverage = unit_test_coverage(&unit_tests);
    let mut uncovered = Vec::new();
    for alert in alerts(&rule) {
        let name = alert["alert"].as_str().unwrap();
        let (fires, silent) = coverage.get(name).copied().unwrap_or_default();
        if !fires {
            uncovered.push(format!("{name}: no unit test where it fires"));
        }
        if !silent {
            uncovered.push(format!("{name}: no unit test where it stays silent"));
        }
    }
    assert!(
        uncovered.is_empty(),
        "tests/monitoring/*.yaml must fire and silence every alert:\n  {}",
        uncovered.join("\n  ")
    );

    let Some(promtool) = promtool(test) else {
        return;
    };
    // promtool wants the rule file itself: the `groups:` document that is the CRD's spec.
    let dir = tempfile::tempdir().unwrap();
    let groups = json!({"groups": rule["spec"]["groups"]});
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_norway::to_string(&groups).unwrap(),
    )
    .unwrap();
    promtool.run_ok(
        &["check", "rules", "rules.yaml"],
        dir.path(),
        "promtool rejects the rule group of the PrometheusRule",
    );
    let mut args = vec!["test".to_string(), "rules".to_string()];
    for file in &unit_tests {
        let copy = file.file_name().unwrap().to_string_lossy().into_owned();
        assert_ne!(
            copy, "rules.yaml",
            "tests/monitoring/rules.yaml would be overwritten"
        );
        std::fs::copy(file, dir.path().join(&copy)).unwrap();
        args.push(copy);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    promtool.run_ok(
        &args,
        dir.path(),
        "the alert unit tests in tests/monitoring/ fail",
    );
}

// ---------------------------------------------------------------------------------------
// Dashboard
// ---------------------------------------------------------------------------------------

fn dashboard() -> Value {
    serde_json::from_str(&read(&format!("{COMPONENT}/dashboard.json")))
        .expect("dashboard.json is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().expect("dashboard panels") {
        all.push(panel);
        all.extend(panel["panels"].as_array().into_iter().flatten());
    }
    all
}

/// (panel title, expr, legend) of every query.
fn queries(dashboard: &Value) -> Vec<(String, String, String)> {
    panels(dashboard)
        .into_iter()
        .flat_map(|panel| {
            panel["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |target| {
                    (
                        panel["title"].as_str().unwrap_or_default().to_string(),
                        target["expr"].as_str().unwrap_or_default().to_string(),
                        target["legendFormat"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    )
                })
        })
        .collect()
}

/// The query with Grafana's variables replaced by what they stand for at run time.
fn as_promql(expr: &str, variables: &BTreeMap<String, String>) -> String {
    let mut promql = expr.to_string();
    for (variable, value) in variables {
        promql = promql
            .replace(&format!("${{{variable}}}"), value)
            .replace(&format!("${variable}"), value);
    }
    promql
}

#[test]
fn dashboard_queries_parse_and_every_panel_uses_the_datasource_variable() {
    let test = "dashboard_queries_parse_and_every_panel_uses_the_datasource_variable";
    let dashboard = dashboard();
    let mut problems = Vec::new();
    if dashboard["uid"].as_str().is_none_or(str::is_empty) {
        problems.push("no uid: the sidecar needs one to update the dashboard in place".to_string());
    }

    let templating = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let datasource = templating.iter().find(|v| v["name"] == "datasource");
    if !datasource.is_some_and(|v| v["type"] == "datasource" && v["query"] == "prometheus") {
        problems.push(format!(
            "no `datasource` variable of type datasource over prometheus: {datasource:?}"
        ));
    }
    // What each variable stands for in a query: every value (`.*`) for query variables.
    let mut variables: BTreeMap<String, String> = [
        ("__rate_interval", "5m"),
        ("__interval", "1m"),
        ("__range", "1h"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for variable in templating.iter().filter(|v| v["type"] == "query") {
        let name = variable["name"].as_str().unwrap_or_default().to_string();
        if variable["datasource"]["uid"] != "${datasource}" {
            problems.push(format!(
                "variable {name}: datasource is not ${{datasource}}"
            ));
        }
        variables.insert(name, ".*".to_string());
    }

    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        let Some(targets) = panel["targets"].as_array() else {
            continue;
        };
        if panel["datasource"]["uid"] != "${datasource}" {
            problems.push(format!(
                "panel {title:?}: datasource is {}",
                panel["datasource"]
            ));
        }
        for target in targets {
            if target["datasource"]["uid"] != "${datasource}" {
                problems.push(format!(
                    "panel {title:?} query {}: datasource is {}",
                    target["refId"], target["datasource"]
                ));
            }
        }
    }

    // What the dashboard must show (issue #10): a query that contains these.
    let queries = queries(&dashboard);
    for (what, needles) in [
        (
            "fleet by provisioning status",
            &["vps_controller_subscriptions{", "by (provisioning_status)"][..],
        ),
        (
            "reconciles by result",
            &["vps_controller_reconciles_total", "by (result)"],
        ),
        (
            "reconcile errors by reason",
            &["vps_controller_reconcile_errors_total", "by (reason)"],
        ),
        ("work queue depth", &["vps_controller_workqueue_depth"]),
        (
            "queue latency",
            &[
                "histogram_quantile",
                "vps_controller_workqueue_queue_duration_seconds_bucket",
            ],
        ),
        (
            "work latency",
            &[
                "histogram_quantile",
                "vps_controller_workqueue_work_duration_seconds_bucket",
            ],
        ),
        (
            "API budget remaining",
            &["vps_controller_hcloud_budget_remaining"],
        ),
        ("API budget limit", &["vps_controller_hcloud_budget_limit"]),
        (
            "API requests by code",
            &["vps_controller_hcloud_requests_total", "by (code)"],
        ),
        (
            "resync duration",
            &["vps_controller_pass_duration_seconds_bucket{pass=\"resync\""],
        ),
        ("leader per pod", &["vps_controller_leader", "pod"]),
    ] {
        if !queries.iter().any(|(_, expr, legend)| {
            needles
                .iter()
                .all(|n| expr.contains(n) || legend.contains(n))
        }) {
            problems.push(format!("no panel shows {what} (a query with {needles:?})"));
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard.json:\n  {}",
        problems.join("\n  ")
    );

    let Some(promtool) = promtool(test) else {
        return;
    };
    // promtool parses PromQL in rule files: each query becomes a recording rule.
    let mut rules = Vec::new();
    for (i, (title, expr, _)) in queries.iter().enumerate() {
        let promql = as_promql(expr, &variables);
        assert!(
            !promql.contains('$'),
            "panel {title:?}: a variable the dashboard does not define: {expr}"
        );
        rules.push(json!({"record": format!("dashboard:query_{i}"), "expr": promql}));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dashboard-queries.yaml"),
        serde_norway::to_string(&json!({"groups": [{"name": "dashboard", "rules": rules}]}))
            .unwrap(),
    )
    .unwrap();
    promtool.run_ok(
        &["check", "rules", "dashboard-queries.yaml"],
        dir.path(),
        &format!(
            "a dashboard query is not valid PromQL (dashboard:query_N is query N below):\n{}",
            queries
                .iter()
                .enumerate()
                .map(|(i, (title, expr, _))| format!("  {i}: {title}: {expr}"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
    );
}

// ---------------------------------------------------------------------------------------
// Metric names against the real /metrics
// ---------------------------------------------------------------------------------------

const METRIC_PREFIX: &str = "vps_controller_";

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `vps_controller_[a-z0-9_]+` token in `text`, with where it ends.
fn metric_tokens(text: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find(METRIC_PREFIX) {
        let start = from + at;
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(text.len(), |len| start + len);
        let whole_word = !text[..start].ends_with(is_name_char);
        if whole_word && end > start + METRIC_PREFIX.len() {
            found.push((text[start..end].to_string(), end));
        }
        from = end.max(start + 1);
    }
    found
}

/// Label names inside `{...}` selectors, per metric: `name{a="x", b=~"y"}` -> (name, [a, b]).
fn selector_labels(expr: &str) -> Vec<(String, Vec<String>)> {
    metric_tokens(expr)
        .into_iter()
        .filter_map(|(name, end)| {
            let rest = expr[end..].trim_start();
            let inner = rest.strip_prefix('{')?;
            let inner = &inner[..inner.find('}')?];
            let labels = inner
                .split(',')
                .map(|matcher| {
                    matcher
                        .trim()
                        .chars()
                        .take_while(|c| is_name_char(*c))
                        .collect::<String>()
                })
                .filter(|label| !label.is_empty())
                .collect();
            Some((name, labels))
        })
        .collect()
}

/// Label names in `by (...)`, `on (...)`, `without (...)`, `ignoring (...)` and legend
/// `{{label}}`.
fn grouping_labels(expr: &str, legend: &str) -> Vec<String> {
    let mut labels = Vec::new();
    for keyword in [
        "by",
        "on",
        "without",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        let mut from = 0;
        while let Some(at) = expr[from..].find(keyword) {
            let start = from + at;
            let end = start + keyword.len();
            from = end;
            if expr[..start].ends_with(is_name_char) || expr[end..].starts_with(is_name_char) {
                continue;
            }
            let Some(list) = expr[end..].trim_start().strip_prefix('(') else {
                continue;
            };
            let Some(close) = list.find(')') else {
                continue;
            };
            labels.extend(
                list[..close]
                    .split(',')
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty()),
            );
        }
    }
    let mut rest = legend;
    while let Some(open) = rest.find("{{") {
        let Some(close) = rest[open..].find("}}") else {
            break;
        };
        labels.push(rest[open + 2..open + close].trim().to_string());
        rest = &rest[open + close + 2..];
    }
    labels
}

/// The families of an exposition (`# TYPE name type`) and the label names seen on each
/// sample name.
struct Exposition {
    families: BTreeMap<String, String>,
    sample_labels: BTreeMap<String, BTreeSet<String>>,
}

fn parse_exposition(text: &str) -> Exposition {
    let mut families = BTreeMap::new();
    let mut sample_labels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                families.insert(name.to_string(), kind.to_string());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = sample_labels
            .entry(line[..name_end].to_string())
            .or_default();
        if line[name_end..].starts_with('{') {
            // Label values are quoted and may contain `,` `{` `}` (path="/servers/{id}"): walk
            // name="value" pairs up to the closing brace outside any quotes.
            let mut rest = &line[name_end + 1..];
            loop {
                rest = rest.trim_start_matches([',', ' ']);
                if rest.starts_with('}') {
                    break;
                }
                let Some(eq) = rest.find("=\"") else {
                    break;
                };
                labels.insert(rest[..eq].to_string());
                let value = &rest[eq + 2..];
                let mut escaped = false;
                let close = value
                    .char_indices()
                    .find(|&(_, c)| {
                        let end = c == '"' && !escaped;
                        escaped = c == '\\' && !escaped;
                        end
                    })
                    .map_or(value.len(), |(i, _)| i + 1);
                rest = &value[close..];
            }
        }
    }
    Exposition {
        families,
        sample_labels,
    }
}

impl Exposition {
    /// The family that a query's series name belongs to, if the name is a sample name of
    /// an exported family (counters' `_total`, histograms' `_bucket`/`_sum`/`_count`, ...).
    fn family_of(&self, series: &str) -> Option<&str> {
        let allowed: &[(&str, &[&str])] = &[
            ("", &["gauge", "unknown", "untyped", "stateset", "summary"]),
            ("_total", &["counter"]),
            ("_created", &["counter", "histogram", "summary"]),
            ("_bucket", &["histogram"]),
            ("_sum", &["histogram", "summary"]),
            ("_count", &["histogram", "summary"]),
            ("_info", &["info"]),
        ];
        for (suffix, kinds) in allowed {
            let Some(base) = series.strip_suffix(suffix) else {
                continue;
            };
            if let Some((family, kind)) = self.families.get_key_value(base)
                && kinds.contains(&kind.as_str())
            {
                return Some(family);
            }
        }
        // The classic text format names a counter family with its _total.
        match self.families.get_key_value(series) {
            Some((family, kind)) if kind == "counter" && series.ends_with("_total") => Some(family),
            _ => None,
        }
    }
}

/// Where each metric name is used, and each expression (with its legend) to check labels in.
struct Uses {
    names: BTreeMap<String, BTreeSet<String>>,
    expressions: Vec<(String, String, String)>,
}

fn monitoring_uses() -> Uses {
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut expressions = Vec::new();
    let rule = prometheus_rule();
    for alert in alerts(&rule) {
        let source = format!("alert {}", alert["alert"].as_str().unwrap());
        // Annotations name metrics for the reader too: they must exist as well.
        for (name, _) in metric_tokens(&alert.to_string()) {
            names.entry(name).or_default().insert(source.clone());
        }
        expressions.push((
            source,
            alert["expr"].as_str().unwrap().to_string(),
            String::new(),
        ));
    }
    let dashboard = dashboard();
    for panel in panels(&dashboard) {
        let source = format!(
            "dashboard panel {:?}",
            panel["title"].as_str().unwrap_or_default()
        );
        for (name, _) in metric_tokens(&panel.to_string()) {
            names.entry(name).or_default().insert(source.clone());
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            expressions.push((
                source.clone(),
                target["expr"].as_str().unwrap_or_default().to_string(),
                target["legendFormat"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let source = format!("dashboard variable {}", variable["name"]);
        for (name, _) in metric_tokens(&variable.to_string()) {
            names.entry(name).or_default().insert(source.clone());
        }
    }
    Uses { names, expressions }
}

/// Names the exposition lacks, and labels it lacks on series it has; plus what could not be
/// checked (a family with no samples yet).
fn compare(uses: &Uses, exposition: &Exposition) -> (Vec<String>, Vec<String>) {
    let mut missing = Vec::new();
    let mut unverified = Vec::new();
    for (name, sources) in &uses.names {
        if exposition.family_of(name).is_none() {
            let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
            missing.push(format!("{name}  (used by {})", sources.join(", ")));
        }
    }
    for (source, expr, legend) in &uses.expressions {
        let mut on_expression = BTreeSet::new();
        let mut any_samples = false;
        for (series, labels) in selector_labels(expr) {
            let Some(seen) = exposition.sample_labels.get(&series) else {
                if exposition.family_of(&series).is_some() {
                    unverified.push(format!("{series}: no samples yet ({source})"));
                }
                continue;
            };
            for label in labels
                .iter()
                .filter(|l| !TARGET_LABELS.contains(&l.as_str()))
            {
                if !seen.contains(label) {
                    missing.push(format!(
                        "label {label} on {series}  (it has {seen:?}; used by {source})"
                    ));
                }
            }
        }
        for (series, _) in metric_tokens(expr) {
            if let Some(seen) = exposition.sample_labels.get(&series) {
                any_samples = true;
                on_expression.extend(seen.iter().cloned());
            }
        }
        for label in grouping_labels(expr, legend) {
            if TARGET_LABELS.contains(&label.as_str()) || on_expression.contains(&label) {
                continue;
            }
            if any_samples {
                missing.push(format!(
                    "label {label} on none of the series of `{}`  (they have {on_expression:?}; used by {source})",
                    expr.split_whitespace().collect::<Vec<_>>().join(" ")
                ));
            } else {
                unverified.push(format!("label {label}: no samples yet ({source})"));
            }
        }
    }
    missing.sort();
    missing.dedup();
    unverified.sort();
    unverified.dedup();
    (missing, unverified)
}

#[test]
fn the_alerts_and_the_dashboard_use_only_the_metric_contract() {
    let contract = parse_exposition(&read("tests/monitoring/contract.prom"));
    let (missing, unverified) = compare(&monitoring_uses(), &contract);
    assert!(
        missing.is_empty() && unverified.is_empty(),
        "the alerts or the dashboard use metrics or labels outside the contract \
         (tests/monitoring/contract.prom):\n  {}",
        missing
            .iter()
            .chain(&unverified)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    // The matching is by exposition type: a counter is queried as _total, a histogram as
    // _bucket/_sum/_count, a gauge as itself.
    for (series, exported) in [
        ("vps_controller_reconciles_total", true),
        ("vps_controller_reconciles", false),
        ("vps_controller_leader", true),
        ("vps_controller_leader_total", false),
        ("vps_controller_pass_duration_seconds_bucket", true),
        ("vps_controller_pass_duration_seconds", false),
        ("vps_controller_subscriptions_count", false),
    ] {
        assert_eq!(
            contract.family_of(series).is_some(),
            exported,
            "{series} exported by the contract?"
        );
    }
}

/// Waits until `sub`'s row in `vps-controller status` shows `status`.
async fn wait_for_status(dir: &Path, sub: &str, status: &str, controller: &ChildGuard) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let table = run_cli(dir, &["status"], &[]);
        table.assert_code(0);
        let row = status_row(&table.stdout, sub);
        if row
            .as_ref()
            .is_some_and(|cells| cells.get(3).map(String::as_str) == Some(status))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sub} not {status} within {DEADLINE:?}: {row:?}\n{}",
            controller.output()
        );
        sleep(POLL).await;
    }
}

/// The real binary, against the simulator as a separate process (so that its fault hooks
/// can fail a reconcile), after one subscription is provisioned and one reconcile has failed:
/// families that appear only with their first event (reconcile errors by reason) are there.
#[tokio::test]
async fn every_metric_and_label_the_alerts_and_the_dashboard_use_is_exported() {
    let uses = monitoring_uses();
    assert!(
        uses.names.len() >= 10,
        "found only {} metric names in the rules and the dashboard: {:?}",
        uses.names.len(),
        uses.names.keys()
    );

    let sim_dir = tempfile::tempdir().unwrap();
    let (_simulator, sim_url) = spawn_simulator(sim_dir.path(), &["--action-seconds", "0.2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("{sim_url}/v1");
    let key = encryption_key();
    let database_url = sqlite_url(dir.path());
    let (controller, base_url) = spawn_listening(
        |port| {
            let listen = format!("127.0.0.1:{port}");
            command(
                dir.path(),
                &["run", "--listen", &listen],
                &[
                    ("HCLOUD_ENDPOINT", endpoint.as_str()),
                    ("HCLOUD_TOKEN", SECRET_TOKEN),
                    ("VPS_CONTROLLER_ENCRYPTION_KEY", key.as_str()),
                    ("DATABASE_URL", database_url.as_str()),
                ],
            )
        },
        "/metrics",
    )
    .await;

    // One subscription all the way to a server: reconciles, Hetzner calls, passes.
    let conn = vps_controller::db::connect(&database_url).await.unwrap();
    insert_subscription(&conn, "sub-1", "active", "starter").await;
    wait_for_status(dir.path(), "sub-1", "ready", &controller).await;

    // And one that Hetzner refuses (every SSH key create answers 500): a failed reconcile.
    let http = http_client();
    let armed = http
        .post(format!("{sim_url}/__simulator/faults"))
        .json(&json!({"faults": [{"kind": "http_500", "endpoints": ["POST /ssh_keys"]}]}))
        .send()
        .await
        .unwrap();
    assert!(
        armed.status().is_success(),
        "arming the fault: {}",
        armed.text().await.unwrap_or_default()
    );
    insert_subscription(&conn, "sub-2", "active", "starter").await;
    drop(conn);

    // Scrape once the failure is counted. If it never is, scrape anyway: the comparison below
    // names what is missing, which says more than a timeout.
    let deadline = Instant::now() + DEADLINE;
    let text = loop {
        let text = metrics(&http, &base_url).await;
        let error_counted = text
            .lines()
            .any(|line| line.starts_with("vps_controller_reconcile_errors_total{"));
        if error_counted || Instant::now() >= deadline {
            break text;
        }
        sleep(POLL).await;
    };
    let exposition = parse_exposition(&text);
    let (missing, unverified) = compare(&uses, &exposition);
    if !unverified.is_empty() {
        eprintln!(
            "not checked, no samples in this run:\n  {}",
            unverified.join("\n  ")
        );
    }
    assert!(
        missing.is_empty(),
        "the alerts or the dashboard use metrics or labels that `vps-controller run` does not \
         export, after one subscription was provisioned and one reconcile failed:\n  {}\n\n\
         exported families:\n  {}",
        missing.join("\n  "),
        exposition
            .families
            .iter()
            .map(|(name, kind)| format!("{name} ({kind})"))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    controller.assert_no_secret();
}
