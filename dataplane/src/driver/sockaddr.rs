//! Socket addresses in the kernel's layout, without allocation: what the uring and portable
//! drivers put in `msghdr.msg_name` and read back from received datagrams.

use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Writes `dest` as a kernel socket address into `out`; returns its length.
pub fn write_sockaddr(out: &mut libc::sockaddr_in6, dest: SocketAddr) -> u32 {
    match dest {
        SocketAddr::V4(d) => {
            // SAFETY: sockaddr_in fits inside sockaddr_in6, which we own; all-zero is valid.
            let a = unsafe { &mut *(out as *mut libc::sockaddr_in6).cast::<libc::sockaddr_in>() };
            *a = unsafe { zeroed() };
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_port = d.port().to_be();
            a.sin_addr.s_addr = u32::from(*d.ip()).to_be();
            size_of::<libc::sockaddr_in>() as u32
        }
        SocketAddr::V6(d) => {
            // SAFETY: all-zero is a valid sockaddr_in6.
            *out = unsafe { zeroed() };
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = d.port().to_be();
            out.sin6_addr.s6_addr = d.ip().octets();
            out.sin6_flowinfo = d.flowinfo();
            out.sin6_scope_id = d.scope_id();
            size_of::<libc::sockaddr_in6>() as u32
        }
    }
}

/// Reads a source address the kernel wrote into a receive buffer.
pub fn read_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*name.first()?, *name.get(1)?]) as i32;
    match family {
        libc::AF_INET if name.len() >= 8 => Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(name[4], name[5], name[6], name[7]),
            u16::from_be_bytes([name[2], name[3]]),
        ))),
        libc::AF_INET6 if name.len() >= 28 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&name[8..24]);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                u16::from_be_bytes([name[2], name[3]]),
                u32::from_ne_bytes([name[4], name[5], name[6], name[7]]),
                u32::from_ne_bytes([name[24], name[25], name[26], name[27]]),
            )))
        }
        _ => None,
    }
}

/// Sends one datagram to `dest` from `fd`, without blocking (errors such as ICMP unreachable
/// are not fatal: the packet is simply lost, as UDP would lose it).
pub fn send_to(fd: std::os::fd::RawFd, data: &[u8], dest: SocketAddr) -> bool {
    // SAFETY: all-zero sockaddr_in6 is valid; it is filled by write_sockaddr.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let len = write_sockaddr(&mut addr, dest);
    // SAFETY: `addr` is an initialised local passed with the length written; `data` is live.
    unsafe {
        libc::sendto(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT,
            (&addr as *const libc::sockaddr_in6).cast(),
            len,
        ) >= 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip_through_kernel_layout() {
        for addr in ["127.0.0.1:5004", "[::1]:40000"] {
            let addr: SocketAddr = addr.parse().unwrap();
            // SAFETY: all-zero sockaddr_in6 is valid.
            let mut raw: libc::sockaddr_in6 = unsafe { zeroed() };
            let len = write_sockaddr(&mut raw, addr) as usize;
            // SAFETY: reads the bytes of a live local struct.
            let bytes = unsafe {
                std::slice::from_raw_parts((&raw as *const libc::sockaddr_in6).cast::<u8>(), len)
            };
            assert_eq!(read_sockaddr(bytes), Some(addr));
        }
        assert_eq!(read_sockaddr(&[]), None);
        assert_eq!(read_sockaddr(&[0xff, 0xff, 1, 2]), None);
    }
}
