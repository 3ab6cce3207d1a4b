//! The `cascade` binary: `serve` (default), `check`, `report`, `explain` and `mock`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use cascade::config::{Config, Scheduler};
use cascade::mock::{Knobs, MockState};
use cascade::server::{self, AppState};

const DEFAULT_CONFIG: &str = "config/cascade.yaml";

#[derive(Parser)]
#[command(
    name = "cascade",
    version,
    about = "An LLM fallback gateway with an OpenAI-compatible API"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file for the default `serve` command.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ImportFrom {
    /// A LiteLLM proxy `config.yaml`. What could not be carried over is listed on
    /// standard error.
    Litellm {
        file: PathBuf,
        /// Write the cascade config here instead of standard output.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Validate the config and print each chain as resolved, then any findings
    /// (errors exit 2; warnings are printed and exit 0).
    Check {
        /// text (chains on stdout, findings on stderr) or json (one object on stdout).
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// The fallback-cost report from the store (works while a gateway runs on it).
    Report {
        /// The store: a SQLite file or a `postgres://` URL (default: the config's
        /// `store.path` or `store.url`).
        #[arg(long)]
        db: Option<String>,
        /// Start of the window: a duration back from now (7d, 12h) or an RFC 3339 time.
        #[arg(long, default_value = "7d")]
        since: String,
        /// End of the window: `now`, a duration back from now, or an RFC 3339 time.
        #[arg(long, default_value = "now")]
        until: String,
        /// Group by chain, model, day or shadow.
        #[arg(long, default_value = "chain")]
        by: String,
        /// table, json or csv.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// What a request would do (its chain, the order of its targets and why, timeouts,
    /// retries, cache, shadow), without calling any provider. Prints JSON; exit 2 when
    /// the request itself would be refused.
    Explain {
        /// The request body as a client would send it (`-` for standard input).
        request: PathBuf,
        /// chat (default), responses, messages or embeddings.
        #[arg(long)]
        surface: Option<String>,
        /// A request header, as `NAME: VALUE` (x-cascade-task, x-cascade-timeout-ms,
        /// cache-control, the credential). Repeatable.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
    /// Convert another gateway's config to a cascade config.
    Import {
        #[command(subcommand)]
        from: ImportFrom,
    },
    /// Exit 0 when the gateway's `/healthz` answers 200 (for a container HEALTHCHECK;
    /// the image has no shell tools).
    Healthcheck {
        /// Default: `http://127.0.0.1:PORT/healthz`, PORT from `CASCADE_LISTEN` (8080).
        #[arg(long)]
        url: Option<String>,
    },
    /// Run the mock provider on its own.
    Mock {
        #[arg(long, default_value = "127.0.0.1:4010")]
        listen: String,
        /// Knobs for one model, as MODEL=SPEC (e.g. `gpt-4o=status=500`). Repeatable.
        #[arg(long = "knobs")]
        knobs: Vec<String>,
        /// Tokio worker threads.
        #[arg(long)]
        workers: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_path = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&config_path),
        Command::Check { format } => check(&config_path, &format),
        Command::Report {
            db,
            since,
            until,
            by,
            format,
        } => report(&config_path, db, &since, &until, &by, &format),
        Command::Mock {
            listen,
            knobs,
            workers,
        } => mock(&listen, &knobs, workers),
        Command::Healthcheck { url } => healthcheck(url),
        Command::Import {
            from: ImportFrom::Litellm { file, output },
        } => import_litellm(&file, output.as_deref()),
        Command::Explain {
            request,
            surface,
            headers,
        } => explain(&config_path, &request, surface.as_deref(), &headers),
    }
}

fn import_litellm(file: &std::path::Path, output: Option<&std::path::Path>) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cascade: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let imported = match cascade::config::litellm::import(&text) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("cascade: {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    match output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &imported.yaml) {
                eprintln!("cascade: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        None => print!("{}", imported.yaml),
    }
    if !imported.notes.is_empty() {
        eprintln!("cascade: not carried over, or carried over approximately:");
        for n in &imported.notes {
            eprintln!("  - {n}");
        }
    }
    ExitCode::SUCCESS
}

fn explain(
    path: &std::path::Path,
    request: &std::path::Path,
    surface: Option<&str>,
    headers: &[String],
) -> ExitCode {
    use std::io::Read;
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let body = if request == std::path::Path::new("-") {
        let mut b = Vec::new();
        std::io::stdin().read_to_end(&mut b).map(|_| b)
    } else {
        std::fs::read(request)
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cascade: cannot read {}: {e}", request.display());
            return ExitCode::from(2);
        }
    };
    let mut map = http::HeaderMap::new();
    for h in headers {
        let parsed = h.split_once(':').and_then(|(name, value)| {
            Some((
                http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
                http::HeaderValue::from_str(value.trim()).ok()?,
            ))
        });
        match parsed {
            Some((name, value)) => {
                map.append(name, value);
            }
            None => {
                // The name only: the value may be a credential.
                let name = h.split(':').next().unwrap_or_default().trim();
                eprintln!("cascade: --header {name:?}: expected NAME: VALUE (a valid header name and value)");
                return ExitCode::from(2);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cascade: {e}");
            return ExitCode::FAILURE;
        }
    };
    let explained = rt.block_on(server::explain::offline(config, surface, map, body.into()));
    match explained {
        Ok((status, out)) => {
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            if status == 200 {
                ExitCode::SUCCESS
            } else {
                eprintln!("cascade: the request would be refused with status {status}");
                ExitCode::from(2)
            }
        }
        Err(e) => {
            eprintln!("cascade: {e}");
            ExitCode::from(2)
        }
    }
}

fn healthcheck(url: Option<String>) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let port = std::env::var("CASCADE_LISTEN")
            .ok()
            .and_then(|l| l.rsplit(':').next().map(str::to_string))
            .unwrap_or_else(|| "8080".into());
        format!("http://127.0.0.1:{port}/healthz")
    });
    match cascade::server::healthcheck(&url, std::time::Duration::from_secs(3)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cascade: unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("cascade: {e}");
        ExitCode::from(2)
    })
}

