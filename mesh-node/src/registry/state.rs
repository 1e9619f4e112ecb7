//! Remembers registered workloads across mesh-node restarts, so a restarted (or upgraded)
//! mesh-node recaptures every pod without anyone registering it again.

use std::{
    io,
    path::{Path, PathBuf},
};

use nodemesh_api::workload::WorkloadSpec;

const FILE_NAME: &str = "workloads.json";

#[derive(Debug, Clone)]
pub(super) struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub(super) fn new(state_dir: &Path) -> StateFile {
        StateFile { path: state_dir.join(FILE_NAME) }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Missing file = no workloads yet. A corrupt file is an error naming it: silently starting
    /// empty would drop every pod out of the mesh.
    pub(super) fn load(&self) -> io::Result<Vec<WorkloadSpec>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e} (fix or remove the file)", self.path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Writes atomically (temp file + rename), so a crash mid-write leaves the old state.
    pub(super) fn save(&self, specs: &[WorkloadSpec]) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(specs).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corrupt_file_is_named() {
        let dir = std::env::temp_dir().join(format!("nodemesh-state-{}", std::process::id()));
        let state = StateFile::new(&dir);
        assert!(state.load().unwrap().is_empty());
        let spec: WorkloadSpec =
            serde_json::from_str(r#"{"name":"a","namespace":"b","cgroup":"/c","netns":"/n"}"#).unwrap();
        state.save(std::slice::from_ref(&spec)).unwrap();
        assert_eq!(state.load().unwrap(), vec![spec]);
        std::fs::write(state.path(), "{oops").unwrap();
        let err = state.load().unwrap_err().to_string();
        assert!(err.contains("workloads.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
