//! Turns SIGTERM and SIGINT into a [`CancellationToken`]: the start of a drain.

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled at the first SIGTERM or SIGINT.
///
/// A second signal while draining exits the process at once with code 130,
/// for an operator who does not want to wait.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_signal().await;
        tracing::info!("shutdown signal received, draining");
        trigger.cancel();
        wait_signal().await;
        tracing::warn!("second shutdown signal, exiting now");
        std::process::exit(130);
    });
    token
}

async fn wait_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Signal handlers cannot be installed (no signal support); only Ctrl-C remains.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
