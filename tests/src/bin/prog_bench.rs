//! Per-packet cost of the dataplane programs, from BPF_PROG_TEST_RUN, by path, with 1 and with
//! 10,000 services loaded. A benchmark, not a test: it prints figures (`cargo xtask bench-prog`).
//!
//! Why not `repeat`: the kernel re-runs the program on the same buffer, which the first run has
//! already rewritten, so from the second repetition on a translated packet takes another path
//! (seen: the "established" figure was a pass). Every path is therefore measured as `--runs`
//! single runs (repeat = 1) of fresh input, averaging the kernel's own per-run time; the floor row
//! shows what one run costs with nothing to do (timer and dispatch), for reading the others. A
//! first packet runs over distinct flows, one run each.
use std::{net::Ipv4Addr, time::Duration};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use clap::Parser;
use nodeport_common::program_names;
use nodeport_tests::{
    fixture_net::*,
    harness::*,
    packet::{ACK, Frame, SYN, TCP},
};

#[derive(Parser)]
struct Args {
    /// Single runs per figure (each a BPF_PROG_TEST_RUN call with repeat = 1).
    #[arg(long, default_value_t = 1_000_000)]
    runs: u32,
    /// Distinct flows for the first-packet figure (at most 4,500: each keeps its client port
    /// as SNAT port, so no allocation retries distort the figure).
    #[arg(long, default_value_t = 4_000)]
    flows: u32,
    /// Service counts to measure with.
    #[arg(long, value_delimiter = ',', default_value = "1,10000")]
    services: Vec<u32>,
}

/// nodePort of the extra services: 20000 upwards (10,000 services need more ports than the
/// default 30000-32767 range has; clusters that big widen --service-node-port-range).
const EXTRA_BASE: u16 = 20000;

/// Client (and so SNAT) port of the flow whose established and reply packets are measured.
const MEASURED_PORT: u16 = 65500;

#[derive(Clone, Copy, PartialEq)]
enum Prog {
    Xdp,
    TcIngress,
    TcEgress,
}

/// Mean kernel-measured ns per run over `frames` (each run `runs_each` times). Panics unless
/// every run returned `want`, so a figure is never reported for a path the packet did not take.
fn measure(h: &Harness, frames: &[Vec<u8>], runs_each: u32, prog: Prog, want: u32) -> f64 {
    let (total, n, bad) = h.net.run(|| {
        let tc: &SchedClassifier =
            h.dp.ebpf()
                .program(if prog == Prog::TcEgress {
                    program_names::TC_EGRESS
                } else {
                    program_names::TC_INGRESS
                })
                .unwrap()
                .try_into()
                .unwrap();
        let xdp = h.dp.xdp().unwrap();
        let mut ctx_tc = vec![0u8; 192];
        ctx_tc[40..44].copy_from_slice(&h.net.node_ifindex.to_ne_bytes());
        let (mut total, mut n, mut bad) = (Duration::ZERO, 0u64, None);
        let mut out = vec![0u8; 2048];
        for frame in frames {
            let ctx_xdp: Vec<u8> = [0, frame.len() as u32, 0, h.net.node_ifindex, 0, 0]
                .iter()
                .flat_map(|v| v.to_ne_bytes())
                .collect();
            for _ in 0..runs_each {
                let opts = TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(if prog == Prog::Xdp { &ctx_xdp } else { &ctx_tc }),
                    repeat: 1,
                    ..Default::default()
                };
                let r = match prog {
                    Prog::Xdp => xdp.test_run(opts),
                    Prog::TcIngress | Prog::TcEgress => tc.test_run(opts),
                }
                .expect("BPF_PROG_TEST_RUN");
                if r.return_value != want {
                    bad = Some(r.return_value);
                }
                total += r.duration;
                n += 1;
            }
        }
        (total, n, bad)
    });
    if let Some(verdict) = bad {
        let stats = h.stats();
        let nonzero: Vec<_> = stats
            .iter()
            .filter(|(_, t)| t.packets > 0)
            .map(|(c, t)| (c.name(), t.packets))
            .collect();
        panic!("verdict {verdict}, expected {want}: not the intended path; counters {nonzero:?}");
    }
    total.as_nanos() as f64 / n as f64
}

fn seed_extra_services(h: &mut Harness, count: u32) {
    // 5 remote backends each.
    let mut next_backend = 100;
    for i in 0..count.saturating_sub(1) {
        let mut ids = Vec::new();
        for j in 0..5u32 {
            let n = i * 5 + j;
            let addr = Ipv4Addr::new(10, 244, 2, (n % 250) as u8 + 2);
            let (id, b) = be(next_backend, addr, 8000 + (n / 250) as u16, TCP, false);
            h.tables.put_backend(id, b).unwrap();
            ids.push(id);
            next_backend += 1;
        }
        h.tables
            .put_service(&svc(EXTRA_BASE + i as u16, TCP, 100 + i, 0, ids))
            .unwrap();
    }
}

