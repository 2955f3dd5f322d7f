//! The `vps-controller` command line: run | migrate | plan | status | simulator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use migration::{Migrator, MigratorTrait};
use sea_orm::DatabaseConnection;
use tokio::sync::watch;

use vps_controller::config::Config;
use vps_controller::controller::{Controller, leader, triggers};
use vps_controller::db::{self, deletion_guard, installation, subscriptions};
use vps_controller::hcloud::{Budget, Client, ClientConfig, HcloudApi, Token, WriteGate};
use vps_controller::keys::Sealer;
use vps_controller::reconcile::Reconciler;
use vps_controller::reconcile::desired::Owner;
use vps_controller::simulator::{self, SimulatorConfig};
use vps_controller::ssh::Bootstrapper;
use vps_controller::telemetry::health::Health;
use vps_controller::telemetry::metrics::{HcloudCollector, Metrics};
use vps_controller::telemetry::{self, LogFormat};

/// How long SIGTERM waits for reconciles in flight (below Kubernetes' 60 s grace period).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(40);

#[derive(Parser)]
#[command(
    name = "vps-controller",
    version,
    about = "Converges subscriptions in a database to Hetzner Cloud servers, firewalls and SSH keys"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty, env = "VPS_CONTROLLER_LOG_FORMAT")]
    log_format: LogFormat,
}

/// The variables `run` reads that are no option's `[env: ...]` (tests/cli.rs checks that every
/// variable the source reads is named in `run --help`).
const RUN_ENVIRONMENT: &str = "\
Environment (besides the [env: ...] of the options above):
  HCLOUD_TOKEN                             Hetzner Cloud API token (or HCLOUD_TOKEN_FILE);
                                           not needed with --simulate
  VPS_CONTROLLER_ENCRYPTION_KEY            32 bytes, base64, sealing the SSH private keys
                                           (e.g. `openssl rand -base64 32`)
  VPS_CONTROLLER_ENCRYPTION_KEY_FILE       a file holding that key, instead of the variable
  VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS  comma-separated earlier keys, still opened after a
                                           key rotation
  RUST_LOG                                 log filter (default: info), e.g.
                                           info,vps_controller=debug
  NO_COLOR                                 set and not empty: no colours in pretty logs
  HOSTNAME                                 names this replica in the leader lease (set by
                                           Kubernetes)
  MALLOC_ARENA_MAX                         glibc malloc arenas (default here: 2, which keeps
                                           the resident memory low)";

/// The variables `plan` reads that are no option's `[env: ...]`. No encryption key: `plan`
/// never opens a private key.
const PLAN_ENVIRONMENT: &str = "\
Environment (besides the [env: ...] of the options above):
  HCLOUD_TOKEN  Hetzner Cloud API token (or HCLOUD_TOKEN_FILE)
  RUST_LOG      log filter (default: info)
  NO_COLOR      set and not empty: no colours in pretty logs";

#[derive(Subcommand)]
enum Command {
    /// Run the controller until SIGTERM/SIGINT (applies migrations first).
    ///
    /// A SQLite database that does not exist is created.
    #[command(after_help = RUN_ENVIRONMENT)]
    Run(RunArgs),
    /// Apply all database migrations (idempotent); every command but `run` needs this first.
    ///
    /// A SQLite database that does not exist is created. The other commands never create
    /// one, and say to run `migrate` when the schema is missing or older than this build.
    Migrate(DbArgs),
    /// Print what the controller would change now; change nothing. Exit 0 in sync, 2 if changes are pending.
    ///
    /// Reports (a server type that differs from the plan's) are listed but are no change, and
    /// neither is a spec change that changes nothing (e.g. `active` to `trialing`).
    #[command(after_help = PLAN_ENVIRONMENT)]
    Plan(PlanArgs),
    /// Print the installation id, the deletion guard and the subscriptions with their
    /// provisioning status, or one subscription's events.
    Status(StatusArgs),
    /// Reconcile failed rows again (one by id, or every failed row with --failed).
    Retry(RetryArgs),
    /// Show or lift the deletion guard's pause of server deletions.
    #[command(subcommand)]
    Deletions(DeletionsCommand),
    /// Show this database's installation id, or decide about a database that moved.
    #[command(subcommand)]
    Installation(InstallationCommand),
    /// Re-seal the stored private keys under the current encryption key, or count them by key.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Open a subscription's private key for break-glass SSH access; print the ssh command.
    ///
    /// The key (0600) and a known_hosts with the pinned host key are written into a new 0700
    /// directory, and the access is recorded as a Warning event `BreakGlassAccess` with the
    /// operator and the reason. Nothing is run. Delete the directory when done.
    Ssh(SshArgs),
    /// Serve the built-in Hetzner Cloud API simulator under /v1.
    Simulator(simulator::cli::ServeArgs),
}

