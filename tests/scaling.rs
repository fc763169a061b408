//! `bench comm`'s memory-copy columns, the start-up transport probe (through `bench comm --probe`)
//! and `bench scaling`'s model, run as the binary (the probe under a real `mpirun`).

mod util;

use util::{dptrain, mpirun, tmpdir};

/// The rows of a `bench comm` table: its non-comment lines, split into columns.
fn rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn bench_comm_sets_a_memory_copy_beside_each_allreduce() {
    let d = tmpdir("comm-memcpy");
    let json = d.join("comm.json").display().to_string();
    let run = mpirun(
        2,
        &[
            "bench",
            "comm",
            "--min-bytes",
            "1024",
            "--max-bytes",
            "262144",
            "--iters",
            "3",
            "--json",
            &json,
        ],
        &[],
    )
    .ok();
    let out = run.stdout();
    assert!(out.contains("memcpy") && out.contains("bus/mem"), "{out}");
    let rows = rows(&out);
    assert_eq!(rows.len(), 9, "{out}");
    for r in &rows {
        // the nine columns of before, then memcpy (GB/s) and busbw / memcpy
        assert_eq!(r.len(), 11, "{r:?}");
        assert_eq!(r[7], "0", "{r:?}");
        let memcpy: f64 = r[9].parse().unwrap();
        let ratio: f64 = r[10].parse().unwrap();
        // (three decimals: a crowded test machine may print 0.000)
        assert!(memcpy > 0.0 && ratio >= 0.0, "{r:?}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for row in v.as_array().unwrap() {
        assert_eq!(row["ranks"], 2, "{row}");
        let (bus, mem, ratio) = (
            row["busbw_gbs"].as_f64().unwrap(),
            row["memcpy_gbs"].as_f64().unwrap(),
            row["busbw_over_memcpy"].as_f64().unwrap(),
        );
        assert!(ratio > 0.0 && (ratio - bus / mem).abs() <= 1e-9, "{row}");
    }
    // the rows feed the scaling model
    let s = dptrain(&[
        "bench",
        "scaling",
        "--comm-json",
        &json,
        "--workload",
        "mnist-mlp",
    ])
    .ok()
    .stdout();
    assert!(s.contains("2 ranks: alpha") && s.contains(&json), "{s}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn the_transport_probe_runs_on_every_rank_and_returns_one_answer() {
    for np in [2usize, 3] {
        let run = mpirun(np, &["bench", "comm", "--probe"], &[]).ok();
        let out = run.stdout();
        // rank 0 prints the figures and the verdict, once
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{}", run.show());
        assert!(
            lines[0].starts_with(&format!("transport probe: {np} ranks on one node")),
            "{out}"
        );
        assert!(
            lines[1] == "transport probe: ok"
                || (lines[1].starts_with("transport probe: warning:")
                    && lines[1].contains("OMPI_MCA_coll_tuned_allreduce_algorithm=4")),
            "{out}"
        );
        // its own time: 0.03–0.1 s on this 2-core machine, 0.03–0.05 s on the H200 host; the bound
        // here leaves room for a test machine crowded with other mpirun jobs
        let secs: f64 = lines[0]
            .rsplit(", ")
            .next()
            .and_then(|t| t.strip_suffix(" s"))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no time in {:?}", lines[0]));
        assert!(secs < 1.0, "{out}");
    }
    // one process has nothing to probe
    let one = dptrain(&["bench", "comm", "--probe"]).ok().stdout();
    assert_eq!(one.trim(), "transport probe: skipped (one rank)");
}

#[test]
fn bench_scaling_prints_labelled_predictions_for_each_workload() {
    let d = tmpdir("scaling");
    let json = d.join("scaling.json").display().to_string();
    let out = dptrain(&["bench", "scaling", "--json", &json])
        .ok()
        .stdout();
    assert!(out.starts_with("# bench scaling: PREDICTIONS"), "{out}");
    // every table has the asynchronous columns after the synchronous ones
    let heads: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("p "))
        .collect();
    assert_eq!(heads.len(), 3, "{out}");
    for h in &heads {
        let cols: Vec<&str> = h.split_whitespace().collect();
        assert_eq!(
            &cols[6..],
            ["psgd-r4+ovl", "local-h8", "f32-stale1", "local-h8-async"],
            "{h}"
        );
    }
    for w in ["seed-logreg", "mnist-mlp", "wide-mlp"] {
        assert!(out.contains(&format!("# {w}: ")), "{w}: {out}");
    }
    // 3 tables of a header and p = 2 … 512
    let table_rows = out
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .count();
    assert_eq!(table_rows, 3 * 9, "{out}");
    assert!(
        out.contains("WORKLOADS.md") && out.contains("docs/PERF.md"),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["kind"], "prediction");
    let ws = v["workloads"].as_array().unwrap();
    assert_eq!(ws.len(), 3);
    // 2 algorithms × 9 rank counts × 9 modes (7 synchronous, 2 asynchronous)
    assert_eq!(ws[1]["predictions"].as_array().unwrap().len(), 2 * 9 * 9);
    let kinds: Vec<&str> = ws[1]["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .take(9)
        .map(|p| p["exchange"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(&kinds[7..], ["stale_f32", "local_sgd_async"], "{kinds:?}");
    assert_eq!(ws[1]["parameters"], 1_863_690);
    let p0 = &ws[1]["predictions"][0];
    let (c, s, e) = (
        ws[1]["compute_ms"].as_f64().unwrap(),
        p0["step_ms"].as_f64().unwrap(),
        p0["efficiency"].as_f64().unwrap(),
    );
    assert!((e - c / s).abs() < 1e-12, "{p0}");

    // a step time of one's own, the tree, fewer ranks
    let out = dptrain(&[
        "bench",
        "scaling",
        "--workload",
        "wide-mlp",
        "--step-ms",
        "wide-mlp=11.93",
        "--algo",
        "tree",
        "--max-ranks",
        "64",
    ])
    .ok()
    .stdout();
    assert!(
        out.contains("step 11.93 ms (--step-ms)") && out.contains("Tree"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("64 ")),
        "{out}"
    );
    assert!(
        !out.lines().any(|l| l.trim_start().starts_with("128 ")),
        "{out}"
    );

    // mistakes are one line
    dptrain(&["bench", "scaling", "--step-ms", "wide-mlp"]).fails_with("WORKLOAD=MS");
    dptrain(&["bench", "scaling", "--step-ms", "resnet=3"]).fails_with("not among the workloads");
    let old = d.join("old.json");
    // bench comm rows of an older build: no ranks (inferred from busbw / algbw), no memcpy
    std::fs::write(
        &old,
        r#"[{"bytes":12,"count":3,"time_us":1.0,"algbw_gbs":0.012,"busbw_gbs":0.018,"wrong":0},
            {"bytes":1048576,"count":262144,"time_us":460.0,"algbw_gbs":2.28,"busbw_gbs":3.42,"wrong":0}]"#,
    )
    .unwrap();
    let out = dptrain(&[
        "bench",
        "scaling",
        "--comm-json",
        &old.display().to_string(),
        "--workload",
        "seed-logreg",
    ])
    .ok()
    .stdout();
    assert!(out.contains("4 ranks: alpha"), "{out}");
    dptrain(&["bench", "scaling", "--comm-json", &json])
        .fails_with("not the JSON of `bench comm --json`");
    let _ = std::fs::remove_dir_all(&d);
}
