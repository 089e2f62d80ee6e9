//! Federation maths: updates, the streaming sum, server strategies, FedBuff and the in-process reference.

pub mod aggregate;
pub mod fedbuff;
pub mod reference;
pub mod strategy;
pub mod update;
