//! Binding each agent's advertised keys to its certificate identity, so a
//! coordinator that relays the roster cannot substitute keys of its own.
//!
//! In the advertise stage each agent signs [`signed_message`] — a
//! domain-separated encoding of the run id, round, task id (which names the
//! attempt), round seed, the digest of the task it was given
//! ([`task_digest`]), its merchant id and its whole [`AdvertiseKeys`]
//! (agent id, encryption, mask and survivor-signature keys) — with the
//! private key of its mutual-TLS certificate ([`AdvertSigner`], through the
//! rustls crypto provider's signing API). The coordinator relays with each
//! roster entry a [`KeyBinding`]: the signature and the certificate chain the
//! agent presented on its own mTLS connection, as the coordinator's TLS stack
//! saw it. Before using the roster every agent runs [`verify_roster_entries`]
//! over the entries whose keys it will use (its share holders, or all of
//! them when survivor lists are signed; [`verify_roster`] checks every
//! entry), and the coordinator relays to each agent only those bindings:
//! each certificate must chain to a CA the agent trusts, for client
//! authentication, at the current time (rustls-webpki); the identity in it
//! ([`crate::identity::identity_of`], the coordinator's own parser) must be
//! the entry's merchant id; the signature must verify with the certificate's
//! public key over the entry's keys in this round; and no merchant may hold
//! two entries. The coordinator checks each signature as it arrives
//! ([`verify_signature`]), so one merchant sending a bad signature only drops
//! itself instead of making every honest agent refuse the round.
//!
//! An agent checks the same peers' certificate chains round after round, so
//! [`TrustedCas::verify_client_chain`] remembers, process-wide, each chain it
//! has verified (by SHA-256 of the trust anchors and the chain's DER bytes)
//! with the window of time in which every certificate of the chain is
//! valid: the same chain under the same anchors at a time inside that
//! window is accepted without verifying its signatures again; at any other
//! time, or for any other bytes, it is verified in full. The result of a
//! full verification depends only on those bytes and the time, so the
//! answer is the same; a fleet's sessions share what any of them verified.
//! Advertisement signatures are verified every time: they are fresh each
//! round.
//!
//! The binding is exactly as strong as the CA: whoever holds the CA's key can
//! issue a certificate for any merchant id and sign keys under it. Keep the
//! CA key away from the coordinator's host (`certs init` writes it next to
//! the server's files only for convenience).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use rustls::SignatureScheme;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The time certificates are checked at ([`UnixTime::now`] on agents).
pub use rustls::pki_types::UnixTime;

use super::{AdvertiseKeys, KeyRoster};
use crate::identity::{InvalidMerchantId, identity_of, validate_id};

/// Domain separator of [`signed_message`]: the signature of an advertisement
/// can never be mistaken for a TLS handshake signature or any other message.
pub const DOMAIN: &[u8] = b"fedcart/secagg/key-advertisement/v2\0";

/// Domain separator of [`task_digest`].
pub const TASK_DOMAIN: &[u8] = b"fedcart/secagg/task/v1\0";

/// Signature schemes an advertisement may be signed with: the TLS 1.3
/// schemes (no PKCS#1 v1.5, no SHA-1), in order of preference.
pub const SCHEMES: [SignatureScheme; 6] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
];

/// The round an advertisement is signed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingContext {
    /// The coordinator's run.
    pub run_id: String,
    /// The round.
    pub round: u64,
    /// The task, which names the attempt (`r{round}a{attempt}-{kind}`).
    pub task_id: String,
    /// The public round seed of the invitation.
    pub round_seed: [u8; 32],
    /// [`task_digest`] of the task the agent trained: two agents sign the
    /// same bytes only for the same task, so an agent verifying a peer's
    /// entry also checks that the peer was given its own task.
    pub task_digest: [u8; 32],
}

