//! Offline recommendations and churn scores from the agent's local state:
//! the latest global model the agent received plus its private user factors.
//! Nothing here talks to the coordinator.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use fedcart_common::data::tabular::TabularDataset;
use fedcart_common::model::lr::LogisticRegression;
use fedcart_common::model::mf::{MfData, blend, item_offsets, local_popularity};

use crate::data::{CustomerTable, Items};
use crate::state::{StateDir, StateError};

/// "No model": what to do when the agent never took part in such a round,
/// and when the state (of `--run`, say) holds other models instead — that
/// the agent took part in no such round would then be false.
pub(crate) fn missing(model: &str, round: &str, held: &[String]) -> String {
    if held.is_empty() {
        format!(
            "no {model} model yet: the agent has not taken part in {round} round; run the agent \
             (`fedcart-client run`) while the coordinator runs {round} run"
        )
    } else {
        format!(
            "no {model} model here: this state holds {}, and no {model} model (with --run, name \
             a run that trains one; without it, the latest run of each kind is read)",
            held.join(", ")
        )
    }
}

/// Why no recommendation or score could be computed.
#[derive(Debug, thiserror::Error)]
pub enum RecommendError {
    /// No MF model is stored yet (`held`: what is, e.g. a churn model of
    /// the run `--run` named).
    #[error("{}", missing("recommender", "a recommender (MF)", held))]
    NoRecommender {
        /// The models the state holds instead ([`StateDir::held_models`]).
        held: Vec<String>,
    },
    /// The stored `mf` model's spec is not a matrix-factorisation spec.
    #[error("stored `mf` model has an unexpected spec")]
    UnexpectedSpec,
    /// The stored model and the local catalogue disagree on the item count.
    #[error(
        "the stored recommender has {model} item rows and `data.catalogue` lists {catalogue} \
         items: the run that trained it used another catalogue, or hashed item ids (then read it \
         with a configuration without `data.catalogue`, as its agent was configured when it \
         trained)"
    )]
    CatalogueMismatch {
        /// Items in the model.
        model: usize,
        /// Items in the catalogue.
        catalogue: usize,
    },
    /// The private user factors were never saved.
    #[error(
        "no private user factors (`mf-users.json` in the state directory): the agent saves them \
         when it takes part in a recommender round; run the agent, or restore the file"
    )]
    NoUserFactors,
    /// `k` is 0 or above [`MAX_K`].
    #[error("k = {0} must be between 1 and {MAX_K}")]
    BadK(usize),
    /// The customer is not in the ratings file.
    #[error(
        "unknown customer `{customer}`: no purchase of theirs is in the data (known ids look like \
         `{example}`); for a visitor with no purchases, `--best-sellers` lists this merchant's \
         best sellers"
    )]
    UnknownCustomer {
        /// The id asked for.
        customer: String,
        /// A customer the data does know, to compare the id's form with.
        example: String,
    },
    /// The customer is in the data but not in the model: they bought for
    /// the first time after the recommender was trained (`factors`: the
    /// model's width, for the log).
    #[error(
        "customer `{customer}` is in the data but not in the recommender: their purchases came \
         after it was trained, so it has nothing of theirs to rank by; they get recommendations \
         once a recommender round trains on data that holds them (the agent reads the export at \
         start: restart it after a new export)"
    )]
    Untrained {
        /// The customer.
        customer: String,
        /// The model's factor count.
        factors: usize,
    },
    /// No churn model is stored yet (`held`: what is, e.g. a recommender
    /// of the run `--run` named).
    #[error("{}", missing("churn", "a churn", held))]
    NoChurnModel {
        /// The models the state holds instead ([`StateDir::held_models`]).
        held: Vec<String>,
    },
    /// The stored boosted-trees model cannot be scored (corrupt, or built
    /// for another feature width).
    #[error("the stored churn-gbdt model: {0}")]
    Trees(#[from] fedcart_common::model::gbdt::GbdtError),
    /// The stored churn model has no standardiser.
    #[error("the stored churn model came without feature statistics")]
    NoFeatureStats,
    /// The stored churn model is a run's untrained version 0.
    #[error(
        "the churn model stored for run `{run_id}` is its untrained version 0: no round of \
         that run has finished with this agent yet (score once it has, or name another run)"
    )]
    Untrained0 {
        /// The run.
        run_id: String,
    },
    /// The customer table could not be read (the error names the file,
    /// line and column).
    #[error(transparent)]
    Load(Box<crate::data::DataError>),
    /// The stored churn model does not fit the CSV's features.
    #[error(
        "the churn model of run `{run_id}` (version {version}) was trained on {expected} features \
         per customer, and this data gives {features}: score the data the run trained on (the \
         same `data.orders` export or customer table and schema as the agent's), or train a run \
         on this data"
    )]
    Shape {
        /// The run the stored model comes from.
        run_id: String,
        /// Its version.
        version: u64,
        /// Features the stored model takes.
        expected: usize,
        /// Features per row in the data.
        features: usize,
    },
    /// The scores could not be written.
    #[error("writing {}", path.display())]
    Write {
        /// The output file.
        path: PathBuf,
        /// The writer's error.
        #[source]
        source: csv::Error,
    },
    /// The local state could not be read.
    #[error(transparent)]
    State(#[from] StateError),
}

