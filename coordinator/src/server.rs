//! Starting a coordinator: open the store, resume the engine, serve gRPC on a
//! listener and run tasks, until a shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use fedcart_proto::v1::coordinator_server::CoordinatorServer;

use crate::config::{CoordinatorConfig, RunConfig};
use crate::engine::EngineError;
use crate::identity::Access;
use crate::limits::{Guard, Limits};
use crate::service::admin::AdminService;
use crate::service::hub::{Hub, Starter};
use crate::service::{Progress, Service, Shared, run_tasks};
use crate::store::StoreFile;
use crate::tls::Transport;

/// The largest HTTP/2 DATA frame this server accepts (its SETTINGS_MAX_FRAME_SIZE):
/// 256 KiB instead of HTTP/2's 16 KiB default, so an agent's upload goes out in
/// 16× fewer frames and writes. Each write hands rustls more plaintext at once
/// (it still seals 16 KiB TLS records, several per system call): at (100
/// agents, 100k floats) over mutual TLS this cut the coordinator's CPU per plain
/// round by about 11 % and the agents' by 15 % (BENCHMARKS.md, "Larger HTTP/2
/// frames"). A frame is buffered whole before it is handed on, so this also
/// bounds the read buffer a connection can make the server hold.
pub const MAX_FRAME_BYTES: u32 = 256 << 10;
const _: () = assert!(
    MAX_FRAME_BYTES >= 16 << 10 && MAX_FRAME_BYTES < 1 << 24,
    "HTTP/2 range"
);

/// The task loop stopped with an error: the coordinator runs no more rounds.
/// It has been logged once with its cause when it happened; `serve` exits
/// non-zero with it.
#[derive(Debug, thiserror::Error)]
#[error("the task loop failed: {cause}")]
pub struct TaskLoopFailed {
    /// The error and its causes, as one line.
    pub cause: String,
}

/// The coordinator's `--config` run stopped before its last round (a round
/// that kept aborting, a secure sum that could not be committed); logged
/// when it happened. `serve` exits non-zero with it once every run has
/// ended, unless `--keep-serving`.
#[derive(Debug, thiserror::Error)]
#[error("run `{run}` stopped: {stop}")]
pub struct RunStopped {
    /// The run.
    pub run: String,
    /// Why it stopped.
    pub stop: String,
}

/// A running coordinator.
pub struct Running {
    /// The address the gRPC service listens on.
    pub addr: std::net::SocketAddr,
    /// The address of the HTTP observability listener, if any.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Progress of the run this coordinator was started with.
    pub progress: watch::Receiver<Progress>,
    /// Shared state of that run (for status views and tests).
    pub shared: Arc<Shared>,
    /// Every run the coordinator hosts (the one above among them).
    pub hub: Arc<Hub>,
    shutdown: watch::Sender<bool>,
    /// The task loop of every run started in this process.
    loops: Loops,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The metrics observer (it holds the run and the hub).
    observer: tokio::task::JoinHandle<()>,
    /// The access-list watch (mutual TLS only; it holds the hub).
    access_watch: Option<tokio::task::JoinHandle<()>>,
    /// `recv` gives `None` once every [`crate::service::Held`] is dropped:
    /// no gRPC request task holds a service any more.
    held: tokio::sync::mpsc::Receiver<()>,
}

/// The task loops started so far; `None` once a shutdown took them (no loop
/// starts after that: a run submitted or due meanwhile stays stored and is
/// resumed by the next start).
type Loops = Arc<std::sync::Mutex<Option<Vec<tokio::task::JoinHandle<anyhow::Result<()>>>>>>;

