//! `fedcart-coordinator privacy`: ε of a planned run, or the noise it needs.
//!
//! Given the Poisson sampling rate of agents per round, the number of rounds
//! and δ, it prints either ε for a noise multiplier (with the optimal Rényi
//! order) or, for a target ε, the smallest noise multiplier that reaches it.
//! The accounting is `fedcart_common::privacy::dp`, which matches Google's
//! `dp_accounting` RDP accountant; this module only validates flags and
//! formats the answer, so the binary stays thin.

use anyhow::{Context, Result, bail};
use fedcart_common::privacy::dp::accountant::{DEFAULT_SIGMA_TOLERANCE, epsilon_for};
use fedcart_common::privacy::dp::solve_noise_multiplier;
use serde_json::json;

/// Flags of the `privacy` subcommand.
///
/// Numeric flags accept negative input so that `run` can reject it with a
/// message naming the flag, instead of clap calling it an unknown argument.
#[derive(Debug, Clone, clap::Args)]
#[command(group(
    clap::ArgGroup::new("noise")
        .required(true)
        .args(["noise_multiplier", "target_epsilon"]),
))]
pub struct PrivacyArgs {
    /// Probability that each agent takes part in a round (Poisson sampling),
    /// in (0, 1]. Default 1: what a coordinator run's ledger and an agent's
    /// budget charge, since neither can verify a sampled selection.
    #[arg(
        long = "sampling-rate",
        value_name = "Q",
        allow_negative_numbers = true,
        default_value_t = 1.0
    )]
    pub sampling_rate: f64,
    /// Noise std divided by the clip norm; give this or --target-epsilon.
    #[arg(
        long = "noise-multiplier",
        value_name = "S",
        allow_negative_numbers = true
    )]
    pub noise_multiplier: Option<f64>,
    /// Find the smallest noise multiplier whose ε is at most this.
    #[arg(
        long = "target-epsilon",
        value_name = "E",
        allow_negative_numbers = true
    )]
    pub target_epsilon: Option<f64>,
    /// Number of rounds (≥ 1).
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    pub steps: u64,
    /// Target δ, in (0, 1); conventionally below 1 / (number of agents).
    #[arg(long, value_name = "D", allow_negative_numbers = true)]
    pub delta: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Checks the flags, naming the offending one.
fn validate(args: &PrivacyArgs) -> Result<()> {
    let q = args.sampling_rate;
    if !(q > 0.0 && q <= 1.0) {
        bail!("--sampling-rate must be in (0, 1], got {q}");
    }
    if !(args.delta > 0.0 && args.delta < 1.0) {
        bail!("--delta must be in (0, 1), got {}", args.delta);
    }
    // As `run.dp.delta`: past 1 % δ is no guarantee at all.
    if let Some(why) = fedcart_common::privacy::dp::delta_above_max(args.delta) {
        bail!(
            "--delta {why}, and a run refuses it (run.dp.delta) — use 1e-5 (it must be below 1/n \
             for n merchants; 1/n² is the usual choice)"
        );
    }
    if args.steps < 1 {
        bail!("--steps must be at least 1, got {}", args.steps);
    }
    match (args.noise_multiplier, args.target_epsilon) {
        (Some(_), Some(_)) | (None, None) => {
            bail!("give exactly one of --noise-multiplier and --target-epsilon")
        }
        (Some(s), None) if !(s > 0.0 && s.is_finite()) => {
            bail!("--noise-multiplier must be finite and > 0, got {s}")
        }
        (None, Some(e)) if !(e > 0.0 && e.is_finite()) => {
            bail!("--target-epsilon must be finite and > 0, got {e}")
        }
        _ => Ok(()),
    }
}