/// The most items one request may ask for (`k`): a shop shows tens; a
/// bound keeps one request's response and sort small.
pub const MAX_K: usize = 1000;

/// One recommended item.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Recommendation {
    /// Catalogue item id.
    pub item: String,
    /// The item's display name, when `data.item_names` has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Predicted score (rating for explicit MF, preference for BPR).
    pub score: f32,
}

/// The stored global recommender and the private user factors: everything
/// needed to score the catalogue for one of this merchant's customers. The
/// one ranking of the merchant's recommendations, shared by `fedcart-client
/// recommend` ([`recommend_with`]) and the HTTP API (`serve`). Where the
/// merchant's personalised copy of the stored version won on validation
/// (`[personalise]`), that copy and its user factors rank instead.
#[derive(Debug, Clone)]
pub struct Recommender {
    /// The run the version belongs to.
    pub run_id: String,
    /// The global model version.
    pub version: u64,
    /// Which copy of that version ranks: the global one, or the merchant's
    /// personalised copy where it won on validation.
    pub copy: ServedCopy,
    num_items: usize,
    factors: usize,
    implicit: bool,
    global: Vec<f32>,
    users: fedcart_common::model::mf::UserState,
    /// Local user index (the data's order) → row of `users`, matched by
    /// customer id ([`Recommender::for_users`]); `None`: the same index (a
    /// state saved without ids).
    rows: Option<Vec<Option<usize>>>,
}

/// The copy of a recommender version a merchant serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServedCopy {
    /// The federation's model with the merchant's user factors.
    Global,
    /// The merchant's fine-tuned copy of that version (`[personalise]`),
    /// kept because its validation slice preferred it.
    Personalised,
}

impl std::fmt::Display for ServedCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServedCopy::Global => "global",
            ServedCopy::Personalised => "personalised",
        })
    }
}

/// What the ranking needs from the merchant's own purchases: its item
/// popularity (the blend implicit MF chose on validation) and each
/// customer's purchase counts. Built once from the merchant's [`MfData`].
#[derive(Debug, Clone, Default)]
pub struct Purchases {
    /// The merchant's standardised item popularity (`local_popularity`).
    popularity: Vec<f32>,
    /// Per local user: catalogue index → how much of it the customer took
    /// (train, validation and held-out rows).
    bought: Vec<HashMap<u32, Taken>>,
    /// The rows the merchant can name (hashed item ids: the rows of its own
    /// items); `None`: every row.
    known: Option<Vec<bool>>,
    /// Per row: how many of the merchant's customers bought it (train,
    /// validation and held-out rows), for the best-seller list
    /// ([`Purchases::popular`]).
    buyers: Vec<u32>,
}

/// How much of one item (one hashed row) a customer took.
#[derive(Debug, Clone, Copy, Default)]
struct Taken {
    /// Interaction rows: one per item bought or rated (several only where
    /// hashed item ids share a row).
    rows: f32,
    /// Their summed strength: an orders export's quantity over every order
    /// (an explicit rating where the data has ratings).
    amount: f32,
}

impl Taken {
    /// "Times bought" of a repeat-aware list: an implicit model's summed
    /// quantity (one interaction holds every order of its item, so its rows
    /// count 1 for a staple bought every week), at least one per row; an
    /// explicit model's rated rows.
    fn times(self, implicit: bool) -> f32 {
        if implicit && self.amount.is_finite() {
            self.amount.max(self.rows)
        } else {
            self.rows
        }
    }
}

