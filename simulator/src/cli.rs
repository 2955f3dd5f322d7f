//! The flags of `hcloud-simulator` and of `vps-controller simulator`: defined once here so the
//! two command lines cannot drift apart.

use std::net::SocketAddr;

use crate::{SimulatorConfig, SshConfig};

/// `--ssh-listen` when not given.
pub const DEFAULT_SSH_LISTEN: &str = "0.0.0.0:2222";

/// Serve the Hetzner Cloud API simulator under /v1.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on (port 0: a free port). Once listening, the API endpoint
    /// (`http://ADDR/v1`, with the port bound) is printed as one line on stdout.
    #[arg(long, default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,
    /// Require `Authorization: Bearer TOKEN` on every /v1 request.
    #[arg(long, env = "SIMULATOR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Seconds every action runs before it succeeds (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    pub action_seconds: f64,
    /// Requests per hour before 429 rate_limit_exceeded.
    #[arg(long, default_value_t = 3600)]
    pub rate_limit: u32,
    /// The rate-limit bucket refills this many times faster than Hetzner's (capacity stays
    /// --rate-limit; RateLimit-Reset in the same scaled time). 60: one hour of budget per
    /// real minute. At most 3600.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    pub budget_time_scale: f64,
    /// Share of /v1 requests answered with an injected fault (0..1).
    #[arg(long, default_value_t = 0.0)]
    pub fault_rate: f64,
    /// Seed for fault injection (reproducible).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The project's server quota: creating more fails with 403 resource_limit_exceeded.
    #[arg(long, default_value_t = crate::DEFAULT_SERVER_LIMIT)]
    pub server_limit: u32,
    /// Seconds a finished action stays readable before it is `not_found` (running actions are
    /// always kept).
    #[arg(long, default_value_t = 1800)]
    pub action_retention_seconds: u64,
    /// Most finished actions kept; the oldest finished are dropped first.
    #[arg(long, default_value_t = 10_000)]
    pub max_finished_actions: usize,
    /// Address of the simulated SSH endpoint [default: 0.0.0.0:2222]. Servers' public IPv4s
    /// are loopback addresses of their own (127.1.x.y); dial one on this port. Bind 0.0.0.0
    /// (or [::]): a socket on 127.0.0.1 does not receive connections to 127.1.x.y. If the
    /// default port is taken, a free one is used (logged); an explicit address must bind.
    #[arg(long, value_name = "ADDR", conflicts_with = "no_ssh")]
    pub ssh_listen: Option<SocketAddr>,
    /// Turn the simulated SSH endpoint off (public IPv4s are then from 198.18.0.0/15).
    #[arg(long)]
    pub no_ssh: bool,
    /// Seconds cloud-init runs after a server reaches `running` before `cloud-init status
    /// --wait` answers `status: done` over SSH (fractions allowed).
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    pub cloud_init_seconds: f64,
}

impl ServeArgs {
    /// The simulator configuration these flags describe (not yet validated).
    pub fn config(&self) -> SimulatorConfig {
        SimulatorConfig {
            token: self.token.clone(),
            action_seconds: self.action_seconds,
            rate_limit: self.rate_limit,
            budget_time_scale: self.budget_time_scale,
            fault_rate: self.fault_rate,
            seed: self.seed,
            server_limit: self.server_limit,
            finished_action_retention: std::time::Duration::from_secs(
                self.action_retention_seconds,
            ),
            max_finished_actions: self.max_finished_actions,
            ssh: (!self.no_ssh).then(|| SshConfig {
                listen: self.ssh_listen.unwrap_or_else(default_ssh_listen),
                cloud_init_seconds: self.cloud_init_seconds,
            }),
            ..SimulatorConfig::default()
        }
    }
}

fn default_ssh_listen() -> SocketAddr {
    DEFAULT_SSH_LISTEN
        .parse()
        .unwrap_or_else(|_| SshConfig::default().listen)
}