#[derive(Args)]
struct SshArgs {
    #[command(flatten)]
    db: DbArgs,
    /// The subscription whose server to log in to.
    subscription: String,
    /// Why the key is opened: recorded in the event, for the audit.
    #[arg(long)]
    reason: String,
    /// Where to create the key's directory [default: the system's temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// YAML config file (for `ssh.user` and `ssh.port`).
    #[arg(long, env = "VPS_CONTROLLER_CONFIG")]
    config: Option<PathBuf>,
    /// The port the server's sshd listens on (overrides `ssh.port`).
    #[arg(long, env = "VPS_CONTROLLER_SSH_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    ssh_port: Option<u16>,
}

#[derive(Args, Clone)]
struct DbArgs {
    /// Database URL (sqlite://FILE?mode=rwc or postgres://...) [default: sqlite://vps-controller.db?mode=rwc]
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// File holding the database URL (a mounted Secret), instead of DATABASE_URL.
    #[arg(long, env = "DATABASE_URL_FILE")]
    database_url_file: Option<PathBuf>,
}

impl DbArgs {
    /// The database URL from the flag, the variable or the file (only one may be set).
    fn url(&self) -> Result<String> {
        match (&self.database_url, &self.database_url_file) {
            (Some(_), Some(_)) => {
                bail!("set either DATABASE_URL (--database-url) or DATABASE_URL_FILE, not both")
            }
            (Some(url), None) => Ok(url.clone()),
            (None, Some(path)) => {
                let url = std::fs::read_to_string(path).with_context(|| {
                    format!("DATABASE_URL_FILE {}: cannot read", path.display())
                })?;
                let url = url.trim();
                if url.is_empty() {
                    bail!("DATABASE_URL_FILE {}: the file is empty", path.display());
                }
                Ok(url.to_string())
            }
            (None, None) => Ok(db::DEFAULT_DATABASE_URL.to_string()),
        }
    }
}

/// How an operator command uses the database. None of them creates one: an empty file
/// left behind by a mistyped path would look like a database to the next command.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Reads only (`status`, `plan`, `deletions status`): SQLite is opened `mode=ro`.
    Read,
    /// Writes rows that exist (`retry`, `deletions approve`, `installation ...`): `mode=rw`.
    Write,
}

impl DbArgs {
    /// The database of an operator command: an existing one (SQLite is never created here)
    /// whose schema `vps-controller migrate` brought up to date; otherwise an error saying to
    /// run it. The check itself writes nothing, not even to a file that is no database yet.
    async fn open_migrated(&self, access: Access) -> Result<DatabaseConnection> {
        let url = self.url()?;
        let Some(path) = sqlite_file(&url) else {
            let conn = db::connect(&url).await?;
            check_migrated(&conn).await?;
            return Ok(conn);
        };
        if !path.exists() {
            let shown = std::env::current_dir()
                .map(|dir| dir.join(&path))
                .unwrap_or(path);
            bail!(
                "the SQLite database {} does not exist: run `vps-controller migrate` first to \
                 create it, or set DATABASE_URL (--database-url) to the controller's database",
                shown.display()
            );
        }
        // Read-only first: a read-write open of SQLite already writes (the WAL header).
        let read_only = db::connect(&sqlite_url_with_mode(&url, Access::Read)).await?;
        check_migrated(&read_only).await?;
        match access {
            Access::Read => Ok(read_only),
            Access::Write => {
                read_only
                    .close()
                    .await
                    .context("closing the read-only connection")?;
                Ok(db::connect(&sqlite_url_with_mode(&url, Access::Write)).await?)
            }
        }
    }
}

/// Fails, saying to run `vps-controller migrate`, unless every migration of this build is
/// applied. Reads only (the migrations table is not created when it is missing).
async fn check_migrated(conn: &DatabaseConnection) -> Result<()> {
    let pending = Migrator::get_pending_migrations_read_only(conn)
        .await
        .context("reading which migrations the database has")?;
    let all = Migrator::migrations().len();
    match pending.first() {
        None => Ok(()),
        Some(_) if pending.len() == all => bail!(
            "the database has no vps-controller schema yet: run `vps-controller migrate` first"
        ),
        Some(first) => bail!(
            "the database schema is older than this vps-controller ({} of {all} migrations not \
             applied, the first is {}): run `vps-controller migrate` first",
            pending.len(),
            first.name()
        ),
    }
}

/// The file of a file-backed SQLite URL (relative to the working directory, as SQLite
/// resolves it); `None` for other databases, in-memory ones and URLs SQLx rejects anyway
/// (`db::connect` then names the problem).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    use std::str::FromStr as _;
    if !url.starts_with("sqlite:") || sqlite_param(url, "mode").as_deref() == Some("memory") {
        return None;
    }
    let options = sea_orm::sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
    let path = options.get_filename();
    let in_memory = path.as_os_str() == ":memory:"
        || path.to_string_lossy().starts_with("file:sqlx-in-memory-");
    (!in_memory).then(|| path.to_path_buf())
}

