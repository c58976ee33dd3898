//! Packet fuzzing through BPF_PROG_TEST_RUN (issue 8): seeded generators (`generate`,
//! `mutate`) feed the real XDP, TC ingress and TC egress programs, loaded with maps seeded from
//! `world`, and every result is checked (`check`) against an independent model of the design
//! (`model`). `run` is one seeded stream; tests/tests/fuzz.rs and `cargo xtask fuzz` drive it.
pub mod check;
pub mod generate;
pub mod model;
pub mod mutate;
pub mod world;

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use nodeport_common::program_names;

use crate::harness::{self, Harness};
use check::Observed;
use generate::{Case, Generator};
use model::{Hook, Model, Outcome, Prediction};

/// The kernel's tables are compared with the model and cleared this often, so new flows keep
/// coming (the client pools are small) and every run also checks the tables' contents.
pub const RESET_EVERY: u64 = 50_000;

/// Counts of one stream.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub seed: u64,
    pub packets: u64,
    pub elapsed: Duration,
    pub by_hook: BTreeMap<&'static str, u64>,
    pub by_outcome: BTreeMap<&'static str, u64>,
    pub by_class: BTreeMap<&'static str, u64>,
    pub by_kind: BTreeMap<&'static str, u64>,
    pub flows_created: u64,
    pub table_checks: u64,
    /// DNAT-only flows whose client port was remapped (its tuple towards the pod was taken).
    pub local_port_remaps: u64,
}

impl Report {
    pub fn packets_per_second(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {:#018x}: {} packets in {:.1} s ({:.0} packets/s), {} flows created, \
             {} table comparisons, {} DNAT-only flows with a remapped client port",
            self.seed,
            self.packets,
            self.elapsed.as_secs_f64(),
            self.packets_per_second(),
            self.flows_created,
            self.table_checks,
            self.local_port_remaps
        )?;
        writeln!(f, "  by hook: {:?}", self.by_hook)?;
        writeln!(f, "  by outcome: {:?}", self.by_outcome)?;
        writeln!(f, "  by generator: {:?}", self.by_kind)?;
        write!(f, "  by class: {:?}", self.by_class)
    }
}

/// A case the programs got wrong, with everything needed to replay and to reduce it.
#[derive(Debug)]
pub struct Failure {
    pub seed: u64,
    pub index: u64,
    pub case: Case,
    pub prediction: Prediction,
    pub observed: Result<Observed, String>,
    pub why: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "packet fuzzing failed: seed {:#018x} ({}), case {} ({:?}, generator \"{}\", class \"{}\")",
            self.seed, self.seed, self.index, self.case.hook, self.case.kind, self.prediction.class
        )?;
        writeln!(
            f,
            "input  ({} bytes): {}",
            self.case.frame.len(),
            hex(&self.case.frame)
        )?;
        match &self.observed {
            Ok(o) => writeln!(
                f,
                "output ({} bytes, verdict {} = {}, meta {}): {}",
                o.frame.len(),
                o.verdict,
                model::verdict_name(self.case.hook, o.verdict),
                hex(&o.meta),
                hex(&o.frame)
            )?,
            Err(e) => writeln!(f, "output: BPF_PROG_TEST_RUN failed: {e}")?,
        }
        writeln!(f, "no allowed outcome matches:\n{}", self.why)?;
        write!(
            f,
            "replay: NODEPORT_FUZZ_SEED={} NODEPORT_FUZZ_PACKETS={} NODEPORT_FUZZ_STREAMS=1 \
             cargo test -p nodeport-tests --test fuzz -- --nocapture",
            self.seed,
            self.index + 1
        )
    }
}

/// The loaded programs, called from the fixture namespace's thread.
struct Progs<'a> {
    xdp: &'a Xdp,
    tc_ingress: &'a SchedClassifier,
    tc_egress: &'a SchedClassifier,
    node_ifindex: u32,
    out: Vec<u8>,
}

impl<'a> Progs<'a> {
    fn new(dp: &'a nodeport_agent::Dataplane, node_ifindex: u32) -> Self {
        let tc =
            |name| -> &'a SchedClassifier { dp.ebpf().program(name).unwrap().try_into().unwrap() };
        Self {
            xdp: dp.xdp().unwrap(),
            tc_ingress: tc(program_names::TC_INGRESS),
            tc_egress: tc(program_names::TC_EGRESS),
            node_ifindex,
            out: Vec::new(),
        }
    }

