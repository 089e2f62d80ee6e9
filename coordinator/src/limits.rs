//! Hardening limits and the interceptor that enforces identity and a
//! per-agent request rate before any handler runs.
//!
//! Message sizes are bounded by the service's decode limit (one upload chunk
//! plus headroom); every RPC has a deadline (`rpc_timeout`, which for the
//! client-streamed upload covers the whole stream); each connection may run
//! only a few RPCs at once; and each merchant identity (or, in plaintext
//! mode, each remote IP) gets a token bucket of RPCs. An upload must keep
//! moving (`upload_idle_timeout`), and the metrics an agent reports are
//! capped in number and name length ([`check_metrics`]), since every metric
//! name becomes part of a round record and a Prometheus series.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Request, Status};

use crate::identity::{Access, AccessInterceptor};

/// Per-agent and per-RPC limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Deadline of each RPC up to its response (the whole upload for `SubmitUpdate`).
    pub rpc_timeout: Duration,
    /// Concurrent RPCs on one connection.
    pub concurrent_rpcs_per_connection: usize,
    /// Largest HTTP/2 header list accepted.
    pub max_header_bytes: u32,
    /// Sustained RPCs per second per agent.
    pub rpcs_per_second: f64,
    /// Burst of RPCs an agent may make above the sustained rate.
    pub rpc_burst: f64,
    /// Longest silence inside an upload — before its header, between two
    /// chunks — before it is cut with `DEADLINE_EXCEEDED`; the whole payload
    /// must also arrive within one such timeout per 1 MiB chunk (plus one).
    /// Without it a stream that sends a header and then nothing would hold
    /// its merchant's upload until `rpc_timeout`.
    pub upload_idle_timeout: Duration,
}

/// Most rejections a task's round record lists: an agent may retry after a
/// refusal, so without a cap its refusals would grow the record (and the
/// coordinator's memory) for as long as the round is open. The last entry
/// then says that further ones were not recorded.
pub const MAX_REJECTIONS: usize = 64;

/// Longest rejection reason kept in a round record, in characters.
pub const MAX_REJECTION_CHARS: usize = 256;

/// Most metrics one result may report. Agents send a handful (loss, AUC,
/// RMSE, …); each distinct name is kept in the round record and becomes a
/// Prometheus series, so the number must be bounded.
pub const MAX_METRICS: usize = 64;

/// Longest metric name, in bytes.
pub const MAX_METRIC_NAME_BYTES: usize = 64;

/// Refuses a result whose metrics exceed [`MAX_METRICS`] or
/// [`MAX_METRIC_NAME_BYTES`], before anything of it is stored; the status
/// shows at most the start of an offending name.
pub fn check_metrics(metrics: &HashMap<String, f64>) -> Result<(), Status> {
    if metrics.len() > MAX_METRICS {
        return Err(Status::invalid_argument(format!(
            "{} metrics reported, at most {MAX_METRICS} are accepted",
            metrics.len()
        )));
    }
    if let Some(name) = metrics.keys().find(|k| k.len() > MAX_METRIC_NAME_BYTES) {
        let shown: String = name.chars().take(32).collect();
        return Err(Status::invalid_argument(format!(
            "metric name `{shown}…` is {} bytes long, at most {MAX_METRIC_NAME_BYTES} are accepted",
            name.len()
        )));
    }
    // Names reach the operator's terminal (`status`) and the log: an escape
    // sequence in one would be played there.
    if metrics.keys().any(|k| k.chars().any(char::is_control)) {
        return Err(Status::invalid_argument(
            "a metric name contains control characters",
        ));
    }
    Ok(())
}

/// Most data families an agent may advertise when it joins.
pub const MAX_FAMILIES: usize = 16;

/// Refuses a join whose advertised example counts (`JoinRequest.examples`)
/// exceed [`MAX_FAMILIES`] families or [`MAX_METRIC_NAME_BYTES`] per name,
/// before anything of it is kept or logged; returns the counts as one short
/// line for the log.
pub fn check_examples(examples: &HashMap<String, u64>) -> Result<String, Status> {
    if examples.len() > MAX_FAMILIES {
        return Err(Status::invalid_argument(format!(
            "{} data families advertised, at most {MAX_FAMILIES} are accepted",
            examples.len()
        )));
    }
    if let Some(name) = examples.keys().find(|k| k.len() > MAX_METRIC_NAME_BYTES) {
        let shown: String = name.chars().take(32).collect();
        return Err(Status::invalid_argument(format!(
            "data family name `{shown}…` is {} bytes long, at most {MAX_METRIC_NAME_BYTES} are \
             accepted",
            name.len()
        )));
    }
    if examples.keys().any(|k| k.chars().any(char::is_control)) {
        return Err(Status::invalid_argument(
            "a data family name contains control characters",
        ));
    }
    let mut sorted: Vec<_> = examples.iter().collect();
    sorted.sort();
    Ok(sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(","))
}

