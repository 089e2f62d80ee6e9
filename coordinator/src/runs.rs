//! `fedcart-coordinator runs submit | list | show | stop`: the operator's
//! client of the `Admin` service, printing a table or JSON.

use anyhow::Context;
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::admin_client::AdminClient;
use serde_json::json;

use crate::status::ClientTls;

/// What `runs` is asked to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Submit the run in this TOML file.
    Submit(std::path::PathBuf),
    /// List every run.
    List,
    /// Show one run.
    Show(String),
    /// Stop one run.
    Stop(String),
}

/// Runs `action` against the coordinator at `url`; returns the runs it
/// answered with.
pub async fn call(
    url: &str,
    tls: Option<&ClientTls>,
    action: &Action,
) -> anyhow::Result<Vec<pb::RunInfo>> {
    // A run to submit is read and checked before connecting, so a wrong
    // file is named (with its line) whether or not the coordinator is up;
    // the coordinator checks it again.
    let submitted = match action {
        Action::Submit(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| crate::status::ReadConfig {
                    path: path.clone(),
                    source,
                })?;
            crate::config::RunConfig::from_toml(&text, path).map_err(|e| match e {
                // The other errors name the file already.
                e @ crate::config::ConfigError::Invalid { .. } => {
                    anyhow::Error::new(e).context(path.display().to_string())
                }
                e => anyhow::Error::new(e),
            })?;
            Some(text)
        }
        _ => None,
    };
    let mut c = AdminClient::new(crate::status::channel(url, tls).await?);
    let one = |r: tonic::Response<pb::RunInfo>| vec![r.into_inner()];
    Ok(match action {
        Action::Submit(path) => {
            let text = submitted.expect("read above");
            one(c
                .submit_run(pb::SubmitRunRequest {
                    config_toml: text,
                    source: path.display().to_string(),
                })
                .await
                .context("SubmitRun RPC")?)
        }
        Action::List => {
            c.list_runs(pb::ListRunsRequest {})
                .await
                .context("ListRuns RPC")?
                .into_inner()
                .runs
        }
        Action::Show(id) => one(c
            .show_run(pb::RunRequest { run_id: id.clone() })
            .await
            .context("ShowRun RPC")?),
        Action::Stop(id) => one(c
            .stop_run(pb::RunRequest { run_id: id.clone() })
            .await
            .context("StopRun RPC")?),
    })
}

/// One run as JSON (its configuration as an object).
pub fn to_json(r: &pb::RunInfo) -> serde_json::Value {
    let config: serde_json::Value =
        serde_json::from_str(&r.config_json).unwrap_or(serde_json::Value::Null);
    json!({
        "run_id": r.run_id,
        "model": r.model,
        "phase": r.phase,
        "model_version": r.model_version,
        "rounds": r.rounds,
        "finished": r.finished,
        "stopped": (!r.stopped.is_empty()).then_some(&r.stopped),
        "best_version": (r.best_version > 0).then_some(r.best_version),
        "submitted_unix_ms": r.submitted_unix_ms,
        "eligible_agents": r.eligible_agents,
        "continues": (!r.continues.is_empty()).then_some(&r.continues),
        "epsilon": r.epsilon,
        "delta": r.delta,
        "config": config,
    })
}

/// The runs as a table: id, model, round X of N, phase.
pub fn to_table(runs: &[pb::RunInfo]) -> String {
    let mut out = format!(
        "{:<24} {:<14} {:>11} {:>8} {:>9}  {}\n",
        "RUN", "MODEL", "ROUND", "AGENTS", "EPSILON", "PHASE"
    );
    for r in runs {
        // ε spent (DP runs only; 0 before the first released round).
        let epsilon = match (r.delta, r.epsilon) {
            (None, _) => "-".to_string(),
            (Some(_), e) => format!("{:.3}", e.unwrap_or(0.0)),
        };
        out.push_str(&format!(
            "{:<24} {:<14} {:>11} {:>8} {:>9}  {}\n",
            r.run_id,
            r.model,
            format!("{} of {}", r.model_version, r.rounds),
            r.eligible_agents,
            epsilon,
            r.phase
        ));
    }
    if runs.is_empty() {
        out.push_str("(no runs)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_run_file_is_checked_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        let example = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/recommender.toml"
        ))
        .unwrap();
        std::fs::write(&path, example.replace("rounds = 10", "rounds = 0")).unwrap();
        // Nothing listens on port 1: the file must be refused first.
        let e = call("http://127.0.0.1:1", None, &Action::Submit(path.clone()))
            .await
            .unwrap_err();
        let message = format!("{e:#}");
        assert!(
            message.starts_with(&format!("{}: invalid `run.rounds`", path.display())),
            "{message}"
        );
    }
}
