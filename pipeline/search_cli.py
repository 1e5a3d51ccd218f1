"""``dcpnas search``: one single-process DCP-NAS search, resumable, with all artifacts on disk."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError

if TYPE_CHECKING:
    from dcpnas.search import DCPNASSearch, TensorSearchData
    from pipeline.config import Config


def digits_search_data(cfg: Config) -> TensorSearchData:
    """The bundled digits as normalised float tensors, split held-out / weights / architecture."""
    import torch

    from dcpnas.search import TensorSearchData
    from pipeline.data.digits import load_digits_rgb
    from pipeline.data.splits import balanced_split

    images, labels = load_digits_rgb()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = (x - x.mean()) / x.std()
    y = torch.from_numpy(labels)
    d = cfg.data
    rest = 1 - d.held_out_fraction
    fractions = {"held_out": d.held_out_fraction, "weights": rest * d.weight_fraction, "arch": rest * d.arch_fraction}
    split = balanced_split([str(i) for i in range(len(y))], labels.tolist(), fractions, d.split_seed)
    held, w, a = (torch.tensor([int(k) for k in split.parts[p]]) for p in fractions)
    parts = (x[w], y[w]), (x[a], y[a]), (x[held], y[held])
    return TensorSearchData(*parts, d.batch_size, cfg.search.seed, cfg.search.pairing)


def run_search(cfg: Config, resume: bool = True, log: Any = print) -> dict[str, Any]:
    """Run (or resume) the configured search; returns the final metrics and artifact paths."""
    import torch

    from dcpnas.checkpoint import ResumeMismatchError, load_checkpoint, save_checkpoint
    from dcpnas.search import DCPNASSearch
    from dcpnas.visualize import save_genotype_artifacts
    from pipeline.config import save_resolved
    from pipeline.progress import Board, Ticking, phase_steps, search_position

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = cfg.run_dir()
    if cfg.data.source == "digits":
        data = digits_search_data(cfg)
    else:  # the same shard streams a Ray search reads, here for a single rank
        from pipeline.search_stage import StreamSearchData, make_split

        data = StreamSearchData.open(cfg, make_split(cfg))
    search = DCPNASSearch(cfg.search_config())
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        try:
            search.load_state_dict(load_checkpoint(ckpt))
        except ResumeMismatchError as e:
            raise UserError(f"{e}; use a new name/output_dir or --fresh") from None
        log(f"resumed from {ckpt} at epoch {search.epoch}, {search.phase} phase, step {search.step}")
    save_resolved(cfg, out)
    alphas = out / "alphas.jsonl"

    def on_epoch_end(s: DCPNASSearch, metrics: dict[str, Any]) -> None:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        with open(alphas, "a") as f:
            f.write(json.dumps({"epoch": metrics["epoch"], "alpha": s.child.alpha.detach().tolist()}) + "\n")
        save_checkpoint(s.state_dict(), ckpt)
        board.update(cfg.name, metrics | search_position(metrics["epoch"], epochs, steps, "child", steps))

    log(f"search '{cfg.name}' (space {cfg.search.space}, config {cfg.hash[:12]}) -> {out}")
    board, steps, epochs = Board(), phase_steps(data), cfg.search.epochs
    board.start(cfg.name)

    def tick(epoch: int, phase: str, step: int) -> None:
        board.update(cfg.name, search_position(epoch, epochs, steps, phase, step))

    search.run(Ticking(data, steps, tick), on_epoch_end=on_epoch_end)
    board.finish(cfg.name, "finished")
    files = save_genotype_artifacts(search.genotype(), out, search.child.alpha.detach(), space=search.space)
    final = search.history[-1] if search.history else {}
    log(f"genotype {search.genotype().hash[:12]} -> {files['genotype']}")
    return {"metrics": final, "files": files, "genotype": search.genotype()}


def _cmd_search(args: argparse.Namespace) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config, args.set)
    if args.out:
        cfg = cfg.model_copy(update={"output_dir": args.out})
    result = run_search(cfg, resume=not args.fresh)
    print(result["genotype"].describe())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from pipeline.config import add_config_arguments

    p = sub.add_parser("search", help="run one DCP-NAS search in this process (CPU or one GPU)")
    add_config_arguments(p)
    p.add_argument("--out", help="output root (default: the config's output_dir)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.set_defaults(func=_cmd_search)
