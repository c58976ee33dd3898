//! The library's error type. Every variant names the object (program, map, path, interface) it is
//! about, because "Operation not permitted" alone never says which of a dozen pins failed.

use std::{io, path::PathBuf};

use aya::{
    EbpfError,
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, TcError, links::LinkError},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{0} is not on a bpffs mount: mount one with `mount -t bpf bpf /sys/fs/bpf` (scripts/setup.sh does)"
    )]
    NotBpffs(PathBuf),

    #[error(
        "{root} holds pins of another map layout ({others}); this agent uses {ours}. \
         Unload them first (`nodeport-agent unload --all-versions`) so two dataplanes never \
         share an interface"
    )]
    OtherLayout {
        root: PathBuf,
        others: String,
        ours: String,
    },

    #[error(
        "{0} is not a cgroup v2 directory (--cgroup wants one, e.g. /sys/fs/cgroup on a unified \
         hierarchy; `grep cgroup2 /proc/mounts` shows where cgroup2 is mounted)"
    )]
    NotCgroup2(PathBuf),

    #[error("invalid interface name {0:?}")]
    BadInterfaceName(String),

    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),

    #[error("program {0} is not in the eBPF object")]
    MissingProgram(&'static str),

    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },

    #[error("map {0} is not in the eBPF object")]
    MissingMap(&'static str),

    #[error("map {name}: {source}")]
    Map {
        name: String,
        #[source]
        source: MapError,
    },

    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },

    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },

    #[error(
        "XDP on {0} was attached through netlink, which has no bpf_link to pin: \
         this kernel is too old (bpf_link for XDP needs Linux 5.9)"
    )]
    XdpNotPinnable(String),

    #[error("tc on {iface}: {source}")]
    Tc {
        iface: String,
        #[source]
        source: TcError,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn program(name: &'static str) -> impl FnOnce(ProgramError) -> Self {
        move |source| Self::Program { name, source }
    }

    pub(crate) fn map(name: impl Into<String>) -> impl FnOnce(MapError) -> Self {
        let name = name.into();
        move |source| Self::Map { name, source }
    }

    pub(crate) fn pin(path: impl Into<PathBuf>) -> impl FnOnce(PinError) -> Self {
        let path = path.into();
        move |source| Self::Pin { path, source }
    }

    pub(crate) fn link(path: impl Into<PathBuf>) -> impl FnOnce(LinkError) -> Self {
        let path = path.into();
        move |source| Self::Link { path, source }
    }
}
