"""MDLM against MemDLM from the same seed on the same data: the paper's claims measured on our runs.

Stages (each leaves its result in the output folder and is skipped when rerun, so the experiment resumes;
the training runs resume from their checkpoints):

1. data: the bundled corpus is prepared (its BPE tokenizer), a needle-in-a-haystack training mixture is
   generated with that tokenizer (``pretrain.eval.niah``, seed 0) and both are prepared together, 5% of the
   documents held out;
2. train: ``memdlm-pretrain`` twice, memory off (MDLM) and on (MemDLM), the same seed, model, data order
   and masks, the held-out loss of the base model every ``--eval-every`` steps (``eval_loss``), and with
   inference-time adaptation (``eval_adapted_loss``);
3. niah: exact-match accuracy on an unseen suite (seed 1000) by kind and context length, for both models,
   with and without inference-time adaptation;
4. exposure: the train-inference mismatch on held-out samples: the loss on the states reached by the
   model's own progressive denoising (greedy, most confident first) against the loss on static random
   masks at the same mask ratios, step by step along the trajectory;
5. report: PNG plots and a markdown table (``report.md``) in the output folder.

Nothing is tuned to the result: one seed, fixed in advance. Outer training losses are reported but are not
evidence on their own: MemDLM's is computed with fast weights adapted to the same sample.

Usage: python benchmarks/memory_vs_mdlm.py [--out benchmarks/memory_vs_mdlm] [--steps 400] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RUNS = {"mdlm": "false", "memdlm": "true"}
NIAH_LENGTHS = (96, 192)  # context tokens; the answer is generated after them within seq_len 256


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _done(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


# -- 1. data ------------------------------------------------------------------------------------------
def prepare_data(out: Path, args) -> Path:
    from data_pipeline.corpus import BUNDLED_CORPUS
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.eval.niah import make_suite, write_jsonl

    dataset = out / "data" / "mixture"
    if (dataset / "manifest.json").is_file():
        return dataset
    base = out / "data" / "corpus"
    python = [sys.executable, "-m", "launch.prepare_cli", "--seq-len", str(args.seq_len), "--no-progress",
              "--overwrite"]
    if not (base / "manifest.json").is_file():
        subprocess.run([*python, "--input", str(BUNDLED_CORPUS), "--output", str(base)], check=True)
    tokenizer = load_tokenizer(str(base / "tokenizer.json")).tokenizer
    mixture = out / "data" / "mixture_input"
    mixture.mkdir(parents=True, exist_ok=True)
    (mixture / "corpus.txt").write_text(Path(BUNDLED_CORPUS).read_text())
    suite = make_suite(lambda text: tokenizer.encode(text, add_special_tokens=False).ids, lengths=NIAH_LENGTHS,
                       per_cell=args.niah_train_per_cell, seed=0)
    write_jsonl(suite, mixture / "niah.jsonl")
    _log(f"NIAH training mixture: {len(suite)} examples")
    subprocess.run([*python, "--input", str(mixture), "--output", str(dataset), "--tokenizer",
                    str(base / "tokenizer.json"), "--val-fraction", "0.05"], check=True)
    return dataset


# -- 2. training ----------------------------------------------------------------------------------------
def train(out: Path, dataset: Path, args) -> dict[str, Path]:
    folders = {}
    for name, memory in RUNS.items():
        folder = out / "runs" / name
        folders[name] = folder
        final = folder / "checkpoints" / f"step_{args.steps:06d}"
        if final.is_dir():
            continue
        _log(f"training {name} for {args.steps} steps (resumes if interrupted)")
        command = [sys.executable, "-m", "launch.pretrain_cli", "--data.path", str(dataset), "--model.seq_len",
                   str(args.seq_len), "--memory.enabled", memory, "--train.steps", str(args.steps),
                   "--train.out_dir", str(folder), "--eval.every", str(args.eval_every), "--eval.num_samples",
                   str(args.eval_samples), "--checkpoint.every", "50", "--checkpoint.keep", "1",
                   "--logging.wandb", "false", "--logging.progress_bar", "false", "--train.num_threads",
                   str(args.threads)]
        if memory == "true":  # the paper's recipe, which this benchmark measures (no longer the default)
            command += ["--memory.masking_strategy", "pmc", "--memory.num_inner_steps", "2"]
        subprocess.run(command, check=True)
    return folders


def read_metrics(folder: Path) -> list[dict]:
    records = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = {**records.get(record["step"], {}), **record}  # a resumed run rewrites steps
    return [records[step] for step in sorted(records)]


# -- 3. needle in a haystack ----------------------------------------------------------------------------
def niah(out: Path, folders: dict[str, Path], args) -> dict:
    path = out / "niah.json"
    if (done := _done(path)) is not None:
        return done
    from pretrain.eval.inference import load_for_inference
    from pretrain.eval.niah import evaluate_suite, make_suite
    from pretrain.eval.sampling import GenerationConfig

    results = {}
    generation = GenerationConfig(length=8, steps=8)
    for name, folder in folders.items():
        model = load_for_inference(folder, "cpu")
        suite = make_suite(model.encode, lengths=NIAH_LENGTHS, per_cell=args.niah_eval_per_cell, seed=1000)
        for adapt in (False, True):
            key = f"{name}{' + adaptation' if adapt else ''}"
            results[key] = evaluate_suite(model, suite, generation, adapt, batch_size=8)
            _log(f"NIAH {key}: {results[key]['all']:.3f}")
    path.write_text(json.dumps(results, indent=2))
    return results


# -- 4. exposure bias -------------------------------------------------------------------------------------
@torch.no_grad()
def _trajectory_losses(model, ids: torch.Tensor, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per denoising step: mean CE of the true tokens on the still-masked positions of (a) the state the
    model reached by its own greedy, most-confident-first unmasking, (b) a random mask at the same ratio
    over the clean sequence."""
    im = model
    b, length = ids.shape
    per_step = length // steps
    state = torch.full_like(ids, im.mask_id)
    generator = torch.Generator().manual_seed(seed)
    progressive, static = [], []
    for step in range(steps):
        masked = state == im.mask_id
        logits = im.model(state).float()
        logits[..., im.mask_id] = float("-inf")
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        progressive.append(float((ce * masked).sum() / masked.sum()))
        # the same number of masked positions, chosen at random over the clean sequence
        count = int(masked[0].sum())
        order = torch.rand(b, length, generator=generator).argsort(dim=1)
        random_mask = torch.zeros_like(masked).scatter(1, order[:, :count], True)
        noisy = torch.where(random_mask, im.mask_id, ids)
        static_logits = im.model(noisy).float()
        static_ce = torch.nn.functional.cross_entropy(static_logits.transpose(1, 2), ids, reduction="none")
        static.append(float((static_ce * random_mask).sum() / random_mask.sum()))
        # unmask the most confident per_step positions with the model's own (greedy) tokens
        probabilities, tokens = logits.softmax(-1).max(-1)
        confidence = torch.where(masked, probabilities, -1.0)
        keep = confidence.topk(per_step, dim=1).indices
        state.scatter_(1, keep, tokens.gather(1, keep))
    return np.array(progressive), np.array(static)