/// Validates the flags, binds `--listen` and serves until `shutdown` completes.
pub async fn serve(
    args: &ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let config = args.config();
    config.validate().map_err(ServeError::Config)?;
    let bind_error = |source| ServeError::Bind {
        listen: args.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let ssh_listener = match &config.ssh {
        Some(ssh) => Some(bind_ssh(ssh.listen, args.ssh_listen.is_none()).await?),
        None => None,
    };
    // The one line on stdout (logs go to stderr): with `--listen 127.0.0.1:0` it is how a
    // parent process learns the port. Connections are queued from here on.
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "http://{addr}/v1");
        let _ = stdout.flush();
    }
    match ssh_listener {
        Some(ssh_listener) => crate::serve_with_ssh(config, listener, ssh_listener, shutdown).await,
        None => crate::serve(config, listener, shutdown).await,
    }
    .map_err(ServeError::Serve)
}

/// Binds the SSH endpoint's address. The default port may be taken (another simulator, a
/// real sshd on 2222): then a free port on the same address, with a warning, so SSH stays on
/// and several simulators can run side by side. An address given with `--ssh-listen` must bind.
async fn bind_ssh(
    listen: SocketAddr,
    is_default: bool,
) -> Result<tokio::net::TcpListener, ServeError> {
    let ssh_error = |source| ServeError::SshBind { listen, source };
    match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => Ok(listener),
        Err(error) if is_default && error.kind() == std::io::ErrorKind::AddrInUse => {
            let any_port = SocketAddr::new(listen.ip(), 0);
            let listener = tokio::net::TcpListener::bind(any_port)
                .await
                .map_err(ssh_error)?;
            tracing::warn!(
                default = %listen,
                bound = %listener.local_addr().map_or_else(|_| "?".to_string(), |a| a.to_string()),
                "the default SSH port is taken: the simulated SSH endpoint uses a free port \
                 (GET /__simulator/ssh shows it; --ssh-listen to choose)"
            );
            Ok(listener)
        }
        Err(error) => Err(ssh_error(error)),
    }
}

/// Why [`serve`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(crate::SimulatorConfigError),
    #[error("--listen {listen}: cannot bind: {source}")]
    Bind {
        listen: SocketAddr,
        source: std::io::Error,
    },
    #[error("--ssh-listen {listen}: cannot bind: {source}")]
    SshBind {
        listen: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn the_budget_time_scale_defaults_to_real_time_and_bad_values_name_the_flag() {
        let default = Cli::parse_from(["sim"]).serve.config();
        assert_eq!(default.budget_time_scale, 1.0);
        assert!(default.validate().is_ok());
        let fast = Cli::parse_from(["sim", "--budget-time-scale", "60"])
            .serve
            .config();
        assert_eq!(fast.budget_time_scale, 60.0);
        assert!(fast.validate().is_ok());
        for bad in ["0", "-1", "NaN", "inf", "3601"] {
            let flag = format!("--budget-time-scale={bad}");
            let config = Cli::parse_from(["sim", flag.as_str()]).serve.config();
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains("--budget-time-scale"), "{bad}: {error}");
        }
    }

    #[test]
    fn ssh_is_on_by_default_and_the_flags_shape_it() {
        let default = Cli::parse_from(["sim"]).serve.config();
        let ssh = default
            .ssh
            .unwrap_or_else(|| panic!("SSH is off by default"));
        assert_eq!(ssh.listen.to_string(), DEFAULT_SSH_LISTEN);
        assert_eq!(ssh.cloud_init_seconds, 0.0);
        let off = Cli::parse_from(["sim", "--no-ssh", "--cloud-init-seconds", "3"])
            .serve
            .config();
        assert!(off.ssh.is_none());
        let chosen = Cli::parse_from([
            "sim",
            "--ssh-listen",
            "127.0.0.1:0",
            "--cloud-init-seconds",
            "2.5",
        ])
        .serve
        .config();
        let ssh = chosen.ssh.unwrap_or_else(|| panic!("SSH off"));
        assert_eq!(ssh.listen.to_string(), "127.0.0.1:0");
        assert_eq!(ssh.cloud_init_seconds, 2.5);
        assert!(Cli::try_parse_from(["sim", "--no-ssh", "--ssh-listen", "0.0.0.0:22"]).is_err());
        for bad in ["-1", "NaN", "86401"] {
            let flag = format!("--cloud-init-seconds={bad}");
            let config = Cli::parse_from(["sim", flag.as_str()]).serve.config();
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains("--cloud-init-seconds"), "{bad}: {error}");
        }
    }
}
