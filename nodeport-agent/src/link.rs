//! Detaching a pinned bpf_link *now*.
//!
//! Removing a link's pin only drops a reference: the kernel frees (and thereby detaches) the link
//! later, from an RCU callback and a workqueue. Until then the old XDP program is still on the
//! interface, so an immediate re-attach in another mode fails with EBUSY, and `unload` would
//! return while packets still run through the program. BPF_LINK_DETACH detaches synchronously;
//! aya 0.16 has no public call for it, so this module makes the two syscalls itself.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr` as used by BPF_OBJ_GET.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` as used by BPF_LINK_DETACH.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised bpf_attr prefix of the size we pass; the kernel
    // zero-extends shorter attrs.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Detaches the link pinned at `path` from its hook, synchronously. The pin itself stays (a
/// detached link is inert); the caller removes it. A link that is already detached (its interface
/// was deleted) is fine.
pub fn detach_pinned(path: &Path) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    match bpf(
        BPF_LINK_DETACH,
        &LinkDetachAttr {
            link_fd: fd.as_raw_fd() as u32,
        },
    ) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Detaches and unpins the link at `path`; `false` if nothing was pinned there.
pub fn remove_pinned(path: &Path) -> io::Result<bool> {
    match detach_pinned(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    std::fs::remove_file(path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel() {
        // BPF_OBJ_*: pathname (u64), bpf_fd, file_flags, path_fd, padded to 8.
        assert_eq!(std::mem::size_of::<ObjGetAttr>(), 24);
        assert_eq!(std::mem::size_of::<LinkDetachAttr>(), 4);
    }

    #[test]
    fn missing_pin_is_not_an_error() {
        let path = std::env::temp_dir().join("nodeport-no-such-link");
        assert!(!remove_pinned(&path).unwrap());
    }
}
