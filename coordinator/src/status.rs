//! `fedcart-coordinator status`: the current run, round, connected agents and
//! last round's metrics, from the `Status` RPC, as a table or JSON.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use fedcart_proto::v1 as pb;
use fedcart_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Client TLS files for talking to a coordinator: the operator certificate
/// `certs init` made (the whole view), or a merchant's (its own view).
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// CA bundle the coordinator's certificate chains to.
    pub ca: PathBuf,
    /// Our certificate.
    pub cert: PathBuf,
    /// Our key.
    pub key: PathBuf,
    /// Name to verify on the coordinator's certificate; `None`: the URL's
    /// host, as the agent and `fleet` verify it.
    pub domain: Option<String>,
}

/// Connects to `url`, with mutual TLS when `tls` is given.
pub async fn connect(
    url: &str,
    tls: Option<&ClientTls>,
) -> anyhow::Result<CoordinatorClient<tonic::transport::Channel>> {
    Ok(CoordinatorClient::new(channel(url, tls).await?))
}

/// A channel to `url`, with mutual TLS when `tls` is given (for the
/// `Coordinator` and `Admin` clients).
pub async fn channel(
    url: &str,
    tls: Option<&ClientTls>,
) -> anyhow::Result<tonic::transport::Channel> {
    let mut ep = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("coordinator address `{url}`"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if let Some(t) = tls {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let (ca, cert, key) = (read(&t.ca)?, read(&t.cert)?, read(&t.key)?);
        check_identity(t, &ca, &cert, &key).map_err(|e| BadIdentity(format!("{e:#}")))?;
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key));
        if let Some(domain) = &t.domain {
            config = config.domain_name(domain.clone());
        }
        ep = ep.tls_config(config).map_err(|e| {
            BadIdentity(format!(
                "the identity {} / {} with the CA {}: {}",
                t.cert.display(),
                t.key.display(),
                t.ca.display(),
                crate::cli::one_line(&e)
            ))
        })?;
    }
    ep.connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// The operator's TLS files do not make an identity (found before any
/// connection is tried, so no "is the coordinator running?" hint).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadIdentity(String);

/// Builds the rustls client configuration the transport will build from
/// the operator's files (the coordinator's CA, its certificate and the key
/// that must match it), so a wrong file is named rather than left to the
/// transport's error text.
fn check_identity(t: &ClientTls, ca: &[u8], cert: &[u8], key: &[u8]) -> anyhow::Result<()> {
    use crate::tls::{IdentityFiles, PemFile};
    let files = IdentityFiles {
        ca: PemFile::new(None, &t.ca, ca),
        cert: PemFile::new(None, &t.cert, cert),
        key: PemFile::new(None, &t.key, key),
    };
    let id = files.parse()?;
    // An expired certificate, or one of another CA, is refused by the
    // coordinator after the handshake, which the client may read as a
    // broken pipe ("nothing answered"): checked here against the CA the
    // coordinator's certificate is checked with, as agents do.
    let cas = fedcart_common::privacy::secagg::binding::TrustedCas::from_pem(ca)
        .map_err(|e| anyhow::anyhow!("{}: {e}", t.ca.display()))?;
    if let Err(e) = cas.verify_client_chain(&id.chain, rustls::pki_types::UnixTime::now()) {
        let why = match e {
            fedcart_common::privacy::secagg::binding::BindingError::Untrusted(why) => why,
            other => other.to_string(),
        };
        anyhow::bail!(
            "{} is not a client certificate the CA in {} vouches for now ({why}): the \
             coordinator would refuse it; `--certs` must hold an identity of this CA, still \
             valid (`--identity NAME`; `certs issue --operator` makes one)",
            t.cert.display(),
            t.ca.display()
        );
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| files.inconsistent(e))?
    .with_root_certificates(id.roots)
    .with_client_auth_cert(id.chain, id.key)
    .map_err(|e| files.inconsistent(e))?;
    Ok(())
}