/// Longest failure reason an agent may give (`UpdateHeader.failure`).
pub const MAX_FAILURE_BYTES: usize = 200;

/// Checks an agent's failure report (`UpdateHeader.failure`) before it is
/// recorded: at most [`MAX_FAILURE_BYTES`], no control characters (it goes
/// into a round record and log lines), and nothing but the header (the
/// agent sends no update with it).
pub fn check_failure(header: &fedcart_proto::v1::UpdateHeader) -> Result<(), Status> {
    let reason = &header.failure;
    if reason.len() > MAX_FAILURE_BYTES {
        return Err(Status::invalid_argument(format!(
            "failure reason is {} bytes long, at most {MAX_FAILURE_BYTES} are accepted",
            reason.len()
        )));
    }
    if reason.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "failure reason contains control characters",
        ));
    }
    if header.payload_len != 0 || header.num_values != 0 || header.num_coord_weights != 0 {
        return Err(Status::invalid_argument(
            "a failure report carries no update: payload_len, num_values and \
             num_coord_weights must be 0",
        ));
    }
    Ok(())
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rpc_timeout: Duration::from_secs(300),
            concurrent_rpcs_per_connection: 16,
            max_header_bytes: 16 * 1024,
            // Honest agents of two fast runs at once (tiny churn models, a
            // few ms per round) made 50 RPC/s: the README's own federation
            // was throttled and logged two dozen warnings a second.
            rpcs_per_second: 500.0,
            rpc_burst: 1000.0,
            upload_idle_timeout: Duration::from_secs(30),
        }
    }
}

impl Limits {
    /// Default deadlines and sizes without the per-agent RPC rate: for
    /// loopback runs (the simulator's gRPC transport, benchmarks) where every
    /// agent shares one address, which plaintext mode uses as the rate key.
    pub fn loopback() -> Self {
        Self {
            rpcs_per_second: 1e9,
            rpc_burst: 1e9,
            ..Self::default()
        }
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
    /// When a refusal was last logged: one line per agent per
    /// [`WARN_EVERY`], with the count refused since.
    warned: Option<Instant>,
    refused: u64,
}

/// Shortest gap between two "rate limit exceeded" lines of one agent.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What [`Guard::take_token`] decided.
#[derive(Debug, PartialEq)]
enum Token {
    Granted,
    /// Refused; `Some(n)`: log it now, with `n` refusals since the last line.
    Refused(Option<u64>),
}

/// Identity check plus rate limit, run before every RPC.
#[derive(Clone)]
pub struct Guard {
    access: Option<AccessInterceptor>,
    limits: Limits,
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
}

impl Guard {
    /// A guard; `access` is `None` in plaintext mode (no identities).
    pub fn new(access: Option<Arc<Access>>, limits: Limits) -> Self {
        Self {
            access: access.map(|access| AccessInterceptor { access }),
            limits,
            buckets: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    #[cfg(test)]
    fn take_token(&self, key: &str) -> bool {
        self.token(key) == Token::Granted
    }

    fn token(&self, key: &str) -> Token {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 100_000 {
            // Bound memory under a flood of identities: forget idle ones.
            buckets.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(60));
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.limits.rpc_burst,
            at: now,
            warned: None,
            refused: 0,
        });
        let refill = now.duration_since(b.at).as_secs_f64() * self.limits.rpcs_per_second;
        b.tokens = (b.tokens + refill).min(self.limits.rpc_burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Token::Granted;
        }
        b.refused += 1;
        if b.warned.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            return Token::Refused(None);
        }
        b.warned = Some(now);
        Token::Refused(Some(std::mem::take(&mut b.refused)))
    }
}

