//! Hardening limits and the interceptor that enforces identity and a
//! per-agent request rate before any handler runs.
//!
//! Message sizes are bounded by the service's decode limit (one upload chunk
//! plus headroom); every RPC has a deadline (`rpc_timeout`, which for the
//! client-streamed upload covers the whole stream); each connection may run
//! only a few RPCs at once; and each merchant identity (or, in plaintext
//! mode, each remote IP) gets a token bucket of RPCs.

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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rpc_timeout: Duration::from_secs(300),
            concurrent_rpcs_per_connection: 16,
            max_header_bytes: 16 * 1024,
            rpcs_per_second: 50.0,
            rpc_burst: 200.0,
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

    fn take_token(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 100_000 {
            // Bound memory under a flood of identities: forget idle ones.
            buckets.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(60));
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.limits.rpc_burst,
            at: now,
        });
        let refill = now.duration_since(b.at).as_secs_f64() * self.limits.rpcs_per_second;
        b.tokens = (b.tokens + refill).min(self.limits.rpc_burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl tonic::service::Interceptor for Guard {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let req = match &mut self.access {
            Some(a) => a.call(req)?,
            None => req,
        };
        let key = match req.extensions().get::<crate::identity::PeerIdentity>() {
            Some(id) => id.0.clone(),
            None => req
                .remote_addr()
                .map_or_else(|| "unknown".into(), |a| a.ip().to_string()),
        };
        if !self.take_token(&key) {
            tracing::warn!(agent = %key, "rate limit exceeded");
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
    }
}
