//! Who may read the coordinator's HTTP endpoints: the platform operator,
//! proved by the bearer token `certs init` writes (`operator.token`, see
//! `serve.http_token_file`). Every route except `/healthz` and `/readyz`
//! requires it:
//!
//! - tools and Prometheus send `Authorization: Bearer <token>` (a scrape
//!   job's `authorization.credentials_file`);
//! - a browser opens `/?token=<token>` once (or posts the token to `/login`
//!   from the form a tokenless `/` shows); the coordinator answers with an
//!   `HttpOnly`, `SameSite=Strict` cookie and a redirect to the bare `/`, so
//!   the dashboard's own requests carry it.
//!
//! Without a token (a tokenless request or a wrong token) the answer is 401
//! with no run data. Tokens are compared through their SHA-256 digests, so
//! the comparison's timing says nothing about the token.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};

/// The cookie that carries the operator's token in a browser.
pub const COOKIE: &str = "fedcart_operator";

/// Routes anyone may read: liveness and readiness probes.
pub const OPEN_ROUTES: [&str; 2] = ["/healthz", "/readyz"];

/// The operator's token, kept as its digest.
#[derive(Clone)]
pub struct OperatorToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorToken(..)")
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("reading the operator token {}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file holds too short a token.
    #[error(
        "the operator token {} must hold at least 16 characters (`certs init` writes 64)",
        path.display()
    )]
    TooShort {
        /// The file.
        path: std::path::PathBuf,
    },
    /// The token holds a character a header or cookie cannot carry as it
    /// is (the browser login stopped at a `;`, and a non-ASCII token was
    /// accepted at start-up and then matched no request).
    #[error(
        "the operator token {} may hold only printable ASCII without spaces, quotes, `,`, `;` or \
         `\\` (it is sent in a header and a cookie); `certs init` writes 64 hex digits",
        path.display()
    )]
    Unusable {
        /// The file.
        path: std::path::PathBuf,
    },
}

impl OperatorToken {
    /// A token given as text (surrounding whitespace ignored).
    pub fn new(token: &str) -> Self {
        Self {
            digest: Sha256::digest(token.trim().as_bytes()).into(),
        }
    }

    /// Reads the token file (one line; `certs init` writes 32 random bytes in
    /// hex).
    pub fn from_file(path: &std::path::Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.into(),
            source,
        })?;
        if text.trim().len() < 16 {
            return Err(TokenError::TooShort { path: path.into() });
        }
        // RFC 6265's cookie-octet: what a cookie value may hold unquoted,
        // and a bearer header too.
        let usable = |c: char| c.is_ascii_graphic() && !matches!(c, '"' | ',' | ';' | '\\');
        if !text.trim().chars().all(usable) {
            return Err(TokenError::Unusable { path: path.into() });
        }
        Ok(Self::new(&text))
    }

    fn matches(&self, candidate: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(candidate.trim().as_bytes()).into();
        d == self.digest
    }

    /// The token a request presents, by header or cookie, is this one.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme's name is case-insensitive (RFC 9110 §11.1).
            .and_then(|v| {
                v.get(..7)
                    .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                    .map(|_| &v[7..])
            });
        if bearer.is_some_and(|t| self.matches(t)) {
            return true;
        }
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .any(|t| self.matches(t))
    }
}

/// The form a browser without the token sees at `/`.
const LOGIN_PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>fedcart coordinator</title>
<form method="post" action="/login" style="font-family:sans-serif;margin:3em">
<p>The dashboard is for the platform operator. Paste the token from
<code>operator.token</code> (written by <code>fedcart-coordinator certs init</code>).</p>
<input type="password" name="token" size="70" autofocus> <button>Open</button></form>"#;

/// Shown above the form again after a browser sent a token that is not
/// the operator's.
const WRONG_TOKEN: &str = r#"<p style="font-family:sans-serif;margin:3em 3em 0;color:#b00020">
That is not the operator's token. Paste the whole line of <code>operator.token</code> from this
coordinator's certificate directory (a token from another <code>certs init</code> does not open it).</p>"#;

