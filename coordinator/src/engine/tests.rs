//! Unit tests of the round engine over a temporary redb store: selection,
//! quorum, abort and retry, the submission checks, and the FedAvg commit.

use fedcart_common::federation::update::Update;
use fedcart_common::task::{ModelSpec, TaskKind};

use super::plan::{select, select_cohort};
use super::*;
use crate::config::Selection;
use crate::record::Outcome;

const DIM: usize = 3;

fn agents(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i:02}")).collect()
}

fn selection(fraction: f64, min_agents: usize, max_agents: usize) -> Selection {
    Selection {
        fraction,
        min_agents,
        max_agents,
        min_available: 0,
    }
}

/// A training-only run of a `Noop` model of `DIM` values.
fn run(selection: Selection, quorum: usize) -> RunConfig {
    RunConfig {
        run_id: "engine".into(),
        seed: 11,
        rounds: 3,
        model: ModelSpec::Noop { dim: DIM },
        sgd: Default::default(),
        selection,
        quorum,
        round_timeout_ms: 1_000,
        evaluate: false,
        strategy: Default::default(),
        secagg: None,
        dp: None,
        max_attempts: crate::config::DEFAULT_MAX_ATTEMPTS,
        early_stopping: None,
    }
}

/// An engine over a fresh store in a temporary directory (kept alive by the
/// returned guard).
fn engine(run: RunConfig) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open_scratch(&dir.path().join("engine.redb")).expect("store");
    let engine = Engine::open(store, run).expect("engine opens");
    (dir, engine)
}

fn update(values: [f32; DIM], weight: f64) -> Submission {
    Submission {
        update: Some(Update {
            values: values.to_vec(),
            coord_weights: vec![],
            weight,
        }),
        metrics: [("loss".to_string(), 1.0)].into(),
        weight,
        validation_weight: weight,
        bytes: 12,
    }
}

fn submit(
    e: &mut Engine,
    plan: &TaskPlan,
    agent: &str,
    sub: Submission,
) -> Result<(), SubmitError> {
    e.submit(agent, "engine", plan.round, &plan.task_id, sub)
}

#[test]
fn selection_takes_the_fraction_rounded_up_within_min_and_max() {
    let all = agents(10);
    let (picked, population) = select(&all, &selection(0.25, 2, 5), 1, "r1a1-train");
    assert_eq!((picked.len(), population), (3, 10));
    let (picked, _) = select(&all, &selection(1.0, 2, 5), 1, "r1a1-train");
    assert_eq!(picked.len(), 5, "capped at max_agents");
    let (picked, _) = select(&all, &selection(0.01, 4, 5), 1, "r1a1-train");
    assert_eq!(picked.len(), 4, "raised to min_agents");
    let mut twice = all.clone();
    twice.extend(all.clone());
    let (picked, population) = select(&twice, &selection(1.0, 1, 100), 1, "r1a1-train");
    assert_eq!((picked, population), (all, 10), "duplicates count once");
}

#[test]
fn selection_is_deterministic_for_a_seed_and_task() {
    let all = agents(20);
    let sel = selection(0.25, 1, 20);
    let (a, _) = select(&all, &sel, 7, "r1a1-train");
    let mut shuffled = all.clone();
    shuffled.reverse();
    assert_eq!(
        select(&shuffled, &sel, 7, "r1a1-train").0,
        a,
        "input order is irrelevant"
    );
    assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted");
    let others: Vec<_> = (0..8)
        .map(|s| select(&all, &sel, s, "r1a1-train").0)
        .collect();
    assert!(others.iter().any(|o| *o != a), "the seed changes the draw");
    let next_attempt = select(&all, &sel, 7, "r1a2-train").0;
    let next_round = select(&all, &sel, 7, "r2a1-train").0;
    assert!(
        next_attempt != a || next_round != a,
        "the task id changes the draw"
    );
}

#[test]
fn evaluations_sample_the_same_merchants_every_round_and_replace_only_those_away() {
    let all = agents(20);
    let sel = selection(0.25, 1, 20);
    let (cohort, population) = select_cohort(&all, &sel, 7);
    assert_eq!((cohort.len(), population), (5, 20));
    let mut shuffled = all.clone();
    shuffled.reverse();
    assert_eq!(select_cohort(&shuffled, &sel, 7).0, cohort);
    // One of the cohort away: the other four stay, one more is drawn.
    let away = &cohort[0];
    let rest: Vec<String> = all.iter().filter(|m| *m != away).cloned().collect();
    let (next, _) = select_cohort(&rest, &sel, 7);
    assert_eq!(next.len(), 5);
    assert!(
        cohort[1..].iter().all(|m| next.contains(m)),
        "{cohort:?} {next:?}"
    );
    assert!(!next.contains(away));
    assert!(
        (0..8).any(|s| select_cohort(&all, &sel, s).0 != cohort),
        "the run seed changes the cohort"
    );
    // Through the engine: two rounds' evaluations go to the same merchants
    // while training draws afresh.
    let mut r = run(sel.clone(), 1);
    r.evaluate = true;
    let (_dir, mut e) = engine(r);
    let mut evaluated = Vec::new();
    for _ in 0..2 {
        let plan = e.start_task(&all).unwrap();
        assert_eq!(plan.spec.kind, TaskKind::Train);
        for m in &plan.selected {
            submit(&mut e, &plan, m, update([1.0; DIM], 1.0)).unwrap();
        }
        e.finish_task().unwrap();
        let plan = e.start_task(&all).unwrap();
        assert_eq!(plan.spec.kind, TaskKind::Evaluate);
        evaluated.push(plan.selected.clone());
        for m in &plan.selected {
            let sub = Submission {
                update: None,
                metrics: [("loss".to_string(), 1.0)].into(),
                weight: 1.0,
                validation_weight: 1.0,
                bytes: 0,
            };
            submit(&mut e, &plan, m, sub).unwrap();
        }
        e.finish_task().unwrap();
    }
    // `run` seeds the engine with 11.
    let cohort = select_cohort(&all, &sel, 11).0;
    assert_eq!(evaluated[0], cohort);
    assert_eq!(evaluated[1], cohort);
}

#[test]
fn start_task_waits_for_min_available_agents() {
    let mut sel = selection(0.5, 2, 4);
    sel.min_available = 6;
    let (_dir, mut e) = engine(run(sel, 2));
    match e.start_task(&agents(5)) {
        Err(EngineError::NotEnoughAgents { available, needed }) => {
            assert_eq!((available, needed), (5, 6));
        }
        other => panic!("expected NotEnoughAgents, got {other:?}"),
    }
    assert!(e.open_task().is_none());
    let plan = e.start_task(&agents(6)).expect("enough agents now");
    assert_eq!(
        plan.selected.len(),
        3,
        "fraction of 6, not of min_available"
    );
    assert_eq!((plan.round, plan.attempt), (1, 1));
    assert_eq!(plan.task_id, "r1a1-train");
    assert_eq!(plan.spec.kind, TaskKind::Train);
    assert_eq!(plan.spec.seed, 11);
}

#[test]
fn quorum_met_commits_the_fedavg_of_the_submitted_updates() {
    let (_dir, mut e) = engine(run(selection(1.0, 3, 3), 2));
    let before = e.global();
    let plan = e.start_task(&agents(3)).expect("task");
    // Updates carry weighted deltas: FedAvg is global + Σ values / Σ weight.
    let subs = [([1.0, 2.0, -3.0], 1.0), ([4.0, 0.5, 3.0], 3.0)];
    for (agent, (values, weight)) in plan.selected.iter().zip(subs) {
        submit(&mut e, &plan, agent, update(values, weight)).expect("accepted");
    }
    let record = e.finish_task().expect("finish");
    assert_eq!(record.outcome, Outcome::Committed);
    assert_eq!(record.kind, TaskKind::Train);
    assert_eq!(record.reported, plan.selected[..2].to_vec());
    assert_eq!(record.dropped, vec![plan.selected[2].clone()]);
    assert_eq!(record.examples, 4.0);
    assert_eq!(record.bytes_in, 24);
    assert_eq!(e.version(), 1);
    let expected: Vec<f32> = (0..DIM)
        .map(|i| {
            let sum = f64::from(subs[0].0[i]) + f64::from(subs[1].0[i]);
            before[i] + (sum / 4.0) as f32
        })
        .collect();
    assert_eq!(*e.global(), expected);
    assert_eq!(e.store().model(1).expect("store").expect("v1"), expected);
    assert_eq!(e.store().history().expect("history"), vec![record]);
}

/// A figure one agent could not compute (recall without a churner) is
/// averaged over the agents that reported it, not counted as a 0.
#[test]
fn each_metric_is_averaged_over_the_agents_that_reported_it() {
    let (_dir, mut e) = engine(run(selection(1.0, 2, 2), 2));
    let plan = e.start_task(&agents(2)).expect("task");
    let mut with = update([0.0; DIM], 1.0);
    with.metrics = [("loss".to_string(), 1.0), ("recall".to_string(), 0.8)].into();
    submit(&mut e, &plan, &plan.selected[0], with).expect("accepted");
    submit(&mut e, &plan, &plan.selected[1], update([0.0; DIM], 3.0)).expect("accepted");
    let record = e.finish_task().expect("finish");
    assert_eq!(record.metrics["loss"], 1.0);
    assert_eq!(record.metrics["recall"], 0.8);
    assert_eq!(record.examples, 4.0);
}

