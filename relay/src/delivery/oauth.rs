//! Access tokens for routes with `auth.oauth2` (SPEC 11): fetched from the route's token
//! endpoint with the client-credentials or refresh-token grant (RFC 6749 4.4, 6), cached and
//! shared by every connection of the route, refreshed before they expire, replaced at once when
//! an upstream refuses one. Tokens, client secrets and refresh tokens are never logged.
//!
//! The clients outlive configuration generations ([`TokenClients`]), so a reload that leaves a
//! route's OAuth settings as they were keeps its token (and a refresh token the endpoint
//! rotated) instead of asking again.

use crate::metrics::{Metrics, TokenRequestLabels};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mailroute_config::document::OAuth2Client;
use mailroute_smtp_client::bearer::{TokenError, TokenSource};
use mailroute_smtp_client::tls::{self, Checks};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The longest a token request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed request, callers hear the same failure for this long instead of each asking
/// the endpoint again (a busy relay would otherwise hammer an endpoint that is down).
const FAILURE_HOLD: Duration = Duration::from_secs(5);
/// The lifetime assumed when the endpoint gives no `expires_in` (RFC 6749 5.1 only recommends
/// it); an upstream that refuses the token earlier gets a new one at once anyway.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// A token response larger than this is not a token response.
const MAX_RESPONSE: usize = 64 * 1024;

type Http = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The routes' token clients, kept across generations by route name and settings.
#[derive(Default)]
pub struct TokenClients {
    clients: Mutex<HashMap<String, Arc<TokenClient>>>,
}

impl std::fmt::Debug for TokenClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenClients").finish_non_exhaustive()
    }
}

impl TokenClients {
    /// The client for `route` with these settings: the one already made when they are
    /// unchanged, else a new one (a changed Secret means new credentials).
    pub fn client(
        &self,
        route: &str,
        settings: &OAuth2Client,
        metrics: &Arc<Metrics>,
    ) -> Arc<TokenClient> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = clients.get(route)
            && client.settings == *settings
        {
            return Arc::clone(client);
        }
        let client = Arc::new(TokenClient::new(
            route,
            settings.clone(),
            Arc::clone(metrics),
        ));
        clients.insert(route.to_owned(), Arc::clone(&client));
        client
    }
}

/// One route's token endpoint and its cached token.
pub struct TokenClient {
    route: Arc<str>,
    settings: OAuth2Client,
    /// Unusable TLS settings (a bad `caBundleSecretRef`) fail every request with the reason.
    http: Result<Http, String>,
    state: tokio::sync::Mutex<State>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenClient")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    token: Option<Cached>,
    /// The refresh token to use next: the configured one, or the one the endpoint rotated to.
    refresh_token: Option<String>,
    failed: Option<(Instant, TokenError)>,
}

struct Cached {
    value: Arc<str>,
    /// From here on the token is replaced before use.
    refresh_at: Instant,
    /// Past here it is not used even when the endpoint cannot give another.
    expires_at: Instant,
}

impl TokenClient {
    fn new(route: &str, settings: OAuth2Client, metrics: Arc<Metrics>) -> Self {
        let http = tls::client_config(
            Checks {
                ca_signed: true,
                hostname: true,
            },
            settings.ca_bundle.as_deref(),
        )
        .map(|config| {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_only()
                .enable_http1()
                .build();
            Client::builder(TokioExecutor::new()).build(connector)
        })
        .map_err(|e| format!("token endpoint TLS settings: {e}"));
        let state = State {
            refresh_token: settings.refresh_token.clone(),
            ..State::default()
        };
        Self {
            route: Arc::from(route),
            settings,
            http,
            state: tokio::sync::Mutex::new(state),
            metrics,
        }
    }

