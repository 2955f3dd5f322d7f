//! Foundation modules: SSH keys (checked with the real `ssh-keygen`), sealing at rest,
//! cloud-init rendering and config loading.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use vps_controller::cloud_init::{self, CloudInitError, CloudInitTemplate, USER_DATA_LIMIT};
use vps_controller::config::{Config, ConfigError, Direction, Protocol};
use vps_controller::keys::{self, KeyAlgorithm, KeyError, SealError, Sealer};

// ---------------------------------------------------------------------------------------------
// helpers

/// Runs the real `ssh-keygen`; CI installs it (package openssh-client).
fn ssh_keygen(args: &[&str]) -> String {
    let output = match Command::new("ssh-keygen").args(args).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("ssh-keygen not found: install openssh-client (apt-get install openssh-client)")
        }
        Err(e) => panic!("running ssh-keygen failed: {e}"),
    };
    assert!(
        output.status.success(),
        "ssh-keygen {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn write_temp(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    // ssh-keygen refuses private key files readable by others.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `ssh-keygen -l` output: "<bits> <fingerprint> <comment> (<TYPE>)".
fn parse_keygen_listing(listing: &str) -> (u32, String, String) {
    let fields: Vec<&str> = listing.split_whitespace().collect();
    assert!(
        fields.len() >= 4,
        "unexpected ssh-keygen output {listing:?}"
    );
    (
        fields[0].parse().unwrap(),
        fields[1].to_owned(),
        fields[fields.len() - 1].to_owned(),
    )
}

/// Type and base64 blob of an OpenSSH public key line, without the comment.
fn key_type_and_blob(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// keys

// The only RSA-4096 generation in the suite (about a second each). It also shows that
// `generate` leaves the runtime's single worker free: a task spinning beside it keeps running.
#[tokio::test(flavor = "current_thread")]
async fn rsa_4096_pair_is_accepted_by_ssh_keygen_and_generated_off_the_runtime() {
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                ticks.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    });
    let pair = keys::generate(KeyAlgorithm::Rsa4096, "vps-sub-1")
        .await
        .unwrap();
    let ticks_during_generation = ticks.load(Ordering::Relaxed);
    ticker.abort();
    // Generating on the worker would have blocked the ticker completely (0 ticks).
    assert!(
        ticks_during_generation >= 100,
        "runtime worker was blocked during key generation ({ticks_during_generation} ticks)"
    );

    assert!(pair.public_openssh.starts_with("ssh-rsa AAAA"));
    assert!(pair.public_openssh.ends_with(" vps-sub-1"));
    let dir = tempfile::tempdir().unwrap();
    let public_file = write_temp(&dir, "id.pub", &format!("{}\n", pair.public_openssh));
    let (bits, _, key_type) =
        parse_keygen_listing(&ssh_keygen(&["-l", "-f", path_str(&public_file)]));
    assert_eq!((bits, key_type.as_str()), (4096, "(RSA)"));

    let (_, md5, _) = parse_keygen_listing(&ssh_keygen(&[
        "-l",
        "-E",
        "md5",
        "-f",
        path_str(&public_file),
    ]));
    assert_eq!(md5, format!("MD5:{}", pair.fingerprint_md5));

    // Private key: PKCS#8 PEM that rsa decodes and ssh-keygen accepts, matching the public key.
    let pem = pair.private_pem();
    assert!(
        pem.starts_with("-----BEGIN PRIVATE KEY-----\n"),
        "not PKCS#8 PEM"
    );
    assert!(pem.trim_end().ends_with("-----END PRIVATE KEY-----"));
    use rsa::pkcs8::DecodePrivateKey as _;
    let private = rsa::RsaPrivateKey::from_pkcs8_pem(pem).unwrap();
    let from_private = ssh_key::PublicKey::new(
        ssh_key::public::KeyData::Rsa(
            ssh_key::public::RsaPublicKey::try_from(private.as_public_key()).unwrap(),
        ),
        "",
    );
    let published = ssh_key::PublicKey::from_openssh(&pair.public_openssh).unwrap();
    assert_eq!(from_private.key_data(), published.key_data());

    let private_file = write_temp(&dir, "id", pem);
    let derived = ssh_keygen(&["-y", "-f", path_str(&private_file)]);
    assert_eq!(
        key_type_and_blob(&derived),
        key_type_and_blob(&pair.public_openssh)
    );
}