    fn run(&mut self, hook: Hook, frame: &[u8]) -> Result<Observed, String> {
        if self.out.len() < frame.len() + 512 {
            self.out.resize(frame.len() + 512, 0);
        }
        match hook {
            Hook::Xdp => {
                // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index,
                // egress_ifindex }
                let ctx: Vec<u8> = [0, frame.len() as u32, 0, self.node_ifindex, 0, 0]
                    .iter()
                    .flat_map(|v| v.to_ne_bytes())
                    .collect();
                let mut ctx_out = vec![0u8; ctx.len()];
                let r = self
                    .xdp
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut self.out),
                        ctx_in: Some(&ctx),
                        ctx_out: Some(&mut ctx_out),
                        repeat: 1,
                        ..Default::default()
                    })
                    .map_err(|e| format!("{e:?}"))?;
                let data = &self.out[..r.data_size_out as usize];
                // The kernel copies out data_meta..data_end; xdp_md.data says where the packet
                // starts.
                let meta_len = u32::from_ne_bytes(ctx_out[0..4].try_into().unwrap()) as usize;
                Ok(Observed {
                    verdict: r.return_value,
                    meta: data[..meta_len].to_vec(),
                    frame: data[meta_len..].to_vec(),
                })
            }
            Hook::TcIngress | Hook::TcEgress => {
                let prog = if hook == Hook::TcIngress {
                    self.tc_ingress
                } else {
                    self.tc_egress
                };
                // struct __sk_buff: `ifindex` at offset 40 selects the device (and the FIB).
                let mut ctx = vec![0u8; 192];
                ctx[40..44].copy_from_slice(&self.node_ifindex.to_ne_bytes());
                let r = prog
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut self.out),
                        ctx_in: Some(&ctx),
                        repeat: 1,
                        ..Default::default()
                    })
                    .map_err(|e| format!("{e:?}"))?;
                Ok(Observed {
                    verdict: r.return_value,
                    meta: Vec::new(),
                    frame: self.out[..r.data_size_out as usize].to_vec(),
                })
            }
        }
    }
}

fn outcome_name(o: &Outcome) -> &'static str {
    match o {
        Outcome::Refused => "refused by BPF_PROG_TEST_RUN (too short)",
        Outcome::Unchanged { .. } => "passed unchanged",
        Outcome::Dropped { .. } => "dropped",
        Outcome::Translated(_) => "translated",
    }
}

/// Compares the kernel's conntrack and reverse-NAT tables with the flows the model learnt, then
/// clears both (and ClientIP affinity).
fn check_and_reset_tables(h: &mut Harness, model: &mut Model) -> Result<(), String> {
    let ct = h.tables.conntrack().map_err(|e| e.to_string())?;
    let rnat = h.tables.rev_nat().map_err(|e| e.to_string())?;
    let be = |v: u32| std::net::Ipv4Addr::from(u32::from_be(v));
    let port = u16::from_be;
    let mut kernel: BTreeMap<_, _> = BTreeMap::new();
    for (k, v) in &ct {
        let key = (
            be(k.saddr),
            port(k.sport),
            be(k.daddr),
            port(k.dport),
            k.proto,
        );
        let snat =
            (v.flags & nodeport_common::CT_SNAT != 0).then(|| (be(v.nat_addr), port(v.nat_port)));
        let remap = (v.flags & nodeport_common::CT_LOCAL != 0 && v.nat_port != 0)
            .then(|| (be(v.nat_addr), port(v.nat_port)));
        kernel.insert(key, (v.backend_id, snat, remap));
    }
    let mut want: BTreeMap<_, _> = BTreeMap::new();
    for f in model.all_flows() {
        let c = f.client;
        want.insert(
            (c.saddr, c.sport, c.daddr, c.dport, c.proto),
            (f.backend, f.snat, f.remap.map(|p| (c.saddr, p))),
        );
    }
    if kernel != want {
        let extra: Vec<_> = kernel
            .iter()
            .filter(|(k, v)| want.get(*k) != Some(*v))
            .take(5)
            .collect();
        let missing: Vec<_> = want
            .iter()
            .filter(|(k, v)| kernel.get(*k) != Some(*v))
            .take(5)
            .collect();
        return Err(format!(
            "np_ct4 ({} flows) differs from the model ({} flows): in the kernel only or \
             different {extra:?}; in the model only or different {missing:?}",
            kernel.len(),
            want.len()
        ));
    }
    // Every flow has its own reply tuple (a DNAT-only flow whose client tuple towards the pod
    // was taken has a remapped port), and every reverse entry is exactly one flow's.
    let mut replies: BTreeMap<_, _> = BTreeMap::new();
    for f in model.all_flows() {
        let r = f.reply();
        let client = (
            f.client.saddr,
            f.client.sport,
            f.client.daddr,
            f.client.dport,
        );
        if let Some(other) = replies.insert((r.saddr, r.sport, r.daddr, r.dport, r.proto), client) {
            return Err(format!(
                "model: flows {other:?} and {client:?} share the reply tuple {r:?}"
            ));
        }
    }
    for (k, v) in &rnat {
        let key = (
            be(k.saddr),
            port(k.sport),
            be(k.daddr),
            port(k.dport),
            k.proto,
        );
        let flow = (
            be(v.flow.saddr),
            port(v.flow.sport),
            be(v.flow.daddr),
            port(v.flow.dport),
        );
        if replies.get(&key) != Some(&flow) {
            return Err(format!(
                "np_rnat4 entry {key:?} -> {flow:?} is not that flow's reply tuple (the model \
                 has {:?})",
                replies.get(&key)
            ));
        }
    }
    if rnat.len() != replies.len() {
        return Err(format!(
            "np_rnat4 has {} entries, the model's flows have {} reply tuples",
            rnat.len(),
            replies.len()
        ));
    }
    h.tables
        .sweep_expired(u64::MAX)
        .map_err(|e| e.to_string())?;
    for s in world::SERVICES.iter().filter(|s| s.affinity) {
        h.tables
            .purge_affinity(s.svc_id, &[])
            .map_err(|e| e.to_string())?;
    }
    let left = (
        h.tables.conntrack().map_err(|e| e.to_string())?.len(),
        h.tables.rev_nat().map_err(|e| e.to_string())?.len(),
    );
    if left != (0, 0) {
        return Err(format!("tables not empty after clearing: {left:?}"));
    }
    model.clear();
    Ok(())
}

