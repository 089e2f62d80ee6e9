//! A raw protocol client: speaks fedcart.v1 message by message so tests can
//! send exactly the malformed, stale or duplicated input they need. Its
//! honest path uses the agent's own download/upload functions.

use fedcart_client::policy::PrivacyPolicy;
use fedcart_client::secure::{Reply, SecureTasks, send};
use fedcart_client::transfer::{download, upload};
use fedcart_common::privacy::secagg::stage_name;
use fedcart_common::task::TaskSpec;
use fedcart_common::train::{LocalData, TaskOutput, run_task};
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_client::CoordinatorClient;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// When a scripted secure agent disconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DieAt {
    /// After training, without advertising its keys.
    BeforeAdvertise,
    /// After sharing its keys, without sending its masked input.
    BeforeMaskedInput,
    /// Right after its masked input was accepted, before unmasking.
    AfterMaskedInput,
}

/// A hand-driven agent session.
pub struct RawAgent {
    /// The gRPC client.
    pub client: CoordinatorClient<Channel>,
    /// Our session token.
    pub session_id: String,
    /// The coordinator's run id.
    pub run_id: String,
    /// Local data for honest answers.
    pub data: LocalData,
    work: Streaming<pb::Work>,
}

impl RawAgent {
    /// Connects and joins as `data.merchant_id`.
    pub async fn join(addr: std::net::SocketAddr, data: LocalData) -> Self {
        let mut client = CoordinatorClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let req = pb::JoinRequest {
            merchant_id: data.merchant_id.clone(),
            examples: Default::default(),
            agent_version: "raw".into(),
        };
        let mut work = client.join(req).await.expect("join").into_inner();
        let Some(pb::Work {
            kind: Some(pb::work::Kind::Welcome(w)),
        }) = work.message().await.expect("welcome")
        else {
            panic!("expected a welcome first");
        };
        Self {
            client,
            session_id: w.session_id,
            run_id: w.run_id,
            data,
            work,
        }
    }

    /// Waits for the next pushed task, skipping pings.
    pub async fn next_task(&mut self) -> pb::TaskAssignment {
        loop {
            match self
                .work
                .message()
                .await
                .expect("work stream")
                .expect("stream open")
                .kind
            {
                Some(pb::work::Kind::Task(t)) => return t,
                _ => continue,
            }
        }
    }

    /// Answers every task honestly until the run ends or the stream closes
    /// (a scripted agent whose part is over, left to serve the rest of the
    /// run, say the evaluation that hands out its last version).
    pub async fn serve(mut self) {
        while let Ok(Some(work)) = self.work.message().await {
            let done = match work.kind {
                Some(pb::work::Kind::Task(task)) => self.answer(&task).await.is_err(),
                Some(pb::work::Kind::RunEnded(_)) => true,
                _ => false,
            };
            if done {
                return;
            }
        }
    }

    /// Waits for the next pushed secure-aggregation request, skipping pings.
    pub async fn next_secagg(&mut self) -> pb::SecAggRequest {
        loop {
            match self
                .work
                .message()
                .await
                .expect("work stream")
                .expect("stream open")
                .kind
            {
                Some(pb::work::Kind::Secagg(r)) => return r,
                _ => continue,
            }
        }
    }

    /// Waits for the next task, which must be secure, computes its update
    /// honestly and holds it in the agent's own protocol code, ready to
    /// answer the coordinator's stages.
    async fn hold_next_secure_task(&mut self) -> SecureTasks {
        let task = self.next_task().await;
        assert!(
            task.secure_aggregation,
            "task {} is not secure",
            task.task_id
        );
        let out = self.compute(&task).await;
        let spec: TaskSpec = serde_json::from_slice(&task.spec_json).expect("spec");
        // Plaintext loopback: no certificates to bind keys to.
        let mut secure = SecureTasks::with_policy(PrivacyPolicy::without_key_binding());
        secure.hold(&task, spec.seed, &self.data.merchant_id, None, out);
        secure
    }

    /// Takes part honestly in the next secure task, with the agent's own
    /// protocol code, and disconnects at `die`: before advertising its keys,
    /// just before answering the masked-input request, or just after its
    /// masked input was accepted.
    pub async fn secure_then_die(mut self, die: DieAt) {
        let mut secure = self.hold_next_secure_task().await;
        loop {
            let req = self.next_secagg().await;
            if req.stage == stage_name::ADVERTISE && die == DieAt::BeforeAdvertise {
                return;
            }
            let masked = req.stage == stage_name::MASKED_INPUT;
            if masked && die == DieAt::BeforeMaskedInput {
                return;
            }
            let reply = secure.respond(&self.session_id, &req).expect("honest step");
            send(&mut self.client, reply)
                .await
                .expect("answer accepted");
            if masked {
                return;
            }
        }
    }

