//! The real XDP program attached to a veth in its own network namespace sees real packets: UDP
//! datagrams sent from the peer namespace are counted in np_stats and still delivered (XDP_PASS).

use std::{net::UdpSocket, time::Duration};

use nodeport_agent::{Attached, Dataplane, Stats, XdpAttachMode};
use nodeport_common::Counter;
use nodeport_tests::{
    netns::{VethPair, link_details},
    pins::TestPins,
};

const PACKETS: usize = 64;
const PORT: u16 = 9_999;

fn counts_real_udp(mode: XdpAttachMode) {
    let pins = TestPins::new();
    let pair = VethPair::new();

    let attached = pair.a.run(|| {
        let mut dataplane = Dataplane::load(pins.layout()).expect("loading the dataplane");
        dataplane
            .attach_xdp(&pair.a_if, mode)
            .expect("attaching XDP")
    });
    assert!(matches!(attached, Attached::Linked(_)), "{attached:?}");
    // The process that attached is gone from the picture (the Dataplane was dropped): the pinned
    // link keeps the program on the interface, in the mode asked for.
    let details = link_details(&pair.a, &pair.a_if);
    let mode_word = match mode {
        XdpAttachMode::Native => "xdp",
        XdpAttachMode::Generic => "xdpgeneric",
    };
    assert!(
        details.split_whitespace().any(|w| w == mode_word) && details.contains("np_xdp"),
        "np_xdp not attached in {mode:?} mode:\n{details}"
    );

    // Sockets stay in the namespace they were created in, whichever thread uses them.
    let rx = pair
        .a
        .run(|| UdpSocket::bind((VethPair::A_ADDR, PORT)).expect("bind receiver"));
    let tx = pair
        .b
        .run(|| UdpSocket::bind((VethPair::B_ADDR, 0)).expect("bind sender"));
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let before = Stats::read_pinned(pins.layout()).expect("stats before");
    let mut received = 0;
    let mut buf = [0u8; 64];
    for i in 0..PACKETS {
        let payload = format!("datagram {i}");
        tx.send_to(payload.as_bytes(), (VethPair::A_ADDR, PORT))
            .expect("send");
        // One at a time: the first waits for ARP, none can pile up in the neighbour queue.
        match rx.recv(&mut buf) {
            Ok(n) => {
                assert_eq!(&buf[..n], payload.as_bytes());
                received += 1;
            }
            Err(e) => panic!("datagram {i} not delivered through XDP_PASS: {e}"),
        }
    }
    let delta = Stats::read_pinned(pins.layout())
        .expect("stats after")
        .since(&before);

    assert_eq!(received, PACKETS);
    let udp = delta.get(Counter::PassNotNodePort);
    assert!(
        udp.packets >= PACKETS as u64,
        "np_stats counted {} of {PACKETS} datagrams as pass_not_nodeport: {delta:?}",
        udp.packets
    );
    // 14 + 20 + 8 + at least "datagram 0".
    assert!(udp.bytes >= (PACKETS * (42 + 10)) as u64, "{delta:?}");
    assert!(delta.total().packets >= PACKETS as u64);
}

#[test]
fn native_xdp_on_veth_counts_and_passes_real_udp() {
    counts_real_udp(XdpAttachMode::Native);
}

#[test]
fn generic_xdp_on_veth_counts_and_passes_real_udp() {
    counts_real_udp(XdpAttachMode::Generic);
}
