//! The TLS configurations of the tunnel, built from the node's workload certificates and
//! rebuilt whenever one comes or goes (renewal, a new workload, a new root).

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use nodemesh_api::identity::SpiffeId;
use rustls::{
    ClientConfig, ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::identity::{
    Identities,
    tls::{self, TrustRoots},
};

/// (source, destination): what a client configuration presents and what it accepts.
type IdentityPair = (SpiffeId, SpiffeId);

/// A client configuration, the certificate version it was built from, and when that
/// certificate is due for renewal.
struct CachedClient {
    version: u64,
    config: Arc<ClientConfig>,
    renew_at: SystemTime,
}

pub struct Credentials {
    pub identities: Arc<Identities>,
    /// How long a connection waits for its workload's first certificate.
    cert_wait: Duration,
    server: Mutex<Option<(u64, Arc<ServerConfig>)>>,
    clients: Mutex<HashMap<IdentityPair, CachedClient>>,
}

impl Credentials {
    pub fn new(identities: Arc<Identities>, cert_wait: Duration) -> Credentials {
        Credentials { identities, cert_wait, server: Mutex::default(), clients: Mutex::default() }
    }

    fn roots(&self) -> Result<TrustRoots, String> {
        TrustRoots::from_pem(&self.identities.roots())
            .map_err(|e| format!("no trusted roots ({e}): this node holds no workload certificate yet"))
    }

    /// The server side: presents the certificate the client's server name asks for and
    /// requires a client certificate chaining to the roots the node knows.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, String> {
        let version = self.identities.version();
        let mut cached = self.server.lock().expect("server config lock");
        if let Some((v, config)) = cached.as_ref()
            && *v == version
        {
            return Ok(Arc::clone(config));
        }
        let resolver = Arc::new(ByServerName(Arc::clone(&self.identities)));
        let config = Arc::new(tls::server_config_resolving(resolver, &self.roots()?)?);
        *cached = Some((version, Arc::clone(&config)));
        Ok(config)
    }

    /// The client side: presents `source`'s certificate and accepts only a server proving
    /// `destination`; with the time that certificate is due for renewal.
    pub async fn client_config(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
    ) -> Result<(Arc<ClientConfig>, SystemTime), String> {
        let Some(cert) = self.identities.wait_for(source, self.cert_wait).await else {
            let why = self.identities.failure(source).unwrap_or_else(|| "not issued yet".into());
            return Err(format!("no certificate for {source} ({why})"));
        };
        let version = self.identities.version();
        let key = (source.clone(), destination.clone());
        if let Some(c) = self.clients.lock().expect("client configs lock").get(&key)
            && c.version == version
        {
            return Ok((Arc::clone(&c.config), c.renew_at));
        }
        let config = Arc::new(tls::client_config(&cert, &self.roots()?, destination.clone())?);
        let renew_at = cert.renew_at();
        let cached = CachedClient { version, config: Arc::clone(&config), renew_at };
        self.clients.lock().expect("client configs lock").insert(key, cached);
        Ok((config, renew_at))
    }
}

/// Picks the workload certificate by the hashed server name the client sent.
struct ByServerName(Arc<Identities>);

impl fmt::Debug for ByServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ByServerName")
    }
}

impl ResolvesServerCert for ByServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        let Some(cert) = self.0.by_server_name(name) else {
            tracing::warn!(
                server_name = name,
                "tunnel client asked for an identity no workload of this node has"
            );
            return None;
        };
        match cert.certified() {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(identity = %cert.identity, "certificate unusable for TLS: {e}");
                None
            }
        }
    }
}