impl tonic::service::Interceptor for Guard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let req = match &mut self.access {
            Some(a) => a.call(req)?,
            None => req,
        };
        let ext = req.extensions();
        let key = match (
            ext.get::<crate::identity::PeerIdentity>(),
            ext.get::<crate::identity::OperatorIdentity>(),
        ) {
            (Some(id), _) => id.0.clone(),
            (None, Some(op)) => format!("operator:{}", op.0),
            (None, None) => req
                .remote_addr()
                .map_or_else(|| "unknown".into(), |a| a.ip().to_string()),
        };
        if let Token::Refused(log) = self.token(&key) {
            if let Some(refused) = log {
                tracing::warn!(agent = %key, refused, "rate limit exceeded (logged once per 10 s per agent, with the RPCs refused since)");
            }
            return Err(Status::resource_exhausted(format!(
                "`{key}` exceeded {} RPCs per second",
                self.limits.rpcs_per_second
            )));
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A join's advertised families are bounded before they are kept or
    /// logged (a 2 MB map used to be written to the log on every join).
    #[test]
    fn a_join_advertising_too_many_or_too_long_families_is_refused_and_logs_one_short_line() {
        let ok: HashMap<String, u64> = [("mf".to_string(), 0), ("churn".to_string(), 5634)].into();
        assert_eq!(check_examples(&ok).unwrap(), "churn=5634,mf=0");
        let many: HashMap<String, u64> = (0..=MAX_FAMILIES).map(|i| (format!("f{i}"), 1)).collect();
        let e = check_examples(&many).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("17 data families"), "{e}");
        let long: HashMap<String, u64> = [("x".repeat(2 << 20), 1)].into();
        let e = check_examples(&long).unwrap_err();
        assert!(
            e.message().len() < 200 && e.message().contains("2097152 bytes"),
            "{e}"
        );
    }

    #[test]
    fn a_failure_report_is_short_printable_and_carries_no_update() {
        let ok = fedcart_proto::v1::UpdateHeader {
            failure: "local training diverged (non-finite parameter)".into(),
            ..Default::default()
        };
        assert!(check_failure(&ok).is_ok());
        let refused = |h: fedcart_proto::v1::UpdateHeader| check_failure(&h).unwrap_err();
        let long = refused(fedcart_proto::v1::UpdateHeader {
            failure: "x".repeat(MAX_FAILURE_BYTES + 1),
            ..ok.clone()
        });
        assert_eq!(long.code(), tonic::Code::InvalidArgument);
        assert!(
            long.message().contains("201 bytes long, at most 200"),
            "{long}"
        );
        let control = refused(fedcart_proto::v1::UpdateHeader {
            failure: "diverged\n\u{1b}[31mfake log line".into(),
            ..ok.clone()
        });
        assert!(
            control.message().contains("control characters"),
            "{control}"
        );
        for h in [
            fedcart_proto::v1::UpdateHeader {
                payload_len: 4,
                ..ok.clone()
            },
            fedcart_proto::v1::UpdateHeader {
                num_values: 1,
                ..ok.clone()
            },
            fedcart_proto::v1::UpdateHeader {
                num_coord_weights: 1,
                ..ok.clone()
            },
        ] {
            assert!(refused(h).message().contains("carries no update"));
        }
    }

    #[test]
    fn bucket_allows_the_burst_then_refuses() {
        let g = Guard::new(
            None,
            Limits {
                rpcs_per_second: 1e-9,
                rpc_burst: 3.0,
                ..Limits::default()
            },
        );
        assert!((0..3).all(|_| g.take_token("m")));
        assert!(!g.take_token("m"));
        assert!(g.take_token("other"), "buckets are per agent");
        // One log line per agent per WARN_EVERY (two dozen a second once
        // flooded the README federation's log), counting what it refused.
        assert_eq!(g.token("other2"), Token::Granted);
        let g = Guard::new(
            None,
            Limits {
                rpcs_per_second: 1e-9,
                rpc_burst: 1.0,
                ..Limits::default()
            },
        );
        assert_eq!(g.token("m"), Token::Granted);
        assert_eq!(g.token("m"), Token::Refused(Some(1)));
        assert_eq!(g.token("m"), Token::Refused(None));
        assert_eq!(g.token("m"), Token::Refused(None));
        assert_eq!(g.token("n"), Token::Granted, "buckets are per agent");
    }

    #[test]
    fn metric_count_and_name_length_are_capped() {
        let ok: HashMap<String, f64> = [("auc".to_string(), 0.5)].into();
        assert!(check_metrics(&ok).is_ok());
        let many: HashMap<String, f64> =
            (0..=MAX_METRICS).map(|i| (format!("m{i}"), 1.0)).collect();
        let err = check_metrics(&many).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("65 metrics"), "{err}");
        let long: HashMap<String, f64> = [("x".repeat(3 << 20), 1.0)].into();
        let err = check_metrics(&long).unwrap_err();
        assert!(err.message().contains("3145728 bytes"), "{err}");
        assert!(
            err.message().len() < 200,
            "the status does not echo the name"
        );
        // An escape sequence would be played on the operator's terminal.
        let escape: HashMap<String, f64> = [("auc\u{1b}[2J".to_string(), 0.5)].into();
        let err = check_metrics(&escape).unwrap_err();
        assert!(err.message().contains("control characters"), "{err}");
        let family: HashMap<String, u64> = [("churn\n".to_string(), 3)].into();
        let err = check_examples(&family).unwrap_err();
        assert!(err.message().contains("control characters"), "{err}");
    }
}
