//! What the simulated SSH endpoint knows of each server: the host key it presents, the keys
//! root accepts, cloud-init's progress, the files clients wrote, the commands they ran, the
//! faults armed for it; and the endpoint-wide counters and default faults. All of it lives in
//! the [`World`](crate::state::World), under its lock, so deleting a server drops its SSH state
//! with it.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use ssh_key::private::Ed25519Keypair;
use ssh_key::{Algorithm, PrivateKey, PublicKey};
use tokio::sync::watch;

/// Commands kept per server; older ones are dropped first (a soak runs many).
pub(crate) const MAX_COMMANDS: usize = 10_000;

/// cloud-init's state as `cloud-init status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloudInit {
    Running,
    Done,
    Error,
}

impl CloudInit {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CloudInit::Running => "running",
            CloudInit::Done => "done",
            CloudInit::Error => "error",
        }
    }

    fn parse(s: &str) -> Option<CloudInit> {
        [CloudInit::Running, CloudInit::Done, CloudInit::Error]
            .into_iter()
            .find(|c| c.as_str() == s)
    }

    /// The exit status of `cloud-init status` (1 for error, as cloud-init gives).
    pub(crate) fn exit_status(self) -> u32 {
        match self {
            CloudInit::Error => 1,
            CloudInit::Running | CloudInit::Done => 0,
        }
    }
}

/// Trouble armed for a server's SSH endpoint (or the defaults for servers without their own).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SshFaults {
    /// Accept the TCP connection, then close it before the banner.
    pub refuse: bool,
    /// Accept and never send anything (the connection stays open).
    pub stall: bool,
    /// Present a fresh random ed25519 host key instead of the server's.
    pub wrong_host_key: bool,
    /// cloud-init's state, whatever the timer says.
    pub cloud_init: Option<CloudInit>,
    /// Commands containing this fail (stderr `simulated failure`, exit 1).
    pub fail_command: Option<String>,
    /// Commands containing this never answer.
    pub hang_command: Option<String>,
}

/// Why a faults body was refused: the field and what is wrong with it.
pub(crate) struct FaultsError {
    pub field: String,
    pub message: String,
}

impl SshFaults {
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "refuse": self.refuse,
            "stall": self.stall,
            "wrong_host_key": self.wrong_host_key,
            "cloud_init": self.cloud_init.map(CloudInit::as_str),
            "fail_command": self.fail_command,
            "hang_command": self.hang_command,
        })
    }

    /// Parses `{"refuse": bool, "stall": bool, "wrong_host_key": bool, "cloud_init":
    /// "running"|"done"|"error", "fail_command": "substr", "hang_command": "substr"}`, every
    /// key optional (`null` = left out); unknown keys are refused.
    pub(crate) fn parse(body: &[u8]) -> Result<SshFaults, FaultsError> {
        let error = |field: &str, message: String| FaultsError {
            field: field.to_string(),
            message,
        };
        let value: Value = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Map::new())
        } else {
            serde_json::from_slice(body).map_err(|e| error("body", format!("not JSON: {e}")))?
        };
        let Value::Object(fields) = value else {
            return Err(error("body", "must be a JSON object".to_string()));
        };
        let mut faults = SshFaults::default();
        for (key, value) in &fields {
            if value.is_null() {
                continue;
            }
            let flag = |target: &mut bool| match value {
                Value::Bool(b) => {
                    *target = *b;
                    Ok(())
                }
                _ => Err(error(key, "must be true or false".to_string())),
            };
            let text = || match value {
                Value::String(s) => Ok(Some(s.clone())),
                _ => Err(error(key, "must be a string".to_string())),
            };
            match key.as_str() {
                "refuse" => flag(&mut faults.refuse)?,
                "stall" => flag(&mut faults.stall)?,
                "wrong_host_key" => flag(&mut faults.wrong_host_key)?,
                "cloud_init" => {
                    let state = value.as_str().and_then(CloudInit::parse).ok_or_else(|| {
                        error(
                            key,
                            "must be \"running\", \"done\" or \"error\"".to_string(),
                        )
                    })?;
                    faults.cloud_init = Some(state);
                }
                "fail_command" => faults.fail_command = text()?,
                "hang_command" => faults.hang_command = text()?,
                _ => {
                    return Err(error(
                        key,
                        "unknown field (expected refuse, stall, wrong_host_key, cloud_init, \
                         fail_command, hang_command)"
                            .to_string(),
                    ));
                }
            }
        }
        Ok(faults)
    }
}

