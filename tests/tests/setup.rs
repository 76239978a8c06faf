//! `tools/setup` on a host that already runs services of its own: it installs what is missing and
//! stops no process it did not start (a host's nginx, registry or etcd, a local cluster's etcd).
//!
//! Run: `cargo test --release -p wasinode-e2e --test setup`

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// SIGKILL's number on Linux (what `Child::kill` sends).
const SIGKILL: i32 = 9;

fn sleeper(program: &Path, arg0: Option<&str>) -> Result<Child> {
    let mut cmd = Command::new(program);
    if let Some(arg0) = arg0 {
        cmd.arg0(arg0);
    }
    cmd.arg("600")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

#[test]
fn setup_stops_no_process_it_did_not_start() -> Result<()> {
    let sleep = ["/usr/bin/sleep", "/bin/sleep"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("no sleep binary")?;
    // Host processes named like the services tools/setup installs: by executable name (a symlink
    // named nginx runs as "nginx") and by command line (an etcd started as /usr/bin/etcd ...).
    let dir = tempfile::tempdir()?;
    let mut host = Vec::new();
    for name in ["nginx", "docker-registry", "etcd"] {
        let link = dir.path().join(name);
        std::os::unix::fs::symlink(sleep, &link)?;
        host.push((name.to_string(), sleeper(&link, None)?));
    }
    host.push((
        "/usr/bin/etcd (command line)".to_string(),
        sleeper(sleep, Some("/usr/bin/etcd"))?,
    ));

    let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/setup");
    let status = Command::new(&setup)
        .stdin(Stdio::null())
        .status()
        .context("running tools/setup")?;

    // Stop them ourselves, by PID, with SIGKILL: a process that tools/setup signalled (a kill by
    // name sends SIGTERM, delivered before setup even exits) reports that signal instead.
    let mut killed = Vec::new();
    for (name, mut child) in host {
        let early = child.try_wait()?;
        if early.is_none() {
            child.kill()?;
        }
        let exit = child.wait()?;
        if early.is_some() || exit.signal() != Some(SIGKILL) {
            killed.push(format!("{name}: {exit}"));
        }
    }
    if !status.success() {
        bail!("tools/setup failed ({status})");
    }
    if !killed.is_empty() {
        bail!(
            "tools/setup stopped processes it did not start:\n{}",
            killed.join("\n")
        );
    }
    Ok(())
}
