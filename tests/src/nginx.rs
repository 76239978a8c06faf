//! Debian's nginx (`/usr/sbin/nginx`, nginx-light from `tools/setup`) as a reverse proxy on
//! loopback, run in the foreground as a child process with every path (config, pid, logs, temp
//! dirs) inside its own temp dir; stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub const NGINX_BIN: &str = "/usr/sbin/nginx";

pub struct Nginx {
    child: Option<Child>,
    /// `127.0.0.1:PORT` nginx listens on.
    pub addr: String,
    /// Prefix: `nginx.conf`, `nginx.pid`, `error.log`, `access.log`, temp dirs.
    pub dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `server_block` (the seed's values.yaml `serverBlock`) inside `http {}`;
    /// `addr` is the address the server block listens on, awaited before returning.
    pub fn start(server_block: &str, addr: &str) -> Result<Nginx> {
        if !Path::new(NGINX_BIN).exists() {
            bail!("{NGINX_BIN} is missing: run tools/setup (Debian package nginx-light)");
        }
        let dir = tempfile::Builder::new()
            .prefix("wasinode-nginx-")
            .tempdir()?;
        let d = dir.path();
        let p = |name: &str| d.join(name).display().to_string();
        let conf = format!(
            "master_process off;\n\
             pid {pid};\n\
             error_log {err} info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
             access_log {acc};\n\
             client_body_temp_path {cb};\n\
             proxy_temp_path {pt};\n\
             fastcgi_temp_path {ft};\n\
             uwsgi_temp_path {ut};\n\
             scgi_temp_path {st};\n\
             {server_block}\n\
             }}\n",
            pid = p("nginx.pid"),
            err = p("error.log"),
            acc = p("access.log"),
            cb = p("client_body"),
            pt = p("proxy"),
            ft = p("fastcgi"),
            ut = p("uwsgi"),
            st = p("scgi"),
        );
        let conf_path = d.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let out = std::fs::File::create(d.join("nginx.out"))?;
        let child = Command::new(NGINX_BIN)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(d.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawn nginx")?;
        let mut nginx = Nginx {
            child: Some(child),
            addr: addr.to_string(),
            dir,
        };
        nginx.wait_listening(Duration::from_secs(15))?;
        Ok(nginx)
    }

    fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let until = Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("nginx exited ({st}):\n{}", self.logs());
            }
            if Instant::now() > until {
                bail!(
                    "nginx not listening on {} after {timeout:?}:\n{}",
                    self.addr,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// nginx's stdout/stderr and its error log.
    pub fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.path(n)).unwrap_or_default();
        format!("{}{}", read("nginx.out"), read("error.log"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stops nginx (SIGTERM, then SIGKILL after 5 s); returns whether it exited by itself.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
