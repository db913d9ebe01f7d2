//! Thin, safe wrappers over the few raw syscalls the agent needs and `nix` does not cover the way
//! we need them (arbitrary signal numbers, `wait4` with rusage, `WNOWAIT`, `RNDADDENTROPY`).
//!
//! Every `unsafe` block of the agent outside `pre_exec` lives here.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;

/// Sends signal `signal` to process group `pgid`.
///
/// Takes a raw number rather than `nix::sys::signal::Signal` because the host may send any
/// signal the guest kernel knows, real-time ones included.
pub fn killpg(pgid: i32, signal: i32) -> io::Result<()> {
    if pgid <= 1 {
        // killpg(0) / killpg(1) would hit our own group or (as PID 1) everything.
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: killpg takes two integers and touches no memory of ours.
    let rc = unsafe { libc::killpg(pgid, signal) };
    Errno::result(rc).map(drop).map_err(io::Error::from)
}

/// How a reaped child ended, with its resource usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// The raw `wait` status.
    pub status: i32,
    /// Peak resident set size in KiB (`ru_maxrss`, which Linux reports in KiB).
    pub max_rss_kib: u64,
}

impl Reaped {
    /// The exit code as the protocol reports it: the exit status, or `128 + N` when killed by
    /// signal `N`.
    pub fn code(&self) -> u32 {
        if libc::WIFEXITED(self.status) {
            libc::WEXITSTATUS(self.status) as u32
        } else if libc::WIFSIGNALED(self.status) {
            128 + libc::WTERMSIG(self.status) as u32
        } else {
            // wait4 without WUNTRACED/WCONTINUED only reports terminations; keep a sane value
            // should that ever change.
            128
        }
    }

    /// The signal that ended the process, when it was killed by one (`WIFSIGNALED`); the
    /// EXIT frame carries it so the host need not guess it from a `128 + N` code.
    pub fn signal(&self) -> Option<u32> {
        libc::WIFSIGNALED(self.status).then(|| libc::WTERMSIG(self.status) as u32)
    }
}

/// The pid of some child that has exited and is still a zombie, without reaping it
/// (`waitid(P_ALL, WEXITED | WNOHANG | WNOWAIT)`). `Ok(None)` when no child has exited yet,
/// `Err(ECHILD)` when there are no children at all.
///
/// Peeking first lets the reaper act on a leader's process group while the zombie leader still
/// pins the group id, so the id cannot have been reused by the time we signal it.
pub fn peek_exited_child() -> io::Result<Option<i32>> {
    // SAFETY: siginfo_t is a plain C struct for which all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t that outlives the call.
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    Errno::result(rc).map_err(io::Error::from)?;
    // SAFETY: waitid filled `info` for a child event (or left it zeroed, in which case si_pid
    // reads as 0, meaning "nothing to report"); si_pid is valid for SIGCHLD-style infos.
    let pid = unsafe { info.si_pid() };
    Ok((pid > 0).then_some(pid))
}

/// Reaps `pid` (which must be a zombie child, see [`peek_exited_child`]) and returns its status
/// and rusage.
pub fn reap(pid: i32) -> io::Result<Option<Reaped>> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a plain C struct for which all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `status` and `usage` are valid, writable and outlive the call.
    let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
    let reaped = Errno::result(rc).map_err(io::Error::from)?;
    if reaped == 0 {
        return Ok(None);
    }
    Ok(Some(Reaped {
        status,
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
    }))
}

/// Sets a pipe's capacity (`F_SETPIPE_SZ`); returns the capacity the kernel granted.
pub fn set_pipe_size(fd: impl AsFd, bytes: i32) -> io::Result<usize> {
    let granted = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(bytes))?;
    Ok(usize::try_from(granted).unwrap_or(0))
}

