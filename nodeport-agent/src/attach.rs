//! Attaching the loaded programs to an interface, and taking everything down again.
//!
//! Every attachment is pinned under `links/<iface>/` (see `pin`), so it outlives the process that
//! made it: `nodeport-agent load` can exit, and a restarted agent finds and *replaces* its links
//! in place (`bpf_link_update`, no moment without a program) instead of stacking a second copy.
//! The pin name records the kind of attachment, which is what `unload` needs to undo it.
//!
//! Per interface there are up to three attachments: XDP (in one mode) and TC ingress, or TC
//! ingress alone; and TC egress. With XDP, TC ingress stays beside it as the fallback for
//! source-NATed packets whose next hop XDP cannot resolve (it hands them up untranslated); XDP
//! marks every packet it judged in XDP metadata, and TC lets those through untouched, so nothing
//! is translated or counted twice.

use std::{ffi::CString, io, path::Path};

use aya::programs::{
    LinkOrder, TcAttach, TcAttachType, TcError, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink},
    xdp::XdpLink,
};
use nodeport_common::program_names;

use crate::{
    Error, link,
    loader::Dataplane,
    pin::{self, NETLINK_MARKER_SUFFIX, PinLayout},
};

/// XDP attach mode. Native runs in the driver before an skb exists (the fast path); generic runs
/// after skb allocation and works on any device (and, on veth, makes XDP_TX reach a peer that has
/// no XDP program: see docs/ARCHITECTURE.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttachMode {
    Native,
    Generic,
}

impl XdpAttachMode {
    pub const ALL: [Self; 2] = [Self::Native, Self::Generic];

    fn aya(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Generic => XdpMode::Skb,
        }
    }

    /// Pin name of the link under `links/<iface>/`.
    pub fn pin_name(self) -> &'static str {
        match self {
            Self::Native => "xdp-native",
            Self::Generic => "xdp-generic",
        }
    }
}

/// Which side of the interface a TC program runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcDirection {
    Ingress,
    Egress,
}

impl TcDirection {
    pub const ALL: [Self; 2] = [Self::Ingress, Self::Egress];

    pub fn program(self) -> &'static str {
        match self {
            Self::Ingress => program_names::TC_INGRESS,
            Self::Egress => program_names::TC_EGRESS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Self::Ingress => TcAttachType::Ingress,
            Self::Egress => TcAttachType::Egress,
        }
    }

    /// Pin name of a tcx link.
    pub fn tcx_pin_name(self) -> &'static str {
        match self {
            Self::Ingress => "tcx-ingress",
            Self::Egress => "tcx-egress",
        }
    }

    /// Name of the marker directory of a netlink (clsact) filter.
    pub fn netlink_marker_name(self) -> String {
        let side = match self {
            Self::Ingress => "tc-ingress",
            Self::Egress => "tc-egress",
        };
        format!("{side}{NETLINK_MARKER_SUFFIX}")
    }

    fn from_netlink_marker(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.netlink_marker_name() == name)
    }
}

/// How TC programs are attached. tcx (Linux 6.6+) gives a bpf_link we can pin and update
/// atomically; a netlink filter on a clsact qdisc works on older kernels but has no link: it is
/// remembered by a marker directory and removed by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcBackend {
    /// tcx, falling back to netlink if the kernel refuses tcx.
    #[default]
    Auto,
    Tcx,
    Netlink,
}

/// The hook that runs the ingress program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// XDP in this mode, with TC ingress beside it as the fallback.
    Xdp(XdpAttachMode),
    /// TC ingress only.
    Tc,
    /// Chosen per interface by its driver (`iface::ingress_for_driver`): TC on veths, native XDP
    /// elsewhere, TC if the driver refuses native XDP.
    Auto,
}

/// What to attach to one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachPlan {
    pub ingress: Ingress,
    /// Attach `np_tc_egress` (replies of local backends are translated there).
    pub egress: bool,
    pub tc_backend: TcBackend,
}

impl Default for AttachPlan {
    fn default() -> Self {
        Self {
            ingress: Ingress::Xdp(XdpAttachMode::Native),
            egress: true,
            tc_backend: TcBackend::Auto,
        }
    }
}

/// What one attach call did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new bpf_link, pinned at the path.
    Linked(String),
    /// An existing pinned link now runs the newly loaded program.
    Replaced(String),
    /// A netlink filter (no link to pin).
    Netlink(String),
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Linked(what) => write!(f, "{what}: attached"),
            Self::Replaced(what) => write!(f, "{what}: replaced in place"),
            Self::Netlink(what) => write!(f, "{what}: attached (netlink filter)"),
        }
    }
}

