//! Chunked model transfer, shared by the plain agent loop ([`crate::agent`])
//! and secure aggregation ([`crate::secure`]): the global model comes down as
//! a stream of `ModelChunk`s, an update goes up as one header chunk followed
//! by data chunks of at most [`UPLOAD_CHUNK_BYTES`].

use fedcart_common::train::TaskOutput;
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

/// Bytes per upload data chunk. gRPC refuses messages above 4 MiB by default
/// and the coordinator accepts upload chunks of at most 2 MiB, so 1 MiB
/// leaves room for framing while keeping the number of messages small.
pub const UPLOAD_CHUNK_BYTES: usize = 1 << 20;

/// Why a model download or an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The coordinator refused to start the download.
    #[error("download model for task `{task_id}`")]
    Download {
        /// The task whose model was asked for.
        task_id: String,
        /// The coordinator's answer.
        #[source]
        status: tonic::Status,
    },
    /// The model stream broke part-way.
    #[error("model stream of task `{task_id}`")]
    Stream {
        /// The task whose model was being downloaded.
        task_id: String,
        /// The stream's error.
        #[source]
        status: tonic::Status,
    },
    /// A chunk did not continue where the previous one ended, or announced
    /// another total length than the task did.
    #[error("model chunk at offset {offset} (have {have} of {expected} bytes) is out of order")]
    OutOfOrder {
        /// The chunk's offset.
        offset: u64,
        /// Bytes received so far.
        have: usize,
        /// Bytes the task announced.
        expected: usize,
    },
    /// The chunks add up to more than the task announced.
    #[error("model larger than the {expected} bytes announced")]
    TooLarge {
        /// Bytes the task announced.
        expected: usize,
    },
    /// The stream ended before the announced length.
    #[error("model has {have} bytes, {expected} announced")]
    Short {
        /// Bytes received.
        have: usize,
        /// Bytes the task announced.
        expected: usize,
    },
    /// The coordinator refused the uploaded update.
    #[error("task `{task_id}`: update rejected")]
    Rejected {
        /// The task the update answered.
        task_id: String,
        /// The coordinator's answer.
        #[source]
        status: tonic::Status,
    },
}

/// Downloads the model named by `task`, checking offsets and total length.
pub async fn download(
    client: &mut CoordinatorClient<Channel>,
    session_id: &str,
    task: &pb::TaskAssignment,
) -> Result<Vec<f32>, TransferError> {
    let req = pb::ModelRequest {
        session_id: session_id.into(),
        run_id: task.run_id.clone(),
        round: task.round,
        task_id: task.task_id.clone(),
        model_version: task.model_version,
    };
    let mut stream = client
        .download_model(req)
        .await
        .map_err(|status| TransferError::Download {
            task_id: task.task_id.clone(),
            status,
        })?
        .into_inner();
    let expected = task.model_len as usize * 4;
    let mut bytes = Vec::with_capacity(expected);
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|status| TransferError::Stream {
            task_id: task.task_id.clone(),
            status,
        })?
    {
        if chunk.offset as usize != bytes.len() || chunk.total_len as usize != expected {
            return Err(TransferError::OutOfOrder {
                offset: chunk.offset,
                have: bytes.len(),
                expected,
            });
        }
        if bytes.len() + chunk.data.len() > expected {
            return Err(TransferError::TooLarge { expected });
        }
        bytes.extend_from_slice(&chunk.data);
    }
    if bytes.len() != expected {
        return Err(TransferError::Short {
            have: bytes.len(),
            expected,
        });
    }
    Ok(fedcart_common::federation::update::f32s_from_le(&bytes))
}

/// Uploads a task's plaintext result: the header (weight, metrics, payload
/// shape) and the update's little-endian `f32` payload.
pub async fn upload(
    client: &mut CoordinatorClient<Channel>,
    session_id: &str,
    task: &pb::TaskAssignment,
    out: &TaskOutput,
) -> Result<(), TransferError> {
    let (payload, num_values, num_weights) = match &out.update {
        Some(u) => (
            u.payload_bytes(),
            u.values.len() as u64,
            u.coord_weights.len() as u64,
        ),
        None => (Vec::new(), 0, 0),
    };
    let header = pb::UpdateHeader {
        session_id: session_id.into(),
        run_id: task.run_id.clone(),
        round: task.round,
        task_id: task.task_id.clone(),
        encoding: pb::PayloadEncoding::F32 as i32,
        payload_len: payload.len() as u64,
        num_values,
        num_coord_weights: num_weights,
        weight: out.weight,
        metrics: out.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    };
    submit_chunked(client, header, &payload)
        .await
        .map_err(|status| TransferError::Rejected {
            task_id: task.task_id.clone(),
            status,
        })
}

/// Sends `header` then `payload` in chunks of [`UPLOAD_CHUNK_BYTES`] as one
/// `SubmitUpdate` call; the coordinator's status is returned untouched so
/// that callers can tell a refusal from a broken connection.
pub async fn submit_chunked(
    client: &mut CoordinatorClient<Channel>,
    header: pb::UpdateHeader,
    payload: &[u8],
) -> Result<(), tonic::Status> {
    let mut chunks = vec![pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(header)),
    }];
    chunks.extend(payload.chunks(UPLOAD_CHUNK_BYTES).map(|c| pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Data(c.to_vec())),
    }));
    client
        .submit_update(futures::stream::iter(chunks))
        .await
        .map(|_| ())
}
