//! Load, pin, reload and unload against the kernel: what is pinned where, that a reload replaces
//! programs in place and keeps the maps' contents, and that unload leaves nothing behind.

use std::process::Command;

use aya::programs::{ProgramInfo, SchedClassifier, TcAttachType, links::PinnedLink};
use nodeport_agent::{
    AttachPlan, Attached, Dataplane, Error, Ingress, PinLayout, TcBackend, TcDirection,
    XdpAttachMode, loader::PROGRAMS, unload,
};
use nodeport_common::{Config, map_names};
use nodeport_tests::{
    netns::{IfaceNs, Netns, link_details},
    pins::TestPins,
};

/// (link id, program id) of a pinned link.
fn link_ids(path: &std::path::Path) -> (u32, u32) {
    let link: aya::programs::links::FdLink = PinnedLink::from_pin(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into();
    let info = link.info().expect("link info");
    (info.id(), info.program_id())
}

fn program_id(layout: &PinLayout, name: &str) -> u32 {
    ProgramInfo::from_pin(layout.program(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .id()
}

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tcx_programs(ns: &Netns, iface: &str, direction: TcAttachType) -> Vec<String> {
    let iface = std::ffi::CString::new(iface).unwrap();
    ns.run(|| {
        let (_, programs) =
            SchedClassifier::query_tcx(iface.as_c_str(), direction).expect("query tcx");
        programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect()
    })
}

#[test]
fn load_pins_everything_reload_replaces_in_place_unload_removes_all() {
    let pins = TestPins::new();
    let layout = pins.layout().clone();
    let net = IfaceNs::new();
    // Generic mode here; the veth tests cover native.
    let plan = AttachPlan {
        ingress: Ingress::Xdp(XdpAttachMode::Generic),
        ..AttachPlan::default()
    };

    let first = net.ns.run(|| {
        let mut dp = Dataplane::load(&layout).expect("load");
        dp.set_config(&Config {
            snat_port_min: 61_000,
            snat_port_max: 65_000,
            ..Config::default()
        })
        .expect("config");
        dp.attach_interface(&net.iface, &plan).expect("attach")
    });
    assert!(
        first.iter().all(|a| matches!(a, Attached::Linked(_))),
        "{first:?}"
    );

    // Everything is where docs/ARCHITECTURE.md says, and bpftool can read it.
    for map in map_names::ALL {
        assert!(layout.map(map).exists(), "map {map} not pinned");
    }
    bpftool(&[
        "map",
        "dump",
        "pinned",
        layout.map(map_names::COUNTERS).to_str().unwrap(),
    ]);
    for program in PROGRAMS {
        let shown = bpftool(&[
            "prog",
            "show",
            "pinned",
            layout.program(program).to_str().unwrap(),
        ]);
        assert!(shown.contains(program), "{shown}");
    }
    let links = layout.iface_links_dir(&net.iface).unwrap();
    let xdp_link = links.join(XdpAttachMode::Generic.pin_name());
    let tcx_link = links.join(TcDirection::Egress.tcx_pin_name());
    let (xdp_link_id, xdp_prog) = link_ids(&xdp_link);
    let (tcx_link_id, tcx_prog) = link_ids(&tcx_link);
    assert_eq!(xdp_prog, program_id(&layout, "np_xdp"));
    assert_eq!(tcx_prog, program_id(&layout, "np_tc_egress"));
    assert!(link_details(&net.ns, &net.iface).contains("np_xdp"));
    assert_eq!(
        tcx_programs(&net.ns, &net.iface, TcAttachType::Egress),
        ["np_tc_egress"]
    );

    // Reload: new programs, same links (updated in place), same maps (config survives).
    let second = net.ns.run(|| {
        let mut dp = Dataplane::load(&layout).expect("reload");
        assert_eq!(dp.config().expect("config").snat_port_min, 61_000);
        dp.attach_interface(&net.iface, &plan).expect("re-attach")
    });
    assert!(
        second.iter().all(|a| matches!(a, Attached::Replaced(_))),
        "{second:?}"
    );
    let (xdp_link_id2, xdp_prog2) = link_ids(&xdp_link);
    let (tcx_link_id2, tcx_prog2) = link_ids(&tcx_link);
    assert_eq!((xdp_link_id2, tcx_link_id2), (xdp_link_id, tcx_link_id));
    assert_ne!(xdp_prog2, xdp_prog, "XDP link still runs the old program");
    assert_ne!(tcx_prog2, tcx_prog, "tcx link still runs the old program");
    assert_eq!(xdp_prog2, program_id(&layout, "np_xdp"));
    assert_eq!(
        tcx_programs(&net.ns, &net.iface, TcAttachType::Egress),
        ["np_tc_egress"],
        "a reload must not stack a second program"
    );

    let done = net.ns.run(|| unload(&layout, false).expect("unload"));
    assert_eq!(done.dirs, [layout.dir()]);
    assert!(!layout.root().exists(), "pin root left behind");
    assert!(!link_details(&net.ns, &net.iface).contains("np_xdp"));
    assert!(tcx_programs(&net.ns, &net.iface, TcAttachType::Egress).is_empty());
}

#[test]
fn switching_ingress_to_tc_with_netlink_detaches_xdp_and_unload_removes_the_filters() {
    let pins = TestPins::new();
    let layout = pins.layout().clone();
    let net = IfaceNs::new();
    let filters = |direction: &str| {
        String::from_utf8_lossy(
            &Command::new("ip")
                .args(["netns", "exec", net.ns.name(), "tc", "filter", "show"])
                .args(["dev", &net.iface, direction])
                .output()
                .expect("tc")
                .stdout,
        )
        .into_owned()
    };

    net.ns.run(|| {
        let mut dp = Dataplane::load(&layout).expect("load");
        dp.attach_interface(
            &net.iface,
            &AttachPlan {
                ingress: Ingress::Xdp(XdpAttachMode::Generic),
                ..AttachPlan::default()
            },
        )
        .expect("attach xdp");
        let done = dp
            .attach_interface(
                &net.iface,
                &AttachPlan {
                    ingress: Ingress::Tc,
                    egress: true,
                    tc_backend: TcBackend::Netlink,
                },
            )
            .expect("attach tc");
        assert!(
            done.iter().all(|a| matches!(a, Attached::Netlink(_))),
            "{done:?}"
        );
    });

    let links = layout.iface_links_dir(&net.iface).unwrap();
    assert!(!links.join(XdpAttachMode::Generic.pin_name()).exists());
    assert!(!links.join(TcDirection::Egress.tcx_pin_name()).exists());
    for d in TcDirection::ALL {
        assert!(links.join(d.netlink_marker_name()).is_dir());
    }
    assert!(
        !link_details(&net.ns, &net.iface).contains("np_xdp"),
        "XDP still attached"
    );
    assert!(
        filters("ingress").contains("np_tc_ingress"),
        "{}",
        filters("ingress")
    );
    assert!(
        filters("egress").contains("np_tc_egress"),
        "{}",
        filters("egress")
    );
    assert!(tcx_programs(&net.ns, &net.iface, TcAttachType::Egress).is_empty());

    let done = net.ns.run(|| unload(&layout, false).expect("unload"));
    assert_eq!(done.filters.len(), 2, "{:?}", done.filters);
    assert!(
        !filters("ingress").contains("np_tc_ingress"),
        "{}",
        filters("ingress")
    );
    assert!(
        !filters("egress").contains("np_tc_egress"),
        "{}",
        filters("egress")
    );
    assert!(!layout.root().exists());
}

#[test]
fn pins_of_another_layout_version_are_refused_until_unloaded() {
    let pins = TestPins::new();
    let layout = pins.layout();
    let foreign = layout.root().join("v999");
    std::fs::create_dir_all(&foreign).expect("mkdir on bpffs");

    match Dataplane::load(layout) {
        Err(Error::OtherLayout { others, .. }) => assert!(others.contains("v999"), "{others}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded next to another layout's pins"),
    }

    let done = unload(layout, true).expect("unload --all-versions");
    assert_eq!(done.dirs, [foreign]);
    Dataplane::load(layout).expect("load after cleanup");
}

#[test]
fn load_outside_bpffs_fails_with_a_clear_error() {
    nodeport_tests::require_kernel();
    let layout = PinLayout::new(std::env::temp_dir().join("nodeport-not-bpffs"));
    match Dataplane::load(&layout) {
        Err(e @ Error::NotBpffs(_)) => assert!(e.to_string().contains("mount -t bpf")),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("loaded with pins outside bpffs"),
    }
}

#[test]
fn counter_arrays_of_an_older_size_are_recreated_and_state_maps_kept() {
    // A build before the counter arrays had spare slots pinned np_stats with 18 entries (one per
    // counter then); aya refuses a pinned map of another size, so the loader recreates counter
    // arrays (and only those) at the new size.
    let pins = TestPins::new();
    let layout = pins.layout();
    std::fs::create_dir_all(layout.dir()).expect("mkdir on bpffs");
    let stats = layout.map(map_names::COUNTERS);
    bpftool(&[
        "map",
        "create",
        stats.to_str().unwrap(),
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "16",
        "entries",
        "18",
        "name",
        "np_stats",
    ]);
    let dp = Dataplane::load(layout).expect("load over an 18-slot np_stats");
    let entries = |name: &str| {
        nodeport_agent::loader::pinned_max_entries(&layout.dir(), name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert_eq!(
        entries(map_names::COUNTERS),
        nodeport_common::capacity::COUNTERS
    );
    assert!(dp.stats().expect("counters readable").total().packets == 0);
    drop(dp);
    // State maps (here the conntrack table) are adopted as they are on the next load.
    let ct = entries(map_names::CONNTRACK);
    let ct_id_before = aya::maps::MapInfo::from_pin(layout.map(map_names::CONNTRACK))
        .unwrap()
        .id();
    Dataplane::load(layout).expect("reload");
    assert_eq!(entries(map_names::CONNTRACK), ct);
    assert_eq!(
        aya::maps::MapInfo::from_pin(layout.map(map_names::CONNTRACK))
            .unwrap()
            .id(),
        ct_id_before,
        "the conntrack table was adopted, not recreated"
    );
}
