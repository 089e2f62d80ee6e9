//! A development certificate authority: `fedcart-coordinator certs
//! init|issue|revoke`.
//!
//! `init` creates a CA, the coordinator's server certificate and the
//! platform operator's identity: a client certificate naming
//! `fedcart://operator/operator` (for `status` and the admin RPCs) and a
//! bearer token file for the HTTP endpoints (`operator.token`). `issue` signs
//! one client certificate per merchant whose identity is the URI SAN
//! `fedcart://merchant/<id>` (see [`crate::identity`]), or with `--operator`
//! another operator's; it refuses to overwrite an issued identity without
//! `--force`, and with `--kit` writes the merchant's ready-to-run folder
//! ([`write_kit`]). `revoke` adds the certificate's serial number to the
//! access file's revocation list, which the coordinator re-reads without a
//! restart: a certificate issued later for the same id has another serial and
//! is not revoked by it. Keys and the token are written with mode 0600.
//! Production deployments can bring their own CA: the coordinator only needs
//! a CA bundle, its own certificate and key, and client certificates carrying
//! the URI SAN.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::identity::{AccessList, merchant_uri, operator_uri, serial_of};

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
    /// The access file `certs issue` adds merchants to unless told another
    /// (and `certs revoke` revokes in).
    pub fn access(&self) -> PathBuf {
        self.dir.join("access.toml")
    }
    /// The operator's bearer token for the HTTP endpoints.
    pub fn operator_token(&self) -> PathBuf {
        self.dir.join(OPERATOR_TOKEN)
    }
}

/// The name of the operator identity `init` issues (its files are
/// `operator.pem` and `operator.key`; `status` uses it by default).
pub const OPERATOR: &str = "operator";

/// The file name of the operator's HTTP bearer token inside a certificate
/// directory.
pub const OPERATOR_TOKEN: &str = "operator.token";

/// Which kind of identity a certificate carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `fedcart://merchant/<id>`: trains; added to the allow-list.
    Merchant,
    /// `fedcart://operator/<id>`: status and admin RPCs, never trains.
    Operator,
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
/// Writes `text` to `path` atomically: a temporary file beside it, then a
/// rename, so a coordinator re-reading the access list never sees it empty
/// or half written (which would refuse every merchant).
fn write_file(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("writing {}: not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub(crate) fn load_ca(dir: &CertDir) -> anyhow::Result<Issuer<'static, KeyPair>> {
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
    // Checked before anything is written: a refused name must not leave a
    // CA behind that the next attempt then refuses to replace.
    for host in hosts {
        let ok = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'*'));
        if !ok {
            bail!(
                "--host `{host}` is not a DNS name or IP address the coordinator's certificate \
                 can carry: letters, digits, `-` and `.` (an internationalised name in its \
                 xn-- form)"
            );
        }
    }
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
    issue_kind(dir, OPERATOR, Kind::Operator, false)?;
    let token: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    write_file(&dir.operator_token(), &format!("{token}\n"), true)?;
    Ok(())
}

/// Issues a client certificate for merchant `id`, refusing to replace an
/// issued one: [`issue_kind`] without `force`.
pub fn issue(dir: &CertDir, id: &str) -> anyhow::Result<()> {
    issue_kind(dir, id, Kind::Merchant, false)
}

/// Issues a client certificate of `kind` for `id` (`<id>.pem`, `<id>.key`)
/// with a fresh random serial. Refuses to overwrite an existing certificate
/// or key unless `force`: re-issuing replaces a merchant's identity, and the
/// old certificate stays valid until it is revoked.
pub fn issue_kind(dir: &CertDir, id: &str, kind: Kind, force: bool) -> anyhow::Result<()> {
    crate::identity::validate_id(id)?;
    // Their files are the CA's and the coordinator's (and `certs init`'s
    // operator): issuing over them, even with --force, would replace the CA
    // or the server identity with a client certificate.
    let reserved = match kind {
        Kind::Merchant => &["ca", "coordinator", "operator"][..],
        Kind::Operator => &["ca", "coordinator"][..],
    };
    if reserved.contains(&id) {
        bail!(
            "`{id}` names the files of the {} in {}: choose another id",
            match id {
                "ca" => "certificate authority (ca.pem, ca.key)",
                "coordinator" => "coordinator's own certificate (coordinator.pem, coordinator.key)",
                _ => "operator identity `certs init` made (operator.pem, operator.key)",
            },
            dir.ca_cert()
                .parent()
                .map_or_else(String::new, |p| p.display().to_string())
        );
    }
    if !force {
        for p in [dir.cert(id), dir.key(id)] {
            if p.exists() {
                bail!(
                    "{} exists: `{id}` is already issued; pass --force to issue a new \
                     certificate (revoke the old one with `fedcart-coordinator certs revoke \
                     --dir {} --id {id}` first if it must stop working)",
                    p.display(),
                    dir.dir.display()
                );
            }
        }
    }
    let issuer = load_ca(dir)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let uri = match kind {
        Kind::Merchant => merchant_uri(id),
        Kind::Operator => operator_uri(id),
    };
    p.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    p.distinguished_name.push(DnType::CommonName, id);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    // A positive 16-byte serial (top bit clear), unique per certificate: what
    // revocation names.
    let mut serial = rand::random::<[u8; 16]>();
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    write_file(&dir.key(id), &key.serialize_pem(), true)?;
    write_file(&dir.cert(id), &cert.pem(), false)?;
    Ok(())
}

