//! The secure-aggregation parameters of a round, shared by both drivers of
//! the engine (the gRPC service and the simulator), so that neither imports
//! the other's transport.

use fedcart_common::privacy::secagg::SecAggConfig;
use fedcart_common::task::{TaskKind, TaskSpec};

use crate::config::SecAggSettings;

/// The secure-aggregation parameters of one round with `n` invited agents,
/// for both drivers (the gRPC service and the simulator): the whole update
/// (values ‖ coordinate weights ‖ weight) of `spec`, with the ring, clip and
/// graph [`SecAggConfig::for_task`] picks for the task kind (the 2^64 ring
/// for the statistics step's raw sums and an analysis's counts; values clipped at `settings.clip`
/// otherwise; the complete graph up to 64 agents, SecAgg+ beyond, or
/// `settings.neighbours`).
pub fn round_config(settings: &SecAggSettings, spec: &TaskSpec, n: usize) -> SecAggConfig {
    // An analysis (itemset counts) sums exact integers like the statistics
    // step: the same 2^64 ring, never clipped at `settings.clip`.
    let kind = if spec.model.is_analysis() {
        TaskKind::Stats
    } else {
        spec.kind
    };
    let mut cfg = SecAggConfig::for_task(
        kind,
        spec.update_len(),
        spec.update_layout().num_coord_weights,
        n,
        settings.clip,
        settings.neighbours,
    );
    cfg.verify_survivors = settings.verify_survivors;
    // Distributed DP: the encoding the agents' noise was calibrated for.
    if let Some(noise) = spec.dp.as_ref().and_then(|d| d.distributed) {
        noise.configure(&mut cfg);
    }
    cfg
}

/// The abort reason of a secure round in which `advertised` agents
/// advertised keys, fewer than the run's `quorum`. The inputs can only be
/// fewer than the advertisers, so both drivers abort there, before any share
/// is sent or any agent masks (it used to go on to the masked inputs and
/// abort before unmasking, a stage timeout later, for the same reason).
pub fn before_sharing(advertised: usize, quorum: usize) -> String {
    format!(
        "{advertised} agents advertised keys, quorum is {quorum}: aborted before any share was sent"
    )
}

/// The abort reason of a secure round with `in_sum` masked inputs, fewer
/// than the run's `quorum`. Both drivers check the quorum once the masked
/// inputs are in and before anything is unmasked: a sum unmasked and then
/// refused would be retried over the same inputs, and the difference of the
/// two sums would reveal individual updates.
pub fn before_unmasking(in_sum: usize, quorum: usize) -> String {
    format!(
        "{in_sum} masked inputs, quorum is {quorum}: aborted before unmasking, nothing was revealed"
    )
}