impl Purchases {
    /// The popularity and purchase counts of `mf` over `num_items` items.
    pub fn of(mf: &MfData, num_items: usize) -> Self {
        let mut bought = vec![HashMap::<u32, Taken>::new(); mf.users.len()];
        for r in mf.train.iter().chain(&mf.valid).chain(&mf.test) {
            if let Some(b) = bought.get_mut(r.user as usize) {
                let taken = b.entry(r.item).or_default();
                taken.rows += 1.0;
                taken.amount += r.value;
            }
        }
        let mut buyers = vec![0u32; num_items];
        for b in &bought {
            for &i in b.keys() {
                if let Some(c) = buyers.get_mut(i as usize) {
                    *c += 1;
                }
            }
        }
        Self {
            popularity: local_popularity(mf, num_items),
            bought,
            known: None,
            buyers,
        }
    }

    /// The merchant's best sellers: the top `opts.k` items by how many of
    /// its customers bought them (an item's own count, also where hashed
    /// ids share a row), ties by id, each scored with that count. With
    /// `u`, what that customer bought is skipped unless
    /// `opts.include_repeats` (or `opts.repeat_weight`); with hashed ids a
    /// purchase is known by its row, so a rare item sharing the row of one
    /// the customer bought is skipped too. The list a customer the
    /// recommender cannot rank gets ([`Basis::Popularity`]), and a visitor
    /// with no purchases.
    pub fn popular(
        &self,
        u: Option<usize>,
        items: &Items,
        opts: &RecommendOptions,
    ) -> Vec<Recommendation> {
        let keep_repeats = opts.include_repeats || opts.repeat_weight.is_some();
        let empty = HashMap::new();
        let bought = match u {
            Some(u) if !keep_repeats => self.bought.get(u).unwrap_or(&empty),
            _ => &empty,
        };
        let mut scored: Vec<(u32, &str)> = Vec::new();
        for (row, &row_buyers) in self.buyers.iter().enumerate() {
            let row = row as u32;
            if row_buyers == 0 || bought.contains_key(&row) {
                continue;
            }
            for id in items.ids(row) {
                let n = items.buyers(id).unwrap_or(row_buyers);
                if n > 0 {
                    scored.push((n, id));
                }
            }
        }
        let by_count = |a: &(u32, &str), b: &(u32, &str)| b.0.cmp(&a.0).then(a.1.cmp(b.1));
        if scored.len() > opts.k {
            scored.select_nth_unstable_by(opts.k.saturating_sub(1), by_count);
            scored.truncate(opts.k);
        }
        scored.sort_by(by_count);
        scored
            .into_iter()
            .map(|(n, id)| Recommendation {
                item: id.to_owned(),
                name: None,
                score: n as f32,
            })
            .collect()
    }

    /// Ranks only the rows `items` can name: with hashed item ids, the rows
    /// of the merchant's own items (a row of other merchants' items has no
    /// id here to recommend).
    pub fn naming(mut self, items: &Items) -> Self {
        if let Items::Hashed { .. } = items {
            self.known = Some(
                (0..items.len() as u32)
                    .map(|i| !items.ids(i).is_empty())
                    .collect(),
            );
        }
        self
    }

    /// Items local user `u` bought or rated.
    pub fn bought(&self, u: usize) -> impl Iterator<Item = u32> + '_ {
        self.bought
            .get(u)
            .into_iter()
            .flat_map(|b| b.keys().copied())
    }
}

/// The catalogue indices `u` bought or rated (train, validation and
/// held-out rows).
pub fn purchased(mf: &MfData, u: usize) -> HashSet<u32> {
    mf.train
        .iter()
        .chain(&mf.valid)
        .chain(&mf.test)
        .filter(|r| r.user as usize == u)
        .map(|r| r.item)
        .collect()
}

/// `k` must be in 1..=[`MAX_K`].
pub fn check_k(k: usize) -> Result<(), RecommendError> {
    if k == 0 || k > MAX_K {
        return Err(RecommendError::BadK(k));
    }
    Ok(())
}

impl Recommender {
    /// Loads the latest global `mf` model and the user factors; the model
    /// must have exactly `catalogue_len` items.
    pub fn load(state: &StateDir, catalogue_len: usize) -> Result<Self, RecommendError> {
        let Some((meta, global)) = state.load_global("mf")? else {
            return Err(RecommendError::NoRecommender {
                held: state.held_models(),
            });
        };
        let (num_items, factors, implicit) = match meta.spec.model.mf_shape() {
            Some(shape) => (shape.num_items, shape.k, shape.implicit),
            None => return Err(RecommendError::UnexpectedSpec),
        };
        if num_items != catalogue_len {
            return Err(RecommendError::CatalogueMismatch {
                model: num_items,
                catalogue: catalogue_len,
            });
        }
        if global.len() != 1 + num_items * (1 + factors) {
            return Err(RecommendError::UnexpectedSpec);
        }
        // The personalised copy of exactly this run and version, where it
        // was kept; a copy of an older version is stale.
        let personal = state.load_personal()?.and_then(|(p, copy)| {
            (p.kept && p.run_id == meta.run_id && p.version == meta.version)
                .then_some(copy)
                .flatten()
        });
        if let Some((params, users)) = personal
            && params.len() == global.len()
        {
            return Ok(Self {
                run_id: meta.run_id,
                version: meta.version,
                copy: ServedCopy::Personalised,
                num_items,
                factors,
                implicit,
                global: params,
                users,
                rows: None,
            });
        }
        let users = state.load_users()?.ok_or(RecommendError::NoUserFactors)?;
        Ok(Self {
            run_id: meta.run_id,
            version: meta.version,
            copy: ServedCopy::Global,
            num_items,
            factors,
            implicit,
            global,
            users,
            rows: None,
        })
    }

