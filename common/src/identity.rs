//! Merchant identity: the one rule for merchant ids and the one parser of
//! the identity a certificate carries.
//!
//! A merchant's identity is the URI SAN `fedcart://merchant/<id>` of its
//! client certificate. The coordinator reads it from every mutual-TLS
//! connection (`fedcart_coordinator::identity`) and each agent reads it from
//! the certificates relayed with a secure round's key roster
//! ([`crate::privacy::secagg::binding`]); both call [`identity_of`], so the
//! two sides cannot disagree on who a certificate names.

/// URI prefix of merchant identities.
pub const MERCHANT_URI_PREFIX: &str = "fedcart://merchant/";

/// The SAN URI that names merchant `id`.
pub fn merchant_uri(id: &str) -> String {
    format!("{MERCHANT_URI_PREFIX}{id}")
}

/// Longest merchant id, in characters (all of them ASCII).
pub const MAX_MERCHANT_ID_LEN: usize = 128;

/// A merchant id that breaks the rule of [`validate_id`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("merchant id `{shown}` must be 1–128 characters of [A-Za-z0-9-_.@], not only dots")]
pub struct InvalidMerchantId {
    /// The id as given, cut to 140 characters so that a huge id from the
    /// network cannot blow up a log line or a status message.
    pub shown: String,
}

/// The one merchant-id rule, applied by `join`, by `certs issue/allow/revoke`
/// and by agents checking a roster: 1 to [`MAX_MERCHANT_ID_LEN`] characters of
/// `[A-Za-z0-9-_.@]`, not only dots. The alphabet keeps ids safe inside a URI SAN
/// (`fedcart://merchant/<id>`), in file names (`<id>.pem`) and in metric labels;
/// `.` and `..` would name a directory's own or its parent in a path (a run
/// id is an agent's `runs/<id>/` folder).
pub fn validate_id(id: &str) -> Result<(), InvalidMerchantId> {
    let ok = !id.is_empty()
        && id.len() <= MAX_MERCHANT_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
        && !id.chars().all(|c| c == '.');
    if ok {
        Ok(())
    } else {
        Err(InvalidMerchantId {
            shown: id.chars().take(140).collect(),
        })
    }
}

/// URI prefix of operator identities: the platform operator's certificates,
/// which may call the admin and status RPCs but never take part as a
/// merchant.
pub const OPERATOR_URI_PREFIX: &str = "fedcart://operator/";

/// The SAN URI that names operator `name` (same alphabet as merchant ids).
pub fn operator_uri(name: &str) -> String {
    format!("{OPERATOR_URI_PREFIX}{name}")
}

/// Who a certificate names: the two kinds of identity `certs` issues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `fedcart://merchant/<id>`: trains, may see only its own view.
    Merchant(String),
    /// `fedcart://operator/<name>`: runs the platform, never trains.
    Operator(String),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Merchant(id) => write!(f, "merchant `{id}`"),
            Role::Operator(name) => write!(f, "operator `{name}`"),
        }
    }
}

/// The role a DER end-entity certificate names, from its URI SANs: exactly
/// one fedcart identity (a merchant or an operator, with a valid id), else
/// `None` — a certificate naming two identities is refused rather than
/// guessed at. Like [`identity_of`], it does not check the chain.
pub fn role_of(cert: &[u8]) -> Option<Role> {
    let der = rustls::pki_types::CertificateDer::from(cert);
    let ee = webpki::EndEntityCert::try_from(&der).ok()?;
    let mut found = None;
    for uri in ee.valid_uri_names() {
        let role = if let Some(id) = uri.strip_prefix(MERCHANT_URI_PREFIX) {
            Role::Merchant(id.to_owned())
        } else if let Some(name) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
            Role::Operator(name.to_owned())
        } else {
            continue;
        };
        let (Role::Merchant(id) | Role::Operator(id)) = &role;
        if validate_id(id).is_err() || found.is_some() {
            return None;
        }
        found = Some(role);
    }
    found
}

