//! A real TLS ClientHello (rustls's, with the server name asked for), so the node proxy's TLS
//! detection and tls routes see exactly what a TLS client sends. The handshake is never
//! finished: the test servers only note that one arrived.

use std::{
    io::{self, Read},
    sync::Arc,
};

use rustls::{ClientConfig, ClientConnection, RootCertStore, pki_types::ServerName};

/// The first flight of a TLS client connecting to `sni`.
pub(crate) fn client_hello(sni: &str) -> io::Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from(sni.to_string()).map_err(io::Error::other)?;
    let mut conn = ClientConnection::new(Arc::new(config), name).map_err(io::Error::other)?;
    let mut out = Vec::new();
    conn.write_tls(&mut out)?;
    Ok(out)
}

/// TLS record content type of a handshake (a ClientHello's record starts with it).
pub(crate) const HANDSHAKE: u8 = 0x16;

/// Reads and drops one TLS record whose first byte was already read.
pub(crate) fn skip_record(r: &mut impl Read) -> io::Result<()> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header)?;
    let len = u16::from_be_bytes([header[2], header[3]]) as usize;
    io::copy(&mut r.take(len as u64), &mut io::sink())?;
    Ok(())
}