/// A round's figures do not depend on the order results arrived in: the
/// means are summed in agent order (over gRPC, arrival order varies from
/// run to run, and a floating-point sum with it: these three figures summed
/// in the order m01, m02, m00 give a mean one unit in the last place above
/// m00, m01, m02's).
#[test]
fn a_rounds_figures_do_not_depend_on_the_order_results_arrived_in() {
    let parts = [
        ("m00", 0.674, 12.0),
        ("m01", 0.995, 29.0),
        ("m02", 0.797, 48.0),
    ];
    let record = |order: [usize; 3]| {
        let (_dir, mut e) = engine(run(selection(1.0, 3, 3), 3));
        let plan = e.start_task(&agents(3)).expect("task");
        for i in order {
            let (agent, loss, weight) = parts[i];
            let mut sub = update([0.0; DIM], weight);
            sub.metrics = [("loss".to_string(), loss)].into();
            submit(&mut e, &plan, agent, sub).expect("accepted");
        }
        e.finish_task().expect("finish")
    };
    let (a, b) = (record([0, 1, 2]), record([1, 2, 0]));
    assert_eq!(a.metrics["loss"].to_bits(), b.metrics["loss"].to_bits());
    assert_eq!(a.examples, 89.0);
    // In arrival order the two sums differ (what the record held before).
    let mean =
        |order: [usize; 3]| order.iter().map(|&i| parts[i].1 * parts[i].2).sum::<f64>() / 89.0;
    assert_ne!(mean([0, 1, 2]).to_bits(), mean([1, 2, 0]).to_bits());
    assert_eq!(a.metrics["loss"].to_bits(), mean([0, 1, 2]).to_bits());
}

#[test]
fn quorum_missed_aborts_and_retries_the_same_round_with_the_model_unchanged() {
    let (_dir, mut e) = engine(run(selection(1.0, 3, 3), 2));
    let before = e.global();
    let plan = e.start_task(&agents(3)).expect("task");
    submit(&mut e, &plan, &plan.selected[0], update([9.0; DIM], 1.0)).expect("accepted");
    let record = e.finish_task().expect("finish");
    assert_eq!(record.outcome, Outcome::Aborted);
    assert_eq!(
        record.abort_reason.as_deref(),
        Some("1 results, quorum is 2")
    );
    assert_eq!(e.version(), 0);
    assert_eq!(e.global(), before);
    assert_eq!(e.store().latest_version().expect("store"), Some(0));

    let retry = e.start_task(&agents(3)).expect("retry");
    assert_eq!((retry.round, retry.attempt), (1, 2));
    assert_eq!(retry.task_id, "r1a2-train");
    assert_eq!(retry.model_version, 0);
}

/// Krum tolerates f liars only among 2f + 3 updates: a round with fewer
/// (here two of five selected merchants dropped) is aborted, not aggregated
/// by whatever Krum keeps.
#[test]
fn a_krum_round_with_fewer_than_2f_plus_3_updates_is_aborted() {
    let mut r = run(selection(1.0, 3, 5), 3);
    r.strategy = "krum:1".parse().unwrap();
    let (_dir, mut e) = engine(r);
    let before = e.global();
    let plan = e.start_task(&agents(5)).expect("task");
    for agent in &plan.selected[..4] {
        submit(&mut e, &plan, agent, update([1.0; DIM], 1.0)).expect("accepted");
    }
    let record = e.finish_task().expect("finish");
    assert_eq!(record.outcome, Outcome::Aborted);
    assert_eq!(
        record.abort_reason.as_deref(),
        Some("krum:1 needs at least 5 updates; 4 arrived")
    );
    assert_eq!(e.global(), before);
    // The runs list says why the round is retried (a probe saw only
    // "starting the next task" for every attempt), and so it does after a
    // restart.
    let why = "r1a1-train aborted (attempt 1 of 10, run.max_attempts): \
               krum:1 needs at least 5 updates; 4 arrived";
    assert_eq!(e.retrying().as_deref(), Some(why));
    let (path, cfg) = (e.store().path().to_owned(), e.run().clone());
    drop(e);
    let mut e = reopen(&path, &cfg);
    assert_eq!(e.retrying().as_deref(), Some(why));
    let plan = e.start_task(&agents(5)).expect("retry");
    assert_eq!(e.retrying().as_deref(), Some(why), "during the retry");
    for agent in &plan.selected {
        submit(&mut e, &plan, agent, update([1.0; DIM], 1.0)).expect("accepted");
    }
    assert_eq!(e.finish_task().expect("finish").outcome, Outcome::Committed);
    assert_eq!(e.retrying(), None, "a commit ends the retry");
}

/// An attempt's cause names the first result refused in it.
#[test]
fn an_attempts_cause_names_the_results_refused_in_it() {
    let (_dir, mut e) = engine(run(selection(1.0, 3, 3), 3));
    let plan = e.start_task(&agents(3)).expect("task");
    for agent in &plan.selected[..2] {
        submit(&mut e, &plan, agent, update([f32::NAN; DIM], 1.0)).expect_err("refused");
    }
    e.finish_task().expect("abort");
    let why = e.retrying().expect("retrying");
    assert!(
        why.starts_with("r1a1-train aborted (attempt 1 of 10, run.max_attempts): 0 results, quorum is 3; refused from m0")
            && why.ends_with("(and 1 more)"),
        "{why}"
    );
}

#[test]
fn a_stale_task_id_is_rejected() {
    let (_dir, mut e) = engine(run(selection(1.0, 2, 2), 2));
    let first = e.start_task(&agents(2)).expect("task");
    e.finish_task().expect("abort");
    let retry = e.start_task(&agents(2)).expect("retry");
    let agent = &retry.selected[0];
    let err = submit(&mut e, &first, agent, update([1.0; DIM], 1.0)).expect_err("stale");
    assert!(matches!(err, SubmitError::Closed { ref task_id, .. } if task_id == "r1a1-train"));
    submit(&mut e, &retry, agent, update([1.0; DIM], 1.0)).expect("the open task accepts");
    let err = e
        .submit(
            agent,
            "another-run",
            retry.round,
            &retry.task_id,
            update([1.0; DIM], 1.0),
        )
        .expect_err("wrong run");
    assert!(matches!(err, SubmitError::WrongRun { .. }));
}

#[test]
fn a_duplicate_submission_is_rejected_and_not_counted_twice() {
    let (_dir, mut e) = engine(run(selection(1.0, 2, 2), 1));
    let plan = e.start_task(&agents(2)).expect("task");
    let agent = plan.selected[0].clone();
    submit(&mut e, &plan, &agent, update([2.0; DIM], 1.0)).expect("first");
    let err = submit(&mut e, &plan, &agent, update([100.0; DIM], 1.0)).expect_err("second");
    assert_eq!(err, SubmitError::Duplicate(agent.clone()));
    let record = e.finish_task().expect("finish");
    assert_eq!(record.outcome, Outcome::Committed);
    assert_eq!(record.reported, vec![agent]);
    assert_eq!(record.examples, 1.0);
    assert_eq!(*e.global(), vec![2.0; DIM], "only the first update counts");
}

#[test]
fn a_dropped_agent_is_excluded_from_the_round() {
    let (_dir, mut e) = engine(run(selection(1.0, 3, 3), 1));
    let plan = e.start_task(&agents(3)).expect("task");
    let (a, b) = (plan.selected[0].clone(), plan.selected[1].clone());
    assert_eq!(e.pending(), 3);
    e.drop_agent(&a);
    e.drop_agent("not-selected");
    assert_eq!(e.pending(), 2);
    let err = submit(&mut e, &plan, &a, update([50.0; DIM], 1.0)).expect_err("dropped");
    assert_eq!(err, SubmitError::Dropped(a.clone()));
    submit(&mut e, &plan, &b, update([1.0; DIM], 1.0)).expect("accepted");
    let err = submit(&mut e, &plan, "stranger", update([1.0; DIM], 1.0)).expect_err("stranger");
    assert_eq!(err, SubmitError::NotSelected("stranger".into()));
    let record = e.finish_task().expect("finish");
    assert_eq!(record.outcome, Outcome::Committed);
    assert_eq!(record.reported, vec![b]);
    assert!(record.dropped.contains(&a));
    assert_eq!(
        *e.global(),
        vec![1.0; DIM],
        "the dropped agent's update is not in it"
    );
}

/// Runs rounds 1 and 2 of a `strategy` run, optionally after an attempt
/// whose mean step overflows f32 (weighted values at f32::MAX over a total
/// weight of 2e-30), so that the round aborts after the strategy stepped;
/// returns the version-2 model and the records.
fn two_rounds_after(strategy: &str, overflow_first: bool) -> (Vec<f32>, Vec<Outcome>) {
    let mut cfg = run(selection(1.0, 2, 2), 2);
    cfg.strategy = strategy.parse().expect("strategy");
    let (_dir, mut e) = engine(cfg);
    let all = agents(2);
    let mut outcomes = Vec::new();
    if overflow_first {
        let plan = e.start_task(&all).unwrap();
        submit(&mut e, &plan, "m00", update([f32::MAX, 1.0, 1.0], 1e-30)).unwrap();
        submit(&mut e, &plan, "m01", update([f32::MAX, 1.0, 1.0], 1e-30)).unwrap();
        let rec = e.finish_task().unwrap();
        assert!(
            rec.abort_reason
                .as_deref()
                .unwrap_or_default()
                .contains("not finite"),
            "{rec:?}"
        );
        outcomes.push(rec.outcome);
    }
    for step in [[0.5, -0.25, 0.125], [0.25, 0.5, -1.0]] {
        let plan = e.start_task(&all).unwrap();
        submit(&mut e, &plan, "m00", update(step, 1.0)).unwrap();
        submit(&mut e, &plan, "m01", update(step, 3.0)).unwrap();
        outcomes.push(e.finish_task().unwrap().outcome);
    }
    (e.global().to_vec(), outcomes)
}

