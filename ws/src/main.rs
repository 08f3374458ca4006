use std::process::ExitCode;

fn main() -> ExitCode {
    fanout::process::main::<fanout_ws::Config, _, _>("fanout-ws", fanout_ws::run)
}
