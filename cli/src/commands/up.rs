//! `symbiont up`: the daemon. Loads the configuration, starts the [`Runtime`] (which
//! restores persisted agents and queued tasks), serves the API, and on SIGTERM or SIGINT
//! stops accepting, lets in-flight requests finish (at most `termination_timeout`), stops
//! every agent within `termination_timeout`, flushes the audit trail and exits 0. A second
//! signal exits at once (130).

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::Args;
use symbiont_runtime::runtime::Runtime;
use tokio::signal::unix::{signal, SignalKind};

use super::Context;
use crate::server::{self, AppState};
use crate::tokens::TokenSet;

/// `symbiont up`
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address to listen on, instead of `[api] listen` (port 0 picks a free port; the
    /// address in use is printed as `symbiont: listening on http://ADDR`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// The data directory, instead of `[storage] data_dir`.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<std::path::PathBuf>,
}

/// Runs the daemon until a signal.
pub fn run(args: UpArgs, ctx: &Context) -> Result<ExitCode> {
    let mut config = ctx.load_config()?;
    if let Some(listen) = args.listen {
        config.api.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.storage.data_dir = dir;
    }
    config.validate().context("checking the configuration")?;
    symbiont_runtime::init_logging(&config.log.level, config.log.format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("symbiont")
        .build()
        .context("starting the async runtime")?;
    let outcome = rt.block_on(daemon(config));
    // Blocking-pool threads still parked (idle keep-alive) must not delay the exit.
    let t0 = std::time::Instant::now();
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    tracing::debug!(elapsed = ?t0.elapsed(), "async runtime stopped");
    outcome
}

async fn wait_for_signal() -> Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

async fn daemon(config: symbiont_runtime::config::RuntimeConfig) -> Result<ExitCode> {
    let addr: SocketAddr = config
        .api
        .listen
        .parse()
        .with_context(|| format!("[api] listen `{}`", config.api.listen))?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the API listens beyond loopback: anyone who reaches it with a token controls the \
             runtime, and traffic is plain HTTP (put a TLS proxy in front)"
        );
    }
    // One daemon per data directory (the lock dies with the process, even on kill -9).
    let _lock = crate::lockfile::lock_data_dir(&config.storage.data_dir)?;
    // Bind first: a taken port fails before any agent is restored.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    // Signals received while the runtime starts are honoured once it has.
    let signals = tokio::spawn(wait_for_signal());

    let runtime = Runtime::start(config.clone())
        .await
        .context("starting the runtime")?;
    let state = AppState {
        runtime: runtime.clone(),
        tokens: Arc::new(TokenSet::new(&config.storage.data_dir)),
        metrics: Arc::default(),
    };
    let app = server::app(state, config.api.max_body_bytes);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(server::serve(listener, app, async move {
        let _ = stop_rx.await;
    }));
    tracing::info!(%local, data_dir = %config.storage.data_dir.display(), "symbiont daemon ready");
    // Start-up code (tier probes, migrations, restore) ran once: give its pages back.
    match crate::memory::release_startup_code() {
        Ok(r) => tracing::debug!(
            mappings = r.mappings,
            bytes = r.bytes,
            "start-up code paged out"
        ),
        Err(e) => tracing::debug!(error = %e, "could not page out the start-up code"),
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "symbiont: listening on http://{local}");
        let _ = out.flush();
    }

    let which = tokio::select! {
        s = signals => s.context("waiting for signals")??,
        result = &mut server => {
            // The server stopped on its own: that is an error.
            result.context("the API server task")?.context("serving the API")?;
            anyhow::bail!("the API server stopped unexpectedly");
        }
    };
    tracing::info!(signal = which, "shutting down: no new connections");
    tokio::spawn(async {
        if wait_for_signal().await.is_ok() {
            eprintln!("symbiont: second signal, exiting now");
            std::process::exit(130);
        }
    });
    let _ = stop_tx.send(());
    let drain = config.lifecycle.termination_timeout;
    match tokio::time::timeout(drain, &mut server).await {
        Ok(result) => {
            if let Err(e) = result.context("the API server task")? {
                tracing::warn!(error = %e, "API server ended with an error");
            }
        }
        Err(_) => {
            tracing::warn!(
                "requests still in flight after {}; closing them",
                humantime::format_duration(drain)
            );
            server.abort();
        }
    }
    runtime.shutdown().await.context("stopping the runtime")?;
    tracing::info!("symbiont daemon stopped");
    Ok(ExitCode::SUCCESS)
}