#[test]
fn an_aborted_round_leaves_the_server_optimiser_state_untouched() {
    for strategy in ["fedadam", "fedavgm", "fedyogi"] {
        let (straight, o1) = two_rounds_after(strategy, false);
        let (after_abort, o2) = two_rounds_after(strategy, true);
        assert_eq!(o1, [Outcome::Committed, Outcome::Committed]);
        assert_eq!(
            o2,
            [Outcome::Aborted, Outcome::Committed, Outcome::Committed]
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&after_abort),
            bits(&straight),
            "{strategy}: abort then commit must equal a straight commit, bit for bit"
        );
    }
}

#[test]
fn an_itemsets_update_that_is_not_a_count_is_refused_and_the_level_commits_without_it() {
    let mut r = run(selection(1.0, 4, 4), 2);
    r.model = ModelSpec::Itemsets {
        num_items: 3,
        min_count: 2,
        candidates: 0,
    };
    let (_dir, mut e) = engine(r);
    let plan = e.start_task(&agents(4)).unwrap();
    assert_eq!(plan.spec.update_len(), 3, "level 1: every item a candidate");
    let counts = |values: [f32; 3], weight| update(values, weight);
    let id = plan.task_id.clone();
    e.submit("m00", "engine", 1, &id, counts([2.0, 1.0, 0.0], 2.0))
        .unwrap();
    let err = e
        .submit("m01", "engine", 1, &id, counts([0.5, 1.0, 0.0], 2.0))
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::NotACount { index: 0, .. }),
        "{err}"
    );
    // More baskets containing an item than the merchant has: refused too.
    let err = e
        .submit("m02", "engine", 1, &id, counts([1.0, 3.0, 0.0], 2.0))
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::NotACount { index: 1, .. }),
        "{err}"
    );
    // A refused update is the merchant's last for the task.
    let err = e
        .submit("m01", "engine", 1, &id, counts([1.0, 2.0, 1.0], 2.0))
        .unwrap_err();
    assert!(matches!(err, SubmitError::AlreadyRefused(_)), "{err}");
    e.submit("m03", "engine", 1, &id, counts([1.0, 2.0, 1.0], 2.0))
        .unwrap();
    let record = e.finish_task().unwrap();
    assert_eq!(record.outcome, Outcome::Committed);
    // {0}: 3 and {1}: 3 are frequent, {2}: 1 is not: level 2 counts {0, 1}.
    let (level, candidates) = fedcart_common::itemsets::Apriori::header(&e.global()).unwrap();
    assert_eq!((level, candidates), (2, 1));
    let plan = e.start_task(&agents(4)).unwrap();
    assert_eq!(plan.spec.update_len(), 1);
}

fn values(values: Vec<f32>, weight: f64) -> Submission {
    Submission {
        update: Some(Update {
            values,
            coord_weights: vec![],
            weight,
        }),
        metrics: BTreeMap::new(),
        weight,
        validation_weight: weight,
        bytes: 0,
    }
}

#[test]
fn a_segments_candidate_task_gives_each_selected_merchant_a_slot_and_refuses_a_foreign_one() {
    let mut r = run(selection(0.5, 2, 2), 1);
    r.model = ModelSpec::Segments {
        num_features: 1,
        ks: vec![1],
        choose_rounds: 0,
        lloyd_rounds: 2,
        exchange: Default::default(),
    };
    r.rounds = 3;
    r.validate().unwrap();
    let (_dir, mut e) = engine(r);
    // The statistics step: Σx and Σx² of each merchant's customers.
    let plan = e.start_task(&agents(4)).unwrap();
    assert_eq!(plan.spec.kind, TaskKind::Stats);
    for id in &plan.selected {
        e.submit(
            id,
            "engine",
            0,
            &plan.task_id,
            values(vec![10.0, 20.0], 10.0),
        )
        .unwrap();
    }
    e.finish_task().unwrap();
    // The candidate task names the two selected merchants, one slot each
    // (k = 1: three candidate means of one value, then their sizes).
    let plan = e.start_task(&agents(4)).unwrap();
    let ModelSpec::Segments { exchange, .. } = &plan.spec.model else {
        panic!("a segments task");
    };
    assert_eq!(exchange.slots, plan.selected);
    assert_eq!(plan.spec.update_len(), 2 * 6);
    let (a, b) = (&plan.selected[0], &plan.selected[1]);
    let mut own = vec![0.0; 12];
    own[0] = 1.0;
    own[3] = 10.0;
    // b answering in a's slot is refused; the round goes on without it.
    let err = e
        .submit(b, "engine", 1, &plan.task_id, values(own.clone(), 10.0))
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::NotACount { index: 3, .. }),
        "{err}"
    );
    e.submit(a, "engine", 1, &plan.task_id, values(own, 10.0))
        .unwrap();
    let record = e.finish_task().unwrap();
    assert_eq!(record.outcome, Outcome::Committed);
    assert_eq!(record.reported, vec![a.clone()]);
    // The one candidate is the centre; the next task is a Lloyd exchange.
    let plan = e.start_task(&agents(4)).unwrap();
    let ModelSpec::Segments { exchange, .. } = &plan.spec.model else {
        panic!("a segments task");
    };
    assert!(exchange.slots.is_empty());
    assert_eq!((exchange.chosen, plan.spec.update_len()), (1, 3));
    let state =
        fedcart_common::model::segments::Segmentation::decode(&e.global(), 1, &[1]).unwrap();
    assert_eq!(state.centres_of(1), Some(&[1.0f32][..]));
}

/// Runs an implicit-MF run of `rounds` rounds whose evaluations report the
/// given validation HR@10 values in turn (the updates are zeros). Every
/// evaluation task names the best version so far (`TaskSpec::best_version`,
/// which agents keep the users of), and no other task does.
fn run_with_validation(vals: &[f64], patience: Option<u64>) -> (tempfile::TempDir, Engine) {
    let model = ModelSpec::MfImplicit {
        num_items: 2,
        factors: 1,
        hyper: Default::default(),
    };
    let len = model.model_len();
    let mut cfg = run(selection(1.0, 1, 1), 1);
    cfg.rounds = vals.len() as u64;
    cfg.model = model;
    cfg.evaluate = true;
    cfg.early_stopping = patience.map(|patience| crate::config::EarlyStopping { patience });
    cfg.validate().expect("valid config");
    let (dir, mut e) = engine(cfg);
    let mut evals = vals.iter();
    while !e.finished() {
        let plan = e.start_task(&agents(1)).unwrap();
        let best = match plan.spec.kind {
            TaskKind::Evaluate => e.best().map(|b| b.version),
            _ => None,
        };
        assert_eq!(plan.spec.best_version, best, "{}", plan.task_id);
        if plan.model_version < e.version() {
            assert!(best.is_some(), "the serving task names the best version");
        }
        let sub = match plan.spec.kind {
            TaskKind::Evaluate => Submission {
                update: None,
                metrics: [
                    // The final serving task re-evaluates the best version.
                    (
                        "val_hr@10".to_string(),
                        if plan.model_version == e.version() {
                            *evals.next().unwrap()
                        } else {
                            0.0
                        },
                    ),
                    ("hr@10".to_string(), 0.5),
                ]
                .into(),
                weight: 10.0,
                validation_weight: 10.0,
                bytes: 0,
            },
            _ => Submission {
                update: Some(Update {
                    values: vec![0.0; len],
                    coord_weights: vec![1.0; 2],
                    weight: 1.0,
                }),
                metrics: Default::default(),
                weight: 1.0,
                validation_weight: 1.0,
                bytes: 0,
            },
        };
        submit(&mut e, &plan, "m00", sub).unwrap();
        e.finish_task().unwrap();
    }
    (dir, e)
}

#[test]
fn the_best_version_is_the_one_with_the_best_federated_validation_metric() {
    let (_dir, e) = run_with_validation(&[0.1, 0.3, 0.2, 0.3, 0.25], None);
    let best = e.best().expect("a best version");
    // Ties keep the earlier version; the run goes to its last round.
    assert_eq!((best.version, best.value), (2, 0.3));
    assert_eq!(best.metric, "val_hr@10");
    assert_eq!(e.version(), 5);
    assert!(e.stopped().is_none());
}

#[test]
fn a_last_evaluation_hands_the_best_version_to_the_agents_without_changing_the_choice() {
    for (vals, patience) in [
        (&[0.1, 0.3, 0.2, 0.3, 0.25][..], None),
        (&[0.1, 0.3, 0.2, 0.29, 0.5, 0.6][..], Some(2)),
    ] {
        let (_dir, e) = run_with_validation(vals, patience);
        assert!(e.finished());
        let history = e.store().history().unwrap();
        let last = history.last().unwrap();
        // The agents' last task evaluated version 2, the best, with its
        // own parameters; reporting 0.0 there neither moved the best version
        // nor counted against the patience.
        assert_eq!(last.kind, TaskKind::Evaluate);
        assert_eq!((last.round, last.base_version), (2, 2));
        assert_eq!(e.best().unwrap().version, 2);
        let evaluations = history
            .iter()
            .filter(|r| r.kind == TaskKind::Evaluate)
            .count();
        assert_eq!(evaluations, e.version() as usize + 1);
    }
    // When the last version is the best, there is nothing more to hand out.
    let (_dir, e) = run_with_validation(&[0.1, 0.2, 0.3], None);
    let history = e.store().history().unwrap();
    assert_eq!(history.last().unwrap().round, 3);
    assert_eq!(
        history
            .iter()
            .filter(|r| r.kind == TaskKind::Evaluate)
            .count(),
        3
    );
}

