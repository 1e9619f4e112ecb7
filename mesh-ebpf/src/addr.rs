//! Address helpers on the kernel's representation: `u32` words in network byte order.

/// 127.0.0.1 in network byte order, as the kernel stores it in `user_ip4`.
pub const LOOPBACK4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 as four network-order words.
pub const LOOPBACK6_WORDS: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Any 127.0.0.0/8 address: traffic inside a pod stays inside the pod.
pub fn is_loopback4(ip_be: u32) -> bool {
    ip_be.to_ne_bytes()[0] == 127
}

pub fn is_loopback6(ip6: &[u32; 4]) -> bool {
    ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == LOOPBACK6_WORDS[3]
}

/// The IPv4 address inside a `::ffff:a.b.c.d` address.
pub fn v4_mapped(ip6: &[u32; 4]) -> Option<u32> {
    (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_PREFIX).then_some(ip6[3])
}

pub fn v4_mapped_words(ip4_be: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_PREFIX, ip4_be]
}

pub fn words_to_bytes(ip6: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = ip6[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}
