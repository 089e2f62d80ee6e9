//! Differential privacy in the simulator: the `--dp-*` flags turned into the
//! run's [`DpSettings`], and the agent-side noise of distributed mode inside
//! the in-process secure aggregation.

use anyhow::bail;
use fedcart_common::privacy::dp::DistributedNoise;
use fedcart_common::privacy::dp::distributed::noise_encoded;
use fedcart_common::privacy::secagg::{EncodedInput, SecAggConfig, SecAggError};

use fedcart_coordinator::config::{ClipNorm, DpMode, DpSettings};

use crate::args::DpModeName;

/// Default δ of the simulator's guarantee.
pub const DEFAULT_DELTA: f64 = 1e-5;

/// The DP settings of `--dp-clip`, `--dp-noise` / `--target-epsilon`,
/// `--dp-delta` and `--dp-mode`, or None when no DP flag is given. Errors
/// name what gave the value: `name` turns a flag into itself, or into its
/// key in the `--config` file when the value came from there.
pub fn settings(
    clip: Option<String>,
    noise: Option<f64>,
    target_epsilon: Option<f64>,
    delta: Option<f64>,
    mode: Option<DpModeName>,
    name: impl Fn(&'static str) -> String,
) -> anyhow::Result<Option<DpSettings>> {
    // `--dp-noise -2`, or `` `dp_noise` in sim.toml: -2 ``.
    let given = |flag: &'static str, value: &dyn std::fmt::Display| {
        let name = name(flag);
        if name.starts_with("--") {
            format!("{name} {value}")
        } else {
            format!("{name}: {value}")
        }
    };
    let Some(clip) = clip else {
        if noise.is_some() || target_epsilon.is_some() || delta.is_some() || mode.is_some() {
            bail!(
                "--dp-noise, --target-epsilon, --dp-delta and --dp-mode need --dp-clip C (or --dp-clip adaptive)"
            );
        }
        return Ok(None);
    };
    let clip: ClipNorm = clip
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", name("--dp-clip")))?;
    if let ClipNorm::Fixed(c) = clip
        && !(c.is_finite() && c > 0.0)
    {
        bail!("{} must be finite and > 0", given("--dp-clip", &c));
    }
    match (noise, target_epsilon) {
        (None, None) | (Some(_), Some(_)) => {
            bail!("--dp-clip needs exactly one of --dp-noise σ and --target-epsilon E")
        }
        (Some(z), None) if !(z.is_finite() && z > 0.0) => {
            bail!("{} must be finite and > 0", given("--dp-noise", &z))
        }
        (None, Some(e)) if !(e.is_finite() && e > 0.0) => {
            bail!("{} must be finite and > 0", given("--target-epsilon", &e))
        }
        _ => {}
    }
    let delta = delta.unwrap_or(DEFAULT_DELTA);
    if !(delta > 0.0 && delta < 1.0) {
        bail!("{} is not in (0, 1)", given("--dp-delta", &delta));
    }
    let mode = match mode {
        None | Some(DpModeName::Central) => DpMode::Central,
        Some(DpModeName::Distributed) => DpMode::Distributed,
    };
    let mut s = DpSettings::central(1.0, 1.0, delta);
    s.clip = clip;
    s.noise_multiplier = noise;
    s.target_epsilon = target_epsilon;
    s.mode = mode;
    Ok(Some(s))
}

/// The encoded-input hook of a distributed-DP round: each simulated agent
/// adds its Skellam share with an RNG derived from the run seed, the task
/// and its secure-aggregation id.
pub fn noise_hook<'a>(
    config: &'a SecAggConfig,
    noise: &'a DistributedNoise,
    seed: u64,
    task_id: &'a str,
) -> impl Fn(u32, &mut EncodedInput) -> Result<(), SecAggError> + Sync + 'a {
    move |id, input| {
        let mut rng = fedcart_common::seed::rng(seed, &["dp-skellam", task_id, &id.to_string()]);
        noise_encoded(input, config, noise, &mut rng).map_err(|e| SecAggError::Config {
            parameter: "dp",
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests;
