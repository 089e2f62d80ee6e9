//! The default hyper-parameters of each MF family, one set for the
//! simulator and for a coordinator's run configuration, each chosen on the
//! merchants' validation slices (BENCHMARKS.md says how), and the reading
//! of a run configuration's `hyper` table over them.

use serde::de::{Deserialize, Deserializer, Error as _};

use super::{ImplicitAlgorithm, MfHyper};

/// Latent factors of explicit MF unless given: validation RMSE fell with k
/// up to 256 at [`MF_LR`] and [`MF_EPOCHS`]; 128 is within 0.002 of 256
/// at half the bytes (BENCHMARKS.md, "Explicit MF defaults").
pub const MF_FACTORS: usize = 128;
/// SGD step of explicit MF, chosen with [`MF_FACTORS`].
pub const MF_LR: f32 = 0.02;
/// Local epochs per round of explicit MF, chosen with [`MF_FACTORS`].
pub const MF_EPOCHS: usize = 10;
/// Latent factors of explicit MF under DP-FedAvg unless given: each
/// merchant's update is clipped to one norm and noised per coordinate, so a
/// model of 4× the coordinates loses more than it gains; validation RMSE
/// preferred k 32, lr 0.01 and 5 epochs at every ε tried (BENCHMARKS.md,
/// "Explicit MF defaults").
pub const MF_DP_FACTORS: usize = 32;
/// Latent factors of the implicit models (BPR and iALS) unless given.
pub const IMPLICIT_FACTORS: usize = 32;
/// iALS penalty λ (factors and biases).
pub const IALS_REG: f32 = 2.0;
/// iALS confidence scale α.
pub const IALS_ALPHA: f32 = 4.0;
/// iALS proximal weight ρ.
pub const IALS_PROXIMAL: f32 = 0.1;

impl MfHyper {
    /// Explicit MF (`family = "mf"`, `--task mf`).
    pub fn explicit() -> Self {
        Self {
            learning_rate: MF_LR,
            bias_learning_rate: MF_LR,
            reg_factors: 0.1,
            reg_bias: 0.05,
            epochs: MF_EPOCHS,
            ..Self::default()
        }
    }

    /// Explicit MF under DP-FedAvg (with [`MF_DP_FACTORS`]).
    pub fn explicit_dp() -> Self {
        Self {
            learning_rate: 0.01,
            bias_learning_rate: 0.01,
            epochs: 5,
            ..Self::explicit()
        }
    }

    /// Implicit MF trained by BPR (`family = "mf_implicit"`,
    /// `--task mf-implicit`).
    pub fn bpr() -> Self {
        Self {
            learning_rate: 0.05,
            bias_learning_rate: 0.05,
            reg_factors: 0.01,
            reg_bias: 0.01,
            epochs: 5,
            negatives: 4,
            ..Self::default()
        }
    }

    /// Implicit MF trained by iALS (`algorithm = "ials"`, `--task
    /// mf-ials`); an epoch is one local sweep of items and users.
    pub fn ials() -> Self {
        Self {
            algorithm: ImplicitAlgorithm::Ials,
            reg_factors: IALS_REG,
            reg_bias: IALS_REG,
            alpha: IALS_ALPHA,
            proximal: IALS_PROXIMAL,
            epochs: 1,
            ..Self::default()
        }
    }

    /// The defaults of an implicit model trained by `algorithm`.
    pub fn implicit(algorithm: ImplicitAlgorithm) -> Self {
        match algorithm {
            ImplicitAlgorithm::Bpr => Self::bpr(),
            ImplicitAlgorithm::Ials => Self::ials(),
        }
    }
}

/// Reads an explicit model's `hyper` table: the keys given replace
/// [`MfHyper::explicit`]'s, and an unknown key is refused.
pub(crate) fn explicit_hyper<'de, D: Deserializer<'de>>(d: D) -> Result<MfHyper, D::Error> {
    over_defaults(d, |_| MfHyper::explicit())
}

/// Reads an explicit model's `hyper` table over [`MfHyper::explicit_dp`]:
/// what a run under DP-FedAvg trains with where its table is silent.
pub fn explicit_dp_hyper<'de, D: Deserializer<'de>>(d: D) -> Result<MfHyper, D::Error> {
    over_defaults(d, |_| MfHyper::explicit_dp())
}

/// Reads an implicit model's `hyper` table over the defaults of its
/// `algorithm` (BPR unless the table names another).
pub(crate) fn implicit_hyper<'de, D: Deserializer<'de>>(d: D) -> Result<MfHyper, D::Error> {
    over_defaults(d, MfHyper::implicit)
}

fn over_defaults<'de, D: Deserializer<'de>>(
    d: D,
    defaults: impl Fn(ImplicitAlgorithm) -> MfHyper,
) -> Result<MfHyper, D::Error> {
    use serde_json::{Map, Value};
    let given = Map::<String, Value>::deserialize(d)?;
    let algorithm = match given.get("algorithm") {
        Some(v) => ImplicitAlgorithm::deserialize(v)
            .map_err(|e| D::Error::custom(format!("hyper.algorithm: {e}")))?,
        None => ImplicitAlgorithm::default(),
    };
    let Ok(Value::Object(mut merged)) = serde_json::to_value(defaults(algorithm)) else {
        return Err(D::Error::custom("MF defaults did not serialise as a table"));
    };
    for (key, value) in given {
        if !merged.contains_key(&key) {
            let known: Vec<&str> = merged.keys().map(String::as_str).collect();
            return Err(D::Error::custom(format!(
                "unknown key `{key}` in hyper; expected one of {}",
                known.join(", ")
            )));
        }
        merged.insert(key, value);
    }
    MfHyper::deserialize(Value::Object(merged)).map_err(|e| D::Error::custom(format!("hyper: {e}")))
}
