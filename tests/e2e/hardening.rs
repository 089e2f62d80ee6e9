//! Service hardening against a selected but malicious merchant: header-only
//! uploads cannot starve the upload slots, and oversized or numerous metric
//! names are refused without growing the round record or the Prometheus
//! series. And for an honest one: an upload refused for the RPC rate is sent
//! again.

use std::time::Duration;

use fedcart_common::federation::update::f32s_to_le;
use fedcart_common::task::TaskKind;
use fedcart_coordinator::limits::Limits;
use fedcart_coordinator::record::Outcome;
use fedcart_coordinator::server::{Running, ServeOptions, start_with};
use fedcart_coordinator::tls::Transport;
use fedcart_proto::v1 as pb;
use fedcart_tests::raw::RawAgent;
use fedcart_tests::*;
use tokio::net::TcpListener;
use tonic::Code;

/// A plaintext coordinator with an HTTP listener, no RPC rate limit (all
/// agents share one address) and the given upload idle timeout.
async fn start_plain(
    store: &std::path::Path,
    run: fedcart_coordinator::config::RunConfig,
    idle: Duration,
) -> Running {
    let limits = Limits {
        upload_idle_timeout: idle,
        ..Limits::loopback()
    };
    start_limited(store, run, limits).await
}

/// A plaintext coordinator with an HTTP listener and `limits`.
async fn start_limited(
    store: &std::path::Path,
    run: fedcart_coordinator::config::RunConfig,
    limits: Limits,
) -> Running {
    init_logs();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = ServeOptions {
        transport: Transport::Insecure,
        http: Some(http),
        http_token: None,
        limits,
    };
    start_with(listener, store, run, Duration::from_millis(500), opts)
        .await
        .expect("coordinator starts")
}

