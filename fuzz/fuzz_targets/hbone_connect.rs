//! The head of a CONNECT request another node sends to the HBONE tunnel: method, target
//! authority, `Forwarded`, `baggage` and service headers, as `ConnectRequest::parse` reads
//! them and as the server turns baggage and service into metric labels.
//! Input: fields separated by 0xff — method, URI, then header name/value pairs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_node::tunnel::{caller_from_baggage, server::ConnectRequest, service_from_header};

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
        Ok(asks) => {
            assert_eq!(request.method(), hyper::Method::CONNECT, "{asks:?}");
            // Whatever a peer says, labels stay names: nothing that could break a series.
            let caller = caller_from_baggage(asks.baggage.as_deref(), "ns", "spiffe://td/ns/ns/sa/sa".into());
            let service = service_from_header(asks.service.as_deref());
            for label in [&caller.workload, &caller.app, &caller.version, &service.destination_service] {
                assert!(!label.contains(['"', ',', '=', '\\', '\n']), "{label:?}");
            }
        }
        Err((status, reason)) => assert!(status.is_client_error() && !reason.is_empty()),
    }
});
