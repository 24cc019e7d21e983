//! Serving with graceful shutdown.
//!
//! ```text
//! bind ──► serve /health at once (/ready 503) ──► model loaded ──► /ready 200
//! SIGTERM/SIGINT ──► draining: /ready and new requests 503, listener still open
//!                ──► in-flight requests finish, for at most --shutdown-timeout
//!                ──► abort_all(): the rest end with finish_reason "abort"
//!                ──► close the listener, let responses flush, stop the engine, exit 0
//! ```

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::routes::router;
use crate::state::AppState;

/// How long responses may take to flush after the rest were aborted.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// Serves `state` on `listener`. `load` makes the model available (it calls
/// [`AppState::set_backend`]) or fails; `shutdown` resolves on the stop signal.
pub async fn run<L, S>(
    listener: TcpListener,
    state: AppState,
    load: L,
    shutdown: S,
    shutdown_timeout: Duration,
) -> Result<(), String>
where
    L: Future<Output = Result<(), String>>,
    S: Future<Output = ()>,
{
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(state.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    tokio::pin!(shutdown);
    let signalled = tokio::select! {
        r = load => match r {
            Ok(()) => false,
            Err(e) => {
                let _ = stop_tx.send(());
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, server).await;
                return Err(e);
            }
        },
        () = &mut shutdown => {
            tracing::info!("shutdown requested while the model was loading");
            true
        }
    };
    if !signalled {
        shutdown.await;
    }
    drain(&state, shutdown_timeout).await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(FLUSH_TIMEOUT, server).await {
        Ok(Ok(Err(e))) => tracing::warn!("server error at shutdown: {e}"),
        Err(_) => {
            tracing::warn!("connections still open {FLUSH_TIMEOUT:?} after shutdown; closing")
        }
        _ => {}
    }
    if let Some(l) = state.loaded() {
        l.backend.shutdown();
    }
    tracing::info!("shut down");
    Ok(())
}

/// Stop accepting, wait for in-flight requests up to `timeout`, then abort the rest and
/// wait (briefly) for their responses to end.
pub async fn drain(state: &AppState, timeout: Duration) {
    state.begin_drain();
    tracing::info!(
        inflight = state.inflight(),
        timeout_s = timeout.as_secs_f64(),
        "draining: no new requests"
    );
    if wait_idle(state, timeout).await {
        return;
    }
    tracing::warn!(
        inflight = state.inflight(),
        "shutdown timeout reached; aborting the requests still running"
    );
    if let Some(l) = state.loaded() {
        l.backend.abort_all();
    }
    if !wait_idle(state, FLUSH_TIMEOUT).await {
        tracing::warn!(
            inflight = state.inflight(),
            "requests did not end after abort"
        );
    }
}

async fn wait_idle(state: &AppState, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while state.inflight() > 0 {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
    true
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
