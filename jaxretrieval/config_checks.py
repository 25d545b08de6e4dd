"""Cross-field checks of a Config that the types alone cannot express; each failure names the keys involved."""

from __future__ import annotations

import re

from jaxretrieval.config import Config, ConfigError

FAMILIES = ("clip", "beit3", "ctl")
CAPTION_KINDS = ("jsonl", "demo")
REID_KINDS = ("market1501", "dukemtmc", "street2shop", "reid_demo")
RULE_SET_NAMES = ("replicated", "fsdp", "fsdp_tensor")


def _common(config: Config) -> list[tuple[bool, str]]:
    model, data, train = config.model, config.data, config.train
    return [
        (model.family in FAMILIES, f"model.family must be one of {', '.join(FAMILIES)}"),
        (data.kind in CAPTION_KINDS + REID_KINDS, f"data.kind must be one of {', '.join(CAPTION_KINDS + REID_KINDS)}"),
        (config.distributed.initialize in ("auto", "always", "never"),
         "distributed.initialize must be auto, always or never"),
        (train.precision in ("fp32", "bf16"), "train.precision must be fp32 or bf16"),
        (config.checkpoint.on_corrupt in ("fallback", "error"), "checkpoint.on_corrupt must be fallback or error"),
        (train.batch_size > 0 and train.steps > 0, "train.batch_size and train.steps must be > 0"),
        (len(data.mean) == 3 and len(data.std) == 3, "data.mean and data.std need 3 values"),
        (train.epochs >= 0, "train.epochs must be >= 0"),
        (train.micro_batches >= 1 and train.batch_size % train.micro_batches == 0,
         "train.micro_batches must be >= 1 and divide train.batch_size"),
        (train.accumulation in ("cache", "mean"), "train.accumulation must be cache or mean"),
        (train.loss_variant in ("local", "gathered", "ring"), "train.loss_variant must be local, gathered or ring"),
        (train.optimizer in ("adamw", "adam"), "train.optimizer must be adamw or adam"),
        (train.schedule in ("cosine", "multistep"), "train.schedule must be cosine or multistep"),
        (train.schedule == "cosine" or train.epochs > 0,
         "train.schedule=multistep counts train.warmup_epochs and train.milestones in epochs: set train.epochs"),
        (list(train.milestones) == sorted(train.milestones), "train.milestones must be increasing"),
        (0 < train.layer_decay <= 1, "train.layer_decay must be in (0, 1]"),
        (0 <= model.drop_path < 1, "model.drop_path must be in [0, 1)"),
    ]


def _dual_encoder(config: Config) -> list[tuple[bool, str]]:
    model, data = config.model, config.data
    checks = [
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
        (data.kind in CAPTION_KINDS, f"data.kind={data.kind} is re-id data: it needs model.family=ctl"),
        (data.resize in ("crop", "squash"), "data.resize must be crop or squash"),
        (0 < data.local_scale[0] <= data.local_scale[1] <= 1,
         "data.local_scale must be [low, high] with 0 < low <= high <= 1"),
        (config.eval.protocol in ("image_text", "text_to_image"),
         "eval.protocol must be image_text or text_to_image for a dual encoder"),
        (config.train.loss in ("contrastive", "sigmoid"), f"train.loss must be contrastive or sigmoid for "
                                                          f"model.family={model.family}"),
        ((config.train.loss == "sigmoid") == (model.init_logit_bias is not None),
         "train.loss=sigmoid needs model.init_logit_bias (SigLIP: -10), and only it has a logit bias"),
    ]
    if model.family == "beit3":
        multiway = model.multiway
        checks += [
            (multiway.heads > 0 and multiway.width % multiway.heads == 0,
             "model.multiway.width must divide by heads (> 0)"),
            (model.text.context_length <= multiway.max_text_positions - 2,
             "model.text.context_length must be <= model.multiway.max_text_positions - 2"),
        ]
    else:
        checks += [
            (model.drop_path == 0, "model.drop_path applies to model.family=beit3 only"),
            (config.train.layer_decay == 1, "train.layer_decay applies to model.family=beit3 only"),
        ]
    return checks


def _reid(config: Config) -> list[tuple[bool, str]]:
    model, data, train = config.model, config.data, config.train
    return [
        (data.kind in REID_KINDS, f"model.family=ctl trains on re-id data: data.kind must be one of "
                                  f"{', '.join(REID_KINDS)}"),
        (train.loss == "ctl", "model.family=ctl trains with train.loss=ctl"),
        (config.eval.protocol == "reid", "model.family=ctl evaluates with eval.protocol=reid"),
        (data.num_instances >= 2 and train.batch_size % data.num_instances == 0,
         "data.num_instances must be >= 2 and divide train.batch_size (identities x instances)"),
        (train.batch_size // max(data.num_instances, 1) >= 2, "a batch needs at least 2 identities"),
        (train.micro_batches == 1, "train.micro_batches applies to the contrastive losses only"),
        (model.resnet.last_stride in (1, 2), "model.resnet.last_stride must be 1 or 2"),
        (len(model.resnet.layers) == 4 and min(model.resnet.layers) >= 1,
         "model.resnet.layers must be 4 stage depths >= 1"),
        (model.num_classes >= 0, "model.num_classes must be >= 0 (0: the training split's identities)"),
        (0 <= data.random_erasing <= 1, "data.random_erasing is a probability"),
        (min(data.input_size) >= 32, "data.input_size must be (height, width), each >= 32"),
        (train.center_loss_weight > 0, "train.center_loss_weight must be > 0 (its optimiser divides by it)"),
    ]


def validate(config: Config, source: str = "config") -> None:
    checks = _common(config) + (_reid(config) if config.model.family == "ctl" else _dual_encoder(config))
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
