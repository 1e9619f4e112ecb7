//! Protocol detection per connection, from the first bytes the client sends (read with
//! MSG_PEEK, so they stay queued for whoever handles the connection next).
//!
//! Never from a port number or name (a mis-named port must not break its traffic): an undeclared port carrying HTTP is proxied
//! as HTTP, and anything not recognised is relayed as opaque TCP to where it was dialled. A
//! client that sends nothing within the sniff timeout is taken to speak a server-first protocol
//! (MySQL, SMTP, …) and is relayed as TCP.

use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    net::TcpStream,
};

/// What a connection speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (cleartext; gRPC uses it).
    H2c,
    /// A TLS ClientHello: relayed as is; the server name is known when the client sent one.
    Tls { sni: Option<String> },
    /// Anything else, or nothing within the sniff timeout.
    Opaque,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An HTTP/1 request line longer than this is not something we will proxy as HTTP.
const MAX_REQUEST_LINE: usize = 8192;
/// A ClientHello record is at most 16 KiB plus its 5-byte header.
const MAX_TLS_RECORD: usize = 5 + (1 << 14);

/// The classification of a byte prefix.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Is(Protocol),
    /// Consistent with some protocol so far; more bytes decide.
    NeedMore,
}

fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    if H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
        return if buf.len() >= H2_PREFACE.len() { Verdict::Is(Protocol::H2c) } else { Verdict::NeedMore };
    }
    if buf[0] == 0x16 {
        return classify_tls(buf);
    }
    classify_http1(buf)
}

/// `METHOD SP request-target SP HTTP/1.x CRLF`, judged on the first line only.
fn classify_http1(buf: &[u8]) -> Verdict {
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = &buf[..line_end.unwrap_or(buf.len())];
    let method_len = line.iter().take_while(|b| b.is_ascii_uppercase() || **b == b'-').count();
    if method_len == 0 || method_len > 20 {
        return Verdict::Is(Protocol::Opaque);
    }
    if method_len == line.len() {
        // Only the method so far.
        return if line_end.is_none() { Verdict::NeedMore } else { Verdict::Is(Protocol::Opaque) };
    }
    if line[method_len] != b' ' {
        return Verdict::Is(Protocol::Opaque);
    }
    let Some(end) = line_end else {
        if line.len() > MAX_REQUEST_LINE || line.iter().any(|b| b.is_ascii_control() && *b != b'\r') {
            return Verdict::Is(Protocol::Opaque);
        }
        return Verdict::NeedMore;
    };
    let line = line.strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let is_http1 = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
    Verdict::Is(if is_http1 { Protocol::Http1 } else { Protocol::Opaque })
}