/// Starts the task loop of one run. A loop that fails (the store broke) is
/// logged once with its cause, turns readiness false and is returned by
/// [`Running::shutdown`]; a run that stopped on a fault (a round that kept
/// aborting) is only logged, leaving the other runs to go on, and when it is
/// the coordinator's `--config` run [`Running::shutdown`] returns its
/// [`RunStopped`] (so `serve` exits non-zero once every run has ended).
fn start_loop(
    shared: Arc<Shared>,
    hub: Arc<Hub>,
    primary: bool,
    health: tonic_health::server::HealthReporter,
    shutdown: watch::Receiver<bool>,
    loops: &Loops,
) {
    let mut loops = loops.lock().unwrap_or_else(|p| p.into_inner());
    let Some(loops) = loops.as_mut() else {
        tracing::debug!(run = %shared.run_config().run_id, "shutting down: the run's loop is not started");
        return;
    };
    hub.loop_started();
    let handle = tokio::spawn(async move {
        let result = run_tasks(Arc::clone(&shared), shutdown).await;
        let e = match result {
            Ok(()) => {
                hub.after_end(&shared.run_config().run_id);
                hub.loop_ended();
                return Ok(());
            }
            Err(EngineError::Stopped(stop)) => {
                // `run_tasks` logged the stop once, with its level. A run
                // that stopped is not a broken coordinator: readiness stays
                // true and the other runs go on (a stopped `--config` run
                // ended the whole process, `--keep-serving` or not, and a
                // restart ended it again). `serve` without `--keep-serving`
                // still exits non-zero once every run has ended:
                // `Running::shutdown` returns the `--config` run's stop.
                tracing::debug!(run = %shared.run_config().run_id, "run stopped: {stop}");
                hub.loop_ended();
                return match primary {
                    true => Err(RunStopped {
                        run: shared.run_config().run_id.clone(),
                        stop: stop.to_string(),
                    }
                    .into()),
                    false => Ok(()),
                };
            }
            Err(e) => e,
        };
        // Fatal: logged here, once, with its cause; readiness turns false and
        // `Running` reports it, so `serve` stops and exits non-zero.
        let cause = format!("{:#}", anyhow::Error::from(e));
        tracing::error!(error = %cause, "the task loop failed; no more rounds will run");
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        health.set_not_serving::<CoordinatorServer<Service>>().await;
        shared.fail(cause.clone());
        hub.loop_ended();
        Err(TaskLoopFailed { cause }.into())
    });
    loops.push(handle);
}

/// Opens the store and engine, then serves plaintext gRPC on `listener`
/// (no TLS, no identities: for tests and `--insecure` only; see [`start_with`]).
pub async fn start(
    listener: TcpListener,
    store_path: &std::path::Path,
    run: RunConfig,
    ping: Duration,
) -> anyhow::Result<Running> {
    start_with(listener, store_path, run, ping, ServeOptions::insecure()).await
}

/// How to serve: transport security, the HTTP observability listener, limits.
pub struct ServeOptions {
    /// Mutual TLS (default in production) or plaintext.
    pub transport: Transport,
    /// Where to serve `/metrics`, `/healthz`, `/api/status` and the dashboard.
    pub http: Option<TcpListener>,
    /// The operator's token every HTTP route but the probes requires
    /// (`None`: open, for `--insecure` development and tests).
    pub http_token: Option<crate::http_auth::OperatorToken>,
    /// Per-agent and per-RPC limits.
    pub limits: Limits,
}

impl ServeOptions {
    /// Plaintext gRPC, no HTTP listener, default limits.
    pub fn insecure() -> Self {
        Self {
            transport: Transport::Insecure,
            http: None,
            http_token: None,
            limits: Limits::default(),
        }
    }
}

