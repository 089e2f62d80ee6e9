//! Chunked model transfer, shared by the plain agent loop ([`crate::agent`])
//! and secure aggregation ([`crate::secure`]): the global model comes down as
//! a stream of `ModelChunk`s, an update goes up as one header chunk followed
//! by data chunks of at most [`UPLOAD_CHUNK_BYTES`].

use fedcart_common::federation::sparse::{self, RowPrecision, SparseError};
use fedcart_common::federation::update::WeightLayout;
use fedcart_common::train::TaskOutput;
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

/// Bytes per upload data chunk: the coordinator's limit for one chunk (its
/// decode limit leaves 64 KiB above it for framing), so an update of up to
/// half a million floats goes up as one message after its header.
pub const UPLOAD_CHUNK_BYTES: usize = 2 << 20;

/// Largest model the agent accepts, in bytes (256 M parameters). The task
/// announces the model's length; an absurd announcement is refused before
/// anything is allocated for it.
pub const MAX_MODEL_BYTES: u64 = 1 << 30;

/// Most values reserved for a download before its data arrives: the buffer
/// grows with the chunks actually received, never from the announcement alone.
const DOWNLOAD_PREALLOC: usize = 4 << 20;

/// Why a model download or an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The task announced a model larger than [`MAX_MODEL_BYTES`].
    #[error(
        "task `{task_id}` announces a model of {model_len} parameters, more than the {max} bytes an agent accepts"
    )]
    ModelTooLarge {
        /// The task whose model was announced.
        task_id: String,
        /// The announced number of f32 values.
        model_len: u64,
        /// [`MAX_MODEL_BYTES`].
        max: u64,
    },
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
    /// The model downloaded for a secure round is not the bytes whose
    /// digest its task named (and the agent would sign).
    #[error(
        "the model downloaded for task `{task_id}` does not match the digest the task names: the \
         coordinator served other values than it announced to the round, so this agent does not \
         train on them"
    )]
    Digest {
        /// The task whose model was downloaded.
        task_id: String,
    },
    /// The chunks add up to more than the task announced.
    #[error("model larger than the {expected} bytes announced")]
    TooLarge {
        /// Bytes the task announced.
        expected: usize,
    },
    /// A chunk does not hold whole little-endian f32 values.
    #[error("model chunk at offset {offset} has {len} bytes, not whole f32 values")]
    Misaligned {
        /// The chunk's offset.
        offset: u64,
        /// Its length in bytes.
        len: usize,
    },
    /// The stream ended before the announced length.
    #[error("model has {have} bytes, {expected} announced")]
    Short {
        /// Bytes received.
        have: usize,
        /// Bytes the task announced.
        expected: usize,
    },
    /// A row-sparse model download did not decode.
    #[error("row-sparse model of task `{task_id}`")]
    BadRows {
        /// The task whose model was downloaded.
        task_id: String,
        /// What is wrong with it.
        #[source]
        source: SparseError,
    },
    /// The upload failed: the coordinator refused the update, or the
    /// connection failed under it (said as "not delivered": "rejected" read
    /// as the coordinator refusing the merchant's data when nothing reached
    /// it; found by a fault probe).
    #[error("task `{task_id}`: update {}", upload_outcome(status))]
    Rejected {
        /// The task the update answered.
        task_id: String,
        /// The coordinator's answer.
        #[source]
        status: tonic::Status,
    },
}

/// How an upload that ended in `status` is told: "not delivered" when the
/// transport failed under it, else "rejected".
fn upload_outcome(status: &tonic::Status) -> &'static str {
    match status.code() {
        tonic::Code::Unavailable
        | tonic::Code::Cancelled
        | tonic::Code::Unknown
        | tonic::Code::DeadlineExceeded => "not delivered",
        _ => "rejected",
    }
}

impl TransferError {
    /// The task and the coordinator's answer when it refused the download or
    /// the update because the task is no longer open (it closed, timed out
    /// or was retried, or the operator stopped the run: `FAILED_PRECONDITION`):
    /// the task is over for this agent, not its session.
    pub fn task_closed(&self) -> Option<(&str, &tonic::Status)> {
        match self {
            Self::Download { task_id, status }
            | Self::Stream { task_id, status }
            | Self::Rejected { task_id, status }
                if status.code() == tonic::Code::FailedPrecondition =>
            {
                Some((task_id, status))
            }
            _ => None,
        }
    }

