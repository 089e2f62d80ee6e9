//! Merchant identity: who is on the other end of a mutual-TLS connection, and
//! whether they may take part.
//!
//! A merchant's identity is the URI SAN `fedcart://merchant/<id>` of its
//! client certificate (the TLS handshake has already checked that the
//! certificate chains to the configured CA), read by [`identity_of`]: the id
//! rule and the parser live in `fedcart_common::identity`, shared with the
//! agents, which read the same identity from the certificates relayed with a
//! secure round's key roster. [`Access`] holds the allow-list
//! and revocation list from a TOML file; the file is re-read whenever its
//! modification time or size changes, so `certs allow`/`certs revoke` take
//! effect without a restart. [`AccessInterceptor`] runs before every RPC:
//! it refuses unknown, revoked or certificate-less callers with a log line
//! naming the identity, and attaches a [`PeerIdentity`] that `join` compares
//! with the merchant id the agent claims. The server also re-reads the list
//! every [`ACCESS_RECHECK`] and closes the open sessions of merchants it no
//! longer admits (`service::Shared::close_refused`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tonic::{Request, Status};

/// How often the coordinator re-reads the access list to close the open
/// sessions of merchants revoked (or removed) since they joined.
pub const ACCESS_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

pub use fedcart_common::identity::{
    InvalidMerchantId, MAX_MERCHANT_ID_LEN, MERCHANT_URI_PREFIX, OPERATOR_URI_PREFIX, Role,
    identity_of, merchant_uri, operator_uri, role_of, validate_id,
};

/// The access file: who may join, which certificates are revoked
/// (revocation wins).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessList {
    /// Merchant ids admitted.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Merchant ids refused whatever their certificate (older access files;
    /// `certs revoke` now revokes certificates by serial).
    #[serde(default)]
    pub revoked: Vec<String>,
    /// Revoked certificates, by serial number (lower-case hex, as
    /// [`serial_of`] prints it), merchant or operator: a re-issued
    /// certificate has a new serial, the revoked one stays refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_serials: Vec<String>,
}

/// The serial number of a DER certificate, as lower-case hex without
/// separators (`None` for bytes that are not a certificate).
pub fn serial_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(
        cert.raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

impl AccessList {
    /// Reads `path`; a missing file is an empty list.
    pub fn load_or_default(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("{}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The TOML text of the list.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("string lists serialise")
    }

    /// Why the certificate with `serial` is refused, if it is revoked.
    pub fn serial_refusal(&self, serial: &str) -> Option<&'static str> {
        self.revoked_serials
            .iter()
            .any(|r| r == serial)
            .then_some("revoked (its certificate's serial is on the revocation list)")
    }

    /// Why merchant `id` is refused, if it is.
    pub fn refusal(&self, id: &str) -> Option<&'static str> {
        if self.revoked.iter().any(|r| r == id) {
            Some("revoked")
        } else if !self.allow.iter().any(|a| a == id) {
            Some("not on the allow-list")
        } else {
            None
        }
    }
}

/// An [`AccessList`] indexed for the lookups every RPC makes, so that they
/// cost the same with a hundred thousand merchants as with ten.
#[derive(Debug, Default)]
pub struct Admission {
    allow: std::collections::HashSet<String>,
    revoked: std::collections::HashSet<String>,
    revoked_serials: std::collections::HashSet<String>,
}

impl From<&AccessList> for Admission {
    fn from(list: &AccessList) -> Self {
        Self {
            allow: list.allow.iter().cloned().collect(),
            revoked: list.revoked.iter().cloned().collect(),
            revoked_serials: list.revoked_serials.iter().cloned().collect(),
        }
    }
}

