//! What every HTTP listener of the node does before a request reaches a handler: bound the
//! connections it holds, and cut the ones that hold a descriptor without using it. Shared by the
//! WAGI listeners and the kubelet API, whose clients are not trusted.
//!
//! - A cap on open connections per listener. At the cap a new connection evicts the oldest one
//!   that has no request in flight (an idle keep-alive, or one that never finished its headers);
//!   when every connection is busy the new one is closed at once. Slow or idle clients thus
//!   cannot lock others out, and the descriptors a listener holds stay bounded.
//! - HTTP/1 connections get hyper's header-read timeout (it runs while the head of the first
//!   request is read and again while a kept-alive connection waits for the next one), so a
//!   half-sent request and an idle keep-alive are both closed after `header_timeout`.
//! - Any connection (HTTP/2 included) with no request in flight for `idle_timeout` is closed.
//! - TLS listeners bound the handshake by `handshake_timeout`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Bounds of one listener's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Longest time to receive a request's head (HTTP/1), and longest idle keep-alive.
    pub header_timeout: Duration,
    /// Longest time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Longest TLS handshake (TLS listeners).
    pub handshake_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

struct Entry {
    inflight: Arc<AtomicUsize>,
    evict: CancellationToken,
}

/// The open connections of one listener.
#[derive(Clone)]
pub struct Conns {
    limits: ConnLimits,
    /// Connection id (in accept order, so the first is the oldest) -> entry.
    open: Arc<Mutex<BTreeMap<u64, Entry>>>,
    next: Arc<AtomicU64>,
    evicted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

impl Conns {
    pub fn new(limits: ConnLimits) -> Conns {
        Conns {
            limits,
            open: Arc::default(),
            next: Arc::default(),
            evicted: Arc::default(),
            refused: Arc::default(),
        }
    }

    pub fn limits(&self) -> &ConnLimits {
        &self.limits
    }

    /// Open connections now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Connections evicted for a newer one, and connections refused because every slot was busy.
    pub fn evictions(&self) -> (u64, u64) {
        (
            self.evicted.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for a just-accepted connection, evicting the oldest idle one at the cap.
    /// `None`: every connection has a request in flight; close the new one.
    pub fn admit(&self) -> Option<Conn> {
        let mut open = self.lock();
        if open.len() >= self.limits.max_connections {
            let idle = open
                .iter()
                .find(|(_, e)| e.inflight.load(Ordering::Acquire) == 0 && !e.evict.is_cancelled())
                .map(|(id, _)| *id);
            match idle {
                Some(id) => {
                    if let Some(e) = open.remove(&id) {
                        e.evict.cancel();
                    }
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let inflight = Arc::new(AtomicUsize::new(0));
        let evict = CancellationToken::new();
        open.insert(
            id,
            Entry {
                inflight: inflight.clone(),
                evict: evict.clone(),
            },
        );
        Some(Conn {
            id,
            conns: self.clone(),
            inflight,
            evict,
            last_done: Arc::new(Mutex::new(Instant::now())),
        })
    }
}

/// One admitted connection; its slot is freed on drop.
pub struct Conn {
    id: u64,
    conns: Conns,
    inflight: Arc<AtomicUsize>,
    evict: CancellationToken,
    last_done: Arc<Mutex<Instant>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

impl Conn {
    /// Marks a request in flight until the returned guard is dropped (hold it for the whole
    /// handler, response building included).
    pub fn request(&self) -> InFlight {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            inflight: self.inflight.clone(),
            last_done: self.last_done.clone(),
        }
    }

    /// Resolves when the connection should be closed: evicted for a newer one, or idle (no
    /// request in flight) for the listener's `idle_timeout`.
    pub async fn closed(&self) {
        let idle = self.conns.limits.idle_timeout;
        let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = self.evict.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            let last = *self.last_done.lock().unwrap_or_else(|p| p.into_inner());
            if self.inflight.load(Ordering::Acquire) == 0 && last.elapsed() >= idle {
                return;
            }
        }
    }
}

/// A request in flight on a [`Conn`].
pub struct InFlight {
    inflight: Arc<AtomicUsize>,
    last_done: Arc<Mutex<Instant>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.last_done.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize) -> ConnLimits {
        ConnLimits {
            max_connections: max,
            idle_timeout: Duration::from_millis(100),
            ..ConnLimits::default()
        }
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_goes() {
        let conns = Conns::new(limits(2));
        let a = conns.admit().expect("a");
        let b = conns.admit().expect("b");
        let _busy = a.request();
        let c = conns.admit().expect("c evicts b, the oldest idle");
        assert!(b.evict.is_cancelled());
        assert!(!a.evict.is_cancelled());
        assert_eq!(conns.len(), 2);
        let _busy_c = c.request();
        assert!(conns.admit().is_none(), "every slot busy: refused");
        assert_eq!(conns.evictions(), (1, 1));
        drop(b);
        assert_eq!(
            conns.len(),
            2,
            "an evicted connection's slot is already free"
        );
        drop(a);
        assert_eq!(conns.len(), 1);
    }

    #[tokio::test]
    async fn idle_connections_close_and_busy_ones_do_not() {
        let conns = Conns::new(limits(8));
        let idle = conns.admit().expect("idle");
        tokio::time::timeout(Duration::from_secs(5), idle.closed())
            .await
            .expect("an idle connection is closed after idle_timeout");
        let busy = conns.admit().expect("busy");
        let guard = busy.request();
        assert!(
            tokio::time::timeout(Duration::from_millis(400), busy.closed())
                .await
                .is_err(),
            "a connection with a request in flight stays open"
        );
        drop(guard);
        tokio::time::timeout(Duration::from_secs(5), busy.closed())
            .await
            .expect("closed once idle again");
    }
}
