use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    fanout::process::main::<fanout_api::Config, _, _>("fanout-api", fanout_api::run).await
}
