//! Envoy's access-log command operators (`%RESPONSE_CODE%`, `%REQ(USER-AGENT)%`, …): a
//! format string is split once into literal text and operators, then rendered per record as a
//! text line or, for JSON, one value per label.

use std::fmt::Write;

use super::Record;

/// Istio's default text format (`meshConfig.accessLogFormat` unset).
pub const ISTIO_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
     %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \
     \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \
     %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \
     \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% \
     %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% \
     %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's default JSON labels (`accessLogEncoding: JSON`).
pub const ISTIO_JSON: &[(&str, &str)] = &[
    ("authority", "%REQ(:AUTHORITY)%"),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("connection_termination_details", "%CONNECTION_TERMINATION_DETAILS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("duration", "%DURATION%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("route_name", "%ROUTE_NAME%"),
    ("start_time", "%START_TIME%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("upstream_service_time", "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%"),
    ("upstream_transport_failure_reason", "%UPSTREAM_TRANSPORT_FAILURE_REASON%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
];

const OPERATORS: &str = "START_TIME, REQ(h), RESP(h), PROTOCOL, RESPONSE_CODE, RESPONSE_FLAGS, \
     RESPONSE_CODE_DETAILS, CONNECTION_TERMINATION_DETAILS, UPSTREAM_TRANSPORT_FAILURE_REASON, \
     BYTES_RECEIVED, BYTES_SENT, DURATION, GRPC_STATUS_NUMBER, UPSTREAM_HOST, UPSTREAM_CLUSTER, \
     UPSTREAM_CLUSTER_RAW, UPSTREAM_LOCAL_ADDRESS, DOWNSTREAM_LOCAL_ADDRESS, \
     DOWNSTREAM_REMOTE_ADDRESS, DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT, DOWNSTREAM_PEER_URI_SAN, \
     UPSTREAM_PEER_URI_SAN, REQUESTED_SERVER_NAME, ROUTE_NAME, HOSTNAME";

/// One command operator.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Operator {
    StartTime,
    /// `REQ(main?alternative)`; names lowercased, `:method`-style pseudo-headers included.
    Request(String, Option<String>),
    Response(String),
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    Duration,
    GrpcStatusNumber,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamPeerUriSan,
    UpstreamPeerUriSan,
    RequestedServerName,
    RouteName,
    Hostname,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// An operator and its `:N` length limit.
    Operator(Operator, Option<usize>),
}

/// A parsed format string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// What an operator yields: Envoy prints a missing value as `-` (and JSON as null).
enum Rendered<'r> {
    Missing,
    Number(u64),
    Text(std::borrow::Cow<'r, str>),
}

impl Template {
    /// Splits `format`; the error names the operator that is unknown or malformed.
    pub fn parse(format: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = format;
        while let Some(at) = rest.find('%') {
            text.push_str(&rest[..at]);
            rest = &rest[at + 1..];
            if let Some(after) = rest.strip_prefix('%') {
                text.push('%');
                rest = after;
                continue;
            }
            let end =
                rest.find('%').ok_or_else(|| format!("`%{rest}`: an operator without its closing `%`"))?;
            let (operator, limit) = parse_operator(&rest[..end])?;
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Operator(operator, limit));
            rest = &rest[end + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Template { pieces })
    }

    /// Appends the text rendering of `record` to `out`.
    pub fn render(&self, record: &Record, out: &mut String) {
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Operator(op, limit) => match value(op, record) {
                    Rendered::Missing => out.push('-'),
                    Rendered::Number(n) => {
                        let _ = write!(out, "{n}");
                    }
                    Rendered::Text(t) => out.push_str(truncated(&t, *limit)),
                },
            }
        }
    }

    /// The JSON value of one label: a lone operator keeps its type (a number, or null when
    /// missing), as Envoy's JSON formatter does; anything else is a string.
    pub fn json(&self, record: &Record) -> serde_json::Value {
        if let [Piece::Operator(op, limit)] = self.pieces.as_slice() {
            return match value(op, record) {
                Rendered::Missing => serde_json::Value::Null,
                Rendered::Number(n) => n.into(),
                Rendered::Text(t) => truncated(&t, *limit).into(),
            };
        }
        let mut out = String::new();
        self.render(record, &mut out);
        out.into()
    }

    /// The request and response headers this template prints, for capturing them.
    pub fn headers(&self) -> (Vec<String>, Vec<String>) {
        let (mut request, mut response) = (Vec::new(), Vec::new());
        for piece in &self.pieces {
            match piece {
                Piece::Operator(Operator::Request(a, b), _) => request.extend(
                    [Some(a), b.as_ref()].into_iter().flatten().filter(|h| !h.starts_with(':')).cloned(),
                ),
                Piece::Operator(Operator::Response(h), _) => response.push(h.clone()),
                _ => {}
            }
        }
        (request, response)
    }
}

fn truncated(text: &str, limit: Option<usize>) -> &str {
    match limit {
        Some(n) if text.len() > n => {
            let mut end = n;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            &text[..end]
        }
        _ => text,
    }
}

