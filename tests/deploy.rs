//! The Docker side, read rather than run (tests/compose.rs runs both compose files on a real
//! engine): what a run would only show as a confusing failure or not at all. `nats.conf`
//! through `nats-server -t`; every variable the files set is one the binaries read (a typo
//! would be ignored in silence); the files pass the compose-spec schema of Compose v2 (the
//! run uses Compose v1); the edge, the replicas' URLs and the page agree on one port; and
//! the Dockerfile copies every workspace member's manifest and names the Rust we test with.

mod common;

use std::{collections::BTreeSet, process::Command};

use common::*;
use fanout::config::Settings;
use serde_norway::Value;

fn compose() -> Value {
    compose_file("docker-compose.yml")
}

fn compose_file(name: &str) -> Value {
    let text = std::fs::read_to_string(workspace().join(name)).unwrap();
    let mut value: Value = serde_norway::from_str(&text).unwrap();
    // Resolve the `<<: *anchor` merge keys, which also appear nested (environment:).
    fn merge_all(value: &mut Value) {
        value.apply_merge().unwrap();
        match value {
            Value::Mapping(map) => map.values_mut().for_each(merge_all),
            Value::Sequence(seq) => seq.iter_mut().for_each(merge_all),
            _ => {}
        }
    }
    merge_all(&mut value);
    value
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let service = &compose["services"][name];
    assert!(
        service.is_mapping(),
        "docker-compose.yml has no service {name}"
    );
    service
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn environment(service: &Value) -> Vec<(String, String)> {
    service["environment"]
        .as_mapping()
        .map(|env| env.iter().map(|(k, v)| (text(k), text(v))).collect())
        .unwrap_or_default()
}

fn ports(service: &Value) -> Vec<String> {
    service["ports"]
        .as_sequence()
        .map(|ports| ports.iter().map(text).collect())
        .unwrap_or_default()
}

/// The NATS version `make test` installs (and the tests run against).
fn tested_nats_version() -> String {
    let makefile = std::fs::read_to_string(workspace().join("Makefile")).unwrap();
    makefile
        .lines()
        .find_map(|l| l.strip_prefix("NATS_VERSION"))
        .and_then(|l| l.split('=').nth(1))
        .map(|v| v.trim().to_string())
        .expect("Makefile sets NATS_VERSION")
}

#[test]
fn nats_conf_is_valid_for_every_cluster_node() {
    for name in ["nats-1", "nats-2", "nats-3"] {
        let output = Command::new(nats_server_bin())
            .args(["-t", "-c"])
            .arg(workspace().join("nats.conf"))
            .env("NATS_SERVER_NAME", name)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "nats-server -t for {name}: {said}");
        assert!(said.contains("is valid"), "{said}");
    }
    let conf = std::fs::read_to_string(workspace().join("nats.conf")).unwrap();
    for route in [
        "nats-route://nats-1:6222",
        "nats-route://nats-2:6222",
        "nats-route://nats-3:6222",
    ] {
        assert!(conf.contains(route), "nats.conf lacks the route {route}");
    }
    assert!(
        conf.contains("jetstream"),
        "nats.conf must enable JetStream"
    );
    assert!(conf.contains("server_name: $NATS_SERVER_NAME"));
}

