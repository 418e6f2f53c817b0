//! The `vm` backend: each sandbox is an `airlock-vmm` microVM started by `airlock-jailer`
//! (chroot, cgroups, new PID namespace, dropped privileges; the VMM confines its own threads
//! with seccomp). The daemon drives the VMM's Firecracker-style API on the jail's API socket and
//! reaches the agent through the VMM's vsock Unix socket (`CONNECT 52`).
//!
//! Templates hold a kernel, an optional initrd and an ext4 root image; building one boots it
//! once, waits for the agent and takes a Full snapshot. A sandbox is a restore of that
//! snapshot in a fresh jailed VMM (vsock socket overridden, rootfs copied per sandbox), after
//! which the agent is told the time and given fresh entropy (the guest also sees a new VM
//! generation). A sandbox whose vCPUs or memory differ from the template's cold-boots instead.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use http::Method;

use super::{blocking, report, sandbox_dir, wait_for_agent, Progress};
use crate::agent::{bytes_body, empty_body, read_limited, AgentAddr, AgentConn, AGENT_VSOCK_PORT};
use crate::error::ApiError;
use crate::model::{
    AgentEndpoint, BackendKind, CreateTemplateRequest, Runtime, SandboxRecord, TemplateRecord,
};

pub const CARRIES: &str = "everything: memory, processes and files (a restore of a Full snapshot)";
/// Paths inside every jail.
const KERNEL: &str = "/vmlinux";
const INITRD: &str = "/initrd";
const ROOTFS: &str = "/rootfs.ext4";
const SNAP_STATE: &str = "/snapshot.state";
const SNAP_MEM: &str = "/snapshot.mem";
const API_SOCK: &str = "/run/api.sock";
const VSOCK: &str = "/run/v.sock";
const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// The VMM's own memory beside the guest's, for its cgroup limit.
pub const VMM_OVERHEAD_MIB: u64 = 64;
/// The VMM's tasks beside its vCPU threads, for its cgroup's pids.max.
pub const VMM_BASE_PIDS: u64 = 16;

pub struct VmBackend {
    pub state_dir: PathBuf,
    pub vmm_bin: PathBuf,
    pub jailer_bin: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_version: u8,
    pub ready_timeout: Duration,
    net_slots: Mutex<HashSet<u16>>,
}

/// One HTTP call to a VMM's API socket: (status, body).
pub async fn vmm_call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, String), String> {
    let mut conn = AgentConn::connect(
        &AgentAddr::Unix(socket.to_path_buf()),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| e.to_string())?;
    let body = match body {
        Some(v) => bytes_body(v.to_string()),
        None => empty_body(),
    };
    let response = tokio::time::timeout(Duration::from_secs(60), conn.send(method, path, body))
        .await
        .map_err(|_| format!("{path}: the VMM did not answer within 60 s"))?
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let bytes = read_limited(response.into_body(), 1 << 20)
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Like [`vmm_call`], demanding a 2xx.
async fn vmm_ok(
    socket: &Path,
    method: Method,
    path: &str,
    body: serde_json::Value,
) -> Result<(), ApiError> {
    let (status, text) = vmm_call(socket, method.clone(), path, Some(body))
        .await
        .map_err(|e| ApiError::BadGateway(format!("VMM API {method} {path}: {e}")))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(ApiError::BadGateway(format!(
            "VMM API {method} {path} answered {status}: {text}"
        )))
    }
}

fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)?;
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), ApiError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| ApiError::internal(&format!("chown {}", path.display()), e))
}

/// 32 bytes from the kernel's CSPRNG.
fn random_seed() -> Vec<u8> {
    let mut buf = vec![0u8; 32];
    // SAFETY: getrandom writes at most buf.len() bytes into the buffer we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    buf.truncate(n.max(0) as usize);
    buf
}

