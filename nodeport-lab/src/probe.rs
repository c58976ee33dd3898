//! One client exchange with a service, as a process in a pod or on a node makes it
//! (`nodeport-echo get`): a new TCP connection with one HTTP GET, or one UDP datagram, and what
//! the client's own socket says it talked to. The socket programs of socket load balancing only
//! see processes of the cgroup they are attached to, so the lab runs this as a process started
//! in the pod's or node's cgroup ([`crate::Lab::exec_in_pod`]), never on a thread of the test.
use std::{
    fmt,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::lab::Answer;

/// How the client talks to the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// connect(), then HTTP/1.1 GET (cgroup connect4, getpeername4).
    Tcp,
    /// An unconnected socket: sendto() and recvfrom() (sendmsg4, recvmsg4), as DNS clients do.
    Udp,
    /// connect(), send() and recv() (connect4, getpeername4); the only UDP socket that learns of
    /// an ICMP port unreachable, so the only one that can be refused.
    UdpConnected,
    /// [`Proto::Tcp`] from an IPv6 socket to the IPv4-mapped address (`::ffff:a.b.c.d`), as
    /// dual-stack clients (Java's default) connect: IPv4 on the wire, but the kernel runs the
    /// cgroup's connect6/getpeername6 hooks, not connect4.
    TcpV4Mapped,
    /// [`Proto::Udp`] from an IPv6 socket to the IPv4-mapped address (sendmsg6, recvmsg6).
    UdpV4Mapped,
}

impl Proto {
    /// Every way, by its `nodeport-echo get` flag.
    pub const ALL: [Proto; 5] = [
        Proto::Tcp,
        Proto::Udp,
        Proto::UdpConnected,
        Proto::TcpV4Mapped,
        Proto::UdpV4Mapped,
    ];

    /// The `nodeport-echo get` flag.
    pub fn flag(self) -> Option<&'static str> {
        match self {
            Proto::Tcp => None,
            Proto::Udp => Some("--udp"),
            Proto::UdpConnected => Some("--udp-connected"),
            Proto::TcpV4Mapped => Some("--tcp-v4-mapped"),
            Proto::UdpV4Mapped => Some("--udp-v4-mapped"),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::UdpConnected => "UDP (connected)",
            Proto::TcpV4Mapped => "TCP (IPv6 socket, IPv4-mapped address)",
            Proto::UdpV4Mapped => "UDP (IPv6 socket, IPv4-mapped address)",
        })
    }
}

/// A completed exchange.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    /// What the pod that answered says (its name, and the client address it saw).
    pub answer: Answer,
    /// Whom the client's socket says it talked to: getpeername() for a connected socket,
    /// recvfrom()'s source for an unconnected one. The address it asked for when the socket
    /// programs restore it.
    pub peer: SocketAddrV4,
    /// The client socket's own address (0.0.0.0 for an unconnected UDP socket; `::` reads as
    /// 0.0.0.0 too).
    pub local: SocketAddrV4,
}

/// Why an exchange failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A TCP reset or an ICMP port unreachable: nothing listens there.
    Refused,
    /// No answer within the timeout.
    TimedOut,
    Other(String),
}

impl Failure {
    /// `nodeport-echo get`'s exit code for it.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused => 2,
            Failure::TimedOut => 3,
            Failure::Other(_) => 1,
        }
    }

    pub fn from_exit_code(code: Option<i32>, stderr: &str) -> Self {
        match code {
            Some(2) => Failure::Refused,
            Some(3) => Failure::TimedOut,
            _ => Failure::Other(stderr.trim().to_owned()),
        }
    }

    fn of(e: &std::io::Error) -> Self {
        match e.kind() {
            ErrorKind::ConnectionRefused => Failure::Refused,
            // A socket read timeout reports EAGAIN.
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Failure::TimedOut,
            _ => Failure::Other(e.to_string()),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused => f.write_str("refused"),
            Failure::TimedOut => f.write_str("timed out"),
            Failure::Other(e) => f.write_str(e),
        }
    }
}

