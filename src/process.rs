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
/// logging and tracing, binds the listen address, and runs `run` until SIGTERM or ctrl-c;
/// then flushes pending spans. Any error ends the process with status 1 and one line on
/// stderr naming the cause.
pub async fn main<C, Fut, E>(
    name: &'static str,
    run: impl FnOnce(C, TcpListener, CancellationToken) -> Fut,
) -> ExitCode
where
    C: Settings,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error + 'static,
{
    let usage = format!(
        "usage: {name} [--config FILE]\n\
         settings come from FILE (TOML) and FANOUT_* environment variables; see README.md"
    );
    let started = async {
        let file = config::file_from_args(std::env::args().skip(1), &usage)?;
        let config = C::load(file.as_deref())?;
        let addr = config::parse_listen(config.listen())?;
        let listener = TcpListener::bind(addr).await.map_err(|err| {
            ConfigError::invalid("listen", format!("cannot listen on {addr}: {err}"))
        })?;
        Ok::<_, ConfigError>((config, listener))
    };
    let outcome = match started.await {
        Ok((config, listener)) => match telemetry::init(name, config.common()) {
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
        Err(message) => {
            eprintln!("{name}: {message}");
            ExitCode::FAILURE
        }
    }
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
