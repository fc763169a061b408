//! What a run writes, checked before any work and guarded while it runs: every output file must be
//! writable where it is and no output may be, or resolve to, an input or another output; the
//! checkpoint folder is held by an exclusive lock naming its holder.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// A path as the file system resolves it (symlinks, `..`): canonical when it exists, else its
/// folder's canonical path joined with its name. The folder must exist.
fn resolve(flag: &str, p: &Path) -> anyhow::Result<PathBuf> {
    if let Ok(c) = std::fs::canonicalize(p) {
        return Ok(c);
    }
    let parent = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = p
        .file_name()
        .with_context(|| format!("{flag} {}: not a file name", p.display()))?;
    let dir = std::fs::canonicalize(parent).map_err(|_| {
        anyhow::anyhow!(
            "{flag} {}: the folder {} does not exist",
            p.display(),
            parent.display()
        )
    })?;
    Ok(dir.join(name))
}

/// Create and remove a probe file in `dir`: the surest test that files can be made there.
fn probe(flag: &str, shown: &Path, dir: &Path) -> anyhow::Result<()> {
    let probe = dir.join(format!(".dptrain-probe-{}", std::process::id()));
    std::fs::File::create(&probe)
        .and_then(|mut f| f.write_all(b"probe"))
        .map_err(|e| anyhow::anyhow!("{flag} {}: cannot write there: {e}", shown.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The paths of a run: what it reads and what it writes.
#[derive(Default)]
pub struct RunPaths {
    /// (flag, path) of each input: a file, or a folder whose files are inputs (an MNIST folder).
    pub inputs: Vec<(&'static str, PathBuf)>,
    /// (flag, path) of each output file.
    pub files: Vec<(&'static str, PathBuf)>,
    /// (flag, path) of each output folder.
    pub dirs: Vec<(&'static str, PathBuf)>,
}

impl RunPaths {
    /// Check every output before the run does any work; folders are created.
    pub fn check(&self) -> anyhow::Result<()> {
        // every file an input names, resolved
        let mut inputs: Vec<(&str, PathBuf)> = Vec::new();
        for (flag, p) in &self.inputs {
            let Ok(c) = std::fs::canonicalize(p) else {
                continue; // the loader reports a missing input in its own words
            };
            if c.is_dir() {
                for e in std::fs::read_dir(&c).into_iter().flatten().flatten() {
                    inputs.push((flag, e.path()));
                }
            }
            inputs.push((flag, c));
        }
        let mut outputs: Vec<(&str, PathBuf)> = Vec::new();
        for (flag, p) in &self.dirs {
            if p.exists() && !p.is_dir() {
                bail!("{flag} {}: exists and is not a folder", p.display());
            }
            std::fs::create_dir_all(p)
                .map_err(|e| anyhow::anyhow!("{flag} {}: cannot create: {e}", p.display()))?;
            let c = std::fs::canonicalize(p)?;
            probe(flag, p, &c)?;
            outputs.push((flag, c));
        }
        for (flag, p) in &self.files {
            let r = resolve(flag, p)?;
            if r.is_dir() {
                bail!("{flag} {}: is a folder, not a file", p.display());
            }
            if r.exists() {
                // opening for appending changes nothing
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&r)
                    .map_err(|e| anyhow::anyhow!("{flag} {}: cannot write: {e}", p.display()))?;
            }
            // writes go through a temporary file in the same folder
            probe(flag, p, r.parent().unwrap_or(Path::new(".")))?;
            outputs.push((flag, r));
        }
        for (i, (flag, out)) in outputs.iter().enumerate() {
            if let Some((input_flag, _)) = inputs.iter().find(|(_, i)| i == out) {
                bail!(
                    "{flag} {} is an input of this run ({input_flag}); refusing to overwrite it",
                    out.display()
                );
            }
            if let Some((other, _)) = outputs[..i].iter().find(|(_, o)| o == out) {
                bail!("{other} and {flag} name the same path {}", out.display());
            }
        }
        // a file written inside the checkpoint folder under a checkpoint's name would be pruned
        for (flag, out) in &outputs {
            for (dflag, dir) in self
                .dirs
                .iter()
                .filter_map(|(f, d)| Some((f, d.canonicalize().ok()?)))
            {
                let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
                if out.parent() == Some(dir.as_path())
                    && name.is_some_and(|n| n.starts_with("ckpt-") || n.starts_with(".dptrain"))
                {
                    bail!(
                        "{flag} {} lies in {dflag} under a name that folder uses for its own files",
                        out.display()
                    );
                }
            }
        }
        Ok(())
    }
}

/// This machine's name, for lock files.
pub fn hostname() -> String {
    host_name().unwrap_or_else(|| "unknown-host".into())
}

/// This machine's host name: the kernel's, else `$HOSTNAME`, else gethostname(2); None when none
/// of them gives one. The one place the host name is read (locks, the trace, TensorBoard files,
/// the transport probe); each caller chooses its own stand-in.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .or_else(|| {
            let mut buf = [0u8; 256];
            // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes
            let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            (rc == 0 && end > 0).then(|| String::from_utf8_lossy(&buf[..end]).into_owned())
        })
}

/// Whether process `pid` of this machine is alive.
fn alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 sends nothing; it only asks whether the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// An exclusive advisory lock on a folder (`.dptrain.lock`, holding "host pid"), released on drop.
pub struct DirLock {
    path: PathBuf,
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Take `dir`'s lock. A lock left by a dead process of this machine is taken over; a live one, or
/// one from another machine (unless `break_lock`), is an error naming its holder.
pub fn lock_dir(dir: &Path, break_lock: bool) -> anyhow::Result<DirLock> {
    let path = dir.join(".dptrain.lock");
    let me = format!("{} {}\n", hostname(), std::process::id());
    for _ in 0..3 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(me.as_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?;
                return Ok(DirLock { path });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let mut it = text.split_whitespace();
                let (host, pid) = (
                    it.next().unwrap_or("?").to_string(),
                    it.next().and_then(|p| p.parse::<u32>().ok()),
                );
                let here = host == hostname();
                let stale = here && pid.is_some_and(|p| !alive(p));
                if !(stale || break_lock) {
                    let pid = pid.map_or("?".into(), |p| p.to_string());
                    if here {
                        bail!(
                            "{} is in use by another run (pid {pid} on this host {host}; lock file {}); give each run its own --checkpoint-dir",
                            dir.display(),
                            path.display()
                        );
                    }
                    bail!(
                        "{} is locked by pid {pid} on host {host} (lock file {}); if that run is gone, pass --break-lock",
                        dir.display(),
                        path.display()
                    );
                }
                tracing::warn!(
                    "{}: taking over the lock of pid {} on {host}",
                    dir.display(),
                    pid.unwrap_or(0)
                );
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => bail!("{}: cannot create: {e}", path.display()),
        }
    }
    bail!("{}: could not take the lock", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dptrain-out-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn outputs_may_not_be_inputs_each_other_or_folders() {
        let d = dir("paths");
        let data = d.join("data.csv");
        std::fs::write(&data, "0,1\n").unwrap();
        std::fs::create_dir_all(d.join("sub")).unwrap();
        let paths = |files: Vec<(&'static str, PathBuf)>| RunPaths {
            inputs: vec![("--data", data.clone())],
            files,
            dirs: vec![],
        };
        let e = paths(vec![("--save", d.join("sub/../data.csv"))])
            .check()
            .unwrap_err();
        assert!(
            e.to_string().contains("is an input of this run (--data)"),
            "{e}"
        );
        let e = paths(vec![
            ("--save", d.join("m")),
            ("--metrics-out", d.join("./m")),
        ])
        .check()
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("--save and --metrics-out name the same path"),
            "{e}"
        );
        let e = paths(vec![("--save", d.join("missing/m"))])
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = paths(vec![("--save", d.clone())]).check().unwrap_err();
        assert!(e.to_string().contains("is a folder"), "{e}");
        assert!(
            paths(vec![("--save", d.join("m.safetensors"))])
                .check()
                .is_ok()
        );
        assert_eq!(std::fs::read_to_string(&data).unwrap(), "0,1\n");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over() {
        let d = dir("lock");
        let held = lock_dir(&d, false).unwrap();
        let e = lock_dir(&d, false).err().unwrap().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(held);
        // a lock of a process that no longer exists (pid 0x7ffffff0 is never a live pid here)
        std::fs::write(
            d.join(".dptrain.lock"),
            format!("{} 2147483632\n", hostname()),
        )
        .unwrap();
        let _taken = lock_dir(&d, false).unwrap();
        drop(_taken);
        // another host's lock needs --break-lock
        std::fs::write(d.join(".dptrain.lock"), "elsewhere 12\n").unwrap();
        let e = lock_dir(&d, false).err().unwrap().to_string();
        assert!(
            e.contains("host elsewhere") && e.contains("--break-lock"),
            "{e}"
        );
        assert!(lock_dir(&d, true).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }
}