/// Opens the store and engine, then serves on `listener` with `opts`.
pub async fn start_with(
    listener: TcpListener,
    store_path: &std::path::Path,
    run: RunConfig,
    ping: Duration,
    opts: ServeOptions,
) -> anyhow::Result<Running> {
    run.validate().context("run configuration")?;
    let run_id = run.run_id.clone();
    // TLS files first: a start that cannot serve must not store its run
    // (the next start, with the files fixed, would then resume this run's
    // settings instead of reading the configuration anew).
    let (builder, access): (_, Option<Arc<Access>>) = match &opts.transport {
        Transport::Tls(files) => (
            tonic::transport::Server::builder()
                .tls_config(files.server_config()?)
                .context("TLS configuration")?,
            {
                // Allowed (it may be written later), but until then every
                // merchant is refused: say so at start, naming the setting.
                if !files.access.exists() {
                    tracing::warn!(
                        "`serve.tls.access` {} does not exist: no merchant is admitted until it \
                         does (`certs issue` creates it beside the CA and adds each merchant it \
                         issues)",
                        files.access.display()
                    );
                }
                Some(Access::new(&files.access)?)
            },
        ),
        Transport::Insecure => {
            tracing::warn!("serving plaintext gRPC without client identities (--insecure)");
            (tonic::transport::Server::builder(), None)
        }
    };
    // Said at start: a mistyped store path opened a fresh store without a
    // word, and the earlier runs looked lost.
    let existed = store_path.exists();
    let file = StoreFile::open(store_path)?;
    let hub = Hub::open(file, ping, opts.limits.upload_idle_timeout)?;
    if existed {
        tracing::info!(store = %store_path.display(), runs = hub.all().len(), "opened the store");
    } else {
        tracing::info!(store = %store_path.display(), "created a new store");
    }
    // The configured run: resumed if the store holds it, else submitted
    // beside the runs already there.
    let (shared, submitted) = hub.submit(run, true, None)?;
    if !submitted && shared.ended() {
        tracing::warn!(run = %run_id, store = %store_path.display(),
            "the configuration's run already ended in this store: none of it is left to train \
             (give `run_id` a new value to train it again, or use another store; `--keep-serving` \
             keeps the coordinator up for runs submitted with `runs submit`)");
    }
    hub.set_primary(&run_id);
    let addr = listener.local_addr().context("listener address")?;
    let (shutdown, rx) = watch::channel(false);
    let mut server_rx = rx.clone();
    let (held, held_rx) = tokio::sync::mpsc::channel(1);
    let svc = Service::new(Arc::clone(&hub), held.clone()).into_server();
    let access_watch = access
        .as_ref()
        .map(|a| spawn_access_watch(Arc::clone(a), Arc::clone(&hub), rx.clone()));
    let guard = Guard::new(access, opts.limits.clone());
    let svc = tonic::service::interceptor::InterceptedService::new(svc, guard.clone());
    let (health, health_svc) = tonic_health::server::health_reporter();
    let tasks_health = health.clone();
    // The store and engine are open: ready.
    health.set_serving::<CoordinatorServer<Service>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let observer = crate::observe::spawn(
        Arc::clone(&shared),
        Arc::clone(&hub),
        run_id.clone(),
        opts.http,
        opts.http_token,
        rx.clone(),
    )?;
    // Every run's task loop: the stored runs not yet ended, the configured
    // one, and (through the admin service) each run submitted later.
    let loops: Loops = Arc::new(std::sync::Mutex::new(Some(Vec::new())));
    let starter: Starter = {
        // Weak: the hub keeps the starter for scheduled runs.
        let (hub, health, rx, loops) = (
            Arc::downgrade(&hub),
            tasks_health.clone(),
            rx.clone(),
            Arc::clone(&loops),
        );
        Arc::new(move |s: Arc<Shared>| {
            let Some(hub) = hub.upgrade() else {
                return;
            };
            let primary = s.run_config().run_id == run_id;
            start_loop(s, hub, primary, health.clone(), rx.clone(), &loops);
        })
    };
    hub.set_starter(Arc::clone(&starter), rx.clone());
    for s in hub.all() {
        starter(s);
    }
    let admin = AdminService::new(Arc::clone(&hub), starter, held).into_server();
    let admin = tonic::service::interceptor::InterceptedService::new(admin, guard);
    let incoming = accepting(listener);
    let limits = opts.limits.clone();
    let server = tokio::spawn(async move {
        builder
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_nodelay(true)
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .timeout(limits.rpc_timeout)
            .concurrency_limit_per_connection(limits.concurrent_rpcs_per_connection)
            .max_concurrent_streams(limits.concurrent_rpcs_per_connection as u32)
            .http2_max_header_list_size(limits.max_header_bytes)
            .add_service(health_svc)
            .add_service(svc)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = server_rx.wait_for(|v| *v).await;
            })
            .await
            .context("gRPC server")?;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        Ok(())
    });
    Ok(Running {
        addr,
        http_addr: observer.http_addr,
        progress: shared.progress(),
        shared,
        hub,
        shutdown,
        loops,
        server,
        observer: observer.task,
        access_watch,
        held: held_rx,
    })
}

