//! The few socket options std, socket2 and nix do not wrap.
#![expect(
    unsafe_code,
    reason = "getsockopt with kernel-defined option numbers; bpf() commands aya does not expose"
)]

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

/// `SO_NETNS_COOKIE` (Linux 5.14+): the cookie of the network namespace a socket lives in, the
/// same value `bpf_get_netns_cookie` returns to the capture programs.
const SO_NETNS_COOKIE: libc::c_int = 71;

pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 { Ok(cookie) } else { Err(io::Error::last_os_error()) }
}

/// `IP_BIND_ADDRESS_NO_PORT`: a socket bound to (address, 0) gets its port at connect time,
/// unique per 4-tuple rather than per address, so one source address can carry as many
/// connections as there are distinct destinations × ports.
pub fn set_bind_address_no_port(socket: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is valid for reads of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Raises the soft limit on open files to the hard limit: every proxied connection holds two
/// sockets, and the default soft limit (often 1024) would cap a node at a few hundred
/// connections. Returns the limit now in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard)
}

/// `BPF_PROG_QUERY` with `BPF_F_QUERY_EFFECTIVE`: the ids of the programs that run on
/// `attach_type` for tasks in `cgroup` (attached there or on an ancestor). aya queries only
/// some attach types; this one takes any.
pub fn cgroup_effective_programs(cgroup: &impl AsRawFd, attach_type: u32) -> io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_F_QUERY_EFFECTIVE: u32 = 1;
    /// The query member of `union bpf_attr` (linux/bpf.h), up to `prog_cnt`.
    #[repr(C)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: BPF_F_QUERY_EFFECTIVE,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; `prog_ids` points at
    // `prog_cnt` writable u32s that outlive the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, &raw mut attr, std::mem::size_of::<QueryAttr>() as u32)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// `BPF_OBJ_GET`: an fd for the object (map, program, link) pinned at `path` on bpffs.
pub fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    /// The obj_pin/obj_get member of `union bpf_attr`.
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    use std::os::unix::ffi::OsStrExt as _;
    let name = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjAttr { pathname: name.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed; `pathname` points at a
    // NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &raw mut attr, std::mem::size_of::<ObjAttr>() as u32)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: makes `link` run `program` instead of the program it holds, atomically —
/// no moment without a program on the hook, and never both.
pub fn bpf_link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    /// The link_update member of `union bpf_attr`.
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw mut attr,
            std::mem::size_of::<LinkUpdateAttr>() as u32,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