impl Admission {
    /// As [`AccessList::serial_refusal`].
    pub fn serial_refusal(&self, serial: &str) -> Option<&'static str> {
        self.revoked_serials
            .contains(serial)
            .then_some("revoked (its certificate's serial is on the revocation list)")
    }

    /// As [`AccessList::refusal`].
    pub fn refusal(&self, id: &str) -> Option<&'static str> {
        if self.revoked.contains(id) {
            Some("revoked")
        } else if !self.allow.contains(id) {
            Some("not on the allow-list")
        } else {
            None
        }
    }
}

/// When and how big the access file was when last read.
type Stamp = Option<(SystemTime, u64)>;

/// What [`Access`] last read.
struct Cached {
    /// The file's stamp when it was last looked at.
    stamp: Stamp,
    /// Whether the file was ever looked at (a missing file at the start is
    /// an empty list; one that disappears later keeps the list it had).
    loaded: bool,
    list: AccessList,
    /// The index of `list`, shared by every RPC until the file changes: no
    /// per-RPC copy of the list.
    index: Arc<Admission>,
}

/// The allow-list file, re-read when it changes.
pub struct Access {
    path: PathBuf,
    cached: Mutex<Cached>,
}

impl Access {
    /// Watches `path` (which may not exist yet: then nobody is admitted).
    pub fn new(path: impl Into<PathBuf>) -> anyhow::Result<Arc<Self>> {
        let access = Self {
            path: path.into(),
            cached: Mutex::new(Cached {
                stamp: None,
                loaded: false,
                list: AccessList::default(),
                index: Arc::default(),
            }),
        };
        access.current()?;
        Ok(Arc::new(access))
    }

    /// The list as it is on disk now. Keeps the last good list (and logs
    /// why, once per change of the file) when the file became unreadable or
    /// invalid, and when a file that held entries is found empty or gone:
    /// that is what a file being rewritten in place (truncated, then
    /// written) or replaced by delete-and-create looks like between two
    /// writes, and taking it at its word would refuse every merchant and
    /// forget every revocation until the next write lands. To admit nobody,
    /// write `allow = []`.
    pub fn current(&self) -> anyhow::Result<Arc<Admission>> {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if cached.loaded && cached.stamp == stamp {
            return Ok(Arc::clone(&cached.index));
        }
        let held = |what: &str| {
            tracing::warn!(path = %self.path.display(),
                "access list {what}; keeping the previous one (a file being rewritten looks like \
                 this; to admit nobody, write `allow = []`)")
        };
        let had_entries = cached.list != AccessList::default();
        match std::fs::read_to_string(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && had_entries => {
                held("file is gone")
            }
            Ok(text) if text.trim().is_empty() && had_entries => held("file is empty"),
            read => {
                let parsed = match read {
                    Ok(text) => {
                        toml::from_str(&text).with_context(|| format!("{}", self.path.display()))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AccessList::default()),
                    Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
                };
                match parsed {
                    Ok(list) => {
                        if list != cached.list {
                            tracing::info!(path = %self.path.display(), allowed = list.allow.len(),
                                revoked_merchants = list.revoked.len(),
                                revoked_certificates = list.revoked_serials.len(), "access list loaded");
                        }
                        cached.index = Arc::new(Admission::from(&list));
                        cached.list = list;
                    }
                    Err(e) if !cached.loaded => return Err(e),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "access list unreadable; keeping the previous one")
                    }
                }
            }
        }
        cached.stamp = stamp;
        cached.loaded = true;
        Ok(Arc::clone(&cached.index))
    }
}

/// The merchant certificate identity of the caller, attached to each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub String);

/// The serial of the caller's certificate, attached to each request with
/// its identity (sessions keep it, so revoking the certificate closes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSerial(pub String);

/// The operator certificate identity of the caller, attached to each
/// request instead of a [`PeerIdentity`]: admin and status RPCs only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorIdentity(pub String);

/// Refuses callers without an admitted certificate identity: a merchant on
/// the allow-list, or an operator certificate the CA issued; either is
/// refused when its certificate's serial (or, for merchants, its id) is
/// revoked.
#[derive(Clone)]
pub struct AccessInterceptor {
    /// The allow-list.
    pub access: Arc<Access>,
}

