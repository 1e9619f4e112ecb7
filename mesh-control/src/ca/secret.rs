//! Istio's `cacerts` Secret: on Kubernetes, a user-supplied CA bundle is usually a Secret
//! named `cacerts` (in `istio-system`) rather than files. When the cluster has one, its four
//! keys are written into the CA directory before the CA loads, so the directory stays the one
//! source the CA reads (and where the node-token key lives).

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use k8s_openapi::api::core::v1::Secret;

pub const SECRET_NAME: &str = "cacerts";
const FILES: [&str; 4] = ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"];

/// Copies Secret `<namespace>/cacerts` into `dir`; `false` when the cluster has none.
pub async fn fetch(client: &kube::Client, namespace: &str, dir: &Path) -> anyhow::Result<bool> {
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    let Some(secret) = secrets.get_opt(SECRET_NAME).await? else { return Ok(false) };
    let data = secret.data.unwrap_or_default();
    // Every key first: a Secret missing one must not leave the directory half replaced.
    let mut files = Vec::new();
    for file in FILES {
        let bytes = data.get(file).ok_or_else(|| {
            anyhow::anyhow!(
                "Secret {namespace}/{SECRET_NAME} has no key {file} (it needs {})",
                FILES.join(", ")
            )
        })?;
        files.push((file, bytes.0.clone()));
    }
    std::fs::create_dir_all(dir)?;
    for (file, bytes) in files {
        // The key is secret; the certificates are not, but one mode keeps it simple.
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join(file))?;
        out.write_all(&bytes)?;
    }
    Ok(true)
}
