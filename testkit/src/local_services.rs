//! Real PostgreSQL and Redis servers for tests and benchmarks, on loopback, on free ports, in
//! temporary directories; stopped (and their data removed) when dropped. `scripts/test` installs
//! the servers (Debian's postgresql and redis-server) when they are missing. Like
//! `local_cluster`, this is test tooling that lives in the library so `bench/` can use it too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::local_cluster::free_loopback_port;
use anyhow::Context;

/// How long a server may take to accept connections.
const START_WAIT: Duration = Duration::from_secs(30);

/// The newest PostgreSQL server binaries installed.
fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (/usr/lib/postgresql); run ./scripts/test, which installs it")?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").exists())
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin).context("no PostgreSQL server binary under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The `postgres` user's uid and gid.
fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().context("id postgres")?;
        anyhow::ensure!(out.status.success(), "there is no postgres user; install Debian's postgresql package");
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// A command run as the `postgres` user when we are root (PostgreSQL refuses to run as root).
/// The process itself changes user, so signals reach the server, not a wrapper.
fn as_postgres(program: &Path) -> anyhow::Result<Command> {
    let mut command = Command::new(program);
    if is_root() {
        use std::os::unix::process::CommandExt;
        let (uid, gid) = postgres_ids()?;
        command.uid(uid).gid(gid);
    }
    Ok(command)
}

fn wait_for_port(addr: &str, child: &mut Child, what: &str, log: &Path) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + START_WAIT;
    loop {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{what} exited ({status}): {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "{what} did not listen on {addr} within {START_WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Postgres {
    pub dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    child: Option<Child>,
    /// fsync on (benchmarks); tests run with it off, which a process crash does not notice.
    durable: bool,
}

impl Postgres {
    /// initdb and start a server on a free loopback port, fsync off (for tests: a killed
    /// server still recovers everything it acknowledged, only a machine crash would not).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(false)
    }

    /// As [`Self::start`]; `durable` keeps PostgreSQL's default fsync and synchronous commit,
    /// as a benchmark must.
    pub fn start_with(durable: bool) -> anyhow::Result<Self> {
        let bin = postgres_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("maos-pg-").tempdir()?;
        if is_root() {
            let (uid, gid) = postgres_ids()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let data = dir.path().join("data");
        let out = as_postgres(&bin.join("initdb"))?
            .current_dir(dir.path())
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "maos", "--no-sync", "-E", "UTF8"])
            .stdout(Stdio::null())
            .output()
            .context("running initdb")?;
        anyhow::ensure!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_loopback_port()?;
        let mut server = Self { dir, port, bin, child: None, durable };
        server.resume()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("postgresql://maos@127.0.0.1:{}/postgres", self.port)
    }

    /// Start the server again on the same port and data.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let log_path = self.dir.path().join("postgres.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut child = as_postgres(&self.bin.join("postgres"))?
            .current_dir(self.dir.path())
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .args(["-c", if self.durable { "fsync=on" } else { "fsync=off" }])
            .arg("-k")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        wait_for_port(&format!("127.0.0.1:{}", self.port), &mut child, "postgres", &log_path)?;
        self.child = Some(child);
        Ok(())
    }

    /// Stop the server as a crash would (immediate shutdown: no checkpoint; recovery on start).
    pub fn crash(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT: PostgreSQL's immediate shutdown.
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as i32, libc::SIGQUIT) };
            let deadline = std::time::Instant::now() + START_WAIT;
            while child.try_wait()?.is_none() {
                anyhow::ensure!(std::time::Instant::now() < deadline, "postgres did not stop");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The postmaster's children may linger a moment after it exits.
        let deadline = std::time::Instant::now() + START_WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            anyhow::ensure!(std::time::Instant::now() < deadline, "port {} still answers", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// A connection for checking the tables directly.
    pub async fn connect(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&self.url()).await?)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as above.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

pub struct Redis {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("maos-redis-").tempdir()?;
        let port = free_loopback_port()?;
        let mut server = Self { dir, port, child: None };
        server.resume()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn resume(&mut self) -> anyhow::Result<()> {
        let log_path = self.dir.path().join("redis.log");
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log_path)
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server (installed by ./scripts/test)")?;
        wait_for_port(&format!("127.0.0.1:{}", self.port), &mut child, "redis-server", &log_path)?;
        self.child = Some(child);
        Ok(())
    }

    /// Kill the server (its cache is gone: it keeps nothing on disk).
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    pub async fn connect(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url())?.get_multiplexed_async_connection().await?)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
