"""`promptmux bench` plots (matplotlib, PNG): requests/s per task, latency CDFs, task-count scaling."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only); ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(tp: dict, path: Path, title: str) -> None:
    """Requests/s per task, one panel per (B, S): bars per system (single-task runs; else the first mix)."""
    plt = pyplot()
    configs = sorted({(r["batch_size"], r["seq_len"]) for r in tp["rows"]})
    systems = list(dict.fromkeys(r["backend"] for r in tp["rows"]))
    has_single = any(r["mix"] == "single" for r in tp["rows"])
    first_mix = tp["rows"][0]["mix"]
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs) + 1, 3.8), squeeze=False)
    for ax, (b, sq) in zip(axes[0], configs):
        values: dict[str, dict[str, float]] = {sy: {} for sy in systems}
        for r in tp["rows"]:
            if (r["batch_size"], r["seq_len"]) != (b, sq):
                continue
            if has_single and r["mix"] == "single":
                values[r["backend"]][r["task"]] = r["requests_per_s"]
            elif not has_single and r["mix"] == first_mix:
                for t, pt in r["per_task"].items():
                    values[r["backend"]][t] = pt["requests_per_s"]
        tasks = list(dict.fromkeys(t for sy in systems for t in values[sy]))
        width = 0.8 / max(1, len(systems))
        for j, sy in enumerate(systems):
            xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(tasks))]
            bars = ax.bar(xs, [values[sy].get(t, 0) for t in tasks], width, label=sy)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30 if len(tasks) > 3 else 0, fontsize=8)
        ax.set_title(f"B={b}, S={sq}", fontsize=10)
        ax.set_ylabel("requests/s")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title + (" — each task alone" if has_single else f" — {first_mix} mix"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(tp: dict, path: Path, title: str) -> None:
    """Latency CDF per (B, S) for every system, on the mixed traffic if measured (else the first run)."""
    plt = pyplot()
    from matplotlib import ticker

    configs = sorted({(r["batch_size"], r["seq_len"]) for r in tp["rows"]})
    mixes = [r["mix"] for r in tp["rows"] if r["mix"] != "single"]
    mix = mixes[0] if mixes else "single"
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs) + 1, 3.6), squeeze=False)
    for ax, (b, sq) in zip(axes[0], configs):
        for r in tp["rows"]:
            if (r["batch_size"], r["seq_len"]) != (b, sq) or r["mix"] != mix:
                continue
            label = r["backend"] + (f" ({r['task']})" if r["task"] else "")
            ax.plot(r["latency_quantiles_ms"], [q / 100 for q in range(101)], label=label)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("latency ms (log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"B={b}, S={sq}, {mix}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(sc: dict, path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    kinds = list(dict.fromkeys(r["kind"] for r in sc["rows"]))
    for kind in kinds:
        rows = sorted((r for r in sc["rows"] if r["kind"] == kind), key=lambda r: r["tasks"])
        x = [r["tasks"] for r in rows]
        axes[0].plot(x, [r["requests_per_s"] for r in rows], marker="o", label=kind)
        axes[1].plot(x, [r["bank_tensor_bytes"] / 2**20 for r in rows], marker="o", label=kind)
        axes[2].plot(x, [r["runtime_load_s"] for r in rows], marker="o", label=kind)
    counts = sorted({r["tasks"] for r in sc["rows"]})
    for ax, ylabel in zip(axes, ("requests/s (uniform over all tasks)", "bank MB", "Runtime load s")):
        ax.set_xscale("log")
        ax.set_xticks(counts, [f"{c:,}" for c in counts])
        ax.minorticks_off()
        ax.set_xlabel("tasks on one engine")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[1].set_yscale("log")
    axes[2].set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} — B={sc['batch_size']}, S={sc['seq_len']}, {sc['backend']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
