//! `make run`'s script, started as a person would: it prints where to go, one POST reaches a
//! client on each node, and ctrl-c (SIGINT to its process group) leaves no process behind.

mod common;

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::*;

/// A base port with `count` free ports after it (this checks, it cannot reserve).
fn free_ports(count: u16) -> u16 {
    for base in (20_000..40_000).step_by(97) {
        let free = (0..count).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no {count} free consecutive ports");
}

/// Every descendant of `pid`, from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let parent = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((child, parent))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Alive and not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()
                .map(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Reads `lines` into `output` until one says `ctrl-c stops everything` (bounded by `bound`).
fn until_ready(lines: &mpsc::Receiver<String>, output: &mut Vec<String>, bound: Duration) {
    let deadline = std::time::Instant::now() + bound;
    while !output
        .iter()
        .any(|l: &String| l.contains("ctrl-c stops everything"))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => output.push(line),
            Err(_) => panic!("make run did not get ready:\n{}", output.join("\n")),
        }
    }
}

/// Sends the script's process group SIGINT (ctrl-c) and waits until it and every process it
/// started have ended.
async fn interrupt(child: &mut std::process::Child, tree: &[u32]) {
    let status = Command::new("kill")
        .args(["-INT", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = within("make run to stop", async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(exit.success(), "the script exited with {exit}");
    eventually("every process of make run to end", || async move {
        tree.iter().all(|pid| !running(*pid))
    })
    .await;
}

/// Starts `script` as `make run` does, in its own process group, with `env`, the built
/// binaries and nats-server, and its data in `run_dir`.
fn spawn_script(
    script: &str,
    run_dir: &std::path::Path,
    env: &[(&str, String)],
) -> std::process::Child {
    // `env --default-signal=INT`: a shell started with SIGINT ignored (as CI may do for
    // background jobs) could not trap it; a terminal's ctrl-c always arrives.
    Command::new("env")
        .arg("--default-signal=INT")
        .arg(workspace().join(script))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUN_DIR", run_dir)
        .env("NATS_SERVER_BIN", nats_server_bin())
        .env("BIN", binary("fanout-ws").parent().unwrap())
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Every line the child writes, on a channel.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let (lines_tx, lines) = mpsc::channel::<String>();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = lines_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_run_regions_delivers_across_regions_and_ctrl_c_stops_everything() {
    // Every port run-geo.sh uses for 2 regions, shifted by an offset where all are free.
    let ports = |offset: u16| -> Vec<u16> {
        let mut ports = Vec::new();
        for r in 0..2u16 {
            ports.extend([8080, 8081, 8082].map(|p| offset + p + 100 * r));
            for i in 0..3u16 {
                ports.extend([4222, 8222, 6222, 7222, 7322].map(|p| offset + p + 10 * r + i));
            }
        }
        ports
    };
    let offset = [20_000u16, 21_000, 22_000, 23_000, 24_000, 25_000]
        .into_iter()
        .find(|&o| {
            ports(o)
                .iter()
                .all(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        })
        .expect("free ports for make run REGIONS=2");
    let run_dir = tempfile::tempdir().unwrap();
    let mut child = spawn_script(
        "scripts/run-geo.sh",
        run_dir.path(),
        &[
            ("REGIONS", "2".into()),
            ("PORT_OFFSET", offset.to_string()),
            ("GEO_DELAY_MS", "40".into()),
        ],
    );
    let lines = lines_of(&mut child);
    let mut output = Vec::new();
    until_ready(&lines, &mut output, WAIT * 4);
    let text = output.join("\n");
    for prefix in [
        "[nats-eu-0]",
        "[nats-us-2]",
        "[api-eu]",
        "[api-us]",
        "[ws-us-2]",
        "[wan]",
    ] {
        assert!(text.contains(prefix), "no {prefix} lines:\n{text}");
    }
    let api_eu = Server::external(format!("127.0.0.1:{}", offset + 8080).parse().unwrap());
    let us_ws = format!("ws://127.0.0.1:{}/ws", offset + 8182);
    // The us node hears the eu region once its mirror of it is in touch.
    let ready = format!("http://127.0.0.1:{}/readyz", offset + 8182);
    eventually_within(WAIT * 4, "us's mirror of eu", || async {
        let body: serde_json::Value = match reqwest::get(&ready).await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => return false,
        };
        body["regions"]["eu"] == "current"
    })
    .await;
    let mut client = Client::connect_url(&us_ws).await;
    assert_eq!(client.welcome["region"], "us");
    client.subscribe("room").await;
    let seq = publish(&api_eu, "room", &serde_json::json!({"from": "eu"})).await;
    let event = client.event().await;
    assert_eq!(
        (event["region"].as_str(), event["seq"].as_u64()),
        (Some("eu"), Some(seq))
    );

    let tree = descendants(child.id());
    assert!(
        tree.len() >= 13,
        "6 nats-servers, 6 fanout processes and the proxy: {tree:?}"
    );
    interrupt(&mut child, &tree).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_run_serves_every_node_and_ctrl_c_stops_everything() {
    let base = free_ports(5); // API, 2 ws nodes, NATS, NATS monitoring
    let run_dir = tempfile::tempdir().unwrap();
    let mut child = spawn_script(
        "scripts/run.sh",
        run_dir.path(),
        &[
            ("WS", "2".into()),
            ("API_PORT", base.to_string()),
            ("NATS_PORT", (base + 3).to_string()),
            ("NATS_MONITOR_PORT", (base + 4).to_string()),
        ],
    );
    let lines = lines_of(&mut child);
    let mut output = Vec::new();
    until_ready(&lines, &mut output, WAIT);
    let text = output.join("\n");
    assert!(
        text.contains(&format!("http://localhost:{base}/?node=1")),
        "{text}"
    );
    for prefix in ["[nats]", "[api]", "[ws-1]", "[ws-2]"] {
        assert!(text.contains(prefix), "no {prefix} lines:\n{text}");
    }

    let api = Server::external(format!("127.0.0.1:{base}").parse().unwrap());
    let mut clients = Vec::new();
    for (i, port) in [(1, base + 1), (2, base + 2)] {
        let client = Client::connect_url(&format!("ws://127.0.0.1:{port}/ws")).await;
        assert_eq!(client.welcome["node"], format!("ws-{i}"));
        clients.push(client);
    }
    let (status, _) = post_raw(&api, "/ping", "").await;
    assert_eq!(status, 200);
    for client in &mut clients {
        assert!(client.event().await["data"]["sendTime"].is_string());
    }
    // The page is served, with the nodes make run started.
    let config: serde_json::Value = reqwest::get(api.url("/v1/config"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["nodes"][1]["name"], "ws-2");

    let tree = descendants(child.id());
    assert!(
        tree.len() >= 4,
        "expected nats, api and two nodes: {tree:?}"
    );
    // The servers are gone when the script exits; the log-prefixing seds follow on EOF.
    interrupt(&mut child, &tree).await;
    for client in &mut clients {
        assert_eq!(
            client.closed().await.said(),
            Closed::Code(1001, "server shutting down: reconnect elsewhere".into())
        );
    }
}