#[test]
fn ed25519_pair_is_accepted_by_ssh_keygen() {
    let pair = keys::generate_blocking(KeyAlgorithm::Ed25519, "vps-sub-2").unwrap();
    assert!(pair.public_openssh.starts_with("ssh-ed25519 AAAA"));
    let dir = tempfile::tempdir().unwrap();
    let public_file = write_temp(&dir, "id.pub", &pair.public_openssh);
    let (bits, _, key_type) =
        parse_keygen_listing(&ssh_keygen(&["-l", "-f", path_str(&public_file)]));
    assert_eq!((bits, key_type.as_str()), (256, "(ED25519)"));
    let (_, md5, _) = parse_keygen_listing(&ssh_keygen(&[
        "-l",
        "-E",
        "md5",
        "-f",
        path_str(&public_file),
    ]));
    assert_eq!(md5, format!("MD5:{}", pair.fingerprint_md5));

    // Ed25519 private keys use the OpenSSH format (OpenSSH 9.2 rejects PKCS#8 Ed25519).
    assert!(
        pair.private_pem()
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    );
    let private_file = write_temp(&dir, "id", pair.private_pem());
    let derived = ssh_keygen(&["-y", "-f", path_str(&private_file)]);
    assert_eq!(
        key_type_and_blob(&derived),
        key_type_and_blob(&pair.public_openssh)
    );
}

#[test]
fn each_generated_pair_is_new() {
    let a = keys::generate_blocking(KeyAlgorithm::Ed25519, "a").unwrap();
    let b = keys::generate_blocking(KeyAlgorithm::Ed25519, "a").unwrap();
    assert_ne!(a.public_openssh, b.public_openssh);
    assert_ne!(a.private_pem(), b.private_pem());
}

#[test]
fn key_pair_debug_hides_the_private_key() {
    let pair = keys::generate_blocking(KeyAlgorithm::Ed25519, "c").unwrap();
    let debug = format!("{pair:?}");
    assert!(debug.contains(&pair.public_openssh));
    assert!(debug.contains("redacted"));
    assert!(!debug.contains("PRIVATE KEY"));
    let body_line = pair.private_pem().lines().nth(1).unwrap();
    assert!(!debug.contains(body_line));
}

#[test]
fn comment_with_newline_is_rejected() {
    let result = keys::generate_blocking(KeyAlgorithm::Ed25519, "a\nssh-rsa AAAA evil");
    assert!(
        matches!(result, Err(KeyError::InvalidComment)),
        "{result:?}"
    );
}

// Fixture keys made with `ssh-keygen -t ed25519` / `-t rsa -b 2048`; fingerprints are
// `ssh-keygen -l -E md5` output, computed independently of this crate.
const FIXTURE_ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMsh005JRm5IiBIprfU6Clun055ztNhwOzB4p8Fb1FU fixture-ed25519";
const FIXTURE_ED25519_MD5: &str = "3e:29:4a:8a:b5:1e:dc:90:a5:33:39:d7:10:2d:57:16";
const FIXTURE_RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDt9xTVt6w2r/ubNe1SL6wzoduaikdcWPTtMtbuvL1TW5h6ug1mR02yfoAkuCNgAkloP0RIue+fbQJsioMklp/uiyF0+nXS9c0PvPk2m17uIBUjmiscgoToouqAwHKIJb7UE9wxnMZ0tDfrPXcTQTWa2JAQsuvDVjFhyNav54DZ+4N38fdQU8anOaIRXSjasb0TVKPavSrxSIpoPTVZcQ7oS+kk3zW5CkZoeG/SAHC+iMpwZmRKKuUCuPywqqcDqY6QGPxq602evqBv4BPITrxU/SK6eiYKZupoIT7hi1lThGY+0MDBFrrT3EenedLoZYJ71RQvAiGA4DqU5yvpAFY9 fixture-rsa";
const FIXTURE_RSA_MD5: &str = "78:98:a4:04:fb:77:b0:0c:c4:4b:fc:58:32:0b:2e:cb";

#[test]
fn md5_fingerprint_matches_known_vectors() {
    assert_eq!(
        keys::md5_fingerprint(FIXTURE_ED25519).unwrap(),
        FIXTURE_ED25519_MD5
    );
    assert_eq!(keys::md5_fingerprint(FIXTURE_RSA).unwrap(), FIXTURE_RSA_MD5);
    // The comment and surrounding whitespace do not matter; the key does.
    let without_comment = key_type_and_blob(FIXTURE_RSA);
    assert_eq!(
        keys::md5_fingerprint(&format!("  {without_comment}\n")).unwrap(),
        FIXTURE_RSA_MD5
    );
}

