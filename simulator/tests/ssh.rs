//! The simulated SSH endpoint over real sockets, with russh as the client (what the
//! controller's bootstrap dials with): login, host keys, cloud-init, files, faults, counters.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcloud_simulator::{RunningSimulator, SimulatorConfig, SshConfig, spawn};
use reqwest::StatusCode;
use russh::client::{self, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};
use serde_json::{Value, json};
use ssh_key::private::Ed25519Keypair;
use ssh_key::{LineEnding, PrivateKey, PublicKey};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// Awaits `future`, failing the test if it takes longer than [`DEADLINE`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {DEADLINE:?}"))
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .unwrap()
}

fn key(seed: u8) -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
}

/// `ssh-ed25519 AAAA…` without comment.
fn line(key: &PublicKey) -> String {
    PublicKey::new(key.key_data().clone(), "")
        .to_openssh()
        .unwrap()
}

struct Sim {
    sim: RunningSimulator,
    http: reqwest::Client,
}

impl Sim {
    async fn start(cloud_init_seconds: f64) -> Sim {
        let sim = spawn(
            SimulatorConfig {
                action_seconds: 0.0,
                ssh: Some(SshConfig {
                    listen: SocketAddr::from(([0, 0, 0, 0], 0)),
                    cloud_init_seconds,
                }),
                ..SimulatorConfig::default()
            },
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .await
        .unwrap();
        Sim { sim, http: http() }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sim.addr())
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.send(reqwest::Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        body
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    async fn ssh_key_object(&self, name: &str, key: &PrivateKey) -> i64 {
        let (status, body) = self
            .post(
                "/v1/ssh_keys",
                json!({"name": name, "public_key": line(key.public_key())}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["ssh_key"]["id"].as_i64().unwrap()
    }

    /// Creates a server and waits until it is `running`; its ID and the SSH address to dial.
    async fn server(
        &self,
        name: &str,
        ssh_keys: &[i64],
        user_data: Option<&str>,
    ) -> (i64, SocketAddr) {
        let mut body = json!({"name": name, "server_type": "cx22", "image": "ubuntu-24.04",
                              "ssh_keys": ssh_keys});
        if let Some(user_data) = user_data {
            body["user_data"] = json!(user_data);
        }
        let (status, created) = self.post("/v1/servers", body).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let id = created["server"]["id"].as_i64().unwrap();
        let ip: Ipv4Addr = created["server"]["public_net"]["ipv4"]["ip"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        self.wait_for(&format!("/v1/servers/{id}"), "running", |s| {
            s["server"]["status"] == "running"
        })
        .await;
        let port = self.sim.ssh_addr().unwrap().port();
        (id, SocketAddr::new(IpAddr::V4(ip), port))
    }

    /// Polls GET `path` until `condition` holds; the last answer.
    async fn wait_for(&self, path: &str, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let body = self.get(path).await;
            if condition(&body) {
                return body;
            }
            assert!(Instant::now() < deadline, "{path}: never {what}: {body}");
            tokio::time::sleep(POLL).await;
        }
    }

    async fn ssh_state(&self, server: i64) -> Value {
        self.get(&format!("/__simulator/servers/{server}/ssh"))
            .await
    }

    /// Starts a simulator with a running `web-1` that root logs into with `key(1)` (object `ops`).
    async fn with_server(cloud_init_seconds: f64) -> (Sim, Server) {
        let sim = Sim::start(cloud_init_seconds).await;
        let root_key = key(1);
        let key_id = sim.ssh_key_object("ops", &root_key).await;
        let (id, addr) = sim.server("web-1", &[key_id], None).await;
        let server = Server {
            id,
            addr,
            root_key,
            key_id,
        };
        (sim, server)
    }
}

/// The server [`Sim::with_server`] made: its ID, SSH address, root's key and its key object.
struct Server {
    id: i64,
    addr: SocketAddr,
    root_key: PrivateKey,
    key_id: i64,
}

impl Server {
    /// A connection to this server, logged in as root with `root_key`.
    async fn logged_in(&self) -> Connection {
        logged_in(self.addr, &self.root_key).await
    }
}

/// A russh client that remembers the host key it was shown.
struct Client {
    host_key: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if let PublicKeyOrCertificate::PublicKey { key, .. } = key {
            *self.host_key.lock().unwrap() = Some(key.clone());
        }
        Ok(true)
    }
}

struct Connection {
    handle: Handle<Client>,
    host_key: PublicKey,
}

async fn connect(addr: SocketAddr) -> Connection {
    let seen = Arc::new(Mutex::new(None));
    let config = Arc::new(client::Config::default());
    let handle = within(
        "connect",
        client::connect(
            config,
            addr,
            Client {
                host_key: seen.clone(),
            },
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let host_key = seen.lock().unwrap().clone().expect("no host key shown");
    Connection { handle, host_key }
}

/// Connects to `addr` and logs in as root with `key`, failing the test if the login is refused.
async fn logged_in(addr: SocketAddr, key: &PrivateKey) -> Connection {
    let mut ssh = connect(addr).await;
    assert!(ssh.login("root", key).await, "root login to {addr} refused");
    ssh
}

impl Connection {
    async fn login(&mut self, user: &str, key: &PrivateKey) -> bool {
        let key = PrivateKeyWithHashAlg::new(Arc::new(key.clone()), None);
        within("auth", self.handle.authenticate_publickey(user, key))
            .await
            .unwrap()
            .success()
    }

    async fn run(&self, command: &str) -> Output {
        self.run_with_stdin(command, None).await
    }

    /// Runs `command` on a channel of its own, sending `stdin` then EOF if given; waits for the
    /// channel to close.
    async fn run_with_stdin(&self, command: &str, stdin: Option<&[u8]>) -> Output {
        within(command, async {
            let mut channel = self.handle.channel_open_session().await.unwrap();
            channel.exec(true, command).await.unwrap();
            if let Some(stdin) = stdin {
                channel.data(stdin).await.unwrap();
                channel.eof().await.unwrap();
            }
            let mut out = Output::default();
            while let Some(message) = channel.wait().await {
                match message {
                    ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, ext: 1 } => {
                        out.stderr.extend_from_slice(&data)
                    }
                    ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                    ChannelMsg::Eof => out.eof = true,
                    _ => {}
                }
            }
            out
        })
        .await
    }

    async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

#[derive(Debug, Default)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<u32>,
    eof: bool,
}

impl Output {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A `#cloud-config` giving the server `host` as its ed25519 host key and authorizing `user`.
fn cloud_config(host: &PrivateKey, user: &PrivateKey) -> String {
    let pem = host.to_openssh(LineEnding::LF).unwrap();
    let indented: String = pem.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "#cloud-config\nssh_authorized_keys:\n  - {}\nssh_keys:\n  ed25519_private: |\n{indented}  \
         ed25519_public: {}\nruncmd:\n  - [echo, hi]\n",
        line(user.public_key()),
        line(host.public_key()),
    )
}

#[tokio::test]
async fn an_attached_key_logs_in_as_root_and_cloud_init_is_done() {
    let (sim, web) = Sim::with_server(0.0).await;

    let ssh = web.logged_in().await;
    let out = ssh.run("cloud-init status --wait").await;
    assert_eq!(
        (out.stdout(), out.status, out.eof),
        ("status: done\n".to_string(), Some(0), true)
    );
    // The host key shown is the one the hook reports (generated at create).
    let state = sim.ssh_state(web.id).await;
    assert_eq!(state["host_key"], line(&ssh.host_key));
    assert_eq!(state["ipv4"], web.addr.ip().to_string());
    assert_eq!(state["sessions"], 1);
    assert_eq!(state["commands"][0]["command"], "cloud-init status --wait");
    assert_eq!(state["commands"][0]["exit_status"], 0);
    ssh.close().await;
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn a_key_not_attached_and_a_user_other_than_root_are_rejected_and_counted() {
    let (sim, web) = Sim::with_server(0.0).await;
    // A key object that exists but was not given to this server.
    sim.ssh_key_object("other", &key(2)).await;

    let mut ssh = connect(web.addr).await;
    assert!(!ssh.login("root", &key(2)).await);
    assert!(!ssh.login("ubuntu", &web.root_key).await);
    assert!(ssh.login("root", &web.root_key).await);
    let state = sim.ssh_state(web.id).await;
    assert_eq!(state["auth_failures"], 2, "{state}");
    assert_eq!(state["sessions"], 1);
    let endpoint = sim.get("/__simulator/ssh").await;
    assert_eq!(endpoint["auth_failures"], 2, "{endpoint}");
    ssh.close().await;
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn the_host_key_comes_from_user_data_and_wrong_host_key_presents_another() {
    let sim = Sim::start(0.0).await;
    let host = key(7);
    let user = key(8);
    let (id, addr) = sim
        .server("web-1", &[], Some(&cloud_config(&host, &user)))
        .await;

    let mut ssh = connect(addr).await;
    assert_eq!(line(&ssh.host_key), line(host.public_key()));
    // ssh_authorized_keys from user_data let root in.
    assert!(ssh.login("root", &user).await);
    ssh.close().await;
    assert_eq!(sim.ssh_state(id).await["host_key"], line(host.public_key()));

    let path = format!("/__simulator/servers/{id}/ssh/faults");
    let (status, armed) = sim.post(&path, json!({"wrong_host_key": true})).await;
    assert_eq!(status, StatusCode::OK, "{armed}");
    assert_eq!(armed["wrong_host_key"], true);
    let faulted = connect(addr).await;
    assert_ne!(line(&faulted.host_key), line(host.public_key()));
    assert_eq!(faulted.host_key.algorithm(), ssh_key::Algorithm::Ed25519);
    faulted.close().await;
    // The hook still names the key the server would present.
    assert_eq!(sim.ssh_state(id).await["host_key"], line(host.public_key()));

    let (status, _) = sim.delete(&path).await;
    assert_eq!(status, StatusCode::OK);
    let healed = connect(addr).await;
    assert_eq!(line(&healed.host_key), line(host.public_key()));
    healed.close().await;
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn install_then_cat_round_trips_content_and_mode() {
    let (sim, web) = Sim::with_server(0.0).await;
    let ssh = web.logged_in().await;

    let content = b"[agent]\nname = \"web 1\"\n";
    let install = ssh
        .run_with_stdin(
            "install -D -m 0600 /dev/stdin '/etc/agent/it'\\''s.toml'",
            Some(content),
        )
        .await;
    assert_eq!((install.status, install.stderr()), (Some(0), String::new()));
    // Several commands on one connection, each on its own channel.
    let cat = ssh.run("cat '/etc/agent/it'\\''s.toml'").await;
    assert_eq!((cat.stdout.as_slice(), cat.status), (&content[..], Some(0)));
    let missing = ssh.run("cat /etc/nothing").await;
    assert_eq!(missing.status, Some(1));
    assert_eq!(
        missing.stderr(),
        "cat: /etc/nothing: No such file or directory\n"
    );
    let bad_mode = ssh.run("install -D -m 0999 /dev/stdin /etc/x").await;
    assert_eq!(bad_mode.status, Some(1));
    assert!(
        bad_mode.stderr().contains("invalid mode"),
        "{}",
        bad_mode.stderr()
    );
    let other = ssh.run("systemctl restart agent").await;
    assert_eq!((other.status, other.stdout.len()), (Some(0), 0));

    let state = sim.ssh_state(web.id).await;
    let file = &state["files"]["/etc/agent/it's.toml"];
    assert_eq!(file["mode"], "0600", "{state}");
    assert_eq!(file["content"], String::from_utf8_lossy(content).as_ref());
    assert_eq!(file["writes"], 1);
    assert!(state["files"].get("/etc/x").is_none());
    let commands = state["commands"].as_array().unwrap();
    assert_eq!(commands.len(), 5);
    assert_eq!(commands[0]["stdin_bytes"], content.len());
    let statuses: Vec<&Value> = commands.iter().map(|c| &c["exit_status"]).collect();
    assert_eq!(
        statuses,
        [&json!(0), &json!(0), &json!(1), &json!(1), &json!(0)]
    );

    // A second write counts.
    ssh.run_with_stdin(
        "install -D -m 644 /dev/stdin '/etc/agent/it'\\''s.toml'",
        Some(b"v2"),
    )
    .await;
    let state = sim.ssh_state(web.id).await;
    let file = &state["files"]["/etc/agent/it's.toml"];
    assert_eq!(
        (&file["mode"], &file["content"], &file["writes"]),
        (&json!("0644"), &json!("v2"), &json!(2))
    );
    ssh.close().await;
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn cloud_init_running_blocks_until_the_fault_says_done() {
    let (sim, web) = Sim::with_server(0.0).await;
    let hook = format!("/__simulator/servers/{}/ssh", web.id);
    let faults = format!("{hook}/faults");
    let (status, _) = sim.post(&faults, json!({"cloud_init": "running"})).await;
    assert_eq!(status, StatusCode::OK);

    let ssh = Arc::new(web.logged_in().await);
    let waiting = tokio::spawn({
        let ssh = ssh.clone();
        async move { ssh.run("cloud-init status --wait").await }
    });
    sim.wait_for(&hook, "waiting", |s| {
        s["commands"][0]["command"] == "cloud-init status --wait"
            && s["commands"][0]["exit_status"].is_null()
    })
    .await;
    // Another command on the same connection answers meanwhile; the wait still waits.
    let now = ssh.run("cloud-init status").await;
    assert_eq!(
        (now.stdout(), now.status),
        ("status: running\n".to_string(), Some(0))
    );
    assert!(!waiting.is_finished());

    let (status, _) = sim.post(&faults, json!({"cloud_init": "done"})).await;
    assert_eq!(status, StatusCode::OK);
    let out = within("wait", waiting).await.unwrap();
    assert_eq!(
        (out.stdout(), out.status),
        ("status: done\n".to_string(), Some(0))
    );
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn cloud_init_error_and_fail_command_exit_1() {
    let (sim, web) = Sim::with_server(0.0).await;
    // Defaults: every server without faults of its own.
    let (status, _) = sim
        .post(
            "/__simulator/ssh/faults",
            json!({"cloud_init": "error", "fail_command": "apt-get"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let ssh = web.logged_in().await;
    let wait = ssh.run("cloud-init status --wait").await;
    assert_eq!(
        (wait.stdout(), wait.status),
        ("status: error\n".to_string(), Some(1))
    );
    let status_now = ssh.run("cloud-init status").await;
    assert_eq!(
        (status_now.stdout(), status_now.status),
        ("status: error\n".to_string(), Some(1))
    );
    let failed = ssh.run("apt-get install -y agent").await;
    assert_eq!(
        (failed.stderr(), failed.status),
        ("simulated failure\n".to_string(), Some(1))
    );
    let fine = ssh.run("systemctl enable agent").await;
    assert_eq!(fine.status, Some(0));

    let (status, _) = sim.delete("/__simulator/ssh/faults").await;
    assert_eq!(status, StatusCode::OK);
    let healed = ssh.run("apt-get install -y agent").await;
    assert_eq!(healed.status, Some(0));
    ssh.close().await;
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn cloud_init_finishes_its_seconds_after_the_server_runs() {
    let sim = Sim::start(0.4).await;
    let root_key = key(1);
    let key_id = sim.ssh_key_object("ops", &root_key).await;
    let before = Instant::now();
    let (id, addr) = sim.server("web-1", &[key_id], None).await;
    let ssh = logged_in(addr, &root_key).await;
    let out = ssh.run("cloud-init status --wait").await;
    assert_eq!(
        (out.stdout(), out.status),
        ("status: done\n".to_string(), Some(0))
    );
    assert!(
        before.elapsed() >= Duration::from_millis(400),
        "{:?}",
        before.elapsed()
    );
    assert_eq!(sim.ssh_state(id).await["cloud_init"], "done");
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn hang_command_never_answers_but_the_connection_still_works() {
    let (sim, web) = Sim::with_server(0.0).await;
    let hook = format!("/__simulator/servers/{}/ssh", web.id);
    let faults = format!("{hook}/faults");
    sim.post(&faults, json!({"hang_command": "sleepy"})).await;
    let ssh = Arc::new(web.logged_in().await);
    let hung = tokio::spawn({
        let ssh = ssh.clone();
        async move { ssh.run("sleepy --forever").await }
    });
    sim.wait_for(&hook, "hanging", |s| {
        s["commands"][0]["command"] == "sleepy --forever"
    })
    .await;
    let other = ssh.run("true").await;
    assert_eq!(other.status, Some(0));
    assert!(!hung.is_finished());
    assert!(sim.ssh_state(web.id).await["commands"][0]["exit_status"].is_null());
    hung.abort();
    sim.sim.shutdown().await;
}

/// Reads from a raw TCP connection until EOF or `limit`; what came.
async fn read_raw(addr: SocketAddr, limit: Duration) -> (Vec<u8>, bool) {
    let mut stream = within("tcp connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.contains(&b'\n') {
                    return (got, false);
                }
            }
            Err(_) => return (got, false),
        }
    }
}

#[tokio::test]
async fn refuse_closes_before_the_banner_and_stall_says_nothing() {
    let sim = Sim::start(0.0).await;
    let (id, addr) = sim.server("web-1", &[], None).await;
    let (banner, _) = read_raw(addr, DEADLINE).await;
    assert!(banner.starts_with(b"SSH-2.0-"), "{banner:?}");

    let faults = format!("/__simulator/servers/{id}/ssh/faults");
    sim.post(&faults, json!({"refuse": true})).await;
    let (got, closed) = read_raw(addr, DEADLINE).await;
    assert!(
        got.is_empty() && closed,
        "refused: {got:?}, closed {closed}"
    );

    sim.post(&faults, json!({"stall": true})).await;
    let (got, closed) = read_raw(addr, Duration::from_millis(300)).await;
    assert!(
        got.is_empty() && !closed,
        "stalled: {got:?}, closed {closed}"
    );

    // A loopback address no server has: closed at once.
    let nobody = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 2, 255, 254)), addr.port());
    let (got, closed) = read_raw(nobody, DEADLINE).await;
    assert!(got.is_empty() && closed);
    assert!(sim.get("/__simulator/ssh").await["connections_total"].as_u64() >= Some(4));
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn public_ipv4s_are_distinct_loopback_addresses() {
    let sim = Sim::start(0.0).await;
    let mut live = Vec::new();
    for i in 0..4 {
        live.push(sim.server(&format!("web-{i}"), &[], None).await);
    }
    let (gone, _) = live.remove(1);
    assert_eq!(
        sim.delete(&format!("/v1/servers/{gone}")).await.0,
        StatusCode::OK
    );
    live.push(sim.server("web-9", &[], None).await);
    let ips: Vec<IpAddr> = live.iter().map(|(_, addr)| addr.ip()).collect();
    for ip in &ips {
        assert!(ip.is_loopback(), "{ip}");
        assert_ne!(*ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let mut distinct = ips.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), ips.len(), "{ips:?}");
    // Each address reaches its own server: the host keys differ.
    let a = connect(live[0].1).await;
    let b = connect(live[1].1).await;
    assert_ne!(line(&a.host_key), line(&b.host_key));
    assert_eq!(
        sim.ssh_state(live[1].0).await["host_key"],
        line(&b.host_key)
    );
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn max_active_sessions_counts_concurrent_connections() {
    let (sim, web) = Sim::with_server(0.0).await;
    let (_, second) = sim.server("web-2", &[web.key_id], None).await;
    let mut open = Vec::new();
    for addr in [web.addr, second, web.addr] {
        open.push(logged_in(addr, &web.root_key).await);
    }
    let state = sim.get("/__simulator/ssh").await;
    assert_eq!(
        (&state["active_sessions"], &state["max_active_sessions"]),
        (&json!(3), &json!(3)),
        "{state}"
    );
    for ssh in open {
        ssh.close().await;
    }
    let state = sim
        .wait_for("/__simulator/ssh", "idle", |s| s["active_sessions"] == 0)
        .await;
    assert_eq!(state["max_active_sessions"], 3);
    assert_eq!(state["connections_total"], 3);
    assert!(
        state["listen"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{}", web.addr.port()))
    );

    // Reset zeroes the counters; the high-water mark restarts at what is open now.
    sim.post("/__simulator/reset", json!({})).await;
    let state = sim.get("/__simulator/ssh").await;
    assert_eq!(
        (&state["max_active_sessions"], &state["connections_total"]),
        (&json!(0), &json!(0))
    );
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn deleting_a_server_closes_its_connections_and_shutdown_stops_the_listener() {
    let (sim, web) = Sim::with_server(0.0).await;
    let ssh = web.logged_in().await;
    assert_eq!(
        sim.delete(&format!("/v1/servers/{}", web.id)).await.0,
        StatusCode::OK
    );
    let deadline = Instant::now() + DEADLINE;
    while !ssh.handle.is_closed() {
        assert!(Instant::now() < deadline, "the connection stayed open");
        tokio::time::sleep(POLL).await;
    }
    let (status, body) = sim
        .send(
            reqwest::Method::GET,
            &format!("/__simulator/servers/{}/ssh", web.id),
            None,
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("not_found"))
    );
    sim.wait_for("/__simulator/ssh", "idle", |s| s["active_sessions"] == 0)
        .await;

    let (_, other) = sim.server("web-2", &[web.key_id], None).await;
    let open = logged_in(other, &web.root_key).await;
    sim.sim.shutdown().await;
    let deadline = Instant::now() + DEADLINE;
    while !open.handle.is_closed() {
        assert!(
            Instant::now() < deadline,
            "the connection outlived the simulator"
        );
        tokio::time::sleep(POLL).await;
    }
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(other).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the SSH listener outlived the simulator"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn fault_bodies_are_checked_and_unknown_servers_are_404() {
    let sim = Sim::start(0.0).await;
    let (id, _) = sim.server("web-1", &[], None).await;
    let path = format!("/__simulator/servers/{id}/ssh/faults");
    for (body, field) in [
        (json!({"stall": "yes"}), "stall"),
        (json!({"cloud_init": "later"}), "cloud_init"),
        (json!({"fail_command": 1}), "fail_command"),
        (json!({"refuze": true}), "refuze"),
        (json!([1]), "body"),
    ] {
        let (status, answer) = sim.post(&path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(
            answer["error"]["details"]["fields"][0]["name"], field,
            "{answer}"
        );
        let (status, _) = sim.post("/__simulator/ssh/faults", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    for path in ["/__simulator/servers/999/ssh", "/__simulator/servers/x/ssh"] {
        let (status, body) = sim.send(reqwest::Method::GET, path, None).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (StatusCode::NOT_FOUND, &json!("not_found"))
        );
    }
    let (status, _) = sim
        .post(
            "/__simulator/servers/999/ssh/faults",
            json!({"stall": true}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    sim.sim.shutdown().await;
}

#[tokio::test]
async fn with_ssh_off_addresses_and_hooks_are_as_before() {
    let sim = spawn(
        SimulatorConfig {
            action_seconds: 0.0,
            ..SimulatorConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .unwrap();
    assert!(sim.ssh_addr().is_none());
    let http = http();
    let root = format!("http://{}", sim.addr());
    let created: Value = http
        .post(format!("{root}/v1/servers"))
        .json(&json!({"name": "web-1", "server_type": "cx22", "image": "ubuntu-24.04"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ip = created["server"]["public_net"]["ipv4"]["ip"]
        .as_str()
        .unwrap();
    assert!(ip.starts_with("198.18."), "{ip}");
    let status = http
        .get(format!("{root}/__simulator/ssh"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::NOT_FOUND);
    sim.shutdown().await;
}
