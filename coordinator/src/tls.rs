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

/// How long a connection to the gRPC port may take to complete its TLS
/// handshake before the server drops it. Without a limit, a socket that
/// never started TLS was kept for ever, and about a thousand of them (no
/// certificate needed) used up the process's file descriptors and locked
/// every merchant, the operator and the HTTP port out (found by a
/// penetration probe). A real handshake takes a few milliseconds.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
        let read = |p: &PathBuf, field: &str| {
            std::fs::read(p).with_context(|| format!("`{field}`: reading {}", p.display()))
        };
        let (ca, cert, key) = (
            read(&self.ca, "serve.tls.ca")?,
            read(&self.cert, "serve.tls.cert")?,
            read(&self.key, "serve.tls.key")?,
        );
        self.check(&ca, &cert, &key)?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT))
    }

    /// Builds the rustls server configuration the transport will build (CA
    /// roots, certificate chain, the key that matches it) from the PEM bytes.
    fn check(&self, ca: &[u8], cert: &[u8], key: &[u8]) -> anyhow::Result<()> {
        let files = IdentityFiles {
            ca: PemFile::new(Some("serve.tls.ca"), &self.ca, ca),
            cert: PemFile::new(Some("serve.tls.cert"), &self.cert, cert),
            key: PemFile::new(Some("serve.tls.key"), &self.key, key),
        };
        let id = files.parse()?;
        // A CA certificate served as the coordinator's own starts, and every
        // agent's handshake then fails on a name or key usage it lacks.
        let parsed = x509_parser::parse_x509_certificate(&id.chain[0]).ok();
        // An expired certificate (or one not valid yet) started, and every
        // agent's handshake then failed on it (found by a fault probe).
        if let Some((_, c)) = &parsed
            && !c.validity().is_valid()
        {
            let v = c.validity();
            anyhow::bail!(
                "`serve.tls.cert` {} is valid only from {} to {}, not now: every agent's \
                 handshake would fail on it; sign a new certificate for the coordinator with the \
                 CA that issued the merchants' (`certs` cannot renew it yet)",
                self.cert.display(),
                v.not_before.to_datetime().date(),
                v.not_after.to_datetime().date(),
            );
        }
        let leaf = parsed.is_some_and(|(_, c)| c.is_ca());
        if leaf {
            anyhow::bail!(
                "`serve.tls.cert` {} is a CA certificate, not the coordinator's own: give the \
                 certificate `certs init` wrote for the coordinator (coordinator.pem), signed by \
                 that CA",
                self.cert.display()
            );
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(id.roots),
            std::sync::Arc::clone(&provider),
        )
        .build()
        .with_context(|| format!("`serve.tls.ca` {}", self.ca.display()))?;
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| files.inconsistent(e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.chain, id.key)
            .map_err(|e| files.inconsistent(e))?;
        Ok(())
    }
}

/// One PEM file of a TLS identity, and the setting it came from (`None`
/// when the path alone names it, as for the operator's `--certs DIR`).
pub(crate) struct PemFile<'a> {
    setting: Option<&'a str>,
    path: &'a std::path::Path,
    pem: &'a [u8],
}

impl<'a> PemFile<'a> {
    pub(crate) fn new(setting: Option<&'a str>, path: &'a std::path::Path, pem: &'a [u8]) -> Self {
        Self { setting, path, pem }
    }

    /// `` `serve.tls.key` /etc/fedcart/coordinator.key `` or the path alone.
    fn name(&self) -> String {
        match self.setting {
            Some(s) => format!("`{s}` {}", self.path.display()),
            None => self.path.display().to_string(),
        }
    }
}

/// The CA bundle, certificate and key of one side of mutual TLS, read the
/// way rustls (under tonic) will use them, so that a wrong file is named
/// before the transport reports "no root trust anchors" or "keys may not be
/// consistent". The server ([`TlsFiles::check`]) and the operator's client
/// (`status`, `runs`) both check their files through it.
pub(crate) struct IdentityFiles<'a> {
    pub(crate) ca: PemFile<'a>,
    pub(crate) cert: PemFile<'a>,
    pub(crate) key: PemFile<'a>,
}