    /// Matches the stored user factors to `customers`, the local data's
    /// users in index order, by customer id: an export that gained or lost
    /// customers since the factors were saved moves no one's row onto
    /// another customer, and a customer the factors never saw has none
    /// (`Untrained`). A state saved without ids is read by position.
    pub fn for_users(mut self, customers: &[String]) -> Self {
        if self.users.users.is_empty() || self.users.users.as_slice() == customers {
            self.rows = None;
            return self;
        }
        let row: HashMap<&str, usize> = self
            .users
            .users
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        self.rows = Some(
            customers
                .iter()
                .map(|c| row.get(c.as_str()).copied())
                .collect(),
        );
        self
    }

    /// The model's item count.
    pub fn num_items(&self) -> usize {
        self.num_items
    }

    /// The top `opts.k` catalogue indices for local user `u` (an index into
    /// `MfData::users`) with their scores, best first, ties by index.
    /// Explicit MF ranks by the predicted rating `μ + b_i + b_u + p_u·q_i`;
    /// implicit MF by the standardised `b_i + p_u·q_i` blended with the
    /// merchant's own item popularity at the weight its last validation
    /// chose (`UserState::pop_blend`), exactly the ranking its evaluation
    /// measured. With `repeat_weight` the customer's own purchase counts are
    /// blended in too. Items the customer bought are skipped unless
    /// `include_repeats` (or `repeat_weight`) is set.
    pub fn rank(
        &self,
        customer: &str,
        u: usize,
        purchases: &Purchases,
        opts: &RecommendOptions,
    ) -> Result<Vec<(u32, f32)>, RecommendError> {
        check_k(opts.k)?;
        let (n, f) = (self.num_items, self.factors);
        let untrained = || RecommendError::Untrained {
            customer: customer.to_owned(),
            factors: f,
        };
        // `u` indexes the local data (purchases); `row` the stored factors.
        let row = match &self.rows {
            None => u,
            Some(rows) => rows.get(u).copied().flatten().ok_or_else(untrained)?,
        };
        if self.users.k != f || (row + 1) * f > self.users.factors.len() {
            return Err(RecommendError::Untrained {
                customer: customer.to_owned(),
                factors: f,
            });
        }
        let global = &self.global;
        // The users the evaluation of this version measured the test with.
        let (bias, users) = self.users.serving_side(self.version);
        if (row + 1) * f > users.len() {
            return Err(untrained());
        }
        let pu = &users[row * f..(row + 1) * f];
        let bu = bias.get(row).copied().unwrap_or(0.0);
        let mut scores: Vec<f32> = (0..n)
            .map(|i| {
                // In range: `load` checked the length against the shape.
                let (b, q) = item_offsets(n, f, i);
                let dot: f32 = pu.iter().zip(&global[q..q + f]).map(|(a, b)| a * b).sum();
                if self.implicit {
                    global[b] + dot
                } else {
                    global[0] + global[b] + bu + dot
                }
            })
            .collect();
        if self.implicit && purchases.popularity.len() == n {
            let model = standardised(&scores);
            blend(
                &model,
                &purchases.popularity,
                self.users.pop_blend,
                &mut scores,
            );
        }
        let empty = HashMap::new();
        let bought = purchases.bought.get(u).unwrap_or(&empty);
        if let Some(w) = opts.repeat_weight {
            let mut times = vec![0.0f32; n];
            for (&i, &t) in bought {
                if let Some(x) = times.get_mut(i as usize) {
                    *x = t.times(self.implicit).ln_1p();
                }
            }
            let model = standardised(&scores);
            blend(
                &model,
                &standardised(&times),
                w.clamp(0.0, 1.0),
                &mut scores,
            );
        }
        let keep_repeats = opts.include_repeats || opts.repeat_weight.is_some();
        let mut scored: Vec<(u32, f32)> = scores
            .into_iter()
            .enumerate()
            .map(|(i, s)| (i as u32, s))
            .filter(|(i, s)| {
                s.is_finite()
                    && (keep_repeats || !bought.contains_key(i))
                    && purchases
                        .known
                        .as_ref()
                        .is_none_or(|k| k.get(*i as usize).copied().unwrap_or(false))
            })
            .collect();
        let by_score = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if scored.len() > opts.k {
            scored.select_nth_unstable_by(opts.k - 1, by_score);
            scored.truncate(opts.k);
        }
        scored.sort_by(by_score);
        Ok(scored)
    }
}

