//! How the relay reaches the Kubernetes API: kube's client, configured as `kubectl` would be
//! (`KUBECONFIG` or `~/.kube/config` outside a cluster, the pod's service account inside one),
//! with one change: a token file (the service account's projected token, or a kubeconfig
//! user's `tokenFile`) is read on every request.
//!
//! kube itself keeps a file token for up to a minute before reading it again. The kubelet
//! rotates a projected token long before it expires, so that is safe in a cluster, but a token
//! replaced on purpose (revoked, or rotated by hand outside a cluster) would go on being sent.
//! With watches the relay makes a few requests an hour, so reading a small file on each costs
//! nothing and makes "a new token is used on the next request" hold exactly.

use super::ClusterError;
use std::path::{Path, PathBuf};

/// A client for the API: from `kubeconfig` when given, otherwise inferred like `kubectl`.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<kube::Client, ClusterError> {
    let failed = |e: &dyn std::fmt::Display| ClusterError::Connect(e.to_string());
    let mut config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| failed(&e))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| failed(&e))?
        }
        None => kube::Config::infer().await.map_err(|e| failed(&e))?,
    };
    let token_file = config.auth_info.token_file.take();
    let builder = kube::client::ClientBuilder::try_from(config).map_err(|e| failed(&e))?;
    Ok(match token_file {
        Some(path) => {
            let token = TokenFile::new(path);
            builder
                .with_layer(&tower::util::MapRequestLayer::new(
                    move |mut request: http::Request<kube::client::Body>| {
                        if let Some(value) = token.header() {
                            request
                                .headers_mut()
                                .insert(http::header::AUTHORIZATION, value);
                        }
                        request
                    },
                ))
                .build()
        }
        None => builder.build(),
    })
}

/// Sets `Authorization: Bearer` from the file's content on each request.
#[derive(Clone, Debug)]
struct TokenFile {
    path: PathBuf,
}

impl TokenFile {
    fn new(path: String) -> Self {
        Self {
            path: PathBuf::from(path),
        }
    }

    fn header(&self) -> Option<http::HeaderValue> {
        match std::fs::read_to_string(&self.path) {
            Ok(token) => {
                let mut value =
                    http::HeaderValue::try_from(format!("Bearer {}", token.trim())).ok()?;
                value.set_sensitive(true);
                Some(value)
            }
            Err(e) => {
                // NB: the path only; never the token.
                tracing::warn!(path = %self.path.display(), error = %e, "the API token file cannot be read");
                None
            }
        }
    }
}
