//! The agent's side of mutual TLS: the CA to trust, the merchant's own
//! certificate (issued with identity `fedcart://merchant/<id>`) and key.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// PEM files of the merchant's TLS identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTls {
    /// CA bundle the coordinator's certificate chains to.
    pub ca: PathBuf,
    /// The merchant's certificate.
    pub cert: PathBuf,
    /// The merchant's private key.
    pub key: PathBuf,
    /// Name to verify on the coordinator's certificate (default: the URL's host).
    #[serde(default)]
    pub domain: Option<String>,
}

impl AgentTls {
    /// The tonic client TLS configuration.
    pub fn client_config(&self) -> anyhow::Result<ClientTlsConfig> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?));
        if let Some(d) = &self.domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(cfg)
    }
}
