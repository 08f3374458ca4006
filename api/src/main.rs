use std::process::ExitCode;

// Measured with `perf record -p <api>` under `fanout-bench publish`: malloc and free were a
// fifth of the API's CPU with glibc's allocator, 3% with mimalloc. (Not in fanout-ws: there
// mimalloc took an idle connection from 3.8 to 4.4 KiB, measured with `fanout-bench idle`.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    fanout::process::main::<fanout_api::Config, _, _>(
        "fanout-api",
        "fanout's stateless HTTP API: stores events in NATS JetStream, answers once stored",
        fanout_api::run,
    )
}
