//! The workspace's binaries (and the nats-servers of [`crate::nats`]) as child processes:
//! started with exactly the environment given, their log kept (in memory or in a file), killed
//! when dropped; their CPU time and memory read from `/proc`.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

/// The workspace's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ is in the workspace")
        .to_path_buf()
}

/// Where a binary of the workspace is: `$FANOUT_BIN_DIR`, else next to the running executable
/// (the benchmark, in `target/release`), else one folder up (a test, in `target/<profile>/deps`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable");
    let dirs = match std::env::var_os("FANOUT_BIN_DIR") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(Path::to_path_buf)
            .collect(),
    };
    dirs.iter()
        .map(|dir| dir.join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not in {dirs:?}: run `cargo build --workspace --bins` first (`make test` and `make bench` do)"
            )
        })
}

/// What a process said, kept for the test that started it (or written to a file).
#[derive(Clone)]
enum Log {
    Memory(Arc<Mutex<Vec<String>>>),
    File(PathBuf),
}

/// How to start a process: [`Process::launch`], then `env`, `arg`, `log_to`, `start`.
pub struct Launch {
    program: PathBuf,
    name: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
    log_file: Option<PathBuf>,
}

impl Launch {
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Launch {
        self.env.push((key.to_string(), value.into()));
        self
    }

    pub fn envs<K: AsRef<str>, V: AsRef<str>>(
        mut self,
        env: impl IntoIterator<Item = (K, V)>,
    ) -> Launch {
        self.env.extend(
            env.into_iter()
                .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_string())),
        );
        self
    }

    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Launch {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// Writes the log to `path` instead of keeping it in memory (a long benchmark run).
    pub fn log_to(mut self, path: PathBuf) -> Launch {
        self.log_file = Some(path);
        self
    }

    /// Starts the process with exactly this environment (`RUST_LOG=info` unless given), and
    /// reads its log until it says where it listens (text `addr=…` or JSON `"addr":"…"`).
    pub fn start(self) -> Process {
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .env_clear()
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program.display()));
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let mut seen = Vec::new();
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.wait();
                panic!(
                    "{} exited before listening:\n{}",
                    self.name,
                    seen.join("\n")
                );
            };
            let addr = listening_on(&line);
            seen.push(line);
            if let Some(addr) = addr {
                break addr;
            }
        };
        let log = match self.log_file {
            Some(path) => Log::File(path),
            None => Log::Memory(Arc::new(Mutex::new(Vec::new()))),
        };
        // Keep reading so the child never blocks on a full pipe.
        let keep = log.clone();
        std::thread::spawn(move || match keep {
            Log::Memory(kept) => {
                kept.lock().expect("log").extend(seen);
                for line in lines.map_while(Result::ok) {
                    kept.lock().expect("log").push(line);
                }
            }
            Log::File(path) => {
                let mut file = std::fs::File::create(path)
                    .ok()
                    .map(std::io::BufWriter::new);
                for line in seen.into_iter().chain(lines.map_while(Result::ok)) {
                    if let Some(file) = file.as_mut() {
                        let _ = writeln!(file, "{line}");
                    }
                }
            }
        });
        Process { child, addr, log }
    }
}

/// The address a log line says the process listens on.
fn listening_on(line: &str) -> Option<String> {
    if !line.contains("listening") {
        return None;
    }
    let text = line
        .split("addr=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next());
    let json = line
        .split("\"addr\":\"")
        .nth(1)
        .and_then(|a| a.split('"').next());
    text.or(json).map(str::to_string)
}

/// A process of the workspace; killed on drop if still running.
pub struct Process {
    pub child: Child,
    /// Where it listens (`host:port`).
    pub addr: String,
    log: Log,
}

impl Process {
    /// How to start the workspace's binary `name` (see [`binary`]).
    pub fn launch(name: &str) -> Launch {
        Launch {
            program: binary(name),
            name: name.to_string(),
            env: Vec::new(),
            args: Vec::new(),
            log_file: None,
        }
    }

    /// Starts `name` with exactly `env` (see [`Launch::start`]).
    pub fn start(name: &str, env: &[(&str, String)]) -> Process {
        Process::launch(name).envs(env.iter().cloned()).start()
    }

    /// [`Process::start`] with command-line arguments.
    pub fn start_with_args(name: &str, env: &[(&str, String)], args: &[&str]) -> Process {
        Process::launch(name)
            .envs(env.iter().cloned())
            .args(args)
            .start()
    }

    /// Every log line so far (none when the log goes to a file).
    pub fn log(&self) -> Vec<String> {
        match &self.log {
            Log::Memory(lines) => lines.lock().expect("log").clone(),
            Log::File(_) => Vec::new(),
        }
    }

    /// Sends `signal` (`-TERM`, `-STOP`, …) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill {signal} {}", self.child.id());
    }

    /// Waits (at most [`crate::WAIT`]) for the process to exit; its exit code (-1: a signal).
    pub async fn exit_code(&mut self) -> i32 {
        crate::within("the process to exit", async {
            loop {
                if let Some(status) = self.child.try_wait().expect("try_wait") {
                    return status.code().unwrap_or(-1);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// User + system CPU seconds so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU seconds of `pid` so far, from `/proc/<pid>/stat` (0 when it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: the fields start after its closing parenthesis.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

/// Resident memory of `pid`, KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_address_in_text_and_json_logs() {
        assert_eq!(
            listening_on("INFO fanout_ws: listening addr=127.0.0.1:4000 node=a").as_deref(),
            Some("127.0.0.1:4000")
        );
        assert_eq!(
            listening_on(r#"{"fields":{"message":"listening","addr":"127.0.0.1:9"}}"#).as_deref(),
            Some("127.0.0.1:9")
        );
        assert_eq!(listening_on("connected addr=1.2.3.4:5"), None);
    }

    #[test]
    fn reads_its_own_cpu_and_memory() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_seconds(std::process::id()) > 0.0);
        assert!(rss_kib(std::process::id()) > 0);
    }
}
