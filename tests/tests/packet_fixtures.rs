//! Packet fixtures through BPF_PROG_TEST_RUN: (maps seeded, input packet) -> (verdict, exact
//! output packet). Expected packets are built from scratch by `nodeport_tests::packet`, whose
//! checksums are computed over whole headers, so the programs' incremental checksum updates are
//! checked by an independent implementation. The FIB the programs consult is a real one, in a
//! namespace set up by `fixture_net`.
use std::net::Ipv4Addr;

use nodeport_common::{Counter, FRONTEND_AFFINITY, program_names};

/// Must equal `nodeport-ebpf/src/xdp.rs`'s JUDGED_MARK ("NPJD").
const JUDGED_MARK: u32 = 0x4e50_4a44;
use nodeport_tests::{
    fixture_net::*,
    harness::*,
    packet::{self, ACK, FIN, Frame, ICMP, SYN, TCP},
};

fn client_to(port: u16, cport: u16, flags: u8) -> Frame {
    Frame::tcp((CLIENT, cport), (NODE, port), flags).with_macs(CLIENT_MAC, NODE_MAC)
}

fn assert_untouched(h: &Harness, frame: &[u8], counter: Counter) {
    let before = h.stats().get(counter).packets;
    let (verdict, meta, out) = h.xdp_with_meta(frame);
    assert_eq!(verdict, XDP_PASS, "expected XDP_PASS for {counter:?}");
    assert_eq!(
        out, frame,
        "a packet we do not translate must come out byte-identical"
    );
    // Marked as judged (XDP metadata), so the TC ingress program beside XDP lets it through
    // without a second look or a second count.
    assert_eq!(
        meta,
        JUDGED_MARK.to_ne_bytes(),
        "judged packets carry the XDP mark"
    );
    assert_eq!(
        h.stats().get(counter).packets,
        before + 1,
        "{counter:?} not counted"
    );
}

#[test]
fn remote_backend_is_dnat_and_snat_and_transmitted_back_out() {
    let h = harness();
    let syn = client_to(NP_REMOTE, 61234, SYN).build();
    let (verdict, out) = h.xdp(&syn);
    assert_eq!(verdict, XDP_TX);
    // SNAT keeps the client's port (it is in the SNAT range and free); the FIB gives node2's MAC
    // as next hop for the remote pod CIDR; the TTL drops by one like a router's.
    let mut want =
        Frame::tcp((NODE, 61234), (REMOTE_POD, 8080), SYN).with_macs(NODE_MAC, NODE2_MAC);
    want.ttl = 63;
    assert_eq!(out, want.build());
    packet::parse_and_verify(&out).unwrap();

    // The next packet of the flow is translated the same way (established).
    let est = h.stats().get(Counter::Established).packets;
    let (verdict, out) = h.xdp(&client_to(NP_REMOTE, 61234, ACK).build());
    assert_eq!(verdict, XDP_TX);
    let mut want_ack =
        Frame::tcp((NODE, 61234), (REMOTE_POD, 8080), ACK).with_macs(NODE_MAC, NODE2_MAC);
    want_ack.ttl = 63;
    assert_eq!(out, want_ack.build());
    assert_eq!(h.stats().get(Counter::Established).packets, est + 1);

    // The backend's reply, arriving from node2, goes back to the client from nodeIP:nodePort.
    let reply =
        Frame::tcp((REMOTE_POD, 8080), (NODE, 61234), SYN | ACK).with_macs(NODE2_MAC, NODE_MAC);
    let (verdict, out) = h.xdp(&reply.build());
    assert_eq!(verdict, XDP_TX);
    let mut want =
        Frame::tcp((NODE, NP_REMOTE), (CLIENT, 61234), SYN | ACK).with_macs(NODE_MAC, CLIENT_MAC);
    want.ttl = 63;
    assert_eq!(out, want.build());
    assert_eq!(h.stats().get(Counter::Reply).packets, 1);
}