/// Sets a terminal's window size (`TIOCSWINSZ`).
pub fn set_window_size(fd: impl AsFd, cols: u16, rows: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `struct winsize`, which `size` is and which outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &size) };
    Errno::result(rc).map(drop).map_err(io::Error::from)
}

/// Makes the calling process a child subreaper, so orphaned descendants are re-parented to it
/// (and reaped by our reaper) instead of to the host's init.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
    Errno::result(rc).map(drop).map_err(io::Error::from)
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`, not exported by the libc crate.
const RNDADDENTROPY: u64 =
    nix::request_code_write!(b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>()) as u64;

/// Mixes `seed` into the kernel entropy pool through `random` (an open `/dev/urandom` or
/// `/dev/random`) and credits it as `8 * seed.len()` bits of entropy (`RNDADDENTROPY`, needs
/// CAP_SYS_ADMIN).
pub fn add_entropy(random: impl AsFd, seed: &[u8]) -> io::Result<()> {
    let too_large = || io::Error::new(io::ErrorKind::InvalidInput, "seed too large");
    let buf_size = libc::c_int::try_from(seed.len()).map_err(|_| too_large())?;
    let entropy_bits = buf_size.checked_mul(8).ok_or_else(too_large)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in a u32
    // vector so the header and the flexible array are suitably aligned.
    let words = 2 + seed.len().div_ceil(4);
    let mut info = vec![0u32; words];
    info[0] = entropy_bits as u32;
    info[1] = buf_size as u32;
    for (i, chunk) in seed.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    // SAFETY: `info` is a properly aligned rand_pool_info whose buffer holds `buf_size` bytes
    // (rounded up to whole words); the kernel only reads it, and it outlives the call.
    let rc = unsafe {
        libc::ioctl(
            random.as_fd().as_raw_fd(),
            RNDADDENTROPY as _,
            info.as_ptr(),
        )
    };
    Errno::result(rc).map(drop).map_err(io::Error::from)
}

/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`, not exported by the libc crate.
// The cast is a no-op on glibc (c_ulong) but not on musl (c_int), hence the allow.
#[allow(clippy::unnecessary_cast)]
const RNDRESEEDCRNG: u64 = nix::request_code_none!(b'R', 0x07) as u64;

/// Makes the kernel's CRNG reseed from its input pool now (`RNDRESEEDCRNG`, needs
/// CAP_SYS_ADMIN), so entropy just added reaches `/dev/urandom` output at once.
pub fn reseed_crng(random: impl AsFd) -> io::Result<()> {
    // SAFETY: RNDRESEEDCRNG takes no argument and touches no memory of ours.
    let rc = unsafe { libc::ioctl(random.as_fd().as_raw_fd(), RNDRESEEDCRNG as _) };
    Errno::result(rc).map(drop).map_err(io::Error::from)
}

/// Sets `IFF_UP` on the network interface `name` (`SIOCGIFFLAGS` then `SIOCSIFFLAGS` on a
/// throwaway `AF_INET` socket), as `ip link set NAME up` does. No netlink crate for one flag.
pub fn interface_up(name: &str) -> io::Result<()> {
    let mut request = ifreq_for(name)?;
    let socket = ioctl_socket()?;
    // The request number's type differs between glibc (c_ulong) and musl (c_int), hence `as _`.
    // SAFETY: `request` is a valid ifreq that outlives the call; SIOCGIFFLAGS writes only its
    // flags member.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut request) };
    Errno::result(rc).map_err(io::Error::from)?;
    // SAFETY: SIOCGIFFLAGS just filled the `ifru_flags` member of the union.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS reads the request.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as _, &request) };
    Errno::result(rc).map(drop).map_err(io::Error::from)
}

/// A socket for interface and route ioctls.
fn ioctl_socket() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket takes integers only; the returned fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    Errno::result(fd).map_err(io::Error::from)?;
    // SAFETY: `fd` is a fresh, valid descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming interface `name` (EINVAL for an empty or too long name).
fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers) for which
    // all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= request.ifr_name.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(request)
}

/// `struct sockaddr_in` for `address` (port 0), as the generic `sockaddr` ioctls take.
fn sockaddr_v4(address: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(address.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain C structs; every bit pattern is
    // valid for sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives interface `name` the IPv4 `address`/`prefix_len` and `mtu`, and brings it up.
pub fn configure_ipv4(
    name: &str,
    address: std::net::Ipv4Addr,
    prefix_len: u8,
    mtu: u32,
) -> io::Result<()> {
    let socket = ioctl_socket()?;
    let netmask = std::net::Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len.min(32)))
            .unwrap_or(0),
    );
    for (request_number, value) in [
        (libc::SIOCSIFADDR, address),
        (libc::SIOCSIFNETMASK, netmask),
    ] {
        let mut request = ifreq_for(name)?;
        request.ifr_ifru.ifru_addr = sockaddr_v4(value);
        // SAFETY: `request` is a valid ifreq that outlives the call; the kernel reads its
        // address member. The request number's type differs between glibc and musl (`as _`).
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request_number as _, &request) };
        Errno::result(rc).map_err(io::Error::from)?;
    }
    let mut request = ifreq_for(name)?;
    request.ifr_ifru.ifru_mtu =
        i32::try_from(mtu).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: as above; SIOCSIFMTU reads the mtu member.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFMTU as _, &request) };
    Errno::result(rc).map_err(io::Error::from)?;
    interface_up(name)
}

/// The kernel's `struct rtentry` (`<linux/route.h>`), declared here because libc has it for
/// musl only.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Adds the IPv4 default route via `gateway`.
pub fn add_default_route(gateway: std::net::Ipv4Addr) -> io::Result<()> {
    let socket = ioctl_socket()?;
    let any = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
    let route = RtEntry {
        rt_pad1: 0,
        rt_dst: any,
        rt_gateway: sockaddr_v4(gateway),
        rt_genmask: any,
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: `route` is a valid rtentry (null device: the kernel picks it by the gateway's
    // subnet) that outlives the call; SIOCADDRT only reads it.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT as _, &route) };
    Errno::result(rc).map(drop).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rndreseedcrng_matches_the_kernel_header() {
        // From <linux/random.h>: #define RNDRESEEDCRNG _IO('R', 0x07)
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    #[test]
    fn rndaddentropy_matches_the_kernel_header() {
        // From <linux/random.h>: #define RNDADDENTROPY _IOW('R', 0x03, int[2])
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        // Raw wait statuses: exited with 7 is 7 << 8; killed by SIGKILL is 9.
        let exited = Reaped {
            status: 7 << 8,
            max_rss_kib: 0,
        };
        assert_eq!(exited.code(), 7);
        assert_eq!(exited.signal(), None);
        let killed = Reaped {
            status: 9,
            max_rss_kib: 0,
        };
        assert_eq!(killed.code(), 137);
        assert_eq!(killed.signal(), Some(9));
    }

    #[test]
    fn interface_up_rejects_bad_names() {
        assert!(interface_up("").is_err());
        assert!(interface_up("a-name-longer-than-ifnamsiz").is_err());
        let address = std::net::Ipv4Addr::new(10, 0, 2, 15);
        assert!(configure_ipv4("", address, 24, 1500).is_err());
    }

    #[test]
    fn rtentry_has_the_kernel_layout() {
        // <linux/route.h> on LP64: 120 bytes, rt_dev at 88 (checked with offsetof in C).
        if std::mem::size_of::<usize>() == 8 {
            assert_eq!(std::mem::size_of::<RtEntry>(), 120);
            assert_eq!(std::mem::offset_of!(RtEntry, rt_dev), 88);
        }
    }

    #[test]
    fn killpg_refuses_our_own_and_every_group() {
        assert!(killpg(0, 0).is_err());
        assert!(killpg(1, 0).is_err());
    }
}