impl tonic::service::Interceptor for AccessInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let remote = req.remote_addr();
        let Some(certs) = req.peer_certs() else {
            tracing::warn!(?remote, "refused: no client certificate");
            return Err(Status::unauthenticated("a client certificate is required"));
        };
        let Some(leaf) = certs.first() else {
            return Err(Status::unauthenticated("a client certificate is required"));
        };
        let Some(role) = role_of(leaf) else {
            tracing::warn!(
                ?remote,
                "refused: certificate has no (or more than one) fedcart identity"
            );
            return Err(Status::unauthenticated(
                "the client certificate names no fedcart://merchant/<id> or \
                 fedcart://operator/<name>",
            ));
        };
        let serial = serial_of(leaf).unwrap_or_default();
        let list = self.access.current().map_err(|e| {
            tracing::error!(error = %format!("{e:#}"), "access list unavailable");
            Status::unavailable("access list unavailable")
        })?;
        let refusal = list.serial_refusal(&serial).or(match &role {
            Role::Merchant(id) => list.refusal(id),
            Role::Operator(_) => None,
        });
        if let Some(why) = refusal {
            tracing::warn!(%role, serial, ?remote, reason = why, "refused");
            return Err(Status::permission_denied(format!("{role} is {why}")));
        }
        req.extensions_mut().insert(CertSerial(serial));
        match role {
            Role::Merchant(id) => req.extensions_mut().insert(PeerIdentity(id)),
            Role::Operator(name) => {
                req.extensions_mut().insert(OperatorIdentity(name));
                None
            }
        };
        Ok(req)
    }
}

/// Operator certificates run the platform and never take part as a
/// merchant: every merchant RPC refuses them.
fn refuse_operator(ext: &tonic::Extensions) -> Result<(), Status> {
    match ext.get::<OperatorIdentity>() {
        Some(OperatorIdentity(name)) => {
            tracing::warn!(operator = %name, "refused: an operator certificate on a merchant RPC");
            Err(Status::permission_denied(format!(
                "operator `{name}` may not take part as a merchant: use a merchant certificate"
            )))
        }
        None => Ok(()),
    }
}

/// In `join`: the claimed merchant id must be the certificate's identity
/// (when the connection has one; plaintext `--insecure` mode has none).
pub fn check_claim(ext: &tonic::Extensions, claimed: &str) -> Result<(), Status> {
    refuse_operator(ext)?;
    match ext.get::<PeerIdentity>() {
        Some(PeerIdentity(id)) if id != claimed => {
            // The claim is the caller's to size: shown cut, like any id.
            let mut shown: String = claimed.chars().take(140).collect();
            if shown.len() < claimed.len() {
                shown.push('…');
            }
            let claimed = shown;
            tracing::warn!(merchant = %id, claimed, "refused: join claims another merchant id");
            Err(Status::permission_denied(format!(
                "certificate identity `{id}` may not join as `{claimed}`"
            )))
        }
        _ => Ok(()),
    }
}

/// The caller's merchant identity, taken before a request is consumed
/// (`None` in plaintext mode); an operator is refused.
pub fn peer<T>(req: &Request<T>) -> Result<Option<PeerIdentity>, Status> {
    refuse_operator(req.extensions())?;
    Ok(req.extensions().get::<PeerIdentity>().cloned())
}

/// Who called a read-only RPC such as `Status`: the whole view for an
/// operator (and in plaintext mode, which has no identities), the caller's
/// own for a merchant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// An operator, or nobody in particular (plaintext mode).
    Operator,
    /// A merchant: sees itself only.
    Merchant(String),
}

