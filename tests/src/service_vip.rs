//! A Service's ClusterIP as kube-proxy makes it for clients, with `sessionAffinity: ClientIP`:
//! a virtual address whose connections each go to one live backend, the same one for every
//! connection of a client while it lives. Here it is a TCP relay in a network namespace of the
//! test's (kube-proxy would DNAT in the kernel): a new client gets the next backend in turn, a
//! known one its own; one that refuses is skipped, as a backend gone from the Endpoints would
//! no longer be picked. So with two backends, the first client's connections all go to the
//! first backend and the second client's to the second, until one goes away.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use crate::netns;

pub struct ServiceVip {
    pub addr: SocketAddr,
}

impl ServiceVip {
    /// Listens on `vip` inside `netns_name` and relays to `backends` (addresses reachable from
    /// that netns).
    pub fn start(netns_name: &str, vip: SocketAddr, backends: Vec<SocketAddr>) -> anyhow::Result<ServiceVip> {
        let listener = netns::run_in(netns_name, move || Ok(TcpListener::bind(vip)?))?;
        let name = netns_name.to_string();
        std::thread::spawn(move || {
            let mut affinity: HashMap<IpAddr, usize> = HashMap::new();
            for client in listener.incoming().flatten() {
                let Ok(peer) = client.peer_addr() else { continue };
                let turn = affinity.len();
                let first = *affinity.entry(peer.ip()).or_insert(turn % backends.len());
                let order: Vec<SocketAddr> =
                    (0..backends.len()).map(|i| backends[(first + i) % backends.len()]).collect();
                let name = name.clone();
                std::thread::spawn(move || {
                    for backend in order {
                        // The upstream socket must live in the netns the backends are in.
                        let connected = netns::run_in(&name, move || {
                            Ok(TcpStream::connect_timeout(&backend, Duration::from_secs(2))?)
                        });
                        if let Ok(upstream) = connected {
                            let _ = relay(client, upstream);
                            return;
                        }
                    }
                    let _ = client.shutdown(Shutdown::Both);
                });
            }
        });
        Ok(ServiceVip { addr: vip })
    }
}

/// Copies both ways until either side ends, then closes both (a backend that dies takes its
/// clients' connections with it, as through a real ClusterIP).
fn relay(client: TcpStream, upstream: TcpStream) -> io::Result<()> {
    let (mut c_read, mut u_write) = (client.try_clone()?, upstream.try_clone()?);
    let (mut u_read, mut c_write) = (upstream, client);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(Shutdown::Both);
        let _ = c_read.shutdown(Shutdown::Both);
    });
    let _ = io::copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Both);
    let _ = u_read.shutdown(Shutdown::Both);
    let _ = up.join();
    Ok(())
}
