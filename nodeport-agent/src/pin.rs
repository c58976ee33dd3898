//! Where the dataplane lives on bpffs.
//!
//! ```text
//! <root>/                         default /sys/fs/bpf/nodeport
//!   v<LAYOUT_VERSION>/            everything one map layout owns; removed as a whole by unload
//!     np_config, np_stats, ...    maps, pinned by name by aya (`#[btf_map(pin_by_name)]`)
//!     progs/np_xdp, ...           the loaded programs
//!     links/<iface>/xdp-native    bpf_links: an attachment lives as long as its pin
//!     links/<iface>/tcx-egress
//!     links/<iface>/tc-egress-netlink/   empty directory: marks a netlink (clsact) filter, which
//!                                        has no bpf_link to pin; unload detaches it by name
//! ```
//!
//! bpffs refuses names containing '.', which interface names may have (`eth0.100`), so
//! `<iface>` is the name with '%' and '.' escaped as `%25` and `%2e`.
//!
//! Maps sit directly in the version directory so `bpftool map dump pinned
//! /sys/fs/bpf/nodeport/v1/np_stats` works; the version directory keeps an agent with another
//! layout from adopting maps it cannot read.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use nodeport_common::{DEFAULT_PIN_ROOT, LAYOUT_VERSION};

use crate::Error;

/// `f_type` of a bpffs mount (include/uapi/linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Suffix of the marker directories that stand for netlink TC filters.
pub const NETLINK_MARKER_SUFFIX: &str = "-netlink";

/// The pin paths of one dataplane instance, derived from its pin root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl Default for PinLayout {
    fn default() -> Self {
        Self::new(DEFAULT_PIN_ROOT)
    }
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Name of this agent's version directory, `v<LAYOUT_VERSION>`.
    pub fn version_name() -> String {
        format!("v{LAYOUT_VERSION}")
    }

    /// `<root>/v<LAYOUT_VERSION>`: the maps' pin directory.
    pub fn dir(&self) -> PathBuf {
        self.root.join(Self::version_name())
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    pub fn programs_dir(&self) -> PathBuf {
        self.dir().join("progs")
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.programs_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir().join("links")
    }

    /// Directory of the attachments on one interface. The name is validated because it becomes a
    /// path component.
    pub fn iface_links_dir(&self, iface: &str) -> Result<PathBuf, Error> {
        validate_iface(iface)?;
        Ok(self.links_dir().join(encode_iface(iface)))
    }

    /// Version directories of *other* layouts under the root (`v<N>` with N != ours).
    pub fn other_versions(&self) -> Result<Vec<PathBuf>, Error> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&self.root, e)),
        };
        let ours = Self::version_name();
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.root, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_version = name
                .strip_prefix('v')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if is_version && name != ours {
                found.push(entry.path());
            }
        }
        found.sort();
        Ok(found)
    }
}

/// Interface names become directory names: refuse anything the kernel would not accept as an
/// interface name (IFNAMSIZ, no '/', no whitespace) so a name can never escape the links directory.
pub fn validate_iface(iface: &str) -> Result<(), Error> {
    let ok = !iface.is_empty()
        && iface.len() < libc::IFNAMSIZ
        && iface != "."
        && iface != ".."
        && !iface
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace());
    if ok {
        Ok(())
    } else {
        Err(Error::BadInterfaceName(iface.to_owned()))
    }
}

/// An interface name as a bpffs path component (bpffs rejects '.').
pub fn encode_iface(iface: &str) -> String {
    iface.replace('%', "%25").replace('.', "%2e")
}

/// Inverse of [`encode_iface`]; `None` for a component it cannot have produced.
pub fn decode_iface(component: &str) -> Option<String> {
    let mut out = String::with_capacity(component.len());
    let mut rest = component;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("%25") => out.push('%'),
            Some("%2e") => out.push('.'),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// Fails unless `path` (or, if it does not exist yet, its nearest existing ancestor) is on bpffs:
/// pinning anywhere else fails with an obscure EPERM, and a missing mount is the usual cause.
pub fn ensure_bpffs(path: &Path) -> Result<(), Error> {
    let mut probe = path;
    while !probe.exists() {
        probe = match probe.parent() {
            Some(parent) => parent,
            None => break,
        };
    }
    let c_path = CString::new(probe.as_os_str().as_bytes())
        .map_err(|e| Error::io(probe, io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: statfs writes into the zeroed struct we own; c_path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(Error::io(probe, io::Error::last_os_error()));
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between libcs"
    )]
    if stat.f_type as i64 != BPF_FS_MAGIC {
        return Err(Error::NotBpffs(path.to_owned()));
    }
    Ok(())
}

/// `mkdir -p` that reports which path failed.
pub(crate) fn create_dir_all(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// Removes a file if it exists.
pub(crate) fn remove_file_if_exists(path: &Path) -> Result<bool, Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_documented_layout() {
        let layout = PinLayout::new("/sys/fs/bpf/np");
        let v = format!("/sys/fs/bpf/np/v{LAYOUT_VERSION}");
        assert_eq!(layout.dir(), PathBuf::from(&v));
        assert_eq!(
            layout.map("np_stats"),
            PathBuf::from(format!("{v}/np_stats"))
        );
        assert_eq!(
            layout.program("np_xdp"),
            PathBuf::from(format!("{v}/progs/np_xdp"))
        );
        assert_eq!(
            layout.iface_links_dir("eth0").unwrap(),
            PathBuf::from(format!("{v}/links/eth0"))
        );
    }

    #[test]
    fn interface_names_with_dots_are_escaped_reversibly() {
        let layout = PinLayout::new("/r");
        let dir = layout.iface_links_dir("eth0.100").unwrap();
        assert!(!dir.file_name().unwrap().to_str().unwrap().contains('.'));
        for name in ["eth0", "eth0.100", "a%2eb", "%", "x.%.y"] {
            assert_eq!(decode_iface(&encode_iface(name)).as_deref(), Some(name));
        }
        assert_eq!(decode_iface("bad%zz"), None);
        assert_eq!(decode_iface("trailing%2"), None);
    }

    #[test]
    fn default_root_is_the_shared_constant() {
        assert_eq!(PinLayout::default().root(), Path::new(DEFAULT_PIN_ROOT));
    }

    #[test]
    fn interface_names_cannot_escape_the_links_dir() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "eth0 ",
            "a:b",
            "sixteen-chars-xx",
        ] {
            assert!(validate_iface(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["eth0", "veth-a.1", "np-123-4a", "fifteen-chars-x"] {
            assert!(validate_iface(good).is_ok(), "{good:?} rejected");
        }
    }

    #[test]
    fn other_versions_lists_only_foreign_version_dirs() {
        let tmp = std::env::temp_dir().join(format!("np-pin-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        for d in ["v0", "v2", "vx", "v", "links", &PinLayout::version_name()] {
            std::fs::create_dir_all(tmp.join(d)).unwrap();
        }
        let found = PinLayout::new(&tmp).other_versions().unwrap();
        std::fs::remove_dir_all(&tmp).unwrap();
        let mut expected = vec![tmp.join("v0"), tmp.join("v2")];
        expected.retain(|p| !p.ends_with(PinLayout::version_name()));
        assert_eq!(found, expected);
    }

    #[test]
    fn missing_root_has_no_other_versions() {
        let layout = PinLayout::new("/nonexistent/nodeport-pin-root");
        assert!(layout.other_versions().unwrap().is_empty());
    }
}