impl Dataplane {
    /// Makes the interface's attachments match `plan`: attaches (or replaces) what the plan names
    /// and detaches what it does not, so repeated loads converge instead of piling up.
    pub fn attach_interface(
        &mut self,
        iface: &str,
        plan: &AttachPlan,
    ) -> Result<Vec<Attached>, Error> {
        let mut done = Vec::new();
        let ingress = match plan.ingress {
            Ingress::Auto => crate::iface::driver(iface)
                .map(|d| crate::iface::ingress_for_driver(&d))
                // No ethtool driver info (some virtual devices): TC works everywhere.
                .unwrap_or(Ingress::Tc),
            other => other,
        };
        match ingress {
            Ingress::Xdp(mode) => match self.attach_xdp(iface, mode) {
                Ok(attached) => done.push(attached),
                // The driver refuses native XDP: TC alone does the whole job.
                Err(_) if plan.ingress == Ingress::Auto => detach_xdp(self.layout(), iface)?,
                Err(e) => return Err(e),
            },
            Ingress::Tc | Ingress::Auto => detach_xdp(self.layout(), iface)?,
        }
        done.push(self.attach_tc(iface, TcDirection::Ingress, plan.tc_backend)?);
        if plan.egress {
            done.push(self.attach_tc(iface, TcDirection::Egress, plan.tc_backend)?);
        } else {
            detach_tc(self.layout(), iface, TcDirection::Egress)?;
        }
        Ok(done)
    }

    /// Attaches `np_xdp` to `iface` (resolved in the calling thread's network namespace) and pins
    /// the link. If this mode's link is already pinned, it is updated to run this program.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpAttachMode) -> Result<Attached, Error> {
        let dir = self.layout().iface_links_dir(iface)?;
        pin::create_dir_all(&dir)?;
        for other in XdpAttachMode::ALL.into_iter().filter(|m| *m != mode) {
            remove_link(&dir.join(other.pin_name()))?;
        }
        let path = dir.join(mode.pin_name());
        let what = format!(
            "{} on {iface} ({})",
            program_names::XDP_INGRESS,
            mode.pin_name()
        );
        let program = self.xdp_mut()?;
        let name = program_names::XDP_INGRESS;

        if let Some(fd_link) = open_pinned_link(&path)? {
            let updated = XdpLink::try_from(fd_link)
                .map_err(Error::link(&path))
                .and_then(|link| program.attach_to_link(link).map_err(Error::program(name)));
            match updated {
                Ok(id) => {
                    // The pin keeps the link; dropping our handle only closes an fd.
                    drop(program.take_link(id).map_err(Error::program(name))?);
                    return Ok(Attached::Replaced(what));
                }
                // A link whose interface vanished cannot be updated: start over.
                Err(_) => {
                    remove_link(&path)?;
                }
            }
        }