#[test]
fn early_stopping_ends_the_run_after_patience_rounds_without_a_new_best() {
    let (_dir, e) = run_with_validation(&[0.1, 0.3, 0.2, 0.29, 0.5, 0.6], Some(2));
    assert_eq!(
        e.version(),
        4,
        "stops after versions 3 and 4 failed to beat 2"
    );
    let stop = e.stopped().expect("stopped early");
    assert!(stop.is_planned());
    assert!(matches!(
        stop,
        RunStop::EarlyStopped {
            version: 4,
            best_version: 2,
            ..
        }
    ));
    assert_eq!(e.best().unwrap().version, 2);
    // The choice and the stop are stored with the run.
    assert_eq!(
        e.store()
            .meta_json::<BestVersion>("best_version")
            .unwrap()
            .map(|b| b.version),
        Some(2)
    );
}

/// Runs `model` over `n` merchants, one evaluation after each training
/// round; `eval(version, merchant)` is that merchant's evaluation of the
/// latest version (`None`: it drops out). Returns the best version chosen.
fn run_evaluating(
    model: ModelSpec,
    n: usize,
    rounds: u64,
    mut eval: impl FnMut(u64, &str) -> Option<Submission>,
) -> (tempfile::TempDir, Engine) {
    let mut cfg = run(selection(1.0, n, n), 1);
    cfg.rounds = rounds;
    cfg.model = model;
    cfg.evaluate = true;
    cfg.validate().expect("valid config");
    let (dir, mut e) = engine(cfg);
    while !e.finished() {
        let plan = e.start_task(&agents(n)).unwrap();
        let len = plan.spec.update_len();
        for m in agents(n) {
            let sub = match plan.spec.kind {
                TaskKind::Evaluate if plan.model_version == e.version() => {
                    match eval(plan.model_version, &m) {
                        Some(sub) => sub,
                        None => continue,
                    }
                }
                kind => Submission {
                    update: (len > 0).then(|| Update {
                        values: match kind {
                            TaskKind::Stats => vec![1.0; len],
                            // One held-out row, the result's weight.
                            TaskKind::Evaluate => {
                                let mut one = vec![0.0; len];
                                one[0] = 1.0;
                                one
                            }
                            TaskKind::Train => vec![0.0; len],
                        },
                        coord_weights: vec![1.0; plan.spec.update_layout().num_coord_weights],
                        weight: 1.0,
                    }),
                    metrics: Default::default(),
                    weight: 1.0,
                    validation_weight: 1.0,
                    bytes: 0,
                },
            };
            submit(&mut e, &plan, &m, sub).unwrap();
        }
        let record = e.finish_task().unwrap();
        assert_eq!(record.outcome, Outcome::Committed, "{record:?}");
    }
    (dir, e)
}

/// A version is not chosen because a weaker merchant missed its
/// evaluation: figures over different merchants are compared over the
/// merchants that evaluated both (the probe that found it: one of three
/// agents killed mid-evaluation, and the version evaluated by the two
/// stronger ones was served).
#[test]
fn a_version_evaluated_without_a_weaker_merchant_is_compared_over_the_same_merchants() {
    let model = ModelSpec::MfImplicit {
        num_items: 2,
        factors: 1,
        hyper: Default::default(),
    };
    // Validation HR@10 of each merchant at versions 1, 2, 3; m02 is weak
    // and misses version 2's evaluation.
    let table = [[0.3, 0.3, 0.0], [0.25, 0.25, -1.0], [0.35, 0.35, 0.0]];
    let hr = |v: u64, m: &str| {
        let x = table[v as usize - 1][m[1..].parse::<usize>().unwrap()];
        (x >= 0.0).then(|| Submission {
            update: None,
            metrics: [("val_hr@10".to_string(), x)].into(),
            weight: 10.0,
            validation_weight: 10.0,
            bytes: 0,
        })
    };
    let (_dir, e) = run_evaluating(model, 3, 3, hr);
    let history = e.store().history().unwrap();
    let pooled: Vec<f64> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Evaluate)
        .take(3)
        .map(|r| r.metrics["val_hr@10"])
        .collect();
    // Version 2's pooled figure (0.25 over two) beats version 1's (0.2 over
    // three), but over m00 and m01 it is 0.25 against 0.3.
    assert!(pooled[1] > pooled[0], "{pooled:?}");
    let best = e.best().unwrap();
    assert_eq!(best.version, 3, "{pooled:?}");
    assert_eq!(best.by_merchant.len(), 3);
    // The parts are stored with the choice, for a resumed engine.
    let stored = e
        .store()
        .meta_json::<BestVersion>("best_version")
        .unwrap()
        .unwrap();
    assert_eq!(&stored, best);
    assert_eq!(stored.by_merchant["m00"].value, Some(0.35));
}

/// The served version is the one with the most validation hits per
/// validation user of the federation: each merchant's `val_hr@10` weighs by
/// its validation rows, not by its test rows (by which m00's one perfect
/// validation slice of 10 users outweighed m01's 100 and chose version 1),
/// while the test figures keep the test weights.
#[test]
fn the_served_version_has_the_most_validation_hits_per_validation_user() {
    let model = ModelSpec::MfImplicit {
        num_items: 2,
        factors: 1,
        hyper: Default::default(),
    };
    // (validation hits, validation users, test users) of each merchant at
    // versions 1 and 2.
    let table = [
        [(10.0, 10.0, 100.0), (0.0, 100.0, 10.0)],
        [(0.0, 10.0, 100.0), (20.0, 100.0, 10.0)],
    ];
    let eval = |v: u64, m: &str| {
        let (hits, users, tests) = table[v as usize - 1][m[1..].parse::<usize>().unwrap()];
        Some(Submission {
            update: None,
            metrics: [
                ("val_hr@10".to_string(), hits / users),
                ("hr@10".to_string(), if tests > 50.0 { 0.5 } else { 0.2 }),
            ]
            .into(),
            weight: tests,
            validation_weight: users,
            bytes: 0,
        })
    };
    let (_dir, e) = run_evaluating(model, 2, 2, eval);
    let history = e.store().history().unwrap();
    let evaluations: Vec<_> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Evaluate)
        .take(2)
        .collect();
    assert_eq!(evaluations[0].metrics["val_hr@10"], 10.0 / 110.0);
    assert_eq!(evaluations[1].metrics["val_hr@10"], 20.0 / 110.0);
    assert_eq!(evaluations[0].metrics["hr@10"], (50.0 + 2.0) / 110.0);
    assert_eq!(evaluations[0].examples, 110.0);
    let best = e.best().unwrap();
    assert_eq!((best.version, best.value), (2, 20.0 / 110.0));
    assert_eq!(best.by_merchant["m01"].weight, 100.0, "its validation rows");
}

/// The same over a pooled metric: churn's validation AUC from summed
/// score histograms is recomputed from the common merchants' histograms.
#[test]
fn a_pooled_validation_auc_is_compared_over_the_merchants_that_evaluated_both() {
    use fedcart_common::metrics::histogram::{HISTOGRAM_LEN, SCORE_BINS};
    let model = ModelSpec::churn_lr(2);
    // Ten negatives and ten positives in the validation half: `neg` and
    // `pos` give the bins, `swap` of the negatives scored above every
    // positive.
    let hist = |neg: usize, pos: usize, swap: usize| {
        let mut h = vec![0.0f32; 2 * HISTOGRAM_LEN];
        let valid = &mut h[HISTOGRAM_LEN..];
        valid[neg] += (10 - swap) as f32;
        valid[SCORE_BINS - 1] += swap as f32;
        valid[SCORE_BINS + pos] += 10.0;
        // The held-out half: one of each class.
        h[0] = 1.0;
        h[SCORE_BINS + 1] = 1.0;
        h
    };
    // Weighted by its two held-out rows.
    let sub = |values: Vec<f32>| Submission {
        update: Some(Update {
            values,
            coord_weights: vec![],
            weight: 2.0,
        }),
        metrics: Default::default(),
        weight: 2.0,
        validation_weight: 2.0,
        bytes: 0,
    };
    // Version 1: m00 orders perfectly (AUC 1), m01 backwards (AUC 0),
    // pooled 0.5. Version 2: m01 drops out, m00 falls to 0.9.
    let eval = |v: u64, m: &str| match (v, m) {
        (1, "m00") => Some(sub(hist(100, 900, 0))),
        (1, _) => Some(sub(hist(900, 100, 0))),
        (_, "m00") => Some(sub(hist(100, 900, 1))),
        _ => None,
    };
    let (_dir, e) = run_evaluating(model, 2, 2, eval);
    let history = e.store().history().unwrap();
    let aucs: Vec<f64> = history
        .iter()
        .filter(|r| r.kind == TaskKind::Evaluate)
        .take(2)
        .map(|r| r.metrics["val_auc"])
        .collect();
    assert!((aucs[0] - 0.5).abs() < 1e-9 && aucs[1] > 0.85, "{aucs:?}");
    assert_eq!(e.best().unwrap().version, 1, "{aucs:?}");
}

