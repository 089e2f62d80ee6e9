//! Runs as first-class objects, with the real binaries over mutual TLS: one
//! coordinator hosts a churn run and an MF run at the same time, three
//! merchant agents take part in both, each from one configuration that
//! points at nothing but its store's orders export (churn features, labels
//! and interactions derived by the agent, item ids hashed into the run's
//! rows: no catalogue file). A SIGKILL of the coordinator in the middle of
//! both runs loses nothing committed and a restart on the same store
//! resumes both, finished runs stay listed, a merchant's certificate is
//! refused on the admin RPCs, and the merchant's `score` and `recommend`
//! work from its one configuration, naming its own customers and items.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedcart_coordinator::certs::{self, CertDir};
use fedcart_coordinator::store::Store;
use fedcart_tests::*;

/// Bounds a hung process (killed then), not a timing assertion.
const LIMIT: Duration = Duration::from_secs(300);

const CHURN_RUN: &str = "churn-a";
const MF_RUN: &str = "mf-a";
/// Enough rounds that both runs are still going when the coordinator is
/// killed right after each committed its first version.
const ROUNDS: u64 = 12;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// The coordinator's configuration: the churn run, mutual TLS, HTTP.
fn coordinator_toml(dir: &Path, port: u16, http: u16) -> PathBuf {
    let path = dir.join("coordinator.toml");
    let pki = dir.join("pki");
    std::fs::write(
        &path,
        format!(
            r#"[serve]
listen = "127.0.0.1:{port}"
http_listen = "127.0.0.1:{http}"
store = "store.redb"
ping_interval_ms = 500
[serve.tls]
ca = "{pki}/ca.pem"
cert = "{pki}/coordinator.pem"
key = "{pki}/coordinator.key"
access = "{pki}/access.toml"
[run]
run_id = "{CHURN_RUN}"
seed = 42
rounds = {ROUNDS}
quorum = 3
round_timeout_ms = 120000
evaluate = false
model = {{ family = "churn_lr", num_features = 8 }}
sgd = {{ epochs = 1, batch_size = 32, learning_rate = 0.05, l2 = 0.0 }}
selection = {{ fraction = 1.0, min_agents = 3, max_agents = 3 }}
"#,
            pki = pki.display()
        ),
    )
    .unwrap();
    path
}

/// Hashed item rows of the MF run: no catalogue, the run just names a size.
const ITEM_ROWS: usize = 16_384;

/// The MF run, as the operator submits it (the run's keys at the top).
fn mf_toml(dir: &Path) -> PathBuf {
    let path = dir.join("mf-run.toml");
    std::fs::write(
        &path,
        format!(
            r#"run_id = "{MF_RUN}"
seed = 7
rounds = {ROUNDS}
quorum = 3
round_timeout_ms = 120000
evaluate = false
model = {{ family = "mf_implicit", num_items = {ITEM_ROWS}, factors = 8 }}
sgd = {{ epochs = 1, batch_size = 32, learning_rate = 0.05, l2 = 0.0 }}
selection = {{ fraction = 1.0, min_agents = 3, max_agents = 3 }}
"#
        ),
    )
    .unwrap();
    path
}

/// One merchant's one configuration: its orders export with the column
/// mapping, its state directory and its certificate. Nothing else.
fn merchant_toml(dir: &Path, k: usize, port: u16, orders: &Path) -> PathBuf {
    let pki = CertDir::new(dir.join("pki"));
    let id = format!("m{k}");
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(
        &path,
        format!(
            "coordinator = \"https://localhost:{port}\"\nmerchant_id = \"{id}\"\n\
             state_dir = \"{state}\"\n\n[data]\norders_csv = \"{orders}\"\n\n\
             [data.orders]\ncustomer = \"customer\"\nitem = \"item\"\n\
             timestamp = \"timestamp\"\nquantity = \"quantity\"\namount = \"amount\"\n\n\
             [backoff]\ninitial_ms = 50\nmax_ms = 500\n\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\ndomain = \"localhost\"\n",
            state = dir.join(format!("state-{id}")).display(),
            orders = orders.display(),
            ca = pki.ca_cert().display(),
            cert = pki.cert(&id).display(),
            key = pki.key(&id).display(),
        ),
    )
    .unwrap();
    path
}

