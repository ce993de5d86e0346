//! Runs roomcast as a child process, for the scenarios that restart it or watch it from its
//! first record: start it, wait until it listens and is ready, stop it with SIGTERM and wait
//! for it to exit.
//!
//! The server's stderr (JSON logs) is appended to a log file; its `listening` line gives the
//! public and admin addresses, so a config with fixed ports and one with port 0 both work.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How to start the server.
#[derive(Debug, Clone)]
pub struct Spec {
    pub bin: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Written with the pid of every server started, so a calling script can clean up.
    pub pidfile: Option<PathBuf>,
    /// `ROOMCAST_*` overrides of the config file (its name, listeners, presence), for
    /// replicas that share one file.
    pub env: Vec<(String, String)>,
}

pub struct Server {
    child: Child,
    pub pid: u32,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub spawned: Instant,
    /// From spawn to the `listening` line, and to `/readyz` answering 200.
    pub listening_after: Duration,
    pub ready_after: Duration,
    exited: bool,
}

const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

impl Spec {
    /// Starts a server and waits until it is ready. Blocking.
    pub fn start(&self) -> anyhow::Result<Server> {
        let mut server = self.spawn()?;
        server.wait_ready()?;
        Ok(server)
    }

    /// Starts a server and waits only until it listens: its admin endpoint answers from then
    /// on, while it may still be reading back its replay window. Blocking.
    pub fn spawn(&self) -> anyhow::Result<Server> {
        let spawned = Instant::now();
        let mut child = Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("ROOMCAST_LOG_FORMAT", "json")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let pid = child.id();
        if let Some(path) = &self.pidfile {
            std::fs::write(path, format!("{pid}\n"))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("server-{pid}-log"))
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log, "{line}");
                    if tx.is_some() && line.contains("\"message\":\"listening\"") {
                        if let Some(t) = tx.take() {
                            let _ = t.send(line);
                        }
                    }
                }
            })?;
        let mut server = Server {
            child,
            pid,
            public: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            spawned,
            listening_after: Duration::ZERO,
            ready_after: Duration::ZERO,
            exited: false,
        };
        let line = match rx.recv_timeout(LISTEN_TIMEOUT) {
            Ok(line) => line,
            Err(_) => bail!(
                "the server did not log `listening` within {LISTEN_TIMEOUT:?} (see {})",
                self.log.display()
            ),
        };
        server.listening_after = spawned.elapsed();
        server.public = addr_field(&line, "public").context("no public address logged")?;
        server.admin = addr_field(&line, "admin").context("no admin address logged")?;
        for a in [server.public, server.admin] {
            if !a.ip().is_loopback() {
                bail!("the server listens on {a}, not on loopback");
            }
        }
        Ok(server)
    }
}

impl Spec {
    /// The spec of replica `i` of several started from one config: its log and pid files
    /// numbered (`server.log` -> `server-2.log`), `env` added to the overrides.
    pub fn replica(&self, i: usize, env: Vec<(String, String)>) -> Spec {
        let mut spec = self.clone();
        spec.log = numbered(&self.log, i);
        spec.pidfile = self.pidfile.as_deref().map(|p| numbered(p, i));
        spec.env.extend(env);
        spec
    }
}

/// `dir/name.ext` as `dir/name-i.ext`.
fn numbered(path: &std::path::Path, i: usize) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{i}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{i}"),
    };
    path.with_file_name(name)
}

impl Server {
    /// Waits until `/readyz` answers 200. Blocking.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while http_status(self.admin, "/readyz") != Some(200) {
            self.check_running()?;
            if Instant::now() > deadline {
                bail!("the server was not ready within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.ready_after = self.spawned.elapsed();
        Ok(())
    }

    /// An error if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.exited = true;
            bail!("the server exited ({status})");
        }
        Ok(())
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.admin)
    }

    /// Sends SIGTERM and waits for the process to exit; returns how long that took. Blocking.
    pub fn terminate(&mut self) -> anyhow::Result<Duration> {
        let asked = Instant::now();
        if self.exited {
            return Ok(Duration::ZERO);
        }
        // SAFETY: a plain syscall on our own child's pid, which has not been reaped yet.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        loop {
            if self.child.try_wait()?.is_some() {
                self.exited = true;
                return Ok(asked.elapsed());
            }
            if asked.elapsed() > EXIT_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.exited = true;
                bail!("the server did not exit within {EXIT_TIMEOUT:?} of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Server {
    /// SIGKILL, for a server that no longer answers: one frozen by a client may not handle
    /// SIGTERM either. Blocking.
    pub fn kill(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.exited = true;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.terminate();
        }
    }
}

/// `"key":"IP:port"` anywhere in a log line.
fn addr_field(line: &str, key: &str) -> Option<SocketAddr> {
    let pat = format!("\"{key}\":\"");
    let at = line.find(&pat)? + pat.len();
    let end = line[at..].find('"')? + at;
    line[at..end].parse().ok()
}

/// The status code of `GET path` on a loopback address, if it answers within a second.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    if !addr.ip().is_loopback() {
        return None;
    }
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).ok()?;
    let text = std::str::from_utf8(&head[..n]).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_addresses_in_a_log_line() {
        let line = r#"{"timestamp":"x","level":"INFO","fields":{"message":"listening","public":"127.0.0.1:4100","admin":"127.0.0.1:4101","server":"bench"}}"#;
        assert_eq!(
            addr_field(line, "public"),
            Some("127.0.0.1:4100".parse().unwrap())
        );
        assert_eq!(
            addr_field(line, "admin"),
            Some("127.0.0.1:4101".parse().unwrap())
        );
        assert_eq!(addr_field(line, "other"), None);
    }

    #[test]
    fn replicas_get_numbered_files_and_their_own_overrides() {
        let base = Spec {
            bin: "roomcast".into(),
            config: "bench.toml".into(),
            log: "out/server.log".into(),
            pidfile: Some("out/server.pid".into()),
            env: vec![("ROOMCAST_LOG_LEVEL".into(), "info".into())],
        };
        let two = base.replica(2, vec![("ROOMCAST_SERVER_NAME".into(), "r2".into())]);
        assert_eq!(two.log, PathBuf::from("out/server-2.log"));
        assert_eq!(two.pidfile, Some(PathBuf::from("out/server-2.pid")));
        assert_eq!(two.config, base.config);
        assert_eq!(
            two.env,
            [
                ("ROOMCAST_LOG_LEVEL".to_string(), "info".to_string()),
                ("ROOMCAST_SERVER_NAME".to_string(), "r2".to_string())
            ]
        );
        assert_eq!(
            numbered(std::path::Path::new("log"), 3),
            PathBuf::from("log-3")
        );
    }
}
