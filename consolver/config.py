"""Typed configuration: an OmegaConf structured schema, YAML loading, overrides, validation.

One name per concept: a config key is the argument name is the log tag. Wrong keys fail
with the list of valid ones (and the closest match), never silently.

    cfg = load_config("conf/toy_depth.yaml", ["solver.order=3", "data.batch_size=64"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


#: What the validation gate does with a K that loses (``validation.gate``).
GATE_MODES = ("off", "report", "fallback", "drop")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and what is valid."""


@dataclass
class ToyConfig:
    """The embedded toy world (``backend.name: toy``)."""

    renders_per_prompt: int = 64
    component_std: float = 0.05  # std of each mixture component, latent units ([-1, 1] images)
    seed: int = 0  # render jitter; the train/heldout prompt split is fixed and does not depend on it
    schedule: str = "vp"  # vp (SD1.5 betas, epsilon) | flow (flow matching, velocity)
    num_train_prompts: int = 12  # configured prompt set: the first prompts of each split
    num_heldout_prompts: int = 4
    prompt_offset: int = 0  # skip the first prompts of each split: a disjoint prompt family (transfer worlds)
    palette: str = "default"  # default | inverted (1 - image: other colours and backgrounds)


@dataclass
class FluxConfig:
    """FLUX.1-Kontext options (``backend.name: flux_kontext``).  # flux_kontext / toy_edit"""

    max_sequence_length: int = 512  # T5 tokens of the instruction (the pipeline's default)


@dataclass
class BackendConfig:
    name: str = "toy"  # a name in consolver.backends.BACKENDS
    model: Optional[str] = None  # hub id or local directory of the pretrained pipeline
    resolution: int = 32  # decoded image side in pixels
    dtype: str = "float32"  # float32 | float16 | bfloat16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    toy: ToyConfig = field(default_factory=ToyConfig)
    flux: FluxConfig = field(default_factory=FluxConfig)  # flux_kontext / toy_edit
    # sd15 / real backends
    decode_chunk: int = 8  # latents per VAE decode call (memory lever: peak decode memory grows with it)
    # diffusers (class-conditional UNet2DModel / DiT): class id of the unconditional branch of guidance;
    # default: DiT num_classes (1000 for ImageNet), UNet2DModel num_class_embeds - 1
    null_class: Optional[int] = None


@dataclass
class SolverConfig:
    order: int = 4  # history length m of the multistep solver
    num_steps: List[int] = field(default_factory=lambda: [4])  # K values (NFE) to train/evaluate
    base_solver: str = "ddim"  # fixed table when no learned one: ddim | adams_bashforth | ipndm
    timestep_spacing: str = "trailing"
    # learn each K's grid of step times with the coefficients (an action column per step; shipped
    # in the scheduler's step_grids). Starts at timestep_spacing. Needs policy.name=table, gaussian.
    learn_timesteps: bool = False
    # with learn_timesteps: the last model evaluation of every learned grid at or below this position
    # (VP timestep, flow unshifted sigma); null: anywhere. Keeps the last steps off extrapolations.
    grid_last_max: Optional[float] = None


@dataclass
class ReferenceConfig:
    """The full-step solve that makes targets."""

    solver: str = "dpmsolver++"  # dpmsolver++ | unipc (diffusers) | ddim | euler | adams_bashforth | ipndm
    num_steps: int = 40


@dataclass
class RewardConfig:
    name: str = "pixel_psnr"
    weight: float = 1.0
    model: Optional[str] = None  # hub id or local path of the reward network, where it has one
    dtype: Optional[str] = None


