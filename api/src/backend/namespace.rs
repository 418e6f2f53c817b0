//! The `namespace` backend: the agent runs as PID 1 of new mount, PID, UTS, IPC, cgroup and
//! (network off) network namespaces on the host, as root of a user namespace of its own (a host
//! id range no other sandbox or host user has, `userns.rs`), on an overlay of the template's root
//! filesystem, under the sandbox's cgroups, with reduced capabilities and a seccomp filter
//! (`launch.rs`). The host kernel is shared: this is a weaker boundary than `vm`.
//!
//! Templates are root filesystem trees. A snapshot copies the sandbox's root tree into a new
//! template; running processes and memory are not carried over (a fork starts fresh processes
//! on a copy of the files).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{blocking, log_tail, report, sandbox_dir, wait_for_agent, Progress};
use crate::cgroup::{self, Hierarchy, SandboxCgroups};
use crate::error::ApiError;
use crate::launch::{LaunchSpec, UserNsSpec};
use crate::model::{
    AgentEndpoint, BackendKind, CreateTemplateRequest, Runtime, SandboxRecord, TemplateRecord,
};

pub const CARRIES: &str = "files only: the root filesystem tree; processes and memory are not carried (namespace backend)";

pub struct NamespaceBackend {
    pub state_dir: PathBuf,
    pub hierarchy: Hierarchy,
    pub agent_bin: PathBuf,
    pub launcher: PathBuf,
    pub cgroup_parent: String,
    pub pids_max: u64,
    pub allow_host_network: bool,
    pub ready_timeout: Duration,
}

impl NamespaceBackend {
    pub fn new(
        state_dir: PathBuf,
        agent_bin: PathBuf,
        launcher: PathBuf,
        allow_host_network: bool,
    ) -> Result<NamespaceBackend, String> {
        let hierarchy =
            Hierarchy::detect(Path::new("/sys/fs/cgroup")).map_err(|e| e.to_string())?;
        if !agent_bin.is_file() {
            return Err(format!(
                "the agent binary {} does not exist (build airlock-agent, or give --agent-bin)",
                agent_bin.display()
            ));
        }
        if needs_loader(&agent_bin)? {
            return Err(format!(
                "the agent binary {} is dynamically linked: its loader and libraries would be read from the sandbox's own tree, which the tenant controls; build it static (the workspace's default musl target)",
                agent_bin.display()
            ));
        }
        let share = crate::cgroup::HostShare::of_this_host()?;
        let cgroup_parent = "airlock".to_string();
        crate::cgroup::limit_parent(&hierarchy, &cgroup_parent, &share)
            .map_err(|e| format!("limiting all sandboxes together to the host share: {e}"))?;
        Ok(NamespaceBackend {
            state_dir,
            hierarchy,
            agent_bin,
            launcher,
            cgroup_parent,
            pids_max: share.sandbox_pids_max,
            allow_host_network,
            ready_timeout: Duration::from_secs(15),
        })
    }