fn parse_operator(spec: &str) -> Result<(Operator, Option<usize>), String> {
    // `REQ(X):10` — an argument in parentheses, then an optional length limit.
    let (head, limit) = match spec.rsplit_once("):") {
        Some((head, n)) => {
            let n = n.parse().map_err(|_| format!("%{spec}%: the length after `:` is not a number"))?;
            (&spec[..head.len() + 1], Some(n))
        }
        None => (spec, None),
    };
    let (name, arg) = match head.split_once('(') {
        Some((name, rest)) => {
            let arg = rest.strip_suffix(')').ok_or_else(|| format!("%{spec}%: `(` without `)`"))?;
            (name, Some(arg))
        }
        None => (head, None),
    };
    let plain = |op: Operator| match arg {
        None => Ok(op),
        Some(_) => Err(format!("%{spec}%: {name} takes no argument")),
    };
    let operator = match name {
        "START_TIME" => plain(Operator::StartTime)?,
        "REQ" => {
            let arg =
                arg.filter(|a| !a.is_empty()).ok_or_else(|| format!("%{spec}%: REQ needs a header name"))?;
            let (main, alternative) = match arg.split_once('?') {
                Some((a, b)) => (a, Some(b.to_ascii_lowercase())),
                None => (arg, None),
            };
            Operator::Request(main.to_ascii_lowercase(), alternative)
        }
        "RESP" => {
            let arg =
                arg.filter(|a| !a.is_empty()).ok_or_else(|| format!("%{spec}%: RESP needs a header name"))?;
            Operator::Response(arg.to_ascii_lowercase())
        }
        "PROTOCOL" => plain(Operator::Protocol)?,
        "RESPONSE_CODE" => plain(Operator::ResponseCode)?,
        "RESPONSE_FLAGS" => plain(Operator::ResponseFlags)?,
        "RESPONSE_CODE_DETAILS" => plain(Operator::ResponseCodeDetails)?,
        "CONNECTION_TERMINATION_DETAILS" => plain(Operator::ConnectionTerminationDetails)?,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => plain(Operator::UpstreamTransportFailureReason)?,
        "BYTES_RECEIVED" => plain(Operator::BytesReceived)?,
        "BYTES_SENT" => plain(Operator::BytesSent)?,
        "DURATION" => plain(Operator::Duration)?,
        "GRPC_STATUS_NUMBER" => plain(Operator::GrpcStatusNumber)?,
        "UPSTREAM_HOST" => plain(Operator::UpstreamHost)?,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => plain(Operator::UpstreamCluster)?,
        "UPSTREAM_LOCAL_ADDRESS" => plain(Operator::UpstreamLocalAddress)?,
        "DOWNSTREAM_LOCAL_ADDRESS" => plain(Operator::DownstreamLocalAddress)?,
        "DOWNSTREAM_REMOTE_ADDRESS" => plain(Operator::DownstreamRemoteAddress)?,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => plain(Operator::DownstreamRemoteAddressWithoutPort)?,
        "DOWNSTREAM_PEER_URI_SAN" => plain(Operator::DownstreamPeerUriSan)?,
        "UPSTREAM_PEER_URI_SAN" => plain(Operator::UpstreamPeerUriSan)?,
        "REQUESTED_SERVER_NAME" => plain(Operator::RequestedServerName)?,
        "ROUTE_NAME" => plain(Operator::RouteName)?,
        "HOSTNAME" => plain(Operator::Hostname)?,
        other => {
            return Err(format!("%{other}% is not an operator Nodemesh supports; supported: {OPERATORS}"));
        }
    };
    Ok((operator, limit))
}