/// One file a client wrote.
#[derive(Clone, Debug)]
pub(crate) struct SimFile {
    /// Four octal digits, `0644`.
    pub mode: String,
    pub content: Vec<u8>,
    /// How many times it was written.
    pub writes: u64,
}

/// One `exec` request.
#[derive(Clone, Debug)]
pub(crate) struct CommandRecord {
    pub seq: u64,
    pub command: String,
    /// `None` while it runs (or hangs).
    pub exit_status: Option<u32>,
    pub stdin_bytes: u64,
}

/// A server's SSH side.
pub(crate) struct ServerSsh {
    /// The key presented when no fault says otherwise.
    pub host_key: PrivateKey,
    /// Keys of the Hetzner SSH key objects given at create (kept across rebuilds, as they are
    /// copied onto the disk, not looked up).
    pub hetzner_keys: Vec<PublicKey>,
    /// What root accepts: `hetzner_keys` plus user_data `ssh_authorized_keys`.
    pub authorized: Vec<PublicKey>,
    /// When the server first reached `running` (cloud-init starts then).
    pub running_since: Option<Instant>,
    /// This server's faults; `None` = the endpoint's defaults.
    pub faults: Option<SshFaults>,
    pub files: BTreeMap<String, SimFile>,
    pub commands: VecDeque<CommandRecord>,
    next_seq: u64,
    /// Connections that authenticated.
    pub sessions: u64,
    pub auth_failures: u64,
    /// Dropped with this state (server deleted or rebuilt): open connections see it and close.
    gone: watch::Sender<()>,
}

impl ServerSsh {
    /// A freshly installed server: host key from user_data's `ssh_keys` if it has an ed25519
    /// pair, else a new random one; root accepts `hetzner_keys` and user_data's
    /// `ssh_authorized_keys`.
    pub(crate) fn new(user_data: Option<&str>, hetzner_keys: Vec<PublicKey>) -> ServerSsh {
        let cloud_config = user_data.and_then(CloudConfig::parse).unwrap_or_default();
        let host_key = cloud_config.host_key().unwrap_or_else(random_host_key);
        let mut authorized = hetzner_keys.clone();
        for key in cloud_config.authorized_keys() {
            if !authorized.iter().any(|k| k.key_data() == key.key_data()) {
                authorized.push(key);
            }
        }
        ServerSsh {
            host_key,
            hetzner_keys,
            authorized,
            running_since: None,
            faults: None,
            files: BTreeMap::new(),
            commands: VecDeque::new(),
            next_seq: 1,
            sessions: 0,
            auth_failures: 0,
            gone: watch::channel(()).0,
        }
    }

    /// A rebuild: the host key, authorized keys, files and cloud-init start over (and open
    /// connections close, as the server reboots); faults, counters and the command log stay.
    pub(crate) fn reinstall(&mut self, user_data: Option<&str>) {
        let fresh = ServerSsh::new(user_data, std::mem::take(&mut self.hetzner_keys));
        let old = std::mem::replace(self, fresh);
        self.faults = old.faults;
        self.commands = old.commands;
        self.next_seq = old.next_seq;
        self.sessions = old.sessions;
        self.auth_failures = old.auth_failures;
    }

    /// Resolves when this state is dropped.
    pub(crate) fn gone(&self) -> watch::Receiver<()> {
        self.gone.subscribe()
    }

    /// Whether root may log in with `key`.
    pub(crate) fn accepts(&self, key: &PublicKey) -> bool {
        self.authorized
            .iter()
            .any(|k| k.key_data() == key.key_data())
    }

    /// cloud-init's state now: a fault's, else done `cloud_init` after the server reached
    /// `running`.
    pub(crate) fn cloud_init(
        &self,
        faults: &SshFaults,
        cloud_init: Duration,
        now: Instant,
    ) -> CloudInit {
        if let Some(state) = faults.cloud_init {
            return state;
        }
        match self.running_since {
            Some(since) if now.saturating_duration_since(since) >= cloud_init => CloudInit::Done,
            _ => CloudInit::Running,
        }
    }

