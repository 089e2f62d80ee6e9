//! `fedcart-client serve --http ADDR`: the merchant's local JSON API for its
//! shop, answered from the agent's local state — the global models the agent
//! received and its private user factors. Nothing here talks to the
//! coordinator, and the API is meant for the merchant's own network.
//!
//! Routes (all `GET`, JSON bodies):
//! - `/healthz`: `{"status":"ok"}` once the server runs;
//! - `/v1/version`: the model version in use per family (`null` before the
//!   agent received one);
//! - `/v1/customers/{id}/recommendations?k=10&include_repeats=false`: top-k
//!   catalogue items, excluding what the customer already bought unless
//!   `include_repeats=true`, with their names when `data.item_names` has them;
//!   `repeat_weight=W` blends in the customer's own frequent items. The
//!   ranking is [`Recommender::rank`], the one `fedcart-client recommend`
//!   prints (an implicit model blended with the merchant's popularity);
//!   a customer the recommender has no factors for yet (they bought after
//!   it was trained) gets the merchant's best sellers, `"basis":
//!   "popularity"` with a `note` saying why (`"model"` otherwise);
//! - `/v1/best-sellers?k=10`: the merchant's best sellers, most customers
//!   first, for a visitor with no purchases (no model needed);
//! - `/v1/customers/{id}/churn`: the churn probability;
//! - `/v1/customers/{id}/segment`: the federation's customer segment (once a
//!   k-means run delivered one).
//!
//! Errors are `{"error": "..."}` with 400 (bad `k`, unknown parameter), 404
//! (unknown customer) or 503 (no model of that family yet). A connection
//! that does not finish a request's headers within [`HEADER_READ_TIMEOUT`]
//! (or idles that long between requests) is closed.
//!
//! **Hot swap.** Everything a request reads is one immutable [`Snapshot`]
//! behind an `Arc`, published through a `tokio::sync::watch` channel: a
//! request clones the `Arc` once and answers from it, so a swap never drops
//! or tears a request. A reloader polls the state directory every
//! `--poll-ms` (default 500 ms) — the model meta files' contents and the user
//! factors' size and modification time; when they changed it builds a new
//! snapshot off the request path and publishes it. A model
//! whose parameter file does not match its meta (the agent is between the
//! two writes, see [`crate::state`]) is skipped until the next poll, so the
//! old snapshot keeps serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::data::{self, CustomerTable, DataError, Items};
use crate::recommend::{self, ModelVersion, RecommendError, Recommender};
use crate::segments;
use crate::state::{StateDir, StateError};

/// Arguments of `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The agent's TOML configuration (the same file as `run`).
    #[arg(long, env = "FEDCART_CLIENT_CONFIG")]
    pub config: PathBuf,
    /// Address of the HTTP listener, e.g. `127.0.0.1:8080`.
    #[arg(long, env = "FEDCART_SERVE_HTTP", value_parser = fedcart_common::cli::parse_listen_addr)]
    pub http: SocketAddr,
    /// How often to look for a new model version in the state directory, in
    /// milliseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
    /// The run whose models to serve ([`crate::state::RUN_FLAG_HELP`]).
    #[arg(long, help = crate::state::RUN_FLAG_HELP)]
    pub run: Option<String>,
    /// A host name the shop calls this listener by (repeat for several):
    /// requests naming any other host are refused, so that a web page cannot
    /// reach the API through a name it points at this machine (DNS
    /// rebinding). IP addresses, `localhost` and `*.localhost` are always
    /// answered.
    #[arg(
        long = "allow-host",
        value_name = "NAME",
        env = "FEDCART_SERVE_ALLOW_HOSTS",
        value_delimiter = ','
    )]
    pub allow_hosts: Vec<String>,
}

/// Why `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration could not be used.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The state directory could not be opened.
    #[error(transparent)]
    State(#[from] StateError),
    /// The merchant's files could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The listener could not be bound or failed.
    #[error("HTTP listener {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The merchant's own files, read once at start: they change only when the
/// merchant re-exports them (restart `serve` then).
#[derive(Debug, Default)]
pub struct LocalFiles {
    /// Customer rows, for churn scores and segments.
    customers: Option<fedcart_common::data::tabular::TabularDataset>,
    /// The recommender's local data, when `data.ratings_csv` is set.
    mf: Option<MfLocal>,
}

/// What recommendations need besides the models.
#[derive(Debug)]
struct MfLocal {
    items: Items,
    names: HashMap<String, String>,
    /// Customer id → local user index.
    users: HashMap<String, usize>,
    /// The customer ids in index order, which each snapshot's user
    /// factors are matched to by id ([`Recommender::for_users`]).
    order: Vec<String>,
    /// The merchant's popularity and each user's purchases, for the ranking.
    purchases: recommend::Purchases,
}

impl MfLocal {
    /// `items` with their display names.
    fn with_names(
        &self,
        mut items: Vec<recommend::Recommendation>,
    ) -> Vec<recommend::Recommendation> {
        for r in &mut items {
            r.name = self.names.get(&r.item).cloned();
        }
        items
    }
}

impl LocalFiles {
    /// Reads the customer table and the recommender's files named in `cfg`.
    /// Hashed item ids are mapped into the rows of the recommender the
    /// state directory holds (a later model with another row count needs a
    /// restart of `serve`).
    pub fn load(cfg: &AgentConfig) -> Result<Self, DataError> {
        let state = cfg.state_dir.as_ref().and_then(|d| StateDir::open(d).ok());
        Self::load_for(cfg, state.as_ref())
    }

    /// [`LocalFiles::load`] with hashed item ids mapped into the rows of
    /// the recommender in `state`.
    pub fn load_for(cfg: &AgentConfig, state: Option<&StateDir>) -> Result<Self, DataError> {
        let customers = match (&cfg.data.churn_csv, &cfg.data.orders_csv) {
            (None, None) => None,
            _ => Some(CustomerTable::from_config(cfg)?.load()?),
        };
        let rows = state
            .and_then(|s| s.mf_rows().ok().flatten())
            .unwrap_or(data::HASHED_ROWS_BEFORE_A_TASK);
        let mf = match data::interactions(cfg)? {
            Some(inter) => {
                let items = inter.items(rows)?;
                if let Some(note) = items.collision_note() {
                    tracing::warn!("{note}");
                }
                let mf = inter.mf(&items);
                let purchases = recommend::Purchases::of(&mf, items.len()).naming(&items);
                Some(MfLocal {
                    items,
                    names: data::configured_item_names(cfg)?,
                    users: mf
                        .users
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (c.clone(), i))
                        .collect(),
                    order: mf.users.clone(),
                    purchases,
                })
            }
            None => None,
        };
        Ok(Self { customers, mf })
    }
}

/// One model family as served: its version and per-customer answers, or why
/// there is none (shown with 503).
type Served<T> = Result<(ModelVersion, T), String>;

/// Everything a request reads, built off the request path and swapped whole.
#[derive(Debug)]
pub struct Snapshot {
    recommender: Served<Recommender>,
    churn: Served<HashMap<String, f32>>,
    segments: Served<HashMap<String, usize>>,
    /// The stored recommender hashes item ids into another number of rows
    /// than this server mapped the merchant's items into at start: it can
    /// only be served after a restart, and the reloader keeps the
    /// recommender it served until then.
    rows_changed: bool,
}

/// The versions a snapshot serves, per family (`None`: no model yet), and
/// the runs they belong to (versions count per run: a new run's version 1
/// after another's version 3 is a change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Versions {
    /// Recommender (`mf`) version.
    pub recommender: Option<u64>,
    /// Churn model version.
    pub churn: Option<u64>,
    /// Segmentation (k-means) version.
    pub segments: Option<u64>,
    /// The run of each family's version.
    pub runs: Runs,
}

