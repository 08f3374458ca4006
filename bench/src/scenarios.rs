//! The suite `make bench` runs: one table of scenarios. Each scenario runs (against fanout and,
//! where there is one, a baseline: nats-server's WebSocket port, raw JetStream, WebSocket for
//! the HTTP transports) and gives rows of figures, each a number with its baseline and the
//! goal it must meet; the markdown table and the JSON both come from those rows, and each
//! run's full outcome goes into the JSON next to them.

use std::collections::BTreeMap;

use clap::ValueEnum;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    outcome::{Idle, JoinStorm, Presence, Publish, Storm},
    suite::{FanOut, Spec, describe, fan_out, idle, join_storm, publish, storm},
    tier::Paths,
    worker::Target,
};

/// The suite's scenarios, in the order it runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// The API alone: one event per request, and `/v1/batch` against raw JetStream.
    Publish,
    /// One channel: latency (300 × 100), CPU (3,000 × 100, also coalesced), throughput
    /// (3,000 × 1,000), against NATS.
    FanOut,
    /// SSE, WebTransport and MessagePack against WebSocket's JSON, long-polling, and volatile
    /// events as WebTransport datagrams.
    Transports,
    /// 10,000 clients each in a channel of its own and one of 10 shared, against NATS.
    ManyChannels,
    /// Idle memory per connection (WebSocket against NATS, SSE against WebSocket).
    Idle,
    /// Connections per second one node accepts, against NATS.
    Storm,
    /// Latency of steady clients while 12,000 join.
    JoinStorm,
    /// A presence count over 100,000 members.
    Presence,
    /// The app's backend in the loop: connect with the connect hook on against off, rpc
    /// round trips, one user's 1,000 connections over 3 nodes disconnected at once.
    Control,
    /// Pusher's protocol: fan-out CPU against fanout's own protocol (3,000 × 100), and
    /// `POST /apps/{id}/events` with 16 publishers; both against Sockudo 5.2 when installed.
    Pusher,
}

/// What a figure must be.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
    /// At most this many times the baseline.
    AtMostTimesBaseline(f64),
    /// At least this many times the baseline.
    AtLeastTimesBaseline(f64),
    /// A goal stated, not checked.
    Note(&'static str),
}

impl Goal {
    /// Whether `value` meets it (`None`: nothing to check).
    fn met(self, value: f64, baseline: Option<f64>) -> Option<bool> {
        match self {
            Goal::AtMost(limit) => Some(value <= limit),
            Goal::AtLeast(floor) => Some(value >= floor),
            Goal::AtMostTimesBaseline(times) => baseline.map(|b| value <= times * b),
            Goal::AtLeastTimesBaseline(times) => baseline.map(|b| value >= times * b),
            Goal::Note(_) => None,
        }
    }

    fn text(self) -> String {
        match self {
            Goal::AtMost(0.0) => "0".to_string(),
            Goal::AtMost(limit) => format!("≤ {}", number(limit)),
            Goal::AtLeast(floor) => format!("≥ {}", number(floor)),
            Goal::AtMostTimesBaseline(times) => format!("≤ {times}× baseline"),
            Goal::AtLeastTimesBaseline(times) => format!("≥ {times}× baseline"),
            Goal::Note(text) => text.to_string(),
        }
    }
}