#[test]
fn early_stopping_needs_a_model_with_a_validation_metric() {
    let mut cfg = run(selection(1.0, 1, 1), 1);
    cfg.early_stopping = Some(crate::config::EarlyStopping { patience: 3 });
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("run.early_stopping"), "{err}");
}

#[test]
fn an_operator_stop_abandons_the_open_task_and_a_resumed_engine_stays_stopped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("engine.redb");
    let mut e = Engine::open(Store::open(&path).unwrap(), run(selection(1.0, 2, 2), 2)).unwrap();
    let plan = e.start_task(&agents(2)).unwrap();
    for m in agents(2) {
        submit(&mut e, &plan, &m, update([1.0, 2.0, 3.0], 1.0)).unwrap();
    }
    e.finish_task().unwrap();
    let plan = e.start_task(&agents(2)).unwrap();
    submit(&mut e, &plan, "m00", update([5.0, 5.0, 5.0], 1.0)).unwrap();

    e.stop_by_operator("ops").unwrap();
    assert!(e.open_task().is_none(), "the open task is abandoned");
    assert_eq!(
        e.stopped(),
        Some(&RunStop::Operator {
            by: "ops".into(),
            version: 1
        })
    );
    assert!(e.stopped().unwrap().is_planned());
    // A planned stop still hands the last version to the agents (the run
    // does not evaluate, so there is no best to prefer): one evaluation of
    // version 1, after which the run is over.
    assert!(!e.finished());
    let committed = e.global();
    drop(e);

    // Nothing of the abandoned task was kept; the stop was.
    let mut again = Engine::resume(Store::open(&path).unwrap()).unwrap();
    assert_eq!(again.version(), 1);
    assert_eq!(again.global(), committed);
    assert!(matches!(again.stopped(), Some(RunStop::Operator { .. })));
    let serve = again.start_task(&agents(2)).unwrap();
    assert_eq!((serve.spec.kind, serve.round), (TaskKind::Evaluate, 1));
    assert_eq!(serve.task_id, "r1a1-evaluate");
    for m in agents(2) {
        let sub = Submission {
            update: None,
            metrics: Default::default(),
            weight: 1.0,
            validation_weight: 1.0,
            bytes: 0,
        };
        submit(&mut again, &serve, &m, sub).unwrap();
    }
    again.finish_task().unwrap();
    assert!(again.finished());
    assert!(matches!(
        again.start_task(&agents(2)),
        Err(EngineError::Finished)
    ));
}

/// A churn evaluation's per-class score histogram with a negative count
/// (which made the pooled PR-AUC divide by zero and its record unreadable)
/// is rejected; the honest merchant's histogram is pooled.
#[test]
fn an_evaluation_histogram_with_a_negative_count_is_rejected() {
    let model = ModelSpec::churn_lr(2);
    let mut cfg = run(selection(1.0, 4, 4), 1);
    cfg.rounds = 1;
    cfg.model = model;
    cfg.evaluate = true;
    cfg.validate().expect("valid config");
    let (_dir, mut e) = engine(cfg);
    let mut evaluated = false;
    while !e.finished() {
        let plan = e.start_task(&agents(4)).unwrap();
        let len = plan.spec.update_len();
        let vector = |values: Vec<f32>| Submission {
            update: Some(Update {
                values,
                coord_weights: vec![],
                weight: 5.0,
            }),
            metrics: Default::default(),
            weight: 5.0,
            validation_weight: 5.0,
            bytes: 0,
        };
        if plan.spec.kind == TaskKind::Evaluate && plan.model_version == 1 && !evaluated {
            let mut forged = vec![0.0; len];
            forged[0] = 5.0;
            forged[len / 2 - 1] = -1.0;
            forged[len - 1] = 1.0;
            let err = submit(&mut e, &plan, "m00", vector(forged)).unwrap_err();
            assert!(
                matches!(err, SubmitError::NotAHistogramCount { index, value } if index == len / 2 - 1 && value == -1.0),
                "{err}"
            );
            // A fraction of a row, and a billion rows claimed at weight 5.
            let mut fraction = vec![0.0; len];
            fraction[0] = 4.5;
            fraction[1] = 0.5;
            let err = submit(&mut e, &plan, "m02", vector(fraction)).unwrap_err();
            assert!(
                matches!(err, SubmitError::NotAHistogramCount { index: 0, value } if value == 4.5),
                "{err}"
            );
            let mut billion = vec![0.0; len];
            billion[0] = 1e9;
            let err = submit(&mut e, &plan, "m03", vector(billion)).unwrap_err();
            assert_eq!(
                err.to_string(),
                "evaluation histograms count 1000000000 held-out rows, and the result is \
                 weighted by 5: each held-out row is counted once"
            );
            // Five held-out rows, and two of the validation slice.
            let mut honest = vec![0.0; len];
            honest[0] = 3.0;
            honest[1] = 2.0;
            honest[len - 1] = 2.0;
            submit(&mut e, &plan, "m01", vector(honest)).unwrap();
            evaluated = true;
        } else {
            let values = vec![
                if plan.spec.kind == TaskKind::Stats {
                    1.0
                } else {
                    0.0
                };
                len
            ];
            for a in agents(4) {
                submit(&mut e, &plan, &a, vector(values.clone())).unwrap();
            }
        }
        let record = e.finish_task().unwrap();
        assert_eq!(record.outcome, Outcome::Committed, "{record:?}");
        assert!(record.metrics.values().all(|v| v.is_finite()), "{record:?}");
    }
    assert!(evaluated);
    e.store().history().unwrap();
}

/// The set-aside rule for one malicious merchant: accused by two or more,
/// the accused alone; accused by one, the accused and its accuser (one of
/// the two lies); later tasks select none of them.
#[test]
fn accused_merchants_are_set_aside_by_the_one_liar_rule() {
    let mut cfg = run(selection(1.0, 2, 8), 2);
    cfg.rounds = 2;
    let (_dir, mut e) = engine(cfg);
    // A liar accusing an honest merchant takes itself out with it.
    assert_eq!(e.accuse("m03", "m00"), ["m00", "m03"]);
    // A second accusation against the same merchant clears its first
    // accuser: two merchants do not lie together.
    assert!(e.accuse("m01", "m02").len() == 2);
    assert!(e.accuse("m04", "m02").is_empty());
    let aside: Vec<&str> = e.set_aside().iter().map(String::as_str).collect();
    assert_eq!(aside, ["m00", "m02", "m03"]);
    // Self-accusations count for nothing.
    assert!(e.accuse("m05", "m05").is_empty());
    let plan = e.start_task(&agents(6)).unwrap();
    assert_eq!(plan.selected, ["m01", "m04", "m05"]);
}

/// A store on a full disk was found out only when the version failed to
/// commit, after the merchants trained and a secure sum was revealed; every
/// restart on the full disk did it again and counted an attempt, until
/// `run.max_attempts` stopped the run for good (found by a fault probe).
/// No task starts without room for its version, and no attempt is counted.
#[test]
fn no_task_starts_without_room_on_the_stores_disk_and_no_attempt_is_counted() {
    use std::sync::atomic::Ordering;
    let (_dir, mut e) = engine(run(selection(1.0, 2, 8), 2));
    e.store().free_for_test.store(100_000, Ordering::SeqCst);
    for _ in 0..3 {
        let err = e.start_task(&agents(4)).unwrap_err().to_string();
        assert!(
            err.contains("its file system has 0.1 MB free, and the next task needs about")
                && err.contains("no attempt is used and no sum is revealed"),
            "{err}"
        );
    }
    e.store()
        .free_for_test
        .store(u64::MAX - 1, Ordering::SeqCst);
    let plan = e.start_task(&agents(4)).unwrap();
    assert_eq!(plan.task_id, "r1a1-train");
}

/// A merchant whose unmask-stage share the server proved forged is set
/// aside alone (no accuser goes with it), after a restart too, and no
/// pseudo-merchant is ever set aside or selected.
#[test]
fn a_merchant_proven_to_have_forged_a_share_is_set_aside_alone() {
    let cfg = run(selection(1.0, 2, 8), 2);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("engine.redb");
    let mut e = reopen(&path, &cfg);
    assert_eq!(e.forged_share("m02"), ["m02"]);
    assert!(e.forged_share("m02").is_empty());
    // A second proven forger does not make the proof an accuser of two.
    assert_eq!(e.forged_share("m04"), ["m04"]);
    // An ordinary accusation still follows the one-liar rule.
    assert_eq!(e.accuse("m01", "m00"), ["m00", "m01"]);
    drop(e);
    let mut e = reopen(&path, &cfg);
    let aside: Vec<&str> = e.set_aside().iter().map(String::as_str).collect();
    assert_eq!(aside, ["m00", "m01", "m02", "m04"]);
    let plan = e.start_task(&agents(6)).unwrap();
    assert_eq!(plan.selected, ["m03", "m05"]);
}

