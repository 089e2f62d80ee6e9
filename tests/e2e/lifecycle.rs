//! The agent's and the coordinator's lifecycle, with the real binaries: a
//! permanent error ends `fedcart-client run` with exit status 1 and one
//! line naming the cause and what to fix (one test per cause), and SIGTERM
//! stops either binary gracefully, after which a restart resumes the run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedcart_coordinator::certs::{self, CertDir};
use fedcart_coordinator::server::{Running, ServeOptions, start_with};
use fedcart_coordinator::store::Store;
use fedcart_coordinator::tls::{TlsFiles, Transport};
use fedcart_tests::*;
use tokio::net::TcpListener;

/// A guard against a hang: permanent errors end the agent within seconds.
const EXIT_LIMIT: Duration = Duration::from_secs(60);

/// A development CA with merchants m0 and m1 allowed, and a second,
/// unrelated CA with its own m0 (`other`).
struct Pki {
    dir: tempfile::TempDir,
    ours: CertDir,
    files: TlsFiles,
    other: CertDir,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ours = CertDir::new(dir.path().join("pki"));
    certs::init(&ours, &["localhost".into()]).unwrap();
    let files = TlsFiles::in_dir(dir.path().join("pki"));
    for id in ["m0", "m1"] {
        certs::issue(&ours, id).unwrap();
        certs::allow(&files.access, id).unwrap();
    }
    let other = CertDir::new(dir.path().join("other"));
    certs::init(&other, &["localhost".into()]).unwrap();
    certs::issue(&other, "m0").unwrap();
    Pki {
        dir,
        ours,
        files,
        other,
    }
}

async fn start_tls(p: &Pki) -> Running {
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    start_with(
        listener,
        &p.dir.path().join("c.redb"),
        churn_run("lifecycle", 2, 1, 1),
        Duration::from_millis(500),
        ServeOptions {
            transport: Transport::Tls(p.files.clone()),
            ..ServeOptions::insecure()
        },
    )
    .await
    .unwrap()
}

/// `merchant.toml` for `id` at `url`, with `extra` appended (a `[tls]`
/// section, a schema).
fn agent_toml(dir: &Path, id: &str, url: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{id}-{}.toml", rand_suffix(url, extra)));
    let text = format!(
        "coordinator = \"{url}\"\nmerchant_id = \"{id}\"\n\n[data]\nchurn_csv = \"{csv}\"\n\n\
         [backoff]\ninitial_ms = 50\nmax_ms = 500\n\n{extra}",
        csv = telco_csv().display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A file name suffix that differs between configurations of one test.
fn rand_suffix(url: &str, extra: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (url, extra).hash(&mut h);
    h.finish()
}

fn tls_section(ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ndomain = \"localhost\"\n",
        ca.display(),
        cert.display(),
        key.display()
    )
}

/// Runs `fedcart-client run --config <config>` to its end: asserts exit
/// status 1, that nothing was retried, and returns the one `error:` line.
async fn agent_fails(config: &Path) -> String {
    agent_fails_after(config, false).await
}

/// [`agent_fails`], optionally allowing transient retries before the
/// permanent error shows (plaintext against TLS: the server may first just
/// close the connection, which is what a restarting coordinator does too).
async fn agent_fails_after(config: &Path, may_retry: bool) -> String {
    agent_fails_with_env(config, may_retry, Vec::new()).await
}

/// [`agent_fails_after`] with `env` (variable, value) in the agent's
/// environment.
async fn agent_fails_with_env(
    config: &Path,
    may_retry: bool,
    env: Vec<(&'static str, std::ffi::OsString)>,
) -> String {
    let config = config.to_owned();
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &std::ffi::OsStr)> =
            env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
        let mut agent = Process::start_with_env(
            "fedcart-client",
            &["run", "--config", config.to_str().unwrap()],
            &env,
        );
        let code = agent.wait_exit(EXIT_LIMIT);
        let errors: Vec<&String> = agent
            .seen
            .iter()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(code, Some(1), "stderr:\n{}", agent.seen.join("\n"));
        assert_eq!(errors.len(), 1, "stderr:\n{}", agent.seen.join("\n"));
        assert!(
            may_retry || !agent.seen.iter().any(|l| l.contains("retrying quietly")),
            "a permanent error is not retried:\n{}",
            agent.seen.join("\n")
        );
        errors[0].clone()
    })
    .await
    .unwrap()
}