/// A goal's number as a reader writes it: 40,000; 1.5.
fn number(value: f64) -> String {
    if value.fract() != 0.0 {
        return value.to_string();
    }
    let digits = format!("{value:.0}");
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub what: &'static str,
    pub fanout: f64,
    /// The baseline's name and its figure.
    pub baseline: Option<(&'static str, f64)>,
    pub goals: Vec<Goal>,
    /// Decimals shown in the table.
    #[serde(skip)]
    pub decimals: usize,
}

impl Figure {
    fn new(what: &'static str, fanout: f64, decimals: usize) -> Figure {
        Figure {
            what,
            fanout,
            baseline: None,
            goals: Vec::new(),
            decimals,
        }
    }

    fn against(mut self, name: &'static str, value: f64) -> Figure {
        self.baseline = Some((name, value));
        self
    }

    fn nats(self, value: f64) -> Figure {
        self.against(NATS, value)
    }

    fn goal(mut self, goal: Goal) -> Figure {
        self.goals.push(goal);
        self
    }

    /// fanout's figure over the baseline's (none when the baseline is 0: missing events).
    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .filter(|(_, b)| *b != 0.0)
            .map(|(_, b)| self.fanout / b)
    }

    /// Whether every checked goal is met (`None`: none is checked).
    pub fn met(&self) -> Option<bool> {
        let baseline = self.baseline.map(|(_, b)| b);
        self.goals
            .iter()
            .filter_map(|g| g.met(self.fanout, baseline))
            .reduce(|a, b| a && b)
    }
}

/// A row of the table: a scenario's run and its figures.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub figures: Vec<Figure>,
}

const NATS: &str = "NATS";

/// The suite's outcome: the rows, and each run's full outcome by name.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub runs: BTreeMap<String, Value>,
}

impl Report {
    fn row(&mut self, scenario: impl Into<String>, figures: Vec<Figure>) {
        self.rows.push(Row {
            scenario: scenario.into(),
            figures,
        });
    }

    fn run(&mut self, name: &str, outcome: impl Serialize) {
        let value = serde_json::to_value(outcome).expect("an outcome is JSON");
        self.runs.insert(name.to_string(), value);
    }

    /// The markdown table: a line per figure.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| scenario | figure | fanout | baseline (NATS WebSocket unless named) | fanout / baseline | target | met |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for row in &self.rows {
            for (i, f) in row.figures.iter().enumerate() {
                let scenario = if i == 0 { row.scenario.as_str() } else { "" };
                let value = |v: f64| format!("{v:.*}", f.decimals);
                let baseline = match f.baseline {
                    Some((NATS, b)) => value(b),
                    Some((name, b)) => format!("{name} {}", value(b)),
                    None => String::new(),
                };
                let ratio = f.ratio().map_or(String::new(), |r| format!("{r:.2}"));
                let goals: Vec<String> = f.goals.iter().map(|g| g.text()).collect();
                let met = match f.met() {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "",
                };
                out.push_str(&format!(
                    "| {scenario} | {} | {} | {baseline} | {ratio} | {} | {met} |\n",
                    f.what,
                    value(f.fanout),
                    goals.join("; ")
                ));
            }
        }
        out
    }

    /// The JSON: the rows (each figure with its ratio and whether it met its goals) and the runs.
    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                let figures: Vec<Value> = row
                    .figures
                    .iter()
                    .map(|f| {
                        json!({"what": f.what, "fanout": f.fanout,
                            "baseline": f.baseline.map(|(name, value)| json!({"name": name, "value": value})),
                            "ratio": f.ratio(), "goals": f.goals, "met": f.met()})
                    })
                    .collect();
                json!({"scenario": row.scenario, "figures": figures})
            })
            .collect();
        json!({"rows": rows, "runs": self.runs})
    }
}

/// What the scenarios share: the sizes, and the WebSocket run SSE compares with.
struct Suite<'a> {
    paths: &'a Paths,
    quick: bool,
    websocket_cpu: Option<FanOut>,
}