/// The value of the query parameter `name` of a SQLite URL.
fn sqlite_param(url: &str, name: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// A SQLite URL that never creates the file: `mode=ro` to read, `mode=rw` to write (a URL
/// that says `ro` stays `ro`). The other parameters are kept.
fn sqlite_url_with_mode(url: &str, access: Access) -> String {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let mode = match (sqlite_param(url, "mode").as_deref(), access) {
        (Some("ro"), _) | (_, Access::Read) => "ro",
        (_, Access::Write) => "rw",
    };
    let mut params = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if key != "mode" {
            params.append_pair(&key, &value);
        }
    }
    params.append_pair("mode", mode);
    format!("{path}?{}", params.finish())
}

#[derive(Args, Clone)]
struct ControllerArgs {
    #[command(flatten)]
    db: DbArgs,
    /// YAML config file; without it the built-in config (plans starter and pro) is used.
    #[arg(long, env = "VPS_CONTROLLER_CONFIG")]
    config: Option<PathBuf>,
    /// Hetzner Cloud API endpoint.
    #[arg(
        long,
        env = "HCLOUD_ENDPOINT",
        default_value = "https://api.hetzner.cloud/v1"
    )]
    hcloud_endpoint: String,
    /// File holding the Hetzner API token (alternative to the HCLOUD_TOKEN variable).
    #[arg(long, env = "HCLOUD_TOKEN_FILE")]
    hcloud_token_file: Option<PathBuf>,
    /// API budget of the Hetzner project, requests per hour.
    #[arg(long, env = "HCLOUD_RATE_LIMIT", default_value_t = 3600)]
    hcloud_rate_limit: u32,
    /// Simulations only: run the API budget F times faster than Hetzner's, like a simulator
    /// started with `--budget-time-scale F` (60: an hour of budget per real minute; the
    /// resync interval stretches in the same scaled time). Refused against Hetzner itself.
    #[arg(
        long,
        env = "HCLOUD_BUDGET_TIME_SCALE",
        default_value_t = 1.0,
        value_name = "F"
    )]
    hcloud_budget_time_scale: f64,
    /// Longest one Hetzner API request attempt may take (connect to the end of the body),
    /// seconds; a hung endpoint fails within it and is retried.
    #[arg(long, env = "HCLOUD_TIMEOUT_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=300))]
    hcloud_timeout_seconds: u64,
    /// Periodic full resync, seconds (overrides the config file).
    #[arg(long, env = "VPS_CONTROLLER_RESYNC_SECONDS")]
    resync_seconds: Option<u64>,
    /// The port the servers' sshd listens on (overrides `ssh.port` of the config file; tests
    /// point it at the simulator's SSH endpoint).
    #[arg(long, env = "VPS_CONTROLLER_SSH_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    ssh_port: Option<u16>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    /// Address for the status page (/), /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9090", env = "VPS_CONTROLLER_LISTEN")]
    listen: SocketAddr,
    /// Start the built-in simulator in-process and use it instead of Hetzner (demos only).
    #[arg(long)]
    simulate: bool,
    /// Longest wait for a Hetzner action (server create, power on, delete), seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    action_timeout_seconds: u64,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    controller: ControllerArgs,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Show the recent events of this subscription instead of the table.
    subscription: Option<String>,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["subscription", "failed"]))]
struct RetryArgs {
    #[command(flatten)]
    db: DbArgs,
    /// The subscription to reconcile again.
    subscription: Option<String>,
    /// Every row whose provisioning_status is `failed`.
    #[arg(long)]
    failed: bool,
}

#[derive(Subcommand)]
enum DeletionsCommand {
    /// Whether server deletions are paused, and how many ran in the last hour.
    Status(DbArgs),
    /// Lift a pause: deletions before now no longer count against the hourly budget, and
    /// `--count N` more may run beyond it (e.g. the rest of a planned mass cancellation).
    Approve(ApproveArgs),
}

#[derive(Subcommand)]
enum InstallationCommand {
    /// The installation id, the label value every owned resource carries.
    Show(DbArgs),
    /// This database was moved or restored in place of itself: keep the id, bind it here.
    Keep(DbArgs),
    /// This database is a copy (staging, a laptop): give it a new id, so it owns nothing of
    /// the original's resources.
    Renew(DbArgs),
}

#[derive(Args)]
struct ApproveArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Server deletions allowed beyond the hourly budget, used up as they run.
    #[arg(long, default_value_t = 0)]
    count: u64,
}

fn main() -> ExitCode {
    telemetry::limit_malloc_arenas();
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
    // reqwest is built without a TLS provider of its own; ring is the one we ship.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            telemetry::report_fatal(
                cli.log_format,
                &format!("cannot start the async runtime: {e}"),
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            telemetry::report_fatal(cli.log_format, &describe(&e));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run(args) => run(args).await,
        Command::Migrate(args) => {
            let conn = db::connect(&args.url()?).await?;
            db::migrate(&conn).await?;
            tracing::info!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(args) => plan(args).await,
        Command::Status(args) => status(args).await,
        Command::Retry(args) => retry(args).await,
        Command::Deletions(command) => deletions(command).await,
        Command::Installation(command) => installation_command(command).await,
        Command::Keys(command) => keys_command(command).await,
        Command::Ssh(args) => ssh_access(args).await,
        Command::Simulator(args) => serve_simulator(args).await,
    }
}

