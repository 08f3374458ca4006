use std::process::ExitCode;

fn main() -> ExitCode {
    fanout::process::main::<fanout_all_in_one::Config, _, _>("fanout", fanout_all_in_one::run)
}
