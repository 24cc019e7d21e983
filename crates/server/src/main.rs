//! `tessera serve`: flags -> config, tracing, bind, load the model in the background,
//! serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use server::config::{
    resolve_model, Cli, Command, LogFormat, ServeArgs, ServeConfig, StartupAdapter,
};
use server::metrics::Metrics;
use server::{AppState, Backend, EngineBackend};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve_main(args),
        Command::Generate(args) => offline(args.engine.log_level(), || server::commands::generate(args)),
        Command::Bench(args) => offline(args.engine.log_level(), || server::commands::bench(args)),
    }
}

/// Runs an offline command (no HTTP): logs to stderr at warn unless RUST_LOG says otherwise.
fn offline(default_level: &str, f: impl FnOnce() -> Result<(), server::config::ConfigError>) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn serve_main(args: ServeArgs) -> ExitCode {
    init_tracing(args.log_format);
    let cfg = match resolve_model(&args.model).and_then(|model| args.into_config(model)) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cfg: ServeConfig) -> Result<(), String> {
    let metrics = Metrics::new().map_err(|e| format!("metrics: {e}"))?;
    let state = AppState::new(cfg.server.clone(), metrics.clone());
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (--host/--port): {e}", cfg.listen))?;
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| cfg.listen.clone());
    let mut engine_cfg = cfg.engine.clone();
    engine_cfg.observer = Some(metrics.observer());
    tracing::info!(%addr, model = %engine_cfg.model.display(), "listening; loading the model (/ready is 503 until it is loaded)");
    let load = load_model(state.clone(), engine_cfg, cfg.adapters.clone());
    server::serve::run(
        listener,
        state,
        load,
        server::serve::shutdown_signal(),
        cfg.shutdown_timeout,
    )
    .await
}

/// Loads on a plain thread (a blocking load must not hold a runtime thread, and an
/// unfinished load must not keep the process alive at shutdown): the model, then the
/// `--lora` adapters; any failure stops start-up.
async fn load_model(
    state: AppState,
    cfg: engine::EngineConfig,
    adapters: Vec<StartupAdapter>,
) -> Result<(), String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = std::time::Instant::now();
    let loader_state = state.clone();
    std::thread::Builder::new()
        .name("tessera-load".into())
        .spawn(move || {
            let _ = tx.send(load_blocking(&loader_state, cfg, &adapters));
        })
        .map_err(|e| format!("cannot start the loader thread: {e}"))?;
    let (backend, registry) = match rx.await {
        Ok(r) => r?,
        Err(_) => return Err("the model loader stopped without a result".into()),
    };
    let info = backend.info().clone();
    state.set_backend_with_adapters(backend, registry);
    tracing::info!(
        model = %info.name,
        max_model_len = info.max_model_len,
        kv_cache_tokens = info.kv_cache_tokens,
        load_s = started.elapsed().as_secs_f64(),
        "model loaded; ready"
    );
    Ok(())
}

type LoadedParts = (
    std::sync::Arc<EngineBackend>,
    std::sync::Arc<engine::adapters::AdapterRegistry>,
);

fn load_blocking(
    state: &AppState,
    cfg: engine::EngineConfig,
    adapters: &[StartupAdapter],
) -> Result<LoadedParts, String> {
    let handle = engine::Engine::start(cfg)
        .map_err(|e| format!("could not load the model (--model): {e}"))?;
    let backend = EngineBackend::new(handle);
    let registry = state.new_registry(backend.as_ref());
    for a in adapters {
        let spec = engine::adapters::LoadSpec {
            name: &a.name,
            path: &a.path.to_string_lossy(),
            origin: engine::adapters::Origin::Startup,
            replace: false,
        };
        match registry.load(spec) {
            Ok(out) => tracing::info!(
                adapter = %a.name,
                path = %out.info.path.display(),
                rank = out.info.rank,
                bytes = out.info.bytes,
                load_ms = out.elapsed.as_secs_f64() * 1e3,
                "adapter loaded (--lora)"
            ),
            Err(e) => {
                backend.shutdown();
                return Err(format!(
                    "could not load the adapter --lora {}={}: {e}",
                    a.name,
                    a.path.display()
                ));
            }
        }
    }
    Ok((backend, registry))
}
