"""Kubeflow component: fail the run with one clear line when `alignment` is not ppo, dpo or both."""

from kfp import dsl

from components.images import image_for


@dsl.component(base_image=image_for("ops"), install_kfp_package=False)
def unknown_alignment(alignment: str):
    """The `else` branch of the alignment choice: stops the run (no silent success without a policy)."""
    raise SystemExit(f"pipeline parameter alignment must be 'ppo', 'dpo' or 'both', got {alignment!r}")