/// Fetches the status of `run` (default: the coordinator's primary run).
pub async fn fetch(
    url: &str,
    tls: Option<&ClientTls>,
    run: Option<&str>,
) -> anyhow::Result<pb::StatusReply> {
    let mut c = connect(url, tls).await?;
    let request = pb::StatusRequest {
        run_id: run.unwrap_or_default().to_owned(),
    };
    Ok(c.status(request)
        .await
        .map_err(Refused)
        .context("Status RPC")?
        .into_inner())
}

/// The run configuration `runs submit` was given could not be read: the
/// operator's file, not a certificate (no TLS hint applies).
#[derive(Debug, thiserror::Error)]
#[error("reading {}", path.display())]
pub struct ReadConfig {
    /// The file.
    pub path: std::path::PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// A call the coordinator answered with an error status, shown as the
/// status's message alone (tonic's own display adds the code's description
/// and quotes the message); the code stays readable for [`with_hint`], and
/// the transport error beneath, if any, is its source.
#[derive(Debug)]
pub struct Refused(pub tonic::Status);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.message() {
            "" => write!(f, "{:?}", self.0.code()),
            message => f.write_str(message),
        }
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

/// Adds what to try to a failed [`fetch`] of `url`; `identity` is the
/// `--identity` presented when `--certs` was given, `None` without it.
pub fn with_hint(e: anyhow::Error, url: &str, identity: Option<&str>) -> anyhow::Error {
    let with_certs = identity.is_some();
    if e.chain()
        .any(|c| c.is::<BadIdentity>() || c.is::<ReadConfig>())
    {
        return e;
    }
    let status = e.chain().find_map(|c| {
        c.downcast_ref::<tonic::Status>()
            .or_else(|| c.downcast_ref::<Refused>().map(|r| &r.0))
    });
    let refused = status.map(tonic::Status::code);
    // A `runs` command with a merchant's certificate: refused for its role,
    // not because the access list dropped it.
    let for_role = status.is_some_and(|s| {
        s.message()
            .starts_with(crate::service::admin::ADMIN_NEEDS_OPERATOR)
    });
    let unreachable = e
        .chain()
        .any(|c| c.downcast_ref::<tonic::transport::Error>().is_some());
    let missing_file = e
        .chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::NotFound);
    let hint = match refused {
        Some(tonic::Code::PermissionDenied) if for_role => format!(
            "`runs` commands are the operator's: use the operator identity `certs init` made \
             (`--identity operator`) or one issued with `certs issue --operator --id NAME`; \
             merchant `{}` may read `status`",
            identity.unwrap_or_default()
        ),
        // A merchant has no operator identity to switch to: what it can
        // read, and who can admit it again.
        Some(tonic::Code::PermissionDenied | tonic::Code::Unauthenticated)
            if identity.is_some_and(|id| id != crate::certs::OPERATOR) =>
        {
            format!(
                "the coordinator refused this identity: merchant `{}` reads `status` only while \
                 the access list admits it (revoked or not listed: ask the operator to admit it \
                 again); for `runs` commands use the operator identity `certs init` made \
                 (`--identity operator`) or one issued with `certs issue --operator --id NAME`",
                identity.unwrap_or_default()
            )
        }
        Some(tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) => {
            "the coordinator refused this identity: use the operator identity `certs init` made \
             (`--identity operator`), or issue another with `certs issue --operator --id NAME` \
             and pass `--identity NAME`"
                .to_string()
        }
        _ if missing_file && identity == Some(crate::certs::OPERATOR) => {
            "`certs init` writes the operator's operator.pem/operator.key into its directory: \
             pass that directory as --certs (or issue another operator with \
             `certs issue --operator --dir DIR --id NAME` and pass `--identity NAME`); a \
             merchant reading its own status passes its kit and its id, \
             `--certs KITDIR --identity ID` (the kit holds ID.pem; --identity defaults to \
             operator)"
                .to_string()
        }
        // A merchant's key moved into its kit (`certs issue --kit`), or
        // another operator's is where `certs issue --operator` wrote it.
        _ if missing_file && let Some(id) = identity => format!(
            "--certs is the folder that holds ca.pem, {id}.pem and {id}.key: a merchant's kit \
             (`certs issue --kit KITDIR` moved the key there: `--certs KITDIR --identity {id}`), \
             or for an operator `certs issue --operator` named `{id}` the directory it was \
             issued in"
        ),
        _ if !unreachable => return e,
        // `127.0.0.1:50051` is not a URL: nothing was tried.
        _ if !url.contains("://") => format!(
            "`{url}` has no scheme: write https://{url} (or http://{url} for a coordinator \
             started with --insecure) in `--coordinator` or FEDCART_COORDINATOR"
        ),
        _ if let Some(fix) = transport_fix(e.as_ref(), url) => fix,
        _ if !with_certs && url.starts_with("https://") => format!(
            "a coordinator with mutual TLS needs `--certs DIR` (ca.pem and <identity>.pem/.key, \
             the directory `certs init` made); one run with --insecure needs \
             `--coordinator http://HOST:PORT` (tried {url})"
        ),
        _ => format!(
            "nothing answered at {url}: is the coordinator running? `serve` exits when its run \
             finishes (its last log lines say how the run ended); check `--coordinator`"
        ),
    };
    anyhow::anyhow!("{} — {hint}", crate::cli::one_line(e.as_ref()))
}

