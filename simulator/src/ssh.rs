//! The simulated SSH endpoint: a stand-in for the sshd of freshly booted Ubuntu servers with
//! cloud-init, so a client's post-boot bootstrap can be tested without real machines.
//!
//! One listener serves every server. With the endpoint on, each server's public IPv4 is a
//! loopback address of its own (127.1.0.1, 127.1.0.2, …), and a connection is routed by the
//! address the client dialed (the socket's local address); connections to an address no live
//! server has, or to a non-loopback address, are closed at once.
//!
//! Per server (see [`machine`] for the model):
//! - **host key**: the ed25519 pair of user_data `#cloud-config` `ssh_keys` (`ed25519_private`,
//!   `ed25519_public`), else one generated at create; only that key is offered (`ssh-ed25519`).
//! - **auth**: user `root`, public key only, accepted if it is a key of the Hetzner SSH key
//!   objects given at create or listed in user_data `ssh_authorized_keys`; anything else is
//!   rejected and counted.
//! - **exec** (each on its own session channel; every one recorded): `cloud-init status
//!   [--wait]`, `cat PATH…`, `install -D -m MODE /dev/stdin PATH`; anything else succeeds
//!   without output. Arguments are bare words or single-quoted ([`shell`]). After the exit
//!   status the channel gets EOF and is closed, as sshd does.
//! - **faults**: `refuse`, `stall`, `wrong_host_key`, `cloud_init`, `fail_command`,
//!   `hang_command` ([`machine::SshFaults`]), per server or as defaults.
//!
//! The HTTP hooks that arm faults and show the state are in [`hooks`].

pub(crate) mod hooks;
pub(crate) mod machine;
pub(crate) mod shell;

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::keys::PrivateKey;
use russh::server::{
    Auth, ChannelOpenHandle, Handle, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, Disconnect, MethodKind, MethodSet, Preferred, SshId};
use ssh_key::{Algorithm, PublicKey};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};

use crate::{Shared, lock};
use machine::{CloudInit, ServerSsh, SshFaults, SshWorld, random_host_key};

/// The simulated SSH endpoint's settings (`SimulatorConfig::ssh`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SshConfig {
    /// Where the one SSH listener binds (port 0: a free port). Servers are told apart by the
    /// loopback address a client dials, so bind an address that receives connections to every
    /// 127.x.y.z: `0.0.0.0` (or `[::]`); a socket bound to 127.0.0.1 gets only connections to
    /// 127.0.0.1. Connections arriving on other addresses are dropped.
    pub listen: SocketAddr,
    /// Seconds cloud-init runs after a server reached `running` (0 = done at once); 0 to 86400.
    pub cloud_init_seconds: f64,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 2222)),
            cloud_init_seconds: 0.0,
        }
    }
}

/// How often a waiting `cloud-init status --wait` looks again (so a fault changed or cleared
/// meanwhile takes effect within this).
const CLOUD_INIT_POLL: Duration = Duration::from_millis(50);

/// Largest file `install` takes (a bootstrap writes configuration, not disk images).
const MAX_FILE_BYTES: usize = 16 * 1024 * 1024;

/// How long a connection being closed (server deleted, simulator stopping) gets to go.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Serves SSH on `listener` until `stopping` turns true; then closes every connection.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut stopping: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|stop| *stop) => break,
        };
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok((stream, _peer)) => {
                connections.spawn(connection(shared.clone(), stream, stopping.clone()));
            }
            Err(error) => {
                // Out of file descriptors, say: wait a little instead of spinning.
                tracing::warn!(%error, "simulated SSH endpoint: accept failed");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopping.wait_for(|stop| *stop) => break,
                }
            }
        }
    }
    drop(listener);
    // Each connection sees `stopping` and disconnects; give them a moment, then abort.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.shutdown().await;
}

/// What to do with a new connection.
enum Plan {
    Close,
    Stall(watch::Receiver<()>),
    Serve {
        server: i64,
        host_key: Box<PrivateKey>,
        gone: watch::Receiver<()>,
    },
}

