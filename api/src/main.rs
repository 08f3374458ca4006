use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    fanout::process::main(
        "fanout-api",
        fanout_api::Config::load,
        |config| &config.listen,
        fanout_api::run,
    )
    .await
}
