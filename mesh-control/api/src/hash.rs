//! FNV-1a 64: a hash that is the same in every process, build and platform (std's hashers
//! are seeded per process). Resource versions and consistent-hash rings rely on that.

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
