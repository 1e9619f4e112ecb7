//! `nm-foreign-prog <cgroup> <name>`: stands in for another product's connect-time load balancer
//! (a CNI's socket LB) in the precheck test. Loads a cgroup connect4 program named `<name>`
//! that allows every connect and changes nothing, links it to `<cgroup>` (multi mode, beside
//! anything else there), prints `attached <program id>`, and holds the link until stdin closes
//! or the process ends: a bpf_link goes away with its last file descriptor, so nothing stays
//! attached after a test, however it ends.
#![expect(unsafe_code, reason = "raw bpf() calls: aya loads programs only from ELF objects")]

use std::{fs::File, io, io::Read, os::fd::AsRawFd};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;

/// The `BPF_PROG_LOAD` member of `union bpf_attr`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct LoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `BPF_LINK_CREATE` member, up to `flags`.
#[repr(C)]
struct LinkAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// The `BPF_OBJ_GET_INFO_BY_FD` member.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i32> {
    // SAFETY: `attr` is a valid bpf_attr member of the size passed; pointers inside it point
    // at memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as u32) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc as i32) }
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, cgroup, name] = args.as_slice() else {
        eprintln!("usage: nm-foreign-prog <cgroup dir> <program name>");
        std::process::exit(64);
    };
    // r0 = 1 (allow the connect); exit.
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = c"GPL";
    let mut attr = LoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_CGROUP_INET4_CONNECT,
        ..Default::default()
    };
    let n = name.len().min(15);
    attr.prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let prog = bpf(BPF_PROG_LOAD, &mut attr)?;
    let target = File::open(cgroup)?;
    let mut link = LinkAttr {
        prog_fd: prog as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_INET4_CONNECT,
        flags: 0,
    };
    let _link = bpf(BPF_LINK_CREATE, &mut link)?;
    // struct bpf_prog_info begins with type (u32) and id (u32).
    let mut info = [0u32; 64];
    let mut info_attr = InfoAttr { bpf_fd: prog as u32, info_len: 256, info: info.as_mut_ptr() as u64 };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut info_attr)?;
    println!("attached {}", info[1]);
    let _ = io::stdin().read(&mut [0u8; 1]);
    Ok(())
}
