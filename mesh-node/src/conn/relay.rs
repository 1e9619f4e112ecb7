//! Copies bytes both ways between the captured client and its upstream.
//!
//! Each direction is an independent copy loop, so a half-close travels through: EOF from one
//! side becomes a `shutdown(SHUT_WR)` on the other, and the opposite direction keeps flowing
//! (a client that sends a request and then shuts down its write side still gets the answer).
//! A direction only reads when its previous chunk was fully written, which is the backpressure.
//! An error in either direction (a reset, say) ends both and resets both sockets, so a broken
//! upstream reaches the client as a reset, never as a hang. With an idle timeout (DestinationRule
//! `connectionPool.tcp.idleTimeout`), a connection that moves no byte either way for that long
//! is closed on both sides (FIN: nothing failed).

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Each direction starts with a small buffer, so 50k+ mostly idle connections cost little,
/// and grows to the big one the first time a read fills it (bulk transfer).
const FIRST_CHUNK: usize = 2 * 1024;
const CHUNK: usize = 32 * 1024;

/// The bytes a relay moved: `sent` from the client to the other side, `received` back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub sent: u64,
    pub received: u64,
}

/// How a relay ended: what it moved (also when it failed part-way, or closed for idleness)
/// and whether it failed.
pub struct Relayed {
    pub totals: Totals,
    pub result: io::Result<()>,
}

/// Relays between two TCP connections until both directions have finished (or, with `idle`,
/// until neither has moved a byte for that long); on error resets both sides.
pub async fn relay_tcp(
    mut client: TcpStream,
    mut upstream: TcpStream,
    sent: &Counter,
    received: &Counter,
    idle: Option<Duration>,
) -> Relayed {
    let activity = Activity::new(idle);
    let result = {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        activity
            .watch(async {
                tokio::try_join!(
                    copy_half(&mut client_read, &mut upstream_write, sent, &activity, &activity.sent),
                    copy_half(&mut upstream_read, &mut client_write, received, &activity, &activity.received),
                )
            })
            .await
    };
    if result.is_err() {
        reset(&upstream);
    }
    finish(&client, &activity, result)
}

/// Relays between a TCP connection and any other byte stream (a tunnel stream: split with
/// a lock, which plain TCP pairs avoid).
pub async fn relay_stream<S: AsyncRead + AsyncWrite + Unpin>(
    client: TcpStream,
    other: S,
    sent: &Counter,
    received: &Counter,
) -> Relayed {
    relay_stream_idle(client, other, sent, received, None).await
}

/// [`relay_stream`], closing both sides when neither has moved a byte for `idle`.
pub async fn relay_stream_idle<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: TcpStream,
    other: S,
    sent: &Counter,
    received: &Counter,
    idle: Option<Duration>,
) -> Relayed {
    let activity = Activity::new(idle);
    let (mut other_read, mut other_write) = tokio::io::split(other);
    let result = {
        let (mut client_read, mut client_write) = client.split();
        activity
            .watch(async {
                tokio::try_join!(
                    copy_half(&mut client_read, &mut other_write, sent, &activity, &activity.sent),
                    copy_half(&mut other_read, &mut client_write, received, &activity, &activity.received),
                )
            })
            .await
    };
    finish(&client, &activity, result)
}

fn finish(client: &TcpStream, activity: &Activity, result: io::Result<()>) -> Relayed {
    if result.is_err() {
        reset(client);
    }
    let totals = Totals {
        sent: activity.sent.load(Ordering::Relaxed),
        received: activity.received.load(Ordering::Relaxed),
    };
    Relayed { totals, result }
}

/// What a relay moved each way, and when it last moved a byte, for its idle timeout (`None`:
/// no timeout, no time kept).
struct Activity {
    idle: Option<Duration>,
    start: Instant,
    /// Milliseconds after `start` of the last read that moved bytes.
    last_ms: AtomicU64,
    /// Bytes written each way so far (kept here, not returned by the copies, so that a relay
    /// that fails or idles out still knows them).
    sent: AtomicU64,
    received: AtomicU64,
}

impl Activity {
    fn new(idle: Option<Duration>) -> Activity {
        Activity {
            idle,
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        if self.idle.is_some() {
            self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// Runs `copying` to its end, or ends it once nothing moved for the idle timeout: then
    /// both sides close normally (the caller drops them), as Envoy's TCP proxy does.
    async fn watch(
        &self,
        copying: impl std::future::Future<Output = io::Result<((), ())>>,
    ) -> io::Result<()> {
        let Some(idle) = self.idle else { return copying.await.map(|_| ()) };
        let watchdog = async {
            loop {
                let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
                let deadline = last + idle;
                if Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep_until(deadline.into()).await;
            }
        };
        tokio::select! {
            result = copying => result.map(|_| ()),
            () = watchdog => {
                tracing::debug!("relay closed after {idle:?} without a byte either way (idleTimeout)");
                Ok(())
            }
        }
    }
}

async fn copy_half<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &Counter,
    activity: &Activity,
    moved: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; FIRST_CHUNK];
    loop {
        let n = reader.read(&mut buf).await?;
        activity.moved();
        if n == 0 {
            // Peer finished sending: pass the FIN on. The other direction may go on. A failed
            // shutdown means that side is already gone, which its own read will report.
            let _ = writer.shutdown().await;
            return Ok(());
        }
        writer.write_all(&buf[..n]).await?;
        counter.inc_by(n as u64);
        moved.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.len() && buf.len() < CHUNK {
            buf = vec![0u8; CHUNK];
        }
    }
}

/// Closes with RST instead of FIN: the peer learns the connection failed, not that it ended.
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair of loopback TCP sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialled = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (dialled, listener.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn a_relay_that_fails_or_idles_out_still_knows_its_bytes() {
        let (sent, received) = (Counter::default(), Counter::default());
        // Reset by the upstream after 5 bytes.
        let ((mut client, proxy_side), (proxy_upstream, mut server)) = (pair().await, pair().await);
        let relay = tokio::spawn(async move {
            let (sent, received) = (Counter::default(), Counter::default());
            relay_tcp(proxy_side, proxy_upstream, &sent, &received, None).await
        });
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        reset(&server);
        drop(server);
        let relayed = relay.await.unwrap();
        assert!(relayed.result.is_err(), "the upstream's reset ends the relay with an error");
        assert_eq!(relayed.totals, Totals { sent: 5, received: 0 });

        // Closed for idleness after 3 bytes each way.
        let ((mut client, proxy_side), (proxy_upstream, mut server)) = (pair().await, pair().await);
        let idle = Some(Duration::from_millis(100));
        let relay = relay_tcp(proxy_side, proxy_upstream, &sent, &received, idle);
        let talk = async {
            client.write_all(b"abc").await.unwrap();
            let mut buf = [0u8; 3];
            server.read_exact(&mut buf).await.unwrap();
            server.write_all(b"xyz").await.unwrap();
            client.read_exact(&mut buf).await.unwrap();
        };
        let (relayed, ()) = tokio::join!(relay, talk);
        assert!(relayed.result.is_ok(), "an idle close is no failure");
        assert_eq!(relayed.totals, Totals { sent: 3, received: 3 });
    }
}
