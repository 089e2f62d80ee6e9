//! What the command-line front ends share (`fedcart-coordinator`,
//! `fedcart-client` and `fedcart-sim`; behind the `cli` feature, so the
//! library users of `fedcart-common` do not link clap or a subscriber):
//! logging to stderr with `-q`/`-v`/`--log-json`/`RUST_LOG`, SIGTERM handled
//! like Ctrl-C, and errors printed on one line with each cause once.

use std::error::Error as StdError;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The logging flags every binary takes (global: before or after the
/// subcommand).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log less: warnings and errors only (-qq: errors only).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "verbose")]
    pub quiet: u8,
    /// Log more: -v debug, -vv trace (fedcart's own modules).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log as JSON lines instead of human-readable text
    /// (FEDCART_LOG_JSON takes true/false, yes/no, on/off or 1/0).
    #[arg(long, global = true, env = "FEDCART_LOG_JSON", value_parser = parse_env_bool)]
    pub log_json: bool,
}

/// The `--help` paragraph on logging, shared by the binaries.
pub const LOGGING_HELP: &str = "\
Logging: to stderr, in colour only on a terminal. -q/-v lower/raise the level; \
RUST_LOG, when set, overrides them with tracing's filter syntax \
(e.g. RUST_LOG=info,fedcart_coordinator::service=debug). \
FEDCART_LOG_JSON=true logs JSON lines.";

const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

impl LogArgs {
    /// The filter for a binary whose default level is `default`
    /// (`"info"` or `"warn"`): `RUST_LOG` if set, else the default moved by
    /// `-q`/`-v`. Above `info` only fedcart's own crates get louder.
    pub fn filter(&self, default: &str) -> EnvFilter {
        self.filter_with(std::env::var("RUST_LOG").ok().as_deref(), default)
            .0
    }

    /// [`filter`](Self::filter) with `rust_log` as `RUST_LOG`'s value, and
    /// the warning to log when that value is not a valid filter (it is then
    /// ignored, but said so: a typo must not silently log at another level).
    fn filter_with(&self, rust_log: Option<&str>, default: &str) -> (EnvFilter, Option<String>) {
        let mut warning = None;
        if let Some(value) = rust_log.filter(|v| !v.trim().is_empty()) {
            match EnvFilter::try_new(value) {
                Ok(f) => return (f, None),
                Err(e) => {
                    warning = Some(format!(
                        "RUST_LOG={value:?} is not a valid log filter ({e}); ignored, logging at \
                         the default level (example: RUST_LOG=info,fedcart_coordinator::service=debug)"
                    ));
                }
            }
        }
        (self.flag_filter(default), warning)
    }

    /// The default level moved by `-q`/`-v`.
    fn flag_filter(&self, default: &str) -> EnvFilter {
        let base = LEVELS.iter().position(|l| *l == default).unwrap_or(2) as i32;
        // `-q` is "warnings and errors only", `-qq` "errors only", whatever
        // the default: the simulator's default is already `warn`, and `-q`
        // moving one level down from it hid the warnings it promises.
        let at = match self.quiet {
            0 => (base + i32::from(self.verbose)).clamp(0, 4),
            1 => base.min(1),
            _ => 0,
        } as usize;
        let level = LEVELS[at];
        if at <= 2 {
            return EnvFilter::new(level);
        }
        let ours = [
            "fedcart_coordinator",
            "fedcart_client",
            "fedcart_common",
            "fedcart_sim",
        ]
        .map(|c| format!("{c}={level}"))
        .join(",");
        EnvFilter::new(format!("{},{ours}", LEVELS[at - 1]))
    }