/// What to fix when the connection to `url` failed for a reason other
/// than nobody listening: the TLS handshake (which CA, which name, expired,
/// this identity refused), TLS against a plaintext port or plaintext
/// against a TLS one; `None` otherwise.
fn transport_fix(err: &(dyn std::error::Error + 'static), url: &str) -> Option<String> {
    use rustls::CertificateError as C;
    let mut next = Some(err);
    while let Some(e) = next {
        // `io::Error::source` skips the error it wraps: look inside it too.
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for e in [Some(e), inner].into_iter().flatten() {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::ConnectionRefused
            {
                return Some(format!(
                    "nothing answered at {url}: is the coordinator running? `serve` exits when \
                     its run finishes (its last log lines say how the run ended); check \
                     `--coordinator`"
                ));
            }
            if let Some(h2) = e.downcast_ref::<h2::Error>()
                && h2.reason() == Some(h2::Reason::FRAME_SIZE_ERROR)
            {
                return Some(format!(
                    "the coordinator at {url} speaks TLS: use https:// and `--certs DIR`"
                ));
            }
            let Some(tls) = e.downcast_ref::<rustls::Error>() else {
                // The server's alert reaches the client after the handshake
                // (TLS 1.3), through hyper's connection error as text only:
                // it read "nothing answered … is the coordinator running?".
                if let Some(alert) = fedcart_common::identity::refused_alert_in(&e.to_string()) {
                    return Some(format!(
                        "the coordinator refused this identity's certificate ({alert}): \
                         `--certs` must hold an identity its CA issued for a client, still \
                         valid (`--identity NAME`; `certs issue --operator` makes one)"
                    ));
                }
                continue;
            };
            return Some(match tls {
                rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
                    "the coordinator's certificate is not signed by the CA in `--certs` \
                     (ca.pem): pass the directory `certs init` made for this coordinator"
                        .into()
                }
                rustls::Error::InvalidCertificate(
                    C::NotValidForName | C::NotValidForNameContext { .. },
                ) => format!(
                    "the coordinator's certificate is not issued for the host of {url} (or \
                     `--domain`): connect by one of the names it was issued for (listed above), \
                     in the URL or as `--domain NAME`"
                ),
                rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
                    "the coordinator's certificate has expired: the operator signs a new one \
                     for it with the CA that issued the merchants' (`certs init` makes a new CA, \
                     and `certs` cannot renew it yet)"
                        .into()
                }
                e if fedcart_common::identity::refused_our_certificate(e) => {
                    "the coordinator refused this identity's certificate: `--certs` must hold \
                      an identity its CA issued (`--identity NAME`)"
                        .into()
                }
                rustls::Error::InvalidMessage(_) => format!(
                    "the coordinator at {url} does not speak TLS: use http:// for a coordinator \
                     run with --insecure, or check the port"
                ),
                _ => continue,
            });
        }
        next = e.source();
    }
    // Something answered a plaintext call and hung up (a TLS port does so,
    // or answers with a frame no plaintext HTTP/2 peer sends).
    url.starts_with("http://").then(|| {
        format!(
            "the coordinator at {url} did not answer plaintext gRPC: if it serves mutual TLS \
             (it does unless run with --insecure), use https:// and `--certs DIR`"
        )
    })
}

