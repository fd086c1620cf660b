"""`python -m rlhf_pipeline.cli`: the `rlhf` command where only a module can be launched (`accelerate launch -m`,
as the TrainJob launcher does)."""

from rlhf_pipeline.cli import main

main()