fn assert_names(line: &str, cause: &str, fix: &str) {
    assert!(line.contains(cause), "cause `{cause}` missing: {line}");
    assert!(
        line.contains(&format!("fix: {fix}")) || line.contains(fix),
        "fix `{fix}` missing: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_merchant_exits_1_saying_it_is_revoked() {
    let p = pki();
    let coord = start_tls(&p).await;
    certs::revoke(&p.files.access, &p.ours, "m0", None).unwrap();
    let url = format!("https://localhost:{}", coord.addr.port());
    let tls = tls_section(&p.ours.ca_cert(), &p.ours.cert("m0"), &p.ours.key("m0"));
    let line = agent_fails(&agent_toml(p.dir.path(), "m0", &url, &tls)).await;
    assert_names(
        &line,
        "revoked",
        "the platform operator revoked this merchant's certificate",
    );
    coord.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_that_is_not_the_certificates_exits_1_naming_both() {
    let p = pki();
    let coord = start_tls(&p).await;
    let url = format!("https://localhost:{}", coord.addr.port());
    // m1's configuration with m0's certificate.
    let tls = tls_section(&p.ours.ca_cert(), &p.ours.cert("m0"), &p.ours.key("m0"));
    let line = agent_fails(&agent_toml(p.dir.path(), "m1", &url, &tls)).await;
    assert_names(
        &line,
        "certificate identity `m0` may not join as `m1`",
        "`merchant_id` must be the identity of the certificate",
    );
    coord.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_the_certificates_exits_1_naming_both_files() {
    let p = pki();
    let url = "https://localhost:1";
    let tls = tls_section(&p.ours.ca_cert(), &p.ours.cert("m0"), &p.ours.key("m1"));
    let line = agent_fails(&agent_toml(p.dir.path(), "m0", url, &tls)).await;
    assert!(
        line.contains(&format!(
            "the TLS private key {} is not the key of the certificate {}",
            p.ours.key("m1").display(),
            p.ours.cert("m0").display()
        )),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_file_without_pem_exits_1_naming_the_file() {
    let p = pki();
    let url = "https://localhost:1";
    let csv = telco_csv();
    let tls = tls_section(&csv, &p.ours.cert("m0"), &p.ours.key("m0"));
    let line = agent_fails(&agent_toml(p.dir.path(), "m0", url, &tls)).await;
    assert!(
        line.contains(&format!(
            "the TLS CA bundle {} holds no PEM certificate",
            csv.display()
        )),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_of_another_ca_exit_1_saying_the_coordinator_is_not_signed_by_it() {
    let p = pki();
    let coord = start_tls(&p).await;
    let url = format!("https://localhost:{}", coord.addr.port());
    let tls = tls_section(&p.other.ca_cert(), &p.other.cert("m0"), &p.other.key("m0"));
    let line = agent_fails(&agent_toml(p.dir.path(), "m0", &url, &tls)).await;
    assert_names(
        &line,
        "invalid peer certificate",
        "the coordinator's certificate is not signed by `tls.ca`",
    );
    coord.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_certificate_of_another_ca_exits_1_naming_the_certificate() {
    // The right CA bundle, but the merchant's certificate and key come from
    // another CA: under TLS 1.3 the coordinator would refuse it only after
    // the handshake, as a closed connection; the agent finds it first.
    let p = pki();
    let coord = start_tls(&p).await;
    let url = format!("https://localhost:{}", coord.addr.port());
    let tls = tls_section(&p.ours.ca_cert(), &p.other.cert("m0"), &p.other.key("m0"));
    let line = agent_fails(&agent_toml(p.dir.path(), "m0", &url, &tls)).await;
    assert_names(
        &line,
        &format!(
            "the TLS certificate {} is not valid under the CA bundle {}",
            p.other.cert("m0").display(),
            p.ours.ca_cert().display()
        ),
        "must be issued by the platform's CA",
    );
    coord.shutdown().await.unwrap();
}

/// A TLS file the environment overrides is named with its variable: the
/// merchant's file is right, the variable's key is another CA's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_file_from_the_environment_is_named_by_its_variable() {
    let p = pki();
    let tls = tls_section(&p.ours.ca_cert(), &p.ours.cert("m0"), &p.ours.key("m0"));
    let config = agent_toml(p.dir.path(), "m0", "https://localhost:50051", &tls);
    let env = vec![("FEDCART_TLS_KEY", p.other.key("m0").into_os_string())];
    let line = agent_fails_with_env(&config, false, env).await;
    assert!(
        line.contains("with FEDCART_TLS_KEY from the environment"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_without_scheme_exits_1_saying_how_to_write_it() {
    let p = pki();
    let line = agent_fails(&agent_toml(p.dir.path(), "m0", "localhost:50051", "")).await;
    assert_names(
        &line,
        "coordinator address `localhost:50051`: no scheme",
        "https://HOST:PORT",
    );
}

/// The scheme and the `[tls]` section disagree: the fix names the side
/// to change (the section to add, or to remove for an --insecure
/// coordinator), not only the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheme_that_disagrees_with_the_tls_section_says_which_to_change() {
    let p = pki();
    let line = agent_fails(&agent_toml(
        p.dir.path(),
        "m0",
        "https://localhost:50051",
        "",
    ))
    .await;
    assert_names(
        &line,
        "https:// needs this merchant's TLS identity, and none is configured",
        "add the `[tls]` section",
    );
    let tls = tls_section(&p.ours.ca_cert(), &p.ours.cert("m0"), &p.ours.key("m0"));
    let line = agent_fails(&agent_toml(
        p.dir.path(),
        "m0",
        "http://localhost:50051",
        &tls,
    ))
    .await;
    assert_names(
        &line,
        "http:// would send the TLS identity's traffic in plaintext",
        "remove the `[tls]` section instead",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_http_against_a_tls_coordinator_exits_1_saying_use_https() {
    let p = pki();
    let coord = start_tls(&p).await;
    let url = format!("http://127.0.0.1:{}", coord.addr.port());
    let line = agent_fails_after(&agent_toml(p.dir.path(), "m0", &url, ""), true).await;
    assert_names(
        &line,
        "frame with invalid size",
        "the coordinator speaks TLS: use https://",
    );
    coord.shutdown().await.unwrap();
}

// Data that does not fit a run's model no longer ends the agent: it
// declines that run's tasks and stays (federation.rs,
// `an_agent_whose_data_does_not_fit_a_run_declines_its_tasks_and_stays`;
// the logged line's widths and fix: `agent::error` tests).

/// A coordinator configuration for the binary: plaintext on `port`, the
/// churn run over two merchants with `rounds` rounds.
fn coordinator_toml(dir: &Path, port: u16, rounds: u64) -> PathBuf {
    let path = dir.join("coordinator.toml");
    let text = format!(
        "[serve]\nlisten = \"127.0.0.1:{port}\"\nstore = \"{store}\"\nping_interval_ms = 500\n\n\
         [run]\nrun_id = \"sigterm\"\nseed = 42\nrounds = {rounds}\nquorum = 2\n\
         round_timeout_ms = 60000\nevaluate = false\n\
         model = {{ family = \"churn_lr\", num_features = 45 }}\n\
         sgd = {{ epochs = 1, batch_size = 32, learning_rate = 0.05, l2 = 0.0 }}\n\
         selection = {{ fraction = 1.0, min_agents = 2, max_agents = 2 }}\n",
        store = dir.join("c.redb").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

#[test]
fn sigterm_stops_the_coordinator_gracefully_and_a_restart_resumes_the_run() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let split = telco_split(2, 3);
    let port = free_port();
    let rounds = 4;
    let config = coordinator_toml(dir.path(), port, rounds);
    let args = ["serve", "--insecure", "--config", config.to_str().unwrap()];
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();

    let mut first = Process::start("fedcart-coordinator", &args);
    first.wait_line("created a new store", EXIT_LIMIT);
    first.wait_line("coordinator listening", EXIT_LIMIT);
    let a0 = rt.block_on(async { spawn_agent(addr, load_merchant("m0", &split.files[0])) });
    let a1 = rt.block_on(async { spawn_agent(addr, load_merchant("m1", &split.files[1])) });
    // Round 1 commits; then m1 leaves, so the run waits for agents midway.
    first.wait_line("task closed task=r1a1-train outcome=Committed", EXIT_LIMIT);
    rt.block_on(a1.stop());
    first.wait_line("agent left merchant=m1", EXIT_LIMIT);

    let said = first.stop_cleanly(EXIT_LIMIT);
    assert!(said.contains("SIGTERM: shutting down"), "{said}");
    assert!(said.contains("INFO fedcart_coordinator: stopped"), "{said}");
    let committed = Store::open(&dir.path().join("c.redb"))
        .unwrap()
        .latest_version()
        .unwrap()
        .unwrap_or(0);
    assert!(committed >= 1, "version {committed} kept");

    // A restart on the same store resumes; the agents come back.
    let mut second = Process::start("fedcart-coordinator", &args);
    second.wait_line("coordinator listening", EXIT_LIMIT);
    let a1 = rt.block_on(async { spawn_agent(addr, load_merchant("m1", &split.files[1])) });
    assert_eq!(
        second.wait_exit(EXIT_LIMIT),
        Some(0),
        "{}",
        second.seen.join("\n")
    );
    assert!(second.seen.iter().any(|l| l.contains("run finished")));
    assert!(
        second
            .seen
            .iter()
            .any(|l| l.contains("opened the store") && l.contains("runs=1")),
        "{}",
        second.seen.join("\n")
    );
    rt.block_on(async {
        a0.stop().await;
        a1.stop().await;
    });
    // Started again on the finished run: it says so, and what to do.
    let mut third = Process::start("fedcart-coordinator", &args);
    assert_eq!(third.wait_exit(EXIT_LIMIT), Some(0));
    assert!(
        third
            .seen
            .iter()
            .any(|l| l.contains("already ended in this store")
                && l.contains("give `run_id` a new value")),
        "{}",
        third.seen.join("\n")
    );
    let store = Store::open(&dir.path().join("c.redb")).unwrap();
    assert_eq!(store.latest_version().unwrap(), Some(rounds));
    let history = store.history().unwrap();
    for round in 1..=rounds {
        let commits = history
            .iter()
            .filter(|r| {
                r.round == round
                    && r.kind == fedcart_common::task::TaskKind::Train
                    && r.outcome == fedcart_coordinator::record::Outcome::Committed
            })
            .count();
        assert_eq!(commits, 1, "round {round} committed once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_makes_the_agent_leave_and_a_restarted_agent_finishes_the_run() {
    let split = telco_split(2, 4);
    let dir = tempfile::tempdir().unwrap();
    let coord = start_coordinator(
        &dir.path().join("c.redb"),
        churn_run("agent-term", 3, 2, 2),
        0,
    )
    .await;
    let url = format!("http://{}", coord.addr);
    let config = agent_toml(dir.path(), "m1", &url, "");
    // The binary's m1 reads the whole Telco file; m0 is in-process.
    let m0 = spawn_agent(coord.addr, load_merchant("m0", &split.files[0]));
    let run = |config: PathBuf| {
        Process::start(
            "fedcart-client",
            &["run", "--config", config.to_str().unwrap()],
        )
    };
    let mut agent = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let mut agent = run(config);
            agent.wait_line("joined", EXIT_LIMIT);
            agent
        })
        .await
        .unwrap()
    };
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.agents == 2).await.unwrap();

    agent.terminate();
    let (code, agent) = tokio::task::spawn_blocking(move || (agent.wait_exit(EXIT_LIMIT), agent))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{}", agent.seen.join("\n"));
    assert!(
        agent
            .seen
            .iter()
            .any(|l| l.contains("SIGTERM: leaving the coordinator")),
        "{}",
        agent.seen.join("\n")
    );
    // The coordinator saw it leave.
    progress.wait_for(|p| p.agents == 1).await.unwrap();

    // Restarted, it rejoins; the run finishes and the agent says so, then
    // waits for the next run.
    let agent = tokio::task::spawn_blocking(move || {
        let mut agent = run(config);
        agent.wait_line("task done", EXIT_LIMIT);
        agent.wait_line("the run has finished; waiting for the next run", EXIT_LIMIT);
        agent
    })
    .await
    .unwrap();
    progress.wait_for(|p| p.finished).await.unwrap();
    assert!(
        !agent
            .seen
            .iter()
            .any(|l| l.contains("lost the coordinator")),
        "a finished run is not an outage: {}",
        agent.seen.join("\n")
    );
    drop(agent);
    m0.stop().await;
    coord.shutdown().await.unwrap();
}

/// A merchant that was away when its run handed the served version out
/// fetches that version when it comes back and evaluates it on its own data,
/// as the hand-out would have: its state then holds the served version, and
/// it says so. A merchant the run never selected is refused that model, by
/// name, and keeps what it holds; one that holds the served version fetches
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_back_after_its_run_ended_fetches_the_served_version_it_missed() {
    use fedcart_client::state::{GlobalMeta, StateDir};
    use fedcart_common::task::{TaskKind, TaskSpec};
    let split = telco_split(1, 4);
    let dir = tempfile::tempdir().unwrap();
    let run_id = "away";
    let cfg = churn_run(run_id, 3, 1, 1);
    let coord = start_coordinator(&dir.path().join("c.redb"), cfg.clone(), 0).await;
    let m0 = spawn_agent(coord.addr, load_merchant("m0", &split.files[0]));
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.finished).await.unwrap();
    m0.stop().await;
    let history = coord.shared.history().unwrap();
    let served = history
        .iter()
        .rev()
        .find(|r| r.kind == TaskKind::Evaluate)
        .expect("the run handed a version out")
        .round;
    let held = (1..=3).find(|v| *v != served).unwrap();

    // A merchant's state directory holding version `version` of the run, as
    // the agent stores it (with the run's feature statistics), and its
    // configuration.
    let standardizer = coord.shared.standardizer();
    assert!(standardizer.is_some(), "a churn run standardises");
    let hold = |merchant: &str, version: u64| {
        let state_dir = dir.path().join(format!("{merchant}-state"));
        let _ = std::fs::remove_dir_all(&state_dir);
        let spec = TaskSpec {
            kind: TaskKind::Evaluate,
            model: cfg.model.clone(),
            sgd: cfg.sgd.clone(),
            seed: cfg.seed,
            round: version,
            standardizer: standardizer.clone(),
            dp: None,
            best_version: None,
        };
        let meta = GlobalMeta {
            run_id: run_id.into(),
            version,
            spec,
            sha256: None,
        };
        let model = coord.shared.model(version).unwrap().expect("committed");
        let state = StateDir::open(&state_dir).unwrap();
        state
            .run(run_id)
            .unwrap()
            .save_global(&meta, &model)
            .unwrap();
        let config = dir.path().join(format!("{merchant}.toml"));
        std::fs::write(
            &config,
            format!(
                "coordinator = \"http://{addr}\"\nmerchant_id = \"{merchant}\"\nstate_dir = \"{state}\"\n\n\
                 [data]\nchurn_csv = \"{csv}\"\n",
                addr = coord.addr,
                state = state_dir.display(),
                csv = split.files[0].display()
            ),
        )
        .unwrap();
        (config, state_dir)
    };
    // Runs the agent until the line `until` (the run's end, or the fetch's
    // outcome), then stops it. The line saying that it fetches is written
    // with the run's end, before anything is awaited: once the run's end is
    // read, a fetch that is not announced by the exit never starts.
    let back = |config: std::path::PathBuf, until: &'static str| {
        tokio::task::spawn_blocking(move || {
            let mut agent = Process::start(
                "fedcart-client",
                &["run", "--config", config.to_str().unwrap()],
            );
            agent.wait_line(until, EXIT_LIMIT);
            agent.stop_cleanly(EXIT_LIMIT);
            std::mem::take(&mut agent.seen)
        })
    };
    let (config, state_dir) = hold("m0", held);
    let seen = back(config, "fetched and evaluated here").await.unwrap();
    let told = format!(
        "holds version {held} of the run, not version {served}, which the run serves: it missed \
         the evaluation that handed that version out"
    );
    assert!(
        seen.iter().any(|l| l.contains(&told)),
        "{told}:\n{}",
        seen.join("\n")
    );
    let state = StateDir::open(&state_dir).unwrap();
    assert_eq!(state.held_version(run_id), Some(served));
    let (top, model) = state.load_global("churn").unwrap().expect("at the top");
    assert_eq!(top.version, served, "score answers from the served version");
    assert_eq!(
        &model,
        coord.shared.model(served).unwrap().unwrap().as_ref()
    );
    assert!(state.load_metrics("churn").unwrap().is_some());

    // A merchant the run never selected gets none of its models.
    let (config, state_dir) = hold("m1", held);
    let seen = back(config, "failed (").await.unwrap();
    assert!(
        seen.iter()
            .any(|l| l.contains(&format!("fetching version {served} failed"))
                && l.contains("took no part in run `away`")
                && l.contains(&format!("keeps version {held}"))),
        "{}",
        seen.join("\n")
    );
    let state = StateDir::open(&state_dir).unwrap();
    assert_eq!(state.held_version(run_id), Some(held));

    // Holding the served version: nothing more to do or say.
    let (config, _) = hold("m0", served);
    let seen = back(config, "the run has finished").await.unwrap();
    assert!(
        !seen.iter().any(|l| l.contains("which the run serves")),
        "{}",
        seen.join("\n")
    );
    coord.shutdown().await.unwrap();
}

/// The recommender's side of the same: an MF merchant whose state holds
/// an older version of its run than the served one fetches the served
/// version on its return, fits its own users to it (they never leave the
/// agent), and `recommend` answers from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mf_merchant_back_after_its_run_ended_fits_its_users_to_the_served_version() {
    use fedcart_client::state::StateDir;
    let dir = tempfile::tempdir().unwrap();
    let exports = store_exports(dir.path(), &["433", "324"]);
    let run_id = "away-mf";
    let mut run = churn_run(run_id, 3, 2, 2);
    run.evaluate = false;
    run.model = fedcart_common::task::ModelSpec::MfImplicit {
        num_items: 4_096,
        factors: 4,
        hyper: Default::default(),
    };
    let coord = start_coordinator(&dir.path().join("c.redb"), run, 0).await;
    let configs: Vec<_> = exports
        .iter()
        .enumerate()
        .map(|(k, export)| {
            let mut cfg = orders_agent_config(&format!("m{k}"), coord.addr, export);
            cfg.state_dir = Some(dir.path().join(format!("state-m{k}")));
            cfg
        })
        .collect();
    let agents: Vec<_> = configs
        .iter()
        .map(|cfg| spawn_configured(fedcart_client::agent::Agent::from_config(cfg).unwrap()))
        .collect();
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.finished).await.unwrap();
    for a in agents {
        a.stop().await;
    }
    let served = 3;
    // m0 missed the hand-out: its state holds version 2, at the top too.
    let state = StateDir::open(dir.path().join("state-m0")).unwrap();
    let older = coord.shared.model(2).unwrap().unwrap();
    for s in [state.clone(), state.run(run_id).unwrap()] {
        let (mut meta, _) = s.load_global("mf").unwrap().expect("an MF model");
        meta.version = 2;
        s.save_global(&meta, &older).unwrap();
    }
    assert_eq!(state.held_version(run_id), Some(2));
    let config = dir.path().join("m0.toml");
    std::fs::write(&config, toml::to_string(&configs[0]).unwrap()).unwrap();
    let config_arg = config.to_str().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        let mut agent = Process::start("fedcart-client", &["run", "--config", &config_arg]);
        agent.wait_line("fetched and evaluated here", EXIT_LIMIT);
        agent.stop_cleanly(EXIT_LIMIT);
    })
    .await
    .unwrap();
    assert_eq!(state.held_version(run_id), Some(served));
    let (top, params) = state.load_global("mf").unwrap().unwrap();
    assert_eq!(top.version, served);
    assert_eq!(
        &params,
        coord.shared.model(served).unwrap().unwrap().as_ref()
    );
    assert!(state.load_users().unwrap().is_some(), "users fitted here");
    // A customer of store 433 gets a list from the served version.
    let customer = std::fs::read_to_string(&exports[0])
        .unwrap()
        .lines()
        .nth(1)
        .and_then(|l| l.split(',').next().map(str::to_string))
        .unwrap();
    let listed = run_client(&[
        "recommend",
        "--config",
        config.to_str().unwrap(),
        "--customer",
        &customer,
    ]);
    assert!(!listed.is_empty());
    // A visitor with no purchases: the store's best sellers, scored with
    // how many of its customers bought each, most first.
    let best = run_client(&[
        "recommend",
        "--config",
        config.to_str().unwrap(),
        "--best-sellers",
        "--k",
        "3",
    ]);
    let counts: Vec<f64> = best
        .lines()
        .map(|l| l.split('\t').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 3, "{best}");
    assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{best}");
    assert!(
        counts.iter().all(|c| c.fract() == 0.0 && *c >= 1.0),
        "{best}"
    );
    coord.shutdown().await.unwrap();
}

/// A negative value of a numeric flag used to read as an unknown flag
/// ("unexpected argument '-0' found"); it now gets the flag's own error,
/// checked before any configuration is read.
#[test]
fn a_negative_flag_value_gets_the_flags_own_error() {
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "recommend",
                "--config",
                "/nonexistent/merchant.toml",
                "--customer",
                "c1",
                "--repeat-weight",
                "-0.5",
            ],
            "error: --repeat-weight must be in [0, 1], got -0.5",
        ),
        (
            &[
                "rules",
                "--config",
                "/nonexistent/merchant.toml",
                "--min-confidence",
                "-1",
            ],
            "error: --min-confidence must be in [0, 1], got -1",
        ),
        (
            &[
                "fleet",
                "--coordinator",
                "http://127.0.0.1:9",
                "--merchants",
                "2",
                "--holdout",
                "-0.1",
            ],
            "error: fleet: --holdout: -0.1 is not in [0, 1)",
        ),
    ];
    for (args, expected) in cases {
        let out = std::process::Command::new(bin_dir().join("fedcart-client"))
            .args(args)
            .env_remove("FEDCART_CLIENT_CONFIG")
            .env_remove("FEDCART_COORDINATOR")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            expected,
            "{args:?}"
        );
    }
}

