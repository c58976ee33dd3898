//! The load generator, run from inside the client's network namespace: real TCP connections and
//! real HTTP/1.1 exchanges with the lab's `nodeport-echo` pods, and a bulk stream into a sink.
//!
//! Honest on purpose (docs/BENCHMARKS.md): every new connection is connect, one request, the full
//! response, close, with a normal FIN (no `SO_LINGER 0` reset, which would skip the TIME_WAIT a
//! real client leaves behind). The pod closes first (the request says `Connection: close`), so
//! the TIME_WAIT sockets are the pods', as with real HTTP servers; a SYN that lands on one of
//! them and is refused by PAWS is retransmitted by the client after 1 s, and such connections
//! are counted.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// A connect that took longer than this waited for a SYN retransmit (the first one is sent 1 s
/// after the SYN): the connection survived, but only after the pod dropped its SYN.
pub const SYN_RETRANSMIT: Duration = Duration::from_millis(900);
/// Connect and exchange timeout: past two SYN retransmits (1 s, 3 s) a connection counts as failed.
const TIMEOUT: Duration = Duration::from_secs(4);

/// New connections, one request each.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnFigures {
    /// Completed connections per second.
    pub per_sec: f64,
    pub completed: u64,
    /// Connections that failed (refused, timed out, bad answer).
    pub failed: u64,
    /// Completed connections whose connect took longer than [`SYN_RETRANSMIT`].
    pub syn_retransmits: u64,
    /// Latency of the whole exchange (connect, request, response, close), microseconds.
    pub p50_us: u64,
    pub p99_us: u64,
}

/// Requests on kept-alive connections.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeepAliveFigures {
    pub per_sec: f64,
    pub completed: u64,
    pub failed: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// One bulk TCP stream into a sink.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BulkFigures {
    pub gbit_per_sec: f64,
    pub bytes: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, 60_000_000)
}

/// `workers` threads, each opening connections to `targets` in turn for `duration`. With
/// `sources`, connections come from those client addresses in turn (many client hosts: each
/// address gets its own TCP timestamp offset from the kernel, as separate hosts have their own
/// clocks, which is what PAWS on the pods' TIME_WAIT sockets compares); without, from the
/// address the route picks.
pub fn new_connections(
    targets: &[SocketAddrV4],
    workers: usize,
    duration: Duration,
    sources: &[Ipv4Addr],
) -> anyhow::Result<ConnFigures> {
    if targets.is_empty() {
        bail!("no target to connect to");
    }
    let start = Instant::now();
    let deadline = start + duration;
    let results: Vec<(Histogram<u64>, u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || {
                    let (mut hist, mut failed, mut retx) = (histogram(), 0u64, 0u64);
                    let mut i = w;
                    while Instant::now() < deadline {
                        let target = targets[i % targets.len()];
                        let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
                        i += 1;
                        let t0 = Instant::now();
                        match one_exchange(target, source) {
                            Ok(connect) => {
                                hist.record(micros(t0.elapsed())).ok();
                                if connect > SYN_RETRANSMIT {
                                    retx += 1;
                                }
                            }
                            Err(_) => failed += 1,
                        }
                    }
                    (hist, failed, retx)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load worker panicked"))
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = histogram();
    let (mut failed, mut retx) = (0, 0);
    for (h, f, r) in results {
        all.add(h).context("merging histograms")?;
        failed += f;
        retx += r;
    }
    Ok(ConnFigures {
        per_sec: all.len() as f64 / elapsed,
        completed: all.len(),
        failed,
        syn_retransmits: retx,
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
    })
}

/// One connection: connect, `GET` with `Connection: close`, the whole answer, close. Returns
/// how long the connect took.
fn one_exchange(target: SocketAddrV4, source: Option<Ipv4Addr>) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut s = match source {
        None => TcpStream::connect_timeout(&target.into(), TIMEOUT)?,
        Some(addr) => {
            let socket = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.bind(&SocketAddrV4::new(addr, 0).into())?;
            socket.connect_timeout(&target.into(), TIMEOUT)?;
            socket.into()
        }
    };
    let connect = t0.elapsed();
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::with_capacity(512);
    s.read_to_end(&mut answer)?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        bail!("{target} answered {:?}", String::from_utf8_lossy(&answer));
    }
    Ok(connect)
}

