//! The agent's side of mutual TLS: the CA to trust, the merchant's own
//! certificate (issued with identity `fedcart://merchant/<id>`) and key.

use std::path::PathBuf;

use fedcart_common::privacy::secagg::binding::{AdvertSigner, BindingError, TrustedCas};
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
    /// A PEM file was read but holds no usable key or CA certificate.
    #[error("using the TLS {role} {} to bind secure-aggregation keys", path.display())]
    Binding {
        /// Which file: `CA bundle` or `private key`.
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: BindingError,
    },
}

/// What binds this agent's secure-aggregation keys to its certificate and
/// checks its peers' (see `fedcart_common::privacy::secagg::binding`): the
/// merchant's mTLS private key and the CAs it trusts for merchant
/// certificates. The coordinator relays the agent's certificate as it saw
/// it on the connection, so the certificate file itself is not needed here.
#[derive(Debug)]
pub struct KeyIdentity {
    /// Signs this agent's key advertisements.
    pub signer: AdvertSigner,
    /// CAs a peer's certificate must chain to.
    pub cas: TrustedCas,
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

fn read(role: &'static str, path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        role,
        path: path.clone(),
        source,
    })
}

impl AgentTls {
    /// The key and CAs that bind this agent's secure-aggregation keys.
    pub fn key_identity(&self) -> Result<KeyIdentity, TlsError> {
        let bad = |role, path: &PathBuf| {
            let path = path.clone();
            move |source| TlsError::Binding { role, path, source }
        };
        Ok(KeyIdentity {
            signer: AdvertSigner::from_pem(&read("private key", &self.key)?)
                .map_err(bad("private key", &self.key))?,
            cas: TrustedCas::from_pem(&read("CA bundle", &self.ca)?)
                .map_err(bad("CA bundle", &self.ca))?,
        })
    }

    /// The tonic client TLS configuration.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
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