/// The name of the agent configuration inside a merchant kit.
pub const KIT_CONFIG: &str = "merchant.toml";

/// Writes merchant `id`'s kit into `kit`: its key (0600) and certificate as
/// issued in `dir`, the CA certificate, a `data/` folder for its files, and
/// a `merchant.toml` that names them by relative paths (the agent resolves
/// them against the file's directory, so the kit runs from anywhere) and
/// points at `coordinator_url` (`https://host:port`). Refuses to overwrite a
/// kit's configuration or key.
pub fn write_kit(
    dir: &CertDir,
    id: &str,
    kit: &Path,
    coordinator_url: &str,
    domain: Option<&str>,
    force: bool,
) -> anyhow::Result<KitWritten> {
    crate::identity::validate_id(id)?;
    check_coordinator_url(coordinator_url)?;
    check_kit(id, kit, force)?;
    let config = kit.join(KIT_CONFIG);
    let key = kit.join(format!("{id}.key"));
    std::fs::create_dir_all(kit.join("data"))
        .with_context(|| format!("creating {}", kit.join("data").display()))?;
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    write_file(&key, &read(dir.key(id))?, true)?;
    // The key goes with the kit and nowhere else: a copy beside the
    // coordinator's files would let whoever reads them sign as the merchant
    // (its secure-aggregation keys are bound to it).
    std::fs::remove_file(dir.key(id)).with_context(|| {
        format!(
            "removing {} once copied into the kit",
            dir.key(id).display()
        )
    })?;
    write_file(&kit.join(format!("{id}.pem")), &read(dir.cert(id))?, false)?;
    write_file(&kit.join("ca.pem"), &read(dir.ca_cert())?, false)?;
    if config.exists() {
        // Renewed with --force: the merchant's own settings stay.
        return Ok(KitWritten::IdentityRenewed);
    }
    let domain = match domain {
        Some(d) => format!("domain = {}\n", toml_string(d)),
        None => {
            "# domain = \"...\"  # name on the coordinator's certificate; default: the URL's host\n"
                .to_string()
        }
    };
    let text = format!(
        "# fedcart merchant kit for `{id}`: run it with\n\
         #   fedcart-client run --config {KIT_CONFIG}\n\
         # from any directory. Relative paths below are relative to this file.\n\
         # Environment overrides: FEDCART_COORDINATOR, FEDCART_MERCHANT_ID, FEDCART_STATE_DIR,\n\
         # FEDCART_DATA_ORDERS_CSV, FEDCART_DATA_CHURN_CSV, FEDCART_DATA_RATINGS_CSV,\n\
         # FEDCART_DATA_CATALOGUE, FEDCART_DATA_ITEM_NAMES, FEDCART_TLS_CA, FEDCART_TLS_CERT,\n\
         # FEDCART_TLS_KEY.\n\
         \n\
         coordinator = {url}\n\
         merchant_id = {id_s}\n\
         # Latest global models, private user factors, last metrics.\n\
         state_dir = \"state\"\n\
         \n\
         [data]\n\
         # Your orders export, one line per order line, with a header. The agent derives from it\n\
         # the churn features and labels, each customer's purchases for the recommender, and the\n\
         # item rows: item ids are hashed into the run's rows, so no catalogue file is needed and\n\
         # no item list leaves this machine. Nothing else is needed to take part in churn and\n\
         # recommender runs (`fedcart-client prepare` shows what is derived).\n\
         orders_csv = \"data/orders.csv\"\n\
         # Fraction of customers (churn) held out for local evaluation.\n\
         holdout = 0.2\n\
         \n\
         # The header names of your export's columns (customer, order time and line value are\n\
         # required; item for recommendations; quantity optional).\n\
         [data.orders]\n\
         customer = \"customer\"\n\
         item = \"item\"\n\
         timestamp = \"timestamp\"\n\
         quantity = \"quantity\"\n\
         amount = \"amount\"\n\
         # Order time: auto, unix_seconds, unix_ms, iso8601, yyyymmdd, spreadsheet_days or a\n\
         # strftime pattern such as \"%d/%m/%Y %H:%M\". Separator: comma, tab, semicolon, pipe or\n\
         # whitespace.\n\
         timestamp_format = \"auto\"\n\
         delimiter = \"comma\"\n\
         \n\
         # Churn labels: a customer churned if they bought nothing for `churn_window_days` after\n\
         # the cutoff (default: the day after your last order minus the window).\n\
         [data.churn]\n\
         churn_window_days = 90\n\
         \n\
         [tls]\n\
         ca = \"ca.pem\"\n\
         cert = \"{id}.pem\"\n\
         key = \"{id}.key\"\n\
         {domain}\
         \n\
         # The protections this merchant requires of every task (see the README).\n\
         [privacy]\n\
         require_secure_aggregation = false\n\
         require_dp = false\n",
        url = toml_string(coordinator_url),
        id_s = toml_string(id),
    );
    write_file(&config, &text, false)?;
    Ok(KitWritten::New)
}

