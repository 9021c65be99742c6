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


def main() -> None:
    folder = Path(sys.argv[1])
    results = {"environment": read_json(folder / "environment.json"), "tests": tests(folder / "gpu_tests.xml")}
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
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
