//! The Hetzner Cloud API simulator over real HTTP, with raw reqwest + serde_json (not our client).
//!
//! Every `/v1` answer any test receives is checked against the official OpenAPI spec's response
//! schema for that operation and status code (see `Contract`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hcloud_simulator::{RunningSimulator, SimulatorConfig, spawn};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

// -------------------------------------------------------------------------------------------------
// Spec contract

/// The official spec: `$HCLOUD_OPENAPI`, else `shared/hcloud/openapi.json` beside the repository
/// clone (`<crate>/../../shared/...`).
fn spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let path = std::env::var_os("HCLOUD_OPENAPI")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../shared/hcloud/openapi.json")
            });
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the Hetzner OpenAPI spec is needed for the contract tests but {} cannot be read \
                 ({e}); put a copy of shared/ beside the repository clone or set HCLOUD_OPENAPI",
                path.display()
            )
        });
        serde_json::from_str(&text).expect("openapi.json is not valid JSON")
    })
}

/// The spec path template for a concrete path: the candidate with the most literal segments
/// (so `/servers/1/actions/poweron` picks `…/poweron`, not `…/{action_id}`).
fn spec_template(path: &str) -> Option<String> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let paths = spec()["paths"].as_object()?;
    paths
        .keys()
        .filter_map(|template| {
            let parts: Vec<&str> = template.trim_start_matches('/').split('/').collect();
            if parts.len() != segments.len() {
                return None;
            }
            let mut literal = 0;
            for (p, s) in parts.iter().zip(&segments) {
                if p.starts_with('{') {
                    continue;
                }
                if p != s {
                    return None;
                }
                literal += 1;
            }
            Some((literal, template.clone()))
        })
        .max()
        .map(|(_, t)| t)
}

/// Compiled response-schema validators, keyed by "METHOD template status".
///
/// The spec (OpenAPI 3.1) inlines all its schemas — it has no `$ref`s, and none of the operations
/// tested here use `oneOf`/`allOf` — so each response schema is compiled on its own as JSON
/// Schema 2020-12, which is what 3.1 uses (nullable fields are `type: [T, "null"]`). Nothing had to
/// be left out. Formats are validated too (date-time for timestamps); the spec's custom formats
/// (`int64`, `decimal`, …) are unknown to the validator and ignored.
struct Contract {
    validators: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

impl Contract {
    fn get() -> &'static Contract {
        static CONTRACT: OnceLock<Contract> = OnceLock::new();
        CONTRACT.get_or_init(|| Contract {
            validators: Mutex::new(HashMap::new()),
        })
    }

    fn check(&self, method: &Method, path: &str, status: StatusCode, body: &Value) {
        let Some(api_path) = path.strip_prefix("/v1") else {
            return;
        };
        let Some(template) = spec_template(api_path) else {
            // Unknown routes must answer with the error envelope.
            assert!(status.is_client_error(), "{method} {path}: {status}");
            assert_error_envelope(body);
            return;
        };
        let op = &spec()["paths"][&template][method.as_str().to_lowercase()];
        if op.is_null() {
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_error_envelope(body);
            return;
        }
        let code = status.as_u16().to_string();
        let class = format!("{}xx", status.as_u16() / 100);
        let response = if op["responses"][&code].is_object() {
            &op["responses"][&code]
        } else {
            &op["responses"][&class]
        };
        assert!(
            response.is_object(),
            "{method} {template}: the spec declares no response {status}"
        );
        let schema = &response["content"]["application/json"]["schema"];
        if schema.is_null() {
            // e.g. 204 No Content
            assert_eq!(
                body,
                &Value::Null,
                "{method} {path}: {status} must have no body"
            );
            return;
        }
        let key = format!("{method} {template} {code}");
        let validator = {
            let mut cache = self.validators.lock().unwrap();
            cache
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(
                        jsonschema::options()
                            .with_draft(jsonschema::Draft::Draft202012)
                            .should_validate_formats(true)
                            .build(schema)
                            .unwrap_or_else(|e| panic!("schema for {key} does not compile: {e}")),
                    )
                })
                .clone()
        };
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{key}: answer does not match the spec:\n{}\nbody: {body:#}",
            errors.join("\n")
        );
    }
}

fn assert_error_envelope(body: &Value) {
    assert!(body["error"]["code"].is_string(), "error envelope: {body}");
    assert!(
        body["error"]["message"].is_string(),
        "error envelope: {body}"
    );
}

