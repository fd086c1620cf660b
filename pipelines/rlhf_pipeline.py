"""The RLHF pipeline: data preparation -> SFT -> reward model (+ judge) -> PPO, DPO or both -> evaluation -> report.

    validate-config ──> prepare-data ──> SFT ──> reward model ──┬─ alignment == "ppo": PPO ──> evaluate ──> report (+ alias challenger)
        (cached)       └───> judge          ├─ alignment == "dpo": DPO ──> evaluate ──> report (+ alias challenger)
                                            ├─ alignment == "both": PPO, DPO ──> one evaluate ──> report
                                            └─ otherwise: fail with one line

The first step, validate-config, builds every stage's config from the run's parameters (the typed ones such as
`sft_max_steps` laid over the `<stage>_config` blobs; the typed one wins) and hands each step its options, so a
bad key fails the run in seconds, before any data is read or any model trained.

The judge is a second reward model trained on the judge subset (questions neither the proxy reward model nor the
policies saw); every evaluation scores the answers with it next to the proxy. With `both`, PPO and DPO start from
the same SFT and reward model, one evaluate step compares them on the same questions and generation settings, and
the challenger alias goes to the one with the higher judge win-rate vs SFT (evaluation.evaluate.choose_challenger).

`build_pipeline(settings)` returns the pipeline for a `PipelineSettings` (GPU node pool, resources, retries,
caching, model-cache PVC, secrets, TrainJob mode); `build_pipeline(None)` the same graph without Kubernetes
configuration, which `rlhf run` executes through `kfp.local`. `rlhf_pipeline` is the default-settings pipeline
compiled into `pipelines/rlhf_pipeline.yaml`.

Why evaluate/report sit inside each branch rather than after a `dsl.OneOf`: kfp.local 2.17 resolves OneOf only
for parameters, not artifacts, and the same graph must run locally.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfp import dsl

from components.dpo import dpo
from components.evaluate import evaluate
from components.images import ImageRefs, stage_image
from components.judge import judge
from components.ppo import ppo
from components.prepare_data import prepare_data
from components.report import report
from components.reward import reward
from components.sft import sft
from components.trainjob import trainjob
from components.unknown_alignment import unknown_alignment
from components.validate_config import validate_config
from rlhf_pipeline.modeling.loading import EMBEDDED_MODEL
from rlhf_pipeline.orchestration.k8s import configure_task, restrict_pod
from rlhf_pipeline.orchestration.settings import DEFAULT_CACHE_MOUNT, PipelineSettings
from rlhf_pipeline.orchestration.stage_parameters import FROM_ENVIRONMENT
from rlhf_pipeline.stages import STAGES

PIPELINE_NAME = "rlhf-pipeline"
COMPILED = Path(__file__).with_name("rlhf_pipeline.yaml")
DEFAULT_INPUT = f"{DEFAULT_CACHE_MOUNT}/datasets/beer.stackexchange.com/Posts.xml"
DESCRIPTION = (
    "StackLLaMA-style RLHF: Stack Exchange preference data -> SFT (LoRA) -> reward model (+ an independent judge) "
    "-> PPO, DPO or both -> evaluation against SFT -> report; every step tracked and registered in MLflow."
)
# The validation, the report and the judge are the steps that are not registry stages; the stages' names come from
# their declarations.
VALIDATE_DISPLAY = "Validate configuration"
REPORT_DISPLAY = "Report + alias challenger"
JUDGE_DISPLAY = "Judge reward model (independent)"
# The image (images.yaml key) of each step that is not a registry stage (a stage's: its `Stage.image`).
STEP_IMAGES = {"validate_config": "ops", "judge": STAGES["reward"].image, "report": "report", "trainjob": "ops"}


def display_names() -> dict[str, str]:
    """Step -> task name in the Kubeflow UI, in pipeline order."""
    return {
        "validate_config": VALIDATE_DISPLAY,
        **{key: stage.display_name for key, stage in STAGES.items()},
        "judge": JUDGE_DISPLAY,
        "report": REPORT_DISPLAY,
    }


DISPLAY = display_names()  # `rlhf compile`'s task summary orders by it


def build_pipeline(settings: PipelineSettings | None = None, images: ImageRefs | None = None) -> Callable[..., Any]:
    """The pipeline for `settings`; None: the local variant (no Kubernetes config, no step caching). `images`: the
    image references of the steps (default: those the components were declared with, from images.yaml)."""
    k8s = settings is not None
    s = settings if settings is not None else PipelineSettings()
    trainjob_mode = k8s and s.distributed == "trainjob"
    settings_data = s.model_dump(mode="json", exclude_none=True)  # protobuf parameters have no null
    default_selector = dict(s.gpu.node_selector)
    default_tolerations = [t.to_k8s() for t in s.gpu.tolerations]
    default_work_root = f"{s.model_cache.mount_path}/runs"  # $RLHF_CACHE_DIR/runs of the steps

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION, display_name="RLHF pipeline (StackLLaMA)")
    def rlhf_pipeline(
        alignment: str = "ppo",
        input_data: str = DEFAULT_INPUT,
        base_model: str = EMBEDDED_MODEL,
        prepare_data_config: dict = {},
        sft_config: dict = {},
        reward_config: dict = {},
        ppo_config: dict = {},
        dpo_config: dict = {},
        evaluate_config: dict = {},
        judge_config: dict = {},
        sft_max_steps: int = 0,
        sft_seq_length: int = 512,
        reward_max_steps: int = 0,
        judge_max_steps: int = 0,
        ppo_steps: int = 20,
        ppo_batch_size: int = 8,
        dpo_max_steps: int = 0,
        evaluate_max_questions: int = 32,
        mlflow_tracking_uri: str = FROM_ENVIRONMENT,
        experiment_name: str = "rlhf-pipeline",
        registered_model_prefix: str = "rlhf",
        work_root: str = default_work_root,
        report_samples: int = 4,
        gpu_node_selector: dict = default_selector,
        gpu_tolerations: list = default_tolerations,
    ):
        """StackLLaMA-style RLHF on Stack Exchange preferences, tracked in MLflow.

        Args:
            alignment: Alignment algorithm after the reward model: "ppo" (online, against the reward model),
                "dpo" (offline, on the preference pairs), or "both" (PPO and DPO from the same SFT and reward
                model, evaluated side by side; the challenger alias goes to the one the judge prefers). Anything
                else fails the run.
            input_data: Stack Exchange dump as the prepare-data step sees it: Posts.xml, a site .7z, H4
                preference parquet/JSONL, or a directory of them (e.g. on the model-cache PVC).
            base_model: Model to fine-tune: a Hugging Face id, a path on the model cache, or
                "smollm2-135m-instruct" (the embedded SmolLM2-135M-Instruct).
            prepare_data_config: Extra prepare-data options as a JSON object (fractions, caps, seed), e.g.
                {"finetune_max_questions": 2000, "seed": 1}. Field names as in `rlhf prepare-data
                --help`, with underscores; every key is checked by the first step (validate-config).
            sft_config: Extra SFT options as a JSON object, e.g. {"learning_rate": 0.0002, "lora_r": 16}.
            reward_config: Extra reward-model options as a JSON object, e.g. {"batch_size": 8, "max_length": 1024}.
            ppo_config: Extra PPO options as a JSON object, e.g. {"mini_batch_size": 4, "ppo_epochs": 4}.
            dpo_config: Extra DPO options as a JSON object, e.g. {"beta": 0.1, "max_length": 1024}.
            evaluate_config: Extra evaluation options as a JSON object, e.g. {"max_new_tokens": 128,
                "batch_size": 16}.
            judge_config: Extra options of the judge (a reward model on the judge subset) as a JSON object, e.g.
                {"lora_r": 16, "batch_size": 8}; a "model" key trains it on another base than the SFT model.
            sft_max_steps: SFT optimizer steps; 0: no cap (sft num_epochs decide). Overrides sft_config's
                "max_steps" unless 0.
            sft_seq_length: SFT packed sequence length in tokens. Overrides sft_config's "seq_length".
            reward_max_steps: Reward-model optimizer steps; 0: no cap (num_epochs decide). Overrides
                reward_config's "max_steps" unless 0.
            judge_max_steps: Judge optimizer steps; 0: no cap (num_epochs decide). Overrides judge_config's
                "max_steps" unless 0.
            ppo_steps: PPO steps (each: sample, score, update). Overrides ppo_config's "steps".
            ppo_batch_size: Prompts per PPO step. Overrides ppo_config's "batch_size".
            dpo_max_steps: DPO optimizer steps; 0: no cap (num_epochs decide). Overrides dpo_config's
                "max_steps" unless 0.
            evaluate_max_questions: Evaluation questions (at most). Overrides evaluate_config's "max_questions".
            mlflow_tracking_uri: MLflow tracking URI; the default "$MLFLOW_TRACKING_URI" uses the steps' own
                variable (compile settings `env`; the Helm chart sets its MLflow Service).
            experiment_name: MLflow experiment of the stage runs.
            registered_model_prefix: Registered models are <prefix>-sft, <prefix>-reward, <prefix>-policy.
            work_root: Directory for full stage outputs (merged weights, checkpoints), by default on the
                model-cache PVC. Retries resume from the checkpoints kept there.
            report_samples: Sample generations shown in the final report.
            gpu_node_selector: Node selector of the GPU steps (JSON object of label: value).
            gpu_tolerations: Tolerations of the GPU steps (JSON list of Kubernetes tolerations).
        """
        checked = validate_config(
            alignment=alignment,
            prepare_data_config=prepare_data_config,
            sft_config=sft_config,
            reward_config=reward_config,
            judge_config=judge_config,
            ppo_config=ppo_config,
            dpo_config=dpo_config,
            evaluate_config=evaluate_config,
            sft_max_steps=sft_max_steps,
            sft_seq_length=sft_seq_length,
            reward_max_steps=reward_max_steps,
            judge_max_steps=judge_max_steps,
            ppo_steps=ppo_steps,
            ppo_batch_size=ppo_batch_size,
            dpo_max_steps=dpo_max_steps,
            evaluate_max_questions=evaluate_max_questions,
            mlflow_tracking_uri=mlflow_tracking_uri,
        )
        options = checked.outputs  # every step's options come from here, so every step runs after the check
        tracking = dict(
            tracking_uri=options["tracking_uri"],
            experiment_name=experiment_name,
            registered_model_prefix=registered_model_prefix,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            work_root=work_root,
        )

        def step(
            task: Any, name: str, gpu: bool | None = None, suffix: str = "", settings_as: str = "", image: str = ""
        ) -> Any:
            display = display_names()[name] + suffix
            if images is not None:  # retargeted (rlhf compile --registry/--tag)
                task.container_spec.image = images(image or STEP_IMAGES.get(name) or STAGES[name].image)
            if k8s:
                return configure_task(
                    task,
                    settings_as or name,
                    display,
                    s,
                    gpu_node_selector=gpu_node_selector,
                    gpu_tolerations=gpu_tolerations,
                    gpu=gpu,
                )
            task.set_display_name(display)
            task.set_caching_options(False)
            return task

        def train(stage: str, component: Any, **kwargs: Any) -> Any:
            """The stage in-pod, or (TrainJob mode, for a stage declared `trainjob`) a CPU launcher that runs it
            as a TrainJob."""
            if not (trainjob_mode and STAGES[stage].trainjob):
                return step(component(**kwargs, **tracking), stage)
            base = kwargs.pop("base_model", "")
            launcher = trainjob(
                stage=stage,
                image=images.stage(stage) if images is not None else stage_image(stage),
                settings=settings_data,
                gpu_node_selector=gpu_node_selector,
                gpu_tolerations=gpu_tolerations,
                base_model=base,
                **kwargs,
                **tracking,
            )
            return step(launcher, stage, gpu=False, suffix=" (TrainJob)", image=STEP_IMAGES["trainjob"])

        step(checked, "validate_config")
        data = step(prepare_data(input_data=input_data, config=options["prepare_data_config"]), "prepare_data")
        sft_task = train("sft", sft, data=data.outputs["data"], base_model=base_model, config=options["sft_config"])
        rm_task = train(
            "reward",
            reward,
            data=data.outputs["data"],
            sft_model=sft_task.outputs["model"],
            config=options["reward_config"],
        )

        judge_task = step(  # the reward stage's resources, retries and caching (settings_as)
            judge(
                data=data.outputs["data"],
                sft_model=sft_task.outputs["model"],
                config=options["judge_config"],
                **tracking,
            ),
            "judge",
            settings_as="reward",
        )

        def evaluate_and_report(policy_task: Any, second_task: Any = None, first: str = "", second: str = "") -> None:
            """One evaluate step (one policy, or PPO and DPO side by side) and the report."""
            pair = {} if second_task is None else {"second_policy": second_task.outputs["model"]}
            ev = step(
                evaluate(
                    data=data.outputs["data"],
                    sft_model=sft_task.outputs["model"],
                    reward_model=rm_task.outputs["model"],
                    judge_model=judge_task.outputs["model"],
                    policy=policy_task.outputs["model"],
                    alignment=first or alignment,
                    second_alignment=second,
                    config=options["evaluate_config"],
                    **pair,
                    **tracking,
                ),
                "evaluate",
            )
            step(
                report(
                    sft_model=sft_task.outputs["model"],
                    reward_model=rm_task.outputs["model"],
                    policy=policy_task.outputs["model"],
                    eval_metrics=ev.outputs["metrics"],
                    generations=ev.outputs["generations"],
                    eval_report=ev.outputs["report"],
                    alignment=alignment,
                    tracking_uri=options["tracking_uri"],
                    registered_model_prefix=registered_model_prefix,
                    kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    num_samples=report_samples,
                    **pair,
                ),
                "report",
            )

        def ppo_step() -> Any:
            return train(
                "ppo",
                ppo,
                data=data.outputs["data"],
                sft_model=sft_task.outputs["model"],
                reward_model=rm_task.outputs["model"],
                config=options["ppo_config"],
            )

        def dpo_step() -> Any:
            return train(
                "dpo", dpo, data=data.outputs["data"], sft_model=sft_task.outputs["model"], config=options["dpo_config"]
            )

        with dsl.If(alignment == "ppo", name="alignment-ppo"):
            evaluate_and_report(ppo_step())
        with dsl.Elif(alignment == "dpo", name="alignment-dpo"):
            evaluate_and_report(dpo_step())
        with dsl.Elif(alignment == "both", name="alignment-both"):
            evaluate_and_report(ppo_step(), dpo_step(), first="ppo", second="dpo")
        with dsl.Else(name="alignment-unknown"):
            bad = unknown_alignment(alignment=alignment)
            bad.set_display_name("Unknown alignment")
            if images is not None:
                bad.container_spec.image = images("ops")
            if k8s:
                bad.set_caching_options(False)
                bad.set_cpu_request(s.light_resources.cpu).set_memory_request(s.light_resources.memory)
                restrict_pod(bad)

    return rlhf_pipeline


rlhf_pipeline = build_pipeline(PipelineSettings())


def compile_pipeline(
    output: str | Path, settings: PipelineSettings | None = None, images: ImageRefs | None = None
) -> Path:
    """Compile the pipeline for `settings` (default settings when None) with `images` (default: images.yaml's
    references) to `output`."""
    from kfp import compiler

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings or PipelineSettings(), images), package_path=str(out))
    return out