fn value<'r>(op: &Operator, record: &'r Record) -> Rendered<'r> {
    use std::borrow::Cow::{Borrowed, Owned};
    let text = |s: Option<&'r str>| {
        s.filter(|s| !s.is_empty()).map_or(Rendered::Missing, |s| Rendered::Text(Borrowed(s)))
    };
    let shown = |s: Option<String>| s.map_or(Rendered::Missing, |s| Rendered::Text(Owned(s)));
    let request = record.request.as_ref();
    match op {
        Operator::StartTime => shown(Some(super::start_time(record.start_time))),
        Operator::Request(main, alternative) => {
            let header = |name: &str| match name {
                ":method" => request.map(|r| r.method.as_str()),
                ":path" => request.map(|r| r.path.as_str()),
                ":authority" | "host" => request.map(|r| r.authority.as_str()),
                ":scheme" => request.map(|_| "http"),
                other => record.request_header(other),
            };
            text(header(main).or_else(|| alternative.as_deref().and_then(header)))
        }
        Operator::Response(name) => text(record.response_header(name)),
        Operator::Protocol => text(request.map(|r| r.protocol)),
        // A TCP connection's code is 0, as Envoy's.
        Operator::ResponseCode => Rendered::Number(u64::from(record.response_code)),
        Operator::ResponseFlags => text(Some(record.response_flags)),
        Operator::ResponseCodeDetails => text(Some(&record.response_code_details)),
        Operator::ConnectionTerminationDetails => text(Some(&record.connection_termination_details)),
        Operator::UpstreamTransportFailureReason => text(Some(&record.upstream_transport_failure_reason)),
        Operator::BytesReceived => Rendered::Number(record.bytes_received),
        Operator::BytesSent => Rendered::Number(record.bytes_sent),
        Operator::Duration => {
            Rendered::Number(u64::try_from(record.duration.as_millis()).unwrap_or(u64::MAX))
        }
        Operator::GrpcStatusNumber => {
            record.grpc_status.map_or(Rendered::Missing, |s| Rendered::Number(u64::from(s)))
        }
        Operator::UpstreamHost => shown(record.upstream_host.map(|a| a.to_string())),
        Operator::UpstreamCluster => text(Some(&record.upstream_cluster)),
        Operator::UpstreamLocalAddress => shown(record.upstream_local.map(|a| a.to_string())),
        Operator::DownstreamLocalAddress => shown(record.downstream_local.map(|a| a.to_string())),
        Operator::DownstreamRemoteAddress => shown(record.downstream_remote.map(|a| a.to_string())),
        Operator::DownstreamRemoteAddressWithoutPort => {
            shown(record.downstream_remote.map(|a| a.ip().to_string()))
        }
        Operator::DownstreamPeerUriSan => text(Some(&record.source_principal)),
        Operator::UpstreamPeerUriSan => text(Some(&record.destination_principal)),
        Operator::RequestedServerName => text(Some(&record.requested_server_name)),
        Operator::RouteName => text(Some(&record.route_name)),
        Operator::Hostname => text(Some(super::hostname())),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::access_log::RequestFacts;

    fn record() -> Record {
        Record {
            start_time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_606_339_578_409),
            duration: Duration::from_millis(4),
            response_code: 418,
            response_code_details: "via_upstream".into(),
            bytes_sent: 135,
            upstream_host: Some("10.44.1.27:80".parse().unwrap()),
            upstream_cluster: "outbound|8000||httpbin.foo.svc.cluster.local".into(),
            downstream_local: Some("10.0.45.184:8000".parse().unwrap()),
            downstream_remote: Some("10.44.1.23:46520".parse().unwrap()),
            route_name: "default".into(),
            request: Some(RequestFacts {
                method: "GET".into(),
                path: "/status/418".into(),
                protocol: "HTTP/1.1",
                authority: "httpbin:8000".into(),
                headers: vec![
                    ("user-agent".into(), "curl/7.73.0-DEV".into()),
                    ("x-request-id".into(), "84961386-6d84-929d-98bd-c5aee93b5c88".into()),
                ],
            }),
            ..Record::default()
        }
    }

    #[test]
    fn istio_default_text_line() {
        let mut line = String::new();
        Template::parse(ISTIO_TEXT).unwrap().render(&record(), &mut line);
        assert_eq!(
            line,
            "[2020-11-25T21:26:18.409Z] \"GET /status/418 HTTP/1.1\" 418 - via_upstream - \"-\" 0 135 4 - \"-\" \
             \"curl/7.73.0-DEV\" \"84961386-6d84-929d-98bd-c5aee93b5c88\" \"httpbin:8000\" \"10.44.1.27:80\" \
             outbound|8000||httpbin.foo.svc.cluster.local - 10.0.45.184:8000 10.44.1.23:46520 - default\n"
        );
    }

    #[test]
    fn tcp_records_print_dashes_and_zero() {
        let tcp = Record { request: None, response_code: 0, ..record() };
        let mut line = String::new();
        Template::parse("\"%REQ(:METHOD)% %PROTOCOL%\" %RESPONSE_CODE%").unwrap().render(&tcp, &mut line);
        assert_eq!(line, "\"- -\" 0");
    }

    #[test]
    fn json_keeps_types() {
        let r = record();
        assert_eq!(Template::parse("%RESPONSE_CODE%").unwrap().json(&r), serde_json::json!(418));
        assert_eq!(Template::parse("%RESPONSE_FLAGS%").unwrap().json(&r), serde_json::json!("-"));
        assert_eq!(Template::parse("%UPSTREAM_LOCAL_ADDRESS%").unwrap().json(&r), serde_json::Value::Null);
        assert_eq!(Template::parse("code=%RESPONSE_CODE%").unwrap().json(&r), serde_json::json!("code=418"));
        assert_eq!(Template::parse("%REQ(USER-AGENT):4%").unwrap().json(&r), serde_json::json!("curl"));
    }

    #[test]
    fn errors_and_captured_headers() {
        assert!(Template::parse("%DYNAMIC_METADATA(istio)%").unwrap_err().contains("not an operator"));
        assert!(Template::parse("%RESPONSE_CODE").unwrap_err().contains("closing `%`"));
        assert!(Template::parse("%PROTOCOL(x)%").unwrap_err().contains("takes no argument"));
        assert_eq!(Template::parse("100%% %REQ(:PATH)%").unwrap().pieces.len(), 2);
        let (req, resp) = Template::parse(ISTIO_TEXT).unwrap().headers();
        assert_eq!(req, ["x-envoy-original-path", "x-forwarded-for", "user-agent", "x-request-id"]);
        assert_eq!(resp, ["x-envoy-upstream-service-time"]);
    }
}