/// How a list of recommendations is built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecommendOptions {
    /// How many items.
    pub k: usize,
    /// Keep items the customer already bought (excluded by default).
    pub include_repeats: bool,
    /// Repeat-aware list: blend the customer's own frequent items into the
    /// model's ranking with this weight in `[0, 1]` (standardised scores,
    /// `(1 − w)·model + w·log(1 + times bought)`, times bought being the
    /// quantity over all orders for an implicit model); implies repeats. `None`
    /// ranks by the model alone.
    pub repeat_weight: Option<f32>,
}

impl RecommendOptions {
    /// Top `k` unbought items by the model.
    pub fn top(k: usize) -> Self {
        Self {
            k,
            include_repeats: false,
            repeat_weight: None,
        }
    }
}

/// Top `k` items for `customer`, skipping items the customer already bought
/// or rated: [`recommend_with`] with [`RecommendOptions::top`].
pub fn recommend(
    state: &StateDir,
    mf: &MfData,
    items: &Items,
    customer: &str,
    k: usize,
) -> Result<Vec<Recommendation>, RecommendError> {
    recommend_with(state, mf, items, customer, &RecommendOptions::top(k))
}

/// Recommendations for `customer` from the stored global model and the
/// private user factors, ranked by [`Recommender::rank`], named by
/// [`named`].
pub fn recommend_with(
    state: &StateDir,
    mf: &MfData,
    items: &Items,
    customer: &str,
    opts: &RecommendOptions,
) -> Result<Vec<Recommendation>, RecommendError> {
    recommend_from(state, mf, items, customer, opts).map(|a| a.items)
}

/// What ranked a customer's list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// The recommender, with the customer's own factors.
    Model,
    /// The merchant's best sellers ([`Purchases::popular`]): the
    /// recommender has no factors for this customer (their purchases came
    /// after it was trained), so a shop still gets a list, and says so.
    Popularity,
}

/// A customer's list and what ranked it ([`recommend_from`]).
#[derive(Debug, Clone)]
pub struct Answer {
    /// Best first.
    pub items: Vec<Recommendation>,
    /// The recommender version loaded (also for a popularity answer).
    pub version: ModelVersion,
    /// Its copy served.
    pub copy: ServedCopy,
    /// The model, or the best sellers with why the model could not rank.
    pub basis: Basis,
    /// Why the list is the best sellers (`basis` popularity), or why it is
    /// empty.
    pub note: Option<String>,
}

/// A list, what ranked it and, for the best sellers, why.
pub(crate) type Ranked = (Vec<Recommendation>, Basis, Option<String>);

/// The model's ranked rows as items or, for a customer the recommender has
/// no factors for, the best sellers instead: the list and its note (the
/// same words as the error).
pub(crate) fn fallback(
    ranked: Result<Vec<(u32, f32)>, RecommendError>,
    purchases: &Purchases,
    items: &Items,
    u: usize,
    opts: &RecommendOptions,
) -> Result<Ranked, RecommendError> {
    match ranked {
        Ok(top) => {
            let listed = named(&top, items, opts.k);
            // An empty list with no word read as a fault (a data probe): a
            // customer who bought everything the merchant sells has no new
            // item left, which `include_repeats` lifts.
            let note = (listed.is_empty() && !opts.include_repeats && opts.repeat_weight.is_none())
                .then(|| {
                    "the customer has bought every item this merchant sells, so no new item is \
                     left to suggest; `--include-repeats` (`include_repeats=true` on the API) \
                     lists the items they may buy again"
                        .to_string()
                });
            Ok((listed, Basis::Model, note))
        }
        Err(e @ RecommendError::Untrained { .. }) => Ok((
            purchases.popular(Some(u), items, opts),
            Basis::Popularity,
            Some(format!(
                "{e}; until then the list is this merchant's best sellers (score: how many of its \
                 customers bought the item)"
            )),
        )),
        Err(e) => Err(e),
    }
}