/// A merchant that declined the run's tasks for a lasting cause is drawn
/// only when the others cannot fill a task, until it joins again.
#[test]
fn a_merchant_declining_for_a_lasting_cause_is_drawn_only_when_the_others_cannot_fill_a_task() {
    let (_dir, mut e) = engine(run(selection(1.0, 2, 2), 2));
    e.decline_for_run(
        "m01",
        "the local features do not have the model's width".into(),
    );
    for _ in 0..3 {
        let plan = e.start_task(&agents(3)).unwrap();
        assert_eq!(plan.selected, ["m00", "m02"]);
        e.finish_task().unwrap();
    }
    // Three wanted of three: it fills the task (which its decline may
    // then abort, as before).
    let (_dir, mut e) = engine(run(selection(1.0, 3, 8), 2));
    e.decline_for_run(
        "m01",
        "the local features do not have the model's width".into(),
    );
    let plan = e.start_task(&agents(3)).unwrap();
    assert_eq!(plan.selected, ["m00", "m01", "m02"]);
    e.finish_task().unwrap();
    e.readmit("m01");
    assert!(e.declined().is_empty());
}

/// One liar's accusations cost at most one honest merchant, whatever it
/// sends: accusing two or more, or a merchant other than its own accuser,
/// marks it as the liar, alone, and voids what it said (accusing every
/// merchant in turn set each aside with it, and the run had no one left).
#[test]
fn a_liar_accusing_many_is_set_aside_alone() {
    let mut cfg = run(selection(1.0, 2, 8), 2);
    cfg.rounds = 2;
    let (_dir, mut e) = engine(cfg);
    let aside = |e: &Engine| -> Vec<String> { e.set_aside().iter().cloned().collect() };
    assert_eq!(e.accuse("m05", "m00"), ["m00", "m05"]);
    // Its second accusation shows it lies: m00 comes back.
    assert!(e.accuse("m05", "m01").is_empty());
    for m in ["m02", "m03", "m04"] {
        assert!(e.accuse("m05", m).is_empty());
    }
    assert_eq!(aside(&e), ["m05"]);
    let plan = e.start_task(&agents(6)).unwrap();
    assert_eq!(plan.selected, ["m00", "m01", "m02", "m03", "m04"]);
    drop(plan);

    // A forger accused by one honest merchant that accuses another: the
    // forger alone.
    let (_dir, mut e) = engine(run(selection(1.0, 2, 8), 2));
    e.accuse("m01", "m05");
    e.accuse("m05", "m02");
    assert_eq!(aside(&e), ["m05"]);
    // Two merchants accusing each other: one of them lies, both go.
    let (_dir, mut e) = engine(run(selection(1.0, 2, 8), 2));
    e.accuse("m01", "m05");
    e.accuse("m05", "m01");
    assert_eq!(aside(&e), ["m01", "m05"]);
}

/// What the accusations set aside stays aside when the coordinator
/// restarts, and each merchant is named as set aside in one record only.
#[test]
fn merchants_set_aside_stay_aside_across_a_restart() {
    let cfg = run(selection(1.0, 2, 8), 2);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("engine.redb");
    let reopen = || reopen(&path, &cfg);
    let named = |e: &Engine| -> Vec<String> {
        let history = e.store().history().unwrap();
        history
            .iter()
            .flat_map(|r| &r.rejected)
            .filter(|(_, reason)| reason.starts_with("set aside"))
            .map(|(m, _)| m.clone())
            .collect()
    };
    let finish = |e: &mut Engine, plan: &TaskPlan, by: &[&str]| {
        for m in by {
            submit(e, plan, m, update([1.0; DIM], 1.0)).unwrap();
        }
        assert_eq!(e.finish_task().unwrap().outcome, Outcome::Committed);
    };
    let mut e = reopen();
    let plan = e.start_task(&agents(6)).unwrap();
    assert_eq!(plan.selected.len(), 6);
    // Accused during the task: its record names both.
    assert_eq!(e.accuse("m03", "m00"), ["m00", "m03"]);
    finish(&mut e, &plan, &["m01", "m02"]);
    assert_eq!(named(&e), ["m00", "m03"]);
    drop(e);

    let mut e = reopen();
    let aside: Vec<&str> = e.set_aside().iter().map(String::as_str).collect();
    assert_eq!(aside, ["m00", "m03"]);
    let plan = e.start_task(&agents(6)).unwrap();
    assert_eq!(plan.selected, ["m01", "m02", "m04", "m05"]);
    // A second accuser of m00 after the restart is weighed with the stored
    // accusation: two accusers, so m00 alone.
    assert!(e.accuse("m01", "m00").is_empty());
    finish(&mut e, &plan, &["m01", "m02"]);
    drop(e);

    let mut e = reopen();
    let aside: Vec<&str> = e.set_aside().iter().map(String::as_str).collect();
    assert_eq!(aside, ["m00"]);
    let plan = e.start_task(&agents(6)).unwrap();
    assert_eq!(plan.selected, ["m01", "m02", "m03", "m04", "m05"]);
    finish(&mut e, &plan, &["m01", "m02"]);
    assert_eq!(named(&e), ["m00", "m03"]);
}

/// A run given again with edited settings is named setting by setting in
/// the operator's warning (the stored run goes on unchanged).
#[test]
fn changed_settings_name_each_edited_key_with_both_values() {
    let stored = run(selection(1.0, 2, 8), 2);
    let mut edited = stored.clone();
    edited.rounds = 5;
    edited.quorum = 3;
    assert_eq!(
        changed_settings(&stored, &edited),
        ["quorum: 2 → 3", "rounds: 3 → 5"]
    );
    assert!(changed_settings(&stored, &stored).is_empty());
}

/// With `run.evaluate` off no version is evaluated between rounds, but the
/// last one still reaches the agents: one evaluation task of the final
/// version follows the last round (an agent keeps the model of its last
/// task, and would otherwise hold only the version it last trained from).
#[test]
fn a_run_that_does_not_evaluate_still_hands_its_final_version_to_the_agents() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = run(selection(1.0, 2, 2), 2);
    cfg.rounds = 2;
    assert!(!cfg.evaluate);
    let mut e = Engine::open(Store::open(&dir.path().join("e.redb")).unwrap(), cfg).unwrap();
    let mut kinds = Vec::new();
    while !e.finished() {
        let plan = e.start_task(&agents(2)).unwrap();
        kinds.push((plan.spec.kind, plan.round));
        for m in agents(2) {
            let sub = match plan.spec.kind {
                TaskKind::Train => update([1.0, 2.0, 3.0], 1.0),
                _ => Submission {
                    update: None,
                    metrics: Default::default(),
                    weight: 1.0,
                    validation_weight: 1.0,
                    bytes: 0,
                },
            };
            submit(&mut e, &plan, &m, sub).unwrap();
        }
        assert_eq!(e.finish_task().unwrap().outcome, Outcome::Committed);
    }
    assert_eq!(
        kinds,
        [
            (TaskKind::Train, 1),
            (TaskKind::Train, 2),
            (TaskKind::Evaluate, 2)
        ]
    );
}

/// Runs `cfg` with the merchants `agents(n)` all connected, each selected
/// merchant answering its task (zero updates, validation values `vals` in
/// turn at each evaluation of a new version), and returns each task's kind,
/// model version and number of selected merchants.
fn run_selecting(cfg: RunConfig, n: usize, vals: &[f64]) -> Vec<(TaskKind, u64, usize)> {
    run_selecting_stopped(cfg, n, vals, usize::MAX)
}

/// [`run_selecting`], the operator stopping the run once `stop_after`
/// tasks have committed, and the engine then reopened from its store.
fn run_selecting_stopped(
    cfg: RunConfig,
    n: usize,
    vals: &[f64],
    stop_after: usize,
) -> Vec<(TaskKind, u64, usize)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("engine.redb");
    let mut e = reopen(&path, &cfg);
    let mut evals = vals.iter();
    let mut tasks = Vec::new();
    let mut stopped = false;
    while !e.finished() {
        if tasks.len() == stop_after && !stopped {
            stopped = true;
            e.stop_by_operator("ops").unwrap();
            drop(e);
            e = reopen(&path, &cfg);
            continue;
        }
        let plan = e.start_task(&agents(n)).unwrap();
        tasks.push((plan.spec.kind, plan.model_version, plan.selected.len()));
        let layout = plan.spec.update_layout();
        let val = match plan.spec.kind {
            TaskKind::Evaluate if plan.model_version == e.version() => *evals.next().unwrap(),
            _ => 0.0,
        };
        for m in &plan.selected {
            let sub = match plan.spec.kind {
                TaskKind::Evaluate => Submission {
                    update: None,
                    metrics: [("val_hr@10".to_string(), val)].into(),
                    weight: 1.0,
                    validation_weight: 1.0,
                    bytes: 0,
                },
                _ => Submission {
                    update: Some(Update {
                        values: vec![0.0; plan.spec.update_len()],
                        coord_weights: vec![1.0; layout.num_coord_weights],
                        weight: 1.0,
                    }),
                    metrics: Default::default(),
                    weight: 1.0,
                    validation_weight: 1.0,
                    bytes: 0,
                },
            };
            submit(&mut e, &plan, m, sub).unwrap();
        }
        assert_eq!(e.finish_task().unwrap().outcome, Outcome::Committed);
    }
    tasks
}

