//! The dashboard in a real headless browser: after two rounds the page shows
//! the current round, draws a metric chart as inline SVG, lists the agents,
//! and logs no console errors. Skipped, with a notice, when no `chromium` is
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_round_chart_and_agents_in_headless_chromium() {
    let Some(browser) = chromium() else {
        eprintln!("NOTICE: chromium not installed; dashboard browser test skipped");
        return;
    };
    init_logs();
    let split = telco_split(2, 13);
    let store = tempfile::tempdir().unwrap();
    let mut opts = ServeOptions::insecure();
    opts.http = Some(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let coord = start_with(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        &store.path().join("c.redb"),
        churn_run("dash", 2, 2, 2),
        Duration::from_millis(500),
        opts,
    )
    .await
    .unwrap();
    let http = coord.http_addr.unwrap();
    let agents: Vec<_> = (0..2)
        .map(|k| spawn_agent(coord.addr, load_merchant(&format!("m{k}"), &split.files[k])))
        .collect();
    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.finished).await.unwrap();

    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{http}/");
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
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {log}");
    assert!(dom.contains("round: 2"), "current round missing:\n{dom}");
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
    for a in agents {
        a.stop().await;
    }
    coord.shutdown().await.unwrap();
}
