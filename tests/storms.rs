//! Short runs of the two fault benchmarks, checked by what they count:
//! - `fanout-bench chaos --minutes 1 --short --seed 7`: a tier in network namespaces of its
//!   own (3 NATS servers, R3; 2 APIs; 4 ws nodes) under kills, pauses, partitions and
//!   restarts; every acknowledged event reaches every subscriber (WebSocket, SSE,
//!   long-polling) once and in order, none `recovered: false`, presence exact after each
//!   fault, every process within its memory budget. Needs root (network namespaces).
//! - `fanout-bench storm --clients 3000 --nodes 3`: `kill -9` of the busiest node, then a
//!   rolling restart: every client back and resumed, nothing missed or twice.
//!
//! The full runs (30 minutes; 100,000 clients) are in README.md, "Storms and chaos".

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// One at a time: each loads both cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `fanout-bench` with `args`; its results (the JSON it writes) and what it printed.
fn bench(args: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.json");
    let output = Command::new(binary("fanout-bench"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("fanout-bench runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "fanout-bench {args:?}:\n{said}");
    let text = std::fs::read_to_string(&out)
        .unwrap_or_else(|e| panic!("no results from fanout-bench {args:?} ({e}):\n{said}"));
    println!("{said}");
    (serde_json::from_str(&text).unwrap(), said)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[tokio::test]
async fn a_short_chaos_run_loses_nothing_and_leaves_no_ghost() {
    let _one = SERIAL.lock().await;
    assert!(
        is_root(),
        "chaos makes network namespaces: run the tests as root (CI does)"
    );
    let (result, said) = tokio::task::spawn_blocking(|| {
        bench(&["chaos", "--minutes", "1", "--short", "--seed", "7"])
    })
    .await
    .unwrap();
    assert!(result["faults"].as_u64().unwrap() >= 5, "{result}");
    assert!(result["acknowledged"].as_u64().unwrap() > 100, "{result}");
    for zero in [
        "lost",
        "duplicated",
        "reordered",
        "unrecovered",
        "presence_errors",
    ] {
        assert_eq!(result[zero], 0, "{zero}: {result}");
    }
    assert_eq!(result["over_budget"], serde_json::json!([]), "{result}");
    // Nothing left behind: no namespace or bridge of the run (named after its process id,
    // which its logs' directory carries: /tmp/fanout-chaos-<pid>).
    let pid: u32 = said
        .split("fanout-chaos-")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("no logs' directory in:\n{said}"));
    let prefix = format!("fc{}-", pid % 10_000);
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&namespaces.stdout).to_string();
    assert!(
        !left.lines().any(|l| l.starts_with(&prefix)),
        "{prefix}: {left}"
    );
    let links = Command::new("ip").args(["link", "show"]).output().unwrap();
    let bridge = format!("fcbr{}:", pid % 10_000);
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&bridge),
        "{bridge} left behind"
    );
}

#[tokio::test]
async fn a_short_storm_brings_every_client_back_with_nothing_missed() {
    let _one = SERIAL.lock().await;
    let (result, _) = tokio::task::spawn_blocking(|| {
        bench(&[
            "storm",
            "--clients",
            "3000",
            "--nodes",
            "3",
            "--quiet",
            "3",
            "--shared",
            "30",
        ])
    })
    .await
    .unwrap();
    assert_eq!(result["clients"], 3000, "{result}");
    assert!(result["published"].as_u64().unwrap() > 0, "{result}");
    for zero in ["missing", "duplicates", "unrecovered"] {
        assert_eq!(result[zero], 0, "{zero}: {result}");
    }
    // Every client came back after each fault (a time, not a timeout's NaN: null in JSON).
    assert!(result["kill"]["recovery_secs"].is_f64(), "{result}");
    assert!(
        result["kill"]["reconnects"].as_u64().unwrap() > 0,
        "{result}"
    );
    assert!(result["rolling"]["recovery_secs"].is_f64(), "{result}");
}