/// SHA-256 of the task an agent was given, as the coordinator pushed it:
/// its spec's JSON bytes (hyper-parameters, DP settings, seed, model
/// shape), the model version it trains from, that version's length and its
/// digest ([`crate::federation::update::model_digest`], which the agent
/// checked the model it trained from against).
///
/// Bound into every advertisement ([`BindingContext::task_digest`]): a
/// coordinator that gave the other agents of a secure round another task
/// than merchant m's (a learning rate of 0, so that the unmasked sum is
/// m's update alone; a thinner DP noise, so that the sum carries less noise
/// than m is charged for; other model bytes under the same version) makes
/// their signatures fail m's verification, and m's theirs.
pub fn task_digest(
    spec_json: &[u8],
    model_version: u64,
    model_len: u64,
    model_digest: &[u8],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TASK_DOMAIN);
    h.update((spec_json.len() as u64).to_le_bytes());
    h.update(spec_json);
    h.update(model_version.to_le_bytes());
    h.update(model_len.to_le_bytes());
    h.update((model_digest.len() as u64).to_le_bytes());
    h.update(model_digest);
    h.finalize().into()
}

/// The bytes a merchant signs for its advertisement `keys` in the round
/// `ctx`: [`DOMAIN`], then every field length-prefixed (u32, little endian)
/// or of fixed width, so no two different inputs give the same bytes.
pub fn signed_message(ctx: &BindingContext, merchant_id: &str, keys: &AdvertiseKeys) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    let keys = keys.to_bytes();
    let mut out = Vec::with_capacity(DOMAIN.len() + 64 + keys.len() + ctx.run_id.len());
    out.extend_from_slice(DOMAIN);
    field(&mut out, ctx.run_id.as_bytes());
    out.extend_from_slice(&ctx.round.to_le_bytes());
    field(&mut out, ctx.task_id.as_bytes());
    out.extend_from_slice(&ctx.round_seed);
    out.extend_from_slice(&ctx.task_digest);
    field(&mut out, merchant_id.as_bytes());
    field(&mut out, &keys);
    out
}

/// A signature over [`signed_message`] and the TLS signature scheme that
/// made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySignature {
    /// TLS `SignatureScheme` code (e.g. 0x0403, ECDSA P-256 with SHA-256).
    pub scheme: u16,
    /// The signature bytes.
    pub signature: Vec<u8>,
}

/// What the coordinator relays beside one roster entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBinding {
    /// The entry's agent id in the round.
    pub agent: u32,
    /// The merchant the coordinator says advertised the entry.
    pub merchant_id: String,
    /// DER certificates the agent presented on its mTLS connection, end
    /// entity first (empty when the coordinator runs without TLS).
    pub certificate_chain: Vec<Vec<u8>>,
    /// The agent's signature (absent when it had no key to sign with).
    pub signature: Option<KeySignature>,
}

/// Why a key or CA file could not be used, or why one entry's binding does
/// not hold.
#[derive(Debug, Error, PartialEq)]
pub enum BindingError {
    /// The private key PEM holds no usable key.
    #[error("private key: {0}")]
    Key(String),
    /// The CA PEM holds no usable certificate.
    #[error("CA bundle: {0}")]
    Ca(String),
    /// The provider refused to sign.
    #[error("signing failed: {0}")]
    Sign(String),
    /// The roster relays no binding for the entry.
    #[error("no certificate binding was relayed for it")]
    Missing,
    /// No signature came with the entry.
    #[error("it is not signed")]
    NoSignature,
    /// No certificate came with the entry.
    #[error("no certificate came with it")]
    NoCertificate,
    /// The certificate does not chain to a trusted CA (or is expired, or
    /// not for client authentication).
    #[error("its certificate does not chain to a trusted CA for client authentication: {0}")]
    Untrusted(String),
    /// The certificate names no `fedcart://merchant/<id>`.
    #[error("its certificate names no fedcart merchant")]
    NoIdentity,
    /// The certificate belongs to another merchant.
    #[error("its certificate belongs to merchant `{certificate}`")]
    IdentityMismatch {
        /// The identity in the certificate.
        certificate: String,
    },
    /// The merchant id breaks the merchant-id rule.
    #[error(transparent)]
    BadMerchantId(#[from] InvalidMerchantId),
    /// The signature scheme is not one of [`SCHEMES`].
    #[error("signature scheme {0:#06x} is not accepted")]
    UnsupportedScheme(u16),
    /// The signature does not verify.
    #[error("its signature does not verify with its certificate's public key")]
    BadSignature,
    /// The merchant already holds another entry of the roster.
    #[error("the merchant also holds the entry of agent {other}")]
    Duplicate {
        /// The other entry's agent id.
        other: u32,
    },
}

/// A roster entry an agent refuses: which entry, whose, and why.
#[derive(Debug, Error, PartialEq)]
#[error("key advertisement of merchant `{merchant}` (agent {agent}) refused: {reason}")]
pub struct EntryRefused {
    /// The entry's agent id.
    pub agent: u32,
    /// The merchant id relayed with the entry (cut to 140 characters).
    pub merchant: String,
    /// What failed.
    pub reason: BindingError,
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The merchant's mutual-TLS private key, signing its advertisements.
pub struct AdvertSigner {
    key: Arc<dyn rustls::sign::SigningKey>,
}

impl std::fmt::Debug for AdvertSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdvertSigner")
            .field("algorithm", &self.key.algorithm())
            .finish()
    }
}