/// Re-reads the access list every [`crate::identity::ACCESS_RECHECK`] and
/// closes the sessions of merchants it no longer admits, so a revocation
/// also ends an open Join stream, not only the merchant's next RPC.
fn spawn_access_watch(
    access: Arc<Access>,
    hub: Arc<Hub>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::identity::ACCESS_RECHECK);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|v| *v) => break,
            }
            // An unreadable file keeps the last good list (logged by `current`).
            if let Ok(list) = access.current() {
                hub.close_refused(|id, serial| {
                    serial
                        .and_then(|s| list.serial_refusal(s))
                        .or_else(|| list.refusal(id))
                });
            }
        }
    })
}

/// Starts from a loaded `coordinator.toml`. Mutual TLS (`serve.tls`) is
/// required unless `insecure`.
pub async fn start_from_config(cfg: &CoordinatorConfig, insecure: bool) -> anyhow::Result<Running> {
    if let Some(w) = cfg.run.small_secure_round_warning() {
        tracing::warn!("{w}");
    }
    let transport = match (&cfg.serve.tls, insecure) {
        (Some(_), true) => {
            tracing::warn!(
                "--insecure (or FEDCART_INSECURE): the `[serve.tls]` section is ignored: no TLS, \
                 no merchant identities, and the HTTP routes are open unless \
                 `serve.http_token_file` is given"
            );
            Transport::Insecure
        }
        (None, true) => Transport::Insecure,
        (Some(files), false) => Transport::Tls(files.clone()),
        (None, false) => anyhow::bail!(
            "`serve.tls` is not configured: give the TLS files or run with --insecure"
        ),
    };
    // The TLS files first: the operator's token defaults to a file beside
    // the CA, and a wrong `serve.tls.ca` was reported as a missing token.
    if let Transport::Tls(files) = &transport {
        files.server_config()?;
    }
    let listener = TcpListener::bind(cfg.serve.listen)
        .await
        .with_context(|| format!("binding {}", cfg.serve.listen))?;
    let http = match cfg.serve.http_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {a}"))?,
        ),
        None => None,
    };
    // With TLS the HTTP routes are the operator's; in plaintext development
    // mode only an explicitly configured token closes them.
    let token_file = if insecure {
        cfg.serve.http_token_file.clone()
    } else {
        cfg.serve.effective_http_token_file()
    };
    let http_token = match (&http, token_file) {
        (Some(_), Some(path)) => Some(
            crate::http_auth::OperatorToken::from_file(&path).with_context(|| {
                format!(
                    "serve.http_token_file (or FEDCART_HTTP_TOKEN_FILE): the HTTP listener \
                     requires the operator's token; `certs init` writes {} beside ca.pem",
                    crate::certs::OPERATOR_TOKEN
                )
            })?,
        ),
        _ => None,
    };
    start_with(
        listener,
        &cfg.serve.store,
        cfg.run.clone(),
        Duration::from_millis(cfg.serve.ping_interval_ms),
        ServeOptions {
            transport,
            http,
            http_token,
            limits: Limits::default(),
        },
    )
    .await
}

impl Running {
    /// Graceful stop: stop handing out tasks, close connections, wait. When
    /// it returns, nothing the coordinator started holds the store: the file
    /// is closed unless the caller keeps a `shared` or `hub` of its own.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let Self {
            shutdown,
            hub,
            shared,
            loops,
            server,
            observer,
            access_watch,
            mut held,
            ..
        } = self;
        let _ = shutdown.send(true);
        hub.close();
        // `None` from now on: no loop starts after this.
        let loops = loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        let mut first_error = None;
        for l in loops {
            if let Err(e) = l.await.context("task loop panicked")? {
                first_error.get_or_insert(e);
            }
        }
        // After the loops: a loop that ended may have scheduled a wait.
        hub.join_waiters().await;
        let served = server.await.context("server panicked")?;
        // tonic joins its connections, not hyper's per-request tasks (each
        // holding a clone of a service): wait until every `Held` is gone.
        // Each request is bounded by the RPC timeout.
        let _ = held.recv().await;
        // Keep-alive tasks of Join streams accepted meanwhile.
        hub.join_waiters().await;
        observer.await.context("metrics observer panicked")?;
        if let Some(w) = access_watch {
            w.await.context("access-list watch panicked")?;
        }
        drop((shared, hub));
        served?;
        first_error.map_or(Ok(()), Err)
    }

    /// Waits until every run the coordinator hosts has ended (or a task
    /// loop failed), then shuts down: what `serve` does unless told to keep
    /// serving.
    pub async fn wait_all_finished(self) -> anyhow::Result<()> {
        self.hub.wait_all_ended().await;
        self.shutdown().await
    }

    /// Waits until the run has finished all its rounds (or the task loop
    /// failed: then the error is returned), then shuts down.
    pub async fn wait_finished(mut self) -> anyhow::Result<()> {
        self.progress
            .wait_for(|p| p.finished || p.failed.is_some())
            .await
            .context("progress channel closed")?;
        self.shutdown().await
    }
}

