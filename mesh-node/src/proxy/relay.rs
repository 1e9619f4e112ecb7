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

/// Big enough for bulk throughput, small enough for 50k+ concurrent connections.
const CHUNK: usize = 32 * 1024;

pub struct Totals {
    pub sent: u64,
    pub received: u64,
}

/// Relays until both directions have finished; on error resets both sockets.
pub async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    sent: &Counter,
    received: &Counter,
) -> io::Result<Totals> {
    let result = {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        tokio::try_join!(
            copy_half(&mut client_read, &mut upstream_write, sent),
            copy_half(&mut upstream_read, &mut client_write, received),
        )
    };
    match result {
        Ok((sent, received)) => Ok(Totals { sent, received }),
        Err(e) => {
            reset(&client);
            reset(&upstream);
            Err(e)
        }
    }
}

async fn copy_half<R, W>(reader: &mut R, writer: &mut W, counter: &Counter) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
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
    }
}

/// Closes with RST instead of FIN: the peer learns the connection failed, not that it ended.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
