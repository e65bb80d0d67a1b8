"""The README's planning figure: inference-aware optimal N and D_train against lifetime inference
demand, at the loss TinyLlama-1.1B on 3T tokens reaches under the Chinchilla fit.

    python examples/plot_plan.py --out docs/plan_tinyllama.png     (needs matplotlib)
"""

import argparse

import numpy as np

from tinyrecipe.planning.scaling import CHINCHILLA, implied_inference_tokens, inference_optimal

TINYLLAMA_N, TINYLLAMA_D = 1_100_048_384, 3e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/plan_tinyllama.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = CHINCHILLA.loss(TINYLLAMA_N, TINYLLAMA_D)
    demand = implied_inference_tokens(TINYLLAMA_N, TINYLLAMA_D)
    d_inf = np.logspace(9, 15, 61)
    plans = [inference_optimal(loss, d) for d in d_inf]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.loglog(d_inf, [p.n_params for p in plans], label="optimal parameters N*")
    ax.loglog(d_inf, [p.train_tokens for p in plans], label="optimal training tokens D*")
    ax.axvline(demand, color="grey", ls="--", lw=1)
    ax.scatter([demand, demand], [TINYLLAMA_N, TINYLLAMA_D], color="black", zorder=3)
    ax.annotate(
        f"TinyLlama 1.1B / 3T\noptimal at {demand:.2g} inference tokens",
        (demand, TINYLLAMA_N),
        textcoords="offset points",
        xytext=(-150, 25),
        fontsize=8,
    )
    ax.set_xlabel("lifetime inference tokens")
    ax.set_title(
        f"Reaching loss {loss:.3f} (Chinchilla fit) for the fewest lifetime FLOPs", fontsize=10
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: loss {loss:.4f}, TinyLlama optimal at {demand:.3g} inference tokens")


if __name__ == "__main__":
    main()