/// Runs `fedcart-coordinator` with `args` to its end: (exit code, stdout,
/// stderr).
fn coordinator_cmd(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(bin_dir().join("fedcart-coordinator"))
        .args(args)
        .env_remove("FEDCART_COORDINATOR")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `runs list --json` as the operator (or as `identity`).
fn runs_list(dir: &Path, port: u16, identity: &str) -> (Option<i32>, String, String) {
    let url = format!("https://localhost:{port}");
    let certs = dir.join("pki");
    coordinator_cmd(&[
        "runs",
        "list",
        "--json",
        "--coordinator",
        &url,
        "--certs",
        certs.to_str().unwrap(),
        "--identity",
        identity,
    ])
}

/// Reads the coordinator's stderr until each of `runs` logged `needle`.
fn wait_each_run(coord: &mut Process, needle: &str, runs: &[&str]) {
    let mut left: Vec<&str> = runs.to_vec();
    while !left.is_empty() {
        let line = coord.wait_line(needle, LIMIT);
        left.retain(|r| {
            !line.contains(&format!("run={r}")) && !line.contains(&format!("run: {r}"))
        });
    }
}

/// An HTTP GET on the coordinator's listener: (status line, body).
fn http_get(port: u16, path: &str, token: Option<&str>) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf.lines().next().unwrap_or("").to_owned();
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[test]
fn two_concurrent_runs_survive_a_coordinator_kill_finish_and_stay_listed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pki = CertDir::new(root.join("pki"));
    certs::init(&pki, &["localhost".into()]).unwrap();
    let access = root.join("pki/access.toml");
    for k in 0..3 {
        certs::issue(&pki, &format!("m{k}")).unwrap();
        certs::allow(&access, &format!("m{k}")).unwrap();
    }
    let (port, http) = (free_port(), free_port());
    let config = coordinator_toml(root, port, http);
    // The smallest three stores: 38–48 households, 2,000–4,000 products each.
    let exports = store_exports(root, &["433", "324", "363"]);
    let mf = mf_toml(root);
    let merchants: Vec<PathBuf> = (0..3)
        .map(|k| merchant_toml(root, k, port, &exports[k]))
        .collect();

    let serve = |keep: bool| {
        let mut args = vec!["serve", "--config", config.to_str().unwrap()];
        if keep {
            args.push("--keep-serving");
        }
        let mut p = Process::start("fedcart-coordinator", &args);
        p.wait_line("coordinator listening", LIMIT);
        p
    };
    let mut coord = serve(false);
    let url = format!("https://localhost:{port}");
    let certs_dir = root.join("pki");
    let (code, out, err) = coordinator_cmd(&[
        "runs",
        "submit",
        "--config",
        mf.to_str().unwrap(),
        "--coordinator",
        &url,
        "--certs",
        certs_dir.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "runs submit: {out}{err}");
    assert!(out.contains(MF_RUN), "{out}");

    // A merchant's certificate is refused on every admin RPC, naming its
    // role: it can neither list, show, submit nor stop a run.
    let (code, _, err) = runs_list(root, port, "m0");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("role merchant"), "{err}");
    // The coordinator's reason as it wrote it (not tonic's code text), then
    // the fix.
    assert!(
        err.contains("ListRuns RPC: admin RPCs need an operator certificate")
            && !err.contains("code: '")
            && err.contains("use the operator identity `certs init` made"),
        "{err}"
    );
    let as_merchant = [
        "--coordinator",
        &url,
        "--certs",
        certs_dir.to_str().unwrap(),
    ];
    let as_merchant = [&as_merchant[..], &["--identity", "m0"]].concat();
    for action in [
        &["show", MF_RUN][..],
        &["stop", MF_RUN][..],
        &["submit", "--config", mf.to_str().unwrap()][..],
    ] {
        let args = [&["runs"][..], action, &as_merchant].concat();
        let (code, out, err) = coordinator_cmd(&args);
        assert_eq!(code, Some(1), "runs {action:?} as m0: {out}{err}");
        assert!(err.contains("role merchant"), "runs {action:?}: {err}");
    }

    let agents: Vec<Process> = merchants
        .iter()
        .map(|m| Process::start("fedcart-client", &["run", "--config", m.to_str().unwrap()]))
        .collect();

    // Both runs commit a version; then the coordinator is killed (SIGKILL).
    wait_each_run(&mut coord, "version committed", &[CHURN_RUN, MF_RUN]);
    drop(coord);
    let before: Vec<(String, u64, Vec<Vec<f32>>)> = [CHURN_RUN, MF_RUN]
        .iter()
        .map(|run| {
            let store = Store::open_run(&root.join("store.redb"), run)
                .unwrap()
                .expect("the run is in the store");
            let latest = store.latest_version().unwrap().unwrap();
            assert!(
                (1..ROUNDS).contains(&latest),
                "{run} was in the middle of its rounds when the coordinator was killed: {latest}"
            );
            let versions = (0..=latest)
                .map(|v| store.model(v).unwrap().unwrap())
                .collect();
            (run.to_string(), latest, versions)
        })
        .collect();

    // A restart on the same store resumes both runs; agents reconnect.
    let mut coord = serve(true);
    wait_each_run(&mut coord, "run finished", &[CHURN_RUN, MF_RUN]);

    // Both finished runs stay listed while the coordinator keeps serving.
    let (code, out, err) = runs_list(root, port, "operator");
    assert_eq!(code, Some(0), "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{out}");
    for (r, id) in listed.iter().zip([CHURN_RUN, MF_RUN]) {
        assert_eq!(r["run_id"], id);
        assert_eq!(r["finished"], true, "{out}");
        assert_eq!(r["model_version"], ROUNDS, "{out}");
        assert_eq!(r["rounds"], ROUNDS);
    }
    // A run id is taken once; a new run starts beside the finished ones and
    // the operator can stop it.
    let operator = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend([
            "--coordinator",
            &url,
            "--certs",
            certs_dir.to_str().unwrap(),
        ]);
        coordinator_cmd(&all)
    };
    let (code, _, err) = operator(&["runs", "submit", "--config", mf.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("run `{MF_RUN}` exists already")),
        "{err}"
    );
    let long = root.join("long.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            &format!("run_id = \"{CHURN_RUN}\""),
            "run_id = \"churn-long\"",
        )
        .replace(&format!("rounds = {ROUNDS}"), "rounds = 100000");
    std::fs::write(&long, text).unwrap();
    let (code, out, err) = operator(&["runs", "submit", "--config", long.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = operator(&["runs", "stop", "churn-long", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let stopped: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The stop is recorded at once; a run stopped after a committed
    // version hands that version out to every merchant before it ends.
    let phase = stopped["phase"].as_str().unwrap();
    assert!(
        stopped["finished"] == true || phase.contains("; handing version "),
        "{out}"
    );
    assert!(
        stopped["stopped"]
            .as_str()
            .unwrap()
            .contains("stopped by operator `operator`"),
        "{out}"
    );
    // `show` prints the run's facts and the configuration it runs with.
    let (code, out, _) = operator(&["runs", "show", "churn-long"]);
    assert_eq!(code, Some(0));
    for want in [
        "run         churn-long",
        "stopped     stopped by operator `operator`",
        "configuration:",
        "  run_id = \"churn-long\"",
        "  rounds = 100000",
    ] {
        assert!(out.contains(want), "`{want}` missing:\n{out}");
    }

    // The runs list is the operator's on HTTP too.
    let token = std::fs::read_to_string(root.join("pki/operator.token")).unwrap();
    let (status, body) = http_get(http, "/api/status", None);
    assert!(status.contains("401"), "{status}");
    assert!(
        !body.contains(MF_RUN) && !body.contains(CHURN_RUN),
        "{body}"
    );
    let (status, body) = http_get(http, "/api/status", Some(token.trim()));
    assert!(status.contains("200"), "{status}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = view["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [CHURN_RUN, MF_RUN, "churn-long"]);

    // The merchant's tools work from its one configuration: churn scores
    // for every customer of its export, and recommendations that name its
    // own products, none the customer already bought.
    let export = std::fs::read_to_string(&exports[0]).unwrap();
    let rows: Vec<Vec<&str>> = export
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let customers: std::collections::BTreeSet<&str> = rows.iter().map(|r| r[0]).collect();
    let products: std::collections::BTreeSet<&str> = rows.iter().map(|r| r[1]).collect();
    let client = run_client;
    let m0 = merchants[0].to_str().unwrap();
    let scored = client(&["score", "--config", m0, "--out", "-"]);
    let scored_ids: std::collections::BTreeSet<&str> = scored
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(scored_ids, customers, "{scored}");
    let shopper = rows[0][0];
    let bought: std::collections::BTreeSet<&str> = rows
        .iter()
        .filter(|r| r[0] == shopper)
        .map(|r| r[1])
        .collect();
    let recommend = [
        "recommend",
        "--config",
        m0,
        "--customer",
        shopper,
        "--k",
        "5",
    ];
    let recs = client(&recommend);
    let recommended: Vec<&str> = recs
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(recommended.len(), 5, "{recs}");
    // The same from the MF run's own state; a run the agent never worked
    // for is named with the ones it did.
    assert_eq!(client(&[&recommend[..], &["--run", MF_RUN]].concat()), recs);
    let out = std::process::Command::new(bin_dir().join("fedcart-client"))
        .args(["score", "--config", m0, "--out", "-", "--run", "nosuch"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--run nosuch") && err.contains(CHURN_RUN) && err.contains(MF_RUN),
        "{err}"
    );
    for item in &recommended {
        assert!(
            products.contains(item),
            "{item} is not a product of m0: {recs}"
        );
        assert!(
            !bought.contains(item),
            "{shopper} already bought {item}: {recs}"
        );
    }

    coord.stop_cleanly(LIMIT);
    drop(agents);
    // The restarted coordinator went on from each run's last version: it
    // committed the versions after it, none before.
    for (run, latest, _) in &before {
        let committed: Vec<u64> = coord
            .seen
            .iter()
            .filter(|l| l.contains("version committed") && l.ends_with(&format!("run={run}")))
            .filter_map(|l| l.split("version=").nth(1)?.split(' ').next()?.parse().ok())
            .collect();
        assert_eq!(
            committed,
            (latest + 1..=ROUNDS).collect::<Vec<_>>(),
            "{run}: {}",
            coord.seen.join("\n")
        );
    }

    // Nothing committed before the kill was lost: every version reads back
    // bit for bit, and each run went on from where it was.
    for (run, latest, versions) in before {
        let store = Store::open_run(&root.join("store.redb"), &run)
            .unwrap()
            .unwrap();
        assert_eq!(store.latest_version().unwrap(), Some(ROUNDS));
        for (v, params) in versions.iter().enumerate() {
            let again = store.model(v as u64).unwrap().unwrap();
            assert_eq!(
                params.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                again.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{run} version {v} (of {latest} before the kill)"
            );
        }
    }
}

/// A churn-lr run `run_id` over `agents` agents (all of them selected and
/// needed), without evaluation, as the operator's TOML, followed by `extra`
/// (tables such as `[schedule]`).
pub(crate) fn churn_run_toml(run_id: &str, rounds: u64, agents: usize, extra: &str) -> String {
    format!(
        "run_id = \"{run_id}\"\nseed = 9\nrounds = {rounds}\nquorum = {agents}\n\
         round_timeout_ms = 60000\nevaluate = false\n\
         model = {{ family = \"churn_lr\", num_features = 45 }}\n\
         sgd = {{ epochs = 1, batch_size = 32, learning_rate = 0.05, l2 = 0.0 }}\n\
         selection = {{ fraction = 1.0, min_agents = {agents}, max_agents = {agents} }}\n{extra}"
    )
}

/// Submits `toml` to the coordinator at `addr` through the Admin service
/// (plaintext: the caller is the operator) and returns the client.
pub(crate) async fn submit_toml(
    addr: std::net::SocketAddr,
    toml: String,
) -> fedcart_proto::v1::admin_client::AdminClient<tonic::transport::Channel> {
    let mut admin = fedcart_proto::v1::admin_client::AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    admin
        .submit_run(fedcart_proto::v1::SubmitRunRequest {
            config_toml: toml,
            source: "run.toml".into(),
        })
        .await
        .unwrap();
    admin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_run_starts_its_next_instance_from_the_version_it_served() {
    init_logs();
    let split = telco_split(2, 19);
    let dir = tempfile::tempdir().unwrap();
    let coord = start_coordinator(&dir.path().join("c.redb"), churn_run("base", 1, 2, 2), 0).await;
    // The schedule's wait is zero, so the next instance starts as soon as
    // the first finished.
    let toml = churn_run_toml("nightly", 2, 2, "[schedule]\nevery = \"0s\"\nrepeat = 1\n");
    submit_toml(coord.addr, toml).await;
    let agents: Vec<_> = (0..2)
        .map(|k| spawn_agent(coord.addr, load_merchant(&format!("m{k}"), &split.files[k])))
        .collect();
    // Waits for the scheduled instance too (it is pending until it starts).
    coord.hub.wait_all_ended().await;

    assert_eq!(coord.hub.ids(), ["base", "nightly", "nightly.2"]);
    let (first, second) = (
        coord.hub.get("nightly").unwrap(),
        coord.hub.get("nightly.2").unwrap(),
    );
    assert_eq!(
        second.model(0).unwrap().unwrap(),
        first.model(2).unwrap().unwrap(),
        "the next instance starts from the version the first served"
    );
    assert_ne!(second.model(0).unwrap(), first.model(0).unwrap());
    let s = coord.hub.summary("nightly.2").unwrap();
    assert_eq!(s.continues.as_deref(), Some("nightly"));
    assert!(s.finished && s.stopped.is_none(), "{s:?}");
    assert_eq!(s.model_version, 2);
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}

/// `runs stop` of an instance that finished while its schedule waits (a
/// month here) ends the schedule: the wait is cut short, no instance
/// follows, the run reads as finished with its schedule ended by the
/// operator, and the store keeps that for a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_finished_scheduled_run_ends_its_schedule() {
    init_logs();
    let split = telco_split(2, 19);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.redb");
    let coord = start_coordinator(&path, churn_run("base", 1, 2, 2), 0).await;
    let toml = churn_run_toml("nightly", 1, 2, "[schedule]\nevery = \"30d\"\n");
    let mut admin = submit_toml(coord.addr, toml).await;
    let agents: Vec<_> = (0..2)
        .map(|k| spawn_agent(coord.addr, load_merchant(&format!("m{k}"), &split.files[k])))
        .collect();
    let mut progress = coord.hub.get("nightly").unwrap().progress();
    progress.wait_for(|p| p.finished).await.unwrap();
    let info = admin
        .stop_run(fedcart_proto::v1::RunRequest {
            run_id: "nightly".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(info.finished && info.stopped.is_empty(), "{info:?}");
    assert!(
        info.phase.starts_with("finished; schedule ended by "),
        "{info:?}"
    );
    // Without the stop this waits a month for `nightly.2`.
    tokio::time::timeout(Duration::from_secs(300), coord.hub.wait_all_ended())
        .await
        .expect("the scheduled instance still waits after the stop");
    assert_eq!(coord.hub.ids(), ["base", "nightly"]);
    // What a restart reads, from the store itself (reopening the file in this
    // process after shutdown raced the server's connection tasks, which can
    // still hold it for a moment when the suite loads the machine).
    let nightly = coord
        .hub
        .stored_entries()
        .unwrap()
        .into_iter()
        .find(|e| e.run_id == "nightly")
        .unwrap();
    assert!(nightly.schedule_ended_by.is_some() && !nightly.repeats());
    // Stopping a run the coordinator does not host is the stop's refusal
    // (it named the look before it, `ShowRun RPC`).
    let url = format!("http://{}", coord.addr);
    let stop = fedcart_coordinator::runs::Action::Stop("nope".into());
    let e = fedcart_coordinator::runs::call(&url, None, &stop)
        .await
        .unwrap_err();
    let message = format!("{e:#}");
    assert!(
        message.starts_with("StopRun RPC: no run `nope` on this coordinator"),
        "{message}"
    );
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}

/// Two runs with secure aggregation at once over the same agents: each
/// agent holds one secure update per run (it held one in all, so each run's
/// task threw away the other's and both aborted every attempt). Both runs
/// finish with every task committed at its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_secure_runs_at_once_over_the_same_agents_both_finish() {
    init_logs();
    let split = telco_split(3, 23);
    let dir = tempfile::tempdir().unwrap();
    let mut first = churn_run("sec-a", 2, 3, 3);
    first.evaluate = false;
    first.secagg = Some(crate::secure::secure_settings(1.0));
    let coord = start_coordinator(&dir.path().join("c.redb"), first, 0).await;
    let toml = churn_run_toml(
        "sec-b",
        2,
        3,
        "[secagg]\nclip = 1.0\nstage_timeout_ms = 120000\n",
    );
    submit_toml(coord.addr, toml).await;
    let agents: Vec<_> = (0..3)
        .map(|k| spawn_agent(coord.addr, load_merchant(&format!("m{k}"), &split.files[k])))
        .collect();
    coord.hub.wait_all_ended().await;
    for run in ["sec-a", "sec-b"] {
        let shared = coord.hub.get(run).unwrap();
        assert!(shared.stopped().is_none(), "{run}: {:?}", shared.stopped());
        let history = shared.history().unwrap();
        assert!(
            history
                .iter()
                .all(|r| r.outcome == fedcart_coordinator::record::Outcome::Committed),
            "{run}: {history:?}"
        );
        // The statistics step, both rounds and the evaluation that hands out
        // the last version, each at its first attempt.
        assert_eq!(history.len(), 4, "{run}: {history:?}");
    }
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}

/// An implicit-MF run over two agents, as the operator submits it.
fn mf_run_toml(run_id: &str, seed: u64, rows: usize) -> String {
    format!(
        "run_id = \"{run_id}\"\nseed = {seed}\nrounds = 3\nquorum = 2\n\
         round_timeout_ms = 60000\nevaluate = false\n\
         model = {{ family = \"mf_implicit\", num_items = {rows}, factors = 4 }}\n\
         sgd = {{ epochs = 1, batch_size = 32, learning_rate = 0.05, l2 = 0.0 }}\n\
         selection = {{ fraction = 1.0, min_agents = 2, max_agents = 2 }}\n"
    )
}

/// Every committed version of each of `runs`, hosted by one coordinator
/// (the first run at its start, the others submitted through the admin
/// API) with one agent per orders export, each from its configuration.
async fn mf_runs_on(
    exports: &[PathBuf],
    runs: &[(&str, u64, usize)],
    states: Option<&Path>,
) -> Vec<Vec<Vec<f32>>> {
    let dir = tempfile::tempdir().unwrap();
    let (first, rest) = runs.split_first().unwrap();
    let mut run = churn_run(first.0, 3, 2, 2);
    run.seed = first.1;
    run.evaluate = false;
    run.model = fedcart_common::task::ModelSpec::MfImplicit {
        num_items: first.2,
        factors: 4,
        // What `mf_run_toml`'s model table (no `hyper`) reads as.
        hyper: fedcart_common::model::mf::MfHyper::bpr(),
    };
    let coord = start_coordinator(&dir.path().join("c.redb"), run, 0).await;
    let mut admin =
        fedcart_proto::v1::admin_client::AdminClient::connect(format!("http://{}", coord.addr))
            .await
            .unwrap();
    for (id, seed, rows) in rest {
        admin
            .submit_run(fedcart_proto::v1::SubmitRunRequest {
                config_toml: mf_run_toml(id, *seed, *rows),
                source: format!("{id}.toml"),
            })
            .await
            .unwrap();
    }
    let agents: Vec<_> = exports
        .iter()
        .enumerate()
        .map(|(k, export)| {
            let mut cfg = orders_agent_config(&format!("m{k}"), coord.addr, export);
            cfg.state_dir = states.map(|d| d.join(format!("m{k}")));
            spawn_configured(fedcart_client::agent::Agent::from_config(&cfg).unwrap())
        })
        .collect();
    coord.hub.wait_all_ended().await;
    let models = runs
        .iter()
        .map(|(id, _, _)| {
            let run = coord.hub.get(id).unwrap();
            (0..=3)
                .map(|v| run.model(v).unwrap().unwrap().to_vec())
                .collect()
        })
        .collect();
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
    models
}

/// Two MF runs at once from the same agents, with different item rows: each
/// trains its own private user side, so each commits the models it commits
/// when it is the merchants' only run (the agents re-map their hashed item
/// ids between the runs' tasks and park the other run's user factors).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_mf_runs_at_once_train_as_each_would_alone() {
    let dir = tempfile::tempdir().unwrap();
    let exports = store_exports(dir.path(), &["433", "324"]);
    let exports = &exports[..];
    let (a, b) = (("mf-a", 5, 4_096), ("mf-b", 6, 2_048));
    let together = mf_runs_on(exports, &[a, b], Some(dir.path())).await;
    let alone_a = mf_runs_on(exports, &[a], None).await;
    let alone_b = mf_runs_on(exports, &[b], None).await;
    for (run, (with, alone)) in [
        (a.0, (&together[0], &alone_a[0])),
        (b.0, (&together[1], &alone_b[0])),
    ] {
        for (v, (x, y)) in with.iter().zip(alone).enumerate().skip(1) {
            assert_eq!(x.len(), y.len());
            let worst = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{run} version {v}: differs by {worst}");
        }
        assert_ne!(with[3], with[0], "{run} trained");
    }
    // Each agent's state keeps each run's own latest model and user factors
    // (`--run`), beside the latest of any run at the top.
    for k in 0..2 {
        let state =
            fedcart_client::state::StateDir::open(dir.path().join(format!("m{k}"))).unwrap();
        assert_eq!(state.runs(), [a.0, b.0]);
        for (run, models) in [(a.0, &together[0]), (b.0, &together[1])] {
            let own = state.run(run).unwrap();
            let (meta, params) = own.load_global("mf").unwrap().unwrap();
            assert_eq!(meta.run_id, run);
            assert!(meta.version >= 2, "{run}: {}", meta.version);
            assert_eq!(params, models[meta.version as usize], "{run} m{k}");
            assert!(own.load_users().unwrap().is_some(), "{run} m{k}");
        }
    }
}

/// A run whose connected agents cannot serve it says so: how many of the
/// needed agents can, and which connected merchants hold none of its data,
/// instead of a bare "waiting for agents".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_waiting_for_agents_names_the_connected_merchants_without_its_data() {
    let split = telco_split(2, 23);
    let dir = tempfile::tempdir().unwrap();
    let mut run = churn_run("recs", 1, 2, 2);
    run.model = fedcart_common::task::ModelSpec::MfImplicit {
        num_items: 2,
        factors: 1,
        hyper: Default::default(),
    };
    let coord = start_coordinator(&dir.path().join("c.redb"), run, 0).await;
    let mut progress = coord.hub.get("recs").unwrap().progress();
    // Churn customers only: no purchase histories for the recommender.
    let agents: Vec<_> = (0..2)
        .map(|k| spawn_agent(coord.addr, load_merchant(&format!("m{k}"), &split.files[k])))
        .collect();
    progress.wait_for(|p| p.agents == 2).await.unwrap();
    let phase = coord.hub.summary("recs").unwrap().phase;
    assert_eq!(
        phase,
        "waiting for agents: 0 of 2 needed can serve it; connected without mf data: m0, m1"
    );
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}