    async fn current(&self, refused: Option<&str>) -> Result<Arc<str>, TokenError> {
        // NB: one request at a time per route: callers that wait here find the new token.
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let usable = state
            .token
            .as_ref()
            .filter(|t| refused != Some(&*t.value) && now < t.expires_at);
        if let Some(token) = usable
            && now < token.refresh_at
        {
            return Ok(Arc::clone(&token.value));
        }
        let stale = usable.map(|t| Arc::clone(&t.value));
        if let Some((at, error)) = &state.failed
            && now < *at + FAILURE_HOLD
        {
            return stale.ok_or_else(|| error.clone());
        }
        let fetched = self.fetch(state.refresh_token.as_deref()).await;
        self.metrics
            .oauth_token_requests
            .get_or_create(&TokenRequestLabels {
                route: self.route.to_string(),
                result: if fetched.is_ok() {
                    "success"
                } else {
                    "failure"
                },
            })
            .inc();
        match fetched {
            Ok(granted) => {
                let now = Instant::now();
                let lifetime = granted.lifetime.unwrap_or(DEFAULT_LIFETIME);
                let value: Arc<str> = Arc::from(granted.access_token);
                state.token = Some(Cached {
                    value: Arc::clone(&value),
                    refresh_at: now + lifetime - refresh_margin(lifetime),
                    expires_at: now + lifetime,
                });
                if let Some(rotated) = granted.refresh_token {
                    state.refresh_token = Some(rotated);
                }
                state.failed = None;
                Ok(value)
            }
            Err(error) => {
                tracing::warn!(route = %self.route, error = %error, "OAuth token request failed");
                state.failed = Some((Instant::now(), error.clone()));
                // A token near its end still serves while it lasts.
                stale.ok_or(error)
            }
        }
    }

    /// One token request. The error names the endpoint (without its query) and what it said,
    /// never a secret.
    async fn fetch(&self, refresh_token: Option<&str>) -> Result<Granted, TokenError> {
        let endpoint = self
            .settings
            .token_url
            .split(['?', '#'])
            .next()
            .unwrap_or_default();
        let fail = |why: String| TokenError(format!("token endpoint {endpoint}: {why}"));
        let http = self.http.as_ref().map_err(|e| fail(e.clone()))?;
        let request = http::Request::post(&self.settings.token_url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(form(&self.settings, refresh_token))))
            .map_err(|e| fail(e.to_string()))?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let response = http.request(request).await.map_err(|e| {
                // The legacy client's own message is only "client error (Connect)".
                let mut why = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    why = format!("{why}: {s}");
                    source = s.source();
                }
                fail(why)
            })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| fail(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, TokenError>((status, body))
        })
        .await
        .map_err(|_| fail(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())))??;
        parse(response.0, &response.1).map_err(fail)
    }
}

impl TokenSource for TokenClient {
    fn token<'a>(
        &'a self,
        refused: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<Arc<str>, TokenError>> + Send + 'a>> {
        Box::pin(self.current(refused))
    }
}

/// How long before its end a token is replaced: a tenth of its lifetime, at least a minute,
/// but never more than half of it (a 30-second test token is used for 15 seconds).
fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 10)
        .max(Duration::from_secs(60))
        .min(lifetime / 2)
}

/// The form of a token request (RFC 6749 4.4.2 and 6), with the client's credentials in the
/// body (`client_secret_post`, which Microsoft's and Google's endpoints take).
fn form(settings: &OAuth2Client, refresh_token: Option<&str>) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    match refresh_token {
        Some(refresh) => form
            .append_pair("grant_type", "refresh_token")
            .append_pair("refresh_token", refresh),
        None => form.append_pair("grant_type", "client_credentials"),
    };
    form.append_pair("client_id", &settings.client_id);
    if let Some(secret) = &settings.client_secret {
        form.append_pair("client_secret", secret);
    }
    if !settings.scopes.is_empty() {
        form.append_pair("scope", &settings.scopes.join(" "));
    }
    form.finish()
}

/// What a successful token response gave.
#[derive(Debug, PartialEq, Eq)]
struct Granted {
    access_token: String,
    lifetime: Option<Duration>,
    refresh_token: Option<String>,
}

