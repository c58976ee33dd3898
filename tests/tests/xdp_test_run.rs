//! BPF_PROG_TEST_RUN of the real XDP program on hand-built frames: what is not a NodePort packet
//! leaves XDP untouched (XDP_PASS, byte-identical) and is counted under the right reason.

use std::net::Ipv4Addr;

use aya::{
    TestRun as _, TestRunOptions,
    maps::{HashMap, MapData},
};
use nodeport_agent::{Dataplane, Stats};
use nodeport_common::{Counter, NodeAddr, NodeAddrKey, Traffic, map_names};
use nodeport_tests::{
    packet::{Frame, arp_request},
    pins::TestPins,
};

const XDP_PASS: u32 = 2;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// Runs the XDP program once on `frame`; asserts XDP_PASS and an unchanged frame.
fn assert_passes_unchanged(dataplane: &Dataplane, what: &str, frame: &[u8]) {
    let mut out = vec![0u8; frame.len() + 256];
    // struct xdp_md in and out: the kernel reports in `data` where the packet starts after any
    // metadata the program prepended (np_xdp marks packets it judged).
    let ctx_in: Vec<u8> = [0, frame.len() as u32, 0, 0, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let mut ctx_out = vec![0u8; ctx_in.len()];
    let result = dataplane
        .xdp()
        .expect("np_xdp")
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {what}: {e}"));
    assert_eq!(result.return_value, XDP_PASS, "{what}: not XDP_PASS");
    let meta = u32::from_ne_bytes(ctx_out[0..4].try_into().unwrap()) as usize;
    let n = result.data_size_out as usize;
    assert_eq!(
        &out[meta..n],
        frame,
        "{what}: the program changed the frame"
    );
}

fn udp_to(dst: Ipv4Addr) -> Vec<u8> {
    Frame::udp((CLIENT, 40_000), (dst, 30_080), b"not a nodeport packet")
        .with_macs(CLIENT_MAC, NODE_MAC)
        .build()
}

fn traffic(packets: u64, frame: &[u8]) -> Traffic {
    Traffic {
        packets,
        bytes: (frame.len() as u64) * packets,
    }
}

#[test]
fn arp_and_foreign_udp_pass_unchanged_and_are_counted_by_reason() {
    let pins = TestPins::new();
    let dataplane = Dataplane::load(pins.layout()).expect("loading the dataplane");

    let arp = arp_request(CLIENT_MAC, CLIENT, NODE);
    let udp = udp_to(NODE);
    assert_passes_unchanged(&dataplane, "ARP request", &arp);
    assert_passes_unchanged(&dataplane, "UDP to a non-node address", &udp);
    assert_passes_unchanged(&dataplane, "UDP to a non-node address (again)", &udp);

    // The maps are fresh (own pin root), so the counts are exact; read them both through the
    // loaded object and through the pinned path, as `nodeport-agent stats` does.
    for stats in [
        dataplane.stats().expect("stats"),
        Stats::read_pinned(pins.layout()).expect("pinned stats"),
    ] {
        assert_eq!(
            stats.get(Counter::PassNotIpv4),
            traffic(1, &arp),
            "{stats:?}"
        );
        assert_eq!(
            stats.get(Counter::PassNotNodePort),
            traffic(2, &udp),
            "{stats:?}"
        );
        assert_eq!(
            stats.total().packets,
            3,
            "every packet counted once: {stats:?}"
        );
    }
}

#[test]
fn packet_to_a_node_address_before_configuration_is_counted_not_configured() {
    let pins = TestPins::new();
    let mut dataplane = Dataplane::load(pins.layout()).expect("loading the dataplane");
    assert_eq!(dataplane.config().expect("np_config").snat_port_min, 0);

    let map = dataplane
        .ebpf_mut()
        .map_mut(map_names::NODE_ADDRS)
        .expect("np_addr4");
    let mut addrs: HashMap<&mut MapData, NodeAddrKey, NodeAddr> =
        map.try_into().expect("np_addr4 type");
    let key = NodeAddrKey {
        addr: u32::from_ne_bytes(NODE.octets()),
    };
    addrs.insert(&key, &NodeAddr::default(), 0).expect("insert");

    let udp = udp_to(NODE);
    assert_passes_unchanged(&dataplane, "UDP to the node before np_config", &udp);
    let stats = dataplane.stats().expect("stats");
    assert_eq!(
        stats.get(Counter::PassNotConfigured),
        traffic(1, &udp),
        "{stats:?}"
    );
    assert_eq!(stats.total().packets, 1, "{stats:?}");
}