/// [`recommend_with`], also saying which model ranked: its run and version
/// and the copy served (the personalised one where it won on validation),
/// and whether the model ranked or, for a customer it has no factors for,
/// the merchant's best sellers did ([`Basis`]).
pub fn recommend_from(
    state: &StateDir,
    mf: &MfData,
    items: &Items,
    customer: &str,
    opts: &RecommendOptions,
) -> Result<Answer, RecommendError> {
    check_k(opts.k)?;
    let rec = Recommender::load(state, items.len())?.for_users(&mf.users);
    // Ids are trimmed when the data is read: so is the one asked for; and
    // as the orders reader keeps ids, `17850.0` is `17850`.
    let trimmed = customer.trim();
    let customer = if mf.users.iter().any(|c| c == trimmed) {
        trimmed
    } else {
        fedcart_common::data::orders::id_key(trimmed)
    };
    let u = mf.users.iter().position(|c| c == customer).ok_or_else(|| {
        RecommendError::UnknownCustomer {
            customer: customer.to_owned(),
            example: mf.users.first().cloned().unwrap_or_default(),
        }
    })?;
    let purchases = Purchases::of(mf, rec.num_items()).naming(items);
    let (listed, basis, note) = fallback(
        rec.rank(customer, u, &purchases, opts),
        &purchases,
        items,
        u,
        opts,
    )?;
    Ok(Answer {
        items: listed,
        version: ModelVersion {
            run_id: rec.run_id.clone(),
            version: rec.version,
        },
        copy: rec.copy,
        basis,
        note,
    })
}

/// The merchant's best sellers (no customer, no model needed): the list a
/// visitor with no purchases can be shown.
pub fn best_sellers(
    mf: &MfData,
    items: &Items,
    k: usize,
) -> Result<Vec<Recommendation>, RecommendError> {
    check_k(k)?;
    let purchases = Purchases::of(mf, items.len()).naming(items);
    Ok(purchases.popular(None, items, &RecommendOptions::top(k)))
}

/// Ranked rows as item ids, at most `k`: a catalogue row is its one id; a
/// hashed row the merchant's own items there, most customers first (several
/// only when their ids collide), all with the row's score.
pub fn named(ranked: &[(u32, f32)], items: &Items, k: usize) -> Vec<Recommendation> {
    ranked
        .iter()
        .flat_map(|&(i, score)| {
            items.ids(i).into_iter().map(move |id| Recommendation {
                item: id.to_owned(),
                name: None,
                score,
            })
        })
        .take(k)
        .collect()
}

/// `v` shifted and scaled to mean 0 and standard deviation 1.
fn standardised(v: &[f32]) -> Vec<f32> {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    let sd = if var > 0.0 { var.sqrt() } else { 1.0 };
    v.iter()
        .map(|&x| ((f64::from(x) - mean) / sd) as f32)
        .collect()
}

/// A stored model version and the run it belongs to (versions count per
/// run, so a version alone does not tell two runs' models apart).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelVersion {
    /// The run.
    pub run_id: String,
    /// Its version.
    pub version: u64,
}

impl ModelVersion {
    /// The version of the model `meta` describes.
    pub fn of(meta: &crate::state::GlobalMeta) -> Self {
        Self {
            run_id: meta.run_id.clone(),
            version: meta.version,
        }
    }
}

/// Churn probability of every row of `ds` from the latest global churn
/// model, with that model's run and version.
pub fn churn_probabilities(
    state: &StateDir,
    ds: &TabularDataset,
) -> Result<(ModelVersion, Vec<f32>), RecommendError> {
    let Some((meta, params)) = state.load_global("churn")? else {
        return Err(RecommendError::NoChurnModel {
            held: state.held_models(),
        });
    };
    let tag = ModelVersion::of(&meta);
    let Some(scaler) = meta.spec.standardizer else {
        return Err(if meta.version == 0 {
            RecommendError::Untrained0 {
                run_id: meta.run_id,
            }
        } else {
            RecommendError::NoFeatureStats
        });
    };
    if let fedcart_common::task::ModelSpec::ChurnGbdt { .. } = meta.spec.model {
        // The trees completed so far; a tree still under construction is
        // ignored.
        let p = fedcart_common::model::gbdt::predict(&params, &scaler, &ds.x)?;
        return Ok((tag, p));
    }
    let shape = || RecommendError::Shape {
        run_id: meta.run_id.clone(),
        version: meta.version,
        expected: scaler.mean.len(),
        features: ds.x.ncols(),
    };
    if scaler.mean.len() != ds.x.ncols() {
        return Err(shape());
    }
    let x = scaler.transform(&ds.x);
    let p = match &meta.spec.model {
        // The MLP was scored as a logistic regression, whose length it
        // never has: refused as data of another width, naming equal counts.
        fedcart_common::task::ModelSpec::ChurnMlp {
            num_features,
            hidden,
            ..
        } if *num_features == ds.x.ncols() => {
            let shape = fedcart_common::model::mlp::MlpShape {
                num_features: *num_features,
                hidden: hidden.clone(),
            };
            fedcart_common::model::mlp::Mlp::from_params(shape, &params)
                .map_err(|_| RecommendError::Shape {
                    run_id: meta.run_id.clone(),
                    version: meta.version,
                    expected: *num_features,
                    features: ds.x.ncols(),
                })?
                .predict_proba(&x)
        }
        fedcart_common::task::ModelSpec::ChurnLr { .. } if params.len() == ds.x.ncols() + 1 => {
            LogisticRegression::from_params(&params).predict_proba(&x)
        }
        _ => return Err(shape()),
    };
    Ok((tag, p))
}