        let c_iface = c_iface(iface)?;
        let id = program
            .attach(c_iface.as_c_str(), mode.aya())
            .map_err(Error::program(name))?;
        let link = program.take_link(id).map_err(Error::program(name))?;
        // Only a bpf_link can be pinned; converting a netlink attachment fails and detaches it.
        let fd_link: FdLink = link
            .try_into()
            .map_err(|_| Error::XdpNotPinnable(iface.to_owned()))?;
        fd_link.pin(&path).map_err(Error::pin(&path))?;
        Ok(Attached::Linked(what))
    }

    /// Attaches the TC program of `direction` to `iface` with `backend`.
    pub fn attach_tc(
        &mut self,
        iface: &str,
        direction: TcDirection,
        backend: TcBackend,
    ) -> Result<Attached, Error> {
        let dir = self.layout().iface_links_dir(iface)?;
        pin::create_dir_all(&dir)?;
        if backend != TcBackend::Netlink {
            match self.attach_tcx(iface, direction, &dir) {
                Ok(done) => {
                    // Moved from netlink to tcx: take the old filter down.
                    detach_netlink(&dir, iface, direction)?;
                    return Ok(done);
                }
                Err(e) if backend == TcBackend::Tcx => return Err(e),
                // Auto: the kernel refused tcx (older than 6.6?); use clsact instead.
                Err(_) => {}
            }
        }
        remove_link(&dir.join(direction.tcx_pin_name()))?;
        self.attach_netlink(iface, direction, &dir)
    }

    fn attach_tcx(
        &mut self,
        iface: &str,
        direction: TcDirection,
        dir: &Path,
    ) -> Result<Attached, Error> {
        let name = direction.program();
        let path = dir.join(direction.tcx_pin_name());
        let what = format!("{name} on {iface} ({})", direction.tcx_pin_name());
        let program = self.classifier_mut(name)?;

        if let Some(fd_link) = open_pinned_link(&path)? {
            let updated = SchedClassifierLink::try_from(fd_link)
                .map_err(Error::link(&path))
                .and_then(|link| program.attach_to_link(link).map_err(Error::program(name)));
            match updated {
                Ok(id) => {
                    drop(program.take_link(id).map_err(Error::program(name))?);
                    return Ok(Attached::Replaced(what));
                }
                Err(_) => {
                    remove_link(&path)?;
                }
            }
        }

        let c_iface = c_iface(iface)?;
        let id = program
            .attach(
                c_iface.as_c_str(),
                TcAttach::Tcx {
                    attach_type: direction.attach_type(),
                    order: LinkOrder::default(),
                },
            )
            .map_err(Error::program(name))?;
        let link = program.take_link(id).map_err(Error::program(name))?;
        let fd_link: FdLink = link.try_into().map_err(Error::link(&path))?;
        fd_link.pin(&path).map_err(Error::pin(&path))?;
        Ok(Attached::Linked(what))
    }

    fn attach_netlink(
        &mut self,
        iface: &str,
        direction: TcDirection,
        dir: &Path,
    ) -> Result<Attached, Error> {
        let name = direction.program();
        let c_iface = c_iface(iface)?;
        match tc::qdisc_add_clsact(c_iface.as_c_str()) {
            Ok(()) => {}
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => {
                return Err(Error::Tc {
                    iface: iface.to_owned(),
                    source,
                });
            }
        }
        // A netlink filter cannot be updated without its priority and handle, which we do not
        // keep: replace it by removing the old one first (a moment without the program).
        detach_netlink(dir, iface, direction)?;
        // The marker goes first, so that even if this process dies right after attaching, unload
        // still knows there is a filter to remove.
        let marker = dir.join(direction.netlink_marker_name());
        pin::create_dir_all(&marker)?;
        let program = self.classifier_mut(name)?;
        let id = program
            .attach(
                c_iface.as_c_str(),
                TcAttach::Netlink {
                    parent: direction.attach_type().into(),
                    options: NlOptions::default(),
                },
            )
            .map_err(Error::program(name))?;
        let link = program.take_link(id).map_err(Error::program(name))?;
        // Dropping the link would delete the filter, which must outlive this process; the marker
        // is how unload finds it again.
        std::mem::forget(link);
        Ok(Attached::Netlink(format!(
            "{name} on {iface} (clsact {})",
            direction.netlink_marker_name()
        )))
    }
}

/// Detaches and unpins a link, synchronously (see `link`).
fn remove_link(path: &Path) -> Result<bool, Error> {
    link::remove_pinned(path).map_err(|e| Error::io(path, e))
}

fn c_iface(iface: &str) -> Result<CString, Error> {
    pin::validate_iface(iface)?;
    CString::new(iface).map_err(|_| Error::BadInterfaceName(iface.to_owned()))
}

/// Opens a pinned link, or `None` if nothing is pinned there.
fn open_pinned_link(path: &Path) -> Result<Option<FdLink>, Error> {
    if !path.exists() {
        return Ok(None);
    }
    let pinned = PinnedLink::from_pin(path).map_err(Error::link(path))?;
    Ok(Some(pinned.into()))
}

/// Detaches XDP (any mode) from `iface` by removing its link pins.
pub fn detach_xdp(layout: &PinLayout, iface: &str) -> Result<(), Error> {
    let dir = layout.iface_links_dir(iface)?;
    for mode in XdpAttachMode::ALL {
        remove_link(&dir.join(mode.pin_name()))?;
    }
    Ok(())
}

/// Detaches the TC program of `direction` from `iface`, whichever backend attached it.
pub fn detach_tc(layout: &PinLayout, iface: &str, direction: TcDirection) -> Result<(), Error> {
    let dir = layout.iface_links_dir(iface)?;
    remove_link(&dir.join(direction.tcx_pin_name()))?;
    detach_netlink(&dir, iface, direction)
}

