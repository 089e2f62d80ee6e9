//! Row-sparse transfers of catalogue-sized models (matrix factorisation):
//! downloads as the rows changed since the agent's cached version, uploads as
//! the rows an agent touched (`fedcart_common::federation::sparse`).

use fedcart_common::federation::sparse::{self, RowPrecision};
use fedcart_common::federation::update::{Update, WeightLayout};
use fedcart_proto::v1 as pb;
use tonic::Status;

/// The model as rows, when that is what the agent asked for and it is
/// smaller than the dense form: relative to `cached` (the version the agent
/// holds, if still stored), or every row at a reduced precision. `None`: send
/// it dense.
pub(super) fn rows_download(
    model: &[f32],
    cached: Option<&[f32]>,
    layout: &WeightLayout,
    req: &pb::ModelRequest,
) -> Option<Vec<u8>> {
    let precision = match pb::RowPrecision::try_from(req.row_precision) {
        Ok(pb::RowPrecision::F16) => RowPrecision::F16,
        Ok(pb::RowPrecision::Int8) => RowPrecision::Int8,
        // An unknown precision from a newer agent: exact rows.
        _ => RowPrecision::F32,
    };
    if cached.is_none() && precision == RowPrecision::F32 {
        return None;
    }
    let cached = cached.filter(|c| c.len() == model.len());
    let bytes = sparse::encode_model(model, cached, layout, precision).ok()?;
    (bytes.len() < 4 * model.len()).then_some(bytes)
}

/// Decodes a `PAYLOAD_ENCODING_ROWS_F32` upload into the dense update the
/// engine validates like any other.
pub(super) fn decode_upload(
    payload: &[u8],
    header: &pb::UpdateHeader,
    layout: &WeightLayout,
) -> Result<Update, Status> {
    let update = sparse::decode_update(payload, header.num_values as usize, layout, header.weight)
        .map_err(|e| Status::invalid_argument(format!("task `{}`: {e}", header.task_id)))?;
    if update.coord_weights.len() as u64 != header.num_coord_weights {
        return Err(Status::invalid_argument(format!(
            "task `{}`: the row-sparse update has {} coordinate weights, the header declares {}",
            header.task_id,
            update.coord_weights.len(),
            header.num_coord_weights
        )));
    }
    Ok(update)
}
