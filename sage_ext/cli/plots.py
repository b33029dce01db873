"""The PNG charts: the demo's (tokens per target forward at each step, tokens/s against target-only) and the
benchmark's (speedup, tau, acceptance by depth, engine time breakdown). matplotlib is imported only when a
chart is drawn, with the non-interactive Agg backend.
"""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def demo_plot_data(results, policy_name: str) -> dict:
    """What the demo plot shows, per scene: tokens per target forward at every step of ``policy_name`` (tau + 1;
    target-only decoding makes 1) with the tree size, and the tokens/s of the policy and of target-only ("ar")."""
    scenes_data = []
    for scene, runs in results:
        steps = runs[policy_name]["stats"].steps
        scenes_data.append({
            "scene": scene.seed,
            "tokens_per_step": [s.tau + 1 for s in steps],
            "tree_size": [s.tree_size for s in steps],
            "tokens_per_second": {name: len(run["ids"]) / run["seconds"] for name, run in runs.items()},
            "identical_to_ar": runs[policy_name]["ids"] == runs["ar"]["ids"],
        })
    return {"policy": policy_name, "scenes": scenes_data}


def plot_demo(results, policy_name: str, path: Path) -> dict:
    """Two panels: tokens per target forward at each step (bars; target-only: 1) with the draft tree's size, and
    tokens/s per scene, the policy against target-only. Returns the plotted numbers (``demo_plot_data``)."""
    plt = pyplot()

    data = demo_plot_data(results, policy_name)
    fig, (ax_steps, ax_speed) = plt.subplots(2, 1, figsize=(10, 6.5), gridspec_kw={"height_ratios": [3, 2]})
    ax_tree = ax_steps.twinx()
    offset = 0
    for index, scene in enumerate(data["scenes"]):
        per_step = scene["tokens_per_step"]
        xs = list(range(offset, offset + len(per_step)))
        ax_steps.bar(xs, per_step, color="tab:green", width=0.85,
                     label=f"{policy_name}: tokens per target forward (tau + 1)" if index == 0 else None)
        ax_tree.plot(xs, scene["tree_size"], color="tab:gray", lw=1.0, marker=".", ms=3,
                     label="draft tree size (nodes)" if index == 0 else None)
        if index:
            ax_steps.axvline(offset - 0.5, color="k", lw=0.6, alpha=0.4)
        offset += len(per_step)
    ax_steps.axhline(1.0, color="tab:red", lw=1.2, ls="--", label="target-only: 1 token per forward")
    tallest = max((max(scene["tokens_per_step"], default=1) for scene in data["scenes"]), default=1)
    ax_steps.set_ylim(0, tallest * 1.45)  # room for the legend above the bars
    biggest = max((max(scene["tree_size"], default=1) for scene in data["scenes"]), default=1)
    ax_tree.set_ylim(0, biggest * 1.45)
    ax_steps.set_ylabel("tokens per target forward")
    ax_steps.set_xlabel("speculation step (scenes separated by vertical lines)")
    ax_tree.set_ylabel("draft tree nodes", color="tab:gray")
    lines = ax_steps.get_legend_handles_labels()
    tree_lines = ax_tree.get_legend_handles_labels()
    ax_steps.legend(lines[0] + tree_lines[0], lines[1] + tree_lines[1], loc="upper center", ncol=3, fontsize=8)

    labels = [str(scene["scene"]) for scene in data["scenes"]]
    xs = list(range(len(labels)))
    width = 0.4
    for shift, name, color in ((-width / 2, "ar", "tab:red"), (width / 2, policy_name, "tab:green")):
        values = [scene["tokens_per_second"][name] for scene in data["scenes"]]
        bars = ax_speed.bar([x + shift for x in xs], values, width=width, color=color,
                            label="target-only (ar)" if name == "ar" else policy_name)
        ax_speed.bar_label(bars, fmt="%.0f", fontsize=8)
    top = max((max(scene["tokens_per_second"].values()) for scene in data["scenes"]), default=1)
    ax_speed.set_ylim(0, top * 1.3)
    speedups = [scene["tokens_per_second"][policy_name] / scene["tokens_per_second"]["ar"] for scene in data["scenes"]]
    ax_speed.set_xticks(xs, [f"scene {label}: {speedup:.2f}x" for label, speedup in zip(labels, speedups)])
    ax_speed.set_ylabel("tokens / s")
    ax_speed.legend(loc="upper left", fontsize=8)
    same = all(scene["identical_to_ar"] for scene in data["scenes"])
    fig.suptitle(f"sage-ext demo: {policy_name} on the fixture pair ({len(results)} held-out scenes; outputs "
                 f"{'identical to' if same else 'DIFFERENT from'} target-only greedy)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return data


def plot_bench(report: dict, path: Path) -> None:
    plt = pyplot()

    summary = report["policies"]
    names = list(summary)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    bars = ax.bar(names, [summary[n]["speedup_vs_ar"] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_title("wall-clock speedup vs target-only (ar)")
    ax = axes[0, 1]
    bars = ax.bar(names, [summary[n]["mean_tau"] for n in names], color="tab:green")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_title("tau (accepted draft tokens per step)")
    ax = axes[1, 0]
    for n in names:
        rates = summary[n].get("acceptance_by_depth")
        if rates and n != "ar":
            ax.plot(range(1, len(rates) + 1), rates, marker="o", ms=3, label=n)
    ax.set_xlabel("depth d")
    ax.set_ylabel("P(accepted >= d | tree reached d)")
    ax.set_title("acceptance by depth")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    engine_names = [n for n in names if "time_breakdown_fraction" in summary[n]]
    bottom = [0.0] * len(engine_names)
    keys = list(summary[engine_names[0]]["time_breakdown_fraction"]) if engine_names else []
    for key in keys:
        values = [summary[n]["time_breakdown_fraction"][key] for n in engine_names]
        ax.bar(engine_names, values, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_title("engine time breakdown (share of generation time)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in axes.flat:
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"sage-ext bench: {report['machine']}\n{report['scenes']} scenes x {report['repeats']} repeats, "
                 f"medians; target {report['target_params'] / 1e6:.1f}M, draft {report['draft_params'] / 1e6:.2f}M params",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