/// What [`write_kit`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KitWritten {
    /// A whole kit: identity, CA and a fresh `merchant.toml`.
    New,
    /// Only the identity and CA files of an existing kit (`--force`): its
    /// `merchant.toml`, data and state stay as the merchant left them.
    IdentityRenewed,
}

/// Refuses a kit folder that already holds a kit, unless `force` (which
/// renews its identity files and keeps its `merchant.toml`); called before
/// anything is issued, so that a refusal leaves the CA directory as it was.
pub fn check_kit(id: &str, kit: &Path, force: bool) -> anyhow::Result<()> {
    if force {
        // Renewing another merchant's kit would put this identity beside a
        // merchant.toml that claims the other id.
        let config = kit.join(KIT_CONFIG);
        if let Ok(text) = std::fs::read_to_string(&config) {
            let owner = text
                .parse::<toml::Table>()
                .ok()
                .and_then(|t| t.get("merchant_id")?.as_str().map(str::to_owned));
            if let Some(owner) = owner.filter(|o| o != id) {
                bail!(
                    "{} is the kit of merchant `{owner}`, not `{id}`: give `{id}` its own --kit \
                     folder",
                    config.display()
                );
            }
        }
        return Ok(());
    }
    for p in [kit.join(KIT_CONFIG), kit.join(format!("{id}.key"))] {
        if p.exists() {
            bail!(
                "{} exists: refusing to overwrite a kit (add --force to renew its key and \
                 certificate, keeping its {KIT_CONFIG})",
                p.display()
            );
        }
    }
    Ok(())
}

/// A kit's coordinator URL must be `https://HOST[:PORT]`: kit agents speak
/// mutual TLS.
pub fn check_coordinator_url(coordinator_url: &str) -> anyhow::Result<()> {
    let uri: tonic::codegen::http::Uri = coordinator_url
        .parse()
        .with_context(|| format!("--coordinator-url `{coordinator_url}` is not a URL"))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        bail!(
            "--coordinator-url `{coordinator_url}` must be `https://HOST:PORT`: \
             kit agents speak mutual TLS"
        );
    }
    // What the agent would refuse at its first connection, refused before
    // any kit is written (a port it cannot reach, credentials in the URL)
    // or silently dropped (a path or query).
    let authority = uri.authority().map_or("", |a| a.as_str());
    let why = if authority.contains('@') {
        Some("user info (`user:password@`) has no place in it")
    } else if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        Some("it takes no path or query")
    } else {
        match authority.rsplit_once(':').filter(|(_, p)| !p.contains(']')) {
            Some((_, port)) if !port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Some("the port must be a number from 1 to 65535")
            }
            _ => None,
        }
    };
    if let Some(why) = why {
        bail!("--coordinator-url `{coordinator_url}` must be `https://HOST:PORT`: {why}");
    }
    Ok(())
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Adds `id` to the allow-list of the access file (creating it).
pub fn allow(access: &Path, id: &str) -> anyhow::Result<()> {
    crate::identity::validate_id(id)?;
    let mut list = AccessList::load_or_default(access)?;
    if !list.allow.iter().any(|a| a == id) {
        list.allow.push(id.into());
    }
    write_file(access, &list.to_toml(), false)
}