/// Churn probability of every customer in `table` from the latest global
/// churn model; writes `customer_id,churn_probability` to `out` (named
/// `out_name` in errors). Returns the rows written.
pub fn score(
    state: &StateDir,
    table: &CustomerTable,
    out: &mut dyn std::io::Write,
    out_name: &Path,
) -> Result<usize, RecommendError> {
    let ds = table
        .load()
        .map_err(|e| RecommendError::Load(Box::new(e)))?;
    let (_, p) = churn_probabilities(state, &ds)?;
    let write = |source| RecommendError::Write {
        path: out_name.to_owned(),
        source,
    };
    let mut w = csv::Writer::from_writer(out);
    w.write_record(["customer_id", "churn_probability"])
        .map_err(write)?;
    for (id, p) in ds.ids.iter().zip(&p) {
        w.write_record([id.as_str(), &format!("{p:.6}")])
            .map_err(write)?;
    }
    w.flush().map_err(|e| write(e.into()))?;
    Ok(ds.ids.len())
}

#[cfg(test)]
mod tests {
    use fedcart_common::model::sgd::SgdParams;
    use fedcart_common::task::{ModelSpec, TaskKind, TaskSpec};
    use ndarray::{Array1, Array2};

    use super::*;
    use crate::state::GlobalMeta;

    /// A recommender of `n` items for the one customer `c`, with no bias or
    /// factor: it ranks every item alike.
    fn flat(n: usize, implicit: bool) -> Recommender {
        Recommender {
            run_id: "r".into(),
            version: 1,
            copy: ServedCopy::Global,
            num_items: n,
            factors: 1,
            implicit,
            global: vec![0.0; 1 + 2 * n],
            users: fedcart_common::model::mf::UserState {
                k: 1,
                users: vec!["c".into()],
                bias: vec![0.0],
                factors: vec![0.0],
                ..Default::default()
            },
            rows: None,
        }
    }

    /// A repeat-aware list ranks the customer's staples by how much of each
    /// they took over every order (an implicit interaction holds all the
    /// orders of its item, so counting rows gave every purchase the same
    /// weight, `ln 2`, and the 157-basket staple tied with a one-off).
    #[test]
    fn a_repeat_aware_list_puts_the_customers_staple_before_a_one_off_purchase() {
        use fedcart_common::model::mf::Rating;
        let n = 3;
        let rec = |implicit| flat(n, implicit);
        let rating = |item, value| Rating {
            user: 0,
            item,
            value,
        };
        let mf = MfData {
            users: vec!["c".into()],
            // A one-off purchase of item 0 and 12 units of item 2 over the
            // customer's orders.
            train: vec![rating(0, 1.0), rating(2, 12.0)],
            ..Default::default()
        };
        let purchases = Purchases::of(&mf, n);
        let opts = RecommendOptions {
            k: 3,
            include_repeats: false,
            repeat_weight: Some(1.0),
        };
        let ranked = rec(true).rank("c", 0, &purchases, &opts).unwrap();
        let order: Vec<u32> = ranked.iter().map(|&(i, _)| i).collect();
        assert_eq!(order, [2, 0, 1], "{ranked:?}");
        assert!(ranked[0].1 > ranked[1].1, "{ranked:?}");
        // An explicit model's values are ratings, not amounts: each rated
        // item counts once.
        let ranked = rec(false).rank("c", 0, &purchases, &opts).unwrap();
        assert_eq!(ranked[0].1, ranked[1].1, "{ranked:?}");
    }

