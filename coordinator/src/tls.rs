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
    /// Each file is checked first, so a wrong one is named with its setting
    /// (`serve.tls.*`) rather than left to the transport's "no root trust
    /// anchors" or "keys may not be consistent".
    pub fn server_config(&self) -> anyhow::Result<ServerTlsConfig> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let (ca, cert, key) = (read(&self.ca)?, read(&self.cert)?, read(&self.key)?);
        self.check(&ca, &cert, &key)?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false))
    }

    /// Builds the rustls server configuration the transport will build (CA
    /// roots, certificate chain, the key that matches it) from the PEM bytes.
    fn check(&self, ca: &[u8], cert: &[u8], key: &[u8]) -> anyhow::Result<()> {
        let certs = |setting: &str, path: &PathBuf, pem: &[u8]| {
            let found: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
                .filter_map(Result::ok)
                .collect();
            if found.is_empty() {
                anyhow::bail!(
                    "`{setting}` {} holds no PEM certificate (a `-----BEGIN CERTIFICATE-----` block)",
                    path.display()
                );
            }
            Ok(found)
        };
        // As the transport does: certificates it cannot use are skipped.
        let mut roots = rustls::RootCertStore::empty();
        let (usable, _) = roots.add_parsable_certificates(certs("serve.tls.ca", &self.ca, ca)?);
        if usable == 0 {
            anyhow::bail!(
                "`serve.tls.ca` {} holds no usable CA certificate",
                self.ca.display()
            );
        }
        let chain = certs("serve.tls.cert", &self.cert, cert)?;
        let key = rustls_pemfile::private_key(&mut &key[..])
            .ok()
            .flatten()
            .with_context(|| {
                format!(
                    "`serve.tls.key` {} holds no PEM private key (a `-----BEGIN PRIVATE KEY-----` block)",
                    self.key.display()
                )
            })?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::clone(&provider),
        )
        .build()
        .with_context(|| format!("`serve.tls.ca` {}", self.ca.display()))?;
        let mismatch = |e: rustls::Error| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                anyhow::anyhow!(
                    "`serve.tls.key` {} is not the private key of `serve.tls.cert` {}",
                    self.key.display(),
                    self.cert.display()
                )
            }
            e => anyhow::anyhow!(
                "the coordinator's certificate `serve.tls.cert` {} and key `serve.tls.key` {}: {e}",
                self.cert.display(),
                self.key.display()
            ),
        };
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(mismatch)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(mismatch)?;
        Ok(())
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
    fn a_wrong_tls_file_is_named_with_its_setting() {
        let dir = tempfile::tempdir().unwrap();
        let certs = crate::certs::CertDir::new(dir.path());
        crate::certs::init(&certs, &["localhost".into()]).unwrap();
        let files = TlsFiles::in_dir(dir.path());
        assert!(files.server_config().is_ok());
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let message = |files: TlsFiles| format!("{:#}", files.server_config().unwrap_err());
        let no_ca = message(TlsFiles {
            ca: garbage.clone(),
            ..files.clone()
        });
        assert!(
            no_ca.starts_with("`serve.tls.ca`") && no_ca.contains("garbage.pem"),
            "{no_ca}"
        );
        let no_cert = message(TlsFiles {
            cert: garbage.clone(),
            ..files.clone()
        });
        assert!(no_cert.starts_with("`serve.tls.cert`"), "{no_cert}");
        let no_key = message(TlsFiles {
            key: garbage,
            ..files.clone()
        });
        assert!(no_key.starts_with("`serve.tls.key`"), "{no_key}");
        // The operator's key beside the coordinator's certificate.
        let wrong_key = message(TlsFiles {
            key: certs.key("operator"),
            ..files.clone()
        });
        assert!(
            wrong_key.contains("operator.key is not the private key of `serve.tls.cert`"),
            "{wrong_key}"
        );
    }

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
