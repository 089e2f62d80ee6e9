//! The merchant agent's session loop: join, receive pushed tasks, download
//! the global model, train locally, upload the update; reconnect with
//! backoff whenever the coordinator goes away.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fedcart_common::task::TaskSpec;
use fedcart_common::train::{LocalData, TaskOutput, run_task};
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::config::Backoff;

/// Bytes per upload chunk: well below gRPC's 4 MiB default message limit.
pub const UPLOAD_CHUNK_BYTES: usize = 1 << 20;

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
    pub fn with_state(mut self, state: crate::state::StateDir) -> anyhow::Result<Self> {
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

    /// Runs sessions until `shutdown` becomes true, reconnecting with
    /// exponential backoff after every failure.
    pub async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
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
                    tracing::warn!(merchant = %self.data.merchant_id, error = %format!("{e:#}"), retry_in = ?wait, "session ended");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return Ok(()),
            }
            wait = (wait * 2).min(Duration::from_millis(self.backoff.max_ms));
        }
    }

    async fn connect(&self) -> anyhow::Result<CoordinatorClient<Channel>> {
        let mut endpoint = Endpoint::from_shared(self.coordinator.clone())
            .with_context(|| format!("coordinator address `{}`", self.coordinator))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .context("TLS configuration")?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.coordinator))?;
        Ok(CoordinatorClient::new(channel).max_decoding_message_size(4 << 20))
    }

    /// One session: join and serve tasks until the stream breaks.
    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<SessionEnd> {
        let mut client = self.connect().await?;
        let examples: HashMap<String, u64> = self.data.examples().into_iter().collect();
        let join = pb::JoinRequest {
            merchant_id: self.data.merchant_id.clone(),
            examples,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        let mut work = client.join(join).await.context("join")?.into_inner();
        let first = work.message().await.context("reading welcome")?;
        let Some(pb::Work {
            kind: Some(pb::work::Kind::Welcome(welcome)),
        }) = first
        else {
            bail!("coordinator did not send a welcome");
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
                Err(_) => bail!("no message from the coordinator for {silence:?}"),
                Ok(Err(status)) => bail!("work stream failed: {status}"),
                Ok(Ok(None)) => bail!("coordinator closed the work stream"),
                Ok(Ok(Some(m))) => m,
            };
            match msg.kind {
                Some(pb::work::Kind::Task(task)) => {
                    if self
                        .observer
                        .as_ref()
                        .is_some_and(|o| o.on_task(&task.task_id) == TaskDecision::Abandon)
                    {
                        bail!("abandoned task `{}` (asked by the observer)", task.task_id);
                    }
                    self.handle_task(&mut client, &welcome.session_id, task)
                        .await?;
                    self.tasks_done += 1;
                }
                Some(pb::work::Kind::Ping(_)) | None => {}
                Some(pb::work::Kind::Welcome(_)) => bail!("unexpected second welcome"),
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
    ) -> anyhow::Result<()> {
        let spec: TaskSpec = serde_json::from_slice(&task.spec_json)
            .with_context(|| format!("task `{}`: undecodable spec", task.task_id))?;
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
            };
            state.save_global(&meta, &global)?;
        }
        let family = spec.model.data_family();
        let seed = spec.seed;
        let noise = spec.dp.as_ref().and_then(|d| d.distributed);
        let data = std::mem::take(&mut self.data);
        let (data, out) = tokio::task::spawn_blocking(move || {
            let mut data = data;
            let out = run_task(&spec, &global, &mut data);
            (data, out)
        })
        .await
        .context("training task panicked")?;
        self.data = data;
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
            Ok(out) => upload(client, session_id, &task, &out).await,
            Err(e) => {
                // Nothing is sent: the coordinator counts us as missing.
                tracing::error!(task = %task.task_id, error = %e, "local task failed");
                Ok(())
            }
        }
    }
}

/// Downloads the model named by `task`, checking offsets and total length.
pub async fn download(
    client: &mut CoordinatorClient<Channel>,
    session_id: &str,
    task: &pb::TaskAssignment,
) -> anyhow::Result<Vec<f32>> {
    let req = pb::ModelRequest {
        session_id: session_id.into(),
        run_id: task.run_id.clone(),
        round: task.round,
        task_id: task.task_id.clone(),
        model_version: task.model_version,
    };
    let mut stream = client
        .download_model(req)
        .await
        .context("download model")?
        .into_inner();
    let expected = task.model_len as usize * 4;
    let mut bytes = Vec::with_capacity(expected);
    while let Some(chunk) = stream.message().await.context("model stream")? {
        if chunk.offset as usize != bytes.len() || chunk.total_len as usize != expected {
            bail!(
                "model chunk at offset {} (have {} of {expected} bytes) is out of order",
                chunk.offset,
                bytes.len()
            );
        }
        if bytes.len() + chunk.data.len() > expected {
            bail!("model larger than the {expected} bytes announced");
        }
        bytes.extend_from_slice(&chunk.data);
    }
    if bytes.len() != expected {
        bail!("model has {} bytes, {expected} announced", bytes.len());
    }
    Ok(fedcart_common::federation::update::f32s_from_le(&bytes))
}

/// Uploads a task's result as a header chunk followed by data chunks.
pub async fn upload(
    client: &mut CoordinatorClient<Channel>,
    session_id: &str,
    task: &pb::TaskAssignment,
    out: &TaskOutput,
) -> anyhow::Result<()> {
    let (payload, num_values, num_weights) = match &out.update {
        Some(u) => (
            u.payload_bytes(),
            u.values.len() as u64,
            u.coord_weights.len() as u64,
        ),
        None => (Vec::new(), 0, 0),
    };
    let header = pb::UpdateHeader {
        session_id: session_id.into(),
        run_id: task.run_id.clone(),
        round: task.round,
        task_id: task.task_id.clone(),
        encoding: pb::PayloadEncoding::F32 as i32,
        payload_len: payload.len() as u64,
        num_values,
        num_coord_weights: num_weights,
        weight: out.weight,
        metrics: out.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    };
    let mut chunks = vec![pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(header)),
    }];
    chunks.extend(payload.chunks(UPLOAD_CHUNK_BYTES).map(|c| pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Data(c.to_vec())),
    }));
    client
        .submit_update(futures::stream::iter(chunks))
        .await
        .with_context(|| format!("task `{}`: update rejected", task.task_id))?;
    Ok(())
}
