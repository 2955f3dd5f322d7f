//! Logs, metrics and the HTTP endpoints next to the loop: /metrics, /healthz, /readyz and the
//! status page at /.

pub mod health;
pub mod metrics;
pub mod server;
pub mod status_page;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Installs the global tracing subscriber, writing to stderr. `RUST_LOG` overrides the
/// default `info` filter. Colours only on a terminal, and never with `NO_COLOR` set.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging was already initialised: {e}");
    }
}

/// Reports an error that ends the process: one JSON line in JSON mode (like every other
/// line a log collector reads), `error: …` otherwise.
pub fn report_fatal(format: LogFormat, message: &str) {
    match format {
        LogFormat::Json => tracing::error!(fatal = true, "{message}"),
        LogFormat::Pretty => eprintln!("error: {message}"),
    }
}

/// Caps glibc's malloc arenas at two. By default glibc gives each thread that allocates its
/// own arena, up to eight per core: tokio workers, blocking threads and one thread per SQLite
/// connection each keep freed memory in their own arena. Measured at 10,000 subscriptions
/// (`cargo bench --bench controller -- --n 10000 --db sqlite`): peak RSS 152 MiB with the
/// default, 114 MiB with two arenas, and no change in CPU per resync. Call it first thing in
/// `main`, before any thread exists; `MALLOC_ARENA_MAX` in the environment still wins.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before other threads run.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Hands the pages glibc's malloc holds free back to the kernel (`malloc_trim`). glibc keeps
/// freed memory in its arenas for reuse, so without this the process's RSS after a resync or
/// a burst of provisioning stays at its high-water mark, and the next resync's working set
/// lands on top of it. Called at the end of every resync pass, when the snapshot and the
/// scan's maps have just been freed. Cheap next to a resync: the call takes 1–5 ms at 10,000
/// subscriptions, and faulting the pages back in costs the next resync a few hundredths of a
/// CPU second (BENCHMARKS.md, seventh session). Elsewhere a no-op.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the arenas' own locks; it frees nothing that is in use.
    unsafe {
        libc::malloc_trim(0);
    }
}
