//! The `fedcart.v1.Admin` service: the operator submits, lists, shows and
//! stops runs over the coordinator's mTLS listener.
//!
//! Every RPC requires an operator certificate (`fedcart://operator/<name>`,
//! read by [`crate::identity::AccessInterceptor`] with
//! `fedcart_common::identity::role_of`); a merchant's certificate is refused
//! with `PERMISSION_DENIED` naming its role. In plaintext `--insecure` mode
//! there are no identities and the caller is taken for the operator, as for
//! `Status`.

use std::path::Path;
use std::sync::Arc;

use fedcart_proto::v1 as pb;
use fedcart_proto::v1::admin_server::{Admin, AdminServer};
use tonic::{Request, Response, Status};

use super::hub::{Hub, RunSummary, Starter};
use crate::config::RunConfig;
use crate::identity::{OperatorIdentity, PeerIdentity};

/// Largest run TOML accepted by `SubmitRun`.
const MAX_RUN_TOML_BYTES: usize = 64 * 1024;

/// The admin service over a [`Hub`].
#[derive(Clone)]
pub struct AdminService {
    hub: Arc<Hub>,
    start: Starter,
    /// Last, so it drops after `hub` (see [`crate::service::Held`]).
    _held: crate::service::Held,
}

impl AdminService {
    /// The service; `start` launches the task loop of each submitted run;
    /// `held` is dropped with its last clone.
    pub fn new(hub: Arc<Hub>, start: Starter, held: crate::service::Held) -> Self {
        Self {
            hub,
            start,
            _held: held,
        }
    }

    /// The tonic server wrapper.
    pub fn into_server(self) -> AdminServer<Self> {
        AdminServer::new(self).max_decoding_message_size(MAX_RUN_TOML_BYTES + 4096)
    }
}

/// How an admin RPC's refusal of a merchant certificate begins (the CLI's
/// hint tells it from a revoked merchant's).
pub const ADMIN_NEEDS_OPERATOR: &str = "admin RPCs need an operator certificate";

/// The operator calling an admin RPC (`plaintext` without TLS); a
/// merchant's certificate is refused naming its role.
fn operator<T>(req: &Request<T>) -> Result<String, Status> {
    if let Some(PeerIdentity(id)) = req.extensions().get::<PeerIdentity>() {
        tracing::warn!(merchant = %id, "refused: a merchant certificate on an admin RPC");
        return Err(Status::permission_denied(format!(
            "{ADMIN_NEEDS_OPERATOR} (fedcart://operator/<name>): the caller's certificate has \
             the role merchant (`{id}`)"
        )));
    }
    Ok(req
        .extensions()
        .get::<OperatorIdentity>()
        .map_or_else(|| "plaintext".to_owned(), |o| o.0.clone()))
}

/// The wire form of a run summary.
pub fn run_info(s: &RunSummary, config_json: String) -> pb::RunInfo {
    pb::RunInfo {
        run_id: s.run_id.clone(),
        model: s.model.clone(),
        phase: s.phase.clone(),
        model_version: s.model_version,
        rounds: s.rounds,
        finished: s.finished,
        stopped: s.stopped.clone().unwrap_or_default(),
        config_json,
        best_version: s.best_version.unwrap_or(0),
        submitted_unix_ms: s.submitted_unix_ms,
        eligible_agents: s.eligible_agents as u64,
        continues: s.continues.clone().unwrap_or_default(),
        epsilon: s.epsilon,
        delta: s.delta,
    }
}

impl AdminService {
    fn info(&self, run_id: &str) -> Result<pb::RunInfo, Status> {
        let summary = self.hub.summary(run_id)?;
        let config = self.hub.get(run_id)?.run_config();
        Ok(run_info(
            &summary,
            serde_json::to_string(&config).expect("serialisable"),
        ))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn submit_run(
        &self,
        request: Request<pb::SubmitRunRequest>,
    ) -> Result<Response<pb::RunInfo>, Status> {
        let by = operator(&request)?;
        let req = request.into_inner();
        if req.config_toml.len() > MAX_RUN_TOML_BYTES {
            return Err(Status::invalid_argument(format!(
                "the run's TOML is {} bytes, at most {MAX_RUN_TOML_BYTES}",
                req.config_toml.len()
            )));
        }
        let source = if req.source.is_empty() {
            "the submitted run".to_owned()
        } else {
            req.source.chars().take(256).collect()
        };
        let (run, schedule) = RunConfig::from_toml(&req.config_toml, Path::new(&source))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let run_id = run.run_id.clone();
        if let Some(w) = run.small_secure_round_warning() {
            tracing::warn!("{w}");
        }
        let (shared, _) = self.hub.submit(run, false, schedule)?;
        tracing::info!(run = %run_id, operator = %by, "run submitted by the operator");
        (self.start)(shared);
        self.hub.notify();
        Ok(Response::new(self.info(&run_id)?))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsReply>, Status> {
        operator(&request)?;
        let runs = self
            .hub
            .ids()
            .iter()
            .map(|id| self.info(id))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(pb::ListRunsReply { runs }))
    }

    async fn show_run(
        &self,
        request: Request<pb::RunRequest>,
    ) -> Result<Response<pb::RunInfo>, Status> {
        operator(&request)?;
        Ok(Response::new(self.info(&request.get_ref().run_id)?))
    }

    async fn stop_run(
        &self,
        request: Request<pb::RunRequest>,
    ) -> Result<Response<pb::RunInfo>, Status> {
        let by = operator(&request)?;
        let run_id = request.into_inner().run_id;
        self.hub.stop(&run_id, &by)?;
        self.hub.notify();
        Ok(Response::new(self.info(&run_id)?))
    }
}
