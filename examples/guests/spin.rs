//! spin: a WAGI handler that keeps a CPU busy for as long as the request asks.
//!
//! `GET /spin?MS` computes for MS milliseconds of wall-clock time (as the guest's clock sees it)
//! and answers the number of rounds it did. Tests use it to load a container's CPU, for
//! `resources.limits.cpu` and for CPU usage figures.

use std::io::Write;
use std::time::{Duration, Instant};

fn main() {
    let ms: u64 = std::env::var("QUERY_STRING")
        .ok()
        .and_then(|q| q.parse().ok())
        .unwrap_or(10);
    let until = Instant::now() + Duration::from_millis(ms);
    let mut rounds: u64 = 0;
    let mut x: u64 = 1;
    while Instant::now() < until {
        for _ in 0..1000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        }
        rounds += 1;
    }
    let out = std::io::stdout();
    let mut out = out.lock();
    write!(out, "Content-Type: text/plain\n\n{} rounds ({})\n", rounds, x % 10).unwrap();
    out.flush().unwrap();
}
