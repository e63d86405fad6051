"""How exact the CT/GAN aligners are in bf16 on the inputs of a real training step (issue 19).

    TRITON_INTERPRET=1 python benchmarks/aligner_precision.py             # CPU: Triton's interpreter
    python benchmarks/aligner_precision.py --out-json $OUT/precision.json # CUDA: the compiled kernels

1. One training step of the preset (`vqa-align train`, 64 questions, one batch) records what each
   HeadAligner received first: q, k, the masks and the helper weights. Trained heads are what
   matters; at a first step the question self-attention's keys and queries are already nearly
   aligned, which is the hard case for bf16 (CT's cost 1 - g(q)·g(k) near 0).
2. Per aligner, the exact distance (the plain modules in fp64) against the fused PyTorch path and
   the Triton kernels, each with helper_precision fp32 and bf16: the relative error of the distance
   summed over (sample, head), and the largest error of one (sample, head) relative to the largest
   exact one. In the interpreter the Triton kernels run twice in bf16: with the interpreter's own
   fp32 -> bf16 cast, which truncates, and with the GPU's rounding to nearest even
   (tests/triton_interpreter.py). Slow there (a few seconds per aligner); no timing.
3. --train-steps N (interpreter only, ~3 min per step on 2 cores): N training steps of the preset
   with the fused path and with the Triton kernels (rounding like the GPU), their losses side by
   side. The model dispatches only CUDA tensors to Triton; here it is told to send CPU ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402 - puts the repository on sys.path
import torch  # noqa: E402
from tests.triton_interpreter import gpu_rounding_in_interpreter  # noqa: E402 - test-only; the repository is on sys.path

from vqa_align import cli  # noqa: E402
from vqa_align.align import distances  # noqa: E402
from vqa_align.align.aligner import HeadAligner  # noqa: E402
from vqa_align.config import load_config  # noqa: E402

STEP_QUESTIONS = 64  # one batch of the preset


def train(config_path: str, method: str, device: str, steps: int, kernels: str = "fused") -> list[dict]:
    """``steps`` training steps of the preset on STEP_QUESTIONS questions each -> metrics.jsonl's train rows."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"model.alignment.method={method}", f"model.alignment.kernels={kernels}", f"train.device={device}",
            f"data.subset={steps * STEP_QUESTIONS}", f"data.eval_subset={STEP_QUESTIONS}", "train.epochs=1",
            "train.log_every_steps=1",
        ]  # fmt: skip
        argv = ["train", "--config", config_path, "--out", str(Path(tmp) / "run")]
        code = cli.main(argv + [arg for override in overrides for arg in ("--set", override)])
        if code:
            raise SystemExit(f"vqa-align train exited with {code}")
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row.get("kind") == "train"]


def train_in_interpreter(config_path: str, method: str, steps: int) -> list[dict]:
    """:func:`train` with model.alignment.kernels=triton run by the interpreter on the CPU."""
    cuda_only = distances._triton_runs

    def any_device(kernels, queries, triton_module):
        return kernels == "triton" or cuda_only(kernels, queries, triton_module)

    distances._triton_runs = any_device
    try:
        with gpu_rounding_in_interpreter():
            return train(config_path, method, "cpu", steps, kernels="triton")
    finally:
        distances._triton_runs = cuda_only


def record_first_inputs(config_path: str, method: str, device: str) -> list[dict]:
    """One training step of the preset; each HeadAligner's first inputs and weights (CPU copies)."""
    recorded: dict[int, dict] = {}
    forward = HeadAligner.forward

    def recording_forward(self, queries, keys, q_valid, k_valid):
        if id(self) not in recorded:
            recorded[id(self)] = {
                "state": {name: t.detach().cpu().clone() for name, t in self.state_dict().items()},
                "q": queries.detach().float().cpu(), "k": keys.detach().float().cpu(),
                "q_valid": q_valid.cpu(), "k_valid": k_valid.cpu(),
            }  # fmt: skip
        return forward(self, queries, keys, q_valid, k_valid)

    HeadAligner.forward = recording_forward
    try:
        train(config_path, method, device, steps=1)
    finally:
        HeadAligner.forward = forward
    return list(recorded.values())