#[test]
fn the_model_is_handed_out_to_every_merchant_not_to_a_sample() {
    use TaskKind::{Evaluate, Train};
    // Half of 6 merchants take part in each round; every one of them must
    // hold the model it is served from.
    let mut cfg = run(selection(0.5, 1, 6), 1);
    cfg.model = ModelSpec::MfImplicit {
        num_items: 2,
        factors: 1,
        hyper: Default::default(),
    };
    cfg.evaluate = true;
    // Version 2 is the best: the last evaluation (version 3) and the
    // serving task (version 2) go to all six.
    assert_eq!(
        run_selecting(cfg.clone(), 6, &[0.1, 0.3, 0.2]),
        [
            (Train, 0, 3),
            (Evaluate, 1, 3),
            (Train, 1, 3),
            (Evaluate, 2, 3),
            (Train, 2, 3),
            (Evaluate, 3, 6),
            (Evaluate, 2, 6),
        ]
    );
    // Stopped once version 2, the best so far, was evaluated by a sample
    // (the evaluation of the best is the last one): it is handed out
    // once more, to all six, after a restart too.
    assert_eq!(
        run_selecting_stopped(cfg.clone(), 6, &[0.1, 0.3, 0.3], 4),
        [
            (Train, 0, 3),
            (Evaluate, 1, 3),
            (Train, 1, 3),
            (Evaluate, 2, 3),
            (Evaluate, 2, 6),
        ]
    );
    // Every merchant evaluated it already: nothing follows the stop.
    let mut all = cfg.clone();
    all.selection = selection(1.0, 1, 6);
    assert_eq!(
        run_selecting_stopped(all, 6, &[0.1, 0.3], 4),
        [
            (Train, 0, 6),
            (Evaluate, 1, 6),
            (Train, 1, 6),
            (Evaluate, 2, 6),
        ]
    );
    // Without evaluations, the one evaluation of the last version.
    cfg.evaluate = false;
    assert_eq!(
        run_selecting(cfg, 6, &[0.0]),
        [
            (Train, 0, 3),
            (Train, 1, 3),
            (Train, 2, 3),
            (Evaluate, 3, 6)
        ]
    );
}

/// A secure sum that was unmasked but cannot be committed (its aggregate is
/// not finite) was seen all the same: the run stops, across a restart,
/// rather than retry a round whose second sum, over other survivors,
/// would tell the difference of two sums.
#[test]
fn an_unmasked_sum_that_cannot_be_committed_stops_the_run_instead_of_a_retry() {
    use fedcart_common::privacy::secagg::DecodedSum;
    let cfg = secure_run(selection(1.0, 3, 3), 2);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("engine.redb");
    let mut e = reopen(&path, &cfg);
    let plan = e.start_task(&agents(3)).unwrap();
    assert!(plan.secure);
    let survivors = agents(3);
    let sum = DecodedSum {
        // Each finite; their mean does not fit an f32.
        values: vec![1e300; DIM],
        coord_weights: Vec::new(),
        weight: 3.0,
        count: 3,
        clipped: 0,
    };
    e.set_secure_sum(&survivors, sum).unwrap();
    let record = e.finish_task().unwrap();
    assert_eq!(record.outcome, Outcome::Aborted);
    assert!(
        record
            .abort_reason
            .as_deref()
            .is_some_and(|r| r.contains("not finite")),
        "{:?}",
        record.abort_reason
    );
    assert!(
        matches!(e.stopped(), Some(RunStop::Revealed { round: 1, .. })),
        "{:?}",
        e.stopped()
    );
    assert!(e.finished());
    assert!(e.start_task(&agents(3)).is_err(), "no second attempt");
    drop(e);
    let mut e = reopen(&path, &cfg);
    assert!(matches!(e.stopped(), Some(RunStop::Revealed { .. })));
    assert!(e.start_task(&agents(3)).is_err(), "none after a restart");
    assert_eq!(e.version(), 0);
}

/// [`run`] with secure aggregation (the complete graph, clip 1).
fn secure_run(selection: Selection, quorum: usize) -> RunConfig {
    let mut cfg = run(selection, quorum);
    cfg.secagg = Some(crate::config::SecAggSettings {
        neighbours: None,
        clip: 1.0,
        verify_survivors: false,
        stage_timeout_ms: None,
    });
    cfg
}

fn secure_sum(count: usize) -> fedcart_common::privacy::secagg::DecodedSum {
    fedcart_common::privacy::secagg::DecodedSum {
        values: vec![0.5 * count as f64; DIM],
        coord_weights: Vec::new(),
        weight: count as f64,
        count,
        clipped: 0,
    }
}

/// A secure run's configuration and a fresh store path for it (in the
/// returned directory).
fn secure_store() -> (tempfile::TempDir, std::path::PathBuf, RunConfig) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("engine.redb");
    (dir, path, secure_run(selection(1.0, 3, 6), 3))
}

/// The engine over the store at `path` (a new one, or one reopened after
/// a restart).
fn reopen(path: &std::path::Path, cfg: &RunConfig) -> Engine {
    Engine::open(Store::open(path).unwrap(), cfg.clone()).unwrap()
}

/// As the gRPC driver goes through a secure task whose unmasking recovers
/// nothing (too few shares): the marker, the failure, the abort.
fn unmask_recovering_nothing(e: &mut Engine, survivors: &BTreeSet<String>) {
    e.before_unmask(survivors).unwrap();
    e.nothing_unmasked();
    e.abort_secure("too few shares".into());
    assert_eq!(e.finish_task().unwrap().outcome, Outcome::Aborted);
}

fn names(v: &[String]) -> BTreeSet<String> {
    v.iter().cloned().collect()
}

/// A coordinator that dies after every unmask request of a round counts
/// each lost attempt against `run.max_attempts`, across restarts: at the
/// limit the run stops with the lost attempt's record, as an attempt
/// aborted in a running process stops it (the retries went on past the
/// limit, each one a release of the sum taken as seen).
#[test]
fn attempts_lost_across_restarts_count_against_max_attempts() {
    let (_dir, path, mut cfg) = secure_store();
    cfg.max_attempts = 2;
    let all = agents(3);
    let mut e = reopen(&path, &cfg);
    for attempt in 1..=2u32 {
        let plan = e.start_task(&all).unwrap();
        assert_eq!(plan.task_id, format!("r1a{attempt}-train"));
        e.before_unmask(&names(&all)).unwrap();
        drop(e); // killed before the commit
        e = reopen(&path, &cfg);
        let history = e.store().history().unwrap();
        assert_eq!(history.len(), attempt as usize);
        assert_eq!(
            history.last().and_then(|r| r.abort_reason.as_deref()),
            Some(super::unmask::LOST)
        );
        assert_eq!(
            e.stopped().is_some(),
            attempt == 2,
            "after attempt {attempt}"
        );
    }
    let stop = e.stopped().unwrap().to_string();
    assert!(
        stop.starts_with("round 1 (train) aborted 2 times (run.max_attempts)"),
        "{stop}"
    );
    assert!(e.start_task(&all).is_err(), "no third attempt");
    // Reopened again, it stays stopped and writes nothing more.
    drop(e);
    let e = reopen(&path, &cfg);
    assert_eq!(e.store().history().unwrap().len(), 2);
    assert_eq!(e.stopped().map(|s| s.to_string()), Some(stop));
}

/// A secure round whose unmask requests left before the coordinator went
/// away (no commit, no known failure) may have shown its sum: after a
/// restart the round is retried over exactly the merchants whose inputs
/// that sum held, waits for every one of them, and an attempt whose inputs
/// are not exactly theirs aborts before unmasking. Without this, the retry
/// would select all six, and a sum over six next to one over four gives
/// the total of two merchants' updates (one merchant's, one apart).
#[test]
fn a_sum_possibly_unmasked_before_a_restart_is_retried_over_the_same_merchants_only() {
    let (_dir, path, cfg) = secure_store();
    let all = agents(6);
    let mut e = reopen(&path, &cfg);
    let plan = e.start_task(&all).unwrap();
    assert_eq!(plan.selected, all);
    // Two dropped before their masked inputs: the sum holds four.
    let four = names(&all[..4]);
    e.before_unmask(&four).unwrap();
    drop(e); // killed before the commit

    let mut e = reopen(&path, &cfg);
    assert_eq!(e.pinned_merchants(), Some(&four), "the status names them");
    // The lost attempt's record, without DP, claims no accounting.
    let lost = e.store().history().unwrap();
    assert_eq!(
        lost.last().and_then(|r| r.abort_reason.as_deref()),
        Some(super::unmask::LOST)
    );
    assert!(!super::unmask::LOST.contains("privacy"));
    let without_m03: Vec<String> = all.iter().filter(|m| *m != "m03").cloned().collect();
    assert!(
        matches!(
            e.start_task(&without_m03),
            Err(EngineError::NotEnoughAgents {
                available: 3,
                needed: 4
            })
        ),
        "the retry waits for every merchant of the sum"
    );
    let plan = e.start_task(&all).unwrap();
    assert_eq!(names(&plan.selected), four, "exactly the sum's merchants");
    // One of them drops this time: the attempt aborts before unmasking.
    let three = names(&all[..3]);
    let refused = e.before_unmask(&three).unwrap_err();
    assert!(refused.contains("\"m03\""), "{refused}");
    assert!(refused.contains("nothing was revealed"), "{refused}");
    e.abort_secure(refused);
    let record = e.finish_task().unwrap();
    assert_eq!(record.outcome, Outcome::Aborted);
    // A failure with nothing unmasked does not free a pin set by an
    // earlier process: that attempt's sum may still have been seen.
    let plan = e.start_task(&all).unwrap();
    assert_eq!(names(&plan.selected), four);
    unmask_recovering_nothing(&mut e, &four);
    drop(e);

    let mut e = reopen(&path, &cfg);
    let plan = e.start_task(&all).unwrap();
    assert_eq!(
        names(&plan.selected),
        four,
        "still pinned after another restart"
    );
    e.before_unmask(&four).unwrap();
    let plan_four: Vec<String> = four.iter().cloned().collect();
    e.set_secure_sum(&plan_four, secure_sum(4)).unwrap();
    let record = e.finish_task().unwrap();
    assert_eq!(record.outcome, Outcome::Committed);
    assert_eq!(names(&record.reported), four);
    assert_eq!(e.version(), 1);
    assert_eq!(e.pinned_merchants(), None, "committed: no longer pinned");

    // The next round is on another base: free selection again. Its own
    // unmasking fails with nothing recovered, so the marker goes and the
    // retry after a restart selects afresh.
    let plan = e.start_task(&all).unwrap();
    assert_eq!(plan.selected, all);
    unmask_recovering_nothing(&mut e, &names(&all[..5]));
    drop(e);
    let mut e = reopen(&path, &cfg);
    let plan = e.start_task(&all).unwrap();
    assert_eq!(plan.selected, all, "nothing was unmasked: no pin");
}

