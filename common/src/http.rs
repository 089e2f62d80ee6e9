//! The HTTP/1 accept loop of the two JSON listeners (`fedcart-client
//! serve` and the coordinator's dashboard and `/metrics`; behind the `http`
//! feature). It is `axum::serve` with a graceful shutdown plus what that
//! leaves unset: hyper's header read timeout, so a client that sends nothing,
//! or half a request's headers, is disconnected instead of holding its
//! connection (and whatever the router's state holds) until shutdown.

use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long a client may take to send a request's headers, and how long a
/// connection may sit idle before its next request, before the server
/// closes it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Most connections served at once; past it, new ones wait in the
/// listener's backlog until one closes (each open connection holds a file
/// descriptor, which the process shares with its store and gRPC).
pub const MAX_CONNECTIONS: usize = 1024;

/// Most connections served at once from one IP address; past it, a new one
/// from that address is closed at once. One client holding every slot with
/// half-sent requests (reopening each the header timeout closed) kept the
/// health probes unanswered for as long as it liked, and Kubernetes then
/// took the coordinator out of its Service and restarted it (found by a
/// penetration probe). Behind a reverse proxy every client shares the
/// proxy's address, and this many requests are served at once.
pub const MAX_CONNECTIONS_PER_PEER: usize = 64;

/// Serves HTTP/1 connections from `listener` with `app` until `stop` turns
/// true (or its sender is gone), then lets each connection finish its
/// request in flight and returns once every one is closed. Each connection
/// has `TCP_NODELAY` set (no small write waits for a delayed ACK) and
/// `header_read_timeout`; at most [`MAX_CONNECTIONS`] are served at once,
/// and [`MAX_CONNECTIONS_PER_PEER`] from one address.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    // Each connection's task holds a receiver: all dropped, all closed.
    let (closed_tx, closed_rx) = watch::channel(());
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let peers = std::sync::Arc::new(std::sync::Mutex::new(PeerCounts::default()));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = stopped(&mut stop) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => (stream, peer.ip()),
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) => continue,
                // Out of file descriptors and the like: wait for some to close.
                Err(e) => {
                    tracing::error!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let (stream, peer) = stream;
        let Some(peer_slot) = PeerSlot::take(&peers, peer) else {
            tracing::debug!(%peer, "HTTP connection refused: too many open from this address");
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on an HTTP connection");
        }
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let mut stop = stop.clone();
        let closed = closed_rx.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    () = stopped(&mut stop), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(closed);
            drop(peer_slot);
            drop(slot);
        });
    }
    drop(closed_rx);
    closed_tx.closed().await;
    Ok(())
}

/// Open connections per peer address.
type PeerCounts = std::collections::HashMap<std::net::IpAddr, usize>;

/// One of a peer's [`MAX_CONNECTIONS_PER_PEER`] connections, given back
/// when dropped.
struct PeerSlot {
    peers: std::sync::Arc<std::sync::Mutex<PeerCounts>>,
    peer: std::net::IpAddr,
}

impl PeerSlot {
    /// A slot for `peer`, if it has one left.
    fn take(
        peers: &std::sync::Arc<std::sync::Mutex<PeerCounts>>,
        peer: std::net::IpAddr,
    ) -> Option<Self> {
        let mut counts = peers.lock().unwrap_or_else(|p| p.into_inner());
        let open = counts.entry(peer).or_default();
        if *open >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *open += 1;
        Some(Self {
            peers: peers.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = counts.get_mut(&self.peer) {
            *open -= 1;
            if *open == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