def aligner_for(record: dict, config_path: str, method: str, precision: str, device, dtype) -> HeadAligner:
    config = load_config(config_path).model.alignment
    config.method, config.helper_precision = method, precision
    aligner = HeadAligner(record["q"].shape[-1], config)
    aligner.load_state_dict(record["state"])
    return aligner.to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/easy_vqa.yaml")
    parser.add_argument("--method", choices=["ct", "gan"], default="ct")
    parser.add_argument("--train-steps", type=int, default=0, help="also train this many steps, fused vs Triton")
    parser.add_argument("--out-json", type=Path)
    args = parser.parse_args()

    from triton_check import fused_call, triton_call  # after torch; TRITON_INTERPRET decides how kernels run

    from vqa_align.align.kernels import triton_common

    interpreted = triton_common.INTERPRETED
    device = torch.device("cpu" if interpreted or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not interpreted:
        raise SystemExit("no CUDA device: run with TRITON_INTERPRET=1 to run the Triton kernels in the interpreter")
    if args.train_steps and not interpreted:
        raise SystemExit("--train-steps compares the interpreted kernels: run with TRITON_INTERPRET=1")
    variants = [("fused", "fp32", fused_call, nullcontext), ("fused", "bf16", fused_call, nullcontext),
                ("triton", "fp32", triton_call, nullcontext)]  # fmt: skip
    if interpreted:
        variants += [("triton truncating", "bf16", triton_call, nullcontext),
                     ("triton", "bf16", triton_call, gpu_rounding_in_interpreter)]  # fmt: skip
    else:
        variants += [("triton", "bf16", triton_call, nullcontext)]

    records = record_first_inputs(args.config, args.method, device.type)
    rows = []
    for index, record in enumerate(records):
        q, k, qv, kv = record["q"], record["k"], record["q_valid"], record["k_valid"]
        exact_aligner = aligner_for(record, args.config, args.method, "fp32", "cpu", torch.float64)
        exact_aligner.kernels = "reference"  # the plain modules
        exact = exact_aligner(q.double(), k.double(), qv, kv)  # (B, H)
        row = {"aligner": index, "q": list(q.shape), "k": list(k.shape), "exact_sum": exact.sum().item(), "errors": {}}
        for name, precision, fn, context in variants:
            aligner = aligner_for(record, args.config, args.method, precision, device, torch.float32)
            with torch.no_grad(), context():
                got = fn(aligner, q.to(device), k.to(device), qv.to(device), kv.to(device), precision)
            got = got.double().cpu()
            row["errors"][f"{name} {precision}"] = {
                "sum": (got.sum().item() - row["exact_sum"]) / row["exact_sum"],
                "worst_entry": ((got - exact).abs().max() / exact.abs().max()).item(),
            }
        rows.append(row)
        cells = "  ".join(f"{key} {e['sum']:+.1e}" for key, e in row["errors"].items())
        print(f"aligner {index} q{tuple(q.shape)} k{tuple(k.shape)} exact {row['exact_sum']:.4f} | {cells}", flush=True)
    result = {"machine": common.machine_info(), "device": str(device), "interpreted": interpreted,
              "config": args.config, "method": args.method, "aligners": rows, "training": None}  # fmt: skip
    if args.train_steps:
        fused = train(args.config, args.method, "cpu", args.train_steps)
        triton = train_in_interpreter(args.config, args.method, args.train_steps)
        result["training"] = [
            {"step": a["step"], "loss": {"fused": a["loss"], "triton": b["loss"]},
             "alignment_loss": {"fused": a["alignment_loss"], "triton": b["alignment_loss"]}}
            for a, b in zip(fused, triton, strict=True)
        ]  # fmt: skip
        for row in result["training"]:
            print(f"step {row['step']}: loss fused {row['loss']['fused']:.7f} triton {row['loss']['triton']:.7f}; "
                  f"alignment fused {row['alignment_loss']['fused']:.7f} triton {row['alignment_loss']['triton']:.7f}")
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
