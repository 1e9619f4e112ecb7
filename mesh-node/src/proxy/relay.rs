//! Copies bytes both ways between the captured client and its upstream.
//!
//! Each direction is an independent copy loop, so a half-close travels through: EOF from one
//! side becomes a `shutdown(SHUT_WR)` on the other, and the opposite direction keeps flowing
//! (a client that sends a request and then shuts down its write side still gets the answer).
//! A direction only reads when its previous chunk was fully written, which is the backpressure.
//! An error in either direction (a reset, say) ends both and resets both sockets, so a broken
//! upstream reaches the client as a reset, never as a hang.

use std::{io, time::Duration};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::upstream::Upstream;

/// Each direction starts with a small buffer, so 50k+ mostly idle connections cost little,
/// and grows to the big one the first time a read fills it (bulk transfer).
const FIRST_CHUNK: usize = 2 * 1024;
const CHUNK: usize = 32 * 1024;

pub struct Totals {
    pub sent: u64,
    pub received: u64,
}

/// Relays until both directions have finished; on error resets both sides.
pub async fn relay(
    mut client: TcpStream,
    upstream: Upstream,
    sent: &Counter,
    received: &Counter,
) -> io::Result<Totals> {
    match upstream {
        Upstream::Tcp(mut upstream) => {
            let result = {
                let (mut client_read, mut client_write) = client.split();
                let (mut upstream_read, mut upstream_write) = upstream.split();
                tokio::try_join!(
                    copy_half(&mut client_read, &mut upstream_write, sent),
                    copy_half(&mut upstream_read, &mut client_write, received),
                )
            };
            if result.is_err() {
                reset(&upstream);
            }
            finish(&client, result)
        }
        // Dropping a tunnel stream that did not finish resets it (RST_STREAM).
        Upstream::Tunnel(stream) => relay_stream(client, stream, sent, received).await,
        Upstream::Judged(stream) => relay_stream(client, stream, sent, received).await,
        Upstream::Guarded(stream) => relay_stream(client, stream, sent, received).await,
    }
}

/// Relays between a TCP connection and any other byte stream (a tunnel stream: split with
/// a lock, which plain TCP pairs avoid).
pub async fn relay_stream<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: TcpStream,
    other: S,
    sent: &Counter,
    received: &Counter,
) -> io::Result<Totals> {
    let (mut other_read, mut other_write) = tokio::io::split(other);
    let result = {
        let (mut client_read, mut client_write) = client.split();
        tokio::try_join!(
            copy_half(&mut client_read, &mut other_write, sent),
            copy_half(&mut other_read, &mut client_write, received),
        )
    };
    finish(&client, result)
}

fn finish(client: &TcpStream, result: io::Result<(u64, u64)>) -> io::Result<Totals> {
    match result {
        Ok((sent, received)) => Ok(Totals { sent, received }),
        Err(e) => {
            reset(client);
            Err(e)
        }
    }
}

async fn copy_half<R, W>(reader: &mut R, writer: &mut W, counter: &Counter) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; FIRST_CHUNK];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            // Peer finished sending: pass the FIN on. The other direction may go on. A failed
            // shutdown means that side is already gone, which its own read will report.
            let _ = writer.shutdown().await;
            return Ok(total);
        }
        writer.write_all(&buf[..n]).await?;
        total += n as u64;
        counter.inc_by(n as u64);
        if n == buf.len() && buf.len() < CHUNK {
            buf = vec![0u8; CHUNK];
        }
    }
}

/// Closes with RST instead of FIN: the peer learns the connection failed, not that it ended.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