impl AdvertSigner {
    /// Loads the first private key of a PEM file (PKCS#8, SEC1 or PKCS#1)
    /// through the crypto provider's key loader.
    pub fn from_pem(pem: &[u8]) -> Result<Self, BindingError> {
        let der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &pem[..])
            .map_err(|e| BindingError::Key(e.to_string()))?
            .ok_or_else(|| BindingError::Key("no PRIVATE KEY block".into()))?;
        let key = provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| BindingError::Key(e.to_string()))?;
        Ok(Self { key })
    }

    /// Signs `message` with the first scheme of [`SCHEMES`] the key supports.
    pub fn sign(&self, message: &[u8]) -> Result<KeySignature, BindingError> {
        let signer = self.key.choose_scheme(&SCHEMES).ok_or_else(|| {
            BindingError::Sign(format!(
                "a {:?} key supports none of the accepted schemes",
                self.key.algorithm()
            ))
        })?;
        let signature = signer
            .sign(message)
            .map_err(|e| BindingError::Sign(e.to_string()))?;
        Ok(KeySignature {
            scheme: u16::from(signer.scheme()),
            signature,
        })
    }
}

/// The CA certificates an agent trusts for its peers' identities.
#[derive(Debug, Clone)]
pub struct TrustedCas {
    anchors: Vec<TrustAnchor<'static>>,
    /// SHA-256 of the anchors, the first part of a verified chain's key.
    anchors_digest: [u8; 32],
}

/// When every certificate of a verified chain is valid, in Unix seconds,
/// both ends included (as rustls-webpki checks them).
#[derive(Debug, Clone, Copy)]
struct Validity {
    not_before: i64,
    not_after: i64,
}

/// Chains this process has verified (see the module documentation), by
/// [`TrustedCas::chain_key`]. Bounded: emptied when it reaches
/// [`VERIFIED_CHAINS_MAX`] entries, which costs only re-verification.
static VERIFIED_CHAINS: LazyLock<Mutex<HashMap<[u8; 32], Validity>>> =
    LazyLock::new(Mutex::default);

/// At most this many remembered chains (about 4 MiB).
const VERIFIED_CHAINS_MAX: usize = 65_536;

/// Whether the chain with `key` was verified and `now` is inside its
/// window.
fn remembered(key: &[u8; 32], now: UnixTime) -> bool {
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    VERIFIED_CHAINS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(key)
        .is_some_and(|v| v.not_before <= now && now <= v.not_after)
}

