//! CPU profiles: `GET /debug/pprof/profile?seconds=N` on both binaries, off unless
//! `FANOUT_PROFILING=true`, behind the API key on the API, one at a time per process, read
//! back with pprof's own protobuf types. The binaries run as processes: the profiler is
//! process-wide, and the test binary's other tests must not be sampled.

use crate::common;

use common::*;
use pprof::protos::Message;
use serde_json::Value;

const KEY: &str = "profiling-test-key";

fn api_env(nats: &NatsServer, profiling: bool) -> Vec<(&'static str, String)> {
    vec![
        ("FANOUT_NATS_URL", nats.url()),
        ("FANOUT_NODE_ID", "api-1".to_string()),
        ("FANOUT_LISTEN", "127.0.0.1:0".to_string()),
        ("FANOUT_API_KEYS", KEY.to_string()),
        ("FANOUT_PROFILING", profiling.to_string()),
    ]
}

fn ws_env(nats: &NatsServer, profiling: bool) -> Vec<(&'static str, String)> {
    let mut env = ws_process_env(&nats.url(), "ws-1", 0);
    env.push(("FANOUT_PROFILING", profiling.to_string()));
    env
}

/// `GET path` on `server`, with the API key: status and body.
async fn get(server: &Server, path: &str) -> (u16, bytes::Bytes) {
    let response = reqwest::Client::new()
        .get(server.url(path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.bytes().await.unwrap())
}

fn error_code(body: &[u8]) -> String {
    let body: Value = serde_json::from_slice(body).unwrap();
    body["error"]["code"].as_str().unwrap().to_string()
}

/// Takes a one-second profile of `server` while `load` keeps it busy; checks it is pprof's
/// `Profile` of CPU time and returns it.
async fn profile(server: &Server, load: &Server) -> pprof::protos::Profile {
    let taking = get(server, "/debug/pprof/profile?seconds=1");
    let busy = async {
        let client = reqwest::Client::new();
        loop {
            let _ = client.get(load.url("/metrics")).send().await;
        }
    };
    let (status, body) = tokio::select! {
        answer = taking => answer,
        never = busy => never,
    };
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let profile = pprof::protos::Profile::decode(body).expect("pprof's protobuf Profile");
    let text = |i: i64| profile.string_table[i as usize].as_str();
    let types: Vec<_> = profile
        .sample_type
        .iter()
        .map(|t| (text(t.ty), text(t.unit)))
        .collect();
    assert!(types.contains(&("cpu", "nanoseconds")), "{types:?}");
    assert!(
        profile.duration_nanos >= 1_000_000_000,
        "{}",
        profile.duration_nanos
    );
    profile
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_binaries_serve_cpu_profiles_one_at_a_time() {
    let nats = NatsServer::start();
    let api = Process::start("fanout-api", &api_env(&nats, true));
    let ws = Process::start("fanout-ws", &ws_env(&nats, true));
    let (api, ws) = (api.server(), ws.server());

    // The API's is behind its key, as /v1/* is.
    let status = reqwest::get(api.url("/debug/pprof/profile?seconds=1"))
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401);
    let (status, body) = get(&ws, "/debug/pprof/profile?seconds=0").await;
    assert_eq!((status, error_code(&body).as_str()), (400, "invalid_query"));

    // A profile of each, taken while the profiled process serves requests: samples of its
    // own code.
    for (server, name) in [(&api, "fanout_api"), (&ws, "fanout_ws")] {
        let profile = profile(server, server).await;
        let ours = profile
            .string_table
            .iter()
            .any(|s| s.contains(name) || s.contains("fanout::"));
        println!(
            "{name}: {} samples, {} strings",
            profile.sample.len(),
            profile.string_table.len()
        );
        assert!(
            !profile.sample.is_empty() && ours,
            "{name}: no sample of its own code"
        );
    }

    // One at a time: while a long one runs, another is refused; the long one ends when its
    // client goes away.
    let long = tokio::spawn({
        let url = ws.url("/debug/pprof/profile?seconds=300");
        async move { reqwest::get(url).await.map(|r| r.status().as_u16()) }
    });
    eventually("the long profile to be under way", || async {
        metric(&ws, "fanout_profiling_active").await == Some(1.0)
    })
    .await;
    let (status, body) = get(&ws, "/debug/pprof/profile?seconds=1").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (409, "profiling_busy")
    );
    long.abort();
    eventually("the abandoned profile to end", || async {
        metric(&ws, "fanout_profiling_active").await == Some(0.0)
    })
    .await;
    profile(&ws, &ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiling_is_off_by_default() {
    let nats = NatsServer::start();
    let api = Process::start("fanout-api", &api_env(&nats, false));
    let ws = Process::start("fanout-ws", &ws_env(&nats, false));
    for server in [api.server(), ws.server()] {
        let (status, body) = get(&server, "/debug/pprof/profile?seconds=1").await;
        assert_eq!((status, error_code(&body).as_str()), (404, "profiling_off"));
        let message: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            message["error"]["message"]
                .as_str()
                .unwrap()
                .contains("FANOUT_PROFILING=true"),
            "{message}"
        );
    }
}
