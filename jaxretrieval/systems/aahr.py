"""AAHR (arXiv 2507.09256; code unreleased): VSE-infinity (systems/vse.py) plus global-guided aggregation over frozen
CLIP features, relation GNNs over the batch, momentum encoders with queues and clustering prototypes
(models/aahr.py names each choice the paper leaves open). Every addition is switched and weighted in the `aahr`
section, so `aahr` with all of them off trains `vse_infty`'s model on its loss (the same losses up to float rounding:
the two steps compile differently); each term is logged on its own:

    loss = hinge_weight x hinge(v, t) + relation_weight x hinge(gnn(v; t), gnn(t; v))
         + momentum_weight x InfoNCE(v, t vs the momentum batch + queue) + prototype_weight x prototype CE

Both hinge terms switch from the sum to the hardest negative after the warm-up, as VSE-infinity's. The momentum
copies, queues (with their pointer and image ids), prototypes and step count are state in the checkpoint, so a
resumed run continues bit for bit. The prototypes are k-means centres of both queues, recomputed every
`prototype_refresh` steps from `prototype_start` on (default: once the queue has filled).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.config import Config, ConfigError
from jaxretrieval.config_checks import PRECOMP_KINDS
from jaxretrieval.data.precomp_pipeline import global_features
from jaxretrieval.losses.contrastive import soft_cross_entropy
from jaxretrieval.models.aahr import AAHR, enqueue, kmeans
from jaxretrieval.models.momentum import momentum_update
from jaxretrieval.models.vse import l2norm
from jaxretrieval.systems import register
from jaxretrieval.systems.base import Check
from jaxretrieval.systems.vse import VSEInfinity, VSESettings, hinge_terms, warmup_steps


@dataclasses.dataclass
class AAHRSettings(VSESettings):
    global_features: bool = True  # {split}_clip_ims.npy / _clip_caps.npy beside the split, gated into the embeddings
    global_dim: int = 512  # their width (CLIP ViT-B/32: 512)
    relation: str = "gat"  # gat, gcn or none
    relation_k: int = 4  # neighbours per modality
    relation_weight: float = 1.0
    momentum: float = 0.995  # EMA of the momentum encoders; 0: none (and no queue, no prototypes)
    queue_size: int = 4096  # a multiple of train.batch_size
    momentum_temp: float = 0.07
    momentum_weight: float = 1.0
    prototypes: int = 0  # k-means centres over the queues; 0: no prototype loss
    prototype_refresh: int = 500  # steps between clusterings
    prototype_start: int = -1  # the first clustering's step; -1: when the queue has filled
    kmeans_iterations: int = 10
    prototype_temp: float = 0.1
    prototype_weight: float = 0.5
    hinge_weight: float = 1.0


def queue_contrastive(v: jax.Array, t: jax.Array, v_m: jax.Array, t_m: jax.Array, queues: dict, ids: jax.Array,
                      temp: float) -> jax.Array:
    """Mean of image->text and text->image InfoNCE where the columns are the momentum batch then the queue, and a
    column is positive when it holds the same image id (queue slots never written hold id -1)."""
    column_ids = jnp.concatenate([ids, queues["ids"]])
    positives = ids[:, None] == column_ids[None, :]
    i2t = v @ jnp.concatenate([t_m, queues["text"]]).T / temp
    t2i = t @ jnp.concatenate([v_m, queues["image"]]).T / temp
    return 0.5 * (soft_cross_entropy(i2t, positives).mean() + soft_cross_entropy(t2i, positives).mean())


def prototype_loss(v: jax.Array, t: jax.Array, v_m: jax.Array, t_m: jax.Array, prototypes: jax.Array,
                   temp: float) -> jax.Array:
    """Each embedding predicts the prototype nearest its pair's momentum embedding (cross-entropy, both ways)."""
    def term(x: jax.Array, pair: jax.Array) -> jax.Array:
        target = jax.nn.one_hot(jnp.argmax(pair @ prototypes.T, axis=1), prototypes.shape[0])
        return soft_cross_entropy(x @ prototypes.T / temp, target).mean()

    return 0.5 * (term(v, t_m) + term(t, v_m))


def batch_inputs(batch: dict) -> tuple[dict, dict]:
    images = {"regions": batch["image"], "lengths": batch["image_lengths"], "global": batch.get("image_global")}
    return images, {"tokens": batch["text"], "global": batch.get("text_global")}


