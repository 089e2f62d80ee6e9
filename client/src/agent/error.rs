//! Why a session with the coordinator ended, and which of those reasons
//! retrying cannot fix: the agent's lifecycle (`Agent::run`) exits on a
//! permanent error with one line saying what to fix, and backs off quietly
//! on a transient one.

use std::error::Error as StdError;
use std::time::Duration;

use fedcart_common::train::TrainError;

use crate::secure::SecureError;
use crate::state::StateError;
use crate::transfer::TransferError;

/// Why a session with the coordinator ended in failure.
///
/// The variants fall into four groups: the agent's own setup (bad URL, TLS
/// configuration, local state), transport (connecting, silence, broken
/// streams), protocol (the coordinator refused us or sent something
/// unexpected) and task failures. [`AgentError::is_permanent`] tells the
/// ones that retrying cannot fix from the transient ones.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The coordinator URL does not parse.
    #[error("coordinator address `{url}`")]
    BadUrl {
        /// The configured URL.
        url: String,
        /// The parser's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The coordinator URL parses but cannot work with this agent's setup
    /// (no scheme, another scheme than http/https, `http://` with TLS files,
    /// `https://` without).
    #[error("coordinator address `{url}`: {why}")]
    UrlMismatch {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        why: &'static str,
        /// What to change, when the scheme and the TLS setup disagree
        /// (`None`: write the address as https://HOST:PORT).
        fix: Option<&'static str>,
    },
    /// The TLS configuration was refused by the transport.
    #[error("TLS configuration")]
    Tls(#[source] tonic::transport::Error),
    /// No connection could be made (or the TLS handshake failed).
    #[error("connecting to {url}")]
    Connect {
        /// The coordinator URL.
        url: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The coordinator refused the `Join` call: e.g. a revoked or unknown
    /// merchant, a certificate naming another merchant, an invalid id.
    #[error("join")]
    Join(#[source] tonic::Status),
    /// The work stream failed before its first message.
    #[error("reading welcome")]
    Welcome(#[source] tonic::Status),
    /// The first message of the work stream was not a welcome.
    #[error("coordinator did not send a welcome")]
    NoWelcome,
    /// A second welcome arrived on the same work stream.
    #[error("unexpected second welcome")]
    SecondWelcome,
    /// Nothing (not even a ping) arrived for three ping intervals.
    #[error("no message from the coordinator for {0:?}")]
    Silence(Duration),
    /// The work stream broke.
    #[error("work stream failed")]
    Stream(#[source] tonic::Status),
    /// The coordinator ended the work stream.
    #[error("coordinator closed the work stream")]
    StreamClosed,
    /// The embedder's [`TaskObserver`](super::TaskObserver) asked the agent
    /// to leave this task (e.g. a simulated drop-out).
    #[error("abandoned task `{task_id}` (asked by the observer)")]
    Abandoned {
        /// The task left unanswered.
        task_id: String,
    },
    /// A pushed task carried a spec this agent cannot decode (the
    /// coordinator is newer than the agent).
    #[error("task `{task_id}`: undecodable spec")]
    Spec {
        /// The task.
        task_id: String,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
    /// The merchant's data cannot serve the run's model: no data of the
    /// family the model needs, another feature width, or items outside the
    /// model's catalogue. Every later task of the run would fail the same way.
    #[error("task `{task_id}` (model `{model}`): the local data does not fit the run's model")]
    Incompatible {
        /// The task that found it.
        task_id: String,
        /// The run's model family.
        model: String,
        /// What does not fit.
        #[source]
        source: TrainError,
    },
    /// Downloading the model or uploading the update failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// A secure-aggregation answer could not be delivered.
    #[error(transparent)]
    Secure(#[from] SecureError),
    /// The local training task panicked.
    #[error("training task panicked")]
    TaskPanicked(#[source] tokio::task::JoinError),
    /// The local state could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
}

impl AgentError {
    /// True for failures that reconnecting cannot fix: a malformed URL or
    /// one that does not match the TLS setup, a TLS configuration the
    /// transport refuses, a TLS handshake that fails on a certificate (another
    /// CA, a refused client certificate), plaintext HTTP/2 against a TLS
    /// port, a join or session refused for who the merchant is (revoked, not
    /// allowed, identity mismatch, invalid id), a task spec this agent cannot
    /// read, and local data that does not fit the run's model (which the
    /// agent logs with its fix and answers by declining that run's tasks,
    /// not by exiting). Everything else
    /// (connection refused, a restarting coordinator, broken streams) may heal
    /// on retry.
    pub fn is_permanent(&self) -> bool {
        self.what_to_fix().is_some()
    }

    /// For a permanent error, what the merchant should fix, as one short
    /// sentence; `None` for transient errors.
    pub fn what_to_fix(&self) -> Option<String> {
        match self {
            Self::UrlMismatch { fix: Some(fix), .. } => Some((*fix).into()),
            Self::BadUrl { .. } | Self::UrlMismatch { .. } => Some(
                "set `coordinator` in the agent configuration (or FEDCART_COORDINATOR) to \
                 https://HOST:PORT (http:// only for a coordinator run with --insecure)"
                    .into(),
            ),
            Self::Tls(_) => Some("check the files of the `[tls]` section".into()),
            Self::Join(status) | Self::Welcome(status) | Self::Stream(status) => {
                refused(status).or_else(|| transport_fix(status))
            }
            Self::Connect { source, .. } => transport_fix(source),
            Self::Spec { .. } => {
                Some("the coordinator runs a newer protocol: upgrade fedcart-client".into())
            }
            Self::Incompatible { source, .. } => Some(match source {
                TrainError::NoData(family) => format!(
                    "this run trains a model on {family} data: configure it in `[data]` \
                     (or take part in another run)"
                ),
                // An orders export always gives its 8 RFM features: the
                // schema is not the merchant's to change then.
                TrainError::FeatureWidth { got, .. }
                    if *got == fedcart_common::data::orders::derive::FEATURE_NAMES.len() =>
                {
                    format!(
                        "the run's model and this merchant's customer features must agree: an \
                         orders export (`data.orders_csv`) gives {got} features ({}), so a run \
                         on orders needs `num_features = {got}` (the operator's); with a customer \
                         table (`data.churn_csv`) its schema (`data.schema`) sets the width",
                        fedcart_common::data::orders::derive::FEATURE_NAMES.join(", ")
                    )
                }
                TrainError::FeatureWidth { .. } => "the run's model and this merchant's \
                     customer features must agree: either the run's `num_features` (the \
                     operator's) or the customer table's schema (`data.schema`, \
                     `data.churn_csv`) is wrong"
                    .to_string(),
                _ => "`data.catalogue` must be the platform's catalogue for this run".into(),
            }),
            // The agent's own files: retrying reconnected to the
            // coordinator for ever (a full disk left the merchant's session
            // dropped and rejoined every few seconds).
            Self::State(e) => Some(state_fix(e)),
            // The privacy ledger, likewise: no round can be charged.
            Self::Secure(SecureError::Ledger {
                source: crate::budget::ChargeError::State(e),
                ..
            }) => Some(state_fix(e)),
            _ => None,
        }
    }
}

/// What to do about the agent's state directory, for [`AgentError::State`]
/// and for the commands that read it (`score`, `recommend`, `budget`, …).
pub fn state_fix(e: &StateError) -> String {
    match e {
        StateError::Create { .. } | StateError::Write { .. } | StateError::Rename { .. } => {
            "the agent could not write its state directory (the file named above): free disk \
             space or fix its permissions, then start the agent again"
                .into()
        }
        StateError::InUse { .. } => "run one agent per state directory".into(),
        StateError::RunId { .. } | StateError::Encode { .. } => {
            "the agent cannot keep this run's state: report it to the platform operator".into()
        }
        StateError::Read { .. }
        | StateError::Decode { .. }
        | StateError::Mismatch { .. }
        | StateError::NotFinite { .. }
        | StateError::Truncated { .. } => {
            "a file of the agent's state directory (named above) is damaged or unreadable: \
             restore it from a backup, or move a model or user-factor file away for the agent \
             to start afresh (not the privacy ledger: without it the ε already spent is \
             forgotten)"
                .into()
        }
    }
}

/// What to fix when the coordinator refused the merchant itself.
fn refused(status: &tonic::Status) -> Option<String> {
    match status.code() {
        // The identity is right; the operator withdrew it.
        tonic::Code::PermissionDenied if status.message().contains(" is revoked") => Some(
            "the platform operator revoked this merchant's certificate: nothing in this kit \
             can fix it; ask the operator to issue a new one (`certs issue`)"
                .into(),
        ),
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => Some(
            "`merchant_id` must be the identity of the certificate (`tls.cert`), and the \
             platform operator must admit it (`certs issue`; it may have been revoked)"
                .into(),
        ),
        // Only another session of the same merchant closes a Join stream so.
        tonic::Code::AlreadyExists => Some(
            "another agent joined the coordinator as this merchant and took over its session: \
             run one agent per merchant (stop the other one, or give each store its own kit \
             and identity)"
                .into(),
        ),
        tonic::Code::InvalidArgument => Some(
            "`merchant_id` must be 1–128 characters of [A-Za-z0-9-_.@], not only dots, and match the certificate"
                .into(),
        ),
        _ => None,
    }
}

/// What to fix when the transport failed in a way retrying cannot heal: a
/// TLS handshake refused over a certificate, TLS against a plaintext port, or
/// plaintext HTTP/2 against a TLS port.
/// Why a coordinator this agent never reached did not answer, when the
/// transport says so plainly: its host name does not resolve, or nothing
/// accepts connections at the address. Both may heal (a coordinator or a
/// DNS record not up yet), so the agent keeps retrying; the first warning
/// names the setting to check.
pub(crate) fn unreachable_cause(err: &AgentError) -> Option<&'static str> {
    let AgentError::Connect { source, .. } = err else {
        return None;
    };
    let mut next: Option<&(dyn StdError + 'static)> = Some(source);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return Some(
                "nothing accepts connections at that address (is the coordinator running, and \
                 is the port in `coordinator` right?)",
            );
        }
        // hyper-util's resolver error has no type of its own to match.
        if e.to_string().starts_with("dns error") {
            return Some(
                "its host name does not resolve (check the host in `coordinator`, or \
                 FEDCART_COORDINATOR)",
            );
        }
        next = e.source();
    }
    None
}

fn transport_fix(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(e) = next {
        // `io::Error::source` skips the error it wraps: look inside it too.
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn StdError + 'static));
        for e in [Some(e), inner].into_iter().flatten() {
            if let Some(tls) = e.downcast_ref::<rustls::Error>()
                && let Some(fix) = tls_fix(tls)
            {
                return Some(fix);
            }
            if let Some(h2) = e.downcast_ref::<h2::Error>()
                && h2.reason() == Some(h2::Reason::FRAME_SIZE_ERROR)
            {
                return Some(
                    "the coordinator speaks TLS: use https:// and a `[tls]` section".into(),
                );
            }
            // The server's refusal of our certificate, seen only as text (a
            // `tls.ca` bundle holding another CA passes the agent's own
            // check, and the agent retried for ever as if unreachable).
            if let Some(alert) = fedcart_common::identity::refused_alert_in(&e.to_string()) {
                return Some(format!(
                    "the coordinator refused this merchant's certificate ({alert}): `tls.cert` \
                     and `tls.key` must be issued by the platform's CA (`certs issue`) and \
                     still valid"
                ));
            }
        }
        next = e.source();
    }
    None
}

fn tls_fix(e: &rustls::Error) -> Option<String> {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => Some(
            "the coordinator's certificate is not signed by `tls.ca`: use the platform's CA \
             certificate"
                .into(),
        ),
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => Some(
            "the coordinator's certificate is not valid for the URL's host: set `tls.domain` \
             to a name it was issued for"
                .into(),
        ),
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            Some("the coordinator's certificate has expired: ask the platform operator".into())
        }
        rustls::Error::InvalidCertificate(_) => {
            Some("the coordinator's certificate is not acceptable: check `tls.ca`".into())
        }
        e if fedcart_common::identity::refused_our_certificate(e) => Some(
            "the coordinator refused this merchant's certificate: `tls.cert` and `tls.key` must \
             be issued by the platform's CA (`certs issue`)"
                .into(),
        ),
        rustls::Error::InvalidMessage(_) => Some(
            "the coordinator does not speak TLS there: check the port, or use http:// for a \
             coordinator run with --insecure"
                .into(),
        ),
        _ => None,
    }
}

/// Displays an error with its chain of sources, `outer: inner: …`, printing
/// each cause once: a cause whose text the line already holds (transport
/// errors often repeat their source in their own message) is skipped.
pub struct Chain<'a>(pub &'a (dyn StdError + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut line = text(self.0);
        let mut next = self.0.source();
        while let Some(e) = next {
            let text = text(e);
            if !text.is_empty() && !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            next = e.source();
        }
        f.write_str(&line)
    }
}

/// An error's own message; for a gRPC status, its message (or code) without
/// the debug dump of its source, which the chain prints next.
fn text(e: &(dyn StdError + 'static)) -> String {
    match e.downcast_ref::<tonic::Status>() {
        Some(s) if s.message().is_empty() => format!("{:?}", s.code()),
        Some(s) => s.message().to_string(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port no socket can have is a permanent error naming the URL, not
    /// an outage retried quietly for ever.
    #[tokio::test]
    async fn a_coordinator_url_with_an_impossible_port_stops_the_agent() {
        for url in ["http://127.0.0.1:99999", "http://127.0.0.1:0"] {
            let mut agent = crate::agent::Agent::new(url, Default::default());
            let (_stop, rx) = tokio::sync::watch::channel(false);
            let e = agent.run(rx).await.unwrap_err();
            assert!(e.is_permanent(), "{url}: {e}");
            assert!(
                Chain(&e)
                    .to_string()
                    .contains("the port must be a number from 1 to 65535")
                    && e.to_string().contains(url),
                "{url}: {e}"
            );
        }
    }
    use tonic::transport::Endpoint;

    #[test]
    fn bad_urls_and_identity_refusals_are_permanent_and_lost_connections_are_not() {
        let url = "not a url".to_string();
        let source = Endpoint::from_shared(url.clone()).unwrap_err();
        assert!(AgentError::BadUrl { url, source }.is_permanent());
        let revoked = tonic::Status::permission_denied("merchant `m0` is revoked");
        assert!(AgentError::Join(revoked.clone()).is_permanent());
        assert!(AgentError::Stream(revoked).is_permanent());
        assert!(!AgentError::Join(tonic::Status::unavailable("restarting")).is_permanent());
        // A `tls.ca` bundle with another CA passes the agent's own check;
        // the coordinator's refusal arrives as text and was retried for ever.
        let alert = AgentError::Join(tonic::Status::unavailable(
            "transport error: connection error: received fatal alert: DecryptError",
        ));
        assert!(alert.is_permanent());
        assert!(
            alert
                .what_to_fix()
                .unwrap()
                .contains("refused this merchant's certificate (DecryptError)"),
            "{alert}"
        );
        assert!(!AgentError::Stream(tonic::Status::cancelled("gone")).is_permanent());
        assert!(!AgentError::Silence(Duration::from_secs(3)).is_permanent());
        assert!(!AgentError::StreamClosed.is_permanent());
    }

    #[test]
    fn data_that_does_not_fit_the_model_is_permanent_and_names_the_setting() {
        let e = AgentError::Incompatible {
            task_id: "t".into(),
            model: "churn_lr".into(),
            source: TrainError::FeatureWidth {
                expected: 45,
                got: 3,
            },
        };
        assert!(e.what_to_fix().unwrap().contains("data.schema"));
        let shown = Chain(&e).to_string();
        assert!(
            shown.contains("45") && shown.contains("churn_lr"),
            "{shown}"
        );
        // An orders export's 8 features: the run's width is what to change
        // (it was told to fix a schema it does not have).
        let orders = AgentError::Incompatible {
            task_id: "t".into(),
            model: "churn_lr".into(),
            source: TrainError::FeatureWidth {
                expected: 45,
                got: 8,
            },
        };
        let fix = orders.what_to_fix().unwrap();
        assert!(
            fix.contains("an orders export (`data.orders_csv`) gives 8 features (recency_days")
                && fix.contains("`num_features = 8`"),
            "{fix}"
        );
    }

    /// A revoked merchant was told to check `merchant_id` against its
    /// certificate, as if the kit were wrong.
    #[test]
    fn a_revoked_merchant_is_told_to_ask_for_a_new_certificate_not_to_fix_its_kit() {
        let revoked = AgentError::Join(tonic::Status::permission_denied(
            "merchant `m3` is revoked (its certificate's serial is on the revocation list)",
        ));
        let fix = revoked.what_to_fix().unwrap();
        assert!(fix.starts_with("the platform operator revoked"), "{fix}");
        assert!(!fix.contains("merchant_id"), "{fix}");
        let other = AgentError::Join(tonic::Status::permission_denied(
            "certificate identity `m1` does not match merchant `m0`",
        ));
        assert!(
            other
                .what_to_fix()
                .unwrap()
                .contains("`merchant_id` must be")
        );
    }

    #[test]
    fn the_session_log_shows_the_whole_source_chain() {
        let err = AgentError::Join(tonic::Status::permission_denied("merchant `m0` is revoked"));
        let shown = Chain(&err).to_string();
        assert!(shown.starts_with("join: "), "{shown}");
        assert!(shown.contains("merchant `m0` is revoked"), "{shown}");
    }

    /// A privacy ledger the agent cannot write (a full disk) stops the
    /// agent with the file, the cause and the fix; it declined round after
    /// round with "round 49 task `…`" alone in its log (found by a fault
    /// probe).
    #[test]
    fn a_ledger_that_cannot_be_written_stops_the_agent_naming_the_file_and_the_fix() {
        let e = AgentError::Secure(SecureError::Ledger {
            round: 49,
            task_id: "r49a1-train".into(),
            source: crate::budget::ChargeError::State(StateError::Write {
                path: "state/privacy-ledger.tmp".into(),
                source: std::io::Error::from_raw_os_error(28),
            }),
        });
        assert!(e.is_permanent());
        assert!(
            e.what_to_fix().unwrap().contains("free disk space"),
            "{:?}",
            e.what_to_fix()
        );
        let shown = Chain(&e).to_string();
        assert!(
            shown.starts_with(
                "round 49 task `r49a1-train`: recording the round in the privacy ledger: "
            ) && shown.contains("state/privacy-ledger.tmp")
                && shown.contains("os error 28"),
            "{shown}"
        );
        // A refusal of the round itself is no failure of the state: not permanent.
        let over = AgentError::Secure(SecureError::Ledger {
            round: 1,
            task_id: "t".into(),
            source: crate::budget::ChargeError::Noise(0.0),
        });
        assert!(!over.is_permanent());
    }

    #[test]
    fn a_cause_already_in_the_line_is_printed_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Inner;
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Outer(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("connecting to http://x")]
        struct Top(#[source] Outer);
        assert_eq!(
            Chain(&Top(Outer(Inner))).to_string(),
            "connecting to http://x: tcp connect error"
        );
    }
}
