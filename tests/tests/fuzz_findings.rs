//! What the packet fuzzer (tests/tests/fuzz.rs) found, reduced to minimal packets: each test
//! pins down the behaviour today, the fix where there is one, or what is still wrong with it
//! (docs/RELIABILITY.md, "Packet fuzzing", findings). The maps and the namespace are the
//! fuzzer's world (`fuzz::world`).
use std::net::Ipv4Addr;

use nodeport_common::program_names;
use nodeport_tests::{
    fixture_net::*,
    fuzz::{check::JUDGED_MARK, world},
    harness::*,
    packet::{self, Frame, SYN},
};

fn fuzz_world() -> Harness {
    let mut h = harness();
    world::seed(&mut h);
    h
}

/// Finding 1 (seed 0x6e7066757a7a3031, case 12, once the world had a local pod without a
/// neighbour entry), fixed: XDP translated a DNAT-only packet for a local pod the node had not
/// resolved yet and passed it up *without* the "judged" mark (xdp.rs `forward` returned XDP_PASS
/// instead of `pass_judged`), so TC ingress beside it counted it a second time as
/// `pass_not_nodeport`. The design marks every packet XDP judged.
#[test]
fn xdp_dnat_to_an_unresolved_local_pod_goes_up_translated_and_marked() {
    let h = fuzz_world();
    let pod = Ipv4Addr::new(10, 244, 1, 11); // backend 7: local, no neighbour entry
    let client = Ipv4Addr::new(198, 18, 0, 102);
    let syn = Frame::tcp((client, 50000), (NODE, 30105), SYN).with_macs(CLIENT_MAC, NODE_MAC);
    let (verdict, meta, out) = h.xdp_with_meta(&syn.build());
    assert_eq!(verdict, XDP_PASS);
    let want = Frame::tcp((client, 50000), (pod, 8080), SYN).with_macs(CLIENT_MAC, NODE_MAC);
    assert_eq!(
        out,
        want.build(),
        "DNAT only, checksums recomputed from scratch"
    );
    packet::parse_and_verify(&out).unwrap();
    assert_eq!(
        meta,
        JUDGED_MARK.to_ne_bytes(),
        "XDP marks every packet it judged, so TC ingress skips it"
    );
}

