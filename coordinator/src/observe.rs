//! Observability over HTTP: Prometheus `/metrics`, `/healthz` and `/readyz`,
//! `/api/status` (JSON) and the web dashboard at `/`.
//!
//! Metrics are derived from what the coordinator already records: an
//! observer task follows the progress channel and folds every new history
//! record into counters, so the round engine and service need no metric
//! calls. Every series carries a `run` label: every run the coordinator
//! hosts is folded, and coordinators in one process (tests) stay apart. Round metrics reported by agents become at
//! most [`MAX_METRIC_SERIES`] `fedcart_round_metric` series per run, whatever
//! names agents invent. `/readyz` is false while shutting down and once the
//! task loop has failed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::record::{Outcome, RoundRecord, kind_name};
use crate::service::Shared;
pub use fedcart_common::http::HEADER_READ_TIMEOUT;

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (embedding); then our
        // series are simply not collected, and /metrics renders empty.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// The `# HELP` line of every family `/metrics` exports.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "fedcart_agents_connected",
        "Agents connected that can serve the run"
    );
    describe_gauge!(
        "fedcart_model_version",
        "The run's latest committed model version"
    );
    describe_gauge!(
        "fedcart_round_metric",
        "The latest committed round's pooled metric, per task kind (NaN: not measured in that round)"
    );
    describe_gauge!(
        "fedcart_dp_epsilon",
        "Differential-privacy epsilon spent by the run so far"
    );
    describe_gauge!(
        "fedcart_secagg_clipped_fraction",
        "Fraction of update values secure aggregation clipped in the last round"
    );
    describe_counter!(
        "fedcart_tasks_started_total",
        "Tasks (statistics, training, evaluation) started"
    );
    describe_counter!("fedcart_rounds_committed_total", "Tasks committed");
    describe_counter!(
        "fedcart_rounds_aborted_total",
        "Tasks aborted (fewer results than the quorum by the deadline)"
    );
    describe_counter!(
        "fedcart_agents_selected_total",
        "Agents selected, summed over tasks"
    );
    describe_counter!(
        "fedcart_agents_reported_total",
        "Agents whose result arrived, summed over tasks"
    );
    describe_counter!(
        "fedcart_agents_dropped_total",
        "Selected agents that sent no result, summed over tasks"
    );
    describe_counter!(
        "fedcart_updates_rejected_total",
        "Results refused (malformed, non-finite, out of range)"
    );
    describe_counter!("fedcart_update_bytes_in_total", "Bytes of results received");
    describe_histogram!(
        "fedcart_task_duration_seconds",
        metrics::Unit::Seconds,
        "Time from a task's start to its close"
    );
}

/// Most distinct (kind, metric name) series of `fedcart_round_metric` per
/// run: metric names come from agents, and each name is a Prometheus series
/// kept for the life of the process. Names beyond the cap are not exported.
pub const MAX_METRIC_SERIES: usize = 64;

/// An agent as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    /// Merchant id.
    pub merchant: String,
    /// Connected now.
    pub connected: bool,
    /// Last time we heard from it (join or accepted result), ms since epoch.
    pub last_contact_unix_ms: i64,
    /// Tasks it was selected for (over the stored history).
    pub selected: u64,
    /// Results accepted from it.
    pub reported: u64,
    /// Tasks it was selected for but left unanswered (disconnected, late).
    pub dropped: u64,
    /// Results refused (invalid, non-finite, out of policy).
    pub rejected: u64,
}

impl AgentView {
    fn new(merchant: String, connected: bool, at: i64) -> Self {
        Self {
            merchant,
            connected,
            last_contact_unix_ms: at,
            selected: 0,
            reported: 0,
            dropped: 0,
            rejected: 0,
        }
    }
}

/// History records `/api/status` sends when the request names no page.
pub const HISTORY_PAGE: usize = 50;

/// Most history records one `/api/status` answer holds.
pub const MAX_HISTORY_PAGE: usize = 500;

/// The differential-privacy spend the dashboard shows.
#[derive(Debug, Clone, Serialize)]
pub struct PrivacyView {
    /// ε spent so far (at `delta`), from the last committed training round.
    pub epsilon: f64,
    /// The run's ε budget, if it has one.
    pub budget: Option<f64>,
    /// δ of the guarantee.
    pub delta: f64,
}

