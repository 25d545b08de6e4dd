"""Cross-field checks of a Config that the types alone cannot express; each failure names the keys involved."""

from __future__ import annotations

import re

from jaxretrieval.config import Config, ConfigError
from jaxretrieval.models.layers import ATTENTION_SETTINGS
from jaxretrieval.systems import SYSTEMS, get_system
from jaxretrieval.systems.base import System

CAPTION_KINDS = ("jsonl", "demo", "albef", "csv", "karpathy", "webdataset", "tfds", "cuhk-pedes", "icfg-pedes",
                 "rstpreid", "pedes_demo")
REID_KINDS = ("market1501", "dukemtmc", "street2shop", "reid_demo")
PRECOMP_KINDS = ("precomp", "precomp_demo")  # SCAN / BUTD region features (data/precomp.py)
ALL_KINDS = CAPTION_KINDS + REID_KINDS + PRECOMP_KINDS
RULE_SET_NAMES = ("replicated", "fsdp", "fsdp_tensor")


def _one_of(value: str, allowed: tuple[str, ...], key: str, system: str, attribute: str) -> tuple[bool, str]:
    if value in allowed:
        return True, ""
    others = [name for name in SYSTEMS if value in getattr(get_system(name), attribute)]
    hint = f" ({value} is for system {' or '.join(others)}: set system: {others[0]})" if others else ""
    return False, f"{key}={value}: system {system} takes {' or '.join(allowed)}{hint}"


def _common(config: Config, system: System) -> list[tuple[bool, str]]:
    model, data, train = config.model, config.data, config.train
    return [
        (data.kind in ALL_KINDS, f"data.kind must be one of {', '.join(ALL_KINDS)}"),
        _one_of(model.family, system.families, "model.family", system.name, "families"),
        _one_of(data.kind, system.data_kinds, "data.kind", system.name, "data_kinds"),
        _one_of(train.loss, system.losses, "train.loss", system.name, "losses"),
        _one_of(config.eval.protocol, system.protocols, "eval.protocol", system.name, "protocols"),
        (config.distributed.initialize in ("auto", "always", "never"),
         "distributed.initialize must be auto, always or never"),
        (train.precision in ("fp32", "bf16"), "train.precision must be fp32 or bf16"),
        (config.checkpoint.on_corrupt in ("fallback", "error"), "checkpoint.on_corrupt must be fallback or error"),
        (train.batch_size > 0 and train.steps > 0, "train.batch_size and train.steps must be > 0"),
        (len(data.mean) == 3 and len(data.std) == 3, "data.mean and data.std need 3 values"),
        (train.epochs >= 0, "train.epochs must be >= 0"),
        (config.eval.folds >= 1, "eval.folds must be >= 1 (1: the whole gallery only)"),
        (data.tokenizer_kind in ("auto", "wordpiece"), "data.tokenizer_kind must be auto or wordpiece"),
        (config.eval.rerank_k >= 0, "eval.rerank_k must be >= 0 (0: no re-ranking)"),
        (config.eval.rerank_k == 0 or system.reranks, f"eval.rerank_k: system {system.name} has no cross-encoder to "
                                                      f"re-rank with"),
        (config.eval.rerank_k == 0 or config.eval.protocol == "text_to_image",
         "eval.rerank_k re-ranks the text_to_image protocol only (set eval.protocol: text_to_image)"),
        (config.eval.rerank_combine in ("replace", "add"), "eval.rerank_combine must be replace or add"),
        (config.eval.rerank_fill in ("row_min", "keep") or isinstance(config.eval.rerank_fill, int | float),
         "eval.rerank_fill must be row_min, keep or a number"),
        (data.max_words >= 1, "data.max_words must be >= 1"),
        (model.scan_unroll >= 1, "model.scan_unroll must be >= 1 (layers per iteration of the scanned loop)"),
        (model.attention in ATTENTION_SETTINGS, f"model.attention must be one of {', '.join(ATTENTION_SETTINGS)}"),
        (train.micro_batches >= 1 and train.batch_size % train.micro_batches == 0,
         "train.micro_batches must be >= 1 and divide train.batch_size"),
        (train.accumulation in ("cache", "mean"), "train.accumulation must be cache or mean"),
        (train.loss_variant in ("local", "gathered", "ring"), "train.loss_variant must be local, gathered or ring"),
        (train.optimizer in ("adamw", "adam"), "train.optimizer must be adamw or adam"),
        (train.schedule in ("cosine", "multistep", "xvlm_step"),
         "train.schedule must be cosine, multistep or xvlm_step"),
        (train.schedule != "multistep" or train.epochs > 0,
         "train.schedule=multistep counts train.warmup_epochs and train.milestones in epochs: set train.epochs"),
        (list(train.milestones) == sorted(train.milestones), "train.milestones must be increasing"),
        (0 < train.layer_decay <= 1, "train.layer_decay must be in (0, 1]"),
        (0 <= model.drop_path < 1, "model.drop_path must be in [0, 1)"),
    ]


def dual_encoder_checks(config: Config) -> list[tuple[bool, str]]:
    """The checks of an image tower and a text tower trained on captions (the CLIP-style systems)."""
    model, data = config.model, config.data
    return [
        *[(remat in ("none", "full", "dots"), f"model.{tower}.remat must be none, full or dots")
          for tower, remat in (("image", model.image.remat), ("text", model.text.remat),
                               ("multiway", model.multiway.remat))],
        (model.activation in ("quick_gelu", "gelu"), "model.activation must be quick_gelu or gelu"),
        (model.image.patch_size > 0 and model.image.image_size % model.image.patch_size == 0,
         "model.image.image_size must be a multiple of model.image.patch_size (> 0)"),
        (model.image.heads > 0 and model.image.width % model.image.heads == 0,
         "model.image.width must divide by heads (> 0)"),
        (model.text.heads > 0 and model.text.width % model.text.heads == 0,
         "model.text.width must divide by heads (> 0)"),
        (data.resize in ("crop", "squash"), "data.resize must be crop or squash"),
        (0 < data.local_scale[0] <= data.local_scale[1] <= 1,
         "data.local_scale must be [low, high] with 0 < low <= high <= 1"),
    ]


def no_layer_recipe(config: Config) -> list[tuple[bool, str]]:
    """For systems without layer depths or stochastic depth."""
    return [
        (config.model.drop_path == 0, f"model.drop_path does not apply to system {config.system} (beit3 has it)"),
        (config.train.layer_decay == 1, f"train.layer_decay does not apply to system {config.system} (beit3 has "
                                        f"layer depths)"),
    ]


def validate(config: Config, source: str = "config") -> None:
    system = get_system(config.system)
    checks = _common(config, system) + system.check(config)
    for pattern in config.train.no_decay:
        try:
            re.compile(pattern)
        except re.error as e:
            checks.append((False, f"train.no_decay: {pattern!r} is not a valid regex ({e})"))
    if isinstance(config.sharding, str):
        checks.append((config.sharding in RULE_SET_NAMES,
                       f"sharding: unknown rule set {config.sharding!r} ({', '.join(RULE_SET_NAMES)}, or a list of "
                       f"[regex, spec] rules)"))
    for rule in [] if isinstance(config.sharding, str) else config.sharding:
        ok = isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str) and \
            (rule[1] is None or rule[1] == "fsdp" or isinstance(rule[1], list))
        checks.append((ok, f"sharding rule {rule!r} must be [regex, [axis or null, ...] or fsdp]"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