/// The reading commands (`score`, `recommend`, …) never create the state
/// directory: a mistyped `state_dir` is named as missing, not read as "no
/// model yet" with an empty directory left behind.
#[test]
fn a_reading_command_names_a_missing_state_directory_and_creates_none() {
    let dir = tempfile::tempdir().unwrap();
    let out = recommend_without_state(dir.path(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let missing = dir.path().join("nowhere");
    assert!(
        stderr.contains(&format!(
            "the state directory {} does not exist",
            missing.display()
        )),
        "{stderr}"
    );
    assert!(!missing.exists(), "nothing is created");
}

/// `fedcart-client recommend` with a config in `dir` whose `state_dir`
/// (`nowhere`) does not exist, with `envs` set.
/// An agent started on a truncated user-factor file is told what to do
/// about it (it named only the parser's position: "EOF while parsing a list
/// at line 1 column 1000").
#[test]
fn an_agent_on_a_damaged_state_file_is_told_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let config = four_ratings_kit(dir.path(), "state");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("mf-users.json"), "{\"users\": [1.0, 2.0").unwrap();
    let out = std::process::Command::new(bin_dir().join("fedcart-client"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("FEDCART_STATE_DIR")
        .env_remove("FEDCART_COORDINATOR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("mf-users.json") && stderr.contains("restore it from a backup"),
        "{stderr}"
    );
}

/// The best sellers need no model, so no state directory: before the agent
/// first ran they were refused for want of one.
#[test]
fn best_sellers_are_listed_before_the_agent_ever_ran() {
    let dir = tempfile::tempdir().unwrap();
    let config = four_ratings_kit(dir.path(), "nowhere");
    let out = std::process::Command::new(bin_dir().join("fedcart-client"))
        .args(["recommend", "--best-sellers", "--k", "2", "--config"])
        .arg(&config)
        .env_remove("FEDCART_STATE_DIR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "10\t2.0000\n11\t1.0000\n"
    );
    assert!(
        !dir.path().join("nowhere").exists(),
        "no state directory made"
    );
}

/// A merchant configuration in `dir` over four ratings of three catalogue
/// items (item 10 bought by two customers, 11 and 12 by one) and the state
/// directory `state_dir`; returns its path.
fn four_ratings_kit(dir: &Path, state_dir: &str) -> std::path::PathBuf {
    std::fs::write(
        dir.join("r.csv"),
        "userId,movieId,rating,timestamp\n1,10,4.0,1\n1,11,3.0,2\n2,10,5.0,3\n2,12,2.0,4\n",
    )
    .unwrap();
    std::fs::write(dir.join("catalogue.txt"), "10\n11\n12\n").unwrap();
    let config = dir.join("merchant.toml");
    std::fs::write(
        &config,
        format!(
            "coordinator = \"http://127.0.0.1:9\"\nmerchant_id = \"m0\"\nstate_dir = \
             \"{state_dir}\"\n[data]\nratings_csv = \"r.csv\"\ncatalogue = \"catalogue.txt\"\n"
        ),
    )
    .unwrap();
    config
}

fn recommend_without_state(dir: &Path, envs: &[(&str, &str)]) -> std::process::Output {
    let config = dir.join("merchant.toml");
    std::fs::write(
        &config,
        "coordinator = \"http://127.0.0.1:9\"\nmerchant_id = \"m0\"\nstate_dir = \"nowhere\"\n\
         [data]\nratings_csv = \"r.csv\"\n",
    )
    .unwrap();
    std::process::Command::new(bin_dir().join("fedcart-client"))
        .args(["recommend", "--config"])
        .arg(&config)
        .args(["--customer", "c1"])
        .env_remove("FEDCART_STATE_DIR")
        .envs(envs.iter().copied())
        .output()
        .unwrap()
}

/// `FEDCART_LOG_JSON=yes` turns JSON logs on (it was refused as an invalid
/// value for `--log-json`: only true/false were taken), and a `RUST_LOG` that
/// is not a valid filter is named in a warning instead of silently ignored.
#[test]
fn log_settings_take_yes_and_an_invalid_rust_log_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = recommend_without_state(
        dir.path(),
        &[
            ("FEDCART_LOG_JSON", "yes"),
            ("RUST_LOG", "info,fedcart_client=loud"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The command itself ran (and failed on its missing state directory).
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("invalid value"), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.contains("is not a valid log filter"))
        .unwrap_or_else(|| panic!("no warning about RUST_LOG: {stderr}"));
    let json: serde_json::Value = serde_json::from_str(warning).expect("a JSON log line");
    assert_eq!(json["level"], "WARN", "{warning}");
    assert!(
        json["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("info,fedcart_client=loud")),
        "{warning}"
    );
}

/// An agent that never reached its coordinator said it had "lost" it, with
/// a transport error as the only clue. The first warning now says it cannot
/// reach it and why, naming the setting to check: a port nothing listens on,
/// a host name that does not resolve (`.invalid` never does, RFC 6761).
/// Both may heal, so the agent keeps retrying until it is stopped.
#[test]
fn an_agent_that_never_reached_the_coordinator_names_the_setting_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let refused = format!("http://127.0.0.1:{}", free_port());
    for (url, cause) in [
        (
            refused.as_str(),
            "nothing accepts connections at that address",
        ),
        (
            "http://coordinator.invalid:50051",
            "its host name does not resolve",
        ),
    ] {
        let config = agent_toml(dir.path(), "m0", url, "");
        let mut agent = Process::start(
            "fedcart-client",
            &["run", "--config", config.to_str().unwrap()],
        );
        let line = agent.wait_line("cannot reach the coordinator", EXIT_LIMIT);
        assert!(line.contains(cause), "{line}");
        assert!(line.contains("`coordinator`"), "{line}");
        agent.stop_cleanly(EXIT_LIMIT);
        assert!(
            !agent
                .seen
                .iter()
                .any(|l| l.contains("lost the coordinator")),
            "{}",
            agent.seen.join("\n")
        );
    }
}

/// `score --run` of a run that left no churn model (a recommender run, say)
/// says so, instead of "the agent has not taken part in a churn round".
#[test]
fn scoring_a_run_without_a_churn_model_names_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("runs/rec-1")).unwrap();
    let config = dir.path().join("merchant.toml");
    std::fs::write(
        &config,
        format!(
            "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\nstate_dir = \"{}\"\n\n\
             [data]\nchurn_csv = \"{}\"\n",
            state.display(),
            telco_csv().display()
        ),
    )
    .unwrap();
    let out = dir.path().join("scores.csv");
    let args = [
        "score",
        "--config",
        config.to_str().unwrap(),
        "--run",
        "rec-1",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut p = Process::start("fedcart-client", &args);
    assert_eq!(p.wait_exit(EXIT_LIMIT), Some(1));
    assert!(
        p.seen.iter().any(|l| l.contains(
            "--run rec-1: that run left no churn model with this agent (a run of another model"
        )),
        "{:?}",
        p.seen
    );
    assert!(!out.exists());
}

/// The merchant's `serve` refuses what `recommend` refuses (a state
/// directory no agent has written, a run the agent never worked for), and
/// stops cleanly on SIGTERM, as Docker, Kubernetes and systemd stop it.
#[test]
fn merchant_serve_checks_its_state_like_recommend_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("merchant.toml");
    std::fs::write(
        &config,
        format!(
            "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\nstate_dir = \"{}\"\n\n[data]\n",
            state.display()
        ),
    )
    .unwrap();
    let serve = |extra: &[&str]| {
        let mut args = vec![
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        Process::start("fedcart-client", &args)
    };
    let mut p = serve(&[]);
    assert_eq!(p.wait_exit(EXIT_LIMIT), Some(1));
    assert!(
        p.seen
            .iter()
            .any(|l| l.contains("does not exist: no agent has run with this `state_dir` yet")),
        "{:?}",
        p.seen
    );
    assert!(!state.exists(), "serve created no state directory");

    std::fs::create_dir_all(&state).unwrap();
    let mut p = serve(&["--run", "nope"]);
    assert_eq!(p.wait_exit(EXIT_LIMIT), Some(1));
    assert!(
        p.seen.iter().any(|l| l
            .contains("--run nope: this agent holds no model of that run (runs it holds: none)")),
        "{:?}",
        p.seen
    );

    let mut p = serve(&[]);
    p.wait_line("serving", EXIT_LIMIT);
    let said = p.stop_cleanly(EXIT_LIMIT);
    assert!(
        said.contains("SIGTERM: stopping") && said.contains("stopped"),
        "{said}"
    );
}