@dataclass
class DataConfig:
    """Offline dataset: making shards (``tools/make_shards.py``) and streaming them into training.

    Making: sample ``i`` gets prompt ``i % len(prompts)`` and noise from its own seed, derived
    from (``seed``, ``i``) only; shard ``s`` holds samples ``[s * samples_per_shard, ...)``.
    Streaming: see :class:`consolver.data.ShardDataModule` (loader order is seeded by the
    top-level ``seed``, so the training seed never changes the dataset).
    Evaluating (``tools/evaluate.py``, the trainer's periodic eval): ``heldout_prompts`` when set
    (a prompt file in any of the ``prompts`` formats, read with the same ``prompt_column``), else
    the backend's own held-out split (toy worlds), else ``prompts`` with fresh noises. Generic
    backends (``diffusers``, ``sd15``) have no held-out split: set ``heldout_prompts`` to hold
    prompts or classes out of training.
    """

    prompts: Optional[str] = None  # .txt (one per line), .jsonl or .parquet; toy: its own list
    heldout_prompts: Optional[str] = None  # evaluation prompts (same formats); default: the backend's held-out split, else prompts
    prompt_column: str = "prompt"  # JSONL/parquet column with the text the backend encodes
    ref_image_column: Optional[str] = None  # editing backends: column with reference image paths
    split: str = "train"  # toy prompt split used for making shards: train | heldout
    num_samples: int = 1024
    seed: int = 0  # base of the per-sample noise seeds (make_shards)
    shard_dir: str = "outputs/shards"
    samples_per_shard: int = 256
    solve_batch_size: int = 16  # samples per batched reference solve in make_shards
    train_shards: Optional[str] = None  # paths, directories, brace patterns or pipe: URLs ("::"-separated); default shard_dir
    val_shards: Optional[str] = None
    batch_size: int = 32
    num_workers: int = 2
    shard_shuffle: bool = True  # shuffle the shard order every epoch (same order on every rank)
    shuffle_buffer: int = 1000  # samples held per worker for shuffling; 0 or 1 = no sample shuffle
    resampled: bool = False  # draw shards with replacement; needs epoch_length (use it for DDP)
    epoch_length: Optional[int] = None  # samples per epoch per rank in resampled mode
    load_target_image: bool = False  # also decode target.png into batch["target_image"]
    verify_checksums: bool = True  # check each member's CRC32 recorded in meta.json


@dataclass
class PolicyConfig:
    """The coefficient policy (actor) and, for ``algo.advantage=gae``, its critic.

    Actions are the ``solver.order - 1`` free coefficients; the one the sum-to-one constraint
    implies is ``implied`` (``newest``: the weight of the newest model output, so exploration
    noise on the other weights is paid against the nearest history entry; ``oldest``: the paper's
    choice). Every distribution centres on the base solver (``solver.base_solver``): bins sit at
    ``base + offsets`` with offsets spanning ``ranges`` (one ``[lo, hi]`` per free coefficient,
    the last one repeated), so the untrained mode is the base solver for every K and step.
    """

    name: str = "table"  # table: parameters per (K, step) | mlp: the paper's MLP on the step features
    distribution: str = "gaussian"  # gaussian: learned mean and scale | bins: categorical over num_bins values
    implied: str = "newest"  # newest | oldest: which coefficient sum-to-one implies
    num_bins: int = 11
    ranges: List[List[float]] = field(default_factory=lambda: [[-1.0, 1.0]])  # offsets from the base solver
    init_std: float = 0.2  # initial exploration std, coefficient units (bins: a discretised Gaussian)
    hidden: int = 256  # mlp width (policy and critic)
    sample_features: bool = False  # observation also holds cosine similarities between history entries


