//! `--configmap NAMESPACE/NAME`: the operator's ConfigMap(s) and credentials Secret read
//! straight from the Kubernetes API (SPEC 5.1), so a change is in force within a poll instead
//! of the kubelet's volume refresh (up to a minute or more). The relay does not link a
//! Kubernetes client library: this is three kinds of GET with the pod's service-account token,
//! over TLS checked against the cluster's CA.
//!
//! What is read: ConfigMap `NAME` (the whole document under `config.json`, or, for a split
//! one, its part count in the `mailroute.io/parts` annotation and parts `NAME-0`, `NAME-1`,
//! ...), and Secret `mailroute-relay-credentials` (`credentials.json`). The entries are put
//! together as a `--config` directory would be ([`crate::config_source::from_entries`]): a
//! generation whose parts are not all there, or are of different generations, is refused and
//! the previous one stays in force.

use base64::Engine;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// The operator's credentials Secret.
pub const CREDENTIALS_SECRET: &str = mailroute_config::parts::CREDENTIALS_SECRET;
const PARTS_ANNOTATION: &str = mailroute_config::parts::PARTS_ANNOTATION;
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("--configmap: expected NAMESPACE/NAME, got {0:?}")]
    Name(String),
    #[error("not running in a cluster: {0}")]
    NotInCluster(String),
    #[error("TLS settings for the API server: {0}")]
    Tls(String),
    #[error("GET {path}: {detail}")]
    Request { path: String, detail: String },
    #[error("GET {path}: HTTP {status}")]
    Status { path: String, status: u16 },
    #[error("{path}: {detail}")]
    Decode { path: String, detail: String },
}

/// Where and how to read.
pub struct ApiSource {
    base: String,
    token: Option<String>,
    namespace: String,
    name: String,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for ApiSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSource")
            .field("base", &self.base)
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// `NAMESPACE/NAME`.
pub fn parse_name(text: &str) -> Result<(String, String), ClusterError> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(ClusterError::Name(text.to_owned())),
    }
}

impl ApiSource {
    /// From inside a pod: the API server from `KUBERNETES_SERVICE_HOST`/`_PORT`, the
    /// service-account token and CA.
    pub fn in_cluster(namespace: &str, name: &str) -> Result<Self, ClusterError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| ClusterError::NotInCluster("KUBERNETES_SERVICE_HOST is not set".into()))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let dir = Path::new(SERVICE_ACCOUNT);
        let token = std::fs::read_to_string(dir.join("token"))
            .map_err(|e| ClusterError::NotInCluster(format!("service-account token: {e}")))?;
        let ca = std::fs::read(dir.join("ca.crt"))
            .map_err(|e| ClusterError::NotInCluster(format!("service-account CA: {e}")))?;
        Self::new(
            &format!("https://{host}:{port}"),
            Some(token.trim().to_owned()),
            &ca,
            namespace,
            name,
        )
    }

    /// Against `base` (`https://host:port`), trusting the PEM certificates in `ca_pem`.
    pub fn new(
        base: &str,
        token: Option<String>,
        ca_pem: &[u8],
        namespace: &str,
        name: &str,
    ) -> Result<Self, ClusterError> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| ClusterError::Tls(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| ClusterError::Tls(e.to_string()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClusterError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout: Duration::from_secs(10),
        })
    }

    /// GET `path`; `Ok(None)` on 404.
    async fn get(&self, path: &str) -> Result<Option<serde_json::Value>, ClusterError> {
        let failed = |detail: String| ClusterError::Request {
            path: path.to_owned(),
            detail,
        };
        let mut request = http::Request::get(format!("{}{path}", self.base))
            .header(http::header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(e.to_string()))?;
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| failed("timed out".into()))?
            .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        if status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(ClusterError::Status {
                path: path.to_owned(),
                status: status.as_u16(),
            });
        }
        let body = tokio::time::timeout(self.timeout, response.into_body().collect())
            .await
            .map_err(|_| failed("timed out".into()))?
            .map_err(|e| failed(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| ClusterError::Decode {
                path: path.to_owned(),
                detail: e.to_string(),
            })
    }

    /// How the source is named in messages: `configmap NAMESPACE/NAME`.
    pub fn origin(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("configmap {}/{}", self.namespace, self.name))
    }

    fn config_map_path(&self, name: &str) -> String {
        format!("/api/v1/namespaces/{}/configmaps/{name}", self.namespace)
    }

    /// The entries a `--config` directory would hold: the document (whole or parts) and the
    /// credentials.
    pub async fn fetch(&self) -> Result<BTreeMap<String, String>, ClusterError> {
        let mut entries = BTreeMap::new();
        let index_path = self.config_map_path(&self.name);
        let Some(index) = self.get(&index_path).await? else {
            return Err(ClusterError::Status {
                path: index_path,
                status: 404,
            });
        };
        add_data(&index, &mut entries);
        let parts: usize = index["metadata"]["annotations"][PARTS_ANNOTATION]
            .as_str()
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        if parts > 1 {
            for i in 0..parts {
                let path = self.config_map_path(&format!("{}-{i}", self.name));
                if let Some(part) = self.get(&path).await? {
                    add_data(&part, &mut entries);
                }
            }
        }
        let secret_path = format!(
            "/api/v1/namespaces/{}/secrets/{CREDENTIALS_SECRET}",
            self.namespace
        );
        if let Some(secret) = self.get(&secret_path).await?
            && let Some(data) = secret["data"].as_object()
        {
            for (key, value) in data {
                let decoded = value
                    .as_str()
                    .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| ClusterError::Decode {
                        path: secret_path.clone(),
                        detail: format!("key {key} is not base64 UTF-8"),
                    })?;
                entries.insert(key.clone(), decoded);
            }
        }
        Ok(entries)
    }
}

fn add_data(object: &serde_json::Value, entries: &mut BTreeMap<String, String>) {
    if let Some(data) = object["data"].as_object() {
        for (key, value) in data {
            if let Some(text) = value.as_str() {
                entries.insert(key.clone(), text.to_owned());
            }
        }
    }
}