/// The window in which every certificate of `chain` is valid, or `None` if
/// one of them does not parse (then nothing is remembered).
fn validity_of(chain: &[CertificateDer<'_>]) -> Option<Validity> {
    let mut window = Validity {
        not_before: i64::MIN,
        not_after: i64::MAX,
    };
    for cert in chain {
        let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let v = cert.validity();
        window.not_before = window.not_before.max(v.not_before.timestamp());
        window.not_after = window.not_after.min(v.not_after.timestamp());
    }
    Some(window)
}

impl TrustedCas {
    /// Every certificate of a PEM bundle, as trust anchors.
    pub fn from_pem(pem: &[u8]) -> Result<Self, BindingError> {
        let mut anchors = Vec::new();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.map_err(|e| BindingError::Ca(e.to_string()))?;
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|e| BindingError::Ca(e.to_string()))?;
            anchors.push(anchor.to_owned());
        }
        if anchors.is_empty() {
            return Err(BindingError::Ca("no CERTIFICATE block".into()));
        }
        let mut h = Sha256::new();
        h.update(b"fedcart/trusted-cas/v1\0");
        for a in &anchors {
            let constraints = a.name_constraints.as_ref().map(|c| c.as_ref());
            for part in [
                Some(a.subject.as_ref()),
                Some(a.subject_public_key_info.as_ref()),
                constraints,
            ] {
                match part {
                    Some(bytes) => {
                        h.update([1]);
                        h.update((bytes.len() as u64).to_le_bytes());
                        h.update(bytes);
                    }
                    None => h.update([0]),
                }
            }
        }
        Ok(Self {
            anchors,
            anchors_digest: h.finalize().into(),
        })
    }

    /// The key of a chain verified under these anchors.
    fn chain_key(&self, chain: &[CertificateDer<'_>]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.anchors_digest);
        h.update((chain.len() as u64).to_le_bytes());
        for cert in chain {
            h.update((cert.len() as u64).to_le_bytes());
            h.update(cert.as_ref());
        }
        h.finalize().into()
    }

    /// Whether this process remembers `chain` as verified under these
    /// anchors at `now`.
    #[cfg(test)]
    fn remembers(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> bool {
        remembered(&self.chain_key(chain), now)
    }

    /// Checks that the DER chain (end entity first) chains to one of these
    /// CAs for client authentication at `now`. The coordinator verifies an
    /// agent's certificate the same way on every connection, so an agent
    /// checks its own with this before connecting. A chain this process
    /// verified under the same anchors is accepted again without checking
    /// its signatures while `now` is inside every certificate's validity
    /// (module documentation).
    pub fn verify_client_chain(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), BindingError> {
        let key = self.chain_key(chain);
        if remembered(&key, now) {
            return Ok(());
        }
        self.verify_chain_in_full(chain, now)?;
        if let Some(validity) = validity_of(chain) {
            let mut verified = VERIFIED_CHAINS
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if verified.len() >= VERIFIED_CHAINS_MAX {
                verified.clear();
            }
            verified.insert(key, validity);
        }
        Ok(())
    }

    /// [`Self::verify_client_chain`] without the memory of verified chains.
    fn verify_chain_in_full(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), BindingError> {
        let (ee, intermediates) = chain.split_first().ok_or(BindingError::NoCertificate)?;
        let cert = webpki::EndEntityCert::try_from(ee)
            .map_err(|e| BindingError::Untrusted(e.to_string()))?;
        cert.verify_for_usage(
            provider().signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| BindingError::Untrusted(untrusted_reason(&e)))
    }
}

/// A chain verification failure as a person reads it: dates for an expired
/// or not yet valid certificate, the usual causes named, webpki's own
/// wording otherwise.
fn untrusted_reason(e: &webpki::Error) -> String {
    let date = |t: UnixTime| {
        chrono::DateTime::from_timestamp(t.as_secs() as i64, 0).map_or_else(
            || format!("{} s", t.as_secs()),
            |d| d.format("%Y-%m-%d %H:%M UTC").to_string(),
        )
    };
    match e {
        webpki::Error::CertExpired { time, not_after } => format!(
            "the certificate expired on {} (it is now {}): renew it (`certs issue --force`)",
            date(*not_after),
            date(*time)
        ),
        webpki::Error::CertNotValidYet { time, not_before } => format!(
            "the certificate is valid only from {} (it is now {}): check this machine's clock",
            date(*not_before),
            date(*time)
        ),
        webpki::Error::UnknownIssuer => "it was not issued by this CA".into(),
        webpki::Error::InvalidSignatureForPublicKey => {
            "its signature does not verify under this CA's key".into()
        }
        other => other.to_string(),
    }
}

/// Verifies `sig` over `message` with the public key of the DER end-entity
/// certificate `cert`. Does not look at the certificate's chain: the
/// coordinator calls this on the certificate the TLS handshake verified,
/// agents through [`verify_entry`].
pub fn verify_signature(
    cert: &[u8],
    message: &[u8],
    sig: &KeySignature,
) -> Result<(), BindingError> {
    let scheme = SignatureScheme::from(sig.scheme);
    if !SCHEMES.contains(&scheme) {
        return Err(BindingError::UnsupportedScheme(sig.scheme));
    }
    let algs = provider().signature_verification_algorithms;
    let alg = algs
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .and_then(|(_, algs)| algs.first())
        .ok_or(BindingError::UnsupportedScheme(sig.scheme))?;
    let der = CertificateDer::from(cert);
    let ee = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| BindingError::Untrusted(e.to_string()))?;
    ee.verify_signature(*alg, message, &sig.signature)
        .map_err(|_| BindingError::BadSignature)
}

