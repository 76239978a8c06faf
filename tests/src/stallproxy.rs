//! A TCP proxy on loopback between a client (the agent) and a server (the API server) that can be
//! told to stall connections: a stalled connection stays open but forwards nothing in either
//! direction, so a request sent on it never reaches the server and never gets its response, as on
//! a connection whose peer went silent (a dead NAT entry, a hung load balancer). Other
//! connections go on working.
//!
//! Clients that keep connections alive (kube's HTTP/1.1 pool) send their next request on a
//! connection opened earlier; [`StallProxy::stall`] stalls every connection open at that moment
//! (connections opened after it pass, until the next `stall`). [`StallProxy::release`] closes the
//! stalled connections (their requests fail, as they would once TCP gives up).
//!
//! ```no_run
//! # use e2e::stallproxy::StallProxy;
//! let proxy = StallProxy::start("127.0.0.1:6443".parse()?)?;
//! // ... point the client at proxy.addr() ...
//! proxy.stall();    // the open connections hang; new ones pass
//! proxy.release();  // the stalled ones are closed
//! # anyhow::Ok(())
//! ```
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at a time (more are closed at once), two
//! threads each, and one held read buffer per direction. Dropping the proxy closes everything.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// Connections open at once; an accepted connection beyond this is closed at once.
pub const MAX_CONNECTIONS: usize = 128;
/// How often a pump blocked in `read` looks up whether the proxy is being dropped.
const POLL: Duration = Duration::from_millis(200);
/// How often a stalled pump looks up whether it was released.
const HOLD_POLL: Duration = Duration::from_millis(20);

/// What the proxy has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted (and forwarded to the server) since the start.
    pub accepted: usize,
    /// Connections open now.
    pub open: usize,
    /// Connections stalled since the start.
    pub stalled: usize,
    /// Stalled connections on which bytes arrived and were held (a request or response that
    /// never got through).
    pub held: usize,
    /// Accepted connections closed at once because [`MAX_CONNECTIONS`] were open.
    pub refused: usize,
}

/// The proxy; see the module documentation.
pub struct StallProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: SocketAddr,
    stop: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    conns: Vec<Conn>,
    next_id: usize,
    stats: Stats,
}

struct Conn {
    id: usize,
    client: TcpStream,
    server: TcpStream,
    flags: Arc<Flags>,
}

#[derive(Default)]
struct Flags {
    stalled: AtomicBool,
    /// Set when the connection is closed by [`StallProxy::release`] or the drop.
    closed: AtomicBool,
    /// Whether bytes were held while stalled (counted once).
    held: AtomicBool,
    /// Pumps still running; the last one to finish forgets the connection.
    pumps: AtomicUsize,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StallProxy {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<StallProxy> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), upstream)
    }

    /// Listens on a free port of `ip` (an address of this host: loopback, or a veth end a test
    /// made) and forwards each connection to `upstream`.
    pub fn start_on(ip: std::net::IpAddr, upstream: SocketAddr) -> Result<StallProxy> {
        let listener = TcpListener::bind((ip, 0)).context("binding the stall proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            stop: AtomicBool::new(false),
            state: Mutex::default(),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("stallproxy-accept".into())
                .spawn(move || accept_loop(listener, shared))?
        };
        Ok(StallProxy {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stalls every connection open now (until [`StallProxy::release`]); connections accepted
    /// later pass. Returns how many were stalled (not counting those stalled before).
    pub fn stall(&self) -> usize {
        let mut st = self.shared.state();
        let mut n = 0;
        for c in &st.conns {
            if !c.flags.stalled.swap(true, Ordering::SeqCst) {
                n += 1;
            }
        }
        st.stats.stalled += n;
        n
    }

    /// Closes the stalled connections (what they held is dropped). Returns how many.
    pub fn release(&self) -> usize {
        let st = self.shared.state();
        let mut n = 0;
        for c in &st.conns {
            if c.flags.stalled.load(Ordering::SeqCst) {
                close(c);
                n += 1;
            }
        }
        n
    }

    pub fn stats(&self) -> Stats {
        let st = self.shared.state();
        Stats {
            open: st.conns.len(),
            ..st.stats
        }
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for c in &self.shared.state().conns {
            close(c);
        }
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn close(c: &Conn) {
    c.flags.closed.store(true, Ordering::SeqCst);
    let _ = c.client.shutdown(Shutdown::Both);
    let _ = c.server.shutdown(Shutdown::Both);
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = stream else { continue };
        if let Err(e) = forward(client, &shared) {
            eprintln!("stallproxy: {e:#}");
        }
    }
}

/// Connects `client` to the upstream and starts its two pumps (unless the proxy is full).
fn forward(client: TcpStream, shared: &Arc<Shared>) -> Result<()> {
    {
        let mut st = shared.state();
        if st.conns.len() >= MAX_CONNECTIONS {
            st.stats.refused += 1;
            return Ok(());
        }
    }
    let server = TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(5))
        .with_context(|| format!("connecting to {}", shared.upstream))?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(POLL))?;
    }
    let flags = Arc::new(Flags::default());
    flags.pumps.store(2, Ordering::SeqCst);
    let id = {
        let mut st = shared.state();
        let id = st.next_id;
        st.next_id += 1;
        st.stats.accepted += 1;
        st.conns.push(Conn {
            id,
            client: client.try_clone()?,
            server: server.try_clone()?,
            flags: flags.clone(),
        });
        id
    };
    let pumps = [(client.try_clone()?, server.try_clone()?), (server, client)];
    for (from, to) in pumps {
        let (shared, flags) = (shared.clone(), flags.clone());
        std::thread::Builder::new()
            .name(format!("stallproxy-{id}"))
            .spawn(move || {
                pump(from, to, &shared, &flags);
                if flags.pumps.fetch_sub(1, Ordering::SeqCst) == 1 {
                    shared.state().conns.retain(|c| c.id != id);
                }
            })?;
    }
    Ok(())
}

/// Copies `from` to `to` until either ends, holding what it read while the connection is
/// stalled.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared, flags: &Flags) {
    let mut buf = vec![0u8; 16 * 1024];
    let done =
        |flags: &Flags| flags.closed.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst);
    loop {
        if done(flags) {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        if flags.stalled.load(Ordering::SeqCst) {
            if !flags.held.swap(true, Ordering::SeqCst) {
                shared.state().stats.held += 1;
            }
            while flags.stalled.load(Ordering::SeqCst) && !done(flags) {
                std::thread::sleep(HOLD_POLL);
            }
            if done(flags) {
                break;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
