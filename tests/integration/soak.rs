//! The short form of `make soak-churn` (which runs 30 minutes): 30 seconds of the same run,
//! debug builds: 3 ws nodes, steady WebSocket clients, churning WebSocket, SSE and long-poll
//! clients, presence queries, publishing. Steady clients miss nothing, get nothing twice or
//! out of order, and every ws node's descriptors return to where they were before the churn.
//! (RSS growth needs the long run's warm-up to mean anything: `make soak-churn`.)

use crate::common;

use common::*;
use serde_json::Value;

#[test]
fn a_short_soak_with_churn_loses_nothing_and_leaks_no_descriptors() {
    let out = tempfile::tempdir().unwrap();
    let report = out.path().join("soak.json");
    let bin_dir = binary("fanout-ws").parent().unwrap().to_path_buf();
    let status = std::process::Command::new(binary("fanout-bench"))
        .args([
            "soak-churn",
            "--minutes",
            "0.5",
            "--rate",
            "100",
            "--churners",
            "12",
        ])
        .arg("--out")
        .arg(&report)
        .env("FANOUT_BIN_DIR", &bin_dir)
        .env("NATS_SERVER_BIN", nats_server_bin())
        .status()
        .expect("fanout-bench runs");
    assert!(status.success());
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    println!("{report:#}");
    assert!(report["acknowledged"].as_u64().unwrap() > 100, "{report}");
    assert!(report["churn_lives"].as_u64().unwrap() > 50, "{report}");
    for key in [
        "steady_missing",
        "steady_duplicates",
        "steady_out_of_order",
        "publish_errors",
    ] {
        assert_eq!(report[key], 0, "{key}: {report}");
    }
    for node in ["ws-1", "ws-2", "ws-3"] {
        let p = &report["processes"][node];
        assert!(
            p["fds_peak"].as_u64() > p["fds_before"].as_u64(),
            "{node} saw the churn: {p}"
        );
        assert_eq!(p["fds_after"], p["fds_before"], "{node}: {p}");
    }
}
