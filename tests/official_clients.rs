//! Hetzner's official clients against the built-in simulator, unchanged, each against its own
//! in-process simulator:
//! - hcloud-python: `tests/official_clients/hcloud_python_smoke.py`. Needs `python3` with
//!   `hcloud>=2.23,<3` (`python3 -m pip install 'hcloud>=2.23,<3'`; another interpreter can be
//!   named in `PYTHON`).
//! - the `hcloud` CLI (Debian's hcloud-cli 1.30, on hcloud-go 1.35):
//!   `tests/official_clients/hcloud_cli_scenario.sh`. Needs `hcloud` on the PATH
//!   (`apt-get install hcloud-cli`; another binary can be named in `HCLOUD_CLI`) and `bash`.
//!
//! A missing client skips its test with a loud warning, unless `CI` is set (and not `false`/`0`),
//! where the test fails.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use vps_controller::simulator::{RunningSimulator, SimulatorConfig, spawn};

const INSTALL_HINT: &str = "install it with: python3 -m pip install 'hcloud>=2.23,<3' \
     (or point PYTHON at an interpreter that has it)";

/// Generous: the script takes a few seconds; this only stops a hung client.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

fn python() -> String {
    std::env::var("PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

/// A simulator for one client run: its own token, short actions.
async fn simulator(token: &str) -> RunningSimulator {
    spawn(
        SimulatorConfig {
            token: Some(token.to_string()),
            action_seconds: 0.1,
            ..SimulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

fn script(name: &str) -> PathBuf {
    [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "official_clients",
        name,
    ]
    .iter()
    .collect()
}

/// Why the official client cannot run here, if it cannot.
async fn python_client_missing(python: &str) -> Option<String> {
    // hcloud-python >= 2.23 is the first release without `datacenter` (API-NOTES §4).
    let probe = "import sys, hcloud\n\
                 v = tuple(int(p) for p in hcloud.__version__.split('.')[:2])\n\
                 print(hcloud.__version__)\n\
                 sys.exit(0 if (2, 23) <= v < (3, 0) else 1)";
    match Command::new(python)
        .args(["-c", probe])
        .stdin(Stdio::null())
        .output()
        .await
    {
        Err(e) => Some(format!("`{python}` cannot be started: {e}")),
        Ok(out) if out.status.success() => None,
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // The import error's last line, or the version that was found.
            let found = stderr
                .lines()
                .last()
                .map(str::to_string)
                .unwrap_or_else(|| {
                    format!("found {}", String::from_utf8_lossy(&out.stdout).trim())
                });
            Some(format!(
                "`{python}` has no usable hcloud module (need >=2.23,<3): {found}"
            ))
        }
    }
}

#[tokio::test]
async fn official_python_client_works_against_the_simulator() {
    let python = python();
    if let Some(reason) = python_client_missing(&python).await {
        common::skip_or_fail(
            "official_python_client_works_against_the_simulator",
            &format!("needs hcloud-python: {reason}"),
            INSTALL_HINT,
        );
        return;
    }

    let token = "official-client-test-token";
    let simulator = simulator(token).await;
    let script = script("hcloud_python_smoke.py");
    // The simulator runs on this test's runtime: the child is awaited, never waited on blocking.
    let child = Command::new(&python)
        .arg(&script)
        .arg(simulator.base_url())
        // The token goes through the environment, not the (world-readable) command line.
        .env("HCLOUD_TOKEN", token)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    expect_all_checks_pass("hcloud-python", &script, child, simulator).await;
}

const CLI_INSTALL_HINT: &str = "install it with: apt-get install hcloud-cli \
     (or point HCLOUD_CLI at an hcloud binary)";

fn hcloud_cli() -> String {
    std::env::var("HCLOUD_CLI")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "hcloud".to_string())
}

/// Why the CLI cannot run here, if it cannot.
async fn cli_missing(hcloud: &str) -> Option<String> {
    for (program, args) in [(hcloud, ["version"]), ("bash", ["--version"])] {
        match Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
        {
            Err(e) => return Some(format!("`{program}` cannot be started: {e}")),
            Ok(out) if !out.status.success() => {
                return Some(format!("`{program} {}` failed: {}", args[0], out.status));
            }
            Ok(_) => {}
        }
    }
    None
}

#[tokio::test]
async fn official_hcloud_cli_works_against_the_simulator() {
    let hcloud = hcloud_cli();
    if let Some(reason) = cli_missing(&hcloud).await {
        common::skip_or_fail(
            "official_hcloud_cli_works_against_the_simulator",
            &format!("needs the hcloud CLI: {reason}"),
            CLI_INSTALL_HINT,
        );
        return;
    }

    let token = "official-cli-test-token";
    let simulator = simulator(token).await;
    let script = script("hcloud_cli_scenario.sh");
    // A fresh HOME: no ~/.config/hcloud/cli.toml (contexts, tokens) leaks in or gets written.
    let home = tempfile::tempdir().unwrap();
    let child = Command::new("bash")
        .arg(&script)
        .env("HOME", home.path())
        .env("HCLOUD_CLI", &hcloud)
        .env("HCLOUD_ENDPOINT", simulator.base_url())
        // The token goes through the environment, not the (world-readable) command line.
        .env("HCLOUD_TOKEN", token)
        .env_remove("HCLOUD_CONFIG")
        .env_remove("HCLOUD_CONTEXT")
        .env_remove("HCLOUD_DEBUG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    expect_all_checks_pass("the hcloud CLI", &script, child, simulator).await;
}

/// Waits for a client's script (bounded by [`SCRIPT_TIMEOUT`]), stops the simulator, and
/// fails unless the script succeeded and printed its summary line, so a run that silently
/// checked nothing cannot pass.
async fn expect_all_checks_pass(
    client: &str,
    script: &std::path::Path,
    child: impl std::future::Future<Output = std::io::Result<std::process::Output>>,
    simulator: vps_controller::simulator::RunningSimulator,
) {
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, child)
        .await
        .unwrap_or_else(|_| panic!("{} did not finish in {SCRIPT_TIMEOUT:?}", script.display()))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    simulator.shutdown().await;

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{client} against the simulator failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    let summary = stdout
        .lines()
        .find(|l| l.contains("checks passed, 0 failed"))
        .unwrap_or_else(|| panic!("no summary line in the script output:\n{stdout}"));
    println!("{summary}");
}