/// `workers` kept-alive connections (spread over `targets`), each sending requests back to back
/// for `duration`; a connection that breaks is counted and opened again.
pub fn keep_alive(
    targets: &[SocketAddrV4],
    workers: usize,
    duration: Duration,
) -> anyhow::Result<KeepAliveFigures> {
    if targets.is_empty() {
        bail!("no target to connect to");
    }
    let start = Instant::now();
    let deadline = start + duration;
    let results: Vec<(Histogram<u64>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || {
                    let (mut hist, mut failed) = (histogram(), 0u64);
                    let target = targets[w % targets.len()];
                    let mut conn: Option<KeptAlive> = None;
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        let result = match conn.as_mut() {
                            Some(c) => c.request(),
                            None => KeptAlive::open(target).and_then(|mut c| {
                                c.request()?;
                                conn = Some(c);
                                Ok(())
                            }),
                        };
                        match result {
                            Ok(()) => {
                                hist.record(micros(t0.elapsed())).ok();
                            }
                            Err(_) => {
                                failed += 1;
                                conn = None;
                            }
                        }
                    }
                    (hist, failed)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load worker panicked"))
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut all = histogram();
    let mut failed = 0;
    for (h, f) in results {
        all.add(h).context("merging histograms")?;
        failed += f;
    }
    Ok(KeepAliveFigures {
        per_sec: all.len() as f64 / elapsed,
        completed: all.len(),
        failed,
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
    })
}

struct KeptAlive {
    target: SocketAddrV4,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl KeptAlive {
    fn open(target: SocketAddrV4) -> anyhow::Result<Self> {
        let s = TcpStream::connect_timeout(&target.into(), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(Self {
            target,
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    fn request(&mut self) -> anyhow::Result<()> {
        write!(
            self.writer,
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive\r\n\r\n",
            self.target
        )?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            bail!("{} answered {line:?}", self.target);
        }
        let mut length = None;
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("{} closed mid-answer", self.target);
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = Some(value.trim().parse::<usize>()?);
            }
        }
        let mut body = vec![0; length.context("an answer without Content-Length")?];
        self.reader.read_exact(&mut body)?;
        Ok(())
    }
}

/// One TCP stream writing as fast as it can for `duration`, then closing its side and waiting
/// until the sink closes too (so every byte counted was received).
pub fn bulk(target: SocketAddrV4, duration: Duration) -> anyhow::Result<BulkFigures> {
    let mut s = TcpStream::connect_timeout(&target.into(), TIMEOUT)
        .with_context(|| format!("connecting to the sink at {target}"))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let buf = vec![0x5a_u8; 256 * 1024];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < duration {
        s.write_all(&buf)
            .with_context(|| format!("sending to {target}"))?;
        bytes += buf.len() as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .with_context(|| format!("waiting for the sink at {target} to finish"))?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(BulkFigures {
        gbit_per_sec: bytes as f64 * 8.0 / elapsed / 1e9,
        bytes,
    })
}

/// A TCP sink: reads every connection to its end, then closes. Its listener is made in the
/// caller's network namespace (a pod's); the threads serving it may run anywhere.
pub struct Sink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Binds `0.0.0.0:port` in the calling thread's network namespace.
    pub fn bind(port: u16) -> anyhow::Result<TcpListener> {
        let listener = TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("binding the sink to port {port}"))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    pub fn serve(listener: TcpListener) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                            let mut buf = vec![0u8; 256 * 1024];
                            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