@dataclass
class AlgoConfig:
    """The training algorithm. A batch is ``data.batch_size`` (prompt, noise, target) samples times
    ``group_size`` rollouts each; one training iteration = one batch."""

    name: str = "grpo"  # ppo | grpo | rloo | distill
    group_size: int = 8  # G rollouts per (prompt, noise)
    lr: float = 0.01
    lr_schedule: str = "cosine"  # constant | cosine (to lr_min_ratio * lr at trainer.max_steps)
    lr_min_ratio: float = 0.1
    warmup_steps: int = 0  # iterations of linear warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm (0: off)
    epochs: int = 1  # PPO epochs over each batch (rloo: always 1)
    minibatches: int = 1  # PPO minibatches per epoch
    clip_epsilon: float = 0.2
    entropy_coef: float = 0.0
    kl_coef: float = 0.0  # ppo: KL penalty to the initial policy
    advantage: str = "group"  # ppo: group (mean of the G rollouts) | gae (critic)
    normalize_std: bool = True  # divide group advantages by max(group std, min_group_std) (measured best)
    min_group_std: float = 0.5  # with normalize_std: std floor, reward units (near-ties get no inflated advantage)
    gamma: float = 1.0  # gae
    lmbda: float = 0.95  # gae
    distill_loss: str = "log_mse"  # distill: log_mse (-PSNR of latents) | mse | pixel_mse (decoded) | reward
    distill_coef: float = 0.0  # ppo/grpo/rloo: add this x the distill loss of a mode rollout to every update
    # ppo/grpo/rloo: rollout rewards are clamped at this value before the advantages (null: off): quality
    # beyond it earns nothing, so updates go to landing on the target's content rather than to precision
    reward_ceiling: Optional[float] = None
    gradient_checkpointing: bool = False  # distill: recompute each backend predict in the backward pass (memory lever)


@dataclass
class TrainerConfig:
    """Lightning trainer and logging. Steps count training iterations (batches)."""

    max_steps: int = 600
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # int, list or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ...
    precision: str = "32-true"
    num_threads: int = 0  # torch.set_num_threads on CPU; 0 = leave torch's default
    log_every_n_steps: int = 10
    checkpoint_every: int = 100  # iterations between checkpoints (plus `last`)
    eval_every: int = 200  # iterations between held-out evaluations (0: off)
    eval_num_noises: int = 32  # held-out evaluation: noises per held-out prompt
    image_every: int = 200  # iterations between preview | target image grids (0: off)
    progress_bar: bool = True


@dataclass
class ValidationConfig:
    """The validation gate at export (:mod:`consolver.evaluation.gate`): every exported K is scored
    on held-out samples against the best training-free solver at that K; a K behind it by more
    than ``tolerance_se`` paired standard errors, on mode/scene agreement or pixel PSNR, is handled
    by ``gate``. The scores go into the scheduler config (``validation``)."""

    gate: str = "fallback"  # off | report (keep every K) | fallback (the base solver for a losing K) | drop (no table)
    world: str = "heldout"  # a transfer world (consolver.evaluation.transfer), never a training sample
    num_samples: int = 128  # prompts x noises (at most this many prompts), seeds data.seed + VALIDATION_SEED_OFFSET
    tolerance_se: float = 1.0