/// How a sandbox's VM is started.
enum BootMode<'a> {
    Cold { tpl: &'a TemplateRecord },
    Restore { tpl: &'a TemplateRecord },
}

impl VmBackend {
    pub fn new(
        state_dir: PathBuf,
        vmm_bin: PathBuf,
        jailer_bin: PathBuf,
        uid: u32,
        gid: u32,
    ) -> Result<VmBackend, String> {
        for (what, p) in [("airlock-vmm", &vmm_bin), ("airlock-jailer", &jailer_bin)] {
            if !p.is_file() {
                return Err(format!(
                    "{what} not found at {} (build it, or give its path)",
                    p.display()
                ));
            }
        }
        let cgroup_version = if Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists() {
            1
        } else {
            2
        };
        Ok(VmBackend {
            state_dir,
            vmm_bin,
            jailer_bin,
            uid,
            gid,
            cgroup_version,
            ready_timeout: Duration::from_secs(30),
            net_slots: Mutex::new(HashSet::new()),
        })
    }

    fn chroot_base(&self) -> PathBuf {
        self.state_dir.join("jail")
    }

    fn jail_root(&self, jail_id: &str) -> PathBuf {
        let exec_name = self
            .vmm_bin
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        self.chroot_base()
            .join(exec_name)
            .join(jail_id)
            .join("root")
    }

    /// Records a TAP's slot as used (daemon restart).
    pub fn note_tap(&self, tap: &str) {
        if let Some(n) = tap.strip_prefix("alk").and_then(|n| n.parse::<u16>().ok()) {
            self.net_slots.lock().unwrap().insert(n);
        }
    }

    fn take_net_slot(&self) -> Result<u16, ApiError> {
        let mut slots = self.net_slots.lock().unwrap();
        let n = (1..16000u16)
            .find(|n| !slots.contains(n))
            .ok_or_else(|| ApiError::LimitReached("no free network slot".into()))?;
        slots.insert(n);
        Ok(n)
    }

    /// 172.16.0.0/12 cut into /30s: the host side is .1, the guest .2 of slot n.
    fn slot_addrs(n: u16) -> (String, String) {
        let base = 0xAC10_0000u32 + u32::from(n) * 4;
        let ip = |v: u32| {
            format!(
                "{}.{}.{}.{}",
                v >> 24,
                (v >> 16) & 255,
                (v >> 8) & 255,
                v & 255
            )
        };
        (ip(base + 1), ip(base + 2))
    }

    async fn make_tap(&self, slot: u16) -> Result<String, ApiError> {
        let name = format!("alk{slot}");
        let (host_ip, _) = Self::slot_addrs(slot);
        let uid = self.uid.to_string();
        let cidr = format!("{host_ip}/30");
        let steps: [Vec<&str>; 3] = [
            vec![
                "tuntap", "add", "dev", &name, "mode", "tap", "user", &uid, "vnet_hdr",
            ],
            vec!["addr", "add", &cidr, "dev", &name],
            vec!["link", "set", &name, "up"],
        ];
        for args in steps {
            let out = tokio::process::Command::new("ip")
                .args(&args)
                .output()
                .await
                .map_err(|e| ApiError::internal("running ip(8)", e))?;
            if !out.status.success() {
                let _ = tokio::process::Command::new("ip")
                    .args(["link", "del", &name])
                    .output()
                    .await;
                return Err(ApiError::Internal(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        Ok(name)
    }

    /// Prepares a jail's root with the template's files, starts the jailed VMM and returns its
    /// host PID and start time.
    async fn start_jailed(
        &self,
        jail_id: &str,
        tpl: &TemplateRecord,
        with_snapshot: bool,
        mem_mib: u64,
        vcpus: u32,
    ) -> Result<(i32, u64, PathBuf), ApiError> {
        let root = self.jail_root(jail_id);
        let (tpl2, root2, uid, gid) = (tpl.clone(), root.clone(), self.uid, self.gid);
        blocking(move || {
            std::fs::create_dir_all(root2.join("run"))
                .map_err(|e| ApiError::internal("mkdir jail", e))?;
            chown(&root2.join("run"), uid, gid)?;
            let mut links = vec![];
            if let Some(k) = &tpl2.kernel {
                links.push((k.clone(), KERNEL));
            }
            if let Some(i) = &tpl2.initrd {
                links.push((i.clone(), INITRD));
            }
            if with_snapshot {
                if let (Some(s), Some(m)) = (&tpl2.snapshot_state, &tpl2.snapshot_mem) {
                    links.push((s.clone(), SNAP_STATE));
                    links.push((m.clone(), SNAP_MEM));
                }
            }
            for (from, to) in links {
                let target = root2.join(to.trim_start_matches('/'));
                link_or_copy(&from, &target).map_err(|e| {
                    ApiError::internal(&format!("placing {} in the jail", from.display()), e)
                })?;
            }
            // Every sandbox writes its own copy of the root disk.
            let image = tpl2
                .rootfs_image
                .clone()
                .ok_or_else(|| ApiError::Conflict("the template has no root image".into()))?;
            let disk = root2.join(ROOTFS.trim_start_matches('/'));
            std::fs::copy(&image, &disk)
                .map_err(|e| ApiError::internal("copying the root image", e))?;
            chown(&disk, uid, gid)?;
            Ok(())
        })
        .await?;
        let limit = (mem_mib + VMM_OVERHEAD_MIB) << 20;
        let quota = u64::from(vcpus.max(1)) * 100_000 + 50_000;
        let mut cmd = tokio::process::Command::new(&self.jailer_bin);
        cmd.arg("--id")
            .arg(jail_id)
            .arg("--exec-file")
            .arg(&self.vmm_bin)
            .arg("--uid")
            .arg(self.uid.to_string())
            .arg("--gid")
            .arg(self.gid.to_string())
            .arg("--chroot-base-dir")
            .arg(self.chroot_base())
            .arg("--cgroup-version")
            .arg(self.cgroup_version.to_string())
            .arg("--new-pid-ns")
            .arg("--daemonize");
        // The VMM's own threads (main, API, devices, a uffd handler, the deferred teardown) and
        // one per vCPU: anything beyond that is not a VMM doing its job.
        let pids = VMM_BASE_PIDS + u64::from(vcpus);
        if self.cgroup_version == 1 {
            cmd.arg("--cgroup")
                .arg(format!("memory.limit_in_bytes={limit}"))
                .arg("--cgroup")
                .arg(format!("cpu.cfs_quota_us={quota}"))
                .arg("--cgroup")
                .arg(format!("pids.max={pids}"));
        } else {
            cmd.arg("--cgroup")
                .arg(format!("memory.max={limit}"))
                .arg("--cgroup")
                .arg(format!("cpu.max={quota} 100000"))
                .arg("--cgroup")
                .arg(format!("pids.max={pids}"));
        }
        cmd.arg("--").arg("--api-sock").arg(API_SOCK);
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            cmd.stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| ApiError::Internal("airlock-jailer did not return within 30 s".into()))?
        .map_err(|e| ApiError::internal("running airlock-jailer", e))?;
        if !out.status.success() {
            return Err(ApiError::Internal(format!(
                "airlock-jailer failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let exec_name = self
            .vmm_bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let pid_file = root.join(format!("{exec_name}.pid"));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| ApiError::Internal(format!("no PID in {}", pid_file.display())))?;
        let start = crate::sys::pid_start_time(pid)
            .ok_or_else(|| ApiError::BadGateway("the VMM exited at once".into()))?;
        // The API socket appears once the VMM serves.
        let api = root.join(API_SOCK.trim_start_matches('/'));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !api.exists() {
            if std::time::Instant::now() > deadline {
                return Err(ApiError::BadGateway(
                    "the VMM's API socket did not appear within 10 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok((pid, start, root))
    }

    async fn boot(
        &self,
        jail_id: &str,
        mode: BootMode<'_>,
        vcpus: u32,
        mem_mib: u64,
        tap: Option<(&str, u16)>,
        hostname: &str,
    ) -> Result<Runtime, ApiError> {
        let tpl = match &mode {
            BootMode::Cold { tpl } | BootMode::Restore { tpl } => *tpl,
        };
        let restore = matches!(mode, BootMode::Restore { .. });
        let (pid, start, root) = self
            .start_jailed(jail_id, tpl, restore, mem_mib, vcpus)
            .await?;
        let api = root.join(API_SOCK.trim_start_matches('/'));
        let rt = Runtime {
            pid,
            pid_start_time: start,
            dir: sandbox_dir(&self.state_dir, jail_id),
            agent: AgentEndpoint::Vsock {
                uds_path: root.join(VSOCK.trim_start_matches('/')),
                port: AGENT_VSOCK_PORT,
            },
            cgroups: vec![],
            freezer: None,
            vmm_api_socket: Some(api.clone()),
            jail_id: Some(jail_id.to_string()),
            jail_dir: root.parent().map(Path::to_path_buf),
            tap: tap.map(|(t, _)| t.to_string()),
            uid_base: None,
        };
        let configured = async {
            if restore {
                let mut body = serde_json::json!({
                    "snapshot_path": SNAP_STATE,
                    "mem_backend": {"backend_type": "File", "backend_path": SNAP_MEM},
                    "resume_vm": true,
                    "vsock_override": {"uds_path": VSOCK},
                });
                if let Some((t, _)) = tap {
                    body["network_overrides"] = serde_json::json!([{"iface_id": "eth0", "host_dev_name": t}]);
                }
                vmm_ok(&api, Method::PUT, "/snapshot/load", body).await?;
            } else {
                let mut args = format!("{} {} airlock.hostname={hostname}", DEFAULT_BOOT_ARGS, tpl.boot_args.clone().unwrap_or_default());
                if let Some((_, slot)) = tap {
                    let (host_ip, guest_ip) = Self::slot_addrs(slot);
                    args.push_str(&format!(" airlock.net=eth0,{guest_ip}/30,{host_ip}"));
                }
                let mut boot = serde_json::json!({"kernel_image_path": KERNEL, "boot_args": args.trim()});
                if tpl.initrd.is_some() {
                    boot["initrd_path"] = INITRD.into();
                }
                vmm_ok(&api, Method::PUT, "/boot-source", boot).await?;
                vmm_ok(&api, Method::PUT, "/machine-config", serde_json::json!({"vcpu_count": vcpus, "mem_size_mib": mem_mib})).await?;
                vmm_ok(&api, Method::PUT, "/drives/rootfs", serde_json::json!({"drive_id": "rootfs", "path_on_host": ROOTFS, "is_root_device": true, "is_read_only": false})).await?;
                vmm_ok(&api, Method::PUT, "/vsock", serde_json::json!({"guest_cid": 3, "uds_path": VSOCK})).await?;
                vmm_ok(&api, Method::PUT, "/entropy", serde_json::json!({})).await?;
                if let Some((t, _)) = tap {
                    vmm_ok(&api, Method::PUT, "/network-interfaces/eth0", serde_json::json!({"iface_id": "eth0", "host_dev_name": t})).await?;
                }
                vmm_ok(&api, Method::PUT, "/actions", serde_json::json!({"action_type": "InstanceStart"})).await?;
            }
            // A guest that cannot boot ends its VMM (panic=1 reboot=k): say so at once rather
            // than wait out the whole agent timeout.
            let vmm_exited = async {
                while crate::sys::process_alive(pid, start) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            };
            let agent_addr = rt.agent.addr();
            tokio::select! {
                ready = wait_for_agent(&agent_addr, self.ready_timeout) => {
                    ready.map_err(|e| {
                        ApiError::BadGateway(format!(
                            "{e} (airlockd --agent-ready-timeout-s sets this wait)"
                        ))
                    })?;
                }
                () = vmm_exited => {
                    return Err(ApiError::BadGateway(format!(
                        "the VMM (process {pid}) exited before the agent answered: the guest did not boot \
                         (a kernel panic or a missing init reboots it)"
                    )));
                }
            }
            if restore {
                // A restored guest's clock and entropy are the template's: fix both.
                let mut conn = AgentConn::connect(&rt.agent.addr(), Duration::from_secs(5)).await?;
                let now_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
                conn.json(Method::POST, "/v1/time", Some(&serde_json::json!({"unix_ns": now_ns}))).await?;
                let seed = base64::engine::general_purpose::STANDARD.encode(random_seed());
                conn.json(Method::POST, "/v1/entropy", Some(&serde_json::json!({"seed": seed}))).await?;
            }
            Ok::<(), ApiError>(())
        }.await;
        if let Err(e) = configured {
            let _ = self.stop(&rt).await;
            return Err(e);
        }
        Ok(rt)
    }

    pub async fn start(
        &self,
        rec: &SandboxRecord,
        tpl: &TemplateRecord,
    ) -> Result<Runtime, ApiError> {
        let slot = if rec.network {
            Some(self.take_net_slot()?)
        } else {
            None
        };
        let tap = match slot {
            Some(n) => match self.make_tap(n).await {
                Ok(t) => Some((t, n)),
                Err(e) => {
                    self.net_slots.lock().unwrap().remove(&n);
                    return Err(e);
                }
            },
            None => None,
        };
        let same_shape = tpl.vcpus == rec.vcpus && tpl.memory_mib == rec.memory_mib;
        // A template's snapshot has no network device (templates are built without one), and a
        // restore cannot add one: a sandbox with network cold-boots from the template's files.
        let mode = if tpl.snapshot_state.is_some() && same_shape && tap.is_none() {
            BootMode::Restore { tpl }
        } else {
            BootMode::Cold { tpl }
        };
        std::fs::create_dir_all(sandbox_dir(&self.state_dir, &rec.id))
            .map_err(|e| ApiError::internal("mkdir", e))?;
        self.boot(
            &rec.id,
            mode,
            rec.vcpus,
            rec.memory_mib,
            tap.as_ref().map(|(t, n)| (t.as_str(), *n)),
            &rec.id,
        )
        .await
    }

    pub async fn stop(&self, rt: &Runtime) -> Result<(), ApiError> {
        if crate::sys::process_alive(rt.pid, rt.pid_start_time) {
            // SAFETY: kill(2) on the VMM we started, checked against its start time. The
            // jailer supervising it then removes the jail and its cgroups.
            unsafe {
                libc::kill(rt.pid, libc::SIGKILL);
            }
        }
        // Give the supervisor its chance, then clean up whatever is left ourselves.
        for _ in 0..150 {
            if rt.jail_dir.as_ref().is_none_or(|d| !d.exists()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        crate::sys::reap(rt.pid);
        if let Some(id) = &rt.jail_id {
            if rt.jail_dir.as_ref().is_some_and(|d| d.exists()) {
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::process::Command::new(&self.jailer_bin)
                        .args(["cleanup", "--id", id, "--kill"])
                        .arg("--exec-file")
                        .arg(&self.vmm_bin)
                        .arg("--chroot-base-dir")
                        .arg(self.chroot_base())
                        .arg("--cgroup-version")
                        .arg(self.cgroup_version.to_string())
                        .output(),
                )
                .await;
                if let Some(d) = &rt.jail_dir {
                    let _ = std::fs::remove_dir_all(d);
                }
            }
        }
        if let Some(t) = &rt.tap {
            let _ = tokio::process::Command::new("ip")
                .args(["link", "del", t])
                .output()
                .await;
            if let Some(n) = t.strip_prefix("alk").and_then(|n| n.parse::<u16>().ok()) {
                self.net_slots.lock().unwrap().remove(&n);
            }
        }
        let _ = std::fs::remove_dir_all(&rt.dir);
        Ok(())
    }

    pub async fn set_paused(&self, rt: &Runtime, paused: bool) -> Result<(), ApiError> {
        let api = rt
            .vmm_api_socket
            .clone()
            .ok_or_else(|| ApiError::Internal("no VMM API socket".into()))?;
        let state = if paused { "Paused" } else { "Resumed" };
        vmm_ok(
            &api,
            Method::PATCH,
            "/vm",
            serde_json::json!({"state": state}),
        )
        .await
    }

    /// Pauses the VM, takes a Full snapshot and a copy of its disk into `dir`, resumes it.
    pub async fn snapshot(
        &self,
        rec: &SandboxRecord,
        rt: &Runtime,
        tpl: &TemplateRecord,
        name: &str,
        dir: &Path,
    ) -> Result<TemplateRecord, ApiError> {
        let root = rt
            .jail_dir
            .as_ref()
            .map(|d| d.join("root"))
            .ok_or_else(|| ApiError::Internal("no jail".into()))?;
        self.set_paused(rt, true).await?;
        let result = self.snapshot_paused(&root, rt, tpl, dir).await;
        let resumed = self.set_paused(rt, false).await;
        let size = result?;
        resumed?;
        Ok(TemplateRecord {
            name: name.into(),
            backend: BackendKind::Vm,
            created_at_ms: crate::sys::now_ms(),
            source: format!("sandbox {}", rec.id),
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            size_bytes: size,
            rootfs_dir: None,
            kernel: Some(dir.join("vmlinux")),
            initrd: tpl.initrd.as_ref().map(|_| dir.join("initrd")),
            rootfs_image: Some(dir.join("rootfs.ext4")),
            boot_args: tpl.boot_args.clone(),
            snapshot_state: Some(dir.join("snapshot.state")),
            snapshot_mem: Some(dir.join("snapshot.mem")),
            carries: CARRIES.into(),
        })
    }

    async fn snapshot_paused(
        &self,
        root: &Path,
        rt: &Runtime,
        tpl: &TemplateRecord,
        dir: &Path,
    ) -> Result<u64, ApiError> {
        let api = rt
            .vmm_api_socket
            .clone()
            .ok_or_else(|| ApiError::Internal("no VMM API socket".into()))?;
        // Under /run, the one jail directory the jailed uid owns: the jail's root is root's.
        let (state, mem) = ("/run/new-snapshot.state", "/run/new-snapshot.mem");
        vmm_ok(&api, Method::PUT, "/snapshot/create", serde_json::json!({"snapshot_type": "Full", "snapshot_path": state, "mem_file_path": mem})).await?;
        let (root, dir, tpl) = (root.to_path_buf(), dir.to_path_buf(), tpl.clone());
        blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal("mkdir", e))?;
            let mv = |from: &Path, to: &Path| -> Result<(), ApiError> {
                if std::fs::rename(from, to).is_err() {
                    std::fs::copy(from, to)
                        .map_err(|e| ApiError::internal("moving the snapshot", e))?;
                    let _ = std::fs::remove_file(from);
                }
                let _ = std::os::unix::fs::chown(to, Some(0), Some(0));
                Ok(())
            };
            mv(
                &root.join(state.trim_start_matches('/')),
                &dir.join("snapshot.state"),
            )?;
            mv(
                &root.join(mem.trim_start_matches('/')),
                &dir.join("snapshot.mem"),
            )?;
            std::fs::copy(
                root.join(ROOTFS.trim_start_matches('/')),
                dir.join("rootfs.ext4"),
            )
            .map_err(|e| ApiError::internal("copying the disk", e))?;
            for (from, name) in [(&tpl.kernel, "vmlinux"), (&tpl.initrd, "initrd")] {
                if let Some(from) = from {
                    let to = dir.join(name);
                    // A template build snapshots into the directory its files are already in.
                    if *from != to {
                        link_or_copy(from, &to).map_err(|e| ApiError::internal(name, e))?;
                    }
                }
            }
            Ok(crate::sys::tree_size(&dir))
        })
        .await
    }

    /// Copies the image's kernel, initrd and root image, boots it once, waits for the agent and
    /// snapshots it.
    pub async fn build_template(
        &self,
        req: &CreateTemplateRequest,
        dir: &Path,
        progress: &Progress,
    ) -> Result<TemplateRecord, ApiError> {
        let img = &req.image;
        let kernel = ["vmlinux", "bzImage"]
            .iter()
            .map(|k| img.join(k))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{} has no vmlinux or bzImage: not a vm image (build it with images/build.sh)",
                    img.display()
                ))
            })?;
        let rootfs = img.join("rootfs.ext4");
        if !rootfs.is_file() {
            return Err(ApiError::BadRequest(format!(
                "{} has no rootfs.ext4",
                img.display()
            )));
        }
        let initrd = Some(img.join("initrd")).filter(|p| p.is_file());
        report(progress, "copying the image", serde_json::json!({}));
        let (d, k, r, i) = (
            dir.to_path_buf(),
            kernel.clone(),
            rootfs.clone(),
            initrd.clone(),
        );
        blocking(move || {
            std::fs::create_dir_all(&d).map_err(|e| ApiError::internal("mkdir", e))?;
            std::fs::copy(&k, d.join("vmlinux"))
                .map_err(|e| ApiError::internal("copying the kernel", e))?;
            std::fs::copy(&r, d.join("rootfs.ext4"))
                .map_err(|e| ApiError::internal("copying the root image", e))?;
            if let Some(i) = i {
                std::fs::copy(&i, d.join("initrd"))
                    .map_err(|e| ApiError::internal("copying the initrd", e))?;
            }
            Ok(())
        })
        .await?;
        let mut tpl = TemplateRecord {
            name: req.name.clone(),
            backend: BackendKind::Vm,
            created_at_ms: crate::sys::now_ms(),
            source: img.display().to_string(),
            vcpus: req.vcpus.unwrap_or(1),
            memory_mib: req.memory_mib.unwrap_or(256),
            size_bytes: 0,
            rootfs_dir: None,
            kernel: Some(dir.join("vmlinux")),
            initrd: initrd.map(|_| dir.join("initrd")),
            rootfs_image: Some(dir.join("rootfs.ext4")),
            boot_args: req.boot_args.clone(),
            snapshot_state: None,
            snapshot_mem: None,
            carries: CARRIES.into(),
        };
        report(progress, "booting the image once", serde_json::json!({}));
        let jail_id = format!("tpl-{}", req.name);
        let rt = self
            .boot(
                &jail_id,
                BootMode::Cold { tpl: &tpl },
                tpl.vcpus,
                tpl.memory_mib,
                None,
                "airlock",
            )
            .await?;
        report(
            progress,
            "agent ready; taking the snapshot",
            serde_json::json!({}),
        );
        let root = rt
            .jail_dir
            .as_ref()
            .map(|d| d.join("root"))
            .unwrap_or_default();
        self.set_paused(&rt, true).await?;
        let snap = self.snapshot_paused(&root, &rt, &tpl, dir).await;
        let _ = self.stop(&rt).await;
        tpl.size_bytes = snap?;
        tpl.snapshot_state = Some(dir.join("snapshot.state"));
        tpl.snapshot_mem = Some(dir.join("snapshot.mem"));
        Ok(tpl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_slots_are_disjoint_slash_30s() {
        assert_eq!(
            VmBackend::slot_addrs(1),
            ("172.16.0.5".into(), "172.16.0.6".into())
        );
        assert_eq!(
            VmBackend::slot_addrs(64),
            ("172.16.1.1".into(), "172.16.1.2".into())
        );
    }

    #[test]
    fn seeds_are_random() {
        let (a, b) = (random_seed(), random_seed());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