/// Checks one roster entry: certificate chain to `cas` for client
/// authentication at `now`, the certificate's identity equal to the entry's
/// merchant id, and the signature over the entry's keys in `ctx`.
pub fn verify_entry(
    cas: &TrustedCas,
    ctx: &BindingContext,
    keys: &AdvertiseKeys,
    binding: &KeyBinding,
    now: UnixTime,
) -> Result<(), BindingError> {
    validate_id(&binding.merchant_id)?;
    let (ee, intermediates) = binding
        .certificate_chain
        .split_first()
        .ok_or(BindingError::NoCertificate)?;
    let sig = binding
        .signature
        .as_ref()
        .ok_or(BindingError::NoSignature)?;
    let chain: Vec<CertificateDer<'_>> = std::iter::once(ee)
        .chain(intermediates)
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    cas.verify_client_chain(&chain, now)?;
    match identity_of(ee) {
        None => return Err(BindingError::NoIdentity),
        Some(id) if id != binding.merchant_id => {
            return Err(BindingError::IdentityMismatch {
                certificate: id.chars().take(140).collect(),
            });
        }
        Some(_) => {}
    }
    verify_signature(ee, &signed_message(ctx, &binding.merchant_id, keys), sig)
}

/// Checks every entry of `roster` against its binding with
/// [`verify_entry`], and that no merchant holds two entries. The first entry
/// that fails is the error. See [`verify_roster_entries`].
pub fn verify_roster(
    cas: &TrustedCas,
    ctx: &BindingContext,
    roster: &KeyRoster,
    bindings: &[KeyBinding],
    now: UnixTime,
) -> Result<(), EntryRefused> {
    verify_roster_entries(cas, ctx, roster, bindings, now, |_| true)
}