/// The serial of the certificate in `path` (a PEM file), as
/// [`serial_of`] prints it.
pub fn serial_of_file(path: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let der = rustls_pemfile::certs(&mut &pem[..])
        .next()
        .with_context(|| format!("{} holds no PEM certificate", path.display()))?
        .with_context(|| format!("reading {}", path.display()))?;
    serial_of(&der).with_context(|| format!("{}: not an X.509 certificate", path.display()))
}

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The revoked serial.
    pub serial: String,
    /// A warning for the operator (e.g. the id was not on the allow-list).
    pub warning: Option<String>,
    /// The serial was revoked already: the access file was left as it was.
    pub already: bool,
}

/// Revokes the certificate issued for `id` in `dir` (or the certificate
/// with `serial`, when its file is gone): the coordinator refuses it from
/// its next RPC on. An id with no certificate in `dir` is an error that
/// lists the issued ids; an id not on the allow-list (an operator, a typo)
/// is revoked with a warning.
pub fn revoke(
    access: &Path,
    dir: &CertDir,
    id: &str,
    serial: Option<&str>,
) -> anyhow::Result<Revoked> {
    crate::identity::validate_id(id)?;
    // A revocation written to a new file would reach no coordinator.
    if !access.is_file() {
        bail!(
            "the access file {} does not exist: pass the coordinator's `serve.tls.access` \
             (the access.toml `certs issue` wrote beside the CA)",
            access.display()
        );
    }
    let serial = match serial {
        Some(s) => {
            let s = s.replace(':', "").to_ascii_lowercase();
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_hexdigit()) {
                bail!("--serial `{s}` must be the certificate's serial number in hex");
            }
            s
        }
        None => {
            let cert = dir.cert(id);
            if !cert.exists() {
                bail!(
                    "no certificate issued for `{id}` in {} (issued: {}); pass --dir with the \
                     directory it was issued in, or --serial",
                    dir.dir.display(),
                    match issued_ids(dir) {
                        ids if ids.is_empty() => "none".to_string(),
                        ids => ids.join(", "),
                    }
                );
            }
            serial_of_file(&cert)?
        }
    };
    let mut list = AccessList::load_or_default(access)?;
    let warning = (!list.allow.iter().any(|a| a == id)).then(|| {
        format!(
            "`{id}` is not on the allow-list of {} (an operator, or a typo?)",
            access.display()
        )
    });
    let already = list.revoked_serials.contains(&serial);
    if !already {
        list.revoked_serials.push(serial.clone());
        write_file(access, &list.to_toml(), false)?;
    }
    Ok(Revoked {
        serial,
        warning,
        already,
    })
}

/// The access file and certificate directory `certs revoke` works on:
/// either one given finds the other where `certs issue` puts them (the
/// access file is `<dir>/access.toml`; the directory is the access file's).
pub fn revoke_paths(
    access: Option<PathBuf>,
    dir: Option<PathBuf>,
) -> anyhow::Result<(PathBuf, CertDir)> {
    match (access, dir) {
        (Some(access), Some(dir)) => Ok((access, CertDir::new(dir))),
        (None, Some(dir)) => {
            let dir = CertDir::new(dir);
            Ok((dir.access(), dir))
        }
        (Some(access), None) => {
            let dir = match access.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            Ok((access, CertDir::new(dir)))
        }
        (None, None) => bail!(
            "pass --dir (the certificate directory the id was issued in) or --access (the \
             coordinator's `serve.tls.access`)"
        ),
    }
}

