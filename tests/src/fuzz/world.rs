//! The world the fuzzer seeds into the maps and the fixture namespace, as plain data: the model
//! reasons from these tables, never from the maps, and `seed` checks that the maps read back
//! exactly as described here, so the model and the kernel cannot silently disagree on the
//! services.
use std::net::{Ipv4Addr, SocketAddrV4};

use nodeport_common::{BACKEND_LOCAL, Config, FRONTEND_AFFINITY, FRONTEND_ETP_LOCAL};

use crate::{
    fixture_net::*,
    harness::{self, Harness, SNAT_MAX, SNAT_MIN},
    netns::ip,
    packet::{Mac, TCP, UDP},
};

/// A second NodePort address: SNAT must use the node address the client used.
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
pub const NODE_ADDRS: [Ipv4Addr; 2] = [NODE, NODE_B];
/// The node interface's MAC (`f0`): the source MAC of everything XDP transmits.
pub const NODE_IF_MAC: Mac = NODE_MAC;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub id: u32,
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub local: bool,
}

const fn backend(id: u32, addr: Ipv4Addr, port: u16, proto: u8, local: bool) -> BackendSpec {
    BackendSpec {
        id,
        addr,
        port,
        proto,
        local,
    }
}

/// Backends 1-4 are the harness's; 5-7 are added by `seed`. Backend 7 is a local pod the node
/// has no neighbour entry for (not yet resolved).
pub const BACKENDS: [BackendSpec; 7] = [
    backend(1, REMOTE_POD, 8080, TCP, false),
    backend(2, LOCAL_POD, 8080, TCP, true),
    backend(3, REMOTE_POD, 5353, UDP, false),
    backend(4, Ipv4Addr::new(10, 244, 2, 11), 8080, TCP, false),
    backend(5, Ipv4Addr::new(10, 244, 2, 12), 8080, TCP, false),
    backend(6, LOCAL_POD, 5353, UDP, true),
    backend(7, Ipv4Addr::new(10, 244, 1, 11), 8080, TCP, true),
];

pub fn backend_by_id(id: u32) -> &'static BackendSpec {
    BACKENDS
        .iter()
        .find(|b| b.id == id)
        .expect("world backend id")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub node_port: u16,
    pub proto: u8,
    pub svc_id: u32,
    pub affinity: bool,
    pub etp_local: bool,
    pub backends: &'static [u32],
}

const fn service(
    node_port: u16,
    proto: u8,
    svc_id: u32,
    affinity: bool,
    etp_local: bool,
    backends: &'static [u32],
) -> ServiceSpec {
    ServiceSpec {
        node_port,
        proto,
        svc_id,
        affinity,
        etp_local,
        backends,
    }
}

/// The harness's six services, then the fuzzer's: several remote backends, a mix of local and
/// remote, eTP Local with a local backend, a local UDP backend, a local pod not yet resolved.
pub const SERVICES: [ServiceSpec; 11] = [
    service(harness::NP_REMOTE, TCP, 1, false, false, &[1]),
    service(harness::NP_LOCAL, TCP, 2, false, false, &[2]),
    service(harness::NP_UDP_REMOTE, UDP, 3, false, false, &[3]),
    service(harness::NP_EMPTY, TCP, 4, false, false, &[]),
    service(harness::NP_ETP_LOCAL_EMPTY, TCP, 5, false, true, &[]),
    service(harness::NP_AFFINITY, TCP, 6, true, false, &[1, 4]),
    service(30100, TCP, 10, false, false, &[1, 4, 5]),
    service(30102, TCP, 12, false, false, &[2, 4]),
    service(30103, TCP, 13, false, true, &[2]),
    service(30104, UDP, 14, false, false, &[6]),
    service(30105, TCP, 15, false, false, &[7]),
];

pub fn service_for(proto: u8, port: u16) -> Option<&'static ServiceSpec> {
    SERVICES
        .iter()
        .find(|s| s.proto == proto && s.node_port == port)
}

/// A client address and the neighbour entry the fixture namespace has for it (None: on the
/// node's subnet but unresolved, or off every route).
#[derive(Clone, Copy, Debug)]
pub struct ClientSpec {
    pub addr: Ipv4Addr,
    pub mac: Option<Mac>,
}

pub const CLIENTS: [ClientSpec; 7] = [
    ClientSpec {
        addr: CLIENT,
        mac: Some(CLIENT_MAC),
    },
    ClientSpec {
        addr: Ipv4Addr::new(198, 18, 0, 101),
        mac: Some([2, 0, 0, 0, 0, 0x65]),
    },
    ClientSpec {
        addr: Ipv4Addr::new(198, 18, 0, 102),
        mac: Some([2, 0, 0, 0, 0, 0x66]),
    },
    ClientSpec {
        addr: Ipv4Addr::new(198, 18, 0, 103),
        mac: Some([2, 0, 0, 0, 0, 0x67]),
    },
    // On-link without a neighbour entry: XDP cannot transmit to it, TC can (redirect_neigh).
    ClientSpec {
        addr: Ipv4Addr::new(198, 18, 0, 150),
        mac: None,
    },
    ClientSpec {
        addr: Ipv4Addr::new(198, 18, 0, 151),
        mac: None,
    },
    // No route at all (TEST-NET-3): replies cannot be forwarded by XDP nor TC.
    ClientSpec {
        addr: Ipv4Addr::new(203, 0, 113, 7),
        mac: None,
    },
];