/// The server a connection dialed and what its faults say; counts the connection.
fn plan(shared: &Shared, dialed: Ipv4Addr) -> Plan {
    let mut world = lock(&shared.world);
    let world = &mut *world;
    let Some(global) = &mut world.ssh else {
        return Plan::Close;
    };
    global.connections_total += 1;
    let found = world
        .servers
        .values()
        .find(|s| s.ipv4.is_some_and(|ip| ip.addr == dialed));
    let Some((id, machine)) = found.and_then(|s| Some((s.id, s.ssh.as_ref()?))) else {
        return Plan::Close;
    };
    let faults = machine.faults.as_ref().unwrap_or(&global.default_faults);
    if faults.refuse {
        Plan::Close
    } else if faults.stall {
        Plan::Stall(machine.gone())
    } else {
        Plan::Serve {
            server: id,
            host_key: Box::new(if faults.wrong_host_key {
                random_host_key()
            } else {
                machine.host_key.clone()
            }),
            gone: machine.gone(),
        }
    }
}

/// The loopback IPv4 address a connection was made to (`None`: not loopback, drop it).
fn dialed(stream: &TcpStream) -> Option<Ipv4Addr> {
    match stream.local_addr().ok()?.ip().to_canonical() {
        IpAddr::V4(ip) if ip.is_loopback() => Some(ip),
        _ => None,
    }
}

fn server_config(host_key: PrivateKey) -> russh::server::Config {
    russh::server::Config {
        server_id: SshId::Standard(Cow::Borrowed("SSH-2.0-hcloud_simulator")),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // Rejections are counted, not slowed down: tests try wrong keys on purpose.
        auth_rejection_time: Duration::ZERO,
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        preferred: Preferred {
            key: Cow::Owned(vec![Algorithm::Ed25519]),
            ..Preferred::default()
        },
        // `cloud-init status --wait` may take long and say nothing meanwhile, as on a server.
        inactivity_timeout: None,
        nodelay: true,
        ..russh::server::Config::default()
    }
}

async fn connection(shared: Arc<Shared>, stream: TcpStream, mut stopping: watch::Receiver<bool>) {
    let Some(dialed) = dialed(&stream) else {
        return;
    };
    let (server, host_key, mut gone) = match plan(&shared, dialed) {
        Plan::Close => return,
        Plan::Stall(gone) => return stall(stream, gone, stopping).await,
        Plan::Serve {
            server,
            host_key,
            gone,
        } => (server, host_key, gone),
    };
    let config = Arc::new(server_config(*host_key));
    let handler = Conn::new(shared, server);
    let mut running = tokio::select! {
        started = russh::server::run_stream(config, stream, handler) => match started {
            Ok(running) => running,
            Err(error) => {
                tracing::debug!(%error, %dialed, "simulated SSH: handshake failed");
                return;
            }
        },
        _ = gone.changed() => return,
        _ = stopping.wait_for(|stop| *stop) => return,
    };
    let handle = running.handle();
    let reason = tokio::select! {
        ended = &mut running => {
            if let Err(error) = ended {
                tracing::debug!(%error, %dialed, "simulated SSH: session ended");
            }
            return;
        }
        _ = gone.changed() => "the server was deleted or rebuilt",
        _ = stopping.wait_for(|stop| *stop) => "the simulator is shutting down",
    };
    let _ = handle
        .disconnect(Disconnect::ByApplication, reason.to_string(), String::new())
        .await;
    let _ = tokio::time::timeout(CLOSE_GRACE, running).await;
}

