"""``fedslm-agent generate``: the device's own personal model, offline, from its state dir.

    fedslm-agent generate --state-dir /var/lib/fedslm --prompt "..." [--temperature 0.8 --top-p 0.9]

Nothing is contacted: the base model is read from where the ClientApp resolved it (the
path stored with the personal adapter), ``split``/``dual`` use the global adapter the
device last received (``last_global/``). A classification model prints the predicted
label and its probability.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedslm.generate_cli import Loaded, add_sampling_args, quiet, run_generate

    quiet()
    parser = argparse.ArgumentParser(prog="fedslm-agent generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", required=True, help="the agent's --state-dir")
    add_sampling_args(parser)
    args = parser.parse_args(argv)

    def build():
        from fedslm.client.local_model import personal_parts
        from fedslm.inference import assemble_model

        parts = personal_parts(args.state_dir)
        model, tokenizer = assemble_model(parts.base_path, parts.peft_cfg, method=parts.method,
                                          shared=parts.shared, personal=parts.personal,
                                          task=parts.task, num_labels=len(parts.labels),
                                          device=args.device)
        return Loaded(model, tokenizer, f"personal model ({parts.method}, round {parts.round})",
                      task=parts.task, labels=parts.labels)

    return run_generate(args, build)


if __name__ == "__main__":
    sys.exit(main())
