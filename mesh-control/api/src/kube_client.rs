//! (feature `kubernetes`) Reaching the API server the same way from both binaries.

use kube::Client;

/// Where to reach the API server.
#[derive(Clone, Debug)]
pub enum Connection {
    /// In-cluster ServiceAccount (token, CA, `KUBERNETES_SERVICE_HOST`), else `KUBECONFIG` /
    /// `~/.kube/config` (kube's inference).
    Infer,
    /// An explicit URL without credentials (a local proxy such as `kubectl proxy`, tests).
    Url(String),
}

pub async fn client(connection: &Connection) -> anyhow::Result<Client> {
    let config = match connection {
        Connection::Infer => kube::Config::infer().await?,
        Connection::Url(url) => {
            kube::Config::new(url.parse().map_err(|e| anyhow::anyhow!("--kube-api {url}: {e}"))?)
        }
    };
    Ok(Client::try_from(config)?)
}