    /// The task and the coordinator's answer when it refused this agent's
    /// update itself: a value, length or metric it does not accept
    /// (`INVALID_ARGUMENT`, `OUT_OF_RANGE`). The coordinator rejects that
    /// update and its round goes on; so does the agent's session.
    /// Reconnecting cannot change the answer, and ending the session logged
    /// the refusal as a lost coordinator.
    pub fn update_refused(&self) -> Option<(&str, &tonic::Status)> {
        match self {
            Self::Rejected { task_id, status }
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::OutOfRange
                ) =>
            {
                Some((task_id, status))
            }
            _ => None,
        }
    }
}

/// What the agent already holds of a run's model, for row-sparse downloads.
#[derive(Debug, Clone, Copy)]
pub struct RowDownload<'a> {
    /// The model's weight layout (its rows).
    pub layout: &'a WeightLayout,
    /// The version held, the digest its task named and its values, if any.
    pub held: Option<(u64, &'a [u8], &'a [f32])>,
    /// Precision asked for the factor rows.
    pub precision: RowPrecision,
}

/// Whether `model` is the version `task` names: its digest is the task's
/// `model_digest` (a task without one names none).
pub fn is_named_model(task: &pb::TaskAssignment, model: &[f32]) -> bool {
    task.model_digest.is_empty()
        || fedcart_common::federation::update::model_digest(model).as_slice() == task.model_digest
}

/// Downloads the model named by `task`, checking offsets and total length.
pub async fn download(
    client: &mut CoordinatorClient<Channel>,
    session_id: &str,
    task: &pb::TaskAssignment,
) -> Result<Vec<f32>, TransferError> {
    download_rows(client, session_id, task, None).await
}