/// The gRPC server's connections. The builder's `tcp_nodelay` applies only
/// to a listener tonic binds itself: an incoming stream sets its own.
/// Without it, every small message after another (a pushed task, a
/// secure-aggregation stage, a reply's trailers) waited for the agent's
/// delayed ACK, about 40 ms (BENCHMARKS.md, session 28).
fn accepting(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use fedcart_common::task::ModelSpec;
    use fedcart_proto::v1 as pb;
    use fedcart_proto::v1::coordinator_client::CoordinatorClient;

    use super::*;
    use crate::config::Selection;

    async fn readyz(addr: std::net::SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    }

    /// Every connection the gRPC server accepts has Nagle's algorithm off.
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        use futures::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = accepting(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.expect("a connection").unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// A start whose TLS files cannot be read fails naming the setting and
    /// stores nothing: the next start, files fixed, runs the configuration
    /// as now written (not the first attempt's, as a stored run would be).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_that_cannot_serve_tls_stores_no_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let missing = dir.path().join("missing.pem");
        let tls = crate::tls::TlsFiles {
            ca: missing.clone(),
            cert: missing.clone(),
            key: missing.clone(),
            access: dir.path().join("access.txt"),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let opts = ServeOptions {
            transport: Transport::Tls(tls),
            ..ServeOptions::insecure()
        };
        let run = one_round_run("first");
        let err = start_with(listener, &path, run, Duration::from_millis(500), opts)
            .await
            .err()
            .expect("no TLS files, no start");
        assert!(
            format!("{err:#}").contains("`serve.tls.ca`: reading"),
            "{err:#}"
        );
        let runs = crate::store::StoreFile::open(&path)
            .unwrap()
            .runs()
            .unwrap();
        assert!(runs.is_empty(), "{runs:?}");

        let mut run = one_round_run("first");
        run.rounds = 2;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = start_with(
            listener,
            &path,
            run,
            Duration::from_millis(500),
            ServeOptions::insecure(),
        )
        .await
        .unwrap();
        assert_eq!(running.shared.run_config().rounds, 2);
        running.shutdown().await.unwrap();
    }

    /// When `shutdown` returns, nothing the coordinator started holds the
    /// store: the file opens again at once, even with an HTTP client stalled
    /// halfway through a request's headers and an agent's Join stream open
    /// (before, the HTTP connection's router state held the hub, and with it
    /// the store, for as long as the client stayed: reopening failed with
    /// redb's `DatabaseAlreadyOpen`). A current-thread runtime serves
    /// connections in the order accepted: the two requests answered after
    /// the stalled one was written mean that it has been read.
    #[tokio::test]
    async fn shutdown_returns_with_the_store_closed() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let opts = ServeOptions {
            http: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            limits: Limits::loopback(),
            ..ServeOptions::insecure()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut run = one_round_run("closes");
        run.selection.min_agents = 2;
        run.selection.max_agents = 2;
        let running = start_with(listener, &path, run, Duration::from_millis(500), opts)
            .await
            .unwrap();
        let http = running.http_addr.unwrap();
        let mut stalled = tokio::net::TcpStream::connect(http).await.unwrap();
        stalled
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        for _ in 0..2 {
            assert!(readyz(http).await.contains("200"));
        }
        // An agent joined (its stream and keep-alive open; the run waits
        // for a second one).
        let work = join_as(running.addr, "m0").await;
        let (hub, shared) = (
            Arc::downgrade(&running.hub),
            Arc::downgrade(&running.shared),
        );
        running.shutdown().await.unwrap();
        assert_eq!((hub.strong_count(), shared.strong_count()), (0, 0));
        crate::store::StoreFile::open(&path).expect("the store is closed when shutdown returns");
        drop((stalled, work));
    }

    /// Joins the plaintext coordinator at `addr` as merchant `id`; its work
    /// stream.
    async fn join_as(addr: std::net::SocketAddr, id: &str) -> tonic::Streaming<pb::Work> {
        let mut client = CoordinatorClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let join = pb::JoinRequest {
            merchant_id: id.into(),
            examples: Default::default(),
            agent_version: "test".into(),
        };
        client.join(join).await.unwrap().into_inner()
    }

    /// A plaintext coordinator of `run` on `path` with its HTTP listener.
    async fn start_observed(path: &std::path::Path, run: RunConfig) -> Running {
        let opts = ServeOptions {
            http: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            limits: Limits::loopback(),
            ..ServeOptions::insecure()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        start_with(listener, path, run, Duration::from_millis(500), opts)
            .await
            .unwrap()
    }

    /// Joins as `id`, waits for a task and hangs up: the task closes
    /// without its result.
    async fn take_the_task_and_hang_up(addr: std::net::SocketAddr, id: &str) {
        let mut work = join_as(addr, id).await;
        loop {
            let msg = work.message().await.unwrap().expect("stream open");
            if let Some(pb::work::Kind::Task(_)) = msg.kind {
                break;
            }
        }
    }

    fn one_round_run(run_id: &str) -> RunConfig {
        RunConfig {
            max_attempts: crate::config::DEFAULT_MAX_ATTEMPTS,
            early_stopping: None,
            run_id: run_id.into(),
            seed: 1,
            rounds: 1,
            model: ModelSpec::Noop { dim: 3 },
            sgd: Default::default(),
            selection: Selection {
                fraction: 1.0,
                min_agents: 1,
                max_agents: 1,
                min_available: 0,
            },
            quorum: 1,
            round_timeout_ms: 60_000,
            evaluate: false,
            strategy: Default::default(),
            secagg: None,
            dp: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_task_loop_is_reported_and_turns_readiness_false() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let run = one_round_run("fatal");
        let running = start_observed(&path, run).await;
        let http = running.http_addr.unwrap();
        assert!(readyz(http).await.contains("200"));

        // The store breaks; an agent takes the task and hangs up, so the
        // task closes and its record cannot be written.
        running.shared.fail_store_writes();
        take_the_task_and_hang_up(running.addr, "m0").await;

        let mut progress = running.progress.clone();
        let failed = tokio::time::timeout(
            Duration::from_secs(60),
            progress.wait_for(|p| p.failed.is_some()),
        )
        .await
        .expect("the failure is reported")
        .unwrap()
        .failed
        .clone()
        .unwrap();
        assert!(failed.contains("injected write failure"), "{failed}");
        assert!(failed.contains(&path.display().to_string()), "{failed}");
        assert!(readyz(http).await.contains("503"));
        let err = running.wait_finished().await.unwrap_err();
        assert!(err.downcast_ref::<TaskLoopFailed>().is_some(), "{err:#}");
    }

    /// The `--config` run stopping on a fault (a round that kept aborting) is
    /// a run's end, not a broken coordinator: readiness stays true, so
    /// `--keep-serving` goes on serving the other runs (the stop ended the
    /// process, and a restart on the store ended it again), and `shutdown`
    /// returns the stop, so `serve` without `--keep-serving` exits non-zero.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_config_run_that_stops_leaves_the_coordinator_ready_and_is_returned_by_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let mut run = one_round_run("gives-up");
        run.max_attempts = 1;
        let running = start_observed(&path, run).await;
        let http = running.http_addr.unwrap();
        // An agent takes the task and hangs up: the only attempt aborts.
        take_the_task_and_hang_up(running.addr, "m0").await;
        let mut progress = running.progress.clone();
        let p = tokio::time::timeout(Duration::from_secs(60), progress.wait_for(|p| p.finished))
            .await
            .expect("the run ends")
            .unwrap()
            .clone();
        assert!(p.stopped.is_some(), "{p:?}");
        assert_eq!(p.failed, None);
        assert!(running.hub.failed().is_none());
        assert!(readyz(http).await.contains("200"));
        let err = running.wait_finished().await.unwrap_err();
        let stop = err.downcast_ref::<RunStopped>().expect("the run's stop");
        assert!(stop.stop.contains("run.max_attempts"), "{err:#}");
    }
}
