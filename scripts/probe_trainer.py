"""Does the trainer teach *when* to backtrack? Trains the `make train` configuration (the train:
section of configs/default.yaml) on the learning test's synthetic corpus, with and without
decision-point weighting, and prints tokens, seconds and the held-apart probe figures
(tests/probes/backtrack.yaml) for each, and for the untrained model.

    python scripts/probe_trainer.py                       # decision_weight 4 and 1
    python scripts/probe_trainer.py --weights 1 2 4 --steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).parents[1] / "tests")]

import torch  # noqa: E402
from test_trainer_learning import SEED, SIZES, make_train_config  # noqa: E402
from trainer_fixtures import corpus  # noqa: E402
from trainer_probes import measure, passes  # noqa: E402

from trainer import tokens  # noqa: E402
from trainer.data import corpus_text, open_folder  # noqa: E402
from trainer.encode import Encoder  # noqa: E402
from trainer.train import train  # noqa: E402


def show(label: str, m: dict[str, float], extra: str = "") -> None:
    figures = " | ".join(f"{k} {v:.4f}" for k, v in m.items())
    print(f"{label:>22}: {extra}{figures} | passes: {passes(m)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights", type=float, nargs="+", default=[4.0, 1.0])
    ap.add_argument("--steps", type=int, help="override train.steps")
    ap.add_argument("--seed", type=int, default=SEED, help="run seed (the learning test's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp("probe"))
    folder = corpus(root / "data", SIZES, validation=0)
    changes = {"steps": args.steps} if args.steps else {}
    cfg = make_train_config(seed=args.seed, **changes)
    sources = open_folder(folder, cfg.configs)
    twin, tok = tokens.load_for_training(
        cfg.model, cfg.tokenizer, args.seed, corpus_text=lambda: corpus_text(sources)
    )
    show("untrained", measure(twin, Encoder(tok, 512, tokens.control_tokens())))
    for weight in args.weights:
        out = root / f"w{weight:g}"
        t0 = time.perf_counter()
        final = train(cfg.model_copy(update={"decision_weight": weight}), folder, out, log=str)
        seconds = time.perf_counter() - t0
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        n = sum(r.get("tokens", 0) for r in log)
        model, tok = tokens.load_checkpoint(final)
        m = measure(model, Encoder(tok, 512, tokens.control_tokens()))
        show(f"decision_weight {weight:g}", m, f"{n:,} tokens in {seconds:.0f} s | ")


if __name__ == "__main__":
    main()