/// One exchange with `target` from the calling process's network namespace and cgroup.
pub fn exchange(
    target: SocketAddrV4,
    proto: Proto,
    timeout: Duration,
) -> Result<Exchange, Failure> {
    let mapped = SocketAddr::V6(SocketAddrV6::new(
        target.ip().to_ipv6_mapped(),
        target.port(),
        0,
        0,
    ));
    match proto {
        Proto::Tcp => tcp(target.into(), timeout),
        Proto::TcpV4Mapped => tcp(mapped, timeout),
        Proto::Udp => udp(target.into(), false, timeout),
        Proto::UdpConnected => udp(target.into(), true, timeout),
        Proto::UdpV4Mapped => udp(mapped, false, timeout),
    }
}

/// An IPv4 address, or the IPv4 address an IPv4-mapped IPv6 one stands for (`::`, an unbound
/// IPv6 socket's, reads as 0.0.0.0).
fn v4(addr: SocketAddr) -> Result<SocketAddrV4, Failure> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            Ok(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, a.port()))
        }
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(ip) => Ok(SocketAddrV4::new(ip, a.port())),
            None => Err(Failure::Other(format!("an IPv6 address {a}"))),
        },
    }
}

fn tcp(target: SocketAddr, timeout: Duration) -> Result<Exchange, Failure> {
    let mut s = TcpStream::connect_timeout(&target, timeout).map_err(|e| Failure::of(&e))?;
    let other = |what: &str, e: std::io::Error| Failure::Other(format!("{what}: {e}"));
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| other("socket options", e))?;
    let peer = v4(s.peer_addr().map_err(|e| other("getpeername", e))?)?;
    let local = v4(s.local_addr().map_err(|e| other("getsockname", e))?)?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| other("sending the request", e))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| other("reading the answer", e))?;
    let body = match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => body,
        _ => return Err(Failure::Other(format!("not an HTTP 200 answer: {text:?}"))),
    };
    let answer = serde_json::from_str(body.trim())
        .map_err(|e| Failure::Other(format!("answer {body:?}: {e}")))?;
    Ok(Exchange {
        answer,
        peer,
        local,
    })
}

fn udp(target: SocketAddr, connected: bool, timeout: Duration) -> Result<Exchange, Failure> {
    let other = |what: &str, e: std::io::Error| Failure::Other(format!("{what}: {e}"));
    let any = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let s = UdpSocket::bind(any).map_err(|e| other("bind", e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| other("socket options", e))?;
    let mut buf = [0u8; 2048];
    let (n, peer) = if connected {
        s.connect(target).map_err(|e| Failure::of(&e))?;
        s.send(b"hello").map_err(|e| Failure::of(&e))?;
        let n = s.recv(&mut buf).map_err(|e| Failure::of(&e))?;
        (n, s.peer_addr().map_err(|e| other("getpeername", e))?)
    } else {
        s.send_to(b"hello", target).map_err(|e| Failure::of(&e))?;
        s.recv_from(&mut buf).map_err(|e| Failure::of(&e))?
    };
    let answer = serde_json::from_slice(&buf[..n]).map_err(|e| {
        Failure::Other(format!(
            "answer {:?}: {e}",
            String::from_utf8_lossy(&buf[..n])
        ))
    })?;
    Ok(Exchange {
        answer,
        peer: v4(peer)?,
        local: v4(s.local_addr().map_err(|e| other("getsockname", e))?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_round_trip() {
        for f in [Failure::Refused, Failure::TimedOut] {
            assert_eq!(Failure::from_exit_code(Some(f.exit_code().into()), ""), f);
        }
        assert_eq!(
            Failure::from_exit_code(Some(1), "bind: in use\n"),
            Failure::Other("bind: in use".into())
        );
        // Killed by a signal: no code.
        assert!(matches!(
            Failure::from_exit_code(None, ""),
            Failure::Other(_)
        ));
    }
}
