use std::process::ExitCode;

fn main() -> ExitCode {
    fanout::process::main::<fanout_all_in_one::Config, _, _>(
        "fanout",
        "fanout in one process: the API, a ws node and (without FANOUT_NATS_URL) its own nats-server",
        fanout_all_in_one::run,
    )
}