class AAHRSystem(VSEInfinity):
    name = "aahr"
    summary = ("AAHR: VSE-infinity + CLIP global gating, batch relation GNN, momentum queues, clustering "
               "prototypes (each switchable)")
    families = ("vse",)
    losses = ("aahr",)
    converters = ()
    data_kinds = PRECOMP_KINDS
    Section = AAHRSettings
    state_keys = ("updates", "momentum", "queues", "prototypes")

    def check(self, config: Config) -> list[Check]:
        s, batch = config.section, config.train.batch_size
        return [
            *super().check(config),
            (s.image_source == "precomp", "system aahr reads region features: aahr.image_source precomp (the raw-image "
                                          "mode is vse_infty's)"),
            (s.relation in ("gat", "gcn", "none"), "aahr.relation must be gat, gcn or none"),
            (s.relation_k >= 1, "aahr.relation_k must be >= 1"),
            (0 <= s.momentum < 1, "aahr.momentum must be in [0, 1) (0: no momentum encoders)"),
            (s.momentum > 0 or (s.queue_size == 0 and s.prototypes == 0),
             "aahr.queue_size and aahr.prototypes need the momentum encoders (aahr.momentum > 0)"),
            (s.queue_size % batch == 0, f"aahr.queue_size must be a multiple of train.batch_size ({batch})"),
            (s.prototypes == 0 or s.queue_size > 0, "aahr.prototypes cluster the queues: set aahr.queue_size"),
            (s.prototypes <= 2 * s.queue_size, "aahr.prototypes must be <= 2 x aahr.queue_size (the points)"),
            (s.prototype_refresh >= 1 and s.kmeans_iterations >= 1,
             "aahr.prototype_refresh and aahr.kmeans_iterations must be >= 1"),
        ]

    def build(self, config: Config, *, rngs: nnx.Rngs, dtype: Any) -> AAHR:
        s = config.section
        return AAHR(region_dim=s.region_dim, embed_dim=config.model.embed_dim, bert=self.bert(config),
                    region_mlp=s.region_mlp, global_dim=s.global_dim if s.global_features else 0,
                    relation=s.relation, relation_k=s.relation_k, momentum=s.momentum > 0,
                    queue_size=s.queue_size if s.momentum > 0 else 0, prototypes=s.prototypes, rngs=rngs,
                    dtype=dtype)

    def globals_of(self, config: Config, source: Any) -> Any:
        if not config.section.global_features:
            return None
        found = global_features(source)
        if found.dim != config.section.global_dim:
            raise ConfigError(f"{found.paths[0]} holds {found.dim}-wide global features but aahr.global_dim is "
                              f"{config.section.global_dim}")
        return found

    def prototype_start(self, config: Config) -> int:
        s = config.section
        return s.prototype_start if s.prototype_start >= 0 else s.queue_size // config.train.batch_size

    def before_loss(self, config: Config, graphdef: nnx.GraphDef, trainable: dict, state: dict, batch: dict,
                    key: jax.Array) -> tuple[dict, Any]:
        """The momentum copies moved towards the online weights and their (image, text) features of the batch; the
        prototypes re-clustered from the queues when due (from `key`: the seed's and step's)."""
        s, state, momentum_out = config.section, dict(state), None
        if "momentum" in state:
            state["momentum"] = momentum_update({**trainable, "momentum": state["momentum"]}, s.momentum)
            momentum_out = nnx.merge(graphdef, {**trainable, **state}).momentum_embeddings(*batch_inputs(batch))
        if "prototypes" in state:
            start, updates = self.prototype_start(config), state["updates"]
            due = (updates >= start) & ((updates - start) % s.prototype_refresh == 0)
            points = jnp.concatenate([state["queues"]["image"], state["queues"]["text"]])
            state["prototypes"] = jax.lax.cond(due, lambda: kmeans(points, s.prototypes, s.kmeans_iterations, key),
                                               lambda: state["prototypes"])
        return state, momentum_out

    def losses_of(self, config: Config, model: Any, batch: dict, key: jax.Array,
                  momentum_out: tuple | None) -> tuple[jax.Array, dict]:
        s, warmup = config.section, warmup_steps(config)
        images, texts = batch_inputs(batch)
        v, t = model.encode_image(images, train=True), model.encode_text(texts)
        updates = model.updates[...]
        terms = hinge_terms(v, t, s.margin, updates, warmup)
        total = s.hinge_weight * terms["loss_hinge"]
        if model.image_relation is not None:
            related = hinge_terms(model.image_relation(v, t), model.text_relation(t, v), s.margin, updates, warmup)
            terms["loss_relation"] = related["loss_hinge"]
            total += s.relation_weight * terms["loss_relation"]
        if momentum_out is not None and model.queues is not None:
            v_m, t_m = momentum_out
            queues = nnx.to_pure_dict(nnx.state(model.queues))
            terms["loss_momentum"] = queue_contrastive(v, t, v_m, t_m, queues, batch["group"], s.momentum_temp)
            total += s.momentum_weight * terms["loss_momentum"]
            if model.prototypes is not None:
                loss = prototype_loss(v, t, v_m, t_m, model.prototypes[...], s.prototype_temp)
                terms["loss_prototype"] = jnp.where(updates >= self.prototype_start(config), loss, 0.0)
                total += s.prototype_weight * terms["loss_prototype"]
        return total, terms

    def written_state(self, config: Config, state: dict, momentum_out: Any, batch: dict) -> dict:
        """The step count, the moved momentum copies, the prototypes, and the queues with the batch's momentum
        features written in."""
        written = {**super().written_state(config, state, momentum_out, batch),
                   **{k: state[k] for k in ("momentum", "prototypes") if k in state}}
        if "queues" in state:
            written["queues"] = enqueue(state["queues"], *momentum_out, batch["group"])
        return written


register(AAHRSystem())
__all__ = ["AAHRSettings", "AAHRSystem", "batch_inputs", "l2norm", "prototype_loss", "queue_contrastive"]