/// Checks the entries of `roster` whose agent id satisfies `used` against
/// their bindings (found by agent id) with [`verify_entry`], and that no
/// merchant holds two of them. An agent passes the ids whose keys it will
/// use ([`ClientSession::keys_used`](super::ClientSession::keys_used): its
/// share holders, or everyone when survivor lists are signed): a key it never
/// uses cannot carry a secret of its, so only those need a verified binding,
/// and under SecAgg+ each agent checks k + 1 certificates instead of n.
pub fn verify_roster_entries(
    cas: &TrustedCas,
    ctx: &BindingContext,
    roster: &KeyRoster,
    bindings: &[KeyBinding],
    now: UnixTime,
    used: impl Fn(u32) -> bool,
) -> Result<(), EntryRefused> {
    let by_agent: std::collections::BTreeMap<u32, &KeyBinding> =
        bindings.iter().map(|b| (b.agent, b)).collect();
    let mut seen = std::collections::BTreeMap::new();
    for keys in roster.keys.iter().filter(|k| used(k.id)) {
        let binding = by_agent.get(&keys.id).copied();
        let merchant = binding.map_or_else(|| "?".to_string(), |b| b.merchant_id.clone());
        let refuse = |reason| EntryRefused {
            agent: keys.id,
            merchant: merchant.chars().take(140).collect(),
            reason,
        };
        let binding = binding.ok_or_else(|| refuse(BindingError::Missing))?;
        if let Some(&other) = seen.get(&binding.merchant_id) {
            return Err(refuse(BindingError::Duplicate { other }));
        }
        verify_entry(cas, ctx, keys, binding, now).map_err(refuse)?;
        seen.insert(binding.merchant_id.clone(), keys.id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };

    use super::*;
    use crate::identity::merchant_uri;

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn new_ca(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = p.clone().self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(p, key),
        }
    }

    /// A client certificate naming `id`, and a signer with its key.
    fn merchant(ca: &Ca, id: &str) -> (Vec<u8>, AdvertSigner) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![SanType::URI(merchant_uri(id).try_into().unwrap())];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        let signer = AdvertSigner::from_pem(key.serialize_pem().as_bytes()).unwrap();
        (cert.der().to_vec(), signer)
    }

    fn keys(id: u32, fill: u8) -> AdvertiseKeys {
        AdvertiseKeys {
            id,
            enc_pk: [fill; 32],
            mask_pk: [fill ^ 0x55; 32],
            sig_pk: Some([fill ^ 0xaa; 32]),
        }
    }

    fn ctx() -> BindingContext {
        BindingContext {
            run_id: "run".into(),
            round: 3,
            task_id: "r3a0-train".into(),
            round_seed: [9; 32],
            task_digest: task_digest(br#"{"lr":0.05}"#, 3, 10, &[7; 32]),
        }
    }

    fn bind(cert: &[u8], signer: &AdvertSigner, merchant: &str, k: &AdvertiseKeys) -> KeyBinding {
        KeyBinding {
            agent: k.id,
            merchant_id: merchant.into(),
            certificate_chain: vec![cert.to_vec()],
            signature: Some(signer.sign(&signed_message(&ctx(), merchant, k)).unwrap()),
        }
    }

    /// Three merchants' honest roster and bindings, under `ca`.
    fn honest(ca: &Ca) -> (KeyRoster, Vec<KeyBinding>) {
        let roster = KeyRoster {
            ids: vec![0, 1, 2],
            keys: (0..3).map(|i| keys(i, i as u8 + 1)).collect(),
        };
        let bindings = roster
            .keys
            .iter()
            .map(|k| {
                let id = format!("m{}", k.id);
                let (cert, signer) = merchant(ca, &id);
                bind(&cert, &signer, &id, k)
            })
            .collect();
        (roster, bindings)
    }

    fn verify(ca: &Ca, roster: &KeyRoster, bindings: &[KeyBinding]) -> Result<(), EntryRefused> {
        let cas = TrustedCas::from_pem(ca.pem.as_bytes()).unwrap();
        verify_roster(&cas, &ctx(), roster, bindings, UnixTime::now())
    }

    #[test]
    fn an_honest_roster_verifies_and_each_forgery_is_refused_naming_the_entry() {
        let ca = new_ca("fedcart CA");
        let (roster, bindings) = honest(&ca);
        assert_eq!(verify(&ca, &roster, &bindings), Ok(()));

        // Keys substituted under the merchant's own signature and certificate.
        let mut swapped = roster.clone();
        swapped.keys[2] = keys(2, 0xee);
        let err = verify(&ca, &swapped, &bindings).unwrap_err();
        assert_eq!((err.agent, err.merchant.as_str()), (2, "m2"));
        assert_eq!(err.reason, BindingError::BadSignature);
        assert_eq!(
            err.to_string(),
            "key advertisement of merchant `m2` (agent 2) refused: its signature does not verify \
             with its certificate's public key"
        );

        // Another merchant's certificate and signature for the entry of m2.
        let (cert, signer) = merchant(&ca, "m7");
        let mut other = bindings.clone();
        other[2] = bind(&cert, &signer, "m2", &roster.keys[2]);
        let err = verify(&ca, &roster, &other).unwrap_err();
        assert_eq!(
            err.reason,
            BindingError::IdentityMismatch {
                certificate: "m7".into()
            }
        );

        // A certificate for m2 from a CA the agents do not trust.
        let rogue = new_ca("rogue CA");
        let (cert, signer) = merchant(&rogue, "m2");
        let mut foreign = bindings.clone();
        foreign[2] = bind(&cert, &signer, "m2", &roster.keys[2]);
        let err = verify(&ca, &roster, &foreign).unwrap_err();
        assert!(matches!(err.reason, BindingError::Untrusted(_)), "{err}");

        // One merchant signing two entries.
        let (cert, signer) = merchant(&ca, "m1");
        let mut twice = bindings.clone();
        twice[2] = bind(&cert, &signer, "m1", &roster.keys[2]);
        let err = verify(&ca, &roster, &twice).unwrap_err();
        assert_eq!(err.reason, BindingError::Duplicate { other: 1 });

        // No signature, no certificate, no binding at all.
        let mut unsigned = bindings.clone();
        unsigned[0].signature = None;
        assert_eq!(
            verify(&ca, &roster, &unsigned).unwrap_err().reason,
            BindingError::NoSignature
        );
        let mut bare = bindings.clone();
        bare[0].certificate_chain.clear();
        assert_eq!(
            verify(&ca, &roster, &bare).unwrap_err().reason,
            BindingError::NoCertificate
        );
        assert_eq!(
            verify(&ca, &roster, &bindings[..2]).unwrap_err().reason,
            BindingError::Missing
        );
    }

    #[test]
    fn a_signature_holds_only_for_its_round_task_merchant_and_keys() {
        let ca = new_ca("fedcart CA");
        let (cert, signer) = merchant(&ca, "m0");
        let k = keys(0, 1);
        let sig = signer.sign(&signed_message(&ctx(), "m0", &k)).unwrap();
        let check = |c: &BindingContext, m: &str, k: &AdvertiseKeys| {
            verify_signature(&cert, &signed_message(c, m, k), &sig)
        };
        assert_eq!(check(&ctx(), "m0", &k), Ok(()));
        let other_round = [
            BindingContext { round: 4, ..ctx() },
            BindingContext {
                task_id: "r3a1-train".into(),
                ..ctx()
            },
            BindingContext {
                run_id: "other".into(),
                ..ctx()
            },
            BindingContext {
                round_seed: [8; 32],
                ..ctx()
            },
            // Another task under the same id: the learning rate, the model
            // version, its length or its bytes.
            BindingContext {
                task_digest: task_digest(br#"{"lr":0.0}"#, 3, 10, &[7; 32]),
                ..ctx()
            },
            BindingContext {
                task_digest: task_digest(br#"{"lr":0.05}"#, 2, 10, &[7; 32]),
                ..ctx()
            },
            BindingContext {
                task_digest: task_digest(br#"{"lr":0.05}"#, 3, 11, &[7; 32]),
                ..ctx()
            },
            BindingContext {
                task_digest: task_digest(br#"{"lr":0.05}"#, 3, 10, &[8; 32]),
                ..ctx()
            },
        ];
        for c in &other_round {
            assert_eq!(check(c, "m0", &k), Err(BindingError::BadSignature), "{c:?}");
        }
        assert_eq!(check(&ctx(), "m1", &k), Err(BindingError::BadSignature));
        assert_eq!(
            check(&ctx(), "m0", &AdvertiseKeys { id: 1, ..k.clone() }),
            Err(BindingError::BadSignature)
        );
        // Length prefixes: moving bytes between fields changes the message.
        let a = BindingContext {
            run_id: "ab".into(),
            task_id: "c".into(),
            ..ctx()
        };
        let b = BindingContext {
            run_id: "a".into(),
            task_id: "bc".into(),
            ..ctx()
        };
        assert_ne!(signed_message(&a, "m0", &k), signed_message(&b, "m0", &k));
        assert!(signed_message(&a, "m0", &k).starts_with(DOMAIN));
        let weak = KeySignature {
            scheme: 0x0401, // RSA PKCS#1 v1.5 with SHA-256: not accepted
            ..sig.clone()
        };
        assert_eq!(
            verify_signature(&cert, &signed_message(&ctx(), "m0", &k), &weak),
            Err(BindingError::UnsupportedScheme(0x0401))
        );
    }

    /// A CA-signed certificate valid from `from` to `to` (years, 1 January):
    /// an intermediate CA when `id` is `None`, else a client certificate.
    fn issued(
        ca: &Ca,
        id: Option<&str>,
        from: i32,
        to: i32,
    ) -> (Vec<u8>, CertificateParams, KeyPair) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
        match id {
            Some(id) => {
                p.subject_alt_names = vec![SanType::URI(merchant_uri(id).try_into().unwrap())];
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            None => {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
                p.distinguished_name
                    .push(DnType::CommonName, "intermediate");
            }
        }
        let key = KeyPair::generate().unwrap();
        let der = p.signed_by(&key, &ca.issuer).unwrap().der().to_vec();
        (der, p, key)
    }

    /// 1 January of `year`, noon.
    fn at(year: i32) -> UnixTime {
        let t = rcgen::date_time_ymd(year, 1, 1).unix_timestamp() + 12 * 3600;
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(t as u64))
    }

    /// An expired or not yet valid certificate is refused with its dates,
    /// and another CA's with the cause, not webpki's debug form.
    #[test]
    fn a_refused_chain_says_why_in_words_and_dates() {
        let root = new_ca("fedcart root");
        let (leaf, _, _) = issued(&root, Some("m7"), 2024, 2026);
        let chain = [CertificateDer::from(leaf.as_slice())];
        let cas = TrustedCas::from_pem(root.pem.as_bytes()).unwrap();
        let why = |cas: &TrustedCas, year| match cas.verify_chain_in_full(&chain, at(year)) {
            Err(BindingError::Untrusted(why)) => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            why(&cas, 2030),
            "the certificate expired on 2026-01-01 00:00 UTC (it is now 2030-01-01 12:00 UTC): \
             renew it (`certs issue --force`)"
        );
        assert!(why(&cas, 2023).starts_with("the certificate is valid only from 2024-01-01"));
        let other = TrustedCas::from_pem(new_ca("other").pem.as_bytes()).unwrap();
        assert_eq!(why(&other, 2025), "it was not issued by this CA");
    }

    /// The memory of verified chains answers as a full verification would:
    /// a remembered chain is refused outside the validity of its shortest-
    /// lived certificate (here the intermediate), under other anchors, and
    /// when one byte differs; a refused chain is never remembered.
    #[test]
    fn a_remembered_chain_is_accepted_only_where_a_full_verification_accepts_it() {
        let root = new_ca("fedcart root");
        let (inter_der, inter_params, inter_key) = issued(&root, None, 2020, 2031);
        let inter = Ca {
            pem: String::new(),
            issuer: Issuer::new(inter_params, inter_key),
        };
        let (leaf, _, _) = issued(&inter, Some("m7"), 2024, 2040);
        let chain = [
            CertificateDer::from(leaf.as_slice()),
            CertificateDer::from(inter_der.as_slice()),
        ];
        let cas = TrustedCas::from_pem(root.pem.as_bytes()).unwrap();
        assert!(!cas.remembers(&chain, at(2027)));
        assert_eq!(cas.verify_client_chain(&chain, at(2027)), Ok(()));
        assert!(cas.remembers(&chain, at(2027)), "remembered once verified");
        assert!(cas.remembers(&chain, at(2030)));
        for year in [2023, 2032, 2039] {
            assert!(!cas.remembers(&chain, at(year)), "{year}");
            let full = cas.verify_chain_in_full(&chain, at(year));
            assert!(full.is_err(), "{year}");
            assert_eq!(cas.verify_client_chain(&chain, at(year)), full, "{year}");
        }
        assert_eq!(cas.verify_client_chain(&chain, at(2030)), Ok(()));

        // Another CA's agent has not verified it, and refuses it.
        let other = TrustedCas::from_pem(new_ca("other").pem.as_bytes()).unwrap();
        assert!(!other.remembers(&chain, at(2027)));
        assert!(other.verify_client_chain(&chain, at(2027)).is_err());
        assert!(
            !other.remembers(&chain, at(2027)),
            "a refusal is not remembered"
        );

        // One flipped bit of the leaf's signature: new bytes, verified in full.
        let mut forged = leaf.clone();
        *forged.last_mut().unwrap() ^= 1;
        let forged_chain = [
            CertificateDer::from(forged.as_slice()),
            CertificateDer::from(inter_der.as_slice()),
        ];
        assert!(!cas.remembers(&forged_chain, at(2027)));
        assert!(cas.verify_client_chain(&forged_chain, at(2027)).is_err());
        // The leaf alone, without its intermediate, does not chain.
        assert!(cas.verify_client_chain(&chain[..1], at(2027)).is_err());
    }

    #[test]
    fn unusable_key_and_ca_files_are_refused_with_the_reason() {
        assert!(matches!(
            AdvertSigner::from_pem(b"no key here"),
            Err(BindingError::Key(_))
        ));
        assert!(matches!(
            TrustedCas::from_pem(b"no certificate here"),
            Err(BindingError::Ca(_))
        ));
    }
}
