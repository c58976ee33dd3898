//! `nodeport-echo`: the lab's pod. Answers every HTTP/1.1 request on its TCP ports, and every
//! datagram on its UDP ports, with one JSON object naming who answered and whom it saw:
//!
//! ```json
//! {"node":"np-lab-worker","pod":"podinfo-6b7c9d8f5-bxk2q","pod_ip":"10.244.1.2","port":9898,
//!  "proto":"TCP","client":"198.18.0.100","client_port":41532}
//! ```
//!
//! `client` is the source address the pod's socket saw: the real client when the dataplane only
//! translated the destination (a backend on the node the client asked), the node's address when
//! it also translated the source (a backend on another node).
//!
//! Usage: `nodeport-echo --node NODE --pod POD --pod-ip IP [--tcp PORT]… [--udp PORT]…
//! [--ready-file PATH]`. It binds every port on 0.0.0.0 and then creates the ready file (the
//! lab's readiness probe). std only: one thread per listener and per connection.
//!
//! Client mode, `nodeport-echo get ADDR:PORT [--udp | --udp-connected | --tcp-v4-mapped |
//! --udp-v4-mapped] [--timeout-ms N]`: one exchange with a server like this one (a GET on a new
//! TCP connection, or one datagram; `nodeport_lab::probe::Proto` says how each flag makes its
//! socket); prints the answer and what the client's socket saw (`nodeport_lab::probe::Exchange`)
//! as JSON. Exit code 2: refused, 3: timed out, 1: anything else (on stderr). The lab runs it
//! inside a pod or on a node (`Lab::exec_in_pod`, `Lab::exec_on_node`).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use nodeport_lab::probe::{self, Proto};

struct Who {
    node: String,
    pod: String,
    pod_ip: String,
}

impl Who {
    fn answer(&self, port: u16, proto: &str, peer: SocketAddr) -> String {
        serde_json::json!({
            "node": self.node,
            "pod": self.pod,
            "pod_ip": self.pod_ip,
            "port": port,
            "proto": proto,
            "client": peer.ip().to_string(),
            "client_port": peer.port(),
        })
        .to_string()
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "get") {
        return get(&args[1..]);
    }
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodeport-echo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn get(args: &[String]) -> ExitCode {
    let usage = "nodeport-echo get ADDR:PORT [--udp | --udp-connected | --tcp-v4-mapped | \
                 --udp-v4-mapped] [--timeout-ms N]";
    let (mut target, mut proto, mut timeout) = (None, Proto::Tcp, Duration::from_secs(2));
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            flag if Proto::ALL.iter().any(|p| p.flag() == Some(flag)) => {
                proto = *Proto::ALL
                    .iter()
                    .find(|p| p.flag() == Some(flag))
                    .expect("just found");
            }
            "--timeout-ms" => match it.next().and_then(|v| v.parse().ok()) {
                Some(ms) => timeout = Duration::from_millis(ms),
                None => {
                    eprintln!("nodeport-echo get: --timeout-ms needs milliseconds; {usage}");
                    return ExitCode::FAILURE;
                }
            },
            a if target.is_none() && !a.starts_with('-') => match a.parse::<SocketAddrV4>() {
                Ok(t) => target = Some(t),
                Err(e) => {
                    eprintln!("nodeport-echo get: target {a:?}: {e} (want ADDR:PORT)");
                    return ExitCode::FAILURE;
                }
            },
            other => {
                eprintln!("nodeport-echo get: unexpected {other:?}; {usage}");
                return ExitCode::FAILURE;
            }
        }
    }
    let Some(target) = target else {
        eprintln!("nodeport-echo get: no target; {usage}");
        return ExitCode::FAILURE;
    };
    match probe::exchange(target, proto, timeout) {
        Ok(exchange) => {
            println!(
                "{}",
                serde_json::to_string(&exchange).expect("an Exchange serializes")
            );
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("nodeport-echo get: {proto} {target}: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

fn serve(args: Vec<String>) -> Result<(), String> {
    let mut who = Who {
        node: String::new(),
        pod: String::new(),
        pod_ip: String::new(),
    };
    let (mut tcp, mut udp, mut ready) = (Vec::new(), Vec::new(), None);
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let port = |v: String| v.parse::<u16>().map_err(|e| format!("port {v:?}: {e}"));
        match flag.as_str() {
            "--node" => who.node = value()?,
            "--pod" => who.pod = value()?,
            "--pod-ip" => who.pod_ip = value()?,
            "--tcp" => tcp.push(port(value()?)?),
            "--udp" => udp.push(port(value()?)?),
            "--ready-file" => ready = Some(value()?),
            "-h" | "--help" => {
                println!(
                    "nodeport-echo --node NODE --pod POD --pod-ip IP [--tcp PORT]... [--udp PORT]... [--ready-file PATH]\n\
                     nodeport-echo get ADDR:PORT [--udp | --udp-connected | --tcp-v4-mapped | --udp-v4-mapped] [--timeout-ms N]"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if tcp.is_empty() && udp.is_empty() {
        return Err("no --tcp or --udp port to serve".into());
    }
    let who = Arc::new(who);
    let mut threads = Vec::new();
    for port in tcp {
        let listener =
            TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("tcp {port}: {e}"))?;
        let who = who.clone();
        threads.push(std::thread::spawn(move || serve_tcp(listener, port, who)));
    }
    for port in udp {
        let socket = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("udp {port}: {e}"))?;
        let who = who.clone();
        threads.push(std::thread::spawn(move || serve_udp(socket, port, who)));
    }
    if let Some(path) = ready {
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("writing {path}: {e}"))?;
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn serve_tcp(listener: TcpListener, port: u16, who: Arc<Who>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let who = who.clone();
        std::thread::spawn(move || {
            let _ = http(stream, port, &who);
        });
    }
}

/// HTTP/1.1 with keep-alive: every request (any method, any path) gets the JSON answer; the
/// connection closes when the client asks for it (or speaks HTTP/1.0), or after 30 s idle.
fn http(stream: TcpStream, port: u16, who: &Who) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_nodelay(true)?;
    // One write per answer (flushed below): unbuffered, `write!` sends each piece as its own
    // segment, and Nagle against the client's delayed ACK holds kept-alive answers ~40 ms.
    let mut writer = std::io::BufWriter::new(stream.try_clone()?);
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut close = request_line.trim_end().ends_with("HTTP/1.0");
        let mut body_len = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                if name == "connection" {
                    close = value.eq_ignore_ascii_case("close");
                } else if name == "content-length" {
                    body_len = value.parse().unwrap_or(0);
                }
            }
        }
        // A request body is read and ignored.
        let mut body = vec![0; body_len];
        std::io::Read::read_exact(&mut reader, &mut body)?;
        let json = who.answer(port, "TCP", peer) + "\n";
        write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{json}",
            json.len(),
            if close { "close" } else { "keep-alive" }
        )?;
        writer.flush()?;
        if close {
            return Ok(());
        }
    }
}

fn serve_udp(socket: UdpSocket, port: u16, who: Arc<Who>) {
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(who.answer(port, "UDP", peer).as_bytes(), peer);
        }
    }
}