/// The run of each family's served version (`None`: no model yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Runs {
    /// The recommender's run.
    pub recommender: Option<String>,
    /// The churn model's run.
    pub churn: Option<String>,
    /// The segmentation's run.
    pub segments: Option<String>,
}

/// For the logs: `recommender version 2 of run `rec`, churn none, …`
/// (the derived `Debug` printed the struct).
impl std::fmt::Display for Versions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let families = [
            ("recommender", self.recommender, &self.runs.recommender),
            ("churn", self.churn, &self.runs.churn),
            ("segments", self.segments, &self.runs.segments),
        ];
        for (i, (name, version, run)) in families.into_iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            match (version, run) {
                (Some(v), Some(run)) => write!(f, "{sep}{name} version {v} of run `{run}`")?,
                (Some(v), None) => write!(f, "{sep}{name} version {v}")?,
                (None, _) => write!(f, "{sep}{name} none")?,
            }
        }
        Ok(())
    }
}

impl Snapshot {
    /// The versions in use.
    pub fn versions(&self) -> Versions {
        fn of<T>(served: &Served<T>) -> Option<&ModelVersion> {
            served.as_ref().ok().map(|r| &r.0)
        }
        let (rec, churn, seg) = (of(&self.recommender), of(&self.churn), of(&self.segments));
        Versions {
            recommender: rec.map(|m| m.version),
            churn: churn.map(|m| m.version),
            segments: seg.map(|m| m.version),
            runs: Runs {
                recommender: rec.map(|m| m.run_id.clone()),
                churn: churn.map(|m| m.run_id.clone()),
                segments: seg.map(|m| m.run_id.clone()),
            },
        }
    }
}

/// How often `start` reads a state caught between two writes again before
/// it serves the mismatch as an error (20 ms apart: a second in all).
const TORN_RETRIES: u32 = 50;

/// A model file caught between two writes of the agent: keep the previous
/// snapshot and look again at the next poll.
#[derive(Debug)]
pub struct Torn;

fn torn(e: &StateError, is_torn: bool) -> Result<String, Torn> {
    if is_torn {
        Err(Torn)
    } else {
        // The cause too: a state file's path alone says nothing of what is
        // wrong with it.
        Ok(fedcart_common::cli::one_line(e))
    }
}

/// Builds a snapshot from the state directory and the local files.
pub fn build_snapshot(state: &StateDir, local: &LocalFiles) -> Result<Snapshot, Torn> {
    build_snapshot_with(state, local, true)
}

/// As [`build_snapshot`]; with `wait_torn` false, a parameter file that
/// does not match its meta is served as that model's error (503) instead of
/// being read again.
fn build_snapshot_with(
    state: &StateDir,
    local: &LocalFiles,
    wait_torn: bool,
) -> Result<Snapshot, Torn> {
    let mismatch = |e: &StateError| wait_torn && matches!(e, StateError::Mismatch { .. });
    let mut rows_changed = false;
    let recommender = match &local.mf {
        None => Err(
            "no recommender data (`data.ratings_csv`, or `data.orders_csv` with an item column)"
                .to_string(),
        ),
        Some(mf) => {
            match Recommender::load(state, mf.items.len()).map(|r| r.for_users(&mf.order)) {
                Ok(r) => Ok((
                    ModelVersion {
                        run_id: r.run_id.clone(),
                        version: r.version,
                    },
                    r,
                )),
                Err(RecommendError::State(e)) => Err(torn(&e, mismatch(&e))?),
                // No catalogue here: the rows `serve` hashed ids into at its
                // start (the model it had then, or the default without one)
                // are not the stored model's.
                Err(RecommendError::CatalogueMismatch { model, catalogue })
                    if matches!(mf.items, Items::Hashed { .. }) =>
                {
                    rows_changed = true;
                    Err(format!(
                        "the stored recommender hashes item ids into {model} rows, and `serve` \
                         hashed this merchant's items into {catalogue} at its start (the model \
                         it had then, or none): restart `serve` to serve it"
                    ))
                }
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let (churn, segments) = match &local.customers {
        None => {
            let why = "no customer table (`data.orders_csv` or `data.churn_csv`)".to_string();
            (Err(why.clone()), Err(why))
        }
        Some(ds) => {
            let churn = match recommend::churn_probabilities(state, ds) {
                Ok((v, p)) => Ok((v, ds.ids.iter().cloned().zip(p).collect())),
                Err(RecommendError::State(e)) => Err(torn(&e, mismatch(&e))?),
                Err(e) => Err(e.to_string()),
            };
            let segments = match segments::assign(state, ds) {
                Ok((v, s)) => Ok((v, ds.ids.iter().cloned().zip(s).collect())),
                Err(segments::SegmentsError::State(e)) => Err(torn(&e, mismatch(&e))?),
                Err(e) => Err(e.to_string()),
            };
            (churn, segments)
        }
    };
    Ok(Snapshot {
        recommender,
        churn,
        segments,
        rows_changed,
    })
}

/// What the reloader compares between polls: the contents of the (small)
/// meta files, which carry each version and its parameters' checksum, and
/// the size and modification time of the user factors. A change means a
/// new version may be there.
#[derive(Debug, PartialEq)]
struct Fingerprint {
    metas: Vec<Option<Vec<u8>>>,
    users: Option<(u64, SystemTime)>,
}

impl Fingerprint {
    /// Whether a file seen here is gone in `now`.
    fn lost_in(&self, now: &Fingerprint) -> bool {
        self.metas
            .iter()
            .zip(&now.metas)
            .any(|(was, is)| was.is_some() && is.is_none())
            || (self.users.is_some() && now.users.is_none())
    }
}

fn fingerprint(dir: &Path) -> Fingerprint {
    Fingerprint {
        metas: [
            "global-mf.json",
            "global-churn.json",
            "global-segments.json",
            "personal-mf.json",
        ]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).ok())
        .collect(),
        users: std::fs::metadata(dir.join("mf-users.json"))
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?))),
    }
}

/// Shared by the handlers: the local files and the current snapshot.
#[derive(Clone)]
pub struct AppState {
    local: Arc<LocalFiles>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Host names answered besides IP addresses and `localhost`
    /// (lowercase, without a trailing dot).
    allowed_hosts: Arc<[String]>,
}

/// A running server: its address, the snapshot channel and a shutdown switch.
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    /// Every published snapshot (tests wait on it for a version).
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// How long a stopping server waits for the connections it has.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl Running {
    /// Stops accepting, lets requests in flight finish for up to
    /// [`SHUTDOWN_GRACE`], and returns. A client that keeps a connection
    /// open without finishing its request (or at all) is cut off then: it
    /// held `SIGTERM` off for as long as it liked, until a supervisor's
    /// `SIGKILL`.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.shutdown_within(SHUTDOWN_GRACE).await
    }

    /// [`Running::shutdown`] with another grace period.
    pub async fn shutdown_within(mut self, grace: Duration) -> std::io::Result<()> {
        let _ = self.shutdown.send(true);
        match tokio::time::timeout(grace, &mut self.task).await {
            Ok(done) => done.unwrap_or(Ok(())),
            Err(_) => {
                tracing::warn!(
                    seconds = grace.as_secs_f64(),
                    "connections still open after the shutdown grace period: closed"
                );
                self.task.abort();
                Ok(())
            }
        }
    }

    /// Waits until the server stops by itself (listener error) or `stop` is set.
    pub async fn serve_until(self, mut stop: watch::Receiver<bool>) -> std::io::Result<()> {
        let _ = stop.wait_for(|s| *s).await;
        self.shutdown().await
    }
}

/// How long a client may take to send a request's headers (or idle between
/// requests) before the server closes its connection. Without it a client
/// that opened connections and sent nothing, or half a header, held them
/// (and their sockets) until shutdown.
pub use fedcart_common::http::HEADER_READ_TIMEOUT;