/// Reads a token response (RFC 6749 5.1, 5.2): the access token, its lifetime (`expires_in`,
/// a number or, from some endpoints, a string) and a rotated refresh token; or the endpoint's
/// error and description.
fn parse(status: http::StatusCode, body: &[u8]) -> Result<Granted, String> {
    let json: serde_json::Value = serde_json::from_slice(body)
        .map_err(|_| format!("answered {} without a JSON token response", status.as_u16()))?;
    let text = |key: &str| json.get(key).and_then(serde_json::Value::as_str);
    if !status.is_success() {
        let mut why = format!("answered {}", status.as_u16());
        if let Some(error) = text("error") {
            why.push_str(&format!(" {}", clip(error)));
        }
        if let Some(description) = text("error_description") {
            why.push_str(&format!(": {}", clip(description)));
        }
        return Err(why);
    }
    let access_token = text("access_token")
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or("answered without a usable access_token")?;
    if let Some(kind) = text("token_type")
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(format!(
            "answered a {} token, not a Bearer token",
            clip(kind)
        ));
    }
    let lifetime = match json.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|&s| s > 0)
    .map(Duration::from_secs);
    Ok(Granted {
        access_token: access_token.to_owned(),
        lifetime,
        refresh_token: text("refresh_token")
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
    })
}

/// An endpoint's words, bounded and on one line, for a reply or a log.
fn clip(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn settings() -> OAuth2Client {
        OAuth2Client {
            token_url: "https://login.example/t".into(),
            username: "relay@example.com".into(),
            client_id: "app id".into(),
            client_secret: Some("s&cret=1".into()),
            refresh_token: None,
            scopes: vec!["https://outlook.office365.com/.default".into(), "b".into()],
            ca_bundle: None,
        }
    }

    #[test]
    fn the_grant_is_client_credentials_unless_a_refresh_token_is_held() {
        assert_eq!(
            form(&settings(), None),
            "grant_type=client_credentials&client_id=app+id&client_secret=s%26cret%3D1\
             &scope=https%3A%2F%2Foutlook.office365.com%2F.default+b"
        );
        assert_eq!(
            form(&settings(), Some("r/1")),
            "grant_type=refresh_token&refresh_token=r%2F1&client_id=app+id\
             &client_secret=s%26cret%3D1&scope=https%3A%2F%2Foutlook.office365.com%2F.default+b"
        );
    }

    #[test]
    fn token_responses_give_the_token_its_lifetime_and_a_rotated_refresh_token() {
        let ok = |body: &str| parse(StatusCode::OK, body.as_bytes());
        assert_eq!(
            ok(r#"{"access_token":"eyJ0","token_type":"Bearer","expires_in":3599}"#),
            Ok(Granted {
                access_token: "eyJ0".into(),
                lifetime: Some(Duration::from_secs(3599)),
                refresh_token: None
            })
        );
        // Some endpoints send expires_in as a string; a rotated refresh token is kept.
        assert_eq!(
            ok(
                r#"{"access_token":"a","token_type":"bearer","expires_in":"60","refresh_token":"r2"}"#
            ),
            Ok(Granted {
                access_token: "a".into(),
                lifetime: Some(Duration::from_secs(60)),
                refresh_token: Some("r2".into())
            })
        );
        assert!(ok(r#"{"access_token":"a","token_type":"mac"}"#).is_err());
        assert!(ok(r#"{"access_token":"a b"}"#).is_err());
        assert!(ok(r#"{"token_type":"Bearer"}"#).is_err());
        assert!(ok("<html>").is_err());
    }

    #[test]
    fn an_endpoint_refusal_says_its_error_and_description() {
        let why = parse(
            StatusCode::UNAUTHORIZED,
            br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1"}"#,
        );
        assert_eq!(
            why,
            Err("answered 401 invalid_client: AADSTS7000215: Invalid client secret provided.Trace ID: 1".into())
        );
    }

    #[test]
    fn tokens_are_replaced_well_before_they_expire() {
        let s = Duration::from_secs;
        assert_eq!(refresh_margin(s(3600)), s(360));
        assert_eq!(refresh_margin(s(300)), s(60));
        assert_eq!(refresh_margin(s(30)), s(15));
    }
}
