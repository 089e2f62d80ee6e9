//! Starting a coordinator: open the store, resume the engine, serve gRPC on a
//! listener and run tasks, until a shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{CoordinatorConfig, RunConfig};
use crate::engine::Engine;
use crate::service::{Progress, Service, Shared, run_tasks};
use crate::store::Store;

/// A running coordinator.
pub struct Running {
    /// The address the gRPC service listens on.
    pub addr: std::net::SocketAddr,
    /// Progress of the run.
    pub progress: watch::Receiver<Progress>,
    /// Shared state (for status views and tests).
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: tokio::task::JoinHandle<anyhow::Result<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Opens the store and engine, then serves on `listener`.
pub async fn start(
    listener: TcpListener,
    store_path: &std::path::Path,
    run: RunConfig,
    ping: Duration,
) -> anyhow::Result<Running> {
    run.validate().context("run configuration")?;
    let store = Store::open(store_path)?;
    let engine = Engine::open(store, run)?;
    let shared = Shared::new(engine, ping);
    let addr = listener.local_addr().context("listener address")?;
    let (shutdown, rx) = watch::channel(false);
    let mut server_rx = rx.clone();
    let svc = Service::new(Arc::clone(&shared)).into_server();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_nodelay(true)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = server_rx.wait_for(|v| *v).await;
            })
            .await
            .context("gRPC server")
    });
    let tasks_shared = Arc::clone(&shared);
    let tasks = tokio::spawn(async move {
        run_tasks(tasks_shared, rx)
            .await
            .map_err(anyhow::Error::from)
    });
    Ok(Running {
        addr,
        progress: shared.progress(),
        shared,
        shutdown,
        tasks,
        server,
    })
}

/// Starts from a loaded `coordinator.toml`.
pub async fn start_from_config(cfg: &CoordinatorConfig) -> anyhow::Result<Running> {
    let listener = TcpListener::bind(cfg.serve.listen)
        .await
        .with_context(|| format!("binding {}", cfg.serve.listen))?;
    start(
        listener,
        &cfg.serve.store,
        cfg.run.clone(),
        Duration::from_millis(cfg.serve.ping_interval_ms),
    )
    .await
}

impl Running {
    /// Graceful stop: stop handing out tasks, close connections, wait.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.shared.close();
        self.tasks.await.context("task loop panicked")??;
        self.server.await.context("server panicked")??;
        Ok(())
    }

    /// Waits until the run has finished all its rounds, then shuts down.
    pub async fn wait_finished(mut self) -> anyhow::Result<()> {
        self.progress
            .wait_for(|p| p.finished)
            .await
            .context("progress channel closed")?;
        self.shutdown().await
    }
}