#[test]
fn client_port_outside_the_snat_range_gets_a_port_from_it() {
    let h = harness();
    let (verdict, out) = h.xdp(&client_to(NP_REMOTE, 40000, SYN).build());
    assert_eq!(verdict, XDP_TX);
    let p = packet::parse_and_verify(&out).unwrap();
    assert_eq!((p.src, p.dst, p.dport), (NODE, REMOTE_POD, 8080));
    assert!(
        (SNAT_MIN..=SNAT_MAX).contains(&p.sport),
        "SNAT port {} out of range",
        p.sport
    );
    // Another client using the same port gets a different SNAT port: no collision.
    let other = Frame::tcp(
        (Ipv4Addr::new(198, 18, 0, 101), 40000),
        (NODE, NP_REMOTE),
        SYN,
    )
    .with_macs(CLIENT_MAC, NODE_MAC);
    let (_, out2) = h.xdp(&other.build());
    let p2 = packet::parse_and_verify(&out2).unwrap();
    assert_ne!(p.sport, p2.sport, "two flows share a SNAT port");
}

#[test]
fn local_backend_is_dnat_only_and_its_reply_is_translated_on_egress() {
    let h = harness();
    let syn = client_to(NP_LOCAL, 45000, SYN).build();
    let (verdict, out) = h.xdp(&syn);
    // Handed to the stack, which forwards it to the pod (and decrements the TTL itself).
    assert_eq!(verdict, XDP_PASS);
    let want = Frame::tcp((CLIENT, 45000), (LOCAL_POD, 8080), SYN).with_macs(CLIENT_MAC, NODE_MAC);
    assert_eq!(
        out,
        want.build(),
        "DNAT only: the pod must see the client's address"
    );

    // The pod's reply leaves through the node interface: TC egress restores nodeIP:nodePort.
    let reply =
        Frame::tcp((LOCAL_POD, 8080), (CLIENT, 45000), SYN | ACK).with_macs(NODE_MAC, CLIENT_MAC);
    let (verdict, out) = h.tc(program_names::TC_EGRESS, h.net.node_ifindex, &reply.build());
    assert_eq!(verdict, TC_ACT_OK);
    let want =
        Frame::tcp((NODE, NP_LOCAL), (CLIENT, 45000), SYN | ACK).with_macs(NODE_MAC, CLIENT_MAC);
    assert_eq!(out, want.build());
}

#[test]
fn tc_ingress_translates_like_xdp_and_redirects() {
    let h = harness();
    let syn = client_to(NP_REMOTE, 61500, SYN).build();
    let (verdict, out) = h.tc(program_names::TC_INGRESS, h.net.node_ifindex, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    // bpf_redirect_neigh fills the MACs at transmit time, after the test run returns.
    let mut want =
        Frame::tcp((NODE, 61500), (REMOTE_POD, 8080), SYN).with_macs(CLIENT_MAC, NODE_MAC);
    want.ttl = 63;
    assert_eq!(out, want.build());
    // No backend: up to the stack untouched in TC too, which refuses it.
    let syn = client_to(NP_EMPTY, 50000, SYN).build();
    let (verdict, out) = h.tc(program_names::TC_INGRESS, h.net.node_ifindex, &syn);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, syn);
}

#[test]
fn udp_checksums_zero_stays_zero_and_nonzero_stays_valid() {
    let h = harness();
    let f = Frame::udp((CLIENT, 61999), (NODE, NP_UDP_REMOTE), b"query")
        .with_macs(CLIENT_MAC, NODE_MAC);
    let (verdict, out) = h.xdp(&f.build());
    assert_eq!(verdict, XDP_TX);
    let mut want =
        Frame::udp((NODE, 61999), (REMOTE_POD, 5353), b"query").with_macs(NODE_MAC, NODE2_MAC);
    want.ttl = 63;
    assert_eq!(out, want.build());

    let mut z = Frame::udp((CLIENT, 62000), (NODE, NP_UDP_REMOTE), b"query")
        .with_macs(CLIENT_MAC, NODE_MAC);
    z.udp_zero_checksum = true;
    let (verdict, out) = h.xdp(&z.build());
    assert_eq!(verdict, XDP_TX);
    let p = packet::parse_and_verify(&out).unwrap();
    assert_eq!(
        p.l4_checksum, 0,
        "a zero UDP checksum means none and must stay zero"
    );
    assert_eq!(
        (p.src, p.sport, p.dst, p.dport),
        (NODE, 62000, REMOTE_POD, 5353)
    );
}

