//! How mesh-node reaches mesh-control: the URL, and for `https://` the roots its certificate
//! must chain to (Istio mounts the same as `root-cert.pem`) and the name it must carry.
//!
//! The node token is a node's first secret: it is never sent in plaintext to another host.
//! Plaintext (`http://`) with a token is allowed only to a loopback address.

use std::{net::IpAddr, path::PathBuf, sync::Mutex, time::Duration};

use anyhow::Context;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The `authorization` value that carries the node token (on reports, xDS streams and CSRs).
pub fn bearer(token: Option<&str>) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    token.and_then(|t| format!("Bearer {t}").parse().ok())
}

/// The node token, read from `--token-file` before each use (each report, xDS stream and
/// CSR): a projected ServiceAccount token is rewritten by the kubelet (an atomic symlink swap)
/// well before it expires, and an operator may replace a node token, so a value read once
/// goes stale while the process runs on.
#[derive(Clone, Debug)]
pub struct NodeToken {
    path: PathBuf,
    /// The last token the file held, used when it cannot be read for a moment.
    last: std::sync::Arc<Mutex<String>>,
}

impl NodeToken {
    /// Reads the file once, so a missing or empty one fails at start with its reason.
    pub fn load(path: PathBuf) -> Result<NodeToken, String> {
        let token = read_token(&path)?;
        Ok(NodeToken { path, last: std::sync::Arc::new(Mutex::new(token)) })
    }

    /// The token the file holds now; the last one read if it cannot be read (said in the log).
    pub fn current(&self) -> String {
        let mut last = self.last.lock().expect("token lock");
        match read_token(&self.path) {
            Ok(token) => {
                if *last != token {
                    tracing::info!(file = %self.path.display(), "the node token file changed: using the new token");
                    *last = token;
                }
            }
            Err(e) => tracing::warn!("{e}; using the token read before"),
        }
        last.clone()
    }

    /// `Bearer <the current token>`.
    pub fn bearer(&self) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
        bearer(Some(&self.current()))
    }
}

fn read_token(path: &std::path::Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        Ok(_) => Err(format!("--token-file {}: empty", path.display())),
        Err(e) => Err(format!("--token-file {}: {e}", path.display())),
    }
}

#[derive(Clone, Debug)]
pub struct ControlPlane {
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    pub url: String,
    /// PEM roots the TLS port's certificate must chain to (re-read at every connect, so a
    /// root rotation needs no restart).
    pub root_file: Option<PathBuf>,
    /// The name the certificate must carry, when the URL's host is not it.
    pub server_name: Option<String>,
}

impl ControlPlane {
    /// Checks the combination once, at start: every way to get it wrong has its own message.
    pub fn check(&self, with_token: bool) -> Result<(), String> {
        let uri: hyper::Uri =
            self.url.parse().map_err(|e| format!("--control-plane `{}`: not a URI ({e})", self.url))?;
        let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        match uri.scheme_str() {
            Some("https") => match &self.root_file {
                None => Err(format!(
                    "--control-plane `{}` is https: give --control-plane-root, the PEM roots its \
                     certificate chains to (mesh-control's <ca-dir>/root-cert.pem)",
                    self.url
                )),
                Some(file) => std::fs::metadata(file)
                    .map(|_| ())
                    .map_err(|e| format!("--control-plane-root {}: {e}", file.display())),
            },
            Some("http") => {
                let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
                if with_token && !loopback {
                    return Err(format!(
                        "--control-plane `{}`: the node token would cross the network in plaintext; \
                         use mesh-control's TLS port (https://{host}:15012) with --control-plane-root",
                        self.url
                    ));
                }
                if self.root_file.is_some() || self.server_name.is_some() {
                    return Err(format!(
                        "--control-plane `{}` is plaintext: --control-plane-root and \
                         --control-plane-name apply to https:// only",
                        self.url
                    ));
                }
                Ok(())
            }
            _ => Err(format!("--control-plane `{}`: must be a URI like https://10.0.0.5:15012", self.url)),
        }
    }

    /// A channel endpoint: TLS 1.3 checked against the root file for `https://`.
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        self.endpoint_with(self.roots()?)
    }

    /// The root file's contents (`None` for plaintext).
    fn roots(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.root_file
            .as_ref()
            .map(|file| {
                std::fs::read(file).with_context(|| format!("--control-plane-root {}", file.display()))
            })
            .transpose()
    }

    fn endpoint_with(&self, roots: Option<Vec<u8>>) -> anyhow::Result<Endpoint> {
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .with_context(|| format!("--control-plane `{}` is not a URI", self.url))?
            .connect_timeout(Duration::from_secs(2));
        if let Some(pem) = roots {
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(name) = &self.server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(tls).with_context(|| format!("TLS to {}", self.url))?;
        }
        Ok(endpoint)
    }
}

/// A lazily connecting channel for occasional calls (CSRs), rebuilt when the root file
/// changes: during a root rotation the control plane's certificate moves to the new root, and
/// a channel built on the old roots alone would never reconnect.
pub struct LazyChannel {
    control_plane: ControlPlane,
    request_timeout: Duration,
    current: Mutex<(Option<Vec<u8>>, Channel)>,
}

impl LazyChannel {
    pub fn new(control_plane: ControlPlane, request_timeout: Duration) -> anyhow::Result<LazyChannel> {
        let roots = control_plane.roots()?;
        let channel = control_plane.endpoint_with(roots.clone())?.timeout(request_timeout).connect_lazy();
        Ok(LazyChannel { control_plane, request_timeout, current: Mutex::new((roots, channel)) })
    }

    /// The channel for the roots the file holds now.
    pub fn get(&self) -> anyhow::Result<Channel> {
        let roots = self.control_plane.roots()?;
        let mut current = self.current.lock().expect("channel lock");
        if current.0 != roots {
            tracing::info!(
                control_plane = self.control_plane.url,
                "control plane roots changed: reconnecting"
            );
            let channel =
                self.control_plane.endpoint_with(roots.clone())?.timeout(self.request_timeout).connect_lazy();
            *current = (roots, channel);
        }
        Ok(current.1.clone())
    }
}
