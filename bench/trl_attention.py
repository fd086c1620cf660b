"""Run a shared TRL peer script with another attention implementation, through TRL's own config field.

TRL loads the model from a path with `args.model_init_kwargs`; this sets `attn_implementation` there for the
trainer configs the peer scripts use, then runs the peer script unchanged. The peer's JSON line reports the
implementation the trained model really ran (`attn_impl`), so a setting that did not take shows.

    python bench/trl_attention.py eager ../shared/bench-peers/trl_reward.py --model DIR [peer args...]
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    implementation, script, *rest = argv
    import trl

    for config_class in (trl.RewardConfig, trl.SFTConfig, trl.DPOConfig):
        original = config_class.__post_init__

        def post_init(self, original=original):
            self.model_init_kwargs = {**(self.model_init_kwargs or {}), "attn_implementation": implementation}
            original(self)

        config_class.__post_init__ = post_init
    sys.argv = [script, *rest]
    sys.path.insert(0, str(Path(script).resolve().parent))  # the peer scripts import peer_common beside them
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