    /// A customer who bought every item the merchant sells gets an empty
    /// list, which read as a fault without a word (a data probe): it comes
    /// with a note naming why and `include_repeats`, which lists them.
    #[test]
    fn an_empty_list_says_the_customer_bought_every_item() {
        use fedcart_common::model::mf::Rating;
        let rec = flat(1, true);
        let mf = MfData {
            users: vec!["c".into()],
            train: vec![Rating {
                user: 0,
                item: 0,
                value: 1.0,
            }],
            ..Default::default()
        };
        let items = Items::Listed(fedcart_common::data::catalogue::Catalogue::from_ids([
            "ONE",
        ]));
        let purchases = Purchases::of(&mf, 1);
        let answer = |opts: &RecommendOptions| {
            fallback(
                rec.rank("c", 0, &purchases, opts),
                &purchases,
                &items,
                0,
                opts,
            )
            .unwrap()
        };
        let (listed, basis, note) = answer(&RecommendOptions::top(3));
        assert!(listed.is_empty() && basis == Basis::Model);
        assert!(
            note.as_deref()
                .is_some_and(|n| n.contains("bought every item") && n.contains("--include-repeats")),
            "{note:?}"
        );
        let repeats = RecommendOptions {
            include_repeats: true,
            ..RecommendOptions::top(3)
        };
        let (listed, _, note) = answer(&repeats);
        assert_eq!((listed.len(), note), (1, None));
    }

    /// A run's untrained version 0 (stored when its first task arrived,
    /// before the statistics step agreed any scaling) is named as such,
    /// not as a model "without feature statistics".
    #[test]
    fn scoring_a_runs_untrained_version_says_no_round_has_finished() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let meta = |version| GlobalMeta {
            run_id: "c-1".into(),
            version,
            spec: TaskSpec {
                kind: TaskKind::Train,
                model: ModelSpec::churn_lr(2),
                sgd: SgdParams::default(),
                seed: 1,
                round: 1,
                standardizer: None,
                dp: None,
                best_version: None,
            },
            sha256: None,
        };
        let ds = TabularDataset {
            ids: vec!["a".into()],
            x: Array2::zeros((1, 2)),
            y: Array1::zeros(1),
        };
        state.save_global(&meta(0), &[0.0; 3]).unwrap();
        assert_eq!(
            churn_probabilities(&state, &ds).unwrap_err().to_string(),
            "the churn model stored for run `c-1` is its untrained version 0: no round of that \
             run has finished with this agent yet (score once it has, or name another run)"
        );
        state.save_global(&meta(3), &[0.0; 3]).unwrap();
        assert!(matches!(
            churn_probabilities(&state, &ds),
            Err(RecommendError::NoFeatureStats)
        ));
        // A table of other features than the run trained on: both counts,
        // the run and what to do.
        let mut trained = meta(4);
        trained.spec.standardizer = Some(fedcart_common::data::standardize::Standardizer {
            mean: vec![0.0; 2],
            std: vec![1.0; 2],
            rows: None,
        });
        state.save_global(&trained, &[0.0; 3]).unwrap();
        let wide = TabularDataset {
            ids: vec!["a".into()],
            x: Array2::zeros((1, 45)),
            y: Array1::zeros(1),
        };
        let e = churn_probabilities(&state, &wide).unwrap_err().to_string();
        assert!(
            e.contains("run `c-1` (version 4)")
                && e.contains("trained on 2 features")
                && e.contains("this data gives 45")
                && e.contains("score the data the run trained on"),
            "{e}"
        );
        // An MLP is scored as the MLP it is (it was refused as data of
        // another width: "trained on 2 features …, and this data gives 2").
        let mlp = ModelSpec::churn_mlp(2, vec![3]);
        let params = mlp.initial_params(7);
        let mut stored = trained.clone();
        stored.spec.model = mlp;
        state.save_global(&stored, &params).unwrap();
        let rows = TabularDataset {
            ids: vec!["a".into(), "b".into()],
            x: ndarray::array![[0.5, -1.0], [2.0, 0.25]],
            y: Array1::zeros(2),
        };
        let (version, p) = churn_probabilities(&state, &rows).unwrap();
        assert_eq!(version.version, 4);
        let shape = fedcart_common::model::mlp::MlpShape {
            num_features: 2,
            hidden: vec![3],
        };
        let want = fedcart_common::model::mlp::Mlp::from_params(shape, &params)
            .unwrap()
            .predict_proba(&rows.x);
        assert_eq!(p, want);
        assert!(churn_probabilities(&state, &wide).is_err());
    }
}
