//! Caches of the kubelet API's delegated authentication and authorization, as the kubelet's
//! webhook authenticator and authorizer keep them: a TokenReview answer for 2 minutes (whether
//! the token was accepted or not), a SubjectAccessReview for 5 minutes when allowed and 30
//! seconds when denied. Errors (the API server away) are not cached. Both caches are bounded,
//! and at most [`MAX_REVIEWS_IN_FLIGHT`] reviews run at once, so a flood of requests, even with
//! a new token each, never becomes a flood on the API server.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::server::Caller;

/// How long a TokenReview answer is kept (the kubelet's `--authentication-token-webhook-cache-ttl`).
pub const TOKEN_TTL: Duration = Duration::from_secs(120);
/// How long an allowed SubjectAccessReview is kept (`--authorization-webhook-cache-authorized-ttl`).
pub const ALLOWED_TTL: Duration = Duration::from_secs(300);
/// How long a denied one is kept (`--authorization-webhook-cache-unauthorized-ttl`).
pub const DENIED_TTL: Duration = Duration::from_secs(30);
/// Entries per cache at most.
pub const MAX_ENTRIES: usize = 4096;
/// Reviews sent to the API server at once at most; further callers wait their turn.
pub const MAX_REVIEWS_IN_FLIGHT: usize = 8;

/// A bounded map whose entries expire.
pub struct TtlCache<K, V> {
    map: Mutex<HashMap<K, (V, Instant)>>,
    cap: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(cap: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            cap: cap.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (V, Instant)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of `k` unless it has expired.
    pub fn get(&self, k: &K) -> Option<V> {
        let mut map = self.lock();
        match map.get(k) {
            Some((v, until)) if *until > Instant::now() => Some(v.clone()),
            Some(_) => {
                map.remove(k);
                None
            }
            None => None,
        }
    }

    /// Keeps `v` for `ttl`. When full, expired entries go first, then the one expiring soonest.
    pub fn insert(&self, k: K, v: V, ttl: Duration) {
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= self.cap && !map.contains_key(&k) {
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= self.cap
                && let Some(first) = map
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| k.clone())
            {
                map.remove(&first);
            }
        }
        map.insert(k, (v, now + ttl));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What an authorization is asked about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Attributes {
    pub user: String,
    pub groups: Vec<String>,
    pub verb: &'static str,
    pub subresource: &'static str,
}

/// The kubelet API's review caches and the bound on reviews in flight.
pub struct AuthCache {
    /// sha256 of the bearer token -> who it is (None: not authenticated).
    pub tokens: TtlCache<[u8; 32], Option<Caller>>,
    pub decisions: TtlCache<Attributes, bool>,
    pub in_flight: Semaphore,
}

impl Default for AuthCache {
    fn default() -> Self {
        Self {
            tokens: TtlCache::new(MAX_ENTRIES),
            decisions: TtlCache::new(MAX_ENTRIES),
            in_flight: Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
        }
    }
}

/// The cached answer for `key`, else `review`'s, taken in turn (at most
/// [`MAX_REVIEWS_IN_FLIGHT`] at once) and kept for `ttl(&answer)`. Errors are not kept.
pub async fn cached<K, V, Fut>(
    cache: &TtlCache<K, V>,
    turns: &Semaphore,
    key: K,
    ttl: impl Fn(&V) -> Duration,
    review: impl FnOnce() -> Fut,
) -> Result<V, String>
where
    K: Eq + Hash + Clone,
    V: Clone,
    Fut: std::future::Future<Output = Result<V, String>>,
{
    if let Some(v) = cache.get(&key) {
        return Ok(v);
    }
    let _turn = turns.acquire().await.map_err(|e| e.to_string())?;
    // Another caller may have asked the same while this one waited.
    if let Some(v) = cache.get(&key) {
        return Ok(v);
    }
    let v = review().await?;
    cache.insert(key, v.clone(), ttl(&v));
    Ok(v)
}

/// The cache key of a bearer token (the token itself is not kept).
pub fn token_key(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_cache_stays_bounded() {
        let c: TtlCache<u32, bool> = TtlCache::new(3);
        c.insert(1, true, Duration::from_secs(60));
        c.insert(2, false, Duration::ZERO);
        assert_eq!(c.get(&1), Some(true));
        assert_eq!(c.get(&2), None, "expired");
        for k in 10..100 {
            c.insert(k, true, Duration::from_secs(60 + u64::from(k)));
        }
        assert!(c.len() <= 3);
        assert_eq!(c.get(&99), Some(true), "the newest is kept");
    }

    #[test]
    fn tokens_are_keyed_by_hash() {
        assert_eq!(token_key("a"), token_key("a"));
        assert_ne!(token_key("a"), token_key("b"));
    }
}