#[test]
fn ip_options_are_kept_and_skipped_correctly() {
    let h = harness();
    let mut f = client_to(NP_REMOTE, 61700, SYN);
    // Two NOPs and an End-of-options list padding: IHL 6.
    f.ip_options = vec![1, 1, 0, 0];
    let (verdict, out) = h.xdp(&f.build());
    assert_eq!(verdict, XDP_TX);
    let mut want =
        Frame::tcp((NODE, 61700), (REMOTE_POD, 8080), SYN).with_macs(NODE_MAC, NODE2_MAC);
    want.ttl = 63;
    want.ip_options = vec![1, 1, 0, 0];
    assert_eq!(out, want.build());
}

#[test]
fn no_backend_goes_to_the_stack_and_etp_local_without_local_backend_drops() {
    // No endpoint: handed up untouched (and marked, so TC does not look again); the node's
    // stack refuses it, as kube-proxy's REJECT would. eTP=Local without a local one: dropped,
    // as kube-proxy does.
    let h = harness();
    let syn = client_to(NP_EMPTY, 50001, SYN).build();
    let (verdict, out) = h.xdp(&syn);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, syn, "untouched");
    assert_eq!(h.stats().get(Counter::PassNoBackend).packets, 1);
    assert_eq!(h.stats().get(Counter::DropNoBackend).packets, 0);
    let (verdict, _) = h.xdp(&client_to(NP_ETP_LOCAL_EMPTY, 50002, SYN).build());
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.stats().get(Counter::DropNoLocalBackend).packets, 1);
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend() {
    let h = harness();
    let mut seen = std::collections::BTreeSet::new();
    for cport in 50100..50130 {
        let (verdict, out) = h.xdp(&client_to(NP_AFFINITY, cport, SYN).build());
        assert_eq!(verdict, XDP_TX);
        seen.insert(packet::parse_and_verify(&out).unwrap().dst);
    }
    assert_eq!(
        seen.len(),
        1,
        "ClientIP affinity sent one client to {seen:?}"
    );
    // Without affinity the same 30 flows would spread; with it another client may land anywhere,
    // but stays put too.
    let other = |cport| {
        Frame::tcp(
            (Ipv4Addr::new(198, 18, 0, 101), cport),
            (NODE, NP_AFFINITY),
            SYN,
        )
        .with_macs(CLIENT_MAC, NODE_MAC)
    };
    let first = packet::parse_and_verify(&h.xdp(&other(50200).build()).1)
        .unwrap()
        .dst;
    for cport in 50201..50210 {
        assert_eq!(
            packet::parse_and_verify(&h.xdp(&other(cport).build()).1)
                .unwrap()
                .dst,
            first
        );
    }
}

#[test]
fn removed_backend_moves_the_flow_to_a_new_backend() {
    let mut h = harness();
    let (_, out) = h.xdp(&client_to(NP_AFFINITY, 61800, SYN).build());
    let first = packet::parse_and_verify(&out).unwrap().dst;
    let (gone, stays) = if first == REMOTE_POD { (1, 4) } else { (4, 1) };
    h.tables
        .put_service(&svc(NP_AFFINITY, TCP, 6, FRONTEND_AFFINITY, vec![stays]))
        .unwrap();
    h.tables.purge_affinity(6, &[stays]).unwrap();
    h.tables.remove_backend(gone).unwrap();
    let (verdict, out) = h.xdp(&client_to(NP_AFFINITY, 61800, ACK).build());
    assert_eq!(verdict, XDP_TX);
    assert_ne!(packet::parse_and_verify(&out).unwrap().dst, first);
    assert_eq!(h.stats().get(Counter::Reselected).packets, 1);
}

#[test]
fn closed_connection_and_port_reuse_reopen_the_flow() {
    let h = harness();
    for flags in [SYN, ACK, FIN | ACK] {
        assert_eq!(h.xdp(&client_to(NP_REMOTE, 61900, flags).build()).0, XDP_TX);
    }
    let reply =
        Frame::tcp((REMOTE_POD, 8080), (NODE, 61900), FIN | ACK).with_macs(NODE2_MAC, NODE_MAC);
    assert_eq!(h.xdp(&reply.build()).0, XDP_TX);
    // A new SYN on the same tuple (client port reuse) is still served.
    assert_eq!(h.xdp(&client_to(NP_REMOTE, 61900, SYN).build()).0, XDP_TX);
}

