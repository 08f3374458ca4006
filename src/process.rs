//! What every fanout binary's `main` does: settings, telemetry, the listening socket, signals,
//! and an exit code with a one-line error. Each binary's `main.rs` is one call to [`main`].

use std::{future::Future, process::ExitCode};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    ConfigError,
    config::{self, Settings},
    telemetry,
};

/// Runs a server binary: reads `--config FILE` / `FANOUT_CONFIG` and the environment, starts
/// the runtime (`worker_threads`), logging and tracing, binds the listen address, and runs
/// `run` until SIGTERM or ctrl-c; then flushes pending spans. Any error ends the process
/// with status 1 and one line on stderr naming the cause.
pub fn main<C, Fut, E>(
    name: &'static str,
    about: &'static str,
    run: impl FnOnce(C, TcpListener, CancellationToken) -> Fut,
) -> ExitCode
where
    C: Settings,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error + 'static,
{
    let args = match config::Args::parse_from(name, about, std::env::args()) {
        Ok(args) => args,
        // `--help` (status 0), or what is wrong with the command line (status 2).
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(err.exit_code().clamp(0, 255) as u8);
        }
    };
    let loaded = C::load(args.file.as_deref());
    if args.check {
        return check(name, args.file.as_deref(), loaded);
    }
    let config = match loaded {
        Ok(config) => config,
        Err(err) => return fail(name, &chain(&err)),
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.common().worker_threads > 0 {
        runtime.worker_threads(config.common().worker_threads);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(name, &format!("cannot start the runtime: {err}")),
    };
    runtime.block_on(serve(name, config, run))
}

/// `--check`, as `nats-server -t`: the effective settings on stdout and status 0, or what is
/// wrong on stderr and status 1; nothing is started or connected.
fn check<C: Settings>(
    name: &str,
    file: Option<&std::path::Path>,
    loaded: Result<C, ConfigError>,
) -> ExitCode {
    match loaded.and_then(|config| config.check().map(|()| config)) {
        Ok(config) => {
            let values = [
                serde_json::to_value(config.common()).unwrap_or_default(),
                serde_json::to_value(&config).unwrap_or_default(),
            ];
            let source = file.map_or("defaults and environment".to_string(), |file| {
                format!("{}, defaults and environment", file.display())
            });
            println!("# {name}: settings are valid ({source})");
            for line in config::effective(&values) {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => fail(name, &format!("settings are not valid: {}", chain(&err))),
    }
}

/// [`main`] once the runtime runs.
async fn serve<C: Settings, Fut, E: std::error::Error + 'static>(
    name: &'static str,
    config: C,
    run: impl FnOnce(C, TcpListener, CancellationToken) -> Fut,
) -> ExitCode
where
    Fut: Future<Output = Result<(), E>>,
{
    let bound = async {
        let addr = config::parse_listen(config.listen())?;
        listen(addr).map_err(|err| {
            ConfigError::invalid("listen", format!("cannot listen on {addr}: {err}"))
        })
    };
    let outcome = match bound.await {
        Ok(listener) => match telemetry::init(name, config.common()) {
            Ok(telemetry) => {
                let served = run(config, listener, crate::shutdown::on_signal()).await;
                // The exporter blocks while it flushes; keep that off the runtime's workers.
                let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
                served.map_err(|err| chain(&err))
            }
            Err(err) => Err(chain(&err)),
        },
        Err(err) => Err(chain(&err)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(name, &message),
    }
}

/// Connections the kernel may complete before this process accepts them (the kernel caps it
/// at `net.core.somaxconn`). tokio's default, 1,024, overflowed in the benchmark's bursts of
/// 1,500 concurrent connects on a busy machine: the kernel dropped the handshakes
/// (`ListenOverflows` in /proc/net/netstat) and 1-2% of the clients saw their connection
/// closed before the upgrade's answer, where nats-server (which listens with somaxconn)
/// lost none.
const BACKLOG: u32 = 4096;

/// Binds `addr` as both binaries do: `SO_REUSEADDR`, a backlog of 4,096 (see `BACKLOG`).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted process may bind while old connections of
    // its predecessor linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

fn fail(name: &str, message: &str) -> ExitCode {
    eprintln!("{name}: {message}");
    ExitCode::FAILURE
}

/// An error and its sources, joined by ": ".
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