/// Binds `addr`, loads the first snapshot and serves; the reloader polls
/// `state` every `poll`.
pub async fn start(
    addr: SocketAddr,
    state: StateDir,
    local: LocalFiles,
    poll: Duration,
) -> Result<Running, ServeError> {
    start_with(addr, state, local, poll, HEADER_READ_TIMEOUT, &[]).await
}

/// [`start`] with another [`HEADER_READ_TIMEOUT`], answering the host names
/// `allowed_hosts` as well (see [`ServeArgs::allow_hosts`]).
pub async fn start_with(
    addr: SocketAddr,
    state: StateDir,
    local: LocalFiles,
    poll: Duration,
    header_read_timeout: Duration,
    allowed_hosts: &[String],
) -> Result<Running, ServeError> {
    let local = Arc::new(local);
    // Taken before the first build, so that a version written during it is
    // picked up by the first poll.
    let initial = fingerprint(state.path());
    // The agent may be writing a model right now (a state of the older
    // layout can be caught between its two files): read again, a few times.
    // A mismatch that lasts is no write in progress but a damaged file: it
    // is served as that model's error, and the rest is served (this looped
    // at full speed forever, before binding the port, on such a state).
    let mut tries = 0;
    let first = loop {
        match build_snapshot_with(&state, &local, tries < TORN_RETRIES) {
            Ok(s) => break s,
            Err(Torn) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let (tx, rx) = watch::channel(Arc::new(first));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Listen { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServeError::Listen { addr, source })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let reload_local = local.clone();
    let mut reload_stop = stop_rx.clone();
    tokio::spawn(async move {
        let mut seen = initial;
        let mut missing = false;
        let mut torn = 0u32;
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = reload_stop.wait_for(|s| *s) => return,
            }
            let now = fingerprint(state.path());
            if now == seen {
                continue;
            }
            // The directory moved or removed: nothing in it changed, so the
            // models served stay (they read as "no model yet" otherwise).
            if !state.path().is_dir() {
                if !missing {
                    tracing::warn!(
                        dir = %state.path().display(),
                        "the state directory is gone: serving the models loaded before it went"
                    );
                    missing = true;
                }
                continue;
            }
            // A model's files gone with the directory still there: `rm -rf`
            // caught halfway (the agent never removes a meta file). The
            // models loaded keep being served, as when the directory goes
            // (a poll here swapped in "no model yet" for every family).
            if seen.lost_in(&now) {
                if !missing {
                    tracing::warn!(
                        dir = %state.path().display(),
                        "model files of the state directory went away (deleted or moved?): \
                         serving the models loaded before"
                    );
                    missing = true;
                }
                continue;
            }
            missing = false;
            let (dir, local) = (state.clone(), reload_local.clone());
            match tokio::task::spawn_blocking(move || build_snapshot(&dir, &local)).await {
                Ok(Ok(mut snap)) => {
                    if snap.rows_changed {
                        let served = tx.borrow().recommender.clone();
                        tracing::warn!(
                            "a recommender with another number of hashed item rows was stored: \
                             restart `serve` to serve it{}",
                            if served.is_ok() {
                                "; serving the one loaded before until then"
                            } else {
                                ""
                            }
                        );
                        if served.is_ok() {
                            snap.recommender = served;
                        }
                    }
                    let versions = snap.versions();
                    tracing::info!(%versions, "serving new model versions");
                    seen = now;
                    torn = 0;
                    if tx.send(Arc::new(snap)).is_err() {
                        return;
                    }
                }
                // Caught between two writes: `seen` stays, so the next
                // poll builds again; a mismatch that outlasts the retries
                // is a damaged file, served as its model's error (the rest
                // is served), and not read again until the files change.
                Ok(Err(Torn)) => {
                    torn += 1;
                    if torn >= TORN_RETRIES {
                        let (state, local) = (state.clone(), reload_local.clone());
                        if let Ok(snap) = tokio::task::spawn_blocking(move || {
                            build_snapshot_with(&state, &local, false)
                        })
                        .await
                        .unwrap_or(Err(Torn))
                        {
                            tracing::warn!(
                                versions = %snap.versions(),
                                "a model file does not match its checksum: served as that \
                                 model's error until the agent writes it again"
                            );
                            seen = now;
                            torn = 0;
                            if tx.send(Arc::new(snap)).is_err() {
                                return;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "building a snapshot panicked");
                    return;
                }
            }
        }
    });
    let app = router(AppState {
        local,
        snapshot: rx.clone(),
        allowed_hosts: allowed_hosts.iter().map(|h| host_name(h)).collect(),
    });
    let task = tokio::spawn(fedcart_common::http::serve(
        listener,
        app,
        header_read_timeout,
        stop_rx,
    ));
    Ok(Running {
        addr,
        snapshots: rx,
        shutdown: stop_tx,
        task,
    })
}

/// The routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/version", get(version))
        .route(
            "/v1/customers/{customer}/recommendations",
            get(recommendations),
        )
        .route("/v1/best-sellers", get(best_sellers))
        .route("/v1/customers/{customer}/churn", get(churn))
        .route("/v1/customers/{customer}/segment", get(segment))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.allowed_hosts.clone(),
            check_host,
        ))
        .with_state(state)
}

/// `host` as compared: lowercase, without a port or a trailing dot.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        // `[::1]:8080`: the brackets and the port go.
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Refuses a request whose `Host` is a name this listener was not told it
/// goes by: a browser sends the page's own name, so a page that pointed its
/// name at this machine (DNS rebinding) is refused, while IP addresses,
/// `localhost`, `*.localhost` (RFC 6761, always this machine) and the
/// `--allow-host` names are answered. A request without `Host` comes from
/// no browser and is answered.
async fn check_host(
    State(allowed): State<Arc<[String]>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(host) = req.headers().get(axum::http::header::HOST) else {
        return next.run(req).await;
    };
    let name = host_name(&String::from_utf8_lossy(host.as_bytes()));
    let answered = name.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || allowed.contains(&name);
    if answered {
        return next.run(req).await;
    }
    error(
        StatusCode::FORBIDDEN,
        format!(
            "host `{name}` is not a name this API answers to (a web page may be reaching it \
             through a name pointed at this machine): call it by IP address or `localhost`, or \
             start `serve` with `--allow-host {name}` if the shop calls it by that name"
        ),
    )
}

