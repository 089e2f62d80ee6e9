//! The `fedcart-sim` command's output contract: stdout holds only the
//! summary (a table, or one JSON document with `--format json`), logs and
//! progress go to stderr, and INFO logs are off unless `-v`.

use std::process::Command;

fn sim(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fedcart-sim"))
        .args([
            "--task",
            "churn-lr",
            "--merchants",
            "3",
            "--rounds",
            "2",
            "--data",
        ])
        .arg(format!(
            "telco:{}/../../data/telco-churn/Telco-Customer-Churn.csv",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args(extra)
        .env_remove("RUST_LOG")
        .output()
        .expect("fedcart-sim runs")
}

#[test]
fn format_json_prints_one_json_document_on_stdout() {
    let out = sim(&["--format", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let e = &json["experiments"][0];
    assert_eq!(e["rounds"], 2, "{json}");
    assert_eq!(e["merchants"], 3, "{json}");
    assert!(e["final"]["auc"].as_f64().is_some(), "{json}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains(" INFO "),
        "INFO logs are off by default: {stderr}"
    );
}

#[test]
fn the_default_output_is_the_table_alone_and_v_brings_info_logs_back() {
    let out = sim(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("experiment") && stdout.contains("s/round"),
        "{stdout}"
    );
    assert!(
        stdout.lines().all(|l| !l.trim_start().starts_with('{')),
        "no JSON on stdout by default: {stdout}"
    );
    let verbose = sim(&["-v"]);
    assert!(verbose.status.success());
    let stderr = String::from_utf8_lossy(&verbose.stderr);
    assert!(stderr.contains(" INFO "), "-v shows INFO logs: {stderr}");
    assert!(
        !String::from_utf8_lossy(&verbose.stdout).contains(" INFO "),
        "logs never go to stdout"
    );
}

/// A negative value reaches the flag's own check, which says what is
/// allowed, instead of clap reading `-1` as an unknown flag.
#[test]
fn a_negative_value_gets_the_flags_own_error() {
    let out = sim(&["--dp-clip", "-1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "error: --dp-clip -1 must be finite and > 0");
}

/// `fedcart-sim … | head -1`: a reader that goes away before the table is
/// printed ends the run quietly with status 0, as it ends `cat`, instead
/// of `println!`'s panic (status 101, "failed printing to stdout").
#[test]
fn a_reader_that_went_away_ends_the_run_quietly() {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_fedcart-sim"))
        .args(["--task", "noop:10", "--merchants", "2", "--rounds", "1"])
        .stdout(writer)
        .env_remove("RUST_LOG")
        .output()
        .expect("fedcart-sim runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("panicked"),
        "{:?}: {stderr}",
        out.status
    );
}

/// `fedcart-sim -v 2>&1 | head -1`: a reader of the logs that goes away
/// leaves the run to finish; the log subscriber's report of the failed
/// write went through `eprintln!`, which panicked (status 101), as it took
/// a coordinator or an agent down mid-round (found by a fault probe).
#[test]
fn a_log_reader_that_went_away_leaves_the_run_to_finish() {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_fedcart-sim"))
        .args([
            "-v",
            "--task",
            "noop:10",
            "--merchants",
            "2",
            "--rounds",
            "1",
        ])
        .stderr(writer)
        .env_remove("RUST_LOG")
        .output()
        .expect("fedcart-sim runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}: {stdout}", out.status);
    assert!(stdout.contains("noop"), "{stdout}");
}

/// The table's `final` is the served version's figure, as `final` in the
/// JSON: with FedAvgM overshooting, model selection serves version 1 while
/// the last version is far worse, and the table showed the last.
#[test]
fn the_tables_final_is_the_served_versions_figure_as_in_the_json() {
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fedcart-sim"))
            .args([
                "--task",
                "mf",
                "--merchants",
                "5",
                "--rounds",
                "2",
                "--epochs",
                "1",
            ])
            .args(["--strategy", "fedavgm", "--data"])
            .arg(format!(
                "movielens:{}/../../data/ml-latest-small/ratings.csv",
                env!("CARGO_MANIFEST_DIR")
            ))
            .args(extra)
            .env_remove("RUST_LOG")
            .output()
            .expect("fedcart-sim runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&run(&["--format", "json"])).unwrap();
    let served = json["experiments"][0]["final"]["rmse"].as_f64().unwrap();
    let table = run(&[]);
    assert!(table.contains("model selection: best version 1"), "{table}");
    let row = table.lines().find(|l| l.contains("fedavgm")).unwrap();
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert_eq!(cells[6], format!("rmse {served:.4}"), "{table}");
}