#[test]
fn traffic_that_is_not_nodeport_passes_untouched() {
    let h = harness();
    // ARP.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    assert_untouched(&h, &arp, Counter::PassNotIpv4);
    // An ssh-like port on the node address.
    assert_untouched(
        &h,
        &client_to(22, 50000, SYN).build(),
        Counter::PassNotNodePort,
    );
    // A nodePort on an address that is not a NodePort address.
    let other = Frame::tcp(
        (CLIENT, 50000),
        (Ipv4Addr::new(198, 18, 0, 77), NP_REMOTE),
        SYN,
    );
    assert_untouched(&h, &other.build(), Counter::PassNotNodePort);
    // ICMP echo to the node.
    let mut icmp = client_to(NP_REMOTE, 0, 0);
    icmp.proto = ICMP;
    assert_untouched(&h, &icmp.build(), Counter::PassNotNodePort);
    // A reply-looking packet in the SNAT range that matches no flow.
    let stray = Frame::tcp((REMOTE_POD, 8080), (NODE, 62222), ACK).with_macs(NODE2_MAC, NODE_MAC);
    assert_untouched(&h, &stray.build(), Counter::PassNotNodePort);
}

#[test]
fn malformed_fragmented_and_expiring_packets_pass_untouched() {
    let h = harness();
    let good = client_to(NP_REMOTE, 61950, SYN).build();
    // Truncated at every length inside the headers: never translated.
    // (BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header.)
    for cut in [14, 20, 33, 40, 53] {
        let (verdict, out) = h.xdp(&good[..cut]);
        assert_eq!(verdict, XDP_PASS, "cut at {cut}");
        assert_eq!(out, &good[..cut]);
    }
    // Total length claims more than arrived.
    let mut long = good.clone();
    long[16..18].copy_from_slice(&200u16.to_be_bytes());
    assert_untouched(&h, &long, Counter::PassMalformed);
    // IHL below 5.
    let mut ihl = good.clone();
    ihl[14] = 0x44;
    assert_untouched(&h, &ihl, Counter::PassMalformed);
    // First fragment (MF) and a later fragment.
    for frag in [0x2000u16, 0x0010] {
        let mut f = client_to(NP_REMOTE, 61951, SYN);
        f.frag = frag;
        assert_untouched(&h, &f.build(), Counter::PassFragment);
    }
    // TTL 1: a router would not forward it; the stack decides.
    let mut ttl = client_to(NP_REMOTE, 61952, SYN);
    ttl.ttl = 1;
    assert_untouched(&h, &ttl.build(), Counter::PassTtlExceeded);
    // None of these created a flow.
    assert!(h.tables.conntrack().unwrap().is_empty());
}

#[test]
fn expired_flows_are_swept_with_their_reverse_entries_and_services_counted() {
    let mut h = harness();
    let mut cfg = h.tables.config().unwrap();
    cfg.tcp_syn_timeout_s = 0; // every unanswered SYN expires at once
    h.tables.set_config(&cfg).unwrap();
    assert_eq!(h.xdp(&client_to(NP_REMOTE, 61990, SYN).build()).0, XDP_TX);
    assert_eq!(h.xdp(&client_to(NP_LOCAL, 45990, SYN).build()).0, XDP_PASS);
    assert_eq!(h.tables.conntrack().unwrap().len(), 2);
    assert_eq!(h.tables.rev_nat().unwrap().len(), 2);
    let swept = h
        .tables
        .sweep_expired(nodeport_agent::tables::monotonic_ns())
        .unwrap();
    assert_eq!(swept, 2);
    assert!(h.tables.conntrack().unwrap().is_empty());
    assert!(h.tables.rev_nat().unwrap().is_empty());
    // Per-service counters saw one packet each, with its bytes.
    let t = h.tables.service_traffic(1).unwrap();
    assert_eq!(t.packets, 1);
    assert_eq!(
        t.bytes,
        client_to(NP_REMOTE, 61990, SYN).build().len() as u64
    );
    assert_eq!(h.tables.service_traffic(2).unwrap().packets, 1);
}