/// A TLS handshake record holding a ClientHello; the SNI is read when the whole record is here.
fn classify_tls(buf: &[u8]) -> Verdict {
    // Record header: type 0x16, version 0x03 0x0X, length.
    if buf.len() < 6 {
        return if buf.len() < 2 || buf[1] == 0x03 {
            Verdict::NeedMore
        } else {
            Verdict::Is(Protocol::Opaque)
        };
    }
    if buf[1] != 0x03 || buf[5] != 0x01 {
        return Verdict::Is(Protocol::Opaque);
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    let total = 5 + record_len;
    if buf.len() < total && total <= MAX_TLS_RECORD {
        return Verdict::NeedMore;
    }
    let sni = buf.get(5..total).and_then(client_hello_sni);
    Verdict::Is(Protocol::Tls { sni })
}

/// The server_name extension of a ClientHello handshake message (RFC 8446 §4.1.2, RFC 6066 §3).
fn client_hello_sni(hs: &[u8]) -> Option<String> {
    let mut r = Reader(hs);
    r.skip(4)?; // handshake type + length
    r.skip(2 + 32)?; // legacy_version + random
    let session_id = r.u8()?;
    r.skip(usize::from(session_id))?;
    let suites = r.u16()?;
    r.skip(usize::from(suites))?;
    let compression = r.u8()?;
    r.skip(usize::from(compression))?;
    let mut extensions = Reader(r.block16()?);
    while let (Some(kind), Some(len)) = (extensions.u16(), extensions.u16()) {
        let body = extensions.take(usize::from(len))?;
        if kind == 0 {
            let mut list = Reader(body);
            let mut names = Reader(list.block16()?);
            while let Some(name_type) = names.u8() {
                let name = names.block16()?;
                if name_type == 0 {
                    // A host name is non-empty ASCII (RFC 6066 §3): anything else names nothing
                    // a tls route could match (found by the sniff fuzz target).
                    let name = std::str::from_utf8(name).ok().filter(|n| !n.is_empty() && n.is_ascii())?;
                    return Some(name.to_string());
                }
            }
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A block prefixed by its 16-bit length.
    fn block16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }
}

/// Peeks at the client's first bytes until they decide the protocol, `timeout` passes (a
/// server-first protocol, or a client that is slow to speak: opaque), or the client closes.
/// Like [`detect`] for a stream that cannot be peeked (a tunnel stream): reads until the
/// protocol is known, the timeout passes or the stream ends, and returns what it read too (to
/// be replayed with [`Prefixed`]).
pub async fn read_prefix<S: AsyncRead + Unpin>(stream: &mut S, timeout: Duration) -> (Protocol, Vec<u8>) {
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return (Protocol::Opaque, buf),
        }
        if let Verdict::Is(p) = classify(&buf) {
            return (p, buf);
        }
        if buf.len() >= MAX_TLS_RECORD {
            return (Protocol::Opaque, buf);
        }
    }
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed { prefix, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.at);
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

pub async fn detect(client: &TcpStream, timeout: Duration) -> Protocol {
    let mut buf = vec![0u8; 1024];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, client.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Protocol::Opaque,
        };
        if let Verdict::Is(p) = classify(&buf[..n]) {
            return p;
        }
        if n == buf.len() {
            if buf.len() >= MAX_TLS_RECORD {
                return Protocol::Opaque;
            }
            buf.resize((buf.len() * 4).min(MAX_TLS_RECORD), 0);
            continue;
        }
        if n == seen {
            // peek returns at once while anything is queued: wait for more to arrive.
            if tokio::time::Instant::now() >= deadline {
                return Protocol::Opaque;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is(buf: &[u8]) -> Protocol {
        match classify(buf) {
            Verdict::Is(p) => p,
            Verdict::NeedMore => panic!("undecided on {buf:?}"),
        }
    }

    #[test]
    fn http1_requests_of_both_versions_and_any_method() {
        assert_eq!(is(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Protocol::Http1);
        assert_eq!(is(b"GET /index.html HTTP/1.0\r\n\r\n"), Protocol::Http1);
        assert_eq!(is(b"PROPFIND /x HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(is(b"M-SEARCH * HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        assert_eq!(classify(b"GET /very/long/pa"), Verdict::NeedMore);
    }

    #[test]
    fn other_text_protocols_are_opaque() {
        assert_eq!(is(b"HELLO\n"), Protocol::Opaque);
        assert_eq!(is(b"SINK 1024\n"), Protocol::Opaque);
        assert_eq!(is(b"get / HTTP/1.1\r\n"), Protocol::Opaque, "methods are case-sensitive");
        assert_eq!(is(b"GET / HTTP/2.0\r\n"), Protocol::Opaque);
        assert_eq!(is(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), Protocol::Opaque, "postgres SSLRequest");
        assert_eq!(is(b"*1\r\n$4\r\nPING\r\n"), Protocol::Opaque, "redis");
    }

    #[test]
    fn h2_prior_knowledge_needs_the_whole_preface() {
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Verdict::NeedMore);
        assert_eq!(is(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"), Protocol::H2c);
    }

    /// A ClientHello with one extension, server_name = `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let n = name.as_bytes();
        let mut sni = vec![];
        sni.extend(((n.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend((n.len() as u16).to_be_bytes());
        sni.extend(n);
        let mut ext = vec![0, 0];
        ext.extend((sni.len() as u16).to_be_bytes());
        ext.extend(sni);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1, 0];
        hs.extend((body.len() as u16).to_be_bytes());
        hs.extend(body);
        let mut record = vec![0x16, 3, 1];
        record.extend((hs.len() as u16).to_be_bytes());
        record.extend(hs);
        record
    }

    #[test]
    fn tls_client_hello_with_its_server_name() {
        let hello = client_hello("payments.example.com");
        assert_eq!(is(&hello), Protocol::Tls { sni: Some("payments.example.com".into()) });
        assert_eq!(classify(&hello[..20]), Verdict::NeedMore);
        assert_eq!(is(&[0x16, 0x01, 0, 0, 0, 0]), Protocol::Opaque);
    }

    /// Regression (fuzz/artifacts of the sniff target): an empty or non-ASCII server name is
    /// no name at all, not `Some("")` for tls routes to match against.
    #[test]
    fn an_empty_or_non_ascii_server_name_is_none() {
        assert_eq!(is(&client_hello("")), Protocol::Tls { sni: None });
        assert_eq!(is(&client_hello("bücher.example")), Protocol::Tls { sni: None });
    }
}
