use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    fanout::process::main(
        "fanout-ws",
        fanout_ws::Config::load,
        |config| &config.listen,
        fanout_ws::run,
    )
    .await
}
