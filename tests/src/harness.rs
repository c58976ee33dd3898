//! A loaded dataplane with seeded services, run through BPF_PROG_TEST_RUN inside a
//! `FixtureNet` namespace: shared by the packet fixtures and the program-cost benchmark.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};
use nodeport_agent::{
    Dataplane, PinLayout, Stats,
    tables::{BackendEntry, ServiceEntry, ServiceTables},
};
use nodeport_common::{BACKEND_LOCAL, Config, FRONTEND_AFFINITY, FRONTEND_ETP_LOCAL};

use crate::{
    fixture_net::*,
    packet::{TCP, UDP},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const SNAT_MIN: u16 = 61000;
pub const SNAT_MAX: u16 = 65535;

// Services seeded in every harness (nodePort -> backends).
pub const NP_REMOTE: u16 = 30080; // TCP -> remote pod 10.244.2.10:8080
pub const NP_LOCAL: u16 = 30081; // TCP -> local pod 10.244.1.10:8080
pub const NP_UDP_REMOTE: u16 = 30053; // UDP -> 10.244.2.10:5353
pub const NP_EMPTY: u16 = 30090; // TCP, no backends
pub const NP_ETP_LOCAL_EMPTY: u16 = 30091; // TCP, eTP Local, no local backends
pub const NP_AFFINITY: u16 = 30092; // TCP, ClientIP affinity over two remote pods

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Harness {
    pub net: FixtureNet,
    pub dp: Dataplane,
    pub tables: ServiceTables,
    pub layout: PinLayout,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = nodeport_agent::unload(&self.layout, false);
        let _ = std::fs::remove_dir_all(self.layout.root());
    }
}

pub fn be(id: u32, addr: Ipv4Addr, port: u16, proto: u8, local: bool) -> (u32, BackendEntry) {
    let flags = if local { BACKEND_LOCAL } else { 0 };
    (
        id,
        BackendEntry {
            addr: SocketAddrV4::new(addr, port),
            proto,
            flags,
        },
    )
}

pub fn svc(node_port: u16, proto: u8, svc_id: u32, flags: u16, backends: Vec<u32>) -> ServiceEntry {
    let affinity_timeout_s = if flags & FRONTEND_AFFINITY != 0 {
        10800
    } else {
        0
    };
    ServiceEntry {
        node_port,
        proto,
        svc_id,
        flags,
        affinity_timeout_s,
        backends,
        cluster_backends: Vec::new(),
    }
}

pub fn harness() -> Harness {
    let net = FixtureNet::create();
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let root = PathBuf::from(format!("/sys/fs/bpf/np-fixture-{}-{n}", std::process::id()));
    let layout = PinLayout::new(root);
    let dp = Dataplane::load(&layout).expect("loading the embedded eBPF object");
    let mut tables = ServiceTables::open(&layout.dir()).expect("opening pinned maps");
    tables
        .set_config(&Config {
            snat_port_min: SNAT_MIN,
            snat_port_max: SNAT_MAX,
            flags: 0,
            tcp_syn_timeout_s: 60,
            tcp_established_timeout_s: 21600,
            tcp_close_timeout_s: 10,
            udp_timeout_s: 60,
        })
        .unwrap();
    tables.set_node_addrs(&[NODE]).unwrap();
    let second_remote = Ipv4Addr::new(10, 244, 2, 11);
    for (id, b) in [
        be(1, REMOTE_POD, 8080, TCP, false),
        be(2, LOCAL_POD, 8080, TCP, true),
        be(3, REMOTE_POD, 5353, UDP, false),
        be(4, second_remote, 8080, TCP, false),
    ] {
        tables.put_backend(id, b).unwrap();
    }
    for s in [
        svc(NP_REMOTE, TCP, 1, 0, vec![1]),
        svc(NP_LOCAL, TCP, 2, 0, vec![2]),
        svc(NP_UDP_REMOTE, UDP, 3, 0, vec![3]),
        svc(NP_EMPTY, TCP, 4, 0, vec![]),
        svc(NP_ETP_LOCAL_EMPTY, TCP, 5, FRONTEND_ETP_LOCAL, vec![]),
        svc(NP_AFFINITY, TCP, 6, FRONTEND_AFFINITY, vec![1, 4]),
    ] {
        tables.put_service(&s).unwrap();
    }
    Harness {
        net,
        dp,
        tables,
        layout,
    }
}

impl Harness {
    /// Runs the XDP program; returns the verdict and the packet as it leaves (without any XDP
    /// metadata the program prepended).
    pub fn xdp(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, _meta, packet) = self.xdp_with_meta(frame);
        (verdict, packet)
    }

    /// Like `xdp`, also returning the metadata bytes the program put before the packet.
    pub fn xdp_with_meta(&self, frame: &[u8]) -> (u32, Vec<u8>, Vec<u8>) {
        let prog: &Xdp = self.dp.xdp().unwrap();
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
        let ctx: Vec<u8> = [0, frame.len() as u32, 0, self.net.node_ifindex, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let (verdict, out, ctx_out) = self.run_ctx(prog, frame, Some(ctx));
        // The kernel copies out data_meta..data_end and reports in xdp_md.data where the
        // packet starts.
        let meta_len = u32::from_ne_bytes(ctx_out[0..4].try_into().unwrap()) as usize;
        (verdict, out[..meta_len].to_vec(), out[meta_len..].to_vec())
    }

    pub fn tc(&self, name: &str, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &SchedClassifier = self.dp.ebpf().program(name).unwrap().try_into().unwrap();
        // struct __sk_buff is 192 bytes; `ifindex` (at offset 40) selects the device the skb
        // arrives on, and with it the namespace's FIB.
        let mut ctx = vec![0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        self.run(prog, frame, Some(ctx))
    }

    pub fn run<P>(&self, prog: &P, frame: &[u8], ctx: Option<Vec<u8>>) -> (u32, Vec<u8>)
    where
        P: Sync + for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
    {
        let (verdict, out, _) = self.run_ctx(prog, frame, ctx);
        (verdict, out)
    }

    /// Runs `prog` once on `frame`; returns the verdict, the output data and the output context.
    pub fn run_ctx<P>(
        &self,
        prog: &P,
        frame: &[u8],
        ctx: Option<Vec<u8>>,
    ) -> (u32, Vec<u8>, Vec<u8>)
    where
        P: Sync + for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
    {
        let mut out = vec![0u8; frame.len() + 512];
        let mut ctx_out = vec![0u8; ctx.as_ref().map_or(0, Vec::len)];
        let res = self.net.run(|| {
            prog.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ctx.as_deref(),
                ctx_out: ctx.as_ref().map(|_| ctx_out.as_mut_slice()),
                repeat: 1,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN")
        });
        out.truncate(res.data_size_out as usize);
        (res.return_value, out, ctx_out)
    }

    pub fn stats(&self) -> Stats {
        Stats::read_pinned(&self.layout).unwrap()
    }
}