// -------------------------------------------------------------------------------------------------
// Harness

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    /// The raw body when it was not JSON (e.g. an HTML 502).
    text: Option<String>,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    fn field_names(&self) -> Vec<String> {
        self.body["error"]["details"]["fields"]
            .as_array()
            .map(|fields| {
                fields
                    .iter()
                    .filter_map(|f| f["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
}

struct Sim {
    sim: RunningSimulator,
    http: reqwest::Client,
    token: Option<String>,
}

impl Sim {
    async fn start(config: SimulatorConfig) -> Sim {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let token = config.token.clone();
        let sim = spawn(config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        Sim {
            sim,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            token,
        }
    }

    async fn instant() -> Sim {
        Sim::start(SimulatorConfig {
            action_seconds: 0.0,
            ..SimulatorConfig::default()
        })
        .await
    }

    fn root(&self) -> String {
        format!("http://{}", self.sim.addr())
    }

    /// A request to `path` (including `/v1`), contract-checked.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.call_with(method, path, body, self.token.as_deref())
            .await
    }

    async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> Answer {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.root()));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let answer = read_answer(response).await;
        let path_only = path.split('?').next().unwrap();
        if answer.text.is_none() {
            Contract::get().check(&method, path_only, answer.status, &answer.body);
        }
        answer
    }

    async fn raw(&self, method: Method, path: &str, body: &'static str) -> Answer {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.root()))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let answer = read_answer(request.send().await.unwrap()).await;
        if answer.text.is_none() {
            Contract::get().check(&method, path, answer.status, &answer.body);
        }
        answer
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> Answer {
        self.call(Method::PUT, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> Answer {
        self.call(Method::DELETE, path, None).await
    }

    async fn stats(&self) -> Value {
        let r = self
            .http
            .get(format!("{}/__simulator/stats", self.root()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    async fn hook(&self, path: &str, body: Option<Value>) -> StatusCode {
        let mut request = self.http.post(format!("{}{path}", self.root()));
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap().status()
    }

    async fn create_server(&self, name: &str, labels: Value) -> Value {
        let r = self
            .post(
                "/v1/servers",
                json!({"name": name, "server_type": "cx22", "image": "ubuntu-24.04", "labels": labels}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        r.body
    }

    /// Polls until `condition` holds for GET `path`, or panics at the deadline.
    async fn wait_for(&self, path: &str, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = self.get(path).await;
            if condition(&r.body) {
                return r.body;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last answer: {}",
                r.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn read_answer(response: reqwest::Response) -> Answer {
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    let (body, text) = if bytes.is_empty() {
        (Value::Null, None)
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => (v, None),
            Err(_) => (
                Value::Null,
                Some(String::from_utf8_lossy(&bytes).into_owned()),
            ),
        }
    };
    Answer {
        status,
        headers,
        body,
        text,
    }
}

const ED25519_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsyJHJZuwxE5CyAFsfsb5HO4u4wpEmHPM49mpQItQEd test@sim";
const ED25519_MD5: &str = "d3:07:30:31:26:1f:53:0d:a2:71:26:5b:41:43:ef:76";
const ECDSA_KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBCaq3qAaYL4HqDhSlqKrbO8xcBaynLveRa2BAPPkMtiDsqIwen6eUEsKbA5ZsHxkivSUjtplhXtxGdmBcj50Xxo= e@sim";

fn ids(list: &Value, root: &str) -> Vec<i64> {
    list[root]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_i64().unwrap())
        .collect()
}

fn names(list: &Value, root: &str) -> Vec<String> {
    list[root]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap().to_string())
        .collect()
}

// -------------------------------------------------------------------------------------------------
// Contract walk: every endpoint, success and error answers

#[tokio::test]
async fn every_endpoint_answers_as_the_spec_says() {
    let sim = Sim::instant().await;

    // Catalog.
    for (path, root) in [
        ("/v1/server_types", "server_types"),
        ("/v1/images", "images"),
        ("/v1/locations", "locations"),
    ] {
        let r = sim.get(path).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(!r.body[root].as_array().unwrap().is_empty(), "{root}");
        let first = r.body[root][0]["id"].as_i64().unwrap();
        let one = sim.get(&format!("{path}/{first}")).await;
        assert_eq!(one.status, StatusCode::OK);
    }
    let arm = sim
        .get("/v1/images?name=ubuntu-24.04&architecture=arm")
        .await;
    assert_eq!(arm.body["images"].as_array().unwrap().len(), 1);

    // SSH key.
    let key = sim
        .post(
            "/v1/ssh_keys",
            json!({"name": "k1", "public_key": ED25519_KEY, "labels": {"env": "prod"}}),
        )
        .await;
    assert_eq!(key.status, StatusCode::CREATED);
    assert_eq!(key.body["ssh_key"]["fingerprint"], ED25519_MD5);
    let key_id = key.body["ssh_key"]["id"].as_i64().unwrap();
    let got = sim.get(&format!("/v1/ssh_keys/{key_id}")).await;
    assert_eq!(got.body["ssh_key"]["public_key"], ED25519_KEY);
    let updated = sim
        .put(&format!("/v1/ssh_keys/{key_id}"), json!({"labels": {}}))
        .await;
    assert_eq!(updated.body["ssh_key"]["labels"], json!({}));
    assert_eq!(updated.body["ssh_key"]["name"], "k1");
    let by_fp = sim
        .get(&format!("/v1/ssh_keys?fingerprint={ED25519_MD5}"))
        .await;
    assert_eq!(ids(&by_fp.body, "ssh_keys"), vec![key_id]);

    // Firewall with rules; IPv6 canonicalised.
    let fw = sim
        .post(
            "/v1/firewalls",
            json!({"name": "fw1", "labels": {"a": "b"}, "rules": [
                {"direction": "in", "protocol": "tcp", "port": "22",
                 "source_ips": ["0.0.0.0/0", "2001:0DB8:0:0::/32"], "description": "ssh"},
                {"direction": "in", "protocol": "icmp", "source_ips": ["::/0"]},
                {"direction": "out", "protocol": "udp", "port": "1024-5000",
                 "destination_ips": ["10.0.0.0/8"]}
            ]}),
        )
        .await;
    assert_eq!(fw.status, StatusCode::CREATED, "{}", fw.body);
    let fw_id = fw.body["firewall"]["id"].as_i64().unwrap();
    let rules = &fw.body["firewall"]["rules"];
    assert_eq!(
        rules[0]["source_ips"],
        json!(["0.0.0.0/0", "2001:db8::/32"])
    );
    assert_eq!(rules[1]["port"], Value::Null);
    assert_eq!(rules[2]["source_ips"], json!([]));

    // Server with key (by name), firewall, server_type as an integer ID.
    let created = sim
        .post(
            "/v1/servers",
            json!({"name": "web-1", "server_type": 22, "image": "ubuntu-24.04", "location": "2",
                   "ssh_keys": ["k1"], "firewalls": [{"firewall": fw_id}],
                   "labels": {"vps-controller/instance": "test"}, "user_data": "#cloud-config\n"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let server = &created.body["server"];
    let server_id = server["id"].as_i64().unwrap();
    assert_eq!(server["server_type"]["name"], "cx22");
    assert_eq!(server["location"]["name"], "nbg1");
    assert_eq!(created.body["root_password"], Value::Null);
    assert_eq!(created.body["action"]["command"], "create_server");
    let commands: Vec<&str> = created.body["next_actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["command"].as_str().unwrap())
        .collect();
    assert_eq!(commands, ["start_server", "apply_firewall"]);
    assert_eq!(
        server["public_net"]["firewalls"],
        json!([{"id": fw_id, "status": "applied"}])
    );
    let ipv4 = server["public_net"]["ipv4"]["ip"].as_str().unwrap();
    assert!(
        ipv4.starts_with("198.18.") || ipv4.starts_with("198.19."),
        "{ipv4}"
    );
    assert!(
        server["public_net"]["ipv6"]["ip"]
            .as_str()
            .unwrap()
            .ends_with("::/64")
    );

    let fw_now = sim.get(&format!("/v1/firewalls/{fw_id}")).await;
    assert_eq!(
        fw_now.body["firewall"]["applied_to"],
        json!([{"type": "server", "server": {"id": server_id}}])
    );

    // Without SSH keys a root password comes back; IPv4 can be disabled.
    let no_keys = sim
        .post(
            "/v1/servers",
            json!({"name": "web-2", "server_type": "cpx22", "image": 161547269,
                   "start_after_create": false, "public_net": {"enable_ipv4": false}}),
        )
        .await;
    assert_eq!(no_keys.status, StatusCode::CREATED, "{}", no_keys.body);
    assert!(no_keys.body["root_password"].as_str().unwrap().len() >= 12);
    assert_eq!(no_keys.body["server"]["public_net"]["ipv4"], Value::Null);
    assert_eq!(no_keys.body["server"]["status"], "off");
    assert_eq!(no_keys.body["next_actions"], json!([]));

    // Reads, lists, updates.
    let list = sim.get("/v1/servers?sort=name:desc").await;
    assert_eq!(names(&list.body, "servers"), ["web-2", "web-1"]);
    let one = sim.get(&format!("/v1/servers/{server_id}")).await;
    assert_eq!(one.body["server"]["status"], "running");
    let renamed = sim
        .put(
            &format!("/v1/servers/{server_id}"),
            json!({"name": "web-1b"}),
        )
        .await;
    assert_eq!(renamed.body["server"]["name"], "web-1b");
    assert_eq!(
        renamed.body["server"]["labels"],
        json!({"vps-controller/instance": "test"})
    );
    let fw_put = sim
        .put(&format!("/v1/firewalls/{fw_id}"), json!({"name": "fw1b"}))
        .await;
    assert_eq!(fw_put.body["firewall"]["name"], "fw1b");
    assert_eq!(sim.get("/v1/firewalls").await.status, StatusCode::OK);

    // Server actions.
    for verb in ["poweroff", "poweron", "shutdown", "reboot", "reset"] {
        let r = sim
            .call(
                Method::POST,
                &format!("/v1/servers/{server_id}/actions/{verb}"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{verb}: {}", r.body);
    }
    let rebuilt = sim
        .post(
            &format!("/v1/servers/{server_id}/actions/rebuild"),
            json!({"image": "debian-12"}),
        )
        .await;
    assert_eq!(rebuilt.status, StatusCode::CREATED, "{}", rebuilt.body);
    let server_actions = sim
        .get(&format!("/v1/servers/{server_id}/actions?sort=id:desc"))
        .await;
    let action_id = server_actions.body["actions"][0]["id"].as_i64().unwrap();
    assert_eq!(
        server_actions.body["actions"][0]["command"],
        "rebuild_server"
    );
    sim.get(&format!("/v1/servers/{server_id}/actions/{action_id}"))
        .await;
    sim.get("/v1/servers/actions?status=success").await;
    sim.get(&format!("/v1/servers/actions/{action_id}")).await;
    let one_action = sim.get(&format!("/v1/actions/{action_id}")).await;
    assert_eq!(one_action.body["action"]["status"], "success");
    assert_eq!(one_action.body["action"]["error"], Value::Null);
    let by_ids = sim
        .get(&format!(
            "/v1/actions?id={action_id}&id=999999999&sort=status&sort=id"
        ))
        .await;
    assert_eq!(ids(&by_ids.body, "actions"), vec![action_id]);
    assert!(by_ids.body.get("meta").is_none());

    // Firewall actions.
    let set = sim
        .post(
            &format!("/v1/firewalls/{fw_id}/actions/set_rules"),
            json!({"rules": []}),
        )
        .await;
    assert_eq!(set.status, StatusCode::CREATED, "{}", set.body);
    let set_commands: Vec<&str> = set.body["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["command"].as_str().unwrap())
        .collect();
    assert_eq!(set_commands, ["set_firewall_rules", "apply_firewall"]);
    let removed = sim
        .post(
            &format!("/v1/firewalls/{fw_id}/actions/remove_from_resources"),
            json!({"remove_from": [{"type": "server", "server": {"id": server_id}}]}),
        )
        .await;
    assert_eq!(removed.status, StatusCode::CREATED, "{}", removed.body);
    let applied = sim
        .post(
            &format!("/v1/firewalls/{fw_id}/actions/apply_to_resources"),
            json!({"apply_to": [{"type": "label_selector", "label_selector": {"selector": "vps-controller/instance=test"}}]}),
        )
        .await;
    assert_eq!(applied.status, StatusCode::CREATED, "{}", applied.body);
    let fw_sel = sim.get(&format!("/v1/firewalls/{fw_id}")).await;
    assert_eq!(
        fw_sel.body["firewall"]["applied_to"][0]["applied_to_resources"],
        json!([{"type": "server", "server": {"id": server_id}}])
    );
    let fw_actions = sim.get(&format!("/v1/firewalls/{fw_id}/actions")).await;
    let fw_action = fw_actions.body["actions"][0]["id"].as_i64().unwrap();
    sim.get(&format!("/v1/firewalls/{fw_id}/actions/{fw_action}"))
        .await;
    sim.get("/v1/firewalls/actions").await;
    sim.get(&format!("/v1/firewalls/actions/{fw_action}")).await;

    // Error answers are checked against the 4xx schema too.
    assert_eq!(sim.get("/v1/servers/424242").await.code(), "not_found");
    assert_eq!(sim.get("/v1/servers/abc").await.code(), "not_found");
    assert_eq!(sim.get("/v1/actions").await.code(), "invalid_input");
    assert_eq!(
        sim.get("/v1/ssh_keys/1").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        sim.delete(&format!("/v1/firewalls/{fw_id}")).await.code(),
        "resource_in_use"
    );

    // Deletes.
    let deleted = sim.delete(&format!("/v1/servers/{server_id}")).await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(deleted.body["action"]["command"], "delete_server");
    assert_eq!(
        sim.get(&format!("/v1/servers/{server_id}")).await.status,
        StatusCode::NOT_FOUND
    );
    let detached = sim
        .post(
            &format!("/v1/firewalls/{fw_id}/actions/remove_from_resources"),
            json!({"remove_from": [{"type": "label_selector", "label_selector": {"selector": "vps-controller/instance=test"}}]}),
        )
        .await;
    assert_eq!(detached.status, StatusCode::CREATED);
    assert_eq!(
        sim.delete(&format!("/v1/firewalls/{fw_id}")).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        sim.delete(&format!("/v1/ssh_keys/{key_id}")).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        sim.delete(&format!("/v1/ssh_keys/{key_id}")).await.code(),
        "not_found"
    );
    sim.sim.shutdown().await;
}

// -------------------------------------------------------------------------------------------------
// Pagination and sorting

/// `GET /images?name=N` without `architecture` lists every architecture's image, x86 first, as at
/// Hetzner (sources in `catalog.rs`): clients that take the first match (hcloud-go's `Image.Get`,
/// Debian's hcloud-cli 1.30) get the x86 image. Creating by name picks the server type's one.
#[tokio::test]
async fn image_name_lookup_lists_x86_first_and_create_picks_the_architecture() {
    let sim = Sim::instant().await;
    let all = sim.get("/v1/images?name=ubuntu-24.04").await;
    assert_eq!(all.status, StatusCode::OK);
    let found: Vec<(i64, &str)> = all.body["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_i64().unwrap(),
                i["architecture"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(found, [(161547269, "x86"), (161547270, "arm")]);
    let x86 = sim
        .get("/v1/images?name=ubuntu-24.04&architecture=x86")
        .await;
    assert_eq!(x86.body["images"][0]["id"], 161547269);

    for (name, server_type, image) in [
        ("on-x86", "cx23", 161547269),
        ("on-arm", "cax11", 161547270),
    ] {
        let created = sim
            .post(
                "/v1/servers",
                json!({"name": name, "server_type": server_type, "image": "ubuntu-24.04",
                       "location": "fsn1"}),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
        assert_eq!(
            created.body["server"]["image"]["id"], image,
            "{server_type}"
        );
    }
    // An image id of the wrong architecture is refused.
    let wrong = sim
        .post(
            "/v1/servers",
            json!({"name": "mismatch", "server_type": "cax11", "image": 161547269}),
        )
        .await;
    assert_eq!(
        wrong.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        wrong.body
    );
}

#[tokio::test]
async fn pagination_walks_120_servers() {
    let sim = Sim::instant().await;
    for i in 0..120 {
        sim.create_server(&format!("srv-{i:03}"), json!({"batch": "a"}))
            .await;
    }
    let mut seen = Vec::new();
    let mut page = Some(1);
    let mut pages = 0;
    while let Some(p) = page {
        let r = sim
            .get(&format!(
                "/v1/servers?per_page=50&page={p}&label_selector=batch%3Da"
            ))
            .await;
        let meta = &r.body["meta"]["pagination"];
        assert_eq!(meta["per_page"], 50);
        assert_eq!(meta["total_entries"], 120);
        assert_eq!(meta["last_page"], 3);
        assert_eq!(meta["page"], p);
        assert_eq!(
            meta["previous_page"],
            if p == 1 { Value::Null } else { json!(p - 1) }
        );
        let link = r.header("link").unwrap();
        assert!(link.contains("rel=\"last\""), "{link}");
        assert!(link.contains("label_selector=batch%3Da"), "{link}");
        seen.extend(ids(&r.body, "servers"));
        page = meta["next_page"].as_u64();
        pages += 1;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 120);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, seen, "default order is by id, no duplicates");

    // Defaults, clamping and a page past the end.
    let first = sim.get("/v1/servers").await;
    assert_eq!(first.body["servers"].as_array().unwrap().len(), 25);
    assert_eq!(first.body["meta"]["pagination"]["next_page"], 2);
    let clamped = sim.get("/v1/servers?per_page=100").await;
    assert_eq!(clamped.body["meta"]["pagination"]["per_page"], 50);
    assert_eq!(clamped.body["servers"].as_array().unwrap().len(), 50);
    let beyond = sim.get("/v1/servers?page=9&per_page=50").await;
    assert_eq!(beyond.body["servers"], json!([]));
    assert_eq!(beyond.body["meta"]["pagination"]["next_page"], Value::Null);
    for bad in ["page=0", "per_page=0", "per_page=ten"] {
        let r = sim.get(&format!("/v1/servers?{bad}")).await;
        assert_eq!(r.code(), "invalid_input", "{bad}");
    }

    // Sorting: multi-key and directions.
    let by_name = sim.get("/v1/servers?sort=name:desc&per_page=3").await;
    assert_eq!(
        names(&by_name.body, "servers"),
        ["srv-119", "srv-118", "srv-117"]
    );
    let by_created = sim
        .get("/v1/servers?sort=created:desc&sort=id:desc&per_page=2")
        .await;
    assert_eq!(names(&by_created.body, "servers"), ["srv-119", "srv-118"]);
    assert_eq!(
        sim.get("/v1/servers?sort=status").await.field_names(),
        ["sort"]
    );
    assert_eq!(
        sim.get("/v1/servers?sort=name:up").await.code(),
        "invalid_input"
    );
    let by_exact_name = sim.get("/v1/servers?name=srv-007").await;
    assert_eq!(names(&by_exact_name.body, "servers"), ["srv-007"]);
    assert_eq!(
        sim.get("/v1/servers?name=srv-00").await.body["servers"],
        json!([])
    );
    sim.sim.shutdown().await;
}

// -------------------------------------------------------------------------------------------------
// Label selectors

#[tokio::test]
async fn label_selectors_filter_lists() {
    let sim = Sim::instant().await;
    sim.create_server("a", json!({"env": "prod", "type": "web"}))
        .await;
    sim.create_server("b", json!({"env": "prod", "type": "database"}))
        .await;
    sim.create_server("c", json!({"env": "staging"})).await;
    sim.create_server("d", json!({})).await;
    let table: &[(&str, &[&str])] = &[
        ("env=prod", &["a", "b"]),
        ("env==prod", &["a", "b"]),
        ("env!=prod", &["c", "d"]),
        ("env", &["a", "b", "c"]),
        ("!env", &["d"]),
        ("!type", &["c", "d"]),
        ("env in (staging,testing)", &["c"]),
        ("env notin (prod)", &["c", "d"]),
        ("env=prod,type!=database", &["a"]),
        ("env=prod,type", &["a", "b"]),
        ("env=nothing", &[]),
    ];
    for (selector, expected) in table {
        let encoded: String = url::form_urlencoded::byte_serialize(selector.as_bytes()).collect();
        let r = sim
            .get(&format!("/v1/servers?label_selector={encoded}"))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{selector}: {}", r.body);
        assert_eq!(names(&r.body, "servers"), *expected, "{selector}");
    }
    for bad in ["env in (a", "=x", "env===x", "a b", "-env=1"] {
        let encoded: String = url::form_urlencoded::byte_serialize(bad.as_bytes()).collect();
        let r = sim
            .get(&format!("/v1/servers?label_selector={encoded}"))
            .await;
        assert_eq!(r.code(), "invalid_input", "{bad}");
        assert_eq!(r.field_names(), ["label_selector"], "{bad}");
    }
    // Same grammar on SSH keys and firewalls.
    sim.post(
        "/v1/ssh_keys",
        json!({"name": "k", "public_key": ED25519_KEY, "labels": {"owner": "me"}}),
    )
    .await;
    sim.post(
        "/v1/firewalls",
        json!({"name": "f", "labels": {"owner": "you"}}),
    )
    .await;
    let keys = sim.get("/v1/ssh_keys?label_selector=owner%3Dme").await;
    assert_eq!(names(&keys.body, "ssh_keys"), ["k"]);
    let fws = sim.get("/v1/firewalls?label_selector=owner%3Dme").await;
    assert_eq!(fws.body["firewalls"], json!([]));
    sim.sim.shutdown().await;
}

// -------------------------------------------------------------------------------------------------
// Uniqueness and validation

#[tokio::test]
async fn duplicates_get_uniqueness_errors() {
    let sim = Sim::instant().await;
    sim.create_server("dup", json!({})).await;
    let r = sim
        .post(
            "/v1/servers",
            json!({"name": "dup", "server_type": "cx22", "image": "debian-12"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "uniqueness_error");
    assert_eq!(r.field_names(), ["name"]);

    let other = sim.create_server("other", json!({})).await;
    let other_id = other["server"]["id"].as_i64().unwrap();
    let rename = sim
        .put(&format!("/v1/servers/{other_id}"), json!({"name": "dup"}))
        .await;
    assert_eq!(rename.code(), "uniqueness_error");

    sim.post(
        "/v1/ssh_keys",
        json!({"name": "key", "public_key": ED25519_KEY}),
    )
    .await;
    let same_name = sim
        .post(
            "/v1/ssh_keys",
            json!({"name": "key", "public_key": ECDSA_KEY}),
        )
        .await;
    assert_eq!(same_name.code(), "uniqueness_error");
    assert_eq!(same_name.field_names(), ["name"]);
    let same_key = sim
        .post(
            "/v1/ssh_keys",
            json!({"name": "key2", "public_key": ED25519_KEY.replace("test@sim", "other comment")}),
        )
        .await;
    assert_eq!(same_key.status, StatusCode::CONFLICT);
    assert_eq!(same_key.field_names(), ["public_key"]);

    sim.post("/v1/firewalls", json!({"name": "fw"})).await;
    let fw = sim.post("/v1/firewalls", json!({"name": "fw"})).await;
    assert_eq!(fw.code(), "uniqueness_error");
    assert_eq!(fw.field_names(), ["name"]);
    // Nothing was created by the failed requests.
    assert_eq!(
        sim.get("/v1/ssh_keys").await.body["meta"]["pagination"]["total_entries"],
        1
    );
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn invalid_input_names_the_field() {
    let sim = Sim::instant().await;
    let base = json!({"name": "ok", "server_type": "cx22", "image": "ubuntu-24.04"});
    let with = |extra: Value| {
        let mut body = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let big_user_data = "x".repeat(32 * 1024 + 1);
    let server_cases: Vec<(Value, &[&str])> = vec![
        (with(json!({"name": "bad_name"})), &["name"]),
        (with(json!({"name": "-web"})), &["name"]),
        (
            json!({"server_type": "cx22", "image": "ubuntu-24.04"}),
            &["name"],
        ),
        (with(json!({"server_type": "cx999"})), &["server_type"]),
        (with(json!({"server_type": 424242})), &["server_type"]),
        (with(json!({"image": "windows-95"})), &["image"]),
        (
            with(json!({"server_type": "cax11", "image": "fedora-42"})),
            &["image"],
        ),
        (with(json!({"location": "mars1"})), &["location"]),
        (with(json!({"user_data": big_user_data})), &["user_data"]),
        (with(json!({"labels": {"-bad": "x"}})), &["labels"]),
        (
            with(json!({"labels": {"hetzner.cloud/x": "y"}})),
            &["labels"],
        ),
        (with(json!({"labels": {"k": "bad value"}})), &["labels"]),
        (with(json!({"ssh_keys": ["missing"]})), &["ssh_keys"]),
        (
            with(json!({"firewalls": [{"firewall": 1}]})),
            &["firewalls"],
        ),
        (with(json!({"datacenter": "fsn1-dc14"})), &["datacenter"]),
        (
            with(json!({"public_net": {"enable_ipv4": false, "enable_ipv6": false}})),
            &["public_net.enable_ipv4"],
        ),
        (with(json!({"volumes": [1]})), &["volumes"]),
        (
            with(json!({"start_after_create": "yes"})),
            &["start_after_create"],
        ),
        (
            json!({"name": "bad name", "server_type": "nope", "image": "ubuntu-24.04"}),
            &["name", "server_type"],
        ),
    ];
    for (body, fields) in server_cases {
        let r = sim.post("/v1/servers", body.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(r.code(), "invalid_input", "{body}");
        assert_eq!(r.field_names(), fields, "{body}: {}", r.body);
        let messages = &r.body["error"]["details"]["fields"][0]["messages"];
        assert!(!messages.as_array().unwrap().is_empty());
    }
    // Exactly at the user_data limit is fine.
    let at_limit = sim
        .post(
            "/v1/servers",
            with(json!({"user_data": "x".repeat(32 * 1024)})),
        )
        .await;
    assert_eq!(at_limit.status, StatusCode::CREATED);

    let key_cases: Vec<(Value, &[&str])> = vec![
        (
            json!({"name": "k", "public_key": "ssh-rsa not-a-key"}),
            &["public_key"],
        ),
        (json!({"name": "k"}), &["public_key"]),
        (json!({"public_key": ED25519_KEY}), &["name"]),
    ];
    for (body, fields) in key_cases {
        let r = sim.post("/v1/ssh_keys", body.clone()).await;
        assert_eq!(r.code(), "invalid_input", "{body}");
        assert_eq!(r.field_names(), fields, "{body}");
    }

    let rule = |r: Value| json!({"name": "fw", "rules": [r]});
    let firewall_cases: Vec<(Value, &[&str])> = vec![
        (
            rule(json!({"direction": "in", "protocol": "tcp", "source_ips": ["0.0.0.0/0"]})),
            &["rules[0].port"],
        ),
        (
            rule(
                json!({"direction": "in", "protocol": "icmp", "port": "80", "source_ips": ["0.0.0.0/0"]}),
            ),
            &["rules[0].port"],
        ),
        (
            rule(
                json!({"direction": "in", "protocol": "tcp", "port": "99999", "source_ips": ["0.0.0.0/0"]}),
            ),
            &["rules[0].port"],
        ),
        (
            rule(
                json!({"direction": "sideways", "protocol": "tcp", "port": "80", "source_ips": ["0.0.0.0/0"]}),
            ),
            &["rules[0].direction"],
        ),
        (
            rule(json!({"direction": "in", "protocol": "sctp", "source_ips": ["0.0.0.0/0"]})),
            &["rules[0].protocol"],
        ),
        (
            rule(
                json!({"direction": "out", "protocol": "tcp", "port": "80", "source_ips": ["0.0.0.0/0"], "destination_ips": ["0.0.0.0/0"]}),
            ),
            &["rules[0].source_ips"],
        ),
        (
            rule(
                json!({"direction": "in", "protocol": "tcp", "port": "80", "source_ips": ["10.0.0.1/8"]}),
            ),
            &["rules[0].source_ips"],
        ),
        (
            rule(
                json!({"direction": "in", "protocol": "tcp", "port": "80", "source_ips": ["not-an-ip"]}),
            ),
            &["rules[0].source_ips"],
        ),
        (
            rule(json!({"direction": "in", "protocol": "tcp", "port": "80"})),
            &["rules[0].source_ips"],
        ),
        (
            rule(
                json!({"direction": "in", "protocol": "tcp", "port": "80", "source_ips": ["0.0.0.0/0"], "description": "d".repeat(256)}),
            ),
            &["rules[0].description"],
        ),
        (
            rule(
                json!({"direction": "in", "protocol": "tcp", "port": "80", "source_ips": ["0.0.0.0/0"], "colour": "red"}),
            ),
            &["rules[0].colour"],
        ),
        (json!({"name": ""}), &["name"]),
        (json!({"name": "x".repeat(129)}), &["name"]),
        (json!({"name": "fw", "unknown": 1}), &["unknown"]),
        (
            json!({"name": "fw", "apply_to": [{"type": "volume"}]}),
            &["apply_to[0].type"],
        ),
    ];
    for (body, fields) in firewall_cases {
        let r = sim.post("/v1/firewalls", body.clone()).await;
        assert_eq!(r.code(), "invalid_input", "{body}: {}", r.body);
        assert_eq!(r.field_names(), fields, "{body}");
    }
    let many_rules: Vec<Value> = (0..51)
        .map(|i| json!({"direction": "in", "protocol": "tcp", "port": format!("{}", 1000 + i), "source_ips": ["0.0.0.0/0"]}))
        .collect();
    let r = sim
        .post(
            "/v1/firewalls",
            json!({"name": "many", "rules": many_rules}),
        )
        .await;
    assert_eq!(r.field_names(), ["rules"]);
    let fifty = json!({"name": "fifty", "rules": many_rules[..50]});
    assert_eq!(
        sim.post("/v1/firewalls", fifty).await.status,
        StatusCode::CREATED
    );

    // Malformed JSON is a 400 json_error, not a 422.
    let broken = sim.raw(Method::POST, "/v1/servers", "{\"name\": ").await;
    assert_eq!(broken.status, StatusCode::BAD_REQUEST);
    assert_eq!(broken.code(), "json_error");
    let not_object = sim.raw(Method::POST, "/v1/ssh_keys", "[1,2]").await;
    assert_eq!(not_object.code(), "json_error");
    sim.sim.shutdown().await;
}

// -------------------------------------------------------------------------------------------------
// Actions, locking, firewall attachment

#[tokio::test]
async fn actions_run_for_action_seconds_and_lock_the_server() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 0.6,
        ..SimulatorConfig::default()
    })
    .await;
    let created = sim.create_server("slow", json!({})).await;
    let id = created["server"]["id"].as_i64().unwrap();
    assert_eq!(created["server"]["status"], "initializing");
    assert_eq!(created["server"]["locked"], true);
    assert_eq!(created["action"]["status"], "running");
    assert_eq!(created["action"]["progress"], 0);
    assert_eq!(created["action"]["finished"], Value::Null);
    assert_eq!(created["action"]["error"], Value::Null);

    // A second mutating action is refused while the first runs.
    let locked = sim
        .call(
            Method::POST,
            &format!("/v1/servers/{id}/actions/poweroff"),
            None,
        )
        .await;
    assert_eq!(locked.status, StatusCode::LOCKED);
    assert_eq!(locked.code(), "locked");

    let ids = [
        created["action"]["id"].as_i64().unwrap(),
        created["next_actions"][0]["id"].as_i64().unwrap(),
    ];
    let done = sim
        .wait_for(
            &format!("/v1/actions?id={}&id={}", ids[0], ids[1]),
            "create actions to finish",
            |b| {
                b["actions"]
                    .as_array()
                    .is_some_and(|a| a.len() == 2 && a.iter().all(|x| x["status"] != "running"))
            },
        )
        .await;
    for action in done["actions"].as_array().unwrap() {
        assert_eq!(action["status"], "success");
        assert_eq!(action["progress"], 100);
        assert!(action["finished"].is_string());
        assert_eq!(action["error"], Value::Null);
    }
    let server = sim.get(&format!("/v1/servers/{id}")).await;
    assert_eq!(server.body["server"]["status"], "running");
    assert_eq!(server.body["server"]["locked"], false);

    // poweroff: stopping while it runs, off when done.
    let off = sim
        .call(
            Method::POST,
            &format!("/v1/servers/{id}/actions/poweroff"),
            None,
        )
        .await;
    assert_eq!(off.status, StatusCode::CREATED);
    assert_eq!(off.body["action"]["command"], "stop_server");
    let action_id = off.body["action"]["id"].as_i64().unwrap();
    sim.wait_for(&format!("/v1/actions/{action_id}"), "poweroff", |b| {
        b["action"]["status"] == "success"
    })
    .await;
    let server = sim.get(&format!("/v1/servers/{id}")).await;
    assert_eq!(server.body["server"]["status"], "off");

    // shutdown of a running server ends "off" too.
    let on = sim
        .call(
            Method::POST,
            &format!("/v1/servers/{id}/actions/poweron"),
            None,
        )
        .await;
    let on_id = on.body["action"]["id"].as_i64().unwrap();
    sim.wait_for(&format!("/v1/servers/{id}"), "server running again", |b| {
        b["server"]["status"] == "running"
    })
    .await;
    assert_eq!(
        sim.get(&format!("/v1/actions/{on_id}")).await.body["action"]["status"],
        "success"
    );
    sim.call(
        Method::POST,
        &format!("/v1/servers/{id}/actions/shutdown"),
        None,
    )
    .await;
    sim.wait_for(&format!("/v1/servers/{id}"), "shutdown to end off", |b| {
        b["server"]["status"] == "off"
    })
    .await;
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn start_after_create_false_ends_off_and_locking_is_per_server() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 60.0,
        ..SimulatorConfig::default()
    })
    .await;
    let a = sim.create_server("a", json!({})).await;
    let b = sim
        .post(
            "/v1/servers",
            json!({"name": "b", "server_type": "cx22", "image": "debian-12", "start_after_create": false}),
        )
        .await;
    assert_eq!(b.body["next_actions"], json!([]));
    let a_id = a["server"]["id"].as_i64().unwrap();
    // Both locked for a minute; every mutating server action is refused with 423.
    for verb in ["poweron", "poweroff", "shutdown", "reboot", "reset"] {
        let r = sim
            .call(
                Method::POST,
                &format!("/v1/servers/{a_id}/actions/{verb}"),
                None,
            )
            .await;
        assert_eq!(r.code(), "locked", "{verb}");
    }
    // Reads and label updates still work while locked; DELETE too.
    let put = sim
        .put(
            &format!("/v1/servers/{a_id}"),
            json!({"labels": {"x": "y"}}),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK);
    assert_eq!(put.body["server"]["locked"], true);
    assert_eq!(
        sim.delete(&format!("/v1/servers/{a_id}")).await.status,
        StatusCode::OK
    );
    sim.sim.shutdown().await;

    let quick = Sim::instant().await;
    let off = quick
        .post(
            "/v1/servers",
            json!({"name": "b", "server_type": "cx22", "image": "debian-12", "start_after_create": false}),
        )
        .await;
    assert_eq!(off.body["server"]["status"], "off");
    quick.sim.shutdown().await;
}

#[tokio::test]
async fn firewalls_in_use_cannot_be_deleted() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 0.4,
        ..SimulatorConfig::default()
    })
    .await;
    let fw = sim.post("/v1/firewalls", json!({"name": "fw"})).await;
    let fw_id = fw.body["firewall"]["id"].as_i64().unwrap();
    let server = sim
        .post(
            "/v1/servers",
            json!({"name": "s", "server_type": "cx22", "image": "debian-12", "firewalls": [{"firewall": fw_id}]}),
        )
        .await;
    let server_id = server.body["server"]["id"].as_i64().unwrap();
    // Pending until apply_firewall finishes.
    assert_eq!(
        server.body["server"]["public_net"]["firewalls"],
        json!([{"id": fw_id, "status": "pending"}])
    );
    sim.wait_for(
        &format!("/v1/servers/{server_id}"),
        "firewall applied",
        |b| b["server"]["public_net"]["firewalls"] == json!([{"id": fw_id, "status": "applied"}]),
    )
    .await;

    let in_use = sim.delete(&format!("/v1/firewalls/{fw_id}")).await;
    assert_eq!(in_use.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(in_use.code(), "resource_in_use");

    let target = json!([{"type": "server", "server": {"id": server_id}}]);
    let again = sim
        .post(
            &format!("/v1/firewalls/{fw_id}/actions/apply_to_resources"),
            json!({"apply_to": target}),
        )
        .await;
    assert_eq!(again.code(), "firewall_already_applied");
    let missing = sim
        .post(
            &format!("/v1/firewalls/{fw_id}/actions/apply_to_resources"),
            json!({"apply_to": [{"type": "server", "server": {"id": 1}}]}),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.code(), "firewall_resource_not_found");

    // Removal takes effect when its action finishes: until then the firewall is still in use.
    let removed = sim
        .post(
            &format!("/v1/firewalls/{fw_id}/actions/remove_from_resources"),
            json!({"remove_from": target}),
        )
        .await;
    assert_eq!(removed.status, StatusCode::CREATED);
    assert_eq!(removed.body["actions"][0]["command"], "remove_firewall");
    assert_eq!(
        sim.delete(&format!("/v1/firewalls/{fw_id}")).await.code(),
        "resource_in_use"
    );
    let twice = sim
        .post(
            &format!("/v1/firewalls/{fw_id}/actions/remove_from_resources"),
            json!({"remove_from": target}),
        )
        .await;
    assert_eq!(twice.status, StatusCode::NOT_FOUND);
    assert_eq!(twice.code(), "firewall_resource_not_found");
    sim.wait_for(&format!("/v1/firewalls/{fw_id}"), "removal", |b| {
        b["firewall"]["applied_to"] == json!([])
    })
    .await;
    let server_now = sim.get(&format!("/v1/servers/{server_id}")).await;
    assert_eq!(
        server_now.body["server"]["public_net"]["firewalls"],
        json!([])
    );
    assert_eq!(
        sim.delete(&format!("/v1/firewalls/{fw_id}")).await.status,
        StatusCode::NO_CONTENT
    );

    // Deleting a server detaches it at once.
    let fw2 = sim
        .post("/v1/firewalls", json!({"name": "fw2", "apply_to": target}))
        .await;
    assert_eq!(fw2.status, StatusCode::CREATED, "{}", fw2.body);
    assert_eq!(fw2.body["actions"][0]["command"], "apply_firewall");
    let fw2_id = fw2.body["firewall"]["id"].as_i64().unwrap();
    sim.delete(&format!("/v1/servers/{server_id}")).await;
    assert_eq!(
        sim.get(&format!("/v1/firewalls/{fw2_id}")).await.body["firewall"]["applied_to"],
        json!([])
    );
    assert_eq!(
        sim.delete(&format!("/v1/firewalls/{fw2_id}")).await.status,
        StatusCode::NO_CONTENT
    );
    sim.sim.shutdown().await;
}

// -------------------------------------------------------------------------------------------------
// Rate limit, auth, routing

#[tokio::test]
async fn rate_limit_answers_429_with_headers() {
    let sim = Sim::start(SimulatorConfig {
        rate_limit: 5,
        ..SimulatorConfig::default()
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let r = sim.get("/v1/servers").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("ratelimit-limit").as_deref(), Some("5"));
        remaining.push(r.header("ratelimit-remaining").unwrap());
    }
    assert_eq!(remaining, ["4", "3", "2", "1", "0"]);
    let limited = sim.get("/v1/servers").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.code(), "rate_limit_exceeded");
    assert_eq!(limited.header("ratelimit-remaining").as_deref(), Some("0"));
    let reset: u64 = limited.header("ratelimit-reset").unwrap().parse().unwrap();
    // 5 per hour: a full bucket is about an hour away.
    assert!(
        reset >= now + 3500 && reset <= now + 3700,
        "{reset} vs {now}"
    );
    // Errors carry the headers too.
    let unknown = sim.get("/v1/nothing-here").await;
    assert_eq!(unknown.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(unknown.header("ratelimit-limit").is_some());
    let stats = sim.stats().await;
    assert_eq!(stats["rate_limited"], 2);
    assert_eq!(stats["total"], 7);
    sim.sim.shutdown().await;
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `RateLimit-Reset` must be `now + ceil(missing × 3600 / (limit × scale))` for some `missing`
/// in `[10 - remaining - 1, 10 - remaining]` (the fraction of a token the header floors away),
/// with `now` anywhere in `[before, after]`.
fn assert_reset_in_scaled_time(reset: u64, remaining: u64, before: u64, after: u64) {
    // 10 per hour at 720×: half a real second per token.
    let missing = 10 - remaining;
    let earliest = before + (missing.saturating_sub(1) as f64 * 0.5).ceil() as u64;
    let latest = after + (missing as f64 * 0.5).ceil() as u64;
    assert!(
        (earliest..=latest).contains(&reset),
        "reset {reset} with {remaining} remaining; expected {earliest}..={latest}"
    );
}

/// With `budget_time_scale` F the bucket keeps its capacity but refills F times faster, and
/// `RateLimit-Reset` (headers and the stats hook alike) counts in that scaled time.
#[tokio::test]
async fn a_scaled_budget_empties_refills_faster_and_its_headers_agree() {
    // 10 per hour, 720 times faster: 2 tokens per real second, full 5 s after it emptied. At
    // Hetzner's pace the first token would be 6 minutes away and the deadlines below fail.
    let sim = Sim::start(SimulatorConfig {
        rate_limit: 10,
        budget_time_scale: 720.0,
        ..SimulatorConfig::default()
    })
    .await;
    let bucket = sim.stats().await["rate_limit"].clone();
    assert_eq!(bucket["limit"], 10, "{bucket}");
    assert_eq!(bucket["remaining"], 10, "{bucket}");
    assert_eq!(bucket["time_scale"], 720.0, "{bucket}");

    // Empty it: the capacity is still 10, whatever trickles in while we drain it.
    let started = Instant::now();
    let mut allowed = 0u64;
    let limited = loop {
        let before = unix_seconds();
        let r = sim.get("/v1/servers").await;
        let after = unix_seconds();
        assert_eq!(r.header("ratelimit-limit").as_deref(), Some("10"));
        let remaining: u64 = r.header("ratelimit-remaining").unwrap().parse().unwrap();
        let reset: u64 = r.header("ratelimit-reset").unwrap().parse().unwrap();
        assert_reset_in_scaled_time(reset, remaining, before, after);
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(remaining, 0);
            break r;
        }
        assert_eq!(r.status, StatusCode::OK);
        allowed += 1;
        assert!(allowed <= 40, "the bucket never emptied");
    };
    let trickled = (started.elapsed().as_secs_f64() * 2.0).ceil() as u64;
    assert!(
        (10..=10 + trickled).contains(&allowed),
        "{allowed} requests allowed, at most {trickled} of them refilled"
    );
    assert_eq!(limited.code(), "rate_limit_exceeded");
    assert_eq!(sim.stats().await["rate_limited"], 1);

    // It refills: wait for a whole token through the hook (which takes none).
    let deadline = Instant::now() + Duration::from_secs(10);
    let bucket = loop {
        let before = unix_seconds();
        let bucket = sim.stats().await["rate_limit"].clone();
        let after = unix_seconds();
        let remaining = bucket["remaining"].as_u64().unwrap();
        assert_reset_in_scaled_time(bucket["reset"].as_u64().unwrap(), remaining, before, after);
        if remaining > 0 {
            break bucket;
        }
        assert!(
            Instant::now() < deadline,
            "no token back 10 s after emptying a 720x bucket: {bucket}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let before = unix_seconds();
    let r = sim.get("/v1/servers").await;
    let after = unix_seconds();
    assert_eq!(r.status, StatusCode::OK, "{bucket}");
    let remaining: u64 = r.header("ratelimit-remaining").unwrap().parse().unwrap();
    let seen = bucket["remaining"].as_u64().unwrap();
    // The request took one; a token may have come back since the hook was read.
    assert!(
        remaining + 1 >= seen && remaining <= seen,
        "{remaining} after {bucket}"
    );
    let reset: u64 = r.header("ratelimit-reset").unwrap().parse().unwrap();
    assert_reset_in_scaled_time(reset, remaining, before, after);

    // Left alone it fills up to its capacity, not beyond, and Reset is now.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let before = unix_seconds();
        let bucket = sim.stats().await["rate_limit"].clone();
        if bucket["remaining"] == 10 {
            assert_eq!(bucket["limit"], 10);
            let reset = bucket["reset"].as_u64().unwrap();
            assert!((before..=unix_seconds()).contains(&reset), "{bucket}");
            break;
        }
        assert!(Instant::now() < deadline, "never full again: {bucket}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An aimed 429 looks like an empty bucket in the same scaled time: full in 5 s, not 1 h.
    sim.arm(json!([{"kind": "http_429", "count": 1}])).await;
    let before = unix_seconds();
    let r = sim.get("/v1/servers").await;
    let after = unix_seconds();
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("ratelimit-remaining").as_deref(), Some("0"));
    let reset: u64 = r.header("ratelimit-reset").unwrap().parse().unwrap();
    assert!(
        (before + 5..=after + 5).contains(&reset),
        "{reset} vs {before}"
    );
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn token_is_required_when_configured() {
    let sim = Sim::start(SimulatorConfig {
        token: Some("s3cret".into()),
        ..SimulatorConfig::default()
    })
    .await;
    let none = sim.call_with(Method::GET, "/v1/servers", None, None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.code(), "unauthorized");
    assert!(none.header("ratelimit-remaining").is_some());
    let wrong = sim
        .call_with(Method::GET, "/v1/servers", None, Some("guess"))
        .await;
    assert_eq!(wrong.code(), "unauthorized");
    let right = sim.get("/v1/servers").await;
    assert_eq!(right.status, StatusCode::OK);
    // The hooks are outside /v1 and need no token.
    assert_eq!(sim.stats().await["total"], 3);
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let sim = Sim::instant().await;
    let r = sim.get("/v1/volumes").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "not_found");
    let r = sim.call(Method::PATCH, "/v1/servers", None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.code(), "method_not_allowed");
    let r = sim.call(Method::DELETE, "/v1/ssh_keys", None).await;
    assert_eq!(r.code(), "method_not_allowed");
    let r = sim.get("/v2/servers").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "not_found");
    sim.sim.shutdown().await;
}

/// Routing details that must not change with the router: HEAD is not GET (405, no `Allow`
/// header), a word where an action id belongs is no route, empty segments are no route, and all
/// of these are counted (unroutable ones as `METHOD <unmatched>`).
#[tokio::test]
async fn routing_answers_odd_requests_as_before() {
    let sim = Sim::instant().await;
    let head = sim
        .http
        .head(format!("{}/v1/servers", sim.root()))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(head.headers().get("allow").is_none());
    let r = sim
        .call(Method::POST, "/v1/servers/1/actions/enable_rescue", None)
        .await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    for path in ["/v1", "/v1/", "/v1/servers/", "/v1/servers/actions/x"] {
        let r = sim.get(path).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{path}"
        );
    }
    let r = sim.get("/v1/servers/x").await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let stats = sim.stats().await;
    let expected: BTreeMap<String, u64> = [
        ("HEAD /servers", 1),
        ("POST <unmatched>", 1),
        ("GET <unmatched>", 4),
        ("GET /servers/{id}", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let got: BTreeMap<String, u64> = serde_json::from_value(stats["by_endpoint"].clone()).unwrap();
    assert_eq!(got, expected);
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn stats_count_requests_by_path_template() {
    let sim = Sim::instant().await;
    let created = sim.create_server("s", json!({})).await;
    let id = created["server"]["id"].as_i64().unwrap();
    sim.get(&format!("/v1/servers/{id}")).await;
    sim.get(&format!("/v1/servers/{id}")).await;
    sim.get("/v1/servers/999").await;
    sim.call(
        Method::POST,
        &format!("/v1/servers/{id}/actions/poweroff"),
        None,
    )
    .await;
    sim.get("/v1/servers?per_page=50").await;
    sim.get("/v1/servers?label_selector=a%3Db").await;
    sim.get("/v1/ssh_keys?label_selector=a").await;
    sim.get("/v1/ssh_keys?name=k").await;
    sim.get("/v1/nope").await;
    let stats = sim.stats().await;
    // Lists with a label selector are counted apart (lookups by name are not).
    assert_eq!(
        stats["labelled_lists"],
        json!({"GET /servers": 1, "GET /ssh_keys": 1})
    );
    let expected: BTreeMap<String, u64> = [
        ("POST /servers", 1),
        ("GET /servers/{id}", 3),
        ("POST /servers/{id}/actions/poweroff", 1),
        ("GET /servers", 2),
        ("GET /ssh_keys", 2),
        ("GET <unmatched>", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let got: BTreeMap<String, u64> = serde_json::from_value(stats["by_endpoint"].clone()).unwrap();
    assert_eq!(got, expected);
    assert_eq!(stats["total"], 10);
    assert_eq!(stats["rate_limited"], 0);

    assert_eq!(
        sim.hook("/__simulator/reset", None).await,
        StatusCode::NO_CONTENT
    );
    let stats = sim.stats().await;
    assert_eq!(stats["total"], 0);
    assert_eq!(stats["by_endpoint"], json!({}));
    // Reset zeroes counters only: the server is still there.
    assert_eq!(
        sim.get(&format!("/v1/servers/{id}")).await.status,
        StatusCode::OK
    );
    // The faults hook validates its input.
    for bad in [
        json!({"rate": 1.5}),
        json!({"rate": -0.1}),
        json!({}),
        json!({"rate": "x"}),
    ] {
        assert_eq!(
            sim.hook("/__simulator/faults", Some(bad.clone())).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad}"
        );
    }
    sim.sim.shutdown().await;
}

// -------------------------------------------------------------------------------------------------
// Faults

/// Classifies an answer by the fault it shows, from what a client can observe.
fn observed_fault(a: &Answer) -> String {
    match (a.status.as_u16(), a.code()) {
        (500, "server_error") => "server_error".into(),
        (503, "unavailable") => "unavailable".into(),
        (429, "rate_limit_exceeded") => "rate_limited".into(),
        (502, _) if a.text.is_some() => "bad_gateway_html".into(),
        (200 | 201, _) => a
            .header("x-simulator-fault")
            .unwrap_or_else(|| "none".into()),
        other => panic!("unexpected answer {other:?}: {}", a.body),
    }
}

async fn fault_sequence(seed: u64) -> Vec<String> {
    let sim = Sim::start(SimulatorConfig {
        fault_rate: 0.5,
        seed,
        fault_delay: Duration::from_millis(20),
        action_seconds: 0.0,
        ..SimulatorConfig::default()
    })
    .await;
    let mut kinds = Vec::new();
    for i in 0..40 {
        let a = if i % 4 == 0 {
            sim.post(
                "/v1/ssh_keys",
                json!({"name": format!("k{i}"), "public_key": "bad"}),
            )
            .await
        } else {
            sim.get("/v1/servers").await
        };
        if a.status == StatusCode::UNPROCESSABLE_ENTITY {
            kinds.push("none".into());
        } else {
            kinds.push(observed_fault(&a));
        }
    }
    sim.sim.shutdown().await;
    kinds
}

#[tokio::test]
async fn faults_are_reproducible_for_a_seed() {
    let first = fault_sequence(42).await;
    let second = fault_sequence(42).await;
    assert_eq!(first, second);
    let other = fault_sequence(43).await;
    assert_ne!(first, other);
    // At rate 0.5 over 40 requests both faults and clean answers occur, of several kinds.
    assert!(first.iter().any(|k| k == "none"));
    let mut distinct: Vec<&String> = first.iter().filter(|k| *k != "none").collect();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 3, "{first:?}");
}

#[tokio::test]
async fn faulted_requests_change_nothing_but_failed_actions_do_show() {
    let sim = Sim::start(SimulatorConfig {
        fault_rate: 1.0,
        seed: 7,
        fault_delay: Duration::from_millis(20),
        action_seconds: 0.0,
        ..SimulatorConfig::default()
    })
    .await;
    // Every request is faulted: error answers must leave no trace, "timeout" and "action_error"
    // create the server, the latter with actions that end in `error`.
    let mut expected_names = Vec::new();
    let mut failed_answers = 0;
    let mut failed_actions = Vec::new();
    for i in 0..30 {
        let name = format!("f-{i:02}");
        let r = sim
            .post(
                "/v1/servers",
                json!({"name": name, "server_type": "cx22", "image": "debian-12"}),
            )
            .await;
        if r.status == StatusCode::CREATED {
            let fault = r.header("x-simulator-fault").unwrap();
            if fault == "action_error" {
                assert_eq!(r.body["action"]["status"], "error");
                assert_eq!(r.body["action"]["error"]["code"], "action_failed");
                assert_eq!(r.body["server"]["status"], "off");
                failed_actions.push(r.body["action"]["id"].as_i64().unwrap());
            } else {
                assert_eq!(fault, "timeout");
                assert_eq!(r.body["server"]["status"], "running");
            }
            expected_names.push(name);
        } else {
            assert!(
                r.status.is_server_error() || r.status == StatusCode::TOO_MANY_REQUESTS,
                "{}",
                r.status
            );
            failed_answers += 1;
        }
    }
    assert!(failed_answers > 0 && !failed_actions.is_empty() && !expected_names.is_empty());
    assert_eq!(
        sim.hook("/__simulator/faults", Some(json!({"rate": 0.0})))
            .await,
        StatusCode::OK
    );
    let list = sim.get("/v1/servers?per_page=50").await;
    assert_eq!(names(&list.body, "servers"), expected_names);
    let query: Vec<String> = failed_actions.iter().map(|id| format!("id={id}")).collect();
    let actions = sim.get(&format!("/v1/actions?{}", query.join("&"))).await;
    for action in actions.body["actions"].as_array().unwrap() {
        assert_eq!(action["status"], "error");
        assert!(action["finished"].is_string());
    }
    let by_kind: BTreeMap<String, u64> =
        serde_json::from_value(sim.stats().await["faults"].clone()).unwrap();
    assert_eq!(by_kind.values().sum::<u64>(), 30, "{by_kind:?}");
    assert!(by_kind.contains_key("action_error") && by_kind.contains_key("timeout"));
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn invalid_configs_are_refused() {
    let cases = [
        SimulatorConfig {
            action_seconds: -1.0,
            ..SimulatorConfig::default()
        },
        SimulatorConfig {
            action_seconds: f64::NAN,
            ..SimulatorConfig::default()
        },
        SimulatorConfig {
            action_seconds: 1e30,
            ..SimulatorConfig::default()
        },
        SimulatorConfig {
            fault_rate: 1.5,
            ..SimulatorConfig::default()
        },
        SimulatorConfig {
            rate_limit: 0,
            ..SimulatorConfig::default()
        },
        SimulatorConfig {
            budget_time_scale: 0.0,
            ..SimulatorConfig::default()
        },
        SimulatorConfig {
            budget_time_scale: -2.0,
            ..SimulatorConfig::default()
        },
        SimulatorConfig {
            budget_time_scale: f64::NAN,
            ..SimulatorConfig::default()
        },
        SimulatorConfig {
            budget_time_scale: f64::INFINITY,
            ..SimulatorConfig::default()
        },
        SimulatorConfig {
            budget_time_scale: 1e9,
            ..SimulatorConfig::default()
        },
    ];
    for config in cases {
        let problem = config.validate().unwrap_err().to_string();
        let err = spawn(config.clone(), SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(err.to_string(), problem);
    }
    assert!(SimulatorConfig::default().validate().is_ok());
    let debug = format!(
        "{:?}",
        SimulatorConfig {
            token: Some("top-secret".into()),
            ..SimulatorConfig::default()
        }
    );
    assert!(!debug.contains("top-secret"), "{debug}");
}

/// The contract check itself must catch wrong shapes, or the walk above proves nothing.
#[tokio::test]
async fn contract_check_rejects_wrong_shapes() {
    let sim = Sim::instant().await;
    let created = sim.create_server("shape", json!({})).await;
    let fw = sim.post("/v1/firewalls", json!({"name": "shape"})).await;
    sim.sim.shutdown().await;
    let good_server = json!({"server": created["server"].clone()});
    Contract::get().check(&Method::GET, "/v1/servers/1", StatusCode::OK, &good_server);

    let mut bad_status = good_server.clone();
    bad_status["server"]["status"] = json!("sleeping");
    let mut missing_field = good_server.clone();
    missing_field["server"]
        .as_object_mut()
        .unwrap()
        .remove("locked");
    let mut extra_field = json!({"firewall": fw.body["firewall"].clone()});
    extra_field["firewall"]["colour"] = json!("red");
    let mut bad_time = good_server.clone();
    bad_time["server"]["created"] = json!("yesterday");
    let cases = [
        ("/v1/servers/1", StatusCode::OK, bad_status),
        ("/v1/servers/1", StatusCode::OK, missing_field),
        ("/v1/firewalls/1", StatusCode::OK, extra_field),
        ("/v1/servers/1", StatusCode::OK, bad_time),
        (
            "/v1/servers/1",
            StatusCode::NOT_FOUND,
            json!({"error": {"code": 1}}),
        ),
    ];
    for (path, status, body) in cases {
        let outcome = std::panic::catch_unwind(|| {
            Contract::get().check(&Method::GET, path, status, &body);
        });
        assert!(outcome.is_err(), "accepted a wrong body: {body}");
    }
}

#[tokio::test]
async fn change_type_needs_a_stopped_server_and_never_shrinks_the_disk() {
    let sim = Sim::instant().await;
    let created = sim.create_server("grow", json!({})).await;
    let id = created["server"]["id"].as_i64().unwrap();
    let change = |server_type: &'static str, upgrade_disk: bool| {
        let sim = &sim;
        async move {
            sim.post(
                &format!("/v1/servers/{id}/actions/change_type"),
                json!({"server_type": server_type, "upgrade_disk": upgrade_disk}),
            )
            .await
        }
    };
    assert_eq!(change("cx32", false).await.code(), "server_not_stopped");
    sim.call(
        Method::POST,
        &format!("/v1/servers/{id}/actions/poweroff"),
        None,
    )
    .await;
    let off = sim.get("/v1/servers?status=off").await;
    assert_eq!(names(&off.body, "servers"), ["grow"]);
    assert_eq!(
        sim.get("/v1/servers?status=running").await.body["servers"],
        json!([])
    );
    assert_eq!(
        sim.get("/v1/servers?status=sleeping").await.field_names(),
        ["status"]
    );

    let kept = change("cx32", false).await;
    assert_eq!(kept.status, StatusCode::CREATED, "{}", kept.body);
    assert_eq!(kept.body["action"]["command"], "change_server_type");
    let server = sim.get(&format!("/v1/servers/{id}")).await.body;
    assert_eq!(server["server"]["server_type"]["name"], "cx32");
    assert_eq!(server["server"]["primary_disk_size"], 40);
    assert_eq!(server["server"]["status"], "running");

    sim.call(
        Method::POST,
        &format!("/v1/servers/{id}/actions/poweroff"),
        None,
    )
    .await;
    assert_eq!(change("cax11", false).await.code(), "invalid_server_type");
    assert_eq!(change("cpx32", true).await.status, StatusCode::CREATED);
    let server = sim.get(&format!("/v1/servers/{id}")).await.body;
    assert_eq!(server["server"]["primary_disk_size"], 160);
    sim.call(
        Method::POST,
        &format!("/v1/servers/{id}/actions/poweroff"),
        None,
    )
    .await;
    assert_eq!(change("cx22", false).await.code(), "invalid_server_type");
    let missing = sim
        .post(
            &format!("/v1/servers/{id}/actions/change_type"),
            json!({"server_type": "nope"}),
        )
        .await;
    assert_eq!(missing.field_names(), ["server_type", "upgrade_disk"]);
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn a_delayed_answer_times_the_client_out_but_the_change_happened() {
    let sim = Sim::start(SimulatorConfig {
        fault_rate: 1.0,
        seed: 3,
        fault_delay: Duration::from_secs(30),
        action_seconds: 0.0,
        ..SimulatorConfig::default()
    })
    .await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let mut timed_out = None;
    for i in 0..40 {
        let name = format!("late-{i}");
        let sent = impatient
            .post(format!("{}/v1/servers", sim.root()))
            .json(&json!({"name": name, "server_type": "cx22", "image": "debian-12"}))
            .send()
            .await;
        if let Err(e) = sent {
            assert!(e.is_timeout(), "{e}");
            timed_out = Some(name);
            break;
        }
    }
    let name = timed_out.expect("no delayed answer in 40 faulted requests");
    assert_eq!(
        sim.hook("/__simulator/faults", Some(json!({"rate": 0.0})))
            .await,
        StatusCode::OK
    );
    let found = sim.get(&format!("/v1/servers?name={name}")).await;
    assert_eq!(names(&found.body, "servers"), [name.as_str()]);
    // Shutting down ends the held-back answer instead of waiting 30 s for it.
    let stopping = Instant::now();
    sim.sim.shutdown().await;
    assert!(stopping.elapsed() < Duration::from_secs(20));
}

// -------------------------------------------------------------------------------------------------
// Snapshots and sorting

#[tokio::test]
async fn snapshots_are_created_listed_updated_and_outlive_their_server() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 0.4,
        ..SimulatorConfig::default()
    })
    .await;
    let created = sim.create_server("snap-src", json!({})).await;
    let server_id = created["server"]["id"].as_i64().unwrap();
    sim.wait_for(
        &format!("/v1/servers/{server_id}"),
        "the server to be running and unlocked",
        |b| b["server"]["status"] == "running" && b["server"]["locked"] == false,
    )
    .await;

    // create_image: a snapshot, `creating` while its action runs; the server is locked.
    let path = format!("/v1/servers/{server_id}/actions/create_image");
    let snap = sim
        .post(
            &path,
            json!({"type": "snapshot", "description": "before upgrade",
                   "labels": {"vps-controller/instance": "t", "kind": "nightly"}}),
        )
        .await;
    assert_eq!(snap.status, StatusCode::CREATED, "{}", snap.body);
    let image = &snap.body["image"];
    let image_id = image["id"].as_i64().unwrap();
    assert_eq!(image["type"], "snapshot");
    assert_eq!(image["status"], "creating");
    assert_eq!(image["name"], Value::Null);
    assert_eq!(image["description"], "before upgrade");
    assert_eq!(
        image["created_from"],
        json!({"id": server_id, "name": "snap-src"})
    );
    assert_eq!(image["disk_size"], 40.0, "cx22 has a 40 GB disk");
    assert!(image["image_size"].as_f64().unwrap() > 0.0);
    assert_eq!(image["architecture"], "x86");
    assert_eq!(image["bound_to"], Value::Null);
    assert_eq!(
        image["labels"],
        json!({"vps-controller/instance": "t", "kind": "nightly"})
    );
    assert_eq!(snap.body["action"]["command"], "create_image");
    assert_eq!(snap.body["action"]["status"], "running");
    assert_eq!(
        snap.body["action"]["resources"],
        json!([{"id": server_id, "type": "server"}])
    );
    let server = sim.get(&format!("/v1/servers/{server_id}")).await;
    assert_eq!(server.body["server"]["locked"], true);
    let poweroff = sim
        .call(
            Method::POST,
            &format!("/v1/servers/{server_id}/actions/poweroff"),
            None,
        )
        .await;
    assert_eq!(poweroff.code(), "locked");
    assert_eq!(sim.post(&path, json!({})).await.code(), "locked");

    let action_id = snap.body["action"]["id"].as_i64().unwrap();
    sim.wait_for(
        &format!("/v1/actions/{action_id}"),
        "create_image to finish",
        |b| b["action"]["status"] == "success",
    )
    .await;
    let got = sim.get(&format!("/v1/images/{image_id}")).await;
    assert_eq!(got.body["image"]["status"], "available");
    assert_eq!(
        sim.get(&format!("/v1/servers/{server_id}")).await.body["server"]["locked"],
        false
    );

    // A second snapshot with defaults: type snapshot, a generated description.
    let second = sim.post(&path, json!({})).await;
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.body);
    let second_id = second.body["image"]["id"].as_i64().unwrap();
    assert_eq!(second.body["image"]["type"], "snapshot");
    assert!(
        second.body["image"]["description"]
            .as_str()
            .unwrap()
            .starts_with("snap-src-"),
        "{}",
        second.body["image"]
    );
    assert_eq!(second.body["image"]["labels"], json!({}));

    // Listing: type, label selector, status, sort, pagination; `name` matches system images only.
    let snapshots = sim.get("/v1/images?type=snapshot").await;
    assert_eq!(ids(&snapshots.body, "images"), [image_id, second_id]);
    let desc = sim.get("/v1/images?type=snapshot&sort=id:desc").await;
    assert_eq!(ids(&desc.body, "images"), [second_id, image_id]);
    let selected = sim
        .get("/v1/images?label_selector=kind%3Dnightly&type=snapshot")
        .await;
    assert_eq!(ids(&selected.body, "images"), [image_id]);
    let selected_any_type = sim.get("/v1/images?label_selector=kind").await;
    assert_eq!(ids(&selected_any_type.body, "images"), [image_id]);
    let creating = sim.get("/v1/images?type=snapshot&status=creating").await;
    assert_eq!(ids(&creating.body, "images"), [second_id]);
    let system = sim.get("/v1/images?type=system&per_page=50").await;
    assert!(!ids(&system.body, "images").contains(&image_id));
    let everything = sim.get("/v1/images?per_page=50").await;
    assert!(ids(&everything.body, "images").contains(&image_id));
    let paged = sim
        .get("/v1/images?type=snapshot&per_page=1&sort=id:asc")
        .await;
    assert_eq!(ids(&paged.body, "images"), [image_id]);
    assert_eq!(paged.body["meta"]["pagination"]["next_page"], 2);
    assert_eq!(paged.body["meta"]["pagination"]["total_entries"], 2);
    let by_name = sim.get("/v1/images?name=before%20upgrade").await;
    assert_eq!(by_name.body["images"], json!([]));
    let by_created = sim.get("/v1/images?sort=created:desc&per_page=2").await;
    assert_eq!(ids(&by_created.body, "images"), [second_id, image_id]);
    for bad in ["type=golden", "status=broken", "sort=size"] {
        assert_eq!(
            sim.get(&format!("/v1/images?{bad}")).await.code(),
            "invalid_input",
            "{bad}"
        );
    }

    // PUT: description and labels (replacing the map).
    let updated = sim
        .put(
            &format!("/v1/images/{image_id}"),
            json!({"description": "kept", "labels": {"keep": "yes"}}),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.body);
    assert_eq!(updated.body["image"]["description"], "kept");
    assert_eq!(updated.body["image"]["labels"], json!({"keep": "yes"}));
    let bad_put = sim
        .put(
            &format!("/v1/images/{image_id}"),
            json!({"labels": {"hetzner.cloud/x": "y"}, "type": "backup"}),
        )
        .await;
    assert_eq!(bad_put.code(), "invalid_input");
    assert_eq!(bad_put.field_names(), ["type", "labels"]);

    // Invalid create_image requests name their field; unknown servers are not_found.
    sim.wait_for(
        &format!("/v1/servers/{server_id}"),
        "the server to be unlocked",
        |b| b["server"]["locked"] == false,
    )
    .await;
    let table: &[(Value, &str)] = &[
        (json!({"type": "backup"}), "type"),
        (json!({"type": "golden"}), "type"),
        (json!({"description": 7}), "description"),
        (json!({"labels": {"bad key!": "x"}}), "labels"),
        (json!({"name": "snapshots have no name"}), "name"),
    ];
    for (body, field) in table {
        let r = sim.post(&path, body.clone()).await;
        assert_eq!(r.code(), "invalid_input", "{body}");
        assert_eq!(r.field_names(), [*field], "{body}");
    }
    assert_eq!(
        sim.post("/v1/servers/424242/actions/create_image", json!({}))
            .await
            .code(),
        "not_found"
    );

    // Deleting the server keeps its snapshots.
    let deleted = sim.delete(&format!("/v1/servers/{server_id}")).await;
    assert_eq!(deleted.status, StatusCode::OK);
    let kept = sim.get(&format!("/v1/images/{image_id}")).await;
    assert_eq!(kept.status, StatusCode::OK);
    assert_eq!(kept.body["image"]["created_from"]["id"], server_id);
    assert_eq!(
        ids(&sim.get("/v1/images?type=snapshot").await.body, "images"),
        [image_id, second_id]
    );

    // System images can't be changed or deleted; snapshots can; unknown IDs are not_found.
    let system_id = ids(&system.body, "images")[0];
    let r = sim.delete(&format!("/v1/images/{system_id}")).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "forbidden"));
    let r = sim
        .put(
            &format!("/v1/images/{system_id}"),
            json!({"description": "x"}),
        )
        .await;
    assert_eq!(r.code(), "forbidden");
    assert_eq!(
        sim.delete(&format!("/v1/images/{image_id}")).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        sim.get(&format!("/v1/images/{image_id}")).await.code(),
        "not_found"
    );
    assert_eq!(
        sim.delete(&format!("/v1/images/{image_id}")).await.code(),
        "not_found"
    );
    assert_eq!(sim.delete("/v1/images/999").await.code(), "not_found");
    assert_eq!(
        ids(&sim.get("/v1/images?type=snapshot").await.body, "images"),
        [second_id]
    );
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn a_failed_create_image_leaves_an_unavailable_snapshot() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 0.0,
        fault_rate: 0.0,
        // "Delayed answer" faults must not outlast the test client's timeout.
        fault_delay: Duration::from_millis(10),
        ..SimulatorConfig::default()
    })
    .await;
    let created = sim.create_server("s", json!({})).await;
    let id = created["server"]["id"].as_i64().unwrap();
    // Every request faults now; retry until the fault is the failed-action kind.
    assert_eq!(
        sim.hook("/__simulator/faults", Some(json!({"rate": 1.0})))
            .await,
        StatusCode::OK
    );
    let mut failed = None;
    for _ in 0..200 {
        let r = sim
            .post(&format!("/v1/servers/{id}/actions/create_image"), json!({}))
            .await;
        if r.status == StatusCode::CREATED {
            failed = Some(r.body);
            break;
        }
    }
    assert_eq!(
        sim.hook("/__simulator/faults", Some(json!({"rate": 0.0})))
            .await,
        StatusCode::OK
    );
    let body = failed.expect("no create_image got the action-error fault");
    let image_id = body["image"]["id"].as_i64().unwrap();
    let action = sim
        .get(&format!("/v1/actions/{}", body["action"]["id"]))
        .await;
    assert_eq!(action.body["action"]["status"], "error");
    let image = sim.get(&format!("/v1/images/{image_id}")).await;
    assert_eq!(image.body["image"]["status"], "unavailable");
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn every_list_sorts_by_id_both_ways() {
    let sim = Sim::instant().await;
    let mut server_ids = Vec::new();
    for name in ["a", "b"] {
        let s = sim.create_server(name, json!({})).await;
        server_ids.push(s["server"]["id"].as_i64().unwrap());
    }
    for (name, key) in [("k1", ED25519_KEY), ("k2", ECDSA_KEY)] {
        let r = sim
            .post("/v1/ssh_keys", json!({"name": name, "public_key": key}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    let mut firewall_ids = Vec::new();
    for name in ["f1", "f2"] {
        let r = sim.post("/v1/firewalls", json!({"name": name})).await;
        firewall_ids.push(r.body["firewall"]["id"].as_i64().unwrap());
    }
    for _ in 0..2 {
        sim.post(
            &format!("/v1/firewalls/{}/actions/set_rules", firewall_ids[0]),
            json!({"rules": []}),
        )
        .await;
    }
    for id in &server_ids {
        sim.post(&format!("/v1/servers/{id}/actions/create_image"), json!({}))
            .await;
    }
    sim.hook("/__simulator/reset", None).await;
    let lists = [
        ("/v1/servers", "servers"),
        ("/v1/ssh_keys", "ssh_keys"),
        ("/v1/firewalls", "firewalls"),
        ("/v1/images", "images"),
        ("/v1/locations", "locations"),
        ("/v1/servers/actions", "actions"),
        ("/v1/firewalls/actions", "actions"),
    ];
    let server_actions = format!("/v1/servers/{}/actions", server_ids[0]);
    let firewall_actions = format!("/v1/firewalls/{}/actions", firewall_ids[0]);
    let lists = lists
        .iter()
        .map(|(p, r)| (p.to_string(), *r))
        .chain([(server_actions, "actions"), (firewall_actions, "actions")]);
    for (path, root) in lists {
        let asc = ids(&sim.get(&format!("{path}?sort=id:asc")).await.body, root);
        assert!(asc.len() >= 2, "{path}: {asc:?}");
        assert!(asc.windows(2).all(|w| w[0] < w[1]), "{path}: {asc:?}");
        let plain = ids(&sim.get(&format!("{path}?sort=id")).await.body, root);
        assert_eq!(plain, asc, "{path}");
        let mut desc = ids(&sim.get(&format!("{path}?sort=id:desc")).await.body, root);
        desc.reverse();
        assert_eq!(desc, asc, "{path}");
    }
    // The stats hook tells sorted list requests apart (what client tests rely on).
    let stats = sim.stats().await;
    assert_eq!(stats["list_sorts"]["GET /images sort=id:asc"], 1);
    assert_eq!(
        stats["list_sorts"]["GET /servers/{id}/actions sort=id:desc"],
        1
    );
    sim.get("/v1/servers").await;
    assert_eq!(sim.stats().await["list_sorts"]["GET /servers unsorted"], 1);
    sim.sim.shutdown().await;
}

// -------------------------------------------------------------------------------------------------
// Targeted faults, black hole, limits

impl Sim {
    /// `METHOD /__simulator/faults` → (status, JSON body).
    async fn faults_hook(&self, method: Method, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}/__simulator/faults", self.root()));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Arms `faults` (replacing the list); returns the hook's state.
    async fn arm(&self, faults: Value) -> Value {
        let (status, state) = self
            .faults_hook(Method::POST, Some(json!({ "faults": faults })))
            .await;
        assert_eq!(status, StatusCode::OK, "{state}");
        state
    }

    async fn fault_counts(&self) -> BTreeMap<String, u64> {
        serde_json::from_value(self.stats().await["faults"].clone()).unwrap()
    }

    fn impatient(timeout: Duration) -> reqwest::Client {
        reqwest::Client::builder().timeout(timeout).build().unwrap()
    }
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[tokio::test]
async fn an_aimed_fault_hits_only_its_endpoint_until_its_count_runs_out() {
    let sim = Sim::instant().await;
    let state = sim
        .arm(json!([{"kind": "http_500", "endpoints": ["POST /servers"], "count": 2}]))
        .await;
    assert_eq!(
        state["faults"],
        json!([{"kind": "http_500", "endpoints": ["POST /servers"], "count": 2, "hits": 0, "remaining": 2}])
    );
    // GET /servers is left alone.
    let list = sim.get("/v1/servers").await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.header("x-simulator-fault"), None);
    let body = json!({"name": "aimed", "server_type": "cx22", "image": "debian-12"});
    for _ in 0..2 {
        let r = sim.post("/v1/servers", body.clone()).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.code(), "server_error");
        assert_eq!(r.header("x-simulator-fault").as_deref(), Some("http_500"));
    }
    // Exhausted: the third create goes through, and the failed ones left no trace.
    let r = sim.post("/v1/servers", body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(ids(&sim.get("/v1/servers").await.body, "servers").len(), 1);
    let (status, state) = sim.faults_hook(Method::GET, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(state["faults"][0]["hits"], 2);
    assert_eq!(state["faults"][0]["remaining"], 0);
    assert_eq!(state["black_hole"], false);
    assert_eq!(sim.fault_counts().await, counts(&[("http_500", 2)]));
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn each_error_kind_answers_like_hetzner_or_its_proxy() {
    let sim = Sim::instant().await;
    sim.arm(json!([
        {"kind": "http_500", "count": 1},
        {"kind": "http_502_html", "count": 1},
        {"kind": "http_503", "count": 1},
        {"kind": "http_429", "count": 1},
    ]))
    .await;
    // Armed faults apply in order, one request each.
    let r = sim.get("/v1/servers").await;
    assert_eq!((r.status.as_u16(), r.code()), (500, "server_error"));
    let r = sim.get("/v1/servers").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.text.as_deref().unwrap().contains("502 Bad Gateway"));
    assert_eq!(r.header("content-type").as_deref(), Some("text/html"));
    let r = sim.get("/v1/servers").await;
    assert_eq!((r.status.as_u16(), r.code()), (503, "unavailable"));
    let r = sim.get("/v1/servers").await;
    assert_eq!((r.status.as_u16(), r.code()), (429, "rate_limit_exceeded"));
    // An aimed 429 looks like an empty bucket: nothing left, full again in an hour.
    assert_eq!(r.header("ratelimit-limit").as_deref(), Some("3600"));
    assert_eq!(r.header("ratelimit-remaining").as_deref(), Some("0"));
    let reset: u64 = r.header("ratelimit-reset").unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        reset >= now + 3590 && reset <= now + 3610,
        "{reset} vs {now}"
    );
    let r = sim.get("/v1/servers").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        sim.fault_counts().await,
        counts(&[
            ("http_429", 1),
            ("http_500", 1),
            ("http_502_html", 1),
            ("http_503", 1)
        ])
    );
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn an_aimed_timeout_holds_the_answer_but_the_change_happens() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 0.0,
        fault_delay: Duration::from_secs(30),
        ..SimulatorConfig::default()
    })
    .await;
    sim.arm(json!([{"kind": "timeout", "endpoints": ["POST /ssh_keys"], "count": 1}]))
        .await;
    let sent = Sim::impatient(Duration::from_millis(400))
        .post(format!("{}/v1/ssh_keys", sim.root()))
        .json(&json!({"name": "late", "public_key": ED25519_KEY}))
        .send()
        .await;
    assert!(sent.is_err_and(|e| e.is_timeout()));
    let keys = sim.get("/v1/ssh_keys?name=late").await;
    assert_eq!(names(&keys.body, "ssh_keys"), ["late"]);
    assert_eq!(sim.fault_counts().await, counts(&[("timeout", 1)]));
    let stopping = Instant::now();
    sim.sim.shutdown().await;
    assert!(stopping.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn truncated_json_cuts_a_successful_answer_after_the_change() {
    let sim = Sim::instant().await;
    sim.arm(json!([{"kind": "truncated_json", "endpoints": ["POST /ssh_keys"]}]))
        .await;
    let r = sim
        .post(
            "/v1/ssh_keys",
            json!({"name": "cut", "public_key": ED25519_KEY}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let text = r.text.expect("the body must not parse as JSON");
    assert!(text.starts_with("{\"ssh_key\":"), "{text}");
    // The key was created all the same; other endpoints answer whole.
    let keys = sim.get("/v1/ssh_keys").await;
    assert_eq!(keys.status, StatusCode::OK);
    assert_eq!(names(&keys.body, "ssh_keys"), ["cut"]);
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn action_error_fails_only_the_actions_of_its_endpoint() {
    let sim = Sim::instant().await;
    let created = sim.create_server("fails", json!({})).await;
    let id = created["server"]["id"].as_i64().unwrap();
    // Without endpoints, action_error waits for a request that creates actions: reads don't
    // use it up.
    sim.arm(json!([
        {"kind": "action_error", "endpoints": ["POST /servers/{id}/actions/poweron"]},
        {"kind": "action_error", "count": 1, "endpoints": ["DELETE /servers/{id}", "GET /servers"]},
    ]))
    .await;
    assert_eq!(
        sim.get("/v1/servers").await.header("x-simulator-fault"),
        None
    );
    let off = sim
        .call(
            Method::POST,
            &format!("/v1/servers/{id}/actions/poweroff"),
            None,
        )
        .await;
    assert_eq!(off.body["action"]["status"], "success");
    for _ in 0..2 {
        let on = sim
            .call(
                Method::POST,
                &format!("/v1/servers/{id}/actions/poweron"),
                None,
            )
            .await;
        assert_eq!(on.status, StatusCode::CREATED);
        assert_eq!(
            on.header("x-simulator-fault").as_deref(),
            Some("action_error")
        );
        assert_eq!(on.body["action"]["status"], "error");
        assert_eq!(on.body["action"]["error"]["code"], "action_failed");
        assert!(on.body["action"]["error"]["message"].is_string());
    }
    assert_eq!(
        sim.get(&format!("/v1/servers/{id}")).await.body["server"]["status"],
        "off"
    );
    let (_, state) = sim.faults_hook(Method::GET, None).await;
    assert_eq!(state["faults"][0]["hits"], 2);
    assert_eq!(state["faults"][0]["remaining"], Value::Null);
    assert_eq!(state["faults"][1]["remaining"], 1);
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn a_stuck_server_stays_starting_until_the_fault_is_cleared() {
    let sim = Sim::instant().await;
    let off = sim
        .post(
            "/v1/servers",
            json!({"name": "later", "server_type": "cx22", "image": "debian-12", "start_after_create": false}),
        )
        .await;
    let off_id = off.body["server"]["id"].as_i64().unwrap();
    sim.arm(json!([{"kind": "server_stuck_starting"}])).await;
    let created = sim.create_server("stuck", json!({})).await;
    let id = created["server"]["id"].as_i64().unwrap();
    // The start that follows the create is what is held.
    let action = created["next_actions"][0]["id"].as_i64().unwrap();
    let on = sim
        .call(
            Method::POST,
            &format!("/v1/servers/{off_id}/actions/poweron"),
            None,
        )
        .await;
    assert_eq!(on.status, StatusCode::CREATED);
    let server = sim.get(&format!("/v1/servers/{id}")).await.body;
    assert_eq!(server["server"]["status"], "starting");
    let create = created["action"]["id"].as_i64().unwrap();
    assert_eq!(
        sim.get(&format!("/v1/actions/{create}")).await.body["action"]["status"],
        "success",
        "the create itself finishes"
    );
    assert_eq!(server["server"]["locked"], true);
    assert_eq!(
        sim.get(&format!("/v1/actions/{action}")).await.body["action"]["status"],
        "running"
    );
    let server = sim.get(&format!("/v1/servers/{off_id}")).await.body;
    assert_eq!(server["server"]["status"], "starting");
    assert_eq!(
        sim.fault_counts().await,
        counts(&[("server_stuck_starting", 2)])
    );

    // Clearing lets both carry on.
    let (status, state) = sim.faults_hook(Method::DELETE, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        state,
        json!({"rate": 0.0, "black_hole": false, "faults": []})
    );
    for server in [id, off_id] {
        let body = sim.get(&format!("/v1/servers/{server}")).await.body;
        assert_eq!(body["server"]["status"], "running", "{body}");
        assert_eq!(body["server"]["locked"], false);
    }
    let done = sim.get(&format!("/v1/actions/{action}")).await.body;
    assert_eq!(done["action"]["status"], "success");
    assert!(done["action"]["finished"].is_string());

    // `{"faults": []}` clears too.
    sim.arm(json!([{"kind": "server_stuck_starting", "count": 1}]))
        .await;
    let again = sim.create_server("stuck-again", json!({})).await;
    let again_id = again["server"]["id"].as_i64().unwrap();
    assert_eq!(again["server"]["status"], "starting");
    sim.arm(json!([])).await;
    assert_eq!(
        sim.get(&format!("/v1/servers/{again_id}")).await.body["server"]["status"],
        "running"
    );
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn the_black_hole_swallows_api_requests_while_the_hooks_answer() {
    let sim = Sim::instant().await;
    let (status, state) = sim
        .faults_hook(Method::POST, Some(json!({"black_hole": true})))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(state["black_hole"], true);
    let client = Sim::impatient(Duration::from_millis(300));
    let started = Instant::now();
    let sent = client
        .post(format!("{}/v1/ssh_keys", sim.root()))
        .json(&json!({"name": "void", "public_key": ED25519_KEY}))
        .send()
        .await;
    assert!(sent.is_err_and(|e| e.is_timeout()));
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The hooks keep answering.
    let stats = sim.stats().await;
    assert_eq!(stats["faults"]["black_hole"], 1);
    assert_eq!(stats["by_endpoint"]["POST /ssh_keys"], 1);
    let (status, state) = sim.faults_hook(Method::GET, None).await;
    assert_eq!(
        (status, &state["black_hole"]),
        (StatusCode::OK, &json!(true))
    );
    // Off again: answers come back, and the swallowed request changed nothing.
    sim.faults_hook(Method::POST, Some(json!({"black_hole": false})))
        .await;
    let answered = client
        .get(format!("{}/v1/ssh_keys", sim.root()))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), StatusCode::OK);
    let keys: Value = answered.json().await.unwrap();
    assert_eq!(keys["ssh_keys"], json!([]));
    let stopping = Instant::now();
    sim.sim.shutdown().await;
    assert!(stopping.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn the_faults_hook_checks_its_input_and_keeps_the_rate_form() {
    let sim = Sim::instant().await;
    for bad in [
        json!({"faults": [{"kind": "http_418"}]}),
        json!({"faults": [{"kind": "http_500", "count": 0}]}),
        json!({"faults": [{"kind": "http_500", "endpoints": []}]}),
        json!({"faults": [{"kind": "http_500", "endpoints": ["GET /servers/{server_id}"]}]}),
        json!({"faults": [{"kind": "http_500", "endpoints": ["PATCH /servers"]}]}),
        json!({"faults": [{"kind": "http_500", "often": true}]}),
        json!({"faults": {"kind": "http_500"}}),
        json!({"black_hole": "yes"}),
        json!({"rate": 0.5, "blackhole": true}),
    ] {
        let (status, body) = sim.faults_hook(Method::POST, Some(bad.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
        assert_eq!(body["error"]["code"], "invalid_input", "{bad}");
    }
    // Nothing was armed by the refused requests.
    let (_, state) = sim.faults_hook(Method::GET, None).await;
    assert_eq!(
        state,
        json!({"rate": 0.0, "black_hole": false, "faults": []})
    );
    // The rate form still works, and keys left out stay as they were.
    let (status, state) = sim
        .faults_hook(Method::POST, Some(json!({"rate": 0.25})))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(state["rate"], 0.25);
    let state = sim.arm(json!([{"kind": "http_503"}])).await;
    assert_eq!(state["rate"], 0.25);
    assert_eq!(state["faults"][0]["count"], Value::Null);
    let (_, state) = sim.faults_hook(Method::DELETE, None).await;
    assert_eq!(
        state,
        json!({"rate": 0.0, "black_hole": false, "faults": []})
    );
    assert_eq!(sim.get("/v1/servers").await.status, StatusCode::OK);
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn a_server_takes_at_most_five_firewalls_selectors_included() {
    let sim = Sim::instant().await;
    let server = sim.create_server("walled", json!({"role": "web"})).await;
    let id = server["server"]["id"].as_i64().unwrap();
    let on_server = json!([{"type": "server", "server": {"id": id}}]);
    let mut firewalls = Vec::new();
    for i in 0..4 {
        let r = sim
            .post(
                "/v1/firewalls",
                json!({"name": format!("fw{i}"), "apply_to": on_server}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        firewalls.push(r.body["firewall"]["id"].as_i64().unwrap());
    }
    // The fifth through a label selector.
    let r = sim
        .post(
            "/v1/firewalls",
            json!({"name": "by-label", "apply_to": [{"type": "label_selector", "label_selector": {"selector": "role=web"}}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let by_label = r.body["firewall"]["id"].as_i64().unwrap();
    let check_limited = |r: &Answer| {
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
        assert_eq!(r.code(), "resource_limit_exceeded");
        assert_eq!(
            r.body["error"]["details"]["limits"][0]["name"],
            "firewalls_per_server"
        );
    };
    // A sixth: at create, by apply_to_resources, or by a selector matching the server.
    check_limited(
        &sim.post(
            "/v1/firewalls",
            json!({"name": "sixth", "apply_to": on_server}),
        )
        .await,
    );
    let sixth = sim.post("/v1/firewalls", json!({"name": "sixth"})).await;
    let sixth = sixth.body["firewall"]["id"].as_i64().unwrap();
    let apply = format!("/v1/firewalls/{sixth}/actions/apply_to_resources");
    check_limited(&sim.post(&apply, json!({"apply_to": on_server})).await);
    check_limited(
        &sim.post(
            &apply,
            json!({"apply_to": [{"type": "label_selector", "label_selector": {"selector": "role"}}]}),
        )
        .await,
    );
    // A new server: five direct firewalls plus the selector's is six.
    let mut five: Vec<Value> = firewalls.iter().map(|f| json!({"firewall": f})).collect();
    five.push(json!({"firewall": sixth}));
    check_limited(
        &sim.post(
            "/v1/servers",
            json!({"name": "six", "server_type": "cx22", "image": "debian-12", "labels": {"role": "web"}, "firewalls": five}),
        )
        .await,
    );
    let ok = sim
        .post(
            "/v1/servers",
            json!({"name": "five", "server_type": "cx22", "image": "debian-12", "firewalls": five[1..]}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
    // Room again once one comes off.
    let removed = sim
        .post(
            &format!("/v1/firewalls/{by_label}/actions/remove_from_resources"),
            json!({"remove_from": [{"type": "label_selector", "label_selector": {"selector": "role=web"}}]}),
        )
        .await;
    assert_eq!(removed.status, StatusCode::CREATED, "{}", removed.body);
    let applied = sim.post(&apply, json!({"apply_to": on_server})).await;
    assert_eq!(applied.status, StatusCode::CREATED, "{}", applied.body);
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn the_server_quota_refuses_one_server_too_many() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 0.0,
        server_limit: 2,
        ..SimulatorConfig::default()
    })
    .await;
    let first = sim.create_server("q1", json!({})).await;
    sim.create_server("q2", json!({})).await;
    let third = sim
        .post(
            "/v1/servers",
            json!({"name": "q3", "server_type": "cx22", "image": "debian-12"}),
        )
        .await;
    assert_eq!(third.status, StatusCode::FORBIDDEN);
    assert_eq!(third.code(), "resource_limit_exceeded");
    assert_eq!(
        third.body["error"]["details"],
        json!({"limits": [{"name": "project_limit"}]})
    );
    assert_eq!(ids(&sim.get("/v1/servers").await.body, "servers").len(), 2);
    let id = first["server"]["id"].as_i64().unwrap();
    sim.delete(&format!("/v1/servers/{id}")).await;
    sim.create_server("q3", json!({})).await;
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn type_changes_rebuilds_and_snapshots_are_locked_while_an_action_runs() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 60.0,
        ..SimulatorConfig::default()
    })
    .await;
    let created = sim
        .post(
            "/v1/servers",
            json!({"name": "busy", "server_type": "cx22", "image": "debian-12", "start_after_create": false}),
        )
        .await;
    let id = created.body["server"]["id"].as_i64().unwrap();
    for (verb, body) in [
        (
            "change_type",
            json!({"server_type": "cx32", "upgrade_disk": false}),
        ),
        ("rebuild", json!({"image": "debian-12"})),
        ("create_image", json!({})),
        ("poweron", json!({})),
    ] {
        let r = sim
            .post(&format!("/v1/servers/{id}/actions/{verb}"), body)
            .await;
        assert_eq!(r.status, StatusCode::LOCKED, "{verb}: {}", r.body);
        assert_eq!(r.code(), "locked", "{verb}");
    }
    // Invalid input is still reported before the lock.
    let r = sim
        .post(&format!("/v1/servers/{id}/actions/change_type"), json!({}))
        .await;
    assert_eq!(r.code(), "invalid_input");
    sim.sim.shutdown().await;
}

// -------------------------------------------------------------------------------------------------
// Bounded memory: action retention

/// The action IDs an action-triggering answer carries (`action` and `next_actions`).
fn action_ids(body: &Value) -> Vec<i64> {
    let mut ids: Vec<i64> = body["action"]["id"].as_i64().into_iter().collect();
    if let Some(next) = body["next_actions"].as_array() {
        ids.extend(next.iter().map(|a| a["id"].as_i64().unwrap()));
    }
    ids
}

#[tokio::test]
async fn only_the_newest_finished_actions_are_kept() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 0.0,
        rate_limit: 1_000_000,
        max_finished_actions: 10,
        finished_action_min_age: Duration::ZERO,
        // Far away, so only the count bound applies.
        finished_action_retention: Duration::from_secs(86_400),
        ..SimulatorConfig::default()
    })
    .await;
    let created = sim.create_server("bounded", json!({})).await;
    let server = created["server"]["id"].as_i64().unwrap();
    let mut actions = action_ids(&created);
    for i in 0..1000 {
        let verb = if i % 2 == 0 { "poweroff" } else { "poweron" };
        let r = sim
            .call(
                Method::POST,
                &format!("/v1/servers/{server}/actions/{verb}"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{i}: {}", r.body);
        actions.extend(action_ids(&r.body));
    }
    assert_eq!(actions.len(), 1002);
    let (old, kept) = actions.split_at(actions.len() - 10);

    // Dropped actions are not_found everywhere, as if they never existed.
    for id in [old[0], old[1], old[500], old[old.len() - 1]] {
        let r = sim.get(&format!("/v1/actions/{id}")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{id}: {}", r.body);
        assert_eq!(r.code(), "not_found");
    }
    let query: Vec<String> = [old[0], kept[0], kept[9]]
        .iter()
        .map(|id| format!("id={id}"))
        .collect();
    let r = sim.get(&format!("/v1/actions?{}", query.join("&"))).await;
    assert_eq!(ids(&r.body, "actions"), vec![kept[0], kept[9]]);
    // The newest ten are all there, finished.
    for id in kept {
        let r = sim.get(&format!("/v1/actions/{id}")).await;
        assert_eq!(r.status, StatusCode::OK, "{id}");
        assert_eq!(r.body["action"]["status"], "success");
    }
    let listed = sim
        .get(&format!("/v1/servers/{server}/actions?per_page=50"))
        .await;
    assert_eq!(ids(&listed.body, "actions"), kept.to_vec());
    assert_eq!(listed.body["meta"]["pagination"]["total_entries"], 10);
    let stats = sim.stats().await;
    assert_eq!(stats["actions"], json!({"stored": 10, "running": 0}));
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn running_actions_are_never_dropped() {
    let sim = Sim::start(SimulatorConfig {
        // Nothing finishes during the test.
        action_seconds: 86_400.0,
        rate_limit: 1_000_000,
        max_finished_actions: 0,
        finished_action_min_age: Duration::ZERO,
        finished_action_retention: Duration::ZERO,
        ..SimulatorConfig::default()
    })
    .await;
    let mut actions = Vec::new();
    for i in 0..30 {
        let created = sim.create_server(&format!("r{i}"), json!({})).await;
        actions.extend(action_ids(&created));
    }
    assert_eq!(actions.len(), 60);
    for id in &actions {
        let r = sim.get(&format!("/v1/actions/{id}")).await;
        assert_eq!(r.status, StatusCode::OK, "{id}");
        assert_eq!(r.body["action"]["status"], "running");
    }
    assert_eq!(
        sim.stats().await["actions"],
        json!({"stored": 60, "running": 60})
    );
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn a_zero_retention_forgets_an_action_once_it_finished() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 0.0,
        finished_action_retention: Duration::ZERO,
        ..SimulatorConfig::default()
    })
    .await;
    // The answer that starts an action still shows it; the next request has forgotten it.
    let created = sim.create_server("gone", json!({})).await;
    let id = created["action"]["id"].as_i64().unwrap();
    assert_eq!(created["action"]["status"], "success");
    let r = sim.get(&format!("/v1/actions/{id}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "not_found");
    // Its effect was applied before it was dropped.
    let server = created["server"]["id"].as_i64().unwrap();
    let r = sim.get(&format!("/v1/servers/{server}")).await;
    assert_eq!(r.body["server"]["status"], "running");
    assert_eq!(r.body["server"]["locked"], false);
    sim.sim.shutdown().await;
}

/// The count bound never drops an action that finished moments ago: a client polling its
/// actions finds them however many others finished meanwhile.
#[tokio::test]
async fn the_count_bound_spares_actions_that_just_finished() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 0.0,
        rate_limit: 1_000_000,
        max_finished_actions: 10,
        ..SimulatorConfig::default()
    })
    .await;
    let created = sim.create_server("spared", json!({})).await;
    let server = created["server"]["id"].as_i64().unwrap();
    let mut actions = action_ids(&created);
    for i in 0..100 {
        let verb = if i % 2 == 0 { "poweroff" } else { "poweron" };
        let r = sim
            .call(
                Method::POST,
                &format!("/v1/servers/{server}/actions/{verb}"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{i}: {}", r.body);
        actions.extend(action_ids(&r.body));
    }
    let first = sim.get(&format!("/v1/actions/{}", actions[0])).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(sim.stats().await["actions"]["stored"], actions.len());
    sim.sim.shutdown().await;
}

/// An aimed action fault is spent only on a request that starts actions: a refused one (here
/// a power action on a server that does not exist) gives its hit back.
#[tokio::test]
async fn an_action_fault_is_not_spent_on_a_refused_request() {
    let sim = Sim::instant().await;
    let created = sim.create_server("target", json!({})).await;
    let server = created["server"]["id"].as_i64().unwrap();
    sim.arm(json!([{"kind": "action_error", "endpoints": ["POST /servers/{id}/actions/poweroff"], "count": 1}]))
        .await;
    let refused = sim
        .call(Method::POST, "/v1/servers/999999/actions/poweroff", None)
        .await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert_eq!(refused.headers.get("x-simulator-fault"), None);
    let hit = sim
        .call(
            Method::POST,
            &format!("/v1/servers/{server}/actions/poweroff"),
            None,
        )
        .await;
    assert_eq!(hit.status, StatusCode::CREATED);
    let action = hit.body["action"]["id"].as_i64().unwrap();
    let r = sim.get(&format!("/v1/actions/{action}")).await;
    assert_eq!(r.body["action"]["status"], "error", "{}", r.body);
    assert_eq!(sim.fault_counts().await, counts(&[("action_error", 1)]));
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn a_server_listing_shows_each_server_its_own_firewalls() {
    let sim = Sim::start(SimulatorConfig {
        action_seconds: 0.05,
        ..SimulatorConfig::default()
    })
    .await;
    let firewall = |name: &'static str, apply_to: Value| {
        let sim = &sim;
        async move {
            let made = sim
                .post("/v1/firewalls", json!({"name": name, "apply_to": apply_to}))
                .await;
            assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
            made.body["firewall"]["id"].as_i64().unwrap()
        }
    };
    let web = json!([{"type": "label_selector", "label_selector": {"selector": "tier=web"}}]);
    let direct = firewall("direct", json!([])).await;
    let by_label = firewall("by-label", web.clone()).await;
    let both = firewall("both", web).await;
    for (name, tier, firewalls) in [
        ("web-1", "web", vec![direct]),
        ("web-2", "web", vec![both]),
        ("db-1", "db", vec![direct]),
        ("plain", "none", vec![]),
    ] {
        let firewalls: Vec<Value> = firewalls.iter().map(|id| json!({"firewall": id})).collect();
        let made = sim
            .post(
                "/v1/servers",
                json!({"name": name, "server_type": "cx22", "image": "debian-12",
                       "labels": {"tier": tier}, "firewalls": firewalls}),
            )
            .await;
        assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    }
    let listing = sim
        .wait_for("/v1/servers?sort=id", "every firewall applied", |b| {
            !b.to_string().contains("pending")
        })
        .await;
    let applied = |ids: &[i64]| -> Value {
        ids.iter()
            .map(|id| json!({"id": id, "status": "applied"}))
            .collect()
    };
    let expected = [
        ("web-1", applied(&[direct, by_label, both])),
        ("web-2", applied(&[by_label, both])),
        ("db-1", applied(&[direct])),
        ("plain", applied(&[])),
    ];
    let servers = listing["servers"].as_array().unwrap();
    assert_eq!(servers.len(), expected.len());
    for (server, (name, firewalls)) in servers.iter().zip(expected) {
        assert_eq!(server["name"], name);
        assert_eq!(server["public_net"]["firewalls"], firewalls, "{name}");
        // One server asked for alone shows the same.
        let alone = sim.get(&format!("/v1/servers/{}", server["id"])).await;
        assert_eq!(
            alone.body["server"]["public_net"]["firewalls"], firewalls,
            "{name}"
        );
    }
    sim.sim.shutdown().await;
}
