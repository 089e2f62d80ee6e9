//! Transport security options: mutual TLS from PEM files (the default), or
//! plaintext only when explicitly asked for with `--insecure` or
//! `FEDCART_INSECURE=true` (see [`insecure_from_env`]).

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

/// The environment variable that may switch on plaintext gRPC.
pub const INSECURE_ENV: &str = "FEDCART_INSECURE";

/// `FEDCART_INSECURE` holds something other than an explicit yes or no.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{INSECURE_ENV}=`{value}` is not understood: set it to `true` or `1` to serve plaintext gRPC \
     (development only), to `false` or `0`, or unset it, to require mutual TLS"
)]
pub struct InsecureEnvError {
    /// The value found, cut to 64 characters.
    pub value: String,
}

/// Reads the value of [`INSECURE_ENV`]: plaintext only for an explicit
/// `true` or `1`; unset, `false` or `0` keep mutual TLS; anything else
/// (`yes`, `on`, an empty string, a typo) is an error rather than a silent
/// switch to plaintext, as clap's boolean flags would make it.
pub fn insecure_from_env(value: Option<&std::ffi::OsStr>) -> Result<bool, InsecureEnvError> {
    let Some(value) = value else {
        return Ok(false);
    };
    match value.to_str() {
        Some("true" | "1") => Ok(true),
        Some("false" | "0") => Ok(false),
        _ => Err(InsecureEnvError {
            value: value.to_string_lossy().chars().take(64).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_explicit_true_or_1_selects_plaintext() {
        let read = |v: &str| insecure_from_env(Some(std::ffi::OsStr::new(v)));
        assert_eq!(insecure_from_env(None), Ok(false));
        assert_eq!(read("true"), Ok(true));
        assert_eq!(read("1"), Ok(true));
        assert_eq!(read("false"), Ok(false));
        assert_eq!(read("0"), Ok(false));
        for bad in ["yes", "on", "", "TRUE ", "ture"] {
            let err = read(bad).unwrap_err();
            assert!(err.to_string().contains("FEDCART_INSECURE"), "{err}");
        }
    }
}
