//! GPUs in namespace sandboxes (`gpus` on create): the host's NVIDIA device nodes and driver files
//! bound in, nothing about the GPU or its driver changed. Runs where a host has an NVIDIA GPU with
//! its driver loaded (the GPU machine the project sometimes has); elsewhere it prints its NOT RUN
//! line. The sandbox's root is built here from the host's own C library (the driver's tools are
//! glibc programs), busybox and a small CUDA driver-API query compiled with the host's `cc`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_tests::daemon::*;
use airlock_tests::not_run;
use serde_json::json;

const CUDA_QUERY: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
typedef int (*init_t)(unsigned);
typedef int (*count_t)(int *);
typedef int (*get_t)(int *, int);
typedef int (*name_t)(char *, int, int);
typedef int (*mem_t)(size_t *, int);
int main(void) {
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cuda) { printf("dlopen libcuda.so.1: %s\n", dlerror()); return 2; }
    init_t init = (init_t)dlsym(cuda, "cuInit");
    count_t count = (count_t)dlsym(cuda, "cuDeviceGetCount");
    get_t get = (get_t)dlsym(cuda, "cuDeviceGet");
    name_t name = (name_t)dlsym(cuda, "cuDeviceGetName");
    mem_t mem = (mem_t)dlsym(cuda, "cuDeviceTotalMem_v2");
    int rc = init(0);
    if (rc) { printf("cuInit failed: %d\n", rc); return 3; }
    int n = 0;
    count(&n);
    printf("CUDA devices: %d\n", n);
    for (int i = 0; i < n; i++) {
        int dev; char buf[128] = {0}; size_t bytes = 0;
        get(&dev, i); name(buf, sizeof buf, dev); mem(&bytes, dev);
        printf("device %d: %s, %zu MiB\n", i, buf, bytes >> 20);
    }
    return 0;
}
"#;

/// A root filesystem with busybox, the host's glibc and the CUDA query, or why not.
fn glibc_rootfs(dir: &Path) -> Result<PathBuf, String> {
    let base = test_rootfs().ok_or("no busybox root filesystem (bash images/build.sh)")?;
    let root = dir.join("rootfs");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&base)
        .arg(&root)
        .status()
        .map_err(|e| format!("cp: {e}"))?;
    if !status.success() {
        return Err("copying the busybox root failed".into());
    }
    let src = dir.join("cuda-query.c");
    std::fs::write(&src, CUDA_QUERY).map_err(|e| e.to_string())?;
    let exe = root.join("usr/bin/cuda-query");
    std::fs::create_dir_all(exe.parent().unwrap()).map_err(|e| e.to_string())?;
    let cc = std::process::Command::new("cc")
        .arg("-O2")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .arg("-ldl")
        .output()
        .map_err(|e| format!("no C compiler for the CUDA query (cc: {e})"))?;
    if !cc.status.success() {
        return Err(format!(
            "cc failed: {}",
            String::from_utf8_lossy(&cc.stderr)
        ));
    }
    // The dynamic loader and C library the query and nvidia-smi need, from the host.
    let ldd = std::process::Command::new("ldd")
        .arg(&exe)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .chain([
            "/lib/x86_64-linux-gnu/libm.so.6",
            "/lib/x86_64-linux-gnu/libpthread.so.0",
            "/lib/x86_64-linux-gnu/librt.so.1",
        ])
    {
        let host = Path::new(lib);
        if !host.exists() {
            continue;
        }
        let inside = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(inside.parent().unwrap()).map_err(|e| e.to_string())?;
        // A merged-/usr host has /lib as a link: copy the file, not the link.
        let _ = std::fs::remove_file(&inside);
        std::fs::copy(host, &inside).map_err(|e| format!("copying {lib}: {e}"))?;
    }
    Ok(root)
}

#[test]
fn gpu_sandbox_runs_nvidia_smi_and_sees_cuda_devices() {
    let test = "gpu_sandbox_runs_nvidia_smi_and_sees_cuda_devices";
    if !Path::new("/dev/nvidiactl").exists() {
        return not_run(test, "no NVIDIA GPU here (/dev/nvidiactl is absent)");
    }
    if let Some(reason) = cannot_run_reason() {
        return not_run(test, &reason);
    }
    let scratch = airlock_tests::scratch_dir("gpu");
    let rootfs = match glibc_rootfs(&scratch) {
        Ok(r) => r,
        Err(e) => return not_run(test, &e),
    };
    let d = DaemonUnderTest::start(&[]);
    run_bounded(Duration::from_secs(180), async {
        let c = d.client();
        c.call(
            Method::POST,
            "/v1/templates",
            Some(&json!({"name": "glibc", "image": rootfs})),
        )
        .await
        .unwrap();
        // A GPU that does not exist is refused by name.
        let (s, e) = checked(
            &c,
            Method::POST,
            "/v1/sandboxes",
            Some(&json!({"template": "glibc", "gpus": ["99"]})),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        assert!(e["error"].as_str().unwrap().contains("no GPU 99"), "{e}");
        // Without gpus: no GPU node, no driver.
        let plain = create(&c, json!({"template": "glibc"})).await;
        let out = sh(&c, &plain, "ls /dev; ls /usr/local/nvidia 2>&1").await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("nvidia"), "{text}");

        let id = create(&c, json!({"template": "glibc", "gpus": ["all"]})).await;
        let v = c
            .call(Method::GET, &format!("/v1/sandboxes/{id}"), None)
            .await
            .unwrap();
        assert!(!v["gpus"].as_array().unwrap().is_empty(), "{v}");
        let smi = sh(
            &c,
            &id,
            "nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader",
        )
        .await;
        let smi_out = String::from_utf8_lossy(&smi.stdout).to_string();
        eprintln!(
            "nvidia-smi in the sandbox (exit {:?}):\n{smi_out}{}",
            smi.code,
            String::from_utf8_lossy(&smi.stderr)
        );
        assert_eq!(
            smi.code,
            Some(0),
            "{smi_out}{}",
            String::from_utf8_lossy(&smi.stderr)
        );
        assert!(smi_out.contains("GPU 0: NVIDIA"), "{smi_out}");
        let q = sh(&c, &id, "cuda-query").await;
        let q_out = String::from_utf8_lossy(&q.stdout).to_string();
        eprintln!(
            "CUDA driver-API query in the sandbox (exit {:?}):\n{q_out}",
            q.code
        );
        assert_eq!(
            q.code,
            Some(0),
            "{q_out}{}",
            String::from_utf8_lossy(&q.stderr)
        );
        assert!(
            q_out.contains("CUDA devices: ") && !q_out.contains("CUDA devices: 0"),
            "{q_out}"
        );
        // The driver's files are read-only in the sandbox.
        let w = c
            .exec(
                &id,
                &json!({"cmd": ["sh", "-c", "echo x > /usr/local/nvidia/bin/nvidia-smi"]}),
            )
            .await
            .unwrap();
        assert_ne!(w.code, Some(0), "the sandbox wrote the host's nvidia-smi");
    });
    drop(d);
    let _ = std::fs::remove_dir_all(scratch);
}
