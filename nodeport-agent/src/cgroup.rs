//! Socket load balancing's attachment: the four cgroup/sock_addr programs (see the eBPF crate's
//! `sock` module) on one cgroup v2 directory, whose processes (the node's own, and its pods') then
//! reach nodePorts on the node's own addresses. Packets those processes send to their own node
//! never cross a node interface's ingress, where the XDP/TC programs run.
//!
//! The links are pinned under `cgroup-links/<cgroup id>/<program>`, like the interface links: a
//! restarted agent swaps the program inside each link (`bpf_link_update`, no moment without it),
//! and links on a cgroup the agent is no longer told about are detached.

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::programs::cgroup_sock_addr::CgroupSockAddrLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink, links::PinnedLink};
use nodeport_common::program_names;

use crate::{Attached, Dataplane, Error, link, pin, pin::PinLayout};

/// `statfs.f_type` of cgroup v2 (include/uapi/linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Directory holding one subdirectory of links per attached cgroup.
pub fn links_root(layout: &PinLayout) -> PathBuf {
    layout.dir().join("cgroup-links")
}

/// Where cgroup v2 is mounted in this mount namespace (`/sys/fs/cgroup` on a unified hierarchy,
/// `/sys/fs/cgroup/unified` on a hybrid one), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        // "<id> <parent> <dev> <root> <mount point> <options> [optional…] - <fstype> …"
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount_point))
    })
}

/// Opens `path` as a cgroup v2 directory, or says what it is instead.
pub fn open_cgroup2(path: &Path) -> Result<(File, u64), Error> {
    let dir = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the struct on success; we read it only then.
    let rc = unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(&dir), fs.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::io(path, std::io::Error::last_os_error()));
    }
    // SAFETY: fstatfs succeeded.
    // f_type is i64 on x86_64 glibc but u32 or i32 on other targets.
    #[allow(clippy::unnecessary_cast)]
    let f_type = unsafe { fs.assume_init() }.f_type as i64;
    if f_type != CGROUP2_SUPER_MAGIC {
        return Err(Error::NotCgroup2(path.to_owned()));
    }
    let id = dir.metadata().map_err(|e| Error::io(path, e))?.ino();
    Ok((dir, id))
}

impl Dataplane {
    /// Attaches (or swaps in place) the socket programs on the cgroup v2 directory `path`, and
    /// detaches the ones pinned for any other cgroup.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<Vec<Attached>, Error> {
        let (cgroup, id) = open_cgroup2(path)?;
        let root = links_root(self.layout());
        let dir = root.join(id.to_string());
        detach_cgroups_except(&root, Some(&dir))?;
        pin::create_dir_all(&dir)?;
        let mut done = Vec::new();
        for name in program_names::SOCK {
            let pin_path = dir.join(name);
            let what = format!("{name} on cgroup {}", path.display());
            let program: &mut CgroupSockAddr = self
                .ebpf_mut()
                .program_mut(name)
                .ok_or(Error::MissingProgram(name))?
                .try_into()
                .map_err(Error::program(name))?;
            if pin_path.exists() {
                let fd_link: FdLink = PinnedLink::from_pin(&pin_path)
                    .map_err(Error::link(&pin_path))?
                    .into();
                let updated = CgroupSockAddrLink::try_from(fd_link)
                    .map_err(Error::link(&pin_path))
                    .and_then(|l| program.attach_to_link(l).map_err(Error::program(name)));
                match updated {
                    Ok(id) => {
                        // The pin keeps the link; dropping our handle only closes an fd.
                        drop(program.take_link(id).map_err(Error::program(name))?);
                        done.push(Attached::Replaced(what));
                        continue;
                    }
                    Err(_) => {
                        link::remove_pinned(&pin_path).map_err(|e| Error::io(&pin_path, e))?;
                    }
                }
            }
            // No flags: BPF_LINK_CREATE refuses any (EINVAL), and a cgroup bpf_link always runs
            // beside the cgroup's other programs (systemd's, a CNI's), as BPF_F_ALLOW_MULTI would.
            let link_id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(Error::program(name))?;
            let link = program.take_link(link_id).map_err(Error::program(name))?;
            let fd_link: FdLink = link.try_into().map_err(Error::link(&pin_path))?;
            fd_link.pin(&pin_path).map_err(Error::pin(&pin_path))?;
            done.push(Attached::Linked(what));
        }
        Ok(done)
    }
}

/// Detaches (synchronously) and unpins the socket programs of every cgroup except `keep`.
pub fn detach_cgroups_except(root: &Path, keep: Option<&Path>) -> Result<Vec<PathBuf>, Error> {
    let mut gone = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(gone);
    };
    for entry in entries {
        let dir = entry.map_err(|e| Error::io(root, e))?.path();
        if Some(dir.as_path()) == keep {
            continue;
        }
        for link in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let path = link.map_err(|e| Error::io(&dir, e))?.path();
            link::remove_pinned(&path).map_err(|e| Error::io(&path, e))?;
        }
        std::fs::remove_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        gone.push(dir);
    }
    Ok(gone)
}

/// Detaches the socket programs from whatever cgroup they are on (`run` without `--cgroup`).
pub fn detach_all(layout: &PinLayout) -> Result<Vec<PathBuf>, Error> {
    detach_cgroups_except(&links_root(layout), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_that_is_not_cgroup2_is_refused_by_name() {
        let tmp = std::env::temp_dir();
        let err = open_cgroup2(&tmp).unwrap_err();
        assert!(
            matches!(err, Error::NotCgroup2(ref p) if p == &tmp),
            "{err}"
        );
        assert!(err.to_string().contains("cgroup v2"), "{err}");
    }

    #[test]
    fn the_cgroup2_mount_is_a_cgroup2_directory() {
        // Every kernel this runs on (and CI) has cgroup v2 mounted somewhere.
        let mount = cgroup2_mount().expect("a cgroup2 mount in /proc/self/mountinfo");
        open_cgroup2(&mount).unwrap();
    }

    #[test]
    fn nothing_pinned_detaches_nothing() {
        let root = std::env::temp_dir().join(format!("np-cg-none-{}", std::process::id()));
        assert!(detach_cgroups_except(&root, None).unwrap().is_empty());
    }
}
