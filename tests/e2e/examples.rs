//! The commented example configurations in the repository load with the real
//! configuration types, so the documentation cannot drift from the code.

use std::path::Path;

#[test]
fn example_coordinator_and_merchant_configs_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let c = fedcart_coordinator::config::CoordinatorConfig::load(
        &root.join("coordinator/examples/coordinator.toml"),
    )
    .expect("coordinator example loads");
    assert_eq!(c.run.rounds, 20);
    let m = fedcart_client::config::AgentConfig::load(&root.join("client/examples/merchant.toml"))
        .expect("merchant example loads");
    assert_eq!(m.merchant_id, "m0");
    assert!(m.tls.is_some());
    // README's fleet load test: 1,000 sessions, secure rounds, its own CA.
    let f = fedcart_coordinator::config::CoordinatorConfig::load(
        &root.join("coordinator/examples/fleet.toml"),
    )
    .expect("fleet example loads");
    assert_eq!(f.run.selection.min_agents, 1000);
    assert!(f.run.secagg.is_some());
    // README's fleet churn study: the Telco table's width, no TLS.
    let churn = fedcart_coordinator::config::CoordinatorConfig::load(
        &root.join("coordinator/examples/fleet-churn.toml"),
    )
    .expect("fleet churn example loads");
    let telco = fedcart_common::data::tabular::Schema::telco().num_features();
    assert_eq!(
        churn.run.model,
        fedcart_common::task::ModelSpec::churn_lr(telco)
    );
    assert!(churn.serve.tls.is_none());
}
