//! A load driver for the reliability scenarios, run in the lab's client namespace:
//!
//! - long-lived connections: each keeps one TCP connection to a nodePort and sends an HTTP/1.1
//!   keep-alive request every 50-100 ms, checking the answer comes from the same pod. A request
//!   that errors or times out ends ("breaks") the connection, which is recorded with how it ended
//!   (reset, timeout, closed) and replaced by a new one;
//! - a stream of new connections at a steady rate (connect, request, answer, close).
//!
//! Every outcome carries its instant, so the scenarios ([`scenarios`]) can attribute failures to
//! the windows in which they provoked a fault.
pub mod scenarios;

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{Answer, lab::http_get, sys};

#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// nodePorts to connect to (every node's address, one port): connections rotate over them.
    pub targets: Vec<SocketAddrV4>,
    /// Long-lived connections kept open at all times.
    pub long_conns: usize,
    /// New connections per second (sum over the stream's workers).
    pub new_per_sec: u32,
    /// A long-lived connection's request that takes longer breaks it.
    pub request_timeout: Duration,
    /// Connect and exchange timeout of a new connection.
    pub new_timeout: Duration,
}

/// How a request or a connection failed, from the client's socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// RST (ECONNRESET, ECONNREFUSED, EPIPE).
    Reset,
    /// No answer within the timeout.
    Timeout,
    /// The peer closed the connection (FIN) without answering.
    Closed,
    /// ICMP unreachable (EHOSTUNREACH, ENETUNREACH).
    Unreachable,
    /// An answer from another pod than the connection's, or not the echo server's.
    WrongAnswer,
    Other,
}

impl Failure {
    fn of(e: &std::io::Error) -> Self {
        match e.kind() {
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe => Self::Reset,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Self::Timeout,
            ErrorKind::UnexpectedEof => Self::Closed,
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => Self::Unreachable,
            _ => Self::Other,
        }
    }

    fn of_anyhow(e: &anyhow::Error) -> Self {
        e.chain()
            .find_map(|c| c.downcast_ref::<std::io::Error>())
            .map_or(Self::Other, Self::of)
    }
}

/// A long-lived connection that ended with an error.
#[derive(Clone, Debug)]
pub struct Break {
    pub conn: usize,
    pub target: SocketAddrV4,
    /// The pod that answered its first request.
    pub pod: String,
    pub opened: Instant,
    /// When the failing request was sent, and when the failure was seen.
    pub sent: Instant,
    pub seen: Instant,
    pub failure: Failure,
    pub error: String,
    /// Requests answered on this connection before it broke.
    pub answered: u64,
}

/// One answered request on a long-lived connection.
#[derive(Clone, Copy, Debug)]
pub struct Answered {
    pub sent: Instant,
    pub latency: Duration,
}

/// One connection of the stream of new connections (or a long-lived connection's opening).
#[derive(Clone, Debug)]
pub struct NewConn {
    pub target: SocketAddrV4,
    pub started: Instant,
    pub took: Duration,
    /// The answering pod, or how it failed (and whether while connecting).
    pub result: Result<String, (Failure, bool, String)>,
}

/// Everything the driver saw.
#[derive(Clone, Debug, Default)]
pub struct Log {
    pub breaks: Vec<Break>,
    pub answered: Vec<Answered>,
    /// The stream's connections.
    pub new: Vec<NewConn>,
    /// Openings of long-lived connections (first connection and replacements).
    pub opened: Vec<NewConn>,
}

/// A running load; [`Load::stop`] ends it and returns the log.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<anyhow::Result<Log>>>,
}