/// Who runs this process, for the audit: the account of the real user id (from the system,
/// not from a variable anyone can set), e.g. `alice (uid 1000)`.
fn os_user() -> String {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let id = fields.nth(1)?;
                (id.parse::<u32>().ok()? == uid).then(|| name.to_owned())
            })
        });
    match name {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

async fn ssh_access(args: SshArgs) -> Result<ExitCode> {
    let config = Config::load(args.config.as_deref())?;
    let sealer = Sealer::from_env()?.context(
        "no encryption key: set VPS_CONTROLLER_ENCRYPTION_KEY or VPS_CONTROLLER_ENCRYPTION_KEY_FILE (the key the controller seals with)",
    )?;
    if args.reason.trim().is_empty() {
        bail!("--reason must say why the key is opened (it is recorded for the audit)");
    }
    let conn = args.db.open_migrated(Access::Write).await?;
    let operator = os_user();
    let parent = args.dir.unwrap_or_else(std::env::temp_dir);
    let access = vps_controller::ssh::access::open(
        &conn,
        &sealer,
        vps_controller::ssh::access::Request {
            subscription_id: &args.subscription,
            parent: &parent,
            user: &config.ssh.user,
            port: args.ssh_port.unwrap_or(config.ssh.port),
            operator: &operator,
            reason: args.reason.trim(),
        },
    )
    .await?;
    eprintln!(
        "The private key of {:?} is in {} (recorded as event BreakGlassAccess).",
        args.subscription,
        access.directory.display()
    );
    if access.known_hosts.is_none() {
        eprintln!(
            "No host key is pinned for this server yet: compare the fingerprint ssh shows before you accept it."
        );
    }
    eprintln!("Delete it when done: rm -r {}", access.directory.display());
    println!("{}", access.command);
    Ok(ExitCode::SUCCESS)
}

fn load_config(args: &ControllerArgs) -> Result<Config> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(seconds) = args.resync_seconds {
        config.resync_seconds = seconds;
    }
    if let Some(port) = args.ssh_port {
        config.ssh.port = port;
    }
    config.validate().context("configuration")?;
    Ok(config)
}

fn read_token(args: &ControllerArgs) -> Result<Token> {
    let from_env = std::env::var("HCLOUD_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty());
    let token = match (from_env, &args.hcloud_token_file) {
        (Some(_), Some(_)) => bail!("set either HCLOUD_TOKEN or HCLOUD_TOKEN_FILE, not both"),
        (Some(token), None) => token,
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("HCLOUD_TOKEN_FILE {}: cannot read", path.display()))?
            .trim()
            .to_string(),
        (None, None) => bail!(
            "no Hetzner API token: set HCLOUD_TOKEN or HCLOUD_TOKEN_FILE (or use `run --simulate` for a demo)"
        ),
    };
    // Hetzner's tokens are one word; whitespace inside is a pasted secret gone wrong (two
    // lines, a comment). Said now, not as 401s on every request.
    if token.trim().is_empty()
        || token
            .trim()
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        bail!(
            "the Hetzner API token (HCLOUD_TOKEN or HCLOUD_TOKEN_FILE) is empty or contains whitespace or control characters; check the secret"
        );
    }
    Ok(Token::new(token.trim()))
}

/// `--hcloud-budget-time-scale`, checked: a usable number, and 1 unless `endpoint` (None:
/// the in-process simulator of `run --simulate`) is something other than Hetzner.
fn budget_time_scale(args: &ControllerArgs, endpoint: Option<&str>) -> Result<f64> {
    let scale = vps_controller::hcloud::budget::check_time_scale(args.hcloud_budget_time_scale)
        .context("--hcloud-budget-time-scale (HCLOUD_BUDGET_TIME_SCALE)")?;
    if let Some(endpoint) = endpoint
        && scale != 1.0
        && is_hetzner(endpoint)
    {
        bail!(
            "--hcloud-budget-time-scale (HCLOUD_BUDGET_TIME_SCALE) is {scale}, but the endpoint \
             {endpoint} is Hetzner's: its budget runs in real time, so a faster one would \
             collect 429s (and a slower one waste the budget). The time scale is for \
             simulators started with --budget-time-scale; unset it or set it to 1"
        );
    }
    Ok(scale)
}

/// True for Hetzner's own API hosts (`api.hetzner.cloud` and its siblings).
fn is_hetzner(endpoint: &str) -> bool {
    url::Url::parse(endpoint)
        .ok()
        .and_then(|url| url.host_str().map(str::to_ascii_lowercase))
        .is_some_and(|host| {
            ["hetzner.cloud", "hetzner.com"]
                .iter()
                .any(|domain| host == *domain || host.ends_with(&format!(".{domain}")))
        })
}

/// The requests per hour the resync interval must fit in, in the budget's scaled time: F
/// times faster budget, F times as many requests per real hour.
fn scaled_rate_limit(rate_limit: u32, time_scale: f64) -> u32 {
    (f64::from(rate_limit) * time_scale)
        .round()
        .clamp(1.0, f64::from(u32::MAX)) as u32
}

