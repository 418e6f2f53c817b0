//! GPUs for namespace sandboxes, shared the way container runtimes share them: the host's NVIDIA
//! device nodes and driver files are bound into the sandbox read-only; the driver's binding,
//! the GPU's settings and the host's driver stay exactly as they are. (vm sandboxes get devices
//! through VFIO instead: `airlock-vmm`'s device passthrough, docs/gpu-passthrough.md.)
//!
//! What a sandbox with `gpus` can reach: the GPUs it was given, nvidiactl and the UVM nodes, and
//! the driver's user-space libraries and `nvidia-smi`. Isolation between such sandboxes is the
//! driver's (as between containers on one GPU): no memory or compute partitioning is implied.

use std::path::{Path, PathBuf};

/// Where the driver's files appear inside a sandbox (bin/ and lib64/ below it).
pub const IN_SANDBOX: &str = "/usr/local/nvidia";

/// Library name prefixes the driver's user-space part consists of (what CUDA and NVML load).
const LIBRARIES: &[&str] = &[
    "libcuda.so",
    "libnvidia-ml.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-nvvm.so",
    "libnvidia-gpucomp.so",
    "libcudadebugger.so",
];
/// Where distributions and driver installers put those libraries.
const LIBRARY_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/usr/local/nvidia/lib64",
    "/usr/local/nvidia/lib",
    "/usr/lib",
];
const BINARY_DIRS: &[&str] = &["/usr/bin", "/usr/local/nvidia/bin", "/usr/local/bin"];

/// What a sandbox gets for its `gpus`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuShare {
    /// Host device nodes, bound at the same name under the sandbox's /dev.
    pub device_nodes: Vec<PathBuf>,
    /// (host file, path inside the sandbox), bound read-only.
    pub files: Vec<(PathBuf, String)>,
    /// Device-cgroup (v1) rules that let the sandbox open those nodes.
    pub device_rules: Vec<String>,
}

/// The host's NVIDIA GPUs, by index (`/dev/nvidiaN`), under `dev`.
pub fn host_gpus(dev: &Path) -> Vec<u32> {
    let mut found: Vec<u32> = std::fs::read_dir(dev)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("nvidia")?.parse().ok())
        .collect();
    found.sort_unstable();
    found
}