/// The JSON of `/api/status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// Run id.
    pub run_id: String,
    /// Latest committed model version.
    pub model_version: u64,
    /// The open task, if any.
    pub open_task: Option<String>,
    /// True once every round is done.
    pub finished: bool,
    /// Training rounds the run has (the model version it ends at).
    pub rounds: u64,
    /// Merchants connected now.
    pub connected: usize,
    /// Merchants a task needs before it can start (`selection.min_agents`,
    /// at least `selection.min_available`): with fewer connected the run
    /// waits.
    pub needed: usize,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    /// ε spent against the budget, when the run has differential privacy.
    pub privacy: Option<PrivacyView>,
    /// Known agents, with their participation over the stored history.
    pub agents: Vec<AgentView>,
    /// Records in the whole history.
    pub history_total: usize,
    /// Index (from 0, oldest first) of `history`'s first record.
    pub history_offset: usize,
    /// One page of the history, oldest first: `?since=N&limit=L` (records
    /// N.., at most L ≤ 500), by default the last 50.
    pub history: Vec<RoundRecord>,
    /// Every run the coordinator hosts, active and finished, in submission
    /// order (the fields above describe `run_id`: the one asked for with
    /// `?run=ID`, else the one the coordinator was started with).
    pub runs: Vec<crate::service::hub::RunSummary>,
}

/// The page `/api/status` answers with (another parameter is refused).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryPage {
    /// First record wanted (default: the last [`HISTORY_PAGE`]).
    pub since: Option<usize>,
    /// Records wanted (default [`HISTORY_PAGE`], at most [`MAX_HISTORY_PAGE`]).
    pub limit: Option<usize>,
    /// The run to describe (`?run=ID`; default the one the coordinator was
    /// started with).
    pub run: Option<String>,
}

struct ObserverState {
    shared: Arc<Shared>,
    hub: Arc<crate::service::hub::Hub>,
    run_id: String,
    /// Per run, its merchants' participation (connection is shared).
    agents: Mutex<BTreeMap<String, BTreeMap<String, AgentView>>>,
    /// Per run: history records folded into counters so far, the last open
    /// task, and `Progress::records` when the history was last read.
    cursor: Mutex<BTreeMap<String, RunCursor>>,
    /// Per run, the (kind, name) pairs exported as `fedcart_round_metric`.
    series: Mutex<BTreeMap<String, BTreeSet<(&'static str, String)>>>,
    ready: watch::Receiver<bool>,
}

/// How far the observer has folded one run.
#[derive(Default)]
struct RunCursor {
    records: usize,
    /// Tasks counted as started while open and not yet in the history:
    /// each task counts once, seen open or only once it closed (a run the
    /// observer does not wake for opens and closes tasks between looks).
    counted_open: BTreeSet<String>,
    progress: Option<u64>,
}

/// The view of merchant `m`, created (disconnected, last seen `at`) if new.
fn view<'a>(agents: &'a mut BTreeMap<String, AgentView>, m: &str, at: i64) -> &'a mut AgentView {
    agents
        .entry(m.to_owned())
        .or_insert_with(|| AgentView::new(m.to_owned(), false, at))
}

