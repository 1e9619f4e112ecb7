//! An HTTP/1 request head as mesh-node's proxy meets it: parsed by hyper, then the upgrade
//! check mesh-node applies to every request (`Connection: upgrade` + `Upgrade`).
#![no_main]

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use mesh_node::conn::upgrade::upgrade_protocol;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let service = service_fn(|request: Request<Incoming>| async move {
            let upgrade = upgrade_protocol(request.headers());
            let body = upgrade.map(|u| Bytes::copy_from_slice(u.as_bytes())).unwrap_or_default();
            Ok::<_, Infallible>(Response::new(Full::new(body)))
        });
        let serving = tokio::spawn(
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), service),
        );
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        drop(client);
        let _ = serving.await;
    });
});
