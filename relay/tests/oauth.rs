//! Upstream OAuth 2.0 (SPEC 11), as a Microsoft 365 or Google smarthost meets it: a route with
//! `auth.oauth2` gets its tokens from an HTTPS token endpoint on loopback and presents them with
//! XOAUTH2 or OAUTHBEARER to an upstream that takes only valid ones. One token serves every
//! connection, is replaced before it expires and at once when refused; an endpoint that fails
//! defers the route's mail with `451 4.7.0`.

mod support;

use std::time::Duration;
use support::oauth::{BearerUpstream, TokenEndpoint, closed_port, tls};
use support::{bounded, configured, send_message};

const USER: &str = "relay@example.com";

fn manifests(upstream: std::net::SocketAddr, token_url: &str, pem: &str) -> String {
    let pem = pem
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect::<String>();
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: m365, namespace: mail}}
stringData:
  client-id: app-1
  client-secret: s3cret-value
  ca.crt: |
{pem}
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: m365, namespace: mail}}
spec:
  host: {}
  port: {}
  tls: {{mode: Implicit, caBundleSecretRef: {{name: m365, key: ca.crt}}}}
  timeouts: {{connect: 2s, command: 5s, dataEnd: 5s}}
  connectionPool: {{maxMessagesPerConnection: 1}}
  auth:
    oauth2:
      tokenURL: {token_url}
      username: {USER}
      clientIDSecretRef: {{name: m365, key: client-id}}
      clientSecretSecretRef: {{name: m365, key: client-secret}}
      scopes: [https://outlook.office365.com/.default]
      caBundleSecretRef: {{name: m365, key: ca.crt}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  licenses: 10
  users: [alice@example.com]
  inboundRoute: m365
"#,
        upstream.ip(),
        upstream.port(),
    )
}

fn message(id: &str) -> String {
    format!("Message-ID: <{id}@client.test>\r\nSubject: {id}\r\n\r\nbody of {id}\r\n")
}

async fn send(relay: std::net::SocketAddr, id: String) -> String {
    send_message(
        relay,
        "someone@partner.example",
        &["alice@example.com"],
        &message(&id),
    )
    .await
}

/// `(token, accepted)` of each AUTH the upstream saw.
fn auths(upstream: &BearerUpstream) -> Vec<(String, bool)> {
    upstream
        .auths()
        .into_iter()
        .map(|(_, user, token, ok)| {
            assert_eq!(user, USER);
            (token, ok)
        })
        .collect()
}

