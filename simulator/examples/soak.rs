//! Soak: what the simulator costs at 10,000 servers under a steady load.
//!
//! `cargo run --release -p hcloud-simulator --example soak -- [--servers N] [--rps R]
//! [--seconds S] [--action-seconds A]` (defaults 10000, 100, 60, 1.0).
//!
//! The simulator runs in this process on a runtime of its own (two worker threads named
//! `sim-worker`); the load generator runs on another (`load`), over loopback HTTP. It creates
//! SSH keys, firewalls (two applied by label selector) and N labelled servers, then sends R
//! requests per second (open loop: a request is started every 1/R s whatever the answers do) for
//! S seconds: label-selected paginated listings, `GET /actions?id=…` (25 IDs, sorted like
//! hcloud-go's waiter), power actions, creates and deletes. It prints every 5 s the stored
//! actions and RSS, then latencies per kind (p50/p99/max), CPU seconds (the simulator's threads
//! alone and the whole process) and RSS (peak and at the end, from /proc/self/status). Linux only
//! for the CPU and memory figures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hcloud_simulator::{SimulatorConfig, spawn};
use serde_json::{Value, json};

struct Args {
    servers: usize,
    rps: u32,
    seconds: u64,
    action_seconds: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        servers: 10_000,
        rps: 100,
        seconds: 60,
        action_seconds: 1.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--servers" => args.servers = value.parse().map_err(|e| bad(&e))?,
            "--rps" => args.rps = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => args.seconds = value.parse().map_err(|e| bad(&e))?,
            "--action-seconds" => args.action_seconds = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.rps == 0 || args.seconds > 600 || args.servers > 100_000 {
        return Err("need --rps ≥ 1, --seconds ≤ 600, --servers ≤ 100000".into());
    }
    Ok(args)
}

/// `VmHWM` (peak) and `VmRSS` (now) in MiB.
fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// utime + stime in seconds from a /proc `stat` line (USER_HZ = 100 on Linux).
fn stat_cpu(stat: &str) -> Option<f64> {
    // The command name is in parentheses and may contain spaces: count fields after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// CPU seconds of the whole process, and of the threads whose name starts with `sim-`.
fn cpu_seconds() -> (f64, f64) {
    let process = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu(&s))
        .unwrap_or(f64::NAN);
    let mut sim = 0.0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.starts_with("sim-")
                && let Some(cpu) = std::fs::read_to_string(task.path().join("stat"))
                    .ok()
                    .and_then(|s| stat_cpu(&s))
            {
                sim += cpu;
            }
        }
    }
    (process, sim)
}

#[derive(Default)]
struct Record {
    latencies: BTreeMap<&'static str, Vec<Duration>>,
    statuses: BTreeMap<(&'static str, u16), u64>,
}

struct Load {
    http: reqwest::Client,
    base: String,
    root: String,
    servers: Mutex<Vec<i64>>,
    /// The most recent action IDs (at most 500), for `GET /actions?id=`.
    actions: Mutex<Vec<i64>>,
    record: Mutex<Record>,
    groups: usize,
    seq: std::sync::atomic::AtomicU64,
}

impl Load {
    async fn call(
        &self,
        kind: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Option<Value> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth("soak");
        if let Some(body) = body {
            request = request.json(&body);
        }
        let started = Instant::now();
        let result = request.send().await;
        let (status, body) = match result {
            Ok(response) => {
                let status = response.status().as_u16();
                let body = response.json::<Value>().await.ok();
                (status, body)
            }
            Err(_) => (0, None),
        };
        let elapsed = started.elapsed();
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        record.latencies.entry(kind).or_default().push(elapsed);
        *record.statuses.entry((kind, status)).or_insert(0) += 1;
        drop(record);
        if let Some(body) = &body {
            self.remember_actions(body);
        }
        body
    }

    fn remember_actions(&self, body: &Value) {
        let mut ids: Vec<i64> = Vec::new();
        if let Some(id) = body["action"]["id"].as_i64() {
            ids.push(id);
        }
        for key in ["next_actions", "actions"] {
            if let Some(list) = body[key].as_array() {
                ids.extend(list.iter().filter_map(|a| a["id"].as_i64()));
            }
        }
        if ids.is_empty() || body.get("meta").is_some() {
            return;
        }
        let mut actions = self.actions.lock().unwrap_or_else(|e| e.into_inner());
        actions.extend(ids);
        let len = actions.len();
        if len > 500 {
            actions.drain(..len - 500);
        }
    }

    fn next(&self) -> u64 {
        // A fixed, cheap pseudo-random sequence (SplitMix64 over a counter): reproducible runs.
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut z = n
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x1234_5678);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn random_server(&self) -> Option<i64> {
        let servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if servers.is_empty() {
            return None;
        }
        Some(servers[(self.next() % servers.len() as u64) as usize])
    }