/// A secure statistics task leaves the version as it was: once it commits,
/// its unmask marker must not keep naming its merchants in the status as
/// those of a sum that may have been unmasked before a restart (it did,
/// until the first version committed), nor pin the training round.
#[test]
fn a_committed_secure_statistics_task_pins_nobody() {
    let (_dir, path, mut cfg) = secure_store();
    cfg.model = ModelSpec::churn_lr(2);
    cfg.validate().unwrap();
    let all = agents(6);
    let mut e = reopen(&path, &cfg);
    let plan = e.start_task(&all).unwrap();
    assert_eq!(plan.spec.kind, TaskKind::Stats);
    let four = &plan.selected[..4];
    e.before_unmask(&names(four)).unwrap();
    let sum = fedcart_common::privacy::secagg::DecodedSum {
        values: vec![4.0, 8.0, 8.0, 20.0],
        coord_weights: Vec::new(),
        weight: 4.0,
        count: 4,
        clipped: 0,
    };
    e.set_secure_sum(four, sum).unwrap();
    assert_eq!(e.finish_task().unwrap().outcome, Outcome::Committed);
    assert_eq!(e.pinned_merchants(), None);
    let plan = e.start_task(&all).unwrap();
    assert_eq!((plan.spec.kind, plan.selected.len()), (TaskKind::Train, 6));
    drop(e);
    let e = reopen(&path, &cfg);
    assert_eq!(e.pinned_merchants(), None, "nor after a restart");
}

/// One merchant's forged statistics (sums no rows can have) were accepted
/// and clamped into a standard deviation of 1, putting every customer of
/// every merchant at the clamp bound for the whole run (found by an attacker
/// probe). In plaintext the update is rejected and the step commits
/// without it; a secure sum that holds one is refused and the run stops
/// (the sum was seen), naming the cause.
#[test]
fn statistics_no_rows_can_have_are_refused_not_standardised() {
    // Plaintext: four merchants, one sending Σx² far below (Σx)²/n.
    let mut cfg = run(selection(1.0, 2, 8), 2);
    cfg.model = ModelSpec::churn_lr(2);
    cfg.validate().unwrap();
    let (_dir, mut e) = engine(cfg);
    let plan = e.start_task(&agents(4)).unwrap();
    assert_eq!(plan.spec.kind, TaskKind::Stats);
    let honest = || values(vec![4.0, 8.0, 8.0, 20.0], 4.0);
    let (forger, others) = plan.selected.split_first().unwrap();
    let err = e
        .submit(
            forger,
            "engine",
            0,
            &plan.task_id,
            values(vec![4.0, 8.0, -1e6, 20.0], 4.0),
        )
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::ImpossibleStatistics { feature: 0, .. }),
        "{err}"
    );
    for id in others {
        e.submit(id, "engine", 0, &plan.task_id, honest()).unwrap();
    }
    let record = e.finish_task().unwrap();
    assert_eq!(record.outcome, Outcome::Committed);
    assert!(
        record.rejected.iter().any(|(m, _)| m == forger),
        "{record:?}"
    );
    // Secure: the forged input is in the sum.
    let (_dir, path, mut cfg) = secure_store();
    cfg.model = ModelSpec::churn_lr(2);
    cfg.validate().unwrap();
    let all = agents(6);
    let mut e = reopen(&path, &cfg);
    let plan = e.start_task(&all).unwrap();
    let four = &plan.selected[..4];
    e.before_unmask(&names(four)).unwrap();
    let sum = fedcart_common::privacy::secagg::DecodedSum {
        values: vec![4.0, 8.0, 8.0 - 1e6, 20.0],
        coord_weights: Vec::new(),
        weight: 4.0,
        count: 4,
        clipped: 0,
    };
    e.set_secure_sum(four, sum).unwrap();
    let record = e.finish_task().unwrap();
    assert_eq!(record.outcome, Outcome::Aborted);
    let reason = record.abort_reason.unwrap();
    assert!(
        reason.contains("the statistics step's sum is one no rows can have (feature 0"),
        "{reason}"
    );
    assert!(matches!(e.stopped(), Some(RunStop::Revealed { .. })));
}

/// A merchant of a possibly unmasked sum that the run then sets aside can
/// never take part again: the run stops, naming it, instead of waiting.
#[test]
fn a_pinned_merchant_set_aside_stops_the_run() {
    let (_dir, path, cfg) = secure_store();
    let all = agents(6);
    let mut e = reopen(&path, &cfg);
    e.start_task(&all).unwrap();
    e.before_unmask(&names(&all[..4])).unwrap();
    // An accusation sets the accused and its accuser aside.
    assert_eq!(e.accuse("m04", "m01").len(), 2);
    drop(e);
    let mut e = reopen(&path, &cfg);
    let stopped = e.start_task(&all).unwrap_err();
    assert!(stopped.to_string().contains("`m01`"), "{stopped}");
    assert!(matches!(
        e.stopped(),
        Some(RunStop::Revealed { round: 1, .. })
    ));
}

/// A DP round whose unmask requests left before the coordinator went away
/// may have shown its noised sum; the retry adds fresh noise to the same
/// inputs, a second release. The restarted engine records the lost attempt
/// (aborted, accounted) once, however often it restarts, and a retry that
/// reaches its own unmask requests is accounted again if it is lost too.
/// Without this the ε history counted only the release that committed.
#[test]
fn a_dp_sum_possibly_seen_before_a_restart_is_accounted_once() {
    let (_dir, path, mut cfg) = secure_store();
    let mut dp = crate::config::DpSettings::central(1.0, 1.0, 1e-5);
    dp.mode = crate::config::DpMode::Distributed;
    cfg.dp = Some(dp);
    let all = agents(6);
    let four = names(&all[..4]);
    let mut e = reopen(&path, &cfg);
    let first = e.start_task(&all).unwrap();
    e.before_unmask(&four).unwrap();
    drop(e); // killed before the commit

    let e = reopen(&path, &cfg);
    let history = e.store().history().unwrap();
    drop(e);
    let e = reopen(&path, &cfg);
    let again = e.store().history().unwrap();
    assert_eq!(again, history, "a second restart adds nothing");
    assert_eq!(history.len(), 1, "{history:?}");
    let lost = &history[0];
    assert_eq!(lost.task_id, first.task_id);
    assert_eq!(lost.outcome, Outcome::Aborted);
    assert_eq!(
        lost.abort_reason.as_deref(),
        Some(super::unmask::LOST_ACCOUNTED)
    );
    assert_eq!(names(&lost.reported), four);
    assert_eq!(lost.dropped, all[4..].to_vec());
    let p = lost.privacy.as_ref().expect("accounted");
    assert_eq!(p.steps, 1);
    // Four of six selected added their noise: z·√(4/6).
    assert!(
        (p.noise_multiplier - (4.0f64 / 6.0).sqrt()).abs() < 1e-12,
        "{p:?}"
    );
    assert_eq!(e.ledger().unwrap().epsilon(), Some(p.epsilon));
    drop(e);

    // The retry (pinned to the four) reaches its unmask requests and is
    // lost as well: accounted as a second release.
    let mut e = reopen(&path, &cfg);
    let retry = e.start_task(&all).unwrap();
    assert_ne!(retry.task_id, first.task_id);
    assert_eq!(names(&retry.selected), four);
    e.before_unmask(&four).unwrap();
    drop(e);
    let mut e = reopen(&path, &cfg);
    let history = e.store().history().unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1].task_id, retry.task_id);
    let second = history[1].privacy.as_ref().expect("accounted");
    assert_eq!(second.steps, 2);
    assert!(second.epsilon > p.epsilon);
    // The next retry commits: three releases in all.
    let plan = e.start_task(&all).unwrap();
    e.before_unmask(&four).unwrap();
    let plan_four: Vec<String> = four.iter().cloned().collect();
    e.set_secure_sum(&plan_four, secure_sum(4)).unwrap();
    let record = e.finish_task().unwrap();
    assert_eq!(
        (record.outcome, &record.task_id),
        (Outcome::Committed, &plan.task_id)
    );
    assert_eq!(record.privacy.as_ref().map(|p| p.steps), Some(3));
    drop(e);
    let e = reopen(&path, &cfg);
    assert_eq!(e.store().history().unwrap().len(), 3);
}