/// Every error answer is `{"error": …}` JSON: axum's own (a method the
/// route does not take, a path segment that is not UTF-8, a malformed
/// query) come as empty or plain-text bodies, which are rewritten here
/// with their status and headers (`allow` on a 405) kept.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match (text.is_empty(), status) {
        (false, _) => text,
        (true, StatusCode::METHOD_NOT_ALLOWED) => {
            "method not allowed: every route answers GET (and HEAD)".to_string()
        }
        (true, s) => s.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let mut json = error(status, message);
    for (name, value) in parts.headers.iter() {
        if name != axum::http::header::CONTENT_TYPE {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    json
}

/// Why a query is ambiguous: a parameter named twice (refused rather than
/// letting the last win), or `None`.
fn repeated_param(params: &[(String, String)]) -> Option<String> {
    params
        .iter()
        .enumerate()
        .find(|(i, (name, _))| params[..*i].iter().any(|(n, _)| n == name))
        .map(|(_, (name, _))| format!("parameter `{name}` is given more than once"))
}

/// A route that takes no parameters refuses any, as the recommendations
/// route refuses unknown ones: the 400 to answer, or `None`.
fn no_params(params: &[(String, String)]) -> Option<Response> {
    params.first().map(|(name, _)| {
        error(
            StatusCode::BAD_REQUEST,
            format!("unknown parameter `{name}` (this route takes none)"),
        )
    })
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn unknown(customer: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("unknown customer `{customer}`"),
    )
}

async fn healthz(Query(params): Query<Vec<(String, String)>>) -> Response {
    no_params(&params).unwrap_or_else(|| Json(json!({"status": "ok"})).into_response())
}

async fn version(
    State(app): State<AppState>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    no_params(&params).unwrap_or_else(|| Json(app.snapshot.borrow().versions()).into_response())
}

/// Query parameters of the recommendations route.
const RECOMMEND_PARAMS: &str = "k, include_repeats, repeat_weight";

async fn recommendations(
    State(app): State<AppState>,
    UrlPath(customer): UrlPath<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let customer = customer.trim().to_string();
    let bad = |m: String| error(StatusCode::BAD_REQUEST, m);
    if let Some(why) = repeated_param(&params) {
        return bad(why);
    }
    let mut opts = recommend::RecommendOptions::top(10);
    let mut repeats_off = false;
    for (name, value) in &params {
        match name.as_str() {
            "k" => match value.parse::<usize>() {
                Ok(v) => opts.k = v,
                Err(_) => return bad(format!("k = `{value}` is not a whole number")),
            },
            "include_repeats" => match value.as_str() {
                "true" | "1" => opts.include_repeats = true,
                "false" | "0" => {
                    opts.include_repeats = false;
                    repeats_off = true;
                }
                _ => return bad(format!("include_repeats = `{value}`: use true or false")),
            },
            "repeat_weight" => match value.parse::<f32>() {
                Ok(w) if (0.0..=1.0).contains(&w) => opts.repeat_weight = Some(w),
                _ => return bad(format!("repeat_weight = `{value}`: use a number in [0, 1]")),
            },
            other => {
                return bad(format!(
                    "unknown parameter `{other}` (expected: {RECOMMEND_PARAMS})"
                ));
            }
        }
    }
    if let Err(e) = recommend::check_k(opts.k) {
        return bad(e.to_string());
    }
    if repeats_off && opts.repeat_weight.is_some() {
        return bad(
            "repeat_weight blends the customer's own frequent items into the list, which \
             include_repeats = false leaves out: give one or the other"
                .into(),
        );
    }
    let Some(mf) = &app.local.mf else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no recommender data (`data.ratings_csv`, or `data.orders_csv` with an item column)"
                .into(),
        );
    };
    let Some(&u) = mf.users.get(&customer) else {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "unknown customer `{customer}`: no purchase of theirs is in the data as `serve` \
                 read it at its start (restart `serve` after re-exporting; for a visitor with no \
                 purchases, /v1/best-sellers lists this merchant's best sellers)"
            ),
        );
    };
    let snap = app.snapshot.borrow().clone();
    let (version, rec) = match &snap.recommender {
        Ok((v, r)) => (v, r),
        Err(why) => return error(StatusCode::SERVICE_UNAVAILABLE, why.clone()),
    };
    // A known customer the model has no factors for (they bought after it
    // was trained) gets the best sellers, marked as such, not an error.
    let ranked = rec.rank(&customer, u, &mf.purchases, &opts);
    match recommend::fallback(ranked, &mf.purchases, &mf.items, u, &opts) {
        Ok((listed, basis, note)) => {
            let mut body = json!({
                "customer": customer,
                "model_version": version.version,
                "model_run": version.run_id,
                "model_copy": rec.copy,
                "basis": basis,
                "items": mf.with_names(listed),
            });
            if let Some(note) = note {
                body["note"] = note.into();
            }
            Json(body).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Query parameters of the best-sellers route.
const BEST_SELLERS_PARAMS: &str = "k";

/// The merchant's best sellers, most customers first: what a visitor with no
/// purchases can be shown. Needs the recommender's data, not its model.
async fn best_sellers(
    State(app): State<AppState>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    let bad = |m: String| error(StatusCode::BAD_REQUEST, m);
    if let Some(why) = repeated_param(&params) {
        return bad(why);
    }
    let mut opts = recommend::RecommendOptions::top(10);
    for (name, value) in &params {
        match name.as_str() {
            "k" => match value.parse::<usize>() {
                Ok(v) => opts.k = v,
                Err(_) => return bad(format!("k = `{value}` is not a whole number")),
            },
            other => {
                return bad(format!(
                    "unknown parameter `{other}` (expected: {BEST_SELLERS_PARAMS})"
                ));
            }
        }
    }
    if let Err(e) = recommend::check_k(opts.k) {
        return bad(e.to_string());
    }
    let Some(mf) = &app.local.mf else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no recommender data (`data.ratings_csv`, or `data.orders_csv` with an item column)"
                .into(),
        );
    };
    let top = mf.purchases.popular(None, &mf.items, &opts);
    Json(json!({
        "basis": recommend::Basis::Popularity,
        "items": mf.with_names(top),
    }))
    .into_response()
}

/// A per-customer lookup in one family of the snapshot.
fn lookup<T: Serialize + Copy>(
    family: &Served<HashMap<String, T>>,
    customer: &str,
    field: &str,
) -> Response {
    match family {
        Err(why) => error(StatusCode::SERVICE_UNAVAILABLE, why.clone()),
        Ok((version, by_customer)) => match by_customer.get(customer) {
            None => unknown(customer),
            Some(v) => Json(json!({
                "customer": customer,
                "model_version": version.version,
                "model_run": version.run_id,
                field: v,
            }))
            .into_response(),
        },
    }
}

/// A per-customer figure of the current snapshot's `family`, as `field`;
/// these routes take no query parameter.
fn per_customer<T: Serialize + Copy>(
    app: &AppState,
    customer: &str,
    params: &[(String, String)],
    family: fn(&Snapshot) -> &Served<HashMap<String, T>>,
    field: &str,
) -> Response {
    if let Some(r) = no_params(params) {
        return r;
    }
    let snap = app.snapshot.borrow().clone();
    lookup(family(&snap), customer.trim(), field)
}

async fn churn(
    State(app): State<AppState>,
    UrlPath(customer): UrlPath<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    per_customer(&app, &customer, &params, |s| &s.churn, "churn_probability")
}

async fn segment(
    State(app): State<AppState>,
    UrlPath(customer): UrlPath<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    per_customer(&app, &customer, &params, |s| &s.segments, "segment")
}

/// `fedcart-client serve`: loads the configuration and the local files,
/// serves until `stop` is set.
/// `state` is the state directory `args.run` names, checked by the caller
/// as the reading commands check it (it exists; the run is one the agent
/// worked for), so `serve` refuses what `recommend` refuses.
pub async fn run(
    args: &ServeArgs,
    cfg: &AgentConfig,
    state: StateDir,
    stop: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let local = LocalFiles::load_for(cfg, Some(&state))?;
    let running = start_with(
        args.http,
        state,
        local,
        Duration::from_millis(args.poll_ms.max(1)),
        HEADER_READ_TIMEOUT,
        &args.allow_hosts,
    )
    .await?;
    tracing::info!(addr = %running.addr, versions = %running.snapshots.borrow().versions(), "serving");
    running
        .serve_until(stop)
        .await
        .map_err(|source| ServeError::Listen {
            addr: args.http,
            source,
        })
}