fn main() {
    let args = Args::parse();
    assert!(args.flows <= 4500, "--flows at most 4500");
    println!(
        "BPF_PROG_TEST_RUN per-packet cost, mean ns per run ({} single runs per figure; first packet over {} flows)",
        args.runs, args.flows
    );
    let header: Vec<String> = args
        .services
        .iter()
        .map(|s| format!("{:>10} svc", s))
        .collect();
    println!("{:<46} {}", "path", header.join(" "));
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let mut push = |name: &str, v: f64| match rows.iter_mut().find(|(n, _)| n == name) {
        Some((_, vs)) => vs.push(v),
        None => rows.push((name.to_owned(), vec![v])),
    };
    for &services in &args.services {
        let mut h = harness();
        seed_extra_services(&mut h, services);
        let to_node = |port, cport, flags| {
            Frame::tcp((CLIENT, cport), (NODE, port), flags).with_macs(CLIENT_MAC, NODE_MAC)
        };
        let runs = args.runs;
        let other_addr =
            Frame::udp((CLIENT, 5000), (Ipv4Addr::new(198, 18, 0, 77), 53), b"x").build();
        push("floor: XDP_PASS of a non-IPv4 frame", {
            let mut arp = vec![0xffu8; 12];
            arp.extend_from_slice(&[0x08, 0x06]);
            arp.extend_from_slice(&[0u8; 28]);
            measure(&h, &[arp], runs, Prog::Xdp, XDP_PASS)
        });
        push(
            "XDP not NodePort (other destination)",
            measure(&h, &[other_addr], runs, Prog::Xdp, XDP_PASS),
        );
        push(
            "XDP not NodePort (node address, port 22)",
            measure(
                &h,
                &[to_node(22, 5000, SYN).build()],
                runs,
                Prog::Xdp,
                XDP_PASS,
            ),
        );
        let flows: Vec<Vec<u8>> = (0..args.flows)
            .map(|i| {
                let client = Ipv4Addr::new(198, 18, 1 + (i / 250) as u8, (i % 250) as u8 + 1);
                Frame::tcp((client, SNAT_MIN + i as u16), (NODE, NP_REMOTE), SYN)
                    .with_macs(CLIENT_MAC, NODE_MAC)
                    .build()
            })
            .collect();
        push(
            "XDP first packet (new flow, SNAT)",
            measure(&h, &flows, 1, Prog::Xdp, XDP_TX),
        );
        // The measured flow's port is above the first-packet flows' ports (61000 + i), so it keeps
        // it as its SNAT port and the reply below belongs to it.
        measure(
            &h,
            &[to_node(NP_REMOTE, MEASURED_PORT, SYN).build()],
            1,
            Prog::Xdp,
            XDP_TX,
        );
        let ack = to_node(NP_REMOTE, MEASURED_PORT, ACK).build();
        push(
            "XDP established (SNAT, remote backend)",
            measure(&h, std::slice::from_ref(&ack), runs, Prog::Xdp, XDP_TX),
        );
        let reply = Frame::tcp((REMOTE_POD, 8080), (NODE, MEASURED_PORT), ACK)
            .with_macs(NODE2_MAC, NODE_MAC)
            .build();
        push(
            "XDP reply (reverse SNAT)",
            measure(&h, &[reply], runs, Prog::Xdp, XDP_TX),
        );
        let udp = Frame::udp((CLIENT, 61300), (NODE, NP_UDP_REMOTE), b"query")
            .with_macs(CLIENT_MAC, NODE_MAC)
            .build();
        push(
            "XDP established UDP",
            measure(&h, &[udp], runs, Prog::Xdp, XDP_TX),
        );
        push(
            "TC ingress established (SNAT)",
            measure(&h, &[ack], runs, Prog::TcIngress, TC_ACT_REDIRECT),
        );
        // DNAT-only flows to the local pod: XDP hands them to the stack (XDP_PASS), the pod's
        // replies are translated on TC egress.
        let local_flows: Vec<Vec<u8>> = (0..args.flows)
            .map(|i| {
                let client = Ipv4Addr::new(198, 18, 1 + (i / 250) as u8, (i % 250) as u8 + 1);
                Frame::tcp((client, SNAT_MIN + i as u16), (NODE, NP_LOCAL), SYN)
                    .with_macs(CLIENT_MAC, NODE_MAC)
                    .build()
            })
            .collect();
        push(
            "XDP first packet (new flow, DNAT only)",
            measure(&h, &local_flows, 1, Prog::Xdp, XDP_PASS),
        );
        measure(
            &h,
            &[to_node(NP_LOCAL, MEASURED_PORT, SYN).build()],
            1,
            Prog::Xdp,
            XDP_PASS,
        );
        let local_ack = to_node(NP_LOCAL, MEASURED_PORT, ACK).build();
        push(
            "XDP established (DNAT only, local pod)",
            measure(&h, &[local_ack], runs, Prog::Xdp, XDP_PASS),
        );
        let local_reply = Frame::tcp((LOCAL_POD, 8080), (CLIENT, MEASURED_PORT), ACK)
            .with_macs(NODE_MAC, CLIENT_MAC)
            .build();
        push(
            "TC egress reply (local pod)",
            measure(&h, &[local_reply], runs, Prog::TcEgress, TC_ACT_OK),
        );
    }
    for (name, vs) in rows {
        let cols: Vec<String> = vs.iter().map(|v| format!("{v:>14.1}")).collect();
        println!("{name:<46} {}", cols.join(" "));
    }
}