/// Folds one history record into its merchants' views.
fn fold_agents(agents: &mut BTreeMap<String, AgentView>, r: &crate::record::RoundRecord) {
    // A task lost to a coordinator restart is recorded at the restart, with
    // its survivors as reporting: that time is no contact of theirs (a
    // merchant gone for good read as heard from at the restart; found by a
    // fault probe). A merchant first seen in it is shown at the restart,
    // the latest it can have been heard from.
    let lost = crate::engine::unmask::is_lost(r);
    let at = r.started_unix_ms + r.duration_ms as i64;
    for m in &r.selected {
        view(agents, m, at).selected += 1;
    }
    for m in &r.reported {
        let v = view(agents, m, at);
        v.reported += 1;
        if !lost {
            v.last_contact_unix_ms = v.last_contact_unix_ms.max(at);
        }
    }
    for m in &r.dropped {
        view(agents, m, at).dropped += 1;
    }
    for m in &r.refused {
        view(agents, m, at).rejected += 1;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl ObserverState {
    fn status(&self, page: HistoryPage) -> Result<StatusView, (StatusCode, String)> {
        self.observe();
        let (run_id, shared) = match &page.run {
            Some(id) => (
                id.clone(),
                self.hub
                    .get(id)
                    .map_err(|e| (StatusCode::NOT_FOUND, e.to_string()))?,
            ),
            None => (self.run_id.clone(), Arc::clone(&self.shared)),
        };
        let p = shared.progress().borrow().clone();
        let history = shared
            .history()
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let run = shared.run_config();
        let total = history.len();
        let limit = page.limit.unwrap_or(HISTORY_PAGE).min(MAX_HISTORY_PAGE);
        let offset = page.since.unwrap_or(total.saturating_sub(limit)).min(total);
        let privacy = history
            .iter()
            .rev()
            .find_map(|r| r.privacy.as_ref())
            .map(|pr| PrivacyView {
                epsilon: pr.epsilon,
                budget: run.dp.as_ref().and_then(|d| d.target_epsilon),
                delta: pr.delta,
            })
            .or_else(|| {
                run.dp.as_ref().map(|d| PrivacyView {
                    epsilon: 0.0,
                    budget: d.target_epsilon,
                    delta: d.delta,
                })
            });
        Ok(StatusView {
            run_id,
            model_version: p.version,
            open_task: p.open_task,
            finished: p.finished,
            rounds: run.rounds,
            connected: p.agents,
            needed: run.selection.min_agents.max(run.selection.min_available),
            stopped: p.stopped,
            privacy,
            agents: self
                .agents
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&run.run_id)
                .map(|a| a.values().cloned().collect())
                .unwrap_or_default(),
            history_total: total,
            history_offset: offset,
            history: history.into_iter().skip(offset).take(limit).collect(),
            runs: self.hub.summaries(),
        })
    }

    /// Folds everything new since the last call into gauges, counters and
    /// agent views. Runs on every progress change and before each scrape, so
    /// a scrape never lags the history.
    fn observe(&self) {
        let mut cursors = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        // Sessions are shared by every run.
        let connected = self.shared.connected();
        let mut all = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        for (run, shared) in self.hub.runs() {
            let agents = all.entry(run.clone()).or_default();
            for a in agents.values_mut() {
                a.connected = false;
            }
            for m in &connected {
                let view = agents
                    .entry(m.clone())
                    .or_insert_with(|| AgentView::new(m.clone(), true, now_ms()));
                view.connected = true;
            }
            let cursor = cursors.entry(run.clone()).or_default();
            self.observe_run(&run, &shared, cursor, agents);
        }
    }

    /// Folds what is new in one run into its series (each labelled `run`).
    fn observe_run(
        &self,
        run: &str,
        shared: &Shared,
        cursor: &mut RunCursor,
        agents: &mut BTreeMap<String, AgentView>,
    ) {
        let run = run.to_owned();
        let p = shared.progress().borrow().clone();
        metrics::gauge!("fedcart_model_version", "run" => run.clone()).set(p.version as f64);
        metrics::gauge!("fedcart_agents_connected", "run" => run.clone()).set(p.agents as f64);
        if let Some(t) = &p.open_task
            && cursor.counted_open.insert(t.clone())
        {
            metrics::counter!("fedcart_tasks_started_total", "run" => run.clone()).increment(1);
        }
        // The history (read from the store under the engine's lock) changes
        // only when a task closes: re-read it only then, not on each of the
        // thousands of progress changes a round of many agents makes.
        if cursor.progress == Some(p.records) {
            return;
        }
        let Ok(history) = shared.history() else {
            return;
        };
        cursor.progress = Some(p.records);
        for r in history.iter().skip(cursor.records) {
            if !cursor.counted_open.remove(&r.task_id) {
                metrics::counter!("fedcart_tasks_started_total", "run" => run.clone()).increment(1);
            }
            let labels = [
                ("run", run.clone()),
                ("kind", kind_name(r.kind).to_string()),
            ];
            let outcome = match r.outcome {
                Outcome::Committed => "committed",
                Outcome::Aborted => "aborted",
            };
            metrics::counter!(format!("fedcart_rounds_{outcome}_total"), &labels).increment(1);
            metrics::counter!("fedcart_agents_selected_total", &labels)
                .increment(r.selected.len() as u64);
            metrics::counter!("fedcart_agents_reported_total", &labels)
                .increment(r.reported.len() as u64);
            metrics::counter!("fedcart_agents_dropped_total", &labels)
                .increment(r.dropped.len() as u64);
            // Refused updates only: a merchant that declined a task by its
            // privacy policy sent nothing to refuse (it is a dropout).
            metrics::counter!("fedcart_updates_rejected_total", &labels)
                .increment(r.refused.len() as u64);
            metrics::counter!("fedcart_update_bytes_in_total", &labels).increment(r.bytes_in);
            metrics::histogram!("fedcart_task_duration_seconds", &labels)
                .record(r.duration_ms as f64 / 1000.0);
            // ε after every released round (README: "shown in /metrics").
            if let Some(p) = &r.privacy {
                metrics::gauge!("fedcart_dp_epsilon", "run" => run.clone()).set(p.epsilon);
            }
            if let Some(c) = &r.secagg_clipped {
                metrics::gauge!("fedcart_secagg_clipped_fraction", &labels).set(c.fraction);
            }
            let mut all_series = self.series.lock().unwrap_or_else(|p| p.into_inner());
            let series = all_series.entry(run.clone()).or_default();
            for (k, v) in &r.metrics {
                let key = (kind_name(r.kind), k.clone());
                if !series.contains(&key) {
                    if series.len() >= MAX_METRIC_SERIES {
                        continue;
                    }
                    series.insert(key);
                }
                metrics::gauge!("fedcart_round_metric", "run" => run.clone(), "kind" => kind_name(r.kind), "metric" => k.clone()).set(*v);
            }
            // A metric of this kind the record does not have (undefined in
            // this round, e.g. a precision without positive predictions) is
            // NaN, not the figure of an earlier round beside this round's.
            if r.outcome == crate::record::Outcome::Committed && !r.metrics.is_empty() {
                for (kind, k) in series.iter() {
                    if *kind == kind_name(r.kind) && !r.metrics.contains_key(k) {
                        metrics::gauge!("fedcart_round_metric", "run" => run.clone(), "kind" => *kind, "metric" => k.clone()).set(f64::NAN);
                    }
                }
            }
            drop(all_series);
            fold_agents(agents, r);
        }
        cursor.records = history.len();
    }
}

/// The HTTP routes' view of the observer: a `Weak`, so that a connection
/// left open (or a request in flight) past shutdown keeps nothing open, the
/// store least of all. Once the observer is gone every route answers 503.
type StateRef = std::sync::Weak<ObserverState>;

/// The 503 of a coordinator shutting down (the observer is gone).
fn gone() -> axum::response::Response {
    (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
}

async fn metrics_page(State(s): State<StateRef>) -> axum::response::Response {
    let Some(s) = s.upgrade() else {
        return gone();
    };
    s.observe();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus().render(),
    )
        .into_response()
}

async fn ready(State(s): State<StateRef>) -> axum::response::Response {
    let Some(s) = s.upgrade() else {
        return gone();
    };
    if *s.ready.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if s.hub.failed().is_some() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the task loop failed; see the coordinator's log",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready").into_response()
    }
}

