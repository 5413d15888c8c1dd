//! Graceful shutdown: one [`CancellationToken`] per process, cancelled on SIGTERM or SIGINT.
//!
//! Every server and background task takes a clone and stops when it fires. Background
//! tasks are started with [`spawn`], which tracks them, and `main` waits for them at exit
//! ([`finish`]), so in-flight work finishes within the configured grace period.

use std::sync::LazyLock;
use std::time::Duration;

pub use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The process's background tasks.
static TASKS: LazyLock<TaskTracker> = LazyLock::new(TaskTracker::new);

/// Starts a background task the process waits for at exit (see [`finish`]). Such a task
/// must end once the shutdown token fires (or once what it serves, a stream, has ended).
pub fn spawn<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    TASKS.spawn(task)
}

/// At exit, once the shutdown token has fired: waits up to `limit` for every task started
/// with [`spawn`]; how many were still running then.
pub async fn finish(limit: Duration) -> usize {
    TASKS.close();
    let _ = tokio::time::timeout(limit, TASKS.wait()).await;
    TASKS.len()
}

/// Returns a token that is cancelled when the process receives SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        fire.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; falling back to ctrl-c only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
