//! Trace context in request headers: read from W3C `traceparent`/`tracestate` or B3 (the
//! `x-b3-*` headers, or the single `b3` header), written back in both, so that an application
//! speaking either joins the same trace (B3 in, W3C out and the reverse). Also Envoy's
//! `x-request-id`, set when a request arrives without one.

use hyper::{HeaderMap, header::HeaderValue};

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";
const B3: &str = "b3";
const B3_TRACE_ID: &str = "x-b3-traceid";
const B3_SPAN_ID: &str = "x-b3-spanid";
const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
const B3_SAMPLED: &str = "x-b3-sampled";
const B3_FLAGS: &str = "x-b3-flags";
pub const REQUEST_ID: &str = "x-request-id";

/// What a request says about its trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// Zero: none (the request starts a trace).
    pub trace_id: u128,
    /// The span that sent it (the parent of the span made for it), when one did.
    pub parent_span_id: Option<u64>,
    /// The sender's sampling decision, when it made one.
    pub sampled: Option<bool>,
    /// W3C `tracestate`, passed on unchanged.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context in `headers`: W3C first (its format is the stricter), then B3 single, then
    /// B3 multi. A malformed header counts as absent, as the specifications ask.
    pub fn extract(headers: &HeaderMap) -> TraceContext {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let tracestate = text(TRACESTATE).filter(|s| !s.is_empty()).map(str::to_string);
        if let Some(c) = text(TRACEPARENT).and_then(parse_traceparent) {
            return TraceContext { tracestate, ..c };
        }
        if let Some(c) = text(B3).and_then(parse_b3_single) {
            return c;
        }
        let sampled = match (text(B3_FLAGS), text(B3_SAMPLED)) {
            (Some("1"), _) => Some(true),
            (_, Some("1" | "true")) => Some(true),
            (_, Some("0" | "false")) => Some(false),
            _ => None,
        };
        let ids = text(B3_TRACE_ID).and_then(trace_id).zip(text(B3_SPAN_ID).and_then(span_id));
        match ids {
            Some((trace_id, span)) => {
                TraceContext { trace_id, parent_span_id: Some(span), sampled, tracestate: None }
            }
            // A decision alone (`x-b3-sampled: 0`, "do not trace") still holds.
            None => TraceContext { sampled, ..TraceContext::default() },
        }
    }

    /// Writes the context of span `span_id` of trace `trace_id` (the span the next hop is a
    /// child of) in W3C and B3 multi form, replacing what was there; a single `b3` header is
    /// rewritten in its own form.
    pub fn inject(&self, headers: &mut HeaderMap, trace_id: u128, span_id: u64, sampled: bool) {
        let flag = if sampled { "1" } else { "0" };
        let single_b3 = headers.contains_key(B3);
        headers.remove(B3_FLAGS);
        headers.remove(B3_PARENT_SPAN_ID);
        put(headers, TRACEPARENT, format!("00-{trace_id:032x}-{span_id:016x}-0{flag}"));
        if let Some(state) = &self.tracestate {
            put(headers, TRACESTATE, state.clone());
        }
        put(headers, B3_TRACE_ID, format!("{trace_id:032x}"));
        put(headers, B3_SPAN_ID, format!("{span_id:016x}"));
        put(headers, B3_SAMPLED, flag.to_string());
        if let Some(parent) = self.parent_span_id {
            put(headers, B3_PARENT_SPAN_ID, format!("{parent:016x}"));
        }
        if single_b3 {
            put(headers, B3, format!("{trace_id:032x}-{span_id:016x}-{flag}"));
        }
    }
}

