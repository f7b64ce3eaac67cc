//! A service-account token issuer for tests: signing keys (ES256 from rcgen, RS256 from
//! openssl), their JWKS document, and projected tokens as the kubelet mounts them.

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::time::{SystemTime, UNIX_EPOCH};

/// A signing key of the issuer and its public half as a JWK.
pub struct IssuerKey {
    kid: &'static str,
    algorithm: Algorithm,
    key: EncodingKey,
}

impl IssuerKey {
    pub fn es256(kid: &'static str) -> Self {
        let pair = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            kid,
            algorithm: Algorithm::ES256,
            key,
        }
    }

    pub fn rs256(kid: &'static str) -> Self {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .unwrap_or_else(|e| panic!("openssl: {e}"));
        assert!(out.status.success(), "openssl genpkey failed");
        let key = EncodingKey::from_rsa_pem(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
        Self {
            kid,
            algorithm: Algorithm::RS256,
            key,
        }
    }

    pub fn jwk(&self) -> Jwk {
        let mut jwk =
            Jwk::from_encoding_key(&self.key, self.algorithm).unwrap_or_else(|e| panic!("{e}"));
        jwk.common.key_id = Some(self.kid.to_owned());
        jwk
    }

    /// A projected service-account token as the kubelet mounts it (the claims that matter).
    pub fn token(&self, subject: &str, audience: &str, expires_in: i64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let claims = serde_json::json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": subject,
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": now + expires_in,
            "kubernetes.io": {"namespace": "mail", "serviceaccount": {"name": "ticketing"}},
        });
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.to_owned());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap_or_else(|e| panic!("{e}"))
    }
}

pub fn jwks(keys: &[&IssuerKey]) -> String {
    let set = JwkSet {
        keys: keys.iter().map(|k| k.jwk()).collect(),
    };
    serde_json::to_string(&set).unwrap_or_else(|e| panic!("{e}"))
}
