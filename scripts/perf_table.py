#!/usr/bin/env python3
"""Markdown table of dptrain bench results beside the PyTorch reference from the same card.

Usage: perf_table.py RAW_DIR  (the JSON files scripts/device-bench.sh writes). Standard library only.
"""
import json, os, sys

TARGETS = {  # workload/batch: (minimum ratio dptrain / PyTorch eager fp32 samples/s, aim)
    "seed-logreg/b100": (10.0, None),
    "mnist-mlp/b1024": (2.0, None),
    "mnist-mlp/b8192": (0.8, 1.0),
    "wide-mlp/b8192": (0.7, 0.85),
}

def load(d, name):
    p = os.path.join(d, name)
    return json.load(open(p)) if os.path.exists(p) else None

def main():
    d = sys.argv[1]
    torch = load(d, "pytorch.json") or {"workloads": {}}
    rows = ["| workload / batch | dptrain step ms | dptrain samples/s | dptrain TFLOP/s | PyTorch fp32 samples/s | ratio | target |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    gpu = torch.get("gpu", "?")
    adapter = None
    for key in ["seed-logreg-b100", "seed-logreg-b65536", "mnist-mlp-b1024", "mnist-mlp-b8192", "wide-mlp-b8192"]:
        ours = load(d, key + ".json")
        name, batch = key.rsplit("-b", 1)
        ref = torch["workloads"].get(f"{name}/b{batch}/fp32")
        if ours is None:
            rows.append(f"| {name} / {batch} | not measured | | | | | |")
            continue
        adapter = ours.get("adapter", adapter)
        sps = ours["samples_per_s_per_rank"]
        ratio = sps / ref["samples_per_s"] if ref else None
        tgt = TARGETS.get(f"{name}/b{batch}")
        ok = "" if tgt is None or ratio is None else (" met" if ratio >= tgt[0] else " NOT met")
        rows.append("| {} / {} | {:.4f} | {:,.0f} | {:.2f} | {} | {} | {} |".format(
            name, batch, ours["step_ms"], sps, ours["tflops"],
            f"{ref['samples_per_s']:,.0f}" if ref else "–",
            f"{ratio:.2f}×" if ratio else "–",
            (f"≥ {tgt[0]}×{ok}" if tgt else "–")))
    print(f"GPU: {gpu}; dptrain adapter: {adapter}\n")
    print("\n".join(rows))
    mm = load(d, "matmul.json")
    if mm:
        print("\n| matmul form | size | tile | ms | TFLOP/s |\n| --- | --- | --- | --- | --- |")
        for r in mm:
            print(f"| {r['form']} | {r['size']} | {r.get('tile', 64)} | {r['ms']:.3f} | {r['tflops']:.2f} |")
        print(f"\ncuBLAS SGEMM 4096 on the same card: fp32 {torch.get('sgemm_4096_fp32_tflops', '–')} TFLOP/s, "
              f"TF32 {torch.get('sgemm_4096_tf32_tflops', '–')} TFLOP/s (target for WGSL: ≥ 40)")
    one = load(d, "seed-logreg-b100-1step.json")
    many = load(d, "seed-logreg-b100.json")
    if one and many:
        print(f"\nseed-logreg/100: {many['step_ms']*1e3:.1f} µs per step with 16 steps per submission, "
              f"{one['step_ms']*1e3:.1f} µs with one")
    two = load(d, "mnist-mlp-b1024-2ranks.json")
    if two and two.get("exchange"):
        e = two["exchange"]
        print(f"\nmnist-mlp/1024 on 2 ranks: {two['samples_per_s']:,.0f} samples/s in all; allreduce of {e['bytes']} B in the step "
              f"{e['step_allreduce_ms']:.3f} ms vs raw MPI {e['raw_allreduce_ms']:.3f} ms "
              f"(overhead {e['overhead_vs_raw']*100:+.1f}%, target ≤ +10%); readback {e['readback_ms']:.3f} ms (incl. GPU compute), "
              f"upload {e['upload_ms']:.3f} ms (PyTorch's pinned round trip: {torch['workloads'].get('mnist-mlp/grad_roundtrip_ms', '–')} ms); "
              f"scaling efficiency {e['scaling_efficiency']*100:.1f}%")

if __name__ == "__main__":
    main()