/// Sets a header whose value we formatted (always valid; an invalid one is left out).
fn put(headers: &mut HeaderMap, name: &'static str, value: String) {
    // Takes the string's buffer over (from_str would copy it): this runs on every traced
    // request, sampled or not.
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(name, v);
    }
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`; a later version may append fields.
fn parse_traceparent(v: &str) -> Option<TraceContext> {
    let mut parts = v.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    u8::from_str_radix(version, 16).ok()?;
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceContext {
        trace_id: trace_id(trace)?,
        parent_span_id: Some(span_id(span)?),
        sampled: Some(flags & 1 == 1),
        tracestate: None,
    })
}

/// `b3: {trace}-{span}[-{sampled}[-{parent}]]`, or just the decision (`0`, `1`, `d`).
fn parse_b3_single(v: &str) -> Option<TraceContext> {
    let decision = |s: &str| match s {
        "1" | "d" => Some(Some(true)),
        "0" => Some(Some(false)),
        _ => None,
    };
    let parts: Vec<&str> = v.split('-').collect();
    match parts.as_slice() {
        [only] => Some(TraceContext { sampled: decision(only)?, ..TraceContext::default() }),
        [trace, span, rest @ ..] if rest.len() <= 2 => Some(TraceContext {
            trace_id: trace_id(trace)?,
            parent_span_id: Some(span_id(span)?),
            sampled: match rest.first() {
                Some(s) => decision(s)?,
                None => None,
            },
            tracestate: None,
        }),
        _ => None,
    }
}

/// A 64- or 128-bit hex trace id, not all zeros.
fn trace_id(hex: &str) -> Option<u128> {
    if !(hex.len() == 16 || hex.len() == 32) {
        return None;
    }
    u128::from_str_radix(hex, 16).ok().filter(|id| *id != 0)
}

fn span_id(hex: &str) -> Option<u64> {
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().filter(|id| *id != 0)
}

/// A new non-zero trace id.
pub fn new_trace_id() -> u128 {
    fastrand::u128(1..)
}

/// A new non-zero span id.
pub fn new_span_id() -> u64 {
    fastrand::u64(1..)
}

/// Sets a UUID v4 `x-request-id` if the request has none. On every request's path: a request
/// that has one costs a lookup, one without a single formatted string.
pub fn ensure_request_id(headers: &mut HeaderMap) {
    if headers.get(REQUEST_ID).is_some_and(|v| v.to_str().is_ok_and(|id| !id.is_empty())) {
        return;
    }
    let bits = (fastrand::u128(..) & !(0xf000 << 64) & !(0xc000 << 48)) | (0x4000 << 64) | (0x8000 << 48);
    let id = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        bits >> 96,
        (bits >> 80) & 0xffff,
        (bits >> 64) & 0xffff,
        (bits >> 48) & 0xffff,
        bits & 0xffff_ffff_ffff
    );
    put(headers, REQUEST_ID, id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn w3c_in_b3_out_and_the_reverse() {
        let w3c = headers(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let c = TraceContext::extract(&w3c);
        assert_eq!(c.trace_id, u128::from_str_radix(TRACE, 16).unwrap());
        assert_eq!(c.parent_span_id, Some(u64::from_str_radix(SPAN, 16).unwrap()));
        assert_eq!(c.sampled, Some(true));
        let mut out = HeaderMap::new();
        c.inject(&mut out, c.trace_id, 0x1234, true);
        assert_eq!(out["x-b3-traceid"], TRACE);
        assert_eq!(out["x-b3-spanid"], "0000000000001234");
        assert_eq!(out["x-b3-parentspanid"], SPAN);
        assert_eq!(out["x-b3-sampled"], "1");
        assert_eq!(out["traceparent"], format!("00-{TRACE}-0000000000001234-01"));
        assert_eq!(out["tracestate"], "congo=t61rcWkgMzE");

        let b3 = headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN), ("x-b3-sampled", "0")]);
        let c = TraceContext::extract(&b3);
        assert_eq!((c.trace_id.to_string().is_empty(), c.sampled), (false, Some(false)));
        let mut out = b3.clone();
        c.inject(&mut out, c.trace_id, 0x99, false);
        assert_eq!(out["traceparent"], format!("00-{TRACE}-0000000000000099-00"));
    }

    #[test]
    fn b3_single_64_bit_ids_and_bare_decisions() {
        let c = TraceContext::extract(&headers(&[("b3", &format!("a3ce929d0e0e4736-{SPAN}-1"))]));
        assert_eq!(c.trace_id, 0xa3ce929d0e0e4736);
        assert_eq!(c.sampled, Some(true));
        let c = TraceContext::extract(&headers(&[("b3", "0")]));
        assert_eq!((c.trace_id, c.sampled), (0, Some(false)));
        let mut out = headers(&[("b3", "0")]);
        c.inject(&mut out, 7, 9, false);
        assert_eq!(out["b3"], "00000000000000000000000000000007-0000000000000009-0");
    }

    #[test]
    fn malformed_context_is_ignored() {
        for bad in [
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{TRACE}-{SPAN}-zz"),
            "00-short-id-01".to_string(),
        ] {
            assert_eq!(TraceContext::extract(&headers(&[("traceparent", &bad)])).trace_id, 0, "{bad}");
        }
        // A future version may add fields.
        let c = TraceContext::extract(&headers(&[("traceparent", &format!("01-{TRACE}-{SPAN}-01-more"))]));
        assert_ne!(c.trace_id, 0);
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut h = headers(&[("x-request-id", "abc")]);
        ensure_request_id(&mut h);
        assert_eq!(h["x-request-id"], "abc");
        let mut h = HeaderMap::new();
        ensure_request_id(&mut h);
        let id = h["x-request-id"].to_str().unwrap().to_string();
        assert_eq!((id.len(), &id[14..15]), (36, "4"), "UUID v4: {id}");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }
}
