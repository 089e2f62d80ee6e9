//! Federation maths: updates, the streaming sum, server strategies and FedBuff (the in-process reference federation is `crate::reference`, above `train`).

pub mod aggregate;
pub mod fedbuff;
pub mod sparse;
pub mod strategy;
pub mod update;
