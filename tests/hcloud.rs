//! The Hetzner Cloud client against the official spec (contract) and against the simulator.
//!
//! Contract tests read `openapi.json` from `$HCLOUD_OPENAPI`, or `../shared/hcloud/openapi.json`
//! next to the repository (where the workspace and CI keep it).

mod contract {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};
    use vps_controller::hcloud::*;

    fn spec() -> &'static Value {
        static SPEC: OnceLock<Value> = OnceLock::new();
        SPEC.get_or_init(|| {
            let candidates: Vec<PathBuf> = std::env::var_os("HCLOUD_OPENAPI")
                .map(PathBuf::from)
                .into_iter()
                .chain([
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/hcloud/openapi.json"),
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("shared/hcloud/openapi.json"),
                ])
                .collect();
            let path = candidates
                .iter()
                .find(|path| path.is_file())
                .unwrap_or_else(|| {
                    panic!("openapi.json not found; tried {candidates:?} (set HCLOUD_OPENAPI)")
                });
            let text = std::fs::read_to_string(path).unwrap();
            serde_json::from_str(&text).unwrap()
        })
    }

    fn operation(method: &str, path: &str) -> &'static Value {
        let op = &spec()["paths"][path][method];
        assert!(op.is_object(), "spec has no {method} {path}");
        op
    }

    type Decoder = fn(Value) -> Result<(), String>;

    fn decoder<T: DeserializeOwned>(value: Value) -> Result<(), String> {
        serde_json::from_value::<T>(value)
            .map(|_| ())
            .map_err(|err| err.to_string())
    }

    /// Every (method, path, success status) the client calls, with the type its answer
    /// decodes into. DELETE of SSH keys and firewalls answer 204 without a body.
    fn implemented() -> Vec<(&'static str, &'static str, &'static str, Option<Decoder>)> {
        vec![
            ("get", "/servers", "200", Some(decoder::<ServersPage>)),
            (
                "post",
                "/servers",
                "201",
                Some(decoder::<CreateServerResponse>),
            ),
            (
                "get",
                "/servers/{id}",
                "200",
                Some(decoder::<ServerEnvelope>),
            ),
            (
                "put",
                "/servers/{id}",
                "200",
                Some(decoder::<ServerEnvelope>),
            ),
            (
                "delete",
                "/servers/{id}",
                "200",
                Some(decoder::<ActionEnvelope>),
            ),
            (
                "post",
                "/servers/{id}/actions/poweron",
                "201",
                Some(decoder::<ActionEnvelope>),
            ),
            (
                "post",
                "/servers/{id}/actions/poweroff",
                "201",
                Some(decoder::<ActionEnvelope>),
            ),
            (
                "post",
                "/servers/{id}/actions/shutdown",
                "201",
                Some(decoder::<ActionEnvelope>),
            ),
            ("get", "/ssh_keys", "200", Some(decoder::<SshKeysPage>)),
            ("post", "/ssh_keys", "201", Some(decoder::<SshKeyEnvelope>)),
            (
                "get",
                "/ssh_keys/{id}",
                "200",
                Some(decoder::<SshKeyEnvelope>),
            ),
            (
                "put",
                "/ssh_keys/{id}",
                "200",
                Some(decoder::<SshKeyEnvelope>),
            ),
            ("delete", "/ssh_keys/{id}", "204", None),
            ("get", "/firewalls", "200", Some(decoder::<FirewallsPage>)),
            (
                "post",
                "/firewalls",
                "201",
                Some(decoder::<CreateFirewallResponse>),
            ),
            (
                "get",
                "/firewalls/{id}",
                "200",
                Some(decoder::<FirewallEnvelope>),
            ),
            (
                "put",
                "/firewalls/{id}",
                "200",
                Some(decoder::<FirewallEnvelope>),
            ),
            ("delete", "/firewalls/{id}", "204", None),
            (
                "post",
                "/firewalls/{id}/actions/set_rules",
                "201",
                Some(decoder::<ActionsEnvelope>),
            ),
            (
                "post",
                "/firewalls/{id}/actions/apply_to_resources",
                "201",
                Some(decoder::<ActionsEnvelope>),
            ),
            (
                "post",
                "/firewalls/{id}/actions/remove_from_resources",
                "201",
                Some(decoder::<ActionsEnvelope>),
            ),
            ("get", "/actions", "200", Some(decoder::<ActionsEnvelope>)),
            (
                "get",
                "/actions/{id}",
                "200",
                Some(decoder::<ActionEnvelope>),
            ),
        ]
    }

    /// Builds an instance of `schema` from its `example`s and types. `full`: every property,
    /// one element per array. Otherwise minimal: required properties only, `null` wherever
    /// allowed, empty arrays and maps — what a decoder must accept at the least.
    fn synthesize(schema: &Value, full: bool) -> Value {
        let types: Vec<&str> = match &schema["type"] {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !full && types.contains(&"null") {
            return Value::Null;
        }
        if let Some(values) = schema["enum"].as_array() {
            return values
                .iter()
                .find(|v| !v.is_null())
                .cloned()
                .unwrap_or(Value::Null);
        }
        let example = &schema["example"];
        let kind = types
            .iter()
            .copied()
            .find(|kind| *kind != "null")
            .unwrap_or(if schema["properties"].is_object() {
                "object"
            } else {
                "string"
            });
        match kind {
            "object" => match schema["properties"].as_object() {
                Some(properties) => {
                    let required: Vec<&str> = schema["required"]
                        .as_array()
                        .map(|names| names.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    Value::Object(
                        properties
                            .iter()
                            .filter(|(name, _)| full || required.contains(&name.as_str()))
                            .map(|(name, sub)| (name.clone(), synthesize(sub, full)))
                            .collect(),
                    )
                }
                None if full && example.is_object() => example.clone(),
                None if full => json!({"key": "value"}),
                None => json!({}),
            },
            "array" if full => json!([synthesize(&schema["items"], full)]),
            "array" => json!([]),
            "integer" if example.is_i64() => example.clone(),
            "integer" => json!(1),
            "number" if example.is_number() => example.clone(),
            "number" => json!(1.5),
            "boolean" if example.is_boolean() => example.clone(),
            "boolean" => json!(true),
            _ if example.is_string() => example.clone(),
            _ if schema["format"] == "date-time" => json!("2016-01-30T23:55:00Z"),
            _ => json!("text"),
        }
    }

    fn json_response<'a>(op: &'a Value, status: &str) -> Option<&'a Value> {
        let content = &op["responses"][status]["content"]["application/json"];
        content.is_object().then_some(content)
    }

    /// Named vectors for a response: the spec's examples, the schema's own example, and a
    /// full and a minimal instance synthesized from the schema.
    fn vectors(content: &Value) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        if let Some(examples) = content["examples"].as_object() {
            for (name, example) in examples {
                out.push((format!("example {name}"), example["value"].clone()));
            }
        }
        let schema = &content["schema"];
        if !schema["example"].is_null() {
            out.push(("schema example".into(), schema["example"].clone()));
        }
        out.push(("synthesized full".into(), synthesize(schema, true)));
        out.push((
            "synthesized minimal".into(),
            synthesize_minimal_answer(schema),
        ));
        out
    }

    /// Minimal answer: several envelopes (`{"server": ..}`, `{"action": ..}`, POST /firewalls)
    /// don't list their root key as required, yet the API always sends it, so root keys are
    /// kept and everything below them is minimal.
    fn synthesize_minimal_answer(schema: &Value) -> Value {
        match schema["properties"].as_object() {
            Some(properties) => Value::Object(
                properties
                    .iter()
                    .map(|(name, sub)| (name.clone(), synthesize(sub, false)))
                    .collect(),
            ),
            None => synthesize(schema, false),
        }
    }

    fn assert_valid(schema: &Value, instance: &Value, what: &str) {
        let validator = jsonschema::validator_for(schema).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|err| format!("{} at {}", err, err.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{what} does not match its schema: {errors:#?}\n{instance:#}"
        );
    }

    #[test]
    fn every_success_answer_of_the_implemented_endpoints_decodes() {
        let mut failures = Vec::new();
        let mut decoded = 0;
        let mut spec_examples = 0;
        for (method, path, status, decode) in implemented() {
            let op = operation(method, path);
            assert!(
                op["responses"][status].is_object(),
                "{method} {path} does not document {status}"
            );
            let Some(decode) = decode else {
                assert!(
                    json_response(op, status).is_none(),
                    "{method} {path} {status} has a JSON body now"
                );
                continue;
            };
            let content = json_response(op, status)
                .unwrap_or_else(|| panic!("{method} {path} {status} has no JSON body"));
            for (name, value) in vectors(content) {
                if name.starts_with("synthesized") {
                    // The synthesizer itself must produce what the spec describes.
                    assert_valid(
                        &content["schema"],
                        &value,
                        &format!("{method} {path} {name}"),
                    );
                } else {
                    spec_examples += 1;
                }
                match decode(value) {
                    Ok(()) => decoded += 1,
                    Err(err) => failures.push(format!("{method} {path} {status} {name}: {err}")),
                }
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
        // 23 operations × 2 synthesized + the spec's own examples (POST /servers, the firewall
        // actions, the server power actions, PUT /ssh_keys/{id}).
        assert!(decoded >= 21 * 2 + spec_examples, "{decoded}");
        assert!(
            spec_examples >= 8,
            "only {spec_examples} spec examples found"
        );
    }

    #[test]
    fn every_error_answer_of_the_implemented_endpoints_decodes() {
        let mut checked = 0;
        for (method, path, _, _) in implemented() {
            let op = operation(method, path);
            for (status, _) in op["responses"].as_object().unwrap() {
                if status.starts_with('2') {
                    continue;
                }
                let content = json_response(op, status)
                    .unwrap_or_else(|| panic!("{method} {path} {status} has no JSON body"));
                for (name, value) in vectors(content) {
                    let body: ErrorBody = serde_json::from_value(value.clone())
                        .unwrap_or_else(|err| panic!("{method} {path} {status} {name}: {err}"));
                    assert!(!body.error.code.is_empty() || name.starts_with("synth"));
                    checked += 1;
                }
            }
        }
        assert!(checked >= 23 * 2 * 3, "{checked}");
    }

    /// Other action-returning endpoints we don't call still exercise the Action type with
    /// real examples (reboot, rebuild, change_type, ...).
    #[test]
    fn every_action_example_in_the_spec_decodes() {
        let mut checked = 0;
        for (path, item) in spec()["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let Some(responses) = op["responses"].as_object() else {
                    continue;
                };
                for (status, response) in responses {
                    let content = &response["content"]["application/json"];
                    let Some(examples) = content["examples"].as_object() else {
                        continue;
                    };
                    for (name, example) in examples {
                        let value = &example["value"];
                        // (POST /certificates documents `"action": null`.)
                        let result = if value["action"].is_object() {
                            decoder::<ActionEnvelope>(value.clone())
                        } else if value.get("actions").is_some() {
                            decoder::<ActionsEnvelope>(value.clone())
                        } else {
                            continue;
                        };
                        result
                            .unwrap_or_else(|err| panic!("{method} {path} {status} {name}: {err}"));
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked >= 30, "{checked}");
    }

    #[test]
    fn the_create_server_example_decodes_to_the_documented_values() {
        let op = operation("post", "/servers");
        let value =
            op["responses"]["201"]["content"]["application/json"]["examples"]["default"]["value"]
                .clone();
        let created: CreateServerResponse = serde_json::from_value(value).unwrap();
        assert_eq!(created.server.id, 42);
        assert_eq!(created.server.status, ServerStatus::Initializing);
        assert_eq!(
            created.server.public_net.ipv4.as_ref().unwrap().ip,
            "1.2.3.4"
        );
        assert_eq!(
            created.server.public_net.ipv6.as_ref().unwrap().ip,
            "2001:db8::/64"
        );
        assert_eq!(
            created.server.public_net.firewalls,
            vec![ServerFirewall {
                id: 38,
                status: ServerFirewallStatus::Applied
            }]
        );
        assert_eq!(created.server.server_type.name, "cpx22");
        assert_eq!(created.server.location.name, "fsn1");
        assert_eq!(
            created.server.image.as_ref().unwrap().name.as_deref(),
            Some("ubuntu-24.04")
        );
        assert_eq!(created.action.status, ActionStatus::Running);
        assert_eq!(created.action_ids(), vec![1, 13]);
        assert_eq!(
            created.root_password.as_deref(),
            Some("YItygq1v3GYjjMomLaKc")
        );
        let printed = format!("{created:?}");
        assert!(
            !printed.contains("YItygq1v3GYjjMomLaKc"),
            "root password in Debug output"
        );
    }

    #[test]
    fn minimal_answers_map_nulls_to_none() {
        let content = json_response(operation("get", "/servers/{id}"), "200").unwrap();
        let minimal = synthesize_minimal_answer(&content["schema"]);
        let server = serde_json::from_value::<ServerEnvelope>(minimal)
            .unwrap()
            .server;
        assert!(server.image.is_none());
        assert!(server.public_net.ipv4.is_none());
        assert!(server.public_net.ipv6.is_none());
        assert!(server.public_net.firewalls.is_empty());

        let content = json_response(operation("get", "/actions/{id}"), "200").unwrap();
        let action =
            serde_json::from_value::<ActionEnvelope>(synthesize(&content["schema"], false))
                .unwrap()
                .action;
        assert!(action.finished.is_none() && action.error.is_none());
    }

    #[test]
    fn unknown_enum_values_and_extra_fields_do_not_break_decoding() {
        let content = json_response(operation("get", "/servers/{id}"), "200").unwrap();
        let mut value = synthesize(&content["schema"], true);
        value["server"]["status"] = json!("hibernating");
        value["server"]["brand_new_field"] = json!({"x": 1});
        value["server"]["public_net"]["firewalls"] = json!([{"id": 7, "status": "exploding"}]);
        let server = serde_json::from_value::<ServerEnvelope>(value)
            .unwrap()
            .server;
        assert_eq!(server.status, ServerStatus::Unknown);
        assert_eq!(
            server.public_net.firewalls[0].status,
            ServerFirewallStatus::Unknown
        );
    }

    fn request_schema(method: &str, path: &str) -> Value {
        let mut schema =
            operation(method, path)["requestBody"]["content"]["application/json"]["schema"].clone();
        assert!(
            schema.is_object(),
            "{method} {path} has no JSON request body"
        );
        if path == "/servers" && method == "post" {
            // The schema types ssh_keys items as strings, but its description says "SSH key IDs
            // (`integer`) or names (`string`)" and hcloud-go sends integers.
            schema["properties"]["ssh_keys"]["items"] = json!({"type": ["integer", "string"]});
        }
        schema
    }

    fn rules() -> Vec<FirewallRule> {
        vec![
            FirewallRule {
                direction: FirewallDirection::In,
                protocol: FirewallProtocol::Tcp,
                port: Some("22".into()),
                source_ips: vec!["0.0.0.0/0".into(), "::/0".into()],
                destination_ips: vec![],
                description: Some("ssh".into()),
            },
            FirewallRule {
                direction: FirewallDirection::In,
                protocol: FirewallProtocol::Icmp,
                port: None,
                source_ips: vec!["0.0.0.0/0".into()],
                destination_ips: vec![],
                description: None,
            },
            FirewallRule {
                direction: FirewallDirection::Out,
                protocol: FirewallProtocol::Udp,
                port: Some("1024-5000".into()),
                source_ips: vec![],
                destination_ips: vec!["192.0.2.0/24".into()],
                description: None,
            },
        ]
    }

    fn labels() -> Labels {
        BTreeMap::from([
            ("vps-controller/instance".to_string(), "test".to_string()),
            (
                "vps-controller/subscription".to_string(),
                "sub-1".to_string(),
            ),
        ])
    }

    #[test]
    fn requests_serialize_to_what_the_spec_accepts() {
        let full_server = CreateServer {
            name: "vps-sub-1".into(),
            server_type: "cpx22".into(),
            image: "ubuntu-24.04".into(),
            location: Some("fsn1".into()),
            ssh_keys: vec![17],
            firewalls: vec![CreateServerFirewall { firewall: 38 }],
            labels: labels(),
            user_data: Some("#cloud-config\nruncmd: [echo hi]\n".into()),
            start_after_create: Some(true),
            public_net: Some(CreateServerPublicNet {
                enable_ipv4: true,
                enable_ipv6: false,
                ipv4: None,
                ipv6: None,
            }),
        };
        let minimal_server = CreateServer {
            name: "vps-sub-2".into(),
            server_type: "cpx22".into(),
            image: "ubuntu-24.04".into(),
            location: None,
            ssh_keys: vec![],
            firewalls: vec![],
            labels: Labels::new(),
            user_data: None,
            start_after_create: None,
            public_net: None,
        };
        let cases: Vec<(&str, &str, Value)> = vec![
            (
                "post",
                "/servers",
                serde_json::to_value(&full_server).unwrap(),
            ),
            (
                "post",
                "/servers",
                serde_json::to_value(&minimal_server).unwrap(),
            ),
            (
                "post",
                "/ssh_keys",
                serde_json::to_value(CreateSshKey {
                    name: "vps-sub-1".into(),
                    public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG vps".into(),
                    labels: labels(),
                })
                .unwrap(),
            ),
            (
                "post",
                "/firewalls",
                serde_json::to_value(CreateFirewall {
                    name: "vps-sub-1".into(),
                    labels: labels(),
                    rules: rules(),
                    apply_to: vec![FirewallResource::server(42)],
                })
                .unwrap(),
            ),
            (
                "post",
                "/firewalls",
                serde_json::to_value(CreateFirewall {
                    name: "vps-sub-2".into(),
                    labels: Labels::new(),
                    rules: vec![],
                    apply_to: vec![FirewallResource::label_selector("env=prod")],
                })
                .unwrap(),
            ),
            (
                "put",
                "/servers/{id}",
                serde_json::to_value(UpdateLabels { labels: &labels() }).unwrap(),
            ),
            (
                "put",
                "/ssh_keys/{id}",
                serde_json::to_value(UpdateLabels { labels: &labels() }).unwrap(),
            ),
            (
                "put",
                "/firewalls/{id}",
                serde_json::to_value(UpdateLabels { labels: &labels() }).unwrap(),
            ),
            (
                "post",
                "/firewalls/{id}/actions/set_rules",
                serde_json::to_value(SetRules { rules: &rules() }).unwrap(),
            ),
            (
                "post",
                "/firewalls/{id}/actions/set_rules",
                serde_json::to_value(SetRules { rules: &[] }).unwrap(),
            ),
            (
                "post",
                "/firewalls/{id}/actions/apply_to_resources",
                serde_json::to_value(ApplyTo {
                    apply_to: vec![FirewallResource::server(1)],
                })
                .unwrap(),
            ),
            (
                "post",
                "/firewalls/{id}/actions/remove_from_resources",
                serde_json::to_value(RemoveFrom {
                    remove_from: vec![FirewallResource::server(1)],
                })
                .unwrap(),
            ),
        ];
        for (method, path, body) in cases {
            assert_valid(
                &request_schema(method, path),
                &body,
                &format!("{method} {path} request"),
            );
        }
        // `set_rules` with no rules must still send `"rules": []` (it clears them).
        assert_eq!(
            serde_json::to_value(SetRules { rules: &[] }).unwrap(),
            json!({"rules": []})
        );
        // Server type, image and SSH key IDs go out as the spec's example shows.
        let body = serde_json::to_value(&full_server).unwrap();
        assert_eq!(body["server_type"], "cpx22");
        assert_eq!(body["ssh_keys"], json!([17]));
        assert_eq!(body["firewalls"], json!([{"firewall": 38}]));
    }

    #[test]
    fn the_spec_request_examples_round_trip_through_our_types() {
        let example = |method: &str, path: &str| {
            operation(method, path)["requestBody"]["content"]["application/json"]["examples"]
                ["default"]["value"]
                .clone()
        };
        let create = example("post", "/firewalls");
        let parsed: CreateFirewall = serde_json::from_value(create.clone()).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), create);

        let set_rules = example("post", "/firewalls/{id}/actions/set_rules");
        let parsed: Vec<FirewallRule> = serde_json::from_value(set_rules["rules"].clone()).unwrap();
        assert_eq!(
            serde_json::to_value(SetRules { rules: &parsed }).unwrap(),
            set_rules
        );

        let apply = example("post", "/firewalls/{id}/actions/apply_to_resources");
        let parsed: Vec<FirewallResource> =
            serde_json::from_value(apply["apply_to"].clone()).unwrap();
        assert_eq!(
            serde_json::to_value(ApplyTo { apply_to: parsed }).unwrap(),
            apply
        );

        let remove = example("post", "/firewalls/{id}/actions/remove_from_resources");
        let parsed: Vec<FirewallResource> =
            serde_json::from_value(remove["remove_from"].clone()).unwrap();
        assert_eq!(
            serde_json::to_value(RemoveFrom {
                remove_from: parsed
            })
            .unwrap(),
            remove
        );
    }

    #[test]
    fn create_server_debug_hides_user_data() {
        let request = CreateServer {
            name: "vps".into(),
            server_type: "cpx22".into(),
            image: "ubuntu-24.04".into(),
            location: None,
            ssh_keys: vec![],
            firewalls: vec![],
            labels: Labels::new(),
            user_data: Some("#cloud-config\nsecret: do-not-print\n".into()),
            start_after_create: None,
            public_net: None,
        };
        let printed = format!("{request:?}");
        assert!(!printed.contains("do-not-print"), "{printed}");
        assert!(printed.contains("redacted"), "{printed}");
    }
}
