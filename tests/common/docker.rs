//! A real Docker engine for the compose tests: Debian's `dockerd` (started when none runs, and
//! then stopped again), the base images `make images` makes (scripts/images.sh), and a compose
//! project of the test's own (Debian's `docker-compose` 1.29) that is taken down with its
//! containers, networks and volumes when the test ends, also when it fails.
//!
//! Every wait polls a condition under a bound; the bounds are generous because a cold engine
//! on a busy two-core machine is slow, never because the test sleeps.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::workspace;

/// Where the compose tests keep their logs and timings (`target/compose/`).
pub fn out_dir() -> PathBuf {
    let dir = workspace().join("target/compose");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `bound`.
pub fn poll_until(bound: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {bound:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| {
        panic!("cannot run {command:?}: {e}; `make test` installs docker.io and docker-compose")
    })
}

fn engine_answers() -> bool {
    Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Docker engine. If none answered, this started `dockerd` and stops it on drop.
pub struct Engine {
    dockerd: Option<Child>,
}

impl Engine {
    pub fn start() -> Engine {
        if engine_answers() {
            return Engine { dockerd: None };
        }
        let log_path = out_dir().join("dockerd.log");
        let log = File::create(&log_path).unwrap();
        let child = Command::new("dockerd")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group: a ctrl-c meant for the test does not stop it under us.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start dockerd: {e}; `make test` installs Debian's docker.io")
            });
        let engine = Engine {
            dockerd: Some(child),
        };
        let started = Instant::now();
        while !engine_answers() {
            if started.elapsed() > Duration::from_secs(90) {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!(
                    "dockerd did not answer within 90 s; the end of {}:\n{}",
                    log_path.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        engine
    }

    /// Whether this test started the engine (and so stops it).
    pub fn started_here(&self) -> bool {
        self.dockerd.is_some()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let Some(child) = &mut self.dockerd else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Makes the base images the files name (`scripts/images.sh`, what `make images` runs): those
/// already in the engine are kept.
pub fn make_base_images() {
    let output = run(Command::new(workspace().join("scripts/images.sh"))
        .env("NATS_SERVER_BIN", super::nats_server_bin())
        .current_dir(workspace()));
    assert!(
        output.status.success(),
        "scripts/images.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Panics, naming the port, when a host port a compose file publishes is taken (by `make run`,
/// say): the engine would fail half-way through `up` otherwise.
pub fn assert_ports_free(ports: &[u16]) {
    for &port in ports {
        if let Err(err) = std::net::TcpListener::bind(("0.0.0.0", port)) {
            panic!(
                "host port {port} is taken ({err}): the compose files publish it; stop what \
                 listens there (`make run`?) and run the test again"
            );
        }
    }
}

/// One compose project: a file run under a project name of the test's own.
pub struct Project {
    pub name: String,
    file: PathBuf,
    up: bool,
}

impl Project {
    /// The project `name` of compose file `file` (relative to the workspace). Whatever an
    /// earlier run of the same name left behind is removed first.
    pub fn new(name: &str, file: &str) -> Project {
        let project = Project {
            name: name.to_string(),
            file: workspace().join(file),
            up: true,
        };
        project.down();
        project
    }

    fn command(&self) -> Command {
        let mut command = Command::new("docker-compose");
        command
            .args(["--ansi", "never"])
            .arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(&self.file)
            .current_dir(workspace());
        command
    }

    /// `docker-compose <args>`; its output, or a panic with what it printed.
    pub fn compose(&self, args: &[&str]) -> String {
        let output = run(self.command().args(args));
        assert!(
            output.status.success(),
            "docker-compose {} failed:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Every service of the file.
    pub fn services(&self) -> Vec<String> {
        self.compose(&["config", "--services"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// `docker-compose build`, its output kept in `target/compose/<name>-build.log`.
    pub fn build(&self) {
        let log = out_dir().join(format!("{}-build.log", self.name));
        let output = run(self.command().arg("build"));
        let mut text = output.stdout.clone();
        text.extend_from_slice(&output.stderr);
        std::fs::write(&log, &text).unwrap();
        assert!(
            output.status.success(),
            "docker-compose build failed; see {}",
            log.display()
        );
    }

    /// The ids of the running containers of `service`.
    pub fn containers(&self, service: &str) -> Vec<String> {
        self.compose(&["ps", "-q", service])
            .lines()
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// `docker inspect`'s view of container `id`.
    pub fn inspect(id: &str) -> Value {
        let output = run(Command::new("docker").args(["inspect", id]));
        if !output.status.success() {
            return json!(null);
        }
        serde_json::from_slice::<Value>(&output.stdout).unwrap_or(json!(null))[0].clone()
    }

    /// Whether every container of `service` runs and is healthy (those with a health check).
    pub fn healthy(&self, service: &str) -> bool {
        let ids = self.containers(service);
        !ids.is_empty()
            && ids.iter().all(|id| {
                let state = &Project::inspect(id)["State"];
                state["Running"] == true
                    && (state["Health"].is_null() || state["Health"]["Status"] == "healthy")
            })
    }

    /// Runs `command` in the first container of `service`: its output, or a panic.
    pub fn exec(&self, service: &str, command: &[&str]) -> String {
        self.try_exec(service, command)
            .unwrap_or_else(|err| panic!("{command:?} in {service}: {err}"))
    }

    /// Runs `command` in the first container of `service`: its output, or what went wrong.
    pub fn try_exec(&self, service: &str, command: &[&str]) -> Result<String, String> {
        let output = run(self.command().args(["exec", "-T", service]).args(command));
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// Every container's log, into `target/compose/<name>.log`.
    pub fn save_logs(&self) -> PathBuf {
        let path = out_dir().join(format!("{}.log", self.name));
        let output = run(self.command().args(["logs", "--no-color", "--timestamps"]));
        let mut text = output.stdout.clone();
        text.extend_from_slice(&output.stderr);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Removes the project's containers, networks and volumes.
    pub fn down(&self) {
        let _ = self
            .command()
            .args(["down", "--volumes", "--remove-orphans", "--timeout", "10"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Takes the project down now (its logs kept first), rather than on drop.
    pub fn finish(mut self) {
        self.save_logs();
        self.down();
        self.up = false;
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if self.up {
            let logs = self.save_logs();
            eprintln!("compose project {}: logs in {}", self.name, logs.display());
            self.down();
        }
    }
}

/// How long each phase of a compose test took, written to
/// `target/compose/<name>-timings.json` as it goes (and printed).
pub struct Phases {
    name: String,
    started: Instant,
    done: Vec<(String, f64)>,
}

impl Phases {
    pub fn new(name: &str) -> Phases {
        Phases {
            name: name.to_string(),
            started: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Ends the phase that ran since the last one: it was `phase`.
    pub fn lap(&mut self, phase: &str) {
        let seconds = self.started.elapsed().as_secs_f64();
        let before: f64 = self.done.iter().map(|(_, s)| s).sum();
        self.done.push((phase.to_string(), seconds - before));
        eprintln!("{}: {phase} took {:.1} s", self.name, seconds - before);
        let figures: serde_json::Map<String, Value> = self
            .done
            .iter()
            .map(|(phase, s)| (phase.clone(), json!((s * 10.0).round() / 10.0)))
            .collect();
        std::fs::write(
            out_dir().join(format!("{}-timings.json", self.name)),
            serde_json::to_string_pretty(&figures).unwrap(),
        )
        .unwrap();
    }
}
