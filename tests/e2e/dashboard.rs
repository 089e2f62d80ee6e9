//! The dashboard in a real headless browser: after two rounds the page shows
//! the current round of the run's total, draws a metric chart as inline SVG,
//! lists the agents with their participation, and logs no console errors;
//! while the run waits it shows the quorum shortfall. Skipped, with a notice, when no `chromium` is
//! installed (`.ci/dashboard-test.sh` runs it where it is).

use std::process::Command;
use std::time::Duration;

use fedcart_coordinator::server::{ServeOptions, start_with};
use fedcart_tests::*;
use tokio::net::TcpListener;

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(str::to_owned)
}

/// Chromium's DOM of `url` after the page's scripts ran (5 s of virtual
/// time), with its stderr log; asserts that it ran and logged no console
/// errors.
async fn dump_dom(browser: String, url: String) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--dump-dom")
            .arg(url)
            .output()
            .expect("chromium runs")
    })
    .await
    .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {log}");
    let console_errors: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("CONSOLE")
                && (l.contains("Uncaught") || l.contains("ERROR") || l.contains("error"))
        })
        .collect();
    assert!(
        console_errors.is_empty(),
        "console errors: {console_errors:?}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn start_dashboard(
    run: fedcart_coordinator::config::RunConfig,
    store: &std::path::Path,
) -> fedcart_coordinator::server::Running {
    let mut opts = ServeOptions::insecure();
    opts.http = Some(TcpListener::bind("127.0.0.1:0").await.unwrap());
    start_with(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        &store.join("c.redb"),
        run,
        Duration::from_millis(500),
        opts,
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_round_chart_and_agents_in_headless_chromium() {
    let Some(browser) = chromium() else {
        eprintln!("NOTICE: chromium not installed; dashboard browser test skipped");
        return;
    };
    init_logs();
    let split = telco_split(2, 13);
    let store = tempfile::tempdir().unwrap();
    let coord = start_dashboard(churn_run("dash", 2, 2, 2), store.path()).await;
    let http = coord.http_addr.unwrap();
    let agents: Vec<_> = (0..2)
        .map(|k| spawn_agent(coord.addr, load_merchant(&format!("m{k}"), &split.files[k])))
        .collect();
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.finished).await.unwrap();

    let dom = dump_dom(browser.clone(), format!("http://{http}/")).await;
    assert!(
        dom.contains("round: 2 of 2"),
        "current round missing:\n{dom}"
    );
    assert!(
        dom.contains("<svg") && dom.contains("<path"),
        "no chart drawn:\n{dom}"
    );
    assert!(
        dom.contains("evaluate auc"),
        "no evaluation AUC curve:\n{dom}"
    );
    assert!(
        dom.contains("<td>m0</td>") && dom.contains("<td>m1</td>"),
        "agents missing:\n{dom}"
    );
    assert!(
        !dom.contains("id=\"shortfall\""),
        "no shortfall once finished:\n{dom}"
    );

    // The JSON behind it: per-merchant participation and a paginated history.
    let all: serde_json::Value =
        serde_json::from_str(&crate::security::http_get(http, "/api/status").await).unwrap();
    let total = all["history_total"].as_u64().unwrap() as usize;
    assert!(total >= 3, "{all}");
    assert_eq!(all["history"].as_array().unwrap().len(), total.min(50));
    let history = coord.shared.history().unwrap();
    for a in all["agents"].as_array().unwrap() {
        let m = a["merchant"].as_str().unwrap().to_string();
        let count = |f: fn(&fedcart_coordinator::record::RoundRecord) -> &Vec<String>| {
            history.iter().filter(|r| f(r).contains(&m)).count() as u64
        };
        assert_eq!(a["selected"], count(|r| &r.selected), "{a}");
        assert_eq!(a["reported"], count(|r| &r.reported), "{a}");
        assert_eq!(a["dropped"], count(|r| &r.dropped), "{a}");
    }
    let page: serde_json::Value =
        serde_json::from_str(&crate::security::http_get(http, "/api/status?since=1&limit=2").await)
            .unwrap();
    assert_eq!(page["history_offset"], 1);
    let ids: Vec<&str> = page["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [&history[1].task_id, &history[2].task_id]);
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_quorum_shortfall_while_the_run_waits_for_agents() {
    let Some(browser) = chromium() else {
        eprintln!("NOTICE: chromium not installed; dashboard browser test skipped");
        return;
    };
    init_logs();
    let store = tempfile::tempdir().unwrap();
    // Three merchants needed; one connects.
    let coord = start_dashboard(churn_run("short", 2, 3, 3), store.path()).await;
    let split = telco_split(1, 13);
    let agent = spawn_agent(coord.addr, load_merchant("m0", &split.files[0]));
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.agents == 1).await.unwrap();
    let dom = dump_dom(browser, format!("http://{}/", coord.http_addr.unwrap())).await;
    assert!(
        dom.contains("1 connected, 3 needed"),
        "no shortfall:\n{dom}"
    );
    assert!(dom.contains("round: 0 of 2"), "{dom}");
    agent.stop().await;
    coord.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_epsilon_a_dp_run_has_spent() {
    init_logs();
    let split = telco_split(2, 13);
    let store = tempfile::tempdir().unwrap();
    let mut run = churn_run("dash-dp", 2, 2, 2);
    run.dp = Some(fedcart_coordinator::config::DpSettings::central(
        0.5, 1.0, 1e-5,
    ));
    let coord = start_dashboard(run, store.path()).await;
    let http = coord.http_addr.unwrap();
    let agents: Vec<_> = (0..2)
        .map(|k| spawn_agent(coord.addr, load_merchant(&format!("m{k}"), &split.files[k])))
        .collect();
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.finished).await.unwrap();
    let spent = epsilon_spent(&coord.shared);
    let status: serde_json::Value =
        serde_json::from_str(&crate::security::http_get(http, "/api/status").await).unwrap();
    assert_eq!(
        status["privacy"]["epsilon"].as_f64(),
        Some(spent),
        "{status}"
    );
    assert!(spent > 0.0);
    assert_eq!(status["privacy"]["delta"].as_f64(), Some(1e-5));
    assert!(status["privacy"]["budget"].is_null(), "no target ε set");
    if let Some(browser) = chromium() {
        let dom = dump_dom(browser, format!("http://{http}/")).await;
        assert!(
            dom.contains(&format!("ε spent: {spent:.3} (no budget)")),
            "{dom}"
        );
    }
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_lists_every_run_with_its_round_after_two_concurrent_runs_finished() {
    init_logs();
    let split = telco_split(2, 17);
    let store = tempfile::tempdir().unwrap();
    let coord = start_dashboard(churn_run("dash-a", 2, 2, 2), store.path()).await;
    let http = coord.http_addr.unwrap();
    // A second run through the Admin RPC (plaintext: the caller is the
    // operator), going at the same time as the first.
    let toml = crate::runs::churn_run_toml(
        "dash-b",
        3,
        2,
        "[dp]\nclip = 1.0\nnoise_multiplier = 1.0\ndelta = 1e-5\n",
    );
    let mut admin = crate::runs::submit_toml(coord.addr, toml).await;
    let agents: Vec<_> = (0..2)
        .map(|k| spawn_agent(coord.addr, load_merchant(&format!("m{k}"), &split.files[k])))
        .collect();
    coord.hub.wait_all_ended().await;

    // Every run's series are in /metrics, not only the first run's.
    let metrics = crate::security::http_get(http, "/metrics").await;
    for (run, rounds) in [("dash-a", 2.0), ("dash-b", 3.0)] {
        let series = |name: &str| format!("{name}{{run=\"{run}\",kind=\"train\"}}");
        assert_eq!(
            crate::security::metric(&metrics, &series("fedcart_rounds_committed_total")),
            rounds,
            "{metrics}"
        );
        assert_eq!(
            crate::security::metric(&metrics, &format!("fedcart_model_version{{run=\"{run}\"}}")),
            rounds
        );
    }
    // The submitted run's ε is in its series, its summary and `runs show`.
    let spent = epsilon_spent(&coord.hub.get("dash-b").unwrap());
    assert!(spent > 0.0);
    assert_eq!(
        crate::security::metric(&metrics, "fedcart_dp_epsilon{run=\"dash-b\"}"),
        spent
    );
    // Every task of the submitted run counts as started once (the observer
    // follows the first run's progress, and saw few of these open): the
    // statistics step, three rounds and the evaluation that hands out the
    // last version — and any attempt a loaded machine made it retry, each of
    // which left its record.
    let records = coord.hub.get("dash-b").unwrap().history().unwrap();
    assert!(records.len() >= 5, "{records:?}");
    assert_eq!(
        crate::security::metric(&metrics, "fedcart_tasks_started_total{run=\"dash-b\"}"),
        records.len() as f64,
        "{metrics}"
    );
    let summary = coord.hub.summary("dash-b").unwrap();
    assert_eq!((summary.epsilon, summary.delta), (Some(spent), Some(1e-5)));
    assert_eq!(coord.hub.summary("dash-a").unwrap().delta, None);
    let shown = admin
        .show_run(fedcart_proto::v1::RunRequest {
            run_id: "dash-b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.epsilon, Some(spent));
    assert!(fedcart_coordinator::runs::to_table(&[shown]).contains(&format!("{spent:.3}")));
    // `/api/status?run=ID` describes that run; an unknown id is a 404.
    let b: serde_json::Value = serde_json::from_str(
        &crate::security::http_get(http, "/api/status?run=dash-b&limit=500").await,
    )
    .unwrap();
    assert_eq!(b["run_id"], "dash-b");
    assert_eq!(b["model_version"], 3);
    assert_eq!(b["privacy"]["epsilon"].as_f64(), Some(spent), "{b}");
    // Its agents' participation is its own: the statistics step, three
    // rounds and the final evaluation each, not the sum over both runs.
    let selected: Vec<u64> = b["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["selected"].as_u64().unwrap())
        .collect();
    assert_eq!(selected, [5, 5], "{b}");
    let kinds: Vec<&str> = b["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["stats", "train", "train", "train", "evaluate"],
        "{b}"
    );
    let missing = crate::security::http_raw(http, "GET", "/api/status?run=nope", "").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    // The API's refusals are JSON, its own and axum's alike: an unknown
    // run, an unknown or malformed parameter, a method it does not take.
    for (method, path, status, says) in [
        ("GET", "/api/status?run=nope", "404", "no run `nope`"),
        ("GET", "/api/status?foo=1", "400", "unknown field `foo`"),
        ("GET", "/api/status?limit=abc", "400", "limit"),
        ("POST", "/api/status", "405", "method not allowed"),
        ("GET", "/api/nothing", "404", "not found"),
    ] {
        let resp = crate::security::http_raw(http, method, path, "").await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {status}"))
                && resp
                    .to_ascii_lowercase()
                    .contains("content-type: application/json")
                && resp.contains("{\"error\":")
                && resp.contains(says),
            "{method} {path}: {resp}"
        );
    }
    // So does `status --run ID`.
    let url = format!("http://{}", coord.addr);
    let reply = fedcart_coordinator::status::fetch(&url, None, Some("dash-b"))
        .await
        .unwrap();
    assert_eq!((reply.run_id.as_str(), reply.round), ("dash-b", 3));

    if let Some(browser) = chromium() {
        let dom = dump_dom(browser.clone(), format!("http://{http}/")).await;
        for (run, rounds) in [("dash-a", 2), ("dash-b", 3)] {
            let row = format!(
                "<tr data-run=\"{run}\"><td><a href=\"?run={run}\">{run}</a></td><td>churn-lr</td><td>round {rounds} of {rounds}</td><td>finished</td>"
            );
            assert!(dom.contains(&row), "no row `{row}`:\n{dom}");
        }
        // The run's link shows that run.
        let dom = dump_dom(browser, format!("http://{http}/?run=dash-b")).await;
        assert!(
            dom.contains("run: dash-b") && dom.contains("round: 3 of 3"),
            "{dom}"
        );
    } else {
        eprintln!("NOTICE: chromium not installed; dashboard browser checks skipped");
    }
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}

/// The ε a run's last released round recorded.
fn epsilon_spent(run: &fedcart_coordinator::service::Shared) -> f64 {
    run.history()
        .unwrap()
        .iter()
        .rev()
        .find_map(|r| r.privacy.as_ref().map(|p| p.epsilon))
        .expect("ε recorded")
}
