"""The resource planner's predictions for three 7-8B models on 24, 48 and 80 GB GPUs (docs/configuration.md,
"Will it fit?"). A prediction from shapes only, not a measurement: each model is a folder holding its public
config.json and a model.safetensors with the header of every tensor and no data
(`sfsd.resources.read.write_shapes_only`), planned with the schema's default settings (the checkpoint's own
dtype, 128 calibration sequences of 128 tokens, batch 8, and so on; the disk column counts the stages the
defaults run, the search column plans the search they leave off) and `--host-memory-gb` of host memory.

    python workflow/benchmarks/plan_table.py [--host-memory-gb 128] [--num-samples 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from sfsd.config import validate
from sfsd.defaults import default
from sfsd.resources.needs import Machine
from sfsd.resources.plan import plan_config
from sfsd.resources.read import write_shapes_only

_COMMON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "num_hidden_layers": 32, "num_attention_heads": 32, "tie_word_embeddings": False}
# the public config.json values that set the shapes and the dtype
MODELS = {
    "Llama-3-8B": {**_COMMON, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "torch_dtype": "bfloat16"},
    "Llama-2-7B": {**_COMMON, "intermediate_size": 11008, "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "torch_dtype": "float16"},
    "Mistral-7B": {**_COMMON, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                   "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 32000,
                   "max_position_embeddings": 32768, "torch_dtype": "bfloat16"},
}
GPUS_GB = (24, 48, 80)


def gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def rows(host_gb: float, num_samples: int) -> list[str]:
    out = ["| model | GPU | stage 1: mode | GPU GB | host GB | eigen: host GB per block | factor cache (feature): "
           "mode, host GB | gradients: mode, GPU GB | evaluation: GPUs, GPU GB | search: GPU GB | disk GB (all stages) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_config in MODELS.items():
            folder = write_shapes_only(Path(tmp) / name, model_config)
            config = {"models": {name: {"source": "local", "path": str(folder)}}, "device": "cuda",
                      "calibration": {"num_samples": num_samples}}
            validate(config)
            for gpu in GPUS_GB:
                machine = Machine(gpu * 1e9, 1, host_gb * 1e9, None)
                needs = plan_config(config, name, tmp, machine, every=True)  # the search too (off by default)
                c, e, f = needs["collect_features"], needs["eigendecompose"], needs["factor_cache:feature"]
                ev, s, g = needs["evaluate_model"], needs["search"], needs["collect_gradients"]
                disk = sum(n.disk_total for n in plan_config(config, name, tmp, machine).values())
                mark = lambda n: "" if n.fix is None else f" (does not fit: {n.fix})"  # noqa: E731
                out.append(f"| {name} | {gpu} GB | {c.mode}{mark(c)} | {gb(c.device_bytes)} | {gb(c.host_bytes)} | "
                           f"{gb(e.host_bytes)} | {f.mode.split(',')[0]}, {gb(f.host_bytes)} | "
                           f"{g.mode}, {gb(g.device_bytes)}{mark(g)} | "
                           f"{ev.gpus}, {gb(ev.device_bytes)}{mark(ev)} | {gb(s.device_bytes)}{mark(s)} | {gb(disk)} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host-memory-gb", type=float, default=128.0)
    parser.add_argument("--num-samples", type=int, default=default("calibration.num_samples"))
    args = parser.parse_args()
    print("\n".join(rows(args.host_memory_gb, args.num_samples)))


if __name__ == "__main__":
    main()
