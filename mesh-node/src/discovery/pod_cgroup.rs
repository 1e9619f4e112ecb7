//! Where kubelet puts a pod's cgroup, under either cgroup driver.
//!
//! kubelet names the pod cgroup from the pod's UID and QoS class (`status.qosClass`):
//!
//! | driver   | Guaranteed                                   | Burstable / BestEffort |
//! |----------|----------------------------------------------|------------------------|
//! | cgroupfs | `kubepods/pod<uid>`                          | `kubepods/burstable/pod<uid>` |
//! | systemd  | `kubepods.slice/kubepods-pod<uid_>.slice`    | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` |
//!
//! (`<uid_>`: the UID with `-` written `_`, since `-` separates slice levels in systemd unit
//! names.) The container runtime puts each container, the sandbox's pause container included,
//! in a scope or directory one level below (`cri-containerd-<id>.scope`, `crio-<id>.scope`,
//! `docker-<id>.scope`, or `<id>` under cgroupfs); capture matches those through the pod cgroup
//! (an ancestor), so only the pod cgroup is looked up here.

use std::path::{Path, PathBuf};

/// A pod's QoS class, as the API server sets it in `status.qosClass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub fn parse(text: &str) -> Option<QosClass> {
        match text {
            "Guaranteed" => Some(QosClass::Guaranteed),
            "Burstable" => Some(QosClass::Burstable),
            "BestEffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }

    /// The QoS level's cgroup name part; Guaranteed pods sit directly under `kubepods`.
    fn level(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

/// kubelet's `--cgroup-driver`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

impl CgroupDriver {
    pub const ALL: [CgroupDriver; 2] = [CgroupDriver::Systemd, CgroupDriver::Cgroupfs];
}

/// The pod cgroup's path relative to kubelet's cgroup root.
pub fn relative_path(driver: CgroupDriver, qos: QosClass, uid: &str) -> PathBuf {
    match driver {
        CgroupDriver::Cgroupfs => {
            let mut path = PathBuf::from("kubepods");
            if let Some(level) = qos.level() {
                path.push(level);
            }
            path.join(format!("pod{uid}"))
        }
        CgroupDriver::Systemd => {
            let uid = uid.replace('-', "_");
            let mut path = PathBuf::from("kubepods.slice");
            match qos.level() {
                Some(level) => {
                    path.push(format!("kubepods-{level}.slice"));
                    path.push(format!("kubepods-{level}-pod{uid}.slice"));
                }
                None => path.push(format!("kubepods-pod{uid}.slice")),
            }
            path
        }
    }
}

/// The pod's cgroup directory under `root` (kubelet's cgroup root on the host's cgroup2
/// mount), whichever driver kubelet uses; `None` until kubelet has created it. The QoS class
/// is tried as given, then the others: a pod's class never changes, but an object written
/// without `status.qosClass` (not the API server's doing) should still be found.
pub fn find(root: &Path, uid: &str, qos: Option<QosClass>) -> Option<PathBuf> {
    let all = [QosClass::Guaranteed, QosClass::Burstable, QosClass::BestEffort];
    let classes = qos.into_iter().chain(all.into_iter().filter(move |c| Some(*c) != qos));
    classes
        .flat_map(|qos| CgroupDriver::ALL.map(|driver| root.join(relative_path(driver, qos, uid))))
        .find(|path| path.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7f0b2a8c-1d2e-4f3a-9b8c-0123456789ab";

    #[test]
    fn names_match_kubelet_for_both_drivers_and_every_qos_class() {
        let cases = [
            (CgroupDriver::Cgroupfs, QosClass::Guaranteed, format!("kubepods/pod{UID}")),
            (CgroupDriver::Cgroupfs, QosClass::Burstable, format!("kubepods/burstable/pod{UID}")),
            (CgroupDriver::Cgroupfs, QosClass::BestEffort, format!("kubepods/besteffort/pod{UID}")),
            (
                CgroupDriver::Systemd,
                QosClass::Guaranteed,
                "kubepods.slice/kubepods-pod7f0b2a8c_1d2e_4f3a_9b8c_0123456789ab.slice".to_string(),
            ),
            (
                CgroupDriver::Systemd,
                QosClass::Burstable,
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7f0b2a8c_1d2e_4f3a_9b8c_0123456789ab.slice"
                    .to_string(),
            ),
            (
                CgroupDriver::Systemd,
                QosClass::BestEffort,
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7f0b2a8c_1d2e_4f3a_9b8c_0123456789ab.slice"
                    .to_string(),
            ),
        ];
        for (driver, qos, want) in cases {
            assert_eq!(relative_path(driver, qos, UID), PathBuf::from(want), "{driver:?} {qos:?}");
        }
    }

    #[test]
    fn finds_the_directory_kubelet_created_whichever_driver() {
        let root = std::env::temp_dir().join(format!("nodemesh-pod-cgroup-{}", std::process::id()));
        let systemd = root.join(relative_path(CgroupDriver::Systemd, QosClass::Burstable, UID));
        std::fs::create_dir_all(&systemd).expect("mkdir");
        assert_eq!(find(&root, UID, Some(QosClass::Burstable)), Some(systemd.clone()));
        // A missing class still finds it; a wrong UID does not.
        assert_eq!(find(&root, UID, None), Some(systemd));
        assert_eq!(find(&root, "0000", Some(QosClass::Burstable)), None);
        let other = "11111111-2222-3333-4444-555555555555";
        let cgroupfs = root.join(relative_path(CgroupDriver::Cgroupfs, QosClass::Guaranteed, other));
        std::fs::create_dir_all(&cgroupfs).expect("mkdir");
        assert_eq!(find(&root, other, Some(QosClass::Guaranteed)), Some(cgroupfs));
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