/// [`download`], asking for the rows changed since the held version (and
/// factor rows at `rows.precision`) when `rows` is given; the result is the
/// held copy with those rows applied.
pub async fn download_rows(
    client: &mut CoordinatorClient<Channel>,
    session_id: &str,
    task: &pb::TaskAssignment,
    rows: Option<RowDownload<'_>>,
) -> Result<Vec<f32>, TransferError> {
    let expected = task
        .model_len
        .checked_mul(4)
        .filter(|b| *b <= MAX_MODEL_BYTES)
        .ok_or_else(|| TransferError::ModelTooLarge {
            task_id: task.task_id.clone(),
            model_len: task.model_len,
            max: MAX_MODEL_BYTES,
        })? as usize;
    let req = pb::ModelRequest {
        session_id: session_id.into(),
        run_id: task.run_id.clone(),
        round: task.round,
        task_id: task.task_id.clone(),
        model_version: task.model_version,
        cached_version: rows.and_then(|r| r.held).map_or(0, |(v, _, _)| v),
        cached_digest: rows
            .and_then(|r| r.held)
            .map_or_else(Vec::new, |(_, d, _)| d.to_vec()),
        row_precision: match rows.map(|r| r.precision) {
            Some(RowPrecision::F16) => pb::RowPrecision::F16,
            Some(RowPrecision::Int8) => pb::RowPrecision::Int8,
            _ => pb::RowPrecision::F32,
        } as i32,
    };
    // A download refused for this agent's RPC rate is asked again, like an
    // upload: dropping out of the task instead would abort a round the
    // agent is selected for.
    let mut stream = while_busy(&task.task_id, "asking for the model", || {
        let (mut client, req) = (client.clone(), req.clone());
        async move { client.download_model(req).await }
    })
    .await
    .map_err(|status| TransferError::Download {
        task_id: task.task_id.clone(),
        status,
    })?
    .into_inner();
    // Each dense chunk is converted into the values as it arrives (the model
    // is never held as bytes as well); a row-sparse model is kept as bytes,
    // never larger than every row plus the row list.
    let mut values: Vec<f32> = Vec::with_capacity((expected / 4).min(DOWNLOAD_PREALLOC));
    let mut bytes: Vec<u8> = Vec::new();
    let mut have = 0usize;
    // The encoding and length the first chunk announces.
    let mut announced: Option<(i32, usize)> = None;
    let rows_cap = expected + 4 * rows.map_or(0, |r| r.layout.num_coord_weights) + 5;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|status| TransferError::Stream {
            task_id: task.task_id.clone(),
            status,
        })?
    {
        let (encoding, total) =
            *announced.get_or_insert((chunk.encoding, chunk.total_len as usize));
        let is_rows = encoding == pb::ModelEncoding::Rows as i32;
        let total_ok = if is_rows {
            rows.is_some() && total <= rows_cap
        } else {
            total == expected
        };
        if chunk.offset as usize != have
            || chunk.encoding != encoding
            || chunk.total_len as usize != total
            || !total_ok
        {
            return Err(TransferError::OutOfOrder {
                offset: chunk.offset,
                have,
                expected,
            });
        }
        if have + chunk.data.len() > total {
            return Err(TransferError::TooLarge { expected: total });
        }
        have += chunk.data.len();
        if is_rows {
            bytes.extend_from_slice(&chunk.data);
            continue;
        }
        if chunk.data.len() % 4 != 0 {
            return Err(TransferError::Misaligned {
                offset: chunk.offset,
                len: chunk.data.len(),
            });
        }
        values.extend(
            chunk
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    let (encoding, total) = announced.unwrap_or((pb::ModelEncoding::F32 as i32, expected));
    if have != total {
        return Err(TransferError::Short {
            have,
            expected: total,
        });
    }
    match rows {
        Some(r) if encoding == pb::ModelEncoding::Rows as i32 => {
            let mut model = match r.held {
                Some((_, _, held)) if held.len() == expected / 4 => held.to_vec(),
                _ => vec![0.0; expected / 4],
            };
            sparse::apply_model(&bytes, &mut model, r.layout).map_err(|source| {
                TransferError::BadRows {
                    task_id: task.task_id.clone(),
                    source,
                }
            })?;
            Ok(model)
        }
        _ => Ok(values),
    }
}

/// Uploads a task's plaintext result: the header (weight, metrics, payload
/// shape) and the update's little-endian `f32` payload.
pub async fn upload(
    client: &mut CoordinatorClient<Channel>,
    session_id: &str,
    task: &pb::TaskAssignment,
    out: &TaskOutput,
) -> Result<(), TransferError> {
    upload_as(client, session_id, task, out, None).await
}

/// [`upload`], sending a plaintext update as the rows it touched when
/// `layout` has rows and that form is smaller
/// (`PAYLOAD_ENCODING_ROWS_F32`).
pub async fn upload_as(
    client: &mut CoordinatorClient<Channel>,
    session_id: &str,
    task: &pb::TaskAssignment,
    out: &TaskOutput,
    layout: Option<&WeightLayout>,
) -> Result<(), TransferError> {
    let mut encoding = pb::PayloadEncoding::F32;
    let (payload, num_values, num_weights) = match &out.update {
        Some(u) => {
            let dense = 4 * (u.values.len() + u.coord_weights.len());
            let payload = match layout.and_then(|l| sparse::encode_update(u, l).ok()) {
                Some(rows) if rows.len() < dense => {
                    encoding = pb::PayloadEncoding::RowsF32;
                    rows
                }
                _ => u.payload_bytes(),
            };
            (payload, u.values.len() as u64, u.coord_weights.len() as u64)
        }
        None => (Vec::new(), 0, 0),
    };
    let header = pb::UpdateHeader {
        session_id: session_id.into(),
        run_id: task.run_id.clone(),
        round: task.round,
        task_id: task.task_id.clone(),
        encoding: encoding as i32,
        payload_len: payload.len() as u64,
        num_values,
        num_coord_weights: num_weights,
        weight: out.weight,
        metrics: out.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        failure: String::new(),
        lasting: false,
        validation_weight: Some(out.validation_weight),
    };
    submit_chunked(client, header, payload.into())
        .await
        .map_err(|status| TransferError::Rejected {
            task_id: task.task_id.clone(),
            status,
        })
}

/// The reason an agent gives for a task its privacy policy refuses, before
/// the setting that refused it ([`declined_by_policy`]).
pub const DECLINED_BY_POLICY: &str = "declined by the merchant's privacy policy";

/// The reason an agent gives for a task that `privacy.<setting>` of its
/// policy refuses: the setting (not its value, nor the merchant's ε) tells
/// the operator a spent budget (`max_epsilon`) from a round too small for
/// the others (`min_neighbours`), where all read alike.
pub fn declined_by_policy(setting: &str) -> String {
    format!("{DECLINED_BY_POLICY} (privacy.{setting})")
}

/// The reason an agent gives when its items cannot be placed in the run's
/// catalogue rows.
pub const UNMAPPED_ITEMS: &str = "the merchant's items cannot be mapped into the run's catalogue";

/// The reason an agent gives for leaving a secure round whose key
/// bindings it could not verify.
pub const KEY_BINDING_REFUSED: &str = "a roster key binding failed verification";

/// The reason an agent gives for leaving a secure round whose step it could
/// not carry out (a malformed or refused request).
pub const STEP_FAILED: &str = "a secure-aggregation step failed";

/// The reason an agent gives for leaving a secure round in which the share
/// bundle of agent `from` failed authentication
/// ([`fedcart_common::privacy::secagg::FORGED_SHARES`] and the number): the
/// coordinator sets the merchant so accused aside (its `Engine::accuse`).
pub fn forged_shares(from: u32) -> String {
    format!("{}{from}", fedcart_common::privacy::secagg::FORGED_SHARES)
}

/// Tells the coordinator that this agent's local task failed, with a fixed,
/// data-free `reason`: it counts the agent as dropped for the task at once
/// instead of waiting for the round's deadline. Nothing of the data or the
/// update is sent. `lasting`: every later task of the run would fail the
/// same way for this session, so the coordinator stops selecting it for
/// the run until it joins again.
pub async fn report_failure(
    client: &mut CoordinatorClient<Channel>,
    session_id: &str,
    (run_id, round, task_id): (&str, u64, &str),
    reason: &str,
    lasting: bool,
) -> Result<(), TransferError> {
    let header = pb::UpdateHeader {
        session_id: session_id.into(),
        run_id: run_id.into(),
        round,
        task_id: task_id.into(),
        failure: reason.into(),
        lasting,
        ..Default::default()
    };
    submit_chunked(client, header, bytes::Bytes::new())
        .await
        .map_err(|status| TransferError::Rejected {
            task_id: task_id.into(),
            status,
        })
}

/// The waits before each retry of an upload (or a model download) the coordinator refused as
/// `ResourceExhausted` (this agent's RPC rate, or another of its uploads
/// still in flight): 100 ms doubling, five retries, 3.1 s in all. Retrying
/// is safe: the coordinator refuses a second result for a task
/// (`AlreadyExists`), so an upload is never counted twice.
pub const BUSY_RETRY_MS: [u64; 5] = [100, 200, 400, 800, 1600];

/// Sends `header` then `payload` in chunks of [`UPLOAD_CHUNK_BYTES`] as one
/// `SubmitUpdate` call, again after [`BUSY_RETRY_MS`] while the coordinator
/// says it is busy; its last status is returned untouched so that callers
/// can tell a refusal from a broken connection. The chunks are slices of
/// `payload`, not copies.
pub async fn submit_chunked(
    client: &mut CoordinatorClient<Channel>,
    header: pb::UpdateHeader,
    payload: bytes::Bytes,
) -> Result<(), tonic::Status> {
    let task_id = header.task_id.clone();
    let mut chunks = vec![pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(header)),
    }];
    let mut start = 0;
    while start < payload.len() {
        let end = (start + UPLOAD_CHUNK_BYTES).min(payload.len());
        chunks.push(pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Data(payload.slice(start..end))),
        });
        start = end;
    }
    while_busy(&task_id, "sending the result", || {
        let (mut client, chunks) = (client.clone(), chunks.clone());
        async move { client.submit_update(futures::stream::iter(chunks)).await }
    })
    .await
    .map(|_| ())
}