/// What [`IdentityFiles::parse`] read.
pub(crate) struct ParsedIdentity {
    pub(crate) roots: rustls::RootCertStore,
    pub(crate) chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub(crate) key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl IdentityFiles<'_> {
    /// The roots (certificates the transport cannot use are skipped, as it
    /// skips them; a bundle with none usable is refused), the chain and the key.
    pub(crate) fn parse(&self) -> anyhow::Result<ParsedIdentity> {
        let certs = |file: &PemFile| {
            let found: Vec<_> = rustls_pemfile::certs(&mut &file.pem[..])
                .filter_map(Result::ok)
                .collect();
            if found.is_empty() {
                anyhow::bail!(
                    "{} holds no PEM certificate (a `-----BEGIN CERTIFICATE-----` block)",
                    file.name()
                );
            }
            Ok(found)
        };
        let mut roots = rustls::RootCertStore::empty();
        let (usable, _) = roots.add_parsable_certificates(certs(&self.ca)?);
        if usable == 0 {
            anyhow::bail!("{} holds no usable CA certificate", self.ca.name());
        }
        let chain = certs(&self.cert)?;
        let key = rustls_pemfile::private_key(&mut &self.key.pem[..])
            .ok()
            .flatten()
            .with_context(|| {
                format!(
                    "{} holds no PEM private key (a `-----BEGIN PRIVATE KEY-----` block)",
                    self.key.name()
                )
            })?;
        Ok(ParsedIdentity { roots, chain, key })
    }

    /// rustls' refusal of the certificate and key as a pair, naming both
    /// files: above all, a key that is not the certificate's.
    pub(crate) fn inconsistent(&self, e: rustls::Error) -> anyhow::Error {
        match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                anyhow::anyhow!(
                    "{} is not the private key of {}",
                    self.key.name(),
                    self.cert.name()
                )
            }
            e => anyhow::anyhow!(
                "the certificate {} and key {}: {e}",
                self.cert.name(),
                self.key.name()
            ),
        }
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
    "{INSECURE_ENV}=`{value}` is not understood: set it to true, yes, on or 1 to serve plaintext \
     gRPC (development only), to false, no, off or 0, or unset it, to require mutual TLS"
)]
pub struct InsecureEnvError {
    /// The value found, cut to 64 characters.
    pub value: String,
}

/// Reads the value of [`INSECURE_ENV`] as every boolean variable is read
/// ([`fedcart_common::cli::parse_env_bool`]): plaintext only for an
/// explicit yes; unset or an explicit no keeps mutual TLS; anything else
/// (an empty string, a typo) is an error rather than a silent switch to
/// plaintext.
pub fn insecure_from_env(value: Option<&std::ffi::OsStr>) -> Result<bool, InsecureEnvError> {
    let Some(value) = value else {
        return Ok(false);
    };
    value
        .to_str()
        .and_then(|v| fedcart_common::cli::parse_env_bool(v).ok())
        .ok_or_else(|| InsecureEnvError {
            value: value.to_string_lossy().chars().take(64).collect(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An expired coordinator certificate is refused at start, with its
    /// dates and what to do: it started, and every agent's handshake then
    /// failed (found by a fault probe).
    #[test]
    fn an_expired_coordinator_certificate_is_refused_at_start() {
        use rcgen::{CertificateParams, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let certs = crate::certs::CertDir::new(dir.path());
        crate::certs::init(&certs, &["localhost".into()]).unwrap();
        let issuer = crate::certs::load_ca(&certs).unwrap();
        let mut p = CertificateParams::new(vec!["localhost".into()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        let files = TlsFiles {
            cert: dir.path().join("expired.pem"),
            key: dir.path().join("expired.key"),
            ..TlsFiles::in_dir(dir.path())
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        let e = format!("{:#}", files.server_config().unwrap_err());
        assert!(
            e.starts_with("`serve.tls.cert`")
                && e.contains("expired.pem is valid only from 2020-01-01 to 2021-01-01, not now")
                && e.contains("sign a new certificate"),
            "{e}"
        );
    }

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
        // The CA's own certificate and key served as the coordinator's.
        let ca_served = message(TlsFiles {
            cert: files.ca.clone(),
            key: certs.ca_key(),
            ..files.clone()
        });
        assert!(
            ca_served.starts_with("`serve.tls.cert`")
                && ca_served.contains("ca.pem is a CA certificate"),
            "{ca_served}"
        );
    }

    /// `FEDCART_INSECURE=yes` was refused while `FEDCART_LOG_JSON=yes`
    /// was read: both take the same values now, and only those.
    #[test]
    fn only_an_explicit_yes_selects_plaintext_as_every_boolean_variable_reads_it() {
        let read = |v: &str| insecure_from_env(Some(std::ffi::OsStr::new(v)));
        assert_eq!(insecure_from_env(None), Ok(false));
        for yes in ["true", "1", "yes", "on", "TRUE"] {
            assert_eq!(read(yes), Ok(true), "{yes}");
        }
        for no in ["false", "0", "no", "off"] {
            assert_eq!(read(no), Ok(false), "{no}");
        }
        for bad in ["", "TRUE ", "ture", "2"] {
            let err = read(bad).unwrap_err();
            assert!(err.to_string().contains("FEDCART_INSECURE"), "{err}");
        }
    }
}