#[test]
fn md5_fingerprint_rejects_what_is_not_a_public_key() {
    let truncated = &FIXTURE_RSA[..100];
    let mismatched_type = FIXTURE_RSA.replacen("ssh-rsa", "ssh-ed25519", 1);
    for bad in [
        "",
        "ssh-rsa",
        "ssh-rsa !!!notbase64!!!",
        "nonsense AAAAB3NzaC1yc2E",
        truncated,
        &mismatched_type,
        "-----BEGIN PRIVATE KEY-----",
    ] {
        let result = keys::md5_fingerprint(bad);
        assert!(
            matches!(result, Err(KeyError::InvalidPublicKey { .. })),
            "{bad:?} gave {result:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// sealing

const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="; // bytes 0..32
const KEY_B: &str = "H/79/Pv6+fj39vX08/Lx8O/u7ezr6uno5+bl5OPi4eA="; // bytes 31..=0
const SECRET: &str = "-----BEGIN PRIVATE KEY-----\nsecret body\n-----END PRIVATE KEY-----\n";

fn sealer(current: &str, previous: &[&str]) -> Sealer {
    Sealer::from_base64(current, previous).unwrap()
}

/// Decodes the base64 payload of a sealed value, lets `edit` change it, and re-encodes.
fn edit_payload(sealed: &str, edit: impl FnOnce(&mut Vec<u8>)) -> String {
    let (prefix, payload) = sealed.rsplit_once(':').unwrap();
    let mut bytes = BASE64.decode(payload).unwrap();
    edit(&mut bytes);
    format!("{prefix}:{}", BASE64.encode(bytes))
}

#[test]
fn seal_and_open_round_trip() {
    let sealer = sealer(KEY_A, &[]);
    let sealed = sealer.seal(SECRET, "sub-1").unwrap();
    let parts: Vec<&str> = sealed.splitn(3, ':').collect();
    assert_eq!(parts[0], "v1");
    assert_eq!(parts[1], sealer.key_id());
    assert!(!sealed.contains("secret body"));
    assert_eq!(sealer.open(&sealed, "sub-1").unwrap().as_str(), SECRET);
    // Fresh random nonce each time: the same plaintext seals differently.
    assert_ne!(sealer.seal(SECRET, "sub-1").unwrap(), sealed);
    assert_eq!(
        sealer
            .open(&sealer.seal("", "s").unwrap(), "s")
            .unwrap()
            .as_str(),
        ""
    );
}

#[test]
fn key_id_is_a_prefix_of_the_keys_sha256() {
    let raw = BASE64.decode(KEY_A).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &raw);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(sealer(KEY_A, &[]).key_id(), &hex[..8]);
    assert_ne!(sealer(KEY_A, &[]).key_id(), sealer(KEY_B, &[]).key_id());
    // Stable across processes: derived from the key alone.
    assert_eq!(sealer(KEY_A, &[]).key_id(), sealer(KEY_A, &[]).key_id());
}

#[test]
fn tampered_value_fails_authentication() {
    let sealer = sealer(KEY_A, &[]);
    let sealed = sealer.seal(SECRET, "sub-1").unwrap();
    let last = |bytes: &mut Vec<u8>| bytes.len() - 1;
    let tampered = [
        edit_payload(&sealed, |b| b[0] ^= 1),     // nonce
        edit_payload(&sealed, |b| b[12] ^= 0x80), // ciphertext
        edit_payload(&sealed, |b| {
            // tag
            let i = last(b);
            b[i] ^= 1
        }),
        edit_payload(&sealed, |b| {
            b.pop();
        }),
    ];
    for value in tampered {
        let result = sealer.open(&value, "sub-1");
        assert!(
            matches!(result, Err(SealError::AuthenticationFailed { ref key_id }) if key_id == sealer.key_id()),
            "{result:?}"
        );
    }
}

#[test]
fn value_sealed_for_another_subscription_does_not_open() {
    let sealer = sealer(KEY_A, &[]);
    let sealed = sealer.seal(SECRET, "sub-1").unwrap();
    let err = sealer.open(&sealed, "sub-2").unwrap_err();
    assert!(
        matches!(err, SealError::AuthenticationFailed { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("another subscription"));
}

#[test]
fn value_sealed_with_another_key_names_the_missing_key_id() {
    let a = sealer(KEY_A, &[]);
    let b = sealer(KEY_B, &[]);
    let sealed = a.seal(SECRET, "sub-1").unwrap();
    let err = b.open(&sealed, "sub-1").unwrap_err();
    match &err {
        SealError::UnknownKeyId { key_id, .. } => assert_eq!(key_id, a.key_id()),
        other => panic!("expected UnknownKeyId, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(a.key_id()) && message.contains(b.key_id()),
        "{message}"
    );

    // The wrong key under the right id (a forged or corrupted id): authentication fails.
    let relabelled = sealed.replacen(a.key_id(), b.key_id(), 1);
    let result = b.open(&relabelled, "sub-1");
    assert!(
        matches!(result, Err(SealError::AuthenticationFailed { .. })),
        "{result:?}"
    );
}

#[test]
fn rotation_opens_values_sealed_with_a_previous_key() {
    let old = sealer(KEY_A, &[]);
    let sealed_before_rotation = old.seal(SECRET, "sub-1").unwrap();

    let rotated = sealer(KEY_B, &[KEY_A]);
    assert_eq!(rotated.key_id(), sealer(KEY_B, &[]).key_id());
    assert_eq!(
        rotated
            .open(&sealed_before_rotation, "sub-1")
            .unwrap()
            .as_str(),
        SECRET
    );
    // New values use the new key, which the old configuration cannot open.
    let sealed_after = rotated.seal(SECRET, "sub-1").unwrap();
    assert!(sealed_after.starts_with(&format!("v1:{}:", rotated.key_id())));
    assert!(matches!(
        old.open(&sealed_after, "sub-1"),
        Err(SealError::UnknownKeyId { .. })
    ));
    // Once the old key is dropped from the configuration, old values name it.
    assert!(matches!(
        sealer(KEY_B, &[]).open(&sealed_before_rotation, "sub-1"),
        Err(SealError::UnknownKeyId { .. })
    ));
    // Listing the current key as previous too is harmless.
    assert_eq!(
        sealer(KEY_A, &[KEY_A])
            .open(&sealed_before_rotation, "sub-1")
            .unwrap()
            .as_str(),
        SECRET
    );
}

#[test]
fn malformed_sealed_values_are_reported_as_such() {
    let sealer = sealer(KEY_A, &[]);
    let id = sealer.key_id().to_owned();
    let valid = sealer.seal(SECRET, "sub-1").unwrap();
    let short_payload = BASE64.encode([0u8; 27]);
    let cases = [
        String::new(),
        "garbage".to_owned(),
        "v1".to_owned(),
        format!("v1:{id}"),
        format!("v2:{id}:AAAA"),
        format!("V1:{id}:AAAA"),
        valid.replacen("v1:", "v1x:", 1),
        format!("v1:{}:AAAA", id.to_uppercase()),
        format!("v1:{id}0:AAAA"),
        format!("v1:ééé:{short_payload}"),
        format!("v1:{id}:!!!not base64!!!"),
        format!("v1:{id}:{short_payload}"),
        format!("v1:{id}:"),
        format!("{valid}:extra"),
    ];
    for value in &cases {
        let result = sealer.open(value, "sub-1");
        assert!(
            matches!(result, Err(SealError::Malformed(_))),
            "{value:?} gave {result:?}"
        );
    }
    let unknown = format!("v1:00000000:{}", BASE64.encode([7u8; 64]));
    assert!(matches!(
        sealer.open(&unknown, "sub-1"),
        Err(SealError::UnknownKeyId { ref key_id, .. }) if key_id == "00000000"
    ));
    let err = sealer.open(&format!("v2:{id}:AAAA"), "sub-1").unwrap_err();
    assert!(
        err.to_string().contains("unsupported version \"v2\""),
        "{err}"
    );
}

#[test]
fn bad_keys_are_rejected_without_echoing_them() {
    let thirty_one = BASE64.encode([9u8; 31]);
    let thirty_three = BASE64.encode([9u8; 33]);
    let cases = [
        ("", "empty"),
        ("not base64 at all!", "not valid base64"),
        (
            thirty_one.as_str(),
            "decodes to 31 bytes, expected exactly 32",
        ),
        (
            thirty_three.as_str(),
            "decodes to 33 bytes, expected exactly 32",
        ),
    ];
    for (key, expected) in cases {
        let err = Sealer::from_base64(key, &[]).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, SealError::InvalidKey { .. }), "{err:?}");
        assert!(message.contains(expected), "{message}");
        assert!(message.contains("current encryption key"), "{message}");
        if !key.is_empty() {
            assert!(!message.contains(key), "error echoes the key: {message}");
        }
    }
    let err = Sealer::from_base64(KEY_A, &[KEY_B, &thirty_one]).unwrap_err();
    assert!(
        err.to_string().contains("previous encryption key 2"),
        "{err}"
    );
}

#[test]
fn sealer_debug_and_errors_hide_keys_and_plaintext() {
    let sealer = sealer(KEY_A, &[KEY_B]);
    let debug = format!("{sealer:?}");
    assert!(debug.contains(sealer.key_id()), "{debug}");
    assert!(!debug.contains(KEY_A) && !debug.contains(KEY_B), "{debug}");
    let sealed = sealer.seal(SECRET, "sub-1").unwrap();
    let err = sealer.open(&sealed, "sub-2").unwrap_err();
    assert!(!format!("{err} {err:?}").contains("secret body"));
}

#[test]
fn ephemeral_sealers_work_and_differ() {
    let a = Sealer::ephemeral();
    let b = Sealer::ephemeral();
    assert_ne!(a.key_id(), b.key_id());
    let sealed = a.seal(SECRET, "sub-1").unwrap();
    assert_eq!(a.open(&sealed, "sub-1").unwrap().as_str(), SECRET);
    assert!(b.open(&sealed, "sub-1").is_err());
}

// ---------------------------------------------------------------------------------------------
// cloud-init

#[test]
fn user_data_parses_back_with_key_hostname_and_template() {
    let config = Config::builtin();
    let template = &config.plans["starter"].cloud_init;
    let user_data = cloud_init::render(template, "vps-sub-1", FIXTURE_RSA, None).unwrap();
    assert!(user_data.starts_with("#cloud-config\n"));
    let doc: serde_norway::Value = serde_norway::from_str(&user_data).unwrap();
    assert_eq!(doc["hostname"], "vps-sub-1");
    assert_eq!(doc["ssh_authorized_keys"][0], FIXTURE_RSA);
    assert_eq!(doc["ssh_pwauth"], false);
    assert_eq!(doc["disable_root"], false);
    assert_eq!(doc["package_update"], true);
    let packages: Vec<&str> = doc["packages"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(packages, ["fail2ban", "unattended-upgrades"]);
    assert_eq!(
        doc["write_files"][0]["content"].as_str().unwrap(),
        template.write_files[0].content
    );
    assert_eq!(doc["write_files"][0]["permissions"], "0644");
    assert_eq!(doc["runcmd"][0], "systemctl enable --now fail2ban");
}

#[test]
fn empty_template_still_sets_hostname_and_key() {
    let user_data =
        cloud_init::render(&CloudInitTemplate::default(), "h1", FIXTURE_ED25519, None).unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&user_data).unwrap();
    assert_eq!(doc["hostname"], "h1");
    assert_eq!(doc["ssh_authorized_keys"][0], FIXTURE_ED25519);
    assert!(doc.get("packages").is_none() && doc.get("runcmd").is_none());
}

#[test]
fn user_data_over_32_kib_is_too_large() {
    let with_filler = |n: usize| CloudInitTemplate {
        runcmd: vec![format!("echo y{}", "x".repeat(n))],
        ..Default::default()
    };
    let base = cloud_init::render(&with_filler(0), "h", FIXTURE_ED25519, None)
        .unwrap()
        .len();
    let exact = with_filler(USER_DATA_LIMIT - base);
    let at_limit = cloud_init::render(&exact, "h", FIXTURE_ED25519, None).unwrap();
    assert_eq!(at_limit.len(), USER_DATA_LIMIT);

    let over = with_filler(USER_DATA_LIMIT - base + 1);
    let err = cloud_init::render(&over, "h", FIXTURE_ED25519, None).unwrap_err();
    match err {
        CloudInitError::TooLarge { size, limit } => {
            assert_eq!((size, limit), (USER_DATA_LIMIT + 1, 32 * 1024));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("32769") && message.contains("32768"),
        "{message}"
    );
    assert!(!message.contains("xxxx"), "error contains user_data");
}

// ---------------------------------------------------------------------------------------------
// config

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml")
}

#[test]
fn builtin_config_is_valid_and_is_the_default() {
    let builtin = Config::builtin();
    builtin.validate().unwrap();
    assert_eq!(Config::load(None).unwrap(), builtin);
    assert_eq!(Config::from_yaml_str("").unwrap(), builtin);
    assert_eq!(
        Config::from_yaml_str("# nothing but a comment\n").unwrap(),
        builtin
    );
    assert_eq!(builtin.plans.keys().collect::<Vec<_>>(), ["pro", "starter"]);
    assert_eq!(builtin.plans["starter"].server_type, "cx23");
    assert_eq!(builtin.plans["pro"].server_type, "cpx32");
    let ssh = &builtin.plans["pro"].firewall_rules[0];
    assert_eq!(
        (ssh.direction, ssh.protocol, ssh.port.as_deref()),
        (Direction::In, Protocol::Tcp, Some("22"))
    );
    assert_eq!(ssh.source_ips, ["0.0.0.0/0", "::/0"]);
    assert_eq!(
        builtin.plans["pro"].firewall_rules[1].protocol,
        Protocol::Icmp
    );
}

#[test]
fn example_file_is_exactly_the_builtin_config() {
    assert_eq!(
        Config::load(Some(&example_path())).unwrap(),
        Config::builtin()
    );
}

#[test]
fn builtin_config_survives_a_yaml_round_trip() {
    let yaml = serde_norway::to_string(&Config::builtin()).unwrap();
    assert_eq!(Config::from_yaml_str(&yaml).unwrap(), Config::builtin());
}

#[test]
fn omitted_fields_take_defaults_and_plans_replace_the_builtin_ones() {
    let config = Config::from_yaml_str(
        "concurrency: 4\n\
         ssh_key_algorithm: ed25519\n\
         plans:\n  gold:\n    server_type: ccx13\n    image: debian-12\n    location: nbg1\n    \
         firewall_rules:\n      - {direction: in, protocol: tcp, port: 443, \
         source_ips: [\"2001:0DB8::0/32\"]}\n",
    )
    .unwrap();
    let builtin = Config::builtin();
    assert_eq!(config.concurrency, 4);
    assert_eq!(config.ssh_key_algorithm, KeyAlgorithm::Ed25519);
    assert_eq!(config.instance, builtin.instance);
    assert_eq!(config.lifecycle, builtin.lifecycle);
    assert_eq!(config.deletion_budget, builtin.deletion_budget);
    assert_eq!(config.resync_seconds, 60);
    assert_eq!(config.plans.keys().collect::<Vec<_>>(), ["gold"]);
    let gold = &config.plans["gold"];
    assert_eq!(gold.cloud_init, CloudInitTemplate::default());
    // A YAML number is accepted as a port; IPv6 CIDRs come back in the API's canonical form.
    assert_eq!(gold.firewall_rules[0].port.as_deref(), Some("443"));
    assert_eq!(gold.firewall_rules[0].source_ips, ["2001:db8::/32"]);
}

/// A valid config with plan `pro` whose first rule and cloud-init the cases below replace.
fn config_with(top: &str, rules: &str, cloud_init: &str) -> String {
    format!(
        "{top}\nplans:\n  starter:\n    server_type: cx23\n    image: ubuntu-24.04\n    location: fsn1\n    \
         firewall_rules: []\n  pro:\n    server_type: cpx32\n    image: ubuntu-24.04\n    \
         location: fsn1\n    firewall_rules:\n      - {{direction: in, protocol: tcp, port: \"22\", \
         source_ips: [0.0.0.0/0]}}\n{rules}\n    cloud_init: {{{cloud_init}}}\n"
    )
}

#[test]
fn each_kind_of_bad_config_names_the_field_and_problem() {
    let rule = |r: &str| config_with("", &format!("      - {{{r}}}"), "");
    let top = |t: &str| config_with(t, "", "");
    let cloud = |c: &str| config_with("", "", c);
    let many_rules = (0..50)
        .map(|_| "      - {direction: in, protocol: icmp, source_ips: [\"::/0\"]}")
        .collect::<Vec<_>>()
        .join("\n");
    let many_ips = (0..101)
        .map(|i| format!("10.0.{i}.0/24"))
        .collect::<Vec<_>>()
        .join(", ");
    let cases: Vec<(String, &str)> = vec![
        // shape errors, reported by the parser with the field path
        (top("instnce: x"), "unknown field `instnce`"),
        (cloud("packges: [vim]"), "plans.pro.cloud_init: unknown field `packges`"),
        (rule("direction: in, protocol: tcp, port: \"1\", sources: []"), "plans.pro.firewall_rules[1]: unknown field `sources`"),
        (rule("direction: up, protocol: tcp"), "plans.pro.firewall_rules[1].direction: unknown variant `up`"),
        (rule("direction: in, protocol: sctp"), "plans.pro.firewall_rules[1].protocol: unknown variant `sctp`"),
        (top("ssh_key_algorithm: dsa"), "ssh_key_algorithm: unknown variant `dsa`"),
        (top("resync_seconds: -5"), "resync_seconds: invalid type"),
        ("plans:\n  pro:\n    image: x\n    location: y\n    firewall_rules: []\n".to_owned(), "plans.pro: missing field `server_type`"),
        ("plans:\n  a: {server_type: x, image: y, location: z, firewall_rules: []}\n  a: {server_type: x, image: y, location: z, firewall_rules: []}\n".to_owned(), "plans: plan \"a\" is defined twice"),
        ("plans: [starter]".to_owned(), "plans: invalid type: sequence"),
        ("plans:\n  pro: {server_type: x\n".to_owned(), "at line 3 column 1"),
        // value errors, reported by validation with the field path
        (top("instance: \"-bad\""), "instance: \"-bad\" is not a valid Hetzner label value"),
        (top("instance: \"\""), "instance: must not be empty"),
        (top("name_prefix: VPS"), "name_prefix: \"VPS\" is not a lowercase DNS label of 1-20 characters"),
        (top("name_prefix: abcdefghijklmnopqrstu"), "name_prefix: \"abcdefghijklmnopqrstu\" is not a lowercase DNS label"),
        (top("active_statuses: [active]"), "active_statuses: was replaced by lifecycle.run"),
        (top("lifecycle: {run: [active, Actve]}"), "lifecycle.run[1]: \"Actve\" is not a subscription status: lowercase letters and '_' only (Stripe's are incomplete, incomplete_expired, trialing, active, past_due, canceled, unpaid, paused)"),
        (top("lifecycle: {run: [active, active]}"), "lifecycle.run[1]: \"active\" is listed twice"),
        (top("lifecycle: {run: []}"), "lifecycle.run: must list at least one status"),
        (top("lifecycle: {run: [active], delete: [active]}"), "lifecycle.delete[0]: \"active\" is already listed in lifecycle.run; a status has one policy"),
        (top("lifecycle: {grace_period_hours: 9000}"), "lifecycle.grace_period_hours: 9000 is out of range 0-8760"),
        (top("lifecycle: {snapshot_retention_days: 0}"), "lifecycle.snapshot_retention_days: 0 is out of range 1-3650"),
        (top("lifecycle: {suspend: [paused], supsend: [unpaid]}"), "lifecycle: unknown field `supsend`"),
        (top("deletion_budget: {fleet_percent: 101}"), "deletion_budget.fleet_percent: 101 is out of range 0-100"),
        (top("resync_seconds: 0"), "resync_seconds: 0 is out of range 1-86400"),
        (top("concurrency: 0"), "concurrency: 0 is out of range 1-64"),
        (top("concurrency: 65"), "concurrency: 65 is out of range 1-64"),
        (top("shutdown_timeout_seconds: 3601"), "shutdown_timeout_seconds: 3601 is out of range 0-3600"),
        ("plans: {}".to_owned(), "plans: must define at least one plan"),
        ("plans:\n  \"bad plan\": {server_type: x, image: y, location: z, firewall_rules: []}\n".to_owned(), "plans.bad plan: plan name \"bad plan\" must be"),
        ("plans:\n  p: {server_type: \"\", image: y, location: z, firewall_rules: []}\n".to_owned(), "plans.p.server_type: must not be empty"),
        ("plans:\n  p: {server_type: x, image: \"ubuntu 24\", location: z, firewall_rules: []}\n".to_owned(), "plans.p.image: \"ubuntu 24\" must not contain spaces"),
        ("plans:\n  p: {server_type: x, image: y, location: \"\", firewall_rules: []}\n".to_owned(), "plans.p.location: must not be empty"),
        (rule("direction: in, protocol: tcp, port: \"70000\", source_ips: [0.0.0.0/0]"), "plans.pro.firewall_rules[1].port: \"70000\" is not a port or range 1-65535"),
        (rule("direction: in, protocol: tcp, port: \"0\", source_ips: [0.0.0.0/0]"), "plans.pro.firewall_rules[1].port: \"0\" is not a port"),
        (rule("direction: in, protocol: udp, port: \"5000-1024\", source_ips: [0.0.0.0/0]"), "plans.pro.firewall_rules[1].port: \"5000-1024\": range start 5000 is above its end 1024"),
        (rule("direction: in, protocol: tcp, source_ips: [0.0.0.0/0]"), "plans.pro.firewall_rules[1].port: is required for protocol tcp"),
        (rule("direction: in, protocol: icmp, port: \"80\", source_ips: [0.0.0.0/0]"), "plans.pro.firewall_rules[1].port: is only allowed for tcp and udp, not icmp"),
        (rule("direction: in, protocol: gre, destination_ips: [0.0.0.0/0], source_ips: [0.0.0.0/0]"), "plans.pro.firewall_rules[1].destination_ips: is not allowed for direction in (use source_ips)"),
        (rule("direction: out, protocol: esp, source_ips: [0.0.0.0/0], destination_ips: [\"::/0\"]"), "plans.pro.firewall_rules[1].source_ips: is not allowed for direction out (use destination_ips)"),
        (rule("direction: in, protocol: icmp"), "plans.pro.firewall_rules[1].source_ips: needs at least one CIDR for direction in"),
        (rule("direction: out, protocol: icmp"), "plans.pro.firewall_rules[1].destination_ips: needs at least one CIDR for direction out"),
        (rule("direction: in, protocol: icmp, source_ips: [0.0.0.0/0, 10.0.0.1]"), "plans.pro.firewall_rules[1].source_ips[1]: \"10.0.0.1\" is not a CIDR"),
        (rule("direction: in, protocol: icmp, source_ips: [10.0.0.1/8]"), "plans.pro.firewall_rules[1].source_ips[0]: \"10.0.0.1/8\" has host bits set (did you mean \"10.0.0.0/8\"?)"),
        (rule("direction: out, protocol: icmp, destination_ips: [\"2001:db8::/129\"]"), "plans.pro.firewall_rules[1].destination_ips[0]: \"2001:db8::/129\" is not a CIDR: prefix length must be 0-128"),
        (rule("direction: in, protocol: icmp, source_ips: [300.1.1.1/32]"), "plans.pro.firewall_rules[1].source_ips[0]: \"300.1.1.1/32\" is not a CIDR"),
        (rule(&format!("direction: in, protocol: icmp, source_ips: [{many_ips}]")), "plans.pro.firewall_rules[1].source_ips: has 101 entries; Hetzner allows at most 100"),
        (rule(&format!("direction: in, protocol: icmp, source_ips: [\"::/0\"], description: {}", "d".repeat(256))), "plans.pro.firewall_rules[1].description: is 256 characters; Hetzner allows at most 255"),
        (config_with("", &many_rules, ""), "plans.pro.firewall_rules: has 51 rules; Hetzner allows at most 50"),
        (cloud("packages: [vim, \"two words\"]"), "plans.pro.cloud_init.packages[1]: \"two words\" is not a package name"),
        (cloud("write_files: [{path: etc/motd, content: hi}]"), "plans.pro.cloud_init.write_files[0].path: \"etc/motd\" is not an absolute path"),
        (cloud("write_files: [{path: /etc/motd, content: hi, permissions: \"rw-r--r--\"}]"), "plans.pro.cloud_init.write_files[0].permissions: \"rw-r--r--\" is not an octal mode"),
        (cloud("write_files: [{path: /etc/motd, content: hi, owner: \"root:\"}]"), "plans.pro.cloud_init.write_files[0].owner: \"root:\" is not"),
        (cloud("write_files: [{path: /etc/motd, content: hi, mode: \"0644\"}]"), "plans.pro.cloud_init.write_files[0]: unknown field `mode`"),
        (cloud("runcmd: [\"\"]"), "plans.pro.cloud_init.runcmd[0]: is empty"),
        (cloud(&format!("runcmd: [\"{}\"]", "x".repeat(USER_DATA_LIMIT))), "plans.pro.cloud_init: renders to up to"),
    ];
    for (yaml, expected) in &cases {
        let err = match Config::from_yaml_str(yaml) {
            Ok(_) => panic!("accepted a config that should fail with {expected:?}:\n{yaml}"),
            Err(err) => err,
        };
        let message = err.to_string();
        assert!(
            message.contains(expected),
            "expected {expected:?} in the error, got:\n{message}\nfor:\n{yaml}"
        );
        assert!(message.starts_with("config: "), "{message}");
    }
    // The base of the table is itself valid, so each case fails for its own reason.
    Config::from_yaml_str(&config_with("", "", "")).unwrap();
}

#[test]
fn all_problems_are_reported_at_once() {
    let err =
        Config::from_yaml_str("concurrency: 0\nresync_seconds: 0\nname_prefix: X\n").unwrap_err();
    let fields: Vec<&str> = err.problems().iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["name_prefix", "resync_seconds", "concurrency"]);
    assert!(err.to_string().contains("3 problems"), "{err}");
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_temp(&dir, "bad.yaml", "concurrency: 100\n");
    let err = Config::load(Some(&bad)).unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "config file {}: concurrency: 100 is out of range 1-64",
            bad.display()
        )
    );

    let unparsable = write_temp(&dir, "unparsable.yaml", "plans: [\n");
    let message = Config::load(Some(&unparsable)).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!("config file {}: ", unparsable.display())),
        "{message}"
    );

    let missing = dir.path().join("missing.yaml");
    let err = Config::load(Some(&missing)).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}

#[test]
fn the_kubernetes_config_map_is_a_valid_config() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/base/config.yaml");
    let config = Config::load(Some(&path)).unwrap_or_else(|e| panic!("{e}"));
    config.validate().unwrap();
    assert_eq!(config.plans.keys().collect::<Vec<_>>(), ["pro", "starter"]);
    assert_eq!(config.plans["starter"].server_type, "cx23");
    assert_eq!(config.plans["pro"].server_type, "cpx32");
}