#[tokio::test]
async fn one_token_from_the_client_credentials_grant_serves_every_connection() {
    bounded(60, async {
        let tls = tls();
        let endpoint = TokenEndpoint::start(&tls, Duration::from_secs(3600)).await;
        let upstream =
            BearerUpstream::start(&tls, "LOGIN XOAUTH2", USER, endpoint.issuer.clone()).await;
        let config = configured(&manifests(upstream.addr, &endpoint.url, &tls.pem));
        let relay = config.start().await;
        // Three clients at once: three upstream connections, one token request.
        let replies =
            futures_util::future::join_all((0..3).map(|i| send(relay.smtp, format!("m365-{i}"))))
                .await;
        for reply in &replies {
            assert!(reply.starts_with("250 2.0.0"), "{reply}");
        }
        assert_eq!(upstream.accepted(), 3);
        let requests = endpoint.requests();
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(
            requests[0],
            "grant_type=client_credentials&client_id=app-1&client_secret=s3cret-value\
             &scope=https%3A%2F%2Foutlook.office365.com%2F.default"
        );
        let seen = upstream.auths();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen.iter()
                .all(|(mechanism, _, token, ok)| mechanism == "XOAUTH2"
                    && token == "token-1"
                    && *ok),
            "{seen:?}"
        );
        let metrics = config.metrics_text();
        assert!(
            metrics.contains(
                r#"mailroute_relay_oauth_token_requests_total{route="m365",result="success"} 1"#
            ),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_token_about_to_expire_is_replaced_before_it_is_used() {
    bounded(60, async {
        let tls = tls();
        // Two-second tokens: replaced once half their life is gone.
        let endpoint = TokenEndpoint::start(&tls, Duration::from_secs(2)).await;
        let upstream =
            BearerUpstream::start(&tls, "OAUTHBEARER XOAUTH2", USER, endpoint.issuer.clone()).await;
        let config = configured(&manifests(upstream.addr, &endpoint.url, &tls.pem));
        let relay = config.start().await;
        let first = send(relay.smtp, "early".into()).await;
        assert!(first.starts_with("250 2.0.0"), "{first}");
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let second = send(relay.smtp, "late".into()).await;
        assert!(second.starts_with("250 2.0.0"), "{second}");
        // The old token still had 0.7 s to live; the upstream never saw it refused.
        assert_eq!(
            auths(&upstream),
            vec![("token-1".to_owned(), true), ("token-2".to_owned(), true)]
        );
        assert!(
            upstream
                .auths()
                .iter()
                .all(|(mechanism, ..)| mechanism == "OAUTHBEARER"),
            "OAUTHBEARER is preferred: {:?}",
            upstream.auths()
        );
        assert_eq!(endpoint.requests().len(), 2);
    })
    .await;
}

/// The token is revoked at the provider while the relay still holds it: XOAUTH2 answers
/// `535`, OAUTHBEARER the error challenge; either way a new token is fetched and the same
/// connection authenticates with it.
#[tokio::test]
async fn a_token_the_upstream_refuses_is_replaced_once_and_the_mail_delivered() {
    bounded(60, async {
        for mechanisms in ["XOAUTH2", "OAUTHBEARER"] {
            let tls = tls();
            let endpoint = TokenEndpoint::start(&tls, Duration::from_secs(3600)).await;
            let upstream =
                BearerUpstream::start(&tls, mechanisms, USER, endpoint.issuer.clone()).await;
            let config = configured(&manifests(upstream.addr, &endpoint.url, &tls.pem));
            let relay = config.start().await;
            let first = send(relay.smtp, "before".into()).await;
            assert!(first.starts_with("250 2.0.0"), "{mechanisms}: {first}");
            endpoint.revoke_all();
            let second = send(relay.smtp, "after".into()).await;
            assert!(second.starts_with("250 2.0.0"), "{mechanisms}: {second}");
            assert_eq!(
                auths(&upstream),
                vec![
                    ("token-1".to_owned(), true),
                    ("token-1".to_owned(), false),
                    ("token-2".to_owned(), true)
                ],
                "{mechanisms}"
            );
            assert_eq!(upstream.accepted(), 2, "{mechanisms}");
            assert_eq!(endpoint.requests().len(), 2, "{mechanisms}");
        }
    })
    .await;
}

/// An upstream that refuses the fresh token too is not asked again and again: the message is
/// deferred after one replacement.
#[tokio::test]
async fn a_fresh_token_refused_too_defers_without_a_loop() {
    bounded(60, async {
        let tls = tls();
        let endpoint = TokenEndpoint::start(&tls, Duration::from_secs(3600)).await;
        // The upstream takes tokens for another mailbox only.
        let upstream = BearerUpstream::start(
            &tls,
            "XOAUTH2",
            "other@example.com",
            endpoint.issuer.clone(),
        )
        .await;
        let config = configured(&manifests(upstream.addr, &endpoint.url, &tls.pem));
        let relay = config.start().await;
        let reply = send(relay.smtp, "nobody-home".into()).await;
        assert!(reply.starts_with("451 "), "{reply}");
        assert!(reply.contains("route m365"), "{reply}");
        assert_eq!(upstream.auths().len(), 2, "{:?}", upstream.auths());
        assert_eq!(endpoint.requests().len(), 2);
        assert_eq!(upstream.accepted(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_token_endpoint_down_or_refusing_defers_with_451_4_7_0_naming_the_route() {
    bounded(60, async {
        let tls = tls();
        let endpoint = TokenEndpoint::start(&tls, Duration::from_secs(3600)).await;
        let upstream = BearerUpstream::start(&tls, "XOAUTH2", USER, endpoint.issuer.clone()).await;

        // Nothing listens at the token URL.
        let down = format!(
            "https://127.0.0.1:{}/oauth2/v2.0/token",
            closed_port().await
        );
        let config = configured(&manifests(upstream.addr, &down, &tls.pem));
        let relay = config.start().await;
        let reply = send(relay.smtp, "down".into()).await;
        assert!(reply.starts_with("451 4.7.0"), "{reply}");
        assert!(reply.contains("route m365"), "{reply}");
        assert!(reply.contains("token endpoint"), "{reply}");
        assert!(!reply.contains("s3cret"), "{reply}");
        let metrics = config.metrics_text();
        assert!(
            metrics.contains(
                r#"mailroute_relay_oauth_token_requests_total{route="m365",result="failure"} 1"#
            ),
            "{metrics}"
        );
        drop(relay);

        // The endpoint refuses the client (a wrong or expired client secret).
        if let Ok(mut issuer) = endpoint.issuer.lock() {
            issuer.refuse = true;
        }
        let config = configured(&manifests(upstream.addr, &endpoint.url, &tls.pem));
        let relay = config.start().await;
        let reply = send(relay.smtp, "refused".into()).await;
        assert!(reply.starts_with("451 4.7.0"), "{reply}");
        assert!(reply.contains("401 invalid_client"), "{reply}");
        assert!(reply.contains("AADSTS7000215"), "{reply}");
        assert!(upstream.auths().is_empty(), "{:?}", upstream.auths());
        assert_eq!(upstream.accepted(), 0);
        drop(relay);
    })
    .await;
}
