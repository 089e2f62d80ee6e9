//! The agent's side of mutual TLS: the CA to trust, the merchant's own
//! certificate (issued with identity `fedcart://merchant/<id>`) and key.
//! The files are checked before the first connection (PEM contents, a key
//! that matches the certificate), so that a wrong file is one clear error
//! naming it rather than a failed handshake retried for ever.

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
    /// A PEM file holds nothing of what it should.
    #[error("the TLS {role} {} holds no PEM {what}", path.display())]
    Empty {
        /// Which file.
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
    },
    /// A certificate of the CA bundle is not usable.
    #[error("the TLS CA bundle {}", path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// Why rustls refused it.
        #[source]
        source: rustls::Error,
    },
    /// The private key is not the certificate's.
    #[error("the TLS private key {} is not the key of the certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The key and certificate do not make an identity for another reason
    /// (e.g. an unsupported key type).
    #[error("the TLS private key {} and certificate {}", key.display(), cert.display())]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why rustls refused them (e.g. "private key does not match the
        /// certificate").
        #[source]
        source: rustls::Error,
    },
    /// The merchant's certificate does not chain to the CA bundle (another
    /// CA issued it, or it has expired): the coordinator, which trusts the
    /// same platform CA for merchants, would refuse it after the handshake.
    #[error(
        "the TLS certificate {} is not valid under the CA bundle {}: {reason}{advice}",
        cert.display(),
        ca.display()
    )]
    NotIssuedByCa {
        /// The certificate file.
        cert: PathBuf,
        /// The CA bundle.
        ca: PathBuf,
        /// What the verifier found (unknown issuer, expired, ...).
        reason: String,
        /// What to do, when the reason is not a date (empty then).
        advice: &'static str,
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
        let (ca, cert, key) = (
            read("CA bundle", &self.ca)?,
            read("certificate", &self.cert)?,
            read("private key", &self.key)?,
        );
        self.check(&ca, &cert, &key)?;
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key));
        if let Some(d) = &self.domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(cfg)
    }
}

impl AgentTls {
    /// Builds the rustls configuration the transport will build, to report
    /// a wrong file by name before any connection is tried.
    fn check(&self, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<(), TlsError> {
        let certs = |role, path: &PathBuf, pem: &[u8]| {
            let found: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
                .filter_map(Result::ok)
                .collect();
            if found.is_empty() {
                return Err(TlsError::Empty {
                    role,
                    path: path.clone(),
                    what: "certificate",
                });
            }
            Ok(found)
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in certs("CA bundle", &self.ca, ca)? {
            roots.add(c).map_err(|source| TlsError::Ca {
                path: self.ca.clone(),
                source,
            })?;
        }
        let chain = certs("certificate", &self.cert, cert)?;
        let empty = || TlsError::Empty {
            role: "private key",
            path: self.key.clone(),
            what: "private key",
        };
        let key = rustls_pemfile::private_key(&mut &key[..])
            .map_err(|_| empty())?
            .ok_or_else(empty)?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let identity = |source| match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                }
            }
            source => TlsError::Identity {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source,
            },
        };
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(identity)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain.clone(), key)
            .map_err(identity)?;
        let cas = TrustedCas::from_pem(ca).map_err(|source| TlsError::Binding {
            role: "CA bundle",
            path: self.ca.clone(),
            source,
        })?;
        cas.verify_client_chain(&chain, rustls::pki_types::UnixTime::now())
            .map_err(|e| {
                let reason = match e {
                    BindingError::Untrusted(why) => why,
                    other => other.to_string(),
                };
                // An expired or not yet valid certificate says what to do.
                let dated = reason.contains("expired on") || reason.contains("valid only from");
                TlsError::NotIssuedByCa {
                    cert: self.cert.clone(),
                    ca: self.ca.clone(),
                    reason,
                    advice: if dated {
                        ""
                    } else {
                        "; `tls.cert` and `tls.key` must be issued by the platform's CA \
                         (`certs issue`), the one in `tls.ca`"
                    },
                }
            })
    }
}
