//! The cluster issuer's public keys for service-account tokens (SPEC 11), asked of the API
//! server when the relay follows the cluster and no `--jwks-file` is given:
//! `GET /openid/v1/jwks`, which Kubernetes' default `system:service-account-issuer-discovery`
//! binding lets every service account read. Asked once a configuration lists a service
//! account (never otherwise: a relay whose tenants use none makes no such request), then
//! every [`REFRESH`] (an issuer publishes a new key beside the old one well before it signs
//! with it), and every [`RETRY`] after a failure until it answers; tokens are refused until
//! the first answer.

use super::{FAILURE_LOG_EVERY, LogEvery};
use crate::auth::tokens::TokenKeys;
use std::sync::Arc;
use std::time::Duration;

/// How often the keys are asked for again.
pub const REFRESH: Duration = Duration::from_secs(600);
/// How soon after a failure.
pub const RETRY: Duration = Duration::from_secs(30);

/// The API server's endpoint.
pub const JWKS_PATH: &str = "/openid/v1/jwks";

/// Follows the issuer's keys into `keys` until the returned task is dropped or aborted.
pub fn follow_issuer_keys(
    client: kube::Client,
    keys: Arc<TokenKeys>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        keys.wanted().await;
        let origin = format!("the API server's {JWKS_PATH}");
        let mut log = LogEvery::new(FAILURE_LOG_EVERY);
        let mut held = None;
        loop {
            let answer = match http::Request::get(JWKS_PATH).body(Vec::new()) {
                Ok(request) => client
                    .request_text(request)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let installed =
                answer.and_then(|text| keys.install(&origin, &text).map_err(|e| e.to_string()));
            let wait = match installed {
                Ok(count) => {
                    if log.recovered() || held != Some(count) {
                        tracing::info!(
                            keys = count,
                            "service-account token keys from the API server"
                        );
                    }
                    held = Some(count);
                    REFRESH
                }
                Err(e) => {
                    if log.failed(tokio::time::Instant::now()) {
                        tracing::warn!(error = %e, "service-account token keys not read from the API server; tokens are checked against the last keys read, if any");
                    }
                    RETRY
                }
            };
            tokio::time::sleep(wait).await;
        }
    })
}
