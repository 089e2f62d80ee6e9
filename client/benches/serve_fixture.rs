//! A merchant whose agent state holds real-shaped models, for the serving
//! API's test and load benchmark: the bundled Telco table with a churn model
//! over its 45 features, and MovieLens `ml-latest-small` (610 customers,
//! 9,742 items, names from `movies.csv`) with an 8-factor recommender.
//! Parameters are seeded from the version, so each version answers
//! differently and replays exactly; the cost of a request does not depend on
//! the values.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fedcart_client::config::AgentConfig;
use fedcart_client::state::{GlobalMeta, StateDir};
use fedcart_common::data::catalogue::Catalogue;
use fedcart_common::data::movielens;
use fedcart_common::data::standardize::Standardizer;
use fedcart_common::data::tabular::Schema;
use fedcart_common::model::mf::{MfData, MfHyper, initial_params};
use fedcart_common::model::sgd::SgdParams;
use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};

/// Latent factors of the fixture's recommender.
pub const FACTORS: usize = 8;

/// The fixture: a temporary directory with `merchant.toml`, the catalogue
/// and the agent's state.
pub struct Fixture {
    /// Holds everything; deleted on drop.
    pub dir: tempfile::TempDir,
    /// The agent configuration as `serve` loads it.
    pub cfg: AgentConfig,
    /// The agent's state directory.
    pub state: StateDir,
    /// Customer ids of the Telco table.
    pub customers: Vec<String>,
    /// Customer ids of the ratings file.
    pub shoppers: Vec<String>,
    standardizer: Standardizer,
    num_items: usize,
}

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data")
        .join(rel)
}

fn spec(model: ModelSpec, standardizer: Option<Standardizer>) -> TaskSpec {
    TaskSpec {
        kind: TaskKind::Train,
        model,
        sgd: SgdParams::default(),
        seed: 42,
        round: 1,
        standardizer,
        dp: None,
        best_version: None,
    }
}

impl Fixture {
    /// Writes the files and publishes version 1 of both models.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ratings = data("ml-latest-small/ratings.csv");
        let rows = movielens::load_ratings(&ratings).expect("MovieLens ratings");
        let catalogue = Catalogue::from_interactions(&rows);
        let cat_path = dir.path().join("catalogue.txt");
        let ids: Vec<&str> = (0..catalogue.len() as u32)
            .map(|i| catalogue.id(i).expect("in range"))
            .collect();
        std::fs::write(&cat_path, ids.join("\n")).expect("catalogue written");
        let config = dir.path().join("merchant.toml");
        std::fs::write(
            &config,
            format!(
                "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\nstate_dir = \"state\"\n\
                 [data]\nchurn_csv = \"{}\"\nratings_csv = \"{}\"\ncatalogue = \"catalogue.txt\"\n\
                 item_names = \"{}\"\n",
                data("telco-churn/Telco-Customer-Churn.csv").display(),
                ratings.display(),
                data("ml-latest-small/movies.csv").display(),
            ),
        )
        .expect("config written");
        let cfg = AgentConfig::load_with_env(&config, |_| None).expect("config loads");
        let state = StateDir::open(cfg.state_dir.clone().expect("state_dir")).expect("state");
        let table = Schema::telco()
            .load_csv(cfg.data.churn_csv.as_ref().expect("churn_csv"))
            .expect("Telco table");
        let inter = fedcart_client::data::interactions(&cfg)
            .expect("recommender data")
            .expect("ratings configured");
        let mut mf: MfData = inter.mf(&inter.items(0).expect("the catalogue"));
        mf.ensure_users(FACTORS, 42, 0.1, "m0");
        state.save_users(&mf.state).expect("user factors saved");
        let f = Fixture {
            customers: table.ids.clone(),
            shoppers: mf.users.clone(),
            standardizer: Standardizer::fit(&table.x),
            num_items: catalogue.len(),
            dir,
            cfg,
            state,
        };
        f.publish(1);
        f
    }

    /// Stores `version` of the churn model and of the recommender, as the
    /// agent does when it receives them.
    pub fn publish(&self, version: u64) {
        let n = Schema::telco().num_features();
        let churn: Vec<f32> = (0..=n)
            .map(|i| ((i as f32) * 0.37 + version as f32).sin() * 0.5)
            .collect();
        self.save(
            ModelSpec::churn_lr(n),
            Some(self.standardizer.clone()),
            version,
            &churn,
        );
        let mf = initial_params(self.num_items, FACTORS, 0.1, version);
        self.save(
            ModelSpec::Mf {
                num_items: self.num_items,
                factors: FACTORS,
                hyper: MfHyper::default(),
            },
            None,
            version,
            &mf,
        );
    }

    /// Stores `version` of an implicit (BPR) recommender and user state whose
    /// validation chose `pop_blend`, as the agent does after an implicit
    /// round.
    pub fn publish_implicit(&self, version: u64, pop_blend: f32) {
        let mf = initial_params(self.num_items, FACTORS, 0.1, version);
        self.save(
            ModelSpec::MfImplicit {
                num_items: self.num_items,
                factors: FACTORS,
                hyper: MfHyper::default(),
            },
            None,
            version,
            &mf,
        );
        let mut users = self
            .state
            .load_users()
            .expect("user factors readable")
            .expect("user factors saved");
        users.pop_blend = pop_blend;
        self.state.save_users(&users).expect("user factors saved");
    }

    /// Stores `version` of `model` with `params`, as the agent does.
    pub fn save(&self, model: ModelSpec, st: Option<Standardizer>, version: u64, params: &[f32]) {
        let meta = GlobalMeta {
            run_id: "fixture".into(),
            version,
            spec: spec(model, st),
            sha256: None,
        };
        self.state.save_global(&meta, params).expect("model saved");
    }
}
