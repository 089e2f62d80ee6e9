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
                .map_err(crate::status::Refused)
                .context("SubmitRun RPC")?)
        }
        Action::List => {
            c.list_runs(pb::ListRunsRequest {})
                .await
                .map_err(crate::status::Refused)
                .context("ListRuns RPC")?
                .into_inner()
                .runs
        }
        Action::Show(id) => one(c
            .show_run(pb::RunRequest { run_id: id.clone() })
            .await
            .map_err(crate::status::Refused)
            .context("ShowRun RPC")?),
        Action::Stop(id) => {
            // A run that had ended already is left as it was: said, not
            // only shown (a second stop printed the table as the first did).
            // The look before the stop is part of stopping: its refusal
            // (no such run) is the stop's.
            let before = c
                .show_run(pb::RunRequest { run_id: id.clone() })
                .await
                .map_err(crate::status::Refused)
                .context("StopRun RPC")?
                .into_inner();
            let stopped = one(c
                .stop_run(pb::RunRequest { run_id: id.clone() })
                .await
                .map_err(crate::status::Refused)
                .context("StopRun RPC")?);
            if let Some(note) = already_ended(&before) {
                eprintln!("{note}");
            }
            stopped
        }
    })
}

/// What `runs stop` says of a run that had ended before it was asked: a
/// stopped run stays stopped, a finished one finished (a scheduled run's
/// schedule is still ended by the stop).
fn already_ended(r: &pb::RunInfo) -> Option<String> {
    if !r.stopped.is_empty() {
        Some(format!(
            "run `{}` was already stopped ({}); its versions are unchanged",
            r.run_id, r.stopped
        ))
    } else if r.finished {
        Some(format!(
            "run `{}` had already finished (version {}); its versions are unchanged",
            r.run_id, r.model_version
        ))
    } else {
        None
    }
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

/// One run as `runs show` prints it: a line per fact (phase, version, best
/// version, why it stopped, agents, privacy spent, when it was submitted,
/// the run it continues), then its configuration as TOML, as the operator
/// wrote it (settings left out of the file show with their defaults).
pub fn to_detail(r: &pb::RunInfo) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: String| out.push_str(&format!("{key:<12}{value}\n"));
    line("run", r.run_id.clone());
    line("model", r.model.clone());
    line("phase", r.phase.clone());
    line(
        "version",
        match r.best_version {
            0 => format!("{} of {} rounds", r.model_version, r.rounds),
            best => format!(
                "{} of {} rounds; best version {best} (the one merchants are served)",
                r.model_version, r.rounds
            ),
        },
    );
    if !r.stopped.is_empty() {
        line("stopped", r.stopped.clone());
    }
    line(
        "agents",
        format!("{} connected with data for this model", r.eligible_agents),
    );
    line(
        "privacy",
        match (r.delta, r.epsilon) {
            (None, _) => "no differential privacy".into(),
            (Some(d), e) => format!("ε {:.3} spent (δ {d:e})", e.unwrap_or(0.0)),
        },
    );
    if r.submitted_unix_ms > 0 {
        line(
            "submitted",
            chrono::DateTime::from_timestamp_millis(r.submitted_unix_ms).map_or_else(
                || format!("{} ms after the epoch", r.submitted_unix_ms),
                |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            ),
        );
    }
    if !r.continues.is_empty() {
        line("continues", r.continues.clone());
    }
    out.push_str("\nconfiguration:\n");
    let config = serde_json::from_str::<serde_json::Value>(&r.config_json)
        .ok()
        .map(without_nulls)
        .and_then(|v| toml::to_string(&v).ok());
    match config {
        Some(toml) => {
            for l in toml.lines() {
                out.push_str(&format!("  {l}\n"));
            }
        }
        None => out.push_str(&format!("  {}\n", r.config_json)),
    }
    out
}

/// `v` without its null values (TOML has none: an unset option is an
/// absent key).
fn without_nulls(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(without_nulls).collect()),
        v => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second `runs stop`, or one of a finished run, printed the table
    /// and nothing else; it now says the run had ended and nothing changed.
    #[test]
    fn stopping_a_run_that_had_ended_says_so() {
        let mut r = pb::RunInfo {
            run_id: "rec".into(),
            model_version: 7,
            ..Default::default()
        };
        assert_eq!(already_ended(&r), None);
        r.finished = true;
        assert_eq!(
            already_ended(&r).as_deref(),
            Some("run `rec` had already finished (version 7); its versions are unchanged")
        );
        r.stopped = "stopped by operator `ops`".into();
        assert_eq!(
            already_ended(&r).as_deref(),
            Some(
                "run `rec` was already stopped (stopped by operator `ops`); its versions are \
                 unchanged"
            )
        );
    }

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

    /// `runs show` printed the one row of `runs list`, although its help
    /// promised the configuration: it now prints each fact on its line and
    /// the configuration as TOML that reads back as the same run.
    #[test]
    fn show_prints_the_runs_facts_and_its_configuration_as_toml() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/coordinator.toml");
        let run = crate::config::CoordinatorConfig::load(&path).unwrap().run;
        let info = pb::RunInfo {
            run_id: run.run_id.clone(),
            model: "churn-lr".into(),
            phase: "stopped: stopped by operator `ops`".into(),
            model_version: 3,
            rounds: run.rounds,
            finished: true,
            stopped: "stopped by operator `ops`".into(),
            config_json: serde_json::to_string(&run).unwrap(),
            best_version: 2,
            submitted_unix_ms: 1_764_700_000_000,
            eligible_agents: 4,
            continues: String::new(),
            epsilon: Some(0.5),
            delta: Some(1e-5),
        };
        let text = to_detail(&info);
        for want in [
            format!("run         {}", run.run_id),
            format!("version     3 of {} rounds; best version 2", run.rounds),
            "stopped     stopped by operator `ops`".into(),
            "agents      4 connected".into(),
            "privacy     ε 0.500 spent (δ 1e-5)".into(),
            "submitted   2025-12-02 18:26:40 UTC".into(),
        ] {
            assert!(text.contains(&want), "`{want}` missing:\n{text}");
        }
        let (_, config) = text.split_once("configuration:\n").unwrap();
        let toml: String = config
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
            .collect();
        let (back, _) =
            crate::config::RunConfig::from_toml(&toml, std::path::Path::new("shown.toml"))
                .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(back, run, "{toml}");
    }
}