/// The `stall` fault: the connection stays open and silent until the client gives up (or the
/// server goes, or the simulator stops).
async fn stall(
    mut stream: TcpStream,
    mut gone: watch::Receiver<()>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut sink = [0u8; 1024];
    loop {
        tokio::select! {
            read = stream.read(&mut sink) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = gone.changed() => return,
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

/// One session channel.
struct Chan {
    /// Where the client's data goes until EOF (dropping it ends the reader's stream).
    stdin: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Taken by `install`, which reads it.
    stdin_rx: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    /// The command running on it (its record's sequence number).
    record: Option<u64>,
}

/// One SSH connection to one server.
struct Conn {
    shared: Arc<Shared>,
    server: i64,
    authenticated: bool,
    channels: HashMap<ChannelId, Chan>,
    /// Commands answering later (`cloud-init status --wait`, `install`): aborted with the
    /// connection.
    tasks: Vec<AbortHandle>,
}

impl Conn {
    fn new(shared: Arc<Shared>, server: i64) -> Conn {
        Conn {
            shared,
            server,
            authenticated: false,
            channels: HashMap::new(),
            tasks: Vec::new(),
        }
    }

    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.retain(|t| !t.is_finished());
        self.tasks.push(tokio::spawn(task).abort_handle());
    }

    /// Whether root may log in with `key`; counts a rejection.
    fn check_key(&self, user: &str, key: &PublicKey) -> bool {
        with_server(&self.shared, self.server, |machine, global| {
            let ok = user == "root" && machine.accepts(key);
            if !ok {
                machine.auth_failures += 1;
                global.auth_failures += 1;
            }
            ok
        })
        .unwrap_or(false)
    }

    fn count_failure(&self) {
        with_server(&self.shared, self.server, |machine, global| {
            machine.auth_failures += 1;
            global.auth_failures += 1;
        });
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if self.authenticated
            && let Some(global) = &mut lock(&self.shared.world).ssh
        {
            global.active_sessions = global.active_sessions.saturating_sub(1);
        }
    }
}

/// Runs `f` on a server's SSH state and the endpoint's, under the world lock; `None` if the
/// server is gone (or the endpoint off).
fn with_server<R>(
    shared: &Shared,
    server: i64,
    f: impl FnOnce(&mut ServerSsh, &mut SshWorld) -> R,
) -> Option<R> {
    let mut world = lock(&shared.world);
    let world = &mut *world;
    let global = world.ssh.as_mut()?;
    let machine = world.servers.get_mut(&server)?.ssh.as_mut()?;
    Some(f(machine, global))
}

/// The faults that apply to a server now.
fn faults_of(machine: &ServerSsh, global: &SshWorld) -> SshFaults {
    machine
        .faults
        .clone()
        .unwrap_or_else(|| global.default_faults.clone())
}

/// What an `exec` request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    CloudInitStatus {
        wait: bool,
    },
    Cat(Vec<String>),
    Install {
        mode: String,
        path: String,
    },
    /// `install` with a mode that is not 3 or 4 octal digits: exit 1, as install does.
    InvalidMode(String),
    /// A program the simulator models, in a form it does not: exit 2 with this on stderr (a
    /// silent success would hide a client's mistake).
    Unsupported(String),
    /// Anything else: succeeds without output.
    Other,
}

const MODELLED: [&str; 3] = ["cloud-init", "cat", "install"];

fn interpret(line: &str) -> Command {
    let words = match shell::split(line) {
        Ok(words) => words,
        Err(problem) => {
            let program = line.split_whitespace().next().unwrap_or_default();
            return if MODELLED.contains(&program) {
                Command::Unsupported(format!("sh: cannot parse the command line: {problem}\n"))
            } else {
                Command::Other
            };
        }
    };
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["cloud-init", "status"] => Command::CloudInitStatus { wait: false },
        ["cloud-init", "status", "--wait"] => Command::CloudInitStatus { wait: true },
        ["cat", paths @ ..] if !paths.is_empty() => {
            Command::Cat(paths.iter().map(|p| p.to_string()).collect())
        }
        ["install", "-D", "-m", mode, "/dev/stdin", path] => match normalize_mode(mode) {
            Some(mode) => Command::Install {
                mode,
                path: path.to_string(),
            },
            None => Command::InvalidMode(mode.to_string()),
        },
        [program, ..] if MODELLED.contains(program) => Command::Unsupported(format!(
            "simulator: unsupported form of {program} (supported: cloud-init status [--wait], \
             cat PATH, install -D -m MODE /dev/stdin PATH)\n"
        )),
        _ => Command::Other,
    }
}

/// `644` / `0644` → `0644`; anything but 3 or 4 octal digits → `None`.
fn normalize_mode(mode: &str) -> Option<String> {
    let octal = (3..=4).contains(&mode.len()) && mode.bytes().all(|b| (b'0'..=b'7').contains(&b));
    octal.then(|| format!("{mode:0>4}"))
}

/// Answers a command now: output, exit status, EOF, close.
fn answer(
    session: &mut Session,
    channel: ChannelId,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: u32,
) -> Result<(), russh::Error> {
    if !stdout.is_empty() {
        session.data(channel, stdout)?;
    }
    if !stderr.is_empty() {
        session.extended_data(channel, 1, stderr)?;
    }
    session.exit_status_request(channel, status)?;
    session.eof(channel)?;
    session.close(channel)
}

