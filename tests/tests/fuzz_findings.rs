//! What the packet fuzzer (tests/tests/fuzz.rs) found, reduced to minimal packets: each test
//! pins down the behaviour today and says what is wrong with it (docs/RELIABILITY.md, "Packet
//! fuzzing", findings). The maps and the namespace are the fuzzer's world (`fuzz::world`).
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
/// pools): two DNAT-only flows of one client, from the same source port to two nodePorts served
/// by the same local pod port, reach the pod as one tuple. The reverse-NAT entry of the second
/// overwrites the first's, so every reply of the pod leaves with the second nodePort as source,
/// also the first flow's: the first client connection breaks. kube-proxy never sends such a
/// reply: it masquerades nodePort traffic to local endpoints under eTP Cluster (a fresh source
/// port), and conntrack refuses a clashing tuple. A fix needs a source-port remap for the
/// second flow (DNAT + SNAT on a clash).
#[test]
fn two_dnat_only_flows_with_one_pod_tuple_share_one_reply_translation() {
    let h = fuzz_world();
    let port = 61000;
    // Flow A to NP_LOCAL (30081), flow B to the eTP Local service 30103: both LOCAL_POD:8080.
    for node_port in [NP_LOCAL, 30103] {
        let syn =
            Frame::tcp((CLIENT, port), (NODE, node_port), SYN).with_macs(CLIENT_MAC, NODE_MAC);
        let (verdict, out) = h.xdp(&syn.build());
        assert_eq!(verdict, XDP_PASS);
        let want =
            Frame::tcp((CLIENT, port), (LOCAL_POD, 8080), SYN).with_macs(CLIENT_MAC, NODE_MAC);
        assert_eq!(
            out,
            want.build(),
            "both flows reach the pod as the same tuple"
        );
    }
    assert_eq!(h.tables.conntrack().unwrap().len(), 2);
    assert_eq!(
        h.tables.rev_nat().unwrap().len(),
        1,
        "one reverse entry for two flows"
    );
    let reply = Frame::tcp((LOCAL_POD, 8080), (CLIENT, port), SYN | packet::ACK)
        .with_macs(NODE_MAC, CLIENT_MAC);
    let (verdict, out) = h.tc(program_names::TC_EGRESS, h.net.node_ifindex, &reply.build());
    assert_eq!(verdict, TC_ACT_OK);
    let p = packet::parse_and_verify(&out).unwrap();
    assert_eq!(
        (p.src, p.sport),
        (NODE, 30103),
        "the reply leaves as the last flow's; flow A's client expected {NODE}:{NP_LOCAL}"
    );
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