    /// Records an `exec` request; its sequence number.
    pub(crate) fn record(&mut self, command: String) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.commands.len() >= MAX_COMMANDS {
            self.commands.pop_front();
        }
        self.commands.push_back(CommandRecord {
            seq,
            command,
            exit_status: None,
            stdin_bytes: 0,
        });
        seq
    }

    pub(crate) fn command_mut(&mut self, seq: u64) -> Option<&mut CommandRecord> {
        self.commands.iter_mut().rev().find(|c| c.seq == seq)
    }

    pub(crate) fn write_file(&mut self, path: String, mode: String, content: Vec<u8>) {
        let writes = self.files.get(&path).map_or(0, |f| f.writes) + 1;
        self.files.insert(
            path,
            SimFile {
                mode,
                content,
                writes,
            },
        );
    }
}

/// The endpoint-wide SSH state.
pub(crate) struct SshWorld {
    /// The address the listener bound.
    pub listen: SocketAddr,
    /// How long cloud-init runs after a server reached `running`.
    pub cloud_init: Duration,
    /// Faults for servers without their own.
    pub default_faults: SshFaults,
    /// Authenticated connections open now.
    pub active_sessions: u64,
    pub max_active_sessions: u64,
    /// Every TCP connection accepted.
    pub connections_total: u64,
    pub auth_failures: u64,
}

impl SshWorld {
    pub(crate) fn new(listen: SocketAddr, cloud_init: Duration) -> SshWorld {
        SshWorld {
            listen,
            cloud_init,
            default_faults: SshFaults::default(),
            active_sessions: 0,
            max_active_sessions: 0,
            connections_total: 0,
            auth_failures: 0,
        }
    }

    /// `/__simulator/reset`: counters back to zero (the high-water mark to what is open now).
    pub(crate) fn reset_counters(&mut self) {
        self.max_active_sessions = self.active_sessions;
        self.connections_total = 0;
        self.auth_failures = 0;
    }
}

/// A `#cloud-config` document (as JSON values: only a few keys are read, each on its own, so
/// one odd key does not hide the others).
#[derive(Debug, Default)]
struct CloudConfig(Value);

impl CloudConfig {
    /// `None` unless `user_data` is a `#cloud-config` YAML document.
    fn parse(user_data: &str) -> Option<CloudConfig> {
        let first = user_data.lines().next()?;
        if first.trim_end() != "#cloud-config" {
            return None;
        }
        serde_norway::from_str(user_data).ok().map(CloudConfig)
    }

    /// `ssh_keys.ed25519_private`, if it is an unencrypted ed25519 key in OpenSSH format.
    fn host_key(&self) -> Option<PrivateKey> {
        let pem = self.0.get("ssh_keys")?.get("ed25519_private")?.as_str()?;
        let key = PrivateKey::from_openssh(pem.trim()).ok()?;
        (key.algorithm() == Algorithm::Ed25519 && !key.is_encrypted()).then_some(key)
    }

    /// The entries of `ssh_authorized_keys` that are public key lines (others are skipped, as
    /// sshd skips lines it cannot read).
    fn authorized_keys(&self) -> Vec<PublicKey> {
        self.0
            .get("ssh_authorized_keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|line| PublicKey::from_openssh(line.trim()).ok())
            .collect()
    }
}

/// The one-line public form of a host key, without comment: `ssh-ed25519 AAAA…`.
pub(crate) fn public_line(key: &PrivateKey) -> String {
    PublicKey::new(key.public_key().key_data().clone(), "")
        .to_openssh()
        .unwrap_or_default()
}

/// A new ed25519 key, as a freshly installed server generates for itself.
pub(crate) fn random_host_key() -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&random_seed()))
}

