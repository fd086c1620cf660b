"""rlhf-pipeline: StackLLaMA-style RLHF (data -> SFT -> reward -> PPO/DPO -> evaluation) as a Kubeflow pipeline."""

__version__ = "0.1.0"