/// Opens a `SubmitUpdate` stream that sends `header` and then nothing, and
/// keeps it open until the coordinator ends it.
fn header_only(
    agent: &RawAgent,
    header: pb::UpdateHeader,
) -> tokio::task::JoinHandle<Result<pb::SubmitReply, tonic::Status>> {
    let mut client = agent.client.clone();
    tokio::spawn(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Header(header)),
        })
        .await
        .unwrap();
        let reply = client
            .submit_update(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner());
        drop(tx);
        reply
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_only_uploads_cannot_starve_an_honest_upload() {
    let split = telco_split(3, 5);
    let dir = tempfile::tempdir().unwrap();
    let mut run = churn_run("e2e-slowloris", 1, 3, 1);
    run.evaluate = false;
    let coord = start_plain(&dir.path().join("c.redb"), run, Duration::from_secs(5)).await;
    let mut honest = RawAgent::join(coord.addr, load_merchant("honest", &split.files[0])).await;
    let mut a = RawAgent::join(coord.addr, load_merchant("attacker-a", &split.files[1])).await;
    let mut b = RawAgent::join(coord.addr, load_merchant("attacker-b", &split.files[2])).await;
    let task = honest.next_task().await;
    assert!(task.task_id.ends_with("-stats"));
    let (ta, tb) = (a.next_task().await, b.next_task().await);
    let (out_a, out_b) = (a.compute(&ta).await, b.compute(&tb).await);

    // Four header-only streams, as many as there are upload slots: three
    // from one merchant, one from another.
    let mut streams: Vec<_> = (0..3)
        .map(|_| header_only(&a, a.header(&ta, &out_a)))
        .collect();
    streams.push(header_only(&b, b.header(&tb, &out_b)));
    let mut progress = coord.progress.clone();
    tokio::time::timeout(
        Duration::from_secs(30),
        progress.wait_for(|p| p.uploads == 2),
    )
    .await
    .expect("one upload per attacker is in flight")
    .unwrap();

    // The honest upload goes through while the attackers' streams are open.
    tokio::time::timeout(Duration::from_secs(30), honest.answer(&task))
        .await
        .expect("the honest upload is not starved")
        .expect("the honest upload is accepted");

    let mut codes = Vec::new();
    for s in streams {
        let status = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("the coordinator ends a silent upload")
            .unwrap()
            .expect_err("a header-only upload is refused");
        codes.push(status.code());
    }
    codes.sort_by_key(|c| *c as i32);
    assert_eq!(
        codes,
        [
            Code::DeadlineExceeded,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::ResourceExhausted
        ],
        "one upload in flight per merchant; silent ones are cut"
    );
    // The attackers hang up; the round commits with the honest result.
    drop((a, b));
    progress
        .wait_for(|p| p.records >= 1)
        .await
        .expect("the stats task closes");
    let stats = coord.shared.history().unwrap().remove(0);
    assert_eq!(stats.kind, TaskKind::Stats);
    assert_eq!(stats.outcome, Outcome::Committed, "{stats:?}");
    assert_eq!(stats.reported, vec!["honest".to_string()]);
    coord.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metrics_are_refused_and_records_and_series_stay_bounded() {
    let split = telco_split(2, 5);
    let dir = tempfile::tempdir().unwrap();
    // Quorum one: evil's refused update is its last, and good's commits.
    let mut run = churn_run("e2e-metrics", 1, 2, 1);
    run.evaluate = false;
    let coord = start_plain(&dir.path().join("c.redb"), run, Duration::from_secs(30)).await;
    let http = coord.http_addr.unwrap();
    let mut evil = RawAgent::join(coord.addr, load_merchant("evil", &split.files[0])).await;
    let mut good = RawAgent::join(coord.addr, load_merchant("good", &split.files[1])).await;
    for agent in [&mut evil, &mut good] {
        let stats = agent.next_task().await;
        agent.answer(&stats).await.unwrap();
    }
    let task = evil.next_task().await;
    let good_task = good.next_task().await;
    assert!(task.task_id.ends_with("-train"));
    let out = evil.compute(&task).await;
    let header = evil.header(&task, &out);
    let update = out.update.clone().unwrap();
    let payload = update.payload_bytes();

    // A metric name of almost 2 MiB (the largest message the coordinator
    // decodes), with a NaN value so that it would be refused and recorded.
    let mut huge = header.clone();
    huge.metrics = [("k".repeat((2 << 20) - 4096), f64::NAN)].into();
    // Refused on the header, before the task is looked at: not recorded.
    for _ in 0..20 {
        let err = evil
            .send_raw(huge.clone(), vec![payload.clone()])
            .await
            .expect_err("a huge metric name is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().len() < 300,
            "the status does not echo the name"
        );
    }
    // Thousands of metric names.
    let mut many = header.clone();
    many.metrics = (0..5_000).map(|i| (format!("metric_{i}"), 1.0)).collect();
    let err = evil
        .send_raw(many, vec![payload.clone()])
        .await
        .expect_err("thousands of metrics are refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("5000 metrics"), "{}", err.message());
    // A NaN update is refused and recorded, and is evil's last: nothing it
    // sends after is taken or recorded.
    let mut values = update.values.clone();
    values[0] = f32::NAN;
    for attempt in 0..100 {
        let err = evil
            .send_raw(header.clone(), vec![f32s_to_le(&values)])
            .await
            .expect_err("a NaN update is refused");
        let code = if attempt == 0 {
            Code::InvalidArgument
        } else {
            Code::FailedPrecondition
        };
        assert_eq!(err.code(), code, "{}", err.message());
    }
    let err = evil
        .send_raw(header, vec![payload])
        .await
        .expect_err("no update after a refused one");
    assert!(err.message().contains("was refused"), "{}", err.message());
    good.answer(&good_task).await.unwrap();
    // The evaluation that hands out the trained version.
    for agent in [&mut evil, &mut good] {
        let task = agent.next_task().await;
        assert!(task.task_id.ends_with("-evaluate"), "{}", task.task_id);
        agent.answer(&task).await.unwrap();
    }

    let mut progress = coord.progress.clone();
    progress.wait_for(|p| p.finished).await.unwrap();
    let train = coord
        .shared
        .history()
        .unwrap()
        .into_iter()
        .find(|r| r.kind == TaskKind::Train)
        .unwrap();
    assert_eq!(train.outcome, Outcome::Committed);
    assert_eq!(train.reported, ["good"]);
    assert_eq!(train.rejected.len(), 1, "{:?}", train.rejected);
    let size = serde_json::to_vec(&train).unwrap().len();
    assert!(size < 64 * 1024, "the round record holds {size} bytes");
    let page = crate::security::http_get(http, "/metrics").await;
    let series = page
        .lines()
        .filter(|l| l.starts_with("fedcart_round_metric{run=\"e2e-metrics\""))
        .count();
    assert!(
        (1..=fedcart_coordinator::observe::MAX_METRIC_SERIES).contains(&series),
        "{series} round-metric series"
    );
    coord.shutdown().await.unwrap();
}

/// A round metric the latest evaluation does not have (undefined there,
/// e.g. a precision without positive predictions) is exported as NaN: the
/// gauge kept an earlier round's figure beside the latest round's others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_metric_the_latest_round_lacks_is_nan_in_metrics() {
    let split = telco_split(1, 5);
    let dir = tempfile::tempdir().unwrap();
    let coord = start_plain(
        &dir.path().join("c.redb"),
        churn_run("metric-gone", 2, 1, 1),
        Duration::from_secs(30),
    )
    .await;
    let http = coord.http_addr.unwrap();
    let mut agent = RawAgent::join(coord.addr, load_merchant("m", &split.files[0])).await;
    let mut progress = coord.progress.clone();
    loop {
        let task = tokio::select! {
            t = agent.next_task() => t,
            _ = progress.wait_for(|p| p.finished) => break,
        };
        if task.task_id == "r1a1-evaluate" {
            // The first evaluation reports one metric more.
            let out = agent.compute(&task).await;
            let mut header = agent.header(&task, &out);
            header.metrics = out.metrics.clone().into_iter().collect();
            header.metrics.insert("probe".into(), 0.25);
            let payload = out.update.as_ref().unwrap().payload_bytes();
            agent.send_raw(header, vec![payload]).await.unwrap();
        } else {
            agent.answer(&task).await.unwrap();
        }
    }
    let page = crate::security::http_get(http, "/metrics").await;
    let gauge = |metric: &str| {
        let prefix = format!(
            "fedcart_round_metric{{run=\"metric-gone\",kind=\"evaluate\",metric=\"{metric}\"}} "
        );
        page.lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {metric} gauge in\n{page}"))
    };
    assert_eq!(gauge("probe"), "NaN");
    assert!(gauge("auc").parse::<f64>().unwrap().is_finite());
    // Every family says what it is (none had a `# HELP` line).
    for family in page.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap();
        assert!(
            page.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{page}"
        );
    }
    coord.shutdown().await.unwrap();
}

