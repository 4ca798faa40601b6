"""How skewed are FFN neuron activations in the embedded SiLU model? (issue 8, item 3: hot neurons)

Research, not a benchmark of tpi: it studies the model (through transformers), not tpi's code.

PowerInfer keeps the "hot" FFN neurons (intermediate columns) on the GPU and the rest on the CPU;
that pays when a few neurons carry most activations, as in ReLU models where most outputs are
exactly zero. This runs SmolLM2-135M-Instruct (SiLU) in float32 on the CPU with transformers over a
short calibration text, captures each layer's intermediate activation a = silu(gate(x)) * up(x)
(the input of down_proj, [tokens, 1536]) and counts, per layer, how often each neuron is active:

  top-k    active = among the 10% largest |a| of its token (a fixed budget per token, so a uniform
           spread would give every neuron 10% of tokens);
  thresh   active = |a| > 10% of the largest |a| of its token.

For each definition it reports the share of all activations that the hottest 10%, 20% and 50% of a
layer's neurons cover (uniform: 10/20/50%), the Gini coefficient of the counts (0 = uniform, 1 =
one neuron), and, for contrast with ReLU, the share of |a| below 1% of the token's largest (what a
ReLU-style predictor could skip). Prints a table, writes research/out/hot_neurons.md and a PNG of
the Lorenz curves (research/out/hot_neurons.png, when matplotlib is installed). Does not know:
tpi's runtime (it needs only the embedded model's files).

    python research/hot_neurons.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a lamp, a notebook and "
    "a flask of tea. From the gallery he could see the fishing boats returning to the harbour. "
    "Photosynthesis converts light energy into chemical energy: chlorophyll absorbs red and blue light, water "
    "is split, and carbon dioxide is fixed into sugars in the Calvin cycle. "
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "The treaty was signed in 1648 in Westphalia, ending thirty years of war in central Europe. "
    "To make bread, mix flour, water, salt and yeast, knead for ten minutes, let it rise for an hour, shape "
    "the loaf and bake it at 220 degrees. Question: what is 17 times 23? Answer: 391. "
    "Les enfants jouaient dans le jardin pendant que leurs parents préparaient le dîner. "
    "In quantum mechanics the state of a system is a vector in a Hilbert space, and observables are "
    "self-adjoint operators whose eigenvalues are the possible outcomes of a measurement."
)
TOPK = 0.10
THRESH = 0.10


def activations(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's down_proj input |a| [tokens, intermediate] for one forward pass over `ids`."""
    acts: list[torch.Tensor] = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda _m, args: acts.append(args[0][0].abs()))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return acts


def gini(counts: torch.Tensor) -> float:
    """Gini coefficient of non-negative counts (0: all equal, towards 1: one holds everything)."""
    x = counts.double().sort().values
    n = x.numel()
    return float(((2 * torch.arange(1, n + 1, dtype=torch.float64) - n - 1) * x).sum() / (n * x.sum()))


def coverage(counts: torch.Tensor, shares=(0.1, 0.2, 0.5)) -> list[float]:
    """Share of all activations that the hottest `share` of neurons account for."""
    x = counts.double().sort(descending=True).values
    total = x.sum()
    return [float(x[: max(1, round(s * x.numel()))].sum() / total) for s in shares]


def layer_stats(a: torch.Tensor) -> dict:
    """a: |activation| [tokens, neurons] of one layer."""
    tokens, neurons = a.shape
    top = torch.zeros_like(a, dtype=torch.bool)
    top.scatter_(1, a.topk(max(1, round(TOPK * neurons)), dim=1).indices, True)
    peak = a.amax(dim=1, keepdim=True)
    thresh = a > THRESH * peak
    out = {"near_zero": float((a < 0.01 * peak).float().mean()), "thresh_density": float(thresh.float().mean())}
    for name, active in (("topk", top), ("thresh", thresh)):
        counts = active.sum(0)
        out[name] = {"coverage": coverage(counts), "gini": gini(counts), "counts": counts}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tpi.embedded import default_model_dir

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    stats = [layer_stats(a) for a in activations(model, ids)]
    report(stats, ids.shape[1], model.config.hidden_act)


def report(stats: list[dict], tokens: int, act: str) -> None:
    neurons = stats[0]["topk"]["counts"].numel()
    lines = [f"# Hot neurons: SmolLM2-135M-Instruct ({act}), {len(stats)} layers x {neurons} FFN neurons, "
             f"{tokens} calibration tokens", "",
             f"top-k: active = among the {TOPK:.0%} largest |a| of its token; thresh: |a| > {THRESH:.0%} of the "
             "token's largest. Coverage: share of all activations on the hottest 10/20/50% of a layer's neurons "
             "(uniform: 10/20/50%). near-zero: share of |a| < 1% of the token's largest (ReLU models: most).", "",
             "| layer | top-k cover 10/20/50% | top-k Gini | thresh cover 10/20/50% | thresh Gini | thresh density "
             "| near-zero |", "|---|---|---|---|---|---|---|"]

    def row(name: str, s: dict) -> str:
        cov = lambda c: "/".join(f"{100 * v:.0f}" for v in c)  # noqa: E731
        return (f"| {name} | {cov(s['topk']['coverage'])} | {s['topk']['gini']:.2f} | {cov(s['thresh']['coverage'])} "
                f"| {s['thresh']['gini']:.2f} | {100 * s['thresh_density']:.1f}% | {100 * s['near_zero']:.1f}% |")

    for i, s in enumerate(stats):
        lines.append(row(str(i), s))
    mean = {"near_zero": statistics.mean(s["near_zero"] for s in stats),
            "thresh_density": statistics.mean(s["thresh_density"] for s in stats)}
    for name in ("topk", "thresh"):
        mean[name] = {"coverage": [statistics.mean(s[name]["coverage"][j] for s in stats) for j in range(3)],
                      "gini": statistics.mean(s[name]["gini"] for s in stats)}
    lines.append(row("**mean**", mean))
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "hot_neurons.md").write_text(text)
    plot(stats)


def plot(stats: list[dict]) -> None:
    """Lorenz curves of top-k activation counts: share of activations against share of neurons."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no hot_neurons.png (pip install matplotlib)")
        return

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i in sorted({0, len(stats) // 4, len(stats) // 2, 3 * len(stats) // 4, len(stats) - 1}):
        x = stats[i]["topk"]["counts"].double().sort(descending=True).values
        ax.plot(torch.linspace(0, 1, x.numel() + 1), torch.cat([torch.zeros(1), x.cumsum(0) / x.sum()]),
                label=f"layer {i}")
    ax.plot([0, 1], [0, 1], "k--", label="uniform")
    ax.set(xlabel="share of neurons (hottest first)", ylabel="share of top-k activations",
           title="SmolLM2-135M FFN neurons: how concentrated")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "hot_neurons.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