/// 32 bytes from the OS (`/dev/urandom`); where that is missing, from the standard library's
/// per-process random hash keys, the time and a counter (a simulator's host keys need to
/// differ, not to resist attack).
fn random_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .is_ok()
    {
        return seed;
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    use std::hash::{BuildHasher, Hasher};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let state = std::collections::hash_map::RandomState::new();
    for (i, chunk) in seed.chunks_mut(8).enumerate() {
        let mut hasher = state.build_hasher();
        hasher.write_u128(nanos);
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_usize(i);
        let bytes = hasher.finish().to_le_bytes();
        chunk.copy_from_slice(bytes.get(..chunk.len()).unwrap_or(&bytes));
    }
    seed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn pem(key: &PrivateKey) -> String {
        key.to_openssh(ssh_key::LineEnding::LF)
            .map(|p| p.to_string())
            .unwrap_or_default()
    }

    fn indent(text: &str) -> String {
        text.lines().map(|l| format!("    {l}\n")).collect()
    }

    #[test]
    fn host_key_and_authorized_keys_come_from_cloud_config() {
        let host = key(1);
        let user = key(2);
        let hetzner = key(3).public_key().clone();
        let user_data = format!(
            "#cloud-config\nssh_authorized_keys:\n  - {}\n  - not a key\nssh_keys:\n  \
             ed25519_private: |\n{}  ed25519_public: {}\npackages: [curl]\n",
            public_line(&user),
            indent(&pem(&host)),
            public_line(&host),
        );
        let ssh = ServerSsh::new(Some(&user_data), vec![hetzner.clone()]);
        assert_eq!(public_line(&ssh.host_key), public_line(&host));
        assert!(ssh.accepts(user.public_key()));
        assert!(ssh.accepts(&hetzner));
        assert!(!ssh.accepts(host.public_key()));
        assert_eq!(ssh.authorized.len(), 2);
    }

    #[test]
    fn without_cloud_config_keys_the_host_key_is_random() {
        for user_data in [
            None,
            Some("#!/bin/sh\necho hi\n"),
            Some("#cloud-config\n: : not yaml ["),
            Some("#cloud-config\nssh_keys:\n  ed25519_private: garbage\n"),
            Some("#cloud-config\nssh_keys: 7\n"),
            Some("#cloud-config\n"),
        ] {
            let a = ServerSsh::new(user_data, Vec::new());
            let b = ServerSsh::new(user_data, Vec::new());
            assert_eq!(a.host_key.algorithm(), Algorithm::Ed25519);
            assert_ne!(public_line(&a.host_key), public_line(&b.host_key));
            assert!(a.authorized.is_empty());
        }
    }

    #[test]
    fn cloud_init_is_done_after_the_timer_unless_a_fault_says_otherwise() {
        let mut ssh = ServerSsh::new(None, Vec::new());
        let t0 = Instant::now();
        let none = SshFaults::default();
        let two = Duration::from_secs(2);
        assert_eq!(ssh.cloud_init(&none, two, t0), CloudInit::Running);
        ssh.running_since = Some(t0);
        assert_eq!(ssh.cloud_init(&none, two, t0), CloudInit::Running);
        assert_eq!(ssh.cloud_init(&none, two, t0 + two), CloudInit::Done);
        let error = SshFaults {
            cloud_init: Some(CloudInit::Error),
            ..SshFaults::default()
        };
        assert_eq!(ssh.cloud_init(&error, two, t0 + two), CloudInit::Error);
    }

    #[test]
    fn faults_parse_and_name_the_bad_field() {
        let faults = SshFaults::parse(
            br#"{"refuse": true, "cloud_init": "error", "fail_command": "apt", "stall": null}"#,
        )
        .unwrap_or_default();
        assert!(faults.refuse && !faults.stall);
        assert_eq!(faults.cloud_init, Some(CloudInit::Error));
        assert_eq!(faults.fail_command.as_deref(), Some("apt"));
        assert_eq!(SshFaults::parse(b"").ok(), Some(SshFaults::default()));
        for (body, field) in [
            (&br#"{"refuse": 1}"#[..], "refuse"),
            (br#"{"cloud_init": "later"}"#, "cloud_init"),
            (br#"{"hang_command": 3}"#, "hang_command"),
            (br#"{"refuze": true}"#, "refuze"),
            (br#"[1]"#, "body"),
            (br#"{"#, "body"),
        ] {
            match SshFaults::parse(body) {
                Ok(_) => panic!("{body:?} accepted"),
                Err(e) => assert_eq!(e.field, field),
            }
        }
    }

    #[test]
    fn commands_are_bounded_and_found_by_sequence() {
        let mut ssh = ServerSsh::new(None, Vec::new());
        let first = ssh.record("a".to_string());
        for _ in 0..MAX_COMMANDS {
            ssh.record("b".to_string());
        }
        assert_eq!(ssh.commands.len(), MAX_COMMANDS);
        assert!(ssh.command_mut(first).is_none());
        let last = ssh.record("c".to_string());
        assert_eq!(ssh.command_mut(last).map(|c| c.command.as_str()), Some("c"));
    }
}