    /// Takes part honestly in the next secure task until the coordinator
    /// asks it for `stage`, which it leaves unanswered; returns the agent,
    /// still in its session.
    pub async fn secure_until(mut self, stage: &str) -> Self {
        let mut secure = self.hold_next_secure_task().await;
        loop {
            let req = self.next_secagg().await;
            if req.stage == stage {
                return self;
            }
            let reply = secure.respond(&self.session_id, &req).expect("honest step");
            send(&mut self.client, reply)
                .await
                .expect("answer accepted");
        }
    }

    /// Reads the work stream, answering nothing, until the coordinator says
    /// the run ended (true) or the stream closes (false).
    pub async fn run_ended(mut self) -> bool {
        while let Ok(Some(work)) = self.work.message().await {
            if matches!(work.kind, Some(pb::work::Kind::RunEnded(_))) {
                return true;
            }
        }
        false
    }

    /// Takes part honestly in the next secure task, answering every
    /// secure-aggregation request, until `stop` turns true; returns the
    /// stages it was asked for, in order (what the coordinator sent it).
    pub async fn secure_logging_stages(mut self, mut stop: watch::Receiver<bool>) -> Vec<String> {
        let task = self.next_task().await;
        let out = self.compute(&task).await;
        let spec: TaskSpec = serde_json::from_slice(&task.spec_json).expect("spec");
        // Plaintext loopback: no certificates to bind keys to.
        let mut secure = SecureTasks::with_policy(PrivacyPolicy::without_key_binding());
        secure.hold(&task, spec.seed, &self.data.merchant_id, None, out);
        let mut stages = Vec::new();
        loop {
            let req = tokio::select! {
                req = self.next_secagg() => req,
                _ = stop.wait_for(|s| *s) => return stages,
            };
            stages.push(req.stage.clone());
            let reply = secure.respond(&self.session_id, &req).expect("honest step");
            send(&mut self.client, reply)
                .await
                .expect("answer accepted");
        }
    }

    /// Takes part in every secure task with the agent's own protocol code,
    /// but lowers (wrapping) the example-weight slot of each masked input it
    /// sends by 5,000 codes: an input no honest agent could produce, so the
    /// unmasked sum is out of range. Stops when `stop` turns true or the
    /// coordinator closes the session; returns how many masked inputs it sent.
    pub async fn secure_wrapping_weight(self, stop: watch::Receiver<bool>) -> usize {
        self.secure_tampering(stop, |_, reply| match reply {
            Reply::Masked { payload, .. } => {
                wrap_weight_slot(payload, 5_000);
                true
            }
            Reply::Message(_) => false,
        })
        .await
    }

    /// Takes part in every secure task with the agent's own protocol code,
    /// but flips a byte of every share bundle it sends its neighbours, so
    /// that none of them can open its shares (and no one could rebuild its
    /// masks). Stops when `stop` turns true or the coordinator closes the
    /// session; returns how many share uploads it forged.
    pub async fn secure_forging_shares(self, stop: watch::Receiver<bool>) -> usize {
        use fedcart_common::privacy::secagg::ShareUpload;
        self.secure_tampering(stop, |req, reply| match reply {
            Reply::Message(msg) if req.stage == stage_name::SHARE_KEYS => {
                let mut upload = ShareUpload::from_bytes(&msg.body).expect("our upload");
                for bundle in &mut upload.shares {
                    bundle.ciphertext[0] ^= 0x5a;
                }
                msg.body = upload.to_bytes();
                true
            }
            _ => false,
        })
        .await
    }

