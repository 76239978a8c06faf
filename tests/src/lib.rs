//! End-to-end test support for wasinode: builds the guest modules, finds the `wasinode` binary,
//! and starts the real parts the tests talk to (control plane, registry, nginx) on loopback.
//! Everything here is test harness; nothing in the product depends on it.

pub mod agent;
pub mod cluster;
pub mod guests;
pub mod metrics_server;
pub mod netns;
pub mod nginx;
pub mod registry;
pub mod seed;
pub mod stallproxy;
pub mod wasinode;