/// Extracts the merchant id from a DER end-entity certificate: the first
/// URI SAN under [`MERCHANT_URI_PREFIX`]. `None` for bytes that are not a
/// certificate or a certificate that names no merchant. This does not check
/// the certificate's chain or validity; callers do (the TLS handshake on the
/// coordinator, [`crate::privacy::secagg::binding`] on agents).
pub fn identity_of(cert: &[u8]) -> Option<String> {
    let der = rustls::pki_types::CertificateDer::from(cert);
    let ee = webpki::EndEntityCert::try_from(&der).ok()?;
    ee.valid_uri_names()
        .find_map(|u| u.strip_prefix(MERCHANT_URI_PREFIX).map(str::to_owned))
}

/// The alerts a server sends when it refuses the client's certificate
/// (unknown CA, bad, unsupported — a server-only certificate —, expired,
/// revoked, missing, a signature its key did not make, or access denied).
const REFUSED_ALERTS: [rustls::AlertDescription; 9] = {
    use rustls::AlertDescription as A;
    [
        A::UnknownCA,
        A::BadCertificate,
        A::UnsupportedCertificate,
        A::CertificateUnknown,
        A::CertificateRequired,
        A::CertificateExpired,
        A::CertificateRevoked,
        A::DecryptError,
        A::AccessDenied,
    ]
};

/// Whether a TLS error is the peer's alert that it refused this side's
/// certificate ([`REFUSED_ALERTS`]): what the agent and the operator's
/// tools each turn into "the coordinator refused this certificate".
pub fn refused_our_certificate(e: &rustls::Error) -> bool {
    matches!(e, rustls::Error::AlertReceived(a) if REFUSED_ALERTS.contains(a))
}

/// The alert of a server that refused the client's certificate, found in an
/// error's text: under TLS 1.3 the server checks the client's certificate
/// after the client's handshake is done, and the alert reaches the client
/// on its first read, through hyper's connection error as text only
/// ("connection error: received fatal alert: CertificateExpired"), where
/// [`refused_our_certificate`] cannot see it. rustls prints an alert by its
/// `Debug` name.
pub fn refused_alert_in(text: &str) -> Option<String> {
    let alert = text.split("received fatal alert: ").nth(1)?;
    let name = alert.split(|c: char| !c.is_ascii_alphanumeric()).next()?;
    REFUSED_ALERTS
        .iter()
        .map(|a| format!("{a:?}"))
        .find(|a| a == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_certificate_is_found_in_an_errors_text() {
        assert_eq!(
            refused_alert_in("connection error: received fatal alert: CertificateExpired"),
            Some("CertificateExpired".into())
        );
        assert_eq!(
            refused_alert_in("received fatal alert: DecryptError (after 3 ms)"),
            Some("DecryptError".into())
        );
        assert_eq!(
            refused_alert_in("received fatal alert: ProtocolVersion"),
            None
        );
        assert_eq!(
            refused_alert_in("stream closed because of a broken pipe"),
            None
        );
    }

    #[test]
    fn merchant_ids_are_1_to_128_characters_of_the_uri_safe_alphabet() {
        for ok in [
            "m0",
            "shop-7",
            "a.b@c_d",
            ".m",
            "...x",
            &"x".repeat(MAX_MERCHANT_ID_LEN),
        ] {
            assert_eq!(validate_id(ok), Ok(()), "{ok}");
        }
        let long = "x".repeat(MAX_MERCHANT_ID_LEN + 1);
        // `.` and `..` would be a directory's self or parent as a run folder.
        for bad in [
            "",
            "a b",
            "shop/7",
            "café",
            "m0\n",
            ".",
            "..",
            "...",
            long.as_str(),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            validate_id("a b").unwrap_err().to_string(),
            "merchant id `a b` must be 1–128 characters of [A-Za-z0-9-_.@], not only dots"
        );
        let huge = "é".repeat(1000);
        assert_eq!(validate_id(&huge).unwrap_err().shown.chars().count(), 140);
    }

    #[test]
    fn bytes_that_are_not_a_certificate_name_nobody() {
        assert_eq!(identity_of(b"not a certificate"), None);
        assert_eq!(identity_of(&[]), None);
    }
}
