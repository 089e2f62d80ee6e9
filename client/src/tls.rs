//! The agent's side of mutual TLS: the CA to trust, the merchant's own
//! certificate (issued with identity `fedcart://merchant/<id>`) and key.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Why the merchant's TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// One of the PEM files could not be read.
    #[error("reading the TLS {role} {}", path.display())]
    Read {
        /// Which file: `CA bundle`, `certificate` or `private key`.
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

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
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let read = |role, path: &PathBuf| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                role,
                path: path.clone(),
                source,
            })
        };
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("CA bundle", &self.ca)?))
            .identity(Identity::from_pem(
                read("certificate", &self.cert)?,
                read("private key", &self.key)?,
            ));
        if let Some(d) = &self.domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(cfg)
    }
}