def exposure(out: Path, folders: dict[str, Path], dataset: Path, args) -> dict:
    path = out / "exposure.json"
    if (done := _done(path)) is not None:
        return done
    from data_pipeline.shards import read_manifest
    from data_pipeline.validation import read_validation
    from pretrain.eval.inference import load_for_inference

    tokens, _ = read_validation(dataset, read_manifest(dataset))
    ids = torch.from_numpy(tokens[:args.exposure_samples].astype(np.int64))
    results = {}
    for name, folder in folders.items():
        model = load_for_inference(folder, "cpu")
        progressive, static = _trajectory_losses(model, ids, args.exposure_steps, seed=7)
        ratios = [1 - step / args.exposure_steps for step in range(args.exposure_steps)]
        results[name] = {"mask_ratio": ratios, "progressive": progressive.tolist(), "static": static.tolist()}
        _log(f"exposure {name}: mean gap {float((progressive - static).mean()):.3f} nats")
    path.write_text(json.dumps(results, indent=2))
    return results


# -- 5. report ---------------------------------------------------------------------------------------------
def report(out: Path, folders: dict[str, Path], niah_results: dict, exposure_results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {name: read_metrics(folder) for name, folder in folders.items()}
    evals = {name: [r for r in records if "eval_loss" in r] for name, records in metrics.items()}
    flops = {name: np.cumsum([r["flops"] for r in records]) for name, records in metrics.items()}
    seconds = {name: np.cumsum([r["step_seconds"] for r in records]) for name, records in metrics.items()}

    def at(name, series, step):
        return series[name][step - 1]

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in folders:
        steps = [r["step"] for r in evals[name]]
        axes[0].plot(steps, [r["eval_loss"] for r in evals[name]], marker="o", label=f"{name} (base)")
        axes[0].plot(steps, [r["eval_adapted_loss"] for r in evals[name]], ls="--",
                     label=f"{name} + inference adaptation")
        axes[1].plot([at(name, flops, s) / 1e12 for s in steps], [r["eval_loss"] for r in evals[name]], marker="o",
                     label=f"{name} (base)")
        if name == "memdlm":
            axes[1].plot([at(name, flops, s) / 1e12 for s in steps], [r["eval_adapted_loss"] for r in evals[name]],
                         ls="--", label=f"{name} + inference adaptation")
        train_steps = [r["step"] for r in metrics[name]]
        losses = np.array([r["loss"] for r in metrics[name]])
        smooth = np.convolve(losses, np.ones(10) / 10, mode="valid")
        axes[2].plot(train_steps[9:], smooth, label=f"{name} (outer loss, 10-step mean)")
    axes[0].set(xlabel="step", ylabel="held-out MDLM loss (nats/token)", title="held-out loss vs steps")
    axes[1].set(xlabel="executed training TFLOPs", ylabel="held-out MDLM loss (nats/token)",
                title="held-out loss vs training compute")
    axes[2].set(xlabel="step", ylabel="outer training loss", title="outer training loss (not evidence alone)")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "heldout_loss.png", dpi=110)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    cells = [key for key in next(iter(niah_results.values())) if key != "all"]
    width = 0.8 / len(niah_results)
    for i, (variant, values) in enumerate(niah_results.items()):
        axes[0].bar(np.arange(len(cells)) + i * width, [values[c] for c in cells], width, label=variant)
    axes[0].set_xticks(np.arange(len(cells)) + 0.4 - width / 2, cells, rotation=30, fontsize=8)
    axes[0].set(ylabel="exact match", title="needle in a haystack (unseen suite)")
    axes[0].legend(fontsize=8)
    for name, values in exposure_results.items():
        axes[1].plot(values["mask_ratio"], values["progressive"], marker="o", label=f"{name}: own denoising")
        axes[1].plot(values["mask_ratio"], values["static"], ls="--", label=f"{name}: static mask")
    axes[1].set(xlabel="mask ratio (trajectory runs right to left)", ylabel="CE on masked tokens (nats)",
                title="train-inference mismatch")
    axes[1].invert_xaxis()
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "niah_exposure.png", dpi=110)

    steps = [r["step"] for r in evals["mdlm"]]
    lines = ["| step | MDLM held-out | MemDLM held-out | MemDLM + adaptation | MDLM + adaptation | MDLM TFLOPs "
             "| MemDLM TFLOPs | MDLM s | MemDLM s |", "|" + " --- |" * 9]
    for step, a, b in zip(steps, evals["mdlm"], evals["memdlm"]):
        lines.append(f"| {step} | {a['eval_loss']:.4f} | {b['eval_loss']:.4f} | {b['eval_adapted_loss']:.4f} | "
                     f"{a['eval_adapted_loss']:.4f} | {at('mdlm', flops, step) / 1e12:.1f} | "
                     f"{at('memdlm', flops, step) / 1e12:.1f} | {at('mdlm', seconds, step):.0f} | "
                     f"{at('memdlm', seconds, step):.0f} |")
    # equal compute: MDLM's held-out loss interpolated at MemDLM's final FLOPs
    mdlm_flops = [at("mdlm", flops, s) for s in steps]
    final = evals["memdlm"][-1]
    target = at("memdlm", flops, final["step"])
    equal = np.interp(target, mdlm_flops, [r["eval_loss"] for r in evals["mdlm"]]) if target <= mdlm_flops[-1] \
        else None
    lines.append("")
    lines.append(f"Compute ratio (MemDLM / MDLM executed FLOPs over the run): "
                 f"{flops['memdlm'][-1] / flops['mdlm'][-1]:.3f}; wall-clock ratio "
                 f"{seconds['memdlm'][-1] / seconds['mdlm'][-1]:.3f}.")
    if equal is None:
        lines.append(f"MDLM never reached MemDLM's final compute ({target / 1e12:.1f} TFLOPs); at equal steps "
                     f"MemDLM {final['eval_loss']:.4f} vs MDLM {evals['mdlm'][-1]['eval_loss']:.4f}.")
    lines.append("")
    lines.append("| NIAH exact match | " + " | ".join(cells) + " | all |")
    lines.append("|" + " --- |" * (len(cells) + 2))
    for variant, values in niah_results.items():
        lines.append(f"| {variant} | " + " | ".join(f"{values[c]:.3f}" for c in cells) + f" | {values['all']:.3f} |")
    lines.append("")
    lines.append("| mask ratio | " + " | ".join(f"{r:.2f}" for r in exposure_results['mdlm']['mask_ratio']) + " |")
    lines.append("|" + " --- |" * (len(exposure_results['mdlm']['mask_ratio']) + 1))
    for name, values in exposure_results.items():
        gap = np.array(values["progressive"]) - np.array(values["static"])
        lines.append(f"| {name}: own - static (nats) | " + " | ".join(f"{g:+.3f}" for g in gap) + " |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/memory_vs_mdlm", help="output folder (resumes from it)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--niah-train-per-cell", type=int, default=64)
    parser.add_argument("--niah-eval-per-cell", type=int, default=16)
    parser.add_argument("--exposure-samples", type=int, default=32)
    parser.add_argument("--exposure-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a 20-step smoke run of every stage")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.eval_samples = 20, 10, 16
        args.niah_train_per_cell, args.niah_eval_per_cell, args.exposure_samples = 8, 2, 4
    os.environ.setdefault("WANDB_MODE", "offline")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    dataset = prepare_data(out, args)
    folders = train(out, dataset, args)
    niah_results = niah(out, folders, args)
    exposure_results = exposure(out, folders, dataset, args)
    print(report(out, folders, niah_results, exposure_results))
    _log(f"done in {(time.time() - started) / 60:.1f} min; plots and report.md in {out}")


if __name__ == "__main__":
    main()
