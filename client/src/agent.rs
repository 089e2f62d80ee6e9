//! The merchant agent's session loop: join, receive pushed tasks, download
//! the global model, train locally, upload the update; reconnect with
//! backoff whenever the coordinator goes away.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fedcart_common::task::TaskSpec;
use fedcart_common::train::{LocalData, run_task};
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::config::Backoff;
use crate::secure::SecureError;
use crate::state::StateError;
use crate::transfer::{TransferError, download, upload};

/// Why a session with the coordinator ended in failure.
///
/// The variants fall into four groups: the agent's own setup (bad URL, TLS
/// configuration, local state), transport (connecting, silence, broken
/// streams), protocol (the coordinator refused us or sent something
/// unexpected) and task failures. [`AgentError::is_permanent`] tells the
/// ones that retrying cannot fix from the transient ones.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The coordinator URL does not parse.
    #[error("coordinator address `{url}`")]
    BadUrl {
        /// The configured URL.
        url: String,
        /// The parser's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The TLS configuration was refused by the transport.
    #[error("TLS configuration")]
    Tls(#[source] tonic::transport::Error),
    /// No connection could be made (or the TLS handshake failed).
    #[error("connecting to {url}")]
    Connect {
        /// The coordinator URL.
        url: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The coordinator refused the `Join` call: e.g. a revoked or unknown
    /// merchant, a certificate naming another merchant, an invalid id.
    #[error("join")]
    Join(#[source] tonic::Status),
    /// The work stream failed before its first message.
    #[error("reading welcome")]
    Welcome(#[source] tonic::Status),
    /// The first message of the work stream was not a welcome.
    #[error("coordinator did not send a welcome")]
    NoWelcome,
    /// A second welcome arrived on the same work stream.
    #[error("unexpected second welcome")]
    SecondWelcome,
    /// Nothing (not even a ping) arrived for three ping intervals.
    #[error("no message from the coordinator for {0:?}")]
    Silence(Duration),
    /// The work stream broke.
    #[error("work stream failed")]
    Stream(#[source] tonic::Status),
    /// The coordinator ended the work stream.
    #[error("coordinator closed the work stream")]
    StreamClosed,
    /// The embedder's [`TaskObserver`] asked the agent to leave this task
    /// (e.g. a simulated drop-out).
    #[error("abandoned task `{task_id}` (asked by the observer)")]
    Abandoned {
        /// The task left unanswered.
        task_id: String,
    },
    /// A pushed task carried a spec this agent cannot decode.
    #[error("task `{task_id}`: undecodable spec")]
    Spec {
        /// The task.
        task_id: String,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// Downloading the model or uploading the update failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// A secure-aggregation answer could not be delivered.
    #[error(transparent)]
    Secure(#[from] SecureError),
    /// The local training task panicked.
    #[error("training task panicked")]
    TaskPanicked(#[source] tokio::task::JoinError),
    /// The local state could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
}

impl AgentError {
    /// True for failures that reconnecting cannot fix: a malformed URL, a
    /// TLS configuration the transport refuses, and a join refused for who
    /// the merchant is (revoked, not allowed, identity mismatch, invalid id,
    /// no usable certificate). Everything else may heal on retry.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::BadUrl { .. } | Self::Tls(_) => true,
            Self::Join(status) => matches!(
                status.code(),
                tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::InvalidArgument
            ),
            _ => false,
        }
    }
}

/// Displays an error with its chain of sources, `outer: inner: …`, the way
/// the session loop logs them.
struct Chain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Our own shutdown signal fired.
    Shutdown,
}

/// The agent: local data plus how to reach the coordinator.
pub struct Agent {
    /// Coordinator URL.
    pub coordinator: String,
    /// The merchant's local data and private state.
    pub data: LocalData,
    /// Reconnection backoff.
    pub backoff: Backoff,
    /// Counts of completed tasks, for logs and tests.
    pub tasks_done: u64,
    /// Mutual TLS; `None` speaks plaintext (only to an `--insecure` coordinator).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Durable local state; `None` keeps everything in memory.
    pub state: Option<crate::state::StateDir>,
    /// Told about every pushed task before the agent works on it; `None` (the
    /// default, and every production agent) accepts every task. See
    /// [`TaskObserver`].
    pub observer: Option<Arc<dyn TaskObserver>>,
    /// The update of a secure task, held until its masked input is asked for.
    secure: crate::secure::SecureTasks,
}

/// What an agent does with a pushed task, as a [`TaskObserver`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskDecision {
    /// Work on the task as usual.
    Accept,
    /// Leave the task unanswered the way a merchant whose machine went away
    /// does: the session ends and the agent reconnects with backoff, so the
    /// coordinator counts it as a dropout.
    Abandon,
}

/// A seam for embedders of the agent (tests, fleet tools, the simulator's
/// gRPC transport): watches each pushed task and may make the agent abandon
/// it, e.g. to inject dropouts reproducibly.
pub trait TaskObserver: Send + Sync {
    /// Called with each pushed task's id, before its model is downloaded.
    fn on_task(&self, task_id: &str) -> TaskDecision;
}

impl Agent {
    /// Keeps state in `state`, restoring the private user factors saved there.
    pub fn with_state(mut self, state: crate::state::StateDir) -> Result<Self, StateError> {
        if let (Some(mf), Some(users)) = (&mut self.data.mf, state.load_users()?) {
            mf.state = users;
        }
        self.state = Some(state);
        Ok(self)
    }

    /// An agent for `data` that talks to `coordinator`.
    pub fn new(coordinator: impl Into<String>, data: LocalData) -> Self {
        Self {
            coordinator: coordinator.into(),
            data,
            backoff: Backoff::default(),
            tasks_done: 0,
            tls: None,
            state: None,
            observer: None,
            secure: Default::default(),
        }
    }

    /// Checks every task against `policy` (see [`crate::policy`]).
    pub fn with_policy(mut self, policy: crate::policy::PrivacyPolicy) -> Self {
        self.secure.set_policy(policy);
        self
    }

    /// Binds this agent's secure-aggregation keys to its certificate and
    /// checks its peers' (see [`crate::secure`]); required for secure rounds
    /// unless the policy's `require_key_binding` is off.
    pub fn with_key_identity(mut self, identity: crate::tls::KeyIdentity) -> Self {
        self.secure.set_identity(identity);
        self
    }

    /// Runs sessions until `shutdown` becomes true, reconnecting with
    /// exponential backoff after every failure. Today every failure is
    /// logged and retried, so this returns `Ok`; the `Result` leaves room to
    /// stop on errors for which [`AgentError::is_permanent`] holds.
    pub async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        let mut wait = Duration::from_millis(self.backoff.initial_ms);
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let done_before = self.tasks_done;
            let span = tracing::info_span!("session", merchant = %self.data.merchant_id);
            match self.session(&mut shutdown).instrument(span).await {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Err(e) => {
                    if self.tasks_done > done_before {
                        wait = Duration::from_millis(self.backoff.initial_ms);
                    }
                    tracing::warn!(merchant = %self.data.merchant_id, error = %Chain(&e), retry_in = ?wait, "session ended");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return Ok(()),
            }
            wait = (wait * 2).min(Duration::from_millis(self.backoff.max_ms));
        }
    }

    async fn connect(&self) -> Result<CoordinatorClient<Channel>, AgentError> {
        let mut endpoint = Endpoint::from_shared(self.coordinator.clone()).map_err(|source| {
            AgentError::BadUrl {
                url: self.coordinator.clone(),
                source,
            }
        })?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(AgentError::Tls)?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .connect()
            .await
            .map_err(|source| AgentError::Connect {
                url: self.coordinator.clone(),
                source,
            })?;
        Ok(CoordinatorClient::new(channel).max_decoding_message_size(4 << 20))
    }

    /// One session: join and serve tasks until the stream breaks.
    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<SessionEnd, AgentError> {
        let mut client = self.connect().await?;
        let examples: HashMap<String, u64> = self.data.examples().into_iter().collect();
        let join = pb::JoinRequest {
            merchant_id: self.data.merchant_id.clone(),
            examples,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        let mut work = client
            .join(join)
            .await
            .map_err(AgentError::Join)?
            .into_inner();
        let first = work.message().await.map_err(AgentError::Welcome)?;
        let Some(pb::Work {
            kind: Some(pb::work::Kind::Welcome(welcome)),
        }) = first
        else {
            return Err(AgentError::NoWelcome);
        };
        tracing::info!(merchant = %self.data.merchant_id, run = %welcome.run_id, "joined");
        // Three missed pings mean the connection is dead even if TCP has not noticed.
        let silence = Duration::from_millis(welcome.ping_interval_ms.max(100) * 3);
        loop {
            let next = tokio::select! {
                m = tokio::time::timeout(silence, work.message()) => m,
                _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
            };
            let msg = match next {
                Err(_) => return Err(AgentError::Silence(silence)),
                Ok(Err(status)) => return Err(AgentError::Stream(status)),
                Ok(Ok(None)) => return Err(AgentError::StreamClosed),
                Ok(Ok(Some(m))) => m,
            };
            match msg.kind {
                Some(pb::work::Kind::Task(task)) => {
                    if self
                        .observer
                        .as_ref()
                        .is_some_and(|o| o.on_task(&task.task_id) == TaskDecision::Abandon)
                    {
                        return Err(AgentError::Abandoned {
                            task_id: task.task_id,
                        });
                    }
                    self.handle_task(&mut client, &welcome.session_id, task)
                        .await?;
                    self.tasks_done += 1;
                }
                Some(pb::work::Kind::Ping(_)) | None => {}
                Some(pb::work::Kind::Welcome(_)) => return Err(AgentError::SecondWelcome),
                Some(pb::work::Kind::Secagg(req)) => {
                    self.secure
                        .handle(&mut client, &welcome.session_id, req)
                        .await?;
                }
            }
        }
    }

    async fn handle_task(
        &mut self,
        client: &mut CoordinatorClient<Channel>,
        session_id: &str,
        task: pb::TaskAssignment,
    ) -> Result<(), AgentError> {
        let spec: TaskSpec =
            serde_json::from_slice(&task.spec_json).map_err(|source| AgentError::Spec {
                task_id: task.task_id.clone(),
                source,
            })?;
        if let Err(v) = self
            .secure
            .policy()
            .check_task(&spec, task.secure_aggregation)
        {
            // Nothing is downloaded, trained or sent: the coordinator counts
            // this agent as missing from the task.
            tracing::warn!(
                task = %task.task_id,
                setting = %format_args!("privacy.{}", v.setting),
                task_value = %v.task,
                policy_value = %v.policy,
                "{v}"
            );
            return Ok(());
        }
        let global = if task.model_len > 0 {
            download(client, session_id, &task).await?
        } else {
            Vec::new()
        };
        if let Some(state) = &self.state
            && !global.is_empty()
        {
            let meta = crate::state::GlobalMeta {
                run_id: task.run_id.clone(),
                version: task.model_version,
                spec: spec.clone(),
                sha256: None,
            };
            state.save_global(&meta, &global)?;
        }
        let family = spec.model.data_family();
        let seed = spec.seed;
        let noise = spec.dp.as_ref().and_then(|d| d.distributed);
        // Under differential privacy the example count is private (see
        // `fedcart_common::privacy::dp::clip`): the clear-text header of a
        // training or evaluation result carries weight 1, not the row count.
        // The statistics step still needs its row counts (they are its sum's
        // denominator) and sends them under its own protection.
        let hide_count = spec.dp.is_some() && spec.kind != fedcart_common::task::TaskKind::Stats;
        let data = std::mem::take(&mut self.data);
        let (data, out) = tokio::task::spawn_blocking(move || {
            let mut data = data;
            let out = run_task(&spec, &global, &mut data);
            (data, out)
        })
        .await
        .map_err(AgentError::TaskPanicked)?;
        self.data = data;
        let out = out.map(|mut out| {
            if hide_count {
                out.weight = 1.0;
            }
            out
        });
        if let (Some(state), Ok(out)) = (&self.state, &out) {
            if let Some(mf) = &self.data.mf {
                state.save_users(&mf.state)?;
            }
            state.save_metrics(family, &out.metrics)?;
        }
        match out {
            // Under secure aggregation the update waits for the protocol's
            // masked-input stage (see `secure`); nothing is sent in the clear.
            Ok(out) if task.secure_aggregation => {
                self.secure
                    .hold(&task, seed, &self.data.merchant_id, noise, out);
                Ok(())
            }
            Ok(out) => Ok(upload(client, session_id, &task, &out).await?),
            Err(e) => {
                // Nothing is sent: the coordinator counts us as missing.
                tracing::error!(task = %task.task_id, error = %e, "local task failed");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_and_identity_refusals_are_permanent_and_lost_connections_are_not() {
        let url = "not a url".to_string();
        let source = Endpoint::from_shared(url.clone()).unwrap_err();
        assert!(AgentError::BadUrl { url, source }.is_permanent());
        let revoked = tonic::Status::permission_denied("merchant `m0` is revoked");
        assert!(AgentError::Join(revoked).is_permanent());
        assert!(!AgentError::Join(tonic::Status::unavailable("restarting")).is_permanent());
        assert!(!AgentError::Stream(tonic::Status::cancelled("gone")).is_permanent());
        assert!(!AgentError::Silence(Duration::from_secs(3)).is_permanent());
    }

    #[test]
    fn the_session_log_shows_the_whole_source_chain() {
        let err = AgentError::Join(tonic::Status::permission_denied("merchant `m0` is revoked"));
        let shown = Chain(&err).to_string();
        assert!(shown.starts_with("join: "), "{shown}");
        assert!(shown.contains("merchant `m0` is revoked"), "{shown}");
    }
}