/// Runs the subcommand and returns what to print (text, or one JSON object
/// with `--json`). ε that is infinite prints as `inf` (JSON `null`).
pub fn run(args: &PrivacyArgs) -> Result<String> {
    validate(args)?;
    let (q, steps, delta) = (args.sampling_rate, args.steps, args.delta);
    if let Some(sigma) = args.noise_multiplier {
        let r = epsilon_for(q, sigma, steps, delta).context("computing epsilon")?;
        if args.json {
            return Ok(json!({
                "sampling_rate": q,
                "noise_multiplier": sigma,
                "steps": steps,
                "delta": delta,
                "epsilon": r.epsilon,
                "optimal_order": r.order,
            })
            .to_string());
        }
        return Ok(format!(
            "Poisson-sampled Gaussian mechanism, RDP accountant\n\
             sampling rate     {q}\n\
             noise multiplier  {sigma}\n\
             steps             {steps}\n\
             delta             {delta:e}\n\
             epsilon           {:.4} (optimal RDP order {})\n",
            r.epsilon, r.order
        ));
    }
    let target = args.target_epsilon.unwrap_or_default();
    let s = solve_noise_multiplier(target, delta, q, steps, DEFAULT_SIGMA_TOLERANCE)
        .with_context(|| format!("solving for --target-epsilon {target}"))?;
    if args.json {
        return Ok(json!({
            "sampling_rate": q,
            "target_epsilon": target,
            "steps": steps,
            "delta": delta,
            "noise_multiplier": s.noise_multiplier,
            "tolerance": DEFAULT_SIGMA_TOLERANCE,
            "epsilon": s.epsilon,
            "optimal_order": s.order,
        })
        .to_string());
    }
    // Printed rounded up, with the ε of the printed value: re-entered as
    // `--noise-multiplier` (or `noise_multiplier`), the rounded-down value
    // gave an ε above the target.
    let printed = (s.noise_multiplier * 1e4).ceil() / 1e4;
    let r = epsilon_for(q, printed, steps, delta).context("computing epsilon")?;
    Ok(format!(
        "Poisson-sampled Gaussian mechanism, RDP accountant\n\
         sampling rate     {q}\n\
         steps             {steps}\n\
         delta             {delta:e}\n\
         target epsilon    {target}\n\
         noise multiplier  {printed:.4} (the smallest, to within {DEFAULT_SIGMA_TOLERANCE}, \
         rounded up)\n\
         epsilon           {:.4} (optimal RDP order {})\n",
        r.epsilon, r.order
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: PrivacyArgs,
    }

    fn parse(line: &str) -> std::result::Result<PrivacyArgs, clap::Error> {
        let argv = std::iter::once("privacy").chain(line.split_whitespace());
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn text_output_reports_epsilon_and_order() {
        let args = parse("--sampling-rate 0.01 --noise-multiplier 1.0 --steps 10000 --delta 1e-5")
            .unwrap();
        let out = run(&args).unwrap();
        assert!(out.contains("epsilon           6.7128"), "{out}");
        assert!(out.contains("optimal RDP order 4.1"), "{out}");
    }

    #[test]
    fn json_output_is_one_object_with_the_figures() {
        let args =
            parse("--sampling-rate 1 --noise-multiplier 5 --steps 50 --delta 1e-6 --json").unwrap();
        // Without the flag: q = 1, as the run's ledger charges.
        let same = parse("--noise-multiplier 5 --steps 50 --delta 1e-6 --json").unwrap();
        assert_eq!(same.sampling_rate, 1.0);
        let out = run(&args).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!((v["epsilon"].as_f64().unwrap() - 7.766237903487095).abs() < 1e-3);
        assert_eq!(v["optimal_order"].as_f64(), Some(4.5));
        assert_eq!(v["steps"].as_u64(), Some(50));
    }

    #[test]
    fn target_epsilon_gives_the_smallest_noise_multiplier() {
        let args =
            parse("--sampling-rate 0.01 --target-epsilon 3 --steps 1000 --delta 1e-5 --json")
                .unwrap();
        let v: serde_json::Value = serde_json::from_str(&run(&args).unwrap()).unwrap();
        let sigma = v["noise_multiplier"].as_f64().unwrap();
        // dp_accounting's bisection gives 0.8646066 (see the accountant tests).
        assert!((sigma - 0.8646066).abs() < 2e-4, "{sigma}");
        assert!(v["epsilon"].as_f64().unwrap() <= 3.0);
        let text = run(&PrivacyArgs {
            json: false,
            ..args
        })
        .unwrap();
        assert!(text.contains("noise multiplier  0.8647"), "{text}");
        // The printed value, re-entered, stays within the target (0.8646,
        // rounded to nearest, gave an ε above it).
        let printed = PrivacyArgs {
            noise_multiplier: Some(0.8647),
            target_epsilon: None,
            json: true,
            ..args
        };
        let v: serde_json::Value = serde_json::from_str(&run(&printed).unwrap()).unwrap();
        assert!(v["epsilon"].as_f64().unwrap() <= 3.0, "{v}");
    }

    #[test]
    fn bad_values_are_reported_by_flag() {
        let cases = [
            (
                "--sampling-rate 0 --noise-multiplier 1 --steps 10 --delta 1e-5",
                "--sampling-rate",
            ),
            (
                "--sampling-rate 1.5 --noise-multiplier 1 --steps 10 --delta 1e-5",
                "--sampling-rate",
            ),
            (
                "--sampling-rate 0.1 --noise-multiplier 0 --steps 10 --delta 1e-5",
                "--noise-multiplier",
            ),
            (
                "--sampling-rate 0.1 --noise-multiplier -2 --steps 10 --delta 1e-5",
                "--noise-multiplier",
            ),
            (
                "--sampling-rate 0.1 --target-epsilon 0 --steps 10 --delta 1e-5",
                "--target-epsilon",
            ),
            (
                "--sampling-rate 0.1 --noise-multiplier 1 --steps 0 --delta 1e-5",
                "--steps",
            ),
            (
                "--sampling-rate 0.1 --noise-multiplier 1 --steps 10 --delta 1",
                "--delta",
            ),
            (
                "--sampling-rate 0.1 --noise-multiplier 1 --steps 10 --delta 0",
                "--delta",
            ),
            (
                "--sampling-rate 0.1 --noise-multiplier 1 --steps 10 --delta 0.5",
                "--delta 0.5 is above 0.01",
            ),
        ];
        for (line, flag) in cases {
            let args = parse(line).unwrap();
            let err = run(&args).unwrap_err().to_string();
            assert!(err.contains(flag), "{line}: {err}");
        }
        // Built by hand (not through clap): both or neither noise flag.
        let mut args =
            parse("--sampling-rate 0.1 --noise-multiplier 1 --steps 10 --delta 1e-5").unwrap();
        args.target_epsilon = Some(1.0);
        assert!(
            run(&args)
                .unwrap_err()
                .to_string()
                .contains("--target-epsilon")
        );
        args.noise_multiplier = None;
        args.target_epsilon = None;
        assert!(
            run(&args)
                .unwrap_err()
                .to_string()
                .contains("--noise-multiplier")
        );
    }

    #[test]
    fn clap_requires_exactly_one_noise_flag_and_numeric_values() {
        let both =
            "--sampling-rate 0.1 --noise-multiplier 1 --target-epsilon 2 --steps 10 --delta 1e-5";
        assert!(parse(both).is_err());
        assert!(parse("--sampling-rate 0.1 --steps 10 --delta 1e-5").is_err());
        let err = parse("--sampling-rate 0.1 --noise-multiplier 1 --steps -3 --delta 1e-5")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid value '-3' for '--steps <T>'"),
            "{err}"
        );
    }

    #[test]
    fn unreachable_targets_are_an_error_not_a_hang() {
        let args =
            parse("--sampling-rate 1 --target-epsilon 1e-7 --steps 1000000 --delta 1e-5").unwrap();
        let err = format!("{:#}", run(&args).unwrap_err());
        assert!(
            err.contains("--target-epsilon") && err.contains("no noise multiplier"),
            "{err}"
        );
    }
}
