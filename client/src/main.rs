//! `fedcart-client`: the merchant agent's command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedcart_client::state::StateDir;
use fedcart_client::{agent::Agent, cli, config::AgentConfig, data, recommend};

/// The fedcart merchant agent: trains on this merchant's data and shares only
/// model updates with the platform's coordinator.
#[derive(Parser)]
#[command(
    version,
    about,
    after_help = cli::LOGGING_HELP
)]
struct Cli {
    #[command(flatten)]
    log: cli::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the coordinator and take part in rounds until interrupted
    /// (Ctrl-C or SIGTERM). Exits 1 with one line saying what to fix on a
    /// permanent error (revoked, wrong identity or TLS files, bad URL);
    /// declines the tasks of a run whose model its data does not fit, saying
    /// why, and stays for the others; retries quietly while the coordinator
    /// is unreachable; stays idle after a run ends, waiting for the next one.
    Run {
        /// The agent's TOML configuration (see client/examples/merchant.toml).
        #[arg(long, env = "FEDCART_CLIENT_CONFIG")]
        config: PathBuf,
    },
    /// Derive features, churn labels and interactions from an orders export,
    /// and write them (with a summary) for inspection.
    #[command(allow_negative_numbers = true)]
    Prepare(Box<fedcart_client::prepare::PrepareArgs>),
    /// Draft the `[data.schema]` section for a customer table (id, label and
    /// its churned value, numeric columns, categorical columns with their
    /// values), with a comment for every column left out and why. Review it
    /// before use: every merchant of a run reads its table with one schema.
    #[command(allow_negative_numbers = true)]
    Schema(Box<fedcart_client::schema::SchemaArgs>),
    /// Top-K items for one customer, offline from the local state.
    #[command(
        allow_negative_numbers = true,
        group(clap::ArgGroup::new("whom").required(true).args(["customer", "best_sellers"]))
    )]
    Recommend {
        /// The agent's TOML configuration.
        #[arg(long, env = "FEDCART_CLIENT_CONFIG")]
        config: PathBuf,
        /// Customer id (as in the ratings file or orders export).
        #[arg(long)]
        customer: Option<String>,
        /// List the merchant's best sellers instead (most customers first),
        /// for a visitor with no purchases; needs no model.
        #[arg(long, conflicts_with_all = ["customer", "include_repeats", "repeat_weight"])]
        best_sellers: bool,
        /// How many items (1 to 1000).
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// Also recommend items the customer already bought.
        #[arg(long)]
        include_repeats: bool,
        /// Repeat-aware list: blend the customer's own frequent items into
        /// the model's ranking with this weight in [0, 1] (implies repeats).
        #[arg(long)]
        repeat_weight: Option<f32>,
        #[arg(long, help = fedcart_client::state::RUN_FLAG_HELP)]
        run: Option<String>,
    },
    /// Churn probability per customer as CSV, offline from the local state.
    Score {
        /// The agent's TOML configuration.
        #[arg(long, env = "FEDCART_CLIENT_CONFIG")]
        config: PathBuf,
        /// Output CSV (`-` for standard output).
        #[arg(long, default_value = "churn_scores.csv")]
        out: PathBuf,
        #[arg(long, help = fedcart_client::state::RUN_FLAG_HELP)]
        run: Option<String>,
    },
    /// "Bought together" lists as CSV (`item,bought_with,support,confidence,lift`)
    /// for the items this merchant sells, offline from the federation's
    /// frequent itemsets in the local state.
    #[command(allow_negative_numbers = true)]
    Rules {
        /// The agent's TOML configuration (needs `data.orders_csv`,
        /// `[data.orders]` and `data.catalogue`).
        #[arg(long, env = "FEDCART_CLIENT_CONFIG")]
        config: PathBuf,
        /// Output CSV.
        #[arg(long, default_value = "rules.csv")]
        out: PathBuf,
        /// Smallest confidence of a rule listed.
        #[arg(long, default_value_t = 0.1)]
        min_confidence: f64,
        /// Rules listed per item, best lift first (at least 1).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
        top: u64,
        #[arg(long, help = fedcart_client::state::RUN_FLAG_HELP)]
        run: Option<String>,
    },
    /// The federation's customer segment of each customer as CSV
    /// (`customer,segment`), offline from the local state.
    Segments {
        /// The agent's TOML configuration.
        #[arg(long, env = "FEDCART_CLIENT_CONFIG")]
        config: PathBuf,
        /// Output CSV (`-` for standard output).
        #[arg(long, default_value = "segments.csv")]
        out: PathBuf,
        #[arg(long, help = fedcart_client::state::RUN_FLAG_HELP)]
        run: Option<String>,
    },
    /// The merchant's privacy budget (`privacy.max_epsilon`): ε spent so
    /// far against the cap, and the rounds charged per run, from the
    /// agent's ledger in its state directory.
    Budget {
        /// The agent's TOML configuration.
        #[arg(long, env = "FEDCART_CLIENT_CONFIG")]
        config: PathBuf,
    },
    /// The merchant's local JSON API (recommendations, churn scores,
    /// segments, model versions) on the agent's state, picking up new model
    /// versions as the agent receives them.
    #[command(allow_negative_numbers = true)]
    Serve(fedcart_client::serve::ServeArgs),
    /// Host many real agent sessions in this process, merchants
    /// `<prefix><first>` to `<prefix><first + merchants - 1>` of a study,
    /// each with its own certificate, connection and state: for load tests
    /// and studies of the real protocol at scale (one process per index of
    /// a Kubernetes Indexed Job, see deploy/k8s/fleet). Runs until
    /// interrupted, or until the run ends with --exit-when-run-ends.
    #[command(allow_negative_numbers = true)]
    Fleet(Box<fedcart_client::fleet::FleetArgs>),
}