    /// Installs the global subscriber: stderr, ANSI colours only when
    /// stderr is a terminal, text or JSON.
    pub fn init(&self, default: &str) {
        let (filter, warning) =
            self.filter_with(std::env::var("RUST_LOG").ok().as_deref(), default);
        // A log line that cannot be written (the reader of stderr went
        // away: `2>&1 | head`, a log shipper restarting) is dropped: the
        // subscriber's own report of it went through `eprintln!`, whose
        // panic on a broken pipe took a coordinator or agent down mid-round.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .log_internal_errors(false);
        if self.log_json {
            builder.json().init();
        } else {
            builder.with_ansi(std::io::stderr().is_terminal()).init();
        }
        if let Some(w) = warning {
            tracing::warn!("{w}");
        }
    }
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM, the signal Docker, Kubernetes and
/// systemd stop a service with; returns which one came.
pub async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupt",
                _ = term.recv() => "SIGTERM",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "interrupt"
}

/// After the first signal started a graceful stop, a second one ends the
/// process at once (exit status 130).
pub fn exit_on_second_signal() {
    tokio::spawn(async {
        let which = shutdown_signal().await;
        eprintln!("second {which}: exiting without waiting");
        std::process::exit(130);
    });
}

/// Writes `text` and a newline to standard output. A reader that went away
/// (`| head -1`, `| true`) ends the program quietly with status 0, as it
/// ends `cat` or `ripgrep`, instead of the panic `println!` gives; any other
/// write error is returned. The binaries print their results through
/// [`outln!`](crate::outln).
pub fn print(text: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out
        .write_fmt(text)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        result => result,
    }
}

/// `println!` for the binaries' results, through [`print`]: a closed pipe
/// ends the program quietly; evaluates to `std::io::Result<()>`.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::print(format_args!($($arg)*))
    };
}

/// An error and its causes on one line, `outer: inner: …`, each cause once:
/// a cause whose text the line already holds is skipped (transport errors
/// often repeat their source in their own message).
pub fn one_line(err: &(dyn StdError + 'static)) -> String {
    let mut line = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        next = e.source();
    }
    line
}

/// What every boolean environment variable (`FEDCART_LOG_JSON`,
/// `FEDCART_INSECURE`) takes, in any case, for the messages that refuse
/// another value.
pub const ENV_BOOL_VALUES: &str = "true/false, yes/no, on/off or 1/0";

/// Reads a boolean environment variable's value: one of
/// [`ENV_BOOL_VALUES`], in any case. Anything else, an empty value or a
/// typo included, is an error rather than a guess: one variable switches
/// TLS off.
pub fn parse_env_bool(s: &str) -> Result<bool, String> {
    const TRUE: [&str; 4] = ["true", "yes", "on", "1"];
    const FALSE: [&str; 4] = ["false", "no", "off", "0"];
    if TRUE.iter().any(|t| s.eq_ignore_ascii_case(t)) {
        Ok(true)
    } else if FALSE.iter().any(|f| s.eq_ignore_ascii_case(f)) {
        Ok(false)
    } else {
        Err(format!("`{s}` is not a yes or no: write {ENV_BOOL_VALUES}"))
    }
}

/// A listening address, `IP:PORT`. A host name (`localhost:50051`) is
/// refused with the addresses that mean what it usually does: a listener
/// binds an interface, and names are not resolved. The examples keep the
/// port written: the flags that parse with this listen for different
/// services (gRPC, HTTP), and one fixed port suited only one of them.
pub fn parse_listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        let port = s
            .trim()
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .map_or_else(|| "PORT".to_string(), |p| p.to_string());
        format!(
            "`{s}` is not IP:PORT: write e.g. 127.0.0.1:{port} (this host only) or \
             0.0.0.0:{port} (every interface); host names are not resolved"
        )
    })
}

/// Parses the command line as `C::parse` does, except that a value refused
/// for a flag that an environment variable set (`FEDCART_LISTEN=bogus`) says
/// so: clap names only the flag, which a container's user never passed.
pub fn parse<C: clap::Parser>() -> C {
    match C::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let note = matches!(
                e.kind(),
                clap::error::ErrorKind::InvalidValue | clap::error::ErrorKind::ValueValidation
            )
            .then(|| env_note(&C::command(), &e.to_string(), |v| std::env::var_os(v)))
            .flatten();
            match note {
                Some(note) => {
                    let _ = e.print();
                    eprintln!("{note}");
                    std::process::exit(e.exit_code());
                }
                None => e.exit(),
            }
        }
    }
}

