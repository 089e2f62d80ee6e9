//! A development certificate authority: `fedcart-coordinator certs
//! init|issue|revoke`.
//!
//! `init` creates a CA and the coordinator's server certificate; `issue`
//! signs one client certificate per merchant whose identity is the URI SAN
//! `fedcart://merchant/<id>` (see [`crate::identity`]); `revoke` adds the
//! identity to the access file's revocation list, which the coordinator
//! re-reads without a restart. Keys are written with mode 0600. Production
//! deployments can bring their own CA: the coordinator only needs a CA bundle,
//! its own certificate and key, and merchant certificates carrying the URI SAN.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::identity::{AccessList, merchant_uri};

/// The CA's subject. `issue` rebuilds the issuer from it and the CA key.
const CA_NAME: &str = "fedcart development CA";

/// File names inside a certificate directory.
pub struct CertDir {
    /// The directory.
    pub dir: PathBuf,
}

impl CertDir {
    /// A certificate directory at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// The CA certificate (give this to every party).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// The CA private key (keep offline in production).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    /// The certificate of `name` (`coordinator` or a merchant id).
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }
    /// The private key of `name`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, "fedcart");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// Writes `text` to `path`, with mode 0600 when `secret`.
fn write_file(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn load_ca(dir: &CertDir) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let pem = std::fs::read_to_string(dir.ca_key()).with_context(|| {
        format!(
            "reading {} (run `certs init` first)",
            dir.ca_key().display()
        )
    })?;
    let key = KeyPair::from_pem(&pem).with_context(|| format!("{}", dir.ca_key().display()))?;
    Ok(Issuer::new(ca_params()?, key))
}

/// Creates the CA and the coordinator's certificate for `hosts` (DNS names or
/// IP addresses clients dial). Refuses to overwrite an existing CA.
pub fn init(dir: &CertDir, hosts: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir.dir).with_context(|| format!("creating {}", dir.dir.display()))?;
    if dir.ca_key().exists() {
        bail!(
            "{} exists: refusing to replace the CA",
            dir.ca_key().display()
        );
    }
    let key = KeyPair::generate()?;
    let cert = ca_params()?.self_signed(&key)?;
    write_file(&dir.ca_key(), &key.serialize_pem(), true)?;
    write_file(&dir.ca_cert(), &cert.pem(), false)?;
    let issuer = Issuer::new(ca_params()?, key);
    let mut p = CertificateParams::new(hosts.to_vec())?;
    p.distinguished_name
        .push(DnType::CommonName, "fedcart coordinator");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    write_file(&dir.key("coordinator"), &key.serialize_pem(), true)?;
    write_file(&dir.cert("coordinator"), &cert.pem(), false)?;
    Ok(())
}

/// Issues a client certificate for merchant `id`.
pub fn issue(dir: &CertDir, id: &str) -> anyhow::Result<()> {
    crate::identity::validate_id(id)?;
    let issuer = load_ca(dir)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.subject_alt_names = vec![SanType::URI(merchant_uri(id).try_into()?)];
    p.distinguished_name.push(DnType::CommonName, id);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    write_file(&dir.key(id), &key.serialize_pem(), true)?;
    write_file(&dir.cert(id), &cert.pem(), false)?;
    Ok(())
}

/// Adds `id` to the allow-list of the access file (creating it).
pub fn allow(access: &Path, id: &str) -> anyhow::Result<()> {
    crate::identity::validate_id(id)?;
    let mut list = AccessList::load_or_default(access)?;
    if !list.allow.iter().any(|a| a == id) {
        list.allow.push(id.into());
    }
    list.revoked.retain(|r| r != id);
    write_file(access, &list.to_toml(), false)
}

/// Revokes `id`: the coordinator refuses it from its next RPC on.
pub fn revoke(access: &Path, id: &str) -> anyhow::Result<()> {
    let mut list = AccessList::load_or_default(access)?;
    if !list.revoked.iter().any(|r| r == id) {
        list.revoked.push(id.into());
    }
    write_file(access, &list.to_toml(), false)
}