fn state_of(cfg: &AgentConfig) -> anyhow::Result<StateDir> {
    let dir = cfg
        .state_dir
        .as_ref()
        .context("`state_dir` is not configured: the agent keeps no local state")?;
    // Reading commands never create it: a mistyped path would otherwise
    // read as "no model yet" and leave an empty directory behind.
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => anyhow::bail!(
            "`state_dir` {} is a file, not the agent's state directory",
            dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "the state directory {} does not exist: no agent has run with this `state_dir` yet \
             (check `state_dir` in the configuration, resolved against the configuration \
             file's folder when relative, or FEDCART_STATE_DIR, resolved against the working \
             directory)",
            dir.display()
        ),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading the state directory {}", dir.display()));
        }
    }
    StateDir::open(dir).with_context(|| format!("opening the state directory {}", dir.display()))
}

/// The state `--run` names (the latest of any run without it); a run this
/// agent never worked for is an error listing the ones it did.
fn run_state(cfg: &AgentConfig, run: Option<&str>) -> anyhow::Result<StateDir> {
    let state = state_of(cfg)?;
    let Some(run) = run else { return Ok(state) };
    let known = state.runs();
    if !known.iter().any(|r| r == run) {
        anyhow::bail!(
            "--run {run}: this agent holds no model of that run (runs it holds: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    Ok(state.run(run)?)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli: Cli = fedcart_common::cli::parse();
    cli.log.init("info");
    fedcart_common::malloc::tune_for_transfers();
    let json = cli.log.log_json;
    match run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            report(&e, json);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints a fatal error as one line (each cause once), with what to fix when
/// the agent knows it; as a JSON log record under `--log-json`.
fn report(e: &anyhow::Error, json: bool) {
    use fedcart_client::agent::Chain;
    let line = Chain(e.as_ref()).to_string();
    let fix = fix_of(e);
    match (json, fix) {
        (true, fix) => {
            tracing::error!(error = %line, fix = fix.as_deref().unwrap_or(""), "fedcart-client stopped")
        }
        (false, Some(fix)) => eprintln!("error: {line} — fix: {fix}"),
        (false, None) => eprintln!("error: {line}"),
    }
}

/// What to fix for a fatal error, when known: the agent's own errors know
/// theirs, and so does a damaged state file met by a command that reads the
/// state (`score` and `budget` printed the JSON parser's words alone).
fn fix_of(e: &anyhow::Error) -> Option<String> {
    use fedcart_client::agent::AgentError;
    use fedcart_client::state::StateError;
    e.chain()
        .find_map(|c| c.downcast_ref::<AgentError>())
        .and_then(AgentError::what_to_fix)
        .or_else(|| {
            e.chain()
                .find_map(|c| {
                    c.downcast_ref::<StateError>().or_else(|| {
                        match c.downcast_ref::<recommend::RecommendError>() {
                            Some(recommend::RecommendError::State(s)) => Some(s),
                            _ => None,
                        }
                    })
                })
                .map(fedcart_client::agent::state_fix)
        })
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let cfg = AgentConfig::load(&config)?;
            let mut agent = Agent::from_config(&cfg).map_err(|e| {
                let fix = e.what_to_fix();
                let e = anyhow::Error::new(e).context(format!("merchant `{}`", cfg.merchant_id));
                match fix {
                    Some(fix) => anyhow::anyhow!("{e:#} — {fix}"),
                    None => e,
                }
            })?;
            match &cfg.tls {
                Some(t) => {
                    // A file the environment put there is named by its variable.
                    let from_env: Vec<&str> =
                        ["FEDCART_TLS_CA", "FEDCART_TLS_CERT", "FEDCART_TLS_KEY"]
                            .into_iter()
                            .filter(|v| std::env::var_os(v).is_some())
                            .collect();
                    let section = || match from_env.as_slice() {
                        [] => format!("the `tls` section of {}", config.display()),
                        vars => format!(
                            "the `tls` section of {} with {} from the environment",
                            config.display(),
                            vars.join(", ")
                        ),
                    };
                    agent.tls = Some(t.client_config().with_context(section)?);
                    agent = agent.with_key_identity(t.key_identity().with_context(section)?);
                }
                None if cfg.privacy.require_key_binding => tracing::warn!(
                    "no `tls` section: connecting in plaintext; secure rounds will be refused \
                     (privacy.require_key_binding needs the merchant's certificate key)"
                ),
                None => tracing::warn!("no `tls` section: connecting in plaintext"),
            }
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let which = cli::shutdown_signal().await;
                tracing::info!("{which}: leaving the coordinator");
                let _ = tx.send(true);
                cli::exit_on_second_signal();
            });
            agent
                .run(rx)
                .await
                .with_context(|| format!("merchant `{}`", cfg.merchant_id))?;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Prepare(args) => fedcart_client::prepare::run(&args)
            .map_err(|e| fedcart_client::prepare::cli_error(e, &args)),
        Command::Schema(args) => fedcart_client::schema::run(&args)
            // Each error names the file it is about (the table or --out).
            .context("drafting a schema"),
        Command::Recommend {
            config,
            customer,
            // Clap requires it when `--customer` is absent, and refuses both.
            best_sellers: _,
            k,
            include_repeats,
            repeat_weight,
            run,
        } => {
            recommend::check_k(k).context("--k")?;
            if let Some(w) = repeat_weight
                && !(0.0..=1.0).contains(&w)
            {
                anyhow::bail!("--repeat-weight must be in [0, 1], got {w}");
            }
            let cfg = AgentConfig::load(&config)?;
            // The best sellers need no model, so no state directory either
            // (before the agent first ran, they were refused for want of one).
            let state = match customer {
                Some(_) => Some(run_state(&cfg, run.as_deref())?),
                None => run_state(&cfg, run.as_deref()).ok(),
            };
            let interactions = data::interactions(&cfg)?.ok_or(data::DataError::NoInteractions)?;
            let rows = match &state {
                Some(state) => state
                    .mf_rows()
                    .context("reading the stored recommender")?
                    .unwrap_or(data::HASHED_ROWS_BEFORE_A_TASK),
                None => data::HASHED_ROWS_BEFORE_A_TASK,
            };
            let items = interactions.items(rows)?;
            let mf = interactions.mf(&items);
            let names = data::configured_item_names(&cfg)?;
            let opts = recommend::RecommendOptions {
                k,
                include_repeats,
                repeat_weight,
            };
            let recs = match customer {
                None => {
                    eprintln!(
                        "this merchant's best sellers (score: how many of its customers bought \
                         the item)"
                    );
                    recommend::best_sellers(&mf, &items, k)?
                }
                Some(customer) => {
                    let state = state.context("the state directory")?;
                    let answer =
                        recommend::recommend_from(&state, &mf, &items, &customer, &opts)
                            .with_context(|| format!("recommending for customer `{customer}`"))?;
                    // Which model ranked, on stderr: stdout stays the list.
                    eprintln!(
                        "recommender version {} of run `{}`, {} copy",
                        answer.version.version, answer.version.run_id, answer.copy
                    );
                    if let Some(note) = &answer.note {
                        eprintln!("note: {note}");
                    }
                    answer.items
                }
            };
            for r in recs {
                let item = fedcart_client::output::tsv_cell(&r.item);
                match names.get(&r.item) {
                    Some(name) => {
                        let name = fedcart_client::output::tsv_cell(name);
                        fedcart_common::outln!("{item}\t{:.4}\t{name}", r.score)?
                    }
                    None => fedcart_common::outln!("{item}\t{:.4}", r.score)?,
                }
            }
            Ok(())
        }
        Command::Score { config, out, run } => {
            let cfg = AgentConfig::load(&config)?;
            let table = data::CustomerTable::from_config(&cfg)?;
            let mut w = fedcart_client::output::Output::create(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            // A reading error names the table's file itself.
            let n = recommend::score(&run_state(&cfg, run.as_deref())?, &table, &mut w, &out)
                .map_err(|e| match (e, run.as_deref()) {
                    (e @ recommend::RecommendError::Load(_), _) => anyhow::Error::new(e),
                    // Of a named run, "no churn round yet" would be wrong:
                    // that run has no churn model (a recommender run, or one
                    // that stopped before any round finished here).
                    (recommend::RecommendError::NoChurnModel { held }, Some(run)) => {
                        anyhow::anyhow!(
                            "--run {run}: that run left no churn model with this agent (a run of \
                             another model, or one that stopped before a round finished here){}; \
                             leave out --run for the latest churn model",
                            if held.is_empty() {
                                String::new()
                            } else {
                                format!("; it holds: {}", held.join(", "))
                            }
                        )
                    }
                    (e, _) => {
                        anyhow::Error::new(e).context(format!("scoring {}", table.path.display()))
                    }
                })?;
            // Only now does the file replace the previous one.
            w.commit()
                .with_context(|| format!("writing {}", out.display()))?;
            if out != std::path::Path::new("-") {
                fedcart_common::outln!("wrote {n} churn scores to {}", out.display())?;
            }
            Ok(())
        }
        Command::Rules {
            config,
            out,
            min_confidence,
            top,
            run,
        } => {
            if !(0.0..=1.0).contains(&min_confidence) {
                anyhow::bail!("--min-confidence must be in [0, 1], got {min_confidence}");
            }
            let cfg = AgentConfig::load(&config)?;
            let orders = cfg
                .data
                .orders_csv
                .clone()
                .context("`data.orders_csv` is not configured")?;
            let baskets = data::load_baskets(&orders, &cfg)?;
            let cat = data::catalogue(
                cfg.data
                    .catalogue
                    .as_ref()
                    .expect("checked by load_baskets"),
            )?;
            let w = fedcart_client::rules::bought_together(
                &run_state(&cfg, run.as_deref())?,
                &cat,
                &baskets,
                min_confidence,
                usize::try_from(top).unwrap_or(usize::MAX),
                &out,
            )
            .with_context(|| format!("writing the bought-together lists to {}", out.display()))?;
            fedcart_common::outln!(
                "wrote {} rules for {} items to {} (from {} frequent itemsets over {} baskets of the federation)",
                w.rows,
                w.items,
                out.display(),
                w.itemsets,
                w.baskets
            )?;
            Ok(())
        }
        Command::Segments { config, out, run } => {
            let cfg = AgentConfig::load(&config)?;
            let table = data::CustomerTable::from_config(&cfg)?;
            let mut w = fedcart_client::output::Output::create(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let n = fedcart_client::segments::segments(
                &run_state(&cfg, run.as_deref())?,
                &table,
                &mut w,
                &out,
            )
            .map_err(|e| match e {
                e @ fedcart_client::segments::SegmentsError::Load(_) => anyhow::Error::new(e),
                e => anyhow::Error::new(e).context(format!("labelling {}", table.path.display())),
            })?;
            w.commit()
                .with_context(|| format!("writing {}", out.display()))?;
            if out != std::path::Path::new("-") {
                fedcart_common::outln!("wrote {n} customer segments to {}", out.display())?;
            }
            Ok(())
        }
        Command::Budget { config } => {
            let cfg = AgentConfig::load(&config)?;
            let no_cap = || {
                anyhow::anyhow!(
                    "{}: no `privacy.max_epsilon`, so the agent keeps no privacy ledger (set it to \
                     cap the ε this merchant's updates may spend over every run)",
                    config.display()
                )
            };
            if cfg.privacy.max_epsilon.is_none() && cfg.state_dir.is_none() {
                return Err(no_cap());
            }
            let Some((report, warning)) = fedcart_client::budget::command_report(
                state_of(&cfg)?,
                cfg.privacy.max_epsilon,
                cfg.privacy.epsilon_delta,
            )?
            else {
                return Err(no_cap());
            };
            fedcart_common::outln!("{}", report.trim_end())?;
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            Ok(())
        }
        Command::Fleet(args) => {
            let agents = fedcart_client::fleet::agents(&args).context("fleet")?;
            let sessions = agents.len();
            let range = args.indices();
            tracing::info!(sessions, first = %args.merchant_id(range.start),
                last = %args.merchant_id(range.end - 1), coordinator = %args.coordinator, "fleet starting");
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let which = cli::shutdown_signal().await;
                tracing::info!("{which}: the fleet leaves the coordinator");
                let _ = tx.send(true);
                cli::exit_on_second_signal();
            });
            let agents = fedcart_client::fleet::run(agents, rx)
                .await
                .context("fleet")?;
            let tasks: u64 = agents.iter().map(|a| a.tasks_done).sum();
            tracing::info!(sessions, tasks, "fleet stopped");
            Ok(())
        }
        Command::Serve(args) => {
            let cfg = AgentConfig::load(&args.config)?;
            let state = run_state(&cfg, args.run.as_deref())?;
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                // Ctrl-C or SIGTERM (Docker, Kubernetes, systemd): stop
                // accepting, finish the requests in flight.
                let which = cli::shutdown_signal().await;
                tracing::info!("{which}: stopping");
                let _ = tx.send(true);
                cli::exit_on_second_signal();
            });
            fedcart_client::serve::run(&args, &cfg, state, rx)
                .await
                .with_context(|| format!("serving {}", args.config.display()))?;
            tracing::info!("stopped");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// A damaged state file met by `score` (through the scorer's error) or
    /// `budget` (a bare state error) gets the agent's fix for it, as `run`
    /// does; the two printed the JSON parser's words alone.
    #[test]
    fn a_damaged_state_file_gets_its_fix_whichever_command_met_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("global-churn.json");
        std::fs::write(&path, "{\n").unwrap();
        let decode = || fedcart_client::state::StateError::Decode {
            path: path.clone(),
            source: serde_json::from_str::<serde_json::Value>("{").unwrap_err(),
        };
        let scored = anyhow::Error::new(recommend::RecommendError::State(decode()))
            .context("scoring orders.csv");
        let bare = anyhow::Error::new(decode());
        for e in [scored, bare] {
            let fix = fix_of(&e).unwrap_or_default();
            assert!(
                fix.contains("is damaged or unreadable: restore it"),
                "{fix}"
            );
        }
        assert_eq!(fix_of(&anyhow::anyhow!("something else")), None);
    }

    /// The usage line of `recommend` read `--customer <CUSTOMER>` as
    /// required, and a merchant after best sellers never learnt of
    /// `--best-sellers` from it; it names the two, either of which will do.
    #[test]
    fn recommend_usage_offers_a_customer_or_the_best_sellers() {
        let mut cli = Cli::command();
        let usage = cli
            .find_subcommand_mut("recommend")
            .unwrap()
            .render_usage()
            .to_string();
        assert!(
            usage.contains("<--customer <CUSTOMER>|--best-sellers>"),
            "{usage}"
        );
        for args in [
            &["recommend", "--config", "m.toml", "--customer", "c1"][..],
            &["recommend", "--config", "m.toml", "--best-sellers"],
        ] {
            Cli::try_parse_from(std::iter::once("fedcart-client").chain(args.iter().copied()))
                .unwrap();
        }
        let Err(err) = Cli::try_parse_from(["fedcart-client", "recommend", "--config", "m.toml"])
        else {
            panic!("neither --customer nor --best-sellers");
        };
        let err = err.to_string();
        assert!(
            err.contains("<--customer <CUSTOMER>|--best-sellers>"),
            "{err}"
        );
    }

    /// `--run` said "instead of the latest of any run", but without it the
    /// commands read the version served at the top of the state directory
    /// (model selection's best), and with it the run's latest version.
    #[test]
    fn run_says_what_is_read_with_and_without_it_on_every_command() {
        let cli = Cli::command();
        for name in ["recommend", "score", "segments", "rules", "serve"] {
            let command = cli.find_subcommand(name).unwrap();
            let run = command
                .get_arguments()
                .find(|a| a.get_id() == "run")
                .unwrap_or_else(|| panic!("{name} has no --run"));
            let help = run.get_help().unwrap().to_string();
            assert_eq!(help, fedcart_client::state::RUN_FLAG_HELP, "{name}");
            assert_eq!(run.get_long_help(), None, "{name}: --help shows the same");
            assert!(
                help.contains("latest version") && help.contains("[default: the version served"),
                "{name}: {help}"
            );
        }
    }
}