impl Load {
    /// Starts the driver in network namespace `ns` (the lab's client namespace). Returns once
    /// every long-lived connection got its first answer, or fails naming the one that did not.
    pub fn start(ns: &str, cfg: &LoadConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(!cfg.targets.is_empty(), "load: no target");
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for conn in 0..cfg.long_conns {
            let (stop, cfg, ns, opened) =
                (stop.clone(), cfg.clone(), ns.to_owned(), opened.clone());
            threads.push(std::thread::spawn(move || {
                sys::in_netns(&ns, || long_lived(conn, &cfg, &stop, &opened))?
            }));
        }
        let workers = cfg.new_per_sec.clamp(0, 2) as usize;
        for w in 0..workers {
            let (stop, cfg, ns) = (stop.clone(), cfg.clone(), ns.to_owned());
            let period = Duration::from_secs(workers as u64) / cfg.new_per_sec.max(1);
            threads.push(std::thread::spawn(move || {
                sys::in_netns(&ns, || stream(w, period, &cfg, &stop))?
            }));
        }
        let load = Self { stop, threads };
        let deadline = Instant::now() + Duration::from_secs(10);
        while opened.load(Ordering::Relaxed) < cfg.long_conns {
            if Instant::now() > deadline || load.threads.iter().any(|t| t.is_finished()) {
                let n = opened.load(Ordering::Relaxed);
                let log = load.stop();
                anyhow::bail!(
                    "load: only {n} of {} long-lived connections got a first answer within 10 s: {:?}",
                    cfg.long_conns,
                    log.map(|l| l
                        .opened
                        .into_iter()
                        .filter(|o| o.result.is_err())
                        .collect::<Vec<_>>())
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(load)
    }

    /// Stops every connection (long-lived ones close after their current request) and returns
    /// what they saw.
    pub fn stop(self) -> anyhow::Result<Log> {
        self.stop.store(true, Ordering::Relaxed);
        let mut log = Log::default();
        for t in self.threads {
            let part = t
                .join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
            log.breaks.extend(part.breaks);
            log.answered.extend(part.answered);
            log.new.extend(part.new);
            log.opened.extend(part.opened);
        }
        log.new.sort_by_key(|n| n.started);
        log.answered.sort_by_key(|a| a.sent);
        log.breaks.sort_by_key(|b| b.sent);
        Ok(log)
    }
}

/// A small deterministic jitter source (no need for a random crate: spreading requests is all).
struct Jitter(u64);

impl Jitter {
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let span = (hi - lo).as_micros() as u64;
        lo + Duration::from_micros((self.0 >> 33) % span.max(1))
    }
}

/// One long-lived connection slot: open, request every 50-100 ms, on a break record it and open
/// a new one, until stopped.
fn long_lived(
    conn: usize,
    cfg: &LoadConfig,
    stop: &AtomicBool,
    opened: &std::sync::atomic::AtomicUsize,
) -> anyhow::Result<Log> {
    let mut log = Log::default();
    let mut jitter = Jitter(conn as u64 + 1);
    let mut generation = 0;
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        let target = cfg.targets[(conn + generation) % cfg.targets.len()];
        generation += 1;
        let started = Instant::now();
        let mut c = match Conn::open(target, cfg.request_timeout) {
            Ok(c) => c,
            Err(e) => {
                log.opened.push(NewConn {
                    target,
                    started,
                    took: started.elapsed(),
                    result: Err((Failure::of_anyhow(&e), true, format!("{e:#}"))),
                });
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let answer = match c.request() {
            Ok(a) => a,
            Err(e) => {
                log.opened.push(NewConn {
                    target,
                    started,
                    took: started.elapsed(),
                    result: Err((Failure::of_anyhow(&e), false, format!("{e:#}"))),
                });
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        log.opened.push(NewConn {
            target,
            started,
            took: started.elapsed(),
            result: Ok(answer.pod.clone()),
        });
        if first {
            opened.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        let mut answered = 1;
        loop {
            std::thread::sleep(
                jitter.between(Duration::from_millis(50), Duration::from_millis(100)),
            );
            if stop.load(Ordering::Relaxed) {
                return Ok(log);
            }
            let sent = Instant::now();
            let failure = match c.request() {
                Ok(a) if a.pod == answer.pod => {
                    log.answered.push(Answered {
                        sent,
                        latency: sent.elapsed(),
                    });
                    answered += 1;
                    continue;
                }
                Ok(a) => (
                    Failure::WrongAnswer,
                    format!("answered by {} on a connection to {}", a.pod, answer.pod),
                ),
                Err(e) => (Failure::of_anyhow(&e), format!("{e:#}")),
            };
            log.breaks.push(Break {
                conn,
                target,
                pod: answer.pod.clone(),
                opened: started,
                sent,
                seen: Instant::now(),
                failure: failure.0,
                error: failure.1,
                answered,
            });
            break;
        }
    }
    Ok(log)
}

/// New connections at a steady pace (each worker every `period`, catching up if late).
fn stream(
    worker: usize,
    period: Duration,
    cfg: &LoadConfig,
    stop: &AtomicBool,
) -> anyhow::Result<Log> {
    let mut log = Log::default();
    let start = Instant::now() + period * worker as u32 / 2;
    let mut i = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let at = start + period * i;
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let target = cfg.targets[(worker + i as usize) % cfg.targets.len()];
        let started = Instant::now();
        let result = http_get(*target.ip(), target.port(), cfg.new_timeout)
            .map(|a| a.pod)
            .map_err(|e| {
                (
                    Failure::of_anyhow(&e),
                    crate::lab::is_connect_failure(&e),
                    format!("{e:#}"),
                )
            });
        log.new.push(NewConn {
            target,
            started,
            took: started.elapsed(),
            result,
        });
        i += 1;
    }
    Ok(log)
}

/// A keep-alive HTTP/1.1 connection to the echo server.
struct Conn {
    reader: BufReader<TcpStream>,
    host: SocketAddrV4,
}

impl Conn {
    fn open(target: SocketAddrV4, timeout: Duration) -> anyhow::Result<Self> {
        let s = TcpStream::connect_timeout(&target.into(), timeout)
            .with_context(|| format!("connecting to {target}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(s),
            host: target,
        })
    }

    fn request(&mut self) -> anyhow::Result<Answer> {
        let host = self.host;
        write!(
            self.reader.get_mut(),
            "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"
        )?;
        let mut status = String::new();
        if self.reader.read_line(&mut status)? == 0 {
            return Err(std::io::Error::from(ErrorKind::UnexpectedEof).into());
        }
        anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "answer {status:?}");
        let mut len = None;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::from(ErrorKind::UnexpectedEof).into());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                len = Some(value.trim().parse::<usize>()?);
            }
        }
        let mut body = vec![0; len.context("an answer without Content-Length")?];
        self.reader.read_exact(&mut body)?;
        Ok(serde_json::from_slice(&body)?)
    }
}

/// Every node's address with one nodePort: the driver's targets.
pub fn targets(nodes: &[Ipv4Addr], node_port: u16) -> Vec<SocketAddrV4> {
    nodes
        .iter()
        .map(|a| SocketAddrV4::new(*a, node_port))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_its_range_and_spreads() {
        let mut j = Jitter(7);
        let (lo, hi) = (Duration::from_millis(50), Duration::from_millis(100));
        let all: Vec<Duration> = (0..1000).map(|_| j.between(lo, hi)).collect();
        assert!(all.iter().all(|d| *d >= lo && *d < hi));
        assert!(all.iter().any(|d| *d < Duration::from_millis(60)));
        assert!(all.iter().any(|d| *d > Duration::from_millis(90)));
    }

    #[test]
    fn failures_are_classified_from_the_socket_error() {
        let io = |k| std::io::Error::from(k);
        assert_eq!(Failure::of(&io(ErrorKind::ConnectionReset)), Failure::Reset);
        assert_eq!(
            Failure::of(&io(ErrorKind::ConnectionRefused)),
            Failure::Reset
        );
        assert_eq!(Failure::of(&io(ErrorKind::BrokenPipe)), Failure::Reset);
        // A read timeout on a socket is EAGAIN (WouldBlock) on Linux.
        assert_eq!(Failure::of(&io(ErrorKind::WouldBlock)), Failure::Timeout);
        assert_eq!(Failure::of(&io(ErrorKind::UnexpectedEof)), Failure::Closed);
        let wrapped = anyhow::Error::new(io(ErrorKind::TimedOut)).context("connecting to x");
        assert_eq!(Failure::of_anyhow(&wrapped), Failure::Timeout);
        assert_eq!(
            Failure::of_anyhow(&anyhow::anyhow!("no io")),
            Failure::Other
        );
    }
}
