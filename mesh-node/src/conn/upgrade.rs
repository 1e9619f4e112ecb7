//! HTTP/1.1 upgrades (WebSocket and the like): which protocol a request asks for, and joining
//! both sides once they have switched.

use hyper::{
    HeaderMap, Response,
    body::Incoming,
    header::{self, HeaderValue},
};
use hyper_util::rt::TokioIo;

/// Once both sides of an upgrade (101) have switched, joins the client's connection to the
/// upstream one as a byte tunnel, in a task of its own.
pub fn splice_upgrade(client: hyper::upgrade::OnUpgrade, response: &mut Response<Incoming>) {
    let upstream = hyper::upgrade::on(response);
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream))
                    .await;
            }
            Err(e) => tracing::debug!("upgrade failed: {e}"),
        }
    });
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` and `Upgrade`).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}