impl Suite<'_> {
    /// `n`, or a tenth of it for a quick run.
    fn scale(&self, n: usize) -> usize {
        if self.quick { n / 10 } else { n }
    }

    /// One channel, 100-byte events, each published on its own.
    fn one_channel(&self, clients: usize, rate: u64, secs: u64) -> Spec {
        Spec {
            clients,
            nodes: 3,
            rate,
            secs,
            payload: 100,
            shared: 0,
            coalesce_ms: 0,
            tick_ms: 0,
            threads: 0,
            volatile: false,
        }
    }

    async fn fan_out(&self, name: &str, spec: Spec, target: Target) -> FanOut {
        println!(
            "{name}: {} clients on {} nodes, {} events/s for {} s ({target:?})",
            spec.clients, spec.nodes, spec.rate, spec.secs
        );
        let run = fan_out(self.paths, spec, target).await;
        describe(&format!("{target:?}"), &run);
        run
    }

    async fn run(&mut self, scenario: Scenario, report: &mut Report) {
        match scenario {
            Scenario::Publish => self.publish(report).await,
            Scenario::FanOut => self.one_channel_fan_out(report).await,
            Scenario::Transports => self.transports(report).await,
            Scenario::ManyChannels => self.many_channels(report).await,
            Scenario::Idle => self.idle(report).await,
            Scenario::Storm => self.storm(report).await,
            Scenario::JoinStorm => self.join_storm(report).await,
            Scenario::Presence => self.presence(report).await,
            Scenario::Control => self.control(report).await,
            Scenario::Pusher => self.pusher(report).await,
        }
    }

    async fn publish(&self, report: &mut Report) {
        println!("publish: 16 closed-loop publishers through the API, one event per request");
        let single: Publish = publish(self.paths, 16, 0, 5, 100).await;
        println!("  {single:?}");
        println!("publish: 16 closed-loop publishers, /v1/batch of 100 events");
        let batch: Publish = publish(self.paths, 16, 100, 5, 100).await;
        println!("  {batch:?}");
        println!(
            "raw JetStream: 16 publishers on one connection, 256 acknowledgements in flight each"
        );
        let raw = crate::jetstream::baseline(16, 256, 5, 100).await;
        println!("  {raw:?}");
        let cpu = "server CPU µs per event (API + nats-server)";
        report.row(
            "publish, 16 publishers, one event per request",
            vec![
                Figure::new("acknowledged events/s", single.acked_per_sec, 0)
                    .goal(Goal::AtLeast(40_000.0)),
                Figure::new(cpu, single.server_cpu_us_per_event, 1).goal(Goal::AtMost(30.0)),
                Figure::new("  of which the API", single.api_cpu_us_per_event, 1),
            ],
        );
        report.row(
            "publish, 16 publishers, `/v1/batch` of 100",
            vec![
                Figure::new("acknowledged events/s", batch.acked_per_sec, 0)
                    .against("raw JetStream", raw.acked_per_sec)
                    .goal(Goal::AtLeast(100_000.0)),
                Figure::new(cpu, batch.server_cpu_us_per_event, 1)
                    .against("raw JetStream", raw.server_cpu_us_per_event)
                    .goal(Goal::AtMostTimesBaseline(1.5)),
            ],
        );
        report.run("publish", single);
        report.run("publish_batch", batch);
        report.run("raw_jetstream", raw);
    }

    async fn one_channel_fan_out(&mut self, report: &mut Report) {
        let latency = self.one_channel(300, 100, 10);
        let (f, n) = (
            self.fan_out("fan-out (latency)", latency, Target::Fanout)
                .await,
            self.fan_out("fan-out (latency)", latency, Target::Nats)
                .await,
        );
        let q = |run: &FanOut, q: f64| run.latency.quantile_ms(q);
        report.row(
            format!("fan-out {}×{} ev/s", latency.clients, latency.rate),
            vec![
                Figure::new("p50 latency, ms", q(&f, 0.5), 2).nats(q(&n, 0.5)),
                Figure::new("p99 latency, ms", q(&f, 0.99), 2)
                    .nats(q(&n, 0.99))
                    .goal(Goal::AtMost(2.0)),
                Figure::new("p99.9 latency, ms", q(&f, 0.999), 2).nats(q(&n, 0.999)),
            ],
        );
        report.run("fanout_latency", runs(&latency, &f, &n));

        let cpu = self.one_channel(self.scale(3000), 100, 10);
        let (f, n) = (
            self.fan_out("fan-out (cpu)", cpu, Target::Fanout).await,
            self.fan_out("fan-out (cpu)", cpu, Target::Nats).await,
        );
        report.row(
            format!("fan-out {}×{} ev/s", cpu.clients, cpu.rate),
            vec![
                Figure::new("server CPU µs per delivery", f.cpu_us(), 2)
                    .nats(n.cpu_us())
                    .goal(Goal::AtMostTimesBaseline(0.5)),
                Figure::new("p99 latency, ms", q(&f, 0.99), 2).nats(q(&n, 0.99)),
            ],
        );
        report.run("fanout_cpu", runs(&cpu, &f, &n));
        // The same with fanout writing each channel's events at most every 20 ms, together.
        let coalesced = Spec {
            coalesce_ms: 20,
            ..cpu
        };
        let c = self
            .fan_out(
                "fan-out (cpu), FANOUT_COALESCE_MS=20",
                coalesced,
                Target::Fanout,
            )
            .await;
        report.row(
            "  with `FANOUT_COALESCE_MS=20`",
            vec![
                Figure::new("server CPU µs per delivery", c.cpu_us(), 2).nats(n.cpu_us()),
                Figure::new("p99 latency, ms", q(&c, 0.99), 2).nats(q(&n, 0.99)),
            ],
        );
        report.run(
            "fanout_cpu_coalesce_20ms",
            json!({"spec": format!("{coalesced:?}"), "fanout": c.json()}),
        );
        self.websocket_cpu = Some(f);

        let throughput = self.one_channel(self.scale(3000), 1000, 5);
        let (f, n) = (
            self.fan_out("fan-out (throughput)", throughput, Target::Fanout)
                .await,
            self.fan_out("fan-out (throughput)", throughput, Target::Nats)
                .await,
        );
        report.row(
            format!("fan-out {}×{} ev/s", throughput.clients, throughput.rate),
            vec![
                Figure::new("deliveries/s", f.per_second(), 0)
                    .nats(n.per_second())
                    .goal(Goal::AtLeastTimesBaseline(1.0)),
                Figure::new("missing", f.missing as f64, 0)
                    .nats(n.missing as f64)
                    .goal(Goal::AtMost(0.0)),
                Figure::new("server CPU µs per delivery", f.cpu_us(), 2).nats(n.cpu_us()),
            ],
        );
        report.run("fanout_throughput", runs(&throughput, &f, &n));
    }

    async fn transports(&mut self, report: &mut Report) {
        let cpu = self.one_channel(self.scale(3000), 100, 10);
        if self.websocket_cpu.is_none() {
            self.websocket_cpu = Some(self.fan_out("fan-out (cpu)", cpu, Target::Fanout).await);
        }
        let sse = self
            .fan_out("fan-out over SSE", cpu, Target::FanoutSse)
            .await;
        let ws = self.websocket_cpu.as_ref().expect("the WebSocket run");
        report.row(
            format!("SSE fan-out {}×{} ev/s", cpu.clients, cpu.rate),
            vec![
                Figure::new("server CPU µs per delivery", sse.cpu_us(), 2)
                    .against("WebSocket", ws.cpu_us())
                    .goal(Goal::AtMostTimesBaseline(1.3)),
                Figure::new("p99 latency, ms", sse.latency.quantile_ms(0.99), 2)
                    .against("WebSocket", ws.latency.quantile_ms(0.99)),
            ],
        );
        report.run(
            "sse_fanout_cpu",
            json!({"spec": format!("{cpu:?}"), "sse": sse.json(), "websocket": ws.json()}),
        );

        let polling = self.one_channel(self.scale(1000), 100, 10);
        let poll = self
            .fan_out("long-polling", polling, Target::FanoutPoll)
            .await;
        report.row(
            format!(
                "long-poll, {} clients × {} ev/s",
                polling.clients, polling.rate
            ),
            vec![
                Figure::new("deliveries/s", poll.per_second(), 0),
                Figure::new("p50 latency, ms", poll.latency.quantile_ms(0.5), 2),
                Figure::new("p99 latency, ms", poll.latency.quantile_ms(0.99), 2),
                Figure::new("missing", poll.missing as f64, 0).goal(Goal::AtMost(0.0)),
                Figure::new("server CPU µs per delivery", poll.cpu_us(), 2),
            ],
        );
        report.run(
            "long_poll",
            json!({"spec": format!("{polling:?}"), "fanout": poll.json()}),
        );

        // WebTransport and MessagePack, against the same WebSocket run.
        let wt = self
            .fan_out("fan-out over WebTransport", cpu, Target::FanoutWt)
            .await;
        let packed = self
            .fan_out("fan-out in MessagePack", cpu, Target::FanoutMsgpack)
            .await;
        let ws = self.websocket_cpu.as_ref().expect("the WebSocket run");
        let bytes = |run: &FanOut| run.bytes_per_delivery.unwrap_or_default();
        report.row(
            format!("WebTransport fan-out {}×{} ev/s", cpu.clients, cpu.rate),
            vec![
                Figure::new("server CPU µs per delivery", wt.cpu_us(), 2)
                    .against("WebSocket", ws.cpu_us()),
                Figure::new("missing", wt.missing as f64, 0).goal(Goal::AtMost(0.0)),
            ],
        );
        report.row(
            format!("MessagePack fan-out {}×{} ev/s", cpu.clients, cpu.rate),
            vec![
                Figure::new("bytes per delivery (as written)", bytes(&packed), 1)
                    .against("JSON", bytes(ws))
                    .goal(Goal::AtMostTimesBaseline(1.0)),
                Figure::new("server CPU µs per delivery", packed.cpu_us(), 2)
                    .against("JSON", ws.cpu_us())
                    .goal(Goal::AtMostTimesBaseline(1.1)),
                Figure::new("missing", packed.missing as f64, 0).goal(Goal::AtMost(0.0)),
            ],
        );
        report.run(
            "webtransport_msgpack_fanout_cpu",
            json!({"spec": format!("{cpu:?}"), "webtransport": wt.json(), "msgpack": packed.json()}),
        );

        // Volatile events: datagrams over WebTransport against frames over WebSocket.
        let volatile = Spec {
            volatile: true,
            ..self.one_channel(self.scale(300), 100, 10)
        };
        let (datagrams, frames) = (
            self.fan_out("volatile", volatile, Target::FanoutWt).await,
            self.fan_out("volatile", volatile, Target::Fanout).await,
        );
        report.row(
            format!(
                "volatile {}×{} ev/s, WebTransport datagrams",
                volatile.clients, volatile.rate
            ),
            vec![
                Figure::new("p50 latency, ms", datagrams.latency.quantile_ms(0.5), 2)
                    .against("WebSocket", frames.latency.quantile_ms(0.5)),
                Figure::new("p99 latency, ms", datagrams.latency.quantile_ms(0.99), 2)
                    .against("WebSocket", frames.latency.quantile_ms(0.99)),
                Figure::new("server CPU µs per delivery", datagrams.cpu_us(), 2)
                    .against("WebSocket", frames.cpu_us()),
            ],
        );
        report.run(
            "volatile",
            json!({"spec": format!("{volatile:?}"), "datagrams": datagrams.json(), "websocket": frames.json()}),
        );
    }

    /// Every client in a channel of its own and one of 10 shared; both publishers release
    /// what came due every 5 ms (fanout: one `/v1/batch`).
    async fn many_channels(&self, report: &mut Report) {
        let spec = Spec {
            clients: self.scale(10_000),
            shared: 10,
            tick_ms: 5,
            threads: 1,
            ..self.one_channel(0, 2000, 10)
        };
        let name = "many channels";
        let (f, n) = (
            self.fan_out(name, spec, Target::Fanout).await,
            self.fan_out(name, spec, Target::Nats).await,
        );
        report.row(
            format!(
                "many channels ({} own + {} shared), {} ev/s",
                spec.clients, spec.shared, spec.rate
            ),
            vec![
                Figure::new("server CPU µs per delivery", f.cpu_us(), 1)
                    .nats(n.cpu_us())
                    .goal(Goal::AtMostTimesBaseline(1.0)),
                Figure::new("p99 latency, ms", f.latency.quantile_ms(0.99), 2)
                    .nats(n.latency.quantile_ms(0.99))
                    .goal(Goal::AtMost(10.0)),
                Figure::new("missing", f.missing as f64, 0)
                    .nats(n.missing as f64)
                    .goal(Goal::AtMost(0.0)),
            ],
        );
        report.run("many_channels", runs(&spec, &f, &n));
    }

    async fn idle(&self, report: &mut Report) {
        let connections = self.scale(45_000);
        println!("idle: {connections} connections on 3 nodes");
        let f: Idle = idle(self.paths, Target::Fanout, connections, 3).await;
        println!("  fanout {f:?}");
        let n: Idle = idle(self.paths, Target::Nats, connections, 3).await;
        println!("  NATS   {n:?}");
        let sse: Idle = idle(self.paths, Target::FanoutSse, connections, 3).await;
        println!("  SSE    {sse:?}");
        let per_node = connections / 3;
        report.row(
            format!("idle, 3 × {per_node}"),
            vec![
                Figure::new("RSS KiB per connection", f.kib_per_connection_mean, 2)
                    .nats(n.kib_per_connection_mean)
                    .goal(Goal::AtMost(6.0)),
            ],
        );
        report.row(
            format!("idle SSE, 3 × {per_node}"),
            vec![
                Figure::new("RSS KiB per stream", sse.kib_per_connection_mean, 2)
                    .against("WebSocket", f.kib_per_connection_mean)
                    .goal(Goal::AtMost(8.0)),
            ],
        );
        report.run("idle", json!({"fanout": f, "nats": n}));
        report.run("idle_sse", sse);
    }

    async fn storm(&self, report: &mut Report) {
        let connections = self.scale(15_000);
        println!("connect storm: {connections} connections to one node");
        let f: Storm = storm(self.paths, Target::Fanout, connections).await;
        println!("  fanout {f:?}");
        let n: Storm = storm(self.paths, Target::Nats, connections).await;
        println!("  NATS   {n:?}");
        report.row(
            format!("connect storm, {connections} to one node"),
            vec![
                Figure::new("connections/s", f.per_second, 0)
                    .nats(n.per_second)
                    .goal(Goal::AtLeast(10_000.0)),
            ],
        );
        report.run("storm", json!({"fanout": f, "nats": n}));
    }

    async fn join_storm(&self, report: &mut Report) {
        let joiners = self.scale(12_000);
        println!(
            "join storm: 300 clients × 100 events/s on one node, quiet, then while {joiners} connect and subscribe"
        );
        let j: JoinStorm = join_storm(self.paths, 300, joiners, 100).await;
        report.row(
            format!("join storm, 300 × 100 ev/s while {joiners} join"),
            vec![
                Figure::new(
                    "p99 latency during the storm, ms",
                    j.storm.latency_ms.p99,
                    2,
                )
                .against("quiet", j.quiet.latency_ms.p99)
                .goal(Goal::Note("close to quiet")),
                Figure::new(
                    "max latency during the storm, ms",
                    j.storm.latency_ms.max,
                    1,
                ),
                Figure::new("missing", (j.quiet.missing + j.storm.missing) as f64, 0)
                    .goal(Goal::AtMost(0.0)),
            ],
        );
        report.run("join_storm", j);
    }

    async fn control(&self, report: &mut Report) {
        let (connects, rpcs, users) = if self.quick {
            (200, 500, 100)
        } else {
            (2000, 5000, 1000)
        };
        println!("control: the connect hook off and on, rpc, a disconnect of {users} connections");
        let c = crate::control::run(self.paths, 3, connects, rpcs, users).await;
        report.row(
            format!("connect, {connects} one after another, hook off → on"),
            vec![
                Figure::new("p50 ms", c.connect_ms_p50_on, 2).against("off", c.connect_ms_p50_off),
                Figure::new("p99 ms", c.connect_ms_p99_on, 2).against("off", c.connect_ms_p99_off),
                Figure::new("p99 added, ms", c.connect_ms_p99_added, 2).goal(Goal::AtMost(2.0)),
            ],
        );
        report.row(
            format!("rpc round trip, {rpcs} one after another"),
            vec![
                Figure::new("p50 ms", c.rpc_ms_p50, 2),
                Figure::new("p99 ms", c.rpc_ms_p99, 2),
            ],
        );
        report.row(
            format!("disconnect of one user's {users} connections over 3 nodes"),
            vec![
                Figure::new("API answer, ms", c.disconnect_answer_ms, 1),
                Figure::new("last closed, ms", c.disconnect_last_closed_ms, 1),
            ],
        );
        report.run("control", c);
    }

    async fn pusher(&self, report: &mut Report) {
        let sockudo = crate::sockudo::available();
        if !sockudo {
            println!(
                "pusher: Sockudo is not installed (cargo install sockudo --version 5.2.0 \
                 --features nats, or FANOUT_BENCH_SOCKUDO): its rows are left out"
            );
        }
        let cpu = self.one_channel(self.scale(3000), 100, 10);
        let json = self
            .fan_out("pusher (fanout's protocol)", cpu, Target::Fanout)
            .await;
        let pusher = self
            .fan_out("pusher (Pusher's)", cpu, Target::FanoutPusher)
            .await;
        let q = |run: &FanOut| run.latency.quantile_ms(0.99);
        report.row(
            format!("fan-out {}×{} ev/s, Pusher clients", cpu.clients, cpu.rate),
            vec![
                Figure::new("server CPU µs per delivery", pusher.cpu_us(), 2)
                    .against("fanout's protocol", json.cpu_us())
                    .goal(Goal::AtMostTimesBaseline(1.1)),
                Figure::new("p99 latency, ms", q(&pusher), 2)
                    .against("fanout's protocol", q(&json)),
            ],
        );
        let other = match sockudo {
            true => Some(self.fan_out("pusher (Sockudo)", cpu, Target::Sockudo).await),
            false => None,
        };
        if let Some(other) = &other {
            report.row(
                "  the same clients on Sockudo 5.2",
                vec![
                    Figure::new("server CPU µs per delivery", pusher.cpu_us(), 2)
                        .against("Sockudo", other.cpu_us()),
                    Figure::new("p99 latency, ms", q(&pusher), 2).against("Sockudo", q(other)),
                ],
            );
        }
        println!("pusher: 16 closed-loop publishers through POST /apps/{{id}}/events");
        let publish = crate::suite::pusher_publish(self.paths, false, 16, 5, 100).await;
        println!("  fanout  {publish:?}");
        let theirs = match sockudo {
            true => {
                let r = crate::suite::pusher_publish(self.paths, true, 16, 5, 100).await;
                println!("  Sockudo {r:?}");
                Some(r)
            }
            false => None,
        };
        let mut figures = vec![
            Figure::new("events/s acknowledged", publish.acked_per_sec, 0),
            Figure::new(
                "server CPU µs per event",
                publish.server_cpu_us_per_event,
                1,
            ),
        ];
        if let Some(theirs) = &theirs {
            figures[0] = Figure::new("events/s acknowledged", publish.acked_per_sec, 0)
                .against("Sockudo", theirs.acked_per_sec);
            figures[1] = Figure::new(
                "server CPU µs per event",
                publish.server_cpu_us_per_event,
                1,
            )
            .against("Sockudo", theirs.server_cpu_us_per_event);
        }
        report.row(
            "POST /apps/{id}/events, 16 publishers (fanout: stored)",
            figures,
        );
        report.run(
            "pusher",
            json!({"spec": format!("{cpu:?}"), "fanout": json.json(), "pusher": pusher.json(),
                "sockudo": other.as_ref().map(FanOut::json), "publish": publish, "sockudo_publish": theirs}),
        );
    }

    async fn presence(&self, report: &mut Report) {
        let members = if self.quick { 10_000 } else { 100_000 };
        println!("presence: {members} members on 3 nodes");
        let p: Presence = crate::presence::run(members, 3).await;
        report.row(
            format!("presence, {members} members"),
            vec![
                Figure::new("count-only query, median ms", p.count_only_ms.median, 2)
                    .goal(Goal::Note("milliseconds")),
                Figure::new("full list, median ms", p.full_ms.median, 0),
            ],
        );
        report.run("presence", p);
    }
}

