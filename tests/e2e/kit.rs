//! A merchant kit from `fedcart-coordinator certs issue --kit` runs as is:
//! the real coordinator and agent binaries, started from a working directory
//! that is neither the kit's nor the coordinator configuration's, with
//! relative paths in both configurations, complete a round over mutual TLS
//! with nothing in the kit but its orders export.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fedcart_coordinator::store::Store;
use fedcart_tests::*;

/// Every environment override a developer's shell might carry into the test.
const OVERRIDES: [&str; 17] = [
    "FEDCART_COORDINATOR",
    "FEDCART_MERCHANT_ID",
    "FEDCART_STATE_DIR",
    "FEDCART_DATA_ORDERS_CSV",
    "FEDCART_DATA_CHURN_CSV",
    "FEDCART_DATA_RATINGS_CSV",
    "FEDCART_DATA_CATALOGUE",
    "FEDCART_DATA_ITEM_NAMES",
    "FEDCART_TLS_CA",
    "FEDCART_TLS_CERT",
    "FEDCART_TLS_KEY",
    "FEDCART_TLS_ACCESS",
    "FEDCART_STORE",
    "FEDCART_LISTEN",
    "FEDCART_HTTP_LISTEN",
    "FEDCART_INSECURE",
    "FEDCART_CLIENT_CONFIG",
];

/// Kills the process when the test ends, however it ends.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command(bin: &str, cwd: &std::path::Path) -> Command {
    let mut c = Command::new(bin_dir().join(bin));
    c.current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for v in OVERRIDES {
        c.env_remove(v);
    }
    c
}

#[test]
fn a_kit_runs_as_is_from_another_directory_and_completes_a_round() {
    let root = tempfile::tempdir().unwrap();
    let (pki, coord, elsewhere) = (
        root.path().join("pki"),
        root.path().join("coordinator"),
        root.path().join("elsewhere"),
    );
    for d in [&coord, &elsewhere] {
        std::fs::create_dir_all(d).unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    // The operator's commands, as the README gives them.
    let status = command("fedcart-coordinator", root.path())
        .args(["certs", "init", "--dir", "pki"])
        .status()
        .unwrap();
    assert!(status.success());
    // Two stores of the bundled grocery log, each its own orders export.
    let exports = store_exports(root.path(), &["433", "324"]);
    for (k, export) in exports.iter().enumerate() {
        let id = format!("m{k}");
        let kit = root.path().join(format!("kits/{id}"));
        let status = command("fedcart-coordinator", root.path())
            .args(["certs", "issue", "--dir", "pki", "--id", &id, "--kit"])
            .arg(&kit)
            .args(["--coordinator-url", &format!("https://localhost:{port}")])
            .status()
            .unwrap();
        assert!(status.success());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(kit.join(format!("{id}.key")))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "the kit's key is private");
        }
        // The kit names every environment override the agent reads.
        let text = std::fs::read_to_string(kit.join("merchant.toml")).unwrap();
        for (var, _) in fedcart_client::config::ENV_OVERRIDES {
            assert!(text.contains(var), "the kit's comment lacks {var}");
        }
        // The merchant drops its orders export into the kit: nothing else.
        std::fs::copy(export, kit.join("data/orders.csv")).unwrap();
    }
    assert!(pki.join("access.toml").exists());
    let config = coord.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            r#"[serve]
listen = "127.0.0.1:{port}"
store = "store.redb"
[serve.tls]
ca = "../pki/ca.pem"
cert = "../pki/coordinator.pem"
key = "../pki/coordinator.key"
access = "../pki/access.toml"
[run]
run_id = "kit"
seed = 42
rounds = 1
quorum = 2
round_timeout_ms = 60000
evaluate = false
model = {{ family = "churn_lr", num_features = 8 }}
sgd = {{ epochs = 1, batch_size = 32, learning_rate = 0.05, l2 = 0.0 }}
selection = {{ fraction = 1.0, min_agents = 2, max_agents = 2 }}
"#
        ),
    )
    .unwrap();
    let mut coordinator = command("fedcart-coordinator", &elsewhere)
        .args(["serve", "--config"])
        .arg(&config)
        .spawn()
        .unwrap();
    let _agents: Vec<Killed> = (0..2)
        .map(|k| {
            Killed(
                command("fedcart-client", &elsewhere)
                    .args(["run", "--config"])
                    .arg(root.path().join(format!("kits/m{k}/merchant.toml")))
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    // The coordinator exits by itself once the run's round is committed; the
    // channel's timeout only bounds a hung run (whose process is then killed
    // by its id).
    let pid = coordinator.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(coordinator.wait());
        coordinator
    });
    let exit = match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(exit) => exit.unwrap(),
        Err(e) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("the run did not finish: {e}");
        }
    };
    assert!(exit.success(), "coordinator exit: {exit:?}");
    let store = Store::open(&coord.join("store.redb")).expect("store beside its config");
    assert_eq!(store.latest_version().unwrap(), Some(1));
    for k in 0..2 {
        // The run's own directory.
        let state = root
            .path()
            .join(format!("kits/m{k}/state/runs/kit/global-churn.json"));
        assert!(
            state.exists(),
            "{} kept beside the kit's config",
            state.display()
        );
        // The run does not evaluate between rounds, yet its trained version
        // reached the merchant (the final evaluation task hands it out), so
        // `score` answers from it.
        let top =
            fedcart_client::state::StateDir::open(root.path().join(format!("kits/m{k}/state")))
                .unwrap()
                .load_global("churn")
                .unwrap()
                .map(|(meta, _)| (meta.run_id, meta.version));
        assert_eq!(top, Some(("kit".to_owned(), 1)), "merchant m{k}");
    }
    let stray: Vec<_> = std::fs::read_dir(&elsewhere).unwrap().collect();
    assert!(
        stray.is_empty(),
        "nothing written to the working directory: {stray:?}"
    );
}
