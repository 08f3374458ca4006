use std::process::ExitCode;

use anyhow::Context;
use fanout_api::Config;

const USAGE: &str = "usage: fanout-api [--config FILE]\n\
settings come from FILE (TOML) and FANOUT_* environment variables; see README.md";

#[tokio::main]
async fn main() -> ExitCode {
    fanout::telemetry::init_logging();
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line with the whole cause chain, without a backtrace.
            eprintln!("fanout-api: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let file = fanout::config::file_from_args(std::env::args().skip(1), USAGE)?;
    let config = Config::load(file.as_deref())?;
    let addr = fanout::config::parse_listen(&config.listen)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (FANOUT_LISTEN)"))?;
    let shutdown = fanout::shutdown::on_signal();
    fanout_api::run(config, listener, shutdown).await?;
    Ok(())
}
