//! The integration tests, one binary with a module per subject: each starts real nats-servers
//! and the workspace's binaries (or a tier in-process) through the test kit (`fanout-testkit`,
//! `common/`). The tests that need the ecosystem's own programs (a browser, Docker, npm,
//! Python's tools, promtool, `make`) are files of their own in `tests/`, each a binary.
//!
//! One module: `cargo test --test integration faults::`; each module alone, RUNS times, with
//! both cores busy: `make test-alone STRESS=1 FILES="faults presence"`.

#[path = "../common/mod.rs"]
mod common;

mod admission;
mod all_in_one;
mod auth;
mod batch;
mod bus;
mod canary;
mod compression;
mod conformance;
mod control;
mod discovery;
mod errors;
mod faults;
mod fuzz_corpus;
mod hostile;
mod http_transports;
mod layers;
mod presence;
mod profiling;
mod proxy;
mod reconnects;
mod regions;
mod resilience;
mod resume;
mod secure;
mod soak;
mod telemetry;
mod tier;
mod volatile;
mod webhooks;
mod webtransport;