fn client(
    args: &ControllerArgs,
    endpoint: &str,
    token: Token,
    time_scale: f64,
    write_gate: WriteGate,
) -> Result<Client> {
    let config = ClientConfig {
        write_gate: Some(write_gate),
        budget: Arc::new(Budget::new(args.hcloud_rate_limit).with_time_scale(time_scale)?),
        timeout: Duration::from_secs(args.hcloud_timeout_seconds),
        ..ClientConfig::new(endpoint, token)
    };
    Ok(Client::new(config)?)
}

async fn run(args: RunArgs) -> Result<ExitCode> {
    let signal = shutdown_signal();
    // Everything that can be wrong in the pod's configuration is checked before the schema
    // is touched: a misconfigured replica must not migrate and then exit.
    let mut config = load_config(&args.controller)?;
    let time_scale = budget_time_scale(
        &args.controller,
        (!args.simulate).then_some(args.controller.hcloud_endpoint.as_str()),
    )?;
    let database_url = args.controller.db.url()?;
    let (sealer, ephemeral_key, token) = if args.simulate {
        match Sealer::from_env()? {
            Some(sealer) => (sealer, false, Token::new("simulated")),
            None => (Sealer::ephemeral(), true, Token::new("simulated")),
        }
    } else {
        let sealer = Sealer::from_env()?.context(
            "no encryption key: set VPS_CONTROLLER_ENCRYPTION_KEY (32 bytes, base64) or VPS_CONTROLLER_ENCRYPTION_KEY_FILE; e.g. `openssl rand -base64 32`",
        )?;
        (sealer, false, read_token(&args.controller)?)
    };
    let token_fingerprint = token.fingerprint();

    let conn = db::connect(&database_url).await?;
    db::migrate(&conn).await?;
    if let installation::Binding::Moved { bound_to, here } =
        installation::check_binding(&conn).await?
    {
        bail!(
            "this database holds installation {} made in another database ({bound_to}; this one \
             is {here}): it looks like a copy or a restore, and a copy must never manage the \
             original's servers. If it is a copy, run `vps-controller installation renew` (it \
             then owns nothing of the original's). If the original database was moved here, run \
             `vps-controller installation keep`",
            installation::id(&conn).await?
        );
    }
    let owner = Owner::new(installation::id(&conn).await?, &config);
    tracing::info!(installation = %owner.installation, instance = %owner.instance, "resources are owned through label {}={}", vps_controller::reconcile::desired::INSTALLATION_LABEL, owner.installation);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let leadership = leader::Leadership::default();
    // Nothing that changes Hetzner leaves this process unless it leads at that very moment.
    let write_gate = {
        let leadership = leadership.clone();
        WriteGate::new(move || leadership.is_leader())
    };
    let mut simulator = None;
    let api = if args.simulate {
        tracing::warn!("==============================================================");
        tracing::warn!("SIMULATION MODE: no request reaches Hetzner. Servers, keys and");
        tracing::warn!("firewalls exist only in this process and vanish when it stops.");
        tracing::warn!("==============================================================");
        if ephemeral_key {
            tracing::warn!(
                "no VPS_CONTROLLER_ENCRYPTION_KEY: private keys are sealed with an ephemeral key that dies with this process"
            );
        }
        // The simulated project has the budget the controller was told, at the same pace.
        let running = simulator::spawn(
            SimulatorConfig {
                action_seconds: 0.5,
                rate_limit: args.controller.hcloud_rate_limit,
                budget_time_scale: time_scale,
                // Its servers answer SSH on loopback addresses, so `ready` means what it
                // means against Hetzner: logged in, cloud-init done, bootstrap applied.
                ssh: config.ssh.enabled.then(|| simulator::SshConfig {
                    listen: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
                    cloud_init_seconds: 1.0,
                }),
                ..SimulatorConfig::default()
            },
            "127.0.0.1:0".parse()?,
        )
        .await
        .context("starting the in-process simulator")?;
        if let Some(ssh) = running.ssh_addr() {
            config.ssh.port = ssh.port();
        }
        tracing::warn!(endpoint = %running.base_url(), ssh = ?running.ssh_addr(), "simulator listening");
        let api = client(
            &args.controller,
            &running.base_url(),
            token,
            time_scale,
            write_gate,
        )?;
        simulator = Some(running);
        api
    } else {
        client(
            &args.controller,
            &args.controller.hcloud_endpoint,
            token,
            time_scale,
            write_gate,
        )?
    };
    // An ephemeral demo key never opens an earlier run's keys; that is expected there.
    if !ephemeral_key {
        vps_controller::reconcile::keycheck::check_sealer_opens_stored_keys(&conn, &sealer)
            .await
            .map_err(anyhow::Error::msg)?;
    }

    let inputs =
        vps_controller::controller::inputs_fingerprint(&config, &sealer, &token_fingerprint);
    check_plans_at_hetzner(&api, &config).await;
    let metrics = Arc::new(Metrics::new());
    metrics.register_collector(Box::new(HcloudCollector(api.clone())));
    let reachability = api.clone();
    let health = Arc::new(Health::new(Some(Box::new(move || {
        reachability.reachability()
    }))));
    let status_page = telemetry::status_page::StatusPage::new(
        owner.installation.clone(),
        leadership.clone(),
        api.budget().clone(),
    );
    let bootstrapper = Arc::new(Bootstrapper::new(config.ssh.clone(), metrics.clone()));
    let reconciler = Reconciler {
        api,
        db: conn.clone(),
        sealer,
        config,
        owner,
        action_timeout: Duration::from_secs(args.action_timeout_seconds),
        leadership: leadership.clone(),
        key_checks: Default::default(),
        metrics: metrics.clone(),
        bootstrapper,
    };
    if time_scale != 1.0 {
        tracing::warn!(
            time_scale,
            "the API budget runs {time_scale} times faster than Hetzner's (simulations only)"
        );
    }
    let mut controller = Controller::new(
        reconciler,
        scaled_rate_limit(args.controller.hcloud_rate_limit, time_scale),
    );
    controller.inputs_fingerprint = Some(inputs);
    controller.health = health.clone();
    let controller = Arc::new(controller);

    let listener = telemetry::server::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    tracing::info!(listen = %args.listen, "serving the status page at /, /metrics, /healthz and /readyz");
    let mut server_shutdown = shutdown_rx.clone();
    let mut server = tokio::spawn(telemetry::server::serve(
        listener,
        metrics,
        health,
        conn.clone(),
        status_page,
        async move {
            let _ = server_shutdown.wait_for(|stop| *stop).await;
        },
    ));
    // The lease is released only after the control loop stopped acting.
    let (lease_tx, lease_rx) = watch::channel(false);
    let mut lease = tokio::spawn(leader::run(
        conn.clone(),
        leader::holder_id(),
        leadership,
        lease_rx,
    ));
    tokio::spawn(triggers::listen_for_changes(
        database_url.clone(),
        controller.wake.clone(),
        shutdown_rx.clone(),
    ));
    tokio::spawn(triggers::watch_sqlite(
        database_url.clone(),
        controller.wake.clone(),
        shutdown_rx.clone(),
    ));
    let mut control = tokio::spawn(controller.run(shutdown_rx));

    // Any task ending on its own is fatal: a replica that serves probes but no longer
    // reconciles (or renews a lease nobody uses) must be restarted, not kept.
    let failure = tokio::select! {
        _ = signal => None,
        _ = &mut control => Some("the control loop"),
        _ = &mut lease => Some("the lease task"),
        _ = &mut server => Some("the metrics server"),
    };
    if let Some(task) = failure {
        tracing::error!("{task} stopped unexpectedly; exiting so the process is restarted");
        let _ = shutdown_tx.send(true);
        let _ = lease_tx.send(true);
        return Ok(ExitCode::FAILURE);
    }
    tracing::info!(
        grace_seconds = SHUTDOWN_GRACE.as_secs(),
        "shutting down: finishing the reconciles in flight"
    );
    let _ = shutdown_tx.send(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut control)
        .await
        .is_err()
    {
        // Every id is stored right after its create, so stopping mid-reconcile loses
        // nothing: the next leader adopts what was created.
        tracing::warn!("reconciles still running after the grace period; stopping them");
        control.abort();
    }
    let _ = lease_tx.send(true);
    let _ = lease.await;
    let _ = server.await;
    if let Some(simulator) = simulator {
        simulator.shutdown().await;
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when
/// the future is first polled, so a signal during start-up is not lost.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        #[cfg(unix)]
        if let Ok(mut term) = term {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// An error and its causes on one line, each cause once: several layers repeat the text of
/// the error they wrap, which `{:#}` would print again and again.
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

async fn plan(args: PlanArgs) -> Result<ExitCode> {
    let config = load_config(&args.controller)?;
    let time_scale = budget_time_scale(
        &args.controller,
        Some(args.controller.hcloud_endpoint.as_str()),
    )?;
    let conn = args.controller.db.open_migrated(Access::Read).await?;
    let api = client(
        &args.controller,
        &args.controller.hcloud_endpoint,
        read_token(&args.controller)?,
        time_scale,
        // `plan` only reads: a request that would change anything is a bug, and is not sent.
        WriteGate::new(|| false),
    )?;
    let report = vps_controller::reconcile::report::plan_all(&api, &conn, &config).await?;
    print!("{}", report.render());
    Ok(if report.in_sync() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn status(args: StatusArgs) -> Result<ExitCode> {
    let conn = args.db.open_migrated(Access::Read).await?;
    let text = match &args.subscription {
        Some(id) => vps_controller::reconcile::report::events_table(&conn, id)
            .await
            .context("reading the subscription's events")?
            .with_context(|| {
                format!(
                    "subscription {id:?} does not exist (no row in subscriptions, no recorded \
                     events); `vps-controller status` lists them all"
                )
            })?,
        None => vps_controller::reconcile::report::status_table(&conn)
            .await
            .context("reading the subscriptions")?,
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// Checks each plan's server type, location and image against Hetzner once at start and
/// reports the bad ones clearly. Rows on such a plan fail with Hetzner's own error and are
/// retried when the config changes. Hetzner being unreachable here is not fatal.
async fn check_plans_at_hetzner(api: &Client, config: &Config) {
    for (name, plan) in &config.plans {
        let checks = async {
            let mut problems = Vec::new();
            if api.server_type_by_name(&plan.server_type).await?.is_none() {
                problems.push(format!("server_type {:?} does not exist", plan.server_type));
            }
            if api.location_by_name(&plan.location).await?.is_none() {
                problems.push(format!("location {:?} does not exist", plan.location));
            }
            if plan.image.parse::<i64>().is_err()
                && api.image_by_name(&plan.image).await?.is_empty()
            {
                problems.push(format!("image {:?} does not exist", plan.image));
            }
            Ok::<_, vps_controller::hcloud::Error>(problems)
        };
        match checks.await {
            Ok(problems) if problems.is_empty() => {}
            Ok(problems) => tracing::error!(
                plan = %name,
                "plans.{name}: {}; subscriptions on this plan will fail until the config is fixed",
                problems.join("; ")
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not check the plans against Hetzner; going on");
                return;
            }
        }
    }
}

async fn retry(args: RetryArgs) -> Result<ExitCode> {
    let conn = args.db.open_migrated(Access::Write).await?;
    let marked = subscriptions::retry(&conn, args.subscription.as_deref())
        .await
        .context("marking the subscriptions for a retry")?;
    match (&args.subscription, marked) {
        (Some(id), 0) => {
            bail!("subscription {id:?} does not exist; `vps-controller status` lists them all")
        }
        (Some(id), _) => println!("{id}: will be reconciled again within a second"),
        (None, n) => println!("{n} failed subscriptions will be reconciled again within a second"),
    }
    Ok(ExitCode::SUCCESS)
}

async fn deletions(command: DeletionsCommand) -> Result<ExitCode> {
    let (args, approve) = match command {
        DeletionsCommand::Status(args) => (args, None),
        DeletionsCommand::Approve(approve) => (approve.db, Some(approve.count)),
    };
    let access = match approve {
        Some(_) => Access::Write,
        None => Access::Read,
    };
    let conn = args.open_migrated(access).await?;
    let before = deletion_guard::status(&conn)
        .await
        .context("reading the deletion guard")?;
    let status = match approve {
        Some(count) => {
            let after = deletion_guard::approve(&conn, count).await?;
            tracing::warn!(
                was_paused = before.paused_since.is_some(),
                extra = count,
                "server deletions approved by an operator"
            );
            println!(
                "server deletions resumed: a new hourly window starts now{}",
                if count > 0 {
                    format!(", and {count} more may run beyond the budget")
                } else {
                    String::new()
                }
            );
            after
        }
        None => before,
    };
    match &status.paused_since {
        Some(since) => println!(
            "PAUSED since {} ({})",
            since.to_rfc3339(),
            status.pause_reason.as_deref().unwrap_or("over budget")
        ),
        None => println!("not paused"),
    }
    println!(
        "deleted in the last hour: {}; counted against the budget since the last approval: {}; extra allowance left: {}",
        status.deleted_last_hour, status.deleted_in_window, status.extra_allowance
    );
    Ok(ExitCode::SUCCESS)
}

async fn installation_command(command: InstallationCommand) -> Result<ExitCode> {
    let (args, action) = match command {
        InstallationCommand::Show(args) => (args, "show"),
        InstallationCommand::Keep(args) => (args, "keep"),
        InstallationCommand::Renew(args) => (args, "renew"),
    };
    // `show` binds an id not bound yet (as `migrate` does), so it may write too.
    let conn = args.open_migrated(Access::Write).await?;
    let context = "reading the installation id";
    match action {
        "keep" => {
            let id = installation::keep(&conn).await.context(context)?;
            tracing::warn!(installation = %id, "installation kept and bound to this database by an operator");
            println!("installation {id} is now bound to this database");
        }
        "renew" => {
            let old = installation::id(&conn).await.context(context)?;
            let id = installation::renew(&conn).await?;
            tracing::warn!(old = %old, new = %id, "installation renewed by an operator: resources labelled with the old id are no longer this database's");
            println!(
                "installation {id} (was {old}): resources labelled {}={old} are never touched from this database",
                vps_controller::reconcile::desired::INSTALLATION_LABEL
            );
        }
        _ => {
            let id = installation::id(&conn).await.context(context)?;
            let binding = match installation::check_binding(&conn).await? {
                installation::Binding::Here => "bound to this database".to_string(),
                installation::Binding::Moved { bound_to, .. } => format!(
                    "MADE IN ANOTHER DATABASE ({bound_to}): `run` refuses until `installation keep` or `installation renew`"
                ),
            };
            println!("{id} ({binding})");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Count the rows sealed under each encryption key id (ids and counts, no key material).
    ///
    /// Says which previous key no row needs any more, so it can be dropped.
    Status(DbArgs),
    /// Re-seal every stored private key under the current encryption key.
    ///
    /// Opens old values with VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS and seals them under
    /// VPS_CONTROLLER_ENCRYPTION_KEY (or _FILE). Every controller replica must already run
    /// with the new key configured. Safe while the controller runs (a row is written only if
    /// it still holds the value read) and to interrupt (run it again to finish). Exit 0 once
    /// every sealed row is under the current key. See docs/keys.md.
    Rotate(RotateArgs),
}

#[derive(Args)]
struct RotateArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Rows read and written per transaction.
    #[arg(long, default_value_t = vps_controller::keys::rotate::DEFAULT_BATCH_SIZE, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// Milliseconds to wait between batches, to spare a busy database.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    batch_pause_ms: u64,
}

async fn keys_command(command: KeysCommand) -> Result<ExitCode> {
    use vps_controller::keys::rotate;
    let args = match &command {
        KeysCommand::Status(args) => args,
        KeysCommand::Rotate(rotate) => &rotate.db,
    };
    let sealer = Sealer::from_env()?;
    let conn = db::connect(&args.url()?).await?;
    let KeysCommand::Rotate(rotate_args) = command else {
        rotate::ensure_migrated(&conn).await?;
        print!(
            "{}",
            rotate::count_by_key(&conn).await?.render(sealer.as_ref())
        );
        return Ok(ExitCode::SUCCESS);
    };
    let sealer = sealer.context(
        "no encryption key: set VPS_CONTROLLER_ENCRYPTION_KEY (or _FILE) to the new key and \
         VPS_CONTROLLER_PREVIOUS_ENCRYPTION_KEYS to the old ones",
    )?;
    let options = rotate::Options {
        batch_size: rotate_args.batch_size,
        pause: Duration::from_millis(rotate_args.batch_pause_ms),
    };
    tracing::warn!(key_id = %sealer.key_id(), previous = ?sealer.previous_key_ids(), "re-sealing private keys under the current key, by an operator");
    let report = rotate::rotate(&conn, &sealer, &options, |p| {
        tracing::info!(
            done = p.done,
            total = p.total,
            resealed = p.tally.resealed,
            "keys rotate: {}/{} rows done",
            p.done,
            p.total
        );
    })
    .await?;
    print!("{}", report.render());
    match report.problem() {
        None => Ok(ExitCode::SUCCESS),
        Some(problem) => bail!("keys rotate did not finish: {problem}"),
    }
}

async fn serve_simulator(args: simulator::cli::ServeArgs) -> Result<ExitCode> {
    simulator::cli::serve(&args, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hetzners_own_hosts_count_as_hetzner() {
        for endpoint in [
            "https://api.hetzner.cloud/v1",
            "https://API.Hetzner.Cloud/v1/",
            "https://api.hetzner.com/v1",
            "https://hetzner.cloud",
        ] {
            assert!(is_hetzner(endpoint), "{endpoint}");
        }
        for endpoint in [
            "http://127.0.0.1:4000/v1",
            "http://simulator:4000/v1",
            "https://nothetzner.cloud/v1",
            "https://hetzner.cloud.example.org/v1",
            "not a url",
        ] {
            assert!(!is_hetzner(endpoint), "{endpoint}");
        }
    }

    #[test]
    fn operator_commands_open_sqlite_without_creating_it() {
        let cases = [
            (
                "sqlite://vps.db?mode=rwc",
                Access::Read,
                "sqlite://vps.db?mode=ro",
            ),
            ("sqlite://vps.db", Access::Write, "sqlite://vps.db?mode=rw"),
            (
                "sqlite://vps.db?cache=shared&mode=rwc",
                Access::Write,
                "sqlite://vps.db?cache=shared&mode=rw",
            ),
            // A URL that says read-only is never upgraded.
            (
                "sqlite://vps.db?mode=ro",
                Access::Write,
                "sqlite://vps.db?mode=ro",
            ),
        ];
        for (url, access, expected) in cases {
            assert_eq!(sqlite_url_with_mode(url, access), expected, "{url}");
        }
        assert_eq!(sqlite_file("sqlite::memory:"), None);
        assert_eq!(sqlite_file("sqlite://vps.db?mode=memory"), None);
        assert_eq!(sqlite_file("postgres://user@host/db"), None);
        assert_eq!(
            sqlite_file("sqlite://data/vps%20one.db?mode=rwc"),
            Some(PathBuf::from("data/vps one.db"))
        );
    }

    #[test]
    fn the_resync_budget_is_scaled_with_the_bucket() {
        assert_eq!(scaled_rate_limit(3600, 1.0), 3600);
        assert_eq!(scaled_rate_limit(3600, 60.0), 216_000);
        assert_eq!(scaled_rate_limit(3600, 0.5), 1800);
        assert_eq!(scaled_rate_limit(u32::MAX, 3600.0), u32::MAX);
    }
}