/// Calls `call` (an RPC on a clone of the agent's client: a handle, not a
/// connection) again after each of [`BUSY_RETRY_MS`] while the coordinator
/// refuses it as `ResourceExhausted`; the last reply is returned untouched.
/// `doing` says what is tried again in the debug log.
async fn while_busy<T, Fut>(
    task_id: &str,
    doing: &str,
    mut call: impl FnMut() -> Fut,
) -> Result<T, tonic::Status>
where
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut waits = BUSY_RETRY_MS.iter();
    loop {
        match call().await {
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                let Some(&ms) = waits.next() else {
                    return Err(status);
                };
                tracing::debug!(task = %task_id, wait_ms = ms, message = status.message(),
                    "the coordinator is busy; {doing} again");
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            reply => return reply,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a refusal saying the task is no longer open ends the task alone;
    /// others (an unknown session after a coordinator restart, a refused
    /// identity) still end the session.
    #[test]
    fn a_task_is_closed_only_by_a_failed_precondition() {
        let closed = tonic::Status::failed_precondition("round 4 task `r4a1-train` is not open");
        let task_id = "r4a1-train".to_string();
        for e in [
            TransferError::Download {
                task_id: task_id.clone(),
                status: closed.clone(),
            },
            TransferError::Stream {
                task_id: task_id.clone(),
                status: closed.clone(),
            },
            TransferError::Rejected {
                task_id: task_id.clone(),
                status: closed.clone(),
            },
        ] {
            assert_eq!(e.task_closed().map(|(t, _)| t), Some("r4a1-train"));
        }
        for status in [
            tonic::Status::unauthenticated("unknown session"),
            tonic::Status::invalid_argument("bad update"),
        ] {
            let e = TransferError::Rejected {
                task_id: task_id.clone(),
                status,
            };
            assert!(e.task_closed().is_none());
        }
    }

    /// A connection that failed under an upload is "not delivered", not
    /// "rejected", which reads as the coordinator refusing the merchant's
    /// data (found by a fault probe).
    #[test]
    fn an_upload_lost_on_the_way_is_not_delivered_and_a_refused_one_rejected() {
        let shown = |status| {
            TransferError::Rejected {
                task_id: "r2a1-train".into(),
                status,
            }
            .to_string()
        };
        for status in [
            tonic::Status::unavailable("tcp connect error: Connection refused (os error 111)"),
            tonic::Status::unknown("http2 error: keep-alive timed out"),
            tonic::Status::cancelled("stream closed"),
        ] {
            assert_eq!(shown(status), "task `r2a1-train`: update not delivered");
        }
        assert_eq!(
            shown(tonic::Status::invalid_argument(
                "update value 3 is not finite"
            )),
            "task `r2a1-train`: update rejected"
        );
    }

    /// A refusal of the update itself ends that task's part for the agent,
    /// and only that; a closed task is told apart, and a refusal of who the
    /// agent is, or of its session, still ends the session (rejoining heals
    /// an unknown session; a refused identity stops the agent).
    #[test]
    fn a_refused_update_is_the_tasks_alone() {
        let rejected = |status| TransferError::Rejected {
            task_id: "r2a1-train".into(),
            status,
        };
        for status in [
            tonic::Status::invalid_argument("update value 3 is not finite (NaN)"),
            tonic::Status::out_of_range("payload has 12 bytes, the header declared 16"),
        ] {
            let e = rejected(status.clone());
            let (task, refusal) = e.update_refused().expect("the task's alone");
            assert_eq!((task, refusal.message()), ("r2a1-train", status.message()));
            assert!(e.task_closed().is_none());
        }
        for status in [
            tonic::Status::unauthenticated("unknown session"),
            tonic::Status::permission_denied("the certificate names another merchant"),
            tonic::Status::unavailable("connection reset"),
            tonic::Status::failed_precondition("task `r2a1-train` is not open"),
            // Its answer is already in: not a refusal of the update.
            tonic::Status::already_exists("agent `m1` already answered task `r2a1-train`"),
        ] {
            assert!(rejected(status).update_refused().is_none());
        }
        // A download refused so is not an update refused.
        let download = TransferError::Download {
            task_id: "r2a1-train".into(),
            status: tonic::Status::invalid_argument("bad request"),
        };
        assert!(download.update_refused().is_none());
    }

    /// A model is the version its task names only if its values hash to
    /// the task's digest; a task without a digest names none.
    #[test]
    fn a_model_is_checked_against_the_digest_its_task_names() {
        let model = [0.5f32, -1.0, 3.25];
        let task = pb::TaskAssignment {
            model_digest: fedcart_common::federation::update::model_digest(&model).to_vec(),
            ..Default::default()
        };
        assert!(is_named_model(&task, &model));
        for other in [
            &[0.5f32, -1.0, 3.5][..],
            &[0.5, -1.0],
            &[-0.0, 0.5, -1.0, 3.25],
        ] {
            assert!(!is_named_model(&task, other), "{other:?}");
        }
        assert!(is_named_model(&pb::TaskAssignment::default(), &[1.0]));
        // The digest is SHA-256 of the little-endian bytes.
        use sha2::Digest;
        let bytes = fedcart_common::federation::update::f32s_to_le(&model);
        assert_eq!(task.model_digest, sha2::Sha256::digest(&bytes).to_vec());
    }

    #[tokio::test]
    async fn an_absurd_model_length_is_refused_before_any_allocation() {
        // Never connected: the length is refused before the request is sent.
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let mut client = CoordinatorClient::new(channel);
        for model_len in [u64::MAX / 2, u64::MAX, MAX_MODEL_BYTES / 4 + 1] {
            let task = pb::TaskAssignment {
                task_id: "r1a1-train".into(),
                model_len,
                ..Default::default()
            };
            let err = download(&mut client, "s", &task).await.unwrap_err();
            assert!(
                matches!(err, TransferError::ModelTooLarge { .. }),
                "{model_len}: {err}"
            );
            assert!(err.to_string().contains("r1a1-train"), "{err}");
        }
    }
}