fn check(path: &std::path::Path, format: &str) -> ExitCode {
    use cascade::config::lint::{Finding, Severity};
    if !matches!(format, "text" | "json") {
        eprintln!("cascade: unknown --format {format:?} (expected text or json)");
        return ExitCode::from(2);
    }
    let (chains, findings) = match Config::load(path) {
        Ok(config) => {
            let mut findings = cascade::config::lint::lint(&config);
            // A PostgreSQL URL was parsed when the config loaded; it is not connected to
            // here (`check` runs in CI and on machines that cannot reach the database).
            if let Some(cascade::store::Backend::Sqlite(p)) =
                config.store.as_ref().map(|s| &s.backend)
            {
                if let Err(e) = cascade::store::check_path(p) {
                    findings.insert(
                        0,
                        Finding {
                            severity: Severity::Error,
                            path: e.key.into(),
                            message: e.message,
                        },
                    );
                }
            }
            let chains: Vec<(String, Vec<String>)> = config
                .chains
                .iter()
                .map(|(name, chain)| {
                    let models = chain.targets.iter().map(|t| t.model.name.to_string());
                    (name.clone(), models.collect())
                })
                .collect();
            (chains, findings)
        }
        Err(e) => {
            let (path, message) = match &e {
                cascade::config::ConfigError::At { path, message } => {
                    (path.clone(), message.clone())
                }
                other => (String::new(), other.to_string()),
            };
            let finding = Finding {
                severity: Severity::Error,
                path,
                message,
            };
            (Vec::new(), vec![finding])
        }
    };
    let ok = findings.iter().all(|f| f.severity != Severity::Error);
    if format == "json" {
        let chains: serde_json::Map<String, serde_json::Value> = chains
            .into_iter()
            .map(|(name, models)| (name, serde_json::json!(models)))
            .collect();
        let out = serde_json::json!({"ok": ok, "findings": findings, "chains": chains});
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        for (name, models) in &chains {
            println!("{name}: {}", models.join(" -> "));
        }
        for f in &findings {
            let level = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            if f.path.is_empty() {
                eprintln!("cascade: {level}: {}", f.message);
            } else {
                eprintln!(
                    "cascade: {level}: config error at {}: {}",
                    f.path, f.message
                );
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

fn report(
    path: &std::path::Path,
    db: Option<String>,
    since: &str,
    until: &str,
    by: &str,
    format: &str,
) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    use cascade::store::{Backend, PgUrl};
    let db = match (db, &config.store) {
        // A URL, or a `host=... user=...` connection string (not a file that exists).
        (Some(db), store)
            if db.starts_with("postgres://")
                || db.starts_with("postgresql://")
                || (!std::path::Path::new(&db).exists()
                    && ["host=", "user=", "dbname="]
                        .iter()
                        .any(|k| db.starts_with(k) || db.contains(&format!(" {k}")))) =>
        {
            // The config's CA, when it names a PostgreSQL store.
            let ca = match store.as_ref().map(|s| &s.backend) {
                Some(Backend::Postgres(u)) => u.ca_file().map(std::path::Path::to_path_buf),
                _ => None,
            };
            match PgUrl::with_ca(&db, ca.as_deref()) {
                Ok(url) => Backend::Postgres(url),
                Err(e) => {
                    eprintln!("cascade: --db: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        (Some(db), _) => Backend::Sqlite(db.into()),
        (None, Some(store)) => store.backend.clone(),
        (None, None) => {
            eprintln!("cascade: the store is off in {} (store.enabled: false): there is nothing to report", path.display());
            return ExitCode::from(2);
        }
    };
    if let Backend::Sqlite(file) = &db {
        if !file.is_file() {
            eprintln!("cascade: no store at {}", file.display());
            return ExitCode::from(2);
        }
    }
    if !matches!(format, "table" | "json" | "csv") {
        eprintln!("cascade: unknown --format {format:?} (expected table, json or csv)");
        return ExitCode::from(2);
    }
    let query = match cascade::server::report_query(
        &config,
        Some(since),
        Some(until),
        Some(by),
        cascade::clock::now_ms(),
    ) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("cascade: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match cascade::server::read_report(&db, &query) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cascade: cannot read {db}: {e}");
            return ExitCode::FAILURE;
        }
    };
    use cascade::store::report as fmt;
    let out = match format {
        "json" => serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
        "csv" => fmt::to_csv(&report),
        _ => fmt::to_table(&report),
    };
    print!("{out}");
    ExitCode::SUCCESS
}

/// The admin listener (`admin.listen`) on a thread and a small runtime of its own: a
/// scrape or a report never takes a request worker, and it answers through the drain.
fn start_admin(state: Arc<AppState>, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let listener = server::bind(addr)?;
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("cascade-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => server::serve_admin(state, l).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "admin listener stopped");
                }
            })
        })?;
    Ok(())
}

fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.enable_all().build()
}

