//! Transport security options: mutual TLS from PEM files (the default), or
//! plaintext only when explicitly asked for with `--insecure`.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// PEM files of the coordinator's TLS identity and the merchants' CA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA bundle that merchant certificates must chain to.
    pub ca: PathBuf,
    /// The coordinator's certificate chain.
    pub cert: PathBuf,
    /// The coordinator's private key.
    pub key: PathBuf,
    /// The allow-list / revocation file (see `identity::AccessList`).
    pub access: PathBuf,
}

impl TlsFiles {
    /// The files `certs init` writes into `dir`, with `dir/access.toml`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("coordinator.pem"),
            key: dir.join("coordinator.key"),
            access: dir.join("access.toml"),
        }
    }

    /// A tonic server TLS configuration that requires a client certificate
    /// chaining to `ca` (no certificate or another CA fails the handshake).
    pub fn server_config(&self) -> anyhow::Result<ServerTlsConfig> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
            .client_ca_root(Certificate::from_pem(read(&self.ca)?))
            .client_auth_optional(false))
    }
}

/// How the gRPC listener is secured.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// Mutual TLS with an allow-list.
    Tls(TlsFiles),
    /// Plaintext, no identities: development and tests only.
    Insecure,
}
