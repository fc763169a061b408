//! `dptrain devices`: the GPU adapters wgpu can see, with their limits and features.

use anyhow::bail;

pub fn run() -> anyhow::Result<()> {
    let adapters = dptrain_kernels::list_adapters();
    if adapters.is_empty() {
        bail!("{}", dptrain_kernels::KernelError::NoAdapter);
    }
    for a in adapters {
        let l = &a.limits;
        println!(
            "[{}] {} ({:?}, {:?}, driver {} {})",
            a.index,
            a.info.name,
            a.info.device_type,
            a.info.backend,
            a.info.driver,
            a.info.driver_info
        );
        println!(
            "    max storage binding {} MiB, max buffer {} MiB, workgroup memory {} KiB, {} invocations per workgroup",
            l.max_storage_buffer_binding_size / (1 << 20),
            l.max_buffer_size / (1 << 20),
            l.max_compute_workgroup_storage_size / 1024,
            l.max_compute_invocations_per_workgroup
        );
        println!("    features: {}", a.feature_names().join(", "));
    }
    Ok(())
}