/// The status as JSON (the last round record is embedded as an object).
pub fn to_json(s: &pb::StatusReply) -> serde_json::Value {
    let mut last: serde_json::Value =
        serde_json::from_str(&s.last_round_json).unwrap_or(serde_json::Value::Null);
    // A merchant's copy of the record holds none of the federation's figures
    // (`RoundRecord::seen_by`): null, not a 0 that reads as "no examples".
    if last.get("seen_by").is_some_and(|v| !v.is_null()) {
        for hidden in ["examples", "bytes_in"] {
            if let Some(v) = last.get_mut(hidden) {
                *v = serde_json::Value::Null;
            }
        }
    }
    serde_json::json!({
        "run_id": s.run_id,
        "round": s.round,
        "model_version": s.model_version,
        "phase": s.phase,
        "connected_agents": s.connected_agents,
        "last_round": last,
        "run_ids": s.run_ids,
        "epsilon": s.epsilon,
        "delta": s.delta,
        "best_version": s.best_version,
        "best_metric": (!s.best_metric.is_empty()).then_some(&s.best_metric),
        "best_value": s.best_value,
    })
}

/// The status as a human-readable table.
pub fn to_table(s: &pb::StatusReply) -> String {
    let mut t = comfy_table::Table::new();
    t.set_header(vec!["field", "value"]);
    t.add_row(vec!["run".to_string(), s.run_id.clone()]);
    t.add_row(vec!["round".to_string(), s.round.to_string()]);
    t.add_row(vec![
        "model version".to_string(),
        s.model_version.to_string(),
    ]);
    t.add_row(vec!["phase".to_string(), s.phase.clone()]);
    // A run that ended chose its best and spent its budget for good.
    let so_far = if s.phase.starts_with("finished") || s.phase.starts_with("stopped") {
        ""
    } else {
        " so far"
    };
    if let Some(v) = s.best_version {
        let value = s
            .best_value
            .map(|x| format!(": {x:.4}"))
            .unwrap_or_default();
        t.add_row(vec![
            "served version".to_string(),
            format!("{v} (best {}{so_far}{value})", s.best_metric),
        ]);
    }
    if let (Some(eps), Some(delta)) = (s.epsilon, s.delta) {
        t.add_row(vec![
            "differential privacy".to_string(),
            format!("ε = {eps:.3} spent{so_far} (δ = {delta:e})"),
        ]);
    }
    t.add_row(vec![
        format!("runs hosted ({})", s.run_ids.len()),
        s.run_ids.join(", "),
    ]);
    t.add_row(vec![
        format!("connected agents ({})", s.connected_agents.len()),
        s.connected_agents.join(", "),
    ]);
    if let Ok(r) = serde_json::from_str::<crate::record::RoundRecord>(&s.last_round_json) {
        // A merchant's copy lists only itself: the count would read as the
        // round's.
        let who = match &r.seen_by {
            Some(id) if r.reported.contains(id) => format!("{id} reported"),
            Some(id) => format!("{id} did not report"),
            None => format!("{} reported", r.reported.len()),
        };
        t.add_row(vec![
            "last task".to_string(),
            format!("{} ({:?}, {who})", r.task_id, r.outcome),
        ]);
        if let Some(reason) = &r.abort_reason {
            t.add_row(vec!["  aborted".to_string(), reason.clone()]);
        }
        for (k, v) in &r.metrics {
            t.add_row(vec![format!("  {k}"), format!("{v:.4}")]);
        }
        if let Some(c) = r.secagg_clipped.filter(|c| c.coordinates > 0) {
            t.add_row(vec![
                "  secure aggregation".to_string(),
                c.warning().unwrap_or_else(|| {
                    format!(
                        "clipped {:.2} % of the summed coordinates",
                        100.0 * c.fraction
                    )
                }),
            ]);
        }
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's refusal of the client's certificate arrives as text in
    /// hyper's connection error; it was answered "nothing answered … is the
    /// coordinator running?".
    #[test]
    fn a_certificate_the_coordinator_refused_is_named_from_the_alert_text() {
        for alert in ["CertificateExpired", "UnsupportedCertificate", "UnknownCA"] {
            let e =
                std::io::Error::other(format!("connection error: received fatal alert: {alert}"));
            let fix = transport_fix(&e, "https://localhost:50051").expect(alert);
            assert!(
                fix.contains("refused this identity's certificate") && fix.contains(alert),
                "{fix}"
            );
        }
        let e = std::io::Error::other("connection error: received fatal alert: ProtocolVersion");
        assert_eq!(transport_fix(&e, "https://localhost:50051"), None);
    }

    #[test]
    fn the_table_says_when_secure_aggregation_clipped_the_last_sum() {
        let record = |clipped: Option<(u64, f64)>| {
            let mut v = serde_json::json!({
                "round": 3, "attempt": 1, "task_id": "r3a1-train", "kind": "train",
                "outcome": "committed", "base_version": 2, "selected": ["a", "b"],
                "reported": ["a", "b"], "dropped": [], "rejected": [], "metrics": {"loss": 0.5},
                "examples": 10.0, "started_unix_ms": 0, "duration_ms": 12, "bytes_in": 64,
            });
            if let Some((coordinates, fraction)) = clipped {
                v["secagg_clipped"] = serde_json::json!({
                    "coordinates": coordinates, "fraction": fraction
                });
            }
            pb::StatusReply {
                last_round_json: v.to_string(),
                ..Default::default()
            }
        };
        let row = |t: &str| {
            t.lines()
                .find(|l| l.contains("secure aggregation"))
                .map(str::to_string)
        };
        // A plaintext task, or a secure one the clip did not touch: no row.
        assert_eq!(row(&to_table(&record(None))), None);
        assert_eq!(row(&to_table(&record(Some((0, 0.0))))), None);
        let few = row(&to_table(&record(Some((3, 0.0012))))).expect("a row");
        assert!(
            few.contains("clipped 0.12 % of the summed coordinates"),
            "{few}"
        );
        // Over 1 %: the warning, naming the setting to raise.
        let many = to_table(&record(Some((9_000, 0.9))));
        assert!(
            many.contains("secure aggregation clipped 90.0 %")
                && many.contains("`run.secagg.clip`"),
            "{many}"
        );
        // Old records (no field) still decode into the table.
        assert!(to_table(&record(None)).contains("r3a1-train (Committed, 2 reported)"));
    }

    /// A revoked merchant was told only to use the operator identity it
    /// does not have.
    #[test]
    fn a_refused_merchant_is_told_who_admits_it_again() {
        let refused =
            || anyhow::Error::new(tonic::Status::permission_denied("merchant `m3` is revoked"));
        let m3 = with_hint(refused(), "https://localhost:50051", Some("m3")).to_string();
        assert!(
            m3.contains("merchant `m3` reads `status` only while")
                && m3.contains("ask the operator to admit it again"),
            "{m3}"
        );
        let op = with_hint(refused(), "https://localhost:50051", Some("operator")).to_string();
        assert!(op.contains("--identity operator"), "{op}");
        // A `runs` command with a merchant's certificate is refused for the
        // role: no word of revocation (it read "revoked or not listed").
        let for_role = anyhow::Error::new(Refused(tonic::Status::permission_denied(format!(
            "{} (fedcart://operator/<name>): the caller's certificate has the role merchant \
             (`m3`)",
            crate::service::admin::ADMIN_NEEDS_OPERATOR
        ))));
        let m3 = with_hint(for_role, "https://localhost:50051", Some("m3")).to_string();
        assert!(
            m3.ends_with(
                "— `runs` commands are the operator's: use the operator identity `certs init` \
                 made (`--identity operator`) or one issued with `certs issue --operator --id \
                 NAME`; merchant `m3` may read `status`"
            ) && !m3.contains("revoked"),
            "{m3}"
        );
    }

    /// A merchant's copy of the last record hides the federation's example
    /// count and bytes: `--json` says null, not 0 ("no examples").
    #[test]
    fn a_merchants_json_gives_hidden_figures_as_null() {
        let record = |seen_by: Option<&str>| pb::StatusReply {
            last_round_json: serde_json::json!({
                "round": 3, "attempt": 1, "task_id": "r3a1-train", "kind": "train",
                "outcome": "committed", "base_version": 2, "selected": ["m0"],
                "reported": ["m0"], "dropped": [], "rejected": [], "metrics": {},
                "examples": 0.0, "started_unix_ms": 0, "duration_ms": 12, "bytes_in": 0,
                "seen_by": seen_by,
            })
            .to_string(),
            ..Default::default()
        };
        let merchant = to_json(&record(Some("m0")));
        assert!(merchant["last_round"]["examples"].is_null(), "{merchant}");
        assert!(merchant["last_round"]["bytes_in"].is_null(), "{merchant}");
        let operator = to_json(&record(None));
        assert_eq!(operator["last_round"]["examples"], 0.0, "{operator}");
        assert_eq!(operator["last_round"]["bytes_in"], 0, "{operator}");
    }

    /// "so far" only while the run goes on: a probe read "best … so far" on
    /// a finished run as a selection still open.
    #[test]
    fn the_served_version_and_epsilon_are_so_far_only_while_the_run_goes_on() {
        let status = |phase: &str| {
            to_table(&pb::StatusReply {
                phase: phase.into(),
                best_version: Some(4),
                best_metric: "val_auc".into(),
                best_value: Some(0.84731),
                epsilon: Some(1.5),
                delta: Some(1e-5),
                ..Default::default()
            })
        };
        let running = status("r5a1-train");
        assert!(
            running.contains("4 (best val_auc so far: 0.8473)")
                && running.contains("ε = 1.500 spent so far (δ = 1e-5)"),
            "{running}"
        );
        for ended in ["finished", "stopped: by admin"] {
            let t = status(ended);
            assert!(
                t.contains("4 (best val_auc: 0.8473)")
                    && t.contains("ε = 1.500 spent (δ = 1e-5)")
                    && !t.contains("so far"),
                "{t}"
            );
        }
    }

    /// `runs submit` of a missing configuration says so, without the hint
    /// about the operator's certificate files.
    #[test]
    fn a_missing_run_configuration_gets_no_certificate_hint() {
        let e = anyhow::Error::new(ReadConfig {
            path: "nope.toml".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
        let message = format!(
            "{:#}",
            with_hint(e, "https://localhost:50051", Some("operator"))
        );
        assert_eq!(message, "reading nope.toml: entity not found");
    }

    #[tokio::test]
    async fn an_operator_key_that_is_not_the_certificates_is_named_without_a_network_hint() {
        let dir = tempfile::tempdir().unwrap();
        let certs = crate::certs::CertDir::new(dir.path());
        crate::certs::init(&certs, &["localhost".into()]).unwrap();
        let tls = |key| ClientTls {
            ca: certs.ca_cert(),
            cert: certs.cert("operator"),
            key,
            domain: Some("localhost".into()),
        };
        // The port is never dialled: the identity is refused first.
        let url = "https://127.0.0.1:1";
        let wrong = tls(certs.key("coordinator"));
        let e = channel(url, Some(&wrong)).await.unwrap_err();
        let message = format!("{:#}", with_hint(e, url, Some("operator")));
        assert_eq!(
            message,
            format!(
                "{} is not the private key of {}",
                certs.key("coordinator").display(),
                certs.cert("operator").display()
            )
        );
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let no_cert = ClientTls {
            cert: garbage.clone(),
            ..tls(certs.key("operator"))
        };
        let e = channel(url, Some(&no_cert)).await.unwrap_err();
        let message = format!("{:#}", with_hint(e, url, Some("operator")));
        assert_eq!(
            message,
            format!(
                "{} holds no PEM certificate (a `-----BEGIN CERTIFICATE-----` block)",
                garbage.display()
            )
        );
    }

    /// `status --certs pki --identity m0`, m0's key moved into its kit, was
    /// told to pass the directory holding operator.pem/operator.key: a
    /// merchant's identity is pointed at its kit folder instead.
    #[tokio::test]
    async fn a_merchant_identity_without_its_key_is_pointed_at_its_kit() {
        let dir = tempfile::tempdir().unwrap();
        let certs = crate::certs::CertDir::new(dir.path().join("pki"));
        crate::certs::init(&certs, &["localhost".into()]).unwrap();
        crate::certs::issue(&certs, "m0").unwrap();
        std::fs::remove_file(certs.key("m0")).unwrap();
        let tls = |id: &str| ClientTls {
            ca: certs.ca_cert(),
            cert: certs.cert(id),
            key: certs.key(id),
            domain: Some("localhost".into()),
        };
        // The port is never dialled: the key is read first.
        let url = "https://127.0.0.1:1";
        let e = channel(url, Some(&tls("m0"))).await.unwrap_err();
        let message = format!("{:#}", with_hint(e, url, Some("m0")));
        assert!(
            message.contains("`--certs KITDIR --identity m0`"),
            "{message}"
        );
        assert!(!message.contains("operator.pem"), "{message}");
        std::fs::remove_file(certs.key("operator")).unwrap();
        let e = channel(url, Some(&tls("operator"))).await.unwrap_err();
        let message = format!("{:#}", with_hint(e, url, Some("operator")));
        assert!(message.contains("operator.pem/operator.key"), "{message}");
        // A merchant that left --identity out (its kit has no operator
        // files) was told only of operator files (an operator probe).
        assert!(
            message.contains("`--certs KITDIR --identity ID`"),
            "{message}"
        );
    }

    /// `--coordinator 127.0.0.1:47551` was diagnosed as nothing listening
    /// there; it is a URL without its scheme, and nothing was dialled.
    #[tokio::test]
    async fn a_coordinator_address_without_a_scheme_is_told_to_add_one() {
        let url = "127.0.0.1:1";
        let e = fetch(url, None, None).await.unwrap_err();
        let message = format!("{:#}", with_hint(e, url, None));
        assert!(
            message.ends_with(
                "`127.0.0.1:1` has no scheme: write https://127.0.0.1:1 (or http://127.0.0.1:1 \
                 for a coordinator started with --insecure) in `--coordinator` or \
                 FEDCART_COORDINATOR"
            ),
            "{message}"
        );
        assert!(!message.contains("nothing answered"), "{message}");
    }
}
