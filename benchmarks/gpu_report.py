"""Summarise a benchmarks/gpu_check.sh run: OUT_DIR/results.json and OUT_DIR/results.md.

Usage: python benchmarks/gpu_report.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

TARGETS = {"mfu_model (MDLM step)": 0.45, "MemDLM/MDLM time ratio": 1.5, "memory on/off peak ratio": 1.3}


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def tests(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        status = "passed"
        for kind in ("failure", "error", "skipped"):
            element = case.find(kind)
            if element is not None:
                status = kind if kind != "failure" else "failed"
                out.append({"test": case.get("name"), "status": status,
                            "message": (element.get("message") or "")[:500]})
                break
        else:
            out.append({"test": case.get("name"), "status": status, "seconds": float(case.get("time", 0))})
    return out


def kernel_targets(kernels: dict) -> list[tuple[str, float | None, str]]:
    """Issue #21's GPU targets from compile_speed.py's figures: (what, measured, goal)."""
    out, precision = [], kernels["precision"]
    for mode, floor in (("none", 0.48), ("selective", 0.40)):
        figures = kernels["modes"].get(mode, {})
        bf16 = {name: figures[name] for name in ("eager", "compiled") if name in figures}
        if bf16:
            best = max(bf16, key=lambda name: bf16[name]["mdlm"]["mfu_model"])
            out.append((f"MDLM mfu_model, {precision} ({best}), recompute {mode}", bf16[best]["mdlm"]["mfu_model"],
                        f">= {floor}"))
            out.append((f"MemDLM/MDLM, {precision} ({best}), recompute {mode}", bf16[best]["ratio"], "<= 1.45"))
    for mode, figures in kernels["modes"].items():
        if "fp8" in figures:
            for base in ("compiled", "eager"):
                if base in figures:
                    speedup = figures[base]["mdlm"]["seconds"] / figures["fp8"]["mdlm"]["seconds"]
                    out.append((f"fp8 MDLM step speed-up over {base} {precision}, recompute {mode}", speedup,
                                ">= 1.25"))
    return out


