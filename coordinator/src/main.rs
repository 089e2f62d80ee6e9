//! `fedcart-coordinator`: the platform operator's command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedcart_coordinator::config::CoordinatorConfig;
use fedcart_coordinator::{certs as ca, cli, runs, status};

/// The fedcart coordinator: orchestrates federated training rounds across
/// merchants and keeps every model version and round on disk.
#[derive(Parser)]
#[command(version, about, after_help = cli::LOGGING_HELP)]
struct Cli {
    #[command(flatten)]
    log: cli::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve runs over gRPC: the configuration's run (resumed if the store
    /// holds it), every unfinished run of the store, and the runs the
    /// operator submits with `runs submit`. Exits once every run has ended,
    /// unless --keep-serving. Ctrl-C or SIGTERM stops gracefully: no new
    /// connections or tasks, the rounds in flight are abandoned (attempted
    /// again after a restart, which resumes every run from its last
    /// committed version), agents are disconnected; a second signal exits
    /// at once.
    Serve {
        /// The coordinator's TOML configuration (see coordinator/examples/coordinator.toml).
        #[arg(long, env = "FEDCART_COORDINATOR_CONFIG")]
        config: PathBuf,
        /// Override `serve.listen` (env FEDCART_LISTEN).
        #[arg(long, env = "FEDCART_LISTEN", value_parser = fedcart_coordinator::config::parse_listen_addr)]
        listen: Option<std::net::SocketAddr>,
        /// Override `serve.store` (env FEDCART_STORE).
        #[arg(long, env = "FEDCART_STORE")]
        store: Option<PathBuf>,
        /// Serve plaintext gRPC without client identities (development only).
        /// The environment may ask for it with FEDCART_INSECURE (true/false,
        /// yes/no, on/off or 1/0); any other value there is an error.
        #[arg(long)]
        insecure: bool,
        /// Override `serve.http_listen`: `/metrics`, health and dashboard.
        #[arg(long, env = "FEDCART_HTTP_LISTEN", value_parser = fedcart_coordinator::config::parse_listen_addr)]
        http_listen: Option<std::net::SocketAddr>,
        /// Override `serve.http_token_file`: the operator's bearer token for
        /// every HTTP route but /healthz and /readyz [default with TLS:
        /// operator.token beside the CA].
        #[arg(long, env = "FEDCART_HTTP_TOKEN_FILE")]
        http_token_file: Option<PathBuf>,
        /// Keep serving after every run has ended, for runs the operator
        /// submits later (`runs submit`); finished runs stay viewable.
        #[arg(long)]
        keep_serving: bool,
    },
    /// The operator's runs: submit a run, list every run, show or stop one
    /// (the coordinator's `Admin` RPCs; an operator certificate is needed).
    Runs {
        #[command(subcommand)]
        action: RunsAction,
        #[command(flatten)]
        conn: Conn,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Development CA: create it with the operator's identity, issue merchant (or operator)
    /// certificates, revoke certificates.
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Show the current run, round, connected agents and last metrics.
    Status {
        /// Coordinator URL (`https://host:port`).
        #[arg(
            long,
            env = "FEDCART_COORDINATOR",
            default_value = "https://127.0.0.1:50051"
        )]
        coordinator: String,
        /// Certificate directory holding ca.pem and `<identity>.pem/.key`.
        #[arg(long)]
        certs: Option<PathBuf>,
        /// Identity whose certificate to present: the operator `certs init`
        /// made sees every merchant; a merchant's certificate sees only itself.
        #[arg(long, default_value = "operator")]
        identity: String,
        /// Name to verify on the coordinator's certificate [default: the
        /// URL's host].
        #[arg(long)]
        domain: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The run to describe (`runs list` names them); default: the run
        /// `serve --config` submitted, else the latest submitted.
        #[arg(long, value_name = "RUN_ID")]
        run: Option<String>,
    },
    /// Plan a differential-privacy budget: ε for a noise multiplier, or the
    /// smallest noise multiplier that reaches a target ε.
    Privacy(fedcart_coordinator::privacy::PrivacyArgs),
}