/// The login page, with the wrong-token note when a browser's token failed
/// (`401`, so scripts still see the refusal).
fn login_page(wrong: bool) -> Response {
    let page = if wrong {
        LOGIN_PAGE.replacen("<form", &format!("{WRONG_TOKEN}\n<form"), 1)
    } else {
        LOGIN_PAGE.to_owned()
    };
    (StatusCode::UNAUTHORIZED, Html(page)).into_response()
}

/// Sets the cookie and sends the browser to the bare dashboard URL.
fn admit_browser(token: &str) -> Response {
    let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
    let mut resp = Redirect::to("/").into_response();
    match HeaderValue::from_str(&cookie) {
        Ok(v) => {
            resp.headers_mut().insert(header::SET_COOKIE, v);
            resp
        }
        Err(_) => unauthorized(),
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"fedcart\"")],
        "the operator's token is required: `Authorization: Bearer <operator.token>`\n",
    )
        .into_response()
}

/// The `token` field of a query string or form body, percent-decoded.
fn token_field(encoded: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(encoded)
        .ok()?
        .into_iter()
        .find_map(|(k, v)| (k == "token").then_some(v))
}

/// How long the login form's body may take to arrive (a browser sends its
/// few bytes with the headers); a body not in by then is read as no token.
pub const LOGIN_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The middleware: open probes, the browser login, then the token check.
pub async fn require_operator(
    State(token): State<Arc<OperatorToken>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_owned();
    if OPEN_ROUTES.contains(&path.as_str()) {
        return next.run(req).await;
    }
    if path == "/login" && req.method() == axum::http::Method::POST {
        // The header timeout does not cover a body: a client announcing one
        // and sending it slowly, or never, held its connection for ever.
        let body = tokio::time::timeout(
            LOGIN_BODY_TIMEOUT,
            axum::body::to_bytes(req.into_body(), 4096),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
        // The form's answer is a page a person reads: the form again, saying
        // what went wrong.
        return match token_field(&String::from_utf8_lossy(&body)) {
            Some(t) if token.matches(&t) => admit_browser(t.trim()),
            _ => login_page(true),
        };
    }
    if path == "/"
        && let Some(t) = req.uri().query().and_then(token_field)
    {
        return if token.matches(&t) {
            admit_browser(t.trim())
        } else {
            login_page(true)
        };
    }
    if token.admits(req.headers()) {
        return next.run(req).await;
    }
    if path == "/" {
        return login_page(false);
    }
    unauthorized()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token a cookie or header cannot carry as it is was accepted at
    /// start-up and locked the operator out of the dashboard.
    #[test]
    fn a_token_a_cookie_cannot_carry_is_refused_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("operator.token");
        for bad in [
            "0123456789abcdef;0123",
            "0123456789abcdéf0123",
            "0123456789 abcdef0123",
        ] {
            std::fs::write(&path, format!("{bad}\n")).unwrap();
            let Err(e) = OperatorToken::from_file(&path) else {
                panic!("{bad} was accepted");
            };
            let e = e.to_string();
            assert!(e.contains("printable ASCII"), "{bad}: {e}");
        }
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        assert!(OperatorToken::from_file(&path).is_ok());
    }

    /// `Authorization: bearer …` (any case of the scheme, as RFC 9110
    /// allows) is admitted; another scheme or token is not.
    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        let token = OperatorToken::new("0123456789abcdef0123");
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            token.admits(&h)
        };
        for ok in ["Bearer", "bearer", "BEARER"] {
            assert!(with(&format!("{ok} 0123456789abcdef0123")), "{ok}");
        }
        assert!(!with("Basic 0123456789abcdef0123"));
        assert!(!with("Bearer 0123456789abcdef0124"));
        assert!(!with("Bearer"));
    }
}