def kernel_lines(kernels: dict) -> list[str]:
    lines = ["", f"Kernels (compile_speed.py): micro-batch {kernels['batch']} x {kernels['seq_len']}, peak "
                 f"{kernels['peak_flops'] / 1e12:.1f} TFLOP/s ({kernels['peak_source']})", "",
             "| recompute | variant | MDLM ms | MemDLM ms | speed-up MDLM / MemDLM | mfu_model MDLM | MemDLM/MDLM | "
             "step memory GiB MDLM / MemDLM |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, figures in kernels["modes"].items():
        for name, f in figures.items():
            memory = " / ".join("-" if f[k]["memory_bytes"] is None else f"{f[k]['memory_bytes'] / 2**30:.1f}"
                                for k in ("mdlm", "memdlm"))
            lines.append(f"| {mode} | {name} | {f['mdlm']['seconds'] * 1e3:.1f} | {f['memdlm']['seconds'] * 1e3:.1f} | "
                         f"{f['mdlm']['speedup']:.3f} / {f['memdlm']['speedup']:.3f} | {f['mdlm']['mfu_model']:.1%} | "
                         f"{f['ratio']:.3f} | {memory} |")
    return lines


def drift_lines(drift: dict) -> list[str]:
    incomplete = "" if drift.get("complete", True) else f" (incomplete: exit codes {drift['exit_codes']})"
    lines = ["", f"fp8 drift (fp8_drift.py): {drift['other']} against {drift['reference']} over {drift['steps']} "
                 f"steps{incomplete}, "
                 f"batch {drift['batch']}: training loss relative difference mean "
                 f"{drift['mean_relative_loss_difference']:.2%}, largest {drift['max_relative_loss_difference']:.2%}; "
                 "mean loss over the last quarter: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                 drift["last_quarter_mean_loss"].items())]
    for step, losses in drift["held_out"].items():
        lines.append(f"- held-out at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()
                                                                if v is not None))
    return lines


def main() -> None:
    folder = Path(sys.argv[1])
    results = {"environment": read_json(folder / "environment.json"),
               "tests": [t for path in sorted(folder.glob("gpu_tests*.xml")) for t in tests(path)]}
    metrics = folder / "default_job_metrics.jsonl"
    if metrics.is_file():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if lines:
            tail = lines[-10:]
            results["default_job"] = {
                "steps": lines[-1]["step"], "first_loss": lines[0]["loss"], "last_loss": lines[-1]["loss"],
                "tokens_per_s": sum(m["tokens_per_s"] for m in tail) / len(tail),
                "mfu_model": sum(m.get("mfu_model", 0) for m in tail) / len(tail),
                "mfu_total": sum(m.get("mfu_total", 0) for m in tail) / len(tail)}
    cost = read_json(folder / "step_cost.json")
    results["step_cost"] = cost
    if cost:
        results["targets"] = {
            "mfu_model (MDLM step)": cost["mdlm"]["mfu_model"],
            "MemDLM/MDLM time ratio": cost["time_ratio"],
            "memory on/off peak ratio": cost.get(f"memory_ratio/{cost['recompute']}"),
        }
    kernels, drift = read_json(folder / "kernels.json"), read_json(folder / "fp8_drift.json")
    results["kernels"], results["fp8_drift"] = kernels, drift
    if kernels:
        results["kernel_targets"] = [{"target": t, "measured": m, "goal": g} for t, m, g in kernel_targets(kernels)]
    (folder / "results.json").write_text(json.dumps(results, indent=2))

    lines = ["# GPU check", ""]
    env = results["environment"] or {}
    lines.append(f"Machine: {env.get('gpu') or 'no GPU'}; Python {env.get('python')}, torch {env.get('torch')} "
                 f"(CUDA {env.get('cuda')}), megatron-core {env.get('megatron.core')}.")
    lines += ["", "| test | status |", "| --- | --- |"]
    lines += [f"| {t['test']} | {t['status']}{': ' + t['message'][:120] if t.get('message') else ''} |"
              for t in results["tests"]]
    job = results.get("default_job")
    if job:
        lines += ["", f"Default job: {job['steps']} steps, loss {job['first_loss']:.3f} -> {job['last_loss']:.3f}, "
                      f"{job['tokens_per_s']:,.0f} tokens/s, mfu_model {job['mfu_model']:.2%} (last 10 steps)."]
    if cost:
        lines += ["", f"step_cost: {cost['parameters'] / 1e6:.0f}M parameters, micro-batch {cost['batch']} x "
                      f"{cost['seq_len']}, {cost['precision']}, recompute {cost['recompute']}, peak "
                      f"{cost['peak_flops'] / 1e12:.1f} TFLOP/s ({cost['peak_source']})", "",
                  "| step | ms | tokens/s | mfu_model | mfu_total |", "| --- | --- | --- | --- | --- |"]
        for name in ("mdlm", "memdlm"):
            r = cost[name]
            lines.append(f"| {name} | {r['seconds'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {r['mfu_model']:.1%} | "
                         f"{r['mfu_total']:.1%} |")
        lines += ["", "| target | measured | goal |", "| --- | --- | --- |"]
        for name, value in results["targets"].items():
            goal = TARGETS[name]
            sign = ">=" if name.startswith("mfu") else "<="
            shown = "-" if value is None else (f"{value:.1%}" if name.startswith("mfu") else f"{value:.3f}")
            lines.append(f"| {name} | {shown} | {sign} {goal} |")
        memory = cost.get("peak_memory", {})
        if memory:
            lines += ["", f"Peak memory, micro-batch {cost.get('memory_batch')}:", "",
                      "| step | recompute | peak GiB | activations GiB | step ms |", "| --- | --- | --- | --- | --- |"]
            for key, value in memory.items():
                name, mode = key.split("/")
                lines.append(f"| {name} | {mode} | {value['peak'] / 2**30:.2f} | {value['activations'] / 2**30:.2f} | "
                             f"{value['seconds'] * 1e3:.0f} |")
    if kernels:
        lines += kernel_lines(kernels)
        skipped = kernels.get("skipped", {})
        lines += [f"- variant {name} not measured: {reason[:300]}" for name, reason in skipped.items()]
        lines += ["", "| target (issue #21) | measured | goal |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['measured']:.3f} | {t['goal']} |" for t in results["kernel_targets"]]
    if drift:
        lines += drift_lines(drift)
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
