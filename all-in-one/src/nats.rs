//! The nats-server child, when no `FANOUT_NATS_URL` is given: JetStream with its store in
//! `FANOUT_DATA_DIR`, on a free loopback port (so it never clashes with another NATS), its
//! output in `FANOUT_DATA_DIR/nats-server.log`.
//!
//! Nothing is left running: [`Nats::stop`] ends it with SIGTERM (JetStream flushes its store),
//! and if this process is killed outright, Linux sends the child SIGTERM too (`setpriv
//! --pdeathsig`, which util-linux has on every Linux; the signal comes when the thread that
//! started the child ends, so a thread of its own starts it and waits for it). Its own process
//! group keeps a ctrl-c in the terminal for this process alone, which then drains both servers
//! before it stops the child.
//!
//! Which nats-server: `$NATS_SERVER_BIN`, else the first on `PATH`, else `.tools/bin/` (what
//! `make nats-server` installs) in the working directory or above the executable.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use rustix::process::{Pid, Signal, kill_process};
use tokio::sync::watch;

/// How long the child may take to listen, and to stop before it is killed.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error(
        "no nats-server found: put one on PATH, run `make nats-server` (it installs \
         .tools/bin/nats-server), or give FANOUT_NATS_URL"
    )]
    NotFound,
    #[error("NATS_SERVER_BIN names {0}, which is not a file")]
    NotAFile(PathBuf),
    #[error("cannot use FANOUT_DATA_DIR {dir}: {source}")]
    DataDir { dir: PathBuf, source: io::Error },
    #[error("cannot start {bin}: {source}")]
    Spawn { bin: PathBuf, source: io::Error },
    #[error("nats-server stopped at start ({status}); the end of {log}:\n{tail}")]
    Exited {
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("nats-server did not listen within {START_TIMEOUT:?}; see {0}")]
    Timeout(PathBuf),
}

/// A running nats-server child.
#[derive(Debug)]
pub struct Nats {
    pid: Pid,
    url: String,
    /// `Some(how it ended)` once the child has exited (set by the thread that waits for it).
    exited: watch::Receiver<Option<String>>,
}

impl Nats {
    /// Starts nats-server with its store in `data_dir` and waits until it listens.
    pub async fn start(data_dir: &Path) -> Result<Nats, NatsError> {
        let bin = find_nats_server()?;
        let dir = std::path::absolute(data_dir).map_err(|source| NatsError::DataDir {
            dir: data_dir.to_path_buf(),
            source,
        })?;
        let ports_dir = dir.join("run");
        let data_error = |source| NatsError::DataDir {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&ports_dir).map_err(data_error)?;
        // A ports file left by a child that was killed would name a dead port.
        for stale in std::fs::read_dir(&ports_dir).map_err(data_error)?.flatten() {
            let _ = std::fs::remove_file(stale.path());
        }
        let log = dir.join("nats-server.log");
        let log_file = File::create(&log).map_err(data_error)?;
        let log_err = log_file.try_clone().map_err(data_error)?;

        let mut command = match setpriv() {
            Some(setpriv) => {
                let mut command = Command::new(setpriv);
                command.args(["--pdeathsig", "TERM", "--"]).arg(&bin);
                command
            }
            None => {
                tracing::warn!(
                    "setpriv (util-linux) is missing: if this process is killed outright, \
                     its nats-server child outlives it"
                );
                Command::new(&bin)
            }
        };
        command
            // -sd: its store goes in `dir`/jetstream.
            .args(["-a", "127.0.0.1", "-p", "-1", "-n", "fanout", "-js", "-sd"])
            .arg(&dir)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);

        let (pid_tx, pid_rx) = std::sync::mpsc::channel();
        let (exit_tx, exited) = watch::channel(None);
        let spawned = std::thread::Builder::new()
            .name("nats-server".into())
            .spawn(move || match command.spawn() {
                Err(err) => {
                    let _ = pid_tx.send(Err(err));
                }
                Ok(mut child) => {
                    let _ = pid_tx.send(Ok(child.id()));
                    let status = child
                        .wait()
                        .map_or_else(|err| err.to_string(), |status| status.to_string());
                    let _ = exit_tx.send(Some(status));
                }
            });
        let spawn_error = |source| NatsError::Spawn {
            bin: bin.clone(),
            source,
        };
        spawned.map_err(spawn_error)?;
        let pid = pid_rx
            .recv()
            .map_err(|_| spawn_error(io::Error::other("the starting thread ended")))?
            .map_err(spawn_error)?;
        let pid = Pid::from_raw(pid as i32)
            .ok_or_else(|| spawn_error(io::Error::other("no process id")))?;

        let mut nats = Nats {
            pid,
            url: String::new(),
            exited,
        };
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = nats.exited.borrow().clone() {
                return Err(NatsError::Exited {
                    status,
                    tail: tail(&log),
                    log,
                });
            }
            if let Some(url) = client_url(&ports_dir, pid) {
                nats.url = url;
                break;
            }
            if tokio::time::Instant::now() > deadline {
                nats.stop().await;
                return Err(NatsError::Timeout(log));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(
            pid = pid.as_raw_nonzero().get(),
            url = %nats.url,
            store = %dir.join("jetstream").display(),
            bin = %bin.display(),
            "nats-server started"
        );
        Ok(nats)
    }

    /// The URL clients reach it at (`nats://127.0.0.1:<port>`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_TIMEOUT`]; returns once it
    /// has exited.
    pub async fn stop(mut self) {
        for signal in [Signal::TERM, Signal::KILL] {
            if self.exited.borrow().is_some() {
                break;
            }
            // Only while the waiting thread has not seen it exit: the pid is still ours.
            let _ = kill_process(self.pid, signal);
            let ended = tokio::time::timeout(
                STOP_TIMEOUT,
                self.exited.wait_for(|status| status.is_some()),
            )
            .await;
            if let Ok(Ok(status)) = ended {
                tracing::info!(
                    status = status.as_deref().unwrap_or(""),
                    "nats-server stopped"
                );
                return;
            }
            tracing::warn!(?signal, "nats-server did not stop within {STOP_TIMEOUT:?}");
        }
    }
}

/// The first executable named `nats-server` where the module's docs say.
fn find_nats_server() -> Result<PathBuf, NatsError> {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(NatsError::NotAFile(bin))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut tools = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        tools.push(cwd.join(".tools/bin"));
    }
    if let Ok(exe) = std::env::current_exe() {
        tools.extend(exe.ancestors().skip(1).map(|dir| dir.join(".tools/bin")));
    }
    on_path
        .into_iter()
        .chain(tools)
        .map(|dir| dir.join("nats-server"))
        .find(|path| path.is_file())
        .ok_or(NatsError::NotFound)
}

/// `setpriv` when it can set a parent-death signal here.
fn setpriv() -> Option<&'static str> {
    let works = Command::new("setpriv")
        .args(["--pdeathsig", "TERM", "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    works.then_some("setpriv")
}

/// The client URL from the ports file nats-server writes once it listens.
fn client_url(ports_dir: &Path, pid: Pid) -> Option<String> {
    let suffix = format!("_{}.ports", pid.as_raw_nonzero());
    let file = std::fs::read_dir(ports_dir)
        .ok()?
        .flatten()
        .find(|entry| entry.file_name().to_string_lossy().ends_with(&suffix))?;
    let ports: serde_json::Value =
        serde_json::from_slice(&std::fs::read(file.path()).ok()?).ok()?;
    ports["nats"][0].as_str().map(String::from)
}

/// The last lines of `log`.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