#[test]
fn etp_local_with_a_local_backend_is_dnat_only() {
    let mut h = harness();
    h.tables
        .put_service(&svc(
            NP_ETP_LOCAL_EMPTY,
            TCP,
            5,
            nodeport_common::FRONTEND_ETP_LOCAL,
            vec![2],
        ))
        .unwrap();
    let (verdict, out) = h.xdp(&client_to(NP_ETP_LOCAL_EMPTY, 45500, SYN).build());
    assert_eq!(verdict, XDP_PASS);
    let want = Frame::tcp((CLIENT, 45500), (LOCAL_POD, 8080), SYN).with_macs(CLIENT_MAC, NODE_MAC);
    assert_eq!(out, want.build(), "eTP Local keeps the client's address");
}

/// A DNAT-only flow whose tuple towards the pod another flow holds (same client and port, another
/// nodePort served by the same pod port; tests/tests/fuzz_findings.rs has the remap itself):
/// the tuple of an expired flow is taken over with the client's own port, and when no port of
/// the SNAT range is free the new flow drops as `drop_snat_exhausted` while the holder's replies
/// keep their translation.
#[test]
fn clashing_dnat_only_flow_takes_over_an_expired_tuple_or_drops_without_a_free_port() {
    let mut h = harness();
    const NP_LOCAL_2: u16 = 30095;
    h.tables
        .put_service(&svc(NP_LOCAL_2, TCP, 7, 0, vec![2]))
        .unwrap();
    let at_pod = |sport: u16, flags: u8| {
        Frame::tcp((CLIENT, sport), (LOCAL_POD, 8080), flags).with_macs(CLIENT_MAC, NODE_MAC)
    };
    let pod_reply = |dport: u16| {
        Frame::tcp((LOCAL_POD, 8080), (CLIENT, dport), SYN | ACK)
            .with_macs(NODE_MAC, CLIENT_MAC)
            .build()
    };
    let mut cfg = h.tables.config().unwrap();

    // The holder expires at once (SYN timeout 0); the next flow takes its tuple over unchanged.
    cfg.tcp_syn_timeout_s = 0;
    h.tables.set_config(&cfg).unwrap();
    assert_eq!(h.xdp(&client_to(NP_LOCAL, 45000, SYN).build()).0, XDP_PASS);
    cfg.tcp_syn_timeout_s = 60;
    h.tables.set_config(&cfg).unwrap();
    let (verdict, out) = h.xdp(&client_to(NP_LOCAL_2, 45000, SYN).build());
    assert_eq!(
        (verdict, out),
        (XDP_PASS, at_pod(45000, SYN).build()),
        "the expired flow's tuple is free: the client's port is kept"
    );
    let (verdict, out) = h.tc(
        program_names::TC_EGRESS,
        h.net.node_ifindex,
        &pod_reply(45000),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let want =
        Frame::tcp((NODE, NP_LOCAL_2), (CLIENT, 45000), SYN | ACK).with_macs(NODE_MAC, CLIENT_MAC);
    assert_eq!(out, want.build(), "the reply belongs to the live flow");

    // A SNAT range of one port, which the holder itself uses: no port left for the remap.
    cfg.snat_port_min = 62000;
    cfg.snat_port_max = 62000;
    h.tables.set_config(&cfg).unwrap();
    assert_eq!(h.xdp(&client_to(NP_LOCAL, 62000, SYN).build()).0, XDP_PASS);
    let flows = h.tables.conntrack().unwrap().len();
    let (verdict, _) = h.xdp(&client_to(NP_LOCAL_2, 62000, SYN).build());
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.stats().get(Counter::DropSnatExhausted).packets, 1);
    assert_eq!(
        h.tables.conntrack().unwrap().len(),
        flows,
        "no flow for the dropped packet"
    );
    let (verdict, out) = h.tc(
        program_names::TC_EGRESS,
        h.net.node_ifindex,
        &pod_reply(62000),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let want =
        Frame::tcp((NODE, NP_LOCAL), (CLIENT, 62000), SYN | ACK).with_macs(NODE_MAC, CLIENT_MAC);
    assert_eq!(
        out,
        want.build(),
        "the holder's replies keep their translation"
    );
}
