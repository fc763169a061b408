//! Reliability: exact resume, determinism, a non-finite loss, a killed rank, a stalled rank, and a
//! relaunched job that still ends where an uninterrupted one does.

mod util;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use util::{dptrain, mpi_env, mpirun, params, shared, tmpdir};

const DIGITS_MLP: &[&str] = &[
    "--model",
    "mlp",
    "--hidden",
    "24",
    "--batch-size",
    "50",
    "--lr",
    "0.05",
    "--momentum",
    "0.9",
    "--weight-decay",
    "1e-4",
    "--seed",
    "7",
];

fn with<'a>(base: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend_from_slice(more);
    v
}

#[test]
fn e_epochs_then_resume_for_e_more_is_bit_identical_to_2e_straight() {
    let _turn = util::turn();
    let digits = shared("digits.csv");
    for device in ["cpu", "gpu"] {
        let d = tmpdir(&format!("resume-{device}"));
        let (straight, resumed) = (
            d.join("straight.safetensors"),
            d.join("resumed.safetensors"),
        );
        let ck = d.join("ck").display().to_string();
        let (s, r) = (
            straight.display().to_string(),
            resumed.display().to_string(),
        );
        let base = with(
            &["train", "--data", &digits, "--device", device],
            DIGITS_MLP,
        );
        dptrain(&with(&base, &["--epochs", "6", "--save", &s])).ok();
        dptrain(&with(&base, &["--epochs", "3", "--checkpoint-dir", &ck])).ok();
        let out = dptrain(&with(
            &base,
            &[
                "--epochs",
                "6",
                "--checkpoint-dir",
                &ck,
                "--resume",
                "auto",
                "--save",
                &r,
            ],
        ))
        .ok()
        .stdout();
        assert!(
            out.contains("resuming from") && out.contains("epoch 4/6"),
            "{out}"
        );
        assert_eq!(
            params(&resumed),
            params(&straight),
            "{device}: resumed run differs"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn a_mid_epoch_checkpoint_resumes_exactly_too() {
    let _turn = util::turn();
    let d = tmpdir("resume-steps");
    let digits = shared("digits.csv");
    let ck = d.join("ck").display().to_string();
    let (s, r) = (d.join("s.safetensors"), d.join("r.safetensors"));
    let (ss, rs) = (s.display().to_string(), r.display().to_string());
    let base = with(&["train", "--data", &digits, "--device", "cpu"], DIGITS_MLP);
    dptrain(&with(&base, &["--steps", "80", "--save", &ss])).ok();
    // 29 steps per epoch: checkpoints at 10, 20, 30, ... fall inside epochs
    dptrain(&with(
        &base,
        &[
            "--steps",
            "45",
            "--checkpoint-dir",
            &ck,
            "--checkpoint-unit",
            "step",
            "--checkpoint-every",
            "10",
        ],
    ))
    .ok();
    // resume from step 40 explicitly (the newest is the end of the 45-step run)
    let at40 = Path::new(&ck).join(dptrain::store::checkpoint::file_name(40));
    dptrain(&with(
        &base,
        &[
            "--steps",
            "80",
            "--resume",
            &at40.display().to_string(),
            "--save",
            &rs,
        ],
    ))
    .ok();
    assert_eq!(params(&r), params(&s));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_same_seed_and_world_size_give_bit_identical_parameters() {
    let _turn = util::turn();
    let d = tmpdir("determinism");
    let digits = shared("digits.csv");
    let runs: Vec<Vec<f32>> = (0..2)
        .map(|i| {
            let p = d.join(format!("gpu{i}.safetensors"));
            let ps = p.display().to_string();
            dptrain(&with(
                &[
                    "train", "--data", &digits, "--device", "gpu", "--epochs", "2", "--save", &ps,
                ],
                DIGITS_MLP,
            ))
            .ok();
            params(&p)
        })
        .collect();
    assert_eq!(runs[0], runs[1]);
    let mpi: Vec<Vec<f32>> = (0..2)
        .map(|i| {
            let p = d.join(format!("mpi{i}.safetensors"));
            let ps = p.display().to_string();
            mpirun(
                2,
                &with(
                    &[
                        "train", "--data", &digits, "--device", "cpu", "--epochs", "2", "--save",
                        &ps,
                    ],
                    DIGITS_MLP,
                ),
                &[],
            )
            .ok();
            params(&p)
        })
        .collect();
    assert_eq!(mpi[0], mpi[1]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn resuming_with_another_world_size_in_global_mode_continues_training() {
    let _turn = util::turn();
    let d = tmpdir("world");
    let digits = shared("digits.csv");
    let ck = d.join("ck").display().to_string();
    mpirun(
        2,
        &with(
            &[
                "train",
                "--data",
                &digits,
                "--device",
                "cpu",
                "--epochs",
                "2",
                "--checkpoint-dir",
                &ck,
            ],
            DIGITS_MLP,
        ),
        &[],
    )
    .ok();
    let out = dptrain(&with(
        &[
            "train",
            "--data",
            &digits,
            "--device",
            "cpu",
            "--epochs",
            "8",
            "--checkpoint-dir",
            &ck,
            "--resume",
            "auto",
        ],
        DIGITS_MLP,
    ))
    .ok()
    .stdout();
    assert!(
        out.contains("epoch 3/8") && out.contains("epoch 8/8"),
        "{out}"
    );
    let acc: f64 = out
        .lines()
        .rev()
        .find_map(|l| l.split("test_acc ").nth(1))
        .and_then(|t| t.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(acc > 0.9, "{out}");
    // split mode may not change the world size
    let e = mpirun(
        2,
        &with(
            &[
                "train",
                "--data",
                &digits,
                "--device",
                "cpu",
                "--epochs",
                "3",
                "--shard",
                "split",
                "--checkpoint-dir",
                &ck,
                "--resume",
                "auto",
            ],
            DIGITS_MLP,
        ),
        &[],
    );
    assert!(!e.out.status.success());
    assert!(
        e.stderr().contains("checkpoint does not fit this run"),
        "{}",
        e.show()
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_non_finite_loss_stops_naming_the_step_or_rolls_back_with_a_lower_rate() {
    let _turn = util::turn();
    let common = [
        "train",
        "--data",
        "synth:linear:500:3",
        "--model",
        "linreg",
        "--normalize",
        "none",
        "--epochs",
        "10",
        "--lr",
        "1.6",
    ];
    let base = with(&common, &["--batch-size", "20"]);
    for device in ["cpu", "gpu"] {
        dptrain(&with(&base, &["--device", device]))
            .fails_with("training diverged: the loss is inf at step 58");
    }
    let d = tmpdir("rollback");
    let ck = d.join("ck").display().to_string();
    let out = dptrain(&with(
        &base,
        &[
            "--device",
            "cpu",
            "--checkpoint-dir",
            &ck,
            "--on-nan",
            "rollback",
        ],
    ))
    .ok()
    .stdout();
    assert!(
        out.contains(
            "the loss is inf at step 58: rolled back to step 40 with the learning rate × 0.5"
        ),
        "{out}"
    );
    assert!(out.contains("epoch 10/10"), "{out}");
    // under mpirun the exchanged loss is checked each step, on every rank alike
    let r = mpirun(
        2,
        &with(&common, &["--device", "cpu", "--batch-size", "10"]),
        &[],
    );
    assert!(!r.out.status.success());
    assert_eq!(
        r.stderr()
            .matches("training diverged: the loss is inf at step 58")
            .count(),
        1,
        "{}",
        r.show()
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn damaged_checkpoints_are_refused_by_path_and_skipped_by_auto() {
    let _turn = util::turn();
    let d = tmpdir("damaged");
    let digits = shared("digits.csv");
    let ck = d.join("ck");
    let cks = ck.display().to_string();
    let base = with(&["train", "--data", &digits, "--device", "cpu"], DIGITS_MLP);
    dptrain(&with(&base, &["--epochs", "2", "--checkpoint-dir", &cks])).ok();
    let files = dptrain::store::checkpoint::list(&ck);
    let newest = files.last().unwrap().clone();
    let mut bytes = std::fs::read(&newest).unwrap();
    let n = bytes.len();
    bytes[n - 7] ^= 0x04;
    std::fs::write(&newest, &bytes).unwrap();
    let ns = newest.display().to_string();
    dptrain(&with(&base, &["--epochs", "3", "--resume", &ns]))
        .fails_with("checkpoint is damaged: checksum");
    let out = dptrain(&with(
        &base,
        &[
            "--epochs",
            "3",
            "--checkpoint-dir",
            &cks,
            "--resume",
            "auto",
        ],
    ))
    .ok();
    assert!(
        out.stdout().contains("resuming from") && out.stdout().contains("epoch 2/3"),
        "{}",
        out.show()
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// The pid of the dptrain process of `rank` among mpirun's children (found through its environment).
fn rank_pid(rank: usize, marker: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env);
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if env.contains(&format!("OMPI_COMM_WORLD_RANK={rank}\0"))
            && env.contains(marker)
            && String::from_utf8_lossy(&cmd).contains("dptrain")
        {
            return Some(pid);
        }
    }
    None
}

fn spawn_mpirun(np: usize, args: &[&str], marker: &str) -> std::process::Child {
    let np_s = np.to_string();
    let mut c = Command::new("mpirun");
    mpi_env(&mut c)
        .args([
            "--oversubscribe",
            "-np",
            &np_s,
            env!("CARGO_BIN_EXE_dptrain"),
        ])
        .args(args)
        .env("DPTRAIN_TEST_MARKER", marker)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().expect("mpirun")
}

fn kill_rank_when_running(rank: usize, marker: &str, after: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if let Some(pid) = rank_pid(rank, marker) {
            std::thread::sleep(after);
            return Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn a_rank_killed_with_sigkill_ends_the_job_within_10_seconds_naming_it() {
    let _turn = util::alone();
    let mnist = shared("mnist");
    let marker = format!("DPTRAIN_TEST_MARKER=kill-{}", std::process::id());
    let child = spawn_mpirun(
        3,
        &[
            "train", "--data", &mnist, "--device", "cpu", "--model", "mlp", "--hidden", "64",
            "--epochs", "20",
        ],
        &marker[20..],
    );
    assert!(
        kill_rank_when_running(1, &marker, Duration::from_secs(3)),
        "no rank 1 to kill"
    );
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rank 1") && err.contains("signal 9"), "{err}");
}

#[test]
fn a_stalled_rank_is_named_by_the_watchdog_and_the_job_ends() {
    let _turn = util::turn();
    let digits = shared("digits.csv");
    let t = Instant::now();
    let r = mpirun(
        3,
        &[
            "train",
            "--data",
            &digits,
            "--device",
            "cpu",
            "--epochs",
            "3",
            "--collective-timeout",
            "2",
        ],
        &[("DPTRAIN_FAULT", "stall:2:5")],
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    assert!(!r.out.status.success(), "{}", r.show());
    assert!(
        r.stderr().contains(
            "did not complete within 2 s (--collective-timeout): rank(s) 2 have not arrived"
        ),
        "{}",
        r.show()
    );
}

#[test]
fn a_relaunched_job_with_a_rank_killed_at_a_random_moment_ends_like_an_uninterrupted_one() {
    let _turn = util::turn();
    let d = tmpdir("relaunch");
    let digits = shared("digits.csv");
    let straight = d.join("straight.safetensors");
    let ss = straight.display().to_string();
    // about 2.5 s of training: long enough for a kill to land inside it
    let train = with(
        &[
            "train", "--data", &digits, "--device", "cpu", "--epochs", "600",
        ],
        DIGITS_MLP,
    );
    mpirun(2, &with(&train, &["--save", &ss]), &[]).ok();
    let ck = d.join("ck").display().to_string();
    let relaunched = d.join("relaunched.safetensors");
    let rs = relaunched.display().to_string();
    let marker = format!("DPTRAIN_TEST_MARKER=relaunch-{}", std::process::id());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/relaunch.sh");
    let mut cmd = Command::new("bash");
    mpi_env(&mut cmd)
        .arg(&script)
        .args([
            "-k",
            "3",
            "-d",
            "0",
            "--",
            "mpirun",
            "--oversubscribe",
            "-np",
            "2",
            env!("CARGO_BIN_EXE_dptrain"),
        ])
        .args(&train)
        .args([
            "--checkpoint-dir",
            &ck,
            "--checkpoint-unit",
            "step",
            "--checkpoint-every",
            "250",
            "--resume",
            "auto",
            "--save",
            &rs,
        ])
        .env("DPTRAIN_TEST_MARKER", &marker[20..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // a "random" moment: derived from the clock, between 0.3 and 1.5 s into the run
    let ms = 300
        + u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_millis(),
        ) % 1200;
    assert!(kill_rank_when_running(
        1,
        &marker,
        Duration::from_millis(ms)
    ));
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("relaunch: attempt 1 failed"),
        "the kill landed after the run ended? {err}"
    );
    assert_eq!(params(&relaunched), params(&straight));
    let _ = std::fs::remove_dir_all(&d);
}

/// Start `program args` with stdout piped, wait until a line containing `marker` appears on it,
/// send `signal` to the process (the program itself, or mpirun, which forwards it), and return the
/// exit status and everything printed.
fn signal_when(
    program: &str,
    args: &[&str],
    marker: &str,
    signal: &str,
) -> (std::process::ExitStatus, String, String) {
    use std::io::{BufRead, Read};
    let mut c = Command::new(program);
    mpi_env(&mut c)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap_or(0) > 0 {
        seen += &line;
        if line.contains(marker) {
            break;
        }
        line.clear();
    }
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    let status = child.wait().expect("wait");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status, seen + &rest, err)
}

#[test]
fn a_signal_stops_after_a_step_with_a_checkpoint_that_resumes_exactly() {
    let _turn = util::turn();
    use std::os::unix::process::ExitStatusExt;
    let digits = shared("digits.csv");
    let bin = env!("CARGO_BIN_EXE_dptrain");
    for (device, signal, status) in [("cpu", "TERM", 143), ("gpu", "INT", 130)] {
        let d = tmpdir(&format!("stop-{device}"));
        let ck = d.join("ck").display().to_string();
        let (s, r) = (d.join("s.safetensors"), d.join("r.safetensors"));
        let (ss, rs) = (s.display().to_string(), r.display().to_string());
        let epochs = if device == "cpu" { "40" } else { "6" };
        let base = with(
            &[
                "train", "--data", &digits, "--device", device, "--epochs", epochs,
            ],
            DIGITS_MLP,
        );
        dptrain(&with(&base, &["--save", &ss])).ok();
        let (st, out, err) = signal_when(
            bin,
            &with(&base, &["--checkpoint-dir", &ck, "--save", &rs]),
            "epoch 1/",
            signal,
        );
        assert_eq!(st.code(), Some(status), "{device}: {st:?}\n{out}\n{err}");
        assert!(st.signal().is_none());
        assert!(
            err.contains(&format!("stopped by SIG{signal} after step"))
                && err.contains("--resume auto"),
            "{err}"
        );
        assert!(!r.exists(), "a stopped run saves no final model");
        let resumed = dptrain(&with(
            &base,
            &["--checkpoint-dir", &ck, "--resume", "auto", "--save", &rs],
        ))
        .ok()
        .stdout();
        assert!(resumed.contains("resuming from"), "{resumed}");
        assert_eq!(params(&r), params(&s), "{device}: the resumed run differs");
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[test]
fn sigusr1_to_mpirun_stops_three_ranks_at_one_step_and_the_resume_is_exact() {
    let _turn = util::turn();
    let digits = shared("digits.csv");
    let bin = env!("CARGO_BIN_EXE_dptrain");
    let d = tmpdir("stop-mpi");
    let ck = d.join("ck").display().to_string();
    let (s, r) = (d.join("s.safetensors"), d.join("r.safetensors"));
    let (ss, rs) = (s.display().to_string(), r.display().to_string());
    let train = with(
        &[
            "train", "--data", &digits, "--device", "cpu", "--epochs", "25",
        ],
        DIGITS_MLP,
    );
    let np = ["--oversubscribe", "-np", "3", bin];
    mpirun(3, &with(&train, &["--save", &ss]), &[]).ok();
    let (st, out, err) = signal_when(
        "mpirun",
        &with(
            &with(&np, &train),
            &["--checkpoint-dir", &ck, "--save", &rs],
        ),
        "epoch 2/",
        "USR1",
    );
    assert!(!st.success(), "{out}\n{err}");
    assert!(
        err.contains("stopped by SIGUSR1 after step"),
        "{out}\n{err}"
    );
    let files = dptrain::store::checkpoint::list(Path::new(&ck));
    assert!(!files.is_empty(), "no checkpoint\n{err}");
    mpirun(
        3,
        &with(
            &train,
            &["--checkpoint-dir", &ck, "--resume", "auto", "--save", &rs],
        ),
        &[],
    )
    .ok();
    assert_eq!(params(&r), params(&s), "the resumed 3-rank run differs");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_second_run_on_a_locked_checkpoint_folder_is_refused_naming_the_holder() {
    let _turn = util::turn();
    use std::io::BufRead;
    let digits = shared("digits.csv");
    let d = tmpdir("lock");
    let ck = d.join("ck").display().to_string();
    let args = with(
        &[
            "train",
            "--data",
            &digits,
            "--device",
            "cpu",
            "--epochs",
            "200",
            "--checkpoint-dir",
            &ck,
        ],
        DIGITS_MLP,
    );
    let mut first = Command::new(env!("CARGO_BIN_EXE_dptrain"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(first.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("epoch 1/") {
        line.clear();
    }
    let second = dptrain(&args);
    let _ = first.kill();
    let _ = first.wait();
    second.fails_with(&format!(
        "is in use by another run (pid {} on this host",
        first.id()
    ));
    // the first run's checkpoints are still there
    assert!(!dptrain::store::checkpoint::list(Path::new(&ck)).is_empty());
    let _ = std::fs::remove_dir_all(&d);
}

/// A rank frozen with SIGSTOP at a moment drawn per trial (before, between or inside collectives,
/// the data transfer included) ends the job within --collective-timeout + 5 s, with one line naming
/// the timeout, in each of 10 trials.
#[test]
fn a_rank_frozen_by_sigstop_at_random_moments_ends_the_job_within_the_deadline() {
    let _turn = util::alone();
    let digits = shared("digits.csv");
    let timeout = 5.0;
    // a fixed draw: the delays cover data loading, the first steps and the middle of training
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for trial in 0..10 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay = Duration::from_millis(100 + x % 2900);
        let frozen = trial % 2;
        let marker = format!("DPTRAIN_TEST_MARKER=stop-{}-{trial}", std::process::id());
        let child = spawn_mpirun(
            2,
            &[
                "train",
                "--data",
                &digits,
                "--device",
                "cpu",
                "--model",
                "mlp",
                "--hidden",
                "32",
                "--batch-size",
                "8",
                "--epochs",
                "100000",
                "--collective-timeout",
                "5",
            ],
            &marker[20..],
        );
        let t = Instant::now();
        let pid = loop {
            if let Some(pid) = rank_pid(frozen, &marker) {
                break pid;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "trial {trial}: no rank {frozen}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        std::thread::sleep(delay);
        let stopped = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(stopped, "trial {trial}: cannot stop rank {frozen}");
        let t = Instant::now();
        let mut child = child;
        // a job that does not end is killed (with its frozen rank) and the trial fails
        while child.try_wait().unwrap().is_none() && t.elapsed().as_secs_f64() < timeout + 15.0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = t.elapsed().as_secs_f64();
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
            for r in 0..2 {
                if let Some(p) = rank_pid(r, &marker) {
                    let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
                }
            }
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            took < timeout + 5.0,
            "trial {trial} (rank {frozen} frozen after {delay:?}): the job took {took:.1} s to end\n{err}"
        );
        assert!(!out.status.success(), "trial {trial}: {err}");
        assert!(
            err.contains("--collective-timeout"),
            "trial {trial} (rank {frozen} frozen after {delay:?}): {err}"
        );
    }
}
