use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    fanout::process::main::<fanout_ws::Config, _, _>("fanout-ws", fanout_ws::run).await
}
