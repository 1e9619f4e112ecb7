//! Node bootstrap tokens (local mode): how a mesh-node proves which node it is when it asks
//! the CA for its workloads' certificates. A token is `<node>.<HMAC-SHA256(secret, node)>`;
//! the secret lives in the CA directory (`node-token.key`, owner-only), so mesh-control checks
//! a token without keeping a list, and `mesh-control node-token <node>` mints one.
//! (On Kubernetes the node proxy's ServiceAccount token, checked by TokenReview, can take this
//! role: see [`TokenReviewer`].)

use std::{fs, path::Path};

use ring::{hmac, rand::SecureRandom};

const SECRET_FILE: &str = "node-token.key";

pub struct NodeTokens {
    key: hmac::Key,
}

impl NodeTokens {
    /// The token key of the CA in `dir`, created on first use.
    pub fn load_or_create(dir: &Path) -> std::io::Result<NodeTokens> {
        let path = dir.join(SECRET_FILE);
        let secret = match fs::read(&path) {
            Ok(s) if s.len() >= 32 => s,
            Ok(_) => return Err(std::io::Error::other(format!("{}: shorter than 32 bytes", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut s = vec![0u8; 32];
                ring::rand::SystemRandom::new()
                    .fill(&mut s)
                    .map_err(|_| std::io::Error::other("no randomness"))?;
                fs::create_dir_all(dir)?;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
                std::io::Write::write_all(&mut f, &s)?;
                s
            }
            Err(e) => return Err(e),
        };
        Ok(NodeTokens { key: hmac::Key::new(hmac::HMAC_SHA256, &secret) })
    }

    /// The token of `node`.
    pub fn mint(&self, node: &str) -> String {
        format!("{node}.{}", hex(hmac::sign(&self.key, node.as_bytes()).as_ref()))
    }

    /// The node a token belongs to, if it is genuine (compared in constant time).
    pub fn verify(&self, token: &str) -> Option<String> {
        let (node, tag) = token.trim().rsplit_once('.')?;
        let tag = unhex(tag)?;
        hmac::verify(&self.key, node.as_bytes(), &tag).ok()?;
        Some(node.to_string())
    }
}

/// Which nodes have proven who they are. A node proves itself with a bearer token: a node
/// token of this CA, or (on Kubernetes) the node proxy's ServiceAccount token, which
/// TokenReview maps to the node its pod runs on.
///
/// With credentials configured (a CA, or TokenReview), every workload report must carry the
/// reporting node's valid token ([`NodeCredentials::admit_report`]): reported workloads become
/// Service endpoints and decide which identities their node may obtain, so a report taken at
/// its word would let anyone who reaches the port inject an endpoint. A node that reported
/// with its token is *verified*; its name then accepts no xDS stream without the token either.
/// Without a CA there are no tokens and every report is taken (plain local mode, no identity:
/// whoever reaches mesh-control's port is trusted, as the node itself is).

#[derive(Default)]
pub struct NodeCredentials {
    tokens: Option<NodeTokens>,
    kube: Option<TokenReviewer>,
    verified: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// Kubernetes: a token is the node proxy's if TokenReview authenticates it as `account`; the
/// node is the one its (bound) pod runs on.
pub struct TokenReviewer {
    pub client: kube::Client,
    /// `namespace/name` of the node proxy's ServiceAccount.
    pub account: String,
    /// The audience the node proxy's projected token is minted for (the DaemonSet's
    /// `serviceAccountToken.audience`). The review asks for it: without audiences the API
    /// server checks the token against its own audience, which a token for `nodemesh` lacks;
    /// and a token minted for the API server (or any other audience) is refused here.
    pub audience: String,
}

/// The username TokenReview gives a ServiceAccount token, and the `extra` key of its pod's node.
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

impl TokenReviewer {
    async fn node_of(&self, token: &str) -> Result<Option<String>, tonic::Status> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let answer = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("TokenReview failed: {e}")))?;
        let Some(status) = answer.status.filter(|s| s.authenticated == Some(true)) else { return Ok(None) };
        // The API server says which of the asked audiences the token holds; an authenticator
        // that ignores audiences would answer without ours, and such an answer proves nothing.
        if !status.audiences.as_ref().is_some_and(|a| a.contains(&self.audience)) {
            return Err(tonic::Status::permission_denied(format!(
                "the token is not for audience {} (mount a projected token with that audience)",
                self.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let (namespace, name) = self.account.split_once('/').unwrap_or(("", &self.account));
        let wanted = format!("system:serviceaccount:{namespace}:{name}");
        if user.username.as_deref() != Some(wanted.as_str()) {
            return Err(tonic::Status::permission_denied(format!(
                "the token belongs to {}, not the node proxy's ServiceAccount {}",
                user.username.unwrap_or_default(),
                self.account
            )));
        }
        let node = user.extra.unwrap_or_default().remove(NODE_NAME_EXTRA).and_then(|v| v.into_iter().next());
        node.map(Some).ok_or_else(|| {
            tonic::Status::permission_denied(
                "the token is not bound to a pod on a node (use a projected token)",
            )
        })
    }
}

impl NodeCredentials {
    pub fn new(tokens: Option<NodeTokens>, kube: Option<TokenReviewer>) -> NodeCredentials {
        NodeCredentials { tokens, kube, verified: Default::default() }
    }

    pub fn enabled(&self) -> bool {
        self.tokens.is_some() || self.kube.is_some()
    }

    /// The node whose token a request carries (`authorization: Bearer <token>`); `Ok(None)`
    /// when it carries none (or no credentials are configured).
    pub async fn presented(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Option<String>, tonic::Status> {
        if !self.enabled() {
            return Ok(None);
        }
        let Some(header) = metadata.get("authorization") else { return Ok(None) };
        let token = header.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")).ok_or_else(|| {
            tonic::Status::unauthenticated("the authorization header is not `Bearer <node token>`")
        })?;
        if let Some(node) = self.tokens.as_ref().and_then(|t| t.verify(token)) {
            return Ok(Some(node));
        }
        if let Some(kube) = &self.kube
            && let Some(node) = kube.node_of(token).await?
        {
            return Ok(Some(node));
        }
        Err(tonic::Status::unauthenticated(
            "the node token is not valid (mint one with `mesh-control node-token <node>`, or on Kubernetes send the \
             node proxy's ServiceAccount token)",
        ))
    }

    /// Whether a workload report may speak for `node`: with credentials configured it must
    /// carry that node's valid token (UNAUTHENTICATED without one); otherwise as [`admit`].
    ///
    /// [`admit`]: NodeCredentials::admit
    pub async fn admit_report(
        &self,
        node: &str,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(), tonic::Status> {
        if self.enabled() && metadata.get("authorization").is_none() {
            return Err(tonic::Status::unauthenticated(format!(
                "a workload report for node {node} carries no node token; with a CA every report must \
                 (mesh-node --token-file; mint one with `mesh-control node-token {node}`)"
            )));
        }
        self.admit(node, metadata).await
    }

    /// Whether a request (a workload report, an xDS stream) may speak for `node` with its
    /// credential: a token speaks only for its own node, and a node that has proved itself
    /// once is never again taken at its word. Records a node that proves itself. A request
    /// without a token for a node that never proved itself passes (an xDS stream of a
    /// proxyless client only reads config; reports go through [`admit_report`]).
    ///
    /// [`admit_report`]: NodeCredentials::admit_report
    pub async fn admit(
        &self,
        node: &str,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(), tonic::Status> {
        let presented = self.presented(metadata).await?;
        let mut verified = self.verified.lock().expect("verified lock");
        match presented {
            Some(owner) if owner == node => {
                verified.insert(owner);
                Ok(())
            }
            Some(owner) => Err(tonic::Status::permission_denied(format!(
                "the token of node {owner} cannot report workloads for node {node}"
            ))),
            None if verified.contains(node) => Err(tonic::Status::unauthenticated(format!(
                "node {node} has reported with its token before; a report without it is refused"
            ))),
            None => Ok(()),
        }
    }

    /// Whether `node` has reported with its token.
    pub fn is_verified(&self, node: &str) -> bool {
        self.verified.lock().expect("verified lock").contains(node)
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_node_and_cannot_be_forged_or_moved() {
        let dir = std::env::temp_dir().join(format!("nm-tokens-{}", std::process::id()));
        let tokens = NodeTokens::load_or_create(&dir).unwrap();
        let t = tokens.mint("node-a");
        assert_eq!(tokens.verify(&t).as_deref(), Some("node-a"));
        let moved = t.replacen("node-a", "node-b", 1);
        assert_eq!(tokens.verify(&moved), None, "a token for one node is no good for another");
        assert_eq!(tokens.verify("node-a.00"), None);
        assert_eq!(tokens.verify("garbage"), None);
        // The same key after a restart.
        assert_eq!(NodeTokens::load_or_create(&dir).unwrap().verify(&t).as_deref(), Some("node-a"));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn bearer(token: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    #[tokio::test]
    async fn with_a_ca_every_report_needs_its_nodes_token_and_without_one_none_does() {
        let dir = std::env::temp_dir().join(format!("nm-tokens-report-{}", std::process::id()));
        let tokens = NodeTokens::load_or_create(&dir).unwrap();
        let token = tokens.mint("node-a");
        let with_ca = NodeCredentials::new(Some(tokens), None);
        let none = tonic::metadata::MetadataMap::new();
        // A node that never proved itself still cannot report without a token.
        let e = with_ca.admit_report("node-b", &none).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("carries no node token"), "{e:?}");
        let e = with_ca.admit_report("node-a", &bearer("node-a.00")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let e = with_ca.admit_report("node-b", &bearer(&token)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        with_ca.admit_report("node-a", &bearer(&token)).await.unwrap();
        assert!(with_ca.is_verified("node-a"));
        // A proxyless client's xDS stream needs none, for a node that never proved itself.
        with_ca.admit("grpc-client", &none).await.unwrap();

        // Plain local mode (no CA): whoever reaches the port reports, as before.
        let local = NodeCredentials::new(None, None);
        local.admit_report("node-b", &none).await.unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