/// Answers a command from a task, through the session's handle.
async fn answer_later(
    handle: &Handle,
    channel: ChannelId,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: u32,
) {
    if !stdout.is_empty() {
        let _ = handle.data(channel, stdout).await;
    }
    if !stderr.is_empty() {
        let _ = handle.extended_data(channel, 1, stderr).await;
    }
    let _ = handle.exit_status_request(channel, status).await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

fn set_exit(shared: &Shared, server: i64, seq: u64, status: u32) {
    with_server(shared, server, |machine, _| {
        if let Some(record) = machine.command_mut(seq) {
            record.exit_status = Some(status);
        }
    });
}

/// `cloud-init status --wait`: looks every [`CLOUD_INIT_POLL`] until cloud-init is done or
/// failed (or the server is gone: then the connection is closing anyway).
async fn wait_for_cloud_init(
    shared: Arc<Shared>,
    server: i64,
    seq: u64,
    handle: Handle,
    channel: ChannelId,
) {
    loop {
        let state = {
            let now = Instant::now();
            let mut world = lock(&shared.world);
            world.settle(now);
            let world = &mut *world;
            let (Some(global), Some(machine)) = (
                world.ssh.as_ref(),
                world.servers.get(&server).and_then(|s| s.ssh.as_ref()),
            ) else {
                return;
            };
            machine.cloud_init(&faults_of(machine, global), global.cloud_init, now)
        };
        if state != CloudInit::Running {
            let status = state.exit_status();
            set_exit(&shared, server, seq, status);
            let stdout = format!("status: {}\n", state.as_str()).into_bytes();
            answer_later(&handle, channel, stdout, Vec::new(), status).await;
            return;
        }
        tokio::time::sleep(CLOUD_INIT_POLL).await;
    }
}

/// `install -D -m MODE /dev/stdin PATH`: reads the channel to EOF, then stores the file.
#[allow(clippy::too_many_arguments)]
async fn install(
    shared: Arc<Shared>,
    server: i64,
    seq: u64,
    handle: Handle,
    channel: ChannelId,
    mut stdin: mpsc::UnboundedReceiver<Vec<u8>>,
    mode: String,
    path: String,
) {
    let mut content = Vec::new();
    let mut too_big = false;
    while let Some(chunk) = stdin.recv().await {
        if content.len() + chunk.len() > MAX_FILE_BYTES {
            too_big = true;
        } else if !too_big {
            content.extend_from_slice(&chunk);
        }
    }
    let (stderr, status) = if too_big {
        let message = format!("install: cannot write '{path}': No space left on device\n");
        (message.into_bytes(), 1)
    } else {
        with_server(&shared, server, |machine, _| {
            machine.write_file(path, mode, content);
        });
        (Vec::new(), 0)
    };
    set_exit(&shared, server, seq, status);
    answer_later(&handle, channel, Vec::new(), stderr, status).await;
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_password(&mut self, _user: &str, _password: &str) -> Result<Auth, Self::Error> {
        self.count_failure();
        Ok(Auth::reject())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // russh asks here first, with or without a signature: the one place rejections count.
        Ok(if self.check_key(user, offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let ok = with_server(&self.shared, self.server, |machine, _| {
            user == "root" && machine.accepts(key.public_key)
        });
        Ok(if ok == Some(true) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        if self.authenticated {
            return Ok(());
        }
        self.authenticated = true;
        let mut world = lock(&self.shared.world);
        if let Some(machine) = world
            .servers
            .get_mut(&self.server)
            .and_then(|s| s.ssh.as_mut())
        {
            machine.sessions += 1;
        }
        if let Some(global) = &mut world.ssh {
            global.active_sessions += 1;
            global.max_active_sessions = global.max_active_sessions.max(global.active_sessions);
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The handler's callbacks carry the channel's traffic; the channel object is not read
        // (dropped, russh skips it).
        let (stdin, stdin_rx) = mpsc::unbounded_channel();
        self.channels.insert(
            channel.id(),
            Chan {
                stdin: Some(stdin),
                stdin_rx: Some(stdin_rx),
                record: None,
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(chan) = self.channels.get_mut(&channel) else {
            return Ok(());
        };
        if let Some(stdin) = &chan.stdin {
            let _ = stdin.send(data.to_vec());
        }
        if let Some(seq) = chan.record {
            let bytes = data.len() as u64;
            with_server(&self.shared, self.server, |machine, _| {
                if let Some(record) = machine.command_mut(seq) {
                    record.stdin_bytes += bytes;
                }
            });
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(chan) = self.channels.get_mut(&channel) {
            chan.stdin = None;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let line = String::from_utf8_lossy(data).into_owned();
        let Some(chan) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        if chan.record.is_some() {
            // One command per channel, as with sshd.
            return session.channel_failure(channel);
        }
        let recorded = with_server(&self.shared, self.server, |machine, global| {
            let faults = faults_of(machine, global);
            (machine.record(line.clone()), faults)
        });
        let Some((seq, faults)) = recorded else {
            return session.channel_failure(channel);
        };
        chan.record = Some(seq);
        let stdin_rx = chan.stdin_rx.take();
        session.channel_success(channel)?;

        if faults
            .hang_command
            .as_ref()
            .is_some_and(|s| line.contains(s.as_str()))
        {
            return Ok(());
        }
        let server = self.server;
        let shared = self.shared.clone();
        let now = |stdout: Vec<u8>, stderr: Vec<u8>, status: u32, session: &mut Session| {
            set_exit(&shared, server, seq, status);
            answer(session, channel, stdout, stderr, status)
        };
        if faults
            .fail_command
            .as_ref()
            .is_some_and(|s| line.contains(s.as_str()))
        {
            return now(Vec::new(), b"simulated failure\n".to_vec(), 1, session);
        }
        match interpret(&line) {
            Command::CloudInitStatus { wait: true } => {
                let task =
                    wait_for_cloud_init(shared.clone(), server, seq, session.handle(), channel);
                self.spawn(task);
                Ok(())
            }
            Command::CloudInitStatus { wait: false } => {
                let state = with_server(&shared, server, |machine, global| {
                    machine.cloud_init(&faults, global.cloud_init, Instant::now())
                })
                .unwrap_or(CloudInit::Running);
                let stdout = format!("status: {}\n", state.as_str()).into_bytes();
                now(stdout, Vec::new(), state.exit_status(), session)
            }
            Command::Cat(paths) => {
                let (stdout, stderr) = with_server(&shared, server, |machine, _| {
                    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
                    for path in &paths {
                        match machine.files.get(path) {
                            Some(file) => stdout.extend_from_slice(&file.content),
                            None => stderr.extend_from_slice(
                                format!("cat: {path}: No such file or directory\n").as_bytes(),
                            ),
                        }
                    }
                    (stdout, stderr)
                })
                .unwrap_or_default();
                let status = u32::from(!stderr.is_empty());
                now(stdout, stderr, status, session)
            }
            Command::Install { mode, path } => {
                let Some(stdin_rx) = stdin_rx else {
                    return now(Vec::new(), b"install: no stdin\n".to_vec(), 1, session);
                };
                let task = install(
                    shared.clone(),
                    server,
                    seq,
                    session.handle(),
                    channel,
                    stdin_rx,
                    mode,
                    path,
                );
                self.spawn(task);
                Ok(())
            }
            Command::InvalidMode(mode) => {
                let message = format!("install: invalid mode '{mode}'\n");
                now(Vec::new(), message.into_bytes(), 1, session)
            }
            Command::Unsupported(message) => now(Vec::new(), message.into_bytes(), 2, session),
            Command::Other => now(Vec::new(), Vec::new(), 0, session),
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_read_in_the_forms_the_client_sends() {
        assert_eq!(
            interpret("cloud-init status --wait"),
            Command::CloudInitStatus { wait: true }
        );
        assert_eq!(
            interpret("cloud-init status"),
            Command::CloudInitStatus { wait: false }
        );
        assert_eq!(
            interpret("cat '/etc/my file'"),
            Command::Cat(vec!["/etc/my file".into()])
        );
        assert_eq!(
            interpret("install -D -m 0600 /dev/stdin '/root/it'\\''s'"),
            Command::Install {
                mode: "0600".into(),
                path: "/root/it's".into()
            }
        );
        assert_eq!(
            interpret("install -D -m 644 /dev/stdin /etc/x"),
            Command::Install {
                mode: "0644".into(),
                path: "/etc/x".into()
            }
        );
        for bad in ["0888", "12", "12345", "rwx", "-1"] {
            let line = format!("install -D -m {bad} /dev/stdin /etc/x");
            assert!(
                interpret(&line) == Command::InvalidMode(bad.to_string()),
                "{bad}"
            );
        }
        assert!(matches!(interpret("cat 'open"), Command::Unsupported(_)));
        assert!(matches!(
            interpret("cloud-init status --long"),
            Command::Unsupported(_)
        ));
        assert!(matches!(
            interpret("install /dev/stdin /x"),
            Command::Unsupported(_)
        ));
        assert_eq!(interpret("systemctl restart ssh"), Command::Other);
        assert_eq!(interpret("echo a && echo b"), Command::Other);
        assert_eq!(interpret(""), Command::Other);
    }
}