/// A fan-out's spec and both runs, as JSON.
fn runs(spec: &Spec, fanout: &FanOut, nats: &FanOut) -> Value {
    json!({"spec": format!("{spec:?}"), "fanout": fanout.json(), "nats": nats.json()})
}

/// The machine the suite ran on.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    format!("{cores} cores, {model} (load generator on the same cores)")
}

/// Runs `only` (every scenario when empty) and returns the JSON and the markdown.
pub async fn run(paths: &Paths, quick: bool, only: &[Scenario]) -> (Value, String) {
    let mut suite = Suite {
        paths,
        quick,
        websocket_cpu: None,
    };
    let mut report = Report::default();
    for scenario in Scenario::value_variants() {
        if only.is_empty() || only.contains(scenario) {
            suite.run(*scenario, &mut report).await;
        }
    }
    let machine = machine();
    let mut results = report.json();
    results["machine"] = json!(machine);
    (results, format!("{machine}\n\n{}", report.markdown()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_are_checked_against_the_figure_and_its_baseline() {
        let f = Figure::new("x", 12.0, 1)
            .nats(10.0)
            .goal(Goal::AtMost(20.0));
        assert_eq!(f.met(), Some(true));
        assert_eq!(
            f.clone().goal(Goal::AtMostTimesBaseline(1.0)).met(),
            Some(false)
        );
        assert_eq!(Figure::new("x", 1.0, 0).goal(Goal::Note("n")).met(), None);
        assert_eq!(Figure::new("x", 1.0, 0).met(), None);
        assert_eq!(number(40_000.0), "40,000");
        assert_eq!(number(1.5), "1.5");
        assert_eq!(number(100.0), "100");
    }

    #[test]
    fn the_table_has_a_line_per_figure() {
        let mut report = Report::default();
        report.row(
            "fan-out",
            vec![
                Figure::new("cpu", 2.0, 2)
                    .nats(4.0)
                    .goal(Goal::AtMostTimesBaseline(0.5)),
                Figure::new("p99", 3.0, 2).against("WebSocket", 1.0),
            ],
        );
        let table = report.markdown();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert_eq!(
            lines[2],
            "| fan-out | cpu | 2.00 | 4.00 | 0.50 | ≤ 0.5× baseline | yes |"
        );
        assert_eq!(lines[3], "|  | p99 | 3.00 | WebSocket 1.00 | 3.00 |  |  |");
        let json = report.json();
        assert_eq!(json["rows"][0]["figures"][0]["met"], true);
        assert_eq!(
            json["rows"][0]["figures"][1]["baseline"]["name"],
            "WebSocket"
        );
    }
}
