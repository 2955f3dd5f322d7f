//! A TCP proxy a test puts between the controller and something it depends on (PostgreSQL,
//! the Hetzner API), to cut the line the ways networks fail:
//!
//! - [`Mode::Forward`]: bytes flow both ways.
//! - [`Mode::Refuse`]: the listener is closed, so new connections are refused
//!   (`ECONNREFUSED`), and every open connection is closed.
//! - [`Mode::Hang`]: new connections are accepted and never forwarded; open connections
//!   stop moving bytes in both directions (a black-holed route). Back in `Forward`, open
//!   connections resume where they stopped, and those accepted during the hang are closed
//!   (their clients gave up long ago).
//!
//! The proxy keeps its port across modes (it re-binds with `SO_REUSEADDR` after a refusal),
//! so the client's URL never changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Refuse,
    Hang,
}

/// What went through the proxy, for the test's report.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted (in any mode).
    pub accepted: AtomicU64,
    /// Connections accepted while hanging: held, never forwarded.
    pub held: AtomicU64,
}

pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free local port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (mode, watcher) = watch::channel(Mode::Forward);
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(accept_loop(
            listener,
            addr,
            upstream,
            watcher,
            Arc::clone(&counters),
        ));
        Proxy {
            addr,
            mode,
            counters,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    // The port is bound again after a refusal while closed connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    counters: Arc<Counters>,
) {
    let mut listener = Some(listener);
    loop {
        let current = *mode.borrow_and_update();
        match (current, listener.as_ref()) {
            (Mode::Refuse, Some(_)) => {
                // Closed: connecting is refused until the mode changes.
                listener = None;
                continue;
            }
            (Mode::Refuse, None) => {
                if mode.changed().await.is_err() {
                    return;
                }
                continue;
            }
            (_, None) => {
                // Back from a refusal: the same port again (retried: the kernel may still
                // hold it for a moment).
                let mut attempts = 0;
                loop {
                    match bind(addr).await {
                        Ok(bound) => {
                            listener = Some(bound);
                            break;
                        }
                        Err(e) => {
                            attempts += 1;
                            assert!(attempts < 100, "the proxy cannot bind {addr} again: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                continue;
            }
            (_, Some(bound)) => {
                tokio::select! {
                    accepted = bound.accept() => {
                        if let Ok((client, _)) = accepted {
                            counters.accepted.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(serve(
                                client,
                                upstream,
                                mode.clone(),
                                Arc::clone(&counters),
                            ));
                        }
                    }
                    changed = mode.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// One client connection: held while hanging, forwarded otherwise, closed on a refusal.
async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    counters: Arc<Counters>,
) {
    if *mode.borrow_and_update() == Mode::Hang {
        counters.held.fetch_add(1, Ordering::Relaxed);
        // Never forwarded: closed when the hang ends.
        let _ = mode.wait_for(|m| *m != Mode::Hang).await;
        return;
    }
    if *mode.borrow() == Mode::Refuse {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut from_client = vec![0u8; 16 * 1024];
    let mut from_server = vec![0u8; 16 * 1024];
    loop {
        let current = *mode.borrow_and_update();
        match current {
            Mode::Refuse => return,
            Mode::Hang => {
                // Nothing moves either way until the hang ends.
                if mode.wait_for(|m| *m != Mode::Hang).await.is_err() {
                    return;
                }
                continue;
            }
            Mode::Forward => {}
        }
        // Reads are cancel-safe: a mode change while waiting loses no byte.
        tokio::select! {
            read = client_read.read(&mut from_client) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if server_write.write_all(&from_client[..n]).await.is_err() {
                    return;
                },
            },
            read = server_read.read(&mut from_server) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if client_write.write_all(&from_server[..n]).await.is_err() {
                    return;
                },
            },
            changed = mode.changed() => if changed.is_err() {
                return;
            },
        }
    }
}