/// Runs one seeded stream of `packets` cases against a fresh harness.
pub fn run(seed: u64, packets: u64) -> Result<Report, Box<Failure>> {
    let mut h = harness::harness();
    world::seed(&mut h);
    let start = Instant::now();
    let mut report = Report {
        seed,
        ..Report::default()
    };
    let mut gen_ = Generator::new(seed);
    let mut model = Model::default();
    let mut index = 0u64;
    while index < packets {
        // Run a batch inside the namespace, then check the tables from this thread.
        let batch_end = (index + RESET_EVERY).min(packets);
        let (net, dp) = (&h.net, &h.dp);
        let result = net.run(|| {
            let mut progs = Progs::new(dp, net.node_ifindex);
            while index < batch_end {
                let case = gen_.next(&model);
                let pred = model.predict(case.hook, &case.frame);
                let observed = progs.run(case.hook, &case.frame);
                match check::matching(&model, case.hook, &case.frame, &pred, &observed) {
                    Ok(i) => {
                        let o = pred.allowed[i];
                        if let (Some(v), Ok(obs)) = (&pred.view, &observed) {
                            let before = model.flows();
                            let l4 = v.l4_off;
                            let out_sport = matches!(o, Outcome::Translated(_))
                                .then(|| u16::from_be_bytes([obs.frame[l4], obs.frame[l4 + 1]]));
                            model.observe(case.hook, v, &o, out_sport);
                            report.flows_created += (model.flows() - before) as u64;
                        }
                        *report.by_outcome.entry(outcome_name(&o)).or_default() += 1;
                        *report.by_class.entry(pred.class).or_default() += 1;
                        *report.by_kind.entry(case.kind).or_default() += 1;
                        *report
                            .by_hook
                            .entry(match case.hook {
                                Hook::Xdp => "XDP",
                                Hook::TcIngress => "TC ingress",
                                Hook::TcEgress => "TC egress",
                            })
                            .or_default() += 1;
                    }
                    Err(why) => {
                        return Err(Box::new(Failure {
                            seed,
                            index,
                            case,
                            prediction: pred,
                            observed,
                            why,
                        }));
                    }
                }
                index += 1;
            }
            Ok(())
        });
        result?;
        report.local_port_remaps = model.local_port_remaps;
        if let Err(why) = check_and_reset_tables(&mut h, &mut model) {
            panic!(
                "packet fuzzing: seed {seed:#018x}, after case {}: {why}\nreplay: \
                 NODEPORT_FUZZ_SEED={seed} NODEPORT_FUZZ_PACKETS={index} NODEPORT_FUZZ_STREAMS=1 \
                 cargo test -p nodeport-tests --test fuzz -- --nocapture",
                index - 1
            );
        }
        report.table_checks += 1;
    }
    report.packets = index;
    report.elapsed = start.elapsed();
    Ok(report)
}
