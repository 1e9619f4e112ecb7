//! The head of a CONNECT request another node sends to the HBONE tunnel: method, target
//! authority, `Forwarded` and `baggage` headers, as `ConnectRequest::parse` reads them.
//! Input: fields separated by 0xff — method, URI, then header name/value pairs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::tunnel::server::ConnectRequest;

fuzz_target!(|data: &[u8]| {
    let mut fields = data.split(|b| *b == 0xff);
    let method = fields.next().unwrap_or_default();
    let uri = fields.next().unwrap_or_default();
    let mut request = hyper::Request::builder().method(method).uri(uri);
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        request = request.header(name, value);
    }
    // A head the HTTP layer would refuse never reaches the tunnel server.
    let Ok(request) = request.body(()) else { return };
    match ConnectRequest::parse(&request) {
        Ok(asks) => assert_eq!(request.method(), hyper::Method::CONNECT, "{asks:?}"),
        Err((status, reason)) => assert!(status.is_client_error() && !reason.is_empty()),
    }
});