/// Finding 2 (in every run, ~8,000 times per 500,000 packets with the fuzzer's small client
/// pools), fixed: two DNAT-only flows of one client, from the same source port to two nodePorts
/// (or node addresses) served by the same local pod port, reached the pod as one tuple, and the
/// second flow's reverse-NAT entry overwrote the first's, so every reply of the pod left with the
/// second nodePort as source and the first connection broke. Now, like netfilter's implicit
/// source-port remap (nf_nat `get_unique_tuple`), a flow whose tuple towards the pod another
/// live flow holds gets another source port from the SNAT range; the client's address stays.
#[test]
fn dnat_only_flows_with_one_pod_tuple_get_their_source_port_remapped() {
    let h = fuzz_world();
    let port = 61000;
    let to = |node: Ipv4Addr, node_port: u16, sport: u16, flags: u8| {
        Frame::tcp((CLIENT, sport), (node, node_port), flags).with_macs(CLIENT_MAC, NODE_MAC)
    };
    let at_pod = |sport: u16, flags: u8| {
        Frame::tcp((CLIENT, sport), (LOCAL_POD, 8080), flags).with_macs(CLIENT_MAC, NODE_MAC)
    };
    // Flow A to NP_LOCAL (30081) keeps the client's port; flow B to the eTP Local service 30103
    // and flow C to NP_LOCAL on the second node address reach the same LOCAL_POD:8080 from the
    // same client port, so each gets a port of its own, the client's address unchanged.
    let (verdict, out) = h.xdp(&to(NODE, NP_LOCAL, port, SYN).build());
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, at_pod(port, SYN).build(), "flow A: DNAT only");
    let mut remapped = Vec::new();
    for (node, node_port) in [(NODE, 30103), (world::NODE_B, NP_LOCAL)] {
        let (verdict, out) = h.xdp(&to(node, node_port, port, SYN).build());
        assert_eq!(
            verdict, XDP_PASS,
            "DNAT only: the stack forwards it to the pod"
        );
        let p = packet::parse_and_verify(&out).unwrap();
        assert_eq!((p.src, p.dst, p.dport), (CLIENT, LOCAL_POD, 8080));
        assert!(
            (SNAT_MIN..=SNAT_MAX).contains(&p.sport) && p.sport != port,
            "{node}:{node_port}: source port {} must be remapped into the SNAT range",
            p.sport
        );
        assert!(
            !remapped.contains(&p.sport),
            "two flows share port {}",
            p.sport
        );
        assert_eq!(out, at_pod(p.sport, SYN).build(), "only the port changes");
        remapped.push(p.sport);
    }
    let (b_port, c_port) = (remapped[0], remapped[1]);
    assert_eq!(h.tables.conntrack().unwrap().len(), 3);
    assert_eq!(
        h.tables.rev_nat().unwrap().len(),
        3,
        "one reverse entry per flow"
    );

    // Later packets of each flow are translated the same way, on XDP and on TC ingress.
    let (verdict, out) = h.xdp(&to(NODE, 30103, port, packet::ACK).build());
    assert_eq!(
        (verdict, out),
        (XDP_PASS, at_pod(b_port, packet::ACK).build())
    );
    let (verdict, out) = h.tc(
        program_names::TC_INGRESS,
        h.net.node_ifindex,
        &to(NODE, NP_LOCAL, port, packet::ACK).build(),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut want = at_pod(port, packet::ACK);
    want.ttl = 63;
    assert_eq!(
        out,
        want.build(),
        "flow A on TC ingress: the client's own port"
    );
    let (verdict, out) = h.tc(
        program_names::TC_INGRESS,
        h.net.node_ifindex,
        &to(world::NODE_B, NP_LOCAL, port, packet::ACK).build(),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let mut want = at_pod(c_port, packet::ACK);
    want.ttl = 63;
    assert_eq!(out, want.build(), "flow C on TC ingress: its remapped port");

    // The pod's replies go back to the client's own port, each from its flow's node address
    // and nodePort.
    for (pod_dport, src) in [
        (port, (NODE, NP_LOCAL)),
        (b_port, (NODE, 30103)),
        (c_port, (world::NODE_B, NP_LOCAL)),
    ] {
        let reply = Frame::tcp((LOCAL_POD, 8080), (CLIENT, pod_dport), SYN | packet::ACK)
            .with_macs(NODE_MAC, CLIENT_MAC);
        let (verdict, out) = h.tc(program_names::TC_EGRESS, h.net.node_ifindex, &reply.build());
        assert_eq!(verdict, TC_ACT_OK);
        let want =
            Frame::tcp(src, (CLIENT, port), SYN | packet::ACK).with_macs(NODE_MAC, CLIENT_MAC);
        assert_eq!(
            out,
            want.build(),
            "the pod's reply to {CLIENT}:{pod_dport} leaves as {}:{} -> {CLIENT}:{port}",
            src.0,
            src.1
        );
        packet::parse_and_verify(&out).unwrap();
    }

    // A flow whose own client port is a remapped flow's port towards the pod is remapped too.
    let (verdict, out) = h.xdp(&to(NODE, NP_LOCAL, b_port, SYN).build());
    assert_eq!(verdict, XDP_PASS);
    let d = packet::parse_and_verify(&out).unwrap();
    assert!(
        ![port, b_port, c_port].contains(&d.sport) && (SNAT_MIN..=SNAT_MAX).contains(&d.sport),
        "port {} of a flow from {CLIENT}:{b_port}",
        d.sport
    );

    // `list conntrack` shows the remapped port; the sweep finds every flow's reverse entry.
    let rows = nodeport_agent::inspect::conntrack(&h.tables).unwrap();
    let row = |client_port: u16, frontend: String| {
        rows.iter()
            .find(|r| r.client == format!("{CLIENT}:{client_port}") && r.frontend == frontend)
            .unwrap_or_else(|| panic!("no row for {client_port} -> {frontend} in {rows:?}"))
    };
    assert_eq!(row(port, format!("{NODE}:{NP_LOCAL}")).port_remap, None);
    assert_eq!(
        row(port, format!("{NODE}:30103")).port_remap,
        Some(format!("{CLIENT}:{b_port}"))
    );
    assert_eq!(row(port, format!("{NODE}:30103")).snat, None);
    let mut h = h;
    assert_eq!(h.tables.sweep_expired(u64::MAX).unwrap(), 4);
    assert!(h.tables.conntrack().unwrap().is_empty());
    assert!(h.tables.rev_nat().unwrap().is_empty());
}

/// Finding 3 (by design, docs/ARCHITECTURE.md does not translate ICMP): an ICMP error about a
/// source-NATed flow (here "fragmentation needed" from the backend's side about node:snatPort ->
/// backend) passes to the node's stack untouched, which has no socket for it: the client never
/// learns the path MTU (a PMTU black hole behind a smaller-MTU hop) and port-unreachable errors
/// never reach the other side. kube-proxy's conntrack translates such errors (RELATED).
#[test]
fn icmp_errors_about_nodeport_flows_pass_untranslated() {
    let h = fuzz_world();
    let syn = Frame::tcp((CLIENT, 61001), (NODE, NP_REMOTE), SYN).with_macs(CLIENT_MAC, NODE_MAC);
    let (verdict, out) = h.xdp(&syn.build());
    assert_eq!(verdict, XDP_TX);
    let sent = packet::parse_and_verify(&out).unwrap();
    assert_eq!((sent.src, sent.sport), (NODE, 61001));
    // Node2 (on the way to the backend) answers: fragmentation needed, MTU 1400, quoting the
    // source-NATed packet's IP header and first 8 bytes.
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0x78];
    icmp.extend_from_slice(&out[14..14 + 28]);
    let c = packet::checksum(0, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut err = Frame::tcp((NODE2, 0), (NODE, 0), 0).with_macs(NODE2_MAC, NODE_MAC);
    err.proto = packet::ICMP;
    err.payload = Vec::new();
    let mut frame = err.build();
    frame.truncate(14 + 20);
    frame.extend_from_slice(&icmp);
    let tot = (frame.len() - 14) as u16;
    frame[16..18].copy_from_slice(&tot.to_be_bytes());
    frame[24..26].fill(0);
    let c = packet::checksum(0, &frame[14..34]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    for (name, verdict, out) in [
        ("XDP", XDP_PASS, h.xdp(&frame)),
        (
            "TC ingress",
            TC_ACT_OK,
            h.tc(program_names::TC_INGRESS, h.net.node_ifindex, &frame),
        ),
    ] {
        assert_eq!(out, (verdict, frame.clone()), "{name}: passed untouched");
    }
}