/// The ids with a certificate in `dir` (not the CA or the coordinator).
fn issued_ids(dir: &CertDir) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(&dir.dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id = name.strip_suffix(".pem")?;
            (id != "ca" && id != "coordinator").then(|| id.to_owned())
        })
        .collect();
    ids.sort();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kit's URL is refused where its agent would refuse it, before any
    /// kit is written: a port out of range, credentials, a path or query.
    #[test]
    fn a_kit_url_the_agent_would_refuse_is_refused_when_issued() {
        for ok in [
            "https://localhost:50051",
            "https://localhost:50051/",
            "https://coord.example",
            "https://[::1]:7443",
        ] {
            check_coordinator_url(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            (
                "https://localhost:99999",
                "the port must be a number from 1 to 65535",
            ),
            (
                "https://localhost:0",
                "the port must be a number from 1 to 65535",
            ),
            ("https://user:pw@localhost:7443", "user info"),
            (
                "https://localhost:7443/path?x=1",
                "it takes no path or query",
            ),
            ("http://localhost:7443", "kit agents speak mutual TLS"),
        ] {
            let e = check_coordinator_url(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// `certs issue --force --kit` into an existing kit issued the new
    /// certificate, then refused the kit: the merchant kept the old one.
    /// Now a kit is checked before anything is issued, and `--force`
    /// renews its identity files while its `merchant.toml` stays.
    #[test]
    fn a_forced_issue_renews_a_kits_identity_and_keeps_its_settings() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertDir::new(dir.path().join("pki"));
        init(&certs, &["localhost".into()]).unwrap();
        let kit = dir.path().join("kit");
        let url = "https://localhost:7443";
        issue_kind(&certs, "m1", Kind::Merchant, false).unwrap();
        assert_eq!(
            write_kit(&certs, "m1", &kit, url, None, false).unwrap(),
            KitWritten::New
        );
        let e = check_kit("m1", &kit, false).unwrap_err().to_string();
        assert!(
            e.contains("merchant.toml exists") && e.contains("--force"),
            "{e}"
        );
        let config = kit.join(KIT_CONFIG);
        let edited = std::fs::read_to_string(&config).unwrap() + "# the merchant's edit\n";
        std::fs::write(&config, &edited).unwrap();
        let old = std::fs::read(kit.join("m1.pem")).unwrap();
        check_kit("m1", &kit, true).unwrap();
        issue_kind(&certs, "m1", Kind::Merchant, true).unwrap();
        assert_eq!(
            write_kit(&certs, "m1", &kit, url, None, true).unwrap(),
            KitWritten::IdentityRenewed
        );
        let renewed = std::fs::read(kit.join("m1.pem")).unwrap();
        assert_ne!(renewed, old);
        assert_eq!(renewed, std::fs::read(certs.cert("m1")).unwrap());
        // The merchant's key is in its kit only, and is the certificate's.
        assert!(!certs.key("m1").exists());
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(kit.join("m1.key")).unwrap())
            .unwrap();
        let cert = std::fs::read_to_string(kit.join("m1.pem")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert.as_bytes()).unwrap();
        let x509 = pem.parse_x509().unwrap();
        assert_eq!(
            x509.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
        // Another merchant's kit is not renewed with this identity.
        let e = check_kit("m2", &kit, true).unwrap_err().to_string();
        assert!(e.contains("is the kit of merchant `m1`, not `m2`"), "{e}");
    }

    #[test]
    fn a_host_the_certificate_cannot_carry_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertDir::new(dir.path().join("pki"));
        for bad in ["", "bad host", "ünï.example"] {
            let e = init(&certs, &[bad.into()]).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--host `{bad}`")), "{e}");
            assert!(!certs.ca_key().exists(), "nothing written for `{bad}`");
        }
        init(&certs, &["xn--n-8ia.example".into(), "127.0.0.1".into()]).unwrap();
    }

    /// `certs issue --id ca --force` replaced the CA with a merchant's
    /// certificate (and every later issue chained to nothing): the names of
    /// the CA's, the coordinator's and the operator's files are refused.
    #[test]
    fn the_names_of_the_cas_and_the_servers_files_cannot_be_issued_over() {
        let dir = tempfile::tempdir().unwrap();
        let certs = CertDir::new(dir.path());
        init(&certs, &["localhost".into()]).unwrap();
        let ca = std::fs::read(certs.ca_cert()).unwrap();
        for id in ["ca", "coordinator", "operator"] {
            let e = issue_kind(&certs, id, Kind::Merchant, true)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`{id}` names the files of the")), "{e}");
        }
        assert!(issue_kind(&certs, "ca", Kind::Operator, true).is_err());
        assert_eq!(
            std::fs::read(certs.ca_cert()).unwrap(),
            ca,
            "the CA is untouched"
        );
        // The operator identity itself can be re-issued, and merchants issued.
        issue_kind(&certs, OPERATOR, Kind::Operator, true).unwrap();
        issue(&certs, "m0").unwrap();
    }
}
