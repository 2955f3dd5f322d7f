//! The Hetzner Cloud client against the official spec (contract) and against the simulator.
//!
//! Contract tests read `openapi.json` from `$HCLOUD_OPENAPI`, or `../shared/hcloud/openapi.json`
//! next to the repository (where the workspace and CI keep it).
//!
//! Contract coverage: for the 29 operations the client calls, every response example, every
//! schema-level example, and a full and a minimal instance synthesized from each response schema
//! (4xx/5xx included) decode; requests validate against the request schemas. Skipped: the other
//! 160 operations (volumes, other server actions, ...) because the client does not call
//! them — except that every action-shaped example in the whole spec is decoded as an Action —
//! and the 204 answers of DELETE /ssh_keys/{id}, /firewalls/{id} and /images/{id}, which have
//! no body.
//! One deliberate deviation: `ssh_keys` items of POST /servers are typed `string` in the
//! schema, but its description allows integer IDs (what hcloud-go sends), so the test widens it.

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
                "post",
                "/servers/{id}/actions/create_image",
                "201",
                Some(decoder::<CreateImageResponse>),
            ),
            ("get", "/images", "200", Some(decoder::<ImagesPage>)),
            ("get", "/images/{id}", "200", Some(decoder::<ImageEnvelope>)),
            ("delete", "/images/{id}", "204", None),
            (
                "get",
                "/server_types",
                "200",
                Some(decoder::<ServerTypesPage>),
            ),
            ("get", "/locations", "200", Some(decoder::<LocationsPage>)),
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
        // 26 operations with a body × 2 synthesized + the spec's own examples (POST /servers, the
        // firewall actions, the server power actions, PUT /ssh_keys/{id}, create_image).
        assert!(decoded >= 26 * 2 + spec_examples, "{decoded}");
        assert!(
            spec_examples >= 9,
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
        assert!(checked >= 29 * 2 * 3, "{checked}");
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
        assert_eq!(
            created.actions(),
            vec![
                ActionRef {
                    id: 1,
                    on_server: true
                },
                ActionRef {
                    id: 13,
                    on_server: true
                }
            ]
        );
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
            (
                "post",
                "/servers/{id}/actions/create_image",
                serde_json::to_value(CreateImage {
                    kind: ImageType::Snapshot,
                    description: Some("nightly".into()),
                    labels: labels(),
                })
                .unwrap(),
            ),
            (
                "post",
                "/servers/{id}/actions/create_image",
                serde_json::to_value(CreateImage {
                    kind: ImageType::Snapshot,
                    description: None,
                    labels: Labels::new(),
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
    fn the_create_image_example_decodes_to_the_documented_values() {
        let op = operation("post", "/servers/{id}/actions/create_image");
        let value =
            op["responses"]["201"]["content"]["application/json"]["examples"]["default"]["value"]
                .clone();
        let created: CreateImageResponse = serde_json::from_value(value).unwrap();
        assert_eq!(created.image.id, 4711);
        assert_eq!(created.image.kind, ImageType::Snapshot);
        assert_eq!(created.image.status, ImageStatus::Creating);
        assert_eq!(created.image.name, None);
        assert_eq!(
            created.image.created_from,
            Some(ImageCreatedFrom {
                id: 1,
                name: "Server".into()
            })
        );
        assert_eq!(created.image.architecture, Architecture::X86);
        assert_eq!(created.image.image_size, Some(2.3));
        assert_eq!(created.action.command, "create_image");
        // Unknown enum values don't break decoding.
        let mut odd = serde_json::to_value(&created.image).unwrap();
        odd["type"] = json!("golden");
        odd["status"] = json!("melting");
        odd["architecture"] = json!("riscv");
        let odd: Image = serde_json::from_value(odd).unwrap();
        assert_eq!(
            (odd.kind, odd.status, odd.architecture),
            (
                ImageType::Unknown,
                ImageStatus::Unknown,
                Architecture::Unknown
            )
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

mod against_simulator {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use base64::Engine;
    use serde_json::Value;
    use vps_controller::hcloud::*;
    use vps_controller::simulator::{RunningSimulator, SimulatorConfig, spawn};

    const TOKEN: &str = "sim-token";

    async fn simulator(config: SimulatorConfig) -> RunningSimulator {
        let _ = rustls::crypto::ring::default_provider().install_default();
        spawn(
            SimulatorConfig {
                token: Some(TOKEN.into()),
                ..config
            },
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap()
    }

    /// Fast retry and poll timings so tests take milliseconds, not minutes.
    fn config(sim: &RunningSimulator) -> ClientConfig {
        ClientConfig {
            timeout: Duration::from_secs(5),
            retry_backoff: RetryBackoff {
                base: Duration::from_millis(5),
                cap: Duration::from_millis(40),
            },
            action_poll: ActionPollBackoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(100),
                factor: 1.5,
            },
            max_budget_wait: Duration::from_secs(2),
            ..ClientConfig::new(sim.base_url(), Token::new(TOKEN))
        }
    }

    fn client(sim: &RunningSimulator) -> Client {
        Client::new(config(sim)).unwrap()
    }

    async fn stats(sim: &RunningSimulator) -> Value {
        reqwest::get(format!("http://{}/__simulator/stats", sim.addr()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn post_control(sim: &RunningSimulator, hook: &str, body: Value) {
        let status = reqwest::Client::new()
            .post(format!("http://{}/__simulator/{hook}", sim.addr()))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "{hook}: {status}");
    }

    /// Arms one fault of `kind` for the next request to `endpoint` (`"POST /servers"`).
    async fn fault_once(sim: &RunningSimulator, kind: &str, endpoint: &str) {
        let fault = serde_json::json!({"kind": kind, "endpoints": [endpoint], "count": 1});
        post_control(sim, "faults", serde_json::json!({ "faults": [fault] })).await;
    }

    fn requests_to(stats: &Value, endpoint: &str) -> u64 {
        stats["by_endpoint"][endpoint].as_u64().unwrap_or(0)
    }

    /// A syntactically valid ed25519 public key, distinct per `seed`.
    fn public_key(seed: u32) -> String {
        let mut blob = Vec::new();
        blob.extend(11u32.to_be_bytes());
        blob.extend(b"ssh-ed25519");
        blob.extend(32u32.to_be_bytes());
        let mut key = [7u8; 32];
        key[..4].copy_from_slice(&seed.to_be_bytes());
        blob.extend(key);
        let encoded = base64::engine::general_purpose::STANDARD.encode(blob);
        format!("ssh-ed25519 {encoded} test-{seed}")
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ssh_rule() -> FirewallRule {
        FirewallRule {
            direction: FirewallDirection::In,
            protocol: FirewallProtocol::Tcp,
            port: Some("22".into()),
            source_ips: vec!["0.0.0.0/0".into(), "::/0".into()],
            destination_ips: vec![],
            description: Some("ssh".into()),
        }
    }

    fn server_request(name: &str, ssh_key: i64, firewall: i64, owner: &Labels) -> CreateServer {
        CreateServer {
            name: name.into(),
            server_type: "cpx22".into(),
            image: "ubuntu-24.04".into(),
            location: Some("fsn1".into()),
            ssh_keys: vec![ssh_key],
            firewalls: vec![CreateServerFirewall { firewall }],
            labels: owner.clone(),
            user_data: Some("#cloud-config\npackages: [htop]\n".into()),
            start_after_create: Some(true),
            public_net: None,
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    /// How the executor uses the client: generically, inside spawned tasks.
    async fn names_of<A: HcloudApi>(api: &A, selector: &str) -> Result<Vec<String>, Error> {
        let servers = api.list_servers(selector).await?;
        Ok(servers.into_iter().map(|s| s.name).collect())
    }

    #[tokio::test]
    async fn every_trait_call_works_against_the_simulator() {
        let sim = simulator(SimulatorConfig {
            action_seconds: 0.05,
            ..Default::default()
        })
        .await;
        let api = client(&sim);
        let owner = labels(&[
            ("vps-controller/instance", "t1"),
            ("vps-controller/subscription", "s1"),
        ]);

        // SSH key: create, find by name / fingerprint / selector, relabel.
        let key = api
            .create_ssh_key(&CreateSshKey {
                name: "vps-s1".into(),
                public_key: public_key(1),
                labels: owner.clone(),
            })
            .await
            .unwrap();
        assert_eq!(key.labels, owner);
        assert_eq!(
            api.ssh_key_by_name("vps-s1").await.unwrap(),
            Some(key.clone())
        );
        assert_eq!(
            api.ssh_key_by_fingerprint(&key.fingerprint)
                .await
                .unwrap()
                .map(|k| k.id),
            Some(key.id)
        );
        assert_eq!(api.ssh_key_by_name("nope").await.unwrap(), None);
        assert_eq!(
            api.list_ssh_keys("vps-controller/instance=t1")
                .await
                .unwrap(),
            vec![key.clone()]
        );
        assert!(
            api.list_ssh_keys("vps-controller/instance=other")
                .await
                .unwrap()
                .is_empty()
        );
        let mut relabeled = owner.clone();
        relabeled.insert("extra".into(), "1".into());
        let key = api.update_ssh_key_labels(key.id, &relabeled).await.unwrap();
        assert_eq!(key.labels, relabeled);
        assert_eq!(api.get_ssh_key(key.id).await.unwrap().labels, relabeled);

        // Firewall.
        let created = api
            .create_firewall(&CreateFirewall {
                name: "vps-s1".into(),
                labels: owner.clone(),
                rules: vec![ssh_rule()],
                apply_to: vec![],
            })
            .await
            .unwrap();
        let firewall = created.firewall;
        assert_eq!(firewall.rules, vec![ssh_rule()]);
        assert_eq!(
            api.firewall_by_name("vps-s1").await.unwrap().map(|f| f.id),
            Some(firewall.id)
        );
        assert_eq!(
            api.list_firewalls("vps-controller/subscription=s1")
                .await
                .unwrap()
                .len(),
            1
        );

        // Server with key, firewall, labels and user_data; wait for all of its actions.
        let created = api
            .create_server(&server_request("vps-s1", key.id, firewall.id, &owner))
            .await
            .unwrap();
        assert_eq!(created.server.name, "vps-s1");
        assert_eq!(created.root_password, None, "created with an SSH key");
        let actions = created.actions();
        let done = api.wait_for_actions(&actions, WAIT).await.unwrap();
        assert_eq!(
            done.iter().map(|a| a.id).collect::<Vec<_>>(),
            actions.iter().map(|a| a.id).collect::<Vec<_>>()
        );
        assert!(
            done.iter()
                .all(|a| a.status == ActionStatus::Success && a.finished.is_some())
        );
        let server = api.get_server(created.server.id).await.unwrap();
        assert_eq!(server.status, ServerStatus::Running);
        assert_eq!(server.labels, owner);
        assert!(server.public_net.ipv4.is_some());
        assert_eq!(
            server
                .public_net
                .firewalls
                .iter()
                .map(|f| f.id)
                .collect::<Vec<_>>(),
            vec![firewall.id]
        );
        assert_eq!(
            api.server_by_name("vps-s1").await.unwrap().map(|s| s.id),
            Some(server.id)
        );
        assert_eq!(api.server_by_name("vps-s2").await.unwrap(), None);
        let spawned = tokio::spawn({
            let api = api.clone();
            async move { names_of(&api, "vps-controller/instance=t1").await }
        });
        assert_eq!(spawned.await.unwrap().unwrap(), vec!["vps-s1".to_string()]);
        let server = api
            .update_server_labels(server.id, &relabeled)
            .await
            .unwrap();
        assert_eq!(server.labels, relabeled);

        // Power.
        let off = api
            .server_power(server.id, ServerPowerAction::PowerOff)
            .await
            .unwrap();
        api.wait_for_actions(&[ActionRef::from(&off)], WAIT)
            .await
            .unwrap();
        assert_eq!(
            api.get_server(server.id).await.unwrap().status,
            ServerStatus::Off
        );
        let on = api
            .server_power(server.id, ServerPowerAction::PowerOn)
            .await
            .unwrap();
        api.wait_for_actions(&[ActionRef::from(&on)], WAIT)
            .await
            .unwrap();
        assert_eq!(
            api.get_server(server.id).await.unwrap().status,
            ServerStatus::Running
        );
        let shutdown = api
            .server_power(server.id, ServerPowerAction::Shutdown)
            .await
            .unwrap();
        let finished = api
            .wait_for_actions(&[ActionRef::from(&shutdown)], WAIT)
            .await
            .unwrap();
        assert_eq!(api.get_action(shutdown.id).await.unwrap(), finished[0]);

        // Firewall rules and attachment.
        let rules = vec![
            ssh_rule(),
            FirewallRule {
                direction: FirewallDirection::In,
                protocol: FirewallProtocol::Icmp,
                port: None,
                source_ips: vec!["0.0.0.0/0".into()],
                destination_ips: vec![],
                description: None,
            },
        ];
        let actions = api.set_firewall_rules(firewall.id, &rules).await.unwrap();
        api.wait_for_actions(&ActionRef::all(&actions), WAIT)
            .await
            .unwrap();
        assert_eq!(api.get_firewall(firewall.id).await.unwrap().rules, rules);
        let removed = api
            .remove_firewall(firewall.id, &[server.id])
            .await
            .unwrap();
        api.wait_for_actions(&ActionRef::all(&removed), WAIT)
            .await
            .unwrap();
        assert!(
            api.get_firewall(firewall.id)
                .await
                .unwrap()
                .applied_to
                .is_empty()
        );
        let applied = api.apply_firewall(firewall.id, &[server.id]).await.unwrap();
        api.wait_for_actions(&ActionRef::all(&applied), WAIT)
            .await
            .unwrap();
        let attached = api.get_firewall(firewall.id).await.unwrap();
        assert_eq!(
            attached
                .applied_to
                .iter()
                .filter_map(FirewallResource::server_id)
                .collect::<Vec<_>>(),
            vec![server.id]
        );
        let firewall = api
            .update_firewall_labels(firewall.id, &relabeled)
            .await
            .unwrap();
        assert_eq!(firewall.labels, relabeled);

        // Still attached: the firewall can't go yet.
        let in_use = api.delete_firewall(firewall.id).await.unwrap_err();
        assert_eq!(in_use.code(), Some(&ErrorCode::ResourceInUse), "{in_use}");

        // Delete everything; afterwards only not_found.
        let deleting = api.delete_server(server.id).await.unwrap();
        api.wait_for_actions(&[ActionRef::from(&deleting)], WAIT)
            .await
            .unwrap();
        assert!(api.get_server(server.id).await.unwrap_err().is_not_found());
        api.delete_firewall(firewall.id).await.unwrap();
        api.delete_ssh_key(key.id).await.unwrap();
        assert!(
            api.get_firewall(firewall.id)
                .await
                .unwrap_err()
                .is_not_found()
        );
        assert!(api.delete_ssh_key(key.id).await.unwrap_err().is_not_found());
        assert_eq!(api.ssh_key_by_name("vps-s1").await.unwrap(), None);
        assert!(api.list_servers("").await.unwrap().is_empty());

        // The counters saw it all, keyed by template.
        let counts = api.request_counts();
        let count = |method: &str, template: &str, outcome: &str| {
            counts
                .iter()
                .find(|c| c.method == method && c.path_template == template && c.outcome == outcome)
                .map_or(0, |c| c.count)
        };
        assert_eq!(count("POST", "/servers", "201"), 1);
        assert_eq!(count("POST", "/servers/{id}/actions/poweroff", "201"), 1);
        assert_eq!(count("DELETE", "/ssh_keys/{id}", "204"), 1);
        assert_eq!(count("DELETE", "/ssh_keys/{id}", "not_found"), 1);
        assert_eq!(count("DELETE", "/firewalls/{id}", "resource_in_use"), 1);
        assert_eq!(api.retry_count(), 0);
        let total: u64 = counts.iter().map(|c| c.count).sum();
        assert_eq!(total, stats(&sim).await["total"].as_u64().unwrap());
    }

    #[tokio::test]
    async fn lists_fetch_every_page_of_fifty() {
        let sim = simulator(SimulatorConfig::default()).await;
        let api = client(&sim);
        let mine = labels(&[("suite", "paging")]);
        for i in 0..120 {
            api.create_firewall(&CreateFirewall {
                name: format!("fw-{i:03}"),
                labels: mine.clone(),
                rules: vec![],
                apply_to: vec![],
            })
            .await
            .unwrap();
        }
        api.create_firewall(&CreateFirewall {
            name: "someone-elses".into(),
            labels: labels(&[("suite", "other")]),
            rules: vec![],
            apply_to: vec![],
        })
        .await
        .unwrap();
        post_control(&sim, "reset", Value::Null).await;

        let listed = api.list_firewalls("suite=paging").await.unwrap();
        let names: Vec<String> = listed.iter().map(|f| f.name.clone()).collect();
        let expected: Vec<String> = (0..120).map(|i| format!("fw-{i:03}")).collect();
        assert_eq!(names, expected);
        assert_eq!(requests_to(&stats(&sim).await, "GET /firewalls"), 3);

        assert_eq!(api.list_firewalls("").await.unwrap().len(), 121);
        assert!(api.list_firewalls("suite=none").await.unwrap().is_empty());
        // 3 pages + 3 pages + 1 page, every one sorted by ID (stable while things change).
        let counted = stats(&sim).await;
        assert_eq!(requests_to(&counted, "GET /firewalls"), 7);
        assert_eq!(
            counted["list_sorts"],
            serde_json::json!({"GET /firewalls sort=id:asc": 7}),
        );
    }

    #[tokio::test]
    async fn a_listing_beyond_the_page_cap_is_an_error_not_a_truncated_list() {
        let sim = simulator(SimulatorConfig::default()).await;
        let api = client(&sim);
        for i in 0..101 {
            api.create_firewall(&CreateFirewall {
                name: format!("fw-{i:03}"),
                labels: labels(&[("suite", "cap")]),
                rules: vec![],
                apply_to: vec![],
            })
            .await
            .unwrap();
        }
        // 101 firewalls are 3 pages of 50.
        let capped = |max_pages| {
            Client::new(ClientConfig {
                max_pages,
                ..config(&sim)
            })
            .unwrap()
        };
        let err = capped(2).list_firewalls("suite=cap").await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::PageLimit {
                    path: "/firewalls",
                    max_pages: 2
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("GET /firewalls"), "{err}");
        assert_eq!(err.metric_label(), "page_limit");
        assert!(!err.is_not_found());
        assert_eq!(capped(3).list_firewalls("").await.unwrap().len(), 101);
        // A listing that fits exactly is fine; one more object is not.
        api.create_firewall(&CreateFirewall {
            name: "fw-one-too-many".into(),
            labels: Labels::new(),
            rules: vec![],
            apply_to: vec![],
        })
        .await
        .unwrap();
        assert_eq!(capped(3).list_firewalls("").await.unwrap().len(), 102);
        let refused = Client::new(ClientConfig {
            max_pages: 0,
            ..config(&sim)
        })
        .unwrap_err();
        assert!(matches!(refused, Error::Config(_)), "{refused}");
    }

    #[tokio::test]
    async fn snapshots_are_created_listed_and_deleted_and_the_catalog_is_looked_up() {
        let sim = simulator(SimulatorConfig {
            action_seconds: 0.05,
            ..Default::default()
        })
        .await;
        let api = client(&sim);
        let owner = labels(&[("vps-controller/instance", "snap")]);
        let created = api
            .create_server(&CreateServer {
                name: "vps-snap".into(),
                server_type: "cpx22".into(),
                image: "ubuntu-24.04".into(),
                location: Some("fsn1".into()),
                ssh_keys: vec![],
                firewalls: vec![],
                labels: owner.clone(),
                user_data: None,
                start_after_create: Some(true),
                public_net: None,
            })
            .await
            .unwrap();
        api.wait_for_actions(&created.actions(), WAIT)
            .await
            .unwrap();
        let server = created.server;

        // Snapshot: creating while its action runs, then available.
        let mut snapshot_labels = owner.clone();
        snapshot_labels.insert("vps-controller/snapshot".into(), "nightly".into());
        let snap = api
            .create_snapshot(server.id, "before upgrade", &snapshot_labels)
            .await
            .unwrap();
        assert_eq!(snap.image.kind, ImageType::Snapshot);
        assert_eq!(snap.image.status, ImageStatus::Creating);
        assert_eq!(snap.image.description, "before upgrade");
        assert_eq!(snap.image.labels, snapshot_labels);
        assert_eq!(
            snap.image.created_from,
            Some(ImageCreatedFrom {
                id: server.id,
                name: "vps-snap".into()
            })
        );
        assert_eq!(snap.action.command, "create_image");
        let done = api
            .wait_for_actions(&[ActionRef::from(&snap.action)], WAIT)
            .await
            .unwrap();
        assert_eq!(done[0].status, ActionStatus::Success);
        // Another snapshot of the same server, outside the selector, generated description.
        let other = api
            .create_snapshot(server.id, "", &Labels::new())
            .await
            .unwrap();
        assert!(!other.image.description.is_empty());
        api.wait_for_actions(&[ActionRef::from(&other.action)], WAIT)
            .await
            .unwrap();

        let listed = api
            .list_snapshots("vps-controller/snapshot=nightly")
            .await
            .unwrap();
        assert_eq!(
            listed.iter().map(|i| i.id).collect::<Vec<_>>(),
            [snap.image.id]
        );
        assert_eq!(listed[0].status, ImageStatus::Available);
        assert_eq!(listed[0].name, None);
        assert_eq!(
            api.list_snapshots("")
                .await
                .unwrap()
                .iter()
                .map(|i| i.id)
                .collect::<Vec<_>>(),
            [snap.image.id, other.image.id],
            "every snapshot, system images left out, by ID"
        );

        // Snapshots outlive their server.
        let deleting = api.delete_server(server.id).await.unwrap();
        api.wait_for_actions(&[ActionRef::from(&deleting)], WAIT)
            .await
            .unwrap();
        assert_eq!(
            api.list_snapshots("vps-controller/instance=snap")
                .await
                .unwrap()
                .len(),
            1
        );

        // Deleted: gone for GET, the list and a second delete.
        api.delete_image(snap.image.id).await.unwrap();
        assert!(
            api.get_image(snap.image.id)
                .await
                .unwrap_err()
                .is_not_found()
        );
        assert!(
            api.list_snapshots("vps-controller/snapshot=nightly")
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            api.delete_image(snap.image.id)
                .await
                .unwrap_err()
                .is_not_found()
        );
        api.delete_image(other.image.id).await.unwrap();

        // The catalog, as a plan is validated at startup.
        let cpx22 = api.server_type_by_name("cpx22").await.unwrap().unwrap();
        assert_eq!(cpx22.architecture, Architecture::X86);
        assert!(cpx22.disk > 0.0 && cpx22.cores >= 1.0);
        assert!(cpx22.locations.iter().any(|l| l.name == "fsn1"));
        assert_eq!(api.server_type_by_name("cpx999").await.unwrap(), None);
        let fsn1 = api.location_by_name("fsn1").await.unwrap().unwrap();
        assert_eq!(fsn1.network_zone, "eu-central");
        assert_eq!(api.location_by_name("mars1").await.unwrap(), None);
        let ubuntu = api.image_by_name("ubuntu-24.04").await.unwrap();
        let mut architectures: Vec<Architecture> = ubuntu.iter().map(|i| i.architecture).collect();
        architectures.sort_by_key(|a| format!("{a:?}"));
        assert_eq!(architectures, [Architecture::Arm, Architecture::X86]);
        assert!(
            ubuntu
                .iter()
                .all(|i| i.kind == ImageType::System && i.status == ImageStatus::Available)
        );
        assert!(api.image_by_name("windows-95").await.unwrap().is_empty());
        assert!(api.image_by_name("").await.unwrap().is_empty());

        // A system image can't be deleted.
        let system = api.delete_image(ubuntu[0].id).await.unwrap_err();
        assert_eq!(system.code(), Some(&ErrorCode::Forbidden), "{system}");
        assert!(api.get_image(ubuntu[0].id).await.is_ok());

        // Every paginated list went out sorted by ID, the server action waits among them,
        // except server types (the spec has no sort there); this test's waits were all on
        // server actions, so `GET /actions?id=..` (a lookup by ID without pages) was not used.
        let sorts = stats(&sim).await["list_sorts"].clone();
        let unsorted: Vec<&String> = sorts
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !k.ends_with(" sort=id:asc"))
            .collect();
        assert_eq!(unsorted, ["GET /server_types unsorted"], "{sorts}");
        assert!(
            sorts["GET /servers/actions sort=id:asc"].as_u64() > Some(0),
            "{sorts}"
        );
        assert!(
            sorts["GET /images sort=id:asc"].as_u64().unwrap() >= 5,
            "{sorts}"
        );
        assert_eq!(sorts["GET /locations sort=id:asc"], 2, "{sorts}");
        let counts = api.request_counts();
        let count = |method: &str, template: &str, outcome: &str| {
            counts
                .iter()
                .find(|c| c.method == method && c.path_template == template && c.outcome == outcome)
                .map_or(0, |c| c.count)
        };
        assert_eq!(
            count("POST", "/servers/{id}/actions/create_image", "201"),
            2
        );
        assert_eq!(count("DELETE", "/images/{id}", "204"), 2);
        assert_eq!(count("DELETE", "/images/{id}", "not_found"), 1);
        assert_eq!(count("DELETE", "/images/{id}", "forbidden"), 1);
        assert_eq!(count("GET", "/images/{id}", "not_found"), 1);
    }

    #[tokio::test]
    async fn each_error_class_is_told_apart_and_sent_once() {
        let sim = simulator(SimulatorConfig::default()).await;
        let api = client(&sim);
        let total = |stats: Value| stats["total"].as_u64().unwrap();

        let before = total(stats(&sim).await);
        let err = api.get_server(424242).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(matches!(err, Error::Api { status: 404, .. }));
        assert!(!err.is_retryable_now() && !err.is_terminal());

        let mut bad = server_request("not a hostname!", 1, 1, &Labels::new());
        bad.ssh_keys.clear();
        bad.firewalls.clear();
        let err = api.create_server(&bad).await.unwrap_err();
        assert_eq!(err.code(), Some(&ErrorCode::InvalidInput), "{err}");
        assert!(err.field_names().contains(&"name".to_string()), "{err:?}");
        assert!(err.is_terminal() && !err.is_not_found());

        let request = CreateSshKey {
            name: "dup".into(),
            public_key: public_key(9),
            labels: Labels::new(),
        };
        api.create_ssh_key(&request).await.unwrap();
        let err = api
            .create_ssh_key(&CreateSshKey {
                name: "dup-2".into(),
                ..request.clone()
            })
            .await
            .unwrap_err();
        assert!(err.is_uniqueness_error(), "{err}");
        assert_eq!(err.field_names(), vec!["public_key".to_string()]);
        let err = api
            .create_ssh_key(&CreateSshKey {
                public_key: public_key(10),
                ..request
            })
            .await
            .unwrap_err();
        assert!(err.is_uniqueness_error(), "{err}");

        let intruder = Client::new(ClientConfig {
            token: Token::new("wrong-token"),
            ..config(&sim)
        })
        .unwrap();
        let err = intruder.list_servers("").await.unwrap_err();
        assert_eq!(err.code(), Some(&ErrorCode::Unauthorized), "{err}");
        assert!(err.is_terminal() && !err.is_not_found());
        assert!(!err.to_string().contains("wrong-token"));

        // Six calls, six requests: none of these is retried.
        assert_eq!(total(stats(&sim).await) - before, 6);
        assert_eq!(api.retry_count() + intruder.retry_count(), 0);
    }

    /// The leader lease as the client sees it: a write is sent only while the gate is open,
    /// asked again before each retry; reads always go out.
    #[tokio::test]
    async fn a_write_is_sent_only_while_the_gate_is_open_and_each_retry_asks_again() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let sim = simulator(SimulatorConfig::default()).await;
        // Open for exactly one ask: the first attempt goes out, its retry must not.
        let asked = Arc::new(AtomicUsize::new(0));
        let gate = {
            let asked = Arc::clone(&asked);
            WriteGate::new(move || asked.fetch_add(1, Ordering::SeqCst) == 0)
        };
        let api = Client::new(ClientConfig {
            write_gate: Some(gate),
            ..config(&sim)
        })
        .unwrap();
        fault_once(&sim, "http_502_html", "POST /ssh_keys").await;
        let request = CreateSshKey {
            name: "gated".into(),
            public_key: public_key(21),
            labels: Labels::new(),
        };
        let err = api.create_ssh_key(&request).await.unwrap_err();
        assert!(matches!(err, Error::NotLeading), "{err}");
        assert_eq!(err.metric_label(), "not_leading");
        let seen = stats(&sim).await;
        assert_eq!(
            requests_to(&seen, "POST /ssh_keys"),
            1,
            "the retry was held back"
        );
        assert_eq!(asked.load(Ordering::SeqCst), 2, "asked before each attempt");

        // Shut: reads go out, writes of every method do not.
        assert!(api.list_ssh_keys("").await.unwrap().is_empty());
        assert!(matches!(
            api.create_ssh_key(&request).await,
            Err(Error::NotLeading)
        ));
        assert!(matches!(
            api.delete_ssh_key(1).await,
            Err(Error::NotLeading)
        ));
        let seen = stats(&sim).await;
        assert_eq!(requests_to(&seen, "GET /ssh_keys"), 1);
        assert_eq!(requests_to(&seen, "POST /ssh_keys"), 1);
        assert_eq!(requests_to(&seen, "DELETE /ssh_keys/{id}"), 0);
        let counted = api
            .request_counts()
            .into_iter()
            .filter(|c| c.outcome == "not_leading")
            .map(|c| c.count)
            .sum::<u64>();
        assert_eq!(
            counted, 3,
            "each held-back write shows in the request metric"
        );
    }

    /// Per call: every attempt's outcome label (from the client's counters) and how many
    /// requests the simulator saw.
    async fn observe<T>(
        sim: &RunningSimulator,
        api: &Client,
        call: impl std::future::Future<Output = Result<T, Error>>,
    ) -> (Result<T, Error>, Vec<String>, u64) {
        let counts_before = api.request_counts();
        let seen_before = stats(sim).await["total"].as_u64().unwrap();
        let result = call.await;
        let seen = stats(sim).await["total"].as_u64().unwrap() - seen_before;
        let mut attempts = Vec::new();
        for row in api.request_counts() {
            let earlier = counts_before
                .iter()
                .find(|c| {
                    c.method == row.method
                        && c.path_template == row.path_template
                        && c.outcome == row.outcome
                })
                .map_or(0, |c| c.count);
            for _ in earlier..row.count {
                attempts.push(row.outcome.clone());
            }
        }
        attempts.sort();
        (result, attempts, seen)
    }

    /// One fixed-seed run of `calls` calls, alternating GETs and rule changes (with waits),
    /// under 50 % faults.
    /// Returns a per-call summary: (final outcome, sorted attempt outcomes).
    async fn seeded_fault_run(seed: u64, calls: usize) -> Vec<(String, Vec<String>)> {
        let sim = simulator(SimulatorConfig {
            action_seconds: 0.0,
            seed,
            fault_delay: Duration::from_millis(600),
            ..Default::default()
        })
        .await;
        let budget = Arc::new(Budget::default().with_max_circuit_pause(Duration::from_millis(20)));
        let api = Client::new(ClientConfig {
            timeout: Duration::from_millis(250),
            budget,
            ..config(&sim)
        })
        .unwrap();
        let firewall = api
            .create_firewall(&CreateFirewall {
                name: "faulty".into(),
                labels: Labels::new(),
                rules: vec![],
                apply_to: vec![],
            })
            .await
            .unwrap()
            .firewall;
        post_control(&sim, "faults", serde_json::json!({"rate": 0.5})).await;

        let retry_safe = [
            "invalid_response",
            "rate_limited",
            "transport_timeout",
            "bad_gateway",
            "timeout",
            "conflict",
        ];
        let mut summary = Vec::new();
        for i in 0..calls {
            let (outcome, attempts, seen) = if i % 2 == 1 {
                let (result, attempts, seen) = observe(&sim, &api, async {
                    let actions = api.set_firewall_rules(firewall.id, &[ssh_rule()]).await?;
                    api.wait_for_actions(&ActionRef::all(&actions), WAIT).await
                })
                .await;
                let outcome = match result {
                    Ok(_) => "ok".to_string(),
                    Err(err) => err.metric_label().to_string(),
                };
                (outcome, attempts, seen)
            } else {
                let (result, attempts, seen) =
                    observe(&sim, &api, api.get_firewall(firewall.id)).await;
                let outcome = match result {
                    Ok(found) => {
                        assert_eq!(found.id, firewall.id);
                        "ok".to_string()
                    }
                    Err(err) => {
                        assert!(!err.is_not_found(), "a fault looked like not_found: {err}");
                        err.metric_label().to_string()
                    }
                };
                (outcome, attempts, seen)
            };
            assert_eq!(
                attempts.len() as u64,
                seen,
                "call {i}: client attempts vs simulator requests"
            );
            // Apart from successes, every attempt failed in a way that is safe to retry, except
            // possibly one: the failure that ended the call.
            let unsafe_failures: Vec<&String> = attempts
                .iter()
                .filter(|o| !o.starts_with('2') && !retry_safe.contains(&o.as_str()))
                .collect();
            assert!(
                unsafe_failures.is_empty() || unsafe_failures == vec![&outcome],
                "call {i}: retried after {attempts:?} ending {outcome}"
            );
            summary.push((outcome, attempts));
        }
        summary
    }

    #[tokio::test]
    async fn seeded_faults_are_retried_only_where_safe_and_reproducibly() {
        // Two fresh simulators with the same seed; the shorter run must be a prefix of the
        // longer one (faults are drawn per request).
        let (first, second) = tokio::join!(seeded_fault_run(7, 80), seeded_fault_run(7, 30));
        let finals: BTreeMap<&str, usize> =
            first.iter().fold(BTreeMap::new(), |mut acc, (o, _)| {
                *acc.entry(o.as_str()).or_default() += 1;
                acc
            });
        let attempts: Vec<&String> = first.iter().flat_map(|(_, a)| a).collect();
        let seen = |label: &str| attempts.iter().filter(|o| o.as_str() == label).count();
        // Faults that are never retried end their call after exactly that attempt.
        assert!(
            finals.get("unavailable").copied().unwrap_or(0) > 0,
            "{finals:?}"
        );
        assert!(
            finals.get("server_error").copied().unwrap_or(0) > 0,
            "{finals:?}"
        );
        assert_eq!(
            seen("unavailable"),
            finals["unavailable"],
            "503 was retried"
        );
        assert_eq!(
            seen("server_error"),
            finals["server_error"],
            "500 was retried"
        );
        // Retried kinds all occurred, and calls recovered from them.
        assert!(seen("invalid_response") > 0, "no HTML 502 seen: {finals:?}");
        assert!(seen("rate_limited") > 0, "no 429 seen");
        assert!(seen("transport_timeout") > 0, "no timeout seen");
        assert!(
            first.iter().any(|(o, a)| o == "ok" && a.len() > 1),
            "no call succeeded after a retry"
        );
        assert!(
            finals.get("action_failed").copied().unwrap_or(0) > 0,
            "{finals:?}"
        );
        // Same seed, same story.
        assert_eq!(first[..30], second[..]);
    }

    #[tokio::test]
    async fn the_budget_keeps_the_client_under_the_rate_limit() {
        let sim = simulator(SimulatorConfig {
            rate_limit: 10,
            ..Default::default()
        })
        .await;
        let shared = Arc::new(Budget::default());
        let api = Client::new(ClientConfig {
            budget: shared.clone(),
            max_budget_wait: Duration::from_millis(500),
            ..config(&sim)
        })
        .unwrap();
        let other = Client::new(ClientConfig {
            budget: shared.clone(),
            max_budget_wait: Duration::from_millis(500),
            ..config(&sim)
        })
        .unwrap();
        let mut ok = 0;
        let mut refused = Vec::new();
        for i in 0..14 {
            let client = if i % 2 == 0 { &api } else { &other };
            match client.list_servers("").await {
                Ok(_) => ok += 1,
                Err(Error::RateLimited { reset_in }) => refused.push(reset_in),
                Err(err) => panic!("unexpected {err}"),
            }
        }
        assert_eq!(ok, 10);
        assert_eq!(refused.len(), 4);
        // 10/h: the next token is minutes away, so the client returns instead of waiting.
        assert!(
            refused.iter().all(|wait| *wait > Duration::from_secs(300)),
            "{refused:?}"
        );
        assert_eq!(shared.limit(), 10);
        assert_eq!(shared.remaining(), 0);
        let stats = stats(&sim).await;
        assert_eq!(stats["rate_limited"], 0, "{stats}");
        assert_eq!(stats["total"], 10, "{stats}");
    }

    #[tokio::test]
    async fn after_a_429_the_circuit_holds_every_caller_back() {
        let sim = simulator(SimulatorConfig {
            rate_limit: 5,
            ..Default::default()
        })
        .await;
        // Someone else (same project, no shared budget) uses up the limit.
        let outsider = reqwest::Client::new();
        for _ in 0..5 {
            outsider
                .get(format!("{}/servers", sim.base_url()))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
        }
        let budget = Arc::new(Budget::default());
        let api = Client::new(ClientConfig {
            budget: budget.clone(),
            max_budget_wait: Duration::from_millis(500),
            ..config(&sim)
        })
        .unwrap();
        let err = api.list_servers("").await.unwrap_err();
        assert_eq!(err.metric_label(), "rate_limited", "{err}");
        assert!(!err.is_not_found());
        assert!(budget.is_paused());
        // A second caller doesn't even try.
        let err = api.get_server(1).await.unwrap_err();
        assert!(matches!(err, Error::RateLimited { .. }), "{err}");
        let stats = stats(&sim).await;
        assert_eq!(
            stats["rate_limited"], 1,
            "exactly one request hit the limit: {stats}"
        );
        assert_eq!(stats["total"], 6, "{stats}");
    }

    /// The actions of setting the SSH rule on a new firewall that is applied nowhere.
    async fn rules_set_on_a_new_firewall(api: &Client, name: &str) -> Vec<Action> {
        let firewall = api
            .create_firewall(&CreateFirewall {
                name: name.into(),
                labels: Labels::new(),
                rules: vec![],
                apply_to: vec![],
            })
            .await
            .unwrap()
            .firewall;
        api.set_firewall_rules(firewall.id, &[ssh_rule()])
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn waiting_for_actions_batches_ids_and_reports_outcomes() {
        let sim = simulator(SimulatorConfig {
            action_seconds: 0.0,
            ..Default::default()
        })
        .await;
        let api = client(&sim);
        let mut action_ids = Vec::new();
        for i in 0..30 {
            action_ids.extend(ActionRef::all(
                &rules_set_on_a_new_firewall(&api, &format!("batch-{i}")).await,
            ));
        }
        assert_eq!(action_ids.len(), 30);
        post_control(&sim, "reset", Value::Null).await;
        let done = api.wait_for_actions(&action_ids, WAIT).await.unwrap();
        assert_eq!(done.len(), 30);
        // One poll round over 30 IDs: 25 + 5.
        assert_eq!(requests_to(&stats(&sim).await, "GET /actions"), 2);
        assert!(api.wait_for_actions(&[], WAIT).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_action_servers_actions_leaves_out_is_asked_at_actions_in_the_same_round() {
        let sim = simulator(SimulatorConfig {
            action_seconds: 0.0,
            ..Default::default()
        })
        .await;
        let api = client(&sim);
        let actions = rules_set_on_a_new_firewall(&api, "no-servers").await;
        assert!(!ActionRef::all(&actions).iter().any(|a| a.on_server));
        // Claimed to touch a server (as if the API listed it elsewhere than we guessed).
        let claimed: Vec<ActionRef> = actions
            .iter()
            .map(|a| ActionRef {
                id: a.id,
                on_server: true,
            })
            .collect();
        post_control(&sim, "reset", Value::Null).await;
        let done = api.wait_for_actions(&claimed, WAIT).await.unwrap();
        assert_eq!(
            done.iter().map(|a| a.id).collect::<Vec<_>>(),
            actions.iter().map(|a| a.id).collect::<Vec<_>>()
        );
        let stats = stats(&sim).await;
        assert_eq!(requests_to(&stats, "GET /servers/actions"), 1);
        assert_eq!(requests_to(&stats, "GET /actions"), 1);
    }

    #[tokio::test]
    async fn waiting_polls_until_actions_finish_or_time_runs_out() {
        let sim = simulator(SimulatorConfig {
            action_seconds: 0.4,
            ..Default::default()
        })
        .await;
        let api = client(&sim);
        let actions = ActionRef::all(&rules_set_on_a_new_firewall(&api, "slow").await);
        let ids: Vec<i64> = actions.iter().map(|a| a.id).collect();
        let err = api
            .wait_for_actions(&actions, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::ActionTimeout { ids: left } if *left == ids),
            "{err}"
        );
        post_control(&sim, "reset", Value::Null).await;
        let done = api.wait_for_actions(&actions, WAIT).await.unwrap();
        assert_eq!(done[0].status, ActionStatus::Success);
        // Polled more than once, but with growing gaps (20 ms → 100 ms), not in a tight loop.
        let polls = requests_to(&stats(&sim).await, "GET /actions");
        assert!((2..=12).contains(&polls), "{polls} polls");
    }

    // -----------------------------------------------------------------------------------------
    // Action waits batched across callers: one client's concurrent waits share poll rounds.

    /// A client whose first poll comes 250 ms after a wait begins: waits that begin within a
    /// few milliseconds of each other fall into at most two rounds.
    fn batching_client(sim: &RunningSimulator, initial: Duration) -> Client {
        Client::new(ClientConfig {
            action_poll: ActionPollBackoff {
                initial,
                max: initial * 2,
                factor: 1.5,
            },
            ..config(sim)
        })
        .unwrap()
    }

    /// An SSH key and a firewall for `count` servers, which are created concurrently (one task
    /// each, on clones of `api`, as the controller runs reconciles); once every create has
    /// answered, each task waits on its own server's actions, with the timeout `timeout(i)`.
    /// Returns each server's actions and its wait's outcome.
    async fn create_and_wait(
        api: &Client,
        prefix: &str,
        count: usize,
        timeout: impl Fn(usize) -> Duration,
    ) -> Vec<(Vec<ActionRef>, Result<Vec<Action>, Error>)> {
        let owner = labels(&[("vps-controller/instance", prefix)]);
        let key = api
            .create_ssh_key(&CreateSshKey {
                name: format!("{prefix}-key"),
                public_key: public_key(
                    prefix
                        .bytes()
                        .fold(1000, |h: u32, b| h.wrapping_mul(31).wrapping_add(b.into())),
                ),
                labels: owner.clone(),
            })
            .await
            .unwrap();
        let firewall = api
            .create_firewall(&CreateFirewall {
                name: format!("{prefix}-fw"),
                labels: owner.clone(),
                rules: vec![ssh_rule()],
                apply_to: vec![],
            })
            .await
            .unwrap()
            .firewall;
        let barrier = Arc::new(tokio::sync::Barrier::new(count));
        let tasks: Vec<_> = (0..count)
            .map(|i| {
                let api = api.clone();
                let barrier = barrier.clone();
                let request = server_request(&format!("{prefix}-{i}"), key.id, firewall.id, &owner);
                let timeout = timeout(i);
                tokio::spawn(async move {
                    let actions = api.create_server(&request).await.unwrap().actions();
                    barrier.wait().await;
                    let outcome = api.wait_for_actions(&actions, timeout).await;
                    (actions, outcome)
                })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        results
    }

    #[tokio::test]
    async fn concurrent_waits_share_requests_fifty_server_actions_each() {
        let sim = simulator(SimulatorConfig {
            action_seconds: 0.05,
            ..Default::default()
        })
        .await;
        let api = batching_client(&sim, Duration::from_millis(250));
        let results = create_and_wait(&api, "batch", 40, |_| WAIT).await;
        let mut ids = 0;
        for (asked, outcome) in &results {
            let done = outcome.as_ref().unwrap();
            assert_eq!(
                done.iter().map(|a| a.id).collect::<Vec<_>>(),
                asked.iter().map(|a| a.id).collect::<Vec<_>>()
            );
            assert!(done.iter().all(|a| a.status == ActionStatus::Success));
            assert!(asked.iter().all(|a| a.on_server), "{asked:?}");
            ids += asked.len() as u64;
        }
        // create_server, start_server, apply_firewall per server.
        assert_eq!(ids, 120);
        let rounds = api.action_poll_rounds();
        let stats = stats(&sim).await;
        let polls = requests_to(&stats, "GET /servers/actions");
        // All waits began within one poll interval: at most two rounds (the first serves the
        // waits already due when it starts), each one request per 50 IDs, since every action
        // touches a server; alone, every wait would have sent at least one request of its own.
        assert!((1..=2).contains(&rounds), "{rounds} rounds");
        assert!(
            polls <= ids.div_ceil(50) * rounds,
            "{polls} GET /servers/actions in {rounds} rounds"
        );
        assert!(polls <= 6, "{polls} GET /servers/actions for 40 waits");
        assert_eq!(requests_to(&stats, "GET /actions"), 0);
        assert_eq!(api.pending_action_waits(), 0);
    }

    #[tokio::test]
    async fn a_failed_action_fails_only_its_own_wait() {
        let sim = simulator(SimulatorConfig {
            action_seconds: 0.05,
            ..Default::default()
        })
        .await;
        let api = batching_client(&sim, Duration::from_millis(100));
        fault_once(&sim, "action_error", "POST /servers").await;
        let results = create_and_wait(&api, "fail", 6, |_| WAIT).await;
        let failed: Vec<_> = results
            .iter()
            .filter_map(|(ids, outcome)| outcome.as_ref().err().map(|err| (ids, err)))
            .collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        let (ids, err) = failed[0];
        assert!(
            matches!(err, Error::ActionFailed { action_id, code, .. }
                if *action_id == ids[0].id && code == "action_failed"),
            "{err}"
        );
        for (ids, outcome) in &results {
            if let Ok(done) = outcome {
                assert_eq!(done.len(), ids.len());
            }
        }
        assert_eq!(api.pending_action_waits(), 0);
    }

    /// The actions of a server whose start_server action runs until the faults are cleared.
    async fn stuck_server(sim: &RunningSimulator, api: &Client, prefix: &str) -> Vec<ActionRef> {
        fault_once(sim, "server_stuck_starting", "POST /servers").await;
        let created = create_and_wait(api, prefix, 1, |_| Duration::ZERO).await;
        let (ids, outcome) = &created[0];
        assert!(
            matches!(outcome, Err(Error::ActionTimeout { ids: left }) if left.contains(&ids[1].id)),
            "{outcome:?}"
        );
        ids.clone()
    }

    #[tokio::test]
    async fn a_timed_out_wait_does_not_hold_up_the_others() {
        let sim = simulator(SimulatorConfig {
            action_seconds: 0.05,
            ..Default::default()
        })
        .await;
        let api = batching_client(&sim, Duration::from_millis(100));
        let stuck = stuck_server(&sim, &api, "stuck").await;
        // The stuck wait gives up after 700 ms, while five others (10 s each) share its rounds.
        let started = tokio::time::Instant::now();
        let (timed_out, others) = tokio::join!(
            api.wait_for_actions(&stuck, Duration::from_millis(700)),
            create_and_wait(&api, "others", 5, |_| WAIT),
        );
        // Only start_server was still running; create_server and apply_firewall finished.
        assert!(
            matches!(&timed_out, Err(Error::ActionTimeout { ids }) if *ids == vec![stuck[1].id]),
            "{timed_out:?}"
        );
        for (ids, outcome) in &others {
            assert_eq!(outcome.as_ref().unwrap().len(), ids.len());
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        // Released, the stuck action finishes and a new wait sees it.
        post_control(&sim, "faults", serde_json::json!({"faults": []})).await;
        let done = api.wait_for_actions(&stuck, WAIT).await.unwrap();
        assert!(done.iter().all(|a| a.status == ActionStatus::Success));
        assert_eq!(api.pending_action_waits(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_nothing_pending() {
        let sim = simulator(SimulatorConfig {
            action_seconds: 0.05,
            fault_delay: Duration::from_secs(3),
            ..Default::default()
        })
        .await;
        let api = batching_client(&sim, Duration::from_millis(50));
        let stuck = stuck_server(&sim, &api, "cancel").await;

        // A wait cancelled while its action still runs: no entry, no more polls.
        let cancelled = tokio::time::timeout(
            Duration::from_millis(300),
            api.wait_for_actions(&stuck, WAIT),
        )
        .await;
        assert!(
            cancelled.is_err(),
            "the stuck action finished: {cancelled:?}"
        );
        assert_eq!(api.pending_action_waits(), 0);
        let polls = requests_to(&stats(&sim).await, "GET /servers/actions");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            requests_to(&stats(&sim).await, "GET /servers/actions"),
            polls
        );

        // A leader cancelled while its round's request hangs hands the round over: the other
        // wait is answered long before the held answer (3 s) would have come.
        fault_once(&sim, "timeout", "GET /servers/actions").await;
        let started = tokio::time::Instant::now();
        let leader = tokio::time::timeout(
            Duration::from_millis(300),
            api.wait_for_actions(&stuck[..1], WAIT),
        );
        let follower = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            api.wait_for_actions(&stuck[2..], WAIT).await
        };
        let (leader, follower) = tokio::join!(leader, follower);
        assert!(leader.is_err(), "the leader was not cancelled: {leader:?}");
        assert_eq!(follower.unwrap()[0].id, stuck[2].id);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(api.pending_action_waits(), 0);
        post_control(&sim, "faults", serde_json::json!({"faults": []})).await;
    }

    #[tokio::test]
    async fn a_failed_poll_fails_its_round_and_an_unknown_id_its_own_wait() {
        let sim = simulator(SimulatorConfig {
            action_seconds: 0.05,
            ..Default::default()
        })
        .await;
        let api = batching_client(&sim, Duration::from_millis(50));
        let created = create_and_wait(&api, "poll", 2, |_| WAIT).await;
        let (first, second) = (&created[0].0, &created[1].0);
        fault_once(&sim, "http_500", "GET /servers/actions").await;
        let (a, b) = tokio::join!(
            api.wait_for_actions(first, WAIT),
            api.wait_for_actions(second, WAIT)
        );
        for outcome in [a, b] {
            let err = outcome.unwrap_err();
            assert_eq!(err.metric_label(), "server_error", "{err}");
        }
        // The next waits poll again: one of them asks about an action that does not exist.
        let unknown = [first[0], ActionRef::from_id(999_999_999)];
        let (a, b) = tokio::join!(
            api.wait_for_actions(&unknown, WAIT),
            api.wait_for_actions(second, WAIT)
        );
        assert!(
            matches!(&a, Err(Error::InvalidResponse { snippet, .. }) if snippet.contains("999999999")),
            "{a:?}"
        );
        assert_eq!(b.unwrap().len(), second.len());
        assert_eq!(api.pending_action_waits(), 0);
    }
}
