//! A TCP proxy that adds a fixed delay each way: a WAN link between regions on loopback
//! (`tc netem` is not available here). Every chunk read is written to the other side
//! `delay` after it was read, in order, so a link's latency grows by `delay` and its
//! throughput does not shrink. Counts the bytes it carries.
//!
//! ```text
//! fanout-bench delay-proxy --delay-ms 40 --pairs 127.0.0.1:17002=127.0.0.1:17001,...
//! ```
//! prints `proxy listening addr=...` for each pair once it accepts connections.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::Instant,
};

/// Accepts on `listener` until the process ends; each connection is joined to `target`
/// with `delay` (milliseconds, read for every chunk: it can be changed while running) each
/// way. `bytes` counts what crosses, both ways.
pub async fn serve(
    listener: TcpListener,
    target: SocketAddr,
    delay: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        let (bytes, delay) = (bytes.clone(), delay.clone());
        tokio::spawn(async move {
            // The far side is down (its region killed): the near side is closed at once.
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::join!(
                pipe(ri, wo, delay.clone(), bytes.clone()),
                pipe(ro, wi, delay, bytes)
            );
        });
    }
}

/// Copies `from` into `to`, each chunk `delay` after it was read.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                    let delay = Duration::from_millis(delay.load(Ordering::Relaxed));
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    };
    tokio::join!(reader, writer);
}

/// `fanout-bench delay-proxy`: every `listen=target` pair of `pairs`, until killed.
pub async fn run(pairs: &str, delay: Duration) {
    let mut tasks = Vec::new();
    for pair in pairs.split(',').filter(|p| !p.is_empty()) {
        let (listen, target) = pair.split_once('=').unwrap_or_else(|| {
            eprintln!("fanout-bench delay-proxy: {pair:?} is not LISTEN=TARGET");
            std::process::exit(2)
        });
        let target: SocketAddr = target.parse().unwrap_or_else(|_| {
            eprintln!("fanout-bench delay-proxy: {target:?} is not host:port");
            std::process::exit(2)
        });
        let listener = TcpListener::bind(listen).await.unwrap_or_else(|err| {
            eprintln!("fanout-bench delay-proxy: cannot listen on {listen}: {err}");
            std::process::exit(1)
        });
        eprintln!(
            "proxy listening addr={} to={target} delay_ms={}",
            listener.local_addr().unwrap(),
            delay.as_millis()
        );
        tasks.push(tokio::spawn(serve(
            listener,
            target,
            Arc::new(AtomicU64::new(delay.as_millis() as u64)),
            Arc::new(AtomicU64::new(0)),
        )));
    }
    for task in tasks {
        let _ = task.await;
    }
}
