//! Getting the dataplane into the kernel: the embedded object, maps pinned (or adopted) under the
//! versioned pin directory, programs verified and pinned. Attaching is in `attach`.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray},
    programs::{SchedClassifier, Xdp},
};
use nodeport_common::{Config, LAYOUT_VERSION, Traffic, capacity, map_names, program_names};

use crate::{
    Error,
    pin::{self, PinLayout},
    stats::Stats,
};

/// Every program in the object, in load order.
pub const PROGRAMS: [&str; 11] = [
    program_names::XDP_INGRESS,
    program_names::TC_INGRESS,
    program_names::TC_EGRESS,
    program_names::SOCK_CONNECT,
    program_names::SOCK_SENDMSG,
    program_names::SOCK_RECVMSG,
    program_names::SOCK_GETPEERNAME,
    program_names::SOCK_CONNECT6,
    program_names::SOCK_SENDMSG6,
    program_names::SOCK_RECVMSG6,
    program_names::SOCK_GETPEERNAME6,
];

/// The eBPF object built by build.rs (aya-build) from `nodeport-ebpf`, embedded so the agent is a
/// single binary that can never run against an object from another build.
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeport"))
}

/// Sizes of the connection-tracking tables, chosen at load time (`--conntrack-entries`,
/// `--rev-nat-entries`). The object declares `nodeport_common::capacity`; the loader overrides
/// `max_entries` before the maps are created. A map that is already pinned keeps the size it was
/// created with: aya refuses to reuse a pinned map whose `max_entries` differs
/// (`MapError::IncompatiblePinnedMap`), so a changed size is an error, never silently ignored;
/// see [`TableSizes::is_size_mismatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableSizes {
    /// `np_ct4`: tracked flows (LRU: when full, the least recently used flow is evicted).
    pub conntrack: u32,
    /// `np_rnat4`: reply tuples of tracked flows, one per flow (LRU).
    pub rev_nat: u32,
}

impl Default for TableSizes {
    fn default() -> Self {
        Self {
            conntrack: capacity::CONNTRACK,
            rev_nat: capacity::REV_NAT,
        }
    }
}

impl TableSizes {
    /// Whether `e` (anywhere in its chain) is aya refusing a pinned map of another size: the
    /// caller asked for sizes the pinned tables were not created with.
    pub fn is_size_mismatch(e: &(dyn std::error::Error + 'static)) -> bool {
        let mut next = Some(e);
        while let Some(err) = next {
            if let Some(aya::maps::MapError::IncompatiblePinnedMap { property, .. }) =
                err.downcast_ref::<aya::maps::MapError>()
                && *property == "max_entries"
            {
                return true;
            }
            next = err.source();
        }
        false
    }
}

/// `max_entries` of a pinned map, as the kernel reports it (the real capacity, whatever size
/// the object declares).
pub fn pinned_max_entries(dir: &std::path::Path, name: &str) -> Result<u32, Error> {
    let info = aya::maps::MapInfo::from_pin(dir.join(name)).map_err(|source| Error::Map {
        name: name.to_owned(),
        source,
    })?;
    Ok(info.max_entries())
}

/// The loaded dataplane: the object's maps (pinned) and programs (loaded and pinned). Dropping it
/// leaves everything pinned in place; `attach::unload` removes it.
pub struct Dataplane {
    ebpf: Ebpf,
    layout: PinLayout,
}

impl Dataplane {
    /// Loads the embedded object under `layout`.
    pub fn load(layout: &PinLayout) -> Result<Self, Error> {
        Self::load_object(object(), layout)
    }

    /// Loads the embedded object with the connection-tracking tables sized `sizes`.
    pub fn load_sized(layout: &PinLayout, sizes: &TableSizes) -> Result<Self, Error> {
        Self::load_object_sized(object(), layout, sizes)
    }

    /// Loads `object` with its maps pinned by name in `layout.dir()`: maps already pinned there
    /// (by an earlier run of this agent version) are reused with their contents, so a restart or
    /// upgrade keeps counters, services and connections. Then every program is verified, loaded
    /// and pinned under `progs/`, replacing pins of a previous load.
    pub fn load_object(object: &[u8], layout: &PinLayout) -> Result<Self, Error> {
        Self::load_object_sized(object, layout, &TableSizes::default())
    }