#[test]
fn compose_has_the_promised_topology() {
    let compose = compose();
    let services: BTreeSet<String> = compose["services"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(text)
        .collect();
    let expected = ["api", "edge", "jaeger", "nats-1", "nats-2", "nats-3", "ws"];
    assert_eq!(services, expected.iter().map(|s| s.to_string()).collect());

    // The NATS cluster: the version the tests use, nats.conf, a name each, JetStream storage.
    let version = tested_nats_version();
    for name in ["nats-1", "nats-2", "nats-3"] {
        let nats = service(&compose, name);
        let image = text(&nats["image"]);
        assert!(
            image.starts_with(&format!("nats:{version}")),
            "{name} runs {image}, tests use {version}"
        );
        let command: Vec<String> = nats["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(text)
            .collect();
        assert_eq!(command, ["--config", "/etc/nats/nats.conf"]);
        let volumes: Vec<String> = nats["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(text)
            .collect();
        assert!(
            volumes.contains(&"./nats.conf:/etc/nats/nats.conf:ro".to_string()),
            "{volumes:?}"
        );
        assert!(
            volumes.contains(&format!("{name}:/data")),
            "{name} keeps JetStream data in a volume"
        );
        assert_eq!(
            environment(nats),
            [("NATS_SERVER_NAME".to_string(), name.to_string())]
        );
        let check = nats["healthcheck"]["test"].as_sequence().unwrap();
        assert!(
            text(check.last().unwrap()).contains(":8222/healthz"),
            "{check:?}"
        );
    }

    // Jaeger v2, with OTLP and the UI.
    let jaeger = service(&compose, "jaeger");
    assert!(text(&jaeger["image"]).starts_with("jaegertracing/jaeger:2."));
    assert_eq!(ports(jaeger), ["16686:16686", "4317:4317", "4318:4318"]);

    // fanout: both talk to all three NATS servers and keep 3 stream replicas.
    let api = service(&compose, "api");
    let ws = service(&compose, "ws");
    for (name, svc) in [("api", api), ("ws", ws)] {
        let env: std::collections::HashMap<_, _> = environment(svc).into_iter().collect();
        assert_eq!(
            env["FANOUT_NATS_URL"], "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222",
            "{name}"
        );
        assert_eq!(env["FANOUT_HISTORY_REPLICAS"], "3", "{name}");
        assert_eq!(
            env["FANOUT_OTLP_ENDPOINT"], "http://jaeger:4318",
            "{name} traces to Jaeger"
        );
        assert_eq!(text(&svc["build"]["target"]), name);
        for nats in ["nats-1", "nats-2", "nats-3"] {
            assert_eq!(
                text(&svc["depends_on"][nats]["condition"]),
                "service_healthy"
            );
        }
    }
    assert_eq!(ports(api), ["8080:8080"]);

    // ws replicas: not published; each announces its own URL through the edge's one port,
    // and before any has, the page offers that port (any replica).
    let replicas = ws["deploy"]["replicas"].as_u64().unwrap();
    assert!(replicas >= 2, "{replicas} ws replicas");
    assert!(
        ports(ws).is_empty(),
        "the replicas are reached through the edge"
    );
    let edge = service(&compose, "edge");
    assert_eq!(ports(edge), ["8081:8081"]);
    assert_eq!(text(&edge["environment"]["WS_SERVICE"]), "ws");
    let ws_env: std::collections::HashMap<_, _> = environment(ws).into_iter().collect();
    assert_eq!(
        ws_env["FANOUT_LISTEN"], "0.0.0.0:8081",
        "the port the edge forwards to"
    );
    assert_eq!(
        ws_env["FANOUT_PUBLIC_URL"],
        "ws://{host}:8081/node/{node}/ws"
    );
    assert!(
        !ws_env.contains_key("FANOUT_NODE_ID"),
        "replicas must not share a node id: the edge finds each by its host name"
    );
    let api_env: std::collections::HashMap<_, _> = environment(api).into_iter().collect();
    assert_eq!(api_env["FANOUT_WS_URLS"], "any=ws://{host}:8081/ws");
    let jaeger_ui = &api_env["FANOUT_JAEGER_UI"];
    assert!(
        jaeger_ui.ends_with(":16686"),
        "the page links traces to Jaeger's UI: {jaeger_ui}"
    );
}

#[test]
fn compose_and_dockerfile_only_set_variables_the_binaries_read() {
    let api_reads = fanout_api::Config::env_names();
    let ws_reads = fanout_ws::Config::env_names();
    let compose = compose();
    for (name, reads) in [("api", &api_reads), ("ws", &ws_reads)] {
        for (key, _) in environment(service(&compose, name)) {
            if key.starts_with("FANOUT_") {
                assert!(
                    reads.contains(&key),
                    "compose sets {key} on {name}, which fanout-{name} does not read"
                );
            }
        }
    }
    let dockerfile = std::fs::read_to_string(workspace().join("Dockerfile")).unwrap();
    for line in dockerfile.lines().filter(|l| l.starts_with("ENV FANOUT_")) {
        let key = line["ENV ".len()..].split('=').next().unwrap();
        assert!(
            api_reads.contains(&key.to_string()) && ws_reads.contains(&key.to_string()),
            "{line}"
        );
    }
    // And the README documents every variable either binary reads.
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    for key in api_reads.iter().chain(&ws_reads) {
        assert!(
            readme.contains(&format!("`{key}`")),
            "README does not document {key}"
        );
    }
}

#[test]
fn dockerfile_builds_small_non_root_images_with_health_checks() {
    let dockerfile = std::fs::read_to_string(workspace().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(stages, ["build", "runtime", "api", "ws"]);
    assert!(dockerfile.contains("FROM debian:bookworm-slim AS runtime"));
    assert!(
        dockerfile.contains("USER 10001:10001"),
        "runtime images run as a non-root user"
    );
    // Cargo loads the whole workspace: every member's manifest must be in the build stage.
    let manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    let members = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .expect("the workspace lists its members");
    for member in members.trim_matches(|c| c == '[' || c == ']').split(',') {
        let member = member.trim().trim_matches('"');
        if member != "." {
            let copy = format!("COPY {member}/Cargo.toml {member}/");
            let present = dockerfile.lines().any(|line| line.trim() == copy);
            assert!(present, "the Dockerfile misses `{copy}`");
        }
    }
    // Dependencies are built from the manifests alone, before the sources are copied.
    let deps = dockerfile.find("cargo build").unwrap();
    assert!(deps < dockerfile.find("COPY src src").unwrap());
    for (port, binary) in [(8080, "fanout-api"), (8081, "fanout-ws")] {
        assert!(dockerfile.contains(&format!("curl -fsS http://127.0.0.1:{port}/readyz")));
        assert!(dockerfile.contains(&format!("ENTRYPOINT [\"{binary}\"]")));
    }
    let rust = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .unwrap();
    let toolchain = String::from_utf8(
        Command::new("rustc")
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        toolchain.starts_with(&format!("rustc {rust}")),
        "Dockerfile builds with Rust {rust}, tests use {toolchain}"
    );
}

/// Certificates from scripts/certs.sh in a temporary directory, and `conf` with its
/// `/certs/` paths pointing there.
fn with_test_certs(conf: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let certs = dir.join("certs");
    test_certs(&certs, "nats");
    let text = std::fs::read_to_string(workspace().join(conf))
        .unwrap()
        .replace("/certs/", &format!("{}/", certs.display()));
    let path = dir.join(conf.replace('/', "_"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn geo_nats_configs_are_valid_with_tls_on_every_link() {
    let dir = tempfile::tempdir().unwrap();
    for region in ["eu", "us"] {
        let conf = format!("deploy/geo/nats-{region}.conf");
        let text = std::fs::read_to_string(workspace().join(&conf)).unwrap();
        // TLS for clients, routes and gateways; the cluster is named after the region.
        assert_eq!(
            text.matches("tls {").count(),
            3,
            "{conf}: a tls block per link"
        );
        assert!(text.contains(&format!("name: {region}\n")), "{conf}");
        let path = with_test_certs(&conf, dir.path());
        for i in 1..=3 {
            let check = Command::new(nats_server_bin())
                .env("NATS_SERVER_NAME", format!("nats-{region}-{i}"))
                .args(["-t", "-c"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "nats-server -t {conf}: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
}

#[test]
fn geo_compose_has_two_regions_each_on_its_own_cluster_over_tls() {
    let compose = compose_file("docker-compose.geo.yml");
    let version = tested_nats_version();
    let api_reads = fanout_api::Config::env_names();
    let ws_reads = fanout_ws::Config::env_names();
    for region in ["eu", "us"] {
        for i in 1..=3 {
            let nats = service(&compose, &format!("nats-{region}-{i}"));
            assert_eq!(text(&nats["image"]), format!("nats:{version}-alpine"));
            let volumes: Vec<String> = nats["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(text)
                .collect();
            assert!(
                volumes.contains(&format!(
                    "./deploy/geo/nats-{region}.conf:/etc/nats/nats.conf:ro"
                )),
                "{volumes:?}"
            );
        }
        for (kind, reads) in [("api", &api_reads), ("ws", &ws_reads)] {
            let fanout = service(&compose, &format!("{kind}-{region}"));
            let env: std::collections::BTreeMap<String, String> =
                environment(fanout).into_iter().collect();
            assert_eq!(env["FANOUT_REGION"], region);
            assert_eq!(env["FANOUT_REGIONS"], "eu,us");
            assert_eq!(env["FANOUT_HISTORY_REPLICAS"], "3");
            let urls: Vec<&str> = env["FANOUT_NATS_URL"].split(',').collect();
            assert_eq!(urls.len(), 3);
            for url in urls {
                assert!(
                    url.starts_with(&format!("tls://nats-{region}-")),
                    "{kind}-{region} must use its own region's servers over TLS: {url}"
                );
            }
            assert!(env.contains_key("FANOUT_NATS_TLS_CA"));
            for key in env.keys().filter(|k| k.starts_with("FANOUT_")) {
                assert!(
                    reads.contains(key),
                    "{kind}-{region} sets {key}, which it does not read"
                );
            }
        }
    }
    assert!(compose["services"]["jaeger"].is_mapping(), "one Jaeger");
    // Each region's replicas behind its own edge, on the port their URLs name.
    for (region, port) in [("eu", "8081"), ("us", "8181")] {
        let edge = service(&compose, &format!("edge-{region}"));
        assert_eq!(ports(edge), [format!("{port}:8081")]);
        assert_eq!(
            text(&edge["environment"]["WS_SERVICE"]),
            format!("ws-{region}")
        );
        let ws = service(&compose, &format!("ws-{region}"));
        assert!(ports(ws).is_empty());
        let env: std::collections::BTreeMap<String, String> = environment(ws).into_iter().collect();
        assert_eq!(
            env["FANOUT_PUBLIC_URL"],
            format!("ws://{{host}}:{port}/node/{{node}}/ws")
        );
    }
}

/// `tool` of `.tools/venv` on `args` in the workspace; panics with its output unless it
/// succeeds.
fn venv_check(tool: &str, args: &[&str]) -> String {
    let (stdout, stderr) = succeeds(
        Command::new(venv_tool(tool))
            .args(args)
            .current_dir(workspace()),
    );
    stdout + &stderr
}

#[test]
fn compose_files_pass_the_compose_spec_schema() {
    venv_check(
        "check-jsonschema",
        &[
            "--builtin-schema",
            "vendor.compose-spec",
            "docker-compose.yml",
            "docker-compose.geo.yml",
        ],
    );
}

/// Every YAML document of `deploy/kubernetes/<file>`.
fn manifests(file: &str) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(workspace().join("deploy/kubernetes").join(file)).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// A number, or a string of one (ConfigMap values are strings).
fn number(value: &Value) -> u64 {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not a number: {value:?}"))
}

#[test]
fn kubernetes_manifests_validate_and_cover_readiness_drain_budgets_and_settings() {
    let files = ["configmap.yaml", "secret.yaml", "api.yaml", "ws.yaml"];
    let paths: Vec<String> = files
        .iter()
        .map(|f| format!("deploy/kubernetes/{f}"))
        .collect();
    let mut args = vec!["--strict"];
    args.extend(paths.iter().map(String::as_str));
    let report = venv_check("kubernetes-validate", &args);
    assert_eq!(report.matches("passed").count(), 8, "{report}");

    // The kustomization lists exactly these.
    let kustomization = &manifests("kustomization.yaml")[0];
    let listed: Vec<String> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(text)
        .collect();
    assert_eq!(listed, files);

    let config = &manifests("configmap.yaml")[0];
    let secret = &manifests("secret.yaml")[0];
    let setting = |key: &str| number(&config["data"][key]);
    let api_reads = fanout_api::Config::env_names();
    let ws_reads = fanout_ws::Config::env_names();
    for (source, keys) in [
        ("configmap", &config["data"]),
        ("secret", &secret["stringData"]),
    ] {
        for (key, _) in keys.as_mapping().unwrap() {
            let key = text(key);
            assert!(
                api_reads.contains(&key) || ws_reads.contains(&key),
                "the {source} sets {key}, which neither binary reads"
            );
        }
    }

    for (file, binary, reads) in [
        ("api.yaml", "fanout-api", &api_reads),
        ("ws.yaml", "fanout-ws", &ws_reads),
    ] {
        let docs = manifests(file);
        let deployment = of_kind(&docs, "Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert!(text(&container["image"]).starts_with(binary), "{file}");
        let probe = |name: &str| text(&container[name]["httpGet"]["path"]);
        assert_eq!(probe("readinessProbe"), "/readyz", "{file}");
        assert_eq!(probe("livenessProbe"), "/healthz", "{file}");
        for resource in ["cpu", "memory"] {
            assert!(
                container["resources"]["requests"][resource].is_string(),
                "{file}: no {resource} request"
            );
        }
        assert!(container["resources"]["limits"]["memory"].is_string());
        // Settings from the ConfigMap and the Secret; a bad one fails the init container.
        for pod_container in [container, &pod["initContainers"][0]] {
            let from: Vec<String> = pod_container["envFrom"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|e| {
                    match (
                        e["configMapRef"]["name"].as_str(),
                        e["secretRef"]["name"].as_str(),
                    ) {
                        (Some(name), None) => format!("configmap {name}"),
                        (None, Some(name)) => format!("secret {name}"),
                        _ => panic!("{file}: {e:?}"),
                    }
                })
                .collect();
            assert_eq!(from, ["configmap fanout", "secret fanout"], "{file}");
        }
        let check = &pod["initContainers"][0];
        assert_eq!(text(&check["image"]), text(&container["image"]));
        assert_eq!(text(&check["args"][0]), "--check");
        for env in container["env"].as_sequence().unwrap() {
            let key = text(&env["name"]);
            assert!(
                reads.contains(&key),
                "{file} sets {key}: {binary} does not read it"
            );
        }
        // A disruption budget for the same pods.
        let budget = of_kind(&docs, "PodDisruptionBudget");
        assert_eq!(
            budget["spec"]["selector"], deployment["spec"]["selector"],
            "{file}"
        );
        let service = of_kind(&docs, "Service");
        assert_eq!(
            service["spec"]["selector"],
            deployment["spec"]["selector"]["matchLabels"]
        );
    }

    // The ws nodes' grace period covers the preStop pause, the drain window and the shutdown
    // timeout, so Kubernetes never kills a node in the middle of its drain.
    let ws = manifests("ws.yaml");
    let pod = &of_kind(&ws, "Deployment")["spec"]["template"]["spec"];
    let grace = number(&pod["terminationGracePeriodSeconds"]) * 1000;
    let pre_stop = number(&pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]) * 1000;
    let drain = setting("FANOUT_DRAIN_WINDOW_MS") + setting("FANOUT_SHUTDOWN_TIMEOUT_SECS") * 1000;
    assert!(
        grace > pre_stop + drain,
        "grace {grace} ms <= preStop {pre_stop} ms + drain and shutdown {drain} ms"
    );
    assert_eq!(
        text(&of_kind(&ws, "PodDisruptionBudget")["spec"]["maxUnavailable"]),
        "1"
    );

    // NATS from the official chart: a JetStream cluster as large as the stream's replicas,
    // on the version the tests run.
    let nats = &manifests("nats-values.yaml")[0];
    assert_eq!(
        number(&nats["config"]["cluster"]["replicas"]),
        setting("FANOUT_HISTORY_REPLICAS")
    );
    assert_eq!(nats["config"]["jetstream"]["enabled"], Value::Bool(true));
    // Acknowledged means fsynced (README.md, "What a 202 means").
    assert_eq!(
        text(&nats["config"]["jetstream"]["merge"]["sync_interval"]),
        "always"
    );
    assert_eq!(
        text(&nats["container"]["image"]["tag"]),
        format!("{}-alpine", tested_nats_version())
    );
    assert_eq!(text(&config["data"]["FANOUT_NATS_URL"]), "nats://nats:4222");
}