async fn status(
    State(s): State<StateRef>,
    axum::extract::Query(page): axum::extract::Query<HistoryPage>,
) -> axum::response::Response {
    let Some(s) = s.upgrade() else {
        return gone();
    };
    match s.status(page) {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Under `/api/`, every error answers `{"error": …}` JSON, as the API's
/// answers are JSON: axum's own refusals (a malformed or unknown query
/// parameter, a method the route does not take, no such route) and the
/// handlers' text ones are rewritten, status and headers kept. The other
/// routes (`/metrics`, the probes, the page) keep their text.
async fn api_errors_as_json(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let api = req.uri().path().starts_with("/api");
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !api || is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let mut json = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    json
}

/// The dashboard page: one self-contained HTML file, no external resources.
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// The metrics observer and the HTTP listener, as [`spawn`] started them.
pub struct Observer {
    /// The HTTP listener's address, when there is one.
    pub http_addr: Option<SocketAddr>,
    /// The observer's task: it holds the only strong reference to the state
    /// the HTTP routes read (the run, the hub and through them the store),
    /// so once it has ended no route holds the store open. The HTTP
    /// listener itself is not joined: its connections close on shutdown or,
    /// a client stalled mid-request, after [`HEADER_READ_TIMEOUT`], and hold
    /// nothing in the meantime.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the metrics observer and, when `http` is given, the HTTP listener.
/// Both stop when `shutdown` turns true.
pub fn spawn(
    shared: Arc<Shared>,
    hub: Arc<crate::service::hub::Hub>,
    run_id: String,
    http: Option<TcpListener>,
    token: Option<crate::http_auth::OperatorToken>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Observer> {
    prometheus();
    let state = Arc::new(ObserverState {
        shared,
        hub,
        run_id,
        agents: Mutex::new(BTreeMap::new()),
        cursor: Mutex::new(BTreeMap::new()),
        series: Mutex::new(BTreeMap::new()),
        ready: shutdown.clone(),
    });
    let routes = Arc::downgrade(&state);
    let obs = state;
    let mut stop = shutdown.clone();
    let task = tokio::spawn(async move {
        let mut progress = obs.shared.progress();
        loop {
            obs.observe();
            tokio::select! {
                r = progress.changed() => if r.is_err() { break },
                _ = stop.wait_for(|v| *v) => break,
            }
        }
        obs.observe();
    });
    let Some(listener) = http else {
        return Ok(Observer {
            http_addr: None,
            task,
        });
    };
    let addr = listener.local_addr().context("HTTP listener address")?;
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { Html(DASHBOARD_HTML) }))
        .route("/metrics", axum::routing::get(metrics_page))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(ready))
        .route("/api/status", axum::routing::get(status))
        .with_state(routes);
    let app = match token {
        Some(t) => app.layer(axum::middleware::from_fn_with_state(
            Arc::new(t),
            crate::http_auth::require_operator,
        )),
        None => {
            tracing::warn!(
                %addr,
                "the HTTP listener has no operator token: run data is readable by anyone who \
                 reaches it (development only)"
            );
            app
        }
    };
    // Outermost, so that the token's refusals are JSON under /api too.
    let app = app.layer(axum::middleware::from_fn(api_errors_as_json));
    tokio::spawn(async move {
        let served =
            fedcart_common::http::serve(listener, app, HEADER_READ_TIMEOUT, shutdown).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP listener failed");
        }
    });
    tracing::info!(%addr, "serving /metrics and the dashboard");
    Ok(Observer {
        http_addr: Some(addr),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Outcome, RoundRecord};
    use fedcart_common::task::TaskKind;

    fn record(task: &str, at: i64, reported: &[&str], abort: Option<&str>) -> RoundRecord {
        let names = |v: &[&str]| v.iter().map(|m| m.to_string()).collect::<Vec<_>>();
        RoundRecord {
            round: 1,
            attempt: 1,
            task_id: task.into(),
            kind: TaskKind::Train,
            outcome: if abort.is_some() {
                Outcome::Aborted
            } else {
                Outcome::Committed
            },
            base_version: 0,
            selected: names(&["m0", "m1"]),
            reported: names(reported),
            dropped: names(&["m0", "m1"][reported.len()..]),
            rejected: vec![],
            refused: vec![],
            metrics: Default::default(),
            examples: 1.0,
            started_unix_ms: at,
            duration_ms: 10,
            bytes_in: 0,
            abort_reason: abort.map(str::to_string),
            privacy: None,
            secagg_clipped: None,
            sampled: false,
            seen_by: None,
        }
    }

    /// The record of a task lost to a coordinator restart counts its
    /// merchants' participation, but its time (the restart's) is nobody's
    /// contact; a committed task's is.
    #[test]
    fn a_task_lost_to_a_restart_is_no_contact_of_its_merchants() {
        let mut agents = BTreeMap::new();
        fold_agents(
            &mut agents,
            &record("r1a1-train", 1_000, &["m0", "m1"], None),
        );
        for reason in [
            crate::engine::unmask::LOST,
            crate::engine::unmask::LOST_ACCOUNTED,
        ] {
            fold_agents(
                &mut agents,
                &record("r2a1-train", 9_000, &["m0", "m1"], Some(reason)),
            );
        }
        for m in ["m0", "m1"] {
            let v = &agents[m];
            assert_eq!(
                (v.selected, v.reported, v.last_contact_unix_ms),
                (3, 3, 1_010),
                "{m}"
            );
        }
        // A task aborted for another cause was answered: its reports count.
        fold_agents(
            &mut agents,
            &record("r2a2-train", 20_000, &["m0"], Some("too few")),
        );
        assert_eq!(agents["m0"].last_contact_unix_ms, 20_010);
        assert_eq!(
            (agents["m1"].last_contact_unix_ms, agents["m1"].dropped),
            (1_010, 1)
        );
    }
}