    /// [`load_object`](Self::load_object) with the connection-tracking tables sized `sizes`.
    pub fn load_object_sized(
        object: &[u8],
        layout: &PinLayout,
        sizes: &TableSizes,
    ) -> Result<Self, Error> {
        pin::ensure_bpffs(layout.root())?;
        let others = layout.other_versions()?;
        if !others.is_empty() {
            return Err(Error::OtherLayout {
                root: layout.root().to_owned(),
                others: others
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                ours: format!("v{LAYOUT_VERSION}"),
            });
        }
        raise_memlock_limit();
        pin::create_dir_all(&layout.dir())?;
        recreate_resized_counters(layout)?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(layout.dir())
            .map_max_entries(map_names::CONNTRACK, sizes.conntrack)
            .map_max_entries(map_names::REV_NAT, sizes.rev_nat)
            .load(object)?;
        let mut dataplane = Self {
            ebpf,
            layout: layout.clone(),
        };
        dataplane.load_programs()?;
        dataplane.pin_programs()?;
        Ok(dataplane)
    }

    fn load_programs(&mut self) -> Result<(), Error> {
        for name in PROGRAMS {
            let program = self
                .ebpf
                .program_mut(name)
                .ok_or(Error::MissingProgram(name))?;
            match program {
                aya::programs::Program::Xdp(p) => p.load(),
                aya::programs::Program::SchedClassifier(p) => p.load(),
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
            }
            .map_err(Error::program(name))?;
        }
        Ok(())
    }

    /// Pins every program under `progs/`, so `bpftool prog show pinned …` finds them and they stay
    /// loaded while nothing is attached. An older pin is replaced: attached links keep running
    /// their program until `attach` swaps them over.
    fn pin_programs(&mut self) -> Result<(), Error> {
        pin::create_dir_all(&self.layout.programs_dir())?;
        for name in PROGRAMS {
            let path = self.layout.program(name);
            pin::remove_file_if_exists(&path)?;
            self.ebpf
                .program_mut(name)
                .ok_or(Error::MissingProgram(name))?
                .pin(&path)
                .map_err(Error::pin(&path))?;
        }
        Ok(())
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The XDP program, e.g. for `aya::TestRun::test_run`.
    pub fn xdp(&self) -> Result<&Xdp, Error> {
        let name = program_names::XDP_INGRESS;
        let program = self.ebpf.program(name).ok_or(Error::MissingProgram(name))?;
        program.try_into().map_err(Error::program(name))
    }

    pub(crate) fn xdp_mut(&mut self) -> Result<&mut Xdp, Error> {
        let name = program_names::XDP_INGRESS;
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?;
        program.try_into().map_err(Error::program(name))
    }

    /// A TC program (`np_tc_ingress` or `np_tc_egress`).
    pub fn classifier(&self, name: &'static str) -> Result<&SchedClassifier, Error> {
        let program = self.ebpf.program(name).ok_or(Error::MissingProgram(name))?;
        program.try_into().map_err(Error::program(name))
    }

    pub(crate) fn classifier_mut(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, Error> {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?;
        program.try_into().map_err(Error::program(name))
    }

    /// Current counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, Error> {
        let name = map_names::COUNTERS;
        let map = self.ebpf.map(name).ok_or(Error::MissingMap(name))?;
        let array: PerCpuArray<&MapData, Traffic> = map.try_into().map_err(Error::map(name))?;
        Stats::from_map(&array)
    }

    /// Writes the single `np_config` entry. Until this happens the programs pass everything.
    pub fn set_config(&mut self, config: &Config) -> Result<(), Error> {
        let name = map_names::CONFIG;
        let map = self.ebpf.map_mut(name).ok_or(Error::MissingMap(name))?;
        let mut array: Array<&mut MapData, Config> = map.try_into().map_err(Error::map(name))?;
        array.set(0, config, 0).map_err(Error::map(name))
    }

    pub fn config(&self) -> Result<Config, Error> {
        let name = map_names::CONFIG;
        let map = self.ebpf.map(name).ok_or(Error::MissingMap(name))?;
        let array: Array<&MapData, Config> = map.try_into().map_err(Error::map(name))?;
        array.get(&0, 0).map_err(Error::map(name))
    }
}

/// Counter arrays pinned by a build with another number of counter slots (builds before the
/// slots had room to grow) are unpinned, so this load creates them at the new size: aya refuses
/// a pinned map of another size, and counters, unlike state, may start again from zero (as a
/// restarted kube-proxy's do). Programs still attached keep counting into the old array until
/// `attach` moves them to the new programs.
fn recreate_resized_counters(layout: &PinLayout) -> Result<(), Error> {
    for (name, slots) in [
        (map_names::COUNTERS, capacity::COUNTERS),
        (map_names::SOCK_COUNTERS, capacity::SOCK_COUNTERS),
    ] {
        let path = layout.map(name);
        if path.exists() && pinned_max_entries(&layout.dir(), name)? != slots {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            tracing::info!(
                map = name,
                slots,
                "counter array resized: counting starts again"
            );
        }
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK (since then, to the memory cgroup), and
/// its small default makes map creation fail with EPERM. Best effort: newer kernels ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