/// The note for a refused value: the first argument of `cmd` (or its
/// subcommands) named in `error` whose environment variable `env` has set.
fn env_note(
    cmd: &clap::Command,
    error: &str,
    env: impl Fn(&str) -> Option<std::ffi::OsString> + Copy,
) -> Option<String> {
    for arg in cmd.get_arguments() {
        let (Some(long), Some(var)) = (arg.get_long(), arg.get_env()) else {
            continue;
        };
        let var = var.to_string_lossy();
        // The refused value is the variable's (a flag given wins over it);
        // an empty one clap calls missing ("a value is required for …": a
        // compose or systemd line whose value expanded to nothing).
        let refused = error
            .split("invalid value '")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .or_else(|| error.contains("a value is required for").then_some(""));
        if error.contains(&format!("'--{long}"))
            && let Some(value) = env(&var).filter(|v| Some(&*v.to_string_lossy()) == refused)
        {
            if value.is_empty() {
                return Some(format!(
                    "note: the value comes from the environment variable {var}, which is set but \
                     empty, as --{long} was not given: give {var} a value or unset it"
                ));
            }
            return Some(format!(
                "note: the value comes from the environment variable {var} (set to `{}`), as \
                 --{long} was not given: fix or unset {var}",
                value.to_string_lossy()
            ));
        }
    }
    cmd.get_subcommands()
        .find_map(|sub| env_note(sub, error, env))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value clap refuses for a flag the environment set names the
    /// variable (clap named only `--listen`, which the user never passed).
    #[test]
    fn a_refused_value_from_the_environment_names_the_variable() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            command: Sub,
        }
        #[derive(clap::Subcommand)]
        enum Sub {
            Serve {
                #[arg(long, env = "FEDCART_TEST_LISTEN", value_parser = parse_listen_addr)]
                listen: std::net::SocketAddr,
            },
        }
        use clap::{CommandFactory, Parser};
        let env = |v: &str| (v == "FEDCART_TEST_LISTEN").then(|| "bogus".into());
        let error = "error: invalid value 'bogus' for '--listen <LISTEN>': `bogus` is not IP:PORT";
        let note = env_note(&Cli::command(), error, env).unwrap();
        assert!(
            note.contains("FEDCART_TEST_LISTEN (set to `bogus`)")
                && note.contains("--listen was not given"),
            "{note}"
        );
        // The flag given on the command line (its value refused): no note.
        let given = "error: invalid value 'x:1' for '--listen <LISTEN>'";
        assert_eq!(env_note(&Cli::command(), given, env), None);
        // Not set: no note; another flag's error: no note.
        assert_eq!(env_note(&Cli::command(), error, |_| None), None);
        assert_eq!(
            env_note(
                &Cli::command(),
                "error: invalid value 'x' for '--other <X>'",
                env
            ),
            None
        );
        let _ = Cli::try_parse_from(["x", "serve", "--listen", "127.0.0.1:1"]).unwrap();
        // Set but empty (a compose line whose value expanded to nothing):
        // clap says a value is required for a flag never typed. A new-user
        // probe met it with FEDCART_STORE.
        let empty = |v: &str| (v == "FEDCART_TEST_LISTEN").then(std::ffi::OsString::new);
        let missing = "error: a value is required for '--listen <LISTEN>' but none was supplied";
        let note = env_note(&Cli::command(), missing, empty).unwrap();
        assert_eq!(
            note,
            "note: the value comes from the environment variable FEDCART_TEST_LISTEN, which is \
             set but empty, as --listen was not given: give FEDCART_TEST_LISTEN a value or unset \
             it"
        );
        // Not empty, or not set: the flag itself lacked its value.
        assert_eq!(env_note(&Cli::command(), missing, env), None);
        assert_eq!(env_note(&Cli::command(), missing, |_| None), None);
    }

    /// `serve --http localhost:47782` was told to write 127.0.0.1:50051,
    /// the coordinator's gRPC port: the examples keep the port written.
    #[test]
    fn a_host_name_listen_address_is_answered_with_the_port_given() {
        assert_eq!(
            parse_listen_addr("localhost:47782").unwrap_err(),
            "`localhost:47782` is not IP:PORT: write e.g. 127.0.0.1:47782 (this host only) or \
             0.0.0.0:47782 (every interface); host names are not resolved"
        );
        let e = parse_listen_addr("localhost").unwrap_err();
        assert!(
            e.contains("write e.g. 127.0.0.1:PORT (this host only)"),
            "{e}"
        );
        assert_eq!(
            parse_listen_addr(" [::1]:8080 "),
            Ok("[::1]:8080".parse().unwrap())
        );
    }

    /// FEDCART_LOG_JSON took yes/no and on/off, FEDCART_INSECURE only
    /// true/1 and false/0: both read one set now, through this parser.
    #[test]
    fn boolean_environment_values_are_one_set_for_every_variable() {
        for yes in ["true", "yes", "on", "1", "TRUE", "Yes"] {
            assert_eq!(parse_env_bool(yes), Ok(true), "{yes}");
        }
        for no in ["false", "no", "off", "0", "Off"] {
            assert_eq!(parse_env_bool(no), Ok(false), "{no}");
        }
        for bad in ["", "ture", "2", " true", "y"] {
            let e = parse_env_bool(bad).unwrap_err();
            assert!(e.ends_with(ENV_BOOL_VALUES), "{e}");
        }
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            log: LogArgs,
        }
        assert!(
            Cli::try_parse_from(["x", "--log-json"])
                .unwrap()
                .log
                .log_json
        );
        assert!(!Cli::try_parse_from(["x"]).unwrap().log.log_json);
    }

    #[test]
    fn a_repeated_cause_is_printed_once() {
        let e = anyhow::anyhow!("tcp connect error")
            .context("tcp connect error")
            .context("connecting to https://x");
        assert_eq!(
            one_line(e.as_ref()),
            "connecting to https://x: tcp connect error"
        );
    }

    #[test]
    fn quiet_and_verbose_move_the_default_level() {
        // RUST_LOG, when set, wins over the flags.
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        let f = |q, v, d| {
            LogArgs {
                quiet: q,
                verbose: v,
                log_json: false,
            }
            .filter(d)
            .to_string()
        };
        assert_eq!(f(0, 0, "info"), "info");
        assert_eq!(f(1, 0, "info"), "warn");
        assert_eq!(f(0, 0, "warn"), "warn");
        // As `--help` says: -q warnings and errors only, -qq errors only,
        // also where the default is `warn` (the simulator).
        assert_eq!(f(1, 0, "warn"), "warn");
        assert_eq!(f(2, 0, "warn"), "error");
        assert_eq!(f(2, 0, "info"), "error");
        assert_eq!(f(0, 1, "warn"), "info");
        assert!(
            f(0, 1, "info").contains("fedcart_client=debug"),
            "{}",
            f(0, 1, "info")
        );
    }

    /// A valid `RUST_LOG` wins over the flags; an invalid one is ignored
    /// with a warning naming it (it used to be ignored silently), and an
    /// empty one is as if unset.
    #[test]
    fn an_invalid_rust_log_is_named_not_silently_ignored() {
        let args = LogArgs {
            quiet: 1,
            ..LogArgs::default()
        };
        let (f, w) = args.filter_with(Some("debug,fedcart_client=trace"), "info");
        assert_eq!(
            (f.to_string().contains("fedcart_client=trace"), w),
            (true, None)
        );
        let (f, w) = args.filter_with(Some("info,fedcart_client=loud"), "info");
        assert_eq!(f.to_string(), "warn", "the flags' level");
        let w = w.expect("a warning");
        assert!(
            w.contains("RUST_LOG=\"info,fedcart_client=loud\" is not a valid log filter")
                && w.contains("ignored"),
            "{w}"
        );
        let (f, w) = args.filter_with(Some(" "), "info");
        assert_eq!((f.to_string(), w), ("warn".to_string(), None));
    }
}