/// The [`Viewer`] of a request.
pub fn viewer<T>(req: &Request<T>) -> Viewer {
    match req.extensions().get::<PeerIdentity>() {
        Some(PeerIdentity(id)) => Viewer::Merchant(id.clone()),
        None => Viewer::Operator,
    }
}

/// A session belongs to the merchant that joined it: another certificate
/// may not use its session id (plaintext mode has no identities to compare).
pub fn check_session(peer: Option<&PeerIdentity>, session_merchant: &str) -> Result<(), Status> {
    match peer {
        Some(PeerIdentity(id)) if id != session_merchant => {
            tracing::warn!(merchant = %id, session_of = session_merchant, "refused: session of another merchant");
            Err(Status::permission_denied(format!(
                "certificate identity `{id}` may not use a session of `{session_merchant}`"
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_wins_over_allow_and_unknown_ids_are_refused() {
        let list = AccessList {
            allow: vec!["a".into(), "b".into()],
            revoked: vec!["b".into()],
            revoked_serials: vec![],
        };
        assert_eq!(list.refusal("a"), None);
        assert_eq!(list.refusal("b"), Some("revoked"));
        assert_eq!(list.refusal("c"), Some("not on the allow-list"));
    }

    #[test]
    fn access_file_changes_are_picked_up_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cd = crate::certs::CertDir::new(dir.path());
        crate::certs::init(&cd, &["localhost".into()]).unwrap();
        crate::certs::issue(&cd, "m1").unwrap();
        let path = dir.path().join("access.toml");
        let access = Access::new(&path).unwrap();
        assert_eq!(
            access.current().unwrap().refusal("m1"),
            Some("not on the allow-list")
        );
        crate::certs::allow(&path, "m1").unwrap();
        assert_eq!(access.current().unwrap().refusal("m1"), None);
        let done = crate::certs::revoke(&path, &cd, "m1", None).unwrap();
        assert_eq!((done.warning, done.already), (None, false));
        let serial = crate::certs::serial_of_file(&cd.cert("m1")).unwrap();
        assert_eq!(done.serial, serial);
        assert!(access.current().unwrap().serial_refusal(&serial).is_some());
        // Revoking it again says so and leaves the file alone.
        let before = std::fs::read(&path).unwrap();
        let again = crate::certs::revoke(&path, &cd, "m1", None).unwrap();
        assert_eq!((again.serial, again.already), (serial, true));
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn a_file_caught_mid_rewrite_keeps_the_list_and_an_explicit_empty_list_admits_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.toml");
        std::fs::write(&path, "allow = [\"m1\"]\nrevoked_serials = [\"0a\"]\n").unwrap();
        let access = Access::new(&path).unwrap();
        let admits_m1 = |access: &Access| {
            let list = access.current().unwrap();
            (
                list.refusal("m1").is_none(),
                list.serial_refusal("0a").is_some(),
            )
        };
        assert_eq!(admits_m1(&access), (true, true));
        // Truncated for an in-place rewrite: neither m1 nor the revocation
        // is dropped in between.
        std::fs::File::create(&path).unwrap();
        assert_eq!(admits_m1(&access), (true, true));
        std::fs::write(&path, "\n  \n").unwrap();
        assert_eq!(admits_m1(&access), (true, true));
        // Deleted, then created again.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(admits_m1(&access), (true, true));
        std::fs::write(&path, "allow = [\"m1\", \"m2\"]\n").unwrap();
        assert_eq!(admits_m1(&access), (true, false));
        assert_eq!(access.current().unwrap().refusal("m2"), None);
        // Said in so many words, an empty list is taken.
        std::fs::write(&path, "allow = []\n").unwrap();
        assert_eq!(admits_m1(&access), (false, false));
        // A file missing from the start is an empty list, as before.
        let fresh = Access::new(dir.path().join("none.toml")).unwrap();
        assert_eq!(
            fresh.current().unwrap().refusal("m1"),
            Some("not on the allow-list")
        );
    }

    #[test]
    fn revocation_targets_the_certificate_so_reissuing_neither_overwrites_nor_unrevokes() {
        let dir = tempfile::tempdir().unwrap();
        let cd = crate::certs::CertDir::new(dir.path());
        crate::certs::init(&cd, &["localhost".into()]).unwrap();
        let access = dir.path().join("access.toml");
        crate::certs::issue(&cd, "m1").unwrap();
        crate::certs::allow(&access, "m1").unwrap();
        let old = crate::certs::serial_of_file(&cd.cert("m1")).unwrap();
        crate::certs::revoke(&access, &cd, "m1", None).unwrap();
        // Issuing again refuses to overwrite, naming the file and --force.
        let err = format!("{:#}", crate::certs::issue(&cd, "m1").unwrap_err());
        assert!(
            err.contains(&cd.cert("m1").display().to_string()) && err.contains("--force"),
            "{err}"
        );
        // With --force: a new serial, admitted; the old one stays revoked.
        crate::certs::issue_kind(&cd, "m1", crate::certs::Kind::Merchant, true).unwrap();
        crate::certs::allow(&access, "m1").unwrap();
        let new = crate::certs::serial_of_file(&cd.cert("m1")).unwrap();
        assert_ne!(old, new);
        let list = AccessList::load_or_default(&access).unwrap();
        assert!(list.serial_refusal(&old).is_some());
        assert_eq!(list.serial_refusal(&new), None);
        assert_eq!(list.refusal("m1"), None);
        // An id never issued is an error listing the issued ones; an id not
        // on the allow-list (the operator) is revoked with a warning.
        let err = format!(
            "{:#}",
            crate::certs::revoke(&access, &cd, "nosuch", None).unwrap_err()
        );
        assert!(
            err.contains("no certificate issued for `nosuch`") && err.contains("m1, operator"),
            "{err}"
        );
        let done = crate::certs::revoke(&access, &cd, "operator", None).unwrap();
        assert!(done.warning.unwrap().contains("not on the allow-list"));
        // A mistyped access file is named, not created with the revocation.
        let typo = dir.path().join("acess.toml");
        let err = format!(
            "{:#}",
            crate::certs::revoke(&typo, &cd, "m1", None).unwrap_err()
        );
        assert!(
            err.contains(&format!(
                "the access file {} does not exist",
                typo.display()
            )),
            "{err}"
        );
        assert!(!typo.exists());
    }

    #[test]
    fn init_issues_the_operator_identity_and_a_secret_token() {
        let dir = tempfile::tempdir().unwrap();
        let cd = crate::certs::CertDir::new(dir.path());
        crate::certs::init(&cd, &["localhost".into()]).unwrap();
        let pem = std::fs::read(cd.cert(crate::certs::OPERATOR)).unwrap();
        let der = rustls_pemfile::certs(&mut &pem[..])
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(role_of(&der), Some(Role::Operator("operator".into())));
        assert_eq!(identity_of(&der), None, "an operator is no merchant");
        let token = std::fs::read_to_string(cd.operator_token()).unwrap();
        assert_eq!(token.trim().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for p in [cd.operator_token(), cd.key(crate::certs::OPERATOR)] {
                let mode = std::fs::metadata(p).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }
        }
    }

    #[test]
    fn issued_certificates_carry_the_merchant_identity() {
        let dir = tempfile::tempdir().unwrap();
        let cd = crate::certs::CertDir::new(dir.path());
        crate::certs::init(&cd, &["localhost".into()]).unwrap();
        crate::certs::issue(&cd, "shop-7").unwrap();
        let pem = std::fs::read(cd.cert("shop-7")).unwrap();
        let der = rustls_pemfile::certs(&mut &pem[..])
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(identity_of(&der).as_deref(), Some("shop-7"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(cd.key("shop-7"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(
            crate::certs::init(&cd, &[]).is_err(),
            "init must not replace a CA"
        );
    }
}
