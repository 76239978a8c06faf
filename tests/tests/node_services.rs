//! Services reach wasm pods: a node with a real address (the host end of a veth pair whose other
//! end is in a network namespace the test creates), EndpointSlices from the real
//! kube-controller-manager following the pods' readiness, and a real kube-proxy inside the
//! namespace carrying traffic for the Service's ClusterIP to the pods over the veth.
//!
//! Needs root and iproute2 (tools/setup). Run:
//! `cargo build --release -p wasinode && cargo test --release -p wasinode-e2e --test node_services`

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use e2e::netns::NetNs;

/// Whether `ip` lists an interface or a namespace named `name`.
fn exists(name: &str) -> Result<bool> {
    let links = Command::new("ip").args(["-o", "link", "show"]).output()?;
    let nss = Command::new("ip").args(["netns", "list"]).output()?;
    let mentions = |out: &[u8]| {
        String::from_utf8_lossy(out).lines().any(|l| {
            l.split(|c: char| c.is_whitespace() || c == ':' || c == '@')
                .any(|w| w == name)
        })
    };
    Ok(mentions(&links.stdout) || mentions(&nss.stdout))
}

/// A process inside the namespace reaches a listener on the host end's address over the veth;
/// dropping the NetNs removes the namespace and both ends; and a pair left by a dead process is
/// swept by the next NetNs::new.
#[test]
fn netns_reaches_the_host_end_and_is_removed() -> Result<()> {
    // What a killed test process would leave behind (its PID above pid_max, so never alive).
    let (stale_ns, stale_link) = ("wasinode-4194399-0", "wn4194399-0h");
    let ip = |args: &[&str]| Command::new("ip").args(args).status();
    ensure!(ip(&["netns", "add", stale_ns])?.success());
    ensure!(
        ip(&[
            "link",
            "add",
            stale_link,
            "type",
            "veth",
            "peer",
            "name",
            "wn4194399-0p"
        ])?
        .success()
    );

    let net = NetNs::new()?;
    ensure!(
        !exists(stale_ns)? && !exists(stale_link)?,
        "stale pair not swept"
    );
    ensure!(!net.host_ip.is_loopback() && !net.ns_ip.is_loopback());
    let listener = TcpListener::bind((net.host_ip, 0))?;
    let port = listener.local_addr()?.port();
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut conn, peer) = listener.accept()?;
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf)?;
        let body = peer.ip().to_string();
        write!(
            conn,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )?;
        Ok(())
    });
    let url = format!("http://{}:{port}/", net.host_ip);
    let seen = net.run(&["curl", "-sS", "--max-time", "10", &url])?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    // The client was the namespace's end of the pair.
    ensure!(seen == net.ns_ip.to_string(), "peer was {seen}");

    let (name, host_if) = (net.name.clone(), net.host_if.clone());
    ensure!(exists(&name)? && exists(&host_if)?);
    drop(net);
    ensure!(!exists(&name)? && !exists(&host_if)?, "not removed on drop");
    Ok(())
}

/// Two NetNs in one process get different /30s.
#[test]
fn netns_pairs_do_not_share_addresses() -> Result<()> {
    let a = NetNs::new()?;
    let b = NetNs::new().context("second NetNs")?;
    ensure!(a.host_ip != b.host_ip && a.ns_ip != b.host_ip && a.host_ip != b.ns_ip);
    Ok(())
}
