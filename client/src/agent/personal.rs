//! Personalisation when a recommender run ends (`[personalise]`): the
//! agent fine-tunes the version it holds, stores the outcome beside it and
//! sends nothing.

use super::{Agent, AgentError};

impl Agent {
    /// After run `run_id` ended: with `[personalise]` and a state directory,
    /// fine-tunes a private copy of the recommender this agent holds of
    /// that run (the version it was last handed, normally the served one)
    /// and stores the outcome beside it (`StateDir::save_personal`), once
    /// per run and version (an agent restarted after the run finds it done).
    /// Nothing is sent. A failure of the fine-tune itself is logged and
    /// leaves the global copy served; a state directory that cannot be
    /// written is an error.
    pub(super) async fn personalise_after(&mut self, run_id: &str) -> Result<(), AgentError> {
        let (Some(cfg), Some(state), Some(_)) = (&self.personalise, &self.state, &self.data.mf)
        else {
            return Ok(());
        };
        let (cfg, state) = (cfg.clone(), state.clone());
        let run_state = state.run(run_id)?;
        let Some((meta, global)) = run_state.load_global("mf")? else {
            return Ok(());
        };
        let Some(shape) = meta.spec.model.mf_shape() else {
            return Ok(());
        };
        if meta.run_id != run_id
            || run_state
                .load_personal()?
                .is_some_and(|(p, _)| p.run_id == run_id && p.version == meta.version)
        {
            return Ok(());
        }
        let settings =
            fedcart_common::model::mf::Personalise::with_default(cfg.epochs, cfg.proximal, &shape);
        if let Err(e) = self.map_items_for(&meta.spec) {
            tracing::error!(run = %run_id, error = %e, "cannot map item ids into the run's rows");
            return Ok(());
        }
        self.users_for(run_id)?;
        // The version's own evaluation pairs it with its users.
        let mut spec = meta.spec.clone();
        spec.kind = fedcart_common::task::TaskKind::Evaluate;
        spec.round = meta.version;
        let data = std::mem::take(&mut self.data);
        let (data, out) = tokio::task::spawn_blocking(move || {
            let mut data = data;
            let out = fedcart_common::train::personalise(&spec, &global, &mut data, &settings);
            (data, out)
        })
        .await
        .map_err(AgentError::TaskPanicked)?;
        self.data = data;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(run = %run_id, version = meta.version, error = %e,
                    "personalisation failed; serving the global copy");
                return Ok(());
            }
        };
        let finite = |v: f64| v.is_finite().then_some(v);
        let personal = crate::state::PersonalMeta {
            run_id: run_id.to_owned(),
            version: meta.version,
            kept: out.kept,
            metric: out.metric.to_owned(),
            global_val: finite(out.global_val),
            personal_val: finite(out.personal_val),
            epochs: settings.epochs,
            proximal: settings.proximal,
            sha256: None,
        };
        let copy = out.kept.then_some((out.params.as_slice(), &out.users));
        run_state.save_personal(&personal, copy)?;
        // The top-level state serves the latest model of any run: the copy
        // goes there too while that model is this one.
        if state
            .load_global("mf")?
            .is_some_and(|(top, _)| top.run_id == run_id && top.version == meta.version)
        {
            state.save_personal(&personal, copy)?;
        }
        tracing::info!(
            run = %run_id,
            version = meta.version,
            metric = out.metric,
            global = out.global_val,
            personalised = out.personal_val,
            "{}",
            if out.kept {
                "personalised the recommender: its copy wins on validation and is served"
            } else {
                "personalised copy not better on validation; serving the global copy"
            }
        );
        Ok(())
    }
}
