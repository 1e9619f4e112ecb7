//! Records every frame that crosses the interfaces of one network namespace (an AF_PACKET
//! socket opened inside it), so a test can check what a link between nodes carried.

use std::{
    io::Read,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns;

pub struct LinkCapture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl LinkCapture {
    /// Starts capturing in netns `name` (every interface, both directions).
    pub fn start(name: &str) -> anyhow::Result<LinkCapture> {
        let socket = netns::run_in(name, || {
            // ETH_P_ALL in network byte order: every protocol.
            let all = i32::from((libc::ETH_P_ALL as u16).to_be());
            let socket = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(all)))?;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            socket.set_recv_buffer_size(8 << 20)?;
            Ok(socket)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, frames) = (Arc::clone(&stop), Arc::clone(&frames));
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                let mut socket = socket;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.read(&mut buf) {
                        frames.lock().expect("capture lock").extend_from_slice(&buf[..n]);
                    }
                }
            })
        };
        Ok(LinkCapture { stop, frames, thread: Some(thread) })
    }

    /// Stops and returns every captured frame, concatenated.
    pub fn stop(mut self) -> Vec<u8> {
        // Frames still in flight when the caller decided to stop.
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.frames.lock().expect("capture lock"))
    }
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl Drop for LinkCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
