//! The model families federated by fedcart: logistic regression, the MLP, churn helpers and matrix factorisation.

pub mod churn;
pub mod lr;
pub mod mf;
pub mod mlp;