/// An agent over its RPC rate has its result (or its model download)
/// refused as `ResourceExhausted` and asks again after a backoff
/// (`transfer::BUSY_RETRY_MS`), so a burst of RPCs costs it a wait, not its
/// place in the round (a refused download used to drop the agent out of
/// the evaluation after the round, attempt after attempt). The bucket
/// holds fewer RPCs than the agent makes up to its training upload and
/// refills at one token per 2 s: that upload is refused, and only a retry
/// gets in (without retries the agent's session ends and the round aborts
/// attempt after attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_refused_for_the_rpc_rate_is_sent_again_and_counts() {
    let split = telco_split(1, 5);
    let dir = tempfile::tempdir().unwrap();
    let mut run = churn_run("e2e-busy", 1, 1, 1);
    run.evaluate = false;
    let limits = Limits {
        rpcs_per_second: 0.5,
        rpc_burst: 3.0,
        ..Limits::loopback()
    };
    let coord = start_limited(&dir.path().join("c.redb"), run, limits).await;
    let agent = spawn_agent(coord.addr, load_merchant("m0", &split.files[0]));
    let (_shared, history) = finish(coord, vec![agent]).await;
    // The statistics task, the training round and the evaluation that hands
    // out its version all committed with the agent's result, the uploads
    // retried until a token came.
    assert_eq!(history.len(), 3, "{history:?}");
    for r in &history {
        assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
        assert_eq!(r.reported, vec!["m0"], "{r:?}");
    }
}