/// Removes the netlink filter recorded by a marker in `dir`, if there is one.
fn detach_netlink(dir: &Path, iface: &str, direction: TcDirection) -> Result<(), Error> {
    let marker = dir.join(direction.netlink_marker_name());
    if !marker.exists() {
        return Ok(());
    }
    match tc::qdisc_detach_program(
        c_iface(iface)?.as_c_str(),
        direction.attach_type().into(),
        direction.program(),
    ) {
        Ok(()) => {}
        // Already gone, with its filter or its whole interface.
        Err(TcError::IoError(e)) if is_gone(&e) => {}
        Err(source) => {
            return Err(Error::Tc {
                iface: iface.to_owned(),
                source,
            });
        }
    }
    std::fs::remove_dir(&marker).map_err(|e| Error::io(&marker, e))
}

fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

/// What `unload` removed.
#[derive(Debug, Default)]
pub struct Unloaded {
    /// Version directories removed (with their maps, programs and links).
    pub dirs: Vec<std::path::PathBuf>,
    /// Netlink filters detached.
    pub filters: Vec<String>,
}

/// Takes the dataplane pinned under `layout` out of the kernel: detaches every link (synchronously)
/// and the netlink filters recorded by markers, then removes the version directory with its
/// program and map pins, which frees them once nothing else holds them. With `all_versions`, other layouts' version
/// directories go too. Idempotent: nothing pinned is not an error.
///
/// Netlink filters are found by interface name in the calling thread's network namespace.
pub fn unload(layout: &PinLayout, all_versions: bool) -> Result<Unloaded, Error> {
    let mut done = Unloaded::default();
    let mut dirs = vec![layout.dir()];
    if all_versions {
        dirs.extend(layout.other_versions()?);
    }
    for dir in dirs {
        if !dir.exists() {
            continue;
        }
        done.filters.extend(detach_all(&dir.join("links"))?);
        crate::cgroup::detach_cgroups_except(&dir.join("cgroup-links"), None)?;
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        done.dirs.push(dir);
    }
    // The root goes too once empty; another instance's files keep it (ENOTEMPTY is fine).
    match std::fs::remove_dir(layout.root()) {
        Ok(()) => {}
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTEMPTY) => {
        }
        Err(e) => return Err(Error::io(layout.root(), e)),
    }
    Ok(done)
}

/// Detaches every attachment recorded under `links/`: netlink filters by name (returned), link
/// pins with BPF_LINK_DETACH.
fn detach_all(links: &Path) -> Result<Vec<String>, Error> {
    let mut detached = Vec::new();
    let Ok(ifaces) = std::fs::read_dir(links) else {
        return Ok(detached);
    };
    for iface_dir in ifaces {
        let iface_dir = iface_dir.map_err(|e| Error::io(links, e))?.path();
        let Some(iface) = iface_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(pin::decode_iface)
        else {
            continue;
        };
        for entry in std::fs::read_dir(&iface_dir).map_err(|e| Error::io(&iface_dir, e))? {
            let entry = entry.map_err(|e| Error::io(&iface_dir, e))?;
            let name = entry.file_name();
            if let Some(direction) = name.to_str().and_then(TcDirection::from_netlink_marker) {
                detach_netlink(&iface_dir, &iface, direction)?;
                detached.push(format!("{} on {iface}", direction.program()));
            } else if entry.file_type().is_ok_and(|t| t.is_file()) {
                remove_link(&entry.path())?;
            }
        }
    }
    Ok(detached)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_are_distinct_and_round_trip() {
        let mut names: Vec<String> = XdpAttachMode::ALL
            .iter()
            .map(|m| m.pin_name().to_owned())
            .collect();
        for d in TcDirection::ALL {
            names.push(d.tcx_pin_name().to_owned());
            names.push(d.netlink_marker_name());
            assert_eq!(
                TcDirection::from_netlink_marker(&d.netlink_marker_name()),
                Some(d)
            );
        }
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert_eq!(TcDirection::from_netlink_marker("xdp-native"), None);
    }

    #[test]
    fn directions_name_their_programs() {
        assert_eq!(TcDirection::Ingress.program(), program_names::TC_INGRESS);
        assert_eq!(TcDirection::Egress.program(), program_names::TC_EGRESS);
    }

    #[test]
    fn unload_of_nothing_is_ok() {
        let layout =
            PinLayout::new(std::env::temp_dir().join(format!("np-unload-{}", std::process::id())));
        let done = unload(&layout, true).unwrap();
        assert!(done.dirs.is_empty() && done.filters.is_empty());
    }
}