/// How the operator's commands reach the coordinator.
#[derive(clap::Args)]
struct Conn {
    /// Coordinator URL (`https://host:port`).
    #[arg(
        long,
        global = true,
        env = "FEDCART_COORDINATOR",
        default_value = "https://127.0.0.1:50051"
    )]
    coordinator: String,
    /// Certificate directory holding ca.pem and `<identity>.pem/.key`.
    #[arg(long, global = true)]
    certs: Option<PathBuf>,
    /// Identity whose certificate to present (an operator's).
    #[arg(long, global = true, default_value = "operator")]
    identity: String,
    /// Name to verify on the coordinator's certificate [default: the URL's
    /// host].
    #[arg(long, global = true)]
    domain: Option<String>,
}

impl Conn {
    fn tls(&self) -> Option<status::ClientTls> {
        self.certs.as_ref().map(|d| status::ClientTls {
            ca: d.join("ca.pem"),
            cert: d.join(format!("{}.pem", self.identity)),
            key: d.join(format!("{}.key", self.identity)),
            domain: self.domain.clone(),
        })
    }
}

#[derive(Subcommand)]
enum RunsAction {
    /// Submit a run: a TOML file with a `[run]` table (a coordinator.toml
    /// works as it is) or the run's keys at the top level. It starts as soon
    /// as enough merchants whose data serves its model are connected,
    /// beside the runs already going.
    Submit {
        /// The run's TOML.
        #[arg(long)]
        config: PathBuf,
    },
    /// List every run, active and finished: round X of N, phase.
    List,
    /// Show one run, with its configuration.
    Show {
        /// The run's id.
        id: String,
    },
    /// Stop a run: the task in flight is abandoned, the committed versions
    /// stand, no further task starts.
    Stop {
        /// The run's id.
        id: String,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Create the CA and the coordinator's certificate in `dir`.
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// DNS names or IPs the coordinator's certificate is valid for.
        #[arg(long = "host", default_values = ["localhost", "127.0.0.1"])]
        hosts: Vec<String>,
    },
    /// Issue a client certificate for a merchant (and add it to the allow-list),
    /// or with --operator for another platform operator.
    Issue {
        /// Certificate directory made by `init`.
        #[arg(long)]
        dir: PathBuf,
        /// Merchant id (the certificate's `fedcart://merchant/<id>` SAN), or
        /// the operator's name with --operator.
        #[arg(long)]
        id: String,
        /// Issue an operator certificate (`fedcart://operator/<id>`): status
        /// and admin RPCs, never training; not added to the allow-list.
        #[arg(long, conflicts_with = "kit")]
        operator: bool,
        /// Replace an identity already issued in `dir` (the old certificate
        /// stays valid until revoked).
        #[arg(long)]
        force: bool,
        /// Access file to add the merchant to (default `<dir>/access.toml`).
        #[arg(long)]
        access: Option<PathBuf>,
        /// Also write the merchant's ready-to-run kit into this folder: its
        /// key and certificate, the CA certificate, a `data/` folder and a
        /// `merchant.toml` with relative paths.
        #[arg(long, requires = "coordinator_url")]
        kit: Option<PathBuf>,
        /// The coordinator's URL as merchants reach it (`https://host:port`),
        /// written into the kit.
        #[arg(long, requires = "kit")]
        coordinator_url: Option<String>,
        /// Name to verify on the coordinator's certificate, when it is not
        /// the URL's host.
        #[arg(long, requires = "kit")]
        domain: Option<String>,
    },
    /// Revoke the certificate issued for an id (by its serial): refused from
    /// its next RPC on, no restart needed. A certificate issued later for the
    /// same id is not affected.
    Revoke {
        /// Access file (the coordinator's `serve.tls.access`) [default:
        /// `<dir>/access.toml`, where `issue` adds merchants].
        #[arg(long, required_unless_present = "dir")]
        access: Option<PathBuf>,
        /// Merchant id (or operator name).
        #[arg(long)]
        id: String,
        /// Certificate directory the id was issued in [default: the access
        /// file's directory].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Revoke this serial number (hex) instead of the certificate file's.
        #[arg(long)]
        serial: Option<String>,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // Already logged once, with its cause, when the task loop failed
        // or the run stopped.
        Err(e)
            if e.downcast_ref::<fedcart_coordinator::server::TaskLoopFailed>()
                .is_some()
                || e.downcast_ref::<fedcart_coordinator::server::RunStopped>()
                    .is_some() =>
        {
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {}", cli::one_line(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli: Cli = fedcart_common::cli::parse();
    cli.log.init("info");
    fedcart_common::malloc::tune_for_transfers();
    match cli.command {
        Command::Certs { action } => certs(action),
        Command::Status {
            coordinator,
            certs,
            identity,
            domain,
            json,
            run,
        } => {
            let presented = certs.is_some().then_some(identity.as_str());
            let tls = certs.map(|d| status::ClientTls {
                ca: d.join("ca.pem"),
                cert: d.join(format!("{identity}.pem")),
                key: d.join(format!("{identity}.key")),
                domain,
            });
            let s = status::fetch(&coordinator, tls.as_ref(), run.as_deref())
                .await
                .map_err(|e| status::with_hint(e, &coordinator, presented))?;
            if json {
                fedcart_common::outln!("{}", serde_json::to_string_pretty(&status::to_json(&s))?)?;
            } else {
                fedcart_common::outln!("{}", status::to_table(&s))?;
            }
            Ok(())
        }
        Command::Runs { action, conn, json } => {
            let action = match action {
                RunsAction::Submit { config } => runs::Action::Submit(config),
                RunsAction::List => runs::Action::List,
                RunsAction::Show { id } => runs::Action::Show(id),
                RunsAction::Stop { id } => runs::Action::Stop(id),
            };
            let tls = conn.tls();
            let answer = runs::call(&conn.coordinator, tls.as_ref(), &action)
                .await
                .map_err(|e| {
                    status::with_hint(
                        e,
                        &conn.coordinator,
                        conn.certs.is_some().then_some(conn.identity.as_str()),
                    )
                })?;
            match (json, &action) {
                (true, runs::Action::List) => fedcart_common::outln!(
                    "{}",
                    serde_json::to_string_pretty(
                        &answer.iter().map(runs::to_json).collect::<Vec<_>>()
                    )?
                )?,
                (true, _) => {
                    for r in &answer {
                        fedcart_common::outln!(
                            "{}",
                            serde_json::to_string_pretty(&runs::to_json(r))?
                        )?;
                    }
                }
                (false, runs::Action::Show(_)) => {
                    for r in &answer {
                        fedcart_common::outln!("{}", runs::to_detail(r))?;
                    }
                }
                (false, _) => print!("{}", runs::to_table(&answer)),
            }
            Ok(())
        }
        Command::Serve {
            config,
            listen,
            store,
            insecure,
            http_listen,
            http_token_file,
            keep_serving,
        } => {
            let env = std::env::var_os(fedcart_coordinator::tls::INSECURE_ENV);
            let insecure = insecure || fedcart_coordinator::tls::insecure_from_env(env.as_deref())?;
            let mut cfg = CoordinatorConfig::load(&config).map_err(|e| match e {
                // The other errors name the file already.
                e @ fedcart_coordinator::config::ConfigError::Invalid { .. } => {
                    anyhow::Error::new(e).context(config.display().to_string())
                }
                e => anyhow::Error::new(e),
            })?;
            if let Some(l) = listen {
                cfg.serve.listen = l;
            }
            if let Some(s) = store {
                cfg.serve.store = s;
            }
            if http_listen.is_some() {
                cfg.serve.http_listen = http_listen;
            }
            if http_token_file.is_some() {
                cfg.serve.http_token_file = http_token_file;
            }
            if cfg.serve.http_listen == Some(cfg.serve.listen) {
                anyhow::bail!(
                    "{}: `serve.http_listen` and `serve.listen` (or --http-listen and --listen) \
                     are both {}: the HTTP listener (/metrics, dashboard) needs a port of its own",
                    config.display(),
                    cfg.serve.listen
                );
            }
            let running = fedcart_coordinator::server::start_from_config(&cfg, insecure)
                .await
                .with_context(|| format!("starting from {}", config.display()))?;
            tracing::info!(addr = %running.addr, "coordinator listening");
            let mut progress = running.progress.clone();
            let hub = std::sync::Arc::clone(&running.hub);
            let all_ended = async {
                if keep_serving {
                    // Only a failed task loop (logged where it happened)
                    // ends a coordinator that keeps serving.
                    let _ = progress.wait_for(|p| p.failed.is_some()).await;
                } else {
                    hub.wait_all_ended().await;
                }
            };
            tokio::select! {
                which = cli::shutdown_signal() => {
                    tracing::info!("{which}: shutting down (the rounds in flight are abandoned; a restart resumes)");
                    cli::exit_on_second_signal();
                }
                // A failed task loop was logged where it happened; `shutdown`
                // returns its error.
                () = all_ended => {
                    if hub.failed().is_none()
                        && running.shared.stopped().is_none_or(|s| s.is_planned())
                    {
                        tracing::info!("run finished; shutting down");
                    }
                }
            }
            running.shutdown().await?;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Privacy(args) => {
            fedcart_common::outln!("{}", fedcart_coordinator::privacy::run(&args)?)?;
            Ok(())
        }
    }
}

/// The serial of the certificate a forced `certs issue` of `id` replaces,
/// read before it is overwritten: the file was the only record of it, and
/// `certs revoke --id` reaches only the file's new certificate.
fn replaced_serial(dir: &ca::CertDir, id: &str, force: bool) -> Option<String> {
    force.then(|| ca::serial_of_file(&dir.cert(id)).ok())?
}

/// Says that the replaced certificate stays valid, and how to revoke it
/// (a renewal after a leaked key left the leaked one working, with its
/// serial printed nowhere; found by an operator probe).
fn replaced_note(dir: &std::path::Path, id: &str, serial: &str) -> String {
    format!(
        "the certificate this replaces (serial {serial}) stays valid until revoked; if its key \
         must stop working (a renewal after a leak), run `fedcart-coordinator certs revoke --dir \
         {} --id {id} --serial {serial}`",
        dir.display()
    )
}

fn certs(action: CertsAction) -> anyhow::Result<()> {
    match action {
        CertsAction::Init { dir, hosts } => {
            ca::init(&ca::CertDir::new(&dir), &hosts)?;
            fedcart_common::outln!(
                "CA, coordinator certificate and the operator's identity ({op}.pem/{op}.key for \
                 `status`, {token} for the HTTP endpoints) written to {dir}",
                op = ca::OPERATOR,
                token = ca::OPERATOR_TOKEN,
                dir = dir.display()
            )?;
        }
        CertsAction::Issue {
            dir,
            id,
            operator: true,
            force,
            ..
        } => {
            let replaced = replaced_serial(&ca::CertDir::new(&dir), &id, force);
            ca::issue_kind(&ca::CertDir::new(&dir), &id, ca::Kind::Operator, force)?;
            fedcart_common::outln!(
                "issued operator {0}.pem/{0}.key in {1} (`status --identity {0}`)",
                id,
                dir.display()
            )?;
            if let Some(serial) = replaced {
                fedcart_common::outln!("{}", replaced_note(&dir, &id, &serial))?;
            }
        }
        CertsAction::Issue {
            dir,
            id,
            operator: false,
            force,
            access,
            kit,
            coordinator_url,
            domain,
        } => {
            let pki = ca::CertDir::new(&dir);
            // Check the kit's URL before anything is issued.
            if let Some(url) = &coordinator_url {
                ca::check_coordinator_url(url)?;
            }
            if let Some(kit) = &kit {
                ca::check_kit(&id, kit, force)?;
            }
            let replaced = replaced_serial(&pki, &id, force);
            ca::issue_kind(&pki, &id, ca::Kind::Merchant, force)?;
            let access = access.unwrap_or_else(|| pki.access());
            ca::allow(&access, &id)?;
            fedcart_common::outln!(
                "issued {0}.pem/{0}.key in {1}; allowed in {2}{3}",
                id,
                dir.display(),
                access.display(),
                if kit.is_some() && coordinator_url.is_some() {
                    "; the key moves into the kit, and only there"
                } else {
                    ""
                }
            )?;
            if let Some(serial) = replaced {
                fedcart_common::outln!("{}", replaced_note(&dir, &id, &serial))?;
            }
            if let (Some(kit), Some(url)) = (&kit, &coordinator_url) {
                let written = ca::write_kit(&pki, &id, kit, url, domain.as_deref(), force)?;
                if written == ca::KitWritten::IdentityRenewed {
                    fedcart_common::outln!(
                        "kit for `{id}` in {0}: key, certificate and CA renewed; its {1}, data and \
                         state kept (restart the merchant's agent to use the new certificate)",
                        kit.display(),
                        ca::KIT_CONFIG
                    )?;
                    return Ok(());
                }
                fedcart_common::outln!(
                    "kit for `{id}` written to {0}: put the merchant's orders export in \
                     {0}/data/orders.csv (its columns mapped under [data.orders] in {0}/{1}; or set \
                     FEDCART_DATA_ORDERS_CSV) and run `fedcart-client run --config {0}/{1}`",
                    kit.display(),
                    ca::KIT_CONFIG
                )?;
            }
        }
        CertsAction::Revoke {
            access,
            id,
            dir,
            serial,
        } => {
            let (access, dir) = ca::revoke_paths(access, dir)?;
            let done = ca::revoke(&access, &dir, &id, serial.as_deref())?;
            if let Some(w) = &done.warning {
                eprintln!("warning: {w}");
            }
            if done.already {
                // Said, not silent: a second revoke of the same file is
                // usually a wrong --dir or id (the certificate meant is
                // still admitted).
                fedcart_common::outln!(
                    "the certificate of `{id}` (serial {}) was already revoked in {}; nothing \
                     changed",
                    done.serial,
                    access.display()
                )?;
            } else {
                fedcart_common::outln!(
                    "revoked the certificate of `{id}` (serial {}) in {}",
                    done.serial,
                    access.display()
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `fedcart-coordinator <args>`, which must be a `certs` command.
    fn certs_command<'a>(args: impl IntoIterator<Item = &'a str>) -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(std::iter::once("fedcart-coordinator").chain(args))?;
        let Command::Certs { action } = cli.command else {
            anyhow::bail!("not a certs command");
        };
        certs(action)
    }

    /// Runs the `fedcart-coordinator …` command quoted in `text`.
    fn run_quoted_command(text: &str) {
        let command = text
            .split('`')
            .find_map(|s| s.strip_prefix("fedcart-coordinator "))
            .unwrap_or_else(|| panic!("no command in: {text}"));
        certs_command(command.split_whitespace()).unwrap_or_else(|e| panic!("`{command}`: {e}"));
    }

    /// A CA directory made by `certs init`, with merchant `m0` issued.
    fn pki_with_m0() -> (tempfile::TempDir, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let pki = tmp.path().join("pki");
        let dir = pki.to_str().unwrap();
        certs_command(["certs", "init", "--dir", dir]).unwrap();
        certs_command(["certs", "issue", "--dir", dir, "--id", "m0"]).unwrap();
        (tmp, pki)
    }

    /// `certs issue` over an issued id hinted at `certs revoke --id m0`,
    /// which clap refused for want of --access: the hint now names the
    /// directory, and `revoke --dir` finds its access file there.
    #[test]
    fn the_revoke_hint_of_a_second_issue_runs_as_written() {
        let (_tmp, pki) = pki_with_m0();
        let dir = pki.to_str().unwrap();
        let issue = ["certs", "issue", "--dir", dir, "--id", "m0"];
        run_quoted_command(&certs_command(issue).unwrap_err().to_string());
        let serial = ca::serial_of_file(&pki.join("m0.pem")).unwrap();
        let access = std::fs::read_to_string(pki.join("access.toml")).unwrap();
        assert!(access.contains(&serial), "{access}");
    }

    /// A forced re-issue (a renewal) names the certificate it replaces and
    /// the command that revokes it, which revokes that one and not the new.
    #[test]
    fn a_renewal_names_the_replaced_certificate_and_how_to_revoke_it() {
        let (_tmp, pki) = pki_with_m0();
        let dir = pki.to_str().unwrap();
        let issue = ["certs", "issue", "--dir", dir, "--id", "m0"];
        let certs = ca::CertDir::new(&pki);
        let old = ca::serial_of_file(&pki.join("m0.pem")).unwrap();
        assert_eq!(replaced_serial(&certs, "m0", false), None);
        let replaced = replaced_serial(&certs, "m0", true).unwrap();
        assert_eq!(replaced, old);
        certs_command(issue.into_iter().chain(["--force"])).unwrap();
        let new = ca::serial_of_file(&pki.join("m0.pem")).unwrap();
        assert_ne!(new, old);
        run_quoted_command(&replaced_note(&pki, "m0", &replaced));
        let access = std::fs::read_to_string(pki.join("access.toml")).unwrap();
        assert!(access.contains(&old) && !access.contains(&new), "{access}");
    }
}