    pub async fn start(
        &self,
        rec: &SandboxRecord,
        tpl: &TemplateRecord,
    ) -> Result<Runtime, ApiError> {
        if rec.network && !self.allow_host_network {
            return Err(ApiError::BadRequest(
                "network: true is not available with the namespace backend unless airlockd runs with \
                 --namespace-host-network (the sandbox then shares the host's network namespace)"
                    .into(),
            ));
        }
        let lower = tpl.rootfs_dir.clone().ok_or_else(|| {
            ApiError::Conflict(format!("template {:?} has no root filesystem", tpl.name))
        })?;
        let dir = sandbox_dir(&self.state_dir, &rec.id);
        let socket = dir.join("run/agent.sock");
        if socket.as_os_str().len() > 100 {
            return Err(ApiError::Internal(format!(
                "the agent socket path {} is too long for a Unix socket: use a shorter --state-dir",
                socket.display()
            )));
        }
        let (h, parent, id) = (
            self.hierarchy.clone(),
            self.cgroup_parent.clone(),
            rec.id.clone(),
        );
        let (vcpus, mem, pids_max) = (rec.vcpus, rec.memory_mib, self.pids_max);
        let gpu = crate::gpu::share(&rec.gpus, Path::new("/dev")).map_err(ApiError::BadRequest)?;
        let device_rules = gpu.device_rules.clone();
        let (dir2, state_dir) = (dir.clone(), self.state_dir.clone());
        let made = blocking(move || {
            for d in ["upper", "work", "root", "run"] {
                std::fs::create_dir_all(dir2.join(d))
                    .map_err(|e| ApiError::internal("creating the sandbox directory", e))?;
            }
            let uid_base = crate::userns::claim(&state_dir, &id).map_err(ApiError::Internal)?;
            let limits = cgroup::SandboxLimits {
                vcpus,
                memory_mib: mem,
                pids_max,
                extra_device_rules: &device_rules,
            };
            let cgroups = cgroup::create(&h, &parent, &id, &limits)
                .map_err(|e| ApiError::internal("creating the sandbox's cgroups", e))
                .and_then(|cg| match cgroup::delegate(&cg, uid_base) {
                    Ok(()) => Ok(cg),
                    Err(e) => {
                        let _ = cgroup::remove(&cg, Duration::from_millis(500));
                        Err(ApiError::internal("delegating the sandbox's cgroups", e))
                    }
                });
            match cgroups {
                Ok(cg) => Ok((cg, uid_base)),
                Err(e) => {
                    crate::userns::release(&state_dir, uid_base);
                    Err(e)
                }
            }
        })
        .await;
        let (cgroups, uid_base) = match made {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut rt = Runtime {
            pid: 0,
            pid_start_time: 0,
            dir: dir.clone(),
            agent: AgentEndpoint::Unix {
                path: socket.clone(),
            },
            cgroups: cgroups.dirs.clone(),
            freezer: Some(cgroups.freezer.clone()),
            vmm_api_socket: None,
            jail_id: None,
            jail_dir: None,
            tap: None,
            uid_base: Some(uid_base),
        };
        match self
            .launch(rec, &lower, &dir, &cgroups, &gpu, uid_base)
            .await
        {
            Ok((pid, start)) => {
                rt.pid = pid;
                rt.pid_start_time = start;
            }
            Err(e) => {
                let _ = self.stop(&rt).await;
                return Err(e);
            }
        }
        if let Err(e) = wait_for_agent(&rt.agent.addr(), self.ready_timeout).await {
            let tail = log_tail(&dir.join("agent.log"), 2000);
            let _ = self.stop(&rt).await;
            return Err(ApiError::BadGateway(format!(
                "sandbox {} did not start: {e}; agent log: {tail}",
                rec.id
            )));
        }
        Ok(rt)
    }

    async fn launch(
        &self,
        rec: &SandboxRecord,
        lower: &Path,
        dir: &Path,
        cgroups: &SandboxCgroups,
        gpu: &crate::gpu::GpuShare,
        uid_base: u32,
    ) -> Result<(i32, u64), ApiError> {
        // 90% of the sandbox's memory for user code, the rest for the agent.
        let user_mem = (rec.memory_mib << 20) / 10 * 9;
        let spec = LaunchSpec {
            id: rec.id.clone(),
            hostname: rec.id.clone(),
            lower: lower.to_path_buf(),
            upper: dir.join("upper"),
            work: dir.join("work"),
            merged: dir.join("root"),
            run_dir: dir.join("run"),
            log: dir.join("agent.log"),
            cgroup_procs: cgroups.procs.clone(),
            cgroup_mounts: cgroups.visible.clone(),
            host_network: rec.network,
            agent_bin: self.agent_bin.clone(),
            agent_args: vec![
                "--listen".into(),
                "unix:/run/airlock/agent.sock".into(),
                "--init".into(),
                "always".into(),
                "--user-memory-max".into(),
                user_mem.to_string(),
                "--user-pids-max".into(),
                (self.pids_max.saturating_sub(64)).max(16).to_string(),
            ],
            tmp_size_mib: (rec.memory_mib / 2).max(16),
            device_nodes: gpu.device_nodes.clone(),
            ro_files: gpu.files.clone(),
            user_ns: Some(UserNsSpec {
                base: uid_base,
                lower_mount: dir.join("lower"),
            }),
        };
        let json = serde_json::to_string(&spec).expect("specs serialize");
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new(&self.launcher)
                .arg("__launch")
                .arg(json)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| ApiError::Internal("the sandbox launcher did not finish within 20 s".into()))?
        .map_err(|e| ApiError::internal("running the sandbox launcher", e))?;
        if !out.status.success() {
            return Err(ApiError::Internal(format!(
                "starting the sandbox failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let pid: i32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| ApiError::Internal("the launcher printed no PID".into()))?;
        let start = crate::sys::pid_start_time(pid).ok_or_else(|| {
            ApiError::BadGateway(format!(
                "the sandbox's agent exited at once: {}",
                log_tail(&dir.join("agent.log"), 2000)
            ))
        })?;
        Ok((pid, start))
    }

    pub async fn stop(&self, rt: &Runtime) -> Result<(), ApiError> {
        let rt = rt.clone();
        let layout = self.hierarchy.layout;
        let state_dir = self.state_dir.clone();
        blocking(move || {
            if crate::sys::process_alive(rt.pid, rt.pid_start_time) {
                // SIGKILL to PID 1 of the sandbox ends its whole PID namespace.
                // SAFETY: kill(2) on the pid we started, checked against its start time.
                unsafe {
                    libc::kill(rt.pid, libc::SIGKILL);
                }
            }
            let cg = SandboxCgroups {
                dirs: rt.cgroups.clone(),
                procs: vec![],
                visible: vec![],
                freezer: rt.freezer.clone().unwrap_or_default(),
                layout,
            };
            let result = cgroup::remove(&cg, Duration::from_secs(5));
            crate::sys::reap(rt.pid);
            let _ = std::fs::remove_dir_all(&rt.dir);
            // The range is free for another sandbox only once nothing of this one runs.
            if let (Some(base), Ok(())) = (rt.uid_base, &result) {
                crate::userns::release(&state_dir, base);
            }
            result.map_err(|e| ApiError::internal("freeing the sandbox's cgroups", e))
        })
        .await
    }

    pub async fn set_paused(&self, rt: &Runtime, paused: bool) -> Result<(), ApiError> {
        let freezer = rt
            .freezer
            .clone()
            .ok_or_else(|| ApiError::Internal("the sandbox has no freezer cgroup".into()))?;
        let layout = self.hierarchy.layout;
        blocking(move || {
            cgroup::set_frozen(layout, &freezer, paused)
                .map_err(|e| ApiError::internal(if paused { "pausing" } else { "resuming" }, e))
        })
        .await
    }

    /// Copies the sandbox's root tree (seen through its agent's /proc/PID/root, with the
    /// sandbox frozen meanwhile) into a new template.
    pub async fn snapshot(
        &self,
        rec: &SandboxRecord,
        rt: &Runtime,
        name: &str,
        dir: &Path,
    ) -> Result<TemplateRecord, ApiError> {
        self.set_paused(rt, true).await?;
        // The trailing slash makes lstat follow the magic link to the sandbox's root.
        let source = PathBuf::from(format!("/proc/{}/root/", rt.pid));
        let target = dir.join("rootfs");
        let dir2 = dir.to_path_buf();
        // The sandbox's files are owned by its host range; the template holds the ids the
        // sandbox saw, which each sandbox made from it maps to its own range.
        let ids = crate::sys::IdShift {
            base: rt.uid_base.unwrap_or(0),
        };
        let copied = blocking(move || {
            std::fs::create_dir_all(&dir2).map_err(|e| ApiError::internal("mkdir", e))?;
            crate::sys::copy_tree(&source, &target, ids, &mut |_| {})
                .map_err(|e| ApiError::internal("copying the sandbox's files", e))
        })
        .await;
        let thawed = self.set_paused(rt, false).await;
        let copied = copied?;
        thawed?;
        Ok(TemplateRecord {
            name: name.into(),
            backend: BackendKind::Namespace,
            created_at_ms: crate::sys::now_ms(),
            source: format!("sandbox {}", rec.id),
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            size_bytes: copied.bytes,
            rootfs_dir: Some(dir.join("rootfs")),
            kernel: None,
            initrd: None,
            rootfs_image: None,
            boot_args: None,
            snapshot_state: None,
            snapshot_mem: None,
            carries: CARRIES.into(),
        })
    }

    /// An image directory's root tree: `<image>/rootfs`, or the image itself when it is one.
    pub fn image_rootfs(image: &Path) -> Result<PathBuf, ApiError> {
        let nested = image.join("rootfs");
        if nested.is_dir() {
            return Ok(nested);
        }
        if image.join("bin").exists() || image.join("sbin").exists() || image.join("usr").is_dir() {
            return Ok(image.to_path_buf());
        }
        Err(ApiError::BadRequest(format!(
            "{} is not an image for the namespace backend: it needs a rootfs/ directory (images/out/<name>/rootfs) or to be a root filesystem tree itself",
            image.display()
        )))
    }

    pub async fn build_template(
        &self,
        req: &CreateTemplateRequest,
        dir: &Path,
        progress: &Progress,
    ) -> Result<TemplateRecord, ApiError> {
        let from = Self::image_rootfs(&req.image)?;
        let total = {
            let f = from.clone();
            blocking(move || Ok(crate::sys::tree_size(&f))).await?
        };
        report(
            progress,
            "copying the root filesystem",
            serde_json::json!({"bytes_total": total}),
        );
        let target = dir.join("rootfs");
        let (dir2, p2) = (dir.to_path_buf(), progress.clone());
        let copied = blocking(move || {
            std::fs::create_dir_all(&dir2).map_err(|e| ApiError::internal("mkdir", e))?;
            let mut last_report = 0u64;
            let done = crate::sys::copy_tree(&from, &target, crate::sys::IdShift::default(), &mut |p| {
                if p.bytes >= last_report + (4 << 20) {
                    last_report = p.bytes;
                    report(
                        &p2,
                        "copying the root filesystem",
                        serde_json::json!({"bytes_done": p.bytes, "bytes_total": total, "files_done": p.files}),
                    );
                }
            })
            .map_err(|e| ApiError::internal("copying the image's root filesystem", e))?;
            // No agent goes into the tree: every sandbox runs the daemon's own copy
            // (`launch.rs`), whatever its template's files hold.
            Ok(done)
        })
        .await?;
        report(
            progress,
            "root filesystem copied",
            serde_json::json!({"bytes_done": copied.bytes, "files_done": copied.files}),
        );
        Ok(TemplateRecord {
            name: req.name.clone(),
            backend: BackendKind::Namespace,
            created_at_ms: crate::sys::now_ms(),
            source: req.image.display().to_string(),
            vcpus: req.vcpus.unwrap_or(1),
            memory_mib: req.memory_mib.unwrap_or(256),
            size_bytes: copied.bytes,
            rootfs_dir: Some(dir.join("rootfs")),
            kernel: None,
            initrd: None,
            rootfs_image: None,
            boot_args: None,
            snapshot_state: None,
            snapshot_mem: None,
            carries: CARRIES.into(),
        })
    }
}

/// Whether an ELF executable names a program interpreter (a dynamic loader, `PT_INTERP`).
fn needs_loader(path: &Path) -> Result<bool, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    elf_has_interpreter(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads a 64-bit little-endian ELF header and its program headers, looking for `PT_INTERP`.
fn elf_has_interpreter(elf: &[u8]) -> Result<bool, &'static str> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("not an ELF executable");
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF executable");
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    if phentsize < 4 {
        return Err("malformed program headers");
    }
    for i in 0..phnum {
        let at = phoff
            .checked_add(
                i.checked_mul(phentsize)
                    .ok_or("malformed program headers")?,
            )
            .ok_or("malformed program headers")?;
        let p_type = elf
            .get(at..at + 4)
            .ok_or("program headers past the end of the file")?;
        if u32::from_le_bytes(p_type.try_into().expect("4 bytes")) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod agent_binary_tests {
    use super::elf_has_interpreter;

    #[test]
    fn the_agent_must_not_need_a_loader_from_the_tenants_tree() {
        // This test binary itself: dynamically linked on glibc targets, static on musl.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let dynamic = elf_has_interpreter(&me).unwrap();
        assert_eq!(dynamic, cfg!(target_env = "gnu"), "PT_INTERP detection");
        assert_eq!(
            elf_has_interpreter(b"#!/bin/sh\n"),
            Err("not an ELF executable")
        );
        let mut truncated = me[..64].to_vec();
        truncated[56] = 0xff; // many program headers, none present
        assert!(elf_has_interpreter(&truncated).is_err());
    }
}