    async fn create_server(&self, name: String) {
        let group = self.next() as usize % self.groups;
        let tier = if group.is_multiple_of(2) { "web" } else { "db" };
        let body = json!({
            "name": name,
            "server_type": "cx23",
            "image": "ubuntu-24.04",
            "location": "fsn1",
            "ssh_keys": [format!("key-{}", group % 20)],
            "labels": {"soak": "1", "group": format!("g{group}"), "tier": tier},
        });
        let answer = self
            .call("create", reqwest::Method::POST, "/servers", Some(body))
            .await;
        if let Some(id) = answer.and_then(|b| b["server"]["id"].as_i64()) {
            self.servers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id);
        }
    }

    /// One request of the mix.
    async fn one(&self) {
        let pick = self.next() % 100;
        match pick {
            // A label-selected group (about 100 servers): both pages, sometimes sorted by name.
            0..=19 => {
                let group = self.next() as usize % self.groups;
                let page = 1 + self.next() % 2;
                let sort = if pick.is_multiple_of(2) {
                    "&sort=name:desc"
                } else {
                    ""
                };
                let path = format!(
                    "/servers?label_selector=soak%3D1%2Cgroup%3Dg{group}&per_page=50&page={page}{sort}"
                );
                self.call("list_group", reqwest::Method::GET, &path, None)
                    .await;
            }
            // Walking all servers by a broad selector: any page of 200.
            20..=29 => {
                let page = 1 + self.next() % 200;
                let path = format!(
                    "/servers?label_selector=tier%20in%20(web%2Cdb)&per_page=50&page={page}"
                );
                self.call("list_all", reqwest::Method::GET, &path, None)
                    .await;
            }
            // hcloud-go's waiter: up to 25 IDs, sort=status&sort=id.
            30..=59 => {
                let ids: Vec<i64> = {
                    let actions = self.actions.lock().unwrap_or_else(|e| e.into_inner());
                    let len = actions.len();
                    actions[len.saturating_sub(25)..].to_vec()
                };
                if ids.is_empty() {
                    return;
                }
                let query: Vec<String> = ids.iter().map(|id| format!("id={id}")).collect();
                let path = format!("/actions?{}&sort=status&sort=id", query.join("&"));
                self.call("get_actions", reqwest::Method::GET, &path, None)
                    .await;
            }
            60..=74 => {
                if let Some(id) = self.random_server() {
                    let verb = ["poweroff", "poweron", "reboot"][(self.next() % 3) as usize];
                    let path = format!("/servers/{id}/actions/{verb}");
                    self.call("power", reqwest::Method::POST, &path, None).await;
                }
            }
            75..=84 => {
                if let Some(id) = self.random_server() {
                    self.call(
                        "get_server",
                        reqwest::Method::GET,
                        &format!("/servers/{id}"),
                        None,
                    )
                    .await;
                }
            }
            85..=92 => {
                let n = self.next();
                self.create_server(format!("soak-new-{n:016x}")).await;
            }
            _ => {
                let id = {
                    let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
                    if servers.is_empty() {
                        return;
                    }
                    let i = (self.next() % servers.len() as u64) as usize;
                    servers.swap_remove(i)
                };
                self.call(
                    "delete",
                    reqwest::Method::DELETE,
                    &format!("/servers/{id}"),
                    None,
                )
                .await;
            }
        }
    }