    /// Takes part in every secure task honestly, except that its masked
    /// input first goes out 8 bytes too long (the declared length too), then,
    /// with `resend`, as it should. Stops when `stop` turns true or the
    /// coordinator closes the session; returns the coordinator's answers to
    /// the uploads of each masked input.
    #[allow(clippy::type_complexity)]
    pub async fn secure_uploading_a_bad_masked_input_first(
        mut self,
        mut stop: watch::Receiver<bool>,
        resend: bool,
    ) -> Vec<(Result<(), tonic::Status>, Option<Result<(), tonic::Status>>)> {
        let mut secure = SecureTasks::with_policy(PrivacyPolicy::without_key_binding());
        let mut answers = Vec::new();
        while let Some(kind) = self.next_work(&mut stop).await {
            match kind {
                // The run's closing evaluation is plaintext: answered, so
                // that it does not wait out its deadline.
                pb::work::Kind::Task(task) if !task.secure_aggregation => {
                    let _ = self.answer(&task).await;
                }
                pb::work::Kind::Task(task) => self.hold(&mut secure, &task).await,
                pb::work::Kind::Secagg(req) => {
                    let Ok(reply) = secure.respond(&self.session_id, &req) else {
                        continue;
                    };
                    match reply {
                        Reply::Masked { header, payload } => {
                            let mut long_header = header.clone();
                            long_header.payload_len += 8;
                            let mut long = payload.clone();
                            long.extend_from_slice(&[0; 8]);
                            let bad = send(
                                &mut self.client,
                                Reply::Masked {
                                    header: long_header,
                                    payload: long,
                                },
                            )
                            .await;
                            let good = if resend {
                                Some(
                                    send(&mut self.client, Reply::Masked { header, payload }).await,
                                )
                            } else {
                                // Gives up on the task, so that the stage
                                // does not wait out its deadline.
                                let failed = pb::UpdateHeader {
                                    session_id: header.session_id.clone(),
                                    run_id: header.run_id.clone(),
                                    round: header.round,
                                    task_id: header.task_id.clone(),
                                    failure: "the upload broke".into(),
                                    ..Default::default()
                                };
                                let _ = self.send_raw(failed, Vec::new()).await;
                                None
                            };
                            answers.push((bad, good));
                        }
                        other => {
                            let _ = send(&mut self.client, other).await;
                        }
                    }
                }
                _ => {}
            }
        }
        answers
    }

    /// Takes part in every secure task honestly but for the unmask stage,
    /// where every share it reveals (of survivors' self-mask seeds and of
    /// dropped agents' keys) has its bytes past the x-coordinate flipped.
    /// Stops when `stop` turns true or the coordinator closes the session;
    /// returns the answers it forged.
    pub async fn secure_forging_unmask_shares(self, stop: watch::Receiver<bool>) -> usize {
        use fedcart_common::privacy::secagg::UnmaskResponse;
        self.secure_tampering(stop, |req, reply| match reply {
            Reply::Message(msg) if req.stage == stage_name::UNMASK => {
                let mut response = UnmaskResponse::from_bytes(&msg.body).expect("our answer");
                for (_, share) in response
                    .self_mask_shares
                    .iter_mut()
                    .chain(&mut response.pairwise_shares)
                {
                    for b in &mut share[1..] {
                        *b ^= 0x5a;
                    }
                }
                msg.body = response.to_bytes();
                true
            }
            _ => false,
        })
        .await
    }

    /// Takes part in every secure task honestly, and right after its masked
    /// input accuses each of agents `0..n` of the round (itself included) of
    /// forged shares, one failure header each: the flood by which one
    /// merchant set every honest one aside. Stops when `stop` turns true or
    /// the coordinator closes the session; returns the accusations sent.
    pub async fn secure_accusing_everyone(
        mut self,
        mut stop: watch::Receiver<bool>,
        n: u32,
    ) -> usize {
        use fedcart_common::privacy::secagg::FORGED_SHARES;
        let mut secure = SecureTasks::with_policy(PrivacyPolicy::without_key_binding());
        let mut current: Option<pb::TaskAssignment> = None;
        let mut sent = 0;
        while let Some(kind) = self.next_work(&mut stop).await {
            match kind {
                pb::work::Kind::Task(task) => {
                    self.hold(&mut secure, &task).await;
                    current = Some(task);
                }
                pb::work::Kind::Secagg(req) => {
                    let Ok(reply) = secure.respond(&self.session_id, &req) else {
                        continue;
                    };
                    let _ = send(&mut self.client, reply).await;
                    let Some(task) = current
                        .as_ref()
                        .filter(|_| req.stage == stage_name::MASKED_INPUT)
                    else {
                        continue;
                    };
                    for i in 0..n {
                        let header = pb::UpdateHeader {
                            session_id: self.session_id.clone(),
                            run_id: task.run_id.clone(),
                            round: task.round,
                            task_id: task.task_id.clone(),
                            failure: format!("{FORGED_SHARES}{i}"),
                            ..Default::default()
                        };
                        let _ = self.send_raw(header, Vec::new()).await;
                        sent += 1;
                    }
                }
                _ => {}
            }
        }
        sent
    }

    /// The next work message, or `None` once `stop` turns true or the
    /// coordinator closes the session.
    async fn next_work(&mut self, stop: &mut watch::Receiver<bool>) -> Option<pb::work::Kind> {
        let message = tokio::select! {
            m = self.work.message() => m,
            _ = stop.wait_for(|s| *s) => return None,
        };
        match message {
            Ok(Some(pb::Work { kind })) => kind,
            _ => None,
        }
    }

