//! Unit tests of counting, candidate generation, the level-wise protocol
//! through the streaming sum, and rules.

use super::*;
use crate::federation::aggregate::SumAccumulator;

fn toy() -> Vec<Basket> {
    vec![
        vec![0, 1, 2],
        vec![0, 1],
        vec![0, 2],
        vec![1, 2],
        vec![0, 1, 2, 3],
        vec![3],
    ]
}

/// Brute force: every itemset over the items with its count.
fn brute(baskets: &[Basket], num_items: u32, min: u64) -> Vec<Itemset> {
    let mut out = Vec::new();
    for mask in 1u32..(1 << num_items) {
        let items: Vec<u32> = (0..num_items).filter(|i| mask & (1 << i) != 0).collect();
        let count = baskets
            .iter()
            .filter(|b| items.iter().all(|i| b.contains(i)))
            .count() as u64;
        if count >= min {
            out.push(Itemset { items, count });
        }
    }
    out.sort_by(|a, b| (a.items.len(), &a.items).cmp(&(b.items.len(), &b.items)));
    out
}

fn federate(parts: &[Vec<Basket>], num_items: usize, min: u64) -> Apriori {
    let mut a = Apriori::new(num_items, min, 0);
    while !a.finished() {
        let mut acc = SumAccumulator::new(a.candidates().len(), 0);
        for p in parts {
            acc.add(&count_update(p, a.candidates())).unwrap();
        }
        a.on_sum(acc.sum_values(), acc.total_weight()).unwrap();
    }
    a
}

#[test]
fn federated_levels_find_exactly_the_pooled_frequent_itemsets() {
    let b = toy();
    let parts = vec![b[..2].to_vec(), b[2..5].to_vec(), b[5..].to_vec()];
    for min in 1..=4 {
        let a = federate(&parts, 4, min);
        assert_eq!(a.frequent(), brute(&b, 4, min).as_slice(), "min {min}");
        assert_eq!(a.total_baskets(), 6);
    }
}

#[test]
fn counting_by_subsets_and_by_scanning_agree() {
    // A long basket and few candidates takes the scanning path.
    let baskets = vec![(0..30).collect::<Vec<u32>>(), vec![1, 2, 5]];
    let cands = vec![vec![1, 2], vec![2, 5], vec![7, 29]];
    assert_eq!(count(&baskets, &cands), vec![2, 2, 1]);
    let many: Vec<Vec<u32>> = (0..30)
        .flat_map(|a| (a + 1..30).map(move |b| vec![a, b]))
        .collect();
    let c = count(&baskets, &many);
    assert_eq!(c.iter().sum::<u64>(), 435 + 3);
}

#[test]
fn join_and_prune_drop_candidates_with_an_infrequent_subset() {
    let f = |items: Vec<u32>| Itemset { items, count: 9 };
    // {0,1},{0,2},{1,2},{0,3}: {0,1,2} survives, {0,1,3} and {0,2,3} are pruned.
    let next = next_candidates(&[f(vec![0, 1]), f(vec![0, 2]), f(vec![0, 3]), f(vec![1, 2])]);
    assert_eq!(next, vec![vec![0, 1, 2]]);
}

#[test]
fn rules_carry_support_confidence_and_lift() {
    let a = federate(&[toy()], 4, 2);
    let r = rules(a.frequent(), a.total_baskets(), 0.0);
    let r01 = r
        .iter()
        .find(|r| r.antecedent == vec![0] && r.consequent == vec![1])
        .unwrap();
    // {0,1} in 3 of 6 baskets, {0} in 4, {1} in 4.
    assert!((r01.support - 0.5).abs() < 1e-12);
    assert!((r01.confidence - 0.75).abs() < 1e-12);
    assert!((r01.lift - 0.75 / (4.0 / 6.0)).abs() < 1e-12);
    let sold = HashSet::from([0]);
    let lists = bought_together(&r, &sold);
    assert!(lists.iter().all(|r| r.antecedent == vec![0]));
    assert!(lists.windows(2).all(|w| w[0].lift >= w[1].lift));
}

#[test]
fn a_sum_that_is_not_a_count_vector_is_refused() {
    let mut a = Apriori::new(2, 1, 0);
    assert!(matches!(
        a.on_sum(&[1.0], 1.0),
        Err(ItemsetsError::WrongLength { .. })
    ));
    assert!(matches!(
        a.on_sum(&[1.0, 0.5], 1.0),
        Err(ItemsetsError::BadCount { index: 1, .. })
    ));
}

#[test]
fn a_level_past_the_candidate_cap_is_refused_before_it_is_built() {
    // 2,100 items each in one basket: every one of their 2,203,950 pairs
    // would be a level-2 candidate.
    let n = 2_100;
    let mut a = Apriori::new(n, 1, 0);
    let e = a.on_sum(&vec![1.0; n], 1.0).unwrap_err();
    assert_eq!(
        e,
        ItemsetsError::TooManyCandidates {
            level: 2,
            min_count: 1
        }
    );
    assert!(
        e.to_string()
            .contains("raise the minimum support (now 1 baskets)"),
        "{e}"
    );
    // Single items give no rule: at level 2 there is no size to cap.
    assert!(!e.to_string().contains("cap the itemset size"), "{e}");
    let e3 = ItemsetsError::TooManyCandidates {
        level: 3,
        min_count: 1,
    };
    assert!(
        e3.to_string().ends_with("or cap the itemset size below 3"),
        "{e3}"
    );
    // At 2,000 items (1,999,000 pairs) the level is counted; capped at size
    // 1 nothing is built at all.
    let mut a = Apriori::new(2_000, 1, 0);
    a.on_sum(&vec![1.0; 2_000], 1.0).unwrap();
    assert_eq!(a.candidates().len(), 1_999_000);
    let mut a = Apriori::new(n, 1, 1);
    a.on_sum(&vec![1.0; n], 1.0).unwrap();
    assert!(a.finished());
}

#[test]
fn item_lists_read_back_one_way_whatever_the_ids_hold() {
    assert_eq!(item_list(["milk", "eggs"]), "milk eggs");
    assert_eq!(item_list(["a b", "a", "b"]), "\"a b\" a b");
    assert_eq!(item_list(["x\"y", "a,b"]), "\"x\"\"y\" a,b");
}
