//! What kind of interface this is, to choose where the ingress program runs.
//!
//! Native XDP transmits (XDP_TX, XDP_REDIRECT) only where the driver can: on a veth, a frame sent
//! with XDP_TX is dropped unless the *peer* runs an XDP program (measured: 0 of 100 frames came
//! back; ENVIRONMENT.md), and the peer of a kind node's eth0 lives in the host, out of the agent's
//! reach. Native XDP also assumes complete checksums, which veths do not deliver
//! (CHECKSUM_PARTIAL skbs from local senders). So: TC on veths, native XDP on everything else,
//! with TC as the fallback when the driver refuses native XDP.
use std::{ffi::c_void, io, mem::size_of};

use crate::attach::{Ingress, XdpAttachMode};

/// Drivers whose XDP_TX needs something we cannot provide (see the module doc).
const TC_DRIVERS: &[&str] = &["veth", "bridge", "dummy", "vxlan", "geneve", "ipip", "tun"];

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;

/// struct ethtool_drvinfo (linux/ethtool.h).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// struct ifreq with the ifr_data member of its union (40 bytes on 64-bit).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: *mut c_void,
    _pad: [u8; 16],
}

/// The interface's driver name (`ethtool -i`), looked up in the calling thread's namespace.
pub fn driver(iface: &str) -> io::Result<String> {
    if iface.len() >= 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    let mut req = IfReq {
        name: [0; 16],
        data: (&raw mut info).cast(),
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a plain datagram socket; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: req and info outlive the call; the kernel writes at most size_of::<DrvInfo>().
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &raw mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// The ingress hook for a driver: TC where XDP cannot transmit or checksums may be partial.
pub fn ingress_for_driver(driver: &str) -> Ingress {
    if TC_DRIVERS.contains(&driver) {
        Ingress::Tc
    } else {
        Ingress::Xdp(XdpAttachMode::Native)
    }
}

const _: () = assert!(size_of::<DrvInfo>() == 196);
const _: () = assert!(size_of::<IfReq>() == 40);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_gets_tc_and_a_nic_gets_native_xdp() {
        assert_eq!(ingress_for_driver("veth"), Ingress::Tc);
        assert_eq!(
            ingress_for_driver("mlx5_core"),
            Ingress::Xdp(XdpAttachMode::Native)
        );
        assert_eq!(
            ingress_for_driver("virtio_net"),
            Ingress::Xdp(XdpAttachMode::Native)
        );
    }

    #[test]
    fn loopback_driver_is_read_and_a_missing_interface_is_an_error() {
        // Every namespace has lo; its ethtool driver query may be unsupported (EOPNOTSUPP) on
        // some kernels, but a missing interface is always ENODEV.
        let err = driver("no-such-if0").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV), "{err}");
    }
}