@dataclass
class Config:
    backend: BackendConfig = field(default_factory=BackendConfig)
    guidance: float = 3.0  # classifier-free guidance for targets and previews alike
    solver: SolverConfig = field(default_factory=SolverConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    rewards: List[RewardConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output_dir: str = "outputs/run"
    seed: int = 0


def _paths(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """``(path, value)`` of every key in a plain container, lists as ``rewards[0].name``."""
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path, v
            yield from _paths(v, path)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield f"{prefix}[{i}]", v
            yield from _paths(v, f"{prefix}[{i}]")


def _key_path(err: OmegaConfBaseException, layer: Any = None) -> str:
    """The full path of the key an OmegaConf error is about. Merging a list element, OmegaConf
    reports only the key inside it (``nme``); ``layer`` (the plain container being merged)
    locates it as ``rewards[0].nme``."""
    key = str(getattr(err, "full_key", None) or getattr(err, "key", None) or "")
    name = getattr(err, "key", None)
    if layer is None or not key or name is None or "." in key or "[" in key:
        return key
    inside = [(p, v) for p, v in _paths(layer) if "[" in p and p.endswith(f".{name}")]
    message = str(err)
    best = [p for p, v in inside if f"'{v}'" in message] or [p for p, _ in inside]
    return best[0] if best else key


def _explain(err: OmegaConfBaseException, layer: Any = None) -> ConfigError:
    key = _key_path(err, layer)
    section = getattr(err, "object_type", None)
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and is_dataclass(section):
        valid = [f.name for f in fields(section)]
        name = str(getattr(err, "key", key)).split(".")[-1]
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"unknown config key {key!r}{hint}; valid keys in {section.__name__}: {', '.join(valid)}")
    msg = str(err).splitlines()[0]
    return ConfigError(f"invalid config value for {key!r}: {msg}" if key else f"invalid config: {msg}")


def _flow(value: Any) -> str:
    """A value in YAML flow syntax as an override takes it (``None`` entries of mappings left out)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _list_error(cfg: Any, override: str, err: Exception) -> Optional[ConfigError]:
    """The message for an index override (``rewards.1.name=x``) that addresses no list entry,
    showing the list syntax; ``None`` when ``err`` is about something else."""
    key = override.split("=", 1)[0]
    parts = [p for p in re.split(r"[.\[\]]", key) if p]
    node, path = cfg, []
    for part in parts:
        if isinstance(node, ListConfig):
            break
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node, path = node[part], path + [part]
    else:
        return None
    index = parts[len(path)]
    if re.fullmatch(r"-?[0-9]+", index) and -len(node) <= int(index) < len(node):
        return None  # an existing entry: the error is about the value, not the index
    name, n = ".".join(path), len(node)
    has = "it is empty" if n == 0 else f"it has {n}: {name}[0]" + (f" to {name}[{n - 1}]" if n > 1 else "")
    example = _flow(OmegaConf.to_container(node, resolve=True))
    if n == 0:
        element = getattr(getattr(node, "_metadata", None), "element_type", None)
        example = "[{" + f"{fields(element)[0].name}: ..." + "}]" if is_dataclass(element) else "[...]"
    return ConfigError(f"override {override!r}: {name} has no entry {index!r} ({has}); an index override changes "
                       f"an existing entry only. To set the whole list use the list syntax, e.g. '{name}={example}'")


def _load_yaml(path: Path) -> DictConfig:
    """A YAML config file as a DictConfig; syntax errors and non-mappings as one-line ConfigErrors."""
    import yaml

    try:
        layer = OmegaConf.load(path)
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark, context, context_mark = (getattr(err, k, None) for k in ("problem_mark", "context", "context_mark"))
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if context and context_mark is not None:
            problem += f" ({context} started at line {context_mark.line + 1})"
        raise ConfigError(f"config file {str(path)!r}{where}: invalid YAML: {problem}") from None
    if not isinstance(layer, DictConfig):
        kind = "a list" if isinstance(layer, ListConfig) else type(layer).__name__
        raise ConfigError(f"config file {str(path)!r} must be a mapping of config keys (backend:, solver:, data:, ...) "
                          f"at its top level, not {kind}")
    return layer


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults <- YAML file <- ``key=value`` overrides, validated; returns a ``Config``
    (an OmegaConf object typed as the dataclass, attribute access as usual). Overrides may index
    into lists (``rewards.0.weight=2`` or ``rewards[0].weight=2``) or replace them
    (``rewards=[{name: toy_depth}, {name: toy_seg, weight: 0.5}]``)."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        layer = _load_yaml(path)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, OmegaConf.to_container(layer)) from None
        except TypeError as err:  # a list written as a mapping or the reverse
            raise ConfigError(f"config file {str(path)!r}: {_shape_error_key(layer)} has the wrong shape ({err}): lists "
                              f"are written as '- item' lines or [a, b], sections as 'key: value' lines") from None
    return apply_overrides(cfg, overrides)  # type: ignore[arg-type]


def apply_overrides(cfg: Config, overrides: Sequence[str] = ()) -> Config:
    """``cfg`` (changed in place; pass a copy to keep it) with ``key=value`` overrides applied as
    :func:`load_config` applies them, validated."""
    for override in overrides:
        try:  # applied to the merged config (not merged as a layer), so list indices reach the lists
            cfg.merge_with_dotlist([override])  # type: ignore[attr-defined]
        except (OmegaConfBaseException, TypeError) as err:
            index_error = _list_error(cfg, override, err)
            if index_error is not None:
                raise index_error from None
            if not isinstance(err, OmegaConfBaseException):
                raise ConfigError(f"override {override!r}: {err}") from None
            raise _explain(err, _override_layer(override)) from None
    validate(cfg)
    return cfg


def _shape_error_key(layer: DictConfig) -> str:
    """The first top-level key of ``layer`` that cannot be merged into the schema (TypeError)."""
    for key in layer:
        try:
            OmegaConf.merge(OmegaConf.structured(Config), {key: layer[key]})
        except TypeError:
            return repr(key)
        except OmegaConfBaseException:
            continue
    return "a key"


def _override_layer(override: str) -> Any:
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([override]))
    except Exception:  # noqa: BLE001 - only used to locate keys inside lists
        return None


def _choice(key: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def validate(cfg: Config) -> None:
    """Checks that need more than types. Raises ``ConfigError`` naming the key."""
    from consolver.backends import BACKENDS
    from consolver.backends.toy import TOY_PALETTES, TOY_SCHEDULES
    from consolver.backends.toy_scenes import SPLITS
    from consolver.sampling import REFERENCE_SOLVERS
    from consolver.schedules import TIMESTEP_SPACINGS
    from consolver.solvers.tables import FIXED_SOLVERS

    _check_finite(cfg)
    _choice("backend.name", cfg.backend.name, tuple(BACKENDS))
    _check_device("backend.device", cfg.backend.device)
    _choice("backend.toy.schedule", cfg.backend.toy.schedule, TOY_SCHEDULES)
    _choice("backend.toy.palette", cfg.backend.toy.palette, TOY_PALETTES)
    if str(cfg.validation.gate) == "False":  # YAML 1.1 reads `gate: off` (and the override gate=off) as false
        cfg.validation.gate = "off"
    _choice("validation.gate", cfg.validation.gate, GATE_MODES)
    if cfg.validation.gate != "off":
        from consolver.evaluation.transfer import TRANSFER_WORLDS

        _choice("validation.world", cfg.validation.world, tuple(TRANSFER_WORLDS))
        if cfg.validation.num_samples < 1 or not cfg.validation.tolerance_se >= 0:
            raise ConfigError(f"validation.num_samples must be >= 1 and validation.tolerance_se >= 0, got "
                              f"{cfg.validation.num_samples} and {cfg.validation.tolerance_se}")
    _choice("backend.dtype", cfg.backend.dtype, ("float32", "float16", "bfloat16"))
    if cfg.backend.name in TOY_BACKENDS and cfg.backend.dtype != "float32":  # toy-only: other backends reach backend.model below
        raise ConfigError(f"backend.dtype={cfg.backend.dtype!r} has no effect on the toy backend (its closed-form "
                          f"denoiser always computes in float32); set backend.dtype=float32")
    _choice("solver.base_solver", cfg.solver.base_solver, FIXED_SOLVERS)
    _choice("solver.timestep_spacing", cfg.solver.timestep_spacing, TIMESTEP_SPACINGS)
    _choice("reference.solver", cfg.reference.solver, REFERENCE_SOLVERS)
    _choice("data.split", cfg.data.split, SPLITS)
    if not 1 <= cfg.solver.order <= 8:
        raise ConfigError(f"solver.order must be in 1..8, got {cfg.solver.order}")
    if cfg.solver.base_solver != "ddim" and cfg.solver.order > 4:
        raise ConfigError(f"solver.base_solver={cfg.solver.base_solver!r} has orders 1..4, but solver.order="
                          f"{cfg.solver.order}; lower solver.order or set solver.base_solver=ddim")
    if not cfg.solver.num_steps or min(cfg.solver.num_steps) < 1:
        raise ConfigError(f"solver.num_steps must be a non-empty list of positive ints, got {list(cfg.solver.num_steps)}")
    for key, value in (("reference.num_steps", cfg.reference.num_steps), ("data.num_samples", cfg.data.num_samples),
                       ("data.samples_per_shard", cfg.data.samples_per_shard), ("data.batch_size", cfg.data.batch_size),
                       ("data.solve_batch_size", cfg.data.solve_batch_size)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in (("data.num_workers", cfg.data.num_workers), ("data.shuffle_buffer", cfg.data.shuffle_buffer)):
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.backend.decode_chunk < 1:
        raise ConfigError(f"backend.decode_chunk must be >= 1, got {cfg.backend.decode_chunk}")
    if cfg.backend.name == "sd15" and cfg.backend.resolution % 8:
        raise ConfigError(f"backend.resolution={cfg.backend.resolution} must be a multiple of 8 for the sd15 backend "
                          f"(the VAE downsamples by 8: 512 px -> 4x64x64 latents)")
    if cfg.backend.null_class is not None and (cfg.backend.name != "diffusers" or cfg.backend.null_class < 0):
        raise ConfigError(f"backend.null_class={cfg.backend.null_class} must be a class id >= 0 and is read only by "
                          f"backend.name=diffusers (got {cfg.backend.name!r}); leave it unset otherwise")
    validate_training(cfg)
    if cfg.backend.name not in TOY_BACKENDS and not cfg.backend.model:
        raise ConfigError(f"backend.model must name a hub id or local directory for backend {cfg.backend.name!r}")
    validate_editing(cfg)


#: Closed-form backends: no backend.model, float32 only.  # flux_kontext / toy_edit
TOY_BACKENDS = ("toy", "toy_edit")
#: Backends that edit a reference image, and whether they have reference scenes of their own.
EDITING_BACKENDS = {"flux_kontext": False, "toy_edit": True}
#: Backends with FLUX's dynamic shift: only the solvers that take FLUX's sigmas and mu make targets.
DYNAMIC_SHIFT_BACKENDS = ("flux_kontext", "toy_edit")


def validate_editing(cfg: Config) -> None:
    """Editing backends need reference images (``data.ref_image_column``) and a reference solver
    that supports the dynamic shift.  # flux_kontext / toy_edit"""
    name, data = cfg.backend.name, cfg.data
    if name in EDITING_BACKENDS and not data.ref_image_column and (data.prompts or not EDITING_BACKENDS[name]):
        raise ConfigError(f"backend {name!r} edits reference images: set data.ref_image_column to the column of "
                          f"reference image paths in data.prompts (a .jsonl or .parquet file; got data.prompts="
                          f"{data.prompts!r})")
    if name in DYNAMIC_SHIFT_BACKENDS and cfg.reference.solver in ("dpmsolver++", "unipc"):
        raise ConfigError(f"reference.solver={cfg.reference.solver!r} cannot follow backend {name!r}'s dynamic flow "
                          f"shift (FLUX sigmas and mu); use reference.solver=euler (the FLUX pipeline's own solver)")


POLICY_NAMES = ("table", "mlp")
DISTRIBUTIONS = ("bins", "gaussian")
IMPLIED = ("newest", "oldest")
ALGOS = ("ppo", "grpo", "rloo", "distill")
ADVANTAGES = ("group", "gae")
LR_SCHEDULES = ("constant", "cosine")
DISTILL_LOSSES = ("log_mse", "mse", "pixel_mse", "reward")


def validate_training(cfg: Config) -> None:
    """Checks of the ``policy``, ``algo`` and ``trainer`` sections."""
    policy, algo, trainer = cfg.policy, cfg.algo, cfg.trainer
    _choice("policy.name", policy.name, POLICY_NAMES)
    _choice("policy.distribution", policy.distribution, DISTRIBUTIONS)
    _choice("policy.implied", policy.implied, IMPLIED)
    _choice("algo.name", algo.name, ALGOS)
    _choice("algo.advantage", algo.advantage, ADVANTAGES)
    _choice("algo.lr_schedule", algo.lr_schedule, LR_SCHEDULES)
    _choice("algo.distill_loss", algo.distill_loss, DISTILL_LOSSES)
    if policy.num_bins < 2:
        raise ConfigError(f"policy.num_bins must be >= 2, got {policy.num_bins}")
    if not policy.ranges or any(len(r) != 2 or not r[0] < r[1] for r in policy.ranges):
        raise ConfigError(f"policy.ranges must be a list of [lo, hi] pairs with lo < hi, got {list(policy.ranges)}")
    if any(not r[0] <= 0.0 <= r[1] for r in policy.ranges):
        raise ConfigError(f"policy.ranges are offsets from the base solver and must contain 0, got {list(policy.ranges)}")
    if policy.init_std <= 0:
        raise ConfigError(f"policy.init_std must be > 0, got {policy.init_std}")
    if algo.name == "distill" and policy.distribution != "gaussian":
        raise ConfigError("algo.name=distill backpropagates through the mode action, which needs a continuous "
                          "policy: set policy.distribution=gaussian")
    if policy.sample_features and (policy.name != "mlp" or cfg.solver.base_solver != "ddim"):
        raise ConfigError("policy.sample_features=true needs policy.name=mlp (the table ignores observations) and "
                          f"solver.base_solver=ddim (got policy.name={policy.name!r}, "
                          f"solver.base_solver={cfg.solver.base_solver!r})")
    if cfg.solver.learn_timesteps and (policy.name != "table" or policy.distribution != "gaussian"):
        raise ConfigError(f"solver.learn_timesteps=true needs policy.name=table and policy.distribution=gaussian "
                          f"(got {policy.name}, {policy.distribution}): the grid is learned per K as a Gaussian "
                          f"action column; set solver.learn_timesteps=false to use the others")
    if algo.name == "distill" and policy.sample_features:
        raise ConfigError("algo.name=distill does not support policy.sample_features=true")
    if algo.advantage == "gae" and algo.name != "ppo":
        raise ConfigError(f"algo.advantage=gae needs a critic, which only algo.name=ppo trains (got {algo.name!r})")
    if algo.name in ("grpo", "rloo", "ppo") and algo.advantage == "group" and algo.group_size < 2:
        raise ConfigError(f"algo.group_size must be >= 2 for group advantages, got {algo.group_size}")
    for key, value in (("algo.group_size", algo.group_size), ("algo.epochs", algo.epochs),
                       ("algo.minibatches", algo.minibatches), ("trainer.max_steps", trainer.max_steps),
                       ("trainer.checkpoint_every", trainer.checkpoint_every),
                       ("trainer.log_every_n_steps", trainer.log_every_n_steps),
                       ("trainer.eval_num_noises", trainer.eval_num_noises)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if algo.lr <= 0:
        raise ConfigError(f"algo.lr must be > 0, got {algo.lr}")
    if str(trainer.precision).startswith("16"):
        raise ConfigError(f"trainer.precision={trainer.precision!r} (float16 loss scaling) is not supported: an "
                          f"iteration makes several updates; use 32-true or bf16-mixed (backend.dtype=float16 keeps "
                          f"the frozen model in half precision)")
    if algo.distill_coef < 0 or (algo.distill_coef > 0 and algo.name == "distill"):
        raise ConfigError(f"algo.distill_coef={algo.distill_coef} must be >= 0 and is for ppo/grpo/rloo (distill "
                          f"is the distill loss alone)")


def _check_finite(cfg: Any) -> None:
    """Refuse NaN/inf anywhere in the config (every float of every section), naming the key."""
    if OmegaConf.is_config(cfg):
        tree = OmegaConf.to_container(cfg, resolve=True)
    else:
        tree = dataclasses.asdict(cfg) if is_dataclass(cfg) else cfg
    for path, value in _paths(tree):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}={value} is not a finite number")


def _check_device(key: str, value: str) -> None:
    """``auto``, ``cpu``, or a CUDA device that exists on this machine."""
    if value in ("auto", "cpu"):
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}={value!r} but no CUDA GPU is available on this machine "
                              f"(torch.cuda.is_available() is False); set {key}=cpu or {key}=auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key}={value!r} but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")


def to_container(cfg: Config) -> Dict[str, Any]:
    """Plain dict (for logging hyperparameters and writing shard metadata)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path)


__all__ = [
    "AlgoConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "PolicyConfig",
    "ReferenceConfig",
    "RewardConfig",
    "SolverConfig",
    "ToyConfig",
    "TrainerConfig",
    "ValidationConfig",
    "apply_overrides",
    "load_config",
    "save_config",
    "to_container",
    "validate",
]
