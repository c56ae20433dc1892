"""``transformer-ln analyze hidden-states|angular|layer-removal|attention-logits|log-partition``: today's depth
analyses (``depth_stats``) on any model ``attach`` knows: a Hugging Face directory (``--hf DIR --text FILE``), a run
(``--run DIR``) or fresh models of ours (one per scheme, a random batch). Each prints its numbers as a table, writes
them to ``DIR/<name>.json`` (strict JSON: NaN as null) and draws ``DIR/<name>.png``/``.pdf`` (``depth_plots``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import UserError
from .tables import table

HELP = {"hidden-states": "variance and norm of the hidden state after each layer (growth with depth)",
        "angular": "angular distance between layer l's and layer l+n's hidden states (heatmap over n, l)",
        "layer-removal": "loss change when each layer is skipped",
        "attention-logits": "largest attention logit q.k*scale of each attention sub-layer",
        "log-partition": "log Z = logsumexp of the output logits per token (mean, spread, z-loss term)"}


def _csv_int(text: str) -> list[int]:
    import argparse

    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p, command: str) -> None:
    if command == "angular":
        p.add_argument("--gaps", type=_csv_int, help="layer gaps n, e.g. 1,2,4 (default: every n from 1 to L)")
        p.add_argument("--token", choices=("all", "last"), default="all", help="average over every real token "
                       "(default) or over each sequence's last real token (Gromov et al., Mix-LN)")


def _collect(sources: Iterable, fn: Callable, what: str | None = None) -> tuple[dict, dict, str]:
    """``({label: fn(sites, src)}, {label: src.info}, checkpoint)`` over the sources, one model at a time."""
    from .hf_cli import attached, need_loss

    results, infos, checkpoint = {}, {}, "init"
    for src in sources:
        if what is not None:
            need_loss(src, what)
        results[src.label] = fn(attached(src), src)
        infos[src.label] = {**src.info, "loss": src.loss} if what else src.info
        checkpoint = src.checkpoint
    return results, infos, checkpoint


def _rows(results: dict) -> Iterable[tuple[str, str, Any]]:
    for label, stacks in results.items():
        for stack, r in stacks.items():
            yield label, stack, r


def _write(args, name: str, record: dict, plot, results: dict, checkpoint: str) -> list[Path]:
    from .hf_cli import write_json

    return [write_json(record, args.out / f"{name}.json"), *plot(results, args.out / name, checkpoint)]


def cmd_hidden_states(args, sources) -> list[Path]:
    from .depth_plots import plot_hidden_states
    from .depth_stats import hidden_state_stats

    results, infos, checkpoint = _collect(sources, lambda sites, src: hidden_state_stats(sites, src.inputs))
    rows = [[label, stack, layer, float(v), float(n)] for label, stack, r in _rows(results)
            for layer, v, n in zip(r["layer"], r["variance"], r["norm"])]
    print(table(["model", "stack", "layer", "variance", "norm"], rows, "layer 0: the stack input (embedding "
                "output); layer l: block l's output, before the final norm; real tokens only"))
    return _write(args, "hidden_states", {"sources": infos, "results": results}, plot_hidden_states, results,
                  checkpoint)


def cmd_angular(args, sources) -> list[Path]:
    from .depth_plots import plot_angular
    from .depth_stats import angular_distances

    def fn(sites, src):
        try:
            return angular_distances(sites, src.inputs, gaps=args.gaps, token=args.token)
        except ValueError as e:
            raise UserError(f"--gaps: {e}") from None

    results, infos, checkpoint = _collect(sources, fn)
    rows = []
    for label, stack, r in _rows(results):
        for n, d in zip(r["gaps"], np.asarray(r["distance"], float)):
            best = int(np.nanargmin(d))
            rows.append([label, stack, n, f"{best}..{best + n}", float(d[best]), float(np.nanmean(d))])
    print(table(["model", "stack", "gap n", "closest h_l..h_l+n", "distance", "mean over l"], rows,
                f"angular distance arccos(cos(h_l, h_l+n))/pi ({args.token} tokens); the closest n layers change the "
                "stream least (Gromov et al.'s candidates for pruning)"))
    return _write(args, "angular_distance", {"sources": infos, "results": results}, plot_angular, results,
                  checkpoint)


def cmd_layer_removal(args, sources) -> list[Path]:
    from .depth_plots import plot_layer_removal
    from .depth_stats import layer_removal

    def fn(sites, src):
        out = layer_removal(sites, src.inputs)
        for r in out.values():
            r["layer"] = list(range(1, len(r["loss"]) + 1))
        return out

    results, infos, checkpoint = _collect(sources, fn, "layer removal")
    rows = [[label, stack, layer, float(loss), float(delta)] for label, stack, r in _rows(results)
            for layer, loss, delta in zip(r["layer"], r["loss"], r["delta"])]
    base = "; ".join(f"{label}: {next(iter(s.values()))['base_loss']:.4g}" for label, s in results.items())
    print(table(["model", "stack", "layer skipped", "loss", "change"], rows,
                f"loss of the whole model: {base} (layer l skipped: its output replaced by its input)"))
    return _write(args, "layer_removal", {"sources": infos, "results": results}, plot_layer_removal, results,
                  checkpoint)


def cmd_attention_logits(args, sources) -> list[Path]:
    from .depth_plots import plot_attention_logits
    from .depth_stats import attention_logits

    results, infos, checkpoint = _collect(sources, lambda sites, src: attention_logits(sites, src.inputs))
    rows = [[label, stack, name, kind, float(m)] for label, stack, r in _rows(results)
            for name, kind, m in zip(r["names"], r["kinds"], r["max"])]
    print(table(["model", "stack", "attention", "kind", "max logit"], rows,
                "largest q.k*scale over heads, real queries and the keys each may attend to"))
    return _write(args, "attention_logits", {"sources": infos, "results": results}, plot_attention_logits, results,
                  checkpoint)


def cmd_log_partition(args, sources) -> list[Path]:
    from .depth_plots import plot_log_partition
    from .depth_stats import log_partition

    results, infos, checkpoint = _collect(sources, lambda sites, src: log_partition(sites, src.inputs))
    keys = ("mean", "std", "min", "max", "mean_square", "n_tokens")
    print(table(["model", *keys], [[label, *(r[k] for k in keys)] for label, r in results.items()],
                "log Z = logsumexp of the output logits per real token; mean_square: the z-loss term"))
    return _write(args, "log_partition", {"sources": infos, "results": results}, plot_log_partition, results,
                  checkpoint)


COMMANDS = {"hidden-states": cmd_hidden_states, "angular": cmd_angular, "layer-removal": cmd_layer_removal,
            "attention-logits": cmd_attention_logits, "log-partition": cmd_log_partition}


def run(command: str, args, ours: Callable) -> list[Path]:
    """One analysis command on ``--hf`` (every command) or on our models (the depth commands); ``ours(args)``: the
    command line's ``models`` generator (passed in: the library never imports the command line)."""
    from .hf_cli import PAPER, sources

    if command in COMMANDS:
        return COMMANDS[command](args, sources(args, ours))
    return PAPER[command](args, next(sources(args, ours)))
