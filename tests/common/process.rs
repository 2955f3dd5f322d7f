//! Running the real `vps-controller` executable as a subprocess: a cleared environment, output
//! captured to files, a guard that kills it, ports, the simulator, and scraping /metrics.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use base64::Engine as _;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use tempfile::TempDir;
use tokio::time::{Instant, sleep};

pub const BIN: &str = env!("CARGO_BIN_EXE_vps-controller");
/// Recognisable, so a leak into any output is found by a plain substring search.
pub const SECRET_TOKEN: &str = "hcloud-secret-Zq81xT4vPw";
/// Generous: the machine is shared with other builds, and RSA-4096 key generation is slow.
pub const DEADLINE: Duration = Duration::from_secs(120);
pub const POLL: Duration = Duration::from_millis(100);
pub const PORT_ATTEMPTS: usize = 5;

/// `vps-controller ARGS` in `dir`, with only PATH, HOME and `envs` in its environment, so
/// nothing (DATABASE_URL, HCLOUD_*, VPS_CONTROLLER_*, RUST_LOG) leaks in from the caller.
///
/// A command pointed (`HCLOUD_ENDPOINT`) at a simulator [`spawn_simulator`] started also gets
/// that simulator's SSH port (`VPS_CONTROLLER_SSH_PORT`), unless `envs` sets one: its servers
/// answer SSH there, as the README's demo passes `--ssh-port`.
pub fn command(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .current_dir(dir)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null());
    for name in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    let sets = |name: &str| envs.iter().find(|(key, _)| *key == name).map(|(_, v)| *v);
    if sets("VPS_CONTROLLER_SSH_PORT").is_none()
        && let Some(endpoint) = sets("HCLOUD_ENDPOINT")
        && let Some(port) =
            simulator_ssh_ports().get(endpoint.trim_end_matches('/').trim_end_matches("/v1"))
    {
        cmd.env("VPS_CONTROLLER_SSH_PORT", port.to_string());
    }
    cmd
}

/// The SSH port of the simulator [`spawn_simulator`] started at `sim_url` (its base URL), for
/// a controller that reaches its API another way (through a proxy).
#[allow(dead_code)]
pub fn simulator_ssh_port(sim_url: &str) -> Option<u16> {
    simulator_ssh_ports().get(sim_url).copied()
}

/// The SSH port of each simulator [`spawn_simulator`] started, by its base URL.
fn simulator_ssh_ports() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<String, u16>>
{
    static PORTS: std::sync::Mutex<std::collections::BTreeMap<String, u16>> =
        std::sync::Mutex::new(std::collections::BTreeMap::new());
    PORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The outcome of one finished run.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    pub fn assert_code(&self, expected: i32) -> &Self {
        assert_eq!(self.code, Some(expected), "{}", self.describe());
        self
    }

    /// A failure (exit 1, not clap's usage error 2) whose stderr names `needle`.
    pub fn assert_fails_naming(&self, needle: &str) {
        self.assert_code(1);
        assert!(
            self.stderr.contains(needle),
            "expected the error to name {needle:?}\n{}",
            self.describe()
        );
    }
}