#[cfg(test)]
#[path = "../benches/serve_fixture.rs"]
mod fixture;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;

    type Http = Client<HttpConnector, Empty<Bytes>>;

    fn client() -> Http {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn get(http: &Http, addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
        let uri = format!("http://{addr}{path}").parse().expect("uri");
        let resp = http.get(uri).await.expect("HTTP request");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&body).expect("JSON body"))
    }

    async fn start_fixture(f: &fixture::Fixture) -> Running {
        let local = LocalFiles::load(&f.cfg).expect("local files");
        start_files(f, local, HEADER_READ_TIMEOUT).await
    }

    /// A server on the fixture's state with `local` files, polling every 5 ms.
    async fn start_files(f: &fixture::Fixture, local: LocalFiles, header: Duration) -> Running {
        start_with(
            "127.0.0.1:0".parse().unwrap(),
            f.state.clone(),
            local,
            Duration::from_millis(5),
            header,
            &[],
        )
        .await
        .expect("server starts")
    }

    /// The fixture's recommender data as `recommend` reads it: the data, its
    /// item rows and the catalogue behind them.
    fn fixture_recommender(
        f: &fixture::Fixture,
    ) -> (
        fedcart_common::model::mf::MfData,
        Items,
        fedcart_common::data::catalogue::Catalogue,
    ) {
        let inter = data::interactions(&f.cfg).unwrap().unwrap();
        let listed = inter.items(0).unwrap();
        let mf = inter.mf(&listed);
        let Items::Listed(cat) = &listed else {
            unreachable!("the fixture has a catalogue")
        };
        let cat = cat.clone();
        (mf, listed, cat)
    }

    /// The item ids of a fresh server's top 10 for `who`.
    async fn served_ids(f: &fixture::Fixture, who: &str) -> Vec<String> {
        let server = start_fixture(f).await;
        let (status, body) = get(
            &client(),
            server.addr,
            &format!("/v1/customers/{who}/recommendations?k=10"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["item"].as_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn implicit_recommendations_blend_the_merchants_popularity_as_the_command_line_does() {
        let f = fixture::Fixture::new();
        let who = &f.shoppers[3];
        let (mf, listed, cat) = fixture_recommender(&f);
        let cli = |k| -> Vec<String> {
            recommend::recommend(&f.state, &mf, &listed, who, k)
                .unwrap()
                .into_iter()
                .map(|r| r.item)
                .collect()
        };
        // A blend the validation chose: the API ranks as `recommend` does.
        f.publish_implicit(2, 0.4);
        let blended = served_ids(&f, who).await;
        assert_eq!(blended, cli(10));
        // All weight on popularity: the merchant's best sellers this
        // customer has not bought, in popularity order.
        f.publish_implicit(3, 1.0);
        let pop = fedcart_common::model::mf::local_popularity(&mf, cat.len());
        let bought = recommend::purchased(&mf, 3);
        let mut best: Vec<u32> = (0..cat.len() as u32)
            .filter(|i| !bought.contains(i))
            .collect();
        best.sort_by(|a, b| pop[*b as usize].total_cmp(&pop[*a as usize]).then(a.cmp(b)));
        let expected: Vec<String> = best[..10]
            .iter()
            .map(|&i| cat.id(i).unwrap().to_owned())
            .collect();
        assert_eq!(served_ids(&f, who).await, expected);
        assert_eq!(cli(10), expected);
        assert_ne!(blended, expected, "the blend weight changes the list");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recommendations_skip_purchases_unless_asked_show_names_and_refuse_bad_input() {
        let f = fixture::Fixture::new();
        let server = start_fixture(&f).await;
        let (addr, http) = (server.addr, client());
        assert_eq!(
            get(&http, addr, "/healthz").await,
            (200, json!({"status": "ok"}))
        );
        assert_eq!(
            get(&http, addr, "/v1/version").await,
            (
                200,
                json!({"recommender": 1, "churn": 1, "segments": null,
                    "runs": {"recommender": "fixture", "churn": "fixture", "segments": null}})
            )
        );
        // They take no parameter, as the churn and segment routes (a
        // probe's `?x=1` was answered as if absent).
        for path in ["/healthz?x=1", "/v1/version?family=mf"] {
            let (status, body) = get(&http, addr, path).await;
            assert_eq!(status, 400, "{path}");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains("this route takes none"),
                "{path}: {body}"
            );
        }
        let who = &f.shoppers[0];
        let (mf, listed, cat) = fixture_recommender(&f);
        let bought: HashSet<String> = recommend::purchased(&mf, 0)
            .into_iter()
            .map(|i| cat.id(i).unwrap().to_owned())
            .collect();
        let (status, body) = get(
            &http,
            addr,
            &format!("/v1/customers/{who}/recommendations?k=5"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model_version"], 1);
        // Versions count per run: the run names which version 1.
        assert_eq!(body["model_run"], "fixture");
        let items = body["items"].as_array().unwrap();
        assert_eq!(items.len(), 5);
        assert!(
            items
                .iter()
                .all(|i| !bought.contains(i["item"].as_str().unwrap()))
        );
        assert!(
            items
                .iter()
                .all(|i| i["name"].as_str().is_some_and(|n| !n.is_empty()))
        );
        // The same ranking as the command line's `recommend`.
        let cli = recommend::recommend(&f.state, &mf, &listed, who, 5).unwrap();
        let ids: Vec<&str> = items.iter().map(|i| i["item"].as_str().unwrap()).collect();
        assert_eq!(ids, cli.iter().map(|r| r.item.as_str()).collect::<Vec<_>>());
        // With repeats, the ranking runs over the whole catalogue: purchases
        // come back in it (this customer bought a lot, so some rank high).
        let (status, body) = get(
            &http,
            addr,
            &format!("/v1/customers/{who}/recommendations?k=1000&include_repeats=true"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let all = body["items"].as_array().unwrap();
        assert_eq!(all.len(), 1000);
        assert!(
            all.iter()
                .any(|i| bought.contains(i["item"].as_str().unwrap()))
        );

        for (query, needle) in [
            ("k=0", "k = 0"),
            ("k=1001", "k = 1001"),
            ("k=ten", "`ten`"),
            ("include_repeats=maybe", "include_repeats"),
            ("kk=3", "unknown parameter `kk`"),
            ("k=3&k=5", "parameter `k` is given more than once"),
            (
                "include_repeats=false&repeat_weight=0.3",
                "give one or the other",
            ),
        ] {
            let (status, body) = get(
                &http,
                addr,
                &format!("/v1/customers/{who}/recommendations?{query}"),
            )
            .await;
            assert_eq!(status, 400, "{query}: {body}");
            assert!(
                body["error"].as_str().unwrap().contains(needle),
                "{query}: {body}"
            );
        }
        // The best sellers: most buyers first (counted over the whole
        // file, ties by item id), named, scored with the count.
        let (status, body) = get(&http, addr, "/v1/best-sellers?k=4").await;
        assert_eq!(
            (status, &body["basis"]),
            (200, &json!("popularity")),
            "{body}"
        );
        let mut buyers: HashMap<u32, HashSet<u32>> = HashMap::new();
        for r in mf.train.iter().chain(&mf.valid).chain(&mf.test) {
            buyers.entry(r.item).or_default().insert(r.user);
        }
        let mut counted: Vec<(u32, usize)> = buyers.iter().map(|(&i, u)| (i, u.len())).collect();
        counted.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then(cat.id(a.0).unwrap().cmp(cat.id(b.0).unwrap()))
        });
        let best = body["items"].as_array().unwrap();
        assert_eq!(best.len(), 4);
        for (got, (row, count)) in best.iter().zip(&counted) {
            assert_eq!(got["item"], cat.id(*row).unwrap(), "{body}");
            assert_eq!(got["score"], *count as f64, "{body}");
            assert!(got["name"].as_str().is_some_and(|n| !n.is_empty()));
        }
        for (query, needle) in [
            ("k=0", "k = 0"),
            ("k=3&k=5", "given more than once"),
            (
                "include_repeats=true",
                "unknown parameter `include_repeats` (expected: k)",
            ),
        ] {
            let (status, body) = get(&http, addr, &format!("/v1/best-sellers?{query}")).await;
            assert_eq!(status, 400, "{query}: {body}");
            assert!(
                body["error"].as_str().unwrap().contains(needle),
                "{query}: {body}"
            );
        }
        for route in ["recommendations", "churn"] {
            let (status, body) = get(&http, addr, &format!("/v1/customers/nobody/{route}")).await;
            assert_eq!(status, 404, "{route}");
            let why = body["error"].as_str().unwrap();
            assert!(why.starts_with("unknown customer `nobody`"), "{why}");
            // A shop told where a visitor's list comes from instead.
            assert_eq!(
                why.contains("/v1/best-sellers"),
                route == "recommendations",
                "{why}"
            );
        }
        // Ids are trimmed as the command line trims them; a route without
        // parameters refuses one; axum's own refusals answer JSON too.
        let known = &f.customers[0];
        let (status, body) = get(&http, addr, &format!("/v1/customers/%20{known}%20/churn")).await;
        assert_eq!((status, &body["customer"]), (200, &json!(known)), "{body}");
        assert_eq!(body["model_run"], "fixture");
        let (status, body) = get(&http, addr, &format!("/v1/customers/{known}/churn?k=3")).await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("unknown parameter `k`")
        );
        let (status, body) = get(&http, addr, "/v1/customers/%ff%fe/churn").await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap().contains("UTF-8"), "{body}");
        let post = hyper::Request::post(format!("http://{addr}/v1/version"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = http.request(post).await.unwrap();
        assert_eq!(resp.status().as_u16(), 405);
        assert_eq!(resp.headers()["allow"], "GET,HEAD");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("method not allowed")
        );
        let (status, body) = get(
            &http,
            addr,
            &format!("/v1/customers/{}/segment", f.customers[0]),
        )
        .await;
        assert_eq!(status, 503, "no k-means model yet: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("segmentation"),
            "{body}"
        );
        server.shutdown().await.unwrap();
    }

    /// A state of the older layout (one fixed parameter file) whose
    /// parameters do not match their meta for good: `serve` looped at full
    /// speed before binding its port and ignored SIGTERM. It now serves the
    /// mismatch as the recommender's error and the churn scores as usual.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_model_file_is_served_as_its_error_and_the_rest_is_served() {
        let f = fixture::Fixture::new();
        for e in std::fs::read_dir(f.state.path()).unwrap().flatten() {
            let name = e.file_name().into_string().unwrap();
            if name.starts_with("global-mf") && name.ends_with(".f32") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        std::fs::write(f.state.path().join("global-mf.f32"), [0u8; 8]).unwrap();
        let server = start_fixture(&f).await;
        let who = &f.customers[0];
        let http = client();
        let (status, body) = get(&http, server.addr, &format!("/v1/customers/{who}/churn")).await;
        assert_eq!(status, 200, "{body}");
        let path = format!("/v1/customers/{}/recommendations?k=3", f.shoppers[3]);
        let (status, body) = get(&http, server.addr, &path).await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("checksum"),
            "{body}"
        );
        server.shutdown().await.unwrap();
    }

    /// A model file damaged while serving (not a write in progress: it
    /// stays damaged) is, after the retries, served as its model's error
    /// while the other models move on; it was read and hashed again on
    /// every poll, forever, without a word.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_file_damaged_while_serving_becomes_its_error_after_the_retries() {
        let f = fixture::Fixture::new();
        let server = start_fixture(&f).await;
        let mut snapshots = server.snapshots.clone();
        f.publish(2);
        for e in std::fs::read_dir(f.state.path()).unwrap().flatten() {
            let name = e.file_name().into_string().unwrap();
            if name.starts_with("global-mf") && name.ends_with(".f32") {
                let len = e.metadata().unwrap().len() as usize;
                std::fs::write(e.path(), vec![0u8; len]).unwrap();
            }
        }
        // The users file written again: the reloader reads the state once
        // more even if it served version 2 before the damage.
        let users = f.state.load_users().unwrap().unwrap();
        f.state.save_users(&users).unwrap();
        let snap = snapshots
            .wait_for(|s| s.recommender.is_err())
            .await
            .unwrap()
            .clone();
        let why = snap.recommender.as_ref().map(|_| ()).unwrap_err();
        assert!(why.contains("checksum") && why.contains("damaged"), "{why}");
        assert_eq!(snap.churn.as_ref().unwrap().0.version, 2);
        server.shutdown().await.unwrap();
    }

    /// A recommender run whose model hashes item ids into another number
    /// of rows cannot be served without mapping the merchant's items again
    /// (a restart): until then the recommender served before stays (every
    /// recommendation was a 503 until the restart).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recommender_of_another_hashed_row_count_keeps_the_one_served_until_a_restart() {
        use fedcart_common::model::mf::{MfHyper, initial_params};
        use fedcart_common::task::ModelSpec;
        let f = fixture::Fixture::new();
        let mut cfg = f.cfg.clone();
        cfg.data.catalogue = None;
        let local = LocalFiles::load(&cfg).expect("local files");
        let before = LocalFiles::load(&cfg).expect("local files");
        let server = start_files(&f, local, HEADER_READ_TIMEOUT).await;
        let mut snapshots = server.snapshots.clone();
        assert_eq!(
            snapshots.borrow_and_update().versions().recommender,
            Some(1)
        );
        let rows = 4_096;
        f.save(
            ModelSpec::Mf {
                num_items: rows,
                factors: fixture::FACTORS,
                hyper: MfHyper::default(),
            },
            None,
            2,
            &initial_params(rows, fixture::FACTORS, 0.1, 2),
        );
        snapshots.changed().await.unwrap();
        let snap = snapshots.borrow().clone();
        assert_eq!(snap.versions().recommender, Some(1));
        let path = format!("/v1/customers/{}/recommendations?k=3", f.shoppers[3]);
        let (status, body) = get(&client(), server.addr, &path).await;
        assert_eq!(status, 200, "{body}");
        // Why, as a `serve` without a recommender before would answer it:
        // rows, not a catalogue this merchant does not have.
        let why = build_snapshot(&f.state, &before)
            .expect("not torn")
            .recommender
            .map(|_| ())
            .expect_err("another row count");
        assert!(
            why.contains("hashes item ids into 4096 rows") && !why.contains("catalogue"),
            "{why}"
        );
        server.shutdown().await.unwrap();
    }

    /// A state file that does not parse is answered with its cause, not
    /// its path alone.
    #[test]
    fn a_corrupt_state_file_is_served_as_its_cause() {
        let f = fixture::Fixture::new();
        let local = LocalFiles::load(&f.cfg).expect("local files");
        std::fs::write(
            f.state.path().join("global-mf.json"),
            "{\"run_id\": \"rec\n",
        )
        .unwrap();
        let snap = build_snapshot(&f.state, &local).expect("not torn");
        let why = snap.recommender.map(|_| ()).expect_err("no recommender");
        assert!(
            why.contains("global-mf.json") && why.contains("line 2"),
            "{why}"
        );
    }

    /// Requests one client sends before the swap, and after it has seen the
    /// new version on both routes.
    const PER_PHASE: usize = 20;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_under_load_across_a_hot_swap_never_fail_and_switch_to_the_new_version() {
        let f = Arc::new(fixture::Fixture::new());
        let server = start_fixture(&f).await;
        let addr = server.addr;
        let ds = Schema::telco()
            .load_csv(f.cfg.data.churn_csv.as_ref().unwrap())
            .unwrap();
        let clients = 8;
        let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (f, barrier) = (f.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let http = client();
                // (route, version) of every answer, in order.
                let mut seen: Vec<(&str, u64)> = Vec::new();
                let mut n = 0usize;
                let ask = |n: usize| {
                    let churn = n.is_multiple_of(2);
                    let path = if churn {
                        let who = &f.customers[(c * 131 + n * 7) % f.customers.len()];
                        format!("/v1/customers/{who}/churn")
                    } else {
                        let who = &f.shoppers[(c * 17 + n) % f.shoppers.len()];
                        format!("/v1/customers/{who}/recommendations?k=10")
                    };
                    (if churn { "churn" } else { "recommendations" }, path)
                };
                let mut answers = Vec::new();
                loop {
                    let (route, path) = ask(n);
                    let (status, body) = get(&http, addr, &path).await;
                    assert_eq!(status, 200, "{path}: {body}");
                    seen.push((route, body["model_version"].as_u64().unwrap()));
                    answers.push((path, body));
                    n += 1;
                    assert!(n < 100_000, "client {c}: version 2 never served");
                    if n == PER_PHASE {
                        // Everyone has load running; the swap happens while
                        // the clients keep sending.
                        barrier.wait().await;
                    }
                    let after = |r: &str| seen.iter().position(|s| *s == (r, 2));
                    if let (Some(a), Some(b)) = (after("churn"), after("recommendations"))
                        && seen.len() >= a.max(b) + PER_PHASE
                    {
                        break;
                    }
                }
                (seen, answers)
            }));
        }
        barrier.wait().await;
        f.publish(2);
        let mut total = 0;
        for t in tasks {
            let (seen, answers) = t.await.expect("client task");
            total += seen.len();
            // Per route, versions never go back: 1…1 then 2…2.
            for route in ["churn", "recommendations"] {
                let v: Vec<u64> = seen.iter().filter(|s| s.0 == route).map(|s| s.1).collect();
                assert!(v.windows(2).all(|w| w[0] <= w[1]), "{route}: {v:?}");
                assert_eq!((v[0], *v.last().unwrap()), (1, 2), "{route}");
            }
            // Answers of version 2 are version 2's model.
            let (_, p2) = recommend::churn_probabilities(&f.state, &ds).unwrap();
            for (path, body) in answers {
                if body["model_version"] == 2
                    && let Some(p) = body["churn_probability"].as_f64()
                {
                    let who = body["customer"].as_str().unwrap();
                    let row = ds.ids.iter().position(|c| c == who).unwrap();
                    assert_eq!(p as f32, p2[row], "{path}");
                }
            }
        }
        assert!(total >= clients * 2 * PER_PHASE);
        let versions = server.snapshots.borrow().versions();
        assert_eq!(
            versions,
            Versions {
                recommender: Some(2),
                churn: Some(2),
                segments: None,
                runs: Runs {
                    recommender: Some("fixture".into()),
                    churn: Some("fixture".into()),
                    segments: None,
                },
            }
        );
        // What the logs say: a new run's version 1 after another run's
        // version 3 reads as the change it is.
        assert_eq!(
            versions.to_string(),
            "recommender version 2 of run `fixture`, churn version 2 of run `fixture`, segments none"
        );
        server.shutdown().await.unwrap();
    }

    /// `recommend --customer " c1 "` (a pasted id): ids are trimmed when the
    /// data is read, so the one asked for is too; an id the data does not
    /// know shows the form of one it does.
    #[test]
    fn a_customer_id_is_trimmed_and_an_unknown_one_shows_a_known_form() {
        let f = fixture::Fixture::new();
        let who = f.shoppers[5].clone();
        let (mf, listed, _) = fixture_recommender(&f);
        let plain = recommend::recommend(&f.state, &mf, &listed, &who, 5).unwrap();
        let padded = recommend::recommend(&f.state, &mf, &listed, &format!(" {who}\t"), 5).unwrap();
        assert_eq!(plain, padded);
        let e = recommend::recommend(&f.state, &mf, &listed, "nobody", 5)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "unknown customer `nobody`: no purchase of theirs is in the data (known ids look \
                 like `{}`); for a visitor with no purchases, `--best-sellers` lists this \
                 merchant's best sellers",
                mf.users[0]
            )
        );
    }

    /// A client that opened a connection and never finished its request
    /// does not keep the server from stopping: it is cut off after the
    /// grace period (it held `SIGTERM` off for as long as it stayed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_client_does_not_hold_shutdown_past_the_grace_period() {
        use tokio::io::AsyncWriteExt;
        let f = fixture::Fixture::new();
        let server = start_fixture(&f).await;
        let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        stalled
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        // Served: the connection is the server's before it is told to stop.
        let (status, _) = get(&client(), server.addr, "/healthz").await;
        assert_eq!(status, 200);
        server
            .shutdown_within(Duration::from_millis(200))
            .await
            .unwrap();
        drop(stalled);
    }

    /// A request naming a host the listener was not told it goes by (a web
    /// page whose name was pointed at this machine: DNS rebinding) is
    /// refused with a 403 saying what to do; IP addresses, `localhost`,
    /// `*.localhost`, the `--allow-host` names and requests without `Host`
    /// are answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_for_a_host_name_not_allowed_is_refused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let f = fixture::Fixture::new();
        let local = LocalFiles::load(&f.cfg).expect("local files");
        let server = start_with(
            "127.0.0.1:0".parse().unwrap(),
            f.state.clone(),
            local,
            Duration::from_millis(5),
            HEADER_READ_TIMEOUT,
            &["Shop.Internal.".to_string()],
        )
        .await
        .expect("server starts");
        let port = server.addr.port();
        let ask = |host: Option<String>| async move {
            let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
            let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
            let request = format!("GET /v1/version HTTP/1.0\r\n{host}\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        for host in [
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
            "localhost".to_string(),
            format!("LOCALHOST.:{port}"),
            "shop.localhost".to_string(),
            format!("shop.internal:{port}"),
        ] {
            let answer = ask(Some(host.clone())).await;
            assert!(answer.starts_with("HTTP/1.0 200"), "{host}: {answer}");
        }
        assert!(ask(None).await.starts_with("HTTP/1.0 200"));
        for host in [
            format!("evil.example:{port}"),
            "localhost.evil.example".into(),
        ] {
            let answer = ask(Some(host.clone())).await;
            assert!(answer.starts_with("HTTP/1.0 403"), "{host}: {answer}");
            let name = host.split(':').next().unwrap();
            assert!(
                answer.contains(&format!("--allow-host {name}")) && answer.contains("\"error\""),
                "{answer}"
            );
        }
        server.shutdown().await.unwrap();
    }

    /// `rm -rf` of the state directory caught halfway (model files gone, the
    /// directory still there) is told from a new version: the reloader
    /// keeps the models loaded, as it does when the directory is gone (a
    /// poll then swapped in "no model yet" for every family, 1 in 3 tries
    /// in a probe).
    #[test]
    fn model_files_going_away_are_told_from_a_new_version() {
        let f = fixture::Fixture::new();
        let dir = f.state.path();
        let loaded = fingerprint(dir);
        f.publish(2);
        let newer = fingerprint(dir);
        assert_ne!(newer, loaded);
        assert!(!loaded.lost_in(&newer), "a new version is read");
        for meta in ["global-churn.json", "global-mf.json"] {
            std::fs::remove_file(dir.join(meta)).unwrap();
            assert!(newer.lost_in(&fingerprint(dir)), "{meta} gone");
        }
        std::fs::remove_file(dir.join("mf-users.json")).unwrap();
        assert!(newer.lost_in(&fingerprint(dir)));
    }

    /// A client that sends half a header, or nothing, is disconnected after
    /// the header read timeout (it held the connection until shutdown),
    /// and the server goes on answering others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_never_finishes_its_headers_is_disconnected() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let f = fixture::Fixture::new();
        let local = LocalFiles::load(&f.cfg).expect("local files");
        let server = start_files(&f, local, Duration::from_millis(300)).await;
        let mut half = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        for stream in [&mut half, &mut silent] {
            // The server closes it (EOF, or a reset); the outer timeout only
            // keeps a regression from hanging the suite.
            let mut buf = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut buf))
                .await
                .expect("the server closes a connection whose headers never come");
            assert!(read.is_err() || !String::from_utf8_lossy(&buf).contains("200 OK"));
        }
        let (status, _) = get(&client(), server.addr, "/healthz").await;
        assert_eq!(status, 200);
        server.shutdown().await.unwrap();
    }

    /// The export gained a customer whose first line comes before everyone
    /// else's: users are numbered in order of first appearance, so every
    /// other customer's index moved by one. The stored factors are matched
    /// by customer id, on the command line and by `serve`: each customer
    /// gets the list it got before, and the newcomer, whom no round has
    /// seen, has no factors (it had taken the first customer's).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_customer_added_to_the_export_moves_no_one_onto_anothers_factors() {
        use fedcart_common::model::mf::Rating;
        let f = fixture::Fixture::new();
        let (mf, listed, _) = fixture_recommender(&f);
        let shoppers = &f.shoppers[..4];
        let lists = |mf: &fedcart_common::model::mf::MfData| -> Vec<Vec<String>> {
            shoppers
                .iter()
                .map(|w| {
                    recommend::recommend(&f.state, mf, &listed, w, 5)
                        .unwrap()
                        .into_iter()
                        .map(|r| r.item)
                        .collect()
                })
                .collect()
        };
        let before = lists(&mf);
        let mut grown = mf.clone();
        grown.users.insert(0, "newcomer".into());
        for r in grown
            .train
            .iter_mut()
            .chain(&mut grown.valid)
            .chain(&mut grown.test)
        {
            r.user += 1;
        }
        grown.train.insert(
            0,
            Rating {
                user: 0,
                item: 0,
                value: 4.0,
            },
        );
        assert_eq!(lists(&grown), before);
        // A customer without factors gets the best sellers they have not
        // bought, and is told why.
        let answer = recommend::recommend_from(
            &f.state,
            &grown,
            &listed,
            "newcomer",
            &recommend::RecommendOptions::top(5),
        )
        .unwrap();
        assert_eq!(answer.basis, recommend::Basis::Popularity);
        let purchases = recommend::Purchases::of(&grown, listed.len()).naming(&listed);
        let best: Vec<String> = purchases
            .popular(Some(0), &listed, &recommend::RecommendOptions::top(5))
            .into_iter()
            .map(|r| r.item)
            .collect();
        let got: Vec<String> = answer.items.iter().map(|r| r.item.clone()).collect();
        assert_eq!(got, best);
        assert!(!got.contains(&listed.ids(0)[0].to_string()), "{got:?}");
        assert!(
            answer
                .note
                .as_deref()
                .unwrap()
                .contains("is in the data but not in the recommender"),
            "{:?}",
            answer.note
        );
        // The agent that restarts on the grown export puts the saved users
        // first again, so that training goes on from each one's own row.
        let saved = f.state.load_users().unwrap().unwrap();
        let mut restored = grown.clone();
        assert!(restored.adopt_user_order(&saved.users));
        assert_eq!(restored.users[..saved.users.len()], saved.users[..]);
        assert_eq!(restored.users.last().map(String::as_str), Some("newcomer"));
        assert_eq!(lists(&restored), before);
        // `serve` over a file that gained the customer: the same lists.
        let ratings = f.cfg.data.ratings_csv.clone().unwrap();
        let text = std::fs::read_to_string(&ratings).unwrap();
        let (header, rest) = text.split_once('\n').unwrap();
        let first = rest.lines().next().unwrap();
        let line = format!("999999{}", &first[first.find(',').unwrap()..]);
        let grown_file = f.dir.path().join("grown.csv");
        std::fs::write(&grown_file, format!("{header}\n{line}\n{rest}")).unwrap();
        let mut cfg = f.cfg.clone();
        cfg.data.ratings_csv = Some(grown_file);
        let local = LocalFiles::load(&cfg).expect("local files");
        let server = start_files(&f, local, HEADER_READ_TIMEOUT).await;
        for (who, want) in shoppers.iter().zip(&before) {
            let (status, body) = get(
                &client(),
                server.addr,
                &format!("/v1/customers/{who}/recommendations?k=5"),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let got: Vec<String> = body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["item"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(&got, want, "{who}");
        }
        // Known (in the export) but not in the model: the best sellers and
        // why, not the 404 of an unknown id (it read "has no trained
        // factors (k = 16)"), nor an error a shop must handle.
        let (status, body) = get(
            &client(),
            server.addr,
            "/v1/customers/999999/recommendations?k=5",
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["basis"], "popularity", "{body}");
        let why = body["note"].as_str().unwrap();
        assert!(
            why.contains("is in the data but not in the recommender")
                && why.contains("after it was trained")
                && why.contains("best sellers"),
            "{why}"
        );
        let (_, best) = get(&client(), server.addr, "/v1/best-sellers?k=6").await;
        let best: Vec<&str> = best["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["item"].as_str().unwrap())
            .collect();
        let got: Vec<&str> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["item"].as_str().unwrap())
            .collect();
        // The newcomer's one purchase is left out of their list.
        let bought = &first[first.find(',').unwrap() + 1..];
        let bought = bought.split(',').next().unwrap();
        let expected: Vec<&str> = best
            .iter()
            .copied()
            .filter(|i| *i != bought)
            .take(5)
            .collect();
        assert_eq!(got, expected);
        let (_, shopper) = get(
            &client(),
            server.addr,
            &format!("/v1/customers/{}/recommendations?k=5", shoppers[0]),
        )
        .await;
        assert_eq!(shopper["basis"], "model", "{shopper}");
        assert!(shopper.get("note").is_none(), "{shopper}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_personalised_copy_is_served_where_it_won_and_the_global_one_otherwise() {
        use crate::state::PersonalMeta;
        let f = fixture::Fixture::new();
        let who = f.shoppers[5].clone();
        let (mf, listed, _) = fixture_recommender(&f);
        let opts = recommend::RecommendOptions::top(10);
        let cli = || {
            let answer = recommend::recommend_from(&f.state, &mf, &listed, &who, &opts).unwrap();
            let ids: Vec<String> = answer.items.into_iter().map(|r| r.item).collect();
            assert_eq!(answer.version.run_id, "fixture");
            (ids, answer.version.version, answer.copy)
        };
        let (global_list, version, copy) = cli();
        assert_eq!((version, copy), (1, recommend::ServedCopy::Global));
        // A fine-tuned copy of version 1 that won on validation.
        let (_, params) = f.state.load_global("mf").unwrap().unwrap();
        let tuned = fedcart_common::model::mf::initial_params(
            (params.len() - 1) / (fixture::FACTORS + 1),
            fixture::FACTORS,
            0.1,
            99,
        );
        let mut users = f.state.load_users().unwrap().unwrap();
        users.factors.iter_mut().for_each(|v| *v = -*v);
        let meta = |version, kept| PersonalMeta {
            run_id: "fixture".into(),
            version,
            kept,
            metric: "val_rmse".into(),
            global_val: Some(0.9),
            personal_val: Some(if kept { 0.8 } else { 1.0 }),
            epochs: 5,
            proximal: 0.1,
            sha256: None,
        };
        f.state
            .save_personal(&meta(1, true), Some((&tuned, &users)))
            .unwrap();
        let (personal_list, version, copy) = cli();
        assert_eq!((version, copy), (1, recommend::ServedCopy::Personalised));
        assert_ne!(personal_list, global_list, "the copy ranks differently");
        // A freshly started server (as after a restart) serves it too, and
        // says which copy answered.
        let server = start_fixture(&f).await;
        let (status, body) = get(
            &client(),
            server.addr,
            &format!("/v1/customers/{who}/recommendations?k=10"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["model_copy"], "personalised");
        let api: Vec<String> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["item"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(api, personal_list);
        server.shutdown().await.unwrap();
        // A copy that lost on validation, or one of another version, is
        // not served.
        f.state.save_personal(&meta(1, false), None).unwrap();
        assert_eq!(
            cli(),
            (global_list.clone(), 1, recommend::ServedCopy::Global)
        );
        f.state
            .save_personal(&meta(0, true), Some((&tuned, &users)))
            .unwrap();
        assert_eq!(cli(), (global_list, 1, recommend::ServedCopy::Global));
        assert_eq!(served_ids(&f, &who).await, cli().0);
    }

    use fedcart_common::data::tabular::Schema;
}