    /// Computes `task` and holds its output for the secure stages.
    async fn hold(&mut self, secure: &mut SecureTasks, task: &pb::TaskAssignment) {
        let out = self.compute(task).await;
        let spec: TaskSpec = serde_json::from_slice(&task.spec_json).expect("spec");
        secure.hold(task, spec.seed, &self.data.merchant_id, None, out);
    }

    /// Takes part in every secure task with the agent's own protocol code,
    /// passing each answer through `tamper` before it is sent, until `stop`
    /// turns true or the coordinator closes the session; returns how many
    /// answers `tamper` changed (it says so by returning true).
    async fn secure_tampering(
        mut self,
        mut stop: watch::Receiver<bool>,
        mut tamper: impl FnMut(&pb::SecAggRequest, &mut Reply) -> bool,
    ) -> usize {
        let mut secure = SecureTasks::with_policy(PrivacyPolicy::without_key_binding());
        let mut tampered = 0;
        while let Some(kind) = self.next_work(&mut stop).await {
            match kind {
                pb::work::Kind::Task(task) => self.hold(&mut secure, &task).await,
                pb::work::Kind::Secagg(req) => {
                    let Ok(mut reply) = secure.respond(&self.session_id, &req) else {
                        continue;
                    };
                    if tamper(&req, &mut reply) {
                        tampered += 1;
                    }
                    // A refused answer is the coordinator's, not ours.
                    let _ = send(&mut self.client, reply).await;
                }
                _ => {}
            }
        }
        tampered
    }

    /// Carries out `task` honestly and returns the output without sending it.
    pub async fn compute(&mut self, task: &pb::TaskAssignment) -> TaskOutput {
        let spec: TaskSpec = serde_json::from_slice(&task.spec_json).expect("spec");
        let global = if task.model_len > 0 {
            download(&mut self.client, &self.session_id, task)
                .await
                .expect("download")
        } else {
            Vec::new()
        };
        run_task(&spec, &global, &mut self.data).expect("local task")
    }

    /// Carries out `task` honestly and uploads the result.
    pub async fn answer(&mut self, task: &pb::TaskAssignment) -> anyhow::Result<()> {
        let out = self.compute(task).await;
        Ok(upload(&mut self.client, &self.session_id, task, &out).await?)
    }

    /// The header an honest upload of `out` for `task` would carry.
    pub fn header(&self, task: &pb::TaskAssignment, out: &TaskOutput) -> pb::UpdateHeader {
        let u = out.update.as_ref().expect("an update");
        pb::UpdateHeader {
            session_id: self.session_id.clone(),
            run_id: task.run_id.clone(),
            round: task.round,
            task_id: task.task_id.clone(),
            encoding: pb::PayloadEncoding::F32 as i32,
            payload_len: 4 * (u.values.len() + u.coord_weights.len()) as u64,
            num_values: u.values.len() as u64,
            num_coord_weights: u.coord_weights.len() as u64,
            weight: out.weight,
            metrics: Default::default(),
            failure: String::new(),
            lasting: false,
            validation_weight: Some(out.validation_weight),
        }
    }

    /// Sends a header and payload chunks exactly as given.
    pub async fn send_raw(
        &mut self,
        header: pb::UpdateHeader,
        chunks: Vec<Vec<u8>>,
    ) -> Result<pb::SubmitReply, Status> {
        let mut msgs = vec![pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Header(header)),
        }];
        msgs.extend(chunks.into_iter().map(|c| pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Data(c.into())),
        }));
        self.client
            .submit_update(futures::stream::iter(msgs))
            .await
            .map(|r| r.into_inner())
    }
}

/// Lowers, wrapping in the round's modulus, the example-weight slot of a
/// masked-input frame (tag, version, sender u32, modulus bits u8, count u32,
/// then `count` little-endian coordinates; the weight is the last but one).
fn wrap_weight_slot(frame: &mut [u8], by: u64) {
    let bits = u32::from(frame[6]);
    let count = u32::from_le_bytes(frame[7..11].try_into().expect("4 bytes")) as usize;
    let width = bits.div_ceil(8) as usize;
    let at = 11 + (count - 2) * width;
    let slot = &mut frame[at..at + width];
    let mut word = [0u8; 8];
    word[..width].copy_from_slice(slot);
    let mask = u64::MAX >> (64 - bits);
    let wrapped = u64::from_le_bytes(word).wrapping_sub(by) & mask;
    slot.copy_from_slice(&wrapped.to_le_bytes()[..width]);
}
