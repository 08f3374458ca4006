use std::process::ExitCode;

fn main() -> ExitCode {
    fanout::process::main::<fanout_ws::Config, _, _>(
        "fanout-ws",
        "fanout's realtime node: holds clients over WebSocket, SSE and long-polling",
        fanout_ws::run,
    )
}
