"""One search in this process (``dcpnas search``), without Ray: resumable, with all artifacts on disk. It
reads what a Ray search rank reads (the same shard streams), or the demo's digits from memory."""

from __future__ import annotations

import json
from typing import Any

import torch

from dcpnas.checkpoint import ResumeMismatchError, load_checkpoint, save_checkpoint
from dcpnas.search import DCPNASSearch
from dcpnas.visualize import save_genotype_artifacts
from pipeline.config import Config, save_resolved
from pipeline.data.search_data import StreamSearchData, digits_search_data, make_split
from pipeline.errors import UserError
from pipeline.progress.board import Board, Log, Ticking, phase_steps, search_position


def run_search(cfg: Config, resume: bool = True, log: Log = print) -> dict[str, Any]:
    """Run (or resume) the configured search; returns the final metrics and artifact paths."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = cfg.run_dir()
    # the demo's digits from memory, else the same shard streams a Ray search reads, here for a single rank
    data = digits_search_data(cfg) if cfg.data.source == "digits" else StreamSearchData.open(cfg, make_split(cfg))
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
