//! Free TCP ports on loopback.

use std::sync::atomic::{AtomicU16, Ordering};

/// A free port below the ephemeral range (32768 and up on Linux), never the same twice in one
/// process: a port taken from the ephemeral range and released can be taken again, as the
/// source port of one of the many connections opened before its server binds it (a killed
/// server must get its port back on restart, too). Each process starts at its own offset, so
/// that two test or bench processes at once rarely race for the same port.
pub fn free_port() -> u16 {
    const LOW: u16 = 12_000;
    const HIGH: u16 = 32_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        LOW + (std::process::id() % 40) as u16 * 500,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in LOW..HIGH {
        let port = NEXT
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                Some(if p + 1 >= HIGH { LOW } else { p + 1 })
            })
            .expect("always Some");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port left on 127.0.0.1 between {LOW} and {HIGH}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_and_never_repeat() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
        assert!(ports.iter().all(|p| (12_000..32_000).contains(p)));
    }
}