/// Runs `vps-controller ARGS` to completion (failing the test if it hangs) and checks that
/// the token did not leak.
pub fn run_cli(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Ran {
    let mut child = ChildGuard::spawn(command(dir, args, envs));
    let deadline = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "`vps-controller {}` still running after {DEADLINE:?}\n{}",
            args.join(" "),
            child.output()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let ran = Ran {
        code: status.code(),
        stdout: std::fs::read_to_string(&child.stdout).unwrap(),
        stderr: child.stderr(),
    };
    assert_no_secret(&format!("{}{}", ran.stdout, ran.stderr), args);
    ran
}

pub fn assert_no_secret(output: &str, args: &[&str]) {
    assert!(
        !output.contains(SECRET_TOKEN),
        "`vps-controller {}` printed the API token:\n{output}",
        args.join(" ")
    );
}

/// A long-running `vps-controller` child. Its output goes to files (a pipe nobody reads would
/// fill up and block it); dropping the guard kills and reaps it, also when a test panics.
pub struct ChildGuard {
    pub child: Child,
    pub args: Vec<String>,
    _logs: TempDir,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl ChildGuard {
    pub fn spawn(mut cmd: Command) -> ChildGuard {
        let logs = tempfile::tempdir().unwrap();
        let stdout = logs.path().join("stdout");
        let stderr = logs.path().join("stderr");
        cmd.stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap());
        let args = cmd
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        ChildGuard {
            child: cmd.spawn().unwrap(),
            args,
            _logs: logs,
            stdout,
            stderr,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// stdout and stderr so far.
    pub fn output(&self) -> String {
        let stdout = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        format!(
            "--- stdout ---\n{stdout}\n--- stderr ---\n{}",
            self.stderr()
        )
    }

    pub fn assert_no_secret(&self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        assert_no_secret(&self.output(), &args);
    }

    /// Sends SIGTERM, as Kubernetes or systemd would on shutdown.
    pub fn terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM failed: {sent}");
    }

    /// Waits for the child to exit, failing the test after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "`vps-controller {}` still running {timeout:?} after SIGTERM\n{}",
                self.args.join(" "),
                self.output()
            );
            sleep(POLL).await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Already exited: kill fails harmlessly; wait reaps either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// A port that was free a moment ago; another process may take it before we bind it again,
/// which [`spawn_listening`] handles by retrying.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `make(port)` on a free port and waits until `GET probe` answers 200. Retries with
/// another port when the child could not bind (the port was taken in between).
pub async fn spawn_listening(make: impl Fn(u16) -> Command, probe: &str) -> (ChildGuard, String) {
    let http = http_client();
    for _ in 0..PORT_ATTEMPTS {
        let port = free_port();
        let base_url = format!("http://127.0.0.1:{port}");
        let mut child = ChildGuard::spawn(make(port));
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(response) = http.get(format!("{base_url}{probe}")).send().await
                && response.status() == reqwest::StatusCode::OK
            {
                return (child, base_url);
            }
            if let Some(status) = child.child.try_wait().unwrap() {
                if child.stderr().contains("cannot bind") {
                    break;
                }
                panic!(
                    "`vps-controller {}` exited ({status}) before {probe} answered\n{}",
                    child.args.join(" "),
                    child.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{probe} did not answer 200 within {DEADLINE:?}\n{}",
                child.output()
            );
            sleep(POLL).await;
        }
    }
    panic!("no free port after {PORT_ATTEMPTS} attempts");
}

/// `vps-controller simulator` on a free port, requiring [`SECRET_TOKEN`]; its base URL. Its
/// SSH endpoint listens on a free port too (see [`command`]), unless `extra` says otherwise.
pub async fn spawn_simulator(dir: &Path, extra: &[&str]) -> (ChildGuard, String) {
    let own_ssh = extra
        .iter()
        .any(|a| *a == "--ssh-listen" || *a == "--no-ssh");
    let (child, url) = spawn_listening(
        |port| {
            let listen = format!("127.0.0.1:{port}");
            let mut args = vec!["simulator", "--listen", &listen, "--token", SECRET_TOKEN];
            if !own_ssh {
                args.extend(["--ssh-listen", "0.0.0.0:0"]);
            }
            args.extend_from_slice(extra);
            command(dir, &args, &[])
        },
        "/__simulator/stats",
    )
    .await;
    let ssh: serde_json::Value = match http_client()
        .get(format!("{url}/__simulator/ssh"))
        .send()
        .await
    {
        Ok(response) if response.status().is_success() => response.json().await.unwrap(),
        _ => serde_json::Value::Null,
    };
    if let Some(port) = ssh["listen"]
        .as_str()
        .and_then(|listen| listen.parse::<std::net::SocketAddr>().ok())
        .map(|addr| addr.port())
    {
        simulator_ssh_ports().insert(url.clone(), port);
    }
    (child, url)
}

/// A valid VPS_CONTROLLER_ENCRYPTION_KEY: 32 bytes, base64.
pub fn encryption_key() -> String {
    base64::engine::general_purpose::STANDARD.encode([7u8; 32])
}

pub fn sqlite_url(dir: &Path) -> String {
    format!(
        "sqlite://{}?mode=rwc",
        dir.join("vps-controller.db").display()
    )
}

pub async fn insert_subscription(db: &DatabaseConnection, id: &str, status: &str, plan: &str) {
    db.execute_unprepared(&format!(
        "INSERT INTO subscriptions (id, user_id, status, plan) \
         VALUES ('{id}', 'user-{id}', '{status}', '{plan}')"
    ))
    .await
    .unwrap();
}

/// The cells of `id`'s line in the `status` table.
pub fn status_row(table: &str, id: &str) -> Option<Vec<String>> {
    table
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.first().map(String::as_str) == Some(id))
}

/// The /metrics text of a controller at `base_url` (empty if it does not answer).
pub async fn metrics(http: &reqwest::Client, base_url: &str) -> String {
    match http.get(format!("{base_url}/metrics")).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The value of the sample line starting with `name ` (e.g. a gauge without labels).
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub fn signal(child: &ChildGuard, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &child.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success(), "kill {signal} failed: {sent}");
}

/// The value of the sample `name{labels…}` whose labels include `labels` (in any order).
pub fn metric_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (found, number) = match rest.strip_prefix('{') {
            Some(rest) => {
                let (inside, number) = rest.split_once("} ")?;
                let found: std::collections::BTreeMap<&str, &str> = inside
                    .split(',')
                    .filter_map(|pair| {
                        let (key, value) = pair.split_once('=')?;
                        Some((key, value.trim_matches('"')))
                    })
                    .collect();
                (found, number)
            }
            None => (std::collections::BTreeMap::new(), rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(key, wanted)| found.get(key) == Some(wanted))
            .then(|| number.split_whitespace().next()?.parse().ok())
            .flatten()
    })
}

/// The simulator's `/__simulator/stats` (request counts by endpoint, faults, …).
pub async fn simulator_stats(http: &reqwest::Client, sim_url: &str) -> serde_json::Value {
    http.get(format!("{sim_url}/__simulator/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Arms the simulator's faults (`POST /__simulator/faults`, see simulator/src/control.rs).
pub async fn arm_faults(http: &reqwest::Client, sim_url: &str, body: &serde_json::Value) {
    let response = http
        .post(format!("{sim_url}/__simulator/faults"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "arming {body}: {} {}",
        response.status(),
        response.text().await.unwrap_or_default()
    );
}

/// Clears every armed fault and the black hole.
pub async fn clear_faults(http: &reqwest::Client, sim_url: &str) {
    let response = http
        .delete(format!("{sim_url}/__simulator/faults"))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
}