    async fn stored_actions(&self) -> (i64, i64) {
        let stats: Value = match self
            .http
            .get(format!("{}/__simulator/stats", self.root))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        (
            stats["actions"]["stored"].as_i64().unwrap_or(-1),
            stats["actions"]["running"].as_i64().unwrap_or(-1),
        )
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sim-worker")
        .enable_all()
        .build()?;
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load")
        .enable_all()
        .build()?;
    let sim = sim_rt.block_on(spawn(
        SimulatorConfig {
            token: Some("soak".into()),
            action_seconds: args.action_seconds,
            rate_limit: u32::MAX,
            ..SimulatorConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    ))?;
    let (cpu0, sim_cpu0) = cpu_seconds();
    let (_, rss0) = rss_mib();
    println!(
        "soak: {} servers, {} requests/s for {} s, actions run {} s; simulator at {}",
        args.servers,
        args.rps,
        args.seconds,
        args.action_seconds,
        sim.base_url()
    );
    println!("start: RSS {rss0:.1} MiB");

    let load = Arc::new(Load {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build()?,
        base: sim.base_url(),
        root: format!("http://{}", sim.addr()),
        servers: Mutex::new(Vec::with_capacity(args.servers * 2)),
        actions: Mutex::new(Vec::new()),
        record: Mutex::new(Record::default()),
        groups: (args.servers / 100).max(1),
        seq: std::sync::atomic::AtomicU64::new(0),
    });

    load_rt.block_on(async {
        // Setup: keys, firewalls (two by label selector), servers, 64 at a time.
        for i in 0..20 {
            // A valid ed25519 key with its last two base64 digits (12 bits of the key) varied.
            const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let key = format!(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsyJHJZuwxE5CyAFsfsb5HO4u4wpEmHPM49mpQItQ{}{} soak",
                char::from(B64[i / 64]),
                char::from(B64[i % 64])
            );
            load.call(
                "setup_key",
                reqwest::Method::POST,
                "/ssh_keys",
                Some(json!({"name": format!("key-{i}"), "public_key": key})),
            )
            .await;
        }
        for (i, selector) in ["tier=web", "tier=db", "", ""].iter().enumerate() {
            let mut body = json!({
                "name": format!("fw-{i}"),
                "rules": [{"direction": "in", "protocol": "tcp", "port": "22",
                           "source_ips": ["0.0.0.0/0", "::/0"]}],
            });
            if !selector.is_empty() {
                body["apply_to"] =
                    json!([{"type": "label_selector", "label_selector": {"selector": selector}}]);
            }
            load.call("setup_firewall", reqwest::Method::POST, "/firewalls", Some(body))
                .await;
        }
        let started = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..64 {
            let load = load.clone();
            let next = next.clone();
            let total = args.servers;
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    load.create_server(format!("soak-{i:05}")).await;
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
        let created = load.servers.lock().map(|s| s.len()).unwrap_or(0);
        let (cpu, sim_cpu) = cpu_seconds();
        let (hwm, rss) = rss_mib();
        let (stored, running) = load.stored_actions().await;
        println!(
            "setup: {created} servers in {:.1} s; CPU {:.2} s (simulator threads {:.2} s); \
             RSS {rss:.1} MiB (peak {hwm:.1}); actions stored {stored} (running {running})",
            started.elapsed().as_secs_f64(),
            cpu - cpu0,
            sim_cpu - sim_cpu0,
        );
        {
            let mut record = load.record.lock().unwrap_or_else(|e| e.into_inner());
            let setup_creates = record.latencies.remove("create").unwrap_or_default();
            let mut sorted = setup_creates;
            sorted.sort();
            println!(
                "setup creates (64 in flight): p50 {:.2} ms, p99 {:.2} ms",
                ms(percentile(&sorted, 0.5)),
                ms(percentile(&sorted, 0.99))
            );
            *record = Record::default();
        }

        // Soak: open loop at --rps.
        let (cpu1, sim_cpu1) = cpu_seconds();
        let soak_started = Instant::now();
        let end = soak_started + Duration::from_secs(args.seconds);
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rps)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(1000));
        let mut report_at = soak_started + Duration::from_secs(5);
        let mut sent = 0u64;
        let mut dropped = 0u64;
        let mut tasks = tokio::task::JoinSet::new();
        while Instant::now() < end {
            tick.tick().await;
            match in_flight.clone().try_acquire_owned() {
                Ok(permit) => {
                    let load = load.clone();
                    tasks.spawn(async move {
                        load.one().await;
                        drop(permit);
                    });
                    sent += 1;
                }
                Err(_) => dropped += 1,
            }
            while tasks.try_join_next().is_some() {}
            if Instant::now() >= report_at {
                report_at += Duration::from_secs(5);
                let (stored, running) = load.stored_actions().await;
                let (hwm, rss) = rss_mib();
                let (_, sim_cpu) = cpu_seconds();
                println!(
                    "t={:>4.0}s sent {sent:>6}  actions stored {stored:>6} (running {running:>5})  \
                     RSS {rss:>6.1} MiB (peak {hwm:.1})  simulator CPU {:.2} s",
                    soak_started.elapsed().as_secs_f64(),
                    sim_cpu - sim_cpu1,
                );
            }
        }
        while tasks.join_next().await.is_some() {}
        let wall = soak_started.elapsed().as_secs_f64();
        let (cpu2, sim_cpu2) = cpu_seconds();
        let (hwm, rss) = rss_mib();
        let (stored, running) = load.stored_actions().await;
        let record = load.record.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = record.latencies.values().map(Vec::len).sum();
        println!(
            "\nsoak: {total} requests in {wall:.1} s ({:.0}/s; {dropped} not sent: 1000 in flight)",
            total as f64 / wall
        );
        println!("{:<12} {:>7} {:>9} {:>9} {:>9}  statuses", "kind", "n", "p50 ms", "p99 ms", "max ms");
        for (kind, latencies) in &record.latencies {
            let mut sorted = latencies.clone();
            sorted.sort();
            let statuses: Vec<String> = record
                .statuses
                .iter()
                .filter(|((k, _), _)| k == kind)
                .map(|((_, s), n)| format!("{s}×{n}"))
                .collect();
            println!(
                "{kind:<12} {:>7} {:>9.2} {:>9.2} {:>9.2}  {}",
                sorted.len(),
                ms(percentile(&sorted, 0.5)),
                ms(percentile(&sorted, 0.99)),
                ms(sorted.last().copied().unwrap_or_default()),
                statuses.join(" ")
            );
        }
        println!(
            "CPU during soak: simulator threads {:.2} s ({:.1}% of one core), whole process {:.2} s",
            sim_cpu2 - sim_cpu1,
            100.0 * (sim_cpu2 - sim_cpu1) / wall,
            cpu2 - cpu1
        );
        println!(
            "RSS: peak {hwm:.1} MiB, end {rss:.1} MiB; actions stored {stored} (running {running}); \
             servers {}",
            load.servers.lock().map(|s| s.len()).unwrap_or(0)
        );
    });
    sim_rt.block_on(sim.shutdown());
    Ok(())
}