/// Checks a request's `gpus` (`["all"]` or indices such as `["0", "2"]`) against the host's and
/// returns the indices it names. Empty asks for none.
pub fn select(requested: &[String], host: &[u32]) -> Result<Vec<u32>, String> {
    if requested.is_empty() {
        return Ok(vec![]);
    }
    if host.is_empty() {
        return Err("this host has no NVIDIA GPU (no /dev/nvidiaN device node)".into());
    }
    if requested.iter().any(|r| r == "all") {
        if requested.len() > 1 {
            return Err("gpus: \"all\" stands alone".into());
        }
        return Ok(host.to_vec());
    }
    let mut picked = Vec::new();
    for r in requested {
        let index: u32 = r
            .parse()
            .map_err(|_| format!("gpus: {r:?} is neither \"all\" nor a GPU index"))?;
        if !host.contains(&index) {
            return Err(format!(
                "gpus: this host has no GPU {index} (it has {})",
                host.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !picked.contains(&index) {
            picked.push(index);
        }
    }
    Ok(picked)
}

/// The character-device major a name has in /proc/devices.
fn major_of(proc_devices: &str, name: &str) -> Option<u32> {
    let mut in_char = false;
    for line in proc_devices.lines() {
        if line.starts_with("Character devices") {
            in_char = true;
            continue;
        }
        if line.starts_with("Block devices") {
            in_char = false;
        }
        let mut f = line.split_whitespace();
        if let (true, Some(major), Some(n)) = (in_char, f.next(), f.next()) {
            if n == name {
                return major.parse().ok();
            }
        }
    }
    None
}

/// Everything to bind for `indices`, found under `dev` and the driver's usual directories.
pub fn share(indices: &[u32], dev: &Path) -> Result<GpuShare, String> {
    let mut share = GpuShare::default();
    if indices.is_empty() {
        return Ok(share);
    }
    for i in indices {
        share.device_nodes.push(dev.join(format!("nvidia{i}")));
    }
    for name in ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"] {
        let node = dev.join(name);
        if node.exists() {
            share.device_nodes.push(node);
        }
    }
    if !dev.join("nvidiactl").exists() {
        return Err(format!(
            "{} is missing: the NVIDIA driver is not loaded",
            dev.join("nvidiactl").display()
        ));
    }
    let proc_devices = std::fs::read_to_string("/proc/devices").unwrap_or_default();
    share.device_rules.push("c 195:* rwm".into()); // nvidiaN and nvidiactl
    if let Some(uvm) = major_of(&proc_devices, "nvidia-uvm") {
        share.device_rules.push(format!("c {uvm}:* rwm"));
    }
    for dir in BINARY_DIRS {
        let smi = Path::new(dir).join("nvidia-smi");
        if smi.is_file() {
            share
                .files
                .push((smi, format!("{IN_SANDBOX}/bin/nvidia-smi")));
            break;
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for dir in LIBRARY_DIRS {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| LIBRARIES.iter().any(|p| n.starts_with(p)))
            .collect();
        names.sort();
        for name in names {
            // Each name (libcuda.so.1, libcuda.so.580.x) as a file of its own: the target of a
            // symbolic link is bound, never the link, so nothing resolves outside the sandbox.
            let Ok(real) = std::fs::canonicalize(Path::new(dir).join(&name)) else {
                continue;
            };
            if real.is_file() && seen.insert(name.clone()) {
                share
                    .files
                    .push((real, format!("{IN_SANDBOX}/lib64/{name}")));
            }
        }
    }
    if !seen.iter().any(|n| n.starts_with("libcuda.so")) {
        return Err("the NVIDIA driver's libcuda.so is not in any of the usual directories".into());
    }
    Ok(share)
}

/// The environment a GPU sandbox's commands get, so that CUDA and nvidia-smi are found.
pub fn environment() -> Vec<(String, String)> {
    vec![
        (
            "PATH".into(),
            format!(
                "{IN_SANDBOX}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            ),
        ),
        ("LD_LIBRARY_PATH".into(), format!("{IN_SANDBOX}/lib64")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_dev(nodes: &[&str]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "airlock-gpu-test-{}-{}",
            std::process::id(),
            nodes.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for n in nodes {
            std::fs::write(dir.join(n), b"").unwrap();
        }
        dir
    }

    #[test]
    fn gpus_are_found_by_index() {
        let dev = fake_dev(&["nvidia0", "nvidia2", "nvidiactl", "nvidia-uvm", "null"]);
        assert_eq!(host_gpus(&dev), vec![0, 2]);
        let _ = std::fs::remove_dir_all(dev);
    }

    #[test]
    fn requests_are_checked_against_the_host() {
        let host = [0, 2];
        assert_eq!(select(&[], &host), Ok(vec![]));
        assert_eq!(select(&["all".into()], &host), Ok(vec![0, 2]));
        assert_eq!(select(&["2".into(), "2".into()], &host), Ok(vec![2]));
        assert!(select(&["1".into()], &host)
            .unwrap_err()
            .contains("no GPU 1 (it has 0, 2)"));
        assert!(select(&["x".into()], &host)
            .unwrap_err()
            .contains("neither"));
        assert!(select(&["all".into(), "0".into()], &host)
            .unwrap_err()
            .contains("alone"));
        assert!(select(&["all".into()], &[])
            .unwrap_err()
            .contains("no NVIDIA GPU"));
    }

    #[test]
    fn uvm_major_comes_from_proc_devices() {
        let text =
            "Character devices:\n  1 mem\n195 nvidia\n235 nvidia-uvm\n\nBlock devices:\n  8 sd\n";
        assert_eq!(major_of(text, "nvidia-uvm"), Some(235));
        assert_eq!(major_of(text, "sd"), None);
    }

    #[test]
    fn share_names_nodes_and_refuses_without_the_driver() {
        let dev = fake_dev(&["nvidia0"]);
        assert!(share(&[0], &dev)
            .unwrap_err()
            .contains("nvidiactl is missing"));
        assert_eq!(share(&[], &dev), Ok(GpuShare::default()));
        let _ = std::fs::remove_dir_all(dev);
    }
}