/// Client source ports: half inside the SNAT range (kept as SNAT port when free), half outside.
/// A bounded pool keeps flows repeating (established paths) and the SNAT ranges far from full.
pub const CLIENT_PORTS: [u16; 24] = [
    61000, 61001, 61234, 61999, 62000, 63000, 64000, 65000, 65534, 65535, 63333, 64444, 1, 53,
    1024, 8080, 30080, 32768, 40000, 45000, 50000, 60999, 0, 20000,
];

/// Connection-tracking lifetimes far beyond a run, so no flow expires mid-run and the model
/// need not model time: every tracked flow stays live until `reset` clears the tables.
pub const LONG_TIMEOUT_S: u32 = 30 * 24 * 3600;

pub fn config() -> Config {
    Config {
        snat_port_min: SNAT_MIN,
        snat_port_max: SNAT_MAX,
        flags: 0,
        tcp_syn_timeout_s: LONG_TIMEOUT_S,
        tcp_established_timeout_s: LONG_TIMEOUT_S,
        tcp_close_timeout_s: LONG_TIMEOUT_S,
        udp_timeout_s: LONG_TIMEOUT_S,
    }
}

/// The MTU of every interface in the fixture namespace (the veth default).
pub const MTU: usize = 1500;

/// Where the fixture namespace's FIB sends a destination, from `fixture_net`'s layout plus the
/// neighbours `seed` adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Next hop resolved on the node interface (`f0`) with this MAC.
    NodeIf(Mac),
    /// Resolved on the local pods' interface (`p0`).
    PodIf(Mac),
    /// A route exists but the neighbour is unresolved.
    NoNeighbour,
    /// No route (or a local address, which the FIB does not forward to).
    None,
}

pub fn route(dst: Ipv4Addr) -> Route {
    let o = dst.octets();
    match o {
        [10, 244, 2, _] => Route::NodeIf(NODE2_MAC),
        [10, 244, 1, 10] => Route::PodIf(LOCAL_POD_MAC),
        // The interfaces' own addresses and their subnets' broadcast addresses (the network
        // address is an ordinary on-link destination): the FIB does not forward to them.
        [10, 244, 1, 1] | [10, 244, 1, 255] | [198, 18, 0, 255] => Route::None,
        [10, 244, 1, _] => Route::NoNeighbour,
        [198, 18, 0, 2] => Route::None,
        [198, 18, 0, 3] => Route::NodeIf(NODE2_MAC),
        [198, 18, 0, _] => match CLIENTS.iter().find(|c| c.addr == dst) {
            Some(ClientSpec { mac: Some(m), .. }) => Route::NodeIf(*m),
            _ => Route::NoNeighbour,
        },
        _ => Route::None,
    }
}

/// Seeds the harness's maps and namespace with this world, and checks they read back as
/// described.
pub fn seed(h: &mut Harness) {
    h.tables.set_config(&config()).expect("writing np_config");
    h.tables
        .set_node_addrs(&NODE_ADDRS)
        .expect("writing np_addr4");
    for b in &BACKENDS[4..] {
        let (id, e) = harness::be(b.id, b.addr, b.port, b.proto, b.local);
        h.tables.put_backend(id, e).expect("writing np_back4");
    }
    for s in &SERVICES[6..] {
        let flags = if s.etp_local { FRONTEND_ETP_LOCAL } else { 0 }
            | if s.affinity { FRONTEND_AFFINITY } else { 0 };
        h.tables
            .put_service(&harness::svc(
                s.node_port,
                s.proto,
                s.svc_id,
                flags,
                s.backends.to_vec(),
            ))
            .expect("writing a service");
    }
    for c in &CLIENTS {
        if let (Some(mac), true) = (c.mac, c.addr != CLIENT) {
            let mac = mac.map(|b| format!("{b:02x}")).join(":");
            ip(&[
                "-n",
                &h.net.ns,
                "neigh",
                "replace",
                &c.addr.to_string(),
                "lladdr",
                &mac,
                "dev",
                "f0",
                "nud",
                "permanent",
            ]);
        }
    }
    check_maps(h);
}

fn check_maps(h: &Harness) {
    let mut addrs = h.tables.node_addrs().expect("reading np_addr4");
    addrs.sort();
    let mut want = NODE_ADDRS.to_vec();
    want.sort();
    assert_eq!(addrs, want, "np_addr4 differs from the fuzz world");
    let mut backends = h.tables.backends().expect("reading np_back4");
    backends.sort_by_key(|(id, _)| *id);
    let want: Vec<_> = BACKENDS
        .iter()
        .map(|b| (b.id, SocketAddrV4::new(b.addr, b.port), b.proto, b.local))
        .collect();
    let got: Vec<_> = backends
        .iter()
        .map(|(id, e)| (*id, e.addr, e.proto, e.flags & BACKEND_LOCAL != 0))
        .collect();
    assert_eq!(got, want, "np_back4 differs from the fuzz world");
    let services = h.tables.services().expect("reading the services");
    assert_eq!(
        services.len(),
        SERVICES.len(),
        "np_front4 differs from the fuzz world"
    );
    for s in &services {
        let w = service_for(s.proto, s.node_port)
            .unwrap_or_else(|| panic!("service {}/{} not in the fuzz world", s.node_port, s.proto));
        assert_eq!(
            (s.svc_id, s.backends.as_slice()),
            (w.svc_id, w.backends),
            "service {} differs from the fuzz world",
            s.node_port
        );
        assert_eq!(s.flags & FRONTEND_AFFINITY != 0, w.affinity);
        assert_eq!(s.flags & FRONTEND_ETP_LOCAL != 0, w.etp_local);
    }
}
