//! Duties of the agent when it is the guest's init (PID 1): the early mounts, hostname,
//! loopback and (when configured) the network interface, and powering off.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::log;

/// A static IPv4 configuration for one interface: `IFACE,ADDR/PREFIX[,GATEWAY]`, given by
/// `--net` or by `airlock.net=` on the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub iface: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("network config {s:?} must be IFACE,ADDR/PREFIX[,GATEWAY], e.g. eth0,10.0.0.2/24,10.0.0.1")
        };
        let mut parts = s.split(',');
        let iface = parts
            .next()
            .filter(|i| !i.is_empty() && i.len() < 16)
            .ok_or_else(bad)?;
        let (addr, prefix) = parts
            .next()
            .and_then(|a| a.split_once('/'))
            .ok_or_else(bad)?;
        let address: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(bad)?;
        let gateway = match parts.next() {
            Some(g) => Some(g.parse().map_err(|_| bad())?),
            None => None,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(NetConfig {
            iface: iface.to_string(),
            address,
            prefix,
            gateway,
        })
    }
}

/// The value of `key=` on a kernel command line.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix(key)?.strip_prefix('='))
}

pub fn prefix_to_netmask(prefix: u8) -> Ipv4Addr {
    if prefix == 0 {
        Ipv4Addr::UNSPECIFIED
    } else {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix)))
    }
}

/// Mount points listed in /proc/self/mountinfo.
fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .collect()
}

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: Option<&str>) {
    if let Err(e) = std::fs::create_dir_all(target) {
        log!("init: cannot create {target}: {e}");
        return;
    }
    if let Err(e) = mount(Some(fstype), target, Some(fstype), flags, data) {
        log!("init: mounting {fstype} on {target} failed: {e}");
    }
}

/// The early mounts. /proc is always mounted afresh (it must show this PID namespace); the
/// others only where nothing is mounted yet, so that a rootfs or a container runtime that has
/// prepared them keeps its own.
pub fn mount_early_filesystems() {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", nosuid_nodev_noexec, None);
    let mounted = mount_points();
    let is_mounted = |p: &str| mounted.iter().any(|m| m == p);
    if !is_mounted("/sys") {
        mount_fs("sysfs", "/sys", nosuid_nodev_noexec, None);
    }
    if !is_mounted("/dev") {
        mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"));
    }
    if !is_mounted("/dev/pts") {
        mount_fs(
            "devpts",
            "/dev/pts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        );
    }
    if !is_mounted("/tmp") {
        mount_fs(
            "tmpfs",
            "/tmp",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        );
    }
    if Path::new("/sys/fs/cgroup").is_dir() && !is_mounted("/sys/fs/cgroup") {
        mount_fs("cgroup2", "/sys/fs/cgroup", nosuid_nodev_noexec, None);
    }
}

pub fn set_hostname(name: &str) {
    if let Err(e) = nix::unistd::sethostname(name) {
        log!("init: cannot set the hostname to {name:?}: {e}");
    }
}

/// An AF_INET datagram socket: the handle that interface ioctls go through.
fn ioctl_socket() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments; the returned fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

fn ifreq_for(iface: &str) -> io::Result<libc::ifreq> {
    let name = CString::new(iface).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: ifreq is plain old data (a name and a union of integers and sockaddrs), for which
    // all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr is the generic
    // view the kernel expects in ifreq and rtentry.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(
    socket: &std::os::fd::OwnedFd,
    request: libc::c_ulong,
    arg: *mut libc::c_void,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: callers pass a pointer to a live ifreq or rtentry matching `request`.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request as _, arg) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets IFF_UP on an interface.
pub fn bring_up(iface: &str) -> io::Result<()> {
    let socket = ioctl_socket()?;
    let mut req = ifreq_for(iface)?;
    ioctl(
        &socket,
        libc::SIOCGIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
    )?;
    let up = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        if req.ifr_ifru.ifru_flags & up == up {
            // Already up (a namespace sandbox's launcher does it, as host root).
            return Ok(());
        }
        req.ifr_ifru.ifru_flags |= up;
    }
    ioctl(
        &socket,
        libc::SIOCSIFFLAGS,
        (&mut req as *mut libc::ifreq).cast(),
    )
}

/// Address, netmask, up, and the default route when a gateway is given.
pub fn configure_interface(net: &NetConfig) -> io::Result<()> {
    let socket = ioctl_socket()?;
    let mut req = ifreq_for(&net.iface)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(net.address);
    ioctl(
        &socket,
        libc::SIOCSIFADDR,
        (&mut req as *mut libc::ifreq).cast(),
    )?;
    let mut req = ifreq_for(&net.iface)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(prefix_to_netmask(net.prefix));
    ioctl(
        &socket,
        libc::SIOCSIFNETMASK,
        (&mut req as *mut libc::ifreq).cast(),
    )?;
    bring_up(&net.iface)?;
    if let Some(gateway) = net.gateway {
        let dev = CString::new(net.iface.as_str())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: rtentry is plain old data for which all-zero is valid (null rt_dev included).
        let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
        route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        route.rt_gateway = sockaddr_in(gateway);
        route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        route.rt_dev = dev.as_ptr() as *mut libc::c_char;
        ioctl(
            &socket,
            libc::SIOCADDRT,
            (&mut route as *mut libc::rtentry).cast(),
        )?;
    }
    Ok(())
}

/// Final steps of a PID 1 shutdown: flush, stop everything, and end the VM. Returns only if the
/// kernel refused (the caller then exits).
///
/// The kernel is asked to reboot, not to power off: microVMs have no ACPI, so a power-off becomes
/// a halt that leaves the VMM running, while a reboot (through the i8042 reset line, `reboot=k`)
/// makes airlock-vmm, like Firecracker, stop the VM and exit 0.
pub fn power_off() {
    nix::unistd::sync();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-1),
        nix::sys::signal::Signal::SIGTERM,
    );
    std::thread::sleep(std::time::Duration::from_millis(100));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-1),
        nix::sys::signal::Signal::SIGKILL,
    );
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    log!("reboot (to end the VM) failed: {e}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_config_parses() {
        assert_eq!(
            "eth0,10.0.0.2/24,10.0.0.1".parse::<NetConfig>().unwrap(),
            NetConfig {
                iface: "eth0".into(),
                address: Ipv4Addr::new(10, 0, 0, 2),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            }
        );
        assert_eq!("lo,127.0.0.1/8".parse::<NetConfig>().unwrap().gateway, None);
        for bad in [
            "",
            "eth0",
            "eth0,10.0.0.2",
            "eth0,10.0.0.2/33",
            "eth0,1/2,3,4",
            "eth0,10.0.0.2/24,x",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn netmasks_and_cmdline() {
        assert_eq!(prefix_to_netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_to_netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(prefix_to_netmask(32), Ipv4Addr::BROADCAST);
        let cmdline = "console=ttyS0 airlock.hostname=box airlock.net=eth0,10.0.0.2/24 quiet";
        assert_eq!(cmdline_value(cmdline, "airlock.hostname"), Some("box"));
        assert_eq!(
            cmdline_value(cmdline, "airlock.net"),
            Some("eth0,10.0.0.2/24")
        );
        assert_eq!(cmdline_value(cmdline, "airlock"), None);
    }
}