fn serve(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => Arc::new(c),
        Err(code) => return code,
    };
    let _log = cascade::log::init(config.log, cascade::server::worker_lanes(&config));
    let state = match AppState::with_path(config.clone(), Some(path.to_path_buf())) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cascade: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = server::reload::start_watching(state.clone()) {
        eprintln!("cascade: cannot start the config reloader: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = server::start_scheduled_report(state.clone()) {
        eprintln!("cascade: cannot start the scheduled report: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(mock) = &config.mock {
        if let Err(e) = start_demo_mock(mock.listen) {
            eprintln!(
                "cascade: cannot bind the mock provider on {}: {e}",
                mock.listen
            );
            return ExitCode::FAILURE;
        }
        tracing::info!(addr = %mock.listen, "demo mock provider listening");
    }
    let listener = match server::bind(config.server.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cascade: cannot listen on {}: {e}", config.server.listen);
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        addr = %config.server.listen,
        chains = config.chains.len(),
        models = config.models.len(),
        workers = config.server.worker_threads,
        scheduler = ?config.server.scheduler,
        "cascade listening"
    );
    if let Some(addr) = config.admin.listen {
        if let Err(e) = start_admin(state.clone(), addr) {
            eprintln!("cascade: cannot listen on admin.listen {addr}: {e}");
            return ExitCode::FAILURE;
        }
        tracing::info!(addr = %addr, token = config.admin.token.is_some(), "admin listening");
    }
    let shutdown = match server::drain::on_signal(
        state.drain.clone(),
        config.server.drain_delay,
        config.server.drain_timeout,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cascade: cannot listen for signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = match config.server.scheduler {
        Scheduler::PerCore => server::serve_per_core(state.clone(), listener, shutdown),
        Scheduler::WorkStealing => runtime(Some(config.server.worker_threads)).and_then(|rt| {
            let state = state.clone();
            rt.block_on(async move {
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                server::serve(state, listener, shutdown).await
            })
        }),
    };
    // Every answered request has its rows before the process ends, unless the store
    // stopped answering: then the exit waits one more drain_timeout at most.
    if let Some(store) = &state.store {
        let limit = state
            .config()
            .server
            .drain_timeout
            .max(std::time::Duration::from_secs(5));
        if !store.flush_within(limit) {
            tracing::error!(
                waited_s = limit.as_secs(),
                "store: rows still queued at exit were not written"
            );
        }
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cascade: server error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The demo config's mock provider, on a thread of its own so it never competes with
/// the gateway's workers for their runtimes.
fn start_demo_mock(listen: std::net::SocketAddr) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("cascade-demo-mock".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => cascade::mock::serve(l, Arc::new(MockState::default())).await,
                    Err(e) => eprintln!("cascade: demo mock provider: {e}"),
                }
            })
        })?;
    Ok(())
}

fn mock(listen: &str, knobs: &[String], workers: Option<usize>) -> ExitCode {
    let state = Arc::new(MockState::default());
    for spec in knobs {
        let Some((model, k)) = spec.split_once('=') else {
            eprintln!("cascade: --knobs takes MODEL=SPEC, got {spec:?}");
            return ExitCode::from(2);
        };
        match Knobs::parse(k) {
            Ok(k) => state.set(model, k),
            Err(e) => {
                eprintln!("cascade: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let rt = match runtime(workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cascade: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cascade: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        eprintln!(
            "cascade mock provider listening on {}",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        tokio::select! {
            _ = cascade::mock::serve(listener, state) => {}
            _ = shutdown_signal() => {}
        }
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
